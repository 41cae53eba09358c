//! Test support: start the real server on 127.0.0.1:0 with a test CA and
//! keys written to a temporary folder, mint tokens, and talk to it over real
//! TLS as a client would.

#![allow(dead_code)]

pub mod redis;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::Request;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use securechat::auth::jwt::{MintClaims, Minter, now_unix};
use securechat::certs::{DevCa, PemPair};
use securechat::config::{Config, KeyAlgorithm, Secret};

/// How long a test waits for any one frame before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// The configuration every test server starts from.
pub const BASE_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
handshake_timeout_ms = 5000
shutdown_grace_ms = 3000

[tls]
cert = "server.crt"
key = "server.key"

[auth]
issuer = "https://id.test"
audience = ["securechat-test"]
leeway_secs = 5
[[auth.keys]]
kid = "hs"
algorithm = "HS256"
secret_file = "jwt.secret"
[[auth.keys]]
kid = "es"
algorithm = "ES256"
public_key_file = "es.pub.pem"

[security]
allowed_origins = ["https://chat.test", "https://*.apps.test"]

[metrics]
listen = "127.0.0.1:0"

[limits]
# Many handshakes and failures come from 127.0.0.1 in one test; the tests of
# these limits set their own.
handshake_rate_per_ip = 1000
handshake_burst_per_ip = 1000

[bans]
max_failures = 1000

[dm]
enabled = true

[[rooms]]
name = "general"

[[rooms]]
name = "news"
post = ["editor"]

[[rooms]]
name = "team-*"
join = ["staff"]
post = ["staff"]

[[rooms]]
name = "secret"
e2e = true

[[rooms]]
name = "vault"
require_mfa = true

[[rooms]]
name = "small"
history = 3
"#;

/// The test PKI: a CA, the server certificate, a client certificate, and
/// the ES256 token key pair.
pub struct Pki {
    pub ca: PemPair,
    pub server: PemPair,
    pub client: PemPair,
    pub es_private: String,
    pub es_public: String,
    /// A client certificate from a CA the server does not trust.
    pub stranger: PemPair,
    /// That CA's certificate.
    pub stranger_ca: String,
    /// The CA itself, to issue more certificates.
    pub authority: DevCa,
}

impl Pki {
    pub fn new() -> Self {
        securechat::install_crypto_providers();
        let ca = DevCa::generate("securechat test CA", 30).unwrap();
        let server = ca
            .server_cert(&["localhost".into(), "127.0.0.1".into()], 30)
            .unwrap();
        let client = ca.client_cert("test-client", 30).unwrap();
        let other = DevCa::generate("untrusted CA", 30).unwrap();
        let stranger = other.client_cert("stranger", 30).unwrap();
        let es = rcgen::KeyPair::generate().unwrap();
        Self {
            ca: PemPair {
                cert_pem: ca.pem().cert_pem.clone(),
                key_pem: ca.pem().key_pem.clone(),
            },
            server,
            client,
            es_private: es.serialize_pem(),
            es_public: es.public_key_pem(),
            stranger,
            stranger_ca: other.pem().cert_pem.clone(),
            authority: ca,
        }
    }
}

/// A running server and what a client needs to reach it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub pki: Arc<Pki>,
    pub secret: Secret,
    pub state: Arc<securechat::state::AppState>,
    pub metrics_addr: Option<SocketAddr>,
    pub reloader: Arc<securechat::reload::Reloader>,
    pub dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub handle: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server with the base configuration.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `edit` adjusts the parsed base configuration.
    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Self {
        Self::start_from(BASE_CONFIG, edit).await
    }

    pub async fn start_from(text: &str, edit: impl FnOnce(&mut Config)) -> Self {
        let pki = Arc::new(Pki::new());
        let secret = Secret::new(
            rand_hex(32).into_bytes(), // 64 hex characters
        );
        Self::start_with_keys(text, pki, secret, edit).await
    }

    /// Another node of the same cluster: same certificates and token keys.
    pub async fn start_like(first: &TestServer, edit: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_keys(BASE_CONFIG, first.pki.clone(), first.secret.clone(), edit).await
    }

    async fn start_with_keys(
        text: &str,
        pki: Arc<Pki>,
        secret: Secret,
        edit: impl FnOnce(&mut Config),
    ) -> Self {
        let (prepared, dir) = prepare(text, &pki, &secret, edit);
        let server = securechat::start(prepared).await.expect("server binds");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut node = Self::around(&server, pki, secret, dir);
        node.handle = Some(tokio::spawn(server.run(async {
            let _ = rx.await;
        })));
        node.shutdown = Some(tx);
        node
    }

    /// The test view of a bound server that is not running yet.
    fn around(
        server: &securechat::server::Server,
        pki: Arc<Pki>,
        secret: Secret,
        dir: tempfile::TempDir,
    ) -> Self {
        Self {
            addr: server.local_addr().unwrap(),
            pki,
            secret,
            state: server.state(),
            metrics_addr: server.metrics_addr(),
            reloader: server.reloader(),
            dir,
            shutdown: None,
            handle: None,
        }
    }

    /// Another node of `first`'s cluster, running on a runtime of its own
    /// with one worker thread, so the test can freeze it (block that
    /// thread) or kill it (drop the runtime: every task and socket goes at
    /// once, as with SIGKILL).
    pub async fn start_isolated(
        first: &TestServer,
        edit: impl FnOnce(&mut Config) + Send + 'static,
    ) -> (Self, tokio::runtime::Runtime) {
        let (prepared, dir) = prepare(BASE_CONFIG, &first.pki, &first.secret, edit);
        let (pki, secret) = (first.pki.clone(), first.secret.clone());
        tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let server = runtime
                .block_on(securechat::start(prepared))
                .expect("server binds");
            let node = Self::around(&server, pki, secret, dir);
            runtime.spawn(server.run(std::future::pending()));
            (node, runtime)
        })
        .await
        .unwrap()
    }

    /// Starts shutdown; returns the server task to await.
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.take().expect("server running")
    }

    /// Claims for `sub` that the server accepts: right issuer and audience,
    /// an hour of validity.
    pub fn claims(&self, sub: &str) -> MintClaims {
        let now = now_unix();
        MintClaims {
            sub: sub.into(),
            name: Some(capitalize(sub)),
            iat: now,
            exp: now + 3600,
            iss: Some("https://id.test".into()),
            aud: Some("securechat-test".into()),
            ..Default::default()
        }
    }

    pub fn hs_minter(&self) -> Minter {
        Minter::hmac("hs", KeyAlgorithm::HS256, &self.secret)
    }

    /// A valid HS256 token for `sub`.
    pub fn token(&self, sub: &str) -> String {
        self.mint(&self.claims(sub))
    }

    pub fn mint(&self, claims: &MintClaims) -> String {
        self.hs_minter().mint(claims).unwrap()
    }

    /// A valid token for `sub` with roles.
    pub fn token_with_roles(&self, sub: &str, roles: &[&str]) -> String {
        let mut claims = self.claims(sub);
        claims.roles = roles.iter().map(|r| r.to_string()).collect();
        self.mint(&claims)
    }

    /// An upgrade request to the WebSocket path with the required headers
    /// and the `securechat.v1` subprotocol; add credentials to it.
    pub fn request(&self) -> http::request::Builder {
        self.request_to("/ws")
    }

    pub fn request_to(&self, path_and_query: &str) -> http::request::Builder {
        Request::builder()
            .uri(format!(
                "wss://localhost:{}{path_and_query}",
                self.addr.port()
            ))
            .header("Host", format!("localhost:{}", self.addr.port()))
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", generate_key())
            .header("Sec-WebSocket-Protocol", "securechat.v1")
    }

    /// An upgrade request carrying `token` in the Authorization header.
    pub fn bearer_request(&self, token: &str) -> Request<()> {
        self.request()
            .header("Authorization", format!("Bearer {token}"))
            .body(())
            .unwrap()
    }

    /// Connects with the token in the Authorization header and reads `welcome`.
    pub async fn connect(&self, token: &str) -> Client {
        let req = self.bearer_request(token);
        let mut client = self.try_connect(req).await.expect("upgrade accepted");
        let welcome = client.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        client
    }

    /// Connects `sub` with a fresh token and joins `room`.
    pub async fn member(&self, sub: &str, room: &str) -> Client {
        let mut client = self.connect(&self.token(sub)).await;
        client.join(room).await;
        client
    }

    /// A TLS connection to the server (ALPN http/1.1, or as given).
    pub async fn tls(&self, alpn: &[&[u8]], client_cert: Option<&PemPair>) -> TlsStream<TcpStream> {
        self.try_tls(alpn, client_cert)
            .await
            .expect("TLS handshake")
    }

    pub async fn try_tls(
        &self,
        alpn: &[&[u8]],
        client_cert: Option<&PemPair>,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        self.try_tls_after(b"", alpn, client_cert).await
    }

    /// TLS after sending `prefix` (a PROXY protocol header) on the TCP stream.
    pub async fn try_tls_after(
        &self,
        prefix: &[u8],
        alpn: &[&[u8]],
        client_cert: Option<&PemPair>,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        use tokio::io::AsyncWriteExt;
        let config = client_tls_config(&self.pki.ca.cert_pem, alpn, client_cert);
        let mut tcp = TcpStream::connect(self.addr).await?;
        tcp.write_all(prefix).await?;
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }

    /// Attempts an upgrade; a refusal comes back as status, JSON body and headers.
    pub async fn try_connect(&self, req: Request<()>) -> Result<Client, Refused> {
        self.try_connect_with(req, None).await
    }

    pub async fn try_connect_with(
        &self,
        req: Request<()>,
        client_cert: Option<&PemPair>,
    ) -> Result<Client, Refused> {
        let tls = self.tls(&[b"http/1.1"], client_cert).await;
        self.upgrade_on(tls, req).await
    }

    /// Attempts an upgrade on an established TLS stream.
    pub async fn upgrade_on(
        &self,
        tls: TlsStream<TcpStream>,
        req: Request<()>,
    ) -> Result<Client, Refused> {
        let config = WebSocketConfig::default().max_message_size(Some(1 << 20));
        match tokio_tungstenite::client_async_with_config(req, tls, Some(config)).await {
            Ok((ws, response)) => Ok(Client {
                ws,
                protocol: response
                    .headers()
                    .get("sec-websocket-protocol")
                    .map(|v| v.to_str().unwrap().to_string()),
            }),
            Err(tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                let body = response
                    .into_body()
                    .map(|b| serde_json::from_slice(&b).unwrap_or(Value::Null))
                    .unwrap_or(Value::Null);
                Err(Refused {
                    status,
                    body,
                    headers,
                })
            }
            Err(e) => panic!("unexpected handshake error: {e}"),
        }
    }

    /// Expects the upgrade to be refused with `status` and `code`.
    pub async fn expect_refused(&self, req: Request<()>, status: u16, code: &str) -> Refused {
        match self.try_connect(req).await {
            Ok(_) => panic!("expected a refusal {status} {code}, the upgrade was accepted"),
            Err(refused) => {
                assert_eq!(refused.status, status, "body: {}", refused.body);
                assert_eq!(refused.body["error"], code, "body: {}", refused.body);
                refused
            }
        }
    }
}

/// Writes the test PKI and token secret to a new folder and loads a
/// configuration from `text` there, after `edit`.
fn prepare(
    text: &str,
    pki: &Pki,
    secret: &Secret,
    edit: impl FnOnce(&mut Config),
) -> (securechat::Prepared, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "server.crt", &pki.server.cert_pem);
    write(dir.path(), "server.key", &pki.server.key_pem);
    write(dir.path(), "ca.crt", &pki.ca.cert_pem);
    write(dir.path(), "es.pub.pem", &pki.es_public);
    write(
        dir.path(),
        "jwt.secret",
        std::str::from_utf8(secret.expose()).unwrap(),
    );
    let mut config = Config::parse(text, &dir.path().join("test.toml")).unwrap();
    edit(&mut config);
    config.resolve_paths(dir.path());
    config.validate().expect("test configuration is valid");
    let prepared = securechat::Prepared::load(config).expect("keys and certificates load");
    (prepared, dir)
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A refused upgrade.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: Value,
    pub headers: http::HeaderMap,
}

/// A connected WebSocket client.
pub struct Client {
    pub ws: WebSocketStream<TlsStream<TcpStream>>,
    /// The subprotocol the server answered.
    pub protocol: Option<String>,
}

impl Client {
    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    /// The next text frame as JSON; fails on close or after [`WAIT`].
    pub async fn recv(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame within the wait")
                .expect("the connection is open")
                .expect("a valid frame");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Receives frames until one of type `kind` arrives; returns it.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// The close code and reason the server sends; skips other frames.
    pub async fn recv_close(&mut self) -> (u16, String) {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a close within the wait");
            match next {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("connection failed before a close frame: {e}"),
                None => panic!("connection ended without a close frame"),
            }
        }
    }

    /// Asserts that nothing arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(wait, self.ws.next()).await
        {
            panic!("expected no frame, got {text}");
        }
    }

    pub async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type": "join", "room": room})).await;
        let joined = self.recv().await;
        assert_eq!(joined["type"], "joined", "{joined}");
        joined
    }

    /// Sends `body` to `room` with client id `id`; returns the ack after
    /// reading this client's own copy of the message.
    pub async fn say(&mut self, room: &str, id: &str, body: &str) -> Value {
        self.send(json!({"type": "send", "room": room, "id": id, "body": body}))
            .await;
        self.recv_type("ack").await
    }
}

/// The roots of a client that trusts `ca_pem`.
pub fn root_store(ca_pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

/// A rustls client configuration trusting `ca_pem`.
pub fn client_tls_config(
    ca_pem: &str,
    alpn: &[&[u8]],
    client_cert: Option<&PemPair>,
) -> rustls::ClientConfig {
    let builder = rustls::ClientConfig::builder_with_provider(securechat::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(root_store(ca_pem));
    let mut config = match client_cert {
        Some(pair) => {
            let chain = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

pub fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).unwrap();
}

/// Writes `content` to `name` in `dir` the way renewal tools do: a new file
/// renamed over the old one.
pub fn replace(dir: &Path, name: &str, content: &str) {
    let tmp = dir.join(format!(".{name}.new"));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

pub fn rand_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The serial number of the certificate the server presents now.
pub async fn served_serial(server: &TestServer) -> String {
    let tls = server.tls(&[b"http/1.1"], None).await;
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    securechat::tls::cert_info(&cert).unwrap().serial
}

/// Sends a plain HTTP/1.1 request over TLS and returns status and body.
pub async fn http_get(server: &TestServer, path: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = server.tls(&[b"http/1.1"], None).await;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| serde_json::from_str(b.trim()).unwrap_or(Value::Null))
        .unwrap_or(Value::Null);
    (status, body)
}
