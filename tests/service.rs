//! The population service: order within a queue, independence across queues, in-fences,
//! head-of-line freedom, visibility after a fence, an oracle over concurrent clients,
//! backpressure, lost VMs and shutdown.

#[path = "common/rng.rs"]
mod rng;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use rng::SplitMix64;
use vmbind::gpuvm::{BindOp, BoId, FaultStage, Va, VaError, VmError};
use vmbind::iommu::{DeviceId, DomainConfig};
use vmbind::mem::{BioVec, PhysMem};
use vmbind::service::{
    Fence, FenceError, FenceStatus, Gpu, Service, ServiceConfig, ServiceError, Shutdown, TrySubmitError, VmId,
};

const PAGE: u64 = 4096;
const SEC: Duration = Duration::from_secs(20);

fn behind(id: u16) -> Gpu {
    Gpu::BehindIommu { id: DeviceId(id), domain: DomainConfig::default() }
}

/// A service with one VM behind the IOMMU and one object of `pages` scattered pages, page `i`
/// stamped with `i` in its first 8 bytes.
fn setup(cfg: ServiceConfig, pages: usize) -> (Arc<PhysMem>, Service, VmId, BoId) {
    let mem = Arc::new(PhysMem::new(256 << 20).unwrap());
    let svc = Service::new(mem.clone(), cfg);
    let vm = svc.create_vm(behind(1), 1 << 40).unwrap();
    let bo = stamped_bo(&mem, &svc, vm, pages, 0);
    (mem, svc, vm, bo)
}

fn stamped_bo(mem: &PhysMem, svc: &Service, vm: VmId, pages: usize, tag: u64) -> BoId {
    let frames = mem.alloc_scattered(pages, 11 + tag).unwrap();
    for (i, &f) in frames.iter().enumerate() {
        mem.write(f, &(tag << 32 | i as u64).to_le_bytes()).unwrap();
    }
    svc.create_bo(vm, BioVec::from_frames(&frames)).unwrap()
}

fn read_stamp(svc: &Service, vm: VmId, va: u64) -> Result<u64, vmbind::gpuvm::GpuFault> {
    let mut b = [0u8; 8];
    svc.vm(vm).unwrap().gpu_read(va, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn map(va: u64, pages: u64, bo: BoId, page: u64) -> BindOp {
    BindOp::Map(Va::object(va, pages * PAGE, bo, page * PAGE))
}

#[test]
fn submissions_of_one_queue_take_effect_in_order_while_other_queues_run() {
    let (_mem, svc, vm, bo) = setup(ServiceConfig::default(), 512);
    // All four made before any runs: a queue dropped early would retire its slot, and the next
    // one made would take it over.
    let queues: Vec<_> = (0..4).map(|_| svc.create_queue(vm).unwrap()).collect();
    std::thread::scope(|s| {
        for (c, q) in (0..4u64).zip(queues) {
            let svc = &svc;
            s.spawn(move || {
                let va = (c + 1) << 30;
                let mut fences = Vec::new();
                for k in 0..300u64 {
                    fences.push(q.submit(vec![map(va, 1, bo, k % 512)], &[], &[]).unwrap());
                }
                // Fence k signaled: the mapping is op k's or a later one's, never an earlier one's;
                // and every earlier fence of the queue is done.
                let mut last_seen = 0;
                for (k, f) in fences.iter().enumerate() {
                    f.wait(SEC).unwrap();
                    assert!(fences[..k].iter().all(Fence::is_signaled), "fence {k} before an earlier one");
                    let now = read_stamp(svc, vm, va).unwrap();
                    assert!(now >= k as u64 && now >= last_seen, "queue {c}: op {k} saw page {now}");
                    last_seen = now;
                }
                assert_eq!(read_stamp(svc, vm, va).unwrap(), 299);
            });
        }
    });
    let m = svc.metrics();
    assert_eq!(m.ops, 1200);
    assert_eq!(m.submissions, 1200);
    assert!(m.batches <= 1200 && m.batches > 0);
    assert_eq!(m.queues.len(), 4);
    assert!(m.queues.iter().all(|q| q.completed == 300 && q.p50 <= q.p99 && q.p99 <= q.max));
}

#[test]
fn an_in_fence_orders_work_across_queues_and_across_vms() {
    let (mem, svc, vm, bo) = setup(ServiceConfig::default(), 64);
    let vm2 = svc.create_vm(behind(2), 1 << 40).unwrap();
    let bo2 = stamped_bo(&mem, &svc, vm2, 8, 1);
    let (a, b) = (svc.create_queue(vm).unwrap(), svc.create_queue(vm).unwrap());
    let other = svc.create_queue(vm2).unwrap();
    for round in 0..50u64 {
        let va = 0x4000_0000 + round * 0x20_0000;
        let gate = Fence::new();
        let fa = a.submit(vec![map(va, 1, bo, 1)], std::slice::from_ref(&gate), &[]).unwrap();
        // B replaces A's mapping, but only after A: the last word is B's.
        let fb = b.submit(vec![map(va, 1, bo, 2)], std::slice::from_ref(&fa), &[]).unwrap();
        // Another VM waits for B.
        let fo = other.submit(vec![map(va, 1, bo2, 3)], std::slice::from_ref(&fb), &[]).unwrap();
        assert!(!fa.is_done() && !fb.is_done() && !fo.is_done());
        gate.signal().unwrap();
        fo.wait(SEC).unwrap();
        assert!(fa.is_signaled() && fb.is_signaled());
        assert_eq!(read_stamp(&svc, vm, va).unwrap(), 2);
        assert_eq!(read_stamp(&svc, vm2, va).unwrap(), 1 << 32 | 3);
    }
}

#[test]
fn a_queue_waiting_on_its_head_never_delays_another_queues_ready_work() {
    let (_mem, svc, vm, bo) = setup(ServiceConfig::default(), 64);
    let (a, b) = (svc.create_queue(vm).unwrap(), svc.create_queue(vm).unwrap());
    let never = Fence::new();
    let blocked = a.submit(vec![map(0x10_0000, 1, bo, 0)], std::slice::from_ref(&never), &[]).unwrap();
    let behind_it = a.submit(vec![map(0x20_0000, 1, bo, 0)], &[], &[]).unwrap();
    for k in 0..100u64 {
        let f = b.submit(vec![map(0x100_0000 + k * PAGE, 1, bo, k % 64)], &[], &[]).unwrap();
        f.wait(SEC).unwrap();
    }
    b.bind(&[map(0x200_0000, 4, bo, 4)]).unwrap();
    assert_eq!(read_stamp(&svc, vm, 0x200_0000 + PAGE).unwrap(), 5);
    // Queue A kept its order: nothing of it ran.
    assert!(!blocked.is_done() && !behind_it.is_done());
    assert!(read_stamp(&svc, vm, 0x20_0000).is_err());
    never.signal().unwrap();
    behind_it.wait(SEC).unwrap();
    assert!(blocked.is_signaled());
    assert_eq!(read_stamp(&svc, vm, 0x10_0000).unwrap(), 0);
}

#[test]
fn a_read_issued_after_wait_never_sees_the_old_translation() {
    let (_mem, svc, vm, bo) = setup(ServiceConfig::default(), 256);
    let q = svc.create_queue(vm).unwrap();
    let vmr = svc.vm(vm).unwrap();
    let (to_dev, dev_rx) = mpsc::channel::<(u64, u64)>();
    let (to_host, host_rx) = mpsc::channel::<bool>();
    let device = std::thread::spawn(move || {
        let mut matched = 0u32;
        while let Ok((va, want)) = dev_rx.recv() {
            let mut b = [0u8; 8];
            let ok = vmr.gpu_read(va, &mut b).is_ok() && u64::from_le_bytes(b) == want;
            matched += u32::from(ok);
            to_host.send(ok).unwrap();
        }
        matched
    });
    let va = 0x7000_0000;
    let rounds = 2000u64;
    for k in 0..rounds {
        // Alternate between a remap of the page, a 2-page map around it and an unmap + map,
        // so each op changes what the device must see.
        let page = 1 + (k * 7) % 255;
        let ops = match k % 3 {
            0 => vec![map(va, 1, bo, page)],
            1 => vec![map(va - PAGE, 2, bo, page - 1)],
            _ => vec![BindOp::Unmap { addr: va - PAGE, range: 3 * PAGE }, map(va, 1, bo, page)],
        };
        let f = q.submit(ops, &[], &[]).unwrap();
        f.wait(SEC).unwrap();
        to_dev.send((va, page)).unwrap();
        assert!(host_rx.recv().unwrap(), "round {k}: the device saw an old translation");
    }
    drop(to_dev);
    assert_eq!(device.join().unwrap(), rounds as u32);
}

/// What a page of a client's window holds in the oracle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    Obj(u64),
    Sparse,
}

#[test]
fn four_clients_of_random_binds_end_where_the_oracle_does() {
    let (_mem, svc, vm, bo) = setup(ServiceConfig { queue_depth: 16, ..ServiceConfig::default() }, 1024);
    const WINDOW: u64 = 256; // pages per client
    let oracles: Vec<BTreeMap<u64, Page>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|c| {
                let q = svc.create_queue(vm).unwrap();
                s.spawn(move || {
                    let mut rng = SplitMix64::new(0xC0FFEE + c);
                    let base = (c + 1) << 32;
                    let mut oracle: BTreeMap<u64, Page> = BTreeMap::new();
                    let mut last = None;
                    for i in 0..1000u64 {
                        let first = rng.below(WINDOW - 8);
                        let n = 1 + rng.below(8);
                        let va = base + first * PAGE;
                        let (ops, effect): (Vec<BindOp>, Vec<Option<Page>>) = match rng.below(10) {
                            0..=5 => {
                                let off = rng.below(1024 - n);
                                (
                                    vec![map(va, n, bo, off)],
                                    (0..n).map(|k| Some(Page::Obj(off + k))).collect(),
                                )
                            }
                            6 => (
                                vec![BindOp::Map(Va::sparse(va, n * PAGE))],
                                vec![Some(Page::Sparse); n as usize],
                            ),
                            7 => {
                                // Two adjacent, continuing maps in one submission: merged.
                                let off = rng.below(1024 - 2 * n);
                                let ops = vec![
                                    map(va, n, bo, off),
                                    map(va + n * PAGE, n.min(WINDOW - first - n), bo, off + n),
                                ];
                                let m = n + n.min(WINDOW - first - n);
                                (ops, (0..m).map(|k| Some(Page::Obj(off + k))).collect())
                            }
                            _ => (vec![BindOp::Unmap { addr: va, range: n * PAGE }], vec![None; n as usize]),
                        };
                        for (k, e) in effect.into_iter().enumerate() {
                            let p = first + k as u64;
                            match e {
                                Some(v) => oracle.insert(p, v),
                                None => oracle.remove(&p),
                            };
                        }
                        let f = q.submit(ops, &[], &[]).unwrap();
                        if i % 97 == 0 {
                            f.wait(SEC).unwrap();
                        }
                        last = Some(f);
                    }
                    last.unwrap().wait(SEC).unwrap();
                    oracle
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (c, oracle) in oracles.iter().enumerate() {
        let base = (c as u64 + 1) << 32;
        for p in 0..WINDOW {
            let va = base + p * PAGE;
            let got = read_stamp(&svc, vm, va);
            match oracle.get(&p) {
                Some(Page::Obj(off)) => assert_eq!(got.unwrap(), *off, "client {c} page {p}"),
                Some(Page::Sparse) => assert_eq!(got.unwrap(), 0, "client {c} page {p} (sparse)"),
                None => assert_eq!(got.unwrap_err().stage, FaultStage::NotMapped, "client {c} page {p}"),
            }
        }
    }
    // The VA space agrees page by page (merged mappings may span what the oracle built in two).
    let vmr = svc.vm(vm).unwrap();
    let mapped: u64 = vmr.mappings().iter().map(|v| v.range / PAGE).sum();
    assert_eq!(mapped, oracles.iter().map(|o| o.len() as u64).sum::<u64>());
    let m = svc.metrics();
    assert_eq!(m.submissions, 4000);
    assert_eq!(m.queues.iter().map(|q| q.completed).sum::<u64>(), 4000);
    assert!(m.merged > 0, "adjacent continuing ops merge");
    assert!(m.gpu_tlb_flushes > 0 && m.gpu_tlb_flushes <= m.batches);
    assert_eq!(m.failed, 0);
}

#[test]
fn bad_ops_are_refused_at_submit_and_nothing_is_queued() {
    let (_mem, svc, vm, bo) = setup(ServiceConfig::default(), 16);
    let q = svc.create_queue(vm).unwrap();
    type Check = fn(&ServiceError) -> bool;
    let cases: Vec<(Vec<BindOp>, Check)> = vec![
        (vec![map(0x1000, 1, bo, 0), map(0x1234, 1, bo, 0)], |e| {
            matches!(
                e,
                ServiceError::Vm { err: VmError::Va { index: 1, err: VaError::Unaligned { .. } }, .. }
            )
        }),
        (vec![BindOp::Unmap { addr: 0x1000, range: 0 }], |e| {
            matches!(e, ServiceError::Vm { err: VmError::Va { index: 0, err: VaError::ZeroSize { .. } }, .. })
        }),
        (vec![map(1 << 40, 1, bo, 0)], |e| matches!(e, ServiceError::Vm { err: VmError::Va { .. }, .. })),
        (vec![map(0x1000, 2, bo, 15)], |e| {
            matches!(e, ServiceError::Vm { err: VmError::BeyondBo { index: 0, .. }, .. })
        }),
        (vec![map(0x1000, 1, BoId(999), 0)], |e| {
            matches!(e, ServiceError::Vm { err: VmError::NoSuchBo(BoId(999)), .. })
        }),
        (vec![map(!0xfffu64, 2, bo, 0)], |e| matches!(e, ServiceError::Vm { err: VmError::Va { .. }, .. })),
    ];
    for (ops, is) in cases {
        let err = q.submit(ops.clone(), &[], &[]).unwrap_err();
        assert!(is(&err), "{err}");
        let err = q.bind(&ops).unwrap_err();
        assert!(is(&err), "{err}");
        match q.try_submit(ops.clone(), &[], &[]).unwrap_err() {
            TrySubmitError::Refused { err, ops: back } => {
                assert!(is(&err));
                assert_eq!(back, ops);
            }
            other => panic!("{other}"),
        }
    }
    let too_many = vec![map(0x1000, 1, bo, 0); 4097];
    assert!(matches!(q.submit(too_many, &[], &[]), Err(ServiceError::TooManyOps { ops: 4097, max: 4096 })));
    // Host fences as signals: a queue's own fence cannot be one.
    let f = q.submit(vec![], &[], &[]).unwrap();
    assert!(matches!(q.submit(vec![], &[], std::slice::from_ref(&f)), Err(ServiceError::BadSignal { .. })));
    assert_eq!(svc.vm(vm).unwrap().mappings().len(), 0);
    let m = svc.metrics();
    assert_eq!(m.ops, 0);
    f.wait(SEC).unwrap();
}

#[test]
fn host_fences_handed_as_signals_complete_with_the_work() {
    let (_mem, svc, vm, bo) = setup(ServiceConfig::default(), 16);
    let q = svc.create_queue(vm).unwrap();
    let done = Fence::new();
    let gate = Fence::new();
    let f = q
        .submit(vec![map(0x10_0000, 1, bo, 3)], std::slice::from_ref(&gate), std::slice::from_ref(&done))
        .unwrap();
    // Owned by the submission now: the host cannot signal it, nor hand it out twice.
    assert!(matches!(done.signal(), Err(FenceError::NotHost { .. })));
    assert!(matches!(
        q.submit(vec![], &[], std::slice::from_ref(&done)),
        Err(ServiceError::BadSignal { .. })
    ));
    assert!(matches!(done.wait(Duration::from_millis(20)), Err(FenceError::Timeout { .. })));
    gate.signal().unwrap();
    assert!(matches!(gate.signal(), Err(FenceError::Completed { .. })));
    done.wait(SEC).unwrap();
    assert!(f.is_signaled());
    assert_eq!(read_stamp(&svc, vm, 0x10_0000).unwrap(), 3);
}

#[test]
fn a_full_queue_blocks_submit_and_hands_try_submit_its_ops_back() {
    let (_mem, svc, vm, bo) = setup(ServiceConfig { queue_depth: 2, ..ServiceConfig::default() }, 16);
    let q = svc.create_queue(vm).unwrap();
    let gate = Fence::new();
    let f1 = q.submit(vec![map(0x10_0000, 1, bo, 1)], std::slice::from_ref(&gate), &[]).unwrap();
    let f2 = q.submit(vec![map(0x20_0000, 1, bo, 2)], &[], &[]).unwrap();
    let ops = vec![map(0x30_0000, 1, bo, 3)];
    match q.try_submit(ops.clone(), &[], &[]) {
        Err(TrySubmitError::Full { queue, ops: back }) => {
            assert_eq!(queue, q.id());
            assert_eq!(back, ops);
        }
        other => panic!("{other:?}"),
    }
    let (tx, rx) = mpsc::channel();
    let q2 = q.clone();
    let blocked = std::thread::spawn(move || {
        let f = q2.submit(ops, &[], &[]).unwrap();
        tx.send(()).unwrap();
        f
    });
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "submit did not block on a full queue");
    gate.signal().unwrap();
    let f3 = blocked.join().unwrap();
    f3.wait(SEC).unwrap();
    assert!(f1.is_signaled() && f2.is_signaled());
    assert_eq!(read_stamp(&svc, vm, 0x30_0000).unwrap(), 3);
}

#[test]
fn a_failure_inside_a_batch_loses_only_its_own_vm() {
    let (mem, svc, vm, bo) = setup(ServiceConfig::default(), 16);
    let vm2 = svc.create_vm(behind(2), 1 << 40).unwrap();
    let bo2 = stamped_bo(&mem, &svc, vm2, 16, 2);
    let victim = stamped_bo(&mem, &svc, vm, 4, 3);
    let (q, q2) = (svc.create_queue(vm).unwrap(), svc.create_queue(vm2).unwrap());
    q.bind(&[map(0x10_0000, 1, bo, 1)]).unwrap();
    let gate = Fence::new();
    let doomed = q.submit(vec![map(0x20_0000, 1, victim, 0)], std::slice::from_ref(&gate), &[]).unwrap();
    let after = q.submit(vec![map(0x30_0000, 1, bo, 2)], &[], &[]).unwrap();
    // The object goes behind the service's back (through the VM itself): the queued bind that
    // names it can only fail when it runs.
    svc.vm(vm).unwrap().destroy_bo(victim).unwrap();
    gate.signal().unwrap();
    match doomed.wait(SEC) {
        Err(FenceError::Failed { err: ServiceError::Vm { err: VmError::NoSuchBo(b), .. }, .. }) => {
            assert_eq!(b, victim)
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(after.wait(SEC), Err(FenceError::Failed { err: ServiceError::VmLost { .. }, .. })));
    assert!(matches!(q.submit(vec![map(0x40_0000, 1, bo, 0)], &[], &[]), Err(ServiceError::VmLost { .. })));
    assert!(matches!(q.bind(&[map(0x40_0000, 1, bo, 0)]), Err(ServiceError::VmLost { .. })));
    assert!(svc.lost(vm).unwrap().is_some());
    // Nothing of the lost work landed; what was there stays readable.
    assert_eq!(read_stamp(&svc, vm, 0x10_0000).unwrap(), 1);
    assert!(read_stamp(&svc, vm, 0x30_0000).is_err());
    // The other VM keeps working.
    assert_eq!(svc.lost(vm2).unwrap(), None);
    q2.submit(vec![map(0x10_0000, 2, bo2, 5)], &[], &[]).unwrap().wait(SEC).unwrap();
    assert_eq!(read_stamp(&svc, vm2, 0x10_1000).unwrap(), 2 << 32 | 6);
    assert!(svc.metrics().failed >= 2);
}

#[test]
fn a_failed_in_fence_fails_the_work_that_waited_and_the_queue_goes_on() {
    let (mem, svc, vm, bo) = setup(ServiceConfig::default(), 16);
    let vm2 = svc.create_vm(behind(2), 1 << 40).unwrap();
    let victim = stamped_bo(&mem, &svc, vm2, 4, 3);
    let (q, q2) = (svc.create_queue(vm).unwrap(), svc.create_queue(vm2).unwrap());
    let gate = Fence::new();
    let bad = q2.submit(vec![map(0x20_0000, 1, victim, 0)], std::slice::from_ref(&gate), &[]).unwrap();
    let waiter = q.submit(vec![map(0x10_0000, 1, bo, 1)], std::slice::from_ref(&bad), &[]).unwrap();
    let next = q.submit(vec![map(0x20_0000, 1, bo, 2)], &[], &[]).unwrap();
    svc.vm(vm2).unwrap().destroy_bo(victim).unwrap();
    gate.signal().unwrap();
    assert!(matches!(waiter.wait(SEC), Err(FenceError::Failed { err: ServiceError::WaitFailed { .. }, .. })));
    next.wait(SEC).unwrap();
    assert!(read_stamp(&svc, vm, 0x10_0000).is_err());
    assert_eq!(read_stamp(&svc, vm, 0x20_0000).unwrap(), 2);
    assert_eq!(svc.lost(vm).unwrap(), None);
}

#[test]
fn shutdown_drains_what_can_run_and_names_every_fence_it_cancels() {
    let (_mem, svc, vm, bo) = setup(ServiceConfig::default(), 64);
    let (a, b) = (svc.create_queue(vm).unwrap(), svc.create_queue(vm).unwrap());
    let never = Fence::new();
    let stuck: Vec<Fence> = (0..5u64)
        .map(|k| {
            a.submit(vec![map(0x10_0000 + k * PAGE, 1, bo, k)], std::slice::from_ref(&never), &[]).unwrap()
        })
        .collect();
    let ready: Vec<Fence> =
        (0..20u64).map(|k| b.submit(vec![map(0x100_0000 + k * PAGE, 1, bo, k)], &[], &[]).unwrap()).collect();
    let report = svc.shutdown(Shutdown::Drain(Duration::from_millis(300)));
    for f in &ready {
        assert!(f.is_signaled());
    }
    // Each ready fence was either signaled before the call or is in the report as signaled.
    assert!(report.signaled.iter().all(|id| ready.iter().any(|f| f.id() == *id)));
    let mut cancelled: Vec<u64> = stuck.iter().map(Fence::id).collect();
    cancelled.sort_unstable();
    let mut got = report.cancelled.clone();
    got.sort_unstable();
    assert_eq!(got, cancelled);
    assert!(report.failed.is_empty());
    for f in &stuck {
        assert_eq!(f.poll(), FenceStatus::Failed(ServiceError::Cancelled));
    }
    assert!(matches!(a.submit(vec![], &[], &[]), Err(ServiceError::ShutDown)));
    assert!(matches!(svc.create_vm(behind(9), 1 << 30), Err(ServiceError::ShutDown)));
    assert_eq!(read_stamp(&svc, vm, 0x100_0000 + 19 * PAGE).unwrap(), 19);
    // Again: nothing left.
    assert_eq!(svc.shutdown(Shutdown::Cancel), Default::default());
}

#[test]
fn dropping_the_service_cancels_queued_work_visibly() {
    let (_mem, svc, vm, bo) = setup(ServiceConfig::default(), 8);
    let q = svc.create_queue(vm).unwrap();
    let never = Fence::new();
    let f = q.submit(vec![map(0x10_0000, 1, bo, 0)], &[never], &[]).unwrap();
    drop(svc);
    assert_eq!(f.poll(), FenceStatus::Failed(ServiceError::Cancelled));
    assert!(matches!(q.submit(vec![], &[], &[]), Err(ServiceError::ShutDown)));
}

#[test]
fn unbatched_service_gives_one_batch_per_submission_and_merges_nothing() {
    let (_mem, svc, vm, bo) = setup(ServiceConfig { coalesce: false, ..ServiceConfig::default() }, 64);
    let q = svc.create_queue(vm).unwrap();
    let mut last = None;
    for k in 0..50u64 {
        last = Some(q.submit(vec![map(0x10_0000 + k * PAGE, 1, bo, k)], &[], &[]).unwrap());
    }
    last.unwrap().wait(SEC).unwrap();
    let m = svc.metrics();
    assert_eq!((m.batches, m.merged, m.ops), (50, 0, 50));
    // Coalescing on: adjacent continuing maps of one submission become one mapping.
    let (_mem, svc, vm, bo) = setup(ServiceConfig::default(), 64);
    let q = svc.create_queue(vm).unwrap();
    let ops: Vec<BindOp> = (0..16u64).map(|k| map(0x10_0000 + k * PAGE, 1, bo, 8 + k)).collect();
    q.submit(ops, &[], &[]).unwrap().wait(SEC).unwrap();
    let m = svc.metrics();
    assert_eq!((m.batches, m.merged, m.ops, m.pages), (1, 15, 16, 16));
    assert_eq!(svc.vm(vm).unwrap().mappings().len(), 1);
    assert_eq!(read_stamp(&svc, vm, 0x10_0000 + 15 * PAGE).unwrap(), 23);
}

#[test]
fn destroying_an_object_waits_for_submitted_work_and_refuses_new_work_naming_it() {
    let (_mem, svc, vm, bo) = setup(ServiceConfig::default(), 8);
    let q = svc.create_queue(vm).unwrap();
    q.bind(&[map(0x10_0000, 2, bo, 0)]).unwrap();
    assert!(matches!(svc.destroy_bo(vm, bo), Err(ServiceError::Vm { err: VmError::BoMapped { .. }, .. })));
    // Still there after the refusal.
    let f = q.submit(vec![BindOp::Unmap { addr: 0x10_0000, range: 2 * PAGE }], &[], &[]).unwrap();
    svc.destroy_bo(vm, bo).unwrap();
    assert!(f.is_signaled());
    assert!(matches!(
        q.submit(vec![map(0x10_0000, 1, bo, 0)], &[], &[]),
        Err(ServiceError::Vm { err: VmError::NoSuchBo(_), .. })
    ));
    assert!(matches!(svc.vm(VmId(77)), Err(ServiceError::NoSuchVm(VmId(77)))));
}

#[test]
fn fences_that_could_never_complete_are_refused_at_submit() {
    let (_mem, svc, vm, bo) = setup(ServiceConfig::default(), 8);
    let q = svc.create_queue(vm).unwrap();
    let f = Fence::new();
    // Waiting for the fence it signals.
    assert!(matches!(
        q.submit(vec![], std::slice::from_ref(&f), std::slice::from_ref(&f)),
        Err(ServiceError::BadSignal { .. })
    ));
    // Signaling a fence that work queued ahead of it on the same queue waits for.
    let stuck = q.submit(vec![map(0x10_0000, 1, bo, 0)], std::slice::from_ref(&f), &[]).unwrap();
    assert!(matches!(q.submit(vec![], &[], std::slice::from_ref(&f)), Err(ServiceError::BadSignal { .. })));
    // Refused submissions left the host fence the host's.
    f.signal().unwrap();
    stuck.wait(SEC).unwrap();
}

#[test]
fn dropped_queues_give_their_slots_to_new_ones() {
    let (_mem, svc, vm, bo) = setup(ServiceConfig::default(), 8);
    let keep = svc.create_queue(vm).unwrap();
    for k in 0..200u64 {
        let q = svc.create_queue(vm).unwrap();
        q.submit(vec![map(0x10_0000 + (k % 8) * PAGE, 1, bo, k % 8)], &[], &[]).unwrap().wait(SEC).unwrap();
    }
    // One slot for `keep`, one reused by every short-lived queue.
    assert_eq!(svc.metrics().queues.len(), 2);
    keep.bind(&[map(0x20_0000, 1, bo, 3)]).unwrap();
    assert_eq!(read_stamp(&svc, vm, 0x20_0000).unwrap(), 3);
}

#[test]
fn a_reader_racing_the_binds_never_sees_a_translation_older_than_the_last_wait() {
    let (_mem, svc, vm, bo) = setup(ServiceConfig::default(), 512);
    let q = svc.create_queue(vm).unwrap();
    let vmr = svc.vm(vm).unwrap();
    let va = 0x9000_0000u64;
    q.bind(&[map(va, 1, bo, 0)]).unwrap();
    // `visible`: the page index of the last map whose fence the host has waited for. Maps go
    // to increasing page indices, so a read must see that one or a later one.
    let visible = std::sync::atomic::AtomicU64::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let reads = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut n = 0u64;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let floor = visible.load(std::sync::atomic::Ordering::Acquire);
                let mut b = [0u8; 8];
                vmr.gpu_read(va, &mut b).unwrap();
                let got = u64::from_le_bytes(b);
                assert!(got >= floor, "read page {got} after the map of page {floor} was waited for");
                n += 1;
            }
            n
        });
        for k in 1..512u64 {
            q.submit(vec![map(va, 1, bo, k)], &[], &[]).unwrap().wait(SEC).unwrap();
            visible.store(k, std::sync::atomic::Ordering::Release);
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        reader.join().unwrap()
    });
    assert!(reads > 0);
}
