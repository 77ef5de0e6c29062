//! The two-step DMA API of Linux 6.16+ (REFERENCES.md §1): [`IovaState`] reserves IOVA once,
//! links physical ranges into it without flushing, syncs once, unlinks and frees.
#![forbid(unsafe_code)]

use std::sync::Arc;

use super::bounce;
use super::record::Record;
use super::{Attrs, Device, Direction, DmaError, GRANULE, MapKind, align_up, granule_source, phys_span};
use crate::addr::{DmaAddr, PhysAddr};
use crate::iommu::iova::IovaTag;
use crate::iommu::{Domain, DomainError};
use crate::mem::{BioVec, PhysMem};
use crate::pt::{MapError, MapSource};

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
    mem: Arc<PhysMem>,
    /// The IOVA allocation's record (device, kind, reserved size).
    tag: IovaTag,
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
    /// [`DmaError::ZeroSize`], [`DmaError::Overflow`], [`DmaError::NotAttached`],
    /// [`DmaError::Iommu`] (IOVA exhausted).
    pub fn try_alloc(dev: &Device, phys: PhysAddr, size: u64) -> Result<Option<IovaState>, DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        // (Only `phys`'s in-page offset is used: the range need not be mapped, but its size must
        // fit with the offset, checked below.)
        let Some(domain) = dev.current_domain()? else {
            return Ok(None);
        };
        let pad = phys.as_u64() % GRANULE;
        let reserved = align_up(pad.checked_add(size).ok_or(DmaError::Overflow { phys, size })?)
            .ok_or(DmaError::Overflow { phys, size })?;
        let tag = Record {
            dev: dev.id(),
            dir: Direction::Bidirectional,
            kind: MapKind::TwoStep,
            pad: 0,
            size: reserved,
        }
        .tag();
        let base = domain.alloc_iova_tagged(reserved, tag)?;
        Ok(Some(IovaState {
            domain,
            mem: dev.mem().clone(),
            tag,
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
        if dev.is_attached_to(&self.domain) {
            return Ok(&self.domain);
        }
        // Refused: not attached (or to an identity domain) says so, otherwise another domain.
        dev.current_domain()?;
        Err(DmaError::WrongDevice(dev.id()))
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
        phys_span(phys, size)?;
        // Where the link really lands once its in-page offset is applied (Linux maps it at
        // `addr + offset - phys_pad`): that must be a granule boundary of the reservation, so a
        // first link whose in-page offset is not the reservation's is refused.
        let Some(iova_off) = at.checked_sub(phys_pad).filter(|o| o % GRANULE == 0) else {
            return Err(DmaError::UnalignedLink { offset, phys });
        };
        let len = align_up(phys_pad + size).ok_or(DmaError::Overflow { phys, size })?;
        if iova_off.checked_add(len).is_none_or(|e| e > self.reserved) {
            return Err(DmaError::BeyondReserved { offset, size, reserved: self.size });
        }
        let iova = DmaAddr::new(self.base.as_u64() + iova_off);
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
        self.check(dev)?;
        if attrs.mmio {
            return Err(DmaError::PeerToPeer(phys));
        }
        let (iova, pa, len) = self.place(phys, offset, size)?;
        if dev.needs_bounce(phys, size) {
            let at = iova.as_u64() - self.base.as_u64();
            let (src, bounces) = bounce::plan(dev.mem(), phys, size, dir, at)?;
            if let Err(e) = self.domain.map(iova, MapSource::BioVecs(&src), dir.prot()) {
                bounce::abandon(dev.mem(), bounces);
                return Err(self.map_err(e));
            }
            self.bounces.extend(bounces);
        } else {
            self.domain.map(iova, MapSource::Range { pa, len }, dir.prot()).map_err(|e| self.map_err(e))?;
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
        self.check(dev)?;
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
        if at0.is_multiple_of(GRANULE) && at0.checked_add(total).is_some_and(|e| e <= self.pad + self.size) {
            let iova = DmaAddr::new(self.base.as_u64() + at0);
            match self.domain.map(iova, MapSource::PageVecs(bvecs), dir.prot()) {
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
        self.domain.map(iova, granule_source(&expanded), dir.prot()).map_err(|e| self.map_err(e))?;
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

    /// `dma_iova_sync` for `[offset, offset + size)` of the state: after it, the device sees
    /// exactly what was linked. In a lazy domain that is one IOTLB flush of the range; in a strict
    /// domain it only checks its arguments (see [`Domain::sync`]: the IOTLB can hold nothing
    /// stale there).
    ///
    /// # Errors
    /// [`DmaError::ZeroSize`], [`DmaError::UseAfterDestroy`], [`DmaError::WrongDevice`],
    /// [`DmaError::BeyondReserved`].
    pub fn sync(&self, dev: &Device, offset: u64, size: u64) -> Result<(), DmaError> {
        let domain = self.check(dev)?;
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        let at = self.pad.saturating_add(offset);
        if at.checked_add(size).is_none_or(|e| e > self.reserved) {
            return Err(DmaError::BeyondReserved { offset, size, reserved: self.size });
        }
        domain.sync(DmaAddr::new(self.base.as_u64() + at), size)?;
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
        self.check(dev)?;
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        let at = self.pad.saturating_add(offset);
        let start = at - at % GRANULE;
        let end = at.checked_add(size).and_then(align_up).filter(|&e| e <= self.reserved);
        let Some(end) = end else {
            return Err(DmaError::BeyondReserved { offset, size, reserved: self.size });
        };
        let gone = self.domain.unmap_strict(DmaAddr::new(self.base.as_u64() + start), end - start)?;
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
        let keep_from =
            self.pad.checked_add(mapped_len).and_then(align_up).unwrap_or(u64::MAX).min(self.reserved);
        if keep_from < self.reserved
            && let Some(t) = domain.table()
            && t.first_mapped(DmaAddr::new(self.base.as_u64() + keep_from), self.reserved - keep_from)
                .is_some()
        {
            return Err(DmaError::StillLinked { bytes: self.mapped });
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
        let retired = domain.retire_iova_tagged(self.base, self.reserved, self.tag)?;
        let _ = domain.free_retired(retired);
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
        for b in core::mem::take(&mut self.bounces) {
            bounce::finish(&self.mem, b, Attrs::default());
        }
        if let Ok(r) = self.domain.retire_iova_tagged(self.base, self.reserved, self.tag) {
            let _ = self.domain.free_retired(r);
        }
    }
}
