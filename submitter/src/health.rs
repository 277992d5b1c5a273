//! Per-relay health: error-rate and latency averages, a breaker, a token bucket and the 429
//! back-off. One `Health` per relay behind a short-lived `std::sync::Mutex` (never held across
//! an `.await`).

use std::time::{Duration, Instant};

use castellan_api::submitter::{BreakerState, RelayHealth};

use crate::config::HealthConfig;

/// Why a request was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The breaker is open (or its one half-open probe is in flight).
    BreakerOpen,
    /// The relay answered 429 and its back-off has not passed.
    BackingOff,
    /// Our own token bucket for the relay is empty.
    RateLimited,
}

impl Skip {
    /// Stable label (status, metrics).
    pub fn label(self) -> &'static str {
        match self {
            Skip::BreakerOpen => "skipped_breaker_open",
            Skip::BackingOff => "skipped_backing_off",
            Skip::RateLimited => "skipped_rate_limited",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Breaker {
    Closed,
    Open { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

/// Health state of one relay.
#[derive(Debug)]
pub struct Health {
    config: HealthConfig,
    breaker: Breaker,
    consecutive_failures: u32,
    error_rate: f64,
    latency_ewma_us: f64,
    requests: u64,
    failures: u64,
    backoff_until: Option<Instant>,
    tokens: f64,
    rate: f64,
    burst: f64,
    refilled: Instant,
}

impl Health {
    /// A healthy relay with a full bucket.
    pub fn new(config: HealthConfig, rate_per_second: f64, burst: u32, now: Instant) -> Self {
        Self {
            config,
            breaker: Breaker::Closed,
            consecutive_failures: 0,
            error_rate: 0.0,
            latency_ewma_us: 0.0,
            requests: 0,
            failures: 0,
            backoff_until: None,
            tokens: f64::from(burst),
            rate: rate_per_second,
            burst: f64::from(burst),
            refilled: now,
        }
    }

    /// Decides whether one request may go now; takes a token and, when half-open, the probe.
    pub fn admit(&mut self, now: Instant) -> Result<(), Skip> {
        if self.backoff_until.is_some_and(|t| now < t) {
            return Err(Skip::BackingOff);
        }
        match self.breaker {
            Breaker::Closed => {}
            Breaker::Open { until } if now < until => return Err(Skip::BreakerOpen),
            Breaker::Open { .. }
            | Breaker::HalfOpen {
                probe_in_flight: false,
            } => {}
            Breaker::HalfOpen {
                probe_in_flight: true,
            } => return Err(Skip::BreakerOpen),
        }
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
        if self.tokens < 1.0 {
            return Err(Skip::RateLimited);
        }
        self.tokens -= 1.0;
        if !matches!(self.breaker, Breaker::Closed) {
            self.breaker = Breaker::HalfOpen {
                probe_in_flight: true,
            };
        }
        self.requests += 1;
        Ok(())
    }

    /// Records an answered request (any parseable answer, including JSON-RPC errors).
    pub fn record_success(&mut self, latency: Duration) {
        self.consecutive_failures = 0;
        self.breaker = Breaker::Closed;
        self.error_rate *= 1.0 - self.config.ewma_alpha;
        self.update_latency(latency);
    }

    /// Records a failed request (timeout, transport error, 5xx, 429, garbage). Opens the
    /// breaker after `failure_threshold` consecutive failures, or at once after a failed probe.
    pub fn record_failure(&mut self, latency: Option<Duration>, now: Instant) {
        self.failures += 1;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.error_rate = self.error_rate * (1.0 - self.config.ewma_alpha) + self.config.ewma_alpha;
        if let Some(l) = latency {
            self.update_latency(l);
        }
        let probe_failed = matches!(
            self.breaker,
            Breaker::HalfOpen { .. } | Breaker::Open { .. }
        );
        if probe_failed || self.consecutive_failures >= self.config.failure_threshold {
            self.breaker = Breaker::Open {
                until: now + self.config.cooldown(),
            };
        }
    }

    /// Sets a back-off after a 429 (Retry-After, capped by the caller).
    pub fn back_off(&mut self, until: Instant) {
        self.backoff_until = Some(self.backoff_until.map_or(until, |t| t.max(until)));
    }

    /// Records an HTTP 429: a failure, and the breaker opens until `until` (the relay's
    /// `Retry-After`) or for the cooldown after enough consecutive failures, whichever is
    /// later; then one probe goes, as after any open period.
    pub fn record_throttled(&mut self, latency: Duration, until: Instant, now: Instant) {
        self.record_failure(Some(latency), now);
        self.back_off(until);
        let open_until = match self.breaker {
            Breaker::Open { until: u } => u.max(until),
            _ => until,
        };
        self.breaker = Breaker::Open { until: open_until };
    }

    /// Breaker state as seen at `now`.
    pub fn breaker_state(&self, now: Instant) -> BreakerState {
        match self.breaker {
            Breaker::Closed => BreakerState::Closed,
            Breaker::Open { until } if now < until => BreakerState::Open,
            Breaker::Open { .. } | Breaker::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether the relay would be ranked for a weighted selection.
    pub fn is_available(&self, now: Instant) -> bool {
        self.breaker_state(now) != BreakerState::Open && self.backoff_until.is_none_or(|t| now >= t)
    }

    /// Ranking key (lower is better): error rate, then latency.
    pub fn score(&self) -> (f64, f64) {
        (self.error_rate, self.latency_ewma_us)
    }

    /// The API view.
    pub fn view(&self, relay: &str, now: Instant) -> RelayHealth {
        RelayHealth {
            relay: relay.to_owned(),
            breaker: self.breaker_state(now),
            consecutive_failures: self.consecutive_failures,
            error_rate: self.error_rate,
            latency_ewma_us: self.latency_ewma_us,
            requests: self.requests,
            failures: self.failures,
        }
    }

    fn update_latency(&mut self, latency: Duration) {
        let us = latency.as_secs_f64() * 1e6;
        self.latency_ewma_us = if self.latency_ewma_us == 0.0 {
            us
        } else {
            self.latency_ewma_us * (1.0 - self.config.ewma_alpha) + us * self.config.ewma_alpha
        };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn health(now: Instant) -> Health {
        Health::new(
            HealthConfig {
                failure_threshold: 3,
                cooldown_ms: 1000,
                ewma_alpha: 0.5,
            },
            1000.0,
            10,
            now,
        )
    }

    #[test]
    fn breaker_opens_after_threshold_and_probes_after_cooldown() {
        let t0 = Instant::now();
        let mut h = health(t0);
        for _ in 0..2 {
            h.admit(t0).unwrap();
            h.record_failure(None, t0);
        }
        assert_eq!(h.breaker_state(t0), BreakerState::Closed);
        h.admit(t0).unwrap();
        h.record_failure(None, t0);
        assert_eq!(h.breaker_state(t0), BreakerState::Open);
        assert_eq!(
            h.admit(t0 + Duration::from_millis(999)),
            Err(Skip::BreakerOpen)
        );
        // After the cooldown exactly one probe goes.
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(h.breaker_state(t1), BreakerState::HalfOpen);
        h.admit(t1).unwrap();
        assert_eq!(h.admit(t1), Err(Skip::BreakerOpen));
        // A failed probe reopens for another cooldown.
        h.record_failure(None, t1);
        assert_eq!(
            h.admit(t1 + Duration::from_millis(500)),
            Err(Skip::BreakerOpen)
        );
        let t2 = t1 + Duration::from_millis(1000);
        h.admit(t2).unwrap();
        h.record_success(Duration::from_millis(1));
        assert_eq!(h.breaker_state(t2), BreakerState::Closed);
        h.admit(t2).unwrap();
    }

    #[test]
    fn bucket_and_backoff() {
        let t0 = Instant::now();
        let mut h = Health::new(HealthConfig::default(), 1.0, 2, t0);
        h.admit(t0).unwrap();
        h.admit(t0).unwrap();
        assert_eq!(h.admit(t0), Err(Skip::RateLimited));
        h.admit(t0 + Duration::from_secs(1)).unwrap();
        h.back_off(t0 + Duration::from_secs(10));
        assert_eq!(h.admit(t0 + Duration::from_secs(5)), Err(Skip::BackingOff));
        h.admit(t0 + Duration::from_secs(11)).unwrap();
        // A 429 opens the breaker until Retry-After, then one probe goes.
        let t1 = t0 + Duration::from_secs(20);
        h.record_throttled(Duration::from_millis(1), t1 + Duration::from_secs(30), t1);
        assert_eq!(h.breaker_state(t1), BreakerState::Open);
        assert_eq!(h.admit(t1 + Duration::from_secs(29)), Err(Skip::BackingOff));
        assert_eq!(
            h.breaker_state(t1 + Duration::from_secs(30)),
            BreakerState::HalfOpen
        );
        h.admit(t1 + Duration::from_secs(30)).unwrap();
    }
}
