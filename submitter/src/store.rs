//! Durable store of accepted bundles: SQLite (WAL, `synchronous = FULL`), one row per bundle.
//!
//! A bundle is inserted — and the commit is on disk — before the API acknowledges it, so a
//! `kill -9` after the acknowledgement loses nothing. At start the engine reloads only the live
//! rows ([`Store::load_live`], through a partial index): pending, or included but not yet
//! confirmed. Finished rows (confirmed, cancelled, expired, failed) stay here and are read by id
//! ([`Store::get`]) to answer a status request or a retry of the same bundle id, so the start
//! time does not grow with the number of bundles ever stored.
//!
//! With each row the submitter keeps what its validation recovered ([`StoredMeta`]: the chain id
//! and each transaction's sender and nonce), so a restart does not recover signatures again.
//! Per-relay request history is not persisted (it is rebuilt as requests are made).

use std::path::Path;
use std::sync::{Arc, Mutex};

use alloy::primitives::Address;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use castellan_api::submitter::{BundleState, SubmitBundleRequest};

use crate::Error;

/// A persisted bundle.
#[derive(Clone, Debug)]
pub struct StoredBundle {
    /// The request as accepted.
    pub request: SubmitBundleRequest,
    /// Digest of the request (hex).
    pub digest: String,
    /// Last recorded state.
    pub state: BundleState,
    /// Reason, when stopped.
    pub reason: Option<String>,
    /// Inclusion block, when included.
    pub included_block: Option<u64>,
    /// What validation recovered when the bundle was accepted (absent in rows written before
    /// it was kept, or when unreadable).
    pub meta: Option<StoredMeta>,
}

/// What the submitter's own validation recovered before it stored a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredMeta {
    /// Chain id the transactions were checked against.
    pub chain_id: u64,
    /// Sender and nonce of each transaction, in order.
    pub txs: Vec<(Address, u64)>,
}

/// Live rows: pending, or included without the confirmation recorded. Used verbatim both in the
/// partial index and in [`Store::load_live`] so SQLite uses the index.
const LIVE: &str =
    "state = 'pending' OR (state = 'included' AND (reason IS NULL OR reason != 'confirmed'))";

/// Result of an insert.
#[derive(Clone, Debug)]
pub enum Inserted {
    /// New row, durable.
    New,
    /// The id was already there.
    Exists(Box<StoredBundle>),
}

/// The store (a connection behind a mutex; calls are blocking and run on the blocking pool).
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let conn = Connection::open(path).map_err(store_err)?;
        Self::init(conn)
    }

    /// An in-memory store (benchmarks and tests that do not restart).
    pub fn in_memory() -> Result<Self, Error> {
        Self::init(Connection::open_in_memory().map_err(store_err)?)
    }

    fn init(conn: Connection) -> Result<Self, Error> {
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS bundles (
                 id TEXT PRIMARY KEY,
                 key_name TEXT NOT NULL,
                 request TEXT NOT NULL,
                 digest TEXT NOT NULL,
                 state TEXT NOT NULL,
                 reason TEXT,
                 included_block INTEGER,
                 updated_at INTEGER NOT NULL DEFAULT (unixepoch()),
                 meta TEXT
             );
             CREATE INDEX IF NOT EXISTS bundles_key ON bundles(key_name);",
        )
        .map_err(store_err)?;
        // Stores created before `meta` was kept get the column (NULL: validated again at start).
        let has_meta = conn
            .prepare("SELECT 1 FROM pragma_table_info('bundles') WHERE name = 'meta'")
            .and_then(|mut s| s.exists([]))
            .map_err(store_err)?;
        if !has_meta {
            conn.execute_batch("ALTER TABLE bundles ADD COLUMN meta TEXT")
                .map_err(store_err)?;
        }
        conn.execute_batch(&format!(
            "CREATE INDEX IF NOT EXISTS bundles_live ON bundles(id) WHERE {LIVE};"
        ))
        .map_err(store_err)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Inserts a new bundle durably (with what its validation recovered, `meta`), or returns the
    /// existing row with that id.
    pub async fn insert(
        &self,
        request: &SubmitBundleRequest,
        digest: String,
        meta: Option<&StoredMeta>,
    ) -> Result<Inserted, Error> {
        let json = serde_json::to_string(request).map_err(|e| Error::Store(e.to_string()))?;
        let meta = meta
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| Error::Store(e.to_string()))?;
        let id = request.bundle_id;
        let key = request.key_name.clone();
        self.blocking(move |conn| {
            let tx = conn.transaction().map_err(store_err)?;
            if let Some(existing) = get(&tx, id)? {
                return Ok(Inserted::Exists(Box::new(existing)));
            }
            tx.execute(
                "INSERT INTO bundles (id, key_name, request, digest, state, meta) VALUES (?1, ?2, ?3, ?4, 'pending', ?5)",
                params![id.to_string(), key, json, digest, meta],
            )
            .map_err(store_err)?;
            tx.commit().map_err(store_err)?;
            Ok(Inserted::New)
        })
        .await
    }

    /// Records a state change durably.
    pub async fn set_state(
        &self,
        id: Uuid,
        state: BundleState,
        reason: Option<String>,
        included_block: Option<u64>,
    ) -> Result<(), Error> {
        self.blocking(move |conn| {
            conn.execute(
                "UPDATE bundles SET state = ?2, reason = ?3, included_block = ?4, updated_at = unixepoch() WHERE id = ?1",
                params![
                    id.to_string(),
                    state_str(state),
                    reason,
                    included_block.map(|b| i64::try_from(b).unwrap_or(i64::MAX))
                ],
            )
            .map_err(store_err)?;
            Ok(())
        })
        .await
    }

    /// One stored bundle, by id.
    pub async fn get(&self, id: Uuid) -> Result<Option<StoredBundle>, Error> {
        self.blocking(move |conn| get(conn, id)).await
    }

    /// The live bundles (pending, or included but not confirmed), through the partial index.
    pub async fn load_live(&self) -> Result<Vec<StoredBundle>, Error> {
        self.load(format!("SELECT {COLUMNS} FROM bundles WHERE {LIVE}"))
            .await
    }

    /// Every stored bundle (tests and offline checks; the engine loads only the live ones).
    pub async fn load_all(&self) -> Result<Vec<StoredBundle>, Error> {
        self.load(format!("SELECT {COLUMNS} FROM bundles")).await
    }

    /// How many rows the store holds.
    pub async fn count(&self) -> Result<u64, Error> {
        self.blocking(|conn| {
            conn.query_row("SELECT count(*) FROM bundles", [], |r| r.get::<_, i64>(0))
                .map(|n| u64::try_from(n).unwrap_or(0))
                .map_err(store_err)
        })
        .await
    }

    async fn load(&self, sql: String) -> Result<Vec<StoredBundle>, Error> {
        self.blocking(move |conn| {
            let mut stmt = conn.prepare(&sql).map_err(store_err)?;
            let rows = stmt.query_map([], row_to_stored).map_err(store_err)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row.map_err(store_err)??);
            }
            Ok(out)
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| Error::Store("store lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| Error::Store(format!("store task: {e}")))?
    }
}

type RowResult = Result<StoredBundle, Error>;

const COLUMNS: &str = "request, digest, state, reason, included_block, meta";

fn row_to_stored(row: &rusqlite::Row<'_>) -> rusqlite::Result<RowResult> {
    let request: String = row.get(0)?;
    let digest: String = row.get(1)?;
    let state: String = row.get(2)?;
    let reason: Option<String> = row.get(3)?;
    let included: Option<i64> = row.get(4)?;
    let meta: Option<String> = row.get(5)?;
    Ok((|| {
        Ok(StoredBundle {
            request: serde_json::from_str(&request)
                .map_err(|e| Error::Store(format!("stored request: {e}")))?,
            digest,
            state: parse_state(&state)?,
            reason,
            included_block: included.and_then(|b| u64::try_from(b).ok()),
            // Unreadable meta only costs a full validation at start.
            meta: meta.and_then(|m| serde_json::from_str(&m).ok()),
        })
    })())
}

fn get(conn: &Connection, id: Uuid) -> Result<Option<StoredBundle>, Error> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM bundles WHERE id = ?1"),
        params![id.to_string()],
        row_to_stored,
    )
    .optional()
    .map_err(store_err)?
    .transpose()
}

fn state_str(state: BundleState) -> &'static str {
    match state {
        BundleState::Pending => "pending",
        BundleState::Included => "included",
        BundleState::Expired => "expired",
        BundleState::Cancelled => "cancelled",
        BundleState::Failed => "failed",
    }
}

fn parse_state(s: &str) -> Result<BundleState, Error> {
    Ok(match s {
        "pending" => BundleState::Pending,
        "included" => BundleState::Included,
        "expired" => BundleState::Expired,
        "cancelled" => BundleState::Cancelled,
        "failed" => BundleState::Failed,
        other => return Err(Error::Store(format!("unknown state {other:?}"))),
    })
}

fn store_err(e: rusqlite::Error) -> Error {
    Error::Store(e.to_string())
}
