//! Everything checked before the upgrade: credentials in the contract's
//! order, token validation, Origin, request shape. Over real TLS.

mod common;

use base64::Engine as _;
use common::{TestServer, http_get};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use securechat::auth::jwt::now_unix;

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

#[tokio::test]
async fn token_in_header_is_accepted_and_only_v1_is_answered() {
    let server = TestServer::start().await;
    let token = server.token("alice");
    let req = server
        .request()
        .header("Authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let mut client = server.try_connect(req).await.expect("accepted");
    assert_eq!(client.protocol.as_deref(), Some("securechat.v1"));
    let welcome = client.recv().await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["user"]["sub"], "alice");
    assert_eq!(welcome["user"]["name"], "Alice");
    assert_eq!(welcome["limits"]["max_message_bytes"], 16384);
    assert!(welcome["expires_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn token_in_subprotocol_is_accepted_and_never_echoed() {
    let server = TestServer::start().await;
    let token = server.token("bob");
    let req = server
        .request()
        .header(
            "Sec-WebSocket-Protocol",
            format!("securechat.v1, securechat.bearer.{token}"),
        )
        .header("Origin", "https://chat.test")
        .body(())
        .unwrap();
    let mut client = server.try_connect(req).await.expect("accepted");
    assert_eq!(client.protocol.as_deref(), Some("securechat.v1"));
    assert_eq!(client.recv().await["user"]["sub"], "bob");
}

#[tokio::test]
async fn cookie_only_when_enabled_and_only_with_origin() {
    let server = TestServer::start_with(|c| c.auth.cookie = true).await;
    let token = server.token("carol");
    let with_origin = server
        .request()
        .header("Cookie", format!("theme=dark; securechat_token={token}"))
        .header("Origin", "https://chat.test")
        .body(())
        .unwrap();
    let mut client = server.try_connect(with_origin).await.expect("accepted");
    assert_eq!(client.recv().await["user"]["sub"], "carol");

    // Without an Origin a cookie is not enough: a browser sends cookies by itself.
    let without_origin = server
        .request()
        .header("Cookie", format!("securechat_token={token}"))
        .body(())
        .unwrap();
    server
        .expect_refused(without_origin, 403, "origin_not_allowed")
        .await;

    let off = TestServer::start().await;
    let req = off
        .request()
        .header("Cookie", format!("securechat_token={}", off.token("carol")))
        .header("Origin", "https://chat.test")
        .body(())
        .unwrap();
    off.expect_refused(req, 401, "missing_token").await;
}

#[tokio::test]
async fn query_token_refused_by_default_accepted_when_enabled() {
    let server = TestServer::start().await;
    let req = server
        .request_to(&format!("/ws?token={}", server.token("dave")))
        .header("Origin", "https://chat.test")
        .body(())
        .unwrap();
    let refused = server.expect_refused(req, 401, "invalid_token").await;
    assert_eq!(
        refused.headers["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );

    let server = TestServer::start_with(|c| c.auth.allow_query_token = true).await;
    let req = server
        .request_to(&format!("/ws?token={}", server.token("dave")))
        .header("Origin", "https://chat.test")
        .body(())
        .unwrap();
    let mut client = server.try_connect(req).await.expect("accepted");
    assert_eq!(client.recv().await["user"]["sub"], "dave");
}

#[tokio::test]
async fn missing_token() {
    let server = TestServer::start().await;
    let refused = server
        .expect_refused(server.request().body(()).unwrap(), 401, "missing_token")
        .await;
    assert!(
        refused.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
}

async fn expect_token_refused(server: &TestServer, token: &str, code: &str) {
    let req = server
        .request()
        .header("Authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let refused = server.expect_refused(req, 401, code).await;
    assert_eq!(
        refused.headers["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    // The refusal never repeats the token.
    assert!(!refused.body.to_string().contains(token));
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let server = TestServer::start().await;
    let now = now_unix();

    let mut expired = server.claims("eve");
    expired.iat = now - 7200;
    expired.exp = now - 3600;
    expect_token_refused(&server, &server.mint(&expired), "token_expired").await;

    let mut early = server.claims("eve");
    early.nbf = Some(now + 3600);
    expect_token_refused(&server, &server.mint(&early), "invalid_token").await;

    let mut future_iat = server.claims("eve");
    future_iat.iat = now + 3600;
    expect_token_refused(&server, &server.mint(&future_iat), "invalid_token").await;

    let mut issuer = server.claims("eve");
    issuer.iss = Some("https://evil.test".into());
    expect_token_refused(&server, &server.mint(&issuer), "invalid_token").await;

    let mut audience = server.claims("eve");
    audience.aud = Some("someone-else".into());
    expect_token_refused(&server, &server.mint(&audience), "invalid_token").await;

    let mut no_iss = server.claims("eve");
    no_iss.iss = None;
    expect_token_refused(&server, &server.mint(&no_iss), "invalid_token").await;

    let mut no_aud = server.claims("eve");
    no_aud.aud = None;
    expect_token_refused(&server, &server.mint(&no_aud), "invalid_token").await;

    // A valid token with its signature altered.
    let good = server.token("eve");
    let (rest, sig) = good.rsplit_once('.').unwrap();
    let flipped = if sig.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{rest}.{flipped}{}", &sig[1..]);
    expect_token_refused(&server, &tampered, "invalid_token").await;

    // A valid signature over altered claims.
    let (header, _) = rest.split_once('.').unwrap();
    let claims = b64(serde_json::json!({"sub": "admin", "exp": now + 3600, "iss": "https://id.test", "aud": "securechat-test"}).to_string().as_bytes());
    expect_token_refused(
        &server,
        &format!("{header}.{claims}.{sig}"),
        "invalid_token",
    )
    .await;

    // Oversized: refused without being parsed.
    let mut big = server.claims("eve");
    big.roles = (0..600).map(|i| format!("role-{i}")).collect();
    let big = server.mint(&big);
    assert!(big.len() > 4096);
    expect_token_refused(&server, &big, "invalid_token").await;

    // Garbage.
    expect_token_refused(&server, "not-a-jwt", "invalid_token").await;
}

#[tokio::test]
async fn alg_none_is_refused() {
    let server = TestServer::start().await;
    let now = now_unix();
    let header = b64(br#"{"alg":"none","typ":"JWT","kid":"hs"}"#);
    let claims = b64(serde_json::json!({"sub": "mallory", "exp": now + 3600, "iss": "https://id.test", "aud": "securechat-test"}).to_string().as_bytes());
    expect_token_refused(&server, &format!("{header}.{claims}."), "invalid_token").await;
}

#[tokio::test]
async fn unknown_kid_and_missing_kid_are_refused() {
    let server = TestServer::start().await;
    let claims = server.claims("mallory");
    let secret = server.secret.expose().to_vec();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("old".into());
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&secret)).unwrap();
    expect_token_refused(&server, &token, "invalid_token").await;

    // Two keys are configured, so a token must say which.
    let header = Header::new(Algorithm::HS256);
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&secret)).unwrap();
    expect_token_refused(&server, &token, "invalid_token").await;
}

#[tokio::test]
async fn algorithm_confusion_is_refused() {
    let server = TestServer::start().await;
    let claims = server.claims("mallory");

    // HS256 signed with the ES256 public key as the HMAC secret, naming the ES key.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("es".into());
    let public = server.pki.es_public.as_bytes();
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(public)).unwrap();
    expect_token_refused(&server, &token, "invalid_token").await;

    // An ES256 token naming the HMAC key.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("hs".into());
    let key = EncodingKey::from_ec_pem(server.pki.es_private.as_bytes()).unwrap();
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    expect_token_refused(&server, &token, "invalid_token").await;

    // The same ES256 token naming its own key is fine.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("es".into());
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let mut client = server.connect(&token).await;
    client
        .send(serde_json::json!({"type": "ping", "id": "p"}))
        .await;
    assert_eq!(client.recv().await["type"], "pong");
}

#[tokio::test]
async fn origin_allow_list() {
    let server = TestServer::start().await;
    let token = server.token("alice");
    let request = |origin: &str| {
        server
            .request()
            .header("Authorization", format!("Bearer {token}"))
            .header("Origin", origin)
            .body(())
            .unwrap()
    };
    for origin in [
        "https://chat.test",
        "HTTPS://Chat.Test:443",
        "https://x.apps.test",
    ] {
        assert!(
            server.try_connect(request(origin)).await.is_ok(),
            "{origin}"
        );
    }
    for origin in [
        "https://evil.test",
        "http://chat.test",
        "https://chat.test:8443",
        "https://apps.test",
        "https://chat.test.evil.test",
        "null",
    ] {
        server
            .expect_refused(request(origin), 403, "origin_not_allowed")
            .await;
    }
    // No Origin with a header credential: a non-browser client.
    let req = server
        .request()
        .header("Authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    assert!(server.try_connect(req).await.is_ok());
}

#[tokio::test]
async fn foreign_origin_is_refused_before_the_token_is_looked_at() {
    let server = TestServer::start().await;
    let req = server
        .request()
        .header("Origin", "https://evil.test")
        .header("Authorization", "Bearer garbage")
        .body(())
        .unwrap();
    server.expect_refused(req, 403, "origin_not_allowed").await;
}

#[tokio::test]
async fn requests_that_are_not_upgrades() {
    let server = TestServer::start().await;
    let token = server.token("alice");
    // No securechat.v1 subprotocol offered.
    let req = http::Request::builder()
        .uri(format!("wss://localhost:{}/ws", server.addr.port()))
        .header("Host", "localhost")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("Authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    server.expect_refused(req, 400, "bad_request").await;

    // Wrong version.
    let req = server
        .request()
        .header("Authorization", format!("Bearer {token}"))
        .body(())
        .map(|mut r| {
            r.headers_mut()
                .insert("sec-websocket-version", "8".parse().unwrap());
            r
        })
        .unwrap();
    server.expect_refused(req, 400, "bad_request").await;

    // A plain GET on the WebSocket path.
    let (status, body) = http_get(&server, "/ws").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    let (status, body) = http_get(&server, "/nope").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn health_and_readiness() {
    let server = TestServer::start().await;
    assert_eq!(http_get(&server, "/healthz").await.0, 200);
    let (status, body) = http_get(&server, "/readyz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));
}

#[tokio::test]
async fn the_client_page_is_served_with_a_strict_policy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start().await;
    let mut tls = server.tls(&[b"http/1.1"], None).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    let _ = tls.read_to_string(&mut response).await;
    let lower = response.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200"), "{response}");
    for header in [
        "content-security-policy: default-src 'none'; script-src 'self';",
        "frame-ancestors 'none'",
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
        "content-type: text/html",
    ] {
        assert!(lower.contains(header), "{header} missing:\n{response}");
    }
    assert!(!lower.contains("unsafe-inline") && !lower.contains("unsafe-eval"));
    assert!(response.contains("<script type=\"module\" src=\"/app.js\">"));
}
