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
mod gather;
pub mod gpu;
mod log;
mod map;
mod prepare;
mod source;
mod unmap;

use core::marker::PhantomData;
use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use crate::sync::{Rank, SpinMutex};

pub use format::{Format, Prot, Pte, X86Iommu};
pub use gather::Invalidation;
pub use gpu::GpuGfx9;
pub use log::{PteLog, PteLogError, PteRun};
pub use prepare::{PlannedMap, Prepared};
pub use source::{MapOptions, MapSource, Segment};

use crate::addr::{Address, PAGE_SIZE, PageSize, PhysAddr, Span, SpanError};
use crate::mem::{MemError, PhysMem, Reservation};
use gather::Parking;

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

/// Errors of [`PageTable::map`] (`A`: the table's output addresses). A failed map changes
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError<V: Address, A: Address = PhysAddr> {
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
        pa: A,
        /// Its length.
        len: u64,
    },
    /// A source segment reaches beyond what an entry can hold.
    #[error("source segment {index} ({pa}, length {len:#x}) is beyond the physical address limit")]
    PhysTooHigh {
        /// Index of the segment.
        index: usize,
        /// Its first byte.
        pa: A,
        /// Its length.
        len: u64,
    },
    /// The range ends past the table's input address space.
    #[error("[{va}, +{len:#x}) is outside the address space of this table")]
    OutOfRange {
        /// Start.
        va: V,
        /// Length.
        len: u64,
    },
    /// `va + len` wraps past 2^64.
    #[error("[{va}, +{len:#x}) wraps past 2^64")]
    Overflow {
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
    /// A sparse source for a format without sparse entries.
    #[error("this table format has no sparse entries")]
    SparseUnsupported,
    /// A physical `bio_vec` source for a table whose leaves do not hold physical addresses.
    #[error("a bio_vec source is physical; this table's leaves hold {what} addresses")]
    PhysicalSource {
        /// The table's output address kind.
        what: &'static str,
    },
    /// A segment list shorter than `skip + len`.
    #[error("the segment list holds {available:#x} bytes; the map needs {wanted:#x}")]
    SourceShort {
        /// `skip + len`.
        wanted: u64,
        /// Bytes the list describes.
        available: u64,
    },
    /// The arena cannot supply the table pages and split reserve the map needs.
    #[error("out of memory for page tables: {0}")]
    OutOfMemory(MemError),
    /// A [`Prepared`] map of another table, or one that holds fewer frames than this map needs
    /// (it was not prepared for this range).
    #[error("the prepared frames do not cover this map (prepared for another table or range)")]
    NotPrepared,
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
    /// The range ends past the table's input address space.
    #[error("[{va}, +{len:#x}) is outside the address space of this table")]
    OutOfRange {
        /// Start.
        va: V,
        /// Length.
        len: u64,
    },
    /// `va + len` wraps past 2^64.
    #[error("[{va}, +{len:#x}) wraps past 2^64")]
    Overflow {
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

/// The result of a translation (`A`: the table's output addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translated<A = PhysAddr> {
    /// Output address of the translated byte.
    pub pa: A,
    /// Permissions of the leaf.
    pub prot: Prot,
    /// Size of the leaf that maps it.
    pub size: PageSize,
}

/// What [`PageTable::probe`] finds for an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe<A = PhysAddr> {
    /// No entry maps it.
    Empty,
    /// A sparse entry of `size` covers it: reads zero, writes dropped.
    Sparse {
        /// The entry's size.
        size: PageSize,
    },
    /// A leaf maps it.
    Mapped(Translated<A>),
}

/// One mapped leaf (or sparse entry), as [`PageTable::for_each_leaf`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf<V, A = PhysAddr> {
    /// First address the leaf maps.
    pub va: V,
    /// Output address of its block.
    pub pa: A,
    /// Leaf size.
    pub size: PageSize,
    /// Permissions ([`Prot::NONE`] for a sparse entry).
    pub prot: Prot,
    /// A sparse entry ([`Pte::Sparse`]: reads zero, writes dropped; `pa` is 0).
    pub sparse: bool,
    /// The fragment field of a 4 KiB leaf (formats with fragments, [`Format::MAX_FRAGMENT`]):
    /// the entry belongs to an aligned contiguous run of `4 KiB << frag`; 0 otherwise.
    pub frag: u8,
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
    /// The mutation lock, holding the table's split reserve.
    lock: SpinMutex<Reservation>,
    tables: AtomicU64,
    reserved: AtomicU64,
    /// Whether map and unmap may take their one-leaf-table fast paths.
    fast: AtomicBool,
    /// Emptied table pages of invalidations dropped without `complete()`.
    parking: Arc<Parking>,
    /// Whether 4 KiB leaf writes go to `log` instead of the table ([`PageTable::defer_leaves`]).
    deferring: AtomicBool,
    log: parking_lot::Mutex<PteLog>,
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
    /// The geometry a format declares, checked when a table of it is first built (a compile
    /// error, not a runtime one): 1 to 4 levels (the engine's per-level arrays), an input space
    /// the levels can index and an output width an entry can hold.
    const GEOMETRY: () = {
        assert!(F::LEVELS >= 1 && F::LEVELS <= 4, "a format has 1 to 4 levels");
        assert!(
            F::VA_BITS > 12 && F::VA_BITS <= 12 + 9 * F::LEVELS as u32,
            "the levels must index the VA space"
        );
        assert!(F::PA_BITS > 12 && F::PA_BITS <= 63, "entries hold 4 KiB-aligned output addresses");
        assert!(
            ((F::MAX_FRAGMENT as u64) << F::FRAGMENT_SHIFT) & !F::FRAGMENT_MASK == 0,
            "the largest fragment fits the fragment field"
        );
        assert!(
            F::FRAGMENT_MASK & (((1u64 << F::PA_BITS) - 1) & !0xfff) == 0,
            "the fragment field lies outside the address"
        );
    };
    const ROOT_LEVEL: u8 = F::LEVELS - 1;
    const VA_LIMIT: u64 = 1u64 << F::VA_BITS;
    const PA_LIMIT: u64 = 1u64 << F::PA_BITS;

    /// An empty table: one zeroed root page taken from `mem`.
    ///
    /// # Errors
    /// [`MemError::OutOfMemory`] when the arena has no frame for the root.
    pub fn new(mem: Arc<PhysMem>) -> Result<Self, MemError> {
        let () = Self::GEOMETRY;
        let root = mem.alloc_frame()?;
        if let Err(e) = mem.zero(root, PAGE_SIZE) {
            let _ = mem.free_frame(root);
            return Err(e);
        }
        let reservation = mem.reserve(0)?;
        // The frame word may hold a count of the frame's previous life.
        mem.frame_word(root).expect("frame inside the arena").store(0, Ordering::Relaxed);
        Ok(PageTable {
            parking: Parking::new(mem.clone()),
            mem,
            root,
            lock: SpinMutex::new(reservation, Rank::Table),
            tables: AtomicU64::new(1),
            reserved: AtomicU64::new(0),
            fast: AtomicBool::new(true),
            deferring: AtomicBool::new(false),
            log: parking_lot::Mutex::new(PteLog::default()),
            _format: PhantomData,
        })
    }

    /// With `on`, maps stop storing 4 KiB leaf entries and record them in the table's
    /// [`PteLog`] instead ([`PageTable::take_log`]); directory entries, huge leaves and unmaps
    /// are written as always. Whoever defers must execute the log (a GPU populate, or
    /// [`PteLog::apply`]) before anything reads the table: until then the new 4 KiB leaves
    /// read as not present.
    pub fn defer_leaves(&self, on: bool) {
        self.deferring.store(on, Ordering::Release);
    }

    /// The deferred writes recorded so far (emptied).
    pub fn take_log(&self) -> PteLog {
        std::mem::take(&mut *self.log.lock())
    }

    /// Whether 4 KiB leaf writes are being deferred.
    #[inline]
    pub(crate) fn deferring(&self) -> bool {
        self.deferring.load(Ordering::Relaxed)
    }

    /// Fills `entries` (slots of the table page at `table`, from slot `i0`) with `fill`: into
    /// the table, or, while deferring, into a scratch copy recorded in the log.
    #[inline]
    fn fill_leaves<E>(
        &self,
        table: PhysAddr,
        i0: usize,
        entries: &[AtomicU64],
        fill: impl FnOnce(&[AtomicU64]) -> Result<(), E>,
    ) -> Result<(), E> {
        if !self.deferring() {
            return fill(entries);
        }
        let scratch: [AtomicU64; ENTRIES] = [const { AtomicU64::new(0) }; ENTRIES];
        let s = &scratch[..entries.len()];
        fill(s)?;
        // The slots read as not present until the log runs: a fresh table page holds whatever
        // its frame held before (its other slots were cleared, these were to be filled).
        for e in entries {
            e.store(0, Ordering::Relaxed);
        }
        self.log.lock().push(table.as_u64() + i0 as u64 * 8, s);
        Ok(())
    }

    /// A read-only view of the table: what layers that do not own it get (an IOMMU domain hands
    /// out only this, so nothing can change its table behind its IOTLB).
    #[must_use]
    pub fn view(&self) -> TableView<'_, F> {
        TableView(self)
    }

    /// Table pages held back because their [`Invalidation`] was dropped without
    /// [`Invalidation::complete`] (see there).
    #[must_use]
    pub fn parked_tables(&self) -> usize {
        self.parking.pages.lock().len()
    }

    /// Frees the parked table pages: call it only after a flush of the whole TLB that walks this
    /// table (a domain-wide invalidation). Returns how many were freed.
    pub fn release_parked(&self) -> usize {
        self.parking.release()
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

    /// The present-entry count of the table page at `pa` (its frame word, see `mem`): set when
    /// the table is created, changed with every entry written or cleared, all under the mutation
    /// lock, so "did this table empty?" is one load. It holds because only the engine writes its
    /// table pages; a frame written behind its back (through `PhysMem`'s raw access, or by an
    /// untranslated device's DMA) puts the count out of step, which a debug build reports.
    #[inline]
    fn count(&self, pa: PhysAddr) -> &AtomicU16 {
        self.mem.frame_word(pa).expect("table page inside the arena")
    }

    /// Adds `delta` (two's complement for a decrease) to the present-entry count of `pa`;
    /// returns the new count. Under the mutation lock: a load and a store, no read-modify-write.
    #[inline]
    fn count_add(&self, pa: PhysAddr, delta: u16) -> u16 {
        let c = self.count(pa);
        let n = c.load(Ordering::Relaxed).wrapping_add(delta);
        debug_assert!(usize::from(n) <= ENTRIES, "present-entry count out of step");
        c.store(n, Ordering::Relaxed);
        n
    }

    /// The leaf (level 0) table that holds the entry of `v`, when the whole path down to it
    /// exists and holds no huge leaf. Under the mutation lock.
    #[inline]
    fn leaf_table(&self, v: u64) -> Option<PhysAddr> {
        let mut pa = self.root;
        let mut level = Self::ROOT_LEVEL;
        while level > 0 {
            match F::decode(self.table(pa)[index(v, level)].load(Ordering::Relaxed), level) {
                Pte::Table(child) => pa = child,
                _ => return None,
            }
            level -= 1;
        }
        Some(pa)
    }

    /// Whether `[v, v + len)` lies inside one leaf table's span and cannot take a huge leaf:
    /// what the one-table fast paths of map and unmap serve (when they are on).
    #[inline]
    fn in_one_leaf_table(&self, v: u64, len: u64) -> bool {
        len < span(1) && v >> shift(1) == (v + len - 1) >> shift(1) && self.fast.load(Ordering::Relaxed)
    }

    /// Turns the one-leaf-table fast paths of [`PageTable::map`] and [`PageTable::unmap`] off
    /// (or on again; they are on by default). A map or unmap whose range lies inside one existing
    /// leaf table (a page, a 64 KiB bind) normally takes a short path: one descent, check,
    /// store, no allocation. Its results, errors and resulting table are exactly those of the
    /// general plan-and-commit walk; this switch exists so that tests can prove that on the same
    /// operation sequences, and benchmarks can measure what the fast path saves.
    pub fn set_fast_paths(&self, on: bool) {
        self.fast.store(on, Ordering::Relaxed);
    }

    #[inline]
    fn table(&self, pa: PhysAddr) -> &[AtomicU64; ENTRIES] {
        // Table pages are frames this table allocated from this arena; `table` only fails for
        // addresses outside it, which the engine never writes into a table entry.
        self.mem.table(pa).expect("table page inside the arena")
    }

    /// The checked range `[va, va + len)` of this table's input space: [`SpanError::Overflow`]
    /// when it wraps, [`SpanError::Beyond`] when it passes the format's limit.
    fn span(va: F::Va, len: u64) -> Result<Span<F::Va>, SpanError> {
        Span::within(va, len, Self::VA_LIMIT)
    }

    /// Translates one address: the physical address, permissions and leaf size, or `None` when
    /// nothing maps it. Takes no lock.
    #[inline]
    pub fn translate(&self, va: F::Va) -> Option<Translated<F::Out>> {
        Self::translate_in(&self.mem, self.root, va)
    }

    /// What the entry for `va` holds: nothing, a sparse entry (and its size), or a leaf. Like
    /// [`PageTable::translate`] (no lock), but tells a sparse entry from a hole, as a GPU does
    /// (a sparse entry reads zero; a hole faults).
    #[must_use]
    pub fn probe(&self, va: F::Va) -> Probe<F::Out> {
        let v = va.as_u64();
        if v >= Self::VA_LIMIT {
            return Probe::Empty;
        }
        let mut t = self.table(self.root);
        let mut level = Self::ROOT_LEVEL;
        loop {
            match F::decode(t[index(v, level)].load(Ordering::Acquire), level) {
                Pte::Empty => return Probe::Empty,
                Pte::Sparse => {
                    return PageSize::from_level(level).map_or(Probe::Empty, |size| Probe::Sparse { size });
                }
                Pte::Leaf { pa, prot } => {
                    return PageSize::from_level(level).map_or(Probe::Empty, |size| {
                        Probe::Mapped(Translated {
                            pa: F::Out::new(pa.as_u64() + (v & (span(level) - 1))),
                            prot,
                            size,
                        })
                    });
                }
                Pte::Table(pa) => {
                    if level == 0 {
                        return Probe::Empty;
                    }
                    // A table freed and reused under a lock-free walk reads as nothing, never
                    // a panic.
                    let Some(next) = self.mem.table(pa) else { return Probe::Empty };
                    t = next;
                    level -= 1;
                }
            }
        }
    }

    /// [`PageTable::translate`] of the table rooted at `root` in `mem`, without the handle: for
    /// a walker that holds only the root (the IOMMU's lock-free IOTLB fill). If the table is
    /// being torn down meanwhile, the walk may read freed frames; it stays inside the arena and
    /// ends after at most one step per level, but its answer means something only when the caller
    /// can tell that no unmap of `va` completed during the walk.
    #[inline]
    pub(crate) fn translate_in(mem: &PhysMem, root: PhysAddr, va: F::Va) -> Option<Translated<F::Out>> {
        let v = va.as_u64();
        if v >= Self::VA_LIMIT {
            return None;
        }
        let mut t = mem.table(root)?;
        let mut level = Self::ROOT_LEVEL;
        loop {
            let raw = t[index(v, level)].load(Ordering::Acquire);
            match F::decode(raw, level) {
                Pte::Empty | Pte::Sparse => return None,
                Pte::Leaf { pa, prot } => {
                    return Some(Translated {
                        pa: F::Out::new(pa.as_u64() + (v & (span(level) - 1))),
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
    pub fn for_each_leaf(&self, mut f: impl FnMut(Leaf<F::Va, F::Out>)) {
        let _guard = self.lock.lock();
        self.visit(Self::ROOT_LEVEL, self.root, 0, &mut f);
    }

    /// Every mapped leaf, in address order.
    #[must_use]
    pub fn leaves(&self) -> Vec<Leaf<F::Va, F::Out>> {
        let mut out = Vec::new();
        self.for_each_leaf(|l| out.push(l));
        out
    }

    fn visit(&self, level: u8, pa: PhysAddr, base: u64, f: &mut impl FnMut(Leaf<F::Va, F::Out>)) {
        let t = self.table(pa);
        for (i, e) in t.iter().enumerate() {
            let va = base + ((i as u64) << shift(level));
            match F::decode(e.load(Ordering::Acquire), level) {
                Pte::Empty => {}
                Pte::Sparse => {
                    if let Some(size) = PageSize::from_level(level) {
                        f(Leaf {
                            va: F::Va::new(va),
                            pa: F::Out::new(0),
                            size,
                            prot: Prot::NONE,
                            sparse: true,
                            frag: 0,
                        });
                    }
                }
                Pte::Leaf { pa, prot } => {
                    if let Some(size) = PageSize::from_level(level) {
                        let raw = e.load(Ordering::Acquire);
                        let frag = if level == 0 {
                            ((raw & F::FRAGMENT_MASK) >> F::FRAGMENT_SHIFT) as u8
                        } else {
                            0
                        };
                        f(Leaf { va: F::Va::new(va), pa, size, prot, sparse: false, frag });
                    }
                }
                Pte::Table(child) if level > 0 => self.visit(level - 1, child, va, f),
                Pte::Table(_) => {}
            }
        }
    }

    /// A text picture of the table: a header with the format and counts, the table pages per
    /// level, then one line per run of leaves that are contiguous in both address spaces with the
    /// same size, permissions and fragment (`frag N`: one TLB entry covers `4 KiB << N`).
    #[must_use]
    pub fn dump(&self) -> String {
        use core::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: root {}, {} table page(s), split reserve {}, {} parked",
            F::NAME,
            self.root,
            self.table_pages(),
            self.split_reserve(),
            self.parked_tables()
        );
        let mut per_level = [0u64; 4];
        {
            let _guard = self.lock.lock();
            self.count_tables(Self::ROOT_LEVEL, self.root, &mut per_level);
        }
        let levels: Vec<String> =
            (0..F::LEVELS).rev().map(|l| format!("L{l} {}", per_level[usize::from(l)])).collect();
        let _ = writeln!(out, "  tables per level: {}", levels.join(", "));
        // The first leaf of the current run and how many leaves it has.
        type Run<F> = (Leaf<<F as Format>::Va, <F as Format>::Out>, u64);
        let mut run: Option<Run<F>> = None;
        let line = |out: &mut String, l: &Leaf<F::Va, F::Out>, n: u64| {
            let bytes = n * l.size.bytes();
            let (s, e) = (l.va.as_u64(), l.va.as_u64() + bytes);
            let _ = if l.sparse {
                writeln!(out, "  [{s:#x}, {e:#x}) sparse: {n} x {}", l.size)
            } else {
                let frag = if l.frag > 0 { format!(" frag {}", l.frag) } else { String::new() };
                writeln!(out, "  [{s:#x}, {e:#x}) -> {}: {n} x {} {:?}{frag}", l.pa, l.size, l.prot)
            };
        };
        self.for_each_leaf(|l| {
            if let Some((first, n)) = &mut run {
                let span = *n * first.size.bytes();
                let step = if l.sparse { 0 } else { span };
                if l.size == first.size
                    && l.prot == first.prot
                    && l.sparse == first.sparse
                    && l.frag == first.frag
                    && l.va.as_u64() == first.va.as_u64() + span
                    && l.pa.as_u64() == first.pa.as_u64() + step
                {
                    *n += 1;
                    return;
                }
                line(&mut out, first, *n);
            }
            run = Some((l, 1));
        });
        if let Some((first, n)) = run {
            line(&mut out, &first, n);
        }
        out
    }

    /// Counts the table pages of the subtree at `pa` (a table of `level`) per level.
    fn count_tables(&self, level: u8, pa: PhysAddr, out: &mut [u64; 4]) {
        out[usize::from(level)] += 1;
        if level > 0 {
            for e in self.table(pa) {
                if let Pte::Table(child) = F::decode(e.load(Ordering::Relaxed), level) {
                    self.count_tables(level - 1, child, out);
                }
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

impl<F: Format> Drop for PageTable<F> {
    fn drop(&mut self) {
        let mut pages = Vec::new();
        self.free_subtree(Self::ROOT_LEVEL, self.root, &mut pages);
        let _ = self.mem.free_frames(&pages);
        let r = self.lock.get_mut();
        let _ = self.mem.unreserve(r, u64::MAX);
        // No walker can reach the table any more: parked pages go too.
        self.parking.release();
    }
}

/// A read-only view of a [`PageTable`]: translate, list leaves, count, dump. It cannot map or
/// unmap, so an owner that must see every change (an IOMMU domain and its IOTLB) can hand it out.
///
/// ```compile_fail
/// # use std::sync::Arc;
/// # use vmbind::{addr::DmaAddr, mem::PhysMem, pt::{PageTable, X86Iommu}};
/// let mem = Arc::new(PhysMem::new(1 << 20).unwrap());
/// let t = PageTable::<X86Iommu>::new(mem).unwrap();
/// let view = t.view();
/// let _ = view.unmap(DmaAddr::new(0x1000), 4096); // a view has no unmap
/// ```
pub struct TableView<'a, F: Format>(&'a PageTable<F>);

impl<F: Format> Clone for TableView<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F: Format> Copy for TableView<'_, F> {}

impl<F: Format> core::fmt::Debug for TableView<'_, F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.fmt(f)
    }
}

impl<F: Format> TableView<'_, F> {
    /// Physical address of the root table.
    #[must_use]
    pub fn root(&self) -> PhysAddr {
        self.0.root()
    }

    /// Table pages in use, root included.
    #[must_use]
    pub fn table_pages(&self) -> u64 {
        self.0.table_pages()
    }

    /// Frames held in reserve to split huge leaves.
    #[must_use]
    pub fn split_reserve(&self) -> u64 {
        self.0.split_reserve()
    }

    /// Table pages parked by invalidations dropped without completion.
    #[must_use]
    pub fn parked_tables(&self) -> usize {
        self.0.parked_tables()
    }

    /// [`PageTable::translate`].
    #[must_use]
    pub fn translate(&self, va: F::Va) -> Option<Translated<F::Out>> {
        self.0.translate(va)
    }

    /// [`PageTable::probe`].
    #[must_use]
    pub fn probe(&self, va: F::Va) -> Probe<F::Out> {
        self.0.probe(va)
    }

    /// [`PageTable::first_mapped`].
    #[must_use]
    pub fn first_mapped(&self, va: F::Va, len: u64) -> Option<F::Va> {
        self.0.first_mapped(va, len)
    }

    /// [`PageTable::for_each_leaf`].
    pub fn for_each_leaf(&self, f: impl FnMut(Leaf<F::Va, F::Out>)) {
        self.0.for_each_leaf(f);
    }

    /// [`PageTable::leaves`].
    #[must_use]
    pub fn leaves(&self) -> Vec<Leaf<F::Va, F::Out>> {
        self.0.leaves()
    }

    /// [`PageTable::dump`].
    #[must_use]
    pub fn dump(&self) -> String {
        self.0.dump()
    }
}
