//! The submitter's HTTP API (wire types in `castellan_api::submitter`).
//!
//! The caller's identity comes from a request extension ([`CallerIdentity`]) that the listener
//! sets (the mTLS layer, from the client certificate); a request without one is refused (401).
//! Roles: `signer` for submit, status, cancel and relay health; `signer` or `admin` for
//! cancel-by-key.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use uuid::Uuid;

use castellan_api::submitter::{
    CallerIdentity, CancelByKeyResponse, RelaysResponse, Role, SubmitBundleRequest,
};

use crate::engine::Engine;
use crate::error::ApiError;

/// `X-Request-Id`.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The API router. `max_body_bytes` bounds every request body.
pub fn router(engine: Engine, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/bundles", post(submit))
        .route("/v1/bundles/{id}", get(status))
        .route("/v1/bundles/{id}/cancel", post(cancel))
        .route("/v1/keys/{key}/cancel", post(cancel_key))
        .route("/v1/relays", get(relays))
        .route("/live", get(|| async { "live" }))
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
        .status(id)
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
