//! Admission control in front of the signing pipeline (the `/v1` signing routes, relay auth,
//! approvals and `/rpc`; see [`is_signing_path`]): at most `max_in_flight` signing requests
//! are between their first store transaction and their answer at once, at most `queue` more wait
//! for a place (each for at most `max_wait`), and every further request is refused at once with
//! 503 `overloaded` and `Retry-After` — before its body is parsed, before any store work and
//! before the HSM.
//!
//! Why in front of the store and not only at the HSM pool: a request admitted to the pipeline
//! costs a durable decision record before it reaches the device, so refusing only at the device
//! (the PKCS#11 pool's bounded queue does) would spend an fsync on every request that is then
//! refused, and the store would become the queue. With this gate, what the signer holds under
//! overload is bounded: `max_in_flight + queue` requests (each body bounded by `max_body_bytes`),
//! plus the connections the listener accepts (`max_connections`, each idle or refused at once).
//!
//! Refusals for overload are audited in aggregate — one record per second at most, with the
//! count refused since the previous record — so that a flood cannot turn into a flood of store
//! writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use castellan_api::serve::Peer;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{ApiError, Signer};
use crate::backend::KeyBackend;
use crate::store::Store;

/// The limits of [`Admission`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Signing requests in the pipeline at once.
    pub max_in_flight: usize,
    /// Requests that may wait for a place; beyond it, refused at once.
    pub queue: usize,
    /// Longest wait for a place; a request that waited this long is refused.
    pub max_wait: Duration,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            queue: 256,
            max_wait: Duration::from_secs(1),
        }
    }
}

/// The gate. Cheap to share: clones share one state.
#[derive(Clone, Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    permits: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    refused: Arc<AtomicU64>,
    audit: Arc<Aggregate>,
}

/// Refusals audited in aggregate: those not yet covered by an audit record, and when the last
/// aggregated record was written (ms since the Unix epoch); at most one record a second.
#[derive(Debug, Default)]
struct Aggregate {
    unaudited: AtomicU64,
    last_audit_ms: AtomicU64,
}

impl Aggregate {
    fn add(&self) {
        self.unaudited.fetch_add(1, Ordering::AcqRel);
    }

    fn pending(&self) -> u64 {
        self.unaudited.load(Ordering::Acquire)
    }

    /// Milliseconds until the next record may be written.
    fn wait_ms(&self, now_ms: u64) -> u64 {
        self.last_audit_ms
            .load(Ordering::Acquire)
            .saturating_add(1000)
            .saturating_sub(now_ms)
    }

    /// When at least a second has passed since the last record and refusals are unaudited,
    /// claims them: returns the count to write in one record.
    fn take(&self, now_ms: u64) -> Option<u64> {
        let last = self.last_audit_ms.load(Ordering::Acquire);
        if now_ms < last.saturating_add(1000) || self.pending() == 0 {
            return None;
        }
        self.last_audit_ms
            .compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        match self.unaudited.swap(0, Ordering::AcqRel) {
            0 => None,
            n => Some(n),
        }
    }
}

/// A place in the pipeline, released on drop.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
}

/// Decrements the waiting count when a waiter leaves (admitted, timed out or cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// A gate with `limits` (zeros are raised to one place and no queue).
    pub fn new(limits: AdmissionLimits) -> Self {
        let limits = AdmissionLimits {
            max_in_flight: limits.max_in_flight.max(1),
            ..limits
        };
        Self {
            limits,
            permits: Arc::new(Semaphore::new(limits.max_in_flight)),
            waiting: Arc::new(AtomicUsize::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
            audit: Arc::new(Aggregate::default()),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    /// Requests in the pipeline now.
    pub fn in_flight(&self) -> usize {
        self.limits.max_in_flight - self.permits.available_permits()
    }

    /// Requests refused for overload since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Takes a place: at once when one is free, after a bounded wait when the queue has room,
    /// else (or when the wait runs out) an `overloaded` refusal.
    pub async fn admit(&self) -> Result<Admitted, ApiError> {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Ok(Admitted { _permit: permit });
        }
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        if before >= self.limits.queue {
            return Err(self.refuse(format!(
                "the signer is saturated: {} signing requests in flight and {} waiting (limits {} and {})",
                self.limits.max_in_flight, before, self.limits.max_in_flight, self.limits.queue
            )));
        }
        match tokio::time::timeout(
            self.limits.max_wait,
            Arc::clone(&self.permits).acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => Ok(Admitted { _permit: permit }),
            // The semaphore is never closed.
            Ok(Err(_closed)) => Err(self.refuse("the signer is shutting down".into())),
            Err(_elapsed) => Err(self.refuse(format!(
                "the signer is saturated: no place among {} in flight within {} ms",
                self.limits.max_in_flight,
                self.limits.max_wait.as_millis()
            ))),
        }
    }

    fn refuse(&self, message: String) -> ApiError {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.audit.add();
        ApiError::unavailable("overloaded", message, 1).with_details(json!({
            "maxInFlight": self.limits.max_in_flight,
            "queue": self.limits.queue,
            "maxWaitMs": u64::try_from(self.limits.max_wait.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    /// When at least a second has passed since the last overload audit record and refusals are
    /// unaudited, claims them: returns the count to write in one record.
    pub fn take_audit(&self, now_ms: u64) -> Option<u64> {
        self.audit.take(now_ms)
    }
}

/// At most this many audit writes for connections refused at the TLS handshake run at once.
pub const MAX_CONNECTION_AUDITS: usize = 64;

/// Bounds the audit work of connections refused at the TLS handshake (no certificate, unknown
/// CA, revoked, TLS 1.2, …). Each refusal gets its own audit record while fewer than
/// `max_tasks` such writes are running; past that, the refusal is counted instead, and one
/// flusher task writes an aggregated record at most once a second saying how many refusals
/// were not audited individually — so a handshake flood cannot become an unbounded number of
/// tasks and store writes.
#[derive(Clone, Debug)]
pub struct ConnectionAudits {
    max_tasks: usize,
    tasks: Arc<Semaphore>,
    aggregate: Arc<Aggregate>,
    /// Whether a flusher task is running.
    flushing: Arc<AtomicBool>,
    /// Refusals not audited individually since start.
    not_individual: Arc<AtomicU64>,
}

/// How one refused connection is audited.
#[derive(Debug)]
pub enum ConnectionAudit {
    /// In its own record; the task writing it holds the place until it is done.
    Individual(OwnedSemaphorePermit),
    /// Counted for an aggregated record; when `start_flusher`, the caller starts the (one)
    /// flusher task (see [`ConnectionAudits::flusher_done`]).
    Aggregated {
        /// No flusher is running: the caller must start one.
        start_flusher: bool,
    },
}

impl ConnectionAudits {
    /// At most `max_tasks` (at least one) individual audit writes at once.
    pub fn new(max_tasks: usize) -> Self {
        let max_tasks = max_tasks.max(1);
        Self {
            max_tasks,
            tasks: Arc::new(Semaphore::new(max_tasks)),
            aggregate: Arc::new(Aggregate::default()),
            flushing: Arc::new(AtomicBool::new(false)),
            not_individual: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Decides how a refused connection is audited.
    pub fn admit(&self) -> ConnectionAudit {
        match Arc::clone(&self.tasks).try_acquire_owned() {
            Ok(permit) => ConnectionAudit::Individual(permit),
            Err(_) => {
                self.not_individual.fetch_add(1, Ordering::Relaxed);
                self.aggregate.add();
                ConnectionAudit::Aggregated {
                    start_flusher: !self.flushing.swap(true, Ordering::AcqRel),
                }
            }
        }
    }

    /// Refusals not audited individually since start.
    pub fn not_individually_audited(&self) -> u64 {
        self.not_individual.load(Ordering::Relaxed)
    }

    /// For the flusher: milliseconds until the next aggregated record may be written.
    pub fn wait_ms(&self, now_ms: u64) -> u64 {
        self.aggregate.wait_ms(now_ms)
    }

    /// For the flusher: claims the counted refusals for one record (at most once a second).
    pub fn take_audit(&self, now_ms: u64) -> Option<u64> {
        self.aggregate.take(now_ms)
    }

    /// For the flusher, after a record: true if it must go on (refusals were counted after its
    /// last claim and no other flusher took over), false if it ends.
    pub fn flusher_done(&self) -> bool {
        self.flushing.store(false, Ordering::Release);
        self.aggregate.pending() > 0 && !self.flushing.swap(true, Ordering::AcqRel)
    }

    /// The refusal written to the audit chain for `count` refusals not audited individually.
    pub fn audit_reason(&self, count: u64) -> String {
        format!(
            "{count} connections refused at the TLS handshake were not audited individually \
             (at most {} audit writes for refused connections at once)",
            self.max_tasks
        )
    }
}

/// The routes the gate covers: those that can reach the HSM — the `/v1` signing routes,
/// `/v1/relay-auth`, an approval (the approval that completes a threshold signs the pending
/// request) and the whole of `/rpc`.
///
/// `/rpc` is gated as one route because its method is only known after the body is parsed,
/// and the gate refuses before that: the read-only methods forwarded to the upstream node
/// (`eth_call`, `eth_getBalance`, …) share the signing limit. That is deliberate: a flood of
/// forwarded reads holds connections and upstream round trips just as signatures hold the HSM,
/// and it must not get past the bound either.
pub fn is_signing_path(path: &str) -> bool {
    (path.starts_with("/v1/keys/") && path.contains("/sign/"))
        || path == "/v1/relay-auth"
        || path == "/rpc"
        || (path.starts_with("/v1/requests/") && path.ends_with("/approvals"))
}

/// The refusal written to the audit chain for `count` overload refusals.
pub fn audit_error(count: u64, limits: AdmissionLimits) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        format!(
            "{count} signing requests refused for overload (limits: {} in flight, {} waiting, {} ms wait)",
            limits.max_in_flight,
            limits.queue,
            limits.max_wait.as_millis()
        ),
    )
}

/// The router layer: takes a place for every request on a signing path, holds it until the
/// answer is made, and answers `overloaded` (503, `Retry-After`) at once when there is none.
pub async fn gate<B: KeyBackend, S: Store>(
    State(s): State<Arc<Signer<B, S>>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    if !is_signing_path(path) {
        return next.run(req).await;
    }
    match s.admission().admit().await {
        Ok(admitted) => {
            let response = next.run(req).await;
            drop(admitted);
            response
        }
        Err(e) => {
            let route = route_label(path);
            s.metrics()
                .requests
                .get_or_create(&super::metrics::RequestLabels {
                    route: route.to_owned(),
                    code: e.code.to_owned(),
                })
                .inc();
            let rid = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let now_ms = crate::audit::UnixMillis::now().0;
            if let Some(count) = s.admission().take_audit(now_ms) {
                let identity = req
                    .extensions()
                    .get::<Peer>()
                    .map(|p| p.identity.to_string())
                    .unwrap_or_default();
                let limits = s.admission().limits();
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    let id = format!("overload-{now_ms}");
                    s.audit_refusal(&id, &identity, &audit_error(count, limits))
                        .await;
                });
            }
            let mut response = e.into_response();
            if let Some(v) = rid.and_then(|r| HeaderValue::from_str(&r).ok()) {
                response
                    .headers_mut()
                    .insert(HeaderName::from_static("x-request-id"), v);
            }
            response
        }
    }
}

/// The metrics route label of a signing path.
fn route_label(path: &str) -> &'static str {
    match path.rsplit('/').next() {
        Some("transaction") => "transaction",
        Some("message") => "message",
        Some("typed-data") => "typed_data",
        Some("bundle") => "bundle",
        Some("rpc") => "rpc",
        Some("approvals") => "approval",
        _ => "relay_auth",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn gate(in_flight: usize, queue: usize, wait_ms: u64) -> Admission {
        Admission::new(AdmissionLimits {
            max_in_flight: in_flight,
            queue,
            max_wait: Duration::from_millis(wait_ms),
        })
    }

    #[tokio::test]
    async fn admits_up_to_the_limit_queues_then_refuses() {
        let g = gate(2, 1, 5_000);
        let a = g.admit().await.unwrap();
        let _b = g.admit().await.unwrap();
        assert_eq!(g.in_flight(), 2);
        // The third waits in the queue; the fourth finds the queue full.
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.admit().await.map(|_| ()) });
        while g.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        let e = g.admit().await.unwrap_err();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code, "overloaded");
        assert!(
            e.headers
                .iter()
                .any(|(n, v)| n == "retry-after" && v == "1")
        );
        assert!(e.message.contains("limits 2 and 1"), "{}", e.message);
        // A place frees: the waiter gets it.
        drop(a);
        waiter.await.unwrap().unwrap();
        assert_eq!(g.refused(), 1);
        assert_eq!(g.waiting.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_wait_is_bounded() {
        let g = gate(1, 4, 20);
        let _a = g.admit().await.unwrap();
        let started = std::time::Instant::now();
        let e = g.admit().await.unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert!(e.message.contains("within 20 ms"), "{}", e.message);
        assert_eq!(g.waiting.load(Ordering::Acquire), 0);
    }

    #[test]
    fn overload_audit_is_aggregated_per_second() {
        let g = gate(1, 0, 1);
        assert_eq!(g.take_audit(10_000), None);
        g.refuse("x".into());
        g.refuse("y".into());
        assert_eq!(g.take_audit(10_000), Some(2));
        g.refuse("z".into());
        assert_eq!(g.take_audit(10_500), None, "less than a second later");
        assert_eq!(g.take_audit(11_000), Some(1));
        let e = audit_error(2, g.limits());
        assert_eq!(e.code, "overloaded");
        assert!(e.message.starts_with("2 signing requests refused"));
    }

    #[test]
    fn connection_refusal_audits_are_bounded_then_aggregated() {
        let a = ConnectionAudits::new(2);
        let first = a.admit();
        let second = a.admit();
        assert!(matches!(first, ConnectionAudit::Individual(_)));
        assert!(matches!(second, ConnectionAudit::Individual(_)));
        // Past the bound: counted, and only the first starts the flusher.
        assert!(matches!(
            a.admit(),
            ConnectionAudit::Aggregated {
                start_flusher: true
            }
        ));
        assert!(matches!(
            a.admit(),
            ConnectionAudit::Aggregated {
                start_flusher: false
            }
        ));
        assert_eq!(a.not_individually_audited(), 2);
        assert_eq!(a.wait_ms(10_000), 0);
        assert_eq!(a.take_audit(10_000), Some(2));
        assert!(a.audit_reason(2).starts_with("2 connections refused"));
        // Nothing counted since the claim: the flusher ends, and the next one is started anew.
        assert!(!a.flusher_done());
        assert!(matches!(
            a.admit(),
            ConnectionAudit::Aggregated {
                start_flusher: true
            }
        ));
        // Counted after its claim: the flusher goes on, waiting out the second.
        assert!(a.flusher_done());
        assert_eq!(a.wait_ms(10_400), 600);
        assert_eq!(a.take_audit(10_400), None);
        assert_eq!(a.take_audit(11_000), Some(1));
        assert!(!a.flusher_done());
        // A finished individual write frees its place.
        drop(first);
        assert!(matches!(a.admit(), ConnectionAudit::Individual(_)));
        assert_eq!(a.not_individually_audited(), 3);
    }

    #[test]
    fn signing_paths() {
        assert!(is_signing_path("/v1/keys/hot/sign/transaction"));
        assert!(is_signing_path("/v1/relay-auth"));
        assert!(!is_signing_path("/v1/keys/hot"));
        assert!(!is_signing_path("/ready"));
        assert!(!is_signing_path("/v1/admin/freeze"));
        assert!(is_signing_path("/rpc"));
        assert!(is_signing_path("/v1/requests/r-1/approvals"));
        assert!(!is_signing_path("/v1/requests/r-1"));
        assert_eq!(route_label("/rpc"), "rpc");
        assert_eq!(route_label("/v1/requests/r-1/approvals"), "approval");
        assert_eq!(route_label("/v1/relay-auth"), "relay_auth");
    }
}
