//! Handshake and HTTP/2 abuse, as the advisories did it: too many and too
//! large request headers, a huge subprotocol list, HTTP/2 rapid reset, an
//! endless CONTINUATION sequence, a flood of empty DATA frames on an RFC 8441
//! WebSocket, and WebSocket compression. Each attack is refused or cut off
//! after a bounded amount of input, and an honest client is served during
//! or right after it. The HTTP/2 attacks are written as raw frames: a
//! well-behaved client library will not send them.

mod common;

use std::time::Duration;

use common::{TestServer, WAIT};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// How long an honest client may take to be served while, or right after,
/// an attack runs: a failure bound, far above what it takes.
const HONEST_DEADLINE: Duration = Duration::from_secs(20);

/// An honest client connects over HTTP/1.1, joins `general`, sends a
/// message and gets its ack, all within [`HONEST_DEADLINE`].
async fn honest_round_trip(server: &TestServer, sub: &str) {
    let served = async {
        let mut client = server.member(sub, "general").await;
        let ack = client.say("general", "honest-1", "still served").await;
        assert_eq!(ack["type"], "ack", "{ack}");
    };
    tokio::time::timeout(HONEST_DEADLINE, served)
        .await
        .unwrap_or_else(|_| panic!("{sub} was not served within {HONEST_DEADLINE:?}"));
}

// ---------------------------------------------------------------------------
// HTTP/1.1 upgrades, written by hand.

/// A valid HTTP/1.1 upgrade request for `token`, with `extra` header lines
/// (each ending in CRLF) before the blank line.
fn upgrade_request(server: &TestServer, token: &str, extra: &str) -> Vec<u8> {
    let port = server.addr.port();
    format!(
        "GET /ws HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: securechat.v1\r\nAuthorization: Bearer {token}\r\n\
         {extra}\r\n"
    )
    .into_bytes()
}

/// The header lines every upgrade request above carries.
const UPGRADE_HEADERS: usize = 7;

/// `count` filler header lines.
fn filler_headers(count: usize) -> String {
    (0..count).map(|i| format!("X-Filler-{i}: x\r\n")).collect()
}

/// What the server answered to a request written by hand.
struct Answer {
    /// The status of the response.
    status: u16,
    /// The response head, lower-cased.
    head: String,
    /// The TLS stream, for what follows a 101.
    tls: TlsStream<TcpStream>,
}

/// Writes `request` on a new TLS connection (ALPN http/1.1) and reads the
/// response head; the write runs alongside, so a server that answers
/// before the request is all in is heard.
async fn send_http1(server: &TestServer, request: &[u8]) -> Answer {
    let tls = server.tls(&[b"http/1.1"], None).await;
    let (mut read, mut write) = tokio::io::split(tls);
    let writing = async {
        // The server may close before it has read everything.
        let _ = write.write_all(request).await;
        let _ = write.flush().await;
    };
    let reading = async {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            match read.read_u8().await {
                Ok(byte) => head.push(byte),
                Err(e) => panic!(
                    "no response head ({e}); read so far: {:?}",
                    String::from_utf8_lossy(&head)
                ),
            }
            assert!(head.len() < 8192, "no end of the response head");
        }
        String::from_utf8(head).unwrap().to_ascii_lowercase()
    };
    let ((), head) = tokio::time::timeout(WAIT, async { tokio::join!(writing, reading) })
        .await
        .expect("a response within the wait");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Answer {
        status,
        head,
        tls: read.unsplit(write),
    }
}

/// Whether the server closes `stream` (end of stream or a reset) within the
/// wait, reading and discarding whatever comes before.
async fn closed_by_server(stream: &mut (impl AsyncRead + Unpin)) -> bool {
    let mut buf = [0u8; 4096];
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

/// A refusal for a request head over hyper's limits: 431, and the
/// connection closed.
async fn expect_431_and_close(mut answer: Answer, what: &str) {
    assert_eq!(answer.status, 431, "{what}: {}", answer.head);
    assert!(
        answer.head.contains("connection: close"),
        "{what}: {}",
        answer.head
    );
    assert!(
        closed_by_server(&mut answer.tls).await,
        "{what}: still open"
    );
}

/// ws CVE-2024-37890 sent an upgrade with more headers than the server
/// could take, and tungstenite CVE-2023-43669 one huge header: here both
/// are answered at once with 431 and the connection is closed, at the
/// limits of 64 headers and a 16 KiB request head, while a request just
/// within each limit upgrades.
#[tokio::test]
async fn too_many_or_too_large_headers_get_431_before_the_upgrade() {
    let server = TestServer::start().await;
    let token = server.token("attacker");

    let hundred = upgrade_request(&server, &token, &filler_headers(100));
    let answer = send_http1(&server, &hundred).await;
    expect_431_and_close(answer, "100 headers").await;

    // 64 headers in all are within the limit, 65 are not.
    let at_limit = upgrade_request(&server, &token, &filler_headers(64 - UPGRADE_HEADERS));
    assert_eq!(
        send_http1(&server, &at_limit).await.status,
        101,
        "64 headers"
    );
    let over = upgrade_request(&server, &token, &filler_headers(65 - UPGRADE_HEADERS));
    expect_431_and_close(send_http1(&server, &over).await, "65 headers").await;

    let huge = format!("X-Filler: {}\r\n", "a".repeat(16 * 1024));
    let answer = send_http1(&server, &upgrade_request(&server, &token, &huge)).await;
    expect_431_and_close(answer, "one 16 KiB header").await;

    // A 15 KiB header still fits the 16 KiB head with the rest.
    let large = format!("X-Filler: {}\r\n", "a".repeat(15 * 1024));
    let answer = send_http1(&server, &upgrade_request(&server, &token, &large)).await;
    assert_eq!(answer.status, 101, "one 15 KiB header: {}", answer.head);

    honest_round_trip(&server, "honest").await;
}
