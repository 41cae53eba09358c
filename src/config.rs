//! The TOML configuration: schema, defaults, validation and secrets.
//!
//! Every section rejects unknown keys. [`Config::load`] parses a file, resolves
//! relative paths against the file's directory, and runs [`Config::validate`],
//! whose errors name the key and say what to do. Loading key and certificate
//! files is left to [`crate::tls`] and [`crate::auth::jwt`], so `check` can report
//! on each separately.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::rooms::RoomPattern;

/// A configuration problem: which file, which key, what is wrong and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (pass an existing file with --config)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listen address, WebSocket path, handshake and shutdown deadlines.
    #[serde(default)]
    pub server: ServerConfig,
    /// Certificate chain, key, client certificates.
    pub tls: TlsConfig,
    /// Token verification keys and rules.
    pub auth: AuthConfig,
    /// Origin allow-list.
    #[serde(default)]
    pub security: SecurityConfig,
    /// Bounds on connections, frames, queues and rates.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Token expiry handling on open sessions.
    #[serde(default)]
    pub session: SessionConfig,
    /// Direct-message rooms `dm:<a>:<b>`.
    #[serde(default)]
    pub dm: DmConfig,
    /// Temporary bans of addresses that keep failing handshakes.
    #[serde(default)]
    pub bans: BansConfig,
    /// The rooms users may join, with their permissions.
    #[serde(default)]
    pub rooms: Vec<RoomConfig>,
    /// Log format and level, audit stream.
    #[serde(default)]
    pub log: LogConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The browser client the server serves.
    #[serde(default)]
    pub client: ClientConfig,
    /// Where sequence, history and fan-out live: this node, or Redis.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// The file this was read from, for error messages; set by [`Config::load`].
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Path of the WebSocket endpoint.
    pub ws_path: String,
    /// Deadline from TCP accept to a finished upgrade (TLS and HTTP together).
    pub handshake_timeout_ms: u64,
    /// How long shutdown waits for sessions to close before it stops anyway.
    pub shutdown_grace_ms: u64,
    /// Allow binding a non-loopback address while `tls.mode = "off"`.
    pub allow_plaintext_public: bool,
    /// Proxies (addresses or CIDR ranges) whose `X-Forwarded-For` names the
    /// client. From any other peer the header is ignored.
    pub trusted_proxies: Vec<String>,
    /// Connections from `trusted_proxies` start with a PROXY protocol header
    /// (v1 or v2) naming the client.
    pub proxy_protocol: bool,
    /// Connections the kernel may hold before they are accepted (the
    /// `listen(2)` backlog; the kernel caps it at `net.core.somaxconn`).
    pub listen_backlog: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            ws_path: "/ws".into(),
            handshake_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            allow_plaintext_public: false,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            listen_backlog: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BansConfig {
    /// Whether failing addresses are banned at all.
    pub enabled: bool,
    /// Failed handshakes (bad token, foreign Origin, refused client
    /// certificate) within `window_secs` that earn a ban.
    pub max_failures: u32,
    /// The window in which failures are counted.
    pub window_secs: u64,
    /// How long a ban lasts.
    pub ban_secs: u64,
    /// Addresses tracked at once (failures, bans, per-address caps).
    pub max_tracked: usize,
    /// Addresses or CIDR ranges that are never banned.
    pub allow: Vec<String>,
}

impl Default for BansConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_failures: 10,
            window_secs: 60,
            ban_secs: 300,
            max_tracked: 100_000,
            allow: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// The server terminates TLS itself (the default).
    #[default]
    On,
    /// A proxy in front terminates TLS; the server speaks plain HTTP.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// Client certificates are not asked for.
    #[default]
    Off,
    /// Asked for, verified when sent, not required.
    Optional,
    /// Required: a handshake without a valid client certificate fails.
    Required,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Whether this server terminates TLS.
    #[serde(default)]
    pub mode: TlsMode,
    /// PEM certificate chain, leaf first.
    pub cert: Option<PathBuf>,
    /// PEM private key of the leaf certificate.
    pub key: Option<PathBuf>,
    /// Client certificate policy.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// PEM bundle of CAs that issue client certificates.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum KeyAlgorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl KeyAlgorithm {
    /// HMAC algorithms take a shared secret; the others a public key.
    pub fn is_hmac(self) -> bool {
        matches!(self, Self::HS256 | Self::HS384 | Self::HS512)
    }
}

/// One token verification key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Key id matched against the token header's `kid`.
    pub kid: String,
    /// The one algorithm this key verifies.
    pub algorithm: KeyAlgorithm,
    /// File holding the HMAC secret (HS* keys).
    pub secret_file: Option<PathBuf>,
    /// Environment variable holding the HMAC secret (HS* keys).
    pub secret_env: Option<String>,
    /// PEM public key (RS*, PS*, ES*, EdDSA keys).
    pub public_key_file: Option<PathBuf>,
    /// PEM private key, used only by `securechat token` to mint tokens.
    pub private_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Verification keys, selected by `kid`.
    pub keys: Vec<KeyConfig>,
    /// Required `iss` claim, when set.
    pub issuer: Option<String>,
    /// Required `aud` claim (one of), when set.
    #[serde(default)]
    pub audience: Vec<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Tokens longer than this are refused without being parsed.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Accept the `securechat_token` cookie.
    #[serde(default)]
    pub cookie: bool,
    /// Accept `?token=` in the URL (off: URLs end up in logs).
    #[serde(default)]
    pub allow_query_token: bool,
}

fn default_leeway() -> u64 {
    30
}
fn default_max_token_bytes() -> usize {
    4096
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// Origins allowed to open a WebSocket: `scheme://host[:port]` or
    /// `https://*.example.com`.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open connections on this node; over it the handshake gets 503.
    pub max_connections: usize,
    /// Open connections from one client address (IPv6: one /64); over it 429.
    pub max_connections_per_ip: usize,
    /// Handshakes per second from one client address (sustained); over it 429.
    pub handshake_rate_per_ip: u32,
    /// Handshakes from one client address in a burst.
    pub handshake_burst_per_ip: u32,
    /// Open connections of one user (`sub`) on this node; over it 429.
    pub max_connections_per_user: usize,
    /// Members of one room on this node.
    pub max_members_per_room: usize,
    /// Largest application message (bytes, after reassembly).
    pub max_message_bytes: usize,
    /// Largest single WebSocket frame.
    pub max_frame_bytes: usize,
    /// Fragments one message may arrive in.
    pub max_fragments_per_message: u32,
    /// Per-connection read buffer for client frames (grows for a larger
    /// message while it is read).
    pub read_buffer_bytes: usize,
    /// Per-connection write buffer before a flush is forced.
    pub write_buffer_bytes: usize,
    /// Hard cap on a connection's unflushed write buffer.
    pub max_write_buffer_bytes: usize,
    /// Messages waiting for one connection before it is closed as slow (4009).
    pub outbound_queue_messages: usize,
    /// Bytes waiting for one connection before it is closed as slow (4009).
    pub outbound_queue_bytes: usize,
    /// The kernel's send buffer for each client socket (`SO_SNDBUF`); 0
    /// leaves the kernel's default (grown by autotuning, up to
    /// `net.ipv4.tcp_wmem`'s maximum, 4 MiB on most systems).
    pub socket_send_buffer_bytes: usize,
    /// Rooms one connection may be in at once.
    pub max_rooms_per_connection: usize,
    /// Messages per second one connection may send (sustained).
    pub rate_per_sec: u32,
    /// Messages one connection may send in a burst.
    pub burst: u32,
    /// Messages per second one user may send across all their connections.
    pub user_rate_per_sec: u32,
    /// Messages one user may send in a burst across all their connections.
    pub user_burst: u32,
    /// Rate-limit violations tolerated within one window before closing with 4008.
    pub rate_strikes: u32,
    /// The window for `rate_strikes`.
    pub rate_strike_window_secs: u64,
    /// Invalid frames tolerated before closing with 1008.
    pub max_invalid_frames: u32,
    /// Rooms the node keeps history for at once.
    pub max_rooms: usize,
    /// Concurrent HTTP/2 streams (WebSockets) on one connection.
    pub h2_max_streams: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_ip: 64,
            handshake_rate_per_ip: 10,
            handshake_burst_per_ip: 30,
            max_connections_per_user: 16,
            max_members_per_room: 10_000,
            max_message_bytes: 16 * 1024,
            max_frame_bytes: 16 * 1024,
            max_fragments_per_message: 64,
            read_buffer_bytes: 128,
            write_buffer_bytes: 0,
            max_write_buffer_bytes: 64 * 1024,
            outbound_queue_messages: 256,
            outbound_queue_bytes: 1024 * 1024,
            socket_send_buffer_bytes: 256 * 1024,
            max_rooms_per_connection: 32,
            rate_per_sec: 20,
            burst: 40,
            user_rate_per_sec: 40,
            user_burst: 80,
            rate_strikes: 10,
            rate_strike_window_secs: 10,
            max_invalid_frames: 10,
            max_rooms: 10_000,
            h2_max_streams: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// How long before the token's `exp` the server sends `session_expiring`.
    pub expiry_warning_secs: u64,
    /// How long the server waits for the client's close reply before dropping it.
    pub close_timeout_ms: u64,
    /// How often the server sends a WebSocket ping.
    pub ping_interval_secs: u64,
    /// Nothing received for this long (not even a pong): closed with 4010.
    pub read_timeout_secs: u64,
    /// No frame but `ping` for this long: closed with 4010, whatever the token.
    pub idle_timeout_secs: u64,
    /// A writer whose last write carried at least `write_coalesce_frames`
    /// frames writes again no sooner than this after that write began (0:
    /// never waits).
    pub write_coalesce_ms: u64,
    /// The batch size that tells a writer its connection is busy.
    pub write_coalesce_frames: usize,
    /// Holds begin only once the process uses at least this share of its
    /// workers' CPU time, and end below a third of it (0: whatever the load).
    pub write_coalesce_busy_percent: u8,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            expiry_warning_secs: 60,
            close_timeout_ms: 2_000,
            ping_interval_secs: 20,
            read_timeout_secs: 60,
            idle_timeout_secs: 3600,
            write_coalesce_ms: 20,
            write_coalesce_frames: 8,
            write_coalesce_busy_percent: 90,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DmConfig {
    /// Whether `dm:<a>:<b>` rooms exist.
    pub enabled: bool,
    /// Messages kept per direct-message room for `since` recovery.
    pub history: usize,
    /// Direct messages older than this leave the history.
    pub history_max_age_secs: u64,
}

impl Default for DmConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            history: 100,
            history_max_age_secs: 7 * 86_400,
        }
    }
}

/// One `[[rooms]]` entry: a room name or a `prefix-*` pattern.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomConfig {
    /// Exact room name or a pattern ending in `*`.
    pub name: String,
    /// Roles that may join (`"*"`: any authenticated user).
    #[serde(default = "any_role")]
    pub join: Vec<String>,
    /// Roles that may post.
    #[serde(default = "any_role")]
    pub post: Vec<String>,
    /// Roles that may delete others' messages and kick.
    #[serde(default = "moderator_roles")]
    pub moderate: Vec<String>,
    /// Messages kept for `since` recovery.
    #[serde(default = "default_history")]
    pub history: usize,
    /// Messages older than this leave the history.
    #[serde(default = "default_history_age")]
    pub history_max_age_secs: u64,
    /// Only end-to-end encrypted (`enc`) payloads are accepted.
    #[serde(default)]
    pub e2e: bool,
    /// Only tokens whose `amr` contains `mfa` may join.
    #[serde(default)]
    pub require_mfa: bool,
}

fn any_role() -> Vec<String> {
    vec!["*".into()]
}
fn moderator_roles() -> Vec<String> {
    vec!["admin".into(), "moderator".into()]
}
fn default_history() -> usize {
    100
}
fn default_history_age() -> u64 {
    7 * 86_400
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// One node: sequence and history in memory.
    #[default]
    Memory,
    /// Several nodes sharing rooms through Redis.
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub kind: BrokerKind,
    /// `redis://host:port/db` or `rediss://` (TLS); no password here.
    pub url: String,
    /// Environment variable holding the Redis password (AUTH), if any.
    pub password_env: Option<String>,
    /// File holding the Redis password, if any.
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the cluster secret that signs bus messages.
    pub secret_env: Option<String>,
    /// File holding the cluster secret.
    pub secret_file: Option<PathBuf>,
    /// Prefix of every Redis key and channel.
    pub key_prefix: String,
    /// Connecting to Redis gives up after this long.
    pub connect_timeout_ms: u64,
    /// A Redis command gives up after this long.
    pub response_timeout_ms: u64,
    /// Longest wait between reconnection attempts.
    pub max_backoff_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            kind: BrokerKind::Memory,
            url: "redis://127.0.0.1:6379/0".into(),
            password_env: None,
            password_file: None,
            secret_env: None,
            secret_file: None,
            key_prefix: "securechat".into(),
            connect_timeout_ms: 2_000,
            response_timeout_ms: 2_000,
            max_backoff_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// Whether the chat page and client library are served at `/`.
    pub enabled: bool,
    /// Serve the client files from this folder instead of the embedded copies.
    pub dir: Option<PathBuf>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Whether `/metrics` is served at all.
    pub enabled: bool,
    /// Where `/metrics` listens: loopback by default, never the public port.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stdout is not a terminal, text when it is.
    #[default]
    Auto,
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `securechat=debug,info`.
    pub level: String,
    /// Also write the audit stream (moderation and security actions) as
    /// JSON lines to this file, created with mode 0600.
    pub audit_file: Option<PathBuf>,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            level: "info".into(),
            audit_file: None,
        }
    }
}

/// Upper bounds that validation enforces, so a typo cannot disable a limit.
pub mod bounds {
    pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
    pub const MAX_QUEUE_MESSAGES: usize = 65_536;
    pub const MAX_QUEUE_BYTES: usize = 64 * 1024 * 1024;
    pub const MAX_HISTORY: usize = 100_000;
    pub const MAX_TOKEN_BYTES: usize = 64 * 1024;
    pub const MAX_CONNECTIONS: usize = 1_000_000;
    pub const MAX_ROOMS_PER_CONNECTION: usize = 10_000;
    pub const MAX_TIMEOUT_MS: u64 = 10 * 60 * 1000;
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        config.source = path.to_owned();
        Ok(config)
    }

    /// Makes relative file paths relative to `base` (the config file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut Option<PathBuf>| {
            if let Some(path) = p.as_mut()
                && path.is_relative()
            {
                *path = base.join(&*path);
            }
        };
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        fix(&mut self.tls.client_ca);
        fix(&mut self.log.audit_file);
        fix(&mut self.client.dir);
        fix(&mut self.broker.password_file);
        fix(&mut self.broker.secret_file);
        for key in &mut self.auth.keys {
            fix(&mut key.secret_file);
            fix(&mut key.public_key_file);
            fix(&mut key.private_key_file);
        }
    }

    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Checks every setting that can be checked without reading other files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_server()?;
        self.validate_tls()?;
        self.validate_auth()?;
        for (i, origin) in self.security.allowed_origins.iter().enumerate() {
            crate::auth::origin::OriginPattern::parse(origin).map_err(|e| {
                self.invalid(format!("security.allowed_origins[{i}]"), e.to_string())
            })?;
        }
        self.validate_limits()?;
        self.validate_rooms()?;
        self.validate_broker()?;
        if self.metrics.enabled
            && self.metrics.listen.port() != 0
            && self.metrics.listen == self.server.listen
        {
            return Err(self.invalid(
                "metrics.listen",
                "must differ from server.listen: metrics stay off the public port",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            self.invalid(
                "log.level",
                format!("{e}; use a level such as \"info\" or \"securechat=debug,info\""),
            )
        })?;
        Ok(())
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if !s.ws_path.starts_with('/') || s.ws_path.contains(['?', '#', ' ']) {
            return Err(self.invalid(
                "server.ws_path",
                "must be an absolute URL path such as \"/ws\"",
            ));
        }
        if s.ws_path == "/healthz" || s.ws_path == "/readyz" {
            return Err(self.invalid("server.ws_path", "collides with a health endpoint"));
        }
        if !(1..=65_535).contains(&s.listen_backlog) {
            return Err(self.invalid("server.listen_backlog", "must be between 1 and 65535"));
        }
        for (key, value) in [
            ("server.handshake_timeout_ms", s.handshake_timeout_ms),
            ("server.shutdown_grace_ms", s.shutdown_grace_ms),
        ] {
            if value == 0 || value > bounds::MAX_TIMEOUT_MS {
                return Err(self.invalid(
                    key,
                    format!("must be between 1 and {} ms", bounds::MAX_TIMEOUT_MS),
                ));
            }
        }
        Ok(())
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        let t = &self.tls;
        match t.mode {
            TlsMode::On => {
                if t.cert.is_none() {
                    return Err(self.invalid(
                        "tls.cert",
                        "missing: set it to a PEM certificate chain (see `securechat gen-cert`)",
                    ));
                }
                if t.key.is_none() {
                    return Err(self.invalid("tls.key", "missing: set it to the PEM private key"));
                }
            }
            TlsMode::Off => {
                if t.client_auth != ClientAuth::Off {
                    return Err(self.invalid(
                        "tls.client_auth",
                        "client certificates need tls.mode = \"on\"",
                    ));
                }
                if !self.server.listen.ip().is_loopback() && !self.server.allow_plaintext_public {
                    return Err(self.invalid(
                        "server.listen",
                        "tls.mode = \"off\" binds loopback only; set server.allow_plaintext_public = true if a TLS proxy guards this address",
                    ));
                }
            }
        }
        match (t.client_auth, &t.client_ca) {
            (ClientAuth::Off, Some(_)) => Err(self.invalid(
                "tls.client_ca",
                "set but tls.client_auth is \"off\": set client_auth to \"optional\" or \"required\", or remove client_ca",
            )),
            (ClientAuth::Optional | ClientAuth::Required, None) => Err(self.invalid(
                "tls.client_ca",
                "missing: client_auth needs the PEM bundle of CAs that issue client certificates",
            )),
            _ => Ok(()),
        }
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        if a.keys.is_empty() {
            return Err(self.invalid(
                "auth.keys",
                "no verification key: add at least one [[auth.keys]] entry",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, k) in a.keys.iter().enumerate() {
            let key = |field: &str| format!("auth.keys[{i}].{field}");
            if k.kid.is_empty() || k.kid.len() > 128 {
                return Err(self.invalid(key("kid"), "must be 1 to 128 characters"));
            }
            if !seen.insert(k.kid.as_str()) {
                return Err(self.invalid(key("kid"), format!("duplicate kid {:?}", k.kid)));
            }
            if k.algorithm.is_hmac() {
                if k.secret_file.is_some() == k.secret_env.is_some() {
                    return Err(self.invalid(
                        key("secret_file"),
                        "an HMAC key needs exactly one of secret_file or secret_env",
                    ));
                }
                if k.public_key_file.is_some() || k.private_key_file.is_some() {
                    return Err(self.invalid(
                        key("public_key_file"),
                        "an HMAC key takes a secret, not a public/private key file",
                    ));
                }
            } else {
                if k.public_key_file.is_none() {
                    return Err(self.invalid(
                        key("public_key_file"),
                        format!("missing: a {:?} key needs a PEM public key", k.algorithm),
                    ));
                }
                if k.secret_file.is_some() || k.secret_env.is_some() {
                    return Err(self.invalid(
                        key("secret_file"),
                        format!(
                            "a {:?} key takes public_key_file, not a shared secret",
                            k.algorithm
                        ),
                    ));
                }
            }
        }
        if a.max_token_bytes < 64 || a.max_token_bytes > bounds::MAX_TOKEN_BYTES {
            return Err(self.invalid(
                "auth.max_token_bytes",
                format!("must be between 64 and {}", bounds::MAX_TOKEN_BYTES),
            ));
        }
        if a.leeway_secs > 300 {
            return Err(self.invalid(
                "auth.leeway_secs",
                "must be at most 300: a larger leeway keeps expired tokens alive",
            ));
        }
        if a.issuer.as_deref() == Some("") {
            return Err(self.invalid("auth.issuer", "empty: remove it or name the issuer"));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let check = |key: &str, value: usize, min: usize, max: usize| {
            if value < min || value > max {
                Err(self.invalid(
                    format!("limits.{key}"),
                    format!("{value} is out of range: must be between {min} and {max}"),
                ))
            } else {
                Ok(())
            }
        };
        check(
            "max_connections",
            l.max_connections,
            1,
            bounds::MAX_CONNECTIONS,
        )?;
        check(
            "max_connections_per_ip",
            l.max_connections_per_ip,
            1,
            bounds::MAX_CONNECTIONS,
        )?;
        check(
            "handshake_rate_per_ip",
            l.handshake_rate_per_ip as usize,
            1,
            100_000,
        )?;
        check(
            "handshake_burst_per_ip",
            l.handshake_burst_per_ip as usize,
            1,
            100_000,
        )?;
        check(
            "max_connections_per_user",
            l.max_connections_per_user,
            1,
            bounds::MAX_CONNECTIONS,
        )?;
        check(
            "max_members_per_room",
            l.max_members_per_room,
            1,
            bounds::MAX_CONNECTIONS,
        )?;
        check(
            "max_message_bytes",
            l.max_message_bytes,
            256,
            bounds::MAX_MESSAGE_BYTES,
        )?;
        check(
            "max_frame_bytes",
            l.max_frame_bytes,
            256,
            l.max_message_bytes,
        )?;
        check(
            "max_fragments_per_message",
            l.max_fragments_per_message as usize,
            1,
            100_000,
        )?;
        check("read_buffer_bytes", l.read_buffer_bytes, 128, 1024 * 1024)?;
        check("write_buffer_bytes", l.write_buffer_bytes, 0, 1024 * 1024)?;
        check(
            "max_write_buffer_bytes",
            l.max_write_buffer_bytes,
            l.write_buffer_bytes + l.max_message_bytes + 1,
            64 * 1024 * 1024,
        )?;
        check(
            "outbound_queue_messages",
            l.outbound_queue_messages,
            4,
            bounds::MAX_QUEUE_MESSAGES,
        )?;
        check(
            "outbound_queue_bytes",
            l.outbound_queue_bytes,
            l.max_message_bytes * 2,
            bounds::MAX_QUEUE_BYTES,
        )?;
        if l.socket_send_buffer_bytes != 0
            && !(4096..=16 * 1024 * 1024).contains(&l.socket_send_buffer_bytes)
        {
            return Err(self.invalid(
                "limits.socket_send_buffer_bytes",
                format!(
                    "{} is out of range: must be 0 (the kernel's default) or between 4096 and 16777216",
                    l.socket_send_buffer_bytes
                ),
            ));
        }
        check(
            "max_rooms_per_connection",
            l.max_rooms_per_connection,
            1,
            bounds::MAX_ROOMS_PER_CONNECTION,
        )?;
        check("rate_per_sec", l.rate_per_sec as usize, 1, 100_000)?;
        check("burst", l.burst as usize, 1, 100_000)?;
        check(
            "user_rate_per_sec",
            l.user_rate_per_sec as usize,
            1,
            100_000,
        )?;
        check("user_burst", l.user_burst as usize, 1, 100_000)?;
        check(
            "max_invalid_frames",
            l.max_invalid_frames as usize,
            1,
            10_000,
        )?;
        check("rate_strikes", l.rate_strikes as usize, 1, 10_000)?;
        check(
            "rate_strike_window_secs",
            l.rate_strike_window_secs as usize,
            1,
            3600,
        )?;
        check("max_rooms", l.max_rooms, 1, 10_000_000)?;
        check("h2_max_streams", l.h2_max_streams as usize, 1, 1000)?;
        let s = &self.session;
        if s.close_timeout_ms == 0 || s.close_timeout_ms > bounds::MAX_TIMEOUT_MS {
            return Err(self.invalid(
                "session.close_timeout_ms",
                format!("must be between 1 and {} ms", bounds::MAX_TIMEOUT_MS),
            ));
        }
        if s.expiry_warning_secs > 3600 {
            return Err(self.invalid("session.expiry_warning_secs", "must be at most 3600"));
        }
        if s.ping_interval_secs == 0 || s.ping_interval_secs > 3600 {
            return Err(self.invalid("session.ping_interval_secs", "must be between 1 and 3600"));
        }
        if s.read_timeout_secs <= s.ping_interval_secs || s.read_timeout_secs > 7200 {
            return Err(self.invalid(
                "session.read_timeout_secs",
                "must be longer than session.ping_interval_secs (a pong needs time to come back) and at most 7200",
            ));
        }
        if s.idle_timeout_secs == 0 || s.idle_timeout_secs > 7 * 86_400 {
            return Err(self.invalid(
                "session.idle_timeout_secs",
                "must be between 1 and 604800 (7 days)",
            ));
        }
        if s.write_coalesce_ms > 1000 {
            return Err(self.invalid(
                "session.write_coalesce_ms",
                "must be between 0 (off) and 1000",
            ));
        }
        if s.write_coalesce_frames < 2 || s.write_coalesce_frames > 4096 {
            return Err(self.invalid(
                "session.write_coalesce_frames",
                "must be between 2 and 4096",
            ));
        }
        if s.write_coalesce_busy_percent > 100 {
            return Err(self.invalid(
                "session.write_coalesce_busy_percent",
                "must be between 0 (whatever the load) and 100",
            ));
        }
        let b = &self.bans;
        for (key, value, min, max) in [
            ("bans.max_failures", b.max_failures as u64, 1, 100_000),
            ("bans.window_secs", b.window_secs, 1, 86_400),
            ("bans.ban_secs", b.ban_secs, 1, 7 * 86_400),
            ("bans.max_tracked", b.max_tracked as u64, 16, 10_000_000),
        ] {
            if value < min || value > max {
                return Err(self.invalid(
                    key,
                    format!("{value} is out of range: must be between {min} and {max}"),
                ));
            }
        }
        for (i, net) in b.allow.iter().enumerate() {
            parse_net(net).map_err(|e| self.invalid(format!("bans.allow[{i}]"), e))?;
        }
        if self.server.proxy_protocol && self.server.trusted_proxies.is_empty() {
            return Err(self.invalid(
                "server.proxy_protocol",
                "is on but server.trusted_proxies is empty: list the proxies that send PROXY headers",
            ));
        }
        for (i, net) in self.server.trusted_proxies.iter().enumerate() {
            parse_net(net).map_err(|e| self.invalid(format!("server.trusted_proxies[{i}]"), e))?;
        }
        Ok(())
    }

    fn validate_broker(&self) -> Result<(), ConfigError> {
        let b = &self.broker;
        if b.kind != BrokerKind::Redis {
            return Ok(());
        }
        if !(b.url.starts_with("redis://") || b.url.starts_with("rediss://")) {
            return Err(self.invalid("broker.url", "must start with redis:// or rediss:// (TLS)"));
        }
        if b.url
            .split_once("://")
            .is_some_and(|(_, rest)| rest.contains('@'))
        {
            return Err(self.invalid(
                "broker.url",
                "holds credentials: put the password in broker.password_env or broker.password_file",
            ));
        }
        if b.secret_env.is_some() == b.secret_file.is_some() {
            return Err(self.invalid(
                "broker.secret_env",
                "a Redis broker needs exactly one of secret_env or secret_file: the cluster secret that signs messages between nodes",
            ));
        }
        if b.password_env.is_some() && b.password_file.is_some() {
            return Err(self.invalid(
                "broker.password_env",
                "set at most one of password_env or password_file",
            ));
        }
        if b.key_prefix.is_empty()
            || b.key_prefix.len() > 64
            || b.key_prefix.contains(['{', '}', ' '])
        {
            return Err(self.invalid(
                "broker.key_prefix",
                "must be 1 to 64 characters without braces or spaces",
            ));
        }
        for (key, value) in [
            ("broker.connect_timeout_ms", b.connect_timeout_ms),
            ("broker.response_timeout_ms", b.response_timeout_ms),
            ("broker.max_backoff_ms", b.max_backoff_ms),
        ] {
            if value == 0 || value > 60_000 {
                return Err(self.invalid(key, "must be between 1 and 60000 ms"));
            }
        }
        Ok(())
    }

    fn validate_rooms(&self) -> Result<(), ConfigError> {
        if self.dm.history > bounds::MAX_HISTORY {
            return Err(self.invalid(
                "dm.history",
                format!("must be at most {}", bounds::MAX_HISTORY),
            ));
        }
        if self.dm.history_max_age_secs == 0 || self.dm.history_max_age_secs > 365 * 86_400 {
            return Err(self.invalid(
                "dm.history_max_age_secs",
                "must be between 1 and 31536000 (a year)",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, room) in self.rooms.iter().enumerate() {
            let key = |field: &str| format!("rooms[{i}].{field}");
            RoomPattern::parse(&room.name).map_err(|e| self.invalid(key("name"), e))?;
            if room.name.starts_with("dm:") {
                return Err(self.invalid(
                    key("name"),
                    "names starting with \"dm:\" are reserved for direct messages ([dm] enabled = true)",
                ));
            }
            if !names.insert(room.name.as_str()) {
                return Err(self.invalid(key("name"), format!("duplicate room {:?}", room.name)));
            }
            if room.history > bounds::MAX_HISTORY {
                return Err(self.invalid(
                    key("history"),
                    format!("must be at most {}", bounds::MAX_HISTORY),
                ));
            }
            if room.history_max_age_secs == 0 || room.history_max_age_secs > 365 * 86_400 {
                return Err(self.invalid(
                    key("history_max_age_secs"),
                    "must be between 1 and 31536000 (a year)",
                ));
            }
            for (field, roles) in [
                ("join", &room.join),
                ("post", &room.post),
                ("moderate", &room.moderate),
            ] {
                if roles.iter().any(|r| r.is_empty() || r.len() > 64) {
                    return Err(self.invalid(key(field), "role names are 1 to 64 characters"));
                }
            }
        }
        Ok(())
    }

    /// Settings that are valid but deserve an operator's second look.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let mut warn = |key: &str, text: &str| warnings.push(format!("{key}: {text}"));
        if self.tls.mode == TlsMode::Off {
            warn(
                "tls.mode",
                "TLS is off: only safe behind a proxy that terminates TLS",
            );
        }
        if self.auth.allow_query_token {
            warn(
                "auth.allow_query_token",
                "tokens in URLs end up in proxy and access logs",
            );
        }
        if self.security.allowed_origins.is_empty() {
            warn(
                "security.allowed_origins",
                "empty: every browser connection is refused; only non-browser clients can connect",
            );
        }
        if !self.bans.enabled {
            warn(
                "bans.enabled",
                "off: addresses that keep failing handshakes are never banned",
            );
        }
        if self.metrics.enabled && !self.metrics.listen.ip().is_loopback() {
            warn(
                "metrics.listen",
                "not a loopback address: firewall it, metrics describe your traffic",
            );
        }
        if self.auth.leeway_secs > 60 {
            warn(
                "auth.leeway_secs",
                "over 60 s keeps expired tokens usable for long",
            );
        }
        if self.rooms.is_empty() && !self.dm.enabled {
            warn("rooms", "no [[rooms]] and dm off: nobody can join any room");
        }
        if self
            .server
            .trusted_proxies
            .iter()
            .filter_map(|n| parse_net(n).ok())
            .any(|n| n.prefix_len() == 0)
        {
            warn(
                "server.trusted_proxies",
                "trusts every address: any client can choose its X-Forwarded-For address",
            );
        }
        warnings
    }

    /// Durations, as [`Duration`]s.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.server.handshake_timeout_ms)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.server.shutdown_grace_ms)
    }
}

/// Parses `10.0.0.1` or `10.0.0.0/8` (IPv6 likewise) into a network.
pub fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(net) = text.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<std::net::IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("{text:?} is not an address or CIDR range such as 10.0.0.0/8"))
}

/// A secret value (an HMAC key): its `Debug` never shows it, equality is
/// constant-time, and its bytes are zeroed when it is dropped.
#[derive(Clone)]
pub struct Secret(zeroize::Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(zeroize::Zeroizing::new(bytes))
    }
    /// The raw bytes, for handing to a verifier. Never log them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(MASKED)")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_slice().ct_eq(other.0.as_slice()).into()
    }
}
impl Eq for Secret {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_is_masked() {
        let s = Secret::new(b"hunter2-hunter2".to_vec());
        assert_eq!(format!("{s:?}"), "Secret(MASKED)");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s, Secret::new(b"hunter2-hunter2".to_vec()));
        assert_ne!(s, Secret::new(b"hunter2-hunter3".to_vec()));
    }
}
