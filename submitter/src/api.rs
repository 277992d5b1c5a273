//! The submitter's HTTP API (wire types in `castellan_api::submitter`).
//!
//! The caller's identity comes from a request extension ([`CallerIdentity`]). In the binary,
//! [`mtls_router`] sets it from the [`Peer`] that `castellan_api::serve::serve_mtls` puts into
//! every request (the verified client certificate's SAN or CN), looked up in the configured
//! identity table; an identity that is not in the table gets 403 `unknown_identity`. [`router`]
//! leaves it to the caller (in-process tests insert it); a request without one is refused (401).
//! Roles: `signer` to submit; `signer` or `admin` for status, cancel and cancel-by-key; `signer`,
//! `admin` or `auditor` for relay health. `/live` and `/ready` need only the TLS handshake.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use uuid::Uuid;

use castellan_api::serve::Peer;
use castellan_api::submitter::{
    CallerIdentity, CancelByKeyResponse, RelaysResponse, Role, SubmitBundleRequest,
};
use castellan_api::tls::Identity;

use crate::engine::Engine;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// `X-Request-Id`.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Certificate identity → roles at the submitter (`[[identities]]` in `submitter.toml`).
#[derive(Clone, Debug, Default)]
pub struct Identities(Arc<BTreeMap<Identity, Vec<Role>>>);

impl Identities {
    /// The table as configured.
    pub fn new(table: BTreeMap<Identity, Vec<Role>>) -> Self {
        Self(Arc::new(table))
    }

    /// The caller an identity stands for, if it is configured.
    pub fn caller(&self, identity: &Identity) -> Option<CallerIdentity> {
        self.0.get(identity).map(|roles| CallerIdentity {
            id: identity.as_str().to_owned(),
            roles: roles.clone(),
        })
    }
}

/// The API router for in-process use: the caller's [`CallerIdentity`] must already be in the
/// request's extensions. `max_body_bytes` bounds every request body.
pub fn router(engine: Engine, max_body_bytes: usize) -> Router {
    build(engine, max_body_bytes, None)
}

/// The API router behind `serve_mtls`: every `/v1` request's [`Peer`] is resolved through
/// `identities` into a [`CallerIdentity`].
///
/// # Security
/// A request reaches a `/v1` handler only if its certificate identity is configured; an unknown
/// identity gets 403 `unknown_identity` (and a log line with the identity and address), and a
/// request without a `Peer` (not from the mTLS listener) gets 401. A `CallerIdentity` a request
/// might already carry is replaced, never trusted.
pub fn mtls_router(engine: Engine, max_body_bytes: usize, identities: Identities) -> Router {
    build(engine, max_body_bytes, Some(identities))
}

fn build(engine: Engine, max_body_bytes: usize, identities: Option<Identities>) -> Router {
    let mut v1 = Router::new()
        .route("/v1/bundles", post(submit))
        .route("/v1/bundles/{id}", get(status))
        .route("/v1/bundles/{id}/cancel", post(cancel))
        .route("/v1/keys/{key}/cancel", post(cancel_key))
        .route("/v1/relays", get(relays));
    if let Some(identities) = identities {
        let gate = Gate {
            identities,
            metrics: engine.metrics().clone(),
        };
        // Added before /live and /ready, so it wraps the /v1 routes and the 404 fallback only.
        v1 = v1.layer(middleware::from_fn_with_state(gate, identify));
    }
    v1.route("/live", get(|| async { "live" }))
        .route("/ready", get(ready))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn(request_id))
        .with_state(engine)
}

/// The metrics router (`GET /metrics`, Prometheus text), for a separate listener.
pub fn metrics_router(engine: Engine) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(engine): State<Engine>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    engine.metrics().encode(),
                )
            }),
        )
        .with_state(engine)
}

type Caller = Option<Extension<CallerIdentity>>;

fn require(caller: &Caller, roles: &[Role]) -> Result<(), ApiError> {
    let Some(Extension(identity)) = caller else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "no client identity".into(),
        ));
    };
    if roles.iter().any(|r| identity.has_role(*r)) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} may not call this route", identity.id),
        ))
    }
}

async fn submit(
    State(engine): State<Engine>,
    caller: Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    require(&caller, &[Role::Signer])?;
    let request: SubmitBundleRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("malformed_request", e.to_string()))?;
    let (status, created) = engine.submit(request).await?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(status)).into_response())
}

async fn status(
    State(engine): State<Engine>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require(&caller, &[Role::Signer, Role::Admin])?;
    let id = parse_id(&id)?;
    engine
        .lookup(id)
        .await?
        .map(|s| Json(s).into_response())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "bundle_not_found",
                format!("no bundle {id}"),
            )
        })
}

async fn cancel(
    State(engine): State<Engine>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require(&caller, &[Role::Signer, Role::Admin])?;
    let id = parse_id(&id)?;
    Ok(Json(engine.cancel(id).await?).into_response())
}

async fn cancel_key(
    State(engine): State<Engine>,
    caller: Caller,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    require(&caller, &[Role::Signer, Role::Admin])?;
    if key.is_empty() || key.len() > 128 {
        return Err(ApiError::bad_request(
            "invalid_key_name",
            "keyName must be 1..=128 characters".into(),
        ));
    }
    let cancelled = engine.cancel_by_key(&key).await;
    Ok(Json(CancelByKeyResponse { cancelled }).into_response())
}

async fn relays(State(engine): State<Engine>, caller: Caller) -> Result<Response, ApiError> {
    require(&caller, &[Role::Signer, Role::Admin, Role::Auditor])?;
    Ok(Json(RelaysResponse {
        relays: engine.relays_health(),
    })
    .into_response())
}

async fn ready(State(engine): State<Engine>) -> Response {
    if engine.ready() {
        "ready".into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no head seen yet".into(),
        )
        .into_response()
    }
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse()
        .map_err(|_| ApiError::bad_request("malformed_request", format!("{id:?} is not a uuid")))
}

/// State of [`identify`].
#[derive(Clone)]
struct Gate {
    identities: Identities,
    metrics: Metrics,
}

/// Maps the mTLS [`Peer`] to a [`CallerIdentity`], or refuses the request.
async fn identify(
    State(Gate {
        identities,
        metrics,
    }): State<Gate>,
    mut request: Request,
    next: Next,
) -> Response {
    request.extensions_mut().remove::<CallerIdentity>();
    let Some(peer) = request.extensions().get::<Peer>().cloned() else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "no client certificate".into(),
        )
        .into_response();
    };
    match identities.caller(&peer.identity) {
        Some(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        None => {
            metrics.refusal("unknown_identity");
            tracing::warn!(identity = %peer.identity, addr = %peer.addr, "unknown identity refused");
            ApiError::new(
                StatusCode::FORBIDDEN,
                "unknown_identity",
                format!("identity {} is not configured", peer.identity),
            )
            .into_response()
        }
    }
}

/// Accepts `X-Request-Id` (or makes one), logs it with the route, returns it.
async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| Uuid::new_v4().to_string(), str::to_owned);
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    request
        .headers_mut()
        .insert(REQUEST_ID.clone(), value.clone());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    tracing::info!(request_id = %id, %method, %path, status = response.status().as_u16(), "request");
    response.headers_mut().insert(REQUEST_ID.clone(), value);
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    fn peer(identity: &str) -> Peer {
        Peer {
            identity: Identity::new(identity),
            addr: "127.0.0.1:4242".parse().unwrap(),
        }
    }

    /// A router that answers with the caller the middleware resolved.
    fn who(identities: Identities, metrics: &Metrics) -> Router {
        Router::new()
            .route(
                "/who",
                get(|Extension(c): Extension<CallerIdentity>| async move {
                    format!("{} {:?}", c.id, c.roles)
                }),
            )
            .layer(middleware::from_fn_with_state(
                Gate {
                    identities,
                    metrics: metrics.clone(),
                },
                identify,
            ))
    }

    async fn call(router: Router, request: axum::http::Request<Body>) -> (StatusCode, String) {
        let response = router.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn table() -> Identities {
        Identities::new(BTreeMap::from([(
            Identity::new("spiffe://castellan/signer"),
            vec![Role::Signer],
        )]))
    }

    #[tokio::test]
    async fn a_configured_identity_gets_its_roles() {
        let request = axum::http::Request::get("/who")
            .extension(peer("spiffe://castellan/signer"))
            .body(Body::empty())
            .unwrap();
        let (status, body) = call(who(table(), &Metrics::new()), request).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "spiffe://castellan/signer [Signer]");
    }

    #[tokio::test]
    async fn an_unknown_identity_is_refused_even_with_a_forged_caller() {
        let request = axum::http::Request::get("/who")
            .extension(peer("spiffe://castellan/strategy/alpha"))
            .extension(CallerIdentity {
                id: "forged".into(),
                roles: vec![Role::Admin],
            })
            .body(Body::empty())
            .unwrap();
        let metrics = Metrics::new();
        let (status, body) = call(who(table(), &metrics), request).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body.contains("\"unknown_identity\""), "{body}");
        let text = metrics.encode();
        assert!(
            text.contains("castellan_submitter_api_refusals_total{reason=\"unknown_identity\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_request_without_a_peer_is_unauthenticated() {
        let request = axum::http::Request::get("/who")
            .extension(CallerIdentity {
                id: "forged".into(),
                roles: vec![Role::Signer],
            })
            .body(Body::empty())
            .unwrap();
        let (status, body) = call(who(table(), &Metrics::new()), request).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(body.contains("\"unauthenticated\""), "{body}");
    }
}
