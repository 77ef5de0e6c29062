//! The wgpu interop on a real device (lavapipe in CI): arena memory imported zero copy and handed
//! to wgpu, a WGSL compute shader that doubles every word of a bound range, and the arena itself
//! read back through `PhysMem`; copies through wgpu between two imports; refusals of bad input;
//! handles dropped in any order; no validation-layer message. Without a Vulkan device every test
//! prints a SKIP line and passes, unless `VMBIND_REQUIRE_VULKAN=1` (CI), which makes that a
//! failure.
#![cfg(feature = "wgpu")]

#[path = "common/vk.rs"]
mod vkc;

use std::sync::Arc;

use vkc::no_validation_messages;
use vmbind::addr::{PAGE_SIZE, PhysAddr};
use vmbind::mem::PhysMem;
use vmbind::vk::{ArenaImport, HostImport, Vk};
use vmbind::wgpu_interop::{WgpuBuffer, WgpuError, WgpuVk};

const P: u64 = PAGE_SIZE;

/// The shared device, or `None` after a visible SKIP line (a failure under
/// `VMBIND_REQUIRE_VULKAN=1`).
fn shared(test: &str) -> Option<WgpuVk> {
    match WgpuVk::new() {
        Ok(w) => {
            let vk = w.vk();
            eprintln!(
                "{test}: Vulkan device {} ({}, {}) shared with wgpu {:?}, validation layer {}",
                vk.device_name(),
                vk.info().driver,
                vk.info().api,
                w.adapter().get_info().backend,
                if vk.validating() { "on" } else { "off" }
            );
            assert_ne!(w.physical_device(), ash::vk::PhysicalDevice::null());
            eprintln!("{test}: {w:?}, sparse {:?}", vk.info().sparse);
            if std::env::var("VMBIND_VALIDATION").is_ok_and(|v| v == "1") && !vk.validating() {
                eprintln!("{test}: VMBIND_VALIDATION=1 but the validation layer is not installed");
            }
            Some(w)
        }
        Err(e) => {
            vkc::skip(test, &format!("no Vulkan device: {e}"));
            None
        }
    }
}

/// A known pattern: distinct, with high bits set (so doubling wraps for some).
fn word(i: u32) -> u32 {
    i.wrapping_mul(0x9E37_79B9) ^ 0x8000_0001 ^ (i << 7)
}

fn words_to_bytes(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_words(mem: &PhysMem, pa: PhysAddr, n: usize) -> Vec<u32> {
    let mut b = vec![0u8; n * 4];
    mem.read(pa, &mut b).unwrap();
    b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

const DOUBLE: &str = r"
@group(0) @binding(0) var<storage, read_write> data: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&data)) {
        data[id.x] = data[id.x] * 2u;
    }
}
";
const WORKGROUP: u32 = 64;

/// Runs `DOUBLE` over `words` words of `buf` from byte `offset`.
fn double(w: &WgpuVk, buf: &WgpuBuffer, offset: u64, words: u32) {
    let device = w.device();
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("double"),
        source: wgpu::ShaderSource::Wgsl(DOUBLE.into()),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("double"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("double"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: buf.buffer(),
                offset,
                size: wgpu::BufferSize::new(u64::from(words) * 4),
            }),
        }],
    });
    let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("double") });
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("double"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(words.div_ceil(WORKGROUP), 1, 1);
    }
    w.submit([enc.finish()]).unwrap();
}

#[test]
fn a_wgsl_shader_doubles_arena_words_in_place() {
    let Some(w) = shared("wgsl_doubles_arena_words") else { return };
    let mem = Arc::new(PhysMem::new(16 << 20).unwrap());
    let pages = 4u64;
    let pa = mem.alloc_block(pages * P).unwrap();
    let total = (pages * P / 4) as usize;
    let before: Vec<u32> = (0..total as u32).map(word).collect();
    mem.write(pa, &words_to_bytes(&before)).unwrap();
    // A neighbour page right after the import, which nothing may touch.
    let guard = PhysAddr::new(pa.as_u64() + pages * P);
    let guard_bytes: Vec<u8> = (0..P).map(|i| (i as u8) ^ 0x5a).collect();
    mem.write(guard, &guard_bytes).unwrap();

    let buf = w.import(&mem, pa.as_u64(), pages * P).unwrap();
    assert_eq!(buf.size(), pages * P);
    // Bind a range that starts past the first word and whose length is not a multiple of the
    // workgroup size.
    let align = u64::from(w.device().limits().min_storage_buffer_offset_alignment);
    let first = (align / 4) as usize;
    let n: u32 = 3001;
    assert_ne!(n % WORKGROUP, 0);
    assert!(first + n as usize <= total);
    double(&w, &buf, first as u64 * 4, n);
    w.sync().unwrap();

    let after = read_words(&mem, pa, total);
    let want: Vec<u32> = before
        .iter()
        .enumerate()
        .map(|(i, &x)| if (first..first + n as usize).contains(&i) { x.wrapping_mul(2) } else { x })
        .collect();
    let mismatch = after.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(mismatch, None, "first differing word (bound range {first}..{})", first + n as usize);
    // Byte for byte, and the neighbour page untouched.
    let mut bytes = vec![0u8; (pages * P) as usize];
    mem.read(pa, &mut bytes).unwrap();
    assert!(bytes == words_to_bytes(&want));
    let mut g = vec![0u8; P as usize];
    mem.read(guard, &mut g).unwrap();
    assert!(g == guard_bytes, "the page after the import changed");

    // Host writes made after a sync are seen by the next wgpu submission: run again.
    let again: Vec<u32> = (0..total as u32).map(|i| word(i).rotate_left(5)).collect();
    mem.write(pa, &words_to_bytes(&again)).unwrap();
    double(&w, &buf, first as u64 * 4, n);
    w.sync().unwrap();
    let after = read_words(&mem, pa, total);
    for (i, (&a, &b)) in after.iter().zip(&again).enumerate() {
        let want = if (first..first + n as usize).contains(&i) { b.wrapping_mul(2) } else { b };
        assert_eq!(a, want, "second run, word {i}");
    }
    drop(buf);
    w.sync().unwrap();
    no_validation_messages(w.vk());
}

#[test]
fn wgpu_copies_between_imports_and_arena_chunks() {
    let Some(w) = shared("wgpu_copies_between_imports") else { return };
    let mem = Arc::new(PhysMem::new(8 << 20).unwrap());
    let src_pa = mem.alloc_block(2 * P).unwrap();
    let dst_pa = mem.alloc_block(2 * P).unwrap();
    let src: Vec<u8> = (0..2 * P).map(|i| (i as u8).wrapping_mul(13) ^ (i >> 8) as u8).collect();
    mem.write(src_pa, &src).unwrap();
    mem.write(dst_pa, &vec![0xee; (2 * P) as usize]).unwrap();
    let a = w.import(&mem, src_pa.as_u64(), 2 * P).unwrap();
    // The destination through a whole-arena import, by chunk.
    let arena = Arc::new(ArenaImport::new(w.vk(), &mem).unwrap());
    let chunk_size = 1u64 << arena.chunk_shift();
    let index = (dst_pa.as_u64() / chunk_size) as usize;
    let chunk = w.arena_chunk(&arena, index).unwrap();
    let dst_in_chunk = dst_pa.as_u64() - index as u64 * chunk_size;
    let len = 2 * P - 12;
    let mut enc = w.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(a.buffer(), 8, chunk.buffer(), dst_in_chunk + 4, len);
    w.submit([enc.finish()]).unwrap();
    w.sync().unwrap();
    let mut got = vec![0u8; (2 * P) as usize];
    mem.read(dst_pa, &mut got).unwrap();
    let mut want = vec![0xee; (2 * P) as usize];
    want[4..4 + len as usize].copy_from_slice(&src[8..8 + len as usize]);
    assert!(got == want, "the copy through wgpu differs from the source");
    drop((a, chunk));
    w.sync().unwrap();
    no_validation_messages(w.vk());
}

#[test]
fn bad_buffers_are_refused_with_typed_errors() {
    let Some(w) = shared("bad_buffers_refused") else { return };
    let mem = Arc::new(PhysMem::new(4 << 20).unwrap());
    // A range leaving the arena, and a misaligned one: vmbind's import errors.
    assert!(matches!(w.import(&mem, (4 << 20) - P, 2 * P), Err(WgpuError::Vk(_))));
    assert!(matches!(w.import(&mem, 0, 100), Err(WgpuError::Vk(_))));
    assert!(matches!(w.import(&mem, 0, 0), Err(WgpuError::Vk(_))));
    // A chunk that does not exist.
    let arena = Arc::new(ArenaImport::new(w.vk(), &mem).unwrap());
    let n = arena.chunks().len();
    assert!(matches!(w.arena_chunk(&arena, n), Err(WgpuError::BadBuffer { .. })));
    // An import of another context.
    if let Ok(other) = Vk::new() {
        let foreign = Arc::new(ArenaImport::new(&other, &mem).unwrap());
        assert!(matches!(w.arena_chunk(&foreign, 0), Err(WgpuError::BadBuffer { .. })));
    }
    // A host import of this context is accepted whole.
    let import = Arc::new(HostImport::new(w.vk(), &mem, 0, P).unwrap());
    // SAFETY: the import was made on this device.
    let b = unsafe { w.wrap_host_import(import.clone()) }.unwrap();
    assert_eq!(b.size(), P);
    assert!(b.owner().clone().downcast::<HostImport>().is_ok());
    // A null handle is refused whatever the size, before wgpu sees it.
    for size in [0, 6, P] {
        // SAFETY: refused before the handle is used.
        let r = unsafe { w.wrap_raw(ash::vk::Buffer::null(), size, import.clone(), "bad") };
        assert!(matches!(r, Err(WgpuError::BadBuffer { .. })), "{size}: {r:?}");
    }
    drop(b);
    w.sync().unwrap();
    no_validation_messages(w.vk());
}

#[test]
fn handles_may_be_dropped_in_any_order() {
    let Some(w) = shared("handles_dropped_in_any_order") else { return };
    let mem = Arc::new(PhysMem::new(4 << 20).unwrap());
    let pa = mem.alloc_block(P).unwrap();
    let words: Vec<u32> = (0..(P / 4) as u32).map(word).collect();
    mem.write(pa, &words_to_bytes(&words)).unwrap();
    let buf = w.import(&mem, pa.as_u64(), P).unwrap();
    let device = w.device().clone();
    let vk = w.vk().clone();
    double(&w, &buf, 0, 1000);
    // The context and wgpu's handles go first; the buffer keeps everything it needs.
    drop(w);
    device.poll(wgpu::PollType::wait_indefinitely()).unwrap();
    let messages = vk.validation_messages();
    drop(vk);
    drop(device);
    let got = read_words(&mem, pa, 1000);
    // No barrier to the host was submitted here (the context is gone); on lavapipe the writes
    // are there regardless, but only the count is asserted: the point is the drop order.
    assert_eq!(got.len(), 1000);
    drop(buf);
    assert!(messages.is_empty(), "validation layer: {messages:#?}");
}

#[test]
fn the_sparse_mirror_is_a_wgpu_buffer_showing_the_vm() {
    use vmbind::gpuvm::{BindOp, Va};
    use vmbind::iommu::{DeviceId, DomainConfig};
    use vmbind::mem::BioVec;
    use vmbind::service::{Gpu, Service, ServiceConfig};
    use vmbind::vk::SparseMirror;
    let Some(w) = shared("sparse_mirror_as_wgpu_buffer") else { return };
    if w.vk().info().sparse.is_none() {
        vkc::skip("sparse_mirror_as_wgpu_buffer", "no sparse buffers");
        return;
    }
    let mem = Arc::new(PhysMem::new(32 << 20).unwrap());
    let svc = Service::new(mem.clone(), ServiceConfig::default());
    let vm = svc
        .create_vm(Gpu::BehindIommu { id: DeviceId(1), domain: DomainConfig::default() }, 1 << 40)
        .unwrap();
    let frames = mem.alloc_scattered(16, 4).unwrap();
    for (i, f) in frames.iter().enumerate() {
        let bytes: Vec<u8> = (0..P).map(|b| (b as u8) ^ (i as u8).wrapping_mul(37) ^ 0x11).collect();
        mem.write(*f, &bytes).unwrap();
    }
    let bo = svc.create_bo(vm, BioVec::from_frames(&frames)).unwrap();
    let arena = Arc::new(ArenaImport::new(w.vk(), &mem).unwrap());
    let window = (0x100_0000u64, 64 * P);
    let mirror = Arc::new(SparseMirror::new(&arena, &svc, vm, window.0, window.1, None).unwrap());
    let q = svc.create_queue(vm).unwrap();
    q.bind(&[BindOp::Map(Va::object(window.0 + 8 * P, 16 * P, bo, 0))]).unwrap();
    let buf = w.mirror(mirror.clone()).unwrap();
    assert_eq!(buf.size(), window.1);
    // wgpu copies the mapped part of the mirror into a fresh arena block.
    let out = mem.alloc_block(16 * P).unwrap();
    mem.write(out, &vec![0u8; (16 * P) as usize]).unwrap();
    let dst = w.import(&mem, out.as_u64(), 16 * P).unwrap();
    let mut enc = w.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buf.buffer(), 8 * P, dst.buffer(), 0, 16 * P);
    w.submit([enc.finish()]).unwrap();
    w.sync().unwrap();
    let mut got = vec![0u8; (16 * P) as usize];
    mem.read(out, &mut got).unwrap();
    let mut want = vec![0u8; (16 * P) as usize];
    svc.vm(vm).unwrap().gpu_read(window.0 + 8 * P, &mut want).unwrap();
    assert!(got == want, "the mirror read through wgpu differs from gpu_read");
    drop((buf, dst));
    w.sync().unwrap();
    mirror.detach(&svc).unwrap();
    no_validation_messages(w.vk());
}
