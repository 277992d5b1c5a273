//! Ledger devices in keyctl: registering a Ledger address as a key (`keyctl keys register-ledger`)
//! and approvers whose EIP-712 key is on a Ledger (`ledger_path` in `[[approvers]]`).
//!
//! # Security
//! A Ledger derives its keys from its seed; keyctl never generates or sees one. It reads the
//! public key and address at a derivation path from the device (the backend checks that the
//! stated address is the public key's) and registers that. For an approval it sends the Ethereum
//! app the EIP-712 domain separator and struct hash (`SIGN_EIP712`), which the device shows
//! before signing; the backend returns the signature only after verifying it against the key.

use alloy::dyn_abi::TypedData;
use alloy::primitives::Signature;
use alloy::sol_types::SolStruct;
use anyhow::{Context, bail};
use castellan_policy::{Approval, BudgetGrant, castellan_domain};
use castellan_signer::backend::ledger::{HidTransport, LedgerBackend, LedgerConfig};
use castellan_signer::backend::{KeyBackend, KeyInfo, Payload, SignRequest};
use castellan_signer::config::BackendConfig;
use castellan_signer::store::{
    Change, KeyName, KeyVersionRecord, NewKeyVersion, SqliteStore, Store,
};
use serde_json::json;

use crate::config::KeyctlConfig;

/// Opens the Ledger: the `[backend]` when it is a Ledger, else `[ledger]` (defaults when absent).
pub async fn open(c: &KeyctlConfig) -> anyhow::Result<LedgerBackend<HidTransport>> {
    let config = match (&c.backend, &c.ledger) {
        (BackendConfig::Ledger(l), _) => l.clone(),
        (_, Some(l)) => l.clone(),
        (_, None) => LedgerConfig::default(),
    };
    LedgerBackend::open(&config)
        .await
        .context("opening the Ledger (plugged in, unlocked, Ethereum app open?)")
}

/// Reads the key at `path` from the device and registers it as the active (first) version of
/// `name`. The name must be new.
pub async fn register<B: KeyBackend>(
    store: &SqliteStore,
    device: &B,
    name: &KeyName,
    path: &str,
    rotate_every_ms: Option<u64>,
    change: impl Fn() -> Change,
) -> anyhow::Result<(KeyVersionRecord, KeyInfo)> {
    if !store.list_keys(Some(name.clone())).await?.is_empty() {
        bail!("key {name} already exists");
    }
    let info = device
        .find_by_label(path)
        .await
        .with_context(|| format!("reading the address at {path} from the Ledger"))?;
    let rec = store
        .register_key_version(
            NewKeyVersion {
                name: name.clone(),
                key_ref: info.key_ref.clone(),
                address: info.address,
                public_key: info.public_key.to_encoded_point(false).as_bytes().to_vec(),
                rotate_every_ms,
            },
            change(),
        )
        .await
        .with_context(|| format!("registering {name}"))?;
    let active = store
        .activate_version(rec.version.clone(), None, change())
        .await?;
    Ok((active, info))
}

/// The approval as EIP-712 typed data under the Castellan domain, as the device is sent it.
pub fn approval_typed_data(approval: &Approval, chain_id: u64) -> anyhow::Result<TypedData> {
    let typed: TypedData = serde_json::from_value(json!({
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"}
            ],
            "Approval": [
                {"name": "request", "type": "bytes32"},
                {"name": "decision", "type": "string"},
                {"name": "expiry", "type": "uint64"}
            ]
        },
        "primaryType": "Approval",
        "domain": {"name": "Castellan", "version": "1", "chainId": chain_id},
        "message": {
            "request": approval.request,
            "decision": approval.decision,
            "expiry": approval.expiry
        }
    }))
    .context("approval typed data")?;
    checked("approval", typed, approval, chain_id)
}

/// `typed` if it hashes to what the signer verifies for `value` (the policy crate's own EIP-712
/// encoding), so the device is never shown something other than what is signed.
fn checked<S: SolStruct>(
    what: &str,
    typed: TypedData,
    value: &S,
    chain_id: u64,
) -> anyhow::Result<TypedData> {
    let want = value.eip712_signing_hash(&castellan_domain(chain_id));
    let got = typed
        .eip712_signing_hash()
        .map_err(|e| anyhow::anyhow!("{what} typed data: {e}"))?;
    if got != want {
        bail!("{what} typed data hashes to {got}, the signer expects {want}");
    }
    Ok(typed)
}

/// Signs `typed` (already [`checked`] against `value`) on the device and returns the signature.
async fn sign_typed<B: KeyBackend, S: SolStruct>(
    what: &str,
    device: &B,
    key: &KeyInfo,
    typed: TypedData,
    value: &S,
    chain_id: u64,
) -> anyhow::Result<Signature> {
    let request = SignRequest {
        digest: value.eip712_signing_hash(&castellan_domain(chain_id)),
        payload: Payload::TypedData(Box::new(typed)),
    };
    let sig = device
        .sign(&key.key_ref, &key.public_key, request)
        .await
        .with_context(|| format!("signing the {what} on the Ledger ({})", key.key_ref))?;
    Ok(sig.signature())
}

/// Signs an approval with the approver's key on a device that signs EIP-712 payloads (a Ledger;
/// digest-signing devices sign the same hash).
pub async fn sign_approval<B: KeyBackend>(
    device: &B,
    key: &KeyInfo,
    approval: &Approval,
    chain_id: u64,
) -> anyhow::Result<Signature> {
    let typed = approval_typed_data(approval, chain_id)?;
    sign_typed("approval", device, key, typed, approval, chain_id).await
}

/// The budget grant as EIP-712 typed data under the Castellan domain, as the device is sent it.
pub fn grant_typed_data(grant: &BudgetGrant, chain_id: u64) -> anyhow::Result<TypedData> {
    let typed: TypedData = serde_json::from_value(json!({
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"}
            ],
            "BudgetGrant": [
                {"name": "client", "type": "string"},
                {"name": "key", "type": "string"},
                {"name": "maxValue", "type": "uint256"},
                {"name": "maxCost", "type": "uint256"},
                {"name": "destinations", "type": "address[]"},
                {"name": "budget", "type": "uint256"},
                {"name": "window", "type": "uint64"},
                {"name": "validFrom", "type": "uint64"},
                {"name": "validUntil", "type": "uint64"},
                {"name": "nonce", "type": "uint64"}
            ]
        },
        "primaryType": "BudgetGrant",
        "domain": {"name": "Castellan", "version": "1", "chainId": chain_id},
        "message": {
            "client": grant.client,
            "key": grant.key,
            "maxValue": grant.maxValue.to_string(),
            "maxCost": grant.maxCost.to_string(),
            "destinations": grant.destinations,
            "budget": grant.budget.to_string(),
            "window": grant.window,
            "validFrom": grant.validFrom,
            "validUntil": grant.validUntil,
            "nonce": grant.nonce
        }
    }))
    .context("grant typed data")?;
    checked("grant", typed, grant, chain_id)
}

/// Signs a budget grant with the approver's key on a Ledger (the device shows the grant).
pub async fn sign_grant<B: KeyBackend>(
    device: &B,
    key: &KeyInfo,
    grant: &BudgetGrant,
    chain_id: u64,
) -> anyhow::Result<Signature> {
    let typed = grant_typed_data(grant, chain_id)?;
    sign_typed("grant", device, key, typed, grant, chain_id).await
}

/// `keyctl keys register-ledger <name> --path <path>`.
pub async fn register_command(
    c: &KeyctlConfig,
    g: &crate::Globals,
    name: &str,
    path: &str,
    rotate_every: Option<&str>,
) -> anyhow::Result<crate::Report> {
    let name = crate::ops::key_name(name)?;
    let rotate_every_ms = rotate_every.map(crate::parse_duration_ms).transpose()?;
    castellan_signer::backend::ledger::path_to_bytes(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = crate::ops::open_store(c)?;
    if !store.list_keys(Some(name.clone())).await?.is_empty() {
        bail!("key {name} already exists");
    }
    let device = open(c).await?;
    let (rec, _) = register(&store, &device, &name, path, rotate_every_ms, || {
        crate::ops::change(c, g)
    })
    .await?;
    Ok(crate::Report::new(
        format!(
            "registered {} address {} (Ledger {path})",
            rec.version, rec.address
        ),
        json!({"key": rec.version.to_string(), "address": rec.address.to_checksum(None),
               "backend": rec.key_ref.to_string()}),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    //! Over a scripted APDU transport: the device is a test double that answers the Ethereum
    //! app's protocol, with a signature made by anvil's public dev key #0 (as the stand-in relays
    //! do); the bytes keyctl sends are checked against independently computed values.

    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use alloy::primitives::{Address, B256};
    use alloy::signers::SignerSync;
    use castellan_signer::audit::UnixMillis;
    use castellan_signer::backend::BackendError;
    use castellan_signer::backend::ledger::{Apdu, LedgerTransport, path_to_bytes};

    use super::*;

    const PATH: &str = "m/44'/60'/0'/0/0";

    #[derive(Clone, Default)]
    struct Scripted {
        sent: Arc<Mutex<Vec<Apdu>>>,
        answers: Arc<Mutex<VecDeque<Vec<u8>>>>,
    }

    impl LedgerTransport for Scripted {
        async fn exchange(&self, apdu: &Apdu) -> Result<Vec<u8>, BackendError> {
            self.sent.lock().unwrap().push(apdu.clone());
            self.answers
                .lock()
                .unwrap()
                .pop_front()
                .ok_or_else(|| BackendError::Unavailable("script exhausted".into()))
        }
    }

    fn device_key() -> alloy::signers::local::PrivateKeySigner {
        castellan_tests::relays::dev_signer(0)
    }

    /// GET_PUBLIC_KEY's answer: len ‖ 04‖X‖Y ‖ len ‖ ASCII address ‖ 9000.
    fn address_answer() -> Vec<u8> {
        let k = device_key();
        let pk = k.credential().verifying_key().to_encoded_point(false);
        let mut out = vec![65];
        out.extend_from_slice(pk.as_bytes());
        let addr = hex::encode(k.address().as_slice());
        out.push(40);
        out.extend_from_slice(addr.as_bytes());
        out.extend_from_slice(&[0x90, 0x00]);
        out
    }

    fn backend(script: &Scripted) -> LedgerBackend<Scripted> {
        LedgerBackend::with_transport(script.clone(), LedgerConfig::default())
    }

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path().join("s.db")).unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn register_reads_the_address_at_the_path_and_registers_it_active() {
        let script = Scripted::default();
        script.answers.lock().unwrap().push_back(address_answer());
        let (_d, store) = store().await;
        let name = KeyName::new("cold-ledger").unwrap();
        let change = || Change::new("test", UnixMillis(1_000));
        let (rec, info) = register(&store, &backend(&script), &name, PATH, None, change)
            .await
            .unwrap();
        assert_eq!(rec.address, device_key().address());
        assert_eq!(info.address, rec.address);
        assert_eq!(rec.key_ref.to_string(), format!("ledger:{PATH}"));
        assert_eq!(rec.version.to_string(), "cold-ledger@1");
        assert_eq!(rec.status.state(), "active");
        // The bytes sent: GET_PUBLIC_KEY without on-device confirmation, path encoded as BIP-32.
        let sent = script.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            hex::encode(sent[0].to_bytes()),
            "e002000015058000002c8000003c800000000000000000000000"
        );
        // A name that exists is refused before the device is asked.
        let err = register(&store, &backend(&script), &name, PATH, None, change)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("already exists"));
        assert_eq!(script.sent.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn register_refuses_an_answer_whose_address_is_not_its_public_key() {
        let script = Scripted::default();
        let mut answer = address_answer();
        // Change one hex digit of the stated address.
        let i = 1 + 65 + 1;
        answer[i] = if answer[i] == b'0' { b'1' } else { b'0' };
        script.answers.lock().unwrap().push_back(answer);
        let (_d, store) = store().await;
        let name = KeyName::new("cold-ledger").unwrap();
        let err = register(&store, &backend(&script), &name, PATH, None, || {
            Change::new("t", UnixMillis(1))
        })
        .await
        .unwrap_err();
        assert!(format!("{err:#}").contains("states address"), "{err:#}");
        assert!(store.list_keys(None).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_approval_is_signed_as_eip712_on_the_ledger_and_recovers_to_the_approver() {
        let chain_id = 31337;
        let approval = Approval {
            request: B256::repeat_byte(0xab),
            decision: "approve".into(),
            expiry: 1_900_000_000,
        };
        let domain = castellan_domain(chain_id);
        let hash = approval.eip712_signing_hash(&domain);
        let sig = device_key().sign_hash_sync(&hash).unwrap();
        let mut sign_answer = vec![27 + u8::from(sig.v())];
        sign_answer.extend_from_slice(&sig.r().to_be_bytes::<32>());
        sign_answer.extend_from_slice(&sig.s().to_be_bytes::<32>());
        sign_answer.extend_from_slice(&[0x90, 0x00]);

        let script = Scripted::default();
        script.answers.lock().unwrap().push_back(address_answer());
        script.answers.lock().unwrap().push_back(sign_answer);
        let device = backend(&script);
        let key = device.find_by_label(PATH).await.unwrap();
        let got = sign_approval(&device, &key, &approval, chain_id)
            .await
            .unwrap();
        // What the signer checks: recovery under the Castellan domain to the approver.
        let signed = castellan_policy::SignedApproval {
            approval: approval.clone(),
            signature: got,
        };
        assert_eq!(signed.signer(&domain), Some(device_key().address()));
        // The SIGN_EIP712 APDU: path ‖ domain separator ‖ hashStruct(Approval), computed here by
        // the policy crate's sol! encoding, independent of the dynamic typed data keyctl sends.
        let sent = script.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 2);
        let apdu = &sent[1];
        assert_eq!(
            (apdu.cla, apdu.ins, apdu.p1, apdu.p2),
            (0xe0, 0x0c, 0x00, 0x00)
        );
        let mut want = path_to_bytes(PATH).unwrap();
        want.extend_from_slice(domain.separator().as_slice());
        want.extend_from_slice(approval.eip712_hash_struct().as_slice());
        assert_eq!(hex::encode(&apdu.data), hex::encode(&want));
    }

    #[tokio::test]
    async fn a_budget_grant_is_signed_as_eip712_on_the_ledger_and_recovers_to_the_approver() {
        let chain_id = 31337;
        let grant = BudgetGrant {
            client: "spiffe://castellan/strategy/alpha".into(),
            key: "searcher-hot".into(),
            maxValue: alloy::primitives::U256::from(3u64)
                * alloy::primitives::U256::from(10u64).pow(alloy::primitives::U256::from(18u64)),
            maxCost: alloy::primitives::U256::from(4u64)
                * alloy::primitives::U256::from(10u64).pow(alloy::primitives::U256::from(18u64)),
            destinations: vec![Address::repeat_byte(0x11), Address::repeat_byte(0x22)],
            budget: alloy::primitives::U256::from(5u64)
                * alloy::primitives::U256::from(10u64).pow(alloy::primitives::U256::from(18u64)),
            window: 0,
            validFrom: 1_800_000_000,
            validUntil: 1_900_000_000,
            nonce: 7,
        };
        let domain = castellan_domain(chain_id);
        let hash = grant.eip712_signing_hash(&domain);
        let sig = device_key().sign_hash_sync(&hash).unwrap();
        let mut sign_answer = vec![27 + u8::from(sig.v())];
        sign_answer.extend_from_slice(&sig.r().to_be_bytes::<32>());
        sign_answer.extend_from_slice(&sig.s().to_be_bytes::<32>());
        sign_answer.extend_from_slice(&[0x90, 0x00]);

        let script = Scripted::default();
        script.answers.lock().unwrap().push_back(address_answer());
        script.answers.lock().unwrap().push_back(sign_answer);
        let device = backend(&script);
        let key = device.find_by_label(PATH).await.unwrap();
        let got = sign_grant(&device, &key, &grant, chain_id).await.unwrap();
        assert_eq!(
            got.recover_address_from_prehash(&hash).unwrap(),
            device_key().address()
        );
        // SIGN_EIP712: path ‖ domain separator ‖ hashStruct(BudgetGrant) from the sol! encoding.
        let sent = script.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 2);
        let mut want = path_to_bytes(PATH).unwrap();
        want.extend_from_slice(domain.separator().as_slice());
        want.extend_from_slice(grant.eip712_hash_struct().as_slice());
        assert_eq!(hex::encode(&sent[1].data), hex::encode(&want));
    }

    #[tokio::test]
    async fn a_rejection_on_the_device_is_a_clear_error() {
        let script = Scripted::default();
        script.answers.lock().unwrap().push_back(address_answer());
        script.answers.lock().unwrap().push_back(vec![0x69, 0x85]);
        let device = backend(&script);
        let key = device.find_by_label(PATH).await.unwrap();
        let approval = Approval {
            request: B256::ZERO,
            decision: "approve".into(),
            expiry: 1,
        };
        let err = sign_approval(&device, &key, &approval, 1)
            .await
            .unwrap_err();
        let text = format!("{err:#}").to_lowercase();
        assert!(text.contains("reject"), "{text}");
        let _: Address = key.address;
    }
}
