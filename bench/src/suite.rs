//! The whole comparison in one run: each server started fresh for every
//! scenario run, pinned to its core, the load generator (a child process of
//! this one) pinned to the other; servers taken in turn, the order rotated
//! each repetition; every summary kept, medians reported.
//!
//! The `pair` scenario runs securechat and one peer at the same time
//! instead, both on the server core, each fed half the fan-out load by a
//! load generator of its own on the load core: whatever the machine does
//! meanwhile (another tenant, a slower host), it does to both, so their
//! ratio holds where runs taken in turn drift apart.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::procfs;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Small connection counts, rates and durations: a run of about two minutes.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of every scenario against every server (default: 3, quick: 1).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Servers to measure, in order: securechat, ws, bun.
    #[arg(long, value_delimiter = ',', default_value = "securechat,ws,bun")]
    pub servers: Vec<String>,
    /// Scenarios to run: idle, capacity, fanout, handshake, slow, pair.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,capacity,fanout,handshake,slow,pair"
    )]
    pub scenarios: Vec<String>,
    /// The securechat binary (built with `cargo build --release`).
    #[arg(long, default_value = "target/release/securechat")]
    pub securechat: PathBuf,
    /// The folder with the peers (install.sh, ws-tutorial/, bun/).
    #[arg(long, default_value = "bench/peers")]
    pub peers: PathBuf,
    /// The node binary for the ws peer.
    #[arg(long, default_value = "node")]
    pub node: String,
    /// Core the servers are pinned to.
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    /// Core the load generator is pinned to.
    #[arg(long, default_value_t = 1)]
    pub load_cpu: usize,
    #[command(flatten)]
    pub files: crate::report::Files,
    /// Connections of the idle scenario (default 10000, quick 2000).
    #[arg(long)]
    pub idle_connections: Option<usize>,
    /// Connections of the capacity scenario (default 19500, quick 4000).
    #[arg(long)]
    pub capacity_connections: Option<usize>,
    /// Seconds the capacity scenario holds its connections (default 25:
    /// longer than securechat's 20 s ping interval; quick 5).
    #[arg(long)]
    pub capacity_hold: Option<f64>,
    /// Members of the fan-out room (default 1000, quick 200).
    #[arg(long)]
    pub fanout_members: Option<usize>,
    /// Offered deliveries per second, comma-separated (default
    /// 100000,800000; quick 20000,100000).
    #[arg(long, value_delimiter = ',')]
    pub fanout_rates: Vec<f64>,
    /// Seconds each fan-out window is measured (default 10, quick 3).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Handshakes in flight in the handshake scenario.
    #[arg(long, default_value_t = 32)]
    pub handshake_concurrency: usize,
    /// Members of the slow scenario's room (default 200, quick 100).
    #[arg(long)]
    pub slow_members: Option<usize>,
    /// Offered deliveries per second in the slow scenario (default 100000,
    /// quick 50000): with 1 KiB bodies, each stalled receiver is sent about
    /// 0.6 MB/s, so the server's kernel send buffer (up to 4 MB on loopback)
    /// fills within seconds and the server's own queues are reached.
    #[arg(long)]
    pub slow_rate: Option<f64>,
    /// Bytes of each message body in the slow scenario.
    #[arg(long, default_value_t = 1024)]
    pub slow_body: usize,
    /// Seconds the slow scenario measures with the receivers stalled
    /// (default 15, quick 10).
    #[arg(long)]
    pub slow_stall: Option<f64>,
    /// Repetitions of the pair scenario with each peer (default 9, quick 2):
    /// single pairs spread by several per cent, their median far less.
    #[arg(long)]
    pub pair_reps: Option<usize>,
    /// Offered deliveries per second of the pair scenario, both servers
    /// together, comma-separated (default: the lowest fan-out load and
    /// 40000, at which a pair's two load generators keep up on one core;
    /// quick: the lowest fan-out load).
    #[arg(long, value_delimiter = ',')]
    pub pair_rates: Vec<f64>,
    /// Keep the runs already in the results file, except those of the
    /// scenarios, loads and servers run now (to measure one scenario, or
    /// one server in it, again).
    #[arg(long)]
    pub update: bool,
    /// Most CPU (in cores) other processes may use before a run; the suite
    /// waits up to a minute for the machine to calm down, then runs anyway
    /// and records it.
    #[arg(long, default_value_t = 0.3)]
    pub max_background: f64,
}

/// The bounds the securechat config below sets, for the report's checks.
pub const OUTBOUND_QUEUE_MESSAGES: u64 = 256;
pub const OUTBOUND_QUEUE_BYTES: u64 = 1024 * 1024;
pub const MAX_WRITE_BUFFER_BYTES: u64 = 64 * 1024;
/// The kernel's send buffer for each client socket, securechat's default.
pub const SOCKET_SEND_BUFFER_BYTES: u64 = 256 * 1024;
/// What securechat's TLS layer holds encrypted and unsent per connection at
/// most, on top of the outbound queue: one write's records (16 KiB of
/// plaintext and record overhead), taken only once the previous are out.
pub const TLS_SEND_BUFFER_BYTES: u64 = 17 * 1024;
pub const PING_INTERVAL_SECS: u64 = 20;
/// Write coalescing on busy connections, at securechat's defaults.
pub const WRITE_COALESCE_MS: u64 = 20;
pub const WRITE_COALESCE_FRAMES: u64 = 8;
pub const WRITE_COALESCE_BUSY_PERCENT: u64 = 90;

/// One scenario run, as the command line of the load generator.
struct Plan {
    scenario: &'static str,
    /// The load, as the summary names it (`variant`).
    variant: String,
    /// The subcommand and its arguments (without the target).
    args: Vec<String>,
    /// Longest the run may take.
    budget: Duration,
}

impl Plan {
    /// Whom this plan runs against, of the servers named: a pair's runs
    /// are named by the peer set against securechat (`peers`).
    fn servers<'a>(&self, servers: &'a [String], peers: &'a [String]) -> &'a [String] {
        if self.scenario == "pair" {
            peers
        } else {
            servers
        }
    }
}

pub fn run(args: Args) -> Result<(), String> {
    let reps = args.reps.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let plans = plans(&args);
    let work = std::env::temp_dir().join(format!("securechat-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let setup = Setup::new(&args, &work)?;
    let mut results = json!({ "meta": meta(&args, reps, &setup), "runs": [] });
    if args.update {
        results = updated(&args, &plans, results)?;
    }
    let pair_reps = args
        .pair_reps
        .unwrap_or(if args.quick { 2 } else { 9 })
        .max(1);
    let peers = pair_peers(&args.servers);
    let rounds = |plan: &Plan| {
        let reps = if plan.scenario == "pair" {
            pair_reps
        } else {
            reps
        };
        (reps, plan.servers(&args.servers, &peers).to_vec())
    };
    let total: usize = plans
        .iter()
        .map(|p| {
            let (reps, servers) = rounds(p);
            reps * servers.len()
        })
        .sum();
    let mut done = 0;
    let started = Instant::now();
    for plan in &plans {
        let (reps, servers) = rounds(plan);
        for rep in 0..reps {
            let mut order = servers.clone();
            let turn = rep % order.len().max(1);
            order.rotate_left(turn);
            for server in &order {
                done += 1;
                eprintln!(
                    "[{done}/{total}] {} {} against {server} (repetition {}) — {:.0} s so far",
                    plan.scenario,
                    plan.args.first().map(String::as_str).unwrap_or(""),
                    rep + 1,
                    started.elapsed().as_secs_f64()
                );
                let (mut record, background, attempts) = run_quietly(&args, plan, server, || {
                    if plan.scenario == "pair" {
                        // Which of the two starts first alternates.
                        run_pair(&args, &setup, &work, plan, server, rep % 2 == 0)
                    } else {
                        run_one(&args, &setup, &work, plan, server)
                    }
                });
                record["rep"] = json!(rep + 1);
                record["attempts"] = json!(attempts);
                record["suite_scenario"] = json!(plan.scenario);
                record["background_cores"] = json!(background);
                print_line(&record);
                results["runs"]
                    .as_array_mut()
                    .expect("an array")
                    .push(record);
                save(&args.files.results, &results)?;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    eprintln!(
        "all runs done in {:.0} s; results in {}",
        started.elapsed().as_secs_f64(),
        args.files.results.display()
    );
    args.files.write(&results)
}

/// The results file as it is, without the runs of `plans` against the
/// servers run now, and noted as updated in its meta.
fn updated(args: &Args, plans: &[Plan], fresh: Value) -> Result<Value, String> {
    let Ok(text) = std::fs::read_to_string(&args.files.results) else {
        return Ok(fresh);
    };
    let old: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: {e}", args.files.results.display()))?;
    Ok(without_replaced(old, &fresh, plans, &args.servers))
}

/// `old` without the runs that `plans` against `servers` replace (a pair's
/// run is named by its peer), and noted as updated by `fresh`'s run.
fn without_replaced(mut old: Value, fresh: &Value, plans: &[Plan], servers: &[String]) -> Value {
    let peers = pair_peers(servers);
    let replaced = |r: &Value| {
        plans.iter().any(|p| {
            r["suite_scenario"] == p.scenario
                && r["variant"] == p.variant.as_str()
                && p.servers(servers, &peers)
                    .iter()
                    .any(|s| r["server"] == s.as_str())
        })
    };
    if let Some(runs) = old["runs"].as_array_mut() {
        runs.retain(|r| !replaced(r));
    }
    let note = json!({
        "date": fresh["meta"]["date"],
        "runs": plans.iter().map(|p| format!("{} {}", p.scenario, p.variant)).collect::<Vec<_>>(),
        "servers": servers,
        "securechat_commit": fresh["meta"]["securechat_commit"],
        "cpu_model": fresh["meta"]["cpu_model"],
        "kernel": fresh["meta"]["kernel"],
    });
    match old["meta"]["updates"].as_array_mut() {
        Some(updates) => updates.push(note),
        None => old["meta"]["updates"] = json!([note]),
    }
    old
}

/// Runs a plan (`run`); when other processes took more than
/// `max_background` cores during the measurement, runs it again (twice at
/// most) and keeps the quietest attempt. Returns the summary (or the
/// error), the background load at the start, and the attempts made.
fn run_quietly(
    args: &Args,
    plan: &Plan,
    server: &str,
    run: impl Fn() -> Result<Value, String>,
) -> (Value, f64, usize) {
    let mut best: Option<(Value, f64)> = None;
    let mut attempts = 0;
    while attempts < 3 {
        attempts += 1;
        let background = wait_quiet(args.max_background);
        let record = match run() {
            Ok(summary) => summary,
            Err(e) => {
                eprintln!("    failed: {e}");
                json!({ "scenario": plan.scenario, "server": server, "error": e })
            }
        };
        let noise = record["other_cores"].as_f64().unwrap_or(0.0);
        let better = match &best {
            None => true,
            Some((b, _)) => {
                b.get("error").is_some() && record.get("error").is_none()
                    || noise < b["other_cores"].as_f64().unwrap_or(0.0)
            }
        };
        if better {
            best = Some((record, background));
        }
        if noise <= args.max_background || attempts == 3 {
            break;
        }
        eprintln!(
            "    other processes used {noise:.2} cores during the measurement: running it again"
        );
    }
    let (record, background) = best.expect("at least one attempt");
    (record, background, attempts)
}

fn save(path: &Path, results: &Value) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(results).expect("serialisable");
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// One line per run on stderr, so a long run shows where it is.
fn print_line(r: &Value) {
    let f = |p: &str| r.pointer(p).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let line = match r["suite_scenario"].as_str().unwrap_or("") {
        _ if r.get("error").is_some() => String::new(),
        "idle" | "capacity" => format!(
            "{:.0} open, {:.2} KiB per connection",
            f("/open/held"),
            f("/bytes_per_conn/held") / 1024.0
        ),
        "fanout" => format!(
            "{:.0} deliveries/s, loss {:.4}, p99 {:.2} ms, last-recipient p99 {:.2} ms, {:.2} µs server CPU per delivery",
            f("/window/deliveries_per_sec"),
            f("/window/loss"),
            f("/window/latency/p99_ms"),
            f("/window/last_recipient/p99_ms"),
            f("/server_cpu/us_per_delivery")
        ),
        "handshake" => format!(
            "{:.0} handshakes/s, {:.3} ms server CPU each",
            f("/per_sec"),
            f("/server_cpu/ms_per_handshake")
        ),
        "pair" => format!(
            "securechat {:.2} µs, {} {:.2} µs server CPU per delivery at once: ratio {:.3}",
            f("/securechat/server_cpu/us_per_delivery"),
            r["server"].as_str().unwrap_or("?"),
            f("/peer/server_cpu/us_per_delivery"),
            f("/ratio")
        ),
        "slow" => format!(
            "p99 {:.2} -> {:.2} ms, server RSS +{:.1} MiB",
            f("/reading/latency/p99_ms"),
            f("/stalled/latency/p99_ms"),
            f("/server_memory/growth") / 1048576.0
        ),
        _ => String::new(),
    };
    if !line.is_empty() {
        eprintln!("    {line}");
    }
}

fn plans(args: &Args) -> Vec<Plan> {
    let q = args.quick;
    let pick =
        |value: Option<f64>, full: f64, quick: f64| value.unwrap_or(if q { quick } else { full });
    let idle = args
        .idle_connections
        .unwrap_or(if q { 2000 } else { 10_000 });
    let capacity = args
        .capacity_connections
        .unwrap_or(if q { 4000 } else { 19_500 });
    let capacity_hold = pick(args.capacity_hold, 25.0, 5.0);
    let members = args.fanout_members.unwrap_or(if q { 200 } else { 1000 });
    let rates = if args.fanout_rates.is_empty() {
        if q {
            vec![20_000.0, 100_000.0]
        } else {
            vec![100_000.0, 800_000.0]
        }
    } else {
        args.fanout_rates.clone()
    };
    let duration = pick(args.duration, 10.0, 3.0);
    let slow_rate = pick(args.slow_rate, 100_000.0, 50_000.0);
    let slow_members = args.slow_members.unwrap_or(if q { 100 } else { 200 });
    let slow_stall = pick(args.slow_stall, 15.0, 10.0);
    let s = |v: &dyn ToString| v.to_string();
    let mut plans = Vec::new();
    for scenario in &args.scenarios {
        match scenario.as_str() {
            "idle" => plans.push(Plan {
                scenario: "idle",
                variant: idle.to_string(),
                args: vec![
                    "idle".into(),
                    "--connections".into(),
                    s(&idle),
                    "--hold".into(),
                    s(&(if q { 2 } else { 5 })),
                ],
                budget: Duration::from_secs(120 + idle as u64 / 100),
            }),
            "capacity" => plans.push(Plan {
                scenario: "capacity",
                variant: capacity.to_string(),
                args: vec![
                    "idle".into(),
                    "--connections".into(),
                    s(&capacity),
                    "--hold".into(),
                    s(&capacity_hold),
                ],
                budget: Duration::from_secs(120 + capacity as u64 / 100 + capacity_hold as u64),
            }),
            "fanout" => {
                for rate in &rates {
                    plans.push(Plan {
                        scenario: "fanout",
                        variant: format!("{members}x{}", rate.round() as u64),
                        args: fanout_args(members, *rate, duration, if q { 1 } else { 2 }),
                        budget: Duration::from_secs(90 + duration as u64),
                    });
                }
            }
            // Each load halved for each of the two servers; a longer
            // warm-up so that neither's connections are still being set up
            // when the other's window begins.
            "pair" => {
                for rate in pair_rates(args, &rates) {
                    plans.push(Plan {
                        scenario: "pair",
                        variant: format!("{members}x{}", rate.round() as u64),
                        args: fanout_args(members, rate / 2.0, duration, if q { 2 } else { 3 }),
                        budget: Duration::from_secs(90 + duration as u64),
                    });
                }
            }
            "handshake" => plans.push(Plan {
                scenario: "handshake",
                variant: format!("c{}", args.handshake_concurrency),
                args: vec![
                    "handshake".into(),
                    "--concurrency".into(),
                    s(&args.handshake_concurrency),
                    "--duration".into(),
                    s(&duration),
                ],
                budget: Duration::from_secs(90 + duration as u64),
            }),
            "slow" => plans.push(Plan {
                scenario: "slow",
                variant: format!("{slow_members}x{}", slow_rate.round() as u64),
                args: vec![
                    "slow".into(),
                    "--members".into(),
                    s(&slow_members),
                    "--senders".into(),
                    s(&10),
                    "--rate".into(),
                    s(&(slow_rate / slow_members as f64)),
                    "--body-bytes".into(),
                    s(&args.slow_body),
                    "--duration".into(),
                    s(&duration),
                    "--stalled-duration".into(),
                    s(&slow_stall),
                    "--warmup".into(),
                    s(&(if q { 1 } else { 2 })),
                ],
                budget: Duration::from_secs(120 + (duration + slow_stall) as u64),
            }),
            other => eprintln!("unknown scenario {other:?}: skipped"),
        }
    }
    plans
}

/// The pair scenario's loads: as given, or the lowest fan-out load and
/// (not quick) 40,000/s.
fn pair_rates(args: &Args, fanout_rates: &[f64]) -> Vec<f64> {
    if !args.pair_rates.is_empty() {
        return args.pair_rates.clone();
    }
    let mut rates: Vec<f64> = fanout_rates
        .iter()
        .copied()
        .reduce(f64::min)
        .into_iter()
        .collect();
    if !args.quick && !rates.contains(&40_000.0) {
        rates.push(40_000.0);
    }
    rates
}

/// The load generator's `fanout` arguments: `members` in one room, 10 of
/// them sending, `rate` deliveries per second in all.
fn fanout_args(members: usize, rate: f64, duration: f64, warmup: u64) -> Vec<String> {
    [
        "fanout".to_owned(),
        "--members".into(),
        members.to_string(),
        "--senders".into(),
        "10".into(),
        "--rate".into(),
        (rate / members as f64).to_string(),
        "--duration".into(),
        duration.to_string(),
        "--warmup".into(),
        warmup.to_string(),
    ]
    .into()
}

/// What every run needs: certificates, the JWT secret, the peers' paths.
struct Setup {
    cert: PathBuf,
    key: PathBuf,
    secret: PathBuf,
    bun: Option<PathBuf>,
    securechat: PathBuf,
    exe: PathBuf,
}

impl Setup {
    fn new(args: &Args, work: &Path) -> Result<Self, String> {
        let securechat = std::fs::canonicalize(&args.securechat).map_err(|e| {
            format!(
                "{}: {e} (build it with cargo build --release)",
                args.securechat.display()
            )
        })?;
        let certs = work.join("certs");
        let status = Command::new(&securechat)
            .args(["gen-cert", "--hosts", "localhost,127.0.0.1", "--out"])
            .arg(&certs)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("securechat gen-cert: {e}"))?;
        if !status.success() {
            return Err("securechat gen-cert failed".into());
        }
        let secret = work.join("jwt.secret");
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| "no randomness")?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&secret, hex).map_err(|e| format!("{}: {e}", secret.display()))?;
        set_private(&secret);
        let bun = if args.servers.iter().any(|s| s == "bun") {
            let out = Command::new(args.peers.join("bun-path.sh"))
                .output()
                .map_err(|e| format!("bun-path.sh: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "no Bun binary: run bench/peers/install.sh ({})",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        } else {
            None
        };
        Ok(Self {
            cert: certs.join("server.crt"),
            key: certs.join("server.key"),
            secret,
            bun,
            securechat,
            exe: std::env::current_exe().map_err(|e| e.to_string())?,
        })
    }
}

#[cfg(unix)]
fn set_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}
#[cfg(not(unix))]
fn set_private(_path: &Path) {}

/// The securechat configuration for the bench: every rate and cap raised
/// out of the way, the outbound queue bounds at their defaults (the slow
/// scenario checks them), history off like the peers, logs at warn.
fn securechat_config(setup: &Setup, port: u16) -> String {
    format!(
        r#"# Written by securechat-bench suite.
[server]
listen = "127.0.0.1:{port}"
handshake_timeout_ms = 30000
shutdown_grace_ms = 1000

[metrics]
listen = "127.0.0.1:0"

[tls]
cert = "{cert}"
key = "{key}"

[auth]
[[auth.keys]]
kid = "bench"
algorithm = "HS256"
secret_file = "{secret}"

[limits]
max_connections = 20000
max_connections_per_ip = 1000000
handshake_rate_per_ip = 100000
handshake_burst_per_ip = 100000
max_connections_per_user = 1000000
max_members_per_room = 1000000
rate_per_sec = 100000
burst = 100000
user_rate_per_sec = 100000
user_burst = 100000
outbound_queue_messages = {OUTBOUND_QUEUE_MESSAGES}
outbound_queue_bytes = {OUTBOUND_QUEUE_BYTES}
max_write_buffer_bytes = {MAX_WRITE_BUFFER_BYTES}
socket_send_buffer_bytes = {SOCKET_SEND_BUFFER_BYTES}

[session]
ping_interval_secs = {PING_INTERVAL_SECS}
write_coalesce_ms = {WRITE_COALESCE_MS}
write_coalesce_frames = {WRITE_COALESCE_FRAMES}
write_coalesce_busy_percent = {WRITE_COALESCE_BUSY_PERCENT}

[bans]
enabled = false

[[rooms]]
name = "bench"
history = 0

[client]
enabled = false

[log]
format = "json"
level = "warn"
"#,
        cert = setup.cert.display(),
        key = setup.key.display(),
        secret = setup.secret.display(),
    )
}

/// A free port on loopback (free now; the server binds it right after).
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Whether something listens on 127.0.0.1:`port` (from /proc/net/tcp, so
/// the check itself opens no connection).
fn listening(port: u16) -> bool {
    let needle = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .map(|t| {
            t.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1] == needle && f[3] == "0A"
            })
        })
        .unwrap_or(false)
}

/// A server under test, killed when dropped.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(
    args: &Args,
    setup: &Setup,
    work: &Path,
    server: &str,
    port: u16,
) -> Result<Server, String> {
    let log = work.join(format!("{server}.log"));
    let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut command = Command::new("taskset");
    command.arg("-c").arg(args.server_cpu.to_string());
    match server {
        "securechat" => {
            let config = work.join("securechat.toml");
            std::fs::write(&config, securechat_config(setup, port)).map_err(|e| e.to_string())?;
            command
                .arg(&setup.securechat)
                .arg("serve")
                .arg("--config")
                .arg(&config);
        }
        "ws" => {
            command
                .arg(&args.node)
                .arg(args.peers.join("ws-tutorial/server.js"));
        }
        "bun" => {
            command
                .arg(setup.bun.as_ref().ok_or("no Bun binary")?)
                .arg(args.peers.join("bun/server.ts"));
        }
        other => return Err(format!("unknown server {other:?}")),
    }
    command
        .env("CERT", &setup.cert)
        .env("KEY", &setup.key)
        .env("PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
        .stderr(log_file);
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start {server}: {e}"))?;
    let mut server_proc = Server { child, log };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !listening(port) {
        if Instant::now() > deadline {
            return Err(format!(
                "{server} did not listen on port {port} within 20 s: {}",
                tail(&server_proc.log)
            ));
        }
        if let Ok(Some(status)) = server_proc.child.try_wait() {
            return Err(format!(
                "{server} exited ({status}): {}",
                tail(&server_proc.log)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let it finish starting (JIT warm-up, lazy allocations) before the baseline.
    std::thread::sleep(Duration::from_secs(1));
    Ok(server_proc)
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

fn run_one(
    args: &Args,
    setup: &Setup,
    work: &Path,
    plan: &Plan,
    server: &str,
) -> Result<Value, String> {
    let port = free_port()?;
    let mut srv = start_server(args, setup, work, server, port)?;
    let load = Load::spawn(args, setup, plan, server, port, &srv)?;
    let deadline = Instant::now() + plan.budget;
    let summary = load.finish(deadline, &mut [(server, &mut srv)])?;
    drop(srv);
    Ok(summary)
}

/// securechat and `peer` at once, both on the server core, each with a load
/// generator of its own running `plan` (half the load) on the load core;
/// `securechat_first`: which is started first and loaded first.
fn run_pair(
    args: &Args,
    setup: &Setup,
    work: &Path,
    plan: &Plan,
    peer: &str,
    securechat_first: bool,
) -> Result<Value, String> {
    let order = if securechat_first {
        ["securechat", peer]
    } else {
        [peer, "securechat"]
    };
    let ports = [free_port()?, free_port()?];
    if ports[0] == ports[1] {
        return Err("no two free ports".into());
    }
    let mut first = start_server(args, setup, work, order[0], ports[0])?;
    let mut second = start_server(args, setup, work, order[1], ports[1])?;
    let deadline = Instant::now() + plan.budget;
    let load_first = Load::spawn(args, setup, plan, order[0], ports[0], &first)?;
    let load_second = Load::spawn(args, setup, plan, order[1], ports[1], &second)?;
    let mut servers = [(order[0], &mut first), (order[1], &mut second)];
    let first_summary = load_first.finish(deadline, &mut servers);
    let second_summary = load_second.finish(deadline, &mut servers)?;
    let first_summary = first_summary?;
    drop((first, second));
    let (ours, theirs) = if securechat_first {
        (first_summary, second_summary)
    } else {
        (second_summary, first_summary)
    };
    pair_record(ours, theirs, peer, order[0], &plan.variant)
}

/// The record of a pair run: both summaries, the ratio of their CPU per
/// delivery, and the other processes' CPU as one run would count it.
/// `variant` is the load of both together (each summary names its half).
fn pair_record(
    ours: Value,
    theirs: Value,
    peer: &str,
    first: &str,
    variant: &str,
) -> Result<Value, String> {
    let f = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_f64);
    let cpu = "/server_cpu/us_per_delivery";
    let (Some(a), Some(b)) = (f(&ours, cpu), f(&theirs, cpu)) else {
        return Err("a summary without server CPU per delivery".into());
    };
    if a <= 0.0 || b <= 0.0 {
        return Err(format!("no deliveries measured ({a} and {b} µs)"));
    }
    // Each load generator counts the other server and load generator among
    // the other processes; take those out.
    let others = |v: &Value, other: &Value| {
        let busy = f(other, "/server_cpu/utilisation").unwrap_or(0.0)
            + f(other, "/load_cpu/utilisation").unwrap_or(0.0);
        (f(v, "/other_cores").unwrap_or(0.0) - busy).max(0.0)
    };
    let noise = others(&ours, &theirs).max(others(&theirs, &ours));
    Ok(json!({
        "scenario": "pair",
        "server": peer,
        "variant": variant,
        "first": first,
        "ratio": a / b,
        "other_cores": noise,
        "securechat": ours,
        "peer": theirs,
    }))
}

/// The peers a pair run sets against securechat: every other server named,
/// when securechat is among them.
fn pair_peers(servers: &[String]) -> Vec<String> {
    if !servers.iter().any(|s| s == "securechat") {
        return Vec::new();
    }
    servers
        .iter()
        .filter(|s| *s != "securechat")
        .cloned()
        .collect()
}

/// A load generator running a plan against one server; killed when
/// dropped before it finished (a run that failed half-way leaves none
/// behind).
struct Load {
    child: Child,
    output: Option<std::thread::JoinHandle<String>>,
    server: String,
    /// The server's log, for the error of a failed run and the line count.
    log: PathBuf,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Load {
    /// Kills the load generator unless it has ended.
    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn spawn(
        args: &Args,
        setup: &Setup,
        plan: &Plan,
        server: &str,
        port: u16,
        srv: &Server,
    ) -> Result<Self, String> {
        let (url, protocol) = match server {
            "securechat" => (format!("wss://127.0.0.1:{port}/ws"), "securechat"),
            _ => (format!("wss://127.0.0.1:{port}/"), "raw"),
        };
        let mut command = Command::new("taskset");
        command
            .arg("-c")
            .arg(args.load_cpu.to_string())
            .arg(&setup.exe)
            .args(&plan.args)
            .args([
                "--url",
                &url,
                "--protocol",
                protocol,
                "--server-name",
                server,
            ])
            .arg("--server-pid")
            .arg(srv.child.id().to_string());
        if protocol == "securechat" {
            command.arg("--jwt-secret-file").arg(&setup.secret);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the load generator: {e}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or("no pipe from the load generator")?;
        let output = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stdout).read_to_string(&mut text);
            text
        });
        Ok(Self {
            child,
            output: Some(output),
            server: server.to_owned(),
            log: srv.log.clone(),
        })
    }

    /// Waits until `deadline` for the summary line; stops early (killing
    /// the load generator) when one of `servers` dies.
    fn finish(
        mut self,
        deadline: Instant,
        servers: &mut [(&str, &mut Server)],
    ) -> Result<Value, String> {
        let status = loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                break Some(status);
            }
            if Instant::now() > deadline {
                self.stop();
                break None;
            }
            for (name, srv) in servers.iter_mut() {
                if let Ok(Some(exit)) = srv.child.try_wait() {
                    // Returning drops `self`, which stops the load generator.
                    return Err(format!("{name} died ({exit}): {}", tail(&srv.log)));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let text = self
            .output
            .take()
            .and_then(|o| o.join().ok())
            .unwrap_or_default();
        let Some(status) = status else {
            return Err(format!(
                "the load generator against {} took too long and was stopped",
                self.server
            ));
        };
        if !status.success() {
            return Err(format!(
                "the load generator failed ({status}); server log: {}",
                tail(&self.log)
            ));
        }
        let line = text
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .ok_or("the load generator printed no summary")?;
        let mut summary: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let lines = std::fs::File::open(&self.log)
            .map(|f| BufReader::new(f).lines().count())
            .unwrap_or(0);
        summary["server_log_lines"] = json!(lines);
        Ok(summary)
    }
}

/// Cores busy over one second, with no server or load running.
fn background_cores() -> f64 {
    let before = procfs::machine_busy_secs();
    std::thread::sleep(Duration::from_secs(1));
    (procfs::machine_busy_secs() - before).max(0.0)
}

/// Waits up to a minute until other processes use less than `max` cores;
/// returns what they used when the run started.
fn wait_quiet(max: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut warned = false;
    loop {
        let busy = background_cores();
        if busy <= max || Instant::now() > deadline {
            if busy > max {
                eprintln!(
                    "    the machine is busy ({busy:.2} cores used by other processes): running anyway, recorded"
                );
            }
            return busy;
        }
        if !warned {
            eprintln!("    waiting for the machine to calm down ({busy:.2} cores busy)");
            warned = true;
        }
    }
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The machine, the versions and the settings, for the report's method section.
fn meta(args: &Args, reps: usize, setup: &Setup) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or("")
        .to_owned();
    let bun_version = setup
        .bun
        .as_ref()
        .map(|b| command_output(&b.to_string_lossy(), &["--version"]))
        .unwrap_or_default();
    let ws_version = std::fs::read_to_string(args.peers.join("node_modules/ws/package.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["version"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let git = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let dirty =
        !command_output("git", &["status", "--porcelain", "--", "src", "Cargo.toml"]).is_empty();
    json!({
        "date": command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "quick": args.quick,
        "reps": reps,
        "servers": args.servers,
        "cpu_model": model,
        // Not available_parallelism: this process is pinned to one core.
        "cores": cpuinfo.lines().filter(|l| l.starts_with("processor")).count(),
        "memory_gib": mem_kb as f64 / 1048576.0,
        "kernel": command_output("uname", &["-r"]),
        "nofile": nofile,
        "clock_ticks": procfs::clock_ticks(),
        "server_cpu": args.server_cpu,
        "load_cpu": args.load_cpu,
        "securechat_commit": if dirty { format!("{git} + uncommitted changes") } else { git },
        "securechat_version": command_output(&setup.securechat.to_string_lossy(), &["--version"]),
        "node_version": command_output(&args.node, &["--version"]),
        "ws_version": ws_version,
        "bun_version": bun_version,
        "securechat_limits": {
            "outbound_queue_messages": OUTBOUND_QUEUE_MESSAGES,
            "outbound_queue_bytes": OUTBOUND_QUEUE_BYTES,
            "max_write_buffer_bytes": MAX_WRITE_BUFFER_BYTES,
            "tls_send_buffer_bytes": TLS_SEND_BUFFER_BYTES,
            "socket_send_buffer_bytes": SOCKET_SEND_BUFFER_BYTES,
            "ping_interval_secs": PING_INTERVAL_SECS,
            "write_coalesce_ms": WRITE_COALESCE_MS,
            "write_coalesce_frames": WRITE_COALESCE_FRAMES,
            "write_coalesce_busy_percent": WRITE_COALESCE_BUSY_PERCENT,
        },
        "plans": plans(args).iter().map(|p| json!({"scenario": p.scenario, "args": p.args})).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(us: f64, server_util: f64, load_util: f64, other: f64) -> Value {
        json!({
            // Each load generator's own load: half the pair's.
            "variant": "1000x50000",
            "server_cpu": { "us_per_delivery": us, "utilisation": server_util },
            "load_cpu": { "utilisation": load_util },
            "other_cores": other,
        })
    }

    #[test]
    fn a_pair_is_securechat_over_the_peer_with_each_others_cpu_not_counted_as_noise() {
        let ours = summary(3.6, 0.2, 0.5, 0.75);
        let theirs = summary(3.0, 0.15, 0.4, 0.8);
        let r = pair_record(ours, theirs, "bun", "bun", "1000x100000").expect("a record");
        assert!((r["ratio"].as_f64().unwrap() - 1.2).abs() < 1e-9);
        assert_eq!(r["server"], "bun");
        assert_eq!(r["first"], "bun");
        assert_eq!(r["variant"], "1000x100000");
        // 0.75 - (0.15 + 0.4) = 0.2 and 0.8 - (0.2 + 0.5) = 0.1: the larger.
        assert!((r["other_cores"].as_f64().unwrap() - 0.2).abs() < 1e-9);
        assert_eq!(r["securechat"]["server_cpu"]["us_per_delivery"], 3.6);
        assert_eq!(r["peer"]["server_cpu"]["us_per_delivery"], 3.0);
    }

    #[test]
    fn a_pair_without_deliveries_is_an_error() {
        assert!(
            pair_record(
                summary(0.0, 0.0, 0.0, 0.0),
                summary(3.0, 0.1, 0.1, 0.0),
                "bun",
                "bun",
                "v"
            )
            .is_err()
        );
        assert!(
            pair_record(
                json!({}),
                summary(3.0, 0.1, 0.1, 0.0),
                "bun",
                "securechat",
                "v"
            )
            .is_err()
        );
    }

    #[test]
    fn pairs_set_securechat_against_every_other_server_named() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            pair_peers(&names(&["securechat", "ws", "bun"])),
            ["ws", "bun"]
        );
        assert_eq!(pair_peers(&names(&["bun", "securechat"])), ["bun"]);
        assert!(pair_peers(&names(&["ws", "bun"])).is_empty());
        assert!(pair_peers(&names(&["securechat"])).is_empty());
    }

    #[test]
    fn an_update_replaces_only_the_runs_of_the_scenarios_loads_and_servers_run_again() {
        let plan = |scenario: &'static str, variant: &str| Plan {
            scenario,
            variant: variant.into(),
            args: Vec::new(),
            budget: Duration::from_secs(1),
        };
        let run = |scenario: &str, variant: &str, server: &str| json!({ "suite_scenario": scenario, "variant": variant, "server": server });
        let old = json!({
            "meta": {},
            "runs": [
                run("fanout", "1000x100000", "securechat"),
                run("fanout", "1000x100000", "ws"),
                run("fanout", "1000x100000", "bun"),
                run("fanout", "1000x800000", "bun"),
                run("pair", "1000x40000", "ws"),
                run("pair", "1000x40000", "bun"),
                run("idle", "10000", "bun"),
            ]
        });
        let fresh = json!({ "meta": { "date": "now" } });
        let plans = [plan("fanout", "1000x100000"), plan("pair", "1000x40000")];
        let servers = ["securechat".to_string(), "bun".to_string()];
        let kept = without_replaced(old, &fresh, &plans, &servers);
        let left: Vec<String> = kept["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| format!("{} {} {}", r["suite_scenario"], r["variant"], r["server"]))
            .collect();
        assert_eq!(
            left,
            [
                r#""fanout" "1000x100000" "ws""#,
                r#""fanout" "1000x800000" "bun""#,
                r#""pair" "1000x40000" "ws""#,
                r#""idle" "10000" "bun""#,
            ]
        );
        assert_eq!(
            kept["meta"]["updates"][0]["servers"],
            json!(["securechat", "bun"])
        );
    }

    /// The pair plans for these command-line arguments: (variant, the
    /// `--rate` each load generator is given).
    fn pair_plans(cli: &[&str]) -> Vec<(String, String)> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            suite: Args,
        }
        let cli = Cli::parse_from(["x", "--scenarios", "pair"].iter().chain(cli));
        plans(&cli.suite)
            .into_iter()
            .map(|p| {
                assert_eq!(p.scenario, "pair");
                let rate = p.args.iter().position(|a| a == "--rate").expect("a rate");
                (p.variant, p.args[rate + 1].clone())
            })
            .collect()
    }

    #[test]
    fn the_pair_plans_halve_the_lowest_fanout_load_and_40000() {
        let pairs = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            pair_plans(&["--fanout-rates", "800000,100000"]),
            pairs(&[("1000x100000", "50"), ("1000x40000", "20")])
        );
        assert_eq!(
            pair_plans(&["--fanout-rates", "40000"]),
            pairs(&[("1000x40000", "20")])
        );
        assert_eq!(pair_plans(&["--quick"]), pairs(&[("200x20000", "50")]));
        assert_eq!(
            pair_plans(&["--pair-rates", "60000"]),
            pairs(&[("1000x60000", "30")])
        );
    }
}
