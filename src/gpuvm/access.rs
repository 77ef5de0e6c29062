//! GPU-side access through a [`Vm`]: the two-stage walk a GPU makes (GPU VA → GPU page table →
//! DMA address → the IOMMU of the GPU's device → memory), with typed faults, and the VM's dump.
#![forbid(unsafe_code)]

use core::fmt::Write as _;

use super::vm::Vm;
use crate::addr::{DmaAddr, GpuVa, PAGE_SIZE};
use crate::iommu::{Access, DmaFault};
use crate::pt::{Probe, Prot};

/// Which stage of the walk refused a GPU access, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultStage {
    /// The GPU page table has no entry for the address (neither a mapping nor sparse).
    NotMapped,
    /// The GPU page table maps it without the permission (a write to a read-only mapping).
    NotPermitted {
        /// What the entry allows.
        prot: Prot,
    },
    /// The GPU table gave a DMA address that the device's IOMMU (or, for a direct device, its
    /// reach) refused.
    Dma(DmaFault),
}

/// A GPU access that faulted: the first GPU VA that could not be accessed and the stage that
/// refused it. Nothing was read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("GPU fault: {access:?} at GPU VA {va:#x}: {stage:?}")]
pub struct GpuFault {
    /// The faulting GPU VA.
    pub va: u64,
    /// Read or write.
    pub access: Access,
    /// Who refused.
    pub stage: FaultStage,
}

/// One piece of an access after the first stage: DMA address (or sparse) and length.
#[derive(Clone, Copy)]
enum Piece {
    Dma { va: u64, dma: DmaAddr, len: u64 },
    Sparse { len: u64 },
}

impl Vm {
    /// The GPU reads `buf.len()` bytes at GPU VA `va`. Every page is translated through both
    /// stages and checked before a byte moves; sparse pages read as zeros.
    ///
    /// # Errors
    /// [`GpuFault`] naming the first refused address and stage; `buf` is untouched then.
    pub fn gpu_read(&self, va: u64, buf: &mut [u8]) -> Result<(), GpuFault> {
        let _gate = self.access_gate();
        let pieces = self.resolve(va, buf.len() as u64, Access::Read)?;
        let mut at = 0usize;
        for p in pieces {
            match p {
                Piece::Sparse { len } => {
                    buf[at..at + len as usize].fill(0);
                    at += len as usize;
                }
                Piece::Dma { va, dma, len } => {
                    let n = len as usize;
                    self.device().dma_read(dma, &mut buf[at..at + n]).map_err(|f| GpuFault {
                        va,
                        access: Access::Read,
                        stage: FaultStage::Dma(f),
                    })?;
                    at += n;
                }
            }
        }
        Ok(())
    }

    /// The GPU writes `data` at GPU VA `va`, checked whole first as [`Vm::gpu_read`]; writes to
    /// sparse pages are dropped.
    ///
    /// # Errors
    /// [`GpuFault`] (also for a read-only mapping); memory is untouched then.
    pub fn gpu_write(&self, va: u64, data: &[u8]) -> Result<(), GpuFault> {
        let _gate = self.access_gate();
        let pieces = self.resolve(va, data.len() as u64, Access::Write)?;
        let mut at = 0usize;
        for p in pieces {
            match p {
                Piece::Sparse { len } => at += len as usize,
                Piece::Dma { va, dma, len } => {
                    let n = len as usize;
                    self.device().dma_write(dma, &data[at..at + n]).map_err(|f| GpuFault {
                        va,
                        access: Access::Write,
                        stage: FaultStage::Dma(f),
                    })?;
                    at += n;
                }
            }
        }
        Ok(())
    }

    /// Both stages for `[va, va + len)`: the GPU table page by page (runs contiguous in DMA
    /// space merged), then the device's check of every DMA piece. No byte moves.
    fn resolve(&self, va: u64, len: u64, access: Access) -> Result<Vec<Piece>, GpuFault> {
        let fault = |va, stage| GpuFault { va, access, stage };
        let end = va.checked_add(len).ok_or(fault(va, FaultStage::NotMapped))?;
        let mut out: Vec<Piece> = Vec::new();
        let mut at = va;
        while at < end {
            let n = (PAGE_SIZE - (at & (PAGE_SIZE - 1))).min(end - at);
            match self.table_probe(at) {
                Probe::Empty => return Err(fault(at, FaultStage::NotMapped)),
                Probe::Sparse { .. } => match out.last_mut() {
                    Some(Piece::Sparse { len }) => *len += n,
                    _ => out.push(Piece::Sparse { len: n }),
                },
                Probe::Mapped(t) => {
                    let need = if access == Access::Read { Prot::READ } else { Prot::WRITE };
                    if !t.prot.contains(need) {
                        return Err(fault(at, FaultStage::NotPermitted { prot: t.prot }));
                    }
                    match out.last_mut() {
                        Some(Piece::Dma { dma, len, .. }) if dma.as_u64() + *len == t.pa.as_u64() => {
                            *len += n
                        }
                        _ => out.push(Piece::Dma { va: at, dma: t.pa, len: n }),
                    }
                }
            }
            at += n;
        }
        for p in &out {
            if let Piece::Dma { va, dma, len } = *p {
                self.device().dma_check(dma, len, access).map_err(|f| fault(va, FaultStage::Dma(f)))?;
            }
        }
        Ok(out)
    }

    fn table_probe(&self, va: u64) -> Probe<DmaAddr> {
        self.table().probe(GpuVa::new(va))
    }

    /// A readable listing of the VM: its mappings (address range, object and offset or sparse,
    /// flags, repeat period) and its GPU table (levels, leaf runs with sizes and fragments,
    /// sparse ranges), as the engine's dump shows it.
    #[must_use]
    pub fn dump(&self) -> String {
        let mut out = String::new();
        let maps = self.mappings();
        let _ = writeln!(
            out,
            "VM: {} mapping(s), {} object(s), GPU device {} ({})",
            maps.len(),
            self.bo_count(),
            self.device().id(),
            if self.device().is_translated() { "behind an IOMMU" } else { "direct" }
        );
        for v in &maps {
            let what = match v.obj {
                Some(bo) => format!("{bo} @ {:#x}", v.offset),
                None => "sparse".to_string(),
            };
            let mut flags = Vec::new();
            if v.flags.read_only {
                flags.push("ro".to_string());
            }
            if v.flags.no_exec {
                flags.push("nx".to_string());
            }
            if let Some(r) = v.repeat {
                flags.push(format!("repeat [{:#x}, +{:#x})", r.start, r.len));
            }
            let line = format!("  [{:#014x}, {:#014x}) {what} {}", v.addr, v.end(), flags.join(" "));
            let _ = writeln!(out, "{}", line.trim_end());
        }
        out.push_str(&self.table().dump());
        out
    }
}
