//! Strict mode under concurrency: while mappers map and unmap and allocate and free IOVA,
//! device reads never succeed on a range whose unmap had already returned — whether they hit the
//! IOTLB or miss and fill it (a flusher thread keeps emptying it, so fills race with unmaps).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vmbind::addr::{DmaAddr, PAGE_SIZE};
use vmbind::iommu::{DeviceId, DomainConfig, FaultReason, Iommu};
use vmbind::mem::PhysMem;
use vmbind::pt::{MapSource, Prot};

const SLOTS: u64 = 4;

#[test]
fn no_device_read_succeeds_after_strict_unmap_returned() {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let dom = iommu.create_domain(DomainConfig::default()).unwrap();
    let dev = DeviceId(0x10);
    iommu.register_device(dev, true).unwrap();
    iommu.attach(dev, &dom).unwrap();
    // One IOVA per slot, remapped over and over: generation g of slot s maps a page holding g.
    let iovas: Vec<DmaAddr> = (0..SLOTS).map(|_| dom.alloc_iova(PAGE_SIZE).unwrap()).collect();
    let unmapped: Arc<Vec<AtomicU64>> = Arc::new((0..SLOTS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));

    let flusher = {
        let (iommu, stop) = (iommu.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut flushes = 0u64;
            while !stop.load(Ordering::Acquire) {
                iommu.flush_iotlb();
                flushes += 1;
            }
            flushes
        })
    };

    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (iommu, iovas, unmapped, stop) =
                (iommu.clone(), iovas.clone(), unmapped.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut ok, mut faults) = (0u64, 0u64);
                while !stop.load(Ordering::Acquire) {
                    for (s, &iova) in iovas.iter().enumerate() {
                        let done_before = unmapped[s].load(Ordering::SeqCst);
                        match iommu.dma_read_u64(dev, iova) {
                            Ok(g) => {
                                assert!(
                                    g > done_before,
                                    "read generation {g} of slot {s} after its unmap returned"
                                );
                                ok += 1;
                            }
                            Err(f) => {
                                assert_eq!(f.reason, FaultReason::NotMapped);
                                faults += 1;
                            }
                        }
                    }
                }
                (ok, faults)
            })
        })
        .collect();

    let mappers: Vec<_> = (0..2u64)
        .map(|m| {
            let (dom, mem, iovas, unmapped) = (dom.clone(), mem.clone(), iovas.clone(), unmapped.clone());
            std::thread::spawn(move || {
                let mut pages = Vec::new();
                for g in 1..=2000u64 {
                    // Mapper m owns slots m and m + 2.
                    let s = (m + 2 * (g % 2)) as usize;
                    let page = mem.alloc_frame().unwrap();
                    let generation = g * 2 + m; // distinct per mapper, increasing per slot
                    mem.write_u64(page, generation).unwrap();
                    dom.map(iovas[s], MapSource::Pages(&[page]), Prot::READ).unwrap();
                    // Some unrelated IOVA churn on the side.
                    let side = dom.alloc_iova(3 * PAGE_SIZE).unwrap();
                    dom.free_iova(side, 3 * PAGE_SIZE).unwrap();
                    assert_eq!(dom.unmap(iovas[s], PAGE_SIZE), Ok(PAGE_SIZE));
                    unmapped[s].store(generation, Ordering::SeqCst);
                    // Frames stay allocated (and keep their generation) until the end, so a
                    // stale translation would read an old generation and be caught.
                    pages.push(page);
                }
                pages
            })
        })
        .collect();
    let mut pages = Vec::new();
    for m in mappers {
        pages.extend(m.join().unwrap());
    }
    stop.store(true, Ordering::Release);
    let flushes = flusher.join().unwrap();
    let mut total_ok = 0;
    for r in readers {
        total_ok += r.join().unwrap().0;
    }
    // Every slot ends unmapped.
    for &iova in &iovas {
        assert!(iommu.dma_read_u64(dev, iova).is_err());
    }
    mem.free_frames(&pages).unwrap();
    eprintln!("successful concurrent reads: {total_ok}, IOTLB flushes: {flushes}");
}
