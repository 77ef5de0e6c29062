//! The report's scenarios, one module per layer; each function measures the cases of its layer
//! that the report's filter selects, with the peers in the same interleaved groups.
// The peers' APIs are unsafe (they write raw table memory); every block says why it holds.
#![allow(unsafe_code)]

pub(crate) mod dma;
pub(crate) mod gpuvm;
pub(crate) mod iommu;
pub(crate) mod mem;
pub(crate) mod peers;
pub(crate) mod pt;
pub(crate) mod service;
#[cfg(feature = "vulkan")]
pub(crate) mod sparse;
#[cfg(feature = "vulkan")]
pub(crate) mod vk;
