//! A whole signer appliance for end-to-end tests: a SoftHSM token with keys generated on it, a
//! SQLite store with them registered, a development CA with server and client certificates, a
//! policy file, and the real `signer` binary serving mTLS on 127.0.0.1 with port 0.
//!
//! Runs inside a test process of its own (`castellan_tests::softhsm::in_own_process`), because
//! SoftHSM reads `SOFTHSM2_CONF` from the process environment.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use alloy::primitives::Address;
use castellan_api::devpki::{DevCa, LeafSpec, write_file};
use castellan_api::tls::ClientTlsConfig;
use castellan_signer::audit::{AuditRecord, UnixMillis};
use castellan_signer::backend::KeyBackend;
use castellan_signer::backend::pkcs11::{PinSource, Pkcs11Backend, Pkcs11Config};
use castellan_signer::store::{Change, KeyName, KeyVersion, NewKeyVersion, SqliteStore, Store};
use castellan_tests::softhsm::{PIN_ENV, SoftHsmToken};

/// The chain anvil runs.
pub const CHAIN_ID: u64 = 31337;

/// The load benches' policy: three velocity windows and a rate limit, every limit far above
/// what a run reaches, so each request reserves four windows and is signed.
pub const LOAD_POLICY: &str = r#"
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
max_cost = "1000000 ether"

[[defaults.velocity]]
window = "1h"
max_value = "1000000 ether"

[[defaults.velocity]]
window = "24h"
max_cost = "1000000 ether"

[[defaults.rate]]
window = "1s"
max_requests = 1000000

[[keys]]
name = "hot"

[[keys]]
name = "cold"

[[clients]]
identity = "spiffe://castellan/strategy/alpha"
keys = ["hot", "cold"]
"#;

/// An EIP-1559 transfer of 1 wei to `0x1111…` (`/v1/keys/{name}/sign/transaction` body) with
/// `nonce`.
pub fn transfer(nonce: u64) -> serde_json::Value {
    transfer_to(nonce, Address::repeat_byte(0x11), 1)
}

/// An EIP-1559 transfer of `value` wei to `to` on [`CHAIN_ID`] (a
/// `/v1/keys/{name}/sign/transaction` body), gas 21000, max fee 2 gwei, priority fee 1 gwei.
pub fn transfer_to(nonce: u64, to: Address, value: u128) -> serde_json::Value {
    serde_json::json!({ "tx": {
        "chainId": CHAIN_ID.to_string(),
        "nonce": nonce.to_string(),
        "to": to.to_string(),
        "value": value.to_string(),
        "gas": "21000",
        "maxFeePerGas": "0x77359400",
        "maxPriorityFeePerGas": "0x3b9aca00",
    }})
}

/// The start of a bench's `main`. Under `cargo test --benches` (no `--bench` argument) it prints
/// how to run `bench` and returns `Err(SUCCESS)`, so the test suite does not spend minutes there.
/// Otherwise: the SoftHSM token this process was given, or, when it has none, a fresh token
/// `label` and this binary run again with it (`Err` carries that run's exit code; SoftHSM reads
/// its configuration from the process environment).
pub fn bench_token(label: &str, bench: &str) -> Result<SoftHsmToken, std::process::ExitCode> {
    use std::process::ExitCode;
    if !std::env::args().any(|a| a == "--bench") {
        println!("{bench}: run with `cargo bench --bench {bench}`");
        return Err(ExitCode::SUCCESS);
    }
    let Some(token) = SoftHsmToken::from_env() else {
        let token = SoftHsmToken::new(label).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap());
        child.args(std::env::args_os().skip(1));
        token.configure(&mut child);
        let status = child.status().expect("cannot re-execute the bench");
        return Err(if status.success() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    };
    Ok(token)
}

/// One configured caller: certificate stem, SAN URI, roles, keys.
pub struct Caller {
    pub stem: &'static str,
    pub uri: &'static str,
    pub roles: &'static [&'static str],
    pub keys: &'static [&'static str],
}

/// The callers every test appliance has.
pub const CALLERS: &[Caller] = &[
    Caller {
        stem: "alpha",
        uri: "spiffe://castellan/strategy/alpha",
        roles: &["strategy"],
        keys: &["hot", "cold"],
    },
    Caller {
        stem: "beta",
        uri: "spiffe://castellan/strategy/beta",
        roles: &["strategy"],
        keys: &["cold"],
    },
    Caller {
        stem: "ops",
        uri: "spiffe://castellan/ops/oncall",
        roles: &["admin", "auditor"],
        keys: &["*"],
    },
    Caller {
        stem: "submitter",
        uri: "spiffe://castellan/submitter",
        roles: &["submitter"],
        keys: &["relay"],
    },
    Caller {
        stem: "approver1",
        uri: "spiffe://castellan/approver/1",
        roles: &["approver"],
        keys: &[],
    },
    Caller {
        stem: "approver2",
        uri: "spiffe://castellan/approver/2",
        roles: &["approver"],
        keys: &[],
    },
    Caller {
        stem: "approver3",
        uri: "spiffe://castellan/approver/3",
        roles: &["approver"],
        keys: &[],
    },
];

/// A test policy over keys `hot` and `cold`, with a 2-of-3 tier above 1 ether for approvers
/// `approvers` (their Ethereum addresses).
pub fn policy_toml(approvers: &[Address]) -> String {
    let set = approvers
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
[approval_domain]
chain_id = {CHAIN_ID}

[defaults]
chain_ids = [{CHAIN_ID}]
allow_contract_creation = false
max_value = "10 ether"
max_gas_limit = 1_000_000
max_fee_per_gas = "100 gwei"
max_priority_fee_per_gas = "10 gwei"
max_cost = "20 ether"
personal_sign = true
typed_data = false
breaker = {{ failures = 3, cooldown = "10m" }}

[[keys]]
name = "hot"

[[keys]]
name = "cold"

[[keys]]
name = "relay"
relay_auth = true

[[clients]]
identity = "spiffe://castellan/strategy/alpha"
keys = ["hot", "cold"]

[[clients]]
identity = "spiffe://castellan/strategy/beta"
keys = ["cold"]

[[clients]]
identity = "spiffe://castellan/submitter"
keys = ["relay"]

[approvers]
risk = [{set}]

[[tiers]]
name = "large-transfer"
approvers = "risk"
threshold = 2
above_value = "1 ether"

[[tiers]]
name = "unfreeze"
approvers = "risk"
threshold = 2
operation = "unfreeze"

[[tiers]]
name = "policy-change"
approvers = "risk"
threshold = 2
operation = "policy_change"
"#
    )
}

/// A running signer and everything it stands on.
pub struct Appliance {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub keys: HashMap<String, Address>,
    pub ca: DevCa,
    child: Option<Child>,
    config: PathBuf,
    metrics_addr: std::sync::Arc<std::sync::Mutex<Option<SocketAddr>>>,
    stderr_path: PathBuf,
}

impl Appliance {
    /// Generates `keys` on the token, registers them, writes certificates, policy and config,
    /// and starts the signer.
    pub async fn start(token: &SoftHsmToken, keys: &[&str], policy: &str) -> Self {
        Self::start_with(token, keys, policy, "").await
    }

    /// Like [`Appliance::start`], appending `extra` (TOML tables) to signer.toml.
    pub async fn start_with(
        token: &SoftHsmToken,
        keys: &[&str],
        policy: &str,
        extra: &str,
    ) -> Self {
        Self::start_full(token, keys, policy, extra, 2).await
    }

    /// Like [`Appliance::start_with`], with `sessions` HSM sessions.
    pub async fn start_full(
        token: &SoftHsmToken,
        keys: &[&str],
        policy: &str,
        extra: &str,
        sessions: usize,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut ca = DevCa::new("Castellan test CA").unwrap();
        ca.write(d, "ca").unwrap();
        ca.issue(&LeafSpec::server_localhost())
            .unwrap()
            .write(d, "server")
            .unwrap();
        for c in CALLERS {
            ca.issue(&LeafSpec::client_uri(c.uri))
                .unwrap()
                .write(d, c.stem)
                .unwrap();
        }
        // A configured-looking identity whose certificate is revoked, and one nobody configured.
        let revoked = ca
            .issue(&LeafSpec::client_uri("spiffe://castellan/strategy/revoked"))
            .unwrap();
        revoked.write(d, "revoked").unwrap();
        ca.issue(&LeafSpec::client_uri("spiffe://castellan/strategy/unknown"))
            .unwrap()
            .write(d, "unknown")
            .unwrap();
        let crl = ca.crl_pem(1, &[revoked.serial], 3600).unwrap();
        write_file(&d.join("ca.crl"), crl.as_bytes(), 0o644).unwrap();
        // A client of another CA, presenting alpha's identity.
        let mut other = DevCa::new("Another CA").unwrap();
        other
            .issue(&LeafSpec::client_uri("spiffe://castellan/strategy/alpha"))
            .unwrap()
            .write(d, "stranger")
            .unwrap();

        let pin_file = match token.write_pin_file() {
            Ok(p) => p,
            // A second appliance on the same token reuses the PIN file.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                token.root().join("user.pin")
            }
            Err(e) => panic!("{e}"),
        };
        let backend_cfg = Pkcs11Config::new(
            token.module(),
            token.label(),
            PinSource::Env(PIN_ENV.into()),
        );
        let db = d.join("signer.db");
        let mut addresses = HashMap::new();
        {
            let backend = Pkcs11Backend::open(&backend_cfg).unwrap();
            let store = SqliteStore::open(&db).unwrap();
            for name in keys {
                let label = format!("{name}@1");
                // A second appliance on the same token reuses the key.
                let info = match backend.generate(&label).await {
                    Ok(info) => info,
                    Err(castellan_signer::backend::BackendError::KeyExists(_)) => {
                        backend.find_by_label(&label).await.unwrap()
                    }
                    Err(e) => panic!("{e}"),
                };
                let change = Change::new("test-provisioning", UnixMillis::now());
                let kn = KeyName::new(*name).unwrap();
                store
                    .register_key_version(
                        NewKeyVersion {
                            name: kn.clone(),
                            key_ref: info.key_ref.clone(),
                            address: info.address,
                            public_key: info.public_key.to_encoded_point(false).as_bytes().to_vec(),
                            rotate_every_ms: None,
                        },
                        change.clone(),
                    )
                    .await
                    .unwrap();
                store
                    .activate_version(KeyVersion::new(kn, 1), None, change)
                    .await
                    .unwrap();
                addresses.insert((*name).to_owned(), info.address);
            }
        }
        std::fs::write(d.join("policy.toml"), policy).unwrap();

        let identities: String = CALLERS
            .iter()
            .map(|c| {
                format!(
                    "[[identities]]\nidentity = \"{}\"\nroles = [{}]\nkeys = [{}]\n\n",
                    c.uri,
                    c.roles
                        .iter()
                        .map(|r| format!("\"{r}\""))
                        .collect::<Vec<_>>()
                        .join(", "),
                    c.keys
                        .iter()
                        .map(|k| format!("\"{k}\""))
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })
            .collect();
        let config = format!(
            r#"chain_id = {CHAIN_ID}
listen = "127.0.0.1:0"

[tls]
cert = "{d}/server.pem"
key = "{d}/server.key"
client_ca = "{d}/ca.pem"
crl = ["{d}/ca.crl"]

{identities}
[backend]
type = "pkcs11"
module = "{module}"
token_label = "{label}"
pin_file = "{pin}"
sessions = {sessions}

[store]
path = "{db}"

[policy]
path = "{d}/policy.toml"

[limits]
max_body_bytes = 1048576
pending_ttl = "10m"

{hardening}{extra}
"#,
            // Tests run as root; the signer refuses root unless told (a test that sets its own
            // [hardening] in `extra` decides for itself).
            hardening = if extra.contains("[hardening]") {
                ""
            } else {
                "[hardening]\nallow_root = true\n\n"
            },
            d = d.display(),
            module = token.module().display(),
            label = token.label(),
            pin = pin_file.display(),
            db = db.display(),
        );
        let config_path = d.join("signer.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut app = Self {
            stderr_path: d.join("signer.stderr"),
            dir,
            addr: "127.0.0.1:0".parse().unwrap(),
            keys: addresses,
            ca,
            child: None,
            config: config_path,
            metrics_addr: Default::default(),
        };
        app.spawn();
        app
    }

    /// Starts the signer binary (again) and waits for its "listening" line.
    pub fn spawn(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_signer"))
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let metrics = self.metrics_addr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("signer listening on ") {
                    let _ = tx.send(a.trim().to_owned());
                } else if let Some(a) = line.strip_prefix("signer metrics on ") {
                    *metrics.lock().unwrap() = a.trim().parse().ok();
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => self.addr = a.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!("signer did not start:\n{}", self.stderr());
            }
        }
        self.child = Some(child);
    }

    /// The Prometheus text of the signer's metrics listener (needs `[metrics]` in `extra`).
    pub async fn metrics(&self) -> String {
        let mut addr = None;
        for _ in 0..100 {
            addr = *self.metrics_addr.lock().unwrap();
            if addr.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let addr = addr.expect("the signer printed no metrics address");
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The signer's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the signer gracefully (SIGTERM) and waits up to 20 s for it to exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .expect("kill -TERM");
            assert!(status.success(), "kill -TERM failed");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                if c.try_wait().expect("wait").is_some() {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the signer did not stop within 20 s of SIGTERM"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }

    /// Stops the signer (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The signer's log so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An HTTPS client presenting the certificate `<stem>.pem` (`None`: no client certificate).
    pub fn client(&self, stem: Option<&str>) -> reqwest::Client {
        let builder = reqwest::Client::builder()
            .resolve("localhost", self.addr)
            .timeout(Duration::from_secs(20));
        let cfg = match stem {
            Some(stem) => ClientTlsConfig {
                server_ca: self.path("ca.pem"),
                cert: self.path(&format!("{stem}.pem")),
                key: self.path(&format!("{stem}.key")),
            }
            .build()
            .unwrap(),
            None => {
                let mut roots = rustls::RootCertStore::empty();
                use rustls::pki_types::pem::PemObject;
                for c in
                    rustls::pki_types::CertificateDer::pem_file_iter(self.path("ca.pem")).unwrap()
                {
                    roots.add(c.unwrap()).unwrap();
                }
                rustls::ClientConfig::builder_with_provider(castellan_api::tls::provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth()
            }
        };
        builder.tls_backend_preconfigured(cfg).build().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// The whole audit chain, read through the auditor API.
    pub async fn audit(&self) -> Vec<AuditRecord> {
        let text = self
            .client(Some("ops"))
            .get(self.url("/v1/audit"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        castellan_signer::audit::read_jsonl(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// The raw JSON-lines export.
    pub async fn audit_export(&self) -> String {
        self.client(Some("ops"))
            .get(self.url("/v1/audit"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- signer log ----\n{}", self.stderr());
        }
    }
}

/// Counts audit records of a kind.
pub fn count_kind(records: &[AuditRecord], kind: &str) -> usize {
    records.iter().filter(|r| r.kind.as_str() == kind).count()
}

/// Whether some refusal record carries `code`.
pub fn refused_with(records: &[AuditRecord], code: &str) -> bool {
    records.iter().any(|r| {
        r.kind.as_str() == "refusal" && r.payload.get("code").and_then(|c| c.as_str()) == Some(code)
    })
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The `q` quantile (0–1; the upper bound of its bucket, seconds) of one histogram series over
/// the interval between two Prometheus text scrapes: `bucket_prefix` is the series' `…_bucket{`
/// and `label` a label it must carry (e.g. `stage="sign"`). `None` when nothing was observed.
pub fn histogram_quantile(
    before: &str,
    after: &str,
    bucket_prefix: &str,
    label: &str,
    q: f64,
) -> Option<f64> {
    let buckets = |text: &str| -> Vec<(f64, f64)> {
        text.lines()
            .filter(|l| l.starts_with(bucket_prefix) && l.contains(label))
            .filter_map(|l| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, l.rsplit(' ').next()?.parse().ok()?))
            })
            .collect()
    };
    let (b, a) = (buckets(before), buckets(after));
    let delta: Vec<(f64, f64)> = a
        .iter()
        .map(|(le, n)| {
            let old = b.iter().find(|(l, _)| l == le).map_or(0.0, |(_, n)| *n);
            (*le, n - old)
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, n)| *n);
    if total <= 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, n)| *n >= total * q)
        .map(|(le, _)| *le)
}
