//! Wire types of the submitter's API, shared by the submitter (server) and the signer (client).
//!
//! Conventions (DESIGN.md "API conventions"): JSON with camelCase names, unknown fields rejected,
//! quantities accepted as `0x`-hex or decimal strings and emitted as `0x`-hex, errors as
//! `{"error":{"code","message","details"}}`.
//!
//! Routes (all JSON):
//! - `POST /v1/bundles` ([`SubmitBundleRequest`] → [`BundleStatus`]; 201 when new, 200 when the
//!   same id was already accepted with the same content, 409 when the id exists with other content)
//! - `GET /v1/bundles/{id}` (→ [`BundleStatus`])
//! - `POST /v1/bundles/{id}/cancel` (→ [`BundleStatus`])
//! - `POST /v1/keys/{keyName}/cancel` (→ [`CancelByKeyResponse`])
//! - `GET /v1/relays` (→ [`RelaysResponse`])
//! - `GET /live`, `GET /ready`

use std::fmt;
use std::str::FromStr;

use alloy::primitives::{B256, Bytes, U256};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Path of the submit route.
pub const SUBMIT_PATH: &str = "/v1/bundles";

/// A caller's identity, put into each request's extensions by the listener (mTLS: the
/// certificate's SAN or CN, mapped to roles by the server's configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerIdentity {
    /// The identity string (SAN URI/DNS or CN).
    pub id: String,
    /// Roles this identity holds.
    pub roles: Vec<Role>,
}

impl CallerIdentity {
    /// Whether the identity holds `role`.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// Roles of API callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The signer process (submits bundles, reads status, cancels).
    Signer,
    /// An operator (may cancel every bundle of a key).
    Admin,
    /// A strategy host.
    Strategy,
    /// An approver.
    Approver,
    /// An auditor (read-only).
    Auditor,
    /// The submitter process (caller of the signer's relay-auth and outcome routes).
    Submitter,
}

/// An unsigned 64-bit quantity (block number, gas, nonce, timestamp): accepted as a `0x`-hex or
/// decimal string, emitted as `0x`-hex.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(pub u64);

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Quantity {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let v = if let Some(hex) = s.strip_prefix("0x") {
            // Hex digits only: `from_str_radix` alone would take a leading `+`.
            if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(QuantityError(s.to_owned()));
            }
            u64::from_str_radix(hex, 16)
        } else {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(QuantityError(s.to_owned()));
            }
            s.parse::<u64>()
        };
        v.map(Quantity).map_err(|_| QuantityError(s.to_owned()))
    }
}

/// A wei amount: accepted as a `0x`-hex or decimal string, emitted as `0x`-hex.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Wei(pub U256);

impl Serialize for Wei {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Wei {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Wei {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed = if let Some(hex) = s.strip_prefix("0x") {
            // Hex digits only: ruint's `from_str_radix` skips `_`, so `"0x_"` would be zero.
            if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(QuantityError(s.to_owned()));
            }
            U256::from_str_radix(hex, 16)
        } else {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(QuantityError(s.to_owned()));
            }
            U256::from_str_radix(s, 10)
        };
        parsed.map(Wei).map_err(|_| QuantityError(s.to_owned()))
    }
}

/// A string that is not a valid quantity (empty, not hex/decimal, or overflowing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantityError(pub String);

impl fmt::Display for QuantityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid quantity {:?}: expected a 0x-hex or decimal string",
            self.0
        )
    }
}

impl std::error::Error for QuantityError {}

/// Which relays a bundle goes to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "camelCase", deny_unknown_fields)]
pub enum RelaySelection {
    /// Every relay enabled by default in the submitter's configuration.
    #[default]
    All,
    /// Exactly these configured relays (by name); an unknown name is an error.
    Named {
        /// Relay names from the submitter's configuration.
        relays: Vec<String>,
    },
    /// The healthiest default relays: breaker closed, ranked by error rate then latency.
    Weighted {
        /// At most this many relays (all healthy ones when absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<u32>,
    },
}

/// `POST /v1/bundles`: a signed bundle to route. Idempotent by `bundleId`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubmitBundleRequest {
    /// Client-chosen id; a retry with the same id and content returns the existing status.
    pub bundle_id: Uuid,
    /// Name of the key that signed the bundle's transactions (for cancel-by-key and outcomes).
    pub key_name: String,
    /// Signed EIP-2718 transactions, `0x`-hex, in bundle order.
    pub txs: Vec<Bytes>,
    /// First block the bundle targets.
    pub target_block: Quantity,
    /// Last block the bundle targets (inclusive); defaults to `targetBlock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_block: Option<Quantity>,
    /// Earliest block timestamp (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_timestamp: Option<Quantity>,
    /// Latest block timestamp (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_timestamp: Option<Quantity>,
    /// Hashes of transactions allowed to revert.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reverting_tx_hashes: Vec<B256>,
    /// Replacement uuid sent to relays; defaults to `bundleId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement_uuid: Option<Uuid>,
    /// Relay selection; defaults to all default relays.
    #[serde(default)]
    pub relays: RelaySelection,
    /// Simulate on a relay before the first send; a non-allowed revert stops the bundle.
    #[serde(default)]
    pub simulate: bool,
}

/// Overall state of a bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BundleState {
    /// Being (re)submitted, or waiting for its first target block.
    Pending,
    /// All its transactions are in block `includedBlock` (tentative until `confirmed`).
    Included,
    /// Its last target block passed without inclusion.
    Expired,
    /// Cancelled on request.
    Cancelled,
    /// Stopped: see `reason` (`nonce_consumed`, `simulation_reverted`, …).
    Failed,
}

impl BundleState {
    /// Whether the bundle is still live (resubmitted or awaiting confirmation).
    pub fn is_live(self) -> bool {
        matches!(self, BundleState::Pending | BundleState::Included)
    }
}

/// Per-relay view of one bundle.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayBundleStatus {
    /// Relay name.
    pub relay: String,
    /// Whether the last request to this relay was accepted.
    pub accepted: bool,
    /// Requests sent for this bundle.
    pub sends: u64,
    /// Requests that failed (transport, HTTP, parse or JSON-RPC error).
    pub errors: u64,
    /// Requests skipped (breaker open, rate limited, backing off after 429).
    pub skipped: u64,
    /// Block the last request targeted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_target_block: Option<Quantity>,
    /// Latency of the last request, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// The last response body (truncated) or the last skip reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_response: Option<String>,
    /// The last error, if the last request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The bundle hash this relay returned (its meaning differs per relay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_hash: Option<String>,
    /// Whether a cancel reached this relay and was accepted.
    #[serde(default)]
    pub cancelled: bool,
}

/// One simulated transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimulatedTx {
    /// Transaction hash.
    pub tx_hash: B256,
    /// Gas used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gas_used: Option<Quantity>,
    /// Value paid to the coinbase (`coinbaseDiff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coinbase_payment: Option<Wei>,
    /// EVM error, when the transaction failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Revert reason or data, as the relay reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<String>,
}

/// Result of a pre-flight simulation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SimulationReport {
    /// Relay that simulated.
    pub relay: String,
    /// Whether the bundle may be sent (no disallowed revert, no whole-call error).
    pub ok: bool,
    /// Per-transaction results.
    pub results: Vec<SimulatedTx>,
    /// Whole-call error (e.g. `err: nonce too low: …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A bundle's status (answer of submit, status and cancel).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BundleStatus {
    /// The bundle id.
    pub bundle_id: Uuid,
    /// The key that signed it.
    pub key_name: String,
    /// Overall state.
    pub state: BundleState,
    /// Why it failed/stopped (stable snake_case), when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Block the bundle was found in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub included_block: Option<Quantity>,
    /// Whether the inclusion has `confirmations` blocks on top of it.
    #[serde(default)]
    pub confirmed: bool,
    /// First target block.
    pub target_block: Quantity,
    /// Last target block.
    pub last_block: Quantity,
    /// Last block a request targeted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_submitted_block: Option<Quantity>,
    /// Hashes of the bundle's transactions, in order.
    pub tx_hashes: Vec<B256>,
    /// Per-relay status.
    pub relays: Vec<RelayBundleStatus>,
    /// Simulation result, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulation: Option<SimulationReport>,
}

/// Answer of `POST /v1/keys/{keyName}/cancel`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CancelByKeyResponse {
    /// Ids of the bundles this call cancelled.
    pub cancelled: Vec<Uuid>,
}

/// Breaker state of a relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Sending normally.
    Closed,
    /// Not sending until the cooldown passes.
    Open,
    /// One probe request allowed.
    HalfOpen,
}

/// Health of one relay (`GET /v1/relays`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayHealth {
    /// Relay name.
    pub relay: String,
    /// Breaker state.
    pub breaker: BreakerState,
    /// Consecutive failed requests.
    pub consecutive_failures: u32,
    /// Exponentially weighted error rate (0..1).
    pub error_rate: f64,
    /// Exponentially weighted latency of answered requests, in microseconds.
    pub latency_ewma_us: f64,
    /// Requests sent.
    pub requests: u64,
    /// Requests failed.
    pub failures: u64,
}

/// Answer of `GET /v1/relays`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelaysResponse {
    /// One entry per configured relay.
    pub relays: Vec<RelayHealth>,
}

/// What became of a bundle, reported to the signer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    /// Included with every transaction successful (or only allowed reverts).
    Included,
    /// Included, but a transaction not in `revertingTxHashes` reverted on-chain.
    Reverted,
    /// Never included (expired, cancelled, nonce consumed, simulation failed).
    NotIncluded,
}

/// A bundle's final outcome (submitter → signer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BundleOutcome {
    /// The bundle id.
    pub bundle_id: Uuid,
    /// The key that signed it.
    pub key_name: String,
    /// The outcome.
    pub outcome: OutcomeKind,
    /// Final state of the bundle.
    pub state: BundleState,
    /// Why it was not included, when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The block it was included in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub included_block: Option<Quantity>,
    /// Total gas used by its transactions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gas_used: Option<Quantity>,
    /// Gas-weighted effective gas price of its transactions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_gas_price: Option<Wei>,
}

/// Error body of every non-2xx answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// Stable snake_case code.
    pub code: String,
    /// One line for a person.
    pub message: String,
    /// Machine-readable details (an object, possibly empty).
    #[serde(default)]
    pub details: serde_json::Value,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn quantities_accept_hex_and_decimal_strings_only() {
        assert_eq!("0x10".parse::<Quantity>().unwrap(), Quantity(16));
        assert_eq!("16".parse::<Quantity>().unwrap(), Quantity(16));
        for bad in [
            "",
            "0x",
            "-1",
            "1.5",
            "0x1ffffffffffffffff",
            "18446744073709551616",
            " 1",
        ] {
            assert!(bad.parse::<Quantity>().is_err(), "{bad}");
        }
        // Found by api/tests/prop_decode.rs: `from_str_radix` takes `+` and ruint skips `_`.
        for bad in ["0x+1", "0x_", "0x1_0", "0x 1", "+1", "1_0"] {
            assert!(bad.parse::<Quantity>().is_err(), "{bad}");
            assert!(bad.parse::<Wei>().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<Quantity>("16").is_err());
        assert_eq!(serde_json::to_string(&Quantity(255)).unwrap(), "\"0xff\"");
        assert_eq!(
            "1000000000000000000000".parse::<Wei>().unwrap().0,
            U256::from(10).pow(U256::from(21))
        );
    }

    #[test]
    fn submit_request_rejects_unknown_fields_and_defaults() {
        let id = Uuid::new_v4();
        let ok = format!(
            r#"{{"bundleId":"{id}","keyName":"k","txs":["0x02"],"targetBlock":"0x5","relays":{{"mode":"named","relays":["a"]}}}}"#
        );
        let req: SubmitBundleRequest = serde_json::from_str(&ok).unwrap();
        assert_eq!(
            req.relays,
            RelaySelection::Named {
                relays: vec!["a".into()]
            }
        );
        assert!(!req.simulate);
        let bad = ok.replace("\"keyName\"", "\"extra\":1,\"keyName\"");
        assert!(serde_json::from_str::<SubmitBundleRequest>(&bad).is_err());
        let bad_sel = ok.replace("\"relays\":[\"a\"]", "\"relays\":[\"a\"],\"x\":1");
        assert!(serde_json::from_str::<SubmitBundleRequest>(&bad_sel).is_err());
    }
}
