//! The page-table engine's cases: maps (scattered, per call, contiguous, huge), unmaps and
//! translations of 1 GiB, against the `x86_64` and `aarch64-paging` crates on the same pages and
//! a floor of bare stores; and the raw store loop.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::peers::arm::{Arm, ArmConstraints};
use super::peers::x86::X86;
use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::bench::harness::{Report, timed};
use crate::mem::PhysMem;
use crate::mem::rng::SplitMix64;
use crate::pt::{MapOptions, MapSource, PageTable, Prot, X86Iommu};

/// 1 GiB of 4 KiB pages.
const PAGES: usize = 262_144;
const LEN: u64 = PAGES as u64 * PAGE_SIZE;
const IOVA: u64 = 1 << 32;
const PER_PAGE: &str = "ns/4KiB page";

/// The page-table cases, on 1 GiB of scattered pages of a 2 GiB arena (committed lazily: the
/// data frames are never written, only their addresses mapped).
pub(crate) fn pt_cases(r: &mut Report) {
    const CASES: [&str; 8] = [
        "pt/map_4k_scattered",
        "pt/map_4k_per_call",
        "pt/unmap_4k_per_call",
        "pt/map_4k_contiguous",
        "pt/map_huge",
        "pt/unmap_4k",
        "pt/translate",
        "raw/store_8b",
    ];
    if !CASES.iter().any(|c| r.wants(c)) {
        return;
    }
    let mem = Arc::new(PhysMem::new(2 << 30).unwrap());
    let frames = mem.alloc_scattered(PAGES, 0x5eed).unwrap();
    pt_cases_on(r, &mem, &frames);
    raw_case(r);
}

/// The floor of a map: `tables` separate 4 KiB frames of the arena, warm, and a store of entry
/// `i` into slot `i % 512` of frame `i / 512`, by the same relaxed atomic stores the arena's
/// memory model asks of every writer — the same reads of the source and
/// the same 8-byte stores into as many frames as the engine writes, with nothing else (no
/// walk, no validation, no table allocation).
struct Floor<'a> {
    mem: &'a PhysMem,
    tables: Vec<PhysAddr>,
}

impl<'a> Floor<'a> {
    fn new(mem: &'a PhysMem, tables: usize) -> Self {
        let tables = mem.alloc_frames(tables).unwrap();
        Floor { mem, tables }
    }

    /// Reads every entry, untimed before each timed fill: the engine's timed map follows the
    /// untimed unmap that emptied the range, which read the entries of the tables it reuses, so
    /// the floor's tables start out as warm.
    fn touch(&self) -> u64 {
        let t = self.tables.iter().map(|&t| self.mem.table(t).unwrap());
        t.flat_map(|t| t.iter()).fold(0, |a, e| a ^ e.load(Ordering::Relaxed))
    }

    /// Stores `src[i] | bits` (a page list read in order).
    fn fill(&self, src: &[PhysAddr], bits: u64) {
        for (&t, chunk) in self.tables.iter().zip(src.chunks(512)) {
            let t = self.mem.table(t).unwrap();
            for (e, pa) in t.iter().zip(chunk) {
                e.store(pa.as_u64() | bits, Ordering::Relaxed);
            }
        }
    }

    /// Stores `n` entries `first + i * step` (a contiguous range).
    fn fill_range(&self, n: usize, first: u64, step: u64) {
        let mut at = first;
        for (k, &t) in self.tables.iter().enumerate() {
            let t = self.mem.table(t).unwrap();
            for e in t.iter().take(n - k * 512) {
                e.store(at, Ordering::Relaxed);
                at += step;
            }
        }
    }
}

impl Drop for Floor<'_> {
    fn drop(&mut self) {
        self.mem.free_frames(&self.tables).unwrap();
    }
}

fn pt_cases_on(r: &mut Report, mem: &Arc<PhysMem>, frames: &[PhysAddr]) {
    let pt = PageTable::<X86Iommu>::new(mem.clone()).unwrap();
    let leaf_tables = PAGES.div_ceil(512);
    // The peers map a page list one call per page (their only way): the same run serves the
    // scattered map and the per-call map.
    let x86_pages = || {
        timed(
            || X86::new(mem),
            |mut x| {
                x.map_pages(IOVA, frames);
                x
            },
        )
    };
    let arm_pages = || {
        timed(
            || Arm::new(mem),
            |mut a| {
                a.map_pages(IOVA, frames);
                a
            },
        )
    };
    let iova = DmaAddr::new(IOVA);
    let units = PAGES as f64;
    // Untimed: empty the range (and give the tables back) before each timed map.
    let clear = || pt.unmap(iova, LEN).unwrap().complete();

    let case = "pt/map_4k_scattered";
    if r.wants(case) {
        let n = r.samples(15.0);
        let vm = timed(clear, |()| {
            pt.map(iova, MapSource::Pages(frames), Prot::RW, MapOptions::default()).unwrap()
        });
        let (x86, arm) = (x86_pages(), arm_pages());
        let floor = Floor::new(mem, leaf_tables);
        let fl = timed(|| floor.touch(), |_| floor.fill(frames, 3));
        let impls = vec![("vmbind", vm), ("x86_64", x86), ("aarch64-paging", arm), ("floor", fl)];
        r.compare(case, PER_PAGE, units, n, impls);
    }

    let case = "pt/map_4k_per_call";
    if r.wants(case) {
        // One call per page, each a one-page map at the next address, as a bind of scattered
        // pages one at a time issues them; every engine creates its leaf tables as it goes.
        let n = r.samples(20.0);
        let vm = timed(clear, |()| {
            for (i, f) in frames.iter().enumerate() {
                let src = MapSource::Range { pa: *f, len: PAGE_SIZE };
                let va = DmaAddr::new(IOVA + i as u64 * PAGE_SIZE);
                pt.map(va, src, Prot::RW, MapOptions::default()).unwrap();
            }
        });
        let (x86, arm) = (x86_pages(), arm_pages());
        r.compare(case, "ns/call", units, n, vec![("vmbind", vm), ("x86_64", x86), ("aarch64-paging", arm)]);
    }

    let case = "pt/unmap_4k_per_call";
    if r.wants(case) {
        // One call per page, ascending, on a fully mapped 1 GiB; vmbind completes each call's
        // invalidation (and so frees each leaf table as it empties).
        let n = r.samples(15.0);
        let vm = timed(
            || {
                clear();
                pt.map(iova, MapSource::Pages(frames), Prot::RW, MapOptions::default()).unwrap();
            },
            |()| {
                for i in 0..PAGES as u64 {
                    pt.unmap(DmaAddr::new(IOVA + i * PAGE_SIZE), PAGE_SIZE).unwrap().complete();
                }
            },
        );
        let x86 = timed(
            || {
                let mut x = X86::new(mem);
                x.map_pages(IOVA, frames);
                x
            },
            |mut x| {
                x.unmap_pages(IOVA, PAGES as u64);
                x
            },
        );
        r.compare(case, "ns/call", units, n, vec![("vmbind", vm), ("x86_64", x86)]);
    }

    let case = "pt/map_4k_contiguous";
    if r.wants(case) {
        let pa = PhysAddr::new(1 << 30);
        let n = r.samples(8.0);
        let range = MapSource::Range { pa, len: LEN };
        let vm = timed(clear, |()| pt.map(iova, range, Prot::RW, MapOptions::FORCE_4K).unwrap());
        let arm = timed(
            || Arm::new(mem),
            |mut a| {
                a.map_range(IOVA, pa.as_u64(), LEN, ArmConstraints::NO_BLOCK_MAPPINGS);
                a
            },
        );
        let x86 = timed(
            || X86::new(mem),
            |mut x| {
                x.map_contiguous(IOVA, pa.as_u64(), PAGES as u64);
                x
            },
        );
        let floor = Floor::new(mem, leaf_tables);
        let fl = timed(|| floor.touch(), |_| floor.fill_range(PAGES, pa.as_u64() | 3, PAGE_SIZE));
        let impls = vec![("vmbind", vm), ("aarch64-paging", arm), ("x86_64", x86), ("floor", fl)];
        r.compare(case, PER_PAGE, units, n, impls);
    }

    let case = "pt/map_huge";
    if r.wants(case) {
        // 2 MiB aligned but not 1 GiB aligned: both engines build 512 2 MiB leaves.
        let pa = PhysAddr::new((1 << 30) + (2 << 20));
        let n = r.samples(0.02);
        let range = MapSource::Range { pa, len: LEN };
        let vm = timed(clear, |()| pt.map(iova, range, Prot::RW, MapOptions::default()).unwrap());
        let arm = timed(
            || Arm::new(mem),
            |mut a| {
                a.map_range(IOVA, pa.as_u64(), LEN, ArmConstraints::empty());
                a
            },
        );
        // The floor: the 512 2 MiB entries stored into one frame.
        let floor = Floor::new(mem, 1);
        let fl = timed(|| floor.touch(), |_| floor.fill_range(512, pa.as_u64() | 0x83, 2 << 20));
        r.compare(case, PER_PAGE, units, n, vec![("vmbind", vm), ("aarch64-paging", arm), ("floor", fl)]);
    }

    let case = "pt/unmap_4k";
    if r.wants(case) {
        let n = r.samples(8.0);
        let vm = timed(
            || {
                clear();
                pt.map(iova, MapSource::Pages(frames), Prot::RW, MapOptions::default()).unwrap();
            },
            |()| pt.unmap(iova, LEN).unwrap().complete(),
        );
        let x86 = timed(
            || {
                let mut x = X86::new(mem);
                x.map_pages(IOVA, frames);
                x
            },
            |mut x| {
                x.unmap_pages(IOVA, PAGES as u64);
                x
            },
        );
        r.compare(case, PER_PAGE, units, n, vec![("vmbind", vm), ("x86_64", x86)]);
    }

    let case = "pt/translate";
    if r.wants(case) {
        let mut rng = SplitMix64::new(42);
        let probes: Vec<u64> = (0..PAGES).map(|_| (IOVA + rng.below(LEN)) & !7).collect();
        clear();
        pt.map(iova, MapSource::Pages(frames), Prot::RW, MapOptions::default()).unwrap();
        let mut x = X86::new(mem);
        x.map_pages(IOVA, frames);
        let n = r.samples(3.0);
        let probes = &probes;
        let vm = timed(
            || (),
            |()| {
                probes.iter().fold(0u64, |acc, &va| acc ^ pt.translate(DmaAddr::new(va)).unwrap().pa.as_u64())
            },
        );
        let x86 = timed(|| (), |()| probes.iter().fold(0u64, |acc, &va| acc ^ x.translate(va).unwrap()));
        r.compare(case, "ns/lookup", probes.len() as f64, n, vec![("vmbind", vm), ("x86_64", x86)]);
        clear();
    }
}

fn raw_case(r: &mut Report) {
    let case = "raw/store_8b";
    if !r.wants(case) {
        return;
    }
    let mut buf = vec![0u64; PAGES];
    let n = r.samples(0.1);
    let raw = timed(
        || (),
        |()| {
            for (i, e) in buf.iter_mut().enumerate() {
                *e = ((i as u64) << 12) | 3;
            }
            std::hint::black_box(&buf);
        },
    );
    r.compare(case, "ns/store", PAGES as f64, n, vec![("raw", raw)]);
}
