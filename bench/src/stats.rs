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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_out_in_milliseconds() {
        let mut h = histogram();
        // 1..=1000 ms, one each.
        for ms in 1..=1000u64 {
            record_ns(&mut h, ms * 1_000_000);
        }
        let l = Latency::of(&h);
        assert_eq!(l.count, 1000);
        // Three significant figures.
        assert!((l.p50_ms - 500.0).abs() <= 0.5, "{}", l.p50_ms);
        assert!((l.p99_ms - 990.0).abs() <= 1.0, "{}", l.p99_ms);
        assert!((l.p999_ms - 999.0).abs() <= 1.0, "{}", l.p999_ms);
        assert!((l.max_ms - 1000.0).abs() <= 1.0, "{}", l.max_ms);
        assert!((l.mean_ms - 500.5).abs() <= 0.5, "{}", l.mean_ms);
    }

    #[test]
    fn sub_microsecond_and_huge_latencies_are_kept() {
        let mut h = histogram();
        record_ns(&mut h, 0);
        record_ns(&mut h, 999);
        // Past the top bound (10 minutes): recorded at the bound, not lost.
        record_ns(&mut h, 3_600 * 1_000_000_000);
        assert_eq!(h.len(), 3);
        assert_eq!(h.min(), 1);
        assert!(h.max() >= 599_000_000);
    }

    #[test]
    fn an_empty_histogram_reports_nothing_measured() {
        let l = Latency::of(&histogram());
        assert_eq!(l.count, 0);
        assert!(l.p99_ms.is_nan() && l.max_ms.is_nan());
        // NaN is written as null in the summary line.
        let json = serde_json::to_value(&l).expect("serializes");
        assert!(json["p99_ms"].is_null());
    }

    #[test]
    fn medians_of_odd_even_and_no_values() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }
}
