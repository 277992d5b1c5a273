//! Limit windows: what has been reserved in each rolling window is an input to the policy.
//!
//! The signer keeps reservations in its store and reads them through [`LimitState`] inside the
//! same transaction that adds the new ones, so check-and-reserve is one atomic step.
//! [`MemoryLimits`] is the in-memory implementation used by tests, the benchmark, and a
//! single-process signer.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use alloy::primitives::{B256, U256};

use crate::decision::Decision;
use crate::types::{ClientId, KeyName};

/// Who a window counts for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WindowScope {
    /// Every request signed with the key, whichever client asked.
    Key(KeyName),
    /// Every request of the client, whichever key signed.
    Client(ClientId),
    /// Spending under a budget grant, identified by the grant's EIP-712 hash.
    Grant(B256),
}

/// What a window sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Transferred value (wei).
    Value,
    /// Worst-case cost: value + gas limit × max fee per gas (wei).
    Cost,
    /// Number of requests (a bundle is one request).
    Requests,
}

/// Duration of a window that never expires (a grant's budget over its whole validity).
pub const LIFETIME: u64 = u64::MAX;

/// One rolling window: a scope, a metric and a duration in seconds.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowId {
    /// Who the window counts for.
    pub scope: WindowScope,
    /// What it sums.
    pub metric: Metric,
    /// Its length in seconds ([`LIFETIME`] for no expiry).
    pub duration: u64,
}

impl WindowId {
    /// True if a reservation made at `at` no longer counts at `now`: it counts while
    /// `at > now - duration`, i.e. while `at + duration > now`.
    pub fn expired(&self, at: u64, now: u64) -> bool {
        at.saturating_add(self.duration) <= now
    }
}

/// Stable text form, usable as a store key: `key:searcher-hot:value:3600`,
/// `client:spiffe://x:requests:60`, `grant:0x…:cost:lifetime`.
impl fmt::Display for WindowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            WindowScope::Key(k) => write!(f, "key:{k}:")?,
            WindowScope::Client(c) => write!(f, "client:{c}:")?,
            WindowScope::Grant(g) => write!(f, "grant:{g}:")?,
        }
        let m = match self.metric {
            Metric::Value => "value",
            Metric::Cost => "cost",
            Metric::Requests => "requests",
        };
        if self.duration == LIFETIME {
            write!(f, "{m}:lifetime")
        } else {
            write!(f, "{m}:{}", self.duration)
        }
    }
}

/// An amount to add to a window when the decision is committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The window.
    pub window: WindowId,
    /// The amount (wei, or 1 for a request count).
    pub amount: U256,
    /// The window's limit: the store re-checks `spent + amount <= limit` inside the transaction
    /// that commits the reservation (the authoritative check, across replicas).
    pub limit: U256,
}

/// Read access to the reservations already made.
///
/// # Security
/// The policy's limits hold only if `spent` counts every reservation committed with a
/// timestamp `t` such that `t + duration > now` (see [`WindowId::expired`]), including those
/// of other replicas; over-counting is safe, under-counting is not.
pub trait LimitState {
    /// The sum of the reservations in `window` that still count at `now`.
    fn spent(&self, window: &WindowId, now: u64) -> U256;
    /// The timestamp of the oldest reservation that still counts (for rate-limit reset times).
    /// The default, `None`, makes the reported reset time `now + duration` — late, never early.
    fn oldest(&self, window: &WindowId, now: u64) -> Option<u64> {
        let _ = (window, now);
        None
    }
}

/// In-memory limit state: per window, a queue of `(timestamp, amount)` in time order and the
/// running sum of the queue. Expired entries are dropped lazily (on `reserve` and `prune`), and
/// `spent` only walks the expired prefix not yet dropped, so a read never rescans the window.
#[derive(Debug, Default, Clone)]
pub struct MemoryLimits {
    windows: HashMap<WindowId, Window>,
}

#[derive(Debug, Default, Clone)]
struct Window {
    entries: VecDeque<(u64, U256)>,
    sum: U256,
}

impl Window {
    fn prune(&mut self, id: &WindowId, now: u64) {
        while let Some(&(at, amount)) = self.entries.front() {
            if !id.expired(at, now) {
                break;
            }
            self.sum = self.sum.saturating_sub(amount);
            self.entries.pop_front();
        }
    }
}

impl MemoryLimits {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `amount` to `window` at time `now`. A timestamp earlier than the window's last entry
    /// (a clock step back) is recorded at that last entry's time: the reservation then expires
    /// later, never earlier.
    pub fn reserve(&mut self, window: &WindowId, now: u64, amount: U256) {
        let w = self.windows.entry(window.clone()).or_default();
        w.prune(window, now);
        let at = w.entries.back().map_or(now, |&(last, _)| last.max(now));
        w.entries.push_back((at, amount));
        // Saturation only over-counts, which is the safe direction.
        w.sum = w.sum.saturating_add(amount);
    }

    /// Adds every reservation of an allowing decision at `now`. Returns how many were added
    /// (none for a decision that does not allow).
    pub fn apply(&mut self, decision: &Decision, now: u64) -> usize {
        if !decision.is_allowed() {
            return 0;
        }
        for r in &decision.reservations {
            self.reserve(&r.window, now, r.amount);
        }
        decision.reservations.len()
    }

    /// Removes one reservation made at `at` for `amount` (a signature that failed after the
    /// reservation was committed). Returns false if there was none.
    pub fn release(&mut self, window: &WindowId, at: u64, amount: U256) -> bool {
        let Some(w) = self.windows.get_mut(window) else {
            return false;
        };
        let Some(pos) = w.entries.iter().rposition(|&(t, a)| t == at && a == amount) else {
            return false;
        };
        w.entries.remove(pos);
        w.sum = w.sum.saturating_sub(amount);
        true
    }

    /// Drops every expired entry and every empty window.
    pub fn prune(&mut self, now: u64) {
        self.windows.retain(|id, w| {
            w.prune(id, now);
            !w.entries.is_empty()
        });
    }

    /// Number of entries held (expired ones not yet pruned included).
    pub fn len(&self) -> usize {
        self.windows.values().map(|w| w.entries.len()).sum()
    }

    /// True if no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl LimitState for MemoryLimits {
    fn spent(&self, window: &WindowId, now: u64) -> U256 {
        let Some(w) = self.windows.get(window) else {
            return U256::ZERO;
        };
        let mut sum = w.sum;
        for &(at, amount) in &w.entries {
            if !window.expired(at, now) {
                break;
            }
            sum = sum.saturating_sub(amount);
        }
        sum
    }

    fn oldest(&self, window: &WindowId, now: u64) -> Option<u64> {
        let w = self.windows.get(window)?;
        w.entries
            .iter()
            .map(|&(at, _)| at)
            .find(|&at| !window.expired(at, now))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn id(d: u64) -> WindowId {
        WindowId {
            scope: WindowScope::Key(KeyName::new("k")),
            metric: Metric::Value,
            duration: d,
        }
    }

    #[test]
    fn window_boundary_is_exclusive_of_now_minus_duration() {
        let w = id(60);
        let mut m = MemoryLimits::new();
        m.reserve(&w, 100, U256::from(5));
        assert_eq!(m.spent(&w, 100), U256::from(5));
        assert_eq!(m.spent(&w, 159), U256::from(5));
        // at 160 the entry's timestamp 100 is not > 160 - 60.
        assert_eq!(m.spent(&w, 160), U256::ZERO);
        assert_eq!(m.oldest(&w, 159), Some(100));
        assert_eq!(m.oldest(&w, 160), None);
    }

    #[test]
    fn lazy_expiry_running_sum_and_release() {
        let w = id(10);
        let mut m = MemoryLimits::new();
        for t in 0..20u64 {
            m.reserve(&w, t, U256::from(1));
        }
        // entries 10..=19 count at t = 19 (prune on reserve dropped 0..=9).
        assert_eq!(m.spent(&w, 19), U256::from(10));
        assert_eq!(m.len(), 10);
        assert_eq!(m.spent(&w, 25), U256::from(4));
        assert!(m.release(&w, 19, U256::from(1)));
        assert!(!m.release(&w, 19, U256::from(1)));
        assert_eq!(m.spent(&w, 25), U256::from(3));
        m.prune(100);
        assert!(m.is_empty());
    }

    #[test]
    fn clock_step_back_never_expires_early() {
        let w = id(10);
        let mut m = MemoryLimits::new();
        m.reserve(&w, 100, U256::from(1));
        m.reserve(&w, 90, U256::from(1));
        assert_eq!(m.spent(&w, 109), U256::from(2));
        assert_eq!(m.spent(&w, 110), U256::ZERO);
    }

    #[test]
    fn lifetime_windows_never_expire_and_display_is_stable() {
        let w = WindowId {
            scope: WindowScope::Grant(B256::ZERO),
            metric: Metric::Cost,
            duration: LIFETIME,
        };
        let mut m = MemoryLimits::new();
        m.reserve(&w, 0, U256::from(7));
        assert_eq!(m.spent(&w, u64::MAX - 1), U256::from(7));
        assert!(w.to_string().ends_with(":cost:lifetime"));
        assert_eq!(id(3600).to_string(), "key:k:value:3600");
    }
}
