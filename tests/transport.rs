//! The transport around sessions: WebSocket over HTTP/2, client
//! certificates, the handshake deadline, the connection cap, graceful
//! shutdown.

mod common;

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use common::{TestServer, WAIT, http_get};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// An HTTP/2 stream as a byte stream, for a WebSocket over RFC 8441.
struct H2Io {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    buffer: Bytes,
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.buffer.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.buffer = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.buffer.len().min(buf.remaining());
        buf.put_slice(&self.buffer[..n]);
        self.buffer.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.send.reserve_capacity(buf.len());
        match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(n)) => {
                let n = n.min(buf.len());
                self.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(std::io::Error::other)?;
                Poll::Ready(Ok(n))
            }
            Some(Err(e)) => Poll::Ready(Err(std::io::Error::other(e))),
            None => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

/// The next text frame as JSON, skipping control frames; fails after [`WAIT`].
async fn next_json<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn websocket_over_http2() {
    let server = TestServer::start().await;
    let tls = server.tls(&[b"h2"], None).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    // The server announces SETTINGS_ENABLE_CONNECT_PROTOCOL in its first SETTINGS.
    for _ in 0..100 {
        if client.is_extended_connect_protocol_enabled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        client = client.ready().await.unwrap();
    }
    assert!(client.is_extended_connect_protocol_enabled());
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://localhost:{}/ws", server.addr.port()))
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "securechat.v1")
        .header(
            "authorization",
            format!("Bearer {}", server.token("h2user")),
        )
        .extension(h2::ext::Protocol::from("websocket"))
        .body(())
        .unwrap();
    let (response, send) = client.send_request(request, false).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "securechat.v1"
    );
    let io = H2Io {
        send,
        recv: response.into_body(),
        buffer: Bytes::new(),
    };
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Client, None).await;
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["user"]["sub"], "h2user");

    // It is a full session: join and chat with an HTTP/1.1 member.
    let mut other = server.member("other", "general").await;
    ws.send(Message::Text(
        json!({"type": "join", "room": "general"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "joined");
    ws.send(Message::Text(
        json!({"type": "send", "room": "general", "id": "h1", "body": "over h2"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let m = other.recv_type("message").await;
    assert_eq!(
        (m["body"].as_str(), m["from"]["sub"].as_str()),
        (Some("over h2"), Some("h2user"))
    );
}

async fn start_mtls(mode: &str) -> TestServer {
    let mode = match mode {
        "required" => securechat::config::ClientAuth::Required,
        _ => securechat::config::ClientAuth::Optional,
    };
    TestServer::start_with(|c| {
        c.tls.client_auth = mode;
        c.tls.client_ca = Some("ca.crt".into());
    })
    .await
}

/// Connects with an optional client certificate; true when the session opened.
async fn mtls_session(server: &TestServer, cert: Option<&securechat::certs::PemPair>) -> bool {
    let config = common::client_tls_config(&server.pki.ca.cert_pem, &[b"http/1.1"], cert);
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let Ok(tls) = connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
    else {
        return false;
    };
    let req = server.bearer_request(&server.token("certuser"));
    // With TLS 1.3 the client learns of a refused certificate only when it reads.
    match tokio_tungstenite::client_async(req, tls).await {
        Ok((mut ws, _)) => matches!(
            tokio::time::timeout(WAIT, ws.next()).await,
            Ok(Some(Ok(Message::Text(_))))
        ),
        Err(_) => false,
    }
}

#[tokio::test]
async fn mtls_required_refuses_clients_without_a_trusted_certificate() {
    let server = start_mtls("required").await;
    assert!(!mtls_session(&server, None).await, "no certificate");
    assert!(
        !mtls_session(&server, Some(&server.pki.stranger)).await,
        "certificate from an untrusted CA"
    );
    assert!(
        mtls_session(&server, Some(&server.pki.client)).await,
        "trusted certificate"
    );
}

#[tokio::test]
async fn mtls_optional_accepts_both() {
    let server = start_mtls("optional").await;
    assert!(mtls_session(&server, None).await);
    assert!(mtls_session(&server, Some(&server.pki.client)).await);
    assert!(!mtls_session(&server, Some(&server.pki.stranger)).await);
}

#[tokio::test]
async fn the_client_ca_is_read_again_on_reload() {
    let server = start_mtls("required").await;
    assert!(mtls_session(&server, Some(&server.pki.client)).await);
    assert!(!mtls_session(&server, Some(&server.pki.stranger)).await);

    // The other CA replaces the first: from the next handshake on, its
    // certificates are the trusted ones.
    common::replace(server.dir.path(), "ca.crt", &server.pki.stranger_ca);
    let outcome = server.reloader.reload();
    assert!(outcome.tls_ok && outcome.keys_ok);
    assert!(mtls_session(&server, Some(&server.pki.stranger)).await);
    assert!(!mtls_session(&server, Some(&server.pki.client)).await);
    assert!(!mtls_session(&server, None).await, "still required");

    // A file that holds no certificate keeps the CA in service.
    common::replace(server.dir.path(), "ca.crt", "not a certificate");
    assert!(!server.reloader.reload().tls_ok);
    assert!(mtls_session(&server, Some(&server.pki.stranger)).await);

    // Both CAs in the file, picked up by the file watcher without a reload call.
    let both = format!("{}{}", server.pki.ca.cert_pem, server.pki.stranger_ca);
    common::replace(server.dir.path(), "ca.crt", &both);
    let mut trusted = false;
    for _ in 0..100 {
        if mtls_session(&server, Some(&server.pki.client)).await {
            trusted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(trusted, "the watcher did not reload the client CA");
    assert!(mtls_session(&server, Some(&server.pki.stranger)).await);
}

/// Reads until the server closes the connection; true if it did within WAIT.
async fn closed_by_server(stream: &mut (impl AsyncRead + Unpin)) -> bool {
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(WAIT, read).await.is_ok()
}

#[tokio::test]
async fn slow_handshakes_are_dropped_at_the_deadline() {
    let server = TestServer::start_with(|c| {
        c.server.handshake_timeout_ms = 300;
        c.limits.max_connections = 3;
    })
    .await;
    // Never starts TLS.
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Finishes TLS, then trickles a request line and never ends the headers.
    let mut trickle = server.tls(&[b"http/1.1"], None).await;
    trickle
        .write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    // Meanwhile an honest client connects and is served.
    let mut honest = server.connect(&server.token("honest")).await;
    honest.send(json!({"type": "ping"})).await;
    assert_eq!(honest.recv().await["type"], "pong");

    let writer = async {
        for _ in 0..50 {
            if trickle.write_all(b"X").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    assert!(closed_by_server(&mut trickle).await, "trickled headers");
    assert!(closed_by_server(&mut silent).await, "stalled TLS");
    // Neither holds a permit any more: two more clients fit under the cap of 3.
    let _second = server.connect(&server.token("second")).await;
    let _third = server.connect(&server.token("third")).await;
}

#[tokio::test]
async fn over_the_connection_cap_gets_503() {
    let server = TestServer::start_with(|c| c.limits.max_connections = 1).await;
    let _first = server.connect(&server.token("first")).await;
    let req = server.bearer_request(&server.token("second"));
    let refused = server.expect_refused(req, 503, "over_capacity").await;
    assert!(refused.headers.contains_key("retry-after"));
}

/// The raw head of the response to `GET path` on `stream`.
async fn response_head(mut stream: impl AsyncRead + AsyncWrite + Unpin, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response).to_ascii_lowercase();
    text.split("\r\n\r\n").next().unwrap_or("").to_owned()
}

const HSTS: &str = "strict-transport-security: max-age=63072000\r\n";

#[tokio::test]
async fn every_response_over_tls_carries_hsts() {
    let server = TestServer::start_with(|c| c.limits.max_connections = 1).await;
    for path in ["/healthz", "/readyz", "/", "/no-such-path", "/ws"] {
        let head = response_head(server.tls(&[b"http/1.1"], None).await, path).await;
        assert!(head.contains(HSTS), "{path}: {head}");
    }
    let req = server.bearer_request(&server.token("alice"));
    let (_ws, response) =
        tokio_tungstenite::client_async(req, server.tls(&[b"http/1.1"], None).await)
            .await
            .unwrap();
    assert_eq!(
        response.headers()["strict-transport-security"],
        "max-age=63072000"
    );
    // A connection over the cap is answered at accept, over TLS too.
    let req = server.bearer_request(&server.token("second"));
    let refused = server.expect_refused(req, 503, "over_capacity").await;
    assert_eq!(
        refused.headers["strict-transport-security"],
        "max-age=63072000"
    );
}

#[tokio::test]
async fn plain_http_behind_a_tls_proxy_sends_no_hsts() {
    let server = TestServer::start_with(|c| {
        c.tls.mode = securechat::config::TlsMode::Off;
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = response_head(tcp, "/healthz").await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("strict-transport-security"), "{head}");
}

#[tokio::test]
async fn graceful_shutdown_closes_sessions_with_1001() {
    let mut server = TestServer::start_with(|c| {
        c.session.close_timeout_ms = 20_000;
        c.server.shutdown_grace_ms = 30_000;
    })
    .await;
    let mut alice = server.member("alice", "general").await;
    let mut bob = server.connect(&server.token("bob")).await;
    // A client that will not answer the close keeps the server draining for
    // until it goes away (or session.close_timeout_ms); meanwhile the node
    // reports not ready and refuses upgrades.
    let stuck = server.connect(&server.token("stuck")).await;
    let task = server.begin_shutdown();
    assert_eq!(alice.recv_close().await, (1001, "shutting_down".into()));
    assert_eq!(bob.recv_close().await.0, 1001);

    let (status, body) = http_get(&server, "/readyz").await;
    assert_eq!((status, body["status"].as_str()), (503, Some("draining")));
    let req = server.bearer_request(&server.token("late"));
    server.expect_refused(req, 503, "shutting_down").await;

    // Sessions wait for each client's close reply: let them all go.
    drop((alice, bob, stuck));
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("the server stops once the last session is gone")
        .unwrap();
}

#[tokio::test]
async fn shutdown_finishes_within_its_grace_despite_stalled_clients() {
    let mut server = TestServer::start_with(|c| {
        c.session.close_timeout_ms = 300;
        c.server.shutdown_grace_ms = 2_000;
    })
    .await;
    // Clients that never read again: they neither take the close frame nor
    // answer it.
    let mut stalled = Vec::new();
    for i in 0..5 {
        stalled.push(server.member(&format!("stalled{i}"), "general").await);
    }
    let mut sender = server.member("sender", "general").await;
    for i in 0..20 {
        sender
            .say("general", &format!("m{i}"), &"x".repeat(4000))
            .await;
    }
    let task = server.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the server stops although its clients are stalled")
        .unwrap();
    drop(stalled);
}

#[tokio::test]
async fn a_client_close_is_answered_and_pings_are_answered() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let server = TestServer::start().await;
    let mut client = server.connect(&server.token("leaving")).await;
    // A WebSocket ping is answered with a pong carrying the same payload.
    client
        .ws
        .send(Message::Ping(Bytes::from_static(b"are you there")))
        .await
        .unwrap();
    let pong = next_matching(&mut client, "pong", |m| match m {
        Message::Pong(payload) => Some(payload),
        _ => None,
    })
    .await;
    assert_eq!(&pong[..], b"are you there");

    // A close from the client is echoed with its code before the server
    // drops the connection.
    client
        .ws
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        })))
        .await
        .unwrap();
    let echo = next_matching(&mut client, "close echo", |m| match m {
        Message::Close(frame) => Some(frame),
        _ => None,
    })
    .await;
    assert_eq!(echo.map(|f| u16::from(f.code)), Some(1001));
    // Then the stream ends.
    let end = tokio::time::timeout(WAIT, client.ws.next()).await;
    assert!(matches!(end, Ok(None) | Ok(Some(Err(_)))), "{end:?}");
}

/// The first frame `pick` accepts, skipping others; fails on the end of
/// the connection, an error, or after [`WAIT`].
async fn next_matching<T>(
    client: &mut common::Client,
    what: &str,
    pick: impl Fn(Message) -> Option<T>,
) -> T {
    loop {
        match tokio::time::timeout(WAIT, client.ws.next()).await {
            Ok(Some(Ok(message))) => {
                if let Some(found) = pick(message) {
                    return found;
                }
            }
            other => panic!("no {what}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_server_picks_aes_128_gcm_whatever_the_client_prefers() {
    let server = TestServer::start().await;
    let ca = server.pki.ca.cert_pem.clone();
    // rustls' own order puts AES-256-GCM first, as many non-browser clients do.
    for (protocol, first) in [
        (
            &rustls::version::TLS13,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        ),
        (
            &rustls::version::TLS12,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
    ] {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.cipher_suites.sort_by_key(|s| s.suite() != first);
        let config = rustls::ClientConfig::builder_with_provider(provider.into())
            .with_protocol_versions(&[protocol])
            .unwrap()
            .with_root_certificates(common::root_store(&ca))
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.expect("handshake");
        let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        let expected = if protocol == &rustls::version::TLS13 {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        } else {
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        };
        assert_eq!(suite, expected, "client preferred {first:?}");
    }
}

/// A client that sends its first frame in the same write as the upgrade
/// request: hyper has read the frame with the request, and the session
/// must still get it (the bytes hyper read ahead come back first).
#[tokio::test]
async fn a_frame_sent_with_the_upgrade_request_is_read() {
    let server = TestServer::start().await;
    let mut tls = server.tls(&[b"http/1.1"], None).await;
    let port = server.addr.port();
    let token = server.token("eager");
    let mut bytes = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: securechat.v1\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .into_bytes();
    let join = json!({"type": "join", "room": "general"}).to_string();
    let mask = [0x11, 0x22, 0x33, 0x44];
    bytes.extend_from_slice(&[0x81, 0x80 | u8::try_from(join.len()).unwrap()]);
    bytes.extend_from_slice(&mask);
    bytes.extend(join.bytes().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    // One TLS record: the request and the frame arrive together.
    tls.write_all(&bytes).await.unwrap();
    tls.flush().await.unwrap();

    // The response head, byte by byte: frames may follow at once.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tokio::time::timeout(WAIT, tls.read_u8())
            .await
            .expect("a response")
            .unwrap();
        head.push(byte);
        assert!(head.len() < 4096, "no end of the response head");
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");

    let mut ws = WebSocketStream::from_raw_socket(tls, Role::Client, None).await;
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let frame = next_json(&mut ws).await;
        kinds.push(frame["type"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(kinds, ["welcome", "joined"]);
}

/// Behind a TLS-terminating proxy (`tls.mode = "off"`): a session over
/// plain TCP works end to end, a message delivered and answered.
#[tokio::test]
async fn a_session_over_plain_tcp_behind_a_tls_proxy() {
    let server = TestServer::start_with(|c| {
        c.tls.mode = securechat::config::TlsMode::Off;
    })
    .await;
    let mut clients = Vec::new();
    for sub in ["plain-a", "plain-b"] {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let mut req = server.bearer_request(&server.token(sub));
        *req.uri_mut() = format!("ws://localhost:{}/ws", server.addr.port())
            .parse()
            .unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        let mut kinds = Vec::new();
        for frame in [None, Some(json!({"type": "join", "room": "general"}))] {
            if let Some(frame) = frame {
                ws.send(Message::Text(frame.to_string().into()))
                    .await
                    .unwrap();
            }
            let value = next_json(&mut ws).await;
            kinds.push(value["type"].as_str().unwrap().to_string());
        }
        assert_eq!(kinds, ["welcome", "joined"]);
        clients.push(ws);
    }
    let send = json!({"type": "send", "room": "general", "id": "p1", "body": "in the clear"});
    clients[0]
        .send(Message::Text(send.to_string().into()))
        .await
        .unwrap();
    let message = loop {
        let value = next_json(&mut clients[1]).await;
        if value["type"] == "message" {
            break value;
        }
    };
    assert_eq!(message["body"], "in the clear");
    assert_eq!(message["from"]["sub"], "plain-a");
}
