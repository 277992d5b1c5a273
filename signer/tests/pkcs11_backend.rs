//! The PKCS#11 backend against a real SoftHSM token: key generation and attributes, look-up,
//! destroy, 1,000 signatures checked by alloy's recovery, typed errors, back-pressure.
//!
//! Each test runs in a child process of its own with its own token directory (see
//! `castellan_tests::softhsm`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use alloy::primitives::{B256, U256};
use castellan_signer::backend::pkcs11::{
    PinSource, Pkcs11Backend, Pkcs11Config, SECP256K1_EC_PARAMS, parse_ec_point,
};
use castellan_signer::backend::{BackendError, Health, KeyBackend, KeyRef, SignRequest};
use castellan_tests::softhsm::{self, PIN_ENV, SoftHsmToken};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass};
use cryptoki::session::{Session, UserType};
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

/// (n − 1) / 2 for secp256k1: the largest low s.
fn half_n() -> U256 {
    U256::from_str_radix(
        "7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0",
        16,
    )
    .unwrap()
}

/// Label and id of a PKCS#11 key reference.
fn ref_parts(key: &KeyRef) -> (String, String) {
    #[allow(unreachable_patterns)]
    match key {
        KeyRef::Pkcs11 { label, id } => (label.clone(), id.clone()),
        other => panic!("not a PKCS#11 key: {other}"),
    }
}

/// A session of the test's own on the token, through cryptoki directly (independent of the
/// backend's code). The module is already initialised in this process by the backend.
fn own_session(token: &SoftHsmToken) -> Session {
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
    match session.login(UserType::User, Some(&softhsm::USER_PIN.to_owned().into())) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("C_Login: {e}"),
    }
    session
}

#[test]
fn generated_key_is_sensitive_and_never_extractable() {
    softhsm::in_own_process(
        "generated_key_is_sensitive_and_never_extractable",
        "attrs",
        |token| {
            runtime().block_on(async {
                let backend = Pkcs11Backend::open(&config(token)).unwrap();
                assert_eq!(backend.health(), Health::Ready);
                let info = backend.generate("searcher-hot@1").await.unwrap();

                let session = own_session(token);
                let label = Attribute::Label(b"searcher-hot@1".to_vec());
                let private = session
                    .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), label.clone()])
                    .unwrap();
                assert_eq!(private.len(), 1);
                let attrs = session
                    .get_attributes(
                        private[0],
                        &[
                            AttributeType::Token,
                            AttributeType::Private,
                            AttributeType::Sensitive,
                            AttributeType::Extractable,
                            AttributeType::NeverExtractable,
                            AttributeType::AlwaysSensitive,
                            AttributeType::Local,
                            AttributeType::Sign,
                            AttributeType::Decrypt,
                            AttributeType::Derive,
                            AttributeType::Unwrap,
                            AttributeType::SignRecover,
                        ],
                    )
                    .unwrap();
                let expected = [
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::NeverExtractable(true),
                    Attribute::AlwaysSensitive(true),
                    Attribute::Local(true),
                    Attribute::Sign(true),
                    Attribute::Decrypt(false),
                    Attribute::Derive(false),
                    Attribute::Unwrap(false),
                    Attribute::SignRecover(false),
                ];
                assert_eq!(attrs.len(), expected.len(), "{attrs:?}");
                for (got, want) in attrs.iter().zip(expected.iter()) {
                    assert_eq!(format!("{got:?}"), format!("{want:?}"));
                }
                // The private value cannot be read: the attribute is sensitive.
                let value_info = session
                    .get_attribute_info(private[0], &[AttributeType::Value])
                    .unwrap();
                assert!(
                    matches!(
                        value_info[0],
                        AttributeInfo::Sensitive | AttributeInfo::Unavailable
                    ),
                    "{value_info:?}"
                );
                let value = session
                    .get_attributes(private[0], &[AttributeType::Value])
                    .unwrap();
                assert!(
                    value.is_empty(),
                    "CKA_VALUE came back: {} attributes",
                    value.len()
                );

                // The public key: secp256k1 parameters and the point the backend reported.
                let public = session
                    .find_objects(&[Attribute::Class(ObjectClass::PUBLIC_KEY), label])
                    .unwrap();
                assert_eq!(public.len(), 1);
                let attrs = session
                    .get_attributes(
                        public[0],
                        &[
                            AttributeType::EcParams,
                            AttributeType::EcPoint,
                            AttributeType::Id,
                        ],
                    )
                    .unwrap();
                let mut seen = 0;
                for attr in attrs {
                    match attr {
                        Attribute::EcParams(p) => {
                            assert_eq!(p, SECP256K1_EC_PARAMS);
                            seen += 1;
                        }
                        Attribute::EcPoint(p) => {
                            assert_eq!(p.len(), 67, "SoftHSM wraps the point in DER");
                            assert_eq!(parse_ec_point(&p).unwrap(), info.public_key);
                            seen += 1;
                        }
                        Attribute::Id(id) => {
                            assert_eq!(hex::encode(id), ref_parts(&info.key_ref).1);
                            seen += 1;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                assert_eq!(seen, 3);
                assert_eq!(
                    info.address,
                    alloy::primitives::Address::from_public_key(&info.public_key)
                );
            });
        },
    );
}

#[test]
fn find_destroy_and_duplicate_labels() {
    softhsm::in_own_process("find_destroy_and_duplicate_labels", "lifecycle", |token| {
        runtime().block_on(async {
            let mut cfg = config(token);
            // PIN from a 0600 file this time.
            cfg.pin_env = None;
            cfg.pin_file = Some(token.write_pin_file().unwrap());
            let backend = Pkcs11Backend::open(&cfg).unwrap();
            let a = backend.generate("relay-auth").await.unwrap();
            let b = backend.generate("searcher-hot").await.unwrap();
            assert_ne!(a.address, b.address);
            assert_ne!(a.key_ref, b.key_ref);

            // Found by label and by reference (label + id).
            assert_eq!(backend.find_by_label("relay-auth").await.unwrap(), a);
            assert_eq!(backend.key_info(&a.key_ref).await.unwrap(), a);
            assert_eq!(backend.find_by_label("searcher-hot").await.unwrap(), b);

            // A duplicate label is refused and leaves the first key alone.
            let err = backend.generate("relay-auth").await.unwrap_err();
            assert!(
                matches!(err, BackendError::KeyExists(ref l) if l == "relay-auth"),
                "{err:?}"
            );
            assert_eq!(backend.find_by_label("relay-auth").await.unwrap(), a);

            // A right label with a wrong id is not the key.
            let wrong_id = KeyRef::Pkcs11 {
                label: ref_parts(&a.key_ref).0,
                id: "00".repeat(16),
            };
            assert!(matches!(
                backend.key_info(&wrong_id).await,
                Err(BackendError::KeyNotFound(_))
            ));

            // Sign once so that workers cache the handle, then destroy.
            let digest = random_digest();
            backend
                .sign(&a.key_ref, &a.public_key, SignRequest::digest(digest))
                .await
                .unwrap();
            backend.destroy(&a.key_ref).await.unwrap();
            assert!(matches!(
                backend.key_info(&a.key_ref).await,
                Err(BackendError::KeyNotFound(_))
            ));
            assert!(matches!(
                backend.find_by_label("relay-auth").await,
                Err(BackendError::KeyNotFound(_))
            ));
            for _ in 0..4 {
                let err = backend
                    .sign(&a.key_ref, &a.public_key, SignRequest::digest(digest))
                    .await
                    .unwrap_err();
                assert!(matches!(err, BackendError::KeyNotFound(_)), "{err:?}");
            }
            assert!(matches!(
                backend.destroy(&a.key_ref).await,
                Err(BackendError::KeyNotFound(_))
            ));
            // Both objects are gone from the token.
            let session = own_session(token);
            let left = session
                .find_objects(&[Attribute::Label(b"relay-auth".to_vec())])
                .unwrap();
            assert!(left.is_empty());
            // The other key is untouched, and the label can be used again.
            assert_eq!(backend.key_info(&b.key_ref).await.unwrap(), b);
            let a2 = backend.generate("relay-auth").await.unwrap();
            assert_ne!(a2.address, a.address);
        });
    });
}

#[test]
fn thousand_signatures_recover_and_are_low_s() {
    softhsm::in_own_process(
        "thousand_signatures_recover_and_are_low_s",
        "sign1000",
        |token| {
            runtime().block_on(async {
                let backend = std::sync::Arc::new(Pkcs11Backend::open(&config(token)).unwrap());
                let info = backend.generate("searcher-hot").await.unwrap();
                let mut tasks = Vec::new();
                for _ in 0..4 {
                    let backend = backend.clone();
                    let info = info.clone();
                    tasks.push(tokio::spawn(async move {
                        for _ in 0..250 {
                            let digest = random_digest();
                            let sig = backend
                                .sign(&info.key_ref, &info.public_key, SignRequest::digest(digest))
                                .await
                                .unwrap()
                                .signature();
                            // alloy's own recovery (k256 recover_from_prehash), not our conversion.
                            assert_eq!(
                                sig.recover_address_from_prehash(&digest).unwrap(),
                                info.address
                            );
                            assert!(sig.s() <= half_n(), "high s: {sig:?}");
                        }
                    }));
                }
                for task in tasks {
                    task.await.unwrap();
                }

                // A wrong expected key: the device signature does not verify, so nothing is returned.
                let other = backend.generate("other").await.unwrap();
                let err = backend
                    .sign(
                        &info.key_ref,
                        &other.public_key,
                        SignRequest::digest(random_digest()),
                    )
                    .await
                    .unwrap_err();
                assert!(matches!(err, BackendError::BadSignature(_)), "{err:?}");
            });
        },
    );
}

#[test]
fn typed_errors_without_panics() {
    softhsm::in_own_process("typed_errors_without_panics", "errors", |token| {
        runtime().block_on(async {
            // Nonexistent module path.
            let mut cfg = config(token);
            cfg.module = token.root().join("no-such-module.so");
            let err = Pkcs11Backend::open(&cfg).unwrap_err();
            assert!(matches!(err, BackendError::ModuleLoad { .. }), "{err:?}");
            // A file that is not a PKCS#11 module.
            cfg.module = token.conf_path();
            let err = Pkcs11Backend::open(&cfg).unwrap_err();
            assert!(matches!(err, BackendError::ModuleLoad { .. }), "{err:?}");

            // Unknown token label.
            let mut cfg = config(token);
            cfg.token_label = "no-such-token".into();
            let err = Pkcs11Backend::open(&cfg).unwrap_err();
            assert!(
                matches!(err, BackendError::TokenNotFound(ref l) if l == "no-such-token"),
                "{err:?}"
            );

            // Wrong PIN: a typed login error naming the return code, never the PIN.
            let wrong = token.root().join("wrong.pin");
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&wrong)
                    .unwrap();
                writeln!(f, "999999").unwrap();
            }
            let mut cfg = config(token);
            cfg.pin_env = None;
            cfg.pin_file = Some(wrong);
            let err = Pkcs11Backend::open(&cfg).unwrap_err();
            match &err {
                BackendError::LoginFailed { token: t, rv } => {
                    assert_eq!(t, token.label());
                    assert_eq!(rv, "CKR_PIN_INCORRECT");
                }
                other => panic!("expected LoginFailed, got {other:?}"),
            }
            assert!(!err.to_string().contains("999999"));
            assert!(!format!("{err:?}").contains("999999"));

            // Missing PIN source.
            let mut cfg = config(token);
            cfg.pin_env = Some("CASTELLAN_NO_SUCH_PIN_VARIABLE".into());
            assert!(matches!(
                Pkcs11Backend::open(&cfg),
                Err(BackendError::PinSource(_))
            ));

            // Unknown key label and reference, on a working backend.
            let backend = Pkcs11Backend::open(&config(token)).unwrap();
            let err = backend.find_by_label("no-such-key").await.unwrap_err();
            assert!(matches!(err, BackendError::KeyNotFound(_)), "{err:?}");
            let missing = KeyRef::Pkcs11 {
                label: "no-such-key".into(),
                id: "abcd".into(),
            };
            let key = backend.generate("present").await.unwrap();
            let err = backend
                .sign(
                    &missing,
                    &key.public_key,
                    SignRequest::digest(random_digest()),
                )
                .await
                .unwrap_err();
            assert!(matches!(err, BackendError::KeyNotFound(_)), "{err:?}");
            let bad_id = KeyRef::Pkcs11 {
                label: "present".into(),
                id: "not hex".into(),
            };
            assert!(matches!(
                backend.key_info(&bad_id).await,
                Err(BackendError::KeyNotFound(_))
            ));
            assert_eq!(backend.health(), Health::Ready);
        });
    });
}

#[test]
fn full_queue_and_deadlines_fail_fast() {
    softhsm::in_own_process("full_queue_and_deadlines_fail_fast", "pressure", |token| {
        runtime().block_on(async {
            let mut cfg = config(token);
            cfg.sessions = 1;
            let backend = std::sync::Arc::new(Pkcs11Backend::open(&cfg).unwrap());
            let info = backend.generate("k").await.unwrap();
            // 400 requests at once on one session with a 16-deep queue: most are refused at
            // once with Unavailable, none waits unboundedly, every success verifies.
            let mut tasks = Vec::new();
            for _ in 0..400 {
                let backend = backend.clone();
                let info = info.clone();
                tasks.push(tokio::spawn(async move {
                    let digest = random_digest();
                    let result = backend
                        .sign(&info.key_ref, &info.public_key, SignRequest::digest(digest))
                        .await;
                    (digest, result)
                }));
            }
            let (mut ok, mut refused) = (0, 0);
            for task in tasks {
                match task.await.unwrap() {
                    (digest, Ok(sig)) => {
                        assert_eq!(
                            sig.signature()
                                .recover_address_from_prehash(&digest)
                                .unwrap(),
                            info.address
                        );
                        ok += 1;
                    }
                    (_, Err(BackendError::Unavailable(reason))) => {
                        assert!(reason.contains("queue is full"), "{reason}");
                        refused += 1;
                    }
                    (_, Err(e)) => panic!("unexpected {e:?}"),
                }
            }
            assert!(ok >= 16, "ok={ok}");
            assert!(refused > 0, "refused={refused}");
            drop(backend);

            // A deadline shorter than one HSM round trip under load: requests time out.
            let mut cfg = config(token);
            cfg.sessions = 1;
            cfg.sign_timeout = Duration::from_micros(200);
            let backend = std::sync::Arc::new(Pkcs11Backend::open(&cfg).unwrap());
            let mut timeouts = 0;
            let mut tasks = Vec::new();
            for _ in 0..16 {
                let backend = backend.clone();
                let info = info.clone();
                tasks.push(tokio::spawn(async move {
                    backend
                        .sign(
                            &info.key_ref,
                            &info.public_key,
                            SignRequest::digest(random_digest()),
                        )
                        .await
                }));
            }
            for task in tasks {
                match task.await.unwrap() {
                    Ok(_) => {}
                    Err(BackendError::Timeout(d)) => {
                        assert_eq!(d, Duration::from_micros(200));
                        timeouts += 1;
                    }
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
            assert!(timeouts > 0);
        });
    });
}
