//! Cross-binary end to end: an Ethereum client that is not ours (`cast`, from Foundry) sends a
//! transaction through the signer's `/rpc`, and anvil mines it with `from` = the HSM key.
//!
//! The path: `cast send --unlocked` → plain HTTP to a local stunnel (cast has no client-certificate
//! option) → mTLS with the strategy client's certificate → the `signer` binary (policy, SoftHSM,
//! audit) → mTLS → the `submitter` binary → its `rpc` relay (`eth_sendRawTransaction`) → anvil.
//! The submitter reports the inclusion back to the signer over mTLS.
//!
//! The signer and the submitter trust different development CAs, as separate deployments would:
//! the appliance's CA (strategy clients, the submitter's client certificate) and a second one for
//! the submitter's listener and the signer's client certificate there.
//!
//! Needs `CASTELLAN_ANVIL`, `CASTELLAN_CAST`, `CASTELLAN_PKCS11_MODULE` (`source scripts/tools.sh`),
//! `stunnel4` on the PATH (or `CASTELLAN_STUNNEL`), and the `submitter` binary next to this test's
//! directory (`target/<profile>/submitter`; `cargo test --workspace` builds it, otherwise
//! `cargo build -p castellan-submitter`), or its path in `CASTELLAN_SUBMITTER_BIN`. Anything
//! missing fails the test with a message saying so; it never skips.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256, address};
use alloy::providers::Provider;
use castellan_api::devpki::{DevCa, LeafSpec};
use castellan_api::submitter::{BundleState, BundleStatus};
use castellan_api::tls::ClientTlsConfig;
use castellan_tests::anvil::Anvil;
use castellan_tests::softhsm::in_own_process;
use support::{Appliance, policy_toml, runtime};

const RECIPIENT: Address = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");
const ETHER: u128 = 1_000_000_000_000_000_000;
/// The signer's client identity at the submitter.
const SIGNER_ID: &str = "spiffe://castellan/signer";
/// An operator of the submitter (reads bundle status).
const OPS_ID: &str = "spiffe://castellan/ops/oncall";

#[test]
fn cast_sends_through_rpc_and_anvil_mines_it_from_the_hsm_key() {
    in_own_process(
        "cast_sends_through_rpc_and_anvil_mines_it_from_the_hsm_key",
        "e2e-send",
        |token| {
            runtime().block_on(async {
                let submitter_bin = submitter_binary();
                let cast = tool_env("CASTELLAN_CAST");
                let stunnel = stunnel_binary();
                let anvil = Anvil::start().await;

                // The submitter's side: its CA, server certificate, and the client certificates
                // of the signer and of an operator.
                let net = tempfile::tempdir().unwrap();
                let n = net.path();
                let mut ca = DevCa::new("Castellan submitter CA").unwrap();
                ca.write(n, "ca").unwrap();
                ca.issue(&LeafSpec::server_localhost())
                    .unwrap()
                    .write(n, "server")
                    .unwrap();
                for (stem, uri) in [("signer", SIGNER_ID), ("ops", OPS_ID)] {
                    ca.issue(&LeafSpec::client_uri(uri))
                        .unwrap()
                        .write(n, stem)
                        .unwrap();
                }
                // The signer needs the submitter's address before the submitter can be told
                // the signer's: the submitter gets a port that was free a moment ago.
                let submitter_port = free_port();

                let approvers: Vec<Address> = (1..=3).map(Address::repeat_byte).collect();
                let extra = format!(
                    "[upstream]\nurl = \"{anvil}\"\n\n\
                     [submitter]\nurl = \"https://localhost:{submitter_port}\"\n\
                     tls = {{ server_ca = \"{n}/ca.pem\", cert = \"{n}/signer.pem\", key = \"{n}/signer.key\" }}\n",
                    anvil = anvil.url(),
                    n = n.display(),
                );
                let app = Appliance::start_with(token, &["hot"], &policy_toml(&approvers), &extra)
                    .await;
                let from = app.keys["hot"];
                anvil.set_balance(from, U256::from(10 * ETHER)).await;

                let submitter_config = n.join("submitter.toml");
                std::fs::write(
                    &submitter_config,
                    submitter_toml(n, submitter_port, &anvil, &app),
                )
                .unwrap();
                let mut submitter = Daemon::spawn(
                    "submitter",
                    Command::new(&submitter_bin).arg("--config").arg(&submitter_config),
                    n.join("submitter.log"),
                );
                submitter.wait_line("submitter listening on ", Duration::from_secs(20));

                // The bridge for cast: plain HTTP on 127.0.0.1 → mTLS to the signer as alpha.
                let bridge_port = free_port();
                let stunnel_conf = n.join("stunnel.conf");
                std::fs::write(
                    &stunnel_conf,
                    format!(
                        "foreground = yes\npid = {pid}\ndebug = info\n\n[signer]\nclient = yes\n\
                         accept = 127.0.0.1:{bridge_port}\nconnect = {signer}\n\
                         cert = {cert}\nkey = {key}\nCAfile = {ca}\nverifyChain = yes\n\
                         checkHost = localhost\nsslVersionMin = TLSv1.3\n",
                        pid = n.join("stunnel.pid").display(),
                        signer = app.addr,
                        cert = app.path("alpha.pem").display(),
                        key = app.path("alpha.key").display(),
                        ca = app.path("ca.pem").display(),
                    ),
                )
                .unwrap();
                let mut bridge = Daemon::spawn(
                    "stunnel",
                    Command::new(&stunnel).arg(&stunnel_conf),
                    n.join("stunnel.log"),
                );
                bridge.wait_port(bridge_port, Duration::from_secs(20));

                // cast, knowing nothing of Castellan, asks the "node" to send from the HSM key.
                let rpc = format!("http://127.0.0.1:{bridge_port}/rpc");
                let out = run(
                    Command::new(&cast)
                        .args(["send", "--async", "--unlocked", "--rpc-url", &rpc, "--from"])
                        .arg(from.to_string())
                        .arg(RECIPIENT.to_string())
                        .args(["--value", "1000"])
                        .env("HOME", n),
                    Duration::from_secs(60),
                    &[&submitter, &bridge],
                );
                let hash: B256 = out
                    .trim()
                    .lines()
                    .last()
                    .and_then(|l| l.trim().parse().ok())
                    .unwrap_or_else(|| {
                        panic!("cast printed no transaction hash:\n{out}{}", dump(&[&submitter, &bridge]))
                    });

                // anvil mined it, from the HSM key's address.
                let receipt = anvil.receipt(hash).await;
                assert!(receipt.status(), "reverted: {receipt:?}");
                assert_eq!(receipt.from, from);
                assert_eq!(receipt.to, Some(RECIPIENT));
                let tx = anvil
                    .provider()
                    .get_transaction_by_hash(hash)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(tx.inner.signer(), from);
                let block = receipt.block_number.unwrap();

                // The signer's audit chain holds the signature, and later the submitter's report.
                let hash_hex = format!("{hash:#x}");
                let records = app.audit().await;
                let signature = records
                    .iter()
                    .find(|r| {
                        r.kind.as_str() == "signature"
                            && r.payload.to_string().to_lowercase().contains(&hash_hex)
                    })
                    .unwrap_or_else(|| {
                        panic!("no signature record for {hash_hex} in the audit chain: {records:#?}")
                    });
                assert_eq!(
                    signature.identity.as_deref(),
                    Some("spiffe://castellan/strategy/alpha"),
                    "{signature:#?}"
                );
                let request_id = signature.request_id.clone().unwrap();
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let records = app.audit().await;
                    let reported = records.iter().any(|r| {
                        r.kind.as_str() == "event"
                            && r.identity.as_deref() == Some("spiffe://castellan/submitter")
                            && r.payload["op"] == "key_result"
                            && r.payload["name"] == "hot"
                            && r.payload["success"] == true
                    });
                    if reported {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "the submitter's outcome never reached the signer's audit chain{}",
                        dump(&[&submitter, &bridge])
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }

                // The submitter tracked the bundle the signer made for it to inclusion.
                let bundle_id =
                    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, request_id.as_bytes());
                let ops = ClientTlsConfig {
                    server_ca: n.join("ca.pem"),
                    cert: n.join("ops.pem"),
                    key: n.join("ops.key"),
                }
                .build()
                .unwrap();
                let ops = reqwest::Client::builder()
                    .resolve(
                        "localhost",
                        SocketAddr::from(([127, 0, 0, 1], submitter_port)),
                    )
                    .timeout(Duration::from_secs(10))
                    .tls_backend_preconfigured(ops)
                    .build()
                    .unwrap();
                let response = ops
                    .get(format!(
                        "https://localhost:{submitter_port}/v1/bundles/{bundle_id}"
                    ))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200, "{}", dump(&[&submitter, &bridge]));
                let status: BundleStatus = response.json().await.unwrap();
                assert_eq!(status.state, BundleState::Included, "{status:#?}");
                assert_eq!(status.included_block.map(|q| q.0), Some(block));
                assert_eq!(status.key_name, "hot");
                let relay = status.relays.iter().find(|r| r.relay == "anvil").unwrap();
                assert!(relay.accepted, "{status:#?}");

                // The bridge spoke TLS 1.3 with the client certificate the signer saw.
                let stunnel_log = bridge.output();
                assert!(stunnel_log.contains("TLSv1.3"), "{stunnel_log}");

                // Nothing else was signed, and the audit chain is whole.
                let records = app.audit().await;
                assert_eq!(support::count_kind(&records, "signature"), 1);
                castellan_signer::audit::verify_chain(&records, None).unwrap();
                drop(bridge);
                drop(submitter);
            })
        },
    );
}

/// `submitter.toml`: mTLS listener on `port` with the files in `n`, one `rpc` relay to anvil in
/// the default selection, outcomes to the appliance's signer.
fn submitter_toml(n: &Path, port: u16, anvil: &Anvil, app: &Appliance) -> String {
    format!(
        r#"[api]
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:0"

[tls]
cert = "{n}/server.pem"
key = "{n}/server.key"
client_ca = "{n}/ca.pem"

[[identities]]
identity = "{SIGNER_ID}"
roles = ["signer"]

[[identities]]
identity = "{OPS_ID}"
roles = ["admin"]

[signer]
url = "https://localhost:{signer_port}"
tls = {{ server_ca = "{ca}", cert = "{cert}", key = "{key}" }}

[chain]
chain_id = {chain}
node_url = "{anvil}"
poll_interval_ms = 50
confirmations = 0

[store]
path = "{n}/submitter.db"

[[relay]]
name = "anvil"
kind = "rpc"
url = "{anvil}"
default = true
"#,
        n = n.display(),
        signer_port = app.addr.port(),
        ca = app.path("ca.pem").display(),
        cert = app.path("submitter.pem").display(),
        key = app.path("submitter.key").display(),
        chain = support::CHAIN_ID,
        anvil = anvil.url(),
    )
}

/// A child process whose stdout and stderr go to a log file; killed on drop, and its log printed
/// if the test is failing.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, command: &mut Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
        Self { name, child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a line starting with `prefix` in the log.
    fn wait_line(&mut self, prefix: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let file = std::fs::File::open(&self.log).unwrap();
            if BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .any(|l| l.starts_with(prefix))
            {
                return;
            }
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "{} did not print {prefix:?}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until something accepts connections on 127.0.0.1:`port`.
    fn wait_port(&mut self, port: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "{} does not listen on {port}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn check_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited ({status}):\n{}", self.name, self.output());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.name, self.output());
        }
    }
}

/// The logs of `daemons`, for a failure message.
fn dump(daemons: &[&Daemon]) -> String {
    daemons
        .iter()
        .map(|d| format!("\n---- {} log ----\n{}", d.name, d.output()))
        .collect()
}

/// Runs a command to completion within `timeout` and returns its stdout; fails the test (with
/// its output and the daemons' logs) if it fails or hangs.
fn run(command: &mut Command, timeout: Duration, daemons: &[&Daemon]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => stdout,
        other => panic!(
            "{command:?} {}:\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}{}",
            other.map_or_else(|| format!("timed out after {timeout:?}"), |s| s.to_string()),
            dump(daemons)
        ),
    }
}

/// The `submitter` binary of the same build: `target/<profile>/submitter`, next to the `deps`
/// directory this test runs from, or `CASTELLAN_SUBMITTER_BIN`.
fn submitter_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CASTELLAN_SUBMITTER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()));
    let path = profile_dir.join("submitter");
    assert!(
        path.is_file(),
        "the submitter binary is not at {}: build it with `cargo build -p castellan-submitter` \
         (`cargo test --workspace` builds it), or name it in CASTELLAN_SUBMITTER_BIN",
        path.display()
    );
    path
}

fn tool_env(name: &str) -> PathBuf {
    let path = std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "{name} is not set: run the tests with scripts/test (or `source scripts/tools.sh`)"
            )
        });
    assert!(path.is_file(), "{name}={} does not exist", path.display());
    path
}

/// stunnel from `CASTELLAN_STUNNEL`, else `stunnel4` or `stunnel` on the PATH.
fn stunnel_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CASTELLAN_STUNNEL") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| [dir.join("stunnel4"), dir.join("stunnel")])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "stunnel is not installed: run scripts/test (it installs Debian's stunnel4), \
                 or name the binary in CASTELLAN_STUNNEL"
            )
        })
}

/// A TCP port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
