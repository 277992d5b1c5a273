//! The YubiHSM 2 backend against the `yubihsm` crate's MockHsm (a software YubiHSM 2; debug
//! builds only): key generation on the device without export capability, signatures that
//! recover to the key's address, transactions mined by anvil, refused credentials, the device's
//! audit log. The checks are the real-device suite's (`castellan_hardware_tests::suite`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use alloy::primitives::U256;
use alloy::providers::Provider;
use castellan_hardware_tests::suite;
use castellan_signer::backend::yubihsm::YubiHsmBackend;
use castellan_signer::backend::{BackendError, Health, KeyBackend, KeyRef, SignRequest};
use castellan_tests::anvil::{ANVIL_CHAIN_ID, Anvil};
use secrecy::SecretString;
use yubihsm::{Capability, Client, Connector, Credentials, Domain, authentication, object};

/// MockHsm's factory auth key and password.
const AUTH_KEY: u16 = 1;
const PASSWORD: &str = "password";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A fresh MockHsm (its connector clones share the device's state) and a backend on it.
fn mock() -> (Connector, YubiHsmBackend) {
    let connector = Connector::mockhsm();
    let backend = open(&connector, AUTH_KEY, PASSWORD).unwrap();
    assert_eq!(backend.health(), Health::Ready);
    (connector, backend)
}

fn open(
    connector: &Connector,
    auth_key: u16,
    password: &str,
) -> Result<YubiHsmBackend, BackendError> {
    YubiHsmBackend::open_with_connector(
        connector.clone(),
        "mockhsm",
        auth_key,
        &SecretString::from(password.to_owned()),
        &[1],
        Duration::from_secs(5),
    )
}

#[test]
fn generates_secp256k1_keys_on_the_device_without_export_under_wrap() {
    runtime().block_on(async {
        let (connector, backend) = mock();
        let key = suite::generate_and_read_back(&backend, "searcher-hot@1")
            .await
            .unwrap();
        let KeyRef::YubiHsm { object_id } = key.key_ref else {
            panic!("{:?}", key.key_ref)
        };
        // Inspect the object with an independent client on the same device.
        let client = Client::open(connector.clone(), Credentials::default(), false).unwrap();
        let info = client
            .get_object_info(object_id, object::Type::AsymmetricKey)
            .unwrap();
        assert_eq!(info.capabilities, Capability::SIGN_ECDSA);
        assert!(
            !info
                .capabilities
                .contains(Capability::EXPORTABLE_UNDER_WRAP)
        );
        assert_eq!(info.label.to_string(), "searcher-hot@1");

        // A duplicate label is refused; the loudly named backup variant adds the capability.
        let err = backend.generate("searcher-hot@1").await.unwrap_err();
        assert!(matches!(err, BackendError::KeyExists(_)), "{err:?}");
        let backup = backend
            .generate_with_wrapped_backup("treasury@1")
            .await
            .unwrap();
        let KeyRef::YubiHsm {
            object_id: backup_id,
        } = backup.key_ref
        else {
            panic!()
        };
        let info = client
            .get_object_info(backup_id, object::Type::AsymmetricKey)
            .unwrap();
        assert!(
            info.capabilities
                .contains(Capability::EXPORTABLE_UNDER_WRAP)
        );

        // Destroy, then the key is gone.
        backend.destroy(&key.key_ref).await.unwrap();
        let err = backend.key_info(&key.key_ref).await.unwrap_err();
        assert!(matches!(err, BackendError::KeyNotFound(_)), "{err:?}");
        let err = backend.find_by_label("searcher-hot@1").await.unwrap_err();
        assert!(matches!(err, BackendError::KeyNotFound(_)), "{err:?}");
        // Another backend's reference is refused before reaching the device.
        let err = backend
            .key_info(&KeyRef::Ledger {
                path: "m/44'/60'/0'/0/0".into(),
            })
            .await
            .unwrap_err();
        assert!(matches!(err, BackendError::KeyNotFound(_)), "{err:?}");
    });
}

#[test]
fn signs_100_digests_that_recover_to_the_key() {
    runtime().block_on(async {
        let (_connector, backend) = mock();
        let key = suite::generate_and_read_back(&backend, "hot@1")
            .await
            .unwrap();
        suite::sign_digests_and_recover(&backend, &key, 100)
            .await
            .unwrap();
        // A signature is verified against the expected key: another key's public key is refused.
        let other = suite::generate_and_read_back(&backend, "other@1")
            .await
            .unwrap();
        let err = backend
            .sign(
                &key.key_ref,
                &other.public_key,
                SignRequest::digest(suite::random_digest()),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, BackendError::BadSignature(_)), "{err:?}");
    });
}

#[test]
fn transactions_signed_on_the_mockhsm_are_mined_by_anvil() {
    runtime().block_on(async {
        let (_connector, backend) = mock();
        let key = suite::generate_and_read_back(&backend, "searcher-hot@1")
            .await
            .unwrap();
        let anvil = Anvil::start().await;
        assert_eq!(anvil.chain_id().await, ANVIL_CHAIN_ID);
        anvil
            .set_balance(key.address, U256::from(10u128.pow(18)))
            .await;
        let before = anvil.balance(suite::RECIPIENT).await;
        for nonce in 0..3 {
            let signed =
                suite::sign_transaction_check_sender(&backend, &key, ANVIL_CHAIN_ID, nonce)
                    .await
                    .unwrap();
            let hash = anvil.send_raw(&signed.raw).await;
            assert_eq!(hash, signed.hash);
            let receipt = anvil.receipt(hash).await;
            assert!(receipt.status(), "{receipt:?}");
            assert_eq!(receipt.from, key.address);
        }
        assert_eq!(
            anvil.balance(suite::RECIPIENT).await - before,
            U256::from(3_000)
        );
        assert_eq!(
            anvil
                .provider()
                .get_transaction_count(key.address)
                .await
                .unwrap(),
            3
        );
    });
}

#[test]
fn wrong_password_or_auth_key_is_refused_with_a_typed_error() {
    let connector = Connector::mockhsm();
    let secret = "hunter2-not-the-password";
    let result = open(&connector, AUTH_KEY, secret);
    suite::check_refused(result, secret, |e| {
        matches!(e, BackendError::AuthFailed { .. })
    })
    .unwrap();
    // A second auth key with its own password: the first key's password does not open it.
    // (MockHsm panics on an auth key id it does not hold, so the wrong key must exist.)
    let admin = Client::open(connector.clone(), Credentials::default(), false).unwrap();
    admin
        .put_authentication_key(
            2,
            "operator".into(),
            Domain::DOM1,
            Capability::SIGN_ECDSA | Capability::GENERATE_ASYMMETRIC_KEY,
            Capability::SIGN_ECDSA,
            authentication::Algorithm::YubicoAes,
            authentication::Key::derive_from_password(b"operator-password"),
        )
        .unwrap();
    let result = open(&connector, 2, PASSWORD);
    suite::check_refused(result, PASSWORD, |e| {
        matches!(e, BackendError::AuthFailed { .. })
    })
    .unwrap();
    assert!(open(&connector, 2, "operator-password").is_ok());
    // The right credentials still work afterwards.
    assert!(open(&connector, AUTH_KEY, PASSWORD).is_ok());
}

#[test]
fn the_device_audit_log_is_readable_and_debug_shows_no_secret() {
    runtime().block_on(async {
        let (_connector, backend) = mock();
        // MockHsm keeps no log entries; the command must still round-trip and parse.
        let log = backend.audit_log().await.unwrap();
        assert_eq!(log.unlogged_boot_events, 0);
        let debug = format!("{backend:?}");
        assert!(!debug.contains(PASSWORD), "{debug}");
        assert!(debug.ends_with(".. }"), "{debug}");
    });
}
