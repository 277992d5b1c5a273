//! The behavioural checks, generic over any [`KeyBackend`]: the same code runs against a real
//! device (`tests/hardware.rs`) and, in CI, against MockHsm (`tests/yubihsm_mockhsm.rs`).
//!
//! Every check returns `Err(reason)` instead of panicking, so the runner can report it.

use std::time::{Duration, Instant};

use alloy::consensus::transaction::SignerRecoverable;
use alloy::consensus::{TxEip1559, TxEnvelope, TypedTransaction};
use alloy::eips::Decodable2718;
use alloy::eips::eip2930::AccessList;
use alloy::primitives::{Address, B256, Bytes, TxKind, U256, address};
use castellan_signer::backend::{
    BackendError, Health, KeyBackend, KeyInfo, KeyRef, Payload, SignRequest,
};
use castellan_signer::eth::{ChainGuard, SignedTransaction, sign_transaction};
use rand::RngCore;

/// Where test transactions send their value (anvil's second default account).
pub const RECIPIENT: Address = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");

/// A random 32-byte digest.
pub fn random_digest() -> B256 {
    let mut d = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut d);
    B256::from(d)
}

/// A unique label for a test key (`hwtest-<hex>`), so runs never collide on a device.
pub fn unique_label(prefix: &str) -> String {
    let mut r = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut r);
    format!("{prefix}-{}", hex::encode(r))
}

/// Generates a key on the device and checks that reading it back and finding it by label give
/// the same public key and address.
pub async fn generate_and_read_back<B: KeyBackend>(
    backend: &B,
    label: &str,
) -> Result<KeyInfo, String> {
    let key = backend
        .generate(label)
        .await
        .map_err(|e| format!("generate {label}: {e}"))?;
    let again = backend
        .key_info(&key.key_ref)
        .await
        .map_err(|e| format!("key_info {}: {e}", key.key_ref))?;
    if again != key {
        return Err(format!(
            "key_info differs from generate: {again:?} vs {key:?}"
        ));
    }
    let found = backend
        .find_by_label(label)
        .await
        .map_err(|e| format!("find_by_label {label}: {e}"))?;
    if found.address != key.address {
        return Err(format!(
            "find_by_label gave {} instead of {}",
            found.address, key.address
        ));
    }
    if Address::from_public_key(&key.public_key) != key.address {
        return Err("the address is not the public key's".into());
    }
    Ok(key)
}

/// Signs `n` random digests and recovers each signature with alloy to the key's address; every
/// signature must be low-s.
pub async fn sign_digests_and_recover<B: KeyBackend>(
    backend: &B,
    key: &KeyInfo,
    n: usize,
) -> Result<(), String> {
    let half_n = U256::from_str_radix(
        "7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0",
        16,
    )
    .map_err(|e| e.to_string())?;
    for i in 0..n {
        let digest = random_digest();
        let sig = backend
            .sign(&key.key_ref, &key.public_key, SignRequest::digest(digest))
            .await
            .map_err(|e| format!("signature {i}: {e}"))?
            .signature();
        if sig.s() > half_n {
            return Err(format!("signature {i} is high-s"));
        }
        let recovered = sig
            .recover_address_from_prehash(&digest)
            .map_err(|e| format!("signature {i} does not recover: {e}"))?;
        if recovered != key.address {
            return Err(format!(
                "signature {i} recovers to {recovered}, not {}",
                key.address
            ));
        }
    }
    Ok(())
}

/// An EIP-1559 transfer of `value` wei to [`RECIPIENT`].
pub fn transfer(chain_id: u64, nonce: u64, value: u64) -> TypedTransaction {
    TxEip1559 {
        chain_id,
        nonce,
        gas_limit: 21_000,
        max_fee_per_gas: 30_000_000_000,
        max_priority_fee_per_gas: 1_000_000_000,
        to: TxKind::Call(RECIPIENT),
        value: U256::from(value),
        access_list: AccessList::default(),
        input: Bytes::new(),
    }
    .into()
}

/// Signs a transfer and checks, by decoding the raw envelope and recovering its sender with
/// alloy, that the sender is the key's address.
pub async fn sign_transaction_check_sender<B: KeyBackend>(
    backend: &B,
    key: &KeyInfo,
    chain_id: u64,
    nonce: u64,
) -> Result<SignedTransaction, String> {
    let signed = sign_transaction(
        backend,
        key,
        ChainGuard::new(chain_id),
        transfer(chain_id, nonce, 1_000),
    )
    .await
    .map_err(|e| format!("sign_transaction: {e}"))?;
    let envelope = TxEnvelope::decode_2718(&mut signed.raw.as_ref())
        .map_err(|e| format!("the raw transaction does not decode: {e}"))?;
    let sender = envelope
        .recover_signer()
        .map_err(|e| format!("no sender recovers: {e}"))?;
    if sender != key.address || *envelope.tx_hash() != signed.hash {
        return Err(format!(
            "sender {sender} (expected {}), hash {} (expected {})",
            key.address,
            envelope.tx_hash(),
            signed.hash
        ));
    }
    Ok(signed)
}

/// Whether opening with wrong credentials failed the way it must: a typed refusal, and no
/// secret in the message.
pub fn check_refused<T>(
    result: Result<T, BackendError>,
    secret: &str,
    is_refusal: fn(&BackendError) -> bool,
) -> Result<(), String> {
    match result {
        Ok(_) => Err("opened with wrong credentials".into()),
        Err(e) if !is_refusal(&e) => Err(format!("refused with the wrong error: {e:?}")),
        Err(e) if format!("{e} {e:?}").contains(secret) => {
            Err("the error message contains the secret".into())
        }
        Err(_) => Ok(()),
    }
}

/// A request for `key` that both kinds of device accept: a bare digest for HSMs, a personal
/// message for a Ledger.
pub fn request_for(key: &KeyRef) -> SignRequest {
    match key {
        KeyRef::Ledger { .. } => {
            let message = b"castellan hardware test".to_vec();
            SignRequest {
                digest: alloy::primitives::eip191_hash_message(&message),
                payload: Payload::PersonalMessage(message),
            }
        }
        _ => SignRequest::digest(random_digest()),
    }
}

/// The unplug test: signs continuously while a person unplugs the device, then plugs it back.
/// Requests during the outage must fail with typed, transient errors (never a wrong or missing
/// signature, never a hang past the deadline), and signing must resume without restarting.
pub async fn unplugged_mid_run<B: KeyBackend>(
    backend: &B,
    key: &KeyInfo,
    say: &dyn Fn(&str),
) -> Result<(), String> {
    say("UNPLUG the device now (waiting up to 60 s)");
    let started = Instant::now();
    let mut failures = 0usize;
    while started.elapsed() < Duration::from_secs(60) {
        match backend
            .sign(&key.key_ref, &key.public_key, request_for(&key.key_ref))
            .await
        {
            Ok(_) => {}
            Err(e) if e.is_transient() => {
                failures += 1;
                break;
            }
            Err(e) => return Err(format!("unplugging gave a non-transient error: {e:?}")),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if failures == 0 {
        return Err("no request failed within 60 s: was the device unplugged?".into());
    }
    say("PLUG the device back in (waiting up to 120 s)");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        let request = request_for(&key.key_ref);
        let digest = request.digest;
        match backend.sign(&key.key_ref, &key.public_key, request).await {
            Ok(sig) => {
                let recovered = sig
                    .signature()
                    .recover_address_from_prehash(&digest)
                    .map_err(|e| e.to_string())?;
                if recovered != key.address {
                    return Err(format!("after replugging, recovered {recovered}"));
                }
                if backend.health() != Health::Ready {
                    return Err(format!(
                        "signing again but health is {:?}",
                        backend.health()
                    ));
                }
                return Ok(());
            }
            Err(e) if e.is_transient() => {}
            Err(e) => return Err(format!("while replugging: {e:?}")),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err("signing did not resume within 120 s of replugging".into())
}
