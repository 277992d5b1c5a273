//! Secrets stay in their files: an end-to-end run of both binaries (signer on a SoftHSM token,
//! submitter sending bundles to a bloXroute stand-in that checks its `Authorization` value), with
//! successes, refusals, relay failures, a signer given a wrong PIN and a submitter given a
//! world-readable auth file — then every log line (stdout and stderr of every process, at
//! `RUST_LOG=debug`), every response body (errors included), both metrics pages, and every file
//! in the run's directories other than the secret files is searched for the PINs (user and SO,
//! also hex- and base64-encoded), the bloXroute `Authorization` value, and the TLS private keys
//! (PEM lines and raw scalars).
//! Nothing may be found. Every secret file is mode 0600.
//!
//! The secret files, by definition (everything else is searched):
//! - the HSM PIN file (`user.pin`) and the wrong PIN file of the refused start (`wrong.pin`);
//! - SoftHSM's token directory (`tokens/`: it is the HSM's own storage, the device itself);
//! - every TLS private key (`*.key`: the two development CAs, servers, clients);
//! - the bloXroute `Authorization` file (`bloxroute.auth`), and the decoy copy of mode 0644 that
//!   the submitter must refuse (`bloxroute-open.auth`, not required to be 0600).
//!
//! The HSM's Ethereum keys are not searched for: they are generated non-extractable and sensitive
//! on the token, so no process — this test included — can read them to look for them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, address};
use castellan_api::devpki::{DevCa, LeafSpec, write_file};
use castellan_api::tls::ClientTlsConfig;
use castellan_tests::anvil::Anvil;
use castellan_tests::relays::{Behavior, Flavor, StandInRelay};
use castellan_tests::softhsm::{SO_PIN, USER_PIN, in_own_process};
use rand::RngCore;
use serde_json::{Value, json};
use support::{Appliance, CHAIN_ID, policy_toml, runtime};

const RECIPIENT: Address = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");
const SIGNER_ID: &str = "spiffe://castellan/signer";
const OPS_ID: &str = "spiffe://castellan/ops/oncall";

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn tx(nonce: u64, value: u128) -> Value {
    json!({
        "chainId": CHAIN_ID.to_string(),
        "nonce": nonce.to_string(),
        "to": RECIPIENT.to_string(),
        "value": value.to_string(),
        "gas": "21000",
        "maxFeePerGas": "0x77359400",
        "maxPriorityFeePerGas": "0x3b9aca00",
    })
}

#[test]
fn no_secret_in_logs_error_bodies_or_files_and_secret_files_are_0600() {
    in_own_process(
        "no_secret_in_logs_error_bodies_or_files_and_secret_files_are_0600",
        "secrets",
        |token| {
            runtime().block_on(async {
                let submitter_bin = submitter_binary();
                let anvil = Anvil::start().await;
                let auth_value = format!("castellan-blxr-{}", random_hex(24));
                let relay = StandInRelay::start(
                    Flavor::Bloxroute {
                        auth: auth_value.clone(),
                    },
                    Behavior::Normal,
                    Some(anvil.provider().clone()),
                )
                .await;

                // The submitter's side: its CA and certificates, and the bloXroute auth file.
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
                let auth_file = n.join("bloxroute.auth");
                write_file(&auth_file, format!("{auth_value}\n").as_bytes(), 0o600).unwrap();
                let submitter_port = free_port();

                // The signer: provisioned by the test appliance, then run again here with its
                // whole stdout and stderr in files and debug logging.
                let approvers: Vec<Address> = (1..=3).map(Address::repeat_byte).collect();
                let extra = format!(
                    "[metrics]\nlisten = \"127.0.0.1:0\"\n\n\
                     [submitter]\nurl = \"https://localhost:{submitter_port}\"\n\
                     tls = {{ server_ca = \"{n}/ca.pem\", cert = \"{n}/signer.pem\", key = \"{n}/signer.key\" }}\n",
                    n = n.display(),
                );
                let mut app =
                    Appliance::start_with(token, &["hot"], &policy_toml(&approvers), &extra).await;
                app.kill();
                let signer_config = app.path("signer.toml");
                let mut signer = Daemon::spawn(
                    "signer",
                    Command::new(env!("CARGO_BIN_EXE_signer"))
                        .arg("--config")
                        .arg(&signer_config),
                    app.path("run-signer"),
                );
                let addr = signer.wait_stdout_line("signer listening on ", Duration::from_secs(30));
                app.addr = addr.parse().unwrap();

                let submitter_config = n.join("submitter.toml");
                std::fs::write(
                    &submitter_config,
                    submitter_toml(n, submitter_port, &anvil, &app, &relay, &auth_file),
                )
                .unwrap();
                let mut submitter = Daemon::spawn(
                    "submitter",
                    Command::new(&submitter_bin)
                        .arg("--config")
                        .arg(&submitter_config),
                    n.join("run-submitter"),
                );
                submitter.wait_stdout_line("submitter listening on ", Duration::from_secs(30));

                // Traffic: bundles through the signer to the submitter and bloXroute, a plain
                // signature, and refusals of every kind; every response body is kept.
                let mut bodies: Vec<String> = Vec::new();
                let alpha = app.client(Some("alpha"));
                let bundle = |nonce: u64| {
                    json!({ "txs": [{ "tx": tx(nonce, 1000) }], "targetBlock": "0x5" })
                };
                let post = |client: reqwest::Client, path: &str, body: Value| {
                    let url = app.url(path);
                    async move {
                        let r = client.post(url).json(&body).send().await.unwrap();
                        let status = r.status().as_u16();
                        (status, r.text().await.unwrap())
                    }
                };
                let (s, b) = post(alpha.clone(), "/v1/keys/hot/sign/bundle", bundle(0)).await;
                assert_eq!(s, 200, "{b}");
                let v: Value = serde_json::from_str(&b).unwrap();
                assert_eq!(v["submitted"]["accepted"], true, "{b}");
                bodies.push(b);
                relay
                    .wait_for("a bundle", Duration::from_secs(20), |r| {
                        r.method == "blxr_submit_bundle"
                    })
                    .await;
                assert!(
                    relay.violations().is_empty(),
                    "the stand-in saw a wrong Authorization or shape: {:?}",
                    relay.violations()
                );
                let (s, b) = post(
                    alpha.clone(),
                    "/v1/keys/hot/sign/transaction",
                    json!({ "tx": tx(1, 1000) }),
                )
                .await;
                assert_eq!(s, 200, "{b}");
                bodies.push(b);
                // Refusals: unknown identity, a key not allowed, a role not held, a value over
                // the cap, a missing key, a malformed body.
                for (who, path, body, want) in [
                    ("unknown", "/v1/keys/hot/sign/transaction", json!({ "tx": tx(2, 1) }), 403),
                    ("beta", "/v1/keys/hot/sign/transaction", json!({ "tx": tx(2, 1) }), 403),
                    ("approver1", "/v1/keys/hot/sign/transaction", json!({ "tx": tx(2, 1) }), 403),
                    (
                        "alpha",
                        "/v1/keys/hot/sign/transaction",
                        json!({ "tx": tx(2, 50_000_000_000_000_000_000) }),
                        422,
                    ),
                    ("alpha", "/v1/keys/nope/sign/transaction", json!({ "tx": tx(2, 1) }), 403),
                    ("alpha", "/v1/keys/hot/sign/transaction", json!({ "tx": "garbage" }), 400),
                    ("alpha", "/v1/admin/freeze", json!({ "reason": "x" }), 403),
                ] {
                    let (s, b) = post(app.client(Some(who)), path, body).await;
                    assert!(s >= 400, "{who} {path}: {s} {b}");
                    assert_eq!(s / 100, want / 100, "{who} {path}: {b}");
                    bodies.push(b);
                }
                // The relay fails (HTTP 500, then garbage): the submitter logs relay errors.
                for (i, behavior) in [Behavior::ServerError, Behavior::Garbage]
                    .into_iter()
                    .enumerate()
                {
                    relay.set_behavior(behavior);
                    let before = relay.received().len();
                    let (s, b) = post(
                        alpha.clone(),
                        "/v1/keys/hot/sign/bundle",
                        bundle(10 + i as u64),
                    )
                    .await;
                    assert_eq!(s, 200, "{b}");
                    bodies.push(b);
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while relay.received().len() == before {
                        assert!(Instant::now() < deadline, "the relay got nothing");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                // The submitter's own API: an unknown bundle, a malformed submission.
                let ops = submitter_client(n, submitter_port, "ops");
                let r = ops
                    .get(format!(
                        "https://localhost:{submitter_port}/v1/bundles/{}",
                        uuid::Uuid::new_v4()
                    ))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_client_error());
                bodies.push(r.text().await.unwrap());
                let r = submitter_client(n, submitter_port, "signer")
                    .post(format!("https://localhost:{submitter_port}/v1/bundles"))
                    .json(&json!({ "txs": ["0x00"] }))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_client_error());
                bodies.push(r.text().await.unwrap());
                // Both metrics pages count as output too.
                let signer_metrics =
                    signer.wait_stdout_line("signer metrics on ", Duration::from_secs(5));
                let submitter_metrics =
                    submitter.wait_stdout_line("submitter metrics on ", Duration::from_secs(5));
                for m in [signer_metrics, submitter_metrics] {
                    let text = reqwest::get(format!("http://{m}/metrics"))
                        .await
                        .unwrap()
                        .text()
                        .await
                        .unwrap();
                    assert!(text.contains("# TYPE"), "{m}: {text}");
                    bodies.push(text);
                }
                // Give the submitter a moment to log the relays' answers, then stop both.
                tokio::time::sleep(Duration::from_millis(500)).await;
                drop(signer);
                drop(submitter);

                // A signer given a wrong PIN refuses to start; its error must not show the PIN.
                let wrong_pin = format!("7{}", random_hex(8));
                let wrong_pin_file = app.path("wrong.pin");
                write_file(&wrong_pin_file, format!("{wrong_pin}\n").as_bytes(), 0o600).unwrap();
                let pin_file = token.root().join("user.pin");
                let text = std::fs::read_to_string(&signer_config).unwrap();
                assert!(text.contains(&pin_file.display().to_string()));
                let wrong_config = app.path("signer-wrong-pin.toml");
                std::fs::write(
                    &wrong_config,
                    text.replace(
                        &pin_file.display().to_string(),
                        &wrong_pin_file.display().to_string(),
                    ),
                )
                .unwrap();
                let mut refused = Daemon::spawn(
                    "signer with a wrong PIN",
                    Command::new(env!("CARGO_BIN_EXE_signer"))
                        .arg("--config")
                        .arg(&wrong_config),
                    app.path("run-signer-wrong-pin"),
                );
                let status = refused.wait_exit(Duration::from_secs(30));
                assert!(!status.success(), "it started with a wrong PIN");
                assert!(
                    refused.stderr().to_lowercase().contains("pin"),
                    "the error does not say what is wrong: {}",
                    refused.stderr()
                );

                // A submitter given a world-readable auth file refuses it, without showing it.
                let open_value = format!("castellan-open-{}", random_hex(24));
                let open_file = n.join("bloxroute-open.auth");
                write_file(&open_file, format!("{open_value}\n").as_bytes(), 0o644).unwrap();
                let open_config = n.join("submitter-open-auth.toml");
                std::fs::write(
                    &open_config,
                    submitter_toml(n, free_port(), &anvil, &app, &relay, &open_file),
                )
                .unwrap();
                let mut open = Daemon::spawn(
                    "submitter with a 0644 auth file",
                    Command::new(&submitter_bin).arg("--config").arg(&open_config),
                    n.join("run-submitter-open-auth"),
                );
                let status = open.wait_exit(Duration::from_secs(30));
                assert!(!status.success(), "it accepted a world-readable auth file");
                assert!(
                    open.stderr().contains("bloxroute-open.auth"),
                    "the refusal does not name the file: {}",
                    open.stderr()
                );

                // What must not appear anywhere.
                let mut secret_files: Vec<PathBuf> = vec![pin_file.clone(), wrong_pin_file];
                secret_files.extend(files_under(&token.root().join("tokens")));
                for dir in [app.dir.path(), n] {
                    secret_files.extend(
                        files_under(dir)
                            .into_iter()
                            .filter(|p| p.extension().is_some_and(|e| e == "key")),
                    );
                }
                secret_files.push(auth_file.clone());
                let mut needles: Vec<Needle> = Vec::new();
                for (what, pin) in [
                    ("user PIN", USER_PIN.to_owned()),
                    ("SO PIN", SO_PIN.to_owned()),
                    ("wrong PIN", wrong_pin.clone()),
                ] {
                    needles.extend(Needle::encodings(what, &pin, true));
                }
                for (what, v) in [
                    ("bloXroute auth", auth_value.clone()),
                    ("refused bloXroute auth", open_value.clone()),
                ] {
                    needles.extend(Needle::encodings(what, &v, false));
                }
                let mut keys = 0;
                for key in secret_files
                    .iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "key"))
                {
                    keys += 1;
                    needles.extend(Needle::private_key(key));
                }
                assert!(keys >= 10, "only {keys} TLS private keys found");

                // The search works: each secret is found in its own file.
                let found_in = |path: &Path, what: &str| {
                    let bytes = std::fs::read(path).unwrap();
                    needles
                        .iter()
                        .filter(|n| n.what.starts_with(what))
                        .any(|n| n.found(&bytes))
                };
                assert!(found_in(&pin_file, "user PIN"));
                assert!(found_in(&auth_file, "bloXroute auth"));
                assert!(found_in(&open_file, "refused bloXroute auth"));
                assert!(found_in(&n.join("ca.key"), "private key"));

                // Every secret file is 0600 (the refused decoy aside).
                for f in &secret_files {
                    let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
                    assert_eq!(mode, 0o600, "{} has mode {mode:o}", f.display());
                }

                // Search: every other file of the run (logs, configs, certificates, CRLs, both
                // stores with their WAL files, the token's configuration), and the bodies.
                let mut searched = 0usize;
                let mut leaks = Vec::new();
                for dir in [app.dir.path(), n, token.root()] {
                    for f in files_under(dir) {
                        if secret_files.contains(&f) || f == open_file {
                            continue;
                        }
                        let bytes = std::fs::read(&f).unwrap();
                        searched += bytes.len();
                        for needle in &needles {
                            if needle.found(&bytes) {
                                leaks.push(format!("{} in {}", needle.what, f.display()));
                            }
                        }
                    }
                }
                for (i, b) in bodies.iter().enumerate() {
                    for needle in &needles {
                        if needle.found(b.as_bytes()) {
                            leaks.push(format!("{} in response body {i}: {b}", needle.what));
                        }
                    }
                }
                assert!(leaks.is_empty(), "secrets found:\n{}", leaks.join("\n"));
                // The search covered real logs, not empty files.
                for (log, must) in [
                    (app.path("run-signer.stderr"), "signer ready"),
                    (n.join("run-submitter.stderr"), "submitter ready"),
                ] {
                    let text = std::fs::read_to_string(&log).unwrap();
                    assert!(
                        text.lines().count() > 10 && text.contains(must),
                        "{} is too thin to show anything:\n{text}",
                        log.display()
                    );
                }
                println!(
                    "searched {searched} bytes in the run's files and {} response bodies for {} \
                     needles; {} secret files, all 0600",
                    bodies.len(),
                    needles.len(),
                    secret_files.len()
                );
            })
        },
    );
}

/// One thing to look for.
struct Needle {
    what: String,
    bytes: Vec<u8>,
    /// Only as a whole token (not inside a longer run of letters and digits): a short numeric
    /// PIN also occurs by chance inside hashes and numbers.
    bounded: bool,
}

impl Needle {
    /// `value` as it is, hex-encoded and base64-encoded.
    fn encodings(what: &str, value: &str, bounded: bool) -> Vec<Needle> {
        vec![
            Needle {
                what: what.to_owned(),
                bytes: value.as_bytes().to_vec(),
                bounded,
            },
            Needle {
                what: format!("{what} (hex)"),
                bytes: hex::encode(value).into_bytes(),
                bounded: false,
            },
            Needle {
                what: format!("{what} (base64)"),
                bytes: base64_no_pad(value.as_bytes()).into_bytes(),
                bounded: false,
            },
        ]
    }

    /// A PEM private key: each full line of its base64 body, and the raw EC scalar in hex.
    fn private_key(path: &Path) -> Vec<Needle> {
        let pem = std::fs::read_to_string(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut out: Vec<Needle> = pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 40)
            .map(|l| Needle {
                what: format!("private key {name} (PEM line)"),
                bytes: l.as_bytes().to_vec(),
                bounded: false,
            })
            .collect();
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::PrivateKeyDer::from_pem_file(path).unwrap();
        let der = der.secret_der();
        // ECPrivateKey: version 1, then the 32-byte private scalar (OCTET STRING).
        let marker = [0x02, 0x01, 0x01, 0x04, 0x20];
        let at = der
            .windows(marker.len())
            .position(|w| w == marker)
            .unwrap_or_else(|| panic!("{name}: no EC private scalar"));
        let scalar = &der[at + marker.len()..at + marker.len() + 32];
        for s in [hex::encode(scalar), hex::encode_upper(scalar)] {
            out.push(Needle {
                what: format!("private key {name} (scalar hex)"),
                bytes: s.into_bytes(),
                bounded: false,
            });
        }
        out.push(Needle {
            what: format!("private key {name} (scalar bytes)"),
            bytes: scalar.to_vec(),
            bounded: false,
        });
        assert!(out.len() >= 4, "{name}: nothing to look for");
        out
    }

    fn found(&self, hay: &[u8]) -> bool {
        let n = &self.bytes;
        hay.windows(n.len()).enumerate().any(|(i, w)| {
            w == n.as_slice()
                && (!self.bounded
                    || ((i == 0 || !hay[i - 1].is_ascii_alphanumeric())
                        && hay
                            .get(i + n.len())
                            .is_none_or(|c| !c.is_ascii_alphanumeric())))
        })
    }
}

/// Standard base64 of the whole 3-byte groups of `bytes` (what follows the value changes the
/// last, partial group, so it is left out).
fn base64_no_pad(bytes: &[u8]) -> String {
    let bytes = &bytes[..bytes.len() - bytes.len() % 3];
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Every regular file under `dir` (recursively).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let ft = std::fs::symlink_metadata(&p).unwrap().file_type();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                out.push(p);
            }
        }
        assert!(
            out.len() < 10_000,
            "unexpectedly many files under {}",
            dir.display()
        );
    }
    out
}

/// `submitter.toml`: mTLS listener on `port`, one bloXroute relay with `auth`, outcomes to the
/// appliance's signer.
fn submitter_toml(
    n: &Path,
    port: u16,
    anvil: &Anvil,
    app: &Appliance,
    relay: &StandInRelay,
    auth: &Path,
) -> String {
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
chain_id = {CHAIN_ID}
node_url = "{anvil}"
poll_interval_ms = 50
confirmations = 0

[store]
path = "{n}/submitter.db"

[[relay]]
name = "bloxroute"
kind = "bloxroute"
url = "{relay}"
auth_header_file = "{auth}"
"#,
        n = n.display(),
        signer_port = app.addr.port(),
        ca = app.path("ca.pem").display(),
        cert = app.path("submitter.pem").display(),
        key = app.path("submitter.key").display(),
        anvil = anvil.url(),
        relay = relay.url(),
        auth = auth.display(),
    )
}

fn submitter_client(n: &Path, port: u16, stem: &str) -> reqwest::Client {
    let cfg = ClientTlsConfig {
        server_ca: n.join("ca.pem"),
        cert: n.join(format!("{stem}.pem")),
        key: n.join(format!("{stem}.key")),
    }
    .build()
    .unwrap();
    reqwest::Client::builder()
        .resolve("localhost", SocketAddr::from(([127, 0, 0, 1], port)))
        .timeout(Duration::from_secs(10))
        .tls_backend_preconfigured(cfg)
        .build()
        .unwrap()
}

/// A child process with its stdout and stderr in `<base>.stdout` / `<base>.stderr`, logging at
/// debug level; killed on drop, and its output printed if the test is failing.
struct Daemon {
    name: &'static str,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, command: &mut Command, base: PathBuf) -> Self {
        let stdout = base.with_extension("stdout");
        let stderr = base.with_extension("stderr");
        let child = command
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
        Self {
            name,
            child,
            stdout,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest of it.
    fn wait_stdout_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let file = std::fs::File::open(&self.stdout).unwrap();
            if let Some(rest) = BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .find_map(|l| l.strip_prefix(prefix).map(|r| r.trim().to_owned()))
            {
                return rest;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{} exited ({status}):\n{}", self.name, self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not print {prefix:?}:\n{}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit by itself.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit:\n{}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.name, self.stderr());
        }
    }
}

/// The `submitter` binary of the same build (`target/<profile>/submitter`), or
/// `CASTELLAN_SUBMITTER_BIN`.
fn submitter_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CASTELLAN_SUBMITTER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("submitter");
    assert!(
        path.is_file(),
        "the submitter binary is not at {}: build it with `cargo build -p castellan-submitter` \
         (`cargo test --workspace` builds it), or name it in CASTELLAN_SUBMITTER_BIN",
        path.display()
    );
    path
}

/// A TCP port that was free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
