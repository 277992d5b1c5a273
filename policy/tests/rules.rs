//! Table-driven tests for every rule, at the exact boundary (limit − 1, limit, limit + 1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use alloy::primitives::{Address, B256, U256};
use castellan_policy::{
    Code, Context, Fee, KeyControl, KeyName, KeyStatus, MemoryLimits, Metric, Policy, Request,
    RequestKind, TxFacts, TxOutcome, TypedDataFacts, Verdict, WindowId, WindowScope,
};
use common::*;

const NOW: u64 = 1_800_000_000;

fn policy() -> Policy {
    let src = format!(
        r#"
[defaults]
chain_ids = [1]
deny_destinations = ["{dead}"]
breaker = {{ failures = 3, cooldown = "10m" }}
pause_cooldown = "15m"

[[keys]]
name = "searcher-hot"
chain_ids = [1, 10]
allow_destinations = ["{a}", "{b}", "{succ_other}"]
deny_destinations = ["{d}"]
max_value = "2 ether"
max_gas_limit = 1000000
max_fee_per_gas = "100 gwei"
max_priority_fee_per_gas = "5 gwei"
max_cost = "2.05 ether"
personal_sign = true
typed_data = true
typed_data_domains = [{{ name = "Permit2", chain_id = 1 }}]
selectors = [{{ to = "{b}", allow = ["transfer(address,uint256)"] }}]
velocity = [{{ window = "1h", max_value = "10 ether", max_cost = "12 ether" }}]
rate = [{{ window = "1m", max_requests = 3 }}]

[[keys]]
name = "plain"

[[keys]]
name = "deployer"
allow_contract_creation = true

[[keys]]
name = "relay"
relay_auth = true

[[clients]]
identity = "c1"
keys = ["searcher-hot", "plain", "deployer", "relay"]

[[clients]]
identity = "c2"
keys = ["*"]
max_value = "1 ether"
chain_ids = [1]
allow_destinations = ["{a}"]
personal_sign = false
rate = [{{ window = "10s", max_requests = 2 }}]
velocity = [{{ window = "1m", max_value = "1.5 ether" }}]

[approvers]
ops = ["{o1}", "{o2}"]

[[tiers]]
name = "watched"
approvers = "ops"
threshold = 1
keys = ["searcher-hot"]
clients = ["c1"]
destinations = ["{succ_other}"]
selectors = ["approve(address,uint256)"]

[[tiers]]
name = "big"
approvers = "ops"
threshold = 2
keys = ["plain"]
above_value = "1.5 ether"
"#,
        dead = hexaddr(0xde),
        a = hexaddr(0xa),
        b = hexaddr(0xb),
        d = hexaddr(0xd),
        succ_other = hexaddr(0x5),
        o1 = hexaddr(0xf1),
        o2 = hexaddr(0xf2),
    );
    Policy::from_toml(&src).unwrap()
}

fn eip1559(
    to: Option<Address>,
    value: U256,
    gas: u64,
    max_fee: U256,
    tip: U256,
    input: &[u8],
) -> TxFacts {
    TxFacts::new(
        1,
        to,
        value,
        gas,
        Fee::Eip1559 {
            max_fee_per_gas: max_fee,
            max_priority_fee_per_gas: tip,
        },
        input,
    )
}

fn one() -> U256 {
    U256::from(1)
}

fn transfer_call() -> Vec<u8> {
    let mut v = vec![0xa9, 0x05, 0x9c, 0xbb];
    v.extend([0u8; 64]);
    v
}

type Case = (&'static str, Request, Result<(), Code>);

fn hot(t: TxFacts) -> Request {
    tx_request("searcher-hot", "c1", t)
}

fn cases() -> Vec<Case> {
    let a = addr(0xa);
    let g = U256::from(GWEI);
    let cap_v = ether(2);
    let mut v = vec![
        // value cap (key): 2 ether
        ("value cap - 1", hot(tx(a, cap_v - one())), Ok(())),
        ("value cap", hot(tx(a, cap_v)), Ok(())),
        (
            "value cap + 1",
            hot(tx(a, cap_v + one())),
            Err(Code::ValueCapExceeded),
        ),
        // value cap (client c2): 1 ether, cumulative with the key's
        (
            "client value cap - 1",
            tx_request("searcher-hot", "c2", tx(a, ether(1) - one())),
            Ok(()),
        ),
        (
            "client value cap",
            tx_request("searcher-hot", "c2", tx(a, ether(1))),
            Ok(()),
        ),
        (
            "client value cap + 1",
            tx_request("searcher-hot", "c2", tx(a, ether(1) + one())),
            Err(Code::ValueCapExceeded),
        ),
        // gas limit cap: 1_000_000
        (
            "gas cap - 1",
            hot(eip1559(Some(a), one(), 999_999, g, one(), &[])),
            Ok(()),
        ),
        (
            "gas cap",
            hot(eip1559(Some(a), one(), 1_000_000, g, one(), &[])),
            Ok(()),
        ),
        (
            "gas cap + 1",
            hot(eip1559(Some(a), one(), 1_000_001, g, one(), &[])),
            Err(Code::GasLimitCapExceeded),
        ),
        // max fee cap: 100 gwei
        (
            "max fee - 1",
            hot(eip1559(
                Some(a),
                one(),
                21_000,
                gwei(100) - one(),
                one(),
                &[],
            )),
            Ok(()),
        ),
        (
            "max fee",
            hot(eip1559(Some(a), one(), 21_000, gwei(100), one(), &[])),
            Ok(()),
        ),
        (
            "max fee + 1",
            hot(eip1559(
                Some(a),
                one(),
                21_000,
                gwei(100) + one(),
                one(),
                &[],
            )),
            Err(Code::MaxFeeCapExceeded),
        ),
        (
            "legacy gas price",
            hot(TxFacts::new(
                1,
                Some(a),
                one(),
                21_000,
                Fee::GasPrice(gwei(100)),
                &[],
            )),
            Ok(()),
        ),
        (
            "legacy gas price + 1",
            hot(TxFacts::new(
                1,
                Some(a),
                one(),
                21_000,
                Fee::GasPrice(gwei(100) + one()),
                &[],
            )),
            Err(Code::MaxFeeCapExceeded),
        ),
        // priority fee cap: 5 gwei
        (
            "tip - 1",
            hot(eip1559(
                Some(a),
                one(),
                21_000,
                g * U256::from(10),
                gwei(5) - one(),
                &[],
            )),
            Ok(()),
        ),
        (
            "tip",
            hot(eip1559(
                Some(a),
                one(),
                21_000,
                g * U256::from(10),
                gwei(5),
                &[],
            )),
            Ok(()),
        ),
        (
            "tip + 1",
            hot(eip1559(
                Some(a),
                one(),
                21_000,
                g * U256::from(10),
                gwei(5) + one(),
                &[],
            )),
            Err(Code::PriorityFeeCapExceeded),
        ),
        // chain ids
        ("chain 1", hot(tx(a, one())), Ok(())),
        ("chain 10", hot(tx(a, one()).on_chain(10)), Ok(())),
        (
            "chain 5",
            hot(tx(a, one()).on_chain(5)),
            Err(Code::ChainNotAllowed),
        ),
        (
            "client chain 10",
            tx_request("searcher-hot", "c2", tx(a, one()).on_chain(10)),
            Err(Code::ChainNotAllowed),
        ),
        // destinations
        (
            "allowed destination",
            hot(tx(addr(0xb), one()).with_input(&transfer_call())),
            Ok(()),
        ),
        (
            "unlisted destination",
            hot(tx(addr(0xc), one())),
            Err(Code::DestinationNotAllowed),
        ),
        (
            "key-denied destination",
            hot(tx(addr(0xd), one())),
            Err(Code::DestinationDenied),
        ),
        (
            "default-denied destination",
            tx_request("plain", "c1", tx(addr(0xde), one())),
            Err(Code::DestinationDenied),
        ),
        (
            "no allow list: any destination",
            tx_request("plain", "c1", tx(addr(0x77), one())),
            Ok(()),
        ),
        (
            "client allow list",
            tx_request("plain", "c2", tx(addr(0x77), one())),
            Err(Code::DestinationNotAllowed),
        ),
        // contract creation
        (
            "creation, key default",
            hot(eip1559(None, U256::ZERO, 500_000, g, one(), &[0x60])),
            Err(Code::ContractCreationNotAllowed),
        ),
        (
            "creation allowed",
            tx_request(
                "deployer",
                "c1",
                eip1559(None, U256::ZERO, 500_000, g, one(), &[0x60]),
            ),
            Ok(()),
        ),
        // selectors on destination b
        (
            "selector listed",
            hot(tx(addr(0xb), one()).with_input(&transfer_call())),
            Ok(()),
        ),
        (
            "selector unlisted",
            hot(tx(addr(0xb), one()).with_input(&[0x09, 0x5e, 0xa7, 0xb3])),
            Err(Code::SelectorNotAllowed),
        ),
        (
            "selector empty calldata",
            hot(tx(addr(0xb), one())),
            Err(Code::SelectorNotAllowed),
        ),
        (
            "selector short calldata",
            hot(tx(addr(0xb), one()).with_input(&[0xa9, 0x05, 0x9c])),
            Err(Code::SelectorNotAllowed),
        ),
        (
            "no selector rule: any calldata",
            hot(tx(a, one()).with_input(&[1, 2, 3, 4, 5])),
            Ok(()),
        ),
        // approval tier above 1.5 ether (key plain only)
        (
            "tier - 1",
            plain(tx(a, ether(1) + ether(1) / U256::from(2) - one())),
            Ok(()),
        ),
        (
            "tier",
            plain(tx(a, ether(1) + ether(1) / U256::from(2))),
            Ok(()),
        ),
        (
            "tier + 1",
            plain(tx(a, ether(1) + ether(1) / U256::from(2) + one())),
            Err(Code::ApprovalsRequired),
        ),
        (
            "tier bundle sum",
            plain_bundle(vec![tx(a, ether(1)), tx(a, ether(1))]),
            Err(Code::ApprovalsRequired),
        ),
        (
            "tier destination",
            hot(tx(addr(0x5), one())),
            Err(Code::ApprovalsRequired),
        ),
        (
            "tier destination other client",
            tx_request("searcher-hot", "c2", tx(addr(0xa), one())),
            Ok(()),
        ),
        (
            "tier selector",
            hot(tx(a, one()).with_input(&[0x09, 0x5e, 0xa7, 0xb3, 0])),
            Err(Code::ApprovalsRequired),
        ),
        (
            "tier selector in bundle",
            hot_bundle(vec![
                tx(a, one()),
                tx(a, one()).with_input(&[0x09, 0x5e, 0xa7, 0xb3]),
            ]),
            Err(Code::ApprovalsRequired),
        ),
        (
            "tier out of scope",
            tx_request("deployer", "c1", tx(a, ether(3))),
            Ok(()),
        ),
        // bundles: value and cost summed; one bad tx denies all
        (
            "bundle sum at cap",
            hot_bundle(vec![tx(a, ether(1)), tx(a, ether(1))]),
            Ok(()),
        ),
        (
            "bundle sum over cap",
            hot_bundle(vec![tx(a, ether(1)), tx(a, ether(1) + one())]),
            Err(Code::ValueCapExceeded),
        ),
        (
            "bundle with bad destination",
            hot_bundle(vec![tx(a, one()), tx(addr(0xc), one())]),
            Err(Code::DestinationNotAllowed),
        ),
        ("bundle empty", hot_bundle(vec![]), Err(Code::EmptyBundle)),
        (
            "bundle small",
            hot_bundle(vec![tx(a, one()), tx(a, one())]),
            Ok(()),
        ),
        // overflow denies, never wraps
        (
            "cost overflow",
            hot(eip1559(Some(a), U256::MAX, 21_000, g, one(), &[])),
            Err(Code::AmountOverflow),
        ),
        // keys and clients
        (
            "unknown key",
            tx_request("nope", "c1", tx(a, one())),
            Err(Code::UnknownKey),
        ),
        (
            "unknown client",
            tx_request("searcher-hot", "c9", tx(a, one())),
            Err(Code::ClientNotAllowed),
        ),
        (
            "key without chain ids",
            tx_request("plain", "c1", tx(a, one()).on_chain(10)),
            Err(Code::ChainNotAllowed),
        ),
        // messages
        (
            "personal_sign allowed",
            request(
                "searcher-hot",
                "c1",
                RequestKind::PersonalMessage(b"hello".to_vec()),
            ),
            Ok(()),
        ),
        (
            "personal_sign key default",
            request(
                "plain",
                "c1",
                RequestKind::PersonalMessage(b"hello".to_vec()),
            ),
            Err(Code::MessageSigningNotAllowed),
        ),
        (
            "personal_sign client false",
            request(
                "searcher-hot",
                "c2",
                RequestKind::PersonalMessage(b"hello".to_vec()),
            ),
            Err(Code::MessageSigningNotAllowed),
        ),
        (
            "typed data domain ok",
            typed("searcher-hot", Some("Permit2"), Some(1)),
            Ok(()),
        ),
        (
            "typed data wrong chain",
            typed("searcher-hot", Some("Permit2"), Some(10)),
            Err(Code::TypedDataDomainNotAllowed),
        ),
        (
            "typed data wrong name",
            typed("searcher-hot", Some("Permit3"), Some(1)),
            Err(Code::TypedDataDomainNotAllowed),
        ),
        (
            "typed data missing name",
            typed("searcher-hot", None, Some(1)),
            Err(Code::TypedDataDomainNotAllowed),
        ),
        (
            "typed data key default",
            typed("plain", Some("Permit2"), Some(1)),
            Err(Code::MessageSigningNotAllowed),
        ),
        // relay auth exclusivity
        (
            "relay payload by relay key",
            request("relay", "c1", RequestKind::RelayAuth(relay_payload())),
            Ok(()),
        ),
        (
            "relay payload as personal by relay key",
            request("relay", "c1", RequestKind::PersonalMessage(relay_payload())),
            Ok(()),
        ),
        (
            "tx by relay key",
            tx_request("relay", "c1", tx(a, one())),
            Err(Code::RelayAuthOnly),
        ),
        (
            "message by relay key",
            request("relay", "c1", RequestKind::PersonalMessage(b"hi".to_vec())),
            Err(Code::RelayAuthOnly),
        ),
        (
            "relay payload by hot key",
            request(
                "searcher-hot",
                "c1",
                RequestKind::PersonalMessage(relay_payload()),
            ),
            Err(Code::RelayAuthReserved),
        ),
        (
            "relay kind by hot key",
            request(
                "searcher-hot",
                "c1",
                RequestKind::RelayAuth(relay_payload()),
            ),
            Err(Code::RelayAuthReserved),
        ),
        (
            "relay payload uppercase",
            request(
                "relay",
                "c1",
                RequestKind::RelayAuth(relay_payload().to_ascii_uppercase()),
            ),
            Err(Code::RelayAuthMalformed),
        ),
    ];
    // retiring: default rules sweep to the successor (even off the allow list), nothing else
    let succ = addr(0x99);
    let retiring = |t: TxFacts| Request {
        key_status: KeyStatus::Retiring { successor: succ },
        ..hot(t)
    };
    v.push(("retiring sweep", retiring(tx(succ, ether(1))), Ok(())));
    v.push((
        "retiring sweep with calldata",
        retiring(tx(succ, one()).with_input(&[1, 2, 3, 4])),
        Err(Code::KeyRetiring),
    ));
    v.push((
        "retiring to other",
        retiring(tx(addr(0xa), one())),
        Err(Code::KeyRetiring),
    ));
    v.push((
        "retiring sweep still capped",
        retiring(tx(succ, cap_v + one())),
        Err(Code::ValueCapExceeded),
    ));
    v.push((
        "retiring message",
        Request {
            key_status: KeyStatus::Retiring { successor: succ },
            ..request(
                "searcher-hot",
                "c1",
                RequestKind::PersonalMessage(b"x".to_vec()),
            )
        },
        Err(Code::KeyRetiring),
    ));
    v.push((
        "retired",
        Request {
            key_status: KeyStatus::Retired,
            ..hot(tx(a, one()))
        },
        Err(Code::KeyRetired),
    ));
    v
}

fn plain(t: TxFacts) -> Request {
    tx_request("plain", "c1", t)
}

fn plain_bundle(txs: Vec<TxFacts>) -> Request {
    request("plain", "c1", RequestKind::Bundle(txs))
}

fn hot_bundle(txs: Vec<TxFacts>) -> Request {
    request("searcher-hot", "c1", RequestKind::Bundle(txs))
}

fn typed(key: &str, name: Option<&str>, chain: Option<u64>) -> Request {
    request(
        key,
        "c1",
        RequestKind::TypedData(TypedDataFacts {
            name: name.map(String::from),
            version: Some("1".into()),
            chain_id: chain,
            verifying_contract: Some(addr(0x22)),
        }),
    )
}

fn relay_payload() -> Vec<u8> {
    format!("{}", B256::repeat_byte(0xab)).into_bytes()
}

trait TxExt {
    fn on_chain(self, c: u64) -> Self;
    fn with_input(self, input: &[u8]) -> Self;
}

impl TxExt for TxFacts {
    fn on_chain(mut self, c: u64) -> Self {
        self.chain_id = c;
        self
    }
    fn with_input(self, input: &[u8]) -> Self {
        TxFacts::new(
            self.chain_id,
            self.to,
            self.value,
            self.gas_limit,
            self.fee,
            input,
        )
    }
}

#[test]
fn every_rule_at_its_boundary() {
    let p = policy();
    let limits = MemoryLimits::new();
    let ctx = Context::new(NOW, &limits);
    let mut failures = Vec::new();
    for (name, req, want) in cases() {
        let d = p.evaluate(&req, &ctx);
        let got = if d.is_allowed() { Ok(()) } else { Err(d.code) };
        if got != want {
            failures.push(format!("{name}: got {got:?} ({}), want {want:?}", d.reason));
        }
        if d.verdict == Verdict::Deny {
            assert!(
                d.reservations.is_empty(),
                "{name}: a denial reserves nothing"
            );
        }
        assert!(
            !d.reason.is_empty() && !d.reason.contains('\n'),
            "{name}: one-line reason"
        );
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn cost_cap_exact_boundary() {
    // worst case = value + gas × max fee; cap 2.05 ether; gas part 1_000_000 × 100 gwei = 0.1 ether
    let p = policy();
    let limits = MemoryLimits::new();
    let ctx = Context::new(NOW, &limits);
    let a = addr(0xa);
    let gas_cost = U256::from(1_000_000u64) * gwei(100);
    let base = ether(195) / U256::from(100);
    for (value, allowed) in [(base - one(), true), (base, true), (base + one(), false)] {
        let d = p.evaluate(
            &hot(eip1559(Some(a), value, 1_000_000, gwei(100), one(), &[])),
            &ctx,
        );
        assert_eq!(d.is_allowed(), allowed, "{value}: {}", d.reason);
        if allowed {
            let w = key_window(Metric::Cost, 3600);
            assert!(
                d.reservations
                    .iter()
                    .any(|r| r.window == w && r.amount == value + gas_cost)
            );
        } else {
            assert_eq!(d.code, Code::CostCapExceeded);
            assert_eq!(
                d.reason,
                format!(
                    "worst-case cost {} wei exceeds cap 2050000000000000000 wei (rule keys.\"searcher-hot\".max_cost)",
                    value + gas_cost
                )
            );
        }
    }
}

#[test]
fn reason_names_rule_and_numbers() {
    let p = policy();
    let limits = MemoryLimits::new();
    let d = p.evaluate(
        &hot(tx(addr(0xa), ether(2) + one())),
        &Context::new(NOW, &limits),
    );
    assert_eq!(d.code, Code::ValueCapExceeded);
    assert_eq!(
        d.reason,
        "value 2000000000000000001 wei exceeds cap 2000000000000000000 wei (rule keys.\"searcher-hot\".max_value)"
    );
    let d = p.evaluate(
        &tx_request("plain", "c1", tx(addr(0xde), one())),
        &Context::new(NOW, &limits),
    );
    assert!(
        d.reason.contains("rule defaults.deny_destinations"),
        "{}",
        d.reason
    );
    let d = p.evaluate(
        &tx_request("searcher-hot", "c2", tx(addr(0xa), ether(1) + one())),
        &Context::new(NOW, &limits),
    );
    assert!(
        d.reason.contains("rule clients.c2.max_value"),
        "{}",
        d.reason
    );
}

fn key_window(metric: Metric, duration: u64) -> WindowId {
    WindowId {
        scope: WindowScope::Key(KeyName::new("searcher-hot")),
        metric,
        duration,
    }
}

#[test]
fn velocity_window_boundary() {
    // key velocity: 10 ether value per hour
    let p = policy();
    let w = key_window(Metric::Value, 3600);
    for (delta, allowed) in [(-1i8, true), (0, true), (1, false)] {
        let mut limits = MemoryLimits::new();
        limits.reserve(&w, NOW - 100, ether(9));
        let value = match delta {
            -1 => ether(1) - one(),
            0 => ether(1),
            _ => ether(1) + one(),
        };
        let d = p.evaluate(&hot(tx(addr(0xa), value)), &Context::new(NOW, &limits));
        assert_eq!(d.is_allowed(), allowed, "{delta}: {}", d.reason);
        if allowed {
            assert!(
                d.reservations
                    .iter()
                    .any(|r| r.window == w && r.amount == value)
            );
        } else {
            assert_eq!(d.code, Code::VelocityExceeded);
            assert!(
                d.reason
                    .contains("keys.\"searcher-hot\".velocity[1h].max_value"),
                "{}",
                d.reason
            );
            assert!(
                d.reason.contains("exceeds limit 10000000000000000000 wei"),
                "{}",
                d.reason
            );
        }
    }
}

#[test]
fn velocity_window_expiry_boundary() {
    let p = policy();
    let w = key_window(Metric::Value, 3600);
    let mut limits = MemoryLimits::new();
    limits.reserve(&w, NOW, ether(10));
    let req = hot(tx(addr(0xa), one()));
    assert_eq!(
        p.evaluate(&req, &Context::new(NOW + 3599, &limits)).code,
        Code::VelocityExceeded
    );
    assert!(
        p.evaluate(&req, &Context::new(NOW + 3600, &limits))
            .is_allowed()
    );
}

#[test]
fn cost_velocity_and_client_velocity() {
    let p = policy();
    // key cost window: 12 ether per hour
    let mut limits = MemoryLimits::new();
    let w = key_window(Metric::Cost, 3600);
    let req = hot(tx(addr(0xa), one()));
    let cost = one() + U256::from(21_000u64 * GWEI);
    limits.reserve(&w, NOW, ether(12) - cost);
    assert!(p.evaluate(&req, &Context::new(NOW, &limits)).is_allowed());
    limits.reserve(&w, NOW, one());
    assert_eq!(
        p.evaluate(&req, &Context::new(NOW, &limits)).code,
        Code::VelocityExceeded
    );
    // client c2 velocity: 1.5 ether per minute, summed across keys
    let mut limits = MemoryLimits::new();
    let cw = WindowId {
        scope: WindowScope::Client("c2".into()),
        metric: Metric::Value,
        duration: 60,
    };
    limits.reserve(&cw, NOW, ether(1));
    let half = ether(1) / U256::from(2);
    assert!(
        p.evaluate(
            &tx_request("plain", "c2", tx(addr(0xa), half)),
            &Context::new(NOW, &limits)
        )
        .is_allowed()
    );
    let d = p.evaluate(
        &tx_request("plain", "c2", tx(addr(0xa), half + one())),
        &Context::new(NOW, &limits),
    );
    assert_eq!(d.code, Code::VelocityExceeded);
    assert!(
        d.reason.contains("clients.c2.velocity[1m].max_value"),
        "{}",
        d.reason
    );
}

#[test]
fn rate_limit_boundary_and_headers() {
    // key rate: 3 requests per minute
    let p = policy();
    let w = key_window(Metric::Requests, 60);
    let req = hot(tx(addr(0xa), one()));
    for (already, allowed, remaining) in [(1u64, true, 1u64), (2, true, 0), (3, false, 0)] {
        let mut limits = MemoryLimits::new();
        for i in 0..already {
            limits.reserve(&w, NOW - 30 + i, one());
        }
        let d = p.evaluate(&req, &Context::new(NOW, &limits));
        assert_eq!(d.is_allowed(), allowed, "{already}: {}", d.reason);
        let info = d.rate_limit.clone().unwrap();
        assert_eq!((info.limit, info.remaining), (3, remaining), "{already}");
        // the oldest counted request (NOW - 30) frees its slot at NOW + 30
        assert_eq!(info.reset, NOW + 30);
        if !allowed {
            assert_eq!(d.code, Code::RateLimited);
            assert!(
                d.reason.contains("3 requests in the last 1m, limit 3"),
                "{}",
                d.reason
            );
        } else {
            assert!(
                d.reservations
                    .iter()
                    .any(|r| r.window == w && r.amount == one())
            );
        }
    }
    // client c2: 2 per 10 s, messages count too
    let mut limits = MemoryLimits::new();
    let cw = WindowId {
        scope: WindowScope::Client("c2".into()),
        metric: Metric::Requests,
        duration: 10,
    };
    limits.reserve(&cw, NOW, one());
    limits.reserve(&cw, NOW, one());
    let d = p.evaluate(
        &tx_request("plain", "c2", tx(addr(0xa), one())),
        &Context::new(NOW, &limits),
    );
    assert_eq!(d.code, Code::RateLimited);
    assert_eq!(d.rate_limit.unwrap().reset, NOW + 10);
    assert!(
        p.evaluate(
            &tx_request("plain", "c2", tx(addr(0xa), one())),
            &Context::new(NOW + 10, &limits)
        )
        .is_allowed()
    );
}

#[test]
fn windows_for_lists_what_evaluate_reserves() {
    let p = policy();
    let limits = MemoryLimits::new();
    let d = p.evaluate(
        &tx_request("searcher-hot", "c2", tx(addr(0xa), one())),
        &Context::new(NOW, &limits),
    );
    assert!(d.is_allowed(), "{}", d.reason);
    let listed = p.windows_for(&"searcher-hot".into(), &"c2".into());
    let mut reserved: Vec<_> = d.reservations.iter().map(|r| r.window.clone()).collect();
    let mut listed_sorted = listed.clone();
    reserved.sort();
    listed_sorted.sort();
    assert_eq!(reserved, listed_sorted);
    assert_eq!(
        listed.len(),
        5,
        "key 1h value + cost, key 1m requests, client 10s requests, client 1m value"
    );
}

#[test]
fn allowed_bundle_reserves_its_sum_once() {
    let p = policy();
    let limits = MemoryLimits::new();
    let d = p.evaluate(
        &hot_bundle(vec![
            tx(addr(0xa), ether(1) / U256::from(2)),
            tx(addr(0xa), ether(1) / U256::from(4)),
        ]),
        &Context::new(NOW, &limits),
    );
    assert!(d.is_allowed(), "{}", d.reason);
    let value: Vec<_> = d
        .reservations
        .iter()
        .filter(|r| r.window == key_window(Metric::Value, 3600))
        .collect();
    assert_eq!(value.len(), 1);
    assert_eq!(value[0].amount, ether(3) / U256::from(4));
    let requests: Vec<_> = d
        .reservations
        .iter()
        .filter(|r| r.window.metric == Metric::Requests)
        .collect();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].amount, one());
}

#[test]
fn freeze_pause_and_breaker() {
    let p = policy();
    let limits = MemoryLimits::new();
    let req = hot(tx(addr(0xa), one()));
    let key = KeyName::new("searcher-hot");
    let mut ctx = Context::new(NOW, &limits);
    ctx.frozen = true;
    assert_eq!(p.evaluate(&req, &ctx).code, Code::Frozen);
    ctx.frozen = false;

    // pause with a 15 min cooldown before resume
    let paused = p.pause_key(KeyControl::default(), NOW);
    ctx.key_control = paused;
    assert_eq!(p.evaluate(&req, &ctx).code, Code::KeyPaused);
    assert_eq!(
        p.pause_key(paused, NOW + 5),
        paused,
        "re-pausing keeps the original time"
    );
    assert_eq!(
        p.resume_key(&key, paused, NOW + 899).unwrap_err().code,
        Code::KeyPaused
    );
    let resumed = p.resume_key(&key, paused, NOW + 900).unwrap();
    assert_eq!(resumed.paused_since, None);

    // breaker: 3 consecutive failures open it for 10 min; a success resets the count
    let mut s = KeyControl::default();
    s = p.breaker_on_outcome(&key, s, TxOutcome::Reverted, NOW);
    s = p.breaker_on_outcome(&key, s, TxOutcome::NotIncluded, NOW);
    assert_eq!(s.consecutive_failures, 2);
    let reset = p.breaker_on_outcome(&key, s, TxOutcome::Included, NOW);
    assert_eq!(reset.consecutive_failures, 0);
    assert_eq!(reset.breaker_open_until, 0);
    s = p.breaker_on_outcome(&key, s, TxOutcome::Reverted, NOW);
    assert_eq!(s.breaker_open_until, NOW + 600);
    assert_eq!(s.consecutive_failures, 0);
    ctx.key_control = s;
    ctx.now = NOW + 599;
    assert_eq!(p.evaluate(&req, &ctx).code, Code::BreakerOpen);
    ctx.now = NOW + 600;
    assert!(p.evaluate(&req, &ctx).is_allowed());
}

#[test]
fn policy_and_limits_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Policy>();
    shared::<MemoryLimits>();
    shared::<castellan_policy::Decision>();
}
