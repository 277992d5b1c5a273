//! The real-device cases and their runner: every case ends `Passed`, `Skipped` (with the
//! variable it needs) or `Failed` — never a silent pass.

use std::future::Future;

use castellan_signer::backend::BackendError;
use castellan_signer::backend::ledger::LedgerBackend;
use castellan_signer::backend::pkcs11::Pkcs11Backend;
use castellan_signer::backend::yubihsm::YubiHsmBackend;
use castellan_signer::backend::{KeyBackend, KeyRef, Payload, SignRequest};
use castellan_signer::eth::sign_personal_message;

use crate::env::{Device, INTERACTIVE, Targets};
use crate::suite;

/// Chain id of test transactions that are only signed, never sent (Ethereum mainnet: what a
/// Ledger shows by name).
const CHAIN_ID: u64 = 1;

/// One case of the suite.
pub struct Case {
    /// Its name, as printed and as matched by a filter.
    pub name: &'static str,
    /// The device it needs.
    pub device: Device,
    /// Whether it needs a person at the device ([`INTERACTIVE`]).
    pub interactive: bool,
    /// The check.
    pub run: fn(&Targets) -> Result<(), String>,
}

/// How a case ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It ran and passed.
    Passed,
    /// It did not run; the reason names the variable to set.
    Skipped(String),
    /// It ran and failed.
    Failed(String),
}

/// Every case, in order.
pub fn cases() -> Vec<Case> {
    vec![
        case(
            "yubihsm_generate_sign_100_digests_and_recover",
            Device::YubiHsm,
            false,
            yubihsm_sign_100,
        ),
        case(
            "yubihsm_sign_transaction_and_check_sender",
            Device::YubiHsm,
            false,
            yubihsm_transaction,
        ),
        case(
            "yubihsm_wrong_password_is_refused",
            Device::YubiHsm,
            false,
            yubihsm_wrong_password,
        ),
        case(
            "yubihsm_audit_log_is_readable",
            Device::YubiHsm,
            false,
            yubihsm_audit_log,
        ),
        case(
            "yubihsm_unplugged_mid_run",
            Device::YubiHsm,
            true,
            yubihsm_unplugged,
        ),
        case(
            "ledger_address_matches",
            Device::Ledger,
            false,
            ledger_address,
        ),
        case(
            "ledger_refuses_a_bare_digest",
            Device::Ledger,
            false,
            ledger_digest_refused,
        ),
        case(
            "ledger_sign_personal_messages_and_recover",
            Device::Ledger,
            true,
            ledger_personal,
        ),
        case(
            "ledger_sign_transaction_and_check_sender",
            Device::Ledger,
            true,
            ledger_transaction,
        ),
        case(
            "ledger_user_rejection_is_typed",
            Device::Ledger,
            true,
            ledger_rejection,
        ),
        case(
            "ledger_unplugged_mid_run",
            Device::Ledger,
            true,
            ledger_unplugged,
        ),
        case(
            "pkcs11_generate_sign_100_digests_and_recover",
            Device::Pkcs11,
            false,
            pkcs11_sign_100,
        ),
        case(
            "pkcs11_sign_transaction_and_check_sender",
            Device::Pkcs11,
            false,
            pkcs11_transaction,
        ),
        case(
            "pkcs11_wrong_pin_is_refused",
            Device::Pkcs11,
            false,
            pkcs11_wrong_pin,
        ),
        case(
            "pkcs11_unplugged_mid_run",
            Device::Pkcs11,
            true,
            pkcs11_unplugged,
        ),
    ]
}

/// Runs one case, or says why it is skipped.
pub fn run_case(case: &Case, targets: &Targets) -> Outcome {
    if let Err(reason) = targets.has(case.device) {
        return Outcome::Skipped(reason);
    }
    if case.interactive && !targets.interactive {
        return Outcome::Skipped(format!(
            "needs a person at the device: set {INTERACTIVE}=1 to run it"
        ));
    }
    match (case.run)(targets) {
        Ok(()) => Outcome::Passed,
        Err(reason) => Outcome::Failed(reason),
    }
}

fn case(
    name: &'static str,
    device: Device,
    interactive: bool,
    run: fn(&Targets) -> Result<(), String>,
) -> Case {
    Case {
        name,
        device,
        interactive,
        run,
    }
}

fn block_on<F: Future<Output = Result<(), String>>>(f: F) -> Result<(), String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(f)
}

fn say(message: &str) {
    eprintln!(">>> {message}");
}

fn open_yubihsm(t: &Targets) -> Result<YubiHsmBackend, String> {
    let config = t.yubihsm.as_ref().map_err(Clone::clone)?;
    YubiHsmBackend::open(config).map_err(|e| format!("open: {e}"))
}

fn open_pkcs11(t: &Targets) -> Result<Pkcs11Backend, String> {
    let config = t.pkcs11.as_ref().map_err(Clone::clone)?;
    Pkcs11Backend::open(config).map_err(|e| format!("open: {e}"))
}

async fn open_ledger(t: &Targets) -> Result<(LedgerBackend, KeyRef), String> {
    let target = t.ledger.as_ref().map_err(Clone::clone)?;
    let backend = LedgerBackend::open(&Default::default())
        .await
        .map_err(|e| format!("open: {e}"))?;
    Ok((
        backend,
        KeyRef::Ledger {
            path: target.path.clone(),
        },
    ))
}

/// Generates a key, runs `body` with it, and destroys the key whatever happened.
async fn with_new_key<B: KeyBackend>(
    backend: &B,
    prefix: &str,
    body: impl AsyncFnOnce(&B, &castellan_signer::backend::KeyInfo) -> Result<(), String>,
) -> Result<(), String> {
    let key = suite::generate_and_read_back(backend, &suite::unique_label(prefix)).await?;
    let result = body(backend, &key).await;
    let destroyed = backend.destroy(&key.key_ref).await;
    result?;
    destroyed.map_err(|e| format!("destroy: {e}"))
}

fn yubihsm_sign_100(t: &Targets) -> Result<(), String> {
    let backend = open_yubihsm(t)?;
    block_on(with_new_key(&backend, "hwtest", async |b, k| {
        suite::sign_digests_and_recover(b, k, 100).await
    }))
}

fn yubihsm_transaction(t: &Targets) -> Result<(), String> {
    let backend = open_yubihsm(t)?;
    block_on(with_new_key(&backend, "hwtest", async |b, k| {
        suite::sign_transaction_check_sender(b, k, CHAIN_ID, 0)
            .await
            .map(|_| ())
    }))
}

fn yubihsm_wrong_password(t: &Targets) -> Result<(), String> {
    let mut config = t.yubihsm.as_ref().map_err(Clone::clone)?.clone();
    let dir = std::env::temp_dir().join(suite::unique_label("castellan-hwtest"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let file = dir.join("wrong-password");
    let secret = "definitely-not-the-password";
    write_secret(&file, secret)?;
    config.password_file = Some(file);
    config.password_env = None;
    let result = YubiHsmBackend::open(&config);
    let _ = std::fs::remove_dir_all(&dir);
    suite::check_refused(result, secret, |e| {
        matches!(e, BackendError::AuthFailed { .. })
    })
}

fn yubihsm_audit_log(t: &Targets) -> Result<(), String> {
    let backend = open_yubihsm(t)?;
    block_on(async {
        let log = backend.audit_log().await.map_err(|e| e.to_string())?;
        // The session this backend opened is itself logged by the device.
        if log.entries.is_empty() {
            return Err("the device's audit log is empty".into());
        }
        Ok(())
    })
}

fn yubihsm_unplugged(t: &Targets) -> Result<(), String> {
    let backend = open_yubihsm(t)?;
    block_on(with_new_key(&backend, "hwtest", async |b, k| {
        suite::unplugged_mid_run(b, k, &say).await
    }))
}

fn pkcs11_sign_100(t: &Targets) -> Result<(), String> {
    let backend = open_pkcs11(t)?;
    block_on(with_new_key(&backend, "hwtest", async |b, k| {
        suite::sign_digests_and_recover(b, k, 100).await
    }))
}

fn pkcs11_transaction(t: &Targets) -> Result<(), String> {
    let backend = open_pkcs11(t)?;
    block_on(with_new_key(&backend, "hwtest", async |b, k| {
        suite::sign_transaction_check_sender(b, k, CHAIN_ID, 0)
            .await
            .map(|_| ())
    }))
}

fn pkcs11_wrong_pin(t: &Targets) -> Result<(), String> {
    // One wrong PIN decrements the token's retry counter; the next successful login (the other
    // cases) resets it on every token we know. Never run this case in a loop.
    let mut config = t.pkcs11.as_ref().map_err(Clone::clone)?.clone();
    let dir = std::env::temp_dir().join(suite::unique_label("castellan-hwtest"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let file = dir.join("wrong-pin");
    let secret = "00000000-wrong";
    write_secret(&file, secret)?;
    config.pin_file = Some(file);
    config.pin_env = None;
    let result = Pkcs11Backend::open(&config);
    let _ = std::fs::remove_dir_all(&dir);
    suite::check_refused(result, secret, |e| {
        matches!(e, BackendError::LoginFailed { .. })
    })
}

fn pkcs11_unplugged(t: &Targets) -> Result<(), String> {
    let backend = open_pkcs11(t)?;
    block_on(with_new_key(&backend, "hwtest", async |b, k| {
        suite::unplugged_mid_run(b, k, &say).await
    }))
}

fn ledger_address(t: &Targets) -> Result<(), String> {
    block_on(async {
        let (backend, key_ref) = open_ledger(t).await?;
        let key = backend
            .key_info(&key_ref)
            .await
            .map_err(|e| e.to_string())?;
        let again = backend
            .key_info(&key_ref)
            .await
            .map_err(|e| e.to_string())?;
        if key != again {
            return Err("two reads of the same path differ".into());
        }
        match t.ledger.as_ref().ok().and_then(|l| l.expected_address) {
            Some(expected) if expected != key.address => Err(format!(
                "the Ledger derives {} at this path, expected {expected}",
                key.address
            )),
            _ => Ok(()),
        }
    })
}

fn ledger_digest_refused(t: &Targets) -> Result<(), String> {
    block_on(async {
        let (backend, key_ref) = open_ledger(t).await?;
        let key = backend
            .key_info(&key_ref)
            .await
            .map_err(|e| e.to_string())?;
        match backend
            .sign(
                &key.key_ref,
                &key.public_key,
                SignRequest::digest(suite::random_digest()),
            )
            .await
        {
            Err(BackendError::Unsupported(_)) => Ok(()),
            other => Err(format!("a bare digest gave {other:?}")),
        }
    })
}

fn ledger_personal(t: &Targets) -> Result<(), String> {
    block_on(async {
        let (backend, key_ref) = open_ledger(t).await?;
        let key = backend
            .key_info(&key_ref)
            .await
            .map_err(|e| e.to_string())?;
        for i in 0..3 {
            say(&format!("CONFIRM message {} of 3 on the Ledger", i + 1));
            let message = format!("castellan hardware test {i}").into_bytes();
            let sig = sign_personal_message(&backend, &key, message.clone())
                .await
                .map_err(|e| e.to_string())?;
            let recovered = sig
                .signature
                .recover_address_from_msg(&message)
                .map_err(|e| e.to_string())?;
            if recovered != key.address {
                return Err(format!("message {i} recovers to {recovered}"));
            }
        }
        Ok(())
    })
}

fn ledger_transaction(t: &Targets) -> Result<(), String> {
    block_on(async {
        let (backend, key_ref) = open_ledger(t).await?;
        let key = backend
            .key_info(&key_ref)
            .await
            .map_err(|e| e.to_string())?;
        say("CONFIRM the transaction (1000 wei to 0x7099…79C8, chain 1) on the Ledger");
        suite::sign_transaction_check_sender(&backend, &key, CHAIN_ID, 0)
            .await
            .map(|_| ())
    })
}

fn ledger_rejection(t: &Targets) -> Result<(), String> {
    block_on(async {
        let (backend, key_ref) = open_ledger(t).await?;
        let key = backend
            .key_info(&key_ref)
            .await
            .map_err(|e| e.to_string())?;
        say("REJECT the message on the Ledger");
        let message = b"castellan: reject me".to_vec();
        let request = SignRequest {
            digest: alloy::primitives::eip191_hash_message(&message),
            payload: Payload::PersonalMessage(message),
        };
        match backend.sign(&key.key_ref, &key.public_key, request).await {
            Err(BackendError::UserRejected) => Ok(()),
            other => Err(format!("expected UserRejected, got {other:?}")),
        }
    })
}

fn ledger_unplugged(t: &Targets) -> Result<(), String> {
    block_on(async {
        let (backend, key_ref) = open_ledger(t).await?;
        let key = backend
            .key_info(&key_ref)
            .await
            .map_err(|e| e.to_string())?;
        say("each message needs confirming on the Ledger while it is plugged in");
        suite::unplugged_mid_run(&backend, &key, &say).await
    })
}

fn write_secret(path: &std::path::Path, secret: &str) -> Result<(), String> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(|e| e.to_string())?;
    file.write_all(secret.as_bytes()).map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn every_case_is_reported_skipped_without_devices() {
        let targets = Targets::from_vars(&|_| None);
        let cases = cases();
        for device in [Device::YubiHsm, Device::Ledger, Device::Pkcs11] {
            assert!(
                cases.iter().any(|c| c.device == device),
                "{device:?} has no case"
            );
        }
        for case in &cases {
            match run_case(case, &targets) {
                Outcome::Skipped(reason) => {
                    let var = match case.device {
                        Device::YubiHsm => "CASTELLAN_YUBIHSM_CONNECTOR",
                        Device::Ledger => "CASTELLAN_LEDGER",
                        Device::Pkcs11 => "CASTELLAN_HW_PKCS11_MODULE",
                    };
                    assert!(reason.contains(var), "{}: {reason}", case.name);
                }
                other => panic!("{} ran without a device: {other:?}", case.name),
            }
        }
        let mut names: Vec<_> = cases.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), cases.len(), "case names are unique");
    }

    #[test]
    fn interactive_cases_say_what_they_need() {
        let targets = Targets::from_vars(&|name| match name {
            "CASTELLAN_LEDGER" => Some("1".into()),
            _ => None,
        });
        let unplug = cases()
            .into_iter()
            .find(|c| c.name == "ledger_unplugged_mid_run")
            .unwrap();
        match run_case(&unplug, &targets) {
            Outcome::Skipped(reason) => assert!(reason.contains(INTERACTIVE), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_variables_are_reported_not_ignored() {
        let targets = Targets::from_vars(&|name| match name {
            "CASTELLAN_YUBIHSM_CONNECTOR" => Some("tcp://nowhere".into()),
            "CASTELLAN_HW_PKCS11_MODULE" => Some("/lib/x.so".into()),
            "CASTELLAN_HW_REQUIRE" => Some("yubihsm,pkcs11".into()),
            _ => None,
        });
        assert!(targets.yubihsm.unwrap_err().contains("http://HOST:PORT"));
        assert!(
            targets
                .pkcs11
                .unwrap_err()
                .contains("CASTELLAN_HW_PKCS11_TOKEN")
        );
        assert_eq!(targets.required, vec![Device::YubiHsm, Device::Pkcs11]);
        let ok = Targets::from_vars(&|name| match name {
            "CASTELLAN_YUBIHSM_CONNECTOR" => Some("http://127.0.0.1:12345".into()),
            "CASTELLAN_YUBIHSM_PASSWORD_FILE" => Some("/etc/pw".into()),
            "CASTELLAN_YUBIHSM_AUTH_KEY" => Some("2".into()),
            _ => None,
        });
        let config = ok.yubihsm.unwrap();
        assert_eq!(config.auth_key_id, 2);
        config.validate().unwrap();
    }
}
