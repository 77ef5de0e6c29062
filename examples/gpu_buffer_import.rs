//! The main job of vmbind, end to end: a buffer's bytes are placed in scattered pages of
//! physical memory, become a GPU buffer object, are DMA-mapped for a GPU behind an IOMMU (the
//! two-step API: one IOVA range, the pages linked in one call, one IOTLB sync) and bound into the
//! GPU's VM (its table filled from that range). Then a real Vulkan device reads the buffer the way
//! the GPU would: the arena holding the pages and both page tables is imported into Vulkan without
//! a copy, and the `walk_gather` compute shader walks the GPU table, then the IOMMU table, for
//! every page and copies the bytes out. They are checked against the source by checksum and byte
//! for byte.
//!
//! `cargo run --release --example gpu_buffer_import [FILE]`
//!
//! Without FILE a generated 64 MiB buffer is used. Without a Vulkan loader or device (or built
//! without the `vulkan` feature) the same steps run with the CPU's walk (`Vm::gpu_read`), and the
//! example says "CPU path" and why.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use vmbind::addr::{GpuVa, PAGE_SIZE, PageSize};
use vmbind::dma::Device;
use vmbind::gpuvm::{BindOp, Va, Vm};
use vmbind::iommu::{DeviceId, DomainConfig, Iommu};
use vmbind::mem::{BioVec, PhysMem};
use vmbind::workload::checksum;

/// GPU VA of the buffer.
const VA: u64 = 0x10_0000_0000;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu_buffer_import: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let arg = std::env::args().nth(1);
    let t0 = Instant::now();
    let data: Vec<u8> = match &arg {
        Some(path) => std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))?,
        None => (0..64u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect(),
    };
    if data.is_empty() {
        return Err("the buffer is empty".into());
    }
    let source = arg.as_deref().unwrap_or("generated");
    // The arena: the buffer's pages, the tables and room to spare.
    let arena = ((data.len() as u64 * 5 / 4 + (64 << 20)) + (2 << 20) - 1) & !((2 << 20) - 1);
    let mem = Arc::new(PhysMem::new(arena)?);
    let bvecs = mem.bvecs_from_bytes(&data, Some(0xb1f))?;
    let want = checksum(&data);
    println!(
        "1. buffer: {} bytes ({source}), checksum {want:#018x}, placed in {} scattered 4 KiB pages of a {} MiB arena in {:.1} ms",
        data.len(),
        bvecs.len(),
        arena >> 20,
        ms(t0)
    );

    // The GPU behind an IOMMU: its DMA device attached to a strict domain; its VM.
    let iommu = Iommu::new(mem.clone());
    let dom = iommu.create_domain(DomainConfig::default())?;
    iommu.register_device(DeviceId(1), true)?;
    iommu.attach(DeviceId(1), &dom)?;
    let vm = Vm::new(Device::translated(&iommu, DeviceId(1))?, 1 << 40)?;
    let frames: Vec<_> = bvecs.iter().map(|b| b.phys).collect();
    let bo = vm.create_bo(BioVec::from_frames(&frames))?;
    let size = frames.len() as u64 * PAGE_SIZE;
    let t0 = Instant::now();
    vm.bind(&[BindOp::Map(Va::object(VA, size, bo, 0))])?;
    let bind_ms = ms(t0);
    let iova = vm.table().translate(GpuVa::new(VA)).ok_or("the bound buffer does not translate")?.pa;
    let leaves = vm.table().leaves();
    let huge = leaves.iter().filter(|l| l.size != PageSize::Size4K).count();
    println!(
        "2. DMA map + bind in {bind_ms:.3} ms ({:.2} ns/page): the {} pages linked into one IOVA range [{:#x}, +{size:#x}) in one call and one IOTLB sync; GPU VA {VA:#x} bound with {} GPU leaves ({huge} of 2 MiB)",
        bind_ms * 1e6 / frames.len() as f64,
        frames.len(),
        iova.as_u64(),
        leaves.len(),
    );

    let back = read_back(&mem, &vm, data.len())?;
    let got = checksum(&back.bytes);
    if got != want || back.bytes != data {
        let at = back.bytes.iter().zip(&data).position(|(a, b)| a != b).unwrap_or(0);
        return Err(
            format!("checksum {got:#018x} != {want:#018x}: byte {at} differs after translation").into()
        );
    }
    println!("5. checksum {got:#018x} = source: {} bytes verified", data.len());
    // A read of a GPU VA nothing maps is a typed fault, and nothing moves.
    let fault = vm.gpu_read(VA + size, &mut [0u8; 1]).expect_err("nothing is mapped past the buffer");
    println!("   past the buffer: {fault}");
    vm.unbind(VA, size)?;
    vm.destroy_bo(bo)?;
    println!("OK ({}): verified", back.backend);
    Ok(())
}

struct ReadBack {
    bytes: Vec<u8>,
    backend: String,
}

/// Steps 3 and 4: the Vulkan walk, or the CPU's when there is no Vulkan device.
fn read_back(mem: &Arc<PhysMem>, vm: &Vm, len: usize) -> Result<ReadBack, Box<dyn std::error::Error>> {
    #[cfg(feature = "vulkan")]
    {
        use vmbind::vk::{ArenaImport, Vk, WalkGather};
        match Vk::new() {
            Ok(ctx) => {
                let t0 = Instant::now();
                let import = Arc::new(ArenaImport::new(&ctx, mem)?);
                let g = WalkGather::new(&import)?;
                let pages: Vec<u64> =
                    (0..(len as u64).div_ceil(PAGE_SIZE)).map(|i| VA + i * PAGE_SIZE).collect();
                let mut job = g.job(vm, &pages)?;
                println!(
                    "3. Vulkan device {} ({}, Vulkan {}): arena imported zero copy ({} chunk(s), host-pointer alignment {}), pipeline ready in {:.1} ms",
                    ctx.device_name(),
                    ctx.info().driver,
                    ctx.info().api,
                    import.chunks().len(),
                    ctx.info().host_pointer_alignment,
                    ms(t0)
                );
                let t0 = Instant::now();
                let faults = job.run()?;
                let walk_ms = ms(t0);
                if let Some(f) = faults.first() {
                    return Err(format!("{} GPU fault(s), the first: {f}", faults.len()).into());
                }
                println!(
                    "4. walk_gather: {} pages through the GPU table and the IOMMU table on the device in {walk_ms:.1} ms ({:.2} GB/s)",
                    pages.len(),
                    len as f64 / walk_ms / 1e6
                );
                let messages = ctx.validation_messages();
                if !messages.is_empty() {
                    return Err(format!("validation layer: {messages:?}").into());
                }
                return Ok(ReadBack {
                    bytes: job.bytes()[..len].to_vec(),
                    backend: format!("Vulkan: {}", ctx.device_name()),
                });
            }
            Err(e) => println!("3. no Vulkan ({e}): CPU path"),
        }
    }
    #[cfg(not(feature = "vulkan"))]
    println!("3. built without the `vulkan` feature: CPU path");
    let _ = mem;
    let t0 = Instant::now();
    let mut bytes = vec![0u8; len];
    vm.gpu_read(VA, &mut bytes)?;
    let read_ms = ms(t0);
    println!(
        "4. gpu_read: {len} bytes through the GPU table and the IOMMU on the CPU in {read_ms:.1} ms ({:.2} GB/s)",
        len as f64 / read_ms / 1e6
    );
    Ok(ReadBack { bytes, backend: "CPU path".into() })
}
