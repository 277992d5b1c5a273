//! `keyctl grant`: budget grants ("client C may spend up to X with key K to these destinations
//! until T"), signed by approvers with their own keys and registered at the signer.
//!
//! The grant travels as one JSON file (the body of `POST /v1/grants`): `grant new` writes it with
//! no signature, each approver adds theirs with `grant sign --as <approver>` (a key on the token
//! or on a Ledger, as `keyctl approve`), and `grant submit` hands it to the signer, which checks
//! every signature against the policy's approver sets and registers the grant only when its
//! signers reach a tier's threshold. Collecting the signatures offline keeps the signer free of
//! half-signed grants; a signature is an EIP-712 `BudgetGrant` under the Castellan domain, so the
//! file can be signed by any EIP-712 wallet too.
//!
//! # Security
//! Signing shows nothing on a PKCS#11 token: the approver must read the file first (`grant sign`
//! prints what it signs). On a Ledger the device shows the typed grant before signing.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::sol_types::SolStruct;
use anyhow::{Context, bail};
use castellan_api::client::SignerClient;
use castellan_api::signer::{
    CheckedAddress, GrantBody, GrantList, GrantSubmission, GrantView, parse_address,
};
use castellan_api::submitter::{Quantity, Wei};
use castellan_api::tls::ClientTlsConfig;
use castellan_policy::{BudgetGrant, Policy, castellan_domain};
use castellan_signer::backend::{KeyBackend, SignRequest};
use serde_json::json;

use crate::config::KeyctlConfig;
use crate::remote::api_error;
use crate::{Globals, Report, parse_duration_ms};

/// What `keyctl grant new` was asked for.
pub struct NewGrant<'a> {
    /// Client identity.
    pub client: &'a str,
    /// Key name.
    pub key: &'a str,
    /// Budget ("3" is 3 ether; "3 ether", "500 gwei" and "21000 wei" as in policies).
    pub budget: &'a str,
    /// Per-request value cap (default: the budget).
    pub max_value: Option<&'a str>,
    /// Per-request worst-case cost cap (default: the budget).
    pub max_cost: Option<&'a str>,
    /// Destinations.
    pub to: &'a [String],
    /// Validity from now ("24h").
    pub valid_for: &'a str,
    /// Nonce (default: now in milliseconds).
    pub nonce: Option<u64>,
    /// Where to write the grant file (refused if it exists).
    pub out: &'a Path,
}

/// `keyctl grant new`: writes an unsigned grant file.
pub fn new_grant(g: &Globals, a: &NewGrant<'_>) -> anyhow::Result<Report> {
    let budget = eth_amount(a.budget).context("--budget")?;
    let max_value = match a.max_value {
        Some(v) => eth_amount(v).context("--max-value")?,
        None => budget,
    };
    let max_cost = match a.max_cost {
        Some(v) => eth_amount(v).context("--max-cost")?,
        None => budget,
    };
    if a.to.is_empty() {
        bail!("a grant needs at least one destination (--to)");
    }
    let destinations =
        a.to.iter()
            .flat_map(|s| s.split(','))
            .map(|s| parse_address(s.trim()).map(CheckedAddress))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    let from = g.now.0 / 1000;
    let until = from.saturating_add(parse_duration_ms(a.valid_for)? / 1000);
    if until <= from {
        bail!("--valid-for must be at least one second");
    }
    let body = GrantBody {
        client: a.client.to_owned(),
        key: a.key.to_owned(),
        max_value: Wei(max_value),
        max_cost: Wei(max_cost),
        destinations,
        budget: Wei(budget),
        window: Quantity(0),
        valid_from: Quantity(from),
        valid_until: Quantity(until),
        nonce: Quantity(a.nonce.unwrap_or(g.now.0)),
    };
    let file = GrantSubmission {
        grant: body,
        signatures: Vec::new(),
    };
    write_new(a.out, &file)?;
    Ok(Report::new(
        format!(
            "wrote {}: {}\nnext: each approver runs `keyctl grant sign {} --as <approver>`, then \
             `keyctl grant submit {}`",
            a.out.display(),
            describe(&file.grant),
            a.out.display(),
            a.out.display()
        ),
        json!({ "file": a.out, "grant": file.grant }),
    ))
}

/// `keyctl grant sign <file> --as <approver>`: adds the approver's EIP-712 signature.
pub async fn sign(c: &KeyctlConfig, file: &Path, approver: &str) -> anyhow::Result<Report> {
    let who = c.approver(approver)?;
    let mut sub = read(file)?;
    let chain_id = chain_id(c)?;
    let typed = typed(&sub.grant);
    let hash = typed.eip712_signing_hash(&castellan_domain(chain_id));
    let (address, sig) = match (&who.key_label, &who.ledger_path) {
        (Some(label), _) => {
            let backend = crate::ops::open_backend(c).await?;
            let info = backend
                .find_by_label(label)
                .await
                .with_context(|| format!("approver key {label:?}"))?;
            let sig = backend
                .sign(&info.key_ref, &info.public_key, SignRequest::digest(hash))
                .await
                .with_context(|| format!("signing with {label:?}"))?
                .signature();
            (info.address, sig)
        }
        (None, Some(path)) => {
            let device = crate::ledger::open(c).await?;
            let info = device
                .find_by_label(path)
                .await
                .with_context(|| format!("approver key at {path} on the Ledger"))?;
            let sig = crate::ledger::sign_grant(&device, &info, &typed, chain_id).await?;
            (info.address, sig)
        }
        (None, None) => bail!("approver {approver:?} has neither key_label nor ledger_path"),
    };
    // One signature per approver: a second `sign` by the same approver replaces the first.
    sub.signatures
        .retain(|s| signer_of(s, hash) != Some(address));
    sub.signatures.push(Bytes::from(sig.as_bytes().to_vec()));
    replace(file, &sub)?;
    let signers: Vec<Address> = sub
        .signatures
        .iter()
        .filter_map(|s| signer_of(s, hash))
        .collect();
    Ok(Report::new(
        format!(
            "{approver} ({address}) signed grant {hash}: {}\n{} signature(s) in {}",
            describe(&sub.grant),
            signers.len(),
            file.display()
        ),
        json!({ "id": hash, "approver": address, "signers": signers }),
    ))
}

/// `keyctl grant submit <file> [--as <approver>]`: registers the grant at the signer (with the
/// approver's certificate, or the admin's).
pub async fn submit(
    c: &KeyctlConfig,
    file: &Path,
    approver: Option<&str>,
) -> anyhow::Result<Report> {
    let sub = read(file)?;
    let tls = approver
        .map(|a| c.approver(a).map(|w| &w.tls))
        .transpose()?;
    let api = client(c, tls)?;
    let view: GrantView = api
        .post("/v1/grants", &sub)
        .await
        .map_err(|e| api_error("submitting the grant", e))?;
    Ok(Report::new(
        format!(
            "grant {} registered, signed by {} approver(s): {}",
            view.id,
            view.signers.len(),
            describe(&view.grant)
        ),
        serde_json::to_value(&view)?,
    ))
}

/// `keyctl grant list`: every grant with spent and remaining budget.
pub async fn list(c: &KeyctlConfig) -> anyhow::Result<Report> {
    let api = client(c, None)?;
    let list: GrantList = api
        .get("/v1/grants")
        .await
        .map_err(|e| api_error("listing grants", e))?;
    let mut text = String::new();
    if list.grants.is_empty() {
        text.push_str("no grants");
    }
    for v in &list.grants {
        let _ = writeln!(
            text,
            "{} {} spent {} of {} ({} left), {} signer(s): {}",
            v.id,
            if v.active { "active " } else { "inactive" },
            ether(v.spent.0),
            ether(v.grant.budget.0),
            ether(v.remaining.0),
            v.signers.len(),
            describe(&v.grant)
        );
    }
    Ok(Report::new(text, serde_json::to_value(&list)?))
}

/// The typed grant the approvers sign.
pub fn typed(g: &GrantBody) -> BudgetGrant {
    BudgetGrant {
        client: g.client.clone(),
        key: g.key.clone(),
        maxValue: g.max_value.0,
        maxCost: g.max_cost.0,
        destinations: g.destinations.iter().map(|d| d.0).collect(),
        budget: g.budget.0,
        window: g.window.0,
        validFrom: g.valid_from.0,
        validUntil: g.valid_until.0,
        nonce: g.nonce.0,
    }
}

fn signer_of(sig: &Bytes, hash: B256) -> Option<Address> {
    alloy::primitives::Signature::try_from(sig.as_ref())
        .ok()?
        .recover_address_from_prehash(&hash)
        .ok()
}

/// The chain id of the approval domain, from the policy keyctl.toml names.
fn chain_id(c: &KeyctlConfig) -> anyhow::Result<u64> {
    let path = c
        .policy
        .as_ref()
        .context("keyctl.toml names no policy file (needed for the approval domain)")?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let policy =
        Policy::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(policy
        .approval_domain()
        .chain_id
        .map(|c| c.to::<u64>())
        .unwrap_or(1))
}

fn client(c: &KeyctlConfig, tls: Option<&ClientTlsConfig>) -> anyhow::Result<SignerClient> {
    let api = c.signer_api()?;
    let timeout = Duration::from_secs(api.timeout_secs.unwrap_or(5));
    SignerClient::with_builder(
        api.url.clone(),
        tls.unwrap_or(&api.tls),
        reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout),
    )
    .map_err(|e| anyhow::anyhow!("signer client: {e}"))
}

/// An amount for a grant flag: a bare number is ether; otherwise as in policy files.
fn eth_amount(text: &str) -> anyhow::Result<U256> {
    let t = text.trim();
    let bare = !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let spelled = if bare {
        format!("{t} ether")
    } else {
        t.to_owned()
    };
    castellan_policy::parse_amount(&spelled).map_err(|e| anyhow::anyhow!("{text:?}: {e}"))
}

/// Wei as ether with up to 18 decimals, trailing zeros dropped.
fn ether(wei: U256) -> String {
    let unit = U256::from(10u64).pow(U256::from(18u64));
    let (whole, frac) = (wei / unit, wei % unit);
    if frac.is_zero() {
        return format!("{whole} ETH");
    }
    let frac = format!("{:018}", frac.to::<u64>());
    format!("{whole}.{} ETH", frac.trim_end_matches('0'))
}

fn describe(g: &GrantBody) -> String {
    let to: Vec<String> = g.destinations.iter().map(|d| d.0.to_string()).collect();
    format!(
        "client {} may spend up to {} with key {} (at most {} value, {} worst-case cost per \
         request) to [{}] from {} until {} (nonce {})",
        g.client,
        ether(g.budget.0),
        g.key,
        ether(g.max_value.0),
        ether(g.max_cost.0),
        to.join(", "),
        g.valid_from.0,
        g.valid_until.0,
        g.nonce.0
    )
}

fn read(file: &Path) -> anyhow::Result<GrantSubmission> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a grant file", file.display()))
}

/// Writes a new file (refused if it exists), durably.
fn write_new(file: &Path, sub: &GrantSubmission) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
        .with_context(|| format!("cannot create {}", file.display()))?;
    f.write_all(serde_json::to_string_pretty(sub)?.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}

/// Replaces a file: temporary file, fsync, rename.
fn replace(file: &Path, sub: &GrantSubmission) -> anyhow::Result<()> {
    let tmp = file.with_extension("partial");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(serde_json::to_string_pretty(sub)?.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, file).with_context(|| format!("cannot replace {}", file.display()))?;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn amounts_are_ether_unless_they_name_a_unit() {
        let e = U256::from(10u64).pow(U256::from(18u64));
        assert_eq!(eth_amount("3").unwrap(), U256::from(3u64) * e);
        assert_eq!(
            eth_amount("1.5").unwrap(),
            U256::from(15u64) * e / U256::from(10u64)
        );
        assert_eq!(
            eth_amount("500 gwei").unwrap(),
            U256::from(500_000_000_000u64)
        );
        assert!(eth_amount("-1").is_err());
        assert_eq!(ether(U256::from(15u64) * e / U256::from(10u64)), "1.5 ETH");
        assert_eq!(ether(U256::from(2u64) * e), "2 ETH");
    }
}
