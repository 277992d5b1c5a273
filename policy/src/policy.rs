//! The compiled policy and its evaluation.

// Internal checks return the final `Decision` as their error: it is built once per request and
// moved, never propagated through layers, so boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet};
use std::fmt;

use alloy::primitives::{Address, B256, Selector, U256, keccak256};
use alloy::sol_types::Eip712Domain;
use serde::{Deserialize, Serialize};

use crate::approvals::{SignedApproval, VerifiedGrant};
use crate::config::{fmt_secs, quote};
use crate::control::KeyControl;
use crate::decision::{Code, Decision, PendingTier, RateLimitInfo, Verdict};
use crate::error::PolicyError;
use crate::limits::{LimitState, Metric, Reservation, WindowId};
use crate::types::{
    ClientId, Fee, KeyName, KeyStatus, Request, RequestKind, TxFacts, TypedDataFacts,
    is_relay_auth_payload,
};

/// A loaded, validated policy. Immutable: a reload builds a new one (with a new hash).
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) hash: B256,
    pub(crate) canonical: String,
    pub(crate) domain: Eip712Domain,
    pub(crate) keys: HashMap<KeyName, KeyPolicy>,
    pub(crate) clients: HashMap<ClientId, ClientPolicy>,
    pub(crate) approver_sets: HashMap<String, ApproverSet>,
    pub(crate) tiers: Vec<Tier>,
}

/// A named operation that needs M-of-N approvals outside the signing path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Lift the global freeze.
    Unfreeze,
    /// Load a new policy.
    PolicyChange,
    /// Destroy a key version's HSM object.
    KeyDestruction,
}

impl Operation {
    /// The text used in the policy file (`operation = "unfreeze"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Unfreeze => "unfreeze",
            Operation::PolicyChange => "policy_change",
            Operation::KeyDestruction => "key_destruction",
        }
    }

    /// The digest approvers sign for this operation on `subject` (for a policy change, the new
    /// policy's hash; for key destruction, the key version's name; for unfreeze, a nonce):
    /// `keccak256("castellan-operation/1:" ‖ op ‖ ":" ‖ subject)`.
    pub fn digest(self, subject: &[u8]) -> B256 {
        let mut buf = Vec::with_capacity(48 + subject.len());
        buf.extend_from_slice(b"castellan-operation/1:");
        buf.extend_from_slice(self.as_str().as_bytes());
        buf.push(b':');
        buf.extend_from_slice(subject);
        keccak256(&buf)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the evaluation needs besides the request: time and the store's state.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    /// Unix seconds.
    pub now: u64,
    /// The global kill switch.
    pub frozen: bool,
    /// The key's pause and breaker state.
    pub key_control: KeyControl,
    /// Reservations already made.
    pub limits: &'a dyn LimitState,
    /// Approvals submitted for this request.
    pub approvals: &'a [SignedApproval],
    /// Grants currently registered (verified with [`Policy::verify_grant`]).
    pub grants: &'a [VerifiedGrant],
}

impl<'a> Context<'a> {
    /// A context at `now` over `limits`: not frozen, key neither paused nor tripped, no
    /// approvals, no grants.
    pub fn new(now: u64, limits: &'a dyn LimitState) -> Self {
        Self {
            now,
            frozen: false,
            key_control: KeyControl::default(),
            limits,
            approvals: &[],
            grants: &[],
        }
    }
}

impl Policy {
    /// Parses, validates and compiles a policy from TOML text.
    ///
    /// # Errors
    /// [`PolicyError::Syntax`] (with line and column) for TOML and schema errors, unknown fields,
    /// bad amounts, units and durations; [`PolicyError::Invalid`] (with line and field) for
    /// contradictions: duplicate names, thresholds above their set, unknown references,
    /// destinations both allowed and denied, tiers without trigger.
    pub fn from_toml(src: &str) -> Result<Self, PolicyError> {
        crate::config::load(src)
    }

    /// keccak256 of [`Policy::canonical_form`]; recorded with every decision.
    pub fn hash(&self) -> B256 {
        self.hash
    }

    /// The canonical serialization the hash covers: the normalized policy as JSON with sorted
    /// keys and sorted lists, amounts in wei, durations in seconds, addresses lowercase,
    /// selectors as hex, prefixed by `castellan-policy/1 `.
    pub fn canonical_form(&self) -> &str {
        &self.canonical
    }

    /// True if the policy has a rule for the key name.
    pub fn has_key(&self, key: &KeyName) -> bool {
        self.keys.contains_key(key)
    }

    /// Every window a request by `client` with `key` counts against (key windows, then client
    /// windows), for a store that wants to load their sums in one query before evaluating.
    /// Grant windows are not included: see [`VerifiedGrant::window`].
    pub fn windows_for(&self, key: &KeyName, client: &ClientId) -> Vec<WindowId> {
        let k = self
            .keys
            .get(key)
            .map(|k| k.rules.windows.iter())
            .into_iter()
            .flatten();
        let c = self
            .clients
            .get(client)
            .map(|c| c.rules.windows.iter())
            .into_iter()
            .flatten();
        k.chain(c).map(|w| w.id.clone()).collect()
    }

    /// Decides one signing request.
    ///
    /// # Security
    /// Pure: reads only its arguments. Every applicable rule must pass — the key's rule (with
    /// `[defaults]` filling its unset fields) and the client's rule are both applied, caps and
    /// windows are cumulative. Any arithmetic overflow denies. The returned reservations cover
    /// every window the request counts against; sign only after committing them atomically.
    pub fn evaluate(&self, req: &Request, ctx: &Context<'_>) -> Decision {
        match self.eval(req, ctx) {
            Ok(d) | Err(d) => d,
        }
    }

    /// Decides a named operation (unfreeze, policy change, key destruction): allowed when every
    /// tier configured for it has `threshold` distinct valid approvals of `digest`.
    pub fn evaluate_operation(
        &self,
        op: Operation,
        digest: B256,
        approvals: &[SignedApproval],
        now: u64,
    ) -> Decision {
        let tiers: Vec<&Tier> = self
            .tiers
            .iter()
            .filter(|t| t.operation == Some(op))
            .collect();
        if tiers.is_empty() {
            return Decision::deny(
                Code::OperationNotConfigured,
                format!(
                    "no approval tier for operation `{op}`: add a [[tiers]] entry with operation = \"{op}\""
                ),
            );
        }
        let signers = self.approval_signers(digest, approvals, now);
        let (pending, used) = self.tier_status(&tiers, &signers);
        if pending.is_empty() {
            let mut d = Decision::allow(
                Code::AllowedByApprovals,
                format!("operation `{op}` approved by {} approver(s)", used.len()),
                Vec::new(),
            );
            d.approvers = used;
            d
        } else {
            needs_approvals(pending, String::new())
        }
    }

    fn eval(&self, req: &Request, ctx: &Context<'_>) -> Result<Decision, Decision> {
        if ctx.frozen {
            return Err(deny(
                Code::Frozen,
                "global freeze is on: nothing signs until an approved unfreeze".into(),
            ));
        }
        let key = self.keys.get(&req.key).ok_or_else(|| {
            deny(
                Code::UnknownKey,
                format!("no [[keys]] rule named `{}`", req.key),
            )
        })?;
        let client = self.clients.get(&req.client).ok_or_else(|| {
            deny(
                Code::ClientNotAllowed,
                format!("no [[clients]] rule for identity `{}`", req.client),
            )
        })?;
        if !client.any_key && !client.keys.contains(&req.key) {
            return Err(deny(
                Code::ClientNotAllowed,
                format!(
                    "client `{}` may not use key `{}` (rule clients.{}.keys)",
                    req.client,
                    req.key,
                    quote(client.id.as_str())
                ),
            ));
        }
        let klabel = || format!("keys.{}", quote(key.name.as_str()));
        if let Some(since) = ctx.key_control.paused_since {
            return Err(deny(
                Code::KeyPaused,
                format!("key `{}` paused since {since}", req.key),
            ));
        }
        if ctx.now < ctx.key_control.breaker_open_until {
            return Err(deny(
                Code::BreakerOpen,
                format!(
                    "breaker of key `{}` open until {} after consecutive failed outcomes (rule {}.breaker)",
                    req.key,
                    ctx.key_control.breaker_open_until,
                    klabel()
                ),
            ));
        }
        let successor = match req.key_status {
            KeyStatus::Active => None,
            KeyStatus::Retiring { successor } => Some(successor),
            KeyStatus::Retired => {
                return Err(deny(
                    Code::KeyRetired,
                    format!(
                        "this version of key `{}` is retired and signs nothing",
                        req.key
                    ),
                ));
            }
        };
        let relay_payload = match &req.kind {
            RequestKind::RelayAuth(m) => {
                if !is_relay_auth_payload(m) {
                    return Err(deny(
                        Code::RelayAuthMalformed,
                        format!(
                            "relay-auth payload of {} bytes is not 0x + 64 lowercase hex digits",
                            m.len()
                        ),
                    ));
                }
                true
            }
            RequestKind::PersonalMessage(m) => is_relay_auth_payload(m),
            _ => false,
        };
        if key.relay_auth && !relay_payload {
            return Err(deny(
                Code::RelayAuthOnly,
                format!(
                    "key `{}` signs only relay-auth payloads (rule {}.relay_auth)",
                    req.key,
                    klabel()
                ),
            ));
        }
        if !key.relay_auth && relay_payload {
            return Err(deny(
                Code::RelayAuthReserved,
                format!(
                    "relay-auth payloads are reserved to relay_auth keys and key `{}` is not one",
                    req.key
                ),
            ));
        }
        if successor.is_some()
            && !matches!(
                req.kind,
                RequestKind::Transaction(_) | RequestKind::Bundle(_)
            )
        {
            return Err(deny(
                Code::KeyRetiring,
                format!(
                    "retiring version of key `{}` signs only transactions its retiring rules allow (rule {})",
                    req.key, key.retiring.rule
                ),
            ));
        }
        let txs: &[TxFacts] = match &req.kind {
            RequestKind::Transaction(tx) => std::slice::from_ref(tx),
            RequestKind::Bundle(txs) if txs.is_empty() => {
                return Err(deny(Code::EmptyBundle, "bundle has no transactions".into()));
            }
            RequestKind::Bundle(txs) => txs,
            RequestKind::RelayAuth(_) => {
                return self.finish(req, key, client, ctx, &[], U256::ZERO, U256::ZERO);
            }
            RequestKind::PersonalMessage(_) if relay_payload => {
                return self.finish(req, key, client, ctx, &[], U256::ZERO, U256::ZERO);
            }
            RequestKind::PersonalMessage(_) => {
                check_message_flag(&key.rules.personal_sign, true, "personal_sign", &klabel())?;
                check_message_flag(&client.rules.personal_sign, false, "personal_sign", "")?;
                return self.finish(req, key, client, ctx, &[], U256::ZERO, U256::ZERO);
            }
            RequestKind::TypedData(d) => {
                check_message_flag(&key.rules.typed_data, true, "typed_data", &klabel())?;
                check_message_flag(&client.rules.typed_data, false, "typed_data", "")?;
                check_domain(&key.rules, true, d, &klabel())?;
                check_domain(&client.rules, false, d, "")?;
                return self.finish(req, key, client, ctx, &[], U256::ZERO, U256::ZERO);
            }
        };
        let bundle = matches!(req.kind, RequestKind::Bundle(_));
        let mut total_value = U256::ZERO;
        let mut total_cost = U256::ZERO;
        for (i, tx) in txs.iter().enumerate() {
            let prefix = if bundle {
                format!("bundle tx {i}: ")
            } else {
                String::new()
            };
            let retiring_ok = match successor {
                Some(succ) => {
                    let sweep =
                        key.retiring.sweep_to_successor && tx.to == Some(succ) && tx.input_len == 0;
                    let listed = tx
                        .to
                        .is_some_and(|t| key.retiring.allow_destinations.contains(&t));
                    if !(sweep || listed) {
                        return Err(deny(
                            Code::KeyRetiring,
                            format!(
                                "{prefix}retiring version of key `{}` may only sweep to its successor {succ} with empty calldata (rule {})",
                                req.key, key.retiring.rule
                            ),
                        ));
                    }
                    true
                }
                None => false,
            };
            check_tx(&key.rules, true, tx, retiring_ok, &prefix, &klabel)?;
            check_tx(&client.rules, false, tx, retiring_ok, &prefix, &klabel)?;
            let overflow = || {
                deny(
                    Code::AmountOverflow,
                    format!("{prefix}worst-case cost overflows 256 bits"),
                )
            };
            let cost = tx.worst_case_cost().ok_or_else(overflow)?;
            total_value = total_value.checked_add(tx.value).ok_or_else(overflow)?;
            total_cost = total_cost.checked_add(cost).ok_or_else(overflow)?;
        }
        let what = if bundle { "bundle " } else { "" };
        for rules in [&key.rules, &client.rules] {
            if let Some(cap) = &rules.max_value
                && total_value > cap.v
            {
                return Err(deny(
                    Code::ValueCapExceeded,
                    format!(
                        "{what}value {total_value} wei exceeds cap {} wei (rule {})",
                        cap.v, cap.rule
                    ),
                ));
            }
            if let Some(cap) = &rules.max_cost
                && total_cost > cap.v
            {
                return Err(deny(
                    Code::CostCapExceeded,
                    format!(
                        "{what}worst-case cost {total_cost} wei exceeds cap {} wei (rule {})",
                        cap.v, cap.rule
                    ),
                ));
            }
        }
        self.finish(req, key, client, ctx, txs, total_value, total_cost)
    }

    /// Windows, then approval tiers and grants.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        req: &Request,
        key: &KeyPolicy,
        client: &ClientPolicy,
        ctx: &Context<'_>,
        txs: &[TxFacts],
        value: U256,
        cost: U256,
    ) -> Result<Decision, Decision> {
        let now = ctx.now;
        let windows = || key.rules.windows.iter().chain(client.rules.windows.iter());
        let mut reservations = Vec::with_capacity(windows().count() + 1);
        let mut rate: Option<RateLimitInfo> = None;
        // Request counts first: a flood is answered 429 before any amount is looked at.
        for w in windows().filter(|w| w.id.metric == Metric::Requests) {
            let spent = ctx.limits.spent(&w.id, now);
            let after = spent.saturating_add(U256::from(1));
            let limit = w.limit.saturating_to::<u64>();
            let reset = ctx
                .limits
                .oldest(&w.id, now)
                .unwrap_or(now)
                .saturating_add(w.id.duration);
            if after > w.limit {
                let info = RateLimitInfo {
                    limit,
                    remaining: 0,
                    reset,
                    rule: w.rule.clone(),
                };
                let mut d = deny(
                    Code::RateLimited,
                    format!(
                        "{spent} requests in the last {}, limit {} (rule {}); retry at {reset}",
                        fmt_secs(w.id.duration),
                        w.limit,
                        w.rule
                    ),
                );
                d.rate_limit = Some(info);
                return Err(d);
            }
            let remaining = (w.limit - after).saturating_to::<u64>();
            if rate.as_ref().is_none_or(|r| remaining < r.remaining) {
                rate = Some(RateLimitInfo {
                    limit,
                    remaining,
                    reset,
                    rule: w.rule.clone(),
                });
            }
            reservations.push(Reservation {
                window: w.id.clone(),
                amount: U256::from(1),
                limit: w.limit,
            });
        }
        for w in windows().filter(|w| w.id.metric != Metric::Requests) {
            let (amount, what) = match w.id.metric {
                Metric::Value => (value, "value"),
                _ => (cost, "worst-case cost"),
            };
            if amount.is_zero() {
                continue;
            }
            let spent = ctx.limits.spent(&w.id, now);
            let after = spent.checked_add(amount);
            if after.is_none_or(|a| a > w.limit) {
                let mut d = deny(
                    Code::VelocityExceeded,
                    format!(
                        "{what} {amount} wei on top of {spent} wei spent in the last {} exceeds limit {} wei (rule {})",
                        fmt_secs(w.id.duration),
                        w.limit,
                        w.rule
                    ),
                );
                d.rate_limit = rate;
                return Err(d);
            }
            reservations.push(Reservation {
                window: w.id.clone(),
                amount,
                limit: w.limit,
            });
        }

        let tiers: Vec<&Tier> = self
            .tiers
            .iter()
            .filter(|t| t.triggers(req, txs, value, cost))
            .collect();
        if tiers.is_empty() {
            let mut d = Decision::allow(Code::Allowed, "allowed".into(), reservations);
            d.rate_limit = rate;
            return Ok(d);
        }
        let signers = self.approval_signers(req.digest, ctx.approvals, now);
        let (pending, used) = self.tier_status(&tiers, &signers);
        if pending.is_empty() {
            let mut d = Decision::allow(
                Code::AllowedByApprovals,
                format!(
                    "approved by {} approver(s) for tier(s) {}",
                    used.len(),
                    tier_names(&tiers)
                ),
                reservations,
            );
            d.rate_limit = rate;
            d.approvers = used;
            return Ok(d);
        }
        let mut note = String::new();
        for g in ctx.grants {
            if !g.covers(&req.client, &req.key, now, value, cost, txs) {
                continue;
            }
            let enough = pending.iter().all(|p| {
                self.approver_sets
                    .get(&p.approvers)
                    .is_some_and(|s| g.approvals_in(&s.members) >= p.threshold)
            });
            if !enough {
                continue;
            }
            let gw = g.window();
            let spent = ctx.limits.spent(&gw, now);
            match spent.checked_add(cost) {
                Some(after) if after <= g.budget() => {
                    reservations.push(Reservation {
                        window: gw,
                        amount: cost,
                        limit: g.budget(),
                    });
                    let mut d = Decision::allow(
                        Code::AllowedByGrant,
                        format!(
                            "within grant {} ({after} of {} wei budget)",
                            g.id(),
                            g.budget()
                        ),
                        reservations,
                    );
                    d.rate_limit = rate;
                    d.grant = Some(g.id());
                    d.approvers = used;
                    return Ok(d);
                }
                _ => {
                    note = format!(
                        "; grant {} budget exhausted ({spent} + {cost} > {} wei)",
                        g.id(),
                        g.budget()
                    );
                }
            }
        }
        let mut d = needs_approvals(pending, note);
        d.rate_limit = rate;
        d.approvers = used;
        Err(d)
    }

    /// Splits tiers into pending ones and the approvers that satisfied the others.
    fn tier_status(
        &self,
        tiers: &[&Tier],
        signers: &[Address],
    ) -> (Vec<PendingTier>, Vec<Address>) {
        let mut pending = Vec::new();
        let mut used = Vec::new();
        for t in tiers {
            let members: &[Address] = self
                .approver_sets
                .get(&t.approvers)
                .map_or(&[], |s| &s.members);
            let have: Vec<Address> = signers
                .iter()
                .copied()
                .filter(|a| members.binary_search(a).is_ok())
                .collect();
            let n = u32::try_from(have.len()).unwrap_or(u32::MAX);
            if n >= t.threshold {
                used.extend(have);
            } else {
                pending.push(PendingTier {
                    tier: t.name.clone(),
                    approvers: t.approvers.clone(),
                    threshold: t.threshold,
                    have: n,
                });
            }
        }
        used.sort();
        used.dedup();
        (pending, used)
    }
}

fn deny(code: Code, reason: String) -> Decision {
    Decision::deny(code, reason)
}

fn needs_approvals(pending: Vec<PendingTier>, note: String) -> Decision {
    let list: Vec<String> = pending
        .iter()
        .map(|p| {
            format!(
                "tier `{}` needs {} of set `{}` (have {})",
                p.tier, p.threshold, p.approvers, p.have
            )
        })
        .collect();
    Decision {
        verdict: Verdict::NeedsApprovals,
        pending,
        ..Decision::deny(
            Code::ApprovalsRequired,
            format!("{}{note}", list.join("; ")),
        )
    }
}

fn tier_names(tiers: &[&Tier]) -> String {
    tiers
        .iter()
        .map(|t| format!("`{}`", t.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Key scope (`is_key`): the flag must be `true`. Client scope: the flag must not be `false`.
fn check_message_flag(
    flag: &Option<Labeled<bool>>,
    is_key: bool,
    field: &str,
    klabel: &str,
) -> Result<(), Decision> {
    match flag {
        Some(f) if f.v => Ok(()),
        Some(f) => Err(deny(
            Code::MessageSigningNotAllowed,
            format!("{field} is not allowed (rule {})", f.rule),
        )),
        None if is_key => Err(deny(
            Code::MessageSigningNotAllowed,
            format!("{field} is not allowed (rule {klabel}.{field} unset, default false)"),
        )),
        None => Ok(()),
    }
}

/// Key scope: the domain must match a listed rule (no list: no domain is allowed). Client
/// scope: when the client lists domains, the domain must also match one of them.
fn check_domain(
    rules: &Rules,
    is_key: bool,
    d: &TypedDataFacts,
    klabel: &str,
) -> Result<(), Decision> {
    let describe = || {
        format!(
            "EIP-712 domain (name {:?}, chainId {:?}, verifyingContract {:?})",
            d.name.as_deref().unwrap_or("-"),
            d.chain_id,
            d.verifying_contract
        )
    };
    match &rules.typed_data_domains {
        Some(list) if list.v.iter().any(|r| r.matches(d)) => Ok(()),
        Some(list) => Err(deny(
            Code::TypedDataDomainNotAllowed,
            format!("{} is not allowed (rule {})", describe(), list.rule),
        )),
        None if is_key => Err(deny(
            Code::TypedDataDomainNotAllowed,
            format!(
                "{} is not allowed (rule {klabel}.typed_data_domains unset)",
                describe()
            ),
        )),
        None => Ok(()),
    }
}

/// Per-transaction checks of one scope. In the key scope, missing `chain_ids` and missing
/// `allow_contract_creation` deny; in the client scope a missing field adds no restriction.
fn check_tx(
    rules: &Rules,
    is_key: bool,
    tx: &TxFacts,
    retiring_ok: bool,
    prefix: &str,
    klabel: &dyn Fn() -> String,
) -> Result<(), Decision> {
    match &rules.chain_ids {
        Some(ids) if !ids.v.contains(&tx.chain_id) => {
            return Err(deny(
                Code::ChainNotAllowed,
                format!(
                    "{prefix}chain id {} is not in {:?} (rule {})",
                    tx.chain_id, ids.v, ids.rule
                ),
            ));
        }
        None if is_key => {
            return Err(deny(
                Code::ChainNotAllowed,
                format!(
                    "{prefix}chain id {} is not allowed (rule {}.chain_ids unset)",
                    tx.chain_id,
                    klabel()
                ),
            ));
        }
        _ => {}
    }
    match tx.to {
        None => {
            let allowed = match &rules.allow_contract_creation {
                Some(f) => f.v,
                None => !is_key,
            };
            if !allowed {
                let rule = rules.allow_contract_creation.as_ref().map_or_else(
                    || format!("{}.allow_contract_creation unset, default false", klabel()),
                    |f| f.rule.clone(),
                );
                return Err(deny(
                    Code::ContractCreationNotAllowed,
                    format!("{prefix}contract creation is not allowed (rule {rule})"),
                ));
            }
        }
        Some(to) => {
            for d in &rules.deny_destinations {
                if d.v.contains(&to) {
                    return Err(deny(
                        Code::DestinationDenied,
                        format!("{prefix}destination {to} is denied (rule {})", d.rule),
                    ));
                }
            }
            if !retiring_ok
                && let Some(a) = &rules.allow_destinations
                && !a.v.contains(&to)
            {
                return Err(deny(
                    Code::DestinationNotAllowed,
                    format!(
                        "{prefix}destination {to} is not in the allow list (rule {})",
                        a.rule
                    ),
                ));
            }
            if let Some(sel) = rules.selectors.get(&to) {
                let ok = match (tx.input_len, tx.selector) {
                    (0, _) => sel.v.allow_empty_calldata,
                    (_, Some(s)) => sel.v.allow.contains(&s),
                    (_, None) => false,
                };
                if !ok {
                    let got = match (tx.input_len, tx.selector) {
                        (0, _) => "empty calldata".to_string(),
                        (_, Some(s)) => format!("selector {s}"),
                        (n, None) => format!("{n}-byte calldata without a selector"),
                    };
                    return Err(deny(
                        Code::SelectorNotAllowed,
                        format!(
                            "{prefix}{got} is not allowed for destination {to} (rule {})",
                            sel.rule
                        ),
                    ));
                }
            }
        }
    }
    if let Some(cap) = &rules.max_gas_limit
        && tx.gas_limit > cap.v
    {
        return Err(deny(
            Code::GasLimitCapExceeded,
            format!(
                "{prefix}gas limit {} exceeds cap {} (rule {})",
                tx.gas_limit, cap.v, cap.rule
            ),
        ));
    }
    if let Some(cap) = &rules.max_fee_per_gas {
        let (price, name) = match tx.fee {
            Fee::GasPrice(p) => (p, "gas price"),
            Fee::Eip1559 {
                max_fee_per_gas, ..
            } => (max_fee_per_gas, "max fee per gas"),
        };
        if price > cap.v {
            return Err(deny(
                Code::MaxFeeCapExceeded,
                format!(
                    "{prefix}{name} {price} wei exceeds cap {} wei (rule {})",
                    cap.v, cap.rule
                ),
            ));
        }
    }
    if let (
        Some(cap),
        Fee::Eip1559 {
            max_priority_fee_per_gas: p,
            ..
        },
    ) = (&rules.max_priority_fee_per_gas, tx.fee)
        && p > cap.v
    {
        return Err(deny(
            Code::PriorityFeeCapExceeded,
            format!(
                "{prefix}max priority fee per gas {p} wei exceeds cap {} wei (rule {})",
                cap.v, cap.rule
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Compiled rule types (built by `config`)
// ---------------------------------------------------------------------------------------------

/// A value with the rule path that set it (for reasons).
#[derive(Debug, Clone)]
pub(crate) struct Labeled<T> {
    pub v: T,
    pub rule: String,
}

/// A rolling-window limit.
#[derive(Debug, Clone)]
pub(crate) struct LimitWindow {
    pub id: WindowId,
    pub limit: U256,
    pub rule: String,
}

#[derive(Debug, Clone)]
pub(crate) struct SelectorRule {
    pub allow: HashSet<Selector>,
    pub allow_empty_calldata: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct DomainRule {
    pub name: Option<String>,
    pub chain_id: Option<u64>,
    pub verifying_contract: Option<Address>,
}

impl DomainRule {
    /// Every field the rule sets must equal the request's (an absent request field never matches
    /// a set rule field).
    fn matches(&self, d: &TypedDataFacts) -> bool {
        self.name
            .as_ref()
            .is_none_or(|n| d.name.as_ref() == Some(n))
            && self.chain_id.is_none_or(|c| d.chain_id == Some(c))
            && self
                .verifying_contract
                .is_none_or(|v| d.verifying_contract == Some(v))
    }
}

/// The rules of one scope (a key with its defaults, or a client).
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub chain_ids: Option<Labeled<Vec<u64>>>,
    pub allow_contract_creation: Option<Labeled<bool>>,
    pub allow_destinations: Option<Labeled<HashSet<Address>>>,
    pub deny_destinations: Vec<Labeled<HashSet<Address>>>,
    pub selectors: HashMap<Address, Labeled<SelectorRule>>,
    pub max_value: Option<Labeled<U256>>,
    pub max_gas_limit: Option<Labeled<u64>>,
    pub max_fee_per_gas: Option<Labeled<U256>>,
    pub max_priority_fee_per_gas: Option<Labeled<U256>>,
    pub max_cost: Option<Labeled<U256>>,
    pub windows: Vec<LimitWindow>,
    pub personal_sign: Option<Labeled<bool>>,
    pub typed_data: Option<Labeled<bool>>,
    pub typed_data_domains: Option<Labeled<Vec<DomainRule>>>,
}

#[derive(Debug, Clone)]
pub(crate) struct BreakerRule {
    pub failures: u32,
    pub cooldown: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct RetiringRule {
    pub sweep_to_successor: bool,
    pub allow_destinations: HashSet<Address>,
    pub rule: String,
}

#[derive(Debug, Clone)]
pub(crate) struct KeyPolicy {
    pub name: KeyName,
    pub rules: Rules,
    pub relay_auth: bool,
    pub breaker: Option<BreakerRule>,
    pub retiring: RetiringRule,
    pub pause_cooldown: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct ClientPolicy {
    pub id: ClientId,
    pub rules: Rules,
    pub keys: HashSet<KeyName>,
    pub any_key: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct ApproverSet {
    /// Sorted, distinct.
    pub members: Vec<Address>,
}

#[derive(Debug, Clone)]
pub(crate) struct Tier {
    pub name: String,
    pub approvers: String,
    pub threshold: u32,
    pub keys: Option<HashSet<KeyName>>,
    pub clients: Option<HashSet<ClientId>>,
    pub above_value: Option<U256>,
    pub above_cost: Option<U256>,
    pub destinations: HashSet<Address>,
    pub selectors: HashSet<Selector>,
    pub operation: Option<Operation>,
}

impl Tier {
    /// A transaction tier triggers when it is in scope and any of its conditions holds.
    fn triggers(&self, req: &Request, txs: &[TxFacts], value: U256, cost: U256) -> bool {
        if self.operation.is_some() || txs.is_empty() {
            return false;
        }
        if self.keys.as_ref().is_some_and(|k| !k.contains(&req.key))
            || self
                .clients
                .as_ref()
                .is_some_and(|c| !c.contains(&req.client))
        {
            return false;
        }
        self.above_value.is_some_and(|v| value > v)
            || self.above_cost.is_some_and(|c| cost > c)
            || txs
                .iter()
                .any(|t| t.to.is_some_and(|a| self.destinations.contains(&a)))
            || txs
                .iter()
                .any(|t| t.selector.is_some_and(|s| self.selectors.contains(&s)))
    }
}
