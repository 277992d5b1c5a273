//! The deploy assets name only metrics the submitter exports: an engine (anvil, a stand-in
//! relay that builds blocks) serves its `/metrics` router on a loopback socket; after a bundle
//! was sent, included and confirmed and an unknown identity was turned away, every
//! `castellan_submitter_*` name used by `deploy/prometheus/castellan-rules.yml` and
//! `deploy/grafana/castellan.json` must be in the scraped exposition, and the samples the
//! inclusion-rate and breaker alerts read have their expected values.
//!
//! Needs `CASTELLAN_ANVIL` (`source scripts/tools.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use castellan_api::serve::Peer;
use castellan_api::submitter::Role;
use castellan_api::tls::Identity;
use castellan_submitter::api::{Identities, metrics_router, mtls_router};
use castellan_tests::deploy_assets::{self, SUBMITTER_PREFIX};
use castellan_tests::relays::signed_transfer;
use common::*;
use tower::ServiceExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_submitter_metric_in_the_rules_and_dashboard_is_exported() {
    let h = Harness::start(vec![flashbots("flashbots")], "").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server =
        tokio::spawn(axum::serve(listener, metrics_router(h.engine.clone())).into_future());
    let scrape = || async move {
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };

    // A bundle sent to the relay, included in the block it builds, then confirmed.
    let head = h.engine.head();
    let request = h.request(
        vec![signed_transfer(1, 0, recipient())],
        head + 1,
        head + 5,
        "k",
    );
    let id = request.bundle_id;
    h.engine.submit(request).await.unwrap();
    let uuid = id.to_string();
    h.relay("flashbots")
        .wait_for("the bundle", Duration::from_secs(5), |r| {
            r.bundle
                .as_ref()
                .is_some_and(|b| b.uuid.as_deref() == Some(uuid.as_str()))
        })
        .await;
    assert_eq!(
        h.relay("flashbots")
            .build_block(h.anvil.provider(), head + 1)
            .await,
        1
    );
    assert_eq!(h.mine().await, head + 1);
    h.mine().await;
    h.wait_status(id, "confirmed", |s| s.confirmed).await;

    // A valid certificate whose identity is not configured, through the mTLS router.
    let known: BTreeMap<Identity, Vec<Role>> = BTreeMap::from([(
        Identity::new("spiffe://castellan/signer"),
        vec![Role::Signer],
    )]);
    let router = mtls_router(h.engine.clone(), 1 << 20, Identities::new(known));
    let request = Request::builder()
        .uri(format!("/v1/bundles/{id}"))
        .extension(Peer {
            identity: Identity::new("spiffe://castellan/stranger"),
            addr: "127.0.0.1:1".parse().unwrap(),
        })
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        router.oneshot(request).await.unwrap().status().as_u16(),
        403
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape().await;
        if text.contains("castellan_submitter_bundles_total{state=\"included\"} 1") {
            break text;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let checked =
        deploy_assets::check_exported(SUBMITTER_PREFIX, &text).unwrap_or_else(|e| panic!("{e}"));
    assert!(checked >= 7, "only {checked} submitter names used");
    for line in [
        "castellan_submitter_bundles_total{state=\"accepted\"} 1",
        "castellan_submitter_relay_breaker_state{relay=\"flashbots\"} 0",
        "castellan_submitter_api_refusals_total{reason=\"unknown_identity\"} 1",
        "castellan_submitter_live_bundles 0",
        &format!("castellan_submitter_head_block {}", head + 2),
    ] {
        assert!(text.contains(line), "{line} missing in\n{text}");
    }
    assert!(
        text.contains("castellan_submitter_relay_request_duration_seconds_bucket{le=")
            || text.contains(
                "castellan_submitter_relay_request_duration_seconds_bucket{relay=\"flashbots\",method=\"eth_sendBundle\",le="
            ),
        "{text}"
    );
    server.abort();
}
