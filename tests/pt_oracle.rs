//! Property tests: random map/unmap sequences against a plain `BTreeMap` of pages, and the
//! `x86_64` crate's walker as an independent reader of the same tables.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use vmbind::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
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
