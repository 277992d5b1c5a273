//! The writer thread's cache of limit-window state, and the bucket arithmetic that keeps the
//! database's `window_buckets` in step with `reservations`. See "Window cache" in the module docs
//! of [`crate::store`] for when the cache is trusted.

use std::collections::{BTreeMap, HashMap};

use alloy::primitives::U256;
use rusqlite::{Connection, OptionalExtension, params};

use super::StoreError;

/// Widths of the two bucket levels. A window's total reads at most one second of individual
/// reservations, at most 59 one-second buckets and `duration / 1 min` one-minute buckets, whatever
/// the request rate.
pub(super) const FINE_MS: i64 = 1_000;
pub(super) const COARSE_MS: i64 = 60_000;

/// Windows at most this long keep their reservation rows (summed per millisecond) in the cache.
const ROWS_SPAN_MS: i64 = 2_000;
/// Windows at most this long keep the one-second buckets of their boundary minute in the cache.
const FINE_SPAN_MS: i64 = 120_000;
/// Windows per multi-row statement (5 parameters a row, 2 bucket rows a window).
const CHUNK: usize = 16;
/// Past this many windows the cache starts over (it is rebuilt from the database on demand); a
/// 24-hour window holds up to 1440 one-minute buckets, so this bounds the cache to ~100 MiB.
const MAX_WINDOWS: usize = 1_024;

/// Per-window state mirrored from the database. Exact while the writer connection is the only
/// writer: [`WindowCache::begin_batch`] drops it when another connection committed, and the
/// writer drops it when a job or a batch rolls back.
#[derive(Debug, Default)]
pub(super) struct WindowCache {
    data_version: Option<i64>,
    windows: HashMap<String, CachedWindow>,
    /// `window_spans` as this transaction sees it, for the windows written since the cache was
    /// last dropped: the longest duration a reservation of the window has had.
    spans: HashMap<String, i64>,
    /// Bucket totals changed in this batch and not yet written to `window_buckets`: every
    /// decision of a batch moves the same few buckets (this second, this minute), so they are
    /// written once, by [`WindowCache::flush`] before the batch commits, instead of once per
    /// decision. Reads of buckets from the database see these first. `expires` is `None` when
    /// a release lowered a total and the row's expiry stays as it is.
    dirty: HashMap<String, BTreeMap<(i64, i64), Dirty>>,
    /// Counts changes to `dirty`, so the writer can tell whether a failed job touched it.
    dirty_gen: u64,
}

/// A bucket total waiting for [`WindowCache::flush`].
#[derive(Clone, Copy, Debug)]
struct Dirty {
    total: U256,
    expires: Option<i64>,
}

impl WindowCache {
    /// Called inside each batch's write transaction, before any job: `PRAGMA data_version`
    /// changes when another connection (another store instance, `keyctl`) committed, and then
    /// nothing cached can be trusted.
    pub(super) fn begin_batch(&mut self, conn: &Connection) -> Result<(), StoreError> {
        let version: i64 = conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        if self.data_version != Some(version) || self.windows.len() > MAX_WINDOWS {
            self.clear();
            self.data_version = Some(version);
        }
        Ok(())
    }

    /// Forgets everything (after a rollback, or a bulk delete).
    /// Unflushed bucket totals are dropped with it: the caller rolls back the transaction that
    /// holds the rows behind them (see [`WindowCache::has_dirty`]).
    pub(super) fn clear(&mut self) {
        self.windows.clear();
        self.spans.clear();
        self.dirty.clear();
        self.dirty_gen = self.dirty_gen.wrapping_add(1);
    }

    /// Whether bucket totals wait for [`WindowCache::flush`]: then dropping the cache without
    /// rolling back the whole batch would leave the buckets behind their rows.
    pub(super) fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Changes whenever the unflushed bucket totals change.
    pub(super) fn dirty_generation(&self) -> u64 {
        self.dirty_gen
    }

    /// Writes every unflushed bucket total to `window_buckets` (multi-row upserts; a total that
    /// fell to zero deletes its row). Called before each commit, and before a job that deletes
    /// buckets itself.
    pub(super) fn flush(&mut self, conn: &Connection) -> Result<(), StoreError> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let mut upserts = Vec::new();
        for (window, buckets) in &self.dirty {
            for (&(width, bucket), d) in buckets {
                if d.total.is_zero() {
                    conn.prepare_cached(
                        "DELETE FROM window_buckets
                         WHERE window_key = ?1 AND width = ?2 AND bucket = ?3",
                    )?
                    .execute(params![window, width, bucket])?;
                } else if let Some(expires) = d.expires {
                    upserts.push((window.as_str(), width, bucket, d.total, expires));
                } else {
                    // Lowered by a release: the row exists, its expiry stays.
                    conn.prepare_cached(
                        "UPDATE window_buckets SET total = ?4
                         WHERE window_key = ?1 AND width = ?2 AND bucket = ?3",
                    )?
                    .execute(params![
                        window,
                        width,
                        bucket,
                        d.total.to_be_bytes::<32>().as_slice()
                    ])?;
                }
            }
        }
        for chunk in upserts.chunks(2 * CHUNK) {
            let mut sql = String::from(
                "INSERT INTO window_buckets (window_key, width, bucket, total, expires_at) VALUES ",
            );
            push_rows(&mut sql, chunk.len(), 5);
            sql.push_str(
                " ON CONFLICT (window_key, width, bucket) DO UPDATE
                   SET total = excluded.total,
                       expires_at = max(window_buckets.expires_at, excluded.expires_at)",
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut i = 0;
            let mut bind = |v: &dyn rusqlite::ToSql| -> Result<(), rusqlite::Error> {
                i += 1;
                stmt.raw_bind_parameter(i, v)
            };
            for &(window, width, bucket, total, expires) in chunk {
                bind(&window)?;
                bind(&width)?;
                bind(&bucket)?;
                bind(&total.to_be_bytes::<32>().as_slice())?;
                bind(&expires)?;
            }
            stmt.raw_execute()?;
        }
        self.dirty.clear();
        self.dirty_gen = self.dirty_gen.wrapping_add(1);
        Ok(())
    }

    /// Records a bucket's new total for [`WindowCache::flush`]; `expires` (a reservation's)
    /// raises the row's expiry, `None` (a release) keeps it.
    fn set_dirty(
        &mut self,
        window: &str,
        width: i64,
        bucket: i64,
        total: U256,
        expires: Option<i64>,
    ) {
        let buckets = match self.dirty.get_mut(window) {
            Some(b) => b,
            None => self.dirty.entry(window.to_owned()).or_default(),
        };
        let expires = match (
            buckets.get(&(width, bucket)).and_then(|d| d.expires),
            expires,
        ) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        buckets.insert((width, bucket), Dirty { total, expires });
        self.dirty_gen = self.dirty_gen.wrapping_add(1);
    }

    /// Makes sure `window_spans` holds at least `span` for `window` (pruning finds a window's
    /// expired rows and buckets through it), writing only when this transaction has not already.
    fn cover_span(&mut self, conn: &Connection, window: &str, span: i64) -> Result<(), StoreError> {
        if self.spans.get(window).is_some_and(|&known| known >= span) {
            return Ok(());
        }
        let stored: i64 = conn
            .prepare_cached(
                "INSERT INTO window_spans (window_key, duration_ms) VALUES (?1, ?2)
                 ON CONFLICT (window_key) DO UPDATE
                   SET duration_ms = max(window_spans.duration_ms, excluded.duration_ms)
                 RETURNING duration_ms",
            )?
            .query_row(params![window, span], |r| r.get(0))?;
        self.spans.insert(window.to_owned(), stored);
        Ok(())
    }

    /// The total of `window`'s reservations with `at > since`, exactly as
    /// [`window_sum`] computes it from the database. `at` is the caller's now.
    pub(super) fn sum(
        &mut self,
        conn: &Connection,
        window: &str,
        since: i64,
        at: i64,
    ) -> Result<U256, StoreError> {
        let dirty = self.dirty.get(window);
        let w = window_entry(&mut self.windows, dirty, conn, window, at)?;
        let fine = since.div_euclid(FINE_MS);
        let fine_end = fine.saturating_add(1).saturating_mul(FINE_MS);
        let coarse = since.div_euclid(COARSE_MS);
        let coarse_end_fine = coarse.saturating_add(1).saturating_mul(COARSE_MS / FINE_MS);
        let near = |span: i64| at.checked_sub(since).is_some_and(|d| d <= span);

        // Every later one-minute bucket.
        let from = coarse.saturating_add(1);
        if !w.coarse.covers(from) {
            let loaded = load_buckets(conn, dirty, window, COARSE_MS, from, w.coarse.lo)?;
            w.coarse.extend_down(from, loaded);
        }
        let mut sum = w.coarse_after(coarse);
        if from.saturating_sub(w.coarse.lo) > 120 {
            w.trim_coarse(from.saturating_sub(60));
        }

        // The later one-second buckets of the minute holding `since`.
        let from = fine.saturating_add(1);
        if !w.fine.covers(from) && near(FINE_SPAN_MS) {
            let loaded = load_buckets(conn, dirty, window, FINE_MS, from, w.fine.lo)?;
            w.fine.extend_down(from, loaded);
        }
        let fine_sum = if w.fine.covers(from) {
            w.fine.sum_between(fine, coarse_end_fine)
        } else {
            db_fine_sum(conn, dirty, window, fine, coarse_end_fine)?
        };
        sum = sum.saturating_add(fine_sum);

        // The rows with `at > since` in the second holding `since`.
        let from = since.saturating_add(1);
        if !w.rows.covers(from) && near(ROWS_SPAN_MS) {
            let loaded = load_rows(conn, window, from, w.rows.lo)?;
            w.rows.extend_down(from, loaded);
        }
        let rows_sum = if w.rows.covers(from) {
            w.rows.sum_between(since, fine_end)
        } else {
            db_rows_sum(conn, window, since, fine_end)?
        };
        Ok(sum.saturating_add(rows_sum))
    }

    /// Inserts the reservation rows of one request at `at` — `(window, amount, expires)`, window
    /// keys distinct — with one multi-row statement (per [`CHUNK`] windows), and adds each
    /// amount to both bucket levels of its window (written by the batch's flush).
    pub(super) fn reserve(
        &mut self,
        conn: &Connection,
        request_id: &str,
        at: i64,
        reservations: &[(&str, U256, i64)],
    ) -> Result<(), StoreError> {
        for chunk in reservations.chunks(CHUNK) {
            let mut buckets = Vec::with_capacity(chunk.len());
            for &(window, amount, expires) in chunk {
                self.cover_span(conn, window, expires.saturating_sub(at).max(0))?;
                buckets.push(self.step(conn, window, at, amount, true)?);
            }
            let mut sql = String::from(
                "INSERT INTO reservations (request_id, window_key, amount, at, expires_at) VALUES ",
            );
            push_rows(&mut sql, chunk.len(), 5);
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut i = 0;
            let mut bind = |v: &dyn rusqlite::ToSql| -> Result<(), rusqlite::Error> {
                i += 1;
                stmt.raw_bind_parameter(i, v)
            };
            for &(window, amount, expires) in chunk {
                bind(&request_id)?;
                bind(&window)?;
                bind(&amount.to_be_bytes::<32>().as_slice())?;
                bind(&at)?;
                bind(&expires)?;
            }
            stmt.raw_execute()?;
            for (&(window, _, expires), &(fine, fine_total, coarse, coarse_total)) in
                chunk.iter().zip(&buckets)
            {
                self.set_dirty(window, FINE_MS, fine, fine_total, Some(expires));
                self.set_dirty(window, COARSE_MS, coarse, coarse_total, Some(expires));
            }
        }
        Ok(())
    }

    /// Records that the reservation row of `amount` at `at` in `window` was deleted, and
    /// subtracts it from both bucket levels (written by the batch's flush, which deletes a
    /// bucket that dropped to zero).
    pub(super) fn release(
        &mut self,
        conn: &Connection,
        window: &str,
        at: i64,
        amount: U256,
    ) -> Result<(), StoreError> {
        let (fine, fine_total, coarse, coarse_total) =
            self.step(conn, window, at, amount, false)?;
        self.set_dirty(window, FINE_MS, fine, fine_total, None);
        self.set_dirty(window, COARSE_MS, coarse, coarse_total, None);
        Ok(())
    }

    /// Applies a reservation row's insertion (`add`) or deletion to the cache and returns the
    /// new totals of the two buckets holding `at`, `(fine, total, coarse, total)`, which the
    /// caller writes to the database in the same transaction.
    fn step(
        &mut self,
        conn: &Connection,
        window: &str,
        at: i64,
        amount: U256,
        add: bool,
    ) -> Result<(i64, U256, i64, U256), StoreError> {
        let dirty = self.dirty.get(window);
        let w = window_entry(&mut self.windows, dirty, conn, window, at)?;
        let fine = at.div_euclid(FINE_MS);
        let coarse = at.div_euclid(COARSE_MS);
        let fine_total = step(w.fine.get(conn, dirty, window, FINE_MS, fine)?, amount, add)?;
        let coarse_total = step(
            w.coarse.get(conn, dirty, window, COARSE_MS, coarse)?,
            amount,
            add,
        )?;
        w.fine.set(fine, fine_total);
        w.set_coarse(coarse, coarse_total);
        let keep = w.rows.adjust(at, amount, add);
        if !keep {
            // A per-millisecond sum that may have saturated cannot be subtracted from exactly.
            w.rows = Tracked::empty();
        }
        if add {
            if w.rows.lo != i64::MAX && at.saturating_sub(w.rows.lo) > 4 * ROWS_SPAN_MS {
                w.rows.trim(at.saturating_sub(2 * ROWS_SPAN_MS));
            }
            let fine_span = FINE_SPAN_MS / FINE_MS;
            if fine.saturating_sub(w.fine.lo) > 2 * fine_span {
                w.fine.trim(fine.saturating_sub(fine_span + 1));
            }
        }
        Ok((fine, fine_total, coarse, coarse_total))
    }
}

/// The window's entry, created (tracking one-second buckets from `at` on) if new. A free
/// function over the map, so the caller can hold the window's unflushed buckets beside it.
fn window_entry<'w>(
    windows: &'w mut HashMap<String, CachedWindow>,
    dirty: Option<&BTreeMap<(i64, i64), Dirty>>,
    conn: &Connection,
    window: &str,
    at: i64,
) -> Result<&'w mut CachedWindow, StoreError> {
    if !windows.contains_key(window) {
        let mut w = CachedWindow::new();
        // Track the one-second buckets from now on, so writes need not read them back.
        let from = at.div_euclid(FINE_MS);
        let loaded = load_buckets(conn, dirty, window, FINE_MS, from, i64::MAX)?;
        w.fine.extend_down(from, loaded);
        windows.insert(window.to_owned(), w);
    }
    windows
        .get_mut(window)
        .ok_or_else(|| StoreError::Database("window cache entry vanished".into()))
}

/// One window's cached state.
#[derive(Debug)]
struct CachedWindow {
    /// Reservation amounts summed per millisecond `at` (short windows only).
    rows: Tracked,
    /// One-second bucket totals by bucket index.
    fine: Tracked,
    /// One-minute bucket totals by bucket index.
    coarse: Tracked,
    /// `sum` is the total of the one-minute buckets with index `> sum_from`; `None` when it must
    /// be recomputed (not yet computed, or it would pass 2^256).
    sum_from: i64,
    sum: Option<U256>,
}

impl CachedWindow {
    fn new() -> Self {
        Self {
            rows: Tracked::empty(),
            fine: Tracked::empty(),
            coarse: Tracked::empty(),
            sum_from: i64::MAX,
            sum: None,
        }
    }

    /// The total of the one-minute buckets after `c`; needs `coarse.covers(c + 1)`.
    fn coarse_after(&mut self, c: i64) -> U256 {
        if let Some(sum) = self.sum {
            let moved = if c > self.sum_from {
                // Every bucket in (sum_from, c] is part of the exact sum, so no saturation.
                sum.checked_sub(self.coarse.sum_between(self.sum_from, c.saturating_add(1)))
            } else if c < self.sum_from {
                self.coarse
                    .checked_sum_between(c, self.sum_from.saturating_add(1))
                    .and_then(|extra| sum.checked_add(extra))
            } else {
                Some(sum)
            };
            if let Some(sum) = moved {
                self.sum_from = c;
                self.sum = Some(sum);
                return sum;
            }
        }
        self.sum_from = c;
        self.sum = self.coarse.checked_sum_between(c, i64::MAX);
        // Past 2^256 the total saturates, as the database sum does; it refuses every amount.
        self.sum.unwrap_or(U256::MAX)
    }

    /// Sets a one-minute bucket's total, keeping the running sum exact.
    fn set_coarse(&mut self, bucket: i64, total: U256) {
        let Some(old) = self.coarse.value(bucket) else {
            return;
        };
        self.coarse.set(bucket, total);
        if bucket > self.sum_from {
            self.sum = self.sum.and_then(|s| {
                if total >= old {
                    s.checked_add(total - old)
                } else {
                    s.checked_sub(old - total)
                }
            });
        }
    }

    /// Drops one-minute buckets below `cutoff` (never one counted in the running sum).
    fn trim_coarse(&mut self, cutoff: i64) {
        let cutoff = if self.sum.is_some() {
            cutoff.min(self.sum_from.saturating_add(1))
        } else {
            cutoff
        };
        self.coarse.trim(cutoff);
    }
}

/// An exact copy of a map from the database for every key `>= lo` (a missing key is zero);
/// `lo == i64::MAX` means nothing is tracked.
#[derive(Debug)]
struct Tracked {
    lo: i64,
    map: BTreeMap<i64, U256>,
}

impl Tracked {
    fn empty() -> Self {
        Self {
            lo: i64::MAX,
            map: BTreeMap::new(),
        }
    }

    fn covers(&self, from: i64) -> bool {
        self.lo != i64::MAX && from >= self.lo
    }

    /// The value at `key`, if tracked.
    fn value(&self, key: i64) -> Option<U256> {
        self.covers(key)
            .then(|| self.map.get(&key).copied().unwrap_or(U256::ZERO))
    }

    /// The value at `key`, from the database if not tracked.
    fn get(
        &self,
        conn: &Connection,
        dirty: Option<&BTreeMap<(i64, i64), Dirty>>,
        window: &str,
        width: i64,
        key: i64,
    ) -> Result<U256, StoreError> {
        if let Some(v) = self.value(key) {
            return Ok(v);
        }
        if let Some(d) = dirty.and_then(|d| d.get(&(width, key))) {
            return Ok(d.total);
        }
        let blob: Option<Vec<u8>> = conn
            .prepare_cached(
                "SELECT total FROM window_buckets
                 WHERE window_key = ?1 AND width = ?2 AND bucket = ?3",
            )?
            .query_row(params![window, width, key], |r| r.get(0))
            .optional()?;
        blob.map_or(Ok(U256::ZERO), |b| u256(&b))
    }

    /// Sets a tracked key (untracked keys are left to the database).
    fn set(&mut self, key: i64, total: U256) {
        if self.covers(key) {
            if total.is_zero() {
                self.map.remove(&key);
            } else {
                self.map.insert(key, total);
            }
        }
    }

    /// Adds or subtracts at a tracked key; `false` when the result cannot be exact.
    fn adjust(&mut self, key: i64, amount: U256, add: bool) -> bool {
        let Some(old) = self.value(key) else {
            return true;
        };
        let new = if add {
            old.saturating_add(amount)
        } else if old == U256::MAX {
            return false;
        } else {
            match old.checked_sub(amount) {
                Some(v) => v,
                None => return false,
            }
        };
        self.set(key, new);
        true
    }

    /// Adds the database's rows for keys in `[from, lo)` and lowers `lo` to `from`.
    fn extend_down(&mut self, from: i64, loaded: Vec<(i64, U256)>) {
        for (k, v) in loaded {
            let e = self.map.entry(k).or_insert(U256::ZERO);
            *e = e.saturating_add(v);
        }
        self.lo = self.lo.min(from);
    }

    /// Forgets keys below `cutoff`.
    fn trim(&mut self, cutoff: i64) {
        if cutoff > self.lo && self.lo != i64::MAX {
            self.map = self.map.split_off(&cutoff);
            self.lo = cutoff;
        }
    }

    /// Saturating total of the keys strictly between `after` and `before`.
    fn sum_between(&self, after: i64, before: i64) -> U256 {
        self.checked_sum_between(after, before).unwrap_or(U256::MAX)
    }

    /// Total of the keys strictly between `after` and `before`, `None` past 2^256.
    fn checked_sum_between(&self, after: i64, before: i64) -> Option<U256> {
        let (Some(lo), true) = (after.checked_add(1), after < before) else {
            return Some(U256::ZERO);
        };
        if lo >= before {
            return Some(U256::ZERO);
        }
        self.map
            .range(lo..before)
            .try_fold(U256::ZERO, |s, (_, v)| s.checked_add(*v))
    }
}

/// The total of `window`'s reservations with `at > since`, exact, from the database: the rows
/// with `at > since` in the one-second bucket holding `since`, plus the later one-second buckets
/// of the minute holding `since`, plus every later one-minute bucket. Each reservation is in
/// exactly one of the three.
pub(super) fn window_sum(c: &Connection, window: &str, since: i64) -> Result<U256, StoreError> {
    let fine = since.div_euclid(FINE_MS);
    let fine_end = fine.saturating_add(1).saturating_mul(FINE_MS);
    let coarse = since.div_euclid(COARSE_MS);
    let coarse_end_fine = coarse.saturating_add(1).saturating_mul(COARSE_MS / FINE_MS);
    let rows = db_rows_sum(c, window, since, fine_end)?;
    let fine = db_fine_sum(c, None, window, fine, coarse_end_fine)?;
    let mut sum = rows.saturating_add(fine);
    let mut stmt = c.prepare_cached(
        "SELECT total FROM window_buckets WHERE window_key = ?1 AND width = ?2 AND bucket > ?3",
    )?;
    let mut q = stmt.query(params![window, COARSE_MS, coarse])?;
    while let Some(r) = q.next()? {
        sum = sum.saturating_add(blob_u256(r)?);
    }
    Ok(sum)
}

/// Appends `rows` placeholders of `cols` anonymous parameters: `(?, ?), (?, ?)`.
fn push_rows(sql: &mut String, rows: usize, cols: usize) {
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..cols {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push('?');
        }
        sql.push(')');
    }
}

/// `current ± amount`, as a bucket total: adding saturates, subtracting below zero is corruption.
fn step(current: U256, amount: U256, add: bool) -> Result<U256, StoreError> {
    if add {
        Ok(current.saturating_add(amount))
    } else {
        current
            .checked_sub(amount)
            .ok_or_else(|| corrupt("window bucket total below its rows"))
    }
}

fn db_rows_sum(c: &Connection, window: &str, since: i64, before: i64) -> Result<U256, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT amount FROM reservations WHERE window_key = ?1 AND at > ?2 AND at < ?3",
    )?;
    let mut q = stmt.query(params![window, since, before])?;
    let mut sum = U256::ZERO;
    while let Some(r) = q.next()? {
        // A sum past 2^256 cannot be under any limit; saturating keeps it refusing.
        sum = sum.saturating_add(blob_u256(r)?);
    }
    Ok(sum)
}

/// The one-second buckets strictly between `after` and `before`, unflushed totals included.
fn db_fine_sum(
    c: &Connection,
    dirty: Option<&BTreeMap<(i64, i64), Dirty>>,
    window: &str,
    after: i64,
    before: i64,
) -> Result<U256, StoreError> {
    let Some(from) = after.checked_add(1) else {
        return Ok(U256::ZERO);
    };
    if from >= before {
        return Ok(U256::ZERO);
    }
    Ok(load_buckets(c, dirty, window, FINE_MS, from, before)?
        .into_iter()
        // A sum past 2^256 cannot be under any limit; saturating keeps it refusing.
        .fold(U256::ZERO, |s, (_, v)| s.saturating_add(v)))
}

/// Buckets of one width with `from <= bucket < before`.
fn load_buckets(
    c: &Connection,
    dirty: Option<&BTreeMap<(i64, i64), Dirty>>,
    window: &str,
    width: i64,
    from: i64,
    before: i64,
) -> Result<Vec<(i64, U256)>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT bucket, total FROM window_buckets
         WHERE window_key = ?1 AND width = ?2 AND bucket >= ?3 AND bucket < ?4",
    )?;
    let mut q = stmt.query(params![window, width, from, before])?;
    let mut out = Vec::new();
    while let Some(r) = q.next()? {
        out.push((r.get(0)?, u256(&r.get::<_, Vec<u8>>(1)?)?));
    }
    // Totals changed in this batch and not yet written replace (or add) their rows.
    let pending = dirty
        .map(|d| d.range((width, from)..(width, before)).collect::<Vec<_>>())
        .unwrap_or_default();
    if !pending.is_empty() {
        let mut merged: BTreeMap<i64, U256> = out.into_iter().collect();
        for (&(_, bucket), d) in pending {
            if d.total.is_zero() {
                merged.remove(&bucket);
            } else {
                merged.insert(bucket, d.total);
            }
        }
        out = merged.into_iter().collect();
    }
    Ok(out)
}

/// Reservation rows with `from <= at < before`.
fn load_rows(
    c: &Connection,
    window: &str,
    from: i64,
    before: i64,
) -> Result<Vec<(i64, U256)>, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT at, amount FROM reservations WHERE window_key = ?1 AND at >= ?2 AND at < ?3",
    )?;
    let mut q = stmt.query(params![window, from, before])?;
    let mut out = Vec::new();
    while let Some(r) = q.next()? {
        out.push((r.get(0)?, u256(&r.get::<_, Vec<u8>>(1)?)?));
    }
    Ok(out)
}

fn blob_u256(r: &rusqlite::Row<'_>) -> Result<U256, StoreError> {
    let blob = r
        .get_ref(0)?
        .as_blob()
        .map_err(|e| corrupt(&format!("amount: {e}")))?;
    u256(blob)
}

fn u256(b: &[u8]) -> Result<U256, StoreError> {
    U256::try_from_be_slice(b).ok_or_else(|| corrupt("amount"))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Database(format!("corrupt row: {what}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn bucket(c: &Connection, width: i64, bucket: i64) -> Option<U256> {
        c.query_row(
            "SELECT total FROM window_buckets WHERE window_key = 'w' AND width = ?1 AND bucket = ?2",
            params![width, bucket],
            |r| r.get::<_, Vec<u8>>(0),
        )
        .optional()
        .unwrap()
        .map(|b| u256(&b).unwrap())
    }

    /// Bucket totals wait in the cache until the flush, so every read of a bucket the cache does
    /// not track must see them first: here a decision earlier than the one that created the
    /// window's entry (concurrent callers take their times before queueing) lands in a second
    /// the cache does not track, twice in one batch.
    #[test]
    fn unflushed_totals_are_read_before_the_database_and_flushed_once() {
        let mut c = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut c).unwrap();
        c.pragma_update(None, "foreign_keys", "OFF").unwrap();
        c.execute_batch("BEGIN").unwrap();
        let mut cache = WindowCache::default();
        cache.begin_batch(&c).unwrap();
        let expires = 200_000;
        cache
            .reserve(&c, "r1", 10_500, &[("w", U256::from(5), expires)])
            .unwrap();
        cache
            .reserve(&c, "r2", 9_999, &[("w", U256::from(7), expires)])
            .unwrap();
        cache
            .reserve(&c, "r3", 9_998, &[("w", U256::from(11), expires)])
            .unwrap();
        assert_eq!(
            bucket(&c, FINE_MS, 9),
            None,
            "nothing written before the flush"
        );
        let pending = load_buckets(&c, cache.dirty.get("w"), "w", FINE_MS, 0, 100).unwrap();
        assert_eq!(pending, vec![(9, U256::from(18)), (10, U256::from(5))]);
        assert_eq!(
            db_fine_sum(&c, cache.dirty.get("w"), "w", 8, 60).unwrap(),
            U256::from(23)
        );
        // A release in the same batch lowers the unflushed total.
        cache.release(&c, "w", 9_999, U256::from(7)).unwrap();
        assert!(cache.has_dirty());
        cache.flush(&c).unwrap();
        assert!(!cache.has_dirty());
        assert_eq!(bucket(&c, FINE_MS, 9), Some(U256::from(11)));
        assert_eq!(bucket(&c, FINE_MS, 10), Some(U256::from(5)));
        assert_eq!(bucket(&c, COARSE_MS, 0), Some(U256::from(16)));
        // Releasing the rest deletes the rows at the next flush.
        cache.release(&c, "w", 9_998, U256::from(11)).unwrap();
        cache.release(&c, "w", 10_500, U256::from(5)).unwrap();
        cache.flush(&c).unwrap();
        assert_eq!(bucket(&c, FINE_MS, 9), None);
        assert_eq!(bucket(&c, COARSE_MS, 0), None);
        c.execute_batch("COMMIT").unwrap();
    }
}
