//! Revocation gap: the signer binary (SoftHSM, mTLS, durable audit) signs in a loop for two
//! clients while an operator revokes the key through the admin API. Per round it measures how
//! long the revocation call took (it waits for signatures already decided), when the first
//! refusal arrived after the call returned, and how many signatures the audit chain holds with a
//! time after the return (the promise: none).
//!
//! `cargo bench -p castellan-signer --bench revocation` (needs `source scripts/tools.sh`).
//! Environment: `REVOCATION_ROUNDS` (default 5; each round is a fresh appliance on the same
//! token). Prints a table and `BENCH key=value` lines for scripts/bench.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::exit,
    dead_code
)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy::primitives::{Address, B256};
use alloy::signers::local::PrivateKeySigner;
use castellan_tests::softhsm::SoftHsmToken;
use serde_json::json;

fn main() -> ExitCode {
    let token = match support::bench_token("castellan-revocation", "revocation") {
        Ok(token) => token,
        Err(code) => return code,
    };
    let rounds: usize = std::env::var("REVOCATION_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .clamp(1, 50);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(&token, rounds));
    ExitCode::SUCCESS
}

struct Round {
    signed_before: usize,
    revoke_call: Duration,
    first_refusal: Duration,
    late_signatures: usize,
}

async fn sign(app: &support::Appliance, client: &reqwest::Client, nonce: u64) -> u16 {
    let body = json!({ "tx": {
        "chainId": support::CHAIN_ID.to_string(), "nonce": nonce.to_string(),
        "to": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8", "value": "1", "gas": "21000",
        "maxFeePerGas": "0x77359400", "maxPriorityFeePerGas": "0x3b9aca00",
    }});
    client
        .post(app.url("/v1/keys/hot/sign/transaction"))
        .json(&body)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn round(token: &SoftHsmToken, policy: &str) -> Round {
    let app = Arc::new(support::Appliance::start(token, &["hot"], policy).await);
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for c in 0..2u64 {
        let app = app.clone();
        let stop = stop.clone();
        loops.push(tokio::spawn(async move {
            let client = app.client(Some("alpha"));
            let mut answers = Vec::new();
            let mut n = c * 1_000_000;
            // Bounded: the loop stops when told, and never runs past 10 s.
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(10) {
                let status = sign(&app, &client, n).await;
                answers.push((Instant::now(), status));
                n += 1;
            }
            answers
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let called = Instant::now();
    let r = app
        .client(Some("ops"))
        .post(app.url("/v1/admin/keys/hot/revoke"))
        .json(&json!({ "reason": "revocation bench" }))
        .send()
        .await
        .unwrap();
    let returned = Instant::now();
    let returned_ms = u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    for l in loops {
        answers.extend(l.await.unwrap());
    }
    let signed_before = answers.iter().filter(|(_, s)| *s == 200).count();
    assert!(
        signed_before > 0,
        "nothing was signed before the revocation"
    );
    let first_refusal = answers
        .iter()
        .filter(|(t, s)| *t > returned && *s != 200)
        .map(|(t, _)| *t - returned)
        .min()
        .expect("no request was refused after the revocation");
    let late_signatures = app
        .audit()
        .await
        .iter()
        .filter(|r| r.kind.as_str() == "signature" && r.at.0 > returned_ms)
        .count();
    Round {
        signed_before,
        revoke_call: returned - called,
        first_refusal,
        late_signatures,
    }
}

async fn run(token: &SoftHsmToken, rounds: usize) {
    let approvers: Vec<Address> = (1u8..=3)
        .map(|i| {
            PrivateKeySigner::from_bytes(&B256::repeat_byte(0x40 + i))
                .unwrap()
                .address()
        })
        .collect();
    let policy = support::policy_toml(&approvers);
    let mut results = Vec::new();
    for _ in 0..rounds {
        results.push(round(token, &policy).await);
    }
    println!("revocation while two clients sign in a loop ({rounds} rounds):");
    println!(
        "{:>6} {:>14} {:>16} {:>18} {:>16}",
        "round", "signed before", "revoke call µs", "first refusal µs", "late signatures"
    );
    for (i, r) in results.iter().enumerate() {
        println!(
            "{:>6} {:>14} {:>16} {:>18} {:>16}",
            i + 1,
            r.signed_before,
            r.revoke_call.as_micros(),
            r.first_refusal.as_micros(),
            r.late_signatures
        );
    }
    let late: usize = results.iter().map(|r| r.late_signatures).sum();
    let max = |f: fn(&Round) -> Duration| results.iter().map(f).max().unwrap_or_default();
    println!("BENCH revocation.rounds={rounds}");
    println!("BENCH revocation.late_signatures={late}");
    println!(
        "BENCH revocation.first_refusal_max_us={}",
        max(|r| r.first_refusal).as_micros()
    );
    println!(
        "BENCH revocation.revoke_call_max_us={}",
        max(|r| r.revoke_call).as_micros()
    );
}
