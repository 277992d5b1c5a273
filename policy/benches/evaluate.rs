//! One EIP-1559 request against a policy with 10 rules, 1,000 allow-listed destinations and
//! 3 windows holding 10,000 past reservations each. Target: ≤ 5 µs median.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write;
use std::hint::black_box;

use alloy::primitives::{Address, B256, U256};
use castellan_policy::{
    ClientId, Context, Fee, KeyName, KeyStatus, MemoryLimits, Metric, Policy, Request, RequestKind,
    TxFacts, WindowId, WindowScope,
};
use criterion::{Criterion, criterion_group, criterion_main};

fn addr(i: u32) -> Address {
    let mut b = [0u8; 20];
    b[0] = 0xaa;
    b[16..].copy_from_slice(&i.to_be_bytes());
    Address::from(b)
}

fn policy() -> Policy {
    let mut dests = String::new();
    for i in 0..1000 {
        write!(dests, "\"{:#x}\",", addr(i)).unwrap();
    }
    // 10 rules: defaults, 4 keys, 4 clients, 1 tier.
    let mut src = format!(
        r#"
[defaults]
chain_ids = [1]
max_value = "10 ether"
max_gas_limit = 2000000
max_fee_per_gas = "500 gwei"
max_priority_fee_per_gas = "50 gwei"
max_cost = "20 ether"
allow_destinations = [{dests}]
velocity = [{{ window = "1h", max_value = "100000 ether", max_cost = "200000 ether" }}]
rate = [{{ window = "1m", max_requests = 1000000 }}]

[approvers]
ops = ["{a1:x}", "{a2:x}", "{a3:x}"]

[[tiers]]
name = "big"
approvers = "ops"
threshold = 2
above_value = "5 ether"
"#,
        a1 = addr(9001),
        a2 = addr(9002),
        a3 = addr(9003)
    );
    for k in 0..4 {
        writeln!(src, "[[keys]]\nname = \"key-{k}\"").unwrap();
    }
    for c in 0..4 {
        writeln!(
            src,
            "[[clients]]\nidentity = \"client-{c}\"\nkeys = [\"key-{c}\"]\nmax_value = \"8 ether\""
        )
        .unwrap();
    }
    Policy::from_toml(&src).unwrap()
}

fn bench(c: &mut Criterion) {
    let policy = policy();
    let key = KeyName::new("key-0");
    let now = 1_800_000_000u64;
    let mut limits = MemoryLimits::new();
    let windows = [
        WindowId {
            scope: WindowScope::Key(key.clone()),
            metric: Metric::Value,
            duration: 3600,
        },
        WindowId {
            scope: WindowScope::Key(key.clone()),
            metric: Metric::Cost,
            duration: 3600,
        },
        WindowId {
            scope: WindowScope::Key(key.clone()),
            metric: Metric::Requests,
            duration: 60,
        },
    ];
    for w in &windows {
        for i in 0..10_000u64 {
            // All inside the window at `now`: nothing can be skipped by expiry.
            let at = now - w.duration + 1 + (i * (w.duration - 1)) / 10_000;
            let amount = if w.metric == Metric::Requests {
                1u64
            } else {
                1_000_000_000
            };
            limits.reserve(w, at, U256::from(amount));
        }
    }
    let req = Request {
        key,
        key_status: KeyStatus::Active,
        client: ClientId::new("client-0"),
        digest: B256::repeat_byte(7),
        kind: RequestKind::Transaction(TxFacts::new(
            1,
            Some(addr(777)),
            U256::from(10u64).pow(U256::from(17)),
            300_000,
            Fee::Eip1559 {
                max_fee_per_gas: U256::from(100_000_000_000u64),
                max_priority_fee_per_gas: U256::from(2_000_000_000u64),
            },
            &[0xa9, 0x05, 0x9c, 0xbb, 0, 0, 0, 0],
        )),
    };
    let ctx = Context::new(now, &limits);
    let d = policy.evaluate(&req, &ctx);
    assert!(d.is_allowed(), "{}", d.reason);
    c.bench_function("evaluate_eip1559_10rules_1000dests_3x10k", |b| {
        b.iter(|| black_box(policy.evaluate(black_box(&req), black_box(&ctx))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
