//! The PKCS#11 pool recovers by itself, without a new backend, when its sessions, its login or
//! the token itself are lost behind its back.
//!
//! Closing another process's sessions is impossible in PKCS#11, so the losses are caused inside
//! the backend's own process, in the two ways that happen in production:
//! - **logout behind its back**: another session of the same process (the test's own, opened
//!   through cryptoki directly) calls `C_Logout`, which logs out every session of the process
//!   on that token, as an HSM's login timeout or another component sharing the module would;
//! - **device reset and unplug**: the backend's test hook `simulate_device_reset` calls
//!   `C_Finalize` on the backend's own module context (every session and the login vanish, as
//!   when a device resets), and the test moves the token's directory away so that the token is
//!   absent ("unplugged") until it moves it back. The pool must notice on its own, report
//!   `Recovering`, refuse requests fast, and come back `Ready` after the token reappears.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use alloy::primitives::B256;
use castellan_signer::backend::pkcs11::{PinSource, Pkcs11Backend, Pkcs11Config};
use castellan_signer::backend::{BackendError, Health, KeyBackend, KeyInfo, SignRequest};
use castellan_tests::softhsm::{self, PIN_ENV, SoftHsmToken};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use rand::RngCore;

fn config(token: &SoftHsmToken) -> Pkcs11Config {
    Pkcs11Config::new(
        token.module(),
        token.label(),
        PinSource::Env(PIN_ENV.into()),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn random_digest() -> B256 {
    let mut d = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut d);
    B256::from(d)
}

async fn sign_ok(backend: &Pkcs11Backend, key: &KeyInfo) {
    for _ in 0..20 {
        let digest = random_digest();
        let sig = backend
            .sign(&key.key_ref, &key.public_key, SignRequest::digest(digest))
            .await
            .unwrap();
        assert_eq!(
            sig.signature()
                .recover_address_from_prehash(&digest)
                .unwrap(),
            key.address
        );
    }
}

async fn wait_for(
    backend: &Pkcs11Backend,
    what: &str,
    limit: Duration,
    pred: impl Fn(&Health) -> bool,
) -> Health {
    let start = Instant::now();
    loop {
        let health = backend.health();
        if pred(&health) {
            return health;
        }
        assert!(
            start.elapsed() < limit,
            "no {what} within {limit:?}; health is {health:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Logs the whole process out of the token through a session of the test's own.
fn logout_behind_its_back(token: &SoftHsmToken) {
    let ctx = Pkcs11::new(token.module()).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label() == token.label())
        .unwrap();
    let session = ctx.open_ro_session(slot).unwrap();
    session.logout().unwrap();
    // The session closes on drop; the backend's own sessions stay open, so this does not
    // change the login state further.
}

#[test]
fn recovers_after_logout_behind_its_back() {
    softhsm::in_own_process("recovers_after_logout_behind_its_back", "logout", |token| {
        runtime().block_on(async {
            let backend = Pkcs11Backend::open(&config(token)).unwrap();
            let key = backend.generate("searcher-hot").await.unwrap();
            sign_ok(&backend, &key).await; // workers now hold cached handles
            assert_eq!(backend.recoveries(), 0);

            // 1. Idle pool: the keeper's ping notices the logout and logs in again by itself.
            logout_behind_its_back(token);
            let start = Instant::now();
            while backend.recoveries() < 1 {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "no recovery; health {:?}",
                    backend.health()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            wait_for(&backend, "Ready", Duration::from_secs(5), |h| {
                *h == Health::Ready
            })
            .await;
            sign_ok(&backend, &key).await;

            // 2. A request in flight meets the logout first: it is retried once after the
            //    re-login and succeeds; the caller never sees the loss.
            logout_behind_its_back(token);
            let digest = random_digest();
            let sig = backend
                .sign(&key.key_ref, &key.public_key, SignRequest::digest(digest))
                .await
                .unwrap();
            assert_eq!(
                sig.signature()
                    .recover_address_from_prehash(&digest)
                    .unwrap(),
                key.address
            );
            assert_eq!(backend.recoveries(), 2);
            assert_eq!(backend.health(), Health::Ready);
            assert_eq!(backend.key_info(&key.key_ref).await.unwrap(), key);
        });
    });
}

#[test]
fn recovers_after_device_reset_and_replug() {
    softhsm::in_own_process(
        "recovers_after_device_reset_and_replug",
        "replug",
        |token| {
            runtime().block_on(async {
            let backend = Pkcs11Backend::open(&config(token)).unwrap();
            let key = backend.generate("searcher-hot").await.unwrap();
            sign_ok(&backend, &key).await;

            // Reset the device as the process sees it, and unplug the token.
            let object_dir = token.token_object_dir().unwrap();
            let unplugged = token.root().join("unplugged");
            std::fs::rename(&object_dir, &unplugged).unwrap();
            backend.simulate_device_reset().unwrap();

            // The request in flight finds every session dead; it is not retried more than once
            // and fails with a transient error while the token is away.
            let err = backend
                .sign(&key.key_ref, &key.public_key, SignRequest::digest(random_digest()))
                .await
                .unwrap_err();
            assert!(err.is_transient(), "{err:?}");
            let health = wait_for(&backend, "Recovering", Duration::from_secs(5), |h| {
                matches!(h, Health::Recovering { .. })
            })
            .await;
            println!("while unplugged: {health:?}");

            // Meanwhile requests fail fast instead of queueing.
            let started = Instant::now();
            let err = backend
                .sign(&key.key_ref, &key.public_key, SignRequest::digest(random_digest()))
                .await
                .unwrap_err();
            assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
            assert!(started.elapsed() < Duration::from_millis(50), "{:?}", started.elapsed());
            // The reason names what is wrong: the token is not there.
            let health = wait_for(&backend, "token-not-found reason", Duration::from_secs(5), |h| {
                matches!(h, Health::Recovering { reason } if reason.contains("no token labelled"))
            })
            .await;
            println!("reason: {health:?}");
            assert_eq!(backend.recoveries(), 0);

            // Plug it back in: the pool finds the token by label again (its slot id may differ),
            // logs in, and serves again — same backend, same key, same address.
            std::fs::rename(&unplugged, &object_dir).unwrap();
            wait_for(&backend, "Ready", Duration::from_secs(5), |h| *h == Health::Ready).await;
            assert_eq!(backend.recoveries(), 1);
            sign_ok(&backend, &key).await;
            assert_eq!(backend.key_info(&key.key_ref).await.unwrap(), key);
            assert_eq!(backend.find_by_label("searcher-hot").await.unwrap(), key);
        });
        },
    );
}

#[test]
fn refused_pin_during_recovery_is_not_retried() {
    softhsm::in_own_process(
        "refused_pin_during_recovery_is_not_retried",
        "pinchange",
        |token| {
            runtime().block_on(async {
                let backend = Pkcs11Backend::open(&config(token)).unwrap();
                let key = backend.generate("searcher-hot").await.unwrap();
                sign_ok(&backend, &key).await;

                // Someone changes the user PIN and logs the process out: the backend's PIN is now
                // wrong, and every further C_Login attempt would count towards locking the token.
                let ctx = Pkcs11::new(token.module()).unwrap();
                let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
                let slot = ctx
                    .get_slots_with_token()
                    .unwrap()
                    .into_iter()
                    .find(|s| ctx.get_token_info(*s).unwrap().label() == token.label())
                    .unwrap();
                let session = ctx.open_rw_session(slot).unwrap();
                session
                    .set_pin(
                        &softhsm::USER_PIN.to_owned().into(),
                        &"11223344".to_owned().into(),
                    )
                    .unwrap();
                session.logout().unwrap();
                drop(session);

                let health = wait_for(&backend, "a refused login", Duration::from_secs(5), |h| {
                matches!(h, Health::Recovering { reason } if reason.contains("CKR_PIN_INCORRECT"))
            })
            .await;
                let Health::Recovering { reason } = health else {
                    unreachable!()
                };
                assert!(reason.contains("not retrying"), "{reason}");
                assert!(!reason.contains("11223344") && !reason.contains(softhsm::USER_PIN));
                // It stays that way (no login loop), and requests fail fast.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                assert_eq!(backend.health(), Health::Recovering { reason });
                assert_eq!(backend.recoveries(), 0);
                let err = backend
                    .sign(
                        &key.key_ref,
                        &key.public_key,
                        SignRequest::digest(random_digest()),
                    )
                    .await
                    .unwrap_err();
                assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
            });
        },
    );
}
