//! Loading: the deploy example, refused files with messages naming the problem and the line,
//! and the stability of the policy hash.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use alloy::primitives::{Address, B256, U256};
use castellan_policy::{Code, Context, MemoryLimits, Policy, PolicyError, RequestKind};
use common::{ether, request, tx, tx_request};

const DEPLOY: &str = include_str!("../../deploy/policy.toml");

#[test]
fn deploy_example_loads() {
    let p = Policy::from_toml(DEPLOY).unwrap_or_else(|e| panic!("deploy/policy.toml: {e}"));
    assert!(p.has_key(&"searcher-hot".into()));
    assert!(p.has_key(&"relay-auth".into()));
    assert!(p.canonical_form().starts_with("castellan-policy/1 {"));

    // The example means what its comments say.
    let weth: Address = "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2"
        .parse()
        .unwrap();
    let arb = "spiffe://castellan/strategy/arb-1";
    let limits = MemoryLimits::new();
    let ctx = Context::new(1_800_000_000, &limits);
    let code = |r| p.evaluate(&r, &ctx).code;
    assert_eq!(
        code(tx_request("searcher-hot", arb, tx(weth, ether(1)))),
        Code::Allowed
    );
    assert_eq!(
        code(tx_request(
            "searcher-hot",
            arb,
            tx(weth, ether(1) + U256::from(1))
        )),
        Code::ApprovalsRequired
    );
    assert_eq!(
        code(tx_request("searcher-hot", arb, tx(weth, ether(2)))),
        Code::ValueCapExceeded
    );
    assert_eq!(
        code(tx_request("treasury", arb, tx(weth, ether(1)))),
        Code::ClientNotAllowed
    );
    let relay = format!("{}", B256::repeat_byte(0x5a)).into_bytes();
    let submitter = "spiffe://castellan/submitter";
    assert_eq!(
        code(request(
            "relay-auth",
            submitter,
            RequestKind::RelayAuth(relay.clone())
        )),
        Code::Allowed
    );
    assert_eq!(
        code(request(
            "searcher-hot",
            arb,
            RequestKind::PersonalMessage(relay)
        )),
        Code::RelayAuthReserved
    );
}

fn err(src: &str) -> PolicyError {
    match Policy::from_toml(src) {
        Ok(_) => panic!("policy unexpectedly loaded:\n{src}"),
        Err(e) => e,
    }
}

/// (case, file, expected line, substrings of the message)
const REFUSED: &[(&str, &str, usize, &[&str])] = &[
    (
        "negative amount",
        "[defaults]\nchain_ids = [1]\nmax_value = -5\n",
        3,
        &["negative amount `-5`", "max_value = -5"],
    ),
    (
        "negative amount string",
        "\n[[keys]]\nname = \"k\"\nmax_cost = \"-1 ether\"\n",
        4,
        &["negative amount `-1 ether`"],
    ),
    (
        "unit typo",
        "[[keys]]\nname = \"k\"\n\nmax_value = \"1 ehter\"\n",
        4,
        &[
            "unknown unit `ehter`",
            "expected wei, gwei or ether",
            "max_value = \"1 ehter\"",
        ],
    ),
    (
        "eth is not a unit",
        "[defaults]\nmax_value = \"0.1 eth\"\n",
        2,
        &["unknown unit `eth`"],
    ),
    (
        "float amount",
        "[defaults]\nmax_value = 1.5\n",
        2,
        &["is a float", "\"1.5 ether\""],
    ),
    (
        "fractional wei",
        "[defaults]\nmax_fee_per_gas = \"1.5 wei\"\n",
        2,
        &["not a whole number of wei"],
    ),
    (
        "duration unit typo",
        "[defaults]\n[[defaults.rate]]\nwindow = \"1hr\"\nmax_requests = 5\n",
        3,
        &["unknown unit `hr`"],
    ),
    (
        "duration without unit",
        "[defaults]\nrate = [{ window = 60, max_requests = 5 }]\n",
        2,
        &["needs a unit", "\"60s\""],
    ),
    (
        "unknown field",
        "[[keys]]\nname = \"k\"\nmax_valu = \"1 ether\"\n",
        3,
        &["unknown field `max_valu`"],
    ),
    (
        "unknown top-level table",
        "[default]\nchain_ids = [1]\n",
        1,
        &["unknown field `default`"],
    ),
    (
        "unknown field in tier",
        "[[tiers]]\nname = \"t\"\napprovers = \"a\"\nthreshold = 1\nabove = 5\n",
        5,
        &["unknown field `above`"],
    ),
    (
        "toml syntax",
        "[defaults]\nchain_ids = [1,\n\nmax_value = 3\n",
        4,
        &[],
    ),
    (
        "bad checksum",
        "[defaults]\ndeny_destinations = [\"0xD8dA6BF26964aF9D7eEd9e03E53415D37aA96045\"]\n",
        2,
        &["invalid address"],
    ),
    (
        "bad selector",
        "[[keys]]\nname = \"k\"\n[[keys.selectors]]\nto = \"0x0000000000000000000000000000000000000001\"\nallow = [\"transfer(address,uint)\"]\n",
        5,
        &["uint256"],
    ),
    (
        "threshold above approvers",
        "[approvers]\nops = [\"0x0000000000000000000000000000000000000001\", \"0x0000000000000000000000000000000000000002\"]\n\n[[tiers]]\nname = \"big\"\napprovers = \"ops\"\nthreshold = 3\nabove_value = \"1 ether\"\n",
        7,
        &[
            "tiers.big.threshold",
            "threshold 3 is above the 2 approvers of set `ops`",
        ],
    ),
    (
        "threshold zero",
        "[approvers]\nops = [\"0x0000000000000000000000000000000000000001\"]\n[[tiers]]\nname = \"big\"\napprovers = \"ops\"\nthreshold = 0\nabove_value = 1\n",
        6,
        &["at least 1"],
    ),
    (
        "unknown approver set",
        "[[tiers]]\nname = \"big\"\napprovers = \"nobody\"\nthreshold = 1\nabove_value = 1\n",
        3,
        &["unknown approver set `nobody`"],
    ),
    (
        "duplicate approver",
        "[approvers]\nops = [\"0x0000000000000000000000000000000000000001\", \"0x0000000000000000000000000000000000000001\"]\n",
        2,
        &["listed twice"],
    ),
    (
        "duplicate key names",
        "[[keys]]\nname = \"hot\"\n\n[[keys]]\nname = \"hot\"\n",
        5,
        &["duplicate key rule name `hot`", "first defined at line 2"],
    ),
    (
        "duplicate client",
        "[[keys]]\nname = \"hot\"\n[[clients]]\nidentity = \"a\"\nkeys = [\"hot\"]\n[[clients]]\nidentity = \"a\"\nkeys = []\n",
        7,
        &["duplicate client rule `a`"],
    ),
    (
        "duplicate tier names",
        "[approvers]\nops = [\"0x0000000000000000000000000000000000000001\"]\n[[tiers]]\nname = \"t\"\napprovers = \"ops\"\nthreshold = 1\nabove_value = 1\n[[tiers]]\nname = \"t\"\napprovers = \"ops\"\nthreshold = 1\noperation = \"unfreeze\"\n",
        9,
        &["duplicate tier name `t`"],
    ),
    (
        "tier names unknown client",
        "[[keys]]\nname = \"hot\"\n[approvers]\nops = [\"0x0000000000000000000000000000000000000001\"]\n[[tiers]]\nname = \"t\"\napprovers = \"ops\"\nthreshold = 1\nclients = [\"ghost\"]\nabove_value = 1\n",
        6,
        &["tiers.t.clients", "unknown client `ghost`"],
    ),
    (
        "client names unknown key",
        "[[keys]]\nname = \"hot\"\n[[clients]]\nidentity = \"a\"\nkeys = [\"hto\"]\n",
        5,
        &["clients.a.keys", "unknown key `hto`"],
    ),
    (
        "allowed and denied",
        "[[keys]]\nname = \"hot\"\ndeny_destinations = [\"0x0000000000000000000000000000000000000001\"]\nallow_destinations = [\"0x0000000000000000000000000000000000000001\"]\n",
        4,
        &["both allowed and denied"],
    ),
    (
        "tier without trigger",
        "[approvers]\nops = [\"0x0000000000000000000000000000000000000001\"]\n[[tiers]]\nname = \"t\"\napprovers = \"ops\"\nthreshold = 1\n",
        4,
        &["tier has no trigger"],
    ),
    (
        "operation tier with trigger",
        "[approvers]\nops = [\"0x0000000000000000000000000000000000000001\"]\n[[tiers]]\nname = \"t\"\napprovers = \"ops\"\nthreshold = 1\noperation = \"unfreeze\"\nabove_value = 1\n",
        4,
        &["operation tier cannot"],
    ),
    (
        "unknown operation",
        "[[tiers]]\nname = \"t\"\napprovers = \"a\"\nthreshold = 1\noperation = \"unfreze\"\n",
        5,
        &["unfreze"],
    ),
    (
        "velocity without cap",
        "[[keys]]\nname = \"k\"\nvelocity = [{ window = \"1h\" }]\n",
        2,
        &["keys.k.velocity[1h]", "needs max_value or max_cost"],
    ),
    (
        "relay key with message flags",
        "[[keys]]\nname = \"r\"\nrelay_auth = true\npersonal_sign = true\n",
        2,
        &["keys.r.personal_sign", "relay-auth"],
    ),
    (
        "breaker zero",
        "[[keys]]\nname = \"k\"\nbreaker = { failures = 0, cooldown = \"1m\" }\n",
        3,
        &["keys.k.breaker.failures"],
    ),
];

#[test]
fn malformed_and_contradictory_files_are_refused_with_line_and_reason() {
    for (case, src, line, needles) in REFUSED {
        let e = err(src);
        let got_line = match &e {
            PolicyError::Syntax { line, .. } | PolicyError::Invalid { line, .. } => *line,
            PolicyError::Grant(_) => panic!("{case}: unexpected {e}"),
        };
        let msg = e.to_string();
        assert_eq!(got_line, *line, "{case}: wrong line in `{msg}`");
        assert!(
            msg.contains(&format!("policy line {line}")),
            "{case}: {msg}"
        );
        for n in *needles {
            assert!(msg.contains(n), "{case}: `{msg}` does not contain `{n}`");
        }
    }
}

#[test]
fn hash_ignores_comments_whitespace_order_and_spelling() {
    let a = r#"
[defaults]
chain_ids = [1, 10]
max_value = "1 ether"
rate = [{ window = "1m", max_requests = 5 }, { window = "1h", max_requests = 50 }]

[[keys]]
name = "a"
allow_destinations = ["0x0000000000000000000000000000000000000001", "0x0000000000000000000000000000000000000002"]
selectors = [{ to = "0x0000000000000000000000000000000000000001", allow = ["transfer(address,uint256)"] }]

[[keys]]
name = "b"
"#;
    let b = r#"
# the same policy, reordered and respelled
[[keys]]
selectors = [{ allow = ["0xa9059cbb"], to = "0x0000000000000000000000000000000000000001" }]
allow_destinations = ["0x0000000000000000000000000000000000000002","0x0000000000000000000000000000000000000001"]
name   = "a"     # key a

[defaults]
rate = [{ max_requests = 50, window = "60m" }, { window = "60s", max_requests = 5 }]
max_value = "1000000000000000000"
chain_ids = [10, 1]

[[keys]]
name = "b"
"#;
    let c = a.replace("\"1 ether\"", "\"1.000000000000000001 ether\"");
    let pa = Policy::from_toml(a).unwrap();
    let pb = Policy::from_toml(b).unwrap();
    let pc = Policy::from_toml(&c).unwrap();
    assert_eq!(pa.canonical_form(), pb.canonical_form());
    assert_eq!(pa.hash(), pb.hash());
    assert_ne!(pa.hash(), pc.hash());
    assert!(
        pa.canonical_form()
            .contains("\"max_value\":\"1000000000000000000\"")
    );
}
