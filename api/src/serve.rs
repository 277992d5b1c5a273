//! The mTLS accept loop shared by the signer and the submitter: TLS handshake with a deadline,
//! the caller's [`Peer`] put into every request's extensions, HTTP/1.1 with keep-alive, and a
//! graceful drain with a deadline on shutdown.
//!
//! Handlers read the caller with `axum::Extension<Peer>`; a request can only reach a handler
//! through a completed mutual-TLS handshake, so the extension is always present in served traffic.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::tls::{Identity, ReloadableServerConfig, identity_of};

/// The caller of a request: its verified identity and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Identity from the client certificate (SAN URI, SAN DNS or CN).
    pub identity: Identity,
    /// The TCP peer address.
    pub addr: SocketAddr,
}

/// A connection refused before any request was read (TLS failure, no identity).
#[derive(Clone, Debug)]
pub struct Refusal {
    /// The TCP peer address.
    pub addr: SocketAddr,
    /// Why, for the audit record and the log (never a secret).
    pub reason: String,
}

/// Called for every refused connection, so the server can audit it. It runs on the refused
/// connection's task and must not block; whatever work it starts must be bounded by the hook
/// itself (a handshake flood calls it once per connection — the signer bounds its audit tasks
/// and aggregates the rest, see `castellan_signer::server::admission::ConnectionAudits`).
pub type RefusalHook = Arc<dyn Fn(Refusal) + Send + Sync>;

/// Options of the accept loop.
#[derive(Clone)]
pub struct ServeOptions {
    /// Deadline for a TLS handshake; slower clients are dropped.
    pub handshake_timeout: Duration,
    /// At most this many open connections; further ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// How long open connections may take to finish after shutdown begins.
    pub drain_timeout: Duration,
    /// Called for every refused connection.
    pub on_refusal: Option<RefusalHook>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            max_connections: 1024,
            drain_timeout: Duration::from_secs(10),
            on_refusal: None,
        }
    }
}

/// Serves `app` on `listener` over mutual TLS until `shutdown` resolves, then drains open
/// connections for at most `opts.drain_timeout`.
pub async fn serve_mtls(
    listener: TcpListener,
    tls: Arc<ReloadableServerConfig>,
    app: Router,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                // The semaphore is never closed; treat it as a shutdown if it is.
                Err(_) => break,
            },
        };
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.current());
        let app = app.clone();
        let opts2 = opts.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let refuse = |reason: String| {
                tracing::info!(%addr, %reason, "connection refused");
                if let Some(hook) = &opts2.on_refusal {
                    hook(Refusal { addr, reason });
                }
            };
            let stream =
                match tokio::time::timeout(opts2.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return refuse(format!("TLS handshake failed: {e}")),
                    Err(_) => return refuse("TLS handshake timed out".into()),
                };
            let identity = match stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
            {
                Some(cert) => match identity_of(cert) {
                    Ok(id) => id,
                    Err(e) => return refuse(e.to_string()),
                },
                None => return refuse("no client certificate".into()),
            };
            let peer = Peer { identity, addr };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(peer.clone());
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%addr, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(opts.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed with connections still open");
    }
    Ok(())
}

/// Keeps a [`ReloadableServerConfig`] current: reloads on SIGHUP and when a watched file changes
/// (checked every `poll`). Runs until the task is dropped.
pub async fn watch_tls_reload(tls: Arc<ReloadableServerConfig>, poll: Duration) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(poll);
    loop {
        #[cfg(unix)]
        let forced = match hup.as_mut() {
            Some(h) => tokio::select! { _ = h.recv() => true, _ = tick.tick() => false },
            None => {
                tick.tick().await;
                false
            }
        };
        #[cfg(not(unix))]
        let forced = {
            tick.tick().await;
            false
        };
        let result = if forced {
            tls.reload().map(|()| true)
        } else {
            tls.reload_if_changed()
        };
        match result {
            Ok(true) => tracing::info!("TLS configuration reloaded (CA bundle, CRL, certificate)"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "TLS reload failed; keeping the previous configuration")
            }
        }
    }
}
