//! DMA-issue cases of the report: one IOVA and one flush per page, the two-step API linked per
//! bio_vec, the two-step API with one `link_bvecs` call, and PRP list building.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::dma::{Attrs, Device, Direction, DmaVec, IovaState};
use crate::iommu::{DeviceId, DomainConfig, Iommu};
use crate::mem::{BioVec, PhysMem};
use crate::nvme::{self, ListPool, MAX_TRANSFER};

use crate::bench::harness::{CaseImp, Report, timed};

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

    // The three ways to map the same 262144 pages, interleaved in one comparison so that their
    // ratios come from samples taken side by side.
    let mapped: RefCell<Vec<DmaAddr>> = RefCell::new(Vec::with_capacity(PAGES));
    let mapped = &mapped;
    let mut impls: Vec<CaseImp<'_, '_>> = Vec::new();
    let case = "dma/map_page_loop";
    if r.wants(case) {
        // Each page: its own IOVA, its own map, its own flush (dma_map_page per page).
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
        impls.push((case, "vmbind", vm));
    }

    let case = "dma/two_step_per_bvec";
    if r.wants(case) {
        let link = Box::new(|s: &mut IovaState| {
            for (i, f) in frames.iter().enumerate() {
                s.link(dev, *f, i as u64 * PAGE_SIZE, PAGE_SIZE, dir, a).unwrap();
            }
        });
        impls.push((case, "vmbind", two_step(dev, frames[0], len, link)));
    }
    let case = "dma/two_step_array";
    if r.wants(case) {
        let link = Box::new(|s: &mut IovaState| {
            s.link_bvecs(dev, 0, bvecs, dir, a).unwrap();
        });
        impls.push((case, "vmbind", two_step(dev, frames[0], len, link)));
    }
    if !impls.is_empty() {
        let n = r.samples(300.0);
        r.compare_cases(PER_PAGE, PAGES as f64, n, impls);
    }
    for d in mapped.borrow_mut().drain(..) {
        dev.unmap(d, PAGE_SIZE, dir, a).unwrap();
    }

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

/// One two-step sample: a fresh IovaState for `len` bytes (the previous sample's destroyed,
/// untimed), linked by `link` and synced once.
fn two_step<'a>(
    dev: &'a Device,
    first: PhysAddr,
    len: u64,
    link: Box<dyn Fn(&mut IovaState) + 'a>,
) -> Box<dyn FnMut() -> f64 + 'a> {
    let (a, dir) = (Attrs::default(), Direction::ToDevice);
    let slot: Rc<RefCell<Option<IovaState>>> = Rc::new(RefCell::new(None));
    let keep = slot.clone();
    timed(
        move || {
            if let Some(mut s) = slot.borrow_mut().take() {
                s.destroy(dev, len, dir, a).unwrap();
            }
            IovaState::try_alloc(dev, first, len).unwrap().unwrap()
        },
        move |mut s: IovaState| {
            link(&mut s);
            s.sync(dev, 0, len).unwrap();
            *keep.borrow_mut() = Some(s);
        },
    )
}
