//! The limit mirror after a restart, and the answer to a window the store found full.
//!
//! The policy's pre-check reads an in-memory mirror of the store's limit windows
//! ([`castellan_policy::MemoryLimits`] in [`super::Signer`]). A process starts with an empty
//! mirror, so before it serves, [`super::Signer::warm_limits`] fills it from the store: for every
//! window the policy names for a configured caller and a key, the store's total is read at
//! [`STEPS`] points from now to one window length ahead; what stops counting between two points
//! is put into the mirror so that it stops counting at the later point. The mirror therefore
//! never counts less than the store (it may count a step's worth longer: at most
//! `duration / STEPS`), and a window spent before the restart is refused by the policy itself,
//! with the policy's code, reason and `X-RateLimit-*` headers.
//!
//! When the store still refuses (another writer on the same store filled a window after the
//! mirror was read), [`limit_refusal`] answers as the policy would have: a full request-rate
//! window is `429 rate_limited` with `X-RateLimit-*` and `Retry-After`, any other window is
//! `422 velocity_exceeded`. The store's audit record carries the same code
//! ([`crate::store::Refusal::code`]).

use std::collections::{BTreeMap, BTreeSet};

use alloy::primitives::U256;
use axum::http::{HeaderName, header};
use castellan_policy as policy;
use serde_json::json;

use super::{ApiError, Signer};
use crate::audit::UnixMillis;
use crate::backend::KeyBackend;
use crate::store::{Store, WindowKey, WindowQuery};

/// Points at which each window's total is read when the mirror is warmed.
pub const STEPS: u64 = 32;

impl<B: KeyBackend, S: Store> Signer<B, S> {
    /// Fills the limit mirror from the store's windows (see the module docs). Call before
    /// serving. Returns how many windows held something.
    pub async fn warm_limits(&self) -> Result<usize, String> {
        let now = UnixMillis::now();
        let policy = self.policy();
        let mut keys: BTreeSet<String> = match self.keys.read() {
            Ok(k) => k.keys().cloned().collect(),
            Err(p) => p.into_inner().keys().cloned().collect(),
        };
        for grants in self.identities.values() {
            keys.extend(grants.keys.iter().flatten().cloned());
        }
        let mut windows = BTreeSet::new();
        for identity in self.identities.keys() {
            let client = policy::ClientId::new(identity.as_str());
            for key in &keys {
                windows.extend(
                    policy
                        .windows_for(&policy::KeyName::new(key), &client)
                        .into_iter()
                        .filter(|w| w.duration != policy::LIFETIME && w.duration > 0),
                );
            }
        }
        // One series of reads per window length.
        let mut by_duration: BTreeMap<u64, Vec<(policy::WindowId, WindowKey)>> = BTreeMap::new();
        for id in windows {
            let key = WindowKey::new(id.to_string()).map_err(|e| format!("window key: {e}"))?;
            by_duration.entry(id.duration).or_default().push((id, key));
        }
        let mut warmed = 0;
        for (duration_s, group) in by_duration {
            let duration_ms = duration_s.saturating_mul(1000);
            let step = duration_ms.div_ceil(STEPS).max(1);
            let query: Vec<WindowQuery> = group
                .iter()
                .map(|(_, key)| WindowQuery {
                    window: key.clone(),
                    duration_ms,
                })
                .collect();
            // sums[k][i]: window i's total at now + k·step (the last point: now + duration).
            let mut points = Vec::new();
            let mut t = now.0;
            loop {
                points.push(t);
                if t >= now.0.saturating_add(duration_ms) {
                    break;
                }
                t = t
                    .saturating_add(step)
                    .min(now.0.saturating_add(duration_ms));
            }
            let mut sums = Vec::with_capacity(points.len());
            for &at in &points {
                let got = self
                    .store
                    .window_sums(query.clone(), UnixMillis(at))
                    .await
                    .map_err(|e| format!("store: {e}"))?;
                sums.push(got.into_iter().map(|(_, s)| s).collect::<Vec<U256>>());
            }
            let mut limits = match self.limits.lock() {
                Ok(l) => l,
                Err(p) => p.into_inner(),
            };
            for (i, (id, _)) in group.iter().enumerate() {
                let total = |k: usize| sums.get(k).and_then(|s| s.get(i)).copied();
                if total(0).is_none_or(|s| s.is_zero()) {
                    continue;
                }
                warmed += 1;
                // In time order: what stops counting in the store between points k and k+1 is
                // placed so that it stops counting in the mirror at point k+1.
                for k in 0..points.len().saturating_sub(1) {
                    let (Some(a), Some(b)) = (total(k), total(k + 1)) else {
                        continue;
                    };
                    let leaving = a.saturating_sub(b);
                    if leaving.is_zero() {
                        continue;
                    }
                    let until = points.get(k + 1).copied().unwrap_or(now.0);
                    let at_s = until.saturating_sub(duration_ms).div_ceil(1000);
                    limits.reserve(id, at_s, leaving);
                }
                // Still counting a whole window from now (a reservation dated ahead of this
                // clock): kept for a whole window from the last point.
                if let Some(rest) = total(points.len() - 1).filter(|r| !r.is_zero()) {
                    let last = points.last().copied().unwrap_or(now.0);
                    limits.reserve(id, last.div_ceil(1000), rest);
                }
            }
        }
        Ok(warmed)
    }
}

/// True if the store window `key` counts requests (`…:requests:<seconds>`, the policy's naming).
pub fn is_rate_window(key: &WindowKey) -> bool {
    key.as_str().rsplit(':').nth(1) == Some("requests")
}

/// The answer to a store refusal of a full window, the same as the policy's own refusal for that
/// kind of window: `429 rate_limited` with `X-RateLimit-*` and `Retry-After` for a request-rate
/// window, `422 velocity_exceeded` otherwise. `message` names the window, spent and limit.
pub fn limit_refusal(window: &WindowKey, spent: U256, limit: U256, message: String) -> ApiError {
    let details = json!({
        "window": window.as_str(),
        "spent": spent.to_string(),
        "limit": limit.to_string(),
    });
    if !is_rate_window(window) {
        return ApiError::denied("velocity_exceeded", message).with_details(details);
    }
    // The store does not say when its oldest counted request leaves the window: the reset given
    // is a whole window from now (late, never early).
    let seconds: u64 = window
        .as_str()
        .rsplit(':')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    let reset = (UnixMillis::now().0 / 1000).saturating_add(seconds);
    ApiError::new(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        message,
    )
    .with_header(
        HeaderName::from_static("x-ratelimit-limit"),
        limit.to_string(),
    )
    .with_header(HeaderName::from_static("x-ratelimit-remaining"), "0".into())
    .with_header(
        HeaderName::from_static("x-ratelimit-reset"),
        reset.to_string(),
    )
    .with_header(header::RETRY_AFTER, seconds.to_string())
    .with_details(details)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn rate_windows_are_named_by_the_policy() {
        let w = |s: &str| WindowKey::new(s).unwrap_or_else(|e| panic!("{e}"));
        assert!(is_rate_window(&w(
            "client:spiffe://castellan/x:requests:60"
        )));
        assert!(!is_rate_window(&w("key:hot:value:3600")));
        assert!(!is_rate_window(&w("grant:0xab")));
        let e = limit_refusal(
            &w("client:spiffe://castellan/x:requests:60"),
            U256::from(3),
            U256::from(3),
            "full".into(),
        );
        assert_eq!((e.status.as_u16(), e.code), (429, "rate_limited"));
        let names: Vec<&str> = e.headers.iter().map(|(n, _)| n.as_str()).collect();
        for h in [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "retry-after",
        ] {
            assert!(names.contains(&h), "{h} missing: {names:?}");
        }
        let e = limit_refusal(
            &w("key:hot:value:3600"),
            U256::from(3),
            U256::from(3),
            "x".into(),
        );
        assert_eq!((e.status.as_u16(), e.code), (422, "velocity_exceeded"));
    }
}
