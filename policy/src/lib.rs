//! Castellan policy engine: pure, no I/O, no clock.
//!
//! The signer calls [`Policy::evaluate`] for every signing request with a [`Context`] holding
//! the time, the freeze and key-control state, the limit-window state ([`LimitState`]), and any
//! approvals and grants. The answer is a [`Decision`]: allow (with the [`Reservation`]s to commit
//! atomically before signing), needs approvals, or deny, with a stable [`Code`] and a one-line
//! reason naming the rule and the numbers.
//!
//! # Policy file
//!
//! TOML, `deny_unknown_fields` everywhere; `deploy/policy.toml` is a commented example.
//! Amounts are integers (wei) or strings with a unit: `"1000"`, `"30 gwei"`, `"1.5 ether"`
//! (units: wei, gwei, ether). Durations are strings: `"90s"`, `"1m"`, `"1h"`, `"7d"`.
//!
//! - `[approval_domain] chain_id` — EIP-712 domain of approvals and grants (default 1).
//! - `[defaults]` — values for every `[[keys]]` entry that does not set the field.
//! - `[[keys]]` `name`, `relay_auth`, limit fields, `breaker`, `retiring`, `pause_cooldown`.
//! - `[[clients]]` `identity`, `keys` (names or `"*"`), limit fields.
//! - `[approvers]` — named sets of approver addresses.
//! - `[[tiers]]` `name`, `approvers`, `threshold`, scope (`keys`, `clients`) and triggers
//!   (`above_value`, `above_cost`, `destinations`, `selectors`) or `operation`.
//!
//! Limit fields: `chain_ids`, `allow_contract_creation`, `allow_destinations`,
//! `deny_destinations`, `[[selectors]]` (`to`, `allow`, `allow_empty_calldata`), `max_value`,
//! `max_gas_limit`, `max_fee_per_gas`, `max_priority_fee_per_gas`, `max_cost`, `[[velocity]]`
//! (`window`, `max_value`, `max_cost`), `[[rate]]` (`window`, `max_requests`), `personal_sign`,
//! `typed_data`, `[[typed_data_domains]]` (`name`, `chain_id`, `verifying_contract`).
//!
//! # Precedence
//!
//! Within a key, most specific wins field by field: a field set on the `[[keys]]` entry replaces
//! the `[defaults]` one (lists are replaced, not merged), except `deny_destinations`, where both
//! lists apply. Across scopes everything is cumulative: the key's rules and the client's rules
//! must both pass, every cap of either must hold, and every window of either is checked and
//! reserved (key windows count every client of the key; client windows count every key of the
//! client). In the key scope an unset `chain_ids`, `allow_contract_creation`, `personal_sign`,
//! `typed_data` or `typed_data_domains` denies; in the client scope an unset field adds no
//! restriction. Every triggered tier must be satisfied.
//!
//! # Evaluation order
//!
//! freeze → key and client known, client may use key → pause → breaker → key status →
//! relay-auth exclusivity → retiring rules → per-transaction rules (chain, creation, deny list,
//! allow list, selectors, gas, fees) for the key then the client → value and cost caps on the
//! request total (a bundle is summed) → rate windows → velocity windows → approval tiers
//! (approvals, else a covering grant with budget left).
//!
//! A retiring key version signs only transactions its `retiring` rules allow (default: a plain
//! value transfer with empty calldata to the successor's address); for those, allow lists are
//! replaced by the retiring rules, and every other rule (deny lists, caps, windows, tiers)
//! still applies. A relay-auth key signs only relay-auth payloads (`0x` + 64 lowercase hex
//! digits as an EIP-191 message), and no other key may sign one, whether it arrives as a
//! relay-auth request or as `personal_sign`.
//!
//! # Limit state and reservations
//!
//! Window state is an input ([`LimitState`]): a window counts the reservations with timestamp
//! `t` where `t + duration > now`. The signer evaluates inside the store transaction that then
//! adds [`Decision::reservations`], so check-and-reserve is atomic; window ids depend only on
//! scope, metric and duration, so reservations survive a policy reload. A bundle counts as one
//! request. Amounts are `U256` with checked arithmetic: an overflow denies.

mod approvals;
mod config;
mod control;
mod decision;
mod error;
mod limits;
mod policy;
mod types;
mod units;

pub use approvals::{
    APPROVE, Approval, BudgetGrant, SignedApproval, SignedGrant, VerifiedGrant, castellan_domain,
};
pub use control::{KeyControl, TxOutcome};
pub use decision::{Code, Decision, PendingTier, RateLimitInfo, Verdict};
pub use error::PolicyError;
pub use limits::{LIFETIME, LimitState, MemoryLimits, Metric, Reservation, WindowId, WindowScope};
pub use policy::{Context, Operation, Policy};
pub use types::{
    ClientId, Fee, KeyName, KeyStatus, Request, RequestKind, TxFacts, TypedDataFacts,
    is_relay_auth_payload,
};
pub use units::{parse_amount, parse_duration, parse_selector};
