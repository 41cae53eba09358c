//! Several nodes sharing rooms through Redis: one order across nodes,
//! recovery on another node, signed bus messages, Redis restarts, a killed
//! node, a frozen node. Each test runs its own `redis-server`; without one
//! the tests say so and pass, unless `SECURECHAT_REQUIRE_REDIS=1`.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::redis::RedisServer;
use common::{Client, TestServer};
use securechat::config::{BrokerKind, Config};
use serde_json::json;

/// A cluster: its Redis, the shared cluster secret, the first node.
struct Cluster {
    redis: RedisServer,
    secret: PathBuf,
    _dir: tempfile::TempDir,
    first: TestServer,
}

fn redis_node(url: String, secret: PathBuf) -> impl FnOnce(&mut Config) + Send + 'static {
    move |c: &mut Config| {
        c.broker.kind = BrokerKind::Redis;
        c.broker.url = url;
        c.broker.secret_file = Some(secret);
        c.broker.connect_timeout_ms = 1_000;
        c.broker.response_timeout_ms = 2_000;
        c.broker.max_backoff_ms = 200;
    }
}

impl Cluster {
    async fn start() -> Option<Self> {
        let redis = RedisServer::start().await?;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("cluster.secret");
        std::fs::write(&secret, common::rand_hex(32)).unwrap();
        let first = TestServer::start_with(redis_node(redis.url(), secret.clone())).await;
        Some(Self {
            redis,
            secret,
            _dir: dir,
            first,
        })
    }

    async fn node(&self) -> TestServer {
        TestServer::start_like(
            &self.first,
            redis_node(self.redis.url(), self.secret.clone()),
        )
        .await
    }

    async fn isolated_node(&self) -> (TestServer, tokio::runtime::Runtime) {
        TestServer::start_isolated(
            &self.first,
            redis_node(self.redis.url(), self.secret.clone()),
        )
        .await
    }
}

/// Reads `count` messages; returns (seq, body) pairs.
async fn messages(client: &mut Client, count: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    while out.len() < count {
        let m = client.recv_type("message").await;
        out.push((
            m["seq"].as_u64().unwrap(),
            m["body"].as_str().unwrap().to_string(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_every_node_reach_every_node_in_one_order() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let b = cluster.node().await;
    let mut alice = cluster.first.member("alice", "general").await;
    let mut bob = b.member("bob", "general").await;
    let mut carol = b.member("carol", "general").await;
    for i in 0..10 {
        alice
            .send(json!({"type": "send", "room": "general", "id": format!("a{i}"), "body": format!("alice {i}")}))
            .await;
        bob.send(json!({"type": "send", "room": "general", "id": format!("b{i}"), "body": format!("bob {i}")}))
            .await;
    }
    let seen_by_alice = messages(&mut alice, 20).await;
    let seen_by_carol = messages(&mut carol, 20).await;
    assert_eq!(seen_by_alice, seen_by_carol, "both nodes deliver one order");
    let seqs: Vec<u64> = seen_by_alice.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    // The sender identity crossed nodes as stamped by the sending node.
    let mut dave = b.member("dave", "general").await;
    alice.say("general", "x", "stamped").await;
    let m = dave.recv_type("message").await;
    assert_eq!(m["from"]["sub"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_on_another_node() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let b = cluster.node().await;
    let mut alice = cluster.first.member("alice", "general").await;
    let mut bob = cluster.first.member("bob", "general").await;
    let seq = alice.say("general", "a1", "one").await["seq"]
        .as_u64()
        .unwrap();
    bob.recv_type("message").await;
    drop(bob);
    for (id, body) in [("a2", "two"), ("a3", "three")] {
        alice.say("general", id, body).await;
    }
    let mut bob = b.connect(&b.token("bob")).await;
    bob.send(json!({"type": "join", "room": "general", "since": seq}))
        .await;
    let joined = bob.recv().await;
    assert_eq!(
        (joined["recovered"].as_bool(), joined["seq"].as_u64()),
        (Some(true), Some(seq + 2))
    );
    assert_eq!(
        messages(&mut bob, 2)
            .await
            .iter()
            .map(|(_, b)| b.as_str())
            .collect::<Vec<_>>(),
        ["two", "three"]
    );
    // Delete and kick cross nodes too.
    alice
        .send(json!({"type": "delete", "room": "general", "seq": seq + 1}))
        .await;
    assert_eq!(
        bob.recv_type("deleted").await["seq"].as_u64(),
        Some(seq + 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_bus_messages_are_dropped() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let mut bob = cluster.first.member("bob", "general").await;
    let mut redis = cluster.redis.client().await;
    let forged = r#"{"type":"message","room":"general","seq":1,"id":"x","from":{"sub":"admin","name":"Admin"},"body":"forged","ts":"2026-01-01T00:00:00Z"}"#;
    for payload in [
        format!("m\n{}\n{forged}", "00".repeat(32)),
        format!("m\nnot-hex\n{forged}"),
        forged.to_string(),
        "k\n00\nbob".to_string(),
    ] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("securechat:{general}")
            .arg(payload)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    bob.expect_silence(Duration::from_millis(300)).await;
    // The node still works, and bob is still a member (the forged kick failed).
    let mut alice = cluster.first.member("alice", "general").await;
    alice.say("general", "a1", "genuine").await;
    let m = bob.recv_type("message").await;
    assert_eq!(
        (m["body"].as_str(), m["seq"].as_u64()),
        (Some("genuine"), Some(1))
    );
}

async fn wait_ready(server: &TestServer, ready: bool) {
    for _ in 0..200 {
        let (status, _) = common::http_get(server, "/readyz").await;
        if (status == 200) == ready {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "/readyz never became {}",
        if ready { "ready" } else { "not ready" }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_no_acked_message() {
    let Some(mut cluster) = Cluster::start().await else {
        return;
    };
    let b = cluster.node().await;
    let mut alice = cluster.first.member("alice", "general").await;
    let mut bob = b.member("bob", "general").await;
    alice.say("general", "a1", "before").await;
    assert_eq!(messages(&mut bob, 1).await[0].1, "before");

    cluster.redis.stop();
    wait_ready(&cluster.first, false).await;
    // A send during the outage is refused, not acked and not dropped silently.
    alice
        .send(json!({"type": "send", "room": "general", "id": "lost", "body": "during"}))
        .await;
    let e = alice.recv_type("error").await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("internal"), Some("lost"))
    );

    cluster.redis.restart().await;
    wait_ready(&cluster.first, true).await;
    wait_ready(&b, true).await;
    let mut acked = 0;
    for attempt in 0..40 {
        alice
            .send(json!({"type": "send", "room": "general", "id": format!("after{attempt}"), "body": "after"}))
            .await;
        let frame = alice.recv().await;
        let frame = if frame["type"] == "message" {
            alice.recv().await
        } else {
            frame
        };
        if frame["type"] == "ack" {
            acked = frame["seq"].as_u64().unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(acked, 2, "the sequence continues after the restart");
    let after = bob.recv_type("message").await;
    assert_eq!(
        (after["seq"].as_u64(), after["body"].as_str()),
        (Some(2), Some("after"))
    );
    // Every acked message is still in the history.
    let mut carol = b.connect(&b.token("carol")).await;
    carol
        .send(json!({"type": "join", "room": "general", "since": 0}))
        .await;
    assert_eq!(carol.recv().await["recovered"], true);
    let bodies: Vec<String> = messages(&mut carol, 2)
        .await
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    assert_eq!(bodies, ["before", "after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_recover_elsewhere() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let (doomed, runtime) = cluster.isolated_node().await;
    let mut alice = cluster.first.member("alice", "general").await;
    let mut bob = doomed.member("bob", "general").await;
    let seq = alice.say("general", "a1", "one").await["seq"]
        .as_u64()
        .unwrap();
    assert_eq!(messages(&mut bob, 1).await[0].0, seq);

    runtime.shutdown_background();
    for (id, body) in [("a2", "two"), ("a3", "three")] {
        alice.say("general", id, body).await;
    }
    // Bob's connection died with the node; he reconnects to a live node.
    let mut bob = cluster.first.connect(&cluster.first.token("bob")).await;
    bob.send(json!({"type": "join", "room": "general", "since": seq}))
        .await;
    assert_eq!(bob.recv().await["recovered"], true);
    let bodies: Vec<String> = messages(&mut bob, 2)
        .await
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    assert_eq!(bodies, ["two", "three"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_does_not_slow_the_others_and_catches_up() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let b = cluster.node().await;
    let (slow, runtime) = cluster.isolated_node().await;
    let mut alice = cluster.first.member("alice", "general").await;
    let mut bob = b.member("bob", "general").await;
    let mut carol = slow.member("carol", "general").await;

    // Freeze the slow node's only worker thread for a while.
    let thawed = Arc::new(AtomicBool::new(false));
    let flag = thawed.clone();
    runtime.spawn(async move {
        std::thread::sleep(Duration::from_secs(3));
        flag.store(true, Ordering::SeqCst);
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..5 {
        alice
            .say("general", &format!("a{i}"), &format!("m{i}"))
            .await;
    }
    let seen = messages(&mut bob, 5).await;
    assert!(
        !thawed.load(Ordering::SeqCst),
        "the other nodes delivered while the slow node was frozen"
    );
    // Once it runs again, the slow node's member receives everything, in order.
    assert_eq!(messages(&mut carol, 5).await, seen);
    runtime.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_redis_data_is_lost_keeps_delivering() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let b = cluster.node().await;
    let mut alice = cluster.first.member("alice", "general").await;
    let mut bob = b.connect(&b.token("bob")).await;
    bob.send(json!({"type": "join", "room": "general"})).await;
    let joined = bob.recv().await;
    let epoch = joined["epoch"].as_str().unwrap().to_string();
    for i in 0..3 {
        alice
            .say("general", &format!("a{i}"), &format!("m{i}"))
            .await;
    }
    assert_eq!(messages(&mut bob, 3).await.last().unwrap().0, 3);

    // Redis loses everything (a restart without persistence, a FLUSHALL).
    let mut redis = cluster.redis.client().await;
    let _: String = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .unwrap();
    let ack = alice.say("general", "b0", "after").await;
    assert_eq!(ack["seq"], 1, "the sequence starts again");
    // Members see the new run instead of taking it for duplicates.
    assert_eq!(messages(&mut bob, 1).await, [(1, "after".to_string())]);
    // A client rejoining with a seq of the old run gets the new run replayed.
    let mut carol = b.connect(&b.token("carol")).await;
    carol
        .send(json!({"type": "join", "room": "general", "since": 2, "epoch": epoch}))
        .await;
    let joined = carol.recv().await;
    assert_eq!(joined["recovered"], false);
    assert_ne!(joined["epoch"].as_str().unwrap(), epoch);
    assert_eq!(messages(&mut carol, 1).await, [(1, "after".to_string())]);
}
