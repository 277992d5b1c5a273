//! Prometheus metrics of the signer (prometheus-client), served as text on a separate plain
//! listener (`[metrics] listen`): requests by route and answer code, whole-request latency,
//! readiness and the global freeze.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of an answered request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `transaction`, `message`, `typed_data`, `bundle`, `relay_auth`, `rpc`.
    pub route: String,
    /// `signed`, `pending`, or the stable error code (`value_cap_exceeded`, `frozen`, …).
    pub code: String,
}

/// Labels of a latency sample.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// As in [`RequestLabels::route`].
    pub route: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs … ≈ 3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// The signer's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Answered signing requests by route and code.
    pub requests: Family<RequestLabels, Counter>,
    /// Whole-request latency by route (authentication to answer).
    pub latency: HistogramFamily<RouteLabels>,
    /// 1 when the backends passed their self-check and are healthy.
    pub ready: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// 1 while signing is frozen (as last seen by this process).
    pub frozen: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Connections refused before any request (TLS failures).
    pub tls_refusals: Counter<u64, AtomicU64>,
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
        Self {
            registry: Arc::new(registry),
            requests,
            latency,
            ready,
            frozen,
            tls_refusals,
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                route: "transaction".into(),
                code: "value_cap_exceeded".into(),
            })
            .inc();
        m.latency
            .get_or_create(&RouteLabels {
                route: "transaction".into(),
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
