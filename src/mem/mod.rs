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

mod access;
mod anon;
mod bvec;
mod frames;
mod meta;
pub(crate) mod rng;

use core::ptr::NonNull;

use crate::sync::{Mutex, Rank};

use crate::addr::{PAGE_SHIFT, PAGE_SIZE, PageSize, PhysAddr};
pub use access::Words;
pub use bvec::{BioVec, BvecSummary, PageArray};
use frames::Buddy;
pub use frames::MAX_ORDER;
use rng::shuffle;

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
    /// A [`Reservation`] of another arena.
    #[error("the reservation belongs to another arena")]
    ForeignReservation,
    /// The host could not allocate a buffer of this many bytes.
    #[error("cannot allocate a host buffer of {bytes:#x} bytes")]
    HostAlloc {
        /// Bytes asked for.
        bytes: u64,
    },
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
/// none, like a device's DMA into shared memory. Every access to the arena's bytes is an aligned
/// 64-bit atomic, so concurrent readers and writers of the same bytes — threads, devices, table
/// walkers — are never undefined behaviour: racing writers leave whole words of one of them (the
/// memory model is written out in the `access` module's docs, summarised in the crate README).
/// Page tables read and write their entries through [`PhysMem::table`].
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
    meta: meta::FrameMeta,
    serial: u64,
    /// Owns the arena's bytes (`base` points into it).
    _map: anon::AnonMap,
}

// SAFETY: the arena is plain memory owned by this value for its whole life; every access to it
// goes through `access`, which only makes aligned 64-bit atomic accesses (its module docs), so
// moving the owner to another thread is sound.
unsafe impl Send for PhysMem {}
// SAFETY: shared use is atomic arena accesses (see `Send`) and the allocator, behind a mutex.
unsafe impl Sync for PhysMem {}

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
        if !size.is_multiple_of(PAGE_SIZE) || !(2 * PAGE_SIZE..(1u64 << 44)).contains(&size) {
            return Err(MemError::BadSize { size });
        }
        let len = usize::try_from(size).map_err(|_| MemError::BadSize { size })?;
        let map = anon::AnonMap::new(len, size)?;
        map.advise_huge();
        let base = map.base();
        let nframes = u32::try_from(size >> PAGE_SHIFT).map_err(|_| MemError::BadSize { size })?;
        let meta = meta::FrameMeta::new(nframes as usize, size)?;
        let serial = ARENA_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let frames = Mutex::new(Buddy::new(nframes), Rank::Frames);
        Ok(PhysMem { base, size, frames, meta, serial, _map: map })
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

    /// Allocates `count` contiguous blocks of `size`, each aligned to `size`: all of them, or
    /// none (what was taken is given back).
    ///
    /// # Errors
    /// [`MemError::OutOfMemory`] when the arena has fewer free aligned blocks of that size.
    pub fn alloc_contig_blocks(&self, count: usize, size: PageSize) -> Result<Vec<PhysAddr>, MemError> {
        let mut blocks = Vec::with_capacity(count);
        for _ in 0..count {
            match self.alloc_contig(size) {
                Ok(b) => blocks.push(b),
                Err(e) => {
                    for &b in &blocks {
                        let _ = self.free_contig(b, size);
                    }
                    return Err(e);
                }
            }
        }
        Ok(blocks)
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

    /// Promises `n` free frames to the caller, as a [`Reservation`] token: plain allocations
    /// can no longer take them, and [`PhysMem::alloc_reserved_frame`] can always draw on the
    /// token. Page tables hold one so that splitting a huge leaf during an unmap never fails for
    /// lack of memory. Only the token's holder can draw on it or give it back, so no other user
    /// of the arena can take a table's split reserve away.
    ///
    /// # Errors
    /// [`MemError::OutOfMemory`] when fewer than `n` unreserved frames are free.
    pub fn reserve(&self, n: u64) -> Result<Reservation, MemError> {
        let mut r = Reservation { arena: self.serial, frames: 0 };
        self.reserve_more(&mut r, n)?;
        Ok(r)
    }

    /// Adds `n` frames to a reservation of this arena.
    ///
    /// # Errors
    /// [`MemError::ForeignReservation`] for another arena's token, [`MemError::OutOfMemory`]
    /// when fewer than `n` unreserved frames are free; the token is unchanged then.
    pub fn reserve_more(&self, r: &mut Reservation, n: u64) -> Result<(), MemError> {
        self.own(r)?;
        if n == 0 {
            return Ok(());
        }
        let mut b = self.frames.lock();
        b.reserve(n).map_err(|_| Self::oom(&b, n))?;
        r.frames += n;
        Ok(())
    }

    /// Gives `n` frames of a reservation back (all it holds, if it holds fewer) and returns how
    /// many went back.
    ///
    /// # Errors
    /// [`MemError::ForeignReservation`] for another arena's token.
    pub fn unreserve(&self, r: &mut Reservation, n: u64) -> Result<u64, MemError> {
        self.own(r)?;
        let n = n.min(r.frames);
        if n == 0 {
            return Ok(0);
        }
        self.frames.lock().unreserve(n);
        r.frames -= n;
        Ok(n)
    }

    /// Allocates one frame out of a reservation (which then holds one frame fewer).
    ///
    /// # Errors
    /// [`MemError::ForeignReservation`] for another arena's token, [`MemError::OutOfMemory`]
    /// when the token holds no frame.
    pub fn alloc_reserved_frame(&self, r: &mut Reservation) -> Result<PhysAddr, MemError> {
        self.own(r)?;
        let mut b = self.frames.lock();
        if r.frames == 0 {
            return Err(Self::oom(&b, 1));
        }
        let pa = b.alloc(0, true).map(to_pa).map_err(|_| Self::oom(&b, 1))?;
        r.frames -= 1;
        Ok(pa)
    }

    /// Allocates `n` frames out of a reservation, all or none, under one lock.
    ///
    /// # Errors
    /// [`MemError::ForeignReservation`] for another arena's token, [`MemError::OutOfMemory`]
    /// when the token holds fewer than `n` frames; nothing changes then.
    pub fn alloc_reserved_frames(&self, r: &mut Reservation, n: usize) -> Result<Vec<PhysAddr>, MemError> {
        self.own(r)?;
        let mut b = self.frames.lock();
        if r.frames < n as u64 {
            return Err(Self::oom(&b, n as u64));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            // Reserved frames are always free, so a draw within the reservation cannot fail.
            let f = b.alloc(0, true).map_err(|_| Self::oom(&b, 1))?;
            out.push(to_pa(f));
            r.frames -= 1;
        }
        Ok(out)
    }

    /// Moves `n` reserved frames from one token to another of the same arena (no frame moves:
    /// only who may draw on them).
    ///
    /// # Errors
    /// [`MemError::ForeignReservation`] when either token is another arena's,
    /// [`MemError::OutOfMemory`] when `from` holds fewer than `n`; nothing changes then.
    pub fn transfer_reserved(
        &self,
        from: &mut Reservation,
        to: &mut Reservation,
        n: u64,
    ) -> Result<(), MemError> {
        self.own(from)?;
        self.own(to)?;
        if from.frames < n {
            return Err(Self::oom(&self.frames.lock(), n));
        }
        from.frames -= n;
        to.frames += n;
        Ok(())
    }

    fn own(&self, r: &Reservation) -> Result<(), MemError> {
        if r.arena != self.serial {
            return Err(MemError::ForeignReservation);
        }
        Ok(())
    }
}

/// Serial numbers of arenas, so that a reservation names the arena it was taken from.
static ARENA_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Frames promised to one holder by [`PhysMem::reserve`]. Drawn on with
/// [`PhysMem::alloc_reserved_frame`], grown with [`PhysMem::reserve_more`], given back with
/// [`PhysMem::unreserve`]. A token dropped with frames still in it keeps them reserved (they are
/// lost to plain allocation until the arena goes): give them back first.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a reservation holds frames back until it is given back with PhysMem::unreserve"]
pub struct Reservation {
    arena: u64,
    frames: u64,
}

impl Reservation {
    /// Frames the token holds.
    #[must_use]
    pub fn frames(&self) -> u64 {
        self.frames
    }
}

impl PhysMem {
    /// The metadata word of the frame at `pa` (see the `meta` module): the frame's owner's to
    /// use, zero until it writes it. `None` for an unaligned address or one past the arena.
    #[inline]
    pub(crate) fn frame_word(&self, pa: PhysAddr) -> Option<&core::sync::atomic::AtomicU16> {
        let a = pa.as_u64();
        if a & (PAGE_SIZE - 1) != 0 {
            return None;
        }
        self.meta.get(a >> PAGE_SHIFT)
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
