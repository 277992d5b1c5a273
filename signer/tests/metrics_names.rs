//! The deploy assets name only metrics the signer exports: a real signer (SoftHSM token, mTLS,
//! `[metrics]` listener) is scraped, and every `castellan_signer_*` name used by
//! `deploy/prometheus/castellan-rules.yml` and `deploy/grafana/castellan.json` must be in the
//! exposition. The state gauges the alerts read (approval backlog, rotation due, freeze) are
//! driven into their alerting state and read back, and every error code the rules match on is a
//! code the signer can answer with.
//!
//! Needs `CASTELLAN_PKCS11_MODULE` (`source scripts/tools.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use alloy::primitives::{Address, B256};
use alloy::signers::local::PrivateKeySigner;
use castellan_signer::audit::UnixMillis;
use castellan_signer::store::{Change, KeyName, SqliteStore, Store};
use castellan_tests::deploy_assets::{self, SIGNER_PREFIX};
use castellan_tests::softhsm::in_own_process;
use serde_json::json;
use support::{Appliance, CHAIN_ID, policy_toml, runtime};

const ETHER: u128 = 1_000_000_000_000_000_000;

/// The value of an unlabelled sample `name` in the exposition.
fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn every_signer_metric_in_the_rules_and_dashboard_is_exported() {
    in_own_process(
        "every_signer_metric_in_the_rules_and_dashboard_is_exported",
        "metrics-names",
        |token| {
            runtime().block_on(async {
                let approvers: Vec<Address> = (1u8..=3)
                    .map(|i| {
                        PrivateKeySigner::from_bytes(&B256::repeat_byte(0x40 + i))
                            .unwrap()
                            .address()
                    })
                    .collect();
                let app = Appliance::start_with(
                    token,
                    &["hot", "cold"],
                    &policy_toml(&approvers),
                    "[metrics]\nlisten = \"127.0.0.1:0\"\n",
                )
                .await;

                // Before anything happened, nothing is in an alerting state.
                let text = app.metrics().await;
                assert_eq!(value(&text, "castellan_signer_ready"), 1.0);
                assert_eq!(value(&text, "castellan_signer_frozen"), 0.0);
                assert_eq!(value(&text, "castellan_signer_pending_approvals"), 0.0);
                assert_eq!(value(&text, "castellan_signer_keys_rotation_due"), 0.0);
                assert_eq!(
                    value(&text, "castellan_signer_rotation_overdue_seconds"),
                    0.0
                );

                // A transfer above the approval tier waits for approvals.
                let tx = json!({ "tx": {
                    "chainId": CHAIN_ID.to_string(), "nonce": "0",
                    "to": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
                    "value": (2 * ETHER).to_string(), "gas": "21000",
                    "maxFeePerGas": "0x77359400", "maxPriorityFeePerGas": "0x3b9aca00",
                }});
                let r = app
                    .client(Some("alpha"))
                    .post(app.url("/v1/keys/hot/sign/transaction"))
                    .json(&tx)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap());
                // `cold` gets a rotation period that has already elapsed, written to the store
                // directly as `keyctl` does when it works on the store.
                let store = SqliteStore::open(app.path("signer.db")).unwrap();
                store
                    .set_rotate_every(
                        KeyName::new("cold").unwrap(),
                        Some(1),
                        Change::new("metrics-test", UnixMillis::now()),
                    )
                    .await
                    .unwrap();
                // The freeze, through the admin API.
                let r = app
                    .client(Some("ops"))
                    .post(app.url("/v1/admin/freeze"))
                    .json(&json!({ "reason": "metrics test" }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;

                // A labelled family appears with its first sample (prometheus-client writes no
                // TYPE line for an empty family): check the names once requests were answered.
                let text = app.metrics().await;
                let checked = deploy_assets::check_exported(SIGNER_PREFIX, &text)
                    .unwrap_or_else(|e| panic!("{e}"));
                assert!(checked >= 10, "only {checked} signer names used");
                assert_eq!(value(&text, "castellan_signer_pending_approvals"), 1.0);
                let oldest = value(&text, "castellan_signer_oldest_pending_seconds");
                assert!((0.0..60.0).contains(&oldest), "{oldest}");
                assert_eq!(value(&text, "castellan_signer_keys_rotation_due"), 1.0);
                let overdue = value(&text, "castellan_signer_rotation_overdue_seconds");
                assert!(overdue > 0.0 && overdue < 600.0, "{overdue}");
                assert_eq!(value(&text, "castellan_signer_frozen"), 1.0);
                assert!(
                    text.contains(
                        "castellan_signer_requests_total{route=\"transaction\",code=\"pending\"} 1"
                    ),
                    "{text}"
                );
                assert_eq!(value(&text, "castellan_signer_scrape_errors_total"), 0.0);
            })
        },
    );
}

/// The error codes the rules and the dashboard count as signing errors are codes the signer
/// answers with (a renamed code would silently blind the alert).
#[test]
fn error_codes_matched_by_the_rules_are_signer_codes() {
    let root = deploy_assets::repo_root();
    let mut source = String::new();
    let mut dirs = vec![root.join("signer/src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                source.push_str(&std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut texts = vec![deploy_assets::rules_text().unwrap()];
    texts.extend(deploy_assets::dashboard_exprs(
        &deploy_assets::dashboard().unwrap(),
    ));
    let mut checked = 0;
    for text in texts {
        // code=~"a|b|c" and code="a"
        for (i, _) in text.match_indices("code=") {
            let rest = text[i + 5..]
                .trim_start_matches('~')
                .trim_start_matches('\\');
            let Some(rest) = rest.strip_prefix('"') else {
                continue;
            };
            let end = rest.find(['"', '\\']).unwrap();
            for code in rest[..end].split('|') {
                if code == "signed" || code == "pending" {
                    continue;
                }
                assert!(
                    source.contains(&format!("\"{code}\"")),
                    "code {code:?} used by a rule or panel is not in signer/src"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 6, "{checked}");
}
