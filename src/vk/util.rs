//! What the Vulkan pieces share: host-mapped buffers with device addresses, compute pipelines
//! with one push-constant range, and the end of a command buffer the host reads after.

use std::sync::Arc;

use ash::vk;
use gpu_allocator::MemoryLocation;
use gpu_allocator::vulkan::{Allocation, AllocationCreateDesc, AllocationScheme};

use super::{Vk, VkError, call};

/// Ends a command buffer whose writes (`stage`, `access`) the host reads once its fence
/// signals: a barrier to host reads, then the end of recording.
pub(crate) fn end_for_host(
    d: &ash::Device,
    cmd: vk::CommandBuffer,
    stage: vk::PipelineStageFlags,
    access: vk::AccessFlags,
) -> Result<(), VkError> {
    let barrier =
        [vk::MemoryBarrier::default().src_access_mask(access).dst_access_mask(vk::AccessFlags::HOST_READ)];
    // SAFETY: `cmd` is a command buffer of `d` in the recording state (the callers' contract).
    unsafe {
        d.cmd_pipeline_barrier(
            cmd,
            stage,
            vk::PipelineStageFlags::HOST,
            vk::DependencyFlags::empty(),
            &barrier,
            &[],
            &[],
        );
    }
    // SAFETY: as above.
    call("vkEndCommandBuffer", unsafe { d.end_command_buffer(cmd) })
}

/// A buffer from gpu-allocator with a device address, mapped on the host.
pub(crate) struct GpuBuffer {
    ctx: Arc<Vk>,
    pub(crate) buffer: vk::Buffer,
    alloc: Option<Allocation>,
    pub(crate) addr: u64,
    pub(crate) size: u64,
}

impl GpuBuffer {
    pub(crate) fn new(
        ctx: &Arc<Vk>,
        size: u64,
        location: MemoryLocation,
        what: &'static str,
    ) -> Result<Self, VkError> {
        let d = &ctx.device;
        let bci = vk::BufferCreateInfo::default()
            .size(size.max(16))
            .usage(
                vk::BufferUsageFlags::STORAGE_BUFFER
                    | vk::BufferUsageFlags::SHADER_DEVICE_ADDRESS
                    | vk::BufferUsageFlags::TRANSFER_SRC
                    | vk::BufferUsageFlags::TRANSFER_DST,
            )
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: a live device; the create info lives across the call.
        let buffer = call("vkCreateBuffer", unsafe { d.create_buffer(&bci, None) })?;
        // SAFETY: a live buffer.
        let requirements = unsafe { d.get_buffer_memory_requirements(buffer) };
        let alloc = ctx.allocator.lock().allocate(&AllocationCreateDesc {
            name: what,
            requirements,
            location,
            linear: true,
            allocation_scheme: AllocationScheme::DedicatedBuffer(buffer),
        });
        let alloc = match alloc {
            Ok(a) if a.mapped_ptr().is_some() => a,
            Ok(a) => {
                let _ = ctx.allocator.lock().free(a);
                // SAFETY: unbound, unused.
                unsafe { d.destroy_buffer(buffer, None) };
                return Err(VkError::NoMemoryType { what });
            }
            Err(e) => {
                // SAFETY: unbound, unused.
                unsafe { d.destroy_buffer(buffer, None) };
                return Err(VkError::Alloc { what, why: e.to_string() });
            }
        };
        // SAFETY: the allocation was made for this buffer's requirements.
        if let Err(result) = unsafe { d.bind_buffer_memory(buffer, alloc.memory(), alloc.offset()) } {
            let _ = ctx.allocator.lock().free(alloc);
            // SAFETY: unused.
            unsafe { d.destroy_buffer(buffer, None) };
            return Err(VkError::Call { call: "vkBindBufferMemory", result });
        }
        let bai = vk::BufferDeviceAddressInfo::default().buffer(buffer);
        // SAFETY: a bound buffer created with SHADER_DEVICE_ADDRESS.
        let addr = unsafe { d.get_buffer_device_address(&bai) };
        Ok(GpuBuffer { ctx: ctx.clone(), buffer, alloc: Some(alloc), addr, size })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        let s = self.alloc.as_ref().and_then(Allocation::mapped_slice).unwrap_or(&[]);
        &s[..(self.size as usize).min(s.len())]
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        let size = self.size as usize;
        let s = self.alloc.as_mut().and_then(Allocation::mapped_slice_mut).unwrap_or(&mut []);
        let n = size.min(s.len());
        &mut s[..n]
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if let Some(a) = self.alloc.take() {
            let _ = self.ctx.allocator.lock().free(a);
        }
        // SAFETY: every submit using it was waited for (jobs wait in `run`).
        unsafe { self.ctx.device.destroy_buffer(self.buffer, None) };
    }
}

/// A compute pipeline from SPIR-V with one push-constant range and no descriptor sets (the
/// shaders take buffer device addresses).
pub(crate) struct ComputePipeline {
    ctx: Arc<Vk>,
    module: vk::ShaderModule,
    pub(crate) layout: vk::PipelineLayout,
    pub(crate) pipeline: vk::Pipeline,
}

impl ComputePipeline {
    /// The pipeline of `spv` (entry `main`) with `push` bytes of push constants.
    pub(crate) fn new(ctx: &Arc<Vk>, spv: &[u8], push: u32) -> Result<Self, VkError> {
        let d = &ctx.device;
        let words = ash::util::read_spv(&mut std::io::Cursor::new(spv))
            .map_err(|_| VkError::Call { call: "read_spv", result: vk::Result::ERROR_INVALID_SHADER_NV })?;
        let mci = vk::ShaderModuleCreateInfo::default().code(&words);
        // SAFETY: valid SPIR-V words from glslang.
        let module = call("vkCreateShaderModule", unsafe { d.create_shader_module(&mci, None) })?;
        let ranges = [vk::PushConstantRange::default()
            .stage_flags(vk::ShaderStageFlags::COMPUTE)
            .offset(0)
            .size(push)];
        let lci = vk::PipelineLayoutCreateInfo::default().push_constant_ranges(&ranges);
        // SAFETY: a live device.
        let layout = match unsafe { d.create_pipeline_layout(&lci, None) } {
            Ok(l) => l,
            Err(result) => {
                // SAFETY: unused.
                unsafe { d.destroy_shader_module(module, None) };
                return Err(VkError::Call { call: "vkCreatePipelineLayout", result });
            }
        };
        let stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(module)
            .name(c"main");
        let pci = [vk::ComputePipelineCreateInfo::default().stage(stage).layout(layout)];
        // SAFETY: module and layout are live and match (one push-constant range, no sets).
        match unsafe { d.create_compute_pipelines(vk::PipelineCache::null(), &pci, None) } {
            Ok(p) => Ok(ComputePipeline { ctx: ctx.clone(), module, layout, pipeline: p[0] }),
            Err((_, result)) => {
                // SAFETY: unused.
                unsafe {
                    d.destroy_pipeline_layout(layout, None);
                    d.destroy_shader_module(module, None);
                }
                Err(VkError::Call { call: "vkCreateComputePipelines", result })
            }
        }
    }
}

impl Drop for ComputePipeline {
    fn drop(&mut self) {
        let d = &self.ctx.device;
        // SAFETY: the owners wait for every submit that uses the pipeline before dropping it.
        unsafe {
            d.destroy_pipeline(self.pipeline, None);
            d.destroy_pipeline_layout(self.layout, None);
            d.destroy_shader_module(self.module, None);
        }
    }
}
