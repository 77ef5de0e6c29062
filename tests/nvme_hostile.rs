//! The NVMe decoders and builders under hostile input: page sizes, lengths and addresses chosen
//! to trip arithmetic (0, 1, 3, page boundaries ±1, `MAX_DECODE_LEN` ± 1, values near
//! `u64::MAX`), PRP lists and SGL tables that point back at themselves, random descriptors.
//! Run in a debug build (`cargo test --test nvme_hostile`), so any overflow would panic.

use std::sync::Arc;

use proptest::prelude::*;
use vmbind::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use vmbind::dma::{Attrs, Device, Direction, DmaError, DmaVec, IovaState};
use vmbind::iommu::{DeviceId, DomainConfig, Iommu};
use vmbind::mem::PhysMem;
use vmbind::nvme::{
    self, ListPool, MAX_DECODE_LEN, MAX_SGL_SEGMENTS, MAX_SGL_TABLE_LEN, MAX_SGL_TABLES, MAX_TRANSFER,
    NvmeError, SglOptions, sgl_type,
};
#[path = "common/rng.rs"]
mod rng;
use rng::SplitMix64;

const DEV: DeviceId = DeviceId(0x0400);
const A: Attrs = Attrs { skip_cpu_sync: false, mmio: false };
const TO: Direction = Direction::ToDevice;
/// Pages of the scratch region the hostile lists and tables live in.
const SCRATCH_PAGES: u64 = 8;

#[path = "common/nvme.rs"]
mod common_nvme;

struct Rig {
    mem: Arc<PhysMem>,
    iommu: Iommu,
    dev: Device,
    pool: ListPool,
    /// A device-readable scratch region: its physical and DMA addresses.
    scratch_pa: PhysAddr,
    scratch: u64,
}

fn rig_with(pool_pages: usize) -> Rig {
    let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let dom = iommu.create_domain(DomainConfig::default()).unwrap();
    iommu.register_device(DEV, true).unwrap();
    iommu.attach(DEV, &dom).unwrap();
    let dev = Device::translated(&iommu, DEV).unwrap();
    let pool = ListPool::new(&dev, pool_pages).unwrap();
    let scratch_pa = mem.alloc_block(SCRATCH_PAGES * PAGE_SIZE).unwrap();
    let scratch = dev.map_phys(scratch_pa, SCRATCH_PAGES * PAGE_SIZE, TO, A).unwrap().as_u64();
    assert_eq!(scratch % PAGE_SIZE, 0);
    Rig { mem, iommu, dev, pool, scratch_pa, scratch }
}

fn rig() -> Rig {
    rig_with(16)
}

impl Rig {
    /// Writes `bytes` at scratch offset `off`.
    fn poke(&self, off: u64, bytes: &[u8]) {
        self.mem.write(PhysAddr::new(self.scratch_pa.as_u64() + off), bytes).unwrap();
    }

    fn poke_u64(&self, off: u64, v: u64) {
        self.poke(off, &v.to_le_bytes());
    }

    /// What the device reads at `iova`.
    fn device_bytes(&self, iova: DmaAddr, len: u64) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        self.iommu.dma_read(DEV, iova, &mut b).unwrap();
        b
    }
}

fn request(r: &Rig, head: u64, len: u64, seed: u64) -> (DmaVec, Vec<u8>, IovaState) {
    common_nvme::request(&r.mem, &r.dev, head, len, seed, 13)
}

fn valid_page_size(p: u64) -> bool {
    p.is_power_of_two() && (4096..=128 << 20).contains(&p)
}

/// A hostile address: `kind` picks 0, a small unaligned value, one near `u64::MAX`, a place in
/// the scratch region (aligned or not), or anything.
fn hostile_addr(r: &Rig, kind: u8, x: u64) -> u64 {
    match kind % 10 {
        0 => 0,
        1 => x % 64,
        2 => u64::MAX - x % 8192,
        3..=5 => r.scratch + (x % SCRATCH_PAGES) * PAGE_SIZE,
        6 => r.scratch + x % (SCRATCH_PAGES * PAGE_SIZE),
        7 | 8 => r.scratch + (x % (SCRATCH_PAGES * PAGE_SIZE)) / 8 * 8,
        _ => x,
    }
}

fn page_sizes() -> impl Strategy<Value = u64> {
    prop_oneof![
        40 => Just(PAGE_SIZE),
        1 => Just(0u64),
        1 => Just(1u64),
        1 => Just(3u64),
        1 => Just(PAGE_SIZE - 1),
        1 => Just(PAGE_SIZE + 1),
        1 => Just(2048u64),
        2 => Just(8192u64),
        1 => Just(16u64 << 10),
        1 => Just(128u64 << 20),
        1 => Just((128u64 << 20) + 1),
        1 => Just(256u64 << 20),
        1 => Just(1u64 << 63),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn lengths() -> impl Strategy<Value = u64> {
    prop_oneof![
        1 => Just(0u64),
        1 => Just(1u64),
        1 => Just(PAGE_SIZE - 1),
        1 => Just(PAGE_SIZE),
        1 => Just(PAGE_SIZE + 1),
        1 => Just(2 * PAGE_SIZE - 1),
        1 => Just(2 * PAGE_SIZE),
        1 => Just(2 * PAGE_SIZE + 1),
        16 => 1u64..(600 * PAGE_SIZE),
        1 => Just(MAX_DECODE_LEN - 1),
        1 => Just(MAX_DECODE_LEN),
        1 => Just(MAX_DECODE_LEN + 1),
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 1),
        1 => Just(u64::MAX - PAGE_SIZE + 1),
        1 => any::<u64>(),
    ]
}

/// Lengths for SGL requests: mostly small, like the data descriptors in the scratch tables.
fn sgl_lengths() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 1u64..512, 1 => lengths()]
}

fn descriptor_types() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => Just(sgl_type::DATA),
        4 => Just(sgl_type::SEGMENT),
        4 => Just(sgl_type::LAST_SEGMENT),
        1 => 0u8..16,
    ]
}

fn table_lengths() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(8u32),
        Just(16u32),
        Just(32u32),
        (1u32..=256).prop_map(|n| 16 * n),
        Just(MAX_SGL_TABLE_LEN - 16),
        Just(MAX_SGL_TABLE_LEN),
        Just(MAX_SGL_TABLE_LEN + 16),
        Just(u32::MAX),
        Just(u32::MAX - 15),
        any::<u32>(),
    ]
}

/// The error `read_prp`'s arguments alone determine, in its documented order.
fn prp_argument_error(prp1: u64, len: u64, page_size: u64) -> Option<NvmeError> {
    if !valid_page_size(page_size) {
        Some(NvmeError::BadPageSize(page_size))
    } else if len == 0 {
        Some(NvmeError::Empty)
    } else if len > MAX_DECODE_LEN {
        Some(NvmeError::TooLarge { len, max: MAX_DECODE_LEN })
    } else if prp1 & 3 != 0 {
        Some(NvmeError::Unaligned(DmaAddr::new(prp1)))
    } else {
        None
    }
}

fn sgl_argument_error(len: u64) -> Option<NvmeError> {
    if len == 0 {
        Some(NvmeError::Empty)
    } else if len > MAX_DECODE_LEN {
        Some(NvmeError::TooLarge { len, max: MAX_DECODE_LEN })
    } else {
        None
    }
}

/// Fills the scratch region with PRP entries from `seed`: page addresses inside it (so lists
/// loop back into themselves), entries with offsets, slots pointing at themselves, 0, values
/// near `u64::MAX`, anything.
fn fill_hostile_prp_lists(r: &Rig, seed: u64) {
    let mut g = SplitMix64::new(seed);
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for p in 0..SCRATCH_PAGES {
        for slot in 0..512u64 {
            let own = r.scratch + p * PAGE_SIZE + slot * 8;
            let x = g.next_u64();
            let v = match g.below(8) {
                0..=3 => r.scratch + g.below(SCRATCH_PAGES) * PAGE_SIZE,
                4 => own,
                5 => own & !(PAGE_SIZE - 1),
                6 => hostile_addr(r, (x >> 56) as u8, x),
                _ => x,
            };
            page[slot as usize * 8..][..8].copy_from_slice(&v.to_le_bytes());
        }
        r.poke(p * PAGE_SIZE, &page);
    }
}

/// Fills the scratch region with SGL descriptors from `seed`: small data blocks, segment and
/// last-segment pointers back into the scratch region (their own table included), bit buckets,
/// unknown types, hostile lengths.
fn fill_hostile_sgl_tables(r: &Rig, seed: u64) {
    let mut g = SplitMix64::new(seed);
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for p in 0..SCRATCH_PAGES {
        for slot in 0..256u64 {
            let own_table = r.scratch + p * PAGE_SIZE + (slot & !1) * 16;
            let x = g.next_u64();
            let d = match g.below(6) {
                0 | 1 => nvme::sgl_descriptor(
                    DmaAddr::new(r.scratch + g.below(SCRATCH_PAGES * PAGE_SIZE)),
                    g.below(64) as u32,
                    sgl_type::DATA,
                ),
                2 => nvme::sgl_descriptor(
                    DmaAddr::new(own_table),
                    16 * (1 + g.below(4) as u32),
                    if x & 1 == 0 { sgl_type::SEGMENT } else { sgl_type::LAST_SEGMENT },
                ),
                3 => nvme::sgl_descriptor(
                    DmaAddr::new(r.scratch + g.below(SCRATCH_PAGES * 256) * 16),
                    16 * g.below(300) as u32,
                    sgl_type::SEGMENT + (x & 1) as u8,
                ),
                4 => nvme::sgl_descriptor(
                    DmaAddr::new(hostile_addr(r, (x >> 56) as u8, x)),
                    (x >> 8) as u32,
                    (x >> 40) as u8 & 0xf,
                ),
                _ => {
                    let mut d = [0u8; 16];
                    d[..8].copy_from_slice(&x.to_le_bytes());
                    d[8..].copy_from_slice(&g.next_u64().to_le_bytes());
                    d
                }
            };
            page[slot as usize * 16..][..16].copy_from_slice(&d);
        }
        r.poke(p * PAGE_SIZE, &page);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// `read_prp` on hostile arguments and hostile list pages: never a panic, the argument
    /// errors exactly where the arguments decide them, a fault for an unmapped PRP1, and on
    /// success exactly `len` bytes.
    #[test]
    fn read_prp_never_panics_on_hostile_input(
        k1 in any::<u8>(), x1 in any::<u64>(), k2 in any::<u8>(), x2 in any::<u64>(),
        len in lengths(), page_size in page_sizes(), seed in any::<u64>(),
    ) {
        let r = rig();
        fill_hostile_prp_lists(&r, seed);
        let prp1 = hostile_addr(&r, k1, x1);
        let prp2 = hostile_addr(&r, k2, x2);
        let got = nvme::read_prp(&r.iommu, DEV, DmaAddr::new(prp1), DmaAddr::new(prp2), len, page_size);
        match prp_argument_error(prp1, len, page_size) {
            Some(e) => prop_assert_eq!(got, Err(e)),
            None => match got {
                Ok(bytes) => prop_assert_eq!(bytes.len() as u64, len),
                Err(e) => {
                    if prp1 == 0 || prp1 > u64::MAX - 8192 {
                        prop_assert!(matches!(e, NvmeError::Fault(_)), "{e:?}");
                    } else {
                        prop_assert!(
                            matches!(e, NvmeError::Fault(_) | NvmeError::PrpOffsetInvalid(_)),
                            "{e:?}"
                        );
                    }
                }
            },
        }
    }

    /// `read_sgl` on a hostile SGL1 over hostile tables (self-pointing segments included):
    /// never a panic, and the error the arguments or SGL1 alone decide.
    #[test]
    fn read_sgl_never_panics_on_hostile_input(
        k in any::<u8>(), x in any::<u64>(), n in table_lengths(), data_n in any::<u32>(),
        typ in descriptor_types(), len in sgl_lengths(), seed in any::<u64>(),
    ) {
        let r = rig();
        fill_hostile_sgl_tables(&r, seed);
        let addr = hostile_addr(&r, k, x);
        let n = if typ == sgl_type::DATA && x & 1 == 0 { data_n % 0x2_0000 } else { n };
        let sgl1 = nvme::sgl_descriptor(DmaAddr::new(addr), n, typ);
        let got = nvme::read_sgl(&r.iommu, DEV, &sgl1, len);
        if let Some(e) = sgl_argument_error(len) {
            prop_assert_eq!(got, Err(e));
            return Ok(());
        }
        match typ {
            sgl_type::DATA if u64::from(n) > len => {
                prop_assert_eq!(got, Err(NvmeError::LengthMismatch { described: u64::from(n), len }));
            }
            sgl_type::DATA => match got {
                Ok(bytes) => prop_assert_eq!(bytes.len() as u64, len),
                Err(e) => prop_assert!(
                    matches!(e, NvmeError::Fault(_) | NvmeError::LengthMismatch { .. }),
                    "{e:?}"
                ),
            },
            sgl_type::SEGMENT | sgl_type::LAST_SEGMENT
                if n == 0 || n % 16 != 0 || n > MAX_SGL_TABLE_LEN =>
            {
                prop_assert_eq!(got, Err(NvmeError::BadSegmentLength(n)));
            }
            sgl_type::SEGMENT | sgl_type::LAST_SEGMENT => {
                if let Ok(bytes) = got {
                    prop_assert_eq!(bytes.len() as u64, len);
                }
            }
            other => prop_assert_eq!(got, Err(NvmeError::BadDescriptor(other))),
        }
    }

    /// Random PRP-shaped segment lists (inner joins on pages, addresses anywhere up to the top
    /// of the address space): when `build_prp` succeeds and more than PRP1's page is needed,
    /// PRP2 is not 0 and the entries are exactly the pages after PRP1; `build_sgl` points at
    /// its table or carries the one segment inline.
    #[test]
    fn built_pointers_never_leave_prp2_zero_and_match_the_pages(
        segs in prop::collection::vec((any::<u64>(), 1u64..700, any::<bool>()), 1..6),
        head in 0u64..1024, tail in 0u64..4096,
    ) {
        let mut r = rig();
        let mut v = DmaVec::default();
        let n = segs.len();
        for (i, &(page, pages, top)) in segs.iter().enumerate() {
            // Page numbers from 1 (DMA address 0 would be a legitimate but ambiguous PRP2) up
            // to the top of the address space.
            // (A segment may not end at 2^64 itself: DmaVec counts that as wrapping.)
            let max_page = (u64::MAX >> 12) - pages;
            let page = if top { max_page - page % 4 } else { 1 + page % max_page };
            let mut addr = page << 12;
            let mut len = pages << 12;
            if i == 0 {
                addr += head * 4;
                len -= head * 4;
            }
            if i + 1 == n && len > tail {
                len -= tail;
            }
            // The list refuses nothing here: no segment is empty or wraps.
            v.push(DmaAddr::new(addr), len).unwrap();
        }
        let len = v.total_len();
        let prp1 = v.segments()[0].addr.as_u64();
        match nvme::build_prp(&mut r.pool, &v, PAGE_SIZE, MAX_TRANSFER) {
            Ok(p) => {
                prop_assert_eq!(p.prp1.as_u64(), prp1);
                let rest: Vec<u64> = v.page_addrs(PAGE_SIZE).unwrap().skip(1).map(DmaAddr::as_u64).collect();
                if len <= PAGE_SIZE - prp1 % PAGE_SIZE {
                    prop_assert_eq!(p.prp2, DmaAddr::ZERO);
                } else {
                    prop_assert_ne!(p.prp2, DmaAddr::ZERO, "more than one page needs PRP2");
                    if p.lists.is_empty() {
                        prop_assert_eq!(rest, vec![p.prp2.as_u64()]);
                    } else {
                        prop_assert_eq!(p.prp2, p.lists[0].1);
                        let mut entries = Vec::new();
                        for (k, &(pa, _)) in p.lists.iter().enumerate() {
                            let last = k + 1 == p.lists.len();
                            let slots = if last { rest.len() - entries.len() } else { 511 };
                            for s in 0..slots as u64 {
                                entries.push(r.mem.read_u64(PhysAddr::new(pa.as_u64() + 8 * s)).unwrap());
                            }
                            if !last {
                                let chain = r.mem.read_u64(PhysAddr::new(pa.as_u64() + 8 * 511)).unwrap();
                                prop_assert_eq!(chain, p.lists[k + 1].1.as_u64());
                            }
                        }
                        prop_assert!(entries.iter().all(|&e| e != 0));
                        prop_assert_eq!(entries, rest);
                    }
                }
                r.pool.release(p.lists);
            }
            Err(e) => prop_assert!(
                matches!(e, NvmeError::TooLarge { .. } | NvmeError::PoolExhausted),
                "{e:?}"
            ),
        }
        match nvme::build_sgl(&mut r.pool, &v, MAX_TRANSFER, SglOptions { chain: true }) {
            Ok(s) => {
                let addr = u64::from_le_bytes(s.sgl1[..8].try_into().unwrap());
                if v.len() == 1 {
                    prop_assert_eq!(s.sgl1[15] >> 4, sgl_type::DATA);
                    prop_assert_eq!(addr, prp1);
                } else {
                    prop_assert_eq!(addr, s.tables[0].1.as_u64());
                    prop_assert_ne!(addr, 0);
                }
                r.pool.release(s.tables);
            }
            Err(e) => prop_assert!(matches!(e, NvmeError::TooLarge { .. }), "{e:?}"),
        }
    }
}

#[test]
fn read_prp_checks_its_arguments_before_allocating() {
    let r = rig();
    let p1 = DmaAddr::new(r.scratch);
    for ps in
        [0, 1, 3, 2048, PAGE_SIZE - 1, PAGE_SIZE + 1, 12 << 10, (128 << 20) + 1, 256 << 20, 1 << 63, u64::MAX]
    {
        assert_eq!(nvme::read_prp(&r.iommu, DEV, p1, p1, 64, ps), Err(NvmeError::BadPageSize(ps)));
        assert_eq!(nvme::read_prp(&r.iommu, DEV, p1, p1, u64::MAX, ps), Err(NvmeError::BadPageSize(ps)));
    }
    assert_eq!(nvme::read_prp(&r.iommu, DEV, p1, p1, 0, PAGE_SIZE), Err(NvmeError::Empty));
    for len in [MAX_DECODE_LEN + 1, u64::MAX - PAGE_SIZE, u64::MAX - 1, u64::MAX] {
        assert_eq!(
            nvme::read_prp(&r.iommu, DEV, p1, p1, len, PAGE_SIZE),
            Err(NvmeError::TooLarge { len, max: MAX_DECODE_LEN })
        );
    }
    for odd in [1, 2, 3, 0x1001] {
        let a = DmaAddr::new(r.scratch + odd);
        assert_eq!(nvme::read_prp(&r.iommu, DEV, a, p1, 64, PAGE_SIZE), Err(NvmeError::Unaligned(a)));
    }
    // Aligned but unmapped or at the top of the address space: a fault, never a wrap.
    for bad in [0, u64::MAX - 3, u64::MAX - PAGE_SIZE + 1] {
        let a = DmaAddr::new(bad);
        assert!(matches!(nvme::read_prp(&r.iommu, DEV, a, p1, 64, PAGE_SIZE), Err(NvmeError::Fault(_))));
        assert!(matches!(
            nvme::read_prp(&r.iommu, DEV, a, a, 2 * PAGE_SIZE, PAGE_SIZE),
            Err(NvmeError::Fault(_))
        ));
    }
    // A list pointer in the last slot of the top page reads the chain there, and faults.
    let top_slot = DmaAddr::new(u64::MAX - 7);
    assert!(matches!(
        nvme::read_prp(&r.iommu, DEV, p1, top_slot, 4 * PAGE_SIZE, PAGE_SIZE),
        Err(NvmeError::Fault(_))
    ));
}

#[test]
fn prp_list_pointing_at_itself_terminates_by_len() {
    let r = rig();
    // Page 1 of scratch is a list whose 512 entries (the chain slot too) all point at page 1.
    let list = r.scratch + PAGE_SIZE;
    for slot in 0..512 {
        r.poke_u64(PAGE_SIZE + 8 * slot, list);
    }
    let page_bytes = r.device_bytes(DmaAddr::new(list), PAGE_SIZE);
    let p1 = DmaAddr::new(list);
    for len in [3 * PAGE_SIZE, 600 * PAGE_SIZE + 5, 2100 * PAGE_SIZE, MAX_DECODE_LEN] {
        let got = nvme::read_prp(&r.iommu, DEV, p1, p1, len, PAGE_SIZE).unwrap();
        assert_eq!(got.len() as u64, len);
        assert!(got.chunks(PAGE_SIZE as usize).all(|c| c == &page_bytes[..c.len()]));
    }
    assert_eq!(
        nvme::read_prp(&r.iommu, DEV, p1, p1, MAX_DECODE_LEN + 1, PAGE_SIZE),
        Err(NvmeError::TooLarge { len: MAX_DECODE_LEN + 1, max: MAX_DECODE_LEN })
    );
}

#[test]
fn prp_chain_pointer_must_be_page_aligned() {
    let r = rig();
    // Page 2 is a list of data entries to page 3 whose chain slot points at itself: followed as
    // a list start it would chain to itself forever, so it is an offset error.
    let list = r.scratch + 2 * PAGE_SIZE;
    for slot in 0..511 {
        r.poke_u64(2 * PAGE_SIZE + 8 * slot, r.scratch + 3 * PAGE_SIZE);
    }
    let self_slot = list + 511 * 8;
    r.poke_u64(2 * PAGE_SIZE + 511 * 8, self_slot);
    let p1 = DmaAddr::new(r.scratch);
    let got = nvme::read_prp(&r.iommu, DEV, p1, DmaAddr::new(list), 600 * PAGE_SIZE, PAGE_SIZE);
    assert_eq!(got, Err(NvmeError::PrpOffsetInvalid(DmaAddr::new(self_slot))));
    // A list that starts in its own last slot chains at once.
    let got = nvme::read_prp(&r.iommu, DEV, p1, DmaAddr::new(self_slot), 3 * PAGE_SIZE, PAGE_SIZE);
    assert_eq!(got, Err(NvmeError::PrpOffsetInvalid(DmaAddr::new(self_slot))));
    // Ending exactly in the last slot, it is a data entry, and the offset is the data's.
    let got = nvme::read_prp(&r.iommu, DEV, p1, DmaAddr::new(self_slot), 2 * PAGE_SIZE + 1, PAGE_SIZE);
    assert_eq!(got, Err(NvmeError::PrpOffsetInvalid(DmaAddr::new(self_slot))));
}

#[test]
fn read_sgl_checks_its_arguments_and_table_lengths() {
    let r = rig();
    let t = DmaAddr::new(r.scratch);
    let one = nvme::sgl_descriptor(t, 16, sgl_type::DATA);
    assert_eq!(nvme::read_sgl(&r.iommu, DEV, &one, 0), Err(NvmeError::Empty));
    let zero = nvme::sgl_descriptor(t, 0, sgl_type::DATA);
    assert_eq!(nvme::read_sgl(&r.iommu, DEV, &zero, 0), Err(NvmeError::Empty));
    for len in [MAX_DECODE_LEN + 1, u64::MAX - 1, u64::MAX] {
        assert_eq!(
            nvme::read_sgl(&r.iommu, DEV, &one, len),
            Err(NvmeError::TooLarge { len, max: MAX_DECODE_LEN })
        );
    }
    let big = nvme::sgl_descriptor(t, u32::MAX, sgl_type::DATA);
    assert_eq!(
        nvme::read_sgl(&r.iommu, DEV, &big, 64),
        Err(NvmeError::LengthMismatch { described: u64::from(u32::MAX), len: 64 })
    );
    for typ in [sgl_type::SEGMENT, sgl_type::LAST_SEGMENT] {
        for n in [0, 8, 17, MAX_SGL_TABLE_LEN + 16, u32::MAX - 15, u32::MAX] {
            let d = nvme::sgl_descriptor(t, n, typ);
            assert_eq!(nvme::read_sgl(&r.iommu, DEV, &d, 64), Err(NvmeError::BadSegmentLength(n)));
        }
    }
    // A full 4 KiB table of 256 one-byte data descriptors is accepted.
    for i in 0..256u64 {
        r.poke(16 * i, &nvme::sgl_descriptor(DmaAddr::new(r.scratch + PAGE_SIZE + i), 1, sgl_type::DATA));
    }
    let full = nvme::sgl_descriptor(t, MAX_SGL_TABLE_LEN, sgl_type::LAST_SEGMENT);
    let want = r.device_bytes(DmaAddr::new(r.scratch + PAGE_SIZE), 256);
    assert_eq!(nvme::read_sgl(&r.iommu, DEV, &full, 256).unwrap(), want);
    // Tables and data at the top of the address space fault rather than wrap.
    let top = DmaAddr::new(u64::MAX - 15);
    let d = nvme::sgl_descriptor(top, 32, sgl_type::LAST_SEGMENT);
    assert!(matches!(nvme::read_sgl(&r.iommu, DEV, &d, 64), Err(NvmeError::Fault(_))));
    let d = nvme::sgl_descriptor(top, 64, sgl_type::DATA);
    assert!(matches!(nvme::read_sgl(&r.iommu, DEV, &d, 64), Err(NvmeError::Fault(_))));
}

#[test]
fn sgl_segment_pointing_at_itself_is_a_chain_too_long() {
    let r = rig();
    let t = DmaAddr::new(r.scratch);
    // A table of one segment descriptor to itself.
    let to_self = nvme::sgl_descriptor(t, 16, sgl_type::SEGMENT);
    r.poke(0, &to_self);
    assert_eq!(
        nvme::read_sgl(&r.iommu, DEV, &to_self, 4096),
        Err(NvmeError::SglChainTooLong { max: MAX_SGL_TABLES })
    );
    // Zero-length data descriptors and a pointer back: nothing is ever read, still bounded.
    let t2 = DmaAddr::new(r.scratch + PAGE_SIZE);
    r.poke(PAGE_SIZE, &nvme::sgl_descriptor(t, 0, sgl_type::DATA));
    r.poke(PAGE_SIZE + 16, &nvme::sgl_descriptor(t2, 32, sgl_type::SEGMENT));
    let d = nvme::sgl_descriptor(t2, 32, sgl_type::SEGMENT);
    assert_eq!(nvme::read_sgl(&r.iommu, DEV, &d, 1), Err(NvmeError::SglChainTooLong { max: MAX_SGL_TABLES }));
    // With one byte per table the request's length ends the loop first.
    r.poke(PAGE_SIZE, &nvme::sgl_descriptor(t, 1, sgl_type::DATA));
    assert_eq!(
        nvme::read_sgl(&r.iommu, DEV, &d, 10),
        Err(NvmeError::LengthMismatch { described: 11, len: 10 })
    );
}

/// Writes a chain of `tables` tables of 32 bytes each (one 1-byte data descriptor and a pointer
/// to the next) into scratch page 0 and returns SGL1 and the bytes it describes.
fn chain_of(r: &Rig, tables: u64) -> ([u8; 16], Vec<u8>) {
    let data = r.scratch + PAGE_SIZE;
    let mut want = Vec::new();
    for k in 0..tables {
        let last = k + 1 == tables;
        r.poke(32 * k, &nvme::sgl_descriptor(DmaAddr::new(data + k), 1, sgl_type::DATA));
        if !last {
            let typ = if k + 2 == tables { sgl_type::LAST_SEGMENT } else { sgl_type::SEGMENT };
            let len = if k + 2 == tables { 16 } else { 32 };
            r.poke(32 * k + 16, &nvme::sgl_descriptor(DmaAddr::new(r.scratch + 32 * (k + 1)), len, typ));
        }
        want.extend(r.device_bytes(DmaAddr::new(data + k), 1));
    }
    let first_len = if tables == 1 { 16 } else { 32 };
    let typ = if tables == 1 { sgl_type::LAST_SEGMENT } else { sgl_type::SEGMENT };
    (nvme::sgl_descriptor(DmaAddr::new(r.scratch), first_len, typ), want)
}

#[test]
fn sgl_chain_of_exactly_max_tables_is_followed_one_more_is_refused() {
    let r = rig();
    let n = MAX_SGL_TABLES as u64;
    let (sgl1, want) = chain_of(&r, n);
    assert_eq!(nvme::read_sgl(&r.iommu, DEV, &sgl1, n).unwrap(), want);
    let (sgl1, _) = chain_of(&r, n + 1);
    assert_eq!(
        nvme::read_sgl(&r.iommu, DEV, &sgl1, n + 1),
        Err(NvmeError::SglChainTooLong { max: MAX_SGL_TABLES })
    );
}

#[test]
fn build_sgl_builds_what_read_sgl_follows_and_no_more() {
    let mut r = rig_with(MAX_SGL_TABLES + 1);
    // MAX_SGL_SEGMENTS one-byte segments in the scratch region, two bytes apart, so none merge.
    let span = SCRATCH_PAGES * PAGE_SIZE;
    let mut v = DmaVec::default();
    let mut want = Vec::new();
    let all = r.device_bytes(DmaAddr::new(r.scratch), span);
    for i in 0..MAX_SGL_SEGMENTS as u64 {
        let off = (2 * i) % span;
        v.push(DmaAddr::new(r.scratch + off), 1).unwrap();
        want.push(all[off as usize]);
    }
    assert_eq!(v.len(), MAX_SGL_SEGMENTS);
    let s = nvme::build_sgl(&mut r.pool, &v, MAX_TRANSFER, SglOptions { chain: true }).unwrap();
    assert_eq!(s.tables.len(), MAX_SGL_TABLES);
    assert_eq!(nvme::read_sgl(&r.iommu, DEV, &s.sgl1, want.len() as u64).unwrap(), want);
    r.pool.release(s.tables);
    let free = r.pool.available();
    v.push(DmaAddr::new(r.scratch + span - 1), 1).unwrap();
    assert_eq!(
        nvme::build_sgl(&mut r.pool, &v, MAX_TRANSFER, SglOptions { chain: true }),
        Err(NvmeError::TooManySegments { segments: MAX_SGL_SEGMENTS + 1, max: MAX_SGL_SEGMENTS })
    );
    assert_eq!(r.pool.available(), free, "nothing taken");
}

#[test]
fn dmavec_refuses_empty_and_wrapping_pushes_and_the_rest_round_trips() {
    let mut r = rig();
    // Three mapped requests whose joins fall on pages (PRP can express them), with refused
    // pushes between them.
    let (a, _, _sa) = request(&r, 0x40, 3 * PAGE_SIZE - 0x40, 1);
    let (b, _, _sb) = request(&r, 0, 5 * PAGE_SIZE, 2);
    let (c, _, _sc) = request(&r, 0, 2 * PAGE_SIZE + 0x123, 3);
    let mut v = DmaVec::default();
    let top = DmaAddr::new(u64::MAX - PAGE_SIZE + 1);
    for (i, part) in [&a, &b, &c].into_iter().enumerate() {
        let s = part.segments()[0];
        assert_eq!(v.push(s.addr, 0), Err(DmaError::EmptySegment { index: v.len() }));
        assert_eq!(
            v.push(top, 2 * PAGE_SIZE),
            Err(DmaError::SegmentOverflow { addr: top, len: 2 * PAGE_SIZE })
        );
        assert_eq!(v.push(top, u64::MAX), Err(DmaError::SegmentOverflow { addr: top, len: u64::MAX }));
        v.push(s.addr, s.len).unwrap();
        assert!(v.len() <= i + 1);
    }
    // The bytes the segments describe, read by the device at their IOVAs.
    let want: Vec<u8> = v.segments().iter().flat_map(|s| r.device_bytes(s.addr, s.len)).collect();
    let len = v.total_len();
    assert_eq!(len, want.len() as u64);
    let p = nvme::build_prp(&mut r.pool, &v, PAGE_SIZE, MAX_TRANSFER).unwrap();
    assert_ne!(p.prp2, DmaAddr::ZERO);
    assert_eq!(nvme::read_prp(&r.iommu, DEV, p.prp1, p.prp2, len, PAGE_SIZE).unwrap(), want);
    r.pool.release(p.lists);
    for chain in [false, true] {
        let s = nvme::build_sgl(&mut r.pool, &v, MAX_TRANSFER, SglOptions { chain }).unwrap();
        assert_eq!(nvme::read_sgl(&r.iommu, DEV, &s.sgl1, len).unwrap(), want);
        // Asking for a byte more or less is a length mismatch, not a short or long read.
        assert!(matches!(
            nvme::read_sgl(&r.iommu, DEV, &s.sgl1, len + 1),
            Err(NvmeError::LengthMismatch { .. })
        ));
        assert!(matches!(
            nvme::read_sgl(&r.iommu, DEV, &s.sgl1, len - 1),
            Err(NvmeError::LengthMismatch { .. })
        ));
        r.pool.release(s.tables);
    }
}

#[test]
fn builders_refuse_bad_page_sizes_and_overflowing_totals() {
    let mut r = rig();
    let (v, _, _s) = request(&r, 0, 3 * PAGE_SIZE, 4);
    for ps in [0, 1, 3, PAGE_SIZE - 1, PAGE_SIZE + 1, 8192, 256 << 20, u64::MAX] {
        assert_eq!(nvme::build_prp(&mut r.pool, &v, ps, MAX_TRANSFER), Err(NvmeError::BadPageSize(ps)));
        assert!(nvme::prefers_sgl(&v, ps, true) || valid_page_size(ps));
        assert!(!nvme::prefers_sgl(&v, ps, false));
    }
    assert!(!nvme::prefers_sgl(&DmaVec::default(), 0, true));
    let empty = DmaVec::default();
    assert_eq!(nvme::build_prp(&mut r.pool, &empty, PAGE_SIZE, MAX_TRANSFER), Err(NvmeError::Empty));
    assert_eq!(
        nvme::build_sgl(&mut r.pool, &empty, MAX_TRANSFER, SglOptions::default()),
        Err(NvmeError::Empty)
    );
    // Two overlapping halves of the address space: their lengths sum past u64::MAX.
    let mut huge = DmaVec::default();
    huge.push(DmaAddr::new(PAGE_SIZE), 1 << 63).unwrap();
    huge.push(DmaAddr::new(PAGE_SIZE), 1 << 63).unwrap();
    assert_eq!(huge.len(), 2);
    let over = NvmeError::TooLarge { len: u64::MAX, max: u64::MAX };
    assert_eq!(nvme::build_prp(&mut r.pool, &huge, PAGE_SIZE, u64::MAX), Err(over.clone()));
    assert_eq!(nvme::build_sgl(&mut r.pool, &huge, u64::MAX, SglOptions { chain: true }), Err(over));
    assert!(nvme::prefers_sgl(&huge, PAGE_SIZE, true));
    // A segment ending one page below 2^64 builds (DmaVec refuses one ending at 2^64 itself).
    let top = u64::MAX - PAGE_SIZE + 1;
    assert!(DmaVec::from_segment(DmaAddr::new(top), PAGE_SIZE).is_err());
    let mut high = DmaVec::default();
    high.push(DmaAddr::new(top - 3 * PAGE_SIZE), 3 * PAGE_SIZE).unwrap();
    let p = nvme::build_prp(&mut r.pool, &high, PAGE_SIZE, MAX_TRANSFER).unwrap();
    assert_eq!(p.lists.len(), 1);
    assert_eq!(r.mem.read_u64(p.lists[0].0).unwrap(), top - 2 * PAGE_SIZE);
    assert_eq!(r.mem.read_u64(PhysAddr::new(p.lists[0].0.as_u64() + 8)).unwrap(), top - PAGE_SIZE);
    r.pool.release(p.lists);
    assert!(!nvme::prefers_sgl(&high, PAGE_SIZE, true));
    // A huge max_len with a request too big for the pool: refused without taking a page.
    let mut wide = DmaVec::default();
    wide.push(DmaAddr::new(PAGE_SIZE), 1 << 62).unwrap();
    let free = r.pool.available();
    assert_eq!(nvme::build_prp(&mut r.pool, &wide, PAGE_SIZE, u64::MAX), Err(NvmeError::PoolExhausted));
    assert_eq!(r.pool.available(), free);
    assert_eq!(
        nvme::build_sgl(&mut r.pool, &wide, u64::MAX, SglOptions::default()),
        Err(NvmeError::TooLarge { len: 1 << 62, max: u64::from(u32::MAX) })
    );
}
