//! [`GpuPopulate`]: a VM's 4 KiB page-table entries written on the device by `populate.comp`
//! from a [`PteLog`] (linear runs generated in the shader, scattered runs copied from a staged
//! array — AMD's SDMA split), into the tables in the imported arena.

use std::sync::Arc;
use std::time::Instant;

use ash::vk;
use gpu_allocator::MemoryLocation;

use super::util::{ComputePipeline, GpuBuffer, end_for_host};
use super::{ArenaImport, VkError, call};
use crate::pt::PteLog;
use crate::service::PteWriter;

const POPULATE_SPV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/populate.spv"));

/// Bytes of one run in the shader's array (`Run` in `populate.comp`).
const RUN_BYTES: u64 = 32;

/// The `populate.comp` pipeline over an imported arena. As a service [`PteWriter`]
/// ([`crate::service::Service::set_pte_writer`]) it writes the 4 KiB entries of batches the
/// service chooses to populate on the GPU.
pub struct GpuPopulate {
    import: Arc<ArenaImport>,
    pipe: ComputePipeline,
    chunk_map: GpuBuffer,
}

impl core::fmt::Debug for GpuPopulate {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GpuPopulate").field("device", &self.import.context().device_name()).finish()
    }
}

/// What one populate cost, measured around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PopulateTiming {
    /// Entries written.
    pub entries: u64,
    /// Runs executed.
    pub runs: u64,
    /// Nanoseconds from the start of the upload to the fence, host side.
    pub ns: u64,
}

impl GpuPopulate {
    /// The pipeline, writing into `import`'s arena.
    ///
    /// # Errors
    /// [`VkError::Call`], [`VkError::Alloc`].
    pub fn new(import: &Arc<ArenaImport>) -> Result<Self, VkError> {
        let ctx = import.context();
        let pipe = ComputePipeline::new(ctx, POPULATE_SPV, 40)?;
        let addrs = import.chunk_addresses();
        let mut chunk_map = GpuBuffer::new(ctx, addrs.len() as u64 * 8, MemoryLocation::CpuToGpu, "chunk map")?;
        for (i, a) in addrs.iter().enumerate() {
            chunk_map.bytes_mut()[i * 8..i * 8 + 8].copy_from_slice(&a.to_le_bytes());
        }
        Ok(GpuPopulate { import: import.clone(), pipe, chunk_map })
    }

    /// The import it writes into.
    #[must_use]
    pub fn import(&self) -> &Arc<ArenaImport> {
        &self.import
    }

    /// Writes every entry of `log` on the device and waits. The log must come from a table in
    /// this import's arena ([`crate::gpuvm::Vm::bind_deferred`]).
    ///
    /// # Errors
    /// [`VkError::BadRequest`] for a run outside the arena or crossing a table page;
    /// [`VkError::Alloc`], [`VkError::Call`].
    pub fn run(&self, log: &PteLog) -> Result<PopulateTiming, VkError> {
        let t0 = Instant::now();
        let size = self.import.mem().size();
        for r in &log.runs {
            let end = r.dst + u64::from(r.count) * 8;
            if r.dst % 8 != 0 || end > size || r.dst >> 12 != (end - 1) >> 12 || r.count == 0 {
                return Err(VkError::BadRequest(format!("run at {:#x} of {} entries", r.dst, r.count)));
            }
            if !r.linear && r.value + u64::from(r.count) > log.staged.len() as u64 {
                return Err(VkError::BadRequest(format!("run at {:#x} reads past the staged array", r.dst)));
            }
        }
        if log.runs.is_empty() {
            return Ok(PopulateTiming { entries: 0, runs: 0, ns: 0 });
        }
        let ctx = self.import.context();
        let mut runs = GpuBuffer::new(ctx, log.runs.len() as u64 * RUN_BYTES, MemoryLocation::CpuToGpu, "pte runs")?;
        {
            let b = runs.bytes_mut();
            for (i, r) in log.runs.iter().enumerate() {
                let o = i * RUN_BYTES as usize;
                b[o..o + 8].copy_from_slice(&r.dst.to_le_bytes());
                b[o + 8..o + 16].copy_from_slice(&r.value.to_le_bytes());
                b[o + 16..o + 24].copy_from_slice(&r.step.to_le_bytes());
                b[o + 24..o + 28].copy_from_slice(&r.count.to_le_bytes());
                b[o + 28..o + 32].copy_from_slice(&u32::from(r.linear).to_le_bytes());
            }
        }
        let mut staged =
            GpuBuffer::new(ctx, (log.staged.len() as u64 * 8).max(8), MemoryLocation::CpuToGpu, "pte staged")?;
        {
            let b = staged.bytes_mut();
            for (i, v) in log.staged.iter().enumerate() {
                b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        let d = &ctx.device;
        let cmd = ctx.command_buffer()?;
        let count = u32::try_from(log.runs.len())
            .map_err(|_| VkError::BadRequest(format!("{} runs", log.runs.len())))?;
        let r = (|| {
            // SAFETY: a fresh command buffer of this device.
            call("vkBeginCommandBuffer", unsafe { d.begin_command_buffer(cmd, &vk::CommandBufferBeginInfo::default()) })?;
            let per = ctx.info().max_workgroups.clamp(1, 65_535);
            // SAFETY: recording; pipeline and layout are live; the push range is 40 bytes.
            unsafe { d.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::COMPUTE, self.pipe.pipeline) };
            let mut first = 0u32;
            while first < count {
                let n = (count - first).min(per);
                let mut p = [0u8; 40];
                p[..8].copy_from_slice(&runs.addr.to_le_bytes());
                p[8..16].copy_from_slice(&staged.addr.to_le_bytes());
                p[16..24].copy_from_slice(&self.chunk_map.addr.to_le_bytes());
                p[24..28].copy_from_slice(&first.to_le_bytes());
                p[28..32].copy_from_slice(&count.to_le_bytes());
                p[32..36].copy_from_slice(&self.import.chunk_shift().to_le_bytes());
                // SAFETY: as above.
                unsafe {
                    d.cmd_push_constants(cmd, self.pipe.layout, vk::ShaderStageFlags::COMPUTE, 0, &p);
                    d.cmd_dispatch(cmd, n, 1, 1);
                }
                first += n;
            }
            end_for_host(d, cmd, vk::PipelineStageFlags::COMPUTE_SHADER, vk::AccessFlags::SHADER_WRITE)?;
            ctx.submit_wait(cmd)
        })();
        ctx.free_command_buffer(cmd);
        r?;
        Ok(PopulateTiming { entries: log.entries(), runs: log.runs.len() as u64, ns: t0.elapsed().as_nanos() as u64 })
    }
}

impl PteWriter for GpuPopulate {
    fn name(&self) -> String {
        format!("populate.comp on {}", self.import.context().device_name())
    }

    fn write(&self, log: &PteLog) -> Result<(), String> {
        self.run(log).map(drop).map_err(|e| e.to_string())
    }
}
