//! GPU VM helpers shared by the tests: a VM whose GPU sits behind an IOMMU or is direct, the raw
//! entry a GPU walk reaches, and that every fragment claim in a range holds.
#![allow(dead_code)]

use std::sync::Arc;

use vmbind::addr::{PAGE_SIZE, PhysAddr};
use vmbind::dma::Device;
use vmbind::gpuvm::Vm;
use vmbind::iommu::{DeviceId, Domain, DomainConfig, Iommu};
use vmbind::mem::PhysMem;
use vmbind::pt::GpuGfx9;
use vmbind::pt::gpu::{GPU_HUGE, GPU_PRT, GPU_VALID};

/// How the test GPU reaches memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Behind an IOMMU, in a strict domain of its own.
    Iommu,
    /// No IOMMU, 48 address bits.
    Direct,
}

/// The GPU's device id in [`fx`].
pub const GPU: DeviceId = DeviceId(3);

/// A VM over `[0, 2^40)`, its arena and (behind an IOMMU) its domain.
pub struct Fx {
    pub mem: Arc<PhysMem>,
    pub dom: Option<Arc<Domain>>,
    pub vm: Vm,
}

/// A VM for a GPU reaching an arena of `arena` bytes as `mode` says.
pub fn fx(mode: Mode, arena: u64) -> Fx {
    let mem = Arc::new(PhysMem::new(arena).unwrap());
    let (dev, dom) = match mode {
        Mode::Iommu => {
            let iommu = Iommu::new(mem.clone());
            let dom = iommu.create_domain(DomainConfig::default()).unwrap();
            iommu.register_device(GPU, true).unwrap();
            iommu.attach(GPU, &dom).unwrap();
            (Device::translated(&iommu, GPU).unwrap(), Some(dom))
        }
        Mode::Direct => (Device::direct(mem.clone(), GPU, 48, true).unwrap(), None),
    };
    Fx { vm: Vm::new(dev, 1 << 40).unwrap(), mem, dom }
}

/// The raw entry that maps `va` and its level (0 for a 4 KiB leaf), read through the arena as the
/// GPU would; `None` where a walk finds nothing.
pub fn raw_entry(mem: &PhysMem, root: PhysAddr, va: u64) -> Option<(u64, u32)> {
    let mut table = root.as_u64();
    for level in (0..4u32).rev() {
        let idx = (va >> (12 + 9 * level)) & 511;
        let raw = mem.read_u64(PhysAddr::new(table + 8 * idx)).unwrap();
        if raw & (GPU_VALID | GPU_PRT) == 0 {
            return None;
        }
        if level == 0 || raw & GPU_HUGE != 0 || raw & GPU_VALID == 0 {
            return Some((raw, level));
        }
        table = raw & 0xffff_ffff_f000;
    }
    None
}

pub fn frag(raw: u64) -> u64 {
    GpuGfx9::fragment_of(raw) as u64
}

/// Every 4 KiB leaf's fragment claim holds: its aligned block is wholly mapped by valid 4 KiB
/// leaves of one contiguous, equally aligned run.
pub fn fragments_are_sound(mem: &PhysMem, root: PhysAddr, lo: u64, hi: u64) -> Result<(), String> {
    for va in (lo..hi).step_by(PAGE_SIZE as usize) {
        let Some((raw, 0)) = raw_entry(mem, root, va) else { continue };
        let f = frag(raw);
        if f == 0 {
            continue;
        }
        if raw & GPU_VALID == 0 {
            return Err(format!("{va:#x}: a sparse entry claims fragment {f}"));
        }
        let size = PAGE_SIZE << f;
        let bs = va & !(size - 1);
        let delta = (raw & 0xffff_ffff_f000).wrapping_sub(va);
        if delta % size != 0 {
            return Err(format!("{va:#x}: fragment {f} on a run aligned differently"));
        }
        for b in (bs..bs + size).step_by(PAGE_SIZE as usize) {
            match raw_entry(mem, root, b) {
                Some((r, 0)) if r & GPU_VALID != 0 && (r & 0xffff_ffff_f000).wrapping_sub(b) == delta => {}
                other => return Err(format!("{va:#x}: fragment {f} but {b:#x} holds {other:x?}")),
            }
        }
    }
    Ok(())
}
