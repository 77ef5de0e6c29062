//! The Vulkan backend (feature `vulkan`): a real Vulkan device reads vmbind's memory through
//! vmbind's own tables.
//!
//! - [`Vk`]: an ash context (libvulkan loaded at run time) on a device with
//!   `VK_EXT_external_memory_host`, buffer device address and `shaderInt64`, or a typed
//!   [`VkError`] naming what is missing — no loader, no driver, or no device with those.
//! - [`ArenaImport`]: the [`PhysMem`](crate::mem::PhysMem) arena — data pages *and* the page
//!   tables, which live in it — imported as host-pointer buffers, zero copy, in chunks the
//!   device's limits allow; vmbind checks pointer and size against
//!   `minImportedHostPointerAlignment` itself (lavapipe and the old validation layer do not).
//! - [`WalkGather`]: the `walk_gather` compute shader (`shaders/walk_gather.comp`): for each
//!   requested GPU VA page it walks the VM's GPU table (every level, huge leaves, fragment
//!   fields masked, sparse → zeros), translates the DMA address through the IOMMU's table (every
//!   level, huge leaves) or checks a direct device's reach, records faults (VA, stage, reason) the
//!   CPU turns into [`GpuFault`](crate::gpuvm::GpuFault)s, and copies the bytes out.
//! - [`SparseMirror`]: a window of a VM's VA mirrored into a sparse `VkBuffer`, so the
//!   driver's own page tables follow vmbind's: each batch the service commits becomes one
//!   `vkQueueBindSparse` of coalesced `VkSparseMemoryBind` records, and the batch's fences
//!   signal after the driver's fence (the mirror is a service
//!   [`Follower`](crate::service::Follower)). Host-imported arena memory where the driver
//!   really binds it (probed), device memory filled from the arena elsewhere (lavapipe).
//! - [`GpuPopulate`]: `shaders/populate.comp` writes a batch's 4 KiB page-table entries on
//!   the device from a [`PteLog`](crate::pt::PteLog) (linear runs generated, scattered runs
//!   copied from a staged array), bit for bit what the CPU commit writes; as a service
//!   [`PteWriter`](crate::service::PteWriter) it takes the batches above a threshold.
//!
//! Lifetimes are tied by reference counts: an import holds the arena and the context, a
//! gather holds its import, so the arena outlives every import and no buffer outlives its
//! device, whatever order handles are dropped in.
//!
//! The Khronos validation layer is enabled when it is installed and `VMBIND_VALIDATION=1`; its
//! warnings and errors are collected ([`Vk::validation_messages`]) so that tests can fail on
//! them. `VMBIND_VK_DEVICE=substring` picks a device by name; otherwise a GPU is preferred to
//! a CPU implementation.
//!
//! Facts this module relies on (checked on lavapipe, `VULKAN-NOTES.md`): host writes before a
//! submit are visible to it; device writes are visible to the host after the fence, given the
//! shader-write → host-read barrier each command buffer ends with; the device address of
//! imported memory is *not* assumed to equal the host pointer.
// Every Vulkan call is `unsafe`: this module is an edge, each block with its `SAFETY` comment.

mod context;
mod gather;
mod import;
mod mirror;
mod populate;
mod sparse_plan;
mod util;

pub use context::{DeviceInfo, SparseInfo, Vk};
pub use gather::{CopyJob, GatherJob, WalkGather};
pub use import::{ArenaImport, HostImport};
#[cfg(feature = "bench")]
pub(crate) use mirror::DriverBench;
pub use mirror::{MirrorBacking, MirrorStats, SparseMirror};
pub use populate::{Calibration, GpuPopulate, PopulateTiming};

use ash::vk;

/// Errors of the Vulkan backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VkError {
    /// The Vulkan loader (libvulkan) could not be loaded.
    #[error("no Vulkan loader: {0}")]
    NoLoader(String),
    /// No device offers what vmbind needs; `why` lists each device and what it lacks (empty: no
    /// device at all).
    #[error("no usable Vulkan device: {why}")]
    NoDevice {
        /// Per device, what is missing.
        why: String,
    },
    /// A Vulkan call failed.
    #[error("{call} failed: {result}")]
    Call {
        /// The call.
        call: &'static str,
        /// Its result.
        result: vk::Result,
    },
    /// A host range to import is not aligned to the device's `minImportedHostPointerAlignment`.
    #[error("{what} {value:#x} is not a multiple of the device's host-pointer alignment {align:#x}")]
    Misaligned {
        /// Which of pointer offset or length.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The alignment.
        align: u64,
    },
    /// A host range to import is empty, leaves the arena, or is larger than one allocation may
    /// be.
    #[error("cannot import [{offset:#x}, +{len:#x}): {why}")]
    BadRange {
        /// Arena offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Why.
        why: &'static str,
    },
    /// No memory type fits (the host pointer's and the buffer's do not intersect).
    #[error("no memory type for {what}")]
    NoMemoryType {
        /// What was being allocated.
        what: &'static str,
    },
    /// gpu-allocator refused an allocation.
    #[error("allocation of {what} failed: {why}")]
    Alloc {
        /// What was being allocated.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// A gather request is not a page-aligned GPU VA, or there are none, or too many.
    #[error("bad gather request: {0}")]
    BadRequest(String),
    /// The VM to gather from is not in the imported arena.
    #[error("the VM's memory is not the imported arena")]
    OtherArena,
    /// The device cannot hold a sparse mirror.
    #[error("no sparse mirror on this device: {why}")]
    NoSparse {
        /// What it lacks.
        why: &'static str,
    },
    /// The host-import backing was asked for, but the driver does not bind host-imported memory
    /// in a sparse buffer (a bound block read back wrong).
    #[error("{device} accepts host-imported memory in a sparse buffer but binds nothing (read back differs)")]
    SparseHostImportRefused {
        /// The device.
        device: String,
    },
    /// A sparse mirror could not follow the VM (the service's message, or the failed bind).
    #[error("sparse mirror: {0}")]
    Mirror(String),
}

/// Turns a failed `VkResult` into a [`VkError::Call`].
pub(crate) fn call<T>(name: &'static str, r: Result<T, vk::Result>) -> Result<T, VkError> {
    r.map_err(|result| VkError::Call { call: name, result })
}
