//! The YubiHSM 2 backend through the real configuration path — `YubiHsmBackend::open` with an
//! HTTP connector and a 0600 password file — to a MockHsm served by the `yubihsm` crate's own
//! `yubihsm-connector`-compatible HTTP server, behind a TCP "plug" the test can pull: the device
//! is unplugged mid-run (requests fail with a typed transient error and health turns to
//! `Recovering`), plugged back, and signing resumes in the same backend.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use castellan_hardware_tests::suite;
use castellan_signer::backend::pkcs11::PinSource;
use castellan_signer::backend::yubihsm::{YubiHsmBackend, YubiHsmConfig, YubiHsmConnector};
use castellan_signer::backend::{BackendError, Health, KeyBackend, SignRequest};
use yubihsm::Connector;
use yubihsm::connector::http::Server;

/// A TCP forwarder that can be unplugged (every connection cut, new ones refused) and plugged
/// back in.
struct Plug {
    port: u16,
    plugged: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl Plug {
    fn new(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let plugged = Arc::new(AtomicBool::new(true));
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (p, s) = (Arc::clone(&plugged), Arc::clone(&streams));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !p.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                {
                    let mut all = s.lock().unwrap();
                    all.push(client.try_clone().unwrap());
                    all.push(server.try_clone().unwrap());
                }
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Self {
            port,
            plugged,
            streams,
        }
    }

    fn unplug(&self) {
        self.plugged.store(false, Ordering::SeqCst);
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn plug(&self) {
        self.plugged.store(true, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// Serves a fresh MockHsm over HTTP on a free port (the thread runs until the test ends).
fn serve_mockhsm() -> u16 {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = yubihsm::HttpConfig {
        addr: "127.0.0.1".into(),
        port,
        timeout_ms: 5_000,
    };
    let server = Server::new(&config, Connector::mockhsm()).unwrap();
    std::thread::spawn(move || {
        let _ = server.run();
    });
    port
}

fn config(port: u16, password_file: std::path::PathBuf) -> YubiHsmConfig {
    let mut c = YubiHsmConfig::new(
        YubiHsmConnector::Http {
            addr: "127.0.0.1".into(),
            port,
            timeout: Duration::from_secs(2),
        },
        1,
        PinSource::File(password_file),
    );
    c.sign_timeout = Duration::from_secs(5);
    c
}

fn password_file(dir: &std::path::Path, password: &str, mode: u32) -> std::path::PathBuf {
    let path = dir.join(format!("pw-{mode:o}"));
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(password.as_bytes()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[test]
fn signing_survives_unplugging_the_device_mid_run() {
    let dir = tempfile::tempdir().unwrap();
    let plug = Plug::new(serve_mockhsm());
    let backend = YubiHsmBackend::open(&config(
        plug.port,
        password_file(dir.path(), "password", 0o600),
    ))
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let key = suite::generate_and_read_back(&backend, "hot@1")
            .await
            .unwrap();
        suite::sign_digests_and_recover(&backend, &key, 10)
            .await
            .unwrap();

        plug.unplug();
        let err = backend
            .sign(
                &key.key_ref,
                &key.public_key,
                SignRequest::digest(suite::random_digest()),
            )
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(
            matches!(backend.health(), Health::Recovering { .. }),
            "{:?}",
            backend.health()
        );
        // Meanwhile requests fail fast with the reason, without waiting for the device.
        let started = Instant::now();
        let err = backend
            .sign(
                &key.key_ref,
                &key.public_key,
                SignRequest::digest(suite::random_digest()),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(1));

        plug.plug();
        let deadline = Instant::now() + Duration::from_secs(20);
        while backend.health() != Health::Ready {
            assert!(
                Instant::now() < deadline,
                "no reconnection: {:?}",
                backend.health()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Same key, same device state: signing resumes.
        suite::sign_digests_and_recover(&backend, &key, 10)
            .await
            .unwrap();
    });
}

#[test]
fn open_refuses_a_readable_password_file_and_a_missing_connector() {
    let dir = tempfile::tempdir().unwrap();
    let plug = Plug::new(serve_mockhsm());
    let secret = "password";
    let err = YubiHsmBackend::open(&config(plug.port, password_file(dir.path(), secret, 0o644)))
        .unwrap_err();
    assert!(matches!(err, BackendError::PinSource(_)), "{err:?}");
    assert!(!err.to_string().contains(secret));
    // Wrong password through the HTTP connector: typed refusal.
    let err = YubiHsmBackend::open(&config(
        plug.port,
        password_file(dir.path(), "not-the-password", 0o600),
    ))
    .unwrap_err();
    assert!(matches!(err, BackendError::AuthFailed { .. }), "{err:?}");
    // Nothing listening: unavailable, not a panic and not a hang.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = YubiHsmBackend::open(&config(closed, password_file(dir.path(), secret, 0o400)))
        .unwrap_err();
    assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
}

/// The real-device cases themselves, pointed by environment-style variables at a MockHsm served
/// over HTTP: they must pass (not skip). The audit-log case is left out: MockHsm keeps no log.
#[test]
fn the_real_device_yubihsm_cases_pass_against_a_served_mockhsm() {
    use castellan_hardware_tests::env::Targets;
    use castellan_hardware_tests::runner::{Outcome, cases, run_case};
    let dir = tempfile::tempdir().unwrap();
    let port = serve_mockhsm();
    let pw = password_file(dir.path(), "password", 0o600);
    let targets = Targets::from_vars(&|name| match name {
        "CASTELLAN_YUBIHSM_CONNECTOR" => Some(format!("http://127.0.0.1:{port}")),
        "CASTELLAN_YUBIHSM_PASSWORD_FILE" => Some(pw.display().to_string()),
        _ => None,
    });
    let mut ran = 0;
    for case in cases() {
        if !case.name.starts_with("yubihsm_") || case.name == "yubihsm_audit_log_is_readable" {
            continue;
        }
        let outcome = run_case(&case, &targets);
        if case.interactive {
            assert!(matches!(outcome, Outcome::Skipped(_)), "{}", case.name);
        } else {
            assert_eq!(outcome, Outcome::Passed, "{}", case.name);
            ran += 1;
        }
    }
    assert_eq!(ran, 3);
}
