//! The NVMe tests' request: pattern data in scattered pages, mapped as one DMA segment through
//! the two-step API.
#![allow(dead_code)]

use vmbind::addr::PAGE_SIZE;
use vmbind::dma::{Attrs, Device, Direction, DmaVec, IovaState};
use vmbind::mem::{BioVec, PhysMem};

/// `len` bytes of pattern data (`i * step + seed`) in scattered pages of `mem`, starting `head`
/// bytes into the first page, linked for `dev` at offset 0 and synced: the one-segment
/// `DmaVec`, the data, and the state that keeps it mapped.
pub fn request(
    mem: &PhysMem,
    dev: &Device,
    head: u64,
    len: u64,
    seed: u64,
    step: u64,
) -> (DmaVec, Vec<u8>, IovaState) {
    let pages = (head + len).div_ceil(PAGE_SIZE) as usize;
    let frames = mem.alloc_scattered(pages, seed).unwrap();
    let mut bv = BioVec::from_frames(&frames);
    bv[0].offset = head as u32;
    bv[0].len = (PAGE_SIZE - head).min(len) as u32;
    let last = bv.len() - 1;
    if last > 0 {
        bv[last].len = (head + len - last as u64 * PAGE_SIZE) as u32;
    }
    let data: Vec<u8> = (0..len).map(|i| (i * step + seed) as u8).collect();
    let mut at = 0usize;
    for b in &bv {
        mem.write(b.start().unwrap(), &data[at..at + b.len as usize]).unwrap();
        at += b.len as usize;
    }
    let (to, a) = (Direction::ToDevice, Attrs::default());
    let mut s = IovaState::try_alloc(dev, bv[0].start().unwrap(), len).unwrap().unwrap();
    s.link_bvecs(dev, 0, &bv, to, a).unwrap();
    s.sync(dev, 0, len).unwrap();
    (DmaVec::from_segment(s.addr(), len).unwrap(), data, s)
}
