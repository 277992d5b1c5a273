//! Crash safety of the submitter binary (issue 8, part 2): clients submit bundles in a loop while
//! the submitter is `kill -9`ed at random moments and restarted on the same store, 20 times (a
//! block is mined at each restart, so bundles also expire across restarts). A submission cut by
//! the kill is retried with the same bundle id until it has an answer.
//!
//! After every restart, every bundle acknowledged so far (201, or 200 for a retry the store
//! already held) must be known to the new process with the content that was acknowledged; at the
//! end a retry of each is answered 200 (not a new bundle), and the store file holds each one.
//! A retry refused as `block_range_passed` was never stored, so it must stay unknown.
//!
//! The kill moments come from a seeded generator; the seed is printed
//! (`CASTELLAN_CRASH_SEED=<n>` replays the same moments).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, keccak256};
use alloy::providers::Provider;
use castellan_api::devpki::{DevCa, LeafSpec};
use castellan_api::submitter::{BundleStatus, Quantity, RelaySelection, SubmitBundleRequest};
use castellan_api::tls::ClientTlsConfig;
use castellan_tests::anvil::Anvil;
use castellan_tests::relays::{Behavior, Flavor, StandInRelay, signed_transfer};
use serde_json::Value;
use uuid::Uuid;

const RESTARTS: usize = 20;
const CLIENTS: usize = 3;
const SIGNER_ID: &str = "spiffe://castellan/signer";
/// Kill moments: uniformly this many milliseconds after the submitter answered `/ready`.
const KILL_AFTER_MS: u64 = 400;

/// splitmix64: a small seeded generator, so the kill moments are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn write_pki(dir: &Path) {
    let mut ca = DevCa::new("Castellan submitter crash test CA").unwrap();
    ca.write(dir, "ca").unwrap();
    ca.issue(&LeafSpec::server_localhost())
        .unwrap()
        .write(dir, "server")
        .unwrap();
    ca.issue(&LeafSpec::client_uri(SIGNER_ID))
        .unwrap()
        .write(dir, "signer")
        .unwrap();
}

fn config_text(dir: &Path, node: &str, relay: &str) -> String {
    let d = dir.display();
    format!(
        r#"[api]
listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"

[tls]
cert = "{d}/server.pem"
key = "{d}/server.key"
client_ca = "{d}/ca.pem"

[[identities]]
identity = "{SIGNER_ID}"
roles = ["signer"]

[chain]
chain_id = 31337
node_url = "{node}"
poll_interval_ms = 25
confirmations = 1

[store]
path = "{d}/submitter.db"

[[relay]]
name = "titan"
kind = "builder"
url = "{relay}"
sign = false
"#
    )
}

fn client(dir: &Path, addr: SocketAddr) -> reqwest::Client {
    let tls = ClientTlsConfig {
        server_ca: dir.join("ca.pem"),
        cert: dir.join("signer.pem"),
        key: dir.join("signer.key"),
    }
    .build()
    .unwrap();
    reqwest::Client::builder()
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(5))
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap()
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("https://localhost:{}{path}", addr.port())
}

struct Daemon {
    child: Child,
    log: PathBuf,
    addr: SocketAddr,
}

impl Daemon {
    /// Starts the binary (its log appended to `log`) and waits for its "listening" line.
    fn start(config: &Path, log: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_submitter"))
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("submitter listening on ") {
                    let _ = tx.send(a.trim().to_owned());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => Self {
                child,
                log: log.to_owned(),
                addr: a.parse().unwrap(),
            },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "submitter did not start:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    async fn wait_ready(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client.get(url(self.addr, "/ready")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "submitter not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- submitter log ----\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// Where the submitter currently listens, and how many times it was started.
#[derive(Clone)]
struct Target(Arc<RwLock<(u64, SocketAddr)>>);

impl Target {
    fn get(&self) -> (u64, SocketAddr) {
        *self.0.read().unwrap()
    }
    fn set(&self, addr: SocketAddr) {
        let mut g = self.0.write().unwrap();
        *g = (g.0 + 1, addr);
    }
}

#[derive(Default)]
struct Ledger {
    /// Acknowledged bundles: the request and the first acknowledgement's status (201 or 200).
    acked: BTreeMap<Uuid, (SubmitBundleRequest, u16)>,
    /// Retries refused as `block_range_passed` (never stored, never acknowledged).
    refused: Vec<Uuid>,
    /// Attempts that ended without an answer (connection refused or cut by the kill).
    retries: u64,
}

/// Submits new bundles until `stop`, each retried with its id until it has an answer.
async fn client_loop(
    n: usize,
    dir: PathBuf,
    target: Target,
    head: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut conn: Option<(u64, reqwest::Client)> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    for nonce in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // A moderate rate, so each restart has a few live bundles to resume (a start reloads only
        // the live ones; finished ones are answered from the store).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let h = head.load(Ordering::Relaxed);
        let request = SubmitBundleRequest {
            bundle_id: Uuid::new_v4(),
            key_name: format!("crash-{n}"),
            txs: vec![signed_transfer(n + 1, nonce, Address::repeat_byte(0x42))],
            target_block: Quantity(h + 1),
            last_block: Some(Quantity(h + 3)),
            min_timestamp: None,
            max_timestamp: None,
            reverting_tx_hashes: vec![],
            replacement_uuid: None,
            relays: RelaySelection::All,
            simulate: false,
        };
        let id = request.bundle_id;
        loop {
            assert!(Instant::now() < deadline, "bundle {id}: no answer in time");
            let (epoch, addr) = target.get();
            if conn.as_ref().is_none_or(|(e, _)| *e != epoch) {
                conn = Some((epoch, client(&dir, addr)));
            }
            let sent = conn
                .as_ref()
                .unwrap()
                .1
                .post(url(addr, "/v1/bundles"))
                .json(&request)
                .send()
                .await;
            let answer = match sent {
                Ok(r) => {
                    let status = r.status().as_u16();
                    r.json::<Value>().await.map(|b| (status, b))
                }
                Err(e) => Err(e),
            };
            match answer {
                Ok((status @ (200 | 201), body)) => {
                    let s: BundleStatus = serde_json::from_value(body).unwrap();
                    assert_eq!(s.bundle_id, id);
                    ledger
                        .lock()
                        .unwrap()
                        .acked
                        .insert(id, (request.clone(), status));
                    break;
                }
                Ok((400, body)) if body["error"]["code"] == "block_range_passed" => {
                    ledger.lock().unwrap().refused.push(id);
                    break;
                }
                Ok((503, _)) | Err(_) => {}
                Ok((status, body)) => panic!("bundle {id}: unexpected {status}: {body}"),
            }
            ledger.lock().unwrap().retries += 1;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
}

/// Every bundle in `ids` is known at `addr` with the acknowledged content; returns how many.
async fn check_known(
    c: &reqwest::Client,
    addr: SocketAddr,
    acked: &[(Uuid, SubmitBundleRequest)],
) -> usize {
    let mut set = tokio::task::JoinSet::new();
    for chunk in acked.chunks(acked.len().div_ceil(4).max(1)) {
        let c = c.clone();
        let chunk = chunk.to_vec();
        set.spawn(async move {
            for (id, request) in &chunk {
                let r = c
                    .get(url(addr, &format!("/v1/bundles/{id}")))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap();
                assert_eq!(status, 200, "acknowledged bundle {id} forgotten: {body}");
                let s: BundleStatus = serde_json::from_value(body).unwrap();
                assert_eq!(s.bundle_id, *id);
                assert_eq!(s.key_name, request.key_name);
                assert_eq!(s.target_block, request.target_block);
                assert_eq!(Some(s.last_block), request.last_block);
                let hashes: Vec<_> = request.txs.iter().map(keccak256).collect();
                assert_eq!(s.tx_hashes, hashes, "bundle {id}");
            }
            chunk.len()
        });
    }
    let mut n = 0;
    while let Some(r) = set.join_next().await {
        n += r.unwrap();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_forgets_no_acknowledged_bundle() {
    castellan_submitter::relay::install_crypto_provider();
    let seed = std::env::var("CASTELLAN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!(
        "submitter crash loop seed {seed} (CASTELLAN_CRASH_SEED={seed} replays the kill moments)"
    );
    let mut rng = Rng(seed);
    let started = Instant::now();

    let anvil = Anvil::start().await;
    let () = anvil
        .provider()
        .raw_request("evm_setAutomine".into(), (false,))
        .await
        .unwrap();
    let mine = || async {
        let _: Value = anvil
            .provider()
            .raw_request("evm_mine".into(), ())
            .await
            .unwrap();
        anvil.provider().get_block_number().await.unwrap()
    };
    let head = Arc::new(AtomicU64::new(mine().await));
    let relay = StandInRelay::start(
        Flavor::Flashbots {
            require_signature: false,
        },
        Behavior::Normal,
        None,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    write_pki(&d);
    let config = d.join("submitter.toml");
    std::fs::write(&config, config_text(&d, anvil.url().as_str(), &relay.url())).unwrap();
    let log = d.join("submitter.log");
    let mut daemon = Daemon::start(&config, &log);
    daemon.wait_ready(&client(&d, daemon.addr)).await;

    let target = Target(Arc::new(RwLock::new((0, daemon.addr))));
    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            tokio::spawn(client_loop(
                n,
                d.clone(),
                target.clone(),
                head.clone(),
                stop.clone(),
                ledger.clone(),
            ))
        })
        .collect();

    let mut moments = Vec::with_capacity(RESTARTS);
    let mut checks = 0usize;
    for restart in 1..=RESTARTS {
        let after = rng.below(KILL_AFTER_MS);
        moments.push(after);
        tokio::time::sleep(Duration::from_millis(after)).await;
        daemon.kill9();
        let t = Instant::now();
        head.store(mine().await, Ordering::Relaxed);
        daemon = Daemon::start(&config, &log);
        let listening_in = t.elapsed();
        let c = client(&d, daemon.addr);
        daemon.wait_ready(&c).await;
        target.set(daemon.addr);
        let ready_in = t.elapsed();
        // Every bundle acknowledged so far, by this process or any before it.
        let acked: Vec<_> = ledger
            .lock()
            .unwrap()
            .acked
            .iter()
            .map(|(id, (r, _))| (*id, r.clone()))
            .collect();
        let t = Instant::now();
        let n = check_known(&c, daemon.addr, &acked).await;
        checks += n;
        println!(
            "restart {restart}: kill -9 {after} ms after ready; listening in {} ms, ready in {} ms; all {n} \
             acknowledged bundles known (checked in {} ms)",
            listening_in.as_millis(),
            ready_in.as_millis(),
            t.elapsed().as_millis()
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .expect("clients settle")
            .expect("client task");
    }
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let acked: Vec<_> = ledger
        .acked
        .iter()
        .map(|(id, (r, _))| (*id, r.clone()))
        .collect();

    // One more kill -9 right after the last acknowledgement; then every bundle is known, a
    // retry of it is not a new bundle, and a refused one was never stored.
    daemon.kill9();
    let daemon = Daemon::start(&config, &log);
    let c = client(&d, daemon.addr);
    daemon.wait_ready(&c).await;
    checks += check_known(&c, daemon.addr, &acked).await;
    for (id, request) in &acked {
        let r = c
            .post(url(daemon.addr, "/v1/bundles"))
            .json(request)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "a retry of {id} became a new bundle");
    }
    for id in &ledger.refused {
        let r = c
            .get(url(daemon.addr, &format!("/v1/bundles/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "refused bundle {id} is known");
    }
    drop(daemon);
    let stored = castellan_submitter::store::Store::open(&d.join("submitter.db"))
        .unwrap()
        .load_all()
        .await
        .unwrap();
    let stored: BTreeMap<Uuid, SubmitBundleRequest> = stored
        .into_iter()
        .map(|s| (s.request.bundle_id, s.request))
        .collect();
    for (id, request) in &acked {
        assert_eq!(stored.get(id), Some(request), "bundle {id} in the store");
    }
    let via_retry = ledger.acked.values().filter(|(_, s)| *s == 200).count();
    println!(
        "submitter crash loop: {} kills and restarts (kill moments {moments:?} ms), {} bundles acknowledged \
         ({via_retry} of them as already stored on a retry after a kill), {} known after the \
         restarts ({checks} checks, 0 forgotten), {} stored rows, {} refused as expired on a retry, \
         {} retried attempts, {:.1} s",
        RESTARTS,
        acked.len(),
        acked.len(),
        stored.len(),
        ledger.refused.len(),
        ledger.retries,
        started.elapsed().as_secs_f64()
    );
    assert!(
        acked.len() >= RESTARTS,
        "too few bundles to say anything: {}",
        acked.len()
    );
}
