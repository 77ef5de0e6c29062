//! `gpuvm::Vm`: binds as prepare-then-commit over a real GPU table and a real DMA device (behind
//! an IOMMU and direct), read back through the two-stage GPU walk. Scenarios from the drivers
//! (Xe's munmap, cut huge leaves and fragment runs, read-only, repeat, sparse), a property test
//! against a page oracle, and fault injection at every allocation of prepare.

use std::collections::BTreeMap;

use proptest::prelude::*;
use vmbind::addr::{PAGE_SIZE, PageSize, PhysAddr};
use vmbind::gpuvm::{BindOp, BoId, FaultStage, GpuFault, Op, Va, VaFlags, VaSpace, Vm, VmError};
use vmbind::iommu::Access;
use vmbind::mem::BioVec;

#[path = "common/gpu.rs"]
mod gpu;

use gpu::{Fx, Mode, fx};

const P: u64 = PAGE_SIZE;
const MIB2: u64 = 2 << 20;

/// An object of `pages` scattered frames, each filled with a pattern naming (tag, page).
fn bo(f: &Fx, pages: usize, tag: u8, seed: u64) -> (BoId, Vec<PhysAddr>) {
    let frames = f.mem.alloc_scattered(pages, seed).unwrap();
    for (i, fr) in frames.iter().enumerate() {
        f.mem.write(*fr, &pattern(tag, i as u64)).unwrap();
    }
    (f.vm.create_bo(BioVec::from_frames(&frames)).unwrap(), frames)
}

fn pattern(tag: u8, page: u64) -> [u8; 16] {
    let mut p = [tag; 16];
    p[8..].copy_from_slice(&page.to_le_bytes());
    p
}

fn read16(vm: &Vm, va: u64) -> Result<[u8; 16], GpuFault> {
    let mut b = [0u8; 16];
    vm.gpu_read(va, &mut b).map(|()| b)
}

fn map(addr: u64, range: u64, bo: BoId, offset: u64) -> BindOp {
    BindOp::Map(Va::object(addr, range, bo, offset))
}

#[test]
fn xe_munmap_scenario_leaves_the_outer_pages_reading_correctly() {
    for mode in [Mode::Iommu, Mode::Direct] {
        let f = fx(mode, 64 << 20);
        let (a, _) = bo(&f, 2, 0xa, 1);
        let (b, _) = bo(&f, 2, 0xb, 2);
        f.vm.bind(&[map(0, 0x2000, a, 0), map(0x3000, 0x2000, b, 0)]).unwrap();
        let done = f.vm.unbind(0x1000, 0x3000).unwrap();
        assert_eq!(done.cleared, 0x2000, "{mode:?}: only the mapped pages of the hole are cleared");
        let left: Vec<(u64, u64)> = f.vm.mappings().iter().map(|v| (v.addr, v.end())).collect();
        assert_eq!(left, [(0, 0x1000), (0x4000, 0x5000)], "{mode:?}");
        assert_eq!(read16(&f.vm, 0).unwrap(), pattern(0xa, 0));
        assert_eq!(read16(&f.vm, 0x4000).unwrap(), pattern(0xb, 1));
        for va in [0x1000, 0x2000, 0x3000, 0x5000] {
            let e = read16(&f.vm, va).unwrap_err();
            assert_eq!((e.va, e.stage), (va, FaultStage::NotMapped), "{mode:?}");
        }
        assert!(done.flush.range.is_some());
    }
}

#[test]
fn a_remap_that_cuts_a_huge_leaf_and_a_fragment_run_keeps_every_survivor() {
    let f = fx(Mode::Iommu, 64 << 20);
    // 4 MiB physically contiguous: behind the IOMMU the object's IOVA range is contiguous, so
    // the GPU table takes 2 MiB leaves where VA and IOVA align, fragments elsewhere.
    let base = f.mem.alloc_block(4 << 20).unwrap();
    let pages = (4 << 20) / P;
    for i in 0..pages {
        f.mem.write(PhysAddr::new(base.as_u64() + i * P), &pattern(1, i)).unwrap();
    }
    let big = f.vm.create_bo(vec![BioVec { phys: base, offset: 0, len: 4 << 20 }]).unwrap();
    let (small, _) = bo(&f, 1, 2, 9);
    let va0 = 1u64 << 30;
    f.vm.bind(&[map(va0, 4 << 20, big, 0)]).unwrap();
    let huge = f.vm.leaf_size(va0) == Some(PageSize::Size2M);
    assert!(huge, "a 2 MiB-aligned IOVA range of a contiguous object maps with 2 MiB leaves");
    // Cut page 100 of the first 2 MiB: a 2 MiB leaf (or a 512-page fragment run) is cut.
    let hole = va0 + 100 * P;
    let done = f.vm.bind(&[map(hole, P, small, 0)]).unwrap();
    assert_eq!(done.ops.len(), 2, "{:?}", done.ops);
    assert!(matches!(&done.ops[0], Op::Remap { prev: Some(_), next: Some(_), .. }));
    assert_eq!(done.cleared, P, "only the hole is cleared");
    if huge {
        assert_eq!(f.vm.leaf_size(va0), Some(PageSize::Size4K), "the cut leaf was split");
        assert_eq!(f.vm.leaf_size(va0 + MIB2), Some(PageSize::Size2M), "the other leaf stays");
    }
    for i in 0..pages {
        let want = if i == 100 { pattern(2, 0) } else { pattern(1, i) };
        assert_eq!(read16(&f.vm, va0 + i * P).unwrap(), want, "page {i}");
    }
    let root = f.vm.table().root();
    gpu::fragments_are_sound(&f.mem, root, va0, va0 + (4 << 20)).unwrap();
    // The survivors next to the hole claim no fragment across it.
    let (r, _) = gpu::raw_entry(&f.mem, root, hole - P).unwrap();
    assert_eq!(gpu::frag(r), 2, "page 99 ends the survivors [0, 100): block [96, 100)");
    // The rest of the split leaf keeps fragments: the buddy decomposition of [101, 512).
    let frag_of = |page: u64| gpu::frag(gpu::raw_entry(&f.mem, root, va0 + page * P).unwrap().0);
    for (page, want) in
        [(0, 6), (64, 5), (101, 0), (102, 1), (104, 3), (112, 4), (128, 7), (256, 8), (511, 8)]
    {
        assert_eq!(frag_of(page), want, "page {page} of the split leaf");
    }

    // A fragment run: 1 MiB contiguous at a 1 MiB-aligned VA that is not 2 MiB aligned, so
    // 4 KiB leaves with fragments (256 pages: one 2^8 block where IOVA and VA align alike).
    let run = f.mem.alloc_block(1 << 20).unwrap();
    let obj = f.vm.create_bo(vec![BioVec { phys: run, offset: 0, len: 1 << 20 }]).unwrap();
    let va1 = (2u64 << 30) + (1 << 20);
    f.vm.bind(&[map(va1, 1 << 20, obj, 0)]).unwrap();
    let frag_at = |va: u64| gpu::frag(gpu::raw_entry(&f.mem, root, va).unwrap().0);
    let top = frag_at(va1);
    assert_eq!(top, 8, "a 1 MiB run aligned alike in both spaces is one 2^8 fragment");
    f.vm.bind(&[map(va1 + 5 * P, P, small, 0)]).unwrap();
    gpu::fragments_are_sound(&f.mem, root, va1, va1 + (1 << 20)).unwrap();
    // The survivors are the buddy decomposition of [0, 5) and [6, 256).
    {
        let want = [(0, 2), (3, 2), (4, 0), (6, 1), (8, 3), (16, 4), (64, 6), (200, 7)];
        for (page, fr) in want {
            assert_eq!(frag_at(va1 + page * P), fr, "page {page}");
        }
    }
    assert_eq!(read16(&f.vm, va1 + 5 * P).unwrap(), pattern(2, 0));
}

#[test]
fn read_only_mappings_refuse_writes_and_unmapped_addresses_fault_before_a_byte_moves() {
    let f = fx(Mode::Iommu, 32 << 20);
    let (a, frames) = bo(&f, 4, 7, 3);
    let ro = VaFlags { read_only: true, no_exec: true };
    f.vm.bind(&[
        BindOp::Map(Va::object(0x10_0000, 2 * P, a, 0).with_flags(ro)),
        map(0x10_2000, 2 * P, a, 2 * P),
    ])
    .unwrap();
    let e = f.vm.gpu_write(0x10_0000, b"x").unwrap_err();
    assert_eq!((e.va, e.access), (0x10_0000, Access::Write));
    assert!(matches!(e.stage, FaultStage::NotPermitted { .. }), "{e:?}");
    // A write spanning the writable page and a hole: refused whole, nothing written.
    let before = f.mem.read_bvecs(&BioVec::from_frames(&frames)).unwrap();
    let e = f.vm.gpu_write(0x10_3000, &[9u8; 2 * P as usize]).unwrap_err();
    assert_eq!((e.va, e.stage), (0x10_4000, FaultStage::NotMapped));
    let e = f.vm.gpu_write(0x10_1ff0, &[9u8; 32]).unwrap_err();
    assert_eq!(e.va, 0x10_1ff0);
    assert_eq!(f.mem.read_bvecs(&BioVec::from_frames(&frames)).unwrap(), before);
    // A write across the two writable pages lands in both frames.
    f.vm.gpu_write(0x10_2ff8, b"ABCDEFGHIJKLMNOP").unwrap();
    let mut got = [0u8; 8];
    f.mem.read(PhysAddr::new(frames[2].as_u64() + P - 8), &mut got).unwrap();
    assert_eq!(&got, b"ABCDEFGH");
    f.mem.read(frames[3], &mut got).unwrap();
    assert_eq!(&got, b"IJKLMNOP");
    assert_eq!(read16(&f.vm, 0x10_0000).unwrap(), pattern(7, 0));
}

#[test]
fn a_stage_two_refusal_is_a_dma_fault_naming_the_gpu_va() {
    let f = fx(Mode::Iommu, 32 << 20);
    let (a, _) = bo(&f, 2, 7, 3);
    f.vm.bind(&[map(0x10_0000, 2 * P, a, 0)]).unwrap();
    // The GPU table still points at the IOVA; take the IOMMU mapping away behind it.
    let dom = f.dom.clone().unwrap();
    let t = f.vm.table().translate(vmbind::addr::GpuVa::new(0x10_1000)).unwrap();
    dom.unmap_strict(t.pa, P).unwrap();
    let e = read16(&f.vm, 0x10_1000).unwrap_err();
    assert_eq!(e.va, 0x10_1000);
    assert!(matches!(e.stage, FaultStage::Dma(d) if d.iova == t.pa), "{e:?}");
    assert_eq!(read16(&f.vm, 0x10_0000).unwrap(), pattern(7, 0));
}

#[test]
fn a_repeat_mapping_reads_the_same_bytes_at_every_period_and_sparse_reads_zero() {
    for mode in [Mode::Iommu, Mode::Direct] {
        let f = fx(mode, 32 << 20);
        let (a, _) = bo(&f, 8, 5, 4);
        // Object pages [2, 5) repeated 10 times, starting at phase 1 (object page 3).
        let req = Va::object(0x20_0000, 30 * P, a, 3 * P);
        let req = Va { repeat: Some(vmbind::gpuvm::Repeat { start: 2 * P, len: 3 * P }), ..req };
        f.vm.bind(&[BindOp::Map(req), BindOp::Map(Va::sparse(0x40_0000, MIB2 + 3 * P))]).unwrap();
        for i in 0..30 {
            let obj_page = 2 + (1 + i) % 3;
            assert_eq!(read16(&f.vm, 0x20_0000 + i * P).unwrap(), pattern(5, obj_page), "{mode:?} page {i}");
        }
        assert_eq!(read16(&f.vm, 0x40_0000 + MIB2 + 8).unwrap(), [0; 16]);
        f.vm.gpu_write(0x40_1000, b"dropped").unwrap();
        assert_eq!(read16(&f.vm, 0x40_1000).unwrap(), [0; 16]);
        // A read from a mapping into sparse is one access, zeros where sparse.
        let (b, _) = bo(&f, 1, 6, 5);
        f.vm.bind(&[map(0x40_0000 + MIB2 + 3 * P, P, b, 0)]).unwrap();
        let mut two = vec![0xffu8; 2 * P as usize];
        f.vm.gpu_read(0x40_0000 + MIB2 + 2 * P, &mut two).unwrap();
        assert!(two[..P as usize].iter().all(|&x| x == 0));
        assert_eq!(&two[P as usize..P as usize + 16], &pattern(6, 0));
    }
}

#[test]
fn bad_binds_are_refused_whole_and_change_nothing() {
    let f = fx(Mode::Iommu, 32 << 20);
    let (a, _) = bo(&f, 4, 1, 1);
    f.vm.bind(&[map(0, 4 * P, a, 0)]).unwrap();
    let dump = f.vm.dump();
    let ghost = BoId(999);
    type Case = (Vec<BindOp>, fn(&VmError) -> bool);
    let cases: Vec<Case> = vec![
        (vec![map(8 * P, P, ghost, 0)], |e| matches!(e, VmError::NoSuchBo(_))),
        (vec![map(8 * P, 2 * P, a, 3 * P)], |e| matches!(e, VmError::BeyondBo { index: 0, .. })),
        // The first op is fine; the second is misaligned: neither happens.
        (vec![BindOp::Unmap { addr: 0, range: P }, map(8 * P + 1, P, a, 0)], |e| {
            matches!(e, VmError::Va { index: 1, .. })
        }),
        (vec![map(8 * P, 0, a, 0)], |e| matches!(e, VmError::Va { .. })),
        (vec![map(1 << 40, P, a, 0)], |e| matches!(e, VmError::Va { .. })),
        (vec![BindOp::Unmap { addr: u64::MAX - P + 1, range: 2 * P }], |e| matches!(e, VmError::Va { .. })),
    ];
    for (ops, want) in cases {
        let e = f.vm.bind(&ops).unwrap_err();
        assert!(want(&e), "{ops:?}: {e:?}");
        assert_eq!(f.vm.dump(), dump, "{ops:?} changed the VM");
    }
    assert!(matches!(f.vm.destroy_bo(a), Err(VmError::BoMapped { mappings: 1, .. })));
    f.vm.unbind_bo(a).unwrap();
    f.vm.destroy_bo(a).unwrap();
    assert_eq!(f.vm.create_bo(vec![]), Err(VmError::BadBacking { index: 0 }));
    // A page-aligned offset is a page like any other (phys + offset is its first byte).
    for mode in [Mode::Iommu, Mode::Direct] {
        let g = fx(mode, 32 << 20);
        let frame = g.mem.alloc_block(2 * P).unwrap();
        g.mem.write(PhysAddr::new(frame.as_u64() + P), &pattern(3, 1)).unwrap();
        let shifted = g.vm.create_bo(vec![BioVec { phys: frame, offset: P as u32, len: P as u32 }]).unwrap();
        g.vm.bind(&[map(0x1000, P, shifted, 0)]).unwrap();
        assert_eq!(read16(&g.vm, 0x1000).unwrap(), pattern(3, 1), "{mode:?}");
    }
    let odd = BioVec { phys: PhysAddr::new(0x1000), offset: 8, len: 4096 };
    assert_eq!(f.vm.create_bo(vec![odd]), Err(VmError::BadBacking { index: 0 }));
}

/// GPU table dump, mappings, free and reserved frames, IOMMU table dump, live IOVAs.
type Snapshot = (String, Vec<Va<BoId>>, u64, u64, Option<String>, Option<usize>);

/// What the IOMMU, the GPU table and the arena hold: what a failed bind must leave alone.
fn snapshot(f: &Fx) -> Snapshot {
    let u = f.mem.usage();
    (
        f.vm.table().dump(),
        f.vm.mappings(),
        u.free_frames,
        u.reserved_frames,
        f.dom.as_ref().map(|d| d.table().unwrap().dump()),
        f.dom.as_ref().map(|d| d.iova().unwrap().stats().live),
    )
}

#[test]
fn fault_injection_exhausting_the_arena_at_each_allocation_of_prepare_changes_nothing() {
    for mode in [Mode::Iommu, Mode::Direct] {
        let f = fx(mode, 16 << 20);
        let (a, _) = bo(&f, 600, 1, 11);
        let (b, _) = bo(&f, 3, 2, 12);
        f.vm.bind(&[map(0, 3 * P, b, 0)]).unwrap();
        // A bind that DMA-maps `a` (IOMMU table pages), cuts `b`'s mapping and spans new GPU
        // leaf tables: every allocation of its prepare, tried with k free frames for k = 0, 1, ...
        let ops = [map(P, 600 * P, a, 0), BindOp::Map(Va::sparse(1 << 30, 3 * MIB2))];
        let mut succeeded = false;
        for k in 0..64u64 {
            let free = f.mem.usage().free_frames - f.mem.usage().reserved_frames;
            let hog = f.mem.alloc_frames((free - k) as usize).unwrap();
            let before = snapshot(&f);
            let r = f.vm.bind(&ops);
            match r {
                Ok(_) => {
                    f.mem.free_frames(&hog).unwrap();
                    succeeded = true;
                    break;
                }
                Err(e) => {
                    assert!(
                        matches!(e, VmError::OutOfMemory(_) | VmError::Dma { .. }),
                        "{mode:?} k={k}: {e:?}"
                    );
                    assert_eq!(snapshot(&f), before, "{mode:?} k={k}: a failed bind changed something");
                    assert!(!f.vm.bo_dma_mapped(a).unwrap(), "{mode:?} k={k}");
                }
            }
            f.mem.free_frames(&hog).unwrap();
        }
        assert!(succeeded, "{mode:?}: the bind never fit");
        assert_eq!(read16(&f.vm, 0).unwrap(), pattern(2, 0));
        assert_eq!(read16(&f.vm, 5 * P).unwrap(), pattern(1, 4));
        // Unbinding with the arena exhausted never fails.
        let free = f.mem.usage().free_frames - f.mem.usage().reserved_frames;
        let hog = f.mem.alloc_frames(free as usize).unwrap();
        f.vm.unbind(0, 1 << 31).unwrap();
        f.mem.free_frames(&hog).unwrap();
        assert!(f.vm.mappings().is_empty());
    }
}

/// What the oracle says a page holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Page {
    Obj(usize, u64),
    Sparse,
}

#[derive(Clone, Debug)]
enum Step {
    Map { at: u64, len: u64, bo: usize, off: u64 },
    Repeat { at: u64, periods: u64, bo: usize, start: u64, period: u64 },
    Sparse { at: u64, len: u64 },
    Unmap { at: u64, len: u64 },
    UnbindBo { bo: usize },
}

const SPACE: u64 = 1024; // pages, across two 2 MiB regions
const BO_PAGES: u64 = 40;

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..SPACE, 1..40u64, 0..3usize, 0..BO_PAGES).prop_map(|(at, len, bo, off)| {
            let len = len.min(BO_PAGES - off).max(1);
            let off = off.min(BO_PAGES - len);
            Step::Map { at: at.min(SPACE - len), len, bo, off }
        }),
        1 => (0..SPACE, 1..5u64, 0..3usize, 0..BO_PAGES, 1..6u64).prop_map(|(at, periods, bo, start, period)| {
            let start = start.min(BO_PAGES - period);
            Step::Repeat { at: at.min(SPACE - periods * period), periods, bo, start, period }
        }),
        1 => (0..SPACE, 1..600u64).prop_map(|(at, len)| Step::Sparse { at: at.min(SPACE - len.min(SPACE)), len: len.min(SPACE) }),
        2 => (0..SPACE, 1..600u64).prop_map(|(at, len)| Step::Unmap { at: at.min(SPACE - len.min(SPACE)), len: len.min(SPACE) }),
        1 => (0..3usize).prop_map(|bo| Step::UnbindBo { bo }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    /// Random bind/unbind/sparse/repeat sequences against a page oracle: after every step the
    /// ops are those a shadow VA space generates, every touched page reads what the oracle says
    /// (or faults where it says nothing), and freeing everything gives back every table page,
    /// IOVA and frame.
    #[test]
    fn random_binds_agree_with_a_page_oracle(steps in proptest::collection::vec(step(), 1..25), direct in any::<bool>(), batch in 1..3usize) {
        let mode = if direct { Mode::Direct } else { Mode::Iommu };
        let f = fx(mode, 32 << 20);
        let base_usage = f.mem.usage();
        let base = 0x7f_ffe0_0000u64; // straddles a 1 GiB and a 2 MiB boundary
        let bos: Vec<BoId> = (0..3).map(|i| bo(&f, BO_PAGES as usize, i as u8 + 1, 40 + i as u64).0).collect();
        let mut oracle: BTreeMap<u64, Page> = BTreeMap::new();
        let mut shadow = VaSpace::<BoId>::new(0, 1 << 40, None).unwrap();
        let mut touched = std::collections::BTreeSet::new();
        for chunk in steps.chunks(batch) {
            let mut ops = Vec::new();
            let mut want_ops = Vec::new();
            let mut next = oracle.clone();
            for s in chunk {
                let op = match *s {
                    Step::Map { at, len, bo, off } => {
                        for i in 0..len { next.insert(at + i, Page::Obj(bo, off + i)); }
                        map(base + at * P, len * P, bos[bo], off * P)
                    }
                    Step::Repeat { at, periods, bo, start, period } => {
                        for i in 0..periods * period { next.insert(at + i, Page::Obj(bo, start + i % period)); }
                        BindOp::Map(Va::object(base + at * P, periods * period * P, bos[bo], start * P).repeating(period * P))
                    }
                    Step::Sparse { at, len } => {
                        for i in 0..len { next.insert(at + i, Page::Sparse); }
                        BindOp::Map(Va::sparse(base + at * P, len * P))
                    }
                    Step::Unmap { at, len } => {
                        for i in 0..len { next.remove(&(at + i)); }
                        BindOp::Unmap { addr: base + at * P, range: len * P }
                    }
                    Step::UnbindBo { bo } => {
                        next.retain(|_, p| !matches!(p, Page::Obj(b, _) if *b == bo));
                        let mut g = Vec::new();
                        for v in shadow.obj_mappings(&bos[bo]).cloned().collect::<Vec<_>>() {
                            let o = shadow.sm_unmap(v.addr, v.range).unwrap();
                            shadow.apply(&o).unwrap();
                            g.extend(o);
                            ops.push(BindOp::Unmap { addr: v.addr, range: v.range });
                        }
                        want_ops.extend(g);
                        continue;
                    }
                };
                let o = match &op {
                    BindOp::Map(v) => shadow.map(v).unwrap(),
                    BindOp::Unmap { addr, range } => shadow.unmap(*addr, *range).unwrap(),
                };
                want_ops.extend(o);
                ops.push(op);
            }
            for s in chunk {
                let (at, len) = match *s {
                    Step::Map { at, len, .. } | Step::Sparse { at, len } | Step::Unmap { at, len } => (at, len),
                    Step::Repeat { at, periods, period, .. } => (at, periods * period),
                    Step::UnbindBo { .. } => (0, 0),
                };
                touched.extend(at..at + len);
            }
            let done = f.vm.bind(&ops).unwrap();
            prop_assert_eq!(&done.ops, &want_ops);
            oracle = next;
            for &pg in &touched {
                let got = read16(&f.vm, base + pg * P);
                match oracle.get(&pg) {
                    None => prop_assert_eq!(got.map_err(|e| e.stage), Err(FaultStage::NotMapped), "page {}", pg),
                    Some(Page::Sparse) => prop_assert_eq!(got, Ok([0; 16]), "page {}", pg),
                    Some(Page::Obj(b, o)) => prop_assert_eq!(got, Ok(pattern(*b as u8 + 1, *o)), "page {}", pg),
                }
            }
            gpu::fragments_are_sound(&f.mem, f.vm.table().root(), base, base + SPACE * P).map_err(TestCaseError::fail)?;
        }
        f.vm.unbind(base, SPACE * P).unwrap();
        prop_assert_eq!(f.vm.table().table_pages(), 1, "every GPU table page but the root is back");
        prop_assert_eq!(f.vm.table().split_reserve(), 0);
        for b in &bos {
            f.vm.destroy_bo(*b).unwrap();
        }
        if let Some(d) = &f.dom {
            prop_assert_eq!(d.iova().unwrap().stats().live, 0, "every IOVA is back");
            prop_assert_eq!(d.table().unwrap().table_pages(), 1);
        }
        let u = f.mem.usage();
        let bo_frames = 3 * BO_PAGES;
        prop_assert_eq!(u.free_frames + bo_frames, base_usage.free_frames);
        prop_assert_eq!(u.reserved_frames, base_usage.reserved_frames);
    }
}

#[test]
fn the_dump_lists_mappings_levels_leaf_sizes_fragments_and_sparse_ranges() {
    let f = fx(Mode::Iommu, 32 << 20);
    let run = f.mem.alloc_block(4 << 20).unwrap();
    let obj = f.vm.create_bo(vec![BioVec { phys: run, offset: 0, len: 4 << 20 }]).unwrap();
    let ro = VaFlags { read_only: true, no_exec: true };
    f.vm.bind(&[
        BindOp::Map(Va::object(1 << 30, 2 << 20, obj, 0)),
        BindOp::Map(Va::object((2 << 30) + (1 << 20), 1 << 20, obj, 0).with_flags(ro)),
        BindOp::Map(Va::sparse(3 << 30, 3 * P)),
    ])
    .unwrap();
    let d = f.vm.dump();
    assert!(d.starts_with("VM: 3 mapping(s), 1 object(s)"), "{d}");
    assert!(d.contains("  [0x000040000000, 0x000040200000) bo1 @ 0x0\n"), "{d}");
    assert!(d.contains("bo1 @ 0x0 ro nx"), "{d}");
    assert!(d.contains("  [0x0000c0000000, 0x0000c0003000) sparse\n"), "{d}");
    assert!(d.contains("tables per level: L3 1, L2 1, L1 3, L0 2"), "{d}");
    assert!(d.contains(": 1 x 2MiB rwx"), "the 2 MiB-aligned run is one huge leaf: {d}");
    assert!(d.contains("256 x 4KiB r-- frag 8"), "the 1 MiB run is one 2^8 fragment: {d}");
    assert!(d.contains("[0xc0000000, 0xc0003000) sparse: 3 x 4KiB"), "{d}");
}

#[test]
fn a_direct_gpu_maps_multi_page_segments_from_any_object_offset() {
    let f = fx(Mode::Direct, 32 << 20);
    // Three segments: 2 MiB + 8 KiB contiguous, one page, 3 pages.
    let a = f.mem.alloc_block(4 << 20).unwrap();
    let b = f.mem.alloc_frame().unwrap();
    let c = f.mem.alloc_block(4 * P).unwrap();
    let segs = vec![
        BioVec { phys: a, offset: 0, len: (MIB2 + 2 * P) as u32 },
        BioVec::page(b),
        BioVec { phys: c, offset: 0, len: (3 * P) as u32 },
    ];
    let pages: Vec<PhysAddr> = (0..(MIB2 / P + 2))
        .map(|i| PhysAddr::new(a.as_u64() + i * P))
        .chain([b])
        .chain((0..3).map(|i| PhysAddr::new(c.as_u64() + i * P)))
        .collect();
    for (i, pg) in pages.iter().enumerate() {
        f.mem.write(*pg, &pattern(9, i as u64)).unwrap();
    }
    let n = pages.len() as u64;
    let obj = f.vm.create_bo(segs).unwrap();
    // The whole object 2 MiB aligned (one huge leaf where DMA and VA align), then a window that
    // starts inside the first segment and ends inside the last.
    f.vm.bind(&[map(1 << 30, n * P, obj, 0), map(2 << 30, (n - 3) * P, obj, 2 * P)]).unwrap();
    assert_eq!(f.vm.leaf_size(1 << 30), Some(PageSize::Size2M));
    for i in 0..n {
        assert_eq!(read16(&f.vm, (1 << 30) + i * P).unwrap(), pattern(9, i), "page {i}");
    }
    for i in 0..n - 3 {
        assert_eq!(read16(&f.vm, (2 << 30) + i * P).unwrap(), pattern(9, i + 2), "window page {i}");
    }
    f.vm.unbind_bo(obj).unwrap();
    f.vm.destroy_bo(obj).unwrap();
    assert_eq!(f.vm.table().table_pages(), 1);
}

#[test]
fn a_repeat_mapping_s_period_pieces_share_their_table_pages_in_prepare() {
    // 16 MiB arena; a 4 KiB period repeated over 64 MiB is 16 384 pieces. Counted apart they
    // would ask for three new tables each (192 MiB); shared, they need 35 frames.
    let f = fx(Mode::Direct, 16 << 20);
    let (a, _) = bo(&f, 1, 4, 8);
    let before = f.mem.usage().free_frames;
    f.vm.bind(&[BindOp::Map(Va::object(1 << 30, 64 << 20, a, 0).repeating(P))]).unwrap();
    assert_eq!(read16(&f.vm, (1 << 30) + (63 << 20)).unwrap(), pattern(4, 0));
    assert_eq!(before - f.mem.usage().free_frames, f.vm.table().table_pages() - 1, "only the tables used");
    f.vm.unbind(1 << 30, 64 << 20).unwrap();
    assert_eq!(f.vm.table().table_pages(), 1);
}

#[test]
fn gpu_reads_racing_binds_see_one_mapping_or_the_other_whole() {
    for mode in [Mode::Iommu, Mode::Direct] {
        let f = fx(mode, 32 << 20);
        let (a, _) = bo(&f, 4, 1, 21);
        let (b, _) = bo(&f, 4, 2, 22);
        let va = 0x40_0000u64;
        f.vm.bind(&[map(va, 4 * P, a, 0)]).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        // Successful whole reads so far: the binder keeps racing until there are enough of them
        // (a fast bind loop could otherwise finish before the reader's first read).
        let seen = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut i = 0u64;
                while i < 2000 || (seen.load(std::sync::atomic::Ordering::Relaxed) < 200 && i < 2_000_000) {
                    i += 1;
                    let (o, _) = if i.is_multiple_of(2) { (b, 2) } else { (a, 1) };
                    f.vm.bind(&[map(va, 4 * P, o, 0)]).unwrap();
                    if i.is_multiple_of(7) {
                        f.vm.unbind(va, 4 * P).unwrap();
                        f.vm.bind(&[map(va, 4 * P, a, 0)]).unwrap();
                    }
                }
                stop.store(true, std::sync::atomic::Ordering::Release);
            });
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let mut buf = vec![0u8; 4 * P as usize];
                match f.vm.gpu_read(va, &mut buf) {
                    Ok(()) => {
                        // One whole access sees one mapping: all four pages of one object.
                        let tag = buf[0];
                        assert!(tag == 1 || tag == 2, "{mode:?}: {tag}");
                        for pg in 0..4u64 {
                            let at = (pg * P) as usize;
                            assert_eq!(&buf[at..at + 16], &pattern(tag, pg), "{mode:?} page {pg}");
                        }
                        reads += 1;
                        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => assert_eq!((e.va, e.stage), (va, FaultStage::NotMapped), "{mode:?}"),
                }
            }
            assert!(reads >= 200, "{mode:?}: only {reads} whole reads while the binds raced");
        });
    }
}

#[test]
fn va_helpers_on_hand_built_mappings_clamp_instead_of_panicking() {
    let v = Va { repeat: Some(vmbind::gpuvm::Repeat { start: 8 * P, len: 0 }), ..Va::object(P, P, 1u32, 0) };
    assert_eq!(v.offset_at(0), 0);
    let w = Va::object(u64::MAX - P, 4 * P, 1u32, 0);
    assert_eq!(w.end(), u64::MAX);
    let r = Va::object(P, 4 * P, 1u32, 0).repeating(2 * P);
    assert_eq!(r.offset_at(P + 3 * P), P);
}
