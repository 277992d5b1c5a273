//! Wire types of the signer's API, shared by the signer (server), keyctl, the submitter and
//! strategy hosts (clients).
//!
//! Conventions (DESIGN.md "API conventions"): JSON with camelCase names, unknown fields rejected,
//! quantities as `0x`-hex or decimal strings (never JSON numbers), emitted as `0x`-hex; addresses
//! accepted in any case but refused when mixed case has a wrong EIP-55 checksum, emitted
//! checksummed; errors as `{"error":{"code","message","details"}}`.
//!
//! Routes (all JSON, under mTLS; the role each needs in brackets):
//! - `POST /v1/keys/{name}/sign/transaction` \[strategy\] ([`SignTransactionRequest`] →
//!   200 [`SignedTransactionResponse`] or 202 [`PendingResponse`])
//! - `POST /v1/keys/{name}/sign/message` \[strategy\] ([`SignMessageRequest`] → [`SignatureResponse`])
//! - `POST /v1/keys/{name}/sign/typed-data` \[strategy\] ([`SignTypedDataRequest`] →
//!   [`SignatureResponse`])
//! - `POST /v1/keys/{name}/sign/bundle` \[strategy\] ([`SignBundleRequest`] → [`SignedBundleResponse`]
//!   or 202 [`PendingResponse`])
//! - `GET /v1/requests/{id}` \[strategy, approver, admin\] (→ [`RequestStatus`])
//! - `POST /v1/requests/{id}/approvals` \[approver\] ([`ApprovalSubmission`] → [`RequestStatus`])
//! - `POST /v1/grants` \[approver, admin\] ([`GrantSubmission`] → 201 [`GrantView`]);
//!   `GET /v1/grants` \[approver, admin, auditor\] (→ [`GrantList`])
//! - `POST /v1/relay-auth` \[submitter\] ([`RelayAuthRequest`] → [`RelayAuthResponse`])
//! - `POST /v1/outcomes` \[submitter\] (`crate::submitter::BundleOutcome`)
//! - `GET /v1/keys`, `GET /v1/keys/{name}` [strategy (own keys), admin, auditor] (→ [`KeyView`])
//! - `POST /v1/admin/freeze`, `/v1/admin/unfreeze`, `/v1/admin/keys/{name}/pause`,
//!   `/v1/admin/keys/{name}/resume`, `/v1/admin/keys/{name}/revoke`, `/v1/admin/policy/reload`
//!   \[admin\]
//! - `GET /v1/audit?since={seq}` \[auditor\] (JSON lines)
//! - `POST /rpc` (Ethereum JSON-RPC), `GET /live`, `GET /ready`, `GET /v1/openapi.json`

use alloy::consensus::{TxEip1559, TxEip2930, TxLegacy, TypedTransaction};
use alloy::eips::eip2930::AccessList;
use alloy::primitives::{Address, B256, Bytes, TxKind};
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use crate::submitter::{Quantity, RelaySelection, Wei};

/// An address that, when written in mixed case, must carry a valid EIP-55 checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct CheckedAddress(pub Address);

impl<'de> Deserialize<'de> for CheckedAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_address(&s)
            .map(CheckedAddress)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses an address: all-lowercase and all-uppercase hex are accepted as they are; mixed case
/// must be a valid EIP-55 checksum (a typo in a checksummed address is caught, not signed).
pub fn parse_address(s: &str) -> Result<Address, String> {
    let hex = s
        .strip_prefix("0x")
        .ok_or_else(|| format!("address {s:?} must start with 0x"))?;
    if hex.len() != 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("address {s:?} is not 20 bytes of hex"));
    }
    let has_lower = hex.bytes().any(|b| b.is_ascii_lowercase());
    let has_upper = hex.bytes().any(|b| b.is_ascii_uppercase());
    if has_lower && has_upper {
        Address::parse_checksummed(s, None)
            .map_err(|_| format!("address {s:?} has a wrong EIP-55 checksum"))
    } else {
        s.parse::<Address>()
            .map_err(|e| format!("address {s:?}: {e}"))
    }
}

/// An unsigned transaction as a strategy host sends it. The type is explicit (`type`) or
/// inferred: `maxFeePerGas` → EIP-1559, `accessList` with `gasPrice` → EIP-2930, else legacy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UnsignedTx {
    /// `0x2` (EIP-1559), `0x1` (EIP-2930) or `0x0` (legacy, EIP-155).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub tx_type: Option<Quantity>,
    /// Chain id; must equal the signer's.
    pub chain_id: Quantity,
    /// Sender nonce.
    pub nonce: Quantity,
    /// Destination; absent for contract creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<CheckedAddress>,
    /// Value in wei (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Wei>,
    /// Calldata (`input`; `data` is accepted as an alias, as wallets send it).
    #[serde(default, alias = "data", skip_serializing_if = "Option::is_none")]
    pub input: Option<Bytes>,
    /// Gas limit.
    pub gas: Quantity,
    /// EIP-1559 max fee per gas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_fee_per_gas: Option<Wei>,
    /// EIP-1559 max priority fee per gas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_priority_fee_per_gas: Option<Wei>,
    /// Legacy / EIP-2930 gas price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gas_price: Option<Wei>,
    /// EIP-2930 access list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_list: Option<AccessList>,
}

/// Why an [`UnsignedTx`] cannot become a transaction.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TxShapeError(pub String);

impl UnsignedTx {
    /// Builds the alloy transaction, checking that the fields fit the type and do not overflow
    /// the protocol's integer widths.
    pub fn to_typed(&self) -> Result<TypedTransaction, TxShapeError> {
        let ty = match self.tx_type {
            Some(Quantity(t)) => t,
            None if self.max_fee_per_gas.is_some() || self.max_priority_fee_per_gas.is_some() => 2,
            None if self.access_list.is_some() => 1,
            None => 0,
        };
        let to = match self.to {
            Some(a) => TxKind::Call(a.0),
            None => TxKind::Create,
        };
        let value = self.value.map(|w| w.0).unwrap_or_default();
        let input = self.input.clone().unwrap_or_default();
        let u128_of = |w: Option<Wei>, name: &str| -> Result<u128, TxShapeError> {
            let w = w.ok_or_else(|| TxShapeError(format!("{name} is required for type {ty}")))?;
            u128::try_from(w.0).map_err(|_| TxShapeError(format!("{name} exceeds 2^128 - 1")))
        };
        let forbid = |present: bool, name: &str| -> Result<(), TxShapeError> {
            if present {
                Err(TxShapeError(format!("{name} is not a field of type {ty}")))
            } else {
                Ok(())
            }
        };
        match ty {
            2 => {
                forbid(self.gas_price.is_some(), "gasPrice")?;
                Ok(TypedTransaction::Eip1559(TxEip1559 {
                    chain_id: self.chain_id.0,
                    nonce: self.nonce.0,
                    gas_limit: self.gas.0,
                    max_fee_per_gas: u128_of(self.max_fee_per_gas, "maxFeePerGas")?,
                    max_priority_fee_per_gas: u128_of(
                        self.max_priority_fee_per_gas,
                        "maxPriorityFeePerGas",
                    )?,
                    to,
                    value,
                    access_list: self.access_list.clone().unwrap_or_default(),
                    input,
                }))
            }
            1 => {
                forbid(self.max_fee_per_gas.is_some(), "maxFeePerGas")?;
                forbid(
                    self.max_priority_fee_per_gas.is_some(),
                    "maxPriorityFeePerGas",
                )?;
                Ok(TypedTransaction::Eip2930(TxEip2930 {
                    chain_id: self.chain_id.0,
                    nonce: self.nonce.0,
                    gas_price: u128_of(self.gas_price, "gasPrice")?,
                    gas_limit: self.gas.0,
                    to,
                    value,
                    access_list: self.access_list.clone().unwrap_or_default(),
                    input,
                }))
            }
            0 => {
                forbid(self.max_fee_per_gas.is_some(), "maxFeePerGas")?;
                forbid(
                    self.max_priority_fee_per_gas.is_some(),
                    "maxPriorityFeePerGas",
                )?;
                forbid(self.access_list.is_some(), "accessList")?;
                Ok(TypedTransaction::Legacy(TxLegacy {
                    // EIP-155 always: the chain id is part of what is signed.
                    chain_id: Some(self.chain_id.0),
                    nonce: self.nonce.0,
                    gas_price: u128_of(self.gas_price, "gasPrice")?,
                    gas_limit: self.gas.0,
                    to,
                    value,
                    input,
                }))
            }
            other => Err(TxShapeError(format!(
                "transaction type {other:#x} is not supported (0x0, 0x1 and 0x2 are)"
            ))),
        }
    }
}

/// `POST /v1/keys/{name}/sign/transaction`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignTransactionRequest {
    /// The transaction to sign.
    pub tx: UnsignedTx,
}

/// A signed transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignedTransactionResponse {
    /// The request id (also the audit record's request id).
    pub request_id: String,
    /// The key version that signed, `name@N`.
    pub key_version: String,
    /// The signer address.
    pub from: Address,
    /// The signed EIP-2718 envelope, as `eth_sendRawTransaction` takes it.
    pub raw: Bytes,
    /// The transaction hash.
    pub hash: B256,
    /// The 65-byte signature `r‖s‖v` (v = 27/28).
    pub signature: Bytes,
}

/// `POST /v1/keys/{name}/sign/message`: an EIP-191 `personal_sign` message. Exactly one of
/// `message` (bytes, `0x`-hex) and `text` (UTF-8) is given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignMessageRequest {
    /// The message bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Bytes>,
    /// The message as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl SignMessageRequest {
    /// The message bytes, or why the request is malformed.
    pub fn bytes(&self) -> Result<Vec<u8>, TxShapeError> {
        match (&self.message, &self.text) {
            (Some(m), None) => Ok(m.to_vec()),
            (None, Some(t)) => Ok(t.as_bytes().to_vec()),
            _ => Err(TxShapeError(
                "exactly one of `message` and `text` must be given".into(),
            )),
        }
    }
}

/// `POST /v1/keys/{name}/sign/typed-data`: EIP-712 typed data as `eth_signTypedData_v4` takes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignTypedDataRequest {
    /// The typed data (`types`, `primaryType`, `domain`, `message`).
    pub typed_data: serde_json::Value,
}

/// A message or typed-data signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignatureResponse {
    /// The request id.
    pub request_id: String,
    /// The key version that signed, `name@N`.
    pub key_version: String,
    /// The signer address.
    pub address: Address,
    /// The digest that was signed.
    pub digest: B256,
    /// The 65-byte signature `r‖s‖v` (v = 27/28).
    pub signature: Bytes,
}

/// One transaction of a bundle: an unsigned one for the named key, or someone else's signed one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BundleTx {
    /// An unsigned transaction for the key in the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx: Option<UnsignedTx>,
    /// A pre-signed raw transaction of another sender (kept as it is, not signed again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<Bytes>,
}

/// `POST /v1/keys/{name}/sign/bundle`: the policy judges the whole bundle; all of it is signed or
/// none, and the signed bundle is handed to the submitter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignBundleRequest {
    /// Client-chosen bundle id (idempotency key); generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_id: Option<Uuid>,
    /// The transactions, in bundle order.
    pub txs: Vec<BundleTx>,
    /// First target block.
    pub target_block: Quantity,
    /// Last target block (inclusive); defaults to `targetBlock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_block: Option<Quantity>,
    /// Earliest block timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_timestamp: Option<Quantity>,
    /// Latest block timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_timestamp: Option<Quantity>,
    /// Hashes of transactions allowed to revert.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reverting_tx_hashes: Vec<B256>,
    /// Replacement uuid for the relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement_uuid: Option<Uuid>,
    /// Relay selection (default: all default relays).
    #[serde(default)]
    pub relays: RelaySelection,
    /// Simulate before the first send.
    #[serde(default)]
    pub simulate: bool,
}

/// A signed bundle and what the submitter said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignedBundleResponse {
    /// The request id.
    pub request_id: String,
    /// The bundle id.
    pub bundle_id: Uuid,
    /// The key version that signed, `name@N`.
    pub key_version: String,
    /// Every transaction of the bundle, signed, in order.
    pub txs: Vec<Bytes>,
    /// Their hashes.
    pub tx_hashes: Vec<B256>,
    /// Whether the submitter accepted it, and its state there.
    pub submitted: SubmissionAck,
}

/// The submitter's acknowledgement of a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubmissionAck {
    /// Whether the submitter accepted the bundle.
    pub accepted: bool,
    /// The submitter's bundle state (`pending`, …) or its error code.
    pub state: String,
    /// Relays the bundle goes to.
    #[serde(default)]
    pub relays: Vec<String>,
}

/// 202: the request waits for approvals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PendingResponse {
    /// The request id; poll `GET /v1/requests/{id}`.
    pub request_id: String,
    /// The digest approvers sign (inside the typed approval).
    pub request_digest: B256,
    /// Distinct approvals needed.
    pub threshold: u32,
    /// The approver set named by the policy's tier.
    pub approver_set: String,
    /// The tier that asked for approvals.
    pub tier: String,
    /// When the pending request expires (unix seconds).
    pub expires_at: Quantity,
}

/// State of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Waiting for approvals.
    PendingApprovals,
    /// Signed.
    Signed,
    /// Refused (policy, status, rejection by an approver).
    Refused,
    /// Expired before enough approvals arrived.
    Expired,
    /// Signing failed after the decision (device error).
    Failed,
    /// An approved operation (unfreeze, policy change) was carried out.
    Executed,
}

/// `GET /v1/requests/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestStatus {
    /// The request id.
    pub request_id: String,
    /// The key named by the request.
    pub key: String,
    /// The client that asked.
    pub client: String,
    /// State.
    pub state: RequestState,
    /// Distinct valid approvals so far.
    pub approvals: u32,
    /// Needed approvals.
    pub threshold: u32,
    /// Addresses of the approvers that approved.
    #[serde(default)]
    pub approvers: Vec<Address>,
    /// The digest approvers sign.
    pub request_digest: B256,
    /// Expiry (unix seconds).
    pub expires_at: Quantity,
    /// The result once signed (the same body the signing route would have answered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The refusal, if refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<crate::submitter::ErrorDetail>,
}

/// `POST /v1/requests/{id}/approvals`: an EIP-712 approval signed by an approver's own key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApprovalSubmission {
    /// The approver's address (must be registered in the tier's set).
    pub approver: CheckedAddress,
    /// `approve` or `reject`.
    pub decision: String,
    /// Expiry of the approval (unix seconds).
    pub expiry: Quantity,
    /// The 65-byte EIP-712 signature.
    pub signature: Bytes,
}

/// A budget grant as its approvers sign it: the EIP-712 `BudgetGrant` of the policy crate under
/// the Castellan domain ("client may spend up to `budget` with `key` to `destinations` from
/// `validFrom` until `validUntil`").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantBody {
    /// Client identity (the strategy's certificate URI).
    pub client: String,
    /// Key name.
    pub key: String,
    /// Per-request value cap (wei).
    pub max_value: Wei,
    /// Per-request worst-case cost cap (wei).
    pub max_cost: Wei,
    /// Allowed destinations.
    pub destinations: Vec<CheckedAddress>,
    /// Budget of worst-case cost over the grant's validity (wei).
    pub budget: Wei,
    /// Rolling window in seconds; the signer accepts only 0 (the budget covers the validity).
    pub window: Quantity,
    /// Unix seconds, inclusive.
    pub valid_from: Quantity,
    /// Unix seconds, exclusive.
    pub valid_until: Quantity,
    /// Distinguishes otherwise identical grants.
    pub nonce: Quantity,
}

/// `POST /v1/grants`: a grant with its approvers' 65-byte EIP-712 signatures (also the file
/// `keyctl grant new` writes and `keyctl grant sign` adds signatures to).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantSubmission {
    /// The grant.
    pub grant: GrantBody,
    /// One signature per approver.
    #[serde(default)]
    pub signatures: Vec<Bytes>,
}

/// A registered grant and how much of it is spent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantView {
    /// The grant id: its EIP-712 signing hash.
    pub id: B256,
    /// The grant.
    pub grant: GrantBody,
    /// The registered approvers that signed it.
    pub signers: Vec<Address>,
    /// Worst-case cost reserved under it so far (wei).
    pub spent: Wei,
    /// Budget left (wei).
    pub remaining: Wei,
    /// Whether it covers requests now (inside its validity).
    pub active: bool,
}

/// `GET /v1/grants`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantList {
    /// Every registered grant, newest first.
    pub grants: Vec<GrantView>,
}

/// `POST /v1/relay-auth`: an EIP-191 signature of a 32-byte hash, for `X-Flashbots-Signature`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayAuthRequest {
    /// keccak256 of the exact body the submitter will send.
    pub body_hash: B256,
}

/// The relay-auth signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayAuthResponse {
    /// The relay-auth key's address.
    pub address: Address,
    /// 65-byte signature `r‖s‖v` (v = 27/28) over EIP-191("0x" + lowercase hex of the hash).
    pub signature: Bytes,
}

/// One key version, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyVersionView {
    /// `name@N`.
    pub version: String,
    /// Its address.
    pub address: Address,
    /// `active`, `retiring`, `retired`, `revoked`, `destroy_scheduled`, `destroyed`.
    pub status: String,
    /// Creation time (unix seconds).
    pub created_at: Quantity,
    /// Backend reference (never key material), e.g. `pkcs11:searcher-hot@1#…`.
    pub backend: String,
}

/// A key and its versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyView {
    /// Key name.
    pub name: String,
    /// Whether the key is paused, and until when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_until: Option<Quantity>,
    /// Rotation period in seconds, if scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_every: Option<Quantity>,
    /// Versions, newest first.
    pub versions: Vec<KeyVersionView>,
}

/// Admin actions that carry a reason (freeze, pause, revoke).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminAction {
    /// Why, for the audit record.
    pub reason: String,
    /// For revoke: one version (`N`), or every version when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// For pause: seconds until the key may resume (cooldown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown: Option<Quantity>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn addresses_checksum_is_enforced_only_in_mixed_case() {
        let good = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed";
        assert!(parse_address(good).is_ok());
        assert!(parse_address(&good.to_lowercase()).is_ok());
        assert!(parse_address(&good.to_uppercase().replacen("0X", "0x", 1)).is_ok());
        let typo = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD";
        assert!(parse_address(typo).unwrap_err().contains("checksum"));
        assert!(parse_address("5aaeb6053f3e94c9b9a09f33669435e7ef1beaed").is_err());
        assert!(parse_address("0x5aaeb6053f3e94c9b9a09f33669435e7ef1bea").is_err());
    }

    #[test]
    fn unsigned_tx_types_and_field_checks() {
        let eip1559: UnsignedTx = serde_json::from_str(
            r#"{"chainId":"0x7a69","nonce":"0","to":"0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed",
                "value":"1000","gas":"21000","maxFeePerGas":"0x3b9aca00","maxPriorityFeePerGas":"1"}"#,
        )
        .unwrap();
        assert!(matches!(
            eip1559.to_typed().unwrap(),
            TypedTransaction::Eip1559(_)
        ));

        let legacy: UnsignedTx = serde_json::from_str(
            r#"{"chainId":"1","nonce":"0x1","gas":"0x5208","gasPrice":"10","data":"0x"}"#,
        )
        .unwrap();
        match legacy.to_typed().unwrap() {
            TypedTransaction::Legacy(tx) => {
                assert_eq!(tx.chain_id, Some(1));
                assert_eq!(tx.to, TxKind::Create);
            }
            other => panic!("{other:?}"),
        }

        let mixed: UnsignedTx = serde_json::from_str(
            r#"{"type":"0x2","chainId":"1","nonce":"1","gas":"1","gasPrice":"1","maxFeePerGas":"1","maxPriorityFeePerGas":"1"}"#,
        )
        .unwrap();
        assert!(mixed.to_typed().unwrap_err().0.contains("gasPrice"));

        let blob: UnsignedTx =
            serde_json::from_str(r#"{"type":"0x3","chainId":"1","nonce":"1","gas":"1"}"#).unwrap();
        assert!(blob.to_typed().unwrap_err().0.contains("not supported"));

        let too_big: UnsignedTx = serde_json::from_str(&format!(
            r#"{{"chainId":"1","nonce":"1","gas":"1","maxFeePerGas":"0x1{}","maxPriorityFeePerGas":"1"}}"#,
            "0".repeat(32)
        ))
        .unwrap();
        assert!(too_big.to_typed().unwrap_err().0.contains("2^128"));

        // Overflowing 256 bits, JSON numbers and unknown fields never parse.
        let overflow = format!(
            r#"{{"chainId":"1","nonce":"1","gas":"1","value":"0x1{}"}}"#,
            "0".repeat(64)
        );
        assert!(serde_json::from_str::<UnsignedTx>(&overflow).is_err());
        assert!(
            serde_json::from_str::<UnsignedTx>(r#"{"chainId":1,"nonce":"1","gas":"1"}"#).is_err()
        );
        assert!(
            serde_json::from_str::<UnsignedTx>(r#"{"chainId":"1","nonce":"1","gas":"1","x":"1"}"#)
                .is_err()
        );
    }

    #[test]
    fn message_request_needs_exactly_one_form() {
        let both = SignMessageRequest {
            message: Some(Bytes::from_static(b"a")),
            text: Some("a".into()),
        };
        assert!(both.bytes().is_err());
        let text = SignMessageRequest {
            message: None,
            text: Some("hi".into()),
        };
        assert_eq!(text.bytes().unwrap(), b"hi");
    }
}
