//! Commands that go through the running signer's admin API (mTLS, admin identity).
//!
//! Tightening actions (revoke, freeze, pause) fall back to the store when the signer cannot be
//! reached: the signer re-checks key status, freeze and pause inside every decision transaction,
//! so it refuses at its next request either way. Loosening actions (unfreeze, resume) and
//! approvals need the signer's own checks and never go around it.

use std::fmt::Write as _;
use std::time::Duration;

use alloy::primitives::Bytes;
use alloy::sol_types::SolStruct;
use anyhow::{Context, bail};
use castellan_api::client::{ClientError, SignerClient};
use castellan_api::signer::{AdminAction, ApprovalSubmission, CheckedAddress, RequestStatus};
use castellan_api::submitter::Quantity;
use castellan_api::tls::ClientTlsConfig;
use castellan_policy::{APPROVE, Approval, Policy, castellan_domain};
use castellan_signer::audit::UnixMillis;
use castellan_signer::backend::{KeyBackend, SignRequest};
use castellan_signer::store::{KeyName, KeyVersion, Store};
use serde_json::{Value, json};

use crate::config::KeyctlConfig;
use crate::ops::{self, key_name};
use crate::{Globals, Report, fail, parse_duration_ms};

fn client(c: &KeyctlConfig, tls: Option<&ClientTlsConfig>) -> anyhow::Result<SignerClient> {
    let api = c.signer_api()?;
    let timeout = Duration::from_secs(api.timeout_secs.unwrap_or(5));
    SignerClient::with_builder(
        api.url.clone(),
        tls.unwrap_or(&api.tls),
        reqwest_builder(timeout),
    )
    .map_err(|e| anyhow::anyhow!("signer client: {e}"))
}

fn reqwest_builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(timeout)
        .timeout(timeout)
}

/// A signer API error as a failure with its exit code (4: unreachable, 1: refused).
pub fn api_error(what: &str, e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Transport(t) => fail(4, format!("{what}: signer unreachable: {t}")),
        ClientError::Api {
            status,
            code,
            message,
        } => fail(
            1,
            format!("{what}: signer refused ({status} {code}): {message}"),
        ),
        other => fail(1, format!("{what}: {other}")),
    }
}

/// `keyctl revoke <name>[@N] --reason [--destroy --confirm-destroy <name>]`.
///
/// Revokes (through the signer, or in the store when it cannot be reached), tells the submitter
/// to cancel the key's live bundles, then deletes the HSM objects at once (`destroy` =
/// `Some(second confirmation)`) or schedules their deletion after `destroy_wait`.
pub async fn revoke(
    c: &KeyctlConfig,
    g: &Globals,
    key: &str,
    reason: &str,
    direct: bool,
    destroy: Option<Option<&str>>,
) -> anyhow::Result<Report> {
    let (name, version) = match key.split_once('@') {
        Some(_) => {
            let kv: KeyVersion = key.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            (kv.name, Some(kv.version))
        }
        None => (key_name(key)?, None),
    };
    if reason.trim().is_empty() {
        bail!("--reason must not be empty");
    }
    // Refuse an unknown key before asking for confirmation, and never half-way. (On a machine
    // without the store, the signer checks the name.)
    if c.store.path.is_file() || c.signer.is_none() {
        let store = ops::open_store(c)?;
        let versions = store.list_keys(Some(name.clone())).await?;
        if versions.is_empty() {
            bail!("unknown key {name}");
        }
        if let Some(v) = version
            && !versions.iter().any(|r| r.version.version == v)
        {
            bail!("unknown key version {name}@{v}");
        }
    }
    g.confirm(&format!("revoke {key} (signs nothing, ever again)"))?;
    if let Some(given) = destroy {
        g.confirm_name(
            &format!("delete the HSM objects of {key} now"),
            name.as_str(),
            given,
        )?;
    }
    let mut via = "signer";
    let mut warning = None;
    let revoked: Vec<String> = if direct || c.signer.is_none() {
        via = "store";
        ops::revoke_direct(c, g, &name, version, reason)
            .await?
            .iter()
            .map(ToString::to_string)
            .collect()
    } else {
        let action = AdminAction {
            reason: reason.to_owned(),
            version,
            cooldown: None,
        };
        let answer: Result<Value, ClientError> = client(c, None)?
            .post(&format!("/v1/admin/keys/{name}/revoke"), &action)
            .await;
        match answer {
            Ok(v) => v
                .get("revoked")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            Err(ClientError::Transport(t)) => {
                via = "store";
                let w = format!(
                    "signer unreachable ({t}); revoked directly in the store — the signer refuses \
                     the key at its next request"
                );
                eprintln!("keyctl: warning: {w}");
                warning = Some(w);
                ops::revoke_direct(c, g, &name, version, reason)
                    .await?
                    .iter()
                    .map(ToString::to_string)
                    .collect()
            }
            Err(e) => return Err(api_error("revoke", e)),
        }
    };
    let mut text = if revoked.is_empty() {
        format!("{key}: nothing to revoke (already revoked or destroyed)")
    } else {
        format!("revoked {} (via {via})", revoked.join(", "))
    };
    let mut json = json!({"revoked": revoked, "via": via, "warning": warning});
    // The submitter stops resubmitting the key's bundles.
    let cancel = cancel_bundles(c, &name).await;
    match &cancel {
        Ok(Some(n)) => {
            let _ = write!(text, "\nsubmitter: cancelled {n} live bundle(s) of {name}");
        }
        Ok(None) => {}
        Err(w) => {
            eprintln!("keyctl: warning: {w}");
            let _ = write!(text, "\nwarning: {w}");
        }
    }
    json["submitterCancelled"] = match &cancel {
        Ok(n) => json!(n),
        Err(w) => json!({"error": w}),
    };
    // Then the HSM objects: now (second confirmation given), or scheduled.
    let destruction: anyhow::Result<Value> = async {
        if destroy.is_some() {
            let gone = ops::destroy_now(c, g, &name, version).await?;
            let gone: Vec<String> = gone.iter().map(ToString::to_string).collect();
            if !gone.is_empty() {
                let _ = write!(text, "\ndestroyed the HSM objects of {}", gone.join(", "));
            }
            Ok(json!({"destroyed": gone}))
        } else if revoked.is_empty() || !c.store.path.is_file() {
            Ok(Value::Null)
        } else {
            let versions: Vec<KeyVersion> = revoked.iter().filter_map(|v| v.parse().ok()).collect();
            let scheduled = ops::schedule_destroy(c, g, &versions).await?;
            for (v, at) in &scheduled {
                let _ = write!(
                    text,
                    "\n{v}: HSM object deletion scheduled at {} (`keyctl keys cancel-destroy {v}` \
                     undoes it)",
                    at.0 / 1000
                );
            }
            Ok(json!({"scheduled": scheduled.iter().map(|(v, at)| json!({
                "version": v.to_string(), "at": at.0 / 1000
            })).collect::<Vec<_>>()}))
        }
    }
    .await;
    match destruction {
        Ok(d) => json["destruction"] = d,
        Err(e) => {
            return Err(fail(
                1,
                format!(
                    "{} — but the HSM objects were not {}: {e:#}",
                    text.replace('\n', "; "),
                    if destroy.is_some() {
                        "destroyed"
                    } else {
                        "scheduled for destruction"
                    }
                ),
            ));
        }
    }
    Ok(Report::new(text, json))
}

/// Asks the submitter to cancel every live bundle of `name` (`POST /v1/keys/{name}/cancel`, role
/// `admin`). `Ok(None)` when no submitter is configured; `Err` (a warning: the revocation stands)
/// when it cannot be reached or refuses.
pub async fn cancel_bundles(c: &KeyctlConfig, name: &KeyName) -> Result<Option<u64>, String> {
    let Some(url) = &c.submitter_url else {
        return Ok(None);
    };
    let Some(tls) = c
        .submitter_tls
        .as_ref()
        .or(c.signer.as_ref().map(|s| &s.tls))
    else {
        return Err(
            "the submitter was not told to cancel the key's bundles: keyctl.toml has \
                    no submitter_tls or [signer] certificate"
                .into(),
        );
    };
    let client = SignerClient::with_builder(
        url.trim_end_matches('/').to_owned(),
        tls,
        reqwest_builder(Duration::from_secs(5)),
    )
    .map_err(|e| format!("submitter client: {e}"))?;
    match client
        .post::<_, Value>(&format!("/v1/keys/{name}/cancel"), &json!({}))
        .await
    {
        Ok(v) => Ok(Some(
            v.get("cancelled")
                .and_then(|c| c.as_array().map(|a| a.len() as u64).or(c.as_u64()))
                .unwrap_or(0),
        )),
        Err(e) => Err(format!(
            "the submitter was not told to cancel the bundles of {name}: {e}"
        )),
    }
}

/// What the running signer did about a rotation, and a warning for the operator if it could not
/// pick up the new versions.
///
/// The signer caches each key's live versions when it starts (its self-check); a version
/// activated directly in the store is not in that cache, so the signer refuses requests for the
/// key (the cached old version is no longer `active`) until it reloads. keyctl asks it to reload
/// through `POST /v1/admin/keys/reload`; a signer without that route must be restarted.
pub async fn ask_signer_to_reload_keys(c: &KeyctlConfig) -> (&'static str, Option<String>) {
    if c.signer.is_none() {
        return (
            "not_configured",
            Some(
                "no [signer] in keyctl.toml: restart the signer so it serves the new version"
                    .into(),
            ),
        );
    }
    let api = match client(c, None) {
        Ok(a) => a,
        Err(e) => {
            return (
                "error",
                Some(format!("cannot reach the signer to reload keys: {e:#}")),
            );
        }
    };
    match api.post::<_, Value>("/v1/admin/keys/reload", &json!({})).await {
        Ok(_) => ("reloaded", None),
        Err(ClientError::Transport(_)) => ("not_running", None),
        Err(ClientError::Api { status: 404 | 405, .. }) => ("restart_needed", Some(
            "the running signer has no key-reload route: it refuses requests for the rotated key \
             until it is restarted (systemctl restart castellan-signer)"
                .into(),
        )),
        Err(e) => ("error", Some(format!("the signer did not reload its keys: {e}; restart it"))),
    }
}

/// `keyctl freeze --reason`.
pub async fn freeze(c: &KeyctlConfig, g: &Globals, reason: &str) -> anyhow::Result<Report> {
    if reason.trim().is_empty() {
        bail!("--reason must not be empty");
    }
    g.confirm("freeze all signing")?;
    let action = AdminAction {
        reason: reason.to_owned(),
        version: None,
        cooldown: None,
    };
    let answer: Result<Value, ClientError> = match c.signer {
        Some(_) => client(c, None)?.post("/v1/admin/freeze", &action).await,
        None => Err(ClientError::Transport("no [signer] configured".into())),
    };
    match answer {
        Ok(_) => Ok(Report::new(
            "signing frozen (via signer)",
            json!({"frozen": true, "via": "signer"}),
        )),
        Err(ClientError::Transport(t)) => {
            eprintln!("keyctl: warning: signer unreachable ({t}); freezing directly in the store");
            let store = ops::open_store(c)?;
            store.freeze(reason.to_owned(), ops::change(c, g)).await?;
            Ok(Report::new(
                "signing frozen (via store)",
                json!({"frozen": true, "via": "store"}),
            ))
        }
        Err(e) => Err(api_error("freeze", e)),
    }
}

/// `keyctl unfreeze --reason`: proposes; approvers approve the returned request.
pub async fn unfreeze(c: &KeyctlConfig, _g: &Globals, reason: &str) -> anyhow::Result<Report> {
    let action = AdminAction {
        reason: reason.to_owned(),
        version: None,
        cooldown: None,
    };
    match client(c, None)?
        .post::<_, Value>("/v1/admin/unfreeze", &action)
        .await
    {
        Ok(v) => Ok(Report::new(format!("unfrozen: {v}"), v)),
        Err(ClientError::Pending(p)) => Ok(Report::new(
            format!(
                "unfreeze proposed as request {}: needs {} approvals of {} (digest {}); \
                 approvers run `keyctl approve {}`",
                p.request_id, p.threshold, p.approver_set, p.request_digest, p.request_id
            ),
            serde_json::to_value(&*p)?,
        )),
        Err(e) => Err(api_error("unfreeze", e)),
    }
}

/// `keyctl pause <key>`.
pub async fn pause(
    c: &KeyctlConfig,
    g: &Globals,
    key: &str,
    reason: &str,
    cooldown: Option<&str>,
) -> anyhow::Result<Report> {
    let name = key_name(key)?;
    let cooldown_ms = cooldown.map(parse_duration_ms).transpose()?;
    if c.store.path.is_file() || c.signer.is_none() {
        let store = ops::open_store(c)?;
        if store.list_keys(Some(name.clone())).await?.is_empty() {
            bail!("unknown key {name}");
        }
    }
    g.confirm(&format!("pause key {name}"))?;
    let action = AdminAction {
        reason: reason.to_owned(),
        version: None,
        cooldown: cooldown_ms.map(|ms| Quantity(ms / 1000)),
    };
    let answer: Result<Value, ClientError> = match c.signer {
        Some(_) => {
            client(c, None)?
                .post(&format!("/v1/admin/keys/{name}/pause"), &action)
                .await
        }
        None => Err(ClientError::Transport("no [signer] configured".into())),
    };
    match answer {
        Ok(v) => Ok(Report::new(format!("paused {name} (via signer)"), v)),
        Err(ClientError::Transport(t)) => {
            eprintln!("keyctl: warning: signer unreachable ({t}); pausing directly in the store");
            let until = match cooldown_ms {
                Some(ms) => g.now.plus_ms(ms),
                None => UnixMillis(u64::MAX / 2),
            };
            let store = ops::open_store(c)?;
            store
                .pause_key(name.clone(), until, reason.to_owned(), ops::change(c, g))
                .await?;
            Ok(Report::new(
                format!("paused {name} (via store)"),
                json!({"paused": name.as_str(), "via": "store"}),
            ))
        }
        Err(e) => Err(api_error("pause", e)),
    }
}

/// `keyctl resume <key>` (through the signer only).
pub async fn resume(c: &KeyctlConfig, _g: &Globals, key: &str) -> anyhow::Result<Report> {
    let name = key_name(key)?;
    let v: Value = client(c, None)?
        .post(&format!("/v1/admin/keys/{name}/resume"), &json!({}))
        .await
        .map_err(|e| api_error("resume", e))?;
    Ok(Report::new(format!("resumed {name}"), v))
}

/// `keyctl approve|reject <id> --as <approver>`: signs the EIP-712 approval with the approver's
/// key on the token and submits it with the approver's certificate.
pub async fn approve(
    c: &KeyctlConfig,
    g: &Globals,
    id: &str,
    approver: &str,
    ttl: &str,
    approve: bool,
) -> anyhow::Result<Report> {
    let who = c.approver(approver)?;
    let ttl_ms = parse_duration_ms(ttl)?;
    let policy_path = c
        .policy
        .as_ref()
        .context("keyctl.toml names no policy file (needed for the approval domain)")?;
    let policy_text = std::fs::read_to_string(policy_path)
        .with_context(|| format!("cannot read {}", policy_path.display()))?;
    let policy = Policy::from_toml(&policy_text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", policy_path.display()))?;
    let domain = policy.approval_domain().clone();
    let chain_id = domain.chain_id.map(|c| c.to::<u64>()).unwrap_or(1);
    let api = client(c, Some(&who.tls))?;
    let status: RequestStatus = api
        .get(&format!("/v1/requests/{id}"))
        .await
        .map_err(|e| api_error("reading the request", e))?;
    let decision = if approve { APPROVE } else { "reject" };
    let expiry = g.now.plus_ms(ttl_ms).0 / 1000;
    let approval = Approval {
        request: status.request_digest,
        decision: decision.to_owned(),
        expiry,
    };
    let hash = approval.eip712_signing_hash(&castellan_domain(chain_id));
    let (info, sig) = match (&who.key_label, &who.ledger_path) {
        (Some(label), _) => {
            let backend = ops::open_backend(c).await?;
            let info = backend
                .find_by_label(label)
                .await
                .with_context(|| format!("approver key {label:?}"))?;
            let sig = backend
                .sign(&info.key_ref, &info.public_key, SignRequest::digest(hash))
                .await
                .with_context(|| format!("signing with {label:?}"))?
                .signature();
            (info, sig)
        }
        (None, Some(path)) => {
            let device = crate::ledger::open(c).await?;
            let info = device
                .find_by_label(path)
                .await
                .with_context(|| format!("approver key at {path} on the Ledger"))?;
            let sig = crate::ledger::sign_approval(&device, &info, &approval, chain_id).await?;
            (info, sig)
        }
        (None, None) => bail!("approver {approver:?} has neither key_label nor ledger_path"),
    };
    let submission = ApprovalSubmission {
        approver: CheckedAddress(info.address),
        decision: decision.to_owned(),
        expiry: Quantity(expiry),
        signature: Bytes::from(sig.as_bytes().to_vec()),
    };
    let after: RequestStatus = api
        .post(&format!("/v1/requests/{id}/approvals"), &submission)
        .await
        .map_err(|e| api_error(decision, e))?;
    let mut text = String::new();
    let _ = write!(
        text,
        "{decision} of {id} by {approver} ({}) submitted: state {}, {}/{} approvals",
        info.address,
        serde_json::to_value(after.state)?.as_str().unwrap_or("?"),
        after.approvals,
        after.threshold
    );
    Ok(Report::new(text, serde_json::to_value(&after)?))
}

/// `keyctl status`.
pub async fn status(c: &KeyctlConfig, g: &Globals) -> anyhow::Result<Report> {
    let mut problems: Vec<String> = Vec::new();
    let mut text = String::new();
    // Store.
    let store = ops::open_store(c);
    let (frozen, store_ok, paused, due, head) = match &store {
        Ok(s) => {
            let frozen = s.freeze_state().await.ok().flatten();
            let head = s.audit_head().await;
            let mut paused = Vec::new();
            let mut names: Vec<String> = s
                .list_keys(None)
                .await
                .unwrap_or_default()
                .iter()
                .map(|r| r.version.name.to_string())
                .collect();
            names.dedup();
            for n in names {
                if let Ok(kn) = key_name(&n)
                    && let Ok(ctl) = s.key_control(kn).await
                    && ctl.paused_until.is_some_and(|u| u > g.now)
                {
                    paused.push(n);
                }
            }
            let due: Vec<String> = s
                .keys_due_for_rotation(g.now)
                .await
                .unwrap_or_default()
                .iter()
                .map(|r| r.version.to_string())
                .collect();
            (frozen, head.is_ok(), paused, due, head.ok().flatten())
        }
        Err(e) => {
            problems.push(format!("store: {e:#}"));
            (None, false, vec![], vec![], None)
        }
    };
    drop(store);
    let pending = ops::pending(c, g)
        .ok()
        .and_then(|r| r.json.as_array().map(Vec::len))
        .unwrap_or(0);
    if let Some(f) = &frozen {
        problems.push(format!("FROZEN by {}: {}", f.by, f.reason));
    }
    // HSM.
    let hsm = match ops::open_backend(c).await {
        Ok(b) => format!("{:?}", b.health()),
        Err(e) => {
            problems.push(format!("hsm: {e:#}"));
            format!("error: {e:#}")
        }
    };
    // Signer.
    let signer = match &c.signer {
        None => "not configured".to_owned(),
        Some(_) => match client(c, None) {
            Err(e) => {
                problems.push(format!("signer client: {e:#}"));
                format!("error: {e:#}")
            }
            Ok(api) => match api.get::<Value>("/v1/keys").await {
                Ok(_) => "reachable".to_owned(),
                Err(ClientError::Transport(t)) => {
                    problems.push(format!("signer unreachable: {t}"));
                    format!("unreachable: {t}")
                }
                Err(e) => {
                    problems.push(format!("signer refused keyctl: {e}"));
                    format!("reachable, refused: {e}")
                }
            },
        },
    };
    // Submitter.
    let submitter = match &c.submitter_url {
        None => "not configured".to_owned(),
        Some(u) => match tcp_reachable(u).await {
            Ok(()) => "reachable".to_owned(),
            Err(e) => {
                problems.push(format!("submitter unreachable: {e}"));
                format!("unreachable: {e}")
            }
        },
    };
    let _ = writeln!(
        text,
        "freeze:     {}",
        frozen.as_ref().map_or("not frozen".to_owned(), |f| format!(
            "FROZEN by {}: {}",
            f.by, f.reason
        ))
    );
    let _ = writeln!(text, "paused:     {}", list_or_none(&paused));
    let _ = writeln!(text, "due:        {}", list_or_none(&due));
    let _ = writeln!(
        text,
        "pending:    {pending} request(s) waiting for approvals"
    );
    let _ = writeln!(
        text,
        "store:      {}{}",
        if store_ok { "ok" } else { "ERROR" },
        head.map_or(String::new(), |(s, _)| format!(" (audit head {s})"))
    );
    let _ = writeln!(text, "hsm:        {hsm}");
    let _ = writeln!(text, "signer:     {signer}");
    let _ = writeln!(text, "submitter:  {submitter}");
    let json = json!({
        "frozen": frozen.as_ref().map(|f| json!({"by": f.by, "reason": f.reason, "at": f.at.0 / 1000})),
        "paused": paused, "dueForRotation": due, "pendingApprovals": pending,
        "store": store_ok, "auditHead": head.map(|h| h.0), "hsm": hsm,
        "signer": signer, "submitter": submitter, "problems": problems,
    });
    let mut r = Report::new(text, json);
    if !problems.is_empty() {
        r.code = 6;
    }
    Ok(r)
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

async fn tcp_reachable(url: &str) -> anyhow::Result<()> {
    let u = reqwest::Url::parse(url).with_context(|| format!("bad submitter_url {url:?}"))?;
    let host = u
        .host_str()
        .context("submitter_url has no host")?
        .to_owned();
    let port = u
        .port_or_known_default()
        .context("submitter_url has no port")?;
    tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| anyhow::anyhow!("connect to {host}:{port} timed out"))?
    .with_context(|| format!("connect to {host}:{port}"))?;
    Ok(())
}
