//! The signer's store: key registry, limit windows, freeze and pause state, pending requests,
//! approvals, grants, request outcomes and the audit chain.
//!
//! [`Store`] is the interface; [`SqliteStore`] is the embedded implementation (one appliance).
//! The trait is shaped so a PostgreSQL implementation serving several signer replicas can follow:
//! every state change is one method that runs as one store transaction, and every check that
//! protects money (freeze, key status, pause, request-id uniqueness, limit check-and-reserve)
//! happens *inside* that transaction, never as read-then-write by the caller.
//!
//! # The decision transaction
//! Step 5 of the signing pipeline is [`Store::commit_decision`]. In ONE transaction it
//! 1. refuses if the global freeze is set ([`Refusal::Frozen`]);
//! 2. refuses unless the key version is `active`, or `retiring` before its `until` when the
//!    caller says the policy allowed a retiring key ([`Refusal::KeyNotSignable`]);
//! 3. refuses if the key is paused ([`Refusal::KeyPaused`]);
//! 4. refuses a request id that was used before, returning what was stored for it
//!    ([`Refusal::DuplicateRequest`]) — a retried request never signs twice;
//! 5. for every `(window, duration, amount, limit)`: sums the window's reservations with
//!    `at > now − duration` and refuses if `spent + amount > limit` ([`Refusal::LimitExceeded`],
//!    naming the first such window, its spent and limit);
//! 6. only when every check passed: inserts the request row and every reservation (with its
//!    bucket totals) and appends the `decision` audit record;
//!
//! and commits with fsync before it answers. Window keys in one decision are distinct, so
//! checking all windows before reserving in any gives the same answers as checking each just
//! before its own reservation. A refusal of kinds 1–3 and 5 therefore writes nothing of the
//! decision (no request row, no reservation) and appends a `refusal` audit record instead; a
//! duplicate appends nothing (the original request is already audited). After signing,
//! [`Store::record_outcome`] appends the `signature` record, or releases the reservations and
//! appends a `failure` record.
//!
//! A decision whose outcome is never recorded (the signer crashed while signing) keeps its
//! reservations — a crash never lowers a window's spent total — and its request id stays used.
//!
//! # Outcomes
//! The invariant of the signing pipeline is that no signature leaves the signer unless a
//! *durable* audit record and a limit reservation cover it. The decision record is that record:
//! it names the request, the key, the request digest (which binds what is signed), the client
//! and the reservations, and it is on disk before the backend is asked to sign. The `signature`
//! record that follows is the receipt (signature, transaction hash, response). So the signing
//! path does not wait for an fsync of the receipt: [`Store::queue_outcome`] queues it, the writer
//! commits it in its next batch (written to the WAL, not fsynced), and the caller is answered at
//! that commit; the next fsync of the WAL makes it durable too (the WAL is one append-only file:
//! syncing it syncs every frame before). So a process crash after a client got its signature
//! loses nothing (the frames are in the OS's page cache; shown by `signer/tests/crash_loop.rs`,
//! which `kill -9`s the signer while it signs); a power loss before the next fsync loses at most
//! such receipts, never a decision record, and the request then stays `reserved` with its
//! reservations kept, as for a crash while signing. Decisions, failures (which release
//! reservations) and every other change are answered only after an fsync that covers them.
//! Reads through this store first wait until every outcome queued before them is committed, so
//! a client that got its signature and then asks for the request's status sees the outcome.
//!
//! # Limit windows
//! A window is an opaque [`WindowKey`] (the policy crate names them, e.g.
//! `key:searcher-hot:value:3600`) plus a duration. Amounts are `U256`, stored as 32-byte
//! big-endian BLOBs and summed in the store process (SQLite cannot sum 256-bit integers). So that
//! a 24-hour window at hundreds of requests per second does not mean summing millions of rows per
//! decision, each window also keeps per-second and per-minute bucket totals (`window_buckets`),
//! updated in the same transaction as the reservation rows. With `since = now − duration`, a
//! window's total is, exactly: the rows with `at > since` in the second holding `since`, plus the
//! later per-second buckets of the minute holding `since`, plus every later per-minute bucket —
//! at most one second of rows, 59 second-buckets and `duration / 1 min` minute-buckets, whatever
//! the request rate. A budget grant is a window that never expires: [`Reservation::grant`].
//! Expired rows and buckets are deleted by [`Store::prune_reservations`]: per window, the rows
//! older than its span and the buckets whose whole second or minute is.
//!
//! # Window cache (SQLite writer)
//! So that a decision does not re-read every bucket of a 24-hour window, the writer thread keeps
//! a copy of each window's state that it has touched: the one-minute bucket totals after the
//! window's start with their running sum, the recent one-second buckets, and, for windows of at
//! most 2 s, the recent reservation rows summed per millisecond. Each part is an exact copy of
//! the database for every key at or after its own lower bound; a part of a sum below that bound
//! (the boundary second and minute of a long window) is read from the database as before, so
//! every sum equals the one computed from the tables. The writer updates the copy in step with
//! each row and bucket it writes. The copy is trusted only while this connection is the only
//! writer: at the start of every batch, inside the write lock, the writer reads `PRAGMA
//! data_version` (which changes when *another* connection committed — a second store instance
//! on the file, `keyctl`) and drops the whole copy if it changed; it also drops it when a job
//! that wrote fails, when a batch's commit fails, and after pruning.
//!
//! Bucket totals are written once per batch, not once per decision: the decisions of a batch
//! move the same few buckets (this second, this minute), so the cache holds each changed total
//! until just before the batch commits, and writes it then (in the same transaction as the
//! rows). Every read of a bucket that the cache does not track sees these unflushed totals
//! first. A job that fails after writing while such totals wait fails the whole batch (only a
//! database failure does that), since dropping the cache would lose them. Two instances on
//! one file therefore still never together exceed a limit. Readers ([`Store::window_sums`],
//! [`Store::grant`]) always sum from the tables.
//!
//! # Group commit (SQLite)
//! All writes go to one writer thread (`store-writer`) through a bounded channel. The thread takes
//! every queued job (up to a batch limit), runs them in one `BEGIN IMMEDIATE` transaction (see
//! "Failed jobs" below) and commits once, with `synchronous=NORMAL`: the commit writes its WAL
//! frames without an fsync. Durability is the job of a second thread (`store-sync`): the writer
//! hands it the answers that must be durable, and it `fdatasync`s the WAL file, then answers every
//! job of every commit written before that sync began. So the writer never waits for the disk — a
//! queued outcome committed while a sync runs is answered at once instead of after it — and every
//! commit written during one sync shares the next. Under load (see adaptive group commit below),
//! while a sync runs, a batch holding only jobs that wait for an fsync is not committed yet (they
//! could not be answered before the next sync anyway): the writer collects more jobs until the sync
//! ends, so they share one commit too. Unloaded, it commits at once, so the commit's work overlaps
//! the running sync instead of adding to the decision's latency. The answer to a durable job
//! therefore means the same as with `synchronous=FULL`: its commit is on disk.
//!
//! Adaptive group commit: a commit costs the writer about as much as the jobs in it (every page
//! it dirties goes to the WAL whole, and a decision touches a dozen index pages), so while the
//! pipeline is loaded — at least [`SqliteConfig::linger_siblings`] decisions (default 8) wait
//! for their outcome — the writer commits at most once per [`SqliteConfig::commit_linger`]
//! (default 500 µs), collecting the jobs that arrive meanwhile; unloaded it commits at once. As
//! PostgreSQL's `commit_delay`/`commit_siblings`: throughput under load without latency when
//! the signer is not busy.
//!
//! Nor does the writer copy the WAL into the database file: SQLite's automatic checkpoint would run
//! inside a commit every 1000 pages (thousands of page writes and two fsyncs) and stall every
//! request behind it. A third thread (`store-checkpoint`, its own connection) runs a `PASSIVE`
//! checkpoint, which never blocks the writer, at most every 100 ms
//! ([`SqliteConfig::checkpoint_interval`]) after new commits; SQLite starts the WAL over at the
//! writer's next transaction once a checkpoint has caught up, and past
//! [`SqliteConfig::wal_restart_frames`] (load without a pause) the writer restarts it itself, so
//! the WAL file stays bounded.
//!
//! A failed `fdatasync` answers every waiting job with an error and stops all writes: after
//! one, Linux no longer promises that the frames written before it reach the disk (a later sync
//! can succeed without writing them), so nothing may be built on them. Writes resume only after
//! a `wal_checkpoint(TRUNCATE)` succeeds — SQLite syncs the WAL, copies every frame into the
//! database file, syncs that and empties the WAL — which puts every earlier commit on disk
//! (`signer/tests/store_faults.rs` makes the disk under a running signer refuse writes). A
//! decision that was committed but whose sync failed was refused to its caller and never
//! signed; after recovery it stays `reserved`, as for a crash before signing.
//!
//! Every statement on the decision and outcome paths, including the transaction statements, is
//! a cached prepared statement; a decision's reservation rows and bucket totals are each written
//! with one multi-row statement.
//!
//! Failed jobs: decisions and outcomes make every check (and every refusal) before their first
//! write, so only a database error (disk full, I/O) can fail them after writing. They run
//! without a savepoint, whose statement journal copied every page they changed (a tenth of the
//! writer's instructions per request): one that fails before writing leaves the batch as it
//! was; one that fails after writing breaks the batch, so nothing of it commits and every job
//! in it fails. Every other job runs in its own SAVEPOINT and a failure rolls back that job
//! alone. If the commit itself fails, every caller in the batch gets [`StoreError::Commit`] and
//! nothing of the batch is durable. Reads use a separate connection on
//! the blocking thread pool. Two [`SqliteStore`]s on one file behave like two replicas: SQLite's
//! write lock (with a busy timeout) serialises their batches, and each batch re-reads the audit
//! head and the window sums inside its transaction.
//!
//! # Schema (version 3, `PRAGMA user_version`)
//! - `keys(name PK, created_at, rotate_every_ms, paused_until, pause_reason, consecutive_failures)`
//! - `key_versions(name → keys, version, backend_ref JSON, address BLOB(20) UNIQUE, public_key
//!   BLOB (SEC1), state, status JSON, created_at, activated_at; PK(name, version))`, at most one
//!   `active` version per name (partial unique index)
//! - `freeze(id = 1, frozen, reason, by_identity, at)`
//! - `requests(request_id PK, key_name, key_version, identity, digest BLOB(32), decided_at, state
//!   reserved|signed|failed, decision_seq, outcome JSON, outcome_seq)`; a signature's outcome
//!   (details and response) is kept once, in its audit record (`outcome_seq`), not in `outcome`
//! - `reservations(window_key, at, request_id → requests, amount BLOB(32), expires_at;
//!   PK(window_key, at, request_id), WITHOUT ROWID)`: one b-tree, in the order window sums read
//!   (version 3; before, three b-trees and an expiry index)
//! - (version 3) `window_spans(window_key PK, duration_ms)`: the longest duration each window was
//!   reserved for, written in the decision's transaction; pruning and a failure's release find a
//!   window's rows through it
//! - `window_buckets(window_key, width 1 000 | 60 000, bucket = at div width, total BLOB(32),
//!   expires_at; PK(window_key, width, bucket))`: the sum of the reservations in that second or
//!   minute
//! - `pending(id PK, key, identity, request JSON, digest, approvals JSON, created_at, expires_at,
//!   status)`; `approvals(pending_id → pending, approver BLOB(20), signature, expires_at, at;
//!   PK(pending_id, approver))` so a duplicate approval does not count twice
//! - `grants(id PK, grant JSON, signatures JSON, created_at, expires_at)`; spent is the sum of the
//!   grant's window
//! - `audit(seq INTEGER PK, prev_hash BLOB, at, kind, request_id, identity, payload TEXT
//!   (canonical JSON), hash BLOB)`
//! - (version 2) `write_probe(id = 1, filler BLOB)`: rewritten by [`Store::probe_writes`]
//!
//! # Security
//! No signature may be made unless `commit_decision` returned `Ok`: that answer means the audit
//! record and every reservation are on disk, and that no freeze, revocation or pause committed
//! earlier applies. Concurrent callers — and concurrent store instances on one database — can never
//! together reserve more than a window's limit, because the sum and the insert happen in one
//! write transaction (the writer's window cache is dropped whenever another connection has
//! committed, see "Window cache").

mod schema;
mod sqlite;
mod window_cache;

use std::fmt;
use std::future::Future;
use std::str::FromStr;

use alloy::primitives::{Address, B256, U256};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::audit::{AuditEntry, AuditError, AuditKey, AuditRecord, CheckpointPayload, UnixMillis};
use crate::backend::{KeyBackend, KeyRef};

pub use sqlite::{CommitStats, SqliteConfig, SqliteStore};

/// A key name: `[a-z0-9][a-z0-9-]{0,62}`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyName(String);

impl KeyName {
    /// Validates a key name.
    pub fn new(s: impl Into<String>) -> Result<Self, StoreError> {
        let s = s.into();
        let bytes = s.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= 63
            && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
            && bytes
                .iter()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
        if ok {
            Ok(Self(s))
        } else {
            Err(StoreError::Invalid(format!(
                "key name {s:?} must match [a-z0-9][a-z0-9-]{{0,62}}"
            )))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for KeyName {
    type Error = StoreError;
    fn try_from(s: String) -> Result<Self, StoreError> {
        Self::new(s)
    }
}

impl From<KeyName> for String {
    fn from(k: KeyName) -> String {
        k.0
    }
}

impl FromStr for KeyName {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        Self::new(s)
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One version of a key: `name@N`, N ≥ 1.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyVersion {
    /// The key's name.
    pub name: KeyName,
    /// The version number, from 1.
    pub version: u32,
}

impl KeyVersion {
    /// `name@version`.
    pub fn new(name: KeyName, version: u32) -> Self {
        Self { name, version }
    }
}

impl fmt::Display for KeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

impl FromStr for KeyVersion {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        let (name, version) = s
            .split_once('@')
            .ok_or_else(|| StoreError::Invalid(format!("key version {s:?} must be name@N")))?;
        let version: u32 = version
            .parse()
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| StoreError::Invalid(format!("key version {s:?} must be name@N")))?;
        Ok(Self {
            name: KeyName::new(name)?,
            version,
        })
    }
}

/// Lifecycle status of a key version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum KeyStatus {
    /// Registered but not yet activated: signs nothing. (Not in the design's list; a rotation
    /// registers the new version first and activates it in a second step.)
    Pending,
    /// The version that signs for its name.
    Active,
    /// Rotated out: until `until` it signs only what the policy's retiring rules allow.
    Retiring {
        /// End of the grace period.
        until: UnixMillis,
        /// The version that replaced it.
        successor: u32,
    },
    /// Signs nothing.
    Retired,
    /// Revoked: signs nothing, ever again.
    Revoked {
        /// Why.
        reason: String,
        /// When.
        at: UnixMillis,
    },
    /// The HSM object will be deleted at `at` unless cancelled.
    DestroyScheduled {
        /// When the object may be deleted.
        at: UnixMillis,
    },
    /// The HSM object was deleted.
    Destroyed,
}

impl KeyStatus {
    /// The state's name (`active`, `retiring`, …).
    pub fn state(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Retiring { .. } => "retiring",
            Self::Retired => "retired",
            Self::Revoked { .. } => "revoked",
            Self::DestroyScheduled { .. } => "destroy_scheduled",
            Self::Destroyed => "destroyed",
        }
    }

    /// Whether a version in this status may sign at `at`.
    pub fn signable(&self, at: UnixMillis, allow_retiring: bool) -> bool {
        match self {
            Self::Active => true,
            Self::Retiring { until, .. } => allow_retiring && at < *until,
            _ => false,
        }
    }

    /// Whether `set_key_status` may move a version from `self` to `to`. Activation goes through
    /// [`Store::activate_version`]; revocation is allowed from every state but `destroyed`.
    pub fn may_become(&self, to: &KeyStatus) -> bool {
        use KeyStatus::*;
        match (self, to) {
            (Destroyed, _) | (_, Active) | (_, Pending) => false,
            (Revoked { .. }, Revoked { .. }) => false,
            (_, Revoked { .. }) => true,
            (Active, Retiring { .. }) | (Active, Retired) => true,
            (Retiring { .. }, Retiring { .. }) | (Retiring { .. }, Retired) => true,
            (Retired, DestroyScheduled { .. }) | (Revoked { .. }, DestroyScheduled { .. }) => true,
            // Cancelling a scheduled destruction puts the version back to retired.
            (DestroyScheduled { .. }, Retired) | (DestroyScheduled { .. }, Destroyed) => true,
            _ => false,
        }
    }
}

/// A key version as registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyVersionRecord {
    /// `name@N`.
    pub version: KeyVersion,
    /// Where the key object lives.
    pub key_ref: KeyRef,
    /// Its Ethereum address.
    pub address: Address,
    /// Its public key, SEC1-encoded.
    pub public_key: Vec<u8>,
    /// Lifecycle status.
    pub status: KeyStatus,
    /// When the version was registered.
    pub created_at: UnixMillis,
    /// When it became active, if it did.
    pub activated_at: Option<UnixMillis>,
    /// The name's rotation period, if any.
    pub rotate_every_ms: Option<u64>,
}

/// A new key version to register (it starts `pending`).
#[derive(Clone, Debug)]
pub struct NewKeyVersion {
    /// The key's name (created if new).
    pub name: KeyName,
    /// Where the key object lives.
    pub key_ref: KeyRef,
    /// Its Ethereum address; must match `public_key`.
    pub address: Address,
    /// Its public key, SEC1-encoded (compressed or not).
    pub public_key: Vec<u8>,
    /// Rotation period for the name; `None` leaves it as it is.
    pub rotate_every_ms: Option<u64>,
}

/// Who made a change and when: every state-changing method appends an audit record with these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// When.
    pub at: UnixMillis,
    /// The operator or client identity.
    pub identity: String,
    /// The API request id, if the change came through one.
    pub request_id: Option<String>,
}

impl Change {
    /// A change by `identity` at `at`, outside any request.
    pub fn new(identity: impl Into<String>, at: UnixMillis) -> Self {
        Self {
            at,
            identity: identity.into(),
            request_id: None,
        }
    }
}

/// A signing request id: 1–128 printable ASCII characters, unique forever.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RequestId(String);

impl RequestId {
    /// Validates a request id.
    pub fn new(s: impl Into<String>) -> Result<Self, StoreError> {
        let s = s.into();
        if !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(Self(s))
        } else {
            Err(StoreError::Invalid(format!(
                "request id must be 1-128 printable ASCII characters, got {s:?}"
            )))
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RequestId {
    type Error = StoreError;
    fn try_from(s: String) -> Result<Self, StoreError> {
        Self::new(s)
    }
}

impl From<RequestId> for String {
    fn from(r: RequestId) -> String {
        r.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An opaque limit-window name chosen by the policy (e.g. `key:searcher-hot:value:3600`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WindowKey(String);

impl WindowKey {
    /// Validates a window key: 1–256 printable ASCII characters.
    pub fn new(s: impl Into<String>) -> Result<Self, StoreError> {
        let s = s.into();
        if !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(Self(s))
        } else {
            Err(StoreError::Invalid(format!(
                "window key must be 1-256 printable ASCII characters, got {s:?}"
            )))
        }
    }

    /// The window that holds a grant's spending: `grant:<id>`.
    pub fn grant(grant_id: &str) -> Result<Self, StoreError> {
        Self::new(format!("grant:{grant_id}"))
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for WindowKey {
    type Error = StoreError;
    fn try_from(s: String) -> Result<Self, StoreError> {
        Self::new(s)
    }
}

impl From<WindowKey> for String {
    fn from(w: WindowKey) -> String {
        w.0
    }
}

impl fmt::Display for WindowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A window that never expires (grants).
pub const FOREVER_MS: u64 = u64::MAX;

/// One amount to reserve in one window, with the window's limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The window.
    pub window: WindowKey,
    /// Its length: reservations with `at > now − duration_ms` count.
    pub duration_ms: u64,
    /// The amount to reserve (wei, gas, or 1 for a request count).
    pub amount: U256,
    /// The most the window may hold including this amount.
    pub limit: U256,
}

impl Reservation {
    /// A reservation against a budget grant: a window that never expires, limited to `budget`.
    pub fn grant(grant_id: &str, amount: U256, budget: U256) -> Result<Self, StoreError> {
        Ok(Self {
            window: WindowKey::grant(grant_id)?,
            duration_ms: FOREVER_MS,
            amount,
            limit: budget,
        })
    }
}

/// A window whose current total the policy wants for its pre-check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowQuery {
    /// The window.
    pub window: WindowKey,
    /// Its length.
    pub duration_ms: u64,
}

/// Everything step 5 of the pipeline needs, in one transaction.
#[derive(Clone, Debug)]
pub struct DecisionTx {
    /// The request id (unique forever).
    pub request_id: RequestId,
    /// The key version that will sign.
    pub key: KeyVersion,
    /// The client identity.
    pub identity: String,
    /// Now (the policy's clock).
    pub at: UnixMillis,
    /// The digest that will be signed.
    pub digest: B256,
    /// Whether the policy allowed this request to be signed by a `retiring` version.
    pub allow_retiring: bool,
    /// Amounts to reserve, with limits. Window keys must be distinct.
    pub reservations: Vec<Reservation>,
    /// The decision details for the audit record (a JSON object with no non-integer numbers):
    /// request digest, decision, policy hash, …
    pub details: Value,
}

/// The answer to a committed decision or outcome: the audit record that covers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecisionReceipt {
    /// The request.
    pub request_id: RequestId,
    /// The audit record's seq.
    pub seq: u64,
    /// The audit record's hash.
    pub hash: B256,
}

/// Why the store refused a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The global kill switch is set.
    Frozen(Freeze),
    /// No such key version.
    UnknownKey(KeyVersion),
    /// The key version's status does not allow signing.
    KeyNotSignable {
        /// The version.
        key: KeyVersion,
        /// Its status.
        status: KeyStatus,
    },
    /// The key is paused.
    KeyPaused {
        /// The key.
        name: KeyName,
        /// Until when.
        until: UnixMillis,
    },
    /// Reserving would exceed a window's limit.
    LimitExceeded {
        /// The window.
        window: WindowKey,
        /// Its current total (without this request).
        spent: U256,
        /// What this request asked for.
        amount: U256,
        /// Its limit.
        limit: U256,
    },
    /// The request id was used before; here is what was stored for it.
    DuplicateRequest(Box<StoredRequest>),
}

impl Refusal {
    /// A stable machine-readable code. A full window gets the policy's code for that kind of
    /// window, so the API's answer and this refusal's audit record say the same:
    /// `rate_limited` for a request-rate window (`…:requests:<seconds>`, the policy's naming),
    /// `velocity_exceeded` for any other.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Frozen(_) => "frozen",
            Self::UnknownKey(_) => "unknown_key",
            Self::KeyNotSignable { .. } => "key_not_signable",
            Self::KeyPaused { .. } => "key_paused",
            Self::LimitExceeded { window, .. } => {
                if window.as_str().rsplit(':').nth(1) == Some("requests") {
                    "rate_limited"
                } else {
                    "velocity_exceeded"
                }
            }
            Self::DuplicateRequest(_) => "duplicate_request",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Frozen(fr) => write!(f, "signing is frozen by {}: {}", fr.by, fr.reason),
            Self::UnknownKey(k) => write!(f, "no key version {k}"),
            Self::KeyNotSignable { key, status } => {
                write!(f, "key version {key} is {}", status.state())
            }
            Self::KeyPaused { name, until } => write!(f, "key {name} is paused until {until}"),
            Self::LimitExceeded {
                window,
                spent,
                amount,
                limit,
            } => write!(
                f,
                "window {window}: spent {spent} + {amount} would exceed limit {limit}"
            ),
            Self::DuplicateRequest(r) => write!(f, "request id {} was already used", r.request_id),
        }
    }
}

/// What happened after a decision.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The backend signed. `details` (signature, tx hash, …) goes into the audit record and is
    /// returned to retries of the request id.
    Signed {
        /// A JSON object.
        details: Value,
    },
    /// Signing failed. With `release`, the decision's reservations are deleted (the money was
    /// not spent); without, they stay (when it is unknown whether a signature escaped).
    Failed {
        /// Why, for operators.
        reason: String,
        /// Release the reservations.
        release: bool,
    },
}

/// The outcome of a decision, to record.
#[derive(Clone, Debug)]
pub struct OutcomeTx {
    /// The decided request.
    pub request_id: RequestId,
    /// When.
    pub at: UnixMillis,
    /// What happened.
    pub outcome: Outcome,
}

/// What the store holds for a request id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRequest {
    /// The id.
    pub request_id: RequestId,
    /// The key version decided on.
    pub key: KeyVersion,
    /// The client identity.
    pub identity: String,
    /// The digest decided on.
    pub digest: B256,
    /// When it was decided.
    pub decided_at: UnixMillis,
    /// The `decision` audit record's seq.
    pub decision_seq: u64,
    /// Where it is now.
    pub state: RequestState,
}

/// The state of a decided request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestState {
    /// Reserved and audited; no outcome recorded (signing, or the signer crashed while signing —
    /// a retry must not sign again).
    Reserved,
    /// Signed; `details` is what [`Outcome::Signed`] carried (canonical JSON text).
    Signed {
        /// The outcome details as canonical JSON.
        details: String,
        /// The `signature` audit record's seq.
        seq: u64,
    },
    /// Failed.
    Failed {
        /// Why.
        reason: String,
        /// Whether the reservations were released.
        released: bool,
        /// The `failure` audit record's seq.
        seq: u64,
    },
}

/// The global freeze.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Freeze {
    /// Why.
    pub reason: String,
    /// Who set it.
    pub by: String,
    /// When.
    pub at: UnixMillis,
}

/// Per-key operational control: pause and breaker.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct KeyControl {
    /// Paused until (exclusive), if paused.
    pub paused_until: Option<UnixMillis>,
    /// Why it was paused.
    pub pause_reason: Option<String>,
    /// Consecutive failed outcomes reported by the submitter.
    pub consecutive_failures: u32,
}

/// Status of a pending request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingStatus {
    /// Waiting for approvals.
    Pending,
    /// Enough approvals collected.
    Approved,
    /// Rejected by an approver or an operator.
    Rejected,
    /// Expired before enough approvals.
    Expired,
    /// Signed after approval.
    Executed,
}

impl PendingStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Executed => "executed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "approved" => Self::Approved,
            "rejected" => Self::Rejected,
            "expired" => Self::Expired,
            "executed" => Self::Executed,
            _ => return None,
        })
    }
}

/// A request waiting for M-of-N approvals.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingRequest {
    /// The request id.
    pub id: RequestId,
    /// The key it would sign with.
    pub key: KeyName,
    /// Who asked.
    pub identity: String,
    /// The parsed request (JSON).
    pub request: Value,
    /// The digest approvers sign over (with the expiry).
    pub digest: B256,
    /// Which approvals are required (the policy's tier, as JSON).
    pub approvals_required: Value,
    /// When it was created.
    pub created_at: UnixMillis,
    /// When it expires.
    pub expires_at: UnixMillis,
    /// Where it is.
    pub status: PendingStatus,
}

/// One approver's approval of a pending request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approval {
    /// The pending request.
    pub pending_id: RequestId,
    /// The approver's address (already recovered and checked by the caller).
    pub approver: Address,
    /// The EIP-712 signature (65 bytes).
    pub signature: Vec<u8>,
    /// When the approval expires.
    pub expires_at: UnixMillis,
    /// When it was received.
    pub at: UnixMillis,
}

/// The result of adding an approval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalTally {
    /// Whether this approval was new (a second approval by the same approver does not count).
    pub counted: bool,
    /// Distinct approvers whose approval has not expired, sorted.
    pub approvers: Vec<Address>,
}

/// A budget grant signed by approvers.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    /// The grant id.
    pub id: String,
    /// The grant (client, key, budget, destinations, expiry) as JSON.
    pub grant: Value,
    /// The approver signatures, as JSON.
    pub signatures: Value,
    /// When it was recorded.
    pub created_at: UnixMillis,
    /// When it expires.
    pub expires_at: UnixMillis,
}

/// A grant and how much of it was spent (the sum of its window, [`Reservation::grant`]).
#[derive(Clone, Debug, PartialEq)]
pub struct GrantRecord {
    /// The grant.
    pub grant: Grant,
    /// Spent so far.
    pub spent: U256,
}

/// Where an audit export starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditCursor {
    /// From this seq (inclusive).
    Seq(u64),
    /// From the first record at or after this time.
    Time(UnixMillis),
}

/// The signer's persistent state.
///
/// # Security
/// Every method that changes state runs as one durable transaction and appends the audit
/// record(s) describing the change in that same transaction; it returns only after the commit is
/// on disk. See the module docs for what [`Store::commit_decision`] guarantees.
pub trait Store: Send + Sync + 'static {
    /// Whether the store is failing writes now: its last write batch failed to commit, a write
    /// in it failed in the database (disk full, I/O error), or the fsync that was to make it
    /// durable failed. Cleared once a batch that wrote changes is durable. Cheap (an atomic
    /// load); `/ready` answers not-ready while it is set.
    fn writes_failing(&self) -> bool;

    /// Group-commit counters so far (for metrics).
    fn commit_stats(&self) -> CommitStats;

    /// While [`Store::writes_failing`], tries one durable write that changes nothing of meaning
    /// (it proves the store can commit and sync again, and clears the flag if it can); at most
    /// one attempt per 200 ms, further calls meanwhile return at once. No audit record: nothing
    /// changed. Lets `/ready` recover without waiting for a signing request.
    fn probe_writes(&self) -> impl Future<Output = ()> + Send;

    // --- signing pipeline ---

    /// Step 5: re-checks freeze, key status, pause and request-id uniqueness, check-and-reserves
    /// every window, appends the decision record, commits durably. See the module docs.
    ///
    /// If the returned future is dropped after the decision was queued, it may still commit: the
    /// request id is then used, and a retry learns so ([`Refusal::DuplicateRequest`] in state
    /// [`RequestState::Reserved`]) instead of signing.
    fn commit_decision(
        &self,
        decision: DecisionTx,
    ) -> impl Future<Output = Result<DecisionReceipt, StoreError>> + Send;

    /// Step 7: records a decision's outcome (and releases its reservations on a failure with
    /// `release`). Fails with [`StoreError::Conflict`] if an outcome was already recorded.
    fn record_outcome(
        &self,
        outcome: OutcomeTx,
    ) -> impl Future<Output = Result<DecisionReceipt, StoreError>> + Send;

    /// Step 7 for a signature whose decision is already durable: appends the `signature` record
    /// like [`Store::record_outcome`] with [`Outcome::Signed`], without waiting for an fsync.
    ///
    /// Returns once the writer has committed the batch holding it (written to the WAL, without
    /// an fsync of its own): it then survives a process crash, is visible to every reader, and
    /// is made durable against a power loss by the next durable commit (the next decision's, at
    /// the latest). A power loss before that loses at most the outcome record: the
    /// durable decision record still covers the signature and its reservations are kept (see
    /// "Outcomes" in the module docs). A failure to write it is logged.
    fn queue_outcome(
        &self,
        outcome: OutcomeTx,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// What is stored for a request id, if it was used.
    fn request(
        &self,
        id: RequestId,
    ) -> impl Future<Output = Result<Option<StoredRequest>, StoreError>> + Send;

    /// Current totals of windows at `now` (for the policy's in-memory pre-check; the decision
    /// transaction re-checks authoritatively).
    fn window_sums(
        &self,
        windows: Vec<WindowQuery>,
        now: UnixMillis,
    ) -> impl Future<Output = Result<Vec<(WindowKey, U256)>, StoreError>> + Send;

    /// Deletes reservations that stopped counting in their window more than a grace period
    /// (5 minutes, for clock skew between replicas) before `now`. Returns how many.
    fn prune_reservations(
        &self,
        now: UnixMillis,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    // --- key registry ---

    /// Registers a new version of a key (the name is created if new); it starts `pending`.
    fn register_key_version(
        &self,
        new: NewKeyVersion,
        change: Change,
    ) -> impl Future<Output = Result<KeyVersionRecord, StoreError>> + Send;

    /// Activates a version; the previously active version becomes `retiring` for `retire_grace_ms`
    /// (or `retired` at once with `None`).
    fn activate_version(
        &self,
        version: KeyVersion,
        retire_grace_ms: Option<u64>,
        change: Change,
    ) -> impl Future<Output = Result<KeyVersionRecord, StoreError>> + Send;

    /// Moves a version to another status, if [`KeyStatus::may_become`] allows it.
    fn set_key_status(
        &self,
        version: KeyVersion,
        status: KeyStatus,
        change: Change,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Revokes one version, or every version of the name (`version: None`) that is not destroyed
    /// or already revoked. Returns the versions revoked.
    fn revoke(
        &self,
        name: KeyName,
        version: Option<u32>,
        reason: String,
        change: Change,
    ) -> impl Future<Output = Result<Vec<KeyVersion>, StoreError>> + Send;

    /// Sets or clears the name's rotation period.
    fn set_rotate_every(
        &self,
        name: KeyName,
        rotate_every_ms: Option<u64>,
        change: Change,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every version of one name, or of all names, ordered by name and version.
    fn list_keys(
        &self,
        name: Option<KeyName>,
    ) -> impl Future<Output = Result<Vec<KeyVersionRecord>, StoreError>> + Send;

    /// The active version of a name, if any.
    fn active_version(
        &self,
        name: KeyName,
    ) -> impl Future<Output = Result<Option<KeyVersionRecord>, StoreError>> + Send;

    /// Active versions whose name has a rotation period that has elapsed since activation.
    fn keys_due_for_rotation(
        &self,
        now: UnixMillis,
    ) -> impl Future<Output = Result<Vec<KeyVersionRecord>, StoreError>> + Send;

    // --- freeze, pause, breaker ---

    /// Sets the global freeze (replacing any earlier reason).
    fn freeze(
        &self,
        reason: String,
        change: Change,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Lifts the global freeze (the caller checked the M-of-N admin approvals).
    fn unfreeze(&self, change: Change) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The global freeze, if set.
    fn freeze_state(&self) -> impl Future<Output = Result<Option<Freeze>, StoreError>> + Send;

    /// Pauses a key until `until` (a cooldown).
    fn pause_key(
        &self,
        name: KeyName,
        until: UnixMillis,
        reason: String,
        change: Change,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Lifts a key's pause.
    fn unpause_key(
        &self,
        name: KeyName,
        change: Change,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records a submitter-reported outcome for the breaker; returns the consecutive failures.
    fn record_key_result(
        &self,
        name: KeyName,
        success: bool,
        change: Change,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;

    /// A key's pause and breaker state.
    fn key_control(
        &self,
        name: KeyName,
    ) -> impl Future<Output = Result<KeyControl, StoreError>> + Send;

    // --- approvals and grants ---

    /// Records a request that needs approvals.
    fn create_pending(
        &self,
        pending: PendingRequest,
        change: Change,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Adds an approval (checked by the caller); a duplicate by the same approver does not count
    /// twice. Refused if the request is not pending or has expired, or the approval has expired.
    fn add_approval(
        &self,
        approval: Approval,
        change: Change,
    ) -> impl Future<Output = Result<ApprovalTally, StoreError>> + Send;

    /// A pending request and its approvals.
    fn pending(
        &self,
        id: RequestId,
    ) -> impl Future<Output = Result<Option<(PendingRequest, Vec<Approval>)>, StoreError>> + Send;

    /// Requests still waiting for approvals at `now` (pending, not expired): how many, and when
    /// the oldest was created (for the approval-backlog metrics).
    fn pending_backlog(
        &self,
        now: UnixMillis,
    ) -> impl Future<Output = Result<(u64, Option<UnixMillis>), StoreError>> + Send;

    /// Moves a pending request to another status.
    fn set_pending_status(
        &self,
        id: RequestId,
        status: PendingStatus,
        change: Change,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records a budget grant (its signatures were checked by the caller).
    fn insert_grant(
        &self,
        grant: Grant,
        change: Change,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A grant and its spent total.
    fn grant(
        &self,
        id: String,
    ) -> impl Future<Output = Result<Option<GrantRecord>, StoreError>> + Send;

    /// Every grant with its spent total, newest first; with `unexpired_at`, only those that
    /// expire after that time.
    fn list_grants(
        &self,
        unexpired_at: Option<UnixMillis>,
    ) -> impl Future<Output = Result<Vec<GrantRecord>, StoreError>> + Send;

    // --- audit ---

    /// Appends a record (e.g. a policy change). Checkpoints go through
    /// [`Store::append_checkpoint`].
    fn append_audit(
        &self,
        entry: AuditEntry,
    ) -> impl Future<Output = Result<AuditRecord, StoreError>> + Send;

    /// Appends a checkpoint; refused unless its `(seq, hash)` is a record in the chain and its
    /// signature recovers to its `signer`.
    fn append_checkpoint(
        &self,
        checkpoint: CheckpointPayload,
        at: UnixMillis,
    ) -> impl Future<Output = Result<AuditRecord, StoreError>> + Send;

    /// The chain head `(seq, hash)`, if any record exists.
    fn audit_head(&self) -> impl Future<Output = Result<Option<(u64, B256)>, StoreError>> + Send;

    /// The seq of the last checkpoint record, if any.
    fn last_checkpoint_seq(&self) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// Up to `limit` records from `from`, in order.
    fn audit_records(
        &self,
        from: AuditCursor,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<AuditRecord>, StoreError>> + Send;
}

/// Appends a signed checkpoint if at least `every` records were appended since the last one.
/// Returns the checkpoint record, or `None` if none was due.
///
/// # Security
/// The checkpoint signs the chain head read just before signing; records appended meanwhile are
/// covered by the next checkpoint. The audit key must be used for nothing else.
pub async fn checkpoint_if_due<S: Store, B: KeyBackend>(
    store: &S,
    backend: &B,
    key: &AuditKey,
    every: u64,
    at: UnixMillis,
) -> Result<Option<AuditRecord>, StoreError> {
    let Some(head) = store.audit_head().await? else {
        return Ok(None);
    };
    let last = store.last_checkpoint_seq().await?.unwrap_or(0);
    if head.0.saturating_sub(last) < every.max(1) {
        return Ok(None);
    }
    let payload = crate::audit::sign_checkpoint(backend, key, head).await?;
    Ok(Some(store.append_checkpoint(payload, at).await?))
}

/// Periodic upkeep for a running signer, until `shutdown` completes: every `interval` it deletes
/// expired reservations ([`Store::prune_reservations`]) and, with an audit key, appends a signed
/// checkpoint when `checkpoint_every` records have accumulated ([`checkpoint_if_due`]). A failed
/// round is logged and retried at the next tick; an HSM that is down delays checkpoints but never
/// blocks signing.
pub async fn run_maintenance<S: Store, B: KeyBackend>(
    store: &S,
    backend: &B,
    audit_key: Option<&AuditKey>,
    checkpoint_every: u64,
    interval: std::time::Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = ticks.tick() => {}
        }
        let now = UnixMillis::now();
        match store.prune_reservations(now).await {
            Ok(n) if n > 0 => tracing::debug!(pruned = n, "expired reservations deleted"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning reservations failed"),
        }
        if let Some(key) = audit_key {
            match checkpoint_if_due(store, backend, key, checkpoint_every, now).await {
                Ok(Some(r)) => tracing::info!(seq = r.seq, "audit checkpoint appended"),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "audit checkpoint failed"),
            }
        }
    }
}

/// Writes every record from `from` to `w` as JSON lines; returns how many.
pub async fn export_jsonl<S: Store, W: std::io::Write>(
    store: &S,
    from: AuditCursor,
    mut w: W,
) -> Result<u64, StoreError> {
    let mut cursor = from;
    let mut n = 0u64;
    loop {
        let page = store.audit_records(cursor, 1000).await?;
        let Some(last) = page.last() else { break };
        cursor = AuditCursor::Seq(last.seq.saturating_add(1));
        crate::audit::write_jsonl(&page, &mut w).map_err(|e| StoreError::Io(e.to_string()))?;
        n += page.len() as u64;
    }
    Ok(n)
}

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store refused a decision (caller error class: stable code, reason).
    #[error("refused: {0}")]
    Refused(Refusal),
    /// The thing named does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The change conflicts with the current state (invalid transition, outcome already recorded,
    /// duplicate registration).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Malformed input.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A database error.
    #[error("database error: {0}")]
    Database(String),
    /// The commit failed: nothing of this change is durable.
    #[error("commit failed, nothing was stored: {0}")]
    Commit(String),
    /// The database schema is not one this binary understands.
    #[error("schema: {0}")]
    Schema(String),
    /// Writing an export failed.
    #[error("i/o: {0}")]
    Io(String),
    /// An audit record could not be built.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The store was shut down.
    #[error("store closed")]
    Closed,
}

impl StoreError {
    /// The refusal, if this is one.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Self::Refused(r) => Some(r),
            _ => None,
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Database(e.to_string())
    }
}

#[cfg(test)]
mod tests;
