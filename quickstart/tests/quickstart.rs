//! The README's first command, run as a new user would (non-interactively: `--ci` stops after the
//! walk-through), from a clean working directory; then every step's outcome is checked, the
//! bundle's inclusion block on anvil itself (the chain the quickstart's anvil dumped on exit,
//! loaded into a fresh anvil), and that everything the quickstart started has stopped.
//!
//! The quickstart uses this build's binaries (`CASTELLAN_BIN_DIR`: `target/<profile>/`, where
//! `cargo test --workspace` puts `signer`, `submitter` and `keyctl`, and cargo this package's
//! `castellan-walkthrough` and `castellan-standin-builder`), so it builds nothing. It needs the
//! tools `scripts/test` installs (`source scripts/tools.sh`): without `CASTELLAN_ANVIL` it fails
//! instead of letting the quickstart install them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256};
use alloy::providers::{Provider, ProviderBuilder};
use serde_json::Value;

/// The two quickstart runs prefer the same ports (8545, 8443…): one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The quickstart takes about ten seconds on two cores with the binaries built; the bound is
/// generous for a loaded CI machine.
const QUICKSTART_TIMEOUT: Duration = Duration::from_secs(150);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The commands of the README's first code block (comments stripped), in order.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme.find("```sh\n").expect("README.md has a ```sh block");
    let block = &readme[start + 6..];
    let block = &block[..block.find("```").expect("the block ends")];
    block
        .lines()
        .map(|l| l.split('#').next().unwrap().trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn readme_starts_with_the_quickstart_and_the_test_command() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let first_block = readme.find("```").unwrap();
    // Nothing but the title and one line of introduction before the two commands.
    assert!(
        readme[..first_block]
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
            <= 3,
        "the README must start with its two commands"
    );
    assert_eq!(readme_commands(), ["scripts/quickstart", "scripts/test"]);
    for c in readme_commands() {
        let path = root().join(&c);
        let mode = std::os::unix::fs::PermissionsExt::mode(&path.metadata().unwrap().permissions());
        assert!(mode & 0o111 != 0, "{c} is not executable");
    }
}

/// The tools of scripts/test, and the directory of this build's binaries.
fn prerequisites() -> (std::ffi::OsString, PathBuf) {
    let anvil = std::env::var_os("CASTELLAN_ANVIL").unwrap_or_else(|| {
        panic!("CASTELLAN_ANVIL is not set: run the tests with scripts/test (or `source scripts/tools.sh` first)")
    });
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_castellan-walkthrough"))
        .parent()
        .unwrap()
        .to_path_buf();
    for b in ["signer", "submitter", "keyctl", "castellan-standin-builder"] {
        assert!(
            bin_dir.join(b).is_file(),
            "{} is missing: run `cargo test --workspace` (or cargo build the signer, submitter \
             and keyctl packages first)",
            bin_dir.join(b).display()
        );
    }
    (anvil, bin_dir)
}

#[test]
fn quickstart_runs_the_main_job_from_a_clean_state() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (anvil, bin_dir) = prerequisites();

    // Exactly the README's command, plus the flag that stops after the walk-through.
    let command = readme_commands()[0].clone();
    assert_eq!(command, "scripts/quickstart");
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("quickstart");
    let log = tmp.path().join("quickstart.log");
    let started = Instant::now();
    let mut child = Command::new(root().join(&command))
        .arg("--ci")
        .current_dir(root())
        .env("CASTELLAN_BIN_DIR", &bin_dir)
        .env("CASTELLAN_QUICKSTART_DIR", &work)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap().try_clone().unwrap())
        .spawn()
        .unwrap();
    let status = wait(&mut child, QUICKSTART_TIMEOUT, &log);
    let took = started.elapsed();
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{command} --ci failed:\n{out}");
    eprintln!("{command} --ci took {took:?}");

    // One line per step, in order, and the commands to talk to the appliance.
    let mut at = 0;
    for step in 1..=7 {
        let tag = format!("[{step}/7] ");
        let pos = out[at..]
            .find(&tag)
            .unwrap_or_else(|| panic!("no step {step} after byte {at}:\n{out}"));
        at += pos + tag.len();
    }
    for needle in ["walk-through complete", "--config", "--cacert", "/metrics"] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }

    // Each step's outcome, as the walk-through recorded it.
    let app = work.join("appliance");
    let w: Value =
        serde_json::from_str(&std::fs::read_to_string(app.join("walkthrough.json")).unwrap())
            .unwrap();
    let bundle = &w["bundle"];
    let block = bundle["includedBlock"].as_u64().unwrap();
    assert!(
        (bundle["targetBlock"].as_u64().unwrap()..=bundle["lastBlock"].as_u64().unwrap())
            .contains(&block),
        "{bundle}"
    );
    assert_eq!(bundle["keyVersion"], "searcher-hot@1", "{bundle}");
    assert_eq!(bundle["relays"], serde_json::json!(["builder"]), "{bundle}");
    assert_eq!(bundle["submitterState"], "included", "{bundle}");
    assert!(out.contains(&format!("included in block {block}")), "{out}");
    assert_eq!(
        (w["denied"]["status"].as_u64(), w["denied"]["code"].as_str()),
        (Some(422), Some("value_cap_exceeded")),
        "{w}"
    );
    assert!(
        w["denied"]["message"]
            .as_str()
            .unwrap()
            .contains("defaults.max_value"),
        "{w}"
    );
    let approved = &w["approved"];
    assert_eq!(approved["state"], "signed", "{approved}");
    assert_eq!(approved["approvals"], 2, "{approved}");
    assert_eq!(approved["threshold"], 2, "{approved}");
    assert_eq!(approved["approvers"].as_array().unwrap().len(), 2);
    let rotated = &w["rotated"];
    assert_ne!(rotated["old"], rotated["new"], "{rotated}");
    assert_eq!(rotated["old"], w["key"]["address"], "{w}");
    assert_eq!(rotated["signedBy"], rotated["new"], "{rotated}");
    assert_eq!(rotated["newVersion"], "searcher-hot@2");
    let revoked = &w["revoked"];
    assert_eq!(
        revoked["revoked"],
        serde_json::json!(["searcher-hot@1", "searcher-hot@2"]),
        "{revoked}"
    );
    assert_eq!(
        (revoked["status"].as_u64(), revoked["code"].as_str()),
        (Some(409), Some("key_revoked")),
        "{revoked}"
    );
    let audit = &w["audit"];
    assert!(audit["records"].as_u64().unwrap() >= 10, "{audit}");
    assert!(
        audit["exportRecords"].as_u64() >= audit["records"].as_u64(),
        "{audit}"
    );
    assert!(
        audit["independent"]
            .as_str()
            .unwrap()
            .starts_with(&format!("OK {} records", audit["exportRecords"])),
        "{audit}"
    );
    // The export holds the bundle's signature, by the strategy host.
    let export = std::fs::read_to_string(app.join("audit-export.jsonl")).unwrap();
    let tx_hash: B256 = bundle["txHash"].as_str().unwrap().parse().unwrap();
    assert!(
        export.lines().any(|l| l.contains("\"kind\":\"signature\"")
            && l.to_lowercase().contains(&format!("{tx_hash:#x}"))
            && l.contains("spiffe://castellan/strategy/alpha")),
        "no signature record of {tx_hash:#x} in the audit export"
    );

    // Everything the quickstart started has stopped: its ports are closed.
    for prefix in ["signer on ", "submitter on ", "anvil on http://"] {
        let addr = out
            .lines()
            .find_map(|l| l.split_once(prefix).map(|(_, r)| r))
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {prefix:?} line:\n{out}"));
        assert!(
            TcpStream::connect(addr).is_err(),
            "{addr} still accepts connections after the quickstart exited"
        );
    }

    // The chain itself: the state anvil dumped on exit, loaded into a fresh anvil.
    let state = work.join("anvil-state.json");
    assert!(state.is_file(), "anvil did not dump its state:\n{out}");
    let node = LoadedAnvil::start(&anvil, &state);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let provider = ProviderBuilder::new()
            .connect_http(node.url.parse().unwrap())
            .erased();
        let deadline = Instant::now() + Duration::from_secs(30);
        while provider.get_chain_id().await.is_err() {
            assert!(Instant::now() < deadline, "the loaded anvil did not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let receipt = provider
            .get_transaction_receipt(tx_hash)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("the bundle's tx {tx_hash:#x} is not on the chain"));
        assert!(receipt.status(), "the bundle's transaction reverted");
        assert_eq!(receipt.block_number, Some(block), "inclusion block");
        let from: Address = bundle["from"].as_str().unwrap().parse().unwrap();
        assert_eq!(receipt.from, from, "signed by the HSM key");
    });
}

#[test]
fn quickstart_stays_up_its_printed_commands_work_and_ctrl_c_stops_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_, bin_dir) = prerequisites();
    // Exactly the README's command, as a user runs it.
    let command = readme_commands()[0].clone();
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("quickstart.log");
    // With SIGINT at its default, as in a terminal: a shell cannot trap a signal that was
    // ignored when it started, and a test run started in the background of a non-interactive
    // shell (`nohup scripts/test &`) hands an ignored SIGINT down to everything it runs.
    let mut child = Command::new("env")
        .arg("--default-signal=INT")
        .arg(root().join(&command))
        .current_dir(root())
        .env("CASTELLAN_BIN_DIR", &bin_dir)
        .env("CASTELLAN_QUICKSTART_DIR", tmp.path().join("quickstart"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap().try_clone().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + QUICKSTART_TIMEOUT;
    let out = loop {
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        if out.contains("quickstart: running") {
            break out;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{command} exited with {status} before it was running:\n{out}");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command} was not running within {QUICKSTART_TIMEOUT:?}:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };

    // Every command it printed, run as it is.
    let commands: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("  $ ")).collect();
    assert!(commands.len() >= 8, "{out}");
    let mut answers = Vec::new();
    for c in &commands {
        let o = Command::new("bash")
            .args(["-c", c])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success(),
            "`{c}` failed ({}):\n{text}\n--- quickstart ---\n{out}",
            o.status
        );
        answers.push(text);
    }
    let answer = |needle: &str| {
        commands
            .iter()
            .position(|c| c.contains(needle))
            .map(|i| answers[i].clone())
            .unwrap_or_else(|| panic!("no printed command with {needle:?}:\n{out}"))
    };
    let status = answer(" status");
    assert!(
        status.contains("signer:     reachable") && status.contains("submitter:  reachable"),
        "{status}"
    );
    let generated = answer("keys generate searcher-2");
    let address = generated
        .split_whitespace()
        .skip_while(|w| *w != "address")
        .nth(1)
        .unwrap_or_else(|| panic!("{generated}"))
        .to_owned();
    let signed: Value = serde_json::from_str(answer("/sign/transaction").trim()).unwrap();
    assert_eq!(
        signed["from"].as_str().unwrap().to_lowercase(),
        address.to_lowercase(),
        "{signed}"
    );
    assert!(
        signed["raw"].as_str().unwrap().starts_with("0x02"),
        "{signed}"
    );
    assert!(answer("/v1/relays").contains("\"builder\""));
    let metrics: String = commands
        .iter()
        .zip(&answers)
        .filter(|(c, _)| c.ends_with("/metrics"))
        .map(|(_, a)| a.as_str())
        .collect();
    assert!(
        metrics.contains("castellan_signer_requests_total"),
        "{metrics}"
    );
    assert!(metrics.contains("castellan_submitter_"), "{metrics}");
    let height: u64 = answer("block-number").trim().parse().unwrap();
    assert!(height >= 2, "{height}");

    // Ctrl-C (SIGINT to the script) stops everything it started.
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = wait(&mut child, Duration::from_secs(30), &log);
    let out = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(130), "{out}");
    assert!(
        out.contains("==> stopping anvil standin-builder submitter signer"),
        "{out}"
    );
    for prefix in ["signer on ", "submitter on ", "anvil on http://"] {
        let addr = out
            .lines()
            .find_map(|l| l.split_once(prefix).map(|(_, r)| r))
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {prefix:?} line:\n{out}"));
        assert!(
            TcpStream::connect(addr).is_err(),
            "{addr} still open after Ctrl-C"
        );
    }
}

fn wait(child: &mut Child, timeout: Duration, log: &Path) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() >= deadline {
            // What is still running, and what its logs say, before anything is stopped: which
            // process held the quickstart up.
            let running = Command::new("ps")
                .args([
                    "-o",
                    "pid,stat,etime,args",
                    "--ppid",
                    &child.id().to_string(),
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let out = std::fs::read_to_string(log).unwrap_or_default();
            let logs = log_tails(&out);
            // SIGTERM lets the script's trap stop what it started.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(3));
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the quickstart did not finish within {timeout:?}:\n{out}\n\
                 still running under it:\n{running}\n{logs}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last lines of every log in the directory the quickstart names in its output
/// (`(logs: DIR/)`).
fn log_tails(out: &str) -> String {
    let Some(dir) = out
        .split_once("(logs: ")
        .and_then(|(_, r)| r.split_once(')'))
        .map(|(d, _)| PathBuf::from(d))
    else {
        return "(no logs directory in the output)".into();
    };
    let mut text = String::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return format!("(cannot read {})", dir.display());
    };
    for e in entries.flatten() {
        let body = std::fs::read_to_string(e.path()).unwrap_or_default();
        let lines: Vec<&str> = body.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        text.push_str(&format!(
            "--- {} (last lines) ---\n{tail}\n",
            e.path().display()
        ));
    }
    text
}

/// anvil started on a chain state file, killed on drop.
struct LoadedAnvil {
    child: Child,
    url: String,
}

impl LoadedAnvil {
    fn start(anvil: &std::ffi::OsStr, state: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(anvil)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--silent",
            ])
            .arg("--load-state")
            .arg(state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for LoadedAnvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
