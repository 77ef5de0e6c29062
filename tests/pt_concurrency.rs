//! Several threads mapping and unmapping at once: disjoint ranges all land, overlapping maps
//! have exactly one winner, and the final table matches the merged per-thread oracles.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use vmbind::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use vmbind::mem::PhysMem;
#[path = "common/rng.rs"]
mod rng;
use rng::SplitMix64;
use vmbind::pt::{MapError, MapOptions, MapSource, PageTable, Prot, X86Iommu};

const THREADS: u64 = 4;
const MIB2: u64 = 2 << 20;

#[test]
fn threads_mapping_disjoint_and_overlapping_ranges_end_consistent() {
    let mem = Arc::new(PhysMem::new(256 << 20).unwrap());
    let pt = Arc::new(PageTable::<X86Iommu>::new(mem.clone()).unwrap());
    let usage = mem.usage();
    let barrier = Arc::new(Barrier::new(THREADS as usize));
    let shared_wins = Arc::new(AtomicUsize::new(0));
    let rounds = 60u64;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (pt, barrier, wins) = (pt.clone(), barrier.clone(), shared_wins.clone());
            std::thread::spawn(move || {
                let mut rng = SplitMix64::new(t * 77 + 1);
                let mut oracle = BTreeMap::new();
                // Each thread's own 64 MiB region, sharing upper-level tables with the others.
                let base = t * 32 * MIB2;
                for round in 0..rounds {
                    // Overlapping: every thread tries the same range with its own address.
                    barrier.wait();
                    let shared = (1 << 40) + round * MIB2;
                    let pa = PhysAddr::new((t + 1) << 32);
                    match pt.map(
                        DmaAddr::new(shared),
                        MapSource::Range { pa, len: 16 * PAGE_SIZE },
                        Prot::RW,
                        MapOptions::default(),
                    ) {
                        Ok(_) => {
                            wins.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => assert!(matches!(e, MapError::AlreadyMapped { .. }), "{e}"),
                    }
                    // Disjoint: map a random piece of the own region, unmap another.
                    let va = base + rng.below(16 * 512) * PAGE_SIZE;
                    let n = 1 + rng.below(600);
                    let n = n.min((base + 32 * MIB2 - va) / PAGE_SIZE);
                    let pages: Vec<PhysAddr> =
                        (0..n).map(|_| PhysAddr::new((1 + rng.below(1 << 28)) << 12)).collect();
                    let free = (va..va + n * PAGE_SIZE)
                        .step_by(PAGE_SIZE as usize)
                        .all(|p| !oracle.contains_key(&p));
                    let r =
                        pt.map(DmaAddr::new(va), MapSource::Pages(&pages), Prot::RW, MapOptions::default());
                    assert_eq!(r.is_ok(), free, "thread {t} round {round}");
                    if free {
                        for (i, pa) in pages.iter().enumerate() {
                            oracle.insert(va + i as u64 * PAGE_SIZE, pa.as_u64());
                        }
                    }
                    let uva = base + rng.below(16 * 512) * PAGE_SIZE;
                    let un = (1 + rng.below(800)).min((base + 32 * MIB2 - uva) / PAGE_SIZE);
                    let inv = pt.unmap(DmaAddr::new(uva), un * PAGE_SIZE).unwrap();
                    let gone: Vec<u64> = oracle.range(uva..uva + un * PAGE_SIZE).map(|(&k, _)| k).collect();
                    assert_eq!(inv.unmapped_bytes(), gone.len() as u64 * PAGE_SIZE);
                    inv.complete();
                    for k in gone {
                        oracle.remove(&k);
                    }
                }
                oracle
            })
        })
        .collect();
    let mut all = BTreeMap::new();
    for h in handles {
        all.extend(h.join().unwrap());
    }
    assert_eq!(shared_wins.load(Ordering::Relaxed), rounds as usize, "one winner per round");
    for t in 0..THREADS {
        for page in (t * 32 * MIB2..(t + 1) * 32 * MIB2).step_by(PAGE_SIZE as usize) {
            let got = pt.translate(DmaAddr::new(page)).map(|x| x.pa.as_u64());
            assert_eq!(got, all.get(&page).copied(), "page {page:#x}");
        }
    }
    for round in 0..rounds {
        let t = pt.translate(DmaAddr::new((1 << 40) + round * MIB2 + 5)).unwrap();
        assert_eq!(t.pa.as_u64() & 0xffff_ffff, 5);
    }
    pt.unmap(DmaAddr::new(0), 1 << 41).unwrap().complete();
    assert_eq!(pt.table_pages(), 1);
    assert_eq!(mem.usage(), usage);
}

#[test]
fn lock_free_translations_during_maps_see_all_or_nothing_of_each_page() {
    // Readers never race with unmaps here: freeing tables under a reader is what the IOMMU's
    // invalidation protocol (flush, then complete) is for.
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let pt = Arc::new(PageTable::<X86Iommu>::new(mem).unwrap());
    let stop = Arc::new(AtomicUsize::new(0));
    const ROUNDS: u64 = 40;
    let reader = {
        let (pt, stop) = (pt.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = 0u64;
            // Passes while the maps happen, then one more after they are all done.
            let mut last = false;
            while !last {
                last = stop.load(Ordering::Acquire) != 0;
                for r in 0..ROUNDS {
                    for i in 0..16u64 {
                        let va = (r << 30) + i * MIB2 + 0x1008;
                        if let Some(t) = pt.translate(DmaAddr::new(va)) {
                            assert_eq!(t.pa.as_u64(), ((r * 16 + i + 1) << 24) + 0x1008);
                            seen += 1;
                        }
                    }
                }
            }
            seen
        })
    };
    for r in 0..ROUNDS {
        for i in 0..16u64 {
            pt.map(
                DmaAddr::new((r << 30) + i * MIB2),
                MapSource::Range { pa: PhysAddr::new((r * 16 + i + 1) << 24), len: 64 * PAGE_SIZE },
                Prot::READ,
                MapOptions::default(),
            )
            .unwrap();
        }
    }
    stop.store(1, Ordering::Release);
    assert!(reader.join().unwrap() >= ROUNDS * 16, "the last pass sees every mapping");
    assert_eq!(pt.leaves().len() as u64, ROUNDS * 16 * 64);
}
