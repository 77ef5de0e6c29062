//! Per-frame metadata, the arena's `struct page`: one 16-bit word per frame, kept outside the
//! arena in a lazily committed mapping (a frame's word costs memory only once it is written, so
//! a 16 TiB arena does not commit 8 GiB of metadata up front).
//!
//! The word belongs to whoever owns the frame. Page tables keep in it the number of present
//! entries of the table page, which makes "did this table just empty?" one load instead of a
//! scan of 512 entries (Linux keeps the same count for generic page tables in the `ptdesc`).

use core::sync::atomic::AtomicU16;

use super::MemError;
use super::anon::AnonMap;

/// The metadata words of an arena's frames.
pub(super) struct FrameMeta {
    map: AnonMap,
    frames: usize,
}

impl FrameMeta {
    /// A zeroed word for each of `frames` frames.
    pub(super) fn new(frames: usize, size: u64) -> Result<Self, MemError> {
        let len = frames.checked_mul(2).ok_or(MemError::BadSize { size })?;
        Ok(FrameMeta { map: AnonMap::new(len, size)?, frames })
    }

    /// The word of frame number `frame`, `None` past the arena.
    #[inline]
    pub(super) fn get(&self, frame: u64) -> Option<&AtomicU16> {
        let i = usize::try_from(frame).ok().filter(|&i| i < self.frames)?;
        // SAFETY: `i` is below `frames`, so the word lies inside the mapping (zero-filled,
        // page aligned, so 2-byte aligned), which lives as long as `self`; every access to it
        // is through this `AtomicU16`.
        Some(unsafe { &*self.map.base().as_ptr().cast::<AtomicU16>().add(i) })
    }
}
