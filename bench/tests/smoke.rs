//! A short run of every scenario against the real server, through the bench
//! binary as `bench/run.sh` runs it: securechat starts in this process on
//! 127.0.0.1:0 with a fresh CA and token secret, and `securechat-bench`
//! drives it over real TLS from a child process. Sizes are tiny and only
//! correctness is asserted (every connection opened and held, every message
//! delivered to every member once, no errors); speed is measured by
//! `bench/run.sh`, never here.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use securechat::certs::DevCa;
use securechat::config::Config;

/// The server's configuration: the suite's, on a free port, with every cap
/// raised out of the way.
const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
handshake_timeout_ms = 10000
shutdown_grace_ms = 1000

[metrics]
listen = "127.0.0.1:0"

[tls]
cert = "server.crt"
key = "server.key"

[auth]
[[auth.keys]]
kid = "bench"
algorithm = "HS256"
secret_file = "jwt.secret"

[limits]
max_connections_per_ip = 100000
handshake_rate_per_ip = 100000
handshake_burst_per_ip = 100000
max_connections_per_user = 100000
rate_per_sec = 100000
burst = 100000
user_rate_per_sec = 100000
user_burst = 100000

# Receivers send nothing of their own: a session survives its read
# timeout only if the bench answers the server's pings.
[session]
ping_interval_secs = 1
read_timeout_secs = 2

[bans]
enabled = false

[[rooms]]
name = "bench"
history = 0

[client]
enabled = false

[log]
level = "warn"
"#;

/// A running server and what the bench needs to reach it.
struct Server {
    url: String,
    secret: PathBuf,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Server {
    securechat::install_crypto_providers();
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = DevCa::generate("securechat-bench smoke CA", 1).expect("CA");
    let pair = ca
        .server_cert(&["localhost".into(), "127.0.0.1".into()], 1)
        .expect("server certificate");
    write(dir.path(), "server.crt", &pair.cert_pem);
    write(dir.path(), "server.key", &pair.key_pem);
    let secret: String = (0..64)
        .map(|_| char::from_digit(rand_nibble(), 16).expect("hex digit"))
        .collect();
    write(dir.path(), "jwt.secret", &secret);
    let mut config =
        Config::parse(CONFIG, &dir.path().join("securechat.toml")).expect("config parses");
    config.resolve_paths(dir.path());
    config.validate().expect("config is valid");
    let prepared = securechat::Prepared::load(config).expect("keys and certificate load");
    let server = securechat::start(prepared).await.expect("server binds");
    let addr = server.local_addr().expect("bound address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Server {
        url: format!("wss://127.0.0.1:{}/ws", addr.port()),
        secret: dir.path().join("jwt.secret"),
        _dir: dir,
        _stop: stop,
    }
}

fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).expect("write test file");
}

/// A random value 0..16 without another dependency: the low bits of a
/// fresh hasher's output (seeded by the OS).
fn rand_nibble() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    (h.finish() & 0xf) as u32
}

/// Runs `securechat-bench SCENARIO ARGS` against `server` and returns its
/// JSON summary line.
async fn bench(server: &Server, scenario: &str, args: &[&str]) -> Value {
    let mut command = Command::new(env!("CARGO_BIN_EXE_securechat-bench"));
    command
        .arg(scenario)
        .args(["--url", &server.url, "--jwt-secret-file"])
        .arg(&server.secret)
        .args(["--kid", "bench", "--room", "bench"])
        // The server is this process.
        .args(["--server-pid", &std::process::id().to_string()])
        .args(args);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("no panic")
        .expect("securechat-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "securechat-bench {scenario} failed: {stderr}"
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("not a JSON summary ({e}): {line}\nstderr: {stderr}"))
}

fn u(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{pointer} missing in {v}"))
}

/// Every measured member got every message sent in the run exactly once.
fn assert_all_delivered_once(summary: &Value) {
    let sent = u(summary, "/totals/sent");
    assert!(sent > 0, "nothing was sent: {summary}");
    assert_eq!(
        u(summary, "/totals/delivered"),
        u(summary, "/totals/expected"),
        "lost deliveries: {summary}"
    );
    assert_eq!(u(summary, "/totals/duplicates"), 0, "{summary}");
    assert_eq!(u(summary, "/send_errors"), 0, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_correctly_against_the_real_server() {
    let server = start().await;

    let idle = bench(
        &server,
        "idle",
        &["--connections", "60", "--settle", "0.2", "--hold", "0.5"],
    )
    .await;
    assert_eq!(u(&idle, "/connect/ok"), 60, "{idle}");
    assert_eq!(u(&idle, "/connect/failed"), 0, "{idle}");
    assert_eq!(
        u(&idle, "/open/held"),
        60,
        "every connection still open: {idle}"
    );
    assert_eq!(u(&idle, "/endings/ended"), 0, "{idle}");

    // Receivers read from the poll loop (the default) or a task each; the
    // runs outlast the read timeout, so members that did not answer pings
    // would be closed.
    for (read_with, duration) in [("poll", "2.5"), ("tasks", "2.5")] {
        let fanout = bench(
            &server,
            "fanout",
            &[
                "--members",
                "20",
                "--senders",
                "4",
                "--rate",
                "40",
                "--warmup",
                "0.3",
                "--duration",
                duration,
                "--read-with",
                read_with,
            ],
        )
        .await;
        assert_eq!(
            fanout.pointer("/params/read_with").and_then(Value::as_str),
            Some(read_with),
            "{fanout}"
        );
        assert_eq!(u(&fanout, "/connect/ok"), 20, "{fanout}");
        assert_all_delivered_once(&fanout);
        assert_eq!(u(&fanout, "/window/duplicates"), 0, "{fanout}");
        assert_eq!(
            u(&fanout, "/endings/ended"),
            0,
            "no member was closed: {fanout}"
        );
    }

    let handshake = bench(
        &server,
        "handshake",
        &[
            "--concurrency",
            "4",
            "--users",
            "10",
            "--warmup",
            "0.2",
            "--duration",
            "0.5",
        ],
    )
    .await;
    assert!(u(&handshake, "/handshakes") > 0, "{handshake}");
    assert_eq!(u(&handshake, "/failed"), 0, "{handshake}");

    // Two of the 16 receivers stop reading; the others still get every
    // message once.
    let slow = bench(
        &server,
        "slow",
        &[
            "--members",
            "18",
            "--senders",
            "2",
            "--rate",
            "40",
            "--warmup",
            "0.3",
            "--duration",
            "0.5",
            "--body-bytes",
            "256",
            "--stalled",
            "0.125",
            "--stalled-duration",
            "1",
        ],
    )
    .await;
    assert_eq!(u(&slow, "/params/stalled"), 2, "{slow}");
    assert_all_delivered_once(&slow);
}
