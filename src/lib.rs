//! # vmbind
//!
//! Populate GPU page tables from DMA-mapped memory, fast: a userspace model, at full speed, of
//! what the Linux kernel does to let a device reach memory — the two-step DMA API on a software
//! IOMMU, batched `bio_vec` mapping with one radix walk, a drm_gpuvm-style GPU VM manager whose
//! tables fill like NVMe PRP lists, VM_BIND-style bind queues, and Vulkan import.
//!
//! Layers, each using only those above it in this list (see `DESIGN.md`):
//!
//! - [`addr`]: address newtypes and page sizes;
//! - [`mem`]: [`mem::PhysMem`], the arena of "physical memory", and [`mem::BioVec`];
//! - [`pt`]: the one radix page-table engine, generic over an entry [`pt::Format`];
//! - [`iommu`]: the software IOMMU: domains, devices, IOVA allocator, IOTLB, faults;
//! - [`dma`]: the DMA API: devices, the two-step IOVA API, one-shot and scatter-gather mapping,
//!   [`dma::DmaVec`];
//! - [`nvme`]: PRP lists (and SGLs) built from a `DmaVec`, and controller-side decoders;
//! - [`gpuvm`]: the GPU VM manager: its pure core, [`gpuvm::VaSpace`] (drm_gpuvm's
//!   split/merge), and [`gpuvm::Vm`] (buffer objects, prepare-then-commit binds into a GPU page
//!   table, the two-stage GPU access);
//! - [`service`]: the population service: independent bind queues over GPU VMs, worker threads
//!   that coalesce them, fences that signal when a change is visible, metrics;
//! - [`workload`]: workloads as versioned JSON lines, checked whole, replayed through the
//!   service ([`workload::Replay`]) and recorded from the runtime;
//! - [`runtime`]: the API compute runtimes know (reserve, granularity, memory handles,
//!   map-with-access, sub-range unmap, sparse, repeat), blocking or on a stream;
//! - `vk` (feature `vulkan`): the arena imported into a real Vulkan device, and the GPU's
//!   two-stage walk in a compute shader;
//! - `bench` (feature `bench`): the benchmark scenarios `benches/report.rs` and `vmbind bench`
//!   share, with the peers measured in the same run.
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod addr;
#[cfg(feature = "bench")]
pub mod bench;
pub mod dma;
pub mod gpuvm;
mod hash;
pub mod iommu;
pub mod mem;
pub mod nvme;
pub mod pt;
pub mod runtime;
pub mod service;
mod svg;
mod sync;
#[cfg(feature = "vulkan")]
pub mod vk;
#[cfg(feature = "wgpu")]
pub mod wgpu_interop;
pub mod workload;

/// The README's examples, compiled and run as doc tests so the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
