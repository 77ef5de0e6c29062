//! The IOTLB: a direct-mapped cache of 4 KiB translations shared by all domains of an IOMMU and
//! tagged by domain id, like VT-d's domain-tagged IOTLB. Entries are 16 bytes and indexed by
//! page number, so a device streaming through neighbouring pages stays within a few cache lines.
//!
//! A lookup is two loads of the tag around one load of the value, no lock: a hit is returned only
//! if the tag read before and after the value is the wanted one, so a concurrent invalidation or
//! refill of the slot shows up as a miss, never as a torn entry. Writers claim a slot by
//! compare-and-swap of its tag to a busy marker. Invalidation by range (page by page when short,
//! a sweep when long), by domain, and globally.
#![forbid(unsafe_code)]

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::addr::PAGE_SHIFT;
use crate::pt::Prot;

const BUSY: u64 = 1 << 63;
const EMPTY: u64 = 0;

#[derive(Debug, Default)]
#[repr(C, align(16))]
pub(crate) struct Entry {
    /// `pfn << 16 | domain` (domain ids start at 1, so 0 means empty), or BUSY while written.
    tag: AtomicU64,
    /// Physical page address | prot bits (1 read, 2 write).
    val: AtomicU64,
}

/// Entries of the IOTLB (16 bytes each: 1 MiB), like a large hardware IOTLB.
pub const IOTLB_ENTRIES: usize = 1 << 16;

/// The slot of page `pfn` of `domain`: indexed like a hardware TLB set, by the low page-number
/// bits, so that neighbouring pages share cache lines (four entries per line), offset per domain
/// by an odd multiplier so that two domains' identical IOVAs land apart. A `u16`: no bounds
/// check.
#[inline(always)]
fn index(domain: u16, pfn: u64) -> usize {
    usize::from(pfn.wrapping_add(u64::from(domain).wrapping_mul(0x9E37_79B9_7F4A_7C15 >> 20)) as u16)
}

/// The entry array.
pub(crate) type Entries = [Entry; IOTLB_ENTRIES];

/// Looks `pfn` of `domain` up in an entry array (see [`Iotlb::lookup`]).
#[inline(always)]
pub(crate) fn lookup_in(entries: &Entries, domain: u16, pfn: u64) -> Option<(u64, Prot)> {
    let e = &entries[index(domain, pfn)];
    let want = tag(domain, pfn);
    if e.tag.load(Ordering::Acquire) != want {
        return None;
    }
    let v = e.val.load(Ordering::Acquire);
    if e.tag.load(Ordering::Relaxed) != want {
        return None;
    }
    Some((v & !0xfff, Prot::from_bits_truncate((v & 3) as u8)))
}

/// A direct-mapped, domain-tagged translation cache of [`IOTLB_ENTRIES`] entries.
#[derive(Debug)]
pub struct Iotlb {
    /// Fixed size, so that a 16-bit index needs no bounds check on the hit path.
    entries: Box<[Entry; IOTLB_ENTRIES]>,
    /// Entries held per domain id: an invalidation of a domain holding none is free. Fills run
    /// under the domain's invalidation lock shared and invalidations under it exclusive, so a
    /// zero seen by an invalidation cannot race with a fill of the same domain.
    held: Box<[AtomicU32; 1 << 16]>,
}

#[inline]
fn tag(domain: u16, pfn: u64) -> u64 {
    (pfn << 16) | u64::from(domain)
}

impl Default for Iotlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Iotlb {
    /// Entries the per-domain counter says `domain` holds.
    #[must_use]
    pub fn held(&self, domain: u16) -> usize {
        self.held[usize::from(domain)].load(Ordering::Acquire) as usize
    }

    /// An empty cache.
    #[must_use]
    pub fn new() -> Self {
        let v: Vec<Entry> = (0..IOTLB_ENTRIES).map(|_| Entry::default()).collect();
        let h: Vec<AtomicU32> = (0..1 << 16).map(|_| AtomicU32::new(0)).collect();
        match (v.into_boxed_slice().try_into(), h.into_boxed_slice().try_into()) {
            (Ok(entries), Ok(held)) => Iotlb { entries, held },
            _ => unreachable!("the vectors have exactly the array lengths"),
        }
    }

    /// Number of entries.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Indexed like a hardware TLB set: by the low page-number bits, so that neighbouring pages
    /// share cache lines (four entries per line), offset per domain by an odd multiplier so that
    /// two domains' identical IOVAs land apart.
    #[inline(always)]
    fn slot(&self, domain: u16, pfn: u64) -> &Entry {
        &self.entries[index(domain, pfn)]
    }

    /// The cached translation of page `pfn` in `domain`: (physical page address, prot).
    #[inline(always)]
    pub fn lookup(&self, domain: u16, pfn: u64) -> Option<(u64, Prot)> {
        lookup_in(&self.entries, domain, pfn)
    }

    /// The entry array, for holders that look up repeatedly ([`super::DevicePort`]).
    pub(crate) fn entries(&self) -> &Entries {
        &self.entries
    }

    /// Caches a translation (best effort: a slot being written by someone else is left alone).
    pub fn insert(&self, domain: u16, pfn: u64, page_pa: u64, prot: Prot) {
        let e = self.slot(domain, pfn);
        let cur = e.tag.load(Ordering::Relaxed);
        if cur & BUSY != 0 || e.tag.compare_exchange(cur, BUSY, Ordering::Acquire, Ordering::Relaxed).is_err()
        {
            return;
        }
        if cur != EMPTY {
            self.held[(cur & 0xffff) as usize].fetch_sub(1, Ordering::Relaxed);
        }
        self.held[usize::from(domain)].fetch_add(1, Ordering::Relaxed);
        e.val.store(page_pa | u64::from(prot.bits() & 3), Ordering::Relaxed);
        e.tag.store(tag(domain, pfn), Ordering::Release);
    }

    fn clear_if(&self, e: &Entry, pred: impl Fn(u64) -> bool) {
        loop {
            let cur = e.tag.load(Ordering::Acquire);
            if cur == EMPTY || !pred(cur) {
                return;
            }
            if cur & BUSY != 0 {
                // A writer is mid-fill; the entry it writes may be the one to drop: wait it out.
                std::hint::spin_loop();
                continue;
            }
            if e.tag.compare_exchange(cur, EMPTY, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                self.held[(cur & 0xffff) as usize].fetch_sub(1, Ordering::Relaxed);
                return;
            }
        }
    }

    /// Drops the translations of `[iova, iova + len)` in `domain`.
    pub fn invalidate_range(&self, domain: u16, iova: u64, len: u64) {
        if self.held[usize::from(domain)].load(Ordering::Acquire) == 0 {
            return;
        }
        let first = iova >> PAGE_SHIFT;
        let last = (iova + len.max(1) - 1) >> PAGE_SHIFT;
        let pages = last - first + 1;
        if pages <= (self.entries.len() as u64) / 4 {
            for pfn in first..=last {
                let want = tag(domain, pfn);
                self.clear_if(self.slot(domain, pfn), |t| t == want || t & BUSY != 0);
            }
        } else {
            for e in self.entries.iter() {
                self.clear_if(e, |t| {
                    t & BUSY != 0 || ((t & 0xffff) as u16 == domain && (first..=last).contains(&(t >> 16)))
                });
            }
        }
    }

    /// Drops every translation of `domain`.
    pub fn invalidate_domain(&self, domain: u16) {
        if self.held[usize::from(domain)].load(Ordering::Acquire) == 0 {
            return;
        }
        for e in self.entries.iter() {
            self.clear_if(e, |t| t & BUSY != 0 || (t & 0xffff) as u16 == domain);
        }
    }

    /// Drops everything.
    pub fn invalidate_all(&self) {
        for e in self.entries.iter() {
            self.clear_if(e, |_| true);
        }
    }

    /// Entries currently holding a translation of `domain` (for tests and dumps); counted by a
    /// sweep, so it also checks the per-domain counter ([`Iotlb::held`]).
    #[must_use]
    pub fn count(&self, domain: u16) -> usize {
        self.entries
            .iter()
            .filter(|e| {
                let t = e.tag.load(Ordering::Relaxed);
                t != EMPTY && t & BUSY == 0 && (t & 0xffff) as u16 == domain
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_and_each_kind_of_invalidation() {
        let t = Iotlb::new();
        t.insert(1, 5, 0x7000, Prot::RW);
        t.insert(2, 5, 0x9000, Prot::READ);
        assert_eq!(t.lookup(1, 5), Some((0x7000, Prot::RW)));
        assert_eq!((t.held(1), t.held(2)), (1, 1));
        assert_eq!(t.lookup(2, 5), Some((0x9000, Prot::READ)));
        assert_eq!(t.lookup(1, 6), None);
        t.invalidate_range(1, 5 << 12, 4096);
        assert_eq!(t.lookup(1, 5), None);
        assert!(t.lookup(2, 5).is_some());
        t.insert(2, 6, 0xa000, Prot::READ);
        t.invalidate_range(2, 0, 1 << 40); // long: a sweep
        assert_eq!(t.count(2), 0);
        assert_eq!(t.held(2), 0);
        // Eviction by another domain's fill moves the count: domain 6 at the page that lands on
        // domain 5's slot.
        t.insert(5, 9, 0x1000, Prot::READ);
        let step = 0x9E37_79B9_7F4A_7C15u64 >> 20;
        t.insert(6, 9u64.wrapping_sub(step) & 0xffff, 0x2000, Prot::READ);
        assert_eq!((t.held(5), t.held(6)), (0, 1));
        assert_eq!((t.count(5), t.count(6)), (0, 1));
        t.insert(3, 1, 0x1000, Prot::READ);
        t.invalidate_domain(3);
        assert_eq!(t.lookup(3, 1), None);
        t.insert(4, 1, 0x1000, Prot::READ);
        t.invalidate_all();
        assert_eq!(t.lookup(4, 1), None);
    }
}
