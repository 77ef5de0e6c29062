//! Every misuse refused (Linux's dma-debug checks, always on): the five defects found by a
//! hostile caller, each a named test asserting its typed error and that nothing observable
//! changed, plus the other dma-debug checks. CI runs this file in a debug build too.

use std::sync::Arc;

use vmbind::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use vmbind::dma::{Attrs, Device, Direction, DmaError, DmaVec, IovaState, MapKind};
use vmbind::iommu::iova::ForeignToken;
use vmbind::iommu::{DeviceId, Domain, DomainConfig, DomainError, Iommu, IommuError};
use vmbind::mem::{BioVec, PhysMem};
use vmbind::pt::{MapError, MapOptions, MapSource, PageTable, Prot, X86Iommu};

const DEV: DeviceId = DeviceId(0x0600);
const A: Attrs = Attrs { skip_cpu_sync: false, mmio: false };
const TO: Direction = Direction::ToDevice;
const FROM: Direction = Direction::FromDevice;

fn setup(trusted: bool) -> (Arc<PhysMem>, Iommu, Arc<Domain>, Device) {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let d = iommu.create_domain(DomainConfig::default()).unwrap();
    iommu.register_device(DEV, trusted).unwrap();
    iommu.attach(DEV, &d).unwrap();
    let dev = Device::translated(&iommu, DEV).unwrap();
    (mem, iommu, d, dev)
}

/// Everything a misuse could change, compared before and after.
#[derive(Debug, PartialEq)]
struct Snapshot {
    usage: vmbind::mem::MemUsage,
    leaves: Vec<vmbind::pt::Leaf<DmaAddr>>,
    iova: vmbind::iommu::iova::IovaStats,
    faults: usize,
}

fn snap(mem: &PhysMem, d: &Domain) -> Snapshot {
    Snapshot {
        usage: mem.usage(),
        leaves: d.table().unwrap().leaves(),
        iova: d.iova().unwrap().stats(),
        faults: d.faults().records().len(),
    }
}

#[test]
fn defect_1_ranges_that_wrap_past_2_64_are_refused() {
    let top = PhysAddr::new(!0xfff);
    let wrap = BioVec { phys: top, offset: 0, len: 0x2000 };
    // The engine: refused before anything changes (it used to map the wrapped page onto 0).
    let mem = Arc::new(PhysMem::new(16 << 20).unwrap());
    let pt = PageTable::<X86Iommu>::new(mem.clone()).unwrap();
    let usage = mem.usage();
    let got = pt.map(DmaAddr::new(0x10_0000), MapSource::BioVecs(&[wrap]), Prot::RW, MapOptions::default());
    assert_eq!(got, Err(MapError::PhysTooHigh { index: 0, pa: top, len: 0x2000 }));
    assert!(pt.leaves().is_empty());
    assert_eq!(mem.usage(), usage);
    // map_sg, trusted and untrusted (which used to panic in needs_bounce).
    for trusted in [true, false] {
        let (mem, _iommu, d, dev) = setup(trusted);
        let before = snap(&mem, &d);
        let good = BioVec::page(mem.alloc_frame().unwrap());
        let before_good = snap(&mem, &d);
        assert_eq!(dev.map_sg(&[good, wrap], TO, A), Err(DmaError::Overflow { phys: top, size: 0x2000 }));
        assert_eq!(snap(&mem, &d), before_good);
        assert_eq!(
            dev.map_phys(top, 0x2000, TO, A),
            Err(DmaError::Overflow { phys: top, size: 0x2000 }),
            "map_phys"
        );
        assert_eq!(snap(&mem, &d), before_good, "map_phys changed nothing");
        assert_eq!(before.leaves, snap(&mem, &d).leaves);
    }
    // A DmaVec cannot hold a wrapping (or empty) segment, so no PRP or SGL can be built from one.
    let mut v = DmaVec::default();
    assert_eq!(
        v.push(DmaAddr::new(top.as_u64()), 0x2000),
        Err(DmaError::SegmentOverflow { addr: DmaAddr::new(top.as_u64()), len: 0x2000 })
    );
    assert_eq!(v.push(DmaAddr::new(0x1000), 0), Err(DmaError::EmptySegment { index: 0 }));
    assert!(v.is_empty());
}

#[test]
fn defect_2_a_destroyed_domain_handle_is_refused_however_its_id_is_reused() {
    let mem = Arc::new(PhysMem::new(16 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    iommu.register_device(DEV, true).unwrap();
    let old = iommu.create_domain(DomainConfig::default()).unwrap();
    iommu.destroy_domain(&old).unwrap();
    assert!(old.is_destroyed());
    let live = iommu.create_domain(DomainConfig::default()).unwrap();
    assert_eq!(live.id(), old.id(), "the id is reused");
    assert_eq!(iommu.attach(DEV, &old), Err(IommuError::StaleDomain(old.id())));
    assert_eq!(live.device_count(), 0, "nothing was counted in the live domain");
    assert_eq!(iommu.device(DEV).unwrap().domain, None, "the device was not attached");
    assert_eq!(iommu.destroy_domain(&old), Err(IommuError::StaleDomain(old.id())));
    assert!(Arc::ptr_eq(&iommu.domain(live.id()).unwrap(), &live), "the live domain survives");
    // Attach and detach the live one: the count stays in step.
    iommu.attach(DEV, &live).unwrap();
    assert_eq!(live.device_count(), 1);
    iommu.detach(DEV).unwrap();
    assert_eq!(live.device_count(), 0);
    assert_eq!(iommu.detach(DEV), Err(IommuError::NotAttached(DEV)));
    assert_eq!(live.device_count(), 0, "a second detach cannot wrap the count");
    // The stale handle's own operations are refused too.
    let page = mem.alloc_frame().unwrap();
    assert_eq!(old.alloc_iova(PAGE_SIZE), Err(DomainError::Destroyed(old.id())));
    assert_eq!(
        old.map(DmaAddr::new(0x10_0000), MapSource::Pages(&[page]), Prot::RW),
        Err(DomainError::Destroyed(old.id()))
    );
    assert_eq!(old.unmap(DmaAddr::new(0x10_0000), PAGE_SIZE), Err(DomainError::Destroyed(old.id())));
    assert_eq!(old.sync(DmaAddr::new(0x10_0000), PAGE_SIZE), Err(DomainError::Destroyed(old.id())));
    iommu.destroy_domain(&live).unwrap();
    // A domain of another IOMMU.
    let other = Iommu::new(mem.clone());
    let foreign = other.create_domain(DomainConfig::default()).unwrap();
    assert_eq!(iommu.attach(DEV, &foreign), Err(IommuError::ForeignDomain(foreign.id())));
    assert_eq!(iommu.destroy_domain(&foreign), Err(IommuError::ForeignDomain(foreign.id())));
}

#[test]
fn defect_3_a_retired_iova_token_cannot_cross_domains() {
    let mem = Arc::new(PhysMem::new(16 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let a = iommu.create_domain(DomainConfig::default()).unwrap();
    let b = iommu.create_domain(DomainConfig::default()).unwrap();
    // Small (magazine-cached) and large (tree) sizes.
    for size in [PAGE_SIZE, 40 * PAGE_SIZE] {
        let x = a.alloc_iova(size).unwrap();
        let y = b.alloc_iova(size).unwrap();
        let (sa, sb) = (a.iova().unwrap().stats(), b.iova().unwrap().stats());
        let token = a.retire_iova(x, size).unwrap();
        let Err(ForeignToken { token }) = b.free_retired(token) else { panic!("accepted by b") };
        assert_eq!(b.iova().unwrap().stats(), sb, "nothing changed in b");
        assert!(b.iova().unwrap().is_allocated(y));
        // b never hands out its live y, and the token still works where it came from.
        let z = b.alloc_iova(size).unwrap();
        assert_ne!(z, y);
        b.free_iova(z, size).unwrap();
        a.free_retired(token).unwrap();
        assert_eq!(a.iova().unwrap().stats().live, sa.live - 1);
        b.free_iova(y, size).unwrap();
    }
}

#[test]
fn defect_4_unmap_and_link_are_held_to_what_was_mapped() {
    let (mem, iommu, d, dev) = setup(true);
    let frames = mem.alloc_block(4 * PAGE_SIZE).unwrap();
    mem.write(frames, &[0x44; 4 * PAGE_SIZE as usize]).unwrap();
    let dma = dev.map_phys(frames, 4 * PAGE_SIZE, TO, A).unwrap();
    let before = snap(&mem, &d);
    assert_eq!(
        dev.unmap(dma, 3 * PAGE_SIZE, TO, A),
        Err(DmaError::SizeMismatch { dma, mapped: 4 * PAGE_SIZE, unmapped: 3 * PAGE_SIZE })
    );
    assert_eq!(snap(&mem, &d), before);
    let page4 = DmaAddr::new(dma.as_u64() + 3 * PAGE_SIZE);
    assert_eq!(iommu.dma_read_u64(DEV, page4).unwrap(), 0x4444_4444_4444_4444, "page 4 still mapped");
    assert!(d.iova().unwrap().is_allocated(dma), "the IOVA cannot be handed out again");
    dev.unmap(dma, 4 * PAGE_SIZE, TO, A).unwrap();

    // A first link whose in-page offset is not the reservation's lands off the reservation.
    let p = mem.alloc_frame().unwrap();
    let mut s = IovaState::try_alloc(&dev, PhysAddr::new(p.as_u64() + 0x100), 0x800).unwrap().unwrap();
    let neighbour = IovaState::try_alloc(&dev, p, PAGE_SIZE).unwrap().unwrap();
    let before = snap(&mem, &d);
    let off = PhysAddr::new(p.as_u64() + 0x900);
    assert_eq!(s.link(&dev, off, 0, 0x700, TO, A), Err(DmaError::UnalignedLink { offset: 0, phys: off }));
    let low = PhysAddr::new(p.as_u64() + 0x80);
    assert_eq!(s.link(&dev, low, 0, 0x800, TO, A), Err(DmaError::UnalignedLink { offset: 0, phys: low }));
    assert_eq!(snap(&mem, &d), before, "nothing mapped, the neighbour's IOVA untouched");
    // With the reservation's own offset it links and reads back.
    s.link(&dev, PhysAddr::new(p.as_u64() + 0x100), 0, 0x800, TO, A).unwrap();
    s.sync(&dev, 0, 0x800).unwrap();
    s.destroy(&dev, 0x800, TO, A).unwrap();
    drop(neighbour);
    assert_eq!(d.iova().unwrap().stats().live, 0);
}

#[test]
fn defect_5_bounce_state_belongs_to_the_device_not_the_handle() {
    let (mem, iommu, d, first) = setup(false);
    let second = Device::translated(&iommu, DEV).unwrap();
    let buf = mem.alloc_frame().unwrap();
    mem.write(buf, &[0x11; PAGE_SIZE as usize]).unwrap();
    let usage = mem.usage();
    // A partial page: bounced through a private frame.
    let phys = PhysAddr::new(buf.as_u64() + 0x200);
    let dma = first.map_phys(phys, 0x100, FROM, A).unwrap();
    assert!(mem.usage().free_frames < usage.free_frames, "a bounce frame is in use");
    iommu.dma_write(DEV, dma, &[0xee; 0x100]).unwrap();
    second.unmap(dma, 0x100, FROM, A).unwrap();
    let mut back = vec![0u8; PAGE_SIZE as usize];
    mem.read(buf, &mut back).unwrap();
    assert!(back[0x200..0x300].iter().all(|&b| b == 0xee), "the device's write reached the buffer");
    assert!(back[..0x200].iter().chain(&back[0x300..]).all(|&b| b == 0x11), "and nothing else");
    assert_eq!(mem.usage(), usage, "the bounce frame was freed");
    assert_eq!(d.iova().unwrap().stats().live, 0);
}

#[test]
fn unmaps_with_another_direction_kind_or_device_are_refused_and_change_nothing() {
    let (mem, iommu, d, dev) = setup(true);
    let other_id = DeviceId(0x0601);
    iommu.register_device(other_id, true).unwrap();
    iommu.attach(other_id, &d).unwrap();
    let other = Device::translated(&iommu, other_id).unwrap();
    let p = mem.alloc_frame().unwrap();
    let dma = dev.map_phys(p, PAGE_SIZE, TO, A).unwrap();
    let sg = dev.map_sg(&[BioVec::page(mem.alloc_frame().unwrap())], TO, A).unwrap();
    let before = snap(&mem, &d);
    assert_eq!(
        dev.unmap(dma, PAGE_SIZE, FROM, A),
        Err(DmaError::DirectionMismatch { dma, mapped: TO, given: FROM })
    );
    assert_eq!(other.unmap(dma, PAGE_SIZE, TO, A), Err(DmaError::OtherDevice { dma, owner: DEV }));
    let sg_dma = sg.segments()[0].addr;
    assert_eq!(
        dev.unmap(sg_dma, PAGE_SIZE, TO, A),
        Err(DmaError::KindMismatch { dma: sg_dma, mapped: MapKind::Sg, given: MapKind::Single })
    );
    assert_eq!(
        dev.unmap_sg(&sg, FROM, A),
        Err(DmaError::DirectionMismatch { dma: sg_dma, mapped: TO, given: FROM })
    );
    assert_eq!(other.unmap_sg(&sg, TO, A), Err(DmaError::OtherDevice { dma: sg_dma, owner: DEV }));
    // A two-step state's IOVA is not a one-shot mapping.
    let s = IovaState::try_alloc(&dev, p, PAGE_SIZE).unwrap().unwrap();
    let before_state = snap(&mem, &d);
    assert_eq!(
        dev.unmap(s.addr(), PAGE_SIZE, TO, A),
        Err(DmaError::KindMismatch { dma: s.addr(), mapped: MapKind::TwoStep, given: MapKind::Single })
    );
    // Nor can the domain's plain API free an IOVA the DMA layer owns.
    assert!(matches!(d.free_iova(dma, PAGE_SIZE), Err(DomainError::Iova(_))));
    assert_eq!(snap(&mem, &d), before_state);
    drop(s);
    let after = snap(&mem, &d);
    // The state's IOVA went back (to a per-CPU cache: `cached` moves, `live` does not).
    assert_eq!(
        (after.usage, &after.leaves, after.iova.live),
        (before.usage, &before.leaves, before.iova.live)
    );
    // Syncs: inside the mapping only, in its direction.
    assert_eq!(dev.sync_for_cpu(dma, PAGE_SIZE, 0, PAGE_SIZE, TO), Ok(()));
    assert_eq!(
        dev.sync_for_device(dma, PAGE_SIZE, 0x800, 0x801, TO),
        Err(DmaError::SyncOutOfRange { dma, offset: 0x800, size: 0x801, mapped: PAGE_SIZE })
    );
    assert_eq!(
        dev.sync_for_cpu(dma, PAGE_SIZE, 0, 8, FROM),
        Err(DmaError::DirectionMismatch { dma, mapped: TO, given: FROM })
    );
    dev.unmap(dma, PAGE_SIZE, TO, A).unwrap();
    dev.unmap_sg(&sg, TO, A).unwrap();
    assert_eq!(dev.unmap(dma, PAGE_SIZE, TO, A), Err(DmaError::NotMapped { dma, size: PAGE_SIZE }));
    assert_eq!(d.iova().unwrap().stats().live, 0);
}

#[test]
fn a_direct_device_keeps_the_same_records() {
    let mem = Arc::new(PhysMem::new(16 << 20).unwrap());
    let dev = Device::direct(mem.clone(), DEV, 64, true).unwrap();
    let p = mem.alloc_frame().unwrap();
    let dma = dev.map_phys(p, 100, TO, A).unwrap();
    assert_eq!(dma.as_u64(), p.as_u64());
    assert_eq!(dev.unmap(dma, 99, TO, A), Err(DmaError::SizeMismatch { dma, mapped: 100, unmapped: 99 }));
    assert_eq!(
        dev.unmap(dma, 100, FROM, A),
        Err(DmaError::DirectionMismatch { dma, mapped: TO, given: FROM })
    );
    let clone = dev.clone();
    clone.unmap(dma, 100, TO, A).unwrap();
    assert_eq!(dev.unmap(dma, 100, TO, A), Err(DmaError::NotMapped { dma, size: 100 }));
}

#[test]
fn a_bounced_mapping_syncs_the_device_s_bytes_back_on_request() {
    let (mem, iommu, _d, dev) = setup(false);
    let buf = mem.alloc_frame().unwrap();
    mem.write(buf, &[0; PAGE_SIZE as usize]).unwrap();
    let phys = PhysAddr::new(buf.as_u64() + 0x10);
    let dma = dev.map_phys(phys, 0x40, Direction::Bidirectional, A).unwrap();
    iommu.dma_write(DEV, dma, &[0x5a; 0x40]).unwrap();
    let mut b = [0u8; 0x40];
    mem.read(phys, &mut b).unwrap();
    assert_eq!(b, [0; 0x40], "the device wrote the bounce frame, not the buffer");
    dev.sync_for_cpu(dma, 0x40, 0x8, 0x10, Direction::Bidirectional).unwrap();
    mem.read(phys, &mut b).unwrap();
    assert!(b[..8].iter().chain(&b[0x18..]).all(|&x| x == 0) && b[8..0x18].iter().all(|&x| x == 0x5a));
    // The CPU writes, syncs for the device: the device reads the CPU's bytes.
    mem.write(phys, &[0x77; 0x40]).unwrap();
    dev.sync_for_device(dma, 0x40, 0, 0x40, Direction::Bidirectional).unwrap();
    let mut d = [0u8; 0x40];
    iommu.dma_read(DEV, dma, &mut d).unwrap();
    assert_eq!(d, [0x77; 0x40]);
    dev.unmap(dma, 0x40, Direction::Bidirectional, A).unwrap();
}

#[test]
fn a_bounced_mapping_of_a_lazy_domain_is_unmapped_strictly() {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let lazy = DomainConfig { mode: vmbind::iommu::Mode::Lazy, ..DomainConfig::default() };
    let d = iommu.create_domain(lazy).unwrap();
    iommu.register_device(DEV, false).unwrap();
    iommu.attach(DEV, &d).unwrap();
    let dev = Device::translated(&iommu, DEV).unwrap();
    let buf = mem.alloc_frame().unwrap();
    let dma = dev.map_phys(PhysAddr::new(buf.as_u64() + 0x40), 0x80, FROM, A).unwrap();
    iommu.dma_write(DEV, dma, &[0x99; 0x80]).unwrap(); // cached in the IOTLB now
    dev.unmap(dma, 0x80, FROM, A).unwrap();
    // The bounce frame is free again: the device must not reach it through a stale entry.
    assert_eq!(
        iommu.dma_write(DEV, dma, &[0x66; 8]).unwrap_err().reason,
        vmbind::iommu::FaultReason::NotMapped,
        "no lazy window for a bounced mapping"
    );
    // (Its IOVA still waits for the flush, as lazy frees do: not handed out again until then.)
    let mut back = [0u8; 0x80];
    mem.read(PhysAddr::new(buf.as_u64() + 0x40), &mut back).unwrap();
    assert_eq!(back, [0x99; 0x80]);
}

#[test]
fn bounce_records_of_a_device_re_attached_elsewhere_stay_apart() {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let a = iommu.create_domain(DomainConfig::default()).unwrap();
    let b = iommu.create_domain(DomainConfig::default()).unwrap();
    iommu.register_device(DEV, false).unwrap();
    let dev = {
        iommu.attach(DEV, &a).unwrap();
        Device::translated(&iommu, DEV).unwrap()
    };
    let (buf_a, buf_b) = (mem.alloc_frame().unwrap(), mem.alloc_frame().unwrap());
    mem.write(buf_a, &[0xaa; PAGE_SIZE as usize]).unwrap();
    mem.write(buf_b, &[0xbb; PAGE_SIZE as usize]).unwrap();
    let dma_a = dev.map_phys(PhysAddr::new(buf_a.as_u64() + 0x10), 0x20, FROM, A).unwrap();
    iommu.dma_write(DEV, dma_a, &[0x1a; 0x20]).unwrap();
    iommu.detach(DEV).unwrap();
    iommu.attach(DEV, &b).unwrap();
    let dma_b = dev.map_phys(PhysAddr::new(buf_b.as_u64() + 0x10), 0x20, FROM, A).unwrap();
    assert_eq!(dma_a, dma_b, "both allocators hand out the same IOVA first");
    iommu.dma_write(DEV, dma_b, &[0x1b; 0x20]).unwrap();
    dev.unmap(dma_b, 0x20, FROM, A).unwrap();
    let mut x = [0u8; 0x20];
    mem.read(PhysAddr::new(buf_b.as_u64() + 0x10), &mut x).unwrap();
    assert_eq!(x, [0x1b; 0x20], "b's bytes came back to b's buffer");
    mem.read(PhysAddr::new(buf_a.as_u64() + 0x10), &mut x).unwrap();
    assert_eq!(x, [0xaa; 0x20], "a's buffer untouched: a's mapping is still live");
    iommu.detach(DEV).unwrap();
    iommu.attach(DEV, &a).unwrap();
    dev.unmap(dma_a, 0x20, FROM, A).unwrap();
    mem.read(PhysAddr::new(buf_a.as_u64() + 0x10), &mut x).unwrap();
    assert_eq!(x, [0x1a; 0x20], "a's mapping kept its own bounce");
    assert_eq!((a.iova().unwrap().stats().live, b.iova().unwrap().stats().live), (0, 0));
}
