//! GPU-side population: a VM bound with `Vm::bind_deferred` whose 4 KiB entries are then
//! written from the `PteLog` — on the CPU (`PteLog::apply`) and by `populate.comp` on a real
//! Vulkan device — leaves the arena (tables, data, everything) byte for byte what `Vm::bind`
//! leaves, for random sequences; and the service populating on the device agrees with the CPU.
//! No Vulkan device: the device cases SKIP visibly, unless `VMBIND_REQUIRE_VULKAN=1`.

#[path = "common/rng.rs"]
mod rng;
#[cfg(feature = "vulkan")]
#[path = "common/vk.rs"]
mod vkc;

use std::sync::Arc;

use rng::SplitMix64;
use vmbind::addr::{PAGE_SIZE, PageSize, PhysAddr};
use vmbind::dma::Device;
use vmbind::gpuvm::{BindOp, BoId, Populated, Va, Vm};
use vmbind::iommu::DeviceId;
use vmbind::mem::{BioVec, PhysMem};
use vmbind::pt::PteLog;

const P: u64 = PAGE_SIZE;
const ARENA: u64 = 96 << 20;

/// One VM in its own arena, with three objects: scattered, contiguous (2 MiB blocks), small.
struct Side {
    mem: Arc<PhysMem>,
    vm: Vm,
    bos: Vec<(BoId, u64)>,
}

fn side() -> Side {
    let mem = Arc::new(PhysMem::new(ARENA).unwrap());
    let dev = Device::direct(mem.clone(), DeviceId(1), 48, true).unwrap();
    let vm = Vm::new(dev, 1 << 40).unwrap();
    let mut bos = Vec::new();
    let frames = mem.alloc_scattered(2048, 7).unwrap();
    for (i, f) in frames.iter().enumerate() {
        mem.write(*f, &(i as u64 ^ 0xabcd).to_le_bytes()).unwrap();
    }
    bos.push((vm.create_bo(BioVec::from_frames(&frames)).unwrap(), 2048 * P));
    let blocks: Vec<BioVec> = (0..4)
        .map(|_| BioVec { phys: mem.alloc_contig(PageSize::Size2M).unwrap(), offset: 0, len: 2 << 20 })
        .collect();
    bos.push((vm.create_bo(blocks).unwrap(), 8 << 20));
    let small = mem.alloc_scattered(5, 9).unwrap();
    bos.push((vm.create_bo(BioVec::from_frames(&small)).unwrap(), 5 * P));
    Side { mem, vm, bos }
}

/// A batch: either maps of disjoint ranges (deferred) or a few unmaps (CPU either way).
fn batch(rng: &mut SplitMix64, bos: &[(BoId, u64)]) -> Vec<BindOp> {
    let region = 0x10_0000_0000u64;
    if rng.below(4) == 0 {
        return (0..1 + rng.below(3))
            .map(|_| BindOp::Unmap { addr: region + rng.below(8192) * P, range: (1 + rng.below(700)) * P })
            .collect();
    }
    // Disjoint slots of 1 MiB... 4 MiB: maps never overlap within the batch.
    let mut slots: Vec<u64> = (0..16).collect();
    let mut ops = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let k = slots.remove(rng.below(slots.len() as u64) as usize);
        let base = region + k * (2 << 20) + rng.below(4) * P * 128;
        let (b, size) = bos[rng.below(bos.len() as u64) as usize];
        let pages = 1 + rng.below((size / P).min(384));
        let op = match rng.below(6) {
            0 => BindOp::Map(Va::sparse(base, pages * P)),
            1 => {
                let period = (1 + rng.below(4)).min(size / P);
                let n = pages.div_ceil(period) * period;
                BindOp::Map(Va::object(base, n * P, b, 0).repeating(period * P))
            }
            _ => {
                let off = rng.below(size / P - pages + 1) * P;
                BindOp::Map(Va::object(base, pages * P, b, off))
            }
        };
        ops.push(op);
    }
    ops
}

fn arena_bytes(mem: &PhysMem) -> Vec<u8> {
    let mut v = vec![0u8; ARENA as usize];
    mem.read(PhysAddr::new(0), &mut v).unwrap();
    v
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Runs the same random batches on two sides: `Vm::bind` on one, `bind_deferred` + `exec` on
/// the other; after every batch the arenas are equal. Returns (linear runs, copied runs).
fn compare(seed: u64, rounds: usize, mut exec: impl FnMut(&Side, &PteLog)) -> (usize, usize) {
    let (a, b) = (side(), side());
    let mut rng = SplitMix64::new(seed);
    let (mut linear, mut copied) = (0, 0);
    for round in 0..rounds {
        let ops = batch(&mut rng, &a.bos);
        let ra = a.vm.bind(&ops).map(|_| ());
        let rb =
            b.vm.bind_deferred(&ops, |log| {
                linear += log.runs.iter().filter(|r| r.linear).count();
                copied += log.runs.iter().filter(|r| !r.linear).count();
                exec(&b, log);
                Ok(())
            })
            .map(|(_, how)| assert!(!matches!(how, Populated::Fallback { .. }), "{how:?}"));
        assert_eq!(ra.is_ok(), rb.is_ok(), "round {round}: {ra:?} vs {rb:?}");
        let (x, y) = (arena_bytes(&a.mem), arena_bytes(&b.mem));
        if let Some(at) = first_difference(&x, &y) {
            panic!("round {round}: arenas differ at {at:#x} after {ops:?}");
        }
    }
    assert!(!a.vm.table().leaves().is_empty());
    (linear, copied)
}

#[test]
fn deferred_then_applied_on_the_cpu_is_the_cpu_commit_byte_for_byte() {
    let (linear, copied) = compare(0x90d, 60, |s, log| log.apply(&s.mem).unwrap());
    assert!(linear > 0 && copied > 0, "both kinds of run occurred: {linear} linear, {copied} copied");
}

#[test]
fn a_deferred_bind_hands_its_4k_entries_to_the_writer_inside_the_commit() {
    let s = side();
    let (bo, _) = s.bos[0];
    let va = 0x20_0000u64;
    let mut seen = 0;
    let (_, how) =
        s.vm.bind_deferred(&[BindOp::Map(Va::object(va, 64 * P, bo, 0))], |log| {
            // Inside the commit the new entries are not present yet (the slots read 0, not
            // whatever the fresh table frame held); the writer puts them there.
            seen = log.entries();
            assert!(s.vm.table().translate(vmbind::addr::GpuVa::new(va + 5 * P)).is_none());
            log.apply(&s.mem).map_err(|e| e.to_string())
        })
        .unwrap();
    assert_eq!(seen, 64);
    assert!(matches!(how, Populated::Writer { entries: 64, runs } if runs >= 1), "{how:?}");
    let mut b = [0u8; 8];
    s.vm.gpu_read(va + 5 * P, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 5 ^ 0xabcd);
    // A writer that fails: the CPU applies the log, the bind still succeeds.
    let (_, how) = s
        .vm
        .bind_deferred(&[BindOp::Map(Va::object(0x60_0000, 8 * P, bo, 8 * P))], |_| Err("device lost".into()))
        .unwrap();
    assert_eq!(how, Populated::Fallback { entries: 8, why: "device lost".into() });
    s.vm.gpu_read(0x60_0000 + 3 * P, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 11 ^ 0xabcd);
    // Unmaps and overlapping maps are not deferred: written at once, the writer not called.
    let never = |_: &PteLog| -> Result<(), String> { panic!("not deferrable: the writer must not run") };
    let (_, how) = s.vm.bind_deferred(&[BindOp::Unmap { addr: va, range: P }], never).unwrap();
    assert_eq!(how, Populated::Cpu);
    let ops =
        [BindOp::Map(Va::object(0x40_0000, 4 * P, bo, 0)), BindOp::Map(Va::object(0x40_2000, 4 * P, bo, 0))];
    let (_, how) = s.vm.bind_deferred(&ops, never).unwrap();
    assert_eq!(how, Populated::Cpu);
    s.vm.gpu_read(0x40_0000, &mut b).unwrap();
    // A refused bind calls no writer and leaves no log behind for the next one.
    assert!(s.vm.bind_deferred(&[BindOp::Map(Va::object(0x90_0000, P, bo, 1 << 30))], never).is_err());
    let (_, how) =
        s.vm.bind_deferred(&[BindOp::Map(Va::object(0x80_0000, 4 * P, bo, 0))], |log| {
            assert_eq!(log.entries(), 4);
            log.apply(&s.mem).map_err(|e| e.to_string())
        })
        .unwrap();
    assert!(matches!(how, Populated::Writer { entries: 4, .. }), "{how:?}");
    // A writer that panics leaves its entries unwritten: the VM refuses further binds.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s.vm.bind_deferred(&[BindOp::Map(Va::object(0xa0_0000, 4 * P, bo, 0))], |_| panic!("a writer bug"))
    }));
    assert!(r.is_err());
    let r = s.vm.bind(&[BindOp::Map(Va::object(0xc0_0000, P, bo, 0))]);
    assert!(matches!(r, Err(vmbind::gpuvm::VmError::Unusable { .. })), "{r:?}");
}

#[cfg(feature = "vulkan")]
mod device {
    use super::vkc::{context, no_validation_messages};
    use super::*;
    use vmbind::service::{Gpu, Service, ServiceConfig};
    use vmbind::vk::{ArenaImport, GpuPopulate};

    #[test]
    fn populate_comp_writes_the_cpu_commits_tables_byte_for_byte() {
        let Some(ctx) = context("populate_comp") else { return };
        let mut pops: Vec<(usize, GpuPopulate)> = Vec::new();
        let mut gpu_entries = 0;
        compare(0x5eed, 40, |s, log| {
            let key = Arc::as_ptr(&s.mem) as usize;
            if !pops.iter().any(|(k, _)| *k == key) {
                let import = Arc::new(ArenaImport::new(&ctx, &s.mem).unwrap());
                pops.push((key, GpuPopulate::new(&import).unwrap()));
            }
            let pop = &pops.iter().find(|(k, _)| *k == key).unwrap().1;
            gpu_entries += pop.run(log).unwrap().entries;
        });
        assert!(gpu_entries > 1000, "{gpu_entries}");
        // Both paths measured; the threshold follows from them.
        let (_, pop) = &pops[0];
        let before = pop.import().mem().usage();
        let c = pop.calibrate(4096).unwrap();
        eprintln!("calibration on {}: {c:?}", ctx.device_name());
        assert!(c.cpu_ns_per_entry > 0.0 && c.gpu_fixed_ns > 0.0 && c.gpu_ns_per_entry >= 0.0);
        match c.threshold_pages {
            Some(t) => assert!(c.gpu_ns_per_entry < c.cpu_ns_per_entry && t >= 1),
            None => assert!(c.gpu_ns_per_entry >= c.cpu_ns_per_entry),
        }
        assert_eq!(pop.import().mem().usage(), before, "the scratch VM gave its memory back");
        no_validation_messages(&ctx);
    }

    #[test]
    fn the_service_populates_large_batches_on_the_device_and_small_ones_on_the_cpu() {
        let Some(ctx) = context("service_populate") else { return };
        let run = |device: bool| {
            let mem = Arc::new(PhysMem::new(ARENA).unwrap());
            let svc = Service::new(mem.clone(), ServiceConfig::default());
            let vm = svc.create_vm(Gpu::Direct { id: DeviceId(1), addr_bits: 48 }, 1 << 40).unwrap();
            let frames = mem.alloc_scattered(1024, 3).unwrap();
            for (i, f) in frames.iter().enumerate() {
                mem.write(*f, &(i as u64 * 3 + 1).to_le_bytes()).unwrap();
            }
            let bo = svc.create_bo(vm, BioVec::from_frames(&frames)).unwrap();
            if device {
                let import = Arc::new(ArenaImport::new(&ctx, &mem).unwrap());
                let pop: Arc<dyn vmbind::service::PteWriter> = Arc::new(GpuPopulate::new(&import).unwrap());
                svc.set_pte_writer(vm, Some((pop, 64))).unwrap();
            }
            let q = svc.create_queue(vm).unwrap();
            let mut fences = Vec::new();
            for i in 0..16u64 {
                let pages = if i % 2 == 0 { 256 } else { 8 };
                let op = BindOp::Map(Va::object(0x1000_0000 + i * (2 << 20), pages * P, bo, i * 16 * P));
                fences.push(q.submit(vec![op], &[], &[]).unwrap());
            }
            for f in &fences {
                f.wait_forever().unwrap();
            }
            q.bind(&[BindOp::Unmap { addr: 0x1000_0000 + 2 * (2 << 20), range: 4 * P }]).unwrap();
            let the_vm = svc.vm(vm).unwrap();
            let leaves = the_vm.table().leaves();
            let mut reads = Vec::new();
            for i in 0..16u64 {
                let mut b = [0u8; 8];
                let r = the_vm
                    .gpu_read(0x1000_0000 + i * (2 << 20) + 7 * P, &mut b)
                    .map(|()| u64::from_le_bytes(b));
                reads.push(r.ok());
            }
            let m = svc.metrics();
            (format!("{leaves:?}"), reads, m.device_populated, m.device_fallbacks)
        };
        let cpu = run(false);
        let dev = run(true);
        assert_eq!(cpu.0, dev.0, "same leaves");
        assert_eq!(cpu.1, dev.1, "same bytes through the tables");
        assert_eq!(cpu.2, 0);
        assert!(dev.2 >= 1, "some batch reached the threshold: {}", dev.2);
        assert_eq!(dev.3, 0, "no fallback");
        no_validation_messages(&ctx);
    }
}
