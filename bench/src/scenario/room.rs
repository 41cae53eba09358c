//! One room under load, shared by `fanout` and `slow`: members that receive,
//! some of which also send at a fixed total rate, and the bookkeeping of
//! every delivery (latency, loss, the last recipient of each message).
//!
//! Each message body is `seq:sent_at_ns:phase:padding`, where `sent_at_ns`
//! is the monotonic time since the start of this process, so receivers in the
//! same process compute the end-to-end latency. The phase tells which window
//! the message was sent in.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::future::Either;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::Endings;
use crate::polled::{Next, PolledWs, Reader, Readers};
use crate::stats::{self, Latency};
use crate::target::{Target, Ws, close_code};

/// Messages sent before measuring.
pub const WARMUP: u8 = 0;
/// The first measured window.
pub const WINDOW_A: u8 = 1;
/// The second measured window (`slow`: with stalled receivers).
pub const WINDOW_B: u8 = 2;
/// Senders are quiet: while members connect, and at the end while the
/// bench waits for the last deliveries.
pub const DRAIN: u8 = 3;
const PHASES: usize = 4;

/// What a member does.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Receives and sends.
    Sender,
    /// Receives; its deliveries are measured.
    Receiver,
    /// Receives unmeasured; stops reading when the room is told to stall.
    Victim,
}

/// How receivers read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadWith {
    /// One poll loop on a thread of its own reads every receiver
    /// ([`crate::polled`]): what a delivery costs the load generator is
    /// little more than the kernel's receive path and the decryption.
    Poll,
    /// A tokio task per receiver over tokio-tungstenite, as senders read.
    Tasks,
}

/// A member's connection as it was set up.
pub enum Connection {
    /// Read by a task of its own.
    Task(Ws),
    /// Read by the room's poll loop.
    Polled(PolledWs),
}

/// Everything the members of one room share.
pub struct Room {
    pub target: Arc<Target>,
    epoch: Instant,
    phase: AtomicU8,
    /// Set: victims stop reading.
    stall: AtomicBool,
    seq: AtomicU64,
    /// Bytes of padding after the timestamp in each body.
    pad: String,
    /// Messages sent, by phase.
    sent: [AtomicU64; PHASES],
    /// Deliveries to measured members of messages sent in each phase.
    delivered: [AtomicU64; PHASES],
    /// Deliveries to any member, by the phase current when they arrived.
    arrived: [AtomicU64; PHASES],
    /// Deliveries to a measured member of a message it already had, by
    /// the phase the message was sent in.
    duplicates: [AtomicU64; PHASES],
    /// Every delivery to a measured member, by the phase it was sent in.
    latency: [Mutex<Histogram<u64>>; PHASES],
    /// How late each send was against its sender's schedule, by phase:
    /// a load generator that cannot keep its schedule offers a different
    /// load (bunched messages) from the one asked for.
    lateness: [Mutex<Histogram<u64>>; PHASES],
    /// Per message: measured recipients so far, the largest latency (ns),
    /// the phase it was sent in.
    per_message: Vec<(AtomicU32, AtomicU64, AtomicU8)>,
    pub send_errors: AtomicU64,
    pub endings: Endings,
    stop: watch::Sender<bool>,
    /// The poll loop of the members that read from it, started with the
    /// first (`None`: it could not be).
    readers: OnceLock<Option<Readers<PolledMember>>>,
}

impl Room {
    /// A room for messages up to `capacity` (sequence numbers past it are
    /// delivered but not tracked per message).
    pub fn new(target: Arc<Target>, body_bytes: usize, capacity: usize) -> Arc<Self> {
        let (stop, _) = watch::channel(false);
        Arc::new(Self {
            target,
            epoch: Instant::now(),
            // Nothing is sent until every member is in.
            phase: AtomicU8::new(DRAIN),
            stall: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            pad: "x".repeat(body_bytes.saturating_sub(24)),
            sent: Default::default(),
            delivered: Default::default(),
            arrived: Default::default(),
            duplicates: Default::default(),
            latency: std::array::from_fn(|_| Mutex::new(stats::histogram())),
            lateness: std::array::from_fn(|_| Mutex::new(stats::histogram())),
            per_message: (0..capacity)
                .map(|_| (AtomicU32::new(0), AtomicU64::new(0), AtomicU8::new(u8::MAX)))
                .collect(),
            send_errors: AtomicU64::new(0),
            endings: Endings::default(),
            stop,
            readers: OnceLock::new(),
        })
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::Release);
    }

    pub fn stall_victims(&self) {
        self.stall.store(true, Ordering::Release);
    }

    /// Ends every member task, and the poll loop with its members.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
        if let Some(Some(readers)) = self.readers.get() {
            readers.stop();
        }
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    pub fn sent_total(&self) -> u64 {
        self.sent.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    pub fn arrived(&self, phase: u8) -> u64 {
        self.arrived[phase as usize].load(Ordering::Relaxed)
    }

    pub fn sent(&self, phase: u8) -> u64 {
        self.sent[phase as usize].load(Ordering::Relaxed)
    }

    pub fn delivered(&self, phase: u8) -> u64 {
        self.delivered[phase as usize].load(Ordering::Relaxed)
    }

    pub fn duplicates(&self, phase: u8) -> u64 {
        self.duplicates[phase as usize].load(Ordering::Relaxed)
    }

    /// Deliveries of every message sent so far to `measured` members.
    pub fn delivered_total(&self) -> u64 {
        self.delivered
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum()
    }

    /// A delivery arrived at a member; `seen` holds the messages this
    /// member already had.
    fn on_text(&self, text: &str, measured: bool, seen: &mut Seen) {
        let Some(body) = self.target.delivered_body(text) else {
            return;
        };
        let now = self.now_ns();
        let current = self.phase.load(Ordering::Relaxed) as usize;
        self.arrived[current.min(PHASES - 1)].fetch_add(1, Ordering::Relaxed);
        if !measured {
            return;
        }
        let Some((seq, sent_at, phase)) = parse_body(body) else {
            return;
        };
        let phase = (phase as usize).min(PHASES - 1);
        if !seen.insert(seq) {
            self.duplicates[phase].fetch_add(1, Ordering::Relaxed);
            return;
        }
        let latency = now.saturating_sub(sent_at);
        self.delivered[phase].fetch_add(1, Ordering::Relaxed);
        stats::record_ns(
            &mut self.latency[phase].lock().expect("not poisoned"),
            latency,
        );
        if let Some((count, max, _)) = self.per_message.get(seq as usize) {
            count.fetch_add(1, Ordering::Relaxed);
            max.fetch_max(latency, Ordering::Relaxed);
        }
    }

    /// The next frame to send, due at `due`; `None` once draining.
    fn next_frame(
        &self,
        due: tokio::time::Instant,
    ) -> Option<tokio_tungstenite::tungstenite::Utf8Bytes> {
        let phase = self.phase.load(Ordering::Acquire);
        if phase >= DRAIN {
            return None;
        }
        stats::record_ns(
            &mut self.lateness[phase as usize].lock().expect("not poisoned"),
            due.elapsed().as_nanos() as u64,
        );
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        if let Some((_, _, p)) = self.per_message.get(seq as usize) {
            p.store(phase, Ordering::Relaxed);
        }
        self.sent[phase as usize].fetch_add(1, Ordering::Relaxed);
        let body = format_body(seq, self.now_ns(), phase, &self.pad);
        Some(self.target.send_frame(seq, &body))
    }

    /// A member, until the room stops: read by a task of its own or by the
    /// room's poll loop, as it was connected.
    pub async fn member(
        self: Arc<Self>,
        connection: Connection,
        role: Role,
        period: Duration,
        first: tokio::time::Instant,
    ) {
        match connection {
            Connection::Task(ws) => self.task_member(ws, role, period, first).await,
            Connection::Polled(ws) => self.polled_member(ws, role),
        }
    }

    /// Hands a receiver's connection to the room's poll loop. Senders are
    /// always read by a task, which also starts their send loop.
    fn polled_member(self: Arc<Self>, ws: PolledWs, role: Role) {
        if self.stopped() {
            return;
        }
        let readers = self.readers.get_or_init(|| {
            Readers::start()
                .map_err(|e| eprintln!("securechat-bench: no thread for the readers: {e}"))
                .ok()
        });
        let member = PolledMember {
            room: self.clone(),
            role,
            seen: Seen::new(self.per_message.len()),
        };
        let added = match readers {
            Some(readers) => readers.add(ws, member),
            None => Err("no poll loop".into()),
        };
        if let Err(e) = added {
            eprintln!("securechat-bench: a member was lost: {e}");
            self.endings.record(None);
        }
    }

    /// A member's task: reads until the room stops. A sender also sends
    /// every `period`, starting at `first`, from a task of its own, so that
    /// a write the server is slow to take never stops it reading (a sender
    /// that stopped reading would look like a slow consumer to the server).
    async fn task_member(
        self: Arc<Self>,
        ws: Ws,
        role: Role,
        period: Duration,
        first: tokio::time::Instant,
    ) {
        let mut stop = self.stop.subscribe();
        if *stop.borrow_and_update() {
            return;
        }
        // Only senders split the stream: the lock the two halves share
        // costs every read, and a receiver reads all the time. A receiver's
        // stream still answers pings itself.
        let (mut stream, writer) = if role == Role::Sender {
            let (sink, stream) = ws.split();
            let writer = pacer().spawn(self.clone().send_loop(sink, period, first));
            (Either::Left(stream), Some(writer))
        } else {
            (Either::Right(ws), None)
        };
        // The flag only ever goes from false to true: a change is the stop.
        let stopped = stop.changed();
        tokio::pin!(stopped);
        let mut seen = Seen::new(self.per_message.len());
        loop {
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                frame = stream.next() => match frame {
                    Some(Ok(message)) => match self.on_message(&message, role, &mut seen) {
                        Next::Read => {}
                        Next::Hold => {
                            // Hold the socket, unread, until the end.
                            let _ = (&mut stopped).await;
                            break;
                        }
                        Next::End => break,
                    },
                    Some(Err(_)) | None => {
                        self.endings.record(None);
                        break;
                    }
                },
            }
        }
        if let Some(writer) = writer {
            writer.abort();
        }
    }

    /// A message a member read, whichever way it reads: a delivery is
    /// counted, a close frame ends the member (its code counted), and a
    /// victim stops reading once the room stalls them.
    fn on_message(&self, message: &Message, role: Role, seen: &mut Seen) -> Next {
        match message {
            Message::Text(text) => {
                self.on_text(text, role != Role::Victim, seen);
                if role == Role::Victim && self.stall.load(Ordering::Acquire) {
                    Next::Hold
                } else {
                    Next::Read
                }
            }
            Message::Close(_) => {
                self.endings.record(close_code(message));
                Next::End
            }
            _ => Next::Read,
        }
    }

    /// A sender's writes: one frame every `period` (catching up after a
    /// write that blocked, so the offered rate holds), until the room stops.
    async fn send_loop(
        self: Arc<Self>,
        mut sink: SplitSink<Ws, Message>,
        period: Duration,
        first: tokio::time::Instant,
    ) {
        let mut stop = self.stop.subscribe();
        if *stop.borrow_and_update() {
            return;
        }
        let stopped = stop.changed();
        tokio::pin!(stopped);
        let mut tick = tokio::time::interval_at(first, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        loop {
            tokio::select! {
                biased;
                _ = &mut stopped => return,
                due = tick.tick() => {
                    if let Some(frame) = self.next_frame(due)
                        && sink.send(Message::Text(frame)).await.is_err()
                    {
                        self.send_errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }
    }

    /// Latency to every measured recipient of the messages sent in `phase`.
    pub fn latency(&self, phase: u8) -> Latency {
        Latency::of(&self.latency[phase as usize].lock().expect("not poisoned"))
    }

    /// Latency to the last measured recipient of each message sent in
    /// `phase` that reached all `recipients`, and how many did not.
    pub fn last_recipient(&self, phase: u8, recipients: u32) -> (Latency, u64) {
        let mut h = stats::histogram();
        let mut incomplete = 0;
        let sent = self.seq.load(Ordering::Relaxed) as usize;
        for (count, max, p) in self.per_message.iter().take(sent) {
            if p.load(Ordering::Relaxed) != phase {
                continue;
            }
            if count.load(Ordering::Relaxed) >= recipients {
                stats::record_ns(&mut h, max.load(Ordering::Relaxed));
            } else {
                incomplete += 1;
            }
        }
        (Latency::of(&h), incomplete)
    }

    /// The measured figures of one window.
    pub fn window_json(&self, phase: u8, secs: f64, recipients: u32) -> Value {
        let sent = self.sent(phase);
        let expected = sent * recipients as u64;
        let delivered = self.delivered(phase);
        let (last, incomplete) = self.last_recipient(phase, recipients);
        json!({
            "secs": secs,
            "sent": sent,
            "sent_per_sec": sent as f64 / secs,
            "arrived": self.arrived(phase),
            "deliveries_per_sec": self.arrived(phase) as f64 / secs,
            "expected": expected,
            "delivered": delivered,
            "loss": if expected == 0 { 0.0 } else { 1.0 - delivered.min(expected) as f64 / expected as f64 },
            "duplicates": self.duplicates(phase),
            "latency": self.latency(phase),
            "last_recipient": last,
            "incomplete_messages": incomplete,
            "send_lateness": Latency::of(&self.lateness[phase as usize].lock().expect("not poisoned")),
        })
    }

    /// Every message of the run, warm-up and drain included: sent, the
    /// deliveries to `recipients` measured members that were expected, those
    /// that arrived (each message counted once per member) and duplicates.
    pub fn totals_json(&self, recipients: u32) -> Value {
        let sent = self.sent_total();
        json!({
            "sent": sent,
            "expected": sent * recipients as u64,
            "delivered": self.delivered_total(),
            "duplicates": (0..PHASES as u8).map(|p| self.duplicates(p)).sum::<u64>(),
        })
    }

    /// Waits (at most `max`) until every message sent so far has reached
    /// every measured member, or deliveries stop coming for a second.
    pub async fn drain(&self, recipients: u32, max: Duration) -> f64 {
        let started = Instant::now();
        let mut last = (self.delivered_total(), Instant::now());
        while started.elapsed() < max {
            let expected = self.sent_total() * recipients as u64;
            let delivered = self.delivered_total();
            if delivered >= expected {
                break;
            }
            if delivered != last.0 {
                last = (delivered, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        started.elapsed().as_secs_f64()
    }
}

/// A member read by the room's poll loop.
struct PolledMember {
    room: Arc<Room>,
    role: Role,
    seen: Seen,
}

impl Reader for PolledMember {
    fn message(&mut self, message: Message) -> Next {
        self.room.on_message(&message, self.role, &mut self.seen)
    }

    fn failed(&mut self) {
        if !self.room.stopped() {
            self.room.endings.record(None);
        }
    }
}

/// The scheduler the senders run on: a thread of its own. On the
/// receivers' scheduler a sender woken by its timer is queued behind every
/// receiver that has data, a whole fan-out's worth at a time when the
/// deliveries arrive in a dense burst, and its sends bunch up (by several
/// milliseconds, more with servers that deliver in denser bursts). A server
/// can join bunched messages into one write per recipient, so the load
/// offered would depend on the server measured. On a thread of their own
/// the kernel runs the senders when their time comes, whatever the
/// receivers are doing.
fn pacer() -> &'static tokio::runtime::Handle {
    static PACER: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    PACER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the senders");
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("senders".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .expect("a thread for the senders");
        handle
    })
}

/// A message body: `seq:sent_at_ns:phase:padding`.
pub fn format_body(seq: u64, sent_at_ns: u64, phase: u8, pad: &str) -> String {
    format!("{seq}:{sent_at_ns}:{phase}:{pad}")
}

/// The sequence number, send time and phase of a body from [`format_body`].
pub fn parse_body(body: &str) -> Option<(u64, u64, u8)> {
    let mut parts = body.splitn(4, ':');
    let seq = parts.next()?.parse().ok()?;
    let sent_at = parts.next()?.parse().ok()?;
    let phase = parts.next()?.parse().ok()?;
    Some((seq, sent_at, phase))
}

/// The sequence numbers one member has received: a bit per message the
/// room tracks, and a set for any beyond.
pub struct Seen {
    bits: Vec<u64>,
    beyond: std::collections::HashSet<u64>,
}

impl Seen {
    pub fn new(capacity: usize) -> Self {
        Self {
            bits: vec![0; capacity.div_ceil(64)],
            beyond: std::collections::HashSet::new(),
        }
    }

    /// Records `seq`; `false` if it was already there.
    pub fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        match self.bits.get_mut(word) {
            Some(w) => {
                let fresh = *w & (1 << bit) == 0;
                *w |= 1 << bit;
                fresh
            }
            None => self.beyond.insert(seq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_with_any_padding() {
        for pad in ["", "x", "xx:yy", &"x".repeat(2000)] {
            let body = format_body(42, 1_234_567_890, WINDOW_B, pad);
            assert_eq!(parse_body(&body), Some((42, 1_234_567_890, WINDOW_B)));
        }
        assert_eq!(parse_body("not a body"), None);
        assert_eq!(parse_body("1:2"), None);
        assert_eq!(parse_body("1:x:2:"), None);
    }

    #[test]
    fn seen_finds_duplicates_inside_and_beyond_capacity() {
        let mut seen = Seen::new(100);
        for seq in [0, 63, 64, 99, 100, 5_000] {
            assert!(seen.insert(seq), "first {seq}");
            assert!(!seen.insert(seq), "again {seq}");
        }
        assert!(seen.insert(1));
        assert!(seen.insert(5_001));
    }
}
