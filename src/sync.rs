//! Lock helpers. The std locks here guard short, non-async sections; a
//! panic while one is held leaves data that is still consistent (every
//! critical section is a few map or queue operations), so poisoning is ignored.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// The clock every rate limiter reads. Building a `quanta` clock calibrates
/// it (CPUID and a TSC measurement), tens of microseconds that a limiter per
/// session or per address would pay on every handshake; clones share the
/// calibration.
pub fn rate_clock() -> governor::clock::QuantaClock {
    static CLOCK: std::sync::OnceLock<governor::clock::QuantaClock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(Default::default).clone()
}
