//! Routes and the pipeline behind them.

use std::sync::Arc;
use std::time::Duration;

use alloy::consensus::{Transaction, TypedTransaction};
use alloy::dyn_abi::TypedData;
use alloy::eips::Decodable2718;
use alloy::primitives::{B256, Bytes, Signature, U256, eip191_hash_message};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use castellan_api::serve::Peer;
use castellan_api::signer as wire;
use castellan_api::submitter::{Quantity, Role};
use castellan_policy::{self as policy, Verdict};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{ApiError, Caller, LiveKey, Signer, hex_u256, request_digest};
use crate::audit::UnixMillis;
use crate::backend::KeyBackend;
use crate::eth::{self, EthError};
use crate::store::{
    self, Change, DecisionTx, Outcome, OutcomeTx, PendingRequest, PendingStatus, Refusal,
    RequestId, Store, StoreError, WindowKey,
};

type Shared<B, S> = Arc<Signer<B, S>>;

/// The signer's router. Every route but `/live` and `/ready` needs an `Extension<Peer>` (put in
/// by the mTLS listener).
pub fn router<B: KeyBackend, S: Store>(signer: Shared<B, S>) -> Router {
    let limit = signer.max_body_bytes;
    Router::new()
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready::<B, S>))
        .route(
            "/v1/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/v1/keys", get(list_keys::<B, S>))
        .route("/v1/keys/{name}", get(show_key::<B, S>))
        .route(
            "/v1/keys/{name}/sign/transaction",
            post(sign_transaction::<B, S>),
        )
        .route("/v1/keys/{name}/sign/message", post(sign_message::<B, S>))
        .route(
            "/v1/keys/{name}/sign/bundle",
            post(sign_bundle_route::<B, S>),
        )
        .route(
            "/v1/keys/{name}/sign/typed-data",
            post(sign_typed_data::<B, S>),
        )
        .route("/v1/requests/{id}", get(request_status::<B, S>))
        .route("/v1/requests/{id}/approvals", post(approve::<B, S>))
        .route(
            "/v1/grants",
            post(submit_grant::<B, S>).get(list_grants::<B, S>),
        )
        .route("/v1/relay-auth", post(relay_auth::<B, S>))
        .route("/v1/admin/freeze", post(freeze::<B, S>))
        .route("/v1/admin/unfreeze", post(unfreeze::<B, S>))
        .route("/v1/admin/policy/reload", post(policy_reload::<B, S>))
        .route("/v1/outcomes", post(outcome::<B, S>))
        .route("/v1/admin/keys/{name}/revoke", post(revoke::<B, S>))
        .route("/v1/admin/keys/reload", post(reload_keys::<B, S>))
        .route("/v1/admin/keys/{name}/pause", post(pause::<B, S>))
        .route("/v1/admin/keys/{name}/resume", post(resume::<B, S>))
        .route("/v1/audit", get(audit_export::<B, S>))
        .route("/rpc", post(super::rpc::rpc::<B, S>))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(move |req, next| {
            oversized_guard(limit, req, next)
        }))
        // Outermost: a signing request past the admission limits is refused before anything
        // reads its body.
        .layer(axum::middleware::from_fn_with_state(
            signer.clone(),
            super::admission::gate::<B, S>,
        ))
        .with_state(signer)
}

/// The OpenAPI 3.1 description of every route (served at `/v1/openapi.json`).
pub const OPENAPI: &str = include_str!("openapi.json");

// ---------------------------------------------------------------------------------------------
// Request plumbing

/// Bodies announced larger than this are refused without reading them at all.
const DRAIN_CAP: u64 = 32 * 1024 * 1024;

/// Refuses a body whose declared length exceeds the limit before anything parses it. The body is
/// read and discarded (up to [`DRAIN_CAP`], for at most five seconds) so that a client still
/// writing it reads the 413 instead of a connection reset.
async fn oversized_guard(limit: usize, req: Request, next: axum::middleware::Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => {
            if n <= DRAIN_CAP {
                use http_body_util::BodyExt;
                let mut body = req.into_body();
                let drain = async { while let Some(Ok(_)) = body.frame().await {} };
                let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
            }
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body of {n} bytes exceeds the limit of {limit} bytes"),
            )
            .into_response()
        }
        _ => next.run(req).await,
    }
}

/// JSON body whose rejections become API errors with stable codes.
pub(crate) struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, St: Send + Sync> FromRequest<St> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &St) -> Result<Self, Self::Rejection> {
        // Fast path for a body declared exactly `application/json` (what clients send): plain
        // `serde_json::from_slice`, without the field-path tracking axum's `Json` does on every
        // body. Any other content type, and any body that does not parse, goes through axum's
        // `Json` itself, so every rejection and its message stay exactly axum's.
        let plain_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == b"application/json");
        if !plain_json {
            return match Json::<T>::from_request(req, state).await {
                Ok(Json(v)) => Ok(ApiJson(v)),
                Err(rejection) => Err(ApiError::from(rejection)),
            };
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::from(JsonRejection::from(e)))?;
        match serde_json::from_slice::<T>(&bytes) {
            Ok(v) => Ok(ApiJson(v)),
            Err(_) => match Json::<T>::from_bytes(&bytes) {
                Ok(Json(v)) => Ok(ApiJson(v)),
                Err(rejection) => Err(ApiError::from(rejection)),
            },
        }
    }
}

/// The request id: `X-Request-Id` when given (1–128 printable ASCII), else a new UUID v7
/// (RFC 9562: a millisecond timestamp, then random bits): ids made here sort by time, so the
/// store's indexes on them grow at one end instead of dirtying a random page per request.
pub(super) fn request_id(headers: &HeaderMap) -> Result<String, ApiError> {
    match headers.get("x-request-id") {
        None => Ok(uuid::Uuid::now_v7().to_string()),
        Some(v) => {
            let s = v.to_str().map_err(|_| {
                ApiError::bad_request("invalid_request_id", "X-Request-Id must be printable ASCII")
            })?;
            RequestId::new(s)
                .map(|_| s.to_owned())
                .map_err(|e| ApiError::bad_request("invalid_request_id", e.to_string()))
        }
    }
}

/// Authenticates the peer and resolves its roles; audits the refusal of unknown identities.
pub(super) async fn authenticate<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    peer: Option<Extension<Peer>>,
    rid: &str,
    role: Role,
) -> Result<Caller, ApiError> {
    let Some(Extension(peer)) = peer else {
        // Only reachable when the router is served without the mTLS listener.
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "no_client_identity",
            "a client certificate is required",
        ));
    };
    let caller = s.caller(&peer.identity, rid).await?;
    if let Err(e) = caller.require(role) {
        s.audit_refusal(rid, caller.identity.as_str(), &e).await;
        return Err(e);
    }
    Ok(caller)
}

fn with_request_id(rid: &str, resp: impl IntoResponse) -> Response {
    let mut r = resp.into_response();
    if let Ok(v) = rid.parse() {
        r.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), v);
    }
    r
}

/// Who made a change and through which request, for the audit record.
fn change_by(caller: &Caller, rid: &str, at: UnixMillis) -> Change {
    let mut change = Change::new(caller.identity.to_string(), at);
    change.request_id = Some(rid.to_owned());
    change
}

fn now_ms() -> UnixMillis {
    UnixMillis::now()
}

// ---------------------------------------------------------------------------------------------
// Health

async fn ready<B: KeyBackend, S: Store>(State(s): State<Shared<B, S>>) -> Response {
    if s.store().writes_failing() {
        // Probe (a durable no-op write, at most one per 200 ms): readiness comes back once the
        // store commits and syncs again, without waiting for a signing request.
        s.store().probe_writes().await;
    }
    if s.store().writes_failing() {
        // Same answer as for the backends: a load balancer takes the signer out of rotation
        // while it cannot commit decisions.
        ApiError::unavailable(
            "not_ready",
            "the store is failing writes (its last write batch could not be committed)",
            1,
        )
        .into_response()
    } else if s.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        ApiError::unavailable(
            "not_ready",
            "the signer's backends have not passed their self-check",
            1,
        )
        .into_response()
    }
}

// ---------------------------------------------------------------------------------------------
// Signing

/// What is to be signed, already parsed and chain-checked.
pub(crate) enum Job {
    Transaction(Box<TypedTransaction>),
    Message(Vec<u8>),
    TypedData(Box<TypedData>),
    Bundle(Box<BundleJob>),
}

/// A bundle: the key's own unsigned transactions and others' signed ones, in order.
pub(crate) struct BundleJob {
    items: Vec<BundleItem>,
    request: wire::SignBundleRequest,
    bundle_id: uuid::Uuid,
}

// Most items of a bundle are the key's own transactions: boxing them would add an allocation each
// to make the rarer pre-signed items smaller.
#[allow(clippy::large_enum_variant)]
enum BundleItem {
    Ours(TypedTransaction),
    Theirs(Bytes),
}

impl BundleJob {
    /// Parses and chain-checks a bundle request.
    fn parse(
        request: wire::SignBundleRequest,
        chain: eth::ChainGuard,
        rid: &str,
    ) -> Result<Self, ApiError> {
        if request.txs.is_empty() || request.txs.len() > MAX_BUNDLE_TXS {
            return Err(ApiError::bad_request(
                "invalid_bundle",
                format!("a bundle holds 1 to {MAX_BUNDLE_TXS} transactions"),
            ));
        }
        let mut items = Vec::with_capacity(request.txs.len());
        for (i, t) in request.txs.iter().enumerate() {
            match (&t.tx, &t.signed) {
                (Some(u), None) => {
                    let tx = u.to_typed().map_err(|e| {
                        ApiError::bad_request("invalid_transaction", format!("txs[{i}]: {}", e.0))
                    })?;
                    chain.check_transaction(&tx).map_err(eth_error)?;
                    items.push(BundleItem::Ours(tx));
                }
                (None, Some(raw)) => {
                    // The same checks as the submitter's, so that our key never signs a bundle
                    // the submitter would refuse: one whole envelope, bound to this chain.
                    let mut buf = raw.as_ref();
                    let envelope =
                        alloy::consensus::TxEnvelope::decode_2718(&mut buf).map_err(|e| {
                            ApiError::bad_request(
                                "invalid_transaction",
                                format!("txs[{i}]: not a signed EIP-2718 transaction: {e}"),
                            )
                        })?;
                    if !buf.is_empty() {
                        return Err(ApiError::bad_request(
                            "invalid_transaction",
                            format!(
                                "txs[{i}]: {} trailing bytes after the signed transaction",
                                buf.len()
                            ),
                        ));
                    }
                    let ours = chain.chain_id();
                    match alloy::consensus::Transaction::chain_id(&envelope) {
                        Some(id) if id == ours => {}
                        Some(id) => {
                            return Err(ApiError::bad_request(
                                "chain_mismatch",
                                format!("txs[{i}] is for chain {id}, not {ours}"),
                            ));
                        }
                        None => {
                            return Err(ApiError::bad_request(
                                "missing_chain_id",
                                format!("txs[{i}] has no chain id (pre-EIP-155)"),
                            ));
                        }
                    }
                    items.push(BundleItem::Theirs(raw.clone()));
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_bundle",
                        format!("txs[{i}]: exactly one of `tx` and `signed` must be given"),
                    ));
                }
            }
        }
        if !items.iter().any(|i| matches!(i, BundleItem::Ours(_))) {
            return Err(ApiError::bad_request(
                "nothing_to_sign",
                "the bundle holds no transaction for this key",
            ));
        }
        let last = request.last_block.unwrap_or(request.target_block);
        if last.0 < request.target_block.0 {
            return Err(ApiError::bad_request(
                "invalid_bundle",
                "lastBlock is before targetBlock",
            ));
        }
        let bundle_id = request
            .bundle_id
            .unwrap_or_else(|| uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, rid.as_bytes()));
        Ok(Self {
            items,
            request,
            bundle_id,
        })
    }

    /// What the request digest covers: every transaction (signing hash of ours, hash of the raw
    /// bytes of theirs), the bundle id and the target blocks.
    fn digest(&self) -> B256 {
        let mut buf = Vec::with_capacity(33 * self.items.len() + 32);
        for item in &self.items {
            match item {
                BundleItem::Ours(tx) => {
                    buf.push(1);
                    buf.extend_from_slice(
                        alloy::consensus::SignableTransaction::signature_hash(tx).as_slice(),
                    );
                }
                BundleItem::Theirs(raw) => {
                    buf.push(2);
                    buf.extend_from_slice(alloy::primitives::keccak256(raw).as_slice());
                }
            }
        }
        buf.extend_from_slice(self.bundle_id.as_bytes());
        buf.extend_from_slice(&self.request.target_block.0.to_be_bytes());
        buf.extend_from_slice(
            &self
                .request
                .last_block
                .unwrap_or(self.request.target_block)
                .0
                .to_be_bytes(),
        );
        alloy::primitives::keccak256(&buf)
    }
}

/// Most transactions in one bundle (Flashbots' limit is 100).
const MAX_BUNDLE_TXS: usize = 100;

impl Job {
    fn payload_digest(&self) -> Result<B256, ApiError> {
        Ok(match self {
            Job::Transaction(tx) => alloy::consensus::SignableTransaction::signature_hash(&**tx),
            Job::Message(m) => eip191_hash_message(m),
            Job::TypedData(t) => t
                .eip712_signing_hash()
                .map_err(|e| ApiError::bad_request("malformed_typed_data", e.to_string()))?,
            Job::Bundle(b) => b.digest(),
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Job::Transaction(_) => "transaction",
            Job::Message(_) => "personal_message",
            Job::TypedData(_) => "typed_data",
            Job::Bundle(_) => "bundle",
        }
    }

    fn policy_kind(&self) -> Result<policy::RequestKind, ApiError> {
        Ok(match self {
            Job::Transaction(tx) => policy::RequestKind::Transaction(tx_facts(tx)),
            Job::Bundle(b) => policy::RequestKind::Bundle(
                b.items
                    .iter()
                    .filter_map(|i| match i {
                        BundleItem::Ours(tx) => Some(tx_facts(tx)),
                        BundleItem::Theirs(_) => None,
                    })
                    .collect(),
            ),
            Job::Message(m) => {
                if policy::is_relay_auth_payload(m) {
                    policy::RequestKind::RelayAuth(m.clone())
                } else {
                    policy::RequestKind::PersonalMessage(m.clone())
                }
            }
            Job::TypedData(t) => policy::RequestKind::TypedData(policy::TypedDataFacts {
                name: t.domain.name.as_ref().map(|n| n.to_string()),
                version: t.domain.version.as_ref().map(|v| v.to_string()),
                chain_id: t
                    .domain
                    .chain_id
                    .map(|c| u64::try_from(c).map_err(|_| chain_overflow()))
                    .transpose()?,
                verifying_contract: t.domain.verifying_contract,
            }),
        })
    }
}

fn chain_overflow() -> ApiError {
    ApiError::bad_request("chain_mismatch", "chain id does not fit 64 bits")
}

/// The policy's view of a transaction.
pub fn tx_facts(tx: &TypedTransaction) -> policy::TxFacts {
    let fee = match tx {
        TypedTransaction::Legacy(_) | TypedTransaction::Eip2930(_) => {
            policy::Fee::GasPrice(U256::from(tx.gas_price().unwrap_or_default()))
        }
        _ => policy::Fee::Eip1559 {
            max_fee_per_gas: U256::from(tx.max_fee_per_gas()),
            max_priority_fee_per_gas: U256::from(tx.max_priority_fee_per_gas().unwrap_or_default()),
        },
    };
    policy::TxFacts::new(
        tx.chain_id().unwrap_or_default(),
        tx.to(),
        tx.value(),
        tx.gas_limit(),
        fee,
        tx.input(),
    )
}

pub(super) fn eth_error(e: EthError) -> ApiError {
    if e.is_caller_error() {
        ApiError::bad_request(e.code(), e.to_string())
    } else if let EthError::Backend(b) = &e {
        if b.is_transient() {
            ApiError::unavailable(
                "hsm_unavailable",
                format!("key backend unavailable: {b}"),
                1,
            )
        } else {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "hsm_error",
                format!("key backend: {b}"),
            )
        }
    } else {
        ApiError::internal(e)
    }
}

/// The skeleton of every route that needs one role: request id, authentication (unknown
/// identities and missing roles are refused and audited), the handler, the request id echoed.
async fn role_route<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    peer: Option<Extension<Peer>>,
    headers: &HeaderMap,
    role: Role,
    handler: impl AsyncFnOnce(Caller, String) -> Result<Response, ApiError>,
) -> Response {
    let rid = match request_id(headers) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let result = match authenticate(s, peer, &rid, role).await {
        Ok(caller) => handler(caller, rid.clone()).await,
        Err(e) => Err(e),
    };
    with_request_id(&rid, result.unwrap_or_else(IntoResponse::into_response))
}

/// The skeleton every signing route shares: request id, authentication (role `strategy`),
/// parsing (a refusal is audited), then the pipeline.
async fn sign_route<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    route: &'static str,
    peer: Option<Extension<Peer>>,
    name: &str,
    headers: &HeaderMap,
    parse: impl FnOnce(&Signer<B, S>, &str) -> Result<Job, ApiError>,
) -> Response {
    let started = std::time::Instant::now();
    let rid = match request_id(headers) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let result: Result<Response, ApiError> = async {
        let caller = authenticate(s, peer, &rid, Role::Strategy).await?;
        let job = match parse(s, &rid) {
            Ok(j) => j,
            Err(e) => {
                s.audit_refusal(&rid, caller.identity.as_str(), &e).await;
                return Err(e);
            }
        };
        run(s, &caller, name, &rid, job, Vec::new())
            .await
            .map(|(status, body)| (status, Json(body)).into_response())
    }
    .await;
    let code = match &result {
        Ok(r) if r.status() == StatusCode::ACCEPTED => "pending",
        Ok(_) => "signed",
        Err(e) => e.code,
    };
    let m = s.metrics();
    m.requests
        .get_or_create(&super::metrics::RequestLabels { route, code })
        .inc();
    m.latency
        .get_or_create(&super::metrics::RouteLabels { route })
        .observe(started.elapsed().as_secs_f64());
    with_request_id(&rid, result.unwrap_or_else(IntoResponse::into_response))
}

async fn sign_transaction<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<ApiJson<wire::SignTransactionRequest>, ApiError>,
) -> Response {
    sign_route(&s, "transaction", peer, &name, &headers, |s, _| {
        let ApiJson(req) = body?;
        let tx = req
            .tx
            .to_typed()
            .map_err(|e| ApiError::bad_request("invalid_transaction", e.0))?;
        s.chain.check_transaction(&tx).map_err(eth_error)?;
        Ok(Job::Transaction(Box::new(tx)))
    })
    .await
}

async fn sign_bundle_route<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<ApiJson<wire::SignBundleRequest>, ApiError>,
) -> Response {
    sign_route(&s, "bundle", peer, &name, &headers, |s, rid| {
        let ApiJson(req) = body?;
        Ok(Job::Bundle(Box::new(BundleJob::parse(req, s.chain, rid)?)))
    })
    .await
}

async fn sign_message<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<ApiJson<wire::SignMessageRequest>, ApiError>,
) -> Response {
    sign_route(&s, "message", peer, &name, &headers, |_, _| {
        let ApiJson(req) = body?;
        let bytes = req
            .bytes()
            .map_err(|e| ApiError::bad_request("invalid_message", e.0))?;
        Ok(Job::Message(bytes))
    })
    .await
}

async fn sign_typed_data<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<ApiJson<wire::SignTypedDataRequest>, ApiError>,
) -> Response {
    sign_route(&s, "typed_data", peer, &name, &headers, |s, _| {
        let ApiJson(req) = body?;
        let data = eth::parse_typed_data(&req.typed_data.to_string()).map_err(eth_error)?;
        s.chain.check_typed_data(&data).map_err(eth_error)?;
        Ok(Job::TypedData(Box::new(data)))
    })
    .await
}

/// A pipeline answer: 200 with the signed body, or 202 with the pending body.
pub(crate) type Signed = (StatusCode, Value);

/// Steps 4–7 for one parsed request.
pub(super) async fn run<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    caller: &Caller,
    name: &str,
    rid: &str,
    job: Job,
    approvals: Vec<policy::SignedApproval>,
) -> Result<Signed, ApiError> {
    let refuse = |e: ApiError| async move {
        s.audit_refusal(rid, caller.identity.as_str(), &e).await;
        Err::<Signed, ApiError>(e)
    };
    // `name@N` names one version: the active one, or a retiring one, which the policy lets sign
    // only what its retiring rules allow (a sweep to the successor's address).
    let (name, version) = match name.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (name, None),
    };
    if !caller.grants.may_use(name) {
        return refuse(ApiError::forbidden(
            "key_not_allowed",
            format!("identity {} may not use key {name:?}", caller.identity),
        ))
        .await;
    }
    let (key, key_status) = match version {
        None => match s.active_key(name) {
            Some(k) => (k, policy::KeyStatus::Active),
            None => return refuse(no_active_key(s, name).await).await,
        },
        Some(v) => match live_version(s, name, v) {
            Ok(k) => k,
            Err(e) => return refuse(e).await,
        },
    };
    let payload_digest = job.payload_digest()?;
    let digest = request_digest(rid, name, caller.identity.as_str(), payload_digest);
    let request = policy::Request {
        key: policy::KeyName::new(name),
        key_status,
        client: policy::ClientId::new(caller.identity.as_str()),
        digest,
        kind: job.policy_kind()?,
    };
    let now = now_ms();
    let now_s = now.0 / 1000;
    let decision = s.evaluate(&request, &approvals, policy::KeyControl::default(), now_s);
    match decision.verdict {
        Verdict::Deny => {
            // A retried request id is answered with what was stored for it, even when the window
            // its own reservation filled is now full (the store checks duplicates first, too).
            if matches!(
                decision.code,
                policy::Code::RateLimited | policy::Code::VelocityExceeded
            ) && let Ok(id) = RequestId::new(rid)
                && let Ok(Some(stored)) = s.store.request(id).await
            {
                return replay(&stored);
            }
            refuse(policy_error(&decision)).await
        }
        // A pending request re-evaluated with the approvals so far: still waiting.
        Verdict::NeedsApprovals if !approvals.is_empty() => Ok((StatusCode::ACCEPTED, Value::Null)),
        Verdict::NeedsApprovals => {
            let named = (name, version);
            create_pending(s, caller, named, rid, &job, digest, &decision, now).await
        }
        Verdict::Allow => {
            execute(
                s,
                caller,
                &key,
                rid,
                job,
                (digest, payload_digest),
                &decision,
                now,
            )
            .await
        }
    }
}

/// The live version `name@v` and the status the policy judges it in: active, or retiring with
/// its successor's address. Anything else (unknown, pending, retired, revoked) is refused.
fn live_version<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    name: &str,
    v: &str,
) -> Result<(Arc<LiveKey>, policy::KeyStatus), ApiError> {
    let Some(v) = v.parse::<u32>().ok().filter(|v| *v >= 1) else {
        return Err(ApiError::bad_request(
            "invalid_key_name",
            format!("key version {name}@{v:?} must be name@N"),
        ));
    };
    let keys = match s.keys.read() {
        Ok(k) => k,
        Err(p) => p.into_inner(),
    };
    let versions = keys.get(name).map(Vec::as_slice).unwrap_or_default();
    let Some(key) = versions.iter().find(|k| k.record.version.version == v) else {
        return Err(ApiError::conflict(
            "key_not_signable",
            format!("{name}@{v} is neither active nor retiring"),
        ));
    };
    let status = match &key.record.status {
        store::KeyStatus::Active => policy::KeyStatus::Active,
        store::KeyStatus::Retiring { successor, .. } => {
            let Some(succ) = versions
                .iter()
                .find(|k| k.record.version.version == *successor)
            else {
                return Err(ApiError::conflict(
                    "key_not_signable",
                    format!("{name}@{v} is retiring but its successor @{successor} is not live"),
                ));
            };
            policy::KeyStatus::Retiring {
                successor: succ.record.address,
            }
        }
        other => {
            return Err(ApiError::conflict(
                "key_not_signable",
                format!("{name}@{v} is {}", other.state()),
            ));
        }
    };
    Ok((key.clone(), status))
}

/// Why a key has no version that may sign: revoked (409), no such key (404), or none active.
async fn no_active_key<B: KeyBackend, S: Store>(s: &Signer<B, S>, name: &str) -> ApiError {
    let versions = match store::KeyName::new(name) {
        Ok(kn) => s.store.list_keys(Some(kn)).await.unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    if versions.is_empty() {
        ApiError::not_found("unknown_key", format!("no key {name:?}"))
    } else if versions.iter().all(|v| {
        matches!(
            v.status,
            store::KeyStatus::Revoked { .. }
                | store::KeyStatus::DestroyScheduled { .. }
                | store::KeyStatus::Destroyed
        )
    }) {
        ApiError::conflict(
            "key_revoked",
            format!("every version of key {name:?} is revoked"),
        )
    } else {
        ApiError::conflict(
            "key_not_signable",
            format!("key {name:?} has no active version that passed the self-check"),
        )
    }
}

fn policy_error(d: &policy::Decision) -> ApiError {
    let mut e = if d.code == policy::Code::RateLimited {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            d.reason.clone(),
        )
    } else if d.code == policy::Code::Frozen {
        ApiError::conflict("frozen", d.reason.clone())
    } else {
        ApiError::denied(d.code.as_str(), d.reason.clone())
    };
    if let Some(rl) = &d.rate_limit {
        e = e
            .with_header(
                HeaderName::from_static("x-ratelimit-limit"),
                rl.limit.to_string(),
            )
            .with_header(
                HeaderName::from_static("x-ratelimit-remaining"),
                rl.remaining.to_string(),
            )
            .with_header(
                HeaderName::from_static("x-ratelimit-reset"),
                rl.reset.to_string(),
            );
        if d.code == policy::Code::RateLimited {
            let wait = rl.reset.saturating_sub(now_ms().0 / 1000).max(1);
            e = e.with_header(header::RETRY_AFTER, wait.to_string());
        }
    }
    e.with_details(json!({ "rule": d.reason, "code": d.code.as_str() }))
}

#[allow(clippy::too_many_arguments)]
async fn create_pending<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    caller: &Caller,
    (name, version): (&str, Option<&str>),
    rid: &str,
    job: &Job,
    digest: B256,
    decision: &policy::Decision,
    now: UnixMillis,
) -> Result<Signed, ApiError> {
    let tier =
        decision.pending.first().cloned().ok_or_else(|| {
            ApiError::internal("policy asked for approvals without naming a tier")
        })?;
    let expires_at = now.plus_ms(s.pending_ttl_ms);
    let mut request_json = match job {
        Job::Transaction(tx) => json!({ "kind": "transaction", "tx": tx }),
        Job::Message(m) => json!({ "kind": "personal_message", "message": Bytes::from(m.clone()) }),
        Job::TypedData(t) => json!({ "kind": "typed_data", "typedData": t }),
        Job::Bundle(b) => {
            let mut req = b.request.clone();
            req.bundle_id = Some(b.bundle_id);
            json!({ "kind": "bundle", "bundle": req })
        }
    };
    if let (Some(v), Some(o)) = (version, request_json.as_object_mut()) {
        // Executed with the version it named once approved.
        o.insert("keyVersion".into(), json!(v));
    }
    let pending = PendingRequest {
        id: RequestId::new(rid)
            .map_err(|e| ApiError::bad_request("invalid_request_id", e.to_string()))?,
        key: store::KeyName::new(name)
            .map_err(|e| ApiError::bad_request("invalid_key_name", e.to_string()))?,
        identity: caller.identity.to_string(),
        request: request_json,
        digest,
        approvals_required: serde_json::to_value(&decision.pending).map_err(ApiError::internal)?,
        created_at: now,
        expires_at,
        status: PendingStatus::Pending,
    };
    let change = change_by(caller, rid, now);
    s.store
        .create_pending(pending, change)
        .await
        .map_err(store_error)?;
    let body = wire::PendingResponse {
        request_id: rid.to_owned(),
        request_digest: digest,
        threshold: tier.threshold,
        approver_set: tier.approvers.clone(),
        tier: tier.tier.clone(),
        expires_at: Quantity(expires_at.0 / 1000),
    };
    Ok((
        StatusCode::ACCEPTED,
        serde_json::to_value(body).map_err(ApiError::internal)?,
    ))
}

/// Steps 5–7: commit the decision, sign, record the outcome.
#[allow(clippy::too_many_arguments)]
async fn execute<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    caller: &Caller,
    key: &LiveKey,
    rid: &str,
    job: Job,
    (digest, payload_digest): (B256, B256),
    decision: &policy::Decision,
    now: UnixMillis,
) -> Result<Signed, ApiError> {
    let policy = s.policy();
    // Each window's text form, made once for the store's reservation and the audit record.
    let window_names: Vec<String> = decision
        .reservations
        .iter()
        .map(|r| {
            use std::fmt::Write;
            // Sized once: `to_string` would grow the buffer three times on the way.
            let mut name = String::with_capacity(64);
            let _ = write!(name, "{}", r.window);
            name
        })
        .collect();
    let reservations = decision
        .reservations
        .iter()
        .zip(&window_names)
        .map(|(r, name)| {
            // A grant's spending lives in the store's grant window (`Store::grant` sums it).
            let window = match r.window.scope {
                policy::WindowScope::Grant(g) => WindowKey::grant(&g.to_string()),
                _ => WindowKey::new(name.clone()),
            };
            Ok(store::Reservation {
                window: window.map_err(|e| ApiError::internal(format!("window key: {e}")))?,
                duration_ms: if r.window.duration == policy::LIFETIME {
                    store::FOREVER_MS
                } else {
                    r.window.duration.saturating_mul(1000)
                },
                amount: r.amount,
                limit: r.limit,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    // Built as values, not through `json!`, which would serialize (copy) each nested value again.
    let reserved: Vec<Value> = decision
        .reservations
        .iter()
        .zip(window_names)
        .map(|(r, window)| {
            let mut o = serde_json::Map::new();
            o.insert("window".into(), Value::String(window));
            o.insert("amount".into(), Value::String(hex_u256(r.amount)));
            Value::Object(o)
        })
        .collect();
    let mut details = json!({
        "kind": job.kind(),
        "key": key.record.version.to_string(),
        // `record.address == info.address` (checked when the key was loaded).
        "address": &*key.checksum,
        "requestDigest": digest,
        "payloadDigest": payload_digest,
        "decision": decision.code.as_str(),
        "reason": decision.reason,
        "policyHash": policy.hash(),
        "approvers": decision.approvers,
        "grant": decision.grant,
    });
    if let Some(d) = details.as_object_mut() {
        d.insert("reservations".into(), Value::Array(reserved));
    }
    let tx = DecisionTx {
        request_id: RequestId::new(rid)
            .map_err(|e| ApiError::bad_request("invalid_request_id", e.to_string()))?,
        key: key.record.version.clone(),
        identity: caller.identity.to_string(),
        at: now,
        digest,
        // `run` resolves a retiring version only for a request that named it, and the policy
        // judged it as retiring (its retiring rules) before allowing it.
        allow_retiring: matches!(key.record.status, store::KeyStatus::Retiring { .. }),
        reservations,
        details,
    };
    // Held from the decision until the signature is made: a revocation through the API waits for
    // it, so no signature by a revoked key is made after the revocation has returned.
    let _signing = s.signing_guard(key.record.version.name.as_str()).await;
    let started = std::time::Instant::now();
    let committed = s.store.commit_decision(tx).await;
    s.metrics.stage("decision", started);
    match committed {
        Ok(_) => {}
        Err(StoreError::Refused(Refusal::DuplicateRequest(stored))) => {
            return replay(&stored);
        }
        Err(e) => {
            // The registry changed behind the cache (a rotation or revocation made directly in
            // the store): refresh, so the next request uses the version now active.
            if matches!(e, StoreError::Refused(Refusal::KeyNotSignable { .. }))
                && let Err(problem) = s.self_check().await
            {
                tracing::warn!(%problem, "key refresh after a registry change");
            }
            return Err(store_error(e));
        }
    }
    let now_s = now.0 / 1000;
    s.mirror_apply(decision, now_s);

    let started = std::time::Instant::now();
    let signed = match &job {
        Job::Transaction(tx) => {
            // The signing hash is `payload_digest` (computed for the request digest) and the
            // key's address was checked when it was loaded: neither is computed again.
            eth::sign_hashed_transaction(
                &s.backend,
                &key.info,
                s.chain,
                (**tx).clone(),
                payload_digest,
            )
            .await
            .map(|t| {
                let body = wire::SignedTransactionResponse {
                    request_id: rid.to_owned(),
                    key_version: key.record.version.to_string(),
                    from: t.from,
                    raw: t.raw.clone(),
                    hash: t.hash,
                    signature: sig65(&t.signature),
                };
                (
                    json!({ "txHash": t.hash, "signature": sig65(&t.signature) }),
                    serde_json::to_value(body),
                )
            })
        }
        Job::Message(m) => eth::sign_personal_message(&s.backend, &key.info, m.clone())
            .await
            .map(|m| signature_body(rid, key, &m)),
        Job::TypedData(t) => eth::sign_typed_data(&s.backend, &key.info, s.chain, (**t).clone())
            .await
            .map(|m| signature_body(rid, key, &m)),
        Job::Bundle(b) => sign_bundle(s, key, rid, b).await,
    };
    s.metrics.stage("sign", started);
    let (audit, body) = match signed {
        Ok((audit, Ok(body))) => (audit, body),
        Ok((_, Err(e))) => return Err(ApiError::internal(e)),
        Err(e) => {
            // The signature (if the device made one) never left this process: release.
            s.mirror_release(decision, now_s);
            let outcome = OutcomeTx {
                request_id: RequestId::new(rid).map_err(ApiError::internal)?,
                at: now_ms(),
                outcome: Outcome::Failed {
                    reason: e.to_string(),
                    release: true,
                },
            };
            if let Err(se) = s.store.record_outcome(outcome).await {
                tracing::error!(error = %se, request_id = rid, "cannot record a signing failure");
            }
            return Err(eth_error(e));
        }
    };
    let mut details = audit;
    if let (Some(d), Some(b)) = (details.as_object_mut(), body.as_object()) {
        d.insert("response".into(), Value::Object(b.clone()));
    }
    let outcome = OutcomeTx {
        request_id: RequestId::new(rid).map_err(ApiError::internal)?,
        at: now_ms(),
        outcome: Outcome::Signed { details },
    };
    // The durable decision record already covers this signature; the outcome record is the
    // receipt, queued without waiting for an fsync (see "Outcomes" in the store docs).
    let started = std::time::Instant::now();
    if let Err(e) = s.store.queue_outcome(outcome).await {
        tracing::error!(error = %e, request_id = rid, "cannot record a signature outcome");
    }
    s.metrics.stage("outcome", started);
    Ok((StatusCode::OK, body))
}

/// Signs every transaction of the key in a bundle (all or none), then hands the signed bundle
/// to the submitter. A submitter failure does not undo the signatures: the answer says what the
/// submitter accepted.
async fn sign_bundle<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    key: &LiveKey,
    rid: &str,
    b: &BundleJob,
) -> Result<(Value, Result<Value, serde_json::Error>), EthError> {
    let mut raws = Vec::with_capacity(b.items.len());
    let mut hashes = Vec::with_capacity(b.items.len());
    for item in &b.items {
        match item {
            BundleItem::Ours(tx) => {
                let t = eth::sign_transaction(&s.backend, &key.info, s.chain, tx.clone()).await?;
                raws.push(t.raw);
                hashes.push(t.hash);
            }
            BundleItem::Theirs(raw) => {
                hashes.push(alloy::primitives::keccak256(raw));
                raws.push(raw.clone());
            }
        }
    }
    let submitted = match &s.submitter {
        None => wire::SubmissionAck {
            accepted: false,
            state: "no_submitter".into(),
            relays: Vec::new(),
        },
        Some(link) => {
            let req = castellan_api::submitter::SubmitBundleRequest {
                bundle_id: b.bundle_id,
                key_name: key.record.version.name.to_string(),
                txs: raws.clone(),
                target_block: b.request.target_block,
                last_block: b.request.last_block,
                min_timestamp: b.request.min_timestamp,
                max_timestamp: b.request.max_timestamp,
                reverting_tx_hashes: b.request.reverting_tx_hashes.clone(),
                replacement_uuid: b.request.replacement_uuid,
                relays: b.request.relays.clone(),
                simulate: b.request.simulate,
            };
            match link.submit(&req).await {
                Ok(st) => wire::SubmissionAck {
                    accepted: true,
                    state: serde_json::to_value(st.state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    relays: st.relays.iter().map(|r| r.relay.clone()).collect(),
                },
                Err(e) => {
                    tracing::warn!(request_id = rid, error = %e.message, "submitter refused a bundle");
                    wire::SubmissionAck {
                        accepted: false,
                        state: e.code.to_owned(),
                        relays: Vec::new(),
                    }
                }
            }
        }
    };
    let body = wire::SignedBundleResponse {
        request_id: rid.to_owned(),
        bundle_id: b.bundle_id,
        key_version: key.record.version.to_string(),
        txs: raws,
        tx_hashes: hashes.clone(),
        submitted,
    };
    Ok((
        json!({ "bundleId": b.bundle_id, "txHashes": hashes, "submitted": body.submitted }),
        serde_json::to_value(body),
    ))
}

fn signature_body(
    rid: &str,
    key: &LiveKey,
    m: &eth::MessageSignature,
) -> (Value, Result<Value, serde_json::Error>) {
    let body = wire::SignatureResponse {
        request_id: rid.to_owned(),
        key_version: key.record.version.to_string(),
        address: m.from,
        digest: m.digest,
        signature: sig65(&m.signature),
    };
    (
        json!({ "digest": m.digest, "signature": sig65(&m.signature) }),
        serde_json::to_value(body),
    )
}

/// `r‖s‖v` with v = 27/28, as wallets return it.
pub fn sig65(sig: &Signature) -> Bytes {
    let mut b = sig.as_bytes();
    if b[64] < 27 {
        b[64] += 27;
    }
    Bytes::from(b.to_vec())
}

/// A retried request id: answer what was stored, never sign twice.
fn replay(stored: &store::StoredRequest) -> Result<Signed, ApiError> {
    match &stored.state {
        store::RequestState::Signed { details, .. } => {
            let v: Value = serde_json::from_str(details).map_err(ApiError::internal)?;
            match v.get("response") {
                Some(body) => Ok((StatusCode::OK, body.clone())),
                None => Err(ApiError::internal("stored outcome has no response")),
            }
        }
        store::RequestState::Reserved => Err(ApiError::conflict(
            "request_in_progress",
            format!(
                "request id {} was decided and has no outcome yet; it will not be signed again",
                stored.request_id
            ),
        )),
        store::RequestState::Failed { reason, .. } => Err(ApiError::conflict(
            "request_failed",
            format!("request id {} failed: {reason}", stored.request_id),
        )),
    }
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Refused(r) => {
            let msg = r.to_string();
            match r {
                Refusal::Frozen(_) => ApiError::conflict("frozen", msg),
                Refusal::UnknownKey(_) => ApiError::not_found("unknown_key", msg),
                Refusal::KeyNotSignable { status, .. } => match status {
                    store::KeyStatus::Revoked { .. } => ApiError::conflict("key_revoked", msg),
                    _ => ApiError::conflict("key_not_signable", msg),
                },
                Refusal::KeyPaused { .. } => ApiError::conflict("key_paused", msg),
                Refusal::LimitExceeded {
                    window,
                    spent,
                    limit,
                    ..
                } => super::limits_warm::limit_refusal(&window, spent, limit, msg),
                Refusal::DuplicateRequest(_) => ApiError::conflict("duplicate_request", msg),
            }
        }
        StoreError::NotFound(m) => ApiError::not_found("not_found", m),
        StoreError::Conflict(m) => ApiError::conflict("conflict", m),
        StoreError::Invalid(m) => ApiError::bad_request("invalid", m),
        other => {
            tracing::error!(error = %other, "store failure");
            ApiError::unavailable(
                "store_unavailable",
                "the store cannot commit; nothing was signed",
                1,
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Approvals

async fn request_status<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let rid = request_id(&headers).unwrap_or_default();
    let result: Result<Response, ApiError> = async {
        let Some(Extension(p)) = peer else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "no_client_identity",
                "a client certificate is required",
            ));
        };
        let caller = s.caller(&p.identity, &rid).await?;
        let oversight = caller.grants.has(Role::Approver)
            || caller.grants.has(Role::Admin)
            || caller.grants.has(Role::Auditor);
        if !oversight && !caller.grants.has(Role::Strategy) {
            return Err(ApiError::forbidden(
                "role_required",
                "reading requests needs the strategy, approver, admin or auditor role",
            ));
        }
        let status = status_of(&s, &id).await?;
        // A strategy host sees its own requests only (a missing one and another client's look
        // the same).
        if !oversight && status.client != caller.identity.as_str() {
            return Err(ApiError::not_found(
                "unknown_request",
                format!("no pending request {id}"),
            ));
        }
        Ok(Json(status).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn status_of<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    id: &str,
) -> Result<wire::RequestStatus, ApiError> {
    let rid = RequestId::new(id)
        .map_err(|e| ApiError::bad_request("invalid_request_id", e.to_string()))?;
    let Some((pending, approvals)) = s.store.pending(rid.clone()).await.map_err(store_error)?
    else {
        return Err(ApiError::not_found(
            "unknown_request",
            format!("no pending request {id}"),
        ));
    };
    let threshold = pending
        .approvals_required
        .get(0)
        .and_then(|t| t.get("threshold"))
        .and_then(Value::as_u64)
        .and_then(|t| u32::try_from(t).ok())
        .unwrap_or(0);
    let stored = s.store.request(rid).await.map_err(store_error)?;
    let (state, result, error) = match (&pending.status, stored.as_ref().map(|r| &r.state)) {
        (_, Some(store::RequestState::Signed { details, .. })) => {
            let v: Value = serde_json::from_str(details).map_err(ApiError::internal)?;
            (wire::RequestState::Signed, v.get("response").cloned(), None)
        }
        (_, Some(store::RequestState::Failed { reason, .. })) => (
            wire::RequestState::Failed,
            None,
            Some(castellan_api::submitter::ErrorDetail {
                code: "signing_failed".into(),
                message: reason.clone(),
                details: json!({}),
            }),
        ),
        (PendingStatus::Executed, None) => (
            wire::RequestState::Executed,
            Some(json!({ "executed": pending.request.get("operation") })),
            None,
        ),
        (PendingStatus::Rejected, _) => (wire::RequestState::Refused, None, None),
        (PendingStatus::Expired, _) => (wire::RequestState::Expired, None, None),
        (PendingStatus::Pending, _) if pending.expires_at <= now_ms() => {
            (wire::RequestState::Expired, None, None)
        }
        _ => (wire::RequestState::PendingApprovals, None, None),
    };
    let now = now_ms();
    let live: Vec<_> = approvals.iter().filter(|a| a.expires_at > now).collect();
    Ok(wire::RequestStatus {
        request_id: id.to_owned(),
        key: pending.key.to_string(),
        client: pending.identity.clone(),
        state,
        approvals: u32::try_from(live.len()).unwrap_or(u32::MAX),
        threshold,
        approvers: live.iter().map(|a| a.approver).collect(),
        request_digest: pending.digest,
        expires_at: Quantity(pending.expires_at.0 / 1000),
        result,
        error,
    })
}

async fn approve<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<ApiJson<wire::ApprovalSubmission>, ApiError>,
) -> Response {
    role_route(&s, peer, &headers, Role::Approver, async |caller, rid| {
        let ApiJson(sub) = body?;
        let pid = RequestId::new(&id).map_err(|e| ApiError::bad_request("invalid_request_id", e.to_string()))?;
        let Some((pending, _)) = s.store.pending(pid.clone()).await.map_err(store_error)? else {
            return Err(ApiError::not_found("unknown_request", format!("no pending request {id}")));
        };
        let sig = Signature::try_from(sub.signature.as_ref())
            .map_err(|e| ApiError::bad_request("invalid_signature", e.to_string()))?;
        let signed = policy::SignedApproval {
            approval: policy::Approval {
                request: pending.digest,
                decision: sub.decision.clone(),
                expiry: sub.expiry.0,
            },
            signature: sig,
        };
        let policy = s.policy();
        let recovered = signed.signer(policy.approval_domain());
        if recovered != Some(sub.approver.0) {
            let e = ApiError::bad_request(
                "approval_signature_mismatch",
                format!(
                    "the approval does not recover to {} under the Castellan domain (request digest {})",
                    sub.approver.0, pending.digest
                ),
            );
            s.audit_refusal(&rid, caller.identity.as_str(), &e).await;
            return Err(e);
        }
        let now = now_ms();
        if sub.expiry.0.saturating_mul(1000) <= now.0 {
            let e = ApiError::bad_request("approval_expired", format!("approval expired at {}", sub.expiry.0));
            s.audit_refusal(&rid, caller.identity.as_str(), &e).await;
            return Err(e);
        }
        if sub.decision != policy::APPROVE {
            s.store
                .set_pending_status(pid.clone(), PendingStatus::Rejected, Change::new(caller.identity.to_string(), now))
                .await
                .map_err(store_error)?;
            return status_of(&s, &id).await.map(|st| Json(st).into_response());
        }
        s.store
            .add_approval(
                store::Approval {
                    pending_id: pid.clone(),
                    approver: sub.approver.0,
                    signature: sub.signature.to_vec(),
                    expires_at: UnixMillis(sub.expiry.0.saturating_mul(1000)),
                    at: now,
                },
                Change::new(caller.identity.to_string(), now),
            )
            .await
            .map_err(store_error)?;
        try_execute_pending(&s, &id).await?;
        status_of(&s, &id).await.map(|st| Json(st).into_response())
    })
    .await
}

/// Re-evaluates a pending request with its approvals; signs when the policy now allows it.
async fn try_execute_pending<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    id: &str,
) -> Result<(), ApiError> {
    let pid = RequestId::new(id)
        .map_err(|e| ApiError::bad_request("invalid_request_id", e.to_string()))?;
    let Some((pending, approvals)) = s.store.pending(pid.clone()).await.map_err(store_error)?
    else {
        return Ok(());
    };
    if pending.status != PendingStatus::Pending || pending.expires_at <= now_ms() {
        return Ok(());
    }
    let signed: Vec<policy::SignedApproval> = approvals
        .iter()
        .filter_map(|a| {
            Some(policy::SignedApproval {
                approval: policy::Approval {
                    request: pending.digest,
                    decision: policy::APPROVE.into(),
                    expiry: a.expires_at.0 / 1000,
                },
                signature: Signature::try_from(a.signature.as_slice()).ok()?,
            })
        })
        .collect();
    if pending.request.get("kind").and_then(Value::as_str) == Some("operation") {
        return execute_operation(s, &pending, &signed).await;
    }
    let job = match pending.request.get("kind").and_then(Value::as_str) {
        Some("transaction") => Job::Transaction(Box::new(
            serde_json::from_value(pending.request["tx"].clone()).map_err(ApiError::internal)?,
        )),
        Some("personal_message") => Job::Message(
            serde_json::from_value::<Bytes>(pending.request["message"].clone())
                .map_err(ApiError::internal)?
                .to_vec(),
        ),
        Some("typed_data") => Job::TypedData(Box::new(
            serde_json::from_value(pending.request["typedData"].clone())
                .map_err(ApiError::internal)?,
        )),
        other => {
            return Err(ApiError::internal(format!(
                "pending request of kind {other:?}"
            )));
        }
    };
    let caller = Caller {
        identity: castellan_api::tls::Identity::new(pending.identity.clone()),
        grants: s
            .identities
            .get(&castellan_api::tls::Identity::new(pending.identity.clone()))
            .cloned()
            .ok_or_else(|| {
                ApiError::forbidden(
                    "unknown_identity",
                    "the requesting identity is no longer configured",
                )
            })?,
    };
    let name = match pending.request.get("keyVersion").and_then(Value::as_str) {
        Some(v) => format!("{}@{v}", pending.key),
        None => pending.key.to_string(),
    };
    let (status, _) = run(s, &caller, &name, id, job, signed).await?;
    if status == StatusCode::OK {
        s.store
            .set_pending_status(
                pid,
                PendingStatus::Executed,
                Change::new(pending.identity.clone(), now_ms()),
            )
            .await
            .map_err(store_error)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Operations that need M-of-N admin approvals: unfreeze, policy change

/// Records a pending operation; approvers approve it like any pending request.
async fn propose_operation<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    caller: &Caller,
    rid: &str,
    op: policy::Operation,
    subject: Vec<u8>,
    details: Value,
) -> Result<Response, ApiError> {
    let policy = s.policy();
    let digest = op.digest(&subject);
    // Refuse at once if no tier is configured for the operation (it could never pass).
    let probe = policy.evaluate_operation(op, digest, &[], now_ms().0 / 1000);
    if probe.code == policy::Code::OperationNotConfigured {
        return Err(ApiError::denied(probe.code.as_str(), probe.reason));
    }
    let now = now_ms();
    let expires_at = now.plus_ms(s.pending_ttl_ms);
    let tier = probe.pending.first().cloned();
    let pending = PendingRequest {
        id: RequestId::new(rid)
            .map_err(|e| ApiError::bad_request("invalid_request_id", e.to_string()))?,
        // Operations are not tied to a key; the store wants a key name for its index.
        key: store::KeyName::new("operations").map_err(ApiError::internal)?,
        identity: caller.identity.to_string(),
        request: json!({
            "kind": "operation",
            "operation": op.as_str(),
            "subject": Bytes::from(subject),
            "details": details,
        }),
        digest,
        approvals_required: serde_json::to_value(&probe.pending).map_err(ApiError::internal)?,
        created_at: now,
        expires_at,
        status: PendingStatus::Pending,
    };
    let change = change_by(caller, rid, now);
    s.store
        .create_pending(pending, change)
        .await
        .map_err(store_error)?;
    let body = wire::PendingResponse {
        request_id: rid.to_owned(),
        request_digest: digest,
        threshold: tier.as_ref().map(|t| t.threshold).unwrap_or(0),
        approver_set: tier
            .as_ref()
            .map(|t| t.approvers.clone())
            .unwrap_or_default(),
        tier: tier.map(|t| t.tier).unwrap_or_default(),
        expires_at: Quantity(expires_at.0 / 1000),
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Carries out an approved operation.
async fn execute_operation<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    pending: &PendingRequest,
    approvals: &[policy::SignedApproval],
) -> Result<(), ApiError> {
    let op = match pending.request["operation"].as_str() {
        Some("unfreeze") => policy::Operation::Unfreeze,
        Some("policy_change") => policy::Operation::PolicyChange,
        other => {
            return Err(ApiError::internal(format!("pending operation {other:?}")));
        }
    };
    let now = now_ms();
    let decision = s
        .policy()
        .evaluate_operation(op, pending.digest, approvals, now.0 / 1000);
    if !decision.is_allowed() {
        return Ok(());
    }
    let mut change = Change::new(pending.identity.clone(), now);
    change.request_id = Some(pending.id.to_string());
    match op {
        policy::Operation::Unfreeze => {
            s.store
                .unfreeze(change.clone())
                .await
                .map_err(store_error)?;
        }
        policy::Operation::PolicyChange => {
            let expected: Bytes = serde_json::from_value(pending.request["subject"].clone())
                .map_err(ApiError::internal)?;
            s.reload_policy(&expected, &pending.identity, &pending.id.to_string())
                .await?;
        }
        policy::Operation::KeyDestruction => {}
    }
    s.store
        .set_pending_status(pending.id.clone(), PendingStatus::Executed, change)
        .await
        .map_err(store_error)?;
    Ok(())
}

async fn unfreeze<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Result<ApiJson<wire::AdminAction>, ApiError>,
) -> Response {
    role_route(&s, peer, &headers, Role::Admin, async |caller, rid| {
        let ApiJson(a) = body?;
        if s.store.freeze_state().await.map_err(store_error)?.is_none() {
            return Err(ApiError::conflict("not_frozen", "signing is not frozen"));
        }
        // The subject is the request id: each unfreeze proposal has its own digest.
        propose_operation(
            &s,
            &caller,
            &rid,
            policy::Operation::Unfreeze,
            rid.as_bytes().to_vec(),
            json!({ "reason": a.reason }),
        )
        .await
    })
    .await
}

async fn policy_reload<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    role_route(&s, peer, &headers, Role::Admin, async |caller, rid| {
        let candidate = s.read_policy_file()?;
        let current = s.policy().hash();
        if candidate.hash() == current {
            return Err(ApiError::conflict(
                "policy_unchanged",
                format!("the policy file's hash {current} is the policy in force"),
            ));
        }
        // Approvers approve exactly this policy: its hash is the operation's subject.
        propose_operation(
            &s,
            &caller,
            &rid,
            policy::Operation::PolicyChange,
            candidate.hash().to_vec(),
            json!({ "from": current, "to": candidate.hash() }),
        )
        .await
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Outcomes reported by the submitter (feed the breaker)

async fn outcome<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Result<ApiJson<castellan_api::submitter::BundleOutcome>, ApiError>,
) -> Response {
    role_route(&s, peer, &headers, Role::Submitter, async |caller, rid| {
        let ApiJson(o) = body?;
        let kn = store::KeyName::new(&o.key_name)
            .map_err(|e| ApiError::bad_request("invalid_key_name", e.to_string()))?;
        let success = o.outcome == castellan_api::submitter::OutcomeKind::Included;
        let now = now_ms();
        let change = change_by(&caller, &rid, now);
        let failures = s
            .store
            .record_key_result(kn.clone(), success, change.clone())
            .await
            .map_err(store_error)?;
        let outcome = match o.outcome {
            castellan_api::submitter::OutcomeKind::Included => policy::TxOutcome::Included,
            castellan_api::submitter::OutcomeKind::Reverted => policy::TxOutcome::Reverted,
            castellan_api::submitter::OutcomeKind::NotIncluded => policy::TxOutcome::NotIncluded,
        };
        // The breaker transition is the policy's; the pause it causes is the store's.
        let before = policy::KeyControl {
            consecutive_failures: failures.saturating_sub(1),
            ..Default::default()
        };
        let now_s = now.0 / 1000;
        let after = s.policy().breaker_on_outcome(
            &policy::KeyName::new(&o.key_name),
            before,
            outcome,
            now_s,
        );
        let tripped = after.breaker_open_until > now_s;
        if tripped {
            s.store
                .pause_key(
                    kn,
                    UnixMillis(after.breaker_open_until.saturating_mul(1000)),
                    format!("breaker: {failures} consecutive failed outcomes"),
                    change,
                )
                .await
                .map_err(store_error)?;
        }
        Ok(Json(json!({
            "consecutiveFailures": failures,
            "breakerOpenUntil": tripped.then_some(after.breaker_open_until),
        }))
        .into_response())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Relay auth

async fn relay_auth<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Result<ApiJson<wire::RelayAuthRequest>, ApiError>,
) -> Response {
    let rid = match request_id(&headers) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let result: Result<Response, ApiError> = async {
        let caller = authenticate(&s, peer, &rid, Role::Submitter).await?;
        let ApiJson(req) = body?;
        // The relay-auth key is the key the policy marks `relay_auth`; the submitter's identity
        // lists it as its only key.
        let name = caller
            .grants
            .keys
            .as_ref()
            .and_then(|k| {
                if k.len() == 1 {
                    k.iter().next().cloned()
                } else {
                    None
                }
            })
            .ok_or_else(|| {
                ApiError::forbidden(
                    "relay_auth_key_not_configured",
                    "the submitter identity must list exactly one key: the relay-auth key",
                )
            })?;
        let text = format!("{:#x}", req.body_hash).into_bytes();
        let (status, body) = run(&s, &caller, &name, &rid, Job::Message(text), Vec::new()).await?;
        if status != StatusCode::OK {
            return Ok((status, Json(body)).into_response());
        }
        let sig: wire::SignatureResponse =
            serde_json::from_value(body).map_err(ApiError::internal)?;
        Ok(Json(wire::RelayAuthResponse {
            address: sig.address,
            signature: sig.signature,
        })
        .into_response())
    }
    .await;
    with_request_id(&rid, result.unwrap_or_else(IntoResponse::into_response))
}

// ---------------------------------------------------------------------------------------------
// Keys and admin

async fn list_keys<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    let rid = request_id(&headers).unwrap_or_default();
    let result: Result<Response, ApiError> = async {
        let Some(Extension(p)) = peer else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "no_client_identity",
                "a client certificate is required",
            ));
        };
        let caller = s.caller(&p.identity, &rid).await?;
        let records = s.store.list_keys(None).await.map_err(store_error)?;
        Ok(Json(key_views(&caller, records)).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn show_key<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let rid = request_id(&headers).unwrap_or_default();
    let result: Result<Response, ApiError> = async {
        let Some(Extension(p)) = peer else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "no_client_identity",
                "a client certificate is required",
            ));
        };
        let caller = s.caller(&p.identity, &rid).await?;
        let kn = store::KeyName::new(&name)
            .map_err(|e| ApiError::bad_request("invalid_key_name", e.to_string()))?;
        let records = s.store.list_keys(Some(kn)).await.map_err(store_error)?;
        key_views(&caller, records)
            .into_iter()
            .next()
            .map(|v| Json(v).into_response())
            .ok_or_else(|| ApiError::not_found("unknown_key", format!("no key {name:?}")))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

fn key_views(caller: &Caller, records: Vec<store::KeyVersionRecord>) -> Vec<wire::KeyView> {
    let all = caller.grants.has(Role::Admin) || caller.grants.has(Role::Auditor);
    let mut views: Vec<wire::KeyView> = Vec::new();
    for r in records.into_iter().rev() {
        let name = r.version.name.to_string();
        if !all && !caller.grants.may_use(&name) {
            continue;
        }
        let v = wire::KeyVersionView {
            version: r.version.to_string(),
            address: r.address,
            status: r.status.state().to_owned(),
            created_at: Quantity(r.created_at.0 / 1000),
            backend: r.key_ref.to_string(),
        };
        match views.iter_mut().find(|k| k.name == name) {
            Some(k) => k.versions.push(v),
            None => views.push(wire::KeyView {
                name,
                paused_until: None,
                rotate_every: r.rotate_every_ms.map(|ms| Quantity(ms / 1000)),
                versions: vec![v],
            }),
        }
    }
    views.sort_by(|a, b| a.name.cmp(&b.name));
    views
}

async fn freeze<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Result<ApiJson<wire::AdminAction>, ApiError>,
) -> Response {
    role_route(&s, peer, &headers, Role::Admin, async |caller, rid| {
        let ApiJson(a) = body?;
        let change = change_by(&caller, &rid, now_ms());
        s.store
            .freeze(a.reason, change)
            .await
            .map_err(store_error)?;
        Ok(Json(json!({ "frozen": true })).into_response())
    })
    .await
}

async fn revoke<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<ApiJson<wire::AdminAction>, ApiError>,
) -> Response {
    role_route(&s, peer, &headers, Role::Admin, async |caller, rid| {
        let ApiJson(a) = body?;
        let kn = store::KeyName::new(&name)
            .map_err(|e| ApiError::bad_request("invalid_key_name", e.to_string()))?;
        let change = change_by(&caller, &rid, now_ms());
        let revoked = s
            .store
            .revoke(kn, a.version, a.reason, change)
            .await
            .map_err(store_error)?;
        // The store refuses the key from now on. Wait for signatures decided before the
        // revocation committed, so that none is made after this answer.
        s.drain_signing(&name).await;
        // Refresh the cache so the hot path stops before reaching the store.
        if let Err(e) = s.self_check().await {
            tracing::warn!(error = %e, "self-check after revocation");
        }
        Ok(
            Json(json!({ "revoked": revoked.iter().map(ToString::to_string).collect::<Vec<_>>() }))
                .into_response(),
        )
    })
    .await
}

/// Re-reads the key registry and re-checks every signable version against its device (after a
/// rotation made with keyctl).
async fn reload_keys<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    role_route(
        &s,
        peer,
        &headers,
        Role::Admin,
        async |_caller, _rid| match s.self_check().await {
            Ok(n) => Ok(Json(json!({ "keys": n })).into_response()),
            Err(problem) => Err(ApiError::unavailable("self_check_failed", problem, 5)),
        },
    )
    .await
}

async fn pause<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<ApiJson<wire::AdminAction>, ApiError>,
) -> Response {
    role_route(&s, peer, &headers, Role::Admin, async |caller, rid| {
        let ApiJson(a) = body?;
        let kn = store::KeyName::new(&name)
            .map_err(|e| ApiError::bad_request("invalid_key_name", e.to_string()))?;
        let now = now_ms();
        // Without a cooldown the pause lasts until an explicit resume.
        let until = match a.cooldown {
            Some(c) => now.plus_ms(c.0.saturating_mul(1000)),
            None => UnixMillis(u64::MAX / 2),
        };
        s.store
            .pause_key(kn, until, a.reason, change_by(&caller, &rid, now))
            .await
            .map_err(store_error)?;
        Ok(Json(json!({ "paused": name, "until": until.0 / 1000 })).into_response())
    })
    .await
}

async fn resume<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    role_route(&s, peer, &headers, Role::Admin, async |caller, rid| {
        let kn = store::KeyName::new(&name)
            .map_err(|e| ApiError::bad_request("invalid_key_name", e.to_string()))?;
        s.store
            .unpause_key(kn, change_by(&caller, &rid, now_ms()))
            .await
            .map_err(store_error)?;
        Ok(Json(json!({ "resumed": name })).into_response())
    })
    .await
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    #[serde(default)]
    since: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn audit_export<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    role_route(&s, peer, &headers, Role::Auditor, async |_caller, _rid| {
        let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
        let records = s
            .store
            .audit_records(
                store::AuditCursor::Seq(q.since.unwrap_or(1)),
                q.limit.unwrap_or(10_000).min(100_000),
            )
            .await
            .map_err(store_error)?;
        let mut out = String::new();
        for r in &records {
            out.push_str(&r.to_json_line());
            out.push('\n');
        }
        Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Budget grants

/// The caller, if it holds one of `roles` (a refusal is audited).
async fn caller_with_any<B: KeyBackend, S: Store>(
    s: &Signer<B, S>,
    peer: Option<Extension<Peer>>,
    rid: &str,
    roles: &[Role],
) -> Result<Caller, ApiError> {
    let Some(Extension(peer)) = peer else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "no_client_identity",
            "a client certificate is required",
        ));
    };
    let caller = s.caller(&peer.identity, rid).await?;
    if roles.iter().any(|r| caller.grants.has(*r)) {
        return Ok(caller);
    }
    let e = ApiError::forbidden(
        "role_required",
        format!(
            "identity {} lacks every role this route accepts ({roles:?})",
            caller.identity
        ),
    );
    s.audit_refusal(rid, caller.identity.as_str(), &e).await;
    Err(e)
}

/// Checks a submitted grant against the policy in force: well formed, not expired, a known key,
/// every signature recovering to a registered approver, and enough of them for at least one
/// approval tier. Each failure has its own stable code.
///
/// # Security
/// A grant only ever lets requests through tiers its signers satisfy (the policy checks that at
/// every evaluation); refusing the others here keeps useless or forged grants out of the store.
pub(super) fn check_grant(
    policy: &policy::Policy,
    sub: &wire::GrantSubmission,
    now_s: u64,
) -> Result<policy::VerifiedGrant, ApiError> {
    let g = &sub.grant;
    let invalid = |m: String| ApiError::bad_request("grant_invalid", m);
    if g.window.0 != 0 {
        return Err(invalid(format!(
            "window {} s: only 0 (the budget covers the whole validity) is supported",
            g.window.0
        )));
    }
    if g.valid_until.0 <= g.valid_from.0 {
        return Err(invalid(format!(
            "validUntil {} is not after validFrom {}",
            g.valid_until.0, g.valid_from.0
        )));
    }
    if g.valid_until.0 <= now_s {
        return Err(ApiError::bad_request(
            "grant_expired",
            format!("the grant expired at {} (now {now_s})", g.valid_until.0),
        ));
    }
    if !policy.has_key(&policy::KeyName::new(&g.key)) {
        return Err(invalid(format!("the policy has no key {:?}", g.key)));
    }
    if g.destinations.is_empty() {
        return Err(invalid("the grant names no destination".into()));
    }
    let typed = policy::BudgetGrant {
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
    };
    let hash = alloy::sol_types::SolStruct::eip712_signing_hash(&typed, policy.approval_domain());
    let mut signatures = Vec::with_capacity(sub.signatures.len());
    for raw in &sub.signatures {
        let sig = Signature::try_from(raw.as_ref())
            .map_err(|e| ApiError::bad_request("invalid_signature", e.to_string()))?;
        match sig.recover_address_from_prehash(&hash) {
            Ok(a) if policy.is_approver(&a) => signatures.push(sig),
            Ok(a) => {
                return Err(ApiError::denied(
                    "grant_unregistered_signer",
                    format!(
                        "a signature of grant {hash} recovers to {a}, which no approver set of \
                         the policy lists"
                    ),
                ));
            }
            Err(e) => {
                return Err(ApiError::denied(
                    "grant_unregistered_signer",
                    format!("a signature of grant {hash} does not recover: {e}"),
                ));
            }
        }
    }
    let signed = policy::SignedGrant {
        grant: typed,
        signatures,
    };
    let verified = policy
        .verify_grant(&signed, now_s)
        .map_err(|e| ApiError::denied("grant_below_threshold", format!("grant {hash}: {e}")))?;
    if policy.grant_tiers(&verified).is_empty() {
        return Err(ApiError::denied(
            "grant_below_threshold",
            format!(
                "grant {hash} is signed by {} registered approver(s); the policy's approval \
                 tiers need at least {}",
                verified.signers().len(),
                policy
                    .lowest_tier_threshold()
                    .map_or_else(|| "a tier (it has none)".to_owned(), |t| t.to_string())
            ),
        ));
    }
    Ok(verified)
}

/// A grant as the store holds it, verified again (at start, against the policy then in force).
pub(super) fn verify_stored_grant(
    policy: &policy::Policy,
    rec: &store::GrantRecord,
    now_s: u64,
) -> Result<policy::VerifiedGrant, ApiError> {
    check_grant(policy, &stored_submission(rec)?, now_s)
}

fn stored_submission(rec: &store::GrantRecord) -> Result<wire::GrantSubmission, ApiError> {
    let grant: wire::GrantBody =
        serde_json::from_value(rec.grant.grant.clone()).map_err(ApiError::internal)?;
    let signatures = rec
        .grant
        .signatures
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["signature"].as_str())
                .filter_map(|h| h.parse::<Bytes>().ok())
                .collect()
        })
        .unwrap_or_default();
    Ok(wire::GrantSubmission { grant, signatures })
}

/// `POST /v1/grants` [approver, admin]: registers a budget grant signed by enough approvers.
async fn submit_grant<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Result<ApiJson<wire::GrantSubmission>, ApiError>,
) -> Response {
    let rid = match request_id(&headers) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let result = async {
        let caller = caller_with_any(&s, peer, &rid, &[Role::Approver, Role::Admin]).await?;
        let refuse = async |e: ApiError| {
            s.audit_refusal(&rid, caller.identity.as_str(), &e).await;
            Err::<Response, ApiError>(e)
        };
        let sub = match body {
            Ok(ApiJson(b)) => b,
            Err(e) => return refuse(e).await,
        };
        let now = now_ms();
        let policy = s.policy();
        let verified = match check_grant(&policy, &sub, now.0 / 1000) {
            Ok(v) => v,
            Err(e) => return refuse(e).await,
        };
        let id = verified.id().to_string();
        let signatures: Vec<Value> = sub
            .signatures
            .iter()
            .filter_map(|raw| {
                let sig = Signature::try_from(raw.as_ref()).ok()?;
                let signer = sig.recover_address_from_prehash(&verified.id()).ok()?;
                Some(json!({ "signer": signer, "signature": raw }))
            })
            .collect();
        let record = store::Grant {
            id: id.clone(),
            grant: serde_json::to_value(&sub.grant).map_err(ApiError::internal)?,
            signatures: Value::Array(signatures),
            created_at: now,
            expires_at: UnixMillis(sub.grant.valid_until.0.saturating_mul(1000)),
        };
        match s
            .store
            .insert_grant(record, change_by(&caller, &rid, now))
            .await
        {
            Ok(()) => {}
            Err(StoreError::Conflict(m)) => {
                return refuse(ApiError::conflict("grant_exists", m)).await;
            }
            Err(e) => return Err(store_error(e)),
        }
        let view = grant_view(&sub.grant, verified.signers().to_vec(), U256::ZERO, id, now);
        s.add_grant(verified, U256::ZERO, now.0 / 1000);
        Ok((StatusCode::CREATED, Json(view?)).into_response())
    }
    .await;
    with_request_id(&rid, result.unwrap_or_else(IntoResponse::into_response))
}

/// `GET /v1/grants` [approver, admin, auditor]: every grant with spent and remaining budget.
async fn list_grants<B: KeyBackend, S: Store>(
    State(s): State<Shared<B, S>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    let rid = match request_id(&headers) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let result: Result<Response, ApiError> = async {
        caller_with_any(
            &s,
            peer,
            &rid,
            &[Role::Approver, Role::Admin, Role::Auditor],
        )
        .await?;
        let now = now_ms();
        let records = s.store.list_grants(None).await.map_err(store_error)?;
        let in_force = s.grants_snapshot();
        let mut grants = Vec::with_capacity(records.len());
        for rec in &records {
            let sub = stored_submission(rec)?;
            let signers = rec
                .grant
                .signatures
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x["signer"].as_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            let mut view = grant_view(&sub.grant, signers, rec.spent, rec.grant.id.clone(), now)?;
            view.active = view.active && in_force.iter().any(|g| g.id() == view.id);
            grants.push(view);
        }
        Ok(Json(wire::GrantList { grants }).into_response())
    }
    .await;
    with_request_id(&rid, result.unwrap_or_else(IntoResponse::into_response))
}

fn grant_view(
    g: &wire::GrantBody,
    signers: Vec<alloy::primitives::Address>,
    spent: U256,
    id: String,
    now: UnixMillis,
) -> Result<wire::GrantView, ApiError> {
    let now_s = now.0 / 1000;
    Ok(wire::GrantView {
        id: id.parse().map_err(ApiError::internal)?,
        grant: g.clone(),
        signers,
        spent: castellan_api::submitter::Wei(spent),
        remaining: castellan_api::submitter::Wei(g.budget.0.saturating_sub(spent)),
        active: g.valid_from.0 <= now_s && now_s < g.valid_until.0,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::collections::BTreeSet;

    /// Every route the router serves is documented, and every documented route is served.
    #[test]
    fn openapi_documents_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        let documented: BTreeSet<String> =
            doc["paths"].as_object().unwrap().keys().cloned().collect();
        let source = include_str!("routes.rs");
        let served: BTreeSet<String> = source
            .match_indices(".route(")
            .filter_map(|(i, _)| {
                let rest = source[i..].split_once('"')?.1;
                Some(rest.split_once('"')?.0.to_owned())
            })
            .filter(|p| p.starts_with('/'))
            .collect();
        assert!(served.len() > 15, "{served:?}");
        assert_eq!(documented, served);
    }
}
