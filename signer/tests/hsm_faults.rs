//! HSM faults under load, against the real signer binary: its PKCS#11 sessions are closed (and
//! the token logged out) from outside the process, and the token is made unavailable and then
//! available again. Requests must fail fast with a stable code and 503 while the token is away,
//! `/ready` must turn false, and the signer must recover by itself — no restart — with every
//! signature it ever answers made by the registered key.
//!
//! # How the faults are made
//! - **Sessions closed and logged out from outside**: SoftHSM keeps sessions and the login in the
//!   process that opened them, so no other process can end them through PKCS#11. The test does
//!   what an operator's debugger (or a broken module) would: it attaches `gdb` to the running
//!   signer and calls SoftHSM's own `C_CloseAllSessions(slot)` inside it, which closes every
//!   session of the process on that token and logs the user out.
//! - **Token unavailable**: the token's directory is renamed away (SoftHSM re-reads its object
//!   files and notices they are gone; file permissions would not stop root), and renamed back.
//!
//! Needs `gdb` (installed by `scripts/tools.sh`) and ptrace rights over a child process (root, or
//! Yama `ptrace_scope` 0/1); the test fails with a message saying so when either is missing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::consensus::TxEnvelope;
use alloy::eips::Decodable2718;
use alloy::primitives::Address;
use castellan_tests::softhsm::{SoftHsmToken, in_own_process};
use serde_json::Value;
use support::{Appliance, policy_toml, runtime};

fn policy() -> String {
    policy_toml(&[0x41, 0x42, 0x43].map(Address::repeat_byte))
}

/// One answered request of the load.
#[derive(Clone, Debug)]
struct Answer {
    /// When it was sent, from the start of the load.
    sent: Duration,
    latency: Duration,
    status: u16,
    code: Option<String>,
    retry_after: Option<String>,
    message: Option<String>,
    /// For 200: the address the signed transaction recovers to.
    signer: Option<Address>,
}

/// The slot id SoftHSM gives the token (its slot ids are stable for a token across processes).
fn slot_of(token: &SoftHsmToken) -> u64 {
    let out = token.softhsm_util().arg("--show-slots").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut slot = None;
    for line in text.lines() {
        if let Some(n) = line.trim().strip_prefix("Slot ")
            && let Ok(n) = n.trim().parse::<u64>()
        {
            slot = Some(n);
        }
        if line.contains("Label:") && line.contains(token.label()) {
            return slot.unwrap_or_else(|| panic!("no slot line before the label in:\n{text}"));
        }
    }
    panic!(
        "token {} not in softhsm2-util --show-slots:\n{text}",
        token.label()
    );
}

/// gdb's Python: stop the process, and only if no thread is inside the PKCS#11 module call
/// `C_CloseAllSessions(slot)` with every other thread held (SoftHSM frees a session when it is
/// closed, so closing it under a thread that is inside a call on it would crash the module
/// itself, which is not the fault under test).
const GDB_CLOSE: &str = r#"
import gdb
busy = []
for t in gdb.selected_inferior().threads():
    t.switch()
    f = gdb.newest_frame()
    depth = 0
    while f is not None and depth < 64:
        so = gdb.solib_name(f.pc())
        if so and "softhsm" in so:
            busy.append(t.name)
            break
        try:
            f = f.older()
        except gdb.error:
            break
        depth += 1
if busy:
    print("CASTELLAN-BUSY " + ",".join(str(b) for b in busy))
else:
    gdb.execute("set scheduler-locking on")
    rv = gdb.parse_and_eval("(unsigned long) C_CloseAllSessions((unsigned long) SLOT)")
    print("CASTELLAN-RV " + str(rv))
"#;

/// Calls `C_CloseAllSessions(slot)` inside the process `pid` through gdb, at an instant when no
/// thread of it is inside the module; `attempts` tries. Returns the CK_RV and the attempts used.
fn close_all_sessions_from_outside(pid: u32, slot: u64, attempts: usize) -> (String, usize) {
    let script = std::env::temp_dir().join(format!("castellan-gdb-close-{pid}.py"));
    std::fs::write(&script, GDB_CLOSE.replace("SLOT", &slot.to_string())).unwrap();
    let mut last = String::new();
    for attempt in 1..=attempts {
        let out = Command::new("gdb")
            .args(["-p", &pid.to_string(), "-batch", "-nx"])
            .args(["-ex", "set confirm off", "-ex", "set pagination off"])
            .arg("-x")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run gdb ({e}): install it (scripts/tools.sh does) to run this test")
            });
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if let Some(rv) = stdout.lines().find_map(|l| l.strip_prefix("CASTELLAN-RV ")) {
            let _ = std::fs::remove_file(&script);
            return (rv.trim().to_owned(), attempt);
        }
        if !stdout.contains("CASTELLAN-BUSY") {
            panic!(
                "gdb could not attach to the signer or run its Python (ptrace refused? gdb without Python?):\n{stdout}\n{stderr}"
            );
        }
        last = stdout;
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no instant without a thread inside the module in {attempts} attempts:\n{last}");
}

async fn ready(app: &Appliance, client: &reqwest::Client) -> bool {
    match client.get(app.url("/ready")).send().await {
        Ok(r) => r.status().as_u16() == 200,
        Err(_) => false,
    }
}

/// Sign in a loop on `clients` connections until `stop`; at most `max` requests in all.
fn start_load(
    app: &Appliance,
    clients: usize,
    max: usize,
    t0: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<tokio::task::JoinHandle<()>>, Arc<Mutex<Vec<Answer>>>) {
    let answers = Arc::new(Mutex::new(Vec::new()));
    let nonce = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let c = app.client(Some("alpha"));
        let url = app.url("/v1/keys/hot/sign/transaction");
        let answers = answers.clone();
        let stop = stop.clone();
        let nonce = nonce.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && answers.lock().unwrap().len() < max
            {
                let n = nonce.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let sent = t0.elapsed();
                let t = Instant::now();
                let r = match c.post(&url).json(&support::transfer(n)).send().await {
                    Ok(r) => r,
                    Err(e) => {
                        answers.lock().unwrap().push(Answer {
                            sent,
                            latency: t.elapsed(),
                            status: 0,
                            code: Some(format!("transport: {e}")),
                            retry_after: None,
                            message: None,
                            signer: None,
                        });
                        break;
                    }
                };
                let status = r.status().as_u16();
                let retry_after = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_owned());
                let body: Value = r.json().await.unwrap_or(Value::Null);
                let latency = t.elapsed();
                let signer = (status == 200).then(|| {
                    let raw = hex::decode(body["raw"].as_str().unwrap().trim_start_matches("0x"))
                        .unwrap();
                    let env = TxEnvelope::decode_2718(&mut raw.as_slice()).unwrap();
                    alloy::consensus::transaction::SignerRecoverable::recover_signer(&env).unwrap()
                });
                let code = body["error"]["code"].as_str().map(str::to_owned);
                let message = body["error"]["message"].as_str().map(str::to_owned);
                answers.lock().unwrap().push(Answer {
                    sent,
                    latency,
                    status,
                    code,
                    retry_after,
                    message,
                    signer,
                });
                // Bounded load: a pause between requests (and no spinning on fast refusals).
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    (tasks, answers)
}

fn summary(answers: &[Answer], from: Duration, to: Duration) -> String {
    let mut by: std::collections::BTreeMap<String, (usize, Duration)> = Default::default();
    for a in answers.iter().filter(|a| a.sent >= from && a.sent < to) {
        let k = format!(
            "{} {} [{}]",
            a.status,
            a.code.clone().unwrap_or_default(),
            a.message.clone().unwrap_or_default()
        );
        let e = by.entry(k).or_default();
        e.0 += 1;
        e.1 = e.1.max(a.latency);
    }
    by.iter()
        .map(|(k, (n, max))| format!("{k}: {n} (slowest {} ms)", max.as_millis()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a refusal made while the token was lost: 503, a stable code, a reason, Retry-After.
fn assert_hsm_refusal(a: &Answer) {
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(a.code.as_deref(), Some("hsm_unavailable"), "{a:?}");
    assert!(a.retry_after.is_some(), "no Retry-After: {a:?}");
    assert!(a.message.as_deref().is_some_and(|m| !m.is_empty()), "{a:?}");
}

#[test]
fn hsm_faults_under_load_fail_fast_and_recover_without_restart() {
    in_own_process(
        "hsm_faults_under_load_fail_fast_and_recover_without_restart",
        "hsmfaults",
        |token| {
            runtime().block_on(async {
                let app = Appliance::start(token, &["hot"], &policy()).await;
                let key = app.keys["hot"];
                let pid = app.pid().unwrap();
                let slot = slot_of(token);
                let probe = app.client(Some("alpha"));
                assert!(ready(&app, &probe).await);

                let t0 = Instant::now();
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                // Bounded: 4 clients, 10 ms between requests, at most 20 000 requests.
                let (tasks, answers) = start_load(&app, 4, 20_000, t0, stop.clone());
                tokio::time::sleep(Duration::from_millis(500)).await;

                // 1. Sessions closed and the user logged out, from outside the process. gdb
                //    holds the process stopped while it attaches (seconds), so latencies are
                //    judged from its detach on.
                let closed_at = t0.elapsed();
                let (rv, tries) = close_all_sessions_from_outside(pid, slot, 20);
                assert_eq!(rv, "0", "C_CloseAllSessions returned CK_RV {rv}");
                let detached_at = t0.elapsed();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let after_close = t0.elapsed();

                // 2. The token goes away.
                let object_dir = token.token_object_dir().unwrap();
                let away = token.root().join("unplugged");
                std::fs::rename(&object_dir, &away).unwrap();
                let gone_at = t0.elapsed();
                let mut not_ready_after = None;
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    if !ready(&app, &probe).await {
                        not_ready_after = Some(t0.elapsed() - gone_at);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let not_ready_after =
                    not_ready_after.expect("/ready stayed true for 5 s after the token went away");
                tokio::time::sleep(Duration::from_millis(1500)).await;
                assert!(!ready(&app, &probe).await, "/ready true while the token is away");

                // 3. The token comes back: no restart, the signer recovers by itself.
                std::fs::rename(&away, &object_dir).unwrap();
                let back_at = t0.elapsed();
                let mut ready_after = None;
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    if ready(&app, &probe).await {
                        ready_after = Some(t0.elapsed() - back_at);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let ready_after =
                    ready_after.expect("/ready not true within 5 s of the token coming back");
                tokio::time::sleep(Duration::from_millis(1000)).await;
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                for t in tasks {
                    t.await.unwrap();
                }
                let answers = answers.lock().unwrap().clone();
                println!("before the faults: {}", summary(&answers, Duration::ZERO, closed_at));
                println!("sessions closed:   {}", summary(&answers, closed_at, after_close));
                println!("token away:        {}", summary(&answers, gone_at, back_at));
                println!("token back:        {}", summary(&answers, back_at, Duration::MAX));

                // The same process served throughout.
                assert_eq!(app.pid(), Some(pid));
                assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
                assert_eq!(app.stderr().matches("signer ready").count(), 1, "restarted?");
                assert!(app.stderr().contains("C_CloseAllSessions") || app.stderr().contains("CKR_SESSION_HANDLE_INVALID"),
                    "the signer did not log the closed sessions:\n{}", app.stderr());
                assert!(app.stderr().contains("no token labelled"),
                    "the signer did not log the missing token:\n{}", app.stderr());

                // Every answer is a signature by the registered key or a 503 with a stable
                // code and Retry-After; never a transport error, never another error class.
                for a in &answers {
                    match a.status {
                        200 => assert_eq!(a.signer, Some(key), "a signature by another key: {a:?}"),
                        _ => assert_hsm_refusal(a),
                    }
                }
                let ok = |from: Duration, to: Duration| {
                    answers
                        .iter()
                        .filter(|a| a.status == 200 && a.sent >= from && a.sent < to)
                        .count()
                };
                assert!(ok(Duration::ZERO, closed_at) > 0, "nothing signed before the faults");
                assert!(ok(detached_at, after_close) > 0, "no signature after the sessions were closed");
                // While the token is away (after the signer noticed): fail fast, nothing signed.
                let away_answers: Vec<&Answer> = answers
                    .iter()
                    .filter(|a| a.sent >= gone_at + not_ready_after && a.sent + a.latency < back_at)
                    .collect();
                assert!(away_answers.len() > 20, "too few requests while away: {}", away_answers.len());
                for a in &away_answers {
                    assert_hsm_refusal(a);
                    assert!(a.latency < Duration::from_millis(500), "not fast: {a:?}");
                }
                let mut away_lat: Vec<Duration> = away_answers.iter().map(|a| a.latency).collect();
                away_lat.sort();
                let first_ok = answers
                    .iter()
                    .filter(|a| a.status == 200 && a.sent + a.latency >= back_at)
                    .map(|a| a.sent + a.latency - back_at)
                    .min()
                    .expect("nothing signed after the token came back");
                assert!(first_ok < Duration::from_secs(5), "{first_ok:?}");
                println!(
                    "HSM faults: C_CloseAllSessions from outside after {tries} gdb attempt(s); \
                     /ready false {} ms after the token went away; {} refusals while away, p99 {} ms; \
                     /ready true {} ms and first signature {} ms after the token came back",
                    not_ready_after.as_millis(),
                    away_lat.len(),
                    away_lat[(away_lat.len() - 1) * 99 / 100].as_millis(),
                    ready_after.as_millis(),
                    first_ok.as_millis(),
                );
            });
        },
    );
}
