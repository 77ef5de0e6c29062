//! Deferred 4 KiB leaf writes: while a table defers ([`super::PageTable::defer_leaves`]), a map
//! computes every 4 KiB leaf entry exactly as it would store it, but records it in a
//! [`PteLog`] of compact runs instead — linear runs (`value + i × step`, as a DMA engine
//! generates them) and copied runs (values from a staged array). Whoever executes the log
//! (a compute shader, [`PteLog::apply`] on the CPU) writes the very entries the CPU commit
//! would have written. Directory entries, huge leaves and clears are stored as usual.
#![forbid(unsafe_code)]

use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{PAGE_SIZE, PhysAddr};
use crate::mem::{MemError, PhysMem};

/// Shortest run of equal steps written as a linear run (shorter ones are copied).
const MIN_LINEAR: usize = 4;

/// One run of entries to write at `dst` (the arena address of the first entry, 8-byte
/// aligned, inside one table page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PteRun {
    /// Arena address of the first entry.
    pub dst: u64,
    /// Entries.
    pub count: u32,
    /// Linear: entry `i` is `value + i × step`. Copied: entry `i` is `staged[value + i]`.
    pub linear: bool,
    /// First value (linear) or index into [`PteLog::staged`] (copied).
    pub value: u64,
    /// Step between entries (linear; 0 for runs of one value, such as sparse entries).
    pub step: u64,
}

/// The deferred 4 KiB leaf writes of one or more maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PteLog {
    /// The runs, in the order the maps produced them.
    pub runs: Vec<PteRun>,
    /// Values of the copied runs.
    pub staged: Vec<u64>,
}

impl PteLog {
    /// Entries the log writes.
    #[must_use]
    pub fn entries(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.count)).sum()
    }

    /// Whether it writes nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Records `values`, the entries for consecutive slots from arena address `dst`.
    pub(crate) fn push(&mut self, dst: u64, values: &[AtomicU64]) {
        let v: Vec<u64> = values.iter().map(|e| e.load(Ordering::Relaxed)).collect();
        let mut i = 0;
        let mut copy_from: Option<usize> = None;
        let flush_copy = |log: &mut PteLog, from: Option<usize>, to: usize| {
            if let Some(s) = from {
                log.runs.push(PteRun {
                    dst: dst + s as u64 * 8,
                    count: (to - s) as u32,
                    linear: false,
                    value: log.staged.len() as u64,
                    step: 0,
                });
                log.staged.extend_from_slice(&v[s..to]);
            }
        };
        while i < v.len() {
            // The longest run of one step from `i`.
            let step = if i + 1 < v.len() { v[i + 1].wrapping_sub(v[i]) } else { 0 };
            let mut j = i + 1;
            while j < v.len() && v[j].wrapping_sub(v[j - 1]) == step {
                j += 1;
            }
            if j - i >= MIN_LINEAR && (step == 0 || step == PAGE_SIZE) {
                flush_copy(self, copy_from.take(), i);
                self.runs.push(PteRun {
                    dst: dst + i as u64 * 8,
                    count: (j - i) as u32,
                    linear: true,
                    value: v[i],
                    step,
                });
                i = j;
            } else {
                copy_from.get_or_insert(i);
                i += 1;
            }
        }
        flush_copy(self, copy_from.take(), v.len());
    }

    /// Writes the log's entries into `mem` on the CPU (what the shader does).
    ///
    /// # Errors
    /// [`MemError`] for a run outside the arena.
    pub fn apply(&self, mem: &PhysMem) -> Result<(), MemError> {
        for r in &self.runs {
            for i in 0..u64::from(r.count) {
                let v = if r.linear {
                    r.value.wrapping_add(i.wrapping_mul(r.step))
                } else {
                    self.staged[(r.value + i) as usize]
                };
                mem.write_u64(PhysAddr::new(r.dst + i * 8), v)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_linear_constant_or_copied() {
        let vals: Vec<u64> =
            vec![0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x9000, 0x7000, 7, 7, 7, 7, 0x11000];
        let entries: Vec<AtomicU64> = vals.iter().map(|&x| AtomicU64::new(x)).collect();
        let mut log = PteLog::default();
        log.push(0x8000, &entries);
        assert_eq!(log.runs.len(), 4, "{log:?}");
        assert_eq!(log.runs[0], PteRun { dst: 0x8000, count: 5, linear: true, value: 0x1000, step: 0x1000 });
        assert_eq!(log.runs[1], PteRun { dst: 0x8028, count: 2, linear: false, value: 0, step: 0 });
        assert_eq!(log.runs[2], PteRun { dst: 0x8038, count: 4, linear: true, value: 7, step: 0 });
        assert_eq!(log.runs[3].count, 1);
        assert_eq!(log.entries(), 12);
        assert_eq!(log.staged, vec![0x9000, 0x7000, 0x11000]);
        let mem = PhysMem::new(1 << 20).unwrap();
        log.apply(&mem).unwrap();
        for (i, v) in vals.iter().enumerate() {
            assert_eq!(mem.read_u64(PhysAddr::new(0x8000 + i as u64 * 8)).unwrap(), *v);
        }
    }
}
