//! The main job of vmbind, end to end: a buffer's bytes are placed in scattered pages of
//! physical memory, mapped in ONE call through the radix engine as an IOMMU table, and read back
//! through the table (translate, then read) and verified byte for byte.
//!
//! `cargo run --release --example gpu_buffer_import [FILE]`
//!
//! Without FILE a 16 MiB + 1234 byte pattern buffer is used. This build runs the CPU path: the
//! Vulkan backend (import of the arena and the tables into a Vulkan device, and a compute shader
//! that walks them) is not part of vmbind yet, and the example says so.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use vmbind::addr::{DmaAddr, PAGE_SIZE};
use vmbind::mem::PhysMem;
use vmbind::pt::{MapOptions, MapSource, PageTable, Prot, X86Iommu};

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
        "vmbind gpu_buffer_import: CPU path (this build has no Vulkan backend yet; the table is walked on the CPU)"
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

    // The IOMMU table the device translates through; the pages as one page list, one call.
    let table = PageTable::<X86Iommu>::new(mem.clone())?;
    let pages: Vec<_> = bvecs.iter().map(|b| b.phys).collect();
    let iova = DmaAddr::new(0x10_0000_0000);
    let t0 = Instant::now();
    let stats = table.map(iova, MapSource::Pages(&pages), Prot::READ, MapOptions::default())?;
    let map_ns = t0.elapsed().as_nanos();
    println!(
        "mapped at {iova}: {} leaves, {} table pages, one walk in {:.1} us ({:.2} ns/page)",
        stats.leaves.iter().sum::<u64>(),
        table.table_pages(),
        map_ns as f64 / 1e3,
        map_ns as f64 / pages.len() as f64
    );

    // The device's view: every byte through the table.
    let t0 = Instant::now();
    let mut back = vec![0u8; data.len()];
    for (i, chunk) in back.chunks_mut(PAGE_SIZE as usize).enumerate() {
        let va = DmaAddr::new(iova.as_u64() + i as u64 * PAGE_SIZE);
        let t = table.translate(va).ok_or_else(|| format!("{va} does not translate"))?;
        if !t.prot.contains(Prot::READ) {
            return Err(format!("{va} is not readable").into());
        }
        mem.read(t.pa, chunk)?;
    }
    let read_ns = t0.elapsed().as_nanos();
    if back != data {
        let at = back.iter().zip(&data).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!("byte {at} differs after translation").into());
    }
    println!(
        "read back through the table: {} bytes verified ({:.2} GB/s)",
        back.len(),
        back.len() as f64 / read_ns as f64
    );
    let inv = table.unmap(iova, pages.len() as u64 * PAGE_SIZE)?;
    println!(
        "unmapped {} bytes; {} table pages to free after the IOTLB flush",
        inv.unmapped_bytes(),
        inv.freed_tables()
    );
    inv.complete();
    println!("OK (CPU path)");
    Ok(())
}
