//! TLS attacks on the real signer binary: every way in that must fail, each refused and each in
//! the audit chain, plus a CRL update that takes effect without a restart.
//!
//! Every refusal is checked in the audit chain through the auditor API while the signer runs, and
//! again in the store file itself once it is stopped.
//!
//! Refused at the handshake (audited as `tls_refused`, matched to the attempt by its TCP peer
//! address): TLS 1.2 offered, no client certificate, a certificate of another CA, an expired one,
//! one not yet valid, one revoked by the CRL. Refused after it (audited with the identity and the
//! stable code): a valid certificate whose identity is not configured (`unknown_identity`), and a
//! strategy identity calling the admin and auditor routes (`role_required`). Then a certificate
//! that works, with a TLS session the client resumes, is revoked by rewriting the CRL file, and
//! the same running process refuses it, the resumed session included. A connection that never
//! starts its handshake is dropped at the signer's handshake deadline, and audited too.
//!
//! The attempts at the handshake use a plain rustls client over a `TcpStream` (so the test knows
//! its local port), sending a real signing request: had any got in, it would have been signed.
//! TLS 1.2 is offered a second time by an independent client, `openssl s_client -tls1_2`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, address};
use castellan_api::devpki::{LeafSpec, serial_of_pem, write_file};
use castellan_api::tls::ClientTlsConfig;
use castellan_signer::audit::AuditRecord;
use castellan_signer::store::{AuditCursor, SqliteStore, export_jsonl};
use castellan_tests::softhsm::in_own_process;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use support::{Appliance, CHAIN_ID, count_kind, policy_toml, runtime};

const RECIPIENT: Address = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");
const ALPHA: &str = "spiffe://castellan/strategy/alpha";

fn tx_body(nonce: u64) -> String {
    json!({ "tx": {
        "chainId": CHAIN_ID.to_string(),
        "nonce": nonce.to_string(),
        "to": RECIPIENT.to_string(),
        "value": "1000",
        "gas": "21000",
        "maxFeePerGas": "0x77359400",
        "maxPriorityFeePerGas": "0x3b9aca00",
    }})
    .to_string()
}

/// What one raw attempt did.
struct Attempt {
    /// The client's end of the TCP connection (what the signer audits as `peer`).
    local: SocketAddr,
    /// The HTTP status line, if a response came back.
    status: Option<String>,
    /// The client-side error, if the connection failed.
    error: Option<String>,
    /// The handshake resumed an earlier TLS session (no certificate sent again).
    resumed: bool,
}

impl Attempt {
    fn refused(&self) -> bool {
        self.status.is_none()
    }
}

/// Connects with `config`, sends `request`, and reads the response to the end.
fn attempt(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, request: &str) -> Attempt {
    let mut tcp = TcpStream::connect(addr).unwrap();
    let local = tcp.local_addr().unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let conn =
        rustls::ClientConnection::new(config.clone(), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, &mut tcp);
    let mut response = Vec::new();
    let result = tls
        .write_all(request.as_bytes())
        .and_then(|()| tls.flush())
        .and_then(|()| tls.read_to_end(&mut response).map(|_| ()));
    let resumed = tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .lines()
        .next()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .map(str::to_owned);
    Attempt {
        local,
        status,
        error: result.err().map(|e| e.to_string()),
        resumed,
    }
}

fn sign_request(nonce: u64) -> String {
    let body = tx_body(nonce);
    format!(
        "POST /v1/keys/hot/sign/transaction HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

const LIVE: &str = "GET /live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

fn roots(app: &Appliance) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(app.path("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

/// A client presenting `<stem>.pem` over TLS 1.3 (the signer's only version).
fn client(app: &Appliance, stem: &str) -> Arc<rustls::ClientConfig> {
    Arc::new(
        ClientTlsConfig {
            server_ca: app.path("ca.pem"),
            cert: app.path(&format!("{stem}.pem")),
            key: app.path(&format!("{stem}.key")),
        }
        .build()
        .unwrap(),
    )
}

/// A client limited to TLS 1.2, presenting alpha's valid certificate.
fn tls12_client(app: &Appliance) -> Arc<rustls::ClientConfig> {
    let chain: Vec<_> = CertificateDer::pem_file_iter(app.path("alpha.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(app.path("alpha.key")).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(castellan_api::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots(app))
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

/// A client with no certificate at all.
fn anonymous_client(app: &Appliance) -> Arc<rustls::ClientConfig> {
    Arc::new(
        rustls::ClientConfig::builder_with_provider(castellan_api::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots(app))
            .with_no_client_auth(),
    )
}

/// Waits (at most 10 s) for the `tls_refused` record of the connection from `local`.
async fn refusal_of(app: &Appliance, local: SocketAddr) -> AuditRecord {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = app.audit().await.into_iter().find(|r| {
            r.kind.as_str() == "refusal"
                && r.payload["code"] == "tls_refused"
                && r.payload["peer"] == local.to_string().as_str()
        });
        if let Some(r) = found {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no tls_refused audit record for the connection from {local}:\n{}",
            app.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many `tls_refused` records the chain holds.
async fn tls_refusals(app: &Appliance) -> usize {
    app.audit()
        .await
        .iter()
        .filter(|r| r.kind.as_str() == "refusal" && r.payload["code"] == "tls_refused")
        .count()
}

#[test]
fn every_tls_attack_is_refused_and_audited_and_a_crl_update_needs_no_restart() {
    in_own_process(
        "every_tls_attack_is_refused_and_audited_and_a_crl_update_needs_no_restart",
        "tls-attacks",
        |token| {
            runtime().block_on(async {
                let approvers: Vec<Address> = (1..=3).map(Address::repeat_byte).collect();
                let mut app = Appliance::start(token, &["hot"], &policy_toml(&approvers)).await;
                let pid = app.pid().unwrap();
                let d = app.dir.path().to_path_buf();
                // Alpha's identity on certificates of the right CA that are out of their validity
                // window: expired a day ago, and valid only from tomorrow.
                let mut expired = LeafSpec::client_uri(ALPHA);
                expired.not_before_offset = -2 * 86400;
                expired.not_after_offset = -86400;
                app.ca
                    .issue(&expired)
                    .unwrap()
                    .write(&d, "expired")
                    .unwrap();
                let mut future = LeafSpec::client_uri(ALPHA);
                future.not_before_offset = 86400;
                future.not_after_offset = 2 * 86400;
                app.ca.issue(&future).unwrap().write(&d, "future").unwrap();

                // A connection that never starts its handshake (slowloris): dropped after the
                // signer's handshake deadline (5 s), and audited. Checked at the end.
                let idle = TcpStream::connect(app.addr).unwrap();
                let idle_local = idle.local_addr().unwrap();

                // The control: alpha's own certificate over the same raw client gets a signature.
                let ok = attempt(app.addr, &client(&app, "alpha"), &sign_request(0));
                assert_eq!(
                    ok.status.as_deref(),
                    Some("HTTP/1.1 200 OK"),
                    "the control attempt failed: {:?}\n{}",
                    ok.error,
                    app.stderr()
                );

                // Refused at the handshake, each with its own audit record and reason.
                let cases: [(&str, Arc<rustls::ClientConfig>, &[&str]); 6] = [
                    (
                        "TLS 1.2 offered",
                        tls12_client(&app),
                        &["incompatible", "tls12"],
                    ),
                    (
                        "no client certificate",
                        anonymous_client(&app),
                        &["certificate"],
                    ),
                    (
                        "another CA",
                        client(&app, "stranger"),
                        &["unknown", "issuer"],
                    ),
                    ("expired", client(&app, "expired"), &["expired"]),
                    (
                        "not yet valid",
                        client(&app, "future"),
                        &["not", "valid", "yet"],
                    ),
                    ("revoked", client(&app, "revoked"), &["revoked"]),
                ];
                let mut refused_peers: Vec<SocketAddr> = Vec::new();
                for (what, config, words) in cases {
                    let a = attempt(app.addr, &config, &sign_request(1));
                    refused_peers.push(a.local);
                    assert!(
                        a.refused(),
                        "{what}: got in with {:?}\n{}",
                        a.status,
                        app.stderr()
                    );
                    let record = refusal_of(&app, a.local).await;
                    let reason = record.payload["reason"].as_str().unwrap().to_lowercase();
                    for w in words {
                        assert!(
                            reason.contains(w),
                            "{what}: the audited reason {reason:?} does not say {w:?}"
                        );
                    }
                    assert_eq!(record.identity, None, "{what}: {record:?}");
                    println!("{what}: refused ({:?}); audited: {reason}", a.error);
                }

                // TLS 1.2 again from an independent implementation: OpenSSL's s_client, with
                // alpha's valid certificate.
                let before = tls_refusals(&app).await;
                let out = std::process::Command::new("openssl")
                    .args(["s_client", "-tls1_2", "-connect"])
                    .arg(app.addr.to_string())
                    .args(["-servername", "localhost", "-cert"])
                    .arg(app.path("alpha.pem"))
                    .arg("-key")
                    .arg(app.path("alpha.key"))
                    .arg("-CAfile")
                    .arg(app.path("ca.pem"))
                    .stdin(std::process::Stdio::null())
                    .output()
                    .expect("openssl is not installed");
                let text = String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr);
                assert!(
                    !out.status.success(),
                    "openssl got a TLS 1.2 session:\n{text}"
                );
                assert!(text.contains("alert protocol version"), "{text}");
                let deadline = Instant::now() + Duration::from_secs(10);
                while tls_refusals(&app).await <= before {
                    assert!(
                        Instant::now() < deadline,
                        "openssl's TLS 1.2 attempt is not audited"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }

                // A valid certificate of the right CA whose identity nobody configured.
                let r = app
                    .client(Some("unknown"))
                    .post(app.url("/v1/keys/hot/sign/transaction"))
                    .header("content-type", "application/json")
                    .body(tx_body(1))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 403);
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "unknown_identity", "{body}");

                // A strategy identity on every admin route and on the auditor's export.
                let admin: [(&str, &str, Value); 7] = [
                    ("POST", "/v1/admin/freeze", json!({ "reason": "attack" })),
                    ("POST", "/v1/admin/unfreeze", json!({ "reason": "attack" })),
                    ("POST", "/v1/admin/policy/reload", json!({})),
                    (
                        "POST",
                        "/v1/admin/keys/hot/revoke",
                        json!({ "reason": "attack" }),
                    ),
                    ("POST", "/v1/admin/keys/reload", json!({})),
                    (
                        "POST",
                        "/v1/admin/keys/hot/pause",
                        json!({ "reason": "attack" }),
                    ),
                    ("GET", "/v1/audit", Value::Null),
                ];
                let alpha = app.client(Some("alpha"));
                for (method, path, body) in &admin {
                    let req = match *method {
                        "GET" => alpha.get(app.url(path)),
                        _ => alpha.post(app.url(path)).json(body),
                    };
                    let r = req.send().await.unwrap();
                    let status = r.status().as_u16();
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    assert_eq!(status, 403, "{method} {path}: {body}");
                    assert_eq!(
                        body["error"]["code"], "role_required",
                        "{method} {path}: {body}"
                    );
                }
                // Nothing those calls asked for happened: alpha still signs with `hot`.
                let after = attempt(app.addr, &client(&app, "alpha"), &sign_request(1));
                assert_eq!(
                    after.status.as_deref(),
                    Some("HTTP/1.1 200 OK"),
                    "an admin call by a strategy identity changed something: {:?}",
                    after.error
                );

                let records = app.audit().await;
                assert!(
                    records.iter().any(|r| r.kind.as_str() == "refusal"
                        && r.identity.as_deref() == Some("spiffe://castellan/strategy/unknown")
                        && r.payload["code"] == "unknown_identity"),
                    "the unconfigured identity's refusal is not audited"
                );
                let role_refusals = records
                    .iter()
                    .filter(|r| {
                        r.kind.as_str() == "refusal"
                            && r.identity.as_deref() == Some(ALPHA)
                            && r.payload["code"] == "role_required"
                    })
                    .count();
                assert_eq!(role_refusals, admin.len(), "role refusals audited");
                // Only the two control attempts were signed.
                assert_eq!(count_kind(&records, "signature"), 2);

                // A CRL update without a restart: a fresh certificate for alpha works, keeping a
                // TLS session to resume; the CRL file is rewritten to revoke it as well; the same
                // process then refuses it (resumption included), within a few seconds.
                let victim = app.ca.issue(&LeafSpec::client_uri(ALPHA)).unwrap();
                victim.write(&d, "victim").unwrap();
                let victim_client = client(&app, "victim");
                let before = attempt(app.addr, &victim_client, LIVE);
                assert_eq!(
                    before.status.as_deref(),
                    Some("HTTP/1.1 200 OK"),
                    "{:?}",
                    before.error
                );
                // The server resumes sessions: a second connection resumes the first one's,
                // without sending the certificate again.
                let again = attempt(app.addr, &victim_client, LIVE);
                assert_eq!(again.status.as_deref(), Some("HTTP/1.1 200 OK"));
                assert!(
                    again.resumed,
                    "the second connection did not resume the session"
                );
                let revoked_serial =
                    serial_of_pem(&std::fs::read_to_string(d.join("revoked.pem")).unwrap())
                        .unwrap();
                let crl = app
                    .ca
                    .crl_pem(2, &[revoked_serial, victim.serial], 3600)
                    .unwrap();
                let written = Instant::now();
                write_file(&d.join("ca.crl"), crl.as_bytes(), 0o644).unwrap();
                let refused = loop {
                    let a = attempt(app.addr, &victim_client, LIVE);
                    if a.refused() {
                        break a;
                    }
                    assert!(
                        written.elapsed() < Duration::from_secs(15),
                        "the rewritten CRL was not in force 15 s later:\n{}",
                        app.stderr()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                };
                println!("CRL update in force after {:?}", written.elapsed());
                refused_peers.push(refused.local);
                let record = refusal_of(&app, refused.local).await;
                let reason = record.payload["reason"].as_str().unwrap().to_lowercase();
                assert!(reason.contains("revoked"), "{reason}");
                assert_eq!(app.pid(), Some(pid), "the signer was restarted");
                assert!(
                    app.stderr().contains("TLS configuration reloaded"),
                    "{}",
                    app.stderr()
                );
                // The others are unaffected, and the old revocation still holds.
                let alpha_again = attempt(app.addr, &client(&app, "alpha"), LIVE);
                assert_eq!(alpha_again.status.as_deref(), Some("HTTP/1.1 200 OK"));
                assert!(attempt(app.addr, &client(&app, "revoked"), LIVE).refused());
                // The idle connection was closed by the signer, and its refusal audited.
                let mut idle = idle;
                idle.set_read_timeout(Some(Duration::from_secs(15)))
                    .unwrap();
                let mut buf = [0u8; 16];
                match idle.read(&mut buf) {
                    Ok(0) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                    other => panic!("the signer kept a connection with no handshake: {other:?}"),
                }
                let record = refusal_of(&app, idle_local).await;
                let reason = record.payload["reason"].as_str().unwrap();
                assert!(reason.contains("timed out"), "{reason}");
                refused_peers.push(idle_local);

                let via_api = app.audit().await;
                castellan_signer::audit::verify_chain(&via_api, None).unwrap();
                app.kill();

                // The same records are in the store itself, read directly once the signer is
                // stopped: every refused connection, each unknown-identity and role refusal.
                let store = SqliteStore::open(app.path("signer.db")).unwrap();
                let mut jsonl = Vec::new();
                export_jsonl(&store, AuditCursor::Seq(1), &mut jsonl)
                    .await
                    .unwrap();
                let stored =
                    castellan_signer::audit::read_jsonl(&String::from_utf8(jsonl).unwrap())
                        .unwrap();
                castellan_signer::audit::verify_chain(&stored, None).unwrap();
                assert!(stored.len() >= via_api.len());
                for (a, b) in via_api.iter().zip(&stored) {
                    assert_eq!(
                        a.hash, b.hash,
                        "the API export differs from the store at {}",
                        a.seq
                    );
                }
                for peer in &refused_peers {
                    assert!(
                        stored.iter().any(|r| r.payload["code"] == "tls_refused"
                            && r.payload["peer"] == peer.to_string().as_str()),
                        "no tls_refused record for {peer} in the store"
                    );
                }
                let in_store = |code: &str, identity: &str| {
                    stored
                        .iter()
                        .filter(|r| {
                            r.kind.as_str() == "refusal"
                                && r.payload["code"] == code
                                && r.identity.as_deref() == Some(identity)
                        })
                        .count()
                };
                assert_eq!(
                    in_store("unknown_identity", "spiffe://castellan/strategy/unknown"),
                    1
                );
                assert_eq!(in_store("role_required", ALPHA), admin.len());
            })
        },
    );
}
