//! Property tests of EIP-712 typed-data parsing and hashing (`castellan_signer::eth`, the same
//! decoder as the fuzz target `typed_data`, fuzz/src/lib.rs): generated typed data parses, its
//! digest survives serialization and the API route's `serde_json::Value` path, depends on every
//! value; integers one past their type's range are refused; the chain guard accepts exactly its
//! own chain; mutated valid typed data parses or is refused with `malformed_typed_data`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use alloy::primitives::U256;
use castellan_api::signer::SignTypedDataRequest;
use castellan_signer::eth::{ChainGuard, parse_typed_data};
use proptest::prelude::*;
use serde_json::{Value, json};

const CHAIN: u64 = 31337;

const MAIL_JSON: &str = r#"{"types":{"EIP712Domain":[{"name":"name","type":"string"},{"name":"version","type":"string"},{"name":"chainId","type":"uint256"},{"name":"verifyingContract","type":"address"}],"Person":[{"name":"name","type":"string"},{"name":"wallet","type":"address"}],"Mail":[{"name":"from","type":"Person"},{"name":"to","type":"Person"},{"name":"contents","type":"string"}]},"primaryType":"Mail","domain":{"name":"Ether Mail","version":"1","chainId":31337,"verifyingContract":"0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC"},"message":{"from":{"name":"Cow","wallet":"0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},"to":{"name":"Bob","wallet":"0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"},"contents":"Hello, Bob!"}}"#;

const BITS: [usize; 6] = [8, 16, 32, 64, 128, 256];

/// One field of the generated struct: its Solidity type and a JSON value in range.
fn field() -> impl Strategy<Value = (String, Value)> {
    prop_oneof![
        (0..BITS.len(), any::<[u8; 32]>(), 0u8..3).prop_map(|(b, raw, form)| {
            let bits = BITS[b];
            let v = U256::from_be_bytes(raw) >> (256 - bits);
            let value = match form {
                0 => json!(v.to_string()),
                1 => json!(format!("{v:#x}")),
                _ => match u64::try_from(v) {
                    Ok(n) => json!(n),
                    Err(_) => json!(v.to_string()),
                },
            };
            (format!("uint{bits}"), value)
        }),
        (0..BITS.len() - 1, any::<i128>(), any::<bool>()).prop_map(|(b, raw, as_number)| {
            let bits = BITS[b];
            // Any value of intN (N ≤ 128): the low N bits, sign-extended.
            let v = (raw << (128 - bits)) >> (128 - bits);
            let value = match i64::try_from(v) {
                Ok(n) if as_number => json!(n),
                _ => json!(v.to_string()),
            };
            (format!("int{bits}"), value)
        }),
        any::<[u8; 20]>().prop_map(|a| ("address".into(), json!(format!("0x{}", hex::encode(a))))),
        any::<bool>().prop_map(|b| ("bool".into(), json!(b))),
        any::<[u8; 32]>().prop_map(|b| ("bytes32".into(), json!(format!("0x{}", hex::encode(b))))),
        proptest::collection::vec(any::<u8>(), 0..48)
            .prop_map(|b| ("bytes".into(), json!(format!("0x{}", hex::encode(b))))),
        ".{0,24}".prop_map(|s| ("string".into(), json!(s))),
        proptest::collection::vec(any::<u32>(), 0..4).prop_map(|v| ("uint32[]".into(), json!(v))),
    ]
}

/// Typed data with one struct `Order` of the given fields and an optional domain chain id.
fn typed(fields: &[(String, Value)], chain_id: Option<Value>) -> Value {
    let mut domain_types = vec![json!({"name": "name", "type": "string"})];
    let mut domain = json!({"name": "Castellan"});
    if let Some(id) = chain_id {
        domain_types.push(json!({"name": "chainId", "type": "uint256"}));
        domain["chainId"] = id;
    }
    let types: Vec<Value> = fields
        .iter()
        .enumerate()
        .map(|(i, (ty, _))| json!({"name": format!("f{i}"), "type": ty}))
        .collect();
    let message: serde_json::Map<String, Value> = fields
        .iter()
        .enumerate()
        .map(|(i, (_, v))| (format!("f{i}"), v.clone()))
        .collect();
    json!({
        "types": {"EIP712Domain": domain_types, "Order": types},
        "primaryType": "Order",
        "domain": domain,
        "message": message,
    })
}

/// The integer `v` (a JSON number, decimal or `0x`-hex string) with its lowest bit toggled.
fn toggle_low_bit(v: &Value) -> Value {
    match v {
        Value::Number(n) => match n.as_u64() {
            Some(u) => json!(u ^ 1),
            None => json!(n.as_i64().unwrap() ^ 1),
        },
        Value::String(s) => match s.strip_prefix("0x") {
            Some(h) => json!(format!(
                "{:#x}",
                U256::from_str_radix(h, 16).unwrap() ^ U256::from(1)
            )),
            None => match s.parse::<i128>() {
                Ok(i) => json!((i ^ 1).to_string()),
                Err(_) => json!((s.parse::<U256>().unwrap() ^ U256::from(1)).to_string()),
            },
        },
        other => panic!("not an integer: {other}"),
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn generated_typed_data_parses_and_its_digest_is_stable(
        fields in proptest::collection::vec(field(), 1..6),
    ) {
        let text = typed(&fields, Some(json!(CHAIN))).to_string();
        let data = parse_typed_data(&text).unwrap();
        let digest = data.eip712_signing_hash().unwrap();
        // Serialized and parsed again.
        let again = parse_typed_data(&serde_json::to_string(&data).unwrap()).unwrap();
        prop_assert_eq!(again.eip712_signing_hash().unwrap(), digest);
        // Through the API body, as the route hands it on.
        let body: SignTypedDataRequest =
            serde_json::from_str(&format!("{{\"typedData\":{text}}}")).unwrap();
        let routed = parse_typed_data(&body.typed_data.to_string()).unwrap();
        prop_assert_eq!(routed.eip712_signing_hash().unwrap(), digest);
        prop_assert!(ChainGuard::new(CHAIN).check_typed_data(&data).is_ok());
    }

    #[test]
    fn the_digest_depends_on_every_value(
        fields in proptest::collection::vec(field(), 1..5),
        pick in any::<usize>(),
    ) {
        let base = parse_typed_data(&typed(&fields, None).to_string()).unwrap();
        let i = pick % fields.len();
        let mut changed = fields.clone();
        let (ty, v) = &fields[i];
        changed[i].1 = match ty.as_str() {
            "bool" => json!(!v.as_bool().unwrap()),
            "string" => json!(format!("{}x", v.as_str().unwrap())),
            "uint32[]" => {
                let mut a = v.as_array().unwrap().clone();
                a.push(json!(1));
                Value::Array(a)
            }
            "bytes" => json!(format!("{}00", v.as_str().unwrap())),
            "address" | "bytes32" => {
                // Flip the last hex digit.
                let s = v.as_str().unwrap();
                let last = if s.ends_with('0') { '1' } else { '0' };
                json!(format!("{}{last}", &s[..s.len() - 1]))
            }
            // An integer: toggle its lowest bit (stays in range for every width and sign).
            _ => toggle_low_bit(v),
        };
        let other = parse_typed_data(&typed(&changed, None).to_string()).unwrap();
        prop_assert_ne!(
            other.eip712_signing_hash().unwrap(),
            base.eip712_signing_hash().unwrap(),
            "field {} ({}) changed from {} to {}", i, ty, v, changed[i].1
        );
    }

    #[test]
    fn integers_one_past_their_range_are_refused(b in 0..BITS.len(), signed in any::<bool>(), above in any::<bool>()) {
        let bits = BITS[b];
        let value = if signed {
            // intN spans −2^(N−1) ..= 2^(N−1) − 1.
            let edge = U256::from(1) << (bits - 1);
            if above { edge.to_string() } else { format!("-{}", edge + U256::from(1)) }
        } else if bits == 256 {
            // 2^256: one past uint256.
            format!("0x1{}", "0".repeat(64))
        } else if above {
            (U256::from(1) << bits).to_string()
        } else {
            "-1".to_owned()
        };
        let ty = format!("{}int{bits}", if signed { "" } else { "u" });
        let text = typed(&[(ty.clone(), json!(value))], None).to_string();
        let err = parse_typed_data(&text).err();
        prop_assert!(err.is_some(), "{} = {} accepted", ty, value);
        prop_assert_eq!(err.unwrap().code(), "malformed_typed_data");
        // The edge itself is accepted.
        let edge = if signed {
            let e = U256::from(1) << (bits - 1);
            if above { (e - U256::from(1)).to_string() } else { format!("-{e}") }
        } else if above || bits == 256 {
            (U256::MAX >> (256 - bits)).to_string()
        } else {
            "0".to_owned()
        };
        let text = typed(&[(ty.clone(), json!(edge))], None).to_string();
        prop_assert!(parse_typed_data(&text).is_ok(), "{} = {} refused", ty, edge);
    }

    #[test]
    fn the_chain_guard_accepts_exactly_its_chain(id in prop_oneof![Just(CHAIN), Just(1u64), any::<u64>()], hex in any::<bool>()) {
        let v = if hex { json!(format!("{id:#x}")) } else { json!(id) };
        let data = parse_typed_data(&typed(&[("bool".into(), json!(true))], Some(v)).to_string()).unwrap();
        prop_assert_eq!(data.domain.chain_id, Some(U256::from(id)));
        let r = ChainGuard::new(CHAIN).check_typed_data(&data);
        prop_assert_eq!(r.is_ok(), id == CHAIN);
        if let Err(e) = r {
            prop_assert_eq!(e.code(), "chain_mismatch");
        }
    }

    #[test]
    fn mutated_typed_data_parses_or_is_refused(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6),
    ) {
        let bytes = mutate(MAIL_JSON, &edits);
        let Ok(text) = std::str::from_utf8(&bytes) else { return Ok(()); };
        match parse_typed_data(text) {
            Ok(data) => {
                let digest = data.eip712_signing_hash().unwrap();
                let again = parse_typed_data(&serde_json::to_string(&data).unwrap()).unwrap();
                prop_assert_eq!(again.eip712_signing_hash().unwrap(), digest);
            }
            Err(e) => prop_assert_eq!(e.code(), "malformed_typed_data"),
        }
    }
}
