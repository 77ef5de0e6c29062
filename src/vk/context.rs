//! [`Vk`]: instance, device, queue, command pool, allocator and the validation messenger.

use std::ffi::{CStr, c_void};
use std::mem::ManuallyDrop;
use std::sync::Arc;

use ash::vk;
use gpu_allocator::vulkan::{Allocator, AllocatorCreateDesc};
use parking_lot::Mutex;

use super::{VkError, call};

/// What the chosen device is and allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `deviceName`.
    pub name: String,
    /// The driver's name and info (`VkPhysicalDeviceDriverProperties`).
    pub driver: String,
    /// Device type (discrete, integrated, CPU, ...).
    pub kind: String,
    /// `apiVersion`, as `major.minor.patch`.
    pub api: String,
    /// `minImportedHostPointerAlignment`.
    pub host_pointer_alignment: u64,
    /// `maxMemoryAllocationSize`.
    pub max_allocation: u64,
    /// `maxComputeWorkGroupCount[0]`.
    pub max_workgroups: u32,
    /// Sparse binding of buffers, when the device offers it (`sparseBinding` and
    /// `sparseResidencyBuffer`, and its queue can bind sparse memory): what
    /// [`SparseMirror`](super::SparseMirror) needs.
    pub sparse: Option<SparseInfo>,
}

/// What a device allows for sparse buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseInfo {
    /// `sparseAddressSpaceSize`: the most bytes of sparse resources (vmbind enforces it; lavapipe
    /// does not).
    pub address_space: u64,
    /// `residencyNonResidentStrict`: unbound ranges read zero and drop writes. Without it reads
    /// of unbound ranges are undefined.
    pub non_resident_strict: bool,
    /// `sparseResidencyAliased`: one memory range may back several places.
    pub aliased: bool,
}

/// A Vulkan context on one device (module docs). Shared as `Arc<Vk>`.
pub struct Vk {
    _entry: ash::Entry,
    instance: ash::Instance,
    debug: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
    /// Written by the messenger callback (its user data points here).
    messages: Box<Mutex<Vec<String>>>,
    pub(crate) device: ash::Device,
    pub(crate) host_memory: ash::ext::external_memory_host::Device,
    /// Submits are externally synchronized per queue.
    pub(crate) queue: Mutex<vk::Queue>,
    pub(crate) pool: Mutex<vk::CommandPool>,
    pub(crate) allocator: ManuallyDrop<Mutex<Allocator>>,
    pub(crate) memory_types: vk::PhysicalDeviceMemoryProperties,
    #[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
    pub(crate) physical: vk::PhysicalDevice,
    /// The queue family of `queue` (compute, and sparse binding where the device has it).
    #[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
    pub(crate) family: u32,
    info: DeviceInfo,
    /// The owner of a device and instance vmbind did not create ([`Vk::from_raw_parts`]): they
    /// are not destroyed here, and this goes after everything vmbind made on them.
    keep_alive: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl core::fmt::Debug for Vk {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vk").field("device", &self.info.name).finish()
    }
}

const VALIDATION: &CStr = c"VK_LAYER_KHRONOS_validation";

/// The messenger callback: keeps warnings and errors.
unsafe extern "system" fn on_message(
    severity: vk::DebugUtilsMessageSeverityFlagsEXT,
    _kind: vk::DebugUtilsMessageTypeFlagsEXT,
    data: *const vk::DebugUtilsMessengerCallbackDataEXT<'_>,
    user: *mut c_void,
) -> vk::Bool32 {
    let keep = vk::DebugUtilsMessageSeverityFlagsEXT::WARNING | vk::DebugUtilsMessageSeverityFlagsEXT::ERROR;
    if severity.intersects(keep) && !data.is_null() && !user.is_null() {
        // SAFETY: the layer passes a valid callback-data struct for the call's duration; its
        // message is a NUL-terminated string or null.
        let msg = unsafe {
            let d = &*data;
            if d.p_message.is_null() {
                String::from("(no message)")
            } else {
                CStr::from_ptr(d.p_message).to_string_lossy().into_owned()
            }
        };
        // SAFETY: `user` is the `Box<Mutex<Vec<String>>>` of the `Vk` that created the
        // messenger, which destroys the messenger before the box.
        let sink = unsafe { &*user.cast::<Mutex<Vec<String>>>() };
        sink.lock().push(format!("{severity:?}: {msg}"));
    }
    vk::FALSE
}

/// The debug messenger collecting warnings and errors into `messages` (`None` if it cannot be
/// made). The instance must have `VK_EXT_debug_utils`; `messages` must outlive the messenger.
fn messenger(
    entry: &ash::Entry,
    instance: &ash::Instance,
    messages: &Mutex<Vec<String>>,
) -> Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)> {
    let du = ash::ext::debug_utils::Instance::new(entry, instance);
    let ci = vk::DebugUtilsMessengerCreateInfoEXT::default()
        .message_severity(
            vk::DebugUtilsMessageSeverityFlagsEXT::WARNING | vk::DebugUtilsMessageSeverityFlagsEXT::ERROR,
        )
        .message_type(
            vk::DebugUtilsMessageTypeFlagsEXT::GENERAL
                | vk::DebugUtilsMessageTypeFlagsEXT::VALIDATION
                | vk::DebugUtilsMessageTypeFlagsEXT::PERFORMANCE,
        )
        .pfn_user_callback(Some(on_message))
        .user_data((&raw const *messages).cast_mut().cast());
    // SAFETY: the instance has VK_EXT_debug_utils (the callers enable it with the layer); the
    // user data outlives the messenger (the callers' `Drop` destroys it first).
    unsafe { du.create_debug_utils_messenger(&ci, None) }.ok().map(|m| (du, m))
}

fn version(v: u32) -> String {
    format!("{}.{}.{}", vk::api_version_major(v), vk::api_version_minor(v), vk::api_version_patch(v))
}

/// What a failed [`Vk::open`] hands back to be destroyed: the error, the instance, the messenger.
type Unopened =
    (VkError, ash::Instance, Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>);

/// A candidate device and what it lacks.
struct Candidate {
    physical: vk::PhysicalDevice,
    name: String,
    kind: vk::PhysicalDeviceType,
    family: Option<u32>,
    /// sparseBinding + sparseResidencyBuffer and a family that has both compute and sparse.
    sparse: bool,
    /// sparseResidencyAliased.
    aliased: bool,
    missing: Vec<&'static str>,
}

impl Vk {
    /// A context on the best device that offers host-memory import, buffer device address and
    /// 64-bit integers in shaders.
    ///
    /// # Errors
    /// [`VkError::NoLoader`] without libvulkan, [`VkError::NoDevice`] naming what each device
    /// lacks, [`VkError::Call`] when instance or device creation fails.
    pub fn new() -> Result<Arc<Self>, VkError> {
        // SAFETY: loading libvulkan runs its initialisers; nothing else is assumed of it.
        let entry = unsafe { ash::Entry::load() }.map_err(|e| VkError::NoLoader(e.to_string()))?;
        // SAFETY: plain queries on a loaded entry.
        let layers = unsafe { entry.enumerate_instance_layer_properties() }.unwrap_or_default();
        let want_validation = std::env::var("VMBIND_VALIDATION").is_ok_and(|v| v == "1");
        let has_validation = layers.iter().any(|l| l.layer_name_as_c_str().is_ok_and(|n| n == VALIDATION));
        let validation = want_validation && has_validation;
        let app = vk::ApplicationInfo::default().application_name(c"vmbind").api_version(vk::API_VERSION_1_2);
        let layer_names = [VALIDATION.as_ptr()];
        let ext_names = [ash::ext::debug_utils::NAME.as_ptr()];
        let mut info = vk::InstanceCreateInfo::default().application_info(&app);
        if validation {
            info = info.enabled_layer_names(&layer_names).enabled_extension_names(&ext_names);
        }
        // SAFETY: the create info and everything it points to live across the call.
        let instance = call("vkCreateInstance", unsafe { entry.create_instance(&info, None) })?;
        let messages: Box<Mutex<Vec<String>>> = Box::new(Mutex::new(Vec::new()));
        let debug = if validation { messenger(&entry, &instance, &messages) } else { None };
        match Self::open(entry, instance, debug, messages) {
            Ok(vk) => Ok(Arc::new(vk)),
            Err(failed) => {
                let (e, instance, debug) = *failed;
                // SAFETY: nothing made from the instance is alive.
                unsafe {
                    if let Some((du, m)) = debug {
                        du.destroy_debug_utils_messenger(m, None);
                    }
                    instance.destroy_instance(None);
                }
                Err(e)
            }
        }
    }

    /// Picks the device and creates everything on it; hands the instance back on failure.
    fn open(
        entry: ash::Entry,
        instance: ash::Instance,
        debug: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
        messages: Box<Mutex<Vec<String>>>,
    ) -> Result<Self, Box<Unopened>> {
        macro_rules! bail {
            ($e:expr) => {
                return Err(Box::new(($e, instance, debug)))
            };
        }
        // SAFETY: queries on a live instance.
        let physicals = match unsafe { instance.enumerate_physical_devices() } {
            Ok(p) => p,
            Err(result) => bail!(VkError::Call { call: "vkEnumeratePhysicalDevices", result }),
        };
        let mut cands: Vec<Candidate> = physicals.iter().map(|&p| Self::examine(&instance, p)).collect();
        if let Ok(want) = std::env::var("VMBIND_VK_DEVICE") {
            cands.retain(|c| c.name.contains(&want));
        }
        let rank = |k: vk::PhysicalDeviceType| match k {
            vk::PhysicalDeviceType::DISCRETE_GPU => 0,
            vk::PhysicalDeviceType::INTEGRATED_GPU => 1,
            vk::PhysicalDeviceType::VIRTUAL_GPU => 2,
            vk::PhysicalDeviceType::CPU => 3,
            _ => 4,
        };
        let Some(best) = cands
            .iter()
            .filter(|c| c.missing.is_empty())
            .min_by_key(|c| rank(c.kind))
            .map(|c| (c.physical, c.family, c.sparse, c.aliased))
        else {
            let why = cands
                .iter()
                .map(|c| format!("{} lacks {}", c.name, c.missing.join(", ")))
                .collect::<Vec<_>>();
            bail!(VkError::NoDevice {
                why: if why.is_empty() { "no Vulkan device".into() } else { why.join("; ") }
            });
        };
        let (physical, Some(family), sparse, aliased) = best else {
            bail!(VkError::NoDevice { why: "no compute queue".into() })
        };
        let prio = [1.0f32];
        let queues =
            [vk::DeviceQueueCreateInfo::default().queue_family_index(family).queue_priorities(&prio)];
        let exts = [ash::ext::external_memory_host::NAME.as_ptr()];
        let mut f12 = vk::PhysicalDeviceVulkan12Features::default().buffer_device_address(true);
        let mut f2 = vk::PhysicalDeviceFeatures2::default()
            .features(
                vk::PhysicalDeviceFeatures::default()
                    .shader_int64(true)
                    .sparse_binding(sparse)
                    .sparse_residency_buffer(sparse)
                    .sparse_residency_aliased(sparse && aliased),
            )
            .push_next(&mut f12);
        let ci = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queues)
            .enabled_extension_names(&exts)
            .push_next(&mut f2);
        // SAFETY: the physical device is the instance's; the create info lives across the call.
        let device = match unsafe { instance.create_device(physical, &ci, None) } {
            Ok(d) => d,
            Err(result) => bail!(VkError::Call { call: "vkCreateDevice", result }),
        };
        let fail = |device: &ash::Device| {
            // SAFETY: nothing made from the device is alive.
            unsafe { device.destroy_device(None) }
        };
        // SAFETY: the family was created with one queue.
        let queue = unsafe { device.get_device_queue(family, 0) };
        let (pool, allocator, info, memory_types) =
            match Self::own_objects(&instance, &device, physical, family, sparse, aliased) {
                Ok(o) => o,
                Err(e) => {
                    fail(&device);
                    bail!(e);
                }
            };
        let host_memory = ash::ext::external_memory_host::Device::new(&instance, &device);
        Ok(Vk {
            _entry: entry,
            instance,
            debug,
            messages,
            device,
            host_memory,
            queue: Mutex::new(queue),
            pool: Mutex::new(pool),
            allocator: ManuallyDrop::new(Mutex::new(allocator)),
            memory_types,
            physical,
            family,
            info,
            keep_alive: None,
        })
    }

    /// What vmbind makes on a device, whoever created it: its command pool, its allocator, the
    /// device's description (sparse as enabled) and memory types. On failure nothing of it
    /// is left.
    fn own_objects(
        instance: &ash::Instance,
        device: &ash::Device,
        physical: vk::PhysicalDevice,
        family: u32,
        sparse: bool,
        aliased: bool,
    ) -> Result<(vk::CommandPool, Allocator, DeviceInfo, vk::PhysicalDeviceMemoryProperties), VkError> {
        let pci = vk::CommandPoolCreateInfo::default()
            .queue_family_index(family)
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        // SAFETY: a live device of `instance`.
        let pool = call("vkCreateCommandPool", unsafe { device.create_command_pool(&pci, None) })?;
        let allocator = match Allocator::new(&AllocatorCreateDesc {
            instance: instance.clone(),
            device: device.clone(),
            physical_device: physical,
            debug_settings: Default::default(),
            buffer_device_address: true,
            allocation_sizes: Default::default(),
        }) {
            Ok(a) => a,
            Err(e) => {
                // SAFETY: the pool is unused.
                unsafe { device.destroy_command_pool(pool, None) };
                return Err(VkError::Alloc { what: "the allocator", why: e.to_string() });
            }
        };
        let mut info = Self::describe(instance, physical);
        if !sparse {
            info.sparse = None;
        }
        if let Some(si) = &mut info.sparse {
            si.aliased = aliased;
        }
        // SAFETY: a query on a live physical device.
        let memory_types = unsafe { instance.get_physical_device_memory_properties(physical) };
        Ok((pool, allocator, info, memory_types))
    }

    /// Whether a device has what vmbind needs, and its compute queue family.
    fn examine(instance: &ash::Instance, p: vk::PhysicalDevice) -> Candidate {
        // SAFETY: queries on a live physical device of `instance`.
        let (props, exts, families) = unsafe {
            (
                instance.get_physical_device_properties(p),
                instance.enumerate_device_extension_properties(p).unwrap_or_default(),
                instance.get_physical_device_queue_family_properties(p),
            )
        };
        let name =
            props.device_name_as_c_str().map_or_else(|_| "?".into(), |s| s.to_string_lossy().into_owned());
        let mut missing = Vec::new();
        let mut sparse_features = false;
        let mut aliased = false;
        if props.api_version < vk::API_VERSION_1_2 {
            missing.push("Vulkan 1.2");
        }
        let host = ash::ext::external_memory_host::NAME;
        if !exts.iter().any(|e| e.extension_name_as_c_str().is_ok_and(|n| n == host)) {
            missing.push("VK_EXT_external_memory_host");
        }
        if props.api_version >= vk::API_VERSION_1_2 {
            let mut f12 = vk::PhysicalDeviceVulkan12Features::default();
            let mut f2 = vk::PhysicalDeviceFeatures2::default().push_next(&mut f12);
            // SAFETY: a 1.2 device; the chain lives across the call.
            unsafe { instance.get_physical_device_features2(p, &mut f2) };
            let int64 = f2.features.shader_int64 == vk::TRUE;
            sparse_features =
                f2.features.sparse_binding == vk::TRUE && f2.features.sparse_residency_buffer == vk::TRUE;
            aliased = f2.features.sparse_residency_aliased == vk::TRUE;
            if f12.buffer_device_address != vk::TRUE {
                missing.push("bufferDeviceAddress");
            }
            if !int64 {
                missing.push("shaderInt64");
            }
        }
        // A family that computes and binds sparse memory, else one that computes.
        let both = vk::QueueFlags::COMPUTE | vk::QueueFlags::SPARSE_BINDING;
        let sparse_family = families.iter().position(|f| f.queue_flags.contains(both));
        let family = sparse_family
            .filter(|_| sparse_features)
            .or_else(|| families.iter().position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE)))
            .map(|i| i as u32);
        if family.is_none() {
            missing.push("a compute queue");
        }
        let sparse = sparse_features && sparse_family.is_some();
        Candidate { physical: p, name, kind: props.device_type, family, sparse, aliased, missing }
    }

    fn describe(instance: &ash::Instance, p: vk::PhysicalDevice) -> DeviceInfo {
        let mut host = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
        let mut m3 = vk::PhysicalDeviceMaintenance3Properties::default();
        let mut drv = vk::PhysicalDeviceDriverProperties::default();
        let mut p2 = vk::PhysicalDeviceProperties2::default()
            .push_next(&mut host)
            .push_next(&mut m3)
            .push_next(&mut drv);
        // SAFETY: a 1.2 device (checked); the chain lives across the call.
        unsafe { instance.get_physical_device_properties2(p, &mut p2) };
        let props = p2.properties;
        let s = |c: Result<&CStr, _>| {
            c.map_or_else(
                |_: core::ffi::FromBytesUntilNulError| String::new(),
                |c: &CStr| c.to_string_lossy().into_owned(),
            )
        };
        let driver = format!("{} {}", s(drv.driver_name_as_c_str()), s(drv.driver_info_as_c_str()));
        DeviceInfo {
            name: s(props.device_name_as_c_str()),
            driver: driver.trim().to_string(),
            kind: format!("{:?}", props.device_type),
            api: version(props.api_version),
            host_pointer_alignment: host.min_imported_host_pointer_alignment.max(1),
            max_allocation: m3.max_memory_allocation_size,
            max_workgroups: props.limits.max_compute_work_group_count[0],
            sparse: Some(SparseInfo {
                address_space: props.limits.sparse_address_space_size,
                non_resident_strict: props.sparse_properties.residency_non_resident_strict == vk::TRUE,
                aliased: false,
            }),
        }
    }

    /// The device.
    #[must_use]
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The device's name.
    #[must_use]
    pub fn device_name(&self) -> &str {
        &self.info.name
    }

    /// Whether the validation layer is on.
    #[must_use]
    pub fn validating(&self) -> bool {
        self.debug.is_some()
    }

    /// The validation layer's warnings and errors so far (empty when it is off).
    #[must_use]
    pub fn validation_messages(&self) -> Vec<String> {
        self.messages.lock().clone()
    }

    /// A memory type index in `bits` with `flags`.
    pub(crate) fn memory_type(&self, bits: u32, flags: vk::MemoryPropertyFlags) -> Option<u32> {
        let t = &self.memory_types;
        (0..t.memory_type_count)
            .find(|&i| bits & (1 << i) != 0 && t.memory_types[i as usize].property_flags.contains(flags))
    }

    /// Submits one command buffer and waits for it.
    pub(crate) fn submit_wait(&self, cmd: vk::CommandBuffer) -> Result<(), VkError> {
        let fci = vk::FenceCreateInfo::default();
        // SAFETY: a live device.
        let fence = call("vkCreateFence", unsafe { self.device.create_fence(&fci, None) })?;
        let cmds = [cmd];
        let submit = [vk::SubmitInfo::default().command_buffers(&cmds)];
        let r = {
            let q = self.queue.lock();
            // SAFETY: the queue is externally synchronized by its lock; the command buffer is
            // recorded and not pending (its previous submit was waited for).
            unsafe { self.device.queue_submit(*q, &submit, fence) }
        };
        let r = call("vkQueueSubmit", r).and_then(|()| {
            // SAFETY: the fence belongs to this device.
            let waited = unsafe { self.device.wait_for_fences(&[fence], true, u64::MAX) };
            call("vkWaitForFences", waited)
        });
        // SAFETY: the fence is signaled (or was never submitted).
        unsafe { self.device.destroy_fence(fence, None) };
        r
    }

    /// A primary command buffer from the pool.
    pub(crate) fn command_buffer(&self) -> Result<vk::CommandBuffer, VkError> {
        let pool = self.pool.lock();
        let ai = vk::CommandBufferAllocateInfo::default()
            .command_pool(*pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(1);
        // SAFETY: the pool is externally synchronized by its lock.
        let v = call("vkAllocateCommandBuffers", unsafe { self.device.allocate_command_buffers(&ai) })?;
        Ok(v[0])
    }

    /// Returns a command buffer that is not pending to the pool.
    pub(crate) fn free_command_buffer(&self, cmd: vk::CommandBuffer) {
        let pool = self.pool.lock();
        // SAFETY: the buffer came from this pool and is not pending.
        unsafe { self.device.free_command_buffers(*pool, &[cmd]) };
    }
}

#[cfg(feature = "wgpu")]
impl Vk {
    /// What [`Vk::new`] finds `p` lacks (empty: usable), and whether it has sparse buffers
    /// (the features and a compute + sparse family) and sparse aliasing.
    pub(crate) fn suitability(
        instance: &ash::Instance,
        p: vk::PhysicalDevice,
    ) -> (Vec<&'static str>, bool, bool) {
        let c = Self::examine(instance, p);
        (c.missing, c.sparse, c.aliased)
    }

    /// A context on a device someone else created: vmbind's own command pool, allocator and
    /// (with `validate`) messenger on it, destroyed on drop before `keep_alive` is released;
    /// the device and instance themselves are never destroyed here.
    ///
    /// # Safety
    /// `parts` must be live handles of one instance, its physical device, a device created on it
    /// as `RawParts::device` says, and a queue of `family` on it; `keep_alive` must keep all
    /// of them alive until it is dropped. vmbind locks [`Vk::queue`] around its submits; the
    /// owner must not use the queue at the same time.
    pub(crate) unsafe fn from_raw_parts(
        parts: crate::wgpu_interop::RawParts,
        keep_alive: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<Arc<Self>, VkError> {
        let crate::wgpu_interop::RawParts {
            entry,
            instance,
            physical,
            device,
            family,
            queue,
            sparse,
            aliased,
            validate,
        } = parts;
        let messages: Box<Mutex<Vec<String>>> = Box::new(Mutex::new(Vec::new()));
        let debug = if validate { messenger(&entry, &instance, &messages) } else { None };
        let undo_debug = |debug: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>| {
            if let Some((du, m)) = debug {
                // SAFETY: the messenger is unused from here on.
                unsafe { du.destroy_debug_utils_messenger(m, None) };
            }
        };
        let (pool, allocator, info, memory_types) =
            match Self::own_objects(&instance, &device, physical, family, sparse, aliased) {
                Ok(o) => o,
                Err(e) => {
                    undo_debug(debug);
                    return Err(e);
                }
            };
        let host_memory = ash::ext::external_memory_host::Device::new(&instance, &device);
        Ok(Arc::new(Vk {
            _entry: entry,
            instance,
            debug,
            messages,
            device,
            host_memory,
            queue: Mutex::new(queue),
            pool: Mutex::new(pool),
            allocator: ManuallyDrop::new(Mutex::new(allocator)),
            memory_types,
            physical,
            family,
            info,
            keep_alive: Some(keep_alive),
        }))
    }
}

impl Drop for Vk {
    fn drop(&mut self) {
        let owned = self.keep_alive.is_none();
        // SAFETY: every import and job holds an `Arc<Vk>`, so none is alive: the device is idle
        // of vmbind's work. The allocator goes before the device, the messenger before the
        // instance and before the message box it writes to. A borrowed device and instance
        // (`keep_alive`) are left to their owner.
        unsafe {
            let _ = self.device.device_wait_idle();
            ManuallyDrop::drop(&mut self.allocator);
            self.device.destroy_command_pool(*self.pool.get_mut(), None);
            if owned {
                self.device.destroy_device(None);
            }
            if let Some((du, m)) = self.debug.take() {
                du.destroy_debug_utils_messenger(m, None);
            }
            if owned {
                self.instance.destroy_instance(None);
            }
        }
        // The owner of a borrowed device last, after everything vmbind made on it.
        drop(self.keep_alive.take());
    }
}
