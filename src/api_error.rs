//! The REST API's error shape, `{"success":false,"error":{"code","message"}}`, and the codes
//! only HTTP answers use. Requests that carry a WebSocket request's meaning (a bad channel in
//! a publish body) use the WebSocket codes of [`ErrorCode`](crate::protocol::ErrorCode).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use utoipa::ToSchema;

/// Error codes of HTTP answers (beside the WebSocket ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpCode {
    /// No endpoint at that path.
    NotFound,
    /// The path exists, not for that method.
    MethodNotAllowed,
    /// `POST /api/v1/publish` without the publish key.
    Unauthorized,
    /// A WebSocket upgrade beyond `max_connections` (503) or `max_connections_per_ip` (429).
    TooManyConnections,
    /// An IP opening connections faster than `max_connects_per_ip_per_second` (429).
    TooManyConnects,
    /// An `Origin` outside a non-empty `allowed_origins` (403).
    OriginNotAllowed,
    /// A plain HTTP request, or a malformed upgrade, on `/ws` (426 or 400).
    WebsocketUpgradeRequired,
    /// A query parameter missing or malformed (400).
    InvalidParameter,
}

impl HttpCode {
    pub const ALL: [HttpCode; 8] = [
        HttpCode::NotFound,
        HttpCode::MethodNotAllowed,
        HttpCode::Unauthorized,
        HttpCode::TooManyConnections,
        HttpCode::TooManyConnects,
        HttpCode::OriginNotAllowed,
        HttpCode::WebsocketUpgradeRequired,
        HttpCode::InvalidParameter,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HttpCode::NotFound => "NOT_FOUND",
            HttpCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            HttpCode::Unauthorized => "UNAUTHORIZED",
            HttpCode::TooManyConnections => "TOO_MANY_CONNECTIONS",
            HttpCode::TooManyConnects => "TOO_MANY_CONNECTS",
            HttpCode::OriginNotAllowed => "ORIGIN_NOT_ALLOWED",
            HttpCode::WebsocketUpgradeRequired => "WEBSOCKET_UPGRADE_REQUIRED",
            HttpCode::InvalidParameter => "INVALID_PARAMETER",
        }
    }
}

/// The error shape, for the OpenAPI document.
#[derive(ToSchema)]
#[allow(dead_code)] // built as JSON by error_body; described here
pub struct ApiErrorBody {
    /// Always `false`.
    success: bool,
    error: ApiErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ApiErrorDetail {
    /// A code of docs/protocol.md (`NOT_FOUND`, `UNAUTHORIZED`, `INVALID_CHANNEL`, ...).
    code: String,
    /// A sentence saying what to change.
    message: String,
}

/// The API's error response: `status` with the JSON error shape. `message` is a sentence a
/// person can act on, never an internal error's text.
pub fn error_body(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"success": false, "error": {"code": code, "message": message}});
    (status, Json(body)).into_response()
}
