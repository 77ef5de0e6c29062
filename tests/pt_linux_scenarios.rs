//! The page-table scenarios of Linux's own IOMMU page-table tests (REFERENCES.md §3), plus the
//! bad-input and split cases vmbind adds.

use std::sync::Arc;

use vmbind::addr::{DmaAddr, PAGE_SIZE, PageSize, PhysAddr};
use vmbind::mem::{BioVec, MemError, PhysMem};
use vmbind::pt::{MapError, MapOptions, MapSource, PageTable, Prot, UnmapError, X86Iommu};

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;

fn table() -> (Arc<PhysMem>, PageTable<X86Iommu>) {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let pt = PageTable::new(mem.clone()).unwrap();
    (mem, pt)
}

fn identity(pt: &PageTable<X86Iommu>, va: u64, len: u64, prot: Prot) -> Result<(), MapError<DmaAddr>> {
    pt.map(DmaAddr::new(va), MapSource::Range { pa: PhysAddr::new(va), len }, prot, MapOptions::default())
        .map(|_| ())
}

#[test]
fn empty_table_translates_nothing() {
    let (_mem, pt) = table();
    for va in [0, 42, 0x1000, GIB, (1 << 47) - 1, (1 << 48) - 1, 1 << 48, u64::MAX] {
        assert_eq!(pt.translate(DmaAddr::new(va)), None, "{va:#x}");
    }
    assert!(pt.leaves().is_empty());
    assert_eq!(pt.table_pages(), 1);
}

#[test]
fn each_page_size_at_n_gib_maps_refuses_overlap_translates_unmaps_and_remaps() {
    let (mem, pt) = table();
    let base_free = mem.usage().free_frames;
    for (n, size) in PageSize::ALL.into_iter().enumerate() {
        let iova = n as u64 * GIB;
        let len = size.bytes();
        identity(&pt, iova, len, Prot::RW).unwrap();
        // Mapping again over it (same or another physical address) fails and changes nothing.
        let again = pt.map(
            DmaAddr::new(iova),
            MapSource::Range { pa: PhysAddr::new(iova + len), len },
            Prot::READ,
            MapOptions::default(),
        );
        assert_eq!(again, Err(MapError::AlreadyMapped { va: DmaAddr::new(iova) }));
        let t = pt.translate(DmaAddr::new(iova + 42)).unwrap();
        assert_eq!(t.pa, PhysAddr::new(iova + 42));
        assert_eq!(t.size, size);
        assert_eq!(t.prot, Prot::RW);
    }
    for (n, size) in PageSize::ALL.into_iter().enumerate() {
        let iova = n as u64 * GIB;
        let inv = pt.unmap(DmaAddr::new(iova), size.bytes()).unwrap();
        assert_eq!(inv.unmapped_bytes(), size.bytes());
        assert_eq!(inv.page_sizes().collect::<Vec<_>>(), vec![size]);
        inv.complete();
        assert_eq!(pt.translate(DmaAddr::new(iova + 42)), None);
        identity(&pt, iova, size.bytes(), Prot::RW).unwrap();
        assert_eq!(pt.translate(DmaAddr::new(iova + 42)).unwrap().size, size);
    }
    for (n, size) in PageSize::ALL.into_iter().enumerate() {
        pt.unmap(DmaAddr::new(n as u64 * GIB), size.bytes()).unwrap().complete();
    }
    assert_eq!(pt.table_pages(), 1);
    assert_eq!(pt.split_reserve(), 0);
    assert_eq!(mem.usage().free_frames, base_free);
    assert_eq!(mem.usage().reserved_frames, 0);
}

#[test]
fn largest_page_at_the_top_of_the_address_space() {
    let (_mem, pt) = table();
    let top = (1u64 << 48) - GIB;
    identity(&pt, top, GIB, Prot::READ).unwrap();
    let t = pt.translate(DmaAddr::new((1 << 48) - 1)).unwrap();
    assert_eq!(t.pa, PhysAddr::new((1 << 48) - 1));
    assert_eq!(t.size, PageSize::Size1G);
    // One page more does not fit.
    assert_eq!(
        identity(&pt, top, 2 * GIB, Prot::READ),
        Err(MapError::OutOfRange { va: DmaAddr::new(top), len: 2 * GIB })
    );
    assert_eq!(pt.unmap(DmaAddr::new(top), GIB).unwrap().unmapped_bytes(), GIB);
    assert_eq!(pt.translate(DmaAddr::new(top)), None);
}

#[test]
fn boundary_0xfef80000_plus_128k_maps_as_4k_pages() {
    let (_mem, pt) = table();
    let start = 0xfef8_0000u64;
    let stats = pt
        .map(
            DmaAddr::new(start),
            MapSource::Range { pa: PhysAddr::new(start), len: 128 << 10 },
            Prot::RW,
            MapOptions::default(),
        )
        .unwrap();
    assert_eq!(stats.leaves, [32, 0, 0]);
    for va in (start..start + (128 << 10)).step_by(PAGE_SIZE as usize) {
        assert_eq!(pt.translate(DmaAddr::new(va + 7)).unwrap().pa, PhysAddr::new(va + 7));
    }
    assert_eq!(pt.translate(DmaAddr::new(start - 1)), None);
    assert_eq!(pt.translate(DmaAddr::new(start + (128 << 10))), None);
}

#[test]
fn identity_0x3fe400000_to_0x4c0600000_uses_14_2m_then_3_1g_then_3_2m_leaves() {
    let (_mem, pt) = table();
    let (start, end) = (0x3_fe40_0000u64, 0x4_c060_0000u64);
    let stats = pt
        .map(
            DmaAddr::new(start),
            MapSource::Range { pa: PhysAddr::new(start), len: end - start },
            Prot::RW,
            MapOptions::default(),
        )
        .unwrap();
    assert_eq!(stats.leaves, [0, 17, 3]);
    let sizes: Vec<PageSize> = pt.leaves().iter().map(|l| l.size).collect();
    let mut expect = vec![PageSize::Size2M; 14];
    expect.extend([PageSize::Size1G; 3]);
    expect.extend([PageSize::Size2M; 3]);
    assert_eq!(sizes, expect);
    for l in pt.leaves() {
        assert_eq!(l.pa.as_u64(), l.va.as_u64(), "identity");
    }
}

#[test]
fn every_small_start_and_end_alignment_translates_exactly() {
    let (_mem, pt) = table();
    let base = 0x1_0000_0000u64;
    for start in 0..6u64 {
        for pages in 1..6u64 {
            let va = base + start * PAGE_SIZE;
            identity(&pt, va, pages * PAGE_SIZE, Prot::RW).unwrap();
            for p in 0..8u64 {
                let probe = base + p * PAGE_SIZE + 5;
                let inside = p >= start && p < start + pages;
                assert_eq!(pt.translate(DmaAddr::new(probe)).map(|t| t.pa.as_u64()), inside.then_some(probe));
            }
            pt.unmap(DmaAddr::new(va), pages * PAGE_SIZE).unwrap().complete();
        }
    }
    assert_eq!(pt.table_pages(), 1);
}

#[test]
fn forced_4k_leaves_on_a_contiguous_range() {
    let (_mem, pt) = table();
    let stats = pt
        .map(
            DmaAddr::new(GIB),
            MapSource::Range { pa: PhysAddr::new(GIB), len: 4 * MIB2 },
            Prot::RW,
            MapOptions::FORCE_4K,
        )
        .unwrap();
    assert_eq!(stats.leaves, [2048, 0, 0]);
    assert_eq!(stats.tables_created, 2 + 4);
    let two_m = MapOptions { max_leaf: PageSize::Size2M };
    let stats = pt
        .map(DmaAddr::new(4 * GIB), MapSource::Range { pa: PhysAddr::new(0), len: GIB }, Prot::RW, two_m)
        .unwrap();
    assert_eq!(stats.leaves, [0, 512, 0]);
}

#[test]
fn partial_unmap_of_a_1g_leaf_splits_it_and_removes_exactly_that_range() {
    let (mem, pt) = table();
    let before = mem.usage();
    identity(&pt, GIB, GIB, Prot::RW).unwrap();
    assert_eq!(pt.split_reserve(), 513);
    let hole = GIB + 300 * MIB2 + 5 * PAGE_SIZE;
    let inv = pt.unmap(DmaAddr::new(hole), 3 * PAGE_SIZE).unwrap();
    assert_eq!(inv.unmapped_bytes(), 3 * PAGE_SIZE);
    assert_eq!(inv.range(), Some((DmaAddr::new(hole), 3 * PAGE_SIZE)));
    inv.complete();
    for p in 0..3 {
        assert_eq!(pt.translate(DmaAddr::new(hole + p * PAGE_SIZE)), None);
    }
    let below = pt.translate(DmaAddr::new(hole - 1)).unwrap();
    assert_eq!((below.pa.as_u64(), below.size), (hole - 1, PageSize::Size4K));
    let above = pt.translate(DmaAddr::new(hole + 3 * PAGE_SIZE)).unwrap();
    assert_eq!(above.pa.as_u64(), hole + 3 * PAGE_SIZE);
    let far = pt.translate(DmaAddr::new(GIB + 7)).unwrap();
    assert_eq!((far.pa.as_u64(), far.size, far.prot), (GIB + 7, PageSize::Size2M, Prot::RW));
    let leaves = pt.leaves();
    assert_eq!(leaves.iter().filter(|l| l.size == PageSize::Size2M).count(), 511);
    assert_eq!(leaves.iter().filter(|l| l.size == PageSize::Size4K).count(), 509);
    // The split took 2 frames out of the 1 GiB leaf's reserve; the 511 2 MiB leaves keep theirs.
    assert_eq!(pt.split_reserve(), 511);
    // Remove everything: the arena is back where it was.
    pt.unmap(DmaAddr::new(GIB), GIB).unwrap().complete();
    assert_eq!(pt.table_pages(), 1);
    assert_eq!(pt.split_reserve(), 0);
    assert_eq!(mem.usage(), before);
}

#[test]
fn unmap_skips_holes_and_reports_what_was_mapped() {
    let (_mem, pt) = table();
    identity(&pt, 0x10_0000, 4 * PAGE_SIZE, Prot::RW).unwrap();
    identity(&pt, 0x10_8000, 2 * PAGE_SIZE, Prot::RW).unwrap();
    identity(&pt, 0x20_0000, PAGE_SIZE, Prot::RW).unwrap(); // keeps the directory tables alive
    let inv = pt.unmap(DmaAddr::new(0x10_0000), 0x1_0000).unwrap();
    assert_eq!(inv.unmapped_bytes(), 6 * PAGE_SIZE);
    assert_eq!(inv.range(), Some((DmaAddr::new(0x10_0000), 0xa000)));
    // The leaf table emptied and is freed: before it is reused, its whole 2 MiB span must be
    // flushed (a walker may be on its way through it for any address it covers).
    assert_eq!(inv.freed_tables(), 1);
    assert_eq!(inv.flush_range(), Some((DmaAddr::new(0), 0x20_0000)));
    drop(inv);
    let keep = pt.unmap(DmaAddr::new(0x20_0000), PAGE_SIZE).unwrap();
    assert_eq!(keep.freed_tables(), 3, "now the leaf table and both directories empty");
    assert_eq!(keep.range(), Some((DmaAddr::new(0x20_0000), PAGE_SIZE)));
    assert_eq!(keep.flush_range(), Some((DmaAddr::new(0), 1 << 39)), "the widest freed table's span");
    keep.complete();
    // Without a freed table the range is just the removed leaves.
    identity(&pt, 0x10_0000, 4 * PAGE_SIZE, Prot::RW).unwrap();
    identity(&pt, 0x10_8000, 2 * PAGE_SIZE, Prot::RW).unwrap();
    let part = pt.unmap(DmaAddr::new(0x10_1000), 0x8000).unwrap();
    assert_eq!((part.unmapped_bytes(), part.freed_tables()), (4 * PAGE_SIZE, 0));
    assert_eq!(part.range(), Some((DmaAddr::new(0x10_1000), 0x8000)));
    assert_eq!(part.flush_range(), part.range());
    part.complete();
    pt.unmap(DmaAddr::new(0x10_0000), 0x1_0000).unwrap().complete();
    let none = pt.unmap(DmaAddr::new(0x10_0000), 0x1_0000).unwrap();
    assert_eq!(none.unmapped_bytes(), 0);
    assert_eq!(none.range(), None);
}

#[test]
fn bad_map_input_is_a_typed_error_and_changes_nothing() {
    let (mem, pt) = table();
    identity(&pt, 0x20_0000, PAGE_SIZE, Prot::RW).unwrap();
    let usage = mem.usage();
    let leaves = pt.leaves();
    let frames = [PhysAddr::new(0x5000), PhysAddr::new(0x6001)];
    let cases: Vec<(MapError<DmaAddr>, Result<_, _>)> = vec![
        (
            MapError::ZeroLength,
            pt.map(DmaAddr::new(0), MapSource::Pages(&[]), Prot::RW, MapOptions::default()),
        ),
        (
            MapError::UnalignedVa { va: DmaAddr::new(0x1234) },
            pt.map(DmaAddr::new(0x1234), MapSource::Pages(&frames[..1]), Prot::RW, MapOptions::default()),
        ),
        (
            MapError::UnalignedSource { index: 1, pa: PhysAddr::new(0x6001), len: PAGE_SIZE },
            pt.map(DmaAddr::new(0x40_0000), MapSource::Pages(&frames), Prot::RW, MapOptions::default()),
        ),
        (
            MapError::UnalignedSource { index: 0, pa: PhysAddr::new(0x1000), len: 100 },
            pt.map(
                DmaAddr::new(0x40_0000),
                MapSource::Range { pa: PhysAddr::new(0x1000), len: 100 },
                Prot::RW,
                MapOptions::default(),
            ),
        ),
        (
            MapError::PhysTooHigh { index: 0, pa: PhysAddr::new(1 << 52), len: PAGE_SIZE },
            pt.map(
                DmaAddr::new(0x40_0000),
                MapSource::Pages(&[PhysAddr::new(1 << 52)]),
                Prot::RW,
                MapOptions::default(),
            ),
        ),
        (
            MapError::OutOfRange { va: DmaAddr::new((1 << 48) - PAGE_SIZE), len: 2 * PAGE_SIZE },
            pt.map(
                DmaAddr::new((1 << 48) - PAGE_SIZE),
                MapSource::Range { pa: PhysAddr::new(0x1000), len: 2 * PAGE_SIZE },
                Prot::RW,
                MapOptions::default(),
            ),
        ),
        (
            MapError::Overflow { va: DmaAddr::new(!0xfff), len: 2 * PAGE_SIZE },
            pt.map(
                DmaAddr::new(!0xfff),
                MapSource::Range { pa: PhysAddr::new(0x1000), len: 2 * PAGE_SIZE },
                Prot::RW,
                MapOptions::default(),
            ),
        ),
        (
            MapError::InvalidProt { prot: Prot::NONE },
            pt.map(
                DmaAddr::new(0x40_0000),
                MapSource::Pages(&frames[..1]),
                Prot::NONE,
                MapOptions::default(),
            ),
        ),
        (
            // Overlap in the middle of a longer request: names the mapped address.
            MapError::AlreadyMapped { va: DmaAddr::new(0x20_0000) },
            pt.map(
                DmaAddr::new(0x1f_e000),
                MapSource::Range { pa: PhysAddr::new(0x1000), len: 4 * PAGE_SIZE },
                Prot::RW,
                MapOptions::default(),
            ),
        ),
        (
            MapError::UnalignedSource { index: 0, pa: PhysAddr::new(0x5010), len: PAGE_SIZE },
            pt.map(
                DmaAddr::new(0x40_0000),
                MapSource::BioVecs(&[BioVec { phys: PhysAddr::new(0x5000), offset: 16, len: 4096 }]),
                Prot::RW,
                MapOptions::default(),
            ),
        ),
    ];
    for (want, got) in cases {
        assert_eq!(got, Err(want.clone()), "{want}");
    }
    assert_eq!(pt.leaves(), leaves);
    assert_eq!(mem.usage(), usage);
}

#[test]
fn a_huge_map_over_a_table_names_the_first_mapped_page() {
    let (_mem, pt) = table();
    identity(&pt, GIB + 0x3000, PAGE_SIZE, Prot::RW).unwrap();
    assert_eq!(
        identity(&pt, GIB, MIB2, Prot::RW),
        Err(MapError::AlreadyMapped { va: DmaAddr::new(GIB + 0x3000) })
    );
    assert_eq!(
        identity(&pt, 0, 2 * GIB, Prot::RW),
        Err(MapError::AlreadyMapped { va: DmaAddr::new(GIB + 0x3000) })
    );
}

#[test]
fn bad_unmap_input_is_a_typed_error() {
    let (_mem, pt) = table();
    identity(&pt, 0x20_0000, PAGE_SIZE, Prot::RW).unwrap();
    assert_eq!(pt.unmap(DmaAddr::new(0x20_0000), 0).unwrap_err(), UnmapError::ZeroLength);
    assert_eq!(
        pt.unmap(DmaAddr::new(0x20_0010), PAGE_SIZE).unwrap_err(),
        UnmapError::UnalignedVa { va: DmaAddr::new(0x20_0010) }
    );
    assert_eq!(pt.unmap(DmaAddr::new(0x20_0000), 10).unwrap_err(), UnmapError::UnalignedLength { len: 10 });
    assert_eq!(
        pt.unmap(DmaAddr::new(1 << 48), PAGE_SIZE).unwrap_err(),
        UnmapError::OutOfRange { va: DmaAddr::new(1 << 48), len: PAGE_SIZE }
    );
    assert!(pt.translate(DmaAddr::new(0x20_0000)).is_some());
}

#[test]
fn out_of_memory_for_tables_changes_nothing() {
    let mem = Arc::new(PhysMem::new(16 * PAGE_SIZE).unwrap());
    let pt = PageTable::<X86Iommu>::new(mem.clone()).unwrap();
    let usage = mem.usage();
    // 8 GiB of 4 KiB leaves spread over many tables needs far more than 14 frames.
    let pages: Vec<PhysAddr> = (0..64u64).map(|i| PhysAddr::new(0x1000 * (i + 1))).collect();
    let mut last = Ok(Default::default());
    for i in 0..16u64 {
        last = pt.map(DmaAddr::new(i * GIB), MapSource::Pages(&pages), Prot::RW, MapOptions::default());
        if last.is_err() {
            break;
        }
    }
    assert!(matches!(last, Err(MapError::OutOfMemory(MemError::OutOfMemory { .. }))), "{last:?}");
    let leaves = pt.leaves().len();
    assert!(leaves.is_multiple_of(64) && leaves > 0);
    // The split reserve is refused the same way: 1 GiB leaves need 513 frames each.
    let huge = identity(&pt, 100 * GIB, GIB, Prot::RW);
    assert!(matches!(huge, Err(MapError::OutOfMemory(_))), "{huge:?}");
    assert_eq!(pt.leaves().len(), leaves);
    assert!(mem.usage().free_frames < usage.free_frames);
}

#[test]
fn bio_vec_segments_map_back_to_back_with_huge_leaves_where_aligned() {
    let (_mem, pt) = table();
    let bv = [
        BioVec { phys: PhysAddr::new(0x7000), offset: 0x1000, len: 0x2000 },
        BioVec { phys: PhysAddr::new(GIB), offset: 0, len: (MIB2 * 2) as u32 },
        BioVec { phys: PhysAddr::new(0x5000), offset: 0, len: 0x1000 },
    ];
    // Start so that the second segment begins on a 2 MiB boundary: 2 pages before it.
    let va = 4 * GIB - 0x2000;
    let stats = pt.map(DmaAddr::new(va), MapSource::BioVecs(&bv), Prot::READ, MapOptions::default()).unwrap();
    assert_eq!(stats.leaves, [3, 2, 0]);
    assert_eq!(pt.translate(DmaAddr::new(va)).unwrap().pa, PhysAddr::new(0x8000));
    assert_eq!(pt.translate(DmaAddr::new(va + 0x1008)).unwrap().pa, PhysAddr::new(0x9008));
    assert_eq!(pt.translate(DmaAddr::new(4 * GIB + MIB2 + 3)).unwrap().pa, PhysAddr::new(GIB + MIB2 + 3));
    assert_eq!(pt.translate(DmaAddr::new(4 * GIB + 2 * MIB2)).unwrap().pa, PhysAddr::new(0x5000));
}

#[test]
fn a_bad_page_late_in_a_long_list_changes_nothing_even_across_existing_tables() {
    let (mem, pt) = table();
    // An existing leaf table holding one page, so the new map writes into it and creates more.
    identity(&pt, GIB + 0x1000, PAGE_SIZE, Prot::RW).unwrap();
    let usage = mem.usage();
    let leaves = pt.leaves();
    let mut pages: Vec<PhysAddr> = (0..3000u64).map(|i| PhysAddr::new((i + 1) << 12)).collect();
    for (bad_at, bad) in [(2999usize, 0x77_7008u64), (1, 1 << 52), (1500, 0x10_0010)] {
        let keep = pages[bad_at];
        pages[bad_at] = PhysAddr::new(bad);
        let r = pt.map(DmaAddr::new(GIB + 0x2000), MapSource::Pages(&pages), Prot::RW, MapOptions::default());
        let want = if bad & 0xfff != 0 {
            MapError::UnalignedSource { index: bad_at, pa: PhysAddr::new(bad), len: PAGE_SIZE }
        } else {
            MapError::PhysTooHigh { index: bad_at, pa: PhysAddr::new(bad), len: PAGE_SIZE }
        };
        assert_eq!(r, Err(want));
        assert_eq!(pt.leaves(), leaves);
        assert_eq!(mem.usage(), usage);
        assert_eq!(pt.translate(DmaAddr::new(GIB + 0x2000)), None);
        pages[bad_at] = keep;
    }
    let stats = pt
        .map(DmaAddr::new(GIB + 0x2000), MapSource::Pages(&pages), Prot::RW, MapOptions::default())
        .unwrap();
    assert_eq!(stats.leaves[0], 3000);
    assert_eq!(
        pt.translate(DmaAddr::new(GIB + 0x2000 + 2999 * PAGE_SIZE)).unwrap().pa,
        PhysAddr::new(3000 << 12)
    );
}

#[test]
fn whole_page_bio_vecs_map_in_one_pass_and_a_partial_one_changes_nothing() {
    let (mem, pt) = table();
    identity(&pt, GIB + 0x1000, PAGE_SIZE, Prot::RW).unwrap();
    let usage = mem.usage();
    let leaves = pt.leaves();
    let mut bv: Vec<BioVec> = (0..1500u64).map(|i| BioVec::page(PhysAddr::new((i + 1) << 12))).collect();
    for (at, bad) in [
        (1499usize, BioVec { phys: PhysAddr::new(0x9000), offset: 0, len: 2 * 4096 }),
        (700, BioVec { phys: PhysAddr::new(0x9000), offset: 8, len: 4096 }),
        (3, BioVec { phys: PhysAddr::new(!0xfff), offset: 0x1000, len: 4096 }),
    ] {
        let keep = bv[at];
        bv[at] = bad;
        let r = pt.map(DmaAddr::new(GIB + 0x2000), MapSource::PageVecs(&bv), Prot::RW, MapOptions::default());
        assert!(
            matches!(r, Err(MapError::UnalignedSource { index, .. } | MapError::PhysTooHigh { index, .. }) if index == at),
            "{r:?}"
        );
        assert_eq!(pt.leaves(), leaves);
        assert_eq!(mem.usage(), usage);
        bv[at] = keep;
    }
    let stats = pt
        .map(DmaAddr::new(GIB + 0x2000), MapSource::PageVecs(&bv), Prot::RW, MapOptions::default())
        .unwrap();
    assert_eq!(stats.leaves[0], 1500);
    assert_eq!(
        pt.translate(DmaAddr::new(GIB + 0x2000 + 1499 * PAGE_SIZE)).unwrap().pa,
        PhysAddr::new(1500 << 12)
    );
}

#[test]
fn page_vecs_take_only_offset_zero_pages() {
    let (_mem, pt) = table();
    let bv = [
        BioVec::page(PhysAddr::new(0x8000)),
        BioVec { phys: PhysAddr::new(0x9000), offset: 0x1000, len: 4096 },
    ];
    assert_eq!(
        pt.map(DmaAddr::new(GIB), MapSource::PageVecs(&bv), Prot::RW, MapOptions::default()),
        Err(MapError::UnalignedSource { index: 1, pa: PhysAddr::new(0xa000), len: PAGE_SIZE })
    );
    // The general form takes it.
    pt.map(DmaAddr::new(GIB), MapSource::BioVecs(&bv), Prot::RW, MapOptions::default()).unwrap();
    assert_eq!(pt.translate(DmaAddr::new(GIB + PAGE_SIZE)).unwrap().pa, PhysAddr::new(0xa000));
}
