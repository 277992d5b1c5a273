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
//! count refused since the previous record (payload `count`), written by one flusher task so the
//! last count of a burst is written about a second after it — so that a flood cannot turn into a
//! flood of store writes. A refusal itself is cheap: prebuilt answer bytes, atomic counts, no log
//! line (see [`gate`]). On `/rpc` its body is a JSON-RPC 2.0 error (`-32005`, EIP-1474 "limit
//! exceeded", `data.code` `overloaded`) with the request's id when its small body carries one.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{ApiError, Signer};
use crate::audit::{AuditEntry, AuditKind, UnixMillis};
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

/// Seconds a refused client is asked to wait (`Retry-After`).
const RETRY_AFTER_SECONDS: u64 = 1;

/// The body of a refused `/rpc` request is read (to answer with its id) only when it declares at
/// most this many bytes…
const RPC_READ_MAX: u64 = 16 * 1024;

/// …and only for this long (see [`read_small`]).
const RPC_READ_WAIT: Duration = Duration::from_millis(50);

/// Why a request was refused for overload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overload {
    /// Every place taken and the queue full.
    QueueFull = 0,
    /// Waited `max_wait` in the queue without getting a place.
    WaitElapsed = 1,
    /// The gate is closed (shutting down).
    Closed = 2,
}

/// A refusal by [`Admission::admit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Why.
    pub reason: Overload,
    /// No overload audit flusher is running: the caller must start one (see
    /// [`Admission::flusher_done`]), which writes the aggregated record.
    pub start_flusher: bool,
}

/// The gate. Cheap to share: clones share one state.
#[derive(Clone, Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    permits: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    refused: Arc<AtomicU64>,
    audit: Arc<Aggregate>,
    answers: Arc<Answers>,
}

/// The answers of the refusals, made once: a refusal under overload builds no JSON and formats
/// nothing (the limits do not change while the gate lives).
#[derive(Debug)]
struct Answers {
    /// By [`Overload`]: the refusal and its body for the `/v1` routes (`{"error": …}`)…
    errors: [ApiError; 3],
    rest: [Bytes; 3],
    /// …and the JSON-RPC error object for `/rpc` (see [`super::rpc::overload_error`]).
    rpc: [Bytes; 3],
    /// The requests counter of each signing route (see [`route_label`]), made on first use.
    counters: [OnceLock<Counter>; ROUTES.len()],
}

/// Refusals audited in aggregate: those not yet covered by an audit record, when the last
/// aggregated record was written (ms since the Unix epoch; at most one record a second), and
/// whether a flusher task is running to write them.
#[derive(Debug, Default)]
struct Aggregate {
    unaudited: AtomicU64,
    last_audit_ms: AtomicU64,
    flushing: AtomicBool,
}

impl Aggregate {
    /// Counts one refusal; true when no flusher is running and the caller must start one.
    fn add(&self) -> bool {
        self.unaudited.fetch_add(1, Ordering::AcqRel);
        !self.flushing.swap(true, Ordering::AcqRel)
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

    /// At shutdown: claims every counted refusal whatever the pacing.
    fn take_all(&self, now_ms: u64) -> Option<u64> {
        self.last_audit_ms.store(now_ms, Ordering::Release);
        match self.unaudited.swap(0, Ordering::AcqRel) {
            0 => None,
            n => Some(n),
        }
    }

    /// For the flusher, after a record: true if it must go on (refusals were counted after its
    /// last claim and no other flusher took over), false if it ends.
    fn flusher_done(&self) -> bool {
        self.flushing.store(false, Ordering::Release);
        self.pending() > 0 && !self.flushing.swap(true, Ordering::AcqRel)
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
        let errors = [Overload::QueueFull, Overload::WaitElapsed, Overload::Closed]
            .map(|reason| overload_error(reason, limits));
        let body = |v: &Value| Bytes::from(serde_json::to_vec(v).unwrap_or_default());
        let rest = errors
            .each_ref()
            .map(|e| body(&serde_json::to_value(e.body()).unwrap_or_default()));
        let rpc = errors
            .each_ref()
            .map(|e| body(&super::rpc::overload_error(e)));
        Self {
            limits,
            permits: Arc::new(Semaphore::new(limits.max_in_flight)),
            waiting: Arc::new(AtomicUsize::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
            audit: Arc::new(Aggregate::default()),
            answers: Arc::new(Answers {
                errors,
                rest,
                rpc,
                counters: Default::default(),
            }),
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
    /// else (or when the wait runs out) a refusal, counted for the aggregated audit record.
    pub async fn admit(&self) -> Result<Admitted, Refused> {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Ok(Admitted { _permit: permit });
        }
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        if before >= self.limits.queue {
            return Err(self.refuse(Overload::QueueFull));
        }
        match tokio::time::timeout(
            self.limits.max_wait,
            Arc::clone(&self.permits).acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => Ok(Admitted { _permit: permit }),
            // The semaphore is never closed.
            Ok(Err(_closed)) => Err(self.refuse(Overload::Closed)),
            Err(_elapsed) => Err(self.refuse(Overload::WaitElapsed)),
        }
    }

    fn refuse(&self, reason: Overload) -> Refused {
        self.refused.fetch_add(1, Ordering::Relaxed);
        Refused {
            reason,
            start_flusher: self.audit.add(),
        }
    }

    /// The refusal answered for `reason` (503 `overloaded`, `Retry-After`, the limits).
    pub fn error(&self, reason: Overload) -> &ApiError {
        &self.answers.errors[reason as usize]
    }

    /// For the flusher: milliseconds until the next aggregated record may be written.
    pub fn wait_ms(&self, now_ms: u64) -> u64 {
        self.audit.wait_ms(now_ms)
    }

    /// When at least a second has passed since the last overload audit record and refusals are
    /// unaudited, claims them: returns the count to write in one record.
    pub fn take_audit(&self, now_ms: u64) -> Option<u64> {
        self.audit.take(now_ms)
    }

    /// For the flusher, after a record: true if it must go on (refusals were counted after its
    /// last claim and no other flusher took over), false if it ends.
    pub fn flusher_done(&self) -> bool {
        self.audit.flusher_done()
    }

    /// At shutdown: claims every refusal not yet audited, whatever the pacing.
    pub fn take_all_audit(&self, now_ms: u64) -> Option<u64> {
        self.audit.take_all(now_ms)
    }

    /// The requests counter of a signing route (`route` indexes [`ROUTES`]), looked up in the
    /// metrics family once.
    fn counter(&self, route: usize, make: impl FnOnce() -> Counter) -> &Counter {
        self.answers.counters[route].get_or_init(make)
    }
}

/// The refusal for `reason` under `limits`.
fn overload_error(reason: Overload, limits: AdmissionLimits) -> ApiError {
    let message = match reason {
        Overload::QueueFull => format!(
            "the signer is saturated: {} signing requests in flight and {} waiting (limits {} and {})",
            limits.max_in_flight, limits.queue, limits.max_in_flight, limits.queue
        ),
        Overload::WaitElapsed => format!(
            "the signer is saturated: no place among {} in flight within {} ms",
            limits.max_in_flight,
            limits.max_wait.as_millis()
        ),
        Overload::Closed => "the signer is shutting down".to_owned(),
    };
    ApiError::unavailable("overloaded", message, RETRY_AFTER_SECONDS).with_details(json!({
        "maxInFlight": limits.max_in_flight,
        "queue": limits.queue,
        "maxWaitMs": u64::try_from(limits.max_wait.as_millis()).unwrap_or(u64::MAX),
    }))
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
            not_individual: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Decides how a refused connection is audited.
    pub fn admit(&self) -> ConnectionAudit {
        match Arc::clone(&self.tasks).try_acquire_owned() {
            Ok(permit) => ConnectionAudit::Individual(permit),
            Err(_) => {
                self.not_individual.fetch_add(1, Ordering::Relaxed);
                ConnectionAudit::Aggregated {
                    start_flusher: self.aggregate.add(),
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
        self.aggregate.flusher_done()
    }

    /// At shutdown: claims every refusal not yet audited, whatever the pacing.
    pub fn take_all_audit(&self, now_ms: u64) -> Option<u64> {
        self.aggregate.take_all(now_ms)
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
///
/// A refusal costs: two atomic counts (the gate's and the aggregated audit's, see
/// [`Admission::admit`]), the route's requests counter, and an answer made of prebuilt bytes
/// (on `/rpc`, a JSON-RPC error with the request's id when its small body carries one). Nothing
/// is logged per refusal and nothing is written to the store: the first refusal after a quiet
/// spell starts the one flusher task (`flush_overload_audits`), which writes the aggregated
/// record(s), at most one a second, the last one at most a second after the last refusal.
///
/// The body of a refused `/v1` request is not read: hyper discards it when it came with the head
/// (the usual case for a small body), so the connection stays open for the client's next request
/// instead of costing a new TLS handshake; else it closes the connection after the answer. On
/// `/rpc`, a small body is read for its id (see `read_small`).
pub async fn gate<B: KeyBackend, S: Store>(
    State(s): State<Arc<Signer<B, S>>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    if !is_signing_path(path) {
        return next.run(req).await;
    }
    let refused = match s.admission().admit().await {
        Ok(admitted) => {
            let response = next.run(req).await;
            drop(admitted);
            return response;
        }
        Err(refused) => refused,
    };
    let admission = s.admission();
    let route = route_index(path);
    admission
        .counter(route, || {
            s.metrics()
                .requests
                .get_or_create(&super::metrics::RequestLabels {
                    route: ROUTES[route],
                    code: "overloaded",
                })
                .clone()
        })
        .inc();
    if refused.start_flusher {
        let s = Arc::clone(&s);
        tokio::spawn(async move { flush_overload_audits(&s).await });
    }
    let rid = req.headers().get("x-request-id").cloned();
    let answers = &admission.answers;
    let body = if ROUTES[route] == "rpc" {
        // {"jsonrpc":"2.0","id":<id>,"error":<prebuilt>}, or an array of them for a batch.
        let error = &answers.rpc[refused.reason as usize];
        let answer = |out: &mut Vec<u8>, id: &Value| {
            out.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
            match serde_json::to_vec(id) {
                Ok(id) => out.extend_from_slice(&id),
                Err(_) => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(br#","error":"#);
            out.extend_from_slice(error);
            out.push(b'}');
        };
        let mut out = Vec::with_capacity(64 + error.len());
        match read_small(req).await.map(|b| super::rpc::peek_ids(&b)) {
            Some(super::rpc::PeekedIds::Batch(ids)) => {
                out.push(b'[');
                for (n, id) in ids.iter().enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    answer(&mut out, id);
                }
                out.push(b']');
            }
            Some(super::rpc::PeekedIds::Single(id)) => answer(&mut out, &id),
            None => answer(&mut out, &Value::Null),
        }
        Bytes::from(out)
    } else {
        // The body is not read: hyper discards it if it was received with the head (the
        // connection stays open), else closes the connection after the answer.
        drop(req);
        answers.rest[refused.reason as usize].clone()
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    if let Some(rid) = rid {
        headers.insert(HeaderName::from_static("x-request-id"), rid);
    }
    response
}

/// The body of a refused `/rpc` request (for its id), when it declares at most [`RPC_READ_MAX`]
/// bytes, is not behind `Expect: 100-continue` and arrives within [`RPC_READ_WAIT`]; only its
/// first [`super::rpc::ID_PEEK_MAX`] bytes are kept. Otherwise `None` (the answer's id is null),
/// and the body is left to hyper: discarded if already received, else the connection is closed
/// after the answer.
async fn read_small(req: Request) -> Option<Bytes> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())?;
    // A client that waits for `100 Continue` before sending its body is answered without it.
    if declared == 0 || declared > RPC_READ_MAX || req.headers().contains_key(header::EXPECT) {
        return None;
    }
    let mut body = req.into_body();
    let read = async {
        use http_body_util::BodyExt;
        let mut kept = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.ok()?.into_data() else {
                continue;
            };
            if kept.len() + data.len() <= super::rpc::ID_PEEK_MAX {
                kept.extend_from_slice(&data);
            }
        }
        Some(Bytes::from(kept))
    };
    tokio::time::timeout(RPC_READ_WAIT, read).await.ok()?
}

/// The one flusher of the aggregated overload audit: writes a record of the refusals counted
/// since the previous one, at most one a second, until no counted refusal is left — so the count
/// of a burst's end is written at most a second after its last refusal, without waiting for the
/// next overload.
async fn flush_overload_audits<B: KeyBackend, S: Store>(s: &Signer<B, S>) {
    let admission = s.admission();
    loop {
        let wait = admission.wait_ms(UnixMillis::now().0);
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        let now = UnixMillis::now();
        if let Some(count) = admission.take_audit(now.0) {
            let entry = overload_entry(count, admission.limits(), now);
            if let Err(e) = s.store().append_audit(entry).await {
                tracing::error!(error = %e, count, "cannot audit overload refusals");
            }
        }
        if !admission.flusher_done() {
            return;
        }
    }
}

/// The aggregated audit record of `count` overload refusals.
pub(crate) fn overload_entry(count: u64, limits: AdmissionLimits, now: UnixMillis) -> AuditEntry {
    let e = audit_error(count, limits);
    AuditEntry {
        at: now,
        kind: AuditKind::Refusal,
        request_id: Some(format!("overload-{}", now.0)),
        identity: None,
        payload: json!({
            "code": e.code,
            "reason": e.message,
            "status": e.status.as_u16(),
            "count": count,
        }),
    }
}

/// The metrics route labels of the signing paths (see `route_index`).
pub const ROUTES: [&str; 7] = [
    "transaction",
    "message",
    "typed_data",
    "bundle",
    "rpc",
    "approval",
    "relay_auth",
];

/// The index in [`ROUTES`] of a signing path's route label.
fn route_index(path: &str) -> usize {
    match path.rsplit('/').next() {
        Some("transaction") => 0,
        Some("message") => 1,
        Some("typed-data") => 2,
        Some("bundle") => 3,
        Some("rpc") => 4,
        Some("approvals") => 5,
        _ => 6,
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
        let refused = g.admit().await.unwrap_err();
        assert_eq!(refused.reason, Overload::QueueFull);
        let e = g.error(refused.reason);
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.code, "overloaded");
        assert!(
            e.headers
                .iter()
                .any(|(n, v)| n == "retry-after" && v == "1")
        );
        assert!(e.message.contains("limits 2 and 1"), "{}", e.message);
        // The answers are made once, from the same refusal.
        let rest: Value = serde_json::from_slice(&g.answers.rest[0]).unwrap();
        assert_eq!(rest["error"]["code"], "overloaded");
        assert_eq!(rest["error"]["message"], e.message.as_str());
        assert_eq!(rest["error"]["details"]["maxInFlight"], 2);
        let rpc: Value = serde_json::from_slice(&g.answers.rpc[0]).unwrap();
        assert_eq!(rpc["code"], super::super::rpc::LIMIT_EXCEEDED);
        assert_eq!(rpc["data"]["code"], "overloaded");
        assert_eq!(rpc["data"]["details"]["queue"], 1);
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
        let refused = g.admit().await.unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!(refused.reason, Overload::WaitElapsed);
        let e = g.error(refused.reason);
        assert!(e.message.contains("within 20 ms"), "{}", e.message);
        assert_eq!(g.waiting.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn overload_audit_is_aggregated_per_second_by_one_flusher() {
        let g = gate(1, 0, 1);
        let _held = g.admit().await.unwrap();
        assert_eq!(g.take_audit(10_000), None);
        // The first refusal starts the flusher; the next ones are only counted.
        assert!(g.admit().await.unwrap_err().start_flusher);
        assert!(!g.admit().await.unwrap_err().start_flusher);
        assert_eq!(g.wait_ms(10_000), 0);
        assert_eq!(g.take_audit(10_000), Some(2));
        assert!(!g.admit().await.unwrap_err().start_flusher);
        // Counted after its claim: the flusher goes on, waiting out the second.
        assert!(g.flusher_done());
        assert_eq!(g.wait_ms(10_500), 500);
        assert_eq!(g.take_audit(10_500), None, "less than a second later");
        assert_eq!(g.take_audit(11_000), Some(1));
        // Nothing counted since: it ends, and the next refusal starts a new one.
        assert!(!g.flusher_done());
        assert!(g.admit().await.unwrap_err().start_flusher);
        assert_eq!(g.refused(), 4);
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
        let label = |p| ROUTES[route_index(p)];
        assert_eq!(label("/rpc"), "rpc");
        assert_eq!(label("/v1/requests/r-1/approvals"), "approval");
        assert_eq!(label("/v1/relay-auth"), "relay_auth");
        assert_eq!(label("/v1/keys/hot/sign/typed-data"), "typed_data");
        assert_eq!(label("/v1/keys/hot/sign/transaction"), "transaction");
    }
}
