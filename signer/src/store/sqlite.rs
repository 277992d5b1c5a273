//! SQLite implementation of [`Store`]: WAL, one writer thread with group commit and a sync
//! thread that makes its commits durable, one reader connection. See the module docs of
//! [`crate::store`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use super::window_cache::{self, WindowCache, window_sum as db_window_sum};
use super::{
    Approval, ApprovalTally, AuditCursor, Change, DecisionReceipt, DecisionTx, Freeze, Grant,
    GrantRecord, KeyControl, KeyName, KeyStatus, KeyVersion, KeyVersionRecord, NewKeyVersion,
    Outcome, OutcomeTx, PendingRequest, PendingStatus, Refusal, RequestId, RequestState, Store,
    StoreError, StoredRequest, WindowKey, WindowQuery, schema,
};
use crate::audit::{
    AuditEntry, AuditKind, AuditRecord, CheckpointPayload, UnixMillis, canonical_json, hex32,
    seal_canonical, write_canonical, write_canonical_str, write_canonical_u64,
};

/// Prepared statements kept per connection: the decision and outcome paths use about 25, and a
/// statement pushed out of the cache costs a re-parse on its next use.
const STATEMENT_CACHE: usize = 128;
use crate::backend::KeyRef;

/// Tuning for [`SqliteStore`].
#[derive(Clone, Debug)]
pub struct SqliteConfig {
    /// Most write jobs committed in one transaction (one fsync).
    pub max_batch: usize,
    /// Capacity of the writer's queue; callers wait (asynchronously) when it is full.
    pub queue_depth: usize,
    /// How long to wait for the database lock held by another process (another replica on the
    /// same file, or `keyctl` working on the store directly).
    pub busy_timeout: Duration,
    /// WAL frames past which the writer restarts the WAL itself (see `Checkpointer`): bounds
    /// the WAL file under load without a pause.
    pub wal_restart_frames: u64,
    /// How often the checkpoint thread copies new WAL frames into the database file (see
    /// `Checkpointer`). Each checkpoint ends with an fsync of the database file, which competes
    /// with the WAL syncs that decisions wait for; a page changed many times between two
    /// checkpoints (the audit chain's last page, the current buckets) is copied once.
    pub checkpoint_interval: Duration,
    /// Adaptive group commit: while at least `linger_siblings` decisions wait for their
    /// outcome (the pipeline is loaded), the writer commits at most once per `commit_linger`,
    /// so that more jobs share each commit; below that it commits as soon as jobs arrive (as
    /// PostgreSQL's `commit_delay` / `commit_siblings`). Zero disables it.
    pub commit_linger: Duration,
    /// See `commit_linger`.
    pub linger_siblings: usize,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        Self {
            max_batch: 512,
            queue_depth: 4096,
            busy_timeout: Duration::from_secs(10),
            // About 64 MiB at 4 KiB pages.
            wal_restart_frames: 16_384,
            // Each checkpoint's fsync of the database file holds up the WAL syncs that
            // decisions wait for, for as long as it writes what it copied. Once a second (14 MiB
            // at 1000 signatures/s) cost less CPU in `cargo bench --bench loadgen` but stalled
            // decisions for tens of milliseconds (half-load p99 84 ms in one of three runs, and
            // 503s right after the overload bench's flood): short checkpoints keep the tail.
            checkpoint_interval: Duration::from_millis(100),
            commit_linger: Duration::from_micros(500),
            linger_siblings: 8,
        }
    }
}

/// The embedded store: one SQLite database file (plus its `-wal` and `-shm`).
///
/// Dropping it stops the writer thread after it has committed and answered every queued job
/// (briefly blocking the dropping thread).
pub struct SqliteStore {
    sender: Option<mpsc::Sender<Box<dyn Job>>>,
    writer: Option<JoinHandle<()>>,
    sync: Option<JoinHandle<()>>,
    checkpoint: Option<JoinHandle<()>>,
    reader: Arc<Mutex<Connection>>,
    path: PathBuf,
    stats: Arc<CommitCounters>,
}

/// Group-commit counters of one [`SqliteStore`] (for metrics: jobs per commit is the batching
/// factor).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Write transactions committed.
    pub commits: u64,
    /// `fdatasync`s of the WAL that made them durable (one covers every commit before it).
    pub syncs: u64,
    /// Checkpoints run by the checkpoint thread.
    pub checkpoints: u64,
    /// Frames in the WAL, and of those copied into the database file, as of the last
    /// checkpoint (equal: it had caught up).
    pub wal_frames: u64,
    /// See `wal_frames`.
    pub wal_copied: u64,
    /// Decisions whose outcome is not written yet (signatures in progress), as the writer saw
    /// at its last batch: what adaptive group commit ([`SqliteConfig::commit_linger`]) reads.
    pub in_flight: u64,
    /// Of those, commits of batches that held only queued outcomes: written to the WAL without
    /// an fsync, made durable by the next commit's fsync.
    pub unsynced: u64,
    /// Write jobs (decisions, outcomes, changes) answered, committed or refused.
    pub jobs: u64,
}

#[derive(Debug, Default)]
struct CommitCounters {
    commits: std::sync::atomic::AtomicU64,
    jobs: std::sync::atomic::AtomicU64,
    /// Commits without an fsync (batches of queued outcomes only).
    unsynced: std::sync::atomic::AtomicU64,
    /// `fdatasync`s of the WAL by the sync thread.
    syncs: std::sync::atomic::AtomicU64,
    /// See [`CommitStats`].
    checkpoints: std::sync::atomic::AtomicU64,
    wal_frames: std::sync::atomic::AtomicU64,
    wal_copied: std::sync::atomic::AtomicU64,
    in_flight: std::sync::atomic::AtomicU64,
    /// When [`Store::probe_writes`] last wrote (ms since the Unix epoch).
    last_probe_ms: std::sync::atomic::AtomicU64,
    /// Outcomes queued ([`Store::queue_outcome`]) and not yet committed: reads wait for them.
    queued: std::sync::atomic::AtomicU64,
    /// Set when a write batch failed to commit (or a job in it failed with a database error, e.g.
    /// disk full); cleared by the next batch that commits changes.
    failing: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database at `path` with default tuning.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, SqliteConfig::default())
    }

    /// Opens the database at `path`.
    pub fn open_with(path: impl AsRef<Path>, config: SqliteConfig) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let mut writer_conn = open_connection(&path, config.busy_timeout)?;
        schema::migrate(&mut writer_conn)?;
        let reader = open_connection(&path, config.busy_timeout)?;
        let (sender, receiver) = mpsc::channel(config.queue_depth.max(1));
        let tuning = Tuning {
            max_batch: config.max_batch.max(1),
            linger: config.commit_linger,
            linger_siblings: config.linger_siblings,
        };
        let stats = Arc::new(CommitCounters::default());
        // The writer's commits are made durable by the sync thread (see `Syncer`), and the WAL
        // is copied into the database file by the checkpoint thread (see `Checkpointer`).
        writer_conn.pragma_update(None, "synchronous", "NORMAL")?;
        writer_conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let checkpointer = Arc::new(Checkpointer {
            restart_frames: config.wal_restart_frames,
            interval: config.checkpoint_interval,
            ..Checkpointer::default()
        });
        let checkpoint_conn = open_connection(&path, config.busy_timeout)?;
        checkpoint_conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let checkpoint_thread = Arc::clone(&checkpointer);
        let checkpoint = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn({
                let stats = Arc::clone(&stats);
                move || checkpoint_thread.run(&checkpoint_conn, &stats)
            })
            .map_err(|e| {
                StoreError::Database(format!("cannot start the checkpoint thread: {e}"))
            })?;
        let syncer = Arc::new(Syncer::open(&path)?);
        let sync_stats = Arc::clone(&stats);
        let sync_thread = Arc::clone(&syncer);
        let sync = std::thread::Builder::new()
            .name("store-sync".into())
            .spawn(move || sync_thread.run(&sync_stats))
            .map_err(|e| StoreError::Database(format!("cannot start the sync thread: {e}")))?;
        let writer_stats = Arc::clone(&stats);
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                let threads = Helpers {
                    syncer: &syncer,
                    checkpointer: &checkpointer,
                };
                writer_loop(writer_conn, receiver, tuning, &writer_stats, threads);
            })
            .map_err(|e| StoreError::Database(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            sender: Some(sender),
            writer: Some(writer),
            sync: Some(sync),
            checkpoint: Some(checkpoint),
            reader: Arc::new(Mutex::new(reader)),
            path,
            stats,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the last write batch failed (see [`Store::writes_failing`]).
    pub fn writes_failing(&self) -> bool {
        self.stats
            .failing
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// How many transactions were committed for how many write jobs so far.
    pub fn commit_stats(&self) -> CommitStats {
        use std::sync::atomic::Ordering::Relaxed;
        CommitStats {
            commits: self.stats.commits.load(Relaxed),
            syncs: self.stats.syncs.load(Relaxed),
            checkpoints: self.stats.checkpoints.load(Relaxed),
            wal_frames: self.stats.wal_frames.load(Relaxed),
            wal_copied: self.stats.wal_copied.load(Relaxed),
            in_flight: self.stats.in_flight.load(Relaxed),
            unsynced: self.stats.unsynced.load(Relaxed),
            jobs: self.stats.jobs.load(Relaxed),
        }
    }

    /// Runs `f` in the writer's next batch; answers after the batch's durable commit.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteCtx<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.write_with(true, Guard::Savepoint, f).await
    }

    /// Runs `f` in the writer's next batch; answers after the batch's commit and, if `durable`,
    /// once an fsync covers it.
    async fn write_with<T, F>(&self, durable: bool, guard: Guard, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteCtx<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let sender = self.sender.as_ref().ok_or(StoreError::Closed)?;
        let (tx, rx) = oneshot::channel();
        sender
            .send(Box::new(ClosureJob {
                f,
                tx,
                durable,
                guard,
            }))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        // Read your writes: an outcome queued before this read (a client may have its signature
        // already) is committed before the read starts. The barrier needs no fsync.
        if self.stats.queued.load(std::sync::atomic::Ordering::Acquire) > 0 {
            self.write_with(false, Guard::Savepoint, |_| Ok(())).await?;
        }
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            let conn = reader
                .lock()
                .map_err(|_| StoreError::Database("reader connection lock poisoned".into()))?;
            // One read transaction, so multi-statement reads see one snapshot.
            let tx = conn.unchecked_transaction()?;
            f(&tx)
        })
        .await
        .map_err(|e| StoreError::Database(format!("reader task failed: {e}")))?
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(writer) = self.writer.take() {
            // The writer drains the queue and exits once every sender is gone. A panic inside it
            // already answered its callers with `Closed`; nothing more to do here.
            let _ = writer.join();
        }
        // The sync thread answers what waits for the writer's last commits, then ends.
        if let Some(sync) = self.sync.take() {
            let _ = sync.join();
        }
        // The writer told the checkpoint thread to stop when it ended.
        if let Some(checkpoint) = self.checkpoint.take() {
            let _ = checkpoint.join();
        }
    }
}

impl Store for SqliteStore {
    fn writes_failing(&self) -> bool {
        SqliteStore::writes_failing(self)
    }

    fn commit_stats(&self) -> CommitStats {
        SqliteStore::commit_stats(self)
    }

    async fn probe_writes(&self) {
        use std::sync::atomic::Ordering;
        if !self.writes_failing() {
            return;
        }
        let now = UnixMillis::now().0;
        let last = self.stats.last_probe_ms.load(Ordering::Acquire);
        if now.saturating_sub(last) < 200
            || self
                .stats
                .last_probe_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        // Rewrites the probe row with 256 KiB: new WAL frames (about as many as a busy batch
        // writes), so a write that fits only in the space a failed commit left in the WAL does
        // not count as recovery.
        let probe = self
            .write(|ctx| {
                ctx.conn
                    .prepare_cached(
                        "INSERT OR REPLACE INTO write_probe (id, filler) VALUES (1, zeroblob(262144))",
                    )?
                    .execute([])?;
                Ok(())
            })
            .await;
        if let Err(e) = probe {
            tracing::debug!(error = %e, "store write probe failed");
        }
    }

    async fn commit_decision(&self, d: DecisionTx) -> Result<DecisionReceipt, StoreError> {
        validate_decision(&d)?;
        // Unguarded: `decide` checks everything before its first write (see `Guard`).
        self.write_with(true, Guard::WritesLast, move |ctx| decide(ctx, &d))
            .await?
            .map_err(StoreError::Refused)
    }

    async fn record_outcome(&self, o: OutcomeTx) -> Result<DecisionReceipt, StoreError> {
        if let Outcome::Signed { details } = &o.outcome {
            check_object(details)?;
        }
        ms(o.at)?;
        // Unguarded: `outcome` checks everything before its first write (see `Guard`).
        self.write_with(true, Guard::WritesLast, move |ctx| outcome(ctx, o))
            .await
    }

    async fn queue_outcome(&self, o: OutcomeTx) -> Result<(), StoreError> {
        if let Outcome::Signed { details } = &o.outcome {
            check_object(details)?;
        } else {
            return Err(StoreError::Invalid(
                "only a signature's outcome may be queued; a failure is recorded durably".into(),
            ));
        }
        ms(o.at)?;
        let sender = self.sender.as_ref().ok_or(StoreError::Closed)?;
        use std::sync::atomic::Ordering::AcqRel;
        self.stats.queued.fetch_add(1, AcqRel);
        let (done, committed) = oneshot::channel();
        let job = QueuedOutcome { outcome: o, done };
        if sender.send(Box::new(job)).await.is_err() {
            self.stats.queued.fetch_sub(1, AcqRel);
            return Err(StoreError::Closed);
        }
        // Answer only once the batch holding it was committed (written to the WAL, in the OS's
        // page cache, with no fsync of its own): the caller then hands the signature out, and a
        // kill -9 after that must not lose its record (signer/tests/crash_loop.rs). A failure
        // to write it was logged by the writer.
        let _ = committed.await;
        Ok(())
    }

    async fn request(&self, id: RequestId) -> Result<Option<StoredRequest>, StoreError> {
        self.read(move |c| load_request(c, &id)).await
    }

    async fn window_sums(
        &self,
        windows: Vec<WindowQuery>,
        now: UnixMillis,
    ) -> Result<Vec<(WindowKey, U256)>, StoreError> {
        let now = ms(now)?;
        self.read(move |c| {
            windows
                .into_iter()
                .map(|w| {
                    let sum = window_sum(c, &w.window, since(now, w.duration_ms))?;
                    Ok((w.window, sum))
                })
                .collect()
        })
        .await
    }

    async fn prune_reservations(&self, now: UnixMillis) -> Result<u64, StoreError> {
        // Keep rows for a grace period after they expire, so a caller whose clock lags the
        // pruning one (another replica) still sums them exactly.
        let now = ms(now)?.saturating_sub(PRUNE_GRACE_MS);
        self.write(move |ctx| {
            // The buckets this batch changed are written before any is deleted.
            ctx.cache.flush(ctx.conn)?;
            // Per window, through `window_spans` (the longest duration the window was reserved
            // for): rows with `at <= now - span` have expired; a bucket expires with the last
            // of its rows, so once its whole interval is at or before that point.
            let spans = ctx
                .conn
                .prepare_cached("SELECT window_key, duration_ms FROM window_spans")?
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut n = 0;
            for (window, span) in spans {
                let Some(cutoff) = now.checked_sub(span) else {
                    continue;
                };
                n += ctx
                    .conn
                    .prepare_cached("DELETE FROM reservations WHERE window_key = ?1 AND at <= ?2")?
                    .execute(params![window, cutoff])?;
                for width in [window_cache::FINE_MS, window_cache::COARSE_MS] {
                    let before = cutoff.saturating_add(1).div_euclid(width);
                    ctx.conn
                        .prepare_cached(
                            "DELETE FROM window_buckets
                             WHERE window_key = ?1 AND width = ?2 AND bucket < ?3",
                        )?
                        .execute(params![window, width, before])?;
                }
            }
            ctx.cache.clear();
            Ok(n as u64)
        })
        .await
    }

    async fn register_key_version(
        &self,
        new: NewKeyVersion,
        change: Change,
    ) -> Result<KeyVersionRecord, StoreError> {
        let vk = k256::ecdsa::VerifyingKey::from_sec1_bytes(&new.public_key)
            .map_err(|e| StoreError::Invalid(format!("public key is not SEC1 secp256k1: {e}")))?;
        let derived = Address::from_public_key(&vk);
        if derived != new.address {
            return Err(StoreError::Invalid(format!(
                "address {:#x} does not belong to the public key (which gives {derived:#x})",
                new.address
            )));
        }
        let key_ref = serde_json::to_string(&new.key_ref)
            .map_err(|e| StoreError::Invalid(format!("backend reference: {e}")))?;
        let at = ms(change.at)?;
        let rotate = opt_ms(new.rotate_every_ms)?;
        self.write(move |ctx| {
            let c = ctx.conn;
            if let Some((name, version)) = c
                .query_row(
                    "SELECT name, version FROM key_versions WHERE address = ?1",
                    [new.address.as_slice()],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
                )
                .optional()?
            {
                return Err(StoreError::Conflict(format!(
                    "address {:#x} is already registered as {name}@{version}",
                    new.address
                )));
            }
            c.execute(
                "INSERT INTO keys (name, created_at, rotate_every_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO NOTHING",
                params![new.name.as_str(), at, rotate],
            )?;
            if rotate.is_some() {
                c.execute(
                    "UPDATE keys SET rotate_every_ms = ?2 WHERE name = ?1",
                    params![new.name.as_str(), rotate],
                )?;
            }
            let version: i64 = c.query_row(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM key_versions WHERE name = ?1",
                [new.name.as_str()],
                |r| r.get(0),
            )?;
            let version = u32::try_from(version)
                .map_err(|_| StoreError::Conflict("too many versions".into()))?;
            let status = KeyStatus::Pending;
            c.execute(
                "INSERT INTO key_versions
                   (name, version, backend_ref, address, public_key, state, status, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    new.name.as_str(),
                    version,
                    key_ref,
                    new.address.as_slice(),
                    new.public_key,
                    status.state(),
                    status_json(&status)?,
                    at
                ],
            )?;
            let kv = KeyVersion::new(new.name.clone(), version);
            ctx.append_change(
                AuditKind::KeyChange,
                &change,
                json!({
                    "op": "register",
                    "key": kv.to_string(),
                    "address": format!("{:#x}", new.address),
                    "public_key": format!("0x{}", hex::encode(&new.public_key)),
                    "backend_ref": new.key_ref.to_string(),
                    "rotate_every_ms": new.rotate_every_ms,
                }),
            )?;
            load_version(c, &kv)?.ok_or_else(|| StoreError::NotFound(kv.to_string()))
        })
        .await
    }

    async fn activate_version(
        &self,
        version: KeyVersion,
        retire_grace_ms: Option<u64>,
        change: Change,
    ) -> Result<KeyVersionRecord, StoreError> {
        let at = ms(change.at)?;
        self.write(move |ctx| {
            let c = ctx.conn;
            let target = load_version(c, &version)?
                .ok_or_else(|| StoreError::NotFound(version.to_string()))?;
            if target.status != KeyStatus::Pending {
                return Err(StoreError::Conflict(format!(
                    "{version} is {}, only a pending version can be activated",
                    target.status.state()
                )));
            }
            let previous: Option<i64> = c
                .query_row(
                    "SELECT version FROM key_versions WHERE name = ?1 AND state = 'active'",
                    [version.name.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            let mut previous_json = Value::Null;
            if let Some(prev) = previous {
                let prev = KeyVersion::new(
                    version.name.clone(),
                    u32::try_from(prev).map_err(|_| corrupt("version"))?,
                );
                let status = match retire_grace_ms {
                    Some(g) if g > 0 => KeyStatus::Retiring {
                        until: change.at.plus_ms(g),
                        successor: version.version,
                    },
                    _ => KeyStatus::Retired,
                };
                update_status(c, &prev, &status)?;
                previous_json = json!({"key": prev.to_string(), "status": status_value(&status)?});
            }
            update_status(c, &version, &KeyStatus::Active)?;
            c.execute(
                "UPDATE key_versions SET activated_at = ?3 WHERE name = ?1 AND version = ?2",
                params![version.name.as_str(), version.version, at],
            )?;
            ctx.append_change(
                AuditKind::KeyChange,
                &change,
                json!({"op": "activate", "key": version.to_string(), "previous": previous_json}),
            )?;
            load_version(c, &version)?.ok_or_else(|| StoreError::NotFound(version.to_string()))
        })
        .await
    }

    async fn set_key_status(
        &self,
        version: KeyVersion,
        status: KeyStatus,
        change: Change,
    ) -> Result<(), StoreError> {
        self.write(move |ctx| {
            let c = ctx.conn;
            let current = load_version(c, &version)?
                .ok_or_else(|| StoreError::NotFound(version.to_string()))?;
            if !current.status.may_become(&status) {
                return Err(StoreError::Conflict(format!(
                    "{version} cannot go from {} to {}",
                    current.status.state(),
                    status.state()
                )));
            }
            update_status(c, &version, &status)?;
            ctx.append_change(
                AuditKind::KeyChange,
                &change,
                json!({
                    "op": "set_status",
                    "key": version.to_string(),
                    "from": status_value(&current.status)?,
                    "to": status_value(&status)?,
                }),
            )?;
            Ok(())
        })
        .await
    }

    async fn revoke(
        &self,
        name: KeyName,
        version: Option<u32>,
        reason: String,
        change: Change,
    ) -> Result<Vec<KeyVersion>, StoreError> {
        self.write(move |ctx| {
            let c = ctx.conn;
            let versions = load_versions(c, Some(&name))?;
            if versions.is_empty() {
                return Err(StoreError::NotFound(name.to_string()));
            }
            if let Some(v) = version
                && !versions.iter().any(|r| r.version.version == v)
            {
                return Err(StoreError::NotFound(format!("{name}@{v}")));
            }
            let status = KeyStatus::Revoked {
                reason: reason.clone(),
                at: change.at,
            };
            let mut revoked = Vec::new();
            for r in versions {
                if version.is_some_and(|v| v != r.version.version) {
                    continue;
                }
                if matches!(r.status, KeyStatus::Destroyed | KeyStatus::Revoked { .. }) {
                    continue;
                }
                update_status(c, &r.version, &status)?;
                revoked.push(r.version);
            }
            let names: Vec<String> = revoked.iter().map(ToString::to_string).collect();
            ctx.append_change(
                AuditKind::KeyChange,
                &change,
                json!({"op": "revoke", "name": name.as_str(), "versions": names, "reason": reason}),
            )?;
            Ok(revoked)
        })
        .await
    }

    async fn set_rotate_every(
        &self,
        name: KeyName,
        rotate_every_ms: Option<u64>,
        change: Change,
    ) -> Result<(), StoreError> {
        let rotate = opt_ms(rotate_every_ms)?;
        self.write(move |ctx| {
            let n = ctx.conn.execute(
                "UPDATE keys SET rotate_every_ms = ?2 WHERE name = ?1",
                params![name.as_str(), rotate],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(name.to_string()));
            }
            ctx.append_change(
                AuditKind::KeyChange,
                &change,
                json!({"op": "rotate_every", "name": name.as_str(), "rotate_every_ms": rotate_every_ms}),
            )?;
            Ok(())
        })
        .await
    }

    async fn list_keys(&self, name: Option<KeyName>) -> Result<Vec<KeyVersionRecord>, StoreError> {
        self.read(move |c| load_versions(c, name.as_ref())).await
    }

    async fn active_version(&self, name: KeyName) -> Result<Option<KeyVersionRecord>, StoreError> {
        self.read(move |c| {
            Ok(load_versions(c, Some(&name))?
                .into_iter()
                .find(|r| r.status == KeyStatus::Active))
        })
        .await
    }

    async fn keys_due_for_rotation(
        &self,
        now: UnixMillis,
    ) -> Result<Vec<KeyVersionRecord>, StoreError> {
        self.read(move |c| {
            Ok(load_versions(c, None)?
                .into_iter()
                .filter(|r| {
                    r.status == KeyStatus::Active
                        && r.rotate_every_ms.is_some_and(|every| {
                            let since = r.activated_at.unwrap_or(r.created_at);
                            since.plus_ms(every) <= now
                        })
                })
                .collect())
        })
        .await
    }

    async fn freeze(&self, reason: String, change: Change) -> Result<(), StoreError> {
        let at = ms(change.at)?;
        self.write(move |ctx| {
            ctx.conn.execute(
                "UPDATE freeze SET frozen = 1, reason = ?1, by_identity = ?2, at = ?3 WHERE id = 1",
                params![reason, change.identity, at],
            )?;
            ctx.append_change(
                AuditKind::Freeze,
                &change,
                json!({"op": "freeze", "reason": reason}),
            )?;
            Ok(())
        })
        .await
    }

    async fn unfreeze(&self, change: Change) -> Result<(), StoreError> {
        let at = ms(change.at)?;
        self.write(move |ctx| {
            let previous = load_freeze(ctx.conn)?;
            let Some(previous) = previous else {
                return Ok(());
            };
            ctx.conn.execute(
                "UPDATE freeze SET frozen = 0, reason = NULL, by_identity = ?1, at = ?2 WHERE id = 1",
                params![change.identity, at],
            )?;
            ctx.append_change(
                AuditKind::Freeze,
                &change,
                json!({"op": "unfreeze", "frozen_by": previous.by, "frozen_reason": previous.reason}),
            )?;
            Ok(())
        })
        .await
    }

    async fn freeze_state(&self) -> Result<Option<Freeze>, StoreError> {
        self.read(load_freeze).await
    }

    async fn pause_key(
        &self,
        name: KeyName,
        until: UnixMillis,
        reason: String,
        change: Change,
    ) -> Result<(), StoreError> {
        let until_ms = ms(until)?;
        self.write(move |ctx| {
            let n = ctx.conn.execute(
                "UPDATE keys SET paused_until = ?2, pause_reason = ?3 WHERE name = ?1",
                params![name.as_str(), until_ms, reason],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(name.to_string()));
            }
            ctx.append_change(
                AuditKind::Freeze,
                &change,
                json!({"op": "pause", "name": name.as_str(), "until": until.0, "reason": reason}),
            )?;
            Ok(())
        })
        .await
    }

    async fn unpause_key(&self, name: KeyName, change: Change) -> Result<(), StoreError> {
        self.write(move |ctx| {
            let n = ctx.conn.execute(
                "UPDATE keys SET paused_until = NULL, pause_reason = NULL WHERE name = ?1",
                [name.as_str()],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(name.to_string()));
            }
            ctx.append_change(
                AuditKind::Freeze,
                &change,
                json!({"op": "unpause", "name": name.as_str()}),
            )?;
            Ok(())
        })
        .await
    }

    async fn record_key_result(
        &self,
        name: KeyName,
        success: bool,
        change: Change,
    ) -> Result<u32, StoreError> {
        self.write(move |ctx| {
            let failures: Option<i64> = ctx
                .conn
                .query_row(
                    "UPDATE keys SET consecutive_failures =
                       CASE WHEN ?2 THEN 0 ELSE consecutive_failures + 1 END
                     WHERE name = ?1 RETURNING consecutive_failures",
                    params![name.as_str(), success],
                    |r| r.get(0),
                )
                .optional()?;
            let failures = failures.ok_or_else(|| StoreError::NotFound(name.to_string()))?;
            let failures = u32::try_from(failures).unwrap_or(u32::MAX);
            ctx.append_change(
                AuditKind::Event,
                &change,
                json!({
                    "op": "key_result",
                    "name": name.as_str(),
                    "success": success,
                    "consecutive_failures": failures,
                }),
            )?;
            Ok(failures)
        })
        .await
    }

    async fn key_control(&self, name: KeyName) -> Result<KeyControl, StoreError> {
        self.read(move |c| {
            c.query_row(
                "SELECT paused_until, pause_reason, consecutive_failures FROM keys WHERE name = ?1",
                [name.as_str()],
                |r| {
                    Ok(KeyControl {
                        paused_until: r.get::<_, Option<i64>>(0)?.map(from_ms),
                        pause_reason: r.get(1)?,
                        consecutive_failures: u32::try_from(r.get::<_, i64>(2)?)
                            .unwrap_or(u32::MAX),
                    })
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(name.to_string()))
        })
        .await
    }

    async fn create_pending(&self, p: PendingRequest, change: Change) -> Result<(), StoreError> {
        let created = ms(p.created_at)?;
        let expires = ms(p.expires_at)?;
        let request = json_text(&p.request)?;
        let approvals = json_text(&p.approvals_required)?;
        self.write(move |ctx| {
            let exists: Option<i64> = ctx
                .conn
                .query_row("SELECT 1 FROM pending WHERE id = ?1", [p.id.as_str()], |r| {
                    r.get(0)
                })
                .optional()?;
            if exists.is_some() {
                return Err(StoreError::Conflict(format!(
                    "pending request {} exists",
                    p.id
                )));
            }
            ctx.conn.execute(
                "INSERT INTO pending
                   (id, key_name, identity, request, digest, approvals, created_at, expires_at, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    p.id.as_str(),
                    p.key.as_str(),
                    p.identity,
                    request,
                    p.digest.as_slice(),
                    approvals,
                    created,
                    expires,
                    p.status.as_str()
                ],
            )?;
            ctx.append_change(
                AuditKind::Pending,
                &Change {
                    request_id: Some(p.id.to_string()),
                    ..change
                },
                json!({
                    "op": "create",
                    "key": p.key.as_str(),
                    "requested_by": p.identity,
                    "digest": hex32(&p.digest),
                    "expires_at": p.expires_at.0,
                    "approvals_required": p.approvals_required,
                    "status": p.status.as_str(),
                }),
            )?;
            Ok(())
        })
        .await
    }

    async fn add_approval(&self, a: Approval, change: Change) -> Result<ApprovalTally, StoreError> {
        let at = ms(a.at)?;
        let expires = ms(a.expires_at)?;
        self.write(move |ctx| {
            let c = ctx.conn;
            let row: Option<(String, i64)> = c
                .query_row(
                    "SELECT status, expires_at FROM pending WHERE id = ?1",
                    [a.pending_id.as_str()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let (status, pending_expires) =
                row.ok_or_else(|| StoreError::NotFound(format!("pending {}", a.pending_id)))?;
            if status != PendingStatus::Pending.as_str() {
                return Err(StoreError::Conflict(format!(
                    "pending request {} is {status}",
                    a.pending_id
                )));
            }
            if pending_expires <= at {
                return Err(StoreError::Conflict(format!(
                    "pending request {} has expired",
                    a.pending_id
                )));
            }
            if expires <= at {
                return Err(StoreError::Invalid("the approval has expired".into()));
            }
            let counted = c.execute(
                "INSERT INTO approvals (pending_id, approver, signature, expires_at, at)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (pending_id, approver) DO NOTHING",
                params![
                    a.pending_id.as_str(),
                    a.approver.as_slice(),
                    a.signature,
                    expires,
                    at
                ],
            )? == 1;
            let approvers = {
                let mut stmt = c.prepare_cached(
                    "SELECT approver FROM approvals WHERE pending_id = ?1 AND expires_at > ?2
                     ORDER BY approver",
                )?;
                let rows = stmt.query_map(params![a.pending_id.as_str(), at], |r| {
                    r.get::<_, Vec<u8>>(0)
                })?;
                let mut out = Vec::new();
                for r in rows {
                    out.push(address(&r?)?);
                }
                out
            };
            if counted {
                ctx.append_change(
                    AuditKind::Approval,
                    &Change {
                        request_id: Some(a.pending_id.to_string()),
                        ..change
                    },
                    json!({
                        "approver": format!("{:#x}", a.approver),
                        "signature": format!("0x{}", hex::encode(&a.signature)),
                        "expires_at": a.expires_at.0,
                        "approvals": approvers.len(),
                    }),
                )?;
            }
            Ok(ApprovalTally { counted, approvers })
        })
        .await
    }

    async fn pending_backlog(
        &self,
        now: UnixMillis,
    ) -> Result<(u64, Option<UnixMillis>), StoreError> {
        let now = ms(now)?;
        self.read(move |c| {
            let (count, oldest) = c.query_row(
                "SELECT count(*), min(created_at) FROM pending
                 WHERE status = 'pending' AND expires_at > ?1",
                [now],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?)),
            )?;
            Ok((u64::try_from(count).unwrap_or(0), oldest.map(from_ms)))
        })
        .await
    }

    async fn pending(
        &self,
        id: RequestId,
    ) -> Result<Option<(PendingRequest, Vec<Approval>)>, StoreError> {
        self.read(move |c| {
            let p = c
                .query_row(
                    "SELECT key_name, identity, request, digest, approvals, created_at, expires_at,
                            status
                     FROM pending WHERE id = ?1",
                    [id.as_str()],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, Vec<u8>>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, i64>(5)?,
                            r.get::<_, i64>(6)?,
                            r.get::<_, String>(7)?,
                        ))
                    },
                )
                .optional()?;
            let Some((key, identity, request, digest, approvals, created, expires, status)) = p
            else {
                return Ok(None);
            };
            let pending = PendingRequest {
                id: id.clone(),
                key: KeyName::new(key)?,
                identity,
                request: parse_json(&request)?,
                digest: b256(&digest)?,
                approvals_required: parse_json(&approvals)?,
                created_at: from_ms(created),
                expires_at: from_ms(expires),
                status: PendingStatus::parse(&status).ok_or_else(|| corrupt("pending status"))?,
            };
            let mut stmt = c.prepare_cached(
                "SELECT approver, signature, expires_at, at FROM approvals WHERE pending_id = ?1
                 ORDER BY at, approver",
            )?;
            let rows = stmt.query_map([id.as_str()], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            let mut list = Vec::new();
            for row in rows {
                let (approver, signature, expires, at) = row?;
                list.push(Approval {
                    pending_id: id.clone(),
                    approver: address(&approver)?,
                    signature,
                    expires_at: from_ms(expires),
                    at: from_ms(at),
                });
            }
            Ok(Some((pending, list)))
        })
        .await
    }

    async fn set_pending_status(
        &self,
        id: RequestId,
        status: PendingStatus,
        change: Change,
    ) -> Result<(), StoreError> {
        self.write(move |ctx| {
            let current: Option<String> = ctx
                .conn
                .query_row(
                    "SELECT status FROM pending WHERE id = ?1",
                    [id.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            let current = current.ok_or_else(|| StoreError::NotFound(format!("pending {id}")))?;
            let current =
                PendingStatus::parse(&current).ok_or_else(|| corrupt("pending status"))?;
            let allowed = matches!(
                (current, status),
                (PendingStatus::Pending, _)
                    | (PendingStatus::Approved, PendingStatus::Executed)
                    | (PendingStatus::Approved, PendingStatus::Expired)
                    | (PendingStatus::Approved, PendingStatus::Rejected)
            ) && current != status;
            if !allowed {
                return Err(StoreError::Conflict(format!(
                    "pending request {id} cannot go from {} to {}",
                    current.as_str(),
                    status.as_str()
                )));
            }
            ctx.conn.execute(
                "UPDATE pending SET status = ?2 WHERE id = ?1",
                params![id.as_str(), status.as_str()],
            )?;
            ctx.append_change(
                AuditKind::Pending,
                &Change {
                    request_id: Some(id.to_string()),
                    ..change
                },
                json!({"op": "status", "from": current.as_str(), "to": status.as_str()}),
            )?;
            Ok(())
        })
        .await
    }

    async fn insert_grant(&self, g: Grant, change: Change) -> Result<(), StoreError> {
        WindowKey::grant(&g.id)?;
        let created = ms(g.created_at)?;
        let expires = ms(g.expires_at)?;
        let grant = json_text(&g.grant)?;
        let signatures = json_text(&g.signatures)?;
        self.write(move |ctx| {
            let exists: Option<i64> = ctx
                .conn
                .query_row("SELECT 1 FROM grants WHERE id = ?1", [g.id.as_str()], |r| {
                    r.get(0)
                })
                .optional()?;
            if exists.is_some() {
                return Err(StoreError::Conflict(format!("grant {} exists", g.id)));
            }
            ctx.conn.execute(
                "INSERT INTO grants (id, grant_json, signatures, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![g.id, grant, signatures, created, expires],
            )?;
            ctx.append_change(
                AuditKind::Grant,
                &change,
                json!({
                    "op": "create",
                    "id": g.id,
                    "grant": g.grant,
                    "signatures": g.signatures,
                    "expires_at": g.expires_at.0,
                }),
            )?;
            Ok(())
        })
        .await
    }

    async fn grant(&self, id: String) -> Result<Option<GrantRecord>, StoreError> {
        self.read(move |c| {
            let row = c
                .query_row(
                    "SELECT grant_json, signatures, created_at, expires_at FROM grants WHERE id = ?1",
                    [id.as_str()],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                        ))
                    },
                )
                .optional()?;
            let Some((grant, signatures, created, expires)) = row else {
                return Ok(None);
            };
            let spent = window_sum(c, &WindowKey::grant(&id)?, i64::MIN)?;
            Ok(Some(GrantRecord {
                grant: Grant {
                    id,
                    grant: parse_json(&grant)?,
                    signatures: parse_json(&signatures)?,
                    created_at: from_ms(created),
                    expires_at: from_ms(expires),
                },
                spent,
            }))
        })
        .await
    }

    async fn list_grants(
        &self,
        unexpired_at: Option<UnixMillis>,
    ) -> Result<Vec<GrantRecord>, StoreError> {
        let after = match unexpired_at {
            Some(t) => ms(t)?,
            None => i64::MIN,
        };
        self.read(move |c| {
            let mut stmt = c.prepare(
                "SELECT id, grant_json, signatures, created_at, expires_at FROM grants
                 WHERE expires_at > ?1 ORDER BY created_at DESC, id",
            )?;
            let rows = stmt
                .query_map([after], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(id, grant, signatures, created, expires)| {
                    let spent = window_sum(c, &WindowKey::grant(&id)?, i64::MIN)?;
                    Ok(GrantRecord {
                        grant: Grant {
                            id,
                            grant: parse_json(&grant)?,
                            signatures: parse_json(&signatures)?,
                            created_at: from_ms(created),
                            expires_at: from_ms(expires),
                        },
                        spent,
                    })
                })
                .collect()
        })
        .await
    }

    async fn append_audit(&self, entry: AuditEntry) -> Result<AuditRecord, StoreError> {
        if entry.kind == AuditKind::Checkpoint {
            return Err(StoreError::Invalid(
                "checkpoints are appended with append_checkpoint".into(),
            ));
        }
        entry.validate()?;
        ms(entry.at)?;
        self.write(move |ctx| ctx.append(entry)).await
    }

    async fn append_checkpoint(
        &self,
        cp: CheckpointPayload,
        at: UnixMillis,
    ) -> Result<AuditRecord, StoreError> {
        cp.verify_signature(cp.signer)
            .map_err(|e| StoreError::Invalid(format!("checkpoint: {e}")))?;
        ms(at)?;
        self.write(move |ctx| {
            let seq = i64::try_from(cp.seq).map_err(|_| StoreError::Invalid("seq".into()))?;
            let hash: Option<Vec<u8>> = ctx
                .conn
                .query_row("SELECT hash FROM audit WHERE seq = ?1", [seq], |r| r.get(0))
                .optional()?;
            match hash {
                Some(h) if h.as_slice() == cp.hash.as_slice() => {}
                Some(_) => {
                    return Err(StoreError::Invalid(format!(
                        "checkpoint hash does not match record {}",
                        cp.seq
                    )));
                }
                None => return Err(StoreError::NotFound(format!("audit record {}", cp.seq))),
            }
            ctx.append(AuditEntry {
                at,
                kind: AuditKind::Checkpoint,
                request_id: None,
                identity: None,
                payload: cp.to_json(),
            })
        })
        .await
    }

    async fn audit_head(&self) -> Result<Option<(u64, B256)>, StoreError> {
        self.read(read_head).await
    }

    async fn last_checkpoint_seq(&self) -> Result<Option<u64>, StoreError> {
        self.read(|c| {
            let s: Option<i64> = c.query_row(
                "SELECT MAX(seq) FROM audit WHERE kind = 'checkpoint'",
                [],
                |r| r.get(0),
            )?;
            s.map(seq_u64).transpose()
        })
        .await
    }

    async fn audit_records(
        &self,
        from: AuditCursor,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            let start: Option<i64> = match from {
                AuditCursor::Seq(s) => Some(i64::try_from(s).unwrap_or(i64::MAX)),
                AuditCursor::Time(t) => c.query_row(
                    "SELECT MIN(seq) FROM audit WHERE at >= ?1",
                    [i64::try_from(t.0).unwrap_or(i64::MAX)],
                    |r| r.get(0),
                )?,
            };
            let Some(start) = start else {
                return Ok(Vec::new());
            };
            let mut stmt = c.prepare_cached(
                "SELECT seq, prev_hash, at, kind, request_id, identity, payload, hash
                 FROM audit WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![start, limit])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(audit_row(row)?);
            }
            Ok(out)
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// The writer thread and its jobs.

/// One queued write: runs inside the batch transaction, answers after the commit.
trait Job: Send {
    fn run(self: Box<Self>, ctx: &mut WriteCtx<'_>) -> Box<dyn Reply>;
    fn abort(self: Box<Self>, error: StoreError);
    /// Whether this job is answered only once an fsync covers its commit (see `Syncer`).
    fn durable(&self) -> bool {
        true
    }
    /// Whether this is a queued outcome (counted in [`CommitCounters::queued`]).
    fn queued(&self) -> bool {
        false
    }
}

/// A job's answer, held until its batch commits (or fails to).
trait Reply: Send {
    fn send(self: Box<Self>, commit: Result<(), String>);
}

struct ClosureJob<T, F> {
    f: F,
    tx: oneshot::Sender<Result<T, StoreError>>,
    durable: bool,
    guard: Guard,
}

/// How a job's writes are undone when it fails inside a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guard {
    /// In a `SAVEPOINT`: a failed job is rolled back alone and the batch goes on. SQLite copies
    /// every page the job changes first to the savepoint's statement journal (about a tenth of
    /// the writer's instructions on the signing path).
    Savepoint,
    /// For a job that refuses before its first write, so that only a database error can fail
    /// it after writing (the signing path's decisions and outcomes): no savepoint; a job that
    /// fails after writing breaks the batch, whose every job then fails and nothing commits
    /// (see [`WriteCtx::writes_last`]).
    WritesLast,
}

impl<T, F> Job for ClosureJob<T, F>
where
    T: Send + 'static,
    F: FnOnce(&mut WriteCtx<'_>) -> Result<T, StoreError> + Send + 'static,
{
    fn run(self: Box<Self>, ctx: &mut WriteCtx<'_>) -> Box<dyn Reply> {
        let Self { f, tx, guard, .. } = *self;
        let result = match guard {
            Guard::Savepoint => ctx.in_savepoint(f),
            Guard::WritesLast => ctx.writes_last(f),
        };
        Box::new(HeldReply { result, tx })
    }

    fn abort(self: Box<Self>, error: StoreError) {
        let _ = self.tx.send(Err(error));
    }

    fn durable(&self) -> bool {
        self.durable
    }
}

/// A signature's outcome queued by [`Store::queue_outcome`]: its caller waits for the commit
/// (not for an fsync); a failure is logged.
struct QueuedOutcome {
    outcome: OutcomeTx,
    /// Dropped or sent once the batch was committed (or failed to).
    done: oneshot::Sender<()>,
}

impl Job for QueuedOutcome {
    fn run(self: Box<Self>, ctx: &mut WriteCtx<'_>) -> Box<dyn Reply> {
        let Self { outcome: o, done } = *self;
        let request_id = o.request_id.clone();
        let result = ctx.writes_last(|ctx| outcome(ctx, o).map(|_| ()));
        Box::new(LoggedReply {
            result,
            request_id,
            done,
        })
    }

    fn abort(self: Box<Self>, error: StoreError) {
        tracing::error!(%error, request_id = %self.outcome.request_id,
            "cannot record a signature outcome");
    }

    fn durable(&self) -> bool {
        false
    }

    fn queued(&self) -> bool {
        true
    }
}

struct LoggedReply {
    result: Result<(), StoreError>,
    request_id: RequestId,
    done: oneshot::Sender<()>,
}

impl Reply for LoggedReply {
    fn send(self: Box<Self>, commit: Result<(), String>) {
        let _ = self.done.send(());
        let error = match (self.result, commit) {
            (Err(e), _) => e.to_string(),
            (Ok(()), Err(e)) => e,
            (Ok(()), Ok(())) => return,
        };
        // The decision record (durable before the signature was made) still covers it.
        tracing::error!(%error, request_id = %self.request_id,
            "cannot record a signature outcome");
    }
}

struct HeldReply<T> {
    result: Result<T, StoreError>,
    tx: oneshot::Sender<Result<T, StoreError>>,
}

impl<T: Send> Reply for HeldReply<T> {
    fn send(self: Box<Self>, commit: Result<(), String>) {
        let out = match (self.result, commit) {
            (Err(e), _) => Err(e),
            (Ok(v), Ok(())) => Ok(v),
            (Ok(_), Err(e)) => Err(StoreError::Commit(e)),
        };
        // The caller may have gone away (cancelled); the change is committed regardless.
        let _ = self.tx.send(out);
    }
}

/// The writer connection inside a batch transaction, with the chain head as of this point.
struct WriteCtx<'c> {
    conn: &'c Connection,
    head: Option<(u64, B256)>,
    /// Window state, exact for this transaction (see "Window cache" in the module docs).
    cache: &'c mut WindowCache,
    /// Signatures in progress (for adaptive group commit).
    in_flight: &'c mut InFlight,
    /// Set when a savepoint could not be rolled back: the batch must not commit.
    broken: Option<String>,
    /// Set when a job failed with a database error (not a refusal or a conflict).
    db_failed: bool,
}

impl WriteCtx<'_> {
    /// Runs `f` inside a savepoint; on `Err` everything it wrote (and its audit records) is
    /// rolled back, and the window cache, which may hold what was rolled back, is dropped. A
    /// job that fails without having written anything leaves the cache as it is. A job that
    /// fails after writing while earlier jobs' bucket totals wait in the cache for the batch's
    /// flush breaks the batch: dropping the cache would lose those totals, so everything rolls
    /// back (only database failures fail a job after it wrote).
    fn in_savepoint<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        exec_cached(self.conn, "SAVEPOINT job")?;
        let head = self.head;
        let changes = self.conn.total_changes();
        let dirty_before = self.cache.has_dirty();
        let dirty_generation = self.cache.dirty_generation();
        match f(self) {
            Ok(v) => match exec_cached(self.conn, "RELEASE job") {
                Ok(()) => Ok(v),
                Err(e) => {
                    self.cache.clear();
                    self.broken = Some(e.to_string());
                    Err(e.into())
                }
            },
            Err(err) => {
                if matches!(err, StoreError::Database(_) | StoreError::Commit(_)) {
                    self.db_failed = true;
                }
                self.head = head;
                let touched = self.conn.total_changes() != changes
                    || self.cache.dirty_generation() != dirty_generation;
                if touched && dirty_before {
                    self.cache.clear();
                    self.broken = Some(format!("a write failed inside the batch: {err}"));
                    return Err(err);
                }
                if touched {
                    self.cache.clear();
                }
                let undone = exec_cached(self.conn, "ROLLBACK TO job")
                    .and_then(|()| exec_cached(self.conn, "RELEASE job"));
                if let Err(e) = undone {
                    self.cache.clear();
                    self.broken = Some(format!("rollback failed: {e}"));
                }
                Err(err)
            }
        }
    }

    /// Runs `f`, a job that refuses before its first write ([`Guard::WritesLast`]), without a
    /// savepoint. If it fails after writing (a database error), what it wrote cannot be undone
    /// alone: the batch is broken, so nothing of it commits and every job in it fails. If it
    /// fails before writing, the batch goes on as if it had not run.
    fn writes_last<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let head = self.head;
        let changes = self.conn.total_changes();
        let dirty_generation = self.cache.dirty_generation();
        let result = f(self);
        if let Err(err) = &result {
            if matches!(err, StoreError::Database(_) | StoreError::Commit(_)) {
                self.db_failed = true;
            }
            self.head = head;
            let touched = self.conn.total_changes() != changes
                || self.cache.dirty_generation() != dirty_generation;
            if touched {
                self.cache.clear();
                self.broken = Some(format!("a write failed inside the batch: {err}"));
            }
        }
        result
    }

    /// Appends an audit record after the current head.
    fn append(&mut self, entry: AuditEntry) -> Result<AuditRecord, StoreError> {
        let (record, payload) = entry.seal_with_payload(self.head)?;
        self.conn
            .prepare_cached(
                "INSERT INTO audit (seq, prev_hash, at, kind, request_id, identity, payload, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                i64::try_from(record.seq).map_err(|_| StoreError::Invalid("seq".into()))?,
                record.prev_hash.as_slice(),
                ms(record.at)?,
                record.kind.as_str(),
                record.request_id,
                record.identity,
                payload,
                record.hash.as_slice(),
            ])?;
        self.head = Some((record.seq, record.hash));
        Ok(record)
    }

    /// Appends a record whose payload is already canonical JSON (see
    /// [`crate::audit::seal_canonical`]); returns its `(seq, hash)`.
    fn append_canonical(
        &mut self,
        at: UnixMillis,
        kind: AuditKind,
        request_id: &str,
        identity: &str,
        payload: Vec<u8>,
    ) -> Result<(u64, B256), StoreError> {
        let payload = String::from_utf8(payload).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let (seq, hash) = seal_canonical(
            self.head,
            at,
            kind,
            Some(request_id),
            Some(identity),
            &payload,
        )?;
        self.conn
            .prepare_cached(
                "INSERT INTO audit (seq, prev_hash, at, kind, request_id, identity, payload, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                i64::try_from(seq).map_err(|_| StoreError::Invalid("seq".into()))?,
                self.head.map_or(B256::ZERO, |(_, h)| h).as_slice(),
                ms(at)?,
                kind.as_str(),
                request_id,
                identity,
                payload,
                hash.as_slice(),
            ])?;
        self.head = Some((seq, hash));
        Ok((seq, hash))
    }

    fn append_change(
        &mut self,
        kind: AuditKind,
        change: &Change,
        payload: Value,
    ) -> Result<AuditRecord, StoreError> {
        self.append(AuditEntry {
            at: change.at,
            kind,
            request_id: change.request_id.clone(),
            identity: Some(change.identity.clone()),
            payload,
        })
    }
}

/// The writer's batching settings (from [`SqliteConfig`]).
struct Tuning {
    max_batch: usize,
    linger: Duration,
    linger_siblings: usize,
}

/// Decisions committed by this writer whose outcome it has not written yet: the signatures in
/// progress, i.e. how loaded the pipeline is. An entry older than a minute is dropped (its
/// outcome was never recorded: a signing failure that could not be written, a caller gone).
#[derive(Default)]
struct InFlight {
    started: std::collections::HashMap<String, std::time::Instant>,
    last_purge: Option<std::time::Instant>,
}

impl InFlight {
    const FORGET_AFTER: Duration = Duration::from_secs(60);

    fn len(&self) -> usize {
        self.started.len()
    }

    fn decided(&mut self, id: &RequestId) {
        let now = std::time::Instant::now();
        if self
            .last_purge
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(1))
        {
            self.started
                .retain(|_, at| now.duration_since(*at) < Self::FORGET_AFTER);
            self.last_purge = Some(now);
        }
        self.started.insert(id.as_str().to_owned(), now);
    }

    fn finished(&mut self, id: &RequestId) {
        self.started.remove(id.as_str());
    }
}

/// The writer's helper threads.
struct Helpers<'a> {
    syncer: &'a Syncer,
    checkpointer: &'a Checkpointer,
}

fn writer_loop(
    conn: Connection,
    mut receiver: mpsc::Receiver<Box<dyn Job>>,
    Tuning {
        max_batch,
        linger,
        linger_siblings,
    }: Tuning,
    stats: &CommitCounters,
    Helpers {
        syncer,
        checkpointer,
    }: Helpers<'_>,
) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch);
    let mut cache = WindowCache::default();
    let mut in_flight = InFlight::default();
    let mut last_commit = std::time::Instant::now();
    while let Some(job) = receiver.blocking_recv() {
        batch.push(job);
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // Adaptive group commit (see `SqliteConfig::commit_linger`): a commit costs the writer
        // about as much as the jobs in it (the pages it dirties go to the WAL whole), so under
        // load a batch that comes sooner than `linger` after the last commit waits for the rest
        // of the interval, collecting more jobs. Unloaded, nobody waits.
        let loaded = in_flight.len() >= linger_siblings;
        if !linger.is_zero() && loaded {
            let since = last_commit.elapsed();
            if since < linger && batch.len() < max_batch {
                std::thread::sleep(linger - since);
                while batch.len() < max_batch {
                    match receiver.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
            }
        }
        // Under load, jobs that wait for an fsync gain little from a commit while a sync is
        // running (they wait for the next sync either way): collect more until it ends, so they
        // share one commit. Unloaded, commit at once: the commit's work then overlaps the running
        // sync instead of adding to the decision's latency. A queued outcome (answered at its
        // commit) ends the wait.
        while loaded
            && batch.len() < max_batch
            && batch.iter().all(|j| j.durable())
            && syncer.busy()
        {
            syncer.wait_idle(Duration::from_micros(100));
            while batch.len() < max_batch {
                match receiver.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        stats
            .jobs
            .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let queued = batch.iter().filter(|j| j.queued()).count() as u64;
        checkpointer.restart_if_wanted(&conn);
        if let Err(why) = syncer.recover(&conn) {
            // Fail closed: after a failed fsync nothing commits until the WAL is known to be on
            // disk again (see `Syncer::recover`).
            cache.clear();
            stats
                .failing
                .store(true, std::sync::atomic::Ordering::Release);
            for job in batch.drain(..) {
                job.abort(StoreError::Database(why.clone()));
            }
        } else {
            run_batch(
                &conn,
                (&mut cache, &mut in_flight),
                batch.drain(..),
                stats,
                syncer,
            );
            last_commit = std::time::Instant::now();
            stats
                .in_flight
                .store(in_flight.len() as u64, std::sync::atomic::Ordering::Relaxed);
            checkpointer.committed();
        }
        stats
            .queued
            .fetch_sub(queued, std::sync::atomic::Ordering::AcqRel);
    }
    syncer.close();
    checkpointer.close();
}

/// Copies the WAL into the database file off the writer's path: SQLite's automatic checkpoint would
/// run inside a commit on the writer thread (every 1000 pages: thousands of page writes and two
/// fsyncs), stalling every request queued behind it. This thread runs a `PASSIVE` checkpoint (which
/// never blocks the writer) at most every [`SqliteConfig::checkpoint_interval`] after new commits;
/// SQLite restarts the WAL from its beginning at the writer's next transaction once a checkpoint
/// has caught up. Under load without a pause it may never catch up exactly, so past
/// [`SqliteConfig::wal_restart_frames`] frames the writer runs a `RESTART` checkpoint itself before
/// its next batch (short: the frames are already copied), which bounds the WAL file.
#[derive(Default)]
struct Checkpointer {
    state: Mutex<CheckpointState>,
    wake: std::sync::Condvar,
    restart: std::sync::atomic::AtomicBool,
    /// [`SqliteConfig::wal_restart_frames`].
    restart_frames: u64,
    /// [`SqliteConfig::checkpoint_interval`].
    interval: Duration,
}

#[derive(Default)]
struct CheckpointState {
    /// Commits since the last checkpoint.
    commits: u64,
    closing: bool,
}

impl Checkpointer {
    fn lock(&self) -> std::sync::MutexGuard<'_, CheckpointState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn committed(&self) {
        self.lock().commits += 1;
    }

    fn close(&self) {
        self.lock().closing = true;
        self.wake.notify_one();
    }

    fn run(&self, conn: &Connection, stats: &CommitCounters) {
        loop {
            {
                let st = self.lock();
                let (st, _) = self
                    .wake
                    .wait_timeout_while(st, self.interval, |st| !st.closing)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if st.closing {
                    return;
                }
                if st.commits == 0 {
                    continue;
                }
            }
            self.lock().commits = 0;
            let result: Result<(i64, i64, i64), _> =
                conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                });
            if let Ok((_, frames, copied)) = result {
                use std::sync::atomic::Ordering::Relaxed;
                stats.checkpoints.fetch_add(1, Relaxed);
                stats
                    .wal_frames
                    .store(u64::try_from(frames).unwrap_or(0), Relaxed);
                stats
                    .wal_copied
                    .store(u64::try_from(copied).unwrap_or(0), Relaxed);
            }
            match result {
                Ok((_, frames, _)) if u64::try_from(frames).unwrap_or(0) >= self.restart_frames => {
                    self.restart
                        .store(true, std::sync::atomic::Ordering::Release);
                }
                Ok(_) => {}
                // A full disk or an I/O error: the writer and the sync thread see it too; the
                // WAL keeps every commit meanwhile.
                Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
            }
        }
    }

    /// On the writer thread, before a batch: the `RESTART` checkpoint asked for by `run`.
    fn restart_if_wanted(&self, conn: &Connection) {
        if !self
            .restart
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let result: Result<i64, _> =
            conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get(0));
        match result {
            Ok(0) => {}
            // Busy (a reader on old frames): try again before the next batch.
            Ok(_) => self
                .restart
                .store(true, std::sync::atomic::Ordering::Release),
            Err(e) => tracing::warn!(error = %e, "WAL restart checkpoint failed"),
        }
    }
}

/// One transaction for every job in the batch. The commit writes the WAL without an fsync
/// (`synchronous=NORMAL`); a job that is not `durable` (a queued outcome) is answered right after
/// it, every other job once the [`Syncer`] has fsynced the WAL past this commit — so the writer
/// goes on with the next batch while the disk syncs this one.
fn run_batch(
    conn: &Connection,
    (cache, in_flight): (&mut WindowCache, &mut InFlight),
    jobs: impl Iterator<Item = Box<dyn Job>>,
    stats: &CommitCounters,
    syncer: &Syncer,
) {
    if let Err(e) = exec_cached(conn, "BEGIN IMMEDIATE") {
        let msg = format!("cannot begin a write transaction: {e}");
        stats
            .failing
            .store(true, std::sync::atomic::Ordering::Release);
        for job in jobs {
            job.abort(StoreError::Database(msg.clone()));
        }
        return;
    }
    // Re-read the head inside the write lock: another store instance may have appended. For the
    // same reason, drop the window cache if another connection committed since the last batch.
    let head = match cache.begin_batch(conn).and_then(|()| read_head(conn)) {
        Ok(h) => h,
        Err(e) => {
            cache.clear();
            let _ = exec_cached(conn, "ROLLBACK");
            stats
                .failing
                .store(true, std::sync::atomic::Ordering::Release);
            for job in jobs {
                job.abort(StoreError::Database(format!(
                    "cannot read the audit head: {e}"
                )));
            }
            return;
        }
    };
    let changes_before = conn.total_changes();
    let mut ctx = WriteCtx {
        conn,
        head,
        cache,
        in_flight,
        broken: None,
        db_failed: false,
    };
    let mut replies = Vec::new();
    for job in jobs {
        if let Some(why) = &ctx.broken {
            job.abort(StoreError::Commit(why.clone()));
        } else {
            let durable = job.durable();
            replies.push((durable, job.run(&mut ctx)));
        }
    }
    // The batch's bucket totals go to the database once, just before the commit.
    let commit = match ctx.broken {
        Some(why) => Err(why),
        None => ctx
            .cache
            .flush(conn)
            .map_err(|e| format!("cannot write window buckets: {e}"))
            .and_then(|()| exec_cached(conn, "COMMIT").map_err(|e| e.to_string())),
    };
    if commit.is_err() || ctx.db_failed {
        // A failed commit, or a job refused by the database (disk full, I/O error): the store
        // is failing writes until a batch commits changes again.
        stats
            .failing
            .store(true, std::sync::atomic::Ordering::Release);
    }
    // Only a commit that wrote something shows the store can write again (an empty commit
    // succeeds on a full disk); if it must be durable, only once its sync succeeded.
    let wrote = !ctx.db_failed && conn.total_changes() > changes_before;
    match commit {
        Err(e) => {
            ctx.cache.clear();
            let _ = exec_cached(conn, "ROLLBACK");
            for (_, reply) in replies {
                reply.send(Err(e.clone()));
            }
        }
        Ok(()) => {
            stats
                .commits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut held = Vec::new();
            for (durable, reply) in replies {
                if durable {
                    held.push(reply);
                } else {
                    reply.send(Ok(()));
                }
            }
            if held.is_empty() {
                stats
                    .unsynced
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if wrote {
                    stats
                        .failing
                        .store(false, std::sync::atomic::Ordering::Release);
                }
            }
            syncer.committed(held, wrote);
        }
    }
}

/// Makes the writer's commits durable: the writer commits with `synchronous=NORMAL` (its WAL
/// frames are written, not fsynced) and hands the answers that must be durable to this thread,
/// which `fdatasync`s the WAL file and then answers every commit written before the sync began.
/// One sync covers every commit before it (the WAL is one append-only file), so a sync in
/// progress never holds up the writer, and commits that arrive during it share the next one.
///
/// A failed sync answers every waiting job with an error and stops all writes: after a failed
/// `fdatasync` the kernel no longer promises that the frames written before it reach the disk
/// (a later sync may succeed without writing them), so the writer must not build on them. It
/// recovers only through a `TRUNCATE` checkpoint (every frame copied into the database file and
/// fsynced there, the WAL emptied) — [`Syncer::recover`].
struct Syncer {
    state: Mutex<SyncState>,
    wake: std::sync::Condvar,
    /// Signalled when a sync ends.
    idle: std::sync::Condvar,
    /// The WAL file (`<db>-wal`), opened by this process to sync it.
    wal: std::fs::File,
}

#[derive(Default)]
struct SyncState {
    /// Commits written by the writer so far.
    written: u64,
    /// Answers waiting for a sync that covers the commit they belong to.
    waiting: std::collections::VecDeque<(u64, Box<dyn Reply>)>,
    /// Why writes stopped (a failed sync), until [`Syncer::recover`] succeeds.
    failed: Option<String>,
    closing: bool,
    /// A sync is running.
    syncing: bool,
    /// The latest commit that wrote changes and waits for its sync: once synced, the store
    /// writes again (clears [`CommitCounters::failing`]).
    clears_failing: Option<u64>,
}

impl Syncer {
    fn open(db: &Path) -> Result<Self, StoreError> {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        let wal = std::fs::OpenOptions::new()
            .read(true)
            .open(&wal)
            .map_err(|e| StoreError::Database(format!("cannot open the WAL file: {e}")))?;
        // The WAL's directory entry must be on disk too (it may have just been created).
        if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| {
                    StoreError::Database(format!("cannot sync the store directory: {e}"))
                })?;
        }
        Ok(Self {
            state: Mutex::new(SyncState::default()),
            wake: std::sync::Condvar::new(),
            idle: std::sync::Condvar::new(),
            wal,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        // The state stays consistent under a panic in another thread (each change is one step).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A commit was written; `held` are its answers that wait for it to be durable; `wrote`,
    /// whether it changed anything (then its successful sync clears `failing`).
    fn committed(&self, held: Vec<Box<dyn Reply>>, wrote: bool) {
        let mut st = self.lock();
        st.written += 1;
        let n = st.written;
        if held.is_empty() {
            return;
        }
        if wrote {
            st.clears_failing = Some(n);
        }
        if let Some(why) = st.failed.clone() {
            drop(st);
            for reply in held {
                reply.send(Err(why.clone()));
            }
            return;
        }
        st.waiting.extend(held.into_iter().map(|r| (n, r)));
        drop(st);
        self.wake.notify_one();
    }

    /// Whether a sync is running.
    fn busy(&self) -> bool {
        self.lock().syncing
    }

    /// Waits until no sync runs, for at most `limit`.
    fn wait_idle(&self, limit: Duration) {
        let st = self.lock();
        if st.syncing {
            let _ = self
                .idle
                .wait_timeout_while(st, limit, |st| st.syncing)
                .map_err(|_| ());
        }
    }

    /// The writer has stopped: answer what waits, then the sync thread ends.
    fn close(&self) {
        self.lock().closing = true;
        self.wake.notify_one();
    }

    /// The sync thread.
    fn run(&self, stats: &CommitCounters) {
        loop {
            let target = {
                let mut st = self.lock();
                while st.waiting.is_empty() && !st.closing {
                    st = self
                        .wake
                        .wait(st)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if st.waiting.is_empty() {
                    return;
                }
                st.syncing = true;
                st.written
            };
            let synced = self.wal.sync_data();
            let mut done = Vec::new();
            let mut st = self.lock();
            st.syncing = false;
            self.idle.notify_all();
            match synced {
                Ok(()) => {
                    if st.clears_failing.is_some_and(|n| n <= target) {
                        st.clears_failing = None;
                        stats
                            .failing
                            .store(false, std::sync::atomic::Ordering::Release);
                    }
                    while st.waiting.front().is_some_and(|(n, _)| *n <= target) {
                        if let Some((_, reply)) = st.waiting.pop_front() {
                            done.push((reply, Ok(())));
                        }
                    }
                }
                Err(e) => {
                    let why = format!("the store's WAL could not be synced to disk: {e}");
                    tracing::error!(error = %e, "fsync of the store's WAL failed; writes stop until it recovers");
                    stats
                        .failing
                        .store(true, std::sync::atomic::Ordering::Release);
                    st.failed = Some(why.clone());
                    st.clears_failing = None;
                    done.extend(st.waiting.drain(..).map(|(_, r)| (r, Err(why.clone()))));
                }
            }
            drop(st);
            stats
                .syncs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for (reply, result) in done {
                reply.send(result);
            }
        }
    }

    /// Ok when writes may go on. After a failed sync, tries a `TRUNCATE` checkpoint: SQLite
    /// syncs the WAL, copies every frame into the database file, syncs it and empties the WAL;
    /// only when all of that succeeds are the earlier commits known to be on disk.
    fn recover(&self, conn: &Connection) -> Result<(), String> {
        let Some(why) = self.lock().failed.clone() else {
            return Ok(());
        };
        let checkpoint: Result<(i64, i64, i64), _> =
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            });
        match checkpoint {
            Ok((0, _, _)) if self.wal.sync_data().is_ok() => {
                tracing::warn!(
                    "store recovered from a failed fsync (WAL checkpointed and emptied)"
                );
                self.lock().failed = None;
                Ok(())
            }
            Ok(_) => Err(format!(
                "{why} (recovery checkpoint could not complete yet)"
            )),
            Err(e) => Err(format!("{why} (recovery checkpoint failed: {e})")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The decision and outcome transactions.

fn validate_decision(d: &DecisionTx) -> Result<(), StoreError> {
    ms(d.at)?;
    check_object(&d.details)?;
    let mut seen = std::collections::HashSet::new();
    for r in &d.reservations {
        if !seen.insert(r.window.as_str()) {
            return Err(StoreError::Invalid(format!(
                "window {} appears twice in one decision",
                r.window
            )));
        }
    }
    Ok(())
}

/// `Ok(Err(refusal))` keeps the refusal's audit record; `Err` rolls the whole job back.
fn decide(
    ctx: &mut WriteCtx<'_>,
    d: &DecisionTx,
) -> Result<Result<DecisionReceipt, Refusal>, StoreError> {
    if let Some(stored) = load_request(ctx.conn, &d.request_id)? {
        return Ok(Err(Refusal::DuplicateRequest(Box::new(stored))));
    }
    // Every check runs before the first write, so a refusal has nothing to roll back.
    let at = ms(d.at)?;
    match check_decision(ctx, d, at) {
        Ok(()) => {
            let receipt = write_decision(ctx, d, at)?;
            ctx.in_flight.decided(&d.request_id);
            Ok(Ok(receipt))
        }
        Err(StoreError::Refused(refusal)) => {
            let mut payload = json!({
                "code": refusal.code(),
                "reason": refusal.to_string(),
                "key": d.key.to_string(),
                "digest": hex32(&d.digest),
                "details": d.details,
            });
            if let Refusal::LimitExceeded {
                window,
                spent,
                amount,
                limit,
            } = &refusal
            {
                payload["window"] = json!(window.as_str());
                payload["spent"] = json!(spent.to_string());
                payload["amount"] = json!(amount.to_string());
                payload["limit"] = json!(limit.to_string());
            }
            ctx.append(AuditEntry {
                at: d.at,
                kind: AuditKind::Refusal,
                request_id: Some(d.request_id.to_string()),
                identity: Some(d.identity.clone()),
                payload,
            })?;
            Ok(Err(refusal))
        }
        Err(e) => Err(e),
    }
}

/// Freeze, key status, pause and every window's limit; writes nothing.
fn check_decision(ctx: &mut WriteCtx<'_>, d: &DecisionTx, at: i64) -> Result<(), StoreError> {
    let c = ctx.conn;
    if let Some(freeze) = load_freeze(c)? {
        return Err(StoreError::Refused(Refusal::Frozen(freeze)));
    }
    let status: Option<(String, String)> = c
        .prepare_cached("SELECT state, status FROM key_versions WHERE name = ?1 AND version = ?2")?
        .query_row(params![d.key.name.as_str(), d.key.version], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let (state, status) =
        status.ok_or_else(|| StoreError::Refused(Refusal::UnknownKey(d.key.clone())))?;
    // `active` carries no data and is always signable; any other state is parsed for its details.
    if state != "active" {
        let status = parse_status(&status)?;
        if !status.signable(d.at, d.allow_retiring) {
            return Err(StoreError::Refused(Refusal::KeyNotSignable {
                key: d.key.clone(),
                status,
            }));
        }
    }
    let paused: Option<i64> = c
        .prepare_cached("SELECT paused_until FROM keys WHERE name = ?1")?
        .query_row([d.key.name.as_str()], |r| r.get(0))?;
    if let Some(until) = paused
        && until > at
    {
        return Err(StoreError::Refused(Refusal::KeyPaused {
            name: d.key.name.clone(),
            until: from_ms(until),
        }));
    }
    // Window keys are distinct (validated), so checking every window before reserving any gives
    // the same answers as checking each just before its own reservation.
    for r in &d.reservations {
        let spent = ctx
            .cache
            .sum(c, r.window.as_str(), since(at, r.duration_ms), at)?;
        let total = spent.checked_add(r.amount);
        if total.is_none_or(|t| t > r.limit) {
            return Err(StoreError::Refused(Refusal::LimitExceeded {
                window: r.window.clone(),
                spent,
                amount: r.amount,
                limit: r.limit,
            }));
        }
    }
    Ok(())
}

/// The request row, every reservation and its buckets, and the decision record.
fn write_decision(
    ctx: &mut WriteCtx<'_>,
    d: &DecisionTx,
    at: i64,
) -> Result<DecisionReceipt, StoreError> {
    let c = ctx.conn;
    let next_seq = ctx.head.map_or(1, |(s, _)| s.saturating_add(1));
    c.prepare_cached(
        "INSERT INTO requests
           (request_id, key_name, key_version, identity, digest, decided_at, state, decision_seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'reserved', ?7)",
    )?
    .execute(params![
        d.request_id.as_str(),
        d.key.name.as_str(),
        d.key.version,
        d.identity,
        d.digest.as_slice(),
        at,
        i64::try_from(next_seq).map_err(|_| StoreError::Invalid("seq".into()))?,
    ])?;
    let mut rows = Vec::with_capacity(d.reservations.len());
    // The decision record's payload, written in canonical form directly (members sorted):
    // {"allow_retiring", "details", "digest", "key", "reservations": [{"amount", "duration_ms",
    // "limit", "window"}, …]}.
    let mut p = Vec::with_capacity(512 + 192 * d.reservations.len());
    p.extend_from_slice(b"{\"allow_retiring\":");
    p.extend_from_slice(if d.allow_retiring { b"true" } else { b"false" });
    p.extend_from_slice(b",\"details\":");
    write_canonical(&mut p, &d.details);
    p.extend_from_slice(b",\"digest\":");
    write_canonical_str(&mut p, &hex32(&d.digest));
    p.extend_from_slice(b",\"key\":");
    write_canonical_str(&mut p, &d.key.to_string());
    p.extend_from_slice(b",\"reservations\":[");
    for (i, r) in d.reservations.iter().enumerate() {
        let expires = i64::try_from(r.duration_ms)
            .ok()
            .and_then(|d| at.checked_add(d))
            .unwrap_or(i64::MAX);
        rows.push((r.window.as_str(), r.amount, expires));
        if i > 0 {
            p.push(b',');
        }
        p.extend_from_slice(b"{\"amount\":");
        write_decimal_str(&mut p, r.amount);
        p.extend_from_slice(b",\"duration_ms\":");
        write_canonical_u64(&mut p, r.duration_ms);
        p.extend_from_slice(b",\"limit\":");
        write_decimal_str(&mut p, r.limit);
        p.extend_from_slice(b",\"window\":");
        write_canonical_str(&mut p, r.window.as_str());
        p.push(b'}');
    }
    p.extend_from_slice(b"]}");
    ctx.cache.reserve(c, d.request_id.as_str(), at, &rows)?;
    let (seq, hash) = ctx.append_canonical(
        d.at,
        AuditKind::Decision,
        d.request_id.as_str(),
        &d.identity,
        p,
    )?;
    if seq != next_seq {
        return Err(StoreError::Database(format!(
            "audit head moved inside the transaction ({next_seq} expected, {seq} written)"
        )));
    }
    Ok(DecisionReceipt {
        request_id: d.request_id.clone(),
        seq,
        hash,
    })
}

/// `v` in decimal as a canonical JSON string (digits need no escaping); amounts below 2^128
/// skip the general 256-bit formatting, a tenth of a decision's cost in the writer before.
pub(super) fn write_decimal_str(p: &mut Vec<u8>, v: U256) {
    use std::io::Write as _;
    p.push(b'"');
    match u128::try_from(v) {
        // Writing into a Vec cannot fail.
        Ok(small) => {
            let _ = write!(p, "{small}");
        }
        Err(_) => p.extend_from_slice(v.to_string().as_bytes()),
    }
    p.push(b'"');
}

fn outcome(ctx: &mut WriteCtx<'_>, o: OutcomeTx) -> Result<DecisionReceipt, StoreError> {
    ctx.in_flight.finished(&o.request_id);
    let c = ctx.conn;
    let stored = load_request(c, &o.request_id)?
        .ok_or_else(|| StoreError::NotFound(format!("request {}", o.request_id)))?;
    if stored.state != RequestState::Reserved {
        return Err(StoreError::Conflict(format!(
            "request {} already has an outcome",
            o.request_id
        )));
    }
    let next_seq = ctx.head.map_or(1, |(s, _)| s.saturating_add(1));
    let next_seq_i = i64::try_from(next_seq).map_err(|_| StoreError::Invalid("seq".into()))?;
    let (kind, payload) = match o.outcome {
        Outcome::Signed { details } => {
            let text = json_text(&details)?;
            // The details live once, in the signature record; `load_request` reads them there.
            c.prepare_cached(
                "UPDATE requests SET state = 'signed', outcome_seq = ?2 WHERE request_id = ?1",
            )?
            .execute(params![o.request_id.as_str(), next_seq_i])?;
            // {"details": <canonical details>, "key": …}, in canonical form directly.
            let mut p = Vec::with_capacity(text.len() + 64);
            p.extend_from_slice(b"{\"details\":");
            p.extend_from_slice(text.as_bytes());
            p.extend_from_slice(b",\"key\":");
            write_canonical_str(&mut p, &stored.key.to_string());
            p.push(b'}');
            let (seq, hash) = ctx.append_canonical(
                o.at,
                AuditKind::Signature,
                o.request_id.as_str(),
                &stored.identity,
                p,
            )?;
            if seq != next_seq {
                return Err(StoreError::Database(
                    "audit head moved inside the transaction".into(),
                ));
            }
            return Ok(DecisionReceipt {
                request_id: o.request_id,
                seq,
                hash,
            });
        }
        Outcome::Failed { reason, release } => {
            let mut windows = Vec::new();
            if release {
                // The request's rows all have `at = decided_at`, in windows listed in
                // `window_spans` (written with them).
                let at = ms(stored.decided_at)?;
                let mut stmt = c.prepare_cached(
                    "SELECT r.window_key, r.amount FROM window_spans s
                     JOIN reservations r
                       ON r.window_key = s.window_key AND r.at = ?2 AND r.request_id = ?1
                     ORDER BY r.window_key",
                )?;
                let rows = stmt.query_map(params![o.request_id.as_str(), at], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                })?;
                let rows = rows.collect::<Result<Vec<_>, _>>()?;
                for (window, amount) in rows {
                    let amount =
                        U256::try_from_be_slice(&amount).ok_or_else(|| corrupt("amount"))?;
                    ctx.cache.release(c, &window, at, amount)?;
                    c.prepare_cached(
                        "DELETE FROM reservations
                         WHERE window_key = ?1 AND at = ?2 AND request_id = ?3",
                    )?
                    .execute(params![window, at, o.request_id.as_str()])?;
                    windows.push(window);
                }
            }
            let text = json_text(&json!({"reason": reason}))?;
            c.execute(
                "UPDATE requests SET state = 'failed', outcome = ?2, released = ?3, outcome_seq = ?4
                 WHERE request_id = ?1",
                params![o.request_id.as_str(), text, release, next_seq_i],
            )?;
            (
                AuditKind::Failure,
                json!({
                    "key": stored.key.to_string(),
                    "reason": reason,
                    "released": release,
                    "windows": windows,
                }),
            )
        }
    };
    let record = ctx.append(AuditEntry {
        at: o.at,
        kind,
        request_id: Some(o.request_id.to_string()),
        identity: Some(stored.identity),
        payload,
    })?;
    if record.seq != next_seq {
        return Err(StoreError::Database(
            "audit head moved inside the transaction".into(),
        ));
    }
    Ok(DecisionReceipt {
        request_id: o.request_id,
        seq: record.seq,
        hash: record.hash,
    })
}

// ---------------------------------------------------------------------------------------------
// Reading rows.

fn open_connection(path: &Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy_timeout)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Schema(format!(
            "cannot use WAL journal mode (got {mode})"
        )));
    }
    // FULL for every connection that commits by itself (the reader, another process); the
    // writer lowers it to NORMAL and has its commits synced by the `Syncer`.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Every write job runs in a SAVEPOINT, whose statement journal (the pages' contents before
    // the job) would otherwise spill to a temporary file past 64 KiB: tens of thousands of
    // write(2) calls per second for data that only lives until the batch commits.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    let fk: i64 = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
    if sync != 2 || fk != 1 {
        return Err(StoreError::Schema(format!(
            "pragmas not applied (synchronous={sync}, foreign_keys={fk})"
        )));
    }
    Ok(conn)
}

fn read_head(c: &Connection) -> Result<Option<(u64, B256)>, StoreError> {
    let row: Option<(i64, Vec<u8>)> = c
        .prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    row.map(|(s, h)| Ok((seq_u64(s)?, b256(&h)?))).transpose()
}

fn load_freeze(c: &Connection) -> Result<Option<Freeze>, StoreError> {
    let row: (i64, Option<String>, Option<String>, Option<i64>) = c
        .prepare_cached("SELECT frozen, reason, by_identity, at FROM freeze WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
    Ok((row.0 != 0).then(|| Freeze {
        reason: row.1.unwrap_or_default(),
        by: row.2.unwrap_or_default(),
        at: from_ms(row.3.unwrap_or(0)),
    }))
}

fn load_request(c: &Connection, id: &RequestId) -> Result<Option<StoredRequest>, StoreError> {
    // Two plain lookups, not one LEFT JOIN: SQLite re-prepared the joined statement on every
    // execution (about 40 µs of the writer's time per decision).
    let mut stmt = c.prepare_cached(
        "SELECT key_name, key_version, identity, digest, decided_at, state, decision_seq,
                outcome, released, outcome_seq
         FROM requests WHERE request_id = ?1",
    )?;
    let mut rows = stmt.query([id.as_str()])?;
    let Some(r) = rows.next()? else {
        return Ok(None);
    };
    let version = u32::try_from(r.get::<_, i64>(1)?).map_err(|_| corrupt("key_version"))?;
    let state: String = r.get(5)?;
    let stored_outcome: Option<String> = r.get(7)?;
    let outcome_seq: Option<i64> = r.get(9)?;
    // A signature's details are in its audit record (`{"details":…,"key":…}`); rows written
    // before that kept them in `outcome`.
    let outcome: Option<String> = match (&stored_outcome, state.as_str(), outcome_seq) {
        (None, "signed", Some(seq)) => {
            let payload: String = c
                .prepare_cached("SELECT payload FROM audit WHERE seq = ?1")?
                .query_row([seq], |a| a.get(0))
                .optional()?
                .ok_or_else(|| corrupt("signature record"))?;
            Some(json_text(
                parse_json(&payload)?
                    .get("details")
                    .ok_or_else(|| corrupt("signature record details"))?,
            )?)
        }
        _ => stored_outcome,
    };
    let outcome_seq = outcome_seq.map(seq_u64).transpose()?;
    let state = match state.as_str() {
        "reserved" => RequestState::Reserved,
        "signed" => RequestState::Signed {
            details: outcome.ok_or_else(|| corrupt("outcome"))?,
            seq: outcome_seq.ok_or_else(|| corrupt("outcome_seq"))?,
        },
        "failed" => {
            let v = parse_json(&outcome.ok_or_else(|| corrupt("outcome"))?)?;
            RequestState::Failed {
                reason: v
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                released: r.get::<_, i64>(8)? != 0,
                seq: outcome_seq.ok_or_else(|| corrupt("outcome_seq"))?,
            }
        }
        _ => return Err(corrupt("request state")),
    };
    Ok(Some(StoredRequest {
        request_id: id.clone(),
        key: KeyVersion::new(KeyName::new(r.get::<_, String>(0)?)?, version),
        identity: r.get(2)?,
        digest: b256(&r.get::<_, Vec<u8>>(3)?)?,
        decided_at: from_ms(r.get(4)?),
        decision_seq: seq_u64(r.get(6)?)?,
        state,
    }))
}

fn load_version(c: &Connection, v: &KeyVersion) -> Result<Option<KeyVersionRecord>, StoreError> {
    Ok(load_versions(c, Some(&v.name))?
        .into_iter()
        .find(|r| r.version == *v))
}

fn load_versions(
    c: &Connection,
    name: Option<&KeyName>,
) -> Result<Vec<KeyVersionRecord>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT kv.name, kv.version, kv.backend_ref, kv.address, kv.public_key, kv.status,
                kv.created_at, kv.activated_at, k.rotate_every_ms
         FROM key_versions kv JOIN keys k ON k.name = kv.name
         WHERE ?1 IS NULL OR kv.name = ?1
         ORDER BY kv.name, kv.version",
    )?;
    let mut rows = stmt.query([name.map(KeyName::as_str)])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let key_ref: KeyRef = serde_json::from_str(&r.get::<_, String>(2)?)
            .map_err(|e| corrupt(&format!("backend_ref: {e}")))?;
        out.push(KeyVersionRecord {
            version: KeyVersion::new(
                KeyName::new(r.get::<_, String>(0)?)?,
                u32::try_from(r.get::<_, i64>(1)?).map_err(|_| corrupt("version"))?,
            ),
            key_ref,
            address: address(&r.get::<_, Vec<u8>>(3)?)?,
            public_key: r.get(4)?,
            status: parse_status(&r.get::<_, String>(5)?)?,
            created_at: from_ms(r.get(6)?),
            activated_at: r.get::<_, Option<i64>>(7)?.map(from_ms),
            rotate_every_ms: r
                .get::<_, Option<i64>>(8)?
                .map(|v| u64::try_from(v).unwrap_or(0)),
        });
    }
    Ok(out)
}

fn update_status(c: &Connection, v: &KeyVersion, status: &KeyStatus) -> Result<(), StoreError> {
    let n = c.execute(
        "UPDATE key_versions SET state = ?3, status = ?4 WHERE name = ?1 AND version = ?2",
        params![
            v.name.as_str(),
            v.version,
            status.state(),
            status_json(status)?
        ],
    )?;
    if n == 1 {
        Ok(())
    } else {
        Err(StoreError::NotFound(v.to_string()))
    }
}

/// How long after expiry a reservation is kept before pruning deletes it.
const PRUNE_GRACE_MS: i64 = 5 * 60_000;

/// The total of `window`'s reservations with `at > since`, from the database (for readers; the
/// writer uses its window cache).
fn window_sum(c: &Connection, window: &WindowKey, since: i64) -> Result<U256, StoreError> {
    db_window_sum(c, window.as_str(), since)
}

fn audit_row(r: &Row<'_>) -> Result<AuditRecord, StoreError> {
    let kind: String = r.get(3)?;
    Ok(AuditRecord {
        seq: seq_u64(r.get(0)?)?,
        prev_hash: b256(&r.get::<_, Vec<u8>>(1)?)?,
        at: from_ms(r.get(2)?),
        kind: AuditKind::parse(&kind).ok_or_else(|| corrupt("audit kind"))?,
        request_id: r.get(4)?,
        identity: r.get(5)?,
        payload: parse_json(&r.get::<_, String>(6)?)?,
        hash: b256(&r.get::<_, Vec<u8>>(7)?)?,
    })
}

// ---------------------------------------------------------------------------------------------
// Conversions.

/// The exclusive lower bound of a window: reservations with `at > since` count.
fn since(now: i64, duration_ms: u64) -> i64 {
    match i64::try_from(duration_ms) {
        Ok(d) if d < now => now - d,
        _ => i64::MIN,
    }
}

fn ms(t: UnixMillis) -> Result<i64, StoreError> {
    i64::try_from(t.0).map_err(|_| StoreError::Invalid(format!("time {} out of range", t.0)))
}

fn opt_ms(v: Option<u64>) -> Result<Option<i64>, StoreError> {
    v.map(|v| i64::try_from(v).map_err(|_| StoreError::Invalid(format!("{v} out of range"))))
        .transpose()
}

fn from_ms(v: i64) -> UnixMillis {
    UnixMillis(u64::try_from(v).unwrap_or(0))
}

fn seq_u64(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| corrupt("seq"))
}

fn b256(bytes: &[u8]) -> Result<B256, StoreError> {
    B256::try_from(bytes).map_err(|_| corrupt("32-byte hash"))
}

fn address(bytes: &[u8]) -> Result<Address, StoreError> {
    Address::try_from(bytes).map_err(|_| corrupt("address"))
}

fn status_json(s: &KeyStatus) -> Result<String, StoreError> {
    serde_json::to_string(s).map_err(|e| StoreError::Invalid(e.to_string()))
}

fn status_value(s: &KeyStatus) -> Result<Value, StoreError> {
    serde_json::to_value(s).map_err(|e| StoreError::Invalid(e.to_string()))
}

fn parse_status(s: &str) -> Result<KeyStatus, StoreError> {
    serde_json::from_str(s).map_err(|e| corrupt(&format!("key status: {e}")))
}

fn parse_json(s: &str) -> Result<Value, StoreError> {
    serde_json::from_str(s).map_err(|e| corrupt(&format!("json: {e}")))
}

fn json_text(v: &Value) -> Result<String, StoreError> {
    String::from_utf8(canonical_json(v)).map_err(|e| StoreError::Invalid(e.to_string()))
}

/// [`AuditEntry::validate`]'s check, by reference (the details of every decision pass here; a
/// copy cost a sixth of the request's work on the tokio side).
fn check_object(v: &Value) -> Result<(), StoreError> {
    crate::audit::validate_payload(v).map_err(StoreError::from)
}

fn exec_cached(conn: &Connection, sql: &str) -> Result<(), rusqlite::Error> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Database(format!("corrupt row: {what}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::store::tests::event;

    /// A writer connection on a fresh database, inside a batch transaction.
    fn batch_conn() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_connection(&dir.path().join("s.db"), Duration::from_secs(1)).unwrap();
        schema::migrate(&mut conn).unwrap();
        exec_cached(&conn, "BEGIN IMMEDIATE").unwrap();
        (dir, conn)
    }

    fn audit_rows(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
            .unwrap()
    }

    /// A `WritesLast` job that fails before writing leaves the batch as it was; one that fails
    /// after writing (a database error) breaks it, and restores the chain head it moved.
    #[test]
    fn a_job_without_a_savepoint_breaks_the_batch_only_if_it_wrote() {
        let (_dir, conn) = batch_conn();
        let mut cache = WindowCache::default();
        let mut in_flight = InFlight::default();
        let mut ctx = WriteCtx {
            conn: &conn,
            head: None,
            cache: &mut cache,
            in_flight: &mut in_flight,
            broken: None,
            db_failed: false,
        };
        ctx.writes_last(|ctx| ctx.append(event(1))).unwrap();
        let head = ctx.head;
        assert!(head.is_some());

        // Refused before any write: nothing to undo, the batch goes on.
        let refused: Result<(), StoreError> =
            ctx.writes_last(|_| Err(StoreError::Conflict("already has an outcome".into())));
        assert!(matches!(refused, Err(StoreError::Conflict(_))));
        assert!(ctx.broken.is_none());
        assert!(!ctx.db_failed);
        assert_eq!(ctx.head, head);

        // Failed after writing: the batch is broken and the head is the one before the job.
        let failed: Result<(), StoreError> = ctx.writes_last(|ctx| {
            ctx.append(event(2))?;
            Err(StoreError::Database("disk I/O error".into()))
        });
        assert!(matches!(failed, Err(StoreError::Database(_))));
        assert!(
            ctx.broken.is_some(),
            "a job that wrote and failed must break the batch"
        );
        assert!(ctx.db_failed);
        assert_eq!(ctx.head, head);
        assert_eq!(
            audit_rows(&conn),
            2,
            "its write is still in the open transaction"
        );
        exec_cached(&conn, "ROLLBACK").unwrap();
        assert_eq!(audit_rows(&conn), 0);
    }
}
