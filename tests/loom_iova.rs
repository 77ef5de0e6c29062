//! Loom model of the IOVA caches: per-CPU magazines exchanged with the shared depot and the
//! tree, under every interleaving loom explores. Run with
//! `RUSTFLAGS="--cfg loom" cargo test --release --test loom_iova` (magazines hold 2 IOVAs and the
//! depot 1 magazine under loom, so a few operations reach every exchange path).
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use vmbind::addr::{DmaAddr, PAGE_SIZE};
use vmbind::iommu::iova::IovaAllocator;

#[test]
fn magazine_exchange_with_the_depot_loses_and_duplicates_nothing() {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(2);
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    b.check(|| {
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // 10 pages; each thread takes 5, frees them (filling loaded, swapping with prev, pushing a
        // full magazine to the depot, or overflowing it back to the tree), then takes 5 again
        // (emptying loaded and prev, then pulling from the depot).
        let a = Arc::new(
            IovaAllocator::with_slots(DmaAddr::new(PAGE_SIZE), DmaAddr::new(11 * PAGE_SIZE), 2).unwrap(),
        );
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let a = a.clone();
                thread::spawn(move || {
                    let mut held = Vec::new();
                    for _round in 0..2 {
                        held = (0..5).map(|_| a.alloc(PAGE_SIZE).unwrap()).collect::<Vec<_>>();
                        let mut v = held.clone();
                        v.sort();
                        v.dedup();
                        assert_eq!(v.len(), 5, "one IOVA handed out twice to one thread");
                        for g in &held {
                            a.free(*g, PAGE_SIZE).unwrap();
                        }
                    }
                    held
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        // Every page is free exactly once: in the tree or in one cache slot, never in two.
        let s = a.stats();
        assert_eq!(s.live, 0);
        assert_eq!(s.cached as u64 + s.tree_free_pages, 10, "an IOVA cached twice, or lost");
        a.flush_caches();
        assert_eq!(a.stats().live, 0);
        assert_eq!(a.free_ranges(), vec![(DmaAddr::new(PAGE_SIZE), 10 * PAGE_SIZE)], "no IOVA lost");
    });
    eprintln!("explored {} interleavings", RUNS.load(std::sync::atomic::Ordering::Relaxed));
}

#[test]
fn concurrent_holders_never_share_an_iova() {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(2);
    b.check(|| {
        // Three pages only: both threads hold one while a third cycles through the caches.
        let a = Arc::new(
            IovaAllocator::with_slots(DmaAddr::new(PAGE_SIZE), DmaAddr::new(4 * PAGE_SIZE), 2).unwrap(),
        );
        let pre = a.alloc(PAGE_SIZE).unwrap();
        a.free(pre, PAGE_SIZE).unwrap(); // into the main thread's magazine
        let t = {
            let a = a.clone();
            thread::spawn(move || {
                let x = a.alloc(PAGE_SIZE).unwrap();
                let y = a.alloc(PAGE_SIZE).unwrap();
                assert_ne!(x, y);
                a.free(x, PAGE_SIZE).unwrap();
                y
            })
        };
        let z = a.alloc(PAGE_SIZE).unwrap();
        let y = t.join().unwrap();
        assert_ne!(z, y, "two holders of one IOVA");
        let s = a.stats();
        assert_eq!(s.cached as u64 + s.tree_free_pages, 1, "an IOVA cached twice, or lost");
        a.free(z, PAGE_SIZE).unwrap();
        a.free(y, PAGE_SIZE).unwrap();
        a.flush_caches();
        assert_eq!(a.free_ranges(), vec![(DmaAddr::new(PAGE_SIZE), 3 * PAGE_SIZE)]);
    });
}
