//! IOMMU-issue cases of the report: the IOVA allocator against vm-allocator, device reads
//! through the IOTLB against the x86_64 crate's walker, a BTreeMap and vm-memory's Iotlb, and a
//! domain map against per-page inserts.

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::iommu::iova::IovaAllocator;
use crate::iommu::{DeviceId, DomainConfig, Iommu};
use crate::mem::PhysMem;
use crate::mem::rng::{SplitMix64, shuffle};
use crate::pt::{MapSource, Prot};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};
use vm_memory::iommu::Iotlb as VmIotlb;
use vm_memory::{GuestAddress, Permissions};

use super::peers::x86::X86;
use crate::bench::harness::{Report, per, timed};

const APERTURE_END: u64 = 1 << 40;

fn small_orders(n: usize, seed: u64) -> Vec<u64> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| PAGE_SIZE << rng.below(6)).collect()
}

/// The vmbind allocator and vm-allocator holding the same live ranges: vmbind builds its set
/// top-down (its policy); vm-allocator gets the mirror image of it, packed from the bottom of
/// its range, which is exactly where its own first-match policy would have put the same
/// sequence. Same sizes, same holes, each in its allocator's natural direction. (Placing
/// vm-allocator's ranges at vmbind's addresses would leave the bottom of its range empty and
/// make its first match trivially short; building the set with its own first-match calls would
/// take minutes at 100k ranges.)
fn twin_allocators(live: usize, seed: u64, holes: bool) -> (IovaAllocator, AddressAllocator) {
    let ours = IovaAllocator::new(DmaAddr::new(PAGE_SIZE), DmaAddr::new(APERTURE_END)).unwrap();
    let mut theirs = AddressAllocator::new(0, APERTURE_END - PAGE_SIZE).unwrap();
    let mut rng = SplitMix64::new(seed);
    let total = if holes { 2 * live } else { live };
    let mut got = Vec::with_capacity(total);
    for _ in 0..total {
        let size = PAGE_SIZE << rng.below(6);
        got.push((ours.alloc(size).unwrap(), size));
    }
    for (i, (addr, size)) in got.into_iter().enumerate() {
        if holes && i % 2 == 0 {
            ours.free(addr, size).unwrap();
        } else {
            let mirrored = APERTURE_END - addr.as_u64() - size;
            theirs.allocate(size, size, AllocPolicy::ExactMatch(mirrored)).unwrap();
        }
    }
    ours.flush_caches();
    (ours, theirs)
}

pub fn iova_cases(r: &mut Report) {
    let case = "iova/alloc_free_small";
    if r.wants(case) {
        let (ours, mut theirs) = twin_allocators(10_000, 1, false);
        let sizes = small_orders(100_000, 2);
        let peer_sizes = &sizes[..if r.quick { 20 } else { 100 }];
        let ours = &ours;
        let sizes = &sizes;
        let vm = per(
            sizes.len() as f64,
            timed(
                || (),
                |()| {
                    for &s in sizes {
                        let a = ours.alloc(s).unwrap();
                        ours.free(a, s).unwrap();
                    }
                },
            ),
        );
        let peer = per(
            peer_sizes.len() as f64,
            timed(
                || (),
                |()| {
                    for &s in peer_sizes {
                        let a = theirs.allocate(s, s, AllocPolicy::FirstMatch).unwrap();
                        theirs.free(&a).unwrap();
                    }
                },
            ),
        );
        let n = r.samples(20.0);
        r.compare(case, "ns/pair", 1.0, n, vec![("vmbind", vm), ("vm-allocator", peer)]);
    }

    let case = "iova/alloc_large_100k";
    if r.wants(case) {
        let (ours, mut theirs) = twin_allocators(100_000, 3, true);
        let ours = &ours;
        let vm = timed(
            || (),
            |()| {
                let a = ours.alloc(1 << 20).unwrap();
                ours.free(a, 1 << 20).unwrap();
            },
        );
        let mut last: Option<RangeInclusive> = None;
        let peer = timed(
            || (),
            |()| {
                let a = theirs.allocate(1 << 20, 1 << 20, AllocPolicy::FirstMatch).unwrap();
                theirs.free(&a).unwrap();
                last = Some(a);
            },
        );
        let n = r.samples(5.0);
        r.compare(case, "ns/alloc", 1.0, n, vec![("vmbind", vm), ("vm-allocator", peer)]);
    }

    let case = "iova/alloc_free_2t";
    if r.wants(case) {
        let (ours, _) = twin_allocators(10_000, 4, false);
        let ours = Arc::new(ours);
        let sizes = Arc::new(small_orders(200_000, 5));
        let pairs = sizes.len() as f64;
        // Each sample: `threads` threads start the same loop together; the result is the mean
        // in-thread time per pair (thread start-up is not counted).
        let run = |threads: usize| -> Box<dyn FnMut() -> f64> {
            let (ours, sizes) = (ours.clone(), sizes.clone());
            Box::new(move || {
                let barrier = Arc::new(Barrier::new(threads));
                let hs: Vec<_> = (0..threads)
                    .map(|t| {
                        let (ours, sizes, barrier) = (ours.clone(), sizes.clone(), barrier.clone());
                        std::thread::spawn(move || {
                            let rot = t * 997;
                            barrier.wait();
                            let t0 = Instant::now();
                            for i in 0..sizes.len() {
                                let s = sizes[(i + rot) % sizes.len()];
                                let a = ours.alloc(s).unwrap();
                                ours.free(a, s).unwrap();
                            }
                            t0.elapsed().as_secs_f64() * 1e9
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum::<f64>() / threads as f64 / pairs
            })
        };
        let n = r.samples(30.0);
        r.compare(case, "ns/pair/thread", 1.0, n, vec![("vmbind", run(2)), ("vmbind-1t", run(1))]);
    }
}

pub fn iommu_cases(r: &mut Report) {
    let dev = DeviceId(0x0100);
    // Both cases map 1 GiB of IOVA (262144 pages, a VM's memory behind a virtual IOMMU or a large
    // GPU buffer) and read 8 bytes at random addresses in it. As TLB benchmarks do, every page
    // maps the same written frame, so the data read is the same L1 hit for every
    // implementation and what differs is the translation (with 64 MiB of distinct frames the
    // DRAM miss of the read, the same for all, is most of every number). The `raw` row is that
    // read alone, from precomputed physical addresses: the floor. hit: addresses anywhere in the
    // mapping, whose translations the IOTLB (1 GiB reach) holds after a warm-up; the peers have
    // no cache and search or walk their whole structure each time. miss: 65536 distinct pages,
    // the IOTLB flushed before each sample, so every vmbind access walks the table and fills.
    const PAGES: usize = 262_144;
    for (case, miss) in [("iommu/translate_hit", false), ("iommu/translate_miss", true)] {
        if !r.wants(case) {
            continue;
        }
        // Room for vmbind's and the x86_64 walker's tables (2 MiB each) and the frame.
        let mem = Arc::new(PhysMem::new(16 << 20).unwrap());
        let data = mem.alloc_frame().unwrap();
        for i in 0..PAGE_SIZE / 8 {
            mem.write_u64(data.checked_add(8 * i).unwrap(), i).unwrap();
        }
        let frames = vec![data; PAGES];
        let pages = PAGES;
        let iommu = Iommu::new(mem.clone());
        // 47 bits: IOVAs stay canonical for the x86_64 crate's walker, which maps the same ones.
        let dom = iommu.create_domain(DomainConfig { aperture_bits: 47, ..DomainConfig::default() }).unwrap();
        iommu.register_device(dev, true).unwrap();
        iommu.attach(dev, &dom).unwrap();
        let iova = dom.alloc_iova(pages as u64 * PAGE_SIZE).unwrap();
        dom.map(iova, MapSource::Pages(&frames), Prot::RW).unwrap();
        let base = iova.as_u64();
        let mut rng = SplitMix64::new(9);
        let probes: Vec<u64> = if miss {
            let mut order: Vec<u64> = (0..pages as u64).collect();
            shuffle(&mut order, 11);
            order[..65_536].iter().map(|p| base + p * PAGE_SIZE + 8 * rng.below(512)).collect()
        } else {
            (0..65_536).map(|_| base + rng.below(pages as u64) * PAGE_SIZE + 8 * rng.below(512)).collect()
        };
        let mut x86 = X86::new(&mem);
        x86.map_pages(base, &frames);
        let mut bt = BTreeMap::new();
        let mut vmm = VmIotlb::new();
        for (i, pa) in frames.iter().enumerate() {
            let va = base + i as u64 * PAGE_SIZE;
            bt.insert(va, pa.as_u64());
            vmm.set_mapping(
                GuestAddress(va),
                GuestAddress(pa.as_u64()),
                PAGE_SIZE as usize,
                Permissions::ReadWrite,
            )
            .unwrap();
        }
        for &p in &probes {
            iommu.dma_read_u64(dev, DmaAddr::new(p)).unwrap();
        }
        let mem = &mem;
        let probes = &probes;
        // The slow peers read the first 8192 probes only, so that samples stay short.
        let few = &probes[..8192];
        let (iommu, bt, vmm, x86) = (&iommu, &bt, &vmm, &x86);
        // Every miss sample starts from an empty IOTLB.
        let flush = move || {
            if miss {
                iommu.flush_iotlb();
            }
        };
        let vm = per(
            probes.len() as f64,
            timed(flush, |()| {
                // The device's access handle: 8-byte device reads through the IOMMU.
                let port = iommu.port(dev);
                probes.iter().fold(0u64, |a, &p| a ^ port.read_u64(DmaAddr::new(p)).unwrap())
            }),
        );
        let dprobes: Vec<DmaAddr> = probes.iter().map(|&p| DmaAddr::new(p)).collect();
        let dprobes = &dprobes;
        let gather = per(
            probes.len() as f64,
            timed(
                move || {
                    flush();
                    vec![0u64; dprobes.len()]
                },
                |mut out| {
                    iommu.port(dev).gather_u64(dprobes, &mut out).unwrap();
                    out.iter().fold(0u64, |a, &v| a ^ v)
                },
            ),
        );
        let walker = per(
            probes.len() as f64,
            timed(
                || (),
                |()| {
                    probes.iter().fold(0u64, |a, &p| {
                        a ^ mem.read_u64(PhysAddr::new(x86.translate(p).unwrap())).unwrap()
                    })
                },
            ),
        );
        let btree = per(
            few.len() as f64,
            timed(
                || (),
                |()| {
                    few.iter().fold(0u64, |a, &p| {
                        let (&va, &pa) = bt.range(..=p).next_back().unwrap();
                        assert!(p - va < PAGE_SIZE);
                        a ^ mem.read_u64(PhysAddr::new(pa + (p - va))).unwrap()
                    })
                },
            ),
        );
        let vmmem = per(
            few.len() as f64,
            timed(
                || (),
                |()| {
                    few.iter().fold(0u64, |a, &p| {
                        let mut it = VmIotlb::lookup(vmm, GuestAddress(p), 8, Permissions::Read).unwrap();
                        let m = it.next().unwrap();
                        a ^ mem.read_u64(PhysAddr::new(m.base.0)).unwrap()
                    })
                },
            ),
        );
        // The floor: the same reads from physical addresses translated beforehand.
        let phys: Vec<u64> = probes.iter().map(|&p| x86.translate(p).unwrap()).collect();
        let phys = &phys;
        let raw = per(
            phys.len() as f64,
            timed(|| (), |()| phys.iter().fold(0u64, |a, &p| a ^ mem.read_u64(PhysAddr::new(p)).unwrap())),
        );
        let n = r.samples(if miss { 12.0 } else { 6.0 });
        r.compare(
            case,
            "ns/access",
            1.0,
            n,
            vec![
                ("vmbind", vm),
                ("vmbind-gather", gather),
                ("x86_64", walker),
                ("btreemap", btree),
                ("vm-memory", vmmem),
                ("raw", raw),
            ],
        );
    }

    let case = "iommu/translate_miss_2t";
    if r.wants(case) {
        // Two devices of one domain, each on its own thread, read 32768 distinct pages of their
        // own half of a 1 GiB mapping after an IOTLB flush (so nearly every read misses and
        // fills), against the same loop on one thread: misses of one domain must not serialize
        // on a shared lock. ns per access per thread.
        let mem = Arc::new(PhysMem::new(16 << 20).unwrap());
        let frame = mem.alloc_frame().unwrap();
        let iommu = Iommu::new(mem.clone());
        let dom = iommu.create_domain(DomainConfig::default()).unwrap();
        for d in 0..2 {
            iommu.register_device(DeviceId(0x200 + d), true).unwrap();
            iommu.attach(DeviceId(0x200 + d), &dom).unwrap();
        }
        let iova = dom.alloc_iova(PAGES as u64 * PAGE_SIZE).unwrap();
        dom.map(iova, MapSource::Pages(&vec![frame; PAGES]), Prot::READ).unwrap();
        let half = PAGES as u64 / 2;
        let probes: Arc<Vec<Vec<u64>>> = Arc::new(
            (0..2u64)
                .map(|t| {
                    let mut order: Vec<u64> = (0..half).collect();
                    shuffle(&mut order, 31 + t);
                    order[..32_768].iter().map(|p| iova.as_u64() + (t * half + p) * PAGE_SIZE).collect()
                })
                .collect(),
        );
        let run = |threads: usize| -> Box<dyn FnMut() -> f64> {
            let (iommu, probes) = (iommu.clone(), probes.clone());
            Box::new(move || {
                iommu.flush_iotlb();
                let barrier = Arc::new(Barrier::new(threads));
                let hs: Vec<_> = (0..threads)
                    .map(|t| {
                        let (iommu, probes, barrier) = (iommu.clone(), probes.clone(), barrier.clone());
                        std::thread::spawn(move || {
                            let port = iommu.port(DeviceId(0x200 + t as u16));
                            barrier.wait();
                            let t0 = Instant::now();
                            let x = probes[t]
                                .iter()
                                .fold(0u64, |a, &p| a ^ port.read_u64(DmaAddr::new(p)).unwrap());
                            std::hint::black_box(x);
                            t0.elapsed().as_secs_f64() * 1e9 / probes[t].len() as f64
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum::<f64>() / threads as f64
            })
        };
        let n = r.samples(5.0);
        r.compare(case, "ns/access/thread", 1.0, n, vec![("vmbind", run(2)), ("vmbind-1t", run(1))]);
    }

    let case = "iommu/map_4k";
    if r.wants(case) {
        let pages = 262_144usize;
        let mem = Arc::new(PhysMem::new(2 << 30).unwrap());
        let iommu = Iommu::new(mem.clone());
        let dom = iommu.create_domain(DomainConfig::default()).unwrap();
        let frames = mem.alloc_scattered(pages, 13).unwrap();
        let len = pages as u64 * PAGE_SIZE;
        let iova = dom.alloc_iova(len).unwrap();
        let base = iova.as_u64();
        let frames = &frames;
        let dom = &dom;
        let vm = timed(
            || {
                let _ = dom.unmap(iova, len);
            },
            |()| dom.map(iova, MapSource::Pages(frames), Prot::RW).unwrap(),
        );
        let btree = timed(BTreeMap::new, |mut bt: BTreeMap<u64, u64>| {
            for (i, pa) in frames.iter().enumerate() {
                bt.insert(base + i as u64 * PAGE_SIZE, pa.as_u64());
            }
            bt
        });
        let vmmem = timed(VmIotlb::new, |mut t: VmIotlb| {
            for (i, pa) in frames.iter().enumerate() {
                let va = GuestAddress(base + i as u64 * PAGE_SIZE);
                t.set_mapping(va, GuestAddress(pa.as_u64()), PAGE_SIZE as usize, Permissions::ReadWrite)
                    .unwrap();
            }
            t
        });
        let n = r.samples(100.0);
        r.compare(
            case,
            "ns/4KiB page",
            pages as f64,
            n,
            vec![("vmbind", vm), ("btreemap", btree), ("vm-memory", vmmem)],
        );
    }
}
