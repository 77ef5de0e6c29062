//! The real driver's page tables against vmbind's (feature `vulkan`, only with a device that
//! binds sparse buffers; rows labelled with its name):
//! - `vk/sparse_bind_driver`: N scattered 4 KiB pages bound by the driver — one
//!   `vkQueueBindSparse` of N records (none coalesce), fence waited — against
//!   `gpuvm/commit_same_ops`: the same N single-page binds committed by vmbind (`Vm::bind` of N
//!   ops, one prepare/commit). N = 65 536, or 32 768 on lavapipe, whose binds are kernel
//!   mappings bounded by `vm.max_map_count` (VULKAN-NOTES.md). ns per page.
//! - `vk/sparse_rebind_1page`: one page rebound in an N-page bound range (one record); ns per
//!   call.
//! - `vk/populate_gpu` against `vk/populate_cpu`: 1 GiB of scattered 4 KiB pages (262 144
//!   entries) bound with the entries written by `populate.comp` (`Vm::bind_deferred`, upload,
//!   dispatch, fence) or by the CPU commit (`Vm::bind`); ns per entry.

use std::sync::Arc;
use std::time::Instant;

use crate::dma::Device;
use crate::gpuvm::{BindOp, Populated, Va, Vm};
use crate::iommu::DeviceId;
use crate::mem::{BioVec, PhysMem};
use crate::vk::{ArenaImport, DriverBench, GpuPopulate, Vk};

use crate::bench::harness::{Report, Run};

const VA: u64 = 1 << 36;
const P: u64 = 4096;

pub fn sparse_cases(r: &mut Report) {
    let sparse_names = ["vk/sparse_bind_driver", "gpuvm/commit_same_ops", "vk/sparse_rebind_1page"];
    let pop_names = ["vk/populate_gpu", "vk/populate_cpu"];
    let want_sparse = sparse_names.iter().any(|c| r.wants(c));
    let want_pop = pop_names.iter().any(|c| r.wants(c));
    if !want_sparse && !want_pop {
        return;
    }
    let ctx = match Vk::new() {
        Ok(c) => c,
        Err(e) => {
            println!("vk/sparse*, vk/populate*: SKIP (no Vulkan device: {e})");
            return;
        }
    };
    if want_sparse {
        sparse(r, &ctx, sparse_names);
    }
    if want_pop {
        populate(r, &ctx, pop_names);
    }
}

fn sparse(r: &mut Report, ctx: &Arc<Vk>, names: [&str; 3]) {
    let n: u64 = if ctx.device_name().contains("llvmpipe") { 32_768 } else { 65_536 };
    let driver = match DriverBench::new(ctx, n) {
        Ok(d) => d,
        Err(e) => {
            println!("vk/sparse*: SKIP ({e})");
            return;
        }
    };
    let mem = Arc::new(PhysMem::new((n * P) + (64 << 20)).unwrap());
    let vm = Vm::new(Device::direct(mem.clone(), DeviceId(3), 48, true).unwrap(), 1 << 40).unwrap();
    let frames = mem.alloc_scattered(n as usize, 0x5a).unwrap();
    let bo = vm.create_bo(BioVec::from_frames(&frames)).unwrap();
    let ops: Vec<BindOp> = (0..n).map(|i| BindOp::Map(Va::object(VA + 2 * i * P, P, bo, i * P))).collect();
    let unmap = [BindOp::Unmap { addr: VA, range: 2 * n * P }];
    let unit = format!("ns/page on {}", ctx.device_name());
    let drv = &driver;
    let driver_run: Run<'_> = Box::new(move || drv.run(None));
    let vm_ref = &vm;
    let commit_run: Run<'_> = Box::new(move || {
        let _ = vm_ref.bind(&unmap);
        let t0 = Instant::now();
        vm_ref.bind(&ops).unwrap();
        t0.elapsed().as_secs_f64() * 1e9
    });
    let samples = r.samples(200.0);
    r.compare_cases(
        &unit,
        n as f64,
        samples,
        vec![(names[0], "driver", driver_run), (names[1], "vmbind", commit_run)],
    );
    // One page rebound inside the bound range.
    let mut i = 0u64;
    let one: Run<'_> = Box::new(move || {
        i = (i + 7919) % n;
        drv.run(Some(i))
    });
    let samples = r.samples(0.2);
    r.compare_cases(
        &format!("ns/call on {}", ctx.device_name()),
        1.0,
        samples,
        vec![(names[2], "driver", one)],
    );
}

fn populate(r: &mut Report, ctx: &Arc<Vk>, names: [&str; 2]) {
    const PAGES: usize = 262_144;
    let mem = Arc::new(PhysMem::new((PAGES as u64 * P) + (64 << 20)).unwrap());
    let vm = Vm::new(Device::direct(mem.clone(), DeviceId(4), 48, true).unwrap(), 1 << 40).unwrap();
    let frames = mem.alloc_scattered(PAGES, 0x9b).unwrap();
    let bo = vm.create_bo(BioVec::from_frames(&frames)).unwrap();
    let import = Arc::new(ArenaImport::new(ctx, &mem).unwrap());
    let pop = GpuPopulate::new(&import).unwrap();
    let map = [BindOp::Map(Va::object(VA, PAGES as u64 * P, bo, 0))];
    let unmap = [BindOp::Unmap { addr: VA, range: PAGES as u64 * P }];
    let (vm, pop, map, unmap) = (&vm, &pop, &map, &unmap);
    let gpu: Run<'_> = Box::new(move || {
        let _ = vm.bind(unmap);
        let t0 = Instant::now();
        let (_, how) =
            vm.bind_deferred(map, |log| pop.run(log).map(|_| ()).map_err(|e| e.to_string())).unwrap();
        assert!(matches!(how, Populated::Writer { .. }), "{how:?}");
        t0.elapsed().as_secs_f64() * 1e9
    });
    let cpu: Run<'_> = Box::new(move || {
        let _ = vm.bind(unmap);
        let t0 = Instant::now();
        vm.bind(map).unwrap();
        t0.elapsed().as_secs_f64() * 1e9
    });
    let samples = r.samples(40.0);
    r.compare_cases(
        &format!("ns/PTE on {}", ctx.device_name()),
        PAGES as f64,
        samples,
        vec![(names[0], "vmbind", gpu), (names[1], "vmbind", cpu)],
    );
}
