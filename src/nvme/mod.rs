//! NVMe data pointers built from a [`DmaVec`], and decoders that read them back as a controller
//! would (NVMe base specification; Linux `drivers/nvme/host/pci.c`; REFERENCES.md §2).
//!
//! **PRP** ([`build_prp`], [`read_prp`]): PRP1 is the address of the first byte; if the rest fits
//! in one more controller page, PRP2 is that page; otherwise PRP2 points at a PRP list of 8-byte
//! page addresses. A list page holds 512 entries; when more are needed its last slot points at
//! the next list page, so a full, chained page carries 511 data entries, and a list never
//! crosses a page. PRP needs every segment but the first to start on a page and every segment
//! but the last to end on one; anything else is [`NvmeError::NotPrpExpressible`], so the caller
//! can choose SGL.
//!
//! **SGL** ([`build_sgl`], [`read_sgl`]): 16-byte descriptors (`addr: u64, len: u32,
//! reserved: [u8; 3], id: u8`, type in the high nibble of `id`). One segment goes inline as a data
//! block; otherwise SGL1 is a last-segment descriptor pointing at a table of up to 256 data
//! descriptors (Linux 6.17+), or, with [`SglOptions::chain`], tables chained by a segment
//! descriptor in their last slot (older kernels).
//!
//! List pages and descriptor tables come from a [`ListPool`] of pages pre-mapped for the device
//! (Linux's `dma_pool`), so building a request maps nothing: it writes entries.
//!
//! **Hostile input.** No function here panics or wraps on any argument, in a debug build
//! either: page sizes are checked before any `page_size - 1`, addresses advance with checked or
//! wrapping arithmetic, and the builders re-check that no segment is empty or wraps even though
//! [`DmaVec::push`] refuses both. The decoders allocate at most [`MAX_DECODE_LEN`] bytes for the
//! data and one [`MAX_SGL_TABLE_LEN`]-byte table buffer, whatever `len` or the descriptors in
//! memory claim, and follow at most [`MAX_SGL_TABLES`] SGL tables, so pointers that loop end in
//! an error.
#![forbid(unsafe_code)]

use core::sync::atomic::Ordering;

use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr, checked_end};
use crate::dma::{Attrs, Device, Direction, DmaError, DmaSeg, DmaVec};
use crate::iommu::{DeviceId, DmaFault, Iommu};

/// Linux's limit on one request's data.
pub const MAX_TRANSFER: u64 = 8 << 20;

/// The most bytes [`read_prp`] or [`read_sgl`] decodes in one call: 64 MiB, eight times
/// [`MAX_TRANSFER`]. The decoders allocate the request's buffer before reading, so this, not the
/// `len` they are handed, bounds what they allocate: a `len` near `u64::MAX` is
/// [`NvmeError::TooLarge`] before any allocation. Eight times Linux's request limit leaves room
/// for controllers with a larger MDTS or larger pages (a 16 KiB-page PRP with 2100 entries is
/// 33 MiB) while keeping the worst case a modest buffer.
pub const MAX_DECODE_LEN: u64 = 8 * MAX_TRANSFER;

/// The smallest controller page size (CC.MPS = 0): 4 KiB.
pub const MIN_PAGE_SIZE: u64 = PAGE_SIZE;

/// The largest controller page size NVMe allows (CC.MPS = 15): 128 MiB.
pub const MAX_PAGE_SIZE: u64 = 128 << 20;

/// The largest SGL descriptor table [`read_sgl`] reads, in bytes: 4096, one 4 KiB page of
/// [`SGL_TABLE_ENTRIES`] descriptors, which is what Linux and [`build_sgl`] put in a table. The
/// table length is a `u32` taken from memory; without this cap a hostile descriptor would have the
/// decoder allocate up to 4 GiB for one table.
pub const MAX_SGL_TABLE_LEN: u32 = 16 * SGL_TABLE_ENTRIES as u32;

/// The most SGL descriptor tables [`read_sgl`] follows in one chain, and [`build_sgl`] builds: 65.
/// A chain of `t` tables carries `255 t + 1` data descriptors, and 65 tables carry one for every
/// 4 KiB page of [`MAX_DECODE_LEN`] plus one (a buffer scattered page by page). Without a bound a
/// segment descriptor that points at its own table, or any cycle of tables, is followed forever.
pub const MAX_SGL_TABLES: usize = ((MAX_DECODE_LEN / PAGE_SIZE) as usize).div_ceil(SGL_TABLE_ENTRIES - 1);

/// The most segments [`build_sgl`] puts in a chain of [`MAX_SGL_TABLES`] tables: 16 576.
pub const MAX_SGL_SEGMENTS: usize = MAX_SGL_TABLES * (SGL_TABLE_ENTRIES - 1) + 1;

/// Errors of the NVMe builders and decoders.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NvmeError {
    /// An empty request.
    #[error("empty request")]
    Empty,
    /// More data than one request may carry.
    #[error("request of {len:#x} bytes exceeds the {max:#x}-byte limit")]
    TooLarge {
        /// Bytes asked for.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A join between segments that PRP cannot express (use SGL).
    #[error("segment {segment} breaks the PRP page rule (inner joins must fall on page boundaries); use SGL")]
    NotPrpExpressible {
        /// The segment that starts or ends off a page.
        segment: usize,
    },
    /// PRP1 must be dword aligned (bits 1:0 zero).
    #[error("{0} is not dword aligned")]
    Unaligned(DmaAddr),
    /// A controller page size that is not a power of two from [`MIN_PAGE_SIZE`] to
    /// [`MAX_PAGE_SIZE`], or (building a PRP) not the list pool's page size.
    #[error("controller page size {0:#x} is not a power of two in 4 KiB..=128 MiB, or not the pool's")]
    BadPageSize(u64),
    /// More segments than one SGL descriptor table holds, without chaining, or than
    /// [`MAX_SGL_SEGMENTS`], with it.
    #[error("{segments} segments exceed the {max} an SGL may carry here; enable chaining if it is off")]
    TooManySegments {
        /// Segments in the request.
        segments: usize,
        /// Descriptors per table.
        max: usize,
    },
    /// The pool has no free list page.
    #[error("list pool exhausted")]
    PoolExhausted,
    /// A PRP entry after the first carries an offset ("PRP Offset Invalid").
    #[error("PRP entry {0} carries an offset")]
    PrpOffsetInvalid(DmaAddr),
    /// A descriptor the decoder does not accept.
    #[error("invalid SGL descriptor type {0:#x}")]
    BadDescriptor(u8),
    /// A descriptor table whose length is not a positive multiple of 16 bytes, or is over
    /// [`MAX_SGL_TABLE_LEN`].
    #[error("SGL segment length {0:#x} is not a positive multiple of 16 of at most 4096")]
    BadSegmentLength(u32),
    /// An SGL that chains more descriptor tables than [`MAX_SGL_TABLES`] (segment descriptors
    /// that loop, for one).
    #[error("SGL chains more than {max} descriptor tables")]
    SglChainTooLong {
        /// The limit.
        max: usize,
    },
    /// The pointers describe fewer or more bytes than the request.
    #[error("data pointers describe {described:#x} bytes, the request has {len:#x}")]
    LengthMismatch {
        /// Bytes the descriptors cover.
        described: u64,
        /// Bytes of the request.
        len: u64,
    },
    /// The controller's DMA faulted.
    #[error(transparent)]
    Fault(#[from] DmaFault),
    /// Mapping the pool failed.
    #[error(transparent)]
    Dma(#[from] DmaError),
}

/// Pages pre-mapped for a device's reads, from which PRP lists and SGL tables are carved. Pool
/// pages have the controller's page size (CC.MPS), since a PRP list fills exactly one.
#[derive(Debug)]
pub struct ListPool {
    dev: Device,
    page_size: u64,
    free: Vec<(PhysAddr, DmaAddr)>,
    all: Vec<(PhysAddr, DmaAddr)>,
}

impl ListPool {
    /// `pages` 4 KiB list pages (Linux's controller page size), allocated from the device's arena
    /// and mapped device-readable.
    ///
    /// # Errors
    /// [`NvmeError::Dma`] when the arena or the IOMMU refuses (what was taken is given back).
    pub fn new(dev: &Device, pages: usize) -> Result<Self, NvmeError> {
        Self::with_page_size(dev, pages, PAGE_SIZE)
    }

    /// As [`ListPool::new`] for a controller page size of `page_size` (a power of two, 4 KiB up
    /// to 128 MiB as NVMe allows; physically contiguous pages of that size).
    ///
    /// # Errors
    /// [`NvmeError::BadPageSize`], and as [`ListPool::new`].
    pub fn with_page_size(dev: &Device, pages: usize, page_size: u64) -> Result<Self, NvmeError> {
        page_mask(page_size)?;
        let mem = dev.mem().clone();
        // Reserve for at most 4096 pages up front: `pages` may be absurd, and the arena says so.
        let mut pool = ListPool {
            dev: dev.clone(),
            page_size,
            free: Vec::with_capacity(pages.min(4096)),
            all: Vec::new(),
        };
        for _ in 0..pages {
            let pa = mem.alloc_block(page_size).map_err(|_| NvmeError::PoolExhausted)?;
            match dev.map_phys(pa, page_size, Direction::ToDevice, Attrs::default()) {
                Ok(dma) => {
                    pool.all.push((pa, dma));
                    pool.free.push((pa, dma));
                }
                Err(e) => {
                    let _ = mem.free_block(pa, page_size);
                    return Err(e.into());
                }
            }
        }
        Ok(pool)
    }

    /// The page size of the pool (the controller page size its lists are built for).
    #[must_use]
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Free pages now.
    #[must_use]
    pub fn available(&self) -> usize {
        self.free.len()
    }

    fn take(&mut self, n: usize) -> Result<Vec<(PhysAddr, DmaAddr)>, NvmeError> {
        if n > self.free.len() {
            return Err(NvmeError::PoolExhausted);
        }
        Ok(self.free.split_off(self.free.len() - n))
    }

    /// Gives a request's list pages back.
    pub fn release(&mut self, pages: Vec<(PhysAddr, DmaAddr)>) {
        self.free.extend(pages);
    }
}

impl Drop for ListPool {
    fn drop(&mut self) {
        for &(pa, dma) in &self.all {
            let _ = self.dev.unmap(dma, self.page_size, Direction::ToDevice, Attrs::default());
            let _ = self.dev.mem().free_block(pa, self.page_size);
        }
    }
}

/// A built PRP data pointer: PRP1, PRP2 and the list pages it uses (give them back with
/// [`ListPool::release`] when the command completes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prp {
    /// Address of the first byte.
    pub prp1: DmaAddr,
    /// Second page, list pointer, or 0.
    pub prp2: DmaAddr,
    /// List pages used, in chain order.
    pub lists: Vec<(PhysAddr, DmaAddr)>,
}

/// The mask of a controller page size: `page_size - 1`, for a power of two from
/// [`MIN_PAGE_SIZE`] to [`MAX_PAGE_SIZE`].
fn page_mask(page_size: u64) -> Result<u64, NvmeError> {
    if page_size.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        Ok(page_size - 1)
    } else {
        Err(NvmeError::BadPageSize(page_size))
    }
}

/// The exclusive end of a segment, refusing one that wraps.
fn seg_end(s: &DmaSeg) -> Result<u64, NvmeError> {
    checked_end(s.addr.as_u64(), s.len)
        .ok_or(NvmeError::Dma(DmaError::SegmentOverflow { addr: s.addr, len: s.len }))
}

/// `data`'s segments and total length, checked as the builders need them: at least one segment,
/// none empty or wrapping (re-checked, not taken on trust from [`DmaVec::push`]), and a total
/// that neither overflows nor exceeds `max_len`.
fn checked_segments(data: &DmaVec, max_len: u64) -> Result<(&[DmaSeg], u64), NvmeError> {
    let segs = data.segments();
    if segs.is_empty() {
        return Err(NvmeError::Empty);
    }
    let mut len = 0u64;
    for (index, s) in segs.iter().enumerate() {
        if s.len == 0 {
            return Err(NvmeError::Dma(DmaError::EmptySegment { index }));
        }
        seg_end(s)?;
        len = len.checked_add(s.len).ok_or(NvmeError::TooLarge { len: u64::MAX, max: max_len })?;
    }
    if len > max_len {
        return Err(NvmeError::TooLarge { len, max: max_len });
    }
    Ok((segs, len))
}

/// Builds PRP1/PRP2 (and list pages from `pool`) for `data`, with controller page size
/// `page_size` (4096 in Linux; it must be the pool's) and at most `max_len` bytes (8 MiB in
/// Linux). PRP2 is 0 only when the data fits in PRP1's page.
///
/// # Errors
/// [`NvmeError::BadPageSize`] (checked first), [`NvmeError::Empty`], [`NvmeError::Dma`] with
/// [`DmaError::EmptySegment`] or [`DmaError::SegmentOverflow`] for a segment that is empty or
/// wraps, [`NvmeError::TooLarge`] (also when the lengths overflow `u64`), [`NvmeError::Unaligned`],
/// [`NvmeError::NotPrpExpressible`], [`NvmeError::PoolExhausted`] (nothing is taken then).
pub fn build_prp(pool: &mut ListPool, data: &DmaVec, page_size: u64, max_len: u64) -> Result<Prp, NvmeError> {
    let mask = page_mask(page_size)?;
    // A list fills one pool page, so the pool must have the controller's page size.
    if page_size != pool.page_size {
        return Err(NvmeError::BadPageSize(page_size));
    }
    let (segs, len) = checked_segments(data, max_len)?;
    for (i, s) in segs.iter().enumerate() {
        if (i > 0 && s.addr.as_u64() & mask != 0) || (i + 1 < segs.len() && seg_end(s)? & mask != 0) {
            return Err(NvmeError::NotPrpExpressible { segment: i });
        }
    }
    let prp1 = segs[0].addr;
    if prp1.as_u64() & 3 != 0 {
        return Err(NvmeError::Unaligned(prp1));
    }
    let first_chunk = page_size - (prp1.as_u64() & mask);
    if len <= first_chunk {
        return Ok(Prp { prp1, prp2: DmaAddr::ZERO, lists: Vec::new() });
    }
    // Entries after PRP1: one per remaining page (counted per segment, not page by page). Here
    // there are at least two pages: the data runs past PRP1's.
    let mut pages = 0u64;
    for s in segs {
        let touched = (seg_end(s)? - (s.addr.as_u64() & !mask)).div_ceil(page_size);
        pages = pages.saturating_add(touched);
    }
    let entries = usize::try_from(pages.saturating_sub(1)).map_err(|_| NvmeError::PoolExhausted)?;
    // What the page iterator yields after PRP1 must match the count; it cannot fall short for
    // checked segments, but a short list is an error rather than a 0 entry.
    let short = NvmeError::LengthMismatch { described: first_chunk, len };
    if entries == 1 {
        let prp2 = data.page_addrs(page_size)?.nth(1).ok_or(short)?;
        return Ok(Prp { prp1, prp2, lists: Vec::new() });
    }
    let per = (page_size / 8) as usize; // 512 for 4 KiB pages
    // Pages needed: each full page but the last carries per - 1 entries.
    let lists_needed = if entries <= per { 1 } else { 1 + (entries - per).div_ceil(per - 1) };
    let lists = pool.take(lists_needed)?;
    match fill_prp_lists(pool, &lists, data, page_size, entries) {
        Ok(()) => Ok(Prp { prp1, prp2: lists[0].1, lists }),
        Err(e) => {
            pool.release(lists);
            Err(e)
        }
    }
}

/// Fills `lists` (taken from `pool`) with the `entries` page addresses of `data` after PRP1:
/// data slots, and in every page but the last a chain pointer in its last slot.
fn fill_prp_lists(
    pool: &ListPool,
    lists: &[(PhysAddr, DmaAddr)],
    data: &DmaVec,
    page_size: u64,
    entries: usize,
) -> Result<(), NvmeError> {
    let per = (page_size / 8) as usize;
    let mem = pool.dev.mem();
    // A list page is seen as its 4 KiB chunks of 512 entries, each filled by a plain loop over
    // the page addresses.
    let chunks = (page_size / PAGE_SIZE) as usize;
    let mut pages = data.page_addrs(page_size)?.map(DmaAddr::as_u64);
    pages.next(); // the first page is PRP1's
    let mut left = entries;
    for (k, &(pa, _)) in lists.iter().enumerate() {
        let last = k + 1 == lists.len();
        let data_slots = if last { left } else { per - 1 };
        let mut written = 0;
        for c in 0..chunks {
            if written == data_slots {
                break;
            }
            let chunk = pa
                .checked_add(c as u64 * PAGE_SIZE)
                .and_then(|at| mem.table(at))
                .ok_or(NvmeError::PoolExhausted)?;
            let n = (data_slots - written).min(512);
            for e in &chunk[..n] {
                let page = pages.next().ok_or(NvmeError::LengthMismatch {
                    described: page_size.saturating_mul((entries - left + written) as u64),
                    len: data.total_len(),
                })?;
                e.store(page.to_le(), Ordering::Relaxed);
            }
            written += n;
        }
        if !last {
            let t = pa
                .checked_add((chunks as u64 - 1) * PAGE_SIZE)
                .and_then(|tail| mem.table(tail))
                .ok_or(NvmeError::PoolExhausted)?;
            t[511].store(lists[k + 1].1.as_u64().to_le(), Ordering::Relaxed);
        }
        left -= data_slots;
    }
    core::sync::atomic::fence(Ordering::Release);
    Ok(())
}

/// Linux's choice between the two: SGL when the controller supports it and the request's
/// average segment is at least 32 KiB, or when PRP cannot express the request at all (which
/// includes a `page_size` that is not a controller page size, and a segment that wraps).
#[must_use]
pub fn prefers_sgl(data: &DmaVec, page_size: u64, controller_supports_sgl: bool) -> bool {
    if !controller_supports_sgl || data.is_empty() {
        return false;
    }
    let segs = data.segments();
    let prp_ok = page_mask(page_size).is_ok_and(|mask| {
        segs.iter().enumerate().all(|(i, s)| {
            (i == 0 || s.addr.as_u64() & mask == 0)
                && (i + 1 == segs.len() || seg_end(s).is_ok_and(|end| end & mask == 0))
        })
    });
    !prp_ok || data.total_len() / segs.len() as u64 >= 32 << 10
}

/// The decoders' common check of `len`: not 0 and not over [`MAX_DECODE_LEN`].
fn decode_len(len: u64) -> Result<usize, NvmeError> {
    if len == 0 {
        return Err(NvmeError::Empty);
    }
    if len > MAX_DECODE_LEN {
        return Err(NvmeError::TooLarge { len, max: MAX_DECODE_LEN });
    }
    usize::try_from(len).map_err(|_| NvmeError::TooLarge { len, max: MAX_DECODE_LEN })
}

/// The controller's side: reads the `len` bytes a PRP pair describes, through the IOMMU as
/// device `dev`, checking every entry after the first for an offset and never letting a list
/// cross a page. A chain pointer (the last slot of a full list page) must be page aligned like
/// every other list entry, so each list page yields at least `page_size / 8 - 1` data entries and
/// list pointers that loop still end once `len` bytes are read. Allocates `len` bytes, at most
/// [`MAX_DECODE_LEN`].
///
/// # Errors
/// In this order: [`NvmeError::BadPageSize`] (`page_size` not a power of two from
/// [`MIN_PAGE_SIZE`] to [`MAX_PAGE_SIZE`]), [`NvmeError::Empty`] (`len == 0`),
/// [`NvmeError::TooLarge`] (`len` over [`MAX_DECODE_LEN`]), [`NvmeError::Unaligned`] (PRP1 not
/// dword aligned), then, as the pointers are followed, [`NvmeError::PrpOffsetInvalid`] and
/// [`NvmeError::Fault`] (an unmapped or unreadable address, or one past 2^64).
pub fn read_prp(
    iommu: &Iommu,
    dev: DeviceId,
    prp1: DmaAddr,
    prp2: DmaAddr,
    len: u64,
    page_size: u64,
) -> Result<Vec<u8>, NvmeError> {
    let mask = page_mask(page_size)?;
    let size = decode_len(len)?;
    if prp1.as_u64() & 3 != 0 {
        return Err(NvmeError::Unaligned(prp1));
    }
    let mut out = vec![0u8; size];
    // Offsets into `out` are below `len`, at most MAX_DECODE_LEN: they fit a usize.
    let first = (page_size - (prp1.as_u64() & mask)).min(len);
    iommu.dma_read(dev, prp1, &mut out[..first as usize])?;
    let mut done = first;
    if done == len {
        return Ok(out);
    }
    if len - done <= page_size {
        if prp2.as_u64() & mask != 0 {
            return Err(NvmeError::PrpOffsetInvalid(prp2));
        }
        iommu.dma_read(dev, prp2, &mut out[done as usize..])?;
        return Ok(out);
    }
    let per = page_size / 8;
    let mut list = prp2;
    if list.as_u64() & 7 != 0 {
        return Err(NvmeError::PrpOffsetInvalid(list));
    }
    // The slot index within the current list page (the first list may start mid-page).
    let mut slot = (list.as_u64() & mask) / 8;
    while done < len {
        let pages_left = (len - done).div_ceil(page_size);
        if slot == per - 1 && pages_left > 1 {
            // The last slot of a page chains to the next list page, which starts at slot 0.
            let next = DmaAddr::new(iommu.dma_read_u64(dev, list)?);
            if next.as_u64() & mask != 0 {
                return Err(NvmeError::PrpOffsetInvalid(next));
            }
            list = next;
            slot = 0;
            continue;
        }
        let entry = DmaAddr::new(iommu.dma_read_u64(dev, list)?);
        if entry.as_u64() & mask != 0 {
            return Err(NvmeError::PrpOffsetInvalid(entry));
        }
        let n = (len - done).min(page_size);
        iommu.dma_read(dev, entry, &mut out[done as usize..(done + n) as usize])?;
        done += n;
        // The next slot. This wraps only after the last slot of the top page of the address
        // space, whose successor is never read: a chain starts at slot 0, and the top page's
        // last slot is a chain pointer unless it is the final entry.
        list = DmaAddr::new(list.as_u64().wrapping_add(8));
        slot += 1;
    }
    Ok(out)
}

/// SGL descriptor types (high nibble of the identifier byte).
pub mod sgl_type {
    /// Data block.
    pub const DATA: u8 = 0x0;
    /// Bit bucket.
    pub const BIT_BUCKET: u8 = 0x1;
    /// Segment: points at the next table, which is not the last.
    pub const SEGMENT: u8 = 0x2;
    /// Last segment: points at the last table.
    pub const LAST_SEGMENT: u8 = 0x3;
}

/// Descriptors per 4 KiB table.
pub const SGL_TABLE_ENTRIES: usize = (PAGE_SIZE / 16) as usize;

/// One 16-byte SGL descriptor, little endian: `addr: u64, len: u32, reserved: [u8; 3], id: u8`.
#[must_use]
pub fn sgl_descriptor(addr: DmaAddr, len: u32, typ: u8) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.as_u64().to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[15] = typ << 4;
    d
}

fn parse_descriptor(d: &[u8]) -> (DmaAddr, u32, u8) {
    let mut a = [0u8; 8];
    a.copy_from_slice(&d[..8]);
    let mut l = [0u8; 4];
    l.copy_from_slice(&d[8..12]);
    (DmaAddr::new(u64::from_le_bytes(a)), u32::from_le_bytes(l), d[15] >> 4)
}

/// How to build an SGL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SglOptions {
    /// Chain tables with segment descriptors (older kernels) instead of refusing more than one
    /// table's worth of segments.
    pub chain: bool,
}

/// A built SGL data pointer: the command's SGL1 descriptor and the tables it uses (give them
/// back with [`ListPool::release`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sgl {
    /// The descriptor in the command.
    pub sgl1: [u8; 16],
    /// Descriptor tables, in chain order.
    pub tables: Vec<(PhysAddr, DmaAddr)>,
}

/// Builds an SGL for `data`: one segment inline as a data block, otherwise a last-segment
/// descriptor to one table of data descriptors, or a chain of tables with `opts.chain` (at most
/// [`MAX_SGL_TABLES`], so that [`read_sgl`] follows all of it).
///
/// # Errors
/// [`NvmeError::Empty`], [`NvmeError::Dma`] with [`DmaError::EmptySegment`] or
/// [`DmaError::SegmentOverflow`] for a segment that is empty or wraps, [`NvmeError::TooLarge`]
/// (a segment over 4 GiB, or the request over `max_len` or past `u64::MAX`),
/// [`NvmeError::TooManySegments`] (over [`SGL_TABLE_ENTRIES`] without chaining, over
/// [`MAX_SGL_SEGMENTS`] with it), [`NvmeError::PoolExhausted`] (nothing is taken then).
pub fn build_sgl(
    pool: &mut ListPool,
    data: &DmaVec,
    max_len: u64,
    opts: SglOptions,
) -> Result<Sgl, NvmeError> {
    let (segs, _) = checked_segments(data, max_len)?;
    let seg_len = |s: &DmaSeg| {
        u32::try_from(s.len).map_err(|_| NvmeError::TooLarge { len: s.len, max: u64::from(u32::MAX) })
    };
    if segs.len() == 1 {
        return Ok(Sgl {
            sgl1: sgl_descriptor(segs[0].addr, seg_len(&segs[0])?, sgl_type::DATA),
            tables: Vec::new(),
        });
    }
    let per = SGL_TABLE_ENTRIES;
    if segs.len() > per && !opts.chain {
        return Err(NvmeError::TooManySegments { segments: segs.len(), max: per });
    }
    if segs.len() > MAX_SGL_SEGMENTS {
        return Err(NvmeError::TooManySegments { segments: segs.len(), max: MAX_SGL_SEGMENTS });
    }
    let mut lens = Vec::with_capacity(segs.len());
    for s in segs {
        lens.push(seg_len(s)?);
    }
    // Tables: every one but the last carries per - 1 data descriptors and a pointer.
    let n_tables = if segs.len() <= per { 1 } else { 1 + (segs.len() - per).div_ceil(per - 1) };
    let tables = pool.take(n_tables)?;
    match fill_sgl_tables(pool, &tables, segs, &lens) {
        Ok(sgl1) => Ok(Sgl { sgl1, tables }),
        Err(e) => {
            pool.release(tables);
            Err(e)
        }
    }
}

/// Writes the descriptor tables of a chained or single-table SGL into `tables` and returns SGL1.
fn fill_sgl_tables(
    pool: &ListPool,
    tables: &[(PhysAddr, DmaAddr)],
    segs: &[DmaSeg],
    lens: &[u32],
) -> Result<[u8; 16], NvmeError> {
    let per = SGL_TABLE_ENTRIES;
    let n_tables = tables.len();
    let mem = pool.dev.mem();
    // Bytes of each table: at most SGL_TABLE_ENTRIES descriptors, so at most 4096.
    let mut table_len = Vec::with_capacity(n_tables);
    let mut at = 0usize;
    for k in 0..n_tables {
        let last = k + 1 == n_tables;
        let n = if last { segs.len() - at } else { per - 1 };
        table_len.push(16 * (n + usize::from(!last)) as u32);
        at += n;
    }
    at = 0;
    let mut buf = Vec::with_capacity(MAX_SGL_TABLE_LEN as usize);
    for (k, &(pa, _)) in tables.iter().enumerate() {
        let last = k + 1 == n_tables;
        let n = if last { segs.len() - at } else { per - 1 };
        buf.clear();
        for (s, &l) in segs[at..at + n].iter().zip(&lens[at..at + n]) {
            buf.extend_from_slice(&sgl_descriptor(s.addr, l, sgl_type::DATA));
        }
        if !last {
            let typ = if k + 2 == n_tables { sgl_type::LAST_SEGMENT } else { sgl_type::SEGMENT };
            buf.extend_from_slice(&sgl_descriptor(tables[k + 1].1, table_len[k + 1], typ));
        }
        mem.write(pa, &buf).map_err(|_| NvmeError::PoolExhausted)?;
        at += n;
    }
    let first_typ = if n_tables == 1 { sgl_type::LAST_SEGMENT } else { sgl_type::SEGMENT };
    Ok(sgl_descriptor(tables[0].1, table_len[0], first_typ))
}

/// The controller's side: reads the `len` bytes an SGL describes, through the IOMMU as `dev`.
/// Allocates `len` bytes (at most [`MAX_DECODE_LEN`]) and one table buffer of
/// [`MAX_SGL_TABLE_LEN`] bytes, and follows at most [`MAX_SGL_TABLES`] tables, whatever the
/// descriptors in memory say.
///
/// # Errors
/// [`NvmeError::Empty`] (`len == 0`) and [`NvmeError::TooLarge`] (`len` over
/// [`MAX_DECODE_LEN`]) before anything is read; then, as the descriptors are followed,
/// [`NvmeError::BadDescriptor`] (a bit bucket, an unknown type, or a segment pointer that is not
/// the last descriptor of a segment table), [`NvmeError::BadSegmentLength`] (a table length that
/// is 0, not a multiple of 16 or over [`MAX_SGL_TABLE_LEN`]), [`NvmeError::SglChainTooLong`],
/// [`NvmeError::LengthMismatch`] (more data than `len` as soon as it shows, or less at the end),
/// [`NvmeError::Fault`].
pub fn read_sgl(iommu: &Iommu, dev: DeviceId, sgl1: &[u8; 16], len: u64) -> Result<Vec<u8>, NvmeError> {
    let mut out = Vec::with_capacity(decode_len(len)?);
    let read_data = |addr: DmaAddr, n: u32, out: &mut Vec<u8>| -> Result<(), NvmeError> {
        let at = out.len();
        // `at` is at most `len`, so neither this sum nor the resize below can overflow.
        let end = (at as u64).saturating_add(u64::from(n));
        if end > len {
            return Err(NvmeError::LengthMismatch { described: end, len });
        }
        out.resize(end as usize, 0);
        iommu.dma_read(dev, addr, &mut out[at..])?;
        Ok(())
    };
    let mut buf = [0u8; MAX_SGL_TABLE_LEN as usize];
    let mut tables = 0usize;
    let (mut addr, mut n, mut typ) = parse_descriptor(sgl1);
    loop {
        match typ {
            sgl_type::DATA => {
                read_data(addr, n, &mut out)?;
                break;
            }
            sgl_type::SEGMENT | sgl_type::LAST_SEGMENT => {
                if n == 0 || n % 16 != 0 || n > MAX_SGL_TABLE_LEN {
                    return Err(NvmeError::BadSegmentLength(n));
                }
                tables += 1;
                if tables > MAX_SGL_TABLES {
                    return Err(NvmeError::SglChainTooLong { max: MAX_SGL_TABLES });
                }
                let table = &mut buf[..n as usize];
                iommu.dma_read(dev, addr, table)?;
                let count = table.len() / 16;
                let mut next = None;
                for (i, d) in table.chunks_exact(16).enumerate() {
                    let (a, l, t) = parse_descriptor(d);
                    match t {
                        sgl_type::DATA => read_data(a, l, &mut out)?,
                        sgl_type::SEGMENT | sgl_type::LAST_SEGMENT
                            if i + 1 == count && typ == sgl_type::SEGMENT =>
                        {
                            next = Some((a, l, t));
                        }
                        other => return Err(NvmeError::BadDescriptor(other)),
                    }
                }
                match next {
                    Some((a, l, t)) => (addr, n, typ) = (a, l, t),
                    None => break,
                }
            }
            other => return Err(NvmeError::BadDescriptor(other)),
        }
    }
    if out.len() as u64 != len {
        return Err(NvmeError::LengthMismatch { described: out.len() as u64, len });
    }
    Ok(out)
}
