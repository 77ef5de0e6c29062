//! Criterion micro-benchmarks of the page-table engine: map (scattered, contiguous, huge),
//! unmap, translate. 64 MiB per map; throughput is in 4 KiB pages.

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use vmbind::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use vmbind::mem::PhysMem;
#[path = "../tests/common/rng.rs"]
mod rng;
use rng::SplitMix64;
use vmbind::pt::{MapOptions, MapSource, PageTable, Prot, X86Iommu};

const PAGES: usize = 16_384;
const LEN: u64 = PAGES as u64 * PAGE_SIZE;

fn bench(c: &mut Criterion) {
    let mem = Arc::new(PhysMem::new(1 << 30).unwrap());
    let frames = mem.alloc_scattered(PAGES, 1).unwrap();
    let pt = PageTable::<X86Iommu>::new(mem.clone()).unwrap();
    let iova = DmaAddr::new(1 << 32);
    let clear = || pt.unmap(iova, LEN).unwrap().complete();

    let mut g = c.benchmark_group("pt");
    g.throughput(Throughput::Elements(PAGES as u64));
    g.bench_function("map_4k_scattered", |b| {
        b.iter_batched(
            clear,
            |()| pt.map(iova, MapSource::Pages(&frames), Prot::RW, MapOptions::default()).unwrap(),
            BatchSize::PerIteration,
        )
    });
    let range = MapSource::Range { pa: PhysAddr::new(1 << 30), len: LEN };
    g.bench_function("map_4k_contiguous", |b| {
        b.iter_batched(
            clear,
            |()| pt.map(iova, range, Prot::RW, MapOptions::FORCE_4K).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("map_huge_2m", |b| {
        b.iter_batched(
            clear,
            |()| pt.map(iova, range, Prot::RW, MapOptions::default()).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("unmap_4k", |b| {
        b.iter_batched(
            || {
                clear();
                pt.map(iova, MapSource::Pages(&frames), Prot::RW, MapOptions::default()).unwrap();
            },
            |()| pt.unmap(iova, LEN).unwrap().complete(),
            BatchSize::PerIteration,
        )
    });
    clear();
    pt.map(iova, MapSource::Pages(&frames), Prot::RW, MapOptions::default()).unwrap();
    let mut rng = SplitMix64::new(3);
    let probes: Vec<DmaAddr> = (0..PAGES).map(|_| DmaAddr::new(iova.as_u64() + rng.below(LEN))).collect();
    g.bench_function("translate", |b| {
        b.iter(|| probes.iter().fold(0u64, |a, &va| a ^ pt.translate(va).unwrap().pa.as_u64()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
