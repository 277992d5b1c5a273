//! The real `submitter` binary over mutual TLS, with certificates made by `castellan_api::devpki`:
//! only configured identities reach the API, with their roles; an accepted bundle is persisted
//! before it is acknowledged, and after `kill -9` and a restart it is still known and resent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::providers::Provider;
use castellan_api::devpki::{DevCa, LeafSpec, write_file};
use castellan_api::submitter::{BundleStatus, Quantity, RelaySelection, SubmitBundleRequest};
use castellan_api::tls::ClientTlsConfig;
use castellan_tests::anvil::Anvil;
use castellan_tests::relays::{Behavior, Flavor, StandInRelay, signed_transfer};
use serde_json::Value;

/// The signer process, as the submitter's `[[identities]]` know it.
const SIGNER_ID: &str = "spiffe://castellan/signer";
/// An operator.
const OPS_ID: &str = "spiffe://castellan/ops/oncall";

/// A development CA and every certificate the tests present, in `dir`.
fn write_pki(dir: &Path) {
    let mut ca = DevCa::new("Castellan submitter test CA").unwrap();
    ca.write(dir, "ca").unwrap();
    ca.issue(&LeafSpec::server_localhost())
        .unwrap()
        .write(dir, "server")
        .unwrap();
    for (stem, uri) in [
        ("signer", SIGNER_ID),
        ("ops", OPS_ID),
        // Chains to the CA, but nobody configured it.
        ("unknown", "spiffe://castellan/strategy/alpha"),
    ] {
        ca.issue(&LeafSpec::client_uri(uri))
            .unwrap()
            .write(dir, stem)
            .unwrap();
    }
    // The signer's identity, revoked by the CRL.
    let revoked = ca.issue(&LeafSpec::client_uri(SIGNER_ID)).unwrap();
    revoked.write(dir, "revoked").unwrap();
    let crl = ca.crl_pem(1, &[revoked.serial], 3600).unwrap();
    write_file(&dir.join("ca.crl"), crl.as_bytes(), 0o644).unwrap();
    // The signer's identity, from another CA.
    DevCa::new("Another CA")
        .unwrap()
        .issue(&LeafSpec::client_uri(SIGNER_ID))
        .unwrap()
        .write(dir, "stranger")
        .unwrap();
}

/// `submitter.toml` for the files of [`write_pki`], on port 0.
fn config_text(dir: &Path, node: &str, relays: &str) -> String {
    let d = dir.display();
    format!(
        r#"[api]
listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"

[tls]
cert = "{d}/server.pem"
key = "{d}/server.key"
client_ca = "{d}/ca.pem"
crl = ["{d}/ca.crl"]

[[identities]]
identity = "{SIGNER_ID}"
roles = ["signer"]

[[identities]]
identity = "{OPS_ID}"
roles = ["admin", "auditor"]

[chain]
chain_id = 31337
node_url = "{node}"
poll_interval_ms = 25
confirmations = 1

[store]
path = "{d}/submitter.db"

{relays}
"#
    )
}

/// An HTTPS client of the submitter at `addr`, presenting `<stem>.pem` (`None`: no certificate).
fn client(dir: &Path, addr: SocketAddr, stem: Option<&str>) -> reqwest::Client {
    let tls = match stem {
        Some(stem) => ClientTlsConfig {
            server_ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
        .build()
        .unwrap(),
        None => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            rustls::ClientConfig::builder_with_provider(castellan_api::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
    };
    reqwest::Client::builder()
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(10))
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap()
}

struct Daemon {
    child: Child,
    log: PathBuf,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Daemon {
    /// Starts the binary and waits for the two "listening" lines on its stdout.
    fn start(config: &Path, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_submitter"))
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut addr, mut metrics) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while addr.is_none() || metrics.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("submitter listening on ") {
                        addr = Some(a.trim().parse().unwrap());
                    } else if let Some(a) = line.strip_prefix("submitter metrics on ") {
                        metrics = Some(a.trim().parse().unwrap());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "submitter did not start:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        }
        Self {
            child,
            log,
            addr: addr.unwrap(),
            metrics: metrics.unwrap(),
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// SIGKILL, as issue 8's crash test does.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    async fn wait_ready(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client.get(self.url("/ready")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "submitter not ready:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- submitter log ----\n{}", self.output());
        }
    }
}

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_listener_admits_only_configured_identities_with_their_roles() {
    castellan_submitter::relay::install_crypto_provider();
    let anvil = Anvil::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_pki(d);
    let config = d.join("submitter.toml");
    std::fs::write(&config, config_text(d, anvil.url().as_str(), "")).unwrap();
    let daemon = Daemon::start(&config, d.join("submitter.log"));
    let signer = client(d, daemon.addr, Some("signer"));
    daemon.wait_ready(&signer).await;

    // The signer identity: relay health and cancel-by-key.
    let r = signer.get(daemon.url("/v1/relays")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", daemon.output());
    assert!(r.headers().contains_key("x-request-id"));
    let r = signer
        .post(daemon.url("/v1/keys/searcher-hot/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // An operator passes identification but may not submit.
    let ops = client(d, daemon.addr, Some("ops"));
    let id = uuid::Uuid::new_v4();
    let r = ops
        .get(daemon.url(&format!("/v1/bundles/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (404, "bundle_not_found".into()));
    let r = ops
        .post(daemon.url("/v1/bundles"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, (403, "forbidden".into()));

    // A certificate of the right CA whose identity nobody configured: 403 on every /v1 route,
    // while /live needs only the handshake.
    let unknown = client(d, daemon.addr, Some("unknown"));
    for (method, path) in [
        (reqwest::Method::GET, "/v1/relays"),
        (reqwest::Method::POST, "/v1/bundles"),
        (reqwest::Method::GET, "/v1/nowhere"),
    ] {
        let r = unknown
            .request(method, daemon.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(r).await,
            (403, "unknown_identity".into()),
            "{path}"
        );
    }
    let r = unknown.get(daemon.url("/live")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // No certificate, a revoked one, one of another CA: no HTTP exchange at all.
    for stem in [None, Some("revoked"), Some("stranger")] {
        let r = client(d, daemon.addr, stem)
            .get(daemon.url("/live"))
            .send()
            .await;
        assert!(r.is_err(), "{stem:?} got an answer: {r:?}");
    }
    // Plain HTTP on the API port is not HTTP the server speaks.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .get(format!("http://{}/live", daemon.addr))
        .send()
        .await;
    assert!(
        plain.map_or(true, |r| r.status() != 200),
        "plain HTTP reached the API"
    );

    // Metrics stay on their own plain listener and count the refusals (a refused handshake is
    // counted by its connection task, which may finish just after the client gave up).
    let count = |metrics: &str, reason: &str| -> u64 {
        let prefix = format!("castellan_submitter_api_refusals_total{{reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |n| n.trim().parse().unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = reqwest::get(format!("http://{}/metrics", daemon.metrics))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let metrics = response.text().await.unwrap();
        assert_eq!(count(&metrics, "unknown_identity"), 3, "{metrics}");
        // The three refused certificates and the plain-HTTP attempt.
        if count(&metrics, "tls") >= 4 {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = daemon.output();
    assert!(log.contains("unknown identity refused"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_bundle_survives_kill_9_and_resumes() {
    castellan_submitter::relay::install_crypto_provider();
    let anvil = Anvil::start().await;
    let () = anvil
        .provider()
        .raw_request("evm_setAutomine".into(), (false,))
        .await
        .unwrap();
    let _: Value = anvil
        .provider()
        .raw_request("evm_mine".into(), ())
        .await
        .unwrap();
    let relay = StandInRelay::start(
        Flavor::Flashbots {
            require_signature: false,
        },
        Behavior::Normal,
        None,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_pki(d);
    let config = d.join("submitter.toml");
    std::fs::write(
        &config,
        config_text(
            d,
            anvil.url().as_str(),
            &format!(
                "[[relay]]\nname = \"titan\"\nkind = \"builder\"\nurl = \"{}\"\nsign = false\n",
                relay.url()
            ),
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(&config, d.join("run1.log"));
    let client1 = client(d, daemon.addr, Some("signer"));
    daemon.wait_ready(&client1).await;

    let head = anvil.provider().get_block_number().await.unwrap();
    let request = SubmitBundleRequest {
        bundle_id: uuid::Uuid::new_v4(),
        key_name: "searcher-hot".into(),
        txs: vec![signed_transfer(
            1,
            0,
            alloy::primitives::Address::repeat_byte(0x42),
        )],
        target_block: Quantity(head + 1),
        last_block: Some(Quantity(head + 30)),
        min_timestamp: None,
        max_timestamp: None,
        reverting_tx_hashes: vec![],
        replacement_uuid: None,
        relays: RelaySelection::All,
        simulate: false,
    };
    let id = request.bundle_id.to_string();
    let response = client1
        .post(daemon.url("/v1/bundles"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{}", daemon.output());
    assert!(response.headers().contains_key("x-request-id"));
    relay
        .wait_for("bundle", Duration::from_secs(5), |r| {
            r.bundle
                .as_ref()
                .is_some_and(|b| b.uuid.as_deref() == Some(id.as_str()))
        })
        .await;

    // kill -9 right after the acknowledgement, then start again on the same store.
    daemon.kill9();
    let daemon = Daemon::start(&config, d.join("run2.log"));
    let client2 = client(d, daemon.addr, Some("signer"));
    daemon.wait_ready(&client2).await;
    let status: BundleStatus = client2
        .get(daemon.url(&format!("/v1/bundles/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status.state, castellan_api::submitter::BundleState::Pending);
    let again = client2
        .post(daemon.url("/v1/bundles"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        200,
        "a retry after the restart is not a new bundle"
    );
    let _: Value = anvil
        .provider()
        .raw_request("evm_mine".into(), ())
        .await
        .unwrap();
    relay
        .wait_for("resubmission after restart", Duration::from_secs(10), |r| {
            r.bundle.as_ref().is_some_and(|b| b.block == head + 2)
        })
        .await;
    let metrics = reqwest::get(format!("http://{}/metrics", daemon.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("castellan_submitter_relay_requests_total{relay=\"titan\",method=\"eth_sendBundle\",result=\"accepted\"}"), "{metrics}");
}
