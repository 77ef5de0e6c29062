//! GPU VM cases of the report: op generation of the VA-space core, and whole binds of a
//! `gpuvm::Vm` (DMA mapping, split/merge, prepare, commit), remaps and unbinds.

use std::sync::Arc;
use std::time::Instant;

use crate::addr::{PAGE_SIZE, PageSize};
use crate::dma::Device;
use crate::gpuvm::{BindOp, BoId, GPU_PAGE, Va, VaSpace, Vm};
use crate::iommu::{DeviceId, DomainConfig, Iommu};
use crate::mem::{BioVec, PhysMem};

use crate::bench::harness::{Report, Run, timed};
use crate::mem::rng::SplitMix64;

/// 1 GiB of 4 KiB pages.
const PAGES: usize = 262_144;
const GIB: u64 = 1 << 30;
/// Where the binds go: 1 GiB aligned.
const VA: u64 = 1 << 36;
const PER_PAGE: &str = "ns/4KiB page";

/// Mappings in the space of `gpuvm/sm_map_100k`.
const MAPPINGS: u64 = 100_000;
/// Each is 4 pages.
const PAGES_EACH: u64 = 4;

pub fn gpuvm_cases(r: &mut Report) {
    sm_map_case(r);
    bind_cases(r);
}

/// One timed first bind of a fresh object over `bvecs` at [`VA`]: its DMA mapping (IOVA alloc,
/// link, sync behind an IOMMU; the reach check and record of a direct device), sm_map, prepare
/// and commit. The object is created (its page array handed over) untimed before, and unbound
/// and destroyed untimed after.
fn bind_run<'a>(vm: &'a Vm, bvecs: &'a [BioVec]) -> Run<'a> {
    Box::new(move || {
        let len: u64 = bvecs.iter().map(|b| u64::from(b.len)).sum();
        let bo = vm.create_bo(bvecs.to_vec()).unwrap();
        let t0 = Instant::now();
        vm.bind(&[BindOp::Map(Va::object(VA, len, bo, 0))]).unwrap();
        let dt = t0.elapsed().as_secs_f64() * 1e9;
        vm.unbind(VA, len).unwrap();
        vm.destroy_bo(bo).unwrap();
        dt
    })
}

/// A VM for a GPU behind an IOMMU (translated, strict domain) and one for a direct GPU.
fn vms(mem: &Arc<PhysMem>) -> (Vm, Vm) {
    let iommu = Iommu::new(mem.clone());
    let dom = iommu.create_domain(DomainConfig::default()).unwrap();
    iommu.register_device(DeviceId(7), true).unwrap();
    iommu.attach(DeviceId(7), &dom).unwrap();
    let behind = Vm::new(Device::translated(&iommu, DeviceId(7)).unwrap(), 1 << 40).unwrap();
    let direct = Vm::new(Device::direct(mem.clone(), DeviceId(8), 48, true).unwrap(), 1 << 40).unwrap();
    (behind, direct)
}

fn bind_cases(r: &mut Report) {
    let names = [
        "gpuvm/bind_1g_iommu",
        "gpuvm/bind_1g_direct",
        "gpuvm/bind_1g_contiguous",
        "gpuvm/remap_1page_in_1g",
        "gpuvm/remap_1page_in_16g",
        "gpuvm/unbind_1g",
    ];
    if !names.iter().any(|c| r.wants(c)) {
        return;
    }
    // Arena committed lazily: 1 GiB of scattered data frames, 1 GiB of 2 MiB blocks, tables.
    let mem = Arc::new(PhysMem::new(5 << 29).unwrap());
    let frames = mem.alloc_scattered(PAGES, 0x9e7).unwrap();
    let scattered = BioVec::from_frames(&frames);
    let blocks: Vec<BioVec> = (0..512)
        .map(|_| {
            let pa = mem.alloc_contig(PageSize::Size2M).unwrap();
            BioVec { phys: pa, offset: 0, len: 2 << 20 }
        })
        .collect();
    let (behind, direct) = vms(&mem);
    let n = r.samples(2.0);
    // The three binds of 1 GiB, interleaved: the ratios between them come from the same rounds.
    let binds = names[..3].iter().any(|c| r.wants(c));
    if binds {
        r.compare_cases(
            PER_PAGE,
            PAGES as f64,
            n,
            vec![
                ("gpuvm/bind_1g_iommu", "vmbind", bind_run(&behind, &scattered)),
                ("gpuvm/bind_1g_direct", "vmbind", bind_run(&direct, &scattered)),
                ("gpuvm/bind_1g_contiguous", "vmbind", bind_run(&direct, &blocks)),
            ],
        );
    }
    // Unbind of 1 GiB of scattered 4 KiB leaves (direct GPU: the PRP-like table).
    if r.wants(names[5]) {
        let bo = direct.create_bo(scattered.clone()).unwrap();
        let unbind = timed(
            || direct.bind(&[BindOp::Map(Va::object(VA, GIB, bo, 0))]).unwrap(),
            |_| direct.unbind(VA, GIB).unwrap(),
        );
        r.compare("gpuvm/unbind_1g", PER_PAGE, PAGES as f64, n, vec![("vmbind", unbind)]);
        direct.destroy_bo(bo).unwrap();
    }
    drop(behind);
    if !names[3..5].iter().any(|c| r.wants(c)) {
        return;
    }
    // Remaps of one page inside a 1 GiB and a 16 GiB mapping of scattered pages (the 16 GiB
    // object repeats the 1 GiB of frames 16 times). The untimed restore maps the whole object
    // again; the timed part is REMAPS binds, each mapping one page of another
    // object over a page inside a large piece of the mapping (spread over its length, so each
    // lands in another leaf table, as a sparse-residency update would), per remap.
    let sixteen: Vec<BioVec> = (0..16).flat_map(|_| scattered.iter().copied()).collect();
    let small = direct.create_bo(BioVec::from_frames(&frames[..1])).unwrap();
    let big1 = direct.create_bo(scattered.clone()).unwrap();
    let big16 = direct.create_bo(sixteen).unwrap();
    let at1 = VA;
    let at16 = VA + 4 * GIB;
    const REMAPS: u64 = 64;
    let remap = |bo: BoId, at: u64, len: u64| -> Run<'_> {
        let d = &direct;
        let mut round = 0u64;
        Box::new(move || {
            d.bind(&[BindOp::Map(Va::object(at, len, bo, 0))]).unwrap();
            round += 1;
            // One untimed remap near the start brings the VM's own structures (and the code)
            // back into cache after the restore streamed the whole mapping: the timed remaps
            // then pay what a remap touches, the table entries at its own address.
            d.bind(&[BindOp::Map(Va::object(at + PAGE_SIZE, PAGE_SIZE, small, 0))]).unwrap();
            let t0 = Instant::now();
            for i in 0..REMAPS {
                // Odd multiples of len / 128: each in the middle of a piece the earlier remaps
                // left whole.
                let page = ((2 * i + 1) * len / (2 * REMAPS) + (round % 64) * PAGE_SIZE) & !(PAGE_SIZE - 1);
                d.bind(&[BindOp::Map(Va::object(at + page, PAGE_SIZE, small, 0))]).unwrap();
            }
            t0.elapsed().as_secs_f64() * 1e9 / REMAPS as f64
        })
    };
    let n = r.samples(30.0);
    r.compare_cases(
        "ns/remap",
        1.0,
        n,
        vec![
            ("gpuvm/remap_1page_in_1g", "vmbind", remap(big1, at1, GIB)),
            ("gpuvm/remap_1page_in_16g", "vmbind", remap(big16, at16, 16 * GIB)),
        ],
    );
}

fn sm_map_case(r: &mut Report) {
    let case = "gpuvm/sm_map_100k";
    if !r.wants(case) {
        return;
    }
    // 100 000 adjacent mappings of 4 pages each (objects 0..100 000); each request starts in the
    // middle of one mapping, covers the next and ends in the middle of the one after: 3
    // overlapping mappings, so two REMAPs, one UNMAP and the MAP.
    let span = PAGES_EACH * GPU_PAGE;
    let mut vm = VaSpace::<u64>::new(0, 1 << 40, None).unwrap();
    for i in 0..MAPPINGS {
        vm.map(&Va::object(i * span, span, i, 0)).unwrap();
    }
    let mut rng = SplitMix64::new(77);
    let reqs: Vec<Va<u64>> = (0..10_000)
        .map(|_| {
            let i = rng.below(MAPPINGS - 3);
            Va::object(i * span + 2 * GPU_PAGE, span * 2, u64::MAX, 0)
        })
        .collect();
    assert_eq!(vm.sm_map(&reqs[0]).unwrap().len(), 4);
    let (vm, reqs) = (&vm, &reqs);
    let run = timed(|| (), |()| reqs.iter().map(|q| vm.sm_map(q).unwrap().len()).sum::<usize>());
    let n = r.samples(5.0);
    r.compare(case, "ns/request", reqs.len() as f64, n, vec![("vmbind", run)]);
}
