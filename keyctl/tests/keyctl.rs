//! keyctl over the real binaries: `keyctl dev init` makes a development appliance per test
//! (SoftHSM token directory of its own, certificates, keys, configs); tests that need the signer
//! run the real `signer` binary (`target/<profile>/signer`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::collections::BTreeSet;

use castellan_api::client::ClientError;
use common::*;
use serde_json::Value;

#[test]
fn dev_init_makes_a_complete_appliance_and_keys_generate_list_show() {
    let a = Appliance::new();
    for f in [
        "keyctl.toml",
        "signer.toml",
        "submitter.toml",
        "policy.toml",
        "signer.db",
        "softhsm2.conf",
        "tls/ca.pem",
        "tls/signer.pem",
        "tls/admin.key",
        "tls/approver-3.pem",
        "tls/strategy-alpha.pem",
        "tls/submitter-client.pem",
        "tls/signer-client.pem",
        "secrets/hsm-pin",
    ] {
        assert!(a.dir.join(f).is_file(), "{f} missing");
    }
    use std::os::unix::fs::PermissionsExt;
    for secret in ["secrets/hsm-pin", "tls/admin.key", "tls/ca.key"] {
        let mode = std::fs::metadata(a.dir.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{secret} is readable by others: {mode:o}");
    }
    // The configs it wrote load with the signer's and the policy's own parsers.
    castellan_signer::config::SignerConfig::load(&a.dir.join("signer.toml")).unwrap();
    a.ok(&[
        "policy",
        "check",
        a.dir.join("policy.toml").to_str().unwrap(),
    ]);

    let keys = a.json(&["keys", "list"]);
    let names: Vec<&str> = keys
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["relay-auth", "searcher-hot"]);
    assert_eq!(a.status("searcher-hot", 1), "active");

    let g = a.json(&["keys", "generate", "treasury", "--rotate-every", "7d"]);
    assert_eq!(g["key"], "treasury@1");
    let show = a.json(&["keys", "show", "treasury"]);
    assert_eq!(show["rotateEverySeconds"], 7 * 86400);
    assert_eq!(show["versions"][0]["status"], "active");
    assert!(
        show["versions"][0]["backend"]
            .as_str()
            .unwrap()
            .starts_with("pkcs11:treasury@1#")
    );
    assert_eq!(show["due"], false);
    let text = a.ok(&["keys", "show", "treasury"]);
    assert!(
        text.contains("next rotation in 6d23h") || text.contains("next rotation in 7d00h"),
        "{text}"
    );

    // Generating an existing name is refused (rotate is the way to a new version).
    let (code, line) = a.fails(&["keys", "generate", "treasury"]);
    assert_eq!(code, 1);
    assert!(line.contains("already exists"), "{line}");

    // Shell completions.
    let bash = a.ok(&["completions", "bash"]);
    assert!(bash.contains("keyctl") && bash.contains("rotate"));
}

#[test]
fn rotate_gives_a_new_address_old_version_retires_on_schedule_and_the_signer_uses_the_new_one() {
    let a = Appliance::new();
    let signer = RunningSigner::start(&a);
    let v1 = a.address("searcher-hot", 1);
    let signed = sign(&a, "searcher-hot", 0)
        .unwrap_or_else(|e| panic!("signing before rotation: {e}\n{}", signer.log_text()));
    assert_eq!(signed.key_version, "searcher-hot@1");
    assert_eq!(signed.from.to_checksum(None), v1);

    let now = now_secs();
    let (r, took) = timed(|| {
        a.json(&[
            "rotate",
            "searcher-hot",
            "--grace",
            "1h",
            "--now",
            &now.to_string(),
        ])
    });
    eprintln!("keyctl rotate took {took:?}");
    // The running signer is asked to reload its keys, and does.
    let reload = r["signer"]["reload"].as_str().unwrap();
    assert_eq!(reload, "reloaded", "{r}");
    assert_eq!(r["old"]["version"], "searcher-hot@1");
    assert_eq!(r["old"]["address"], v1.as_str());
    assert_eq!(r["new"]["version"], "searcher-hot@2");
    let v2 = a.address("searcher-hot", 2);
    assert_eq!(r["new"]["address"], v2.as_str());
    assert_ne!(v1, v2, "the new version has a new address");
    assert_eq!(a.status("searcher-hot", 1), "retiring");
    assert_eq!(a.status("searcher-hot", 2), "active");
    assert_eq!(
        r["old"]["statusDetail"]["until"].as_u64().unwrap(),
        (now + 3600) * 1000
    );

    // Inside the grace period `rotate --due` leaves it retiring; after it, retires it.
    let due = a.json(&["rotate", "--due", "--now", &(now + 1800).to_string()]);
    assert_eq!(due["retired"].as_array().unwrap().len(), 0, "{due}");
    assert_eq!(a.status("searcher-hot", 1), "retiring");
    let due = a.json(&["rotate", "--due", "--now", &(now + 3601).to_string()]);
    assert_eq!(
        due["retired"],
        serde_json::json!(["searcher-hot@1"]),
        "{due}"
    );
    assert_eq!(due["rotated"].as_array().unwrap().len(), 0, "{due}");
    assert_eq!(a.status("searcher-hot", 1), "retired");

    // Requests naming the key sign with the new version, without a restart.
    let signed = sign(&a, "searcher-hot", 1)
        .unwrap_or_else(|e| panic!("signing after rotation: {e}\n{}", signer.log_text()));
    assert_eq!(signed.key_version, "searcher-hot@2");
    assert_eq!(signed.from.to_checksum(None), v2);
    a.ok(&["audit", "verify"]);
}

#[test]
fn rotate_due_rotates_exactly_the_keys_past_their_schedule() {
    let a = Appliance::new();
    let t0 = now_secs();
    let at = |d: u64| (t0 + d).to_string();
    a.ok(&[
        "keys",
        "generate",
        "daily",
        "--rotate-every",
        "1d",
        "--now",
        &at(0),
    ]);
    a.ok(&[
        "keys",
        "generate",
        "weekly",
        "--rotate-every",
        "7d",
        "--now",
        &at(0),
    ]);
    a.ok(&["keys", "generate", "never", "--now", &at(0)]);
    let rotated = |v: &Value| -> BTreeSet<String> {
        v["rotated"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"].as_str().unwrap().to_owned())
            .collect()
    };
    // Nothing is due yet.
    let v = a.json(&["rotate", "--due", "--now", &at(3600)]);
    assert!(rotated(&v).is_empty(), "{v}");
    // After two days: only `daily` (searcher-hot is on 30 days, relay-auth and never have none).
    let v = a.json(&["rotate", "--due", "--now", &at(2 * 86400)]);
    assert_eq!(rotated(&v), BTreeSet::from(["daily".to_owned()]), "{v}");
    assert_eq!(a.status("daily", 2), "active");
    assert_eq!(a.status("weekly", 1), "active");
    // Run again at the same time: nothing more (daily@2 is fresh).
    let v = a.json(&["rotate", "--due", "--now", &at(2 * 86400)]);
    assert!(rotated(&v).is_empty(), "{v}");
    // After 31 days: daily (again), weekly and searcher-hot; never and relay-auth untouched.
    let v = a.json(&["rotate", "--due", "--now", &at(31 * 86400)]);
    assert_eq!(
        rotated(&v),
        BTreeSet::from(["daily".into(), "weekly".into(), "searcher-hot".into()]),
        "{v}"
    );
    // daily@1's 24h grace (from keyctl.toml) ended long ago: retired in that run.
    assert!(
        v["retired"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "daily@1"),
        "{v}"
    );
    assert_eq!(a.status("daily", 1), "retired");
    assert_eq!(a.status("daily", 3), "active");
    assert_eq!(a.status("never", 1), "active");
    assert_eq!(a.status("relay-auth", 1), "active");
    let show = a.json(&["keys", "show", "never"]);
    assert_eq!(show["versions"].as_array().unwrap().len(), 1);
}

#[test]
fn revoke_with_the_signer_down_stays_refused_after_it_restarts() {
    let a = Appliance::new();
    let mut signer = RunningSigner::start(&a);
    sign(&a, "searcher-hot", 0).unwrap_or_else(|e| panic!("{e}\n{}", signer.log_text()));
    signer.stop();

    let o = a.run(&[
        "--json",
        "revoke",
        "searcher-hot",
        "--reason",
        "laptop stolen",
        "--yes",
    ]);
    assert!(o.status.success(), "{}", dump(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["via"], "store", "{v}");
    assert_eq!(v["revoked"], serde_json::json!(["searcher-hot@1"]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("signer unreachable"));
    assert_eq!(a.status("searcher-hot", 1), "destroy_scheduled");

    let signer = RunningSigner::start(&a);
    match sign(&a, "searcher-hot", 1) {
        Err(ClientError::Api { status, code, .. }) => {
            assert!((400..500).contains(&status), "{status} {code}");
        }
        other => panic!(
            "a revoked key signed after restart: {other:?}\n{}",
            signer.log_text()
        ),
    }
    // The other key still signs nothing it should not, and the chain is intact.
    a.ok(&["audit", "verify"]);
}

#[test]
fn revoke_through_the_signer_refuses_its_very_next_request() {
    let a = Appliance::new();
    let signer = RunningSigner::start(&a);
    sign(&a, "searcher-hot", 0).unwrap_or_else(|e| panic!("{e}\n{}", signer.log_text()));
    let (v, took) = timed(|| a.json(&["revoke", "searcher-hot@1", "--reason", "test", "-y"]));
    assert_eq!(v["via"], "signer", "{v}");
    let (refused, gap) = timed(|| sign(&a, "searcher-hot", 1));
    eprintln!("keyctl revoke took {took:?}; the next request was answered {gap:?} later");
    assert!(refused.is_err(), "a revoked key signed: {refused:?}");
    assert_eq!(a.status("searcher-hot", 1), "destroy_scheduled");
}

fn copy_store(a: &Appliance, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let db = a.dir.join(format!("{name}.db"));
    std::fs::copy(a.dir.join("signer.db"), &db).unwrap();
    for ext in ["-wal", "-shm"] {
        let src = a.dir.join(format!("signer.db{ext}"));
        if src.exists() {
            std::fs::copy(&src, a.dir.join(format!("{name}.db{ext}"))).unwrap();
        }
    }
    let text = std::fs::read_to_string(&a.config).unwrap().replace(
        &format!("{}/signer.db", a.dir.display()),
        &db.display().to_string(),
    );
    let config = a.dir.join(format!("{name}.toml"));
    std::fs::write(&config, text).unwrap();
    (db, config)
}

fn verify_with(config: &std::path::Path) -> std::process::Output {
    keyctl()
        .arg("--config")
        .arg(config)
        .args(["audit", "verify"])
        .output()
        .unwrap()
}

#[test]
fn audit_verify_names_the_record_that_was_altered_dropped_or_reordered() {
    let a = Appliance::new();
    a.ok(&["keys", "generate", "one"]);
    a.ok(&["keys", "generate", "two"]);
    let ok = a.json(&["audit", "verify"]);
    assert!(ok["records"].as_u64().unwrap() >= 8, "{ok}");

    // Altered: a record's identity rewritten.
    let (db, config) = copy_store(&a, "altered");
    let c = rusqlite::Connection::open(&db).unwrap();
    assert_eq!(
        c.execute("UPDATE audit SET identity = 'mallory' WHERE seq = 5", [])
            .unwrap(),
        1
    );
    drop(c);
    let o = verify_with(&config);
    let (code, line) = assert_fails_one_line(&o, &["audit", "verify"]);
    assert_eq!(code, 5);
    assert!(
        line.contains("audit record 5") && line.contains("altered"),
        "{line}"
    );

    // Dropped: a record deleted from the middle.
    let (db, config) = copy_store(&a, "dropped");
    let c = rusqlite::Connection::open(&db).unwrap();
    assert_eq!(c.execute("DELETE FROM audit WHERE seq = 4", []).unwrap(), 1);
    drop(c);
    let o = verify_with(&config);
    let (code, line) = assert_fails_one_line(&o, &["audit", "verify"]);
    assert_eq!(code, 5);
    assert!(
        line.contains("audit record 5") && line.contains("gap"),
        "{line}"
    );

    // Reordered: records 3 and 4 swap places (their seq numbers exchanged).
    let (db, config) = copy_store(&a, "reordered");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "UPDATE audit SET seq = 1000000 WHERE seq = 3;
         UPDATE audit SET seq = 3 WHERE seq = 4;
         UPDATE audit SET seq = 4 WHERE seq = 1000000;",
    )
    .unwrap();
    drop(c);
    let o = verify_with(&config);
    let (code, line) = assert_fails_one_line(&o, &["audit", "verify"]);
    assert_eq!(code, 5);
    assert!(line.contains("audit record 3"), "{line}");

    // An export verifies; an edited line in it does not, and the record is named.
    let export = a.dir.join("audit.jsonl");
    a.ok(&["audit", "export", "--out", export.to_str().unwrap()]);
    let v = a.json(&["audit", "verify", "--file", export.to_str().unwrap()]);
    assert_eq!(v["records"], ok["records"]);
    let text = std::fs::read_to_string(&export).unwrap();
    let edited: Vec<String> = text
        .lines()
        .map(|l| {
            if l.ends_with("\"seq\":5}") {
                l.replace("\"op\":\"register\"", "\"op\":\"registr\"")
            } else {
                l.to_owned()
            }
        })
        .collect();
    assert_ne!(
        edited.join("\n"),
        text.trim_end(),
        "the edit changed nothing"
    );
    std::fs::write(&export, edited.join("\n")).unwrap();
    let (code, line) = a.fails(&["audit", "verify", "--file", export.to_str().unwrap()]);
    assert_eq!(code, 5);
    assert!(line.contains("audit record 5"), "{line}");
}

#[test]
fn unfreeze_needs_two_approvals_signed_with_approver_keys_on_the_token() {
    let a = Appliance::new();
    let signer = RunningSigner::start(&a);
    a.ok(&["freeze", "--reason", "incident", "--yes"]);
    let o = a.run(&["status"]);
    assert_eq!(o.status.code(), Some(6), "{}", dump(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("FROZEN"));
    assert!(sign(&a, "searcher-hot", 0).is_err(), "signed while frozen");

    let p = a.json(&["unfreeze", "--reason", "incident over"]);
    let id = p["requestId"].as_str().unwrap().to_owned();
    assert_eq!(p["threshold"], 2);
    let pending = a.json(&["pending"]);
    assert!(
        pending
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == id.as_str()),
        "{pending}"
    );

    let first = a.json(&["approve", &id, "--as", "approver-1"]);
    assert_eq!(first["approvals"], 1, "{first}");
    // The same approver twice does not count twice.
    let again = a.json(&["approve", &id, "--as", "approver-1"]);
    assert_eq!(again["approvals"], 1, "{again}");
    let second = a.json(&["approve", &id, "--as", "approver-2"]);
    assert_eq!(second["state"], "executed", "{second}");
    sign(&a, "searcher-hot", 0).unwrap_or_else(|e| panic!("{e}\n{}", signer.log_text()));
    // (status exits 6 here because the dev submitter is not running.)
    let st: Value = serde_json::from_slice(&a.run(&["--json", "status"]).stdout).unwrap();
    assert!(st["frozen"].is_null(), "{st}");
}

#[test]
fn status_pause_and_policy_commands() {
    let a = Appliance::new();
    let _signer = RunningSigner::start(&a);
    let st = a.run(&["--json", "status"]);
    let v: Value = serde_json::from_slice(&st.stdout).unwrap();
    // The dev submitter is not running: reported, and the exit code says so.
    assert_eq!(st.status.code(), Some(6));
    assert_eq!(v["signer"], "reachable", "{v}");
    assert_eq!(v["hsm"], "Ready", "{v}");
    assert_eq!(v["store"], true);
    assert!(v["submitter"].as_str().unwrap().starts_with("unreachable"));

    a.ok(&["pause", "searcher-hot", "--reason", "breaker test", "-y"]);
    let v = a.json(&["keys", "show", "searcher-hot"]);
    assert!(v["pausedUntil"].is_u64(), "{v}");
    assert!(sign(&a, "searcher-hot", 0).is_err(), "signed while paused");
    a.ok(&["resume", "searcher-hot"]);
    sign(&a, "searcher-hot", 0).unwrap();

    let policy = a.dir.join("policy.toml");
    let changed = a.dir.join("policy2.toml");
    std::fs::write(
        &changed,
        std::fs::read_to_string(&policy)
            .unwrap()
            .replace("max_value = \"5 ether\"", "max_value = \"4 ether\""),
    )
    .unwrap();
    let d = a.json(&[
        "policy",
        "diff",
        policy.to_str().unwrap(),
        changed.to_str().unwrap(),
    ]);
    assert_eq!(d["same"], false);
    assert!(
        d["added"].to_string().contains("4000000000000000000"),
        "{d}"
    );
    let same = a.json(&[
        "policy",
        "diff",
        policy.to_str().unwrap(),
        policy.to_str().unwrap(),
    ]);
    assert_eq!(same["same"], true);
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/policy.toml");
    a.ok(&["policy", "check", deploy]);
}

#[test]
fn bad_input_to_every_command_exits_nonzero_with_one_line_and_changes_nothing() {
    let a = Appliance::new();
    let t = now_secs().to_string();
    let before_keys = a.json(&["keys", "list", "--now", &t]);
    let before_audit = a.json(&["audit", "verify"]);
    let bad_policy = a.dir.join("bad-policy.toml");
    std::fs::write(&bad_policy, "[defaults]\nmax_value = \"5 eth\"\n").unwrap();
    let bp = bad_policy.to_str().unwrap().to_owned();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["keys", "show", "nope"], 1, "unknown key"),
        (vec!["keys", "generate", "Bad_Name"], 1, "key name"),
        (
            vec!["keys", "generate", "x", "--rotate-every", "3 parsecs"],
            1,
            "duration",
        ),
        (vec!["rotate", "nope"], 1, "unknown key"),
        (
            vec!["rotate", "searcher-hot", "--grace", "soon"],
            1,
            "duration",
        ),
        (vec!["rotate"], 2, "--due"),
        (
            vec!["revoke", "nope", "--reason", "x", "-y"],
            1,
            "unknown key",
        ),
        (
            vec!["revoke", "searcher-hot@9", "--reason", "x", "-y"],
            1,
            "searcher-hot@9",
        ),
        (
            vec!["revoke", "searcher-hot@zero", "--reason", "x", "-y"],
            1,
            "name@N",
        ),
        (
            vec!["revoke", "searcher-hot", "--reason", "x"],
            3,
            "not confirmed",
        ),
        (vec!["revoke", "searcher-hot"], 2, "--reason"),
        (vec!["freeze", "--reason", "x"], 3, "not confirmed"),
        (
            vec!["pause", "searcher-hot", "--reason", "x"],
            3,
            "not confirmed",
        ),
        (
            vec!["pause", "nope", "--reason", "x", "-y"],
            1,
            "unknown key",
        ),
        (
            vec![
                "pause",
                "searcher-hot",
                "--reason",
                "x",
                "--cooldown",
                "1 fortnight",
                "-y",
            ],
            1,
            "duration",
        ),
        (vec!["resume", "searcher-hot"], 4, "unreachable"),
        (vec!["unfreeze", "--reason", "x"], 4, "unreachable"),
        (
            vec!["approve", "some-id", "--as", "approver-1"],
            4,
            "unreachable",
        ),
        (
            vec!["approve", "some-id", "--as", "mallory"],
            1,
            "no approver",
        ),
        (
            vec!["reject", "some-id", "--as", "approver-1", "--ttl", "ever"],
            1,
            "duration",
        ),
        (
            vec!["audit", "export", "--since", "yesterday"],
            1,
            "--since",
        ),
        (
            vec!["audit", "verify", "--file", "/nonexistent.jsonl"],
            1,
            "cannot read",
        ),
        (
            vec!["policy", "check", "/nonexistent.toml"],
            1,
            "cannot read",
        ),
        (vec!["policy", "check", &bp], 1, "bad-policy.toml"),
        (vec!["teleport"], 2, "teleport"),
        (vec!["rotate", "searcher-hot", "--sweep"], 1, "[sweep]"),
        (vec!["rotate", "--due", "--sweep"], 2, "--sweep"),
        (vec!["sweep", "searcher-hot"], 1, "name@N"),
        (vec!["sweep", "searcher-hot@1"], 1, "[sweep]"),
        (
            vec!["revoke", "searcher-hot", "--reason", "x", "-y", "--destroy"],
            3,
            "--confirm-destroy",
        ),
        (vec!["keys", "cancel-destroy", "nope"], 1, "unknown key"),
        (
            vec!["keys", "cancel-destroy", "searcher-hot"],
            1,
            "no destruction is scheduled",
        ),
        (
            vec!["keys", "register-ledger", "cold", "--path", "44/60"],
            1,
            "derivation path",
        ),
        (
            vec![
                "keys",
                "register-ledger",
                "searcher-hot",
                "--path",
                "m/44'/60'/0'/0/0",
            ],
            1,
            "already exists",
        ),
        (vec!["completions", "tcsh"], 2, "tcsh"),
    ];
    for (args, want_code, want_text) in &cases {
        let (code, line) = a.fails(args);
        assert_eq!(code, *want_code, "keyctl {args:?}: {line}");
        assert!(
            line.contains(want_text),
            "keyctl {args:?}: {line:?} lacks {want_text:?}"
        );
    }
    // A missing or broken keyctl.toml.
    let o = keyctl()
        .args(["--config", "/nonexistent/keyctl.toml", "keys", "list"])
        .output()
        .unwrap();
    let (code, line) = assert_fails_one_line(&o, &["keys", "list"]);
    assert_eq!(code, 1);
    assert!(line.contains("/nonexistent/keyctl.toml"), "{line}");
    let broken = a.dir.join("broken.toml");
    std::fs::write(&broken, "[store]\npath = 1\n").unwrap();
    let o = keyctl()
        .arg("--config")
        .arg(&broken)
        .args(["keys", "list"])
        .output()
        .unwrap();
    assert_fails_one_line(&o, &["keys", "list"]);

    // Nothing changed: same keys, same audit chain head.
    assert_eq!(a.json(&["keys", "list", "--now", &t]), before_keys);
    let after_audit = a.json(&["audit", "verify"]);
    assert_eq!(after_audit["headHash"], before_audit["headHash"]);
    assert_eq!(after_audit["records"], before_audit["records"]);
    // And no stray key objects on the token: the PIN-less listing shows only the dev keys.
}
