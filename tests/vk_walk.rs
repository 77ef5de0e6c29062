//! The Vulkan backend on a real device (lavapipe in CI): the arena imported zero-copy, the
//! `walk_gather` shader's two-stage walk against the CPU's `gpu_read`, faults at each stage,
//! visibility of CPU-side binds to the next submit, import checks, the checked-in SPIR-V, and
//! no validation-layer message. Without a Vulkan device every test prints a SKIP line and passes,
//! unless `VMBIND_REQUIRE_VULKAN=1` (CI), which makes that a failure.
#![cfg(feature = "vulkan")]

#[path = "common/gpu.rs"]
mod gpu;

#[path = "common/vk.rs"]
mod vkc;

use std::sync::Arc;

use gpu::{Fx, Mode, fx};
use vkc::{context, no_validation_messages};
use vmbind::addr::{GpuVa, PAGE_SIZE, PageSize};
use vmbind::gpuvm::{BindOp, BoId, FaultStage, Va, VaFlags, Vm};
use vmbind::iommu::FaultReason;
use vmbind::mem::{BioVec, PhysMem};
use vmbind::vk::{ArenaImport, CopyJob, HostImport, VkError, WalkGather};

const P: u64 = PAGE_SIZE;
const MIB2: u64 = 2 << 20;

/// An object of `pages` scattered frames, each page full of bytes derived from (tag, page).
fn scattered_bo(f: &Fx, pages: usize, tag: u8) -> BoId {
    let frames = f.mem.alloc_scattered(pages, u64::from(tag)).unwrap();
    for (i, &fr) in frames.iter().enumerate() {
        let bytes: Vec<u8> = (0..P).map(|b| (b as u8) ^ tag ^ (i as u8).rotate_left(3)).collect();
        f.mem.write(fr, &bytes).unwrap();
    }
    f.vm.create_bo(BioVec::from_frames(&frames)).unwrap()
}

/// An object of `n` 2 MiB blocks (huge leaves and fragments).
fn contiguous_bo(f: &Fx, n: usize, tag: u8) -> BoId {
    let blocks: Vec<BioVec> = (0..n)
        .map(|k| {
            let pa = f.mem.alloc_contig(PageSize::Size2M).unwrap();
            let bytes: Vec<u8> = (0..MIB2).map(|b| (b as u8).wrapping_mul(31) ^ tag ^ k as u8).collect();
            f.mem.write(pa, &bytes).unwrap();
            BioVec { phys: pa, offset: 0, len: MIB2 as u32 }
        })
        .collect();
    f.vm.create_bo(blocks).unwrap()
}

fn cpu_read(vm: &Vm, va: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    vm.gpu_read(va, &mut b).unwrap();
    b
}

#[test]
fn the_shader_walk_reads_what_gpu_read_reads_through_every_kind_of_mapping() {
    let Some(ctx) = context("walk_equals_gpu_read") else { return };
    for mode in [Mode::Iommu, Mode::Direct] {
        let f = fx(mode, 64 << 20);
        let a = scattered_bo(&f, 64, 1);
        let b = contiguous_bo(&f, 2, 2);
        f.vm.bind(&[
            // Scattered 4 KiB leaves.
            BindOp::Map(Va::object(0x100_0000, 64 * P, a, 0)),
            // 2 MiB-aligned: a huge leaf (behind the IOMMU, the IOVA range decides).
            BindOp::Map(Va::object(0x4000_0000, 2 * MIB2, b, 0)),
            // Unaligned in VA against the object: 4 KiB leaves with fragments.
            BindOp::Map(Va::object(0x5000_0000 + 16 * P, MIB2, b, 16 * P)),
            BindOp::Map(Va::sparse(0x6000_0000, MIB2 + 8 * P)),
            BindOp::Map(
                Va::object(0x7000_0000, 8 * P, a, 8 * P)
                    .with_flags(VaFlags { read_only: true, no_exec: true }),
            ),
        ])
        .unwrap();
        let import = Arc::new(ArenaImport::new(&ctx, &f.mem).unwrap());
        let g = WalkGather::new(&import).unwrap();
        for (va, len) in [
            (0x100_0000, 64 * P),
            (0x4000_0000, 2 * MIB2),
            (0x5000_0000 + 16 * P, MIB2),
            (0x6000_0000, MIB2 + 8 * P),
            (0x7000_0000 + 123, 8 * P - 200),
        ] {
            let (bytes, faults) = g.gather(&f.vm, va, len).unwrap();
            assert!(faults.is_empty(), "{mode:?} {va:#x}: {faults:?}");
            assert!(bytes == cpu_read(&f.vm, va, len), "{mode:?}: gather at {va:#x} differs from gpu_read");
        }
        // The mappings really took those shapes.
        if let Mode::Direct = mode {
            assert_eq!(f.vm.leaf_size(0x4000_0000), Some(PageSize::Size2M));
        }
        assert!(cpu_read(&f.vm, 0x6000_0000, 64).iter().all(|&x| x == 0));
        no_validation_messages(&ctx);
    }
}

#[test]
fn faults_name_the_va_and_stage_and_the_other_pages_still_arrive() {
    let Some(ctx) = context("faults") else { return };
    let f = fx(Mode::Iommu, 64 << 20);
    let a = scattered_bo(&f, 8, 3);
    f.vm.bind(&[BindOp::Map(Va::object(0x10_0000, 8 * P, a, 0))]).unwrap();
    // Page 5's IOVA goes away in the IOMMU behind the GPU table.
    let t = f.vm.table().translate(GpuVa::new(0x10_5000)).unwrap();
    f.dom.as_ref().unwrap().unmap_strict(t.pa, P).unwrap();
    let import = Arc::new(ArenaImport::new(&ctx, &f.mem).unwrap());
    let g = WalkGather::new(&import).unwrap();
    // Pages 0..8 mapped, then two unmapped GPU pages.
    let (bytes, faults) = g.gather(&f.vm, 0x10_0000, 10 * P).unwrap();
    assert_eq!(faults.len(), 3, "{faults:?}");
    assert_eq!(faults[0].va, 0x10_5000);
    match faults[0].stage {
        FaultStage::Dma(d) => {
            assert_eq!(d.iova, t.pa);
            assert_eq!(d.reason, FaultReason::NotMapped);
            assert_eq!(d.device, gpu::GPU);
        }
        s => panic!("{s:?}"),
    }
    assert_eq!((faults[1].va, faults[1].stage), (0x10_8000, FaultStage::NotMapped));
    assert_eq!((faults[2].va, faults[2].stage), (0x10_9000, FaultStage::NotMapped));
    // The CPU walk agrees on each.
    for fl in &faults {
        let e = f.vm.gpu_read(fl.va, &mut [0u8; 8]).unwrap_err();
        assert_eq!(e.va, fl.va);
        assert_eq!(std::mem::discriminant(&e.stage), std::mem::discriminant(&fl.stage));
    }
    for p in [0u64, 1, 2, 3, 4, 6, 7] {
        let at = (p * P) as usize;
        assert!(bytes[at..at + P as usize] == cpu_read(&f.vm, 0x10_0000 + p * P, P), "page {p}");
    }
    assert!(bytes[5 * P as usize..6 * P as usize].iter().all(|&x| x == 0));
    no_validation_messages(&ctx);
}

#[test]
fn a_bind_committed_on_the_cpu_is_what_the_next_gather_reads() {
    let Some(ctx) = context("remap_visible") else { return };
    for mode in [Mode::Iommu, Mode::Direct] {
        let f = fx(mode, 64 << 20);
        let a = scattered_bo(&f, 4, 5);
        let b = scattered_bo(&f, 4, 6);
        let import = Arc::new(ArenaImport::new(&ctx, &f.mem).unwrap());
        let g = WalkGather::new(&import).unwrap();
        let pages: Vec<u64> = (0..4).map(|i| 0x20_0000 + i * P).collect();
        f.vm.bind(&[BindOp::Map(Va::object(0x20_0000, 4 * P, a, 0))]).unwrap();
        let mut job = g.job(&f.vm, &pages).unwrap();
        for round in 0..6 {
            let obj = if round % 2 == 0 { a } else { b };
            f.vm.bind(&[BindOp::Map(Va::object(0x20_0000, 4 * P, obj, 0))]).unwrap();
            // And a host write into the data the next submit must see.
            f.vm.gpu_write(0x20_1000 + 8, &[round as u8; 8]).unwrap();
            assert!(job.run().unwrap().is_empty());
            assert!(job.bytes() == cpu_read(&f.vm, 0x20_0000, 4 * P).as_slice(), "{mode:?} round {round}");
        }
        f.vm.unbind(0x20_0000, 4 * P).unwrap();
        let faults = job.run().unwrap();
        assert_eq!(faults.iter().map(|f| f.va).collect::<Vec<_>>(), pages);
        no_validation_messages(&ctx);
    }
}

#[test]
fn imports_are_checked_against_the_device_and_the_arena() {
    let Some(ctx) = context("import_checks") else { return };
    let mem = Arc::new(PhysMem::new(8 << 20).unwrap());
    let align = ctx.info().host_pointer_alignment;
    assert!(align.is_power_of_two());
    let e = HostImport::new(&ctx, &mem, 0, 100).unwrap_err();
    assert!(matches!(e, VkError::Misaligned { what: "length", .. }), "{e}");
    if align > 1 {
        let e = HostImport::new(&ctx, &mem, align / 2, align).unwrap_err();
        assert!(matches!(e, VkError::Misaligned { what: "host pointer", .. }), "{e}");
    }
    assert!(matches!(HostImport::new(&ctx, &mem, 0, 0), Err(VkError::BadRange { .. })));
    assert!(matches!(HostImport::new(&ctx, &mem, 4 << 20, 8 << 20), Err(VkError::BadRange { .. })));
    let ok = HostImport::new(&ctx, &mem, 4096, 1 << 20).unwrap();
    assert_eq!(ok.range(), (4096, 1 << 20));
    assert_ne!(ok.device_address(), 0);
    // The import keeps the arena alive; the context may be dropped first.
    drop(mem);
    drop(ctx);
    drop(ok);
    // A gather of another arena's VM is refused.
    let Some(ctx) = context("import_checks") else { return };
    let f = fx(Mode::Direct, 64 << 20);
    let other = Arc::new(PhysMem::new(4 << 20).unwrap());
    let import = Arc::new(ArenaImport::new(&ctx, &other).unwrap());
    let g = WalkGather::new(&import).unwrap();
    assert!(matches!(g.job(&f.vm, &[0]), Err(VkError::OtherArena)));
    assert!(matches!(g.job(&f.vm, &[]), Err(VkError::BadRequest(_))));
    assert!(matches!(g.job(&f.vm, &[0x1234]), Err(VkError::BadRequest(_))));
    assert!(matches!(CopyJob::new(&import, 0, 0), Err(VkError::BadRequest(_))));
    no_validation_messages(&ctx);
}

#[test]
fn a_plain_copy_moves_the_arena_bytes() {
    let Some(ctx) = context("plain_copy") else { return };
    let mem = Arc::new(PhysMem::new(8 << 20).unwrap());
    let frames = mem.alloc_frames(16).unwrap();
    mem.write(frames[0], b"copied by the device").unwrap();
    let import = Arc::new(ArenaImport::new(&ctx, &mem).unwrap());
    let mut job = CopyJob::new(&import, frames[0].as_u64(), 16 * P).unwrap();
    job.run().unwrap();
    assert_eq!(&job.bytes()[..20], b"copied by the device");
    no_validation_messages(&ctx);
}

#[test]
fn the_checked_in_spirv_is_what_glslang_compiles() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/shaders");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_suffix(".comp").map(String::from))
        .collect();
    names.sort();
    assert!(names.len() >= 3, "{names:?}");
    for name in names {
        let src = format!("{dir}/{name}.comp");
        let spv = format!("{dir}/{name}.spv");
        let out = std::env::temp_dir().join(format!("vmbind-{name}-{}.spv", std::process::id()));
        let run = std::process::Command::new("glslangValidator")
            .args(["--target-env", "vulkan1.2", "-V", &src, "-o"])
            .arg(&out)
            .output();
        match run {
            Ok(o) if o.status.success() => {
                let fresh = std::fs::read(&out).unwrap();
                let _ = std::fs::remove_file(&out);
                assert!(fresh == std::fs::read(&spv).unwrap(), "{spv} is stale: recompile it");
            }
            Ok(o) => panic!("glslangValidator failed on {src}: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => {
                assert!(
                    std::env::var("VMBIND_REQUIRE_VULKAN").map_or(true, |v| v != "1"),
                    "VMBIND_REQUIRE_VULKAN=1 but no glslangValidator: {e}"
                );
                eprintln!("SKIP the_checked_in_spirv_is_what_glslang_compiles: no glslangValidator: {e}");
                return;
            }
        }
    }
}
