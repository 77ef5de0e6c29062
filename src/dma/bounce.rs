//! Bounce buffering for untrusted devices (Linux's swiotlb behaviour for `dev_is_untrusted`): a
//! granule that the buffer covers only partly is mapped through a private, zeroed frame holding
//! just the buffer's bytes (at the same in-page offsets), so the device never reaches the rest
//! of a shared page. Data going to the device is copied in at map time; data coming from it is
//! copied back at unmap, after the device has lost access.
#![forbid(unsafe_code)]

use super::{Attrs, Direction, DmaError, GRANULE};
use crate::addr::PhysAddr;
use crate::mem::{BioVec, PhysMem};

/// One bounced granule.
#[derive(Debug)]
pub(crate) struct Bounce {
    /// First byte of the buffer's part in the original granule.
    orig: PhysAddr,
    /// Bytes of the buffer in this granule.
    len: u64,
    /// The private frame mapped in its place.
    frame: PhysAddr,
    dir: Direction,
    /// Offset of the granule from the start of the mapping.
    pub(crate) at: u64,
}

/// Where the granules of `[phys, phys + size)` come from for an untrusted device: granule
/// sources in order (whole original pages, or bounce frames for partial ones), and the bounces.
/// `base_at` is the mapping offset of the first granule (recorded in each bounce).
pub(crate) fn plan(
    mem: &PhysMem,
    phys: PhysAddr,
    size: u64,
    dir: Direction,
    base_at: u64,
) -> Result<(Vec<BioVec>, Vec<Bounce>), DmaError> {
    let start = phys.as_u64();
    let end = start.checked_add(size).ok_or(DmaError::Overflow { phys, size })?;
    if size == 0 {
        return Err(DmaError::ZeroSize);
    }
    let g0 = start - start % GRANULE;
    // At most two partial granules (the first and the last) bounce; the whole granules between
    // them pass through as a few long runs, so planning costs O(1) whatever the size.
    let first_end = end.min(g0.saturating_add(GRANULE));
    let last = (end - 1) & !(GRANULE - 1);
    let head = (start != g0 || first_end - g0 < GRANULE).then_some((g0, start, first_end));
    let tail = (last != g0 && end % GRANULE != 0).then_some((last, last, end));
    for &(_, lo, hi) in head.iter().chain(&tail) {
        // A partial granule is copied: it must be arena memory.
        if hi > mem.size() || lo >= hi {
            return Err(DmaError::OutsideArena { phys, size });
        }
    }
    let mut bounces: Vec<Bounce> = Vec::new();
    let bounce = |g: u64, lo: u64, hi: u64, bounces: &mut Vec<Bounce>| -> Result<PhysAddr, DmaError> {
        let Ok(frame) = mem.alloc_frame() else {
            abandon(mem, core::mem::take(bounces));
            return Err(DmaError::BounceExhausted);
        };
        let _ = mem.zero(frame, GRANULE);
        // The buffer's bytes go into the bounce frame in every direction (as Linux's swiotlb does
        // since 5.17): a device that writes only part of a FROM_DEVICE buffer must not clobber
        // the rest with the frame's zeros when it is copied back.
        let mut tmp = vec![0u8; (hi - lo) as usize];
        let _ = mem.read(PhysAddr::new(lo), &mut tmp);
        let _ = mem.write(PhysAddr::new(frame.as_u64() + lo % GRANULE), &tmp);
        bounces.push(Bounce { orig: PhysAddr::new(lo), len: hi - lo, frame, dir, at: base_at + (g - g0) });
        Ok(frame)
    };
    let mut src = Vec::new();
    let mut mid = g0;
    if let Some((g, lo, hi)) = head {
        let frame = bounce(g, lo, hi, &mut bounces)?;
        src.push(BioVec { phys: frame, offset: 0, len: GRANULE as u32 });
        mid = first_end;
    }
    let mid_end = if tail.is_some() { last } else { end };
    // Whole granules, in runs a `BioVec` can hold.
    const RUN: u64 = (u32::MAX as u64) & !(GRANULE - 1);
    while mid < mid_end {
        let n = (mid_end - mid).min(RUN);
        src.push(BioVec { phys: PhysAddr::new(mid), offset: 0, len: n as u32 });
        mid += n;
    }
    if let Some((g, lo, hi)) = tail {
        let frame = bounce(g, lo, hi, &mut bounces)?;
        src.push(BioVec { phys: frame, offset: 0, len: GRANULE as u32 });
    }
    Ok((src, bounces))
}

/// Ends a bounce after the device lost access: copies device-written data back, frees the frame.
pub(crate) fn finish(mem: &PhysMem, b: Bounce, attrs: Attrs) {
    if b.dir != Direction::ToDevice && !attrs.skip_cpu_sync {
        let mut tmp = vec![0u8; b.len as usize];
        let _ = mem.read(PhysAddr::new(b.frame.as_u64() + b.orig.as_u64() % GRANULE), &mut tmp);
        let _ = mem.write(b.orig, &tmp);
    }
    let _ = mem.free_frame(b.frame);
}

/// Syncs the bytes of `bounces` that fall in `[lo, hi)` (offsets from the mapping's IOVA base):
/// for the CPU, what the device wrote is copied back (unless it only reads); for the device,
/// what the CPU wrote is copied in (unless it only writes).
pub(crate) fn sync_range(mem: &PhysMem, bounces: &[Bounce], lo: u64, hi: u64, for_cpu: bool) {
    for b in bounces {
        let in_page = b.orig.as_u64() % GRANULE;
        let (s, e) = ((b.at + in_page).max(lo), (b.at + in_page + b.len).min(hi));
        if s >= e {
            continue;
        }
        let skip = s - (b.at + in_page);
        let orig = PhysAddr::new(b.orig.as_u64() + skip);
        let copy = PhysAddr::new(b.frame.as_u64() + in_page + skip);
        let mut tmp = vec![0u8; (e - s) as usize];
        if for_cpu && b.dir != Direction::ToDevice {
            let _ = mem.read(copy, &mut tmp);
            let _ = mem.write(orig, &tmp);
        } else if !for_cpu && b.dir != Direction::FromDevice {
            let _ = mem.read(orig, &mut tmp);
            let _ = mem.write(copy, &tmp);
        }
    }
}

/// Gives back bounces whose mapping was never made (no copy back).
pub(crate) fn abandon(mem: &PhysMem, bounces: Vec<Bounce>) {
    for b in bounces {
        let _ = mem.free_frame(b.frame);
    }
}
