//! End-to-end: the submitter against stand-in relays that build blocks on anvil.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use alloy::primitives::Bytes;
use alloy::providers::Provider;
use castellan_api::submitter::{
    BreakerState, BundleState, OutcomeKind, Quantity, RelaySelection, Role,
};
use castellan_submitter::auth::signed_text;
use castellan_tests::relays::{Behavior, signed_call, signed_transfer};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_is_resubmitted_each_block_until_a_relay_includes_it() {
    let h = Harness::start(
        vec![
            flashbots("flashbots"),
            bloxroute("bloxroute"),
            builder("titan", Behavior::Normal, "kind = \"builder\"\nsign = false\nreplacement_ordering = \"replacement_seq_number\""),
        ],
        "",
    )
    .await;
    let head = h.engine.head();
    let raw = signed_transfer(1, 0, recipient());
    let request = h.request(vec![raw.clone()], head + 1, head + 10, "searcher-hot");
    let id = request.bundle_id;
    let uuid = id.to_string();
    let (status, created) = h.engine.submit(request).await.unwrap();
    assert!(created);
    assert_eq!(status.state, BundleState::Pending);

    // Two blocks pass without the bundle; the flashbots stand-in builds the third.
    let first = head + 1;
    for block in first..first + 3 {
        for (name, relay) in &h.relays {
            relay
                .wait_for(
                    &format!("{name} bundle for block {block}"),
                    Duration::from_secs(5),
                    |r| {
                        r.bundle.as_ref().is_some_and(|b| {
                            b.block == block && b.uuid.as_deref() == Some(uuid.as_str())
                        })
                    },
                )
                .await;
        }
        if block == first + 2 {
            assert_eq!(
                h.relay("flashbots")
                    .build_block(h.anvil.provider(), block)
                    .await,
                1
            );
        }
        assert_eq!(h.mine().await, block);
    }
    let s = h.wait_status(id, "included", included).await;
    assert_eq!(s.included_block, Some(Quantity(first + 2)));
    assert!(!s.confirmed, "tentative until one more block");
    h.mine().await;
    let s = h.wait_status(id, "confirmed", |s| s.confirmed).await;
    assert_eq!(s.state, BundleState::Included);
    let outcome = h.outcomes.wait_for(id, Duration::from_secs(5)).await;
    assert_eq!(outcome.outcome, OutcomeKind::Included);
    assert_eq!(outcome.included_block, Some(Quantity(first + 2)));
    assert_eq!(outcome.gas_used, Some(Quantity(21_000)));
    assert!(outcome.effective_gas_price.is_some());

    // Every relay got exactly one request per block, for exactly these blocks.
    for (name, relay) in &h.relays {
        assert_eq!(
            relay.blocks_for_uuid(&uuid),
            vec![first, first + 1, first + 2],
            "{name}"
        );
        assert!(
            relay.violations().is_empty(),
            "{name}: {:?}",
            relay.violations()
        );
    }
    // The Flashbots stand-in verified every signature with its own go-utils implementation.
    let auth_address = TestAuth(AUTH_KEY.parse().unwrap()).0.address();
    let fb = h.relay("flashbots").received();
    assert!(fb.iter().all(|r| r.signer == Some(auth_address)));
    // And eth-account agrees on one of them (independent implementation).
    let r = &fb[0];
    let sig_hex = r.signature.as_ref().unwrap().split_once(":0x").unwrap().1;
    let sig = alloy::primitives::hex::decode(sig_hex).unwrap();
    let text = signed_text(alloy::primitives::keccak256(&r.body));
    assert_eq!(
        castellan_tests::python::recover_personal_message(text.as_bytes(), &sig),
        auth_address
    );
    let status = h.engine.status(id).unwrap();
    assert!(
        status
            .relays
            .iter()
            .all(|r| r.accepted && r.sends == 3 && r.errors == 0),
        "{status:#?}"
    );
    assert!(
        status
            .relays
            .iter()
            .find(|r| r.relay == "flashbots")
            .unwrap()
            .bundle_hash
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_relays_never_delay_healthy_ones_and_their_breakers_open() {
    let h = Harness::start(
        vec![
            builder(
                "good-a",
                Behavior::Normal,
                "kind = \"builder\"\nsign = false",
            ),
            bloxroute("good-b"),
            builder(
                "hang",
                Behavior::Hang,
                "kind = \"builder\"\nsign = false\ntimeout_ms = 1500",
            ),
            builder(
                "err500",
                Behavior::ServerError,
                "kind = \"builder\"\nsign = false",
            ),
            builder(
                "r429",
                Behavior::TooManyRequests(30),
                "kind = \"builder\"\nsign = false",
            ),
            builder(
                "garbage",
                Behavior::Garbage,
                "kind = \"builder\"\nsign = false",
            ),
        ],
        "failure_threshold = 3\ncooldown_ms = 60000",
    )
    .await;
    let head = h.engine.head();
    let mut ids = Vec::new();
    for account in 1..4 {
        let request = h.request(
            vec![signed_transfer(account, 0, recipient())],
            head + 1,
            head + 20,
            "k",
        );
        let id = request.bundle_id;
        let submitted = Instant::now();
        h.engine.submit(request).await.unwrap();
        for name in ["good-a", "good-b"] {
            let r = h
                .relay(name)
                .wait_for("the bundle", Duration::from_secs(5), |r| {
                    r.bundle
                        .as_ref()
                        .is_some_and(|b| b.uuid.as_deref() == Some(id.to_string().as_str()))
                })
                .await;
            // Loopback answers take ~1 ms; the bound is generous for a loaded CI box and still
            // far below the hanging relay's 1.5 s timeout, which must not delay anyone.
            let latency = r.at.saturating_duration_since(submitted);
            assert!(
                latency < Duration::from_millis(500),
                "{name} got bundle after {latency:?}"
            );
        }
        ids.push(id);
    }
    // Three failures each (one per bundle), the hanging relay after its 1.5 s timeout.
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let health = h.engine.relays_health();
        let open: Vec<_> = health
            .iter()
            .filter(|r| r.breaker == BreakerState::Open)
            .map(|r| r.relay.clone())
            .collect();
        if open.len() == 4 {
            assert!(!open.contains(&"good-a".to_string()) && !open.contains(&"good-b".to_string()));
            break;
        }
        assert!(Instant::now() < deadline, "breakers: {health:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = h.engine.metrics().encode();
    for bad in ["hang", "err500", "r429", "garbage"] {
        assert!(
            metrics.contains(&format!(
                "castellan_submitter_relay_breaker_state{{relay=\"{bad}\"}} 1"
            )),
            "{metrics}"
        );
    }
    assert!(metrics.contains("castellan_submitter_relay_breaker_state{relay=\"good-a\"} 0"));
    assert!(metrics.contains("relay=\"err500\",method=\"eth_sendBundle\",result=\"failed\""));
    assert!(metrics.contains("relay=\"r429\",method=\"eth_sendBundle\",result=\"throttled\""));
    let status = h.engine.status(ids[0]).unwrap();
    let err = |name: &str| {
        status
            .relays
            .iter()
            .find(|r| r.relay == name)
            .unwrap()
            .last_error
            .clone()
            .unwrap_or_default()
    };
    assert!(err("hang").contains("timeout"), "{status:#?}");
    assert!(err("err500").contains("HTTP 500"), "{status:#?}");
    assert!(err("r429").contains("429"), "{status:#?}");
    assert!(err("garbage").contains("unparseable"), "{status:#?}");

    // Next block: healthy relays get all three bundles at once; open breakers send nothing.
    let before: Vec<usize> = ["hang", "err500", "r429", "garbage"]
        .iter()
        .map(|n| h.relay(n).received().len())
        .collect();
    let mined_at = Instant::now();
    let block = h.mine().await + 1;
    for name in ["good-a", "good-b"] {
        for id in &ids {
            let r = h
                .relay(name)
                .wait_for("the resubmission", Duration::from_secs(5), |r| {
                    r.bundle.as_ref().is_some_and(|b| {
                        b.block == block && b.uuid.as_deref() == Some(id.to_string().as_str())
                    })
                })
                .await;
            let latency = r.at.saturating_duration_since(mined_at);
            assert!(
                latency < Duration::from_millis(500),
                "{name} got block {block} after {latency:?}"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after: Vec<usize> = ["hang", "err500", "r429", "garbage"]
        .iter()
        .map(|n| h.relay(n).received().len())
        .collect();
    assert_eq!(before, after, "open breakers must stop sending");
    let status = h.engine.status(ids[0]).unwrap();
    for bad in ["hang", "err500", "r429", "garbage"] {
        let r = status.relays.iter().find(|r| r.relay == bad).unwrap();
        assert!(r.skipped >= 1 && !r.accepted, "{r:#?}");
    }
    // A selection weighted by health now picks only the healthy relays.
    let mut weighted = h.request(
        vec![signed_transfer(0, 0, recipient())],
        block,
        block + 5,
        "k",
    );
    weighted.relays = RelaySelection::Weighted { max: None };
    let (status, _) = h.engine.submit(weighted).await.unwrap();
    let mut picked: Vec<_> = status.relays.iter().map(|r| r.relay.as_str()).collect();
    picked.sort();
    assert_eq!(picked, vec!["good-a", "good-b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_breaker_probes_after_cooldown_and_closes() {
    let h = Harness::start(
        vec![builder(
            "flaky",
            Behavior::ServerError,
            "kind = \"builder\"\nsign = false",
        )],
        "failure_threshold = 2\ncooldown_ms = 400",
    )
    .await;
    let head = h.engine.head();
    for account in 1..3 {
        let req = h.request(
            vec![signed_transfer(account, 0, recipient())],
            head + 1,
            head + 20,
            "k",
        );
        h.engine.submit(req).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.engine.relays_health()[0].breaker != BreakerState::Open {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.relay("flaky").set_behavior(Behavior::Normal);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(h.engine.relays_health()[0].breaker, BreakerState::HalfOpen);
    let block = h.mine().await + 1;
    // One probe goes; it succeeds and the breaker closes.
    h.relay("flaky")
        .wait_for("a probe", Duration::from_secs(5), |r| {
            r.bundle.as_ref().is_some_and(|b| b.block == block)
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.engine.relays_health()[0].breaker != BreakerState::Closed {
        assert!(Instant::now() < deadline, "{:?}", h.engine.relays_health());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_cancel_by_key_reach_every_relay_that_can_cancel() {
    let h = Harness::start(
        vec![
            flashbots("flashbots"),
            builder("buildernet", Behavior::Normal, "kind = \"builder\"\nsign = true\ncancel = \"empty_txs\"\nreplacement_ordering = \"replacement_nonce\""),
            bloxroute("bloxroute"),
            builder("nocancel", Behavior::Normal, "kind = \"builder\"\nsign = false\ncancel = \"none\""),
        ],
        "",
    )
    .await;
    let head = h.engine.head();
    let mut ids = Vec::new();
    for (account, key) in [(1, "k1"), (2, "k1"), (3, "k2")] {
        let req = h.request(
            vec![signed_transfer(account, 0, recipient())],
            head + 1,
            head + 20,
            key,
        );
        ids.push(req.bundle_id);
        let (code, _) = h
            .call(
                "POST",
                "/v1/bundles",
                Some(serde_json::to_string(&req).unwrap()),
                Some(&[Role::Signer]),
            )
            .await;
        assert_eq!(code, 201);
    }
    for (_, relay) in &h.relays {
        for id in &ids {
            relay
                .wait_for("bundle", Duration::from_secs(5), |r| {
                    r.bundle
                        .as_ref()
                        .is_some_and(|b| b.uuid.as_deref() == Some(id.to_string().as_str()))
                })
                .await;
        }
    }
    // Cancel one bundle by id.
    let (code, body) = h
        .call(
            "POST",
            &format!("/v1/bundles/{}/cancel", ids[0]),
            None,
            Some(&[Role::Signer]),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["state"], "cancelled");
    for name in ["flashbots", "buildernet", "bloxroute"] {
        assert!(
            h.relay(name).cancelled().contains(&ids[0].to_string()),
            "{name}"
        );
        let r = body["relays"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["relay"] == name)
            .unwrap()
            .clone();
        assert_eq!(r["cancelled"], true, "{r}");
    }
    assert!(
        h.relay("flashbots")
            .received()
            .iter()
            .any(|r| r.method == "eth_cancelBundle")
    );
    assert!(h.relay("nocancel").cancelled().is_empty());
    // Cancel by key: a strategy may not, an admin may.
    let (code, body) = h
        .call("POST", "/v1/keys/k1/cancel", None, Some(&[Role::Strategy]))
        .await;
    assert_eq!(code, 403);
    assert_eq!(body["error"]["code"], "forbidden");
    let (code, body) = h
        .call("POST", "/v1/keys/k1/cancel", None, Some(&[Role::Admin]))
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["cancelled"], serde_json::json!([ids[1].to_string()]));
    for name in ["flashbots", "buildernet", "bloxroute"] {
        let cancelled = h.relay(name).cancelled();
        assert!(cancelled.contains(&ids[1].to_string()), "{name}");
        assert!(!cancelled.contains(&ids[2].to_string()), "{name}");
    }
    // Next block: only the k2 bundle is resubmitted.
    let block = h.mine().await + 1;
    h.relay("flashbots")
        .wait_for("k2 resubmission", Duration::from_secs(5), |r| {
            r.bundle.as_ref().is_some_and(|b| {
                b.block == block && b.uuid.as_deref() == Some(ids[2].to_string().as_str())
            })
        })
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (name, relay) in &h.relays {
        for id in &ids[..2] {
            assert_eq!(
                relay.blocks_for_uuid(&id.to_string()),
                vec![head + 1],
                "{name}"
            );
        }
        assert!(
            relay.violations().is_empty(),
            "{name}: {:?}",
            relay.violations()
        );
    }
    let outcome = h.outcomes.wait_for(ids[0], Duration::from_secs(5)).await;
    assert_eq!(
        (outcome.outcome, outcome.state),
        (OutcomeKind::NotIncluded, BundleState::Cancelled)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_stops_when_its_nonce_is_consumed_elsewhere() {
    let h = Harness::start(
        vec![builder(
            "titan",
            Behavior::Normal,
            "kind = \"builder\"\nsign = false",
        )],
        "",
    )
    .await;
    let head = h.engine.head();
    let req = h.request(
        vec![signed_transfer(1, 0, recipient())],
        head + 1,
        head + 20,
        "k",
    );
    let id = req.bundle_id;
    h.engine.submit(req).await.unwrap();
    let uuid = id.to_string();
    h.relay("titan")
        .wait_for("bundle", Duration::from_secs(5), |r| {
            r.bundle
                .as_ref()
                .is_some_and(|b| b.uuid.as_deref() == Some(uuid.as_str()))
        })
        .await;
    // Block head+1 is mined empty; the bundle goes out for head+2.
    h.mine().await;
    h.relay("titan")
        .wait_for("resubmission", Duration::from_secs(5), |r| {
            r.bundle.as_ref().is_some_and(|b| b.block == head + 2)
        })
        .await;
    // Another transaction with the same sender and nonce lands in head+2.
    let other = signed_transfer(1, 0, alloy::primitives::Address::repeat_byte(0x77));
    let _pending = h
        .anvil
        .provider()
        .send_raw_transaction(&other)
        .await
        .unwrap();
    h.mine().await;
    let s = h
        .wait_status(id, "failed", |s| s.state == BundleState::Failed)
        .await;
    assert_eq!(s.reason.as_deref(), Some("nonce_consumed"));
    let sent = h.relay("titan").blocks_for_uuid(&uuid);
    assert_eq!(sent, vec![head + 1, head + 2]);
    h.mine().await;
    h.mine().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        h.relay("titan").blocks_for_uuid(&uuid),
        sent,
        "no resubmission after the nonce was consumed"
    );
    let outcome = h.outcomes.wait_for(id, Duration::from_secs(5)).await;
    assert_eq!(outcome.outcome, OutcomeKind::NotIncluded);
    assert_eq!(outcome.reason.as_deref(), Some("nonce_consumed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_bundle_id_is_never_duplicated_even_across_a_restart() {
    let mut h = Harness::start(vec![flashbots("flashbots")], "").await;
    let head = h.engine.head();
    let req = h.request(
        vec![signed_transfer(1, 0, recipient())],
        head + 1,
        head + 20,
        "k",
    );
    let id = req.bundle_id;
    let body = serde_json::to_string(&req).unwrap();
    let (code, first) = h
        .call(
            "POST",
            "/v1/bundles",
            Some(body.clone()),
            Some(&[Role::Signer]),
        )
        .await;
    assert_eq!(code, 201, "{first}");
    let (code, second) = h
        .call(
            "POST",
            "/v1/bundles",
            Some(body.clone()),
            Some(&[Role::Signer]),
        )
        .await;
    assert_eq!(code, 200, "{second}");
    assert_eq!(second["bundleId"], first["bundleId"]);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        h.relay("flashbots").blocks_for_uuid(&id.to_string()),
        vec![head + 1],
        "one request per block"
    );
    // Same id, other content: conflict.
    let mut other = req.clone();
    other.last_block = Some(Quantity(head + 5));
    let (code, err) = h
        .call(
            "POST",
            "/v1/bundles",
            Some(serde_json::to_string(&other).unwrap()),
            Some(&[Role::Signer]),
        )
        .await;
    assert_eq!(code, 409);
    assert_eq!(err["error"]["code"], "bundle_id_conflict");
    // Edges: no identity, wrong role, unknown field, bad quantity, unknown relay, wrong chain.
    assert_eq!(
        h.call("POST", "/v1/bundles", Some(body.clone()), None)
            .await
            .0,
        401
    );
    assert_eq!(
        h.call(
            "POST",
            "/v1/bundles",
            Some(body.clone()),
            Some(&[Role::Strategy])
        )
        .await
        .0,
        403
    );
    let (code, err) = h
        .call(
            "POST",
            "/v1/bundles",
            Some(body.replacen('{', "{\"extra\":1,", 1)),
            Some(&[Role::Signer]),
        )
        .await;
    assert_eq!(
        (code.as_u16(), err["error"]["code"].as_str()),
        (400, Some("malformed_request"))
    );
    let bad_q = body.replace(
        &format!("\"targetBlock\":\"{:#x}\"", head + 1),
        "\"targetBlock\":12",
    );
    assert_eq!(
        h.call("POST", "/v1/bundles", Some(bad_q), Some(&[Role::Signer]))
            .await
            .0,
        400
    );
    let mut named = h.request(
        vec![signed_transfer(2, 0, recipient())],
        head + 1,
        head + 2,
        "k",
    );
    named.relays = RelaySelection::Named {
        relays: vec!["nope".into()],
    };
    let (code, err) = h
        .call(
            "POST",
            "/v1/bundles",
            Some(serde_json::to_string(&named).unwrap()),
            Some(&[Role::Signer]),
        )
        .await;
    assert_eq!(
        (code.as_u16(), err["error"]["code"].as_str()),
        (400, Some("unknown_relay"))
    );
    let past = h.request(
        vec![signed_transfer(2, 0, recipient())],
        head - 1,
        head,
        "k",
    );
    let (code, err) = h
        .call(
            "POST",
            "/v1/bundles",
            Some(serde_json::to_string(&past).unwrap()),
            Some(&[Role::Signer]),
        )
        .await;
    assert_eq!(
        (code.as_u16(), err["error"]["code"].as_str()),
        (400, Some("block_range_passed"))
    );
    let (code, err) = h
        .call(
            "GET",
            &format!("/v1/bundles/{}", uuid::Uuid::new_v4()),
            None,
            Some(&[Role::Signer]),
        )
        .await;
    assert_eq!(
        (code.as_u16(), err["error"]["code"].as_str()),
        (404, Some("bundle_not_found"))
    );

    // Restart (as after kill -9: nothing but the store survives): the bundle is still known,
    // a retry is answered from the store, and resubmission resumes at the next block.
    h.restart().await;
    let (code, status) = h
        .call(
            "GET",
            &format!("/v1/bundles/{id}"),
            None,
            Some(&[Role::Signer]),
        )
        .await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["state"], "pending");
    let (code, _) = h
        .call("POST", "/v1/bundles", Some(body), Some(&[Role::Signer]))
        .await;
    assert_eq!(code, 200);
    let block = h.mine().await + 1;
    h.relay("flashbots")
        .wait_for("resubmission after restart", Duration::from_secs(5), |r| {
            r.bundle.as_ref().is_some_and(|b| b.block == block)
        })
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let blocks = h.relay("flashbots").blocks_for_uuid(&id.to_string());
    assert_eq!(
        blocks.iter().filter(|b| **b == block).count(),
        1,
        "{blocks:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulation_stops_a_bundle_whose_tx_reverts() {
    let h = Harness::start(vec![flashbots("flashbots")], "").await;
    // A contract that always reverts: PUSH1 0 PUSH1 0 REVERT.
    let reverter = alloy::primitives::Address::repeat_byte(0xdd);
    let () = h
        .anvil
        .provider()
        .raw_request(
            "anvil_setCode".into(),
            (
                reverter,
                Bytes::from_static(&[0x60, 0x00, 0x60, 0x00, 0xfd]),
            ),
        )
        .await
        .unwrap();
    let head = h.engine.head();
    let mut bad = h.request(
        vec![signed_call(1, 0, reverter, Bytes::new(), 100_000)],
        head + 1,
        head + 5,
        "k",
    );
    bad.simulate = true;
    let mut good = h.request(
        vec![signed_transfer(2, 0, recipient())],
        head + 1,
        head + 5,
        "k",
    );
    good.simulate = true;
    h.engine.submit(bad.clone()).await.unwrap();
    h.engine.submit(good.clone()).await.unwrap();
    let s = h
        .wait_status(bad.bundle_id, "failed", |s| s.state == BundleState::Failed)
        .await;
    assert_eq!(s.reason.as_deref(), Some("simulation_reverted"));
    let sim = s.simulation.unwrap();
    assert!(!sim.ok);
    assert_eq!(sim.results[0].error.as_deref(), Some("execution reverted"));
    h.relay("flashbots")
        .wait_for("the good bundle", Duration::from_secs(5), |r| {
            r.bundle
                .as_ref()
                .is_some_and(|b| b.uuid.as_deref() == Some(good.bundle_id.to_string().as_str()))
        })
        .await;
    let s = h.engine.status(good.bundle_id).unwrap();
    assert_eq!(s.simulation.as_ref().map(|r| r.ok), Some(true));
    assert_eq!(
        s.simulation.unwrap().results[0].gas_used,
        Some(Quantity(21_000))
    );
    assert!(
        h.relay("flashbots")
            .blocks_for_uuid(&bad.bundle_id.to_string())
            .is_empty(),
        "never sent"
    );
    assert!(
        h.relay("flashbots")
            .received()
            .iter()
            .filter(|r| r.method == "eth_callBundle")
            .count()
            >= 2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_transactions_reach_flashbots_and_bloxroute() {
    let h = Harness::start(vec![flashbots("flashbots"), bloxroute("bloxroute")], "").await;
    let raw = signed_transfer(1, 0, recipient());
    let hash = alloy::primitives::keccak256(&raw).to_string();
    for relay in h.engine.relays() {
        match relay.send_private_raw_transaction(&raw).await {
            castellan_submitter::relay::SendResult::Accepted {
                hash: Some(got), ..
            } => assert_eq!(got, hash),
            other => panic!("{}: {other:?}", relay.name()),
        }
    }
    assert!(
        h.relay("flashbots")
            .received()
            .iter()
            .any(|r| r.method == "eth_sendPrivateRawTransaction" && r.signer.is_some())
    );
    assert!(
        h.relay("bloxroute")
            .received()
            .iter()
            .any(|r| r.method == "blxr_private_tx")
    );
    for (name, relay) in &h.relays {
        assert!(
            relay.violations().is_empty(),
            "{name}: {:?}",
            relay.violations()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_puts_a_tentative_inclusion_back_to_pending() {
    let h = Harness::start(
        vec![builder(
            "titan",
            Behavior::Normal,
            "kind = \"builder\"\nsign = false",
        )],
        "",
    )
    .await;
    let head = h.engine.head();
    let req = h.request(
        vec![signed_transfer(1, 0, recipient())],
        head + 1,
        head + 20,
        "k",
    );
    let id = req.bundle_id;
    h.engine.submit(req).await.unwrap();
    let block = head + 1;
    h.relay("titan")
        .wait_for("bundle", Duration::from_secs(5), |r| {
            r.bundle.as_ref().is_some_and(|b| b.block == block)
        })
        .await;
    let snapshot: alloy::primitives::U256 = h
        .anvil
        .provider()
        .raw_request("evm_snapshot".into(), ())
        .await
        .unwrap();
    assert_eq!(
        h.relay("titan")
            .build_block(h.anvil.provider(), block)
            .await,
        1
    );
    h.mine().await;
    let s = h.wait_status(id, "included", included).await;
    assert_eq!(
        (s.included_block, s.confirmed),
        (Some(Quantity(block)), false)
    );
    // The block is dropped (the chain goes back to before it): pending again, and sent again
    // for the same block number.
    let reverted: bool = h
        .anvil
        .provider()
        .raw_request("evm_revert".into(), (snapshot,))
        .await
        .unwrap();
    assert!(reverted);
    h.wait_head(head).await;
    let s = h
        .wait_status(id, "pending again", |s| s.state == BundleState::Pending)
        .await;
    assert_eq!(s.included_block, None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.relay("titan").blocks_for_uuid(&id.to_string()) != vec![block, block] {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            h.relay("titan").blocks_for_uuid(&id.to_string())
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_route_is_used_only_when_named() {
    let h = Harness::start(
        vec![builder(
            "titan",
            Behavior::Normal,
            "kind = \"builder\"\nsign = false",
        )],
        "",
    )
    .await;
    // Not a stand-in: the node itself, through an opt-in rpc relay.
    let text = format!(
        "name = \"mempool\"\nkind = \"rpc\"\nurl = \"{}\"",
        h.anvil.url()
    );
    let rpc: castellan_submitter::config::RelayConfig = toml::from_str(&text).unwrap();
    assert!(
        !rpc.to_spec().unwrap().unwrap().default,
        "never a silent default"
    );
    // Restart the engine over a configuration that adds the rpc route.
    let mut h = h;
    let config_text = format!(
        "[api]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n[tls]\ncert = \"/unused/server.pem\"\nkey = \"/unused/server.key\"\nclient_ca = \"/unused/ca.pem\"\n[chain]\nchain_id = 31337\nnode_url = \"{}\"\nconfirmations = 0\n[store]\npath = \"{}\"\n\
         [[relay]]\nname = \"titan\"\nkind = \"builder\"\nurl = \"{}\"\nsign = false\n\
         [[relay]]\nname = \"mempool\"\nkind = \"rpc\"\nurl = \"{}\"\n",
        h.anvil.url(),
        h.dir.path().join("rpc.db").display(),
        h.relay("titan").url(),
        h.anvil.url()
    );
    h.config = castellan_submitter::config::Config::parse(&config_text).unwrap();
    h.restart().await;
    let head = h.engine.head();
    // "All" does not include the rpc route.
    let all = h.request(
        vec![signed_transfer(1, 0, recipient())],
        head + 1,
        head + 5,
        "k",
    );
    let (s, _) = h.engine.submit(all).await.unwrap();
    assert_eq!(
        s.relays
            .iter()
            .map(|r| r.relay.as_str())
            .collect::<Vec<_>>(),
        vec!["titan"]
    );
    // Named, it sends the raw transaction to the node's mempool, and the next block has it.
    let mut named = h.request(
        vec![signed_transfer(2, 0, recipient())],
        head + 1,
        head + 5,
        "k",
    );
    named.relays = RelaySelection::Named {
        relays: vec!["mempool".into()],
    };
    let id = named.bundle_id;
    h.engine.submit(named).await.unwrap();
    h.wait_status(id, "accepted by the node", |s| s.relays[0].accepted)
        .await;
    h.mine().await;
    let s = h.wait_status(id, "included", |s| s.confirmed).await;
    assert_eq!(s.included_block, Some(Quantity(head + 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_expires_after_its_last_block_or_max_timestamp() {
    let h = Harness::start(vec![bloxroute("bloxroute")], "").await;
    let head = h.engine.head();
    let req = h.request(
        vec![signed_transfer(1, 0, recipient())],
        head + 1,
        head + 2,
        "k",
    );
    let id = req.bundle_id;
    h.engine.submit(req).await.unwrap();
    let mut stale = h.request(
        vec![signed_transfer(2, 0, recipient())],
        head + 1,
        head + 10,
        "k",
    );
    stale.max_timestamp = Some(Quantity(1_000_000_000)); // 2001: already past
    let stale_id = stale.bundle_id;
    h.engine.submit(stale).await.unwrap();
    h.mine().await;
    h.mine().await;
    let s = h
        .wait_status(id, "expired", |s| s.state == BundleState::Expired)
        .await;
    assert_eq!(s.reason.as_deref(), Some("expired"));
    assert_eq!(
        h.relay("bloxroute").blocks_for_uuid(&id.to_string()),
        vec![head + 1, head + 2]
    );
    let s = h
        .wait_status(stale_id, "expired", |s| s.state == BundleState::Expired)
        .await;
    assert_eq!(
        s.last_submitted_block, None,
        "a bundle past its maxTimestamp is never sent"
    );
    assert!(
        h.relay("bloxroute")
            .blocks_for_uuid(&stale_id.to_string())
            .is_empty()
    );
    h.mine().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        h.relay("bloxroute").blocks_for_uuid(&id.to_string()),
        vec![head + 1, head + 2]
    );
    let outcome = h.outcomes.wait_for(id, Duration::from_secs(5)).await;
    assert_eq!(
        (outcome.outcome, outcome.state),
        (OutcomeKind::NotIncluded, BundleState::Expired)
    );
    // bloXroute got object params, no 0x on txs and its Authorization on every request.
    assert!(
        h.relay("bloxroute").violations().is_empty(),
        "{:?}",
        h.relay("bloxroute").violations()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bloxroute_simulation_stops_a_reverting_bundle() {
    let h = Harness::start(
        vec![RelaySetup {
            toml: "kind = \"bloxroute\"\nsimulate = true",
            ..bloxroute("bloxroute")
        }],
        "",
    )
    .await;
    let reverter = alloy::primitives::Address::repeat_byte(0xdd);
    let () = h
        .anvil
        .provider()
        .raw_request(
            "anvil_setCode".into(),
            (
                reverter,
                Bytes::from_static(&[0x60, 0x00, 0x60, 0x00, 0xfd]),
            ),
        )
        .await
        .unwrap();
    let head = h.engine.head();
    let mut bad = h.request(
        vec![signed_call(1, 0, reverter, Bytes::new(), 100_000)],
        head + 1,
        head + 5,
        "k",
    );
    bad.simulate = true;
    h.engine.submit(bad.clone()).await.unwrap();
    let s = h
        .wait_status(bad.bundle_id, "failed", |s| s.state == BundleState::Failed)
        .await;
    assert_eq!(s.reason.as_deref(), Some("simulation_reverted"));
    assert_eq!(s.simulation.unwrap().relay, "bloxroute");
    assert!(
        h.relay("bloxroute")
            .received()
            .iter()
            .any(|r| r.method == "blxr_simulate_bundle")
    );
    assert!(
        h.relay("bloxroute")
            .blocks_for_uuid(&bad.bundle_id.to_string())
            .is_empty()
    );
    // Allowed to revert: the same call listed in revertingTxHashes is sent.
    let raw = signed_call(2, 0, reverter, Bytes::new(), 100_000);
    let mut allowed = h.request(vec![raw.clone()], head + 1, head + 5, "k");
    allowed.simulate = true;
    allowed.reverting_tx_hashes = vec![alloy::primitives::keccak256(&raw)];
    h.engine.submit(allowed.clone()).await.unwrap();
    h.relay("bloxroute")
        .wait_for("the allowed bundle", Duration::from_secs(5), |r| {
            r.bundle
                .as_ref()
                .is_some_and(|b| b.uuid.as_deref() == Some(allowed.bundle_id.to_string().as_str()))
        })
        .await;
    assert!(
        h.relay("bloxroute").violations().is_empty(),
        "{:?}",
        h.relay("bloxroute").violations()
    );
}

/// A send that fails with a retryable answer is retried once, but never for a block that is
/// already built: here the relay asks to retry after a second (429, `Retry-After: 1`), the
/// target block is mined meanwhile, and no second request for that block comes; the bundle
/// goes on to the blocks after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_never_crosses_its_target_block() {
    let h = Harness::start(
        vec![builder(
            "r429",
            Behavior::TooManyRequests(1),
            "kind = \"builder\"\nsign = false",
        )],
        "failure_threshold = 100",
    )
    .await;
    let head = h.engine.head();
    let target = head + 1;
    let request = h.request(
        vec![signed_transfer(1, 0, recipient())],
        target,
        target + 5,
        "k",
    );
    let uuid = request.bundle_id.to_string();
    h.engine.submit(request).await.unwrap();
    let relay = h.relay("r429");
    let sent_for = |block: u64| {
        let uuid = uuid.clone();
        move |r: &castellan_tests::relays::Received| {
            r.bundle
                .as_ref()
                .is_some_and(|b| b.block == block && b.uuid.as_deref() == Some(uuid.as_str()))
        }
    };
    let sends_for_target = || {
        let blocks = relay.blocks_for_uuid(&uuid);
        (blocks.iter().filter(|b| **b == target).count(), blocks)
    };
    let first = relay
        .wait_for("the first send", Duration::from_secs(5), sent_for(target))
        .await;
    // The target block is built while the send waits to be retried.
    assert_eq!(h.mine().await, target);
    let seen = first.at.elapsed();
    assert!(
        seen < Duration::from_millis(900),
        "the engine saw block {target} only {seen:?} after the first send: the retry, due after \
         1 s, could not be told from a legitimate one"
    );
    // Past the retry's time, with room to spare.
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(first.at.elapsed())).await;
    let (sends, blocks) = sends_for_target();
    assert_eq!(
        sends, 1,
        "block {target} was sent to again after it was mined: {blocks:?}"
    );
    // The bundle itself goes on: its send for the block after (skipped while the relay's
    // `Retry-After` ran) is made at the next block.
    assert_eq!(h.mine().await, target + 1);
    relay
        .wait_for(
            "the send for the next block",
            Duration::from_secs(5),
            sent_for(target + 2),
        )
        .await;
    let (sends, blocks) = sends_for_target();
    assert_eq!(sends, 1, "{blocks:?}");
}
