//! Where the physical side of a map comes from ([`MapSource`]) and the cursor that walks it,
//! filling leaf tables in tight loops.
#![forbid(unsafe_code)]

use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{Address, PAGE_SIZE, PageSize, PhysAddr};
use crate::mem::BioVec;

/// Where the output side of a map comes from: addresses of the table's output space `A`
/// ([`super::Format::Out`]: physical addresses for the IOMMU table, DMA addresses for the GPU
/// table).
#[derive(Clone, Copy, Debug)]
pub enum MapSource<'a, A: Address = PhysAddr> {
    /// One contiguous range.
    Range {
        /// First byte (4 KiB aligned).
        pa: A,
        /// Length (a 4 KiB multiple).
        len: u64,
    },
    /// Scattered 4 KiB pages, mapped in order.
    Pages(&'a [A]),
    /// A `bio_vec` array (physical segments: only for tables whose output is physical), mapped
    /// back to back; every segment must start and end on a 4 KiB
    /// boundary here (the DMA layer deals with partial pages). Long aligned segments get huge
    /// leaves.
    BioVecs(&'a [BioVec]),
    /// A `bio_vec` array (physical: only for tables whose output is physical) whose every element
    /// is exactly one whole, aligned 4 KiB page (offset 0,
    /// length 4 KiB: the usual block request): its length is known without a pass, and each
    /// element is checked as the walk reads it, so the array is read once. An element that is not
    /// such a page is [`super::MapError::UnalignedSource`] (use [`MapSource::BioVecs`] for mixed arrays).
    PageVecs(&'a [BioVec]),
    /// `len` bytes of sparse entries (formats with [`super::Format::sparse_bits`]): occupied,
    /// not valid — reads through them return zeros, writes are dropped. Huge sparse entries are
    /// used where the range allows, as for a contiguous range.
    Sparse {
        /// Length (a 4 KiB multiple).
        len: u64,
    },
    /// [`MapSource::PageVecs`] for a table whose output addresses are the pages' physical
    /// addresses as a device without translation uses them (a direct device: DMA address =
    /// physical address). Only the DMA layer can say that holds (`dma::DirectMap`); the GPU table
    /// of a direct GPU fills its leaves from the object's own page array with it, in one pass.
    DirectPageVecs(&'a [BioVec]),
    /// A segment list whose every element is exactly one aligned 4 KiB page (a scattered DMA
    /// list: what a direct device's `map_sg` of single pages gives): its length is known without
    /// a pass and each element is checked as the walk reads it, as for [`MapSource::PageVecs`].
    /// An element that is not such a page is [`super::MapError::UnalignedSource`].
    PageSegments(&'a [Segment<A>]),
    /// A list of contiguous segments of the output space (a DMA list: what a `dma::DmaVec`
    /// holds), mapped back to back from `skip` bytes into the first segment, `len` bytes in all.
    /// Every segment of the list must start and end on a 4 KiB boundary and lie below the
    /// format's limit (the whole list is checked: hand over the window the map reads), and `skip`
    /// and `len` are 4 KiB multiples with `skip + len` within the list; all checked before
    /// anything is written. Long aligned segments get huge leaves; 4 KiB leaves of a
    /// segment get fragment 0 (the fragment rule serves [`MapSource::Range`]).
    Segments {
        /// The segments.
        segs: &'a [Segment<A>],
        /// Bytes of the list skipped before the first one mapped.
        skip: u64,
        /// Bytes mapped.
        len: u64,
    },
}

/// One contiguous run of a table's output space: the element of [`MapSource::Segments`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Segment<A: Address = PhysAddr> {
    /// First byte.
    pub addr: A,
    /// Length in bytes.
    pub len: u64,
}

impl<A: Address> MapSource<'_, A> {
    /// Bytes the source describes (O(1) except for [`MapSource::BioVecs`]).
    #[must_use]
    pub fn len(&self) -> u64 {
        match self {
            MapSource::Range { len, .. } | MapSource::Sparse { len } | MapSource::Segments { len, .. } => {
                *len
            }
            MapSource::Pages(p) => p.len() as u64 * PAGE_SIZE,
            MapSource::PageVecs(b) | MapSource::DirectPageVecs(b) => b.len() as u64 * PAGE_SIZE,
            MapSource::PageSegments(g) => g.len() as u64 * PAGE_SIZE,
            MapSource::BioVecs(b) => b.iter().map(|v| u64::from(v.len)).sum(),
        }
    }

    /// Whether the source describes no bytes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Options of a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapOptions {
    /// The largest leaf the map may use; [`PageSize::Size4K`] forces 4 KiB leaves.
    pub max_leaf: PageSize,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions { max_leaf: PageSize::Size1G }
    }
}

impl MapOptions {
    /// Only 4 KiB leaves.
    pub const FORCE_4K: MapOptions = MapOptions { max_leaf: PageSize::Size4K };
}

/// Walks the physical side of a map source.
#[derive(Clone)]
pub(super) struct Cursor<'a, A: Address> {
    src: MapSource<'a, A>,
    /// Index of the current segment (pages / bvecs).
    idx: usize,
    /// Bytes consumed in the current segment (range / bvecs).
    off: u64,
    /// Address bits that make a page-list entry invalid (unaligned, or beyond the format).
    reject: u64,
    /// The fragment rule of the format (see [`Frag`]).
    frag: Frag,
}

/// How a format marks 4 KiB leaves that belong to an aligned contiguous run (REFERENCES.md §7):
/// the fragment `f` of an entry is the largest `f <= max` such that the aligned `2^f`-page block
/// holding it lies inside the contiguous run being mapped and is aligned in both address spaces
/// (the run's buddy decomposition, which is what a greedy walk from its start gives); it is
/// stored as `f << shift`. `max == 0`: the format has no fragments.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Frag {
    /// VA of the first byte of the map (the run of a contiguous range).
    pub(super) va0: u64,
    /// Largest fragment (at most 9: a block never leaves its leaf table).
    pub(super) max: u8,
    /// Where the field sits in an entry.
    pub(super) shift: u32,
}

impl Frag {
    /// The fragment of the 4 KiB entry at VA `y` of a run `[start, end)` whose output addresses
    /// are the VAs plus a constant whose alignment is `2^align` pages.
    #[inline]
    pub(super) fn at(max: u8, y: u64, start: u64, end: u64, align: u32) -> u8 {
        let cap = u32::from(max).min(align);
        for f in (1..=cap).rev() {
            let size = PAGE_SIZE << f;
            let bs = y & !(size - 1);
            if bs >= start && bs + size <= end {
                return f as u8;
            }
        }
        0
    }
}

impl<'a, A: Address> Cursor<'a, A> {
    pub(super) fn new(src: MapSource<'a, A>, pa_limit: u64, frag: Frag) -> Self {
        let mut c = Cursor { src, idx: 0, off: 0, reject: (PAGE_SIZE - 1) | !(pa_limit - 1), frag };
        if let MapSource::Segments { skip, .. } = src {
            c.advance(skip);
        }
        c
    }

    /// The current contiguous physical run: (address, bytes left in it).
    #[inline]
    pub(super) fn run(&self) -> (u64, u64) {
        match self.src {
            MapSource::Range { pa, len } => (pa.as_u64() + self.off, len - self.off),
            // Any alignment fits: a sparse run is as "contiguous" as it is long.
            MapSource::Sparse { len } => (0, len - self.off),
            MapSource::Pages(p) => (p[self.idx].as_u64(), PAGE_SIZE),
            MapSource::PageVecs(b) | MapSource::DirectPageVecs(b) => (b[self.idx].phys.as_u64(), PAGE_SIZE),
            MapSource::PageSegments(g) => (g[self.idx].addr.as_u64(), PAGE_SIZE),
            MapSource::BioVecs(b) => (b[self.idx].first() + self.off, b[self.idx].bytes() - self.off),
            MapSource::Segments { segs, .. } => {
                (segs[self.idx].first() + self.off, segs[self.idx].bytes() - self.off)
            }
        }
    }

    /// The address step between consecutive huge entries of `span` bytes of the current run:
    /// `span`, or 0 for sparse entries (all alike).
    #[inline]
    pub(super) fn step(&self, span: u64) -> u64 {
        if matches!(self.src, MapSource::Sparse { .. }) { 0 } else { span }
    }

    /// Moves `bytes` forward (within the source).
    #[inline]
    pub(super) fn advance(&mut self, bytes: u64) {
        match self.src {
            MapSource::Range { .. } | MapSource::Sparse { .. } => self.off += bytes,
            MapSource::Pages(_) => self.idx += (bytes / PAGE_SIZE) as usize,
            MapSource::PageVecs(_) | MapSource::DirectPageVecs(_) | MapSource::PageSegments(_) => {
                self.idx += (bytes / PAGE_SIZE) as usize;
            }
            MapSource::BioVecs(b) => self.advance_runs(b, bytes),
            MapSource::Segments { segs, .. } => self.advance_runs(segs, bytes),
        }
    }

    /// Writes `entries.len()` consecutive 4 KiB leaves from the source. With `check`, a page
    /// list is validated in the same pass (one read of the source); on a bad page the entries
    /// hold garbage and the index of the first bad page comes back, so callers only use this
    /// on tables nobody can see yet.
    #[inline]
    pub(super) fn fill_4k(&mut self, entries: &[AtomicU64], bits: u64, check: bool) -> Result<(), usize> {
        match self.src {
            MapSource::Pages(p) => {
                let pages = &p[self.idx..self.idx + entries.len()];
                let mut all = 0;
                for (e, pa) in entries.iter().zip(pages) {
                    all |= pa.as_u64();
                    e.store(pa.as_u64() | bits, Ordering::Relaxed);
                }
                if check && all & self.reject != 0 {
                    return Err(self.idx + first_bad_page(pages, self.reject));
                }
                self.idx += entries.len();
            }
            MapSource::PageVecs(b) | MapSource::DirectPageVecs(b) => {
                let run = &b[self.idx..self.idx + entries.len()];
                // Fused with the stores: a conservative check (page aligned and below half the
                // limit, offset 0, one whole page); anything it flags gets the exact check.
                let strict = self.reject | (self.reject >> 1);
                let whole = PAGE_SIZE << 32;
                let mut bad = 0;
                for (e, v) in entries.iter().zip(run) {
                    let p = v.phys.as_u64();
                    bad |= (p & strict) | ((u64::from(v.offset) | u64::from(v.len) << 32) ^ whole);
                    e.store(p | bits, Ordering::Relaxed);
                }
                if check && bad != 0 {
                    let at = first_bad_pagevec(run, self.reject);
                    if at < run.len() {
                        return Err(self.idx + at);
                    }
                }
                self.idx += entries.len();
            }
            MapSource::PageSegments(g) => {
                let run = &g[self.idx..self.idx + entries.len()];
                // Fused with the stores, as for page vectors: aligned, below the limit, one page.
                let mut bad = 0;
                for (e, s) in entries.iter().zip(run) {
                    let a = s.addr.as_u64();
                    bad |= (a & self.reject) | (s.len ^ PAGE_SIZE);
                    e.store(a | bits, Ordering::Relaxed);
                }
                if check && bad != 0 {
                    return Err(self.idx + first_bad_pageseg(run, self.reject));
                }
                self.idx += entries.len();
            }
            MapSource::Range { pa, len } => {
                let mut at = (pa.as_u64() + self.off) | bits;
                if self.frag.max == 0 {
                    for e in entries {
                        e.store(at, Ordering::Relaxed);
                        at += PAGE_SIZE;
                    }
                } else {
                    // Block by block of one fragment each (a leaf table holds at most a few).
                    let Frag { va0, max, shift } = self.frag;
                    let (start, end) = (va0, va0 + len);
                    let align = (pa.as_u64().wrapping_sub(va0) >> 12).trailing_zeros();
                    let mut y = va0 + self.off;
                    let mut k = 0;
                    while k < entries.len() {
                        let f = Frag::at(max, y, start, end, align);
                        let size = PAGE_SIZE << f;
                        let n =
                            (((y | (size - 1)) + 1 - y) / PAGE_SIZE).min((entries.len() - k) as u64) as usize;
                        let fb = u64::from(f) << shift;
                        for e in &entries[k..k + n] {
                            e.store(at | fb, Ordering::Relaxed);
                            at += PAGE_SIZE;
                        }
                        k += n;
                        y += n as u64 * PAGE_SIZE;
                    }
                }
                self.off += entries.len() as u64 * PAGE_SIZE;
            }
            MapSource::Sparse { .. } => {
                // `bits` is the sparse entry itself.
                for e in entries {
                    e.store(bits, Ordering::Relaxed);
                }
                self.off += entries.len() as u64 * PAGE_SIZE;
            }
            MapSource::BioVecs(b) => self.fill_runs(b, entries, bits),
            MapSource::Segments { segs, .. } => self.fill_runs(segs, entries, bits),
        }
        Ok(())
    }

    /// Moves `bytes` forward through a list of runs.
    #[inline]
    fn advance_runs<R: Run>(&mut self, runs: &[R], mut bytes: u64) {
        while bytes > 0 {
            let left = runs[self.idx].bytes() - self.off;
            if bytes < left {
                self.off += bytes;
                return;
            }
            bytes -= left;
            self.idx += 1;
            self.off = 0;
        }
    }

    /// [`Self::fill_4k`] from a list of runs (validated before the walk): single-page runs in a
    /// tight loop, longer ones page by page.
    #[inline]
    fn fill_runs<R: Run>(&mut self, runs: &[R], entries: &[AtomicU64], bits: u64) {
        let mut done = 0;
        while done < entries.len() {
            if self.off == 0 {
                let run = &runs[self.idx..(self.idx + entries.len() - done).min(runs.len())];
                let n = run.iter().take_while(|r| r.bytes() == PAGE_SIZE).count();
                for (e, r) in entries[done..done + n].iter().zip(run) {
                    e.store(r.first() | bits, Ordering::Relaxed);
                }
                self.idx += n;
                done += n;
                if done == entries.len() {
                    break;
                }
            }
            let (pa, left) = self.run();
            let n = ((left / PAGE_SIZE) as usize).min(entries.len() - done);
            let mut at = pa | bits;
            for e in &entries[done..done + n] {
                e.store(at, Ordering::Relaxed);
                at += PAGE_SIZE;
            }
            done += n;
            self.advance(n as u64 * PAGE_SIZE);
        }
    }

    /// Validates the next `n` pages of a page list without writing anything (ranges and bio_vec
    /// arrays are validated before the walk).
    pub(super) fn check_4k(&mut self, n: usize) -> Result<(), usize> {
        if let MapSource::Pages(p) = self.src {
            let pages = &p[self.idx..self.idx + n];
            if pages.iter().fold(0, |a, pa| a | pa.as_u64()) & self.reject != 0 {
                return Err(self.idx + first_bad_page(pages, self.reject));
            }
        }
        if let MapSource::PageSegments(g) = self.src {
            let run = &g[self.idx..self.idx + n];
            let at = first_bad_pageseg(run, self.reject);
            if at < run.len() {
                return Err(self.idx + at);
            }
        }
        if let MapSource::PageVecs(b) | MapSource::DirectPageVecs(b) = self.src {
            let run = &b[self.idx..self.idx + n];
            if first_bad_pagevec(run, self.reject) < run.len() {
                return Err(self.idx + first_bad_pagevec(run, self.reject));
            }
        }
        self.advance(n as u64 * PAGE_SIZE);
        Ok(())
    }
}

/// Index of the first element that is not one whole page (aligned, offset 0, 4 KiB) within the
/// limit (`len` if none).
fn first_bad_pagevec(run: &[BioVec], reject: u64) -> usize {
    run.iter()
        .position(|v| v.phys.as_u64() & reject != 0 || v.offset != 0 || u64::from(v.len) != PAGE_SIZE)
        .unwrap_or(run.len())
}

/// Index of the first segment that is not one aligned 4 KiB page within the limit (`len` if
/// none).
fn first_bad_pageseg<A: Address>(run: &[Segment<A>], reject: u64) -> usize {
    run.iter().position(|s| s.addr.as_u64() & reject != 0 || s.len != PAGE_SIZE).unwrap_or(run.len())
}

fn first_bad_page<A: Address>(pages: &[A], reject: u64) -> usize {
    pages.iter().position(|p| p.as_u64() & reject != 0).unwrap_or(0)
}

/// A contiguous run of a source list: a `bio_vec` or a segment.
trait Run {
    /// Output address of its first byte.
    fn first(&self) -> u64;
    /// Its length in bytes.
    fn bytes(&self) -> u64;
}

impl Run for BioVec {
    #[inline]
    fn first(&self) -> u64 {
        self.phys.as_u64() + u64::from(self.offset)
    }
    #[inline]
    fn bytes(&self) -> u64 {
        u64::from(self.len)
    }
}

impl<A: Address> Run for Segment<A> {
    #[inline]
    fn first(&self) -> u64 {
        self.addr.as_u64()
    }
    #[inline]
    fn bytes(&self) -> u64 {
        self.len
    }
}
