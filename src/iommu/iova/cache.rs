//! The per-CPU side of the IOVA allocator: magazines of cached IOVAs, the CPU slots that hold
//! them with the live records, and the rounding rule.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::hash::FastHasher;

use super::{IovaTag, MAG_SIZE, MAX_ALIGN_PAGES};

#[derive(Debug)]
pub(super) struct Magazine {
    pub(super) len: usize,
    pub(super) pfns: [u64; MAG_SIZE],
}

impl Magazine {
    pub(super) fn empty() -> Box<Magazine> {
        Box::new(Magazine { len: 0, pfns: [0; MAG_SIZE] })
    }
    pub(super) fn is_full(&self) -> bool {
        self.len == MAG_SIZE
    }
    pub(super) fn push(&mut self, pfn: u64) {
        self.pfns[self.len] = pfn;
        self.len += 1;
    }
    /// Pops an entry whose block ends at or below `limit` (the last one in the common case).
    pub(super) fn pop(&mut self, pages: u64, limit: u64) -> Option<u64> {
        let k = self.pfns[..self.len].iter().rposition(|&p| p + pages <= limit)?;
        let pfn = self.pfns[k];
        self.len -= 1;
        self.pfns[k] = self.pfns[self.len];
        Some(pfn)
    }
}

/// The full magazines of one order shared by all CPU slots.
#[derive(Debug, Default)]
pub(super) struct Depot {
    /// Boxed, so that magazines move between a CPU slot and the depot by pointer.
    #[allow(clippy::vec_box)]
    pub(super) mags: Vec<Box<Magazine>>,
    /// When the depot last gave a magazine back (or first grew past its floor).
    last_trim: Option<std::time::Instant>,
}

impl Depot {
    /// After a push: the magazine to give back to the tree, if the depot has held more than
    /// `floor` magazines for a whole [`super::DEPOT_TRIM`] since the last one went back.
    pub(super) fn trim(&mut self, floor: usize) -> Option<Box<Magazine>> {
        if self.mags.len() <= floor {
            self.last_trim = None;
            return None;
        }
        let now = std::time::Instant::now();
        match self.last_trim {
            Some(t) if now.duration_since(t) >= super::DEPOT_TRIM => {
                self.last_trim = Some(now);
                // The oldest magazine: its IOVAs have waited longest.
                Some(self.mags.remove(0))
            }
            Some(_) => None,
            None => {
                self.last_trim = Some(now);
                None
            }
        }
    }
}

#[derive(Debug)]
pub(super) struct CpuCache {
    pub(super) loaded: Box<Magazine>,
    pub(super) prev: Box<Magazine>,
}

#[derive(Debug)]
pub(super) struct Slot {
    pub(super) caches: Vec<CpuCache>,
    pub(super) live: LiveMap,
}

/// Rounded size, alignment and cache order of a request of `pages` pages.
pub(super) fn shape(pages: u64) -> (u64, u64, Option<usize>) {
    if pages < 32 {
        let r = pages.next_power_of_two();
        (r, r, Some(r.trailing_zeros() as usize))
    } else if pages == 32 {
        (32, 32, Some(5))
    } else {
        let align = pages.checked_next_power_of_two().unwrap_or(MAX_ALIGN_PAGES).min(MAX_ALIGN_PAGES);
        (pages, align, None)
    }
}

/// A live allocation: its rounded size and its tag.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Live {
    pub(super) pages: u64,
    pub(super) tag: IovaTag,
}

/// Page frames per [`LiveLeaf`] (a 2 MiB stretch of IOVA space).
const LEAF_PFNS: usize = 512;

/// The live records of one 2 MiB stretch of IOVA space, indexed by page.
#[derive(Debug)]
pub(super) struct LiveLeaf {
    present: [u64; LEAF_PFNS / 64],
    count: usize,
    recs: [Live; LEAF_PFNS],
}

impl LiveLeaf {
    fn new() -> Box<Self> {
        Box::new(LiveLeaf { present: [0; LEAF_PFNS / 64], count: 0, recs: [Live::default(); LEAF_PFNS] })
    }
}

/// The live records of a CPU slot, keyed by first page: a small hash map of 2 MiB leaves, each a
/// dense array of records. Allocations are handed out top-down and come back in bursts, so
/// neighbouring allocations share a leaf and its cache lines, and the map of leaves (one entry
/// per 2 MiB in use) stays cache-resident: a record costs a hit in a small table and a store
/// beside the previous record, where one hash map of records costs a random line of a table
/// that grows with every live allocation.
#[derive(Debug, Default)]
pub(super) struct LiveMap {
    leaves: HashMap<u64, Box<LiveLeaf>, BuildHasherDefault<FastHasher>>,
    /// One emptied leaf kept for reuse, so that an allocation churning at a leaf's edge does not
    /// allocate and free 12 KiB each time.
    spare: Option<Box<LiveLeaf>>,
    len: usize,
}

#[inline]
fn split(pfn: u64) -> (u64, usize) {
    (pfn / LEAF_PFNS as u64, (pfn % LEAF_PFNS as u64) as usize)
}

impl LiveMap {
    /// Records `live` for `pfn` (which has no record).
    #[inline]
    pub(super) fn insert(&mut self, pfn: u64, live: Live) {
        let (k, i) = split(pfn);
        let spare = &mut self.spare;
        let leaf = self.leaves.entry(k).or_insert_with(|| spare.take().unwrap_or_else(LiveLeaf::new));
        debug_assert!(leaf.present[i / 64] & (1 << (i % 64)) == 0, "a live record is never replaced");
        leaf.present[i / 64] |= 1 << (i % 64);
        leaf.count += 1;
        leaf.recs[i] = live;
        self.len += 1;
    }

    /// The record of `pfn`, if it has one.
    #[inline]
    pub(super) fn get(&self, pfn: u64) -> Option<Live> {
        let (k, i) = split(pfn);
        let leaf = self.leaves.get(&k)?;
        (leaf.present[i / 64] & (1 << (i % 64)) != 0).then(|| leaf.recs[i])
    }

    /// Removes the record of `pfn` (which has one).
    #[inline]
    pub(super) fn remove(&mut self, pfn: u64) {
        let (k, i) = split(pfn);
        let Some(leaf) = self.leaves.get_mut(&k) else { return };
        let bit = 1 << (i % 64);
        if leaf.present[i / 64] & bit == 0 {
            return;
        }
        leaf.present[i / 64] &= !bit;
        leaf.count -= 1;
        self.len -= 1;
        if leaf.count == 0
            && let Some(empty) = self.leaves.remove(&k)
            && self.spare.is_none()
        {
            self.spare = Some(empty);
        }
    }

    /// Whether `pfn` has a record.
    pub(super) fn contains(&self, pfn: u64) -> bool {
        self.get(pfn).is_some()
    }

    /// Records held.
    pub(super) fn len(&self) -> usize {
        self.len
    }
}
