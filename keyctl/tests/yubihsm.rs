//! keyctl with a YubiHSM 2 backend: the real `keyctl` binary against the `yubihsm` crate's
//! MockHsm served over HTTP (as `yubihsm-connector` serves a real device; MockHsm is debug-only).
//! Generation on the device without export-under-wrap, listing, rotation (by name and
//! `--due`), a signature by the rotated-in key that recovers to the registered address, and
//! `revoke --destroy` deleting the object — the device state checked with the crate's own client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use castellan_signer::backend::any::AnyBackend;
use castellan_signer::backend::{KeyBackend, KeyRef, SignRequest};
use castellan_signer::config::BackendConfig;
use common::{assert_fails_one_line, dump, keyctl, now_secs, timed};
use serde_json::Value;
use yubihsm::connector::http::Server;
use yubihsm::{Capability, Client, Connector, Credentials, object};

/// Serves a fresh MockHsm over HTTP on a free port; returns the port.
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

struct YubiAppliance {
    _tmp: tempfile::TempDir,
    config: std::path::PathBuf,
    backend: String,
    port: u16,
}

impl YubiAppliance {
    fn new() -> Self {
        let port = serve_mockhsm();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // MockHsm's factory auth key 1 and its password, in a 0600 file.
        let pw = dir.join("yubihsm-password");
        let mut f = std::fs::File::create(&pw).unwrap();
        f.write_all(b"password").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let backend = format!(
            "type = \"yubihsm\"\nconnector = {{ type = \"http\", addr = \"127.0.0.1\", port = {port} }}\n\
             auth_key_id = 1\npassword_file = \"{}\"\n",
            pw.display()
        );
        let config = dir.join("keyctl.toml");
        std::fs::write(
            &config,
            format!(
                "operator = \"spiffe://castellan/ops/test\"\n\n[store]\npath = \"{}\"\n\n[backend]\n{backend}",
                dir.join("signer.db").display()
            ),
        )
        .unwrap();
        Self {
            _tmp: tmp,
            config,
            backend,
            port,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        keyctl()
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.run(&a);
        assert!(o.status.success(), "keyctl {args:?}: {}", dump(&o));
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", dump(&o)))
    }

    fn version(&self, name: &str, version: u32) -> Value {
        let v = self.json(&["keys", "show", name]);
        let want = format!("{name}@{version}");
        v["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["version"] == want.as_str())
            .unwrap_or_else(|| panic!("no {want} in {v}"))
            .clone()
    }

    /// The crate's own client on the same device.
    fn device(&self) -> Client {
        let connector = Connector::http(&yubihsm::HttpConfig {
            addr: "127.0.0.1".into(),
            port: self.port,
            timeout_ms: 5_000,
        });
        Client::open(connector, Credentials::default(), false).unwrap()
    }
}

fn object_id(backend_ref: &str) -> u16 {
    let hex = backend_ref.strip_prefix("yubihsm:0x").unwrap();
    u16::from_str_radix(hex, 16).unwrap()
}

#[test]
fn keyctl_generates_lists_rotates_and_destroys_yubihsm_keys() {
    let y = YubiAppliance::new();
    let init = y.json(&["init"]);
    assert_eq!(init["backend"], "yubihsm", "{init}");
    let t0 = now_secs();
    let at = |d: u64| (t0 + d).to_string();

    let g = y.json(&[
        "keys",
        "generate",
        "hot",
        "--rotate-every",
        "1d",
        "--now",
        &at(0),
    ]);
    assert_eq!(g["key"], "hot@1");
    let v1 = y.version("hot", 1);
    let id1 = object_id(v1["backend"].as_str().unwrap());
    // On the device: a secp256k1 key that signs, without export-under-wrap.
    let device = y.device();
    let info = device
        .get_object_info(id1, object::Type::AsymmetricKey)
        .unwrap();
    assert!(info.capabilities.contains(Capability::SIGN_ECDSA));
    assert!(
        !info
            .capabilities
            .contains(Capability::EXPORTABLE_UNDER_WRAP)
    );
    assert_eq!(info.label.to_string(), "hot@1");
    let list = y.json(&["keys", "list"]);
    assert_eq!(list[0]["name"], "hot", "{list}");

    // Rotation by name: a new object, a new address; the old one retiring.
    let (r, took) = timed(|| y.json(&["rotate", "hot", "--grace", "1h", "--now", &at(0)]));
    eprintln!("keyctl rotate on MockHsm (debug) took {took:?}");
    assert_eq!(r["new"]["version"], "hot@2", "{r}");
    assert_ne!(r["new"]["address"], r["old"]["address"]);
    assert_eq!(r["signer"]["reload"], "not_configured", "{r}");
    assert_eq!(y.version("hot", 1)["status"], "retiring");
    // `rotate --due` two days later: hot@2 is past its day, hot@1's grace has ended.
    let due = y.json(&["rotate", "--due", "--now", &at(2 * 86_400)]);
    assert_eq!(due["retired"], serde_json::json!(["hot@1"]), "{due}");
    assert_eq!(due["rotated"][0]["new"]["version"], "hot@3", "{due}");
    assert_eq!(y.version("hot", 3)["status"], "active");

    // The rotated-in key signs on the device, recovering to the address in the registry.
    let v3 = y.version("hot", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let config: BackendConfig = toml::from_str(&y.backend).unwrap();
    rt.block_on(async {
        let backend = AnyBackend::open(&config).await.unwrap();
        let key = KeyRef::YubiHsm {
            object_id: object_id(v3["backend"].as_str().unwrap()),
        };
        let info = backend.key_info(&key).await.unwrap();
        assert_eq!(
            info.address.to_checksum(None),
            v3["address"].as_str().unwrap()
        );
        let digest = alloy::primitives::keccak256(b"castellan keyctl yubihsm");
        let sig = backend
            .sign(&key, &info.public_key, SignRequest::digest(digest))
            .await
            .unwrap()
            .signature();
        assert_eq!(
            sig.recover_address_from_prehash(&digest).unwrap(),
            info.address
        );
    });

    // revoke --destroy: the object is deleted on the device; the others stay.
    let o = y.run(&["revoke", "hot@1", "--reason", "x", "--yes", "--destroy"]);
    let (code, _) = assert_fails_one_line(&o, &["revoke", "--destroy"]);
    assert_eq!(code, 3);
    let v = y.json(&[
        "revoke",
        "hot@1",
        "--reason",
        "drill",
        "--yes",
        "--destroy",
        "--confirm-destroy",
        "hot",
    ]);
    assert_eq!(
        v["destruction"]["destroyed"],
        serde_json::json!(["hot@1"]),
        "{v}"
    );
    assert!(
        device
            .get_object_info(id1, object::Type::AsymmetricKey)
            .is_err(),
        "hot@1 is still on the device"
    );
    let id3 = object_id(v3["backend"].as_str().unwrap());
    assert!(
        device
            .get_object_info(id3, object::Type::AsymmetricKey)
            .is_ok()
    );
    assert_eq!(y.version("hot", 1)["status"], "destroyed");
    y.json(&["audit", "verify"]);

    // A wrong password: one line, nothing changed.
    let pw = Path::new(&y.config).with_file_name("yubihsm-password");
    std::fs::write(&pw, "not the password").unwrap();
    let o = y.run(&["keys", "generate", "other"]);
    let (code, line) = assert_fails_one_line(&o, &["keys", "generate", "other"]);
    assert_eq!(code, 1, "{line}");
    assert_eq!(
        y.json(&["keys", "list"]).as_array().unwrap().len(),
        1,
        "a key was registered with a refused login"
    );
}

/// `keyctl hsm log` reads the YubiHSM's own audit log through the configured backend after a key
/// was generated and used on it. MockHsm (yubihsm 0.42) records no entries: its
/// `Get Log Entries` always answers zero unlogged events and an empty list, so this checks the
/// whole path (config → backend → device command → text and JSON) and the exact document MockHsm
/// yields, not the content of a real device's log; `--ack` is checked only on its refusal of an
/// item not in the log (a successful Set Log Index needs entries, i.e. a real device). A PKCS#11
/// appliance is refused in one line.
#[test]
fn keyctl_hsm_log_reads_the_yubihsm_audit_log_and_refuses_pkcs11() {
    let y = YubiAppliance::new();
    y.json(&["init"]);
    let g = y.json(&["keys", "generate", "logged"]);
    assert_eq!(g["key"], "logged@1", "{g}");
    let id = object_id(y.version("logged", 1)["backend"].as_str().unwrap());
    // A signature on the device with the crate's own client (a logged command on real hardware).
    let device = y.device();
    let digest = alloy::primitives::keccak256(b"castellan hsm log");
    device
        .sign_ecdsa_prehash_raw(id, digest.as_slice())
        .unwrap();

    let log = y.json(&["hsm", "log"]);
    let dev = log["device"].as_str().unwrap();
    assert!(dev.contains(&y.port.to_string()), "{log}");
    assert_eq!(
        log,
        serde_json::json!({
            "device": dev,
            "unloggedBootEvents": 0,
            "unloggedAuthEvents": 0,
            "entries": [],
        })
    );
    let o = y.run(&["hsm", "log"]);
    assert!(o.status.success(), "{}", dump(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        text.trim_end(),
        format!("{dev}: 0 log entries (unlogged: 0 boot, 0 auth events)")
    );

    // --ack names an entry that must be in the log just read; MockHsm's is empty, so it is
    // refused in one line and Set Log Index is not sent.
    let o = y.run(&["hsm", "log", "--ack", "5"]);
    let (code, line) = assert_fails_one_line(&o, &["hsm", "log", "--ack", "5"]);
    assert_eq!(code, 1, "{line}");
    assert!(
        line.contains("entry 5 is not in the device log just read (0 entries)")
            && line.ends_with("nothing acknowledged"),
        "{line}"
    );

    // PKCS#11 (SoftHSM) keeps no device log: one line, exit 1, named backend.
    let a = common::Appliance::new();
    let (code, line) = a.fails(&["hsm", "log"]);
    assert_eq!(code, 1, "{line}");
    assert!(
        line.contains("configured backend is pkcs11") && line.contains("keeps no device audit log"),
        "{line}"
    );
    let o = a.run(&["--json", "hsm", "log"]);
    assert!(!o.status.success(), "{}", dump(&o));
    let err: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(err["error"]["exitCode"], 1, "{err}");
}
