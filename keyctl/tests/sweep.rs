//! `keyctl rotate --sweep` with the real binaries and anvil: the old address's whole balance (less
//! max fee × gas) goes to the new address, signed by the RETIRING version through the signer
//! (policy, audit), mined by anvil; a request naming the retiring version that is not a sweep to
//! the successor is refused with a stable code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::io::Write;

use alloy::primitives::{Address, U256};
use castellan_api::client::ClientError;
use castellan_api::signer::UnsignedTx;
use castellan_tests::anvil::Anvil;
use common::*;
use serde_json::{Value, json};

fn addr(s: &str) -> Address {
    s.parse().unwrap()
}

/// Adds a `[sweep]` section: the anvil node, and the strategy identity as the sweeping client.
fn configure_sweep(a: &Appliance, rpc_url: &str) {
    let tls = a.dir.join("tls");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&a.config)
        .unwrap();
    writeln!(
        f,
        "\n[sweep]\nrpc_url = \"{rpc_url}\"\nconfirm_timeout_secs = 30\n\
         tls = {{ server_ca = \"{}\", cert = \"{}\", key = \"{}\" }}",
        tls.join("ca.pem").display(),
        tls.join("strategy-alpha.pem").display(),
        tls.join("strategy-alpha.key").display(),
    )
    .unwrap();
}

fn tx(nonce: u64, to: &str, value: &str, input: Option<&str>) -> UnsignedTx {
    let mut v = json!({
        "chainId": "0x7a69", "nonce": nonce.to_string(), "to": to,
        "value": value, "gas": "60000",
        "maxFeePerGas": "0x77359400", "maxPriorityFeePerGas": "1"
    });
    if let Some(i) = input {
        v["input"] = json!(i);
    }
    serde_json::from_value(v).unwrap()
}

fn sign_as(
    a: &Appliance,
    key: &str,
    t: UnsignedTx,
) -> Result<castellan_api::signer::SignedTransactionResponse, ClientError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(a.client("strategy-alpha").sign_transaction(key, t))
}

fn refused_with(
    r: Result<castellan_api::signer::SignedTransactionResponse, ClientError>,
) -> String {
    match r {
        Err(ClientError::Api { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn rotate_sweep_moves_the_balance_to_the_new_address_and_the_retiring_version_only_sweeps() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let anvil = rt.block_on(Anvil::start());
    let a = Appliance::new();
    configure_sweep(&a, anvil.url().as_str());
    let signer = RunningSigner::start(&a);

    let old = addr(&a.address("searcher-hot", 1));
    let funded = U256::from(500_000_000_000_000_000u128); // 0.5 ETH: below the approval tier
    rt.block_on(anvil.set_balance(old, funded));

    let (out, took) = timed(|| {
        a.run(&[
            "--json",
            "rotate",
            "searcher-hot",
            "--grace",
            "1h",
            "--sweep",
        ])
    });
    assert!(
        out.status.success(),
        "{}\n{}",
        dump(&out),
        signer.log_text()
    );
    eprintln!("keyctl rotate --sweep (debug build, SoftHSM, anvil) took {took:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let new = addr(&a.address("searcher-hot", 2));
    assert_ne!(old, new);
    assert_eq!(r["signer"]["reload"], "reloaded", "{r}");
    let sweep = &r["sweep"];
    assert_eq!(sweep["swept"], true, "{r}");
    assert_eq!(sweep["mined"], true, "{r}");
    assert_eq!(sweep["keyVersion"], "searcher-hot@1", "{r}");
    assert_eq!(addr(sweep["from"].as_str().unwrap()), old);
    assert_eq!(addr(sweep["to"].as_str().unwrap()), new);
    let value: U256 = sweep["value"].as_str().unwrap().parse().unwrap();

    // The new address received exactly the swept value; the old one kept at most the fee.
    let new_balance = rt.block_on(anvil.balance(new));
    let old_balance = rt.block_on(anvil.balance(old));
    assert_eq!(new_balance, value);
    assert!(value > U256::ZERO && value < funded);
    assert!(
        old_balance < funded - value,
        "the fee was not paid from the old address"
    );
    assert!(
        old_balance <= U256::from(21_000u64) * U256::from(10_000_000_000u64),
        "the sweep left {old_balance} wei behind"
    );
    assert_eq!(a.status("searcher-hot", 1), "retiring");

    // A request naming the retiring version that is not a sweep to the successor: refused, with
    // the policy's stable code — to another address, to the successor with calldata.
    let other = "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed";
    assert_eq!(
        refused_with(sign_as(&a, "searcher-hot@1", tx(1, other, "1000", None))),
        "key_retiring"
    );
    assert_eq!(
        refused_with(sign_as(
            &a,
            "searcher-hot@1",
            tx(1, &new.to_checksum(None), "1000", Some("0xa9059cbb"))
        )),
        "key_retiring"
    );
    // The same transfer naming the key (its active version) signs with the new version.
    let s = sign_as(&a, "searcher-hot", tx(0, other, "1000", None)).unwrap();
    assert_eq!(s.key_version, "searcher-hot@2");
    // Naming a version that does not exist is refused too.
    assert_eq!(
        refused_with(sign_as(&a, "searcher-hot@7", tx(1, other, "1000", None))),
        "key_not_signable"
    );

    // A sweep of a version that is not retiring is refused by keyctl, in one line.
    let (code, line) = a.fails(&["sweep", "searcher-hot@2"]);
    assert_eq!(code, 1);
    assert!(line.contains("not retiring"), "{line}");
    // Nothing left to sweep: said so, nothing sent.
    let again = a.json(&["sweep", "searcher-hot@1"]);
    assert_eq!(again["swept"], false, "{again}");

    // After the grace period the old version signs nothing, not even a sweep.
    let later = (now_secs() + 3601).to_string();
    a.json(&["rotate", "--due", "--now", &later]);
    assert_eq!(a.status("searcher-hot", 1), "retired");
    a.ok(&["keys", "show", "searcher-hot"]);
    let rt2 = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reload: Result<Value, _> =
        rt2.block_on(a.client("admin").post("/v1/admin/keys/reload", &json!({})));
    reload.unwrap();
    assert_eq!(
        refused_with(sign_as(
            &a,
            "searcher-hot@1",
            tx(1, &new.to_checksum(None), "1000", None)
        )),
        "key_not_signable"
    );

    // The sweep's decision is in the audit chain under the retiring version.
    let export = a.dir.join("sweep.jsonl");
    a.ok(&["audit", "export", "--out", export.to_str().unwrap()]);
    let rid = sweep["requestId"].as_str().unwrap();
    let text = std::fs::read_to_string(&export).unwrap();
    let decision = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["kind"] == "decision" && r["request_id"] == rid)
        .unwrap_or_else(|| panic!("no decision record for the sweep {rid}"));
    assert!(
        decision["payload"].to_string().contains("searcher-hot@1"),
        "{decision}"
    );
    a.ok(&["audit", "verify"]);
}

#[test]
fn a_sweep_above_the_approval_tier_waits_for_approvals_then_keyctl_sends_it() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let anvil = rt.block_on(Anvil::start());
    let a = Appliance::new();
    configure_sweep(&a, anvil.url().as_str());
    let signer = RunningSigner::start(&a);
    let old = addr(&a.address("searcher-hot", 1));
    // 3 ETH: above the dev policy's 1 ether tier (2 of 3 approvers), below its 5 ether cap.
    let funded = U256::from(3_000_000_000_000_000_000u128);
    rt.block_on(anvil.set_balance(old, funded));

    // The rotation happens; the sweep waits for approvals, and keyctl says how to finish it.
    let (code, line) = a.fails(&["rotate", "searcher-hot", "--grace", "1h", "--sweep"]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("waits for 2 approvals"), "{line}");
    let id = line
        .split("--request ")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .unwrap_or_else(|| panic!("no request id in {line}"))
        .to_owned();
    assert_eq!(a.status("searcher-hot", 1), "retiring");
    assert_eq!(a.status("searcher-hot", 2), "active");
    // Sending before it is signed: refused, nothing sent.
    let (code, line) = a.fails(&["sweep", "searcher-hot@1", "--request", &id]);
    assert_eq!(code, 1);
    assert!(line.contains("not signed"), "{line}");

    a.json(&["approve", &id, "--as", "approver-1"]);
    let st = a.json(&["approve", &id, "--as", "approver-2"]);
    assert_eq!(st["state"], "signed", "{st}\n{}", signer.log_text());
    // Signed by the retiring version it named, not by the active one.
    assert_eq!(st["result"]["keyVersion"], "searcher-hot@1", "{st}");

    let sent = a.json(&["sweep", "searcher-hot@1", "--request", &id]);
    assert_eq!(sent["swept"], true, "{sent}");
    assert_eq!(sent["mined"], true, "{sent}");
    let value: U256 = sent["value"].as_str().unwrap().parse().unwrap();
    let new = addr(&a.address("searcher-hot", 2));
    assert_eq!(rt.block_on(anvil.balance(new)), value);
    assert!(value > U256::from(2_900_000_000_000_000_000u128), "{sent}");
    a.ok(&["audit", "verify"]);
}
