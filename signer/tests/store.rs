//! The store against real SQLite files in temporary directories: the decision transaction and its
//! refusals, limit windows (boundaries, expiry, concurrency, two instances on one file),
//! durability across reopen, the key registry, approvals, grants and the audit export.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use alloy::primitives::{Address, B256, U256, keccak256};
use castellan_signer::audit::{self, AuditEntry, AuditKind, UnixMillis, verify_chain};
use castellan_signer::backend::KeyRef;
use castellan_signer::store::{
    Approval, AuditCursor, Change, DecisionTx, Grant, KeyName, KeyStatus, KeyVersion,
    NewKeyVersion, Outcome, OutcomeTx, PendingRequest, PendingStatus, Refusal, RequestId,
    RequestState, Reservation, SqliteStore, Store, StoreError, WindowKey, WindowQuery,
    export_jsonl,
};
use k256::ecdsa::SigningKey;
use serde_json::json;

const T0: u64 = 1_800_000_000_000;
const HOUR: u64 = 3_600_000;

fn at(offset_ms: u64) -> UnixMillis {
    UnixMillis(T0 + offset_ms)
}

fn admin(offset_ms: u64) -> Change {
    Change::new("spiffe://castellan/admin", at(offset_ms))
}

fn key_material(seed: u8) -> (Vec<u8>, Address) {
    let mut bytes = [7u8; 32];
    bytes[31] = seed;
    let sk = SigningKey::from_bytes((&bytes).into()).expect("scalar");
    let vk = *sk.verifying_key();
    (
        vk.to_encoded_point(true).as_bytes().to_vec(),
        Address::from_public_key(&vk),
    )
}

fn new_version(name: &str, seed: u8) -> NewKeyVersion {
    let (public_key, address) = key_material(seed);
    NewKeyVersion {
        name: KeyName::new(name).expect("name"),
        key_ref: KeyRef::Pkcs11 {
            label: format!("{name}-{seed}"),
            id: format!("{seed:02x}"),
        },
        address,
        public_key,
        rotate_every_ms: None,
    }
}

/// Registers and activates `name@1`.
async fn active_key(store: &SqliteStore, name: &str, seed: u8) -> KeyVersion {
    let rec = store
        .register_key_version(new_version(name, seed), admin(0))
        .await
        .expect("register");
    store
        .activate_version(rec.version.clone(), None, admin(0))
        .await
        .expect("activate")
        .version
}

fn window(name: &str) -> WindowKey {
    WindowKey::new(format!("key:searcher-hot:value:{name}")).expect("window")
}

fn reservation(w: &str, amount: u64, limit: u64) -> Reservation {
    Reservation {
        window: window(w),
        duration_ms: HOUR,
        amount: U256::from(amount),
        limit: U256::from(limit),
    }
}

fn decision(id: &str, key: &KeyVersion, when: u64, reservations: Vec<Reservation>) -> DecisionTx {
    DecisionTx {
        request_id: RequestId::new(id).expect("id"),
        key: key.clone(),
        identity: "spiffe://castellan/strategy-a".into(),
        at: at(when),
        digest: keccak256(id.as_bytes()),
        allow_retiring: false,
        reservations,
        details: json!({"decision": "allow", "policy_hash": "0xabc", "value": "1"}),
    }
}

async fn sum(store: &SqliteStore, w: &str, when: u64) -> U256 {
    sum_over(store, w, HOUR, when).await
}

/// What a reader (not the writer) sums for window `w` of `duration_ms` at `when`.
async fn sum_over(store: &SqliteStore, w: &str, duration_ms: u64, when: u64) -> U256 {
    let sums = store
        .window_sums(
            vec![WindowQuery {
                window: window(w),
                duration_ms,
            }],
            at(when),
        )
        .await
        .expect("sums");
    sums[0].1
}

async fn all_records(store: &SqliteStore) -> Vec<audit::AuditRecord> {
    store
        .audit_records(AuditCursor::Seq(1), usize::MAX)
        .await
        .expect("records")
}

fn refusal(e: StoreError) -> Refusal {
    match e {
        StoreError::Refused(r) => r,
        other => panic!("expected a refusal, got {other}"),
    }
}

fn tempdb() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("castellan.db");
    (dir, path)
}

#[tokio::test]
async fn decision_within_limit_commits_and_outcome_is_recorded() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let key = active_key(&store, "searcher-hot", 1).await;

    let receipt = store
        .commit_decision(decision("r1", &key, 10, vec![reservation("1h", 40, 100)]))
        .await
        .expect("commit");
    assert_eq!(sum(&store, "1h", 20).await, U256::from(40));
    let stored = store
        .request(RequestId::new("r1").expect("id"))
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(stored.state, RequestState::Reserved);
    assert_eq!(stored.decision_seq, receipt.seq);
    assert_eq!(stored.key, key);

    let out = store
        .record_outcome(OutcomeTx {
            request_id: RequestId::new("r1").expect("id"),
            at: at(11),
            outcome: Outcome::Signed {
                details: json!({"signature": "0x1234", "tx_hash": "0xfeed"}),
            },
        })
        .await
        .expect("outcome");
    assert_eq!(out.seq, receipt.seq + 1);
    // The reservation stays: the money was spent.
    assert_eq!(sum(&store, "1h", 20).await, U256::from(40));

    let records = all_records(&store).await;
    let kinds: Vec<_> = records.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        vec![
            AuditKind::KeyChange,
            AuditKind::KeyChange,
            AuditKind::Decision,
            AuditKind::Signature
        ]
    );
    assert_eq!(records[2].request_id.as_deref(), Some("r1"));
    assert_eq!(records[2].payload["reservations"][0]["amount"], json!("40"));
    assert_eq!(records[3].payload["details"]["tx_hash"], json!("0xfeed"));
    verify_chain(&records, None).expect("chain verifies");

    // A second outcome for the same request is a conflict.
    let again = store
        .record_outcome(OutcomeTx {
            request_id: RequestId::new("r1").expect("id"),
            at: at(12),
            outcome: Outcome::Failed {
                reason: "late".into(),
                release: true,
            },
        })
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert_eq!(sum(&store, "1h", 20).await, U256::from(40));
}

#[tokio::test]
async fn limit_boundary_minus_one_exact_plus_one() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let key = active_key(&store, "searcher-hot", 1).await;

    // limit − 1: allowed.
    store
        .commit_decision(decision("a", &key, 1, vec![reservation("w", 99, 100)]))
        .await
        .expect("99 of 100");
    let records_before = all_records(&store).await.len();

    // limit + 1: refused, names the window, spent and limit, inserts nothing.
    let r = refusal(
        store
            .commit_decision(decision("b", &key, 2, vec![reservation("w", 2, 100)]))
            .await
            .expect_err("101 of 100"),
    );
    assert_eq!(
        r,
        Refusal::LimitExceeded {
            window: window("w"),
            spent: U256::from(99),
            amount: U256::from(2),
            limit: U256::from(100),
        }
    );
    assert_eq!(sum(&store, "w", 3).await, U256::from(99));
    assert_eq!(
        store
            .request(RequestId::new("b").expect("id"))
            .await
            .expect("read"),
        None,
        "a refused decision stores no request"
    );
    // The refusal itself is audited (and nothing else was appended).
    let records = all_records(&store).await;
    assert_eq!(records.len(), records_before + 1);
    let last = records.last().expect("record");
    assert_eq!(last.kind, AuditKind::Refusal);
    assert_eq!(last.payload["code"], json!("velocity_exceeded"));
    assert_eq!(last.payload["spent"], json!("99"));

    // Exactly the limit: allowed.
    store
        .commit_decision(decision("c", &key, 3, vec![reservation("w", 1, 100)]))
        .await
        .expect("100 of 100");
    assert_eq!(sum(&store, "w", 4).await, U256::from(100));
    // And one more wei is refused.
    let r = refusal(
        store
            .commit_decision(decision("d", &key, 4, vec![reservation("w", 1, 100)]))
            .await
            .expect_err("full"),
    );
    assert_eq!(r.code(), "velocity_exceeded");

    // A refused request id was not consumed: it can be decided later.
    let r = store
        .commit_decision(decision("b", &key, 5, vec![reservation("other", 2, 100)]))
        .await;
    assert!(r.is_ok(), "{r:?}");
    verify_chain(&all_records(&store).await, None).expect("chain verifies");
}

#[tokio::test]
async fn a_refused_window_rolls_back_every_window_of_the_decision() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let key = active_key(&store, "searcher-hot", 1).await;
    store
        .commit_decision(decision("a", &key, 1, vec![reservation("b", 10, 10)]))
        .await
        .expect("fill b");
    let r = refusal(
        store
            .commit_decision(decision(
                "x",
                &key,
                2,
                vec![reservation("a", 5, 100), reservation("b", 1, 10)],
            ))
            .await
            .expect_err("b is full"),
    );
    assert!(matches!(r, Refusal::LimitExceeded { ref window, .. } if *window == self::window("b")));
    assert_eq!(sum(&store, "a", 3).await, U256::ZERO, "window a untouched");
    assert_eq!(sum(&store, "b", 3).await, U256::from(10));

    // Two reservations in the same window in one decision are malformed.
    let e = store
        .commit_decision(decision(
            "y",
            &key,
            2,
            vec![reservation("a", 5, 100), reservation("a", 1, 100)],
        ))
        .await
        .expect_err("duplicate window");
    assert!(matches!(e, StoreError::Invalid(_)), "{e}");
}

#[tokio::test]
async fn windows_roll_and_prune() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let key = active_key(&store, "searcher-hot", 1).await;
    store
        .commit_decision(decision("a", &key, 0, vec![reservation("w", 60, 100)]))
        .await
        .expect("a");
    store
        .commit_decision(decision("b", &key, 10, vec![reservation("w", 40, 100)]))
        .await
        .expect("b");
    // At exactly a.at + duration, a no longer counts (at > now − duration is strict).
    assert_eq!(sum(&store, "w", HOUR - 1).await, U256::from(100));
    assert_eq!(sum(&store, "w", HOUR).await, U256::from(40));
    store
        .commit_decision(decision("c", &key, HOUR, vec![reservation("w", 60, 100)]))
        .await
        .expect("room again after a expired");
    // Pruning keeps 5 minutes of grace after expiry.
    assert_eq!(store.prune_reservations(at(HOUR)).await.expect("prune"), 0);
    assert_eq!(
        store
            .prune_reservations(at(HOUR + 5 * 60_000))
            .await
            .expect("prune"),
        1,
        "only a expired"
    );
    assert_eq!(sum(&store, "w", HOUR).await, U256::from(100));
    assert_eq!(sum(&store, "w", HOUR + 10).await, U256::from(60));
}

#[tokio::test]
async fn frozen_store_refuses_every_decision() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let key = active_key(&store, "searcher-hot", 1).await;
    store
        .freeze("incident 42".into(), admin(1))
        .await
        .expect("freeze");
    let freeze = store.freeze_state().await.expect("read").expect("frozen");
    assert_eq!(freeze.reason, "incident 42");
    for (i, res) in [vec![], vec![reservation("w", 1, 100)]]
        .into_iter()
        .enumerate()
    {
        let r = refusal(
            store
                .commit_decision(decision(&format!("f{i}"), &key, 2, res))
                .await
                .expect_err("frozen"),
        );
        assert!(matches!(r, Refusal::Frozen(ref f) if f.reason == "incident 42"));
    }
    assert_eq!(sum(&store, "w", 3).await, U256::ZERO);
    store.unfreeze(admin(3)).await.expect("unfreeze");
    assert_eq!(store.freeze_state().await.expect("read"), None);
    store
        .commit_decision(decision("f1", &key, 4, vec![reservation("w", 1, 100)]))
        .await
        .expect("allowed after unfreeze");
    let kinds: Vec<_> = all_records(&store).await.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds[2..],
        [
            AuditKind::Freeze,
            AuditKind::Refusal,
            AuditKind::Refusal,
            AuditKind::Freeze,
            AuditKind::Decision
        ]
    );
}

#[tokio::test]
async fn key_status_is_rechecked_in_the_transaction() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let v1 = active_key(&store, "searcher-hot", 1).await;

    // Unknown version.
    let ghost = KeyVersion::new(KeyName::new("searcher-hot").expect("name"), 9);
    let r = refusal(
        store
            .commit_decision(decision("g", &ghost, 1, vec![]))
            .await
            .expect_err("unknown"),
    );
    assert_eq!(r, Refusal::UnknownKey(ghost));

    // A pending (registered, not active) version signs nothing.
    let v2 = store
        .register_key_version(new_version("searcher-hot", 2), admin(1))
        .await
        .expect("register v2")
        .version;
    let r = refusal(
        store
            .commit_decision(decision("p", &v2, 1, vec![]))
            .await
            .expect_err("pending"),
    );
    assert!(matches!(
        r,
        Refusal::KeyNotSignable {
            status: KeyStatus::Pending,
            ..
        }
    ));

    // Rotate: v2 active, v1 retiring for an hour.
    store
        .activate_version(v2.clone(), Some(HOUR), admin(10))
        .await
        .expect("activate v2");
    let r = refusal(
        store
            .commit_decision(decision("r0", &v1, 20, vec![]))
            .await
            .expect_err("retiring without the policy's say-so"),
    );
    assert!(matches!(
        r,
        Refusal::KeyNotSignable {
            status: KeyStatus::Retiring { successor: 2, .. },
            ..
        }
    ));
    let mut d = decision("r1", &v1, 20, vec![]);
    d.allow_retiring = true;
    store
        .commit_decision(d)
        .await
        .expect("retiring allowed by policy");
    let mut d = decision("r2", &v1, 10 + HOUR, vec![]);
    d.allow_retiring = true;
    refusal(
        store
            .commit_decision(d)
            .await
            .expect_err("grace period over"),
    );

    // Revoke v2 (the active one): refused at once.
    store
        .commit_decision(decision("ok", &v2, 30, vec![]))
        .await
        .expect("v2 signs");
    let revoked = store
        .revoke(v2.name.clone(), Some(2), "laptop stolen".into(), admin(31))
        .await
        .expect("revoke");
    assert_eq!(revoked, vec![v2.clone()]);
    let r = refusal(
        store
            .commit_decision(decision("rv", &v2, 32, vec![reservation("w", 1, 10)]))
            .await
            .expect_err("revoked"),
    );
    assert!(matches!(
        r,
        Refusal::KeyNotSignable { status: KeyStatus::Revoked { ref reason, .. }, .. } if reason == "laptop stolen"
    ));
    assert_eq!(sum(&store, "w", 33).await, U256::ZERO);
    assert_eq!(
        store.active_version(v2.name.clone()).await.expect("read"),
        None
    );
}

#[tokio::test]
async fn paused_key_is_refused_until_the_cooldown_ends() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let key = active_key(&store, "searcher-hot", 1).await;
    store
        .pause_key(key.name.clone(), at(100), "breaker".into(), admin(1))
        .await
        .expect("pause");
    let r = refusal(
        store
            .commit_decision(decision("a", &key, 50, vec![]))
            .await
            .expect_err("paused"),
    );
    assert_eq!(
        r,
        Refusal::KeyPaused {
            name: key.name.clone(),
            until: at(100)
        }
    );
    store
        .commit_decision(decision("a", &key, 100, vec![]))
        .await
        .expect("cooldown over");
    store
        .pause_key(key.name.clone(), at(1000), "again".into(), admin(101))
        .await
        .expect("pause");
    store
        .unpause_key(key.name.clone(), admin(102))
        .await
        .expect("unpause");
    store
        .commit_decision(decision("b", &key, 103, vec![]))
        .await
        .expect("unpaused");
    let control = store.key_control(key.name.clone()).await.expect("control");
    assert_eq!(control.paused_until, None);

    // Breaker accounting.
    for expected in 1..=3 {
        let n = store
            .record_key_result(key.name.clone(), false, admin(200))
            .await
            .expect("failure");
        assert_eq!(n, expected);
    }
    assert_eq!(
        store
            .record_key_result(key.name.clone(), true, admin(201))
            .await
            .expect("success"),
        0
    );
}

#[tokio::test]
async fn reused_request_id_returns_the_stored_outcome_and_never_reserves_twice() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let key = active_key(&store, "searcher-hot", 1).await;
    let first = store
        .commit_decision(decision("same", &key, 1, vec![reservation("w", 30, 100)]))
        .await
        .expect("first");
    // Before any outcome: the retry learns the request is in flight (and must not sign).
    let r = refusal(
        store
            .commit_decision(decision("same", &key, 2, vec![reservation("w", 30, 100)]))
            .await
            .expect_err("retry"),
    );
    let Refusal::DuplicateRequest(stored) = r else {
        panic!("expected duplicate, got {r:?}")
    };
    assert_eq!(stored.state, RequestState::Reserved);
    assert_eq!(stored.decision_seq, first.seq);
    store
        .record_outcome(OutcomeTx {
            request_id: RequestId::new("same").expect("id"),
            at: at(3),
            outcome: Outcome::Signed {
                details: json!({"raw": "0x02f8"}),
            },
        })
        .await
        .expect("outcome");
    let records_before = all_records(&store).await.len();
    let r = refusal(
        store
            .commit_decision(decision("same", &key, 4, vec![reservation("w", 30, 100)]))
            .await
            .expect_err("retry after signing"),
    );
    let Refusal::DuplicateRequest(stored) = r else {
        panic!("expected duplicate, got {r:?}")
    };
    let RequestState::Signed { details, .. } = &stored.state else {
        panic!("expected signed, got {:?}", stored.state)
    };
    assert_eq!(details, r#"{"raw":"0x02f8"}"#);
    assert_eq!(sum(&store, "w", 5).await, U256::from(30), "reserved once");
    assert_eq!(
        all_records(&store).await.len(),
        records_before,
        "a retry appends nothing"
    );
}

#[tokio::test]
async fn failed_signing_releases_the_reservation() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let key = active_key(&store, "searcher-hot", 1).await;
    store
        .commit_decision(decision(
            "a",
            &key,
            1,
            vec![reservation("w", 70, 100), reservation("n", 1, 5)],
        ))
        .await
        .expect("a");
    store
        .record_outcome(OutcomeTx {
            request_id: RequestId::new("a").expect("id"),
            at: at(2),
            outcome: Outcome::Failed {
                reason: "CKR_DEVICE_REMOVED".into(),
                release: true,
            },
        })
        .await
        .expect("failure");
    assert_eq!(sum(&store, "w", 3).await, U256::ZERO);
    assert_eq!(sum(&store, "n", 3).await, U256::ZERO);
    let last = all_records(&store).await.pop().expect("record");
    assert_eq!(last.kind, AuditKind::Failure);
    assert_eq!(last.payload["windows"].as_array().map(Vec::len), Some(2));
    // Without release (unknown whether a signature escaped) the reservation stays.
    store
        .commit_decision(decision("b", &key, 4, vec![reservation("w", 70, 100)]))
        .await
        .expect("b");
    store
        .record_outcome(OutcomeTx {
            request_id: RequestId::new("b").expect("id"),
            at: at(5),
            outcome: Outcome::Failed {
                reason: "timeout".into(),
                release: false,
            },
        })
        .await
        .expect("failure");
    assert_eq!(sum(&store, "w", 6).await, U256::from(70));
    let unknown = store
        .record_outcome(OutcomeTx {
            request_id: RequestId::new("nope").expect("id"),
            at: at(5),
            outcome: Outcome::Failed {
                reason: "x".into(),
                release: true,
            },
        })
        .await;
    assert!(matches!(unknown, Err(StoreError::NotFound(_))));
}

/// Hammers one window from `tasks` concurrent callers spread over `stores`; returns how many
/// decisions committed.
async fn hammer(stores: Vec<Arc<SqliteStore>>, key: KeyVersion, tasks: usize, tries: usize) -> u64 {
    let committed = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = Arc::clone(&stores[t % stores.len()]);
        let key = key.clone();
        let committed = Arc::clone(&committed);
        handles.push(tokio::spawn(async move {
            for i in 0..tries {
                let d = decision(
                    &format!("t{t}-{i}"),
                    &key,
                    (i as u64) % 1000,
                    vec![reservation("hot", 7, 1000)],
                );
                match store.commit_decision(d).await {
                    Ok(_) => {
                        committed.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(StoreError::Refused(Refusal::LimitExceeded { .. })) => {}
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    committed.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn eight_concurrent_callers_never_exceed_a_limit() {
    let (_dir, path) = tempdb();
    let store = Arc::new(SqliteStore::open(&path).expect("open"));
    let key = active_key(&store, "searcher-hot", 1).await;
    let before = store.commit_stats();
    let committed = hammer(vec![Arc::clone(&store)], key, 8, 40).await;
    // 320 attempts of 7 against a limit of 1000: exactly floor(1000 / 7) fit.
    assert_eq!(committed, 142);
    // Group commit: 320 decisions (committed or refused, each audited) in far fewer fsyncs.
    let after = store.commit_stats();
    let (jobs, commits) = (after.jobs - before.jobs, after.commits - before.commits);
    assert_eq!(jobs, 320);
    eprintln!("group commit: {jobs} decisions in {commits} commits");
    assert!(
        commits * 2 <= jobs,
        "{jobs} decisions took {commits} commits"
    );
    assert_eq!(sum(&store, "hot", 999).await, U256::from(994));
    verify_chain(&all_records(&store).await, None).expect("chain verifies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn two_store_instances_on_one_file_never_exceed_a_limit() {
    let (_dir, path) = tempdb();
    let a = Arc::new(SqliteStore::open(&path).expect("open a"));
    let b = Arc::new(SqliteStore::open(&path).expect("open b"));
    let key = active_key(&a, "searcher-hot", 1).await;
    let committed = hammer(vec![Arc::clone(&a), Arc::clone(&b)], key, 8, 40).await;
    assert_eq!(committed, 142);
    assert_eq!(sum(&a, "hot", 999).await, U256::from(994));
    assert_eq!(sum(&b, "hot", 999).await, U256::from(994));
    // Both instances appended to one chain without forking it.
    let records = all_records(&b).await;
    let summary = verify_chain(&records, None).expect("one intact chain");
    assert_eq!(summary.head.map(|h| h.0), Some(records.len() as u64));
}

/// The writer's window cache must never hide another instance's reservations: two instances
/// on one file take turns reserving in the same windows (1 s, 1 min, 1 h, and a grant that never
/// expires), releasing some, while time moves across second and minute boundaries. Every answer
/// must equal the one computed from the model of what was committed, so neither instance can
/// exceed a limit or refuse what fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_alternating_on_one_window_see_each_others_reservations() {
    use rand::{Rng, SeedableRng};
    let (_dir, path) = tempdb();
    let a = SqliteStore::open(&path).expect("open a");
    let b = SqliteStore::open(&path).expect("open b");
    let key = active_key(&a, "searcher-hot", 1).await;
    let windows: [(&str, u64, u64); 4] = [
        ("w1s", 1_000, 25),
        ("w1m", 60_000, 150),
        ("w1h", HOUR, 700),
        ("grant", u64::MAX, 1_800),
    ];
    // Committed reservations still held: (at, amount, request id).
    let mut held: Vec<(u64, u64, String)> = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut now = 0u64;
    let (mut committed, mut refused) = (0, 0);
    for i in 0..400 {
        // Mostly small steps inside one second, sometimes across seconds and minutes.
        now += match rng.gen_range(0..10) {
            0..=5 => rng.gen_range(0..300),
            6..=8 => rng.gen_range(300..5_000),
            _ => rng.gen_range(5_000..90_000),
        };
        let store = if rng.gen_bool(0.5) { &a } else { &b };
        let amount = rng.gen_range(1..12u64);
        let id = format!("alt-{i}");
        let reservations = windows
            .iter()
            .map(|(w, duration_ms, limit)| Reservation {
                window: window(w),
                duration_ms: *duration_ms,
                amount: U256::from(amount),
                limit: U256::from(*limit),
            })
            .collect();
        let expected_refusal = windows.iter().find_map(|(w, duration_ms, limit)| {
            let spent: u64 = held
                .iter()
                .filter(|(t, _, _)| now.checked_sub(*duration_ms).is_none_or(|s| *t > s))
                .map(|(_, amt, _)| amt)
                .sum();
            (spent + amount > *limit).then_some((*w, spent))
        });
        match store
            .commit_decision(decision(&id, &key, now, reservations))
            .await
        {
            Ok(_) => {
                assert_eq!(
                    expected_refusal, None,
                    "decision {i} at {now} should be refused"
                );
                held.push((now, amount, id));
                committed += 1;
            }
            Err(e) => match refusal(e) {
                Refusal::LimitExceeded {
                    window: w, spent, ..
                } => {
                    let (name, want) = expected_refusal
                        .unwrap_or_else(|| panic!("decision {i} at {now} refused on {w}"));
                    assert_eq!(w, window(name), "decision {i}");
                    assert_eq!(spent, U256::from(want), "decision {i}");
                    refused += 1;
                }
                other => panic!("unexpected refusal {other}"),
            },
        }
        // Now and then the other instance (or this one) releases a held reservation.
        if rng.gen_range(0..5) == 0 && !held.is_empty() {
            let (_, _, rid) = held.remove(rng.gen_range(0..held.len()));
            let releaser = if rng.gen_bool(0.5) { &a } else { &b };
            releaser
                .record_outcome(OutcomeTx {
                    request_id: RequestId::new(rid).expect("id"),
                    at: at(now),
                    outcome: Outcome::Failed {
                        reason: "test".into(),
                        release: true,
                    },
                })
                .await
                .expect("release");
        } else if rng.gen_range(0..40) == 0 {
            // Pruning deletes rows and buckets behind the writer's back of the other instance.
            let pruner = if rng.gen_bool(0.5) { &a } else { &b };
            pruner.prune_reservations(at(now)).await.expect("prune");
        }
    }
    assert!(
        committed > 50 && refused > 50,
        "{committed} committed, {refused} refused"
    );
    verify_chain(&all_records(&a).await, None).expect("one intact chain");
}

/// The decision and signature records are written in canonical form without a JSON value in
/// between; odd characters in window keys and details must still give records that verify.
#[tokio::test]
async fn records_with_escaped_strings_verify() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let key = active_key(&store, "searcher-hot", 1).await;
    let mut d = decision("esc-1", &key, 5, vec![reservation("q\"uo\\te", 3, 10)]);
    d.details = json!({"note": "tab\tnewline\n\u{1}é🙂", "n": 18446744073709551615u64, "z": -1});
    store.commit_decision(d).await.expect("decision");
    store
        .record_outcome(OutcomeTx {
            request_id: RequestId::new("esc-1").expect("id"),
            at: at(6),
            outcome: Outcome::Signed {
                details: json!({"b": "\"x\"", "a": [1, {"d": null, "c": true}]}),
            },
        })
        .await
        .expect("outcome");
    let records = all_records(&store).await;
    verify_chain(&records, None).expect("chain verifies");
    let decision = &records[records.len() - 2];
    assert_eq!(
        decision.payload["reservations"][0]["window"],
        json!("key:searcher-hot:value:q\"uo\\te")
    );
    assert_eq!(decision.payload["details"]["n"], json!(u64::MAX));
}

#[tokio::test]
async fn acknowledged_records_survive_reopen() {
    let (_dir, path) = tempdb();
    let head;
    {
        let store = SqliteStore::open(&path).expect("open");
        let key = active_key(&store, "searcher-hot", 1).await;
        for i in 0..50 {
            store
                .commit_decision(decision(
                    &format!("d{i}"),
                    &key,
                    i,
                    vec![reservation("w", 1, 1000)],
                ))
                .await
                .expect("commit");
        }
        head = store.audit_head().await.expect("head").expect("some");
    }
    let store = SqliteStore::open(&path).expect("reopen");
    assert_eq!(store.audit_head().await.expect("head"), Some(head));
    for i in 0..50 {
        let r = store
            .request(RequestId::new(format!("d{i}")).expect("id"))
            .await
            .expect("read");
        assert!(r.is_some(), "d{i} lost");
    }
    assert_eq!(sum(&store, "w", 100).await, U256::from(50));
    verify_chain(&all_records(&store).await, None).expect("chain verifies");
}

#[tokio::test]
async fn key_registry_lifecycle() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    assert!(KeyName::new("Searcher").is_err());
    assert!(KeyName::new("-x").is_err());
    assert!(KeyName::new("a".repeat(64)).is_err());
    assert!(KeyName::new("a".repeat(63)).is_ok());
    assert_eq!(
        "searcher-hot@3"
            .parse::<KeyVersion>()
            .expect("parse")
            .to_string(),
        "searcher-hot@3"
    );
    assert!("searcher-hot@0".parse::<KeyVersion>().is_err());

    // The address must belong to the public key.
    let mut bad = new_version("searcher-hot", 1);
    bad.address = key_material(2).1;
    assert!(matches!(
        store.register_key_version(bad, admin(0)).await,
        Err(StoreError::Invalid(_))
    ));

    let mut v = new_version("searcher-hot", 1);
    v.rotate_every_ms = Some(30 * 24 * HOUR);
    let v1 = store
        .register_key_version(v, admin(0))
        .await
        .expect("register");
    assert_eq!(v1.version.to_string(), "searcher-hot@1");
    assert_eq!(v1.status, KeyStatus::Pending);
    // The same device key cannot be registered twice.
    assert!(matches!(
        store
            .register_key_version(new_version("other", 1), admin(0))
            .await,
        Err(StoreError::Conflict(_))
    ));
    store
        .activate_version(v1.version.clone(), None, admin(1))
        .await
        .expect("activate");
    assert!(
        store
            .keys_due_for_rotation(at(29 * 24 * HOUR))
            .await
            .expect("due")
            .is_empty()
    );
    let due = store
        .keys_due_for_rotation(at(31 * 24 * HOUR))
        .await
        .expect("due");
    assert_eq!(due.len(), 1);

    let v2 = store
        .register_key_version(new_version("searcher-hot", 2), admin(2))
        .await
        .expect("v2");
    assert_eq!(v2.version.version, 2);
    store
        .activate_version(v2.version.clone(), Some(HOUR), admin(3))
        .await
        .expect("rotate");
    let active = store
        .active_version(KeyName::new("searcher-hot").expect("name"))
        .await
        .expect("read")
        .expect("active");
    assert_eq!(active.version, v2.version);
    assert_eq!(active.key_ref, v2.key_ref);
    let all = store.list_keys(None).await.expect("list");
    assert_eq!(all.len(), 2);
    assert_eq!(
        all[0].status,
        KeyStatus::Retiring {
            until: at(3 + HOUR),
            successor: 2
        }
    );
    // Transitions are checked.
    let e = store
        .set_key_status(v1.version.clone(), KeyStatus::Active, admin(4))
        .await;
    assert!(matches!(e, Err(StoreError::Conflict(_))));
    store
        .set_key_status(v1.version.clone(), KeyStatus::Retired, admin(4))
        .await
        .expect("retire");
    store
        .set_key_status(
            v1.version.clone(),
            KeyStatus::DestroyScheduled { at: at(HOUR) },
            admin(5),
        )
        .await
        .expect("schedule destruction");
    store
        .set_key_status(v1.version.clone(), KeyStatus::Destroyed, admin(HOUR))
        .await
        .expect("destroyed");
    // Revoking the whole key skips the destroyed version.
    let revoked = store
        .revoke(
            KeyName::new("searcher-hot").expect("name"),
            None,
            "compromise".into(),
            admin(HOUR + 1),
        )
        .await
        .expect("revoke");
    assert_eq!(revoked, vec![v2.version.clone()]);
    let e = store
        .set_key_status(v2.version.clone(), KeyStatus::Retired, admin(HOUR + 2))
        .await;
    assert!(
        matches!(e, Err(StoreError::Conflict(_))),
        "revoked stays revoked"
    );
    assert!(matches!(
        store
            .revoke(
                KeyName::new("nope").expect("name"),
                None,
                "x".into(),
                admin(1)
            )
            .await,
        Err(StoreError::NotFound(_))
    ));
    let records = all_records(&store).await;
    assert!(records.iter().all(|r| r.kind == AuditKind::KeyChange));
    assert_eq!(records.len(), 8);
    verify_chain(&records, None).expect("chain verifies");
}

#[tokio::test]
async fn approvals_count_each_approver_once_and_grants_track_spending() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let key = active_key(&store, "treasury", 1).await;
    let id = RequestId::new("big-transfer").expect("id");
    store
        .create_pending(
            PendingRequest {
                id: id.clone(),
                key: key.name.clone(),
                identity: "spiffe://castellan/strategy-a".into(),
                request: json!({"to": "0x00", "value": "1000000000000000000000"}),
                digest: B256::repeat_byte(9),
                approvals_required: json!({"threshold": 2, "set": "treasury-approvers"}),
                created_at: at(0),
                expires_at: at(HOUR),
                status: PendingStatus::Pending,
            },
            admin(0),
        )
        .await
        .expect("pending");
    let approval = |who: u8, when: u64, expires: u64| Approval {
        pending_id: id.clone(),
        approver: key_material(who).1,
        signature: vec![who; 65],
        expires_at: at(expires),
        at: at(when),
    };
    let t = store
        .add_approval(approval(10, 1, HOUR), admin(1))
        .await
        .expect("first");
    assert!(t.counted);
    assert_eq!(t.approvers.len(), 1);
    let t = store
        .add_approval(approval(10, 2, HOUR), admin(2))
        .await
        .expect("duplicate");
    assert!(!t.counted, "a duplicate does not count twice");
    assert_eq!(t.approvers.len(), 1);
    assert!(matches!(
        store.add_approval(approval(11, 3, 2), admin(3)).await,
        Err(StoreError::Invalid(_))
    ));
    let t = store
        .add_approval(approval(11, 3, HOUR), admin(3))
        .await
        .expect("second");
    assert_eq!(t.approvers.len(), 2);
    let (p, approvals) = store
        .pending(id.clone())
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(p.status, PendingStatus::Pending);
    assert_eq!(approvals.len(), 2);
    store
        .set_pending_status(id.clone(), PendingStatus::Approved, admin(4))
        .await
        .expect("approved");
    assert!(matches!(
        store.add_approval(approval(12, 5, HOUR), admin(5)).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .set_pending_status(id.clone(), PendingStatus::Pending, admin(5))
            .await,
        Err(StoreError::Conflict(_))
    ));

    // Grants: a budget spent through the decision transaction.
    store
        .insert_grant(
            Grant {
                id: "g1".into(),
                grant: json!({"client": "strategy-a", "budget": "100"}),
                signatures: json!(["0x01", "0x02"]),
                created_at: at(0),
                expires_at: at(24 * HOUR),
            },
            admin(0),
        )
        .await
        .expect("grant");
    let grant_res = |amount: u64| {
        Reservation::grant("g1", U256::from(amount), U256::from(100)).expect("grant window")
    };
    store
        .commit_decision(decision("g-a", &key, 10, vec![grant_res(60)]))
        .await
        .expect("within grant");
    // Far later: a grant's window never rolls.
    let r = refusal(
        store
            .commit_decision(decision("g-b", &key, 20 * HOUR, vec![grant_res(41)]))
            .await
            .expect_err("over budget"),
    );
    assert_eq!(r.code(), "velocity_exceeded");
    assert_eq!(
        store
            .prune_reservations(at(20 * HOUR))
            .await
            .expect("prune"),
        0
    );
    let g = store
        .grant("g1".into())
        .await
        .expect("read")
        .expect("grant");
    assert_eq!(g.spent, U256::from(60));
    assert!(matches!(
        store.insert_grant(g.grant.clone(), admin(1)).await,
        Err(StoreError::Conflict(_))
    ));
    verify_chain(&all_records(&store).await, None).expect("chain verifies");
}

#[tokio::test]
async fn export_from_seq_and_time_verifies() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let key = active_key(&store, "searcher-hot", 1).await;
    for i in 0..2500u64 {
        store
            .commit_decision(decision(&format!("e{i}"), &key, 100 + i, vec![]))
            .await
            .expect("commit");
    }
    store
        .append_audit(AuditEntry {
            at: at(5000),
            kind: AuditKind::PolicyChange,
            request_id: None,
            identity: Some("admin".into()),
            payload: json!({"policy_hash": "0x01", "reason": "tighten caps"}),
        })
        .await
        .expect("policy change");
    let mut buf = Vec::new();
    let n = export_jsonl(&store, AuditCursor::Seq(1), &mut buf)
        .await
        .expect("export");
    assert_eq!(n, 2503);
    let records = audit::read_jsonl(std::str::from_utf8(&buf).expect("utf8")).expect("parse");
    verify_chain(&records, None).expect("export verifies");

    // From a time: starts at the first record at or after it, verifies from its anchor.
    let mut buf = Vec::new();
    let n = export_jsonl(&store, AuditCursor::Time(at(100 + 1000)), &mut buf)
        .await
        .expect("export");
    let part = audit::read_jsonl(std::str::from_utf8(&buf).expect("utf8")).expect("parse");
    assert_eq!(n as usize, part.len());
    assert_eq!(part[0].request_id.as_deref(), Some("e1000"));
    let anchor = &records[part[0].seq as usize - 2];
    audit::verify_chain_from(&part, Some((anchor.seq, anchor.hash)), None)
        .expect("suffix verifies");
}

/// The bucketed window sums agree with a brute-force sum over the reservations the test made,
/// across windows of different lengths, releases, pruning and many query times.
#[tokio::test]
async fn window_sums_match_a_brute_force_sum() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let key = active_key(&store, "searcher-hot", 1).await;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let windows = [("short", 90_000u64), ("long", 2 * HOUR)];
    // (window index, at, amount, released)
    let mut made: Vec<(usize, u64, u64, bool)> = Vec::new();
    let mut when = 0u64;
    for i in 0..400 {
        // Mostly sub-second steps (several rows per second-bucket), sometimes long gaps.
        when += next() % if i % 8 == 0 { 90_000 } else { 700 };
        let w = (next() % 2) as usize;
        let amount = 1 + next() % 1000;
        let (name, duration) = windows[w];
        store
            .commit_decision(decision(
                &format!("bf{i}"),
                &key,
                when,
                vec![Reservation {
                    window: window(name),
                    duration_ms: duration,
                    amount: U256::from(amount),
                    limit: U256::MAX,
                }],
            ))
            .await
            .expect("commit");
        let released = next() % 5 == 0;
        if released {
            store
                .record_outcome(OutcomeTx {
                    request_id: RequestId::new(format!("bf{i}")).expect("id"),
                    at: at(when),
                    outcome: Outcome::Failed {
                        reason: "x".into(),
                        release: true,
                    },
                })
                .await
                .expect("release");
        }
        made.push((w, when, amount, released));
        if i % 100 == 99 {
            store.prune_reservations(at(when)).await.expect("prune");
        }
        for _ in 0..3 {
            let now = when.saturating_sub(next() % 60_000);
            for (wi, (name, duration)) in windows.iter().enumerate() {
                let expected: u64 = made
                    .iter()
                    .filter(|(w, t, _, rel)| {
                        // Pruning keeps 5 minutes of grace, more than the 1 minute queries lag.
                        *w == wi && !rel && *t + duration > now
                    })
                    .map(|(_, _, a, _)| *a)
                    .sum();
                let got = sum_over(&store, name, *duration, now).await;
                assert_eq!(got, U256::from(expected), "{name} at {now} after {i}");
            }
        }
    }
}

/// Decisions and releases from concurrent callers share batches, whose bucket totals reach the
/// database once per batch: after each burst, the committed sums (read by another connection)
/// and the writer's own sums (probed with decisions exactly at and one over the limit) both
/// agree with a brute-force sum, across two window lengths, releases, pruning and time jumps.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_decisions_and_releases_keep_window_sums_exact() {
    let (_dir, path) = tempdb();
    let store = Arc::new(SqliteStore::open(&path).expect("open"));
    let key = active_key(&store, "searcher-hot", 1).await;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let windows = [("batch-short", 90_000u64), ("batch-long", 2 * HOUR)];
    let res = |w: usize, amount: u64, limit: U256| Reservation {
        window: window(windows[w].0),
        duration_ms: windows[w].1,
        amount: U256::from(amount),
        limit,
    };
    // (window, at, amount, released)
    let made = Arc::new(std::sync::Mutex::new(Vec::<(usize, u64, u64, bool)>::new()));
    let expected = |made: &[(usize, u64, u64, bool)], w: usize, now: u64| -> u64 {
        made.iter()
            .filter(|(mw, t, _, rel)| *mw == w && !rel && *t + windows[w].1 > now)
            .map(|(_, _, a, _)| *a)
            .sum()
    };
    let mut when = 0u64;
    let mut id = 0u64;
    for round in 0..30 {
        when += next() % if round % 6 == 5 { 95_000 } else { 900 };
        let mut tasks = Vec::new();
        for _ in 0..8 {
            id += 1;
            let w = (next() % 2) as usize;
            let amount = 1 + next() % 1000;
            // Spread over a few milliseconds, not in order.
            let t = when + next() % 5;
            let release = next() % 3 == 0;
            let (store, key, made) = (Arc::clone(&store), key.clone(), Arc::clone(&made));
            let rid = format!("batch-{id}");
            let r = res(w, amount, U256::MAX);
            tasks.push(tokio::spawn(async move {
                store
                    .commit_decision(decision(&rid, &key, t, vec![r]))
                    .await
                    .expect("commit");
                if release {
                    store
                        .record_outcome(OutcomeTx {
                            request_id: RequestId::new(rid).expect("id"),
                            at: at(t + 1),
                            outcome: Outcome::Failed {
                                reason: "x".into(),
                                release: true,
                            },
                        })
                        .await
                        .expect("release");
                }
                made.lock().expect("lock").push((w, t, amount, release));
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        if round % 10 == 9 {
            store.prune_reservations(at(when)).await.expect("prune");
        }
        let now = when + 10;
        for (w, (name, duration)) in windows.iter().enumerate() {
            let exp = expected(&made.lock().expect("lock"), w, now);
            let committed = sum_over(&store, name, *duration, now).await;
            assert_eq!(
                committed,
                U256::from(exp),
                "{name} committed, round {round}"
            );
            // The writer's sum: one more than the limit allows is refused with the exact spent
            // total; exactly the limit is not.
            id += 1;
            let over = store
                .commit_decision(decision(
                    &format!("probe-{id}"),
                    &key,
                    now,
                    vec![res(w, 2, U256::from(exp + 1))],
                ))
                .await
                .expect_err("over the limit");
            match refusal(over) {
                Refusal::LimitExceeded { spent, .. } => {
                    assert_eq!(spent, U256::from(exp), "{name} writer, round {round}");
                }
                other => panic!("{other:?}"),
            }
            id += 1;
            store
                .commit_decision(decision(
                    &format!("probe-{id}"),
                    &key,
                    now,
                    vec![res(w, 1, U256::from(exp + 1))],
                ))
                .await
                .expect("exactly at the limit");
            made.lock().expect("lock").push((w, now, 1, false));
        }
    }
    verify_chain(&all_records(&store).await, None).expect("chain verifies");
}

#[tokio::test]
async fn database_is_wal_versioned_and_a_newer_schema_is_refused() {
    let (_dir, path) = tempdb();
    drop(SqliteStore::open(&path).expect("create"));
    {
        let raw = rusqlite::Connection::open(&path).expect("raw open");
        let mode: String = raw
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("journal_mode");
        assert_eq!(mode, "wal");
        let version: i64 = raw
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("user_version");
        assert_eq!(version, 3);
        raw.pragma_update(None, "user_version", 99)
            .expect("set version");
    }
    let e = SqliteStore::open(&path).expect_err("newer schema");
    assert!(matches!(e, StoreError::Schema(_)), "{e}");
}

/// The writer counts the signatures in progress (decided, outcome not yet written) that its
/// adaptive group commit reads: up with each decision, down with each outcome, signed or
/// failed; a refused decision does not count.
#[tokio::test]
async fn the_writer_counts_signatures_in_progress() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let key = active_key(&store, "searcher-hot", 1).await;
    for i in 0..10u64 {
        store
            .commit_decision(decision(
                &format!("r{i}"),
                &key,
                i,
                vec![reservation("w", 1, 10)],
            ))
            .await
            .expect("decide");
    }
    // Over the limit: refused, not in progress.
    let refused = store
        .commit_decision(decision("over", &key, 11, vec![reservation("w", 5, 10)]))
        .await;
    assert!(refused.is_err());
    assert_eq!(store.commit_stats().in_flight, 10);
    for i in 0..6u64 {
        store
            .queue_outcome(OutcomeTx {
                request_id: RequestId::new(format!("r{i}")).expect("id"),
                at: at(20 + i),
                outcome: Outcome::Signed {
                    details: serde_json::json!({"response": {"n": i}}),
                },
            })
            .await
            .expect("outcome");
    }
    store
        .record_outcome(OutcomeTx {
            request_id: RequestId::new("r6").expect("id"),
            at: at(30),
            outcome: Outcome::Failed {
                reason: "CKR_DEVICE_REMOVED".into(),
                release: true,
            },
        })
        .await
        .expect("failure");
    assert_eq!(store.commit_stats().in_flight, 3);
}

/// A decision's details go into its audit record: they must be a JSON object with integers
/// only (quantities as strings), or the store refuses the decision before writing anything.
#[tokio::test]
async fn decision_details_must_be_an_object_of_integers() {
    let (_dir, path) = tempdb();
    let store = SqliteStore::open(&path).expect("open");
    let key = active_key(&store, "searcher-hot", 1).await;
    for (i, details) in [
        json!([1, 2]),
        json!({"value": 1.5}),
        json!({"nested": {"x": [0.1]}}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut d = decision(&format!("bad-details-{i}"), &key, 1, vec![]);
        d.details = details.clone();
        let e = store.commit_decision(d).await.expect_err("bad details");
        assert!(matches!(e, StoreError::Audit(_)), "{details}: {e}");
    }
    let mut d = decision("good-details", &key, 1, vec![]);
    d.details = json!({"value": "1500000000000000000", "nonce": 7});
    store.commit_decision(d).await.expect("good details");
    assert_eq!(
        all_records(&store).await.last().expect("record").kind,
        audit::AuditKind::Decision
    );
}
