//! NVMe PRP lists and SGLs built from DMA segments and read back by the controller-side
//! decoders through the IOMMU (REFERENCES.md §2).

use std::sync::Arc;

use proptest::prelude::*;
use vmbind::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use vmbind::dma::{Device, DmaVec, IovaState};
use vmbind::iommu::{DeviceId, DomainConfig, Iommu};
use vmbind::mem::PhysMem;
use vmbind::nvme::{self, ListPool, MAX_TRANSFER, NvmeError, SglOptions, sgl_type};

const DEV: DeviceId = DeviceId(0x0400);

#[path = "common/nvme.rs"]
mod common_nvme;

struct Rig {
    mem: Arc<PhysMem>,
    iommu: Iommu,
    dev: Device,
    pool: ListPool,
}

fn rig() -> Rig {
    let mem = Arc::new(PhysMem::new(256 << 20).unwrap());
    let iommu = Iommu::new(mem.clone());
    let dom = iommu.create_domain(DomainConfig::default()).unwrap();
    iommu.register_device(DEV, true).unwrap();
    iommu.attach(DEV, &dom).unwrap();
    let dev = Device::translated(&iommu, DEV).unwrap();
    let pool = ListPool::new(&dev, 64).unwrap();
    Rig { mem, iommu, dev, pool }
}

fn request(r: &Rig, head: u64, len: u64, seed: u64) -> (DmaVec, Vec<u8>, IovaState) {
    common_nvme::request(&r.mem, &r.dev, head, len, seed, 7)
}

fn entries_in(r: &Rig, list: PhysAddr) -> Vec<u64> {
    (0..512).map(|i| r.mem.read_u64(PhysAddr::new(list.as_u64() + 8 * i)).unwrap()).collect()
}

#[test]
fn prp_offset_first_page_needs_no_prp2() {
    let mut r = rig();
    let (v, data, _s) = request(&r, 0x200, 0x400, 1);
    let p = nvme::build_prp(&mut r.pool, &v, PAGE_SIZE, MAX_TRANSFER).unwrap();
    assert_eq!(p.prp1.as_u64() % PAGE_SIZE, 0x200);
    assert_eq!(p.prp2, DmaAddr::ZERO);
    assert!(p.lists.is_empty());
    assert_eq!(nvme::read_prp(&r.iommu, DEV, p.prp1, p.prp2, 0x400, PAGE_SIZE).unwrap(), data);
}

#[test]
fn prp_exactly_two_pages_use_prp2_as_data() {
    let mut r = rig();
    let (v, data, _s) = request(&r, 0, 2 * PAGE_SIZE, 2);
    let p = nvme::build_prp(&mut r.pool, &v, PAGE_SIZE, MAX_TRANSFER).unwrap();
    assert!(p.lists.is_empty());
    assert_eq!(p.prp2.as_u64(), p.prp1.as_u64() + PAGE_SIZE);
    assert_eq!(nvme::read_prp(&r.iommu, DEV, p.prp1, p.prp2, 2 * PAGE_SIZE, PAGE_SIZE).unwrap(), data);
}

#[test]
fn prp_three_pages_use_a_list() {
    let mut r = rig();
    let (v, data, _s) = request(&r, 0x10, 2 * PAGE_SIZE + 0x20, 3);
    let p = nvme::build_prp(&mut r.pool, &v, PAGE_SIZE, MAX_TRANSFER).unwrap();
    assert_eq!(p.lists.len(), 1);
    assert_eq!(p.prp2, p.lists[0].1);
    let e = entries_in(&r, p.lists[0].0);
    assert_eq!(e[0], p.prp1.as_u64() - 0x10 + PAGE_SIZE);
    assert_eq!(e[1], p.prp1.as_u64() - 0x10 + 2 * PAGE_SIZE);
    assert_eq!(nvme::read_prp(&r.iommu, DEV, p.prp1, p.prp2, 2 * PAGE_SIZE + 0x20, PAGE_SIZE).unwrap(), data);
}

#[test]
fn prp_513_aligned_pages_fill_one_list_of_exactly_512_entries() {
    let mut r = rig();
    let len = 513 * PAGE_SIZE;
    let (v, data, _s) = request(&r, 0, len, 4);
    let p = nvme::build_prp(&mut r.pool, &v, PAGE_SIZE, MAX_TRANSFER).unwrap();
    assert_eq!(p.lists.len(), 1, "no chain");
    let e = entries_in(&r, p.lists[0].0);
    assert_eq!(e[511], p.prp1.as_u64() + 512 * PAGE_SIZE, "slot 511 holds data");
    assert_eq!(nvme::read_prp(&r.iommu, DEV, p.prp1, p.prp2, len, PAGE_SIZE).unwrap(), data);
}

#[test]
fn prp_514_aligned_pages_chain_511_entries_then_2() {
    let mut r = rig();
    let len = 514 * PAGE_SIZE;
    let (v, data, _s) = request(&r, 0, len, 5);
    let p = nvme::build_prp(&mut r.pool, &v, PAGE_SIZE, MAX_TRANSFER).unwrap();
    assert_eq!(p.lists.len(), 2);
    let first = entries_in(&r, p.lists[0].0);
    assert_eq!(first[510], p.prp1.as_u64() + 511 * PAGE_SIZE);
    assert_eq!(first[511], p.lists[1].1.as_u64(), "slot 511 points at the second list page");
    let second = entries_in(&r, p.lists[1].0);
    assert_eq!(&second[..2], &[p.prp1.as_u64() + 512 * PAGE_SIZE, p.prp1.as_u64() + 513 * PAGE_SIZE]);
    assert_eq!(nvme::read_prp(&r.iommu, DEV, p.prp1, p.prp2, len, PAGE_SIZE).unwrap(), data);
}

#[test]
fn prp_8_mib_maximum_and_no_list_crosses_a_page() {
    let mut r = rig();
    let (v, data, _s) = request(&r, 0, MAX_TRANSFER, 6);
    let p = nvme::build_prp(&mut r.pool, &v, PAGE_SIZE, MAX_TRANSFER).unwrap();
    // 2047 entries after PRP1: 511 + 511 + 511 + 511 + 3.
    assert_eq!(p.lists.len(), 5);
    for (_, dma) in &p.lists {
        assert_eq!(dma.as_u64() % PAGE_SIZE, 0, "each list is one whole page");
    }
    assert_eq!(nvme::read_prp(&r.iommu, DEV, p.prp1, p.prp2, MAX_TRANSFER, PAGE_SIZE).unwrap(), data);
    r.pool.release(p.lists);
    let (big, _, _s2) = request(&r, 0, MAX_TRANSFER + PAGE_SIZE, 7);
    assert_eq!(
        nvme::build_prp(&mut r.pool, &big, PAGE_SIZE, MAX_TRANSFER),
        Err(NvmeError::TooLarge { len: MAX_TRANSFER + PAGE_SIZE, max: MAX_TRANSFER })
    );
}

#[test]
fn prp_refuses_a_middle_segment_off_a_page_and_sgl_takes_it() {
    let mut r = rig();
    let (a, da, _sa) = request(&r, 0, PAGE_SIZE + 0x100, 8);
    let (b, db, _sb) = request(&r, 0, PAGE_SIZE, 9);
    let mut v = DmaVec::default();
    v.push(a.segments()[0].addr, a.segments()[0].len).unwrap();
    v.push(b.segments()[0].addr, b.segments()[0].len).unwrap();
    let free = r.pool.available();
    assert_eq!(
        nvme::build_prp(&mut r.pool, &v, PAGE_SIZE, MAX_TRANSFER),
        Err(NvmeError::NotPrpExpressible { segment: 0 })
    );
    assert_eq!(r.pool.available(), free, "nothing taken");
    let s = nvme::build_sgl(&mut r.pool, &v, MAX_TRANSFER, SglOptions::default()).unwrap();
    assert_eq!(s.sgl1[15] >> 4, sgl_type::LAST_SEGMENT);
    let want: Vec<u8> = da.into_iter().chain(db).collect();
    assert_eq!(nvme::read_sgl(&r.iommu, DEV, &s.sgl1, want.len() as u64).unwrap(), want);
}

#[test]
fn sgl_one_segment_goes_inline_as_a_data_block() {
    let mut r = rig();
    let (v, data, _s) = request(&r, 0x30, 3 * PAGE_SIZE, 10);
    let s = nvme::build_sgl(&mut r.pool, &v, MAX_TRANSFER, SglOptions::default()).unwrap();
    assert!(s.tables.is_empty());
    assert_eq!(s.sgl1[15] >> 4, sgl_type::DATA);
    assert_eq!(nvme::read_sgl(&r.iommu, DEV, &s.sgl1, 3 * PAGE_SIZE).unwrap(), data);
}

#[test]
fn sgl_more_than_256_segments_chain_only_when_asked() {
    let mut r = rig();
    let mut v = DmaVec::default();
    let mut want = Vec::new();
    let mut keep = Vec::new();
    for i in 0..300u64 {
        // Separate small requests: their segments never touch, so they stay 300 segments.
        let (one, d, s) = request(&r, 0x40, 0x100, 100 + i);
        v.push(one.segments()[0].addr, 0x100).unwrap();
        want.extend(d);
        keep.push(s);
    }
    assert_eq!(v.len(), 300);
    assert_eq!(
        nvme::build_sgl(&mut r.pool, &v, MAX_TRANSFER, SglOptions::default()),
        Err(NvmeError::TooManySegments { segments: 300, max: 256 })
    );
    let s = nvme::build_sgl(&mut r.pool, &v, MAX_TRANSFER, SglOptions { chain: true }).unwrap();
    assert_eq!(s.tables.len(), 2);
    assert_eq!(s.sgl1[15] >> 4, sgl_type::SEGMENT);
    assert_eq!(nvme::read_sgl(&r.iommu, DEV, &s.sgl1, want.len() as u64).unwrap(), want);
}

#[test]
fn decoders_fault_on_unmapped_pointers_and_reject_offsets() {
    let r = rig();
    let bogus = DmaAddr::new(0x7000_0000);
    assert!(matches!(
        nvme::read_prp(&r.iommu, DEV, bogus, DmaAddr::ZERO, 64, PAGE_SIZE),
        Err(NvmeError::Fault(_))
    ));
    let (v, _data, _s) = request(&r, 0, 2 * PAGE_SIZE, 11);
    let prp1 = v.segments()[0].addr;
    let odd = DmaAddr::new(prp1.as_u64() + PAGE_SIZE + 8);
    assert_eq!(
        nvme::read_prp(&r.iommu, DEV, prp1, odd, 2 * PAGE_SIZE, PAGE_SIZE),
        Err(NvmeError::PrpOffsetInvalid(odd))
    );
    let bucket = nvme::sgl_descriptor(prp1, 64, sgl_type::BIT_BUCKET);
    assert_eq!(
        nvme::read_sgl(&r.iommu, DEV, &bucket, 64),
        Err(NvmeError::BadDescriptor(sgl_type::BIT_BUCKET))
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn prp_and_sgl_round_trip_random_requests(head in 0u64..1024, len in 1u64..(3 << 20), seed in any::<u64>()) {
        let head = head * 4; // PRP1 must be dword aligned
        let mut r = rig();
        let (v, data, _s) = request(&r, head, len, seed);
        let p = nvme::build_prp(&mut r.pool, &v, PAGE_SIZE, MAX_TRANSFER).unwrap();
        prop_assert_eq!(nvme::read_prp(&r.iommu, DEV, p.prp1, p.prp2, len, PAGE_SIZE).unwrap(), data.clone());
        r.pool.release(p.lists);
        let s = nvme::build_sgl(&mut r.pool, &v, MAX_TRANSFER, SglOptions::default()).unwrap();
        prop_assert_eq!(nvme::read_sgl(&r.iommu, DEV, &s.sgl1, len).unwrap(), data);
    }
}

#[test]
fn prp_with_a_16k_controller_page_size_chains_2047_entries_per_list() {
    let r = rig();
    let mut pool = ListPool::with_page_size(&r.dev, 4, 16 << 10).unwrap();
    let page = 16u64 << 10;
    let len = 2100 * page;
    let (v, data, _s) = request(&r, 0, len, 40);
    assert_eq!(nvme::build_prp(&mut pool, &v, PAGE_SIZE, len), Err(NvmeError::BadPageSize(PAGE_SIZE)));
    let p = nvme::build_prp(&mut pool, &v, page, len).unwrap();
    assert_eq!(p.lists.len(), 2, "2099 entries: 2047 + a chain pointer, then 52");
    assert_eq!(p.lists[0].1.as_u64() % page, 0);
    assert_eq!(nvme::read_prp(&r.iommu, DEV, p.prp1, p.prp2, len, page).unwrap(), data);
    assert_eq!(ListPool::with_page_size(&r.dev, 1, 12 << 10).unwrap_err(), NvmeError::BadPageSize(12 << 10));
}

#[test]
fn sgl_is_preferred_for_large_segments_or_when_prp_cannot_express_it() {
    let mut big = DmaVec::default();
    big.push(DmaAddr::new(0x10_0000), 64 << 10).unwrap();
    big.push(DmaAddr::new(0x80_0000), 64 << 10).unwrap();
    assert!(nvme::prefers_sgl(&big, PAGE_SIZE, true));
    assert!(!nvme::prefers_sgl(&big, PAGE_SIZE, false));
    let mut small = DmaVec::default();
    for i in 0..8 {
        small.push(DmaAddr::new(0x100_0000 + i * 0x10_0000), PAGE_SIZE).unwrap();
    }
    assert!(!nvme::prefers_sgl(&small, PAGE_SIZE, true));
    let mut odd = DmaVec::default();
    odd.push(DmaAddr::new(0x10_0000), 0x800).unwrap();
    odd.push(DmaAddr::new(0x20_0000), PAGE_SIZE).unwrap();
    assert!(nvme::prefers_sgl(&odd, PAGE_SIZE, true));
    // The average is rounded up, as Linux's: 32 KiB and 32 KiB - 1 average 32 KiB (SGL);
    // 32 KiB and 32 KiB - 2 average 32 KiB - 1 (PRP, which builds).
    let mut edge = DmaVec::default();
    edge.push(DmaAddr::new(0x10_0000), 32 << 10).unwrap();
    edge.push(DmaAddr::new(0x80_0000), (32 << 10) - 1).unwrap();
    assert!(nvme::prefers_sgl(&edge, PAGE_SIZE, true));
    let mut under = DmaVec::default();
    under.push(DmaAddr::new(0x10_0000), 32 << 10).unwrap();
    under.push(DmaAddr::new(0x80_0000), (32 << 10) - 2).unwrap();
    assert!(!nvme::prefers_sgl(&under, PAGE_SIZE, true));
    let mut r = rig();
    let p = nvme::build_prp(&mut r.pool, &under, PAGE_SIZE, MAX_TRANSFER).unwrap();
    r.pool.release(p.lists);
    // A first byte PRP1 cannot carry (bits 1:0 set) needs SGL, whatever the average says.
    let mut odd1 = DmaVec::default();
    odd1.push(DmaAddr::new(0x10_0001), PAGE_SIZE - 1).unwrap();
    odd1.push(DmaAddr::new(0x80_0000), PAGE_SIZE).unwrap();
    assert_eq!(
        nvme::build_prp(&mut r.pool, &odd1, PAGE_SIZE, MAX_TRANSFER).unwrap_err(),
        NvmeError::Unaligned(DmaAddr::new(0x10_0001))
    );
    assert!(nvme::prefers_sgl(&odd1, PAGE_SIZE, true));
}
