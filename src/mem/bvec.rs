//! [`BioVec`], the kernel's `bio_vec`, and loading bytes or files into scattered frames as a
//! bio_vec array.
#![forbid(unsafe_code)]

use std::io::Read;
use std::path::Path;

use super::{MemError, PhysMem};
use crate::addr::{PAGE_SIZE, PhysAddr};

impl PhysMem {
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
    /// [`MemError::OutOfBounds`] when a segment leaves the arena, [`MemError::HostAlloc`] when
    /// the host cannot hold that many bytes; nothing is read then.
    pub fn read_bvecs(&self, bvecs: &[BioVec]) -> Result<Vec<u8>, MemError> {
        // Every segment is checked before anything is allocated, and the buffer is reserved
        // fallibly: a hostile array (many long segments over the same bytes) is an error, not an
        // aborted process.
        let mut total = 0u64;
        for b in bvecs {
            let len = u64::from(b.len);
            let oob = MemError::OutOfBounds { pa: b.phys, len, size: self.size };
            let start = b.start().ok_or(oob.clone())?;
            self.check(start, len)?;
            total = total.checked_add(len).ok_or(oob)?;
        }
        let bytes = usize::try_from(total).map_err(|_| MemError::HostAlloc { bytes: total })?;
        let mut out = Vec::new();
        out.try_reserve_exact(bytes).map_err(|_| MemError::HostAlloc { bytes: total })?;
        out.resize(bytes, 0);
        let mut at = 0usize;
        for b in bvecs {
            let start = PhysAddr::new(b.phys.as_u64() + u64::from(b.offset));
            self.read(start, &mut out[at..at + b.len as usize])?;
            at += b.len as usize;
        }
        Ok(out)
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

    /// What a check of a whole array needs, in one pass with independent accumulators (the
    /// loop runs at memory speed rather than one dependent step per element).
    #[must_use]
    pub fn summarize(bvecs: &[BioVec]) -> BvecSummary {
        let mut acc = [BvecSummary::EMPTY; 4];
        let mut chunks = bvecs.chunks_exact(4);
        for c in &mut chunks {
            for (a, b) in acc.iter_mut().zip(c) {
                a.add(b);
            }
        }
        for b in chunks.remainder() {
            acc[0].add(b);
        }
        let mut out = acc[0];
        for a in &acc[1..] {
            out.bits |= a.bits;
            out.max_end = out.max_end.max(a.max_end);
            out.min_len = out.min_len.min(a.min_len);
            out.total += a.total;
        }
        out
    }

    /// One whole-page bvec per frame: the array a driver builds from a list of scattered pages.
    #[must_use]
    pub fn from_frames(frames: &[PhysAddr]) -> Vec<BioVec> {
        frames.iter().map(|&pa| BioVec::page(pa)).collect()
    }
}

/// A one-pass summary of a bvec array ([`BioVec::summarize`]): enough to accept a well-formed
/// array without a second look, and to know when the exact, element-by-element check must run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BvecSummary {
    /// The OR of every `phys`, `offset` and `len` (low bits set: something is not page aligned).
    pub bits: u64,
    /// The largest end (`phys + offset + len`, saturating at `u64::MAX`: a segment that wraps
    /// ends "at" `u64::MAX`).
    pub max_end: u64,
    /// The smallest `len` (`u32::MAX` for an empty array).
    pub min_len: u32,
    /// The sum of the lengths.
    pub total: u64,
}

impl BvecSummary {
    const EMPTY: BvecSummary = BvecSummary { bits: 0, max_end: 0, min_len: u32::MAX, total: 0 };

    #[inline]
    fn add(&mut self, b: &BioVec) {
        self.bits |= b.phys.as_u64() | u64::from(b.offset) | u64::from(b.len);
        let end = b.phys.as_u64().saturating_add(u64::from(b.offset) + u64::from(b.len));
        self.max_end = self.max_end.max(end);
        self.min_len = self.min_len.min(b.len);
        self.total += u64::from(b.len);
    }

    /// Whether every segment ends at or below `limit` without wrapping (`limit < u64::MAX`).
    #[must_use]
    pub fn all_below(&self, limit: u64) -> bool {
        self.max_end <= limit && self.max_end < u64::MAX
    }
}

/// A bio_vec array with its [`BvecSummary`], computed once when it is built and kept true by
/// owning the array read-only: what a pinned object's page list is. Layers above check it in
/// O(1) from the summary (the DMA layer's reach check of a direct device) instead of another
/// pass over the pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageArray {
    pages: Vec<BioVec>,
    sum: BvecSummary,
}

impl PageArray {
    /// Takes `pages` and summarizes them (one pass).
    #[must_use]
    pub fn new(pages: Vec<BioVec>) -> Self {
        let sum = BioVec::summarize(&pages);
        PageArray { pages, sum }
    }

    /// The array.
    #[must_use]
    pub fn pages(&self) -> &[BioVec] {
        &self.pages
    }

    /// Its summary.
    #[must_use]
    pub fn summary(&self) -> &BvecSummary {
        &self.sum
    }

    /// Gives the array back.
    #[must_use]
    pub fn into_pages(self) -> Vec<BioVec> {
        self.pages
    }
}
