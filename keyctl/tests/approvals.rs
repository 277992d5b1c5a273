//! Approvals through `keyctl approve` / `keyctl reject` (the real binary, EIP-712 signed with the
//! approver keys on the dev token) against the real signer: three approver keys, one approval
//! expired, and exactly the 2-of-3 threshold logic of the dev policy's `large-transfer` tier.
//!
//! The model: an approval is `(request digest, decision, expiry)` signed by an approver's key;
//! the signer refuses one that is already expired when submitted (`approval_expired`) and counts a
//! stored one only while `now < expiry`. Approver keys themselves have no validity period in the
//! policy (a key leaves the set by a policy change), so "expired" is the approval's expiry.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::time::Duration;

use castellan_api::client::ClientError;
use castellan_api::signer::UnsignedTx;
use common::*;
use serde_json::Value;

/// 2 ETH: above the dev policy's `large-transfer` tier (1 ether, 2 of the `risk` set), below the
/// 5 ether cap.
fn large_transfer(nonce: u64) -> UnsignedTx {
    serde_json::from_value(serde_json::json!({
        "chainId": "0x7a69", "nonce": nonce.to_string(),
        "to": "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed",
        "value": "2000000000000000000", "gas": "21000",
        "maxFeePerGas": "0x3b9aca00", "maxPriorityFeePerGas": "1"
    }))
    .unwrap()
}

/// Asks for a large transfer; returns the pending request id.
fn propose(a: &Appliance, nonce: u64) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = a.client("strategy-alpha");
    match rt.block_on(client.sign_transaction("searcher-hot", large_transfer(nonce))) {
        Err(ClientError::Pending(p)) => {
            assert_eq!(p.threshold, 2, "{p:?}");
            assert_eq!(p.approver_set, "risk");
            p.request_id.clone()
        }
        other => panic!("a 2 ETH transfer did not wait for approvals: {other:?}"),
    }
}

fn approvers(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v["approvers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_lowercase())
        .collect();
    out.sort();
    out
}

#[test]
fn three_approvers_one_expired_exactly_the_two_of_three_threshold_holds() {
    let a = Appliance::new();
    let signer = RunningSigner::start(&a);
    let id = propose(&a, 0);

    // approver-3 approves with an approval that expires in a few seconds (time injected: the
    // approval is made "an hour ago" with a one-hour ttl, plus 4 s).
    let t0 = now_secs();
    let expires = t0 + 4;
    let third = a.json(&[
        "approve",
        &id,
        "--as",
        "approver-3",
        "--ttl",
        "1h",
        "--now",
        &(expires - 3600).to_string(),
    ]);
    assert_eq!(third["approvals"], 1, "{third}");
    assert_eq!(third["state"], "pending_approvals", "{third}");
    let a3 = approvers(&third).pop().unwrap();

    // An approval already expired when submitted is refused, with its code, and not counted.
    let (code, line) = a.fails(&[
        "approve",
        &id,
        "--as",
        "approver-2",
        "--now",
        &(t0 - 7200).to_string(),
    ]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("approval_expired"), "{line}");

    // Wait until approver-3's approval has expired (bounded: a few seconds).
    while now_secs() <= expires {
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = a.json(&["approve", &id, "--as", "approver-1"]);
    // expired (approver-3) + 1 valid (approver-1) = 1 of 2: not signed.
    assert_eq!(st["approvals"], 1, "{st}");
    assert_eq!(st["state"], "pending_approvals", "{st}");
    assert!(
        st.get("result").is_none(),
        "signed with one valid approval: {st}"
    );
    let a1 = approvers(&st).pop().unwrap();
    assert_ne!(a1, a3);

    // The same approver again does not count twice.
    let st = a.json(&["approve", &id, "--as", "approver-1"]);
    assert_eq!(st["approvals"], 1, "{st}");
    assert_eq!(st["state"], "pending_approvals", "{st}");

    // Two distinct valid approvals: signed.
    let st = a.json(&["approve", &id, "--as", "approver-2"]);
    assert_eq!(st["state"], "signed", "{st}\n{}", signer.log_text());
    assert_eq!(st["approvals"], 2, "{st}");
    let both = approvers(&st);
    assert_eq!(both.len(), 2, "{st}");
    assert!(both.contains(&a1) && !both.contains(&a3), "{st}");
    let a2 = both.iter().find(|x| **x != a1).unwrap().clone();
    assert_eq!(st["result"]["keyVersion"], "searcher-hot@1", "{st}");

    // The decision record names exactly the two valid approvers.
    let export = a.dir.join("approvals.jsonl");
    a.ok(&["audit", "export", "--out", export.to_str().unwrap()]);
    let decision: Value = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["kind"] == "decision" && r["request_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no decision record for {id}"));
    let text = decision.to_string().to_lowercase();
    assert!(text.contains(&a1) && text.contains(&a2), "{decision}");
    assert!(
        !text.contains(&a3),
        "the expired approver counted: {decision}"
    );

    // A rejection ends a request: later approvals do not sign it.
    let id2 = propose(&a, 1);
    let r = a.json(&["reject", &id2, "--as", "approver-3"]);
    assert_eq!(r["state"], "refused", "{r}");
    let o = a.run(&["--json", "approve", &id2, "--as", "approver-1"]);
    let o2 = a.run(&["--json", "approve", &id2, "--as", "approver-2"]);
    for out in [&o, &o2] {
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_ne!(v["state"], "signed", "a rejected request was signed: {v}");
        }
    }
    a.ok(&["audit", "verify"]);
}
