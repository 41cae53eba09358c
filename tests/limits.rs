//! Abuse resistance over the wire: per-address and per-user caps, handshake
//! floods, bans and their expiry, trusted proxies, slow consumers, idle and
//! unanswered connections, room size.

mod common;

use std::time::Duration;

use common::{Client, TestServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn with_token(server: &TestServer, token: &str) -> http::Request<()> {
    server
        .request()
        .header("Authorization", format!("Bearer {token}"))
        .body(())
        .unwrap()
}

#[tokio::test]
async fn per_address_connection_cap() {
    let server = TestServer::start_with(|c| c.limits.max_connections_per_ip = 2).await;
    let first = server.connect(&server.token("a")).await;
    let _second = server.connect(&server.token("b")).await;
    let refused = server
        .expect_refused(
            with_token(&server, &server.token("c")),
            429,
            "too_many_connections",
        )
        .await;
    assert!(refused.headers.contains_key("retry-after"));
    drop(first);
    // The slot is released once the first session has ended.
    let mut accepted = false;
    for _ in 0..50 {
        if server
            .try_connect(with_token(&server, &server.token("c")))
            .await
            .is_ok()
        {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted, "a freed slot admits a new connection");
}

#[tokio::test]
async fn handshake_flood_from_one_address() {
    let server = TestServer::start_with(|c| {
        c.limits.handshake_rate_per_ip = 1;
        c.limits.handshake_burst_per_ip = 3;
    })
    .await;
    for i in 0..3 {
        let client = server.connect(&server.token(&format!("u{i}"))).await;
        drop(client);
    }
    server
        .expect_refused(
            with_token(&server, &server.token("u9")),
            429,
            "rate_limited",
        )
        .await;
}

#[tokio::test]
async fn per_user_connection_cap() {
    let server = TestServer::start_with(|c| c.limits.max_connections_per_user = 1).await;
    let _alice = server.connect(&server.token("alice")).await;
    server
        .expect_refused(
            with_token(&server, &server.token("alice")),
            429,
            "too_many_connections",
        )
        .await;
    let _bob = server.connect(&server.token("bob")).await;
}

#[tokio::test]
async fn per_user_rate_spans_connections() {
    let server = TestServer::start_with(|c| {
        c.limits.rate_per_sec = 1000;
        c.limits.burst = 1000;
        c.limits.user_rate_per_sec = 1;
        c.limits.user_burst = 4;
    })
    .await;
    let mut one = server.connect(&server.token("alice")).await;
    let mut two = server.connect(&server.token("alice")).await;
    for i in 0..2 {
        one.send(json!({"type": "ping", "id": format!("one{i}")}))
            .await;
        assert_eq!(one.recv().await["type"], "pong");
        two.send(json!({"type": "ping", "id": format!("two{i}")}))
            .await;
        assert_eq!(two.recv().await["type"], "pong");
    }
    two.send(json!({"type": "ping", "id": "over"})).await;
    let e = two.recv().await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("rate_limited"), Some("over"))
    );
}

#[tokio::test]
async fn repeated_failures_ban_the_address_until_the_ban_expires() {
    let server = TestServer::start_with(|c| {
        c.bans.max_failures = 3;
        c.bans.ban_secs = 1;
    })
    .await;
    for _ in 0..3 {
        server
            .expect_refused(
                with_token(&server, "forged.token.value"),
                401,
                "invalid_token",
            )
            .await;
    }
    // Banned: even a valid token is refused now.
    server
        .expect_refused(
            with_token(&server, &server.token("alice")),
            429,
            "rate_limited",
        )
        .await;
    assert_eq!(server.state.addresses.active_bans(), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        server
            .try_connect(with_token(&server, &server.token("alice")))
            .await
            .is_ok()
    );
    assert_eq!(server.state.addresses.active_bans(), 0);
}

#[tokio::test]
async fn foreign_origins_count_toward_a_ban() {
    let server = TestServer::start_with(|c| c.bans.max_failures = 2).await;
    let token = server.token("alice");
    for _ in 0..2 {
        let req = server
            .request()
            .header("Authorization", format!("Bearer {token}"))
            .header("Origin", "https://evil.test")
            .body(())
            .unwrap();
        server.expect_refused(req, 403, "origin_not_allowed").await;
    }
    server
        .expect_refused(with_token(&server, &token), 429, "rate_limited")
        .await;
}

#[tokio::test]
async fn allow_listed_addresses_are_never_banned() {
    let server = TestServer::start_with(|c| {
        c.bans.max_failures = 2;
        c.bans.allow = vec!["127.0.0.0/8".into()];
    })
    .await;
    for _ in 0..4 {
        server
            .expect_refused(
                with_token(&server, "forged.token.value"),
                401,
                "invalid_token",
            )
            .await;
    }
    assert!(
        server
            .try_connect(with_token(&server, &server.token("alice")))
            .await
            .is_ok()
    );
}

fn forwarded(server: &TestServer, token: &str, client: &str) -> http::Request<()> {
    server
        .request()
        .header("Authorization", format!("Bearer {token}"))
        .header("X-Forwarded-For", client)
        .body(())
        .unwrap()
}

/// Two failed handshakes in the name of `client` (a ban with max_failures 2).
async fn fail_twice(server: &TestServer, client: &str) {
    for _ in 0..2 {
        server
            .expect_refused(
                forwarded(server, "bad.token.x", client),
                401,
                "invalid_token",
            )
            .await;
    }
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    // Trusted: bans fall on the forwarded client, not on the proxy.
    let server = TestServer::start_with(|c| {
        c.bans.max_failures = 2;
        c.server.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    fail_twice(&server, "203.0.113.9").await;
    let good = server.token("alice");
    server
        .expect_refused(
            forwarded(&server, &good, "203.0.113.9"),
            429,
            "rate_limited",
        )
        .await;
    let other = server.try_connect(forwarded(&server, &good, "203.0.113.10"));
    assert!(other.await.is_ok());

    // Untrusted: the header is ignored and the peer itself is banned.
    let server = TestServer::start_with(|c| c.bans.max_failures = 2).await;
    fail_twice(&server, "203.0.113.9").await;
    let good = server.token("alice");
    server
        .expect_refused(
            forwarded(&server, &good, "203.0.113.10"),
            429,
            "rate_limited",
        )
        .await;
}

#[tokio::test]
async fn rooms_have_a_member_cap() {
    let server = TestServer::start_with(|c| c.limits.max_members_per_room = 2).await;
    let _a = server.member("a", "general").await;
    let _b = server.member("b", "general").await;
    let mut c = server.connect(&server.token("c")).await;
    c.send(json!({"type": "join", "room": "general"})).await;
    assert_eq!(c.recv().await["code"], "forbidden");
}

#[tokio::test]
async fn clients_that_stop_answering_are_closed_with_4010() {
    let server = TestServer::start_with(|c| {
        c.session.ping_interval_secs = 1;
        c.session.read_timeout_secs = 2;
    })
    .await;
    let mut silent = server.connect(&server.token("silent")).await;
    // Not polled: the client never answers the server's pings.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(silent.recv_close().await, (4010, "idle_timeout".into()));
}

#[tokio::test]
async fn the_server_pings_every_interval_and_answered_pings_keep_the_connection() {
    let server = TestServer::start_with(|c| {
        c.session.ping_interval_secs = 1;
        c.session.read_timeout_secs = 2;
    })
    .await;
    let mut client = server.connect(&server.token("answering")).await;
    // Polling answers every WebSocket ping with a pong, past the read
    // timeout: only the pongs keep the connection open.
    let until = tokio::time::Instant::now() + Duration::from_millis(3500);
    let mut pings = 0;
    while let Ok(frame) = tokio::time::timeout_at(until, client.ws.next()).await {
        match frame {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Close(frame))) => panic!("closed after {pings} pings: {frame:?}"),
            Some(Ok(_)) => {}
            other => panic!("unexpected after {pings} pings: {other:?}"),
        }
    }
    assert!(pings >= 3, "{pings} pings in 3.5 s at one a second");
    client.send(json!({"type": "ping", "id": "still"})).await;
    assert_eq!(client.recv().await["type"], "pong");
}

#[tokio::test]
async fn answering_pings_keeps_a_connection_but_not_an_idle_session() {
    let server = TestServer::start_with(|c| {
        c.session.ping_interval_secs = 1;
        c.session.read_timeout_secs = 3;
        c.session.idle_timeout_secs = 2;
    })
    .await;
    let mut client = server.connect(&server.token("idle")).await;
    // The client answers WebSocket pings (by polling) and sends application
    // pings; neither counts as activity, so the session still times out.
    let mut pongs = 0;
    let close = loop {
        let ping = json!({"type": "ping", "id": format!("p{pongs}")}).to_string();
        if client.ws.send(Message::Text(ping.into())).await.is_err() {
            break None;
        }
        match tokio::time::timeout(common::WAIT, client.ws.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => pongs += 1,
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            other => panic!("unexpected: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(close, Some(4010));
    assert!(pongs >= 3, "application pings were answered meanwhile");
}

/// Reads `count` messages from `client`, checking seq order; returns the seqs.
async fn read_in_order(client: &mut Client, count: usize) -> Vec<u64> {
    let mut seqs = Vec::with_capacity(count);
    while seqs.len() < count {
        let m = client.recv_type("message").await;
        seqs.push(m["seq"].as_u64().unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "out of order");
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_is_closed_with_4009_while_others_receive_everything() {
    const MESSAGES: usize = 2000;
    /// Messages the sender has in flight before it waits for acks.
    const WINDOW: usize = 32;
    let server = TestServer::start_with(|c| {
        c.limits.rate_per_sec = 100_000;
        c.limits.burst = 100_000;
        c.limits.user_rate_per_sec = 100_000;
        c.limits.user_burst = 100_000;
        c.limits.outbound_queue_messages = 256;
        c.limits.outbound_queue_bytes = 4 * 1024 * 1024;
        c.session.close_timeout_ms = 500;
    })
    .await;
    let mut stalled = server.member("stalled", "general").await;
    let mut readers = Vec::new();
    for name in ["r1", "r2", "r3"] {
        let mut client = server.member(name, "general").await;
        readers.push(tokio::spawn(async move {
            read_in_order(&mut client, MESSAGES).await
        }));
    }
    let sender = server.member("sender", "general").await;
    let (mut sink, mut stream) = sender.ws.split();
    // 24 MB in all: more than the stalled client's socket buffers and its
    // 4 MiB queue can hold.
    let body = "x".repeat(12 * 1024);
    let (mut sent, mut acks) = (0, 0);
    while acks < MESSAGES {
        if sent < MESSAGES && sent - acks < WINDOW {
            let frame =
                json!({"type": "send", "room": "general", "id": format!("m{sent}"), "body": body});
            sink.send(Message::Text(frame.to_string().into()))
                .await
                .unwrap();
            sent += 1;
            continue;
        }
        let next = tokio::time::timeout(common::WAIT, stream.next())
            .await
            .unwrap();
        let Some(Ok(Message::Text(text))) = next else {
            panic!("sender connection ended: {next:?}");
        };
        if text.contains("\"ack\"") {
            acks += 1;
        }
    }
    for reader in readers {
        let seqs = reader.await.unwrap();
        assert_eq!(seqs.len(), MESSAGES);
    }
    // The stalled client got a part, then the close (or the cut connection).
    let mut received = 0;
    let mut close_code = None;
    loop {
        match tokio::time::timeout(common::WAIT, stalled.ws.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => received += 1,
            Ok(Some(Ok(Message::Close(frame)))) => {
                close_code = frame.map(|f| u16::from(f.code));
                break;
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => break,
            Err(_) => panic!("the stalled client was never disconnected"),
        }
    }
    assert!(
        received < MESSAGES,
        "the stalled client should have been cut off"
    );
    assert!(matches!(close_code, None | Some(4009)), "{close_code:?}");
}

#[tokio::test]
async fn proxy_protocol_names_the_client_for_bans() {
    let server = TestServer::start_with(|c| {
        c.bans.max_failures = 2;
        c.server.trusted_proxies = vec!["127.0.0.0/8".into()];
        c.server.proxy_protocol = true;
    })
    .await;
    let server = &server;
    let via = |client: &'static str| async move {
        let header = format!("PROXY TCP4 {client} 127.0.0.1 40000 443\r\n");
        server
            .try_tls_after(header.as_bytes(), &[b"http/1.1"], None)
            .await
            .expect("TLS after the PROXY header")
    };
    for _ in 0..2 {
        let refused = server
            .upgrade_on(via("203.0.113.9").await, with_token(server, "bad.token.x"))
            .await
            .err()
            .expect("refused");
        assert_eq!(refused.status, 401);
    }
    let good = server.token("alice");
    let refused = server
        .upgrade_on(via("203.0.113.9").await, with_token(server, &good))
        .await
        .err()
        .expect("the banned client is refused");
    assert_eq!(
        (refused.status, refused.body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    assert!(
        server
            .upgrade_on(via("203.0.113.10").await, with_token(server, &good))
            .await
            .is_ok()
    );
    // A trusted peer that sends no header is dropped.
    assert!(server.try_tls(&[b"http/1.1"], None).await.is_err());
}

/// Sends `body` to `room` without waiting for anything.
async fn send_message(client: &mut Client, room: &str, body: &str) {
    client
        .send(json!({"type": "send", "room": room, "id": body, "body": body}))
        .await;
}

/// Reads until `bodies.len()` acks and as many messages have arrived;
/// asserts both came in the order of `bodies` (a close fails the read).
async fn read_echoes(client: &mut Client, bodies: &[String]) {
    let (mut acks, mut messages) = (Vec::new(), Vec::new());
    while acks.len() < bodies.len() || messages.len() < bodies.len() {
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("ack") => acks.push(frame["id"].as_str().unwrap().to_string()),
            Some("message") => messages.push(frame["body"].as_str().unwrap().to_string()),
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert_eq!(acks, bodies);
    assert_eq!(messages, bodies);
}

#[tokio::test]
async fn busy_connections_get_coalesced_writes_and_a_filling_queue_is_written_at_once() {
    let server = TestServer::start_with(|c| {
        c.limits.outbound_queue_messages = 16;
        c.session.write_coalesce_ms = 1000;
        c.session.write_coalesce_frames = 2;
        // Whatever the load: a test server is never busy.
        c.session.write_coalesce_busy_percent = 0;
    })
    .await;
    let mut client = server.member("busy", "general").await;
    // A send queues two frames at once (this member's copy and the ack): a
    // batch of two, after which the writer holds back for a second.
    send_message(&mut client, "general", "m0").await;
    read_echoes(&mut client, &["m0".to_string()]).await;
    let sent = std::time::Instant::now();
    send_message(&mut client, "general", "m1").await;
    read_echoes(&mut client, &["m1".to_string()]).await;
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "the second batch came {waited:?} after its send: it was not held back"
    );
    // Held back again. Twelve sends in groups of three make 24 frames, more
    // than the queue's 16: the queue reaching half its bound ends each hold,
    // so none overflows (which would close the session with 4009).
    let bodies: Vec<String> = (2..14).map(|i| format!("m{i}")).collect();
    for group in bodies.chunks(3) {
        for body in group {
            send_message(&mut client, "general", body).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    read_echoes(&mut client, &bodies).await;
}
