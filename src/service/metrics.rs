//! The service's counters and per-queue latency histograms.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::QueueId;

/// Counters shared by the workers and synchronous binds.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) submissions: AtomicU64,
    pub(crate) ops: AtomicU64,
    pub(crate) pages: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) merged: AtomicU64,
    pub(crate) gpu_tlb_flushes: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) device_populated: AtomicU64,
    pub(crate) device_fallbacks: AtomicU64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        if n != 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// A snapshot of the service's metrics ([`super::Service::metrics`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// Submissions executed (asynchronous and synchronous), failed ones included.
    pub submissions: u64,
    /// Bind ops executed, as submitted (before merging).
    pub ops: u64,
    /// 4 KiB pages of GPU entries written by maps (sparse ones included).
    pub pages: u64,
    /// Prepare/commit passes over a VM (one per coalesced batch or synchronous bind).
    pub batches: u64,
    /// Ops per batch, on average (`ops / batches`).
    pub mean_batch: f64,
    /// Ops that merged into their neighbour (same object, contiguous VA and offset).
    pub merged: u64,
    /// IOTLB invalidations the service's IOMMU issued (object DMA maps and unmaps).
    pub iotlb_flushes: u64,
    /// GPU-TLB invalidations: batches that removed or changed entries a GPU may cache.
    pub gpu_tlb_flushes: u64,
    /// Submissions that completed with an error.
    pub failed: u64,
    /// Batches whose 4 KiB entries a [`super::PteWriter`] wrote on a device.
    pub device_populated: u64,
    /// Of those, batches whose writer failed and whose entries the CPU wrote instead.
    pub device_fallbacks: u64,
    /// Per bind queue: submit-to-signal latency.
    pub queues: Vec<QueueMetrics>,
}

/// Submit-to-signal latency of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMetrics {
    /// The queue.
    pub queue: QueueId,
    /// Submissions completed.
    pub completed: u64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
}

/// Sub-buckets per power of two (relative error under 1/32).
const SUB: u64 = 32;
const SUB_BITS: u32 = 5;
/// Values up to 2^40 ns (18 minutes); larger ones land in the last bucket.
const TOP_BITS: u32 = 40;
const BUCKETS: usize = (SUB as usize) * 2 + ((TOP_BITS - SUB_BITS - 1) as usize) * SUB as usize;

/// A log-linear histogram of nanosecond values (HdrHistogram's layout, 3% precision).
#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    counts: Vec<u32>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; BUCKETS], total: 0, max: 0 }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // v in [2^e, 2^(e+1)), e >= SUB_BITS + 1
        let e = e.min(TOP_BITS - 1);
        let shift = e - SUB_BITS;
        let m = ((v >> shift).min(2 * SUB - 1)) - SUB; // 0..SUB
        (2 * SUB + u64::from(e - SUB_BITS - 1) * SUB + m) as usize
    }

    /// The largest value of bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let k = i - 2 * SUB;
        let e = k / SUB + u64::from(SUB_BITS) + 1;
        let m = k % SUB + SUB;
        let shift = e - u64::from(SUB_BITS);
        ((m + 1) << shift) - 1
    }

    pub(crate) fn record(&mut self, ns: u64) {
        let i = Self::index(ns).min(BUCKETS - 1);
        self.counts[i] = self.counts[i].saturating_add(1);
        self.total += 1;
        self.max = self.max.max(ns);
    }

    pub(crate) fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1): the top of the bucket holding it, at most the max.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return Self::upper(i).min(self.max);
            }
        }
        self.max
    }

    pub(crate) fn max(&self) -> u64 {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn buckets_cover_values_in_order_within_three_percent() {
        let mut last = 0;
        for v in (0..200u64).chain((200..40_000_000).step_by(997)) {
            let i = Histogram::index(v);
            assert!(i >= last, "index not monotone at {v}");
            last = i;
            let top = Histogram::upper(i);
            assert!(top >= v, "bucket {i} top {top} below {v}");
            assert!((top - v) as f64 <= v as f64 / 31.0 + 1.0, "bucket {i} too wide at {v}: {top}");
        }
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5);
        let p99 = h.quantile(0.99);
        assert!((500_000..=516_000).contains(&p50), "p50 {p50}");
        assert!((990_000..=1_000_000).contains(&p99), "p99 {p99}");
        assert_eq!(h.max(), 1_000_000);
        assert_eq!(h.quantile(1.0), 1_000_000);
        assert_eq!(h.count(), 1000);
    }
}
