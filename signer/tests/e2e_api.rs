//! End-to-end tests of the signer binary over mTLS: a real SoftHSM token, certificates made here,
//! a local anvil node, and independent checkers (anvil, eth-account, scripts/verify_audit.py).
//!
//! Each test runs in a child process of its own with its own token directory (see
//! `castellan_tests::softhsm`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use alloy::consensus::TxEnvelope;
use alloy::eips::Decodable2718;
use alloy::primitives::{Address, B256, U256, address};
use alloy::providers::Provider;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolStruct;
use castellan_api::signer::{PendingResponse, RequestStatus, SignedTransactionResponse};
use castellan_policy::{Approval, castellan_domain};
use castellan_tests::anvil::Anvil;
use castellan_tests::softhsm::in_own_process;
use serde_json::{Value, json};
use support::{Appliance, CHAIN_ID, count_kind, policy_toml, refused_with, runtime};

const RECIPIENT: Address = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");
const ETHER: u128 = 1_000_000_000_000_000_000;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn approvers() -> Vec<PrivateKeySigner> {
    (1u8..=3)
        .map(|i| PrivateKeySigner::from_bytes(&B256::repeat_byte(0x40 + i)).unwrap())
        .collect()
}

/// A transfer of `value` wei to [`RECIPIENT`].
fn tx_json(nonce: u64, value: u128) -> Value {
    support::transfer_to(nonce, RECIPIENT, value)
}

async fn sign(app: &Appliance, who: &str, key: &str, body: &Value) -> (u16, Value) {
    let resp = app
        .client(Some(who))
        .post(app.url(&format!("/v1/keys/{key}/sign/transaction")))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn start(token: &castellan_tests::softhsm::SoftHsmToken, keys: &[&str]) -> Appliance {
    let addrs: Vec<Address> = approvers().iter().map(|s| s.address()).collect();
    Appliance::start(token, keys, &policy_toml(&addrs)).await
}

#[test]
fn strategy_signs_a_transaction_anvil_mines_and_refusals_are_audited() {
    in_own_process(
        "strategy_signs_a_transaction_anvil_mines_and_refusals_are_audited",
        "e2e-sign",
        |token| {
            runtime().block_on(async {
                let app = start(token, &["hot", "cold"]).await;
                let from = app.keys["hot"];
                let anvil = Anvil::start().await;
                anvil.set_balance(from, U256::from(10 * ETHER)).await;

                let (status, body) = sign(&app, "alpha", "hot", &tx_json(0, 1000)).await;
                assert_eq!(status, 200, "{body}");
                let signed: SignedTransactionResponse = serde_json::from_value(body).unwrap();
                assert_eq!(signed.from, from);
                let hash = anvil.send_raw(&signed.raw).await;
                assert_eq!(hash, signed.hash);
                let receipt = anvil.receipt(hash).await;
                assert_eq!(receipt.from, from);
                assert!(receipt.status());

                // Refused at the handshake: no certificate, another CA, a revoked certificate.
                for who in [None, Some("stranger"), Some("revoked")] {
                    let r = app
                        .client(who)
                        .post(app.url("/v1/keys/hot/sign/transaction"))
                        .json(&tx_json(1, 1000))
                        .send()
                        .await;
                    assert!(r.is_err(), "{who:?} got in: {r:?}");
                }
                // Refused after it: a valid certificate nobody configured; a key the client may
                // not use.
                let (status, body) = sign(&app, "unknown", "hot", &tx_json(1, 1000)).await;
                assert_eq!(status, 403, "{body}");
                assert_eq!(body["error"]["code"], "unknown_identity");
                let (status, body) = sign(&app, "beta", "hot", &tx_json(1, 1000)).await;
                assert_eq!(status, 403, "{body}");
                assert_eq!(body["error"]["code"], "key_not_allowed");
                // An approver may not sign.
                let (status, body) = sign(&app, "approver1", "hot", &tx_json(1, 1000)).await;
                assert_eq!(status, 403, "{body}");
                assert_eq!(body["error"]["code"], "role_required");

                // Nothing else was signed, and every refusal is in the audit chain.
                let mut records = app.audit().await;
                for _ in 0..50 {
                    if records
                        .iter()
                        .filter(|r| refused_with(std::slice::from_ref(r), "tls_refused"))
                        .count()
                        >= 3
                    {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    records = app.audit().await;
                }
                assert_eq!(count_kind(&records, "signature"), 1);
                assert_eq!(
                    anvil.provider().get_transaction_count(from).await.unwrap(),
                    1
                );
                let tls = records
                    .iter()
                    .filter(|r| refused_with(std::slice::from_ref(r), "tls_refused"))
                    .count();
                assert!(tls >= 3, "TLS refusals audited: {tls}");
                for code in ["unknown_identity", "key_not_allowed", "role_required"] {
                    assert!(refused_with(&records, code), "no refusal record for {code}");
                }
            })
        },
    );
}

fn approval_signature(signer: &PrivateKeySigner, digest: B256, expiry: u64) -> Value {
    let approval = Approval {
        request: digest,
        decision: "approve".into(),
        expiry,
    };
    let hash = approval.eip712_signing_hash(&castellan_domain(CHAIN_ID));
    let sig = signer.sign_hash_sync(&hash).unwrap();
    json!({
        "approver": signer.address().to_string(),
        "decision": "approve",
        "expiry": expiry.to_string(),
        "signature": alloy::primitives::Bytes::from(sig.as_bytes().to_vec()),
    })
}

#[test]
fn two_of_three_approvals_release_a_large_transfer() {
    in_own_process(
        "two_of_three_approvals_release_a_large_transfer",
        "e2e-approve",
        |token| {
            runtime().block_on(async {
                let app = start(token, &["hot"]).await;
                let from = app.keys["hot"];
                let anvil = Anvil::start().await;
                anvil.set_balance(from, U256::from(10 * ETHER)).await;
                let [a1, a2, _a3] = <[PrivateKeySigner; 3]>::try_from(approvers()).unwrap();

                let (status, body) = sign(&app, "alpha", "hot", &tx_json(0, 2 * ETHER)).await;
                assert_eq!(status, 202, "{body}");
                let pending: PendingResponse = serde_json::from_value(body).unwrap();
                assert_eq!(pending.threshold, 2);
                let id = pending.request_id.clone();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let post = |who: &'static str, body: Value| {
                    let app = &app;
                    let id = id.clone();
                    async move {
                        let r = app
                            .client(Some(who))
                            .post(app.url(&format!("/v1/requests/{id}/approvals")))
                            .json(&body)
                            .send()
                            .await
                            .unwrap();
                        (r.status().as_u16(), r.json::<Value>().await.unwrap())
                    }
                };

                // Another strategy host cannot read it; the one that asked can.
                let read = |who: &'static str| {
                    let url = app.url(&format!("/v1/requests/{id}"));
                    let client = app.client(Some(who));
                    async move { client.get(url).send().await.unwrap().status().as_u16() }
                };
                assert_eq!(read("beta").await, 404);
                assert_eq!(read("alpha").await, 200);
                assert_eq!(read("approver3").await, 200);

                // An expired approval does not count.
                let (s, b) = post(
                    "approver1",
                    approval_signature(&a1, pending.request_digest, now - 10),
                )
                .await;
                assert_eq!(s, 400, "{b}");
                assert_eq!(b["error"]["code"], "approval_expired");
                // One approval: still pending, nothing signed.
                let (s, b) = post(
                    "approver1",
                    approval_signature(&a1, pending.request_digest, now + 600),
                )
                .await;
                assert_eq!(s, 200, "{b}");
                let st: RequestStatus = serde_json::from_value(b).unwrap();
                assert_eq!(st.approvals, 1);
                assert!(st.result.is_none());
                // The same approver again: still one.
                let (s, b) = post(
                    "approver1",
                    approval_signature(&a1, pending.request_digest, now + 601),
                )
                .await;
                assert_eq!(s, 200, "{b}");
                let st: RequestStatus = serde_json::from_value(b).unwrap();
                assert_eq!(
                    st.approvals, 1,
                    "a second approval by the same approver counted"
                );
                assert!(st.result.is_none());
                // An approval of another request does not count (signature does not recover).
                let (s, b) = post(
                    "approver2",
                    approval_signature(&a2, B256::repeat_byte(7), now + 600),
                )
                .await;
                assert_eq!(s, 400, "{b}");
                assert_eq!(b["error"]["code"], "approval_signature_mismatch");
                assert_eq!(count_kind(&app.audit().await, "signature"), 0);

                // A second distinct approver: signed.
                let (s, b) = post(
                    "approver2",
                    approval_signature(&a2, pending.request_digest, now + 600),
                )
                .await;
                assert_eq!(s, 200, "{b}");
                let st: RequestStatus = serde_json::from_value(b.clone()).unwrap();
                assert_eq!(st.approvals, 2);
                let result: SignedTransactionResponse =
                    serde_json::from_value(st.result.expect("signed after two approvals")).unwrap();
                let env = TxEnvelope::decode_2718(&mut result.raw.as_ref()).unwrap();
                assert_eq!(*env.tx_hash(), result.hash);
                let hash = anvil.send_raw(&result.raw).await;
                assert_eq!(anvil.receipt(hash).await.from, from);
                assert_eq!(count_kind(&app.audit().await, "signature"), 1);
            })
        },
    );
}

#[test]
fn freeze_stops_everything_and_revoking_one_key_spares_the_others() {
    in_own_process(
        "freeze_stops_everything_and_revoking_one_key_spares_the_others",
        "e2e-freeze",
        |token| {
            runtime().block_on(async {
                let app = start(token, &["hot", "cold"]).await;
                let admin = app.client(Some("ops"));
                assert_eq!(sign(&app, "alpha", "hot", &tx_json(0, 1)).await.0, 200);
                assert_eq!(sign(&app, "alpha", "cold", &tx_json(0, 1)).await.0, 200);

                let r = admin
                    .post(app.url("/v1/admin/keys/hot/revoke"))
                    .json(&json!({ "reason": "suspected leak" }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
                let (s, b) = sign(&app, "alpha", "hot", &tx_json(1, 1)).await;
                assert_eq!(s, 409, "{b}");
                assert_eq!(b["error"]["code"], "key_revoked");
                assert_eq!(sign(&app, "alpha", "cold", &tx_json(1, 1)).await.0, 200);

                let r = admin
                    .post(app.url("/v1/admin/freeze"))
                    .json(&json!({ "reason": "incident 42" }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
                let (s, b) = sign(&app, "alpha", "cold", &tx_json(2, 1)).await;
                assert_eq!(s, 409, "{b}");
                assert_eq!(b["error"]["code"], "frozen");
                assert!(
                    b["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("incident 42")
                );
                assert_eq!(count_kind(&app.audit().await, "signature"), 3);

                // Unfreezing needs two of the three approvers.
                let r = admin
                    .post(app.url("/v1/admin/unfreeze"))
                    .json(&json!({ "reason": "incident 42 resolved" }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 202);
                let pending: PendingResponse = r.json().await.unwrap();
                let now = unix_now();
                let [a1, a2, _] = <[PrivateKeySigner; 3]>::try_from(approvers()).unwrap();
                for (who, signer) in [("approver1", &a1), ("approver2", &a2)] {
                    // Still frozen before the second approval.
                    let (s, _) = sign(&app, "alpha", "cold", &tx_json(2, 1)).await;
                    assert_eq!(s, 409);
                    let r = app
                        .client(Some(who))
                        .post(app.url(&format!("/v1/requests/{}/approvals", pending.request_id)))
                        .json(&approval_signature(
                            signer,
                            pending.request_digest,
                            now + 600,
                        ))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
                }
                assert_eq!(sign(&app, "alpha", "cold", &tx_json(2, 1)).await.0, 200);
                assert_eq!(count_kind(&app.audit().await, "signature"), 4);
            })
        },
    );
}

#[test]
fn malformed_input_is_refused_with_stable_codes_and_nothing_is_signed() {
    in_own_process(
        "malformed_input_is_refused_with_stable_codes_and_nothing_is_signed",
        "e2e-malformed",
        |token| {
            runtime().block_on(async {
                let addrs: Vec<Address> = approvers().iter().map(|s| s.address()).collect();
                let app = support::Appliance::start_with(
                    token,
                    &["hot"],
                    &policy_toml(&addrs),
                    "[metrics]\nlisten = \"127.0.0.1:0\"\n",
                )
                .await;
                let client = app.client(Some("alpha"));
                let url = app.url("/v1/keys/hot/sign/transaction");
                let raw = |body: String| {
                    let client = client.clone();
                    let url = url.clone();
                    async move {
                        let r = client
                            .post(url)
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await
                            .unwrap();
                        let status = r.status().as_u16();
                        (status, r.json::<Value>().await.unwrap_or(Value::Null))
                    }
                };
                let mut unknown = tx_json(0, 1);
                unknown["tx"]["extra"] = json!("1");
                let mut overflow = tx_json(0, 1);
                overflow["tx"]["value"] = json!(format!("0x1{}", "0".repeat(64)));
                let mut wrong_chain = tx_json(0, 1);
                wrong_chain["tx"]["chainId"] = json!("1");
                let mut number = tx_json(0, 1);
                number["tx"]["nonce"] = json!(0);
                let cases = [
                    ("{\"tx\": {".to_owned(), 400, "malformed_json"),
                    (unknown.to_string(), 400, "unknown_field"),
                    (overflow.to_string(), 400, "invalid_value"),
                    (number.to_string(), 400, "invalid_value"),
                    (wrong_chain.to_string(), 400, "chain_mismatch"),
                    (
                        format!("{{\"tx\": \"{}\"}}", "a".repeat(10 * 1024 * 1024)),
                        413,
                        "body_too_large",
                    ),
                ];
                for (body, status, code) in cases {
                    let (s, b) = raw(body).await;
                    assert_eq!(
                        (s, b["error"]["code"].as_str()),
                        (status, Some(code)),
                        "{b}"
                    );
                    assert!(
                        b["error"]["message"]
                            .as_str()
                            .is_some_and(|m| !m.is_empty())
                    );
                }
                let records = app.audit().await;
                assert_eq!(count_kind(&records, "signature"), 0);
                assert_eq!(count_kind(&records, "decision"), 0);
                // The signer is still healthy and signs a good request.
                assert_eq!(sign(&app, "alpha", "hot", &tx_json(0, 1)).await.0, 200);
                // Every answer is counted by route and stable code.
                let metrics = app.metrics().await;
                for code in ["unknown_field", "chain_mismatch", "signed"] {
                    let line = format!(
                        "castellan_signer_requests_total{{route=\"transaction\",code=\"{code}\"}} 1"
                    );
                    assert!(metrics.contains(&line), "{line} missing in\n{metrics}");
                }
                assert!(metrics.contains("castellan_signer_ready 1"), "{metrics}");
            })
        },
    );
}

#[test]
fn exported_audit_chain_verifies_independently_and_fails_on_one_altered_record() {
    in_own_process(
        "exported_audit_chain_verifies_independently_and_fails_on_one_altered_record",
        "e2e-audit",
        |token| {
            runtime().block_on(async {
                let app = start(token, &["hot"]).await;
                for n in 0..3 {
                    assert_eq!(sign(&app, "alpha", "hot", &tx_json(n, 1)).await.0, 200);
                }
                let _ = sign(&app, "beta", "hot", &tx_json(3, 1)).await;
                let export = app.audit_export().await;
                let path = app.path("audit.jsonl");
                std::fs::write(&path, &export).unwrap();
                let python = std::env::var("CASTELLAN_PYTHON")
                    .expect("CASTELLAN_PYTHON is not set: run the tests with scripts/test");
                let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/verify_audit.py");
                let run = |p: &std::path::Path| {
                    std::process::Command::new(&python)
                        .arg(script)
                        .arg(p)
                        .output()
                        .unwrap()
                };
                let ok = run(&path);
                assert!(
                    ok.status.success(),
                    "{}",
                    String::from_utf8_lossy(&ok.stdout)
                );

                // Alter one record: the third record's payload.
                let mut lines: Vec<String> = export.lines().map(str::to_owned).collect();
                assert!(lines.len() >= 6, "{export}");
                let mut rec: Value = serde_json::from_str(&lines[2]).unwrap();
                let seq = rec["seq"].as_u64().unwrap();
                rec["identity"] = json!("spiffe://castellan/strategy/mallory");
                lines[2] = rec.to_string();
                let bad = app.path("audit-altered.jsonl");
                std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
                let out = run(&bad);
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(!out.status.success(), "{text}");
                assert!(text.contains(&format!("seq {seq}")), "{text}");
            })
        },
    );
}

#[test]
fn an_alloy_provider_using_the_api_signer_sends_a_transaction_anvil_mines() {
    in_own_process(
        "an_alloy_provider_using_the_api_signer_sends_a_transaction_anvil_mines",
        "e2e-alloy",
        |token| {
            runtime().block_on(async {
                use alloy::network::{EthereumWallet, TransactionBuilder};
                use alloy::providers::ProviderBuilder;
                use alloy::rpc::types::TransactionRequest;
                use castellan_api::client::{RemoteSigner, SignerClient};
                use castellan_api::tls::ClientTlsConfig;

                let app = start(token, &["hot"]).await;
                let from = app.keys["hot"];
                let anvil = Anvil::start().await;
                anvil.set_balance(from, U256::from(10 * ETHER)).await;

                let tls = ClientTlsConfig {
                    server_ca: app.path("ca.pem"),
                    cert: app.path("alpha.pem"),
                    key: app.path("alpha.key"),
                };
                let client = SignerClient::with_builder(
                    app.url(""),
                    &tls,
                    reqwest::Client::builder().resolve("localhost", app.addr),
                )
                .unwrap();
                let signer = RemoteSigner::connect(client, "hot", Some(CHAIN_ID))
                    .await
                    .unwrap();
                assert_eq!(alloy::signers::Signer::address(&signer), from);
                let provider = ProviderBuilder::new()
                    .wallet(EthereumWallet::from(signer.clone()))
                    .connect_http(anvil.url().clone());
                let tx = TransactionRequest::default()
                    .with_to(RECIPIENT)
                    .with_value(U256::from(1234u64));
                let receipt = provider
                    .send_transaction(tx)
                    .await
                    .unwrap()
                    .get_receipt()
                    .await
                    .unwrap();
                assert_eq!(receipt.from, from);
                assert!(receipt.status());

                // Messages through alloy's Signer trait recover to the key too.
                let sig = alloy::signers::Signer::sign_message(&signer, b"castellan")
                    .await
                    .unwrap();
                assert_eq!(sig.recover_address_from_msg(b"castellan").unwrap(), from);
                // A bare hash is never signed.
                assert!(
                    alloy::signers::Signer::sign_hash(&signer, &B256::ZERO)
                        .await
                        .is_err()
                );
            })
        },
    );
}

#[test]
fn json_rpc_signs_fills_from_the_node_forwards_reads_and_refuses_sends_of_others() {
    in_own_process(
        "json_rpc_signs_fills_from_the_node_forwards_reads_and_refuses_sends_of_others",
        "e2e-rpc",
        |token| {
            runtime().block_on(async {
                let anvil = Anvil::start().await;
                let addrs: Vec<Address> = approvers().iter().map(|s| s.address()).collect();
                let extra = format!("[upstream]\nurl = \"{}\"\n", anvil.url());
                let app =
                    support::Appliance::start_with(token, &["hot"], &policy_toml(&addrs), &extra)
                        .await;
                let from = app.keys["hot"];
                anvil.set_balance(from, U256::from(10 * ETHER)).await;
                let client = app.client(Some("alpha"));
                let call = |method: &'static str, params: Value| {
                    let client = client.clone();
                    let url = app.url("/rpc");
                    async move {
                        client
                            .post(url)
                            .json(&json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}))
                            .send()
                            .await
                            .unwrap()
                            .json::<Value>()
                            .await
                            .unwrap()
                    }
                };
                assert_eq!(call("eth_chainId", json!([])).await["result"], "0x7a69");
                let accounts = call("eth_accounts", json!([])).await;
                assert_eq!(accounts["result"], json!([from]));
                assert_eq!(accounts["id"], 7);

                // Nonce, gas and fees left out: filled from the node, judged by the policy.
                let r = call(
                    "eth_signTransaction",
                    json!([{ "from": from, "to": RECIPIENT, "value": "0x3e8" }]),
                )
                .await;
                let raw: alloy::primitives::Bytes =
                    serde_json::from_value(r["result"].clone()).unwrap_or_else(|_| panic!("{r}"));
                let hash = anvil.send_raw(&raw).await;
                assert_eq!(anvil.receipt(hash).await.from, from);

                // personal_sign recovers to the key.
                let r = call("personal_sign", json!(["0x68656c6c6f", from])).await;
                let sig: alloy::primitives::Bytes =
                    serde_json::from_value(r["result"].clone()).unwrap_or_else(|_| panic!("{r}"));
                let sig = alloy::primitives::Signature::try_from(sig.as_ref()).unwrap();
                assert_eq!(sig.recover_address_from_msg(b"hello").unwrap(), from);

                // Reads are forwarded; sends of raw transactions and unknown methods are not.
                let r = call("eth_getBalance", json!([RECIPIENT, "latest"])).await;
                let balance = anvil.balance(RECIPIENT).await;
                assert_eq!(r["result"], json!(format!("{balance:#x}")), "{r}");
                let r = call("eth_sendRawTransaction", json!([raw])).await;
                assert_eq!(r["error"]["code"], -32601, "{r}");
                let r = call("debug_traceCall", json!([])).await;
                assert_eq!(r["error"]["code"], -32601, "{r}");
                // A key the caller may not use, and a policy denial, carry the stable code.
                let r = call("personal_sign", json!(["0x00", RECIPIENT])).await;
                assert_eq!(r["error"]["code"], -32003, "{r}");
                let r = call(
                    "eth_signTransaction",
                    json!([{ "from": from, "to": RECIPIENT, "value": format!("{:#x}", 11 * ETHER) }]),
                )
                .await;
                assert_eq!(r["error"]["data"]["code"], "value_cap_exceeded", "{r}");
                // eth_sendTransaction without a submitter: signed, but clearly not sent.
                let r = call(
                    "eth_sendTransaction",
                    json!([{ "from": from, "to": RECIPIENT, "value": "0x1" }]),
                )
                .await;
                assert_eq!(r["error"]["data"]["code"], "no_submitter", "{r}");
            })
        },
    );
}

#[test]
fn a_bundle_is_judged_as_a_whole_and_signed_all_or_nothing() {
    in_own_process(
        "a_bundle_is_judged_as_a_whole_and_signed_all_or_nothing",
        "e2e-bundle",
        |token| {
            runtime().block_on(async {
                use alloy::consensus::{SignableTransaction, TxLegacy};
                use alloy::eips::Encodable2718;
                use alloy::primitives::TxKind;

                let app = start(token, &["hot"]).await;
                let from = app.keys["hot"];
                let anvil = Anvil::start().await;
                anvil.set_balance(from, U256::from(20 * ETHER)).await;
                // Someone else's signed transaction (anvil's first dev account).
                let other = PrivateKeySigner::from_bytes(&alloy::primitives::b256!(
                    "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
                ))
                .unwrap();
                let theirs = TxLegacy {
                    chain_id: Some(CHAIN_ID),
                    nonce: 0,
                    gas_price: 2_000_000_000,
                    gas_limit: 21_000,
                    to: TxKind::Call(RECIPIENT),
                    value: U256::from(5u64),
                    input: Default::default(),
                };
                let sig = other.sign_hash_sync(&theirs.signature_hash()).unwrap();
                let signed_theirs: TxEnvelope = theirs.clone().into_signed(sig).into();
                let theirs_raw = alloy::primitives::Bytes::from(signed_theirs.encoded_2718());

                let bundle = |v1: u128, v2: u128| {
                    json!({
                        "txs": [
                            { "tx": tx_json(0, v1)["tx"] },
                            { "signed": theirs_raw },
                            { "tx": tx_json(1, v2)["tx"] },
                        ],
                        "targetBlock": "0x10",
                    })
                };
                let post = |body: Value| {
                    let client = app.client(Some("alpha"));
                    let url = app.url("/v1/keys/hot/sign/bundle");
                    async move {
                        let r = client.post(url).json(&body).send().await.unwrap();
                        (r.status().as_u16(), r.json::<Value>().await.unwrap())
                    }
                };
                // 0.6 + 0.6 ether is fine per transaction but the bundle is judged as a whole
                // against the 1-ether approval tier: it waits; 6 + 6 ether exceeds the 10-ether
                // value cap: refused, nothing signed.
                let (s, b) = post(bundle(6 * ETHER, 6 * ETHER)).await;
                assert_eq!(
                    (s, b["error"]["code"].as_str()),
                    (422, Some("value_cap_exceeded")),
                    "{b}"
                );
                let (s, b) = post(bundle(ETHER / 10 * 6, ETHER / 10 * 6)).await;
                assert_eq!(s, 202, "{b}");
                assert_eq!(count_kind(&app.audit().await, "signature"), 0);

                // Another's transaction that the submitter would refuse makes the whole bundle
                // refused before anything is signed: trailing bytes, another chain, no chain id.
                let mut trailing = theirs_raw.to_vec();
                trailing.push(0);
                let mut other_chain = theirs.clone();
                other_chain.chain_id = Some(CHAIN_ID + 1);
                let sig = other.sign_hash_sync(&other_chain.signature_hash()).unwrap();
                let other_chain: TxEnvelope = other_chain.into_signed(sig).into();
                let mut no_chain = theirs.clone();
                no_chain.chain_id = None;
                let sig = other.sign_hash_sync(&no_chain.signature_hash()).unwrap();
                let no_chain: TxEnvelope = no_chain.into_signed(sig).into();
                for (raw, code) in [
                    (
                        alloy::primitives::Bytes::from(trailing),
                        "invalid_transaction",
                    ),
                    (
                        alloy::primitives::Bytes::from(other_chain.encoded_2718()),
                        "chain_mismatch",
                    ),
                    (
                        alloy::primitives::Bytes::from(no_chain.encoded_2718()),
                        "missing_chain_id",
                    ),
                ] {
                    let body = json!({
                        "txs": [{ "tx": tx_json(0, 1000)["tx"] }, { "signed": raw }],
                        "targetBlock": "0x10",
                    });
                    let (s, b) = post(body).await;
                    assert_eq!((s, b["error"]["code"].as_str()), (400, Some(code)), "{b}");
                }
                assert_eq!(count_kind(&app.audit().await, "signature"), 0);

                let (s, b) = post(bundle(1000, 2000)).await;
                assert_eq!(s, 200, "{b}");
                assert_eq!(b["submitted"]["accepted"], false);
                assert_eq!(b["submitted"]["state"], "no_submitter");
                let txs: Vec<alloy::primitives::Bytes> =
                    serde_json::from_value(b["txs"].clone()).unwrap();
                assert_eq!(txs.len(), 3);
                assert_eq!(
                    txs[1], theirs_raw,
                    "others' transactions pass through unchanged"
                );
                for raw in &txs {
                    let hash = anvil.send_raw(raw).await;
                    let receipt = anvil.receipt(hash).await;
                    assert!(receipt.status());
                }
                assert_eq!(
                    anvil.provider().get_transaction_count(from).await.unwrap(),
                    2
                );
            })
        },
    );
}

#[test]
fn relay_auth_signs_only_hashes_for_the_submitter_and_outcomes_trip_the_breaker() {
    in_own_process(
        "relay_auth_signs_only_hashes_for_the_submitter_and_outcomes_trip_the_breaker",
        "e2e-relay",
        |token| {
            runtime().block_on(async {
                let app = start(token, &["hot", "cold", "relay"]).await;
                let sub = app.client(Some("submitter"));
                let body = br#"{"jsonrpc":"2.0","id":1,"method":"eth_sendBundle","params":[]}"#;
                let hash = alloy::primitives::keccak256(body);
                let r = sub
                    .post(app.url("/v1/relay-auth"))
                    .json(&json!({ "bodyHash": hash }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
                let v: Value = r.json().await.unwrap();
                // Flashbots' verifier: EIP-191 over the 0x-prefixed lowercase hex of the hash.
                let sig: alloy::primitives::Bytes =
                    serde_json::from_value(v["signature"].clone()).unwrap();
                let sig = alloy::primitives::Signature::try_from(sig.as_ref()).unwrap();
                let text = format!("{hash:#x}");
                assert_eq!(
                    sig.recover_address_from_msg(text.as_bytes()).unwrap(),
                    app.keys["relay"]
                );
                assert_eq!(v["address"], json!(app.keys["relay"]));

                // The submitter signs nothing else; strategies may not sign relay-auth payloads.
                let (s, b) = sign(&app, "submitter", "relay", &tx_json(0, 1)).await;
                assert_eq!(
                    (s, b["error"]["code"].as_str()),
                    (403, Some("role_required")),
                    "{b}"
                );
                let r = app
                    .client(Some("alpha"))
                    .post(app.url("/v1/keys/hot/sign/message"))
                    .json(&json!({ "text": text }))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let b: Value = r.json().await.unwrap();
                assert_eq!(
                    (status, b["error"]["code"].as_str()),
                    (422, Some("relay_auth_reserved")),
                    "{b}"
                );

                // Three failed outcomes in a row trip the breaker of `hot` only.
                for n in 1..=3 {
                    assert_eq!(sign(&app, "alpha", "hot", &tx_json(n, 1)).await.0, 200);
                    let r = sub
                        .post(app.url("/v1/outcomes"))
                        .json(&json!({
                            "bundleId": format!("00000000-0000-4000-8000-{n:012}"),
                            "keyName": "hot",
                            "outcome": "not_included",
                            "state": "expired",
                        }))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
                }
                let (s, b) = sign(&app, "alpha", "hot", &tx_json(4, 1)).await;
                assert_eq!(
                    (s, b["error"]["code"].as_str()),
                    (409, Some("key_paused")),
                    "{b}"
                );
                assert_eq!(sign(&app, "alpha", "cold", &tx_json(0, 1)).await.0, 200);
            })
        },
    );
}

#[test]
fn the_running_signer_checkpoints_its_audit_chain_with_the_audit_key() {
    in_own_process(
        "the_running_signer_checkpoints_its_audit_chain_with_the_audit_key",
        "e2e-checkpoint",
        |token| {
            runtime().block_on(async {
                let addrs: Vec<Address> = approvers().iter().map(|s| s.address()).collect();
                let extra = "[audit]\nkey = \"audit\"\ncheckpoint_every = 3\ninterval = \"1s\"\n";
                let app = support::Appliance::start_with(
                    token,
                    &["hot", "audit"],
                    &policy_toml(&addrs),
                    extra,
                )
                .await;
                for n in 0..4 {
                    assert_eq!(sign(&app, "alpha", "hot", &tx_json(n, 1)).await.0, 200);
                }
                let mut export = String::new();
                for _ in 0..100 {
                    export = app.audit_export().await;
                    if export.contains("\"kind\":\"checkpoint\"") {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                assert!(export.contains("\"kind\":\"checkpoint\""), "{export}");
                let path = app.path("audit.jsonl");
                std::fs::write(&path, &export).unwrap();
                let python = std::env::var("CASTELLAN_PYTHON")
                    .expect("CASTELLAN_PYTHON is not set: run the tests with scripts/test");
                let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/verify_audit.py");
                let run = |audit: Address| {
                    std::process::Command::new(&python)
                        .arg(script)
                        .arg(&path)
                        .arg("--audit-address")
                        .arg(audit.to_string())
                        .output()
                        .unwrap()
                };
                let ok = run(app.keys["audit"]);
                assert!(
                    ok.status.success(),
                    "{}",
                    String::from_utf8_lossy(&ok.stdout)
                );
                // Checkpoints by any other key are refused.
                let bad = run(app.keys["hot"]);
                assert!(
                    !bad.status.success(),
                    "{}",
                    String::from_utf8_lossy(&bad.stdout)
                );
            })
        },
    );
}

#[test]
fn no_signature_by_a_key_is_made_after_its_revocation_returns() {
    in_own_process(
        "no_signature_by_a_key_is_made_after_its_revocation_returns",
        "e2e-revoke-loop",
        |token| {
            runtime().block_on(async {
                let app = std::sync::Arc::new(start(token, &["hot"]).await);
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                // Two clients sign in a loop and note when each answer arrived.
                let mut loops = Vec::new();
                for c in 0..2u64 {
                    let app = app.clone();
                    let stop = stop.clone();
                    loops.push(tokio::spawn(async move {
                        let mut answers = Vec::new();
                        let mut n = c * 1_000_000;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let (status, _) = sign(&app, "alpha", "hot", &tx_json(n, 1)).await;
                            answers.push((std::time::Instant::now(), status));
                            n += 1;
                        }
                        answers
                    }));
                }
                tokio::time::sleep(std::time::Duration::from_millis(400)).await;
                let r = app
                    .client(Some("ops"))
                    .post(app.url("/v1/admin/keys/hot/revoke"))
                    .json(&json!({ "reason": "leak drill" }))
                    .send()
                    .await
                    .unwrap();
                let returned = std::time::Instant::now();
                let returned_ms = u64::try_from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis(),
                )
                .unwrap();
                assert_eq!(r.status().as_u16(), 200);
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let mut answers = Vec::new();
                for l in loops {
                    answers.extend(l.await.unwrap());
                }
                let signed_before = answers.iter().filter(|(_, s)| *s == 200).count();
                assert!(signed_before > 0, "the loop signed nothing before the revocation");
                // Every answer that started after the revocation returned is a refusal.
                let first_refusal = answers
                    .iter()
                    .filter(|(t, s)| *t > returned && *s != 200)
                    .map(|(t, _)| *t - returned)
                    .min()
                    .expect("no request was refused after the revocation");
                // The audit chain: no signature record made after the revocation returned.
                let records = app.audit().await;
                let late: Vec<_> = records
                    .iter()
                    .filter(|r| r.kind.as_str() == "signature" && r.at.0 > returned_ms)
                    .collect();
                assert!(late.is_empty(), "signatures after the revocation: {late:?}");
                eprintln!(
                    "revocation gap: {signed_before} answers signed before, first refusal {:?} after revoke returned",
                    first_refusal
                );
            })
        },
    );
}
