//! The Ethereum node the submitter follows: head, receipts, nonces. Answers are untrusted input,
//! parsed leniently into the few fields used.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use serde_json::{Value, json};

use crate::Error;
use crate::wire::{lenient_u64, lenient_u256};

/// The fields of a receipt the submitter uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// Block it is in.
    pub block_number: u64,
    /// Hash of that block.
    pub block_hash: B256,
    /// Execution status (true = success).
    pub success: bool,
    /// Gas used.
    pub gas_used: u64,
    /// Effective gas price.
    pub effective_gas_price: U256,
}

/// A JSON-RPC client of one node.
#[derive(Debug)]
pub struct Node {
    url: reqwest::Url,
    client: reqwest::Client,
    next_id: AtomicU64,
}

impl Node {
    /// A client of `url` with a per-request timeout.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, Error> {
        crate::relay::install_crypto_provider();
        let url = url
            .parse()
            .map_err(|_| Error::Config(format!("invalid node url {url:?}")))?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| Error::Http(e.to_string()))?;
        Ok(Self {
            url,
            client,
            next_id: AtomicU64::new(1),
        })
    }

    /// `eth_blockNumber`.
    pub async fn block_number(&self) -> Result<u64, Error> {
        let v = self.request("eth_blockNumber", json!([])).await?;
        lenient_u64(&v).ok_or_else(|| Error::Node(format!("bad block number {v}")))
    }

    /// `eth_getTransactionReceipt`; `None` while not mined.
    pub async fn receipt(&self, hash: B256) -> Result<Option<Receipt>, Error> {
        let v = self
            .request("eth_getTransactionReceipt", json!([hash]))
            .await?;
        if v.is_null() {
            return Ok(None);
        }
        let bad = || Error::Node(format!("bad receipt for {hash}"));
        // A pending receipt without a block is treated as not mined.
        let Some(block_number) = v.get("blockNumber").and_then(lenient_u64) else {
            return Ok(None);
        };
        let block_hash = v
            .get("blockHash")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        Ok(Some(Receipt {
            block_number,
            block_hash,
            success: v.get("status").and_then(lenient_u64) == Some(1),
            gas_used: v.get("gasUsed").and_then(lenient_u64).ok_or_else(bad)?,
            effective_gas_price: v
                .get("effectiveGasPrice")
                .and_then(lenient_u256)
                .unwrap_or_default(),
        }))
    }

    /// `eth_getTransactionCount(address, "latest")`.
    pub async fn nonce(&self, address: Address) -> Result<u64, Error> {
        let v = self
            .request("eth_getTransactionCount", json!([address, "latest"]))
            .await?;
        lenient_u64(&v).ok_or_else(|| Error::Node(format!("bad nonce {v}")))
    }

    async fn request(&self, method: &str, params: Value) -> Result<Value, Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let response = self
            .client
            .post(self.url.clone())
            .json(&body)
            .send()
            .await
            .map_err(|e| Error::Node(format!("{method}: {e}")))?;
        let v: Value = response
            .json()
            .await
            .map_err(|e| Error::Node(format!("{method}: {e}")))?;
        if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
            return Err(Error::Node(format!("{method}: {err}")));
        }
        v.get("result")
            .cloned()
            .ok_or_else(|| Error::Node(format!("{method}: no result")))
    }
}
