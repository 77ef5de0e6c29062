//! Service and runtime cases of the report: many small binds from two client threads through
//! the bind queues, coalesced or one by one, with their submit-to-signal latency; and a
//! runtime's blocking map + access and unmap of one 2 MiB chunk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::gpuvm::{BindOp, BoId, Va};
use crate::iommu::{DeviceId, DomainConfig};
use crate::mem::{BioVec, PhysMem};
use crate::runtime::{Access, Placement, Runtime, RuntimeConfig};
use crate::service::{Gpu, Service, ServiceConfig, VmId};

use crate::bench::harness::{Report, Run};
use crate::mem::rng::SplitMix64;

/// Binds per client thread.
const BINDS: u64 = 100_000;
const CLIENTS: u64 = 2;
/// Pages per bind (64 KiB).
const PAGES_PER_BIND: u64 = 16;
/// Pages of the object the binds map from (64 MiB of scattered frames).
const BO_PAGES: u64 = 16_384;
/// 64 KiB slots in each client's 1 GiB VA window.
const SLOTS: u64 = 16_384;
const PAGE: u64 = 4096;

pub fn service_cases(r: &mut Report) {
    bind_cases(r);
    runtime_case(r);
}

/// A service with one VM behind the IOMMU and one object of scattered pages.
fn bind_service(mem: &Arc<PhysMem>, coalesce: bool) -> (Service, VmId, BoId) {
    let svc = Service::new(mem.clone(), ServiceConfig { coalesce, ..ServiceConfig::default() });
    let vm = svc
        .create_vm(Gpu::BehindIommu { id: DeviceId(1), domain: DomainConfig::default() }, 1 << 40)
        .unwrap();
    let frames = mem.alloc_scattered(BO_PAGES as usize, 0xb1d).unwrap();
    let bo = svc.create_bo(vm, BioVec::from_frames(&frames)).unwrap();
    (svc, vm, bo)
}

/// One run: `CLIENTS` threads, each on its own queue, submit `BINDS` binds of 16 pages from a
/// random object offset at a random 64 KiB slot of its window (most slots are bound already:
/// each bind replaces a mapping, as allocator churn does), then wait for the last. Returns the
/// wall time per bind and the worst queue's p99 submit-to-signal latency, in ns.
fn run_binds(svc: &Service, vm: VmId, bo: BoId, round: u64) -> (f64, f64) {
    let queues: Vec<_> = (0..CLIENTS).map(|_| svc.create_queue(vm).unwrap()).collect();
    // Each client's submissions, made before the clock starts.
    let work: Vec<Vec<Vec<BindOp>>> = (0..CLIENTS)
        .map(|c| {
            let mut rng = SplitMix64::new(round * 1000 + c);
            let base = (c + 1) << 32;
            (0..BINDS)
                .map(|_| {
                    let slot = rng.below(SLOTS);
                    let off = rng.below(BO_PAGES - PAGES_PER_BIND) * PAGE;
                    vec![BindOp::Map(Va::object(
                        base + slot * PAGES_PER_BIND * PAGE,
                        PAGES_PER_BIND * PAGE,
                        bo,
                        off,
                    ))]
                })
                .collect()
        })
        .collect();
    svc.reset_metrics();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for (q, ops) in queues.iter().zip(work) {
            s.spawn(move || {
                let mut last = None;
                for o in ops {
                    last = Some(q.submit(o, &[], &[]).unwrap());
                }
                last.unwrap().wait(Duration::from_secs(120)).unwrap();
            });
        }
    });
    let per_bind = t0.elapsed().as_secs_f64() * 1e9 / (CLIENTS * BINDS) as f64;
    let m = svc.metrics();
    let p99 =
        m.queues.iter().rev().take(CLIENTS as usize).map(|q| q.p99.as_nanos() as f64).fold(0.0, f64::max);
    (per_bind, p99)
}

fn bind_cases(r: &mut Report) {
    let names = ["service/bind_64k_batched", "service/bind_64k_unbatched", "service/bind_64k_p99"];
    if !names.iter().any(|c| r.wants(c)) {
        return;
    }
    let mem = Arc::new(PhysMem::new(1 << 30).unwrap());
    let (batched, bvm, bbo) = bind_service(&mem, true);
    let (single, svm, sbo) = bind_service(&mem, false);
    // Interleaved: batched, unbatched, and a batched run for its p99 (each sample a fresh
    // round of random binds over the mappings the earlier rounds left).
    let mut rounds = [0u64; 3];
    let (b, s) = (&batched, &single);
    let [r0, r1, r2] = &mut rounds;
    let n = r.samples(400.0);
    r.compare_cases(
        "ns/bind",
        1.0,
        n,
        vec![
            (
                names[0],
                "vmbind",
                Box::new(move || {
                    *r0 += 1;
                    run_binds(b, bvm, bbo, *r0).0
                }),
            ),
            (
                names[1],
                "vmbind",
                Box::new(move || {
                    *r1 += 1;
                    run_binds(s, svm, sbo, *r1).0
                }),
            ),
        ],
    );
    let p99: Run<'_> = Box::new(move || {
        *r2 += 1;
        run_binds(b, bvm, bbo, 1 << 20 | *r2).1
    });
    r.compare(names[2], "ns (p99 submit to signal)", 1.0, n, vec![("vmbind", p99)]);
}

fn runtime_case(r: &mut Report) {
    let case = "runtime/map_2m";
    if !r.wants(case) {
        return;
    }
    let mem = Arc::new(PhysMem::new(256 << 20).unwrap());
    let rt = Runtime::new(mem, RuntimeConfig::default()).unwrap();
    let chunk = rt.granularity().recommended;
    const CHUNKS: u64 = 64;
    let heap = rt.reserve(CHUNKS * chunk, chunk, None).unwrap();
    let m = rt.alloc(chunk, Placement::Scattered).unwrap();
    let rt = &rt;
    let run: Run<'_> = Box::new(move || {
        let t0 = Instant::now();
        for i in 0..CHUNKS {
            let at = heap.addr + i * chunk;
            rt.map(at, &m, 0, chunk, Access::ReadWrite).unwrap();
            rt.unmap(at, chunk).unwrap();
        }
        t0.elapsed().as_secs_f64() * 1e9 / CHUNKS as f64
    });
    let n = r.samples(0.2);
    r.compare(case, "ns/chunk (map+unmap)", 1.0, n, vec![("vmbind", run)]);
}
