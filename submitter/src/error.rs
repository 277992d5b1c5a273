//! Errors: [`Error`] for the library's own failures, [`ApiError`] for what a caller is told.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use castellan_api::submitter::{ErrorBody, ErrorDetail};

/// The submitter library's errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid or unreadable.
    #[error("configuration: {0}")]
    Config(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(String),
    /// An HTTP client could not be built.
    #[error("http client: {0}")]
    Http(String),
    /// The node answered wrongly or not at all.
    #[error("node: {0}")]
    Node(String),
}

/// An error answered to an API caller: a stable code, a one-line message, an HTTP status.
///
/// Internal errors carry their detail only for the log: the caller sees a generic message.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code.
    pub code: &'static str,
    /// One line for a person.
    pub message: String,
    /// Machine-readable details.
    pub details: serde_json::Value,
}

impl ApiError {
    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 500 `internal`; `detail` is logged, not returned.
    pub fn internal(detail: String) -> Self {
        tracing::error!(%detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error".into(),
        )
    }

    /// Any status and code.
    pub fn new(status: StatusCode, code: &'static str, message: String) -> Self {
        Self {
            status,
            code,
            message,
            details: serde_json::Value::Object(serde_json::Map::new()),
        }
    }

    /// Adds details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                details: self.details,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}
