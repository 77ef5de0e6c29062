//! The engine's bind support: DMA-segment map sources, prepare-then-commit over a list of maps
//! (the commit never allocates, even from an exhausted arena), unmaps that keep emptied tables
//! and the reclaim that frees them; and the DMA layer's in-place mapping for direct devices.

use std::sync::Arc;

use vmbind::addr::{DmaAddr, GpuVa, PAGE_SIZE, PageSize, PhysAddr};
use vmbind::dma::{Attrs, Device, Direction, DmaError};
use vmbind::iommu::DeviceId;
use vmbind::mem::{BioVec, PageArray, PhysMem};
use vmbind::pt::{GpuGfx9, MapError, MapOptions, MapSource, PageTable, PlannedMap, Prot, Segment};

const MIB2: u64 = 2 << 20;

fn table() -> (Arc<PhysMem>, PageTable<GpuGfx9>) {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let pt = PageTable::new(mem.clone()).unwrap();
    (mem, pt)
}

fn seg(addr: u64, len: u64) -> Segment<DmaAddr> {
    Segment { addr: DmaAddr::new(addr), len }
}

/// Hogs every unreserved free frame of the arena.
fn exhaust(mem: &PhysMem) -> Vec<PhysAddr> {
    let u = mem.usage();
    mem.alloc_frames((u.free_frames - u.reserved_frames) as usize).unwrap()
}

#[test]
fn segment_sources_map_each_run_in_order_with_huge_leaves_where_they_fit() {
    let (_mem, pt) = table();
    // A 2 MiB aligned run, a single page, a 3-page run; mapped from 4 KiB into the list.
    let segs = [seg(0x4000_0000, MIB2 + 0x1000), seg(0x9000, 0x1000), seg(0x7000_0000, 0x3000)];
    let va = 0x1000_0000 - 0x1000;
    let src = MapSource::Segments { segs: &segs, skip: 0x1000, len: MIB2 + 0x4000 };
    // skip lands inside the first run: VA (2 MiB aligned + 0) maps DMA 0x4000_1000 onward.
    let st = pt.map(GpuVa::new(va + 0x1000), src, Prot::RW, MapOptions::default()).unwrap();
    assert_eq!(st.bytes, MIB2 + 0x4000);
    let at = |off: u64| pt.translate(GpuVa::new(va + 0x1000 + off)).map(|t| (t.pa.as_u64(), t.size));
    assert_eq!(at(0), Some((0x4000_1000, PageSize::Size4K)), "not 2 MiB aligned in DMA space: 4 KiB leaves");
    assert_eq!(at(MIB2 - 0x1000), Some((0x4020_0000, PageSize::Size4K)));
    assert_eq!(at(MIB2), Some((0x9000, PageSize::Size4K)));
    assert_eq!(at(MIB2 + 0x1000), Some((0x7000_0000, PageSize::Size4K)));
    assert_eq!(at(MIB2 + 0x3000), Some((0x7000_2000, PageSize::Size4K)));
    assert_eq!(at(MIB2 + 0x4000), None);
    // Aligned alike in both spaces: one 2 MiB leaf.
    let segs2 = [seg(0x4000_0000, MIB2)];
    let src = MapSource::Segments { segs: &segs2, skip: 0, len: MIB2 };
    let st = pt.map(GpuVa::new(0x2000_0000), src, Prot::READ, MapOptions::default()).unwrap();
    assert_eq!(st.leaves, [0, 1, 0]);
}

#[test]
fn bad_segment_lists_are_refused_before_anything_is_written() {
    let (_mem, pt) = table();
    let va = GpuVa::new(0x100_0000);
    let m = |src| pt.map(va, src, Prot::RW, MapOptions::default());
    let odd = [seg(0x1000, 0x1000), seg(0x2001, 0x1000)];
    assert!(matches!(
        m(MapSource::Segments { segs: &odd, skip: 0, len: 0x2000 }),
        Err(MapError::UnalignedSource { index: 1, .. })
    ));
    let empty = [seg(0x1000, 0x1000), seg(0x3000, 0)];
    assert!(matches!(
        m(MapSource::Segments { segs: &empty, skip: 0, len: 0x1000 }),
        Err(MapError::UnalignedSource { index: 1, .. })
    ));
    let high = [seg(1 << 48, 0x1000)];
    assert!(matches!(
        m(MapSource::Segments { segs: &high, skip: 0, len: 0x1000 }),
        Err(MapError::PhysTooHigh { index: 0, .. })
    ));
    let short = [seg(0x1000, 0x2000)];
    assert_eq!(
        m(MapSource::Segments { segs: &short, skip: 0x1000, len: 0x2000 }),
        Err(MapError::SourceShort { wanted: 0x3000, available: 0x2000 })
    );
    let pages = [seg(0x1000, 0x1000), seg(0x5000, 0x2000)];
    assert!(matches!(m(MapSource::PageSegments(&pages)), Err(MapError::UnalignedSource { index: 1, .. })));
    assert!(pt.leaves().is_empty());
    assert_eq!(pt.table_pages(), 1);
    // Page segments that are pages map like a page list.
    let pages = [seg(0x1000, 0x1000), seg(0x9000, 0x1000)];
    m(MapSource::PageSegments(&pages)).unwrap();
    assert_eq!(pt.translate(GpuVa::new(0x100_1008)).unwrap().pa, DmaAddr::new(0x9008));
}

#[test]
fn a_prepared_bind_commits_from_an_exhausted_arena_and_gives_the_rest_back() {
    let (mem, pt) = table();
    let pages: Vec<DmaAddr> = (0..1000).map(|i| DmaAddr::new(0x100_0000 + i * 0x3000)).collect();
    let maps = [
        PlannedMap {
            va: GpuVa::new(0x4000_0000),
            src: MapSource::Pages(&pages),
            opts: MapOptions::default(),
        },
        PlannedMap {
            va: GpuVa::new(0x8000_0000),
            src: MapSource::Range { pa: DmaAddr::new(0x4000_0000), len: 3 * MIB2 },
            opts: MapOptions::default(),
        },
        PlannedMap {
            va: GpuVa::new(0xc000_0000),
            src: MapSource::Sparse { len: MIB2 + 0x1000 },
            opts: MapOptions::default(),
        },
    ];
    let before = mem.usage();
    let mut prep = pt.prepare(&maps).unwrap();
    assert!(prep.frames() > 0);
    // Nothing is mapped yet, and the arena cannot supply a single frame any more.
    assert!(pt.leaves().is_empty());
    let hog = exhaust(&mem);
    assert!(mem.alloc_frame().is_err());
    assert!(matches!(
        pt.map(GpuVa::new(0x1_0000_0000), MapSource::Pages(&pages[..1]), Prot::RW, MapOptions::default()),
        Err(MapError::OutOfMemory(_))
    ));
    for m in &maps {
        let prot = if matches!(m.src, MapSource::Sparse { .. }) { Prot::NONE } else { Prot::RW };
        pt.map_prepared(&mut prep, m.va, m.src, prot, m.opts).unwrap();
    }
    assert_eq!(pt.translate(GpuVa::new(0x4000_0000 + 999 * 0x1000)).unwrap().pa, pages[999]);
    assert_eq!(pt.translate(GpuVa::new(0x8000_0000 + MIB2)).unwrap().size, PageSize::Size2M);
    // A map the token was not prepared for is refused, changing nothing.
    let r = pt.map_prepared(
        &mut prep,
        GpuVa::new(0x10_0000_0000),
        MapSource::Pages(&pages),
        Prot::RW,
        MapOptions::default(),
    );
    assert_eq!(r, Err(MapError::NotPrepared));
    mem.free_frames(&hog).unwrap();
    let left = pt.finish(prep);
    let after = mem.usage();
    // Every frame the token held went to tables or split reserve, or back.
    let used = before.free_frames - after.free_frames;
    assert_eq!(used, pt.table_pages() - 1, "table pages (left over: {left})");
    assert_eq!(after.reserved_frames - before.reserved_frames, pt.split_reserve());
    // A token of another table is refused.
    let (_m2, other) = table();
    let mut foreign = other.prepare(&maps[..1]).unwrap();
    let r = pt.map_prepared(
        &mut foreign,
        GpuVa::new(0x20_0000_0000),
        MapSource::Pages(&pages),
        Prot::RW,
        MapOptions::default(),
    );
    assert_eq!(r, Err(MapError::NotPrepared));
    let _ = other.finish(foreign);
}

#[test]
fn unmaps_that_keep_tables_leave_them_for_reuse_and_reclaim_frees_them() {
    let (_mem, pt) = table();
    let base = 0x4000_0000u64;
    let pages: Vec<DmaAddr> = (0..1024).map(|i| DmaAddr::new(0x100_0000 + i * 0x1000)).collect();
    pt.map(GpuVa::new(base), MapSource::Pages(&pages), Prot::RW, MapOptions::default()).unwrap();
    let tables = pt.table_pages();
    let inv = pt.unmap_keeping_tables(GpuVa::new(base), 1024 * PAGE_SIZE).unwrap();
    assert!(inv.left_empty_tables());
    assert_eq!(inv.freed_tables(), 0);
    inv.complete();
    assert_eq!(pt.table_pages(), tables, "the emptied tables stay");
    assert!(pt.leaves().is_empty());
    // A part refilled, then reclaim: the still-empty leaf table goes, the used one stays.
    pt.map(GpuVa::new(base), MapSource::Pages(&pages[..1]), Prot::RW, MapOptions::default()).unwrap();
    let inv = pt.reclaim(GpuVa::new(base), 1024 * PAGE_SIZE);
    assert_eq!(inv.freed_tables(), 1);
    assert!(inv.flush_range().is_some());
    inv.complete();
    assert_eq!(pt.table_pages(), tables - 1);
    let inv = pt.unmap(GpuVa::new(base), PAGE_SIZE).unwrap();
    assert_eq!(inv.freed_tables(), 3, "a normal unmap frees the emptied chain");
    inv.complete();
    assert_eq!(pt.table_pages(), 1);
    // A partial unmap that keeps a non-empty table says so.
    pt.map(GpuVa::new(base), MapSource::Pages(&pages[..4]), Prot::RW, MapOptions::default()).unwrap();
    let inv = pt.unmap_keeping_tables(GpuVa::new(base), PAGE_SIZE).unwrap();
    assert!(!inv.left_empty_tables());
    inv.complete();
}

#[test]
fn a_direct_device_maps_a_page_array_in_place_with_one_record() {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let frames = mem.alloc_scattered(64, 3).unwrap();
    let arr = PageArray::new(BioVec::from_frames(&frames));
    assert_eq!(arr.summary().total, 64 * PAGE_SIZE);
    let dev = Device::direct(mem.clone(), DeviceId(2), 48, true).unwrap();
    let m = dev.map_direct(&arr, Direction::ToDevice, Attrs::default()).unwrap();
    assert_eq!((m.addr().as_u64(), m.total_len(), m.segments()), (frames[0].as_u64(), 64 * PAGE_SIZE, 64));
    // The GPU table of a direct GPU fills from the same array.
    let pt = PageTable::<GpuGfx9>::new(mem.clone()).unwrap();
    pt.map(GpuVa::new(0x10_0000), MapSource::DirectPageVecs(arr.pages()), Prot::READ, MapOptions::default())
        .unwrap();
    assert_eq!(pt.translate(GpuVa::new(0x10_0000 + 5 * PAGE_SIZE)).unwrap().pa.as_u64(), frames[5].as_u64());
    // Unmapped with another direction: refused; then once; then never again.
    assert!(matches!(
        dev.unmap_direct(&m, Direction::FromDevice, Attrs::default()),
        Err(DmaError::DirectionMismatch { .. })
    ));
    let other = Device::direct(mem.clone(), DeviceId(9), 48, true).unwrap();
    assert!(matches!(
        other.unmap_direct(&m, Direction::ToDevice, Attrs::default()),
        Err(DmaError::OtherDevice { .. })
    ));
    dev.unmap_direct(&m, Direction::ToDevice, Attrs::default()).unwrap();
    assert!(matches!(
        dev.unmap_direct(&m, Direction::ToDevice, Attrs::default()),
        Err(DmaError::NotMapped { .. })
    ));
    // A 24-bit device cannot reach frames above 16 MiB.
    let old = Device::direct(mem.clone(), DeviceId(4), 24, true).unwrap();
    let high = PageArray::new(vec![BioVec::page(PhysAddr::new(32 << 20))]);
    assert!(matches!(
        old.map_direct(&high, Direction::ToDevice, Attrs::default()),
        Err(DmaError::AddressLimit { bits: 24, .. })
    ));
    let bad = PageArray::new(vec![BioVec { phys: PhysAddr::new(0x1000), offset: 0, len: 0 }]);
    assert_eq!(dev.map_direct(&bad, Direction::ToDevice, Attrs::default()), Err(DmaError::ZeroSize));
    assert_eq!(
        dev.map_direct(&PageArray::new(vec![]), Direction::ToDevice, Attrs::default()),
        Err(DmaError::ZeroSize)
    );
}
