//! The signer's API: the signing pipeline of DESIGN.md in its fixed order, behind the mTLS
//! listener of [`castellan_api::serve`].
//!
//! 1. mTLS (the listener; the identity arrives as an `Extension<Peer>`);
//! 2. identity → roles and keys ([`Signer::caller`]), role check per route;
//! 3. typed parsing (bounded body, unknown fields refused, quantities as strings), chain-id guard;
//! 4. policy evaluation (pure, microseconds) against an in-memory mirror of the limit windows;
//! 5. one store transaction: re-check freeze and key status, check-and-reserve every window
//!    (authoritative), append the decision record, commit durably;
//! 6. sign in the backend with a deadline; the signature is checked to recover to the key;
//! 7. append the outcome (or release the reservation); respond.
//!
//! # Security
//! No signature leaves this module unless [`Store::commit_decision`] returned `Ok` for it: the
//! durable audit record and every limit reservation exist before the backend is called. A
//! refusal at any step is answered with a stable code and reason and is audited.

pub mod admission;
pub mod error;
mod limits_warm;
pub mod metrics;
mod routes;
pub mod rpc;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use alloy::primitives::{Address, B256, U256, keccak256};
use castellan_api::submitter::Role;
use castellan_api::tls::Identity;
use castellan_policy::{self as policy, LimitState, MemoryLimits, Policy};
use k256::ecdsa::VerifyingKey;
use serde_json::json;

use crate::audit::{AuditEntry, AuditKind, UnixMillis};
use crate::backend::{KeyBackend, KeyInfo};
use crate::config::Grants;
use crate::eth::ChainGuard;
use crate::store::{self, KeyVersionRecord, Store};

pub use error::ApiError;
pub use routes::router;

/// A key version the signer can sign with right now, checked against its backend at start.
#[derive(Clone, Debug)]
pub struct LiveKey {
    /// The registry record.
    pub record: KeyVersionRecord,
    /// The backend's view (public key read from the device); its address was checked against
    /// the public key ([`crate::eth::check_key_address`]) when the key was loaded.
    pub info: KeyInfo,
    /// `info.address` in EIP-55 checksum form, for the audit record of every signature.
    pub checksum: Arc<str>,
}

/// The signer: configuration, policy, store, backend and the in-memory caches of the hot path.
pub struct Signer<B: KeyBackend, S: Store> {
    chain: ChainGuard,
    identities: BTreeMap<Identity, Grants>,
    policy: RwLock<Arc<Policy>>,
    store: S,
    backend: B,
    /// Active and retiring versions by key name, verified against the backend.
    keys: RwLock<HashMap<String, Vec<Arc<LiveKey>>>>,
    /// Mirror of the store's limit windows for the policy's pre-check. The store transaction is
    /// authoritative; the mirror may only over-count (it is never lowered except by releases of
    /// this process's own reservations).
    limits: Mutex<MemoryLimits>,
    /// Registered, verified budget grants (loaded at start, added by `POST /v1/grants`).
    grants: RwLock<Arc<Vec<policy::VerifiedGrant>>>,
    ready: AtomicBool,
    pending_ttl_ms: u64,
    max_body_bytes: usize,
    upstream: Option<rpc::Upstream>,
    submitter: Option<SubmitterLink>,
    policy_path: Option<std::path::PathBuf>,
    metrics: metrics::Metrics,
    /// Per key name: held shared while a decided request is being signed, taken exclusively by a
    /// revocation to wait for those signatures.
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    /// The gate in front of the signing pipeline (see [`admission`]).
    admission: admission::Admission,
    /// The bound on audit writes for connections refused at the TLS handshake.
    connection_audits: admission::ConnectionAudits,
}

/// The signer's mTLS link to the submitter.
#[derive(Clone, Debug)]
pub struct SubmitterLink {
    base: String,
    http: reqwest::Client,
}

impl SubmitterLink {
    /// A link to the submitter at `base`, presenting the signer's client certificate.
    pub fn new(
        base: impl Into<String>,
        tls: &castellan_api::tls::ClientTlsConfig,
        timeout: std::time::Duration,
    ) -> Result<Self, String> {
        Self::with_builder(base, tls, reqwest::Client::builder().timeout(timeout))
    }

    /// Like [`SubmitterLink::new`], from a reqwest builder (tests override name resolution).
    pub fn with_builder(
        base: impl Into<String>,
        tls: &castellan_api::tls::ClientTlsConfig,
        builder: reqwest::ClientBuilder,
    ) -> Result<Self, String> {
        let config = tls.build().map_err(|e| e.to_string())?;
        let http = builder
            .tls_backend_preconfigured(config)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            base: base.into().trim_end_matches('/').to_owned(),
            http,
        })
    }

    /// Hands a signed bundle to the submitter; returns its acknowledgement.
    pub async fn submit(
        &self,
        bundle: &castellan_api::submitter::SubmitBundleRequest,
    ) -> Result<castellan_api::submitter::BundleStatus, ApiError> {
        let resp = self
            .http
            .post(format!(
                "{}{}",
                self.base,
                castellan_api::submitter::SUBMIT_PATH
            ))
            .json(bundle)
            .send()
            .await
            .map_err(|e| {
                ApiError::unavailable(
                    "submitter_unreachable",
                    format!("the submitter cannot be reached: {e}"),
                    1,
                )
            })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ApiError::unavailable("submitter_unreachable", e.to_string(), 1))?;
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(ApiError::internal)
        } else {
            let detail = serde_json::from_slice::<castellan_api::submitter::ErrorBody>(&bytes)
                .map(|b| format!("{}: {}", b.error.code, b.error.message))
                .unwrap_or_else(|_| format!("HTTP {status}"));
            Err(ApiError::new(
                axum::http::StatusCode::BAD_GATEWAY,
                "submitter_refused",
                format!("the submitter refused the bundle: {detail}"),
            ))
        }
    }
}

/// Settings of [`Signer::new`] that are not the policy, store or backend.
#[derive(Debug, Clone)]
pub struct SignerSettings {
    /// The chain id guard.
    pub chain_id: u64,
    /// Identity table.
    pub identities: BTreeMap<Identity, Grants>,
    /// Life of a pending request.
    pub pending_ttl_ms: u64,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Upstream node for read-only JSON-RPC and for filling transactions.
    pub upstream: Option<rpc::Upstream>,
    /// The submitter, for bundles and sent transactions.
    pub submitter: Option<SubmitterLink>,
    /// The policy file, for approved reloads.
    pub policy_path: Option<std::path::PathBuf>,
    /// Signing requests in the pipeline at once, waiting, and the longest wait.
    pub admission: admission::AdmissionLimits,
}

/// The caller of a request, resolved from its certificate identity.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The identity.
    pub identity: Identity,
    /// Its roles and keys.
    pub grants: Grants,
}

impl Caller {
    /// Refuses unless the caller holds `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.grants.has(role) {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "role_required",
                format!(
                    "identity {} lacks the role {role:?} this route needs",
                    self.identity
                ),
            ))
        }
    }
}

impl<B: KeyBackend, S: Store> Signer<B, S> {
    /// Builds the signer. Not ready until [`Signer::self_check`] passed.
    pub fn new(settings: SignerSettings, policy: Policy, store: S, backend: B) -> Self {
        Self {
            chain: ChainGuard::new(settings.chain_id),
            identities: settings.identities,
            policy: RwLock::new(Arc::new(policy)),
            store,
            backend,
            keys: RwLock::new(HashMap::new()),
            limits: Mutex::new(MemoryLimits::new()),
            grants: RwLock::new(Arc::new(Vec::new())),
            ready: AtomicBool::new(false),
            pending_ttl_ms: settings.pending_ttl_ms,
            max_body_bytes: settings.max_body_bytes,
            upstream: settings.upstream,
            submitter: settings.submitter,
            policy_path: settings.policy_path,
            metrics: metrics::Metrics::new(),
            in_flight: Mutex::new(HashMap::new()),
            admission: admission::Admission::new(settings.admission),
            connection_audits: admission::ConnectionAudits::new(admission::MAX_CONNECTION_AUDITS),
        }
    }

    /// The admission gate of the signing routes.
    pub fn admission(&self) -> &admission::Admission {
        &self.admission
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn key_lock(&self, name: &str) -> Arc<tokio::sync::RwLock<()>> {
        let mut map = match self.in_flight.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry(name.to_owned()).or_default().clone()
    }

    /// A shared guard held from a request's decision until its signature is made.
    pub(crate) async fn signing_guard(&self, name: &str) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.key_lock(name).read_owned().await
    }

    /// Waits until every signature of `name` decided so far has been made (or has failed).
    pub(crate) async fn drain_signing(&self, name: &str) {
        drop(self.key_lock(name).write_owned().await);
    }

    /// The signer's metrics.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether the self-check passed, the backend is healthy and the store is not failing writes.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && matches!(self.backend.health(), crate::backend::Health::Ready)
            && !self.store.writes_failing()
    }

    /// Startup self-check (and refresh after key changes): re-derives every signable version's
    /// address from its backend and compares it with the registry. A version whose device key is
    /// missing or whose address differs is not served; the whole check fails (and the signer is
    /// not ready) if any registered signable version cannot be verified.
    pub async fn self_check(&self) -> Result<usize, String> {
        let records = self
            .store
            .list_keys(None)
            .await
            .map_err(|e| format!("store: {e}"))?;
        let mut live: HashMap<String, Vec<Arc<LiveKey>>> = HashMap::new();
        let mut problems = Vec::new();
        for record in records {
            if !matches!(
                record.status,
                store::KeyStatus::Active | store::KeyStatus::Retiring { .. }
            ) {
                continue;
            }
            match self.backend.key_info(&record.key_ref).await {
                Ok(info) if info.address == record.address => {
                    if let Err(e) = crate::eth::check_key_address(&info) {
                        problems.push(format!("{}: {e}", record.version));
                        continue;
                    }
                    let checksum = info.address.to_checksum(None).into();
                    live.entry(record.version.name.as_str().to_owned())
                        .or_default()
                        .push(Arc::new(LiveKey {
                            record,
                            info,
                            checksum,
                        }));
                }
                Ok(info) => problems.push(format!(
                    "{}: registry address {} but the device key derives {}",
                    record.version, record.address, info.address
                )),
                Err(e) => problems.push(format!("{}: {e}", record.version)),
            }
        }
        let count = live.values().map(Vec::len).sum();
        match self.keys.write() {
            Ok(mut k) => *k = live,
            Err(p) => *p.into_inner() = live,
        }
        if problems.is_empty() {
            self.ready.store(true, Ordering::Release);
            self.metrics.ready.set(1);
            Ok(count)
        } else {
            self.ready.store(false, Ordering::Release);
            self.metrics.ready.set(0);
            Err(problems.join("; "))
        }
    }

    /// Resolves a certificate identity to a caller; unknown identities are refused and audited.
    pub async fn caller(&self, identity: &Identity, request_id: &str) -> Result<Caller, ApiError> {
        match self.identities.get(identity) {
            Some(grants) => Ok(Caller {
                identity: identity.clone(),
                grants: grants.clone(),
            }),
            None => {
                let err = ApiError::forbidden(
                    "unknown_identity",
                    format!("identity {identity} is not configured"),
                );
                self.audit_refusal(request_id, identity.as_str(), &err)
                    .await;
                Err(err)
            }
        }
    }

    /// Appends a refusal record (policy denial, unknown identity, role, malformed input after
    /// authentication). A store failure here is logged: the refusal itself still stands.
    pub async fn audit_refusal(&self, request_id: &str, identity: &str, err: &ApiError) {
        let entry = AuditEntry {
            at: UnixMillis::now(),
            kind: AuditKind::Refusal,
            request_id: Some(request_id.to_owned()),
            identity: Some(identity.to_owned()),
            payload: json!({
                "code": err.code,
                "reason": err.message,
                "status": err.status.as_u16(),
            }),
        };
        if let Err(e) = self.store.append_audit(entry).await {
            tracing::error!(error = %e, request_id, "cannot audit a refusal");
        }
    }

    /// The accept loop's refusal hook: audits a connection refused at the TLS handshake in its
    /// own record while fewer than [`admission::MAX_CONNECTION_AUDITS`] such writes run, else
    /// counts it (metric `tls_refusals_unaudited`) for an aggregated record written at most once
    /// a second. Never blocks; starts at most one task per individual record plus one flusher.
    pub fn connection_refused(self: &Arc<Self>, peer: std::net::SocketAddr, reason: String) {
        match self.connection_audits.admit() {
            admission::ConnectionAudit::Individual(permit) => {
                let s = Arc::clone(self);
                tokio::spawn(async move {
                    s.audit_connection_refusal(peer, &reason).await;
                    drop(permit);
                });
            }
            admission::ConnectionAudit::Aggregated { start_flusher } => {
                tracing::debug!(%peer, %reason, "refused connection counted, not audited individually");
                self.metrics.tls_refusals.inc();
                self.metrics.tls_refusals_unaudited.inc();
                if start_flusher {
                    let s = Arc::clone(self);
                    tokio::spawn(async move { s.flush_connection_audits().await });
                }
            }
        }
    }

    /// The aggregated audit record of `count` refused connections.
    fn connections_entry(&self, count: u64, now: UnixMillis) -> AuditEntry {
        AuditEntry {
            at: now,
            kind: AuditKind::Refusal,
            request_id: None,
            identity: None,
            payload: json!({
                "code": "tls_refused",
                "reason": self.connection_audits.audit_reason(count),
                "count": count,
            }),
        }
    }

    /// At shutdown, after the listener stopped: writes the refusals counted for aggregated
    /// records (overload, refused connections) that their flushers, paced to one record a
    /// second, have not written yet — so a stop loses no refusal from the audit chain.
    pub async fn flush_refusal_audits(&self) {
        let now = UnixMillis::now();
        let mut entries = Vec::new();
        if let Some(count) = self.admission.take_all_audit(now.0) {
            entries.push(admission::overload_entry(
                count,
                self.admission.limits(),
                now,
            ));
        }
        if let Some(count) = self.connection_audits.take_all_audit(now.0) {
            entries.push(self.connections_entry(count, now));
        }
        for entry in entries {
            if let Err(e) = self.store.append_audit(entry).await {
                tracing::error!(error = %e, "cannot audit refusals at shutdown");
            }
        }
    }

    /// The one flusher of [`Signer::connection_refused`]: writes aggregated records, at most one
    /// a second, until no counted refusal is left.
    async fn flush_connection_audits(&self) {
        loop {
            let wait = self.connection_audits.wait_ms(UnixMillis::now().0);
            if wait > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            }
            let now = UnixMillis::now();
            if let Some(count) = self.connection_audits.take_audit(now.0) {
                let entry = self.connections_entry(count, now);
                if let Err(e) = self.store.append_audit(entry).await {
                    tracing::error!(error = %e, count, "cannot audit refused connections");
                }
            }
            if !self.connection_audits.flusher_done() {
                return;
            }
        }
    }

    /// Audits a connection refused before any request (TLS failure: no certificate, unknown CA,
    /// revoked, expired, TLS 1.2).
    pub async fn audit_connection_refusal(&self, peer: std::net::SocketAddr, reason: &str) {
        self.metrics.tls_refusals.inc();
        let entry = AuditEntry {
            at: UnixMillis::now(),
            kind: AuditKind::Refusal,
            request_id: None,
            identity: None,
            payload: json!({
                "code": "tls_refused",
                "reason": reason,
                "peer": peer.to_string(),
            }),
        };
        if let Err(e) = self.store.append_audit(entry).await {
            tracing::error!(error = %e, "cannot audit a refused connection");
        }
    }

    /// Reads and validates the policy file (not yet in force).
    pub fn read_policy_file(&self) -> Result<Policy, ApiError> {
        let path = self.policy_path.as_ref().ok_or_else(|| {
            ApiError::conflict(
                "no_policy_file",
                "the signer was started without a policy file",
            )
        })?;
        let text = std::fs::read_to_string(path).map_err(|e| {
            ApiError::conflict(
                "policy_unreadable",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        Policy::from_toml(&text)
            .map_err(|e| ApiError::conflict("policy_invalid", format!("{}: {e}", path.display())))
    }

    /// Puts the policy file in force if its hash is the approved one; audits the change.
    pub async fn reload_policy(
        &self,
        approved_hash: &[u8],
        identity: &str,
        request_id: &str,
    ) -> Result<(), ApiError> {
        let candidate = self.read_policy_file()?;
        if candidate.hash().as_slice() != approved_hash {
            return Err(ApiError::conflict(
                "policy_changed_since_approval",
                format!(
                    "the policy file now hashes to {}, not to the approved {}",
                    candidate.hash(),
                    alloy::primitives::Bytes::copy_from_slice(approved_hash)
                ),
            ));
        }
        let old = self.policy().hash();
        let entry = AuditEntry {
            at: UnixMillis::now(),
            kind: AuditKind::PolicyChange,
            request_id: Some(request_id.to_owned()),
            identity: Some(identity.to_owned()),
            payload: json!({ "from": old, "to": candidate.hash() }),
        };
        // Audit first: a policy is never in force without its record.
        self.store
            .append_audit(entry)
            .await
            .map_err(|e| ApiError::unavailable("store_unavailable", e.to_string(), 1))?;
        match self.policy.write() {
            Ok(mut p) => *p = Arc::new(candidate),
            Err(p) => *p.into_inner() = Arc::new(candidate),
        }
        tracing::info!(%old, "policy reloaded after approval");
        Ok(())
    }

    /// Hands one signed transaction to the submitter as a one-transaction bundle for the next
    /// blocks (private routing; the submitter resubmits it per block until it is included).
    pub async fn forward_signed_transaction(
        &self,
        key: &str,
        request_id: &str,
        raw: alloy::primitives::Bytes,
    ) -> Result<castellan_api::submitter::BundleStatus, ApiError> {
        let Some(link) = &self.submitter else {
            return Err(ApiError::unavailable(
                "no_submitter",
                "no submitter is configured; the transaction was signed but not sent",
                60,
            ));
        };
        let head = match &self.upstream {
            Some(u) => u
                .call("eth_blockNumber", serde_json::json!([]))
                .await
                .ok()
                .and_then(|v| {
                    v.as_str()
                        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
                }),
            None => None,
        }
        .ok_or_else(|| {
            ApiError::unavailable(
                "no_upstream",
                "the current block is unknown (no upstream node); nothing was sent",
                1,
            )
        })?;
        let bundle = castellan_api::submitter::SubmitBundleRequest {
            bundle_id: uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, request_id.as_bytes()),
            key_name: key.to_owned(),
            txs: vec![raw],
            target_block: castellan_api::submitter::Quantity(head + 1),
            last_block: Some(castellan_api::submitter::Quantity(head + SEND_BLOCKS)),
            min_timestamp: None,
            max_timestamp: None,
            reverting_tx_hashes: Vec::new(),
            replacement_uuid: None,
            relays: castellan_api::submitter::RelaySelection::All,
            simulate: false,
        };
        link.submit(&bundle).await
    }

    /// The audit key for checkpoints: the active version of `name`, verified at start.
    pub fn audit_key(&self, name: &str) -> Option<crate::audit::AuditKey> {
        self.active_key(name).map(|k| crate::audit::AuditKey {
            key_ref: k.record.key_ref.clone(),
            public_key: k.info.public_key,
            address: k.info.address,
        })
    }

    /// The version that signs for `name` now (the active one).
    fn active_key(&self, name: &str) -> Option<Arc<LiveKey>> {
        let keys = match self.keys.read() {
            Ok(k) => k,
            Err(p) => p.into_inner(),
        };
        keys.get(name)?
            .iter()
            .find(|k| matches!(k.record.status, store::KeyStatus::Active))
            .cloned()
    }

    /// Evaluates a request with the policy against the in-memory limit mirror.
    fn evaluate(
        &self,
        req: &policy::Request,
        approvals: &[policy::SignedApproval],
        control: policy::KeyControl,
        now_s: u64,
    ) -> policy::Decision {
        let policy = self.policy();
        let limits = match self.limits.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        // Only the grants for this client and key that are inside their validity: the policy
        // checks them again, but the list stays short on the hot path.
        let all = self.grants_snapshot();
        let grants: Vec<policy::VerifiedGrant> = all
            .iter()
            .filter(|g| {
                g.client() == &req.client
                    && g.key() == &req.key
                    && g.valid_from() <= now_s
                    && now_s < g.valid_until()
            })
            .cloned()
            .collect();
        let mut ctx = policy::Context::new(now_s, &*limits as &dyn LimitState);
        ctx.approvals = approvals;
        ctx.grants = &grants;
        ctx.key_control = control;
        policy.evaluate(req, &ctx)
    }

    fn grants_snapshot(&self) -> Arc<Vec<policy::VerifiedGrant>> {
        match self.grants.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Puts a verified grant in force; `spent` (from the store) is added to the limit mirror so
    /// the policy's pre-check sees what was already spent under it.
    pub(crate) fn add_grant(&self, grant: policy::VerifiedGrant, spent: U256, now_s: u64) {
        if !spent.is_zero() {
            let mut limits = match self.limits.lock() {
                Ok(l) => l,
                Err(p) => p.into_inner(),
            };
            limits.reserve(&grant.window(), now_s, spent);
        }
        let mut g = match self.grants.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut next: Vec<policy::VerifiedGrant> = g
            .iter()
            .filter(|x| x.valid_until() > now_s && x.id() != grant.id())
            .cloned()
            .collect();
        next.push(grant);
        *g = Arc::new(next);
    }

    /// Loads the unexpired grants from the store at start, verifying each again against the
    /// policy in force (a grant whose signers no longer satisfy any tier is skipped, with a
    /// warning). Returns how many are in force.
    pub async fn load_grants(&self) -> Result<usize, String> {
        let now = UnixMillis::now();
        let records = self
            .store
            .list_grants(Some(now))
            .await
            .map_err(|e| format!("store: {e}"))?;
        let policy = self.policy();
        let mut n = 0;
        for r in records {
            match routes::verify_stored_grant(&policy, &r, now.0 / 1000) {
                Ok(v) => {
                    self.add_grant(v, r.spent, now.0 / 1000);
                    n += 1;
                }
                Err(e) => {
                    tracing::warn!(grant = %r.grant.id, reason = %e.message, "grant not in force")
                }
            }
        }
        Ok(n)
    }

    fn mirror_apply(&self, decision: &policy::Decision, now_s: u64) {
        let mut limits = match self.limits.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        limits.apply(decision, now_s);
    }

    fn mirror_release(&self, decision: &policy::Decision, now_s: u64) {
        let mut limits = match self.limits.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        for r in &decision.reservations {
            limits.release(&r.window, now_s, r.amount);
        }
    }
}

/// How many blocks a transaction sent through `eth_sendTransaction` is offered for.
const SEND_BLOCKS: u64 = 25;

/// The digest approvals refer to: binds the request id, the key, the client and what is signed.
pub fn request_digest(request_id: &str, key: &str, client: &str, payload_digest: B256) -> B256 {
    let mut buf = Vec::with_capacity(64 + request_id.len() + key.len() + client.len());
    buf.extend_from_slice(b"castellan-request/1\0");
    for part in [request_id.as_bytes(), key.as_bytes(), client.as_bytes()] {
        buf.extend_from_slice(&(part.len() as u64).to_be_bytes());
        buf.extend_from_slice(part);
    }
    buf.extend_from_slice(payload_digest.as_slice());
    keccak256(&buf)
}

/// The address of a SEC1 public key.
pub fn address_of(key: &VerifyingKey) -> Address {
    Address::from_public_key(key)
}

/// A U256 as a `0x` quantity string (for audit payloads: never JSON numbers for amounts).
pub(crate) fn hex_u256(v: U256) -> String {
    // Byte by byte instead of `format!("{v:#x}")` (the same text: lowercase, no leading zeros,
    // `0x0` for zero), which costs several times more on every signature's audit record.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 66];
    buf[0] = b'0';
    buf[1] = b'x';
    for (i, byte) in v.to_be_bytes::<32>().into_iter().enumerate() {
        buf[2 + 2 * i] = DIGITS[usize::from(byte >> 4)];
        buf[3 + 2 * i] = DIGITS[usize::from(byte & 0x0f)];
    }
    // Leading zero digits dropped, the last one kept (`0x0`).
    let skip = (v.leading_zeros() / 4).min(63);
    buf.copy_within(0..2, skip);
    String::from_utf8_lossy(&buf[skip..]).into_owned()
}

#[cfg(test)]
mod hex_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hex_u256_is_the_lower_hex_format() {
        let mut values = vec![
            U256::ZERO,
            U256::from(1u8),
            U256::from(0x0fu8),
            U256::from(0x10u8),
            U256::from(0x100u16),
            U256::from(10u64).pow(U256::from(18u8)),
            U256::from(u64::MAX),
            U256::from(u64::MAX) + U256::from(1u8),
            U256::MAX,
        ];
        let mut x = U256::from(0x1234_5678_9abc_def0u64);
        for _ in 0..64 {
            x = x.wrapping_mul(U256::from(0x9e37_79b9_7f4a_7c15u64)) + U256::from(7u8);
            values.push(x);
            values.push(x >> 100usize);
        }
        for v in values {
            assert_eq!(hex_u256(v), format!("{v:#x}"));
        }
    }
}
