//! Amounts, durations, addresses and selectors as written in the policy file.
//!
//! Each parses once, at load, into a typed value (`U256` wei, seconds, `Address`, `Selector`);
//! the messages name the offending text and what would have been accepted.

use std::fmt;

use alloy::primitives::{Address, Selector, U256, keccak256};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// The units an amount may carry. `eth` is deliberately absent: one spelling per unit keeps
/// `1 eth` vs `1 ether` typos from silently meaning something.
pub const AMOUNT_UNITS: &str = "wei, gwei or ether";

/// Parses an amount: a decimal number of wei (`"1000"`), or a decimal with a unit
/// (`"1.5 ether"`, `"30 gwei"`, `"21000 wei"`). Never negative, never fractional wei.
pub fn parse_amount(text: &str) -> Result<U256, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty amount".into());
    }
    if t.starts_with('-') {
        return Err(format!(
            "negative amount `{t}`: amounts are wei and cannot be negative"
        ));
    }
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = (t[..split].trim(), t[split..].trim());
    let decimals: usize = match unit {
        "" | "wei" => 0,
        "gwei" => 9,
        "ether" => 18,
        other => {
            return Err(format!(
                "unknown unit `{other}` in amount `{t}` (expected {AMOUNT_UNITS})"
            ));
        }
    };
    let number: String = number.chars().filter(|c| *c != '_').collect();
    let (int, frac) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number.as_str(), ""),
    };
    let digits_ok = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits_ok(int) || !digits_ok(frac) {
        return Err(format!(
            "`{t}` is not a decimal amount such as \"1.5 ether\""
        ));
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > decimals {
        return Err(format!("amount `{t}` is not a whole number of wei"));
    }
    let overflow = || format!("amount `{t}` does not fit in 256 bits");
    let scale = U256::from(10u8)
        .checked_pow(U256::from(decimals))
        .ok_or_else(overflow)?;
    let int_v = if int.is_empty() {
        U256::ZERO
    } else {
        U256::from_str_radix(int, 10).map_err(|_| overflow())?
    };
    let frac_v = if frac.is_empty() {
        U256::ZERO
    } else {
        let f = U256::from_str_radix(frac, 10).map_err(|_| overflow())?;
        let pad = U256::from(10u8)
            .checked_pow(U256::from(decimals - frac.len()))
            .ok_or_else(overflow)?;
        f.checked_mul(pad).ok_or_else(overflow)?
    };
    int_v
        .checked_mul(scale)
        .and_then(|v| v.checked_add(frac_v))
        .ok_or_else(overflow)
}

/// Parses a duration with a unit: `"90s"`, `"1m"`, `"1h"`, `"24h"`, `"7d"`. Returns seconds (> 0).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim());
    if number.is_empty() {
        return Err(format!(
            "`{t}` is not a duration such as \"90s\", \"1h\" or \"7d\""
        ));
    }
    let mult: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "" => {
            return Err(format!(
                "duration `{t}` needs a unit (s, m, h or d), e.g. \"{t}s\""
            ));
        }
        other => {
            return Err(format!(
                "unknown unit `{other}` in duration `{t}` (expected s, m, h or d)"
            ));
        }
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("duration `{t}` is too large"))?;
    let secs = n
        .checked_mul(mult)
        .ok_or_else(|| format!("duration `{t}` is too large"))?;
    if secs == 0 {
        return Err(format!("duration `{t}` must be positive"));
    }
    Ok(secs)
}

/// Parses an address; mixed-case input must carry a valid EIP-55 checksum.
pub fn parse_address(text: &str) -> Result<Address, String> {
    let t = text.trim();
    let hex = t.strip_prefix("0x").unwrap_or(t);
    let mixed =
        hex.chars().any(|c| c.is_ascii_lowercase()) && hex.chars().any(|c| c.is_ascii_uppercase());

    if mixed {
        Address::parse_checksummed(t, None).map_err(|e| format!("invalid address `{t}`: {e}"))
    } else {
        t.parse::<Address>()
            .map_err(|e| format!("invalid address `{t}`: {e}"))
    }
}

/// Parses a function selector: 4 bytes of hex (`"0xa9059cbb"`) or a canonical Solidity
/// signature (`"transfer(address,uint256)"`), hashed with keccak256 as the ABI does.
pub fn parse_selector(text: &str) -> Result<Selector, String> {
    let t = text.trim();
    if let Some(hex) = t.strip_prefix("0x") {
        if hex.len() != 8 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "selector `{t}` must be 4 bytes of hex such as \"0xa9059cbb\""
            ));
        }
        return t
            .parse::<Selector>()
            .map_err(|e| format!("invalid selector `{t}`: {e}"));
    }
    let sig = canonical_signature(t)?;
    let h = keccak256(sig.as_bytes());
    Ok(Selector::from([h[0], h[1], h[2], h[3]]))
}

/// Checks a Solidity function signature and returns it without whitespace. Aliases
/// (`uint`, `int`) are refused rather than expanded: the selector hashes the exact text, and a
/// silently different hash would allow-list the wrong function.
fn canonical_signature(t: &str) -> Result<String, String> {
    let sig: String = t.chars().filter(|c| !c.is_whitespace()).collect();
    let bad = || {
        format!(
            "`{t}` is neither a 0x selector nor a signature such as \"transfer(address,uint256)\""
        )
    };
    let open = sig.find('(').ok_or_else(bad)?;
    let name = &sig[..open];
    let starts_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$');
    if !starts_ok
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
    {
        return Err(bad());
    }
    let params = &sig[open..];
    let mut depth = 0i32;
    for (i, c) in params.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 || (depth == 0 && i + 1 != params.len()) {
                    return Err(bad());
                }
            }
            c if c.is_ascii_alphanumeric() || c == ',' || c == '[' || c == ']' => {}
            _ => return Err(bad()),
        }
    }
    if depth != 0 {
        return Err(bad());
    }
    for ty in params.split(['(', ')', ',']) {
        let base = ty.split('[').next().unwrap_or("");
        if base == "uint" || base == "int" {
            return Err(format!(
                "signature `{t}` uses the alias `{base}`: write `{base}256`, selectors hash the canonical type"
            ));
        }
    }
    Ok(sig)
}

/// An amount from the policy file (wei). Serializes as a decimal string for the canonical form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Amount(pub U256);

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Amount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an amount: an integer number of wei or a string such as \"1.5 ether\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Amount, E> {
                if v < 0 {
                    return Err(E::custom(format!(
                        "negative amount `{v}`: amounts are wei and cannot be negative"
                    )));
                }
                Ok(Amount(U256::from(v.unsigned_abs())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Amount, E> {
                Ok(Amount(U256::from(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Amount, E> {
                Err(E::custom(format!(
                    "amount `{v}` is a float: write a string with a unit such as \"{v} ether\""
                )))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Amount, E> {
                parse_amount(v).map(Amount).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

/// A duration from the policy file, in seconds. Serializes as the number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Dur(pub u64);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"90s\", \"1h\" or \"7d\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "duration `{v}` needs a unit: write \"{v}s\""
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "duration `{v}` needs a unit: write \"{v}s\""
                )))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// An address from the policy file. Serializes lowercase for the canonical form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Addr(pub Address);

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_address(&s).map(Addr).map_err(de::Error::custom)
    }
}

impl Serialize for Addr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

/// A selector from the policy file (hex or signature). Serializes as `0x` + 8 hex digits, so a
/// signature and its selector hash the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Sel(pub Selector);

impl<'de> Deserialize<'de> for Sel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_selector(&s).map(Sel).map_err(de::Error::custom)
    }
}

impl Serialize for Sel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn amounts_table() {
        let e18 = U256::from(10u64).pow(U256::from(18));
        let cases: &[(&str, Result<U256, &str>)] = &[
            ("0", Ok(U256::ZERO)),
            ("1000", Ok(U256::from(1000))),
            ("1_000", Ok(U256::from(1000))),
            ("21000 wei", Ok(U256::from(21000))),
            ("30 gwei", Ok(U256::from(30_000_000_000u64))),
            ("30gwei", Ok(U256::from(30_000_000_000u64))),
            ("1.5 ether", Ok(e18 + e18 / U256::from(2))),
            ("0.000000001 gwei", Ok(U256::from(1))),
            ("0.0000000001 gwei", Err("not a whole number of wei")),
            ("1.0 wei", Ok(U256::from(1))),
            ("0.1 gwei", Ok(U256::from(100_000_000u64))),
            (".5 ether", Ok(e18 / U256::from(2))),
            ("1 ehter", Err("unknown unit `ehter`")),
            ("1 eth", Err("unknown unit `eth`")),
            ("-1 ether", Err("negative amount")),
            ("", Err("empty amount")),
            ("1.2.3 ether", Err("not a decimal amount")),
            ("abc", Err("unknown unit `abc`")),
            (
                "115792089237316195423570985008687907853269984665640564039457584007913129639936",
                Err("does not fit"),
            ),
            ("1e30 ether", Err("unknown unit `e30 ether`")),
        ];
        for (text, want) in cases {
            match (parse_amount(text), want) {
                (Ok(got), Ok(w)) => assert_eq!(got, *w, "{text}"),
                (Err(got), Err(w)) => assert!(got.contains(w), "{text}: {got}"),
                (got, w) => panic!("{text}: got {got:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn durations_table() {
        let cases: &[(&str, Result<u64, &str>)] = &[
            ("90s", Ok(90)),
            ("1m", Ok(60)),
            ("1h", Ok(3600)),
            ("24h", Ok(86_400)),
            ("7d", Ok(604_800)),
            ("0s", Err("must be positive")),
            ("5", Err("needs a unit")),
            ("5y", Err("unknown unit `y`")),
            ("h", Err("not a duration")),
            ("99999999999999999999d", Err("too large")),
        ];
        for (text, want) in cases {
            match (parse_duration(text), want) {
                (Ok(got), Ok(w)) => assert_eq!(got, *w, "{text}"),
                (Err(got), Err(w)) => assert!(got.contains(w), "{text}: {got}"),
                (got, w) => panic!("{text}: got {got:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn selectors_from_hex_and_signature_agree() {
        let a = parse_selector("0xa9059cbb").unwrap();
        let b = parse_selector("transfer(address, uint256)").unwrap();
        assert_eq!(a, b);
        let approve = parse_selector("approve(address,uint256)").unwrap();
        assert_eq!(format!("{approve:#x}"), "0x095ea7b3");
        assert!(
            parse_selector("transfer(address,uint)")
                .unwrap_err()
                .contains("uint256")
        );
        assert!(parse_selector("0xa9059c").unwrap_err().contains("4 bytes"));
        assert!(parse_selector("transfer").is_err());
        assert!(parse_selector("transfer(address").is_err());
        assert!(parse_selector("swap((address,uint256)[],bytes)").is_ok());
    }

    #[test]
    fn addresses_checksum_enforced_on_mixed_case() {
        let lower = "0xd8da6bf26964af9d7eed9e03e53415d37aa96045";
        let good = "0xd8dA6BF26964aF9D7eEd9e03E53415D37aA96045";
        let bad_case = "0xD8dA6BF26964aF9D7eEd9e03E53415D37aA96045";
        assert_eq!(parse_address(lower).unwrap(), parse_address(good).unwrap());
        assert!(
            parse_address(bad_case)
                .unwrap_err()
                .contains("invalid address")
        );
        assert!(parse_address("0x1234").is_err());
    }
}
