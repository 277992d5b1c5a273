//! Property tests of the signer API's request decoding (the same decoders as the fuzz target
//! `sign_request`, fuzz/src/lib.rs): quantities and amounts round-trip and refuse what is out of
//! range; any well-typed `UnsignedTx` round-trips through JSON and `to_typed` follows the type
//! rules exactly, never truncating a value; mutated valid bodies parse or are refused, never panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use alloy::consensus::{Transaction, TypedTransaction};
use alloy::eips::eip2930::{AccessList, AccessListItem};
use alloy::primitives::{Address, B256, Bytes, U256};
use castellan_api::signer::{
    BundleTx, CheckedAddress, SignBundleRequest, SignMessageRequest, SignTransactionRequest,
    UnsignedTx, parse_address,
};
use castellan_api::submitter::{Quantity, RelaySelection, Wei};
use proptest::prelude::*;

const VALID_TX: &str = r#"{"tx":{"type":"0x2","chainId":"0x7a69","nonce":"7","to":"0x70997970C51812dc3A010C7d01b50e0d17dc79C8","value":"1000","input":"0xa9059cbb","gas":"21000","maxFeePerGas":"0x3b9aca00","maxPriorityFeePerGas":"1","accessList":[{"address":"0x3c44cdddb6a900fa2b585dd299e03d12fa4293bc","storageKeys":["0x0000000000000000000000000000000000000000000000000000000000000001"]}]}}"#;

const VALID_BUNDLE: &str = r#"{"bundleId":"8f14e45f-ceea-467f-a0e6-b2f5d6c1a2b3","txs":[{"tx":{"chainId":"31337","nonce":"1","gas":"21000","gasPrice":"10"}},{"signed":"0x02f86b0180843b9aca00852ecc889a0082520894c87037874aed04e51c29f582394217a0a2b89d808080c080a0a463985c616dd8ee17d7ef9112af4e6e06a27b071525b42182fe7b0b5c8b4925a00af5ca177ffef2ff28449292505d41be578bebb77110dfc09361d2fb56998260"}],"targetBlock":"0x10","lastBlock":"0x12","relays":{"mode":"weighted","max":2},"simulate":true}"#;

fn any_u256() -> impl Strategy<Value = U256> {
    prop_oneof![
        any::<u64>().prop_map(U256::from),
        any::<u128>().prop_map(U256::from),
        any::<[u8; 32]>().prop_map(U256::from_be_bytes),
        Just(U256::MAX),
        Just(U256::from(u128::MAX)),
        Just(U256::from(u128::MAX) + U256::from(1)),
    ]
}

fn any_wei() -> impl Strategy<Value = Option<Wei>> {
    proptest::option::of(any_u256().prop_map(Wei))
}

fn access_list() -> impl Strategy<Value = AccessList> {
    proptest::collection::vec(
        (
            any::<[u8; 20]>(),
            proptest::collection::vec(any::<[u8; 32]>(), 0..3),
        )
            .prop_map(|(a, keys)| AccessListItem {
                address: Address::from(a),
                storage_keys: keys.into_iter().map(B256::from).collect(),
            }),
        0..3,
    )
    .prop_map(AccessList)
}

prop_compose! {
    /// Any well-typed unsigned transaction, including shapes `to_typed` must refuse.
    fn unsigned_tx()(
        tx_type in proptest::option::of(prop_oneof![Just(0u64), Just(1), Just(2), Just(3), Just(4), any::<u64>()]),
        chain_id in any::<u64>(),
        nonce in any::<u64>(),
        to in proptest::option::of(any::<[u8; 20]>()),
        value in any_wei(),
        input in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        gas in any::<u64>(),
        max_fee_per_gas in any_wei(),
        max_priority_fee_per_gas in any_wei(),
        gas_price in any_wei(),
        access_list in proptest::option::of(access_list()),
    ) -> UnsignedTx {
        UnsignedTx {
            tx_type: tx_type.map(Quantity),
            chain_id: Quantity(chain_id),
            nonce: Quantity(nonce),
            to: to.map(|a| CheckedAddress(Address::from(a))),
            value,
            input: input.map(Bytes::from),
            gas: Quantity(gas),
            max_fee_per_gas,
            max_priority_fee_per_gas,
            gas_price,
            access_list,
        }
    }
}

/// The fee in `w` as `to_typed` must carry it: present and at most 2^128 − 1.
fn fits(w: Option<Wei>) -> bool {
    w.is_some_and(|w| w.0 <= U256::from(u128::MAX))
}

/// An independent statement of the type rules of `UnsignedTx::to_typed`.
fn model_accepts(u: &UnsignedTx) -> bool {
    let ty = match u.tx_type {
        Some(Quantity(t)) => t,
        None if u.max_fee_per_gas.is_some() || u.max_priority_fee_per_gas.is_some() => 2,
        None if u.access_list.is_some() => 1,
        None => 0,
    };
    match ty {
        2 => u.gas_price.is_none() && fits(u.max_fee_per_gas) && fits(u.max_priority_fee_per_gas),
        1 => {
            u.max_fee_per_gas.is_none() && u.max_priority_fee_per_gas.is_none() && fits(u.gas_price)
        }
        0 => {
            u.max_fee_per_gas.is_none()
                && u.max_priority_fee_per_gas.is_none()
                && u.access_list.is_none()
                && fits(u.gas_price)
        }
        _ => false,
    }
}

/// Random byte edits of `text`: replace, insert or delete at random places.
fn mutate(text: &str, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut b = text.as_bytes().to_vec();
    for &(pos, op, byte) in edits {
        if b.is_empty() {
            b.push(byte);
            continue;
        }
        let i = pos % b.len();
        match op % 3 {
            0 => b[i] = byte,
            1 => b.insert(i, byte),
            _ => {
                b.remove(i);
            }
        }
    }
    b
}

/// Bytes that JSON strings in our bodies are made of, so mutations stay near-valid.
fn json_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        proptest::sample::select(b"0123456789abcdefxX\"{}[],: -+.eE\\n".to_vec()),
        any::<u8>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn quantities_round_trip_in_both_notations(n in any::<u64>()) {
        let json = serde_json::to_string(&Quantity(n)).unwrap();
        prop_assert_eq!(&json, &format!("\"{n:#x}\""));
        prop_assert_eq!(serde_json::from_str::<Quantity>(&json).unwrap(), Quantity(n));
        prop_assert_eq!(n.to_string().parse::<Quantity>().unwrap(), Quantity(n));
        prop_assert_eq!(format!("0x{n:016x}").parse::<Quantity>().unwrap(), Quantity(n));
        // A JSON number is never a quantity.
        prop_assert!(serde_json::from_str::<Quantity>(&n.to_string()).is_err());
    }

    #[test]
    fn quantities_above_u64_are_refused(extra in 1u128..=u128::from(u64::MAX)) {
        let big = u128::from(u64::MAX) + extra;
        let (dec, hex) = (big.to_string(), format!("{big:#x}"));
        prop_assert!(dec.parse::<Quantity>().is_err());
        prop_assert!(hex.parse::<Quantity>().is_err());
    }

    #[test]
    fn any_string_that_parses_is_a_plain_hex_or_decimal_number(s in "(0x)?[0-9a-fA-F+_ -]{0,20}") {
        if let Ok(Quantity(v)) = s.parse::<Quantity>() {
            match s.strip_prefix("0x") {
                Some(h) => {
                    prop_assert!(h.bytes().all(|b| b.is_ascii_hexdigit()), "{s:?} accepted");
                    prop_assert_eq!(u64::from_str_radix(h, 16).unwrap(), v);
                }
                None => {
                    prop_assert!(s.bytes().all(|b| b.is_ascii_digit()), "{s:?} accepted");
                    prop_assert_eq!(s.parse::<u64>().unwrap(), v);
                }
            }
        }
        if let Ok(Wei(v)) = s.parse::<Wei>() {
            match s.strip_prefix("0x") {
                Some(h) => {
                    prop_assert!(h.bytes().all(|b| b.is_ascii_hexdigit()), "{s:?} accepted as wei");
                    prop_assert_eq!(U256::from_str_radix(h, 16).unwrap(), v);
                }
                None => prop_assert!(s.bytes().all(|b| b.is_ascii_digit()), "{s:?} accepted as wei"),
            }
        }
    }

    #[test]
    fn wei_round_trips_and_refuses_257_bits(v in any_u256(), shift in 0usize..8) {
        let json = serde_json::to_string(&Wei(v)).unwrap();
        prop_assert_eq!(serde_json::from_str::<Wei>(&json).unwrap(), Wei(v));
        prop_assert_eq!(v.to_string().parse::<Wei>().unwrap(), Wei(v));
        // 2^256 · (1 + shift) in hex: 65+ hex digits with a non-zero top digit.
        let over = format!("0x{:x}{}", shift + 1, "0".repeat(64));
        prop_assert!(over.parse::<Wei>().is_err());
        let over_dec = format!("{}{}", U256::MAX, shift);
        prop_assert!(over_dec.parse::<Wei>().is_err());
    }

    #[test]
    fn addresses_checksum_lower_and_one_flipped_letter(bytes in any::<[u8; 20]>(), pick in any::<usize>()) {
        let a = Address::from(bytes);
        let checksummed = a.to_checksum(None);
        prop_assert_eq!(parse_address(&checksummed).unwrap(), a);
        prop_assert_eq!(parse_address(&checksummed.to_lowercase()).unwrap(), a);
        let letters: Vec<usize> = checksummed
            .char_indices()
            .skip(2)
            .filter(|(_, c)| c.is_ascii_alphabetic())
            .map(|(i, _)| i)
            .collect();
        if !letters.is_empty() {
            let i = letters[pick % letters.len()];
            let mut flipped = checksummed.clone().into_bytes();
            flipped[i] ^= 0x20;
            let flipped = String::from_utf8(flipped).unwrap();
            let hex = &flipped[2..];
            let single_case = !hex.bytes().any(|b| b.is_ascii_lowercase())
                || !hex.bytes().any(|b| b.is_ascii_uppercase());
            match parse_address(&flipped) {
                // Only when the flip leaves one case throughout is there no checksum to break.
                Ok(parsed) => prop_assert!(single_case && parsed == a, "{flipped} accepted"),
                Err(e) => prop_assert!(e.contains("checksum"), "{e}"),
            }
        }
    }

    #[test]
    fn unsigned_tx_round_trips_and_to_typed_follows_the_type_rules(u in unsigned_tx()) {
        let body = SignTransactionRequest { tx: u.clone() };
        let json = serde_json::to_string(&body).unwrap();
        let back: SignTransactionRequest = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &body);

        let typed = u.to_typed();
        prop_assert_eq!(typed.is_ok(), model_accepts(&u), "{:?}", typed);
        match typed {
            Ok(tx) => {
                prop_assert_eq!(tx.chain_id(), Some(u.chain_id.0));
                prop_assert_eq!(tx.nonce(), u.nonce.0);
                prop_assert_eq!(tx.gas_limit(), u.gas.0);
                prop_assert_eq!(tx.value(), u.value.map(|w| w.0).unwrap_or_default());
                prop_assert_eq!(tx.to(), u.to.map(|a| a.0));
                prop_assert_eq!(tx.input(), &u.input.clone().unwrap_or_default());
                match &tx {
                    TypedTransaction::Legacy(t) => {
                        prop_assert_eq!(Some(U256::from(t.gas_price)), u.gas_price.map(|w| w.0));
                    }
                    TypedTransaction::Eip2930(t) => {
                        prop_assert_eq!(Some(U256::from(t.gas_price)), u.gas_price.map(|w| w.0));
                        prop_assert_eq!(&t.access_list, &u.access_list.clone().unwrap_or_default());
                    }
                    TypedTransaction::Eip1559(t) => {
                        prop_assert_eq!(Some(U256::from(t.max_fee_per_gas)), u.max_fee_per_gas.map(|w| w.0));
                        prop_assert_eq!(
                            Some(U256::from(t.max_priority_fee_per_gas)),
                            u.max_priority_fee_per_gas.map(|w| w.0)
                        );
                    }
                    other => prop_assert!(false, "unsupported type built: {other:?}"),
                }
            }
            Err(e) => prop_assert!(!e.0.is_empty()),
        }
    }

    #[test]
    fn json_numbers_for_quantities_are_refused(n in any::<u64>(), field in 0usize..3) {
        let mut fields = [format!("\"{n}\""), format!("\"{n}\""), format!("\"{n}\"")];
        fields[field] = n.to_string();
        let json = format!(
            r#"{{"tx":{{"chainId":{},"nonce":{},"gas":{},"gasPrice":"1"}}}}"#,
            fields[0], fields[1], fields[2]
        );
        prop_assert!(serde_json::from_str::<SignTransactionRequest>(&json).is_err());
    }

    #[test]
    fn mutated_transaction_bodies_parse_or_are_refused(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), json_byte()), 1..6)
    ) {
        let body = mutate(VALID_TX, &edits);
        if let Ok(req) = serde_json::from_slice::<SignTransactionRequest>(&body) {
            let json = serde_json::to_string(&req).unwrap();
            prop_assert_eq!(serde_json::from_str::<SignTransactionRequest>(&json).unwrap(), req.clone());
            if let Ok(tx) = req.tx.to_typed() {
                prop_assert_eq!(tx.chain_id(), Some(req.tx.chain_id.0));
                prop_assert_eq!(tx.nonce(), req.tx.nonce.0);
            }
        }
    }

    #[test]
    fn mutated_bundle_bodies_parse_or_are_refused(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), json_byte()), 1..6)
    ) {
        let body = mutate(VALID_BUNDLE, &edits);
        if let Ok(req) = serde_json::from_slice::<SignBundleRequest>(&body) {
            let json = serde_json::to_string(&req).unwrap();
            prop_assert_eq!(serde_json::from_str::<SignBundleRequest>(&json).unwrap(), req.clone());
            for t in &req.txs {
                if let Some(u) = &t.tx {
                    prop_assert_eq!(u.to_typed().is_ok(), model_accepts(u));
                }
            }
        }
    }

    #[test]
    fn bundle_requests_round_trip(
        txs in proptest::collection::vec(
            prop_oneof![
                unsigned_tx().prop_map(|u| BundleTx { tx: Some(u), signed: None }),
                proptest::collection::vec(any::<u8>(), 0..64)
                    .prop_map(|b| BundleTx { tx: None, signed: Some(Bytes::from(b)) }),
            ],
            0..4,
        ),
        target in any::<u64>(),
        last in proptest::option::of(any::<u64>()),
        id in proptest::option::of(any::<u128>()),
        named in proptest::option::of(proptest::collection::vec("[a-z]{1,8}", 0..3)),
        simulate in any::<bool>(),
    ) {
        let req = SignBundleRequest {
            bundle_id: id.map(uuid::Uuid::from_u128),
            txs,
            target_block: Quantity(target),
            last_block: last.map(Quantity),
            min_timestamp: None,
            max_timestamp: Some(Quantity(target)),
            reverting_tx_hashes: vec![B256::repeat_byte(7)],
            replacement_uuid: None,
            relays: named.map_or(RelaySelection::All, |relays| RelaySelection::Named { relays }),
            simulate,
        };
        let json = serde_json::to_string(&req).unwrap();
        prop_assert_eq!(serde_json::from_str::<SignBundleRequest>(&json).unwrap(), req);
    }

    #[test]
    fn message_requests_need_exactly_one_form(
        message in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        text in proptest::option::of(".{0,32}"),
    ) {
        let req = SignMessageRequest { message: message.clone().map(Bytes::from), text: text.clone() };
        let json = serde_json::to_string(&req).unwrap();
        prop_assert_eq!(serde_json::from_str::<SignMessageRequest>(&json).unwrap(), req.clone());
        match (message, text) {
            (Some(m), None) => prop_assert_eq!(req.bytes().unwrap(), m),
            (None, Some(t)) => prop_assert_eq!(req.bytes().unwrap(), t.into_bytes()),
            _ => prop_assert!(req.bytes().is_err()),
        }
    }
}
