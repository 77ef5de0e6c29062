//! The invalidation gather: what an unmap removed and what a TLB must forget, and the table
//! pages that may be freed only once it has.
#![forbid(unsafe_code)]

use core::marker::PhantomData;
use std::sync::Arc;

use crate::sync::{Mutex, Rank};

use crate::addr::{Address, PageSize, PhysAddr};
use crate::mem::PhysMem;

/// Table pages an unmap emptied whose [`Invalidation`] was dropped without being completed:
/// they stay out of the arena until the table's owner declares a full TLB flush
/// ([`super::PageTable::release_parked`]) or the table itself is dropped.
#[derive(Debug)]
pub(super) struct Parking {
    pub(super) mem: Arc<PhysMem>,
    pub(super) pages: Mutex<Vec<PhysAddr>>,
}

impl Parking {
    pub(super) fn new(mem: Arc<PhysMem>) -> Arc<Self> {
        Arc::new(Parking { mem, pages: Mutex::new(Vec::new(), Rank::Leaf) })
    }

    /// Frees every parked page; returns how many.
    pub(super) fn release(&self) -> usize {
        let pages = core::mem::take(&mut *self.pages.lock());
        // Every frame here was a table page of this table, taken out of the tree under its lock.
        let _ = self.mem.free_frames(&pages);
        pages.len()
    }
}

/// What an unmap removed and what a TLB must now forget, like Linux's `iommu_iotlb_gather`:
/// the span of removed leaves, their sizes, and the table pages that became empty.
///
/// **The emptied table pages go back to the arena only through [`Invalidation::complete`]**,
/// which the caller calls after the TLB flush, so that no walker can follow a freed table into
/// reused memory. An invalidation dropped without `complete()` does not free them behind the
/// TLB's back: it *parks* them on its table, which holds them until its owner calls
/// [`super::PageTable::release_parked`] after a full flush (or until the table is dropped).
/// Nothing leaks and nothing is freed early; [`super::PageTable::parked_tables`] counts them.
#[must_use = "an unmap's invalidation must be flushed, then completed"]
#[derive(Debug)]
pub struct Invalidation<V: Address> {
    /// Where the freed tables go if the invalidation is dropped: set with the first freed table,
    /// so that an unmap that frees none costs no reference count.
    parking: Option<Arc<Parking>>,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) unmapped: u64,
    pub(super) sizes: u8,
    pub(super) freed: Vec<PhysAddr>,
    /// An unmap that keeps tables left at least one of them empty (for [`super::PageTable::reclaim`]).
    pub(super) emptied: bool,
    /// The span of the freed tables (`tstart >= tend` when none).
    tstart: u64,
    tend: u64,
    _va: PhantomData<V>,
}

impl<V: Address> Invalidation<V> {
    pub(super) fn new() -> Self {
        Invalidation {
            parking: None,
            start: u64::MAX,
            end: 0,
            unmapped: 0,
            sizes: 0,
            freed: Vec::new(),
            emptied: false,
            tstart: u64::MAX,
            tend: 0,
            _va: PhantomData,
        }
    }

    /// The invalidation of 4 KiB leaves removed over `[va, va + len)` (`unmapped` bytes of
    /// them; `len == 0` for none) with no table freed: what the one-table unmap returns.
    #[inline]
    pub(super) fn of_leaves(va: u64, len: u64, unmapped: u64) -> Self {
        let none = len == 0;
        Invalidation {
            parking: None,
            start: if none { u64::MAX } else { va },
            end: if none { 0 } else { va + len },
            unmapped,
            sizes: u8::from(!none),
            freed: Vec::new(),
            emptied: false,
            tstart: u64::MAX,
            tend: 0,
            _va: PhantomData,
        }
    }

    /// Widens what must be flushed to `[va, va + len)` (a fragment block a cut went through: a
    /// TLB may hold it as one entry).
    pub(super) fn cover(&mut self, va: u64, len: u64) {
        self.tstart = self.tstart.min(va);
        self.tend = self.tend.max(va + len);
    }

    pub(super) fn add(&mut self, va: u64, len: u64, unmapped: u64, level: u8) {
        self.start = self.start.min(va);
        self.end = self.end.max(va + len);
        self.unmapped += unmapped;
        self.sizes |= 1 << level;
    }

    /// Hands the emptied table page `pa`, spanning `[va, va + len)`, to the invalidation (of a
    /// table whose parked pages go to `parking`).
    pub(super) fn free_table(&mut self, pa: PhysAddr, va: u64, len: u64, parking: &Arc<Parking>) {
        if self.parking.is_none() {
            self.parking = Some(parking.clone());
        }
        self.freed.push(pa);
        self.cover(va, len);
    }

    /// Whether an unmap that keeps emptied tables ([`super::PageTable::unmap_keeping_tables`])
    /// left one empty: then [`super::PageTable::reclaim`] over the range has something to free.
    #[must_use]
    pub fn left_empty_tables(&self) -> bool {
        self.emptied
    }

    /// Bytes that were mapped in the range and are no longer.
    #[must_use]
    pub fn unmapped_bytes(&self) -> u64 {
        self.unmapped
    }

    /// The span of the removed leaves, `(start, length)`: what a TLB of translations must
    /// forget. `None` when nothing was mapped.
    #[must_use]
    pub fn range(&self) -> Option<(V, u64)> {
        (self.start < self.end).then(|| (V::new(self.start), self.end - self.start))
    }

    /// What must be flushed before the freed table pages may be reused: [`Invalidation::range`]
    /// widened to the whole span of every table page this unmap freed (and, in a format with
    /// fragments, of every fragment block the unmap cut). A walker that followed a
    /// table entry before it was cleared may be on its way through a freed table for any address
    /// the table spans (a paging-structure cache, or an IOTLB fill in flight), so that whole span
    /// must be invalidated, not only the removed leaves. Equal to `range()` when no table was
    /// freed.
    #[must_use]
    pub fn flush_range(&self) -> Option<(V, u64)> {
        let (s, e) = (self.start.min(self.tstart), self.end.max(self.tend));
        (s < e).then(|| (V::new(s), e - s))
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

    /// Declares the TLB flushed for [`Invalidation::range`]: the emptied table pages go back to
    /// the arena now.
    pub fn complete(mut self) {
        let pages = core::mem::take(&mut self.freed);
        if let Some(p) = &self.parking {
            // Every frame here was a table page of this table, taken out of the tree under its
            // lock.
            let _ = p.mem.free_frames(&pages);
        }
    }
}

impl<V: Address> Drop for Invalidation<V> {
    fn drop(&mut self) {
        if let Some(p) = &self.parking
            && !self.freed.is_empty()
        {
            // Not completed: the flush may not have happened. Park, never free.
            p.pages.lock().append(&mut self.freed);
        }
    }
}
