//! The main job of vmbind, end to end: a buffer's bytes are placed in scattered pages of
//! physical memory, become a GPU buffer object, and are bound into a GPU VM whose GPU sits
//! behind an IOMMU (the object's pages linked into one IOVA range in one call, the GPU table
//! filled from it), then read back the way the GPU reads — GPU VA through the GPU table, DMA
//! address through the IOMMU — and verified byte for byte.
//!
//! `cargo run --release --example gpu_buffer_import [FILE]`
//!
//! Without FILE a 16 MiB + 1234 byte pattern buffer is used. This build runs the CPU path: the
//! Vulkan backend (import of the arena and the tables into a Vulkan device, and a compute shader
//! that walks them) is not part of vmbind yet, and the example says so.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use vmbind::addr::PAGE_SIZE;
use vmbind::dma::Device;
use vmbind::gpuvm::{BindOp, Va, Vm};
use vmbind::iommu::{DeviceId, DomainConfig, Iommu};
use vmbind::mem::{BioVec, PhysMem};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu_buffer_import: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "vmbind gpu_buffer_import: CPU path (this build has no Vulkan backend yet; the GPU's walk runs on the CPU)"
    );
    let arg = std::env::args().nth(1);
    let mem = Arc::new(PhysMem::new(1 << 30)?);
    let (data, bvecs) = match &arg {
        Some(path) => {
            let bvecs = mem.bvecs_from_file(std::path::Path::new(path), Some(0xb1f))?;
            (std::fs::read(path)?, bvecs)
        }
        None => {
            let data: Vec<u8> =
                (0..(16u32 << 20) + 1234).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
            let bvecs = mem.bvecs_from_bytes(&data, Some(0xb1f))?;
            (data, bvecs)
        }
    };
    let source = arg.as_deref().unwrap_or("generated pattern");
    println!("buffer: {} bytes from {source}, in {} scattered 4 KiB pages", data.len(), bvecs.len());

    // The GPU sits behind an IOMMU: its DMA device is attached to a strict domain.
    let iommu = Iommu::new(mem.clone());
    let dom = iommu.create_domain(DomainConfig::default())?;
    iommu.register_device(DeviceId(1), true)?;
    iommu.attach(DeviceId(1), &dom)?;
    let gpu = Device::translated(&iommu, DeviceId(1))?;
    let vm = Vm::new(gpu, 1 << 40)?;

    // The buffer object: its frames, whole pages (the last one's tail is padding).
    let frames: Vec<_> = bvecs.iter().map(|b| b.phys).collect();
    let bo = vm.create_bo(BioVec::from_frames(&frames))?;
    let size = frames.len() as u64 * PAGE_SIZE;
    let va = 0x10_0000_0000u64;
    let t0 = Instant::now();
    let bound = vm.bind(&[BindOp::Map(Va::object(va, size, bo, 0))])?;
    let bind_ns = t0.elapsed().as_nanos();
    let leaves = vm.table().leaves();
    println!(
        "bound at GPU VA {va:#x}: one IOVA range linked in one call, {} GPU leaves ({} of them 2 MiB or larger), {} split/merge op(s), in {:.1} us ({:.2} ns/page)",
        leaves.len(),
        leaves.iter().filter(|l| l.size != vmbind::addr::PageSize::Size4K).count(),
        bound.ops.len(),
        bind_ns as f64 / 1e3,
        bind_ns as f64 / frames.len() as f64
    );

    // The GPU's view: every byte through both stages (GPU table, then the IOMMU).
    let t0 = Instant::now();
    let mut back = vec![0u8; data.len()];
    vm.gpu_read(va, &mut back)?;
    let read_ns = t0.elapsed().as_nanos();
    if back != data {
        let at = back.iter().zip(&data).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!("byte {at} differs after translation").into());
    }
    println!(
        "read back through the GPU table and the IOMMU: {} bytes verified ({:.2} GB/s)",
        back.len(),
        back.len() as f64 / read_ns as f64
    );
    // A write to a GPU VA nothing maps is a typed fault, and nothing moves.
    let fault = vm.gpu_write(va + size, b"x").expect_err("nothing is mapped past the buffer");
    println!("write past the buffer refused: {fault}");
    let done = vm.unbind(va, size)?;
    println!(
        "unbound {} bytes; GPU TLB flush of {:?}, {} table pages freed",
        done.cleared, done.flush.range, done.flush.freed_tables
    );
    vm.destroy_bo(bo)?;
    println!("OK (CPU path)");
    Ok(())
}
