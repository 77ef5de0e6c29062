//! The DMA layer: how a driver turns physical memory into addresses its device can use.
//!
//! - [`Device`]: a device and how it reaches memory — through an IOMMU domain (translated), or
//!   directly (DMA address = physical address, below an address-width limit).
//! - The **two-step API** of Linux 6.16+ (REFERENCES.md §1), [`IovaState`]: reserve IOVA once
//!   ([`IovaState::try_alloc`]), link many physical ranges into it without flushing
//!   ([`IovaState::link`], or a whole `bio_vec` array in ONE call and ONE table walk with
//!   [`IovaState::link_bvecs`]), flush once ([`IovaState::sync`]), then [`IovaState::unlink`] /
//!   [`IovaState::destroy`] / [`IovaState::free`].
//! - The **one-shot API**: [`Device::map_phys`] / [`Device::map_page`] / [`Device::unmap`], and
//!   [`Device::map_sg`] which maps a `bio_vec` array into one IOVA range and returns the merged
//!   [`DmaVec`] ("scatterlist v2": the in-memory `(dma_addr, len)` list).
//!
//! The granule is 4 KiB. Every rule violation is a typed [`DmaError`] that changes nothing.
//!
//! A [`Device`] follows its device's attachment: every call resolves the domain the device is
//! attached to *now*, so after a detach every map fails with [`DmaError::NotAttached`] and after
//! a re-attach maps go into the new domain. Everything the layer keeps per device — the records
//! of one-shot mappings, bounce buffers — belongs to the device, not to the handle: every
//! translated `Device` of one device id sees the same state (it lives with the IOMMU's record of
//! the device). A direct device has no registry: its clones share its state, and a second
//! `Device::direct` of the same id is another device as far as the records go.
//!
//! # Misuse checks (Linux's dma-debug, always on)
//!
//! Every one-shot mapping records, in its IOVA allocation's live record (no extra lookup), the
//! device, the direction, the kind of call that made it ([`MapKind`]), the in-page offset of
//! the handle and the exact size. `unmap`, `unmap_sg` and the `sync_*` calls check the handle
//! against it and refuse, naming both sides and changing nothing:
//!
//! | dma-debug says | vmbind returns |
//! |---|---|
//! | "device driver tries to free DMA memory it has not allocated" | [`DmaError::NotMapped`] |
//! | "… frees DMA memory with different size" | [`DmaError::SizeMismatch`] |
//! | "… frees DMA memory with different direction" | [`DmaError::DirectionMismatch`] |
//! | "… frees DMA memory with wrong function" | [`DmaError::KindMismatch`] |
//! | (a handle of another device) | [`DmaError::OtherDevice`] |
//! | "… syncs DMA memory outside allocated range" | [`DmaError::SyncOutOfRange`] |
//! | "… syncs DMA memory with different direction" | [`DmaError::DirectionMismatch`] |
//!
//! Direct devices keep the same records in the device's own state.
//!
//! A block driver's sequence, with its fallback for a device without IOMMU translation:
//!
//! ```
//! use std::sync::Arc;
//! use vmbind::addr::PAGE_SIZE;
//! use vmbind::dma::{Attrs, Device, Direction, DmaVec, IovaState};
//! use vmbind::iommu::{DeviceId, DomainConfig, Iommu};
//! use vmbind::mem::{BioVec, PhysMem};
//!
//! let mem = Arc::new(PhysMem::new(64 << 20)?);
//! let iommu = Iommu::new(mem.clone());
//! let dom = iommu.create_domain(DomainConfig::default())?;
//! iommu.register_device(DeviceId(1), true)?;
//! iommu.attach(DeviceId(1), &dom)?;
//! let nvme = Device::translated(&iommu, DeviceId(1))?;
//!
//! // A request: 16 scattered pages.
//! let bvecs = BioVec::from_frames(&mem.alloc_scattered(16, 1)?);
//! let len: u64 = bvecs.iter().map(|b| u64::from(b.len)).sum();
//! let dir = Direction::ToDevice;
//!
//! let segments = match IovaState::try_alloc(&nvme, bvecs[0].start().unwrap(), len)? {
//!     Some(mut state) => {
//!         // Step two: the whole array enters the IOMMU table in one call, then one flush.
//!         state.link_bvecs(&nvme, 0, &bvecs, dir, Attrs::default())?;
//!         state.sync(&nvme, 0, len)?;
//!         let one = DmaVec::from_segment(state.addr(), len)?; // ONE segment for the device
//!         // ... the device does its I/O ...
//!         state.destroy(&nvme, len, dir, Attrs::default())?;
//!         one
//!     }
//!     // No translation (direct device): map segment by segment.
//!     None => {
//!         let v = nvme.map_sg(&bvecs, dir, Attrs::default())?;
//!         nvme.unmap_sg(&v, dir, Attrs::default())?;
//!         v
//!     }
//! };
//! assert_eq!(segments.total_len(), 16 * PAGE_SIZE);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod blk;
mod bounce;
mod device;
mod dmavec;
mod iova_state;
mod record;

pub use blk::BlkRqMapping;
pub use device::{Device, DirectMap};
pub use dmavec::{DmaSeg, DmaVec, PageAddrs};
pub use iova_state::IovaState;

use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr, Span, SpanError};
use crate::iommu::{DeviceId, DomainError};
use crate::mem::BioVec;
use crate::pt::{MapSource, Prot};

/// The IOMMU granule (and the CPU page size of the model).
pub const GRANULE: u64 = PAGE_SIZE;

/// The table source for granule-expanded segments: the one-pass page array when every segment
/// is a single page (the usual case), the general form otherwise.
fn granule_source(expanded: &[BioVec]) -> MapSource<'_> {
    if expanded.iter().all(|b| u64::from(b.len) == GRANULE) {
        MapSource::PageVecs(expanded)
    } else {
        MapSource::BioVecs(expanded)
    }
}

/// The checked physical range of a request ([`crate::addr::Span`]): [`DmaError::ZeroSize`] for
/// zero bytes, [`DmaError::Overflow`] when it wraps.
fn phys_span(phys: PhysAddr, size: u64) -> Result<Span<PhysAddr>, DmaError> {
    Span::new(phys, size).map_err(|e| match e {
        SpanError::Empty { .. } => DmaError::ZeroSize,
        _ => DmaError::Overflow { phys, size },
    })
}

#[inline]
fn align_up(x: u64) -> Option<u64> {
    x.checked_add(GRANULE - 1).map(|v| v & !(GRANULE - 1))
}

/// Which call made a mapping, as dma-debug tells `dma_map_single`/`page` from `dma_map_sg`: a
/// mapping must be undone by the matching call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// [`Device::map_phys`] / [`Device::map_page`], undone by [`Device::unmap`].
    Single,
    /// [`Device::map_sg`] (its IOVA range, or each bounced piece), undone by
    /// [`Device::unmap_sg`].
    Sg,
    /// An [`IovaState`] (two-step API, block requests), undone through the state.
    TwoStep,
}

/// Which way the data moves; it sets the IOMMU permissions of the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Memory to device: the device may only read.
    ToDevice,
    /// Device to memory: the device may only write.
    FromDevice,
    /// Both.
    Bidirectional,
}

impl Direction {
    /// The permissions a mapping in this direction gets.
    #[must_use]
    pub const fn prot(self) -> Prot {
        match self {
            Direction::ToDevice => Prot::READ,
            Direction::FromDevice => Prot::WRITE,
            Direction::Bidirectional => Prot::RW,
        }
    }
}

/// DMA attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attrs {
    /// The caller keeps the CPU caches coherent itself (`DMA_ATTR_SKIP_CPU_SYNC`). The model's
    /// memory is coherent, so this only skips work the bounce path would do.
    pub skip_cpu_sync: bool,
    /// The physical address is MMIO of a peer device (`DMA_ATTR_MMIO`, peer-to-peer). Linux maps
    /// it only directly, by bus address; the IOVA paths reject it.
    pub mmio: bool,
}

/// Errors of the DMA layer. A failed call changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// A zero-size request.
    #[error("zero-size DMA request")]
    ZeroSize,
    /// An address range that wraps.
    #[error("[{phys}, +{size:#x}) overflows")]
    Overflow {
        /// Start.
        phys: PhysAddr,
        /// Size.
        size: u64,
    },
    /// The device is registered with the IOMMU but attached to no domain.
    #[error("{0} is not attached to a domain")]
    NotAttached(DeviceId),
    /// The device is attached to an identity domain: it is a direct device.
    #[error("{0} is attached to an identity domain; use Device::direct")]
    IdentityDomain(DeviceId),
    /// An in-place direct mapping ([`Device::map_direct`]) asked of a device that translates.
    #[error("{0} reaches memory through an IOMMU: it has no direct mapping")]
    NotDirect(DeviceId),
    /// A direct device cannot reach the address with its address width.
    #[error("a direct device with {bits}-bit addressing cannot reach [{phys}, +{size:#x})")]
    AddressLimit {
        /// Start.
        phys: PhysAddr,
        /// Size.
        size: u64,
        /// The device's address width.
        bits: u32,
    },
    /// A bad address width.
    #[error("address width {0} must be 12..=64 bits")]
    BadAddressWidth(u32),
    /// A link after the first starts off a granule boundary (Linux: -EIO), or a first link
    /// whose in-page offset is not the one the state was reserved with.
    #[error(
        "link at offset {offset:#x}: {phys} is not granule aligned (only the first link may be, with the reservation's in-page offset)"
    )]
    UnalignedLink {
        /// The link's offset in the state.
        offset: u64,
        /// Its physical address.
        phys: PhysAddr,
    },
    /// A link lands where a previous link ended off a granule boundary: every link but the last
    /// must be granule sized.
    #[error("link at offset {offset:#x} follows a link that was not a granule multiple")]
    NotGranuleMultiple {
        /// The offending link's offset.
        offset: u64,
    },
    /// A link beyond the reserved size.
    #[error("link [{offset:#x}, +{size:#x}) exceeds the reserved {reserved:#x} bytes")]
    BeyondReserved {
        /// Offset.
        offset: u64,
        /// Size.
        size: u64,
        /// Bytes reserved by try_alloc.
        reserved: u64,
    },
    /// Linking twice over the same offset.
    #[error("offset {offset:#x} is already linked")]
    AlreadyLinked {
        /// An offset found linked.
        offset: u64,
    },
    /// Freeing IOVA that still has links.
    #[error("{bytes:#x} bytes are still linked")]
    StillLinked {
        /// Bytes of IOVA still mapped.
        bytes: u64,
    },
    /// Using a state after destroy or free.
    #[error("the IOVA state was already destroyed or freed")]
    UseAfterDestroy,
    /// A state used with a device of another domain.
    #[error("{0} does not translate through this state's domain")]
    WrongDevice(DeviceId),
    /// Peer-to-peer MMIO on an IOVA path.
    #[error("peer-to-peer MMIO at {0} can only be mapped directly, by bus address")]
    PeerToPeer(PhysAddr),
    /// An untrusted device's partial page that is not arena memory cannot be bounced.
    #[error("[{phys}, +{size:#x}) is not arena memory and cannot be bounced")]
    OutsideArena {
        /// Start.
        phys: PhysAddr,
        /// Size.
        size: u64,
    },
    /// No frame for a bounce buffer.
    #[error("no memory for a bounce buffer")]
    BounceExhausted,
    /// Unmapping or syncing something that was not mapped (dma-debug: "device driver tries to
    /// free DMA memory it has not allocated").
    #[error("{dma} (+{size:#x}) is not mapped for this device")]
    NotMapped {
        /// The DMA address given.
        dma: DmaAddr,
        /// Size given.
        size: u64,
    },
    /// An unmap with another size than the mapping's ("frees DMA memory with different size").
    #[error("{dma}: mapped with {mapped:#x} bytes, unmapped with {unmapped:#x}")]
    SizeMismatch {
        /// The handle.
        dma: DmaAddr,
        /// Size of the mapping.
        mapped: u64,
        /// Size given.
        unmapped: u64,
    },
    /// An unmap or sync with another direction than the mapping's.
    #[error("{dma}: mapped {mapped:?}, unmapped or synced {given:?}")]
    DirectionMismatch {
        /// The handle.
        dma: DmaAddr,
        /// Direction of the mapping.
        mapped: Direction,
        /// Direction given.
        given: Direction,
    },
    /// An unmap by another function than the one that mapped ("frees DMA memory with wrong
    /// function": a `map_sg` undone by `unmap`, a two-step state by `unmap`, ...).
    #[error("{dma}: mapped by {mapped:?}, unmapped as {given:?}")]
    KindMismatch {
        /// The handle.
        dma: DmaAddr,
        /// How it was mapped.
        mapped: MapKind,
        /// How it was undone.
        given: MapKind,
    },
    /// A handle that another device mapped.
    #[error("{dma} was mapped by {owner}, not by this device")]
    OtherDevice {
        /// The handle.
        dma: DmaAddr,
        /// The device that mapped it.
        owner: DeviceId,
    },
    /// A sync of bytes outside the mapping ("syncs DMA memory outside allocated range").
    #[error("sync of [{offset:#x}, +{size:#x}) at {dma} is outside the {mapped:#x}-byte mapping")]
    SyncOutOfRange {
        /// The handle.
        dma: DmaAddr,
        /// Offset into the mapping.
        offset: u64,
        /// Bytes to sync.
        size: u64,
        /// Size of the mapping.
        mapped: u64,
    },
    /// A [`DmaVec`] segment of zero bytes.
    #[error("DmaVec segment {index} is empty")]
    EmptySegment {
        /// Index the segment would have had.
        index: usize,
    },
    /// A [`DmaVec`] segment that wraps past 2^64.
    #[error("DmaVec segment [{addr}, +{len:#x}) wraps")]
    SegmentOverflow {
        /// Start.
        addr: DmaAddr,
        /// Length.
        len: u64,
    },
    /// A page size that is not a power of two (of at least 4 bytes).
    #[error("page size {0:#x} is not a power of two of at least 4 bytes")]
    BadPageSize(u64),
    /// The IOMMU refused.
    #[error(transparent)]
    Iommu(#[from] DomainError),
}
