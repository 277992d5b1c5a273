//! Property tests of the policy's invariants.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use alloy::primitives::{B256, U256};
use alloy::signers::local::PrivateKeySigner;
use castellan_policy::{
    BudgetGrant, Code, Context, KeyControl, MemoryLimits, Policy, RequestKind, SignedApproval,
    SignedGrant, TypedDataFacts, Verdict,
};
use common::*;
use proptest::prelude::*;

const T0: u64 = 1_800_000_000;
const MILLI: u64 = 1_000_000_000_000_000; // 0.001 ether

/// Key and client windows of every metric, overlapping durations.
fn windows_policy() -> Policy {
    Policy::from_toml(
        r#"
[defaults]
chain_ids = [1]

[[keys]]
name = "k1"
velocity = [
  { window = "1m", max_value = "1 ether" },
  { window = "1h", max_value = "3 ether", max_cost = "3.5 ether" },
]
rate = [{ window = "30s", max_requests = 7 }]

[[keys]]
name = "k2"
velocity = [{ window = "10m", max_cost = "2 ether" }]

[[clients]]
identity = "a"
keys = ["*"]
velocity = [{ window = "5m", max_value = "2 ether" }]
rate = [{ window = "1m", max_requests = 12 }]

[[clients]]
identity = "b"
keys = ["k1"]
"#,
    )
    .unwrap()
}

#[derive(Debug, Clone)]
struct Step {
    dt: u64,
    key: usize,
    client: usize,
    values: Vec<u64>, // in milli-ether; more than one makes a bundle
}

fn step() -> impl Strategy<Value = Step> {
    (
        0u64..40,
        0usize..2,
        0usize..2,
        prop::collection::vec(0u64..700, 1..4),
    )
        .prop_map(|(dt, key, client, values)| Step {
            dt,
            key,
            client,
            values,
        })
}

#[derive(Debug)]
struct Allowed {
    at: u64,
    key: usize,
    client: usize,
    value: U256,
    cost: U256,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Whatever the sequence, the allowed requests inside any window never exceed its limit.
    #[test]
    fn windows_never_exceed_their_limits(steps in prop::collection::vec(step(), 0..80)) {
        let p = windows_policy();
        let keys = ["k1", "k2"];
        let clients = ["a", "b"];
        let mut limits = MemoryLimits::new();
        let mut log: Vec<Allowed> = Vec::new();
        let mut now = T0;
        // A first request that always fits, so the property is never vacuous.
        let first = Step { dt: 0, key: 0, client: 0, values: vec![1] };
        for s in std::iter::once(first).chain(steps) {
            now += s.dt;
            let txs: Vec<_> = s.values.iter().map(|v| tx(addr(1), U256::from(*v) * U256::from(MILLI))).collect();
            let kind = if txs.len() == 1 { RequestKind::Transaction(txs[0].clone()) } else { RequestKind::Bundle(txs.clone()) };
            let d = p.evaluate(&request(keys[s.key], clients[s.client], kind), &Context::new(now, &limits));
            if d.is_allowed() {
                limits.apply(&d, now);
                let value = txs.iter().map(|t| t.value).fold(U256::ZERO, |a, b| a + b);
                let cost = txs.iter().map(|t| t.worst_case_cost().unwrap()).fold(U256::ZERO, |a, b| a + b);
                log.push(Allowed { at: now, key: s.key, client: s.client, value, cost });
            } else {
                prop_assert!(d.reservations.is_empty());
            }
            // Independent recomputation from the log, for every window of the policy.
            let in_window = |d: u64| log.iter().filter(move |e| e.at + d > now);
            let sum = |it: &mut dyn Iterator<Item = U256>| it.fold(U256::ZERO, |a, b| a + b);
            let k1 = |d: u64| in_window(d).filter(|e| e.key == 0);
            prop_assert!(sum(&mut k1(60).map(|e| e.value)) <= U256::from(1000 * MILLI));
            prop_assert!(sum(&mut k1(3600).map(|e| e.value)) <= U256::from(3000 * MILLI));
            prop_assert!(sum(&mut k1(3600).map(|e| e.cost)) <= U256::from(3500 * MILLI));
            prop_assert!(k1(30).count() <= 7);
            prop_assert!(sum(&mut in_window(600).filter(|e| e.key == 1).map(|e| e.cost)) <= U256::from(2000 * MILLI));
            let ca = |d: u64| in_window(d).filter(|e| e.client == 0);
            prop_assert!(sum(&mut ca(300).map(|e| e.value)) <= U256::from(2000 * MILLI));
            prop_assert!(ca(60).count() <= 12);
            // client b may not use k2 at all
            prop_assert!(!log.iter().any(|e| e.client == 1 && e.key == 1));
        }
        prop_assert!(!log.is_empty());
    }

    /// Nothing is allowed while frozen, whatever the request or state.
    #[test]
    fn nothing_is_allowed_while_frozen(
        kind in 0u8..5,
        key in prop::sample::select(vec!["k1", "k2", "nope"]),
        client in prop::sample::select(vec!["a", "b", "zz"]),
        value in 0u64..5_000,
        paused in any::<bool>(),
    ) {
        let p = windows_policy();
        let limits = MemoryLimits::new();
        let t = tx(addr(1), U256::from(value) * U256::from(MILLI));
        let k = match kind {
            0 => RequestKind::Transaction(t),
            1 => RequestKind::Bundle(vec![t.clone(), t]),
            2 => RequestKind::PersonalMessage(b"hello".to_vec()),
            3 => RequestKind::RelayAuth(format!("{}", B256::repeat_byte(1)).into_bytes()),
            _ => RequestKind::TypedData(TypedDataFacts::default()),
        };
        let mut ctx = Context::new(T0, &limits);
        ctx.frozen = true;
        if paused {
            ctx.key_control = KeyControl { paused_since: Some(T0), ..KeyControl::default() };
        }
        let d = p.evaluate(&request(key, client, k), &ctx);
        prop_assert!(!d.is_allowed());
        prop_assert_eq!(d.code, Code::Frozen);
        prop_assert!(d.reservations.is_empty());
    }
}

struct Approvers {
    policy: Policy,
    signers: Vec<PrivateKeySigner>,
    /// Pre-signed approvals of DIGEST by each signer (0..4 registered, 4..6 not).
    approvals: Vec<SignedApproval>,
}

const THRESHOLD: usize = 3;

fn approvers() -> Approvers {
    let signers: Vec<_> = (1..=6).map(signer).collect();
    let set = signers[..4]
        .iter()
        .map(|s| format!("\"{}\"", s.address()))
        .collect::<Vec<_>>()
        .join(",");
    let policy = Policy::from_toml(&format!(
        r#"
[defaults]
chain_ids = [1]
[[keys]]
name = "k"
[[clients]]
identity = "c"
keys = ["k"]
[approvers]
ops = [{set}]
[[tiers]]
name = "all"
approvers = "ops"
threshold = {THRESHOLD}
above_cost = 0
"#
    ))
    .unwrap();
    let domain = policy.approval_domain().clone();
    let digest = request("k", "c", RequestKind::PersonalMessage(vec![])).digest;
    let approvals = signers
        .iter()
        .map(|s| approve(s, digest, T0 + 100, &domain))
        .collect();
    Approvers {
        policy,
        signers,
        approvals,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Fewer than `threshold` distinct registered approvers never pass, however many approvals
    /// (duplicates, unknown signers) are supplied; `threshold` or more always do.
    #[test]
    fn fewer_than_threshold_distinct_approvers_never_pass(picks in prop::collection::vec(0usize..6, 0..10)) {
        static SETUP: std::sync::OnceLock<Approvers> = std::sync::OnceLock::new();
        let s = SETUP.get_or_init(approvers);
        let supplied: Vec<SignedApproval> = picks.iter().map(|&i| s.approvals[i].clone()).collect();
        let mut distinct: Vec<usize> = picks.iter().copied().filter(|&i| i < 4).collect();
        distinct.sort();
        distinct.dedup();
        let limits = MemoryLimits::new();
        let mut ctx = Context::new(T0, &limits);
        ctx.approvals = &supplied;
        let d = s.policy.evaluate(&tx_request("k", "c", tx(addr(1), U256::from(1))), &ctx);
        if distinct.len() >= THRESHOLD {
            prop_assert!(d.is_allowed(), "{}", d.reason);
            prop_assert_eq!(d.approvers.len(), distinct.len());
        } else {
            prop_assert_eq!(d.verdict, Verdict::NeedsApprovals);
            prop_assert_eq!(d.pending[0].have as usize, distinct.len());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A grant's budget is never overspent, whatever the requests (sizes, times, bundles) and
    /// whether the grant's window rolls or covers its whole validity.
    #[test]
    fn no_grant_is_overspent(
        window in prop::sample::select(vec![0u64, 60, 600]),
        budget_milli in 1u64..5_000,
        steps in prop::collection::vec((0u64..30, prop::collection::vec(0u64..900, 1..3)), 1..60),
    ) {
        static SETUP: std::sync::OnceLock<Approvers> = std::sync::OnceLock::new();
        let s = SETUP.get_or_init(approvers);
        let domain = s.policy.approval_domain().clone();
        let g = BudgetGrant {
            client: "c".into(),
            key: "k".into(),
            maxValue: U256::from(1000 * MILLI),
            maxCost: U256::from(1000 * MILLI),
            destinations: vec![addr(1)],
            budget: U256::from(budget_milli * MILLI),
            window,
            validFrom: T0,
            validUntil: T0 + 100_000,
            nonce: 7,
        };
        let signed = SignedGrant { signatures: sign_grant(&[&s.signers[0], &s.signers[1], &s.signers[2]], &g, &domain), grant: g };
        let vg = s.policy.verify_grant(&signed, T0).unwrap();
        let grants = [vg.clone()];
        let mut limits = MemoryLimits::new();
        let mut log: Vec<(u64, U256)> = Vec::new();
        let mut now = T0;
        for (dt, values) in steps {
            now += dt;
            let txs: Vec<_> = values.iter().map(|v| tx(addr(1), U256::from(*v) * U256::from(MILLI))).collect();
            let kind = if txs.len() == 1 { RequestKind::Transaction(txs[0].clone()) } else { RequestKind::Bundle(txs.clone()) };
            let mut ctx = Context::new(now, &limits);
            ctx.grants = &grants;
            let d = s.policy.evaluate(&request("k", "c", kind), &ctx);
            if d.is_allowed() {
                prop_assert_eq!(d.code, Code::AllowedByGrant);
                let r = d.reservations.iter().find(|r| r.window == vg.window()).unwrap();
                let cost = txs.iter().map(|t| t.worst_case_cost().unwrap()).fold(U256::ZERO, |a, b| a + b);
                prop_assert_eq!(r.amount, cost);
                limits.apply(&d, now);
                log.push((now, cost));
            }
            let d = if window == 0 { u64::MAX } else { window };
            let spent = log.iter().filter(|(at, _)| at.saturating_add(d) > now).fold(U256::ZERO, |a, (_, c)| a + *c);
            prop_assert!(spent <= vg.budget(), "spent {} > budget {}", spent, vg.budget());
        }
    }
}
