//! Commands that work on the store and the key backend directly (they do not need the signer).
//!
//! # Security
//! New key versions are generated on the backend (non-extractable, sign-only) and registered
//! `pending`; only then activated. The signer re-checks a version's status inside every decision
//! transaction, so a change committed here stops the signer at its next request whether or not it
//! is running.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, bail};
use castellan_signer::audit::{self, UnixMillis};
use castellan_signer::backend::KeyBackend;
use castellan_signer::backend::any::AnyBackend;
use castellan_signer::store::{
    AuditCursor, Change, KeyName, KeyStatus, KeyVersion, KeyVersionRecord, NewKeyVersion,
    SqliteStore, Store,
};
use serde_json::{Value, json};

use crate::config::KeyctlConfig;
use crate::{Globals, Report, fail, parse_duration_ms};

/// Default grace period of a rotated-out version.
const DEFAULT_GRACE: &str = "24h";

/// Opens the store named in keyctl.toml. The file must exist: keyctl never creates a store by
/// accident under a mistyped path (`keyctl init` creates one).
pub fn open_store(c: &KeyctlConfig) -> anyhow::Result<SqliteStore> {
    if !c.store.path.is_file() {
        bail!(
            "store {} does not exist (create it with `keyctl init`)",
            c.store.path.display()
        );
    }
    SqliteStore::open(&c.store.path)
        .with_context(|| format!("opening store {}", c.store.path.display()))
}

/// Opens the key backend named in keyctl.toml (loads the module and logs in, or connects).
pub async fn open_backend(c: &KeyctlConfig) -> anyhow::Result<AnyBackend> {
    AnyBackend::open(&c.backend)
        .await
        .context("opening the key backend")
}

/// A validated key name, or a one-line error.
pub fn key_name(s: &str) -> anyhow::Result<KeyName> {
    KeyName::new(s).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Who made a change, and when.
pub fn change(c: &KeyctlConfig, g: &Globals) -> Change {
    Change::new(c.operator.clone(), g.now)
}

/// `keyctl init`: check the token login and create or migrate the store.
pub async fn init(
    c: &KeyctlConfig,
    _g: &Globals,
    softhsm_label: Option<&str>,
) -> anyhow::Result<Report> {
    if let Some(label) = softhsm_label {
        crate::dev::init_softhsm_token(c, label)?;
    }
    let backend = open_backend(c).await?;
    let token = backend.kind().to_owned();
    drop(backend);
    let existed = c.store.path.is_file();
    let store = SqliteStore::open(&c.store.path)
        .with_context(|| format!("creating store {}", c.store.path.display()))?;
    let head = store.audit_head().await?;
    Ok(Report::new(
        format!(
            "{token} backend: login ok\nstore {}: {} (audit head {})",
            c.store.path.display(),
            if existed { "migrated" } else { "created" },
            head.map_or("none".into(), |(s, _)| s.to_string())
        ),
        json!({"backend": token, "store": c.store.path, "created": !existed,
               "auditHead": head.map(|(s, _)| s)}),
    ))
}

/// Generates the next version of `name` on the backend (label `name@N`) and registers it
/// `pending`; destroys the token object again if the registration fails.
pub async fn new_version(
    store: &SqliteStore,
    backend: &AnyBackend,
    name: &KeyName,
    rotate_every_ms: Option<u64>,
    change: Change,
) -> anyhow::Result<KeyVersionRecord> {
    let versions = store.list_keys(Some(name.clone())).await?;
    let next = versions
        .iter()
        .map(|r| r.version.version)
        .max()
        .unwrap_or(0)
        .saturating_add(1);
    let label = format!("{name}@{next}");
    let info = backend
        .generate(&label)
        .await
        .with_context(|| format!("generating {label} on the token"))?;
    let public_key = info.public_key.to_encoded_point(false).as_bytes().to_vec();
    let registered = store
        .register_key_version(
            NewKeyVersion {
                name: name.clone(),
                key_ref: info.key_ref.clone(),
                address: info.address,
                public_key,
                rotate_every_ms,
            },
            change,
        )
        .await;
    match registered {
        Ok(r) if r.version.version == next => Ok(r),
        Ok(r) => bail!(
            "registered as {} but the token object is labelled {label}: another keyctl raced",
            r.version
        ),
        Err(e) => {
            // Do not leave an unregistered key on the token.
            let _ = backend.destroy(&info.key_ref).await;
            Err(anyhow::Error::new(e).context(format!("registering {label}")))
        }
    }
}

/// `keyctl keys generate`.
pub async fn keys_generate(
    c: &KeyctlConfig,
    g: &Globals,
    name: &str,
    rotate_every: Option<&str>,
) -> anyhow::Result<Report> {
    let name = key_name(name)?;
    let rotate_every_ms = rotate_every.map(parse_duration_ms).transpose()?;
    let store = open_store(c)?;
    if !store.list_keys(Some(name.clone())).await?.is_empty() {
        bail!("key {name} already exists (use `keyctl rotate {name}` for a new version)");
    }
    let backend = open_backend(c).await?;
    let rec = new_version(&store, &backend, &name, rotate_every_ms, change(c, g)).await?;
    let active = store
        .activate_version(rec.version.clone(), None, change(c, g))
        .await?;
    let mut text = format!(
        "generated {} address {} ({})",
        active.version, active.address, active.key_ref
    );
    let mut json = json!({"key": active.version.to_string(), "address": active.address.to_checksum(None),
           "backend": active.key_ref.to_string(), "rotateEveryMs": rotate_every_ms});
    // A running signer serves the new key at once, as after a rotation.
    signer_reload(c, &mut json, &mut text).await;
    Ok(Report::new(text, json))
}

/// `keyctl keys list` and `keys show`.
pub async fn keys_list(
    c: &KeyctlConfig,
    g: &Globals,
    name: Option<&str>,
) -> anyhow::Result<Report> {
    let filter = name.map(key_name).transpose()?;
    let store = open_store(c)?;
    let records = store.list_keys(filter.clone()).await?;
    if let Some(n) = &filter
        && records.is_empty()
    {
        bail!("unknown key {n}");
    }
    let mut names: Vec<KeyName> = records.iter().map(|r| r.version.name.clone()).collect();
    names.dedup();
    let mut text = String::new();
    let mut keys = Vec::new();
    for n in names {
        let versions: Vec<&KeyVersionRecord> =
            records.iter().filter(|r| r.version.name == n).collect();
        let control = store.key_control(n.clone()).await?;
        let rotate_every = versions.first().and_then(|r| r.rotate_every_ms);
        let active = versions.iter().find(|r| r.status == KeyStatus::Active);
        let next_rotation = match (rotate_every, active) {
            (Some(every), Some(a)) => Some(a.activated_at.unwrap_or(a.created_at).plus_ms(every)),
            _ => None,
        };
        let paused = control.paused_until.filter(|u| *u > g.now);
        let _ = writeln!(
            text,
            "{n}{}{}{}",
            rotate_every.map_or(String::new(), |e| format!("  rotate every {}", human_ms(e))),
            next_rotation.map_or(String::new(), |t| format!(
                "  next rotation {}",
                relative(g.now, t)
            )),
            paused.map_or(String::new(), |_| "  PAUSED".into()),
        );
        let mut vjson = Vec::new();
        for r in versions.iter().rev() {
            let age = g.now.0.saturating_sub(r.created_at.0);
            let _ = writeln!(
                text,
                "  {:<24} {}  {:<10} age {}{}",
                r.version.to_string(),
                r.address,
                r.status.state(),
                human_ms(age),
                status_detail(&r.status, g.now),
            );
            vjson.push(json!({
                "version": r.version.to_string(), "address": r.address.to_checksum(None),
                "status": r.status.state(), "statusDetail": serde_json::to_value(&r.status)?,
                "createdAt": r.created_at.0 / 1000,
                "activatedAt": r.activated_at.map(|t| t.0 / 1000),
                "ageSeconds": age / 1000, "backend": r.key_ref.to_string(),
            }));
        }
        keys.push(json!({
            "name": n.as_str(), "rotateEverySeconds": rotate_every.map(|e| e / 1000),
            "nextRotation": next_rotation.map(|t| t.0 / 1000),
            "due": next_rotation.is_some_and(|t| t <= g.now),
            "pausedUntil": paused.map(|t| t.0 / 1000),
            "versions": vjson,
        }));
    }
    if text.is_empty() {
        text = "no keys".into();
    }
    let json = match filter {
        Some(_) => keys.into_iter().next().unwrap_or(Value::Null),
        None => Value::Array(keys),
    };
    Ok(Report::new(text, json))
}

/// Rotates one key: new version on the same backend, activated; the old one retiring.
async fn rotate_one(
    store: &SqliteStore,
    backend: &AnyBackend,
    c: &KeyctlConfig,
    g: &Globals,
    name: &KeyName,
    grace_ms: u64,
) -> anyhow::Result<(KeyVersionRecord, KeyVersionRecord)> {
    let Some(old) = store.active_version(name.clone()).await? else {
        if store.list_keys(Some(name.clone())).await?.is_empty() {
            bail!("unknown key {name}");
        }
        bail!("key {name} has no active version to rotate");
    };
    let kind = old.key_ref.to_string();
    if !kind.starts_with(&format!("{}:", backend.kind())) {
        bail!(
            "{} lives on {kind}, not on the configured {} backend",
            old.version,
            backend.kind()
        );
    }
    let new = new_version(store, backend, name, None, change(c, g)).await?;
    let grace = if grace_ms == 0 { None } else { Some(grace_ms) };
    let new = store
        .activate_version(new.version.clone(), grace, change(c, g))
        .await?;
    let old = store
        .list_keys(Some(name.clone()))
        .await?
        .into_iter()
        .find(|r| r.version == old.version)
        .unwrap_or(old);
    Ok((old, new))
}

fn grace_ms(c: &KeyctlConfig, grace: Option<&str>) -> anyhow::Result<u64> {
    parse_duration_ms(grace.or(c.rotate_grace.as_deref()).unwrap_or(DEFAULT_GRACE))
}

fn rotation_json(old: &KeyVersionRecord, new: &KeyVersionRecord) -> Value {
    json!({
        "key": new.version.name.as_str(),
        "old": {"version": old.version.to_string(), "address": old.address.to_checksum(None),
                "status": old.status.state(), "statusDetail": serde_json::to_value(&old.status).unwrap_or(Value::Null)},
        "new": {"version": new.version.to_string(), "address": new.address.to_checksum(None),
                "status": new.status.state()},
    })
}

fn rotation_text(old: &KeyVersionRecord, new: &KeyVersionRecord, now: UnixMillis) -> String {
    format!(
        "rotated {}: {} {} -> {} {} (old version {}{})",
        new.version.name,
        old.version,
        old.address,
        new.version,
        new.address,
        old.status.state(),
        status_detail(&old.status, now)
    )
}

/// `keyctl rotate <name>`.
pub async fn rotate(
    c: &KeyctlConfig,
    g: &Globals,
    name: &str,
    grace: Option<&str>,
    sweep: bool,
) -> anyhow::Result<Report> {
    let name = key_name(name)?;
    let grace = grace_ms(c, grace)?;
    let store = open_store(c)?;
    if store.list_keys(Some(name.clone())).await?.is_empty() {
        bail!("unknown key {name}");
    }
    let backend = open_backend(c).await?;
    if sweep {
        if grace == 0 {
            bail!("--sweep needs a grace period: a retired version cannot sign the sweep");
        }
        if c.sweep.is_none() {
            bail!("--sweep: keyctl.toml has no [sweep] section (node URL and sweeping identity)");
        }
    }
    let (old, new) = rotate_one(&store, &backend, c, g, &name, grace).await?;
    drop(backend);
    drop(store);
    let mut json = rotation_json(&old, &new);
    let mut text = rotation_text(&old, &new, g.now);
    signer_reload(c, &mut json, &mut text).await;
    if sweep {
        match crate::sweep::sweep(c, g, &old.version).await {
            Ok(s) => {
                let _ = write!(text, "\n{}", s.text);
                if let Value::Object(m) = &mut json {
                    m.insert("sweep".into(), s.json);
                }
            }
            Err(e) => {
                let code = e.downcast_ref::<crate::Failure>().map_or(1, |f| f.code);
                return Err(fail(
                    code,
                    format!(
                        "the sweep failed: {e:#} ({}; retry the sweep with `keyctl sweep {}`)",
                        text.replace('\n', "; "),
                        old.version
                    ),
                ));
            }
        }
    }
    Ok(Report::new(text, json))
}

/// `keyctl rotate --due`: retires versions whose grace period ended, then rotates every key
/// whose active version is older than its `rotate_every`.
pub async fn rotate_due(
    c: &KeyctlConfig,
    g: &Globals,
    grace: Option<&str>,
) -> anyhow::Result<Report> {
    let grace = grace_ms(c, grace)?;
    let store = open_store(c)?;
    let mut text = String::new();
    let mut retired = Vec::new();
    for r in store.list_keys(None).await? {
        if let KeyStatus::Retiring { until, .. } = r.status
            && until <= g.now
        {
            store
                .set_key_status(r.version.clone(), KeyStatus::Retired, change(c, g))
                .await?;
            let _ = writeln!(text, "retired {} (grace period ended)", r.version);
            retired.push(r.version.to_string());
        }
    }
    let (destroyed, destroy_failures) = destroy_due_versions(c, g, &store).await?;
    for d in &destroyed {
        let _ = writeln!(text, "destroyed {d} (scheduled destruction due)");
    }
    let due = store.keys_due_for_rotation(g.now).await?;
    let mut rotated = Vec::new();
    let mut failures: Vec<Value> = destroy_failures
        .iter()
        .map(|f| {
            let _ = writeln!(text, "FAILED destroying {f}");
            json!({"destroy": f})
        })
        .collect();
    if !due.is_empty() {
        let backend = open_backend(c).await?;
        for d in due {
            match rotate_one(&store, &backend, c, g, &d.version.name, grace).await {
                Ok((old, new)) => {
                    let _ = writeln!(text, "{}", rotation_text(&old, &new, g.now));
                    rotated.push(rotation_json(&old, &new));
                }
                Err(e) => {
                    let _ = writeln!(text, "FAILED {}: {e:#}", d.version.name);
                    failures
                        .push(json!({"key": d.version.name.as_str(), "error": format!("{e:#}")}));
                }
            }
        }
    }
    if text.is_empty() {
        text = "nothing due".into();
    }
    if !failures.is_empty() {
        bail!("{}", text.trim_end().replace('\n', "; "));
    }
    let mut json = json!({"retired": retired, "rotated": rotated, "destroyed": destroyed});
    if !rotated.is_empty() {
        signer_reload(c, &mut json, &mut text).await;
    }
    Ok(Report::new(text, json))
}

/// `keyctl revoke --direct` (or when the signer cannot be reached): revoke in the store.
pub async fn revoke_direct(
    c: &KeyctlConfig,
    g: &Globals,
    name: &KeyName,
    version: Option<u32>,
    reason: &str,
) -> anyhow::Result<Vec<KeyVersion>> {
    let store = open_store(c)?;
    Ok(store
        .revoke(name.clone(), version, reason.to_owned(), change(c, g))
        .await?)
}

/// `keyctl pending`: requests waiting for approvals, read from the store.
pub fn pending(c: &KeyctlConfig, g: &Globals) -> anyhow::Result<Report> {
    if !c.store.path.is_file() {
        bail!("store {} does not exist", c.store.path.display());
    }
    let conn = rusqlite::Connection::open_with_flags(
        &c.store.path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let mut stmt = conn.prepare(
        "SELECT id, key_name, identity, digest, created_at, expires_at, approvals FROM pending
         WHERE status = 'pending' AND expires_at > ?1 ORDER BY created_at",
    )?;
    let now = i64::try_from(g.now.0).unwrap_or(i64::MAX);
    let rows = stmt.query_map([now], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Vec<u8>>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, String>(6)?,
        ))
    })?;
    let mut text = String::new();
    let mut out = Vec::new();
    for row in rows {
        let (id, key, identity, digest, created, expires, required) = row?;
        let required: Value = serde_json::from_str(&required).unwrap_or(Value::Null);
        let _ = writeln!(
            text,
            "{id}  key {key}  by {identity}  digest 0x{}  expires in {}",
            hex::encode(&digest),
            human_ms(u64::try_from(expires).unwrap_or(0).saturating_sub(g.now.0))
        );
        out.push(json!({"id": id, "key": key, "identity": identity,
            "digest": format!("0x{}", hex::encode(&digest)), "createdAt": created / 1000,
            "expiresAt": expires / 1000, "approvalsRequired": required}));
    }
    if text.is_empty() {
        text = "no pending requests".into();
    }
    Ok(Report::new(text, Value::Array(out)))
}

/// Reads every record of the store's chain.
async fn all_records(store: &SqliteStore) -> anyhow::Result<Vec<audit::AuditRecord>> {
    let mut out: Vec<audit::AuditRecord> = Vec::new();
    let mut cursor = AuditCursor::Seq(1);
    loop {
        let page = store.audit_records(cursor, 5000).await.map_err(|e| {
            fail(
                5,
                format!(
                    "audit chain unreadable after seq {}: {e}",
                    out.last().map_or(0, |r| r.seq)
                ),
            )
        })?;
        let Some(last) = page.last() else { break };
        cursor = AuditCursor::Seq(last.seq.saturating_add(1));
        out.extend(page);
    }
    Ok(out)
}

fn verify_report(
    records: &[audit::AuditRecord],
    audit_key: Option<&str>,
    source: &str,
) -> anyhow::Result<Report> {
    let key = audit_key
        .map(|a| {
            castellan_api::signer::parse_address(a).map_err(|e| anyhow::anyhow!("--audit-key: {e}"))
        })
        .transpose()?;
    match audit::verify_chain(records, key) {
        Ok(s) => Ok(Report::new(
            format!(
                "audit chain of {source} ok: {} records, head {}, {} signed checkpoints",
                s.records,
                s.head
                    .map_or("none".into(), |(seq, h)| format!("{seq} {h:#x}")),
                s.checkpoints
            ),
            json!({"ok": true, "records": s.records, "headSeq": s.head.map(|h| h.0),
                   "headHash": s.head.map(|h| format!("{:#x}", h.1)),
                   "checkpoints": s.checkpoints, "signedThrough": s.signed_through}),
        )),
        Err(e) => Err(fail(5, format!("audit chain of {source} is broken: {e}"))),
    }
}

/// `keyctl audit verify` on the store.
pub async fn audit_verify_store(
    c: &KeyctlConfig,
    audit_key: Option<&str>,
) -> anyhow::Result<Report> {
    let store = open_store(c)?;
    let records = all_records(&store).await?;
    verify_report(&records, audit_key, &c.store.path.display().to_string())
}

/// `keyctl audit verify --file`.
pub fn audit_verify_file(path: &Path, audit_key: Option<&str>) -> anyhow::Result<Report> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r = audit::AuditRecord::from_json_line(line)
            .map_err(|e| fail(5, format!("{} line {}: {e}", path.display(), i + 1)))?;
        records.push(r);
    }
    if records.first().is_some_and(|r| r.seq != 1) {
        // A partial export: verify it as a continuation of the record before its first one.
        let first = &records[0];
        let anchor = Some((first.seq.saturating_sub(1), first.prev_hash));
        return match audit::verify_chain_from(&records, anchor, None) {
            Ok(s) => Ok(Report::new(
                format!(
                    "audit export {} ok: {} records from seq {} (links to a prev_hash it cannot check)",
                    path.display(),
                    s.records,
                    first.seq
                ),
                json!({"ok": true, "records": s.records, "fromSeq": first.seq, "partial": true}),
            )),
            Err(e) => Err(fail(
                5,
                format!("audit export {} is broken: {e}", path.display()),
            )),
        };
    }
    verify_report(&records, audit_key, &path.display().to_string())
}

/// `keyctl audit export`.
pub async fn audit_export(
    c: &KeyctlConfig,
    g: &Globals,
    since: Option<&str>,
    from_seq: Option<u64>,
    out: Option<&Path>,
) -> anyhow::Result<Report> {
    let cursor = match (since, from_seq) {
        (_, Some(s)) => AuditCursor::Seq(s),
        (Some(s), None) => AuditCursor::Time(parse_since(s, g.now)?),
        (None, None) => AuditCursor::Seq(1),
    };
    let store = open_store(c)?;
    let n = match out {
        Some(p) => {
            let tmp = p.with_extension("partial");
            let file = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut w = std::io::BufWriter::new(file);
            let n = castellan_signer::store::export_jsonl(&store, cursor, &mut w).await?;
            let file = w
                .into_inner()
                .map_err(|e| anyhow::anyhow!("{}", e.error()))?;
            file.sync_all()?;
            std::fs::rename(&tmp, p)?;
            n
        }
        None => {
            let mut buf = Vec::new();
            let n = castellan_signer::store::export_jsonl(&store, cursor, &mut buf).await?;
            use std::io::Write;
            std::io::stdout().write_all(&buf)?;
            n
        }
    };
    eprintln!("exported {n} audit records");
    Ok(Report {
        text: String::new(),
        json: if out.is_some() {
            json!({"exported": n})
        } else {
            Value::Null
        },
        code: 0,
    })
}

/// "24h" (that long before now) or unix seconds.
fn parse_since(s: &str, now: UnixMillis) -> anyhow::Result<UnixMillis> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(UnixMillis(secs.saturating_mul(1000)));
    }
    let ms = parse_duration_ms(s).map_err(|_| {
        anyhow::anyhow!("bad --since {s:?}: give a duration (\"24h\") or unix seconds")
    })?;
    Ok(UnixMillis(now.0.saturating_sub(ms)))
}

/// "3d 4h", "12m", "40s".
pub fn human_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn relative(now: UnixMillis, t: UnixMillis) -> String {
    if t <= now {
        format!("DUE ({} ago)", human_ms(now.0 - t.0))
    } else {
        format!("in {}", human_ms(t.0 - now.0))
    }
}

fn status_detail(s: &KeyStatus, now: UnixMillis) -> String {
    match s {
        KeyStatus::Retiring { until, successor } => {
            format!(
                " (until {}, successor @{successor})",
                relative(now, *until).replace("DUE", "ended")
            )
        }
        KeyStatus::Revoked { reason, .. } => format!(" ({reason})"),
        KeyStatus::DestroyScheduled { at } => format!(
            " (HSM object deleted {}; `keyctl keys cancel-destroy` undoes it)",
            relative(now, *at).replace("DUE", "due")
        ),
        _ => String::new(),
    }
}

/// Asks the running signer to pick up new versions; records what happened in the report and warns
/// on stderr when the operator must restart it.
async fn signer_reload(c: &KeyctlConfig, json: &mut Value, text: &mut String) {
    let (state, warning) = crate::remote::ask_signer_to_reload_keys(c).await;
    if let Some(w) = &warning {
        eprintln!("keyctl: warning: {w}");
        let _ = write!(text, "\nwarning: {w}");
    }
    if let Value::Object(m) = json {
        m.insert(
            "signer".into(),
            json!({"reload": state, "warning": warning}),
        );
    }
}

/// Default waiting period before a revoked version's HSM object is deleted.
const DEFAULT_DESTROY_WAIT: &str = "7d";

/// The configured waiting period before destruction, in milliseconds.
pub fn destroy_wait_ms(c: &KeyctlConfig) -> anyhow::Result<u64> {
    parse_duration_ms(c.destroy_wait.as_deref().unwrap_or(DEFAULT_DESTROY_WAIT))
}

/// Schedules the destruction of `versions` (just revoked) after the waiting period; returns
/// each version with the time its object may be deleted.
pub async fn schedule_destroy(
    c: &KeyctlConfig,
    g: &Globals,
    versions: &[KeyVersion],
) -> anyhow::Result<Vec<(KeyVersion, UnixMillis)>> {
    let at = g.now.plus_ms(destroy_wait_ms(c)?);
    let store = open_store(c)?;
    let mut out = Vec::new();
    for v in versions {
        store
            .set_key_status(v.clone(), KeyStatus::DestroyScheduled { at }, change(c, g))
            .await
            .with_context(|| format!("scheduling the destruction of {v}"))?;
        out.push((v.clone(), at));
    }
    Ok(out)
}

/// Deletes at once the HSM objects of the revoked (or destroy-scheduled) versions of `name`
/// (or of `name@version`). The version is marked `destroy_scheduled` (due now) before the object
/// is deleted, and `destroyed` after: a failure in between leaves it due for `keys destroy-due`.
pub async fn destroy_now(
    c: &KeyctlConfig,
    g: &Globals,
    name: &KeyName,
    version: Option<u32>,
) -> anyhow::Result<Vec<KeyVersion>> {
    let store = open_store(c)?;
    let targets: Vec<KeyVersionRecord> = store
        .list_keys(Some(name.clone()))
        .await?
        .into_iter()
        .filter(|r| version.is_none_or(|v| r.version.version == v))
        .filter(|r| {
            matches!(
                r.status,
                KeyStatus::Revoked { .. } | KeyStatus::DestroyScheduled { .. }
            )
        })
        .collect();
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let backend = open_backend(c).await?;
    let mut out = Vec::new();
    for r in targets {
        destroy_one(&store, &backend, c, g, &r, true).await?;
        out.push(r.version);
    }
    Ok(out)
}

async fn destroy_one(
    store: &SqliteStore,
    backend: &AnyBackend,
    c: &KeyctlConfig,
    g: &Globals,
    r: &KeyVersionRecord,
    mark_due: bool,
) -> anyhow::Result<()> {
    let kind = r.key_ref.to_string();
    if !kind.starts_with(&format!("{}:", backend.kind())) {
        bail!(
            "{} lives on {kind}, not on the configured {} backend: not destroyed",
            r.version,
            backend.kind()
        );
    }
    if mark_due && !matches!(r.status, KeyStatus::DestroyScheduled { .. }) {
        store
            .set_key_status(
                r.version.clone(),
                KeyStatus::DestroyScheduled { at: g.now },
                change(c, g),
            )
            .await?;
    }
    backend
        .destroy(&r.key_ref)
        .await
        .with_context(|| format!("deleting {} ({kind}) on the device", r.version))?;
    store
        .set_key_status(r.version.clone(), KeyStatus::Destroyed, change(c, g))
        .await?;
    Ok(())
}

/// `keyctl keys destroy-due` (and part of `rotate --due`): deletes the objects whose scheduled
/// destruction time has come. Returns the destroyed versions, and failures as text.
pub async fn destroy_due_versions(
    c: &KeyctlConfig,
    g: &Globals,
    store: &SqliteStore,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let due: Vec<KeyVersionRecord> = store
        .list_keys(None)
        .await?
        .into_iter()
        .filter(|r| matches!(r.status, KeyStatus::DestroyScheduled { at } if at <= g.now))
        .collect();
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    if due.is_empty() {
        return Ok((done, failed));
    }
    let backend = open_backend(c).await?;
    for r in due {
        match destroy_one(store, &backend, c, g, &r, false).await {
            Ok(()) => done.push(r.version.to_string()),
            Err(e) => failed.push(format!("{}: {e:#}", r.version)),
        }
    }
    Ok((done, failed))
}

/// `keyctl keys destroy-due`.
pub async fn destroy_due(c: &KeyctlConfig, g: &Globals) -> anyhow::Result<Report> {
    let store = open_store(c)?;
    let (done, failed) = destroy_due_versions(c, g, &store).await?;
    if !failed.is_empty() {
        bail!("destroying due versions failed: {}", failed.join("; "));
    }
    let text = if done.is_empty() {
        "nothing due for destruction".to_owned()
    } else {
        format!("destroyed {}", done.join(", "))
    };
    Ok(Report::new(text, json!({"destroyed": done})))
}

/// `keyctl keys cancel-destroy <name>[@N]`: puts each destroy-scheduled version back in the
/// state it was in when the destruction was scheduled (`revoked`, with its reason, or `retired`),
/// read from the audit record of the scheduling.
pub async fn cancel_destroy(c: &KeyctlConfig, g: &Globals, key: &str) -> anyhow::Result<Report> {
    let (name, version) = match key.split_once('@') {
        Some(_) => {
            let kv: KeyVersion = key.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            (kv.name, Some(kv.version))
        }
        None => (key_name(key)?, None),
    };
    let store = open_store(c)?;
    let versions = store.list_keys(Some(name.clone())).await?;
    if versions.is_empty() {
        bail!("unknown key {name}");
    }
    if let Some(v) = version
        && !versions.iter().any(|r| r.version.version == v)
    {
        bail!("unknown key version {name}@{v}");
    }
    let targets: Vec<&KeyVersionRecord> = versions
        .iter()
        .filter(|r| version.is_none_or(|v| r.version.version == v))
        .filter(|r| matches!(r.status, KeyStatus::DestroyScheduled { .. }))
        .collect();
    if targets.is_empty() {
        bail!("{key}: no destruction is scheduled (nothing to cancel)");
    }
    let records = all_records(&store).await?;
    let mut restored = Vec::new();
    for r in targets {
        let wanted = r.version.to_string();
        // The last status change into destroy_scheduled names the state it came from.
        let previous: KeyStatus = records
            .iter()
            .rev()
            .find(|a| {
                a.payload.get("op").and_then(Value::as_str) == Some("set_status")
                    && a.payload.get("key").and_then(Value::as_str) == Some(wanted.as_str())
                    && a.payload.pointer("/to/state").and_then(Value::as_str)
                        == Some("destroy_scheduled")
            })
            .and_then(|a| a.payload.get("from").cloned())
            .and_then(|v| serde_json::from_value(v).ok())
            .filter(|s: &KeyStatus| matches!(s, KeyStatus::Revoked { .. } | KeyStatus::Retired))
            .unwrap_or(KeyStatus::Retired);
        store
            .set_key_status(r.version.clone(), previous.clone(), change(c, g))
            .await
            .with_context(|| format!("cancelling the destruction of {wanted}"))?;
        restored.push(json!({"version": wanted, "status": previous.state()}));
    }
    let text = restored
        .iter()
        .map(|r| {
            format!(
                "destruction of {} cancelled (back to {})",
                r["version"].as_str().unwrap_or("?"),
                r["status"].as_str().unwrap_or("?")
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Report::new(text, json!({"cancelled": restored})))
}
