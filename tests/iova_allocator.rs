//! The IOVA allocator against an oracle: no overlap, the rounding and alignment rules, top-down
//! placement, coalescing, exhaustion and recovery, heavy fragmentation, and several threads.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use vmbind::addr::{DmaAddr, PAGE_SIZE};
use vmbind::iommu::iova::{IovaAllocator, IovaError};
#[path = "common/rng.rs"]
mod rng;
use rng::SplitMix64;

fn rounded_pages(pages: u64) -> (u64, u64) {
    if pages <= 32 {
        let r = pages.next_power_of_two();
        (r, r)
    } else {
        (pages, pages.next_power_of_two().min(512))
    }
}

/// Highest aligned fit of `need` pages in `[start, end)` avoiding `live` (start pfn -> pages).
fn oracle_top_down(live: &BTreeMap<u64, u64>, start: u64, end: u64, need: u64, align: u64) -> Option<u64> {
    let mut hi = end;
    let mut ranges: Vec<(u64, u64)> = live.iter().map(|(&s, &n)| (s, s + n)).collect();
    ranges.sort();
    for &(s, e) in ranges.iter().rev().chain(std::iter::once(&(start, start))) {
        // gap [e, hi)
        if hi >= e + need {
            let a = (hi - need) & !(align - 1);
            if a >= e {
                return Some(a);
            }
        }
        hi = s;
    }
    None
}

fn no_overlap(live: &BTreeMap<u64, u64>) -> bool {
    let mut prev_end = 0;
    live.iter().all(|(&s, &n)| {
        let ok = s >= prev_end;
        prev_end = s + n;
        ok
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Sizes above 32 pages always use the tree: placement must be exactly top-down.
    #[test]
    fn large_allocations_are_placed_exactly_top_down(ops in proptest::collection::vec((any::<bool>(), 33u64..3000, any::<u64>()), 1..120)) {
        let (start, end) = (16u64, 1u64 << 20); // pages
        let a = IovaAllocator::new(DmaAddr::new(start * PAGE_SIZE), DmaAddr::new(end * PAGE_SIZE)).unwrap();
        let mut live: BTreeMap<u64, u64> = BTreeMap::new();
        for (alloc, pages, pick) in ops {
            if alloc || live.is_empty() {
                let (need, align) = rounded_pages(pages);
                let want = oracle_top_down(&live, start, end, need, align);
                match a.alloc(pages * PAGE_SIZE) {
                    Ok(got) => {
                        prop_assert_eq!(Some(got.as_u64() / PAGE_SIZE), want);
                        live.insert(got.as_u64() / PAGE_SIZE, need);
                    }
                    Err(IovaError::Exhausted { .. }) => prop_assert_eq!(want, None),
                    Err(e) => prop_assert!(false, "{}", e),
                }
            } else {
                let k = *live.keys().nth((pick % live.len() as u64) as usize).unwrap();
                let n = live.remove(&k).unwrap();
                a.free(DmaAddr::new(k * PAGE_SIZE), n * PAGE_SIZE).unwrap();
            }
            prop_assert!(no_overlap(&live));
        }
        for (k, n) in std::mem::take(&mut live) {
            a.free(DmaAddr::new(k * PAGE_SIZE), n * PAGE_SIZE).unwrap();
        }
        prop_assert_eq!(a.free_ranges(), vec![(DmaAddr::new(start * PAGE_SIZE), (end - start) * PAGE_SIZE)]);
    }

    /// Mixed sizes, through the per-CPU caches: rules hold, nothing overlaps, and freeing
    /// everything gives the whole aperture back.
    #[test]
    fn mixed_allocations_respect_the_rules_and_coalesce(ops in proptest::collection::vec((0u8..4, 1u64..200, any::<u64>()), 1..300)) {
        let (start, end) = (1u64, 1u64 << 16);
        let a = IovaAllocator::new(DmaAddr::new(start * PAGE_SIZE), DmaAddr::new(end * PAGE_SIZE)).unwrap();
        let mut live: BTreeMap<u64, u64> = BTreeMap::new();
        for (kind, pages, pick) in ops {
            if kind > 0 || live.is_empty() {
                let (need, align) = rounded_pages(pages);
                match a.alloc(pages * PAGE_SIZE) {
                    Ok(got) => {
                        let pfn = got.as_u64() / PAGE_SIZE;
                        prop_assert_eq!(pfn % align, 0, "aligned");
                        prop_assert!(pfn >= start && pfn + need <= end, "inside the aperture");
                        prop_assert!(live.insert(pfn, need).is_none());
                        prop_assert!(no_overlap(&live), "no overlap");
                    }
                    Err(IovaError::Exhausted { .. }) => {}
                    Err(e) => prop_assert!(false, "{}", e),
                }
            } else {
                let k = *live.keys().nth((pick % live.len() as u64) as usize).unwrap();
                let n = live.remove(&k).unwrap();
                a.free(DmaAddr::new(k * PAGE_SIZE), n * PAGE_SIZE).unwrap();
                let again = a.free(DmaAddr::new(k * PAGE_SIZE), n * PAGE_SIZE);
                prop_assert!(
                    matches!(again, Err(IovaError::NotAllocated { .. })),
                    "double free refused"
                );
            }
        }
        for (k, n) in std::mem::take(&mut live) {
            a.free(DmaAddr::new(k * PAGE_SIZE), n * PAGE_SIZE).unwrap();
        }
        a.flush_caches();
        prop_assert_eq!(a.free_ranges(), vec![(DmaAddr::new(start * PAGE_SIZE), (end - start) * PAGE_SIZE)]);
        prop_assert_eq!(a.stats().live, 0);
    }
}

#[test]
fn exhaustion_is_a_typed_error_and_recovers_after_a_free() {
    let a = IovaAllocator::new(DmaAddr::new(PAGE_SIZE), DmaAddr::new(65 * PAGE_SIZE)).unwrap();
    let got: Vec<DmaAddr> = (0..64).map(|_| a.alloc(PAGE_SIZE).unwrap()).collect();
    assert!(matches!(a.alloc(PAGE_SIZE), Err(IovaError::Exhausted { .. })));
    a.free(got[10], PAGE_SIZE).unwrap();
    assert_eq!(a.alloc(PAGE_SIZE), Ok(got[10]));
}

#[test]
fn exhaustion_flushes_the_caches_and_retries_once() {
    let a = IovaAllocator::new(DmaAddr::new(64 * PAGE_SIZE), DmaAddr::new(128 * PAGE_SIZE)).unwrap();
    let got: Vec<DmaAddr> = (0..64).map(|_| a.alloc(PAGE_SIZE).unwrap()).collect();
    for g in &got {
        a.free(*g, PAGE_SIZE).unwrap();
    }
    // All 64 pages sit in this thread's magazines: the tree is empty.
    assert_eq!(a.stats().tree_free_pages, 0);
    assert_eq!(a.stats().cached, 64);
    // A 64-page allocation cannot come from the caches: the tree fails, caches flush, retry works.
    assert_eq!(a.alloc(64 * PAGE_SIZE), Ok(DmaAddr::new(64 * PAGE_SIZE)));
}

#[test]
fn limit_is_honoured_from_the_caches_too() {
    let a = IovaAllocator::new(DmaAddr::new(PAGE_SIZE), DmaAddr::new(1 << 40)).unwrap();
    let hi = a.alloc(PAGE_SIZE).unwrap();
    a.free(hi, PAGE_SIZE).unwrap();
    let lo = a.alloc_below(PAGE_SIZE, DmaAddr::new(1 << 32)).unwrap();
    assert!(lo.as_u64() < 1 << 32);
    assert_eq!(a.alloc(PAGE_SIZE), Ok(hi), "the cached high one is still there for unlimited callers");
}

#[test]
fn hundred_thousand_live_ranges_with_heavy_fragmentation() {
    let a = IovaAllocator::new(DmaAddr::new(PAGE_SIZE), DmaAddr::new(1 << 40)).unwrap();
    let mut rng = SplitMix64::new(100);
    let mut live = Vec::new();
    for _ in 0..200_000 {
        let pages = if rng.below(4) == 0 { 33 + rng.below(200) } else { 1 + rng.below(32) };
        live.push((a.alloc(pages * PAGE_SIZE).unwrap(), pages));
    }
    // Free every other one: 100k live ranges, 100k holes.
    let mut kept = Vec::new();
    for (i, (addr, pages)) in live.into_iter().enumerate() {
        if i % 2 == 0 {
            a.free(addr, pages * PAGE_SIZE).unwrap();
        } else {
            kept.push((addr, pages));
        }
    }
    a.flush_caches();
    let s = a.stats();
    assert_eq!(s.live, 100_000);
    assert!(s.tree_ranges > 50_000, "fragmented: {} free ranges", s.tree_ranges);
    // Large allocations still find room, top-down, without disturbing the live set.
    let big = a.alloc(1 << 20).unwrap();
    let mut spans: Vec<(u64, u64)> =
        kept.iter().map(|(x, p)| (x.as_u64(), x.as_u64() + rounded_pages(*p).0 * PAGE_SIZE)).collect();
    spans.push((big.as_u64(), big.as_u64() + (1 << 20)));
    spans.sort();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
    a.free(big, 1 << 20).unwrap();
    for (addr, pages) in kept {
        a.free(addr, pages * PAGE_SIZE).unwrap();
    }
    a.flush_caches();
    assert_eq!(a.free_ranges(), vec![(DmaAddr::new(PAGE_SIZE), (1 << 40) - PAGE_SIZE)]);
}

#[test]
fn threads_allocating_and_freeing_never_share_an_iova() {
    let a = Arc::new(IovaAllocator::new(DmaAddr::new(PAGE_SIZE), DmaAddr::new(1 << 30)).unwrap());
    let owned = Arc::new(Mutex::new(HashSet::new()));
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let (a, owned) = (a.clone(), owned.clone());
            std::thread::spawn(move || {
                let mut rng = SplitMix64::new(t);
                let mut mine: Vec<(DmaAddr, u64)> = Vec::new();
                for _ in 0..20_000 {
                    if (mine.len() < 64 && rng.below(2) == 0) || mine.is_empty() {
                        let span = if rng.below(8) == 0 { 100 } else { 32 };
                        let pages = 1 + rng.below(span);
                        let x = a.alloc(pages * PAGE_SIZE).unwrap();
                        let (need, _) = rounded_pages(pages);
                        let mut o = owned.lock().unwrap();
                        for p in 0..need {
                            assert!(o.insert(x.as_u64() / PAGE_SIZE + p), "page handed out twice");
                        }
                        drop(o);
                        mine.push((x, pages));
                    } else {
                        let k = rng.below(mine.len() as u64) as usize;
                        let (x, pages) = mine.swap_remove(k);
                        let (need, _) = rounded_pages(pages);
                        let mut o = owned.lock().unwrap();
                        for p in 0..need {
                            assert!(o.remove(&(x.as_u64() / PAGE_SIZE + p)));
                        }
                        drop(o);
                        // Half of the frees happen on another thread's allocation.
                        a.free(x, pages * PAGE_SIZE).unwrap();
                    }
                }
                mine
            })
        })
        .collect();
    let mut rest = Vec::new();
    for h in handles {
        rest.extend(h.join().unwrap());
    }
    // Cross-thread frees: the main thread frees what the workers still hold.
    for (x, pages) in rest {
        a.free(x, pages * PAGE_SIZE).unwrap();
    }
    a.flush_caches();
    assert_eq!(a.stats().live, 0);
    assert_eq!(a.free_ranges(), vec![(DmaAddr::new(PAGE_SIZE), (1 << 30) - PAGE_SIZE)], "no IOVA lost");
}
