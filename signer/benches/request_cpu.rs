//! Deterministic CPU cost of one signing request, by thread: the release signer binary runs
//! under `valgrind --tool=callgrind --separate-threads=yes` with a SoftHSM token, a few
//! requests warm it up, the counters are zeroed, then `REQUEST_CPU_N` (default 300)
//! sign-transaction requests go over mTLS from `REQUEST_CPU_CLIENTS` (default 4) keep-alive
//! clients, and the counters are dumped. Prints instructions (user space; kernel time is not
//! counted) per request for each thread name of the signer: `tokio-rt-worker`, `pkcs11-hsm`,
//! `pkcs11-verify`, the store's threads, ...
//!
//! `cargo bench -p castellan-signer --bench request_cpu` (needs `source scripts/tools.sh` and
//! valgrind). Instruction counts do not depend on the machine's load, unlike CPU time on the
//! shared cores, so two runs of the same code agree to about 1%.
//!
//! `REQUEST_CPU_KEEP=1` keeps the callgrind files (path printed) for `callgrind_annotate`.
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

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use castellan_tests::softhsm::SoftHsmToken;

fn main() -> ExitCode {
    let token = match support::bench_token("castellan-request-cpu", "request_cpu") {
        Ok(token) => token,
        Err(code) => return code,
    };
    let n: u64 = env_or("REQUEST_CPU_N", 300);
    let clients: u64 = env_or("REQUEST_CPU_CLIENTS", 4);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(&token, n, clients));
    ExitCode::SUCCESS
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Sends `n` requests from `clients` connections (already warmed up), all answered 200.
async fn send(conns: &[reqwest::Client], url: &str, nonce: &Arc<AtomicU64>, n: u64) {
    let left = Arc::new(AtomicU64::new(n));
    let mut tasks = Vec::new();
    for c in conns {
        let (c, url, nonce, left) = (c.clone(), url.to_owned(), nonce.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                .is_ok()
            {
                let r = c
                    .post(&url)
                    .json(&support::transfer(nonce.fetch_add(1, Ordering::Relaxed)))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let body = r.text().await.unwrap();
                assert_eq!(status, 200, "{body}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn callgrind_control(arg: &str, pid: u32) {
    let out = Command::new("callgrind_control")
        .arg(arg)
        .arg(pid.to_string())
        .output()
        .expect("callgrind_control (valgrind) is needed");
    assert!(
        out.status.success(),
        "callgrind_control {arg}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn run(token: &SoftHsmToken, n: u64, clients: u64) {
    let mut app = support::Appliance::start_full(
        token,
        &["hot"],
        support::LOAD_POLICY,
        "[hardening]\nallow_root = true\nno_mlock = true\n",
        1,
    )
    .await;
    // The appliance is set up (token, keys, store, certificates, config): run its binary again
    // under callgrind instead.
    app.terminate();
    let out_dir = app.path("callgrind");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut child = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg("--separate-threads=yes")
        .arg(format!(
            "--callgrind-out-file={}/cg.out.%p",
            out_dir.display()
        ))
        .arg(env!("CARGO_BIN_EXE_signer"))
        .arg("--config")
        .arg(app.path("signer.toml"))
        .current_dir(&out_dir)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(app.path("valgrind.stderr")).unwrap())
        .spawn()
        .expect("valgrind is needed");
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("signer listening on ") {
                let _ = addr_tx.send(a.trim().to_owned());
            }
        }
    });
    let addr = tokio::task::block_in_place(|| addr_rx.recv_timeout(Duration::from_secs(300)))
        .unwrap_or_else(|_| {
            let _ = child.kill();
            panic!(
                "the signer did not start under valgrind:\n{}",
                std::fs::read_to_string(app.path("valgrind.stderr")).unwrap_or_default()
            )
        });
    app.addr = addr.parse().unwrap();
    let conns: Vec<_> = (0..clients).map(|_| app.client(Some("alpha"))).collect();
    let url = app.url("/v1/keys/hot/sign/transaction");
    let nonce = Arc::new(AtomicU64::new(0));
    // Warm-up: connections, TLS sessions, caches, lazily built state.
    send(&conns, &url, &nonce, 4 * clients).await;
    callgrind_control("--zero", pid);
    send(&conns, &url, &nonce, n).await;
    callgrind_control("--dump", pid);
    // Thread names, in creation order: valgrind numbers threads in the order they start.
    let mut tasks: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let tid = e.file_name().to_string_lossy().parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            Some((tid, comm.trim().to_owned()))
        })
        .collect();
    tasks.sort();
    let _ = child.kill();
    let _ = child.wait();

    let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
    let mut total = 0u64;
    for e in std::fs::read_dir(&out_dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // Only the explicit dump (`cg.out.<pid>.1-<thread>`), not the one at exit.
        if !name.contains(".1-") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        let thread: usize = field(&text, "thread: ").unwrap_or(1);
        let ir: u64 = field(&text, "summary: ")
            .or_else(|| field(&text, "totals: "))
            .unwrap_or(0);
        let tname = tasks
            .get(thread - 1)
            .map_or_else(|| format!("thread-{thread}"), |t| t.1.clone());
        *by_name.entry(tname).or_default() += ir;
        total += ir;
    }
    println!(
        "signer instructions per request ({n} sign-transaction requests, {clients} clients, 1 HSM session):"
    );
    for (name, ir) in &by_name {
        if *ir / n > 0 {
            println!("  {name:<20} {:>10}", ir / n);
        }
    }
    println!("  {:<20} {:>10}", "total", total / n);
    for (name, ir) in &by_name {
        let key: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        println!("BENCH request_cpu.{key}_ir={}", ir / n);
    }
    println!("BENCH request_cpu.total_ir={}", total / n);
    if std::env::var_os("REQUEST_CPU_KEEP").is_some() {
        let keep = std::env::temp_dir().join(format!("castellan-request-cpu-{pid}"));
        let _ = std::fs::remove_dir_all(&keep);
        std::fs::rename(&out_dir, &keep)
            .or_else(|_| {
                Command::new("cp")
                    .arg("-r")
                    .arg(&out_dir)
                    .arg(&keep)
                    .status()
                    .map(|_| ())
            })
            .unwrap();
        println!("callgrind files kept in {}", keep.display());
    }
}

/// The first number after `key` at the start of a line.
fn field<T: std::str::FromStr>(text: &str, key: &str) -> Option<T> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}
