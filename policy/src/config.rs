//! The policy file: TOML schema (`deny_unknown_fields` everywhere), validation, compilation
//! into [`Policy`], and the canonical form that the policy hash covers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use alloy::primitives::{Address, B256, U256, keccak256};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::approvals::castellan_domain;
use crate::error::PolicyError;
use crate::limits::{Metric, WindowId, WindowScope};
use crate::policy::{
    ApproverSet, BreakerRule, ClientPolicy, DomainRule, KeyPolicy, Labeled, LimitWindow, Operation,
    Policy, RetiringRule, Rules, SelectorRule, Tier,
};
use crate::types::{ClientId, KeyName};
use crate::units::{Addr, Amount, Dur, Sel};

// ---------------------------------------------------------------------------------------------
// Raw schema
// ---------------------------------------------------------------------------------------------

/// `[[…selectors]]`: calls to `to` must use one of `allow`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSelectorRule {
    pub to: Addr,
    pub allow: Vec<Sel>,
    #[serde(default)]
    pub allow_empty_calldata: bool,
}

/// `[[…velocity]]`: value and/or worst-case cost summed over a rolling window.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVelocity {
    pub window: Dur,
    #[serde(default)]
    pub max_value: Option<Amount>,
    #[serde(default)]
    pub max_cost: Option<Amount>,
}

/// `[[…rate]]`: requests per rolling window.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRate {
    pub window: Dur,
    pub max_requests: u64,
}

/// `[[…typed_data_domains]]`: an allowed EIP-712 domain; absent fields match anything.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDomainRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub chain_id: Option<u64>,
    #[serde(default)]
    pub verifying_contract: Option<Addr>,
}

/// `breaker = { failures = 5, cooldown = "15m" }`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBreaker {
    pub failures: Spanned<u32>,
    pub cooldown: Dur,
}

/// `retiring = { sweep_to_successor = true, allow_destinations = [...] }`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetiring {
    #[serde(default = "yes")]
    pub sweep_to_successor: bool,
    #[serde(default)]
    pub allow_destinations: Vec<Addr>,
}

fn yes() -> bool {
    true
}

/// The limit fields shared by `[defaults]`, `[[keys]]` and `[[clients]]`.
#[derive(Debug, Clone, Default)]
pub(crate) struct RawLimits {
    pub chain_ids: Option<Vec<u64>>,
    pub allow_contract_creation: Option<bool>,
    pub allow_destinations: Option<Spanned<Vec<Addr>>>,
    pub deny_destinations: Option<Vec<Addr>>,
    pub selectors: Option<Vec<RawSelectorRule>>,
    pub max_value: Option<Amount>,
    pub max_gas_limit: Option<u64>,
    pub max_fee_per_gas: Option<Amount>,
    pub max_priority_fee_per_gas: Option<Amount>,
    pub max_cost: Option<Amount>,
    pub velocity: Option<Vec<RawVelocity>>,
    pub rate: Option<Vec<RawRate>>,
    pub personal_sign: Option<bool>,
    pub typed_data: Option<bool>,
    pub typed_data_domains: Option<Vec<RawDomainRule>>,
}

/// Declares a raw rule struct with the shared limit fields (serde's `flatten` cannot be
/// combined with `deny_unknown_fields`, so the fields are spelled into each struct).
macro_rules! with_limits {
    ($(#[$m:meta])* struct $name:ident { $($(#[$fm:meta])* $f:ident : $t:ty,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Deserialize, Serialize)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct $name {
            $($(#[$fm])* pub $f: $t,)*
            #[serde(default)] pub chain_ids: Option<Vec<u64>>,
            #[serde(default)] pub allow_contract_creation: Option<bool>,
            #[serde(default)] pub allow_destinations: Option<Spanned<Vec<Addr>>>,
            #[serde(default)] pub deny_destinations: Option<Vec<Addr>>,
            #[serde(default)] pub selectors: Option<Vec<RawSelectorRule>>,
            #[serde(default)] pub max_value: Option<Amount>,
            #[serde(default)] pub max_gas_limit: Option<u64>,
            #[serde(default)] pub max_fee_per_gas: Option<Amount>,
            #[serde(default)] pub max_priority_fee_per_gas: Option<Amount>,
            #[serde(default)] pub max_cost: Option<Amount>,
            #[serde(default)] pub velocity: Option<Vec<RawVelocity>>,
            #[serde(default)] pub rate: Option<Vec<RawRate>>,
            #[serde(default)] pub personal_sign: Option<bool>,
            #[serde(default)] pub typed_data: Option<bool>,
            #[serde(default)] pub typed_data_domains: Option<Vec<RawDomainRule>>,
        }
        impl $name {
            pub(crate) fn limits(&self) -> RawLimits {
                RawLimits {
                    chain_ids: self.chain_ids.clone(),
                    allow_contract_creation: self.allow_contract_creation,
                    allow_destinations: self.allow_destinations.clone(),
                    deny_destinations: self.deny_destinations.clone(),
                    selectors: self.selectors.clone(),
                    max_value: self.max_value,
                    max_gas_limit: self.max_gas_limit,
                    max_fee_per_gas: self.max_fee_per_gas,
                    max_priority_fee_per_gas: self.max_priority_fee_per_gas,
                    max_cost: self.max_cost,
                    velocity: self.velocity.clone(),
                    rate: self.rate.clone(),
                    personal_sign: self.personal_sign,
                    typed_data: self.typed_data,
                    typed_data_domains: self.typed_data_domains.clone(),
                }
            }
            /// Sorts every list whose order has no meaning, for the canonical form.
            fn normalize_limits(&mut self) {
                sort_opt(&mut self.chain_ids);
                if let Some(a) = self.allow_destinations.as_mut() { a.get_mut().sort(); a.get_mut().dedup(); }
                sort_opt(&mut self.deny_destinations);
                if let Some(s) = self.selectors.as_mut() {
                    for r in s.iter_mut() { r.allow.sort(); r.allow.dedup(); }
                }
                sort_opt(&mut self.selectors);
                sort_opt(&mut self.velocity);
                sort_opt(&mut self.rate);
                sort_opt(&mut self.typed_data_domains);
            }
        }
    };
}

with_limits! {
    #[derive(Default)]
    /// `[defaults]`: values for every `[[keys]]` entry that does not set the field itself.
    struct RawDefaults {
        #[serde(default)] breaker: Option<RawBreaker>,
        #[serde(default)] retiring: Option<RawRetiring>,
        #[serde(default)] pause_cooldown: Option<Dur>,
    }
}

with_limits! {
    /// `[[keys]]`: the rule of one key name.
    struct RawKey {
        name: Spanned<String>,
        #[serde(default)] relay_auth: bool,
        #[serde(default)] breaker: Option<RawBreaker>,
        #[serde(default)] retiring: Option<RawRetiring>,
        #[serde(default)] pause_cooldown: Option<Dur>,
    }
}

with_limits! {
    /// `[[clients]]`: the rule of one client identity; every field is an extra restriction.
    struct RawClient {
        identity: Spanned<String>,
        keys: Spanned<Vec<String>>,
    }
}

/// `[[tiers]]`: an approval tier.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTier {
    pub name: Spanned<String>,
    pub approvers: Spanned<String>,
    pub threshold: Spanned<u32>,
    #[serde(default)]
    pub keys: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub clients: Option<Vec<String>>,
    #[serde(default)]
    pub above_value: Option<Amount>,
    #[serde(default)]
    pub above_cost: Option<Amount>,
    #[serde(default)]
    pub destinations: Option<Vec<Addr>>,
    #[serde(default)]
    pub selectors: Option<Vec<Sel>>,
    #[serde(default)]
    pub operation: Option<Operation>,
}

/// `[approval_domain]`: the EIP-712 domain of approvals and grants.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawApprovalDomain {
    #[serde(default = "one")]
    pub chain_id: u64,
}

impl Default for RawApprovalDomain {
    fn default() -> Self {
        Self { chain_id: 1 }
    }
}

fn one() -> u64 {
    1
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    #[serde(default)]
    pub approval_domain: RawApprovalDomain,
    #[serde(default)]
    pub defaults: RawDefaults,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    #[serde(default)]
    pub clients: Vec<RawClient>,
    #[serde(default)]
    pub approvers: BTreeMap<String, Spanned<Vec<Addr>>>,
    #[serde(default)]
    pub tiers: Vec<RawTier>,
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Parses, validates and compiles a policy file.
pub(crate) fn load(src: &str) -> Result<Policy, PolicyError> {
    let mut raw: RawPolicy = toml::from_str(src).map_err(|e| syntax_error(src, &e))?;
    let lines = Lines(src);
    let policy = compile(&raw, &lines)?;
    normalize(&mut raw);
    let canonical = canonical_form(&raw).map_err(|e| PolicyError::Invalid {
        line: 1,
        field: "policy".into(),
        message: format!("cannot build the canonical form: {e}"),
    })?;
    Ok(Policy {
        hash: keccak256(canonical.as_bytes()),
        canonical,
        ..policy
    })
}

fn syntax_error(src: &str, e: &toml::de::Error) -> PolicyError {
    let offset = e.span().map_or(0, |s| s.start);
    let (line, column) = line_col(src, offset);
    let at = src
        .lines()
        .nth(line.saturating_sub(1))
        .unwrap_or("")
        .trim()
        .to_string();
    PolicyError::Syntax {
        line,
        column,
        message: e.message().trim().to_string(),
        at,
    }
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = src.get(..offset).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

struct Lines<'a>(&'a str);

impl Lines<'_> {
    fn of(&self, span: Range<usize>) -> usize {
        line_col(self.0, span.start).0
    }
    fn invalid(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> PolicyError {
        PolicyError::Invalid {
            line: self.of(span),
            field: field.into(),
            message: message.into(),
        }
    }
}

fn compile(raw: &RawPolicy, lines: &Lines<'_>) -> Result<Policy, PolicyError> {
    // Approver sets.
    let mut approver_sets = HashMap::new();
    for (name, members) in &raw.approvers {
        let field = format!("approvers.{}", quote(name));
        if members.get_ref().is_empty() {
            return Err(lines.invalid(
                members.span(),
                field,
                "an approver set needs at least one address",
            ));
        }
        let mut seen = HashSet::new();
        for a in members.get_ref() {
            if !seen.insert(a.0) {
                return Err(lines.invalid(
                    members.span(),
                    field,
                    format!("approver {} listed twice", a.0),
                ));
            }
        }
        let mut list: Vec<Address> = seen.into_iter().collect();
        list.sort();
        approver_sets.insert(name.clone(), ApproverSet { members: list });
    }

    // Keys.
    let mut keys: HashMap<KeyName, KeyPolicy> = HashMap::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    let defaults = raw.defaults.limits();
    for k in &raw.keys {
        let name = k.name.get_ref();
        let label = format!("keys.{}", quote(name));
        check_name(lines, &k.name, &format!("{label}.name"))?;
        if let Some(first) = first_line.insert(name.clone(), lines.of(k.name.span())) {
            return Err(lines.invalid(
                k.name.span(),
                format!("{label}.name"),
                format!("duplicate key rule name `{name}` (first defined at line {first})"),
            ));
        }
        let key = KeyName::new(name);
        let own = k.limits();
        if k.relay_auth {
            for (field, set) in [
                ("personal_sign", own.personal_sign == Some(true)),
                ("typed_data", own.typed_data == Some(true)),
                ("chain_ids", own.chain_ids.is_some()),
            ] {
                if set {
                    return Err(lines.invalid(
                        k.name.span(),
                        format!("{label}.{field}"),
                        "a relay_auth key signs only relay-auth payloads; remove this field",
                    ));
                }
            }
        }
        let rules = compile_rules(
            lines,
            Some(&defaults),
            &own,
            &label,
            k.name.span(),
            WindowScope::Key(key.clone()),
        )?;
        let breaker = match k.breaker.as_ref().or(raw.defaults.breaker.as_ref()) {
            Some(b) => {
                if *b.failures.get_ref() == 0 {
                    return Err(lines.invalid(
                        b.failures.span(),
                        format!("{label}.breaker.failures"),
                        "must be at least 1",
                    ));
                }
                Some(BreakerRule {
                    failures: *b.failures.get_ref(),
                    cooldown: b.cooldown.0,
                })
            }
            None => None,
        };
        let retiring_src = if k.retiring.is_some() {
            label.clone()
        } else {
            "defaults".into()
        };
        let retiring = match k.retiring.as_ref().or(raw.defaults.retiring.as_ref()) {
            Some(r) => RetiringRule {
                sweep_to_successor: r.sweep_to_successor,
                allow_destinations: r.allow_destinations.iter().map(|a| a.0).collect(),
                rule: format!("{retiring_src}.retiring"),
            },
            None => RetiringRule {
                sweep_to_successor: true,
                allow_destinations: HashSet::new(),
                rule: "retiring (default: sweep to successor)".into(),
            },
        };
        let pause_cooldown = k
            .pause_cooldown
            .or(raw.defaults.pause_cooldown)
            .map_or(0, |d| d.0);
        keys.insert(
            key.clone(),
            KeyPolicy {
                name: key,
                rules,
                relay_auth: k.relay_auth,
                breaker,
                retiring,
                pause_cooldown,
            },
        );
    }

    // Clients.
    let mut clients: HashMap<ClientId, ClientPolicy> = HashMap::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for c in &raw.clients {
        let id = c.identity.get_ref();
        let label = format!("clients.{}", quote(id));
        check_name(lines, &c.identity, &format!("{label}.identity"))?;
        if let Some(first) = first_line.insert(id.clone(), lines.of(c.identity.span())) {
            return Err(lines.invalid(
                c.identity.span(),
                format!("{label}.identity"),
                format!("duplicate client rule `{id}` (first defined at line {first})"),
            ));
        }
        let mut allowed_keys = HashSet::new();
        let mut any_key = false;
        for k in c.keys.get_ref() {
            if k == "*" {
                any_key = true;
            } else if !keys.contains_key(&KeyName::new(k)) {
                return Err(lines.invalid(
                    c.keys.span(),
                    format!("{label}.keys"),
                    format!("unknown key `{k}` (no [[keys]] entry has this name)"),
                ));
            } else {
                allowed_keys.insert(KeyName::new(k));
            }
        }
        let client = ClientId::new(id);
        let rules = compile_rules(
            lines,
            None,
            &c.limits(),
            &label,
            c.identity.span(),
            WindowScope::Client(client.clone()),
        )?;
        clients.insert(
            client.clone(),
            ClientPolicy {
                id: client,
                rules,
                keys: allowed_keys,
                any_key,
            },
        );
    }

    // Tiers.
    let mut tiers = Vec::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for t in &raw.tiers {
        let name = t.name.get_ref();
        let label = format!("tiers.{}", quote(name));
        check_name(lines, &t.name, &format!("{label}.name"))?;
        if let Some(first) = first_line.insert(name.clone(), lines.of(t.name.span())) {
            return Err(lines.invalid(
                t.name.span(),
                format!("{label}.name"),
                format!("duplicate tier name `{name}` (first defined at line {first})"),
            ));
        }
        let set_name = t.approvers.get_ref();
        let Some(set) = approver_sets.get(set_name) else {
            return Err(lines.invalid(
                t.approvers.span(),
                format!("{label}.approvers"),
                format!("unknown approver set `{set_name}` (define it under [approvers])"),
            ));
        };
        let threshold = *t.threshold.get_ref();
        if threshold == 0 {
            return Err(lines.invalid(
                t.threshold.span(),
                format!("{label}.threshold"),
                "threshold must be at least 1",
            ));
        }
        if threshold as usize > set.members.len() {
            return Err(lines.invalid(
                t.threshold.span(),
                format!("{label}.threshold"),
                format!(
                    "threshold {threshold} is above the {} approvers of set `{set_name}`",
                    set.members.len()
                ),
            ));
        }
        let has_tx_trigger = t.above_value.is_some()
            || t.above_cost.is_some()
            || t.destinations.as_ref().is_some_and(|d| !d.is_empty())
            || t.selectors.as_ref().is_some_and(|s| !s.is_empty());
        if t.operation.is_some() && (has_tx_trigger || t.keys.is_some() || t.clients.is_some()) {
            return Err(lines.invalid(
                t.name.span(),
                label,
                "an operation tier cannot also have keys, clients, above_value, above_cost, destinations or selectors",
            ));
        }
        if t.operation.is_none() && !has_tx_trigger {
            return Err(lines.invalid(
                t.name.span(),
                label,
                "tier has no trigger: set above_value, above_cost, destinations, selectors or operation",
            ));
        }
        let tier_keys = match &t.keys {
            Some(ks) => {
                let mut out = HashSet::new();
                for k in ks.get_ref() {
                    if !keys.contains_key(&KeyName::new(k)) {
                        return Err(lines.invalid(
                            ks.span(),
                            format!("{label}.keys"),
                            format!("unknown key `{k}`"),
                        ));
                    }
                    out.insert(KeyName::new(k));
                }
                Some(out)
            }
            None => None,
        };
        let tier_clients = match &t.clients {
            Some(cs) => {
                let mut out = HashSet::new();
                for c in cs {
                    if !clients.contains_key(&ClientId::new(c)) {
                        return Err(lines.invalid(
                            t.name.span(),
                            format!("{label}.clients"),
                            format!("unknown client `{c}`"),
                        ));
                    }
                    out.insert(ClientId::new(c));
                }
                Some(out)
            }
            None => None,
        };
        tiers.push(Tier {
            name: name.clone(),
            approvers: set_name.clone(),
            threshold,
            keys: tier_keys,
            clients: tier_clients,
            above_value: t.above_value.map(|a| a.0),
            above_cost: t.above_cost.map(|a| a.0),
            destinations: t.destinations.iter().flatten().map(|a| a.0).collect(),
            selectors: t.selectors.iter().flatten().map(|s| s.0).collect(),
            operation: t.operation,
        });
    }
    tiers.sort_by(|a, b| a.name.cmp(&b.name));

    Ok(Policy {
        hash: B256::ZERO,
        canonical: String::new(),
        domain: castellan_domain(raw.approval_domain.chain_id),
        keys,
        clients,
        approver_sets,
        tiers,
    })
}

fn check_name(lines: &Lines<'_>, name: &Spanned<String>, field: &str) -> Result<(), PolicyError> {
    if name.get_ref().trim().is_empty() {
        return Err(lines.invalid(name.span(), field, "must not be empty"));
    }
    Ok(())
}

/// Quotes a name the way TOML paths do: bare if it can be, else in double quotes.
pub(crate) fn quote(name: &str) -> String {
    if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\\\""))
    }
}

/// Formats seconds with the largest unit that divides them (`3600` → `1h`).
pub(crate) fn fmt_secs(s: u64) -> String {
    for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s >= n && s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

/// Compiles one scope. For keys, `defaults` supplies every field the key leaves unset (the
/// key's own value wins, field by field), except `deny_destinations`, which is the union of both.
fn compile_rules(
    lines: &Lines<'_>,
    defaults: Option<&RawLimits>,
    own: &RawLimits,
    label: &str,
    span: Range<usize>,
    scope: WindowScope,
) -> Result<Rules, PolicyError> {
    let empty = RawLimits::default();
    let dflt = defaults.unwrap_or(&empty);
    // Picks the key's field or the default's, and names the one used.
    macro_rules! pick {
        ($f:ident) => {
            match (&own.$f, &dflt.$f) {
                (Some(v), _) => Some((v.clone(), format!("{label}.{}", stringify!($f)))),
                (None, Some(v)) => Some((v.clone(), format!("defaults.{}", stringify!($f)))),
                (None, None) => None,
            }
        };
    }
    macro_rules! labeled {
        ($f:ident, $map:expr) => {
            pick!($f).map(|(v, rule)| Labeled { v: $map(v), rule })
        };
    }
    let chain_ids = labeled!(chain_ids, |v: Vec<u64>| v);
    let allow_contract_creation = labeled!(allow_contract_creation, |v: bool| v);
    let allow_destinations = pick!(allow_destinations);
    let mut deny_destinations: Vec<Labeled<HashSet<Address>>> = Vec::new();
    for (src, l) in [
        (label.to_string(), &own.deny_destinations),
        ("defaults".to_string(), &dflt.deny_destinations),
    ] {
        if let Some(list) = l {
            deny_destinations.push(Labeled {
                v: list.iter().map(|a| a.0).collect(),
                rule: format!("{src}.deny_destinations"),
            });
        }
    }
    let allow_destinations = match allow_destinations {
        Some((list, rule)) => {
            let set: HashSet<Address> = list.get_ref().iter().map(|a| a.0).collect();
            for deny in &deny_destinations {
                if let Some(both) = set.iter().find(|a| deny.v.contains(*a)) {
                    return Err(lines.invalid(
                        list.span(),
                        rule,
                        format!(
                            "destination {both} is both allowed and denied ({})",
                            deny.rule
                        ),
                    ));
                }
            }
            Some(Labeled { v: set, rule })
        }
        None => None,
    };
    let mut selectors = HashMap::new();
    if let Some((list, rule)) = pick!(selectors) {
        for r in list {
            let s = SelectorRule {
                allow: r.allow.iter().map(|s| s.0).collect(),
                allow_empty_calldata: r.allow_empty_calldata,
            };
            if selectors
                .insert(
                    r.to.0,
                    Labeled {
                        v: s,
                        rule: rule.clone(),
                    },
                )
                .is_some()
            {
                return Err(lines.invalid(
                    span.clone(),
                    rule,
                    format!("two selector rules for destination {}", r.to.0),
                ));
            }
        }
    }
    let amount = |a: Amount| a.0;
    let max_value = labeled!(max_value, amount);
    let max_gas_limit = labeled!(max_gas_limit, |v: u64| v);
    let max_fee_per_gas = labeled!(max_fee_per_gas, amount);
    let max_priority_fee_per_gas = labeled!(max_priority_fee_per_gas, amount);
    let max_cost = labeled!(max_cost, amount);

    let mut windows = Vec::new();
    if let Some((list, rule)) = pick!(velocity) {
        let mut seen = HashSet::new();
        for v in list {
            let d = v.window.0;
            let at = format!("{rule}[{}]", fmt_secs(d));
            if !seen.insert(d) {
                return Err(lines.invalid(
                    span.clone(),
                    at,
                    "two velocity limits with the same window",
                ));
            }
            if v.max_value.is_none() && v.max_cost.is_none() {
                return Err(lines.invalid(
                    span.clone(),
                    at,
                    "a velocity limit needs max_value or max_cost",
                ));
            }
            for (metric, limit, name) in [
                (Metric::Value, v.max_value, "max_value"),
                (Metric::Cost, v.max_cost, "max_cost"),
            ] {
                if let Some(limit) = limit {
                    windows.push(LimitWindow {
                        id: WindowId {
                            scope: scope.clone(),
                            metric,
                            duration: d,
                        },
                        limit: limit.0,
                        rule: format!("{at}.{name}"),
                    });
                }
            }
        }
    }
    if let Some((list, rule)) = pick!(rate) {
        let mut seen = HashSet::new();
        for r in list {
            let d = r.window.0;
            let at = format!("{rule}[{}]", fmt_secs(d));
            if !seen.insert(d) {
                return Err(lines.invalid(
                    span.clone(),
                    at,
                    "two rate limits with the same window",
                ));
            }
            windows.push(LimitWindow {
                id: WindowId {
                    scope: scope.clone(),
                    metric: Metric::Requests,
                    duration: d,
                },
                limit: U256::from(r.max_requests),
                rule: format!("{at}.max_requests"),
            });
        }
    }
    let personal_sign = labeled!(personal_sign, |v: bool| v);
    let typed_data = labeled!(typed_data, |v: bool| v);
    let typed_data_domains = labeled!(typed_data_domains, |v: Vec<RawDomainRule>| v
        .into_iter()
        .map(|d| DomainRule {
            name: d.name,
            chain_id: d.chain_id,
            verifying_contract: d.verifying_contract.map(|a| a.0)
        })
        .collect::<Vec<_>>());
    if let Some(d) = &typed_data_domains
        && d.v
            .iter()
            .any(|r| r.name.is_none() && r.chain_id.is_none() && r.verifying_contract.is_none())
    {
        return Err(lines.invalid(
            span,
            d.rule.clone(),
            "a domain rule needs name, chain_id or verifying_contract",
        ));
    }
    Ok(Rules {
        chain_ids,
        allow_contract_creation,
        allow_destinations,
        deny_destinations,
        selectors,
        max_value,
        max_gas_limit,
        max_fee_per_gas,
        max_priority_fee_per_gas,
        max_cost,
        windows,
        personal_sign,
        typed_data,
        typed_data_domains,
    })
}

// ---------------------------------------------------------------------------------------------
// Canonical form
// ---------------------------------------------------------------------------------------------

fn sort_opt<T: Ord>(v: &mut Option<Vec<T>>) {
    if let Some(v) = v.as_mut() {
        v.sort();
        v.dedup();
    }
}

/// Sorts every list whose order carries no meaning (all of them: rules are matched by name,
/// limits all apply, list membership is a set).
fn normalize(raw: &mut RawPolicy) {
    raw.defaults.normalize_limits();
    if let Some(r) = raw.defaults.retiring.as_mut() {
        r.allow_destinations.sort();
        r.allow_destinations.dedup();
    }
    for k in &mut raw.keys {
        k.normalize_limits();
        if let Some(r) = k.retiring.as_mut() {
            r.allow_destinations.sort();
            r.allow_destinations.dedup();
        }
    }
    raw.keys
        .sort_by(|a, b| a.name.get_ref().cmp(b.name.get_ref()));
    for c in &mut raw.clients {
        c.normalize_limits();
        c.keys.get_mut().sort();
        c.keys.get_mut().dedup();
    }
    raw.clients
        .sort_by(|a, b| a.identity.get_ref().cmp(b.identity.get_ref()));
    for members in raw.approvers.values_mut() {
        members.get_mut().sort();
    }
    for t in &mut raw.tiers {
        if let Some(k) = t.keys.as_mut() {
            k.get_mut().sort();
            k.get_mut().dedup();
        }
        sort_opt(&mut t.clients);
        sort_opt(&mut t.destinations);
        sort_opt(&mut t.selectors);
    }
    raw.tiers
        .sort_by(|a, b| a.name.get_ref().cmp(b.name.get_ref()));
}

/// The canonical form: the normalized policy as JSON with object keys sorted, no whitespace,
/// amounts as decimal wei strings, durations as seconds, addresses lowercase, selectors as
/// `0x` + 8 hex digits, absent optional fields as `null`. The policy hash is keccak256 of its
/// UTF-8 bytes, so comments, whitespace, key order, list order, units (`1 ether` vs
/// `"1000000000000000000"`) and selector spelling do not change it.
fn canonical_form(raw: &RawPolicy) -> Result<String, serde_json::Error> {
    let value = serde_json::to_value(raw)?;
    let mut out = String::from("castellan-policy/1 ");
    emit(&value, &mut out)?;
    Ok(out)
}

fn emit(v: &serde_json::Value, out: &mut String) -> Result<(), serde_json::Error> {
    use serde_json::Value;
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {
            out.push_str(&serde_json::to_string(v)?)
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                emit(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k)?);
                out.push(':');
                if let Some(item) = map.get(k) {
                    emit(item, out)?;
                }
            }
            out.push('}');
        }
    }
    Ok(())
}
