//! The outcome of an evaluation: a verdict, a stable code, a one-line reason, and what to reserve.

use std::fmt;

use alloy::primitives::{Address, B256};
use serde::Serialize;

use crate::limits::Reservation;

/// Allow, wait for approvals, or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Sign, after committing the reservations.
    Allow,
    /// Do not sign yet: the listed approval tiers must be satisfied first.
    NeedsApprovals,
    /// Do not sign.
    Deny,
}

macro_rules! codes {
    ($($(#[$doc:meta])* $v:ident => $s:literal,)*) => {
        /// A stable machine-readable decision code (the API's `error.code`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum Code {
            $($(#[$doc])* $v,)*
        }
        impl Code {
            /// The code as snake_case text.
            pub fn as_str(self) -> &'static str {
                match self { $(Code::$v => $s,)* }
            }
            /// Every code (for metrics labels and documentation).
            pub const ALL: &'static [Code] = &[$(Code::$v,)*];
        }
    };
}

codes! {
    /// Allowed.
    Allowed => "allowed",
    /// Allowed because a budget grant covers it.
    AllowedByGrant => "allowed_by_grant",
    /// Allowed because enough approvals were supplied.
    AllowedByApprovals => "allowed_by_approvals",
    /// Approvals are required before signing.
    ApprovalsRequired => "approvals_required",
    /// The global kill switch is on.
    Frozen => "frozen",
    /// The key name has no rule.
    UnknownKey => "unknown_key",
    /// The client has no rule, or its rule does not list the key.
    ClientNotAllowed => "client_not_allowed",
    /// The key is paused.
    KeyPaused => "key_paused",
    /// The key's breaker is open after consecutive failed outcomes.
    BreakerOpen => "breaker_open",
    /// A retiring key version asked to sign something its retiring rules do not allow.
    KeyRetiring => "key_retiring",
    /// A retired (or revoked) key version.
    KeyRetired => "key_retired",
    /// Per-transaction value cap.
    ValueCapExceeded => "value_cap_exceeded",
    /// Per-transaction gas limit cap.
    GasLimitCapExceeded => "gas_limit_cap_exceeded",
    /// Max fee per gas (or gas price) cap.
    MaxFeeCapExceeded => "max_fee_cap_exceeded",
    /// Max priority fee per gas cap.
    PriorityFeeCapExceeded => "priority_fee_cap_exceeded",
    /// Worst-case cost cap.
    CostCapExceeded => "cost_cap_exceeded",
    /// Chain id not allowed.
    ChainNotAllowed => "chain_not_allowed",
    /// Destination not in the allow list.
    DestinationNotAllowed => "destination_not_allowed",
    /// Destination in a deny list.
    DestinationDenied => "destination_denied",
    /// Contract creation not allowed.
    ContractCreationNotAllowed => "contract_creation_not_allowed",
    /// Function selector not allowed for the destination.
    SelectorNotAllowed => "selector_not_allowed",
    /// A velocity window would exceed its limit.
    VelocityExceeded => "velocity_exceeded",
    /// A request-rate window is full.
    RateLimited => "rate_limited",
    /// personal_sign / EIP-712 not allowed for the key or client.
    MessageSigningNotAllowed => "message_signing_not_allowed",
    /// EIP-712 domain not in the allow list.
    TypedDataDomainNotAllowed => "typed_data_domain_not_allowed",
    /// A relay-auth key asked to sign something else.
    RelayAuthOnly => "relay_auth_only",
    /// A non-relay-auth key asked to sign a relay-auth payload.
    RelayAuthReserved => "relay_auth_reserved",
    /// A relay-auth request whose payload is not `0x` + 64 lowercase hex digits.
    RelayAuthMalformed => "relay_auth_malformed",
    /// An empty bundle.
    EmptyBundle => "empty_bundle",
    /// An amount overflowed 256 bits.
    AmountOverflow => "amount_overflow",
    /// A named operation has no approval tier configured, so it cannot be approved.
    OperationNotConfigured => "operation_not_configured",
}

impl Code {
    /// The HTTP status the API answers with (DESIGN "API conventions"): 200 for allowed
    /// (the signature follows), 202 while approvals are pending, 429 when rate limited, 503
    /// while frozen (nothing can be served), 422 for every other policy denial.
    pub fn http_status(self) -> u16 {
        match self {
            Code::Allowed | Code::AllowedByGrant | Code::AllowedByApprovals => 200,
            Code::ApprovalsRequired => 202,
            Code::RateLimited => 429,
            Code::Frozen => 503,
            _ => 422,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Enough for `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`: the rate
/// window with the least room left after this request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RateLimitInfo {
    /// The window's request limit.
    pub limit: u64,
    /// Requests left in the window after this one (0 when rate limited).
    pub remaining: u64,
    /// Unix time at which one more request will fit (the oldest counted request expires).
    pub reset: u64,
    /// The rule, e.g. `clients."a".rate[60s]`.
    pub rule: String,
}

/// An approval tier the request still needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PendingTier {
    /// Tier name.
    pub tier: String,
    /// Approver set name.
    pub approvers: String,
    /// Distinct approvals required.
    pub threshold: u32,
    /// Distinct valid approvals supplied so far.
    pub have: u32,
}

/// The policy's answer to one request.
///
/// # Security
/// Sign only if [`Decision::is_allowed`], and only after committing every entry of
/// `reservations` in the same store transaction that re-checked freeze and key status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Allow, needs approvals, or deny.
    pub verdict: Verdict,
    /// Stable machine-readable code.
    pub code: Code,
    /// One line for a person, naming the rule and the numbers.
    pub reason: String,
    /// Amounts to add to each window when committing (empty unless allowed).
    pub reservations: Vec<Reservation>,
    /// Rate-limit header values, when a rate window applies.
    pub rate_limit: Option<RateLimitInfo>,
    /// Tiers still waiting for approvals (for `NeedsApprovals`).
    pub pending: Vec<PendingTier>,
    /// The budget grant used, if any (its reservation is in `reservations`).
    pub grant: Option<B256>,
    /// Approvers whose approvals were counted (for the audit record).
    pub approvers: Vec<Address>,
}

impl Decision {
    /// True if the request may be signed.
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    pub(crate) fn deny(code: Code, reason: String) -> Self {
        Self {
            verdict: Verdict::Deny,
            code,
            reason,
            reservations: Vec::new(),
            rate_limit: None,
            pending: Vec::new(),
            grant: None,
            approvers: Vec::new(),
        }
    }

    pub(crate) fn allow(code: Code, reason: String, reservations: Vec<Reservation>) -> Self {
        Self {
            verdict: Verdict::Allow,
            code,
            reason,
            reservations,
            ..Self::deny(code, String::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            let s = c.as_str();
            assert!(
                s.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'),
                "{s}"
            );
            assert!(seen.insert(s), "duplicate {s}");
            let json = serde_json::to_string(c).unwrap_or_default();
            assert_eq!(json, format!("\"{s}\""));
            let status = c.http_status();
            assert!(s.starts_with("allowed") == (status == 200), "{s}: {status}");
        }
    }
}
