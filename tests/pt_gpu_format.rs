//! The engine over its second format, the GPU table of REFERENCES.md §7: leaves, huge leaves and
//! sparse (PRT) entries — occupied but not valid — mapped, cut, split and freed; the same random
//! sequences with the one-table fast paths on and off; and a format without sparse entries
//! refusing them.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use vmbind::addr::{DmaAddr, GpuVa, PAGE_SIZE, PageSize, PhysAddr};
use vmbind::mem::PhysMem;
use vmbind::pt::gpu::{GPU_PRT, GPU_VALID};
#[path = "common/gpu.rs"]
mod gpu;
use gpu::{frag, fragments_are_sound, raw_entry};
use vmbind::pt::{GpuGfx9, MapError, MapOptions, MapSource, PageTable, Prot, X86Iommu};

const MIB2: u64 = 2 << 20;

fn table() -> (Arc<PhysMem>, PageTable<GpuGfx9>) {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let pt = PageTable::new(mem.clone()).unwrap();
    (mem, pt)
}

#[test]
fn sparse_ranges_block_maps_read_as_nothing_and_split_when_cut() {
    let (mem, pt) = table();
    let usage = mem.usage();
    let base = 0x4000_0000u64;
    // 2 MiB + 8 KiB of sparse entries from a 2 MiB boundary: one huge sparse entry, two small.
    let len = MIB2 + 2 * PAGE_SIZE;
    let st = pt.map(GpuVa::new(base), MapSource::Sparse { len }, Prot::NONE, MapOptions::default()).unwrap();
    assert_eq!(st.leaves, [2, 1, 0]);
    assert_eq!(pt.split_reserve(), 1);
    let leaves = pt.leaves();
    assert!(leaves.iter().all(|l| l.sparse && l.prot == Prot::NONE));
    assert_eq!(leaves.iter().map(|l| l.size.bytes()).sum::<u64>(), len);
    assert!(pt.translate(GpuVa::new(base + 0x1234)).is_none());
    assert!(pt.dump().contains("sparse: 1 x 2M"), "{}", pt.dump());
    // Occupied: a map over any part of it is refused, naming the first occupied address.
    let r = pt.map(
        GpuVa::new(base + MIB2),
        MapSource::Range { pa: DmaAddr::new(0x1000), len: PAGE_SIZE },
        Prot::RW,
        MapOptions::default(),
    );
    assert_eq!(r, Err(MapError::AlreadyMapped { va: GpuVa::new(base + MIB2) }));
    assert_eq!(pt.first_mapped(GpuVa::new(base - PAGE_SIZE), 2 * PAGE_SIZE), Some(GpuVa::new(base)));
    // Cutting one page out of the huge sparse entry splits it into 511 sparse pages.
    let inv = pt.unmap(GpuVa::new(base + 5 * PAGE_SIZE), PAGE_SIZE).unwrap();
    assert_eq!(inv.unmapped_bytes(), PAGE_SIZE);
    inv.complete();
    let leaves = pt.leaves();
    assert_eq!(leaves.len(), 511 + 2);
    assert!(leaves.iter().all(|l| l.sparse && l.size == PageSize::Size4K));
    assert_eq!(pt.split_reserve(), 0);
    // A real page may now go in the hole.
    pt.map(
        GpuVa::new(base + 5 * PAGE_SIZE),
        MapSource::Range { pa: DmaAddr::new(0x7000), len: PAGE_SIZE },
        Prot::READ,
        MapOptions::default(),
    )
    .unwrap();
    assert_eq!(pt.translate(GpuVa::new(base + 5 * PAGE_SIZE + 8)).unwrap().pa, DmaAddr::new(0x7008));
    pt.unmap(GpuVa::new(base), 4 * MIB2).unwrap().complete();
    assert_eq!(pt.table_pages(), 1);
    assert_eq!(mem.usage(), usage);
}

#[test]
fn gpu_entries_carry_the_format_bits() {
    let (mem, pt) = table();
    // A direct-mapped GPU: its DMA addresses are the frames' physical addresses.
    let frames: Vec<DmaAddr> =
        mem.alloc_scattered(3, 5).unwrap().iter().map(|f| DmaAddr::new(f.as_u64())).collect();
    pt.map(GpuVa::new(0x10_0000), MapSource::Pages(&frames), Prot::RW | Prot::EXEC, MapOptions::default())
        .unwrap();
    let t = pt.translate(GpuVa::new(0x10_1008)).unwrap();
    assert_eq!(t.pa, DmaAddr::new(frames[1].as_u64() + 8));
    assert_eq!(t.prot, Prot::RW | Prot::EXEC);
    // A 2 MiB-aligned contiguous range takes a huge leaf, as on the IOMMU format.
    let st = pt
        .map(
            GpuVa::new(0x4000_0000),
            MapSource::Range { pa: DmaAddr::new(0x20_0000), len: MIB2 },
            Prot::READ,
            MapOptions::default(),
        )
        .unwrap();
    assert_eq!(st.leaves, [0, 1, 0]);
    assert_eq!(pt.translate(GpuVa::new(0x4000_1000)).unwrap().size, PageSize::Size2M);
    // Read the raw root-to-leaf path through the arena: the leaf is valid, not PRT.
    let mut raw = pt.root().as_u64();
    for level in (0..4u32).rev() {
        let idx = (0x10_1000u64 >> (12 + 9 * level)) & 511;
        raw = mem.read_u64(PhysAddr::new((raw & 0xffff_ffff_f000) + 8 * idx)).unwrap();
    }
    assert_eq!(raw & (GPU_VALID | GPU_PRT), GPU_VALID);
    assert_eq!(raw & 0xffff_ffff_f000, frames[1].as_u64());
}

#[test]
fn fragments_of_a_contiguous_map_are_its_buddy_decomposition_and_cuts_rewrite_them() {
    let (mem, pt) = table();
    let map = |va: u64, pa: u64, pages: u64| {
        let src = MapSource::Range { pa: DmaAddr::new(pa), len: pages * PAGE_SIZE };
        pt.map(GpuVa::new(va), src, Prot::RW, MapOptions::default()).unwrap();
    };
    let frags = |va: u64, pages: u64| -> Vec<u64> {
        (0..pages).map(|i| frag(raw_entry(&mem, pt.root(), va + i * PAGE_SIZE).unwrap().0)).collect()
    };
    // 64 KiB aligned in both spaces: one 16-page fragment.
    map(0x10_0000, 0x40_0000, 16);
    assert_eq!(frags(0x10_0000, 16), vec![4; 16]);
    // Pages [1, 8) of a region: 1 + 2 + 4.
    map(0x20_1000, 0x80_1000, 7);
    assert_eq!(frags(0x20_1000, 7), vec![0, 1, 1, 2, 2, 2, 2]);
    // Contiguous but aligned differently in the two spaces: no fragment can be claimed.
    map(0x30_0000, 0x90_1000, 8);
    assert_eq!(frags(0x30_0000, 8), vec![0; 8]);
    // Scattered pages: fragment 0.
    let pages: Vec<DmaAddr> = (0..4).map(|i| DmaAddr::new(0x100_0000 + i * 0x2000)).collect();
    pt.map(GpuVa::new(0x50_0000), MapSource::Pages(&pages), Prot::RW, MapOptions::default()).unwrap();
    assert_eq!(frags(0x50_0000, 4), vec![0; 4]);
    fragments_are_sound(&mem, pt.root(), 0, 0x60_0000).unwrap();
    // Cutting page 5 of the 16-page fragment: the survivors are re-decomposed, and the whole old
    // block is flushed.
    let inv = pt.unmap(GpuVa::new(0x10_5000), PAGE_SIZE).unwrap();
    assert_eq!(inv.range(), Some((GpuVa::new(0x10_5000), PAGE_SIZE)));
    assert_eq!(inv.flush_range(), Some((GpuVa::new(0x10_0000), 16 * PAGE_SIZE)));
    inv.complete();
    let mut left = frags(0x10_0000, 5);
    left.extend(frags(0x10_6000, 10));
    assert_eq!(left, vec![2, 2, 2, 2, 0, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3]);
    fragments_are_sound(&mem, pt.root(), 0, 0x60_0000).unwrap();
}

#[test]
fn physical_bio_vec_sources_are_refused_by_a_table_of_dma_addresses() {
    let (_, pt) = table();
    let bv = vmbind::mem::BioVec::from_frames(&[PhysAddr::new(0x1000)]);
    for src in [MapSource::BioVecs(&bv), MapSource::PageVecs(&bv)] {
        let r = pt.map(GpuVa::new(0x1000), src, Prot::RW, MapOptions::default());
        assert_eq!(r, Err(MapError::PhysicalSource { what: "dma" }));
    }
    assert_eq!(pt.table_pages(), 1);
}

#[test]
fn a_format_without_sparse_entries_refuses_them_and_changes_nothing() {
    let mem = Arc::new(PhysMem::new(16 << 20).unwrap());
    let pt = PageTable::<X86Iommu>::new(mem.clone()).unwrap();
    let usage = mem.usage();
    let r =
        pt.map(DmaAddr::new(0x1000), MapSource::Sparse { len: PAGE_SIZE }, Prot::NONE, MapOptions::default());
    assert_eq!(r, Err(MapError::SparseUnsupported));
    let (_, g) = table();
    let r = g.map(GpuVa::new(0x1000), MapSource::Sparse { len: 0x800 }, Prot::NONE, MapOptions::default());
    assert!(matches!(r, Err(MapError::UnalignedSource { .. })));
    assert_eq!(
        g.map(GpuVa::new(0x1000), MapSource::Sparse { len: 0 }, Prot::NONE, MapOptions::default()),
        Err(MapError::ZeroLength)
    );
    assert_eq!(pt.table_pages(), 1);
    assert_eq!(mem.usage(), usage);
}

#[derive(Clone, Debug)]
enum Op {
    Map { page: u64, pages: u64, kind: u8, seed: u64 },
    Unmap { page: u64, pages: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..2048, prop_oneof![4 => 1u64..20, 1 => 500u64..1100], 0u8..3, any::<u64>())
            .prop_map(|(page, pages, kind, seed)| Op::Map { page, pages, kind, seed }),
        2 => (0u64..2048, prop_oneof![4 => 1u64..20, 1 => 500u64..1100]).prop_map(|(page, pages)| Op::Unmap { page, pages }),
    ]
}

/// What a page holds in the oracle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Page {
    Mapped(u64),
    Sparse,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_leaf_and_sparse_sequences_agree_with_an_oracle_on_both_paths(ops in proptest::collection::vec(op(), 1..60)) {
        let base = 0x8000_0000u64 - 2 * MIB2;
        let (mems, pts): (Vec<_>, Vec<_>) = (0..2).map(|_| table()).unzip();
        pts[1].set_fast_paths(false);
        let usage: Vec<_> = mems.iter().map(|m| m.usage()).collect();
        let mut oracle: BTreeMap<u64, Page> = BTreeMap::new();
        for o in &ops {
            match *o {
                Op::Map { page, pages, kind, seed } => {
                    let pages = pages.min(2048 - page);
                    let va = base + page * PAGE_SIZE;
                    let contiguous = ((seed % 4096) + 1) * MIB2;
                    let list: Vec<DmaAddr> = (0..pages).map(|i| DmaAddr::new(((seed >> 8) % 100_000 + 1 + 7 * i) << 12)).collect();
                    let src = match kind {
                        0 => MapSource::Range { pa: DmaAddr::new(contiguous), len: pages * PAGE_SIZE },
                        1 => MapSource::Pages(&list),
                        _ => MapSource::Sparse { len: pages * PAGE_SIZE },
                    };
                    let r: Vec<_> = pts.iter().map(|pt| pt.map(GpuVa::new(va), src, Prot::RW, MapOptions::default())).collect();
                    prop_assert_eq!(&r[0], &r[1]);
                    let busy = oracle.range(page..page + pages).next().map(|(&p, _)| p);
                    match busy {
                        Some(p) => prop_assert_eq!(&r[0], &Err(MapError::AlreadyMapped { va: GpuVa::new(base + p * PAGE_SIZE) })),
                        None => {
                            prop_assert!(r[0].is_ok());
                            for i in 0..pages {
                                let what = match kind {
                                    0 => Page::Mapped(contiguous + i * PAGE_SIZE),
                                    1 => Page::Mapped(list[i as usize].as_u64()),
                                    _ => Page::Sparse,
                                };
                                oracle.insert(page + i, what);
                            }
                        }
                    }
                }
                Op::Unmap { page, pages } => {
                    let pages = pages.min(2048 - page);
                    let got: Vec<_> = pts
                        .iter()
                        .map(|pt| {
                            let inv = pt.unmap(GpuVa::new(base + page * PAGE_SIZE), pages * PAGE_SIZE).unwrap();
                            let v = (inv.unmapped_bytes(), inv.range(), inv.flush_range(), inv.freed_tables());
                            inv.complete();
                            v
                        })
                        .collect();
                    prop_assert_eq!(got[0], got[1]);
                    let gone = oracle.range(page..page + pages).count() as u64;
                    prop_assert_eq!(got[0].0, gone * PAGE_SIZE);
                    let keys: Vec<u64> = oracle.range(page..page + pages).map(|(&k, _)| k).collect();
                    for k in keys {
                        oracle.remove(&k);
                    }
                }
            }
            prop_assert_eq!(pts[0].leaves(), pts[1].leaves());
            prop_assert_eq!(pts[0].table_pages(), pts[1].table_pages());
            let mut seen = BTreeMap::new();
            for l in pts[0].leaves() {
                for off in (0..l.size.bytes()).step_by(PAGE_SIZE as usize) {
                    let p = (l.va.as_u64() + off - base) / PAGE_SIZE;
                    seen.insert(p, if l.sparse { Page::Sparse } else { Page::Mapped(l.pa.as_u64() + off) });
                }
            }
            prop_assert_eq!(&seen, &oracle);
            for (pt, m) in pts.iter().zip(&mems) {
                let sound = fragments_are_sound(m, pt.root(), base, base + 2048 * PAGE_SIZE);
                prop_assert!(sound.is_ok(), "{:?}", sound);
            }
        }
        for (pt, (m, u)) in pts.iter().zip(mems.iter().zip(&usage)) {
            pt.unmap(GpuVa::new(base), 2048 * PAGE_SIZE).unwrap().complete();
            prop_assert_eq!(pt.table_pages(), 1);
            prop_assert_eq!(pt.split_reserve(), 0);
            prop_assert_eq!(&m.usage(), u);
        }
    }
}
