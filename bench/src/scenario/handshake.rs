//! `handshake`: C workers each open a connection (TCP, a full TLS 1.3
//! handshake, the upgrade with its token), then drop it, over and over.
//! Handshakes per second and server CPU per handshake.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::procfs::{Meters, Proc};
use crate::stats::{self, Latency};
use crate::target::{Target, TargetArgs};

#[derive(clap::Args, Clone, Debug)]
// Named: every scenario's struct is `Args`, and `slow` holds `fanout`'s.
#[group(id = "handshake")]
pub struct Args {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Distinct users the tokens name.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Seconds of handshakes before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
}

struct Counters {
    measuring: AtomicBool,
    done: AtomicU64,
    failed: AtomicU64,
    next: AtomicU64,
    times: Mutex<hdrhistogram::Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

pub async fn run(mut args: Args) -> Result<Value, String> {
    // Short-lived sockets (reset on close, see `Target::zero_linger`):
    // spread them wide all the same.
    if args.target.source_ips == 0 {
        args.target.source_ips = 16;
    }
    args.target.read_buffer = 4096;
    let target = Target::new(&args.target, 0)?;
    let server = target.server.clone().unwrap_or_else(Proc::me);
    let counters = Arc::new(Counters {
        measuring: AtomicBool::new(false),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        next: AtomicU64::new(0),
        times: Mutex::new(stats::histogram()),
        errors: Mutex::new(BTreeMap::new()),
    });
    let (stop, _) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let target = target.clone();
        let counters = counters.clone();
        let users = args.users.max(1) as u64;
        let mut stop = stop.subscribe();
        workers.push(tokio::spawn(async move {
            while !*stop.borrow_and_update() {
                let n = counters.next.fetch_add(1, Ordering::Relaxed);
                let sub = format!("h{}", n % users);
                let result = target
                    .connect(n as usize, &sub, Duration::from_secs(10))
                    .await;
                if !counters.measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match result {
                    Ok((ws, took)) => {
                        drop(ws);
                        counters.done.fetch_add(1, Ordering::Relaxed);
                        stats::record_ns(
                            &mut counters.times.lock().expect("not poisoned"),
                            took.as_nanos() as u64,
                        );
                    }
                    Err(e) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        let kind: String = e.chars().take(80).collect();
                        *counters
                            .errors
                            .lock()
                            .expect("not poisoned")
                            .entry(kind)
                            .or_default() += 1;
                        // Do not spin on a refusing server.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    let bar = super::bar(1, "handshake");
    super::timed(&bar, args.warmup, || "warming up".into()).await;
    counters.measuring.store(true, Ordering::Relaxed);
    let meters = Meters::start(&server);
    let c = counters.clone();
    super::timed(&bar, args.duration, move || {
        format!("{} handshakes", c.done.load(Ordering::Relaxed))
    })
    .await;
    counters.measuring.store(false, Ordering::Relaxed);
    let (server_cpu, my_cpu, other_cpu, secs) = meters.read();
    let done = counters.done.load(Ordering::Relaxed);
    let _ = stop.send(true);
    for worker in workers {
        let _ = tokio::time::timeout(Duration::from_secs(15), worker).await;
    }
    bar.finish_and_clear();

    let mut m = super::head("handshake", &target);
    m.insert("variant".into(), json!(format!("c{}", args.concurrency)));
    m.insert(
        "params".into(),
        json!({
            "concurrency": args.concurrency,
            "users": args.users,
            "duration": args.duration,
            "kx": args.target.kx,
        }),
    );
    m.insert("handshakes".into(), json!(done));
    m.insert("per_sec".into(), json!(done as f64 / secs));
    m.insert(
        "failed".into(),
        json!(counters.failed.load(Ordering::Relaxed)),
    );
    m.insert(
        "errors".into(),
        json!(*counters.errors.lock().expect("not poisoned")),
    );
    m.insert(
        "time".into(),
        json!(Latency::of(&counters.times.lock().expect("not poisoned"))),
    );
    m.insert(
        "server_cpu".into(),
        json!({
            "secs": server_cpu,
            "utilisation": server_cpu / secs,
            "ms_per_handshake": if done == 0 { 0.0 } else { server_cpu * 1e3 / done as f64 },
        }),
    );
    m.insert(
        "load_cpu".into(),
        json!({ "secs": my_cpu, "utilisation": my_cpu / secs }),
    );
    m.insert("other_cores".into(), json!(other_cpu / secs));
    m.insert("server_memory".into(), super::memory_json(&server));
    Ok(Value::Object(m))
}
