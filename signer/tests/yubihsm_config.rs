//! `signer.toml` selects the YubiHSM 2 or Ledger backend through `[backend] type = …`, with
//! unknown fields, inline passwords and impossible values refused at load.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use castellan_signer::backend::yubihsm::YubiHsmConnector;
use castellan_signer::config::{BackendConfig, SignerConfig};

const HEAD: &str = r#"
chain_id = 1
listen = "127.0.0.1:0"
[tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"
[store]
path = "signer.db"
[policy]
path = "policy.toml"
"#;

fn parse(backend: &str) -> Result<SignerConfig, String> {
    SignerConfig::parse(&format!("{HEAD}\n{backend}"), "t").map_err(|e| e.to_string())
}

#[test]
fn yubihsm_backend_over_http_and_usb() {
    let c = parse(
        r#"
[backend]
type = "yubihsm"
auth_key_id = 2
password_file = "/etc/castellan/yubihsm.password"
sign_timeout = "1s"
[backend.connector]
type = "http"
addr = "10.0.0.5"
port = 12345
"#,
    )
    .unwrap();
    let BackendConfig::YubiHsm(y) = &c.backend else {
        panic!("{:?}", c.backend)
    };
    assert_eq!(y.auth_key_id, 2);
    assert_eq!(y.sign_timeout, Duration::from_secs(1));
    assert!(
        matches!(&y.connector, YubiHsmConnector::Http { addr, port: 12345, .. } if addr == "10.0.0.5")
    );

    let c = parse(
        "[backend]\ntype = \"yubihsm\"\nauth_key_id = 1\npassword_env = \"YH_PW\"\n\
         [backend.connector]\ntype = \"usb\"\nserial = \"0012345678\"\n",
    )
    .unwrap();
    assert!(matches!(c.backend, BackendConfig::YubiHsm(_)));
}

#[test]
fn yubihsm_backend_refusals() {
    let inline = parse(
        "[backend]\ntype = \"yubihsm\"\nauth_key_id = 1\npassword = \"password\"\n\
         [backend.connector]\ntype = \"usb\"\n",
    )
    .unwrap_err();
    assert!(inline.contains("password"), "{inline}");
    let none = parse(
        "[backend]\ntype = \"yubihsm\"\nauth_key_id = 1\n[backend.connector]\ntype = \"usb\"\n",
    )
    .unwrap_err();
    assert!(none.contains("password_file"), "{none}");
    let bad_domain = parse(
        "[backend]\ntype = \"yubihsm\"\nauth_key_id = 1\npassword_env = \"P\"\ndomains = [0]\n\
         [backend.connector]\ntype = \"usb\"\n",
    )
    .unwrap_err();
    assert!(bad_domain.contains("domains"), "{bad_domain}");
    let bad_connector = parse(
        "[backend]\ntype = \"yubihsm\"\nauth_key_id = 1\npassword_env = \"P\"\n\
         [backend.connector]\ntype = \"tcp\"\n",
    )
    .unwrap_err();
    assert!(bad_connector.contains("tcp"), "{bad_connector}");
}

#[test]
fn ledger_backend() {
    let c = parse("[backend]\ntype = \"ledger\"\nsign_timeout = \"90s\"\n").unwrap();
    let BackendConfig::Ledger(l) = &c.backend else {
        panic!("{:?}", c.backend)
    };
    assert_eq!(l.sign_timeout, Duration::from_secs(90));
    assert_eq!(l.address_timeout, Duration::from_secs(10));
    let zero = parse("[backend]\ntype = \"ledger\"\nsign_timeout = \"0s\"\n").unwrap_err();
    assert!(zero.contains("timeout"), "{zero}");
    let unknown = parse("[backend]\ntype = \"ledger\"\npath = \"m/44'/60'/0'/0/0\"\n").unwrap_err();
    assert!(unknown.contains("path"), "{unknown}");
}

#[test]
fn key_refs_are_stored_as_tagged_json() {
    use castellan_signer::backend::KeyRef;
    let yubihsm = KeyRef::YubiHsm { object_id: 0x0102 };
    let json = serde_json::to_string(&yubihsm).unwrap();
    assert_eq!(json, r#"{"backend":"yubihsm","object_id":258}"#);
    assert_eq!(serde_json::from_str::<KeyRef>(&json).unwrap(), yubihsm);
    assert_eq!(yubihsm.to_string(), "yubihsm:0x0102");
    let ledger = KeyRef::Ledger {
        path: "m/44'/60'/0'/0/0".into(),
    };
    let json = serde_json::to_string(&ledger).unwrap();
    assert_eq!(json, r#"{"backend":"ledger","path":"m/44'/60'/0'/0/0"}"#);
    assert_eq!(serde_json::from_str::<KeyRef>(&json).unwrap(), ledger);
    assert!(
        serde_json::from_str::<KeyRef>(r#"{"backend":"yubihsm","object_id":1,"x":2}"#).is_err()
    );
}
