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
//!         let one = DmaVec::from_segment(state.addr(), len); // ONE segment for the device
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

mod bounce;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::iommu::iova::IovaError;
use crate::iommu::{DeviceId, Domain, DomainError, DomainKind, Iommu};
use crate::mem::{BioVec, PhysMem};
use crate::pt::{MapError, MapSource, Prot};

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

#[inline]
fn align_up(x: u64) -> Option<u64> {
    x.checked_add(GRANULE - 1).map(|v| v & !(GRANULE - 1))
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
    /// A link after the first starts off a granule boundary (Linux: -EIO).
    #[error("link at offset {offset:#x}: {phys} is not granule aligned and only the first link may be")]
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
    /// No frame for a bounce buffer.
    #[error("no memory for a bounce buffer")]
    BounceExhausted,
    /// Unmapping something that was not mapped.
    #[error("{dma} (+{size:#x}) is not mapped for this device")]
    NotMapped {
        /// The DMA address given.
        dma: DmaAddr,
        /// Size given.
        size: u64,
    },
    /// The IOMMU refused.
    #[error(transparent)]
    Iommu(#[from] DomainError),
}

#[derive(Debug, Clone)]
enum Path {
    Translated { domain: Arc<Domain>, mem: Arc<PhysMem> },
    Direct { mem: Arc<PhysMem>, bits: u32 },
}

/// A device as the DMA API sees it: who it is, whether it is trusted, and how it reaches memory.
#[derive(Debug, Clone)]
pub struct Device {
    id: DeviceId,
    trusted: bool,
    path: Path,
    /// One-shot mappings of an untrusted device that bounce, by IOVA base.
    bounced: Arc<Mutex<HashMap<u64, Vec<bounce::Bounce>>>>,
}

impl Device {
    /// A device that reaches memory through the IOMMU domain it is attached to.
    ///
    /// # Errors
    /// [`DmaError::NotAttached`] (also for an unregistered device),
    /// [`DmaError::IdentityDomain`].
    pub fn translated(iommu: &Iommu, id: DeviceId) -> Result<Self, DmaError> {
        let info = iommu.device(id).ok_or(DmaError::NotAttached(id))?;
        let dom_id = info.domain.ok_or(DmaError::NotAttached(id))?;
        let domain = iommu.domain(dom_id).ok_or(DmaError::NotAttached(id))?;
        if domain.kind() == DomainKind::Identity {
            return Err(DmaError::IdentityDomain(id));
        }
        Ok(Device {
            id,
            trusted: info.trusted,
            path: Path::Translated { domain, mem: iommu.mem().clone() },
            bounced: Arc::default(),
        })
    }

    /// A device without translation: DMA address = physical address, reachable below
    /// `1 << addr_bits` (e.g. 32 for an old device).
    ///
    /// # Errors
    /// [`DmaError::BadAddressWidth`].
    pub fn direct(mem: Arc<PhysMem>, id: DeviceId, addr_bits: u32, trusted: bool) -> Result<Self, DmaError> {
        if !(12..=64).contains(&addr_bits) {
            return Err(DmaError::BadAddressWidth(addr_bits));
        }
        Ok(Device { id, trusted, path: Path::Direct { mem, bits: addr_bits }, bounced: Arc::default() })
    }

    /// The device id.
    #[must_use]
    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// Whether the device is trusted.
    #[must_use]
    pub fn is_trusted(&self) -> bool {
        self.trusted
    }

    /// The domain it translates through (`None` for a direct device).
    #[must_use]
    pub fn domain(&self) -> Option<&Arc<Domain>> {
        match &self.path {
            Path::Translated { domain, .. } => Some(domain),
            Path::Direct { .. } => None,
        }
    }

    /// Whether `[phys, phys + size)` must be bounced: an untrusted device and a partial granule.
    fn needs_bounce(&self, phys: PhysAddr, size: u64) -> bool {
        !self.trusted && (phys.as_u64() % GRANULE != 0 || (phys.as_u64() + size) % GRANULE != 0)
    }

    /// Maps `[phys, phys + size)` for the device and returns the DMA address of its first byte
    /// (`dma_map_phys`). Translated: a fresh IOVA range, mapped with the direction's permissions.
    /// Direct: the physical address itself, if the device can reach it.
    ///
    /// # Errors
    /// [`DmaError::ZeroSize`], [`DmaError::Overflow`], [`DmaError::AddressLimit`],
    /// [`DmaError::PeerToPeer`] (MMIO on a translated device), [`DmaError::BounceExhausted`]
    /// (untrusted device, partial pages, no bounce frame), [`DmaError::Iommu`].
    pub fn map_phys(
        &self,
        phys: PhysAddr,
        size: u64,
        dir: Direction,
        attrs: Attrs,
    ) -> Result<DmaAddr, DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        let end = phys.as_u64().checked_add(size).ok_or(DmaError::Overflow { phys, size })?;
        match &self.path {
            Path::Direct { bits, .. } => {
                if *bits < 64 && end > 1u64 << bits {
                    return Err(DmaError::AddressLimit { phys, size, bits: *bits });
                }
                Ok(DmaAddr::new(phys.as_u64()))
            }
            Path::Translated { domain, .. } => {
                if attrs.mmio {
                    return Err(DmaError::PeerToPeer(phys));
                }
                let pad = phys.as_u64() % GRANULE;
                let len = align_up(pad + size).ok_or(DmaError::Overflow { phys, size })?;
                let (src_vecs, bounces) = if self.needs_bounce(phys, size) {
                    bounce::plan(self.mem(), phys, size, dir, attrs, 0)?
                } else {
                    (Vec::new(), Vec::new())
                };
                let iova = match domain.alloc_iova(len) {
                    Ok(i) => i,
                    Err(e) => {
                        bounce::abandon(self.mem(), bounces);
                        return Err(e.into());
                    }
                };
                let src = if bounces.is_empty() {
                    MapSource::Range { pa: PhysAddr::new(phys.as_u64() - pad), len }
                } else {
                    MapSource::BioVecs(&src_vecs)
                };
                if let Err(e) = domain.map(iova, src, dir.prot()) {
                    let _ = domain.free_iova(iova, len);
                    bounce::abandon(self.mem(), bounces);
                    return Err(e.into());
                }
                if !bounces.is_empty() {
                    self.bounced.lock().insert(iova.as_u64(), bounces);
                }
                Ok(DmaAddr::new(iova.as_u64() + pad))
            }
        }
    }

    /// `dma_map_page`: [`Device::map_phys`] of `size` bytes at `offset` into `page`.
    ///
    /// # Errors
    /// As [`Device::map_phys`].
    pub fn map_page(
        &self,
        page: PhysAddr,
        offset: u64,
        size: u64,
        dir: Direction,
        attrs: Attrs,
    ) -> Result<DmaAddr, DmaError> {
        let phys = page.checked_add(offset).ok_or(DmaError::Overflow { phys: page, size })?;
        self.map_phys(phys, size, dir, attrs)
    }

    /// Undoes [`Device::map_phys`] / [`Device::map_page`] with the same size. Translated: the
    /// range is unmapped (strict or lazy, as the domain is) and its IOVA freed.
    ///
    /// # Errors
    /// [`DmaError::ZeroSize`], [`DmaError::NotMapped`], [`DmaError::Iommu`] (e.g. a double
    /// unmap is refused by the IOVA allocator).
    pub fn unmap(&self, dma: DmaAddr, size: u64, _dir: Direction, attrs: Attrs) -> Result<(), DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        match &self.path {
            Path::Direct { .. } => Ok(()),
            Path::Translated { domain, .. } => {
                let pad = dma.as_u64() % GRANULE;
                let len = align_up(pad + size).ok_or(DmaError::NotMapped { dma, size })?;
                let iova = DmaAddr::new(dma.as_u64() - pad);
                // Ends the allocation first: a range this device never mapped, a second unmap
                // or a wrong size is refused here, before anything changes.
                let retired = domain.retire_iova(iova, len).map_err(|e| match e {
                    DomainError::Iova(IovaError::NotAllocated { .. } | IovaError::OutsideAperture { .. }) => {
                        DmaError::NotMapped { dma, size }
                    }
                    e => DmaError::Iommu(e),
                })?;
                let unmapped = domain.unmap(iova, len);
                // The device has lost access: bring back what it wrote, release the bounces.
                if let Some(bounces) = self.bounced.lock().remove(&iova.as_u64()) {
                    for b in bounces {
                        bounce::finish(self.mem(), b, attrs);
                    }
                }
                domain.free_retired(retired);
                unmapped.map(|_| ()).map_err(DmaError::Iommu)
            }
        }
    }

    /// Maps a `bio_vec` array (`dma_map_sg`). Translated: ONE IOVA range for the whole array,
    /// every segment placed granule by granule at running offsets and entered into the table in
    /// one call, so that segments which meet on granule boundaries merge into one DMA segment.
    /// Direct: each segment's physical address, physically adjacent ones merged.
    ///
    /// # Errors
    /// As [`Device::map_phys`], for the first segment that fails; nothing stays mapped.
    pub fn map_sg(&self, bvecs: &[BioVec], dir: Direction, attrs: Attrs) -> Result<DmaVec, DmaError> {
        if bvecs.is_empty() {
            return Err(DmaError::ZeroSize);
        }
        let mut out = DmaVec::default();
        match &self.path {
            Path::Direct { .. } => {
                for b in bvecs {
                    let phys =
                        b.start().ok_or(DmaError::Overflow { phys: b.phys, size: u64::from(b.len) })?;
                    out.push(self.map_phys(phys, u64::from(b.len), dir, attrs)?, u64::from(b.len));
                }
                Ok(out)
            }
            Path::Translated { .. }
                if bvecs
                    .iter()
                    .any(|b| b.start().is_some_and(|p| self.needs_bounce(p, u64::from(b.len)))) =>
            {
                // An untrusted device with partial pages: each segment mapped (and bounced) on
                // its own.
                self.map_each(bvecs, dir, attrs)
            }
            Path::Translated { domain, .. } => {
                if attrs.mmio {
                    return Err(DmaError::PeerToPeer(bvecs[0].phys));
                }
                let mut expanded = Vec::with_capacity(bvecs.len());
                let mut total = 0u64;
                for b in bvecs {
                    let size = u64::from(b.len);
                    let phys = b.start().ok_or(DmaError::Overflow { phys: b.phys, size })?;
                    if size == 0 {
                        return Err(DmaError::ZeroSize);
                    }
                    let pad = phys.as_u64() % GRANULE;
                    let len = align_up(pad + size).ok_or(DmaError::Overflow { phys, size })?;
                    let seg_len = u32::try_from(len).map_err(|_| DmaError::Overflow { phys, size })?;
                    expanded.push(BioVec {
                        phys: PhysAddr::new(phys.as_u64() - pad),
                        offset: 0,
                        len: seg_len,
                    });
                    total = total.checked_add(len).ok_or(DmaError::Overflow { phys, size })?;
                }
                let iova = domain.alloc_iova(total)?;
                if let Err(e) = domain.map(iova, granule_source(&expanded), dir.prot()) {
                    let _ = domain.free_iova(iova, total);
                    return Err(e.into());
                }
                let mut at = iova.as_u64();
                for (b, e) in bvecs.iter().zip(&expanded) {
                    let pad = b.start().map_or(0, |p| p.as_u64() % GRANULE);
                    out.push(DmaAddr::new(at + pad), u64::from(b.len));
                    at += u64::from(e.len);
                }
                out.iova = Some((iova, total));
                Ok(out)
            }
        }
    }

    /// Maps every segment on its own ([`Device::map_phys`]), merging adjacent results; undoes
    /// them all if one fails.
    fn map_each(&self, bvecs: &[BioVec], dir: Direction, attrs: Attrs) -> Result<DmaVec, DmaError> {
        let mut out = DmaVec::default();
        for b in bvecs {
            let size = u64::from(b.len);
            let mapped = b
                .start()
                .ok_or(DmaError::Overflow { phys: b.phys, size })
                .and_then(|phys| self.map_phys(phys, size, dir, attrs));
            match mapped {
                Ok(d) => {
                    out.push(d, size);
                    out.pieces.push((d, size));
                }
                Err(e) => {
                    for &(d, n) in &out.pieces {
                        let _ = self.unmap(d, n, dir, attrs);
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Undoes [`Device::map_sg`].
    ///
    /// # Errors
    /// [`DmaError::Iommu`] when the range is not mapped (e.g. unmapped twice).
    pub fn unmap_sg(&self, v: &DmaVec, dir: Direction, attrs: Attrs) -> Result<(), DmaError> {
        match (&self.path, v.iova) {
            (Path::Direct { .. }, _) => Ok(()),
            (Path::Translated { domain, .. }, Some((iova, total))) => {
                let retired = domain.retire_iova(iova, total)?;
                let unmapped = domain.unmap(iova, total);
                domain.free_retired(retired);
                unmapped.map(|_| ()).map_err(DmaError::Iommu)
            }
            (Path::Translated { .. }, None) if !v.pieces.is_empty() => {
                for &(d, size) in &v.pieces {
                    self.unmap(d, size, dir, attrs)?;
                }
                Ok(())
            }
            (Path::Translated { .. }, None) => Err(DmaError::NotMapped { dma: DmaAddr::ZERO, size: 0 }),
        }
    }

    /// Maps a block request's `bio_vec` array the way Linux's `blk_rq_dma_map_iter_start`
    /// does: when every join between segments falls on a granule boundary and
    /// [`IovaState::try_alloc`] succeeds, the whole request is linked at running offsets in one
    /// call, synced once, and handed to the driver as ONE segment; otherwise (a direct device,
    /// or an unaligned join) each segment is mapped on its own.
    ///
    /// # Errors
    /// The errors of the two-step API or of [`Device::map_phys`]; nothing stays mapped.
    pub fn blk_rq_map(
        &self,
        bvecs: &[BioVec],
        dir: Direction,
        attrs: Attrs,
    ) -> Result<BlkRqMapping, DmaError> {
        if bvecs.is_empty() {
            return Err(DmaError::ZeroSize);
        }
        let joins_aligned = bvecs.windows(2).all(|w| {
            w[0].end().is_some_and(|e| e.as_u64() % GRANULE == 0)
                && w[1].start().is_some_and(|s| s.as_u64() % GRANULE == 0)
        });
        let total: u64 = bvecs.iter().map(|b| u64::from(b.len)).sum();
        let first = bvecs[0].start().ok_or(DmaError::Overflow { phys: bvecs[0].phys, size: total })?;
        if joins_aligned
            && !attrs.mmio
            && let Some(mut state) = IovaState::try_alloc(self, first, total)?
        {
            state.link_bvecs(self, 0, bvecs, dir, attrs)?;
            state.sync(self, 0, total)?;
            let segments = DmaVec::from_segment(state.addr(), total);
            return Ok(BlkRqMapping { segments, state: Some(state), len: total });
        }
        let segments = self.map_each(bvecs, dir, attrs)?;
        Ok(BlkRqMapping { segments, state: None, len: total })
    }

    /// Undoes [`Device::blk_rq_map`] (`blk_rq_dma_unmap`).
    ///
    /// # Errors
    /// The errors of [`IovaState::destroy`] or [`Device::unmap`].
    pub fn blk_rq_unmap(&self, m: BlkRqMapping, dir: Direction, attrs: Attrs) -> Result<(), DmaError> {
        match m.state {
            Some(mut state) => state.destroy(self, m.len, dir, attrs),
            None => {
                for &(d, n) in &m.segments.pieces {
                    self.unmap(d, n, dir, attrs)?;
                }
                Ok(())
            }
        }
    }

    fn translated_domain(&self) -> Option<&Arc<Domain>> {
        match &self.path {
            Path::Translated { domain, .. } => Some(domain),
            Path::Direct { .. } => None,
        }
    }

    /// The arena the device's memory lives in.
    #[must_use]
    pub fn mem(&self) -> &Arc<PhysMem> {
        match &self.path {
            Path::Translated { mem, .. } | Path::Direct { mem, .. } => mem,
        }
    }
}

/// A block request mapped by [`Device::blk_rq_map`].
#[derive(Debug)]
#[must_use = "a mapped request must be unmapped with Device::blk_rq_unmap"]
pub struct BlkRqMapping {
    segments: DmaVec,
    state: Option<IovaState>,
    len: u64,
}

impl BlkRqMapping {
    /// The DMA segments to program into the device (one on the IOVA path).
    #[must_use]
    pub fn segments(&self) -> &DmaVec {
        &self.segments
    }

    /// Whether the request took the two-step IOVA path.
    #[must_use]
    pub fn uses_iova(&self) -> bool {
        self.state.is_some()
    }
}

/// One contiguous DMA segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaSeg {
    /// DMA address of the first byte.
    pub addr: DmaAddr,
    /// Length in bytes.
    pub len: u64,
}

/// "Scatterlist v2": the in-memory list of `(dma_addr, len)` segments a driver hands to its
/// device, built by [`Device::map_sg`] or from the two-step API. Adjacent segments merge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DmaVec {
    segs: Vec<DmaSeg>,
    /// The IOVA range backing it when built by `map_sg` on a translated device.
    iova: Option<(DmaAddr, u64)>,
    /// Per-segment one-shot mappings (an untrusted device's `map_sg` with partial pages).
    pieces: Vec<(DmaAddr, u64)>,
}

impl DmaVec {
    /// A list of one segment (what the two-step path hands to the device).
    #[must_use]
    pub fn from_segment(addr: DmaAddr, len: u64) -> Self {
        DmaVec { segs: vec![DmaSeg { addr, len }], iova: None, pieces: Vec::new() }
    }

    /// Appends a segment, merging it into the last one when they touch.
    pub fn push(&mut self, addr: DmaAddr, len: u64) {
        if let Some(last) = self.segs.last_mut()
            && last.addr.as_u64().checked_add(last.len) == Some(addr.as_u64())
        {
            last.len += len;
            return;
        }
        self.segs.push(DmaSeg { addr, len });
    }

    /// The segments.
    #[must_use]
    pub fn segments(&self) -> &[DmaSeg] {
        &self.segs
    }

    /// Number of segments.
    #[must_use]
    pub fn len(&self) -> usize {
        self.segs.len()
    }

    /// Whether there is no segment.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Bytes in all segments.
    #[must_use]
    pub fn total_len(&self) -> u64 {
        self.segs.iter().map(|s| s.len).sum()
    }

    /// Page by page, the DMA address of the first byte of each `page_size` page the segments
    /// touch: the first entry of a segment may carry an offset, the others are page aligned.
    /// For a list whose inner joins are page aligned this is exactly an NVMe PRP list.
    pub fn page_addrs(&self, page_size: u64) -> impl Iterator<Item = DmaAddr> + '_ {
        self.segs.iter().flat_map(move |s| {
            let start = s.addr.as_u64();
            let end = start + s.len;
            let first_page = start & !(page_size - 1);
            let pages = (end - first_page).div_ceil(page_size);
            (0..pages).map(move |i| DmaAddr::new(if i == 0 { start } else { first_page + i * page_size }))
        })
    }
}

/// Where one element of a link goes (see `IovaState::place`).
#[derive(Debug, Clone, Copy)]
struct Placed {
    /// The element's first byte and offset in the state, and its size.
    phys: PhysAddr,
    offset: u64,
    size: u64,
    /// The granule-aligned IOVA, physical start and length it maps.
    iova: DmaAddr,
    pa: PhysAddr,
    len: u64,
}

/// The state of the two-step API: an IOVA range reserved once, into which physical ranges are
/// linked (REFERENCES.md §1). `addr()` is the DMA address of byte 0 (it keeps the sub-granule
/// offset of the physical address given to `try_alloc`).
///
/// Dropping a state that still has links unlinks them and frees the IOVA (so nothing leaks
/// silently); call [`IovaState::destroy`] to do it explicitly and see errors.
#[derive(Debug)]
pub struct IovaState {
    domain: Arc<Domain>,
    /// Granule-aligned first IOVA of the reservation.
    base: DmaAddr,
    /// Sub-granule offset of byte 0.
    pad: u64,
    /// Bytes asked for.
    size: u64,
    /// Bytes reserved (granule multiple).
    reserved: u64,
    /// IOVA bytes currently mapped by links.
    mapped: u64,
    /// Bounced granules of an untrusted device's links (offset from `base` in `Bounce::at`).
    bounces: Vec<bounce::Bounce>,
    done: bool,
}

impl IovaState {
    /// Reserves IOVA for `size` bytes starting at `phys` (only its offset within a granule is
    /// used). `Ok(None)` for a direct device: map segment by segment instead.
    ///
    /// # Errors
    /// [`DmaError::ZeroSize`], [`DmaError::Overflow`], [`DmaError::Iommu`] (IOVA exhausted).
    pub fn try_alloc(dev: &Device, phys: PhysAddr, size: u64) -> Result<Option<IovaState>, DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        let Some(domain) = dev.translated_domain() else {
            return Ok(None);
        };
        let pad = phys.as_u64() % GRANULE;
        let reserved = align_up(pad.checked_add(size).ok_or(DmaError::Overflow { phys, size })?)
            .ok_or(DmaError::Overflow { phys, size })?;
        let base = domain.alloc_iova(reserved)?;
        Ok(Some(IovaState {
            domain: domain.clone(),
            base,
            pad,
            size,
            reserved,
            mapped: 0,
            bounces: Vec::new(),
            done: false,
        }))
    }

    /// DMA address of byte 0.
    #[must_use]
    pub fn addr(&self) -> DmaAddr {
        DmaAddr::new(self.base.as_u64() + self.pad)
    }

    /// Bytes the state was created for.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// IOVA bytes mapped by links now.
    #[must_use]
    pub fn mapped(&self) -> u64 {
        self.mapped
    }

    fn check(&self, dev: &Device) -> Result<&Arc<Domain>, DmaError> {
        if self.done {
            return Err(DmaError::UseAfterDestroy);
        }
        match dev.translated_domain() {
            Some(d) if Arc::ptr_eq(d, &self.domain) => Ok(&self.domain),
            _ => Err(DmaError::WrongDevice(dev.id)),
        }
    }

    /// Where a link of `size` bytes from `phys` at `offset` goes: (granule-aligned IOVA, aligned
    /// physical start, mapped length), after checking the rules of §1.
    fn place(&self, phys: PhysAddr, offset: u64, size: u64) -> Result<(DmaAddr, PhysAddr, u64), DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        let phys_pad = phys.as_u64() % GRANULE;
        if offset > 0 && phys_pad != 0 {
            return Err(DmaError::UnalignedLink { offset, phys });
        }
        let at = self.pad.checked_add(offset).ok_or(DmaError::BeyondReserved {
            offset,
            size,
            reserved: self.size,
        })?;
        if offset > 0 && at % GRANULE != 0 {
            return Err(DmaError::NotGranuleMultiple { offset });
        }
        match at.checked_add(size) {
            Some(end) if end <= self.pad + self.size => {}
            _ => return Err(DmaError::BeyondReserved { offset, size, reserved: self.size }),
        }
        phys.as_u64().checked_add(size).ok_or(DmaError::Overflow { phys, size })?;
        let iova = DmaAddr::new(self.base.as_u64() + (at - at % GRANULE));
        let len = align_up(phys_pad + size).ok_or(DmaError::Overflow { phys, size })?;
        Ok((iova, PhysAddr::new(phys.as_u64() - phys_pad), len))
    }

    fn map_err(&self, e: DomainError) -> DmaError {
        match e {
            DomainError::Map(MapError::AlreadyMapped { va }) => DmaError::AlreadyLinked {
                offset: (va.as_u64() - self.base.as_u64()).saturating_sub(self.pad),
            },
            e => DmaError::Iommu(e),
        }
    }

    /// Links `[phys, phys + size)` at `offset` (`dma_iova_link`), without an IOTLB flush.
    ///
    /// # Errors
    /// [`DmaError::UnalignedLink`] (only the first link may start off a granule),
    /// [`DmaError::NotGranuleMultiple`] (a previous link did not end on a granule),
    /// [`DmaError::BeyondReserved`], [`DmaError::AlreadyLinked`], [`DmaError::UseAfterDestroy`],
    /// [`DmaError::WrongDevice`], [`DmaError::PeerToPeer`], [`DmaError::BounceExhausted`],
    /// [`DmaError::ZeroSize`]; nothing changes on error.
    pub fn link(
        &mut self,
        dev: &Device,
        phys: PhysAddr,
        offset: u64,
        size: u64,
        dir: Direction,
        attrs: Attrs,
    ) -> Result<(), DmaError> {
        let domain = self.check(dev)?.clone();
        if attrs.mmio {
            return Err(DmaError::PeerToPeer(phys));
        }
        let (iova, pa, len) = self.place(phys, offset, size)?;
        if dev.needs_bounce(phys, size) {
            let at = iova.as_u64() - self.base.as_u64();
            let (src, bounces) = bounce::plan(dev.mem(), phys, size, dir, attrs, at)?;
            if let Err(e) = domain.map(iova, MapSource::BioVecs(&src), dir.prot()) {
                bounce::abandon(dev.mem(), bounces);
                return Err(self.map_err(e));
            }
            self.bounces.extend(bounces);
        } else {
            domain.map(iova, MapSource::Range { pa, len }, dir.prot()).map_err(|e| self.map_err(e))?;
        }
        self.mapped += len;
        Ok(())
    }

    /// Links a whole `bio_vec` array at running offsets from `offset`, in ONE call and ONE walk
    /// of the IOMMU table (the batched form the seed discussion asks for). The same rules as
    /// [`IovaState::link`] apply to every element, checked for the whole array before anything is
    /// mapped. Returns the bytes linked.
    ///
    /// # Errors
    /// As [`IovaState::link`], naming the first offending element's offset.
    pub fn link_bvecs(
        &mut self,
        dev: &Device,
        offset: u64,
        bvecs: &[BioVec],
        dir: Direction,
        attrs: Attrs,
    ) -> Result<u64, DmaError> {
        let domain = self.check(dev)?.clone();
        if bvecs.is_empty() {
            return Err(DmaError::ZeroSize);
        }
        if attrs.mmio {
            return Err(DmaError::PeerToPeer(bvecs[0].phys));
        }
        // Fast path: at a granule-aligned offset, an array of whole pages maps as it is, checked
        // element by element by the table walk itself (one pass over the array). Anything else
        // — or a fast attempt that meets a partial page, which changes nothing — takes the
        // general path, which places and checks every element on its own.
        let at0 = self.pad.saturating_add(offset);
        let total = bvecs.len() as u64 * GRANULE;
        if at0 % GRANULE == 0 && at0.checked_add(total).is_some_and(|e| e <= self.pad + self.size) {
            let iova = DmaAddr::new(self.base.as_u64() + at0);
            match domain.map(iova, MapSource::PageVecs(bvecs), dir.prot()) {
                Ok(_) => {
                    self.mapped += total;
                    return Ok(total);
                }
                Err(DomainError::Map(MapError::UnalignedSource { .. } | MapError::PhysTooHigh { .. })) => {}
                Err(e) => return Err(self.map_err(e)),
            }
        }
        if bvecs.iter().any(|b| b.start().is_some_and(|p| dev.needs_bounce(p, u64::from(b.len)))) {
            return self.link_each(dev, offset, bvecs, dir, attrs);
        }
        let plan = self.place_all(offset, bvecs)?;
        let iova = plan.first().map_or(self.base, |p| p.iova);
        let mut expanded = Vec::with_capacity(plan.len());
        for p in &plan {
            let len = u32::try_from(p.len).map_err(|_| DmaError::Overflow { phys: p.pa, size: p.len })?;
            expanded.push(BioVec { phys: p.pa, offset: 0, len });
        }
        domain.map(iova, granule_source(&expanded), dir.prot()).map_err(|e| self.map_err(e))?;
        self.mapped += plan.iter().map(|p| p.len).sum::<u64>();
        Ok(plan.iter().map(|p| p.size).sum())
    }

    /// Places every element of a `bio_vec` array at running offsets from `offset` (the rules of
    /// [`IovaState::link`] for each), checking that the granules they map follow each other in
    /// IOVA. Nothing is mapped.
    fn place_all(&self, offset: u64, bvecs: &[BioVec]) -> Result<Vec<Placed>, DmaError> {
        let mut plan: Vec<Placed> = Vec::with_capacity(bvecs.len());
        let mut at = offset;
        for b in bvecs {
            let size = u64::from(b.len);
            let phys = b.start().ok_or(DmaError::Overflow { phys: b.phys, size })?;
            let (iova, pa, len) = self.place(phys, at, size)?;
            if let Some(prev) = plan.last()
                && prev.iova.as_u64() + prev.len != iova.as_u64()
            {
                return Err(DmaError::NotGranuleMultiple { offset: at });
            }
            plan.push(Placed { phys, offset: at, size, iova, pa, len });
            at += size;
        }
        Ok(plan)
    }

    /// `link_bvecs` for arrays that need bounce buffering: every element placed and checked
    /// first, then linked one by one (undone if a later one fails).
    fn link_each(
        &mut self,
        dev: &Device,
        offset: u64,
        bvecs: &[BioVec],
        dir: Direction,
        attrs: Attrs,
    ) -> Result<u64, DmaError> {
        let plan = self.place_all(offset, bvecs)?;
        for p in &plan {
            if let Err(e) = self.link(dev, p.phys, p.offset, p.size, dir, attrs) {
                if p.offset > offset {
                    let _ = self.unlink(dev, offset, p.offset - offset, dir, attrs);
                }
                return Err(e);
            }
        }
        Ok(plan.iter().map(|p| p.size).sum())
    }

    /// One IOTLB flush for `[offset, offset + size)` of the state (`dma_iova_sync`).
    ///
    /// # Errors
    /// [`DmaError::UseAfterDestroy`], [`DmaError::WrongDevice`], [`DmaError::BeyondReserved`].
    pub fn sync(&self, dev: &Device, offset: u64, size: u64) -> Result<(), DmaError> {
        let domain = self.check(dev)?;
        let at = self.pad.saturating_add(offset);
        if at.checked_add(size).is_none_or(|e| e > self.reserved) {
            return Err(DmaError::BeyondReserved { offset, size, reserved: self.size });
        }
        domain.sync(DmaAddr::new(self.base.as_u64() + at), size.max(1));
        Ok(())
    }

    /// Unmaps `[offset, offset + size)` and invalidates it at once (`dma_iova_unlink`: always
    /// strict).
    ///
    /// # Errors
    /// [`DmaError::UseAfterDestroy`], [`DmaError::WrongDevice`], [`DmaError::BeyondReserved`],
    /// [`DmaError::ZeroSize`], [`DmaError::Iommu`] with `NotMapped` when nothing was linked there.
    pub fn unlink(
        &mut self,
        dev: &Device,
        offset: u64,
        size: u64,
        _dir: Direction,
        attrs: Attrs,
    ) -> Result<(), DmaError> {
        let domain = self.check(dev)?.clone();
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        let at = self.pad.saturating_add(offset);
        let start = at - at % GRANULE;
        let end = at.checked_add(size).and_then(align_up).filter(|&e| e <= self.reserved);
        let Some(end) = end else {
            return Err(DmaError::BeyondReserved { offset, size, reserved: self.size });
        };
        let gone = domain.unmap_strict(DmaAddr::new(self.base.as_u64() + start), end - start)?;
        self.mapped -= gone.min(self.mapped);
        // The device has lost access to the range: bring its bounced bytes back.
        let (done, keep): (Vec<_>, Vec<_>) =
            core::mem::take(&mut self.bounces).into_iter().partition(|b| (start..end).contains(&b.at));
        self.bounces = keep;
        for b in done {
            bounce::finish(dev.mem(), b, attrs);
        }
        Ok(())
    }

    /// Unlinks `[0, mapped_len)` and frees the IOVA (`dma_iova_destroy`); `mapped_len == 0` only
    /// frees. In a lazy domain the IOVA is reused only after the next flush.
    ///
    /// # Errors
    /// [`DmaError::StillLinked`] when links remain beyond `mapped_len` (nothing changes then),
    /// and the errors of [`IovaState::unlink`].
    pub fn destroy(
        &mut self,
        dev: &Device,
        mapped_len: u64,
        dir: Direction,
        attrs: Attrs,
    ) -> Result<(), DmaError> {
        let domain = self.check(dev)?.clone();
        let keep_from = align_up(self.pad + mapped_len).unwrap_or(u64::MAX).min(self.reserved);
        if keep_from < self.reserved {
            let t = domain.table().expect("translated domains have a table");
            let rest =
                t.first_mapped(DmaAddr::new(self.base.as_u64() + keep_from), self.reserved - keep_from);
            if rest.is_some() {
                return Err(DmaError::StillLinked { bytes: self.mapped });
            }
        }
        if mapped_len > 0 && self.mapped > 0 {
            self.unlink(dev, 0, mapped_len.min(self.size), dir, attrs)?;
        }
        self.free(dev)
    }

    /// Frees the IOVA (`dma_iova_free`); everything must be unlinked already.
    ///
    /// # Errors
    /// [`DmaError::StillLinked`], [`DmaError::UseAfterDestroy`], [`DmaError::WrongDevice`].
    pub fn free(&mut self, dev: &Device) -> Result<(), DmaError> {
        let domain = self.check(dev)?.clone();
        if self.mapped > 0 {
            return Err(DmaError::StillLinked { bytes: self.mapped });
        }
        domain.free_iova(self.base, self.reserved)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for IovaState {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.mapped > 0 {
            let _ = self.domain.unmap_strict(self.base, self.reserved);
        }
        if !self.bounces.is_empty()
            && let Some(mem) = self.domain.table().map(|t| t.mem().clone())
        {
            for b in core::mem::take(&mut self.bounces) {
                bounce::finish(&mem, b, Attrs::default());
            }
        }
        let _ = self.domain.free_iova(self.base, self.reserved);
    }
}
