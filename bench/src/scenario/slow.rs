//! `slow`: the `fanout` room, measured twice: first with every member
//! reading, then after a share of the receivers stops reading. The server's
//! memory must stay bounded and the others' latency unchanged.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use super::room::{DRAIN, Role, Room, WARMUP, WINDOW_A, WINDOW_B};
use crate::procfs::Meters;
use crate::target::Target;

#[derive(clap::Args, Clone, Debug)]
// Named: every scenario's struct is `Args`, and `slow` holds `fanout`'s.
#[group(id = "slow")]
pub struct Args {
    #[command(flatten)]
    pub fanout: super::fanout::Args,
    /// Share of the receivers (not the senders) that stop reading.
    #[arg(long, default_value_t = 0.1)]
    pub stalled: f64,
    /// Seconds measured after the stall.
    #[arg(long, default_value_t = 15.0)]
    pub stalled_duration: f64,
    /// Receive buffer (SO_RCVBUF) of the receivers that will stall, so what
    /// they do not read backs up into the server instead of the kernel's
    /// socket buffers (which grow to megabytes on loopback).
    #[arg(long, default_value_t = 4096)]
    pub stalled_rcvbuf: u32,
}

pub async fn run(args: Args) -> Result<Value, String> {
    let f = &args.fanout;
    let senders = f.senders.clamp(1, f.members.max(1));
    let every = if args.stalled > 0.0 {
        (1.0 / args.stalled).round().max(1.0) as usize
    } else {
        usize::MAX
    };
    let is_victim = move |i: usize| i >= senders && (i - senders) % every == 0;
    let victims = (0..f.members).filter(|i| is_victim(*i)).count();
    let recipients = (f.members - victims) as u32;

    let mut target = Target::new(&f.target, f.members)?;
    Arc::get_mut(&mut target)
        .expect("not shared yet")
        .small_rcvbuf = Some((Arc::new(is_victim), args.stalled_rcvbuf));
    let server = target
        .server
        .clone()
        .ok_or("slow needs --server-pid to read the server's memory")?;
    let total = f.warmup + f.duration + args.stalled_duration;
    let capacity = (f.rate * (total + 5.0) * 1.2) as usize + 1024;
    let room = Room::new(target.clone(), f.body_bytes, capacity);
    let bar = super::bar(f.members as u64, "slow");
    bar.set_message("connecting");
    let connected = super::fanout::connect_with_roles(&room, f, senders, &bar, move |i| {
        if i < senders {
            Role::Sender
        } else if is_victim(i) {
            Role::Victim
        } else {
            Role::Receiver
        }
    })
    .await;
    connected.require_all(f.members, &room, &bar)?;

    room.set_phase(WARMUP);
    super::timed(&bar, f.warmup, || "warming up".into()).await;

    room.set_phase(WINDOW_A);
    let meters_a = Meters::start(&server);
    super::timed(&bar, f.duration, || "all reading".into()).await;
    let (server_cpu_a, _, other_a, secs_a) = meters_a.read();
    let before = super::memory_json(&server);
    let rss_before = server.rss().unwrap_or(0);
    let kernel_before = kernel_tcp_bytes();

    room.set_phase(WINDOW_B);
    room.stall_victims();
    let meters_b = Meters::start(&server);
    let mut peak = rss_before;
    let mut kernel_peak = kernel_before;
    let started = std::time::Instant::now();
    let end = started + Duration::from_secs_f64(args.stalled_duration);
    bar.set_length(args.stalled_duration.ceil() as u64);
    while std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(server.rss().unwrap_or(0));
        kernel_peak = kernel_peak.max(kernel_tcp_bytes());
        bar.set_position(started.elapsed().as_secs());
        bar.set_message(format!(
            "{victims} stalled, server RSS {} MiB",
            peak / (1 << 20)
        ));
    }
    let (server_cpu_b, _, other_b, secs_b) = meters_b.read();
    let after = super::memory_json(&server);
    let rss_after = server.rss().unwrap_or(0);
    room.set_phase(DRAIN);
    bar.set_message("draining");
    room.drain(recipients, Duration::from_secs(10)).await;
    room.stop();
    bar.finish_and_clear();

    let a = room.window_json(WINDOW_A, secs_a, recipients);
    let b = room.window_json(WINDOW_B, secs_b, recipients);
    let p99 = |w: &Value| w["latency"]["p99_ms"].as_f64().unwrap_or(0.0);
    let mut m = super::head("slow", &target);
    m.insert("variant".into(), json!(super::fanout::variant(f)));
    m.insert(
        "params".into(),
        json!({
            "members": f.members,
            "senders": senders,
            "stalled": victims,
            "rate_msgs": f.rate,
            "offered_deliveries_per_sec": f.rate * f.members as f64,
            "body_bytes": f.body_bytes,
            "duration": f.duration,
            "stalled_duration": args.stalled_duration,
            "stalled_rcvbuf": args.stalled_rcvbuf,
            "read_with": f.read_with,
        }),
    );
    m.insert("connect".into(), connected.json());
    m.insert("reading".into(), a.clone());
    m.insert("stalled".into(), b.clone());
    m.insert(
        "p99_change".into(),
        json!(if p99(&a) > 0.0 {
            p99(&b) / p99(&a) - 1.0
        } else {
            0.0
        }),
    );
    m.insert(
        "server_memory".into(),
        json!({
            "before": before,
            "after": after,
            "peak_rss": peak,
            "growth": peak.saturating_sub(rss_before),
            "growth_at_end": rss_after.saturating_sub(rss_before),
            "kernel_tcp_before": kernel_before,
            "kernel_tcp_peak": kernel_peak,
            "kernel_tcp_growth": kernel_peak.saturating_sub(kernel_before),
        }),
    );
    m.insert(
        "server_cpu".into(),
        json!({
            "reading_utilisation": server_cpu_a / secs_a,
            "stalled_utilisation": server_cpu_b / secs_b,
        }),
    );
    m.insert(
        "other_cores".into(),
        json!((other_a + other_b) / (secs_a + secs_b)),
    );
    m.insert("endings".into(), room.endings.json());
    m.insert("totals".into(), room.totals_json(recipients));
    m.insert(
        "send_errors".into(),
        json!(room.send_errors.load(Ordering::Relaxed)),
    );
    Ok(Value::Object(m))
}

/// Memory in the kernel's TCP buffers, whole machine (`/proc/net/sockstat`):
/// where unread data waits before a server's own queues see it.
fn kernel_tcp_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let mut it = l.split_whitespace();
            while let Some(word) = it.next() {
                if word == "mem" {
                    return it.next()?.parse::<u64>().ok();
                }
            }
            None
        })
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}
