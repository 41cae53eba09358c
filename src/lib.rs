//! securechat: a secure real-time chat server. TLS (rustls), HTTP (hyper),
//! WebSocket (tungstenite), every connection authenticated with a JWT and its
//! Origin checked before the upgrade; rooms with per-message permissions.
//!
//! # Layout
//! The modules follow the path of a connection:
//! - [`config`]: the TOML schema, defaults, `validate()`, the `Secret` type.
//! - [`tls`]: rustls server configuration (aws-lc-rs), client certificates.
//! - [`certs`]: development certificates (`gen-cert`, `serve --dev`).
//! - [`check`]: what `securechat check` reports.
//! - [`server`]: accept loop, connection cap, handshake deadline, shutdown.
//! - [`admission`]: per-address caps, handshake rates, bans; per-user caps.
//! - [`proxy`]: the PROXY protocol header from trusted TCP proxies.
//! - [`prefixed`]: HTTP/1.1 or HTTP/2 by the preface; the stream that
//!   returns the bytes read ahead (and hyper's, after an upgrade).
//! - [`http`]: routes; the upgrade checks (shape, subprotocol, Origin, token).
//! - [`refusal`]: every HTTP refusal and its status, in one place.
//! - [`web`]: the browser client (page and library) with its CSP.
//! - [`auth`]: token verification ([`auth::jwt`]), Origin allow-list
//!   ([`auth::origin`]), where a credential comes from ([`auth::credentials`]).
//! - [`protocol`]: the wire contract: frames, error codes, close codes. Pure.
//! - [`rooms`]: room rules and permission decisions. Pure.
//! - [`session`]: one WebSocket: reader, frame handlers, bounded outbox, writer.
//! - [`hub`]: rooms and members on this node; [`hub::broker`] (sequence,
//!   history, fan-out) underneath, with the in-memory [`hub::memory`] broker.
//! - [`state`]: what all connections share.
//! - [`reload`]: certificate and key rotation (SIGHUP, file changes).
//! - [`dev`]: the zero-configuration `serve --dev` setup.
//! - [`telemetry`]: logging, JSON or text; the audit stream.
//! - [`metrics`]: Prometheus metrics and their listener.
//!
//! [`start`] turns a loaded configuration into a bound [`server::Server`];
//! `Server::run(shutdown)` serves until the shutdown future completes, so
//! tests drive the real server on `127.0.0.1:0`.

pub mod admission;
pub mod auth;
pub mod certs;
pub mod check;
pub mod config;
pub mod dev;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod prefixed;
pub mod protocol;
pub mod proxy;
pub mod refusal;
pub mod reload;
pub mod rooms;
pub mod server;
pub mod session;
pub mod state;
mod sync;
pub mod tally;
pub mod telemetry;
pub mod tls;
pub mod tls_stream;
pub mod web;

use std::sync::Arc;

use auth::jwt::{KeyError, KeyRing};
use config::{Config, ConfigError, TlsMode};
use hub::memory::MemoryBroker;
use state::AppState;
use tls::{TlsError, TlsSetup};

/// Why the server did not start. Each names the setting and the fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{}: {source}", path.display())]
    Tls {
        source: TlsError,
        path: std::path::PathBuf,
    },
    #[error("{}: {source}", path.display())]
    Key {
        source: KeyError,
        path: std::path::PathBuf,
    },
    #[error("{0} (check [broker] in the configuration and that Redis is reachable)")]
    Broker(#[from] hub::redis::RedisStartError),
    #[error("cannot listen on {addr} (server.listen or metrics.listen): {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A configuration with its keys and certificates loaded.
pub struct Prepared {
    pub config: Config,
    pub keys: KeyRing,
    /// `None` when `tls.mode = "off"`.
    pub tls: Option<TlsSetup>,
    /// Whether certificates and keys come from the files the configuration
    /// names, and can be reloaded from them (not so with `--dev`).
    pub from_files: bool,
}

impl Prepared {
    /// Loads every key and certificate the configuration names.
    pub fn load(config: Config) -> Result<Self, StartError> {
        install_crypto_providers();
        let keys = KeyRing::load(&config.auth).map_err(|source| StartError::Key {
            source,
            path: config.source.clone(),
        })?;
        let tls = match config.tls.mode {
            TlsMode::On => Some(tls::load(&config.tls).map_err(|source| StartError::Tls {
                source,
                path: config.source.clone(),
            })?),
            TlsMode::Off => None,
        };
        Ok(Self {
            config,
            keys,
            tls,
            from_files: true,
        })
    }
}

/// Installs aws-lc-rs for rustls and jsonwebtoken (idempotent).
pub fn install_crypto_providers() {
    metrics::install();
    tls::install_default_provider();
    auth::jwt::install_crypto_provider();
}

/// A listening socket on `addr` with the configured backlog (tokio's own
/// `bind` fixes it at 128, which a burst of reconnecting clients overflows).
fn listen(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Binds the listener and builds the shared state.
pub async fn start(prepared: Prepared) -> Result<server::Server, StartError> {
    let Prepared {
        config,
        keys,
        tls,
        from_files,
    } = prepared;
    let addr = config.server.listen;
    let listener = listen(addr, config.server.listen_backlog)
        .map_err(|source| StartError::Bind { addr, source })?;
    if tls.is_none() {
        tracing::warn!(
            event = "tls.off",
            listen = %addr,
            "TLS is off (tls.mode = \"off\"): a proxy in front must terminate TLS"
        );
    }
    let broker: Arc<dyn hub::broker::Broker> = match config.broker.kind {
        config::BrokerKind::Memory => Arc::new(MemoryBroker::new(config.limits.max_rooms)),
        config::BrokerKind::Redis => {
            Arc::new(hub::redis::RedisBroker::connect(&config.broker).await?)
        }
    };
    let hub = hub::Hub::new(
        broker,
        config.limits.outbound_queue_messages,
        config.limits.max_members_per_room,
    );
    let metrics_listener = if config.metrics.enabled {
        let addr = config.metrics.listen;
        Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?,
        )
    } else {
        None
    };
    if let Some(tls) = &tls {
        ::metrics::gauge!("securechat_certificate_expiry_timestamp_seconds")
            .set(tls.leaf.not_after as f64);
    }
    let state = Arc::new(AppState::new(Arc::new(config), keys, hub));
    let (tls_config, certs) = match tls {
        Some(setup) => (
            Some(Arc::new(tls::ServingConfig::new(setup.config))),
            Some(setup.store),
        ),
        None => (None, None),
    };
    let reloader = Arc::new(reload::Reloader::new(
        state.clone(),
        certs,
        tls_config.clone(),
        from_files,
    ));
    Ok(server::Server::new(
        listener,
        metrics_listener,
        state,
        tls_config,
        reloader,
    ))
}
