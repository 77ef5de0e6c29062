//! [`SparseMirror`]: a GPU VM mirrored into a sparse `VkBuffer` through `vkQueueBindSparse`, so
//! that a real driver's page tables follow vmbind's committed ops.

use std::collections::BTreeMap;
use std::sync::Arc;
#[cfg(feature = "bench")]
use std::time::Instant;

use ash::vk;
use gpu_allocator::MemoryLocation;
use parking_lot::Mutex;

use super::sparse_plan::{Piece, Target, pieces, touched};
use super::util::{ComputePipeline, GpuBuffer, end_for_host};
use super::{ArenaImport, Vk, VkError, call};
use crate::addr::{PAGE_SIZE, PhysAddr};
use crate::gpuvm::{BindOp, BoId, Vm};
use crate::hash::FastMap;
use crate::mem::{BioVec, PhysMem};
use crate::service::{Follower, Service, VmId};

const COPY_WORDS_SPV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/copy_words.spv"));

/// Words per workgroup of `copy_words.comp`.
const WORDS_PER_GROUP: u64 = 64;

/// Which memory a [`SparseMirror`] binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorBacking {
    /// The arena's own pages, imported as host memory ([`ArenaImport`]'s chunks): zero copy,
    /// CPU and device writes meet. Only where the driver really binds host-imported memory in a
    /// sparse buffer (checked by reading a bound block back when the mirror is made).
    HostImport,
    /// Device memory per object, filled from the arena when a range of it is bound: **a copy**.
    /// The device sees the bytes the arena held at bind time ([`SparseMirror::refresh`] copies
    /// again); device writes through the mirror do not reach the arena.
    DeviceCopy,
}

/// What a mirror has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MirrorStats {
    /// Batches followed (the initial sync included).
    pub batches: u64,
    /// `vkQueueBindSparse` calls (one per batch that touched the window).
    pub calls: u64,
    /// `VkSparseMemoryBind` records submitted, in all.
    pub records: u64,
    /// Records of the last call.
    pub last_records: u64,
    /// Bytes copied from the arena into device memory ([`MirrorBacking::DeviceCopy`]).
    pub bytes_copied: u64,
}

/// A pointer into mapped device memory (only this mirror writes through it).
#[derive(Clone, Copy)]
struct Mapped(*mut u8);
// SAFETY: the pointer is only dereferenced under the mirror's state lock.
unsafe impl Send for Mapped {}

/// An object the mirror binds: its pages, and (device-copy backing) its device memory.
struct BoMem {
    pages: Vec<BioVec>,
    /// Object offset of each page run.
    starts: Vec<u64>,
    memory: vk::DeviceMemory,
    mapped: Option<Mapped>,
    /// Bytes of the mirror bound to it.
    bound: u64,
}

impl BoMem {
    /// The physical runs backing `[offset, offset + len)` of the object: `f(object offset,
    /// physical address, length)`.
    fn phys_runs(&self, offset: u64, len: u64, mut f: impl FnMut(u64, u64, u64)) {
        let mut i = self.starts.partition_point(|&s| s <= offset).saturating_sub(1);
        let (mut at, end) = (offset, offset + len);
        while at < end && i < self.pages.len() {
            let p = &self.pages[i];
            let (s, l) = (self.starts[i], u64::from(p.len));
            if at >= s + l {
                // Past this run (an offset beyond the object ends the walk below).
                i += 1;
                continue;
            }
            let base = p.phys.as_u64() + u64::from(p.offset);
            let n = (s + l).min(end) - at;
            f(at, base + (at - s), n);
            at += n;
            i += 1;
        }
    }
}

struct State {
    /// Bound runs of the buffer: VA → (len, object, object offset).
    shadow: BTreeMap<u64, (u64, BoId, u64)>,
    bos: FastMap<BoId, BoMem>,
    stats: MirrorStats,
    /// Set when a bind failed: the mirror no longer shows the VM.
    diverged: Option<String>,
    fence: vk::Fence,
}

struct Inner {
    ctx: Arc<Vk>,
    /// The VM followed (the service hands the same one to every follower call).
    vm: Arc<Vm>,
    import: Arc<ArenaImport>,
    mem: Arc<PhysMem>,
    base: u64,
    len: u64,
    block: u64,
    buffer: vk::Buffer,
    address: u64,
    memory_type: u32,
    backing: MirrorBacking,
    copy: ComputePipeline,
    state: Mutex<State>,
}

/// A GPU VM (or a window of its VA) mirrored into a sparse `VkBuffer`: each batch the service
/// commits for the VM becomes `VkSparseMemoryBind` records, submitted in **one**
/// `vkQueueBindSparse` per batch, and the batch's service fences signal only once the driver's
/// fence for that bind has signaled (the mirror is a service [`Follower`]). Byte `x` of the
/// buffer is GPU VA `window start + x`.
///
/// **Records.** A batch touches the VA ranges its request ops name (clipped to the window;
/// adjacent ranges join). Over them the mirror binds the VM's final state, one record per
/// maximal run that is, in the VM, one object at contiguous offsets (a plain mapping, or one
/// period of a repeat mapping), or nothing (unmapped or sparse: an unbind record). So adjacent
/// blocks of the same memory at contiguous offsets are one record, and a REMAP binds only what
/// the request changed, never the surviving pieces. With [`MirrorBacking::HostImport`] a run is
/// further cut where its physical pages stop being contiguous inside one imported chunk.
/// [`SparseMirror::stats`] counts them.
///
/// **Memory.** [`MirrorBacking::HostImport`] where the driver binds host-imported memory in a
/// sparse buffer (the buffer is made with `VkExternalMemoryBufferCreateInfo(HOST_ALLOCATION)`;
/// the mirror binds one block of it and reads it back when it is made); otherwise
/// [`MirrorBacking::DeviceCopy`], a copy. Tested drivers: **lavapipe 25.0.7 accepts every call
/// and binds nothing** (blocks read zero), so it gets `DeviceCopy`; `SparseMirror::new` with
/// `Some(HostImport)` there is [`VkError::SparseHostImportRefused`].
///
/// **Unbound ranges.** With `residencyNonResidentStrict` ([`super::SparseInfo`]) they read
/// zero and drop writes, as the VM's sparse and unmapped pages do. Without it (lavapipe) reads
/// there are undefined (lavapipe returns zeros and keeps writes in a private page).
///
/// **Limits.** The window must start on a sparse block, be a multiple of it and fit
/// `sparseAddressSpaceSize` (enforced here; lavapipe does not). Ops whose addresses, lengths or
/// object offsets are not block multiples are refused at submit. Repeat mappings and objects
/// mapped twice alias memory: the device must offer `sparseResidencyAliased`. An object larger
/// than `maxMemoryAllocationSize` is refused with the copy backing. On lavapipe every
/// non-contiguous record is one kernel mapping: keep well under `vm.max_map_count` (65530)
/// scattered blocks bound per process.
///
/// **Synchronisation.** Binds are not ordered against command buffers: work that reads the
/// buffer on another queue (wgpu's, the caller's) must have completed before the service
/// commits a batch that unbinds what it reads. With the copy backing an object's device memory
/// is freed once nothing of it is bound, after the context's queue has gone idle.
///
/// **Failures.** A failed `vkQueueBindSparse` fails that batch's fences and leaves the mirror
/// [`SparseMirror::diverged`]: it refuses later submissions until [`SparseMirror::resync`]
/// rebinds the whole window.
///
/// A mirror follows the service's binds only; ops applied to the [`Vm`] directly are not seen.
/// Add it while the VM is idle; it binds the VM's current state first.
pub struct SparseMirror {
    inner: Arc<Inner>,
    follower: Arc<dyn Follower>,
    vm: VmId,
}

impl core::fmt::Debug for SparseMirror {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SparseMirror")
            .field("window", &(self.inner.base, self.inner.len))
            .field("backing", &self.inner.backing)
            .finish()
    }
}

impl SparseMirror {
    /// Mirrors `[start, start + len)` of the VM `vm` of `service` (whose arena `import`
    /// imports) into a new sparse buffer, binds what the VM maps there now, and follows every
    /// later batch. `backing`: `None` picks [`MirrorBacking::HostImport`] where the driver
    /// really binds it, else [`MirrorBacking::DeviceCopy`].
    ///
    /// # Errors
    /// [`VkError::NoSparse`] (the device lacks sparse buffers or aliasing),
    /// [`VkError::BadRequest`] for a window that is empty, unaligned to the block, outside the
    /// VM or above `sparseAddressSpaceSize`, [`VkError::OtherArena`] when the VM's memory is not
    /// the import's arena, [`VkError::SparseHostImportRefused`], [`VkError::NoMemoryType`],
    /// [`VkError::Call`], [`VkError::Mirror`] when the initial bind fails.
    pub fn new(
        import: &Arc<ArenaImport>,
        service: &Service,
        vm: VmId,
        start: u64,
        len: u64,
        backing: Option<MirrorBacking>,
    ) -> Result<Self, VkError> {
        let ctx = import.context().clone();
        let sparse =
            ctx.info().sparse.ok_or(VkError::NoSparse { why: "no sparseBinding/sparseResidencyBuffer" })?;
        if !sparse.aliased {
            return Err(VkError::NoSparse {
                why: "no sparseResidencyAliased (repeat mappings alias memory)",
            });
        }
        let the_vm = service.vm(vm).map_err(|e| VkError::Mirror(e.to_string()))?;
        if !Arc::ptr_eq(the_vm.mem(), import.mem()) {
            return Err(VkError::OtherArena);
        }
        let bounds = the_vm.bounds();
        let end = start.checked_add(len).filter(|_| len > 0);
        if end.is_none_or(|e| start < bounds.start() || e > bounds.end()) {
            return Err(VkError::BadRequest(format!("window [{start:#x}, +{len:#x}) is not inside the VM")));
        }
        if len > sparse.address_space {
            return Err(VkError::BadRequest(format!(
                "window of {len:#x} bytes exceeds sparseAddressSpaceSize {:#x}",
                sparse.address_space
            )));
        }
        let host = match backing {
            Some(MirrorBacking::HostImport) => true,
            Some(MirrorBacking::DeviceCopy) => false,
            None => probe_host_import(import)?,
        };
        if backing == Some(MirrorBacking::HostImport) && !probe_host_import(import)? {
            return Err(VkError::SparseHostImportRefused { device: ctx.device_name().to_string() });
        }
        let (buffer, reqs) = sparse_buffer(&ctx, len, host)?;
        let block = reqs.alignment.max(PAGE_SIZE);
        let destroy = |e: VkError| {
            // SAFETY: nothing is bound to or uses the new buffer.
            unsafe { ctx.device.destroy_buffer(buffer, None) };
            e
        };
        if !start.is_multiple_of(block) || !len.is_multiple_of(block) {
            return Err(destroy(VkError::BadRequest(format!(
                "window [{start:#x}, +{len:#x}) is not a multiple of the sparse block {block:#x}"
            ))));
        }
        let memory_type = if host {
            0
        } else {
            let want = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
            ctx.memory_type(reqs.memory_type_bits, want)
                .ok_or(VkError::NoMemoryType { what: "host-visible memory for a sparse buffer" })
                .map_err(destroy)?
        };
        let bai = vk::BufferDeviceAddressInfo::default().buffer(buffer);
        // SAFETY: a sparse buffer made with SHADER_DEVICE_ADDRESS.
        let address = unsafe { ctx.device.get_buffer_device_address(&bai) };
        let copy = ComputePipeline::new(&ctx, COPY_WORDS_SPV, 24).map_err(destroy)?;
        // SAFETY: a live device.
        let fence =
            call("vkCreateFence", unsafe { ctx.device.create_fence(&vk::FenceCreateInfo::default(), None) })
                .map_err(destroy)?;
        let inner = Arc::new(Inner {
            ctx: ctx.clone(),
            vm: the_vm.clone(),
            import: import.clone(),
            mem: import.mem().clone(),
            base: start,
            len,
            block,
            buffer,
            address,
            memory_type,
            backing: if host { MirrorBacking::HostImport } else { MirrorBacking::DeviceCopy },
            copy,
            state: Mutex::new(State {
                shadow: BTreeMap::new(),
                bos: FastMap::default(),
                stats: MirrorStats::default(),
                diverged: None,
                fence,
            }),
        });
        inner.follow_ops(&the_vm, &[BindOp::Unmap { addr: start, range: len }]).map_err(VkError::Mirror)?;
        let follower: Arc<dyn Follower> = inner.clone();
        service.add_follower(vm, follower.clone()).map_err(|e| VkError::Mirror(e.to_string()))?;
        Ok(SparseMirror { inner, follower, vm })
    }

    /// Stops following: the service forgets the mirror (the buffer lives while `self` does).
    ///
    /// # Errors
    /// [`VkError::Mirror`] when the VM is gone from the service.
    pub fn detach(&self, service: &Service) -> Result<(), VkError> {
        service.remove_follower(self.vm, &self.follower).map(drop).map_err(|e| VkError::Mirror(e.to_string()))
    }

    /// The context the mirror's buffer lives on.
    #[must_use]
    pub fn context(&self) -> &Arc<Vk> {
        &self.inner.ctx
    }

    /// The sparse buffer (for descriptors, copies, or a wgpu wrapper).
    #[must_use]
    pub fn buffer(&self) -> vk::Buffer {
        self.inner.buffer
    }

    /// The buffer's device address (GPU VA `start` of the window).
    #[must_use]
    pub fn device_address(&self) -> u64 {
        self.inner.address
    }

    /// The window: first GPU VA and length.
    #[must_use]
    pub fn window(&self) -> (u64, u64) {
        (self.inner.base, self.inner.len)
    }

    /// The device's sparse block (the buffer's memory alignment).
    #[must_use]
    pub fn block(&self) -> u64 {
        self.inner.block
    }

    /// Which memory the mirror binds.
    #[must_use]
    pub fn backing(&self) -> MirrorBacking {
        self.inner.backing
    }

    /// What it has done so far.
    #[must_use]
    pub fn stats(&self) -> MirrorStats {
        self.inner.state.lock().stats
    }

    /// Why the mirror stopped showing the VM, if a bind failed.
    #[must_use]
    pub fn diverged(&self) -> Option<String> {
        self.inner.state.lock().diverged.clone()
    }

    /// With [`MirrorBacking::DeviceCopy`], copies the arena's current bytes of what
    /// `[va, va + len)` of the followed VM maps into the device memory again (after the CPU
    /// wrote them); nothing to do with the host-import backing.
    ///
    /// # Errors
    /// [`VkError::BadRequest`] for a range outside the window.
    pub fn refresh(&self, va: u64, len: u64) -> Result<(), VkError> {
        let (lo, hi) = self.checked(va, len)?;
        if self.inner.backing == MirrorBacking::HostImport {
            return Ok(());
        }
        let ps = pieces(&self.inner.vm.mappings(), &[(lo, hi)]);
        let mut st = self.inner.state.lock();
        let copied = self.inner.fill(&mut st, &ps);
        st.stats.bytes_copied += copied;
        Ok(())
    }

    /// After a failed bind ([`SparseMirror::diverged`]): binds the VM's current state over the
    /// whole window again and, when that succeeds, follows the service's binds as before.
    ///
    /// # Errors
    /// [`VkError::Mirror`] when the bind fails again (the mirror stays diverged).
    pub fn resync(&self) -> Result<(), VkError> {
        self.inner.state.lock().diverged = None;
        let whole = [BindOp::Unmap { addr: self.inner.base, range: self.inner.len }];
        self.inner.follow_ops(&self.inner.vm, &whole).map_err(VkError::Mirror)
    }

    fn checked(&self, va: u64, len: u64) -> Result<(u64, u64), VkError> {
        let i = &self.inner;
        match va.checked_add(len) {
            Some(e) if len > 0 && va >= i.base && e <= i.base + i.len => Ok((va, e)),
            _ => Err(VkError::BadRequest(format!("[{va:#x}, +{len:#x}) is outside the mirror's window"))),
        }
    }

    /// Reads `[va, va + len)` of the mirror with `vkCmdCopyBuffer` into a host buffer.
    ///
    /// # Errors
    /// [`VkError::BadRequest`] for a range outside the window or not 4-byte aligned,
    /// [`VkError::Alloc`], [`VkError::Call`].
    pub fn read_copy(&self, va: u64, len: u64) -> Result<Vec<u8>, VkError> {
        self.read(va, len, false)
    }

    /// Reads `[va, va + len)` of the mirror in a compute shader (`copy_words.comp`, loading
    /// through the buffer's device address, as a kernel would).
    ///
    /// # Errors
    /// As [`SparseMirror::read_copy`].
    pub fn read_shader(&self, va: u64, len: u64) -> Result<Vec<u8>, VkError> {
        self.read(va, len, true)
    }

    fn read(&self, va: u64, len: u64, shader: bool) -> Result<Vec<u8>, VkError> {
        let (lo, _) = self.checked(va, len)?;
        if !(va | len).is_multiple_of(4) {
            return Err(VkError::BadRequest(format!("[{va:#x}, +{len:#x}) is not 4-byte aligned")));
        }
        let i = &*self.inner;
        let ctx = &i.ctx;
        let d = &ctx.device;
        let out = GpuBuffer::new(ctx, len, MemoryLocation::GpuToCpu, "mirror read")?;
        let cmd = ctx.command_buffer()?;
        let r = (|| {
            // SAFETY: a fresh command buffer of this device.
            call("vkBeginCommandBuffer", unsafe {
                d.begin_command_buffer(cmd, &vk::CommandBufferBeginInfo::default())
            })?;
            let off = lo - i.base;
            if shader {
                let words = len / 4;
                let per = u64::from(ctx.info().max_workgroups.clamp(1, 65_535)) * WORDS_PER_GROUP;
                // SAFETY: recording; pipeline and layout live; the push range is 24 bytes.
                unsafe { d.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::COMPUTE, i.copy.pipeline) };
                let mut first = 0u64;
                while first < words {
                    let n = (words - first).min(per);
                    let mut p = [0u8; 24];
                    p[..8].copy_from_slice(&(i.address + off + first * 4).to_le_bytes());
                    p[8..16].copy_from_slice(&(out.addr + first * 4).to_le_bytes());
                    p[16..20].copy_from_slice(&(n as u32).to_le_bytes());
                    // SAFETY: as above.
                    unsafe {
                        d.cmd_push_constants(cmd, i.copy.layout, vk::ShaderStageFlags::COMPUTE, 0, &p);
                        d.cmd_dispatch(cmd, n.div_ceil(WORDS_PER_GROUP) as u32, 1, 1);
                    }
                    first += n;
                }
                end_for_host(d, cmd, vk::PipelineStageFlags::COMPUTE_SHADER, vk::AccessFlags::SHADER_WRITE)?;
            } else {
                let region = [vk::BufferCopy::default().src_offset(off).dst_offset(0).size(len)];
                // SAFETY: both buffers are live and large enough.
                unsafe { d.cmd_copy_buffer(cmd, i.buffer, out.buffer, &region) };
                end_for_host(d, cmd, vk::PipelineStageFlags::TRANSFER, vk::AccessFlags::TRANSFER_WRITE)?;
            }
            ctx.submit_wait(cmd)
        })();
        ctx.free_command_buffer(cmd);
        r?;
        Ok(out.bytes().to_vec())
    }
}

/// A sparse buffer of `len` bytes (made for host-imported memory when `host`) and its
/// requirements.
fn sparse_buffer(ctx: &Vk, len: u64, host: bool) -> Result<(vk::Buffer, vk::MemoryRequirements), VkError> {
    let mut ext = vk::ExternalMemoryBufferCreateInfo::default()
        .handle_types(vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT);
    let mut bci = vk::BufferCreateInfo::default()
        .size(len)
        .flags(
            vk::BufferCreateFlags::SPARSE_BINDING
                | vk::BufferCreateFlags::SPARSE_RESIDENCY
                | vk::BufferCreateFlags::SPARSE_ALIASED,
        )
        .usage(
            vk::BufferUsageFlags::STORAGE_BUFFER
                | vk::BufferUsageFlags::SHADER_DEVICE_ADDRESS
                | vk::BufferUsageFlags::TRANSFER_SRC
                | vk::BufferUsageFlags::TRANSFER_DST,
        )
        .sharing_mode(vk::SharingMode::EXCLUSIVE);
    if host {
        bci = bci.push_next(&mut ext);
    }
    // SAFETY: a device with sparseBinding, sparseResidencyBuffer and sparseResidencyAliased
    // enabled (checked by the caller); the create info lives across the call.
    let buffer = call("vkCreateBuffer(sparse)", unsafe { ctx.device.create_buffer(&bci, None) })?;
    // SAFETY: a live buffer.
    let reqs = unsafe { ctx.device.get_buffer_memory_requirements(buffer) };
    Ok((buffer, reqs))
}

/// One `vkQueueBindSparse` of `binds` on `buffer`, waited for with `fence` (reset after).
fn bind_sparse(
    ctx: &Vk,
    buffer: vk::Buffer,
    binds: &[vk::SparseMemoryBind],
    fence: vk::Fence,
) -> Result<(), VkError> {
    bind_sparse_submitted(ctx, buffer, binds, fence).map_err(|(_, e)| e)
}

/// [`bind_sparse`], whose error also says whether the bind was submitted (then it may have
/// taken effect, and `fence` may still be pending or signaled).
fn bind_sparse_submitted(
    ctx: &Vk,
    buffer: vk::Buffer,
    binds: &[vk::SparseMemoryBind],
    fence: vk::Fence,
) -> Result<(), (bool, VkError)> {
    let bufs = [vk::SparseBufferMemoryBindInfo::default().buffer(buffer).binds(binds)];
    let info = [vk::BindSparseInfo::default().buffer_binds(&bufs)];
    let r = {
        let q = ctx.queue.lock();
        // SAFETY: the queue is externally synchronized by its lock and supports sparse binding
        // (the context picked such a family); every memory and the buffer are live; the fence
        // is unsignaled.
        unsafe { ctx.device.queue_bind_sparse(*q, &info, fence) }
    };
    call("vkQueueBindSparse", r).map_err(|e| (false, e))?;
    // SAFETY: the fence belongs to this device and was submitted.
    let waited = unsafe { ctx.device.wait_for_fences(&[fence], true, u64::MAX) };
    call("vkWaitForFences", waited).map_err(|e| (true, e))?;
    // SAFETY: signaled, no longer in use.
    call("vkResetFences", unsafe { ctx.device.reset_fences(&[fence]) }).map_err(|e| (true, e))
}

/// Whether the driver really binds host-imported memory in a sparse buffer: binds one arena
/// block holding a pattern and reads it back with a copy.
fn probe_host_import(import: &Arc<ArenaImport>) -> Result<bool, VkError> {
    let ctx = import.context();
    let (buffer, reqs) = sparse_buffer(ctx, PAGE_SIZE.max(4096), true)?;
    let block = reqs.alignment.max(PAGE_SIZE);
    // SAFETY: unused.
    let destroy = || unsafe { ctx.device.destroy_buffer(buffer, None) };
    let (buffer, reqs) = if block != PAGE_SIZE {
        destroy();
        sparse_buffer(ctx, block, true)?
    } else {
        (buffer, reqs)
    };
    let mem = import.mem();
    let Ok(pa) = mem.alloc_block(block.next_power_of_two()) else {
        destroy();
        return Err(VkError::Mirror("no arena block for the host-import probe".into()));
    };
    let pattern: Vec<u8> = (0..block).map(|i| (i as u8) ^ 0xa5 | 1).collect();
    let _ = mem.write(pa, &pattern);
    let shift = import.chunk_shift();
    let chunk = &import.chunks()[(pa.as_u64() >> shift) as usize];
    let mut result = Ok(false);
    // Every chunk's memory type must be one the sparse buffer takes.
    if import.chunks().iter().all(|c| reqs.memory_type_bits & (1 << c.memory_type) != 0) {
        let bind = [vk::SparseMemoryBind::default()
            .resource_offset(0)
            .size(block)
            .memory(chunk.memory)
            .memory_offset(pa.as_u64() & ((1 << shift) - 1))];
        // SAFETY: a live device.
        let fence = unsafe { ctx.device.create_fence(&vk::FenceCreateInfo::default(), None) };
        result = call("vkCreateFence", fence).and_then(|fence| {
            let r = bind_sparse(ctx, buffer, &bind, fence).and_then(|()| {
                let out = GpuBuffer::new(ctx, block, MemoryLocation::GpuToCpu, "probe read")?;
                let cmd = ctx.command_buffer()?;
                let d = &ctx.device;
                let r = (|| {
                    // SAFETY: a fresh command buffer.
                    call("vkBeginCommandBuffer", unsafe {
                        d.begin_command_buffer(cmd, &vk::CommandBufferBeginInfo::default())
                    })?;
                    let region = [vk::BufferCopy::default().size(block)];
                    // SAFETY: both buffers live and large enough.
                    unsafe { d.cmd_copy_buffer(cmd, buffer, out.buffer, &region) };
                    end_for_host(d, cmd, vk::PipelineStageFlags::TRANSFER, vk::AccessFlags::TRANSFER_WRITE)?;
                    ctx.submit_wait(cmd)
                })();
                ctx.free_command_buffer(cmd);
                r.map(|()| out.bytes() == pattern.as_slice())
            });
            // SAFETY: waited for (or never submitted).
            unsafe { ctx.device.destroy_fence(fence, None) };
            r
        });
    }
    destroy();
    let _ = mem.free_block(pa, block.next_power_of_two());
    result
}

impl Inner {
    /// The records for `ps`, and what the device-copy backing must fill.
    fn records(&self, st: &mut State, vm: &Vm, ps: &[Piece]) -> Result<Vec<vk::SparseMemoryBind>, String> {
        let mut out: Vec<vk::SparseMemoryBind> = Vec::with_capacity(ps.len());
        let mut push = |r: vk::SparseMemoryBind| {
            if let Some(l) = out.last_mut()
                && l.memory == r.memory
                && r.memory != vk::DeviceMemory::null()
                && l.resource_offset + l.size == r.resource_offset
                && l.memory_offset + l.size == r.memory_offset
            {
                l.size += r.size;
                return;
            }
            out.push(r);
        };
        let shift = self.import.chunk_shift();
        let b = self.block;
        for p in ps {
            let at = p.va - self.base;
            if !at.is_multiple_of(b)
                || p.len % b != 0
                || matches!(p.target, Target::Bo { offset, .. } if offset % b != 0)
            {
                return Err(format!(
                    "[{:#x}, +{:#x}) is not bound in whole sparse blocks of {b:#x} (a repeat period or an \
                     object offset that is not a block multiple)",
                    p.va, p.len
                ));
            }
            match p.target {
                Target::Unbound => push(vk::SparseMemoryBind::default().resource_offset(at).size(p.len)),
                Target::Bo { bo, offset } => {
                    let m = self.bo_mem(st, vm, bo)?;
                    match self.backing {
                        MirrorBacking::DeviceCopy => push(
                            vk::SparseMemoryBind::default()
                                .resource_offset(at)
                                .size(p.len)
                                .memory(m.memory)
                                .memory_offset(offset),
                        ),
                        MirrorBacking::HostImport => {
                            let mut va = at;
                            let chunks = self.import.chunks();
                            let mut runs = Vec::new();
                            m.phys_runs(offset, p.len, |_, pa, n| runs.push((pa, n)));
                            for (mut pa, mut n) in runs {
                                while n > 0 {
                                    let c = pa >> shift;
                                    let take = (((c + 1) << shift) - pa).min(n);
                                    if take % b != 0 || !(pa - (c << shift)).is_multiple_of(b) {
                                        return Err(format!(
                                            "{bo:?}'s pages at {pa:#x} are not contiguous in whole \
                                             sparse blocks of {b:#x} (host-import backing)"
                                        ));
                                    }
                                    push(
                                        vk::SparseMemoryBind::default()
                                            .resource_offset(va)
                                            .size(take)
                                            .memory(chunks[c as usize].memory)
                                            .memory_offset(pa - (c << shift)),
                                    );
                                    (va, pa, n) = (va + take, pa + take, n - take);
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The object's entry, made on first use (device-copy: its device memory, mapped).
    fn bo_mem<'s>(&self, st: &'s mut State, vm: &Vm, bo: BoId) -> Result<&'s BoMem, String> {
        if let std::collections::hash_map::Entry::Vacant(slot) = st.bos.entry(bo) {
            let pages = vm.bo_pages(bo).map_err(|e| e.to_string())?;
            let mut starts = Vec::with_capacity(pages.len());
            let mut size = 0u64;
            for p in &pages {
                starts.push(size);
                size += u64::from(p.len);
            }
            let (memory, mapped) = match self.backing {
                MirrorBacking::HostImport => (vk::DeviceMemory::null(), None),
                MirrorBacking::DeviceCopy => {
                    let size = size.div_ceil(self.block) * self.block;
                    let ai = vk::MemoryAllocateInfo::default()
                        .allocation_size(size)
                        .memory_type_index(self.memory_type);
                    // SAFETY: a live device; a memory type of the sparse buffer's.
                    let memory = unsafe { self.ctx.device.allocate_memory(&ai, None) }
                        .map_err(|r| format!("vkAllocateMemory of {size:#x} bytes for {bo:?}: {r}"))?;
                    // SAFETY: host-visible memory, not mapped yet.
                    let ptr =
                        unsafe { self.ctx.device.map_memory(memory, 0, size, vk::MemoryMapFlags::empty()) };
                    match ptr {
                        Ok(p) => (memory, Some(Mapped(p.cast()))),
                        Err(r) => {
                            // SAFETY: unused.
                            unsafe { self.ctx.device.free_memory(memory, None) };
                            return Err(format!("vkMapMemory: {r}"));
                        }
                    }
                }
            };
            slot.insert(BoMem { pages, starts, memory, mapped, bound: 0 });
        }
        Ok(&st.bos[&bo])
    }

    /// Device-copy: copies the arena bytes of every object run in `ps` into its device memory
    /// (each object range once); returns the bytes copied.
    fn fill(&self, st: &mut State, ps: &[Piece]) -> u64 {
        let mut want: Vec<(BoId, u64, u64)> = ps
            .iter()
            .filter_map(|p| match p.target {
                Target::Bo { bo, offset } => Some((bo, offset, offset + p.len)),
                Target::Unbound => None,
            })
            .collect();
        want.sort_unstable();
        let mut merged: Vec<(BoId, u64, u64)> = Vec::with_capacity(want.len());
        for w in want {
            match merged.last_mut() {
                Some(l) if l.0 == w.0 && w.1 <= l.2 => l.2 = l.2.max(w.2),
                _ => merged.push(w),
            }
        }
        let mut copied = 0;
        let mut tmp = Vec::new();
        for (bo, s, e) in merged {
            let Some(m) = st.bos.get(&bo) else { continue };
            let Some(Mapped(dst)) = m.mapped else { continue };
            m.phys_runs(s, e - s, |at, pa, n| {
                tmp.resize(n as usize, 0);
                if self.mem.read(PhysAddr::new(pa), &mut tmp).is_ok() {
                    // SAFETY: `dst` maps the object's whole (block-rounded) size; `at + n` is
                    // inside the object; only this mirror writes there, under its lock.
                    unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst.add(at as usize), n as usize) };
                }
            });
            copied += e - s;
        }
        copied
    }

    /// Binds the VM's state over what `ops` touched (the [`Follower`] work).
    fn follow_ops(&self, vm: &Vm, ops: &[BindOp]) -> Result<(), String> {
        let mut st = self.state.lock();
        if let Some(why) = &st.diverged {
            return Err(format!("the mirror diverged earlier: {why}"));
        }
        st.stats.batches += 1;
        let ranges = touched(ops, self.base, self.base + self.len);
        if ranges.is_empty() {
            return Ok(());
        }
        let ps = pieces(&vm.mappings(), &ranges);
        let mut submitted = false;
        let r = self.records(&mut st, vm, &ps).and_then(|binds| {
            if self.backing == MirrorBacking::DeviceCopy {
                let copied = self.fill(&mut st, &ps);
                st.stats.bytes_copied += copied;
            }
            bind_sparse_submitted(&self.ctx, self.buffer, &binds, st.fence).map_err(|(s, e)| {
                submitted = s;
                e.to_string()
            })?;
            st.stats.calls += 1;
            st.stats.records += binds.len() as u64;
            st.stats.last_records = binds.len() as u64;
            Ok(())
        });
        if let Err(why) = &r {
            st.diverged = Some(why.clone());
            if submitted {
                // The bind may have taken effect: the memory it names stays until a resync
                // has rebound the window (its shadow update frees what is then unused). The
                // fence may still be pending: a new one serves the resync, the old one is
                // left alone (a wait on it failed; destroying it could be invalid).
                // SAFETY: a live device.
                if let Ok(f) = unsafe { self.ctx.device.create_fence(&vk::FenceCreateInfo::default(), None) }
                {
                    st.fence = f;
                }
            } else {
                self.free_unused(&mut st);
            }
            return r;
        }
        self.update_shadow(&mut st, &ps);
        Ok(())
    }

    /// Records what is bound now, and frees the device memory of objects no longer bound.
    fn update_shadow(&self, st: &mut State, ps: &[Piece]) {
        for p in ps {
            let (a, e) = (p.va, p.va + p.len);
            let first = st.shadow.range(..a).next_back().filter(|(s, v)| *s + v.0 > a).map(|(s, _)| *s);
            let keys: Vec<u64> = first.into_iter().chain(st.shadow.range(a..e).map(|(s, _)| *s)).collect();
            for k in keys {
                let Some((len, bo, off)) = st.shadow.remove(&k) else { continue };
                let end = k + len;
                if k < a {
                    st.shadow.insert(k, (a - k, bo, off));
                }
                if end > e {
                    st.shadow.insert(e, (end - e, bo, off + (e - k)));
                }
                let gone = end.min(e) - k.max(a);
                if let Some(m) = st.bos.get_mut(&bo) {
                    m.bound -= gone;
                }
            }
            if let Target::Bo { bo, offset } = p.target {
                st.shadow.insert(a, (p.len, bo, offset));
                if let Some(m) = st.bos.get_mut(&bo) {
                    m.bound += p.len;
                }
            }
        }
        self.free_unused(st);
    }

    /// Frees the objects nothing of the buffer is bound to (also those a failed batch made).
    fn free_unused(&self, st: &mut State) {
        let unused: Vec<BoId> = st.bos.iter().filter(|(_, m)| m.bound == 0).map(|(b, _)| *b).collect();
        for b in unused {
            if let Some(m) = st.bos.remove(&b) {
                self.free_bo(&m);
            }
        }
    }

    fn free_bo(&self, m: &BoMem) {
        if m.memory != vk::DeviceMemory::null() {
            {
                // Work the context's queue still runs may have read the memory before the unbind.
                let q = self.ctx.queue.lock();
                // SAFETY: the queue is externally synchronized by its lock.
                let _ = unsafe { self.ctx.device.queue_wait_idle(*q) };
            }
            // SAFETY: nothing of the buffer is bound to it any more (the unbind was waited for);
            // the mirror's reads waited for their submits and the context's queue is idle. Work
            // submitted elsewhere (wgpu's queue, the caller's) must have completed before the
            // unbind, as the type's docs require.
            unsafe { self.ctx.device.free_memory(m.memory, None) };
        }
    }

    fn check_ops(&self, vm: &Vm, ops: &[BindOp]) -> Result<(), String> {
        if let Some(why) = &self.state.lock().diverged {
            return Err(format!("the mirror diverged earlier: {why}"));
        }
        let (lo, hi, b) = (self.base, self.base + self.len, self.block);
        for op in ops {
            let (a, e, off, bo) = match op {
                BindOp::Map(v) => (v.addr, v.addr.saturating_add(v.range), v.offset, v.obj),
                BindOp::Unmap { addr, range } => (*addr, addr.saturating_add(*range), 0, None),
            };
            if e <= lo || a >= hi {
                continue;
            }
            let (ca, ce) = (a.max(lo), e.min(hi));
            if (ca - lo) % b != 0 || (ce - lo) % b != 0 || off % b != 0 {
                return Err(format!(
                    "[{a:#x}, {e:#x}) at object offset {off:#x} is not a multiple of the sparse block {b:#x}"
                ));
            }
            if let BindOp::Map(v) = op
                && let Some(r) = v.repeat
                && (r.start % b != 0 || r.len % b != 0)
            {
                return Err(format!(
                    "the repeat period [{:#x}, +{:#x}) of [{a:#x}, {e:#x}) is not a multiple of the sparse \
                     block {b:#x}",
                    r.start, r.len
                ));
            }
            if let (Some(bo), MirrorBacking::HostImport) = (bo, self.backing)
                && b > PAGE_SIZE
                && let Ok(pages) = vm.bo_pages(bo)
                && let Some(p) = pages
                    .iter()
                    .find(|p| (p.phys.as_u64() + u64::from(p.offset)) % b != 0 || u64::from(p.len) % b != 0)
            {
                return Err(format!(
                    "{bo:?} has pages at {:#x} (+{:#x}) that are not whole sparse blocks of {b:#x}: the \
                     host-import backing binds its pages where they are",
                    p.phys.as_u64() + u64::from(p.offset),
                    p.len
                ));
            }
            if let (Some(bo), MirrorBacking::DeviceCopy) = (bo, self.backing)
                && vm.bo_size(bo).is_ok_and(|s| s > self.ctx.info().max_allocation)
            {
                return Err(format!("{bo:?} is larger than maxMemoryAllocationSize"));
            }
        }
        Ok(())
    }
}

impl Follower for Inner {
    fn name(&self) -> String {
        format!("sparse mirror [{:#x}, +{:#x})", self.base, self.len)
    }

    fn check(&self, vm: &Vm, ops: &[BindOp]) -> Result<(), String> {
        if !std::ptr::eq(vm, &*self.vm) {
            return Err("not the VM this mirror follows".into());
        }
        self.check_ops(vm, ops)
    }

    fn follow(&self, vm: &Vm, ops: &[BindOp]) -> Result<(), String> {
        if !std::ptr::eq(vm, &*self.vm) {
            return Err("not the VM this mirror follows".into());
        }
        self.follow_ops(vm, ops)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        // SAFETY: every bind was waited for; reads wait for their submits; the buffer goes
        // before the memory bound to it.
        unsafe {
            self.ctx.device.destroy_buffer(self.buffer, None);
            self.ctx.device.destroy_fence(st.fence, None);
        }
        let bos: Vec<BoMem> = st.bos.drain().map(|(_, m)| m).collect();
        for m in &bos {
            self.free_bo(m);
        }
    }
}

/// The driver's own cost of sparse binding, for the report: a sparse buffer and one device
/// allocation of `pages` pages, bound page by page at every other block of the buffer
/// (scattered: no two records coalesce), in one `vkQueueBindSparse` with its fence waited.
#[cfg(feature = "bench")]
pub(crate) struct DriverBench {
    ctx: Arc<Vk>,
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    fence: vk::Fence,
    pages: u64,
}

#[cfg(feature = "bench")]
impl DriverBench {
    pub(crate) fn new(ctx: &Arc<Vk>, pages: u64) -> Result<Self, VkError> {
        if ctx.info().sparse.is_none() {
            return Err(VkError::NoSparse { why: "no sparseBinding/sparseResidencyBuffer" });
        }
        let (buffer, reqs) = sparse_buffer(ctx, 2 * pages * PAGE_SIZE, false)?;
        let destroy = |e| {
            // SAFETY: unused.
            unsafe { ctx.device.destroy_buffer(buffer, None) };
            e
        };
        let t = ctx
            .memory_type(reqs.memory_type_bits, vk::MemoryPropertyFlags::empty())
            .ok_or(VkError::NoMemoryType { what: "sparse bench memory" })
            .map_err(destroy)?;
        let ai = vk::MemoryAllocateInfo::default().allocation_size(pages * PAGE_SIZE).memory_type_index(t);
        // SAFETY: a live device.
        let memory =
            call("vkAllocateMemory", unsafe { ctx.device.allocate_memory(&ai, None) }).map_err(destroy)?;
        // SAFETY: a live device.
        let fence =
            call("vkCreateFence", unsafe { ctx.device.create_fence(&vk::FenceCreateInfo::default(), None) })
                .map_err(destroy)?;
        Ok(DriverBench { ctx: ctx.clone(), buffer, memory, fence, pages })
    }

    /// Binds every page (scattered records), or with `one`, rebinds a single page; returns
    /// the nanoseconds.
    pub(crate) fn run(&self, one: Option<u64>) -> f64 {
        let binds: Vec<vk::SparseMemoryBind> = match one {
            Some(i) => vec![
                vk::SparseMemoryBind::default()
                    .resource_offset(2 * i * PAGE_SIZE)
                    .size(PAGE_SIZE)
                    .memory(self.memory)
                    .memory_offset(((i + 1) % self.pages) * PAGE_SIZE),
            ],
            None => (0..self.pages)
                .map(|i| {
                    vk::SparseMemoryBind::default()
                        .resource_offset(2 * i * PAGE_SIZE)
                        .size(PAGE_SIZE)
                        .memory(self.memory)
                        .memory_offset(i * PAGE_SIZE)
                })
                .collect(),
        };
        let t0 = Instant::now();
        bind_sparse(&self.ctx, self.buffer, &binds, self.fence).expect("sparse bind");
        t0.elapsed().as_secs_f64() * 1e9
    }
}

#[cfg(feature = "bench")]
impl Drop for DriverBench {
    fn drop(&mut self) {
        // SAFETY: every bind was waited for; the buffer goes before its memory.
        unsafe {
            self.ctx.device.destroy_buffer(self.buffer, None);
            self.ctx.device.free_memory(self.memory, None);
            self.ctx.device.destroy_fence(self.fence, None);
        }
    }
}
