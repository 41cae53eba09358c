//! Rooms over the wire: membership, broadcast, identity stamping, order,
//! acks, delete, kick, permissions, e2e rooms, recovery.

mod common;

use std::time::Duration;

use common::TestServer;
use serde_json::json;

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn broadcast_reaches_members_only_with_server_stamped_identity() {
    let server = TestServer::start().await;
    let mut alice = server.member("alice", "general").await;
    let mut bob = server.member("bob", "general").await;
    let mut outsider = server.connect(&server.token("olga")).await;

    let ack = alice
        .say("general", "c1", "<img src=x onerror=alert(1)>")
        .await;
    assert_eq!(ack["id"], "c1");
    assert_eq!(ack["room"], "general");
    let seq = ack["seq"].as_u64().unwrap();
    assert!(seq >= 1);

    let message = bob.recv_type("message").await;
    assert_eq!(message["room"], "general");
    assert_eq!(message["seq"], seq);
    assert_eq!(message["body"], "<img src=x onerror=alert(1)>");
    assert_eq!(message["from"], json!({"sub": "alice", "name": "Alice"}));
    assert_ne!(message["id"], "c1", "the server assigns its own id");
    assert!(message["ts"].as_str().unwrap().contains('T'));
    outsider.expect_silence(QUIET).await;
}

#[tokio::test]
async fn a_send_claiming_another_sender_is_refused_with_ref() {
    let server = TestServer::start().await;
    let mut mallory = server.member("mallory", "general").await;
    let mut bob = server.member("bob", "general").await;
    mallory
        .send(
            json!({"type": "send", "room": "general", "id": "forge-1", "body": "hi",
                     "from": {"sub": "admin", "name": "Admin"}}),
        )
        .await;
    let error = mallory.recv().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "invalid_message");
    assert_eq!(error["ref"], "forge-1");
    for field in [json!({"seq": 99}), json!({"ts": "2020-01-01T00:00:00Z"})] {
        let mut frame = json!({"type": "send", "room": "general", "id": "forge-2", "body": "x"});
        frame
            .as_object_mut()
            .unwrap()
            .extend(field.as_object().unwrap().clone());
        mallory.send(frame).await;
        let error = mallory.recv().await;
        assert_eq!(
            (error["code"].as_str(), error["ref"].as_str()),
            (Some("invalid_message"), Some("forge-2"))
        );
    }
    bob.expect_silence(QUIET).await;
}

#[tokio::test]
async fn seq_increases_and_every_member_sees_the_same_order() {
    let server = TestServer::start().await;
    let mut alice = server.member("alice", "general").await;
    let mut bob = server.member("bob", "general").await;
    let mut carol = server.member("carol", "general").await;
    for i in 0..20 {
        alice
            .send(json!({"type": "send", "room": "general", "id": format!("a{i}"), "body": format!("from alice {i}")}))
            .await;
        bob.send(json!({"type": "send", "room": "general", "id": format!("b{i}"), "body": format!("from bob {i}")}))
            .await;
    }
    let mut seen = Vec::new();
    for _ in 0..40 {
        let m = carol.recv_type("message").await;
        seen.push((
            m["seq"].as_u64().unwrap(),
            m["body"].as_str().unwrap().to_string(),
        ));
    }
    assert!(seen.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{seen:?}");
    // Each sender's own messages keep their order.
    let alice_bodies: Vec<_> = seen
        .iter()
        .filter(|(_, b)| b.starts_with("from alice"))
        .map(|(_, b)| b.clone())
        .collect();
    assert_eq!(
        alice_bodies,
        (0..20)
            .map(|i| format!("from alice {i}"))
            .collect::<Vec<_>>()
    );
    // Acks carry the seq the message got.
    let mut acks = 0;
    while acks < 20 {
        let frame = alice.recv().await;
        if frame["type"] == "ack" {
            let seq = frame["seq"].as_u64().unwrap();
            let id = frame["id"].as_str().unwrap();
            let n: usize = id[1..].parse().unwrap();
            assert!(
                seen.iter()
                    .any(|(s, b)| *s == seq && *b == format!("from alice {n}"))
            );
            acks += 1;
        }
    }
}

#[tokio::test]
async fn send_and_leave_need_membership() {
    let server = TestServer::start().await;
    let mut alice = server.connect(&server.token("alice")).await;
    alice
        .send(json!({"type": "send", "room": "general", "id": "x1", "body": "hi"}))
        .await;
    let e = alice.recv().await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("not_joined"), Some("x1"))
    );
    alice
        .send(json!({"type": "leave", "room": "general"}))
        .await;
    assert_eq!(alice.recv().await["code"], "not_joined");

    alice.join("general").await;
    alice.send(json!({"type": "join", "room": "general"})).await;
    assert_eq!(alice.recv().await["code"], "conflict");
    alice
        .send(json!({"type": "leave", "room": "general"}))
        .await;
    let left = alice.recv().await;
    assert_eq!(
        (left["type"].as_str(), left["reason"].as_str()),
        (Some("left"), Some("left"))
    );

    let mut bob = server.member("bob", "general").await;
    bob.say("general", "b1", "anyone?").await;
    alice.expect_silence(QUIET).await;

    alice.send(json!({"type": "join", "room": "nowhere"})).await;
    assert_eq!(alice.recv().await["code"], "unknown_room");
}

#[tokio::test]
async fn delete_by_author_moderator_and_not_others() {
    let server = TestServer::start().await;
    let mut alice = server.member("alice", "general").await;
    let mut bob = server.member("bob", "general").await;
    let mut moderator = server
        .connect(&server.token_with_roles("mod", &["moderator"]))
        .await;
    moderator.join("general").await;

    let first = alice.say("general", "a1", "one").await["seq"]
        .as_u64()
        .unwrap();
    let second = alice.say("general", "a2", "two").await["seq"]
        .as_u64()
        .unwrap();

    // Someone else: refused, nothing broadcast.
    bob.send(json!({"type": "delete", "room": "general", "seq": first}))
        .await;
    let e = bob.recv_type("error").await;
    assert_eq!(e["code"], "forbidden");

    // The author.
    alice
        .send(json!({"type": "delete", "room": "general", "seq": first}))
        .await;
    let d = bob.recv_type("deleted").await;
    assert_eq!(
        d,
        json!({"type": "deleted", "room": "general", "seq": first, "by": "alice"})
    );

    // A moderator, on someone else's message.
    moderator
        .send(json!({"type": "delete", "room": "general", "seq": second}))
        .await;
    let d = bob.recv_type("deleted").await;
    assert_eq!(
        (d["seq"].as_u64(), d["by"].as_str()),
        (Some(second), Some("mod"))
    );

    // Already gone.
    moderator
        .send(json!({"type": "delete", "room": "general", "seq": second}))
        .await;
    assert_eq!(moderator.recv_type("error").await["code"], "conflict");

    // Deleted messages are not replayed.
    let mut late = server.connect(&server.token("late")).await;
    late.send(json!({"type": "join", "room": "general", "since": 0}))
        .await;
    let joined = late.recv().await;
    assert_eq!(joined["seq"].as_u64(), Some(second));
    late.expect_silence(QUIET).await;
}

#[tokio::test]
async fn kick_by_moderator_only() {
    let server = TestServer::start().await;
    let mut alice = server.member("alice", "general").await;
    let mut bob = server.member("bob", "general").await;
    let mut admin = server
        .connect(&server.token_with_roles("root", &["admin"]))
        .await;
    admin.join("general").await;

    alice
        .send(json!({"type": "kick", "room": "general", "user": "bob"}))
        .await;
    assert_eq!(alice.recv().await["code"], "forbidden");

    admin
        .send(json!({"type": "kick", "room": "general", "user": "bob"}))
        .await;
    let left = bob.recv_type("left").await;
    assert_eq!(
        left,
        json!({"type": "left", "room": "general", "reason": "kicked"})
    );

    // Bob no longer receives or posts in the room.
    alice.say("general", "a1", "bob is gone").await;
    bob.expect_silence(QUIET).await;
    bob.send(json!({"type": "send", "room": "general", "id": "b1", "body": "still here?"}))
        .await;
    assert_eq!(bob.recv().await["code"], "not_joined");
}

#[tokio::test]
async fn room_permissions_by_role() {
    let server = TestServer::start().await;
    let mut reader = server.member("reader", "news").await;
    reader
        .send(json!({"type": "send", "room": "news", "id": "r1", "body": "hello"}))
        .await;
    let e = reader.recv().await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("forbidden"), Some("r1"))
    );

    let mut editor = server
        .connect(&server.token_with_roles("ed", &["editor"]))
        .await;
    editor.join("news").await;
    editor.say("news", "e1", "headline").await;
    assert_eq!(reader.recv_type("message").await["body"], "headline");

    reader
        .send(json!({"type": "join", "room": "team-blue"}))
        .await;
    assert_eq!(reader.recv().await["code"], "forbidden");
    let mut staff = server
        .connect(&server.token_with_roles("sam", &["staff"]))
        .await;
    staff.join("team-blue").await;
}

#[tokio::test]
async fn token_rooms_claim_narrows_access() {
    let server = TestServer::start().await;
    let mut claims = server.claims("narrow");
    claims.roles = vec!["staff".into()];
    claims.rooms = Some(vec!["team-red".into()]);
    let mut client = server.connect(&server.mint(&claims)).await;
    client.join("team-red").await;
    client
        .send(json!({"type": "join", "room": "general"}))
        .await;
    assert_eq!(client.recv().await["code"], "forbidden");
    client
        .send(json!({"type": "join", "room": "team-blue"}))
        .await;
    assert_eq!(client.recv().await["code"], "forbidden");
}

#[tokio::test]
async fn dm_rooms_are_private_to_their_two_users() {
    let server = TestServer::start().await;
    let mut alice = server.member("alice", "dm:alice:bob").await;
    let mut bob = server.member("bob", "dm:alice:bob").await;
    let mut eve = server
        .connect(&server.token_with_roles("eve", &["admin"]))
        .await;
    eve.send(json!({"type": "join", "room": "dm:alice:bob"}))
        .await;
    assert_eq!(eve.recv().await["code"], "forbidden");
    eve.send(json!({"type": "join", "room": "dm:bob:alice"}))
        .await;
    assert_eq!(eve.recv().await["code"], "unknown_room");

    alice.say("dm:alice:bob", "a1", "psst").await;
    assert_eq!(bob.recv_type("message").await["body"], "psst");
    eve.expect_silence(QUIET).await;
}

#[tokio::test]
async fn mfa_rooms_need_an_mfa_token() {
    let server = TestServer::start().await;
    let mut plain = server.connect(&server.token("pat")).await;
    plain.send(json!({"type": "join", "room": "vault"})).await;
    assert_eq!(plain.recv().await["code"], "forbidden");

    let mut claims = server.claims("pat");
    claims.amr = vec!["pwd".into(), "mfa".into()];
    let mut strong = server.connect(&server.mint(&claims)).await;
    strong.join("vault").await;
}

#[tokio::test]
async fn e2e_rooms_carry_only_ciphertext() {
    let server = TestServer::start().await;
    let mut alice = server.member("alice", "secret").await;
    let mut bob = server.member("bob", "secret").await;
    alice
        .send(json!({"type": "send", "room": "secret", "id": "p1", "body": "plain text"}))
        .await;
    let e = alice.recv().await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("encrypted_room"), Some("p1"))
    );

    let enc = json!({"alg": "A256GCM", "kid": "room-key-1", "iv": "AAECAwQFBgcICQoL", "ct": "c2VjcmV0IGJ5dGVzIGFuZCBhIHRhZw=="});
    alice
        .send(json!({"type": "send", "room": "secret", "id": "e1", "enc": enc}))
        .await;
    let m = bob.recv_type("message").await;
    assert_eq!(m["enc"], enc);
    assert!(m.get("body").is_none());

    // And ciphertext is refused where the server expects text.
    let mut carol = server.member("carol", "general").await;
    carol
        .send(json!({"type": "send", "room": "general", "id": "e2", "enc": enc}))
        .await;
    assert_eq!(carol.recv().await["code"], "invalid_message");
}

#[tokio::test]
async fn recovery_with_since() {
    let server = TestServer::start().await;
    let mut alice = server.member("alice", "general").await;
    let mut bob = server.member("bob", "general").await;
    let first = alice.say("general", "a1", "one").await["seq"]
        .as_u64()
        .unwrap();
    bob.recv_type("message").await;
    drop(bob);
    alice.say("general", "a2", "two").await;
    alice.say("general", "a3", "three").await;

    let mut bob = server.connect(&server.token("bob")).await;
    bob.send(json!({"type": "join", "room": "general", "since": first}))
        .await;
    let joined = bob.recv().await;
    assert_eq!(joined["type"], "joined");
    assert_eq!(joined["recovered"], true);
    assert_eq!(joined["seq"].as_u64(), Some(first + 2));
    assert_eq!(bob.recv().await["body"], "two");
    assert_eq!(bob.recv().await["body"], "three");

    // Live messages follow the replay, without gaps or repeats.
    alice.say("general", "a4", "four").await;
    let m = bob.recv().await;
    assert_eq!(
        (m["body"].as_str(), m["seq"].as_u64()),
        (Some("four"), Some(first + 3))
    );
}

#[tokio::test]
async fn joined_names_the_epoch_and_e2e_and_a_foreign_epoch_replays_everything() {
    let server = TestServer::start().await;
    let mut alice = server.connect(&server.token("alice")).await;
    let joined = alice.join("secret").await;
    assert_eq!(joined["e2e"], true);
    let joined = alice.join("general").await;
    assert_eq!(joined["e2e"], false);
    let epoch = joined["epoch"].as_str().unwrap().to_string();
    assert!(!epoch.is_empty());
    for i in 0..3 {
        alice
            .say("general", &format!("a{i}"), &format!("m{i}"))
            .await;
    }
    // The same epoch: a normal recovery.
    let mut bob = server.connect(&server.token("bob")).await;
    bob.send(json!({"type": "join", "room": "general", "since": 2, "epoch": epoch}))
        .await;
    let joined = bob.recv().await;
    assert_eq!(
        (joined["recovered"].as_bool(), joined["epoch"].as_str()),
        (Some(true), Some(epoch.as_str()))
    );
    assert_eq!(bob.recv().await["body"], "m2");
    // Another epoch (a restarted node): everything held, not recovered.
    let mut carol = server.connect(&server.token("carol")).await;
    carol
        .send(json!({"type": "join", "room": "general", "since": 2, "epoch": "0123456789abcdef"}))
        .await;
    assert_eq!(carol.recv().await["recovered"], false);
    for expected in ["m0", "m1", "m2"] {
        assert_eq!(carol.recv().await["body"], expected);
    }
}

#[tokio::test]
async fn recovery_reports_a_gap_when_history_is_short() {
    let server = TestServer::start().await;
    let mut alice = server.member("alice", "small").await;
    for i in 0..6 {
        alice.say("small", &format!("a{i}"), &format!("m{i}")).await;
    }
    let mut bob = server.connect(&server.token("bob")).await;
    bob.send(json!({"type": "join", "room": "small", "since": 1}))
        .await;
    let joined = bob.recv().await;
    assert_eq!(joined["recovered"], false);
    assert_eq!(joined["seq"], 6);
    // History holds the last three.
    for expected in ["m3", "m4", "m5"] {
        assert_eq!(bob.recv().await["body"], expected);
    }
    // A since beyond the room's sequence (a restarted node): replay, not recovered.
    let mut carol = server.connect(&server.token("carol")).await;
    carol
        .send(json!({"type": "join", "room": "small", "since": 500}))
        .await;
    let joined = carol.recv().await;
    assert_eq!(joined["recovered"], false);
    assert_eq!(carol.recv().await["body"], "m3");
}
