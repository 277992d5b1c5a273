//! Process hardening of the real signer binary (`signer/src/hardening.rs`), checked from outside
//! through `/proc`: memory locked (`VmLck`), core dumps off (`Max core file size 0`), not dumpable
//! (the kernel makes a non-dumpable process's `/proc/PID` files root-owned, visible when the signer
//! runs as an unprivileged user), and root refused unless `hardening.allow_root`.
//!
//! The tests run as root (the CI machine's user): the refusal is shown as root, and the
//! unprivileged runs drop to uid/gid 65534 with `setpriv` (util-linux), either keeping only
//! `CAP_IPC_LOCK` (memory locking allowed) or, under `prlimit`, with a memory-lock limit too small.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use castellan_tests::softhsm::in_own_process;
use support::{Appliance, policy_toml, runtime};

/// The unprivileged user the signer drops to (Debian's `nobody`).
const NOBODY: u32 = 65534;

#[test]
fn root_is_refused_memory_is_locked_and_core_dumps_are_off() {
    in_own_process(
        "root_is_refused_memory_is_locked_and_core_dumps_are_off",
        "hardening",
        |token| {
            runtime().block_on(async {
                assert!(
                    rustix::process::geteuid().is_root(),
                    "these checks start the signer as root and as uid {NOBODY}: run the tests as \
                     root (as CI does)"
                );
                let approvers: Vec<Address> = (1..=3).map(Address::repeat_byte).collect();
                // As root, allowed by the configuration; memory locking on (the default).
                let mut app = Appliance::start_with(
                    token,
                    &["hot"],
                    &policy_toml(&approvers),
                    "[hardening]\nallow_root = true\nno_mlock = false\n",
                )
                .await;
                let pid = app.pid().unwrap();
                let live = app
                    .client(Some("alpha"))
                    .get(app.url("/live"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(live.status(), 200);
                check_locked_and_no_core(pid, &app.stderr());
                assert!(
                    app.stderr().contains("running as root"),
                    "a root signer warns about it:\n{}",
                    app.stderr()
                );
                app.kill();

                // As root without allow_root: refused before anything is opened, in one line.
                let config = app.path("signer.toml");
                let text = std::fs::read_to_string(&config).unwrap();
                let refused_config = app.path("signer-no-root.toml");
                std::fs::write(
                    &refused_config,
                    text.replace("allow_root = true", "allow_root = false"),
                )
                .unwrap();
                let out = run_to_end(
                    Command::new(env!("CARGO_BIN_EXE_signer"))
                        .args(["--config".as_ref(), refused_config.as_os_str()]),
                );
                let line = one_error_line(&out);
                assert!(line.contains("refusing to run as root"), "{line}");
                assert!(line.contains("allow_root = true"), "{line}");
                assert!(
                    !String::from_utf8_lossy(&out.stdout).contains("listening"),
                    "it must not listen"
                );

                // As an unprivileged user allowed to lock memory (CAP_IPC_LOCK as its only
                // capability: this container cannot raise RLIMIT_MEMLOCK, which is what the
                // systemd unit's LimitMEMLOCK=infinity does instead): it starts without
                // allow_root, memory locked, not dumpable.
                give_to_nobody(app.dir.path());
                give_to_nobody(token.root());
                let mut child = Command::new("setpriv")
                    .args(&drop_to_nobody()[1..4])
                    .args([
                        "--inh-caps=-all,+ipc_lock",
                        "--ambient-caps=+ipc_lock",
                        "--bounding-set=-all,+ipc_lock",
                        "--",
                    ])
                    .arg(env!("CARGO_BIN_EXE_signer"))
                    .arg("--config")
                    .arg(&refused_config)
                    .stdout(Stdio::piped())
                    .stderr(std::fs::File::create(app.path("nobody.stderr")).unwrap())
                    .spawn()
                    .unwrap();
                let log = || std::fs::read_to_string(app.path("nobody.stderr")).unwrap_or_default();
                wait_listening(&mut child, &log);
                let pid = child.id();
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
                assert!(
                    status
                        .lines()
                        .any(|l| l.starts_with("Uid:")
                            && l.split_whitespace().nth(2) == Some("65534")),
                    "not running as {NOBODY}:\n{status}"
                );
                check_locked_and_no_core(pid, &log());
                // Not dumpable: the kernel hands the process's /proc files to root.
                let owner = std::fs::metadata(format!("/proc/{pid}/status"))
                    .unwrap()
                    .uid();
                assert_eq!(
                    owner, 0,
                    "/proc/{pid}/status belongs to uid {owner}: the process is dumpable"
                );
                let _ = child.kill();
                let _ = child.wait();

                // The same user without the capability and with a 64 KiB memory-lock limit:
                // mlockall fails, and the signer
                // stops with one line naming the limit and the ways out instead of running
                // unlocked.
                let out = run_to_end(
                    Command::new("prlimit")
                        .arg("--memlock=65536:65536")
                        .arg("--")
                        .args(drop_to_nobody())
                        .arg("--")
                        .arg(env!("CARGO_BIN_EXE_signer"))
                        .arg("--config")
                        .arg(&refused_config),
                );
                let line = one_error_line(&out);
                assert!(line.contains("cannot lock memory"), "{line}");
                assert!(line.contains("65536 bytes"), "{line}");
                assert!(line.contains("LimitMEMLOCK"), "{line}");
                assert!(line.contains("no_mlock = true"), "{line}");
            })
        },
    );
}

/// A supervisor (and every test harness here) takes "signer listening on" to mean the signer
/// is up. So every listener is bound before that line: with its metrics address taken, the
/// signer exits naming that address and never prints it. (Before, it printed the line, then
/// failed to bind the metrics port and exited; a client that believed the line got "connection
/// refused".)
#[test]
fn a_taken_metrics_address_stops_the_signer_before_it_says_it_listens() {
    in_own_process(
        "a_taken_metrics_address_stops_the_signer_before_it_says_it_listens",
        "metrics-taken",
        |token| {
            runtime().block_on(async {
                let approvers: Vec<Address> = (1..=3).map(Address::repeat_byte).collect();
                let mut app = Appliance::start_with(
                    token,
                    &["hot"],
                    &policy_toml(&approvers),
                    "[hardening]\nallow_root = true\nno_mlock = true\n",
                )
                .await;
                app.kill();
                let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = taken.local_addr().unwrap();
                let config = app.path("signer-metrics-taken.toml");
                let text = std::fs::read_to_string(app.path("signer.toml")).unwrap();
                assert!(!text.contains("[metrics]"), "{text}");
                std::fs::write(&config, format!("{text}\n[metrics]\nlisten = \"{addr}\"\n"))
                    .unwrap();
                let out = run_to_end(
                    Command::new(env!("CARGO_BIN_EXE_signer"))
                        .args(["--config".as_ref(), config.as_os_str()]),
                );
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success(), "it started:\n{stderr}");
                assert!(
                    stderr.contains(&format!("binding metrics {addr}")),
                    "the error names the metrics address:\n{stderr}"
                );
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(
                    !stdout.contains("listening"),
                    "it said it listens, then exited:\n{stdout}"
                );
                drop(taken);
            })
        },
    );
}

/// `/proc/PID/status` shows locked memory, `/proc/PID/limits` a core size of 0 (soft and hard),
/// and the signer's own log says so.
fn check_locked_and_no_core(pid: u32, log: &str) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let locked_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmLck in /proc/{pid}/status:\n{status}"));
    let size_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        locked_kb > 1024,
        "VmLck is {locked_kb} kB (RSS {size_kb} kB): memory is not locked"
    );
    println!("signer {pid}: VmLck {locked_kb} kB, VmRSS {size_kb} kB");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core: Vec<&str> = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max core file size"))
        .unwrap_or_else(|| panic!("no core limit in /proc/{pid}/limits:\n{limits}"))
        .split_whitespace()
        .collect();
    assert_eq!(&core[..2], ["0", "0"], "core limit:\n{limits}");
    let log = strip_ansi(log);
    assert!(
        log.contains("memory_locked=true") && log.contains("not dumpable"),
        "the start-up log does not report the hardening:\n{log}"
    );
    check_device_first(pid, &log);
}

/// `scheduling.device_first` (the default, see `signer/src/sched.rs`): every thread of the signer
/// runs under `SCHED_BATCH` but the PKCS#11 workers, which run under `SCHED_OTHER` — as root and
/// as an unprivileged user alike — and no thread's nice value changed.
fn check_device_first(pid: u32, log: &str) {
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    let mut workers = 0;
    let mut others = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let Ok(stat) = std::fs::read_to_string(task.join("stat")) else {
            continue; // the thread ended
        };
        // `pid (comm) state …`: the fields after the name start with field 3 (`state`);
        // field 19 is the nice value, field 41 the scheduling policy.
        let (comm, rest) = stat
            .split_once(" (")
            .and_then(|(_, r)| r.rsplit_once(") "))
            .unwrap_or_else(|| panic!("unexpected {}: {stat}", task.display()));
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let nice: i32 = fields[19 - 3].parse().unwrap();
        let policy: u32 = fields[41 - 3].parse().unwrap();
        assert_eq!(nice, 0, "thread {comm:?} has nice {nice}");
        if comm.starts_with("pkcs11-worker") {
            workers += 1;
            assert_eq!(
                policy, SCHED_OTHER,
                "device thread {comm:?}: policy {policy}"
            );
        } else {
            others += 1;
            assert_eq!(policy, SCHED_BATCH, "thread {comm:?}: policy {policy}");
        }
    }
    assert!(
        workers >= 1 && others >= 3,
        "{workers} workers, {others} others"
    );
    assert!(
        !log.contains("precedence"),
        "the signer could not give the device's threads precedence:\n{log}"
    );
}

/// The log without terminal colour codes (`ESC [ … m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `setpriv` arguments that drop to uid/gid [`NOBODY`] with no supplementary groups and no
/// capabilities.
fn drop_to_nobody() -> [String; 5] {
    [
        "setpriv".into(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        "--inh-caps=-all".into(),
    ]
}

/// Hands a directory tree (certificates, store, token, PIN file) to [`NOBODY`].
fn give_to_nobody(dir: &Path) {
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    let mut n = 0;
    while let Some(p) = stack.pop() {
        n += 1;
        assert!(
            n < 10_000,
            "unexpectedly large tree under {}",
            dir.display()
        );
        std::os::unix::fs::lchown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
        if p.is_dir() && !p.is_symlink() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
}

/// Waits (at most 30 s) for the "signer listening on" line.
fn wait_listening(child: &mut Child, log: &dyn Fn() -> String) {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("signer listening on ") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the unprivileged signer did not start:\n{}", log());
    }
}

/// Runs a command that must exit by itself within 30 s.
fn run_to_end(command: &mut Command) -> Output {
    // An operator's shell has no RUST_BACKTRACE; a test runner's may (it would add a backtrace
    // to the error line).
    let mut child = command
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{command:?} did not exit within 30 s:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A failed run's stderr: exactly one non-empty line, returned.
fn one_error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the signer exited successfully:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr:\n{stderr}");
    lines[0].to_owned()
}
