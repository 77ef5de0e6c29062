//! The one-leaf-table fast paths of map and unmap against the general walk: the same random
//! sequences of small and large maps and unmaps (every source kind, bad pages, overlaps, huge
//! leaves and their splits) run on two tables, one with the fast paths on and one with them off,
//! and on a `BTreeMap` of pages. After every operation the results, the errors, the
//! invalidations and the whole tables must be identical; emptied tables must be freed (a 4 KiB-
//! only table holds exactly one page per distinct prefix), and unmapping everything must give
//! every frame back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;
use vmbind::addr::{DmaAddr, PAGE_SIZE, PageSize, PhysAddr};
use vmbind::mem::{BioVec, PhysMem};
use vmbind::pt::{MapError, MapOptions, MapSource, MapStats, PageTable, Prot, X86Iommu};

const MIB2: u64 = 2 << 20;
/// Eight leaf tables' worth of addresses, straddling a 1 GiB boundary (so upper levels split
/// too): small operations land in the same tables again and again.
const BASE: u64 = (1 << 30) - 4 * MIB2;
const WINDOW: u64 = 8 * MIB2;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Range,
    Pages,
    PageVecs,
    BioVecs,
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        page: u64,
        pages: u64,
        kind: Kind,
        seed: u64,
        bad: Option<u64>,
        prot: Prot,
    },
    /// A 2 MiB-aligned contiguous map that may take a huge leaf.
    MapHuge {
        slot: u64,
        pa_slot: u64,
    },
    Unmap {
        page: u64,
        pages: u64,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![Just(Kind::Range), Just(Kind::Pages), Just(Kind::PageVecs), Just(Kind::BioVecs)];
    let prot = prop_oneof![Just(Prot::READ), Just(Prot::RW)];
    let small = prop_oneof![6 => 1u64..4, 3 => 1u64..40, 1 => 400u64..1100];
    prop_oneof![
        6 => (0..WINDOW / PAGE_SIZE, small.clone(), kind, any::<u64>(), proptest::option::weighted(0.1, 0u64..64), prot)
            .prop_map(|(page, pages, kind, seed, bad, prot)| Op::Map { page, pages, kind, seed, bad, prot }),
        1 => (0..WINDOW / MIB2, 0u64..64).prop_map(|(slot, pa_slot)| Op::MapHuge { slot, pa_slot }),
        5 => (0..WINDOW / PAGE_SIZE, small).prop_map(|(page, pages)| Op::Unmap { page, pages }),
    ]
}

/// Scattered, page-aligned physical pages from a seed; `bad` makes one of them unaligned.
fn frames(seed: u64, n: u64, bad: Option<u64>) -> Vec<PhysAddr> {
    let mut x = seed | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let pa = (1 + x % (1 << 28)) << 12;
            PhysAddr::new(if bad.is_some_and(|b| b % n == i) { pa | 0x800 } else { pa })
        })
        .collect()
}

struct Pair {
    mems: [Arc<PhysMem>; 2],
    /// `[fast paths on, fast paths off]`.
    pts: [PageTable<X86Iommu>; 2],
    model: BTreeMap<u64, (u64, Prot)>,
}

/// What an unmap reported, comparable across the two tables.
type InvView = (u64, Option<(DmaAddr, u64)>, Option<(DmaAddr, u64)>, usize, Vec<PageSize>);

impl Pair {
    fn new() -> Self {
        let mems = [Arc::new(PhysMem::new(64 << 20).unwrap()), Arc::new(PhysMem::new(64 << 20).unwrap())];
        let pts = [PageTable::new(mems[0].clone()).unwrap(), PageTable::new(mems[1].clone()).unwrap()];
        pts[1].set_fast_paths(false);
        Pair { mems, pts, model: BTreeMap::new() }
    }

    fn map_both(
        &self,
        va: u64,
        src: MapSource<'_>,
        prot: Prot,
        opts: MapOptions,
    ) -> Result<MapStats, MapError<DmaAddr>> {
        let r: Vec<_> = self.pts.iter().map(|pt| pt.map(DmaAddr::new(va), src, prot, opts)).collect();
        assert_eq!(r[0], r[1], "fast and general map disagree at {va:#x}");
        r[0].clone()
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Map { page, pages, kind, seed, bad, prot } => {
                let va = BASE + page * PAGE_SIZE;
                let pages = pages.min(WINDOW / PAGE_SIZE - page);
                let list = frames(seed, pages, bad);
                let bvecs = BioVec::from_frames(&list);
                let contiguous = PhysAddr::new((seed % (1 << 28) + 1) << 12);
                let src = match kind {
                    Kind::Range => MapSource::Range { pa: contiguous, len: pages * PAGE_SIZE },
                    Kind::Pages => MapSource::Pages(&list),
                    Kind::PageVecs => MapSource::PageVecs(&bvecs),
                    Kind::BioVecs => MapSource::BioVecs(&bvecs),
                };
                let r = self.map_both(va, src, prot, MapOptions::default());
                let first_mapped = self.model.range(va..va + pages * PAGE_SIZE).next().map(|(&k, _)| k);
                let bad_page = !matches!(kind, Kind::Range) && list.iter().any(|p| p.as_u64() & 0xfff != 0);
                // A bio_vec array is validated whole before the walk; page lists as it reads them.
                let first_mapped = first_mapped.filter(|_| !(bad_page && matches!(kind, Kind::BioVecs)));
                match (first_mapped, bad_page) {
                    (Some(first), _) => {
                        assert_eq!(r, Err(MapError::AlreadyMapped { va: DmaAddr::new(first) }))
                    }
                    (None, true) => assert!(matches!(r, Err(MapError::UnalignedSource { .. })), "{r:?}"),
                    (None, false) => {
                        assert_eq!(r.unwrap().bytes, pages * PAGE_SIZE);
                        for i in 0..pages {
                            let pa = match kind {
                                Kind::Range => contiguous.as_u64() + i * PAGE_SIZE,
                                _ => list[i as usize].as_u64(),
                            };
                            self.model.insert(va + i * PAGE_SIZE, (pa, prot));
                        }
                    }
                }
            }
            Op::MapHuge { slot, pa_slot } => {
                let va = BASE + slot * MIB2;
                let pa = (pa_slot + 1) * MIB2;
                let src = MapSource::Range { pa: PhysAddr::new(pa), len: MIB2 };
                let r = self.map_both(va, src, Prot::RW, MapOptions::default());
                match self.model.range(va..va + MIB2).next() {
                    Some((&first, _)) => {
                        assert_eq!(r, Err(MapError::AlreadyMapped { va: DmaAddr::new(first) }))
                    }
                    None => {
                        assert_eq!(r.unwrap().leaves, [0, 1, 0]);
                        for i in 0..512 {
                            self.model.insert(va + i * PAGE_SIZE, (pa + i * PAGE_SIZE, Prot::RW));
                        }
                    }
                }
            }
            Op::Unmap { page, pages } => {
                let va = BASE + page * PAGE_SIZE;
                let pages = pages.min(WINDOW / PAGE_SIZE - page);
                let end = va + pages * PAGE_SIZE;
                let views: Vec<InvView> = self
                    .pts
                    .iter()
                    .map(|pt| {
                        let inv = pt.unmap(DmaAddr::new(va), pages * PAGE_SIZE).unwrap();
                        let v = (
                            inv.unmapped_bytes(),
                            inv.range(),
                            inv.flush_range(),
                            inv.freed_tables(),
                            inv.page_sizes().collect(),
                        );
                        inv.complete();
                        v
                    })
                    .collect();
                assert_eq!(views[0], views[1], "fast and general unmap disagree at {va:#x}");
                let gone: Vec<u64> = self.model.range(va..end).map(|(&k, _)| k).collect();
                assert_eq!(views[0].0, gone.len() as u64 * PAGE_SIZE);
                for k in gone {
                    self.model.remove(&k);
                }
            }
        }
    }

    fn verify(&self) {
        let [a, b] = &self.pts;
        assert_eq!(a.leaves(), b.leaves());
        assert_eq!(a.table_pages(), b.table_pages());
        assert_eq!(a.split_reserve(), b.split_reserve());
        let leaves = a.leaves();
        let bytes: u64 = leaves.iter().map(|l| l.size.bytes()).sum();
        assert_eq!(bytes, self.model.len() as u64 * PAGE_SIZE);
        for l in &leaves {
            for off in (0..l.size.bytes()).step_by(PAGE_SIZE as usize) {
                let va = l.va.as_u64() + off;
                assert_eq!(self.model.get(&va), Some(&(l.pa.as_u64() + off, l.prot)), "{va:#x}");
            }
        }
        if leaves.iter().all(|l| l.size == PageSize::Size4K) {
            // No empty table survives: one page per distinct prefix at each level, plus the root.
            let distinct = |shift: u32| self.model.keys().map(|k| k >> shift).collect::<BTreeSet<_>>().len();
            let want = 1 + distinct(39) + distinct(30) + distinct(21);
            assert_eq!(a.table_pages(), want as u64, "an emptied table was kept, or a live one freed");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn fast_and_general_paths_build_identical_tables(ops in proptest::collection::vec(op_strategy(), 1..120)) {
        let mut p = Pair::new();
        let usage = [p.mems[0].usage(), p.mems[1].usage()];
        for op in &ops {
            p.apply(op);
            p.verify();
        }
        for pt in &p.pts {
            pt.unmap(DmaAddr::new(BASE), WINDOW).unwrap().complete();
            prop_assert_eq!(pt.table_pages(), 1);
            prop_assert_eq!(pt.split_reserve(), 0);
        }
        prop_assert_eq!(p.mems[0].usage(), usage[0]);
        prop_assert_eq!(p.mems[1].usage(), usage[1]);
    }
}

/// Page by page, ascending and then descending, the way per-call benchmarks drive it: every
/// leaf table is freed the moment its last page goes, whichever path removes it.
#[test]
fn one_page_calls_free_each_table_as_it_empties() {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let pt = PageTable::<X86Iommu>::new(mem.clone()).unwrap();
    let usage = mem.usage();
    let pages = 3 * 512 + 7;
    // Two leaf tables below a 1 GiB boundary, two above.
    let base = (1 << 30) - 2 * MIB2;
    for order in [false, true] {
        for i in 0..pages {
            let va = DmaAddr::new(base + i * PAGE_SIZE);
            let src = MapSource::Range { pa: PhysAddr::new((i + 1) << 12), len: PAGE_SIZE };
            pt.map(va, src, Prot::RW, MapOptions::default()).unwrap();
        }
        // 1 root, 1 L3, 2 L2, 4 leaf tables.
        assert_eq!(pt.table_pages(), 8);
        for k in 0..pages {
            let i = if order { pages - 1 - k } else { k };
            let inv = pt.unmap(DmaAddr::new(base + i * PAGE_SIZE), PAGE_SIZE).unwrap();
            assert_eq!(inv.unmapped_bytes(), PAGE_SIZE);
            inv.complete();
        }
        assert_eq!(pt.table_pages(), 1);
        assert_eq!(mem.usage(), usage);
    }
}
