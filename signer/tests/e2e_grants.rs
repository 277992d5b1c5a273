//! Budget grants over the signer's API (the real binary, SoftHSM token, mTLS): a grant binds its
//! client and key, runs out, and is refused when it could never count; approvers sign it as
//! EIP-712 with their own keys (here alloy local keys standing in for the approvers' wallets;
//! the keyctl path with approver keys on the token is keyctl/tests/grants.rs). Signed
//! transactions are checked to recover to the key's address.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use alloy::consensus::transaction::SignerRecoverable;
use alloy::consensus::{Transaction, TxEnvelope};
use alloy::eips::Decodable2718;
use alloy::primitives::{Address, B256, Bytes, U256, address};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolStruct;
use castellan_policy::{BudgetGrant, castellan_domain};
use castellan_tests::softhsm::in_own_process;
use serde_json::{Value, json};
use support::{Appliance, CHAIN_ID, policy_toml, refused_with, runtime};

const RECIPIENT: Address = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");
const ETHER: u128 = 1_000_000_000_000_000_000;
/// Worst-case cost of a 2 ETH transfer below: value + 21000 gas × 2 gwei.
const COST: u128 = 2 * ETHER + 21_000 * 2_000_000_000;

fn approvers() -> Vec<PrivateKeySigner> {
    (1u8..=3)
        .map(|i| PrivateKeySigner::from_bytes(&B256::repeat_byte(0x40 + i)).unwrap())
        .collect()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A transfer of `value` wei to [`RECIPIENT`].
fn tx_json(nonce: u64, value: u128) -> Value {
    support::transfer_to(nonce, RECIPIENT, value)
}

fn grant(client: &str, key: &str, budget: u128, window: u64, until: u64) -> BudgetGrant {
    BudgetGrant {
        client: client.into(),
        key: key.into(),
        maxValue: U256::from(5 * ETHER),
        maxCost: U256::from(6 * ETHER),
        destinations: vec![RECIPIENT],
        budget: U256::from(budget),
        window,
        validFrom: now() - 10,
        validUntil: until,
        nonce: 1,
    }
}

fn submission(g: &BudgetGrant, by: &[&PrivateKeySigner]) -> Value {
    let hash = g.eip712_signing_hash(&castellan_domain(CHAIN_ID));
    let sigs: Vec<Bytes> = by
        .iter()
        .map(|s| Bytes::from(s.sign_hash_sync(&hash).unwrap().as_bytes().to_vec()))
        .collect();
    json!({
        "grant": {
            "client": g.client, "key": g.key,
            "maxValue": g.maxValue.to_string(), "maxCost": g.maxCost.to_string(),
            "destinations": g.destinations, "budget": g.budget.to_string(),
            "window": g.window.to_string(), "validFrom": g.validFrom.to_string(),
            "validUntil": g.validUntil.to_string(), "nonce": g.nonce.to_string(),
        },
        "signatures": sigs,
    })
}

async fn call(app: &Appliance, who: &str, get: bool, path: &str, body: &Value) -> (u16, Value) {
    let c = app.client(Some(who));
    let req = if get {
        c.get(app.url(path))
    } else {
        c.post(app.url(path)).json(body)
    };
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[test]
fn a_grant_covers_only_its_client_and_key_until_its_budget_runs_out() {
    in_own_process(
        "a_grant_covers_only_its_client_and_key_until_its_budget_runs_out",
        "e2e-grants",
        |token| {
            runtime().block_on(async {
                let addrs: Vec<Address> = approvers().iter().map(|s| s.address()).collect();
                let app = Appliance::start(token, &["hot", "cold"], &policy_toml(&addrs)).await;
                let [a1, a2, a3] = <[PrivateKeySigner; 3]>::try_from(approvers()).unwrap();
                let alpha = "spiffe://castellan/strategy/alpha";
                let until = now() + 3600;

                // Refusals, each with its code: a strategy may not submit; a rolling window is
                // not supported; one signer is below the 2-of-3 tier; a stranger's key.
                let ok = grant(alpha, "cold", 5 * ETHER, 0, until);
                let (s, b) = call(
                    &app,
                    "alpha",
                    false,
                    "/v1/grants",
                    &submission(&ok, &[&a1, &a2]),
                )
                .await;
                assert_eq!(
                    (s, b["error"]["code"].as_str()),
                    (403, Some("role_required")),
                    "{b}"
                );
                let windowed = grant(alpha, "cold", 5 * ETHER, 3600, until);
                let (s, b) = call(
                    &app,
                    "approver1",
                    false,
                    "/v1/grants",
                    &submission(&windowed, &[&a1, &a2]),
                )
                .await;
                assert_eq!(
                    (s, b["error"]["code"].as_str()),
                    (400, Some("grant_invalid")),
                    "{b}"
                );
                let (s, b) = call(
                    &app,
                    "approver1",
                    false,
                    "/v1/grants",
                    &submission(&ok, &[&a1]),
                )
                .await;
                assert_eq!(
                    (s, b["error"]["code"].as_str()),
                    (422, Some("grant_below_threshold")),
                    "{b}"
                );
                assert!(
                    b["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("at least 2"),
                    "{b}"
                );
                let stranger = PrivateKeySigner::from_bytes(&B256::repeat_byte(0x77)).unwrap();
                let (s, b) = call(
                    &app,
                    "approver1",
                    false,
                    "/v1/grants",
                    &submission(&ok, &[&a1, &stranger]),
                )
                .await;
                assert_eq!(
                    (s, b["error"]["code"].as_str()),
                    (422, Some("grant_unregistered_signer")),
                    "{b}"
                );
                let expired = grant(alpha, "cold", 5 * ETHER, 0, now() - 1);
                let (s, b) = call(
                    &app,
                    "approver1",
                    false,
                    "/v1/grants",
                    &submission(&expired, &[&a1, &a2]),
                )
                .await;
                assert_eq!(
                    (s, b["error"]["code"].as_str()),
                    (400, Some("grant_expired")),
                    "{b}"
                );

                // Budget for exactly two transfers, signed by approvers 2 and 3.
                let g = grant(alpha, "cold", 2 * COST + COST / 2, 0, until);
                let (s, view) = call(
                    &app,
                    "approver2",
                    false,
                    "/v1/grants",
                    &submission(&g, &[&a2, &a3]),
                )
                .await;
                assert_eq!(s, 201, "{view}");
                let id = view["id"].as_str().unwrap().to_owned();

                // Beta may use "cold" too, but the grant is alpha's: beta waits for approvals.
                let (s, b) = call(
                    &app,
                    "beta",
                    false,
                    "/v1/keys/cold/sign/transaction",
                    &tx_json(0, 2 * ETHER),
                )
                .await;
                assert_eq!(s, 202, "{b}");
                // Alpha with another key ("hot"): not covered either.
                let (s, b) = call(
                    &app,
                    "alpha",
                    false,
                    "/v1/keys/hot/sign/transaction",
                    &tx_json(0, 2 * ETHER),
                )
                .await;
                assert_eq!(s, 202, "{b}");
                // Alpha with "cold": signed at once, twice; the signature recovers to the key.
                let mut decided = Vec::new();
                for nonce in 0..2 {
                    let (s, b) = call(
                        &app,
                        "alpha",
                        false,
                        "/v1/keys/cold/sign/transaction",
                        &tx_json(nonce, 2 * ETHER),
                    )
                    .await;
                    assert_eq!(s, 200, "{b}");
                    let raw: Bytes = serde_json::from_value(b["raw"].clone()).unwrap();
                    let env = TxEnvelope::decode_2718(&mut raw.as_ref()).unwrap();
                    assert_eq!(env.recover_signer().unwrap(), app.keys["cold"]);
                    assert_eq!(env.value(), U256::from(2 * ETHER));
                    decided.push(b["requestId"].as_str().unwrap().to_owned());
                }
                // The third does not fit the budget: back to waiting for approvals.
                let (s, b) = call(
                    &app,
                    "alpha",
                    false,
                    "/v1/keys/cold/sign/transaction",
                    &tx_json(2, 2 * ETHER),
                )
                .await;
                assert_eq!(s, 202, "{b}");

                let (s, list) = call(&app, "ops", true, "/v1/grants", &Value::Null).await;
                assert_eq!(s, 200, "{list}");
                let mine = list["grants"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["id"] == id.as_str())
                    .unwrap();
                assert_eq!(mine["spent"], format!("{:#x}", 2 * COST), "{mine}");
                assert_eq!(mine["remaining"], format!("{:#x}", COST / 2), "{mine}");
                let (s, _) = call(&app, "alpha", true, "/v1/grants", &Value::Null).await;
                assert_eq!(s, 403);

                // Audit: the grant, each decision naming it, and the refusals.
                let records = app.audit().await;
                assert!(
                    records
                        .iter()
                        .any(|r| r.kind.as_str() == "grant" && r.payload["id"] == id.as_str())
                );
                for rid in &decided {
                    let d = records
                        .iter()
                        .find(|r| {
                            r.kind.as_str() == "decision"
                                && r.request_id.as_deref() == Some(rid.as_str())
                        })
                        .unwrap_or_else(|| panic!("no decision for {rid}"));
                    assert_eq!(
                        d.payload["details"]["grant"],
                        id.as_str(),
                        "{:?}",
                        d.payload
                    );
                    assert_eq!(d.payload["details"]["decision"], "allowed_by_grant");
                }
                for code in [
                    "grant_invalid",
                    "grant_below_threshold",
                    "grant_unregistered_signer",
                    "grant_expired",
                    "role_required",
                ] {
                    assert!(refused_with(&records, code), "no refusal record {code}");
                }
            })
        },
    );
}
