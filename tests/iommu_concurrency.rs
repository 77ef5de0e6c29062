//! Strict mode under concurrency: while mappers map and unmap and allocate and free IOVA,
//! device reads never succeed on a range whose unmap had already returned — whether they hit the
//! IOTLB or miss and fill it (a flusher thread keeps emptying it, so fills race with unmaps) —
//! and always succeed, with the bytes of the current mapping, while a map has returned and its
//! unmap has not begun. The same holds for reads through `DevicePort::gather_u64`.
//!
//! Each slot publishes its phase in an atomic word *around* every table change (the phase is
//! stored before the change begins and after it returns), and a reader loads that word before and
//! after each read. A read that saw the same word both times ran entirely inside that phase and is
//! held to it exactly: `MAPPED` must return the generation's bytes, `UNMAPPED` must fault with
//! `NotMapped`. A read that saw the word change raced a map or unmap and may go either way, but
//! may only ever return a generation that was not yet unmapped when the read began. No timing is
//! assumed: at checkpoints a mapper holds its phase until a reader has classified a read in it,
//! so both counts are positive by construction, not by luck.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vmbind::addr::{DmaAddr, PAGE_SIZE};
use vmbind::iommu::{DeviceId, DomainConfig, FaultReason, GatherError, Iommu};
use vmbind::mem::PhysMem;
use vmbind::pt::{MapSource, Prot};

const SLOTS: u64 = 4;
const GENERATIONS: u64 = 1000;
/// Every this many generations a mapper waits, in `MAPPED` and in `UNMAPPED`, for a reader to
/// classify a read that ran wholly inside that phase.
const CHECKPOINT_EVERY: u64 = 10;
const CHECKPOINTS: u64 = 2 * 2 * (GENERATIONS / CHECKPOINT_EVERY); // 2 mappers × 2 slots each

// A slot's state word: generation × 4 + phase. Generations and phases only grow, so the word
// only grows, and `fetch_max` of a state a reader saw tells a mapper its phase has been observed.
const MAPPING: u64 = 0; // `map` of the generation may have begun, has not returned
const MAPPED: u64 = 1; // `map` returned; `unmap` has not begun
const UNMAPPING: u64 = 2; // `unmap` may have begun, has not returned
const UNMAPPED: u64 = 3; // `unmap` returned; the next generation's `map` has not begun

fn state(generation: u64, phase: u64) -> u64 {
    generation * 4 + phase
}

/// The word generation `g` of slot `s` writes into its page: the slot and generation, so a read
/// returning anything else (another slot's page, an older generation) is caught by value.
fn tag(s: usize, g: u64) -> u64 {
    0x5107_0000_0000_0000 | (s as u64) << 32 | g
}

/// Sets the flag if its thread unwinds, so that threads waiting on it give up instead of hanging.
struct PanicFlag(Arc<AtomicBool>);

impl Drop for PanicFlag {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

#[derive(Default, Debug, Clone, Copy)]
struct Counts {
    /// Reads wholly inside `MAPPED` (all succeeded with the right bytes).
    clean_ok: u64,
    /// Reads wholly inside `UNMAPPED` (all faulted with `NotMapped`).
    clean_faults: u64,
    /// Reads that raced a map or unmap (or ran inside `MAPPING` / `UNMAPPING`): succeeded.
    racing_ok: u64,
    /// The same, faulted.
    racing_faults: u64,
}

#[test]
fn no_device_read_succeeds_after_strict_unmap_returned() {
    let started = std::time::Instant::now();
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let dom = iommu.create_domain(DomainConfig::default()).unwrap();
    let dev = DeviceId(0x10);
    iommu.register_device(dev, true).unwrap();
    iommu.attach(dev, &dom).unwrap();
    // One IOVA per slot, remapped over and over: generation g of slot s maps a page holding
    // tag(s, g). Generation 0 is "never mapped yet".
    let iovas: Vec<DmaAddr> = (0..SLOTS).map(|_| dom.alloc_iova(PAGE_SIZE).unwrap()).collect();
    let states: Arc<Vec<AtomicU64>> =
        Arc::new((0..SLOTS).map(|_| AtomicU64::new(state(0, UNMAPPED))).collect());
    // Per slot: the highest state in which some reader classified a read made wholly inside it.
    let observed: Arc<Vec<AtomicU64>> = Arc::new((0..SLOTS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));

    let flusher = {
        let (iommu, stop) = (iommu.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut flushes = 0u64;
            while !stop.load(Ordering::Acquire) {
                iommu.flush_iotlb();
                flushes += 1;
                std::thread::yield_now();
            }
            flushes
        })
    };

    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (iommu, iovas, states, observed, stop, failed) = (
                iommu.clone(),
                iovas.clone(),
                states.clone(),
                observed.clone(),
                stop.clone(),
                failed.clone(),
            );
            std::thread::spawn(move || {
                let _flag = PanicFlag(failed);
                let mut c = Counts::default();
                let mut sweeps = 0u64;
                while !stop.load(Ordering::Acquire) {
                    for (s, &iova) in iovas.iter().enumerate() {
                        let before = states[s].load(Ordering::SeqCst);
                        // Every other sweep reads through a one-address gather, whose misses
                        // fill under the domain's invalidation lock instead of lock-free.
                        let r = if sweeps.is_multiple_of(2) {
                            iommu.dma_read_u64(dev, iova)
                        } else {
                            let mut out = [0u64];
                            match iommu.port(dev).gather_u64(&[iova], &mut out) {
                                Ok(()) => Ok(out[0]),
                                Err(GatherError::Fault(f)) => Err(f),
                                Err(e) => panic!("{e}"),
                            }
                        };
                        let after = states[s].load(Ordering::SeqCst);
                        let (g, phase) = (before / 4, before % 4);
                        if before == after && phase == MAPPED {
                            // Map had returned before the read began; unmap had not begun when
                            // it ended.
                            assert_eq!(
                                r,
                                Ok(tag(s, g)),
                                "slot {s} generation {g}: a read wholly between map and unmap"
                            );
                            c.clean_ok += 1;
                            observed[s].fetch_max(before, Ordering::SeqCst);
                        } else if before == after && phase == UNMAPPED {
                            // Strict unmap had returned before the read began; the next map had
                            // not begun when it ended.
                            let f = match r {
                                Ok(v) => panic!(
                                    "slot {s} generation {g}: read {v:#x} after its strict unmap returned"
                                ),
                                Err(f) => f,
                            };
                            assert_eq!(f.reason, FaultReason::NotMapped, "slot {s} generation {g}");
                            c.clean_faults += 1;
                            observed[s].fetch_max(before, Ordering::SeqCst);
                        } else {
                            match r {
                                Ok(v) => {
                                    // Some generation whose map had begun by the end of the
                                    // read and whose unmap had not returned at its start.
                                    let lo = if phase == UNMAPPED { g + 1 } else { g };
                                    let hi = after / 4;
                                    assert!(
                                        (lo..=hi).any(|k| v == tag(s, k)),
                                        "slot {s}: read {v:#x} racing states {before} → {after}"
                                    );
                                    c.racing_ok += 1;
                                }
                                Err(f) => {
                                    assert_eq!(f.reason, FaultReason::NotMapped);
                                    c.racing_faults += 1;
                                }
                            }
                        }
                    }
                    // Leaves the mappers room on a busy machine.
                    sweeps += 1;
                    if sweeps.is_multiple_of(16) {
                        std::thread::yield_now();
                    }
                }
                c
            })
        })
        .collect();

    let mappers: Vec<_> = (0..2u64)
        .map(|m| {
            let (dom, mem, iovas, states, observed, failed) =
                (dom.clone(), mem.clone(), iovas.clone(), states.clone(), observed.clone(), failed.clone());
            std::thread::spawn(move || {
                let _flag = PanicFlag(failed.clone());
                // Holds slot s in `st` until a reader has classified a read wholly inside it.
                let hold = |s: usize, st: u64| {
                    while observed[s].load(Ordering::SeqCst) < st {
                        assert!(!failed.load(Ordering::SeqCst), "another thread failed");
                        std::thread::yield_now();
                    }
                };
                let mut pages = Vec::new();
                for i in 0..2 * GENERATIONS {
                    // Mapper m owns slots m and m + 2, alternately.
                    let s = (m + 2 * (i % 2)) as usize;
                    let g = i / 2 + 1;
                    let checkpoint = g % CHECKPOINT_EVERY == 0;
                    let page = mem.alloc_frame().unwrap();
                    mem.write_u64(page, tag(s, g)).unwrap();
                    states[s].store(state(g, MAPPING), Ordering::SeqCst);
                    dom.map(iovas[s], MapSource::Pages(&[page]), Prot::READ).unwrap();
                    states[s].store(state(g, MAPPED), Ordering::SeqCst);
                    if checkpoint {
                        hold(s, state(g, MAPPED));
                    }
                    // Some unrelated IOVA churn on the side.
                    let side = dom.alloc_iova(3 * PAGE_SIZE).unwrap();
                    dom.free_iova(side, 3 * PAGE_SIZE).unwrap();
                    states[s].store(state(g, UNMAPPING), Ordering::SeqCst);
                    assert_eq!(dom.unmap(iovas[s], PAGE_SIZE), Ok(PAGE_SIZE));
                    states[s].store(state(g, UNMAPPED), Ordering::SeqCst);
                    if checkpoint {
                        hold(s, state(g, UNMAPPED));
                    }
                    // Frames stay allocated (and keep their tag) until the end, so a stale
                    // translation would read an old generation and be caught.
                    pages.push(page);
                }
                pages
            })
        })
        .collect();
    let mapped: Vec<_> = mappers.into_iter().map(|m| m.join()).collect();
    stop.store(true, Ordering::Release);
    let flushes = flusher.join().unwrap();
    let counts: Vec<_> = readers.into_iter().map(|r| r.join()).collect();
    let mut pages = Vec::new();
    for m in mapped {
        pages.extend(m.expect("a mapper failed"));
    }
    let mut total = Counts::default();
    for c in counts {
        let c = c.expect("a reader failed");
        total.clean_ok += c.clean_ok;
        total.clean_faults += c.clean_faults;
        total.racing_ok += c.racing_ok;
        total.racing_faults += c.racing_faults;
    }
    eprintln!("{total:?}, IOTLB flushes: {flushes}, {:?}", started.elapsed());
    // Every checkpoint was observed in both phases, so neither count can be zero.
    assert!(total.clean_ok >= CHECKPOINTS, "reads between map and unmap: {total:?}");
    assert!(total.clean_faults >= CHECKPOINTS, "reads after unmap returned: {total:?}");
    // Every slot ends unmapped, at its last generation.
    for (s, &iova) in iovas.iter().enumerate() {
        assert_eq!(states[s].load(Ordering::SeqCst), state(GENERATIONS, UNMAPPED));
        assert_eq!(iommu.dma_read_u64(dev, iova).unwrap_err().reason, FaultReason::NotMapped);
    }
    mem.free_frames(&pages).unwrap();
}
#[test]
fn a_walk_through_a_table_freed_by_a_strict_unmap_never_commits() {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let dom = iommu.create_domain(DomainConfig::default()).unwrap();
    let dev = DeviceId(0x10);
    iommu.register_device(dev, true).unwrap();
    iommu.attach(dev, &dom).unwrap();
    // x: never mapped; y: its neighbour in the same leaf table, mapped and unmapped over and
    // over, so that the tables on x's path are freed and rebuilt each time.
    let x = dom.alloc_iova(PAGE_SIZE).unwrap();
    let y = dom.alloc_iova(PAGE_SIZE).unwrap();
    let page = mem.alloc_frame().unwrap();
    mem.write_u64(page, 0x1234).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (iommu, stop) = (iommu.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                if let Ok(v) = iommu.dma_read_u64(dev, x) {
                    return Err((n, v));
                }
                n += 1;
            }
            Ok(n)
        })
    };
    let t0 = std::time::Instant::now();
    let mut cycles = 0u64;
    while t0.elapsed() < std::time::Duration::from_secs(2) && !reader.is_finished() {
        let side = mem.alloc_frames(3).unwrap();
        dom.map(y, MapSource::Pages(&[page]), Prot::READ).unwrap();
        dom.unmap(y, PAGE_SIZE).unwrap();
        mem.free_frames(&side).unwrap();
        cycles += 1;
    }
    stop.store(true, Ordering::Release);
    let r = reader.join().unwrap();
    eprintln!("cycles {cycles} in {:?}: {r:?}", t0.elapsed());
    assert!(r.is_ok(), "a never-mapped IOVA was read: {r:?}");
}
