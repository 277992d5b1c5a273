//! Checkpointing through a [`KeyBackend`] (the test-only software backend in `audit::tests`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::json;

use super::*;
use crate::audit::tests::TestBackend;
use crate::audit::{AuditKind, ChainProblem, verify_chain};

/// An audit entry of no particular meaning, `i` in its payload (also for `sqlite`'s tests).
pub(super) fn event(i: u64) -> AuditEntry {
    AuditEntry {
        at: UnixMillis(1_800_000_000_000 + i),
        kind: AuditKind::PolicyChange,
        request_id: None,
        identity: Some("admin".into()),
        payload: json!({"i": i}),
    }
}

/// Registers and activates key `name` with the public key of the test backend's key `seed`.
async fn active_test_key(store: &SqliteStore, name: &str, seed: u8, at: u64) -> KeyVersion {
    let signing = TestBackend::new(seed).audit_key();
    let change = Change::new("admin", UnixMillis(at));
    let v = store
        .register_key_version(
            NewKeyVersion {
                name: KeyName::new(name).expect("name"),
                key_ref: signing.key_ref.clone(),
                address: signing.address,
                public_key: signing
                    .public_key
                    .to_encoded_point(true)
                    .as_bytes()
                    .to_vec(),
                rotate_every_ms: None,
            },
            change.clone(),
        )
        .await
        .expect("register");
    store
        .activate_version(v.version.clone(), None, change)
        .await
        .expect("activate");
    v.version
}

#[tokio::test]
async fn checkpoints_every_n_records_and_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path().join("db")).expect("open");
    let backend = TestBackend::new(7);
    let key = backend.audit_key();
    let now = UnixMillis(1_800_000_000_000);

    assert_eq!(
        checkpoint_if_due(&store, &backend, &key, 5, now)
            .await
            .expect("empty"),
        None,
        "nothing to checkpoint in an empty chain"
    );
    let mut checkpoints = Vec::new();
    for i in 0..23 {
        store.append_audit(event(i)).await.expect("append");
        if let Some(cp) = checkpoint_if_due(&store, &backend, &key, 5, now)
            .await
            .expect("checkpoint")
        {
            checkpoints.push(cp.seq);
        }
    }
    // A checkpoint after every 5 records (the checkpoint itself counts as a record).
    assert_eq!(checkpoints, vec![6, 12, 18, 24]);
    assert_eq!(store.last_checkpoint_seq().await.expect("read"), Some(24));

    let records = store
        .audit_records(AuditCursor::Seq(1), usize::MAX)
        .await
        .expect("records");
    let summary = verify_chain(&records, Some(key.address)).expect("verifies");
    assert_eq!(summary.checkpoints, 4);
    assert_eq!(summary.signed_through, Some(23));

    // The audit key of another device does not verify.
    let other = TestBackend::new(8).audit_key().address;
    let e = verify_chain(&records, Some(other)).expect_err("wrong audit key");
    assert_eq!(e.seq, 6);
    assert!(matches!(e.problem, ChainProblem::BadCheckpoint(_)));

    // The store refuses a checkpoint over a hash that is not in the chain.
    let mut bogus = crate::audit::sign_checkpoint(&backend, &key, (3, B256::repeat_byte(1)))
        .await
        .expect("sign");
    let e = store.append_checkpoint(bogus.clone(), now).await;
    assert!(matches!(e, Err(StoreError::Invalid(_))), "{e:?}");
    // ...and one whose signature is not by the key it names.
    bogus.hash = records[2].hash;
    let e = store.append_checkpoint(bogus, now).await;
    assert!(matches!(e, Err(StoreError::Invalid(_))), "{e:?}");
    // Plain appends cannot forge a checkpoint record.
    let mut forged = event(99);
    forged.kind = AuditKind::Checkpoint;
    assert!(matches!(
        store.append_audit(forged).await,
        Err(StoreError::Invalid(_))
    ));
}

#[tokio::test]
async fn maintenance_prunes_and_checkpoints_until_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path().join("db")).expect("open");
    let backend = TestBackend::new(7);
    let key = backend.audit_key();
    // A reservation made long ago, whose window has passed.
    let version = active_test_key(&store, "old", 9, 1_000).await;
    let window = WindowKey::new("key:old:value:60").expect("window");
    store
        .commit_decision(DecisionTx {
            request_id: RequestId::new("old-1").expect("id"),
            key: version,
            identity: "client".into(),
            at: UnixMillis(2_000),
            digest: B256::repeat_byte(2),
            allow_retiring: false,
            reservations: vec![Reservation {
                window: window.clone(),
                duration_ms: 60_000,
                amount: U256::from(5),
                limit: U256::from(10),
            }],
            details: json!({}),
        })
        .await
        .expect("decision");
    let query = vec![WindowQuery {
        window,
        duration_ms: 60_000,
    }];
    let in_window = UnixMillis(2_001);
    assert_eq!(
        store
            .window_sums(query.clone(), in_window)
            .await
            .expect("sum")[0]
            .1,
        U256::from(5)
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = run_maintenance(
        &store,
        &backend,
        Some(&key),
        3,
        std::time::Duration::from_millis(10),
        async {
            let _ = stopped.await;
        },
    );
    let check = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.last_checkpoint_seq().await.expect("read").is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint appended"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let _ = stop.send(());
    };
    tokio::join!(run, check);
    // Key register, activate, decision: then the checkpoint.
    assert_eq!(store.last_checkpoint_seq().await.expect("read"), Some(4));
    let records = store
        .audit_records(AuditCursor::Seq(1), usize::MAX)
        .await
        .expect("records");
    assert_eq!(
        records.len(),
        4,
        "one checkpoint: fewer than 3 records since"
    );
    // The expired reservation's row and buckets are gone (even seen from inside its window).
    assert_eq!(
        store.window_sums(query, in_window).await.expect("sum")[0].1,
        U256::ZERO
    );
    verify_chain(&records, Some(key.address)).expect("verifies");
}

/// A signature's outcome queued without waiting: visible to the next read, in chain order, and
/// committed without an fsync of its own when nothing durable shares its batch; a second store
/// on the file (another process, e.g. `keyctl`) sees it too; a failure cannot be queued.
#[tokio::test]
async fn queued_outcomes_are_read_back_in_order_without_an_fsync_of_their_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let store = SqliteStore::open(&path).expect("open");
    let (vk, address) = {
        let sk = k256::ecdsa::SigningKey::from_bytes(&[7u8; 32].into()).expect("scalar");
        let vk = *sk.verifying_key();
        (vk, Address::from_public_key(&vk))
    };
    let at = UnixMillis(1_800_000_000_000);
    let change = Change::new("spiffe://castellan/admin", at);
    let rec = store
        .register_key_version(
            NewKeyVersion {
                name: KeyName::new("hot").expect("name"),
                key_ref: KeyRef::Pkcs11 {
                    label: "hot-1".into(),
                    id: "01".into(),
                },
                address,
                public_key: vk.to_encoded_point(true).as_bytes().to_vec(),
                rotate_every_ms: None,
            },
            change.clone(),
        )
        .await
        .expect("register");
    let key = store
        .activate_version(rec.version, None, change)
        .await
        .expect("activate")
        .version;
    let decision = |id: &str| DecisionTx {
        request_id: RequestId::new(id).expect("id"),
        key: key.clone(),
        identity: "spiffe://castellan/strategy/alpha".into(),
        at,
        digest: B256::repeat_byte(3),
        allow_retiring: false,
        reservations: vec![Reservation {
            window: WindowKey::new("key:hot:value:3600").expect("window"),
            duration_ms: 3_600_000,
            amount: U256::from(5),
            limit: U256::from(1000),
        }],
        details: json!({"decision": "allow"}),
    };
    let signed = |id: &str, n: u64| OutcomeTx {
        request_id: RequestId::new(id).expect("id"),
        at: UnixMillis(at.0 + n),
        outcome: Outcome::Signed {
            details: json!({"response": {"n": n}}),
        },
    };

    for i in 0..20u64 {
        let id = format!("q{i}");
        store.commit_decision(decision(&id)).await.expect("decide");
        store.queue_outcome(signed(&id, i)).await.expect("queue");
        // Read your writes: the outcome queued just before is there.
        let stored = store
            .request(RequestId::new(id.as_str()).expect("id"))
            .await
            .expect("read")
            .expect("stored");
        assert!(
            matches!(stored.state, RequestState::Signed { .. }),
            "{id}: {:?}",
            stored.state
        );
    }
    // The outcomes above were committed alone (the read barrier is not durable either): no
    // fsync of their own.
    let stats = store.commit_stats();
    assert!(stats.unsynced >= 20, "{stats:?}");

    // Each signature record follows its decision record in the chain, and the chain verifies.
    let records = store
        .audit_records(AuditCursor::Seq(1), usize::MAX)
        .await
        .expect("records");
    verify_chain(&records, None).expect("verifies");
    for i in 0..20u64 {
        let id = format!("q{i}");
        let kinds: Vec<AuditKind> = records
            .iter()
            .filter(|r| r.request_id.as_deref() == Some(id.as_str()))
            .map(|r| r.kind)
            .collect();
        assert_eq!(
            kinds,
            vec![AuditKind::Decision, AuditKind::Signature],
            "{id}"
        );
    }

    // Another connection to the file sees the outcome as soon as it has been committed.
    store
        .commit_decision(decision("last"))
        .await
        .expect("decide");
    store
        .queue_outcome(signed("last", 99))
        .await
        .expect("queue");
    let _ = store.audit_head().await.expect("barrier");
    let other = SqliteStore::open(&path).expect("second store");
    let stored = other
        .request(RequestId::new("last").expect("id"))
        .await
        .expect("read")
        .expect("stored");
    assert!(matches!(stored.state, RequestState::Signed { .. }));

    // An outcome for a request that already has one is refused in the writer and logged; the
    // original stays.
    store
        .queue_outcome(signed("last", 100))
        .await
        .expect("queue");
    let stored = store
        .request(RequestId::new("last").expect("id"))
        .await
        .expect("read")
        .expect("stored");
    match stored.state {
        RequestState::Signed { details, .. } => assert!(details.contains("99"), "{details}"),
        other => panic!("{other:?}"),
    }

    // A failure releases reservations: it is always recorded durably, never queued.
    store
        .commit_decision(decision("fails"))
        .await
        .expect("decide");
    let e = store
        .queue_outcome(OutcomeTx {
            request_id: RequestId::new("fails").expect("id"),
            at,
            outcome: Outcome::Failed {
                reason: "device".into(),
                release: true,
            },
        })
        .await;
    assert!(matches!(e, Err(StoreError::Invalid(_))), "{e:?}");
}

/// The checkpoint thread copies the WAL into the database file while the store is open (the
/// writer never checkpoints), and under writes without a pause the WAL stays bounded: past
/// `wal_restart_frames` the writer restarts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_thread_copies_the_wal_and_the_wal_stays_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let wal = dir.path().join("db-wal");
    let config = SqliteConfig {
        wal_restart_frames: 128,
        checkpoint_interval: std::time::Duration::from_millis(100),
        ..SqliteConfig::default()
    };
    let store = SqliteStore::open_with(&path, config).expect("open");
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let db_before = size(&path);
    // 2000 records of about 2 KB, one commit each, with no pause: about 2000 WAL frames.
    let mut wal_max = 0;
    for i in 0..2000u64 {
        let mut e = event(i);
        e.payload = json!({"i": i, "filler": "x".repeat(2000)});
        store.append_audit(e).await.expect("append");
        wal_max = wal_max.max(size(&wal));
    }
    let stats = store.commit_stats();
    assert!(stats.checkpoints > 0, "{stats:?}");
    // Copied into the database file without a close to trigger it.
    assert!(
        size(&path) > db_before + (3 << 20),
        "database file {} bytes (was {db_before}): the WAL was not copied into it",
        size(&path)
    );
    // Frames are 4 KiB + 24 bytes. Unbounded, the WAL would hold all ~2000; restarted past 128
    // frames (checked every 100 ms), it stays far below.
    let frames = wal_max / 4120;
    eprintln!("WAL at most {frames} frames over 2000 commits ({stats:?})");
    assert!(frames < 1000, "WAL grew to {frames} frames");
    let records = store
        .audit_records(AuditCursor::Seq(1), usize::MAX)
        .await
        .expect("records");
    assert_eq!(records.len(), 2000);
    verify_chain(&records, None).expect("verifies");
}

/// Schema version 3 (reservations keyed by window, expiry through `window_spans`) migrates a
/// version 2 file: the rows and buckets keep their window sums, each window's span is the
/// longest duration it was reserved for, a failure releases a migrated reservation, and pruning
/// removes exactly the expired rows and buckets.
#[tokio::test]
async fn a_version_2_database_migrates_with_its_reservations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    let t0 = 1_800_000_000_000u64;
    let short = WindowKey::new("key:k:requests:60").expect("window");
    let long = WindowKey::new("key:k:value:3600").expect("window");
    let reservation = |window: &WindowKey, duration_ms: u64, amount: u64| Reservation {
        window: window.clone(),
        duration_ms,
        amount: U256::from(amount),
        limit: U256::MAX,
    };
    async fn window_totals(
        store: &SqliteStore,
        windows: &[(&WindowKey, u64)],
        at: u64,
    ) -> Vec<U256> {
        let q = windows
            .iter()
            .map(|(w, d)| WindowQuery {
                window: (*w).clone(),
                duration_ms: *d,
            })
            .collect();
        store
            .window_sums(q, UnixMillis(at))
            .await
            .expect("sums")
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    }
    let windows = [(&short, 60_000u64), (&long, 3_600_000u64)];
    let before = {
        let store = SqliteStore::open(&path).expect("open");
        let version = active_test_key(&store, "k", 9, t0).await;
        // Three decisions, 1.5 s apart, each in both windows; the third stays unsigned.
        for i in 0..3u64 {
            store
                .commit_decision(DecisionTx {
                    request_id: RequestId::new(format!("r{i}")).expect("id"),
                    key: version.clone(),
                    identity: "client".into(),
                    at: UnixMillis(t0 + 1_500 * i),
                    digest: B256::repeat_byte(2),
                    allow_retiring: false,
                    reservations: vec![
                        reservation(&short, 60_000, 1),
                        reservation(&long, 3_600_000, 10 + i),
                    ],
                    details: json!({}),
                })
                .await
                .expect("decision");
        }
        let s = window_totals(&store, &windows, t0 + 3_001).await;
        assert_eq!(s, vec![U256::from(3), U256::from(33)]);
        s
    };
    // Back to the version 2 layout, as a file written by the previous release.
    {
        let c = rusqlite::Connection::open(&path).expect("raw open");
        c.execute_batch(
            "BEGIN;
             CREATE TABLE reservations_v2 (
                 request_id TEXT NOT NULL REFERENCES requests(request_id),
                 window_key TEXT NOT NULL,
                 amount     BLOB NOT NULL CHECK (length(amount) = 32),
                 at         INTEGER NOT NULL,
                 expires_at INTEGER NOT NULL,
                 PRIMARY KEY (request_id, window_key)
             ) STRICT;
             INSERT INTO reservations_v2 SELECT request_id, window_key, amount, at, expires_at
                 FROM reservations;
             DROP TABLE reservations;
             ALTER TABLE reservations_v2 RENAME TO reservations;
             CREATE INDEX reservations_window ON reservations(window_key, at, amount);
             CREATE INDEX reservations_expiry ON reservations(expires_at);
             CREATE INDEX window_buckets_expiry ON window_buckets(expires_at);
             DROP TABLE window_spans;
             PRAGMA user_version = 2;
             COMMIT;",
        )
        .expect("downgrade");
    }
    let store = SqliteStore::open(&path).expect("migrate");
    {
        let c = rusqlite::Connection::open(&path).expect("raw open");
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, 3);
        let mut spans = c
            .prepare("SELECT window_key, duration_ms FROM window_spans ORDER BY window_key")
            .expect("prepare")
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .expect("query")
            .collect::<Result<Vec<_>, _>>()
            .expect("rows");
        spans.sort();
        assert_eq!(
            spans,
            vec![
                ("key:k:requests:60".to_string(), 60_000),
                ("key:k:value:3600".to_string(), 3_600_000)
            ]
        );
        let indexes: i64 = c
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'index'
                 AND name IN ('reservations_window', 'reservations_expiry', 'window_buckets_expiry')",
                [],
                |r| r.get(0),
            )
            .expect("indexes");
        assert_eq!(indexes, 0, "the version 2 indexes are gone");
    }
    assert_eq!(window_totals(&store, &windows, t0 + 3_001).await, before);
    // Inside the boundary second: `at > since` still counts to the millisecond.
    assert_eq!(
        window_totals(&store, &windows, t0 + 61_500).await,
        vec![U256::from(1), U256::from(33)]
    );
    // A failure releases the migrated reservation of the unsigned request.
    store
        .record_outcome(OutcomeTx {
            request_id: RequestId::new("r2").expect("id"),
            at: UnixMillis(t0 + 3_100),
            outcome: Outcome::Failed {
                reason: "test".into(),
                release: true,
            },
        })
        .await
        .expect("release");
    assert_eq!(
        window_totals(&store, &windows, t0 + 3_101).await,
        vec![U256::from(2), U256::from(21)]
    );
    // Pruning (5 min grace) removes the short window's rows at once; a bucket goes once its whole
    // interval has expired (here the minute holding both rows), the long window keeps all.
    let count = |sql: &str| -> i64 {
        rusqlite::Connection::open(&path)
            .expect("raw open")
            .query_row(sql, [], |r| r.get(0))
            .expect("count")
    };
    store
        .prune_reservations(UnixMillis(t0 + 1_500 + 60_000 + 300_000))
        .await
        .expect("prune");
    assert_eq!(
        count("SELECT count(*) FROM reservations WHERE window_key = 'key:k:requests:60'"),
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM window_buckets WHERE window_key = 'key:k:requests:60'"),
        2,
        "the second and the minute holding the second row are not over yet"
    );
    store
        .prune_reservations(UnixMillis(t0 + 60_000 + 60_000 + 300_000))
        .await
        .expect("prune");
    assert_eq!(
        count("SELECT count(*) FROM window_buckets WHERE window_key = 'key:k:requests:60'"),
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM reservations WHERE window_key = 'key:k:value:3600'"),
        2
    );
    assert_eq!(
        window_totals(&store, &windows, t0 + 60_000 + 60_000 + 300_000).await,
        vec![U256::ZERO, U256::from(21)]
    );
}

/// The decision record's amounts are written in decimal by a fast path below 2^128 and by the
/// general one above: both give what `U256`'s own formatting gives.
#[test]
fn decimal_amounts_match_u256_formatting() {
    for v in [
        U256::ZERO,
        U256::from(7u64),
        U256::from(u64::MAX),
        U256::from(u128::MAX),
        U256::from(u128::MAX) + U256::from(1u64),
        U256::MAX,
    ] {
        let mut out = Vec::new();
        super::sqlite::write_decimal_str(&mut out, v);
        assert_eq!(String::from_utf8(out).expect("utf8"), format!("\"{v}\""));
    }
}
