//! Arena-access cases of the report: bytes copied into scattered frames through
//! `PhysMem::write` (aligned 64-bit atomic stores, the arena's memory model) against a plain
//! `memcpy` of the same chunks into the same frames.

use crate::addr::PAGE_SIZE;
use crate::mem::PhysMem;

use crate::bench::harness::{Report, timed};

/// 16 MiB of 4 KiB frames.
const PAGES: usize = 4096;
const PER_PAGE: &str = "ns/4KiB page";

pub fn mem_cases(r: &mut Report) {
    // mem/copy: a 16 MiB source copied, 4 KiB at a time, into 4096 scattered frames of an arena
    // (the bytes of a buffer landing in its pages). Reported per 4 KiB page copied. `vmbind` is
    // `PhysMem::write` per frame; `memcpy` is `copy_nonoverlapping` into the same frames through
    // `host_ptr`: the floor for moving those bytes.
    let case = "mem/copy";
    if !r.wants(case) {
        return;
    }
    let page = PAGE_SIZE as usize;
    // 32 MiB: room for the 4096 frames next to the frame 0 that is never handed out.
    let mem = PhysMem::new(32 << 20).unwrap();
    let frames = mem.alloc_scattered(PAGES, 0xc0b1).unwrap();
    let src: Vec<u8> =
        (0..PAGES * page).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
    let dsts: Vec<*mut u8> = frames.iter().map(|&f| mem.host_ptr(f, PAGE_SIZE).unwrap().as_ptr()).collect();
    let (mem, frames, src, dsts) = (&mem, &frames, &src, &dsts);

    let vm = timed(
        || (),
        |()| {
            for (f, chunk) in frames.iter().zip(src.chunks_exact(page)) {
                mem.write(*f, chunk).unwrap();
            }
        },
    );
    let raw = timed(
        || (),
        |()| {
            for (&dst, chunk) in dsts.iter().zip(src.chunks_exact(page)) {
                // SAFETY: `dst` is the host address of a 4 KiB frame of `mem`, which outlives
                // this closure (`host_ptr` checked that the 4 KiB lie inside the arena); the
                // frame is allocated to this benchmark alone, and nothing else (no thread, device
                // or table walker) accesses it during the copy, so these plain stores race with
                // nothing and the arena's atomic-access model is not violated. The source is a
                // separate heap buffer, so the ranges do not overlap.
                unsafe { core::ptr::copy_nonoverlapping(chunk.as_ptr(), std::hint::black_box(dst), page) };
            }
        },
    );
    let n = r.samples(4.0);
    r.compare(case, PER_PAGE, PAGES as f64, n, vec![("vmbind", vm), ("memcpy", raw)]);

    // Both implementations wrote the same bytes: check that they landed.
    let mut back = vec![0u8; page];
    for (f, chunk) in frames.iter().zip(src.chunks_exact(page)) {
        mem.read(*f, &mut back).unwrap();
        assert_eq!(&back[..], chunk, "frame {f}");
    }
}
