//! Overload: the signer binary over mTLS at 10× its sustainable rate.
//!
//! `cargo bench -p castellan-signer --bench overload` (needs `source scripts/tools.sh`). Phases,
//! all against one signer process (2 HSM sessions, admission limits below):
//! 1. sustainable rate: closed loop, one client per place (`max_in_flight`),
//!    `OVERLOAD_WARM_SECONDS` (default 5);
//! 2. unloaded latency: open loop at 10 % of that rate for `OVERLOAD_LIGHT_SECONDS` (default 10),
//!    then the probe (below) alone at that rate for as long;
//! 3. overload: open loop at 10× that rate for `OVERLOAD_SECONDS` (default 60), over 512
//!    persistent connections of a lean HTTP/1.1 client (`Lean`: request bytes from a template, no
//!    client library — the generator shares the signer's cores here; a request for which no
//!    connection is idle is counted as "not sent", not as a signer answer), with the probe beside
//!    it at 10 % of the rate; phases 2 and 4 use the same client;
//! 4. right after: open loop at 10 % again for `OVERLOAD_LIGHT_SECONDS`;
//! 5. refusals only, for `OVERLOAD_REFUSAL_SECONDS` (default 5; 0 skips it): every place is held
//!    by a `/rpc` `eth_blockNumber` forwarded to an upstream node that never answers, and signing
//!    requests arrive at `OVERLOAD_REFUSAL_RATE`/s (default 4000; open loop, over
//!    `OVERLOAD_REFUSAL_CLIENTS` connections, default 32); every answer is a 503 `overloaded`, so
//!    the signer's CPU time divided by the answers is the cost of one refusal, with no signature
//!    to subtract (at a fixed rate, so that runs compare: the cost per answer falls as the rate
//!    rises, the runtime's threads sleeping and waking less per request). Then, as the floor of
//!    any answer, the same load on `POST /ready` (405 from the router, nothing else done).
//!
//! Prints p50/p99 of admitted (200) requests per phase, the count of 503 `overloaded` and other
//! answers, and the signer's RSS (VmRSS sampled every 100 ms, and VmHWM, from /proc/PID/status).
//! The targets (issue 8): admitted p99 at 10× within 2× the unloaded p99; RSS bounded; normal
//! service right after. The p99 ratio is printed three ways: as the flood's generator timed its
//! own requests, as the probe timed its requests (`Probe`: a client on its own thread at normal
//! niceness, as a strategy host on another machine would be), and from the signer's histograms.
//!
//! Environment: `OVERLOAD_SECONDS`, `OVERLOAD_WARM_SECONDS`, `OVERLOAD_LIGHT_SECONDS`,
//! `OVERLOAD_REFUSAL_SECONDS`, `OVERLOAD_REFUSAL_RATE`, `OVERLOAD_REFUSAL_CLIENTS`,
//! `OVERLOAD_IN_FLIGHT` (default 2: one per HSM session),
//! `OVERLOAD_QUEUE` (default 0), `OVERLOAD_QUEUE_WAIT` (default `"20ms"`).
//!
//! The generator stands for clients on other machines, but here it shares the cores with the
//! signer: at 10× it costs more CPU than the signer itself. So once the signer runs, the
//! benchmark moves every thread of its own process to nice 19 (the signer keeps the niceness
//! the benchmark was started with), and it reports the signer's CPU time per answer, which does
//! not depend on who else uses the machine.
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

use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use castellan_tests::softhsm::SoftHsmToken;
use serde_json::json;

fn main() -> ExitCode {
    let token = match support::bench_token("castellan-overload", "overload") {
        Ok(token) => token,
        Err(code) => return code,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(&token));
    ExitCode::SUCCESS
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Lighter than `support::LOAD_POLICY` (one velocity window and the rate limit, one key): the
/// figures of this bench are about admission under a flood, and were measured with it.
const POLICY: &str = r#"
[approval_domain]
chain_id = 31337

[defaults]
chain_ids = [31337]
allow_contract_creation = false
max_value = "10 ether"
max_gas_limit = 1_000_000
max_fee_per_gas = "100 gwei"
max_priority_fee_per_gas = "10 gwei"
max_cost = "20 ether"
personal_sign = true
typed_data = false

[[defaults.velocity]]
window = "1m"
max_value = "1000000 ether"

[[defaults.rate]]
window = "1s"
max_requests = 1000000

[[keys]]
name = "hot"

[[clients]]
identity = "spiffe://castellan/strategy/alpha"
keys = ["hot"]
"#;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[i]
}

/// CPU time (user + system) of a process, from /proc (clock ticks of 10 ms).
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// What one phase saw.
#[derive(Default)]
struct Phase {
    admitted: Vec<Duration>,
    overloaded: u64,
    other: std::collections::BTreeMap<String, u64>,
    not_sent: u64,
    sent: u64,
    elapsed: Duration,
}

impl Phase {
    fn line(&mut self, name: &str) -> String {
        self.admitted.sort();
        format!(
            "{name:<22} sent {:>7} ({:>6.0}/s)  200: {:>6}  p50 {:>6} µs  p99 {:>7} µs  503 overloaded: {:>7}  other: {:?}  not sent: {}",
            self.sent,
            self.sent as f64 / self.elapsed.as_secs_f64(),
            self.admitted.len(),
            pct(&self.admitted, 50.0).as_micros(),
            pct(&self.admitted, 99.0).as_micros(),
            self.overloaded,
            self.other,
            self.not_sent,
        )
    }
}

/// Closed loop: `clients` connections signing back to back; answers/s.
async fn sustainable(app: &support::Appliance, clients: usize, dur: Duration) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let nonce = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let c = app.client(Some("alpha"));
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
    count.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

/// Open loop at `rate`/s for `dur`, at most `outstanding` requests in flight from the generator.
async fn open_loop(
    clients: &[reqwest::Client],
    url: &str,
    rate: f64,
    dur: Duration,
    outstanding: usize,
    nonce: &Arc<AtomicU64>,
) -> Phase {
    let phase = Arc::new(Mutex::new(Phase::default()));
    let slots = Arc::new(tokio::sync::Semaphore::new(outstanding));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let t0 = Instant::now();
    let mut next = t0;
    let mut i = 0usize;
    let mut tasks = Vec::new();
    while t0.elapsed() < dur {
        // Catch up in bursts instead of sleeping below the timer's resolution.
        if next > Instant::now() {
            tokio::time::sleep_until(next.into()).await;
        }
        next += interval;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            phase.lock().unwrap().not_sent += 1;
            continue;
        };
        let c = clients[i % clients.len()].clone();
        i += 1;
        let url = url.to_owned();
        let body = support::transfer(nonce.fetch_add(1, Ordering::Relaxed));
        let phase = phase.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            let result = c.post(&url).json(&body).send().await;
            // (status, Retry-After present, error code) or the transport error kind.
            let outcome = match result {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let retry = r.headers().contains_key("retry-after");
                    let bytes = r.bytes().await.unwrap_or_default();
                    let code = serde_json::from_slice::<serde_json::Value>(&bytes)
                        .ok()
                        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    Ok((status, retry, code))
                }
                Err(e) => Err(if e.is_timeout() {
                    "timeout"
                } else {
                    "transport"
                }),
            };
            let elapsed = t.elapsed();
            let mut p = phase.lock().unwrap();
            p.sent += 1;
            match outcome {
                Ok((200, _, _)) => p.admitted.push(elapsed),
                Ok((503, true, code)) if code == "overloaded" => p.overloaded += 1,
                Ok((status, _, code)) => {
                    *p.other.entry(format!("{status} {code}")).or_default() += 1
                }
                Err(kind) => *p.other.entry(kind.to_owned()).or_default() += 1,
            }
        }));
        // Reap finished tasks now and then so the list stays small.
        if tasks.len() > 4 * outstanding {
            tasks.retain(|t| !t.is_finished());
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = t0.elapsed();
    let mut p = std::mem::take(&mut *phase.lock().unwrap());
    p.elapsed = elapsed;
    p
}

/// A lean client for the overload phases: `conns` persistent mTLS connections speaking plain
/// HTTP/1.1 with the request bytes written from a template — no client library, no JSON built or
/// parsed per request — so that the generator, which shares the signer's two cores here, costs
/// as little CPU as it can (in production the clients are other hosts). A request goes out on an
/// idle connection; when none is idle it is counted as not sent (open loop).
struct Lean {
    /// First in, first out: every connection is used in turn, so none stays idle long enough
    /// for the server to close it (hyper's 30 s header-read timeout covers idle keep-alive).
    idle: tokio::sync::Mutex<std::collections::VecDeque<LeanConn>>,
}

type LeanConn = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Where a [`Lean`] pool connects, as strategy client `alpha`.
#[derive(Clone)]
struct LeanTarget {
    tls: castellan_api::tls::ClientTlsConfig,
    addr: std::net::SocketAddr,
}

impl LeanTarget {
    fn of(app: &support::Appliance) -> Self {
        Self {
            tls: castellan_api::tls::ClientTlsConfig {
                server_ca: app.path("ca.pem"),
                cert: app.path("alpha.pem"),
                key: app.path("alpha.key"),
            },
            addr: app.addr,
        }
    }
}

impl Lean {
    async fn connect(target: &LeanTarget, conns: usize) -> Arc<Self> {
        let config = target.tls.build().unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut idle = std::collections::VecDeque::with_capacity(conns);
        for _ in 0..conns {
            let tcp = tokio::net::TcpStream::connect(target.addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            idle.push_back(connector.connect(name.clone(), tcp).await.unwrap());
        }
        Arc::new(Self {
            idle: tokio::sync::Mutex::new(idle),
        })
    }

    /// One request on `conn`: (status, Retry-After present, body, the server closes the
    /// connection after it) or an error.
    async fn request(
        conn: &mut LeanConn,
        head_and_body: &[u8],
    ) -> std::io::Result<(u16, bool, Vec<u8>, bool)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        conn.write_all(head_and_body).await?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or(std::io::ErrorKind::InvalidData)?;
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or(std::io::ErrorKind::InvalidData)?;
        let retry = head.contains("\r\nretry-after:");
        let closes = head.contains("\r\nconnection: close");
        while buf.len() < head_end + length {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok((
            status,
            retry,
            buf[head_end..head_end + length].to_vec(),
            closes,
        ))
    }
}

/// The HTTP/1.1 request signing a transaction with `nonce` (as [`tx`] builds it).
fn lean_request(path: &str, nonce: u64) -> Vec<u8> {
    let body = format!(
        r#"{{"tx":{{"chainId":"31337","nonce":"{nonce}","to":"{}","value":"1","gas":"21000","maxFeePerGas":"0x77359400","maxPriorityFeePerGas":"0x3b9aca00"}}}}"#,
        Address::repeat_byte(0x11)
    );
    format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// [`open_loop`] over a [`Lean`] pool.
async fn lean_open_loop(
    pool: &Arc<Lean>,
    path: &str,
    rate: f64,
    dur: Duration,
    nonce: &Arc<AtomicU64>,
) -> Phase {
    let phase = Arc::new(Mutex::new(Phase::default()));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let t0 = Instant::now();
    let mut next = t0;
    let mut tasks = Vec::new();
    while t0.elapsed() < dur {
        if next > Instant::now() {
            tokio::time::sleep_until(next.into()).await;
        }
        next += interval;
        let Some(mut conn) = pool.idle.lock().await.pop_front() else {
            phase.lock().unwrap().not_sent += 1;
            continue;
        };
        let request = lean_request(path, nonce.fetch_add(1, Ordering::Relaxed));
        let phase = phase.clone();
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let result = Lean::request(&mut conn, &request).await;
            let elapsed = t.elapsed();
            {
                let mut p = phase.lock().unwrap();
                p.sent += 1;
                match &result {
                    Ok((200, _, _, _)) => p.admitted.push(elapsed),
                    Ok((503, true, body, _))
                        if body.windows(12).any(|w| w == b"\"overloaded\"") =>
                    {
                        p.overloaded += 1
                    }
                    Ok((status, _, _, _)) => *p.other.entry(format!("{status}")).or_default() += 1,
                    Err(e) => *p.other.entry(format!("{:?}", e.kind())).or_default() += 1,
                }
            }
            // A connection that failed, or that the server closes after its answer (hyper does
            // when a refused request's body had not arrived with its head), is dropped; the pool
            // shrinks (a request finding no idle connection is reported as not sent).
            if matches!(result, Ok((_, _, _, false))) {
                pool.idle.lock().await.push_back(conn);
            }
        }));
        if tasks.len() > 4096 {
            tasks.retain(|t| !t.is_finished());
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut p = std::mem::take(&mut *phase.lock().unwrap());
    p.elapsed = t0.elapsed();
    p
}

/// A client that is not the flood: its own thread, runtime and [`Lean`] connections, at the
/// niceness the benchmark was started with (the generator's threads go to nice 19, see the
/// module docs). It stands for a strategy host on another machine, whose clock reads an answer
/// when it arrives: the flood's own generator, starved of CPU at nice 19 by the load it makes,
/// times its answers late, and that delay is in its p99. The probe sends at the unloaded phase's
/// rate, alone for the unloaded figure and beside the flood for the overload figure; its
/// requests are admitted or refused like any other, so its admitted ones are a sample of the
/// admitted requests.
struct Probe {
    commands: tokio::sync::mpsc::UnboundedSender<(f64, Duration, std::sync::mpsc::Sender<Phase>)>,
    /// The probe thread's id, which the renice loop leaves alone.
    tid: String,
}

impl Probe {
    const CONNECTIONS: usize = 16;

    fn start(target: LeanTarget) -> Self {
        let (commands, mut rx) = tokio::sync::mpsc::unbounded_channel::<(
            f64,
            Duration,
            std::sync::mpsc::Sender<Phase>,
        )>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || {
                tid_tx
                    .send(rustix::thread::gettid().as_raw_nonzero().to_string())
                    .unwrap();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let pool = Lean::connect(&target, Self::CONNECTIONS).await;
                    // Nonces of their own: the generator's start at 10 000 000.
                    let nonce = Arc::new(AtomicU64::new(500_000_000));
                    while let Some((rate, dur, reply)) = rx.recv().await {
                        let phase = lean_open_loop(&pool, PATH, rate, dur, &nonce).await;
                        let _ = reply.send(phase);
                    }
                });
            })
            .unwrap();
        Self {
            commands,
            tid: tid_rx.recv().unwrap(),
        }
    }

    /// Starts a phase at `rate`/s for `dur`; its [`Phase`] comes on the returned channel.
    fn phase(&self, rate: f64, dur: Duration) -> std::sync::mpsc::Receiver<Phase> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.commands.send((rate, dur, tx)).unwrap();
        rx
    }
}

/// The route every phase signs on.
const PATH: &str = "/v1/keys/hot/sign/transaction";

/// An upstream node that accepts connections and never answers, until `release` is notified:
/// then it closes them, and the forwarded calls waiting on it fail at once. [`Stall::holding`]
/// counts the forwarded requests it holds now (head received, connection still open).
struct Stall {
    addr: std::net::SocketAddr,
    holding: Arc<AtomicU64>,
}

impl Stall {
    async fn start(release: Arc<tokio::sync::Notify>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let holding = Arc::new(AtomicU64::new(0));
        let count = holding.clone();
        tokio::spawn(async move {
            // One task per connection, so that every forwarded request is read as it comes; all
            // are aborted (their connections closed) when the set is dropped.
            let mut held = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    a = listener.accept() => match a {
                        Ok((tcp, _)) => {
                            held.spawn(hold(tcp, count.clone()));
                        }
                        Err(_) => break,
                    },
                    () = release.notified() => break,
                }
            }
            drop(held);
        });
        Self { addr, holding }
    }

    fn holding(&self) -> u64 {
        self.holding.load(Ordering::Relaxed)
    }
}

/// Reads a forwarded request's head, counts it as held, and never answers; uncounts it if the
/// signer closes the connection.
async fn hold(mut tcp: tokio::net::TcpStream, holding: Arc<AtomicU64>) {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut counted = false;
    loop {
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) if !counted => {
                seen.extend_from_slice(&chunk[..n]);
                if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    counted = true;
                    holding.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(_) => {}
        }
    }
    if counted {
        holding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One forwarded read (`eth_blockNumber` on `/rpc`) meant to hold a place until the upstream
/// node is released: what it got, if it ends before.
fn stalled_read(app: &support::Appliance, id: usize) -> tokio::task::JoinHandle<String> {
    let c = app.client(Some("alpha"));
    let url = app.url("/rpc");
    tokio::spawn(async move {
        let r = c
            .post(&url)
            .json(&json!({"jsonrpc": "2.0", "id": id, "method": "eth_blockNumber", "params": []}))
            .send()
            .await;
        match r {
            Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => format!("transport error: {e}"),
        }
    })
}

/// Phase 5: every place held by a stalled forwarded read, then signing requests at `rate`/s
/// (open loop) over `clients` connections for `dur`: what they got, and the signer's CPU.
#[allow(clippy::too_many_arguments)]
async fn refusals_only(
    app: &support::Appliance,
    pid: u32,
    in_flight: usize,
    queue: usize,
    clients: usize,
    rate: f64,
    dur: Duration,
    upstream: &Stall,
    release: &Arc<tokio::sync::Notify>,
) -> (Phase, Duration) {
    // Take every place with forwarded reads that do not come back, and know that they hold them
    // from the upstream node's side (the requests it holds), not by probing with signing
    // requests: a probe takes a place itself, and a stalled read arriving while it is signed is
    // refused (503, queue 0), leaving a place free for good after the probe.
    let mut holders: Vec<_> = (0..in_flight).map(|i| stalled_read(app, i)).collect();
    // What the reads that ended got, and how many times.
    let mut ended = std::collections::BTreeMap::<String, usize>::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.holding() < in_flight as u64 {
        // A read that ended (refused, or its connection failed) holds nothing: send another.
        for (i, h) in holders.iter_mut().enumerate() {
            if h.is_finished() {
                let got = std::mem::replace(h, stalled_read(app, i)).await.unwrap();
                *ended.entry(got).or_default() += 1;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the stalled reads do not hold the places: the upstream node holds {} of {in_flight} forwarded reads; reads that ended: {ended:?}",
            upstream.holding(),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if !ended.is_empty() {
        println!(
            "refusals only: {} stalled reads ended before holding a place and were sent again: {ended:?}",
            ended.values().sum::<usize>()
        );
    }
    let probe = app.client(Some("alpha"));
    let url = app.url("/v1/keys/hot/sign/transaction");
    let r = probe
        .post(&url)
        .json(&support::transfer(1))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        503,
        "a signing request with every place held by a stalled read"
    );
    println!("refusals only: {in_flight} places held by stalled forwarded reads, queue {queue}");
    let conns: Vec<reqwest::Client> = (0..clients).map(|_| app.client(Some("alpha"))).collect();
    // Connect them first: the phase measures refusals, not handshakes.
    for c in &conns {
        let _ = c.get(app.url("/ready")).send().await.unwrap().bytes().await;
    }
    let nonce = Arc::new(AtomicU64::new(20_000_000));
    let cpu0 = cpu_of(pid);
    let phase = open_loop(&conns, &url, rate, dur, 512, &nonce).await;
    let cpu = cpu_of(pid).saturating_sub(cpu0);
    release.notify_one();
    for h in holders {
        let _ = h.await;
    }
    // The floor, for comparison: the same requests to a route that does nothing with them
    // (`POST /ready` is answered 405 by the router, body unread), at the same rate on the same
    // connections — what any answer costs in TLS, HTTP and the kernel.
    let cpu0 = cpu_of(pid);
    let floor = open_loop(&conns, &app.url("/ready"), rate, dur, 512, &nonce).await;
    let floor_cpu = cpu_of(pid).saturating_sub(cpu0);
    println!(
        "floor: POST /ready at the same rate: {} answered ({:?}), signer CPU {:.2} s, {:.1} µs per answer",
        floor.sent,
        floor.other,
        floor_cpu.as_secs_f64(),
        floor_cpu.as_secs_f64() * 1e6 / (floor.sent.max(1) as f64),
    );
    (phase, cpu)
}

async fn run(token: &SoftHsmToken) {
    let secs: u64 = env_or("OVERLOAD_SECONDS", 60);
    let warm: u64 = env_or("OVERLOAD_WARM_SECONDS", 5);
    let light_secs: u64 = env_or("OVERLOAD_LIGHT_SECONDS", 10);
    // Latency-first limits (deploy/signer.toml explains the trade-off): one place per HSM
    // session and no queue; OVERLOAD_IN_FLIGHT=8 OVERLOAD_QUEUE=8 shows the throughput-first side.
    let in_flight: usize = env_or("OVERLOAD_IN_FLIGHT", 2);
    let queue: usize = env_or("OVERLOAD_QUEUE", 0);
    let wait: String = env_or("OVERLOAD_QUEUE_WAIT", "20ms".to_owned());
    let refusal_secs: u64 = env_or("OVERLOAD_REFUSAL_SECONDS", 5);
    let refusal_clients: usize = env_or("OVERLOAD_REFUSAL_CLIENTS", 32);
    let refusal_rate: f64 = env_or("OVERLOAD_REFUSAL_RATE", 4000.0);
    // The upstream node of phase 5 (unused before it).
    let release = Arc::new(tokio::sync::Notify::new());
    let upstream = Stall::start(release.clone()).await;
    let extra = format!(
        "[upstream]\nurl = \"http://{}\"\ntimeout = \"120s\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        upstream.addr
    );
    let mut app = support::Appliance::start_full(token, &["hot"], POLICY, &extra, 2).await;
    // The admission limits under test, in signer.toml's [limits] table.
    app.kill();
    let path = app.path("signer.toml");
    let config = std::fs::read_to_string(&path).unwrap();
    let limits = format!("max_in_flight = {in_flight}\nqueue = {queue}\nqueue_wait = \"{wait}\"\n");
    std::fs::write(
        &path,
        config.replace("\n[limits]\n", &format!("\n[limits]\n{limits}")),
    )
    .unwrap();
    app.spawn();
    let pid = app.pid().unwrap();
    // Started before the renice below, which leaves its thread alone.
    let probe = Probe::start(LeanTarget::of(&app));
    // The generator below the signer (see the module docs): every thread of this process but
    // the probe's.
    let mut reniced = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if task.file_name().to_string_lossy() == probe.tid {
            continue;
        }
        let ok = Command::new("renice")
            .args(["-n", "19", "-p"])
            .arg(task.file_name())
            .output()
            .is_ok_and(|o| o.status.success());
        reniced += usize::from(ok);
    }
    println!("generator threads moved to nice 19: {reniced}");
    println!(
        "signer pid {pid}, 2 HSM sessions, limits: max_in_flight {in_flight}, queue {queue}, queue_wait {wait}"
    );

    // As many clients as places: none is refused, every place is kept busy. The signer's CPU
    // per signature here (no refusal at all) lets the overload phase's CPU be split between
    // signatures and refusals.
    let cpu_warm0 = cpu_of(pid);
    let t_warm = Instant::now();
    let rate = sustainable(&app, in_flight, Duration::from_secs(warm)).await;
    let signatures = rate * t_warm.elapsed().as_secs_f64();
    let cpu_per_signature =
        cpu_of(pid).saturating_sub(cpu_warm0).as_secs_f64() / signatures.max(1.0);
    let (rss0, _) = rss_kib(pid);
    println!(
        "sustainable (closed loop, {in_flight} clients): {rate:.0} signatures/s; signer RSS {} MiB",
        rss0 / 1024
    );
    let nonce = Arc::new(AtomicU64::new(10_000_000));
    // The same lean generator for every phase whose latencies are compared (see `Lean`).
    let lean = Lean::connect(&LeanTarget::of(&app), 512).await;
    let scrape0 = app.metrics().await;
    let mut unloaded = lean_open_loop(
        &lean,
        PATH,
        rate / 10.0,
        Duration::from_secs(light_secs),
        &nonce,
    )
    .await;
    // The probe alone at the same rate: its unloaded figure.
    let mut probe_unloaded = tokio::task::block_in_place(|| {
        probe
            .phase(rate / 10.0, Duration::from_secs(light_secs))
            .recv()
            .unwrap()
    });

    // RSS sampler for the overload phase.
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let stop = stop.clone();
        let samples = samples.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                samples.lock().unwrap().push(rss_kib(pid).0);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let scrape1 = app.metrics().await;
    let cpu0 = cpu_of(pid);
    let t_over = Instant::now();
    // The probe beside the flood, for as long.
    let probe_beside = probe.phase(rate / 10.0, Duration::from_secs(secs));
    let mut overload =
        lean_open_loop(&lean, PATH, rate * 10.0, Duration::from_secs(secs), &nonce).await;
    let over_wall = t_over.elapsed();
    let mut probe_overload = tokio::task::block_in_place(|| probe_beside.recv().unwrap());
    let over_cpu = cpu_of(pid).saturating_sub(cpu0);
    let scrape2 = app.metrics().await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let samples = samples.lock().unwrap().clone();
    let (rss_end, hwm) = rss_kib(pid);
    let mut after = lean_open_loop(
        &lean,
        PATH,
        rate / 10.0,
        Duration::from_secs(light_secs),
        &nonce,
    )
    .await;
    let still_running = std::path::Path::new(&format!("/proc/{pid}")).exists();

    println!();
    println!("{}", unloaded.line("unloaded (10 %)"));
    println!("{}", overload.line("overload (10x)"));
    println!("{}", after.line("right after (10 %)"));
    let (u99, o99) = (pct(&unloaded.admitted, 99.0), pct(&overload.admitted, 99.0));
    println!();
    println!(
        "admitted p99 at 10x / unloaded p99: {} µs / {} µs = {:.2} (target <= 2)",
        o99.as_micros(),
        u99.as_micros(),
        o99.as_secs_f64() / u99.as_secs_f64().max(1e-9)
    );
    println!("{}", probe_unloaded.line("probe, unloaded"));
    println!("{}", probe_overload.line("probe, beside the 10x"));
    let (pu99, po99) = (
        pct(&probe_unloaded.admitted, 99.0),
        pct(&probe_overload.admitted, 99.0),
    );
    println!(
        "probe (a client at the benchmark's own niceness, not the flood's generator): admitted p99 at 10x / unloaded p99: {} µs / {} µs = {:.2} (target <= 2; {} admitted of {} sent beside the flood)",
        po99.as_micros(),
        pu99.as_micros(),
        po99.as_secs_f64() / pu99.as_secs_f64().max(1e-9),
        probe_overload.admitted.len(),
        probe_overload.sent,
    );
    // The same requests as the signer itself timed them (its histograms: handler start to
    // answer; the pipeline's stages), without the generator's own waiting for CPU at nice 19.
    for (name, metric, label) in [
        (
            "handler",
            "castellan_signer_request_seconds_bucket{",
            "route=\"transaction\"",
        ),
        (
            "decision",
            "castellan_signer_stage_seconds_bucket{",
            "stage=\"decision\"",
        ),
        (
            "sign",
            "castellan_signer_stage_seconds_bucket{",
            "stage=\"sign\"",
        ),
        (
            "outcome",
            "castellan_signer_stage_seconds_bucket{",
            "stage=\"outcome\"",
        ),
    ] {
        let q = |a: &str, b: &str| {
            support::histogram_quantile(a, b, metric, label, 0.99).unwrap_or(f64::NAN)
        };
        let (u, o) = (q(&scrape0, &scrape1), q(&scrape1, &scrape2));
        println!(
            "signer-side {name:<8} p99 <= {:>8.0} µs unloaded, <= {:>8.0} µs at 10x ({:.1}x)",
            u * 1e6,
            o * 1e6,
            o / u.max(1e-9)
        );
    }
    println!(
        "overload: {:.0} s, {} answered 200 ({:.0}/s), {} answered 503 overloaded, {} other, {} not sent by the generator",
        over_wall.as_secs_f64(),
        overload.admitted.len(),
        overload.admitted.len() as f64 / over_wall.as_secs_f64(),
        overload.overloaded,
        overload.other.values().sum::<u64>(),
        overload.not_sent,
    );
    let answers = overload.admitted.len() as u64 + overload.overloaded;
    println!(
        "signer CPU during the overload: {:.1} s in {:.0} s ({:.2} cores), {} µs per answer",
        over_cpu.as_secs_f64(),
        over_wall.as_secs_f64(),
        over_cpu.as_secs_f64() / over_wall.as_secs_f64(),
        over_cpu.as_micros() / u128::from(answers.max(1)),
    );
    // What is left once the admitted signatures are paid at the closed-loop price.
    let refusal_cpu =
        (over_cpu.as_secs_f64() - cpu_per_signature * overload.admitted.len() as f64).max(0.0);
    println!(
        "signer CPU per signature (closed loop, no refusal): {:.0} µs; so per 503 refusal ≈ {:.0} µs ({:.1} s of the {:.1} s)",
        cpu_per_signature * 1e6,
        refusal_cpu * 1e6 / (overload.overloaded.max(1) as f64),
        refusal_cpu,
        over_cpu.as_secs_f64(),
    );
    println!(
        "signer RSS: {} MiB before, peak sampled {} MiB during, {} MiB at the end, VmHWM {} MiB; still running: {still_running}",
        rss0 / 1024,
        samples.iter().max().copied().unwrap_or(0) / 1024,
        rss_end / 1024,
        hwm / 1024,
    );
    println!(
        "right after: {} of {} answered 200, p99 {} µs",
        after.admitted.len(),
        after.sent,
        pct(&after.admitted, 99.0).as_micros()
    );
    if refusal_secs > 0 {
        let (mut phase, cpu) = refusals_only(
            &app,
            pid,
            in_flight,
            queue,
            refusal_clients,
            refusal_rate,
            Duration::from_secs(refusal_secs),
            &upstream,
            &release,
        )
        .await;
        println!("{}", phase.line("refusals only"));
        println!(
            "refusals only ({refusal_clients} connections, {refusal_rate:.0}/s for {refusal_secs} s): signer CPU {:.2} s, {:.1} µs per answer ({} answered, {} of them 503 overloaded)",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / (phase.sent.max(1) as f64),
            phase.sent,
            phase.overloaded,
        );
    }
}
