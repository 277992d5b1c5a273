//! `keyctl rotate --sweep` and `keyctl sweep`: move a retiring version's whole ETH balance to the
//! address of the version that replaced it.
//!
//! # Security
//! keyctl never signs the transfer itself: it asks the running signer to sign it with the
//! retiring version (`POST /v1/keys/{name}@{N}/sign/transaction`, as an identity with role
//! `strategy`), so the request passes the policy (whose retiring rules let a retiring version
//! sign only a plain transfer to its successor), the decision is durably audited and the limit
//! windows are reserved like for any request. The signed transfer is then handed to the
//! submitter (`POST /v1/bundles`, over mTLS as an identity with role `signer` there) as a
//! one-transaction bundle for the next blocks, like the signer's own `eth_sendTransaction`: the
//! submitter routes it privately to its relays and resubmits it per block until it is included.
//! Its bundle id is derived from the transaction hash, so a retry of the same sweep is the same
//! bundle. keyctl waits until the submitter reports the bundle included (or the node shows the
//! receipt). The node named in `[sweep]` only supplies the balance, nonce, fees and current block
//! (untrusted: the policy judges the result, the submitter tracks inclusion itself); it never
//! receives the transaction.

use std::time::Duration;

use alloy::primitives::{Address, B256, U256, keccak256};
use anyhow::{Context, bail};
use castellan_api::client::{ClientError, SignerClient};
use castellan_api::signer::{RequestStatus, SignedTransactionResponse, UnsignedTx};
use castellan_api::submitter::{BundleState, BundleStatus, SUBMIT_PATH, SubmitBundleRequest};
use castellan_signer::store::{KeyStatus, KeyVersion, Store};
use serde_json::{Value, json};

use crate::config::KeyctlConfig;
use crate::{Globals, Report, fail};

/// Gas of a plain value transfer.
const TRANSFER_GAS: u64 = 21_000;
/// Default priority fee: 1 gwei.
const DEFAULT_TIP_WEI: u128 = 1_000_000_000;
/// Default number of blocks the sweep bundle targets (as the signer's `eth_sendTransaction`).
const DEFAULT_BLOCKS: u64 = 25;

/// What a sweep did.
pub struct Swept {
    /// One line for a person.
    pub text: String,
    /// The same as JSON.
    pub json: Value,
}

/// `keyctl sweep <name>@<N>`: sweeps a retiring version to its successor, or, with
/// `request`, sends the transfer of an approved sweep request.
pub async fn sweep_command(
    c: &KeyctlConfig,
    g: &Globals,
    key: &str,
    request: Option<&str>,
) -> anyhow::Result<Report> {
    let kv: KeyVersion = key
        .parse()
        .map_err(|e| anyhow::anyhow!("{e} (sweep names the retiring version)"))?;
    let s = match request {
        Some(id) => send_approved(c, &kv, id).await?,
        None => sweep(c, g, &kv).await?,
    };
    Ok(Report::new(s.text, s.json))
}

/// Sweeps the retiring version `old` to the address of its successor.
pub async fn sweep(c: &KeyctlConfig, _g: &Globals, old: &KeyVersion) -> anyhow::Result<Swept> {
    let conf = c
        .sweep
        .as_ref()
        .context("keyctl.toml has no [sweep] section (node URL and the sweeping identity)")?;
    let store = crate::ops::open_store(c)?;
    let versions = store.list_keys(Some(old.name.clone())).await?;
    let Some(rec) = versions.iter().find(|r| r.version == *old) else {
        bail!("unknown key version {old}");
    };
    let KeyStatus::Retiring { successor, .. } = rec.status else {
        bail!(
            "{old} is {}, not retiring: only a retiring version is swept",
            rec.status.state()
        );
    };
    let Some(new) = versions.iter().find(|r| r.version.version == successor) else {
        bail!("{old} names successor @{successor}, which is not registered");
    };
    let (from, to) = (rec.address, new.address);
    drop(store);

    let node = Node::new(&conf.rpc_url)?;
    let chain_id = node.quantity("eth_chainId", json!([])).await?;
    let balance = node
        .u256("eth_getBalance", json!([from, "pending"]))
        .await?;
    let nonce = node
        .quantity("eth_getTransactionCount", json!([from, "pending"]))
        .await?;
    let block = node
        .call("eth_getBlockByNumber", json!(["latest", false]))
        .await?;
    let base = block
        .get("baseFeePerGas")
        .map(parse_u256)
        .transpose()?
        .unwrap_or(U256::ZERO);
    let tip = U256::from(conf.priority_fee_wei.unwrap_or(DEFAULT_TIP_WEI));
    let max_fee = base.saturating_mul(U256::from(2)).saturating_add(tip);
    let fee = max_fee.saturating_mul(U256::from(TRANSFER_GAS));
    if balance <= fee {
        return Ok(Swept {
            text: format!(
                "nothing to sweep from {old} {from}: balance {balance} wei does not cover the \
                 fee {fee} wei"
            ),
            json: json!({"swept": false, "from": from, "to": to, "balance": balance.to_string(),
                         "fee": fee.to_string()}),
        });
    }
    let value = balance - fee;
    let tx: UnsignedTx = serde_json::from_value(json!({
        "chainId": chain_id.to_string(), "nonce": nonce.to_string(),
        "to": to.to_checksum(None), "value": value.to_string(), "gas": TRANSFER_GAS.to_string(),
        "maxFeePerGas": max_fee.to_string(), "maxPriorityFeePerGas": tip.to_string(),
    }))
    .context("building the sweep transaction")?;
    let api = signer_client(c)?;
    let signed: SignedTransactionResponse = match api.sign_transaction(&old.to_string(), tx).await {
        Ok(s) => s,
        Err(ClientError::Pending(p)) => {
            return Err(fail(
                1,
                format!(
                    "the sweep of {value} wei from {old} waits for {} approvals of {} \
                         (request {}): after `keyctl approve {}`, send it with \
                         `keyctl sweep {old} --request {}`",
                    p.threshold, p.approver_set, p.request_id, p.request_id, p.request_id
                ),
            ));
        }
        Err(e) => return Err(crate::remote::api_error("sweep", e)),
    };
    broadcast(c, &node, old, from, to, value, signed).await
}

/// Sends the transfer of a sweep request that was signed after approvals.
async fn send_approved(c: &KeyctlConfig, old: &KeyVersion, id: &str) -> anyhow::Result<Swept> {
    let conf = c
        .sweep
        .as_ref()
        .context("keyctl.toml has no [sweep] section (node URL and the sweeping identity)")?;
    let st: RequestStatus = signer_client(c)?
        .get(&format!("/v1/requests/{id}"))
        .await
        .map_err(|e| crate::remote::api_error("reading the sweep request", e))?;
    let Some(result) = st.result else {
        bail!(
            "sweep request {id} is not signed (state {}, {}/{} approvals)",
            serde_json::to_value(st.state)?.as_str().unwrap_or("?"),
            st.approvals,
            st.threshold
        );
    };
    let signed: SignedTransactionResponse =
        serde_json::from_value(result).context("the signed sweep request")?;
    let node = Node::new(&conf.rpc_url)?;
    let tx = <alloy::consensus::TxEnvelope as alloy::eips::Decodable2718>::decode_2718_exact(
        signed.raw.as_ref(),
    )
    .map_err(|e| anyhow::anyhow!("the signed sweep is not a transaction: {e}"))?;
    let to = alloy::consensus::Transaction::to(&tx).context("the sweep has no destination")?;
    let value = alloy::consensus::Transaction::value(&tx);
    broadcast(c, &node, old, signed.from, to, value, signed).await
}

async fn broadcast(
    c: &KeyctlConfig,
    node: &Node,
    old: &KeyVersion,
    from: Address,
    to: Address,
    value: U256,
    signed: SignedTransactionResponse,
) -> anyhow::Result<Swept> {
    if signed.key_version != old.to_string() || signed.from != from {
        bail!(
            "the signer signed the sweep with {} ({}), not {old} ({from}): not sent",
            signed.key_version,
            signed.from
        );
    }
    let conf = c
        .sweep
        .as_ref()
        .context("keyctl.toml has no [sweep] section")?;
    let hash = keccak256(signed.raw.as_ref());
    let bundle_id = bundle_id_of(hash);
    let head = node.quantity("eth_blockNumber", json!([])).await?;
    let blocks = conf.blocks.unwrap_or(DEFAULT_BLOCKS).max(1);
    let request: SubmitBundleRequest = serde_json::from_value(json!({
        "bundleId": bundle_id, "keyName": old.name.to_string(), "txs": [signed.raw],
        "targetBlock": (head + 1).to_string(), "lastBlock": (head + blocks).to_string(),
    }))
    .context("building the sweep bundle")?;
    let sub = submitter_client(c, conf)?;
    let ack: BundleStatus = sub
        .post(SUBMIT_PATH, &request)
        .await
        .map_err(|e| submitter_error("handing the sweep to the submitter", e))?;
    let wait = Duration::from_secs(conf.confirm_timeout_secs.unwrap_or(60));
    let block = if wait.is_zero() {
        None
    } else {
        Some(wait_included(&sub, node, old, &bundle_id, hash, ack, wait).await?)
    };
    Ok(Swept {
        text: format!(
            "swept {value} wei from {old} {from} to {to}: tx {hash}, bundle {bundle_id} {}",
            match block {
                Some(b) => format!("included in block {b}"),
                None => "handed to the submitter (not waited for)".to_owned(),
            }
        ),
        json: json!({"swept": true, "from": from, "to": to, "value": value.to_string(),
                     "txHash": hash, "bundleId": bundle_id, "requestId": signed.request_id,
                     "keyVersion": signed.key_version, "included": block.is_some(),
                     "block": block}),
    })
}

/// A bundle id (UUID, version 5 layout) derived from the transaction hash: the same sweep is the
/// same bundle at the submitter, so a retry is idempotent.
fn bundle_id_of(hash: B256) -> String {
    let mut pre = b"castellan keyctl sweep ".to_vec();
    pre.extend_from_slice(hash.as_slice());
    let d = keccak256(&pre);
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = alloy::primitives::hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Polls the submitter's bundle status (and the node's receipt) until the sweep is included;
/// returns the block. A bundle the submitter gives up on (expired, failed, cancelled) is an error.
async fn wait_included(
    sub: &SignerClient,
    node: &Node,
    old: &KeyVersion,
    bundle_id: &str,
    hash: B256,
    mut status: BundleStatus,
    wait: Duration,
) -> anyhow::Result<u64> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match status.state {
            BundleState::Included => {
                if let Some(b) = status.included_block {
                    return Ok(b.0);
                }
            }
            BundleState::Pending => {}
            other => bail!(
                "the submitter stopped the sweep bundle {bundle_id} (tx {hash}) of {old}: {}{}",
                serde_json::to_value(other)?.as_str().unwrap_or("?"),
                status
                    .reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ),
        }
        // The node may show the receipt before the submitter's head tracking does.
        if let Ok(r) = node.call("eth_getTransactionReceipt", json!([hash])).await
            && !r.is_null()
        {
            if r.get("status").and_then(Value::as_str) != Some("0x1") {
                bail!("the sweep {hash} from {old} was included but failed (status 0)");
            }
            let b = r.get("blockNumber").map(parse_u256).transpose()?;
            if let Some(b) = b {
                return u64::try_from(b).context("block number out of range");
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the sweep {hash} of {old} was handed to the submitter (bundle {bundle_id}) but \
                 not included within {}s; `keyctl sweep {old}` again resubmits the same bundle",
                wait.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        status = sub
            .get(&format!("{SUBMIT_PATH}/{bundle_id}"))
            .await
            .map_err(|e| submitter_error("reading the sweep bundle's status", e))?;
    }
}

/// The submitter client of the sweep: `[sweep] submitter_tls`, else `submitter_tls`, else the
/// `[signer]` certificate; it needs role `signer` at the submitter.
fn submitter_client(
    c: &KeyctlConfig,
    conf: &crate::config::SweepConfig,
) -> anyhow::Result<SignerClient> {
    let url = c
        .submitter_url
        .as_ref()
        .context("keyctl.toml has no submitter_url: the sweep is sent through the submitter")?;
    let tls = conf
        .submitter_tls
        .as_ref()
        .or(c.submitter_tls.as_ref())
        .or(c.signer.as_ref().map(|s| &s.tls))
        .context("keyctl.toml has no [sweep] submitter_tls for the submitter")?;
    let timeout = Duration::from_secs(5);
    SignerClient::with_builder(
        url.trim_end_matches('/').to_owned(),
        tls,
        reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout),
    )
    .map_err(|e| anyhow::anyhow!("submitter client: {e}"))
}

fn submitter_error(what: &str, e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Transport(t) => fail(4, format!("{what}: submitter unreachable: {t}")),
        ClientError::Api {
            status,
            code,
            message,
        } => fail(
            1,
            format!("{what}: submitter refused ({status} {code}): {message}"),
        ),
        other => fail(1, format!("{what}: {other}")),
    }
}

/// The signer client of the sweeping identity (role `strategy`).
fn signer_client(c: &KeyctlConfig) -> anyhow::Result<SignerClient> {
    let api = c.signer_api()?;
    let conf = c
        .sweep
        .as_ref()
        .context("keyctl.toml has no [sweep] section")?;
    let timeout = Duration::from_secs(api.timeout_secs.unwrap_or(5));
    SignerClient::with_builder(
        api.url.clone(),
        &conf.tls,
        reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout),
    )
    .map_err(|e| anyhow::anyhow!("signer client: {e}"))
}

/// A plain JSON-RPC client of the node.
struct Node {
    url: String,
    http: reqwest::Client,
}

impl Node {
    fn new(url: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("node client")?;
        Ok(Self {
            url: url.to_owned(),
            http,
        })
    }

    async fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let v: Value = self
            .http
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .map_err(|e| fail(4, format!("node {} unreachable: {e}", self.url)))?
            .json()
            .await
            .with_context(|| format!("node {} answered {method} with garbage", self.url))?;
        if let Some(e) = v.get("error") {
            bail!("node refused {method}: {e}");
        }
        v.get("result")
            .cloned()
            .with_context(|| format!("node answered {method} without a result"))
    }

    async fn u256(&self, method: &str, params: Value) -> anyhow::Result<U256> {
        parse_u256(&self.call(method, params).await?)
    }

    async fn quantity(&self, method: &str, params: Value) -> anyhow::Result<u64> {
        u64::try_from(self.u256(method, params).await?)
            .map_err(|_| anyhow::anyhow!("{method}: quantity out of range"))
    }
}

fn parse_u256(v: &Value) -> anyhow::Result<U256> {
    let s = v
        .as_str()
        .with_context(|| format!("expected a quantity, got {v}"))?;
    U256::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|e| anyhow::anyhow!("bad quantity {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_bundle_id_is_a_uuid_fixed_by_the_transaction_hash() {
        let a = bundle_id_of(B256::repeat_byte(1));
        let b = bundle_id_of(B256::repeat_byte(2));
        assert_eq!(
            a,
            bundle_id_of(B256::repeat_byte(1)),
            "a retry is the same bundle"
        );
        assert_ne!(a, b);
        // The submitter parses it as a UUID (version 5 layout, RFC 4122 variant).
        let req: SubmitBundleRequest = serde_json::from_value(json!({
            "bundleId": a, "keyName": "k", "txs": ["0x01"], "targetBlock": "1"
        }))
        .unwrap();
        assert_eq!(req.bundle_id.to_string(), a);
        assert_eq!(req.bundle_id.get_version_num(), 5);
    }
}
