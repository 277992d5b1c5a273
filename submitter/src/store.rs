//! Durable store of accepted bundles: SQLite (WAL, `synchronous = FULL`), one row per bundle.
//!
//! A bundle is inserted — and the commit is on disk — before the API acknowledges it, so a
//! `kill -9` after the acknowledgement loses nothing: at start the engine reloads every row,
//! resumes the live ones and answers retries of finished ones with their recorded state.
//! Per-relay request history is not persisted (it is rebuilt as requests are made).

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
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
}

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
                 updated_at INTEGER NOT NULL DEFAULT (unixepoch())
             );
             CREATE INDEX IF NOT EXISTS bundles_key ON bundles(key_name);",
        )
        .map_err(store_err)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Inserts a new bundle durably, or returns the existing row with that id.
    pub async fn insert(
        &self,
        request: &SubmitBundleRequest,
        digest: String,
    ) -> Result<Inserted, Error> {
        let json = serde_json::to_string(request).map_err(|e| Error::Store(e.to_string()))?;
        let id = request.bundle_id;
        let key = request.key_name.clone();
        self.blocking(move |conn| {
            let tx = conn.transaction().map_err(store_err)?;
            if let Some(existing) = get(&tx, id)? {
                return Ok(Inserted::Exists(Box::new(existing)));
            }
            tx.execute(
                "INSERT INTO bundles (id, key_name, request, digest, state) VALUES (?1, ?2, ?3, ?4, 'pending')",
                params![id.to_string(), key, json, digest],
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

    /// Every stored bundle.
    pub async fn load_all(&self) -> Result<Vec<StoredBundle>, Error> {
        self.blocking(|conn| {
            let mut stmt = conn
                .prepare("SELECT request, digest, state, reason, included_block FROM bundles")
                .map_err(store_err)?;
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

fn row_to_stored(row: &rusqlite::Row<'_>) -> rusqlite::Result<RowResult> {
    let request: String = row.get(0)?;
    let digest: String = row.get(1)?;
    let state: String = row.get(2)?;
    let reason: Option<String> = row.get(3)?;
    let included: Option<i64> = row.get(4)?;
    Ok((|| {
        Ok(StoredBundle {
            request: serde_json::from_str(&request)
                .map_err(|e| Error::Store(format!("stored request: {e}")))?,
            digest,
            state: parse_state(&state)?,
            reason,
            included_block: included.and_then(|b| u64::try_from(b).ok()),
        })
    })())
}

fn get(conn: &Connection, id: Uuid) -> Result<Option<StoredBundle>, Error> {
    conn.query_row(
        "SELECT request, digest, state, reason, included_block FROM bundles WHERE id = ?1",
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
