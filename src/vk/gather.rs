//! [`WalkGather`]: the two-stage walk in a compute shader, and [`CopyJob`], a plain buffer copy
//! of the same number of bytes on the same device (the benchmark's baseline).

use std::sync::Arc;

use ash::vk;
use gpu_allocator::MemoryLocation;

use super::util::{ComputePipeline, GpuBuffer, end_for_host};
use super::{ArenaImport, Vk, VkError, call};
use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::gpuvm::{FaultStage, GpuFault, Vm};
use crate::iommu::{Access, DmaFault, FaultReason};
use crate::pt::Prot;

/// The shader's SPIR-V (compiled by `build.rs`, or the checked-in copy).
const WALK_GATHER_SPV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/walk_gather.spv"));

/// Pages per workgroup (`local_size_x` of the shader: one invocation per page).
const PAGES_PER_GROUP: u32 = 64;

/// The shader's push constants (`Params` in `walk_gather.comp`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Params {
    chunks: u64,
    requests: u64,
    out_words: u64,
    faults: u64,
    gpu_root: u64,
    iommu_root: u64,
    arena_size: u64,
    dma_start: u64,
    dma_end: u64,
    first: u32,
    count: u32,
    chunk_shift: u32,
    flags: u32,
    max_faults: u32,
    _pad: u32,
}

impl Params {
    fn bytes(&self) -> [u8; size_of::<Params>()] {
        let mut out = [0u8; size_of::<Params>()];
        let words = [
            self.chunks,
            self.requests,
            self.out_words,
            self.faults,
            self.gpu_root,
            self.iommu_root,
            self.arena_size,
            self.dma_start,
            self.dma_end,
        ];
        for (i, w) in words.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        let tail = [self.first, self.count, self.chunk_shift, self.flags, self.max_faults, self._pad];
        for (i, w) in tail.iter().enumerate() {
            out[72 + i * 4..76 + i * 4].copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}

/// The `walk_gather` pipeline over an imported arena.
pub struct WalkGather {
    import: Arc<ArenaImport>,
    pipe: ComputePipeline,
    chunk_map: GpuBuffer,
}

impl core::fmt::Debug for WalkGather {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("WalkGather").field("device", &self.import.context().device_name()).finish()
    }
}

impl WalkGather {
    /// The pipeline, for VMs whose memory is `import`'s arena.
    ///
    /// # Errors
    /// [`VkError::Call`] when the shader module or pipeline cannot be made;
    /// [`VkError::Alloc`] for the chunk map.
    pub fn new(import: &Arc<ArenaImport>) -> Result<Self, VkError> {
        let ctx = import.context().clone();
        let pipe = ComputePipeline::new(&ctx, WALK_GATHER_SPV, size_of::<Params>() as u32)?;
        let addrs = import.chunk_addresses();
        let mut chunk_map =
            GpuBuffer::new(&ctx, addrs.len() as u64 * 8, MemoryLocation::CpuToGpu, "chunk map")?;
        for (i, a) in addrs.iter().enumerate() {
            chunk_map.bytes_mut()[i * 8..i * 8 + 8].copy_from_slice(&a.to_le_bytes());
        }
        Ok(WalkGather { import: import.clone(), pipe, chunk_map })
    }

    /// The import it reads.
    #[must_use]
    pub fn import(&self) -> &Arc<ArenaImport> {
        &self.import
    }

    /// A job gathering the pages at `vas` (page-aligned GPU VAs) of `vm`, recorded once and run
    /// as often as wanted ([`GatherJob::run`]). The VM's tables are read when the job runs.
    ///
    /// # Errors
    /// [`VkError::BadRequest`] for no pages, more than `u32::MAX`, or an unaligned VA;
    /// [`VkError::OtherArena`] when the VM's memory is not the imported arena;
    /// [`VkError::Alloc`], [`VkError::Call`].
    pub fn job(&self, vm: &Vm, vas: &[u64]) -> Result<GatherJob<'_>, VkError> {
        if vas.is_empty() || u32::try_from(vas.len()).is_err() {
            return Err(VkError::BadRequest(format!("{} pages", vas.len())));
        }
        if let Some(v) = vas.iter().find(|v| *v % PAGE_SIZE != 0) {
            return Err(VkError::BadRequest(format!("GPU VA {v:#x} is not page aligned")));
        }
        if !Arc::ptr_eq(vm.mem(), self.import.mem()) {
            return Err(VkError::OtherArena);
        }
        let ctx = self.import.context().clone();
        let n = vas.len() as u64;
        let mut requests = GpuBuffer::new(&ctx, n * 8, MemoryLocation::CpuToGpu, "gather requests")?;
        for (i, v) in vas.iter().enumerate() {
            requests.bytes_mut()[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        let out = GpuBuffer::new(&ctx, n * PAGE_SIZE, MemoryLocation::GpuToCpu, "gather output")?;
        let max_faults = n.min(1 << 16) as u32;
        let faults =
            GpuBuffer::new(&ctx, 32 + u64::from(max_faults) * 32, MemoryLocation::GpuToCpu, "gather faults")?;
        let dev = vm.device();
        let (flags, iommu_root, dma_start, dma_end) = match (dev.domain(), dev.direct_bits()) {
            (Some(dom), _) => {
                let (s, e) = dom.aperture();
                match dom.table() {
                    Some(t) => (1u32, t.root().as_u64(), s.as_u64(), e.as_u64()),
                    // An identity domain: DMA addresses are physical, inside the aperture.
                    None => (0, 0, 0, e.as_u64()),
                }
            }
            (None, Some(bits)) => (0, 0, 0, if bits >= 64 { u64::MAX } else { 1u64 << bits }),
            // A translated device attached to no domain reaches nothing.
            (None, None) => (0, 0, 0, 0),
        };
        let params = Params {
            chunks: self.chunk_map.addr,
            requests: requests.addr,
            out_words: out.addr,
            faults: faults.addr,
            gpu_root: vm.table().root().as_u64(),
            iommu_root,
            arena_size: self.import.mem().size(),
            dma_start,
            dma_end,
            first: 0,
            count: n as u32,
            chunk_shift: self.import.chunk_shift(),
            flags,
            max_faults,
            _pad: 0,
        };
        let cmd = ctx.command_buffer()?;
        let job = GatherJob {
            gather: self,
            ctx,
            cmd,
            _requests: requests,
            out,
            faults,
            vas: vas.to_vec(),
            device: dev.id(),
        };
        job.record(params)?;
        Ok(job)
    }

    /// Gathers `[va, va + len)` of `vm` (any alignment) in one run: the bytes (zeros where a
    /// page faulted or is sparse) and the faults, one per faulting page, in VA order.
    ///
    /// # Errors
    /// As [`WalkGather::job`] and [`GatherJob::run`]; a zero length is a
    /// [`VkError::BadRequest`].
    pub fn gather(&self, vm: &Vm, va: u64, len: u64) -> Result<(Vec<u8>, Vec<GpuFault>), VkError> {
        let end = va
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(VkError::BadRequest(format!("[{va:#x}, +{len:#x})")))?;
        let first = va & !(PAGE_SIZE - 1);
        let pages: Vec<u64> = (first..end).step_by(PAGE_SIZE as usize).collect();
        let mut job = self.job(vm, &pages)?;
        let faults = job.run()?;
        let skip = (va - first) as usize;
        Ok((job.bytes()[skip..skip + len as usize].to_vec(), faults))
    }
}

/// A recorded gather ([`WalkGather::job`]).
pub struct GatherJob<'g> {
    gather: &'g WalkGather,
    ctx: Arc<Vk>,
    cmd: vk::CommandBuffer,
    /// Read by the shader only: kept alive for the job's submits.
    _requests: GpuBuffer,
    out: GpuBuffer,
    faults: GpuBuffer,
    vas: Vec<u64>,
    device: crate::iommu::DeviceId,
}

impl core::fmt::Debug for GatherJob<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GatherJob").field("pages", &self.vas.len()).finish()
    }
}

impl GatherJob<'_> {
    fn record(&self, mut params: Params) -> Result<(), VkError> {
        let d = &self.ctx.device;
        let g = self.gather;
        let bi = vk::CommandBufferBeginInfo::default();
        // SAFETY: a fresh command buffer of this device.
        call("vkBeginCommandBuffer", unsafe { d.begin_command_buffer(self.cmd, &bi) })?;
        let per = self.ctx.info().max_workgroups.clamp(1, 65_535).saturating_mul(PAGES_PER_GROUP);
        // SAFETY: recording into a command buffer in the recording state; the pipeline and
        // layout are live; the push-constant range matches the layout.
        unsafe {
            d.cmd_bind_pipeline(self.cmd, vk::PipelineBindPoint::COMPUTE, g.pipe.pipeline);
            let mut first = 0u32;
            while first < params.count {
                params.first = first;
                let n = (params.count - first).min(per);
                d.cmd_push_constants(
                    self.cmd,
                    g.pipe.layout,
                    vk::ShaderStageFlags::COMPUTE,
                    0,
                    &params.bytes(),
                );
                d.cmd_dispatch(self.cmd, n.div_ceil(PAGES_PER_GROUP), 1, 1);
                first += n;
            }
            // The shader's writes, visible to the host once the fence signals.
        }
        end_for_host(d, self.cmd, vk::PipelineStageFlags::COMPUTE_SHADER, vk::AccessFlags::SHADER_WRITE)
    }

    /// Runs the gather and waits: every page's bytes land in [`GatherJob::bytes`] (zeros for a
    /// sparse or faulting page); returns the faults, one per faulting page, in VA order. The
    /// VM must not be bound concurrently (its tables are read as the shader runs).
    ///
    /// # Errors
    /// [`VkError::Call`] when the submit or the wait fails.
    pub fn run(&mut self) -> Result<Vec<GpuFault>, VkError> {
        // Host writes before the submit are visible to it.
        self.faults.bytes_mut()[..4].copy_from_slice(&0u32.to_le_bytes());
        self.ctx.submit_wait(self.cmd)?;
        let f = self.faults.bytes();
        let count = u32::from_le_bytes([f[0], f[1], f[2], f[3]]) as usize;
        let kept = count.min(f.len().saturating_sub(32) / 32);
        let word = |i: usize, k: usize| {
            let at = 32 + i * 32 + k * 8;
            u64::from_le_bytes(f[at..at + 8].try_into().unwrap_or([0; 8]))
        };
        let mut out: Vec<GpuFault> = (0..kept)
            .map(|i| self.fault(word(i, 0), word(i, 1) & 0xff, word(i, 1) >> 8, word(i, 2), word(i, 3)))
            .collect();
        out.sort_by_key(|f| f.va);
        Ok(out)
    }

    /// A fault record of the shader as vmbind's.
    fn fault(&self, va: u64, code: u64, prot: u64, dma_addr: u64, pa: u64) -> GpuFault {
        let gpu_prot = |p: u64| {
            let mut r = Prot::NONE;
            if p & (1 << 5) != 0 {
                r = r | Prot::READ;
            }
            if p & (1 << 6) != 0 {
                r = r | Prot::WRITE;
            }
            if p & (1 << 4) != 0 {
                r = r | Prot::EXEC;
            }
            r
        };
        let dma = |reason| {
            FaultStage::Dma(DmaFault {
                device: self.device,
                iova: DmaAddr::new(dma_addr),
                access: Access::Read,
                reason,
            })
        };
        let stage = match code {
            2 => FaultStage::NotPermitted { prot: gpu_prot(prot) },
            3 => dma(FaultReason::NotMapped),
            4 => {
                let mut p = Prot::NONE;
                if prot & 2 != 0 {
                    p = p | Prot::WRITE;
                }
                dma(FaultReason::NotPermitted { prot: p })
            }
            5 => dma(FaultReason::OutsideAperture),
            6 => dma(FaultReason::BusError { pa: PhysAddr::new(pa) }),
            _ => FaultStage::NotMapped,
        };
        GpuFault { va, access: Access::Read, stage }
    }

    /// The gathered bytes: page `i` of the request list at `[i * 4096, (i + 1) * 4096)`.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        self.out.bytes()
    }

    /// The pages requested.
    #[must_use]
    pub fn pages(&self) -> &[u64] {
        &self.vas
    }
}

impl Drop for GatherJob<'_> {
    fn drop(&mut self) {
        // Not pending: `run` waits for every submit.
        self.ctx.free_command_buffer(self.cmd);
    }
}

/// A plain copy of `len` bytes of the imported arena into a host-readable buffer on the same
/// device (`vkCmdCopyBuffer`, one region per import chunk): what moving the bytes costs without
/// any translation.
pub struct CopyJob {
    ctx: Arc<Vk>,
    _import: Arc<ArenaImport>,
    cmd: vk::CommandBuffer,
    out: GpuBuffer,
}

impl core::fmt::Debug for CopyJob {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CopyJob").field("bytes", &self.out.size).finish()
    }
}

impl CopyJob {
    /// A copy of `[offset, offset + len)` of the arena.
    ///
    /// # Errors
    /// [`VkError::BadRequest`] for a range outside the arena or empty; [`VkError::Alloc`],
    /// [`VkError::Call`].
    pub fn new(import: &Arc<ArenaImport>, offset: u64, len: u64) -> Result<Self, VkError> {
        let size = import.mem().size();
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(VkError::BadRequest(format!("copy of [{offset:#x}, +{len:#x})")));
        }
        let ctx = import.context().clone();
        let out = GpuBuffer::new(&ctx, len, MemoryLocation::GpuToCpu, "copy output")?;
        let cmd = ctx.command_buffer()?;
        let job = CopyJob { ctx, _import: import.clone(), cmd, out };
        let d = &job.ctx.device;
        let bi = vk::CommandBufferBeginInfo::default();
        // SAFETY: a fresh command buffer.
        call("vkBeginCommandBuffer", unsafe { d.begin_command_buffer(job.cmd, &bi) })?;
        let mut at = offset;
        let mut dst = 0;
        for c in import.chunks() {
            let (co, cl) = c.range();
            if at >= co + cl || at >= offset + len {
                continue;
            }
            let n = (co + cl).min(offset + len) - at;
            let region = [vk::BufferCopy::default().src_offset(at - co).dst_offset(dst).size(n)];
            // SAFETY: both buffers are live and the region lies inside each.
            unsafe { d.cmd_copy_buffer(job.cmd, c.buffer, job.out.buffer, &region) };
            at += n;
            dst += n;
        }
        end_for_host(d, job.cmd, vk::PipelineStageFlags::TRANSFER, vk::AccessFlags::TRANSFER_WRITE)?;
        Ok(job)
    }

    /// Runs the copy and waits.
    ///
    /// # Errors
    /// [`VkError::Call`].
    pub fn run(&mut self) -> Result<(), VkError> {
        self.ctx.submit_wait(self.cmd)
    }

    /// The copied bytes.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        self.out.bytes()
    }
}

impl Drop for CopyJob {
    fn drop(&mut self) {
        self.ctx.free_command_buffer(self.cmd);
    }
}
