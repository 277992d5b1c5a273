//! Limit windows across a restart, over the real signer binary: a window spent before the
//! signer restarts is refused after it with the same code in the answer and in the audit record
//! (the in-memory mirror is warmed from the store at start), and a window another writer filled
//! behind the running signer's back is refused by the store with the policy's own answer for that
//! kind of window (429 `rate_limited` with `X-RateLimit-*` and `Retry-After` for a request-rate
//! window), again with the same code in the audit record.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use alloy::primitives::{Address, U256, keccak256};
use castellan_signer::audit::{AuditRecord, UnixMillis};
use castellan_signer::store::{
    DecisionTx, KeyName, KeyVersion, RequestId, Reservation, SqliteStore, Store, WindowKey,
};
use castellan_tests::softhsm::in_own_process;
use serde_json::{Value, json};
use support::{Appliance, policy_toml, runtime};

const ALPHA: &str = "spiffe://castellan/strategy/alpha";
const BETA: &str = "spiffe://castellan/strategy/beta";

/// The test policy with: alpha at most 3 requests a minute, beta at most 5, and key `cold` at
/// most 2 wei an hour.
fn policy() -> String {
    let base = policy_toml(&[0x41, 0x42, 0x43].map(Address::repeat_byte));
    let alpha = format!("identity = \"{ALPHA}\"\nkeys = [\"hot\", \"cold\"]\n");
    let beta = format!("identity = \"{BETA}\"\nkeys = [\"cold\"]\n");
    let cold = "[[keys]]\nname = \"cold\"\n";
    for part in [&alpha, &beta, cold] {
        assert!(base.contains(part), "{part} not in the test policy");
    }
    base.replace(
        &alpha,
        &format!("{alpha}rate = [{{ window = \"1m\", max_requests = 3 }}]\n"),
    )
    .replace(
        &beta,
        &format!("{beta}rate = [{{ window = \"1m\", max_requests = 5 }}]\n"),
    )
    .replace(
        cold,
        &format!("{cold}velocity = [{{ window = \"1h\", max_value = \"2 wei\" }}]\n"),
    )
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

fn now_s() -> u64 {
    UnixMillis::now().0 / 1000
}

/// The refusal record of request `rid`.
fn refusal<'a>(records: &'a [AuditRecord], rid: &str) -> &'a AuditRecord {
    let found: Vec<_> = records
        .iter()
        .filter(|r| r.kind.as_str() == "refusal" && r.request_id.as_deref() == Some(rid))
        .collect();
    assert_eq!(found.len(), 1, "refusal records of {rid}: {found:?}");
    found[0]
}

/// A 429 with the rate-limit headers: limit, 0 remaining, a reset in `reset`, a Retry-After.
fn assert_rate_limited(r: &reqwest::Response, limit: u64, reset: std::ops::RangeInclusive<u64>) {
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(
        header(r, "x-ratelimit-limit").as_deref(),
        Some(limit.to_string().as_str())
    );
    assert_eq!(header(r, "x-ratelimit-remaining").as_deref(), Some("0"));
    let at: u64 = header(r, "x-ratelimit-reset").unwrap().parse().unwrap();
    assert!(reset.contains(&at), "reset {at} not in {reset:?}");
    let retry: u64 = header(r, "retry-after").unwrap().parse().unwrap();
    assert!((1..=61).contains(&retry), "retry-after {retry}");
}

#[test]
fn a_window_spent_before_a_restart_refuses_with_one_code_in_the_answer_and_the_audit() {
    in_own_process(
        "a_window_spent_before_a_restart_refuses_with_one_code_in_the_answer_and_the_audit",
        "limitsrestart",
        |token| {
            runtime().block_on(async {
                let mut app = Appliance::start(token, &["hot", "cold"], &policy()).await;
                let sign = async |app: &Appliance,
                                  who: &str,
                                  key: &str,
                                  rid: &str,
                                  nonce: u64,
                                  value: u64| {
                    app.client(Some(who))
                        .post(app.url(&format!("/v1/keys/{key}/sign/transaction")))
                        .header("x-request-id", rid)
                        .json(&support::transfer_to(
                            nonce,
                            Address::repeat_byte(0x11),
                            u128::from(value),
                        ))
                        .send()
                        .await
                        .unwrap()
                };
                let started = now_s();
                // alpha's request window (3 a minute) and cold's value window (2 wei an hour).
                for n in 0..3u64 {
                    let r = sign(&app, "alpha", "hot", &format!("a{n}"), n, 1).await;
                    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
                }
                let mut signed = Vec::new();
                for n in 0..2u64 {
                    let r = sign(&app, "beta", "cold", &format!("b{n}"), n, 1).await;
                    assert_eq!(r.status().as_u16(), 200);
                    signed.push(r.json::<Value>().await.unwrap());
                }

                app.kill();
                app.spawn();
                assert!(
                    app.stderr().contains("limit windows warmed from the store"),
                    "{}",
                    app.stderr()
                );

                // Refused by the warmed policy pre-check (its reason names the rule), as before
                // the restart, not only by the store.
                let r = sign(&app, "alpha", "hot", "a-after", 3, 1).await;
                assert_rate_limited(&r, 3, started + 59..=started + 66);
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                let msg = body["error"]["message"].as_str().unwrap();
                assert!(
                    msg.contains("3 requests in the last 1m, limit 3"),
                    "not the policy's refusal: {msg}"
                );
                let r = sign(&app, "beta", "cold", "b-after", 2, 1).await;
                assert_eq!(r.status().as_u16(), 422);
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "velocity_exceeded", "{body}");
                let msg = body["error"]["message"].as_str().unwrap();
                assert!(
                    msg.contains("on top of 2 wei spent in the last 1h"),
                    "not the policy's refusal: {msg}"
                );
                // A retry of a request id signed before the restart, whose own reservation filled
                // the window, is answered with its stored signature, not refused.
                let r = sign(&app, "beta", "cold", "b1", 1, 1).await;
                assert_eq!(r.status().as_u16(), 200);
                assert_eq!(r.json::<Value>().await.unwrap(), signed[1]);
                let records = app.audit().await;
                assert_eq!(refusal(&records, "a-after").payload["code"], "rate_limited");
                assert_eq!(
                    refusal(&records, "b-after").payload["code"],
                    "velocity_exceeded"
                );

                // Another writer on the same store fills beta's request window (2 used + 3 = 5)
                // behind the running signer's back: the store refuses, with the policy's answer.
                let store = SqliteStore::open(app.path("signer.db")).unwrap();
                store
                    .commit_decision(DecisionTx {
                        request_id: RequestId::new("other-writer").unwrap(),
                        key: KeyVersion::new(KeyName::new("cold").unwrap(), 1),
                        identity: BETA.into(),
                        at: UnixMillis::now(),
                        digest: keccak256(b"other-writer"),
                        allow_retiring: false,
                        reservations: vec![Reservation {
                            window: WindowKey::new(format!("client:{BETA}:requests:60")).unwrap(),
                            duration_ms: 60_000,
                            amount: U256::from(3),
                            limit: U256::from(5),
                        }],
                        details: json!({ "decision": "allowed" }),
                    })
                    .await
                    .unwrap();
                drop(store);
                let before = now_s();
                // Value 0: only beta's request window counts it.
                let r = sign(&app, "beta", "cold", "b-store", 2, 0).await;
                assert_rate_limited(&r, 5, before + 59..=now_s() + 61);
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                let msg = body["error"]["message"].as_str().unwrap();
                assert!(msg.contains("spent 5 + 1 would exceed limit 5"), "{msg}");
                let records = app.audit().await;
                let record = refusal(&records, "b-store");
                assert_eq!(record.payload["code"], "rate_limited", "{record:?}");
                assert_eq!(
                    record.payload["window"],
                    format!("client:{BETA}:requests:60")
                );
            });
        },
    );
}
