//! An exported audit chain checked by an independent verifier: `scripts/verify_audit.py`
//! (Python stdlib + eth-hash keccak, eth-account for checkpoint signatures), run with the
//! interpreter named by `CASTELLAN_PYTHON` (exported by `scripts/test`). Passes on the export,
//! fails naming the record when one record is altered, dropped or two are swapped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use alloy::primitives::{Address, Signature, U256, keccak256};
use castellan_signer::audit::{
    self, AuditEntry, AuditKind, ChainProblem, CheckpointPayload, UnixMillis, checkpoint_digest,
    verify_chain,
};
use castellan_signer::backend::KeyRef;
use castellan_signer::store::{
    AuditCursor, Change, DecisionTx, KeyName, NewKeyVersion, Outcome, OutcomeTx, RequestId,
    Reservation, SqliteStore, Store, WindowKey, export_jsonl,
};
use k256::ecdsa::SigningKey;
use serde_json::{Value, json};

const T0: u64 = 1_800_000_000_000;

fn python() -> PathBuf {
    match std::env::var_os("CASTELLAN_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "CASTELLAN_PYTHON is not set: run the tests through scripts/test, which installs \
             eth-account into .tools/venv and exports CASTELLAN_PYTHON"
        ),
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/verify_audit.py")
}

fn run_verifier(export: &Path, audit_address: Address) -> (bool, String) {
    let out = Command::new(python())
        .arg(script())
        .arg(export)
        .arg("--audit-address")
        .arg(format!("{audit_address:#x}"))
        .output()
        .expect("run verify_audit.py");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stdout.starts_with("OK") || stdout.starts_with("FAIL"),
        "verifier crashed: stdout {stdout:?} stderr {stderr}"
    );
    (out.status.success(), stdout)
}

fn signing_key(seed: u8) -> SigningKey {
    let mut bytes = [5u8; 32];
    bytes[31] = seed;
    SigningKey::from_bytes((&bytes).into()).expect("scalar")
}

/// Builds a chain through the store: key changes, decisions, outcomes, unicode and control
/// characters in payloads, and two checkpoints signed by the audit key.
async fn build_chain(store: &SqliteStore, audit_key: &SigningKey) {
    let vk = *signing_key(1).verifying_key();
    let admin = |t: u64| Change::new("spiffe://castellan/admin", UnixMillis(T0 + t));
    let v = store
        .register_key_version(
            NewKeyVersion {
                name: KeyName::new("searcher-hot").expect("name"),
                key_ref: KeyRef::Pkcs11 {
                    label: "searcher-hot-1".into(),
                    id: "0a".into(),
                },
                address: Address::from_public_key(&vk),
                public_key: vk.to_encoded_point(true).as_bytes().to_vec(),
                rotate_every_ms: Some(86_400_000),
            },
            admin(0),
        )
        .await
        .expect("register")
        .version;
    store
        .activate_version(v.clone(), None, admin(1))
        .await
        .expect("activate");
    let audit_address = Address::from_public_key(audit_key.verifying_key());
    for i in 0..12u64 {
        let id = RequestId::new(format!("req-{i}")).expect("id");
        store
            .commit_decision(DecisionTx {
                request_id: id.clone(),
                key: v.clone(),
                identity: "spiffe://castellan/strategy-ä".into(),
                at: UnixMillis(T0 + 10 + i),
                digest: keccak256(id.as_str()),
                allow_retiring: false,
                reservations: vec![Reservation {
                    window: WindowKey::new("key:searcher-hot:value:3600").expect("window"),
                    duration_ms: 3_600_000,
                    amount: U256::from(10u64.pow(18)) * U256::from(i + 1),
                    limit: U256::MAX,
                }],
                details: json!({
                    "decision": "allow",
                    "note": "tab\there \"quoted\" \u{7}bell ünïcødé 🚀",
                    "n": i,
                    "neg": -5,
                    "nested": {"b": [1, {"z": null, "a": true}], "a": false},
                }),
            })
            .await
            .expect("decision");
        store
            .record_outcome(OutcomeTx {
                request_id: id,
                at: UnixMillis(T0 + 20 + i),
                outcome: if i % 4 == 3 {
                    Outcome::Failed {
                        reason: "CKR_DEVICE_ERROR".into(),
                        release: true,
                    }
                } else {
                    Outcome::Signed {
                        details: json!({"tx_hash": format!("0x{:064x}", i)}),
                    }
                },
            })
            .await
            .expect("outcome");
        if i == 5 || i == 11 {
            let head = store.audit_head().await.expect("head").expect("some");
            let digest = checkpoint_digest(&head.1);
            let (sig, recid) = audit_key
                .sign_prehash_recoverable(digest.as_slice())
                .expect("sign");
            store
                .append_checkpoint(
                    CheckpointPayload {
                        seq: head.0,
                        hash: head.1,
                        signer: audit_address,
                        signature: Signature::from_signature_and_parity(sig, recid.is_y_odd()),
                    },
                    UnixMillis(T0 + 30 + i),
                )
                .await
                .expect("checkpoint");
        }
    }
    store
        .append_audit(AuditEntry {
            at: UnixMillis(T0 + 100),
            kind: AuditKind::PolicyChange,
            request_id: None,
            identity: Some("admin".into()),
            payload: json!({"policy_hash": "0xfe", "text": "line1\nline2\r\u{1}"}),
        })
        .await
        .expect("policy change");
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).expect("write export");
}

#[tokio::test]
async fn independent_verifier_accepts_the_export_and_names_the_bad_record() {
    let python = python();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path().join("castellan.db")).expect("open");
    let audit_key = signing_key(99);
    let audit_address = Address::from_public_key(audit_key.verifying_key());
    build_chain(&store, &audit_key).await;

    let mut buf = Vec::new();
    export_jsonl(&store, AuditCursor::Seq(1), &mut buf)
        .await
        .expect("export");
    let text = String::from_utf8(buf).expect("utf8");
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let records = audit::read_jsonl(&text).expect("parse");
    let summary = verify_chain(&records, Some(audit_address)).expect("Rust verifier accepts");
    assert_eq!(summary.checkpoints, 2);

    // Intact: the independent verifier agrees, including both checkpoint signatures.
    let export = dir.path().join("audit.jsonl");
    write_lines(&export, &lines);
    let (ok, out) = run_verifier(&export, audit_address);
    assert!(ok, "{python:?} rejected an intact chain: {out}");
    assert!(
        out.contains(&format!("{} records", lines.len())) && out.contains("2 signed checkpoints"),
        "{out}"
    );

    // Altered: change one amount inside record 7's payload, keep the stored hash.
    let mut altered = lines.clone();
    let mut v: Value = serde_json::from_str(&altered[6]).expect("json");
    assert_eq!(v["seq"], json!(7));
    v["payload"]["reservations"][0]["amount"] = json!("1");
    altered[6] = serde_json::to_string(&v).expect("json");
    write_lines(&export, &altered);
    let (ok, out) = run_verifier(&export, audit_address);
    assert!(!ok, "altered chain accepted: {out}");
    assert!(out.starts_with("FAIL seq 7: altered"), "{out}");
    let e = verify_chain(
        &audit::read_jsonl(&altered.join("\n")).expect("parse"),
        None,
    )
    .expect_err("Rust verifier rejects");
    assert_eq!(e.seq, 7);
    assert!(matches!(e.problem, ChainProblem::Altered { .. }));

    // Dropped: remove record 9.
    let mut dropped = lines.clone();
    dropped.remove(8);
    write_lines(&export, &dropped);
    let (ok, out) = run_verifier(&export, audit_address);
    assert!(!ok);
    assert!(out.starts_with("FAIL seq 10: seq gap"), "{out}");

    // Swapped: records 4 and 5 exchanged.
    let mut swapped = lines.clone();
    swapped.swap(3, 4);
    write_lines(&export, &swapped);
    let (ok, out) = run_verifier(&export, audit_address);
    assert!(!ok);
    assert!(out.starts_with("FAIL seq 5: seq gap"), "{out}");

    // A checkpoint checked against the wrong audit key.
    write_lines(&export, &lines);
    let other = Address::from_public_key(signing_key(98).verifying_key());
    let (ok, out) = run_verifier(&export, other);
    assert!(!ok);
    let first_cp = records
        .iter()
        .find(|r| r.kind == AuditKind::Checkpoint)
        .expect("checkpoint");
    assert!(
        out.starts_with(&format!("FAIL seq {}: bad checkpoint", first_cp.seq)),
        "{out}"
    );
}
