//! wgpu interop (feature `wgpu`): one Vulkan device shared by wgpu and vmbind, and vmbind's
//! zero-copy imports handed out as [`wgpu::Buffer`]s.
//!
//! [`WgpuVk::new`] creates a headless wgpu [`Instance`](wgpu::Instance) (Vulkan backend only),
//! picks the device [`Vk::new`](crate::vk::Vk::new) would pick (the same ranking, the same
//! `VMBIND_VK_DEVICE` substring), and creates the Vulkan device itself through wgpu-hal: wgpu's
//! own extensions and features plus what vmbind needs (`VK_EXT_external_memory_host`, buffer
//! device address, `shaderInt64`; sparse binding, sparse buffers and aliasing where the device
//! has them). wgpu owns the device and the instance; the [`Vk`] context built on them
//! ([`WgpuVk::vk`], usable with every `vk` type: [`HostImport`], [`ArenaImport`],
//! [`WalkGather`](crate::vk::WalkGather), ...) has its own command pool and allocator, and
//! keeps wgpu's device, queue, adapter and instance alive until those are gone, so no vmbind
//! object outlives the device whatever order handles are dropped in.
//!
//! With `VMBIND_VALIDATION=1` the Khronos validation layer is enabled (`InstanceFlags::VALIDATION`)
//! with `VK_EXT_debug_utils`, and its warnings and errors are collected by vmbind as usual
//! ([`Vk::validation_messages`]). `InstanceFlags::DEBUG` is always left off: with it naga emits
//! debug info that Debian's 1.3.239 layer falsely rejects in every WGSL shader.
//!
//! # What wgpu can and cannot do with these buffers
//!
//! Buffers from [`WgpuVk::import`], [`WgpuVk::arena_chunk`], [`WgpuVk::wrap_host_import`] and
//! [`WgpuVk::wrap_raw`] have the usages `STORAGE | COPY_SRC | COPY_DST`: they work in bind
//! groups (storage buffers) and in copies. wgpu takes their contents as initialized (it never
//! zeroes them) and writes to them land in the arena itself, without a copy. But:
//!
//! - **No mapping**: `map_async`/`get_mapped_range` fail (wgpu cannot map external buffers).
//!   Read and write the bytes through [`PhysMem`] instead, after [`WgpuVk::sync`].
//! - **No device address in WGSL**: naga has no physical-storage-buffer pointers. The device
//!   address of an import ([`HostImport::device_address`]) is for vmbind's own GLSL shaders or
//!   SPIR-V passthrough shaders; wgpu does not track accesses made through addresses.
//! - **wgpu does not see vmbind's submissions** (nor writes by the host): it tracks only its own
//!   command buffers. Order explicitly: vmbind's calls wait for their fences before returning;
//!   after wgpu work call [`WgpuVk::sync`] (it waits with `Device::poll(Wait)`, then submits a
//!   global memory barrier and waits for it) before the host or vmbind touches the same bytes,
//!   and do not change the arena while wgpu work that reads it is in flight.
//!
//! # One queue, two submitters
//!
//! wgpu and vmbind submit to the same `VkQueue`, which Vulkan requires to be externally
//! synchronized. vmbind locks its queue mutex around every submit; wgpu locks its own. The two
//! locks know nothing of each other, so **a wgpu call that submits must not run at the same time
//! as vmbind work on another thread**. wgpu submits in `Queue::submit`, and may also flush its
//! pending writes from `Queue::on_submitted_work_done`, `Buffer::map_async` and when the queue
//! is dropped; vmbind submits in every `vk` call that runs on the device and waits for the
//! device to go idle when the last [`Vk`] handle is dropped. [`WgpuVk::submit`] takes vmbind's
//! lock around `Queue::submit`: submitting through it makes those two safe against each other
//! (the other wgpu calls above remain the caller's to keep apart). Submissions are also not
//! ordered against each other beyond submission order on the queue: see [`WgpuVk::sync`].
//!
//! # Lifetimes
//!
//! A [`WgpuBuffer`] holds its owner (the import, and so the arena and the context) through an
//! `Arc`, and so does wgpu's own record of the buffer, which can outlive the handle while
//! submissions that use it are in flight. That record is released when wgpu learns the
//! submission finished (`Device::poll`, [`WgpuVk::sync`]); until then the owner, the context
//! and wgpu's device stay alive.
// Every wgpu-hal and Vulkan call here is `unsafe`: this module is an edge, each block with its
// `SAFETY` comment.

use std::any::Any;
use std::ffi::CStr;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use ash::vk;
use wgpu::hal;
use wgpu::hal::api::Vulkan;

use crate::mem::PhysMem;
use crate::vk::{ArenaImport, HostImport, Vk, VkError};

/// Errors of the wgpu interop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WgpuError {
    /// A Vulkan-side error (no loader, no usable device, a failed call, a bad import range).
    #[error(transparent)]
    Vk(#[from] VkError),
    /// wgpu could not create its Vulkan instance (no loader, no driver).
    #[error("wgpu could not create a Vulkan instance: {0}")]
    Instance(String),
    /// The device lacks wgpu features that were asked for.
    #[error("the device lacks the wgpu features {0:?}")]
    MissingFeatures(wgpu::Features),
    /// wgpu refused the device vmbind created.
    #[error("wgpu refused the device: {0}")]
    Device(String),
    /// A buffer to wrap is not acceptable; `why` says what is wrong.
    #[error("cannot wrap the buffer: {why}")]
    BadBuffer {
        /// Why.
        why: String,
    },
    /// wgpu reported an error for an operation of this module.
    #[error("wgpu: {0}")]
    Wgpu(String),
}

/// Runs a future of wgpu-core to completion (they are ready at once, or after a device poll).
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// Runs `f` with wgpu's errors of every kind captured instead of sent to the uncaptured-error
/// handler (which panics by default).
fn captured<T>(device: &wgpu::Device, f: impl FnOnce() -> T) -> Result<T, WgpuError> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let out = f();
    let errors = [block_on(validation.pop()), block_on(internal.pop()), block_on(oom.pop())];
    match errors.into_iter().flatten().next() {
        Some(e) => Err(WgpuError::Wgpu(e.to_string())),
        None => Ok(out),
    }
}

/// A device and instance created by someone else (here: through wgpu-hal), for
/// `Vk::from_raw_parts`.
pub(crate) struct RawParts {
    pub(crate) entry: ash::Entry,
    pub(crate) instance: ash::Instance,
    pub(crate) physical: vk::PhysicalDevice,
    /// Created with `VK_EXT_external_memory_host`, buffer device address and `shaderInt64`.
    pub(crate) device: ash::Device,
    pub(crate) family: u32,
    pub(crate) queue: vk::Queue,
    /// Whether `sparseBinding` + `sparseResidencyBuffer` were enabled (and the family binds
    /// sparse memory), and `sparseResidencyAliased`.
    pub(crate) sparse: bool,
    pub(crate) aliased: bool,
    /// Collect the validation layer's messages (the instance has the layer and
    /// `VK_EXT_debug_utils`).
    pub(crate) validate: bool,
}

/// What the context keeps alive for vmbind's objects: wgpu's handles of the device it owns.
struct Owners {
    _device: wgpu::Device,
    _queue: wgpu::Queue,
    _adapter: wgpu::Adapter,
    _instance: wgpu::Instance,
}

/// A device picked for both: its adapter, queue family, and whether sparse buffers (and
/// aliasing) get enabled.
struct Pick {
    adapter: wgpu::Adapter,
    family: u32,
    sparse: bool,
    aliased: bool,
}

/// One Vulkan device shared by wgpu and vmbind (module docs): wgpu's [`wgpu::Device`] and
/// [`wgpu::Queue`], and vmbind's [`Vk`] on the same `VkDevice` and `VkQueue`.
pub struct WgpuVk {
    vk: Arc<Vk>,
    device: wgpu::Device,
    queue: wgpu::Queue,
    adapter: wgpu::Adapter,
    instance: wgpu::Instance,
}

impl core::fmt::Debug for WgpuVk {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("WgpuVk")
            .field("device", &self.vk.device_name())
            .field("queue_family", &self.vk.family)
            .finish()
    }
}

impl WgpuVk {
    /// The shared device, with wgpu's `SHADER_INT64` feature where the device offers it.
    ///
    /// # Errors
    /// As [`WgpuVk::with_features`].
    pub fn new() -> Result<Self, WgpuError> {
        Self::open(None)
    }

    /// The shared device with the wgpu `features` (and the adapter's best limits).
    ///
    /// # Errors
    /// [`WgpuError::Instance`] when wgpu finds no Vulkan loader or driver;
    /// [`VkError::NoDevice`] (as [`WgpuError::Vk`]) naming what each device lacks, vmbind's
    /// needs or a queue family that does graphics and compute; [`WgpuError::MissingFeatures`];
    /// [`VkError::Call`] when device creation fails; [`WgpuError::Device`] when wgpu refuses it;
    /// [`VkError::Alloc`] when vmbind's allocator cannot be created.
    pub fn with_features(features: wgpu::Features) -> Result<Self, WgpuError> {
        Self::open(Some(features))
    }

    fn open(features: Option<wgpu::Features>) -> Result<Self, WgpuError> {
        let want_validation = std::env::var("VMBIND_VALIDATION").is_ok_and(|v| v == "1");
        let (instance, validating) = Self::make_instance(want_validation)?;
        let pick = Self::pick(&instance)?;
        let adapter = pick.adapter.clone();
        let features = match features {
            Some(f) => {
                let missing = f - adapter.features();
                if !missing.is_empty() {
                    return Err(WgpuError::MissingFeatures(missing));
                }
                f
            }
            None => adapter.features() & wgpu::Features::SHADER_INT64,
        };
        let limits = adapter.limits();
        let memory_hints = wgpu::MemoryHints::default();
        // SAFETY: `adapter` is a Vulkan adapter of this instance; the guard is dropped before
        // the adapter.
        let hal_adapter = unsafe { adapter.as_hal::<Vulkan>() }
            .ok_or_else(|| WgpuError::Device("not a Vulkan adapter".into()))?;
        let shared = hal_adapter.shared_instance();
        let entry = shared.entry().clone();
        let ash_instance = shared.raw_instance().clone();
        let physical = hal_adapter.raw_physical_device();

        let mut exts: Vec<&'static CStr> = hal_adapter.required_device_extensions(features);
        if !exts.contains(&ash::ext::external_memory_host::NAME) {
            exts.push(ash::ext::external_memory_host::NAME);
        }
        let ext_ptrs: Vec<_> = exts.iter().map(|e| e.as_ptr()).collect();
        let mut wgpu_features = hal_adapter.physical_device_features(&exts, features);
        let mut core = wgpu_features.get_core();
        core.shader_int64 = vk::TRUE;
        if pick.sparse {
            core.sparse_binding = vk::TRUE;
            core.sparse_residency_buffer = vk::TRUE;
            if pick.aliased {
                core.sparse_residency_aliased = vk::TRUE;
            }
        }
        // wgpu chains its own buffer-device-address struct only with the KHR extension (ray
        // tracing); otherwise vmbind enables the core 1.2 feature.
        let wgpu_has_bda = exts.contains(&ash::khr::buffer_device_address::NAME);
        let mut bda = vk::PhysicalDeviceBufferDeviceAddressFeatures::default().buffer_device_address(true);
        let prio = [1.0f32];
        let queues =
            [vk::DeviceQueueCreateInfo::default().queue_family_index(pick.family).queue_priorities(&prio)];
        let pre =
            vk::DeviceCreateInfo::default().queue_create_infos(&queues).enabled_extension_names(&ext_ptrs);
        let mut ci = wgpu_features.add_to_device_create(pre).enabled_features(&core);
        if !wgpu_has_bda {
            ci = ci.push_next(&mut bda);
        }
        // SAFETY: the physical device is the instance's; vmbind's suitability check found the
        // extensions and features enabled here (wgpu's are those it found supported); the
        // create info and its chain live across the call.
        let raw = unsafe { ash_instance.create_device(physical, &ci, None) }
            .map_err(|result| VkError::Call { call: "vkCreateDevice", result })?;
        // SAFETY: the family was created with one queue.
        let raw_queue = unsafe { raw.get_device_queue(pick.family, 0) };
        let owned = raw.clone();
        let destroy: hal::DropCallback = Box::new(move || {
            // SAFETY: wgpu-hal runs this when its device is gone (after everything it made on
            // the device); vmbind's context keeps wgpu's device alive, so it is gone too.
            unsafe { owned.destroy_device(None) }
        });
        // SAFETY: `raw` was created from this adapter with `exts` (a superset of
        // `required_device_extensions(features)`), wgpu's `physical_device_features` (plus
        // features wgpu does not use), one queue of `pick.family`. wgpu-hal moves the callback
        // into its device's drop guard before anything fallible, so on failure too it destroys
        // the device exactly once.
        let open = unsafe {
            hal_adapter.device_from_raw(
                raw.clone(),
                Some(destroy),
                &exts,
                features,
                &limits,
                &memory_hints,
                pick.family,
                0,
            )
        }
        .map_err(|e| WgpuError::Device(e.to_string()))?;
        drop(hal_adapter);
        let desc = wgpu::DeviceDescriptor {
            label: Some("vmbind"),
            required_features: features,
            required_limits: limits,
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints,
            trace: wgpu::Trace::Off,
        };
        // SAFETY: `open` was created from this adapter's hal adapter with exactly `features`.
        let (device, queue) = unsafe { adapter.create_device_from_hal::<Vulkan>(open, &desc) }
            .map_err(|e| WgpuError::Device(e.to_string()))?;
        let parts = RawParts {
            entry,
            instance: ash_instance,
            physical,
            device: raw,
            family: pick.family,
            queue: raw_queue,
            sparse: pick.sparse,
            aliased: pick.sparse && pick.aliased,
            validate: validating,
        };
        let owners = Owners {
            _device: device.clone(),
            _queue: queue.clone(),
            _adapter: adapter.clone(),
            _instance: instance.clone(),
        };
        // SAFETY: the handles are wgpu's live instance, physical device, the device created
        // above (with vmbind's extensions and features) and its queue; `owners` keeps wgpu's
        // device, and through it the instance, alive; the shared queue is documented (module
        // docs) and serialized by `WgpuVk::submit`.
        let vk = unsafe { Vk::from_raw_parts(parts, Box::new(owners)) }?;
        Ok(WgpuVk { vk, device, queue, adapter, instance })
    }

    /// wgpu's Vulkan instance, headless, with the validation layer and `VK_EXT_debug_utils`
    /// when asked for and installed; whether vmbind can collect the layer's messages.
    fn make_instance(want_validation: bool) -> Result<(wgpu::Instance, bool), WgpuError> {
        let flags =
            if want_validation { wgpu::InstanceFlags::VALIDATION } else { wgpu::InstanceFlags::empty() };
        let desc = hal::InstanceDescriptor {
            name: "vmbind",
            flags,
            memory_budget_thresholds: Default::default(),
            backend_options: Default::default(),
            telemetry: None,
            display: None,
        };
        let mut validating = false;
        let add_debug_utils = |args: hal::vulkan::CreateInstanceCallbackArgs<'_, '_, '_>| {
            if !want_validation {
                return;
            }
            let debug_utils = ash::ext::debug_utils::NAME;
            // SAFETY: plain queries on a loaded entry.
            let (layers, exts) = unsafe {
                (
                    args.entry.enumerate_instance_layer_properties().unwrap_or_default(),
                    args.entry.enumerate_instance_extension_properties(None).unwrap_or_default(),
                )
            };
            let has_layer = layers
                .iter()
                .any(|l| l.layer_name_as_c_str().is_ok_and(|n| n == c"VK_LAYER_KHRONOS_validation"));
            let has_ext = exts.iter().any(|e| e.extension_name_as_c_str().is_ok_and(|n| n == debug_utils));
            if has_layer && has_ext {
                if !args.extensions.contains(&debug_utils) {
                    args.extensions.push(debug_utils);
                }
                validating = true;
            }
        };
        // SAFETY: the callback only adds an extension the loader offers.
        let hal_instance =
            unsafe { hal::vulkan::Instance::init_with_callback(&desc, Some(Box::new(add_debug_utils))) }
                .map_err(|e| WgpuError::Instance(e.to_string()))?;
        // SAFETY: a valid instance, handed to wgpu, which owns it from here on.
        let instance = unsafe { wgpu::Instance::from_hal::<Vulkan>(hal_instance) };
        Ok((instance, validating))
    }

    /// The device `Vk::new` would pick, among wgpu's Vulkan adapters.
    fn pick(instance: &wgpu::Instance) -> Result<Pick, WgpuError> {
        let want = std::env::var("VMBIND_VK_DEVICE").ok();
        let rank = |k: wgpu::DeviceType| match k {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Cpu => 3,
            wgpu::DeviceType::Other => 4,
        };
        let mut why = Vec::new();
        let mut best: Option<(u32, Pick)> = None;
        for adapter in block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN)) {
            let info = adapter.get_info();
            if want.as_ref().is_some_and(|w| !info.name.contains(w.as_str())) {
                continue;
            }
            // SAFETY: only queries through the guard, which is dropped in this iteration.
            let Some(hal_adapter) = (unsafe { adapter.as_hal::<Vulkan>() }) else { continue };
            let physical = hal_adapter.raw_physical_device();
            let ash_instance = hal_adapter.shared_instance().raw_instance();
            let (mut missing, sparse_ok, aliased) = Vk::suitability(ash_instance, physical);
            // SAFETY: a query on a live physical device of the instance.
            let families = unsafe { ash_instance.get_physical_device_queue_family_properties(physical) };
            drop(hal_adapter);
            // wgpu takes its queue as universal: graphics and compute; sparse binding as well
            // where the device has sparse buffers.
            let universal = vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE;
            let with_sparse = universal | vk::QueueFlags::SPARSE_BINDING;
            let sparse_family = families.iter().position(|f| f.queue_flags.contains(with_sparse));
            let family = sparse_family
                .filter(|_| sparse_ok)
                .or_else(|| families.iter().position(|f| f.queue_flags.contains(universal)));
            let Some(family) = family else {
                missing.push("a graphics + compute queue");
                why.push(format!("{} lacks {}", info.name, missing.join(", ")));
                continue;
            };
            if !missing.is_empty() {
                why.push(format!("{} lacks {}", info.name, missing.join(", ")));
                continue;
            }
            let sparse = sparse_ok && sparse_family == Some(family);
            let r = rank(info.device_type);
            if best.as_ref().is_none_or(|(b, _)| r < *b) {
                let family = u32::try_from(family).unwrap_or(u32::MAX);
                best = Some((r, Pick { adapter, family, sparse, aliased }));
            }
        }
        best.map(|(_, p)| p).ok_or_else(|| {
            WgpuError::Vk(VkError::NoDevice {
                why: if why.is_empty() { "no Vulkan device".into() } else { why.join("; ") },
            })
        })
    }

    /// vmbind's context on the shared device.
    #[must_use]
    pub fn vk(&self) -> &Arc<Vk> {
        &self.vk
    }

    /// The raw physical device wgpu and vmbind share.
    #[must_use]
    pub fn physical_device(&self) -> vk::PhysicalDevice {
        self.vk.physical
    }

    /// The queue family of the shared queue (index 0 of it is wgpu's and vmbind's queue): graphics
    /// and compute, and sparse binding where [`DeviceInfo::sparse`](crate::vk::DeviceInfo::sparse)
    /// is set.
    #[must_use]
    pub fn queue_family(&self) -> u32 {
        self.vk.family
    }

    /// wgpu's device.
    #[must_use]
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// wgpu's queue: the same `VkQueue` vmbind submits to (module docs); prefer
    /// [`WgpuVk::submit`].
    #[must_use]
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// wgpu's adapter.
    #[must_use]
    pub fn adapter(&self) -> &wgpu::Adapter {
        &self.adapter
    }

    /// wgpu's instance.
    #[must_use]
    pub fn instance(&self) -> &wgpu::Instance {
        &self.instance
    }

    /// Submits wgpu command buffers with vmbind's queue lock held, so that they never reach
    /// the queue at the same time as vmbind's submits.
    ///
    /// # Errors
    /// [`WgpuError::Wgpu`] with the error wgpu reports for the submission (it is captured, not
    /// passed to the device's uncaptured-error handler).
    pub fn submit<I: IntoIterator<Item = wgpu::CommandBuffer>>(
        &self,
        command_buffers: I,
    ) -> Result<wgpu::SubmissionIndex, WgpuError> {
        captured(&self.device, || {
            let _queue = self.vk.queue.lock();
            self.queue.submit(command_buffers)
        })
    }

    /// Waits for every wgpu submission so far (`Device::poll(Wait)`), then submits a global
    /// memory barrier (all commands, all writes → all commands and the host) on the shared queue
    /// and waits for it: afterwards every device write submitted before, by wgpu or vmbind, is
    /// visible to the host (read the arena through [`PhysMem`]) and to every later submission
    /// of either. Writes queued with `Queue::write_buffer` but not yet submitted are not
    /// included.
    ///
    /// # Errors
    /// [`WgpuError::Wgpu`] when the poll fails (device lost); [`VkError::Call`] when recording
    /// or submitting the barrier fails.
    pub fn sync(&self) -> Result<(), WgpuError> {
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| WgpuError::Wgpu(e.to_string()))?;
        let vk = &self.vk;
        let d = &vk.device;
        let cmd = vk.command_buffer()?;
        let recorded = (|| {
            let bi =
                vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
            // SAFETY: a fresh command buffer of vmbind's pool, not pending.
            unsafe { d.begin_command_buffer(cmd, &bi) }
                .map_err(|result| VkError::Call { call: "vkBeginCommandBuffer", result })?;
            let barrier = [vk::MemoryBarrier::default()
                .src_access_mask(vk::AccessFlags::MEMORY_WRITE)
                .dst_access_mask(
                    vk::AccessFlags::MEMORY_READ
                        | vk::AccessFlags::MEMORY_WRITE
                        | vk::AccessFlags::HOST_READ
                        | vk::AccessFlags::HOST_WRITE,
                )];
            // SAFETY: `cmd` is recording.
            unsafe {
                d.cmd_pipeline_barrier(
                    cmd,
                    vk::PipelineStageFlags::ALL_COMMANDS,
                    vk::PipelineStageFlags::ALL_COMMANDS | vk::PipelineStageFlags::HOST,
                    vk::DependencyFlags::empty(),
                    &barrier,
                    &[],
                    &[],
                );
            }
            // SAFETY: `cmd` is recording.
            unsafe { d.end_command_buffer(cmd) }
                .map_err(|result| VkError::Call { call: "vkEndCommandBuffer", result })?;
            vk.submit_wait(cmd)
        })();
        vk.free_command_buffer(cmd);
        Ok(recorded?)
    }

    /// Imports `[offset, offset + len)` of `mem` zero copy ([`HostImport::new`] on
    /// [`WgpuVk::vk`]) and hands it out as a wgpu buffer of `len` bytes.
    ///
    /// # Errors
    /// As [`HostImport::new`] (as [`WgpuError::Vk`]), and as [`WgpuVk::wrap_raw`].
    pub fn import(&self, mem: &Arc<PhysMem>, offset: u64, len: u64) -> Result<WgpuBuffer, WgpuError> {
        let import = Arc::new(HostImport::new(&self.vk, mem, offset, len)?);
        // SAFETY: the import was made just now on this context's device.
        unsafe { self.wrap_host_import(import) }
    }

    /// Hands out chunk `index` of an arena import made on [`WgpuVk::vk`] as a wgpu buffer; the
    /// buffer holds the whole import.
    ///
    /// # Errors
    /// [`WgpuError::BadBuffer`] when the import belongs to another context or there is no such
    /// chunk; as [`WgpuVk::wrap_raw`].
    pub fn arena_chunk(&self, arena: &Arc<ArenaImport>, index: usize) -> Result<WgpuBuffer, WgpuError> {
        if !Arc::ptr_eq(arena.context(), &self.vk) {
            return Err(WgpuError::BadBuffer {
                why: "the arena import belongs to another Vulkan context".into(),
            });
        }
        let Some(chunk) = arena.chunks().get(index) else {
            return Err(WgpuError::BadBuffer {
                why: format!("chunk {index} of an import of {} chunks", arena.chunks().len()),
            });
        };
        let (buffer, size) = (chunk.buffer, chunk.range().1);
        let owner: Arc<dyn Any + Send + Sync> = arena.clone();
        // SAFETY: the chunk's buffer is a live buffer of this device (same context, checked),
        // created STORAGE_BUFFER | TRANSFER_SRC | TRANSFER_DST, `size` bytes, bound to memory;
        // `owner` keeps it (and its arena) alive.
        unsafe { self.wrap_raw(buffer, size, owner, "vmbind arena chunk") }
    }

    /// Hands out a sparse mirror made on [`WgpuVk::vk`] as a wgpu buffer of its window's
    /// length: byte `x` is GPU VA `window start + x` of the mirrored VM, as the driver's sparse
    /// binding shows it. The buffer holds the mirror.
    ///
    /// # Errors
    /// [`WgpuError::BadBuffer`] when the mirror belongs to another context; as
    /// [`WgpuVk::wrap_raw`].
    pub fn mirror(&self, mirror: Arc<crate::vk::SparseMirror>) -> Result<WgpuBuffer, WgpuError> {
        if !Arc::ptr_eq(mirror.context(), &self.vk) {
            return Err(WgpuError::BadBuffer {
                why: "the sparse mirror belongs to another Vulkan context".into(),
            });
        }
        let (buffer, size) = (mirror.buffer(), mirror.window().1);
        // SAFETY: the mirror's sparse buffer is a buffer of this device (same context, checked)
        // made STORAGE_BUFFER | TRANSFER_SRC | TRANSFER_DST (and more), `size` bytes, sparse;
        // the mirror owns it and is held as the owner.
        unsafe { self.wrap_raw(buffer, size, mirror, "vmbind sparse mirror") }
    }

    /// Hands out `import` as a wgpu buffer of its length.
    ///
    /// # Safety
    /// `import` must have been made on [`WgpuVk::vk`] (the same device).
    ///
    /// # Errors
    /// As [`WgpuVk::wrap_raw`].
    pub unsafe fn wrap_host_import(&self, import: Arc<HostImport>) -> Result<WgpuBuffer, WgpuError> {
        let (buffer, size) = (import.buffer, import.range().1);
        // SAFETY: the caller's contract puts the buffer on this device; `HostImport::new`
        // creates it STORAGE_BUFFER | TRANSFER_SRC | TRANSFER_DST, `size` bytes, bound; `owner`
        // keeps it alive.
        unsafe { self.wrap_raw(buffer, size, import, "vmbind host import") }
    }

    /// Hands out any buffer of the shared device as a wgpu buffer of `size` bytes with the
    /// usages `STORAGE | COPY_SRC | COPY_DST`; `owner` (which keeps `buffer` alive, e.g. a
    /// sparse mirror) is held by the returned [`WgpuBuffer`] and by wgpu's record of the buffer,
    /// so it lives until wgpu is done with it. wgpu never destroys `buffer`.
    ///
    /// # Safety
    /// `buffer` must be a buffer of [`WgpuVk::vk`]'s device, of at least `size` bytes, created
    /// with `STORAGE_BUFFER | TRANSFER_SRC | TRANSFER_DST`, bound to memory (or sparse), and
    /// stay valid as long as `owner` lives; nothing may destroy it while `owner` lives.
    ///
    /// # Errors
    /// [`WgpuError::BadBuffer`] for a null handle, a size of 0, not a multiple of 4, or above
    /// the device's `max_buffer_size`; [`WgpuError::Wgpu`] when wgpu refuses the buffer.
    pub unsafe fn wrap_raw(
        &self,
        buffer: vk::Buffer,
        size: u64,
        owner: Arc<dyn Any + Send + Sync>,
        label: &str,
    ) -> Result<WgpuBuffer, WgpuError> {
        let bad = |why: String| Err(WgpuError::BadBuffer { why });
        if buffer == vk::Buffer::null() {
            return bad("a null buffer handle".into());
        }
        if size == 0 || !size.is_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT) {
            return bad(format!("size {size} is 0 or not a multiple of {}", wgpu::COPY_BUFFER_ALIGNMENT));
        }
        let max = self.device.limits().max_buffer_size;
        if size > max {
            return bad(format!("size {size} is above the device's max_buffer_size {max}"));
        }
        let held = owner.clone();
        // SAFETY: the caller's contract keeps the handle valid while `owner` lives, and the
        // callback holds `owner` until wgpu-hal drops its buffer (after the last use).
        let hal_buffer =
            unsafe { hal::vulkan::Buffer::from_raw_externally_owned(buffer, Box::new(move || drop(held))) };
        let desc = wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        };
        let device = &self.device;
        // SAFETY: the hal buffer wraps a buffer of this device (the caller's contract) that
        // allows every usage in `desc`, is `size` > 0 bytes and initialized (its memory is the
        // owner's, whose contents are what they are: wgpu is told nothing needs zeroing).
        let wrapped =
            captured(device, || unsafe { device.create_buffer_from_hal::<Vulkan>(hal_buffer, &desc) })?;
        Ok(WgpuBuffer { buffer: wrapped, size, owner })
    }
}

/// A vmbind buffer handed out as a [`wgpu::Buffer`] (usages `STORAGE | COPY_SRC | COPY_DST`,
/// never mappable); it holds the buffer's owner (the import, and so the arena and the context).
pub struct WgpuBuffer {
    buffer: wgpu::Buffer,
    size: u64,
    owner: Arc<dyn Any + Send + Sync>,
}

impl core::fmt::Debug for WgpuBuffer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("WgpuBuffer").field("size", &self.size).finish()
    }
}

impl WgpuBuffer {
    /// The wgpu buffer (bind it, copy to and from it; do not map it).
    #[must_use]
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Its size in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// What keeps the Vulkan buffer alive: a [`HostImport`], an [`ArenaImport`], or the owner
    /// given to [`WgpuVk::wrap_raw`] (`Arc::downcast` it).
    #[must_use]
    pub fn owner(&self) -> &Arc<dyn Any + Send + Sync> {
        &self.owner
    }
}
