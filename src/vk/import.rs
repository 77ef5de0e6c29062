//! Zero-copy import of arena ranges as Vulkan buffers (`VK_EXT_external_memory_host`).

use std::sync::Arc;

use ash::vk;

use super::{Vk, VkError, call};
use crate::addr::PhysAddr;
use crate::mem::PhysMem;

/// One arena range imported as a buffer with a device address.
pub struct HostImport {
    ctx: Arc<Vk>,
    /// Keeps the arena mapped for as long as the device may read it.
    _mem: Arc<PhysMem>,
    pub(crate) buffer: vk::Buffer,
    pub(crate) memory: vk::DeviceMemory,
    /// The memory type the import was allocated from.
    pub(crate) memory_type: u32,
    addr: u64,
    offset: u64,
    len: u64,
}

impl core::fmt::Debug for HostImport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HostImport").field("offset", &self.offset).field("len", &self.len).finish()
    }
}

impl HostImport {
    /// Imports `[offset, offset + len)` of the arena, without a copy.
    ///
    /// # Errors
    /// [`VkError::Misaligned`] when the offset (the host pointer: the arena's mapping is page
    /// aligned) or the length is not a multiple of `minImportedHostPointerAlignment`;
    /// [`VkError::BadRange`] for an empty range, one leaving the arena or one above
    /// `maxMemoryAllocationSize`; [`VkError::NoMemoryType`], [`VkError::Call`].
    pub fn new(ctx: &Arc<Vk>, mem: &Arc<PhysMem>, offset: u64, len: u64) -> Result<Self, VkError> {
        let bad = |why| VkError::BadRange { offset, len, why };
        if len == 0 {
            return Err(bad("empty"));
        }
        let align = ctx.info().host_pointer_alignment;
        let ptr = mem.host_ptr(PhysAddr::new(offset), len).map_err(|_| bad("it leaves the arena"))?;
        let host = ptr.as_ptr() as u64;
        if !host.is_multiple_of(align) {
            return Err(VkError::Misaligned { what: "host pointer", value: host, align });
        }
        if !len.is_multiple_of(align) {
            return Err(VkError::Misaligned { what: "length", value: len, align });
        }
        if len > ctx.info().max_allocation {
            return Err(bad("it is larger than maxMemoryAllocationSize"));
        }
        let d = &ctx.device;
        let handle = vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;
        let mut ext = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle);
        let bci = vk::BufferCreateInfo::default()
            .size(len)
            .usage(
                vk::BufferUsageFlags::STORAGE_BUFFER
                    | vk::BufferUsageFlags::SHADER_DEVICE_ADDRESS
                    | vk::BufferUsageFlags::TRANSFER_SRC
                    | vk::BufferUsageFlags::TRANSFER_DST,
            )
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
            .push_next(&mut ext);
        // SAFETY: a live device; the create info lives across the call.
        let buffer = call("vkCreateBuffer", unsafe { d.create_buffer(&bci, None) })?;
        let destroy_buffer = || {
            // SAFETY: the buffer is unbound and unused.
            unsafe { d.destroy_buffer(buffer, None) }
        };
        // SAFETY: a live buffer.
        let req = unsafe { d.get_buffer_memory_requirements(buffer) };
        let mut hp = vk::MemoryHostPointerPropertiesEXT::default();
        // SAFETY: the extension is enabled on the device; `ptr` points to `len` bytes of the
        // arena's mapping, which `_mem` keeps alive as long as the import.
        let r = unsafe {
            (ctx.host_memory.fp().get_memory_host_pointer_properties_ext)(
                d.handle(),
                handle,
                ptr.as_ptr().cast(),
                &mut hp,
            )
        };
        if r != vk::Result::SUCCESS {
            destroy_buffer();
            return Err(VkError::Call { call: "vkGetMemoryHostPointerPropertiesEXT", result: r });
        }
        let bits = req.memory_type_bits & hp.memory_type_bits;
        let Some(ty) = ctx.memory_type(bits, vk::MemoryPropertyFlags::empty()) else {
            destroy_buffer();
            return Err(VkError::NoMemoryType { what: "host-pointer import" });
        };
        let mut import = vk::ImportMemoryHostPointerInfoEXT::default()
            .handle_type(handle)
            .host_pointer(ptr.as_ptr().cast());
        let mut flags = vk::MemoryAllocateFlagsInfo::default().flags(vk::MemoryAllocateFlags::DEVICE_ADDRESS);
        let ai = vk::MemoryAllocateInfo::default()
            .allocation_size(len)
            .memory_type_index(ty)
            .push_next(&mut import)
            .push_next(&mut flags);
        // SAFETY: the host pointer is aligned and sized as the device requires (checked above)
        // and stays valid for the memory's life.
        let memory = match unsafe { d.allocate_memory(&ai, None) } {
            Ok(m) => m,
            Err(result) => {
                destroy_buffer();
                return Err(VkError::Call { call: "vkAllocateMemory (host import)", result });
            }
        };
        // SAFETY: fresh buffer and memory of the same device; offset 0 fits the requirements.
        if let Err(result) = unsafe { d.bind_buffer_memory(buffer, memory, 0) } {
            // SAFETY: both unused.
            unsafe { d.free_memory(memory, None) };
            destroy_buffer();
            return Err(VkError::Call { call: "vkBindBufferMemory", result });
        }
        let bai = vk::BufferDeviceAddressInfo::default().buffer(buffer);
        // SAFETY: a bound buffer created with SHADER_DEVICE_ADDRESS.
        let addr = unsafe { d.get_buffer_device_address(&bai) };
        Ok(HostImport {
            ctx: ctx.clone(),
            _mem: mem.clone(),
            buffer,
            memory,
            memory_type: ty,
            addr,
            offset,
            len,
        })
    }

    /// Its device address.
    #[must_use]
    pub fn device_address(&self) -> u64 {
        self.addr
    }

    /// The arena range it holds: `(offset, len)`.
    #[must_use]
    pub fn range(&self) -> (u64, u64) {
        (self.offset, self.len)
    }
}

impl Drop for HostImport {
    fn drop(&mut self) {
        let d = &self.ctx.device;
        // SAFETY: every job using the buffer holds its import through an `Arc` and waits for
        // its submits, so the device is done with it.
        unsafe {
            d.destroy_buffer(self.buffer, None);
            d.free_memory(self.memory, None);
        }
    }
}

/// The whole arena, imported in power-of-two chunks the device's allocation limit allows; the
/// shader finds an arena address's chunk by a shift ([`ArenaImport::chunk_shift`]).
#[derive(Debug)]
pub struct ArenaImport {
    ctx: Arc<Vk>,
    mem: Arc<PhysMem>,
    chunks: Vec<HostImport>,
    chunk_shift: u32,
}

impl ArenaImport {
    /// Imports all of `mem`.
    ///
    /// # Errors
    /// As [`HostImport::new`] for each chunk.
    pub fn new(ctx: &Arc<Vk>, mem: &Arc<PhysMem>) -> Result<Self, VkError> {
        let size = mem.size();
        // The largest power of two the device allows in one allocation, up to 1 GiB (and no
        // larger than the arena needs).
        let limit = ctx.info().max_allocation.clamp(1 << 21, 1 << 30);
        let mut chunk = 1u64 << (63 - limit.leading_zeros());
        while chunk / 2 >= size.next_power_of_two() && chunk > 1 << 21 {
            chunk /= 2;
        }
        let chunk_shift = chunk.trailing_zeros();
        let mut chunks = Vec::new();
        let mut at = 0;
        while at < size {
            let len = chunk.min(size - at);
            chunks.push(HostImport::new(ctx, mem, at, len)?);
            at += len;
        }
        Ok(ArenaImport { ctx: ctx.clone(), mem: mem.clone(), chunks, chunk_shift })
    }

    /// The context.
    #[must_use]
    pub fn context(&self) -> &Arc<Vk> {
        &self.ctx
    }

    /// The arena.
    #[must_use]
    pub fn mem(&self) -> &Arc<PhysMem> {
        &self.mem
    }

    /// Each chunk's device address, in arena order.
    #[must_use]
    pub fn chunk_addresses(&self) -> Vec<u64> {
        self.chunks.iter().map(HostImport::device_address).collect()
    }

    /// log2 of the chunk size.
    #[must_use]
    pub fn chunk_shift(&self) -> u32 {
        self.chunk_shift
    }

    /// The chunks.
    #[must_use]
    pub fn chunks(&self) -> &[HostImport] {
        &self.chunks
    }
}
