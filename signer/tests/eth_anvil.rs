//! Ethereum payloads signed by a key on a real SoftHSM token, checked by independent
//! implementations: a local anvil node mines the transactions, and eth-account (Python) and alloy
//! recover the signer of every transaction and message.
//!
//! Each test runs in a child process of its own with its own token directory (see
//! `castellan_tests::softhsm`), and starts its own anvil.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};

use alloy::consensus::transaction::SignerRecoverable;
use alloy::consensus::{Transaction, TxEip1559, TxEip2930, TxEnvelope, TxLegacy, TypedTransaction};
use alloy::eips::Decodable2718;
use alloy::eips::eip2930::{AccessList, AccessListItem};
use alloy::primitives::{Address, B256, Bytes, ChainId, Signature, TxKind, U256, address};
use alloy::providers::Provider;
use castellan_signer::backend::pkcs11::{PinSource, Pkcs11Backend, Pkcs11Config};
use castellan_signer::backend::{
    BackendError, EthSignature, Health, KeyBackend, KeyInfo, KeyRef, SignRequest,
};
use castellan_signer::eth::{
    ChainGuard, EthError, SignedTransaction, parse_typed_data, sign_personal_message,
    sign_transaction, sign_typed_data,
};
use castellan_tests::anvil::{ANVIL_CHAIN_ID, Anvil};
use castellan_tests::python;
use castellan_tests::softhsm::{self, PIN_ENV, SoftHsmToken};
use k256::ecdsa::VerifyingKey;

/// The "Mail" example of EIP-712, on anvil's chain (31337).
const MAIL_JSON: &str = r#"{
    "types": {
        "EIP712Domain": [
            {"name": "name", "type": "string"},
            {"name": "version", "type": "string"},
            {"name": "chainId", "type": "uint256"},
            {"name": "verifyingContract", "type": "address"}
        ],
        "Person": [
            {"name": "name", "type": "string"},
            {"name": "wallet", "type": "address"}
        ],
        "Mail": [
            {"name": "from", "type": "Person"},
            {"name": "to", "type": "Person"},
            {"name": "contents", "type": "string"}
        ]
    },
    "primaryType": "Mail",
    "domain": {
        "name": "Ether Mail",
        "version": "1",
        "chainId": 31337,
        "verifyingContract": "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC"
    },
    "message": {
        "from": {"name": "Cow", "wallet": "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},
        "to": {"name": "Bob", "wallet": "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"},
        "contents": "Hello, Bob!"
    }
}"#;

const RECIPIENT: Address = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");
const GWEI: u128 = 1_000_000_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn open_backend(token: &SoftHsmToken) -> Pkcs11Backend {
    let config = Pkcs11Config::new(
        token.module(),
        token.label(),
        PinSource::Env(PIN_ENV.into()),
    );
    let backend = Pkcs11Backend::open(&config).unwrap();
    assert_eq!(backend.health(), Health::Ready);
    backend
}

/// A backend that counts the signatures it was asked for, delegating to the real one.
struct Counting<B> {
    inner: B,
    signs: AtomicUsize,
}

impl<B: KeyBackend> KeyBackend for Counting<B> {
    async fn generate(&self, label: &str) -> Result<KeyInfo, BackendError> {
        self.inner.generate(label).await
    }

    async fn key_info(&self, key: &KeyRef) -> Result<KeyInfo, BackendError> {
        self.inner.key_info(key).await
    }

    async fn find_by_label(&self, label: &str) -> Result<KeyInfo, BackendError> {
        self.inner.find_by_label(label).await
    }

    async fn sign(
        &self,
        key: &KeyRef,
        expected: &VerifyingKey,
        request: SignRequest,
    ) -> Result<EthSignature, BackendError> {
        self.signs.fetch_add(1, Ordering::SeqCst);
        self.inner.sign(key, expected, request).await
    }

    async fn destroy(&self, key: &KeyRef) -> Result<(), BackendError> {
        self.inner.destroy(key).await
    }

    fn health(&self) -> Health {
        self.inner.health()
    }
}

fn eip1559(chain_id: ChainId, nonce: u64, value: u64) -> TxEip1559 {
    TxEip1559 {
        chain_id,
        nonce,
        gas_limit: 21_000,
        max_fee_per_gas: 30 * GWEI,
        max_priority_fee_per_gas: GWEI,
        to: TxKind::Call(RECIPIENT),
        value: U256::from(value),
        access_list: AccessList::default(),
        input: Bytes::new(),
    }
}

fn legacy(chain_id: Option<ChainId>, nonce: u64, value: u64) -> TxLegacy {
    TxLegacy {
        chain_id,
        nonce,
        gas_price: 30 * GWEI,
        gas_limit: 21_000,
        to: TxKind::Call(RECIPIENT),
        value: U256::from(value),
        input: Bytes::new(),
    }
}

fn eip2930(chain_id: ChainId, nonce: u64, value: u64) -> TxEip2930 {
    TxEip2930 {
        chain_id,
        nonce,
        gas_price: 30 * GWEI,
        // A plain transfer with a one-slot access list: 21,000 + 2,400 + 1,900.
        gas_limit: 30_000,
        to: TxKind::Call(RECIPIENT),
        value: U256::from(value),
        access_list: AccessList(vec![AccessListItem {
            address: RECIPIENT,
            storage_keys: vec![B256::ZERO],
        }]),
        input: Bytes::new(),
    }
}

/// Checks a signed transaction with alloy's decoder and recovery and with eth-account.
fn check_recovers(signed: &SignedTransaction, key: &KeyInfo, tx_type: u8) {
    let envelope = TxEnvelope::decode_2718(&mut signed.raw.as_ref()).unwrap();
    assert_eq!(u8::from(envelope.tx_type()), tx_type);
    assert_eq!(envelope.chain_id(), Some(ANVIL_CHAIN_ID));
    assert_eq!(*envelope.tx_hash(), signed.hash);
    assert_eq!(envelope.recover_signer().unwrap(), key.address);
    assert_eq!(
        python::recover_transaction(&signed.raw),
        key.address,
        "eth-account recovers another sender for type {tx_type}"
    );
}

#[test]
fn transactions_signed_by_softhsm_are_mined_by_anvil() {
    softhsm::in_own_process(
        "transactions_signed_by_softhsm_are_mined_by_anvil",
        "eth-tx",
        |token| {
            runtime().block_on(async {
                let backend = open_backend(token);
                let key = backend.generate("searcher-hot@1").await.unwrap();
                let anvil = Anvil::start().await;
                assert_eq!(anvil.chain_id().await, ANVIL_CHAIN_ID);
                let guard = ChainGuard::new(ANVIL_CHAIN_ID);
                anvil
                    .set_balance(key.address, U256::from(10u128.pow(18)))
                    .await;
                let before = anvil.balance(RECIPIENT).await;

                let cases: [(u8, TypedTransaction, u64); 3] = [
                    (2, eip1559(ANVIL_CHAIN_ID, 0, 1_000).into(), 1_000),
                    (0, legacy(Some(ANVIL_CHAIN_ID), 1, 2_000).into(), 2_000),
                    (1, eip2930(ANVIL_CHAIN_ID, 2, 3_000).into(), 3_000),
                ];
                let mut sent = U256::ZERO;
                for (tx_type, tx, value) in cases {
                    let signed = sign_transaction(&backend, &key, guard, tx).await.unwrap();
                    assert_eq!(signed.from, key.address);
                    check_recovers(&signed, &key, tx_type);

                    let hash = anvil.send_raw(&signed.raw).await;
                    assert_eq!(hash, signed.hash, "anvil computes the same tx hash");
                    let receipt = anvil.receipt(hash).await;
                    assert!(receipt.status(), "type {tx_type} reverted: {receipt:?}");
                    assert_eq!(receipt.from, key.address, "type {tx_type}");
                    assert_eq!(receipt.to, Some(RECIPIENT));
                    sent += U256::from(value);
                }
                assert_eq!(anvil.balance(RECIPIENT).await - before, sent);
                let nonce = anvil
                    .provider()
                    .get_transaction_count(key.address)
                    .await
                    .unwrap();
                assert_eq!(nonce, 3);
            });
        },
    );
}

#[test]
fn messages_signed_by_softhsm_recover_with_alloy_and_eth_account() {
    softhsm::in_own_process(
        "messages_signed_by_softhsm_recover_with_alloy_and_eth_account",
        "eth-msg",
        |token| {
            runtime().block_on(async {
                let backend = open_backend(token);
                let key = backend.generate("relay-auth@1").await.unwrap();

                let message = b"castellan: personal_sign through SoftHSM".to_vec();
                let personal = sign_personal_message(&backend, &key, message.clone())
                    .await
                    .unwrap();
                let bytes = personal.to_bytes();
                assert!(matches!(bytes[64], 27 | 28), "v = {}", bytes[64]);
                let parsed = Signature::from_raw(&bytes).unwrap();
                assert_eq!(
                    parsed.recover_address_from_msg(&message).unwrap(),
                    key.address
                );
                assert_eq!(
                    python::recover_personal_message(&message, &bytes),
                    key.address
                );

                let data = parse_typed_data(MAIL_JSON).unwrap();
                let typed = sign_typed_data(&backend, &key, ChainGuard::new(ANVIL_CHAIN_ID), data)
                    .await
                    .unwrap();
                let bytes = typed.to_bytes();
                assert!(matches!(bytes[64], 27 | 28), "v = {}", bytes[64]);
                let parsed = Signature::from_raw(&bytes).unwrap();
                let digest = parse_typed_data(MAIL_JSON)
                    .unwrap()
                    .eip712_signing_hash()
                    .unwrap();
                assert_eq!(typed.digest, digest);
                assert_eq!(
                    parsed.recover_address_from_prehash(&digest).unwrap(),
                    key.address
                );
                assert_eq!(python::recover_typed_data(MAIL_JSON, &bytes), key.address);
            });
        },
    );
}

#[test]
fn chain_guard_refuses_before_the_hsm_signs() {
    softhsm::in_own_process(
        "chain_guard_refuses_before_the_hsm_signs",
        "eth-guard",
        |token| {
            runtime().block_on(async {
                let backend = Counting {
                    inner: open_backend(token),
                    signs: AtomicUsize::new(0),
                };
                let key = backend.generate("searcher-hot@1").await.unwrap();
                let guard = ChainGuard::new(ANVIL_CHAIN_ID);

                let err = sign_transaction(&backend, &key, guard, eip1559(1, 0, 1).into())
                    .await
                    .unwrap_err();
                match err {
                    EthError::ChainMismatch {
                        configured,
                        requested,
                    } => {
                        assert_eq!(configured, ANVIL_CHAIN_ID);
                        assert_eq!(requested, U256::from(1));
                    }
                    other => panic!("expected a chain mismatch, got {other}"),
                }

                let err = sign_transaction(&backend, &key, guard, legacy(None, 0, 1).into())
                    .await
                    .unwrap_err();
                assert!(matches!(err, EthError::MissingChainId), "{err}");

                let err = sign_transaction(&backend, &key, guard, legacy(Some(1), 0, 1).into())
                    .await
                    .unwrap_err();
                assert!(matches!(err, EthError::ChainMismatch { .. }), "{err}");

                let other_chain = parse_typed_data(&MAIL_JSON.replace("31337", "1")).unwrap();
                let err = sign_typed_data(&backend, &key, guard, other_chain)
                    .await
                    .unwrap_err();
                assert!(matches!(err, EthError::ChainMismatch { .. }), "{err}");

                assert_eq!(
                    backend.signs.load(Ordering::SeqCst),
                    0,
                    "a refused payload reached the HSM"
                );

                // The same backend and key do sign what the guard lets through.
                let signed =
                    sign_transaction(&backend, &key, guard, eip1559(ANVIL_CHAIN_ID, 0, 1).into())
                        .await
                        .unwrap();
                assert_eq!(backend.signs.load(Ordering::SeqCst), 1);
                check_recovers(&signed, &key, 2);
            });
        },
    );
}
