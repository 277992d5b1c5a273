//! Harness for keyctl's tests: a development appliance per test (its own SoftHSM token
//! directory, made by `keyctl dev init`), the real `keyctl` binary, and the real `signer` binary.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    missing_docs
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use castellan_api::client::{ClientError, SignerClient};
use castellan_api::signer::{SignedTransactionResponse, UnsignedTx};
use castellan_api::tls::ClientTlsConfig;
use serde_json::Value;
use tempfile::TempDir;

/// Now, in unix seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A port P such that P, P+1, P+2 and P+3 were all free a moment ago: `keyctl dev init --port P`
/// gives the signer P, the submitter P+1, the submitter's metrics P+2 and the signer's metrics
/// P+3. Chosen below the kernel's ephemeral range: that is where the outgoing connections of
/// the tests running beside this one take their source ports, and where `bind(0)` hands out
/// the other harnesses' ports, so neither can take one of the four before the appliance binds
/// them. (Once only P came from `bind(0)`; a signer whose metrics port P+3 had been taken
/// meanwhile said it listened, then exited, and the test's first request was refused.)
pub fn free_port() -> u16 {
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
        .clamp(12_000, 60_000);
    let span = low - 10_000 - 4;
    // Where to start: differs between test processes and calls (no shared state needed).
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id().wrapping_mul(2_654_435_761);
    for i in 0..span {
        let p = 10_000 + (seed.wrapping_add(i) % span);
        let p = u16::try_from(p).unwrap();
        let held: Vec<_> = (0..4)
            .map_while(|k| std::net::TcpListener::bind(("127.0.0.1", p + k)).ok())
            .collect();
        if held.len() == 4 {
            return p;
        }
    }
    panic!("no four consecutive free ports on 127.0.0.1 between 10000 and {low}");
}

/// `keyctl` with a clean environment (no inherited config or SoftHSM configuration).
pub fn keyctl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyctl"));
    c.env_remove("KEYCTL_CONFIG")
        .env_remove("KEYCTL_NOW")
        .env_remove("SOFTHSM2_CONF")
        .stdin(Stdio::null());
    c
}

/// The output as text, for failure messages.
pub fn dump(o: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A development appliance made by `keyctl dev init` in a temporary directory.
pub struct Appliance {
    _tmp: TempDir,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
}

impl Appliance {
    pub fn new() -> Self {
        Self::with_args(&[])
    }

    /// `keyctl dev init` with extra arguments (`--node-url`, `--builder-url`).
    pub fn with_args(extra: &[&str]) -> Self {
        let module = castellan_tests::softhsm::module_path().unwrap_or_else(|e| panic!("{e}"));
        let tmp = tempfile::Builder::new()
            .prefix("keyctl-test-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().join("appliance");
        let port = free_port();
        let out = keyctl()
            .args(["dev", "init"])
            .arg(&dir)
            .arg("--module")
            .arg(&module)
            .args(["--port", &port.to_string()])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "dev init failed: {}", dump(&out));
        let dir = dir.canonicalize().unwrap();
        // The suite runs many appliances and builds at once on two cores, where one fsync can
        // take seconds: keyctl's 5 s default for requests to the signer was once not enough
        // ("error sending request"). The tests wait longer; what they check is not timing.
        let config = dir.join("keyctl.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(text.contains("\ntimeout_secs = 5\n"), "{text}");
        std::fs::write(
            &config,
            text.replace("\ntimeout_secs = 5\n", "\ntimeout_secs = 30\n"),
        )
        .unwrap();
        Self {
            config: dir.join("keyctl.toml"),
            dir,
            port,
            _tmp: tmp,
        }
    }

    /// Runs `keyctl --config <this> args…`.
    pub fn run(&self, args: &[&str]) -> Output {
        keyctl()
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "keyctl {args:?} failed: {}", dump(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs with `--json`, asserts success, parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Runs, asserts failure with a one-line reason on stderr; returns (exit code, the line).
    pub fn fails(&self, args: &[&str]) -> (i32, String) {
        let o = self.run(args);
        assert_fails_one_line(&o, args)
    }

    /// A client of the running signer with the certificate `stem` (e.g. `strategy-alpha`).
    pub fn client(&self, stem: &str) -> SignerClient {
        let tls = self.dir.join("tls");
        SignerClient::new(
            format!("https://localhost:{}", self.port),
            &ClientTlsConfig {
                server_ca: tls.join("ca.pem"),
                cert: tls.join(format!("{stem}.pem")),
                key: tls.join(format!("{stem}.key")),
            },
        )
        .unwrap()
    }

    /// The `address` of `name@version` from `keys show --json`.
    pub fn address(&self, name: &str, version: u32) -> String {
        let v = self.json(&["keys", "show", name]);
        let want = format!("{name}@{version}");
        v["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["version"] == want.as_str())
            .unwrap_or_else(|| panic!("no {want} in {v}"))["address"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The status (`active`, `retiring`, …) of `name@version`.
    pub fn status(&self, name: &str, version: u32) -> String {
        let v = self.json(&["keys", "show", name]);
        let want = format!("{name}@{version}");
        v["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["version"] == want.as_str())
            .unwrap_or_else(|| panic!("no {want} in {v}"))["status"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// Asserts a failed run with exactly one line on stderr starting `keyctl: error:`.
pub fn assert_fails_one_line(o: &Output, args: &[&str]) -> (i32, String) {
    assert!(
        !o.status.success(),
        "keyctl {args:?} succeeded: {}",
        dump(o)
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "keyctl {args:?}: expected one line on stderr: {}",
        dump(o)
    );
    assert!(
        lines[0].starts_with("keyctl: error: "),
        "keyctl {args:?}: {}",
        dump(o)
    );
    (o.status.code().unwrap_or(-1), lines[0].to_owned())
}

/// The `signer` binary of this build: `target/<profile>/signer`, next to `deps/` holding this
/// test executable. Built by `cargo build -p castellan-signer` (or a workspace build).
pub fn signer_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable is in target/<profile>/deps");
    let bin = profile_dir.join("signer");
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build -p castellan-signer` (these tests run \
         the real signer binary)",
        bin.display()
    );
    bin
}

/// A binary of this build (`target/<profile>/<name>`), built by `cargo build -p <its crate>`.
pub fn sibling_bin(name: &str) -> PathBuf {
    let bin = signer_bin().with_file_name(name);
    assert!(
        bin.is_file(),
        "{} is missing: build it first (these tests run the real binary)",
        bin.display()
    );
    bin
}

/// A running process of an appliance that printed `ready_line` on stdout; killed on drop.
pub struct RunningProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl RunningProcess {
    /// Starts `bin --config <config>` with the appliance's SoftHSM configuration and waits for
    /// `ready_line` on its stdout.
    pub fn start(a: &Appliance, bin: &Path, config: &Path, ready_line: &str) -> Self {
        let name = bin.file_name().unwrap().to_string_lossy().into_owned();
        let log = a.dir.join(format!("{name}-{}.log", now_nanos()));
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .env("SOFTHSM2_CONF", a.dir.join("softhsm2.conf"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let ready_line = ready_line.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(&ready_line) {
                    let _ = tx.send(());
                }
            }
        });
        let started = rx.recv_timeout(Duration::from_secs(30)).is_ok();
        let mut p = Self {
            child: Some(child),
            log,
        };
        if !started {
            let log = p.log_text();
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            panic!("{name} did not start; its log:\n{log}");
        }
        p
    }

    /// Its stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RunningProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running signer of an appliance; killed on drop.
pub struct RunningSigner {
    child: Option<Child>,
    log: PathBuf,
}

impl RunningSigner {
    /// Starts `signer --config <dir>/signer.toml` with the appliance's SoftHSM configuration and
    /// waits until it listens.
    pub fn start(a: &Appliance) -> Self {
        let log = a.dir.join(format!("signer-{}.log", now_nanos()));
        let mut child = Command::new(signer_bin())
            .arg("--config")
            .arg(a.dir.join("signer.toml"))
            .env("SOFTHSM2_CONF", a.dir.join("softhsm2.conf"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("signer listening on") {
                    let _ = tx.send(());
                }
            }
        });
        let started = rx.recv_timeout(Duration::from_secs(30)).is_ok();
        let mut s = Self {
            child: Some(child),
            log,
        };
        if !started {
            let log = s.log_text();
            s.stop();
            panic!("the signer did not start listening; its log:\n{log}");
        }
        s
    }

    /// Its stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RunningSigner {
    fn drop(&mut self) {
        self.stop();
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A plain transfer on the dev chain (31337).
pub fn transfer(nonce: u64) -> UnsignedTx {
    serde_json::from_value(serde_json::json!({
        "chainId": "0x7a69", "nonce": nonce.to_string(),
        "to": "0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed",
        "value": "1000", "gas": "21000",
        "maxFeePerGas": "0x3b9aca00", "maxPriorityFeePerGas": "1"
    }))
    .unwrap()
}

/// Signs a transfer with `key` as the strategy client.
pub fn sign(
    a: &Appliance,
    key: &str,
    nonce: u64,
) -> Result<SignedTransactionResponse, ClientError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = a.client("strategy-alpha");
    rt.block_on(client.sign_transaction(key, transfer(nonce)))
}

/// Times `f`.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}
