//! The runtime API: every typed error of misuse, the allocator pattern compute runtimes use,
//! streams ordered where they touch the same addresses, sparse and repeat mappings.

use std::sync::Arc;
use std::time::Duration;

use vmbind::gpuvm::FaultStage;
use vmbind::mem::PhysMem;
use vmbind::runtime::{Access, Placement, Runtime, RuntimeConfig, RuntimeError, VaRange};

const PAGE: u64 = 4096;
const MIB2: u64 = 2 << 20;
const SEC: Duration = Duration::from_secs(20);

fn runtime(arena: u64) -> (Arc<PhysMem>, Runtime) {
    let mem = Arc::new(PhysMem::new(arena).unwrap());
    let rt = Runtime::new(mem.clone(), RuntimeConfig::default()).unwrap();
    (mem, rt)
}

fn stamp(rt: &Runtime, va: u64) -> u64 {
    let mut b = [0u8; 8];
    rt.read(va, &mut b).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn granularity_and_reservations_follow_cuda_rules() {
    let (_mem, rt) = runtime(16 << 20);
    let g = rt.granularity();
    assert_eq!((g.minimum, g.recommended), (4096, 2 << 20));
    let a = rt.reserve(64 * MIB2, MIB2, None).unwrap();
    assert_eq!(a.addr % MIB2, 0);
    assert!(a.addr >= MIB2, "no reservation at or near address 0");
    // The hint is honoured when free and aligned, ignored when not.
    let hint = a.end() + 8 * MIB2;
    let b = rt.reserve(MIB2, MIB2, Some(hint)).unwrap();
    assert_eq!(b.addr, hint);
    let c = rt.reserve(MIB2, MIB2, Some(a.addr + MIB2)).unwrap();
    for other in [a, b] {
        assert!(c.end() <= other.addr || c.addr >= other.end(), "{c:?} overlaps {other:?}");
    }
    let d = rt.reserve(PAGE, 0, Some(hint + 5)).unwrap();
    assert_ne!(d.addr, hint + 5);
    assert!(matches!(rt.reserve(0, 0, None), Err(RuntimeError::Zero { .. })));
    assert!(matches!(rt.reserve(PAGE + 1, 0, None), Err(RuntimeError::Misaligned { what: "size", .. })));
    assert!(matches!(
        rt.reserve(PAGE, 3 * PAGE, None),
        Err(RuntimeError::Misaligned { what: "alignment", .. })
    ));
    assert!(matches!(rt.reserve(1 << 41, 0, None), Err(RuntimeError::OutOfVa { .. })));
    // Free: exactly a reservation, and it can be reserved again.
    assert!(matches!(
        rt.free(VaRange { addr: a.addr, size: MIB2 }),
        Err(RuntimeError::NoSuchReservation { .. })
    ));
    rt.free(a).unwrap();
    assert!(matches!(rt.free(a), Err(RuntimeError::NoSuchReservation { .. })));
    let again = rt.reserve(64 * MIB2, MIB2, Some(a.addr)).unwrap();
    assert_eq!(again, a);
}

#[test]
fn map_with_access_in_one_op_then_reads_and_writes_through_the_gpu_tables() {
    let (_mem, rt) = runtime(32 << 20);
    let r = rt.reserve(4 * MIB2, MIB2, None).unwrap();
    let data: Vec<u8> = (0..3 * PAGE + 100).map(|i| (i * 7 % 251) as u8).collect();
    let m = rt.memory_from_bytes(&data).unwrap();
    assert_eq!(m.size(), 4 * PAGE);
    rt.map(r.addr, &m, 0, m.size(), Access::ReadWrite).unwrap();
    let mut back = vec![0u8; data.len()];
    rt.read(r.addr, &mut back).unwrap();
    assert_eq!(back, data);
    rt.write(r.addr + 10, b"xyz").unwrap();
    let mut b = [0u8; 3];
    rt.read(r.addr + 10, &mut b).unwrap();
    assert_eq!(&b, b"xyz");
    // Read-only: writes fault at the GPU stage, reads work; back to read-write on a sub-range.
    rt.set_access(r.addr, m.size(), Access::Read).unwrap();
    let e = rt.write(r.addr + PAGE, b"no").unwrap_err();
    assert!(matches!(e, RuntimeError::Fault(f) if matches!(f.stage, FaultStage::NotPermitted { .. })), "{e}");
    rt.read(r.addr + PAGE, &mut b).unwrap();
    rt.set_access(r.addr + PAGE, PAGE, Access::ReadWrite).unwrap();
    rt.write(r.addr + PAGE, b"ok").unwrap();
    assert!(rt.write(r.addr, b"no").is_err());
    assert!(rt.write(r.addr + 2 * PAGE, b"no").is_err());
}

#[test]
fn unmap_takes_any_page_aligned_sub_range_and_a_double_unmap_is_an_error() {
    let (_mem, rt) = runtime(32 << 20);
    let r = rt.reserve(MIB2, MIB2, None).unwrap();
    let m = rt.alloc(16 * PAGE, Placement::Scattered).unwrap();
    rt.map(r.addr, &m, 0, 16 * PAGE, Access::ReadWrite).unwrap();
    for p in 0..16 {
        rt.write(r.addr + p * PAGE, &p.to_le_bytes()).unwrap();
    }
    // The middle goes (CUDA refuses this); both ends stay.
    rt.unmap(r.addr + 4 * PAGE, 8 * PAGE).unwrap();
    assert_eq!(stamp(&rt, r.addr + 3 * PAGE), 3);
    assert_eq!(stamp(&rt, r.addr + 12 * PAGE), 12);
    let mut b = [0u8; 8];
    assert!(
        matches!(rt.read(r.addr + 4 * PAGE, &mut b), Err(RuntimeError::Fault(f)) if f.stage == FaultStage::NotMapped)
    );
    assert_eq!(
        rt.unmap(r.addr + 4 * PAGE, 8 * PAGE),
        Err(RuntimeError::NotMapped { addr: r.addr + 4 * PAGE })
    );
    // A range with a hole in it is refused whole: nothing was unmapped.
    assert_eq!(rt.unmap(r.addr, 16 * PAGE), Err(RuntimeError::NotMapped { addr: r.addr + 4 * PAGE }));
    assert_eq!(stamp(&rt, r.addr), 0);
    assert_eq!(
        rt.set_access(r.addr + 2 * PAGE, 4 * PAGE, Access::Read),
        Err(RuntimeError::NotMapped { addr: r.addr + 4 * PAGE })
    );
    // Remap the hole from another offset: the pieces around keep theirs.
    rt.map(r.addr + 4 * PAGE, &m, 4 * PAGE, 8 * PAGE, Access::ReadWrite).unwrap();
    assert_eq!(stamp(&rt, r.addr + 5 * PAGE), 5, "the same memory, mapped again");
    rt.unmap(r.addr, 16 * PAGE).unwrap();
    assert_eq!(rt.unmap(r.addr, PAGE), Err(RuntimeError::NotMapped { addr: r.addr }));
}

#[test]
fn every_misuse_of_mapping_is_a_typed_error_and_changes_nothing() {
    let (_mem, rt) = runtime(32 << 20);
    let r = rt.reserve(MIB2, MIB2, None).unwrap();
    let m = rt.alloc(4 * PAGE, Placement::Scattered).unwrap();
    rt.map(r.addr, &m, 0, 2 * PAGE, Access::ReadWrite).unwrap();
    let rw = Access::ReadWrite;
    assert_eq!(
        rt.map(r.addr + PAGE, &m, 0, 2 * PAGE, rw),
        Err(RuntimeError::AlreadyMapped { addr: r.addr + PAGE })
    );
    assert_eq!(rt.map_sparse(r.addr, PAGE), Err(RuntimeError::AlreadyMapped { addr: r.addr }));
    assert!(matches!(rt.map(r.addr + 2 * PAGE, &m, 0, 0, rw), Err(RuntimeError::Zero { .. })));
    assert!(matches!(
        rt.map(r.addr + 2 * PAGE + 1, &m, 0, PAGE, rw),
        Err(RuntimeError::Misaligned { what: "address", .. })
    ));
    assert!(matches!(
        rt.map(r.addr + 2 * PAGE, &m, 0, 100, rw),
        Err(RuntimeError::Misaligned { what: "length", .. })
    ));
    assert!(matches!(
        rt.map(r.addr + 2 * PAGE, &m, 12, PAGE, rw),
        Err(RuntimeError::Misaligned { what: "offset", .. })
    ));
    assert!(matches!(
        rt.map(r.addr + 2 * PAGE, &m, 2 * PAGE, 4 * PAGE, rw),
        Err(RuntimeError::BeyondMemory { .. })
    ));
    assert!(matches!(
        rt.map(r.addr + 2 * PAGE, &m, !0xfffu64, PAGE, rw),
        Err(RuntimeError::BeyondMemory { .. })
    ));
    // Outside any reservation, or straddling its end.
    assert!(matches!(rt.map(r.end(), &m, 0, PAGE, rw), Err(RuntimeError::NotReserved { .. })));
    assert!(matches!(rt.map(r.end() - PAGE, &m, 0, 2 * PAGE, rw), Err(RuntimeError::NotReserved { .. })));
    assert!(matches!(rt.map(!0xfffu64, &m, 0, 2 * PAGE, rw), Err(RuntimeError::NotReserved { .. })));
    assert!(matches!(rt.unmap(r.end(), PAGE), Err(RuntimeError::NotReserved { .. })));
    // Repeat periods.
    assert!(matches!(
        rt.map_repeat(r.addr + 4 * PAGE, 3 * PAGE, &m, 0, 2 * PAGE, rw),
        Err(RuntimeError::BadPeriod { .. })
    ));
    assert!(matches!(
        rt.map_repeat(r.addr + 4 * PAGE, 4 * PAGE, &m, 0, 0, rw),
        Err(RuntimeError::Zero { .. })
    ));
    assert!(matches!(
        rt.map_repeat(r.addr + 4 * PAGE, 8 * PAGE, &m, 2 * PAGE, 4 * PAGE, rw),
        Err(RuntimeError::BeyondMemory { .. })
    ));
    // A reservation with a mapping cannot be freed.
    assert_eq!(rt.free(r), Err(RuntimeError::StillMapped { addr: r.addr }));
    // Nothing above changed the VM: one mapping of 2 pages.
    let maps = rt.vm().mappings();
    assert_eq!(maps.len(), 1);
    assert_eq!(maps[0].range, 2 * PAGE);
}

#[test]
fn memory_is_reference_counted_and_released_handles_cannot_be_used() {
    let (mem, rt) = runtime(32 << 20);
    let free0 = mem.usage().free_frames;
    let r = rt.reserve(MIB2, MIB2, None).unwrap();
    let m = rt.alloc(8 * PAGE, Placement::Scattered).unwrap();
    let frames_used = free0 - mem.usage().free_frames;
    assert!(frames_used >= 8);
    rt.map(r.addr, &m, 0, 4 * PAGE, Access::ReadWrite).unwrap();
    rt.map(r.addr + 8 * PAGE, &m, 4 * PAGE, 4 * PAGE, Access::ReadWrite).unwrap();
    rt.write(r.addr + 8 * PAGE, b"alive").unwrap();
    // Released while mapped: still readable, no new use, no second release.
    rt.release(&m).unwrap();
    assert_eq!(rt.release(&m), Err(RuntimeError::Released { memory: m.id() }));
    assert_eq!(
        rt.map(r.addr + 16 * PAGE, &m, 0, PAGE, Access::Read),
        Err(RuntimeError::Released { memory: m.id() })
    );
    let mut b = [0u8; 5];
    rt.read(r.addr + 8 * PAGE, &mut b).unwrap();
    assert_eq!(&b, b"alive");
    assert_eq!(rt.live_memories(), 1);
    // Splitting a mapping keeps the memory; the last piece frees it.
    rt.unmap(r.addr + PAGE, 2 * PAGE).unwrap();
    rt.unmap(r.addr + 8 * PAGE, 4 * PAGE).unwrap();
    assert_eq!(rt.live_memories(), 1);
    rt.unmap(r.addr, PAGE).unwrap();
    assert_eq!(rt.live_memories(), 1);
    rt.unmap(r.addr + 3 * PAGE, PAGE).unwrap();
    assert_eq!(rt.live_memories(), 0);
    // Freed now: a third release or a use still says why.
    assert_eq!(rt.release(&m), Err(RuntimeError::Released { memory: m.id() }));
    assert_eq!(rt.map(r.addr, &m, 0, PAGE, Access::Read), Err(RuntimeError::Released { memory: m.id() }));
    rt.free(r).unwrap();
    // The frames went back to the arena.
    eprintln!("free0 {free0} now {} used {frames_used}", mem.usage().free_frames);
    assert!(mem.usage().free_frames >= free0, "frames leaked: {} < {free0}", mem.usage().free_frames);
    // A handle of another runtime is not one of this runtime.
    let (_mem2, rt2) = runtime(8 << 20);
    let foreign = rt2.alloc(PAGE, Placement::Scattered).unwrap();
    let r = rt.reserve(MIB2, MIB2, None).unwrap();
    assert_eq!(
        rt.map(r.addr, &foreign, 0, PAGE, Access::Read),
        Err(RuntimeError::NoSuchMemory { memory: foreign.id() })
    );
}

#[test]
fn an_allocator_grows_and_shrinks_a_heap_in_2m_chunks() {
    let (mem, rt) = runtime(96 << 20);
    let chunk = rt.granularity().recommended;
    let heap = rt.reserve(32 * chunk, chunk, None).unwrap();
    let free0 = mem.usage().free_frames;
    let mut backed: Vec<u64> = Vec::new();
    // Grow to 16 chunks, each filled with its index; shrink from the middle; grow again.
    for round in 0..3u64 {
        for i in 0..16u64 {
            let at = heap.addr + i * chunk;
            if backed.contains(&at) {
                continue;
            }
            let placement = if i % 2 == 0 { Placement::Contiguous } else { Placement::Scattered };
            let m = rt.alloc(chunk, placement).unwrap();
            rt.map(at, &m, 0, chunk, Access::ReadWrite).unwrap();
            rt.release(&m).unwrap();
            rt.write(at + chunk - 8, &(round << 8 | i).to_le_bytes()).unwrap();
            backed.push(at);
        }
        for at in backed.clone() {
            let i = (at - heap.addr) / chunk;
            if (i + round) % 3 == 0 {
                rt.unmap(at, chunk).unwrap();
                backed.retain(|&b| b != at);
            }
        }
        assert_eq!(rt.live_memories(), backed.len());
        for &at in &backed {
            assert_eq!(stamp(&rt, at + chunk - 8) & 0xff, (at - heap.addr) / chunk);
        }
    }
    // Contiguous chunks at 2 MiB-aligned VA map with 2 MiB leaves.
    let big =
        backed.iter().filter(|&&at| rt.vm().leaf_size(at) == Some(vmbind::addr::PageSize::Size2M)).count();
    assert!(big > 0, "no chunk got a 2 MiB leaf");
    for at in backed.drain(..) {
        rt.unmap(at, chunk).unwrap();
    }
    rt.free(heap).unwrap();
    assert_eq!(rt.live_memories(), 0);
    // Every data frame is back; table pages are freed as their ranges empty.
    assert!(mem.usage().free_frames >= free0, "frames leaked: {} < {free0}", mem.usage().free_frames);
}

#[test]
fn streams_are_independent_but_ordered_where_they_touch_the_same_addresses() {
    let (_mem, rt) = runtime(64 << 20);
    let (s1, s2) = (rt.create_stream().unwrap(), rt.create_stream().unwrap());
    let r = rt.reserve(64 * MIB2, MIB2, None).unwrap();
    let m = rt.alloc(16 * PAGE, Placement::Scattered).unwrap();
    for p in 0..16u64 {
        rt.map(r.addr + p * PAGE, &m, p * PAGE, PAGE, Access::ReadWrite).unwrap();
        rt.write(r.addr + p * PAGE, &(100 + p).to_le_bytes()).unwrap();
    }
    rt.unmap(r.addr, 16 * PAGE).unwrap();
    let mut last = Vec::new();
    for round in 0..200u64 {
        let va = r.addr + MIB2 + (round % 8) * 16 * PAGE;
        // Map on one stream, unmap on the other at once: the unmap waits for the map.
        let (a, b) = if round % 2 == 0 { (&s1, &s2) } else { (&s2, &s1) };
        if round >= 8 {
            // The slot still holds the mapping of round - 8 (made on the other stream).
            rt.unmap_async(a, va, PAGE).unwrap();
        }
        let f1 = rt.map_async(a, va, &m, (round % 16) * PAGE, PAGE, Access::ReadWrite).unwrap();
        let f2 = rt.unmap_async(b, va, PAGE).unwrap();
        // And map again on the first: it waits for the unmap.
        let f3 = rt.map_async(a, va, &m, 0, PAGE, Access::Read).unwrap();
        last = vec![f1, f2, f3];
    }
    for f in &last {
        f.wait(SEC).unwrap();
    }
    rt.synchronize().unwrap();
    for k in 0..8u64 {
        let va = r.addr + MIB2 + k * 16 * PAGE;
        assert_eq!(stamp(&rt, va), 100, "slot {k}: the last map (page 0) is what stays");
        assert!(rt.write(va, b"ro").is_err());
    }
    assert_eq!(rt.vm().mappings().len(), 8);
    // Map on one stream, unmap on the other: if an unmap overtook its map, a slot would stay
    // mapped.
    let mut fences = Vec::new();
    for round in 0..200u64 {
        let va = r.addr + 16 * MIB2 + (round % 8) * 16 * PAGE;
        let (a, b) = if round % 3 == 0 { (&s1, &s2) } else { (&s2, &s1) };
        fences.push(rt.map_async(a, va, &m, 0, 4 * PAGE, Access::ReadWrite).unwrap());
        fences.push(rt.unmap_async(b, va, 4 * PAGE).unwrap());
    }
    for f in &fences {
        f.wait(SEC).unwrap();
    }
    assert_eq!(rt.vm().mappings().len(), 8, "a map outlived the unmap submitted after it");
    // Sparse and repeat, asynchronously.
    let f = rt.map_sparse_async(&s1, r.addr + 32 * MIB2, 4 * MIB2).unwrap();
    let g = rt
        .map_repeat_async(&s2, r.addr + 40 * MIB2, 64 * PAGE, &m, 2 * PAGE, 4 * PAGE, Access::Read)
        .unwrap();
    f.wait(SEC).unwrap();
    g.wait(SEC).unwrap();
    assert_eq!(stamp(&rt, r.addr + 33 * MIB2), 0);
    rt.write(r.addr + 33 * MIB2, b"dropped").unwrap();
    assert_eq!(stamp(&rt, r.addr + 33 * MIB2), 0);
    for p in 0..64u64 {
        assert_eq!(stamp(&rt, r.addr + 40 * MIB2 + p * PAGE), 100 + 2 + p % 4);
    }
    let s = rt.set_access_async(&s1, r.addr + 40 * MIB2, 8 * PAGE, Access::ReadWrite).unwrap();
    s.wait(SEC).unwrap();
    rt.write(r.addr + 40 * MIB2 + PAGE, &7u64.to_le_bytes()).unwrap();
    // The repeat's period is one memory range: the write shows in every period.
    assert_eq!(stamp(&rt, r.addr + 40 * MIB2 + 5 * PAGE), 7);
}

#[test]
fn memory_from_a_file_reads_back_through_the_gpu() {
    let (_mem, rt) = runtime(32 << 20);
    let path = std::env::temp_dir().join(format!("vmbind-runtime-{}.bin", std::process::id()));
    let data: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let m = rt.memory_from_file(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let r = rt.reserve(m.size(), 0, None).unwrap();
    rt.map(r.addr, &m, 0, m.size(), Access::Read).unwrap();
    let mut back = vec![0u8; data.len()];
    rt.read(r.addr, &mut back).unwrap();
    assert_eq!(back, data);
    let missing = rt.memory_from_file(std::path::Path::new("/nonexistent/vmbind"));
    assert!(matches!(missing, Err(RuntimeError::Io { .. })));
    // An arena too small for the memory: a typed error, nothing left behind.
    let e = rt.alloc(1 << 30, Placement::Scattered).unwrap_err();
    assert!(matches!(e, RuntimeError::Mem(_)), "{e}");
    assert!(matches!(rt.alloc(PAGE, Placement::Contiguous), Err(RuntimeError::Misaligned { .. })));
    assert_eq!(rt.live_memories(), 1);
}

#[test]
fn a_release_racing_the_last_asynchronous_unmap_frees_the_memory_once_that_unmap_is_visible() {
    let (mem, rt) = runtime(32 << 20);
    let s = rt.create_stream().unwrap();
    let r = rt.reserve(MIB2, MIB2, None).unwrap();
    let before = mem.usage().free_frames;
    for round in 0..20 {
        let m = rt.alloc(16 * PAGE, Placement::Scattered).unwrap();
        rt.map(r.addr, &m, 0, 16 * PAGE, Access::ReadWrite).unwrap();
        let gate = vmbind::service::Fence::new();
        // Hold the stream back so the unmap is surely still queued when the release comes.
        let hold = stream_queue(&s).submit(vec![], std::slice::from_ref(&gate), &[]);
        let f = rt.unmap_async(&s, r.addr, 16 * PAGE).unwrap();
        rt.release(&m).unwrap();
        assert_eq!(rt.live_memories(), 1, "round {round}: freed before its unmap ran");
        gate.signal().unwrap();
        hold.unwrap().wait(SEC).unwrap();
        f.wait(SEC).unwrap();
        assert_eq!(rt.live_memories(), 0, "round {round}: the memory leaked");
        assert_eq!(rt.release(&m), Err(RuntimeError::Released { memory: m.id() }));
    }
    rt.free(r).unwrap();
    assert!(mem.usage().free_frames >= before, "frames leaked");
}

/// The bind queue under a stream (the runtime exposes its service; a stream is one of its
/// queues), to hold the stream back behind a host fence.
fn stream_queue(s: &vmbind::runtime::Stream) -> vmbind::service::BindQueue {
    s.queue().clone()
}

#[test]
fn a_stream_of_another_runtime_is_refused() {
    let (_mem, rt) = runtime(16 << 20);
    let (_mem2, rt2) = runtime(16 << 20);
    let theirs = rt2.create_stream().unwrap();
    let r = rt.reserve(MIB2, MIB2, None).unwrap();
    let m = rt.alloc(PAGE, Placement::Scattered).unwrap();
    assert_eq!(
        rt.map_async(&theirs, r.addr, &m, 0, PAGE, Access::Read).unwrap_err(),
        RuntimeError::ForeignStream
    );
    assert!(rt.vm().mappings().is_empty() && rt2.vm().mappings().is_empty());
}

#[test]
fn access_changes_and_unmaps_inside_a_repeat_mapping_keep_its_bytes() {
    let (_mem, rt) = runtime(16 << 20);
    let r = rt.reserve(MIB2, MIB2, None).unwrap();
    let m = rt.alloc(4 * PAGE, Placement::Scattered).unwrap();
    rt.map(r.addr, &m, 0, 4 * PAGE, Access::ReadWrite).unwrap();
    for p in 0..4u64 {
        rt.write(r.addr + p * PAGE, &(500 + p).to_le_bytes()).unwrap();
    }
    rt.unmap(r.addr, 4 * PAGE).unwrap();
    // 12 pages repeating memory pages [0, 4); then read-only over pages 5..7 (not a whole
    // period), and an unmap of page 9.
    rt.map_repeat(r.addr, 12 * PAGE, &m, 0, 4 * PAGE, Access::ReadWrite).unwrap();
    rt.set_access(r.addr + 5 * PAGE, 2 * PAGE, Access::Read).unwrap();
    rt.unmap(r.addr + 9 * PAGE, PAGE).unwrap();
    for p in 0..12u64 {
        let va = r.addr + p * PAGE;
        if p == 9 {
            assert!(rt.read(va, &mut [0u8; 8]).is_err());
            continue;
        }
        assert_eq!(stamp(&rt, va), 500 + p % 4, "page {p}");
        assert_eq!(rt.write(va + 8, b"w").is_ok(), !(5..7).contains(&p), "page {p}");
    }
    // And back to read-write across the pieces.
    rt.set_access(r.addr + 4 * PAGE, 4 * PAGE, Access::ReadWrite).unwrap();
    rt.write(r.addr + 6 * PAGE + 8, b"w").unwrap();
}

#[test]
fn unmaps_starting_at_one_address_all_order_a_later_map_on_another_stream() {
    let (_mem, rt) = runtime(32 << 20);
    let (a, b) = (rt.create_stream().unwrap(), rt.create_stream().unwrap());
    let r = rt.reserve(MIB2, MIB2, None).unwrap();
    let m = rt.alloc(4 * PAGE, Placement::Scattered).unwrap();
    for round in 0..50 {
        rt.map(r.addr, &m, 0, 2 * PAGE, Access::ReadWrite).unwrap();
        let gate = vmbind::service::Fence::new();
        let hold = a.queue().submit(vec![], std::slice::from_ref(&gate), &[]).unwrap();
        rt.unmap_async(&a, r.addr, 2 * PAGE).unwrap();
        rt.map_async(&a, r.addr, &m, 0, PAGE, Access::ReadWrite).unwrap();
        rt.unmap_async(&a, r.addr, PAGE).unwrap();
        // The page at +PAGE was unmapped by the first unmap, still held back: this map on B
        // must wait for it.
        let f = rt.map_async(&b, r.addr + PAGE, &m, 3 * PAGE, PAGE, Access::ReadWrite).unwrap();
        gate.signal().unwrap();
        hold.wait(SEC).unwrap();
        f.wait(SEC).unwrap();
        rt.synchronize().unwrap();
        assert!(rt.read(r.addr, &mut [0u8; 8]).is_err(), "round {round}");
        rt.read(r.addr + PAGE, &mut [0u8; 8])
            .unwrap_or_else(|e| panic!("round {round}: the map on B was wiped: {e}"));
        rt.unmap(r.addr + PAGE, PAGE).unwrap();
    }
}
