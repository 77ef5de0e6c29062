//! The one way the arena gets memory from the OS: an anonymous, private, lazily committed
//! mapping (the arena's bytes and its per-frame words both live in one), unmapped when dropped.

use core::ptr::NonNull;

use super::MemError;

/// An anonymous private mapping of `len` bytes, zero-filled and committed page by page as it is
/// first written (`MAP_NORESERVE`).
pub(super) struct AnonMap {
    base: NonNull<u8>,
    len: usize,
}

impl AnonMap {
    /// Maps `len` bytes (at least 1); `size` is what a refusal reports.
    pub(super) fn new(len: usize, size: u64) -> Result<Self, MemError> {
        let len = len.max(1);
        // SAFETY: an anonymous private mapping with no address hint; the kernel picks a fresh
        // range that aliases nothing else in the process. The result is checked below.
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
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(MemError::Mmap { size, errno: 0 })?;
        Ok(AnonMap { base, len })
    }

    /// First byte (page aligned).
    pub(super) fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// Asks for transparent huge pages (best effort: walks over a large arena get cheaper).
    pub(super) fn advise_huge(&self) {
        // SAFETY: advice on this mapping; it cannot change its contents.
        let _ = unsafe { libc::madvise(self.base.as_ptr().cast(), self.len, libc::MADV_HUGEPAGE) };
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`; no borrow of it outlives its owner (every
        // borrow handed out by the arena is tied to `&self` of the arena that owns this).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

// SAFETY: plain memory owned by this value; the arena reaches it only through atomics.
unsafe impl Send for AnonMap {}
// SAFETY: as for `Send`.
unsafe impl Sync for AnonMap {}
