//! `keyctl revoke` (the real binary, through the running signer's admin API) while two clients
//! sign with the key in a loop: the time from `keyctl revoke` returning to the first refused
//! request is measured and printed, and no signature by the key is made after it returned —
//! checked in the client answers and in the store's audit chain (decision and signature records
//! by sequence and time).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use castellan_api::client::ClientError;
use common::*;
use serde_json::Value;

/// One answer of the loop: when the request started and ended, and what came back.
struct Answer {
    started: Instant,
    ended: Instant,
    /// `Ok(request id)` when signed, `Err(stable code)` when refused.
    result: Result<String, String>,
}

/// Most requests per loop, and the longest a loop runs, whatever happens.
const MAX_REQUESTS: u64 = 400;
const MAX_LOOP: Duration = Duration::from_secs(30);

fn sign_loop(a: &Appliance, first_nonce: u64, stop: Arc<AtomicBool>) -> Vec<Answer> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = a.client("strategy-alpha");
    let begun = Instant::now();
    let mut out = Vec::new();
    for n in 0..MAX_REQUESTS {
        if stop.load(Ordering::SeqCst) || begun.elapsed() > MAX_LOOP {
            break;
        }
        let started = Instant::now();
        let r = rt.block_on(client.sign_transaction("searcher-hot", transfer(first_nonce + n)));
        let ended = Instant::now();
        let result = match r {
            Ok(s) => {
                assert_eq!(s.key_version, "searcher-hot@1");
                Ok(s.request_id)
            }
            Err(ClientError::Api { code, .. }) => Err(code),
            Err(e) => panic!("the loop got a non-API error: {e}"),
        };
        out.push(Answer {
            started,
            ended,
            result,
        });
    }
    out
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[test]
fn keyctl_revoke_while_clients_sign_in_a_loop_no_signature_after_it_returns() {
    let a = Arc::new(Appliance::new());
    let signer = RunningSigner::start(&a);
    sign(&a, "searcher-hot", 999_999).unwrap_or_else(|e| panic!("{e}\n{}", signer.log_text()));

    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..2u64)
        .map(|i| {
            let a = a.clone();
            let stop = stop.clone();
            std::thread::spawn(move || sign_loop(&a, i * 1_000_000, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    let revoke_started = Instant::now();
    let out = a.run(&[
        "--json",
        "revoke",
        "searcher-hot",
        "--reason",
        "leak drill",
        "--yes",
    ]);
    let returned = Instant::now();
    let returned_ms = now_ms();
    assert!(out.status.success(), "{}", dump(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["via"], "signer", "{v}");
    assert_eq!(v["revoked"], serde_json::json!(["searcher-hot@1"]), "{v}");

    std::thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::SeqCst);
    let answers: Vec<Answer> = loops.into_iter().flat_map(|l| l.join().unwrap()).collect();

    // The client answers.
    let signed: Vec<&Answer> = answers.iter().filter(|x| x.result.is_ok()).collect();
    assert!(
        !signed.is_empty(),
        "the loop signed nothing before the revocation:\n{}",
        signer.log_text()
    );
    let late_signed: Vec<&&Answer> = signed.iter().filter(|x| x.started >= returned).collect();
    assert!(
        late_signed.is_empty(),
        "{} requests started after `keyctl revoke` returned were signed",
        late_signed.len()
    );
    let after: Vec<&Answer> = answers.iter().filter(|x| x.started >= returned).collect();
    assert!(
        !after.is_empty(),
        "no request was made after the revocation"
    );
    for x in &after {
        let code = x.result.as_ref().unwrap_err();
        assert!(
            code == "key_revoked" || code == "key_not_signable",
            "a request after the revocation was refused with {code}"
        );
    }
    let first_refusal = answers
        .iter()
        .filter(|x| x.result.is_err() && x.ended > returned)
        .map(|x| x.ended - returned)
        .min()
        .expect("no request was refused after the revocation");

    // The store's audit chain.
    let export = a.dir.join("revoke-loop.jsonl");
    a.ok(&["audit", "export", "--out", export.to_str().unwrap()]);
    let records: Vec<Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let revoke_seq = records
        .iter()
        .find(|r| r["kind"] == "key_change" && r["payload"]["op"] == "revoke")
        .unwrap_or_else(|| panic!("no revocation record"))["seq"]
        .as_u64()
        .unwrap();
    // Decisions to sign with searcher-hot@1, by request id → seq.
    let decisions: BTreeMap<String, u64> = records
        .iter()
        .filter(|r| r["kind"] == "decision" && r["payload"].to_string().contains("searcher-hot@1"))
        .filter_map(|r| Some((r["request_id"].as_str()?.to_owned(), r["seq"].as_u64()?)))
        .collect();
    let signatures: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "signature")
        .collect();
    assert!(!signatures.is_empty(), "no signature record in the chain");
    for s in &signatures {
        let rid = s["request_id"].as_str().unwrap();
        let at = s["at"].as_u64().unwrap();
        assert!(
            at <= returned_ms,
            "signature record {} made {} ms after keyctl revoke returned",
            s["seq"],
            at - returned_ms
        );
        let decided = decisions
            .get(rid)
            .unwrap_or_else(|| panic!("signature {rid} has no decision record"));
        assert!(
            *decided < revoke_seq,
            "request {rid} was decided (seq {decided}) after the revocation (seq {revoke_seq})"
        );
    }
    for d in decisions.values() {
        assert!(*d < revoke_seq, "a decision to sign after the revocation");
    }
    // Every signature a client received is in the chain.
    for x in &signed {
        let rid = x.result.as_ref().unwrap();
        assert!(
            signatures.iter().any(|s| s["request_id"] == rid.as_str()),
            "the client got a signature for {rid} that the chain does not record"
        );
    }
    a.ok(&["audit", "verify"]);
    eprintln!(
        "revocation gap (keyctl): keyctl revoke took {} ms; {} requests signed before it, {} \
         refused after it; first refusal {:.1} ms after keyctl revoke returned",
        (returned - revoke_started).as_millis(),
        signed.len(),
        after.len(),
        first_refusal.as_secs_f64() * 1000.0
    );
}
