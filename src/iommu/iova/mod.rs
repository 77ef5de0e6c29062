//! The IOVA allocator, after Linux `drivers/iommu/iova.c` (REFERENCES.md §4).
//!
//! - **Top-down** in the aperture: the highest free range that fits is used.
//! - **Rounding**: sizes under 32 pages are rounded up to a power of two and aligned to it
//!   (Linux's `roundup_pow_of_two` + `size_aligned`); larger sizes are exact and aligned to their
//!   next power of two, capped at 2 MiB (so they can still take 2 MiB leaves).
//! - **O(log n) tree**: free ranges live in a treap keyed by start, each node augmented with the
//!   largest free range in its subtree. A top-down search visits the right (higher) subtree
//!   first and skips every subtree whose largest range is too small, so an allocation costs
//!   O(log n) whatever the number of live ranges and the fragmentation (Linux walks its rbtree
//!   linearly in the worst case).
//! - **Per-CPU caches** for orders 0–5 (4 KiB–128 KiB): each CPU slot has a `loaded` and a `prev`
//!   magazine of [`MAG_SIZE`] IOVAs; full magazines go to a per-order depot. As in Linux since
//!   6.9 the depot is sized by the workload, not by a constant: it takes every full magazine (up
//!   to [`DEPOT_MAX`], a bound on its memory), and shrinks back by one magazine per
//!   [`DEPOT_TRIM`] while it holds more than one per CPU slot, checked when a magazine is pushed
//!   (Linux runs a timer for it: one per 100 ms, above the
//!   number of online CPUs), so a burst of frees is served back from the cache instead of
//!   going through the tree twice. A miss falls back to the tree; on exhaustion all caches are
//!   flushed and the allocation retried once.
//! - **Checked frees**: every live allocation is recorded in the slot of the CPU that made it
//!   (under the lock the fast path takes anyway), so a double free, a free of a never-allocated
//!   IOVA, or a free with the wrong size is a typed error, also on the cached path.
//!
//! A "CPU" is a slot picked by the calling thread's index; slots are padded to their own cache
//! lines, so threads on different slots share nothing on the fast path. Lock order: slot →
//! depot → tree; the tree lock is never held while a slot or depot lock is taken.
#![forbid(unsafe_code)]

mod cache;
mod token;
mod tree;

pub use token::{ForeignToken, IovaStats, IovaView, RetiredIova};

use cache::{CpuCache, Depot, Live, LiveMap, Magazine, Slot, shape};
use tree::Tree;

use crate::addr::{DmaAddr, PAGE_SHIFT, PAGE_SIZE};
use crate::sync::{CachePadded, Mutex, Rank, thread_index};

/// Serial numbers of allocators, so that a retired range names the allocator that retired it.
static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// IOVAs per magazine (Linux: 127, so that a magazine fills 1 KiB with its count).
#[cfg(not(loom))]
pub const MAG_SIZE: usize = 127;
/// IOVAs per magazine (tiny under loom, so models reach the depot).
#[cfg(loom)]
pub const MAG_SIZE: usize = 2;
/// Most full magazines the shared depot keeps per order (a bound on its memory: 4096 magazines
/// of 1 KiB, 520192 IOVAs); beyond it a magazine's IOVAs go back to the tree.
#[cfg(not(loom))]
pub const DEPOT_MAX: usize = 4096;
/// Most full magazines the shared depot keeps per order (one under loom, so that models reach
/// the overflow to the tree).
#[cfg(loom)]
pub const DEPOT_MAX: usize = 1;
/// How often a depot above its floor (one magazine per CPU slot) gives one magazine back to the
/// tree.
pub const DEPOT_TRIM: std::time::Duration = std::time::Duration::from_millis(100);
/// Orders 0..CACHED_ORDERS (1 to 32 pages) are served by the per-CPU caches.
pub const CACHED_ORDERS: usize = 6;
/// Most per-CPU cache slots an allocator keeps (more are pointless and cost memory).
pub const MAX_SLOTS: usize = 1024;
/// Largest alignment given to big allocations, in pages (2 MiB).
const MAX_ALIGN_PAGES: u64 = 512;

/// Errors of the IOVA allocator. A failed call changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IovaError {
    /// A zero-byte request.
    #[error("zero-size IOVA request")]
    ZeroSize,
    /// The size, once rounded, does not fit in the address space.
    #[error("IOVA size {size:#x} overflows")]
    SizeOverflow {
        /// The size asked for.
        size: u64,
    },
    /// No free range of the size (after flushing the caches and retrying).
    #[error("IOVA space exhausted: no free range of {size:#x} bytes below {limit}")]
    Exhausted {
        /// The rounded size.
        size: u64,
        /// The highest address the range could end at.
        limit: DmaAddr,
    },
    /// An address that is not page aligned.
    #[error("{addr} is not page aligned")]
    Unaligned {
        /// The address given.
        addr: DmaAddr,
    },
    /// A range outside the aperture.
    #[error("[{addr}, +{size:#x}) is outside the aperture")]
    OutsideAperture {
        /// Start.
        addr: DmaAddr,
        /// Size.
        size: u64,
    },
    /// Freeing a range that is not allocated (double free, or never allocated).
    #[error("{addr} (+{size:#x}) is not an allocated IOVA range (double free?)")]
    NotAllocated {
        /// Start.
        addr: DmaAddr,
        /// Size given.
        size: u64,
    },
    /// Freeing with a tag other than the allocation's (another user's allocation, or a tagged
    /// one through the plain API): nothing changes.
    #[error("{addr} was allocated with another tag ({found:?})")]
    TagMismatch {
        /// Start.
        addr: DmaAddr,
        /// The allocation's tag.
        found: IovaTag,
    },
    /// Freeing with a size other than the one allocated.
    #[error("{addr} was allocated with {allocated:#x} bytes, freed with {given:#x}")]
    SizeMismatch {
        /// Start.
        addr: DmaAddr,
        /// Rounded size of the allocation.
        allocated: u64,
        /// Rounded size of the free.
        given: u64,
    },
    /// Reserving a range that is not wholly free.
    #[error("[{addr}, +{size:#x}) is not free and cannot be reserved")]
    NotFree {
        /// Start.
        addr: DmaAddr,
        /// Size.
        size: u64,
    },
}

/// An opaque tag a user of the allocator attaches to an allocation (the DMA layer records who
/// mapped it, how, in which direction and with which exact size: Linux's dma-debug entry), kept
/// in the live record itself so checking it costs no extra lookup. [`IovaTag::NONE`] is what
/// untagged allocations carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IovaTag(pub u64, pub u64);

impl IovaTag {
    /// The tag of plain, untagged allocations.
    pub const NONE: IovaTag = IovaTag(0, 0);
}

/// The IOVA allocator of one domain.
///
/// ```
/// use vmbind::addr::DmaAddr;
/// use vmbind::iommu::iova::IovaAllocator;
/// let a = IovaAllocator::new(DmaAddr::new(0x1000), DmaAddr::new(1 << 32)).unwrap();
/// let x = a.alloc(3 * 4096).unwrap(); // rounded up to 4 pages, aligned to 16 KiB
/// assert_eq!(x.as_u64() % (4 * 4096), 0);
/// assert_eq!(x.as_u64(), (1 << 32) - 4 * 4096); // top-down
/// a.free(x, 3 * 4096).unwrap();
/// assert!(a.free(x, 3 * 4096).is_err()); // double free
/// ```
#[derive(Debug)]
pub struct IovaAllocator {
    start_pfn: u64,
    end_pfn: u64,
    tree: Mutex<Tree>,
    slots: Box<[CachePadded<Mutex<Slot>>]>,
    depot: Vec<CachePadded<Mutex<Depot>>>,
    /// Unique among the allocators of the process: the owner mark of its retired ranges.
    serial: u64,
}

impl IovaAllocator {
    /// An allocator over `[start, end)` (page aligned, `start > 0`: address 0 is never handed
    /// out), with one cache slot per expected CPU.
    ///
    /// # Errors
    /// [`IovaError::Unaligned`] for unaligned bounds, [`IovaError::OutsideAperture`] for an empty
    /// or inverted range or a zero start.
    pub fn new(start: DmaAddr, end: DmaAddr) -> Result<Self, IovaError> {
        let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
        Self::with_slots(start, end, (2 * cpus).next_power_of_two().max(4))
    }

    /// As [`IovaAllocator::new`] with an explicit number of per-CPU cache slots (clamped to
    /// 1..=[`MAX_SLOTS`], then rounded up to a power of two).
    ///
    /// # Errors
    /// As [`IovaAllocator::new`].
    pub fn with_slots(start: DmaAddr, end: DmaAddr, slots: usize) -> Result<Self, IovaError> {
        for a in [start, end] {
            if !a.is_aligned(PAGE_SIZE) {
                return Err(IovaError::Unaligned { addr: a });
            }
        }
        if start.as_u64() == 0 || end <= start {
            let size = end.as_u64().saturating_sub(start.as_u64());
            return Err(IovaError::OutsideAperture { addr: start, size });
        }
        let (s, e) = (start.as_u64() >> PAGE_SHIFT, end.as_u64() >> PAGE_SHIFT);
        let mut tree = Tree::new();
        tree.insert(s, e);
        let slot = || {
            let caches = (0..CACHED_ORDERS)
                .map(|_| CpuCache { loaded: Magazine::empty(), prev: Magazine::empty() })
                .collect();
            CachePadded(Mutex::new(Slot { caches, live: LiveMap::default() }, Rank::IovaSlot))
        };
        Ok(IovaAllocator {
            start_pfn: s,
            end_pfn: e,
            tree: Mutex::new(tree, Rank::IovaTree),
            serial: SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            // A power of two, so that picking a slot is a mask, not a division.
            slots: (0..slots.clamp(1, MAX_SLOTS).next_power_of_two()).map(|_| slot()).collect(),
            depot: (0..CACHED_ORDERS)
                .map(|_| CachePadded(Mutex::new(Depot::default(), Rank::IovaDepot)))
                .collect(),
        })
    }

    /// First address of the aperture.
    #[must_use]
    pub fn start(&self) -> DmaAddr {
        DmaAddr::new(self.start_pfn << PAGE_SHIFT)
    }

    /// One past the last address of the aperture.
    #[must_use]
    pub fn end(&self) -> DmaAddr {
        DmaAddr::new(self.end_pfn << PAGE_SHIFT)
    }

    #[inline]
    fn slot_index(&self) -> usize {
        thread_index() & (self.slots.len() - 1)
    }

    #[inline]
    fn my_slot(&self) -> &Mutex<Slot> {
        &self.slots[self.slot_index()]
    }

    fn pages_of(size: u64) -> Result<u64, IovaError> {
        if size == 0 {
            return Err(IovaError::ZeroSize);
        }
        let pages = size.div_ceil(PAGE_SIZE);
        // Rounded sizes must still be expressible in bytes.
        match shape(pages).0.checked_mul(PAGE_SIZE) {
            Some(_) => Ok(pages),
            None => Err(IovaError::SizeOverflow { size }),
        }
    }

    /// The size an allocation of `size` bytes really takes (the rounding rule), in bytes.
    ///
    /// # Errors
    /// [`IovaError::ZeroSize`], [`IovaError::SizeOverflow`].
    pub fn rounded_size(size: u64) -> Result<u64, IovaError> {
        Ok(shape(Self::pages_of(size)?).0 * PAGE_SIZE)
    }

    /// Allocates `size` bytes of IOVA, top-down in the aperture.
    ///
    /// # Errors
    /// [`IovaError::ZeroSize`], [`IovaError::SizeOverflow`], [`IovaError::Exhausted`].
    pub fn alloc(&self, size: u64) -> Result<DmaAddr, IovaError> {
        self.alloc_below(size, self.end())
    }

    /// Allocates `size` bytes of IOVA that end at or below `limit` (a device's DMA mask + 1).
    ///
    /// # Errors
    /// As [`IovaAllocator::alloc`].
    pub fn alloc_below(&self, size: u64, limit: DmaAddr) -> Result<DmaAddr, IovaError> {
        self.alloc_tagged(size, limit, IovaTag::NONE)
    }

    /// [`IovaAllocator::alloc_below`] recording `tag` with the allocation: a free must then
    /// present the same tag ([`IovaAllocator::retire_tagged`]).
    ///
    /// # Errors
    /// As [`IovaAllocator::alloc`].
    pub fn alloc_tagged(&self, size: u64, limit: DmaAddr, tag: IovaTag) -> Result<DmaAddr, IovaError> {
        let pages = Self::pages_of(size)?;
        let (need, align, order) = shape(pages);
        let limit_pfn = (limit.as_u64() >> PAGE_SHIFT).min(self.end_pfn);
        if let Some(o) = order {
            let mut slot = self.my_slot().lock();
            if let Some(pfn) = self.cache_get(&mut slot, o, need, limit_pfn) {
                slot.live.insert(pfn, Live { pages: need, tag });
                return Ok(DmaAddr::new(pfn << PAGE_SHIFT));
            }
        }
        let got = self.tree.lock().alloc(need, align, limit_pfn);
        let pfn = match got {
            Some(p) => p,
            None => {
                // Exhausted: give every cached IOVA back to the tree and try once more.
                self.flush_caches();
                self.tree.lock().alloc(need, align, limit_pfn).ok_or(IovaError::Exhausted {
                    size: need * PAGE_SIZE,
                    limit: DmaAddr::new(limit_pfn << PAGE_SHIFT),
                })?
            }
        };
        self.my_slot().lock().live.insert(pfn, Live { pages: need, tag });
        Ok(DmaAddr::new(pfn << PAGE_SHIFT))
    }

    fn cache_get(&self, slot: &mut Slot, order: usize, need: u64, limit: u64) -> Option<u64> {
        let c = &mut slot.caches[order];
        if let Some(p) = c.loaded.pop(need, limit) {
            return Some(p);
        }
        if let Some(p) = c.prev.pop(need, limit) {
            core::mem::swap(&mut c.loaded, &mut c.prev);
            return Some(p);
        }
        if c.loaded.len > 0 || c.prev.len > 0 {
            // Entries, but none below the limit: a miss (as Linux does), the tree serves it.
            return None;
        }
        c.loaded = self.depot[order].lock().mags.pop()?;
        c.loaded.pop(need, limit)
    }

    fn check_free(&self, addr: DmaAddr, size: u64) -> Result<(u64, u64, Option<usize>), IovaError> {
        if !addr.is_aligned(PAGE_SIZE) {
            return Err(IovaError::Unaligned { addr });
        }
        let (need, _, order) = shape(Self::pages_of(size)?);
        let pfn = addr.as_u64() >> PAGE_SHIFT;
        if pfn < self.start_pfn || pfn.checked_add(need).is_none_or(|e| e > self.end_pfn) {
            return Err(IovaError::OutsideAperture { addr, size });
        }
        Ok((pfn, need, order))
    }

    /// Checks a live record against a free: the tag first (it carries the exact size for its
    /// owner), then the rounded size.
    fn judge(addr: DmaAddr, live: Live, need: u64, tag: IovaTag) -> Result<(), IovaError> {
        if live.tag != tag {
            return Err(IovaError::TagMismatch { addr, found: live.tag });
        }
        if live.pages != need {
            return Err(IovaError::SizeMismatch {
                addr,
                allocated: live.pages * PAGE_SIZE,
                given: need * PAGE_SIZE,
            });
        }
        Ok(())
    }

    /// Removes the live record of `pfn` (looking in the caller's slot first), checking the tag
    /// and size; a refused free leaves the record in place.
    fn take_live<'a>(
        &'a self,
        addr: DmaAddr,
        pfn: u64,
        need: u64,
        tag: IovaTag,
    ) -> Result<crate::sync::MutexGuard<'a, Slot>, IovaError> {
        let mine = self.slot_index();
        let mut slot = self.slots[mine].lock();
        match slot.live.get(pfn) {
            Some(live) => {
                Self::judge(addr, live, need, tag)?;
                slot.live.remove(pfn);
                Ok(slot)
            }
            None => {
                drop(slot);
                self.take_live_elsewhere(mine, addr, pfn, need, tag)?;
                Ok(self.slots[mine].lock())
            }
        }
    }

    fn put(&self, mut slot: crate::sync::MutexGuard<'_, Slot>, pfn: u64, need: u64, order: Option<usize>) {
        match order {
            Some(o) => self.cache_put(&mut slot, o, pfn),
            None => {
                drop(slot);
                let ok = self.tree.lock().free(pfn, need);
                debug_assert!(ok, "a live range cannot overlap a free one");
            }
        }
    }

    /// Frees an allocation made by this allocator, with the size it was allocated with (any
    /// size that rounds the same way).
    ///
    /// # Errors
    /// [`IovaError::Unaligned`], [`IovaError::ZeroSize`], [`IovaError::OutsideAperture`];
    /// [`IovaError::NotAllocated`] for a double free or an IOVA never allocated;
    /// [`IovaError::SizeMismatch`] for the wrong size. Nothing changes on error.
    pub fn free(&self, addr: DmaAddr, size: u64) -> Result<(), IovaError> {
        let (pfn, need, order) = self.check_free(addr, size)?;
        let slot = self.take_live(addr, pfn, need, IovaTag::NONE)?;
        self.put(slot, pfn, need, order);
        Ok(())
    }

    /// The first half of a deferred free (lazy invalidation): validates and ends the allocation
    /// now — a second free of it is an error from here on — but the range is not reusable until
    /// [`IovaAllocator::release`] is called with the returned token, after the IOTLB flush.
    ///
    /// # Errors
    /// As [`IovaAllocator::free`].
    pub fn retire(&self, addr: DmaAddr, size: u64) -> Result<RetiredIova, IovaError> {
        self.retire_tagged(addr, size, IovaTag::NONE)
    }

    /// [`IovaAllocator::retire`] of an allocation made with [`IovaAllocator::alloc_tagged`]:
    /// `tag` must be the allocation's.
    ///
    /// # Errors
    /// As [`IovaAllocator::free`], and [`IovaError::TagMismatch`] (carrying the allocation's
    /// tag) when the tags differ; nothing changes on error.
    pub fn retire_tagged(&self, addr: DmaAddr, size: u64, tag: IovaTag) -> Result<RetiredIova, IovaError> {
        let (pfn, need, order) = self.check_free(addr, size)?;
        drop(self.take_live(addr, pfn, need, tag)?);
        Ok(RetiredIova { pfn, pages: need, order, owner: self.serial })
    }

    /// Whether `r` was retired by this allocator.
    #[must_use]
    pub fn owns(&self, r: &RetiredIova) -> bool {
        r.owner == self.serial
    }

    /// Makes a retired range reusable. The token is consumed: a range is released once.
    ///
    /// # Errors
    /// [`ForeignToken`] when the token was retired by another allocator; it is handed back and
    /// nothing changes in either.
    pub fn release(&self, r: RetiredIova) -> Result<(), ForeignToken> {
        if !self.owns(&r) {
            return Err(ForeignToken { token: r });
        }
        let slot = self.my_slot().lock();
        self.put(slot, r.pfn, r.pages, r.order);
        Ok(())
    }

    /// A read-only view (counts, free ranges), what an owner that pairs allocation with mapping
    /// hands out.
    #[must_use]
    pub fn view(&self) -> IovaView<'_> {
        IovaView(self)
    }

    /// Finds and removes a live record made on another CPU slot (a free on another thread).
    fn take_live_elsewhere(
        &self,
        mine: usize,
        addr: DmaAddr,
        pfn: u64,
        need: u64,
        tag: IovaTag,
    ) -> Result<(), IovaError> {
        for (i, s) in self.slots.iter().enumerate() {
            if i == mine {
                continue;
            }
            let mut s = s.lock();
            if let Some(live) = s.live.get(pfn) {
                Self::judge(addr, live, need, tag)?;
                s.live.remove(pfn);
                return Ok(());
            }
        }
        Err(IovaError::NotAllocated { addr, size: need * PAGE_SIZE })
    }

    /// The tag and rounded size (bytes) of the live allocation starting at `addr`, if any.
    #[must_use]
    pub fn live_tag(&self, addr: DmaAddr) -> Option<(IovaTag, u64)> {
        let pfn = addr.as_u64() >> PAGE_SHIFT;
        let mine = self.slot_index();
        let order = core::iter::once(mine).chain((0..self.slots.len()).filter(|&i| i != mine));
        for i in order {
            if let Some(l) = self.slots[i].lock().live.get(pfn) {
                return Some((l.tag, l.pages * PAGE_SIZE));
            }
        }
        None
    }

    fn cache_put(&self, slot: &mut Slot, order: usize, pfn: u64) {
        let c = &mut slot.caches[order];
        if !c.loaded.is_full() {
            c.loaded.push(pfn);
            return;
        }
        if !c.prev.is_full() {
            core::mem::swap(&mut c.loaded, &mut c.prev);
            c.loaded.push(pfn);
            return;
        }
        // Both full: the loaded magazine goes to the depot, or back to the tree.
        let full = core::mem::replace(&mut c.loaded, Magazine::empty());
        let back = {
            let mut d = self.depot[order].lock();
            if d.mags.len() < DEPOT_MAX {
                d.mags.push(full);
                d.trim(self.slots.len())
            } else {
                Some(full)
            }
        };
        c.loaded.push(pfn);
        if let Some(m) = back {
            let mut t = self.tree.lock();
            for &p in &m.pfns[..m.len] {
                t.free(p, 1 << order);
            }
        }
    }

    /// Returns every cached IOVA (all CPU slots and the depot) to the tree.
    pub fn flush_caches(&self) {
        let mut back: Vec<(u64, u64)> = Vec::new();
        for s in self.slots.iter() {
            let mut s = s.lock();
            for (o, c) in s.caches.iter_mut().enumerate() {
                for m in [&mut c.loaded, &mut c.prev] {
                    back.extend(m.pfns[..m.len].iter().map(|&p| (p, 1u64 << o)));
                    m.len = 0;
                }
            }
        }
        for (o, d) in self.depot.iter().enumerate() {
            for m in d.lock().mags.drain(..) {
                back.extend(m.pfns[..m.len].iter().map(|&p| (p, 1u64 << o)));
            }
        }
        let mut t = self.tree.lock();
        for (p, n) in back {
            t.free(p, n);
        }
    }

    /// Takes `[addr, addr + size)` out of use (e.g. an MSI window), like Linux `reserve_iova`.
    ///
    /// # Errors
    /// [`IovaError::Unaligned`], [`IovaError::ZeroSize`], [`IovaError::OutsideAperture`],
    /// [`IovaError::NotFree`] when part of it is allocated or already reserved.
    pub fn reserve(&self, addr: DmaAddr, size: u64) -> Result<(), IovaError> {
        if !addr.is_aligned(PAGE_SIZE) {
            return Err(IovaError::Unaligned { addr });
        }
        let pages = Self::pages_of(size)?;
        let pfn = addr.as_u64() >> PAGE_SHIFT;
        if pfn < self.start_pfn || pfn.checked_add(pages).is_none_or(|e| e > self.end_pfn) {
            return Err(IovaError::OutsideAperture { addr, size });
        }
        self.flush_caches();
        if self.tree.lock().reserve(pfn, pages) { Ok(()) } else { Err(IovaError::NotFree { addr, size }) }
    }

    /// Whether `[addr, +size)`'s start is a live allocation (of any size).
    #[must_use]
    pub fn is_allocated(&self, addr: DmaAddr) -> bool {
        let pfn = addr.as_u64() >> PAGE_SHIFT;
        self.slots.iter().any(|s| s.lock().live.contains(pfn))
    }

    /// The tree's free ranges in address order, as (start, length in bytes). Cached IOVAs are
    /// not in it until [`IovaAllocator::flush_caches`].
    #[must_use]
    pub fn free_ranges(&self) -> Vec<(DmaAddr, u64)> {
        let t = self.tree.lock();
        let mut v = Vec::new();
        t.ranges(t.root, &mut v);
        v.into_iter().map(|(s, e)| (DmaAddr::new(s << PAGE_SHIFT), (e - s) << PAGE_SHIFT)).collect()
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> IovaStats {
        let mut live = 0;
        let mut cached = 0;
        for s in self.slots.iter() {
            let s = s.lock();
            live += s.live.len();
            cached += s.caches.iter().map(|c| c.loaded.len + c.prev.len).sum::<usize>();
        }
        for d in &self.depot {
            cached += d.lock().mags.iter().map(|m| m.len).sum::<usize>();
        }
        let t = self.tree.lock();
        IovaStats { live, tree_free_pages: t.free_pages, tree_ranges: t.n.len() - t.spare.len(), cached }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_follow_the_linux_rounding_rule() {
        assert_eq!(shape(1), (1, 1, Some(0)));
        assert_eq!(shape(3), (4, 4, Some(2)));
        assert_eq!(shape(17), (32, 32, Some(5)));
        assert_eq!(shape(32), (32, 32, Some(5)));
        assert_eq!(shape(33), (33, 64, None));
        assert_eq!(shape(5000), (5000, 512, None));
    }
}
