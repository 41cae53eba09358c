//! The TLS record layer as clients stress it: records that arrive a byte at
//! a time, messages larger than a record in both directions (TLS 1.3 and
//! 1.2), key updates, close_notify at the end of a connection, an
//! oversized handshake message, and records after the handshake that are
//! forged, not protected at all, or key updates without end.

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use common::{TestServer, WAIT, client_tls_config};
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// A TCP stream that writes one byte per write: the server receives every
/// TLS record in pieces.
struct Trickle(TcpStream);

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Trickle {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let one = &buf[..buf.len().min(1)];
        Pin::new(&mut self.0).poll_write(cx, one)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A TCP stream that, once told to, flips a bit in the last byte of its
/// next write: the authentication tag of the TLS record it carries.
struct Tamper {
    tcp: TcpStream,
    armed: Arc<AtomicBool>,
}

impl AsyncRead for Tamper {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tamper {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() || !self.armed.swap(false, Ordering::SeqCst) {
            return Pin::new(&mut self.tcp).poll_write(cx, buf);
        }
        let mut forged = buf.to_vec();
        if let Some(last) = forged.last_mut() {
            *last ^= 1;
        }
        // Small enough for the socket to take at once.
        Pin::new(&mut self.tcp).poll_write(cx, &forged)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

async fn next_json<S>(ws: &mut WebSocketStream<S>) -> Value
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame within the wait")
            .expect("the connection is open")
            .expect("a valid frame");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).expect("JSON");
        }
    }
}

#[tokio::test]
async fn records_arriving_a_byte_at_a_time_are_served() {
    let server = TestServer::start().await;
    let config = client_tls_config(&server.pki.ca.cert_pem, &[b"http/1.1"], None);
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), Trickle(tcp))
        .await
        .expect("TLS handshake sent a byte at a time");
    let req = server.bearer_request(&server.token("trickle"));
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("upgrade");
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    let mut other = server.member("other", "general").await;
    let join = json!({"type": "join", "room": "general"}).to_string();
    ws.send(Message::Text(join.into())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "joined");
    // A message of several hundred bytes, also sent a byte at a time.
    let body = "b".repeat(700);
    let send = json!({"type": "send", "room": "general", "id": "t1", "body": body}).to_string();
    ws.send(Message::Text(send.into())).await.unwrap();
    let delivered = other.recv_type("message").await;
    assert_eq!(delivered["body"], body.as_str());
    assert_eq!(delivered["from"]["sub"], "trickle");
}

#[tokio::test]
async fn messages_larger_than_a_record_cross_both_ways() {
    let server = TestServer::start_with(|c| allow_messages_of(c, 256 * 1024)).await;
    let mut sender = server.member("big-sender", "general").await;
    let mut receiver = server.member("big-receiver", "general").await;
    // 100 KiB: seven TLS records from the client, seven to each member.
    let body: String = (0..100 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    sender
        .send(json!({"type": "send", "room": "general", "id": "big", "body": body}))
        .await;
    let delivered = receiver.recv_type("message").await;
    assert_eq!(delivered["body"].as_str().map(str::len), Some(body.len()));
    assert_eq!(delivered["body"], body.as_str());
    let own = sender.recv_type("message").await;
    assert_eq!(own["body"], body.as_str());
}

/// Raises the message and frame limits to `bytes` (and the control-reply
/// buffer above them, as validation asks).
fn allow_messages_of(c: &mut securechat::config::Config, bytes: usize) {
    c.limits.max_message_bytes = bytes;
    c.limits.max_frame_bytes = bytes;
    c.limits.max_write_buffer_bytes = 4 * bytes;
}

/// The next `message` frame from `sub` (skipping the client's own).
async fn message_from(client: &mut common::Client, sub: &str) -> Value {
    loop {
        let message = client.recv_type("message").await;
        if message["from"]["sub"] == sub {
            return message;
        }
    }
}

#[tokio::test]
async fn a_tls_1_2_client_chats_with_messages_larger_than_a_record() {
    let server = TestServer::start_with(|c| allow_messages_of(c, 64 * 1024)).await;
    let roots = common::root_store(&server.pki.ca.cert_pem);
    let mut config = rustls::ClientConfig::builder_with_provider(securechat::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS 1.2 handshake");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let req = server.bearer_request(&server.token("old-tls"));
    let mut client = server.upgrade_on(tls, req).await.expect("upgrade");
    assert_eq!(client.recv().await["type"], "welcome");
    client.join("general").await;
    let mut other = server.member("modern", "general").await;
    // 40 KiB: three TLS 1.2 records each way.
    let body = "z".repeat(40 * 1024);
    let ack = client.say("general", "big", &body).await;
    let delivered = message_from(&mut other, "old-tls").await;
    assert_eq!(delivered["seq"], ack["seq"]);
    assert_eq!(delivered["body"], body.as_str());
    other.say("general", "back", &body).await;
    let back = message_from(&mut client, "modern").await;
    assert_eq!(back["body"], body.as_str());
}

#[tokio::test]
async fn traffic_keys_updated_by_the_client_are_followed_both_ways() {
    let server = TestServer::start().await;
    let mut client = server.member("rekeying", "general").await;
    let mut other = server.member("steady", "general").await;
    for round in 0..3 {
        // A TLS 1.3 KeyUpdate asking the server to update its keys too:
        // what the client sends next is under its new keys, and what the
        // server sends after its own KeyUpdate must be under the server's.
        client
            .ws
            .get_mut()
            .get_mut()
            .1
            .refresh_traffic_keys()
            .expect("TLS 1.3 allows a key update");
        let body = format!("after key update {round}");
        let ack = client.say("general", &format!("k{round}"), &body).await;
        let delivered = message_from(&mut other, "rekeying").await;
        assert_eq!(delivered["seq"], ack["seq"]);
        assert_eq!(delivered["body"], body.as_str());
        // And the server's messages to the client still decrypt.
        let reply = format!("reply {round}");
        other.say("general", &format!("r{round}"), &reply).await;
        let message = message_from(&mut client, "steady").await;
        assert_eq!(message["body"], reply.as_str());
    }
}

#[tokio::test]
async fn a_closed_http_connection_ends_with_close_notify() {
    let server = TestServer::start().await;
    let mut tls = server.tls(&[b"http/1.1"], None).await;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    // rustls reports a connection closed without close_notify as an error.
    tokio::time::timeout(WAIT, tls.read_to_end(&mut response))
        .await
        .expect("the server closes within the wait")
        .expect("a clean TLS close (close_notify)");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test]
async fn a_websocket_session_ends_with_close_notify() {
    let server = TestServer::start().await;
    // The client closes: the server echoes and ends its side.
    let mut client = server.connect(&server.token("closer")).await;
    client.ws.close(None).await.unwrap();
    let mut rest = client.ws.into_inner();
    expect_clean_end(&mut rest, "after the client's close").await;
    // The server closes (here for a binary frame, a policy violation):
    // the same ending after its close frame.
    let mut client = server.connect(&server.token("closed")).await;
    client.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    let (code, _) = client.recv_close().await;
    assert_eq!(code, 1008);
    let mut rest = client.ws.into_inner();
    expect_clean_end(&mut rest, "after the server's close").await;
}

#[tokio::test]
async fn a_client_close_notify_ends_the_session_cleanly() {
    let server = TestServer::start().await;
    let client = server.connect(&server.token("leaver")).await;
    let mut tls = client.ws.into_inner();
    // close_notify, then the end of the client's sending side: the server
    // takes it for the end of the session and ends its own side the same way.
    tls.shutdown().await.unwrap();
    expect_clean_end(&mut tls, "after the client's close_notify").await;
    // The server goes on serving.
    let mut client = server.connect(&server.token("after")).await;
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv().await["type"], "pong");
}

/// Reads `stream` to its end, which must be a TLS close_notify: rustls
/// reports a connection cut without one as an error.
async fn expect_clean_end(stream: &mut (impl AsyncRead + Unpin), when: &str) {
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("the server ends the connection {when}"))
        .unwrap_or_else(|e| panic!("a clean TLS close {when}: {e}"));
}

/// A TLS record header: handshake content, `len` bytes of payload.
fn handshake_record(len: u16) -> [u8; 5] {
    let [hi, lo] = len.to_be_bytes();
    [0x16, 0x03, 0x01, hi, lo]
}

/// Reads `ws` until the connection ends; the error it ends with.
async fn end_error<S>(ws: &mut WebSocketStream<S>) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the server ends the connection within the wait")
        {
            Some(Ok(_)) => continue,
            Some(Err(e)) => return e.to_string(),
            None => return "closed without an error".into(),
        }
    }
}

#[tokio::test]
async fn a_forged_record_after_the_handshake_is_refused_with_bad_record_mac() {
    let server = TestServer::start().await;
    let config = client_tls_config(&server.pki.ca.cert_pem, &[b"http/1.1"], None);
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let tamper = Tamper {
        tcp,
        armed: armed.clone(),
    };
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tamper)
        .await
        .expect("TLS handshake");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let req = server.bearer_request(&server.token("forger"));
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .expect("upgrade");
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    armed.store(true, Ordering::SeqCst);
    let ping = json!({"type": "ping"}).to_string();
    ws.send(Message::Text(ping.into())).await.unwrap();
    let error = end_error(&mut ws).await;
    assert!(error.contains("BadRecordMac"), "{error}");
    // The server goes on serving.
    let mut client = server.connect(&server.token("after")).await;
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv().await["type"], "pong");
}

#[tokio::test]
async fn an_unprotected_record_after_the_handshake_is_refused() {
    let server = TestServer::start().await;
    let mut client = server.connect(&server.token("plain")).await;
    // A handshake record in the clear, under the TLS layer.
    let tcp = client.ws.get_mut().get_mut().0;
    tcp.write_all(&[0x16, 0x03, 0x03, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    // rustls takes every record after the handshake for a protected one.
    let error = end_error(&mut client.ws).await;
    assert!(error.contains("BadRecordMac"), "{error}");
}

/// Sends `n` key updates in a row, each asking for the server's too.
async fn key_updates(client: &mut common::Client, n: usize) {
    for _ in 0..n {
        let tls = client.ws.get_mut();
        if tls.get_mut().1.refresh_traffic_keys().is_err() || tls.flush().await.is_err() {
            break;
        }
    }
}

#[tokio::test]
async fn a_flood_of_key_updates_without_data_is_refused() {
    let server = TestServer::start().await;
    // A client may ask for 32 in a row (rustls, as BoringSSL), then it must
    // send data.
    let mut client = server.connect(&server.token("rekeyer")).await;
    key_updates(&mut client, 30).await;
    client.send(json!({"type": "ping", "id": "p"})).await;
    assert_eq!(client.recv().await["type"], "pong");
    let mut client = server.connect(&server.token("flooder")).await;
    key_updates(&mut client, 40).await;
    let error = end_error(&mut client.ws).await;
    assert!(error.contains("close_notify"), "{error}");
}

#[tokio::test]
async fn an_oversized_handshake_message_is_refused_without_being_kept() {
    // A long deadline: the connection must end for its size, not its time.
    let server = TestServer::start_with(|c| c.server.handshake_timeout_ms = 60_000).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    // A ClientHello announced at 1 MiB, sent in full 16 KiB records: a
    // server that kept records until the message were whole would hold all
    // of it (handshake messages are refused past 64 KiB).
    const RECORD: usize = 16 * 1024;
    let mut first = handshake_record(RECORD as u16).to_vec();
    first.extend_from_slice(&[0x01, 0x10, 0x00, 0x00]);
    first.resize(5 + RECORD, 0);
    let mut next = handshake_record(RECORD as u16).to_vec();
    next.resize(5 + RECORD, 0);
    let mut sent = 0;
    if tcp.write_all(&first).await.is_ok() {
        sent += RECORD;
        // 256 KiB in all, well past the bound and well short of 1 MiB.
        while sent < 256 * 1024 {
            match tokio::time::timeout(Duration::from_secs(2), tcp.write_all(&next)).await {
                Ok(Ok(())) => sent += RECORD,
                // Refused (reset), or the server stopped reading.
                _ => break,
            }
        }
    }
    let mut buf = [0u8; 512];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // An alert, then the end.
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection is still open after {sent} bytes"
    );
    // The server goes on serving.
    let mut client = server.connect(&server.token("after")).await;
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv().await["type"], "pong");
}
