//! Overload and rate limits over the real signer binary:
//! - past the admission limits (`[limits] max_in_flight`, `queue`, `queue_wait`), a signing
//!   request is answered 503 `overloaded` with `Retry-After` at once, on a connection kept open,
//!   the refusals are audited in aggregate — the records' counts add up to the 503s, the last one
//!   written about a second after the burst without any further overload — and the signer serves
//!   normally right after;
//! - the same for JSON-RPC signing on `/rpc` (the whole route is behind the gate), whose 503 body
//!   is a JSON-RPC 2.0 error (`-32005`, `data.code` `overloaded`) carrying the request's id;
//! - a client over its policy rate limit is answered 429 `rate_limited` with `X-RateLimit-Limit`,
//!   `X-RateLimit-Remaining`, `X-RateLimit-Reset` and `Retry-After`, carrying the policy's numbers,
//!   while another client is not limited.
//!
//! The throughput and latency figures under 10× overload are a benchmark
//! (`cargo bench -p castellan-signer --bench overload`), not a test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use alloy::primitives::Address;
use castellan_signer::audit::AuditRecord;
use castellan_tests::softhsm::in_own_process;
use serde_json::{Value, json};
use support::{Appliance, policy_toml, refused_with, runtime};

fn policy() -> String {
    policy_toml(&[0x41, 0x42, 0x43].map(Address::repeat_byte))
}

/// Restarts the signer with `lines` added to signer.toml's `[limits]` table.
fn set_limits(app: &mut Appliance, lines: &str) {
    app.kill();
    let path = app.path("signer.toml");
    let config = std::fs::read_to_string(&path).unwrap();
    assert!(config.contains("\n[limits]\n"), "{config}");
    std::fs::write(
        &path,
        config.replace("\n[limits]\n", &format!("\n[limits]\n{lines}")),
    )
    .unwrap();
    app.spawn();
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// The overload refusals counted by the aggregated `overloaded` audit records, and how many
/// records there are.
fn overloads_audited(records: &[AuditRecord]) -> (u64, usize) {
    let aggregated: Vec<u64> = records
        .iter()
        .filter(|r| {
            r.kind.as_str() == "refusal"
                && r.payload.get("code").and_then(Value::as_str) == Some("overloaded")
        })
        .map(|r| {
            r.payload["count"]
                .as_u64()
                .unwrap_or_else(|| panic!("no count in {:?}", r.payload))
        })
        .collect();
    (aggregated.iter().sum(), aggregated.len())
}

/// Waits (without any further overload) until the aggregated overload records count `refused`
/// refusals: the last count of a burst is flushed by a timer about a second after the burst, not
/// left for the next overload to write. Never more than were refused.
async fn overloads_audited_soon(app: &Appliance, refused: u64) {
    let burst_end = Instant::now();
    loop {
        let (audited, records) = overloads_audited(&app.audit().await);
        assert!(audited <= refused, "{audited} audited, {refused} refused");
        if audited == refused {
            println!(
                "{refused} overload refusals audited in {records} aggregated records, within {:?} of the burst's end",
                burst_end.elapsed()
            );
            return;
        }
        // About a second (the flush timer) plus the store's write, with room for a busy machine.
        assert!(
            burst_end.elapsed() < Duration::from_secs(4),
            "{audited} of {refused} overload refusals audited {:?} after the burst",
            burst_end.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn past_the_admission_limit_503_overloaded_with_retry_after_then_serves_normally() {
    in_own_process(
        "past_the_admission_limit_503_overloaded_with_retry_after_then_serves_normally",
        "overload",
        |token| {
            runtime().block_on(async {
                // One request in the pipeline, one waiting at most 20 ms: a burst of 64 at once
                // must be mostly refused.
                let mut app = Appliance::start(token, &["hot"], &policy()).await;
                set_limits(
                    &mut app,
                    "max_in_flight = 1\nqueue = 1\nqueue_wait = \"20ms\"\n",
                );
                let clients: Vec<reqwest::Client> =
                    (0..64).map(|_| app.client(Some("alpha"))).collect();
                // Connect every client first, so that the burst is requests, not handshakes.
                for c in &clients {
                    assert_eq!(
                        c.get(app.url("/ready"))
                            .send()
                            .await
                            .unwrap()
                            .status()
                            .as_u16(),
                        200
                    );
                }
                let mut tasks = Vec::new();
                for (i, c) in clients.iter().enumerate() {
                    let c = c.clone();
                    let url = app.url("/v1/keys/hot/sign/transaction");
                    tasks.push(tokio::spawn(async move {
                        let t = Instant::now();
                        let r = c
                            .post(&url)
                            .header("x-request-id", format!("burst-{i}"))
                            .json(&support::transfer(i as u64))
                            .send()
                            .await
                            .unwrap();
                        let status = r.status().as_u16();
                        let retry = header(&r, "retry-after");
                        let rid = header(&r, "x-request-id");
                        let connection = header(&r, "connection");
                        let body: Value = r.json().await.unwrap();
                        (status, retry, rid, connection, body, t.elapsed())
                    }));
                }
                let mut signed = 0;
                let mut refused = 0u64;
                for t in tasks {
                    let (status, retry, rid, connection, body, latency) = t.await.unwrap();
                    match status {
                        200 => signed += 1,
                        503 => {
                            refused += 1;
                            assert_eq!(body["error"]["code"], "overloaded", "{body}");
                            assert_eq!(retry.as_deref(), Some("1"), "{body}");
                            // The connection stays open for the next request: a refusal does
                            // not cost the client a new TLS handshake.
                            assert_eq!(connection, None, "{body}");
                            assert!(rid.is_some_and(|r| r.starts_with("burst-")));
                            let msg = body["error"]["message"].as_str().unwrap();
                            assert!(msg.contains("saturated"), "{msg}");
                            assert_eq!(body["error"]["details"]["maxInFlight"], 1, "{body}");
                            assert_eq!(body["error"]["details"]["queue"], 1, "{body}");
                            // Refused at once or after the bounded wait, never queued longer.
                            assert!(latency < Duration::from_secs(2), "{latency:?}");
                        }
                        other => panic!("unexpected {other}: {body}"),
                    }
                }
                println!(
                    "burst of 64 with 1 in flight + 1 waiting: {signed} signed, {refused} refused"
                );
                assert!(
                    signed >= 1 && refused >= 1,
                    "{signed} signed, {refused} refused"
                );

                // The refusals are in the audit chain (aggregated: at most one record a second),
                // all of them soon after the burst.
                overloads_audited_soon(&app, refused).await;
                let records = app.audit().await;
                assert!(refused_with(&records, "overloaded"));
                let rec = records
                    .iter()
                    .find(|r| r.payload.get("code").and_then(Value::as_str) == Some("overloaded"))
                    .unwrap();
                let reason = rec.payload["reason"].as_str().unwrap();
                assert!(reason.contains("refused for overload"), "{reason}");
                assert!(reason.contains("1 in flight"), "{reason}");

                // Right after: one request at a time is served normally.
                for i in 0..5u64 {
                    let r = clients[0]
                        .post(app.url("/v1/keys/hot/sign/transaction"))
                        .json(&support::transfer(1000 + i))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
                }

                // A second burst, then a stop right away (SIGTERM), before the flush timer:
                // the signer writes the counts at shutdown, so the chain still holds every
                // refusal.
                let mut tasks = Vec::new();
                for (i, c) in clients.iter().enumerate() {
                    let c = c.clone();
                    let url = app.url("/v1/keys/hot/sign/transaction");
                    tasks.push(tokio::spawn(async move {
                        c.post(&url)
                            .json(&support::transfer(2000 + i as u64))
                            .send()
                            .await
                            .unwrap()
                            .status()
                            .as_u16()
                    }));
                }
                let mut second = 0u64;
                for t in tasks {
                    match t.await.unwrap() {
                        200 => {}
                        503 => second += 1,
                        other => panic!("unexpected {other}"),
                    }
                }
                assert!(second >= 1, "the second burst was not refused at all");
                app.terminate();
                app.spawn();
                let (audited, _) = overloads_audited(&app.audit().await);
                assert_eq!(
                    audited,
                    refused + second,
                    "after a stop right after a burst: {audited} audited, {} refused",
                    refused + second
                );
            });
        },
    );
}

#[test]
fn past_the_admission_limit_rpc_signing_gets_503_overloaded_with_retry_after() {
    in_own_process(
        "past_the_admission_limit_rpc_signing_gets_503_overloaded_with_retry_after",
        "overload",
        |token| {
            runtime().block_on(async {
                // The same limits as above, a burst of 32 `personal_sign` calls on /rpc: the
                // JSON-RPC route is behind the same gate as the /v1 signing routes.
                let mut app = Appliance::start(token, &["hot"], &policy()).await;
                set_limits(
                    &mut app,
                    "max_in_flight = 1\nqueue = 1\nqueue_wait = \"20ms\"\n",
                );
                let from = app.keys["hot"];
                let clients: Vec<reqwest::Client> =
                    (0..32).map(|_| app.client(Some("alpha"))).collect();
                for c in &clients {
                    let r = c.get(app.url("/ready")).send().await.unwrap();
                    assert_eq!(r.status().as_u16(), 200);
                }
                let mut tasks = Vec::new();
                for (i, c) in clients.iter().enumerate() {
                    let c = c.clone();
                    let url = app.url("/rpc");
                    tasks.push(tokio::spawn(async move {
                        // Every fourth caller sends a batch: a signature and a chain id.
                        let call = json!({"jsonrpc": "2.0", "id": i, "method": "personal_sign",
                            "params": [format!("0x{:02x}", i + 1), from]});
                        let body = if i % 4 == 3 {
                            json!([call, {"jsonrpc": "2.0", "id": format!("chain-{i}"),
                                "method": "eth_chainId", "params": []}])
                        } else {
                            call
                        };
                        let r = c
                            .post(&url)
                            .header("x-request-id", format!("rpc-burst-{i}"))
                            .json(&body)
                            .send()
                            .await
                            .unwrap();
                        let status = r.status().as_u16();
                        let retry = header(&r, "retry-after");
                        let rid = header(&r, "x-request-id");
                        let connection = header(&r, "connection");
                        let body: Value = r.json().await.unwrap();
                        (i, status, retry, rid, connection, body)
                    }));
                }
                let (mut signed, mut refused, mut batches_refused) = (0, 0u64, 0);
                for t in tasks {
                    let (i, status, retry, rid, connection, body) = t.await.unwrap();
                    if i % 4 == 3 {
                        // A batch: answered with an array, one answer per call, in order.
                        let answers = body.as_array().unwrap_or_else(|| panic!("{body}"));
                        assert_eq!(answers.len(), 2, "{body}");
                        assert_eq!(answers[0]["id"], i, "{body}");
                        assert_eq!(answers[1]["id"], format!("chain-{i}"), "{body}");
                        match status {
                            200 => {
                                assert!(answers[0]["result"].as_str().is_some(), "{body}");
                                signed += 1;
                            }
                            503 => {
                                assert_eq!(retry.as_deref(), Some("1"), "{body}");
                                for a in answers {
                                    assert_eq!(a["jsonrpc"], "2.0", "{body}");
                                    assert_eq!(a["error"]["code"], -32005, "{body}");
                                    assert_eq!(a["error"]["data"]["code"], "overloaded", "{body}");
                                }
                                refused += 1;
                                batches_refused += 1;
                            }
                            other => panic!("unexpected {other}: {body}"),
                        }
                        continue;
                    }
                    match status {
                        200 => {
                            assert_eq!(body["jsonrpc"], "2.0", "{body}");
                            assert_eq!(body["id"], i, "{body}");
                            assert!(body["result"].as_str().is_some(), "{body}");
                            signed += 1;
                        }
                        503 => {
                            // HTTP says overloaded (503, Retry-After); the body is a JSON-RPC
                            // 2.0 error answering this request's id, EIP-1474 "limit exceeded",
                            // with the stable code and the limits in `data`.
                            assert_eq!(retry.as_deref(), Some("1"), "{body}");
                            assert_eq!(rid, Some(format!("rpc-burst-{i}")), "{body}");
                            assert_eq!(connection, None, "{body}");
                            let object = body.as_object().unwrap();
                            let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
                            keys.sort_unstable();
                            assert_eq!(keys, ["error", "id", "jsonrpc"], "{body}");
                            assert_eq!(body["jsonrpc"], "2.0", "{body}");
                            assert_eq!(body["id"], i, "{body}");
                            assert_eq!(body["error"]["code"], -32005, "{body}");
                            let msg = body["error"]["message"].as_str().unwrap();
                            assert!(msg.starts_with("overloaded: "), "{msg}");
                            assert!(msg.contains("saturated"), "{msg}");
                            assert_eq!(body["error"]["data"]["code"], "overloaded", "{body}");
                            assert_eq!(
                                body["error"]["data"]["details"]["maxInFlight"], 1,
                                "{body}"
                            );
                            assert_eq!(body["error"]["data"]["retryAfter"], 1, "{body}");
                            refused += 1;
                        }
                        other => panic!("unexpected {other}: {body}"),
                    }
                }
                println!("rpc burst of 32 with 1 in flight + 1 waiting: {signed} signed, {refused} refused ({batches_refused} of 8 batches)");
                assert!(signed >= 1 && refused >= 1, "{signed} signed, {refused} refused");
                assert!(batches_refused >= 1, "no batch among the 8 was refused");
                overloads_audited_soon(&app, refused).await;

                // Right after, /rpc signs normally.
                let r: Value = clients[0]
                    .post(app.url("/rpc"))
                    .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "personal_sign",
                        "params": ["0x68656c6c6f", from]}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                assert!(r["result"].as_str().is_some(), "{r}");
            });
        },
    );
}

#[test]
fn over_its_rate_limit_a_client_gets_429_with_the_policys_numbers() {
    in_own_process(
        "over_its_rate_limit_a_client_gets_429_with_the_policys_numbers",
        "ratelimit",
        |token| {
            runtime().block_on(async {
                let alpha = "identity = \"spiffe://castellan/strategy/alpha\"\nkeys = [\"hot\", \"cold\"]\n";
                let policy = policy();
                assert!(policy.contains(alpha));
                let policy = policy.replace(
                    alpha,
                    &format!("{alpha}rate = [{{ window = \"1m\", max_requests = 3 }}]\n"),
                );
                let app = Appliance::start(token, &["hot", "cold"], &policy).await;
                let alpha = app.client(Some("alpha"));
                let beta = app.client(Some("beta"));
                let sign = async |c: &reqwest::Client, key: &str, nonce: u64| {
                    c.post(app.url(&format!("/v1/keys/{key}/sign/transaction")))
                        .json(&support::transfer(nonce))
                        .send()
                        .await
                        .unwrap()
                };
                let started = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                for (n, remaining) in [(0u64, "2"), (1, "1"), (2, "0")] {
                    let r = sign(&alpha, "hot", n).await;
                    assert_eq!(r.status().as_u16(), 200);
                    // Allowed answers need not carry the headers; when they do, they count down.
                    if let Some(rem) = header(&r, "x-ratelimit-remaining") {
                        assert_eq!(rem, remaining);
                    }
                }
                let r = sign(&alpha, "hot", 3).await;
                assert_eq!(r.status().as_u16(), 429);
                assert_eq!(header(&r, "x-ratelimit-limit").as_deref(), Some("3"));
                assert_eq!(header(&r, "x-ratelimit-remaining").as_deref(), Some("0"));
                let reset: u64 = header(&r, "x-ratelimit-reset").unwrap().parse().unwrap();
                // The oldest counted request leaves the 1-minute window a minute after it was made.
                assert!(
                    (started + 59..=started + 62).contains(&reset),
                    "reset {reset}, started {started}"
                );
                let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
                assert!((1..=61).contains(&retry), "{retry}");
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                let msg = body["error"]["message"].as_str().unwrap();
                assert!(msg.contains("limit 3"), "{msg}");
                // The limit is the client's: another key of the same client is limited too, and
                // another client is not.
                assert_eq!(sign(&alpha, "cold", 4).await.status().as_u16(), 429);
                assert_eq!(sign(&beta, "cold", 5).await.status().as_u16(), 200);
                assert!(refused_with(&app.audit().await, "rate_limited"));
            });
        },
    );
}
