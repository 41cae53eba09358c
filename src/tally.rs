//! The two counters every write to a client bumps (messages delivered and
//! bytes out), kept per thread and summed when `/metrics` is scraped.
//!
//! One shared counter costs each write an atomic read-modify-write, which
//! waits for the writing core's store buffer to drain: at 100,000 deliveries
//! a second that was about 2 % of the server's CPU. Here each thread adds
//! to its own slot with a plain load and store (only that thread writes
//! it), and a scrape reads every slot. A thread that ends folds its slot
//! into the retired totals, so the slots stay as many as live threads.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::sync::lock;

/// What has been written to clients since the process started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Text frames (messages) written.
    pub delivered: u64,
    /// Bytes of the batches that carried them.
    pub bytes: u64,
}

impl Totals {
    fn plus(self, other: Totals) -> Totals {
        Totals {
            delivered: self.delivered.wrapping_add(other.delivered),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

/// Aligned to two cache lines (the adjacent-line prefetcher's pair), so
/// that threads on different cores never write to a line another's slot
/// shares.
#[derive(Default)]
#[repr(align(128))]
struct Slot {
    delivered: AtomicU64,
    bytes: AtomicU64,
}

impl Slot {
    fn read(&self) -> Totals {
        Totals {
            delivered: self.delivered.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
        }
    }
}

struct Slots {
    live: Vec<Arc<Slot>>,
    /// What the threads that have ended counted.
    retired: Totals,
}

static SLOTS: Mutex<Slots> = Mutex::new(Slots {
    live: Vec::new(),
    retired: Totals {
        delivered: 0,
        bytes: 0,
    },
});

/// A thread's slot, registered on its first count.
struct Local(Arc<Slot>);

impl Local {
    fn register() -> Self {
        let slot = Arc::new(Slot::default());
        lock(&SLOTS).live.push(slot.clone());
        Self(slot)
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let mut slots = lock(&SLOTS);
        slots.retired = slots.retired.plus(self.0.read());
        slots.live.retain(|slot| !Arc::ptr_eq(slot, &self.0));
    }
}

thread_local! {
    static LOCAL: Local = Local::register();
}

/// Only the owning thread stores to its slot: a load and a store, no
/// read-modify-write.
fn add(cell: &AtomicU64, n: u64) {
    cell.store(cell.load(Relaxed).wrapping_add(n), Relaxed);
}

/// Counts a write that carried `delivered` messages in `bytes` bytes.
pub fn count_written(delivered: u64, bytes: u64) {
    let counted = LOCAL.try_with(|local| {
        add(&local.0.delivered, delivered);
        add(&local.0.bytes, bytes);
    });
    if counted.is_err() {
        // The thread is ending and its slot is gone (a write from another
        // thread-local's destructor): count it as retired.
        let mut slots = lock(&SLOTS);
        slots.retired = slots.retired.plus(Totals { delivered, bytes });
    }
}

/// Everything counted so far, by every thread.
pub fn totals() -> Totals {
    let slots = lock(&SLOTS);
    slots
        .live
        .iter()
        .fold(slots.retired, |sum, slot| sum.plus(slot.read()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_every_thread_live_or_ended_are_summed() {
        // Other tests in this process count too: compare growth.
        let before = totals();
        let (ready, proceed) = (
            Arc::new(std::sync::Barrier::new(2)),
            Arc::new(std::sync::Barrier::new(2)),
        );
        let live = {
            let (ready, proceed) = (ready.clone(), proceed.clone());
            std::thread::spawn(move || {
                count_written(3, 300);
                ready.wait();
                proceed.wait();
            })
        };
        let ended = std::thread::spawn(|| {
            count_written(2, 20);
            count_written(5, 50);
            LOCAL.with(|local| local.0.clone())
        })
        .join()
        .unwrap();
        // The ended thread's slot left the live ones with its counts.
        assert_eq!(
            ended.read(),
            Totals {
                delivered: 7,
                bytes: 70
            }
        );
        assert!(
            !lock(&SLOTS)
                .live
                .iter()
                .any(|slot| Arc::ptr_eq(slot, &ended))
        );
        ready.wait();
        let during = totals();
        assert!(
            during.delivered >= before.delivered + 10,
            "{before:?} {during:?}"
        );
        assert!(during.bytes >= before.bytes + 370, "{before:?} {during:?}");
        proceed.wait();
        live.join().unwrap();
        let after = totals();
        assert!(after.delivered >= during.delivered && after.bytes >= during.bytes);
    }
}
