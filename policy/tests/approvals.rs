//! M-of-N approvals and budget grants, signed with alloy's local signer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use alloy::primitives::{Address, B256, U256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolStruct;
use castellan_policy::{
    APPROVE, Approval, BudgetGrant, Code, Context, MemoryLimits, Operation, Policy, PolicyError,
    SignedApproval, SignedGrant, Verdict, castellan_domain,
};
use common::*;

const NOW: u64 = 1_800_000_000;

struct Setup {
    policy: Policy,
    risk: Vec<PrivateKeySigner>,
    admins: Vec<PrivateKeySigner>,
}

fn setup() -> Setup {
    let risk: Vec<_> = (1..=3).map(signer).collect();
    let admins: Vec<_> = (11..=13).map(signer).collect();
    let list = |v: &[PrivateKeySigner]| {
        v.iter()
            .map(|s| format!("\"{}\"", s.address()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let src = format!(
        r#"
[approval_domain]
chain_id = 1

[defaults]
chain_ids = [1]

[[keys]]
name = "hot"

[[clients]]
identity = "strategy"
keys = ["hot"]

[approvers]
risk = [{risk}]
admins = [{admins}]

[[tiers]]
name = "large"
approvers = "risk"
threshold = 2
above_value = "1 ether"

[[tiers]]
name = "unfreeze"
approvers = "admins"
threshold = 2
operation = "unfreeze"
"#,
        risk = list(&risk),
        admins = list(&admins),
    );
    Setup {
        policy: Policy::from_toml(&src).unwrap(),
        risk,
        admins,
    }
}

fn big_request() -> castellan_policy::Request {
    tx_request("hot", "strategy", tx(addr(0xa), ether(5)))
}

fn decide(s: &Setup, approvals: &[SignedApproval], now: u64) -> castellan_policy::Decision {
    let limits = MemoryLimits::new();
    let mut ctx = Context::new(now, &limits);
    ctx.approvals = approvals;
    s.policy.evaluate(&big_request(), &ctx)
}

#[test]
fn two_distinct_approvers_pass() {
    let s = setup();
    let d = s.policy.approval_domain().clone();
    let digest = big_request().digest;
    let none = decide(&s, &[], NOW);
    assert_eq!(none.verdict, Verdict::NeedsApprovals);
    assert_eq!(none.code, Code::ApprovalsRequired);
    assert_eq!((none.pending[0].threshold, none.pending[0].have), (2, 0));
    assert!(
        none.reason
            .contains("tier `large` needs 2 of set `risk` (have 0)"),
        "{}",
        none.reason
    );
    assert!(none.reservations.is_empty());

    let ok = decide(
        &s,
        &[
            approve(&s.risk[0], digest, NOW + 60, &d),
            approve(&s.risk[2], digest, NOW + 60, &d),
        ],
        NOW,
    );
    assert!(ok.is_allowed(), "{}", ok.reason);
    assert_eq!(ok.code, Code::AllowedByApprovals);
    let mut want = vec![s.risk[0].address(), s.risk[2].address()];
    want.sort();
    assert_eq!(ok.approvers, want);
}

#[test]
fn approvals_signed_with_sign_typed_data_verify() {
    // alloy's own EIP-712 signing path agrees with the policy's verification.
    let s = setup();
    let d = s.policy.approval_domain().clone();
    let approval = |signer: &PrivateKeySigner| {
        let a = Approval {
            request: big_request().digest,
            decision: APPROVE.into(),
            expiry: NOW + 60,
        };
        let signature = signer.sign_typed_data_sync(&a, &d).unwrap();
        SignedApproval {
            approval: a,
            signature,
        }
    };
    let approvals = [approval(&s.risk[0]), approval(&s.risk[1])];
    assert_eq!(approvals[0].signer(&d), Some(s.risk[0].address()));
    assert!(decide(&s, &approvals, NOW).is_allowed());
}

#[test]
fn invalid_approvals_do_not_count() {
    let s = setup();
    let d = s.policy.approval_domain().clone();
    let digest = big_request().digest;
    let good = approve(&s.risk[0], digest, NOW + 60, &d);
    let cases: Vec<(&str, SignedApproval)> = vec![
        (
            "same approver twice",
            approve(&s.risk[0], digest, NOW + 120, &d),
        ),
        (
            "expired (expiry == now)",
            approve(&s.risk[1], digest, NOW, &d),
        ),
        (
            "another request",
            approve(&s.risk[1], B256::repeat_byte(0x43), NOW + 60, &d),
        ),
        (
            "wrong domain chain id",
            approve(&s.risk[1], digest, NOW + 60, &castellan_domain(5)),
        ),
        (
            "wrong domain name",
            approve(
                &s.risk[1],
                digest,
                NOW + 60,
                &alloy::sol_types::eip712_domain! { name: "Castellam", version: "1", chain_id: 1, },
            ),
        ),
        (
            "unknown approver",
            approve(&signer(99), digest, NOW + 60, &d),
        ),
        (
            "approver of another set",
            approve(&s.admins[0], digest, NOW + 60, &d),
        ),
        ("rejecting decision", {
            let approval = Approval {
                request: digest,
                decision: "reject".into(),
                expiry: NOW + 60,
            };
            let signature = s.risk[1]
                .sign_hash_sync(&approval.eip712_signing_hash(&d))
                .unwrap();
            SignedApproval {
                approval,
                signature,
            }
        }),
        ("tampered expiry", {
            let mut a = approve(&s.risk[1], digest, NOW + 60, &d);
            a.approval.expiry = NOW + 3600;
            a
        }),
    ];
    for (name, bad) in cases {
        let dec = decide(&s, &[good.clone(), bad], NOW);
        assert_eq!(
            dec.verdict,
            Verdict::NeedsApprovals,
            "{name}: {}",
            dec.reason
        );
        assert_eq!(dec.pending[0].have, 1, "{name}");
    }
    // expiry boundary: valid while now < expiry
    let second = approve(&s.risk[1], digest, NOW + 1, &d);
    assert!(decide(&s, &[good.clone(), second.clone()], NOW).is_allowed());
    assert!(!decide(&s, &[good, second], NOW + 1).is_allowed());
}

#[test]
fn operations_need_their_tier() {
    let s = setup();
    let d = s.policy.approval_domain().clone();
    let digest = Operation::Unfreeze.digest(b"nonce-1");
    let one = [approve(&s.admins[0], digest, NOW + 60, &d)];
    assert_eq!(
        s.policy
            .evaluate_operation(Operation::Unfreeze, digest, &one, NOW)
            .verdict,
        Verdict::NeedsApprovals
    );
    let risk = [
        approve(&s.risk[0], digest, NOW + 60, &d),
        approve(&s.risk[1], digest, NOW + 60, &d),
    ];
    assert_eq!(
        s.policy
            .evaluate_operation(Operation::Unfreeze, digest, &risk, NOW)
            .verdict,
        Verdict::NeedsApprovals
    );
    let two = [
        approve(&s.admins[0], digest, NOW + 60, &d),
        approve(&s.admins[2], digest, NOW + 60, &d),
    ];
    assert!(
        s.policy
            .evaluate_operation(Operation::Unfreeze, digest, &two, NOW)
            .is_allowed()
    );
    let other = Operation::Unfreeze.digest(b"nonce-2");
    assert!(
        !s.policy
            .evaluate_operation(Operation::Unfreeze, other, &two, NOW)
            .is_allowed()
    );
    let d2 = s
        .policy
        .evaluate_operation(Operation::PolicyChange, digest, &two, NOW);
    assert_eq!(d2.code, Code::OperationNotConfigured);
    assert_ne!(
        Operation::Unfreeze.digest(b"x"),
        Operation::PolicyChange.digest(b"x")
    );
}

fn grant(budget: U256, dest: Address) -> BudgetGrant {
    BudgetGrant {
        client: "strategy".into(),
        key: "hot".into(),
        maxValue: ether(5),
        maxCost: ether(6),
        destinations: vec![dest],
        budget,
        window: 0,
        validFrom: NOW - 10,
        validUntil: NOW + 3600,
        nonce: 1,
    }
}

#[test]
fn grant_lets_matching_requests_through_until_spent() {
    let s = setup();
    let d = s.policy.approval_domain().clone();
    let g = grant(ether(11), addr(0xa));
    let signed = SignedGrant {
        signatures: sign_grant(&[&s.risk[0], &s.risk[1]], &g, &d),
        grant: g,
    };
    let vg = s.policy.verify_grant(&signed, NOW).unwrap();
    assert_eq!(vg.signers().len(), 2);
    let grants = [vg.clone()];
    let mut limits = MemoryLimits::new();
    let req = big_request(); // 5 ether + 21000 gwei worst case
    let cost = ether(5) + U256::from(21_000u64 * GWEI);
    for i in 0..2 {
        let mut ctx = Context::new(NOW + i, &limits);
        ctx.grants = &grants;
        let dec = s.policy.evaluate(&req, &ctx);
        assert_eq!(dec.code, Code::AllowedByGrant, "{i}: {}", dec.reason);
        assert_eq!(dec.grant, Some(vg.id()));
        assert!(
            dec.reservations
                .iter()
                .any(|r| r.window == vg.window() && r.amount == cost)
        );
        limits.apply(&dec, NOW + i);
    }
    let mut ctx = Context::new(NOW + 2, &limits);
    ctx.grants = &grants;
    let dec = s.policy.evaluate(&req, &ctx);
    assert_eq!(dec.verdict, Verdict::NeedsApprovals);
    assert!(dec.reason.contains("budget exhausted"), "{}", dec.reason);
}

#[test]
fn grant_must_match_and_be_signed_by_threshold() {
    let s = setup();
    let d = s.policy.approval_domain().clone();
    let check = |g: BudgetGrant, signers: &[&PrivateKeySigner], now: u64| {
        let signed = SignedGrant {
            signatures: sign_grant(signers, &g, &d),
            grant: g,
        };
        let vg = s.policy.verify_grant(&signed, NOW).unwrap();
        let limits = MemoryLimits::new();
        let grants = [vg];
        let mut ctx = Context::new(now, &limits);
        ctx.grants = &grants;
        s.policy.evaluate(&big_request(), &ctx).code
    };
    let base = || grant(ether(100), addr(0xa));
    assert_eq!(
        check(base(), &[&s.risk[0], &s.risk[1]], NOW),
        Code::AllowedByGrant
    );
    // fewer than threshold distinct approvers: one signer, or the same one twice
    assert_eq!(check(base(), &[&s.risk[0]], NOW), Code::ApprovalsRequired);
    assert_eq!(
        check(base(), &[&s.risk[0], &s.risk[0]], NOW),
        Code::ApprovalsRequired
    );
    // approvers of another set do not count for this tier
    assert_eq!(
        check(base(), &[&s.admins[0], &s.admins[1]], NOW),
        Code::ApprovalsRequired
    );
    let mut g = base();
    g.client = "other".into();
    assert_eq!(
        check(g, &[&s.risk[0], &s.risk[1]], NOW),
        Code::ApprovalsRequired
    );
    let mut g = base();
    g.key = "cold".into();
    assert_eq!(
        check(g, &[&s.risk[0], &s.risk[1]], NOW),
        Code::ApprovalsRequired
    );
    assert_eq!(
        check(grant(ether(100), addr(0xb)), &[&s.risk[0], &s.risk[1]], NOW),
        Code::ApprovalsRequired
    );
    let mut g = base();
    g.maxValue = ether(5) - U256::from(1);
    assert_eq!(
        check(g, &[&s.risk[0], &s.risk[1]], NOW),
        Code::ApprovalsRequired
    );
    let mut g = base();
    g.maxCost = ether(5);
    assert_eq!(
        check(g, &[&s.risk[0], &s.risk[1]], NOW),
        Code::ApprovalsRequired
    );
    // validity: from inclusive, until exclusive
    let mut g = base();
    g.validFrom = NOW + 1;
    assert_eq!(
        check(g.clone(), &[&s.risk[0], &s.risk[1]], NOW),
        Code::ApprovalsRequired
    );
    assert_eq!(
        check(g, &[&s.risk[0], &s.risk[1]], NOW + 1),
        Code::AllowedByGrant
    );
    assert_eq!(
        check(base(), &[&s.risk[0], &s.risk[1]], NOW + 3599),
        Code::AllowedByGrant
    );
    assert_eq!(
        check(base(), &[&s.risk[0], &s.risk[1]], NOW + 3600),
        Code::ApprovalsRequired
    );
}

#[test]
fn verify_grant_refuses_bad_grants() {
    let s = setup();
    let d = s.policy.approval_domain().clone();
    let g = grant(ether(1), addr(0xa));
    let wrong_domain = SignedGrant {
        signatures: sign_grant(&[&s.risk[0]], &g, &castellan_domain(5)),
        grant: g.clone(),
    };
    let e = s.policy.verify_grant(&wrong_domain, NOW).unwrap_err();
    assert!(
        matches!(&e, PolicyError::Grant(m) if m.contains("no signature recovers to a registered approver")),
        "{e}"
    );
    let unknown = SignedGrant {
        signatures: sign_grant(&[&signer(77)], &g, &d),
        grant: g.clone(),
    };
    assert!(s.policy.verify_grant(&unknown, NOW).is_err());
    let ok = SignedGrant {
        signatures: sign_grant(&[&s.risk[0]], &g, &d),
        grant: g.clone(),
    };
    assert!(s.policy.verify_grant(&ok, NOW).is_ok());
    let e = s.policy.verify_grant(&ok, NOW + 3600).unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
    let mut tampered = ok.clone();
    tampered.grant.budget = ether(1000);
    assert!(
        s.policy.verify_grant(&tampered, NOW).is_err(),
        "a changed grant no longer recovers to the approver"
    );
    let mut empty = ok;
    empty.grant.validUntil = empty.grant.validFrom;
    assert!(s.policy.verify_grant(&empty, NOW).is_err());
}
