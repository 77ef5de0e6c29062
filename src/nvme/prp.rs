//! PRP data pointers: PRP1/PRP2 and chained PRP lists built from a [`DmaVec`], and the
//! controller-side decoder (REFERENCES.md §2).
#![forbid(unsafe_code)]

use core::sync::atomic::Ordering;

use super::{ListPool, NvmeError, checked_segments, decode_len, page_mask, prp_expressible, seg_end};
use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::dma::DmaVec;
use crate::iommu::{DeviceId, Iommu};

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
/// Linux). PRP2 is 0 only when the data fits in PRP1's page.
///
/// # Errors
/// [`NvmeError::BadPageSize`] (checked first), [`NvmeError::Empty`], [`NvmeError::Dma`] with
/// [`crate::dma::DmaError::EmptySegment`] or [`crate::dma::DmaError::SegmentOverflow`] for a segment that is empty or
/// wraps, [`NvmeError::TooLarge`] (also when the lengths overflow `u64`), [`NvmeError::Unaligned`],
/// [`NvmeError::NotPrpExpressible`], [`NvmeError::PoolExhausted`] (nothing is taken then).
pub fn build_prp(pool: &mut ListPool, data: &DmaVec, page_size: u64, max_len: u64) -> Result<Prp, NvmeError> {
    let mask = page_mask(page_size)?;
    // A list fills one pool page, so the pool must have the controller's page size.
    if page_size != pool.page_size {
        return Err(NvmeError::BadPageSize(page_size));
    }
    let (segs, len) = checked_segments(data, max_len)?;
    prp_expressible(segs, mask)?;
    let prp1 = segs[0].addr;
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

/// The controller's side: reads the `len` bytes a PRP pair describes, through the IOMMU as
/// device `dev`, checking every entry after the first for an offset and never letting a list
/// cross a page. A chain pointer (the last slot of a full list page) must be page aligned like
/// every other list entry, so each list page yields at least `page_size / 8 - 1` data entries and
/// list pointers that loop still end once `len` bytes are read. Allocates `len` bytes, at most
/// [`super::MAX_DECODE_LEN`].
///
/// # Errors
/// In this order: [`NvmeError::BadPageSize`] (`page_size` not a power of two from
/// [`super::MIN_PAGE_SIZE`] to [`super::MAX_PAGE_SIZE`]), [`NvmeError::Empty`] (`len == 0`),
/// [`NvmeError::TooLarge`] (`len` over [`super::MAX_DECODE_LEN`]), [`NvmeError::Unaligned`] (PRP1 not
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
