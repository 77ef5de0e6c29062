//! Physical memory of the model: [`PhysMem`], an mmap-backed arena with a frame allocator, and
//! [`BioVec`], the kernel's `bio_vec` (page, offset, length).
//!
//! A physical address is an offset into the arena. Address 0 is never handed out, so a zero
//! entry can always mean "nothing". The arena is mapped with `MAP_NORESERVE`: a 64 GiB arena costs
//! nothing until its frames are written, and frames never written (for example data frames that
//! a benchmark only maps) stay uncommitted. The arena's host address is fixed for its lifetime,
//! so the same bytes can later be imported into Vulkan and walked by a shader.
//!
//! This module is the edge where raw memory is touched; every `unsafe` block says why it holds.

mod frames;

use core::ptr::NonNull;
use core::sync::atomic::AtomicU64;
use std::io::Read;
use std::path::Path;

use parking_lot::Mutex;

use crate::addr::{PAGE_SHIFT, PAGE_SIZE, PageSize, PhysAddr};
use frames::Buddy;
pub use frames::MAX_ORDER;

/// Errors of [`PhysMem`] operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The arena size is not a multiple of 4 KiB, is below two frames, or is too large.
    #[error("arena size {size:#x} must be a multiple of 4 KiB, at least 8 KiB and below 16 TiB")]
    BadSize {
        /// The size asked for.
        size: u64,
    },
    /// The operating system refused the mapping.
    #[error("mmap of {size:#x} bytes failed (errno {errno})")]
    Mmap {
        /// The size asked for.
        size: u64,
        /// `errno` after the failed call.
        errno: i32,
    },
    /// Not enough free frames (or no free aligned run of the size).
    #[error("out of physical memory: {requested} frame(s) requested, {available} available")]
    OutOfMemory {
        /// Frames asked for.
        requested: u64,
        /// Frames free and not reserved at the time.
        available: u64,
    },
    /// Freeing something that is not an allocated block of that size (e.g. a double free).
    #[error("{pa} does not start an allocated block of {size:#x} bytes (double free?)")]
    NotAllocated {
        /// The address given.
        pa: PhysAddr,
        /// The block size given.
        size: u64,
    },
    /// An access or address outside the arena.
    #[error("[{pa}, +{len:#x}) lies outside the arena of {size:#x} bytes")]
    OutOfBounds {
        /// Start of the access.
        pa: PhysAddr,
        /// Its length.
        len: u64,
        /// The arena size.
        size: u64,
    },
    /// An address that must be aligned is not.
    #[error("{pa} is not aligned to {align:#x}")]
    Unaligned {
        /// The address given.
        pa: PhysAddr,
        /// The alignment required.
        align: u64,
    },
    /// A zero-length request.
    #[error("zero-length request")]
    ZeroLength,
    /// Reading a file failed.
    #[error("reading {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The error text.
        message: String,
    },
}

/// Frame counts of an arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemUsage {
    /// Frames in the arena (frame 0 included, though it is never handed out).
    pub total_frames: u64,
    /// Frames free right now (reserved ones included).
    pub free_frames: u64,
    /// Free frames promised to reservations (page tables keep some to split huge leaves).
    pub reserved_frames: u64,
}

/// An mmap-backed arena of "physical memory" with a buddy frame allocator.
///
/// `PhysMem` is `Sync`: allocation takes a short lock; byte accesses are bounds checked and take
/// none, like a device's DMA into shared memory. Page tables read and write their entries through
/// [`PhysMem::table`] as atomics.
///
/// ```
/// use vmbind::mem::PhysMem;
/// let mem = PhysMem::new(64 << 20).unwrap();
/// let pa = mem.alloc_frame().unwrap();
/// mem.write(pa, b"hello").unwrap();
/// let mut back = [0u8; 5];
/// mem.read(pa, &mut back).unwrap();
/// assert_eq!(&back, b"hello");
/// mem.free_frame(pa).unwrap();
/// ```
pub struct PhysMem {
    base: NonNull<u8>,
    size: u64,
    frames: Mutex<Buddy>,
}

// SAFETY: the arena is plain memory owned by this value for its whole life; the raw base pointer
// is never handed out as a Rust reference except through `table` (atomics, shared-safe). Byte
// accesses are copies, like DMA into memory shared with a device.
unsafe impl Send for PhysMem {}
// SAFETY: see `Send`; the allocator state sits behind a mutex.
unsafe impl Sync for PhysMem {}

/// A copyable view of an arena for 64-bit loads in hot loops: it carries the base address and
/// the bound itself, so a loop that holds one keeps them in registers instead of reloading them
/// from the arena for every access. Borrowed from [`PhysMem::words`].
#[derive(Clone, Copy)]
pub struct Words<'a> {
    base: NonNull<u8>,
    /// `size - 8`: the highest offset an 8-byte access may start at (the arena is at least
    /// 8 KiB, so this cannot wrap).
    last: u64,
    _mem: core::marker::PhantomData<&'a PhysMem>,
}

impl core::fmt::Debug for Words<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Words").field("size", &(self.last + 8)).finish()
    }
}

// SAFETY: a view is a shared borrow of a `PhysMem`, which is `Sync`; it only performs atomic
// loads.
unsafe impl Send for Words<'_> {}
// SAFETY: as for `Send`.
unsafe impl Sync for Words<'_> {}

impl Words<'_> {
    /// The 64-bit little-endian value at `pa` when it is 8-byte aligned and inside the arena;
    /// `None` otherwise (use [`PhysMem::read_u64`], which also handles unaligned reads).
    #[inline(always)]
    #[must_use]
    pub fn load(&self, pa: PhysAddr) -> Option<u64> {
        let off = pa.as_u64();
        if off > self.last || off & 7 != 0 {
            return None;
        }
        // SAFETY: 8 bytes inside the live mapping (the borrow keeps the arena alive), 8-byte
        // aligned; `AtomicU64` has the layout of `u64` and makes concurrent access sound.
        let a = unsafe { &*self.base.as_ptr().add(off as usize).cast::<AtomicU64>() };
        Some(u64::from_le(a.load(core::sync::atomic::Ordering::Acquire)))
    }
}

impl core::fmt::Debug for PhysMem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PhysMem").field("size", &self.size).field("usage", &self.usage()).finish()
    }
}

fn to_pa(frame: u32) -> PhysAddr {
    PhysAddr::new(u64::from(frame) << PAGE_SHIFT)
}

impl PhysMem {
    /// Maps an arena of `size` bytes (a multiple of 4 KiB; 64 MiB to tens of GiB are typical).
    /// The memory is committed lazily by the OS as frames are written.
    ///
    /// # Errors
    /// [`MemError::BadSize`] for a size that is not a 4 KiB multiple, below 8 KiB or at least
    /// 16 TiB; [`MemError::Mmap`] when the OS refuses the mapping.
    pub fn new(size: u64) -> Result<Self, MemError> {
        if size % PAGE_SIZE != 0 || !(2 * PAGE_SIZE..(1u64 << 44)).contains(&size) {
            return Err(MemError::BadSize { size });
        }
        let len = usize::try_from(size).map_err(|_| MemError::BadSize { size })?;
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
        // Best effort: transparent huge pages make walks over a large arena cheaper.
        // SAFETY: advice on the mapping just made; it cannot change its contents.
        let _ = unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(MemError::Mmap { size, errno: 0 })?;
        let nframes = u32::try_from(size >> PAGE_SHIFT).map_err(|_| MemError::BadSize { size })?;
        Ok(PhysMem { base, size, frames: Mutex::new(Buddy::new(nframes)) })
    }

    /// A view for aligned 64-bit loads in hot loops (see [`Words`]).
    #[must_use]
    pub fn words(&self) -> Words<'_> {
        Words { base: self.base, last: self.size - 8, _mem: core::marker::PhantomData }
    }

    /// The arena size in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Frame counts right now.
    #[must_use]
    pub fn usage(&self) -> MemUsage {
        let b = self.frames.lock();
        MemUsage {
            total_frames: u64::from(b.nframes()),
            free_frames: b.free_frames(),
            reserved_frames: b.reserved(),
        }
    }

    fn oom(b: &Buddy, requested: u64) -> MemError {
        MemError::OutOfMemory { requested, available: b.available() }
    }

    /// Allocates one 4 KiB frame. Its contents are whatever was there before.
    ///
    /// # Errors
    /// [`MemError::OutOfMemory`] when no unreserved frame is free.
    pub fn alloc_frame(&self) -> Result<PhysAddr, MemError> {
        let mut b = self.frames.lock();
        b.alloc(0, false).map(to_pa).map_err(|_| Self::oom(&b, 1))
    }

    /// Allocates `n` frames, all or none.
    ///
    /// # Errors
    /// [`MemError::OutOfMemory`] when fewer than `n` unreserved frames are free; nothing is
    /// allocated then.
    pub fn alloc_frames(&self, n: usize) -> Result<Vec<PhysAddr>, MemError> {
        let mut b = self.frames.lock();
        if n as u64 > b.available() {
            return Err(Self::oom(&b, n as u64));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            // Cannot fail: order-0 blocks exist whenever a frame is free.
            match b.alloc(0, false) {
                Ok(f) => out.push(to_pa(f)),
                Err(_) => {
                    for pa in out.drain(..) {
                        let _ = b.free((pa.as_u64() >> PAGE_SHIFT) as u32, 0);
                    }
                    return Err(Self::oom(&b, n as u64));
                }
            }
        }
        Ok(out)
    }

    /// Allocates `n` frames and shuffles their order with a seeded generator: the "scattered
    /// physical pages" of a real buffer, reproducible from the seed.
    ///
    /// # Errors
    /// As [`PhysMem::alloc_frames`].
    pub fn alloc_scattered(&self, n: usize, seed: u64) -> Result<Vec<PhysAddr>, MemError> {
        let mut v = self.alloc_frames(n)?;
        shuffle(&mut v, seed);
        Ok(v)
    }

    /// Allocates a physically contiguous block of `size`, aligned to `size`.
    ///
    /// # Errors
    /// [`MemError::OutOfMemory`] when no free aligned block of that size exists.
    pub fn alloc_contig(&self, size: PageSize) -> Result<PhysAddr, MemError> {
        let order = (size.shift() - PAGE_SHIFT) as u8;
        let mut b = self.frames.lock();
        b.alloc(order, false).map(to_pa).map_err(|_| Self::oom(&b, 1 << order))
    }

    /// Allocates a physically contiguous block of `bytes` (a power of two from 4 KiB to 1 GiB),
    /// aligned to its size.
    ///
    /// # Errors
    /// [`MemError::Unaligned`] for a size that is not such a power of two,
    /// [`MemError::OutOfMemory`] when no free block of that size exists.
    pub fn alloc_block(&self, bytes: u64) -> Result<PhysAddr, MemError> {
        let order = Self::order_of(bytes)?;
        let mut b = self.frames.lock();
        b.alloc(order, false).map(to_pa).map_err(|_| Self::oom(&b, 1 << order))
    }

    /// Frees a block from [`PhysMem::alloc_block`].
    ///
    /// # Errors
    /// [`MemError::Unaligned`] for a bad size, [`MemError::NotAllocated`] when `pa` does not
    /// start an allocated block of `bytes`.
    pub fn free_block(&self, pa: PhysAddr, bytes: u64) -> Result<(), MemError> {
        let order = Self::order_of(bytes)?;
        let f = self.frame_of(pa, bytes)?;
        self.frames.lock().free(f, order).map_err(|_| MemError::NotAllocated { pa, size: bytes })
    }

    fn order_of(bytes: u64) -> Result<u8, MemError> {
        if !bytes.is_power_of_two() || !(PAGE_SIZE..=1 << 30).contains(&bytes) {
            return Err(MemError::Unaligned { pa: PhysAddr::new(bytes), align: PAGE_SIZE });
        }
        Ok((bytes.trailing_zeros() - PAGE_SHIFT) as u8)
    }

    fn frame_of(&self, pa: PhysAddr, size: u64) -> Result<u32, MemError> {
        if !pa.is_aligned(size) || pa.as_u64() == 0 || pa.as_u64() >= self.size {
            return Err(MemError::NotAllocated { pa, size });
        }
        Ok((pa.as_u64() >> PAGE_SHIFT) as u32)
    }

    /// Frees a frame from [`PhysMem::alloc_frame`] or [`PhysMem::alloc_frames`].
    ///
    /// # Errors
    /// [`MemError::NotAllocated`] when `pa` is not an allocated 4 KiB frame (double free, a frame
    /// inside a larger block, an address outside the arena); nothing changes then.
    pub fn free_frame(&self, pa: PhysAddr) -> Result<(), MemError> {
        let f = self.frame_of(pa, PAGE_SIZE)?;
        self.frames.lock().free(f, 0).map_err(|_| MemError::NotAllocated { pa, size: PAGE_SIZE })
    }

    /// Frees many frames under one lock. Stops at the first bad address.
    ///
    /// # Errors
    /// As [`PhysMem::free_frame`]; the frames before the bad one are freed.
    pub fn free_frames(&self, pas: &[PhysAddr]) -> Result<(), MemError> {
        let mut b = self.frames.lock();
        for &pa in pas {
            let f = self.frame_of(pa, PAGE_SIZE)?;
            b.free(f, 0).map_err(|_| MemError::NotAllocated { pa, size: PAGE_SIZE })?;
        }
        Ok(())
    }

    /// Frees a block from [`PhysMem::alloc_contig`].
    ///
    /// # Errors
    /// [`MemError::NotAllocated`] when `pa` is not the start of an allocated block of `size`.
    pub fn free_contig(&self, pa: PhysAddr, size: PageSize) -> Result<(), MemError> {
        let f = self.frame_of(pa, size.bytes())?;
        let order = (size.shift() - PAGE_SHIFT) as u8;
        self.frames.lock().free(f, order).map_err(|_| MemError::NotAllocated { pa, size: size.bytes() })
    }

    /// Promises `n` free frames to the caller: plain allocations can no longer take them, and
    /// [`PhysMem::alloc_reserved_frame`] can always get them. Page tables use this so that
    /// splitting a huge leaf during an unmap never fails for lack of memory.
    ///
    /// # Errors
    /// [`MemError::OutOfMemory`] when fewer than `n` unreserved frames are free.
    pub fn reserve(&self, n: u64) -> Result<(), MemError> {
        let mut b = self.frames.lock();
        b.reserve(n).map_err(|_| Self::oom(&b, n))
    }

    /// Returns `n` frames of reservation taken with [`PhysMem::reserve`].
    pub fn unreserve(&self, n: u64) {
        self.frames.lock().unreserve(n);
    }

    /// Allocates one frame out of a reservation made with [`PhysMem::reserve`].
    ///
    /// # Errors
    /// [`MemError::OutOfMemory`] only when nothing is reserved (a caller bug).
    pub fn alloc_reserved_frame(&self) -> Result<PhysAddr, MemError> {
        let mut b = self.frames.lock();
        b.alloc(0, true).map(to_pa).map_err(|_| Self::oom(&b, 1))
    }

    fn check(&self, pa: PhysAddr, len: u64) -> Result<usize, MemError> {
        match pa.as_u64().checked_add(len) {
            Some(end) if end <= self.size => Ok(pa.as_u64() as usize),
            _ => Err(MemError::OutOfBounds { pa, len, size: self.size }),
        }
    }

    /// Host pointer to `len` bytes at `pa`, for importing the arena into a GPU API or handing a
    /// table to an independent walker.
    ///
    /// # Errors
    /// [`MemError::OutOfBounds`] when the range leaves the arena.
    pub fn host_ptr(&self, pa: PhysAddr, len: u64) -> Result<NonNull<u8>, MemError> {
        let off = self.check(pa, len)?;
        // SAFETY: `off <= size`, so the result stays inside (or one past) the mapping.
        Ok(unsafe { self.base.add(off) })
    }

    /// Copies bytes at `pa` into `buf`.
    ///
    /// # Errors
    /// [`MemError::OutOfBounds`] when `[pa, pa + buf.len())` leaves the arena.
    pub fn read(&self, pa: PhysAddr, buf: &mut [u8]) -> Result<(), MemError> {
        let off = self.check(pa, buf.len() as u64)?;
        // SAFETY: the source range is inside the live mapping (checked above) and cannot overlap
        // `buf`, which is Rust-owned memory outside the arena.
        unsafe {
            core::ptr::copy_nonoverlapping(self.base.as_ptr().add(off), buf.as_mut_ptr(), buf.len());
        }
        Ok(())
    }

    /// Copies `data` to `pa`.
    ///
    /// # Errors
    /// [`MemError::OutOfBounds`] when `[pa, pa + data.len())` leaves the arena.
    pub fn write(&self, pa: PhysAddr, data: &[u8]) -> Result<(), MemError> {
        let off = self.check(pa, data.len() as u64)?;
        // SAFETY: the destination is inside the live mapping (checked above); `data` is outside
        // the arena or, if it was read from it, a distinct Rust buffer.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), self.base.as_ptr().add(off), data.len());
        }
        Ok(())
    }

    /// Loads the 64-bit little-endian value at `pa` (atomically when 8-byte aligned, as a bus
    /// read of a naturally aligned word is).
    ///
    /// # Errors
    /// [`MemError::OutOfBounds`] when the 8 bytes leave the arena.
    #[inline]
    pub fn read_u64(&self, pa: PhysAddr) -> Result<u64, MemError> {
        if let Some(v) = self.words().load(pa) {
            return Ok(v);
        }
        self.check(pa, 8)?;
        let mut b = [0u8; 8];
        self.read(pa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Stores a 64-bit little-endian value at `pa` (atomically when 8-byte aligned).
    ///
    /// # Errors
    /// [`MemError::OutOfBounds`] when the 8 bytes leave the arena.
    #[inline]
    pub fn write_u64(&self, pa: PhysAddr, v: u64) -> Result<(), MemError> {
        let off = self.check(pa, 8)?;
        if off & 7 == 0 {
            // SAFETY: as in `read_u64`.
            let a = unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU64>() };
            a.store(v.to_le(), core::sync::atomic::Ordering::Release);
            return Ok(());
        }
        self.write(pa, &v.to_le_bytes())
    }

    /// Fills `[pa, pa + len)` with zeros.
    ///
    /// # Errors
    /// [`MemError::OutOfBounds`] when the range leaves the arena.
    pub fn zero(&self, pa: PhysAddr, len: u64) -> Result<(), MemError> {
        let off = self.check(pa, len)?;
        // SAFETY: the range is inside the live mapping (checked above).
        unsafe { core::ptr::write_bytes(self.base.as_ptr().add(off), 0, len as usize) };
        Ok(())
    }

    /// The 4 KiB frame at `pa` seen as 512 atomic 64-bit entries: how page tables living in the
    /// arena are read and written. `None` when `pa` is unaligned or the frame leaves the arena.
    #[inline]
    #[must_use]
    pub fn table(&self, pa: PhysAddr) -> Option<&[AtomicU64; 512]> {
        let off = pa.as_u64();
        if off & (PAGE_SIZE - 1) != 0 || off >= self.size {
            return None;
        }
        // SAFETY: the frame lies wholly inside the mapping (size is a 4 KiB multiple and off is a
        // 4 KiB-aligned offset below it), is 8-byte aligned, lives as long as `self`, and
        // `AtomicU64` has the layout of `u64`; atomics make shared access sound.
        Some(unsafe { &*self.base.as_ptr().add(off as usize).cast::<[AtomicU64; 512]>() })
    }

    /// Places `data` into freshly allocated frames and returns the bio_vec array describing it:
    /// full pages, the last one partial. With `scatter_seed` the frames are shuffled (a buffer
    /// scattered over physical memory, reproducible), otherwise they come in allocation order.
    ///
    /// # Errors
    /// [`MemError::ZeroLength`] for empty data; [`MemError::OutOfMemory`] when the frames are not
    /// there (nothing is allocated then).
    pub fn bvecs_from_bytes(&self, data: &[u8], scatter_seed: Option<u64>) -> Result<Vec<BioVec>, MemError> {
        if data.is_empty() {
            return Err(MemError::ZeroLength);
        }
        let frames = self.frames_for(data.len() as u64, scatter_seed)?;
        let mut out = Vec::with_capacity(frames.len());
        for (chunk, &pa) in data.chunks(PAGE_SIZE as usize).zip(&frames) {
            self.write(pa, chunk)?;
            out.push(BioVec { phys: pa, offset: 0, len: chunk.len() as u32 });
        }
        Ok(out)
    }

    /// Reads a file into freshly allocated (optionally scattered) frames, a page at a time, and
    /// returns its bio_vec array.
    ///
    /// # Errors
    /// [`MemError::Io`] when the file cannot be read, [`MemError::ZeroLength`] for an empty file,
    /// [`MemError::OutOfMemory`] when the frames are not there; frames taken are given back.
    pub fn bvecs_from_file(&self, path: &Path, scatter_seed: Option<u64>) -> Result<Vec<BioVec>, MemError> {
        let io =
            |e: std::io::Error| MemError::Io { path: path.display().to_string(), message: e.to_string() };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len == 0 {
            return Err(MemError::ZeroLength);
        }
        let frames = self.frames_for(len, scatter_seed)?;
        let mut out = Vec::with_capacity(frames.len());
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut left = len;
        for &pa in &frames {
            let n = left.min(PAGE_SIZE) as usize;
            if let Err(e) = file.read_exact(&mut page[..n]) {
                let _ = self.free_frames(&frames);
                return Err(io(e));
            }
            self.write(pa, &page[..n])?;
            out.push(BioVec { phys: pa, offset: 0, len: n as u32 });
            left -= n as u64;
        }
        Ok(out)
    }

    fn frames_for(&self, len: u64, seed: Option<u64>) -> Result<Vec<PhysAddr>, MemError> {
        let n = len.div_ceil(PAGE_SIZE) as usize;
        match seed {
            Some(s) => self.alloc_scattered(n, s),
            None => self.alloc_frames(n),
        }
    }

    /// Gathers the bytes a bio_vec array describes.
    ///
    /// # Errors
    /// [`MemError::OutOfBounds`] when a segment leaves the arena.
    pub fn read_bvecs(&self, bvecs: &[BioVec]) -> Result<Vec<u8>, MemError> {
        let total: u64 = bvecs.iter().map(|b| u64::from(b.len)).sum();
        let mut out = vec![0u8; total as usize];
        let mut at = 0usize;
        for b in bvecs {
            let start = b.start().ok_or(MemError::OutOfBounds {
                pa: b.phys,
                len: u64::from(b.len),
                size: self.size,
            })?;
            self.read(start, &mut out[at..at + b.len as usize])?;
            at += b.len as usize;
        }
        Ok(out)
    }
}

impl Drop for PhysMem {
    fn drop(&mut self) {
        // SAFETY: `base`/`size` are exactly the mapping made in `new`; no reference into it can
        // outlive `self` (every borrow handed out is tied to `&self`).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.size as usize);
        }
    }
}

/// One segment of an I/O: `len` bytes starting `offset` bytes into the page at `phys`, with the
/// meaning of the kernel's `struct bio_vec { bv_page, bv_len, bv_offset }`. A segment may span
/// several physically contiguous pages (a multi-page bvec).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct BioVec {
    /// The (page-aligned) physical page the segment starts in.
    pub phys: PhysAddr,
    /// Byte offset of the segment's first byte from `phys`.
    pub offset: u32,
    /// Length in bytes.
    pub len: u32,
}

impl BioVec {
    /// A whole 4 KiB page.
    #[must_use]
    pub const fn page(phys: PhysAddr) -> Self {
        BioVec { phys, offset: 0, len: PAGE_SIZE as u32 }
    }

    /// Physical address of the first byte, `None` on overflow.
    #[must_use]
    pub const fn start(&self) -> Option<PhysAddr> {
        self.phys.checked_add(self.offset as u64)
    }

    /// Physical address one past the last byte, `None` on overflow.
    #[must_use]
    pub const fn end(&self) -> Option<PhysAddr> {
        match self.phys.checked_add(self.offset as u64) {
            Some(s) => s.checked_add(self.len as u64),
            None => None,
        }
    }

    /// One whole-page bvec per frame: the array a driver builds from a list of scattered pages.
    #[must_use]
    pub fn from_frames(frames: &[PhysAddr]) -> Vec<BioVec> {
        frames.iter().map(|&pa| BioVec::page(pa)).collect()
    }
}

/// A small, fast, seeded generator (SplitMix64) for reproducible scattering.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    #[must_use]
    pub const fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Fisher–Yates shuffle with a seeded [`SplitMix64`].
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_outside_the_arena_are_refused() {
        let mem = PhysMem::new(1 << 20).unwrap();
        let mut b = [0u8; 8];
        assert!(matches!(mem.read(PhysAddr::new((1 << 20) - 4), &mut b), Err(MemError::OutOfBounds { .. })));
        assert!(matches!(mem.write(PhysAddr::new(u64::MAX - 2), &b), Err(MemError::OutOfBounds { .. })));
        assert!(mem.table(PhysAddr::new(1 << 20)).is_none());
        assert!(mem.table(PhysAddr::new(0x1008)).is_none());
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert_eq!(PhysMem::new(0).unwrap_err(), MemError::BadSize { size: 0 });
        assert_eq!(PhysMem::new(4097).unwrap_err(), MemError::BadSize { size: 4097 });
        assert_eq!(PhysMem::new(4096).unwrap_err(), MemError::BadSize { size: 4096 });
    }

    #[test]
    fn words_load_aligned_words_inside_the_arena_only() {
        let mem = PhysMem::new(64 << 10).unwrap();
        let f = mem.alloc_frame().unwrap();
        mem.write_u64(f, 0x1122_3344_5566_7788).unwrap();
        let w = mem.words();
        assert_eq!(w.load(f), Some(0x1122_3344_5566_7788));
        assert_eq!(w.load(PhysAddr::new(f.as_u64() + 4)), None, "unaligned");
        assert_eq!(w.load(PhysAddr::new((64 << 10) - 8)), Some(0), "the last word");
        assert_eq!(w.load(PhysAddr::new(64 << 10)), None, "past the end");
        assert_eq!(w.load(PhysAddr::new(!7)), None);
    }

    #[test]
    fn double_free_is_a_typed_error() {
        let mem = PhysMem::new(1 << 20).unwrap();
        let pa = mem.alloc_frame().unwrap();
        mem.free_frame(pa).unwrap();
        assert_eq!(mem.free_frame(pa), Err(MemError::NotAllocated { pa, size: PAGE_SIZE }));
        assert!(mem.free_frame(PhysAddr::new(0)).is_err());
    }

    #[test]
    fn contiguous_blocks_are_aligned_and_exhaustion_is_reported() {
        let mem = PhysMem::new(8 << 20).unwrap();
        let a = mem.alloc_contig(PageSize::Size2M).unwrap();
        assert!(a.is_aligned(2 << 20));
        assert_ne!(a.as_u64(), 0);
        let b = mem.alloc_contig(PageSize::Size2M).unwrap();
        let c = mem.alloc_contig(PageSize::Size2M).unwrap();
        // Frame 0 is held back, so the first 2 MiB block can never form.
        assert!(matches!(mem.alloc_contig(PageSize::Size2M), Err(MemError::OutOfMemory { .. })));
        assert!(matches!(mem.alloc_contig(PageSize::Size1G), Err(MemError::OutOfMemory { .. })));
        for x in [a, b, c] {
            mem.free_contig(x, PageSize::Size2M).unwrap();
        }
        assert_eq!(mem.usage().free_frames, 2047);
    }

    #[test]
    fn bytes_round_trip_through_scattered_bvecs() {
        let mem = PhysMem::new(4 << 20).unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let bv = mem.bvecs_from_bytes(&data, Some(9)).unwrap();
        assert_eq!(bv.len(), 5);
        assert_eq!(bv[4].len, 20_000 - 4 * 4096);
        assert_eq!(mem.read_bvecs(&bv).unwrap(), data);
        assert_eq!(mem.bvecs_from_bytes(&[], None), Err(MemError::ZeroLength));
    }

    #[test]
    fn a_file_loads_into_bvecs() {
        let dir = std::env::temp_dir().join(format!("vmbind-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.bin");
        let data: Vec<u8> = (0..9000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let mem = PhysMem::new(1 << 20).unwrap();
        let bv = mem.bvecs_from_file(&path, Some(1)).unwrap();
        assert_eq!(mem.read_bvecs(&bv).unwrap(), data);
        let missing = mem.bvecs_from_file(&dir.join("nope"), None);
        assert!(matches!(missing, Err(MemError::Io { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
