//! Property tests of what the submitter decodes from outside (the same decoders as the fuzz
//! targets `relay_response` and `bundle_raw_tx`, fuzz/src/lib.rs): relay answers of any status,
//! `Retry-After` and body are classified without panicking and by the rules of
//! `relay::classify_answer`; generated JSON-RPC results, errors and simulation results come back
//! exactly; bundles of generated signed transactions are accepted on their chain with the right
//! sender, nonce and hash, and refused on another chain, with trailing bytes, truncated, or
//! mutated into something that does not decode.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use alloy::consensus::{SignableTransaction, TxEip1559, TxEip2930, TxEnvelope, TxLegacy};
use alloy::eips::Encodable2718;
use alloy::network::TxSignerSync;
use alloy::primitives::{Address, B256, Bytes, TxKind, U256, keccak256};
use alloy::signers::local::PrivateKeySigner;
use castellan_api::submitter::{Quantity, RelaySelection, SubmitBundleRequest};
use castellan_submitter::bundle::ValidBundle;
use castellan_submitter::relay::{SendResult, classify_answer};
use castellan_submitter::wire::{lenient_u64, lenient_u256, parse_simulation};
use proptest::prelude::*;
use serde_json::{Value, json};

const LATENCY: Duration = Duration::from_millis(4);

fn any_u256() -> impl Strategy<Value = U256> {
    prop_oneof![
        any::<u64>().prop_map(U256::from),
        any::<[u8; 32]>().prop_map(U256::from_be_bytes),
        Just(U256::MAX),
    ]
}

/// A u64 as a relay may write it: JSON number, decimal string or `0x`-hex string.
fn u64_json(n: u64, form: u8) -> Value {
    match form % 3 {
        0 => json!(n),
        1 => json!(n.to_string()),
        _ => json!(format!("{n:#x}")),
    }
}

fn u256_json(v: U256, form: u8) -> Value {
    match (form % 3, u64::try_from(v)) {
        (0, Ok(n)) => json!(n),
        (1, _) | (0, Err(_)) => json!(v.to_string()),
        _ => json!(format!("{v:#x}")),
    }
}

#[derive(Clone, Debug)]
struct SimItem {
    hash: B256,
    gas: Option<(u64, u8)>,
    coinbase: Option<(U256, u8)>,
    error: Option<String>,
    revert: Option<String>,
}

fn sim_item() -> impl Strategy<Value = SimItem> {
    (
        any::<[u8; 32]>(),
        proptest::option::of((any::<u64>(), any::<u8>())),
        proptest::option::of((any_u256(), any::<u8>())),
        proptest::option::of(".{1,20}"),
        proptest::option::of(".{1,20}"),
    )
        .prop_map(|(h, gas, coinbase, error, revert)| SimItem {
            hash: B256::from(h),
            gas,
            coinbase,
            error,
            revert,
        })
}

/// A signing key (any valid scalar).
fn key() -> impl Strategy<Value = PrivateKeySigner> {
    any::<[u8; 32]>().prop_filter_map("not a valid scalar", |b| {
        PrivateKeySigner::from_bytes(&B256::from(b)).ok()
    })
}

#[derive(Clone, Debug)]
struct TxSpec {
    ty: u8,
    chain_id: u64,
    nonce: u64,
    gas: u64,
    fee: u128,
    to: Option<[u8; 20]>,
    value: U256,
    input: Vec<u8>,
}

fn tx_spec() -> impl Strategy<Value = TxSpec> {
    (
        0u8..3,
        prop_oneof![Just(1u64), Just(31337), 1u64..u64::MAX / 2],
        any::<u64>(),
        any::<u64>(),
        any::<u128>(),
        proptest::option::of(any::<[u8; 20]>()),
        any_u256(),
        proptest::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(ty, chain_id, nonce, gas, fee, to, value, input)| TxSpec {
            ty,
            chain_id,
            nonce,
            gas,
            fee,
            to,
            value,
            input,
        })
}

/// Signs `t` with `key`: the raw EIP-2718 bytes.
fn sign(t: &TxSpec, key: &PrivateKeySigner) -> Bytes {
    let to =
        t.to.map_or(TxKind::Create, |a| TxKind::Call(Address::from(a)));
    let input = Bytes::from(t.input.clone());
    let env: TxEnvelope = match t.ty {
        0 => {
            let mut tx = TxLegacy {
                chain_id: Some(t.chain_id),
                nonce: t.nonce,
                gas_price: t.fee,
                gas_limit: t.gas,
                to,
                value: t.value,
                input,
            };
            let sig = key.sign_transaction_sync(&mut tx).unwrap();
            tx.into_signed(sig).into()
        }
        1 => {
            let mut tx = TxEip2930 {
                chain_id: t.chain_id,
                nonce: t.nonce,
                gas_price: t.fee,
                gas_limit: t.gas,
                to,
                value: t.value,
                access_list: Default::default(),
                input,
            };
            let sig = key.sign_transaction_sync(&mut tx).unwrap();
            tx.into_signed(sig).into()
        }
        _ => {
            let mut tx = TxEip1559 {
                chain_id: t.chain_id,
                nonce: t.nonce,
                gas_limit: t.gas,
                max_fee_per_gas: t.fee,
                max_priority_fee_per_gas: t.fee / 2,
                to,
                value: t.value,
                access_list: Default::default(),
                input,
            };
            let sig = key.sign_transaction_sync(&mut tx).unwrap();
            tx.into_signed(sig).into()
        }
    };
    env.encoded_2718().into()
}

fn bundle(txs: Vec<Bytes>) -> SubmitBundleRequest {
    SubmitBundleRequest {
        bundle_id: uuid::Uuid::from_u128(7),
        key_name: "searcher-hot".into(),
        txs,
        target_block: Quantity(100),
        last_block: Some(Quantity(102)),
        min_timestamp: None,
        max_timestamp: None,
        reverting_tx_hashes: Vec::new(),
        replacement_uuid: None,
        relays: RelaySelection::All,
        simulate: false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_answer_is_classified_by_status_first(
        status in prop_oneof![Just(200u16), Just(429), 500u16..600, 100u16..1000],
        retry in proptest::option::of(prop_oneof![any::<u64>().prop_map(|n| format!(" {n} ")), ".{0,12}"]),
        body in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let (result, value) = classify_answer(status, retry.as_deref(), &body, LATENCY);
        match result {
            SendResult::Throttled { retry_after, latency } => {
                prop_assert_eq!(latency, LATENCY);
                let expected = retry.as_deref().and_then(|r| r.trim().parse::<u64>().ok());
                prop_assert_eq!(retry_after, expected.map(Duration::from_secs));
                prop_assert!(value.is_none());
            }
            SendResult::Failed { transient, .. } => {
                prop_assert_eq!(transient, (500..600).contains(&status));
                prop_assert!(value.is_none());
            }
            SendResult::Accepted { response, .. } => {
                prop_assert!(value.is_some());
                prop_assert!(response.chars().count() <= 256);
            }
            SendResult::Rejected { .. } => prop_assert!(value.is_none()),
            SendResult::Skipped(_) => prop_assert!(false, "an answer is never skipped"),
        }
        if status == 429 {
            let again = classify_answer(status, None, &body, LATENCY).0;
            prop_assert!(matches!(again, SendResult::Throttled { .. }), "{:?}", again);
        }
        if (500..600).contains(&status) {
            let again = classify_answer(status, None, &body, LATENCY).0;
            prop_assert!(matches!(again, SendResult::Failed { transient: true, .. }), "{:?}", again);
        }
    }

    #[test]
    fn results_are_accepted_with_their_hash(
        hash in any::<[u8; 32]>(), shape in 0u8..4, id in any::<u32>(), status in 200u16..300,
    ) {
        let h = format!("{:#x}", B256::from(hash));
        let result = match shape {
            0 => json!({"bundleHash": h}),
            1 => json!({"bundleHash": h, "smart": "true"}),
            2 => json!({"txHash": h}),
            _ => json!(h),
        };
        let body = json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string();
        let (answer, value) = classify_answer(status, None, body.as_bytes(), LATENCY);
        match answer {
            SendResult::Accepted { hash: got, latency, .. } => {
                prop_assert_eq!(got, Some(h));
                prop_assert_eq!(latency, LATENCY);
                prop_assert_eq!(value, Some(result));
            }
            other => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn errors_are_rejected_with_their_code_and_message(
        code in any::<i64>(), message in ".{0,40}", status in prop_oneof![Just(200u16), 400u16..429, 430u16..500],
    ) {
        let body = json!({"jsonrpc": "2.0", "id": 1, "error": {"code": code, "message": message}}).to_string();
        let (answer, value) = classify_answer(status, Some("3"), body.as_bytes(), LATENCY);
        prop_assert!(value.is_none());
        match answer {
            SendResult::Throttled { retry_after, .. } => {
                prop_assert_eq!(message.as_str(), "Rate limited");
                prop_assert_eq!(retry_after, Some(Duration::from_secs(3)));
            }
            SendResult::Rejected { code: c, message: m, .. } => {
                prop_assert_eq!(c, Some(code));
                let prefix = if status == 200 { String::new() } else { format!("HTTP {status}: ") };
                prop_assert_eq!(m, format!("{prefix}{message}"));
            }
            other => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn simulation_results_come_back_exactly(items in proptest::collection::vec(sim_item(), 0..6)) {
        let results: Vec<Value> = items
            .iter()
            .map(|i| {
                let mut o = json!({"txHash": format!("{:#x}", i.hash), "toAddress": "0x"});
                if let Some((g, f)) = i.gas { o["gasUsed"] = u64_json(g, f); }
                if let Some((c, f)) = i.coinbase { o["coinbaseDiff"] = u256_json(c, f); }
                if let Some(e) = &i.error { o["error"] = json!(e); }
                if let Some(r) = &i.revert { o["revert"] = json!(r); }
                o
            })
            .collect();
        let body = json!({"jsonrpc": "2.0", "id": 1, "result": {"results": results, "totalGasUsed": 42000}}).to_string();
        let (answer, value) = classify_answer(200, None, body.as_bytes(), LATENCY);
        prop_assert!(matches!(answer, SendResult::Accepted { .. }), "{:?}", answer);
        let sim = parse_simulation(&value.unwrap()).unwrap();
        prop_assert_eq!(sim.results.len(), items.len());
        for (got, want) in sim.results.iter().zip(&items) {
            prop_assert_eq!(got.tx_hash, want.hash);
            prop_assert_eq!(got.gas_used, want.gas.map(|(g, _)| Quantity(g)));
            // A JSON number above u64 is not a wei amount relays send; every form here is exact.
            prop_assert_eq!(got.coinbase_payment.map(|w| w.0), want.coinbase.map(|(c, _)| c));
            prop_assert_eq!(&got.error, &want.error);
            prop_assert_eq!(&got.revert, &want.revert);
        }
    }

    #[test]
    fn lenient_numbers_read_every_form_and_refuse_overflow(n in any::<u64>(), v in any_u256(), form in any::<u8>()) {
        prop_assert_eq!(lenient_u64(&u64_json(n, form)), Some(n));
        prop_assert_eq!(lenient_u256(&u256_json(v, form)), Some(v));
        let over = format!("{}0", u64::MAX);
        prop_assert_eq!(lenient_u64(&json!(over)), None);
        prop_assert_eq!(lenient_u64(&json!(-1)), None);
        prop_assert_eq!(lenient_u256(&json!(format!("0x1{}", "0".repeat(64)))), None);
    }

}

// Signing in a debug build costs ~ms per transaction: fewer cases keep these quick.
proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn signed_transactions_are_accepted_on_their_chain_only(
        specs in proptest::collection::vec(tx_spec(), 1..4), key in key(),
    ) {
        let chain = specs[0].chain_id;
        let specs: Vec<TxSpec> = specs.into_iter().map(|s| TxSpec { chain_id: chain, ..s }).collect();
        let txs: Vec<Bytes> = specs.iter().map(|s| sign(s, &key)).collect();
        let valid = ValidBundle::validate(bundle(txs.clone()), chain, 10).unwrap();
        prop_assert_eq!(valid.tx_hashes.len(), txs.len());
        for ((raw, hash), (meta, spec)) in txs.iter().zip(&valid.tx_hashes).zip(valid.tx_meta.iter().zip(&specs)) {
            prop_assert_eq!(*hash, keccak256(raw));
            prop_assert_eq!(meta.sender, key.address());
            prop_assert_eq!(meta.nonce, spec.nonce);
        }
        let err = ValidBundle::validate(bundle(txs.clone()), chain + 1, 10).unwrap_err();
        prop_assert_eq!(err.code, "wrong_chain_id");

        let mut trailing = txs.clone();
        let mut last = trailing[0].to_vec();
        last.push(0);
        trailing[0] = last.into();
        let err = ValidBundle::validate(bundle(trailing), chain, 10).unwrap_err();
        prop_assert_eq!(err.code, "invalid_transaction");

        let mut truncated = txs;
        let cut = truncated[0].len() - 1;
        truncated[0] = truncated[0].slice(..cut);
        prop_assert!(ValidBundle::validate(bundle(truncated), chain, 10).is_err());
    }

    #[test]
    fn mutated_transactions_are_refused_or_still_consistent(
        spec in tx_spec(), key in key(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let mut raw = sign(&spec, &key).to_vec();
        for &(pos, byte) in &edits {
            let i = pos % raw.len();
            raw[i] = byte;
        }
        let raw = Bytes::from(raw);
        // Whatever is accepted is self-consistent: its hash, and a sender recovered from it.
        for chain in [spec.chain_id, 1] {
            if let Ok(valid) = ValidBundle::validate(bundle(vec![raw.clone()]), chain, 10) {
                prop_assert_eq!(valid.tx_hashes[0], keccak256(&raw));
                let env = <TxEnvelope as alloy::eips::Decodable2718>::decode_2718(&mut raw.as_ref()).unwrap();
                prop_assert_eq!(alloy::consensus::Transaction::chain_id(&env), Some(chain));
                prop_assert_eq!(
                    alloy::consensus::transaction::SignerRecoverable::recover_signer(&env).unwrap(),
                    valid.tx_meta[0].sender
                );
            }
        }
    }
}
