//! "Scatterlist v2": [`DmaVec`], the in-memory `(dma_addr, len)` list a driver hands to its
//! device, and [`PageAddrs`], the one iterator over the pages it touches (what a PRP list or a
//! GPU table leaf run is made of).
#![forbid(unsafe_code)]

use super::{DmaError, MapKind};
use crate::addr::DmaAddr;

/// One contiguous DMA segment (`len` never 0; `addr + len` never wraps in a [`DmaVec`]). The
/// page-table engine's segment type, so a `DmaVec`'s list is a map source as it is
/// ([`crate::pt::MapSource::Segments`]).
pub type DmaSeg = crate::pt::Segment<DmaAddr>;

/// "Scatterlist v2": the in-memory list of `(dma_addr, len)` segments a driver hands to its
/// device, built by [`super::Device::map_sg`] or from the two-step API. Adjacent segments merge.
///
/// Every segment describes at least one byte and none wraps past 2^64: [`DmaVec::push`] refuses
/// anything else, so a PRP list or an SGL built from a `DmaVec` transfers exactly the bytes its
/// segments describe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DmaVec {
    pub(super) segs: Vec<DmaSeg>,
    /// The IOVA range backing it when built by `map_sg` on a translated device.
    pub(super) iova: Option<(DmaAddr, u64)>,
    /// Per-segment one-shot mappings (an untrusted device's `map_sg` with partial pages), and
    /// how they were made.
    pub(super) pieces: Vec<(DmaAddr, u64)>,
    pub(super) kind: Option<MapKind>,
}

impl DmaVec {
    /// A list of one segment (what the two-step path hands to the device).
    ///
    /// # Errors
    /// As [`DmaVec::push`].
    pub fn from_segment(addr: DmaAddr, len: u64) -> Result<Self, DmaError> {
        let mut v = DmaVec::default();
        v.push(addr, len)?;
        Ok(v)
    }

    /// Appends a segment, merging it into the last one when they touch.
    ///
    /// # Errors
    /// [`DmaError::EmptySegment`] for `len == 0` and [`DmaError::SegmentOverflow`] when
    /// `addr + len` wraps past 2^64; the list is unchanged then.
    pub fn push(&mut self, addr: DmaAddr, len: u64) -> Result<(), DmaError> {
        if len == 0 {
            return Err(DmaError::EmptySegment { index: self.segs.len() });
        }
        if addr.checked_add(len).is_none() {
            return Err(DmaError::SegmentOverflow { addr, len });
        }
        if let Some(last) = self.segs.last_mut()
            && last.addr.as_u64() + last.len == addr.as_u64()
            && last.len.checked_add(len).is_some()
        {
            last.len += len;
            return Ok(());
        }
        self.segs.push(DmaSeg { addr, len });
        Ok(())
    }

    /// The segments.
    #[must_use]
    pub fn segments(&self) -> &[DmaSeg] {
        &self.segs
    }

    /// Number of segments.
    #[must_use]
    pub fn len(&self) -> usize {
        self.segs.len()
    }

    /// Whether there is no segment.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Bytes in all segments (saturating at `u64::MAX`, which no real list reaches).
    #[must_use]
    pub fn total_len(&self) -> u64 {
        self.segs.iter().fold(0u64, |a, s| a.saturating_add(s.len))
    }

    /// Page by page, the DMA address of the first byte of each `page_size` page the segments
    /// touch: the first entry of a segment may carry an offset, the others are page aligned.
    /// For a list whose inner joins are page aligned this is exactly an NVMe PRP list.
    ///
    /// # Errors
    /// [`DmaError::BadPageSize`] when `page_size` is not a power of two of at least 4 bytes.
    pub fn page_addrs(&self, page_size: u64) -> Result<PageAddrs<'_>, DmaError> {
        if !page_size.is_power_of_two() || page_size < 4 {
            return Err(DmaError::BadPageSize(page_size));
        }
        Ok(PageAddrs::new(&self.segs, page_size))
    }
}

/// The pages a [`DmaVec`] touches, in order: for each segment, its first byte's address, then
/// the page-aligned address of every further page it reaches. From [`DmaVec::page_addrs`].
#[derive(Debug, Clone)]
pub struct PageAddrs<'a> {
    segs: &'a [DmaSeg],
    /// Index of the segment `next` is in.
    i: usize,
    /// The next address to yield, and the end of its segment.
    next: u64,
    end: u64,
    mask: u64,
}

impl<'a> PageAddrs<'a> {
    fn new(segs: &'a [DmaSeg], page_size: u64) -> Self {
        let (next, end) = segs.first().map_or((0, 0), |s| (s.addr.as_u64(), s.addr.as_u64() + s.len));
        PageAddrs { segs, i: 0, next, end, mask: page_size - 1 }
    }
}

impl Iterator for PageAddrs<'_> {
    type Item = DmaAddr;

    #[inline]
    fn next(&mut self) -> Option<DmaAddr> {
        if self.next >= self.end {
            self.i += 1;
            let s = self.segs.get(self.i)?;
            self.next = s.addr.as_u64();
            self.end = s.addr.as_u64() + s.len;
        }
        let at = self.next;
        // The next page of this segment, or past its end (a segment never wraps, and the page
        // after the last one may be 2^64 itself: then the segment is done).
        self.next = (at | self.mask).checked_add(1).unwrap_or(self.end).min(self.end);
        Some(DmaAddr::new(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_wrapping_segments_are_refused_and_change_nothing() {
        let mut v = DmaVec::from_segment(DmaAddr::new(0x1000), 0x1000).unwrap();
        assert_eq!(v.push(DmaAddr::new(0x5000), 0), Err(DmaError::EmptySegment { index: 1 }));
        let top = DmaAddr::new(!0xfff);
        assert_eq!(v.push(top, 0x2000), Err(DmaError::SegmentOverflow { addr: top, len: 0x2000 }));
        assert_eq!(v.segments(), &[DmaSeg { addr: DmaAddr::new(0x1000), len: 0x1000 }]);
        v.push(DmaAddr::new(0x2000), 0x800).unwrap();
        assert_eq!(v.len(), 1, "touching segments merge");
        v.push(top, 0x800).unwrap();
        let pages: Vec<u64> = v.page_addrs(4096).unwrap().map(DmaAddr::as_u64).collect();
        assert_eq!(pages, [0x1000, 0x2000, top.as_u64()]);
        assert_eq!(v.page_addrs(0).unwrap_err(), DmaError::BadPageSize(0));
        assert_eq!(v.page_addrs(3000).unwrap_err(), DmaError::BadPageSize(3000));
    }

    #[test]
    fn page_addrs_keep_the_first_offset_of_each_segment() {
        let mut v = DmaVec::default();
        v.push(DmaAddr::new(0x1100), 0x2000).unwrap();
        v.push(DmaAddr::new(0x9000), 0x10).unwrap();
        let pages: Vec<u64> = v.page_addrs(4096).unwrap().map(DmaAddr::as_u64).collect();
        assert_eq!(pages, [0x1100, 0x2000, 0x3000, 0x9000]);
    }
}
