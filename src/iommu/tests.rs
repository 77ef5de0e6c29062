//! Unit tests of the IOMMU's lock-free fill against each kind of invalidation.
use std::sync::Arc;

use super::*;
use crate::addr::{PAGE_SHIFT, PhysAddr};
use crate::pt::{MapSource, Prot, X86Iommu};

/// A fill without a lock interleaved by hand with each kind of invalidation the domain
/// performs after a table update: its walk read the old translation, so it must not commit.
/// An arena, an IOMMU over it and one registered (not attached) device.
fn setup() -> (Arc<PhysMem>, Iommu, DeviceId) {
    let mem = Arc::new(PhysMem::new(16 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let dev = DeviceId(3);
    iommu.register_device(dev, true).unwrap();
    (mem, iommu, dev)
}

#[test]
fn an_unlocked_fill_overtaken_by_an_unmap_or_detach_caches_nothing() {
    let (mem, iommu, dev) = setup();
    for mode in [Mode::Strict, Mode::Lazy] {
        for detach in [false, true] {
            let d = iommu.create_domain(DomainConfig { mode, ..DomainConfig::default() }).unwrap();
            iommu.attach(dev, &d).unwrap();
            let page = mem.alloc_frame().unwrap();
            let iova = d.alloc_iova(PAGE_SIZE).unwrap();
            d.map(iova, MapSource::Pages(&[page]), Prot::RW).unwrap();
            let (id, pfn) = (d.id(), iova.as_u64() >> PAGE_SHIFT);
            let root = PhysAddr::new(iommu.inner.roots[usize::from(id)].load(Ordering::Acquire));
            let r = iommu.iotlb().reserve(id, iova).unwrap();
            let t = PageTable::<X86Iommu>::translate_in(&mem, root, iova).unwrap();
            assert_eq!(t.pa, page);
            if detach {
                iommu.detach(dev).unwrap();
            } else {
                d.unmap(iova, PAGE_SIZE).unwrap();
                d.flush();
            }
            assert!(!iommu.iotlb().commit(r, page, t.prot), "{mode:?} detach={detach}");
            assert_eq!(iommu.iotlb().lookup(id, iova), None);
            let _ = pfn;
            if detach {
                assert!(iommu.dma_read_u64(dev, iova).is_err());
                iommu.attach(dev, &d).unwrap();
                d.unmap(iova, PAGE_SIZE).unwrap();
                d.flush();
            }
            assert_eq!(iommu.dma_read_u64(dev, iova).unwrap_err().reason, FaultReason::NotMapped);
            iommu.detach(dev).unwrap();
            d.free_iova(iova, PAGE_SIZE).unwrap();
            iommu.destroy_domain(&d).unwrap();
            mem.free_frame(page).unwrap();
        }
    }
}

#[test]
fn a_miss_fills_without_a_lock_and_a_destroyed_domain_has_no_root() {
    let (mem, iommu, dev) = setup();
    let d = iommu.create_domain(DomainConfig::default()).unwrap();
    iommu.attach(dev, &d).unwrap();
    let page = mem.alloc_frame().unwrap();
    mem.write_u64(page, 42).unwrap();
    let iova = d.alloc_iova(PAGE_SIZE).unwrap();
    d.map(iova, MapSource::Pages(&[page]), Prot::READ).unwrap();
    // Hold the invalidation lock: a fill that needed it would block; this one does not.
    let held = d.inv_lock.read();
    let word = iommu.inner.devices[usize::from(dev.0)].load(Ordering::Acquire);
    assert_eq!(iommu.fill_unlocked(dev, word, d.id(), iova.as_u64(), Prot::READ), Some(page));
    assert_eq!(iommu.iotlb().lookup(d.id(), iova), Some((page, Prot::READ)));
    // Not permitted: no answer and nothing cached for it by this path.
    assert_eq!(iommu.fill_unlocked(dev, word, d.id(), iova.as_u64(), Prot::WRITE), None);
    drop(held);
    assert_eq!(iommu.port(dev).read_u64(iova).unwrap(), 42);
    let id = d.id();
    iommu.detach(dev).unwrap();
    iommu.destroy_domain(&d).unwrap();
    assert_eq!(iommu.inner.roots[usize::from(id)].load(Ordering::Acquire), 0);
    assert_eq!(iommu.fill_unlocked(dev, word, id, iova.as_u64(), Prot::READ), None);
}
