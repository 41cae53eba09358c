//! `docs/benchmarks.md` and its charts from the suite's results: medians per
//! scenario, load and server, the targets of issue 7 checked against them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::prelude::*;
use serde_json::Value;

use crate::stats::median;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    #[command(flatten)]
    pub files: Files,
}

/// Where the results, the report, its charts and the notes are; shared by
/// `suite` (which writes the results) and `report`.
#[derive(clap::Args, Clone, Debug)]
pub struct Files {
    /// The results file (JSON): every run's summary.
    #[arg(long, default_value = "bench/results/latest.json")]
    pub results: PathBuf,
    /// Where the report goes.
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub report: PathBuf,
    /// Where the charts go.
    #[arg(long, default_value = "docs/benchmarks")]
    pub charts: PathBuf,
    /// Hand-written analysis appended to the report, when the file exists.
    #[arg(long, default_value = "bench/notes.md")]
    pub notes: PathBuf,
}

impl Files {
    /// Writes the report and charts for `results`.
    pub fn write(&self, results: &Value) -> Result<(), String> {
        write(results, &self.report, &self.charts, &self.notes)
    }
}

pub fn run(args: Args) -> Result<(), String> {
    let path = &args.files.results;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let results: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    args.files.write(&results)
}

/// The runs of one suite, grouped for medians.
struct Runs<'a> {
    runs: Vec<&'a Value>,
    servers: Vec<String>,
}

impl<'a> Runs<'a> {
    fn new(results: &'a Value) -> Self {
        let runs: Vec<&Value> = results["runs"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let servers = results["meta"]["servers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Self { runs, servers }
    }

    fn matching(&self, scenario: &str, variant: &str, server: &str) -> Vec<&'a Value> {
        self.runs
            .iter()
            .copied()
            .filter(|r| {
                r["suite_scenario"] == scenario
                    && r["server"] == server
                    && r["variant"] == variant
                    && r.get("error").is_none()
            })
            .collect()
    }

    /// The variants of a scenario, in the order first run.
    fn variants(&self, scenario: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.runs {
            if r["suite_scenario"] == scenario
                && let Some(v) = r["variant"].as_str()
                && !out.iter().any(|o| o == v)
            {
                out.push(v.to_owned());
            }
        }
        out
    }

    /// The median of the value at `pointer` over the matching runs.
    fn median(&self, scenario: &str, variant: &str, server: &str, pointer: &str) -> Option<f64> {
        let mut values: Vec<f64> = self
            .matching(scenario, variant, server)
            .iter()
            .filter_map(|r| r.pointer(pointer).and_then(Value::as_f64))
            .collect();
        median(&mut values)
    }

    /// Runs that failed, as text.
    fn failures(&self) -> Vec<String> {
        self.runs
            .iter()
            .filter_map(|r| {
                let e = r.get("error")?.as_str()?;
                Some(format!(
                    "{} against {} (repetition {}): {e}",
                    r["suite_scenario"].as_str().unwrap_or("?"),
                    r["server"].as_str().unwrap_or("?"),
                    r["rep"]
                ))
            })
            .collect()
    }
}

/// One row of a table: a label and how to format the median of a value.
struct Row {
    label: &'static str,
    pointer: &'static str,
    scale: f64,
    digits: usize,
}

const fn row(label: &'static str, pointer: &'static str, scale: f64, digits: usize) -> Row {
    Row {
        label,
        pointer,
        scale,
        digits,
    }
}

const IDLE_ROWS: &[Row] = &[
    row("connections open at the end", "/open/held", 1.0, 0),
    row("connections that failed", "/connect/failed", 1.0, 0),
    row(
        "**server memory per connection, KiB**",
        "/bytes_per_conn/held",
        1.0 / 1024.0,
        2,
    ),
    row(
        "server memory per connection before the hold, KiB",
        "/bytes_per_conn/settled",
        1.0 / 1024.0,
        2,
    ),
    row(
        "server RSS before connecting, MiB",
        "/baseline/rss",
        1.0 / 1048576.0,
        1,
    ),
    row(
        "server RSS holding them, MiB",
        "/held/rss",
        1.0 / 1048576.0,
        1,
    ),
    row(
        "projected to 1,000,000 connections, GiB",
        "/million_projection_gib",
        1.0,
        2,
    ),
    row("connections set up per second", "/connect/per_sec", 1.0, 0),
    row(
        "server CPU while holding, % of a core",
        "/hold_cpu/utilisation",
        100.0,
        1,
    ),
];

const FANOUT_ROWS: &[Row] = &[
    row(
        "offered deliveries/s",
        "/params/offered_deliveries_per_sec",
        1.0,
        0,
    ),
    row(
        "**deliveries/s received**",
        "/window/deliveries_per_sec",
        1.0,
        0,
    ),
    row("loss, %", "/window/loss", 100.0, 3),
    row("latency p50, ms", "/window/latency/p50_ms", 1.0, 2),
    row("latency p99, ms", "/window/latency/p99_ms", 1.0, 2),
    row("latency p99.9, ms", "/window/latency/p999_ms", 1.0, 2),
    row("latency max, ms", "/window/latency/max_ms", 1.0, 2),
    row(
        "**p99 to the last recipient, ms**",
        "/window/last_recipient/p99_ms",
        1.0,
        2,
    ),
    row(
        "**server CPU per delivery, µs**",
        "/server_cpu/us_per_delivery",
        1.0,
        3,
    ),
    row(
        "server CPU, % of a core",
        "/server_cpu/utilisation",
        100.0,
        1,
    ),
    row(
        "load generator CPU, % of a core",
        "/load_cpu/utilisation",
        100.0,
        1,
    ),
    row("server RSS, MiB", "/server_memory/rss", 1.0 / 1048576.0, 1),
    row("members closed by the server", "/endings/ended", 1.0, 0),
];

const HANDSHAKE_ROWS: &[Row] = &[
    row("**handshakes/s**", "/per_sec", 1.0, 0),
    row(
        "**server CPU per handshake, ms**",
        "/server_cpu/ms_per_handshake",
        1.0,
        3,
    ),
    row(
        "server CPU, % of a core",
        "/server_cpu/utilisation",
        100.0,
        1,
    ),
    row(
        "load generator CPU, % of a core",
        "/load_cpu/utilisation",
        100.0,
        1,
    ),
    row("handshake time p50, ms", "/time/p50_ms", 1.0, 2),
    row("handshake time p99, ms", "/time/p99_ms", 1.0, 2),
    row("failed handshakes", "/failed", 1.0, 0),
];

const SLOW_ROWS: &[Row] = &[
    row("receivers stalled", "/params/stalled", 1.0, 0),
    row(
        "others' p99 with all reading, ms",
        "/reading/latency/p99_ms",
        1.0,
        2,
    ),
    row(
        "others' p99 with the stalled ones, ms",
        "/stalled/latency/p99_ms",
        1.0,
        2,
    ),
    row("**change of the others' p99, %**", "/p99_change", 100.0, 1),
    row("others' loss while stalled, %", "/stalled/loss", 100.0, 3),
    row(
        "**server RSS growth (peak), MiB**",
        "/server_memory/growth",
        1.0 / 1048576.0,
        1,
    ),
    row(
        "server RSS growth at the end, MiB",
        "/server_memory/growth_at_end",
        1.0 / 1048576.0,
        1,
    ),
    row(
        "kernel TCP buffers, peak growth (whole machine), MiB",
        "/server_memory/kernel_tcp_growth",
        1.0 / 1048576.0,
        1,
    ),
    row(
        "reading members closed by the server",
        "/endings/ended",
        1.0,
        0,
    ),
    row(
        "server descriptors before the stall",
        "/server_memory/before/fds",
        1.0,
        0,
    ),
    row(
        "server descriptors at the end (stalled ones closed: fewer)",
        "/server_memory/after/fds",
        1.0,
        0,
    ),
];

fn fmt(value: Option<f64>, digits: usize) -> String {
    match value {
        Some(v) if v.is_finite() => {
            let text = format!("{v:.digits$}");
            if digits == 0 && v.abs() >= 10_000.0 {
                thousands(&text)
            } else {
                text
            }
        }
        _ => "—".into(),
    }
}

fn thousands(digits: &str) -> String {
    let (sign, digits) = digits.strip_prefix('-').map_or(("", digits), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

fn table(out: &mut String, runs: &Runs, scenario: &str, variant: &str, rows: &[Row]) {
    let _ = write!(out, "| |");
    for s in &runs.servers {
        let n = runs.matching(scenario, variant, s).len();
        let _ = write!(out, " {s} (n={n}) |");
    }
    let _ = write!(out, "\n|---|");
    for _ in &runs.servers {
        let _ = write!(out, "---:|");
    }
    out.push('\n');
    for r in rows {
        let _ = write!(out, "| {} |", r.label);
        for s in &runs.servers {
            let v = runs
                .median(scenario, variant, s, r.pointer)
                .map(|v| v * r.scale);
            let _ = write!(out, " {} |", fmt(v, r.digits));
        }
        out.push('\n');
    }
    out.push('\n');
}

/// Writes the report and the charts.
pub fn write(results: &Value, report: &Path, charts: &Path, notes: &Path) -> Result<(), String> {
    let runs = Runs::new(results);
    let meta = &results["meta"];
    std::fs::create_dir_all(charts).map_err(|e| format!("{}: {e}", charts.display()))?;
    let chart_names = draw_charts(&runs, charts)?;
    let mut out = String::new();
    header(&mut out, meta);
    targets(&mut out, &runs, meta);
    let _ = writeln!(out, "## Results\n");
    let negotiated: Vec<String> = runs
        .servers
        .iter()
        .filter_map(|server| {
            let tls = runs
                .runs
                .iter()
                .filter(|r| r["server"] == server.as_str())
                .find_map(|r| r["tls"].as_str())?;
            Some(format!("{server}: {tls}"))
        })
        .collect();
    if !negotiated.is_empty() {
        let _ = writeln!(
            out,
            "Negotiated with the client's browser-like offer (AES-128-GCM first, X25519): {}.\n",
            negotiated.join("; ")
        );
    }
    let _ = writeln!(
        out,
        "Medians of the repetitions (n = runs that completed). Bold rows are the ones the targets use.\n"
    );
    for (scenario, title, rows) in [
        ("idle", "Idle connections", IDLE_ROWS),
        (
            "capacity",
            "Capacity: connections held with pings running",
            IDLE_ROWS,
        ),
        ("fanout", "Fan-out to one room", FANOUT_ROWS),
        ("handshake", "Handshakes", HANDSHAKE_ROWS),
        ("slow", "Slow consumers", SLOW_ROWS),
    ] {
        for variant in runs.variants(scenario) {
            let _ = writeln!(out, "### {title}: {}\n", describe(scenario, &variant));
            table(&mut out, &runs, scenario, &variant, rows);
        }
    }
    for variant in runs.variants("pair") {
        pair_table(&mut out, &runs, &variant);
    }
    let failures = runs.failures();
    if !failures.is_empty() {
        let _ = writeln!(out, "### Runs that failed\n");
        for f in failures {
            let _ = writeln!(out, "- {}", f.replace('\n', " "));
        }
        out.push('\n');
    }
    let busy: Vec<String> = runs
        .runs
        .iter()
        .filter(|r| r["background_cores"].as_f64().unwrap_or(0.0) > 0.3)
        .map(|r| {
            format!(
                "{} against {} (repetition {}): {:.2} cores",
                r["suite_scenario"].as_str().unwrap_or("?"),
                r["server"].as_str().unwrap_or("?"),
                r["rep"],
                r["background_cores"].as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    if !busy.is_empty() {
        let _ = writeln!(
            out,
            "### Runs started while other processes were busy\n\nThe suite waits up to a minute for the machine to calm down; these runs started anyway, with other processes using CPU, and may be noisy:\n"
        );
        for b in busy {
            let _ = writeln!(out, "- {b}");
        }
        out.push('\n');
    }
    let _ = writeln!(out, "## Charts\n");
    let dir = charts
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for (name, title) in chart_names {
        let _ = writeln!(out, "![{title}]({dir}/{name})\n");
    }
    if let Ok(text) = std::fs::read_to_string(notes) {
        let _ = writeln!(out, "{}", text.trim_end());
    }
    if let Some(dir) = report.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(report, out).map_err(|e| format!("{}: {e}", report.display()))?;
    eprintln!(
        "wrote {} and its charts in {}",
        report.display(),
        charts.display()
    );
    Ok(())
}

/// The pair runs of one load: per peer, the ratio of securechat's CPU per
/// delivery to the peer's, run by run.
fn pair_table(out: &mut String, runs: &Runs, variant: &str) {
    let peers: Vec<(&str, Vec<&Value>)> = runs
        .servers
        .iter()
        .filter(|s| *s != "securechat")
        .map(|s| (s.as_str(), runs.matching("pair", variant, s)))
        .filter(|(_, r)| !r.is_empty())
        .collect();
    if peers.is_empty() {
        return;
    }
    let (members, rate) = members_and_rate(variant);
    let _ = writeln!(
        out,
        "### Both at once: {} members, {} deliveries/s offered to each server on the same core
",
        thousands(members),
        thousands(&format!("{:.0}", rate / 2.0))
    );
    let _ = writeln!(
        out,
        "securechat and one peer run at the same time on the server core, each with a load generator of its own on the load core; which starts first alternates. Whatever the machine does meanwhile, it does to both.\n"
    );
    let _ = write!(out, "| |");
    for (peer, r) in &peers {
        let _ = write!(out, " securechat and {peer} (n={}) |", r.len());
    }
    let _ = write!(out, "\n|---|");
    for _ in &peers {
        let _ = write!(out, "---:|");
    }
    out.push('\n');
    let values = |r: &[&Value], pointer: &str| -> Vec<f64> {
        r.iter()
            .filter_map(|v| v.pointer(pointer).and_then(Value::as_f64))
            .collect()
    };
    let mut row = |label: &str, cell: &dyn Fn(&[&Value]) -> String| {
        let _ = write!(out, "| {label} |");
        for (_, r) in &peers {
            let _ = write!(out, " {} |", cell(r));
        }
        out.push('\n');
    };
    row(
        "**securechat's CPU per delivery over the peer's, median**",
        &|r| fmt(median(&mut values(r, "/ratio")), 3),
    );
    row("runs where securechat's was lower", &|r| {
        let ratios = values(r, "/ratio");
        format!(
            "{} of {}",
            ratios.iter().filter(|&&x| x < 1.0).count(),
            ratios.len()
        )
    });
    for (label, pointer, digits) in [
        (
            "securechat's CPU per delivery, µs",
            "/securechat/server_cpu/us_per_delivery",
            3,
        ),
        (
            "the peer's CPU per delivery, µs",
            "/peer/server_cpu/us_per_delivery",
            3,
        ),
        (
            "securechat's p99 to the last recipient, ms",
            "/securechat/window/last_recipient/p99_ms",
            2,
        ),
        (
            "the peer's p99 to the last recipient, ms",
            "/peer/window/last_recipient/p99_ms",
            2,
        ),
    ] {
        row(label, &|r| fmt(median(&mut values(r, pointer)), digits));
    }
    row("every run's ratio, in order", &|r| {
        values(r, "/ratio")
            .iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    out.push('\n');
}

/// A fan-out variant's members and offered deliveries per second
/// (`1000x100000`).
fn members_and_rate(variant: &str) -> (&str, f64) {
    let (members, rate) = variant.split_once('x').unwrap_or((variant, ""));
    (members, rate.parse().unwrap_or(0.0))
}

fn describe(scenario: &str, variant: &str) -> String {
    match scenario {
        "idle" | "capacity" => format!("{} TLS WebSocket connections", thousands(variant)),
        "fanout" | "slow" => {
            let (members, rate) = members_and_rate(variant);
            format!(
                "{} members, {} deliveries/s offered",
                thousands(members),
                thousands(&format!("{rate:.0}"))
            )
        }
        "handshake" => format!("{} handshakes in flight", variant.trim_start_matches('c')),
        _ => variant.to_owned(),
    }
}

fn header(out: &mut String, meta: &Value) {
    let s = |k: &str| meta[k].as_str().unwrap_or("?").to_owned();
    let _ = writeln!(
        out,
        "# Benchmarks\n\n\
         securechat against the servers operators would run instead, measured side by side in one run \
         on one machine by `bench/run.sh` (the `securechat-bench` crate in `bench/`). \
         This file is written by that script; do not edit it by hand (the analysis at the end comes from `bench/notes.md`).\n"
    );
    let _ = writeln!(out, "## Method\n");
    let _ = writeln!(
        out,
        "- **Run**: {}{}, {} repetition(s) of every scenario against every server, the servers taken in turn and the order rotated each repetition; every figure below is the median of the repetitions.",
        s("date"),
        if meta["quick"].as_bool() == Some(true) {
            " with `QUICK=1` (small counts and rates: a smoke run, not the targets' loads)"
        } else {
            ""
        },
        meta["reps"]
    );
    if let Some(updates) = meta["updates"].as_array() {
        for u in updates {
            // Older updates did not record the machine.
            let machine = match (u["cpu_model"].as_str(), u["kernel"].as_str()) {
                (Some(cpu), Some(kernel)) => format!(", on {cpu}, Linux {kernel}"),
                _ => String::new(),
            };
            // Older updates replaced every server's runs of their loads.
            let servers = u["servers"]
                .as_array()
                .map(|s| {
                    let names: Vec<&str> = s.iter().filter_map(Value::as_str).collect();
                    format!(" (against {})", names.join(", "))
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "- **Measured again** on {} (securechat commit {}{machine}): {}{servers}.",
                u["date"].as_str().unwrap_or("?"),
                u["securechat_commit"].as_str().unwrap_or("?"),
                u["runs"]
                    .as_array()
                    .map(|r| r
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            );
        }
    }
    let _ = writeln!(
        out,
        "- **Machine**: {} cores ({}), {:.0} GiB, Linux {}, open-file limit {} per process, clock ticks {}/s.",
        meta["cores"],
        s("cpu_model"),
        meta["memory_gib"].as_f64().unwrap_or(0.0),
        s("kernel"),
        s("nofile"),
        meta["clock_ticks"]
    );
    let _ = writeln!(
        out,
        "- **Pinning**: every server runs alone on core {} (`taskset -c {}`), the load generator on core {}; each server is started fresh for every run and killed after it.",
        meta["server_cpu"], meta["server_cpu"], meta["load_cpu"]
    );
    let _ = writeln!(
        out,
        "- **Servers**: securechat {} (commit {}), release build, configuration written by the suite: every rate, connection and membership cap raised out of the way, bans off, history 0 (the peers keep none), metrics on, logs at `warn`, outbound queues at their defaults ({} messages, {} KiB, plus at most {} KiB of TLS records waiting for the socket){}, server pings every {} s{}. \
         The Node `ws` {} tutorial server on Node {} (`bench/peers/ws-tutorial/server.js`: https server, `ws` server on it, every message broadcast to every open client). \
         Bun {} `Bun.serve` with TLS and built-in pub/sub (`bench/peers/bun/server.ts`: every socket subscribes to one topic, every message is published to it, sender included).",
        s("securechat_version"),
        s("securechat_commit"),
        meta["securechat_limits"]["outbound_queue_messages"],
        meta["securechat_limits"]["outbound_queue_bytes"]
            .as_u64()
            .unwrap_or(0)
            / 1024,
        tls_send_buffer(&meta["securechat_limits"]) / 1024,
        match meta["securechat_limits"]["socket_send_buffer_bytes"].as_u64() {
            Some(0) => ", the kernel's send buffer autotuned".to_string(),
            Some(n) => format!(", the kernel's send buffer per socket {} KiB", n / 1024),
            None => String::new(),
        },
        meta["securechat_limits"]["ping_interval_secs"],
        coalescing(&meta["securechat_limits"]),
        s("ws_version"),
        s("node_version"),
        s("bun_version"),
    );
    let _ = writeln!(
        out,
        "- **Connections**: TLS 1.3 with X25519 (the one group all three share) and the cipher suites in the order browsers offer them (AES-128-GCM first), a full handshake every time (the client never resumes), ALPN `http/1.1`, the server's ECDSA P-256 certificate from `securechat gen-cert` (the client does not verify it: bench only, to keep its CPU for load). \
         Sockets are spread over the source addresses 127.0.0.1, 127.0.0.2, … so that 20,000 connections do not run out of ephemeral ports. \
         securechat connections carry an HS256 token of their own user (minted in the load generator) in `Authorization: Bearer`, offer `securechat.v1`, and join the room `bench`; the peers get plain text (the `raw` mode of the same tool)."
    );
    let _ = writeln!(
        out,
        "- **Memory** is the server's resident set (`VmRSS` of `/proc/PID/status`): the growth from before the first connection to the end of the hold, divided by the connections open then. \
         **CPU** is the server's user + system time (`/proc/PID/stat`) over the measured window, divided by what was done in it (deliveries received by the load generator, handshakes completed). \
         On loopback the kernel's TCP work for both ends is partly charged to the sender, so CPU per delivery includes some of the receiving side's kernel time, for every server alike."
    );
    let _ = writeln!(
        out,
        "- **Latency**: every message body carries its send time (monotonic, in the load generator's clock); each receiver records now − then in an HDR histogram. \
         \"Every recipient\" counts each delivery; \"last recipient\" takes, per message, the latest of its deliveries, over the messages that reached every member. \
         Senders are members too (every server here echoes to the sender). The load generator runs on one core: when its own CPU nears 100 % the latencies include its queueing, which the tables show as load generator CPU."
    );
    let _ = writeln!(
        out,
        "- **Scenarios**: `idle` opens the connections and holds them (securechat: joined to the room, as each Bun socket is subscribed); `capacity` is the same with as many connections as the descriptor limit allows, held across a ping interval; `fanout` is one room, 10 of the members sending at a fixed total rate, one message every 1/rate seconds on a schedule they share and keep from a thread of their own, whatever the receivers are doing (each run's summary gives how late the sends were: `send_lateness`), the other members read from one poll loop on a thread of its own (2 s warm-up, then the measured window, then a drain); `handshake` opens and resets connections as fast as 32 loops can (TCP + TLS + upgrade, and for securechat the token check); `slow` is a `fanout` room (200 members, 100,000 deliveries/s offered, 1 KiB bodies) measured twice: all reading, then with every tenth receiver no longer reading (those have a 4 KiB receive buffer, so what they do not read backs up into the server within seconds instead of staying in the kernel's socket buffers, which grow to 4 MB per socket on loopback); `pair` runs securechat and one peer at the same time, both on the server core, each sent half the load by a load generator of its own on the load core (the lowest `fanout` load, and 40,000/s, where the two load generators keep up on one core; 3 s warm-up; which starts first alternates), and compares their CPU per delivery run by run. The figures of `handshake`, `fanout`, `slow` and `pair` come from windows during which other processes used little CPU: a window where they used more than 0.3 cores is run again (twice at most) and the quietest kept.\n"
    );
    let _ = writeln!(
        out,
        "Reproduce with `bench/run.sh` (about 30 minutes) or `QUICK=1 bench/run.sh` (about 3); `bench/run.sh --help` lists the knobs.\n"
    );
}

/// A target of one or more parts, each met, missed or not measured: met
/// when every part is, missed when one is (naming the parts missed, and
/// those met, when there are several), "—" when a part was not measured.
fn verdict(parts: &[(&str, Option<bool>)]) -> String {
    if parts.iter().any(|(_, ok)| ok.is_none()) {
        return "—".into();
    }
    let named = |met: bool| {
        parts
            .iter()
            .filter(|(_, ok)| *ok == Some(met))
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (missed, met) = (named(false), named(true));
    match (missed.is_empty(), met.is_empty()) {
        (true, _) => "met".into(),
        (false, true) if parts.len() == 1 => "**missed**".into(),
        (false, true) => format!("**missed**: {missed}"),
        (false, false) => format!("**missed**: {missed} (met: {met})"),
    }
}

fn targets(out: &mut String, runs: &Runs, meta: &Value) {
    let _ = writeln!(out, "## Targets (issue 7)\n");
    if meta["quick"].as_bool() == Some(true) {
        let _ = writeln!(
            out,
            "This is a quick run: the loads are smaller than the targets name, so the verdicts below apply to the smaller loads only.\n"
        );
    }
    let _ = writeln!(
        out,
        "| target | securechat | ws | bun | verdict |\n|---|---:|---:|---:|---|"
    );
    let get = |scenario: &str, variant: &str, server: &str, p: &str| {
        runs.median(scenario, variant, server, p)
    };
    let three = |scenario: &str, variant: &str, p: &str| {
        (
            get(scenario, variant, "securechat", p),
            get(scenario, variant, "ws", p),
            get(scenario, variant, "bun", p),
        )
    };
    let mut line = |name: String,
                    v: (Option<f64>, Option<f64>, Option<f64>),
                    digits: usize,
                    parts: &[(&str, Option<bool>)]| {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} |",
            fmt(v.0, digits),
            fmt(v.1, digits),
            fmt(v.2, digits),
            verdict(parts)
        );
    };
    let le = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some(a <= b),
        (Some(_), None) => Some(true),
        _ => None,
    };

    // Memory per idle connection.
    if let Some(variant) = runs.variants("idle").last().cloned() {
        let kib = |v: Option<f64>| v.map(|x| x / 1024.0);
        let (s, w, b) = three("idle", &variant, "/bytes_per_conn/held");
        let (s, w, b) = (kib(s), kib(w), kib(b));
        line(
            format!(
                "memory per idle TLS WebSocket at {} connections: ≤ 5 KiB and ≤ Bun's (KiB)",
                thousands(&variant)
            ),
            (s, w, b),
            2,
            &[("≤ 5 KiB", s.map(|s| s <= 5.0)), ("≤ Bun's", le(s, b))],
        );
    }
    // CPU per delivery and latency.
    let fanouts = runs.variants("fanout");
    let rate_of = |v: &str| members_and_rate(v).1;
    if let Some(high) = fanouts
        .iter()
        .max_by(|a, b| rate_of(a).total_cmp(&rate_of(b)))
    {
        let (s, w, b) = three("fanout", high, "/server_cpu/us_per_delivery");
        let delivered = get("fanout", high, "securechat", "/window/deliveries_per_sec");
        let reached = delivered.map(|d| d >= 0.95 * rate_of(high));
        line(
            format!(
                "server CPU per delivery at {} offered deliveries/s: ≤ 1 µs and ≤ Bun's, the load delivered (µs)",
                thousands(&format!("{:.0}", rate_of(high)))
            ),
            (s, w, b),
            3,
            &[
                ("≤ 1 µs", s.map(|s| s <= 1.0)),
                ("≤ Bun's", le(s, b)),
                ("the load delivered", reached),
            ],
        );
        // The same target at every other load measured: at most Bun's.
        for rate in fanouts.iter().filter(|v| *v != high) {
            let (s, w, b) = three("fanout", rate, "/server_cpu/us_per_delivery");
            line(
                format!(
                    "server CPU per delivery at {} offered deliveries/s: ≤ Bun's (µs)",
                    thousands(&format!("{:.0}", rate_of(rate)))
                ),
                (s, w, b),
                3,
                &[("≤ Bun's", le(s, b))],
            );
        }
    }
    // The same comparison with securechat and each peer running at once.
    for variant in runs.variants("pair") {
        let ratio = |peer: &str| runs.median("pair", &variant, peer, "/ratio");
        let rate = rate_of(&variant);
        line(
            format!(
                "server CPU per delivery at {} offered deliveries/s with both at once ({} each on the same core): securechat's over the peer's ≤ 1 against Bun (ratio, median of {})",
                thousands(&format!("{rate:.0}")),
                thousands(&format!("{:.0}", rate / 2.0)),
                runs.matching("pair", &variant, "bun").len()
            ),
            (None, ratio("ws"), ratio("bun")),
            3,
            &[("≤ 1", ratio("bun").map(|r| r <= 1.0))],
        );
    }
    if let Some(low) = fanouts
        .iter()
        .min_by(|a, b| rate_of(a).total_cmp(&rate_of(b)))
    {
        let (s, w, b) = three("fanout", low, "/window/last_recipient/p99_ms");
        let below = |peer: Option<f64>| match (s, peer) {
            (Some(s), Some(p)) => Some(s < p),
            (Some(_), None) => Some(true),
            _ => None,
        };
        let peers = below(w).zip(below(b)).map(|(w, b)| w && b);
        line(
            format!(
                "p99 latency to the last recipient at {} deliveries/s: ≤ 10 ms and below both peers (ms)",
                thousands(&format!("{:.0}", rate_of(low)))
            ),
            (s, w, b),
            2,
            &[
                ("≤ 10 ms", s.map(|s| s <= 10.0)),
                ("below both peers", peers),
            ],
        );
    }
    if let Some(variant) = runs.variants("handshake").first().cloned() {
        let (s, w, b) = three("handshake", &variant, "/server_cpu/ms_per_handshake");
        line(
            "server CPU per full handshake (TLS 1.3 ECDSA + upgrade + JWT): ≤ 0.3 ms and ≤ Bun's (ms)".into(),
            (s, w, b),
            3,
            &[("≤ 0.3 ms", s.map(|s| s <= 0.3)), ("≤ Bun's", le(s, b))],
        );
    }
    if let Some(variant) = runs.variants("capacity").last().cloned() {
        let (s, w, b) = three("capacity", &variant, "/open/held");
        let want: f64 = variant.parse().unwrap_or(0.0);
        let ok = s.map(|s| s >= want);
        line(
            format!(
                "connections held by one node with pings running (of {})",
                thousands(&variant)
            ),
            (s, w, b),
            0,
            &[("held", ok)],
        );
        let (s, w, b) = three("capacity", &variant, "/million_projection_gib");
        line(
            "memory projected to 1,000,000 connections on one larger host (GiB; a figure, no bound)".into(),
            (s, w, b),
            1,
            &[("no bound", None)],
        );
    }
    if let Some(variant) = runs.variants("slow").first().cloned() {
        let (s, w, b) = three("slow", &variant, "/p99_change");
        let pct = |v: Option<f64>| v.map(|x| x * 100.0);
        let limits = &meta["securechat_limits"];
        let stalled = get("slow", &variant, "securechat", "/params/stalled").unwrap_or(0.0);
        let per_conn = (limits["outbound_queue_bytes"].as_f64().unwrap_or(0.0)
            + tls_send_buffer(limits) as f64)
            .max(0.0);
        let bound = stalled * per_conn;
        let growth = get("slow", &variant, "securechat", "/server_memory/growth");
        let bounded = growth.map(|g| g <= bound);
        let moved = s.map(|s| s.abs() < 0.2);
        line(
            "with 10% of receivers stalled: the others' p99 moves < 20% (change, %)".into(),
            (pct(s), pct(w), pct(b)),
            1,
            &[("< 20 %", moved)],
        );
        let mib = |v: Option<f64>| v.map(|x| x / 1048576.0);
        let (gs, gw, gb) = three("slow", &variant, "/server_memory/growth");
        line(
            format!(
                "… and server memory stays within the queue bounds ({:.0} stalled × (queue {} KiB + unsent TLS records {} KiB) = {:.0} MiB) (peak growth, MiB)",
                stalled,
                limits["outbound_queue_bytes"].as_u64().unwrap_or(0) / 1024,
                tls_send_buffer(limits) / 1024,
                bound / 1048576.0
            ),
            (mib(gs), mib(gw), mib(gb)),
            1,
            &[("within the bounds", bounded)],
        );
    }
    out.push('\n');
}

/// Bars by server: a name and one value per group.
type Series = Vec<(String, Vec<Option<f64>>)>;

/// The medians of one value per variant and server, for a chart.
fn series(runs: &Runs, scenario: &str, pointer: &str, scale: f64) -> (Vec<String>, Series) {
    let variants = runs.variants(scenario);
    let series = runs
        .servers
        .iter()
        .map(|s| {
            (
                s.clone(),
                variants
                    .iter()
                    .map(|v| runs.median(scenario, v, s, pointer).map(|x| x * scale))
                    .collect(),
            )
        })
        .collect();
    (variants, series)
}

const COLOURS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
];

/// An x axis of named groups: group `i` spans `i..i + 1`, its name at the
/// centre.
#[derive(Clone)]
struct Groups(Vec<String>);

impl Ranged for Groups {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let n = self.0.len().max(1) as f64;
        limit.0 + (value / n * (limit.1 - limit.0) as f64).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        (0..self.0.len()).map(|i| i as f64 + 0.5).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        0.0..self.0.len().max(1) as f64
    }
}

impl ValueFormatter<f64> for Groups {
    fn format_ext(&self, value: &f64) -> String {
        let i = value.floor();
        if i >= 0.0 {
            self.0.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    }
}

/// Panels of grouped bars: one group per x label, one bar per series.
struct Panel {
    title: String,
    y_label: String,
    groups: Vec<String>,
    series: Series,
    log: bool,
}

fn load_font() -> Result<(), String> {
    const CANDIDATES: &[&str] = &[
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ];
    let path = CANDIDATES
        .iter()
        .find(|p| Path::new(p).exists())
        .ok_or("no DejaVuSans.ttf for the charts: apt-get install fonts-dejavu-core")?;
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| format!("{path}: not a usable font"))
}

fn draw(path: &Path, title: &str, panels: &[Panel]) -> Result<(), String> {
    let width = 560 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (width, 460)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 24))
        .map_err(|e| err(&e))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        draw_panel(panel, area).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn draw_panel(
    panel: &Panel,
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
) -> Result<(), Box<dyn std::error::Error>> {
    let values: Vec<f64> = panel
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let max = values.iter().copied().fold(0.0, f64::max).max(1e-9);
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let axis = Groups(panel.groups.clone());
    let k = panel.series.len().max(1) as f64;
    let width = 0.8 / k;
    let mut caption = panel.title.clone();
    if panel.log {
        caption.push_str(" (log scale)");
    }
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    // The same bars on a log or a linear axis: two coordinate types, one
    // drawing. `$base` is where a bar starts (a log axis has no zero).
    macro_rules! draw_bars {
        ($chart:expr, $base:expr) => {{
            let mut chart = $chart;
            let base: f64 = $base;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .light_line_style(RGBColor(238, 238, 238))
                .y_desc(panel.y_label.as_str())
                .label_style(("sans-serif", 14))
                .draw()?;
            for (j, (name, vals)) in panel.series.iter().enumerate() {
                let colour = COLOURS[j % COLOURS.len()];
                chart
                    .draw_series(vals.iter().enumerate().filter_map(|(i, v)| {
                        let v = (*v)?;
                        let x0 = i as f64 + 0.1 + j as f64 * width;
                        Some(Rectangle::new(
                            [(x0, base), (x0 + width * 0.9, v.max(base))],
                            colour.filled(),
                        ))
                    }))?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .position(SeriesLabelPosition::UpperLeft)
                .draw()?;
        }};
    }
    if panel.log {
        let low = (min.min(max) / 2.0).max(1e-6);
        draw_bars!(
            builder.build_cartesian_2d(axis.clone(), (low..max * 2.0).log_scale())?,
            low
        );
    } else {
        draw_bars!(
            builder.build_cartesian_2d(axis.clone(), 0f64..max * 1.15)?,
            0.0
        );
    }
    Ok(())
}

/// Draws every chart there is data for; returns (file name, title).
fn draw_charts(runs: &Runs, dir: &Path) -> Result<Vec<(String, String)>, String> {
    load_font()?;
    let mut drawn = Vec::new();
    let short = |v: &str| {
        v.split_once('x')
            .and_then(|(_, r)| r.parse::<f64>().ok())
            .map(|r| format!("{}k/s", (r / 1000.0).round()))
            .unwrap_or_else(|| v.to_owned())
    };

    if !runs.variants("fanout").is_empty() {
        let (groups, delivered) = series(runs, "fanout", "/window/deliveries_per_sec", 1e-3);
        let (_, cpu) = series(runs, "fanout", "/server_cpu/us_per_delivery", 1.0);
        let groups: Vec<String> = groups
            .iter()
            .map(|g| format!("offered {}", short(g)))
            .collect();
        draw(
            &dir.join("throughput.png"),
            "Fan-out: deliveries received and server CPU per delivery",
            &[
                Panel {
                    title: "deliveries received".into(),
                    y_label: "thousand deliveries/s".into(),
                    groups: groups.clone(),
                    series: delivered,
                    log: false,
                },
                Panel {
                    title: "server CPU per delivery".into(),
                    y_label: "µs".into(),
                    groups,
                    series: cpu,
                    log: false,
                },
            ],
        )?;
        drawn.push((
            "throughput.png".into(),
            "Fan-out throughput and server CPU per delivery".into(),
        ));

        let variants = runs.variants("fanout");
        let panels: Vec<Panel> = variants
            .iter()
            .map(|v| {
                let pointers = [
                    ("p50", "/window/latency/p50_ms"),
                    ("p99", "/window/latency/p99_ms"),
                    ("p99.9", "/window/latency/p999_ms"),
                    ("p99 last", "/window/last_recipient/p99_ms"),
                ];
                Panel {
                    title: format!("offered {}", short(v)),
                    y_label: "ms".into(),
                    groups: pointers.iter().map(|(n, _)| (*n).to_owned()).collect(),
                    series: runs
                        .servers
                        .iter()
                        .map(|s| {
                            (
                                s.clone(),
                                pointers
                                    .iter()
                                    .map(|(_, p)| runs.median("fanout", v, s, p))
                                    .collect(),
                            )
                        })
                        .collect(),
                    log: true,
                }
            })
            .collect();
        draw(
            &dir.join("latency.png"),
            "Fan-out: end-to-end latency",
            &panels,
        )?;
        drawn.push(("latency.png".into(), "Fan-out latency".into()));
    }

    let mut memory_groups = Vec::new();
    let mut memory_series: Series = runs
        .servers
        .iter()
        .map(|s| (s.clone(), Vec::new()))
        .collect();
    for scenario in ["idle", "capacity"] {
        for v in runs.variants(scenario) {
            memory_groups.push(format!("{} connections", thousands(&v)));
            for (s, vals) in memory_series.iter_mut() {
                vals.push(
                    runs.median(scenario, &v, s, "/bytes_per_conn/held")
                        .map(|b| b / 1024.0),
                );
            }
        }
    }
    if !memory_groups.is_empty() {
        draw(
            &dir.join("memory.png"),
            "Server memory per idle TLS WebSocket connection",
            &[Panel {
                title: "resident memory growth / connections".into(),
                y_label: "KiB per connection".into(),
                groups: memory_groups,
                series: memory_series,
                log: false,
            }],
        )?;
        drawn.push(("memory.png".into(), "Memory per connection".into()));
    }

    if !runs.variants("handshake").is_empty() {
        let (groups, rate) = series(runs, "handshake", "/per_sec", 1.0);
        let (_, cpu) = series(runs, "handshake", "/server_cpu/ms_per_handshake", 1.0);
        let groups: Vec<String> = groups
            .iter()
            .map(|g| format!("{} in flight", g.trim_start_matches('c')))
            .collect();
        draw(
            &dir.join("handshake.png"),
            "Full TLS 1.3 handshakes + upgrades",
            &[
                Panel {
                    title: "handshakes per second".into(),
                    y_label: "handshakes/s".into(),
                    groups: groups.clone(),
                    series: rate,
                    log: false,
                },
                Panel {
                    title: "server CPU per handshake".into(),
                    y_label: "ms".into(),
                    groups,
                    series: cpu,
                    log: false,
                },
            ],
        )?;
        drawn.push(("handshake.png".into(), "Handshakes".into()));
    }
    Ok(drawn)
}

/// How the run's securechat coalesced writes (runs recorded before the
/// setting existed name none).
fn coalescing(limits: &Value) -> String {
    match (
        limits["write_coalesce_ms"].as_u64(),
        limits["write_coalesce_frames"].as_u64(),
    ) {
        (Some(0), _) => ", write coalescing off".to_string(),
        (Some(ms), Some(frames)) => {
            let when = match limits["write_coalesce_busy_percent"].as_u64() {
                Some(0) => ", whatever the load".to_string(),
                Some(percent) => format!(
                    ", only once the server has used at least {percent} % of its core for three seconds in a row, until below a third of that"
                ),
                None => String::new(),
            };
            format!(
                ", writes to busy connections coalesced as by default (after a write of {frames} or more frames, the next no sooner than {ms} ms after it began{when})"
            )
        }
        _ => String::new(),
    }
}

/// What securechat holds encrypted and unsent per connection at most, from
/// a results file's limits (older files recorded the WebSocket write buffer
/// in its place).
fn tls_send_buffer(limits: &Value) -> u64 {
    limits["tls_send_buffer_bytes"]
        .as_u64()
        .or_else(|| limits["max_write_buffer_bytes"].as_u64())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fanout(server: &str, variant: &str, us: f64, delivered: f64) -> Value {
        json!({
            "suite_scenario": "fanout",
            "server": server,
            "variant": variant,
            "server_cpu": { "us_per_delivery": us },
            "window": { "deliveries_per_sec": delivered, "last_recipient": { "p99_ms": 5.0 } },
        })
    }

    /// The CPU-per-delivery rows of the targets table for `runs` of
    /// securechat and Bun.
    fn cpu_rows(runs: &[Value]) -> Vec<String> {
        let results = json!({ "meta": { "servers": ["securechat", "bun"] }, "runs": runs });
        let mut out = String::new();
        targets(&mut out, &Runs::new(&results), &results["meta"]);
        out.lines()
            .filter(|l| l.starts_with("| server CPU per delivery"))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_header_names_what_each_update_measured_again() {
        let meta = json!({
            "updates": [
                { "date": "then", "securechat_commit": "abc", "runs": ["pair 1000x40000"] },
                {
                    "date": "now",
                    "securechat_commit": "def",
                    "runs": ["fanout 1000x100000", "pair 1000x40000"],
                    "servers": ["securechat", "bun"],
                },
            ]
        });
        let mut out = String::new();
        header(&mut out, &meta);
        assert!(
            out.contains(
                "- **Measured again** on then (securechat commit abc): pair 1000x40000.\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("- **Measured again** on now (securechat commit def): fanout 1000x100000, pair 1000x40000 (against securechat, bun).\n"),
            "{out}"
        );
    }

    #[test]
    fn cpu_per_delivery_is_checked_against_bun_at_every_load() {
        let cpu = cpu_rows(&[
            fanout("securechat", "1000x100000", 3.5, 100_000.0),
            fanout("bun", "1000x100000", 3.3, 100_000.0),
            fanout("securechat", "1000x800000", 0.8, 800_000.0),
            fanout("bun", "1000x800000", 1.2, 800_000.0),
        ]);
        assert_eq!(cpu.len(), 2, "{cpu:?}");
        let high = cpu.iter().find(|r| r.contains("800,000")).unwrap();
        assert!(
            high.contains("≤ 1 µs") && high.ends_with("| met |"),
            "{high}"
        );
        let low = cpu.iter().find(|r| r.contains("100,000")).unwrap();
        assert!(
            low.contains("| 3.500 |") && low.ends_with("| **missed** |"),
            "{low}"
        );
    }

    fn pair(peer: &str, ratio: f64) -> Value {
        json!({
            "suite_scenario": "pair",
            "server": peer,
            "variant": "1000x100000",
            "ratio": ratio,
            "securechat": { "server_cpu": { "us_per_delivery": 3.0 * ratio } },
            "peer": { "server_cpu": { "us_per_delivery": 3.0 } },
        })
    }

    #[test]
    fn a_verdict_names_the_parts_of_a_target_that_were_missed() {
        assert_eq!(verdict(&[("≤ 1 µs", Some(true))]), "met");
        assert_eq!(verdict(&[("≤ 1 µs", Some(false))]), "**missed**");
        assert_eq!(
            verdict(&[("≤ 10 ms", Some(false)), ("below both peers", Some(true))]),
            "**missed**: ≤ 10 ms (met: below both peers)"
        );
        assert_eq!(
            verdict(&[("≤ 10 ms", Some(false)), ("below both peers", Some(false))]),
            "**missed**: ≤ 10 ms, below both peers"
        );
        assert_eq!(
            verdict(&[("≤ 5 KiB", Some(true)), ("≤ Bun's", Some(true))]),
            "met"
        );
        // A part not measured leaves the whole target unjudged.
        assert_eq!(
            verdict(&[("≤ 0.3 ms", Some(false)), ("≤ Bun's", None)]),
            "—"
        );
    }

    #[test]
    fn pairs_run_at_once_are_judged_by_their_median_ratio() {
        let lower = [0.97, 1.01, 0.99, 1.2, 0.98].map(|r| pair("bun", r));
        let cpu = cpu_rows(&lower);
        assert_eq!(cpu.len(), 1, "{cpu:?}");
        assert!(
            cpu[0].contains("at once") && cpu[0].contains("median of 5"),
            "{}",
            cpu[0]
        );
        assert!(
            cpu[0].contains("| 0.990 |") && cpu[0].ends_with("| met |"),
            "{}",
            cpu[0]
        );
        let higher = [1.03, 0.99, 1.05].map(|r| pair("bun", r));
        let cpu = cpu_rows(&higher);
        assert!(
            cpu[0].contains("| 1.030 |") && cpu[0].ends_with("| **missed** |"),
            "{}",
            cpu[0]
        );
    }

    #[test]
    fn the_pair_table_lists_every_run_and_counts_the_lower_ones() {
        let runs = [pair("bun", 0.95), pair("bun", 1.10), pair("bun", 1.02)];
        let results = json!({ "meta": { "servers": ["securechat", "ws", "bun"] }, "runs": runs });
        let mut out = String::new();
        pair_table(&mut out, &Runs::new(&results), "1000x100000");
        assert!(out.contains("50,000 deliveries/s"), "{out}");
        // ws has no pair runs: no column.
        assert!(!out.contains("and ws"), "{out}");
        assert!(out.contains("| securechat and bun (n=3) |"), "{out}");
        assert!(out.contains("over the peer's, median** | 1.020 |"), "{out}");
        assert!(
            out.contains("| runs where securechat's was lower | 1 of 3 |"),
            "{out}"
        );
        assert!(out.contains("| 0.950, 1.100, 1.020 |"), "{out}");
        assert!(
            out.contains("| the peer's CPU per delivery, µs | 3.000 |"),
            "{out}"
        );
    }

    #[test]
    fn a_load_measured_once_gets_one_cpu_row() {
        let cpu = cpu_rows(&[
            fanout("securechat", "1000x100000", 3.1, 100_000.0),
            fanout("bun", "1000x100000", 3.3, 100_000.0),
        ]);
        assert_eq!(cpu.len(), 1, "{cpu:?}");
        assert!(cpu[0].contains("≤ 1 µs"), "{}", cpu[0]);
    }
}
