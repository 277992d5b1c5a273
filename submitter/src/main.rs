//! The `submitter` binary: loads `submitter.toml`, opens the store and reloads accepted bundles,
//! follows the chain, and serves the API and the metrics.
//!
//! PENDING (the lead adds it in `api::tls`): the mTLS listener and identity layer. Until then the
//! API listens on plain HTTP and only on a loopback address, and every local caller gets a
//! development identity with the `signer` and `admin` roles. Relay-auth signatures and outcome
//! reports go to the signer named in `[signer]`; without it, relays that sign are refused at
//! start and outcomes go to the log.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Extension;
use castellan_api::submitter::{CallerIdentity, Role};
use castellan_submitter::auth::RelayAuthSigner;
use castellan_submitter::config::Config;
use castellan_submitter::signer::{SignerOutcomes, SignerRelayAuth};
use castellan_submitter::store::Store;
use castellan_submitter::{LogOutcomes, OutcomeSink, api};
use clap::Parser;

/// Command line.
#[derive(Parser, Debug)]
#[command(name = "submitter", about = "Castellan bundle submitter")]
struct Args {
    /// Path of submitter.toml.
    #[arg(
        long,
        env = "CASTELLAN_SUBMITTER_CONFIG",
        default_value = "/etc/castellan/submitter.toml"
    )]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .json()
        .init();
    let config = Config::load(&args.config)?;
    if !config.api.listen.ip().is_loopback() || !config.api.metrics_listen.ip().is_loopback() {
        bail!(
            "until the mTLS listener lands, api.listen and api.metrics_listen must be loopback addresses"
        );
    }
    let store = Store::open(&config.store.path)
        .with_context(|| format!("opening {}", config.store.path.display()))?;
    // With a [signer] section, relay-auth signatures and outcomes go through the signer's mTLS
    // API; without one, a relay that signs makes this fail with a clear message.
    let (auth, sink): (Option<Arc<dyn RelayAuthSigner>>, Arc<dyn OutcomeSink>) =
        match &config.signer {
            Some(signer) => {
                let client = castellan_submitter::signer::client(signer)?;
                (
                    Some(Arc::new(SignerRelayAuth::new(client.clone()))),
                    Arc::new(SignerOutcomes::new(client)),
                )
            }
            None => (None, Arc::new(LogOutcomes)),
        };
    let engine = castellan_submitter::build_engine(&config, auth, store, sink)?;
    let live = engine.restore().await?;
    tracing::info!(live, relays = engine.relays().len(), "bundles restored");
    let tracker = engine.spawn_head_tracker(Duration::from_millis(config.chain.poll_interval_ms));

    let identity = CallerIdentity {
        id: "loopback-development".into(),
        roles: vec![Role::Signer, Role::Admin],
    };
    let app = api::router(engine.clone(), config.api.max_body_bytes).layer(Extension(identity));
    let api_listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("binding {}", config.api.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(config.api.metrics_listen)
        .await
        .with_context(|| format!("binding {}", config.api.metrics_listen))?;
    tracing::warn!(listen = %config.api.listen, "serving the API on plain HTTP (mTLS pending)");
    let metrics =
        tokio::spawn(
            async move { axum::serve(metrics_listener, api::metrics_router(engine)).await },
        );
    axum::serve(api_listener, app)
        .with_graceful_shutdown(shutdown())
        .await?;
    tracker.abort();
    metrics.abort();
    Ok(())
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGTERM handler");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}
