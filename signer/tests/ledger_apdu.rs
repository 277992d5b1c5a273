//! The Ledger backend at the APDU level, over a scripted transport: the bytes sent for
//! get-address, transactions (payloads of 71, 258 and 675 bytes), `personal_sign` and EIP-712
//! must be those of the vectors in `tests/data/ledger/vectors.json`, which Ledger's own Python
//! client (`ledger-app-clients-ethereum` 0.6, `CommandBuilder`) built independently of this
//! code (see `tests/data/ledger/README.md`); status words must become typed errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy::consensus::transaction::SignerRecoverable;
use alloy::consensus::{
    SignableTransaction, TxEip1559, TxEip2930, TxEnvelope, TxLegacy, TypedTransaction,
};
use alloy::eips::Decodable2718;
use alloy::eips::eip2930::{AccessList, AccessListItem};
use alloy::primitives::{Address, B256, Bytes, Signature, TxKind, U256};
use castellan_signer::backend::ledger::{
    Apdu, LedgerBackend, LedgerConfig, LedgerTransport, chunk_apdus,
};
use castellan_signer::backend::{BackendError, KeyBackend, KeyInfo, KeyRef, SignRequest};
use castellan_signer::eth::{
    ChainGuard, EthError, parse_typed_data, sign_personal_message, sign_transaction,
    sign_typed_data,
};
use serde_json::Value;

/// A check that an error is the expected variant.
type IsError = fn(&BackendError) -> bool;

const VECTORS: &str = include_str!("data/ledger/vectors.json");

/// A transport that records what it is sent and answers from a script.
#[derive(Clone, Default)]
struct Scripted {
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    answers: Arc<Mutex<VecDeque<Vec<u8>>>>,
}

impl Scripted {
    fn answer(&self, bytes: Vec<u8>) {
        self.answers.lock().unwrap().push_back(bytes);
    }
    fn take_sent(&self) -> Vec<String> {
        std::mem::take(&mut *self.sent.lock().unwrap())
            .iter()
            .map(hex::encode)
            .collect()
    }
}

impl LedgerTransport for Scripted {
    async fn exchange(&self, apdu: &Apdu) -> Result<Vec<u8>, BackendError> {
        self.sent.lock().unwrap().push(apdu.to_bytes());
        let answer = self.answers.lock().unwrap().pop_front();
        answer.ok_or_else(|| BackendError::Unavailable("script exhausted".into()))
    }
}

/// A transport whose device never answers (a person who does not confirm).
struct Silent;

impl LedgerTransport for Silent {
    async fn exchange(&self, _apdu: &Apdu) -> Result<Vec<u8>, BackendError> {
        std::future::pending().await
    }
}

fn vectors() -> Value {
    serde_json::from_str(VECTORS).unwrap()
}

fn vector(name: &str) -> Value {
    vectors()["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no vector {name}"))
        .clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn path() -> String {
    vectors()["path"].as_str().unwrap().to_owned()
}

fn backend(script: &Scripted) -> LedgerBackend<Scripted> {
    LedgerBackend::with_transport(script.clone(), LedgerConfig::default())
}

/// Scripts the answers of a request of `n` APDUs: 0x9000 for all but the last, then `last`.
fn script_request(script: &Scripted, n: usize, last: &str) {
    for _ in 1..n {
        script.answer(vec![0x90, 0x00]);
    }
    script.answer(hex::decode(last).unwrap());
}

/// Reads the key through the get-address vector.
async fn key(script: &Scripted, backend: &LedgerBackend<Scripted>) -> KeyInfo {
    let v = vector("get_address");
    script.answer(hex::decode(v["response"].as_str().unwrap()).unwrap());
    let info = backend
        .key_info(&KeyRef::Ledger { path: path() })
        .await
        .unwrap();
    assert_eq!(script.take_sent(), strings(&v["apdus"]));
    info
}

/// Checks the sent APDUs against the vector, and that they carry the same bytes, with the same
/// headers, as Ledger's own (fixed 255-byte) split.
fn check_apdus(sent: &[String], v: &Value) {
    assert_eq!(sent, strings(&v["apdus"]), "{}", v["name"]);
    let official = strings(&v["apdus_official"]);
    let data = |apdus: &[String]| -> Vec<u8> {
        apdus
            .iter()
            .flat_map(|a| hex::decode(a).unwrap()[5..].to_vec())
            .collect()
    };
    assert_eq!(data(sent), data(&official), "{}: same payload", v["name"]);
    let header = |a: &String| hex::decode(a).unwrap()[..4].to_vec();
    assert_eq!(header(&sent[0]), header(&official[0]));
    let first = header(&sent[0]);
    for a in sent.iter().skip(1) {
        assert_eq!(header(a), vec![0xe0, first[1], 0x80, 0x00], "{}", v["name"]);
    }
}

fn u(v: &Value, field: &str) -> u128 {
    v["fields"][field].as_str().unwrap().parse().unwrap()
}

fn transaction(v: &Value) -> TypedTransaction {
    let to: Address = v["to"].as_str().unwrap().parse().unwrap();
    let chain_id = v["chain_id"].as_u64().unwrap();
    let input = Bytes::from(hex::decode(v["input"].as_str().unwrap()).unwrap());
    let nonce = u(v, "nonce") as u64;
    let gas_limit = u(v, "gas") as u64;
    let value = U256::from(u(v, "value"));
    match v["tx_type"].as_u64().unwrap() {
        0 => TxLegacy {
            chain_id: Some(chain_id),
            nonce,
            gas_price: u(v, "gasPrice"),
            gas_limit,
            to: TxKind::Call(to),
            value,
            input,
        }
        .into(),
        1 => TxEip2930 {
            chain_id,
            nonce,
            gas_price: u(v, "gasPrice"),
            gas_limit,
            to: TxKind::Call(to),
            value,
            access_list: AccessList(vec![AccessListItem {
                address: to,
                storage_keys: vec![B256::ZERO],
            }]),
            input,
        }
        .into(),
        2 => TxEip1559 {
            chain_id,
            nonce,
            gas_limit,
            max_fee_per_gas: u(v, "maxFeePerGas"),
            max_priority_fee_per_gas: u(v, "maxPriorityFeePerGas"),
            to: TxKind::Call(to),
            value,
            access_list: AccessList::default(),
            input,
        }
        .into(),
        other => panic!("tx type {other}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn get_address_apdu_and_answer_match_the_vector() {
    runtime().block_on(async {
        let script = Scripted::default();
        let backend = backend(&script);
        let info = key(&script, &backend).await;
        let expected: Address = vectors()["address"].as_str().unwrap().parse().unwrap();
        assert_eq!(info.address, expected);
        assert_eq!(info.key_ref, KeyRef::Ledger { path: path() });
        // find_by_label takes the path as the label.
        script.answer(hex::decode(vector("get_address")["response"].as_str().unwrap()).unwrap());
        assert_eq!(
            backend.find_by_label(&path()).await.unwrap().address,
            expected
        );
    });
}

#[test]
fn transactions_of_71_258_and_675_bytes_follow_the_app_protocol() {
    runtime().block_on(async {
        let script = Scripted::default();
        let backend = backend(&script);
        let key = key(&script, &backend).await;
        for name in ["tx_legacy_71", "tx_eip1559_258", "tx_eip2930_675"] {
            let v = vector(name);
            let tx = transaction(&v);
            // Castellan's signing payload is byte for byte the one Python RLP-encoded.
            assert_eq!(
                hex::encode(tx.encoded_for_signing()),
                v["signing_payload"].as_str().unwrap(),
                "{name}"
            );
            let n = strings(&v["apdus"]).len();
            script_request(&script, n, v["response"].as_str().unwrap());
            let signed = sign_transaction(&backend, &key, ChainGuard::new(31337), tx)
                .await
                .unwrap();
            check_apdus(&script.take_sent(), &v);
            assert_eq!(
                hex::encode(
                    signed
                        .signature
                        .recover_address_from_prehash(&B256::from_slice(
                            &hex::decode(v["digest"].as_str().unwrap()).unwrap()
                        ))
                        .unwrap()
                ),
                hex::encode(key.address)
            );
            let envelope = TxEnvelope::decode_2718(&mut signed.raw.as_ref()).unwrap();
            assert_eq!(envelope.recover_signer().unwrap(), key.address, "{name}");
        }
        // The 258-byte payload is the app-bug case: Ledger's client would end with 3 bytes.
        let v = vector("tx_eip1559_258");
        let official = strings(&v["apdus_official"]);
        assert_eq!(hex::decode(official.last().unwrap()).unwrap().len(), 5 + 3);
        assert_ne!(strings(&v["apdus"]), official);
    });
}

#[test]
fn personal_sign_and_eip712_follow_the_app_protocol() {
    runtime().block_on(async {
        let script = Scripted::default();
        let backend = backend(&script);
        let key = key(&script, &backend).await;
        for name in ["personal_short", "personal_long"] {
            let v = vector(name);
            let message = hex::decode(v["message"].as_str().unwrap()).unwrap();
            script_request(
                &script,
                strings(&v["apdus"]).len(),
                v["response"].as_str().unwrap(),
            );
            let sig = sign_personal_message(&backend, &key, message.clone())
                .await
                .unwrap();
            check_apdus(&script.take_sent(), &v);
            let parsed = Signature::from_raw(&sig.to_bytes()).unwrap();
            assert_eq!(
                parsed.recover_address_from_msg(&message).unwrap(),
                key.address
            );
        }
        let v = vector("eip712_mail");
        let data = parse_typed_data(&v["typed_data"].to_string()).unwrap();
        assert_eq!(
            hex::encode(data.domain.separator()),
            v["domain_separator"].as_str().unwrap()
        );
        script_request(&script, 1, v["response"].as_str().unwrap());
        let sig = sign_typed_data(&backend, &key, ChainGuard::new(31337), data)
            .await
            .unwrap();
        check_apdus(&script.take_sent(), &v);
        assert_eq!(hex::encode(sig.digest), v["digest"].as_str().unwrap());
        assert_eq!(
            sig.signature
                .recover_address_from_prehash(&sig.digest)
                .unwrap(),
            key.address
        );
    });
}

#[test]
fn status_words_become_typed_errors() {
    runtime().block_on(async {
        let script = Scripted::default();
        let backend = backend(&script);
        let key = key(&script, &backend).await;
        let request = || SignRequest {
            digest: alloy::primitives::eip191_hash_message(b"hi"),
            payload: castellan_signer::backend::Payload::PersonalMessage(b"hi".to_vec()),
        };
        let cases: [(&str, IsError); 4] = [
            ("6985", |e| matches!(e, BackendError::UserRejected)),
            ("6d00", |e| matches!(e, BackendError::AppNotOpen(0x6d00))),
            ("6e00", |e| matches!(e, BackendError::AppNotOpen(0x6e00))),
            ("5515", |e| matches!(e, BackendError::DeviceLocked)),
        ];
        for (sw, check) in cases {
            script.answer(hex::decode(sw).unwrap());
            let err = backend
                .sign(&key.key_ref, &key.public_key, request())
                .await
                .unwrap_err();
            assert!(check(&err), "{sw}: {err:?}");
            script.take_sent();
            // The same on get-address (the first thing the signer does at start).
            script.answer(hex::decode(sw).unwrap());
            let err = backend.key_info(&key.key_ref).await.unwrap_err();
            assert!(check(&err), "{sw} on get-address: {err:?}");
            script.take_sent();
        }
        // A rejection on the last chunk of a long request, after the device took the others.
        let v = vector("tx_eip2930_675");
        script_request(&script, 3, "6985");
        let err = sign_transaction(&backend, &key, ChainGuard::new(31337), transaction(&v))
            .await
            .unwrap_err();
        assert!(
            matches!(err, EthError::Backend(BackendError::UserRejected)),
            "{err:?}"
        );
        assert_eq!(script.take_sent().len(), 3);
        // Another status word is reported with its value.
        script.answer(hex::decode("6a80").unwrap());
        let err = backend
            .sign(&key.key_ref, &key.public_key, request())
            .await
            .unwrap_err();
        assert!(
            matches!(err, BackendError::LedgerStatus { status: 0x6a80, .. }),
            "{err:?}"
        );
        script.take_sent();
    });
}

#[test]
fn a_bare_digest_is_refused_without_talking_to_the_device() {
    runtime().block_on(async {
        let script = Scripted::default();
        let backend = backend(&script);
        let key = key(&script, &backend).await;
        let err = backend
            .sign(
                &key.key_ref,
                &key.public_key,
                SignRequest::digest(B256::repeat_byte(7)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, BackendError::Unsupported(_)), "{err:?}");
        assert!(script.take_sent().is_empty());
        // Nor are other backends' keys, or destroying a seed-derived key.
        let err = backend
            .key_info(&KeyRef::YubiHsm { object_id: 1 })
            .await
            .unwrap_err();
        assert!(matches!(err, BackendError::KeyNotFound(_)), "{err:?}");
        assert!(backend.destroy(&key.key_ref).await.is_err());
    });
}

#[test]
fn a_signature_by_another_key_or_for_another_payload_is_refused() {
    runtime().block_on(async {
        let script = Scripted::default();
        let backend = backend(&script);
        let key = key(&script, &backend).await;
        // The device answers with the signature of another message.
        let v = vector("personal_short");
        script.answer(hex::decode(v["response"].as_str().unwrap()).unwrap());
        let err = sign_personal_message(&backend, &key, b"something else".to_vec())
            .await
            .unwrap_err();
        assert!(
            matches!(err, EthError::Backend(BackendError::BadSignature(_))),
            "{err:?}"
        );
        script.take_sent();
        // A get-address answer whose address is not its public key's.
        let mut answer = hex::decode(vector("get_address")["response"].as_str().unwrap()).unwrap();
        let n = answer.len();
        answer[n - 3] = if answer[n - 3] == b'0' { b'1' } else { b'0' };
        script.answer(answer);
        let err = backend.key_info(&key.key_ref).await.unwrap_err();
        assert!(matches!(err, BackendError::KeyMismatch { .. }), "{err:?}");
    });
}

#[test]
fn a_request_nobody_confirms_times_out_clearly() {
    runtime().block_on(async {
        let config = LedgerConfig {
            sign_timeout: Duration::from_millis(200),
            address_timeout: Duration::from_millis(100),
        };
        let backend = LedgerBackend::with_transport(Silent, config);
        let started = std::time::Instant::now();
        let err = backend
            .key_info(&KeyRef::Ledger { path: path() })
            .await
            .unwrap_err();
        assert!(
            matches!(err, BackendError::Timeout(d) if d == Duration::from_millis(100)),
            "{err:?}"
        );
        let key = k256::ecdsa::SigningKey::from_slice(&[1u8; 32]).unwrap();
        let err = backend
            .sign(
                &KeyRef::Ledger { path: path() },
                key.verifying_key(),
                SignRequest {
                    digest: alloy::primitives::eip191_hash_message(b"hi"),
                    payload: castellan_signer::backend::Payload::PersonalMessage(b"hi".to_vec()),
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, BackendError::Timeout(d) if d == Duration::from_millis(200)),
            "{err:?}"
        );
        assert!(err.to_string().contains("did not answer within"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    });
}

#[test]
fn chunking_is_p1_00_then_80_with_no_chunk_over_255() {
    let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    let apdus = chunk_apdus(0x04, &payload);
    assert_eq!(apdus[0].p1, 0x00);
    assert!(apdus[1..].iter().all(|a| a.p1 == 0x80 && a.p2 == 0x00));
    assert!(apdus.iter().all(|a| a.data.len() <= 255));
    let joined: Vec<u8> = apdus.iter().flat_map(|a| a.data.clone()).collect();
    assert_eq!(joined, payload);
    // No Lc on an empty APDU.
    let empty = Apdu {
        cla: 0xe0,
        ins: 0x06,
        p1: 0,
        p2: 0,
        data: vec![],
    };
    assert_eq!(empty.to_bytes(), vec![0xe0, 0x06, 0, 0]);
}
