//! The shared mTLS layer over real sockets: who gets in, who does not, and CRL reload without a
//! restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::get;
use axum::{Extension, Router};
use castellan_api::devpki::{DevCa, LeafName, LeafSpec, write_file};
use castellan_api::serve::{Peer, Refusal, ServeOptions, serve_mtls};
use castellan_api::tls::{ClientTlsConfig, ReloadableServerConfig, ServerTlsConfig};
use rustls::pki_types::pem::PemObject;
use tokio::sync::oneshot;

struct Fixture {
    dir: tempfile::TempDir,
    ca: DevCa,
    addr: SocketAddr,
    tls: Arc<ReloadableServerConfig>,
    refusals: Arc<Mutex<Vec<Refusal>>>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Fixture {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = DevCa::new("Castellan test CA").unwrap();
        ca.write(dir.path(), "ca").unwrap();
        ca.issue(&LeafSpec::server_localhost())
            .unwrap()
            .write(dir.path(), "server")
            .unwrap();
        // An empty CRL from the start, so that revocation can be added by a reload.
        let crl = ca.crl_pem(1, &[], 3600).unwrap();
        write_file(&dir.path().join("crl.pem"), crl.as_bytes(), 0o644).unwrap();
        let config = ServerTlsConfig {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            client_ca: dir.path().join("ca.pem"),
            crl: vec![dir.path().join("crl.pem")],
            crl_enforce_next_update: true,
        };
        let tls = Arc::new(ReloadableServerConfig::new(config).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/whoami",
            get(|Extension(peer): Extension<Peer>| async move { peer.identity.to_string() }),
        );
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let r2 = refusals.clone();
        let opts = ServeOptions {
            on_refusal: Some(Arc::new(move |r| r2.lock().unwrap().push(r))),
            ..ServeOptions::default()
        };
        let (stop, stopped) = oneshot::channel();
        let server = tokio::spawn(serve_mtls(listener, tls.clone(), app, opts, async {
            let _ = stopped.await;
        }));
        Self {
            dir,
            ca,
            addr,
            tls,
            refusals,
            stop: Some(stop),
            server: Some(server),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn client_files(&mut self, stem: &str, spec: &LeafSpec) -> u64 {
        let issued = self.ca.issue(spec).unwrap();
        issued.write(self.dir.path(), stem).unwrap();
        issued.serial
    }

    fn client(&self, stem: &str, server_ca: &Path) -> reqwest::Client {
        let cfg = ClientTlsConfig {
            server_ca: server_ca.to_path_buf(),
            cert: self.path(&format!("{stem}.pem")),
            key: self.path(&format!("{stem}.key")),
        }
        .build()
        .unwrap();
        reqwest::Client::builder()
            .tls_backend_preconfigured(cfg)
            .resolve("localhost", self.addr)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/whoami", self.addr.port())
    }

    async fn whoami(&self, client: &reqwest::Client) -> Result<String, String> {
        let resp = client
            .get(self.url())
            .send()
            .await
            .map_err(|e| format!("{e:?}"))?;
        Ok(resp.text().await.unwrap())
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.server.take().unwrap().await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn valid_client_gets_in_with_its_identity() {
    let mut fx = Fixture::start().await;
    fx.client_files(
        "alpha",
        &LeafSpec::client_uri("spiffe://castellan/strategy/alpha"),
    );
    let client = fx.client("alpha", &fx.path("ca.pem"));
    assert_eq!(
        fx.whoami(&client).await.unwrap(),
        "spiffe://castellan/strategy/alpha"
    );
    // Keep-alive: a second request on the same client works too.
    assert_eq!(
        fx.whoami(&client).await.unwrap(),
        "spiffe://castellan/strategy/alpha"
    );
    fx.stop().await;
}

#[tokio::test]
async fn identity_falls_back_to_dns_then_cn() {
    let mut fx = Fixture::start().await;
    let mut dns = LeafSpec::client_uri("unused");
    dns.name = LeafName::Dns("ops.castellan.internal".into());
    fx.client_files("dns", &dns);
    let mut cn = LeafSpec::client_uri("unused");
    cn.name = LeafName::Cn("auditor-1".into());
    fx.client_files("cn", &cn);
    assert_eq!(
        fx.whoami(&fx.client("dns", &fx.path("ca.pem")))
            .await
            .unwrap(),
        "ops.castellan.internal"
    );
    assert_eq!(
        fx.whoami(&fx.client("cn", &fx.path("ca.pem")))
            .await
            .unwrap(),
        "auditor-1"
    );
    fx.stop().await;
}

#[tokio::test]
async fn no_client_certificate_is_refused_and_reported() {
    let fx = Fixture::start().await;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(fx.path("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(castellan_api::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(cfg)
        .resolve("localhost", fx.addr)
        .build()
        .unwrap();
    assert!(fx.whoami(&client).await.is_err());
    wait_for_refusal(&fx, "no certificates").await;
    fx.stop().await;
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let mut fx = Fixture::start().await;
    let mut other = DevCa::new("Some other CA").unwrap();
    other
        .issue(&LeafSpec::client_uri("spiffe://castellan/strategy/alpha"))
        .unwrap()
        .write(fx.dir.path(), "stranger")
        .unwrap();
    fx.client_files("alpha", &LeafSpec::client_uri("spiffe://x/alpha"));
    let client = fx.client("stranger", &fx.path("ca.pem"));
    let err = fx.whoami(&client).await.unwrap_err();
    assert!(!err.is_empty());
    wait_for_refusal(&fx, "UnknownIssuer").await;
    fx.stop().await;
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let mut fx = Fixture::start().await;
    let mut expired = LeafSpec::client_uri("spiffe://castellan/strategy/old");
    expired.not_before_offset = -7200;
    expired.not_after_offset = -3600;
    fx.client_files("expired", &expired);
    let mut future = LeafSpec::client_uri("spiffe://castellan/strategy/new");
    future.not_before_offset = 3600;
    future.not_after_offset = 7200;
    fx.client_files("future", &future);
    assert!(
        fx.whoami(&fx.client("expired", &fx.path("ca.pem")))
            .await
            .is_err()
    );
    wait_for_refusal(&fx, "certificate expired").await;
    assert!(
        fx.whoami(&fx.client("future", &fx.path("ca.pem")))
            .await
            .is_err()
    );
    wait_for_refusal(&fx, "not valid yet").await;
    fx.stop().await;
}

#[tokio::test]
async fn tls12_only_client_is_refused() {
    let mut fx = Fixture::start().await;
    fx.client_files("alpha", &LeafSpec::client_uri("spiffe://x/alpha"));
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(fx.path("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(fx.path("alpha.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(fx.path("alpha.key")).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(castellan_api::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(cfg)
        .resolve("localhost", fx.addr)
        .build()
        .unwrap();
    assert!(fx.whoami(&client).await.is_err());
    wait_for_refusal(&fx, "Tls12NotOfferedOrEnabled").await;
    fx.stop().await;
}

#[tokio::test]
async fn crl_update_takes_effect_without_restart() {
    let mut fx = Fixture::start().await;
    let serial = fx.client_files("alpha", &LeafSpec::client_uri("spiffe://x/alpha"));
    fx.client_files("beta", &LeafSpec::client_uri("spiffe://x/beta"));
    assert!(
        fx.whoami(&fx.client("alpha", &fx.path("ca.pem")))
            .await
            .is_ok()
    );

    // Revoke alpha; the reload happens on the file change, not by a restart.
    let crl = fx.ca.crl_pem(2, &[serial], 3600).unwrap();
    write_file(&fx.path("crl.pem"), crl.as_bytes(), 0o644).unwrap();
    assert!(fx.tls.reload_if_changed().unwrap());

    // A new connection (new client) is refused; beta still gets in.
    let err = fx
        .whoami(&fx.client("alpha", &fx.path("ca.pem")))
        .await
        .unwrap_err();
    assert!(!err.is_empty());
    wait_for_refusal(&fx, "revoked").await;
    assert_eq!(
        fx.whoami(&fx.client("beta", &fx.path("ca.pem")))
            .await
            .unwrap(),
        "spiffe://x/beta"
    );
    fx.stop().await;
}

/// The watch sees the (broken) CRL change and refuses it; `alpha` is still let in under the
/// previous configuration.
async fn refused_reload_keeps_alpha(fx: Fixture) {
    assert!(fx.tls.reload_if_changed().is_err());
    assert_eq!(
        fx.whoami(&fx.client("alpha", &fx.path("ca.pem")))
            .await
            .unwrap(),
        "spiffe://x/alpha"
    );
    fx.stop().await;
}

#[tokio::test]
async fn a_broken_crl_file_keeps_the_previous_configuration() {
    let mut fx = Fixture::start().await;
    fx.client_files("alpha", &LeafSpec::client_uri("spiffe://x/alpha"));
    write_file(
        &fx.path("crl.pem"),
        b"-----BEGIN X509 CRL-----\ngarbage\n",
        0o644,
    )
    .unwrap();
    refused_reload_keeps_alpha(fx).await;
}

/// A CRL rewritten with its modification time unchanged (two writes within one tick of the file
/// system's clock, or a tool that preserves times) is still noticed: the watch compares the
/// files' contents too.
#[tokio::test]
async fn a_crl_rewrite_with_the_same_modification_time_is_noticed() {
    let mut fx = Fixture::start().await;
    fx.client_files("alpha", &LeafSpec::client_uri("spiffe://x/alpha"));
    let crl = fx.path("crl.pem");
    let before = std::fs::metadata(&crl).unwrap().modified().unwrap();
    let since_epoch = before.duration_since(std::time::UNIX_EPOCH).unwrap();
    write_file(&crl, b"-----BEGIN X509 CRL-----\ngarbage\n", 0o644).unwrap();
    let touched = std::process::Command::new("touch")
        .arg("-d")
        .arg(format!(
            "@{}.{:09}",
            since_epoch.as_secs(),
            since_epoch.subsec_nanos()
        ))
        .arg(&crl)
        .status()
        .unwrap();
    assert!(touched.success());
    assert_eq!(std::fs::metadata(&crl).unwrap().modified().unwrap(), before);
    // The change is seen (and refused: the file is broken), the old configuration stays.
    refused_reload_keeps_alpha(fx).await;
}

#[tokio::test]
async fn stale_crl_is_refused_when_enforced() {
    let mut fx = Fixture::start().await;
    fx.client_files("alpha", &LeafSpec::client_uri("spiffe://x/alpha"));
    let crl = fx.ca.crl_pem(3, &[], -60).unwrap();
    write_file(&fx.path("crl.pem"), crl.as_bytes(), 0o644).unwrap();
    fx.tls.reload().unwrap();
    assert!(
        fx.whoami(&fx.client("alpha", &fx.path("ca.pem")))
            .await
            .is_err()
    );
    wait_for_refusal(&fx, "revocation list expired").await;
    fx.stop().await;
}

async fn wait_for_refusal(fx: &Fixture, needle: &str) {
    for _ in 0..100 {
        if fx
            .refusals
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.reason.to_lowercase().contains(&needle.to_lowercase()))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "no refusal containing {needle:?}; got {:?}",
        fx.refusals.lock().unwrap()
    );
}
