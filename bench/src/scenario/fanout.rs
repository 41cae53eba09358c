//! `fanout`: M members in one room, S of them sending at a fixed total rate.
//! Deliveries per second, loss, latency to every recipient and to the last
//! recipient of each message, server CPU per delivery.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use super::room::{Connection, DRAIN, ReadWith, Role, Room, WARMUP, WINDOW_A};
use crate::procfs::{Meters, Proc};
use crate::target::{Target, TargetArgs};

#[derive(clap::Args, Clone, Debug)]
// Named: every scenario's struct is `Args`, and `slow` holds `fanout`'s.
#[group(id = "fanout")]
pub struct Args {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Members of the room (senders included: every member receives every message).
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Members that also send.
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Messages per second, all senders together (deliveries per second is
    /// this times the members).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Bytes of each message body.
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// How receivers read (senders are always read by a task of their own).
    #[arg(long, value_enum, default_value_t = ReadWith::Poll)]
    pub read_with: ReadWith,
}

pub async fn run(args: Args) -> Result<Value, String> {
    let senders = args.senders.clamp(1, args.members.max(1));
    let target = Target::new(&args.target, args.members)?;
    let capacity = (args.rate * (args.warmup + args.duration + 5.0) * 1.2) as usize + 1024;
    let room = Room::new(target.clone(), args.body_bytes, capacity);
    let bar = super::bar(args.members as u64, "fanout");
    bar.set_message("connecting");
    let connected = connect(&room, &args, senders, &bar).await;
    connected.require_all(args.members, &room, &bar)?;
    let recipients = args.members as u32;
    let server = target.server.clone().unwrap_or_else(Proc::me);

    room.set_phase(WARMUP);
    super::timed(&bar, args.warmup, || "warming up".into()).await;

    room.set_phase(WINDOW_A);
    let meters = Meters::start(&server);
    let room2 = room.clone();
    super::timed(&bar, args.duration, move || {
        format!("{} deliveries", room2.arrived(WINDOW_A))
    })
    .await;
    let (server_cpu, my_cpu, other_cpu, secs) = meters.read();
    let memory = super::memory_json(&server);
    room.set_phase(DRAIN);
    bar.set_message("draining");
    let drain_secs = room.drain(recipients, Duration::from_secs(10)).await;
    room.stop();
    bar.finish_and_clear();

    let window = room.window_json(WINDOW_A, secs, recipients);
    let arrived = room.arrived(WINDOW_A) as f64;
    let mut m = super::head("fanout", &target);
    m.insert("variant".into(), json!(variant(&args)));
    m.insert(
        "params".into(),
        json!({
            "members": args.members,
            "senders": senders,
            "rate_msgs": args.rate,
            "offered_deliveries_per_sec": args.rate * args.members as f64,
            "body_bytes": args.body_bytes,
            "warmup": args.warmup,
            "duration": args.duration,
            "read_with": args.read_with,
        }),
    );
    m.insert("connect".into(), connected.json());
    m.insert("window".into(), window);
    m.insert("drain_secs".into(), json!(drain_secs));
    m.insert(
        "server_cpu".into(),
        json!({
            "secs": server_cpu,
            "utilisation": server_cpu / secs,
            "us_per_delivery": if arrived > 0.0 { server_cpu * 1e6 / arrived } else { 0.0 },
        }),
    );
    m.insert(
        "load_cpu".into(),
        json!({ "secs": my_cpu, "utilisation": my_cpu / secs }),
    );
    m.insert("other_cores".into(), json!(other_cpu / secs));
    m.insert("server_memory".into(), memory);
    m.insert(
        "send_errors".into(),
        json!(room.send_errors.load(Ordering::Relaxed)),
    );
    m.insert("endings".into(), room.endings.json());
    m.insert("totals".into(), room.totals_json(recipients));
    Ok(Value::Object(m))
}

/// A short name for this load, as the report groups runs.
pub fn variant(args: &Args) -> String {
    format!(
        "{}x{}",
        args.members,
        (args.rate * args.members as f64).round() as u64
    )
}

/// Connects every member; the first `senders` send, each every
/// `senders / rate` seconds, staggered so the total rate is even.
pub async fn connect(
    room: &Arc<Room>,
    args: &Args,
    senders: usize,
    bar: &indicatif::ProgressBar,
) -> super::Connected {
    connect_with_roles(room, args, senders, bar, move |i| {
        if i < senders {
            Role::Sender
        } else {
            Role::Receiver
        }
    })
    .await
}

/// When sender `index` of `senders` sends so that together they send `rate`
/// messages per second, evenly spread: every `period`, starting `offset`
/// after the room opens (senders one stagger step apart).
pub fn pacing(rate: f64, senders: usize, index: usize) -> (Duration, Duration) {
    let senders = senders.max(1);
    let period = Duration::from_secs_f64(senders as f64 / rate.max(0.001));
    let offset = period.mul_f64((index % senders) as f64 / senders as f64);
    (period, offset)
}

/// A sender's first send: the first time at or after `now` that lies on its
/// slot of the schedule every sender shares (`base + offset`, then every
/// `period`). Senders connect one by one, at times that differ by up to a
/// handshake queue's length; counted from when each connected, their sends
/// would bunch in some runs and spread in others, and the messages a
/// server can join into one write with them.
pub fn first_send(
    base: tokio::time::Instant,
    period: Duration,
    offset: Duration,
    now: tokio::time::Instant,
) -> tokio::time::Instant {
    let first = base + offset;
    let behind = now.saturating_duration_since(first);
    if behind.is_zero() || period.is_zero() {
        return first.max(now);
    }
    let periods = behind.as_nanos().div_ceil(period.as_nanos());
    let late = period.as_nanos().saturating_mul(periods);
    first + Duration::from_nanos(u64::try_from(late).unwrap_or(u64::MAX))
}

/// Connects every member with the role `role_of(index)` gives it.
pub async fn connect_with_roles(
    room: &Arc<Room>,
    args: &Args,
    senders: usize,
    bar: &indicatif::ProgressBar,
    role_of: impl Fn(usize) -> Role + Clone + Send + Sync + 'static,
) -> super::Connected {
    let rate = args.rate;
    let room2 = room.clone();
    let polled = {
        let role_of = role_of.clone();
        let poll = args.read_with == ReadWith::Poll;
        move |index: usize| poll && role_of(index) != Role::Sender
    };
    // Every sender's schedule counts from here, whenever it connects.
    let base = tokio::time::Instant::now();
    super::connect_members(
        &room.target,
        0..args.members,
        args.target.connect_concurrency,
        bar,
        move |target, index| {
            let polled = polled(index);
            async move {
                let timeout = super::CONNECT_TIMEOUT;
                if polled {
                    let (ws, took) = target.connect_polled_member(index, timeout).await?;
                    Ok((Connection::Polled(ws), took))
                } else {
                    let (ws, took) = target.connect_member(index, timeout).await?;
                    Ok((Connection::Task(ws), took))
                }
            }
        },
        move |index, ws| {
            let room = room2.clone();
            let role = role_of(index);
            // They send nothing until the room leaves its set-up phase.
            let (period, offset) = pacing(rate, senders, index);
            let first = first_send(base, period, offset, tokio::time::Instant::now());
            room.member(ws, role, period, first)
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_together_offer_the_rate_evenly_spread() {
        for (rate, senders) in [(100.0, 10), (800.0, 10), (7.0, 3), (1.0, 1)] {
            let slots: Vec<(Duration, Duration)> =
                (0..senders).map(|i| pacing(rate, senders, i)).collect();
            let total: f64 = slots.iter().map(|(p, _)| 1.0 / p.as_secs_f64()).sum();
            // Periods are whole nanoseconds: equal to within that rounding.
            assert!((total - rate).abs() < rate * 1e-6, "{total} != {rate}");
            // Offsets step by period / senders, all within one period.
            let (period, _) = slots[0];
            let step = period.as_secs_f64() / senders as f64;
            for (i, (_, offset)) in slots.iter().enumerate() {
                assert!((offset.as_secs_f64() - step * i as f64).abs() < 1e-9);
                assert!(*offset < period);
            }
        }
    }

    #[test]
    fn senders_keep_their_slots_of_one_schedule_whenever_they_connect() {
        let base = tokio::time::Instant::now();
        let period = Duration::from_millis(100);
        for (offset_ms, connected_ms, first_ms) in [
            (30, 0, 30),    // connected before its slot: the slot itself
            (30, 30, 30),   // exactly on it
            (30, 31, 130),  // just after: the next period's slot
            (30, 245, 330), // several periods late
            (0, 200, 200),  // on a later slot exactly
        ] {
            let ms = Duration::from_millis;
            let first = first_send(base, period, ms(offset_ms), base + ms(connected_ms));
            assert_eq!(
                first - base,
                ms(first_ms),
                "offset {offset_ms}, connected {connected_ms}"
            );
        }
        // Ten senders connecting at scattered times still send 10 ms apart.
        let mut firsts: Vec<Duration> = (0..10)
            .map(|i| {
                let (period, offset) = pacing(100.0, 10, i);
                let connected = base + Duration::from_millis((i as u64 * 37) % 90);
                (first_send(base, period, offset, connected) - base).as_nanos() as u64 % 100_000_000
            })
            .map(Duration::from_nanos)
            .collect();
        firsts.sort();
        for (i, at) in firsts.iter().enumerate() {
            assert!(at.abs_diff(Duration::from_millis(10 * i as u64)) < Duration::from_micros(1));
        }
    }

    #[test]
    fn a_zero_rate_does_not_divide_by_zero() {
        let (period, offset) = pacing(0.0, 0, 5);
        assert!(period.as_secs_f64().is_finite() && period > Duration::ZERO);
        assert_eq!(offset, Duration::ZERO);
    }
}
