//! The two-step DMA API (REFERENCES.md §1), rule by rule, the one-shot fallbacks, and round trips
//! read back by the device through the IOMMU.

use std::sync::Arc;

use proptest::prelude::*;
use vmbind::addr::{DmaAddr, PAGE_SIZE, PageSize, PhysAddr};
use vmbind::dma::{Attrs, Device, Direction, DmaError, DmaVec, IovaState};
use vmbind::iommu::{DeviceId, Domain, DomainConfig, FaultReason, Iommu, Mode};
use vmbind::mem::{BioVec, PhysMem};
use vmbind::nvme;
use vmbind::pt::Prot;

const DEV: DeviceId = DeviceId(0x0300);
const A: Attrs = Attrs { skip_cpu_sync: false, mmio: false };
const TO: Direction = Direction::ToDevice;

fn setup_mode(mode: Mode) -> (Arc<PhysMem>, Iommu, Arc<Domain>, Device) {
    let mem = Arc::new(PhysMem::new(128 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let dom = iommu.create_domain(DomainConfig { mode, ..DomainConfig::default() }).unwrap();
    iommu.register_device(DEV, true).unwrap();
    iommu.attach(DEV, &dom).unwrap();
    let dev = Device::translated(&iommu, DEV).unwrap();
    (mem, iommu, dom, dev)
}

fn setup() -> (Arc<PhysMem>, Iommu, Arc<Domain>, Device) {
    setup_mode(Mode::Strict)
}

fn state(dev: &Device, phys: PhysAddr, size: u64) -> IovaState {
    IovaState::try_alloc(dev, phys, size).unwrap().expect("translated device")
}

fn page(mem: &PhysMem, fill: u8) -> PhysAddr {
    let p = mem.alloc_frame().unwrap();
    mem.write(p, &[fill; PAGE_SIZE as usize]).unwrap();
    p
}

#[test]
fn two_step_try_alloc_returns_none_for_a_direct_device() {
    let mem = Arc::new(PhysMem::new(16 << 20).unwrap());
    let dev = Device::direct(mem.clone(), DEV, 64, true).unwrap();
    assert!(IovaState::try_alloc(&dev, PhysAddr::new(0x5000), 4096).unwrap().is_none());
    // The caller maps segment by segment instead: dma address = physical address.
    let p = mem.alloc_frame().unwrap();
    assert_eq!(dev.map_phys(p, 100, TO, A), Ok(DmaAddr::new(p.as_u64())));
}

#[test]
fn two_step_try_alloc_of_zero_bytes_fails() {
    let (_mem, _iommu, dom, dev) = setup();
    let before = dom.iova().unwrap().stats();
    assert_eq!(IovaState::try_alloc(&dev, PhysAddr::new(0x5000), 0).unwrap_err(), DmaError::ZeroSize);
    assert_eq!(dom.iova().unwrap().stats(), before);
}

#[test]
fn two_step_addr_keeps_the_sub_granule_offset_and_reserves_rounded() {
    let (_mem, _iommu, dom, dev) = setup();
    let s = state(&dev, PhysAddr::new(0x7123), 0x2000);
    assert_eq!(s.addr().as_u64() % PAGE_SIZE, 0x123);
    // 0x123 + 0x2000 rounds up to three granules.
    assert!(dom.iova().unwrap().is_allocated(DmaAddr::new(s.addr().as_u64() - 0x123)));
}

#[test]
fn two_step_first_link_may_start_off_a_granule_and_the_device_reads_the_bytes() {
    let (mem, iommu, _dom, dev) = setup();
    let p = page(&mem, 0xab);
    let q = page(&mem, 0xcd);
    let phys = PhysAddr::new(p.as_u64() + 0xf00);
    let mut s = state(&dev, phys, 0x100 + 0x800);
    s.link(&dev, phys, 0, 0x100, TO, A).unwrap();
    s.link(&dev, q, 0x100, 0x800, TO, A).unwrap();
    s.sync(&dev, 0, 0x900).unwrap();
    let mut buf = vec![0u8; 0x900];
    iommu.dma_read(DEV, s.addr(), &mut buf).unwrap();
    assert!(buf[..0x100].iter().all(|&b| b == 0xab));
    assert!(buf[0x100..].iter().all(|&b| b == 0xcd));
    s.destroy(&dev, 0x900, TO, A).unwrap();
}

#[test]
fn two_step_second_link_unaligned_fails() {
    let (mem, _iommu, dom, dev) = setup();
    let p = page(&mem, 1);
    let mut s = state(&dev, p, 3 * PAGE_SIZE);
    s.link(&dev, p, 0, PAGE_SIZE, TO, A).unwrap();
    let leaves = dom.table().unwrap().leaves();
    let odd = PhysAddr::new(page(&mem, 2).as_u64() + 8);
    assert_eq!(
        s.link(&dev, odd, PAGE_SIZE, 64, TO, A),
        Err(DmaError::UnalignedLink { offset: PAGE_SIZE, phys: odd })
    );
    assert_eq!(dom.table().unwrap().leaves(), leaves);
    assert_eq!(s.mapped(), PAGE_SIZE);
}

#[test]
fn two_step_middle_link_not_a_granule_multiple_fails() {
    let (mem, _iommu, dom, dev) = setup();
    let mut s = state(&dev, PhysAddr::new(0), 3 * PAGE_SIZE);
    s.link(&dev, page(&mem, 1), 0, 100, TO, A).unwrap(); // not a granule multiple: must be last
    let leaves = dom.table().unwrap().leaves();
    assert_eq!(
        s.link(&dev, page(&mem, 2), 100, PAGE_SIZE, TO, A),
        Err(DmaError::NotGranuleMultiple { offset: 100 })
    );
    assert_eq!(dom.table().unwrap().leaves(), leaves);
}

#[test]
fn two_step_link_beyond_the_reserved_size_fails() {
    let (mem, _iommu, dom, dev) = setup();
    let mut s = state(&dev, PhysAddr::new(0), 2 * PAGE_SIZE);
    let p = page(&mem, 1);
    assert_eq!(
        s.link(&dev, p, 2 * PAGE_SIZE, PAGE_SIZE, TO, A),
        Err(DmaError::BeyondReserved { offset: 2 * PAGE_SIZE, size: PAGE_SIZE, reserved: 2 * PAGE_SIZE })
    );
    assert!(s.link(&dev, p, PAGE_SIZE, PAGE_SIZE + 1, TO, A).is_err());
    assert!(dom.table().unwrap().leaves().is_empty());
}

#[test]
fn two_step_linking_twice_over_the_same_offset_fails() {
    let (mem, iommu, _dom, dev) = setup();
    let p = page(&mem, 1);
    let q = page(&mem, 2);
    let mut s = state(&dev, p, 2 * PAGE_SIZE);
    s.link(&dev, p, 0, PAGE_SIZE, TO, A).unwrap();
    assert_eq!(s.link(&dev, q, 0, PAGE_SIZE, TO, A), Err(DmaError::AlreadyLinked { offset: 0 }));
    s.sync(&dev, 0, PAGE_SIZE).unwrap();
    assert_eq!(iommu.dma_read_u64(DEV, s.addr()).unwrap(), 0x0101_0101_0101_0101, "the first link stands");
}

#[test]
fn two_step_use_after_destroy_fails() {
    let (mem, _iommu, dom, dev) = setup();
    let p = page(&mem, 1);
    let mut s = state(&dev, p, PAGE_SIZE);
    s.link(&dev, p, 0, PAGE_SIZE, TO, A).unwrap();
    s.destroy(&dev, PAGE_SIZE, TO, A).unwrap();
    let stats = dom.iova().unwrap().stats();
    assert_eq!(s.link(&dev, p, 0, PAGE_SIZE, TO, A), Err(DmaError::UseAfterDestroy));
    assert_eq!(s.sync(&dev, 0, PAGE_SIZE), Err(DmaError::UseAfterDestroy));
    assert_eq!(s.destroy(&dev, PAGE_SIZE, TO, A), Err(DmaError::UseAfterDestroy));
    assert_eq!(s.free(&dev), Err(DmaError::UseAfterDestroy));
    assert_eq!(dom.iova().unwrap().stats(), stats);
}

#[test]
fn two_step_destroy_unlinks_frees_and_every_iova_then_faults() {
    let (mem, iommu, dom, dev) = setup();
    let frames = mem.alloc_scattered(8, 3).unwrap();
    let bv = BioVec::from_frames(&frames);
    let mut s = state(&dev, frames[0], 8 * PAGE_SIZE);
    s.link_bvecs(&dev, 0, &bv, TO, A).unwrap();
    s.sync(&dev, 0, 8 * PAGE_SIZE).unwrap();
    let base = s.addr();
    for i in 0..8 {
        iommu.dma_read_u64(DEV, DmaAddr::new(base.as_u64() + i * PAGE_SIZE)).unwrap();
    }
    s.destroy(&dev, 8 * PAGE_SIZE, TO, A).unwrap();
    for i in 0..8 {
        let f = iommu.dma_read_u64(DEV, DmaAddr::new(base.as_u64() + i * PAGE_SIZE)).unwrap_err();
        assert_eq!(f.reason, FaultReason::NotMapped);
    }
    assert_eq!(dom.iova().unwrap().stats().live, 0);
    assert_eq!(dom.table().unwrap().table_pages(), 1);
}

#[test]
fn two_step_destroy_refuses_when_links_remain_beyond_mapped_len() {
    let (mem, _iommu, dom, dev) = setup();
    let mut s = state(&dev, PhysAddr::new(0), 2 * PAGE_SIZE);
    s.link(&dev, page(&mem, 1), 0, PAGE_SIZE, TO, A).unwrap();
    s.link(&dev, page(&mem, 2), PAGE_SIZE, PAGE_SIZE, TO, A).unwrap();
    assert_eq!(s.destroy(&dev, PAGE_SIZE, TO, A), Err(DmaError::StillLinked { bytes: 2 * PAGE_SIZE }));
    assert_eq!(dom.table().unwrap().leaves().len(), 2);
    assert_eq!(s.free(&dev), Err(DmaError::StillLinked { bytes: 2 * PAGE_SIZE }));
    s.unlink(&dev, PAGE_SIZE, PAGE_SIZE, TO, A).unwrap();
    s.destroy(&dev, PAGE_SIZE, TO, A).unwrap();
    assert!(dom.table().unwrap().leaves().is_empty());
}

#[test]
fn two_step_unlink_is_strict_even_in_a_lazy_domain() {
    let (mem, iommu, dom, dev) = setup_mode(Mode::Lazy);
    let p = page(&mem, 9);
    let mut s = state(&dev, p, PAGE_SIZE);
    s.link(&dev, p, 0, PAGE_SIZE, TO, A).unwrap();
    s.sync(&dev, 0, PAGE_SIZE).unwrap();
    iommu.dma_read_u64(DEV, s.addr()).unwrap();
    s.unlink(&dev, 0, PAGE_SIZE, TO, A).unwrap();
    assert_eq!(iommu.dma_read_u64(DEV, s.addr()).unwrap_err().reason, FaultReason::NotMapped);
    assert_eq!(dom.pending_flush(), 0);
    s.free(&dev).unwrap();
}

#[test]
fn two_step_dropping_a_state_with_links_unlinks_and_frees_it() {
    let (mem, iommu, dom, dev) = setup();
    let p = page(&mem, 1);
    let addr;
    {
        let mut s = state(&dev, p, PAGE_SIZE);
        s.link(&dev, p, 0, PAGE_SIZE, TO, A).unwrap();
        addr = s.addr();
    }
    assert!(iommu.dma_read_u64(DEV, addr).is_err());
    assert_eq!(dom.iova().unwrap().stats().live, 0, "no IOVA leaked");
    assert!(dom.table().unwrap().leaves().is_empty());
}

#[test]
fn two_step_direction_sets_the_permissions() {
    let (mem, iommu, _dom, dev) = setup();
    let p = page(&mem, 1);
    let mut s = state(&dev, p, PAGE_SIZE);
    s.link(&dev, p, 0, PAGE_SIZE, Direction::ToDevice, A).unwrap();
    let f = iommu.dma_write_u64(DEV, s.addr(), 0).unwrap_err();
    assert!(matches!(f.reason, FaultReason::NotPermitted { .. }));
    let q = page(&mem, 2);
    let mut w = state(&dev, q, PAGE_SIZE);
    w.link(&dev, q, 0, PAGE_SIZE, Direction::FromDevice, A).unwrap();
    iommu.dma_write_u64(DEV, w.addr(), 0x55).unwrap();
    assert!(iommu.dma_read_u64(DEV, w.addr()).is_err());
    assert_eq!(mem.read_u64(q).unwrap(), 0x55);
}

#[test]
fn two_step_rejects_peer_to_peer_mmio_and_other_devices() {
    let (mem, iommu, _dom, dev) = setup();
    let p = page(&mem, 1);
    let mut s = state(&dev, p, PAGE_SIZE);
    let mmio = Attrs { mmio: true, ..A };
    assert_eq!(s.link(&dev, p, 0, PAGE_SIZE, TO, mmio), Err(DmaError::PeerToPeer(p)));
    let other_dom = iommu.create_domain(DomainConfig::default()).unwrap();
    iommu.register_device(DeviceId(9), true).unwrap();
    iommu.attach(DeviceId(9), &other_dom).unwrap();
    let other = Device::translated(&iommu, DeviceId(9)).unwrap();
    assert_eq!(s.link(&other, p, 0, PAGE_SIZE, TO, A), Err(DmaError::WrongDevice(DeviceId(9))));
}

fn untrusted() -> (Arc<PhysMem>, Iommu, Device) {
    let (mem, iommu, _dom, _dev) = setup();
    let dom2 = iommu.create_domain(DomainConfig::default()).unwrap();
    iommu.register_device(DeviceId(7), false).unwrap();
    iommu.attach(DeviceId(7), &dom2).unwrap();
    let u = Device::translated(&iommu, DeviceId(7)).unwrap();
    (mem, iommu, u)
}

#[test]
fn untrusted_to_device_bounce_hides_the_rest_of_a_shared_page() {
    let (mem, iommu, u) = untrusted();
    let p = page(&mem, 0x5e); // 0x5e: someone else's secret sharing the page
    let buf = PhysAddr::new(p.as_u64() + 0x100);
    mem.write(buf, &[0x42; 0x80]).unwrap();
    let d = u.map_phys(buf, 0x80, TO, A).unwrap();
    let mut seen = [0u8; 0x80];
    iommu.dma_read(DeviceId(7), d, &mut seen).unwrap();
    assert_eq!(seen, [0x42; 0x80]);
    // Everything else the device can reach in that granule is zeros, not the secret.
    let mut around = vec![0u8; PAGE_SIZE as usize];
    iommu.dma_read(DeviceId(7), DmaAddr::new(d.as_u64() - 0x100), &mut around).unwrap();
    assert!(around[..0x100].iter().chain(&around[0x180..]).all(|&b| b == 0));
    u.unmap(d, 0x80, TO, A).unwrap();
    assert_eq!(u.unmap(d, 0x80, TO, A), Err(DmaError::NotMapped { dma: d, size: 0x80 }));
    // Whole pages need no bounce.
    let w = u.map_phys(p, PAGE_SIZE, TO, A).unwrap();
    assert_eq!(iommu.dma_read_u64(DeviceId(7), w).unwrap(), 0x5e5e_5e5e_5e5e_5e5e);
    u.unmap(w, PAGE_SIZE, TO, A).unwrap();
}

#[test]
fn untrusted_from_device_bounce_copies_back_only_the_buffer_on_unmap() {
    let (mem, iommu, u) = untrusted();
    let p = page(&mem, 0x11);
    let buf = PhysAddr::new(p.as_u64() + 0xff0);
    let q = page(&mem, 0x22);
    // 0x20 bytes: the last 16 of page p and the first 16 of page q (physically adjacent or not,
    // the mapping only needs [buf, buf + 0x20) to be one physical range here).
    let buf_len = 0x10;
    let d = u.map_phys(buf, buf_len, Direction::FromDevice, A).unwrap();
    // The device writes its whole granule.
    iommu
        .dma_write(DeviceId(7), DmaAddr::new(d.as_u64() - 0xff0), &vec![0x99u8; PAGE_SIZE as usize])
        .unwrap();
    // Before unmap, memory is untouched.
    assert_eq!(mem.read_u64(PhysAddr::new(p.as_u64() + 0xff0)).unwrap(), 0x1111_1111_1111_1111);
    u.unmap(d, buf_len, Direction::FromDevice, A).unwrap();
    let mut back = vec![0u8; PAGE_SIZE as usize];
    mem.read(p, &mut back).unwrap();
    assert!(back[..0xff0].iter().all(|&b| b == 0x11), "outside the buffer: untouched");
    assert!(back[0xff0..].iter().all(|&b| b == 0x99), "the buffer: what the device wrote");
    assert_eq!(mem.read_u64(q).unwrap(), 0x2222_2222_2222_2222);
}

#[test]
fn untrusted_two_step_links_bounce_head_and_tail() {
    let (mem, iommu, u) = untrusted();
    let frames = mem.alloc_scattered(3, 12).unwrap();
    for (i, f) in frames.iter().enumerate() {
        mem.write(*f, &[0xa0 + i as u8; PAGE_SIZE as usize]).unwrap();
    }
    // Head: the last 0x300 bytes of frame 0; middle: frame 1; tail: the first 0x80 of frame 2.
    let bv = [
        BioVec { phys: frames[0], offset: 0xd00, len: 0x300 },
        BioVec::page(frames[1]),
        BioVec { phys: frames[2], offset: 0, len: 0x80 },
    ];
    let total = 0x300 + PAGE_SIZE + 0x80;
    let dir = Direction::Bidirectional;
    let mut s = IovaState::try_alloc(&u, bv[0].start().unwrap(), total).unwrap().unwrap();
    s.link_bvecs(&u, 0, &bv, dir, A).unwrap();
    s.sync(&u, 0, total).unwrap();
    let mut seen = vec![0u8; total as usize];
    iommu.dma_read(DeviceId(7), s.addr(), &mut seen).unwrap();
    assert_eq!(seen, mem.read_bvecs(&bv).unwrap());
    // Outside the buffer in the head granule: zeros, not frame 0's other bytes.
    assert_eq!(iommu.dma_read_u64(DeviceId(7), DmaAddr::new(s.addr().as_u64() - 0xd00)).unwrap(), 0);
    // The device writes over the head part; destroy copies it back.
    iommu.dma_write(DeviceId(7), s.addr(), &[0x77; 0x300]).unwrap();
    s.destroy(&u, total, dir, A).unwrap();
    let mut f0 = vec![0u8; PAGE_SIZE as usize];
    mem.read(frames[0], &mut f0).unwrap();
    assert!(f0[..0xd00].iter().all(|&b| b == 0xa0));
    assert!(f0[0xd00..].iter().all(|&b| b == 0x77));
}

#[test]
fn direct_devices_respect_their_address_width() {
    let mem = Arc::new(PhysMem::new(16 << 20).unwrap());
    let dev = Device::direct(mem, DEV, 20, true).unwrap();
    assert_eq!(dev.map_phys(PhysAddr::new(0xf_f000), 0x1000, TO, A), Ok(DmaAddr::new(0xf_f000)));
    assert_eq!(
        dev.map_phys(PhysAddr::new(0xf_f000), 0x1001, TO, A),
        Err(DmaError::AddressLimit { phys: PhysAddr::new(0xf_f000), size: 0x1001, bits: 20 })
    );
    let bv = [
        BioVec { phys: PhysAddr::new(0x1000), offset: 0, len: 0x1000 },
        BioVec { phys: PhysAddr::new(0x2000), offset: 0, len: 0x800 },
        BioVec { phys: PhysAddr::new(0x8000), offset: 0x10, len: 0x10 },
    ];
    let v = dev.map_sg(&bv, TO, A).unwrap();
    assert_eq!(v.len(), 2, "physically adjacent segments merge");
    assert_eq!(v.total_len(), 0x1810);
    assert_eq!(Device::direct(dev.mem().clone(), DEV, 8, true).unwrap_err(), DmaError::BadAddressWidth(8));
}

#[test]
fn map_sg_places_the_array_in_one_iova_range_and_merges_it() {
    let (mem, iommu, dom, dev) = setup();
    let frames = mem.alloc_scattered(5, 8).unwrap();
    for (i, f) in frames.iter().enumerate() {
        mem.write(*f, &[i as u8 + 1; PAGE_SIZE as usize]).unwrap();
    }
    let mut bv = BioVec::from_frames(&frames);
    bv[0] = BioVec { phys: frames[0], offset: 0x800, len: 0x800 };
    bv[4].len = 0x10;
    let v = dev.map_sg(&bv, TO, A).unwrap();
    assert_eq!(v.len(), 1, "page-aligned joins merge into one DMA segment");
    assert_eq!(v.total_len(), 0x800 + 3 * PAGE_SIZE + 0x10);
    let mut buf = vec![0u8; v.total_len() as usize];
    iommu.dma_read(DEV, v.segments()[0].addr, &mut buf).unwrap();
    assert_eq!(buf, mem.read_bvecs(&bv).unwrap());
    let pages: Vec<u64> = v.page_addrs(PAGE_SIZE).unwrap().map(|a| a.as_u64()).collect();
    assert_eq!(pages.len(), 5);
    assert_eq!(pages[0] % PAGE_SIZE, 0x800);
    assert!(pages[1..].iter().all(|p| p % PAGE_SIZE == 0));
    dev.unmap_sg(&v, TO, A).unwrap();
    assert!(dev.unmap_sg(&v, TO, A).is_err());
    assert_eq!(dom.iova().unwrap().stats().live, 0);
}

#[test]
fn batched_and_per_bvec_linking_produce_identical_tables() {
    const PAGES: usize = 700;
    let (mem, iommu, dom, dev) = setup();
    let frames = mem.alloc_scattered(PAGES, 4).unwrap();
    // Every 8-byte word of the buffer is distinct (page number and word number), so a page out
    // of place or missing reads back different bytes.
    for (i, f) in frames.iter().enumerate() {
        let words: Vec<u8> = (0..PAGE_SIZE / 8)
            .flat_map(|w| (0xb0f0_0000_0000_0000 | (i as u64) << 16 | w).to_le_bytes())
            .collect();
        mem.write(*f, &words).unwrap();
    }
    let bv = BioVec::from_frames(&frames);
    let len = PAGES as u64 * PAGE_SIZE;
    let expected = mem.read_bvecs(&bv).unwrap();
    // The domain's leaves with their IOVAs made relative to the state's, so that two states at
    // different IOVAs compare; and what the device reads at the state's IOVA.
    let linked = |s: &IovaState| {
        assert_eq!(s.addr().as_u64() % PAGE_SIZE, 0, "a page-aligned buffer starts on a granule");
        let leaves: Vec<_> = dom
            .table()
            .unwrap()
            .leaves()
            .into_iter()
            .map(|l| (l.va.as_u64() - s.addr().as_u64(), l.pa, l.size, l.prot))
            .collect();
        s.sync(&dev, 0, len).unwrap();
        let mut seen = vec![0u8; len as usize];
        iommu.dma_read(DEV, s.addr(), &mut seen).unwrap();
        (leaves, seen)
    };

    let mut a = state(&dev, frames[0], len);
    assert_eq!(a.link_bvecs(&dev, 0, &bv, TO, A).unwrap(), len);
    let (batched, batched_bytes) = linked(&a);
    a.destroy(&dev, len, TO, A).unwrap();
    assert!(dom.table().unwrap().leaves().is_empty(), "destroy unmapped everything");

    let mut b = state(&dev, frames[0], len);
    for (i, f) in frames.iter().enumerate() {
        b.link(&dev, *f, i as u64 * PAGE_SIZE, PAGE_SIZE, TO, A).unwrap();
    }
    assert_eq!(b.mapped(), len);
    let (single, single_bytes) = linked(&b);
    b.destroy(&dev, len, TO, A).unwrap();

    // Not two empty tables: one 4 KiB read-only leaf per page linked, in order, at its frame.
    assert_eq!(batched.len(), PAGES, "batched linking: one leaf per page");
    assert_eq!(single.len(), PAGES, "per-bvec linking: one leaf per page");
    for (i, (x, y)) in batched.iter().zip(&single).enumerate() {
        assert_eq!(*x, (i as u64 * PAGE_SIZE, frames[i], PageSize::Size4K, Prot::READ), "batched leaf {i}");
        assert_eq!(x, y, "leaf {i}");
    }
    // And the device reads the buffer's bytes through both.
    assert_eq!(batched_bytes.len(), expected.len());
    assert!(batched_bytes == expected, "the device reads the buffer through the batched link");
    assert!(single_bytes == expected, "the device reads the buffer through the per-bvec links");
}

/// A byte buffer cut into bio_vecs within the two-step rules: the first may start anywhere in a
/// page, the middle ones are whole pages, the last may end anywhere.
fn cut(mem: &PhysMem, data: &[u8], head: u64, seed: u64) -> Vec<BioVec> {
    let first_len = (PAGE_SIZE - head).min(data.len() as u64);
    let rest = data.len() as u64 - first_len;
    let frames = mem.alloc_scattered(1 + rest.div_ceil(PAGE_SIZE) as usize, seed).unwrap();
    let mut out = vec![BioVec { phys: frames[0], offset: head as u32, len: first_len as u32 }];
    mem.write(PhysAddr::new(frames[0].as_u64() + head), &data[..first_len as usize]).unwrap();
    for (i, chunk) in data[first_len as usize..].chunks(PAGE_SIZE as usize).enumerate() {
        mem.write(frames[i + 1], chunk).unwrap();
        out.push(BioVec { phys: frames[i + 1], offset: 0, len: chunk.len() as u32 });
    }
    out
}

/// What the controller reads back from a DmaVec through PRP (when PRP can express it) and
/// through SGL, both built from a pre-mapped list pool.
fn through_prp_and_sgl(
    iommu: &Iommu,
    pool: &mut nvme::ListPool,
    v: &DmaVec,
    len: u64,
) -> (Option<Vec<u8>>, Vec<u8>) {
    let prp = match nvme::build_prp(pool, v, PAGE_SIZE, 64 << 20) {
        Ok(p) => {
            let bytes = nvme::read_prp(iommu, DEV, p.prp1, p.prp2, len, PAGE_SIZE).unwrap();
            pool.release(p.lists);
            Some(bytes)
        }
        Err(nvme::NvmeError::NotPrpExpressible { .. } | nvme::NvmeError::Unaligned(_)) => None,
        Err(e) => panic!("{e}"),
    };
    let sgl = nvme::build_sgl(pool, v, 64 << 20, nvme::SglOptions { chain: true }).unwrap();
    let bytes = nvme::read_sgl(iommu, DEV, &sgl.sgl1, len).unwrap();
    pool.release(sgl.tables);
    (prp, bytes)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random buffers cut into bio_vecs within the rules (random head offset and length), mapped
    /// by the two-step API and separately by map_sg, read back by the device directly and by
    /// the NVMe decoders through PRP and SGL; after destroy / unmap every IOVA faults.
    #[test]
    fn random_buffers_round_trip_through_both_paths(len in 1usize..40_000, head in 0u64..1024, seed in any::<u64>(), lazy in any::<bool>()) {
        let head = head * 4;
        let (mem, iommu, dom, dev) = setup_mode(if lazy { Mode::Lazy } else { Mode::Strict });
        let mut pool = nvme::ListPool::new(&dev, 8).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i as u64 * 31 + seed) as u8).collect();
        let bv = cut(&mem, &data, head, seed);
        // Two-step, batched.
        let total = len as u64;
        let mut s = IovaState::try_alloc(&dev, bv[0].start().unwrap(), total).unwrap().unwrap();
        prop_assert_eq!(s.link_bvecs(&dev, 0, &bv, TO, A).unwrap(), total);
        s.sync(&dev, 0, total).unwrap();
        let mut back = vec![0u8; len];
        iommu.dma_read(DEV, s.addr(), &mut back).unwrap();
        prop_assert_eq!(&back, &data);
        let one = DmaVec::from_segment(s.addr(), total).unwrap();
        let (prp, sgl) = through_prp_and_sgl(&iommu, &mut pool, &one, total);
        prop_assert_eq!(prp.as_ref(), Some(&data), "one segment: PRP always expresses it");
        prop_assert_eq!(&sgl, &data);
        let addr = s.addr();
        s.destroy(&dev, total, TO, A).unwrap();
        dom.flush();
        prop_assert!(iommu.dma_read_u64(DEV, addr).is_err(), "after destroy every IOVA faults");
        // One-shot map_sg.
        let v = dev.map_sg(&bv, TO, A).unwrap();
        let mut back = Vec::new();
        for seg in v.segments() {
            let mut b = vec![0u8; seg.len as usize];
            iommu.dma_read(DEV, seg.addr, &mut b).unwrap();
            back.extend(b);
        }
        prop_assert_eq!(&back, &data);
        let (prp, sgl) = through_prp_and_sgl(&iommu, &mut pool, &v, total);
        if let Some(p) = prp {
            prop_assert_eq!(&p, &data);
        }
        prop_assert_eq!(&sgl, &data);
        let first = v.segments()[0].addr;
        dev.unmap_sg(&v, TO, A).unwrap();
        dom.flush();
        prop_assert!(iommu.dma_read_u64(DEV, first).is_err());
        drop(pool);
        prop_assert_eq!(dom.iova().unwrap().stats().live, 0);
        prop_assert_eq!(dom.table().unwrap().table_pages(), 1);
    }
}

#[test]
fn block_requests_with_aligned_joins_become_one_iova_segment() {
    let (mem, iommu, dom, dev) = setup();
    let frames = mem.alloc_scattered(4, 31).unwrap();
    for (i, f) in frames.iter().enumerate() {
        mem.write(*f, &[i as u8 + 1; PAGE_SIZE as usize]).unwrap();
    }
    let mut bv = BioVec::from_frames(&frames);
    bv[0] = BioVec { phys: frames[0], offset: 0x200, len: 0xe00 };
    bv[3].len = 0x100;
    let m = dev.blk_rq_map(&bv, TO, A).unwrap();
    assert!(m.uses_iova());
    assert_eq!(m.segments().len(), 1);
    let seg = m.segments().segments()[0];
    let mut back = vec![0u8; seg.len as usize];
    iommu.dma_read(DEV, seg.addr, &mut back).unwrap();
    assert_eq!(back, mem.read_bvecs(&bv).unwrap());
    dev.blk_rq_unmap(m, TO, A).unwrap();
    assert!(iommu.dma_read_u64(DEV, seg.addr).is_err());
    assert_eq!(dom.iova().unwrap().stats().live, 0);
}

#[test]
fn block_requests_with_an_unaligned_join_map_segment_by_segment() {
    let (mem, iommu, dom, dev) = setup();
    let frames = mem.alloc_scattered(3, 32).unwrap();
    for (i, f) in frames.iter().enumerate() {
        mem.write(*f, &[i as u8 + 1; PAGE_SIZE as usize]).unwrap();
    }
    let bv = [
        BioVec { phys: frames[0], offset: 0, len: 0x800 }, // ends mid-page: an unaligned join
        BioVec { phys: frames[1], offset: 0x100, len: 0x200 },
        BioVec::page(frames[2]),
    ];
    let m = dev.blk_rq_map(&bv, TO, A).unwrap();
    assert!(!m.uses_iova());
    assert_eq!(m.segments().len(), 3);
    let mut back = Vec::new();
    for seg in m.segments().segments() {
        let mut b = vec![0u8; seg.len as usize];
        iommu.dma_read(DEV, seg.addr, &mut b).unwrap();
        back.extend(b);
    }
    assert_eq!(back, mem.read_bvecs(&bv).unwrap());
    dev.blk_rq_unmap(m, TO, A).unwrap();
    assert_eq!(dom.iova().unwrap().stats().live, 0);
    // A direct device always takes the per-segment path.
    let direct = Device::direct(mem.clone(), DeviceId(0x31), 64, true).unwrap();
    let m = direct.blk_rq_map(&BioVec::from_frames(&frames), TO, A).unwrap();
    assert!(!m.uses_iova());
    direct.blk_rq_unmap(m, TO, A).unwrap();
}

#[test]
fn one_shot_unmap_with_a_wrong_size_or_twice_changes_nothing() {
    let (mem, iommu, dom, dev) = setup();
    let p = page(&mem, 0x61);
    let d = dev.map_phys(p, 3 * PAGE_SIZE, TO, A).unwrap();
    let wrong = dev.unmap(d, PAGE_SIZE, TO, A).unwrap_err();
    assert_eq!(wrong, DmaError::SizeMismatch { dma: d, mapped: 3 * PAGE_SIZE, unmapped: PAGE_SIZE });
    assert_eq!(iommu.dma_read_u64(DEV, d).unwrap(), 0x6161_6161_6161_6161, "still mapped");
    dev.unmap(d, 3 * PAGE_SIZE, TO, A).unwrap();
    assert_eq!(dev.unmap(d, 3 * PAGE_SIZE, TO, A), Err(DmaError::NotMapped { dma: d, size: 3 * PAGE_SIZE }));
    assert_eq!(
        dev.unmap(DmaAddr::new(0x5000_0000), PAGE_SIZE, TO, A),
        Err(DmaError::NotMapped { dma: DmaAddr::new(0x5000_0000), size: PAGE_SIZE })
    );
    assert_eq!(dom.iova().unwrap().stats().live, 0);
    assert!(dom.table().unwrap().leaves().is_empty());
}
