//! `keyctl revoke` tells the submitter to cancel the key's live bundles: a development appliance
//! with the real signer and submitter binaries, anvil as the node and a stand-in Flashbots
//! builder; a bundle signed through the signer is live in the submitter (sent to the builder),
//! and after `keyctl revoke` it is cancelled and no longer resubmitted on new blocks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use alloy::providers::Provider;
use castellan_api::client::SignerClient;
use castellan_api::tls::ClientTlsConfig;
use castellan_tests::anvil::Anvil;
use castellan_tests::relays::{Behavior, Flavor, StandInRelay};
use common::*;
use serde_json::{Value, json};

fn submitter_client(a: &Appliance) -> SignerClient {
    let tls = a.dir.join("tls");
    SignerClient::new(
        format!("https://localhost:{}", a.port + 1),
        &ClientTlsConfig {
            server_ca: tls.join("ca.pem"),
            cert: tls.join("admin.pem"),
            key: tls.join("admin.key"),
        },
    )
    .unwrap()
}

#[test]
fn keyctl_revoke_cancels_the_keys_live_bundles_in_the_submitter() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let anvil = rt.block_on(Anvil::start());
    let relay = rt.block_on(StandInRelay::start(
        Flavor::Flashbots {
            require_signature: true,
        },
        Behavior::Normal,
        None,
    ));
    let a = Appliance::with_args(&[
        "--node-url",
        anvil.url().as_str(),
        "--builder-url",
        &relay.url(),
    ]);
    let signer = RunningSigner::start(&a);
    let submitter = RunningProcess::start(
        &a,
        &sibling_bin("submitter"),
        &a.dir.join("submitter.toml"),
        "submitter listening on",
    );

    // A bundle for blocks 3..=60, signed through the signer, which hands it to the submitter.
    let strategy = a.client("strategy-alpha");
    let tx = serde_json::to_value(transfer(0)).unwrap();
    let signed: Value = rt
        .block_on(strategy.post(
            "/v1/keys/searcher-hot/sign/bundle",
            &json!({ "txs": [{ "tx": tx }], "targetBlock": "3", "lastBlock": "60" }),
        ))
        .unwrap_or_else(|e| {
            panic!(
                "bundle: {e}\nsigner:\n{}\nsubmitter:\n{}",
                signer.log_text(),
                submitter.log_text()
            )
        });
    assert_eq!(
        signed["submitted"]["accepted"],
        true,
        "{signed}\nsigner:\n{}\nsubmitter:\n{}",
        signer.log_text(),
        submitter.log_text()
    );
    let bundle_id = signed["bundleId"].as_str().unwrap().to_owned();
    let sub = submitter_client(&a);
    let state = |rt: &tokio::runtime::Runtime| -> Value {
        let v: Value = rt
            .block_on(sub.get(&format!("/v1/bundles/{bundle_id}")))
            .unwrap();
        v
    };
    assert_eq!(state(&rt)["state"], "pending", "{}", state(&rt));
    // It reaches the builder (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(20);
    while relay.received().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the builder never received the bundle\n{}",
            submitter.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let v = a.json(&["revoke", "searcher-hot", "--reason", "leak", "--yes"]);
    assert_eq!(v["via"], "signer", "{v}");
    assert_eq!(v["submitterCancelled"], 1, "{v}");
    let after = state(&rt);
    assert_eq!(after["state"], "cancelled", "{after}");

    // No longer resubmitted: new blocks bring no new sends.
    let sent = relay.received().len();
    let () = rt
        .block_on(
            anvil
                .provider()
                .raw_request("anvil_mine".into(), (json!("0x3"),)),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        relay.received().len(),
        sent,
        "the cancelled bundle was sent again"
    );
    // Nothing to cancel a second time; the revocation itself stands.
    assert_eq!(a.status("searcher-hot", 1), "destroy_scheduled");
    assert!(relay.violations().is_empty(), "{:?}", relay.violations());
}
