//! [`GpuPopulate`]: a VM's 4 KiB page-table entries written on the device by `populate.comp`
//! from a [`PteLog`] (linear runs generated in the shader, scattered runs copied from a staged
//! array — AMD's SDMA split), into the tables in the imported arena.

use std::sync::Arc;
use std::time::Instant;

use ash::vk;
use gpu_allocator::MemoryLocation;

use super::util::{ComputePipeline, GpuBuffer, end_for_host};
use super::{ArenaImport, VkError, call};
use crate::gpuvm::Populated;
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
        let mut chunk_map =
            GpuBuffer::new(ctx, addrs.len() as u64 * 8, MemoryLocation::CpuToGpu, "chunk map")?;
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
    /// this import's arena (the writer of [`crate::gpuvm::Vm::bind_deferred`]).
    ///
    /// # Errors
    /// [`VkError::BadRequest`] for a log that fails [`PteLog::check`] (nothing is written);
    /// [`VkError::Alloc`], [`VkError::Call`].
    pub fn run(&self, log: &PteLog) -> Result<PopulateTiming, VkError> {
        let t0 = Instant::now();
        let size = self.import.mem().size();
        log.check(size).map_err(|e| VkError::BadRequest(e.to_string()))?;
        if log.runs.is_empty() {
            return Ok(PopulateTiming { entries: 0, runs: 0, ns: 0 });
        }
        let ctx = self.import.context();
        let mut runs =
            GpuBuffer::new(ctx, log.runs.len() as u64 * RUN_BYTES, MemoryLocation::CpuToGpu, "pte runs")?;
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
        let mut staged = GpuBuffer::new(
            ctx,
            (log.staged.len() as u64 * 8).max(8),
            MemoryLocation::CpuToGpu,
            "pte staged",
        )?;
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
            call("vkBeginCommandBuffer", unsafe {
                d.begin_command_buffer(cmd, &vk::CommandBufferBeginInfo::default())
            })?;
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
        Ok(PopulateTiming {
            entries: log.entries(),
            runs: log.runs.len() as u64,
            ns: t0.elapsed().as_nanos() as u64,
        })
    }
}

/// Both commit paths measured on one device ([`GpuPopulate::calibrate`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// CPU commit, ns per 4 KiB entry (scattered pages).
    pub cpu_ns_per_entry: f64,
    /// GPU populate's fixed cost per batch (upload, submit, fence), ns.
    pub gpu_fixed_ns: f64,
    /// GPU populate's cost per entry beyond the fixed one, ns (deferred bind included).
    pub gpu_ns_per_entry: f64,
    /// The smallest batch, in pages, from which the GPU path is faster; `None` when it never
    /// is (its per-entry cost is not below the CPU's — lavapipe, a CPU driver).
    pub threshold_pages: Option<u64>,
}

impl GpuPopulate {
    /// Measures the CPU commit and this device's populate on a scratch VM of `pages`
    /// scattered pages (at least 64) in the import's arena (median of 5 runs each; a 1-page
    /// batch gives the GPU's fixed cost), and derives the threshold to give
    /// [`crate::service::Service::set_pte_writer`]. Use 65 536 pages or more: below that the
    /// fixed cost hides the per-entry slope.
    ///
    /// # Errors
    /// [`VkError::Mirror`] when the arena has no room for the scratch VM; as
    /// [`GpuPopulate::run`].
    pub fn calibrate(&self, pages: usize) -> Result<Calibration, VkError> {
        use crate::gpuvm::{BindOp, Va, Vm};
        use crate::mem::BioVec;
        let pages = pages.max(64);
        let mem = self.import.mem();
        let scratch = |e: String| VkError::Mirror(format!("calibration: {e}"));
        let dev = crate::dma::Device::direct(mem.clone(), crate::iommu::DeviceId(u16::MAX - 7), 48, true)
            .map_err(|e| scratch(e.to_string()))?;
        let vm = Vm::new(dev, 1 << 40).map_err(|e| scratch(e.to_string()))?;
        let frames = mem.alloc_scattered(pages, 0xca1).map_err(|e| scratch(e.to_string()))?;
        let r = (|| {
            let bo = vm.create_bo(BioVec::from_frames(&frames)).map_err(|e| scratch(e.to_string()))?;
            let va = 1u64 << 36;
            let time = |n: u64, gpu: bool| -> Result<f64, VkError> {
                let mut v = Vec::new();
                for _ in 0..5 {
                    let map = [BindOp::Map(Va::object(va, n * 4096, bo, 0))];
                    let t0 = Instant::now();
                    if gpu {
                        let (_, how) = vm
                            .bind_deferred(&map, |log| self.write(log))
                            .map_err(|e| scratch(e.to_string()))?;
                        if let Populated::Fallback { why, .. } = how {
                            return Err(scratch(format!("the populate failed: {why}")));
                        }
                    } else {
                        vm.bind(&map).map_err(|e| scratch(e.to_string()))?;
                    }
                    v.push(t0.elapsed().as_secs_f64() * 1e9);
                    vm.bind(&[BindOp::Unmap { addr: va, range: n * 4096 }])
                        .map_err(|e| scratch(e.to_string()))?;
                }
                v.sort_by(f64::total_cmp);
                Ok(v[2])
            };
            let n = pages as u64;
            let cpu = time(n, false)? / n as f64;
            let one = time(1, true)?;
            let many = time(n, true)?;
            let slope = ((many - one) / (n - 1) as f64).max(0.0);
            let threshold = (slope < cpu).then(|| (one / (cpu - slope)).ceil().max(1.0) as u64);
            Ok(Calibration {
                cpu_ns_per_entry: cpu,
                gpu_fixed_ns: one,
                gpu_ns_per_entry: slope,
                threshold_pages: threshold,
            })
        })();
        let _ = vm.bind(&[BindOp::Unmap { addr: 1 << 36, range: pages as u64 * 4096 }]);
        drop(vm);
        let _ = mem.free_frames(&frames);
        r
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
