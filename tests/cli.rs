//! The `securechat` command as an operator runs it.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_securechat");

fn run(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .current_dir(dir)
        .env_remove("SECURECHAT_JWT_SECRET");
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A folder laid out like the repository: config/ with the shipped example,
/// certs/ written by gen-cert.
fn deployment() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/securechat.toml");
    std::fs::copy(example, dir.path().join("config/securechat.toml")).unwrap();
    let (ok, out) = run(
        &[
            "gen-cert",
            "--hosts",
            "localhost,127.0.0.1",
            "--out",
            "certs",
        ],
        dir.path(),
        &[],
    );
    assert!(ok, "{out}");
    dir
}

const SECRET: &str = "8d1c57a0e4f93b26c7a9e015d38b64f2a9c3e7d05b1f846e";

#[test]
fn every_subcommand_has_help() {
    for sub in ["serve", "token", "gen-cert", "check"] {
        let (ok, out) = run(&[sub, "--help"], Path::new("."), &[]);
        assert!(ok && out.contains("Usage"), "{sub}: {out}");
    }
}

#[cfg(unix)]
#[test]
fn gen_cert_writes_private_keys_0600_and_does_not_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = deployment();
    let certs = dir.path().join("certs");
    for (name, mode) in [
        ("ca.key", 0o600),
        ("server.key", 0o600),
        ("client.key", 0o600),
        ("ca.crt", 0o644),
        ("server.crt", 0o644),
    ] {
        let meta = std::fs::metadata(certs.join(name)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{name}");
    }
    let (ok, out) = run(&["gen-cert", "--out", "certs"], dir.path(), &[]);
    assert!(!ok && out.contains("--force"), "{out}");
    let (ok, out) = run(&["gen-cert", "--out", "certs", "--force"], dir.path(), &[]);
    assert!(ok, "{out}");
}

#[test]
fn gen_cert_leaves_live_at_most_365_days_including_the_back_dated_day() {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let dir = deployment();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (name, most) in [("server.crt", 365), ("client.crt", 365), ("ca.crt", 825)] {
        let der = CertificateDer::from_pem_file(dir.path().join("certs").join(name)).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let validity = cert.validity();
        let from = validity.not_before.timestamp();
        let until = validity.not_after.timestamp();
        assert!(until - from <= most * 86_400, "{name}: {} s", until - from);
        // Back-dated a day for clocks that are behind.
        assert!(from <= now - 86_000, "{name}");
    }
}

#[test]
fn check_accepts_the_shipped_example_and_reports_expiry() {
    let dir = deployment();
    let (ok, out) = run(
        &["check", "--config", "config/securechat.toml"],
        dir.path(),
        &[("SECURECHAT_JWT_SECRET", SECRET)],
    );
    assert!(ok, "{out}");
    assert!(out.contains("days left"), "{out}");
    assert!(
        !out.contains(SECRET),
        "the secret must not be printed: {out}"
    );
}

#[test]
fn check_refuses_with_a_message_naming_the_problem() {
    let dir = deployment();
    let (ok, out) = run(
        &["check", "--config", "config/securechat.toml"],
        dir.path(),
        &[],
    );
    assert!(!ok);
    assert!(
        out.contains("SECURECHAT_JWT_SECRET") && out.contains("auth.keys[0]"),
        "{out}"
    );

    let (ok, out) = run(
        &["check", "--config", "config/securechat.toml"],
        dir.path(),
        &[("SECURECHAT_JWT_SECRET", "too-short")],
    );
    assert!(!ok && out.contains("at least 32"), "{out}");
    let same = "a".repeat(32);
    let word = "chatchat".repeat(5);
    for weak in [same.as_str(), word.as_str()] {
        let (ok, out) = run(
            &["check", "--config", "config/securechat.toml"],
            dir.path(),
            &[("SECURECHAT_JWT_SECRET", weak)],
        );
        assert!(
            !ok && out.contains("auth.keys[0]") && out.contains("openssl rand"),
            "{out}"
        );
        assert!(!out.contains(weak), "the secret must not be printed: {out}");
    }

    std::fs::write(dir.path().join("certs/server.crt"), "not a certificate").unwrap();
    let (ok, out) = run(
        &["check", "--config", "config/securechat.toml"],
        dir.path(),
        &[("SECURECHAT_JWT_SECRET", SECRET)],
    );
    assert!(!ok && out.contains("tls.cert"), "{out}");

    let (ok, out) = run(&["check", "--config", "missing.toml"], dir.path(), &[]);
    assert!(!ok && out.contains("missing.toml"), "{out}");
}

#[test]
fn token_mints_what_the_server_verifies() {
    let dir = deployment();
    let (ok, out) = run(
        &[
            "token",
            "--config",
            "config/securechat.toml",
            "--sub",
            "alice",
            "--name",
            "Alice",
            "--role",
            "admin",
            "--room",
            "general",
            "--ttl",
            "30m",
        ],
        dir.path(),
        &[("SECURECHAT_JWT_SECRET", SECRET)],
    );
    assert!(ok, "{out}");
    let token = out.trim();
    let mut config =
        securechat::config::Config::load(&dir.path().join("config/securechat.toml")).unwrap();
    config.auth.keys[0].secret_env = Some("SECURECHAT_TEST_SECRET_FOR_TOKEN".into());
    // SAFETY: no other test in this binary reads or writes this variable.
    unsafe { std::env::set_var("SECURECHAT_TEST_SECRET_FOR_TOKEN", SECRET) };
    securechat::install_crypto_providers();
    let keys = securechat::auth::jwt::KeyRing::load(&config.auth).unwrap();
    let identity = keys.verify(token).unwrap();
    assert_eq!(identity.sub, "alice");
    assert_eq!(identity.roles, ["admin"]);
    let ttl = identity.expires_at - securechat::auth::jwt::now_unix();
    assert!((1700..=1800).contains(&ttl), "{ttl}");
}

#[test]
fn dev_mode_refuses_public_addresses() {
    let (ok, out) = run(
        &["serve", "--dev", "--listen", "0.0.0.0:0"],
        Path::new("."),
        &[],
    );
    assert!(!ok && out.contains("loopback"), "{out}");
}

/// Opens a WebSocket to a server run from the binary on `port`, trusting
/// `ca`, with `origin` and one credential header.
async fn connect_to_binary(
    port: u16,
    ca: &str,
    origin: &str,
    (name, value): (&str, String),
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = common::client_tls_config(ca, &[b"http/1.1"], None);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let mut req = http::Request::builder()
        .uri(format!("wss://localhost:{port}/ws"))
        .header("Host", format!("localhost:{port}"))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("Sec-WebSocket-Protocol", "securechat.v1")
        .header("Origin", origin)
        .body(())
        .unwrap();
    req.headers_mut().insert(
        http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
        value.parse().unwrap(),
    );
    tokio_tungstenite::client_async(req, tls).await.unwrap().0
}

/// `serve --dev` prints a URL and a token that work, and stops on SIGTERM.
#[cfg(unix)]
#[tokio::test]
async fn dev_mode_serves_with_the_printed_token_and_stops_on_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(BIN)
        .args(["serve", "--dev", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut ca_path = None;
    let token = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("dev output");
        if let Some(rest) = line.trim().strip_prefix("trust:") {
            ca_path = rest.split_whitespace().next().map(String::from);
        }
        if line.starts_with("eyJ") {
            break line;
        }
    };
    let ca = std::fs::read_to_string(ca_path.expect("a CA path")).unwrap();
    let origin = format!("https://localhost:{port}");
    let mut ws = connect_to_binary(
        port,
        &ca,
        &origin,
        ("Authorization", format!("Bearer {token}")),
    )
    .await;
    use futures_util::{SinkExt, StreamExt};
    let welcome = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(welcome.contains("\"welcome\""), "{welcome}");
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        r#"{"type":"join","room":"general"}"#.into(),
    ))
    .await
    .unwrap();
    let joined = ws.next().await.unwrap().unwrap().into_text().unwrap();
    assert!(joined.contains("\"joined\""), "{joined}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The session is told the server is going away.
    let mut close_code = None;
    while let Some(Ok(message)) = ws.next().await {
        if let tokio_tungstenite::tungstenite::Message::Close(Some(frame)) = message {
            close_code = Some(u16::from(frame.code));
        }
    }
    assert_eq!(close_code, Some(1001));
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[cfg(unix)]
#[test]
fn check_reports_exposed_keys_mismatched_keys_and_warnings() {
    use std::os::unix::fs::PermissionsExt;
    let dir = deployment();
    let env = [("SECURECHAT_JWT_SECRET", SECRET)];
    let key = dir.path().join("certs/server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out) = run(
        &["check", "--config", "config/securechat.toml"],
        dir.path(),
        &env,
    );
    assert!(
        !ok && out.contains("chmod 600") && out.contains("tls.key"),
        "{out}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The client's key beside the server's certificate.
    std::fs::copy(dir.path().join("certs/client.key"), &key).unwrap();
    let (ok, out) = run(
        &["check", "--config", "config/securechat.toml"],
        dir.path(),
        &env,
    );
    assert!(!ok && out.contains("does not fit"), "{out}");

    let (ok, out) = run(&["gen-cert", "--out", "certs", "--force"], dir.path(), &[]);
    assert!(ok, "{out}");
    let config = dir.path().join("config/securechat.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("allow_query_token = false", "allow_query_token = true"),
    )
    .unwrap();
    let (ok, out) = run(
        &["check", "--config", "config/securechat.toml"],
        dir.path(),
        &env,
    );
    assert!(ok, "{out}");
    assert!(out.contains("warning: auth.allow_query_token"), "{out}");
}

/// A full session against the real binary: its logs never contain the token,
/// the message text or the secret; the audit file records the moderation and
/// security actions.
#[cfg(unix)]
#[tokio::test]
async fn logs_and_audit_of_a_full_session_hold_no_secrets() {
    use futures_util::{SinkExt, StreamExt};
    use std::os::unix::fs::PermissionsExt;
    use tokio_tungstenite::tungstenite::Message;

    let dir = deployment();
    let config = dir.path().join("config/run.toml");
    std::fs::write(
        &config,
        r#"
[server]
listen = "127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[tls]
cert = "../certs/server.crt"
key = "../certs/server.key"
[auth]
[[auth.keys]]
kid = "main"
algorithm = "HS256"
secret_env = "SECURECHAT_JWT_SECRET"
[security]
allowed_origins = ["https://chat.test"]
[[rooms]]
name = "general"
[log]
format = "json"
level = "debug"
audit_file = "../audit.log"
"#,
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config", "config/run.toml"])
        .current_dir(dir.path())
        .env("SECURECHAT_JWT_SECRET", SECRET)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push(line);
        }
        all
    });
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a listening line");
        if line.contains("server.listening") {
            let value: serde_json::Value = serde_json::from_str(&line).unwrap();
            break value["addr"].as_str().unwrap().to_string();
        }
    };
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let mint = |sub: &str| {
        let (ok, out) = run(
            &[
                "token",
                "--config",
                "config/run.toml",
                "--sub",
                sub,
                "--ttl",
                "10m",
            ],
            dir.path(),
            &[("SECURECHAT_JWT_SECRET", SECRET)],
        );
        assert!(ok, "{out}");
        out.trim().to_string()
    };
    let token = mint("alice");
    let refresh = mint("alice");
    let ca = std::fs::read_to_string(dir.path().join("certs/ca.crt")).unwrap();
    let protocols = format!("securechat.v1, securechat.bearer.{token}");
    let mut ws = connect_to_binary(
        port,
        &ca,
        "https://chat.test",
        ("Sec-WebSocket-Protocol", protocols),
    )
    .await;
    let canary = "CANARY-message-text-7f3a";
    for frame in [
        serde_json::json!({"type": "join", "room": "general"}),
        serde_json::json!({"type": "send", "room": "general", "id": "c1", "body": canary}),
        serde_json::json!({"type": "delete", "room": "general", "seq": 1}),
        serde_json::json!({"type": "refresh", "token": refresh}),
    ] {
        ws.send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }
    let mut refreshed = false;
    while !refreshed {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap();
        let text = next.unwrap().unwrap().into_text().unwrap();
        refreshed = text.contains("\"refreshed\"");
    }
    ws.close(None).await.unwrap();
    drop(ws);
    // SIGHUP reloads the certificate and keys (audit events).
    assert!(
        Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a reload line");
        if line.contains("keys.reloaded") {
            break;
        }
    }
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let logs = reader.join().unwrap().join("\n");

    for event in [
        "conn.open",
        "conn.close",
        "audit.delete",
        "audit.token_refreshed",
        "tls.reloaded",
    ] {
        assert!(
            logs.contains(event),
            "{event} missing from the logs:\n{logs}"
        );
    }
    // An HTTP/1.1 upgrade over TLS: the session writes to the TLS stream
    // itself, not through hyper's boxed upgraded stream.
    let open = logs
        .lines()
        .find(|line| line.contains("conn.open"))
        .expect("a conn.open line");
    let open: serde_json::Value = serde_json::from_str(open).unwrap();
    assert_eq!(open["stream"], "tls", "{open}");
    assert_eq!(open["http"], "http/1.1", "{open}");
    for secret in [token.as_str(), refresh.as_str(), canary, SECRET] {
        assert!(
            !logs.contains(secret),
            "a secret or a message body reached the logs"
        );
    }
    let audit_path = dir.path().join("audit.log");
    let audit = std::fs::read_to_string(&audit_path).unwrap();
    for event in [
        "audit.delete",
        "audit.token_refreshed",
        "tls.reloaded",
        "keys.reloaded",
    ] {
        assert!(
            audit.contains(event),
            "{event} missing from the audit file:\n{audit}"
        );
    }
    assert!(
        !audit.contains("conn.open"),
        "only audit events go to the audit file"
    );
    for secret in [token.as_str(), refresh.as_str(), canary] {
        assert!(!audit.contains(secret));
    }
    let mode = std::fs::metadata(&audit_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}
