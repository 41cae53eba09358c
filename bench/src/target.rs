//! The server under test and how to reach it: TCP from a spread of loopback
//! source addresses, TLS, the WebSocket upgrade, and the two protocol modes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use memchr::memmem::Finder;
use rustls_pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::polled::{self, PolledWs};
use crate::procfs::Proc;
use crate::tls::Kx;
use crate::token::Minter;

/// One client connection.
pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// What the bench speaks once connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// securechat v1: token on the upgrade, `join` then `send`; deliveries
    /// are `message` frames.
    Securechat,
    /// The peers: any text sent is broadcast as-is to every client.
    Raw,
}

/// Where the server is and how to talk to it; shared by every scenario.
#[derive(clap::Args, Clone, Debug)]
pub struct TargetArgs {
    /// The server: wss://127.0.0.1:PORT/PATH (loopback only).
    #[arg(long)]
    pub url: String,
    /// securechat frames, or raw text for the peers.
    #[arg(long, value_enum, default_value = "securechat")]
    pub protocol: Proto,
    /// The server's process id, for memory and CPU from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// A name for the server in the summary line.
    #[arg(long, default_value = "server")]
    pub server_name: String,
    /// securechat: the HS256 secret the server verifies tokens with.
    #[arg(long)]
    pub jwt_secret_file: Option<PathBuf>,
    /// securechat: the key id in the token header.
    #[arg(long, default_value = "bench")]
    pub kid: String,
    /// securechat: the room every member joins.
    #[arg(long, default_value = "bench")]
    pub room: String,
    /// Verify the server's certificate against this CA (default: no
    /// verification, bench only).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Key exchange groups offered.
    #[arg(long, value_enum, default_value = "x25519")]
    pub kx: Kx,
    /// Source addresses 127.0.0.1 ..= 127.0.0.N, used in turn, so that many
    /// connections do not run out of ephemeral ports (0: one per 5,000
    /// connections, plus one, which also keeps `bind` quick).
    #[arg(long, default_value_t = 0)]
    pub source_ips: u8,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Client read buffer per connection (tungstenite), bytes. tungstenite
    /// zeroes this much before every read, including the read that finds
    /// nothing: a large one costs the load generator a memset per message.
    #[arg(long, default_value_t = 4 * 1024)]
    pub read_buffer: usize,
}

/// A resolved target, shared by every connection task.
pub struct Target {
    pub proto: Proto,
    pub server: Option<Proc>,
    pub server_name: String,
    pub room: String,
    addr: SocketAddr,
    url: String,
    tls: TlsConnector,
    minter: Option<Minter>,
    source_ips: u8,
    ws_config: WebSocketConfig,
    /// Close with RST instead of FIN: no TIME_WAIT pile-up on the source
    /// addresses, which would slow the next run's `bind` (and handshake
    /// loops would run out of ports).
    pub zero_linger: bool,
    /// The TLS version, cipher suite and key exchange group of the first
    /// connection, for the summary.
    pub negotiated: std::sync::OnceLock<String>,
    /// A small receive buffer for the connections it picks (`slow`: stalled
    /// receivers back up into the server soon, not into the kernel).
    pub small_rcvbuf: Option<(PickFn, u32)>,
}

/// Picks connections by index.
pub type PickFn = Arc<dyn Fn(usize) -> bool + Send + Sync>;

impl Target {
    /// `expected_connections` sizes the spread of source addresses.
    pub fn new(args: &TargetArgs, expected_connections: usize) -> Result<Arc<Self>, String> {
        let rest = args
            .url
            .strip_prefix("wss://")
            .ok_or("--url must start with wss://")?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let addr: SocketAddr = authority
            .replace("localhost", "127.0.0.1")
            .parse()
            .map_err(|_| format!("--url: {authority:?} is not IP:PORT"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "--url: {} is not a loopback address; the bench only loads servers on this machine",
                addr.ip()
            ));
        }
        let minter = match (&args.jwt_secret_file, args.protocol) {
            (Some(path), _) => Some(Minter::from_file(path, &args.kid)?),
            (None, Proto::Securechat) => {
                return Err("--protocol securechat needs --jwt-secret-file".into());
            }
            (None, Proto::Raw) => None,
        };
        let source_ips = if args.source_ips == 0 {
            (expected_connections / 5_000 + 1).min(250) as u8
        } else {
            args.source_ips
        };
        let path = if path.is_empty() { "/" } else { path };
        Ok(Arc::new(Self {
            proto: args.protocol,
            server: args.server_pid.map(Proc::pid),
            server_name: args.server_name.clone(),
            room: args.room.clone(),
            addr,
            url: format!("wss://localhost:{}{path}", addr.port()),
            tls: TlsConnector::from(crate::tls::client_config(args.ca.as_deref(), args.kx)?),
            minter,
            source_ips,
            ws_config: WebSocketConfig::default()
                .read_buffer_size(args.read_buffer)
                .write_buffer_size(0)
                .max_message_size(Some(1 << 20))
                .max_frame_size(Some(1 << 20)),
            zero_linger: true,
            small_rcvbuf: None,
            negotiated: std::sync::OnceLock::new(),
        }))
    }

    /// The source address of connection number `index`.
    fn source(&self, index: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (index % self.source_ips as usize) as u8,
        ))
    }

    /// TCP, TLS and the upgrade for connection `index` as user `sub`, within
    /// `timeout`. Returns the socket and how long the three took.
    pub async fn connect(
        &self,
        index: usize,
        sub: &str,
        timeout: Duration,
    ) -> Result<(Ws, Duration), String> {
        let started = Instant::now();
        match tokio::time::timeout(timeout, self.connect_inner(index, sub)).await {
            Ok(Ok(ws)) => Ok((ws, started.elapsed())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("timeout".into()),
        }
    }

    async fn connect_inner(&self, index: usize, sub: &str) -> Result<Ws, String> {
        let tls = self.connect_tls(index).await?;
        let request = self.upgrade_request(sub)?;
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(request, tls, Some(self.ws_config))
                .await
                .map_err(|e| format!("upgrade: {e}"))?;
        Ok(ws)
    }

    /// TCP and TLS for connection `index`.
    async fn connect_tls(&self, index: usize) -> Result<TlsStream<TcpStream>, String> {
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        socket
            .bind(SocketAddr::new(self.source(index), 0))
            .map_err(|e| format!("bind: {e}"))?;
        if self.zero_linger {
            socket
                .set_zero_linger()
                .map_err(|e| format!("linger: {e}"))?;
        }
        if let Some((pick, bytes)) = &self.small_rcvbuf
            && pick(index)
        {
            socket
                .set_recv_buffer_size(*bytes)
                .map_err(|e| format!("rcvbuf: {e}"))?;
        }
        socket
            .set_nodelay(true)
            .map_err(|e| format!("nodelay: {e}"))?;
        let tcp = socket
            .connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from("localhost").expect("a valid name");
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        if self.negotiated.get().is_none() {
            let conn = tls.get_ref().1;
            let show = |v: Option<String>| v.unwrap_or_else(|| "?".into());
            let _ = self.negotiated.set(format!(
                "{} {} {}",
                show(conn.protocol_version().map(|v| format!("{v:?}"))),
                show(
                    conn.negotiated_cipher_suite()
                        .map(|s| format!("{:?}", s.suite()))
                ),
                show(
                    conn.negotiated_key_exchange_group()
                        .map(|g| format!("{:?}", g.name()))
                ),
            ));
        }
        Ok(tls)
    }

    /// The upgrade request for user `sub`: for securechat, with the
    /// subprotocol and a fresh token.
    fn upgrade_request(&self, sub: &str) -> Result<Request, String> {
        let mut request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("request: {e}"))?;
        if let Some(minter) = &self.minter {
            let headers = request.headers_mut();
            headers.insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_static("securechat.v1"),
            );
            let token = minter.mint(sub, 3 * 3600);
            headers.insert(
                "Authorization",
                HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?,
            );
        }
        Ok(request)
    }

    /// The frame that joins the room (securechat only).
    fn join_frame(&self) -> Utf8Bytes {
        format!(r#"{{"type":"join","room":"{}"}}"#, self.room).into()
    }

    /// What a frame read while joining means: `Ok(true)` joined, `Ok(false)`
    /// keep reading, `Err` refused or closed.
    fn join_answer(message: &Message) -> Result<bool, String> {
        match message {
            Message::Text(text) if text.contains(r#""type":"joined""#) => Ok(true),
            Message::Text(text) if text.contains(r#""type":"error""#) => {
                Err(format!("join refused: {text}"))
            }
            Message::Close(frame) => Err(format!("closed while joining: {frame:?}")),
            _ => Ok(false),
        }
    }

    /// As [`Self::connect_member`], for a member read from a poll loop
    /// ([`crate::polled`]): the same TCP, TLS, upgrade and join, then the
    /// connection as a [`PolledWs`].
    pub async fn connect_polled_member(
        &self,
        index: usize,
        timeout: Duration,
    ) -> Result<(PolledWs, Duration), String> {
        let started = Instant::now();
        let setup = async {
            let tls = self.connect_tls(index).await?;
            let request = self.upgrade_request(&format!("u{index}"))?;
            let mut ws = polled::upgrade(tls, request, self.ws_config).await?;
            if self.proto == Proto::Securechat {
                polled::send(&mut ws, Message::Text(self.join_frame()))
                    .await
                    .map_err(|e| format!("join: {e}"))?;
                loop {
                    let message = polled::read(&mut ws)
                        .await
                        .map_err(|e| format!("join: {e}"))?;
                    if Self::join_answer(&message)? {
                        break;
                    }
                }
            }
            Ok::<_, String>(ws)
        };
        match tokio::time::timeout(timeout, setup).await {
            Ok(Ok(ws)) => Ok((ws, started.elapsed())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("timeout".into()),
        }
    }

    /// Connects and, for securechat, waits for `welcome`, joins the room and
    /// waits for `joined`. Peers need nothing more (Bun subscribes on open).
    pub async fn connect_member(
        &self,
        index: usize,
        timeout: Duration,
    ) -> Result<(Ws, Duration), String> {
        let started = Instant::now();
        let (mut ws, _) = self.connect(index, &format!("u{index}"), timeout).await?;
        if self.proto == Proto::Securechat {
            ws.send(Message::Text(self.join_frame()))
                .await
                .map_err(|e| format!("join: {e}"))?;
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let frame = tokio::time::timeout_at(deadline, ws.next())
                    .await
                    .map_err(|_| "join: timeout".to_string())?;
                match frame {
                    Some(Ok(message)) => {
                        if Self::join_answer(&message)? {
                            break;
                        }
                    }
                    Some(Err(e)) => return Err(format!("join: {e}")),
                    None => return Err("closed while joining".into()),
                }
            }
        }
        Ok((ws, started.elapsed()))
    }

    /// The frame that sends `body` to the room.
    pub fn send_frame(&self, seq: u64, body: &str) -> Utf8Bytes {
        match self.proto {
            Proto::Securechat => format!(
                r#"{{"type":"send","room":"{}","id":"{seq}","body":"{body}"}}"#,
                self.room
            )
            .into(),
            Proto::Raw => body.to_owned().into(),
        }
    }

    /// The body of a delivered message, or `None` for other frames (`ack`,
    /// `welcome`, ...).
    pub fn delivered_body<'a>(&self, text: &'a str) -> Option<&'a str> {
        match self.proto {
            Proto::Raw => Some(text),
            Proto::Securechat => {
                // Every delivery goes through here, so the searches are
                // prepared once (std's `str::find` sets its searcher up on
                // every call: 2.4 % of the load generator's time).
                static MESSAGE: LazyLock<Finder<'static>> =
                    LazyLock::new(|| Finder::new(br#""type":"message""#));
                static BODY: LazyLock<Finder<'static>> =
                    LazyLock::new(|| Finder::new(br#""body":""#));
                let bytes = text.as_bytes();
                // Frames are small JSON objects whose `type` comes first.
                MESSAGE.find(&bytes[..bytes.len().min(32)])?;
                let start = BODY.find(bytes)? + BODY.needle().len();
                let len = memchr::memchr(b'"', &bytes[start..])?;
                text.get(start..start + len)
            }
        }
    }
}

/// The close code a frame carries, 1005 (none) when it has none.
pub fn close_code(message: &Message) -> Option<u16> {
    match message {
        Message::Close(Some(frame)) => Some(u16::from(frame.code)),
        Message::Close(None) => Some(1005),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str, protocol: Proto, secret: Option<PathBuf>) -> TargetArgs {
        TargetArgs {
            url: url.into(),
            protocol,
            server_pid: None,
            server_name: "test".into(),
            jwt_secret_file: secret,
            kid: "bench".into(),
            room: "bench".into(),
            ca: None,
            kx: crate::tls::Kx::X25519,
            source_ips: 0,
            connect_concurrency: 1,
            read_buffer: 4096,
        }
    }

    fn secret_file() -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "securechat-bench-test-{}.secret",
            std::process::id()
        ));
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").expect("temp file");
        path
    }

    #[test]
    fn securechat_frames_are_sends_and_only_messages_are_deliveries() {
        let target = Target::new(
            &args(
                "wss://127.0.0.1:8443/ws",
                Proto::Securechat,
                Some(secret_file()),
            ),
            1,
        )
        .expect("target");
        let frame = target.send_frame(7, "7:123:1:xx");
        let sent: serde_json::Value = serde_json::from_str(&frame).expect("JSON");
        assert_eq!(sent["type"], "send");
        assert_eq!(sent["room"], "bench");
        assert_eq!(sent["id"], "7");
        assert_eq!(sent["body"], "7:123:1:xx");

        // A delivery as the server writes it (docs/protocol.md).
        let message = r#"{"type":"message","room":"bench","seq":42,"id":"635ed94c","from":{"sub":"u1","name":"u1"},"body":"7:123:1:xx","ts":"2026-11-27T00:12:33.109Z"}"#;
        assert_eq!(target.delivered_body(message), Some("7:123:1:xx"));
        for other in [
            r#"{"type":"ack","ref":"7","seq":42,"id":"635ed94c"}"#,
            r#"{"type":"welcome","session":"s","user":{"sub":"u1"}}"#,
            r#"{"type":"error","code":"rate_limited","message":"slow down"}"#,
            "",
        ] {
            assert_eq!(target.delivered_body(other), None, "{other}");
        }
    }

    #[test]
    fn raw_frames_are_the_body_both_ways() {
        let target =
            Target::new(&args("wss://127.0.0.1:9000", Proto::Raw, None), 1).expect("target");
        assert_eq!(&*target.send_frame(1, "1:2:1:"), "1:2:1:");
        assert_eq!(target.delivered_body("1:2:1:"), Some("1:2:1:"));
        assert_eq!(target.url, "wss://localhost:9000/");
    }

    #[test]
    fn only_loopback_servers_are_loaded() {
        for url in ["wss://10.0.0.1:8443/ws", "wss://192.168.1.1:443/"] {
            let err = Target::new(&args(url, Proto::Raw, None), 1)
                .err()
                .expect("refused");
            assert!(err.contains("not a loopback address"), "{err}");
        }
        assert!(Target::new(&args("ws://127.0.0.1:1/", Proto::Raw, None), 1).is_err());
        assert!(Target::new(&args("wss://[::1]:8443/ws", Proto::Raw, None), 1).is_ok());
        // securechat needs the token secret.
        assert!(Target::new(&args("wss://127.0.0.1:1/", Proto::Securechat, None), 1).is_err());
    }

    #[test]
    fn connections_spread_over_source_addresses() {
        let target =
            Target::new(&args("wss://127.0.0.1:1/", Proto::Raw, None), 12_000).expect("target");
        // 12,000 connections: three addresses, used in turn.
        let sources: Vec<IpAddr> = (0..6).map(|i| target.source(i)).collect();
        assert_eq!(sources[0], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(sources[2], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
        assert_eq!(sources[3], sources[0]);
    }

    #[test]
    fn close_codes_are_read_from_close_frames() {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        let close = Message::Close(Some(CloseFrame {
            code: CloseCode::from(4009),
            reason: "slow_consumer".into(),
        }));
        assert_eq!(close_code(&close), Some(4009));
        assert_eq!(close_code(&Message::Close(None)), Some(1005));
        assert_eq!(close_code(&Message::Text("x".into())), None);
    }
}
