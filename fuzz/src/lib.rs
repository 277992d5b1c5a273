//! Invariants checked by Castellan's fuzz targets, one function per target. Each takes the raw
//! fuzzer input, runs it through the same decoder the daemons run on hostile input, and panics
//! (a libFuzzer crash) when an invariant does not hold:
//!
//! - [`sign_request`]: the signer's JSON request bodies (`castellan_api::signer`) and the
//!   submitter's `SubmitBundleRequest`. A body that parses serializes and parses back to the same
//!   value; `UnsignedTx::to_typed` either refuses with a reason or builds a transaction carrying
//!   exactly the requested values (type, chain id, nonce, gas, fees ≤ 2^128 − 1, value, calldata,
//!   destination: nothing truncated or defaulted), whose signed envelope decodes back to itself.
//! - [`typed_data`]: `castellan_signer::eth::parse_typed_data` (the `eth_signTypedData_v4` JSON).
//!   Parsed data hashes; serializing and parsing it again gives the same EIP-712 digest; the API
//!   route's path (`{"typedData": …}` through `serde_json::Value`) gives the same digest; the chain
//!   guard accepts exactly the domains without a chain id or with the configured one.
//! - [`bundle_raw_tx`]: a pre-signed raw transaction inside a bundle, decoded as the signer does
//!   (`TxEnvelope::decode_2718`) and validated as the submitter does (`ValidBundle::validate`).
//!   A decoded transaction re-encodes to exactly the bytes it was decoded from and its hash is
//!   their keccak256; the submitter accepts exactly the transactions that decode without trailing
//!   bytes, carry the configured chain id and recover a sender, and records that sender, nonce
//!   and hash; another chain id is refused.
//! - [`policy_file`]: `Policy::from_toml`. Loading is deterministic and the hash covers the
//!   canonical form; for every key and client the file names (and an unknown one), representative
//!   requests evaluate without panicking, and nothing is allowed while frozen, for a retired key
//!   version, or for a key the policy does not know.
//! - [`relay_response`]: `castellan_submitter::relay::classify_answer` and
//!   `castellan_submitter::wire::parse_simulation` on any HTTP status, `Retry-After` and body:
//!   429 is throttled, 5xx a transient failure, only a JSON-RPC `result` is accepted, and a
//!   simulation result lists exactly the relay's per-transaction entries.

use std::fmt::Debug;
use std::time::Duration;

use alloy::consensus::transaction::SignerRecoverable;
use alloy::consensus::{SignableTransaction, Transaction, TxEnvelope, TypedTransaction};
use alloy::eips::{Decodable2718, Encodable2718};
use alloy::primitives::{Address, B256, Bytes, Signature, U256, keccak256};
use castellan_api::signer as wire;
use castellan_api::submitter::{Quantity, RelaySelection, SimulatedTx, SubmitBundleRequest};
use castellan_policy::{
    ClientId, Context, Fee, KeyName, KeyStatus, MemoryLimits, Policy, Request, RequestKind,
    TxFacts, TypedDataFacts,
};
use castellan_signer::eth::{self, ChainGuard};
use castellan_submitter::bundle::ValidBundle;
use castellan_submitter::relay::{SendResult, classify_answer};
use castellan_submitter::wire::{
    RpcAnswer, lenient_u64, lenient_u256, parse_answer, parse_simulation,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The chain the fuzzed signer serves (anvil's).
pub const CHAIN: u64 = 31337;

/// Serializes `v` and parses it back: the result must equal `v`.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(v: &T) {
    let json = serde_json::to_string(v).expect("a parsed request serializes");
    let back: T = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("re-parsing the serialization {json} failed: {e}"));
    assert_eq!(&back, v, "round trip through {json}");
}

// ---------------------------------------------------------------------------------------------
// (a) signer API request bodies

/// Every request body the signer and submitter decode, tried on the same input.
pub fn sign_request(data: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<wire::SignTransactionRequest>(data) {
        round_trip(&req);
        check_unsigned(&req.tx);
    }
    if let Ok(req) = serde_json::from_slice::<wire::SignMessageRequest>(data) {
        round_trip(&req);
        let bytes = req.bytes();
        match (&req.message, &req.text) {
            (Some(m), None) => assert_eq!(bytes.expect("one form"), m.to_vec()),
            (None, Some(t)) => assert_eq!(bytes.expect("one form"), t.as_bytes()),
            _ => assert!(bytes.is_err(), "neither or both forms must be refused"),
        }
    }
    if let Ok(req) = serde_json::from_slice::<wire::SignTypedDataRequest>(data) {
        // The route hands the value's text to the typed-data parser: it must not panic, and a
        // refusal is the typed-data error.
        if let Err(e) = eth::parse_typed_data(&req.typed_data.to_string()) {
            assert_eq!(e.code(), "malformed_typed_data");
        }
    }
    if let Ok(req) = serde_json::from_slice::<wire::SignBundleRequest>(data) {
        round_trip(&req);
        for t in &req.txs {
            if let Some(u) = &t.tx {
                check_unsigned(u);
            }
            if let Some(raw) = &t.signed {
                bundle_raw_tx(raw);
            }
        }
    }
    if let Ok(req) = serde_json::from_slice::<wire::ApprovalSubmission>(data) {
        round_trip(&req);
    }
    if let Ok(req) = serde_json::from_slice::<wire::RelayAuthRequest>(data) {
        round_trip(&req);
    }
    if let Ok(req) = serde_json::from_slice::<wire::AdminAction>(data) {
        round_trip(&req);
    }
    if let Ok(req) = serde_json::from_slice::<SubmitBundleRequest>(data) {
        round_trip(&req);
        for chain in [1, CHAIN] {
            if let Ok(valid) = ValidBundle::validate(req.clone(), chain, 100) {
                check_valid_bundle(&valid, chain);
            }
        }
    }
}

/// The type `to_typed` must build for `u` (explicit, else inferred).
fn expected_type(u: &wire::UnsignedTx) -> u64 {
    match u.tx_type {
        Some(Quantity(t)) => t,
        None if u.max_fee_per_gas.is_some() || u.max_priority_fee_per_gas.is_some() => 2,
        None if u.access_list.is_some() => 1,
        None => 0,
    }
}

/// `to_typed` refuses with a reason, or carries exactly the requested values.
pub fn check_unsigned(u: &wire::UnsignedTx) {
    let tx = match u.to_typed() {
        Ok(tx) => tx,
        Err(e) => {
            assert!(!e.0.is_empty(), "a refusal names its reason");
            return;
        }
    };
    assert_eq!(u64::from(u8::from(tx.tx_type())), expected_type(u));
    assert_eq!(
        tx.chain_id(),
        Some(u.chain_id.0),
        "EIP-155 / typed: always a chain id"
    );
    assert_eq!(tx.nonce(), u.nonce.0);
    assert_eq!(tx.gas_limit(), u.gas.0);
    assert_eq!(tx.value(), u.value.map(|w| w.0).unwrap_or_default());
    assert_eq!(tx.input(), &u.input.clone().unwrap_or_default());
    assert_eq!(tx.to(), u.to.map(|a| a.0));
    let wei = |v: u128| Some(U256::from(v));
    match &tx {
        TypedTransaction::Legacy(t) => {
            assert_eq!(wei(t.gas_price), u.gas_price.map(|w| w.0));
            assert!(u.max_fee_per_gas.is_none() && u.access_list.is_none());
        }
        TypedTransaction::Eip2930(t) => {
            assert_eq!(wei(t.gas_price), u.gas_price.map(|w| w.0));
            assert_eq!(t.access_list, u.access_list.clone().unwrap_or_default());
        }
        TypedTransaction::Eip1559(t) => {
            assert_eq!(wei(t.max_fee_per_gas), u.max_fee_per_gas.map(|w| w.0));
            assert_eq!(
                wei(t.max_priority_fee_per_gas),
                u.max_priority_fee_per_gas.map(|w| w.0)
            );
            assert!(u.gas_price.is_none());
            assert_eq!(t.access_list, u.access_list.clone().unwrap_or_default());
        }
        other => panic!("to_typed built an unsupported type: {other:?}"),
    }
    // The chain guard accepts it exactly on its own chain.
    assert_eq!(
        ChainGuard::new(CHAIN).check_transaction(&tx).is_ok(),
        u.chain_id.0 == CHAIN
    );
    // Signed (with a fixed, valid-shaped signature), the envelope decodes back to itself.
    let digest = tx.signature_hash();
    let sig = Signature::new(U256::from(1), U256::from(2), digest[0] & 1 == 1);
    let envelope: TxEnvelope = match tx {
        TypedTransaction::Legacy(t) => t.into_signed(sig).into(),
        TypedTransaction::Eip2930(t) => t.into_signed(sig).into(),
        TypedTransaction::Eip1559(t) => t.into_signed(sig).into(),
        _ => unreachable!("checked above"),
    };
    let raw = envelope.encoded_2718();
    let mut buf = raw.as_slice();
    let back = TxEnvelope::decode_2718(&mut buf).expect("our own envelope decodes");
    assert!(buf.is_empty());
    assert_eq!(back, envelope);
    assert_eq!(back.chain_id(), Some(u.chain_id.0));
    assert_eq!(*back.tx_hash(), keccak256(&raw));
}

fn check_valid_bundle(valid: &ValidBundle, chain: u64) {
    assert!(!valid.txs.is_empty() && valid.txs.len() <= castellan_submitter::bundle::MAX_TXS);
    assert!(valid.last_block >= valid.target_block);
    assert_eq!(valid.tx_hashes.len(), valid.txs.len());
    assert_eq!(valid.tx_meta.len(), valid.txs.len());
    for ((raw, hash), meta) in valid.txs.iter().zip(&valid.tx_hashes).zip(&valid.tx_meta) {
        assert_eq!(*hash, keccak256(raw));
        let mut buf = raw.as_ref();
        let env = TxEnvelope::decode_2718(&mut buf).expect("an accepted tx decodes");
        assert!(buf.is_empty(), "an accepted tx has no trailing bytes");
        assert_eq!(env.chain_id(), Some(chain));
        assert_eq!(env.nonce(), meta.nonce);
        assert_eq!(env.recover_signer().ok(), Some(meta.sender));
    }
}

// ---------------------------------------------------------------------------------------------
// (b) EIP-712 typed data

/// `parse_typed_data` on the input as text.
pub fn typed_data(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = match eth::parse_typed_data(text) {
        Ok(d) => d,
        Err(e) => {
            assert_eq!(e.code(), "malformed_typed_data");
            assert!(e.is_caller_error());
            return;
        }
    };
    let digest = parsed
        .eip712_signing_hash()
        .expect("parse_typed_data checked that it hashes");
    // Serialized and parsed again: the same digest.
    let json = serde_json::to_string(&parsed).expect("typed data serializes");
    let again = eth::parse_typed_data(&json)
        .unwrap_or_else(|e| panic!("re-parsing the serialization {json} failed: {e}"));
    assert_eq!(again.eip712_signing_hash().ok(), Some(digest), "{json}");
    // The API route's path: the request body holds it as a JSON value, handed on as text.
    let body = format!("{{\"typedData\":{text}}}");
    let req: wire::SignTypedDataRequest =
        serde_json::from_str(&body).expect("valid typed data is a valid typedData body");
    let routed = eth::parse_typed_data(&req.typed_data.to_string())
        .expect("the route parses what the parser parses");
    assert_eq!(routed.eip712_signing_hash().ok(), Some(digest));
    // The chain guard accepts exactly the domains bound to no chain or to its own.
    let accepted = ChainGuard::new(CHAIN).check_typed_data(&parsed).is_ok();
    match parsed.domain.chain_id {
        None => assert!(accepted),
        Some(id) => assert_eq!(accepted, id == U256::from(CHAIN)),
    }
}

// ---------------------------------------------------------------------------------------------
// (c) raw transactions inside bundles

/// A pre-signed transaction of a bundle, as the signer and the submitter decode it.
pub fn bundle_raw_tx(data: &[u8]) {
    let mut buf = data;
    let decoded = TxEnvelope::decode_2718(&mut buf);
    let consumed = data.len() - buf.len();
    let request = |chain_txs: Vec<Bytes>| SubmitBundleRequest {
        bundle_id: uuid::Uuid::nil(),
        key_name: "fuzz".into(),
        txs: chain_txs,
        target_block: Quantity(1),
        last_block: None,
        min_timestamp: None,
        max_timestamp: None,
        reverting_tx_hashes: Vec::new(),
        replacement_uuid: None,
        relays: RelaySelection::All,
        simulate: false,
    };
    let txs = vec![Bytes::copy_from_slice(data)];
    let env = match decoded {
        Ok(env) => env,
        Err(_) => {
            for chain in [1, CHAIN] {
                assert!(ValidBundle::validate(request(txs.clone()), chain, 10).is_err());
            }
            return;
        }
    };
    // Decoding is canonical: re-encoding gives back exactly the bytes read, and the hash is theirs.
    let read = &data[..consumed];
    assert_eq!(
        env.encoded_2718(),
        read,
        "decode→encode is not the identity"
    );
    assert_eq!(env.encode_2718_len(), consumed);
    assert_eq!(*env.tx_hash(), keccak256(read));
    let sender = env.recover_signer().ok();
    let chain = env.chain_id().unwrap_or(1);
    let result = ValidBundle::validate(request(txs.clone()), chain, 10);
    let acceptable = buf.is_empty() && env.chain_id().is_some() && sender.is_some();
    match result {
        Ok(valid) => {
            assert!(
                acceptable,
                "accepted: trailing {}, chain {:?}, sender {sender:?}",
                buf.len(),
                env.chain_id()
            );
            check_valid_bundle(&valid, chain);
            assert_eq!(valid.tx_meta[0].sender, sender.expect("checked"));
            assert_eq!(valid.tx_hashes[0], *env.tx_hash());
            // The same transaction on another chain is refused.
            let other = chain.wrapping_add(1);
            let err = ValidBundle::validate(request(txs), other, 10).expect_err("wrong chain");
            assert_eq!(err.code, "wrong_chain_id");
        }
        Err(e) => assert!(
            !acceptable,
            "refused a decodable tx on its own chain: {} {}",
            e.code, e.message
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// (d) the policy file

/// Names of `[[keys]]` and `[[clients]]` in the TOML, when it is TOML at all.
fn names(src: &str) -> (Vec<String>, Vec<String>) {
    let Ok(table) = src.parse::<toml::Table>() else {
        return (Vec::new(), Vec::new());
    };
    let field = |section: &str, f: &str| -> Vec<String> {
        table
            .get(section)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.get(f).and_then(|n| n.as_str()).map(str::to_owned))
                    .take(4)
                    .collect()
            })
            .unwrap_or_default()
    };
    (field("keys", "name"), field("clients", "identity"))
}

fn kinds() -> Vec<RequestKind> {
    let to = Address::with_last_byte(7);
    let gwei = U256::from(1_000_000_000u64);
    let transfer = TxFacts::new(
        1,
        Some(to),
        U256::from(10u64).pow(U256::from(16)),
        21_000,
        Fee::Eip1559 {
            max_fee_per_gas: gwei,
            max_priority_fee_per_gas: U256::from(1),
        },
        &[],
    );
    let call = TxFacts::new(
        CHAIN,
        Some(Address::with_last_byte(9)),
        U256::ZERO,
        100_000,
        Fee::GasPrice(gwei),
        &[0xa9, 0x05, 0x9c, 0xbb, 0, 0, 0, 1],
    );
    let create = TxFacts::new(1, None, U256::ZERO, 1_000_000, Fee::GasPrice(gwei), &[0x60]);
    let huge = TxFacts::new(
        1,
        Some(to),
        U256::MAX,
        u64::MAX,
        Fee::Eip1559 {
            max_fee_per_gas: U256::MAX,
            max_priority_fee_per_gas: U256::MAX,
        },
        &[],
    );
    vec![
        RequestKind::Transaction(transfer.clone()),
        RequestKind::Transaction(call.clone()),
        RequestKind::Transaction(create),
        RequestKind::Transaction(huge.clone()),
        RequestKind::Bundle(vec![transfer.clone(), call]),
        RequestKind::Bundle(vec![transfer, huge]),
        RequestKind::PersonalMessage(b"hello".to_vec()),
        RequestKind::RelayAuth(format!("0x{}", "ab".repeat(32)).into_bytes()),
        RequestKind::TypedData(TypedDataFacts {
            name: Some("Castellan".into()),
            version: Some("1".into()),
            chain_id: Some(1),
            verifying_contract: Some(to),
        }),
        RequestKind::TypedData(TypedDataFacts::default()),
    ]
}

/// `Policy::from_toml` on the input as text, then evaluations against what loaded.
pub fn policy_file(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match Policy::from_toml(src) {
        Ok(p) => p,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "a refusal names its reason");
            return;
        }
    };
    assert!(policy.canonical_form().starts_with("castellan-policy/1 "));
    assert_eq!(policy.hash(), keccak256(policy.canonical_form()));
    let again = Policy::from_toml(src).expect("loading is deterministic");
    assert_eq!(again.hash(), policy.hash());
    assert_eq!(again.canonical_form(), policy.canonical_form());

    let (mut keys, mut clients) = names(src);
    keys.push("not-in-policy".into());
    clients.push("nobody".into());
    let limits = MemoryLimits::new();
    let now = 1_800_000_000;
    for key in &keys {
        let key = KeyName::new(key);
        for client in &clients {
            let client = ClientId::new(client);
            let _ = policy.windows_for(&key, &client);
            for kind in kinds() {
                let mut req = Request {
                    key: key.clone(),
                    key_status: KeyStatus::Active,
                    client: client.clone(),
                    digest: B256::repeat_byte(0x42),
                    kind,
                };
                let ctx = Context::new(now, &limits);
                let d = policy.evaluate(&req, &ctx);
                assert!(!d.reason.is_empty(), "every decision names its reason");
                if !policy.has_key(&key) {
                    assert!(!d.is_allowed(), "unknown key allowed: {}", d.reason);
                }
                if d.is_allowed() {
                    // Windows are reserved only by an allow, and only the request's own scopes.
                    let mine = policy.windows_for(&key, &client);
                    for r in &d.reservations {
                        assert!(
                            mine.contains(&r.window),
                            "reservation outside the request's windows"
                        );
                    }
                }
                let frozen = Context {
                    frozen: true,
                    ..Context::new(now, &limits)
                };
                let d = policy.evaluate(&req, &frozen);
                assert!(!d.is_allowed(), "allowed while frozen: {}", d.reason);
                req.key_status = KeyStatus::Retired;
                let d = policy.evaluate(&req, &Context::new(now, &limits));
                assert!(!d.is_allowed(), "retired key allowed: {}", d.reason);
                req.key_status = KeyStatus::Retiring {
                    successor: Address::with_last_byte(7),
                };
                let _ = policy.evaluate(&req, &Context::new(now, &limits));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (e) relay responses

/// Splits the input into an HTTP status, a `Retry-After` value and a body.
pub fn split_relay_input(data: &[u8]) -> Option<(u16, Option<&str>, &[u8])> {
    let (head, rest) = data.split_first_chunk::<3>()?;
    let status = 100 + u16::from_le_bytes([head[0], head[1]]) % 500;
    let n = usize::from(head[2] % 16).min(rest.len());
    let (retry, body) = rest.split_at(n);
    let retry = if n == 0 {
        None
    } else {
        std::str::from_utf8(retry).ok()
    };
    Some((status, retry, body))
}

/// `classify_answer` and `parse_simulation` on an arbitrary relay answer.
pub fn relay_response(data: &[u8]) {
    let Some((status, retry, body)) = split_relay_input(data) else {
        return;
    };
    let latency = Duration::from_millis(3);
    let answer = parse_answer(body);
    let (result, value) = classify_answer(status, retry, body, latency);
    let retry_secs = retry.and_then(|r| r.trim().parse::<u64>().ok());
    match &result {
        SendResult::Throttled {
            retry_after,
            latency: l,
        } => {
            assert!(
                status == 429
                    || (!(500..600).contains(&status)
                        && matches!(&answer, RpcAnswer::Error { message, .. } if message == "Rate limited")),
                "throttled on HTTP {status}: {answer:?}"
            );
            assert_eq!(*retry_after, retry_secs.map(Duration::from_secs));
            assert_eq!(*l, latency);
            assert!(value.is_none());
        }
        SendResult::Failed {
            transient,
            latency: l,
            reason,
        } => {
            assert_ne!(status, 429);
            assert_eq!(*transient, (500..600).contains(&status), "{reason}");
            if !transient {
                assert!(matches!(answer, RpcAnswer::Garbage(_)), "{answer:?}");
            }
            assert_eq!(*l, Some(latency));
            assert!(value.is_none());
        }
        SendResult::Accepted {
            hash,
            response,
            latency: l,
        } => {
            assert!(status != 429 && !(500..600).contains(&status));
            let RpcAnswer::Result { hash: h, value: v } = &answer else {
                panic!("accepted without a result: {answer:?}");
            };
            assert_eq!(hash, h);
            assert_eq!(value.as_ref(), Some(v));
            // Only an object whose `error` is absent or null, with a `result`, is accepted.
            let obj: serde_json::Value =
                serde_json::from_slice(body).expect("accepted body is JSON");
            assert!(obj.get("error").is_none_or(serde_json::Value::is_null));
            assert_eq!(obj.get("result"), Some(v));
            // The kept response text is bounded (256 bytes, lossily decoded).
            assert!(
                response.chars().count() <= 256,
                "{} chars kept",
                response.chars().count()
            );
            assert_eq!(*l, latency);
        }
        SendResult::Rejected {
            code,
            message,
            latency: l,
        } => {
            assert!(status != 429 && !(500..600).contains(&status));
            let RpcAnswer::Error {
                code: c,
                message: m,
            } = &answer
            else {
                panic!("rejected without an error: {answer:?}");
            };
            assert_eq!(code, c);
            assert!(message.ends_with(m.as_str()));
            assert_ne!(m, "Rate limited");
            assert_eq!(*l, latency);
            assert!(value.is_none());
        }
        SendResult::Skipped(_) => panic!("a relay answer is never 'skipped'"),
    }
    if let Some(v) = &value {
        simulation(v);
    }
    // The body's value itself, as a simulation result (bloXroute answers vary).
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        simulation(&v);
    }
}

fn simulation(v: &serde_json::Value) {
    let Some(sim) = parse_simulation(v) else {
        return;
    };
    let items = v["results"]
        .as_array()
        .expect("parsed results are an array");
    assert_eq!(sim.results.len(), items.len());
    for (r, item) in sim.results.iter().zip(items) {
        let hash: B256 = item["txHash"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("hash");
        assert_eq!(r.tx_hash, hash);
        assert_eq!(
            r.gas_used.map(|q| q.0),
            item.get("gasUsed").and_then(lenient_u64)
        );
        assert_eq!(
            r.coinbase_payment.map(|w| w.0),
            item.get("coinbaseDiff").and_then(lenient_u256)
        );
        assert!(r.error.as_ref().is_none_or(|e| !e.is_empty()));
        assert!(r.revert.as_ref().is_none_or(|e| !e.is_empty()));
        // What the submitter reports onwards (status API) round-trips.
        let json = serde_json::to_string(r).expect("serializes");
        let back: SimulatedTx = serde_json::from_str(&json).expect("parses back");
        assert_eq!(&back, r);
    }
}
