//! Start-up cost does not grow with finished bundles: a restart reloads only the live ones
//! (pending, or included and not yet confirmed), finished ones leave memory a few blocks after
//! they finish, and both still answer their status and are refused as duplicates from the store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use alloy::primitives::Address;
use alloy::providers::Provider;
use castellan_api::submitter::{BundleState, Quantity, Role};
use castellan_submitter::engine::FINISHED_GRACE_BLOCKS;
use castellan_submitter::store::Store;
use castellan_tests::relays::{Behavior, signed_transfer};
use common::*;
use serde_json::Value;

/// Bundles that expire at the first block.
const EXPIRING: usize = 146;

async fn get(h: &Harness, id: uuid::Uuid) -> (u16, Value) {
    let (code, body) = h
        .call(
            "GET",
            &format!("/v1/bundles/{id}"),
            None,
            Some(&[Role::Signer]),
        )
        .await;
    (code.as_u16(), body)
}

async fn post(h: &Harness, body: String) -> (u16, Value) {
    let (code, body) = h
        .call("POST", "/v1/bundles", Some(body), Some(&[Role::Signer]))
        .await;
    (code.as_u16(), body)
}

fn metric(text: &str, name: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reloads_only_live_bundles_and_finished_ones_answer_from_the_store() {
    let mut h = Harness::start(
        vec![builder(
            "titan",
            Behavior::Normal,
            "kind = \"builder\"\nsign = false",
        )],
        "",
    )
    .await;
    let head = h.engine.head();
    let node = h.anvil.provider().clone();

    // Finished kinds: expired (range over at head+1), cancelled, confirmed, nonce consumed.
    let never = signed_transfer(0, 5, recipient()); // account 0 uses only nonce 0 here: never lands
    let mut expiring = Vec::new();
    for _ in 0..EXPIRING {
        let req = h.request(vec![never.clone()], head + 1, head + 1, "k");
        h.engine.submit(req.clone()).await.unwrap();
        expiring.push(req);
    }
    let mut cancelled = Vec::new();
    for _ in 0..2 {
        let req = h.request(vec![never.clone()], head + 1, head + 40, "k");
        h.engine.submit(req.clone()).await.unwrap();
        let s = h.engine.cancel(req.bundle_id).await.unwrap();
        assert_eq!(s.state, BundleState::Cancelled);
        cancelled.push(req);
    }
    let confirmed = h.request(
        vec![signed_transfer(1, 0, recipient())],
        head + 1,
        head + 40,
        "k",
    );
    h.engine.submit(confirmed.clone()).await.unwrap();
    let consumed = h.request(
        vec![signed_transfer(3, 0, recipient())],
        head + 1,
        head + 40,
        "k",
    );
    h.engine.submit(consumed.clone()).await.unwrap();
    // Live across everything: never lands, range long enough.
    let live = h.request(
        vec![signed_transfer(2, 0, recipient())],
        head + 1,
        head + 40,
        "k",
    );
    h.engine.submit(live.clone()).await.unwrap();

    // Block head+1: the confirmed bundle's tx, and another tx taking the nonce of `consumed`.
    let _p = node.send_raw_transaction(&confirmed.txs[0]).await.unwrap();
    let _p = node
        .send_raw_transaction(&signed_transfer(3, 0, Address::repeat_byte(0x77)))
        .await
        .unwrap();
    h.mine().await;
    h.mine().await;
    h.wait_status(confirmed.bundle_id, "confirmed", |s| s.confirmed)
        .await;
    h.wait_status(consumed.bundle_id, "failed", |s| {
        s.state == BundleState::Failed
    })
    .await;
    for req in &expiring {
        h.wait_status(req.bundle_id, "expired", |s| {
            s.state == BundleState::Expired
        })
        .await;
    }

    // Without a restart, finished bundles leave memory after the grace period.
    for _ in 0..FINISHED_GRACE_BLOCKS {
        h.mine().await;
    }
    // (The head is published before that head's checks and pruning run: wait for them.)
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while h.engine.bundles_in_memory() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} bundles in memory, only the live one expected",
            h.engine.bundles_in_memory()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (code, s) = get(&h, expiring[0].bundle_id).await;
    assert_eq!((code, s["state"].as_str()), (200, Some("expired")), "{s}");

    // An inclusion that is not yet final when the submitter restarts.
    let tentative = h.request(
        vec![signed_transfer(0, 0, recipient())],
        h.engine.head() + 1,
        head + 40,
        "k",
    );
    h.engine.submit(tentative.clone()).await.unwrap();
    let _p = node.send_raw_transaction(&tentative.txs[0]).await.unwrap();
    let included_at = h.mine().await;
    h.wait_status(tentative.bundle_id, "included", included)
        .await;

    let store = Store::open(&h.config.store.path).unwrap();
    let rows = store.count().await.unwrap();
    assert_eq!(rows, EXPIRING as u64 + 2 + 4);
    assert_eq!(store.load_live().await.unwrap().len(), 2);

    let t = std::time::Instant::now();
    let restored_in = h.restart().await;
    println!(
        "restart with {} finished and 2 live bundles stored: restore {} ms, first head seen {} ms",
        rows - 2,
        restored_in.as_millis(),
        t.elapsed().as_millis()
    );
    assert_eq!(h.engine.bundles_in_memory(), 2, "live and tentative only");
    let text = h.engine.metrics().encode();
    assert_eq!(
        metric(&text, "castellan_submitter_bundles_in_memory"),
        Some(2),
        "{text}"
    );
    assert_eq!(
        metric(&text, "castellan_submitter_live_bundles"),
        Some(2),
        "{text}"
    );

    // Every finished bundle still answers its status from the store.
    for req in &expiring {
        let (code, s) = get(&h, req.bundle_id).await;
        assert_eq!(code, 200, "{s}");
        assert_eq!(s["state"], "expired");
        assert_eq!(s["reason"], "expired");
    }
    for req in &cancelled {
        let (code, s) = get(&h, req.bundle_id).await;
        assert_eq!((code, s["state"].as_str()), (200, Some("cancelled")), "{s}");
        // Cancelling again is idempotent; cancelling an included one is a conflict.
        let s = h.engine.cancel(req.bundle_id).await.unwrap();
        assert_eq!(s.state, BundleState::Cancelled);
    }
    let (code, s) = get(&h, confirmed.bundle_id).await;
    assert_eq!(code, 200, "{s}");
    assert_eq!(
        (s["state"].as_str(), s["confirmed"].as_bool()),
        (Some("included"), Some(true)),
        "{s}"
    );
    assert_eq!(
        s["includedBlock"],
        serde_json::to_value(Quantity(head + 1)).unwrap()
    );
    assert_eq!(
        h.engine.cancel(confirmed.bundle_id).await.unwrap_err().code,
        "already_included"
    );
    let (code, s) = get(&h, consumed.bundle_id).await;
    assert_eq!(
        (code, s["state"].as_str(), s["reason"].as_str()),
        (200, Some("failed"), Some("nonce_consumed")),
        "{s}"
    );

    // Re-sent finished bundles are duplicates (200 with their recorded state), never new.
    for req in expiring
        .iter()
        .take(10)
        .chain(&cancelled)
        .chain([&confirmed, &consumed])
    {
        let (code, s) = post(&h, serde_json::to_string(req).unwrap()).await;
        assert_eq!(code, 200, "re-sent {}: {s}", req.bundle_id);
        assert_eq!(s["bundleId"], req.bundle_id.to_string());
        assert_ne!(s["state"], "pending", "{s}");
    }
    // Same id, other content: still a conflict.
    let mut other = expiring[0].clone();
    other.last_block = Some(Quantity(head + 60));
    let (code, s) = post(&h, serde_json::to_string(&other).unwrap()).await;
    assert_eq!(
        (code, s["error"]["code"].as_str()),
        (409, Some("bundle_id_conflict"))
    );
    assert_eq!(
        store.count().await.unwrap(),
        rows,
        "no row added by a re-send"
    );
    assert_eq!(h.engine.bundles_in_memory(), 2, "a re-send loads nothing");

    // The live bundle resumes; the tentative inclusion is re-detected and becomes final.
    let (code, s) = get(&h, live.bundle_id).await;
    assert_eq!((code, s["state"].as_str()), (200, Some("pending")), "{s}");
    let next = h.mine().await + 1;
    let uuid = live.bundle_id.to_string();
    h.relay("titan")
        .wait_for(
            "the live bundle after the restart",
            Duration::from_secs(5),
            |r| {
                r.bundle
                    .as_ref()
                    .is_some_and(|b| b.block == next && b.uuid.as_deref() == Some(uuid.as_str()))
            },
        )
        .await;
    let s = h
        .wait_status(tentative.bundle_id, "confirmed", |s| s.confirmed)
        .await;
    assert_eq!(s.included_block, Some(Quantity(included_at)));
}
