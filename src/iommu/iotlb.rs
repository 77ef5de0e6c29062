//! The IOTLB: a direct-mapped cache of 4 KiB translations shared by all domains of an IOMMU and
//! tagged by domain id, like VT-d's domain-tagged IOTLB. Entries are indexed by page number, so a
//! device streaming through neighbouring pages stays within a few cache lines.
//!
//! An entry is one 64-bit word holding the tag (domain id and the high page-number bits that the
//! index does not imply), the physical page and the permissions, so a lookup is a single load and
//! one compare, with no lock and no way to see a torn entry. Invalidations clear an entry by
//! compare-and-swap: by range (page by page when short, a sweep when long), by domain, and
//! globally; a domain that has never been filled costs nothing to invalidate.
//!
//! Fills come two ways. Under the domain's invalidation lock (shared) a fill is one store. Without
//! any lock, a fill first *reserves* the slot with a pending marker unique to this fill (an entry
//! no lookup can use) and a full fence, then walks the table, then *commits* by compare-and-swap
//! of its marker to the entry. Every invalidation fences after its table update and clears pending
//! markers wherever it sweeps, so either the walk already saw the update or the invalidation saw
//! the marker and cleared it, and then the commit fails. A committed entry was therefore valid
//! when the walk read it and has not been invalidated since; no stale entry is ever usable, not
//! even for a moment.
#![forbid(unsafe_code)]

use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};

use crate::addr::{DmaAddr, PAGE_SHIFT, PhysAddr};
use crate::pt::Prot;

/// Entries of the IOTLB (8 bytes each: 2 MiB, reaching 1 GiB of 4 KiB pages: a whole GPU
/// buffer or a small VM's memory stays cached).
pub const IOTLB_ENTRIES: usize = 1 << INDEX_BITS;

/// May-hold flags: one per domain id (a handful under loom, whose models use ids 1 and 2).
#[cfg(not(loom))]
const FILLED_FLAGS: usize = 1 << 16;
#[cfg(loom)]
const FILLED_FLAGS: usize = 4;

/// The largest domain id an entry can carry.
pub const MAX_DOMAIN_ID: u16 = u16::MAX;

/// The IOVA width the tag covers (the IOMMU's apertures are at most this wide).
pub const IOVA_BITS: u32 = 48;

/// Physical pages at or above this address are not cached (they are translated by a walk
/// every time): the entry has 28 bits for the page number, which covers arenas up to 1 TiB.
pub const PA_LIMIT: u64 = 1 << (PAGE_SHIFT + PPN_BITS);

#[cfg(not(loom))]
const INDEX_BITS: u32 = 18;
/// Under loom the cache is tiny (models create every atomic), and the freed tag bits go to
/// the page number.
#[cfg(loom)]
const INDEX_BITS: u32 = 3;
const DOMAIN_BITS: u32 = 16;
/// What the word has left for the physical page number: 28 bits (arenas up to 1 TiB).
const PPN_BITS: u32 = 64 - 2 - DOMAIN_BITS - (IOVA_BITS - PAGE_SHIFT - INDEX_BITS);
// Word layout: bits 0..2 prot (1 read, 2 write), 2..30 physical page number, 30..48 the page
// number bits above the index (IOVA bits 30..48), 48..64 the domain id (never 0, so 0 is empty).
const PPN_SHIFT: u32 = 2;
const HI_SHIFT: u32 = PPN_SHIFT + PPN_BITS;
const DOMAIN_SHIFT: u32 = 64 - DOMAIN_BITS;
const TAG_MASK: u64 = !((1 << HI_SHIFT) - 1);
const PPN_MASK: u64 = ((1 << PPN_BITS) - 1) << PPN_SHIFT;
const EMPTY: u64 = 0;
const _: () = assert!(HI_SHIFT + (IOVA_BITS - PAGE_SHIFT - INDEX_BITS) == DOMAIN_SHIFT);
const _: () = assert!(DOMAIN_BITS == u16::BITS);

/// The slot of page `pfn` of `domain`: indexed like a hardware TLB set, by the low page-number
/// bits, so that neighbouring pages share cache lines (eight entries per line), offset per domain
/// by an odd multiplier so that two domains' identical IOVAs land apart. Masked to the array
/// length: no bounds check.
#[inline(always)]
fn index(domain: u16, pfn: u64) -> usize {
    (pfn.wrapping_add(u64::from(domain).wrapping_mul(DOMAIN_STEP)) as usize) & (IOTLB_ENTRIES - 1)
}

/// The per-domain offset of the index (odd, so consecutive ids spread over the whole array).
const DOMAIN_STEP: u64 = (0x9E37_79B9_7F4A_7C15 >> 20) | 1;

/// The tag bits of the entry for page `pfn` of `domain`. Exact: with the slot index, which
/// fixes the low bits of `pfn - domain * DOMAIN_STEP`, it names one (domain, page) pair.
#[inline(always)]
fn tag(domain: u16, pfn: u64) -> u64 {
    (u64::from(domain) << DOMAIN_SHIFT) | ((pfn >> INDEX_BITS) << HI_SHIFT)
}

/// Whether `e` is a fill's pending marker: domain field 0 (no real entry has it), nonzero.
#[inline]
fn is_pending(e: u64) -> bool {
    e != EMPTY && e >> DOMAIN_SHIFT == 0
}

/// A pending marker no other fill has used: a per-thread counter inside blocks handed out by a
/// global counter, in bits 2..48 (domain field 0, prot 0), never 0. Markers wrap after 2^46
/// fills, far beyond the life of one reservation.
fn next_marker() -> u64 {
    use std::cell::Cell;
    const BLOCK: u64 = 1 << 20;
    const MARKERS: u64 = 1 << (DOMAIN_SHIFT - PPN_SHIFT);
    // A plain counter (not modelled under loom): it only makes markers unique.
    static BLOCKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    thread_local!(static NEXT: Cell<(u64, u64)> = const { Cell::new((0, 0)) });
    NEXT.with(|c| {
        let (mut next, mut end) = c.get();
        if next == end {
            next = (BLOCKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) * BLOCK) % MARKERS;
            end = next + BLOCK;
        }
        c.set((next + 1, end));
        (next + 1) << PPN_SHIFT
    })
}

/// A slot reserved by a lock-free fill: see [`Iotlb::reserve`].
#[derive(Debug)]
#[must_use = "a reservation is committed or cancelled"]
pub(crate) struct Reservation {
    domain: u16,
    pfn: u64,
    marker: u64,
}

/// The (domain, page number) an occupied entry in slot `idx` caches.
fn decode(idx: usize, e: u64) -> (u16, u64) {
    let domain = (e >> DOMAIN_SHIFT) as u16;
    let hi = (e & ((1 << DOMAIN_SHIFT) - 1)) >> HI_SHIFT;
    let lo =
        (idx as u64).wrapping_sub(u64::from(domain).wrapping_mul(DOMAIN_STEP)) & (IOTLB_ENTRIES as u64 - 1);
    (domain, (hi << INDEX_BITS) | lo)
}

/// The entry array.
pub(crate) type Entries = [AtomicU64; IOTLB_ENTRIES];

/// The bits of a [`domain_key`] that hold the domain id, where an entry's tag holds it.
pub(crate) const KEY_DOMAIN: u64 = !((1 << DOMAIN_SHIFT) - 1);
/// The bits of a [`domain_key`] that hold the domain's index offset.
pub(crate) const KEY_OFFSET: u64 = IOTLB_ENTRIES as u64 - 1;
/// IOVA bits 30..48: the page-number bits above the index, already where the tag holds them.
const IOVA_HI: u64 = ((1 << IOVA_BITS) - 1) & TAG_MASK;

/// A domain's lookup key, what a device attached to it carries: the id in [`KEY_DOMAIN`] (where
/// the entry tag holds it) and the index offset in [`KEY_OFFSET`]. The bits between are free for
/// the holder's use; lookups ignore them.
#[must_use]
pub(crate) fn domain_key(domain: u16) -> u64 {
    (u64::from(domain) << DOMAIN_SHIFT) | (u64::from(domain).wrapping_mul(DOMAIN_STEP) & KEY_OFFSET)
}

/// Looks IOVA `a` up with a [`domain_key`]: the physical page address and the prot bits
/// (1 read, 2 write). A key whose domain field is 0 (no translated domain) finds nothing usable:
/// it can match only an empty entry or a pending marker, whose prot bits are 0.
#[inline(always)]
pub(crate) fn lookup_key(entries: &Entries, key: u64, a: u64) -> Option<(u64, u8)> {
    // The key's bits above the offset only carry out of the masked index.
    let e =
        entries[((a >> PAGE_SHIFT).wrapping_add(key) as usize) & (IOTLB_ENTRIES - 1)].load(Ordering::Relaxed);
    if e & TAG_MASK != (key & KEY_DOMAIN) | (a & IOVA_HI) || a >> IOVA_BITS != 0 {
        return None;
    }
    Some(((e & PPN_MASK) << (PAGE_SHIFT - PPN_SHIFT), (e & 3) as u8))
}

/// Looks `pfn` of `domain` up in an entry array (see [`Iotlb::lookup`]).
#[inline]
fn lookup_in(entries: &Entries, domain: u16, pfn: u64) -> Option<(u64, u8)> {
    let e = entries[index(domain, pfn)].load(Ordering::Acquire);
    if domain == 0 || e & TAG_MASK != tag(domain, pfn) {
        return None;
    }
    Some(((e & PPN_MASK) << (PAGE_SHIFT - PPN_SHIFT), (e & 3) as u8))
}

/// A direct-mapped, domain-tagged translation cache of [`IOTLB_ENTRIES`] entries.
///
/// Outside the crate it can be looked at, never changed: fills, reservations, commits and
/// invalidations are crate-private (the IOMMU pairs them with its table updates).
///
/// ```compile_fail
/// # use std::sync::Arc;
/// # use vmbind::{addr::DmaAddr, iommu::Iommu, mem::PhysMem};
/// let iommu = Iommu::new(Arc::new(PhysMem::new(1 << 20).unwrap()));
/// let r = iommu.iotlb().reserve(1, DmaAddr::new(0x1000)); // a lock-free fill's reservation
/// ```
///
/// ```compile_fail
/// # use std::sync::Arc;
/// # use vmbind::{addr::DmaAddr, iommu::Iommu, mem::PhysMem};
/// let iommu = Iommu::new(Arc::new(PhysMem::new(1 << 20).unwrap()));
/// iommu.iotlb().invalidate_range(1, DmaAddr::new(0x1000), 4096); // use Iommu::flush_iotlb
/// ```
#[derive(Debug)]
pub struct Iotlb {
    /// Fixed size, so that a masked index needs no bounds check on the hit path.
    entries: Box<Entries>,
    /// Per domain id: whether it may hold entries (set by its first fill, cleared only by
    /// [`Iotlb::forget_domain`]), so that invalidating a domain never filled is free. A fill sets
    /// it before it stores an entry or a marker (a locked fill holds the domain's invalidation
    /// lock shared, which invalidations hold exclusively; an unlocked one sets it before its
    /// fence), and invalidations read it after their fence, so a `false` they see means no fill
    /// of the domain can have walked the table before their update.
    filled: Box<[AtomicBool]>,
    /// Invalidation requests made (range, domain or global), for metrics.
    invalidations: AtomicU64,
}

impl Default for Iotlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Iotlb {
    /// Whether `domain` may hold entries: it has been filled since it was last forgotten.
    #[must_use]
    pub fn may_hold(&self, domain: u16) -> bool {
        self.filled[usize::from(domain) % FILLED_FLAGS].load(Ordering::Acquire)
    }

    /// An empty cache.
    #[must_use]
    pub fn new() -> Self {
        let v: Vec<AtomicU64> = (0..IOTLB_ENTRIES).map(|_| AtomicU64::new(EMPTY)).collect();
        let filled = (0..FILLED_FLAGS).map(|_| AtomicBool::new(false)).collect();
        match v.into_boxed_slice().try_into() {
            Ok(entries) => Iotlb { entries, filled, invalidations: AtomicU64::new(0) },
            Err(_) => unreachable!("the vector has exactly the array length"),
        }
    }

    /// How many invalidations (of a range, a domain, or everything) the IOMMU has sent this
    /// cache so far, each counted once whether or not it found entries to drop.
    #[must_use]
    pub fn invalidations(&self) -> u64 {
        self.invalidations.load(Ordering::Relaxed)
    }

    /// Number of entries.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// The cached translation of the page holding `iova` in `domain`: (physical page address,
    /// prot). Reading the cache is harmless; only the IOMMU changes it.
    #[inline(always)]
    #[must_use]
    pub fn lookup(&self, domain: u16, iova: DmaAddr) -> Option<(PhysAddr, Prot)> {
        let pfn = iova.as_u64() >> PAGE_SHIFT;
        if pfn >> (IOVA_BITS - PAGE_SHIFT) != 0 {
            return None;
        }
        lookup_in(&self.entries, domain, pfn).map(|(pa, p)| (PhysAddr::new(pa), Prot::from_bits_truncate(p)))
    }

    /// The entry array, for holders that look up repeatedly ([`super::DevicePort`]).
    pub(crate) fn entries(&self) -> &Entries {
        &self.entries
    }

    /// Caches a translation (crate-private: only the IOMMU, after a walk of the domain's table,
    /// may plant one). Pages the entry format cannot hold (an IOVA at or above 2^48, a physical page at or above [`PA_LIMIT`]) are
    /// not cached: their accesses keep taking the walk.
    pub(crate) fn insert(&self, domain: u16, iova: DmaAddr, page: PhysAddr, prot: Prot) {
        let (pfn, page_pa) = (iova.as_u64() >> PAGE_SHIFT, page.as_u64() & !((1 << PAGE_SHIFT) - 1));
        if domain == 0 || pfn >> (IOVA_BITS - PAGE_SHIFT) != 0 || page_pa >= PA_LIMIT {
            return;
        }
        self.mark_filled(domain);
        let e = tag(domain, pfn) | ((page_pa >> PAGE_SHIFT) << PPN_SHIFT) | u64::from(prot.bits() & 3);
        self.entries[index(domain, pfn)].store(e, Ordering::Release);
    }

    /// Reserves the slot of page `pfn` of `domain` for a lock-free fill: stores a fresh pending
    /// marker, then fences, so that the caller's table walk, which must come after, either sees
    /// every table update an invalidation fenced before, or that invalidation sees the marker.
    /// `None` when the page cannot be cached (see [`Iotlb::insert`]).
    pub(crate) fn reserve(&self, domain: u16, iova: DmaAddr) -> Option<Reservation> {
        let pfn = iova.as_u64() >> PAGE_SHIFT;
        if domain == 0 || pfn >> (IOVA_BITS - PAGE_SHIFT) != 0 {
            return None;
        }
        self.mark_filled(domain);
        let marker = next_marker();
        self.entries[index(domain, pfn)].store(marker, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        Some(Reservation { domain, pfn, marker })
    }

    /// Completes a lock-free fill with what its walk found: `true` when no invalidation (and no
    /// other fill) touched the slot since [`Iotlb::reserve`], so the walk's answer is still valid
    /// (the entry is then cached, if the page fits the format); `false` when the answer must not
    /// be used.
    pub(crate) fn commit(&self, r: Reservation, page: PhysAddr, prot: Prot) -> bool {
        let page_pa = page.as_u64() & !((1 << PAGE_SHIFT) - 1);
        let e = if page_pa < PA_LIMIT {
            tag(r.domain, r.pfn) | ((page_pa >> PAGE_SHIFT) << PPN_SHIFT) | u64::from(prot.bits() & 3)
        } else {
            EMPTY
        };
        self.slot_of(&r).compare_exchange(r.marker, e, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }

    /// Gives a reservation up (its walk found nothing usable).
    pub(crate) fn cancel(&self, r: Reservation) {
        let _ = self.slot_of(&r).compare_exchange(r.marker, EMPTY, Ordering::AcqRel, Ordering::Relaxed);
    }

    fn slot_of(&self, r: &Reservation) -> &AtomicU64 {
        &self.entries[index(r.domain, r.pfn)]
    }

    /// Sets `domain`'s may-hold flag, before any entry or marker of it is stored.
    fn mark_filled(&self, domain: u16) {
        let flag = &self.filled[usize::from(domain) % FILLED_FLAGS];
        if !flag.load(Ordering::Relaxed) {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// Clears slot `idx` if what it holds satisfies `pred` (given the decoded domain and page),
    /// or is a pending marker (whose fill then fails to commit and retries the slow way).
    fn clear_if(&self, idx: usize, pred: impl Fn(u16, u64) -> bool) {
        let slot = &self.entries[idx];
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            if cur == EMPTY {
                return;
            }
            let (d, pfn) = decode(idx, cur);
            if !is_pending(cur) && !pred(d, pfn) {
                return;
            }
            match slot.compare_exchange(cur, EMPTY, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                // A fill replaced the entry meanwhile: judge the new one.
                Err(now) => cur = now,
            }
        }
    }

    /// Drops the translations of `[iova, iova + len)` in `domain`.
    pub(crate) fn invalidate_range(&self, domain: u16, iova: DmaAddr, len: u64) {
        let iova = iova.as_u64();
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        // Orders the caller's table update before every read below (see `reserve`).
        fence(Ordering::SeqCst);
        if !self.may_hold(domain) {
            return;
        }
        let first = iova >> PAGE_SHIFT;
        let last = iova.saturating_add(len.max(1) - 1) >> PAGE_SHIFT;
        let pages = last - first + 1;
        if pages <= (self.entries.len() as u64) / 4 {
            for pfn in first..=last {
                self.clear_if(index(domain, pfn), |d, p| d == domain && p == pfn);
            }
        } else {
            for idx in 0..self.entries.len() {
                self.clear_if(idx, |d, p| d == domain && (first..=last).contains(&p));
            }
        }
    }

    /// Drops every translation of `domain`.
    pub(crate) fn invalidate_domain(&self, domain: u16) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if !self.may_hold(domain) {
            return;
        }
        for idx in 0..self.entries.len() {
            self.clear_if(idx, |d, _| d == domain);
        }
    }

    /// Drops every translation of `domain` and marks it never filled, for a domain id being
    /// freed. The caller guarantees that no fill of `domain` runs meanwhile or later (the IOMMU
    /// calls it once the domain is out of its table, which fills need).
    pub(crate) fn forget_domain(&self, domain: u16) {
        self.invalidate_domain(domain);
        self.filled[usize::from(domain) % FILLED_FLAGS].store(false, Ordering::Release);
    }

    /// Drops everything.
    pub(crate) fn invalidate_all(&self) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        for idx in 0..self.entries.len() {
            self.clear_if(idx, |_, _| true);
        }
    }

    /// Entries currently holding a translation of `domain` (for tests and dumps), counted by a
    /// sweep.
    #[must_use]
    pub fn count(&self, domain: u16) -> usize {
        self.entries
            .iter()
            .filter(|e| {
                let e = e.load(Ordering::Relaxed);
                e != EMPTY && (e >> DOMAIN_SHIFT) as u16 == domain
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_SIZE;
    use crate::addr::{DmaAddr, PhysAddr};
    use crate::mem::rng::SplitMix64;

    fn va(pfn: u64) -> DmaAddr {
        DmaAddr::new(pfn << PAGE_SHIFT)
    }

    fn lk(t: &Iotlb, d: u16, pfn: u64) -> Option<(u64, Prot)> {
        t.lookup(d, va(pfn)).map(|(p, r)| (p.as_u64(), r))
    }

    #[test]
    fn insert_lookup_and_each_kind_of_invalidation() {
        let t = Iotlb::new();
        t.insert(1, va(5), PhysAddr::new(0x7000), Prot::RW);
        t.insert(2, va(5), PhysAddr::new(0x9000), Prot::READ);
        assert_eq!(lk(&t, 1, 5), Some((0x7000, Prot::RW)));
        assert!(t.may_hold(1) && t.may_hold(2) && !t.may_hold(3));
        assert_eq!(lk(&t, 2, 5), Some((0x9000, Prot::READ)));
        assert_eq!(lk(&t, 1, 6), None);
        t.invalidate_range(1, DmaAddr::new(5 << 12), 4096);
        assert_eq!(lk(&t, 1, 5), None);
        assert!(lk(&t, 2, 5).is_some());
        t.insert(2, va(6), PhysAddr::new(0xa000), Prot::READ);
        t.invalidate_range(2, DmaAddr::new(0), 1 << 40); // long: a sweep
        assert_eq!(t.count(2), 0);
        t.insert(3, va(1), PhysAddr::new(0x1000), Prot::READ);
        t.invalidate_domain(3);
        assert_eq!(lk(&t, 3, 1), None);
        t.insert(4, va(1), PhysAddr::new(0x1000), Prot::READ);
        t.invalidate_all();
        assert_eq!(lk(&t, 4, 1), None);
        t.insert(4, va(1), PhysAddr::new(0x1000), Prot::READ);
        t.forget_domain(4);
        assert_eq!((lk(&t, 4, 1), t.may_hold(4)), (None, false));
    }

    #[test]
    fn eviction_by_another_domain() {
        let t = Iotlb::new();
        t.insert(5, va(9), PhysAddr::new(0x1000), Prot::READ);
        // The page of domain 6 that lands on domain 5's slot.
        let pfn6 = 9u64.wrapping_sub(DOMAIN_STEP) & (IOTLB_ENTRIES as u64 - 1);
        assert_eq!(index(6, pfn6), index(5, 9));
        t.insert(6, va(pfn6), PhysAddr::new(0x2000), Prot::READ);
        assert_eq!((t.count(5), t.count(6)), (0, 1));
        assert_eq!(lk(&t, 5, 9), None);
        // Same slot, same domain, a page 2^17 pages away: a different tag, never a false hit.
        assert_eq!(lk(&t, 6, pfn6 + IOTLB_ENTRIES as u64), None);
    }

    #[test]
    fn key_lookup_agrees_with_id_lookup() {
        let t = Iotlb::new();
        let mut rng = SplitMix64::new(5);
        let mut cached = Vec::new();
        for _ in 0..10_000 {
            let d = 1 + rng.below(8) as u16;
            let pfn = rng.below(1 << (IOVA_BITS - PAGE_SHIFT));
            t.insert(d, va(pfn), PhysAddr::new(rng.below(1 << 20) << PAGE_SHIFT), Prot::READ);
            cached.push((d, pfn));
        }
        for (d, pfn) in cached {
            let a = (pfn << PAGE_SHIFT) | 0x123;
            assert_eq!(lookup_key(t.entries(), domain_key(d), a), lk(&t, d, pfn).map(|(p, r)| (p, r.bits())));
            // Another domain, bits above the aperture, or no domain: nothing usable.
            assert_eq!(lookup_key(t.entries(), domain_key(d + 8), a), None);
            assert_eq!(lookup_key(t.entries(), domain_key(d), a | 1 << 48), None);
            assert!(lookup_key(t.entries(), 0, a).is_none_or(|(_, p)| p == 0));
        }
    }

    #[test]
    fn an_unlocked_fill_commits_only_if_nothing_touched_its_slot() {
        let t = Iotlb::new();
        // Undisturbed: the entry is cached; a marker is never usable meanwhile.
        let r = t.reserve(1, va(7)).unwrap();
        assert_eq!(lk(&t, 1, 7), None);
        assert!(lookup_key(t.entries(), domain_key(1), 7 << PAGE_SHIFT).is_none());
        assert!(lookup_key(t.entries(), 0, 7 << PAGE_SHIFT).is_none_or(|(_, p)| p == 0));
        assert!(t.commit(r, PhysAddr::new(0x5000), Prot::READ));
        assert_eq!(lk(&t, 1, 7), Some((0x5000, Prot::READ)));
        // An invalidation of the page, of its domain, of everything, or of an unrelated range
        // that sweeps, all clear the marker: the commit fails and caches nothing.
        let invalidations: [&dyn Fn(&Iotlb); 4] = [
            &|t| t.invalidate_range(1, DmaAddr::new(8 << PAGE_SHIFT), PAGE_SIZE),
            &|t| t.invalidate_domain(1),
            &|t| t.invalidate_all(),
            &|t| t.invalidate_range(1, DmaAddr::new(1 << 40), 1 << 39),
        ];
        for inv in invalidations {
            let r = t.reserve(1, va(8)).unwrap();
            inv(&t);
            assert!(!t.commit(r, PhysAddr::new(0x6000), Prot::READ));
            assert_eq!(lk(&t, 1, 8), None);
        }
        // A locked fill or another unlocked fill of the slot wins over this one.
        let r = t.reserve(1, va(9)).unwrap();
        t.insert(1, va(9), PhysAddr::new(0x7000), Prot::RW);
        assert!(!t.commit(r, PhysAddr::new(0x8000), Prot::READ));
        assert_eq!(lk(&t, 1, 9), Some((0x7000, Prot::RW)));
        let a = t.reserve(1, va(10)).unwrap();
        let b = t.reserve(1, va(10)).unwrap();
        assert!(!t.commit(a, PhysAddr::new(0x1000), Prot::READ));
        assert!(t.commit(b, PhysAddr::new(0x2000), Prot::READ));
        assert_eq!(lk(&t, 1, 10), Some((0x2000, Prot::READ)));
        // Cancelling leaves the slot empty; a page beyond the format validates but is not cached.
        let r = t.reserve(1, va(11)).unwrap();
        t.cancel(r);
        assert_eq!(t.entries()[index(1, 11)].load(Ordering::Relaxed), EMPTY);
        let r = t.reserve(1, va(12)).unwrap();
        assert!(t.commit(r, PhysAddr::new(PA_LIMIT), Prot::READ));
        assert_eq!(lk(&t, 1, 12), None);
        assert!(t.reserve(0, va(1)).is_none() && t.reserve(1, va(1 << 36)).is_none());
    }

    #[test]
    fn markers_are_distinct_across_threads() {
        let mine: Vec<u64> = (0..1000).map(|_| next_marker()).collect();
        let theirs =
            std::thread::spawn(|| (0..1000).map(|_| next_marker()).collect::<Vec<u64>>()).join().unwrap();
        let all: std::collections::HashSet<u64> = mine.iter().chain(&theirs).copied().collect();
        assert_eq!(all.len(), 2000);
        assert!(all.iter().all(|&m| is_pending(m)));
    }

    #[test]
    fn tags_are_exact_and_decode_back() {
        let mut rng = SplitMix64::new(3);
        for _ in 0..100_000 {
            let d = 1 + rng.below(u64::from(MAX_DOMAIN_ID)) as u16;
            let pfn = rng.below(1 << (IOVA_BITS - PAGE_SHIFT));
            let ppn = rng.below(PA_LIMIT >> PAGE_SHIFT);
            let e = tag(d, pfn) | (ppn << PPN_SHIFT) | 3;
            assert_eq!(decode(index(d, pfn), e), (d, pfn));
            assert_eq!((e & PPN_MASK) << (PAGE_SHIFT - PPN_SHIFT), ppn << PAGE_SHIFT);
        }
    }

    #[test]
    fn translations_the_entry_cannot_hold_are_not_cached() {
        let t = Iotlb::new();
        t.insert(1, va(1), PhysAddr::new(PA_LIMIT), Prot::READ);
        t.insert(1, va(1 << 36), PhysAddr::new(0x1000), Prot::READ);
        t.insert(0, va(1), PhysAddr::new(0x1000), Prot::READ);
        assert_eq!(t.count(1) + t.count(0), 0);
        t.insert(MAX_DOMAIN_ID, va((1 << 36) - 1), PhysAddr::new(PA_LIMIT - 4096), Prot::WRITE);
        assert_eq!(lk(&t, MAX_DOMAIN_ID, (1 << 36) - 1), Some((PA_LIMIT - 4096, Prot::WRITE)));
    }
}

/// Loom models of the lock-free fill against invalidation (`RUSTFLAGS="--cfg loom" cargo test
/// --release --lib loom_`): a fill reserves its slot, walks (one table entry, a loom atomic here
/// standing for the leaf the walk reads), and commits what it read; an unmap clears the entry and
/// invalidates. In no interleaving may a lookup after the invalidation returns see the old
/// translation, whichever invalidation runs.
#[cfg(all(test, loom))]
mod loom_model {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    const IOVA: DmaAddr = DmaAddr::new(5 << PAGE_SHIFT);
    const OLD: u64 = 0x7000;

    fn fill(t: &Iotlb, leaf: &AtomicU64) {
        if let Some(r) = t.reserve(1, IOVA) {
            match leaf.load(Ordering::Acquire) {
                0 => t.cancel(r),
                pa => {
                    let _ = t.commit(r, PhysAddr::new(pa), Prot::RW);
                }
            }
        }
    }

    fn model(invalidate: fn(&Iotlb)) {
        loom::model(move || {
            let t = Arc::new(Iotlb::new());
            let leaf = Arc::new(AtomicU64::new(OLD));
            let device = {
                let (t, leaf) = (t.clone(), leaf.clone());
                thread::spawn(move || fill(&t, &leaf))
            };
            // The unmap: the table update, then the invalidation; afterwards the old
            // translation must be unusable, even while the fill is still running.
            leaf.store(0, Ordering::Release);
            invalidate(&t);
            assert_eq!(t.lookup(1, IOVA), None, "a stale entry right after the invalidation");
            device.join().unwrap();
            assert_eq!(t.lookup(1, IOVA), None, "a stale entry committed after the invalidation");
        });
    }

    #[test]
    fn loom_fill_against_range_invalidation() {
        model(|t| t.invalidate_range(1, IOVA, PAGE_SIZE_4K));
    }

    #[test]
    fn loom_fill_against_domain_invalidation() {
        model(|t| t.invalidate_domain(1));
    }

    #[test]
    fn loom_fill_against_global_invalidation() {
        model(Iotlb::invalidate_all);
    }

    #[test]
    fn loom_a_fill_that_read_the_new_table_may_commit() {
        // Sanity of the model: with no unmap, the fill's commit is found.
        loom::model(|| {
            let t = Iotlb::new();
            let leaf = AtomicU64::new(OLD);
            fill(&t, &leaf);
            assert_eq!(t.lookup(1, IOVA), Some((PhysAddr::new(OLD), Prot::RW)));
        });
    }

    const PAGE_SIZE_4K: u64 = 1 << PAGE_SHIFT;
}
