//! The per-CPU side of the IOVA allocator: magazines of cached IOVAs, the CPU slots that hold
//! them with the live records, and the rounding rule.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

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

/// A multiply-rotate hasher for page-frame keys (FxHash's recipe).
#[derive(Default, Clone, Copy)]
pub(super) struct PfnHasher(u64);

impl Hasher for PfnHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

pub(super) type LiveMap = HashMap<u64, Live, BuildHasherDefault<PfnHasher>>;

/// A live allocation: its rounded size and its tag.
#[derive(Debug, Clone, Copy)]
pub(super) struct Live {
    pub(super) pages: u64,
    pub(super) tag: IovaTag,
}
