//! The IOMMU's promises: isolation between domains, permissions, strict and lazy unmap, detach,
//! and bad input that changes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbind::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use vmbind::iommu::iova::IovaError;
use vmbind::iommu::{
    Access, DeviceId, DmaFault, Domain, DomainConfig, DomainError, DomainKind, FLUSH_QUEUE_MAX, FaultReason,
    GatherError, Iommu, IommuError, Mode,
};
use vmbind::mem::PhysMem;
use vmbind::pt::{MapError, MapSource, Prot};

const A: DeviceId = DeviceId(0x0100);
const B: DeviceId = DeviceId(0x0200);

fn setup(mode: Mode) -> (Arc<PhysMem>, Iommu, Arc<Domain>, Arc<Domain>) {
    setup_with(DomainConfig { mode, ..DomainConfig::default() })
}

/// A lazy domain whose time bound never fires during a test, so the window can be observed.
fn lazy_no_timer() -> DomainConfig {
    DomainConfig { mode: Mode::Lazy, flush_timeout: Duration::from_secs(3600), ..DomainConfig::default() }
}

fn setup_with(cfg: DomainConfig) -> (Arc<PhysMem>, Iommu, Arc<Domain>, Arc<Domain>) {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let d1 = iommu.create_domain(cfg).unwrap();
    let d2 = iommu.create_domain(cfg).unwrap();
    iommu.register_device(A, true).unwrap();
    iommu.register_device(B, false).unwrap();
    iommu.attach(A, &d1).unwrap();
    iommu.attach(B, &d2).unwrap();
    (mem, iommu, d1, d2)
}

fn page_with(mem: &PhysMem, byte: u8) -> PhysAddr {
    let pa = mem.alloc_frame().unwrap();
    mem.write(pa, &[byte; PAGE_SIZE as usize]).unwrap();
    pa
}

#[test]
fn a_device_cannot_reach_iovas_mapped_only_in_another_domain() {
    let (mem, iommu, d1, d2) = setup(Mode::Strict);
    let secret = page_with(&mem, 0x5e);
    let iova = d2.alloc_iova(PAGE_SIZE).unwrap();
    d2.map(iova, MapSource::Pages(&[secret]), Prot::RW).unwrap();
    // B (domain 2) sees it; that also puts it in the shared IOTLB.
    assert_eq!(iommu.dma_read_u64(B, iova).unwrap(), 0x5e5e_5e5e_5e5e_5e5e);
    // A (domain 1) reads nothing and writes nothing at the same IOVA.
    let mut buf = [0xaau8; 64];
    let f = iommu.dma_read(A, iova, &mut buf).unwrap_err();
    assert_eq!(f, DmaFault { device: A, iova, access: Access::Read, reason: FaultReason::NotMapped });
    assert_eq!(buf, [0xaa; 64]);
    let f = iommu.dma_write(A, iova, &[0u8; 64]).unwrap_err();
    assert_eq!(f.reason, FaultReason::NotMapped);
    let mut check = [0u8; 64];
    mem.read(secret, &mut check).unwrap();
    assert_eq!(check, [0x5e; 64]);
    assert_eq!(d1.faults().records().len(), 2);
    assert!(d2.faults().records().is_empty());
    // Whatever IOVA A tries in its own (empty) domain, it faults.
    for probe in [iova.as_u64(), PAGE_SIZE, (1 << 47) + 0x1000] {
        assert!(iommu.dma_read_u64(A, DmaAddr::new(probe)).is_err());
    }
}

#[test]
fn after_detach_the_device_reaches_nothing_even_cached() {
    let (mem, iommu, _d1, d2) = setup(Mode::Strict);
    let pa = page_with(&mem, 1);
    let iova = d2.alloc_iova(PAGE_SIZE).unwrap();
    d2.map(iova, MapSource::Pages(&[pa]), Prot::RW).unwrap();
    iommu.dma_read_u64(B, iova).unwrap();
    assert!(iommu.iotlb().count(d2.id()) > 0);
    assert_eq!(iommu.detach(B), Ok(d2.id()));
    assert_eq!(iommu.iotlb().count(d2.id()), 0, "detach invalidates the domain's IOTLB entries");
    let f = iommu.dma_read_u64(B, iova).unwrap_err();
    assert_eq!(f.reason, FaultReason::NotAttached);
    assert!(iommu.dma_write_u64(B, iova, 7).is_err());
    assert_eq!(iommu.faults().records().len(), 2, "faults without a domain go to the IOMMU's log");
    assert_eq!(iommu.detach(B), Err(IommuError::NotAttached(B)));
    // Re-attached, it works again.
    iommu.attach(B, &d2).unwrap();
    assert_eq!(iommu.dma_read_u64(B, iova).unwrap(), 0x0101_0101_0101_0101);
}

#[test]
fn read_only_refuses_writes_and_write_only_refuses_reads_with_fault_records() {
    let (mem, iommu, d1, _d2) = setup(Mode::Strict);
    let ro = page_with(&mem, 3);
    let wo = page_with(&mem, 4);
    let iova = d1.alloc_iova(2 * PAGE_SIZE).unwrap();
    d1.map(iova, MapSource::Pages(&[ro]), Prot::READ).unwrap();
    let iova_wo = DmaAddr::new(iova.as_u64() + PAGE_SIZE);
    d1.map(iova_wo, MapSource::Pages(&[wo]), Prot::WRITE).unwrap();

    assert_eq!(iommu.dma_read_u64(A, iova).unwrap(), 0x0303_0303_0303_0303);
    let f = iommu.dma_write_u64(A, iova, 0).unwrap_err();
    assert_eq!(f.reason, FaultReason::NotPermitted { prot: Prot::READ });
    iommu.dma_write_u64(A, iova_wo, 0x1122).unwrap();
    assert_eq!(mem.read_u64(wo).unwrap(), 0x1122);
    let f = iommu.dma_read_u64(A, iova_wo).unwrap_err();
    assert_eq!(f.reason, FaultReason::NotPermitted { prot: Prot::WRITE });
    // A write spanning both pages is refused whole: the writable half is not written either.
    let f = iommu.dma_write(A, DmaAddr::new(iova_wo.as_u64() - 8), &[9u8; 16]).unwrap_err();
    assert_eq!(f.iova, DmaAddr::new(iova_wo.as_u64() - 8));
    assert_eq!(mem.read_u64(wo).unwrap(), 0x1122);
    let recs = d1.faults().records();
    assert_eq!(recs.len(), 3);
    assert_eq!(
        recs[0].to_string(),
        format!("DMA fault: dev 01:00.0 Write at dma {:#x}: NotPermitted {{ prot: r-- }}", iova.as_u64())
    );
    assert_eq!(
        (recs[0].access, recs[1].access, recs[2].access),
        (Access::Write, Access::Read, Access::Write)
    );
}

#[test]
fn strict_unmap_faults_every_later_access_even_one_cached() {
    let (mem, iommu, d1, _d2) = setup(Mode::Strict);
    let pages: Vec<PhysAddr> = (0..8).map(|i| page_with(&mem, i as u8 + 1)).collect();
    let iova = d1.alloc_iova(8 * PAGE_SIZE).unwrap();
    d1.map(iova, MapSource::Pages(&pages), Prot::RW).unwrap();
    for i in 0..8 {
        iommu.dma_read_u64(A, DmaAddr::new(iova.as_u64() + i * PAGE_SIZE)).unwrap();
    }
    assert_eq!(iommu.iotlb().count(d1.id()), 8);
    assert_eq!(d1.unmap(iova, 8 * PAGE_SIZE), Ok(8 * PAGE_SIZE));
    assert_eq!(iommu.iotlb().count(d1.id()), 0);
    for i in 0..8 {
        let va = DmaAddr::new(iova.as_u64() + i * PAGE_SIZE + 16);
        assert_eq!(iommu.dma_read_u64(A, va).unwrap_err().reason, FaultReason::NotMapped);
    }
    assert_eq!(d1.table().unwrap().table_pages(), 1, "strict mode frees the tables at once");
}

#[test]
fn lazy_unmap_keeps_the_iova_out_of_use_until_the_flush_completes() {
    let (mem, iommu, d1, _d2) = setup_with(lazy_no_timer());
    let pa = page_with(&mem, 0x77);
    let iova = d1.alloc_iova(PAGE_SIZE).unwrap();
    d1.map(iova, MapSource::Pages(&[pa]), Prot::RW).unwrap();
    iommu.dma_read_u64(A, iova).unwrap();
    d1.unmap(iova, PAGE_SIZE).unwrap();
    d1.free_iova(iova, PAGE_SIZE).unwrap();
    assert_eq!(
        d1.free_iova(iova, PAGE_SIZE),
        Err(DomainError::Iova(IovaError::NotAllocated { addr: iova, size: PAGE_SIZE }))
    );
    assert_eq!(d1.pending_flush(), 2);
    // The window: the cached translation still works until the flush.
    assert_eq!(iommu.dma_read_u64(A, iova).unwrap(), 0x7777_7777_7777_7777);
    // Not handed out again meanwhile, however many allocations come.
    let others: Vec<DmaAddr> = (0..64).map(|_| d1.alloc_iova(PAGE_SIZE).unwrap()).collect();
    assert!(!others.contains(&iova));
    for o in &others {
        d1.free_iova(*o, PAGE_SIZE).unwrap();
    }
    d1.flush();
    assert_eq!(d1.pending_flush(), 0);
    assert_eq!(iommu.dma_read_u64(A, iova).unwrap_err().reason, FaultReason::NotMapped);
    // Now it can come back.
    let again: Vec<DmaAddr> = (0..200).map(|_| d1.alloc_iova(PAGE_SIZE).unwrap()).collect();
    assert!(again.contains(&iova));
}

#[test]
fn lazy_mode_flushes_within_its_time_bound_by_itself() {
    // The flusher must empty the queue once its oldest entry is `timeout` old: never before (the
    // unmap stays queued and its cached translation usable), and well before `10 × timeout`,
    // which a 10× regression of the bound cannot meet. Three tries absorb a noisy machine.
    let timeout = Duration::from_millis(20);
    let bound = 10 * timeout;
    let cfg = DomainConfig { mode: Mode::Lazy, flush_timeout: timeout, ..DomainConfig::default() };
    let (mem, iommu, d1, _d2) = setup_with(cfg);
    let pa = page_with(&mem, 0x11);
    let mut tries = Vec::new();
    for _ in 0..3 {
        let iova = d1.alloc_iova(PAGE_SIZE).unwrap();
        d1.map(iova, MapSource::Pages(&[pa]), Prot::RW).unwrap();
        assert_eq!(iommu.dma_read_u64(A, iova).unwrap(), 0x1111_1111_1111_1111);
        let t0 = Instant::now();
        d1.unmap(iova, PAGE_SIZE).unwrap();
        let (pending, stale) = (d1.pending_flush(), iommu.dma_read_u64(A, iova));
        // The queue's clock started after `t0`, so if less than `timeout` has passed since, no
        // timed flush can have run before these two observations.
        if t0.elapsed() < timeout {
            assert_eq!(pending, 1, "the unmap is queued, not flushed at once");
            assert_eq!(stale, Ok(0x1111_1111_1111_1111), "the lazy window: still cached");
        }
        let flushed_after = loop {
            if d1.pending_flush() == 0 {
                break t0.elapsed();
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "the flusher never drained the queue");
            std::thread::sleep(Duration::from_millis(1));
        };
        // Nothing else flushes this queue (it is far from full, no map overlaps it), so the
        // timer did, and not before its time.
        assert!(flushed_after >= timeout, "flushed after {flushed_after:?}, before the {timeout:?} bound");
        assert_eq!(iommu.dma_read_u64(A, iova).unwrap_err().reason, FaultReason::NotMapped);
        tries.push(flushed_after);
        if flushed_after < bound {
            return;
        }
    }
    panic!("lazy flush with a {timeout:?} timeout took {tries:?}, each over {bound:?}");
}

#[test]
fn lazy_mode_flushes_when_the_queue_is_full_and_before_a_remap() {
    // No timed flush interferes: only the queue bound, a remap and explicit flushes empty it.
    let (mem, iommu, d1, _d2) = setup_with(lazy_no_timer());
    let pa = page_with(&mem, 0x22);
    let pb = page_with(&mem, 0x33);
    const OLD: u64 = 0x2222_2222_2222_2222;
    let iova = DmaAddr::new(0x10_0000);
    d1.map(iova, MapSource::Pages(&[pa]), Prot::RW).unwrap();
    assert_eq!(iommu.dma_read_u64(A, iova).unwrap(), OLD);
    d1.unmap(iova, PAGE_SIZE).unwrap();
    assert_eq!(d1.pending_flush(), 1);
    assert_eq!(iommu.dma_read_u64(A, iova).unwrap(), OLD, "the lazy window: still cached");
    // Remapping the same IOVA elsewhere flushes first: the old translation is not left cached.
    d1.map(iova, MapSource::Pages(&[pb]), Prot::RW).unwrap();
    assert_eq!(d1.pending_flush(), 0, "a map over a queued range flushes the queue");
    assert_eq!(iommu.dma_read_u64(A, iova).unwrap(), 0x3333_3333_3333_3333);

    // Queue FLUSH_QUEUE_MAX - 1 unmaps, each of a page the device has cached: all stay queued and
    // every old translation stays usable.
    let max = FLUSH_QUEUE_MAX;
    let va = |i: usize| DmaAddr::new(0x100_0000 + i as u64 * PAGE_SIZE);
    for i in 0..max - 1 {
        d1.map(va(i), MapSource::Pages(&[pa]), Prot::RW).unwrap();
        assert_eq!(iommu.dma_read_u64(A, va(i)).unwrap(), OLD);
        d1.unmap(va(i), PAGE_SIZE).unwrap();
        assert_eq!(d1.pending_flush(), i + 1, "unmap {i} is queued");
    }
    for i in 0..max - 1 {
        assert_eq!(iommu.dma_read_u64(A, va(i)).unwrap(), OLD, "stale page {i} before the flush");
    }
    // The 255 stale translations and the live one at `iova`.
    assert_eq!(iommu.iotlb().count(d1.id()), max);
    // The FLUSH_QUEUE_MAX-th unmap fills the queue, which flushes it before the unmap returns.
    d1.map(va(max - 1), MapSource::Pages(&[pa]), Prot::RW).unwrap();
    assert_eq!(iommu.dma_read_u64(A, va(max - 1)).unwrap(), OLD);
    d1.unmap(va(max - 1), PAGE_SIZE).unwrap();
    assert_eq!(d1.pending_flush(), 0, "reaching FLUSH_QUEUE_MAX flushed the queue");
    assert_eq!(iommu.iotlb().count(d1.id()), 0, "a domain-wide invalidation");
    for i in 0..max {
        assert_eq!(iommu.dma_read_u64(A, va(i)).unwrap_err().reason, FaultReason::NotMapped, "page {i}");
    }
    // The live mapping survives the flush (refilled from the table).
    assert_eq!(iommu.dma_read_u64(A, iova).unwrap(), 0x3333_3333_3333_3333);
}

#[test]
fn identity_domains_reach_physical_memory_directly() {
    let mem = Arc::new(PhysMem::new(16 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let id =
        iommu.create_domain(DomainConfig { kind: DomainKind::Identity, ..DomainConfig::default() }).unwrap();
    iommu.register_device(A, true).unwrap();
    iommu.attach(A, &id).unwrap();
    let pa = page_with(&mem, 0x42);
    assert_eq!(iommu.dma_read_u64(A, DmaAddr::new(pa.as_u64())).unwrap(), 0x4242_4242_4242_4242);
    let beyond = DmaAddr::new(16 << 20);
    assert!(matches!(iommu.dma_read_u64(A, beyond).unwrap_err().reason, FaultReason::BusError { .. }));
    assert_eq!(
        id.map(DmaAddr::new(0x1000), MapSource::Pages(&[pa]), Prot::RW),
        Err(DomainError::Identity(id.id()))
    );
}

#[test]
fn a_gather_reads_what_single_reads_read_and_stops_at_the_first_fault() {
    let (mem, iommu, d1, _d2) = setup(Mode::Strict);
    // 300 pages, each word tagged with its page and offset; read-only page 7.
    let frames: Vec<PhysAddr> = (0..300).map(|_| mem.alloc_frame().unwrap()).collect();
    for (p, f) in frames.iter().enumerate() {
        let words: Vec<u8> = (0..512u64).flat_map(|w| ((p as u64) << 32 | w).to_le_bytes()).collect();
        mem.write(*f, &words).unwrap();
    }
    let iova = d1.alloc_iova(300 * PAGE_SIZE).unwrap();
    d1.map(iova, MapSource::Pages(&frames), Prot::RW).unwrap();
    let page = |p: u64, off: u64| DmaAddr::new(iova.as_u64() + p * PAGE_SIZE + off);
    // Misses and hits mixed (every third page read once before), 200 addresses, one crossing a
    // page boundary (taken the general way).
    for p in (0..300).step_by(3) {
        iommu.dma_read_u64(A, page(p, 0)).unwrap();
    }
    let mut addrs: Vec<DmaAddr> = (0..200u64).map(|i| page((i * 37) % 300, (i % 512) * 8)).collect();
    addrs[150] = page(20, PAGE_SIZE - 4);
    let mut out = vec![0u64; addrs.len()];
    let port = iommu.port(A);
    port.gather_u64(&addrs, &mut out).unwrap();
    let single: Vec<u64> = addrs.iter().map(|&a| port.read_u64(a).unwrap()).collect();
    assert_eq!(out, single);
    assert_eq!(out[1], 37 << 32 | 1);
    assert!(d1.faults().records().is_empty());
    // An unmapped address at 70 of 130: the fault names it and is logged; 0..70 were read.
    let mut addrs: Vec<DmaAddr> = (0..130u64).map(|i| page((i * 11) % 300, 8)).collect();
    addrs[70] = page(300, 0);
    let mut out = vec![u64::MAX; addrs.len()];
    let err = port.gather_u64(&addrs, &mut out).unwrap_err();
    assert_eq!(
        err,
        GatherError::Fault(DmaFault {
            device: A,
            iova: addrs[70],
            access: Access::Read,
            reason: FaultReason::NotMapped
        })
    );
    for (i, v) in out[..70].iter().enumerate() {
        assert_eq!(*v, ((i as u64 * 11) % 300) << 32 | 1, "address {i}");
    }
    assert_eq!(d1.faults().records().len(), 1);
    // Mismatched lengths: nothing read, nothing logged.
    let mut short = [7u64; 3];
    assert_eq!(
        port.gather_u64(&addrs[..4], &mut short),
        Err(GatherError::LengthMismatch { iovas: 4, out: 3 })
    );
    assert_eq!((short, d1.faults().records().len()), ([7; 3], 1));
    // After a strict unmap, a gather faults on the unmapped page, cached or not.
    d1.unmap(page(5, 0), PAGE_SIZE).unwrap();
    let err = port.gather_u64(&[page(4, 0), page(5, 8)], &mut [0, 0]).unwrap_err();
    assert!(
        matches!(err, GatherError::Fault(f) if f.iova == page(5, 8) && f.reason == FaultReason::NotMapped)
    );
    // A detached device reaches nothing.
    iommu.detach(A).unwrap();
    let logged = iommu.faults().records().len();
    let err = port.gather_u64(&[page(4, 0)], &mut [0]).unwrap_err();
    assert!(matches!(err, GatherError::Fault(f) if f.reason == FaultReason::NotAttached), "{err:?}");
    assert_eq!(iommu.faults().records().len(), logged + 1, "one fault, logged once");
    assert_eq!(port.gather_u64(&[], &mut []), Ok(()));
}

#[test]
fn fault_log_is_bounded_and_counts_what_it_dropped() {
    let (_mem, iommu, d1, _d2) = setup(Mode::Strict);
    for i in 0..300u64 {
        assert!(iommu.dma_read_u64(A, DmaAddr::new(0x1000 * (i + 1))).is_err());
    }
    let recs = d1.faults().records();
    assert_eq!(recs.len(), vmbind::iommu::FAULT_LOG_MAX);
    assert_eq!(d1.faults().dropped(), 300 - vmbind::iommu::FAULT_LOG_MAX as u64);
    assert_eq!(recs.last().unwrap().iova, DmaAddr::new(0x1000 * 300));
    assert_eq!(d1.faults().take().len(), vmbind::iommu::FAULT_LOG_MAX);
    assert!(d1.faults().records().is_empty());
}

// ---- bad input: a typed error and unchanged state ----

#[test]
fn bad_input_zero_size() {
    let (_mem, _iommu, d1, _d2) = setup(Mode::Strict);
    let before = d1.iova().unwrap().stats();
    assert_eq!(d1.alloc_iova(0), Err(DomainError::Iova(IovaError::ZeroSize)));
    assert_eq!(
        d1.unmap(DmaAddr::new(0x1000), 0),
        Err(DomainError::Unmap(vmbind::pt::UnmapError::ZeroLength))
    );
    assert_eq!(
        d1.map(DmaAddr::new(0x1000), MapSource::Pages(&[]), Prot::RW),
        Err(DomainError::Map(MapError::ZeroLength))
    );
    assert_eq!(d1.iova().unwrap().stats(), before);
}

#[test]
fn bad_input_size_overflow() {
    let (_mem, _iommu, d1, _d2) = setup(Mode::Strict);
    let before = d1.iova().unwrap().stats();
    assert_eq!(d1.alloc_iova(u64::MAX), Err(DomainError::Iova(IovaError::SizeOverflow { size: u64::MAX })));
    assert!(matches!(d1.alloc_iova(1 << 50), Err(DomainError::Iova(IovaError::Exhausted { .. }))));
    assert_eq!(
        d1.unmap(DmaAddr::new(0x1000), u64::MAX - 0xfff),
        Err(DomainError::Overflow { iova: DmaAddr::new(0x1000), len: u64::MAX - 0xfff })
    );
    assert_eq!(d1.iova().unwrap().stats(), before);
}

#[test]
fn bad_input_iova_outside_the_aperture() {
    let mem = Arc::new(PhysMem::new(16 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let d = iommu.create_domain(DomainConfig { aperture_bits: 32, ..DomainConfig::default() }).unwrap();
    let pa = mem.alloc_frame().unwrap();
    let out = DmaAddr::new(1 << 32);
    assert_eq!(
        d.map(out, MapSource::Pages(&[pa]), Prot::RW),
        Err(DomainError::OutsideAperture { domain: d.id(), iova: out, len: PAGE_SIZE })
    );
    assert_eq!(
        d.unmap(out, PAGE_SIZE),
        Err(DomainError::OutsideAperture { domain: d.id(), iova: out, len: PAGE_SIZE })
    );
    assert_eq!(
        d.free_iova(out, PAGE_SIZE),
        Err(DomainError::Iova(IovaError::OutsideAperture { addr: out, size: PAGE_SIZE }))
    );
    assert!(d.map(DmaAddr::new(0), MapSource::Pages(&[pa]), Prot::RW).is_err(), "page 0 is outside too");
    assert!(d.table().unwrap().leaves().is_empty());
    // Allocations honour it.
    let a = d.alloc_iova(1 << 20).unwrap();
    assert!(a.as_u64() + (1 << 20) <= 1 << 32);
}

#[test]
fn bad_input_unaligned_iova() {
    let (mem, _iommu, d1, _d2) = setup(Mode::Strict);
    let pa = mem.alloc_frame().unwrap();
    let odd = DmaAddr::new(0x10_0010);
    assert_eq!(
        d1.map(odd, MapSource::Pages(&[pa]), Prot::RW),
        Err(DomainError::Map(MapError::UnalignedVa { va: odd }))
    );
    assert_eq!(d1.free_iova(odd, PAGE_SIZE), Err(DomainError::Iova(IovaError::Unaligned { addr: odd })));
    assert!(d1.table().unwrap().leaves().is_empty());
}

#[test]
fn bad_input_double_free_of_an_iova_range() {
    let (_mem, _iommu, d1, _d2) = setup(Mode::Strict);
    for size in [PAGE_SIZE, 5 * PAGE_SIZE, 100 * PAGE_SIZE] {
        let a = d1.alloc_iova(size).unwrap();
        d1.free_iova(a, size).unwrap();
        let before = d1.iova().unwrap().stats();
        let rounded = vmbind::iommu::iova::IovaAllocator::rounded_size(size).unwrap();
        assert_eq!(
            d1.free_iova(a, size),
            Err(DomainError::Iova(IovaError::NotAllocated { addr: a, size: rounded }))
        );
        assert_eq!(d1.iova().unwrap().stats(), before);
    }
    let a = d1.alloc_iova(4 * PAGE_SIZE).unwrap();
    assert_eq!(
        d1.free_iova(a, PAGE_SIZE),
        Err(DomainError::Iova(IovaError::SizeMismatch {
            addr: a,
            allocated: 4 * PAGE_SIZE,
            given: PAGE_SIZE
        }))
    );
    d1.free_iova(a, 4 * PAGE_SIZE).unwrap();
}

#[test]
fn bad_input_unmap_of_a_never_mapped_range() {
    let (mem, _iommu, d1, _d2) = setup(Mode::Strict);
    let pa = mem.alloc_frame().unwrap();
    d1.map(DmaAddr::new(0x20_0000), MapSource::Pages(&[pa]), Prot::RW).unwrap();
    let hole = DmaAddr::new(0x40_0000);
    assert_eq!(
        d1.unmap(hole, 16 * PAGE_SIZE),
        Err(DomainError::NotMapped { iova: hole, len: 16 * PAGE_SIZE })
    );
    assert_eq!(d1.table().unwrap().leaves().len(), 1);
}

#[test]
fn bad_input_attaching_a_device_already_attached_elsewhere() {
    let (_mem, iommu, d1, d2) = setup(Mode::Strict);
    assert_eq!(iommu.attach(A, &d2), Err(IommuError::AlreadyAttached { device: A, domain: d1.id() }));
    assert_eq!(iommu.device(A).unwrap().domain, Some(d1.id()));
    assert_eq!(d2.device_count(), 1);
    assert_eq!(iommu.attach(DeviceId(7), &d1), Err(IommuError::UnknownDevice(DeviceId(7))));
    assert_eq!(iommu.register_device(A, true), Err(IommuError::AlreadyRegistered(A)));
    assert_eq!(iommu.destroy_domain(&d1), Err(IommuError::DomainBusy { domain: d1.id(), devices: 1 }));
    let other = Iommu::new(iommu.mem().clone());
    other.register_device(A, true).unwrap();
    assert_eq!(other.attach(A, &d1), Err(IommuError::ForeignDomain(d1.id())));
    iommu.detach(A).unwrap();
    iommu.destroy_domain(&d1).unwrap();
    assert_eq!(iommu.attach(A, &d1), Err(IommuError::StaleDomain(d1.id())));
}

#[test]
fn a_device_port_sees_detach_and_unmap_at_once() {
    let (mem, iommu, d1, _d2) = setup(Mode::Strict);
    let pa = page_with(&mem, 0x3c);
    let iova = d1.alloc_iova(PAGE_SIZE).unwrap();
    d1.map(iova, MapSource::Pages(&[pa]), Prot::RW).unwrap();
    let port = iommu.port(A);
    assert_eq!(port.read_u64(iova).unwrap(), 0x3c3c_3c3c_3c3c_3c3c);
    port.write_u64(iova, 5).unwrap();
    assert_eq!(mem.read_u64(pa).unwrap(), 5);
    d1.unmap(iova, PAGE_SIZE).unwrap();
    assert_eq!(port.read_u64(iova).unwrap_err().reason, FaultReason::NotMapped);
    d1.map(iova, MapSource::Pages(&[pa]), Prot::READ).unwrap();
    assert_eq!(port.read_u64(iova).unwrap(), 5);
    iommu.detach(A).unwrap();
    assert_eq!(port.read_u64(iova).unwrap_err().reason, FaultReason::NotAttached);
    let mut buf = [0u8; 4];
    assert!(port.read(iova, &mut buf).is_err());
    assert!(port.write(iova, &buf).is_err());
    assert_eq!(port.device(), A);
}

#[test]
fn a_reused_domain_id_inherits_no_cached_translation() {
    let (mem, iommu, d1, _d2) = setup(Mode::Strict);
    let secret = page_with(&mem, 0x77);
    let iova = d1.alloc_iova(PAGE_SIZE).unwrap();
    d1.map(iova, MapSource::Pages(&[secret]), Prot::RW).unwrap();
    let port = iommu.port(A);
    assert_eq!(port.read_u64(iova).unwrap(), 0x7777_7777_7777_7777);
    assert_eq!(iommu.iotlb().count(d1.id()), 1);
    let old_id = d1.id();
    iommu.detach(A).unwrap();
    iommu.destroy_domain(&d1).unwrap();
    assert!(!iommu.iotlb().may_hold(old_id), "a destroyed domain's id holds nothing");
    // The next domain gets the freed id; the same IOVA is unmapped there.
    let d3 = iommu.create_domain(DomainConfig::default()).unwrap();
    assert_eq!(d3.id(), old_id);
    iommu.attach(A, &d3).unwrap();
    let f = port.read_u64(iova).unwrap_err();
    assert_eq!(f.reason, FaultReason::NotMapped);
    assert_eq!(d3.faults().records(), vec![f]);
}
