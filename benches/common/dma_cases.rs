//! DMA-issue cases of the report: one IOVA and one flush per page, the two-step API linked per
//! bio_vec, the two-step API with one `link_bvecs` call, and PRP list building.

use std::cell::RefCell;
use std::sync::Arc;

use vmbind::addr::{DmaAddr, PAGE_SIZE};
use vmbind::dma::{Attrs, Device, Direction, DmaVec, IovaState};
use vmbind::iommu::{DeviceId, DomainConfig, Iommu};
use vmbind::mem::{BioVec, PhysMem};
use vmbind::nvme::{self, ListPool, MAX_TRANSFER};

use crate::harness::{Report, timed};

const PAGES: usize = 262_144;
const PER_PAGE: &str = "ns/4KiB page";

pub fn dma_cases(r: &mut Report) {
    let wanted = ["dma/map_page_loop", "dma/two_step_per_bvec", "dma/two_step_array", "nvme/prp_build"];
    if !wanted.iter().any(|c| r.wants(c)) {
        return;
    }
    let mem = Arc::new(PhysMem::new(2 << 30).unwrap());
    let iommu = Iommu::new(mem.clone());
    let dom = iommu.create_domain(DomainConfig::default()).unwrap();
    let id = DeviceId(0x0500);
    iommu.register_device(id, true).unwrap();
    iommu.attach(id, &dom).unwrap();
    let dev = Device::translated(&iommu, id).unwrap();
    let frames = mem.alloc_scattered(PAGES, 21).unwrap();
    let bvecs = BioVec::from_frames(&frames);
    let len = PAGES as u64 * PAGE_SIZE;
    let (a, dir) = (Attrs::default(), Direction::ToDevice);
    let (dev, bvecs, frames) = (&dev, &bvecs, &frames);

    let case = "dma/map_page_loop";
    if r.wants(case) {
        // Each page: its own IOVA, its own map, its own flush (dma_map_page per page).
        let mapped: RefCell<Vec<DmaAddr>> = RefCell::new(Vec::with_capacity(PAGES));
        let mapped = &mapped;
        let vm = timed(
            || {
                for d in mapped.borrow_mut().drain(..) {
                    dev.unmap(d, PAGE_SIZE, dir, a).unwrap();
                }
            },
            |()| {
                let dom = dev.domain().unwrap();
                for f in frames {
                    let d = dev.map_page(*f, 0, PAGE_SIZE, dir, a).unwrap();
                    dom.sync(d, PAGE_SIZE).unwrap();
                    mapped.borrow_mut().push(d);
                }
            },
        );
        let n = r.samples(300.0);
        r.compare(case, PER_PAGE, PAGES as f64, n, vec![("vmbind", vm)]);
    }

    // Each sample: a fresh IovaState (the previous one destroyed, untimed), linked by `link`
    // and synced once.
    let two_step = |r: &mut Report, case: &str, est_ms: f64, link: &dyn Fn(&mut IovaState)| {
        if !r.wants(case) {
            return;
        }
        let last: RefCell<Option<IovaState>> = RefCell::new(None);
        let last = &last;
        let vm = timed(
            || {
                if let Some(mut s) = last.borrow_mut().take() {
                    s.destroy(dev, len, dir, a).unwrap();
                }
                IovaState::try_alloc(dev, frames[0], len).unwrap().unwrap()
            },
            |mut s: IovaState| {
                link(&mut s);
                s.sync(dev, 0, len).unwrap();
                *last.borrow_mut() = Some(s);
            },
        );
        let n = r.samples(est_ms);
        r.compare(case, PER_PAGE, PAGES as f64, n, vec![("vmbind", vm)]);
    };
    two_step(r, "dma/two_step_per_bvec", 100.0, &|s: &mut IovaState| {
        for (i, f) in frames.iter().enumerate() {
            s.link(dev, *f, i as u64 * PAGE_SIZE, PAGE_SIZE, dir, a).unwrap();
        }
    });
    two_step(r, "dma/two_step_array", 2.0, &|s: &mut IovaState| {
        s.link_bvecs(dev, 0, bvecs, dir, a).unwrap();
    });

    let case = "nvme/prp_build";
    if r.wants(case) {
        // 8 MiB requests (2048 pages) described by one DMA segment each, PRP lists from a
        // pre-mapped pool, built and released 32 times per sample.
        let mut pool = ListPool::new(dev, 16).unwrap();
        let mut s = IovaState::try_alloc(dev, frames[0], MAX_TRANSFER).unwrap().unwrap();
        s.link_bvecs(dev, 0, &bvecs[..2048], dir, a).unwrap();
        s.sync(dev, 0, MAX_TRANSFER).unwrap();
        let v = DmaVec::from_segment(s.addr(), MAX_TRANSFER).unwrap();
        let v = &v;
        let vm = timed(
            || (),
            |()| {
                for _ in 0..32 {
                    let p = nvme::build_prp(&mut pool, v, PAGE_SIZE, MAX_TRANSFER).unwrap();
                    std::hint::black_box(p.prp2);
                    pool.release(p.lists);
                }
            },
        );
        let n = r.samples(0.2);
        r.compare(case, PER_PAGE, 32.0 * 2048.0, n, vec![("vmbind", vm)]);
    }
}
