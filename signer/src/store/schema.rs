//! SQLite schema and migrations, versioned with `PRAGMA user_version`.

use rusqlite::{Connection, TransactionBehavior};

use super::StoreError;

/// Migrations in order; `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[V1, V2, V3];

/// The schema version this binary writes.
pub(crate) const CURRENT: i64 = 3;

const V1: &str = r#"
CREATE TABLE keys (
    name                 TEXT PRIMARY KEY,
    created_at           INTEGER NOT NULL,
    rotate_every_ms      INTEGER,
    paused_until         INTEGER,
    pause_reason         TEXT,
    consecutive_failures INTEGER NOT NULL DEFAULT 0
) STRICT;

CREATE TABLE key_versions (
    name         TEXT NOT NULL REFERENCES keys(name),
    version      INTEGER NOT NULL CHECK (version >= 1),
    backend_ref  TEXT NOT NULL,
    address      BLOB NOT NULL UNIQUE CHECK (length(address) = 20),
    public_key   BLOB NOT NULL,
    state        TEXT NOT NULL,
    status       TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    activated_at INTEGER,
    PRIMARY KEY (name, version)
) STRICT;
CREATE UNIQUE INDEX key_versions_one_active ON key_versions(name) WHERE state = 'active';

CREATE TABLE freeze (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    frozen      INTEGER NOT NULL,
    reason      TEXT,
    by_identity TEXT,
    at          INTEGER
) STRICT;
INSERT INTO freeze (id, frozen) VALUES (1, 0);

CREATE TABLE requests (
    request_id   TEXT PRIMARY KEY,
    key_name     TEXT NOT NULL,
    key_version  INTEGER NOT NULL,
    identity     TEXT NOT NULL,
    digest       BLOB NOT NULL CHECK (length(digest) = 32),
    decided_at   INTEGER NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('reserved', 'signed', 'failed')),
    decision_seq INTEGER NOT NULL,
    outcome      TEXT,
    released     INTEGER NOT NULL DEFAULT 0,
    outcome_seq  INTEGER,
    FOREIGN KEY (key_name, key_version) REFERENCES key_versions(name, version)
) STRICT;

CREATE TABLE reservations (
    request_id TEXT NOT NULL REFERENCES requests(request_id),
    window_key TEXT NOT NULL,
    amount     BLOB NOT NULL CHECK (length(amount) = 32),
    at         INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (request_id, window_key)
) STRICT;
CREATE INDEX reservations_window ON reservations(window_key, at, amount);
CREATE INDEX reservations_expiry ON reservations(expires_at);

-- Per-second and per-minute totals of each window, kept in step with `reservations` in the
-- same transaction. `bucket` is `at div width`.
CREATE TABLE window_buckets (
    window_key TEXT NOT NULL,
    width      INTEGER NOT NULL CHECK (width IN (1000, 60000)),
    bucket     INTEGER NOT NULL,
    total      BLOB NOT NULL CHECK (length(total) = 32),
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (window_key, width, bucket)
) STRICT, WITHOUT ROWID;
CREATE INDEX window_buckets_expiry ON window_buckets(expires_at);

CREATE TABLE pending (
    id         TEXT PRIMARY KEY,
    key_name   TEXT NOT NULL,
    identity   TEXT NOT NULL,
    request    TEXT NOT NULL,
    digest     BLOB NOT NULL CHECK (length(digest) = 32),
    approvals  TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    status     TEXT NOT NULL
) STRICT;

CREATE TABLE approvals (
    pending_id TEXT NOT NULL REFERENCES pending(id),
    approver   BLOB NOT NULL CHECK (length(approver) = 20),
    signature  BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    at         INTEGER NOT NULL,
    PRIMARY KEY (pending_id, approver)
) STRICT;

CREATE TABLE grants (
    id         TEXT PRIMARY KEY,
    grant_json TEXT NOT NULL,
    signatures TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT;

CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY CHECK (seq >= 1),
    prev_hash  BLOB NOT NULL CHECK (length(prev_hash) = 32),
    at         INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    request_id TEXT,
    identity   TEXT,
    payload    TEXT NOT NULL,
    hash       BLOB NOT NULL CHECK (length(hash) = 32)
) STRICT;
CREATE INDEX audit_checkpoints ON audit(seq) WHERE kind = 'checkpoint';
"#;

/// Version 2: the write probe's row (see `Store::probe_writes`): one row rewritten with a
/// 256 KiB blob, so that a probe needs about as much new WAL space as a busy batch.
const V2: &str = r#"
CREATE TABLE write_probe (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    filler BLOB NOT NULL
) STRICT;
"#;

/// Version 3: cheaper reservations. A decision wrote each reservation into a table with three
/// b-trees (rowid, `(request_id, window_key)`, `(window_key, at, amount)`) plus an expiry index,
/// and moved each of its buckets in an expiry index: a third of the writer's work per request.
/// Now a reservation is one row of a `WITHOUT ROWID` table keyed `(window_key, at, request_id)`
/// (what window sums read), and expired rows and buckets are found through `window_spans`, the
/// longest duration each window has been reserved for, instead of expiry indexes. A failure's
/// release finds its rows through `window_spans` and the request's `decided_at`.
const V3: &str = r#"
CREATE TABLE window_spans (
    window_key  TEXT PRIMARY KEY,
    duration_ms INTEGER NOT NULL CHECK (duration_ms >= 0)
) STRICT, WITHOUT ROWID;
INSERT INTO window_spans (window_key, duration_ms)
    SELECT window_key, max(max(expires_at - at, 0)) FROM reservations GROUP BY window_key;
INSERT INTO window_spans (window_key, duration_ms)
    SELECT window_key, max(max(expires_at - bucket * width, 0)) FROM window_buckets
    WHERE window_key NOT IN (SELECT window_key FROM window_spans) GROUP BY window_key;

CREATE TABLE reservations_v3 (
    window_key TEXT NOT NULL,
    at         INTEGER NOT NULL,
    request_id TEXT NOT NULL REFERENCES requests(request_id),
    amount     BLOB NOT NULL CHECK (length(amount) = 32),
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (window_key, at, request_id)
) STRICT, WITHOUT ROWID;
INSERT INTO reservations_v3 (window_key, at, request_id, amount, expires_at)
    SELECT window_key, at, request_id, amount, expires_at FROM reservations;
DROP TABLE reservations;
ALTER TABLE reservations_v3 RENAME TO reservations;
DROP INDEX window_buckets_expiry;
"#;

/// Brings the database to [`CURRENT`], in one immediate transaction (so two processes opening a
/// new file at once do not both migrate). Refuses a database newer than this binary.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > CURRENT {
        return Err(StoreError::Schema(format!(
            "database schema version {version} is newer than this signer's ({CURRENT})"
        )));
    }
    let start = usize::try_from(version)
        .map_err(|_| StoreError::Schema(format!("negative schema version {version}")))?;
    for sql in MIGRATIONS.iter().skip(start) {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", CURRENT)?;
    tx.commit()?;
    Ok(())
}
