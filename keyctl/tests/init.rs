//! `keyctl init` on a token made by `castellan_tests::softhsm` (its own token directory,
//! `SOFTHSM2_CONF` set on the keyctl child only).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use castellan_tests::softhsm::SoftHsmToken;
use common::*;

fn write_config(
    dir: &std::path::Path,
    token: &SoftHsmToken,
    pin_file: &std::path::Path,
) -> std::path::PathBuf {
    let config = dir.join("keyctl.toml");
    std::fs::write(
        &config,
        format!(
            "operator = \"test-operator\"\n[store]\npath = \"{}\"\n[backend]\ntype = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{}\"\npin_file = \"{}\"\nsessions = 1\n",
            dir.join("signer.db").display(),
            token.module().display(),
            token.label(),
            pin_file.display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn init_checks_the_token_creates_the_store_and_keys_can_be_generated() {
    let token = SoftHsmToken::new("keyctl-init").unwrap_or_else(|e| panic!("{e}"));
    let pin = token.write_pin_file().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &token, &pin);
    let run = |args: &[&str]| {
        let mut c = keyctl();
        token.configure(&mut c);
        c.arg("--config").arg(&config).args(args).output().unwrap()
    };

    // Before init there is no store, and commands say so without creating one.
    let o = run(&["keys", "list"]);
    let (_, line) = assert_fails_one_line(&o, &["keys", "list"]);
    assert!(line.contains("keyctl init"), "{line}");
    assert!(!dir.path().join("signer.db").exists());

    let o = run(&["--json", "init"]);
    assert!(o.status.success(), "{}", dump(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["created"], true, "{v}");
    assert!(dir.path().join("signer.db").is_file());

    let o = run(&["--json", "keys", "generate", "hot", "--rotate-every", "30d"]);
    assert!(o.status.success(), "{}", dump(&o));
    let o = run(&["--json", "keys", "show", "hot"]);
    assert!(o.status.success(), "{}", dump(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["versions"][0]["status"], "active");
    // A second init migrates, creates nothing.
    let o = run(&["--json", "init"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["created"], false, "{v}");
}

#[test]
fn init_with_a_wrong_pin_fails_in_one_line_and_creates_no_store() {
    let token = SoftHsmToken::new("keyctl-badpin").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("pin");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pin)
            .unwrap();
        writeln!(f, "00000000").unwrap();
    }
    let config = write_config(dir.path(), &token, &pin);
    let mut c = keyctl();
    token.configure(&mut c);
    let o = c.arg("--config").arg(&config).arg("init").output().unwrap();
    let (code, line) = assert_fails_one_line(&o, &["init"]);
    assert_eq!(code, 1);
    assert!(
        line.contains("CKR_PIN_INCORRECT") || line.contains("login"),
        "{line}"
    );
    assert!(!line.contains("00000000"), "the PIN was printed: {line}");
    assert!(!dir.path().join("signer.db").exists());
}
