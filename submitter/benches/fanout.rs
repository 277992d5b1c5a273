//! Fan-out latency: from a bundle accepted by the engine (`Engine::submit` returned, i.e. the
//! bundle is validated, persisted and acknowledged) to the last of 5 relay requests received by
//! stand-in relays on loopback that answer at once. Prints p50/p99 over many bundles, then runs
//! a criterion measurement of the same path.
//!
//! Two cases: unsigned builders, and every request signed with `X-Flashbots-Signature` (an
//! in-memory relay-auth key standing in for the signer's API; bench code only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256};
use alloy::signers::local::PrivateKeySigner;
use axum::Router;
use axum::routing::post;
use castellan_api::submitter::{Quantity, RelaySelection, SubmitBundleRequest};
use castellan_submitter::auth::{AuthError, BoxFuture, RelayAuthSignature, RelayAuthSigner};
use castellan_submitter::config::Config;
use castellan_submitter::store::Store;
use castellan_submitter::{Engine, LogOutcomes};
use castellan_tests::relays::{sign_body_hash, signed_transfer};
use criterion::{Criterion, criterion_group, criterion_main};
use tokio::sync::mpsc;
use uuid::Uuid;

const RELAYS: usize = 5;
/// Bundles per case (`FANOUT_SAMPLES`, default 2000).
fn samples() -> usize {
    std::env::var("FANOUT_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
        .clamp(10, 100_000)
}

struct LocalAuth(PrivateKeySigner);

impl RelayAuthSigner for LocalAuth {
    fn sign_body_hash(&self, hash: B256) -> BoxFuture<'_, Result<RelayAuthSignature, AuthError>> {
        let signature = sign_body_hash(&self.0, hash);
        let address = self.0.address();
        Box::pin(async move { Ok(RelayAuthSignature { address, signature }) })
    }
}

struct Bench {
    engine: Engine,
    arrivals: mpsc::UnboundedReceiver<Instant>,
    raw: alloy::primitives::Bytes,
    _dir: tempfile::TempDir,
}

async fn setup(signed: bool) -> Bench {
    castellan_submitter::relay::install_crypto_provider();
    let (tx, arrivals) = mpsc::unbounded_channel();
    let mut relays = String::new();
    for i in 0..RELAYS {
        let tx = tx.clone();
        let app = Router::new().route(
            "/",
            post(move |_body: axum::body::Bytes| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(Instant::now());
                    r#"{"jsonrpc":"2.0","id":1,"result":{"bundleHash":"0x2228f5d8954ce31dc1601a8ba264dbd401bf1428388ce88238932815c5d6f23f"}}"#
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        relays.push_str(&format!(
            "[[relay]]\nname = \"r{i}\"\nkind = \"builder\"\nurl = \"http://{addr}/\"\nsign = {signed}\nrate_per_second = 1000000\nburst = 1000000\n\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[api]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n[tls]\ncert = \"/unused/server.pem\"\nkey = \"/unused/server.key\"\nclient_ca = \"/unused/ca.pem\"\n\
         [chain]\nchain_id = 31337\nnode_url = \"http://127.0.0.1:9\"\n\
         [store]\npath = \"{}\"\n\n{relays}",
        dir.path().join("bench.db").display()
    );
    let config = Config::parse(&text).unwrap();
    let auth: Arc<dyn RelayAuthSigner> = Arc::new(LocalAuth(
        "0xfad9c8855b740a0b7ed4c221dbad0f33a83a49cad6b3fe8d5817ac83d38b6a19"
            .parse()
            .unwrap(),
    ));
    let store = Store::open(&config.store.path).unwrap();
    let engine =
        castellan_submitter::build_engine(&config, Some(auth), store, Arc::new(LogOutcomes))
            .unwrap();
    // One head, before any bundle: the engine never needs the (absent) node afterwards.
    engine.on_head(1).await;
    let raw = signed_transfer(1, 0, Address::repeat_byte(0x42));
    let mut bench = Bench {
        engine,
        arrivals,
        raw,
        _dir: dir,
    };
    // Warm the keep-alive connections.
    for _ in 0..20 {
        one(&mut bench).await;
    }
    bench
}

/// Submits one bundle; returns (submit call duration, accepted → last relay request).
async fn one(b: &mut Bench) -> (Duration, Duration) {
    let request = SubmitBundleRequest {
        bundle_id: Uuid::new_v4(),
        key_name: "bench".into(),
        txs: vec![b.raw.clone()],
        target_block: Quantity(2),
        last_block: Some(Quantity(2)),
        min_timestamp: None,
        max_timestamp: None,
        reverting_tx_hashes: vec![],
        replacement_uuid: None,
        relays: RelaySelection::All,
        simulate: false,
    };
    let started = Instant::now();
    b.engine.submit(request).await.unwrap();
    let accepted = Instant::now();
    let mut last = accepted;
    for _ in 0..RELAYS {
        let at = tokio::time::timeout(Duration::from_secs(5), b.arrivals.recv())
            .await
            .expect("relay request within 5 s")
            .unwrap();
        last = last.max(at);
    }
    (accepted - started, last - accepted)
}

/// Prints the percentiles, and `BENCH fanout.<key>.<p>_us=<µs>` lines for scripts/bench.
fn percentiles(name: &str, key: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name}: n={} p50={:?} p90={:?} p99={:?} max={:?}",
        samples.len(),
        p(0.50),
        p(0.90),
        p(0.99),
        samples[samples.len() - 1]
    );
    for (label, q) in [("p50", 0.50), ("p99", 0.99)] {
        println!(
            "BENCH fanout.{key}.{label}_us={:.1}",
            p(q).as_secs_f64() * 1e6
        );
    }
}

fn fanout(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for signed in [false, true] {
        let label = if signed { "signed" } else { "unsigned" };
        let mut bench = runtime.block_on(setup(signed));
        let (submits, fanouts): (Vec<_>, Vec<_>) = runtime
            .block_on(async {
                let mut v = Vec::new();
                for _ in 0..samples() {
                    v.push(one(&mut bench).await);
                }
                v
            })
            .into_iter()
            .unzip();
        percentiles(
            &format!("fanout/{label}: accepted -> last of {RELAYS} relay requests"),
            &format!("{label}.accepted_to_last_relay"),
            fanouts,
        );
        percentiles(
            &format!("fanout/{label}: submit (validate + SQLite fsync commit)"),
            &format!("{label}.submit"),
            submits,
        );
        c.bench_function(
            &format!("fanout_{label}_accepted_to_last_relay"),
            |bencher| {
                bencher.iter_custom(|iters| {
                    runtime.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            total += one(&mut bench).await.1;
                        }
                        total
                    })
                })
            },
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = fanout
}
criterion_main!(benches);
