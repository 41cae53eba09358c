//! HTTP routes: the WebSocket endpoint (HTTP/1.1 upgrade and HTTP/2 extended
//! CONNECT), `/healthz` and `/readyz`. Every check on an upgrade request runs
//! here, before any WebSocket exists: request shape, subprotocol, Origin,
//! credential, token.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::info;

use crate::admission::{AddressSlot, UserSlot, client_address};
use crate::auth::Identity;
use crate::auth::credentials::{self, CredentialError, CredentialRules, Source};
use crate::auth::jwt::TokenError;
use crate::config::TlsMode;
use crate::protocol::SUBPROTOCOL;
use crate::refusal::{Refusal, json_response, strict_transport};
use crate::session::{self, ConnMeta};
use crate::state::AppState;

/// Facts about the TCP/TLS connection a request arrived on.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Verified client certificate subject (mTLS), if any.
    pub client_subject: Option<String>,
    /// Set once a request on this connection became a WebSocket; the
    /// handshake deadline no longer applies then.
    pub upgraded: AtomicBool,
    /// What the connection counts against, held until every session on it
    /// has ended.
    pub hold: Arc<ConnHold>,
    /// Upgrade requests seen on this connection: every one after the first
    /// (the streams of an HTTP/2 connection) spends the handshake rate the
    /// first spent at accept.
    pub upgrades: AtomicU32,
}

/// The node-wide connection permit and, for a direct client, its address
/// slot; released when the connection and its sessions are gone.
pub struct ConnHold {
    _permit: OwnedSemaphorePermit,
    _address: Option<AddressSlot>,
}

impl ConnHold {
    pub fn new(permit: OwnedSemaphorePermit, address: Option<AddressSlot>) -> Self {
        Self {
            _permit: permit,
            _address: address,
        }
    }
}

/// The hyper service: one call per request.
pub async fn handle(
    mut req: Request<Incoming>,
    state: Arc<AppState>,
    conn: Arc<ConnInfo>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let mut response = if path == state.config.server.ws_path {
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        let client = client_address(conn.peer.ip(), forwarded, &state.trusted_proxies);
        match upgrade(&mut req, &state, &conn, client) {
            Ok(response) => response,
            Err(refusal) => {
                refused(&state, &conn, client, refusal);
                refusal.response()
            }
        }
    } else if path == "/healthz" {
        json_response(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
    } else if path == "/readyz" {
        if state.is_draining() {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "status": "draining" }),
            )
        } else if !state.hub.broker().is_ready() {
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({ "status": "broker_unavailable" }),
            )
        } else {
            json_response(StatusCode::OK, &serde_json::json!({ "status": "ready" }))
        }
    } else if let Some(response) = state
        .config
        .client
        .enabled
        .then(|| crate::web::serve(req.method(), path, state.config.client.dir.as_deref()))
        .flatten()
    {
        response
    } else {
        Refusal::NotFound.response()
    };
    if state.config.tls.mode == TlsMode::On {
        strict_transport(&mut response);
    }
    Ok(response)
}

/// Logs and counts a refused handshake; a bad token or a foreign Origin
/// counts toward a ban of the client's address.
pub fn refused(state: &AppState, conn: &ConnInfo, client: IpAddr, refusal: Refusal) {
    if matches!(
        refusal,
        Refusal::InvalidToken(_) | Refusal::OriginNotAllowed
    ) {
        state.addresses.record_failure(client, refusal.code());
    }
    metrics::counter!("securechat_handshakes_total", "outcome" => "refused", "reason" => refusal.code())
        .increment(1);
    let detail = match refusal {
        Refusal::InvalidToken(reason)
        | Refusal::BadRequest(reason)
        | Refusal::Forbidden(reason) => reason,
        _ => "",
    };
    let event = match refusal {
        Refusal::InvalidToken(_) | Refusal::TokenExpired | Refusal::MissingToken => {
            metrics::counter!("securechat_auth_failures_total", "reason" => refusal.code())
                .increment(1);
            "auth.failed"
        }
        Refusal::OriginNotAllowed => "origin.refused",
        _ => "handshake.refused",
    };
    info!(event, peer = %conn.peer, client = %client, reason = refusal.code(), detail, "handshake refused");
}

/// Which kind of WebSocket handshake a request is.
enum Handshake {
    /// HTTP/1.1 `Upgrade: websocket` with its `Sec-WebSocket-Key`.
    Http1 { key: HeaderValue },
    /// HTTP/2 extended CONNECT with `:protocol = websocket` (RFC 8441).
    Http2,
}

fn has_token(value: Option<&HeaderValue>, token: &str) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn handshake_kind(req: &Request<Incoming>) -> Result<Handshake, Refusal> {
    let headers = req.headers();
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return Err(Refusal::BadRequest(
            "not a WebSocket handshake: Sec-WebSocket-Version 13 is required",
        ));
    }
    if req.version() == Version::HTTP_2 {
        let protocol = req.extensions().get::<hyper::ext::Protocol>();
        if req.method() == Method::CONNECT && protocol.is_some_and(|p| p.as_str() == "websocket") {
            return Ok(Handshake::Http2);
        }
        return Err(Refusal::BadRequest(
            "not a WebSocket handshake: use extended CONNECT with :protocol websocket",
        ));
    }
    if req.method() != Method::GET
        || !has_token(headers.get(header::CONNECTION), "upgrade")
        || !has_token(headers.get(header::UPGRADE), "websocket")
    {
        return Err(Refusal::BadRequest(
            "not a WebSocket handshake: GET with Connection: Upgrade and Upgrade: websocket",
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(k.as_bytes())
                .is_ok_and(|d| d.len() == 16)
        })
        .ok_or(Refusal::BadRequest(
            "not a WebSocket handshake: Sec-WebSocket-Key is missing or malformed",
        ))?;
    Ok(Handshake::Http1 { key: key.clone() })
}

/// Checks an upgrade request and, when every check passes, answers it and
/// starts the session once hyper hands over the connection.
fn upgrade(
    req: &mut Request<Incoming>,
    state: &Arc<AppState>,
    conn: &Arc<ConnInfo>,
    client: IpAddr,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let kind = handshake_kind(req)?;
    if state.is_draining() {
        return Err(Refusal::ShuttingDown);
    }
    // Behind a trusted proxy the client is known only now; a direct client
    // was admitted at accept, and a ban earned since stops it here. Its
    // further upgrades on the connection (HTTP/2 streams, each a token
    // verification) spend the handshake rate as new connections would.
    let first = conn.upgrades.fetch_add(1, Ordering::Relaxed) == 0;
    let address = if state.is_trusted_proxy(conn.peer.ip()) {
        Some(state.addresses.admit(client)?)
    } else if !first {
        state.addresses.spend_handshake(client)?;
        None
    } else if state.addresses.is_banned(client) {
        return Err(Refusal::RateLimited);
    } else {
        None
    };
    let (identity, source) = authenticate(req, state)?;
    let user = state.users.admit(&identity.sub)?;

    let meta = ConnMeta {
        peer: conn.peer,
        client,
        client_subject: conn.client_subject.clone(),
        credential_source: source.as_str(),
        http_version: match kind {
            Handshake::Http1 { .. } => "http/1.1",
            Handshake::Http2 => "h2",
        },
    };
    start_session(req, state, conn, identity, meta, (address, user));
    metrics::counter!("securechat_handshakes_total", "outcome" => "accepted", "reason" => "")
        .increment(1);

    let mut response = Response::new(Full::new(Bytes::new()));
    if let Handshake::Http1 { key } = &kind {
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let accept = derive_accept_key(key.as_bytes());
        // The accept key is base64, always a valid header value.
        if let Ok(value) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
        }
    }
    response.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    Ok(response)
}

/// Subprotocol, Origin and credential checks, in the contract's order.
fn authenticate(req: &Request<Incoming>, state: &AppState) -> Result<(Identity, Source), Refusal> {
    let headers = req.headers();
    if !credentials::offers_protocol(headers) {
        return Err(Refusal::BadRequest(
            "offer the securechat.v1 subprotocol (Sec-WebSocket-Protocol)",
        ));
    }
    let has_origin = match headers.get(header::ORIGIN) {
        Some(origin) => {
            let allowed = origin.to_str().is_ok_and(|o| state.origins.allows(o));
            if !allowed {
                return Err(Refusal::OriginNotAllowed);
            }
            true
        }
        None => false,
    };
    let auth = &state.config.auth;
    let rules = CredentialRules {
        cookie: auth.cookie,
        query: auth.allow_query_token,
    };
    let credential =
        credentials::extract(headers, req.uri().query(), rules).map_err(|e| match e {
            CredentialError::Missing => Refusal::MissingToken,
            CredentialError::Refused(reason) => Refusal::InvalidToken(reason),
        })?;
    // A browser attaches cookies to cross-site requests by itself; without
    // an Origin to check, only credentials a script had to set are accepted.
    if !has_origin && !matches!(credential.source, Source::Header | Source::Subprotocol) {
        return Err(Refusal::OriginNotAllowed);
    }
    let identity = state
        .keys
        .load()
        .verify(&credential.token)
        .map_err(|e| match e {
            TokenError::Expired => Refusal::TokenExpired,
            other => Refusal::InvalidToken(other.reason()),
        })?;
    Ok((identity, credential.source))
}

fn start_session(
    req: &mut Request<Incoming>,
    state: &Arc<AppState>,
    conn: &Arc<ConnInfo>,
    identity: Identity,
    meta: ConnMeta,
    (address, user): (Option<AddressSlot>, UserSlot),
) {
    let on_upgrade = hyper::upgrade::on(req);
    conn.upgraded.store(true, Ordering::Release);
    // Boxed: the task holds one pointer to it, not a copy of every field
    // for the whole life of the session.
    let start = Box::new(session::Start {
        identity,
        meta,
        user,
        state: state.clone(),
        hold: session::SessionHold {
            connection: conn.hold.clone(),
            address,
        },
    });
    state.tasks.spawn(session::run(on_upgrade, start));
}
