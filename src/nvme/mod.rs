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

mod prp;
mod sgl;

pub use prp::{Prp, build_prp, read_prp};
pub use sgl::{SGL_TABLE_ENTRIES, Sgl, SglOptions, build_sgl, read_sgl, sgl_descriptor, sgl_type};

use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr, checked_end};
use crate::dma::{Attrs, Device, Direction, DmaError, DmaSeg, DmaVec};
use crate::iommu::DmaFault;

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
    pub(super) dev: Device,
    pub(super) page_size: u64,
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

    pub(super) fn take(&mut self, n: usize) -> Result<Vec<(PhysAddr, DmaAddr)>, NvmeError> {
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

/// The mask of a controller page size: `page_size - 1`, for a power of two from
/// [`MIN_PAGE_SIZE`] to [`MAX_PAGE_SIZE`].
pub(super) fn page_mask(page_size: u64) -> Result<u64, NvmeError> {
    if page_size.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        Ok(page_size - 1)
    } else {
        Err(NvmeError::BadPageSize(page_size))
    }
}

/// The exclusive end of a segment, refusing one that wraps.
pub(super) fn seg_end(s: &DmaSeg) -> Result<u64, NvmeError> {
    checked_end(s.addr.as_u64(), s.len)
        .ok_or(NvmeError::Dma(DmaError::SegmentOverflow { addr: s.addr, len: s.len }))
}

/// `data`'s segments and total length, checked as the builders need them: at least one segment,
/// none empty or wrapping (re-checked, not taken on trust from [`DmaVec::push`]), and a total
/// that neither overflows nor exceeds `max_len`.
pub(super) fn checked_segments(data: &DmaVec, max_len: u64) -> Result<(&[DmaSeg], u64), NvmeError> {
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

/// Linux's choice between the two: SGL when the controller supports it and the request's
/// average segment is at least 32 KiB, or when PRP cannot express the request at all (which
/// includes a `page_size` that is not a controller page size, a segment that wraps, and a first
/// byte that is not dword aligned, which PRP1 cannot carry). The
/// average is rounded up, as Linux's `nvme_pci_avg_seg_size` computes it (`DIV_ROUND_UP` of the
/// payload by the segment count): segments of 32 KiB and 32 KiB − 1 average 32 KiB.
#[must_use]
pub fn prefers_sgl(data: &DmaVec, page_size: u64, controller_supports_sgl: bool) -> bool {
    if !controller_supports_sgl || data.is_empty() {
        return false;
    }
    let segs = data.segments();
    let prp_ok = page_mask(page_size).is_ok_and(|mask| prp_expressible(segs, mask).is_ok());
    !prp_ok || data.total_len().div_ceil(segs.len() as u64) >= 32 << 10
}

/// Whether PRP can describe `segs` (non-empty) with a controller page mask `mask`: every segment
/// but the first starts on a page and every segment but the last ends on one
/// ([`NvmeError::NotPrpExpressible`] names the first that does not), and PRP1, the first byte,
/// has bits 1:0 clear ([`NvmeError::Unaligned`]). A segment that wraps is its
/// [`NvmeError::Dma`] error.
pub(super) fn prp_expressible(segs: &[DmaSeg], mask: u64) -> Result<(), NvmeError> {
    for (i, s) in segs.iter().enumerate() {
        if (i > 0 && s.addr.as_u64() & mask != 0) || (i + 1 < segs.len() && seg_end(s)? & mask != 0) {
            return Err(NvmeError::NotPrpExpressible { segment: i });
        }
    }
    match segs.first() {
        Some(s) if s.addr.as_u64() & 3 != 0 => Err(NvmeError::Unaligned(s.addr)),
        _ => Ok(()),
    }
}

/// The decoders' common check of `len`: not 0 and not over [`MAX_DECODE_LEN`].
pub(super) fn decode_len(len: u64) -> Result<usize, NvmeError> {
    if len == 0 {
        return Err(NvmeError::Empty);
    }
    if len > MAX_DECODE_LEN {
        return Err(NvmeError::TooLarge { len, max: MAX_DECODE_LEN });
    }
    usize::try_from(len).map_err(|_| NvmeError::TooLarge { len, max: MAX_DECODE_LEN })
}
