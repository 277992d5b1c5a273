//! The `submitter` binary: loads `submitter.toml`, builds the API's TLS configuration, opens the
//! store and reloads accepted bundles, follows the chain, and only then serves the API over
//! mutual TLS (`[tls]`, callers mapped to roles by `[[identities]]`) and the metrics on their own
//! plain-HTTP listener (bind it to a private address). On SIGTERM or Ctrl-C it drains with a
//! deadline.
//!
//! Relay-auth signatures and outcome reports go to the signer named in `[signer]`; without it,
//! relays that sign are refused at start and outcomes go to the log.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use castellan_api::serve::{Refusal, ServeOptions, serve_mtls, watch_tls_reload};
use castellan_api::tls::ReloadableServerConfig;
use castellan_submitter::api::{self, Identities};
use castellan_submitter::auth::RelayAuthSigner;
use castellan_submitter::config::Config;
use castellan_submitter::signer::{SignerOutcomes, SignerRelayAuth};
use castellan_submitter::store::Store;
use castellan_submitter::{LogOutcomes, OutcomeSink};
use clap::Parser;
use tokio::sync::watch;

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
        .with_writer(std::io::stderr)
        .json()
        .init();
    let config = Config::load(&args.config)?;
    // Built first: a missing or wrong certificate, key or CA stops the start before anything else.
    let tls = Arc::new(
        ReloadableServerConfig::new(config.tls.clone())
            .context("building the API's TLS configuration ([tls])")?,
    );
    if config.identity_list.is_empty() {
        tracing::warn!("no [[identities]] configured: every caller will be refused");
    }
    let identities = Identities::new(config.identities());
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

    let app = api::mtls_router(engine.clone(), config.api.max_body_bytes, identities);
    // serve_mtls logs each refused connection with its reason; the count goes to the metrics.
    let refusals = engine.metrics().clone();
    let opts = ServeOptions {
        on_refusal: Some(Arc::new(move |_: Refusal| refusals.refusal("tls"))),
        ..ServeOptions::default()
    };
    let api_listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("binding {}", config.api.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(config.api.metrics_listen)
        .await
        .with_context(|| format!("binding {}", config.api.metrics_listen))?;
    let addr = api_listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;
    // Tests and supervisors read the bound addresses from these lines.
    println!("submitter listening on {addr}");
    println!("submitter metrics on {metrics_addr}");
    tracing::info!(%addr, %metrics_addr, "submitter ready");

    // One signal, two listeners: the API drains with a deadline, the metrics stop with it.
    let (stop_tx, stop_rx) = watch::channel(false);
    let reload = tokio::spawn(watch_tls_reload(tls.clone(), Duration::from_secs(2)));
    let metrics = tokio::spawn(async move {
        axum::serve(metrics_listener, api::metrics_router(engine))
            .with_graceful_shutdown(stopped(stop_rx))
            .await
    });
    serve_mtls(api_listener, tls, app, opts, async move {
        shutdown().await;
        let _ = stop_tx.send(true);
    })
    .await?;
    reload.abort();
    tracker.abort();
    if tokio::time::timeout(Duration::from_secs(2), metrics)
        .await
        .is_err()
    {
        tracing::warn!("the metrics listener did not stop in time");
    }
    tracing::info!("submitter stopped");
    Ok(())
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means shutdown.
    let _ = rx.wait_for(|stop| *stop).await;
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
