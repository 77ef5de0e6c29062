//! Per-frame metadata, the arena's `struct page`: one 16-bit word per frame, kept outside the
//! arena in a lazily committed mapping (a frame's word costs memory only once it is written, so
//! a 16 TiB arena does not commit 8 GiB of metadata up front).
//!
//! The word belongs to whoever owns the frame. Page tables keep in it the number of present
//! entries of the table page, which makes "did this table just empty?" one load instead of a
//! scan of 512 entries (Linux keeps the same count for generic page tables in the `ptdesc`).

use core::ptr::NonNull;
use core::sync::atomic::AtomicU16;

use super::MemError;

/// The metadata words of an arena's frames.
pub(super) struct FrameMeta {
    base: NonNull<AtomicU16>,
    frames: usize,
}

impl FrameMeta {
    /// A zeroed word for each of `frames` frames.
    pub(super) fn new(frames: usize, size: u64) -> Result<Self, MemError> {
        let len = frames.checked_mul(2).ok_or(MemError::BadSize { size })?.max(1);
        // SAFETY: an anonymous private mapping with no address hint aliases nothing; checked below.
        let ptr = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            return Err(MemError::Mmap { size, errno });
        }
        let base = NonNull::new(ptr.cast::<AtomicU16>()).ok_or(MemError::Mmap { size, errno: 0 })?;
        Ok(FrameMeta { base, frames })
    }

    /// The word of frame number `frame`, `None` past the arena.
    #[inline]
    pub(super) fn get(&self, frame: u64) -> Option<&AtomicU16> {
        let i = usize::try_from(frame).ok().filter(|&i| i < self.frames)?;
        // SAFETY: `i` is below `frames`, so the word lies inside the mapping made in `new`
        // (zero-filled, 2-byte aligned: mmap returns page-aligned memory), which lives as long as
        // `self`; every access to it is through this `AtomicU16`.
        Some(unsafe { &*self.base.as_ptr().add(i) })
    }
}

impl Drop for FrameMeta {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`; every borrow of it is tied to `&self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), (self.frames * 2).max(1));
        }
    }
}

// SAFETY: the mapping is owned by this value and only reached through atomics.
unsafe impl Send for FrameMeta {}
// SAFETY: as for `Send`: shared access is atomic.
unsafe impl Sync for FrameMeta {}
