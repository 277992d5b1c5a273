//! Prometheus metrics of the signer (prometheus-client), served as text on a separate plain
//! listener (`[metrics] listen`): requests by route and answer code, whole-request latency,
//! readiness and the global freeze, the approval backlog and overdue rotations.
//!
//! The state gauges (ready, frozen, backlog, rotation) are read from the backend and the store
//! at each scrape ([`Metrics::refresh`]), so they are right whichever process or route changed
//! the state (another replica's freeze, `keyctl` working on the store directly).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::audit::UnixMillis;
use crate::store::Store;

/// Labels of an answered request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `transaction`, `message`, `typed_data`, `bundle`, `relay_auth`, `rpc`, `approval` (the
    /// last only for admission refusals). Static strings: a lookup allocates nothing.
    pub route: &'static str,
    /// `signed`, `pending`, or the stable error code (`value_cap_exceeded`, `frozen`, …).
    pub code: &'static str,
}

/// Labels of a latency sample.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// As in [`RequestLabels::route`].
    pub route: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs … ≈ 3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Labels of a signing-pipeline stage sample.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// `decision` (the decision transaction, committed and fsynced, queue included), `sign` (the
    /// backend signature, queue and verification included), `outcome` (the outcome record
    /// written).
    pub stage: &'static str,
}

fn stage_histogram() -> Histogram {
    // 50 µs … ≈ 0.8 s in steps of √2: fine enough to tell a queue from an fsync.
    Histogram::new(exponential_buckets(0.00005, std::f64::consts::SQRT_2, 28))
}

/// The signer's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Answered signing requests by route and code.
    pub requests: Family<RequestLabels, Counter>,
    /// Whole-request latency by route (authentication to answer).
    pub latency: HistogramFamily<RouteLabels>,
    /// Time spent in each stage of the signing pipeline.
    pub stages: HistogramFamily<StageLabels>,
    /// 1 when the backends passed their self-check and are healthy.
    pub ready: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// 1 while signing is frozen (as last seen by this process).
    pub frozen: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Connections refused before any request (TLS failures).
    pub tls_refusals: Counter<u64, AtomicU64>,
    /// Of those, refusals not audited individually (past the bound on concurrent audit writes;
    /// covered by aggregated records).
    pub tls_refusals_unaudited: Counter<u64, AtomicU64>,
    /// Requests waiting for approvals (pending, not expired).
    pub pending_approvals: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Age of the oldest request waiting for approvals, seconds (0 when none waits).
    pub oldest_pending_seconds: Gauge<f64, AtomicU64>,
    /// Active key versions whose rotation period has elapsed.
    pub rotation_due: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// How long past its rotation date the most overdue active version is, seconds (0 if none).
    pub rotation_overdue_seconds: Gauge<f64, AtomicU64>,
    /// State reads at scrape time that failed (the store did not answer).
    pub scrape_errors: Counter<u64, AtomicU64>,
    /// The store's write jobs, commits, WAL syncs and checkpoints (see [`crate::store::CommitStats`]).
    pub store_jobs: Counter<u64, AtomicU64>,
    /// See `store_jobs`.
    pub store_commits: Counter<u64, AtomicU64>,
    /// See `store_jobs`.
    pub store_syncs: Counter<u64, AtomicU64>,
    /// See `store_jobs`.
    pub store_checkpoints: Counter<u64, AtomicU64>,
    /// WAL frames not yet copied into the database file at the last checkpoint.
    pub store_wal_uncopied: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Signatures in progress as the store's writer counts them (decided, outcome not written).
    pub store_in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// The counters' values at the last refresh (the store keeps totals).
    store_seen: Arc<std::sync::Mutex<crate::store::CommitStats>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("castellan_signer");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Answered signing requests by route and code",
            requests.clone(),
        );
        let latency: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "request_seconds",
            "Whole-request latency by route",
            latency.clone(),
        );
        let stages: HistogramFamily<StageLabels> =
            Family::new_with_constructor(stage_histogram as fn() -> Histogram);
        registry.register(
            "stage_seconds",
            "Time spent in each stage of the signing pipeline (decision, sign, outcome)",
            stages.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when the key backends passed their self-check",
            ready.clone(),
        );
        let frozen = Gauge::default();
        registry.register("frozen", "1 while signing is frozen", frozen.clone());
        let tls_refusals = Counter::default();
        registry.register(
            "tls_refusals",
            "Connections refused at the TLS handshake",
            tls_refusals.clone(),
        );
        let tls_refusals_unaudited = Counter::default();
        registry.register(
            "tls_refusals_unaudited",
            "Connections refused at the TLS handshake that were not audited individually (counted in aggregated audit records)",
            tls_refusals_unaudited.clone(),
        );
        let pending_approvals = Gauge::default();
        registry.register(
            "pending_approvals",
            "Requests waiting for approvals (pending, not expired)",
            pending_approvals.clone(),
        );
        let oldest_pending_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "oldest_pending_seconds",
            "Age of the oldest request waiting for approvals (0 when none)",
            oldest_pending_seconds.clone(),
        );
        let rotation_due = Gauge::default();
        registry.register(
            "keys_rotation_due",
            "Active key versions whose rotation period has elapsed",
            rotation_due.clone(),
        );
        let rotation_overdue_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "rotation_overdue_seconds",
            "Seconds the most overdue active version is past its rotation date (0 if none)",
            rotation_overdue_seconds.clone(),
        );
        let scrape_errors = Counter::default();
        registry.register(
            "scrape_errors",
            "State reads at scrape time that failed (store unavailable)",
            scrape_errors.clone(),
        );
        let store_jobs = Counter::default();
        registry.register(
            "store_jobs",
            "Write jobs answered by the store's writer (decisions, outcomes, changes)",
            store_jobs.clone(),
        );
        let store_commits = Counter::default();
        registry.register(
            "store_commits",
            "Write transactions committed by the store's writer (group commit: jobs / commits is the batching factor)",
            store_commits.clone(),
        );
        let store_syncs = Counter::default();
        registry.register(
            "store_syncs",
            "fdatasyncs of the store's WAL (each makes every earlier commit durable)",
            store_syncs.clone(),
        );
        let store_checkpoints = Counter::default();
        registry.register(
            "store_checkpoints",
            "WAL checkpoints run by the store's checkpoint thread",
            store_checkpoints.clone(),
        );
        let store_wal_uncopied = Gauge::default();
        registry.register(
            "store_wal_uncopied_frames",
            "WAL frames not yet copied into the database file at the last checkpoint",
            store_wal_uncopied.clone(),
        );
        let store_in_flight = Gauge::default();
        registry.register(
            "store_in_flight",
            "Signatures in progress as the store's writer counts them (decided, outcome not yet written); adaptive group commit lingers above a threshold",
            store_in_flight.clone(),
        );
        Self {
            store_in_flight,
            store_jobs,
            store_commits,
            store_syncs,
            store_checkpoints,
            store_wal_uncopied,
            store_seen: Arc::default(),
            registry: Arc::new(registry),
            requests,
            latency,
            stages,
            ready,
            frozen,
            tls_refusals,
            tls_refusals_unaudited,
            pending_approvals,
            oldest_pending_seconds,
            rotation_due,
            rotation_overdue_seconds,
            scrape_errors,
        }
    }

    /// Records `started.elapsed()` as the time of `stage`.
    pub fn stage(&self, stage: &'static str, started: std::time::Instant) {
        self.stages
            .get_or_create(&StageLabels { stage })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Reads the state gauges from the backend's health (`ready`) and the store (freeze,
    /// approval backlog, rotations due) as of `now`. A store read that fails leaves its gauges
    /// as they were and counts a scrape error.
    pub async fn refresh<S: Store>(&self, ready: bool, store: &S, now: UnixMillis) {
        self.ready.set(i64::from(ready));
        self.refresh_store_counters(store.commit_stats());
        let mut failed = false;
        match store.freeze_state().await {
            Ok(f) => {
                self.frozen.set(i64::from(f.is_some()));
            }
            Err(_) => failed = true,
        }
        match store.pending_backlog(now).await {
            Ok((count, oldest)) => {
                self.pending_approvals
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
                self.oldest_pending_seconds
                    .set(oldest.map_or(0.0, |t| seconds_between(t, now)));
            }
            Err(_) => failed = true,
        }
        match store.keys_due_for_rotation(now).await {
            Ok(due) => {
                self.rotation_due
                    .set(i64::try_from(due.len()).unwrap_or(i64::MAX));
                let overdue = due
                    .iter()
                    .filter_map(|r| {
                        let since = r.activated_at.unwrap_or(r.created_at);
                        r.rotate_every_ms
                            .map(|every| seconds_between(since.plus_ms(every), now))
                    })
                    .fold(0.0, f64::max);
                self.rotation_overdue_seconds.set(overdue);
            }
            Err(_) => failed = true,
        }
        if failed {
            self.scrape_errors.inc();
        }
    }

    /// Adds what the store counted since the last refresh.
    fn refresh_store_counters(&self, now: crate::store::CommitStats) {
        let mut seen = self
            .store_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.store_jobs.inc_by(now.jobs.saturating_sub(seen.jobs));
        self.store_commits
            .inc_by(now.commits.saturating_sub(seen.commits));
        self.store_syncs
            .inc_by(now.syncs.saturating_sub(seen.syncs));
        self.store_checkpoints
            .inc_by(now.checkpoints.saturating_sub(seen.checkpoints));
        self.store_wal_uncopied
            .set(i64::try_from(now.wal_frames.saturating_sub(now.wal_copied)).unwrap_or(i64::MAX));
        self.store_in_flight
            .set(i64::try_from(now.in_flight).unwrap_or(i64::MAX));
        *seen = now;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn seconds_between(from: UnixMillis, to: UnixMillis) -> f64 {
    // Millisecond counts far below 2^53: exact in f64.
    to.0.saturating_sub(from.0) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                route: "transaction",
                code: "value_cap_exceeded",
            })
            .inc();
        m.latency
            .get_or_create(&RouteLabels {
                route: "transaction",
            })
            .observe(0.002);
        m.ready.set(1);
        let text = m.render();
        assert!(
            text.contains(
                "castellan_signer_requests_total{route=\"transaction\",code=\"value_cap_exceeded\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("castellan_signer_request_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("castellan_signer_ready 1"), "{text}");
    }
}
