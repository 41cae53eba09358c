//! Whether the node is busy enough for write coalescing to pay.
//!
//! Holding a busy connection's next write back (`session.write_coalesce_ms`)
//! saves the kernel one write per message, at the cost of up to that much
//! latency. The trade is worth making only while the server is short of
//! CPU; on a node with CPU to spare it would only add latency, and once
//! begun it sustains itself (a hold gathers the frames that make the next
//! write large again). So holds begin only once the process has used at
//! least `session.write_coalesce_busy_percent` of its worker threads' CPU
//! time in three windows of at least [`WINDOW`] in a row (a burst of a
//! second or two does not engage them), and end once a window falls below a
//! third of it: coalescing can cut the CPU a busy room costs by half or
//! more, and a lower bound to end it keeps the node from switching it on
//! and off every window.
//!
//! The share is the process's CPU time (every thread, user and kernel: most
//! of a delivery's cost is the kernel's) over the elapsed time, divided by
//! the runtime's workers. It is sampled by the writers that would hold (and
//! by a metrics scrape), at most once per window, so the node runs no task
//! or timer for it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

/// Shortest span a share is measured over.
pub const WINDOW: Duration = Duration::from_secs(1);

/// The node's load as write coalescing sees it: one per server, shared by
/// every session's writer.
pub struct NodeLoad {
    /// `session.write_coalesce_busy_percent`; 0: holds whatever the load.
    engage_percent: u8,
    /// Whether writes to busy connections are held back now.
    engaged: AtomicBool,
    /// The last sample; taken by one writer at a time, the others read
    /// `engaged` meanwhile.
    last: Mutex<Option<Sample>>,
}

struct Sample {
    at: Instant,
    cpu: Duration,
    /// Worker threads of the runtime the sample was taken on.
    workers: u32,
    /// Windows in a row, up to this sample, at or above the threshold.
    streak: u8,
}

impl NodeLoad {
    pub fn new(engage_percent: u8) -> Self {
        Self {
            engage_percent,
            engaged: AtomicBool::new(engage_percent == 0),
            last: Mutex::new(None),
        }
    }

    /// Whether a busy connection's next write should be held back, as of
    /// `now`. Takes a new sample if the last is a window old.
    pub fn holds(&self, now: Instant) -> bool {
        if self.engage_percent == 0 {
            return true;
        }
        // Another writer sampling right now decides for this one too.
        if let Ok(mut last) = self.last.try_lock() {
            self.sample(&mut last, now);
        }
        self.engaged.load(Ordering::Relaxed)
    }

    /// Takes a sample at `now` if the last is a window old, and updates
    /// whether holds are on from the share used since it.
    fn sample(&self, last: &mut Option<Sample>, now: Instant) {
        if last
            .as_ref()
            .is_some_and(|s| now.saturating_duration_since(s.at) < WINDOW)
        {
            return;
        }
        let Some(cpu) = process_cpu_time() else {
            return;
        };
        let (workers, streak) = match last.as_ref() {
            None => (runtime_workers(), 0),
            Some(previous) => {
                let mut streak = previous.streak;
                let used = cpu.saturating_sub(previous.cpu);
                let elapsed = now.saturating_duration_since(previous.at);
                self.update(busy_percent(used, elapsed, previous.workers), &mut streak);
                (previous.workers, streak)
            }
        };
        *last = Some(Sample {
            at: now,
            cpu,
            workers,
            streak,
        });
    }

    fn update(&self, share: f64, streak: &mut u8) {
        let was = self.engaged.load(Ordering::Relaxed);
        let now = next_state(was, share, self.engage_percent, streak);
        if now != was {
            self.engaged.store(now, Ordering::Relaxed);
            debug!(
                event = "write_coalescing",
                engaged = now,
                busy_percent = share.round() as u64,
                "write coalescing {}",
                if now { "engaged" } else { "released" }
            );
        }
    }
}

/// Windows in a row at or above the threshold that engage holds: a burst
/// of a second or two (a batch of handshakes, receivers that stop reading)
/// does not.
const ENGAGE_WINDOWS: u8 = 3;

/// Whether holds are on after a window in which the process used `share`
/// percent of its workers' time; `streak` counts the windows in a row at or
/// above the threshold.
fn next_state(engaged: bool, share: f64, engage_percent: u8, streak: &mut u8) -> bool {
    let engage = f64::from(engage_percent);
    *streak = if share >= engage {
        streak.saturating_add(1)
    } else {
        0
    };
    if engaged {
        share >= engage / 3.0
    } else {
        *streak >= ENGAGE_WINDOWS
    }
}

/// CPU time used over `elapsed` as a percentage of `workers` threads' time.
fn busy_percent(cpu: Duration, elapsed: Duration, workers: u32) -> f64 {
    let available = elapsed.as_secs_f64() * f64::from(workers.max(1));
    if available <= 0.0 {
        return 0.0;
    }
    cpu.as_secs_f64() / available * 100.0
}

fn runtime_workers() -> u32 {
    tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_workers())
        .unwrap_or(1)
        .try_into()
        .unwrap_or(u32::MAX)
}

/// CPU time of the whole process, user and kernel, every thread.
#[cfg(unix)]
fn process_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// Not measured here: holds only with `write_coalesce_busy_percent = 0`.
#[cfg(not(unix))]
fn process_cpu_time() -> Option<Duration> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_engage_after_three_busy_windows_and_end_below_a_third() {
        let mut streak = 0;
        // Off: only three windows in a row at or above the threshold engage.
        assert!(!next_state(false, 95.0, 90, &mut streak));
        assert!(!next_state(false, 90.0, 90, &mut streak));
        assert!(!next_state(false, 89.9, 90, &mut streak));
        assert_eq!(streak, 0);
        for _ in 0..2 {
            assert!(!next_state(false, 99.0, 90, &mut streak));
        }
        assert!(next_state(false, 90.0, 90, &mut streak));
        // On: stays on while the share is at least a third.
        assert!(next_state(true, 45.0, 90, &mut streak));
        assert!(next_state(true, 30.0, 90, &mut streak));
        assert!(!next_state(true, 29.9, 90, &mut streak));
        // Off again: a share between a third and the threshold keeps it off.
        assert!(!next_state(false, 60.0, 90, &mut streak));
    }

    #[test]
    fn the_share_is_per_worker_and_survives_odd_inputs() {
        let ms = Duration::from_millis;
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(near(busy_percent(ms(50), ms(100), 1), 50.0));
        assert!(near(busy_percent(ms(150), ms(100), 2), 75.0));
        assert!(near(busy_percent(ms(50), ms(100), 0), 50.0));
        assert!(near(busy_percent(ms(50), Duration::ZERO, 1), 0.0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn zero_holds_whatever_the_load_and_an_idle_process_does_not_engage() {
        let always = NodeLoad::new(0);
        assert!(always.holds(Instant::now()));

        let load = NodeLoad::new(90);
        let start = Instant::now();
        assert!(!load.holds(start));
        // Asked again as if two windows had passed: the process spent a
        // few microseconds of CPU meanwhile, far from 90 % of two seconds.
        assert!(!load.holds(start + WINDOW * 2));
        assert!(!load.engaged.load(Ordering::Relaxed));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_process_that_spins_engages() {
        let load = NodeLoad::new(5);
        let start = Instant::now();
        assert!(!load.holds(start));
        // Spin for 100 ms a window, three windows, on this (the only)
        // worker thread, asking as if each (one second) were over: at least
        // 5 % of each was spent on a core unless the machine kept this
        // thread off its core for half of a spin.
        let mut spins = 0u64;
        for window in 1..=ENGAGE_WINDOWS {
            let begun = std::time::Instant::now();
            while begun.elapsed() < Duration::from_millis(100) {
                spins = std::hint::black_box(spins + 1);
            }
            let engaged = load.holds(start + WINDOW * u32::from(window));
            assert_eq!(
                engaged,
                window == ENGAGE_WINDOWS,
                "window {window}, {spins} spins"
            );
        }
    }
}
