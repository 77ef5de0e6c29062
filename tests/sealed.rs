//! Sound and sealed: the arena is race-free under concurrent access, nothing changes an IOMMU
//! table or IOTLB except the IOMMU, an invalidation never frees table pages behind the TLB's back,
//! and a `Device` follows its attachment.

use std::sync::Arc;

use vmbind::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use vmbind::dma::{Attrs, Device, Direction, DmaError, IovaState};
use vmbind::iommu::{DeviceId, DomainConfig, FaultReason, Iommu, Mode};
use vmbind::mem::PhysMem;
use vmbind::pt::{MapOptions, MapSource, PageTable, Prot, X86Iommu};

const DEV: DeviceId = DeviceId(0x0500);
const A: Attrs = Attrs { skip_cpu_sync: false, mmio: false };
const TO: Direction = Direction::ToDevice;

#[test]
fn an_invalidation_dropped_uncompleted_parks_its_tables_until_a_full_flush() {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let pt = PageTable::<X86Iommu>::new(mem.clone()).unwrap();
    let pages = mem.alloc_frames(1024).unwrap();
    let va = DmaAddr::new(1 << 30);
    pt.map(va, MapSource::Pages(&pages), Prot::RW, MapOptions::default()).unwrap();
    let tables = pt.table_pages();
    assert!(tables >= 4, "root, two directories and two leaf tables");
    let free_before = mem.usage().free_frames;
    let inv = pt.unmap(va, 1024 * PAGE_SIZE).unwrap();
    let emptied = inv.freed_tables();
    assert_eq!(emptied as u64, tables - 1, "everything but the root emptied");
    drop(inv); // not completed: the flush may not have happened
    assert_eq!(mem.usage().free_frames, free_before, "no table page went back to the arena");
    assert_eq!(pt.parked_tables(), emptied);
    assert!(pt.dump().contains(&format!("{emptied} parked")), "{}", pt.dump());
    assert_eq!(pt.release_parked(), emptied);
    assert_eq!(mem.usage().free_frames, free_before + emptied as u64);
    assert_eq!(pt.parked_tables(), 0);
    // Completing frees at once, and parks nothing.
    pt.map(va, MapSource::Pages(&pages), Prot::RW, MapOptions::default()).unwrap();
    let inv = pt.unmap(va, 1024 * PAGE_SIZE).unwrap();
    let n = inv.freed_tables() as u64;
    let before = mem.usage().free_frames;
    inv.complete();
    assert_eq!(mem.usage().free_frames, before + n);
    assert_eq!(pt.parked_tables(), 0);
}

#[test]
fn a_table_dropped_with_parked_pages_gives_every_frame_back() {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let start = mem.usage();
    {
        let pt = PageTable::<X86Iommu>::new(mem.clone()).unwrap();
        let pages = mem.alloc_frames(600).unwrap();
        pt.map(DmaAddr::new(0x4000_0000), MapSource::Pages(&pages), Prot::RW, MapOptions::default()).unwrap();
        drop(pt.unmap(DmaAddr::new(0x4000_0000), 600 * PAGE_SIZE).unwrap());
        assert!(pt.parked_tables() > 0);
        mem.free_frames(&pages).unwrap();
    }
    assert_eq!(mem.usage(), start);
}

#[test]
fn the_domain_table_is_a_view_that_follows_the_domain() {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let d = iommu.create_domain(DomainConfig::default()).unwrap();
    let page = mem.alloc_frame().unwrap();
    let iova = d.alloc_iova(PAGE_SIZE).unwrap();
    d.map(iova, MapSource::Pages(&[page]), Prot::READ).unwrap();
    let view = d.table().unwrap();
    assert_eq!(view.translate(iova).unwrap().pa, page);
    assert_eq!(view.leaves().len(), 1);
    assert!(view.dump().contains("x86-64/VT-d"), "{}", view.dump());
    assert_eq!(view.first_mapped(iova, PAGE_SIZE), Some(iova));
    d.unmap(iova, PAGE_SIZE).unwrap();
    assert!(d.table().unwrap().leaves().is_empty());
    assert_eq!(d.table().unwrap().table_pages(), 1, "strict unmap frees the tables at once");
    d.free_iova(iova, PAGE_SIZE).unwrap();
}

#[test]
fn the_iotlb_is_visible_but_only_the_iommu_fills_and_flushes_it() {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let d = iommu.create_domain(DomainConfig::default()).unwrap();
    iommu.register_device(DEV, true).unwrap();
    iommu.attach(DEV, &d).unwrap();
    let page = mem.alloc_frame().unwrap();
    mem.write_u64(page, 77).unwrap();
    let iova = d.alloc_iova(PAGE_SIZE).unwrap();
    d.map(iova, MapSource::Pages(&[page]), Prot::READ).unwrap();
    assert_eq!(iommu.iotlb().lookup(d.id(), iova), None, "nothing cached before an access");
    assert_eq!(iommu.dma_read_u64(DEV, iova).unwrap(), 77);
    assert_eq!(iommu.iotlb().lookup(d.id(), iova), Some((page, Prot::READ)), "the walk filled it");
    iommu.flush_iotlb();
    assert_eq!(iommu.iotlb().lookup(d.id(), iova), None);
    assert_eq!(iommu.iotlb().lookup(d.id(), DmaAddr::new(u64::MAX)), None, "no panic past 2^48");
    // A strict unmap through the domain reaches the IOTLB: the cached translation is gone.
    assert_eq!(iommu.dma_read_u64(DEV, iova).unwrap(), 77);
    d.unmap(iova, PAGE_SIZE).unwrap();
    assert_eq!(iommu.dma_read_u64(DEV, iova).unwrap_err().reason, FaultReason::NotMapped);
}

#[test]
fn a_device_follows_its_attachment() {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let d1 = iommu.create_domain(DomainConfig::default()).unwrap();
    let d2 = iommu.create_domain(DomainConfig { mode: Mode::Lazy, ..DomainConfig::default() }).unwrap();
    iommu.register_device(DEV, true).unwrap();
    iommu.attach(DEV, &d1).unwrap();
    let dev = Device::translated(&iommu, DEV).unwrap();
    let page = mem.alloc_frame().unwrap();
    mem.write_u64(page, 0x5151).unwrap();
    let state = IovaState::try_alloc(&dev, page, PAGE_SIZE).unwrap().unwrap();

    iommu.detach(DEV).unwrap();
    assert!(dev.domain().is_none());
    assert_eq!(dev.map_phys(page, PAGE_SIZE, TO, A), Err(DmaError::NotAttached(DEV)));
    assert_eq!(IovaState::try_alloc(&dev, page, PAGE_SIZE).unwrap_err(), DmaError::NotAttached(DEV));
    assert!(d1.table().unwrap().leaves().is_empty(), "nothing went into the old domain");

    iommu.attach(DEV, &d2).unwrap();
    assert!(Arc::ptr_eq(&dev.domain().unwrap(), &d2));
    let dma = dev.map_phys(page, PAGE_SIZE, TO, A).unwrap();
    assert_eq!(d2.table().unwrap().leaves().len(), 1, "the map went into the new domain");
    assert!(d1.table().unwrap().leaves().is_empty());
    assert_eq!(iommu.dma_read_u64(DEV, dma).unwrap(), 0x5151);
    // A two-step state of the old domain is refused by the device now in another one.
    let mut state = state;
    assert_eq!(state.link(&dev, page, 0, PAGE_SIZE, TO, A), Err(DmaError::WrongDevice(DEV)));
    dev.unmap(dma, PAGE_SIZE, TO, A).unwrap();
    d2.flush();
    assert!(d2.table().unwrap().leaves().is_empty());
    assert_eq!(d2.iova().unwrap().stats().live, 0);
}

#[test]
fn concurrent_copies_and_table_loads_of_the_same_bytes_are_sound() {
    // Run under ThreadSanitizer this is where a non-atomic copy used to race the atomic view.
    let mem = Arc::new(PhysMem::new(1 << 20).unwrap());
    let f = mem.alloc_frame().unwrap();
    let writer = {
        let mem = mem.clone();
        std::thread::spawn(move || {
            for i in 0..2000u64 {
                let b = (i as u8) | 1;
                mem.write(PhysAddr::new(f.as_u64() + 3), &[b; 61]).unwrap();
            }
        })
    };
    for _ in 0..2000 {
        let t = mem.table(f).unwrap();
        for e in &t[..8] {
            let w = e.load(std::sync::atomic::Ordering::Relaxed).to_ne_bytes();
            // Every word holds one write's bytes (or the zeros before the first): never a mix.
            let covered: Vec<u8> = w.iter().copied().filter(|&x| x != 0).collect();
            assert!(covered.windows(2).all(|p| p[0] == p[1]), "a torn word {w:?}");
        }
    }
    writer.join().unwrap();
}
