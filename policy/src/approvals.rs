//! M-of-N approvals and budget grants: EIP-712 typed messages under the Castellan domain,
//! verified by recovering the signer and checking it against the policy's approver sets.

use alloy::primitives::{Address, B256, Signature, U256};
use alloy::sol_types::{Eip712Domain, SolStruct, eip712_domain, sol};

use crate::error::PolicyError;
use crate::limits::{LIFETIME, Metric, WindowId, WindowScope};
use crate::policy::Policy;
use crate::types::{ClientId, KeyName};

sol! {
    #![sol(alloy_sol_types = alloy::sol_types)]

    /// An approver's decision on one pending request (or named operation).
    #[derive(Debug, PartialEq, Eq)]
    struct Approval {
        /// The request digest (`Request::digest`).
        bytes32 request;
        /// `"approve"` counts; anything else (e.g. `"reject"`) does not.
        string decision;
        /// Unix seconds; the approval counts while `now < expiry`.
        uint64 expiry;
    }

    /// A budget grant: `client` may, with `key`, spend up to `budget` (worst-case cost) per
    /// `window` seconds (0: over the whole validity), at most `maxValue` value and `maxCost`
    /// worst-case cost per request, only to `destinations`, from `validFrom` until `validUntil`.
    #[derive(Debug, PartialEq, Eq)]
    struct BudgetGrant {
        /// Client identity.
        string client;
        /// Key name.
        string key;
        /// Per-request value cap (wei).
        uint256 maxValue;
        /// Per-request worst-case cost cap (wei).
        uint256 maxCost;
        /// Allowed destinations (contract creation is never covered).
        address[] destinations;
        /// Budget of worst-case cost per window (wei).
        uint256 budget;
        /// Window in seconds; 0 means the budget covers the grant's whole validity.
        uint64 window;
        /// Unix seconds, inclusive.
        uint64 validFrom;
        /// Unix seconds, exclusive.
        uint64 validUntil;
        /// Distinguishes otherwise identical grants (a re-issued grant gets a fresh budget).
        uint64 nonce;
    }
}

/// The decision text that counts as approval.
pub const APPROVE: &str = "approve";

/// The EIP-712 domain of approvals and grants: name "Castellan", version "1", the chain id
/// from `[approval_domain]` (no verifying contract).
pub fn castellan_domain(chain_id: u64) -> Eip712Domain {
    eip712_domain! { name: "Castellan", version: "1", chain_id: chain_id, }
}

/// An approval with its signature, as submitted by an approver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedApproval {
    /// The typed approval.
    pub approval: Approval,
    /// The approver's signature over its EIP-712 signing hash.
    pub signature: Signature,
}

impl SignedApproval {
    /// The address that signed under `domain`, if the signature recovers at all. A signature
    /// made under another domain recovers to some other address, which no set lists.
    pub fn signer(&self, domain: &Eip712Domain) -> Option<Address> {
        let hash = self.approval.eip712_signing_hash(domain);
        self.signature.recover_address_from_prehash(&hash).ok()
    }
}

/// A grant with its approvers' signatures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedGrant {
    /// The typed grant.
    pub grant: BudgetGrant,
    /// One signature per approver.
    pub signatures: Vec<Signature>,
}

/// A grant whose signatures were recovered by [`Policy::verify_grant`]. Fields are private so a
/// `VerifiedGrant` cannot be made without verification; which tiers it satisfies is decided at
/// each evaluation against the approver sets of the policy then loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedGrant {
    id: B256,
    client: ClientId,
    key: KeyName,
    max_value: U256,
    max_cost: U256,
    destinations: Vec<Address>,
    budget: U256,
    window: u64,
    valid_from: u64,
    valid_until: u64,
    signers: Vec<Address>,
}

impl VerifiedGrant {
    /// The grant id: its EIP-712 signing hash.
    pub fn id(&self) -> B256 {
        self.id
    }
    /// Distinct registered approvers that signed it, sorted.
    pub fn signers(&self) -> &[Address] {
        &self.signers
    }
    /// The window its spending is recorded in (scope `Grant(id)`, metric cost).
    pub fn window(&self) -> WindowId {
        WindowId {
            scope: WindowScope::Grant(self.id),
            metric: Metric::Cost,
            duration: if self.window == 0 {
                LIFETIME
            } else {
                self.window
            },
        }
    }
    /// The budget per window.
    pub fn budget(&self) -> U256 {
        self.budget
    }
    /// The client it covers.
    pub fn client(&self) -> &ClientId {
        &self.client
    }
    /// The key it covers.
    pub fn key(&self) -> &KeyName {
        &self.key
    }
    /// Unix seconds from which it counts (inclusive).
    pub fn valid_from(&self) -> u64 {
        self.valid_from
    }
    /// Unix seconds until which it counts (exclusive).
    pub fn valid_until(&self) -> u64 {
        self.valid_until
    }
    pub(crate) fn covers(
        &self,
        client: &ClientId,
        key: &KeyName,
        now: u64,
        value: U256,
        cost: U256,
        txs: &[crate::types::TxFacts],
    ) -> bool {
        &self.client == client
            && &self.key == key
            && self.valid_from <= now
            && now < self.valid_until
            && value <= self.max_value
            && cost <= self.max_cost
            && txs.iter().all(|t| {
                t.to.is_some_and(|d| self.destinations.binary_search(&d).is_ok())
            })
    }
    pub(crate) fn approvals_in(&self, members: &[Address]) -> u32 {
        let n = self
            .signers
            .iter()
            .filter(|s| members.binary_search(s).is_ok())
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

impl Policy {
    /// The EIP-712 domain approvals and grants must be signed under.
    pub fn approval_domain(&self) -> &Eip712Domain {
        &self.domain
    }

    /// Recovers every signature of a grant and keeps the distinct signers that belong to some
    /// approver set. Refuses a grant that is already expired, has an empty validity, or has no
    /// registered signer. Do this once when the grant is submitted, not per request.
    ///
    /// # Security
    /// A verified grant only lets a request through a tier whose approver set contains at
    /// least the tier's `threshold` of its signers; verification alone grants nothing.
    pub fn verify_grant(
        &self,
        signed: &SignedGrant,
        now: u64,
    ) -> Result<VerifiedGrant, PolicyError> {
        let g = &signed.grant;
        if g.validUntil <= g.validFrom {
            return Err(PolicyError::Grant(
                "validUntil is not after validFrom".into(),
            ));
        }
        if g.validUntil <= now {
            return Err(PolicyError::Grant(format!(
                "expired at {} (now {now})",
                g.validUntil
            )));
        }
        let id = g.eip712_signing_hash(&self.domain);
        let mut signers: Vec<Address> = signed
            .signatures
            .iter()
            .filter_map(|s| s.recover_address_from_prehash(&id).ok())
            .filter(|a| {
                self.approver_sets
                    .values()
                    .any(|set| set.members.binary_search(a).is_ok())
            })
            .collect();
        signers.sort();
        signers.dedup();
        if signers.is_empty() {
            return Err(PolicyError::Grant(
                "no signature recovers to a registered approver".into(),
            ));
        }
        let mut destinations = g.destinations.clone();
        destinations.sort();
        destinations.dedup();
        Ok(VerifiedGrant {
            id,
            client: ClientId::new(&g.client),
            key: KeyName::new(&g.key),
            max_value: g.maxValue,
            max_cost: g.maxCost,
            destinations,
            budget: g.budget,
            window: g.window,
            valid_from: g.validFrom,
            valid_until: g.validUntil,
            signers,
        })
    }

    /// The transaction tiers a verified grant can stand in for: those whose approver set holds
    /// at least the tier's threshold of the grant's signers. A grant that satisfies none can
    /// never let a request through; the signer refuses to register it.
    pub fn grant_tiers(&self, grant: &VerifiedGrant) -> Vec<String> {
        self.tiers
            .iter()
            .filter(|t| t.operation.is_none())
            .filter(|t| {
                self.approver_sets
                    .get(&t.approvers)
                    .is_some_and(|s| grant.approvals_in(&s.members) >= t.threshold)
            })
            .map(|t| t.name.clone())
            .collect()
    }

    /// The lowest threshold of the transaction tiers (what a grant needs at least), if any.
    pub fn lowest_tier_threshold(&self) -> Option<u32> {
        self.tiers
            .iter()
            .filter(|t| t.operation.is_none())
            .map(|t| t.threshold)
            .min()
    }

    /// Whether `address` belongs to some approver set.
    pub fn is_approver(&self, address: &Address) -> bool {
        self.approver_sets
            .values()
            .any(|set| set.members.binary_search(address).is_ok())
    }

    /// The distinct signers of the approvals that count for `digest` at `now`: decision
    /// `"approve"`, unexpired, recovering under the policy's domain. Membership in a set is
    /// checked per tier.
    pub(crate) fn approval_signers(
        &self,
        digest: B256,
        approvals: &[SignedApproval],
        now: u64,
    ) -> Vec<Address> {
        let mut out: Vec<Address> = approvals
            .iter()
            .filter(|a| {
                a.approval.request == digest
                    && a.approval.decision == APPROVE
                    && now < a.approval.expiry
            })
            .filter_map(|a| a.signer(&self.domain))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}
