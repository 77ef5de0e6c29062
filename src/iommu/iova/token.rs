//! What the allocator hands out besides addresses: retired-range tokens bound to their
//! allocator, the read-only view, counters.
#![forbid(unsafe_code)]

use super::IovaAllocator;
use crate::addr::{DmaAddr, PAGE_SHIFT};

/// An IOVA range whose allocation has ended but which may not be reused yet (see
/// [`IovaAllocator::retire`]).
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a retired IOVA range is lost unless released"]
pub struct RetiredIova {
    pub(super) pfn: u64,
    pub(super) pages: u64,
    pub(super) order: Option<usize>,
    /// The serial of the allocator that retired it: only that one may release it.
    pub(super) owner: u64,
}

impl RetiredIova {
    /// First address of the range.
    #[must_use]
    pub fn addr(&self) -> DmaAddr {
        DmaAddr::new(self.pfn << PAGE_SHIFT)
    }

    /// Rounded size in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.pages << PAGE_SHIFT
    }
}

/// A retired range handed to an allocator (or domain) that did not retire it: the token is handed
/// back, and nothing changed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the retired IOVA {} (+{:#x}) belongs to another allocator", .token.addr(), .token.size())]
pub struct ForeignToken {
    /// The token, to release where it came from.
    pub token: RetiredIova,
}

/// A read-only view of an [`IovaAllocator`]: what it has live, cached and free.
#[derive(Debug, Clone, Copy)]
pub struct IovaView<'a>(pub(super) &'a IovaAllocator);

impl IovaView<'_> {
    /// [`IovaAllocator::stats`].
    #[must_use]
    pub fn stats(&self) -> IovaStats {
        self.0.stats()
    }

    /// [`IovaAllocator::is_allocated`].
    #[must_use]
    pub fn is_allocated(&self, addr: DmaAddr) -> bool {
        self.0.is_allocated(addr)
    }

    /// [`IovaAllocator::free_ranges`].
    #[must_use]
    pub fn free_ranges(&self) -> Vec<(DmaAddr, u64)> {
        self.0.free_ranges()
    }

    /// First address of the aperture.
    #[must_use]
    pub fn start(&self) -> DmaAddr {
        self.0.start()
    }

    /// One past the last address of the aperture.
    #[must_use]
    pub fn end(&self) -> DmaAddr {
        self.0.end()
    }
}

/// Counters of an allocator, for tests and dumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IovaStats {
    /// Live allocations.
    pub live: usize,
    /// Pages in the tree's free ranges (cached IOVAs are not counted as free).
    pub tree_free_pages: u64,
    /// Free ranges in the tree.
    pub tree_ranges: usize,
    /// IOVAs parked in per-CPU magazines and the depot.
    pub cached: usize,
}
