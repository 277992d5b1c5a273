//! Budget grants through `keyctl grant new / sign / submit / list` (the real binaries; approver
//! keys on the dev token, EIP-712 signed) against the real signer, with the dev policy's
//! `large-transfer` tier (above 1 ether, 2 of the 3 `risk` approvers).
//!
//! The model: a grant "client C may spend up to X (worst-case cost) with key K to these
//! destinations from T0 until T1" counts once its signers reach a tier's threshold; a request the
//! tier would hold for approvals is signed at once while the grant's budget lasts, and goes back
//! to waiting for approvals when it does not. The signer refuses grants that could never count
//! (one approver, a key outside the approver sets, expired) with stable codes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use alloy::primitives::Bytes;
use alloy::signers::SignerSync;
use alloy::sol_types::SolStruct;
use castellan_api::client::ClientError;
use castellan_api::signer::{GrantSubmission, UnsignedTx};
use castellan_policy::{BudgetGrant, castellan_domain};
use common::*;
use serde_json::Value;

const DEST: &str = "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed";
const ALPHA: &str = "spiffe://castellan/strategy/alpha";
const BETA: &str = "spiffe://castellan/strategy/beta";

/// 2 ETH to DEST: above the 1 ether tier, below the 5 ether cap. Worst-case cost 2.000021 ETH.
fn large_transfer(nonce: u64) -> UnsignedTx {
    serde_json::from_value(serde_json::json!({
        "chainId": "0x7a69", "nonce": nonce.to_string(), "to": DEST,
        "value": "2000000000000000000", "gas": "21000",
        "maxFeePerGas": "0x3b9aca00", "maxPriorityFeePerGas": "1"
    }))
    .unwrap()
}

/// Signs as strategy-alpha: Ok(key version) on 200, Err(Some(request id)) on 202.
fn send(a: &Appliance, nonce: u64) -> Result<String, Option<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match rt.block_on(
        a.client("strategy-alpha")
            .sign_transaction("searcher-hot", large_transfer(nonce)),
    ) {
        Ok(r) => Ok(r.request_id),
        Err(ClientError::Pending(p)) => Err(Some(p.request_id)),
        Err(other) => panic!("unexpected answer: {other:?}"),
    }
}

/// `keyctl grant new` for `client` with a 5 ether budget; returns the file.
fn new_grant(a: &Appliance, name: &str, client: &str, extra: &[&str]) -> std::path::PathBuf {
    let file = a.dir.join(format!("{name}.json"));
    let mut args = vec![
        "grant",
        "new",
        "--client",
        client,
        "--key",
        "searcher-hot",
        "--budget",
        "5",
        "--to",
        DEST,
        "--valid-for",
        "1h",
        "--out",
        file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    a.ok(&args);
    file
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_grant_by_two_of_three_approvers_signs_inside_its_budget_and_bad_grants_are_refused() {
    let a = Appliance::new();
    let signer = RunningSigner::start(&a);

    // Without a grant, a 2 ETH transfer waits for approvals.
    assert!(send(&a, 0).is_err(), "signed without approvals or grant");

    // One approver's signature is not enough for a 2-of-3 tier: refused, nothing registered.
    let one = new_grant(&a, "one", ALPHA, &[]);
    a.ok(&["grant", "sign", path(&one), "--as", "approver-1"]);
    let (code, line) = a.fails(&["grant", "submit", path(&one)]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("grant_below_threshold"), "{line}");
    // The same approver signing twice still counts once.
    a.ok(&["grant", "sign", path(&one), "--as", "approver-1"]);
    let sub: GrantSubmission =
        serde_json::from_str(&std::fs::read_to_string(&one).unwrap()).unwrap();
    assert_eq!(sub.signatures.len(), 1);

    // A signature by a key outside the approver sets (any EIP-712 wallet: anvil's dev key #0)
    // next to two registered approvers: refused as a whole.
    let forged = new_grant(&a, "forged", ALPHA, &[]);
    a.ok(&["grant", "sign", path(&forged), "--as", "approver-1"]);
    a.ok(&["grant", "sign", path(&forged), "--as", "approver-2"]);
    let mut sub: GrantSubmission =
        serde_json::from_str(&std::fs::read_to_string(&forged).unwrap()).unwrap();
    let typed = BudgetGrant {
        client: sub.grant.client.clone(),
        key: sub.grant.key.clone(),
        maxValue: sub.grant.max_value.0,
        maxCost: sub.grant.max_cost.0,
        destinations: sub.grant.destinations.iter().map(|d| d.0).collect(),
        budget: sub.grant.budget.0,
        window: sub.grant.window.0,
        validFrom: sub.grant.valid_from.0,
        validUntil: sub.grant.valid_until.0,
        nonce: sub.grant.nonce.0,
    };
    let outsider = castellan_tests::relays::dev_signer(0);
    let hash = typed.eip712_signing_hash(&castellan_domain(31337));
    let sig = outsider.sign_hash_sync(&hash).unwrap();
    sub.signatures.push(Bytes::from(sig.as_bytes().to_vec()));
    std::fs::write(&forged, serde_json::to_string(&sub).unwrap()).unwrap();
    let (_, line) = a.fails(&["grant", "submit", path(&forged)]);
    assert!(line.contains("grant_unregistered_signer"), "{line}");
    assert!(
        line.to_lowercase()
            .contains(&outsider.address().to_string().to_lowercase()),
        "{line}"
    );

    // An expired grant (made two hours ago, valid for one): refused.
    let past = (now_secs() - 7200).to_string();
    let old = new_grant(&a, "old", ALPHA, &["--now", &past]);
    a.ok(&["grant", "sign", path(&old), "--as", "approver-1"]);
    a.ok(&["grant", "sign", path(&old), "--as", "approver-3"]);
    let (_, line) = a.fails(&["grant", "submit", path(&old)]);
    assert!(line.contains("grant_expired"), "{line}");

    // A valid grant for client beta (2 of 3) does not cover alpha's request.
    let beta = new_grant(&a, "beta", BETA, &[]);
    a.ok(&["grant", "sign", path(&beta), "--as", "approver-2"]);
    a.ok(&["grant", "sign", path(&beta), "--as", "approver-3"]);
    let beta_view = a.json(&["grant", "submit", path(&beta), "--as", "approver-2"]);
    assert_eq!(
        beta_view["signers"].as_array().unwrap().len(),
        2,
        "{beta_view}"
    );
    assert!(send(&a, 0).is_err(), "beta's grant covered alpha");

    // The grant for alpha, signed by approvers 1 and 3 (admin submits it).
    let alpha = new_grant(&a, "alpha", ALPHA, &[]);
    a.ok(&["grant", "sign", path(&alpha), "--as", "approver-1"]);
    a.ok(&["grant", "sign", path(&alpha), "--as", "approver-3"]);
    let view = a.json(&["grant", "submit", path(&alpha)]);
    let id = view["id"].as_str().unwrap().to_owned();
    assert_eq!(view["active"], true, "{view}");
    // Submitting it again is refused (it would not get a fresh budget).
    let (_, line) = a.fails(&["grant", "submit", path(&alpha)]);
    assert!(line.contains("grant_exists"), "{line}");

    // Inside the budget (5 ETH): two 2 ETH transfers are signed at once, no approval asked.
    let r1 = send(&a, 0)
        .unwrap_or_else(|p| panic!("not signed under the grant ({p:?}): {}", signer.log_text()));
    let r2 = send(&a, 1).expect("second transfer inside the budget not signed");
    // A third would bring the spending to 6.00006 ETH: back to waiting for approvals.
    let pending = send(&a, 2).expect_err("signed beyond the grant's budget");
    assert!(pending.is_some());

    // The list shows spent and remaining.
    let list = a.json(&["grant", "list"]);
    let g: &Value = list["grants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} not listed: {list}"));
    let spent =
        u128::from_str_radix(g["spent"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
    assert_eq!(
        spent,
        2 * (2_000_000_000_000_000_000 + 21_000 * 1_000_000_000),
        "{g}"
    );
    let remaining = u128::from_str_radix(
        g["remaining"].as_str().unwrap().trim_start_matches("0x"),
        16,
    )
    .unwrap();
    assert_eq!(remaining, 5_000_000_000_000_000_000 - spent, "{g}");

    // Audit: the grant's record and one decision record per signature naming it.
    let export = a.dir.join("grants.jsonl");
    a.ok(&["audit", "export", "--out", path(&export)]);
    let records: Vec<Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        records
            .iter()
            .filter(|r| r["kind"] == "grant" && r.to_string().contains(&id))
            .count(),
        1
    );
    for rid in [&r1, &r2] {
        let d = records
            .iter()
            .find(|r| r["kind"] == "decision" && r["request_id"] == rid.as_str())
            .unwrap_or_else(|| panic!("no decision record for {rid}"));
        let text = d.to_string();
        assert!(
            text.contains(&id) && text.contains("allowed_by_grant"),
            "{d}"
        );
    }
    for code in [
        "grant_below_threshold",
        "grant_unregistered_signer",
        "grant_expired",
        "grant_exists",
    ] {
        assert!(
            records
                .iter()
                .any(|r| r["kind"] == "refusal" && r.to_string().contains(code)),
            "no refusal record with {code}"
        );
    }
    a.ok(&["audit", "verify"]);

    // A restarted signer loads the grant with what was spent: still no room for a third.
    drop(signer);
    let _signer = RunningSigner::start(&a);
    assert!(
        send(&a, 3).is_err(),
        "the restarted signer forgot the spending"
    );
}
