//! A submitted bundle, validated once at the edge: decoded transactions, recovered senders and
//! nonces, chain-id check, block range and size limits.

use alloy::consensus::transaction::SignerRecoverable;
use alloy::consensus::{Transaction, TxEnvelope};
use alloy::eips::eip2718::Decodable2718;
use alloy::primitives::{Address, B256, Bytes, keccak256};
use uuid::Uuid;

use castellan_api::submitter::{RelaySelection, SubmitBundleRequest};

use crate::error::ApiError;
use crate::store::StoredMeta;

/// Most transactions per bundle (Flashbots, BuilderNet).
pub const MAX_TXS: usize = 100;
/// Most bytes of raw transactions per bundle (Flashbots `rpc-endpoint.mdx`).
pub const MAX_BUNDLE_BYTES: usize = 300_000;

/// Sender and nonce of one bundle transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxMeta {
    /// Recovered sender.
    pub sender: Address,
    /// Nonce.
    pub nonce: u64,
}

/// A validated bundle (immutable once accepted).
#[derive(Clone, Debug)]
pub struct ValidBundle {
    /// Bundle id.
    pub id: Uuid,
    /// Key that signed it.
    pub key_name: String,
    /// Raw transactions.
    pub txs: Vec<Bytes>,
    /// Transaction hashes, in order.
    pub tx_hashes: Vec<B256>,
    /// Senders and nonces, in order.
    pub tx_meta: Vec<TxMeta>,
    /// First target block.
    pub target_block: u64,
    /// Last target block.
    pub last_block: u64,
    /// Earliest block timestamp.
    pub min_timestamp: Option<u64>,
    /// Latest block timestamp.
    pub max_timestamp: Option<u64>,
    /// Allowed reverts.
    pub reverting: Vec<B256>,
    /// Replacement uuid sent to relays (defaults to the bundle id).
    pub replacement_uuid: Uuid,
    /// Relay selection as asked.
    pub selection: RelaySelection,
    /// Simulate before the first send.
    pub simulate: bool,
    /// Digest of the request's canonical JSON (same id + different digest = conflict).
    pub digest: B256,
    /// The request as accepted (persisted).
    pub request: SubmitBundleRequest,
}

impl ValidBundle {
    /// Validates a request for `chain_id`.
    pub fn validate(
        request: SubmitBundleRequest,
        chain_id: u64,
        max_range: u64,
    ) -> Result<Self, ApiError> {
        let invalid = |code: &'static str, message: String| ApiError::bad_request(code, message);
        if request.key_name.is_empty() || request.key_name.len() > 128 {
            return Err(invalid(
                "invalid_key_name",
                "keyName must be 1..=128 characters".into(),
            ));
        }
        if request.txs.is_empty() {
            return Err(invalid(
                "empty_bundle",
                "a bundle needs at least one transaction".into(),
            ));
        }
        if request.txs.len() > MAX_TXS {
            return Err(invalid(
                "too_many_txs",
                format!("at most {MAX_TXS} transactions"),
            ));
        }
        let total: usize = request.txs.iter().map(|t| t.len()).sum();
        if total > MAX_BUNDLE_BYTES {
            return Err(invalid(
                "bundle_too_large",
                format!("at most {MAX_BUNDLE_BYTES} bytes of transactions"),
            ));
        }
        let target = request.target_block.0;
        let last = request.last_block.map_or(target, |q| q.0);
        if last < target {
            return Err(invalid(
                "invalid_block_range",
                "lastBlock is before targetBlock".into(),
            ));
        }
        if last - target > max_range {
            return Err(invalid(
                "invalid_block_range",
                format!("at most {max_range} blocks between targetBlock and lastBlock"),
            ));
        }
        if let (Some(min), Some(max)) = (request.min_timestamp, request.max_timestamp)
            && min > max
        {
            return Err(invalid(
                "invalid_timestamps",
                "minTimestamp is after maxTimestamp".into(),
            ));
        }
        if let RelaySelection::Named { relays } = &request.relays
            && relays.is_empty()
        {
            return Err(invalid(
                "invalid_relays",
                "a named selection needs at least one relay".into(),
            ));
        }
        let mut tx_hashes = Vec::with_capacity(request.txs.len());
        let mut tx_meta = Vec::with_capacity(request.txs.len());
        for (i, raw) in request.txs.iter().enumerate() {
            let mut buf = raw.as_ref();
            let envelope = TxEnvelope::decode_2718(&mut buf)
                .map_err(|e| invalid("invalid_transaction", format!("txs[{i}]: {e}")))?;
            if !buf.is_empty() {
                return Err(invalid(
                    "invalid_transaction",
                    format!("txs[{i}]: trailing bytes"),
                ));
            }
            match envelope.chain_id() {
                Some(id) if id == chain_id => {}
                Some(id) => {
                    return Err(invalid(
                        "wrong_chain_id",
                        format!("txs[{i}] is for chain {id}, not {chain_id}"),
                    ));
                }
                None => {
                    return Err(invalid(
                        "wrong_chain_id",
                        format!("txs[{i}] has no chain id (pre-EIP-155)"),
                    ));
                }
            }
            let sender = envelope
                .recover_signer()
                .map_err(|e| invalid("invalid_signature", format!("txs[{i}]: {e}")))?;
            tx_hashes.push(keccak256(raw));
            tx_meta.push(TxMeta {
                sender,
                nonce: envelope.nonce(),
            });
        }
        let canonical = serde_json::to_vec(&request)
            .map_err(|e| ApiError::internal(format!("serialize request: {e}")))?;
        Ok(Self {
            id: request.bundle_id,
            key_name: request.key_name.clone(),
            txs: request.txs.clone(),
            tx_hashes,
            tx_meta,
            target_block: target,
            last_block: last,
            min_timestamp: request.min_timestamp.map(|q| q.0),
            max_timestamp: request.max_timestamp.map(|q| q.0),
            reverting: request.reverting_tx_hashes.clone(),
            replacement_uuid: request.replacement_uuid.unwrap_or(request.bundle_id),
            selection: request.relays.clone(),
            simulate: request.simulate,
            digest: keccak256(canonical),
            request,
        })
    }

    /// What this validation recovered, kept with the stored row.
    pub fn meta(&self, chain_id: u64) -> StoredMeta {
        StoredMeta {
            chain_id,
            txs: self.tx_meta.iter().map(|m| (m.sender, m.nonce)).collect(),
        }
    }

    /// Rebuilds a bundle this submitter validated before it stored it, without decoding the
    /// transactions or recovering their senders again (the expensive part of [`Self::validate`]):
    /// the senders and nonces come from `meta`, the hashes and digest are recomputed. Falls back
    /// to a full validation when `meta` is absent, was recorded for another chain id, or does
    /// not match the transactions.
    pub fn from_stored(
        request: SubmitBundleRequest,
        meta: Option<&StoredMeta>,
        chain_id: u64,
        max_range: u64,
    ) -> Result<Self, ApiError> {
        let Some(meta) =
            meta.filter(|m| m.chain_id == chain_id && m.txs.len() == request.txs.len())
        else {
            return Self::validate(request, chain_id, max_range);
        };
        let target = request.target_block.0;
        let last = request.last_block.map_or(target, |q| q.0);
        let canonical = serde_json::to_vec(&request)
            .map_err(|e| ApiError::internal(format!("serialize request: {e}")))?;
        Ok(Self {
            id: request.bundle_id,
            key_name: request.key_name.clone(),
            txs: request.txs.clone(),
            tx_hashes: request.txs.iter().map(keccak256).collect(),
            tx_meta: meta
                .txs
                .iter()
                .map(|&(sender, nonce)| TxMeta { sender, nonce })
                .collect(),
            target_block: target,
            last_block: last,
            min_timestamp: request.min_timestamp.map(|q| q.0),
            max_timestamp: request.max_timestamp.map(|q| q.0),
            reverting: request.reverting_tx_hashes.clone(),
            replacement_uuid: request.replacement_uuid.unwrap_or(request.bundle_id),
            selection: request.relays.clone(),
            simulate: request.simulate,
            digest: keccak256(canonical),
            request,
        })
    }
}
