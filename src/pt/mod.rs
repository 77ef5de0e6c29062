//! The one radix page-table engine.
//!
//! A [`PageTable`] is generic over a [`Format`] (the entry encoding): the IOMMU table and, later,
//! the GPU table are two formats of this same engine. Tables are 4 KiB frames of a [`PhysMem`]
//! arena, so their physical addresses are real and anything that can read the arena (an
//! independent walker, a shader after Vulkan import) can walk them.
//!
//! # How a map works
//!
//! [`PageTable::map`] takes the whole source at once — a contiguous range, a page list, or a
//! `bio_vec` array — and does what Linux's generic page table (`drivers/iommu/generic_pt`) does
//! for a contiguous range, for scattered pages too:
//!
//! 1. **Validate** the request (alignment, aperture, source) without touching any table.
//! 2. **Plan**: one read-only descent over the range counts the table pages that must be created,
//!    the split reserve that new huge leaves need, and finds any present entry (an overlap).
//! 3. **Preallocate** all of that from the arena. A failure in steps 1–3 changes nothing.
//! 4. **Commit**: one descent that fills leaves in a tight loop per leaf table, using 2 MiB and
//!    1 GiB leaves wherever the VA, the physical run and the length allow (unless
//!    [`MapOptions::max_leaf`] says otherwise). New subtrees are filled before the entry that
//!    publishes them is written, so a concurrent walker sees either nothing or a complete subtree.
//!
//! # Unmap
//!
//! [`PageTable::unmap`] removes exactly the range asked for: a huge leaf that is partly covered is
//! split (unlike Linux ≥ 6.13, which drops the whole leaf), because GPU remaps need it. A split
//! never fails for lack of memory: every huge leaf, when mapped, reserves in the arena the frames
//! that splitting it down to 4 KiB could take (1 per 2 MiB leaf, 513 per 1 GiB leaf: the same 1/512
//! overhead that 4 KiB leaves would cost in tables). Unmapping returns a `#[must_use]`
//! [`Invalidation`]: the range a TLB must flush, and the table pages that became empty, which go
//! back to the arena only when the invalidation is completed (after the flush), so no walker can
//! follow a freed table into reused memory.
//!
//! # Concurrency
//!
//! Lookups ([`PageTable::translate`]) take no lock: entries are atomics, new subtrees are published
//! with release stores. Mutations ([`PageTable::map`], [`PageTable::unmap`]) serialize on one
//! mutation lock per table tree. Each holds it for a single walk (about 0.3 ms for a whole 1 GiB
//! scattered page list), so maps and unmaps from several threads are safe and cheap; of two
//! overlapping maps exactly one wins and the other gets [`MapError::AlreadyMapped`].
#![forbid(unsafe_code)]

mod format;

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

pub use format::{Format, Prot, Pte, X86Iommu};

use crate::addr::{Address, PAGE_SIZE, PageSize, PhysAddr};
use crate::mem::{BioVec, MemError, PhysMem};

const ENTRIES: usize = 512;

#[inline]
const fn shift(level: u8) -> u32 {
    12 + 9 * level as u32
}

#[inline]
const fn span(level: u8) -> u64 {
    1u64 << shift(level)
}

#[inline]
const fn index(va: u64, level: u8) -> usize {
    ((va >> shift(level)) & 511) as usize
}

/// Frames needed to split a huge leaf at `level` all the way down to 4 KiB leaves:
/// `cost(0) = 0`, `cost(l) = 1 + 512 cost(l - 1)`.
const SPLIT_COST: [u64; 5] = [0, 1, 513, 1 + 512 * 513, 1 + 512 * (1 + 512 * 513)];

#[inline]
fn split_cost(level: u8) -> u64 {
    SPLIT_COST[usize::from(level)]
}

/// Where the physical side of a map comes from.
#[derive(Clone, Copy, Debug)]
pub enum MapSource<'a> {
    /// One physically contiguous range.
    Range {
        /// First byte (4 KiB aligned).
        pa: PhysAddr,
        /// Length (a 4 KiB multiple).
        len: u64,
    },
    /// Scattered 4 KiB pages, mapped in order.
    Pages(&'a [PhysAddr]),
    /// A `bio_vec` array, mapped back to back; every segment must start and end on a 4 KiB
    /// boundary here (the DMA layer deals with partial pages). Long aligned segments get huge
    /// leaves.
    BioVecs(&'a [BioVec]),
    /// A `bio_vec` array whose every element is exactly one whole, aligned 4 KiB page (offset 0,
    /// length 4 KiB: the usual block request): its length is known without a pass, and each
    /// element is checked as the walk reads it, so the array is read once. An element that is not
    /// such a page is [`MapError::UnalignedSource`] (use [`MapSource::BioVecs`] for mixed arrays).
    PageVecs(&'a [BioVec]),
}

impl MapSource<'_> {
    /// Bytes the source describes (O(1) except for [`MapSource::BioVecs`]).
    #[must_use]
    pub fn len(&self) -> u64 {
        match self {
            MapSource::Range { len, .. } => *len,
            MapSource::Pages(p) => p.len() as u64 * PAGE_SIZE,
            MapSource::PageVecs(b) => b.len() as u64 * PAGE_SIZE,
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

/// Errors of [`PageTable::map`]. A failed map changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError<V: Address> {
    /// The source is empty.
    #[error("zero-length mapping")]
    ZeroLength,
    /// The virtual address is not 4 KiB aligned.
    #[error("{va} is not 4 KiB aligned")]
    UnalignedVa {
        /// The address given.
        va: V,
    },
    /// A source segment does not start or end on a 4 KiB boundary, or is empty.
    #[error("source segment {index} ({pa}, length {len:#x}) does not start and end on 4 KiB boundaries")]
    UnalignedSource {
        /// Index of the segment (0 for a range).
        index: usize,
        /// Its first byte.
        pa: PhysAddr,
        /// Its length.
        len: u64,
    },
    /// A source segment reaches beyond what an entry can hold.
    #[error("source segment {index} ({pa}, length {len:#x}) is beyond the physical address limit")]
    PhysTooHigh {
        /// Index of the segment.
        index: usize,
        /// Its first byte.
        pa: PhysAddr,
        /// Its length.
        len: u64,
    },
    /// The range leaves the table's input address space (or overflows).
    #[error("[{va}, +{len:#x}) is outside the address space of this table")]
    OutOfRange {
        /// Start.
        va: V,
        /// Length.
        len: u64,
    },
    /// Something is already mapped inside the range.
    #[error("{va} is already mapped")]
    AlreadyMapped {
        /// The first address found mapped.
        va: V,
    },
    /// The permissions encode no present entry in this format (e.g. none at all).
    #[error("permissions {prot:?} cannot be expressed by this table format")]
    InvalidProt {
        /// The permissions given.
        prot: Prot,
    },
    /// The arena cannot supply the table pages and split reserve the map needs.
    #[error("out of memory for page tables: {0}")]
    OutOfMemory(MemError),
}

/// Errors of [`PageTable::unmap`]. A failed unmap changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnmapError<V: Address> {
    /// Zero length.
    #[error("zero-length unmap")]
    ZeroLength,
    /// The start is not 4 KiB aligned.
    #[error("{va} is not 4 KiB aligned")]
    UnalignedVa {
        /// The address given.
        va: V,
    },
    /// The length is not a 4 KiB multiple.
    #[error("length {len:#x} is not a multiple of 4 KiB")]
    UnalignedLength {
        /// The length given.
        len: u64,
    },
    /// The range leaves the table's input address space (or overflows).
    #[error("[{va}, +{len:#x}) is outside the address space of this table")]
    OutOfRange {
        /// Start.
        va: V,
        /// Length.
        len: u64,
    },
}

/// What a successful map did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapStats {
    /// Bytes mapped.
    pub bytes: u64,
    /// Leaves written: 4 KiB, 2 MiB, 1 GiB.
    pub leaves: [u64; 3],
    /// Table pages created.
    pub tables_created: u64,
}

/// The result of a translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translated {
    /// Physical address of the translated byte.
    pub pa: PhysAddr,
    /// Permissions of the leaf.
    pub prot: Prot,
    /// Size of the leaf that maps it.
    pub size: PageSize,
}

/// One mapped leaf, as [`PageTable::for_each_leaf`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf<V> {
    /// First address the leaf maps.
    pub va: V,
    /// Physical address of its block.
    pub pa: PhysAddr,
    /// Leaf size.
    pub size: PageSize,
    /// Permissions.
    pub prot: Prot,
}

/// What an unmap removed and what a TLB must now forget, like Linux's `iommu_iotlb_gather`:
/// the span of removed leaves, their sizes, and the table pages that became empty.
///
/// The emptied table pages return to the arena when this value is completed or dropped: do that
/// after the TLB flush, so that no walker can follow a freed table into reused memory (a lazy
/// flush queue keeps these values until its flush).
#[must_use = "an unmap's invalidation must be flushed (then completed or dropped)"]
#[derive(Debug)]
pub struct Invalidation<V: Address> {
    mem: Arc<PhysMem>,
    start: u64,
    end: u64,
    unmapped: u64,
    sizes: u8,
    freed: Vec<PhysAddr>,
    _va: PhantomData<V>,
}

impl<V: Address> Invalidation<V> {
    fn new(mem: Arc<PhysMem>) -> Self {
        Invalidation {
            mem,
            start: u64::MAX,
            end: 0,
            unmapped: 0,
            sizes: 0,
            freed: Vec::new(),
            _va: PhantomData,
        }
    }

    fn add(&mut self, va: u64, len: u64, unmapped: u64, level: u8) {
        self.start = self.start.min(va);
        self.end = self.end.max(va + len);
        self.unmapped += unmapped;
        self.sizes |= 1 << level;
    }

    /// Bytes that were mapped in the range and are no longer.
    #[must_use]
    pub fn unmapped_bytes(&self) -> u64 {
        self.unmapped
    }

    /// The span to invalidate, `(start, length)`; `None` when nothing was mapped.
    #[must_use]
    pub fn range(&self) -> Option<(V, u64)> {
        (self.start < self.end).then(|| (V::new(self.start), self.end - self.start))
    }

    /// Leaf sizes that were removed, smallest first (a TLB flushes by these granules).
    pub fn page_sizes(&self) -> impl Iterator<Item = PageSize> + '_ {
        PageSize::ALL.into_iter().filter(|s| self.sizes & (1 << s.level()) != 0)
    }

    /// Table pages that became empty and will be freed on completion.
    #[must_use]
    pub fn freed_tables(&self) -> usize {
        self.freed.len()
    }

    /// Declares the TLB flushed: the emptied table pages go back to the arena.
    pub fn complete(self) {
        drop(self);
    }
}

impl<V: Address> Drop for Invalidation<V> {
    fn drop(&mut self) {
        // Every frame here was a table page of ours, taken out of the tree under the lock.
        let _ = self.mem.free_frames(&self.freed);
    }
}

/// Walks the physical side of a map source.
#[derive(Clone)]
struct Cursor<'a> {
    src: MapSource<'a>,
    /// Index of the current segment (pages / bvecs).
    idx: usize,
    /// Bytes consumed in the current segment (range / bvecs).
    off: u64,
    /// Address bits that make a page-list entry invalid (unaligned, or beyond the format).
    reject: u64,
}

impl<'a> Cursor<'a> {
    fn new(src: MapSource<'a>, pa_limit: u64) -> Self {
        Cursor { src, idx: 0, off: 0, reject: (PAGE_SIZE - 1) | !(pa_limit - 1) }
    }

    /// The current contiguous physical run: (address, bytes left in it).
    #[inline]
    fn run(&self) -> (u64, u64) {
        match self.src {
            MapSource::Range { pa, len } => (pa.as_u64() + self.off, len - self.off),
            MapSource::Pages(p) => (p[self.idx].as_u64(), PAGE_SIZE),
            MapSource::PageVecs(b) => (b[self.idx].phys.as_u64(), PAGE_SIZE),
            MapSource::BioVecs(b) => {
                let v = &b[self.idx];
                let start = v.phys.as_u64() + u64::from(v.offset);
                (start + self.off, u64::from(v.len) - self.off)
            }
        }
    }

    /// Moves `bytes` forward (within the source).
    #[inline]
    fn advance(&mut self, mut bytes: u64) {
        match self.src {
            MapSource::Range { .. } => self.off += bytes,
            MapSource::Pages(_) => self.idx += (bytes / PAGE_SIZE) as usize,
            MapSource::PageVecs(_) => self.idx += (bytes / PAGE_SIZE) as usize,
            MapSource::BioVecs(b) => {
                while bytes > 0 {
                    let left = u64::from(b[self.idx].len) - self.off;
                    if bytes < left {
                        self.off += bytes;
                        return;
                    }
                    bytes -= left;
                    self.idx += 1;
                    self.off = 0;
                }
            }
        }
    }

    /// Writes `entries.len()` consecutive 4 KiB leaves from the source. With `check`, a page
    /// list is validated in the same pass (one read of the source); on a bad page the entries
    /// hold garbage and the index of the first bad page comes back, so callers only use this
    /// on tables nobody can see yet.
    #[inline]
    fn fill_4k(&mut self, entries: &[AtomicU64], bits: u64, check: bool) -> Result<(), usize> {
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
            MapSource::PageVecs(b) => {
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
            MapSource::Range { pa, .. } => {
                let mut at = (pa.as_u64() + self.off) | bits;
                for e in entries {
                    e.store(at, Ordering::Relaxed);
                    at += PAGE_SIZE;
                }
                self.off += entries.len() as u64 * PAGE_SIZE;
            }
            MapSource::BioVecs(b) => {
                let mut done = 0;
                while done < entries.len() {
                    // Single-page segments (the common bio_vec array) in a tight loop.
                    if self.off == 0 {
                        let run = &b[self.idx..(self.idx + entries.len() - done).min(b.len())];
                        let n = run.iter().take_while(|v| u64::from(v.len) == PAGE_SIZE).count();
                        for (e, v) in entries[done..done + n].iter().zip(run) {
                            e.store((v.phys.as_u64() + u64::from(v.offset)) | bits, Ordering::Relaxed);
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
        }
        Ok(())
    }

    /// Validates the next `n` pages of a page list without writing anything (ranges and bio_vec
    /// arrays are validated before the walk).
    fn check_4k(&mut self, n: usize) -> Result<(), usize> {
        if let MapSource::Pages(p) = self.src {
            let pages = &p[self.idx..self.idx + n];
            if pages.iter().fold(0, |a, pa| a | pa.as_u64()) & self.reject != 0 {
                return Err(self.idx + first_bad_page(pages, self.reject));
            }
        }
        if let MapSource::PageVecs(b) = self.src {
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

fn first_bad_page(pages: &[PhysAddr], reject: u64) -> usize {
    pages.iter().position(|p| p.as_u64() & reject != 0).unwrap_or(0)
}

#[derive(Default)]
struct Plan {
    tables: u64,
    reserve: u64,
}

/// A radix page table of format `F` living in a [`PhysMem`] arena.
///
/// ```
/// use std::sync::Arc;
/// use vmbind::addr::{DmaAddr, PageSize, PhysAddr};
/// use vmbind::mem::PhysMem;
/// use vmbind::pt::{MapOptions, MapSource, PageTable, Prot, X86Iommu};
///
/// let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
/// let pt = PageTable::<X86Iommu>::new(mem.clone()).unwrap();
/// let pages = mem.alloc_scattered(1024, 7).unwrap();
/// let iova = DmaAddr::new(0x4000_0000);
/// pt.map(iova, MapSource::Pages(&pages), Prot::RW, MapOptions::default()).unwrap();
/// let t = pt.translate(DmaAddr::new(0x4000_1010)).unwrap();
/// assert_eq!(t.pa, PhysAddr::new(pages[1].as_u64() + 0x10));
/// assert_eq!(t.size, PageSize::Size4K);
/// let inv = pt.unmap(iova, 1024 * 4096).unwrap();
/// assert_eq!(inv.unmapped_bytes(), 1024 * 4096);
/// inv.complete(); // after the TLB flush
/// assert!(pt.translate(iova).is_none());
/// ```
pub struct PageTable<F: Format> {
    mem: Arc<PhysMem>,
    root: PhysAddr,
    lock: Mutex<()>,
    tables: AtomicU64,
    reserved: AtomicU64,
    _format: PhantomData<F>,
}

impl<F: Format> core::fmt::Debug for PageTable<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PageTable")
            .field("format", &F::NAME)
            .field("root", &self.root)
            .field("table_pages", &self.table_pages())
            .finish()
    }
}

impl<F: Format> PageTable<F> {
    const ROOT_LEVEL: u8 = F::LEVELS - 1;
    const VA_LIMIT: u64 = 1u64 << F::VA_BITS;
    const PA_LIMIT: u64 = 1u64 << F::PA_BITS;

    /// An empty table: one zeroed root page taken from `mem`.
    ///
    /// # Errors
    /// [`MemError::OutOfMemory`] when the arena has no frame for the root.
    pub fn new(mem: Arc<PhysMem>) -> Result<Self, MemError> {
        let root = mem.alloc_frame()?;
        mem.zero(root, PAGE_SIZE)?;
        Ok(PageTable {
            mem,
            root,
            lock: Mutex::new(()),
            tables: AtomicU64::new(1),
            reserved: AtomicU64::new(0),
            _format: PhantomData,
        })
    }

    /// Physical address of the root table (what a device's context entry or a shader gets).
    #[must_use]
    pub fn root(&self) -> PhysAddr {
        self.root
    }

    /// The arena the table lives in.
    #[must_use]
    pub fn mem(&self) -> &Arc<PhysMem> {
        &self.mem
    }

    /// Table pages in use, root included (1 for an empty table).
    #[must_use]
    pub fn table_pages(&self) -> u64 {
        self.tables.load(Ordering::Relaxed)
    }

    /// Frames the table holds in reserve (in the arena) to split its huge leaves.
    #[must_use]
    pub fn split_reserve(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    #[inline]
    fn table(&self, pa: PhysAddr) -> &[AtomicU64; ENTRIES] {
        // Table pages are frames this table allocated from this arena; `table` only fails for
        // addresses outside it, which the engine never writes into a table entry.
        self.mem.table(pa).expect("table page inside the arena")
    }

    /// Validates a source (page lists and page arrays are checked during the walk instead) and
    /// returns its length.
    fn check_source(src: &MapSource<'_>) -> Result<u64, MapError<F::Va>> {
        const LOW: u64 = PAGE_SIZE - 1;
        match *src {
            MapSource::Range { pa, len } => {
                let bad = (pa.as_u64() | len) & LOW != 0;
                if len == 0 {
                    return Err(MapError::ZeroLength);
                }
                if bad {
                    return Err(MapError::UnalignedSource { index: 0, pa, len });
                }
                match pa.as_u64().checked_add(len) {
                    Some(end) if end <= Self::PA_LIMIT => Ok(len),
                    _ => Err(MapError::PhysTooHigh { index: 0, pa, len }),
                }
            }
            MapSource::Pages(p) => {
                // Each page is validated as the commit reads it, chunk by chunk, before anything
                // becomes visible (see `commit`): one pass over the list instead of two.
                if p.is_empty() {
                    return Err(MapError::ZeroLength);
                }
                let len = (p.len() as u64)
                    .checked_mul(PAGE_SIZE)
                    .ok_or(MapError::OutOfRange { va: F::Va::new(0), len: u64::MAX })?;
                Ok(len)
            }
            MapSource::PageVecs(b) => {
                // Checked element by element as the walk reads them (see `fill_4k`).
                if b.is_empty() {
                    return Err(MapError::ZeroLength);
                }
                Ok(b.len() as u64 * PAGE_SIZE)
            }
            MapSource::BioVecs(b) => {
                if b.is_empty() {
                    return Err(MapError::ZeroLength);
                }
                // Fast check, one vectorizable pass: every segment page aligned and a page
                // multiple, none empty, no page near the limit (offsets and lengths are below
                // 2^32, so a page below PA_LIMIT / 2 cannot reach it). The exact error comes from
                // the loop below.
                let (all, top, min, sum) =
                    b.iter().fold((0u64, 0u64, u32::MAX, 0u64), |(a, t, mn, sm), v| {
                        (
                            a | v.phys.as_u64() | u64::from(v.offset) | u64::from(v.len),
                            t.max(v.phys.as_u64()),
                            mn.min(v.len),
                            sm + u64::from(v.len),
                        )
                    });
                if all & LOW == 0 && min > 0 && top < Self::PA_LIMIT / 2 {
                    return Ok(sum);
                }
                let mut total = 0u64;
                for (index, v) in b.iter().enumerate() {
                    let len = u64::from(v.len);
                    let pa = v.start().ok_or(MapError::PhysTooHigh { index, pa: v.phys, len })?;
                    if len == 0 || (pa.as_u64() | len) & LOW != 0 {
                        return Err(MapError::UnalignedSource { index, pa, len });
                    }
                    if pa.as_u64() + len > Self::PA_LIMIT {
                        return Err(MapError::PhysTooHigh { index, pa, len });
                    }
                    total += len;
                }
                Ok(total)
            }
        }
    }

    fn check_range(va: u64, len: u64) -> bool {
        matches!(va.checked_add(len), Some(end) if end <= Self::VA_LIMIT)
    }

    /// Maps `src` at `va` with `prot` in one walk.
    ///
    /// # Errors
    /// [`MapError::ZeroLength`], [`MapError::UnalignedVa`], [`MapError::UnalignedSource`],
    /// [`MapError::PhysTooHigh`], [`MapError::OutOfRange`], [`MapError::InvalidProt`] for bad
    /// input; [`MapError::AlreadyMapped`] naming the first mapped address in the range;
    /// [`MapError::OutOfMemory`] when the arena cannot supply the tables. In every case the table
    /// is unchanged.
    pub fn map(
        &self,
        va: F::Va,
        src: MapSource<'_>,
        prot: Prot,
        opts: MapOptions,
    ) -> Result<MapStats, MapError<F::Va>> {
        let len = Self::check_source(&src)?;
        let cursor = || Cursor::new(src, Self::PA_LIMIT);
        let v = va.as_u64();
        if v & (PAGE_SIZE - 1) != 0 {
            return Err(MapError::UnalignedVa { va });
        }
        if !Self::check_range(v, len) {
            return Err(MapError::OutOfRange { va, len });
        }
        if !F::is_present(F::leaf_bits(0, prot)) {
            return Err(MapError::InvalidProt { prot });
        }
        let max_level = opts.max_leaf.level();
        let mut bits = [0u64; 4];
        for (level, b) in bits.iter_mut().enumerate() {
            *b = F::leaf_bits(level as u8, prot);
        }

        let _guard = self.lock.lock();
        let root = self.table(self.root);
        let mut plan = Plan::default();
        self.plan(Self::ROOT_LEVEL, Some(root), v, v + len, &mut cursor(), max_level, &mut plan)
            .map_err(|at| MapError::AlreadyMapped { va: F::Va::new(at) })?;

        self.mem.reserve(plan.reserve).map_err(MapError::OutOfMemory)?;
        let mut pool = match self.mem.alloc_frames(plan.tables as usize) {
            Ok(p) => p,
            Err(e) => {
                self.mem.unreserve(plan.reserve);
                return Err(MapError::OutOfMemory(e));
            }
        };
        let mut stats = MapStats { bytes: len, tables_created: plan.tables, ..MapStats::default() };
        let all_new = pool.clone();
        let mut deferred = Vec::new();
        let mut ctx =
            Commit { bits: &bits, max_level, pool: &mut pool, stats: &mut stats, deferred: &mut deferred };
        let built = self.build(Self::ROOT_LEVEL, self.root, false, v, v + len, &mut cursor(), &mut ctx);
        if let Err(index) = built {
            // Nothing was published: every new table is still private. Give it all back.
            let _ = self.mem.free_frames(&all_new);
            self.mem.unreserve(plan.reserve);
            let (pa, len, offset) = match src {
                MapSource::Pages(p) => (p[index], PAGE_SIZE, 0),
                MapSource::PageVecs(b) => {
                    let v = b[index];
                    (v.start().unwrap_or(v.phys), u64::from(v.len), v.offset)
                }
                _ => (PhysAddr::new(0), PAGE_SIZE, 0),
            };
            return Err(if pa.as_u64() & (PAGE_SIZE - 1) != 0 || len != PAGE_SIZE || offset != 0 {
                MapError::UnalignedSource { index, pa, len }
            } else {
                MapError::PhysTooHigh { index, pa, len }
            });
        }
        debug_assert!(pool.is_empty());
        self.publish(&deferred, &bits);
        self.tables.fetch_add(plan.tables, Ordering::Relaxed);
        self.reserved.fetch_add(plan.reserve, Ordering::Relaxed);
        Ok(stats)
    }

    /// How many whole entries from `v` on, at `level`, can be huge leaves of the current
    /// contiguous source run (0 when the first cannot). Stays within the current table.
    #[inline]
    fn huge_run(level: u8, max_level: u8, v: u64, end: u64, cur: &Cursor<'_>) -> usize {
        if level == 0 || level > max_level || !F::leaf_allowed(level) {
            return 0;
        }
        let s = span(level);
        if v & (s - 1) != 0 || end - v < s {
            return 0;
        }
        let (pa, left) = cur.run();
        if pa & (s - 1) != 0 || left < s {
            return 0;
        }
        let in_table = (ENTRIES - index(v, level)) as u64;
        ((end - v) / s).min(left / s).min(in_table) as usize
    }

    /// Read-only descent: counts tables and reserve, finds overlaps (returns the mapped address).
    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        level: u8,
        table: Option<&[AtomicU64; ENTRIES]>,
        va: u64,
        end: u64,
        cur: &mut Cursor<'_>,
        max_level: u8,
        plan: &mut Plan,
    ) -> Result<(), u64> {
        if level == 0 {
            if let Some(t) = table {
                let (i0, i1) = (index(va, 0), index(va, 0) + ((end - va) / PAGE_SIZE) as usize);
                if let Some(k) = t[i0..i1].iter().position(|e| F::is_present(e.load(Ordering::Acquire))) {
                    return Err(va + k as u64 * PAGE_SIZE);
                }
            }
            cur.advance(end - va);
            return Ok(());
        }
        let s = span(level);
        let mut v = va;
        while v < end {
            // A run of whole entries that become huge leaves: counted in one step.
            let i = index(v, level);
            let mut n = Self::huge_run(level, max_level, v, end, cur);
            if let (Some(t), true) = (table, n > 0) {
                n = t[i..i + n].iter().take_while(|e| !F::is_present(e.load(Ordering::Acquire))).count();
            }
            if n > 0 {
                plan.reserve += n as u64 * split_cost(level);
                cur.advance(n as u64 * s);
                v += n as u64 * s;
                continue;
            }
            let e_end = ((v & !(s - 1)) + s).min(end);
            // A table where a huge leaf could go is descended into: it holds at least one present
            // entry (emptied tables are freed), which the descent reports exactly.
            match table.map_or(Pte::Empty, |t| F::decode(t[i].load(Ordering::Acquire), level)) {
                Pte::Empty => {
                    plan.tables += 1;
                    self.plan(level - 1, None, v, e_end, cur, max_level, plan)?;
                }
                Pte::Table(pa) => {
                    let child = self.table(pa);
                    self.plan(level - 1, Some(child), v, e_end, cur, max_level, plan)?;
                }
                Pte::Leaf { .. } => return Err(v),
            }
            v = e_end;
        }
        Ok(())
    }

    /// First writing pass. New tables (`fresh`: just allocated, contents garbage, invisible to
    /// everyone) are filled directly, validating a page list as it is read. Every write that
    /// would become visible — leaves into existing tables, and the entry that hangs a new
    /// subtree from an existing table — is only validated and recorded in `ctx.deferred`, for
    /// [`Self::publish`] once the whole source has proven valid. Returns the index of the first
    /// bad page of a page list.
    #[allow(clippy::too_many_arguments)]
    fn build<'s>(
        &self,
        level: u8,
        table_pa: PhysAddr,
        fresh: bool,
        va: u64,
        end: u64,
        cur: &mut Cursor<'s>,
        ctx: &mut Commit<'_, 's>,
    ) -> Result<(), usize> {
        let t = self.table(table_pa);
        let s = span(level);
        let i0 = index(va, level);
        let i1 = i0 + ((end - 1 - (va & !(s - 1))) >> shift(level)) as usize + 1;
        if fresh {
            for e in t[..i0].iter().chain(&t[i1..]) {
                e.store(0, Ordering::Relaxed);
            }
        }
        if level == 0 {
            ctx.stats.leaves[0] += (i1 - i0) as u64;
            if fresh {
                return cur.fill_4k(&t[i0..i1], ctx.bits[0], true);
            }
            ctx.deferred.push(Deferred::Leaves { table: table_pa, i0, i1, level, cur: cur.clone() });
            return cur.check_4k(i1 - i0);
        }
        let mut v = va;
        let mut i = i0;
        while i < i1 {
            let mut n = Self::huge_run(level, ctx.max_level, v, end, cur);
            if n > 0 && !fresh {
                n = t[i..i + n].iter().take_while(|e| !F::is_present(e.load(Ordering::Acquire))).count();
            }
            if n > 0 {
                // Huge leaves from one contiguous run (ranges and bio_vecs are validated up
                // front): a tight loop of stores, or one deferred record.
                ctx.stats.leaves[usize::from(level)] += n as u64;
                if fresh {
                    let (pa, _) = cur.run();
                    write_huge(&t[i..i + n], pa | ctx.bits[usize::from(level)], s);
                } else {
                    ctx.deferred.push(Deferred::Leaves {
                        table: table_pa,
                        i0: i,
                        i1: i + n,
                        level,
                        cur: cur.clone(),
                    });
                }
                cur.advance(n as u64 * s);
                v += n as u64 * s;
                i += n;
                continue;
            }
            let e_end = ((v & !(s - 1)) + s).min(end);
            let raw = if fresh { 0 } else { t[i].load(Ordering::Acquire) };
            if let Pte::Table(pa) = F::decode(raw, level) {
                self.build(level - 1, pa, false, v, e_end, cur, ctx)?;
            } else {
                let child = ctx.pool.pop().expect("the plan counted every new table");
                self.build(level - 1, child, true, v, e_end, cur, ctx)?;
                if fresh {
                    t[i].store(F::table_entry(child), Ordering::Relaxed);
                } else {
                    ctx.deferred.push(Deferred::Publish { table: table_pa, index: i, child });
                }
            }
            v = e_end;
            i += 1;
        }
        Ok(())
    }

    /// Second writing pass: the visible writes recorded by [`Self::build`], in address order.
    /// New subtrees are complete before the release store that publishes them.
    fn publish(&self, deferred: &[Deferred<'_>], bits: &[u64; 4]) {
        for d in deferred {
            match d {
                Deferred::Leaves { table, i0, i1, level, cur } => {
                    let t = &self.table(*table)[*i0..*i1];
                    let mut cur = cur.clone();
                    if *level == 0 {
                        // Validated by `build`; cannot fail.
                        let _ = cur.fill_4k(t, bits[0], false);
                    } else {
                        let (pa, _) = cur.run();
                        write_huge(t, pa | bits[usize::from(*level)], span(*level));
                    }
                }
                Deferred::Publish { table, index, child } => {
                    self.table(*table)[*index].store(F::table_entry(*child), Ordering::Release);
                }
            }
        }
        // Leaves written into existing tables become visible with this fence at the latest.
        core::sync::atomic::fence(Ordering::Release);
    }

    /// Unmaps exactly `[va, va + len)`: present leaves inside go away, huge leaves partly inside
    /// are split first, holes are skipped. Emptied tables are handed to the returned
    /// [`Invalidation`].
    ///
    /// # Errors
    /// [`UnmapError::ZeroLength`], [`UnmapError::UnalignedVa`], [`UnmapError::UnalignedLength`],
    /// [`UnmapError::OutOfRange`]; the table is unchanged then. Never fails for lack of memory.
    pub fn unmap(&self, va: F::Va, len: u64) -> Result<Invalidation<F::Va>, UnmapError<F::Va>> {
        let v = va.as_u64();
        if len == 0 {
            return Err(UnmapError::ZeroLength);
        }
        if v & (PAGE_SIZE - 1) != 0 {
            return Err(UnmapError::UnalignedVa { va });
        }
        if len & (PAGE_SIZE - 1) != 0 {
            return Err(UnmapError::UnalignedLength { len });
        }
        if !Self::check_range(v, len) {
            return Err(UnmapError::OutOfRange { va, len });
        }
        let _guard = self.lock.lock();
        let mut inv = Invalidation::new(self.mem.clone());
        let mut unreserve = 0;
        let mut created = 0;
        let root = self.table(self.root);
        self.unmap_level(Self::ROOT_LEVEL, root, false, v, v + len, &mut inv, &mut unreserve, &mut created);
        self.mem.unreserve(unreserve);
        self.reserved.fetch_sub(unreserve, Ordering::Relaxed);
        self.tables.fetch_add(created, Ordering::Relaxed);
        self.tables.fetch_sub(inv.freed.len() as u64, Ordering::Relaxed);
        Ok(inv)
    }

    /// `doomed`: the whole table is being freed by the caller, so entries need no clearing.
    #[allow(clippy::too_many_arguments)]
    fn unmap_level(
        &self,
        level: u8,
        t: &[AtomicU64; ENTRIES],
        doomed: bool,
        va: u64,
        end: u64,
        inv: &mut Invalidation<F::Va>,
        unreserve: &mut u64,
        created: &mut u64,
    ) {
        let s = span(level);
        let i0 = index(va, level);
        let i1 = i0 + ((end - 1 - (va & !(s - 1))) >> shift(level)) as usize + 1;
        if level == 0 {
            let entries = &t[i0..i1];
            let present_at = |e: &AtomicU64| F::is_present(e.load(Ordering::Relaxed));
            let (mut present, mut first, mut last) = (0u64, usize::MAX, 0usize);
            if doomed {
                // The table goes away whole: count (branch-free), and find the ends for the
                // invalidation range, without clearing anything.
                present = entries.iter().map(|e| u64::from(present_at(e))).sum();
                if present > 0 {
                    first = entries.iter().position(present_at).unwrap_or(0);
                    last = entries.iter().rposition(present_at).unwrap_or(0);
                }
            } else {
                for (k, e) in entries.iter().enumerate() {
                    if present_at(e) {
                        present += 1;
                        first = first.min(k);
                        last = k;
                        e.store(0, Ordering::Release);
                    }
                }
            }
            if present > 0 {
                let lo = va + first as u64 * PAGE_SIZE;
                inv.add(lo, (last - first + 1) as u64 * PAGE_SIZE, present * PAGE_SIZE, 0);
            }
            return;
        }
        let mut v = va;
        for e in &t[i0..i1] {
            let e_start = v & !(s - 1);
            let e_end = (e_start + s).min(end);
            let full = v == e_start && e_end - v == s;
            match F::decode(e.load(Ordering::Acquire), level) {
                Pte::Empty => {}
                Pte::Leaf { .. } if full => {
                    if !doomed {
                        e.store(0, Ordering::Release);
                    }
                    inv.add(v, s, s, level);
                    *unreserve += split_cost(level);
                }
                Pte::Leaf { pa, prot } => {
                    // Split: the frame comes out of this leaf's reserve, and its 512 children keep
                    // the rest of it (split_cost(level) = 1 + 512 * split_cost(level - 1)).
                    let child_pa =
                        self.mem.alloc_reserved_frame().expect("every huge leaf holds a split reserve");
                    self.reserved.fetch_sub(1, Ordering::Relaxed);
                    *created += 1;
                    let child = self.table(child_pa);
                    let cs = span(level - 1);
                    let bits = F::leaf_bits(level - 1, prot);
                    let mut at = pa.as_u64();
                    for c in child {
                        c.store(at | bits, Ordering::Relaxed);
                        at += cs;
                    }
                    e.store(F::table_entry(child_pa), Ordering::Release);
                    self.unmap_level(level - 1, child, false, v, e_end, inv, unreserve, created);
                }
                Pte::Table(pa) => {
                    let child = self.table(pa);
                    let gone = doomed || full;
                    self.unmap_level(level - 1, child, gone, v, e_end, inv, unreserve, created);
                    if gone || child.iter().all(|c| !F::is_present(c.load(Ordering::Relaxed))) {
                        if !doomed {
                            e.store(0, Ordering::Release);
                        }
                        inv.freed.push(pa);
                    }
                }
            }
            v = e_end;
        }
    }

    /// The first mapped address in `[va, va + len)`, if any (a walk that skips empty subtrees).
    #[must_use]
    pub fn first_mapped(&self, va: F::Va, len: u64) -> Option<F::Va> {
        let v = va.as_u64();
        if len == 0 || v & (PAGE_SIZE - 1) != 0 || len & (PAGE_SIZE - 1) != 0 || !Self::check_range(v, len) {
            return None;
        }
        let _guard = self.lock.lock();
        // The planning walk with 4 KiB leaves forced reports the first present entry; its
        // source cursor only counts bytes here.
        let mut cur = Cursor::new(MapSource::Range { pa: PhysAddr::new(0), len }, Self::PA_LIMIT);
        let root = self.table(self.root);
        self.plan(Self::ROOT_LEVEL, Some(root), v, v + len, &mut cur, 0, &mut Plan::default())
            .err()
            .map(F::Va::new)
    }

    /// Translates one address: the physical address, permissions and leaf size, or `None` when
    /// nothing maps it. Takes no lock.
    #[inline]
    pub fn translate(&self, va: F::Va) -> Option<Translated> {
        Self::translate_in(&self.mem, self.root, va)
    }

    /// [`PageTable::translate`] of the table rooted at `root` in `mem`, without the handle: for
    /// a walker that holds only the root (the IOMMU's lock-free IOTLB fill). If the table is
    /// being torn down meanwhile, the walk may read freed frames; it stays inside the arena and
    /// ends after at most one step per level, but its answer means something only when the caller
    /// can tell that no unmap of `va` completed during the walk.
    #[inline]
    pub(crate) fn translate_in(mem: &PhysMem, root: PhysAddr, va: F::Va) -> Option<Translated> {
        let v = va.as_u64();
        if v >= Self::VA_LIMIT {
            return None;
        }
        let mut t = mem.table(root)?;
        let mut level = Self::ROOT_LEVEL;
        loop {
            let raw = t[index(v, level)].load(Ordering::Acquire);
            match F::decode(raw, level) {
                Pte::Empty => return None,
                Pte::Leaf { pa, prot } => {
                    return Some(Translated {
                        pa: PhysAddr::new(pa.as_u64() + (v & (span(level) - 1))),
                        prot,
                        size: PageSize::from_level(level)?,
                    });
                }
                Pte::Table(pa) => {
                    if level == 0 {
                        return None;
                    }
                    t = mem.table(pa)?;
                    level -= 1;
                }
            }
        }
    }

    /// Calls `f` for every mapped leaf in address order (holding the mutation lock, so the
    /// picture is consistent).
    pub fn for_each_leaf(&self, mut f: impl FnMut(Leaf<F::Va>)) {
        let _guard = self.lock.lock();
        self.visit(Self::ROOT_LEVEL, self.root, 0, &mut f);
    }

    /// Every mapped leaf, in address order.
    #[must_use]
    pub fn leaves(&self) -> Vec<Leaf<F::Va>> {
        let mut out = Vec::new();
        self.for_each_leaf(|l| out.push(l));
        out
    }

    fn visit(&self, level: u8, pa: PhysAddr, base: u64, f: &mut impl FnMut(Leaf<F::Va>)) {
        let t = self.table(pa);
        for (i, e) in t.iter().enumerate() {
            let va = base + ((i as u64) << shift(level));
            match F::decode(e.load(Ordering::Acquire), level) {
                Pte::Empty => {}
                Pte::Leaf { pa, prot } => {
                    if let Some(size) = PageSize::from_level(level) {
                        f(Leaf { va: F::Va::new(va), pa, size, prot });
                    }
                }
                Pte::Table(child) if level > 0 => self.visit(level - 1, child, va, f),
                Pte::Table(_) => {}
            }
        }
    }

    fn free_subtree(&self, level: u8, pa: PhysAddr, out: &mut Vec<PhysAddr>) {
        if level > 0 {
            for e in self.table(pa) {
                if let Pte::Table(child) = F::decode(e.load(Ordering::Relaxed), level) {
                    self.free_subtree(level - 1, child, out);
                }
            }
        }
        out.push(pa);
    }
}

struct Commit<'a, 's> {
    bits: &'a [u64; 4],
    max_level: u8,
    pool: &'a mut Vec<PhysAddr>,
    stats: &'a mut MapStats,
    deferred: &'a mut Vec<Deferred<'s>>,
}

/// A write into a table that others can already see, held back until the map is known good.
enum Deferred<'s> {
    /// Leaves `[i0, i1)` of an existing table at `level`, from the source at `cur`.
    Leaves { table: PhysAddr, i0: usize, i1: usize, level: u8, cur: Cursor<'s> },
    /// Hang the new subtree `child` from entry `index` of an existing table.
    Publish { table: PhysAddr, index: usize, child: PhysAddr },
}

#[inline]
fn write_huge(entries: &[AtomicU64], first: u64, step: u64) {
    let mut at = first;
    for e in entries {
        e.store(at, Ordering::Release);
        at += step;
    }
}

impl<F: Format> Drop for PageTable<F> {
    fn drop(&mut self) {
        let mut pages = Vec::new();
        self.free_subtree(Self::ROOT_LEVEL, self.root, &mut pages);
        let _ = self.mem.free_frames(&pages);
        self.mem.unreserve(self.reserved.load(Ordering::Relaxed));
    }
}
