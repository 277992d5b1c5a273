//! Crash durability: a child process (this test binary, re-run in child mode) commits decisions
//! from 8 concurrent tasks and prints each id once the store acknowledged it; the parent
//! `kill -9`s it mid-stream, reopens the database, and checks that the audit chain is intact and
//! every acknowledged decision — with its reservation — is there.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, U256, keccak256};
use castellan_signer::audit::{UnixMillis, verify_chain};
use castellan_signer::backend::KeyRef;
use castellan_signer::store::{
    AuditCursor, Change, DecisionTx, KeyName, KeyVersion, NewKeyVersion, RequestId, Reservation,
    SqliteStore, Store, WindowKey, WindowQuery,
};
use k256::ecdsa::SigningKey;
use serde_json::json;

const CHILD_ENV: &str = "CASTELLAN_STORE_CRASH_CHILD_DB";
const TEST_NAME: &str = "kill_9_mid_stream_loses_no_acknowledged_decision";
const T0: u64 = 1_800_000_000_000;
const WINDOW: &str = "key:crash:value:86400";

#[test]
fn kill_9_mid_stream_loses_no_acknowledged_decision() {
    if let Ok(db) = std::env::var(CHILD_ENV) {
        child(&db);
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("castellan.db");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = SqliteStore::open(&db).expect("open");
        let mut bytes = [3u8; 32];
        bytes[0] = 1;
        let vk = *SigningKey::from_bytes((&bytes).into())
            .expect("scalar")
            .verifying_key();
        let rec = store
            .register_key_version(
                NewKeyVersion {
                    name: KeyName::new("crash").expect("name"),
                    key_ref: KeyRef::Pkcs11 {
                        label: "crash".into(),
                        id: "01".into(),
                    },
                    address: Address::from_public_key(&vk),
                    public_key: vk.to_encoded_point(false).as_bytes().to_vec(),
                    rotate_every_ms: None,
                },
                Change::new("admin", UnixMillis(T0)),
            )
            .await
            .expect("register");
        store
            .activate_version(rec.version, None, Change::new("admin", UnixMillis(T0)))
            .await
            .expect("activate");
    });

    let stderr_path = dir.path().join("child.stderr");
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &db)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                // Only complete lines: a line cut by the kill was not fully acknowledged.
                Ok(_) if line.ends_with('\n') => {
                    if let Some(id) = line.trim_end().strip_prefix("ACK ") {
                        let _ = tx.send(id.to_string());
                    }
                }
                Ok(_) => break,
            }
        }
    });

    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.len() < 400 {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(id) => acked.push(id),
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "child exited early ({status}); stderr:\n{}",
                        std::fs::read_to_string(&stderr_path).unwrap_or_default()
                    );
                }
            }
            Err(e) => {
                let _ = child.kill();
                panic!(
                    "child acknowledged only {} decisions ({e:?}); stderr:\n{}",
                    acked.len(),
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
        }
    }
    // SIGKILL while the tasks keep committing.
    child.kill().expect("kill -9");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the child was killed, not finished");
    reader.join().expect("reader");
    acked.extend(rx.try_iter());

    rt.block_on(async {
        let store = SqliteStore::open(&db).expect("reopen after kill -9");
        let records = store
            .audit_records(AuditCursor::Seq(1), usize::MAX)
            .await
            .expect("records");
        let summary = verify_chain(&records, None).expect("chain intact after kill -9");
        let decisions = records
            .iter()
            .filter(|r| r.kind == castellan_signer::audit::AuditKind::Decision)
            .count() as u64;
        assert!(decisions >= acked.len() as u64);
        for id in &acked {
            let stored = store
                .request(RequestId::new(id.clone()).expect("id"))
                .await
                .expect("read")
                .unwrap_or_else(|| panic!("acknowledged decision {id} lost"));
            let rec = &records[(stored.decision_seq - 1) as usize];
            assert_eq!(rec.request_id.as_deref(), Some(id.as_str()));
        }
        // Every committed decision kept its reservation: the window's total is one per decision.
        let sums = store
            .window_sums(
                vec![WindowQuery {
                    window: WindowKey::new(WINDOW).expect("window"),
                    duration_ms: 86_400_000,
                }],
                UnixMillis(T0 + 1),
            )
            .await
            .expect("sums");
        assert_eq!(sums[0].1, U256::from(decisions));
        eprintln!(
            "kill -9 after {} acknowledged decisions; {} committed, head seq {:?}",
            acked.len(),
            decisions,
            summary.head.map(|h| h.0)
        );
    });
}

/// Child mode: commit decisions forever from 8 tasks, printing each acknowledged id.
fn child(db: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = std::sync::Arc::new(SqliteStore::open(db).expect("open"));
        let key = KeyVersion::new(KeyName::new("crash").expect("name"), 1);
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let store = store.clone();
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0u64.. {
                    let id = format!("c{t}-{i}");
                    let d = DecisionTx {
                        request_id: RequestId::new(id.clone()).expect("id"),
                        key: key.clone(),
                        identity: "child".into(),
                        at: UnixMillis(T0),
                        digest: keccak256(id.as_bytes()),
                        allow_retiring: false,
                        reservations: vec![Reservation {
                            window: WindowKey::new(WINDOW).expect("window"),
                            duration_ms: 86_400_000,
                            amount: U256::from(1),
                            limit: U256::MAX,
                        }],
                        details: json!({"i": i}),
                    };
                    store.commit_decision(d).await.expect("commit");
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {id}").expect("stdout");
                    out.flush().expect("flush");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
}
