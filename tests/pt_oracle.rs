//! Property tests: random map/unmap sequences against a plain `BTreeMap` of pages, and the
//! `x86_64` crate's walker as an independent reader of the same tables.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use vmbind::addr::{DmaAddr, PAGE_SIZE, PageSize, PhysAddr};
use vmbind::mem::PhysMem;
#[path = "common/rng.rs"]
mod rng;
use vmbind::pt::{MapError, MapOptions, MapSource, PageTable, Prot, X86Iommu};

const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
/// The VA window the operations touch (below 2^47 so that x86 addresses stay canonical).
const WINDOW: u64 = 8 * GIB;

#[derive(Clone, Debug)]
enum Op {
    /// Contiguous physical range.
    MapRange {
        va: u64,
        pa: u64,
        pages: u64,
        prot: Prot,
        force_4k: bool,
    },
    /// Scattered pages derived from a seed.
    MapPages {
        va: u64,
        seed: u64,
        pages: u64,
        prot: Prot,
    },
    Unmap {
        va: u64,
        pages: u64,
    },
}

fn align_of(kind: u8) -> u64 {
    match kind {
        0 => PAGE_SIZE,
        1 => MIB2,
        _ => GIB,
    }
}

fn pages_of(kind: u8, n: u64) -> u64 {
    match kind {
        0 => 1 + n % 40,
        1 => 512 * (1 + n % 3) + (n % 2) * (n % 700),
        2 => 1 + n % 2000,
        _ => 262_144,
    }
}

fn prot_strategy() -> impl Strategy<Value = Prot> {
    prop_oneof![Just(Prot::READ), Just(Prot::RW)]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let va = (0u8..3, 0u64..u64::MAX).prop_map(|(k, r)| {
        let a = align_of(k);
        (r % (WINDOW / a)) * a
    });
    let pages = (prop_oneof![8 => 0u8..3, 1 => Just(3u8)], any::<u64>()).prop_map(|(k, n)| pages_of(k, n));
    prop_oneof![
        4 => (va.clone(), 0u8..3, any::<u64>(), pages.clone(), prot_strategy(), proptest::bool::weighted(0.2))
            .prop_map(|(va, k, r, pages, prot, force_4k)| {
                let a = align_of(k);
                let pa = GIB + (r % (64 * GIB / a)) * a;
                Op::MapRange { va, pa, pages, prot, force_4k }
            }),
        2 => (va.clone(), any::<u64>(), 1u64..3000, prot_strategy())
            .prop_map(|(va, seed, pages, prot)| Op::MapPages { va, seed, pages, prot }),
        3 => (va, pages).prop_map(|(va, pages)| Op::Unmap { va, pages }),
    ]
}

fn scattered(seed: u64, n: u64) -> Vec<PhysAddr> {
    let mut rng = rng::SplitMix64::new(seed);
    (0..n).map(|_| PhysAddr::new((1 + rng.below(1 << 30)) << 12)).collect()
}

struct Model {
    mem: Arc<PhysMem>,
    pt: PageTable<X86Iommu>,
    oracle: BTreeMap<u64, (u64, Prot)>,
    touched: Vec<(u64, u64)>,
}

impl Model {
    fn new() -> Self {
        let mem = Arc::new(PhysMem::new(1 << 30).unwrap());
        let pt = PageTable::new(mem.clone()).unwrap();
        Model { mem, pt, oracle: BTreeMap::new(), touched: Vec::new() }
    }

    fn mapped_in(&self, va: u64, pages: u64) -> Option<u64> {
        self.oracle.range(va..va + pages * PAGE_SIZE).next().map(|(&k, _)| k)
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::MapRange { va, pa, pages, prot, force_4k } => {
                let pages = pages.min((WINDOW - va) / PAGE_SIZE).max(1);
                let len = pages * PAGE_SIZE;
                let opts = if force_4k { MapOptions::FORCE_4K } else { MapOptions::default() };
                let r = self.pt.map(
                    DmaAddr::new(va),
                    MapSource::Range { pa: PhysAddr::new(pa), len },
                    prot,
                    opts,
                );
                self.check_map(va, pages, r, |i| pa + i * PAGE_SIZE, prot);
            }
            Op::MapPages { va, seed, pages, prot } => {
                let pages = pages.min((WINDOW - va) / PAGE_SIZE).max(1);
                let list = scattered(seed, pages);
                let r = self.pt.map(DmaAddr::new(va), MapSource::Pages(&list), prot, MapOptions::default());
                self.check_map(va, pages, r, |i| list[i as usize].as_u64(), prot);
            }
            Op::Unmap { va, pages } => {
                let pages = pages.min((WINDOW - va) / PAGE_SIZE).max(1);
                let end = va + pages * PAGE_SIZE;
                let inv = self.pt.unmap(DmaAddr::new(va), pages * PAGE_SIZE).unwrap();
                let gone: Vec<u64> = self.oracle.range(va..end).map(|(&k, _)| k).collect();
                assert_eq!(inv.unmapped_bytes(), gone.len() as u64 * PAGE_SIZE);
                if let Some((s, l)) = inv.range() {
                    assert!(s.as_u64() >= va && s.as_u64() + l <= end);
                    assert_eq!(s.as_u64(), gone[0]);
                    assert_eq!(s.as_u64() + l, gone.last().unwrap() + PAGE_SIZE);
                } else {
                    assert!(gone.is_empty());
                }
                inv.complete();
                for k in gone {
                    self.oracle.remove(&k);
                }
                self.touched.push((va, pages));
            }
        }
    }

    fn check_map(
        &mut self,
        va: u64,
        pages: u64,
        r: Result<vmbind::pt::MapStats, MapError<DmaAddr>>,
        pa_of: impl Fn(u64) -> u64,
        prot: Prot,
    ) {
        match self.mapped_in(va, pages) {
            Some(first) => assert_eq!(r, Err(MapError::AlreadyMapped { va: DmaAddr::new(first) })),
            None => {
                let stats = r.unwrap();
                assert_eq!(stats.bytes, pages * PAGE_SIZE);
                for i in 0..pages {
                    self.oracle.insert(va + i * PAGE_SIZE, (pa_of(i), prot));
                }
            }
        }
        self.touched.push((va, pages));
    }

    fn verify(&self) {
        for &(va, pages) in &self.touched {
            for i in 0..pages {
                let page = va + i * PAGE_SIZE;
                let got =
                    self.pt.translate(DmaAddr::new(page + 0x18)).map(|t| (t.pa.as_u64() - 0x18, t.prot));
                assert_eq!(got, self.oracle.get(&page).copied(), "page {page:#x}");
            }
        }
        let leaf_bytes: u64 = self.pt.leaves().iter().map(|l| l.size.bytes()).sum();
        assert_eq!(leaf_bytes, self.oracle.len() as u64 * PAGE_SIZE);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_map_unmap_sequences_match_a_btreemap_oracle(ops in proptest::collection::vec(op_strategy(), 1..40)) {
        let mut m = Model::new();
        let usage = m.mem.usage();
        for op in &ops {
            m.apply(op);
        }
        m.verify();
        // Unmapping everything returns every table page and every reserved frame.
        m.pt.unmap(DmaAddr::new(0), WINDOW).unwrap().complete();
        prop_assert_eq!(m.pt.table_pages(), 1);
        prop_assert_eq!(m.pt.split_reserve(), 0);
        prop_assert_eq!(m.mem.usage(), usage);
    }

    #[test]
    fn the_x86_64_crate_walks_our_tables_to_the_same_addresses(ops in proptest::collection::vec(op_strategy(), 1..25)) {
        use x86_64::structures::paging::{OffsetPageTable, PageTable as X86Table, Translate};
        let mut m = Model::new();
        for op in &ops {
            m.apply(op);
        }
        let root = m.mem.host_ptr(m.pt.root(), PAGE_SIZE).unwrap();
        let offset = m.mem.host_ptr(PhysAddr::new(0), 0).unwrap().as_ptr() as u64;
        // SAFETY: the root frame is a live, 4 KiB-aligned table of the arena; the walker only
        // reads it (no map/unmap happens while `walker` exists), and every table it reaches sits
        // at `offset + pa` inside the same mapping.
        let walker = unsafe { OffsetPageTable::new(&mut *root.as_ptr().cast::<X86Table>(), x86_64::VirtAddr::new(offset)) };
        for &(va, pages) in &m.touched {
            for i in 0..pages {
                let page = va + i * PAGE_SIZE;
                let ours = m.pt.translate(DmaAddr::new(page + 0x234)).map(|t| t.pa.as_u64());
                let theirs = walker.translate_addr(x86_64::VirtAddr::new(page + 0x234)).map(|p| p.as_u64());
                prop_assert_eq!(ours, theirs, "page {:#x}", page);
            }
        }
    }
}

/// One long seeded run on ONE table, as Linux's generic page-table test runs 1000 random
/// operations on one table: maps of 1 page to a few MiB (contiguous ranges, 2 MiB aligned ranges
/// that become huge leaves, scattered page lists of real arena frames) and unmaps of random
/// ranges (partly covering huge leaves and holes) in a 4 GiB window, so that overlaps are common.
/// Every operation is checked against a page-level oracle; the whole table every 50 operations.
struct LongRun {
    mem: Arc<PhysMem>,
    pt: PageTable<X86Iommu>,
    /// Usage once the test's data frames are allocated: what an empty table leaves.
    base: vmbind::mem::MemUsage,
    /// 8 MiB physically contiguous blocks: sources of ranges and huge leaves.
    blocks: Vec<PhysAddr>,
    /// Scattered single frames: sources of page lists.
    frames: Vec<PhysAddr>,
    oracle: BTreeMap<u64, (u64, Prot)>,
    rng: rng::SplitMix64,
    /// Maps refused as overlapping, huge leaves written, unmaps that cut into a huge leaf.
    refused: u64,
    huge_mapped: u64,
    huge_cut: u64,
}

const LONG_WINDOW: u64 = 4 * GIB;
const BLOCK: u64 = 8 << 20;

impl LongRun {
    fn pick_prot(&mut self) -> Prot {
        if self.rng.below(2) == 0 { Prot::READ } else { Prot::RW }
    }

    /// An `align`-aligned address in the window: uniform half the time, else next to (at most a
    /// few `align`s from) a mapped page, so that overlaps and partial unmaps happen often.
    fn pick_va(&mut self, align: u64) -> u64 {
        let slots = LONG_WINDOW / align;
        let r = self.rng.below(LONG_WINDOW);
        let near = self.oracle.range(r..).next().or_else(|| self.oracle.iter().next()).map(|(&k, _)| k);
        match near {
            Some(k) if self.rng.below(2) == 0 => {
                let slot = (k / align) as i64 + self.rng.below(7) as i64 - 3;
                slot.clamp(0, slots as i64 - 1) as u64 * align
            }
            _ => self.rng.below(slots) * align,
        }
    }

    /// What must not change when an operation is refused, and the per-op invariants.
    fn snapshot(&self) -> (vmbind::mem::MemUsage, u64, u64) {
        (self.mem.usage(), self.pt.table_pages(), self.pt.split_reserve())
    }

    fn check_accounting(&self) {
        let u = self.mem.usage();
        // The table's pages (beyond the root) and its split reserve are all it takes from the arena.
        assert_eq!(u.free_frames, self.base.free_frames - (self.pt.table_pages() - 1));
        assert_eq!(u.reserved_frames, self.pt.split_reserve());
    }

    fn map(&mut self) {
        let prot = self.pick_prot();
        let kind = self.rng.below(10);
        // (va, pa of page i, pages, result)
        let (va, pages, r, pa_of): (u64, u64, _, Box<dyn Fn(u64) -> u64>) = if kind < 4 {
            // A contiguous range, 4 KiB aligned: mostly 4 KiB leaves.
            let block = self.blocks[self.rng.below(self.blocks.len() as u64) as usize].as_u64();
            let off = self.rng.below(BLOCK / PAGE_SIZE);
            let va = self.pick_va(PAGE_SIZE);
            let pages =
                (1 + self.rng.below(1536)).min(BLOCK / PAGE_SIZE - off).min((LONG_WINDOW - va) / PAGE_SIZE);
            let pa = block + off * PAGE_SIZE;
            let opts = if self.rng.below(5) == 0 { MapOptions::FORCE_4K } else { MapOptions::default() };
            let src = MapSource::Range { pa: PhysAddr::new(pa), len: pages * PAGE_SIZE };
            let r = self.pt.map(DmaAddr::new(va), src, prot, opts);
            (va, pages, r, Box::new(move |i| pa + i * PAGE_SIZE))
        } else if kind < 7 {
            // A 2 MiB aligned range of 2 MiB aligned memory: huge leaves, sometimes a 4 KiB tail.
            let block = self.blocks[self.rng.below(self.blocks.len() as u64) as usize].as_u64();
            let off = self.rng.below(BLOCK / MIB2);
            let va = self.pick_va(MIB2);
            let whole = 1 + self.rng.below(BLOCK / MIB2 - off);
            let tail = if self.rng.below(3) == 0 && whole < BLOCK / MIB2 - off {
                1 + self.rng.below(511)
            } else {
                0
            };
            let pages = (whole * 512 + tail).min((LONG_WINDOW - va) / PAGE_SIZE);
            let pa = block + off * MIB2;
            let src = MapSource::Range { pa: PhysAddr::new(pa), len: pages * PAGE_SIZE };
            let r = self.pt.map(DmaAddr::new(va), src, prot, MapOptions::default());
            (va, pages, r, Box::new(move |i| pa + i * PAGE_SIZE))
        } else {
            // Scattered frames of the arena (repeats allowed: a frame may be mapped twice).
            let align = if self.rng.below(2) == 0 { PAGE_SIZE } else { MIB2 };
            let va = self.pick_va(align);
            let n = (1 + self.rng.below(1024)).min((LONG_WINDOW - va) / PAGE_SIZE);
            let list: Vec<PhysAddr> =
                (0..n).map(|_| self.frames[self.rng.below(self.frames.len() as u64) as usize]).collect();
            let r = self.pt.map(DmaAddr::new(va), MapSource::Pages(&list), prot, MapOptions::default());
            (va, n, r, Box::new(move |i| list[i as usize].as_u64()))
        };
        let end = va + pages * PAGE_SIZE;
        match self.oracle.range(va..end).next().map(|(&k, _)| k) {
            Some(first) => {
                assert_eq!(
                    r,
                    Err(MapError::AlreadyMapped { va: DmaAddr::new(first) }),
                    "map [{va:#x}, {end:#x})"
                );
                self.refused += 1;
            }
            None => {
                let stats = r.unwrap_or_else(|e| panic!("map [{va:#x}, {end:#x}) of free space: {e}"));
                assert_eq!(stats.bytes, pages * PAGE_SIZE);
                assert_eq!(stats.leaves[0] + 512 * stats.leaves[1], pages);
                self.huge_mapped += stats.leaves[1];
                for i in 0..pages {
                    self.oracle.insert(va + i * PAGE_SIZE, (pa_of(i), prot));
                }
            }
        }
    }

    fn unmap(&mut self) {
        let (va, pages) = match self.rng.below(40) {
            // Short, from next to a mapped page.
            0..=17 => {
                let va = self.pick_va(PAGE_SIZE);
                (va, 1 + self.rng.below(1024))
            }
            // From inside a 2 MiB slot: cuts into huge leaves.
            18..=31 => {
                let va = self.pick_va(MIB2) + PAGE_SIZE * (1 + self.rng.below(511));
                (va, 1 + self.rng.below(2048))
            }
            // Long: up to 64 MiB, holes and all.
            32..=38 => {
                let va = self.pick_va(MIB2);
                (va, 512 * (1 + self.rng.below(32)))
            }
            // Very long: a quarter of the window.
            _ => (self.rng.below(4) * GIB, GIB / PAGE_SIZE),
        };
        let pages = pages.min((LONG_WINDOW - va) / PAGE_SIZE);
        let end = va + pages * PAGE_SIZE;
        let cuts_huge = |a: u64| {
            !a.is_multiple_of(MIB2)
                && self.pt.translate(DmaAddr::new(a)).is_some_and(|t| t.size == PageSize::Size2M)
        };
        if cuts_huge(va) || cuts_huge(end) {
            self.huge_cut += 1;
        }
        let inv = self.pt.unmap(DmaAddr::new(va), pages * PAGE_SIZE).unwrap();
        let gone: Vec<u64> = self.oracle.range(va..end).map(|(&k, _)| k).collect();
        assert_eq!(inv.unmapped_bytes(), gone.len() as u64 * PAGE_SIZE, "unmap [{va:#x}, {end:#x})");
        match inv.range() {
            Some((s, l)) => {
                assert_eq!(s.as_u64(), gone[0]);
                assert_eq!(s.as_u64() + l, gone.last().unwrap() + PAGE_SIZE);
            }
            None => assert!(gone.is_empty()),
        }
        inv.complete();
        for k in gone {
            self.oracle.remove(&k);
        }
    }

    /// The whole table, expanded to pages, against the oracle; the split reserve against the
    /// huge leaves; and translations at random addresses.
    fn verify(&mut self) {
        let leaves = self.pt.leaves();
        let mut want = self.oracle.iter();
        let mut huge = 0;
        for l in &leaves {
            assert_ne!(l.size, PageSize::Size1G, "no 1 GiB source exists");
            huge += u64::from(l.size == PageSize::Size2M);
            for i in 0..l.size.bytes() / PAGE_SIZE {
                let got = (l.va.as_u64() + i * PAGE_SIZE, (l.pa.as_u64() + i * PAGE_SIZE, l.prot));
                assert_eq!(Some((&got.0, &got.1)), want.next(), "leaf {l:?}, page {i}");
            }
        }
        assert_eq!(want.next(), None, "the oracle has pages the table lacks");
        assert_eq!(self.pt.split_reserve(), huge, "one split frame reserved per 2 MiB leaf");
        for _ in 0..200 {
            let va = if self.rng.below(2) == 0 {
                self.pick_va(PAGE_SIZE) + self.rng.below(PAGE_SIZE)
            } else {
                self.rng.below(LONG_WINDOW)
            };
            let page = va & !(PAGE_SIZE - 1);
            let want = self.oracle.get(&page).map(|&(pa, prot)| (pa + (va - page), prot));
            let got = self.pt.translate(DmaAddr::new(va)).map(|t| (t.pa.as_u64(), t.prot));
            assert_eq!(got, want, "translate {va:#x}");
        }
    }
}

#[test]
fn two_thousand_seeded_random_ops_on_one_table_match_the_oracle() {
    const OPS: usize = 2000;
    let mem = Arc::new(PhysMem::new(GIB).unwrap());
    let pt = PageTable::<X86Iommu>::new(mem.clone()).unwrap();
    let after_table = mem.usage();
    let blocks: Vec<PhysAddr> = (0..8).map(|_| mem.alloc_block(BLOCK).unwrap()).collect();
    let frames = mem.alloc_scattered(4096, 0xf4a3e5).unwrap();
    let data_frames = 8 * BLOCK / PAGE_SIZE + 4096;
    let base = mem.usage();
    assert_eq!(base.free_frames, after_table.free_frames - data_frames);
    let mut run = LongRun {
        mem,
        pt,
        base,
        blocks,
        frames,
        oracle: BTreeMap::new(),
        rng: rng::SplitMix64::new(0x1000_0000_5eed),
        refused: 0,
        huge_mapped: 0,
        huge_cut: 0,
    };
    for op in 0..OPS {
        let before = run.snapshot();
        let refused = run.refused;
        if run.rng.below(10) < 6 {
            run.map();
        } else {
            run.unmap();
        }
        if run.refused > refused {
            assert_eq!(run.snapshot(), before, "a refused map changed the table (op {op})");
        }
        run.check_accounting();
        if op % 50 == 49 {
            run.verify();
        }
    }
    run.verify();
    // The run was the one intended: overlaps refused, huge leaves made and cut.
    assert!(run.refused >= 100, "only {} maps overlapped", run.refused);
    assert!(run.huge_mapped >= 100, "only {} huge leaves mapped", run.huge_mapped);
    assert!(run.huge_cut >= 20, "only {} unmaps cut into a huge leaf", run.huge_cut);

    // Unmapping everything returns every table page and every reserved frame.
    let inv = run.pt.unmap(DmaAddr::new(0), LONG_WINDOW).unwrap();
    assert_eq!(inv.unmapped_bytes(), run.oracle.len() as u64 * PAGE_SIZE);
    inv.complete();
    run.oracle.clear();
    assert!(run.pt.leaves().is_empty());
    assert_eq!(run.pt.table_pages(), 1);
    assert_eq!(run.pt.split_reserve(), 0);
    assert_eq!(run.mem.usage(), base);
    for b in &run.blocks {
        run.mem.free_block(*b, BLOCK).unwrap();
    }
    run.mem.free_frames(&run.frames).unwrap();
    assert_eq!(run.mem.usage(), after_table);
}
