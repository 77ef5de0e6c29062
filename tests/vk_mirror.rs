//! The Vulkan sparse mirror on a real driver (lavapipe 25 in CI): random bind/unbind/sparse/
//! repeat sequences through the service; after each fence a copy and a compute shader reading
//! the sparse buffer return exactly `gpu_read`'s bytes for every bound page, and the number of
//! `VkSparseMemoryBind` records is the coalesced count the docs promise (counted here page by
//! page). No Vulkan device: a visible SKIP, unless `VMBIND_REQUIRE_VULKAN=1` (CI) — then a
//! failure.
#![cfg(feature = "vulkan")]

#[path = "common/rng.rs"]
mod rng;
#[path = "common/vk.rs"]
mod vkc;

use std::sync::Arc;

use rng::SplitMix64;
use vkc::{context, no_validation_messages, skip};
use vmbind::addr::{PAGE_SIZE, PageSize};
use vmbind::gpuvm::{BindOp, BoId, Va, Vm};
use vmbind::iommu::{DeviceId, DomainConfig};
use vmbind::mem::{BioVec, PhysMem};
use vmbind::service::{Gpu, Service, ServiceConfig, ServiceError, VmId};
use vmbind::vk::{ArenaImport, MirrorBacking, SparseMirror, Vk, VkError};

const P: u64 = PAGE_SIZE;

struct Fx {
    mem: Arc<PhysMem>,
    svc: Service,
    vm: VmId,
    import: Arc<ArenaImport>,
}

fn fixture(ctx: Arc<Vk>, gpu: Gpu) -> Fx {
    let mem = Arc::new(PhysMem::new(128 << 20).unwrap());
    let svc = Service::new(mem.clone(), ServiceConfig { workers: 2, ..ServiceConfig::default() });
    let vm = svc.create_vm(gpu, 1 << 40).unwrap();
    let import = Arc::new(ArenaImport::new(&ctx, &mem).unwrap());
    Fx { mem, svc, vm, import }
}

fn behind() -> Gpu {
    Gpu::BehindIommu { id: DeviceId(1), domain: DomainConfig::default() }
}

/// An object of `pages` pages (scattered frames, or one contiguous 2 MiB block's worth), each
/// page's bytes derived from (tag, page).
fn bo(f: &Fx, pages: usize, tag: u8, contiguous: bool) -> BoId {
    let segs: Vec<BioVec> = if contiguous {
        let pa = f.mem.alloc_contig(PageSize::Size2M).unwrap();
        vec![BioVec { phys: pa, offset: 0, len: (pages as u64 * P) as u32 }]
    } else {
        BioVec::from_frames(&f.mem.alloc_scattered(pages, u64::from(tag)).unwrap())
    };
    let mut i = 0u64;
    for s in &segs {
        for k in 0..u64::from(s.len) / P {
            let bytes: Vec<u8> = (0..P).map(|b| (b as u8) ^ tag ^ (i as u8).rotate_left(3) ^ 1).collect();
            f.mem.write(vmbind::addr::PhysAddr::new(s.phys.as_u64() + k * P), &bytes).unwrap();
            i += 1;
        }
    }
    f.svc.create_bo(f.vm, segs).unwrap()
}

/// What page `va` shows in the VM: `Some((object, offset))` or `None` (unmapped or sparse).
fn target(maps: &[Va<BoId>], va: u64) -> Option<(BoId, u64)> {
    let i = maps.partition_point(|v| v.end() <= va);
    maps.get(i).filter(|v| v.addr <= va).and_then(|v| v.obj.map(|b| (b, v.offset_at(va))))
}

/// The records the docs promise for `ops` over the window, counted page by page: a new
/// record wherever a touched page does not continue the previous touched page's backing.
fn promised_records(vm: &Vm, ops: &[BindOp], lo: u64, hi: u64) -> u64 {
    let maps = vm.mappings();
    let mut pages: Vec<u64> = Vec::new();
    for op in ops {
        let (a, e) = match op {
            BindOp::Map(v) => (v.addr, v.end()),
            BindOp::Unmap { addr, range } => (*addr, addr + range),
        };
        pages.extend((a.max(lo)..e.min(hi)).step_by(P as usize));
    }
    pages.sort_unstable();
    pages.dedup();
    let mut n = 0;
    let mut prev: Option<(u64, Option<(BoId, u64)>)> = None;
    for &p in &pages {
        let t = target(&maps, p);
        let continues = prev.is_some_and(|(q, u)| {
            q + P == p
                && match (u, t) {
                    (None, None) => true,
                    (Some((a, o)), Some((b, x))) => a == b && o + P == x,
                    _ => false,
                }
        });
        if !continues {
            n += 1;
        }
        prev = Some((p, t));
    }
    n
}

/// Every page of the window that the VM maps to memory reads the same through the mirror
/// (copy and shader) as through `gpu_read`.
fn assert_mirror_matches(f: &Fx, m: &SparseMirror, round: usize) {
    let (lo, len) = m.window();
    let vm = f.svc.vm(f.vm).unwrap();
    let maps = vm.mappings();
    let by_copy = m.read_copy(lo, len).unwrap();
    let by_shader = m.read_shader(lo, len).unwrap();
    let mut checked = 0;
    for va in (lo..lo + len).step_by(P as usize) {
        if target(&maps, va).is_none() {
            continue;
        }
        let mut want = vec![0u8; P as usize];
        vm.gpu_read(va, &mut want).unwrap();
        let at = (va - lo) as usize;
        assert!(by_copy[at..at + P as usize] == want[..], "round {round}: copy differs at GPU VA {va:#x}");
        assert!(
            by_shader[at..at + P as usize] == want[..],
            "round {round}: shader differs at GPU VA {va:#x}"
        );
        checked += 1;
    }
    let _ = checked;
}

fn random_op(rng: &mut SplitMix64, lo: u64, pages: u64, bos: &[(BoId, u64)]) -> BindOp {
    let at = lo + rng.below(pages - 1) * P;
    let n = 1 + rng.below(24.min(pages - (at - lo) / P));
    match rng.below(10) {
        0..=4 => {
            let (b, size) = bos[rng.below(bos.len() as u64) as usize];
            let n = n.min(size / P);
            let off = rng.below(size / P - n + 1) * P;
            BindOp::Map(Va::object(at, n * P, b, off))
        }
        5 => {
            let (b, size) = bos[rng.below(bos.len() as u64) as usize];
            let period = (1 + rng.below(3)).min(size / P);
            let n = (n / period).max(1) * period;
            let at = at.min(lo + (pages - n) * P);
            BindOp::Map(Va::object(at, n * P, b, 0).repeating(period * P))
        }
        6 => BindOp::Map(Va::sparse(at, n * P)),
        _ => BindOp::Unmap { addr: at, range: n * P },
    }
}

#[test]
fn mirror_follows_random_binds_byte_for_byte_with_promised_record_counts() {
    let Some(ctx) = context("mirror_follows_random_binds") else { return };
    if ctx.info().sparse.is_none() {
        skip("mirror_follows_random_binds", &format!("{} has no sparse buffers", ctx.device_name()));
        return;
    }
    for gpu in [behind(), Gpu::Direct { id: DeviceId(2), addr_bits: 48 }] {
        let f = fixture(ctx.clone(), gpu);
        let bos = vec![
            (bo(&f, 64, 3, false), 64 * P),
            (bo(&f, 512, 5, true), 512 * P),
            (bo(&f, 7, 9, false), 7 * P),
        ];
        // Something mapped before the mirror exists is bound by it.
        let q = f.svc.create_queue(f.vm).unwrap();
        let lo = 0x4000_0000u64;
        let pages = 1024u64;
        q.bind(&[BindOp::Map(Va::object(lo + 100 * P, 64 * P, bos[0].0, 0))]).unwrap();
        // Outside the window: followed by nobody, refused by nobody.
        q.bind(&[BindOp::Map(Va::object(lo - 8 * P, 4 * P, bos[2].0, 0))]).unwrap();
        let m = SparseMirror::new(&f.import, &f.svc, f.vm, lo, pages * P, None).unwrap();
        assert_eq!(m.block(), P, "lavapipe's sparse block");
        if ctx.device_name().contains("llvmpipe") {
            assert_eq!(m.backing(), MirrorBacking::DeviceCopy, "lavapipe binds no host memory sparsely");
        }
        assert_mirror_matches(&f, &m, 0);
        let vm = f.svc.vm(f.vm).unwrap();
        let mut rng = SplitMix64::new(0x5eed);
        let q2 = f.svc.create_queue(f.vm).unwrap();
        for round in 1..=40 {
            let n = 1 + rng.below(6) as usize;
            let ops: Vec<BindOp> = (0..n).map(|_| random_op(&mut rng, lo, pages, &bos)).collect();
            if round % 3 == 0 {
                // Asynchronous on two queues (batches may coalesce): the fences mean the
                // driver's bind is done.
                let (a, b) = ops.split_at(n / 2);
                let f1 = (!a.is_empty()).then(|| q.submit(a.to_vec(), &[], &[]).unwrap());
                let f2 = q2.submit(b.to_vec(), &f1.iter().cloned().collect::<Vec<_>>(), &[]).unwrap();
                f2.wait_forever().unwrap();
                if let Some(f1) = f1 {
                    f1.wait_forever().unwrap();
                }
            } else {
                // One synchronous bind is one batch: its record count is checked.
                let before = m.stats();
                q.bind(&ops).unwrap();
                let after = m.stats();
                assert_eq!(after.calls, before.calls + 1, "round {round}: one vkQueueBindSparse per batch");
                assert_eq!(
                    after.last_records,
                    promised_records(&vm, &ops, lo, lo + pages * P),
                    "round {round}: records for {ops:?}"
                );
            }
            assert_mirror_matches(&f, &m, round);
        }
        // A REMAP binds only the delta: remapping 2 pages inside a 64-page mapping is 1 record.
        q.bind(&[BindOp::Unmap { addr: lo, range: pages * P }]).unwrap();
        q.bind(&[BindOp::Map(Va::object(lo, 64 * P, bos[0].0, 0))]).unwrap();
        assert_eq!(m.stats().last_records, 1, "one mapping, one record");
        q.bind(&[BindOp::Map(Va::object(lo + 10 * P, 2 * P, bos[2].0, 0))]).unwrap();
        assert_eq!(m.stats().last_records, 1, "the remap's delta only");
        // Adjacent single-page maps of contiguous offsets coalesce into one record.
        let singles: Vec<BindOp> =
            (0..32).map(|i| BindOp::Map(Va::object(lo + (200 + i) * P, P, bos[1].0, (40 + i) * P))).collect();
        q.bind(&singles).unwrap();
        assert_eq!(m.stats().last_records, 1, "32 adjacent pages at contiguous offsets");
        assert_mirror_matches(&f, &m, 99);
        // The CPU writes through the VM; a copy-backed mirror shows it once refreshed.
        vm.gpu_write(lo + 3 * P + 16, &[0x5a; 64]).unwrap();
        m.refresh(lo, 64 * P).unwrap();
        assert_mirror_matches(&f, &m, 100);
        // A resync rebinds the whole window to the same content.
        let calls = m.stats().calls;
        m.resync().unwrap();
        assert_eq!(m.stats().calls, calls + 1);
        assert_mirror_matches(&f, &m, 101);
        assert!(m.stats().bytes_copied > 0);
        assert_eq!(m.diverged(), None);
        m.detach(&f.svc).unwrap();
        let calls = m.stats().calls;
        q.bind(&[BindOp::Unmap { addr: lo, range: pages * P }]).unwrap();
        assert_eq!(m.stats().calls, calls, "a detached mirror follows nothing");
    }
    no_validation_messages(&ctx);
}

#[test]
fn mirror_refuses_what_it_cannot_show() {
    let Some(ctx) = context("mirror_refuses") else { return };
    if ctx.info().sparse.is_none() {
        skip("mirror_refuses", &format!("{} has no sparse buffers", ctx.device_name()));
        return;
    }
    let f = fixture(ctx.clone(), behind());
    let sparse = ctx.info().sparse.unwrap();
    let bad = |r: Result<SparseMirror, VkError>| matches!(r, Err(VkError::BadRequest(_)));
    assert!(bad(SparseMirror::new(&f.import, &f.svc, f.vm, 0x1000_0800, 1 << 20, None)), "unaligned window");
    assert!(bad(SparseMirror::new(&f.import, &f.svc, f.vm, 0, 0, None)), "empty window");
    assert!(bad(SparseMirror::new(&f.import, &f.svc, f.vm, 1 << 40, 1 << 20, None)), "outside the VM");
    assert!(
        bad(SparseMirror::new(&f.import, &f.svc, f.vm, 0, sparse.address_space + (1 << 20), None)),
        "above sparseAddressSpaceSize"
    );
    if ctx.device_name().contains("llvmpipe") {
        // lavapipe returns VK_SUCCESS for every call of a host-memory sparse bind and binds
        // nothing: the mirror reads it back and refuses.
        let r = SparseMirror::new(&f.import, &f.svc, f.vm, 0, 1 << 20, Some(MirrorBacking::HostImport));
        assert!(matches!(r, Err(VkError::SparseHostImportRefused { .. })), "{r:?}");
    }
    // Another arena's VM.
    let other = fixture(ctx.clone(), behind());
    assert!(matches!(
        SparseMirror::new(&f.import, &other.svc, other.vm, 0, 1 << 20, None),
        Err(VkError::OtherArena)
    ));
    // The mirror's follower name appears in the service's error for an op it cannot follow?
    // With a 4 KiB block every page op is followable; a submit error from the VM still wins.
    let m = SparseMirror::new(&f.import, &f.svc, f.vm, 0, 1 << 20, None).unwrap();
    let q = f.svc.create_queue(f.vm).unwrap();
    let r = q.bind(&[BindOp::Unmap { addr: 0x800, range: P }]);
    assert!(matches!(r, Err(ServiceError::Vm { .. })), "{r:?}");
    assert_eq!(m.stats().calls, 1, "only the initial sync");
    no_validation_messages(&ctx);
}
