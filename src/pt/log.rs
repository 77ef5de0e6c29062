//! Deferred 4 KiB leaf writes: while a table defers ([`super::PageTable::defer_leaves`]), a map
//! computes every 4 KiB leaf entry exactly as it would store it, but records it in a
//! [`PteLog`] of compact runs instead — linear runs (`value + i × step`, as a DMA engine
//! generates them) and copied runs (values from a staged array). Whoever executes the log
//! (a compute shader, [`PteLog::apply`] on the CPU) writes the very entries the CPU commit
//! would have written. Directory entries, huge leaves and clears are stored as usual.
#![forbid(unsafe_code)]

use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{PAGE_SIZE, PhysAddr};
use crate::mem::PhysMem;

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

/// Why a [`PteLog`] cannot be executed (only a hand-made log can be wrong: the runs a table
/// records always pass).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PteLogError {
    /// Run `index` is empty, unaligned, wraps, leaves the arena or crosses a table page.
    #[error("run {index} ({count} entries at {dst:#x}): {why}")]
    BadRun {
        /// The run's position in [`PteLog::runs`].
        index: usize,
        /// Its first entry's address.
        dst: u64,
        /// Its entries.
        count: u32,
        /// What is wrong with it.
        why: &'static str,
    },
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

    /// Checks every run against an arena of `arena_size` bytes: at least one entry, 8-byte
    /// aligned, inside the arena and inside one table page, and (copied runs) inside
    /// [`PteLog::staged`]. What [`PteLog::apply`] and a GPU populate check before writing.
    ///
    /// # Errors
    /// [`PteLogError::BadRun`] for the first run that fails.
    pub fn check(&self, arena_size: u64) -> Result<(), PteLogError> {
        for (index, r) in self.runs.iter().enumerate() {
            let bad = |why| Err(PteLogError::BadRun { index, dst: r.dst, count: r.count, why });
            if r.count == 0 {
                return bad("no entries");
            }
            if r.dst % 8 != 0 {
                return bad("not 8-byte aligned");
            }
            let Some(end) = r.dst.checked_add(u64::from(r.count) * 8) else {
                return bad("wraps past 2^64");
            };
            if end > arena_size {
                return bad("outside the arena");
            }
            if r.dst / PAGE_SIZE != (end - 1) / PAGE_SIZE {
                return bad("crosses a table page");
            }
            if !r.linear
                && r.value.checked_add(u64::from(r.count)).is_none_or(|e| e > self.staged.len() as u64)
            {
                return bad("reads past the staged values");
            }
        }
        Ok(())
    }

    /// Drops what was recorded after `runs` runs and `staged` staged values (a failed map's).
    pub(crate) fn truncate(&mut self, (runs, staged): (usize, usize)) {
        self.runs.truncate(runs);
        self.staged.truncate(staged);
    }

    /// Where the log ends now, for [`PteLog::truncate`].
    pub(crate) fn mark(&self) -> (usize, usize) {
        (self.runs.len(), self.staged.len())
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

    /// Writes the log's entries into `mem` on the CPU (what the shader does), after
    /// [`PteLog::check`] has passed for the whole log.
    ///
    /// # Errors
    /// [`PteLogError`] from the check; nothing is written then.
    pub fn apply(&self, mem: &PhysMem) -> Result<(), PteLogError> {
        self.check(mem.size())?;
        for r in &self.runs {
            for i in 0..u64::from(r.count) {
                let v = if r.linear {
                    r.value.wrapping_add(i.wrapping_mul(r.step))
                } else {
                    self.staged.get((r.value + i) as usize).copied().unwrap_or_default()
                };
                // Cannot fail: the check put every entry inside the arena.
                let _ = mem.write_u64(PhysAddr::new(r.dst + i * 8), v);
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
        let bad = |runs: Vec<PteRun>, staged: Vec<u64>| PteLog { runs, staged }.apply(&mem).unwrap_err();
        let run = |dst, count, linear, value| PteRun { dst, count, linear, value, step: 0 };
        let why = |e: PteLogError| match e {
            PteLogError::BadRun { why, .. } => why,
        };
        assert_eq!(why(bad(vec![run(0, 0, true, 0)], vec![])), "no entries");
        assert_eq!(why(bad(vec![run(4, 1, true, 0)], vec![])), "not 8-byte aligned");
        assert_eq!(why(bad(vec![run(u64::MAX - 7, 2, true, 0)], vec![])), "wraps past 2^64");
        assert_eq!(why(bad(vec![run(1 << 20, 1, true, 0)], vec![])), "outside the arena");
        assert_eq!(why(bad(vec![run(0xff8, 2, true, 0)], vec![])), "crosses a table page");
        assert_eq!(why(bad(vec![run(0, 2, false, 1)], vec![5, 6])), "reads past the staged values");
        assert_eq!(why(bad(vec![run(0, 1, false, u64::MAX)], vec![5])), "reads past the staged values");
        // A bad run anywhere writes nothing, not even the good runs before it.
        let before = mem.read_u64(PhysAddr::new(0x8000)).unwrap();
        bad(vec![run(0x8000, 1, true, 0xdead), run(0, 0, true, 0)], vec![]);
        assert_eq!(mem.read_u64(PhysAddr::new(0x8000)).unwrap(), before);
        for (i, v) in vals.iter().enumerate() {
            assert_eq!(mem.read_u64(PhysAddr::new(0x8000 + i as u64 * 8)).unwrap(), *v);
        }
    }

    #[test]
    fn a_failed_deferred_map_leaves_nothing_in_the_log() {
        use crate::addr::DmaAddr;
        use crate::pt::{MapOptions, MapSource, PageTable, Prot, X86Iommu};
        use std::sync::Arc;
        let mem = Arc::new(PhysMem::new(4 << 20).unwrap());
        let pt = PageTable::<X86Iommu>::new(mem.clone()).unwrap();
        pt.defer_leaves(true);
        let mut frames: Vec<PhysAddr> = (0..600).map(|_| mem.alloc_frame().unwrap()).collect();
        // The last page is outside the arena: the map fails after building fresh tables.
        frames[599] = PhysAddr::new(1 << 60);
        assert!(
            pt.map(DmaAddr::new(0x4000_0000), MapSource::Pages(&frames), Prot::RW, MapOptions::default())
                .is_err()
        );
        assert!(pt.take_log().is_empty(), "the failed map's runs went with its tables");
        pt.map(DmaAddr::new(0x4000_0000), MapSource::Pages(&frames[..8]), Prot::RW, MapOptions::default())
            .unwrap();
        let log = pt.take_log();
        assert_eq!(log.entries(), 8);
        assert!(pt.translate(DmaAddr::new(0x4000_0000)).is_none(), "deferred: not present yet");
        log.apply(&mem).unwrap();
        assert_eq!(pt.translate(DmaAddr::new(0x4000_3000)).map(|t| t.pa), Some(frames[3]));
    }
}
