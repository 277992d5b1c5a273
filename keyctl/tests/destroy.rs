//! HSM object destruction after `keyctl revoke`: at once with `--destroy` and a second
//! confirmation (the key's name), otherwise scheduled after `destroy_wait` (7 days by default),
//! undone by `keys cancel-destroy`, carried out by `rotate --due` or `keys destroy-due` (time
//! injected with `--now`). Whether the object is still on the token is checked independently
//! with OpenSC's `pkcs11-tool`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

const DAY: u64 = 86_400;

/// Private-key labels on the appliance's token, listed by `pkcs11-tool` (not by our code).
fn token_labels(a: &Appliance) -> Vec<String> {
    let module = castellan_tests::softhsm::module_path().unwrap_or_else(|e| panic!("{e}"));
    let pin = std::fs::read_to_string(a.dir.join("secrets/hsm-pin")).unwrap();
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", a.dir.join("softhsm2.conf"))
        .arg("--module")
        .arg(&module)
        .args(["--token-label", "castellan-dev", "--login", "--pin"])
        .arg(pin.trim())
        .args(["--list-objects", "--type", "privkey"])
        .output()
        .unwrap_or_else(|e| panic!("pkcs11-tool (OpenSC; `source scripts/tools.sh`): {e}"));
    assert!(out.status.success(), "pkcs11-tool: {}", dump(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("label:"))
        .map(|l| l.trim().to_owned())
        .collect()
}

fn on_token(a: &Appliance, label: &str) -> bool {
    token_labels(a).iter().any(|l| l == label)
}

#[test]
fn revoke_destroy_needs_the_key_name_as_second_confirmation_then_deletes_the_object() {
    let a = Appliance::new();
    let signer = RunningSigner::start(&a);
    assert!(on_token(&a, "searcher-hot@1"), "{:?}", token_labels(&a));
    let head = a.json(&["audit", "verify"])["headHash"].clone();

    // --yes is the first confirmation only; the second is missing, wrong, or given without
    // --destroy: nothing changes.
    for (args, code, text) in [
        (
            vec![
                "revoke",
                "searcher-hot",
                "--reason",
                "x",
                "--yes",
                "--destroy",
            ],
            3,
            "--confirm-destroy searcher-hot",
        ),
        (
            vec![
                "revoke",
                "searcher-hot",
                "--reason",
                "x",
                "--yes",
                "--destroy",
                "--confirm-destroy",
                "relay-auth",
            ],
            3,
            "not confirmed",
        ),
        (
            vec![
                "revoke",
                "searcher-hot",
                "--reason",
                "x",
                "--destroy",
                "--confirm-destroy",
                "searcher-hot",
            ],
            3,
            "not confirmed",
        ),
        (
            vec![
                "revoke",
                "searcher-hot",
                "--reason",
                "x",
                "--yes",
                "--confirm-destroy",
                "searcher-hot",
            ],
            2,
            "--destroy",
        ),
    ] {
        let (c, line) = a.fails(&args);
        assert_eq!(c, code, "{args:?}: {line}");
        assert!(line.contains(text), "{args:?}: {line}");
    }
    assert_eq!(a.status("searcher-hot", 1), "active");
    assert_eq!(a.json(&["audit", "verify"])["headHash"], head);
    assert!(on_token(&a, "searcher-hot@1"));

    // Both confirmations: revoked through the signer, and the object deleted at once.
    let v = a.json(&[
        "revoke",
        "searcher-hot",
        "--reason",
        "key leaked",
        "--yes",
        "--destroy",
        "--confirm-destroy",
        "searcher-hot",
    ]);
    assert_eq!(v["via"], "signer", "{v}");
    assert_eq!(v["revoked"], serde_json::json!(["searcher-hot@1"]));
    assert_eq!(
        v["destruction"]["destroyed"],
        serde_json::json!(["searcher-hot@1"]),
        "{v}"
    );
    assert_eq!(a.status("searcher-hot", 1), "destroyed");
    assert!(!on_token(&a, "searcher-hot@1"), "{:?}", token_labels(&a));
    assert!(on_token(&a, "relay-auth@1"), "another key was deleted");
    assert!(
        sign(&a, "searcher-hot", 0).is_err(),
        "a destroyed key signed"
    );
    // Nothing to cancel any more.
    let (code, line) = a.fails(&["keys", "cancel-destroy", "searcher-hot"]);
    assert_eq!(code, 1);
    assert!(line.contains("no destruction is scheduled"), "{line}");
    drop(signer);
    // The signer starts with a destroyed version in its registry.
    let _signer = RunningSigner::start(&a);
    a.ok(&["audit", "verify"]);
}

#[test]
fn revoke_schedules_destruction_which_cancel_destroy_undoes_and_rotate_due_or_destroy_due_carry_out()
 {
    let a = Appliance::new();
    let t0 = now_secs();
    let at = |d: u64| (t0 + d).to_string();
    a.ok(&["keys", "generate", "second", "--now", &at(0)]);
    a.ok(&["keys", "generate", "third", "--now", &at(0)]);

    // searcher-hot: revoked (the signer is down: directly in the store), deletion scheduled
    // 7 days later, then cancelled: back to revoked with its reason, never deleted.
    let v = a.json(&[
        "revoke",
        "searcher-hot",
        "--reason",
        "laptop stolen",
        "--yes",
        "--now",
        &at(0),
    ]);
    assert_eq!(v["via"], "store", "{v}");
    let scheduled = &v["destruction"]["scheduled"][0];
    assert_eq!(scheduled["version"], "searcher-hot@1", "{v}");
    assert_eq!(scheduled["at"].as_u64().unwrap(), t0 + 7 * DAY, "{v}");
    assert_eq!(a.status("searcher-hot", 1), "destroy_scheduled");
    let show = a.ok(&["keys", "show", "searcher-hot", "--now", &at(0)]);
    assert!(show.contains("cancel-destroy"), "{show}");

    // Not due yet: nothing deleted.
    let d = a.json(&["keys", "destroy-due", "--now", &at(6 * DAY)]);
    assert_eq!(d["destroyed"], serde_json::json!([]), "{d}");
    assert!(on_token(&a, "searcher-hot@1"));
    let c = a.json(&[
        "keys",
        "cancel-destroy",
        "searcher-hot@1",
        "--now",
        &at(6 * DAY),
    ]);
    assert_eq!(c["cancelled"][0]["status"], "revoked", "{c}");
    let show = a.json(&["keys", "show", "searcher-hot"]);
    assert_eq!(show["versions"][0]["status"], "revoked", "{show}");
    assert_eq!(
        show["versions"][0]["statusDetail"]["reason"], "laptop stolen",
        "{show}"
    );

    // second@1 and third@1: revoked and scheduled; second is deleted by the daily
    // `rotate --due`, third by `keys destroy-due`.
    for k in ["second", "third"] {
        a.ok(&[
            "revoke",
            k,
            "--reason",
            "retire",
            "--yes",
            "--direct",
            "--now",
            &at(DAY),
        ]);
        assert_eq!(a.status(k, 1), "destroy_scheduled");
    }
    let r = a.json(&["rotate", "--due", "--now", &at(8 * DAY - 1)]);
    assert_eq!(r["destroyed"], serde_json::json!([]), "{r}");
    let r = a.json(&["rotate", "--due", "--now", &at(8 * DAY)]);
    let destroyed: Vec<&str> = r["destroyed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(destroyed, ["second@1", "third@1"], "{r}");
    // (`rotate --due` carries out every due destruction; destroy-due then finds none.)
    let d = a.json(&["keys", "destroy-due", "--now", &at(9 * DAY)]);
    assert_eq!(d["destroyed"], serde_json::json!([]), "{d}");
    for k in ["second", "third"] {
        assert_eq!(a.status(k, 1), "destroyed");
        assert!(!on_token(&a, &format!("{k}@1")), "{:?}", token_labels(&a));
    }
    // The cancelled one is still there, still revoked.
    assert!(on_token(&a, "searcher-hot@1"));
    assert_eq!(a.status("searcher-hot", 1), "revoked");

    // keys destroy-due on its own: a fourth key revoked and due.
    a.ok(&["keys", "generate", "fourth", "--now", &at(0)]);
    a.ok(&[
        "revoke",
        "fourth",
        "--reason",
        "x",
        "--yes",
        "--direct",
        "--now",
        &at(DAY),
    ]);
    let d = a.json(&["keys", "destroy-due", "--now", &at(9 * DAY)]);
    assert_eq!(d["destroyed"], serde_json::json!(["fourth@1"]), "{d}");
    assert!(!on_token(&a, "fourth@1"));

    // Bad input: one line, nothing changed.
    let (code, line) = a.fails(&["keys", "cancel-destroy", "nope"]);
    assert_eq!(code, 1);
    assert!(line.contains("unknown key"), "{line}");
    let (code, line) = a.fails(&["keys", "cancel-destroy", "searcher-hot@4"]);
    assert_eq!(code, 1);
    assert!(line.contains("searcher-hot@4"), "{line}");
    let v: Value = a.json(&["audit", "verify"]);
    assert_eq!(v["ok"], true);
    // The signer starts with destroyed and revoked versions in its registry.
    let _signer = RunningSigner::start(&a);
}
