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
#![forbid(unsafe_code)]

use core::sync::atomic::Ordering;

use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::dma::{Attrs, Device, Direction, DmaError, DmaVec};
use crate::iommu::{DeviceId, DmaFault, Iommu};

/// Linux's limit on one request's data.
pub const MAX_TRANSFER: u64 = 8 << 20;

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
    /// A controller page size other than the 4 KiB of the list pool's pages.
    #[error("controller page size {0:#x} is not supported (list pages are 4 KiB)")]
    BadPageSize(u64),
    /// More segments than one SGL descriptor table holds, without chaining.
    #[error("{segments} segments exceed one descriptor table ({max}); enable chaining")]
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
    /// A descriptor table whose length is not a multiple of 16 bytes, or too short.
    #[error("SGL segment length {0:#x} is not a positive multiple of 16")]
    BadSegmentLength(u32),
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
        if !page_size.is_power_of_two() || !(PAGE_SIZE..=128 << 20).contains(&page_size) {
            return Err(NvmeError::BadPageSize(page_size));
        }
        let mem = dev.mem().clone();
        let mut pool =
            ListPool { dev: dev.clone(), page_size, free: Vec::with_capacity(pages), all: Vec::new() };
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

/// Builds PRP1/PRP2 (and list pages from `pool`) for `data`, with controller page size
/// `page_size` (4096 in Linux; it must be the pool's) and at most `max_len` bytes (8 MiB in
/// Linux).
///
/// # Errors
/// [`NvmeError::Empty`], [`NvmeError::TooLarge`], [`NvmeError::BadPageSize`],
/// [`NvmeError::Unaligned`], [`NvmeError::NotPrpExpressible`], [`NvmeError::PoolExhausted`].
pub fn build_prp(pool: &mut ListPool, data: &DmaVec, page_size: u64, max_len: u64) -> Result<Prp, NvmeError> {
    // A list fills one pool page, so the pool must have the controller's page size.
    if page_size != pool.page_size {
        return Err(NvmeError::BadPageSize(page_size));
    }
    let segs = data.segments();
    if segs.is_empty() {
        return Err(NvmeError::Empty);
    }
    let len = data.total_len();
    if len == 0 {
        return Err(NvmeError::Empty);
    }
    if len > max_len {
        return Err(NvmeError::TooLarge { len, max: max_len });
    }
    let mask = page_size - 1;
    for (i, s) in segs.iter().enumerate() {
        if (i > 0 && s.addr.as_u64() & mask != 0)
            || (i + 1 < segs.len() && (s.addr.as_u64() + s.len) & mask != 0)
        {
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
    // Entries after PRP1: one per remaining page (counted per segment, not page by page).
    let pages: u64 =
        segs.iter().map(|s| (s.addr.as_u64() + s.len - (s.addr.as_u64() & !mask)).div_ceil(page_size)).sum();
    let entries = (pages - 1) as usize;
    if entries == 1 {
        let prp2 = data.page_addrs(page_size)?.nth(1).unwrap_or(DmaAddr::ZERO);
        return Ok(Prp { prp1, prp2, lists: Vec::new() });
    }
    let per = (page_size / 8) as usize; // 512 for 4 KiB pages
    // Pages needed: each full page but the last carries per - 1 entries.
    let lists_needed = if entries <= per { 1 } else { 1 + (entries - per).div_ceil(per - 1) };
    let lists = pool.take(lists_needed)?;
    let mem = pool.dev.mem().clone();
    // Fill the list pages in order: data slots, and in every page but the last a chain pointer
    // in its last slot. A list page is seen as its 4 KiB chunks of 512 entries, each filled by a
    // plain loop over the page addresses.
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
            let chunk = mem
                .table(PhysAddr::new(pa.as_u64() + c as u64 * PAGE_SIZE))
                .ok_or(NvmeError::PoolExhausted)?;
            let n = (data_slots - written).min(512);
            for e in &chunk[..n] {
                e.store(pages.next().unwrap_or(0).to_le(), Ordering::Relaxed);
            }
            written += n;
        }
        if !last {
            let tail = PhysAddr::new(pa.as_u64() + (chunks as u64 - 1) * PAGE_SIZE);
            let t = mem.table(tail).ok_or(NvmeError::PoolExhausted)?;
            t[511].store(lists[k + 1].1.as_u64().to_le(), Ordering::Relaxed);
        }
        left -= data_slots;
    }
    core::sync::atomic::fence(Ordering::Release);
    Ok(Prp { prp1, prp2: lists[0].1, lists })
}

/// Linux's choice between the two: SGL when the controller supports it and the request's
/// average segment is at least 32 KiB, or when PRP cannot express the request at all.
#[must_use]
pub fn prefers_sgl(data: &DmaVec, page_size: u64, controller_supports_sgl: bool) -> bool {
    if !controller_supports_sgl || data.is_empty() {
        return false;
    }
    let segs = data.segments();
    let mask = page_size.max(1) - 1;
    let prp_ok = segs.iter().enumerate().all(|(i, s)| {
        (i == 0 || s.addr.as_u64() & mask == 0)
            && (i + 1 == segs.len() || (s.addr.as_u64() + s.len) & mask == 0)
    });
    !prp_ok || data.total_len() / segs.len() as u64 >= 32 << 10
}

/// The controller's side: reads the `len` bytes a PRP pair describes, through the IOMMU as
/// device `dev`, checking every entry after the first for an offset and never letting a list
/// cross a page.
///
/// # Errors
/// [`NvmeError::PrpOffsetInvalid`], [`NvmeError::Fault`] (an unmapped or unreadable address).
pub fn read_prp(
    iommu: &Iommu,
    dev: DeviceId,
    prp1: DmaAddr,
    prp2: DmaAddr,
    len: u64,
    page_size: u64,
) -> Result<Vec<u8>, NvmeError> {
    let mask = page_size - 1;
    let mut out = vec![0u8; len as usize];
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
    // The slot index within the current list page (a list may start mid-page).
    let mut slot = (list.as_u64() & mask) / 8;
    while done < len {
        let pages_left = (len - done).div_ceil(page_size);
        if slot == per - 1 && pages_left > 1 {
            // The last slot of a page chains to the next list page.
            let next = DmaAddr::new(iommu.dma_read_u64(dev, list)?);
            if next.as_u64() & 7 != 0 {
                return Err(NvmeError::PrpOffsetInvalid(next));
            }
            list = next;
            slot = (list.as_u64() & mask) / 8;
            continue;
        }
        let entry = DmaAddr::new(iommu.dma_read_u64(dev, list)?);
        if entry.as_u64() & mask != 0 {
            return Err(NvmeError::PrpOffsetInvalid(entry));
        }
        let n = (len - done).min(page_size);
        iommu.dma_read(dev, entry, &mut out[done as usize..(done + n) as usize])?;
        done += n;
        list = DmaAddr::new(list.as_u64() + 8);
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
/// descriptor to one table of data descriptors, or a chain of tables with `opts.chain`.
///
/// # Errors
/// [`NvmeError::Empty`], [`NvmeError::TooLarge`] (a segment over 4 GiB, or the request over
/// `max_len`), [`NvmeError::TooManySegments`], [`NvmeError::PoolExhausted`].
pub fn build_sgl(
    pool: &mut ListPool,
    data: &DmaVec,
    max_len: u64,
    opts: SglOptions,
) -> Result<Sgl, NvmeError> {
    let segs = data.segments();
    let len = data.total_len();
    if segs.is_empty() || len == 0 {
        return Err(NvmeError::Empty);
    }
    if len > max_len {
        return Err(NvmeError::TooLarge { len, max: max_len });
    }
    let seg_len = |i: usize| {
        u32::try_from(segs[i].len)
            .map_err(|_| NvmeError::TooLarge { len: segs[i].len, max: u64::from(u32::MAX) })
    };
    if segs.len() == 1 {
        return Ok(Sgl {
            sgl1: sgl_descriptor(segs[0].addr, seg_len(0)?, sgl_type::DATA),
            tables: Vec::new(),
        });
    }
    let per = SGL_TABLE_ENTRIES;
    if segs.len() > per && !opts.chain {
        return Err(NvmeError::TooManySegments { segments: segs.len(), max: per });
    }
    for i in 0..segs.len() {
        seg_len(i)?;
    }
    // Tables: every one but the last carries per - 1 data descriptors and a pointer.
    let n_tables = if segs.len() <= per { 1 } else { 1 + (segs.len() - per).div_ceil(per - 1) };
    let tables = pool.take(n_tables)?;
    let mem = pool.dev.mem().clone();
    let mut at = 0usize;
    let mut counts = Vec::with_capacity(n_tables);
    for k in 0..n_tables {
        let last = k + 1 == n_tables;
        let n = if last { segs.len() - at } else { per - 1 };
        counts.push(n + usize::from(!last));
        at += n;
    }
    at = 0;
    for (k, &(pa, _)) in tables.iter().enumerate() {
        let last = k + 1 == n_tables;
        let n = if last { segs.len() - at } else { per - 1 };
        let mut buf = Vec::with_capacity(16 * (n + 1));
        for s in &segs[at..at + n] {
            buf.extend_from_slice(&sgl_descriptor(s.addr, s.len as u32, sgl_type::DATA));
        }
        if !last {
            let typ = if k + 2 == n_tables { sgl_type::LAST_SEGMENT } else { sgl_type::SEGMENT };
            buf.extend_from_slice(&sgl_descriptor(tables[k + 1].1, 16 * counts[k + 1] as u32, typ));
        }
        mem.write(pa, &buf).map_err(|_| NvmeError::PoolExhausted)?;
        at += n;
    }
    let first_typ = if n_tables == 1 { sgl_type::LAST_SEGMENT } else { sgl_type::SEGMENT };
    Ok(Sgl { sgl1: sgl_descriptor(tables[0].1, 16 * counts[0] as u32, first_typ), tables })
}

/// The controller's side: reads the `len` bytes an SGL describes, through the IOMMU as `dev`.
///
/// # Errors
/// [`NvmeError::BadDescriptor`] (a bit bucket, an unknown type, or a segment pointer that is
/// not the last descriptor of its table), [`NvmeError::BadSegmentLength`],
/// [`NvmeError::LengthMismatch`], [`NvmeError::Fault`].
pub fn read_sgl(iommu: &Iommu, dev: DeviceId, sgl1: &[u8; 16], len: u64) -> Result<Vec<u8>, NvmeError> {
    let mut out = Vec::with_capacity(len as usize);
    let read_data = |addr: DmaAddr, n: u32, out: &mut Vec<u8>| -> Result<(), NvmeError> {
        let at = out.len();
        if at as u64 + u64::from(n) > len {
            return Err(NvmeError::LengthMismatch { described: at as u64 + u64::from(n), len });
        }
        out.resize(at + n as usize, 0);
        iommu.dma_read(dev, addr, &mut out[at..])?;
        Ok(())
    };
    let (mut addr, mut n, mut typ) = parse_descriptor(sgl1);
    loop {
        match typ {
            sgl_type::DATA => {
                read_data(addr, n, &mut out)?;
                break;
            }
            sgl_type::SEGMENT | sgl_type::LAST_SEGMENT => {
                if n == 0 || n % 16 != 0 {
                    return Err(NvmeError::BadSegmentLength(n));
                }
                let mut table = vec![0u8; n as usize];
                iommu.dma_read(dev, addr, &mut table)?;
                let count = table.len() / 16;
                let mut next = None;
                for (i, d) in table.chunks(16).enumerate() {
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
