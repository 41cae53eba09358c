//! Bad input on an open connection: malformed, unknown, oversized and binary
//! frames, rate limits, token expiry and refresh.

mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn malformed_and_unknown_frames_get_errors_not_crashes() {
    let server = TestServer::start_with(|c| c.limits.max_invalid_frames = 20).await;
    let mut client = server.connect(&server.token("alice")).await;
    for (text, code) in [
        ("not json", "invalid_message"),
        ("[1, 2, 3]", "invalid_message"),
        // A struct's fields in order, which serde alone would take.
        (r#"["join", "general"]"#, "invalid_message"),
        (r#"["send", "general", "c1", "hello"]"#, "invalid_message"),
        (r#""ping""#, "invalid_message"),
        (r#"{"room": "general"}"#, "invalid_message"),
        (r#"{"type": "shout", "id": "s1"}"#, "unknown_type"),
        (r#"{"type": "join"}"#, "invalid_message"),
        (
            r#"{"type": "join", "room": "general", "extra": 1}"#,
            "invalid_message",
        ),
        (
            r#"{"type": "join", "room": "no spaces"}"#,
            "invalid_message",
        ),
    ] {
        client.send_raw(Message::Text(text.into())).await;
        let e = client.recv().await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some(code)),
            "{text}"
        );
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let e = {
        client
            .send_raw(Message::Text(r#"{"type": "shout", "id": "s1"}"#.into()))
            .await;
        client.recv().await
    };
    assert_eq!(e["ref"], "s1");
    // Still served.
    client.send(json!({"type": "ping", "id": "after"})).await;
    assert_eq!(client.recv().await, json!({"type": "pong", "id": "after"}));
}

#[tokio::test]
async fn repeated_invalid_frames_close_with_1008() {
    let server = TestServer::start_with(|c| c.limits.max_invalid_frames = 3).await;
    let mut client = server.connect(&server.token("alice")).await;
    for _ in 0..3 {
        client.send_raw(Message::Text("{".into())).await;
    }
    assert_eq!(client.recv_close().await.0, 1008);
}

#[tokio::test]
async fn frames_in_array_form_are_not_carried_out() {
    let server = TestServer::start().await;
    let mut alice = server.member("alice", "general").await;
    let mut bob = server.connect(&server.token("bob")).await;
    bob.send_raw(Message::Text(r#"["join", "general"]"#.into()))
        .await;
    assert_eq!(bob.recv().await["code"], "invalid_message");
    bob.send_raw(Message::Text(
        r#"["send", "general", "c1", "hello"]"#.into(),
    ))
    .await;
    assert_eq!(bob.recv().await["code"], "invalid_message");
    // Neither joined nor sent: alice hears nothing, and bob is not a member.
    alice.expect_silence(Duration::from_millis(300)).await;
    bob.send(json!({"type": "send", "room": "general", "id": "c2", "body": "hi"}))
        .await;
    assert_eq!(bob.recv().await["code"], "not_joined");
}

#[tokio::test]
async fn text_that_is_not_utf8_closes_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let server = TestServer::start().await;
    let mut client = server.connect(&server.token("alice")).await;
    let bytes: &[u8] = b"{\"type\":\"ping\",\"id\":\"\xff\xfe\"}";
    let frame = Frame::message(bytes.to_vec(), OpCode::Data(Data::Text), true);
    client.send_raw(Message::Frame(frame)).await;
    assert_eq!(client.recv_close().await, (1007, "invalid_payload".into()));
}

#[tokio::test]
async fn binary_frames_close_with_1008() {
    let server = TestServer::start().await;
    let mut client = server.connect(&server.token("alice")).await;
    client.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(client.recv_close().await, (1008, "policy_violation".into()));
}

#[tokio::test]
async fn oversized_messages_close_with_1009_and_are_not_delivered() {
    let server = TestServer::start().await;
    let mut alice = server.member("alice", "general").await;
    let mut bob = server.member("bob", "general").await;
    let body = "x".repeat(17 * 1024);
    alice
        .send(json!({"type": "send", "room": "general", "id": "big", "body": body}))
        .await;
    assert_eq!(alice.recv_close().await.0, 1009);
    bob.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn rate_limited_frames_are_refused_and_not_broadcast() {
    let server = TestServer::start_with(|c| {
        c.limits.rate_per_sec = 1;
        c.limits.burst = 3;
        c.limits.rate_strikes = 100;
    })
    .await;
    let mut alice = server.member("alice", "general").await;
    let mut bob = server.member("bob", "general").await;
    // The join used one token of the burst.
    for i in 0..5 {
        alice
            .send(json!({"type": "send", "room": "general", "id": format!("m{i}"), "body": "spam"}))
            .await;
    }
    let mut limited = Vec::new();
    let mut acked = 0;
    while acked + limited.len() < 5 {
        let frame = alice.recv().await;
        match frame["type"].as_str() {
            Some("ack") => acked += 1,
            Some("error") => {
                assert_eq!(frame["code"], "rate_limited");
                limited.push(frame["ref"].as_str().unwrap().to_string());
            }
            _ => {}
        }
    }
    assert_eq!(acked, 2, "burst 3 minus the join");
    assert_eq!(limited, ["m2", "m3", "m4"]);
    for _ in 0..2 {
        bob.recv_type("message").await;
    }
    bob.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn repeated_rate_violations_close_with_4008() {
    let server = TestServer::start_with(|c| {
        c.limits.rate_per_sec = 1;
        c.limits.burst = 1;
        c.limits.rate_strikes = 3;
    })
    .await;
    let mut client = server.connect(&server.token("alice")).await;
    for i in 0..10 {
        client
            .send(json!({"type": "ping", "id": format!("p{i}")}))
            .await;
    }
    assert_eq!(client.recv_close().await.0, 4008);
}

#[tokio::test]
async fn expiring_session_is_warned_then_closed_with_4001() {
    let server = TestServer::start_with(|c| {
        c.auth.leeway_secs = 0;
        c.session.expiry_warning_secs = 1;
    })
    .await;
    let mut claims = server.claims("alice");
    claims.exp = securechat::auth::jwt::now_unix() + 2;
    let mut client = server.connect(&server.mint(&claims)).await;
    let warning = client.recv().await;
    assert_eq!(warning["type"], "session_expiring");
    assert_eq!(
        warning["expires_at"],
        securechat::protocol::rfc3339(claims.exp)
    );
    assert_eq!(client.recv_close().await, (4001, "token_expired".into()));
}

#[tokio::test]
async fn refresh_extends_the_session_for_the_same_user_only() {
    let server = TestServer::start_with(|c| {
        c.auth.leeway_secs = 0;
        c.session.expiry_warning_secs = 2;
    })
    .await;
    let mut claims = server.claims("alice");
    claims.exp = securechat::auth::jwt::now_unix() + 3;
    let mut client = server.connect(&server.mint(&claims)).await;
    assert_eq!(client.recv().await["type"], "session_expiring");

    client
        .send(json!({"type": "refresh", "token": server.token("mallory")}))
        .await;
    let e = client.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );

    client
        .send(json!({"type": "refresh", "token": "garbage"}))
        .await;
    assert_eq!(client.recv().await["code"], "forbidden");

    let fresh = server.claims("alice");
    client
        .send(json!({"type": "refresh", "token": server.mint(&fresh)}))
        .await;
    let refreshed = client.recv().await;
    assert_eq!(refreshed["type"], "refreshed");
    assert_eq!(
        refreshed["expires_at"],
        securechat::protocol::rfc3339(fresh.exp)
    );
    // Past the old expiry the session is still open.
    tokio::time::sleep(Duration::from_secs(4)).await;
    client.send(json!({"type": "ping", "id": "still"})).await;
    assert_eq!(client.recv().await["id"], "still");
}

#[tokio::test]
async fn too_many_fragments_close_with_1009() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let server = TestServer::start_with(|c| c.limits.max_fragments_per_message = 4).await;
    let mut client = server.connect(&server.token("alice")).await;
    let text = r#"{"type":"ping","id":"frag"}"#.as_bytes();
    let send_fragmented = |pieces: usize| {
        let chunk = text.len().div_ceil(pieces);
        text.chunks(chunk)
            .enumerate()
            .map(|(i, part)| {
                let opcode = if i == 0 {
                    OpCode::Data(Data::Text)
                } else {
                    OpCode::Data(Data::Continue)
                };
                let last = (i + 1) * chunk >= text.len();
                Message::Frame(Frame::message(part.to_vec(), opcode, last))
            })
            .collect::<Vec<_>>()
    };
    // Within the limit: reassembled and answered.
    for frame in send_fragmented(4) {
        client.send_raw(frame).await;
    }
    assert_eq!(client.recv().await, json!({"type": "pong", "id": "frag"}));
    // One fragment too many.
    for frame in send_fragmented(8) {
        client.send_raw(frame).await;
    }
    assert_eq!(client.recv_close().await.0, 1009);
}
