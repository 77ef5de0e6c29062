//! The side-by-side report: vmbind and its peers on the same pages, in the same process, with
//! interleaved samples.
//!
//! `cargo bench --bench report -- [--quick] [--json FILE] [FILTER]`
//!
//! Absolute times drift on shared machines; the ratios printed at the end are what to read.

#[path = "common/dma_cases.rs"]
mod dma_cases;
#[path = "common/gpuvm_cases.rs"]
mod gpuvm_cases;
#[path = "common/harness.rs"]
mod harness;
#[path = "common/iommu_cases.rs"]
mod iommu_cases;
#[path = "common/mem_cases.rs"]
mod mem_cases;
#[path = "common/peers.rs"]
mod peers;
#[path = "../tests/common/rng.rs"]
mod rng;
#[path = "common/service_cases.rs"]
mod service_cases;
#[cfg(feature = "vulkan")]
#[path = "common/vk_cases.rs"]
mod vk_cases;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use harness::{Report, timed};
use peers::arm::{Arm, ArmConstraints};
use peers::x86::X86;
use rng::SplitMix64;
use vmbind::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use vmbind::mem::PhysMem;
use vmbind::pt::{MapOptions, MapSource, PageTable, Prot, X86Iommu};

/// 1 GiB of 4 KiB pages.
const PAGES: usize = 262_144;
const LEN: u64 = PAGES as u64 * PAGE_SIZE;
const IOVA: u64 = 1 << 32;
const PER_PAGE: &str = "ns/4KiB page";

fn main() {
    let (mut r, json) = Report::from_args();
    // 2 GiB arena, committed lazily: data frames are never written, only their addresses mapped.
    let mem = Arc::new(PhysMem::new(2 << 30).unwrap());
    let frames = mem.alloc_scattered(PAGES, 0x5eed).unwrap();
    r.header();
    pt_cases(&mut r, &mem, &frames);
    raw_case(&mut r);
    iommu_cases::iova_cases(&mut r);
    iommu_cases::iommu_cases(&mut r);
    dma_cases::dma_cases(&mut r);
    mem_cases::mem_cases(&mut r);
    gpuvm_cases::gpuvm_cases(&mut r);
    service_cases::service_cases(&mut r);
    #[cfg(feature = "vulkan")]
    vk_cases::vk_cases(&mut r);
    println!("\nratios (higher = vmbind faster unless noted):");
    for peer in ["x86_64", "aarch64-paging"] {
        let label = format!("pt/map_4k_scattered {peer} / vmbind");
        r.ratio(&label, ("pt/map_4k_scattered", peer), ("pt/map_4k_scattered", "vmbind"));
    }
    let label = "pt/map_4k_scattered vmbind / raw store (lower better)";
    r.ratio(label, ("pt/map_4k_scattered", "vmbind"), ("raw/store_8b", "raw"));
    for case in ["pt/map_4k_scattered", "pt/map_4k_contiguous", "pt/map_huge"] {
        r.ratio(&format!("{case} vmbind / floor (lower better)"), (case, "vmbind"), (case, "floor"));
    }
    for (case, peer) in [
        ("pt/map_4k_per_call", "x86_64"),
        ("pt/map_4k_per_call", "aarch64-paging"),
        ("pt/unmap_4k_per_call", "x86_64"),
    ] {
        r.ratio(&format!("{case} {peer} / vmbind"), (case, peer), (case, "vmbind"));
    }
    for (case, peer) in [
        ("pt/map_4k_contiguous", "aarch64-paging"),
        ("pt/map_4k_contiguous", "x86_64"),
        ("pt/map_huge", "aarch64-paging"),
        ("pt/translate", "x86_64"),
        ("pt/unmap_4k", "x86_64"),
    ] {
        r.ratio(&format!("{case} {peer} / vmbind"), (case, peer), (case, "vmbind"));
    }
    for (case, peer) in [
        ("iova/alloc_free_small", "vm-allocator"),
        ("iova/alloc_large_100k", "vm-allocator"),
        ("iova/alloc_free_2t", "vmbind-1t"),
        ("iommu/translate_hit", "x86_64"),
        ("iommu/translate_hit", "vm-memory"),
        ("iommu/translate_hit", "btreemap"),
        ("iommu/translate_miss", "x86_64"),
        ("iommu/translate_miss_2t", "vmbind-1t"),
        ("iommu/map_4k", "btreemap"),
        ("iommu/map_4k", "vm-memory"),
    ] {
        r.ratio(&format!("{case} {peer} / vmbind"), (case, peer), (case, "vmbind"));
    }
    let label = "iommu/translate_hit vmbind / raw read (lower better)";
    r.ratio(label, ("iommu/translate_hit", "vmbind"), ("iommu/translate_hit", "raw"));
    let label = "dma/map_page_loop / dma/two_step_array";
    r.ratio(label, ("dma/map_page_loop", "vmbind"), ("dma/two_step_array", "vmbind"));
    let label = "dma/two_step_per_bvec / dma/two_step_array";
    r.ratio(label, ("dma/two_step_per_bvec", "vmbind"), ("dma/two_step_array", "vmbind"));
    let label = "dma/two_step_array / pt/map_4k_scattered (lower better)";
    r.ratio(label, ("dma/two_step_array", "vmbind"), ("pt/map_4k_scattered", "vmbind"));
    let label = "gpuvm/bind_1g_iommu / pt/map_4k_scattered (lower better)";
    r.ratio(label, ("gpuvm/bind_1g_iommu", "vmbind"), ("pt/map_4k_scattered", "vmbind"));
    let label = "gpuvm/bind_1g_direct / gpuvm/bind_1g_contiguous";
    r.ratio(label, ("gpuvm/bind_1g_direct", "vmbind"), ("gpuvm/bind_1g_contiguous", "vmbind"));
    let label = "gpuvm/remap_1page_in_16g / gpuvm/remap_1page_in_1g (lower better)";
    r.ratio(label, ("gpuvm/remap_1page_in_16g", "vmbind"), ("gpuvm/remap_1page_in_1g", "vmbind"));
    let label = "service/bind_64k_unbatched / service/bind_64k_batched";
    r.ratio(label, ("service/bind_64k_unbatched", "vmbind"), ("service/bind_64k_batched", "vmbind"));
    let label = "vk/walk_gather / vk/plain_copy (lower better)";
    r.ratio(label, ("vk/walk_gather", "vmbind"), ("vk/plain_copy", "vmbind"));
    let label = "mem/copy vmbind / memcpy (lower better)";
    r.ratio(label, ("mem/copy", "vmbind"), ("mem/copy", "memcpy"));
    if let Some(path) = json {
        r.write_json(&path).unwrap();
        println!("wrote {path}");
    }
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

fn pt_cases(r: &mut Report, mem: &Arc<PhysMem>, frames: &[PhysAddr]) {
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
