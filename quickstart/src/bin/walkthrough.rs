//! `castellan-walkthrough`: a strategy host and an operator walk a running development appliance
//! (made by `keyctl dev init`, started by `scripts/quickstart`) through its main job, one line of
//! output per step:
//!
//! 1. the strategy host (client certificate `strategy-alpha`) reads its key; anvil funds it;
//! 2. it signs a bundle through the signer, which hands it to the submitter over mTLS; the
//!    submitter sends it to the builder (signed with the relay-auth key) until it is included in
//!    a block: the block number is read from the node and from the submitter's bundle status;
//! 3. a transfer above the policy's value cap is refused with the rule and the numbers;
//! 4. a transfer above the approval tier waits; two of the three approvers approve with
//!    `keyctl approve` (their EIP-712 keys are on the token) and it is signed;
//! 5. `keyctl rotate`: old and new address, and the next request is signed by the new one;
//! 6. `keyctl revoke`: the very next request is refused;
//! 7. `keyctl audit verify`, and `scripts/verify_audit.py` on an export, check the audit chain.
//!
//! Everything it prints is also written to `<dir>/walkthrough.json` for the quickstart's test.
//! Exit code 0 only when every step had the expected outcome. Not part of the appliance.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256, address};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use anyhow::{Context, bail, ensure};
use castellan_api::client::{ClientError, SignerClient};
use castellan_api::signer::{
    BundleTx, CheckedAddress, RequestState, RequestStatus, SignBundleRequest, SignedBundleResponse,
    SignedTransactionResponse, UnsignedTx,
};
use castellan_api::submitter::{BundleState, BundleStatus, Quantity, RelaySelection, Wei};
use castellan_api::tls::ClientTlsConfig;
use clap::Parser;
use serde_json::{Value, json};

/// The trading key of a development appliance.
const KEY: &str = "searcher-hot";
/// anvil's chain.
const CHAIN_ID: u64 = 31337;
/// Where the walk-through sends value (anvil's second dev account; any address would do).
const RECIPIENT: Address = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");
const MILLI_ETHER: u128 = 1_000_000_000_000_000;
const ETHER: u128 = 1000 * MILLI_ETHER;
const STEPS: usize = 7;
/// Longest wait for the bundle's inclusion (blocks every second; the bundle targets ten).
const INCLUSION_TIMEOUT: Duration = Duration::from_secs(30);

/// Walk a running development appliance through its main job.
#[derive(Debug, Parser)]
#[command(name = "castellan-walkthrough", version)]
struct Args {
    /// The appliance directory made by `keyctl dev init`.
    #[arg(long)]
    dir: PathBuf,
    /// The signer's API (`https://localhost:<port>`).
    #[arg(long)]
    signer_url: String,
    /// The submitter's API (`https://localhost:<port>`).
    #[arg(long)]
    submitter_url: String,
    /// The node (anvil).
    #[arg(long)]
    node_url: String,
    /// The keyctl binary.
    #[arg(long, default_value = "keyctl")]
    keyctl: PathBuf,
    /// `scripts/verify_audit.py`, the independent audit verifier.
    #[arg(long)]
    verify_audit: PathBuf,
    /// The Python that runs it (with eth-hash; `source scripts/tools.sh` exports it).
    #[arg(long, env = "CASTELLAN_PYTHON", default_value = "python3")]
    python: PathBuf,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut w = Walk {
        summary: json!({}),
        step: 0,
    };
    let result = w.run(&args).await;
    let _ = std::fs::write(
        args.dir.join("walkthrough.json"),
        serde_json::to_string_pretty(&w.summary).unwrap_or_default(),
    );
    match result {
        Ok(()) => {
            println!("walk-through complete: every step had the expected outcome");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("walk-through FAILED at step {}: {e:#}", w.step);
            std::process::ExitCode::FAILURE
        }
    }
}

struct Walk {
    summary: Value,
    step: usize,
}

impl Walk {
    fn line(&mut self, name: &str, text: String, data: Value) {
        println!("[{}/{STEPS}] {text}", self.step);
        self.summary[name] = data;
    }

    async fn run(&mut self, a: &Args) -> anyhow::Result<()> {
        let tls = a.dir.join("tls");
        let cert = |stem: &str| ClientTlsConfig {
            server_ca: tls.join("ca.pem"),
            cert: tls.join(format!("{stem}.pem")),
            key: tls.join(format!("{stem}.key")),
        };
        let alpha = SignerClient::new(&a.signer_url, &cert("strategy-alpha"))?;
        let submitter_admin = SignerClient::new(&a.submitter_url, &cert("admin"))?;
        let node = ProviderBuilder::new()
            .connect_http(a.node_url.parse().context("--node-url")?)
            .erased();
        let keyctl = Keyctl {
            bin: a.keyctl.clone(),
            config: a.dir.join("keyctl.toml"),
        };

        // 1. The key, as the strategy host sees it; the dev chain funds it.
        self.step = 1;
        let (version, from) = active_version(&alpha).await?;
        node.raw_request::<_, Value>("anvil_setBalance".into(), (from, U256::from(100 * ETHER)))
            .await
            .context("anvil_setBalance")?;
        self.line(
            "key",
            format!(
                "strategy host alpha (mTLS) uses {version} at {from}; anvil funded it with 100 ETH"
            ),
            json!({"version": version, "address": from.to_checksum(None)}),
        );

        // 2. A bundle: signed, handed to the submitter, sent to the builder, included.
        self.step = 2;
        let nonce = node.get_transaction_count(from).await?;
        let head = node.get_block_number().await?;
        let (target, last) = (head + 1, head + 10);
        let request = SignBundleRequest {
            bundle_id: None,
            txs: vec![BundleTx {
                tx: Some(transfer(nonce, 10 * MILLI_ETHER)),
                signed: None,
            }],
            target_block: Quantity(target),
            last_block: Some(Quantity(last)),
            min_timestamp: None,
            max_timestamp: None,
            reverting_tx_hashes: vec![],
            replacement_uuid: None,
            relays: RelaySelection::All,
            simulate: false,
        };
        let signed: SignedBundleResponse = alpha
            .post(&format!("/v1/keys/{KEY}/sign/bundle"), &request)
            .await
            .context("signing the bundle")?;
        ensure!(
            signed.submitted.accepted,
            "the submitter did not accept the bundle: {}",
            signed.submitted.state
        );
        let tx_hash = *signed.tx_hashes.first().context("no transaction hash")?;
        let block = wait_receipt(&node, tx_hash).await?;
        let status = wait_included(&submitter_admin, &signed.bundle_id.to_string()).await?;
        ensure!(
            status.included_block == Some(Quantity(block)),
            "the submitter reports block {:?}, the node {block}",
            status.included_block
        );
        self.line(
            "bundle",
            format!(
                "bundle {} signed by {} and sent by the submitter to [{}] for blocks \
                 {target}..{last}: included in block {block} (tx {tx_hash})",
                signed.bundle_id,
                signed.key_version,
                signed.submitted.relays.join(", "),
            ),
            json!({"bundleId": signed.bundle_id, "keyVersion": signed.key_version,
                   "txHash": tx_hash, "from": from.to_checksum(None), "targetBlock": target, "lastBlock": last,
                   "includedBlock": block, "relays": signed.submitted.relays,
                   "submitterState": status.state}),
        );

        // 3. Refused by policy: above the value cap.
        self.step = 3;
        match alpha
            .sign_transaction(KEY, transfer(nonce + 1, 10 * ETHER))
            .await
        {
            Err(ClientError::Api {
                status,
                code,
                message,
            }) => self.line(
                "denied",
                format!("a 10 ETH transfer is refused: {status} {code}: {message}"),
                json!({"status": status, "code": code, "message": message}),
            ),
            other => bail!("a 10 ETH transfer was not refused: {other:?}"),
        }

        // 4. Waits for approvals; two of three approvers approve; signed.
        self.step = 4;
        let pending = match alpha
            .sign_transaction(KEY, transfer(nonce + 1, 2 * ETHER))
            .await
        {
            Err(ClientError::Pending(p)) => p,
            other => bail!("a 2 ETH transfer did not wait for approvals: {other:?}"),
        };
        let id = pending.request_id.clone();
        let mut approvals = Vec::new();
        for approver in ["approver-1", "approver-2"] {
            let after = keyctl.json(&["approve", &id, "--as", approver])?;
            approvals.push(format!(
                "{approver} {}/{}",
                after["approvals"], after["threshold"]
            ));
        }
        let status: RequestStatus = alpha
            .get(&format!("/v1/requests/{id}"))
            .await
            .context("reading the request")?;
        ensure!(
            status.state == RequestState::Signed,
            "after two approvals the request is {:?}",
            status.state
        );
        let result: SignedTransactionResponse = serde_json::from_value(
            status
                .result
                .clone()
                .context("a signed request without its result")?,
        )?;
        ensure!(result.from == from, "signed by {} not {from}", result.from);
        self.line(
            "approved",
            format!(
                "a 2 ETH transfer waits for {} approvals of {:?} (tier {}, request {id}); {}: \
                 signed, tx {}",
                pending.threshold,
                pending.approver_set,
                pending.tier,
                approvals.join(", "),
                result.hash
            ),
            json!({"requestId": id, "tier": pending.tier, "threshold": pending.threshold,
                   "approvals": status.approvals, "approvers": status.approvers,
                   "state": status.state, "txHash": result.hash}),
        );

        // 5. Rotation: a new version on the token; the next request signs with it.
        self.step = 5;
        let rotated = keyctl.json(&["rotate", KEY])?;
        let old = rotated["old"]["address"].as_str().unwrap_or("?").to_owned();
        let new = rotated["new"]["address"].as_str().unwrap_or("?").to_owned();
        let next = alpha
            .sign_transaction(KEY, transfer(0, MILLI_ETHER))
            .await
            .context("signing after the rotation")?;
        ensure!(
            format!("{}", next.from) == new && new != old,
            "after rotating {old} -> {new} the signer signed as {}",
            next.from
        );
        self.line(
            "rotated",
            format!(
                "keyctl rotate {KEY}: {} {old} -> {} {new} (old version {}); the next request \
                 is signed by {new}",
                rotated["old"]["version"].as_str().unwrap_or("?"),
                rotated["new"]["version"].as_str().unwrap_or("?"),
                rotated["old"]["status"].as_str().unwrap_or("?"),
            ),
            json!({"old": old, "new": new, "oldVersion": rotated["old"]["version"],
                   "newVersion": rotated["new"]["version"], "signedBy": next.from.to_checksum(None)}),
        );

        // 6. Revocation: the very next request is refused.
        self.step = 6;
        let revoked = keyctl.json(&["revoke", KEY, "--reason", "quickstart: revocation drill"])?;
        let refused = match alpha.sign_transaction(KEY, transfer(1, MILLI_ETHER)).await {
            Err(ClientError::Api {
                status,
                code,
                message,
            }) => (status, code, message),
            other => bail!("the revoked key still signs: {other:?}"),
        };
        self.line(
            "revoked",
            format!(
                "keyctl revoke {KEY}: {} revoked (via {}); the next request is refused: {} {}: {}",
                list(&revoked["revoked"]),
                revoked["via"].as_str().unwrap_or("?"),
                refused.0,
                refused.1,
                refused.2
            ),
            json!({"revoked": revoked["revoked"], "via": revoked["via"],
                   "status": refused.0, "code": refused.1, "message": refused.2}),
        );

        // 7. The audit chain: keyctl, then the independent Python verifier on an export.
        self.step = 7;
        let verified = keyctl.json(&["audit", "verify"])?;
        ensure!(verified["ok"] == true, "keyctl audit verify: {verified}");
        let export = a.dir.join("audit-export.jsonl");
        keyctl.json(&["audit", "export", "--out", &export.display().to_string()])?;
        // The chain grows meanwhile (outcome reports): the export is checked by both verifiers.
        let exported =
            keyctl.json(&["audit", "verify", "--file", &export.display().to_string()])?;
        ensure!(
            exported["ok"] == true,
            "keyctl audit verify --file: {exported}"
        );
        let py = Command::new(&a.python)
            .arg(&a.verify_audit)
            .arg(&export)
            .output()
            .with_context(|| format!("running {}", a.verify_audit.display()))?;
        let py_line = String::from_utf8_lossy(&py.stdout).trim().to_owned();
        ensure!(
            py.status.success(),
            "verify_audit.py: {py_line} {}",
            String::from_utf8_lossy(&py.stderr).trim()
        );
        self.line(
            "audit",
            format!(
                "keyctl audit verify: {} records, hash links whole (head seq {}); an export of \
                 {} records verified by keyctl and by scripts/verify_audit.py: {py_line}",
                verified["records"], verified["headSeq"], exported["records"]
            ),
            json!({"records": verified["records"], "headSeq": verified["headSeq"],
                   "headHash": verified["headHash"], "exportRecords": exported["records"],
                   "independent": py_line}),
        );
        Ok(())
    }
}

/// An EIP-1559 transfer of `wei` to [`RECIPIENT`] on anvil's chain.
fn transfer(nonce: u64, wei: u128) -> UnsignedTx {
    UnsignedTx {
        tx_type: Some(Quantity(2)),
        chain_id: Quantity(CHAIN_ID),
        nonce: Quantity(nonce),
        to: Some(CheckedAddress(RECIPIENT)),
        value: Some(Wei(U256::from(wei))),
        input: None,
        gas: Quantity(21_000),
        max_fee_per_gas: Some(Wei(U256::from(20_000_000_000u64))),
        max_priority_fee_per_gas: Some(Wei(U256::from(1_000_000_000u64))),
        gas_price: None,
        access_list: None,
    }
}

async fn active_version(client: &SignerClient) -> anyhow::Result<(String, Address)> {
    let key = client.key(KEY).await.context("reading the key")?;
    let v = key
        .versions
        .iter()
        .find(|v| v.status == "active")
        .with_context(|| format!("{KEY} has no active version"))?;
    Ok((v.version.clone(), v.address))
}

async fn wait_receipt(node: &DynProvider, hash: B256) -> anyhow::Result<u64> {
    let deadline = Instant::now() + INCLUSION_TIMEOUT;
    loop {
        if let Some(r) = node.get_transaction_receipt(hash).await? {
            ensure!(r.status(), "the bundle's transaction reverted");
            return r.block_number.context("a receipt without a block");
        }
        ensure!(
            Instant::now() < deadline,
            "the bundle's transaction {hash} was not included within {INCLUSION_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_included(submitter: &SignerClient, id: &str) -> anyhow::Result<BundleStatus> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s: BundleStatus = submitter
            .get(&format!("/v1/bundles/{id}"))
            .await
            .context("reading the bundle's status at the submitter")?;
        if s.state == BundleState::Included {
            return Ok(s);
        }
        ensure!(
            Instant::now() < deadline && s.state.is_live(),
            "the submitter's bundle state is {:?} ({:?})",
            s.state,
            s.reason
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn list(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_else(|| v.to_string())
}

/// keyctl with the appliance's configuration, `--json --yes`.
struct Keyctl {
    bin: PathBuf,
    config: PathBuf,
}

impl Keyctl {
    fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(["--json", "--yes"])
            .args(args)
            .output()
            .with_context(|| format!("running {}", show(&self.bin)))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "keyctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_str(stdout.trim())
            .with_context(|| format!("keyctl {}: not JSON: {stdout}", args.join(" ")))
    }
}

fn show(p: &Path) -> String {
    p.display().to_string()
}
