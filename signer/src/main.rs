//! The `signer` daemon: parse arguments, load and validate the configuration, open the store and
//! the key backend, self-check every registered key against its device, and only then bind and
//! serve mTLS; on SIGTERM or Ctrl-C, drain with a deadline.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use castellan_api::serve::{Refusal, ServeOptions, serve_mtls, watch_tls_reload};
use castellan_api::tls::ReloadableServerConfig;
use castellan_policy::Policy;
use castellan_signer::audit::UnixMillis;
use castellan_signer::backend::any::AnyBackend;
use castellan_signer::config::{BackendConfig, SignerConfig};
use castellan_signer::server::rpc::Upstream;
use castellan_signer::server::{Signer, SignerSettings, SubmitterLink, router};
use castellan_signer::store::{SqliteStore, Store, run_maintenance};
use clap::Parser;

/// Castellan signer: the only process that can make a signature, and only inside an HSM.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Path of signer.toml.
    #[arg(long, short, env = "CASTELLAN_SIGNER_CONFIG")]
    config: PathBuf,
    /// Log as JSON lines (production) instead of human-readable text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    // Before anything is read: no core file and no ptrace by others can ever hold what follows.
    castellan_signer::hardening::disable_core_dumps()?;
    let args = Args::parse();
    init_tracing(args.log_json);

    let config = SignerConfig::load(&args.config)?;
    // Before any other thread exists, so that all of them inherit it (see `sched`); the key
    // device's workers take precedence back when they start.
    // Not a security measure: a refusal (a seccomp filter without `sched_setscheduler`, say)
    // costs throughput, and the signer says so and runs.
    if config.scheduling.device_first
        && let Err(e) = castellan_signer::sched::yield_to_devices()
    {
        tracing::warn!(
            error = %e,
            "the key device's threads get no precedence; set device_first = false in \
             [scheduling] to run so without this warning"
        );
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(serve(config))
}

async fn serve(config: SignerConfig) -> anyhow::Result<()> {
    // Before the PIN is read or a device opened: refuse root unless allowed, lock memory.
    let hardened = castellan_signer::hardening::apply(&config.hardening)?;
    tracing::info!(
        memory_locked = hardened.memory_locked,
        as_root = hardened.as_root,
        "process hardened: core dumps off, not dumpable"
    );
    if hardened.as_root {
        tracing::warn!("running as root (hardening.allow_root = true): use a dedicated user");
    }
    let policy_text = std::fs::read_to_string(&config.policy.path)
        .with_context(|| format!("reading policy {}", config.policy.path.display()))?;
    let policy = Policy::from_toml(&policy_text)
        .with_context(|| format!("loading policy {}", config.policy.path.display()))?;
    let store = SqliteStore::open(&config.store.path)
        .with_context(|| format!("opening store {}", config.store.path.display()))?;
    let backend = AnyBackend::open(&config.backend)
        .await
        .context(match &config.backend {
            BackendConfig::Pkcs11(_) => "opening the PKCS#11 token",
            BackendConfig::YubiHsm(_) => "connecting to the YubiHSM 2",
            BackendConfig::Ledger(_) => "opening the Ledger",
        })?;
    // reqwest is built without a default TLS provider (no aws-lc); use ring everywhere.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let upstream = match &config.upstream {
        Some(u) => Some(Upstream::new(&u.url, u.timeout).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let submitter = match &config.submitter {
        Some(c) => Some(SubmitterLink::new(&c.url, &c.tls, c.timeout).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let settings = SignerSettings {
        chain_id: config.chain_id,
        identities: config.identities(),
        pending_ttl_ms: u64::try_from(config.limits.pending_ttl.as_millis()).unwrap_or(u64::MAX),
        max_body_bytes: config.limits.max_body_bytes,
        upstream,
        submitter,
        policy_path: Some(config.policy.path.clone()),
        admission: castellan_signer::server::admission::AdmissionLimits {
            max_in_flight: config.limits.max_in_flight,
            queue: config.limits.queue,
            max_wait: config.limits.queue_wait,
        },
    };
    let signer = Arc::new(Signer::new(settings, policy, store, backend));
    match signer.self_check().await {
        Ok(n) => tracing::info!(keys = n, "self-check passed: every key matches its device"),
        Err(e) => bail!("self-check failed, refusing to serve: {e}"),
    }
    match signer.load_grants().await {
        Ok(n) => tracing::info!(grants = n, "budget grants in force"),
        Err(e) => bail!("cannot load the budget grants: {e}"),
    }
    // Before serving: a window spent before this start is refused by the policy's pre-check.
    match signer.warm_limits().await {
        Ok(n) => tracing::info!(windows = n, "limit windows warmed from the store"),
        Err(e) => bail!("cannot read the limit windows: {e}"),
    }

    // Upkeep: prune expired reservations; checkpoint the audit chain with the audit key.
    let audit_key = match &config.audit.key {
        Some(name) => Some(
            signer
                .audit_key(name)
                .with_context(|| format!("audit key {name:?} has no active, verified version"))?,
        ),
        None => None,
    };
    let (stop_upkeep, upkeep_stopped) = tokio::sync::watch::channel(false);
    let upkeep = {
        let signer = signer.clone();
        let every = config.audit.checkpoint_every;
        let interval = config.audit.interval;
        tokio::spawn(async move {
            let mut stopped = upkeep_stopped;
            run_maintenance(
                signer.store(),
                signer.backend(),
                audit_key.as_ref(),
                every,
                interval,
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            )
            .await;
        })
    };

    let tls = Arc::new(ReloadableServerConfig::new(config.tls.clone())?);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    // Prometheus text on its own plain listener (bind it to a private address). Bound before
    // the "listening" line: a supervisor (or a test) that reads that line must not see the
    // signer exit right after it because the metrics address is taken.
    let metrics_listener = match &config.metrics {
        Some(m) => Some(
            tokio::net::TcpListener::bind(m.listen)
                .await
                .with_context(|| format!("binding metrics {}", m.listen))?,
        ),
        None => None,
    };
    // Tests and supervisors read the bound addresses from these lines.
    println!("signer listening on {addr}");
    if let Some(l) = &metrics_listener {
        println!("signer metrics on {}", l.local_addr()?);
    }
    tracing::info!(%addr, chain_id = config.chain_id, "signer ready");

    if let Ok(Some(_)) = signer.store().freeze_state().await {
        signer.metrics().frozen.set(1);
    }
    let metrics_task = match metrics_listener {
        Some(listener) => {
            let scraped = signer.clone();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let s = scraped.clone();
                    async move {
                        // State gauges are read from the backend and the store at each scrape.
                        let m = s.metrics();
                        m.refresh(s.is_ready(), s.store(), UnixMillis::now()).await;
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4; charset=utf-8",
                            )],
                            m.render(),
                        )
                    }
                }),
            );
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "metrics listener failed");
                }
            }))
        }
        None => None,
    };

    let reload = tokio::spawn(watch_tls_reload(tls.clone(), Duration::from_secs(2)));
    let audit = signer.clone();
    let opts = ServeOptions {
        // Bounded: see `Signer::connection_refused`.
        on_refusal: Some(Arc::new(move |r: Refusal| {
            audit.connection_refused(r.addr, r.reason);
        })),
        ..ServeOptions::default()
    };
    serve_mtls(
        listener,
        tls,
        router(signer.clone()),
        opts,
        shutdown_signal(),
    )
    .await?;
    signer.flush_refusal_audits().await;
    reload.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = stop_upkeep.send(true);
    let _ = upkeep.await;
    tracing::info!("signer stopped");
    Ok(())
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
