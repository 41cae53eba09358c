//! Every refusal before the upgrade, mapped to its HTTP status and JSON body
//! in one place: `{"error": CODE, "message": TEXT}`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

/// Why a request did not become a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a valid WebSocket upgrade; the text says what is wrong.
    BadRequest(&'static str),
    /// No credential offered.
    MissingToken,
    /// A credential that does not verify; the text is a short log reason.
    InvalidToken(&'static str),
    /// The token's `exp` has passed.
    TokenExpired,
    /// `Origin` not on the allow-list, or missing where it is required.
    OriginNotAllowed,
    /// Refused for another reason (client certificate, ban).
    Forbidden(&'static str),
    /// Per-IP cap reached.
    TooManyConnections,
    /// Handshake rate or temporary ban.
    RateLimited,
    /// Node-wide connection cap reached.
    OverCapacity,
    /// Draining for shutdown.
    ShuttingDown,
    /// No such path.
    NotFound,
    /// A method the path does not serve.
    MethodNotAllowed,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::MissingToken | Self::InvalidToken(_) | Self::TokenExpired => {
                StatusCode::UNAUTHORIZED
            }
            Self::OriginNotAllowed | Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::TooManyConnections | Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::OverCapacity | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The contract's code, also the `reason` label in metrics and logs.
    pub fn code(self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::MissingToken => "missing_token",
            Self::InvalidToken(_) => "invalid_token",
            Self::TokenExpired => "token_expired",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::Forbidden(_) => "forbidden",
            Self::TooManyConnections => "too_many_connections",
            Self::RateLimited => "rate_limited",
            Self::OverCapacity => "over_capacity",
            Self::ShuttingDown => "shutting_down",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
        }
    }

    /// Human text for the body. Never contains the token.
    pub fn message(self) -> &'static str {
        match self {
            Self::BadRequest(text) => text,
            Self::MissingToken => {
                "no token: send Authorization: Bearer <jwt> or the securechat.bearer.<jwt> subprotocol"
            }
            Self::InvalidToken(_) => "the token is not valid",
            Self::TokenExpired => "the token has expired",
            Self::OriginNotAllowed => "this origin may not open a connection",
            Self::Forbidden(text) => text,
            Self::TooManyConnections => {
                "too many open connections from this address or for this user"
            }
            Self::RateLimited => "too many attempts: try again later",
            Self::OverCapacity => "the server is at capacity: try again later",
            Self::ShuttingDown => "the server is shutting down: reconnect",
            Self::NotFound => "no such path",
            Self::MethodNotAllowed => "this path serves GET and HEAD only",
        }
    }

    pub fn response(self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({ "error": self.code(), "message": self.message() });
        let mut response = json_response(self.status(), &body);
        let headers = response.headers_mut();
        // One refusal per connection: a refused client cannot keep trying
        // tokens on a kept-alive HTTP/1.1 connection.
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        match self {
            Self::MissingToken => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"securechat\""),
                );
            }
            Self::InvalidToken(_) | Self::TokenExpired => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            Self::OverCapacity
            | Self::ShuttingDown
            | Self::RateLimited
            | Self::TooManyConnections => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        response
    }
}

/// A JSON response with the headers every answer carries.
/// HSTS for every response over TLS: two years, the value browsers' preload
/// lists ask for. Only the host itself: subdomains may serve other things.
pub const STRICT_TRANSPORT_SECURITY: &str = "max-age=63072000";

/// Marks a response sent over TLS with [`STRICT_TRANSPORT_SECURITY`].
pub fn strict_transport<B>(response: &mut Response<B>) {
    response.headers_mut().insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static(STRICT_TRANSPORT_SECURITY),
    );
}

pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}
