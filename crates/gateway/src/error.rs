//! One error enum for every handler, mapped to an HTTP status and an OpenAI-shaped body
//! (`{"error": {"message", "type", "param", "code"}}`), or an Anthropic-shaped one
//! (`{"type": "error", "error": {"type", "message"}}`) on `/v1/messages`. Internal causes go to
//! the log, not to the client.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::backend::BackendError;

#[non_exhaustive]
#[derive(Clone, Debug, PartialEq)]
pub enum ApiError {
    /// 400: malformed JSON, unknown fields, wrong types, values out of range.
    InvalidRequest { message: String, param: Option<String>, code: Option<&'static str> },
    /// 401: missing, unknown or revoked API key.
    Unauthorized(String),
    /// 404: unknown model or route.
    NotFound { message: String, code: &'static str },
    /// 413: request body over the limit.
    PayloadTooLarge(String),
    /// 429: the key's token bucket is empty.
    RateLimited { retry_after_s: u64 },
    /// 503: every session slot and queue place is taken.
    Overloaded(String),
    /// 503: the model has no available backend (no complete ring).
    Unavailable(String),
    /// 500: a bug or a backend failure; details are logged, not returned.
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError::InvalidRequest { message: message.into(), param: param.map(str::to_string), code: None }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Overloaded(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::InvalidRequest { message, .. }
            | ApiError::Unauthorized(message)
            | ApiError::NotFound { message, .. }
            | ApiError::PayloadTooLarge(message)
            | ApiError::Overloaded(message)
            | ApiError::Unavailable(message) => message.clone(),
            ApiError::RateLimited { retry_after_s } => {
                format!("rate limit exceeded for this API key; retry in {retry_after_s} s")
            }
            ApiError::Internal(_) => "internal error".into(),
        }
    }

    /// OpenAI's `type` and `code` fields.
    fn openai_type_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ApiError::InvalidRequest { code, .. } => ("invalid_request_error", *code),
            ApiError::Unauthorized(_) => ("authentication_error", Some("invalid_api_key")),
            ApiError::NotFound { code, .. } => ("invalid_request_error", Some(code)),
            ApiError::PayloadTooLarge(_) => ("invalid_request_error", Some("request_too_large")),
            ApiError::RateLimited { .. } => ("rate_limit_error", Some("rate_limit_exceeded")),
            ApiError::Overloaded(_) => ("overloaded_error", Some("overloaded")),
            ApiError::Unavailable(_) => ("service_unavailable_error", Some("model_unavailable")),
            ApiError::Internal(_) => ("server_error", None),
        }
    }

    fn anthropic_type(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. } => "invalid_request_error",
            ApiError::Unauthorized(_) => "authentication_error",
            ApiError::NotFound { .. } => "not_found_error",
            ApiError::PayloadTooLarge(_) => "request_too_large",
            ApiError::RateLimited { .. } => "rate_limit_error",
            ApiError::Overloaded(_) | ApiError::Unavailable(_) => "overloaded_error",
            ApiError::Internal(_) => "api_error",
        }
    }

    /// The body as a JSON value (OpenAI shape).
    pub fn openai_body(&self) -> serde_json::Value {
        let (ty, code) = self.openai_type_code();
        let param = match self {
            ApiError::InvalidRequest { param, .. } => param.clone(),
            _ => None,
        };
        json!({"error": {"message": self.message(), "type": ty, "param": param, "code": code}})
    }

    pub fn anthropic_body(&self) -> serde_json::Value {
        json!({"type": "error", "error": {"type": self.anthropic_type(), "message": self.message()}})
    }

    fn respond(&self, body: serde_json::Value) -> Response {
        if let ApiError::Internal(cause) = self {
            eprintln!("gateway: internal error: {cause}");
        }
        let mut r = (self.status(), axum::Json(body)).into_response();
        if let ApiError::RateLimited { retry_after_s } = self {
            r.headers_mut().insert("retry-after", HeaderValue::from(*retry_after_s));
        }
        r
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.respond(self.openai_body())
    }
}

/// An [`ApiError`] answered in Anthropic's shape.
#[derive(Debug)]
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        AnthropicError(e)
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        self.0.respond(self.0.anthropic_body())
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::UnknownModel(m) => {
                ApiError::NotFound { message: format!("the model {m:?} does not exist"), code: "model_not_found" }
            }
            BackendError::Unavailable(m) => ApiError::Unavailable(format!("model {m:?} has no available backend")),
            e @ BackendError::ContextExceeded { .. } => ApiError::InvalidRequest {
                message: e.to_string(),
                param: Some("messages".into()),
                code: Some("context_length_exceeded"),
            },
            BackendError::Invalid(m) => ApiError::invalid(m, None),
            e => ApiError::Internal(e.to_string()),
        }
    }
}
