//! Property tests of the policy file's parsing and compilation (`Policy::from_toml`, the amount
//! and duration parsers; the same decoders as the fuzz target `policy_file`, fuzz/src/lib.rs):
//! amounts and durations in every notation parse to the same value and refuse overflow, negative
//! and fractional wei; a policy's hash and canonical form do not depend on how it is written and
//! change with its content; mutated policy files load or are refused with a reason, never panic,
//! and whatever loads denies everything while frozen.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use alloy::primitives::U256;
use castellan_policy::{Context, MemoryLimits, Policy, RequestKind, parse_amount, parse_duration};
use common::*;
use proptest::prelude::*;

const NOW: u64 = 1_800_000_000;

fn any_u256() -> impl Strategy<Value = U256> {
    prop_oneof![
        any::<u64>().prop_map(U256::from),
        any::<u128>().prop_map(U256::from),
        any::<[u8; 32]>().prop_map(U256::from_be_bytes),
        Just(U256::MAX),
    ]
}

/// `digits` with `_` every three digits from the right, as people write large numbers.
fn grouped(digits: &str) -> String {
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('_');
        }
        out.push(c);
    }
    out
}

/// `v` wei written in one of several notations (all meaning exactly `v`).
fn notation(v: U256, style: u8) -> String {
    let gwei = U256::from(1_000_000_000u64);
    let ether = gwei * gwei;
    let decimal = |unit: U256, decimals: usize, name: &str| {
        let (int, frac) = (v / unit, v % unit);
        let frac = format!("{frac:0>decimals$}");
        let frac = frac.trim_end_matches('0');
        if frac.is_empty() {
            format!("{int} {name}")
        } else {
            format!("{int}.{frac} {name}")
        }
    };
    match style % 5 {
        0 => v.to_string(),
        1 => format!("{v} wei"),
        2 => grouped(&v.to_string()),
        3 => decimal(gwei, 9, "gwei"),
        _ => decimal(ether, 18, "ether"),
    }
}

/// A TOML value for `v` wei: a bare integer when it fits TOML's i64, else a string.
fn toml_amount(v: U256, style: u8) -> String {
    match i64::try_from(v) {
        Ok(n) if style % 6 == 5 => n.to_string(),
        _ => format!("\"{}\"", notation(v, style)),
    }
}

/// `secs` seconds written with the largest unit that divides it, or in seconds.
fn duration(secs: u64, style: u8) -> String {
    let units = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let fitting: Vec<_> = units
        .iter()
        .filter(|(m, _)| secs.is_multiple_of(*m))
        .collect();
    let (m, u) = fitting[usize::from(style) % fitting.len()];
    format!("\"{}{u}\"", secs / m)
}

#[derive(Clone, Debug)]
struct KeySpec {
    chain_ids: Vec<u64>,
    max_value: U256,
    max_cost: U256,
    window: u64,
    window_max: U256,
    rate: u32,
}

fn key_spec() -> impl Strategy<Value = KeySpec> {
    (
        proptest::collection::btree_set(1u64..100_000, 1..4),
        any_u256(),
        any_u256(),
        prop_oneof![Just(60u64), Just(3600), Just(86_400), 1u64..1_000_000],
        any_u256(),
        1u32..1000,
    )
        .prop_map(
            |(chains, max_value, max_cost, window, window_max, rate)| KeySpec {
                chain_ids: chains.into_iter().collect(),
                max_value,
                max_cost,
                window,
                window_max,
                rate,
            },
        )
}

/// The policy of `keys`, written in the notation chosen by `style` (and lists in reverse order
/// when `reverse`).
fn render(keys: &[KeySpec], style: u8, reverse: bool) -> String {
    let mut out = String::from("[approval_domain]\nchain_id = 1\n");
    for (i, k) in keys.iter().enumerate() {
        let s = style.wrapping_add(u8::try_from(i).unwrap());
        let mut chains = k.chain_ids.clone();
        if reverse {
            chains.reverse();
        }
        let chains: Vec<String> = chains.iter().map(u64::to_string).collect();
        out += &format!(
            "\n[[keys]]\nname = \"k{i}\"\nchain_ids = [{}]\nmax_value = {}\nmax_cost = {}\n\
             velocity = [{{ window = {}, max_value = {} }}]\nrate = [{{ window = {}, max_requests = {} }}]\n",
            chains.join(", "),
            toml_amount(k.max_value, s),
            toml_amount(k.max_cost, s.wrapping_add(1)),
            duration(k.window, s),
            toml_amount(k.window_max, s.wrapping_add(2)),
            duration(k.window, s.wrapping_add(1)),
            k.rate,
        );
    }
    out += "\n[[clients]]\nidentity = \"c\"\nkeys = [\"*\"]\n";
    out
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

fn toml_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        proptest::sample::select(b"0123456789.\"[]{}=,_ -\nsmhdweigtr#".to_vec()),
        any::<u8>(),
    ]
}

fn kinds() -> Vec<RequestKind> {
    vec![
        RequestKind::Transaction(tx(addr(1), U256::from(1))),
        RequestKind::Bundle(vec![tx(addr(1), U256::ZERO), tx(addr(2), ether(1))]),
        RequestKind::PersonalMessage(b"hi".to_vec()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn amounts_in_every_notation_parse_to_the_same_wei(v in any_u256(), style in any::<u8>()) {
        let text = notation(v, style);
        prop_assert_eq!(parse_amount(&text), Ok(v), "{}", text);
    }

    #[test]
    fn amounts_past_256_bits_negative_or_fractional_wei_are_refused(
        v in any_u256(), extra in 1u8..10, digits in 1usize..6,
    ) {
        // v × 10 + extra overflows whenever v > (2^256 − 1 − extra) / 10.
        let over = format!("{v}{extra}");
        let fits = v.checked_mul(U256::from(10)).and_then(|x| x.checked_add(U256::from(extra)));
        prop_assert_eq!(parse_amount(&over).ok(), fits);
        if v > U256::ZERO {
            let negative = format!("-{v}");
            prop_assert!(parse_amount(&negative).is_err());
        }
        // One digit past the unit's decimals is not a whole number of wei.
        let tiny = format!("0.{}{extra} gwei", "0".repeat(9 + digits - 1));
        prop_assert!(parse_amount(&tiny).unwrap_err().contains("whole number of wei"), "{}", tiny);
        let tiny = format!("1.{}{extra}", "0".repeat(digits - 1));
        prop_assert!(parse_amount(&tiny).is_err(), "{}", tiny);
        let wei_max_ether = format!("{} ether", U256::MAX / U256::from(10u64).pow(U256::from(18)) + U256::from(1));
        prop_assert!(parse_amount(&wei_max_ether).unwrap_err().contains("256 bits"));
    }

    #[test]
    fn any_amount_text_parses_or_is_refused(s in "[0-9._ a-z-]{0,40}") {
        if let Ok(v) = parse_amount(&s) {
            // What parses is digits, underscores, at most one point and a known unit.
            let unit = s.trim().trim_start_matches(|c: char| c.is_ascii_digit() || c == '_' || c == '.').trim();
            prop_assert!(["", "wei", "gwei", "ether"].contains(&unit), "{:?} -> {}", s, v);
        }
    }

    #[test]
    fn durations_in_every_unit(n in any::<u64>(), unit in 0usize..4) {
        let (mult, u) = [(1u64, "s"), (60, "m"), (3600, "h"), (86_400, "d")][unit];
        let parsed = parse_duration(&format!("{n}{u}"));
        match n.checked_mul(mult) {
            Some(0) => prop_assert!(parsed.unwrap_err().contains("positive")),
            Some(secs) => prop_assert_eq!(parsed, Ok(secs)),
            None => prop_assert!(parsed.unwrap_err().contains("too large")),
        }
        prop_assert!(parse_duration(&n.to_string()).is_err(), "a duration needs a unit");
    }

    #[test]
    fn the_hash_does_not_depend_on_notation_but_on_content(
        keys in proptest::collection::vec(key_spec(), 1..4),
        a in any::<u8>(), b in any::<u8>(), reverse in any::<bool>(),
        pick in any::<usize>(),
    ) {
        let first = render(&keys, a, false);
        let second = render(&keys, b, reverse);
        let p1 = Policy::from_toml(&first).map_err(|e| TestCaseError::fail(format!("{e}\n{first}")))?;
        let p2 = Policy::from_toml(&second).map_err(|e| TestCaseError::fail(format!("{e}\n{second}")))?;
        prop_assert_eq!(p1.canonical_form(), p2.canonical_form());
        prop_assert_eq!(p1.hash(), p2.hash());
        prop_assert_eq!(p1.hash(), alloy::primitives::keccak256(p1.canonical_form()));

        // One amount different by one wei: another policy, another hash.
        let mut changed = keys.clone();
        let i = pick % changed.len();
        changed[i].max_value = if changed[i].max_value == U256::MAX {
            U256::ZERO
        } else {
            changed[i].max_value + U256::from(1)
        };
        let p3 = Policy::from_toml(&render(&changed, a, false)).unwrap();
        prop_assert_ne!(p3.hash(), p1.hash());
    }

    #[test]
    fn mutated_policy_files_load_or_are_refused(
        keys in proptest::collection::vec(key_spec(), 1..3),
        style in any::<u8>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), toml_byte()), 1..6),
    ) {
        let text = render(&keys, style, false);
        let bytes = mutate(&text, &edits);
        let Ok(src) = std::str::from_utf8(&bytes) else { return Ok(()); };
        match Policy::from_toml(src) {
            Ok(policy) => {
                prop_assert_eq!(Policy::from_toml(src).unwrap().hash(), policy.hash());
                let limits = MemoryLimits::new();
                for i in 0..keys.len() {
                    for kind in kinds() {
                        let req = request(&format!("k{i}"), "c", kind);
                        let _ = policy.evaluate(&req, &Context::new(NOW, &limits));
                        let frozen = Context { frozen: true, ..Context::new(NOW, &limits) };
                        prop_assert!(!policy.evaluate(&req, &frozen).is_allowed());
                    }
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}
