//! Latency histograms (hdrhistogram, microseconds) and their summaries.

use hdrhistogram::Histogram;
use serde::Serialize;

/// A histogram of latencies in microseconds, from 1 µs to 10 minutes, three
/// significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Records a latency given in nanoseconds.
pub fn record_ns(h: &mut Histogram<u64>, nanos: u64) {
    h.saturating_record((nanos / 1000).max(1));
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            // Nothing measured: NaN, which the summary line writes as null.
            return Self {
                count: 0,
                p50_ms: f64::NAN,
                p99_ms: f64::NAN,
                p999_ms: f64::NAN,
                max_ms: f64::NAN,
                mean_ms: f64::NAN,
            };
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// The median of some values (the mean of the middle two for an even count).
pub fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}
