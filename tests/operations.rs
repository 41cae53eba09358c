//! What an operator relies on: metrics, certificate and key rotation
//! without downtime, health.

mod common;

use std::time::Duration;

use common::{TestServer, served_serial};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn scrape(server: &TestServer) -> String {
    let addr = server.metrics_addr.expect("metrics are on");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(common::WAIT, tcp.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the first sample whose line starts with `prefix`.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_describe_the_node_on_their_own_listener() {
    // Alice's send queues her copy and the ack at once: a batch of two,
    // which holds her writer back (`securechat_write_holds_total`).
    let server = TestServer::start_with(|c| {
        c.session.write_coalesce_frames = 2;
        // Whatever the load: a test server is never busy.
        c.session.write_coalesce_busy_percent = 0;
        c.session.write_coalesce_ms = 50;
    })
    .await;
    let mut alice = server.member("alice", "general").await;
    let mut bob = server.member("bob", "general").await;
    alice.say("general", "m1", "hello").await;
    bob.recv_type("message").await;
    let _ = server.try_connect(server.request().body(()).unwrap()).await;

    let text = scrape(&server).await;
    for name in [
        "securechat_connections_open",
        "securechat_connections_max",
        "securechat_handshakes_total{outcome=\"accepted\"",
        "securechat_handshakes_total{outcome=\"refused\",reason=\"missing_token\"}",
        "securechat_auth_failures_total{reason=\"missing_token\"}",
        "securechat_messages_received_total",
        "securechat_messages_delivered_total",
        "securechat_bytes_in_total",
        "securechat_bytes_out_total",
        "securechat_write_holds_total",
        "securechat_write_coalescing",
        "securechat_fanout_seconds_bucket",
        "securechat_rooms",
        "securechat_room_members",
        "securechat_bans_active",
        "securechat_certificate_expiry_timestamp_seconds",
        "securechat_build_info{version=",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    // The gauges read off this node (other servers in this test process
    // share counters, not these).
    assert!(sample(&text, "securechat_room_members").unwrap() >= 2.0);
    // Alice's message, written to both of them.
    assert!(sample(&text, "securechat_messages_delivered_total").unwrap() >= 2.0);
    assert!(sample(&text, "securechat_bytes_out_total").unwrap() >= 10.0);
    let expiry = sample(&text, "securechat_certificate_expiry_timestamp_seconds").unwrap();
    assert!(expiry > securechat::auth::jwt::now_unix() as f64);

    // Not on the public port.
    let (status, _) = common::http_get(&server, "/metrics").await;
    assert_eq!(status, 404);
}

/// Waits until the server presents a certificate with `serial`.
async fn wait_for_serial(server: &TestServer, serial: &str) -> bool {
    for _ in 0..100 {
        if served_serial(server).await == serial {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn certificates_rotate_when_the_files_change() {
    let server = TestServer::start().await;
    let old_serial = served_serial(&server).await;
    let mut open = server.member("alice", "general").await;

    let renewed = server
        .pki
        .authority
        .server_cert(&["localhost".into(), "127.0.0.1".into()], 60)
        .unwrap();
    let new_serial = securechat::tls::cert_info(
        &rustls_pki_types::pem::PemObject::from_pem_slice(renewed.cert_pem.as_bytes()).unwrap(),
    )
    .unwrap()
    .serial;
    assert_ne!(old_serial, new_serial);
    common::replace(server.dir.path(), "server.key", &renewed.key_pem);
    common::replace(server.dir.path(), "server.crt", &renewed.cert_pem);
    assert!(
        wait_for_serial(&server, &new_serial).await,
        "the renewed certificate is served"
    );
    // The connection opened before the rotation still works.
    open.send(json!({"type": "ping", "id": "still"})).await;
    assert_eq!(open.recv().await["id"], "still");

    // A broken file is refused; the renewed certificate stays in service.
    common::replace(
        server.dir.path(),
        "server.crt",
        "-----BEGIN CERTIFICATE-----\ngarbage\n",
    );
    let outcome = server.reloader.reload();
    assert!(!outcome.tls_ok);
    assert_eq!(served_serial(&server).await, new_serial);
    let mut client = server.connect(&server.token("bob")).await;
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv().await["type"], "pong");
}

#[tokio::test]
async fn a_key_that_does_not_match_the_certificate_is_not_loaded() {
    let server = TestServer::start().await;
    let serial = served_serial(&server).await;
    // The client key with the server certificate.
    common::replace(server.dir.path(), "server.key", &server.pki.client.key_pem);
    let outcome = server.reloader.reload();
    assert!(!outcome.tls_ok);
    assert_eq!(served_serial(&server).await, serial);
}

#[tokio::test]
async fn token_keys_rotate_on_reload() {
    let server = TestServer::start().await;
    let old_token = server.token("alice");
    let new_secret = securechat::config::Secret::new(common::rand_hex(32).into_bytes());
    common::replace(
        server.dir.path(),
        "jwt.secret",
        std::str::from_utf8(new_secret.expose()).unwrap(),
    );
    let outcome = server.reloader.reload();
    assert!(outcome.keys_ok && outcome.tls_ok);
    let minter = securechat::auth::jwt::Minter::hmac(
        "hs",
        securechat::config::KeyAlgorithm::HS256,
        &new_secret,
    );
    let new_token = minter.mint(&server.claims("alice")).unwrap();
    let _client = server.connect(&new_token).await;
    let req = server
        .request()
        .header("Authorization", format!("Bearer {old_token}"))
        .body(())
        .unwrap();
    server.expect_refused(req, 401, "invalid_token").await;
    // The ES256 key, untouched, still verifies: two kids rotate independently.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("es".into());
    let key = jsonwebtoken::EncodingKey::from_ec_pem(server.pki.es_private.as_bytes()).unwrap();
    let es_token = jsonwebtoken::encode(&header, &server.claims("carol"), &key).unwrap();
    let _carol = server.connect(&es_token).await;

    // A broken secret file keeps the keys in service.
    common::replace(server.dir.path(), "jwt.secret", "short");
    assert!(!server.reloader.reload().keys_ok);
    let _again = server.connect(&new_token).await;
}
