//! The engine: accepted bundles, per-block fan-out, simulation, inclusion and nonce tracking,
//! cancellation and outcome reporting.
//!
//! Concurrency: bundle state lives in one `std::sync::Mutex<HashMap>` that is only held for
//! short, non-async sections. Every relay request runs in its own task with its own timeout,
//! so a slow or failing relay never delays the others; the head tracker drives
//! [`Engine::on_head`] once per new block.
//!
//! Memory: only live bundles (pending, or included and not yet confirmed) are loaded at start
//! and kept; a bundle that finishes (confirmed, cancelled, expired, failed) stays in memory for
//! [`FINISHED_GRACE_BLOCKS`] more heads (so its per-relay detail is still shown right after) and
//! is then dropped. Status requests, cancels and retries of a bundle id not in memory are answered
//! from the store, so idempotency by bundle id holds across restarts and pruning.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use alloy::primitives::{Address, B256, U256};
use axum::http::StatusCode;
use tokio::task::JoinSet;
use uuid::Uuid;

use castellan_api::submitter::{
    BundleOutcome, BundleState, BundleStatus, OutcomeKind, Quantity, RelayBundleStatus,
    RelayHealth, RelaySelection, SimulationReport, SubmitBundleRequest, Wei,
};

use crate::Error;
use crate::auth::BoxFuture;
use crate::bundle::ValidBundle;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::node::{Node, Receipt};
use crate::relay::{Relay, SendResult, SignatureCache};
use crate::store::{Inserted, Store, StoredBundle};

/// Receives final outcomes (the signer's outcome route; its HTTP client comes with the signer).
pub trait OutcomeSink: Send + Sync {
    /// Reports one outcome. Called once per bundle, from a task of its own.
    fn report(&self, outcome: BundleOutcome) -> BoxFuture<'_, ()>;
}

/// An [`OutcomeSink`] that writes outcomes to the log (until the signer's client exists).
#[derive(Debug, Default)]
pub struct LogOutcomes;

impl OutcomeSink for LogOutcomes {
    fn report(&self, outcome: BundleOutcome) -> BoxFuture<'_, ()> {
        tracing::info!(
            bundle = %outcome.bundle_id,
            key = %outcome.key_name,
            outcome = ?outcome.outcome,
            reason = ?outcome.reason,
            block = ?outcome.included_block.map(|q| q.0),
            "bundle outcome"
        );
        Box::pin(async {})
    }
}

/// Engine settings.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Chain id every transaction must carry.
    pub chain_id: u64,
    /// Blocks on top of the inclusion block before it is final.
    pub confirmations: u64,
    /// Largest `lastBlock - targetBlock`.
    pub max_block_range: u64,
}

/// Delay before the one retry of a transient failure.
const RETRY_DELAY: Duration = Duration::from_millis(50);
/// Longest `Retry-After` that is waited out within the same block.
const MAX_INLINE_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Heads a finished bundle stays in memory before it is answered from the store only.
pub const FINISHED_GRACE_BLOCKS: u64 = 8;

#[derive(Debug)]
struct Entry {
    bundle: Arc<ValidBundle>,
    relays: Vec<usize>,
    relay_status: Vec<RelayBundleStatus>,
    state: BundleState,
    reason: Option<String>,
    included: Option<(u64, B256)>,
    confirmed: bool,
    last_submitted: Option<u64>,
    simulation: Option<SimulationReport>,
    simulating: bool,
    /// Head at which it finished (pruned [`FINISHED_GRACE_BLOCKS`] later).
    finished_at: Option<u64>,
}

impl Entry {
    fn status(&self) -> BundleStatus {
        BundleStatus {
            bundle_id: self.bundle.id,
            key_name: self.bundle.key_name.clone(),
            state: self.state,
            reason: self.reason.clone(),
            included_block: self.included.map(|(b, _)| Quantity(b)),
            confirmed: self.confirmed,
            target_block: Quantity(self.bundle.target_block),
            last_block: Quantity(self.bundle.last_block),
            last_submitted_block: self.last_submitted.map(Quantity),
            tx_hashes: self.bundle.tx_hashes.clone(),
            relays: self.relay_status.clone(),
            simulation: self.simulation.clone(),
        }
    }

    fn needs_simulation(&self) -> bool {
        self.bundle.simulate && self.simulation.is_none()
    }
}

struct Inner {
    config: EngineConfig,
    relays: Vec<Arc<Relay>>,
    node: Node,
    store: Store,
    sink: Arc<dyn OutcomeSink>,
    metrics: Metrics,
    head: AtomicU64,
    head_seen: AtomicBool,
    bundles: Mutex<HashMap<Uuid, Entry>>,
    submit_lock: tokio::sync::Mutex<()>,
}

/// The submitter's engine (cheap to clone).
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// A live bundle as seen at the start of a head's checks.
type LiveBundle = (Uuid, Arc<ValidBundle>, BundleState, Option<(u64, B256)>);

/// What chain checks concluded for one bundle at one head.
enum Verdict {
    Nothing,
    Included(u64, B256),
    Reorged,
    Confirmed(Vec<Receipt>),
    NonceConsumed(Address, u64),
    Expired,
}

impl Engine {
    /// An engine over configured relays, a node, a store and an outcome sink.
    pub fn new(
        config: EngineConfig,
        relays: Vec<Arc<Relay>>,
        node: Node,
        store: Store,
        sink: Arc<dyn OutcomeSink>,
        metrics: Metrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                relays,
                node,
                store,
                sink,
                metrics,
                head: AtomicU64::new(0),
                head_seen: AtomicBool::new(false),
                bundles: Mutex::new(HashMap::new()),
                submit_lock: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Reloads the live stored bundles (pending, or included but not yet confirmed); they resume
    /// at the next head. Finished ones stay in the store only. Rows this submitter stored carry
    /// what their validation recovered, so they are not validated again.
    pub async fn restore(&self) -> Result<usize, Error> {
        let stored = self.inner.store.load_live().await?;
        let mut live = 0;
        for s in stored {
            let id = s.request.bundle_id;
            let bundle = match ValidBundle::from_stored(
                s.request,
                s.meta.as_ref(),
                self.inner.config.chain_id,
                self.inner.config.max_block_range,
            ) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(bundle = %id, error = %e.message, "stored bundle no longer valid; skipped");
                    continue;
                }
            };
            let relays = match self.select(&bundle.selection) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(bundle = %id, error = %e.message, "stored bundle matches no configured relay");
                    Vec::new()
                }
            };
            // An unconfirmed inclusion is re-detected from the chain.
            let (state, included) = match s.state {
                BundleState::Included if s.reason.as_deref() != Some("confirmed") => {
                    (BundleState::Pending, None)
                }
                other => (other, s.included_block.map(|b| (b, B256::ZERO))),
            };
            if state.is_live() {
                live += 1;
            }
            let entry = self.new_entry(Arc::new(bundle), relays, state, s.reason, included);
            self.lock().insert(id, entry);
        }
        self.inner
            .metrics
            .live_bundles
            .set(i64::try_from(live).unwrap_or(i64::MAX));
        self.count_in_memory();
        Ok(live)
    }

    /// How many bundles are held in memory (live ones and recently finished ones).
    pub fn bundles_in_memory(&self) -> usize {
        self.lock().len()
    }

    /// Accepts a bundle: validates it, persists it durably, then starts sending. Idempotent by
    /// id: the same id with the same content returns the existing status (`false`); with
    /// other content it is a 409.
    pub async fn submit(
        &self,
        request: SubmitBundleRequest,
    ) -> Result<(BundleStatus, bool), ApiError> {
        let bundle = ValidBundle::validate(
            request,
            self.inner.config.chain_id,
            self.inner.config.max_block_range,
        )?;
        if let Some(existing) = self.existing(&bundle)? {
            return Ok((existing, false));
        }
        if self.ready() && bundle.last_block <= self.head() {
            // A retry of a bundle that finished (and left memory) is a duplicate, not a refusal.
            if let Some(existing) = self.stored_duplicate(&bundle).await? {
                return Ok((existing, false));
            }
            return Err(ApiError::bad_request(
                "block_range_passed",
                format!(
                    "lastBlock {} is not after the current head {}",
                    bundle.last_block,
                    self.head()
                ),
            ));
        }
        let relays = match self.select(&bundle.selection) {
            Ok(r) => r,
            Err(e) => match self.stored_duplicate(&bundle).await? {
                Some(existing) => return Ok((existing, false)),
                None => return Err(e),
            },
        };
        let id = bundle.id;
        let status = {
            let _serial = self.inner.submit_lock.lock().await;
            if let Some(existing) = self.existing(&bundle)? {
                return Ok((existing, false));
            }
            let meta = bundle.meta(self.inner.config.chain_id);
            match self
                .inner
                .store
                .insert(&bundle.request, bundle.digest.to_string(), Some(&meta))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
            {
                Inserted::New => {}
                // Finished (and pruned from memory, or from before a restart): answered from
                // the store, never accepted again.
                Inserted::Exists(stored) => {
                    if stored.digest != bundle.digest.to_string() {
                        return Err(conflict(id));
                    }
                    return Ok((stored_status(&stored), false));
                }
            }
            let entry = self.new_entry(Arc::new(bundle), relays, BundleState::Pending, None, None);
            let status = entry.status();
            self.lock().insert(id, entry);
            status
        };
        self.count_in_memory();
        self.inner.metrics.bundle("accepted");
        self.inner.metrics.live_bundles.inc();
        if self.ready() {
            self.step(id, self.head());
        }
        Ok((status, true))
    }

    /// A bundle's status, if it is in memory (live, or finished within the grace period);
    /// [`Engine::lookup`] also reads the store.
    pub fn status(&self, id: Uuid) -> Option<BundleStatus> {
        self.lock().get(&id).map(Entry::status)
    }

    /// A bundle's status: from memory, else from the store (a finished bundle, with its
    /// recorded state and no per-relay detail).
    pub async fn lookup(&self, id: Uuid) -> Result<Option<BundleStatus>, ApiError> {
        if let Some(status) = self.status(id) {
            return Ok(Some(status));
        }
        let stored = self
            .inner
            .store
            .get(id)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        // It may have been inserted between the two reads: memory first again.
        Ok(self
            .status(id)
            .or_else(|| stored.map(|s| stored_status(&s))))
    }

    /// Cancels a pending bundle and asks every selected relay that can cancel to drop it.
    pub async fn cancel(&self, id: Uuid) -> Result<BundleStatus, ApiError> {
        if self.status(id).is_none() {
            // Not in memory: finished (or never accepted); the store has its final state.
            let status = self.lookup(id).await?.ok_or_else(|| not_found(id))?;
            if self.status(id).is_none() {
                return match status.state {
                    BundleState::Cancelled => Ok(status),
                    BundleState::Included => Err(already_included(id)),
                    _ => Err(not_live(id)),
                };
            }
        }
        let (bundle, relays, target) = {
            let mut map = self.lock();
            let entry = map.get_mut(&id).ok_or_else(|| not_found(id))?;
            match entry.state {
                BundleState::Cancelled => return Ok(entry.status()),
                BundleState::Pending => {}
                BundleState::Included => return Err(already_included(id)),
                BundleState::Expired | BundleState::Failed => return Err(not_live(id)),
            }
            entry.state = BundleState::Cancelled;
            entry.reason = Some("cancelled".into());
            let head = self.head();
            let target = entry
                .last_submitted
                .unwrap_or_else(|| (head + 1).max(entry.bundle.target_block));
            (entry.bundle.clone(), entry.relays.clone(), target)
        };
        self.finish_recorded(id, BundleState::Cancelled, Some("cancelled".into()))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let mut tasks = JoinSet::new();
        for (slot, idx) in relays.into_iter().enumerate() {
            let Some(relay) = self.inner.relays.get(idx).cloned() else {
                continue;
            };
            if !relay.can_cancel() {
                continue;
            }
            let bundle = bundle.clone();
            tasks.spawn(async move { (slot, relay.cancel(&bundle, target).await) });
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok((slot, Some(result))) = done {
                let mut map = self.lock();
                if let Some(status) = map.get_mut(&id).and_then(|e| e.relay_status.get_mut(slot)) {
                    status.cancelled = matches!(result, SendResult::Accepted { .. });
                    if !status.cancelled {
                        status.last_error = Some(format!("cancel: {}", describe(&result)));
                    }
                }
            }
        }
        self.lookup(id).await?.ok_or_else(|| not_found(id))
    }

    /// Cancels every pending bundle signed by `key_name`; returns their ids.
    pub async fn cancel_by_key(&self, key_name: &str) -> Vec<Uuid> {
        let ids: Vec<Uuid> = self
            .lock()
            .values()
            .filter(|e| e.state == BundleState::Pending && e.bundle.key_name == key_name)
            .map(|e| e.bundle.id)
            .collect();
        let mut tasks = JoinSet::new();
        for id in ids {
            let engine = self.clone();
            tasks.spawn(async move { (id, engine.cancel(id).await) });
        }
        let mut cancelled = Vec::new();
        while let Some(done) = tasks.join_next().await {
            if let Ok((id, Ok(status))) = done
                && status.state == BundleState::Cancelled
            {
                cancelled.push(id);
            }
        }
        cancelled.sort();
        cancelled
    }

    /// Health of every relay.
    pub fn relays_health(&self) -> Vec<RelayHealth> {
        self.inner.relays.iter().map(|r| r.health_view()).collect()
    }

    /// The configured relays.
    pub fn relays(&self) -> &[Arc<Relay>] {
        &self.inner.relays
    }

    /// Metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Last head seen (0 before the first; see [`Engine::ready`]).
    pub fn head(&self) -> u64 {
        self.inner.head.load(Ordering::Acquire)
    }

    /// Whether a head has been seen (readiness).
    pub fn ready(&self) -> bool {
        self.inner.head_seen.load(Ordering::Acquire)
    }

    /// Processes a new head: inclusion, reorg and nonce checks for every live bundle, expiry,
    /// then (re)submission of every pending bundle for the next block.
    pub async fn on_head(&self, head: u64) {
        self.inner.head.store(head, Ordering::Release);
        self.inner.head_seen.store(true, Ordering::Release);
        self.inner
            .metrics
            .head
            .set(i64::try_from(head).unwrap_or(i64::MAX));
        let live: Vec<LiveBundle> = self
            .lock()
            .values()
            .filter(|e| e.state.is_live() && !e.simulating)
            .map(|e| (e.bundle.id, e.bundle.clone(), e.state, e.included))
            .collect();
        let nonces: Arc<tokio::sync::Mutex<HashMap<Address, u64>>> = Arc::default();
        let mut checks = JoinSet::new();
        for (id, bundle, state, included) in live {
            let engine = self.clone();
            let nonces = nonces.clone();
            checks.spawn(async move {
                let verdict = engine.check(&bundle, state, included, head, &nonces).await;
                (id, verdict)
            });
        }
        while let Some(done) = checks.join_next().await {
            let Ok((id, verdict)) = done else { continue };
            match verdict {
                Ok(v) => self.apply(id, v, head).await,
                Err(e) => tracing::warn!(bundle = %id, error = %e, "chain check failed"),
            }
        }
        let pending: Vec<Uuid> = self
            .lock()
            .values()
            .filter(|e| e.state == BundleState::Pending)
            .map(|e| e.bundle.id)
            .collect();
        for id in pending {
            self.step(id, head);
        }
        // Finished bundles leave memory after the grace period (the store still answers).
        self.lock().retain(|_, e| {
            e.finished_at
                .is_none_or(|f| head < f.saturating_add(FINISHED_GRACE_BLOCKS))
        });
        self.count_in_memory();
    }

    /// Runs the head tracker: polls `eth_blockNumber` every `interval` and calls
    /// [`Engine::on_head`] on each change, one at a time.
    pub fn spawn_head_tracker(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = None;
            loop {
                ticker.tick().await;
                match engine.inner.node.block_number().await {
                    Ok(n) if last != Some(n) => {
                        last = Some(n);
                        engine.on_head(n).await;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "head poll failed"),
                }
            }
        })
    }

    // ---- internals -------------------------------------------------------------------------

    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Entry>> {
        // Sections under this lock do not panic (no unwrap, no indexing out of range), so a
        // poisoned lock is not expected; if it happens the data is still consistent per field.
        self.inner.bundles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_entry(
        &self,
        bundle: Arc<ValidBundle>,
        relays: Vec<usize>,
        state: BundleState,
        reason: Option<String>,
        included: Option<(u64, B256)>,
    ) -> Entry {
        let relay_status = relays
            .iter()
            .filter_map(|&i| self.inner.relays.get(i))
            .map(|r| RelayBundleStatus {
                relay: r.name().to_owned(),
                ..RelayBundleStatus::default()
            })
            .collect();
        let confirmed = state == BundleState::Included;
        Entry {
            bundle,
            relays,
            relay_status,
            state,
            reason,
            included,
            confirmed,
            last_submitted: None,
            simulation: None,
            simulating: false,
            finished_at: None,
        }
    }

    fn count_in_memory(&self) {
        let n = self.lock().len();
        self.inner
            .metrics
            .bundles_in_memory
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The stored row with `bundle`'s id as a duplicate's answer (409 if its content differs).
    async fn stored_duplicate(
        &self,
        bundle: &ValidBundle,
    ) -> Result<Option<BundleStatus>, ApiError> {
        let Some(stored) = self
            .inner
            .store
            .get(bundle.id)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
        else {
            return Ok(None);
        };
        if stored.digest != bundle.digest.to_string() {
            return Err(conflict(bundle.id));
        }
        Ok(Some(
            self.status(bundle.id)
                .unwrap_or_else(|| stored_status(&stored)),
        ))
    }

    fn existing(&self, bundle: &ValidBundle) -> Result<Option<BundleStatus>, ApiError> {
        let map = self.lock();
        match map.get(&bundle.id) {
            Some(e) if e.bundle.digest == bundle.digest => Ok(Some(e.status())),
            Some(_) => Err(conflict(bundle.id)),
            None => Ok(None),
        }
    }

    fn select(&self, selection: &RelaySelection) -> Result<Vec<usize>, ApiError> {
        let relays = &self.inner.relays;
        let chosen: Vec<usize> = match selection {
            RelaySelection::All => (0..relays.len())
                .filter(|&i| relays[i].spec().default)
                .collect(),
            RelaySelection::Named { relays: names } => {
                let mut out = Vec::new();
                for name in names {
                    match relays.iter().position(|r| r.name() == name) {
                        Some(i) if !out.contains(&i) => out.push(i),
                        Some(_) => {}
                        None => {
                            return Err(ApiError::bad_request(
                                "unknown_relay",
                                format!("no relay named {name:?}"),
                            )
                            .with_details(serde_json::json!({"relay": name})));
                        }
                    }
                }
                out
            }
            RelaySelection::Weighted { max } => {
                let mut ranked: Vec<(usize, (f64, f64))> = (0..relays.len())
                    .filter(|&i| relays[i].spec().default)
                    .filter_map(|i| relays[i].rank().map(|r| (i, r)))
                    .collect();
                ranked.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal));
                let take = max.map_or(ranked.len(), |m| usize::try_from(m).unwrap_or(usize::MAX));
                ranked.into_iter().take(take).map(|(i, _)| i).collect()
            }
        };
        if chosen.is_empty() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_relay_available",
                "no relay matches the selection".into(),
            ));
        }
        Ok(chosen)
    }

    /// Sends a pending bundle for the next block if it has not been sent for it yet (after a
    /// simulation, when one is asked and not yet done).
    fn step(&self, id: Uuid, head: u64) {
        let action = {
            let mut map = self.lock();
            let Some(entry) = map.get_mut(&id) else {
                return;
            };
            if entry.state != BundleState::Pending || entry.simulating {
                return;
            }
            let target = (head + 1).max(entry.bundle.target_block);
            if target > entry.bundle.last_block || entry.last_submitted == Some(target) {
                return;
            }
            // Past maxTimestamp no block can take it: do not send (the next head expires it).
            if entry.bundle.max_timestamp.is_some_and(|t| unix_now() > t) {
                return;
            }
            if entry.needs_simulation() {
                entry.simulating = true;
                Some((false, target))
            } else {
                entry.last_submitted = Some(target);
                Some((true, target))
            }
        };
        match action {
            Some((true, target)) => self.fan_out(id, target),
            Some((false, target)) => {
                let engine = self.clone();
                tokio::spawn(async move { engine.simulate(id, target).await });
            }
            None => {}
        }
    }

    /// One task per selected relay: serialize, sign, send, record.
    fn fan_out(&self, id: Uuid, target: u64) {
        let (bundle, relays) = {
            let map = self.lock();
            let Some(entry) = map.get(&id) else { return };
            (entry.bundle.clone(), entry.relays.clone())
        };
        let signatures = Arc::new(SignatureCache::default());
        for (slot, idx) in relays.into_iter().enumerate() {
            let Some(relay) = self.inner.relays.get(idx).cloned() else {
                continue;
            };
            let engine = self.clone();
            let bundle = bundle.clone();
            let signatures = signatures.clone();
            tokio::spawn(async move {
                engine
                    .send_one(relay, bundle, slot, target, &signatures)
                    .await
            });
        }
    }

    async fn send_one(
        &self,
        relay: Arc<Relay>,
        bundle: Arc<ValidBundle>,
        slot: usize,
        target: u64,
        signatures: &SignatureCache,
    ) {
        let mut retried = false;
        loop {
            let result = relay.send_bundle(&bundle, target, Some(signatures)).await;
            self.record(bundle.id, slot, target, &result);
            let wait = match &result {
                SendResult::Failed {
                    transient: true, ..
                } => Some(RETRY_DELAY),
                SendResult::Throttled {
                    retry_after: Some(d),
                    ..
                } if *d <= MAX_INLINE_RETRY_AFTER => Some(*d),
                _ => None,
            };
            let Some(wait) = wait.filter(|_| !retried) else {
                return;
            };
            retried = true;
            tokio::time::sleep(wait).await;
            // Never retry across the target block, nor after the bundle moved on.
            if self.head() >= target || !self.still_sending(bundle.id, target) {
                return;
            }
        }
    }

    fn still_sending(&self, id: Uuid, target: u64) -> bool {
        self.lock()
            .get(&id)
            .is_some_and(|e| e.state == BundleState::Pending && e.last_submitted == Some(target))
    }

    fn record(&self, id: Uuid, slot: usize, target: u64, result: &SendResult) {
        let mut map = self.lock();
        let Some(status) = map.get_mut(&id).and_then(|e| e.relay_status.get_mut(slot)) else {
            return;
        };
        match result {
            SendResult::Skipped(skip) => {
                status.skipped += 1;
                status.accepted = false;
                status.last_response = Some(skip.label().to_owned());
            }
            other => {
                status.sends += 1;
                status.last_target_block = Some(Quantity(target));
                status.latency_us = other
                    .latency()
                    .map(|l| u64::try_from(l.as_micros()).unwrap_or(u64::MAX));
                match other {
                    SendResult::Accepted { hash, response, .. } => {
                        status.accepted = true;
                        status.last_response = Some(response.clone());
                        status.last_error = None;
                        if hash.is_some() {
                            status.bundle_hash = hash.clone();
                        }
                    }
                    _ => {
                        status.accepted = false;
                        status.errors += 1;
                        status.last_error = Some(describe(other));
                    }
                }
            }
        }
    }

    async fn simulate(&self, id: Uuid, target: u64) {
        let (bundle, selected) = {
            let map = self.lock();
            let Some(entry) = map.get(&id) else { return };
            (entry.bundle.clone(), entry.relays.clone())
        };
        // Selected relays that simulate first, then any other relay that does.
        let relays = &self.inner.relays;
        let mut order: Vec<usize> = selected.clone();
        order.extend((0..relays.len()).filter(|i| !selected.contains(i)));
        let mut last_error = None;
        let mut report = None;
        for idx in order {
            let Some(relay) = relays.get(idx) else {
                continue;
            };
            match relay.simulate(&bundle, target).await {
                None => continue,
                Some(Ok(r)) => {
                    report = Some(r);
                    break;
                }
                Some(Err(e)) => last_error = Some(format!("{}: {}", relay.name(), describe(&e))),
            }
        }
        let verdict = match &report {
            Some(r) if r.ok => None,
            Some(r) if r.error.is_some() => Some("simulation_failed"),
            Some(_) => Some("simulation_reverted"),
            None => Some("simulation_unavailable"),
        };
        {
            let mut map = self.lock();
            let Some(entry) = map.get_mut(&id) else {
                return;
            };
            entry.simulating = false;
            entry.simulation = report.or_else(|| {
                Some(SimulationReport {
                    relay: String::new(),
                    ok: false,
                    results: Vec::new(),
                    error: Some(last_error.unwrap_or_else(|| "no relay offers simulation".into())),
                })
            });
        }
        match verdict {
            None => self.step(id, self.head()),
            Some(reason) => {
                self.finish(id, BundleState::Failed, Some(reason.into()))
                    .await
            }
        }
    }

    async fn check(
        &self,
        bundle: &ValidBundle,
        state: BundleState,
        included: Option<(u64, B256)>,
        head: u64,
        nonces: &tokio::sync::Mutex<HashMap<Address, u64>>,
    ) -> Result<Verdict, Error> {
        let node = &self.inner.node;
        let Some(first) = bundle.tx_hashes.first() else {
            return Ok(Verdict::Nothing);
        };
        if state == BundleState::Included {
            let Some((block, hash)) = included else {
                return Ok(Verdict::Nothing);
            };
            return match node.receipt(*first).await? {
                Some(r)
                    if r.block_number == block && (hash == B256::ZERO || r.block_hash == hash) =>
                {
                    if head >= block + self.inner.config.confirmations {
                        let mut receipts = Vec::with_capacity(bundle.tx_hashes.len());
                        for h in &bundle.tx_hashes {
                            match node.receipt(*h).await? {
                                Some(r) => receipts.push(r),
                                None => return Ok(Verdict::Reorged),
                            }
                        }
                        Ok(Verdict::Confirmed(receipts))
                    } else {
                        Ok(Verdict::Nothing)
                    }
                }
                _ => Ok(Verdict::Reorged),
            };
        }
        // Pending: is every transaction on-chain, in one block?
        let mut missing = Vec::new();
        let mut found: Option<(u64, B256)> = None;
        let mut split = false;
        if let Some(r) = node.receipt(*first).await? {
            found = Some((r.block_number, r.block_hash));
            for (i, h) in bundle.tx_hashes.iter().enumerate().skip(1) {
                match node.receipt(*h).await? {
                    Some(r) if Some((r.block_number, r.block_hash)) == found => {}
                    Some(_) => split = true,
                    None => missing.push(i),
                }
            }
        } else {
            missing = (0..bundle.tx_hashes.len()).collect();
        }
        if let Some((block, hash)) = found
            && missing.is_empty()
            && !split
        {
            return Ok(Verdict::Included(block, hash));
        }
        // A nonce of a transaction not on-chain consumed by another transaction: never lands.
        for i in missing {
            let Some(meta) = bundle.tx_meta.get(i) else {
                continue;
            };
            let cached = nonces.lock().await.get(&meta.sender).copied();
            let count = match cached {
                Some(c) => c,
                None => {
                    let c = node.nonce(meta.sender).await?;
                    nonces.lock().await.insert(meta.sender, c);
                    c
                }
            };
            if count > meta.nonce {
                return Ok(Verdict::NonceConsumed(meta.sender, meta.nonce));
            }
        }
        let past_range = head >= bundle.last_block;
        let past_time = bundle.max_timestamp.is_some_and(|t| unix_now() > t);
        Ok(if past_range || past_time {
            Verdict::Expired
        } else {
            Verdict::Nothing
        })
    }

    async fn apply(&self, id: Uuid, verdict: Verdict, head: u64) {
        match verdict {
            Verdict::Nothing => {}
            Verdict::Included(block, hash) => {
                let confirmed_now = {
                    let mut map = self.lock();
                    let Some(entry) = map.get_mut(&id) else {
                        return;
                    };
                    if entry.state != BundleState::Pending {
                        return;
                    }
                    entry.state = BundleState::Included;
                    entry.included = Some((block, hash));
                    entry.confirmed = false;
                    entry.reason = None;
                    head >= block + self.inner.config.confirmations
                };
                tracing::info!(bundle = %id, block, "bundle seen on-chain");
                self.inner.metrics.bundle("seen_onchain");
                if let Err(e) = self
                    .inner
                    .store
                    .set_state(id, BundleState::Included, None, Some(block))
                    .await
                {
                    tracing::error!(bundle = %id, error = %e, "cannot record inclusion");
                }
                if confirmed_now {
                    // Confirmations = 0: final at once.
                    let bundle = self.lock().get(&id).map(|e| e.bundle.clone());
                    if let Some(bundle) = bundle {
                        let mut receipts = Vec::new();
                        for h in &bundle.tx_hashes {
                            if let Ok(Some(r)) = self.inner.node.receipt(*h).await {
                                receipts.push(r);
                            }
                        }
                        Box::pin(self.apply(id, Verdict::Confirmed(receipts), head)).await;
                    }
                }
            }
            Verdict::Reorged => {
                {
                    let mut map = self.lock();
                    let Some(entry) = map.get_mut(&id) else {
                        return;
                    };
                    if entry.state != BundleState::Included || entry.confirmed {
                        return;
                    }
                    tracing::warn!(bundle = %id, block = ?entry.included, "inclusion reorged out; pending again");
                    entry.state = BundleState::Pending;
                    entry.included = None;
                    entry.last_submitted = None;
                }
                self.inner.metrics.bundle("reorged");
                if let Err(e) = self
                    .inner
                    .store
                    .set_state(id, BundleState::Pending, None, None)
                    .await
                {
                    tracing::error!(bundle = %id, error = %e, "cannot record reorg");
                }
            }
            Verdict::Confirmed(receipts) => {
                let outcome = {
                    let mut map = self.lock();
                    let Some(entry) = map.get_mut(&id) else {
                        return;
                    };
                    if entry.state != BundleState::Included || entry.confirmed {
                        return;
                    }
                    entry.confirmed = true;
                    entry.reason = Some("confirmed".into());
                    entry.finished_at = Some(head);
                    outcome_of(entry, &receipts)
                };
                let block = outcome.included_block.map(|q| q.0);
                self.inner.metrics.bundle(match outcome.outcome {
                    OutcomeKind::Reverted => "reverted",
                    _ => "included",
                });
                self.inner.metrics.live_bundles.dec();
                if let Err(e) = self
                    .inner
                    .store
                    .set_state(id, BundleState::Included, Some("confirmed".into()), block)
                    .await
                {
                    tracing::error!(bundle = %id, error = %e, "cannot record confirmation");
                }
                self.report(outcome);
            }
            Verdict::NonceConsumed(sender, nonce) => {
                tracing::info!(bundle = %id, %sender, nonce, "nonce consumed elsewhere; stopping");
                self.finish(id, BundleState::Failed, Some("nonce_consumed".into()))
                    .await;
            }
            Verdict::Expired => {
                self.finish(id, BundleState::Expired, Some("expired".into()))
                    .await
            }
        }
    }

    /// Moves a live bundle to a final state, persists it and reports the outcome.
    async fn finish(&self, id: Uuid, state: BundleState, reason: Option<String>) {
        {
            let mut map = self.lock();
            let Some(entry) = map.get_mut(&id) else {
                return;
            };
            if !entry.state.is_live() || entry.state == BundleState::Included {
                return;
            }
            entry.state = state;
            entry.reason = reason.clone();
        }
        if let Err(e) = self.finish_recorded(id, state, reason).await {
            tracing::error!(bundle = %id, error = %e, "cannot record final state");
        }
    }

    /// Persists a final state already set in memory, counts it and reports the outcome.
    async fn finish_recorded(
        &self,
        id: Uuid,
        state: BundleState,
        reason: Option<String>,
    ) -> Result<(), Error> {
        let persisted = self
            .inner
            .store
            .set_state(id, state, reason.clone(), None)
            .await;
        self.inner.metrics.bundle(match state {
            BundleState::Cancelled => "cancelled",
            BundleState::Expired => "expired",
            _ => "failed",
        });
        self.inner.metrics.live_bundles.dec();
        let head = self.head();
        let key_name = self
            .lock()
            .get_mut(&id)
            .map(|e| {
                e.finished_at = Some(head);
                e.bundle.key_name.clone()
            })
            .unwrap_or_default();
        self.report(BundleOutcome {
            bundle_id: id,
            key_name,
            outcome: OutcomeKind::NotIncluded,
            state,
            reason,
            included_block: None,
            gas_used: None,
            effective_gas_price: None,
        });
        persisted
    }

    fn report(&self, outcome: BundleOutcome) {
        let sink = self.inner.sink.clone();
        tokio::spawn(async move { sink.report(outcome).await });
    }
}

fn outcome_of(entry: &Entry, receipts: &[Receipt]) -> BundleOutcome {
    let gas: u64 = receipts.iter().map(|r| r.gas_used).sum();
    let paid: U256 = receipts
        .iter()
        .map(|r| r.effective_gas_price * U256::from(r.gas_used))
        .fold(U256::ZERO, |a, b| a.saturating_add(b));
    let reverted = receipts
        .iter()
        .zip(&entry.bundle.tx_hashes)
        .any(|(r, h)| !r.success && !entry.bundle.reverting.contains(h));
    BundleOutcome {
        bundle_id: entry.bundle.id,
        key_name: entry.bundle.key_name.clone(),
        outcome: if reverted {
            OutcomeKind::Reverted
        } else {
            OutcomeKind::Included
        },
        state: BundleState::Included,
        reason: None,
        included_block: entry.included.map(|(b, _)| Quantity(b)),
        gas_used: Some(Quantity(gas)),
        effective_gas_price: (gas > 0).then(|| Wei(paid / U256::from(gas))),
    }
}

fn describe(result: &SendResult) -> String {
    match result {
        SendResult::Accepted { response, .. } => format!("accepted: {response}"),
        SendResult::Rejected { code, message, .. } => match code {
            Some(c) => format!("rejected {c}: {message}"),
            None => format!("rejected: {message}"),
        },
        SendResult::Throttled { retry_after, .. } => match retry_after {
            Some(d) => format!("HTTP 429 (retry after {}s)", d.as_secs()),
            None => "HTTP 429".into(),
        },
        SendResult::Failed { reason, .. } => reason.clone(),
        SendResult::Skipped(s) => s.label().into(),
    }
}

fn conflict(id: Uuid) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "bundle_id_conflict",
        format!("bundle {id} was already submitted with other content"),
    )
}

fn already_included(id: Uuid) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "already_included",
        format!("bundle {id} is already on-chain"),
    )
}

fn not_live(id: Uuid) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "not_live",
        format!("bundle {id} is no longer live"),
    )
}

/// The status of a bundle known only from its stored row (no per-relay detail: that history is
/// not persisted).
fn stored_status(s: &StoredBundle) -> BundleStatus {
    let request = &s.request;
    let target = request.target_block.0;
    BundleStatus {
        bundle_id: request.bundle_id,
        key_name: request.key_name.clone(),
        state: s.state,
        reason: s.reason.clone(),
        included_block: s.included_block.map(Quantity),
        confirmed: s.state == BundleState::Included && s.reason.as_deref() == Some("confirmed"),
        target_block: Quantity(target),
        last_block: Quantity(request.last_block.map_or(target, |q| q.0)),
        last_submitted_block: None,
        tx_hashes: request
            .txs
            .iter()
            .map(alloy::primitives::keccak256)
            .collect(),
        relays: Vec::new(),
        simulation: None,
    }
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "bundle_not_found",
        format!("no bundle {id}"),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
