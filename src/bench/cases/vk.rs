//! Vulkan cases of the report (feature `vulkan`, and only when a device exists): 256 MiB of
//! scattered pages read by the `walk_gather` shader through the GPU table and the IOMMU table,
//! against a plain `vkCmdCopyBuffer` of as many bytes of the same imported arena on the same
//! device. Both are labelled with the device's name.

use std::sync::Arc;
use std::time::Instant;

use crate::dma::Device;
use crate::gpuvm::{BindOp, Va, Vm};
use crate::iommu::{DeviceId, DomainConfig, Iommu};
use crate::mem::{BioVec, PhysMem};
use crate::vk::{ArenaImport, CopyJob, Vk, WalkGather};

use crate::bench::harness::{Report, Run};

/// 256 MiB of 4 KiB pages.
const PAGES: usize = 65_536;
const VA: u64 = 1 << 36;

pub fn vk_cases(r: &mut Report) {
    let names = ["vk/walk_gather", "vk/plain_copy"];
    if !names.iter().any(|c| r.wants(c)) {
        return;
    }
    let ctx = match Vk::new() {
        Ok(c) => c,
        Err(e) => {
            println!("vk/*: SKIP (no Vulkan device: {e})");
            return;
        }
    };
    let mem = Arc::new(PhysMem::new(320 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let dom = iommu.create_domain(DomainConfig::default()).unwrap();
    iommu.register_device(DeviceId(9), true).unwrap();
    iommu.attach(DeviceId(9), &dom).unwrap();
    let vm = Vm::new(Device::translated(&iommu, DeviceId(9)).unwrap(), 1 << 40).unwrap();
    let frames = mem.alloc_scattered(PAGES, 0x6a7).unwrap();
    let bo = vm.create_bo(BioVec::from_frames(&frames)).unwrap();
    let len = PAGES as u64 * 4096;
    vm.bind(&[BindOp::Map(Va::object(VA, len, bo, 0))]).unwrap();
    let import = Arc::new(ArenaImport::new(&ctx, &mem).unwrap());
    let g = WalkGather::new(&import).unwrap();
    let pages: Vec<u64> = (0..PAGES as u64).map(|i| VA + i * 4096).collect();
    let mut walk = g.job(&vm, &pages).unwrap();
    // The same number of bytes, one contiguous range of the same arena.
    let mut copy = CopyJob::new(&import, 0, len).unwrap();
    let unit = format!("ns/4KiB page on {}", ctx.device_name());
    let walk_run: Run<'_> = Box::new(move || {
        let t0 = Instant::now();
        let faults = walk.run().unwrap();
        let dt = t0.elapsed().as_secs_f64() * 1e9;
        assert!(faults.is_empty());
        dt
    });
    let copy_run: Run<'_> = Box::new(move || {
        let t0 = Instant::now();
        copy.run().unwrap();
        t0.elapsed().as_secs_f64() * 1e9
    });
    let n = r.samples(60.0);
    r.compare_cases(
        &unit,
        PAGES as f64,
        n,
        vec![(names[0], "vmbind", walk_run), (names[1], "vmbind", copy_run)],
    );
}
