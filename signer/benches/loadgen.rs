//! Load generator: the signer binary over mTLS with keep-alive, with policy (3 velocity windows,
//! a rate limit) and durable audit, against the raw backend rate measured in the same run at the
//! same session count.
//!
//! `cargo bench -p castellan-signer --bench loadgen` (needs `source scripts/tools.sh`). Prints:
//! - raw backend signs/s and signer signs/s at 1 and 2 HSM sessions, and their ratio (the raw
//!   rate measured in two halves, just before and just after the signer's phase, so that the
//!   host's drift over a run moves both sides alike);
//! - the signer's CPU time per request outside the HSM (signer process CPU per request minus the
//!   backend's own CPU per signature measured in-process);
//! - p50/p99 latency at half the sustainable load, beside the HSM's own p50/p99 (one signature
//!   at a time), and beside the HSM alone at the same load (the raw backend driven open loop at
//!   the same rate: at half load the device is busy half the time, and a signature that arrives
//!   meanwhile waits for the one in progress, signer or not).
//!
//! - the store's own floor beside them: `fdatasync` latency of a 4 KiB append in the store's
//!   directory, measured in the same run (the decision must be on disk before the HSM signs, so
//!   one such sync is in every request's latency).
//!
//! The closed-loop clients run at nice 19 (on this machine they share the signer's two cores;
//! in production they are other hosts); the open-loop latency clients at normal priority.
//!
//! Environment: `LOADGEN_SECONDS` (default 8) per phase; `LOADGEN_CLIENTS` (default 32) closed-
//! loop clients per HSM session: enough requests in flight to cover the decision's fsync
//! (milliseconds on a virtual disk) while the HSM signs others.
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::B256;
use castellan_signer::backend::KeyBackend;
use castellan_signer::backend::SignRequest;
use castellan_signer::backend::pkcs11::{PinSource, Pkcs11Backend, Pkcs11Config};
use castellan_tests::softhsm::{PIN_ENV, SoftHsmToken};

fn main() -> ExitCode {
    let token = match support::bench_token("castellan-loadgen", "loadgen") {
        Ok(token) => token,
        Err(code) => return code,
    };
    let secs: u64 = std::env::var("LOADGEN_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(&token, Duration::from_secs(secs)));
    ExitCode::SUCCESS
}

struct Raw {
    rate: f64,
    cpu_per_sign: Duration,
    p50: Duration,
    p99: Duration,
}

/// The backend in-process (no signer), with a key of its own.
async fn open_raw(
    token: &SoftHsmToken,
    sessions: usize,
    label: &str,
) -> (Arc<Pkcs11Backend>, castellan_signer::backend::KeyInfo) {
    let mut config = Pkcs11Config::new(
        token.module(),
        token.label(),
        PinSource::Env(PIN_ENV.into()),
    );
    config.sessions = sessions;
    config.sign_timeout = Duration::from_secs(10);
    let backend = Arc::new(Pkcs11Backend::open(&config).unwrap());
    let key = backend.generate(label).await.unwrap();
    (backend, key)
}

/// The raw backend's latency one signature at a time, for `dur`: (p50, p99).
async fn raw_latency(
    backend: &Pkcs11Backend,
    key: &castellan_signer::backend::KeyInfo,
    dur: Duration,
) -> (Duration, Duration) {
    let mut lat = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        let t = Instant::now();
        sign_random(backend, key).await;
        lat.push(t.elapsed());
    }
    lat.sort();
    (pct(&lat, 50.0), pct(&lat, 99.0))
}

/// The raw backend's throughput with enough concurrency to keep every session busy, for `dur`:
/// (signatures, wall time, this process's CPU time).
async fn raw_throughput(
    backend: &Arc<Pkcs11Backend>,
    key: &castellan_signer::backend::KeyInfo,
    sessions: usize,
    dur: Duration,
) -> (u64, Duration, Duration) {
    let count = Arc::new(AtomicU64::new(0));
    let cpu0 = self_cpu();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..(2 * sessions) {
        let b = backend.clone();
        let k = key.clone();
        let c = count.clone();
        tasks.push(tokio::spawn(async move {
            while t0.elapsed() < dur {
                sign_random(&b, &k).await;
                c.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (
        count.load(Ordering::Relaxed),
        t0.elapsed(),
        self_cpu() - cpu0,
    )
}

/// One signature of a random digest (panics on an error: the bench's backend must not fail).
async fn sign_random(backend: &Pkcs11Backend, key: &castellan_signer::backend::KeyInfo) {
    try_sign_random(backend, key).await.unwrap();
}

/// One signature of a random digest, or the backend's error.
async fn try_sign_random(
    backend: &Pkcs11Backend,
    key: &castellan_signer::backend::KeyInfo,
) -> Result<(), castellan_signer::backend::BackendError> {
    backend
        .sign(
            &key.key_ref,
            &key.public_key,
            SignRequest::digest(random_digest()),
        )
        .await
        .map(|_| ())
}

fn random_digest() -> B256 {
    use rand::RngCore;
    let mut d = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut d);
    B256::from(d)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[i]
}

/// CPU time (user + system) of a process, from /proc (clock ticks of 10 ms).
fn cpu_of(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// CPU time of every thread of a process: tid → (name, time).
fn thread_cpu(pid: &str) -> std::collections::HashMap<String, (String, Duration)> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let tid = e.file_name().to_string_lossy().into_owned();
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        out.insert(tid, (name, Duration::from_millis(ticks * 10)));
    }
    out
}

fn self_cpu() -> Duration {
    cpu_of("self")
}

struct Served {
    rate: f64,
    cpu_per_req: Duration,
    /// CPU per request of the signer's threads other than the device workers and verifiers.
    outside_threads: Duration,
}

async fn closed_loop(app: &support::Appliance, clients: usize, dur: Duration) -> Served {
    let count = Arc::new(AtomicU64::new(0));
    let nonce = Arc::new(AtomicU64::new(0));
    let pid = app.pid().unwrap().to_string();
    // Warm up connections.
    let conns: Vec<_> = (0..clients).map(|_| app.client(Some("alpha"))).collect();
    for c in &conns {
        let r = c
            .post(app.url("/v1/keys/hot/sign/transaction"))
            .json(&support::transfer(nonce.fetch_add(1, Ordering::Relaxed)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    }
    let cpu0 = cpu_of(&pid);
    let own0 = self_cpu();
    let threads0 = thread_cpu(&pid);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in conns {
        let url = app.url("/v1/keys/hot/sign/transaction");
        let count = count.clone();
        let nonce = nonce.clone();
        tasks.push(tokio::spawn(async move {
            while t0.elapsed() < dur {
                let r = c
                    .post(&url)
                    .json(&support::transfer(nonce.fetch_add(1, Ordering::Relaxed)))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
                let _ = r.bytes().await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = t0.elapsed();
    let cpu = cpu_of(&pid) - cpu0;
    let own = self_cpu() - own0;
    let n = count.load(Ordering::Relaxed);
    // Where the signer's CPU went, by thread name (µs per request).
    let mut by_name: std::collections::BTreeMap<String, Duration> = Default::default();
    for (tid, (name, t1)) in thread_cpu(&pid) {
        let t0 = threads0.get(&tid).map(|(_, t)| *t).unwrap_or_default();
        *by_name.entry(name).or_default() += t1.saturating_sub(t0);
    }
    let per: Vec<String> = by_name
        .iter()
        .filter(|(_, d)| !d.is_zero())
        .map(|(k, d)| format!("{k}={}µs", d.as_micros() / u128::from(n.max(1))))
        .collect();
    println!(
        "  signer CPU by thread per request ({clients} clients): {}",
        per.join(" ")
    );
    // The stricter reading of "outside the HSM call": every thread but the device's workers and
    // the verifiers that turn their `r‖s` into Ethereum signatures (part of the backend's `sign`
    // and of the raw rate). The subtraction above also removes what the raw phase's own callers
    // cost, so it reads lower than this.
    let outside_threads: Duration = by_name
        .iter()
        .filter(|(k, _)| !k.starts_with("pkcs11-worker") && !k.starts_with("pkcs11-verify"))
        .map(|(_, d)| *d)
        .sum::<Duration>()
        / u32::try_from(n.max(1)).unwrap();
    // The clients share the machine's cores with the signer: their cost bounds the ratio too.
    println!(
        "  load generator's own CPU per request (TLS client, HTTP, JSON): {}µs",
        own.as_micros() / u128::from(n.max(1))
    );
    Served {
        rate: n as f64 / elapsed.as_secs_f64(),
        cpu_per_req: cpu / u32::try_from(n.max(1)).unwrap(),
        outside_threads,
    }
}

/// The device alone at the signer's half-load rate: the raw backend (one session, in-process, no
/// signer, no store) driven open loop at `rate` signatures/s, paced as [`open_loop`] paces its
/// requests. At that load the device is busy about half the time, so a signature that arrives
/// while another is computed waits for it: this is the latency floor of any signer in front of
/// this device at this load. Latency percentiles and how many signatures.
///
/// A signature the backend refuses (its queue of 64 full: the machine stalled the device for
/// tens of milliseconds) is counted and reported, not timed; the bench goes on.
async fn raw_open_loop(
    token: &SoftHsmToken,
    rate: f64,
    dur: Duration,
) -> (Duration, Duration, usize) {
    let (backend, key) = open_raw(token, 1, "raw-open-loop").await;
    let lats = Arc::new(std::sync::Mutex::new(Vec::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let t0 = Instant::now();
    let mut next = t0;
    let mut tasks = Vec::new();
    while t0.elapsed() < dur {
        tokio::time::sleep_until(next.into()).await;
        next += interval;
        let (b, k, lats, refused) = (backend.clone(), key.clone(), lats.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            match try_sign_random(&b, &k).await {
                Ok(()) => {
                    let elapsed = t.elapsed();
                    lats.lock().unwrap().push(elapsed);
                }
                Err(castellan_signer::backend::BackendError::Unavailable(_)) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => panic!("raw backend signature failed: {e}"),
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let refused = refused.load(Ordering::Relaxed);
    if refused > 0 {
        println!(
            "  HSM alone at the same load: {refused} signatures refused by the backend's full queue (the machine stalled the device); the percentiles are of the others"
        );
    }
    let mut l = lats.lock().unwrap().clone();
    l.sort();
    (pct(&l, 50.0), pct(&l, 99.0), l.len())
}

/// Open loop at `rate` requests/s: latency percentiles.
async fn open_loop(
    app: &support::Appliance,
    rate: f64,
    dur: Duration,
) -> (Duration, Duration, usize) {
    let nonce = Arc::new(AtomicU64::new(1_000_000));
    let pool: Vec<_> = (0..16).map(|_| app.client(Some("alpha"))).collect();
    for c in &pool {
        let r = c
            .post(app.url("/v1/keys/hot/sign/transaction"))
            .json(&support::transfer(nonce.fetch_add(1, Ordering::Relaxed)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    // (latencies, answers that were not 200)
    let lats = Arc::new(std::sync::Mutex::new((Vec::new(), 0usize)));
    let t0 = Instant::now();
    let mut next = t0;
    let mut tasks = Vec::new();
    let mut i = 0usize;
    while t0.elapsed() < dur {
        tokio::time::sleep_until(next.into()).await;
        next += interval;
        let c = pool[i % pool.len()].clone();
        i += 1;
        let url = app.url("/v1/keys/hot/sign/transaction");
        let body = support::transfer(nonce.fetch_add(1, Ordering::Relaxed));
        let lats = lats.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = c
                .post(&url)
                .json(&body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("request failed: {e:?}"));
            let status = r.status().as_u16();
            let _ = r.bytes().await.unwrap();
            let elapsed = t.elapsed();
            let mut l = lats.lock().unwrap();
            l.0.push(elapsed);
            if status != 200 {
                l.1 += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (mut l, errors) = lats.lock().unwrap().clone();
    l.sort();
    if errors > 0 {
        println!(
            "  open loop: {errors} of {} requests were not answered 200",
            l.len()
        );
    }
    (pct(&l, 50.0), pct(&l, 99.0), l.len())
}

async fn run(token: &SoftHsmToken, dur: Duration) {
    let mut rows = Vec::new();
    let mut half_load = None;
    let mut raw_loaded = None;
    let per_session: usize = std::env::var("LOADGEN_CLIENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let mut sync = None;
    let mut stages = String::new();
    for sessions in [1usize, 2] {
        // The raw rate is measured in two halves, just before and just after the signer's phase,
        // and the ratio is taken against both together: the host's own speed drifts over a run
        // (by up to 15% within one, on this shared machine), and a drift then moves both sides
        // alike instead of the ratio.
        let (backend, key) = open_raw(token, sessions, &format!("raw-{sessions}")).await;
        let (p50, p99) = raw_latency(&backend, &key, dur / 4).await;
        let before = raw_throughput(&backend, &key, sessions, dur / 2).await;
        let app = support::Appliance::start_full(
            token,
            &["hot"],
            support::LOAD_POLICY,
            "[metrics]\nlisten = \"127.0.0.1:0\"\n",
            sessions,
        )
        .await;
        // The clients run on threads of their own at the lowest priority (nice 19): on this
        // machine they share the signer's two cores, where in production they run on other
        // hosts; so their CPU goes to the signer and the HSM first.
        let scrape0 = app.metrics().await;
        let served = tokio::task::block_in_place(|| {
            let generator = generator_runtime();
            let served = generator.block_on(closed_loop(&app, per_session * sessions, dur));
            // Dropped here, outside the async context (its threads end).
            drop(generator);
            served
        });
        let scrape1 = app.metrics().await;
        let after = raw_throughput(&backend, &key, sessions, dur / 2).await;
        drop(backend);
        let signs = before.0 + after.0;
        let raw = Raw {
            rate: signs as f64 / (before.1 + after.1).as_secs_f64(),
            cpu_per_sign: (before.2 + after.2) / u32::try_from(signs.max(1)).unwrap(),
            p50,
            p99,
        };
        println!(
            "  raw backend, {sessions} session(s): {:.0} signs/s before the signer's phase, {:.0} after",
            before.0 as f64 / before.1.as_secs_f64(),
            after.0 as f64 / after.1.as_secs_f64(),
        );
        let per_request = |name: &str| {
            let d = counter(&scrape1, name) - counter(&scrape0, name);
            d / (served.rate * dur.as_secs_f64()).max(1.0)
        };
        println!(
            "  store per request: {:.2} jobs, {:.3} commits, {:.3} WAL syncs, {:.4} checkpoints",
            per_request("castellan_signer_store_jobs_total"),
            per_request("castellan_signer_store_commits_total"),
            per_request("castellan_signer_store_syncs_total"),
            per_request("castellan_signer_store_checkpoints_total"),
        );
        if sessions == 1 {
            sync = Some(sync_latency(app.dir.path()));
            let before = app.metrics().await;
            let (p50, p99, n) = open_loop(&app, served.rate / 2.0, dur).await;
            let after = app.metrics().await;
            stages = stage_report(&before, &after);
            half_load = Some((served.rate / 2.0, p50, p99, n, raw.p50, raw.p99));
        }
        drop(app);
        if sessions == 1
            && let Some((rate, ..)) = half_load
        {
            raw_loaded = Some(raw_open_loop(token, rate, dur).await);
        }
        rows.push((sessions, raw, served));
    }
    println!();
    println!(
        "signer over mTLS (keep-alive, policy with 3 velocity windows + rate limit, durable audit) vs raw backend, same run"
    );
    println!("({per_session} closed-loop clients per session)");
    println!(
        "{:>8} {:>14} {:>14} {:>8} {:>18} {:>18} {:>22}",
        "sessions",
        "raw signs/s",
        "signer req/s",
        "ratio",
        "signer CPU/req",
        "outside-HSM CPU",
        "outside device threads"
    );
    for (sessions, raw, served) in &rows {
        let outside = served.cpu_per_req.saturating_sub(raw.cpu_per_sign);
        println!(
            "{:>8} {:>14.0} {:>14.0} {:>8.3} {:>15} µs {:>15} µs {:>19} µs",
            sessions,
            raw.rate,
            served.rate,
            served.rate / raw.rate,
            served.cpu_per_req.as_micros(),
            outside.as_micros(),
            served.outside_threads.as_micros(),
        );
    }
    if let Some((rate, p50, p99, n, hp50, hp99)) = half_load {
        println!();
        println!(
            "latency at half the sustainable load (1 session, {rate:.0} req/s open loop, {n} requests):"
        );
        println!(
            "  signer p50 {:>7} µs   p99 {:>7} µs",
            p50.as_micros(),
            p99.as_micros()
        );
        println!(
            "  HSM    p50 {:>7} µs   p99 {:>7} µs   (one backend signature at a time)",
            hp50.as_micros(),
            hp99.as_micros()
        );
        println!(
            "  added  p50 {:>7} µs   p99 {:>7} µs   (target: p99 added <= 1000 µs)",
            p50.saturating_sub(hp50).as_micros(),
            p99.saturating_sub(hp99).as_micros()
        );
        if let Some((lp50, lp99, ln)) = raw_loaded {
            println!(
                "  HSM alone at the same load: p50 {:>7} µs   p99 {:>7} µs   (raw backend, 1 session, the same open-loop rate, {ln} signatures: waits for the signature in progress)",
                lp50.as_micros(),
                lp99.as_micros()
            );
            println!(
                "  added to the HSM alone at the same load: p50 {:>7} µs   p99 {:>7} µs",
                p50.saturating_sub(lp50).as_micros(),
                p99.saturating_sub(lp99).as_micros()
            );
        }
    }
    // Machine-readable summary for scripts/bench: one `BENCH key=value` per line.
    for (sessions, raw, served) in &rows {
        let outside = served.cpu_per_req.saturating_sub(raw.cpu_per_sign);
        println!("BENCH loadgen.s{sessions}.raw_per_s={:.1}", raw.rate);
        println!("BENCH loadgen.s{sessions}.signer_per_s={:.1}", served.rate);
        println!(
            "BENCH loadgen.s{sessions}.ratio={:.4}",
            served.rate / raw.rate
        );
        println!(
            "BENCH loadgen.s{sessions}.cpu_per_req_us={}",
            served.cpu_per_req.as_micros()
        );
        println!(
            "BENCH loadgen.s{sessions}.outside_hsm_cpu_us={}",
            outside.as_micros()
        );
        println!(
            "BENCH loadgen.s{sessions}.outside_device_threads_cpu_us={}",
            served.outside_threads.as_micros()
        );
    }
    if let Some((rate, p50, p99, _, hp50, hp99)) = half_load {
        println!("BENCH loadgen.open_loop_per_s={rate:.1}");
        for (k, v) in [
            ("p50", p50),
            ("p99", p99),
            ("hsm_p50", hp50),
            ("hsm_p99", hp99),
        ] {
            println!("BENCH loadgen.{k}_us={}", v.as_micros());
        }
    }
    if let Some((lp50, lp99, _)) = raw_loaded {
        println!("BENCH loadgen.hsm_loaded_p50_us={}", lp50.as_micros());
        println!("BENCH loadgen.hsm_loaded_p99_us={}", lp99.as_micros());
    }
    print!("{stages}");
    if let Some((p50, p99)) = sync {
        println!(
            "  store  p50 {:>7} µs   p99 {:>7} µs   (fdatasync of a 4 KiB append in the store's directory: the floor of one durable commit)",
            p50.as_micros(),
            p99.as_micros()
        );
    }
}

/// A runtime for the closed-loop clients whose threads run at nice 19.
fn generator_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(|| {
            let tid = rustix::thread::gettid();
            if let Err(e) = rustix::process::setpriority_process(Some(tid), 19) {
                eprintln!("loadgen: cannot lower the client threads' priority: {e}");
            }
        })
        .build()
        .unwrap()
}

/// The signer's own per-stage p50/p99 during the open loop, from its `stage_seconds` histogram
/// (difference of two scrapes; a percentile is the upper bound of its bucket).
fn stage_report(before: &str, after: &str) -> String {
    let mut out = String::new();
    for stage in ["decision", "sign", "outcome"] {
        let label = format!("stage=\"{stage}\"");
        let q = |p: f64| {
            support::histogram_quantile(
                before,
                after,
                "castellan_signer_stage_seconds_bucket{",
                &label,
                p,
            )
        };
        if let (Some(p50), Some(p99)) = (q(0.5), q(0.99)) {
            out.push_str(&format!(
                "  stage {stage:<8} p50 <= {:>6.0} µs  p99 <= {:>6.0} µs\n",
                p50 * 1e6,
                p99 * 1e6
            ));
        }
    }
    out
}

/// The value of an unlabelled counter in a Prometheus text scrape (0 if absent).
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `fdatasync` latency of 4 KiB appends in `dir` (what one WAL commit with
/// `synchronous=FULL` waits for at least).
fn sync_latency(dir: &std::path::Path) -> (Duration, Duration) {
    use std::io::Write;
    let path = dir.join("sync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let page = [0x5au8; 4096];
    let mut lat = Vec::with_capacity(200);
    for _ in 0..200 {
        f.write_all(&page).unwrap();
        let t = Instant::now();
        f.sync_data().unwrap();
        lat.push(t.elapsed());
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    lat.sort();
    (pct(&lat, 50.0), pct(&lat, 99.0))
}
