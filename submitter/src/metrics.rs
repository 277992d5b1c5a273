//! Prometheus metrics (prometheus-client), per relay and per bundle state.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a relay request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Relay name.
    pub relay: String,
    /// JSON-RPC method.
    pub method: String,
    /// `accepted`, `rejected`, `throttled`, `failed`, `skipped_*`.
    pub result: String,
}

/// Labels of a latency sample.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    /// Relay name.
    pub relay: String,
    /// JSON-RPC method.
    pub method: String,
}

/// A relay.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayLabels {
    /// Relay name.
    pub relay: String,
}

/// A bundle transition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `accepted`, `included`, `reverted`, `expired`, `cancelled`, `failed`.
    pub state: String,
}

/// Why an API caller was turned away.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `tls` (handshake failed: no, unknown, revoked or expired certificate) or
    /// `unknown_identity` (a valid certificate whose identity is not configured).
    pub reason: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The submitter's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Requests per relay, method and result.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency per relay and method, seconds.
    pub latency: HistogramFamily<LatencyLabels>,
    /// Breaker state per relay: 0 closed, 1 open, 2 half-open.
    pub breaker: Family<RelayLabels, Gauge>,
    /// Consecutive failures per relay.
    pub consecutive_failures: Family<RelayLabels, Gauge>,
    /// Bundle transitions.
    pub bundles: Family<StateLabels, Counter>,
    /// Last head seen.
    pub head: Gauge,
    /// Bundles live now.
    pub live_bundles: Gauge,
    /// Bundles held in memory (live, plus those finished within the grace period).
    pub bundles_in_memory: Gauge,
    /// API callers turned away, by reason.
    pub refusals: Family<RefusalLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 50 µs … ~3.3 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 17))
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("castellan_submitter");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily<LatencyLabels> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let breaker = Family::<RelayLabels, Gauge>::default();
        let consecutive_failures = Family::<RelayLabels, Gauge>::default();
        let bundles = Family::<StateLabels, Counter>::default();
        let head = Gauge::default();
        let live_bundles = Gauge::default();
        let bundles_in_memory = Gauge::default();
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "api_refusals",
            "API callers turned away: tls (handshake) or unknown_identity",
            refusals.clone(),
        );
        registry.register(
            "relay_requests",
            "Relay requests by result",
            requests.clone(),
        );
        registry.register(
            "relay_request_duration_seconds",
            "Relay request latency",
            latency.clone(),
        );
        registry.register(
            "relay_breaker_state",
            "Breaker state: 0 closed, 1 open, 2 half-open",
            breaker.clone(),
        );
        registry.register(
            "relay_consecutive_failures",
            "Consecutive failed requests",
            consecutive_failures.clone(),
        );
        registry.register("bundles", "Bundle state transitions", bundles.clone());
        registry.register("head_block", "Last block number seen", head.clone());
        registry.register(
            "live_bundles",
            "Bundles pending or awaiting confirmation",
            live_bundles.clone(),
        );
        registry.register(
            "bundles_in_memory",
            "Bundles held in memory: live ones and those finished in the last few blocks",
            bundles_in_memory.clone(),
        );
        Self {
            registry: Arc::new(registry),
            requests,
            latency,
            breaker,
            consecutive_failures,
            bundles,
            head,
            live_bundles,
            bundles_in_memory,
            refusals,
        }
    }

    /// Counts an API caller turned away (`tls` or `unknown_identity`).
    pub fn refusal(&self, reason: &str) {
        self.refusals
            .get_or_create(&RefusalLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts a relay request.
    pub fn request(&self, relay: &str, method: &str, result: &str) {
        self.requests
            .get_or_create(&RequestLabels {
                relay: relay.to_owned(),
                method: method.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts a bundle transition.
    pub fn bundle(&self, state: &str) {
        self.bundles
            .get_or_create(&StateLabels {
                state: state.to_owned(),
            })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
