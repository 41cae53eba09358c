//! `floor`: what the kernel's send path costs on its own at fan-out, and
//! what a task per connection adds to it. Plain TCP on loopback, no TLS or
//! WebSocket, no server: the measurement behind the gap at 100,000
//! deliveries/s described in `bench/notes.md`.
//!
//! This process (run it pinned: `taskset -c 0`) accepts `--connections`
//! connections from a receiver it starts itself (pinned to
//! `--receiver-cpu`), then writes a `--bytes` record to every connection
//! `--rate` times a second, in one of two ways:
//! - `loop`: one task writes to every socket in turn, one `send(2)` each, as
//!   an event loop such as Bun's does;
//! - `tasks`: every connection has a writer task of its own, woken for each
//!   record, as securechat's writers are.
//!
//! The summary line gives this process's CPU time per send (user and
//! kernel, from `/proc/self/stat`) and checks that the receiver got every
//! byte.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::procfs::Proc;

#[derive(clap::ValueEnum, serde::Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One task writes to every socket in turn.
    Loop,
    /// A writer task per connection, woken for every record.
    Tasks,
}

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// How the records are written.
    #[arg(long, value_enum, default_value_t = Mode::Loop)]
    pub mode: Mode,
    /// Connections (each gets every record).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Records per second to every connection (sends per second is this
    /// times the connections).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Bytes of each record (245: a securechat `message` frame of the
    /// fan-out scenario as a TLS record).
    #[arg(long, default_value_t = 245)]
    pub bytes: usize,
    /// Seconds of sending before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// The core the receiver is pinned to (with `taskset`); unpinned if not given.
    #[arg(long)]
    pub receiver_cpu: Option<usize>,
    /// Be the receiver: connect this many times to the address, read until
    /// the sender closes, print the bytes read.
    #[arg(long, hide = true, value_name = "ADDR")]
    pub receive: Option<SocketAddr>,
}

/// What the sender measured.
#[derive(Debug)]
pub struct Sent {
    pub sends: u64,
    /// Sends that the socket did not take whole (none expected: the
    /// receiver keeps up at these rates).
    pub short: u64,
    pub cpu_secs: f64,
    pub secs: f64,
}

pub fn run(args: Args) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // Like securechat on one core: one worker thread.
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let summary = runtime.block_on(async move {
        match args.receive {
            Some(addr) => receive(addr, args.connections)
                .await
                .map(|bytes| json!({ "received_bytes": bytes })),
            None => measure(args).await,
        }
    })?;
    println!("{summary}");
    Ok(())
}

async fn measure(args: Args) -> Result<Value, String> {
    if !(args.rate > 0.0 && args.duration > 0.0 && args.connections > 0 && args.bytes > 0) {
        return Err("--rate, --duration, --connections and --bytes must be positive".into());
    }
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut command = match args.receiver_cpu {
        Some(cpu) => {
            let mut c = std::process::Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(&exe);
            c
        }
        None => std::process::Command::new(&exe),
    };
    let mut receiver = command
        .args(["floor", "--connections", &args.connections.to_string()])
        .arg("--receive")
        .arg(addr.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the receiver: {e}"))?;
    let sent = match send(&args, &listener).await {
        Ok(sent) => sent,
        Err(e) => {
            let _ = receiver.kill();
            let _ = receiver.wait();
            return Err(e);
        }
    };
    // Every connection is closed now: the receiver prints its count and
    // ends, within a bound like every run.
    let stdout = receiver.stdout.take();
    let read = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        if let Some(mut stdout) = stdout {
            let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
        }
        text
    });
    let output = tokio::time::timeout(Duration::from_secs(30), read).await;
    if output.is_err() {
        let _ = receiver.kill();
    }
    let _ = receiver.wait();
    let output = output
        .map_err(|_| "the receiver did not finish".to_string())?
        .map_err(|e| e.to_string())?;
    let received = output
        .lines()
        .last()
        .and_then(|line| serde_json::from_str::<Value>(line).ok())
        .and_then(|v| v["received_bytes"].as_u64())
        .ok_or("the receiver printed no count")?;
    Ok(summary(&args, &sent, received))
}

fn summary(args: &Args, sent: &Sent, received: u64) -> Value {
    json!({
        "scenario": "floor",
        "mode": args.mode,
        "params": {
            "connections": args.connections,
            "rate": args.rate,
            "bytes": args.bytes,
            "warmup": args.warmup,
            "duration": args.duration,
        },
        "sends": sent.sends,
        "short_sends": sent.short,
        "secs": sent.secs,
        "cpu": {
            "secs": sent.cpu_secs,
            "us_per_send": sent.cpu_secs / sent.sends.max(1) as f64 * 1e6,
            "utilisation": sent.cpu_secs / sent.secs,
        },
        "received_bytes": received,
    })
}

/// Accepts the receiver's connections, writes for `warmup + duration`
/// seconds, measures the last `duration`, then closes every connection.
pub async fn send(args: &Args, listener: &TcpListener) -> Result<Sent, String> {
    let mut sockets = Vec::with_capacity(args.connections);
    while sockets.len() < args.connections {
        let accept = tokio::time::timeout(Duration::from_secs(30), listener.accept());
        let (socket, _) = accept
            .await
            .map_err(|_| "the receiver did not connect".to_string())?
            .map_err(|e| format!("accept: {e}"))?;
        socket.set_nodelay(true).map_err(|e| e.to_string())?;
        sockets.push(socket);
    }
    let record: Arc<[u8]> = vec![b'x'; args.bytes].into();
    let mut pacer = Pacer::new(args);
    let sends = Arc::new(AtomicU64::new(0));
    let mut short = 0;
    match args.mode {
        Mode::Loop => {
            let sockets: Vec<std::net::TcpStream> = sockets
                .into_iter()
                .map(|s| s.into_std())
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            while pacer.next(&sends).await {
                for mut socket in &sockets {
                    // Non-blocking (tokio set it): one `send(2)`.
                    match std::io::Write::write(&mut socket, &record) {
                        Ok(n) if n == record.len() => {}
                        _ => short += 1,
                    }
                }
                sends.fetch_add(sockets.len() as u64, Ordering::Relaxed);
            }
        }
        Mode::Tasks => {
            // Each writer's records to write, and its wake-up.
            let mut queues = Vec::with_capacity(sockets.len());
            let mut writers = Vec::with_capacity(sockets.len());
            for mut socket in sockets {
                let queue = Arc::new((AtomicU64::new(0), Notify::new()));
                queues.push(queue.clone());
                let (record, sends) = (record.clone(), sends.clone());
                writers.push(tokio::spawn(async move {
                    let (queued, wake) = &*queue;
                    loop {
                        wake.notified().await;
                        for _ in 0..queued.swap(0, Ordering::Relaxed) {
                            if socket.write_all(&record).await.is_err() {
                                return;
                            }
                            sends.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            while pacer.next(&sends).await {
                for queue in &queues {
                    queue.0.fetch_add(1, Ordering::Relaxed);
                    queue.1.notify_one();
                }
            }
            // The last records' writes: each writer has at most one to make.
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            for writer in writers {
                writer.abort();
            }
        }
    }
    let (cpu_from, from) = pacer.window.ok_or("nothing was measured")?;
    Ok(Sent {
        sends: sends.load(Ordering::Relaxed),
        short,
        cpu_secs: pacer.cpu() - cpu_from,
        secs: from.elapsed().as_secs_f64(),
    })
}

/// The sender's clock: a tick per record, the warm-up, then the measured
/// window (its start: this process's CPU time and the instant).
struct Pacer {
    me: Proc,
    tick: tokio::time::Interval,
    started: Instant,
    measured_from: Duration,
    end: Duration,
    window: Option<(f64, Instant)>,
}

impl Pacer {
    fn new(args: &Args) -> Self {
        Self {
            me: Proc::me(),
            tick: tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate)),
            started: Instant::now(),
            measured_from: Duration::from_secs_f64(args.warmup),
            end: Duration::from_secs_f64(args.warmup + args.duration),
            window: None,
        }
    }

    fn cpu(&self) -> f64 {
        self.me.cpu_secs().unwrap_or(0.0)
    }

    /// Waits for the next record's time; false once the run is over. When
    /// the measured window begins, `sends` starts again from zero.
    async fn next(&mut self, sends: &AtomicU64) -> bool {
        self.tick.tick().await;
        let elapsed = self.started.elapsed();
        if elapsed >= self.end {
            return false;
        }
        if self.window.is_none() && elapsed >= self.measured_from {
            self.window = Some((self.cpu(), Instant::now()));
            sends.store(0, Ordering::Relaxed);
        }
        true
    }
}

/// Opens `connections` connections to `addr` and reads from all of them
/// until each is closed; the bytes read.
pub async fn receive(addr: SocketAddr, connections: usize) -> Result<u64, String> {
    // Like every scenario: load only ever goes to this machine.
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address"));
    }
    let mut readers = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut socket = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut total = 0u64;
            while let Ok(n @ 1..) = socket.read(&mut buf).await {
                total += n as u64;
            }
            total
        }));
    }
    let mut total = 0;
    for reader in readers {
        total += reader.await.map_err(|e| e.to_string())?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(mode: Mode) -> Args {
        Args {
            mode,
            connections: 8,
            rate: 50.0,
            bytes: 100,
            warmup: 0.1,
            duration: 0.3,
            receiver_cpu: None,
            receive: None,
        }
    }

    /// Both ways write every record to every connection, and the
    /// receiver gets every byte (counted from the start, warm-up included).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_record_reaches_every_connection_either_way() {
        for mode in [Mode::Loop, Mode::Tasks] {
            let args = args(mode);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let receiver = tokio::spawn(receive(addr, args.connections));
            let sent = send(&args, &listener).await.unwrap();
            let received = receiver.await.unwrap().unwrap();
            assert_eq!(sent.short, 0, "{mode:?}");
            // About rate × duration records to each connection were measured.
            let per_connection = sent.sends / args.connections as u64;
            assert!((10..=20).contains(&per_connection), "{mode:?}: {sent:?}");
            // Whole records only, and at least those measured.
            assert_eq!(received % args.bytes as u64, 0, "{mode:?}");
            assert!(received >= sent.sends * args.bytes as u64, "{mode:?}");
        }
    }

    #[tokio::test]
    async fn the_receiver_connects_to_loopback_only() {
        let addr: SocketAddr = "192.0.2.1:9".parse().unwrap();
        let refused = receive(addr, 1).await.unwrap_err();
        assert!(refused.contains("not a loopback address"), "{refused}");
    }
}
