//! The scenarios. Each runs on a single-threaded runtime (the load generator
//! is pinned to one core), shows a progress bar on stderr and prints one JSON
//! summary line on stdout.

pub mod fanout;
pub mod handshake;
pub mod idle;
pub mod room;
pub mod slow;

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::procfs::Proc;
use crate::stats::{self, Latency};
use crate::target::Target;

/// Runs a scenario and prints its summary line.
pub fn run(scenario: impl Future<Output = Result<Value, String>>) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let summary = runtime.block_on(scenario)?;
    println!("{summary}");
    Ok(())
}

/// A progress bar on stderr (drawn only when stderr is a terminal).
pub fn bar(len: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .expect("a valid template"),
    );
    bar.set_prefix(prefix.to_owned());
    bar
}

/// A spinner-like bar over a fixed duration, ticking once a second.
pub async fn timed(bar: &ProgressBar, secs: f64, mut message: impl FnMut() -> String) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    bar.set_length(secs.ceil() as u64);
    bar.set_position(0);
    let start = Instant::now();
    while Instant::now() < end {
        let step = Duration::from_millis(250).min(end.saturating_duration_since(Instant::now()));
        tokio::time::sleep(step).await;
        bar.set_position(start.elapsed().as_secs());
        bar.set_message(message());
    }
}

/// The common head of every summary line.
pub fn head(scenario: &str, target: &Target) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("scenario".into(), json!(scenario));
    m.insert("server".into(), json!(target.server_name));
    m.insert("protocol".into(), json!(target.proto));
    m.insert("tls".into(), json!(target.negotiated.get()));
    m
}

/// How setting up connections went.
pub struct Connected {
    pub ok: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    pub secs: f64,
    pub times: Histogram<u64>,
}

impl Connected {
    pub fn json(&self) -> Value {
        json!({
            "ok": self.ok,
            "failed": self.failed,
            "errors": self.errors,
            "secs": self.secs,
            "per_sec": self.ok as f64 / self.secs.max(1e-9),
            "time": Latency::of(&self.times),
        })
    }

    /// `Ok` when all `members` of `room` connected; otherwise stops the
    /// room and the progress bar and says what failed.
    pub fn require_all(
        &self,
        members: usize,
        room: &room::Room,
        bar: &ProgressBar,
    ) -> Result<(), String> {
        if self.ok >= members as u64 {
            return Ok(());
        }
        room.stop();
        bar.finish_and_clear();
        Err(format!(
            "only {} of {members} members connected: {:?}",
            self.ok, self.errors
        ))
    }
}

/// How long a member's connection (TCP, TLS, upgrade, join) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects members `indices` with `connect` (as [`Target::connect_member`]
/// does), at most `concurrency` at a time, with up to three tries each, and
/// hands every connected socket to `member`, which runs as that member's
/// task. Returns when every member is connected or has failed.
pub async fn connect_members<C, CFut, W, F, Fut>(
    target: &Arc<Target>,
    indices: Range<usize>,
    concurrency: usize,
    bar: &ProgressBar,
    connect: C,
    member: F,
) -> Connected
where
    C: Fn(Arc<Target>, usize) -> CFut + Clone + Send + 'static,
    CFut: Future<Output = Result<(W, Duration), String>> + Send,
    W: Send + 'static,
    F: Fn(usize, W) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let started = Instant::now();
    let total = indices.len();
    bar.set_length(total as u64);
    bar.set_position(0);
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for index in indices {
        let target = target.clone();
        let gate = gate.clone();
        let done = done_tx.clone();
        let connect = connect.clone();
        let member = member.clone();
        tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("never closed");
            let mut last_error = String::new();
            let mut connected = None;
            for attempt in 0..3 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
                match connect(target.clone(), index).await {
                    Ok(ok) => {
                        connected = Some(ok);
                        break;
                    }
                    Err(e) => last_error = e,
                }
            }
            drop(permit);
            match connected {
                Some((ws, took)) => {
                    let _ = done.send(Ok(took));
                    member(index, ws).await;
                }
                None => {
                    let _ = done.send(Err(last_error));
                }
            }
        });
    }
    drop(done_tx);
    let mut report = Connected {
        ok: 0,
        failed: 0,
        errors: BTreeMap::new(),
        secs: 0.0,
        times: stats::histogram(),
    };
    for _ in 0..total {
        match done_rx.recv().await {
            Some(Ok(took)) => {
                report.ok += 1;
                stats::record_ns(&mut report.times, took.as_nanos() as u64);
            }
            Some(Err(e)) => {
                report.failed += 1;
                // Keep the kind of error, not every port number.
                let kind: String = e.chars().take(80).collect();
                *report.errors.entry(kind).or_default() += 1;
            }
            None => break,
        }
        bar.inc(1);
    }
    report.secs = started.elapsed().as_secs_f64();
    report
}

/// Counts sessions that ended, by close code (0: no close frame).
#[derive(Default)]
pub struct Endings {
    pub ended: AtomicU64,
    codes: Mutex<BTreeMap<u16, u64>>,
}

impl Endings {
    pub fn record(&self, code: Option<u16>) {
        self.ended.fetch_add(1, Ordering::Relaxed);
        *self
            .codes
            .lock()
            .expect("not poisoned")
            .entry(code.unwrap_or(0))
            .or_default() += 1;
    }
    pub fn json(&self) -> Value {
        json!({
            "ended": self.ended.load(Ordering::Relaxed),
            "close_codes": *self.codes.lock().expect("not poisoned"),
        })
    }
}

/// The server's memory now, with the fields of smaps_rollup that say where
/// it is.
pub fn memory_json(server: &Proc) -> Value {
    let rollup = server.smaps_rollup();
    let pick = |k: &str| rollup.get(k).copied().unwrap_or(0);
    json!({
        "rss": server.rss().unwrap_or(0),
        "rss_anon": server.rss_anon().unwrap_or(0),
        "threads": server.threads().unwrap_or(0),
        "fds": server.open_fds().unwrap_or(0),
        "smaps": {
            "rss": pick("Rss"),
            "pss": pick("Pss"),
            "anonymous": pick("Anonymous"),
            "private_dirty": pick("Private_Dirty"),
            "shared_clean": pick("Shared_Clean"),
        }
    })
}
