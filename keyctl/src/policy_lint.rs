//! `keyctl policy check` and `policy diff`.
//!
//! `check` parses with the signer's own parser ([`Policy::from_toml`], so a file that passes here
//! loads in the signer) and then lints what parses but is probably a mistake.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context;
use castellan_policy::Policy;
use serde_json::json;

use crate::{Report, fail};

fn load(path: &Path) -> anyhow::Result<(String, Policy)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let policy = Policy::from_toml(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().replace('\n', " ")))?;
    Ok((text, policy))
}

/// `keyctl policy check <file> [--strict]`.
pub fn check(path: &Path, strict: bool) -> anyhow::Result<Report> {
    let (text, policy) = load(path)?;
    let raw: toml::Value = toml::from_str(&text)?;
    let warnings = lint(&raw);
    let hash = format!("{:#x}", policy.hash());
    let mut out = format!("{}: ok, hash {hash}", path.display());
    for w in &warnings {
        out.push_str(&format!("\nwarning: {w}"));
    }
    if strict && !warnings.is_empty() {
        return Err(fail(
            1,
            format!(
                "{}: {} lint warning(s): {}",
                path.display(),
                warnings.len(),
                warnings.join("; ")
            ),
        ));
    }
    Ok(Report::new(
        out,
        json!({"ok": true, "hash": hash, "warnings": warnings}),
    ))
}

/// What parses but is probably a mistake.
pub fn lint(raw: &toml::Value) -> Vec<String> {
    let mut w = Vec::new();
    let tiers = raw
        .get("tiers")
        .and_then(|t| t.as_array())
        .cloned()
        .unwrap_or_default();
    let approvers = raw
        .get("approvers")
        .and_then(|a| a.as_table())
        .cloned()
        .unwrap_or_default();
    let operations: BTreeSet<String> = tiers
        .iter()
        .filter_map(|t| {
            t.get("operation")
                .and_then(|o| o.as_str())
                .map(str::to_owned)
        })
        .collect();
    if !operations.contains("unfreeze") {
        w.push("no tier for operation \"unfreeze\": lifting a freeze needs no approvals".into());
    }
    if !operations.contains("policy_change") {
        w.push(
            "no tier for operation \"policy_change\": a policy reload needs no approvals".into(),
        );
    }
    for t in &tiers {
        let name = t.get("name").and_then(|n| n.as_str()).unwrap_or("?");
        let threshold = t.get("threshold").and_then(|n| n.as_integer()).unwrap_or(0);
        if threshold == 1 {
            w.push(format!(
                "tier {name:?}: threshold 1 lets a single approver decide alone"
            ));
        }
        if let Some(set) = t.get("approvers").and_then(|a| a.as_str())
            && let Some(members) = approvers.get(set).and_then(|m| m.as_array())
            && i64::try_from(members.len()).unwrap_or(i64::MAX) == threshold
        {
            w.push(format!(
                "tier {name:?}: threshold equals the size of set {set:?}: one lost approver key blocks it"
            ));
        }
    }
    let has_default_velocity = raw
        .get("defaults")
        .and_then(|d| d.get("velocity"))
        .and_then(|v| v.as_array())
        .is_some_and(|v| !v.is_empty());
    for k in raw
        .get("keys")
        .and_then(|k| k.as_array())
        .cloned()
        .unwrap_or_default()
    {
        let name = k.get("name").and_then(|n| n.as_str()).unwrap_or("?");
        let relay = k
            .get("relay_auth")
            .and_then(|r| r.as_bool())
            .unwrap_or(false);
        let velocity = k
            .get("velocity")
            .and_then(|v| v.as_array())
            .is_some_and(|v| !v.is_empty());
        if !relay && !velocity && !has_default_velocity {
            w.push(format!(
                "key {name:?}: no velocity window bounds what it can spend over time"
            ));
        }
    }
    w
}

/// `keyctl policy diff <a> <b>`: line differences of the canonical forms.
pub fn diff(a: &Path, b: &Path) -> anyhow::Result<Report> {
    let (_, pa) = load(a)?;
    let (_, pb) = load(b)?;
    let (ha, hb) = (format!("{:#x}", pa.hash()), format!("{:#x}", pb.hash()));
    if ha == hb {
        return Ok(Report::new(
            format!("same policy (hash {ha})"),
            json!({"same": true, "hash": ha}),
        ));
    }
    let la = flat(&pa)?;
    let lb = flat(&pb)?;
    let sa: BTreeSet<&str> = la.iter().map(String::as_str).collect();
    let sb: BTreeSet<&str> = lb.iter().map(String::as_str).collect();
    let removed: Vec<&str> = la
        .iter()
        .map(String::as_str)
        .filter(|l| !sb.contains(l))
        .collect();
    let added: Vec<&str> = lb
        .iter()
        .map(String::as_str)
        .filter(|l| !sa.contains(l))
        .collect();
    let mut text = format!("{ha} -> {hb}");
    for l in &removed {
        text.push_str(&format!("\n- {l}"));
    }
    for l in &added {
        text.push_str(&format!("\n+ {l}"));
    }
    Ok(Report::new(
        text,
        json!({"same": false, "from": ha, "to": hb, "removed": removed, "added": added}),
    ))
}

/// The canonical form (one line of JSON after a version prefix) as `path = value` lines.
fn flat(p: &Policy) -> anyhow::Result<Vec<String>> {
    let form = p.canonical_form();
    let json_text = form.split_once(' ').map_or(form, |(_, j)| j);
    let v: serde_json::Value =
        serde_json::from_str(json_text).context("the policy's canonical form is not JSON")?;
    let mut out = Vec::new();
    walk(&v, String::new(), &mut out);
    Ok(out)
}

fn walk(v: &serde_json::Value, path: String, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                walk(x, p, out);
            }
        }
        serde_json::Value::Array(a) if !a.is_empty() => {
            for (i, x) in a.iter().enumerate() {
                walk(x, format!("{path}[{i}]"), out);
            }
        }
        other => out.push(format!("{path} = {other}")),
    }
}
