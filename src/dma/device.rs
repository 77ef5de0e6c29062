//! [`Device`]: a device as the DMA API sees it, its one-shot mappings (`map_phys`, `map_sg`)
//! and their records (Linux's dma-debug checks, always on).
#![forbid(unsafe_code)]

use std::sync::Arc;

use super::bounce;
use super::record::{DevState, Record};
use super::{
    Attrs, Direction, DmaError, DmaSeg, DmaVec, GRANULE, MapKind, align_up, granule_source, phys_span,
};
use crate::addr::{DmaAddr, PhysAddr};
use crate::iommu::iova::IovaError;
use crate::iommu::{Access, DeviceId, DmaFault, Domain, DomainError, DomainKind, FaultReason, Iommu};
use crate::mem::{BioVec, PageArray, PhysMem};
use crate::pt::MapSource;

#[derive(Debug, Clone)]
enum Path {
    Translated { iommu: Iommu },
    Direct { bits: u32 },
}

/// A device as the DMA API sees it: who it is, whether it is trusted, and how it reaches memory.
/// Translated handles follow the device's attachment (module docs); clones and other handles of
/// the same device share its records and bounce state.
#[derive(Debug, Clone)]
pub struct Device {
    pub(super) id: DeviceId,
    pub(super) trusted: bool,
    path: Path,
    pub(super) mem: Arc<PhysMem>,
    pub(super) state: Arc<DevState>,
}

impl Device {
    /// A device that reaches memory through the IOMMU domain it is attached to (now and at
    /// every later call).
    ///
    /// # Errors
    /// [`DmaError::NotAttached`] (also for an unregistered device),
    /// [`DmaError::IdentityDomain`].
    pub fn translated(iommu: &Iommu, id: DeviceId) -> Result<Self, DmaError> {
        let info = iommu.device(id).ok_or(DmaError::NotAttached(id))?;
        let state = iommu.device_data(id, DevState::default).ok_or(DmaError::NotAttached(id))?;
        let dev = Device {
            id,
            trusted: info.trusted,
            path: Path::Translated { iommu: iommu.clone() },
            mem: iommu.mem().clone(),
            state,
        };
        dev.current_domain()?;
        Ok(dev)
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
        Ok(Device { id, trusted, path: Path::Direct { bits: addr_bits }, mem, state: Arc::default() })
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

    /// The domain it translates through now (`None` for a direct device, or a translated one
    /// that is not attached to a translated domain).
    #[must_use]
    pub fn domain(&self) -> Option<Arc<Domain>> {
        self.current_domain().ok().flatten()
    }

    /// The translated domain the device is attached to now; `Ok(None)` for a direct device.
    pub(super) fn current_domain(&self) -> Result<Option<Arc<Domain>>, DmaError> {
        let Path::Translated { iommu } = &self.path else { return Ok(None) };
        let domain = iommu.with_attached(self.id, |d| d.cloned());
        let domain = domain.ok_or(DmaError::NotAttached(self.id))?;
        if domain.kind() == DomainKind::Identity {
            return Err(DmaError::IdentityDomain(self.id));
        }
        Ok(Some(domain))
    }

    /// Runs `f` with the translated domain the device is attached to now (`None` for a direct
    /// device), without taking a reference: under the IOMMU registry's read lock, so the domain
    /// cannot be destroyed while `f` maps into it.
    pub(super) fn with_domain<R>(
        &self,
        f: impl FnOnce(Option<&Domain>) -> Result<R, DmaError>,
    ) -> Result<R, DmaError> {
        let Path::Translated { iommu } = &self.path else { return f(None) };
        iommu.with_attached(self.id, |d| match d {
            None => Err(DmaError::NotAttached(self.id)),
            Some(d) if d.kind() == DomainKind::Identity => Err(DmaError::IdentityDomain(self.id)),
            Some(d) => f(Some(&**d)),
        })
    }

    /// Whether the device is attached to `d` now (no lock, no reference count).
    pub(super) fn is_attached_to(&self, d: &Domain) -> bool {
        match &self.path {
            Path::Translated { iommu } => iommu.is_attached_to(self.id, d),
            Path::Direct { .. } => false,
        }
    }

    /// Whether `[phys, phys + size)` must be bounced: an untrusted device and a partial granule.
    /// The caller has checked that the range does not wrap.
    pub(super) fn needs_bounce(&self, phys: PhysAddr, size: u64) -> bool {
        !self.trusted
            && (!phys.as_u64().is_multiple_of(GRANULE)
                || !phys.as_u64().wrapping_add(size).is_multiple_of(GRANULE))
    }

    /// The arena the device's memory lives in.
    #[must_use]
    pub fn mem(&self) -> &Arc<PhysMem> {
        &self.mem
    }

    /// The address width of a direct device (`None` for one behind an IOMMU).
    #[must_use]
    pub fn direct_bits(&self) -> Option<u32> {
        match &self.path {
            Path::Direct { bits } => Some(*bits),
            Path::Translated { .. } => None,
        }
    }

    /// Whether the device reaches memory through an IOMMU (a translated handle).
    #[must_use]
    pub fn is_translated(&self) -> bool {
        matches!(self.path, Path::Translated { .. })
    }

    /// The device reads `buf.len()` bytes at DMA address `dma`: through the IOMMU it is
    /// attached to (every page translated and checked before a byte moves, faults logged there),
    /// or, for a direct device, straight from the arena below its address limit.
    ///
    /// # Errors
    /// The first [`DmaFault`]: what the IOMMU refused, or for a direct device
    /// [`FaultReason::OutsideAperture`] beyond its address width and [`FaultReason::BusError`]
    /// outside the arena. `buf` is untouched then.
    pub fn dma_read(&self, dma: DmaAddr, buf: &mut [u8]) -> Result<(), DmaFault> {
        match &self.path {
            Path::Translated { iommu } => iommu.dma_read(self.id, dma, buf),
            Path::Direct { bits } => {
                self.direct_reach(*bits, dma, buf.len() as u64, Access::Read)?;
                // Checked to lie inside the arena.
                let _ = self.mem.read(PhysAddr::new(dma.as_u64()), buf);
                Ok(())
            }
        }
    }

    /// The device writes `data` at DMA address `dma` (as [`Device::dma_read`]).
    ///
    /// # Errors
    /// As [`Device::dma_read`]; memory is untouched then.
    pub fn dma_write(&self, dma: DmaAddr, data: &[u8]) -> Result<(), DmaFault> {
        match &self.path {
            Path::Translated { iommu } => iommu.dma_write(self.id, dma, data),
            Path::Direct { bits } => {
                self.direct_reach(*bits, dma, data.len() as u64, Access::Write)?;
                let _ = self.mem.write(PhysAddr::new(dma.as_u64()), data);
                Ok(())
            }
        }
    }

    /// Whether the device may make `access` over `[dma, dma + len)`, checked as
    /// [`Device::dma_read`] / [`Device::dma_write`] check it, without moving a byte: what a
    /// multi-stage walker uses to translate a whole access before any of it happens.
    ///
    /// # Errors
    /// As [`Device::dma_read`].
    pub fn dma_check(&self, dma: DmaAddr, len: u64, access: Access) -> Result<(), DmaFault> {
        match &self.path {
            Path::Translated { iommu } => {
                let n = usize::try_from(len).unwrap_or(usize::MAX);
                iommu.dma_check(self.id, dma, n, access)
            }
            Path::Direct { bits } => self.direct_reach(*bits, dma, len, access),
        }
    }

    /// Whether a direct device with `bits` of address reaches `[dma, dma + len)` in the arena.
    fn direct_reach(&self, bits: u32, dma: DmaAddr, len: u64, access: Access) -> Result<(), DmaFault> {
        let fault = |reason| DmaFault { device: self.id, iova: dma, access, reason };
        let end = dma.as_u64().checked_add(len).ok_or(fault(FaultReason::OutsideAperture))?;
        if bits < 64 && end > 1u64 << bits {
            return Err(fault(FaultReason::OutsideAperture));
        }
        if end > self.mem.size() {
            return Err(fault(FaultReason::BusError {
                pa: PhysAddr::new(dma.as_u64().max(self.mem.size())),
            }));
        }
        Ok(())
    }

    pub(super) fn record(&self, dir: Direction, kind: MapKind, pad: u64, size: u64) -> Record {
        Record { dev: self.id, dir, kind, pad, size }
    }

    /// Maps `[phys, phys + size)` for the device and returns the DMA address of its first byte
    /// (`dma_map_phys`). Translated: a fresh IOVA range, mapped with the direction's permissions.
    /// Direct: the physical address itself, if the device can reach it.
    ///
    /// # Errors
    /// [`DmaError::ZeroSize`], [`DmaError::Overflow`], [`DmaError::AddressLimit`],
    /// [`DmaError::NotAttached`], [`DmaError::PeerToPeer`] (MMIO on a translated device),
    /// [`DmaError::BounceExhausted`] (untrusted device, partial pages, no bounce frame),
    /// [`DmaError::OutsideArena`] (untrusted device, a partial page outside the arena),
    /// [`DmaError::Iommu`]; nothing stays mapped then.
    pub fn map_phys(
        &self,
        phys: PhysAddr,
        size: u64,
        dir: Direction,
        attrs: Attrs,
    ) -> Result<DmaAddr, DmaError> {
        self.map_one(phys, size, dir, attrs, MapKind::Single)
    }

    fn map_one(
        &self,
        phys: PhysAddr,
        size: u64,
        dir: Direction,
        attrs: Attrs,
        kind: MapKind,
    ) -> Result<DmaAddr, DmaError> {
        let end = phys_span(phys, size)?.end();
        self.with_domain(|domain| self.map_in(domain, phys, size, end, dir, attrs, kind))
    }

    #[allow(clippy::too_many_arguments)]
    fn map_in(
        &self,
        domain: Option<&Domain>,
        phys: PhysAddr,
        size: u64,
        end: u64,
        dir: Direction,
        attrs: Attrs,
        kind: MapKind,
    ) -> Result<DmaAddr, DmaError> {
        let Some(domain) = domain else {
            let Path::Direct { bits, .. } = &self.path else { unreachable!("direct path") };
            if *bits < 64 && end > 1u64 << bits {
                return Err(DmaError::AddressLimit { phys, size, bits: *bits });
            }
            let rec = self.record(dir, kind, 0, size);
            self.state.direct.lock().entry(phys.as_u64()).or_default().push(rec);
            return Ok(DmaAddr::new(phys.as_u64()));
        };
        if attrs.mmio {
            return Err(DmaError::PeerToPeer(phys));
        }
        let pad = phys.as_u64() % GRANULE;
        let len = align_up(pad + size).ok_or(DmaError::Overflow { phys, size })?;
        let (src_vecs, bounces) = if self.needs_bounce(phys, size) {
            bounce::plan(self.mem(), phys, size, dir, 0)?
        } else {
            (Vec::new(), Vec::new())
        };
        let tag = self.record(dir, kind, pad, size).tag();
        let iova = match domain.alloc_iova_tagged(len, tag) {
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
            if let Ok(r) = domain.retire_iova_tagged(iova, len, tag) {
                let _ = domain.free_retired(r);
            }
            bounce::abandon(self.mem(), bounces);
            return Err(e.into());
        }
        if !bounces.is_empty() {
            self.state.bounced.lock().insert((domain.serial(), iova.as_u64()), bounces);
        }
        Ok(DmaAddr::new(iova.as_u64() + pad))
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

    /// Undoes [`Device::map_phys`] / [`Device::map_page`]: the handle, size and direction must
    /// be the mapping's (see the module docs' misuse checks). Translated: the range is unmapped
    /// (strict or lazy, as the domain is) and its IOVA freed.
    ///
    /// # Errors
    /// [`DmaError::ZeroSize`], [`DmaError::NotMapped`], [`DmaError::SizeMismatch`],
    /// [`DmaError::DirectionMismatch`], [`DmaError::KindMismatch`], [`DmaError::OtherDevice`],
    /// [`DmaError::NotAttached`], [`DmaError::Iommu`]; nothing changes then.
    pub fn unmap(&self, dma: DmaAddr, size: u64, dir: Direction, attrs: Attrs) -> Result<(), DmaError> {
        self.unmap_one(dma, size, dir, attrs, MapKind::Single)
    }

    pub(super) fn unmap_one(
        &self,
        dma: DmaAddr,
        size: u64,
        dir: Direction,
        attrs: Attrs,
        kind: MapKind,
    ) -> Result<(), DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        self.with_domain(|domain| self.unmap_in(domain, dma, size, dir, attrs, kind))
    }

    fn unmap_in(
        &self,
        domain: Option<&Domain>,
        dma: DmaAddr,
        size: u64,
        dir: Direction,
        attrs: Attrs,
        kind: MapKind,
    ) -> Result<(), DmaError> {
        let pad = dma.as_u64() % GRANULE;
        let want = self.record(dir, kind, pad, size);
        let Some(domain) = domain else {
            return self.state.direct_record(dma, want, true).map(|_| ());
        };
        let iova = DmaAddr::new(dma.as_u64() - pad);
        let Some(len) = pad.checked_add(size).and_then(align_up) else {
            // No mapping can have this size: say what is there, if anything.
            let found = domain.iova_tag(iova).and_then(|(t, _)| Record::from_tag(t));
            return Err(found.map_or(DmaError::NotMapped { dma, size }, |r| r.mismatch(dma, want)));
        };
        // Ends the allocation first, checked against its record: a range this device never
        // mapped, a second unmap, another size, direction or kind is refused here, before
        // anything changes.
        let retired = domain
            .retire_iova_tagged(iova, len, want.tag())
            .map_err(|e| self.refusal(domain, dma, iova, want, e))?;
        // Only an untrusted device's mappings are ever bounced.
        let bounced = if self.trusted {
            None
        } else {
            self.state.bounced.lock().remove(&(domain.serial(), iova.as_u64()))
        };
        // A bounced mapping is unmapped strictly whatever the domain's mode (Linux gives
        // untrusted devices no flush queue): its frames are copied back and freed next, and a
        // lazy window would leave the device a cached way into frames that are no longer its.
        let unmapped =
            if bounced.is_some() { domain.unmap_strict(iova, len) } else { domain.unmap(iova, len) };
        // The device has lost access: bring back what it wrote, release the bounces.
        if let Some(bounces) = bounced {
            for b in bounces {
                bounce::finish(self.mem(), b, attrs);
            }
        }
        let _ = domain.free_retired(retired);
        unmapped.map(|_| ()).map_err(DmaError::Iommu)
    }

    /// The typed error for a refused retire of `iova`: the record's mismatch when there is one.
    pub(super) fn refusal(
        &self,
        domain: &Domain,
        dma: DmaAddr,
        iova: DmaAddr,
        want: Record,
        e: DomainError,
    ) -> DmaError {
        let found = match &e {
            DomainError::Iova(IovaError::TagMismatch { found, .. }) => Some(*found),
            DomainError::Iova(_) => domain.iova_tag(iova).map(|(t, _)| t),
            _ => return DmaError::Iommu(e),
        };
        match found.and_then(Record::from_tag) {
            Some(rec) => rec.mismatch(dma, want),
            None => DmaError::NotMapped { dma, size: want.size },
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
        self.map_sg_reusing(bvecs, dir, attrs, DmaVec::default())
    }

    /// [`Device::map_sg`] building the result in `spare`'s allocation (a list that was unmapped
    /// and is no longer needed): what a driver that keeps one `sg_table` per object and remaps
    /// it does, with no allocation in steady state. `spare`'s contents are discarded.
    ///
    /// # Errors
    /// As [`Device::map_sg`].
    pub fn map_sg_reusing(
        &self,
        bvecs: &[BioVec],
        dir: Direction,
        attrs: Attrs,
        spare: DmaVec,
    ) -> Result<DmaVec, DmaError> {
        if bvecs.is_empty() {
            return Err(DmaError::ZeroSize);
        }
        let mut segs = spare.segs;
        segs.clear();
        if !self.is_translated() {
            return self.map_sg_direct(bvecs, dir, segs);
        }
        // Every segment is checked before anything is mapped: non-empty, not wrapping.
        Self::check_segments(bvecs)?;
        let domain = match self.current_domain()? {
            None => return self.map_sg_direct(bvecs, dir, segs),
            Some(_)
                if bvecs.iter().any(|b| {
                    self.needs_bounce(PhysAddr::new(b.phys.as_u64() + u64::from(b.offset)), u64::from(b.len))
                }) =>
            {
                // An untrusted device with partial pages: each segment mapped (and bounced) on
                // its own.
                return self.map_each(bvecs, dir, attrs, MapKind::Sg);
            }
            Some(d) => d,
        };
        if attrs.mmio {
            return Err(DmaError::PeerToPeer(bvecs[0].phys));
        }
        let mut expanded = Vec::with_capacity(bvecs.len());
        let mut total = 0u64;
        for b in bvecs {
            let size = u64::from(b.len);
            let phys = PhysAddr::new(b.phys.as_u64() + u64::from(b.offset));
            let pad = phys.as_u64() % GRANULE;
            let len = align_up(pad + size).ok_or(DmaError::Overflow { phys, size })?;
            let seg_len = u32::try_from(len).map_err(|_| DmaError::Overflow { phys, size })?;
            expanded.push(BioVec { phys: PhysAddr::new(phys.as_u64() - pad), offset: 0, len: seg_len });
            total = total.checked_add(len).ok_or(DmaError::Overflow { phys, size })?;
        }
        let tag = self.record(dir, MapKind::Sg, 0, total).tag();
        let iova = domain.alloc_iova_tagged(total, tag)?;
        if let Err(e) = domain.map(iova, granule_source(&expanded), dir.prot()) {
            if let Ok(r) = domain.retire_iova_tagged(iova, total, tag) {
                let _ = domain.free_retired(r);
            }
            return Err(e.into());
        }
        let mut out = DmaVec { segs, kind: Some(MapKind::Sg), ..DmaVec::default() };
        let mut at = iova.as_u64();
        for (b, e) in bvecs.iter().zip(&expanded) {
            let pad = (b.phys.as_u64() + u64::from(b.offset)) % GRANULE;
            // Cannot fail: non-empty and inside the IOVA range just mapped.
            let _ = out.push(DmaAddr::new(at + pad), u64::from(b.len));
            at += u64::from(e.len);
        }
        out.iova = Some((iova, total));
        Ok(out)
    }

    /// `map_sg` of a direct device: every segment's physical address, if the device reaches it,
    /// physically adjacent ones merged; ONE dma-debug record for the whole list (under its first
    /// DMA address, with its total size), as dma-debug keeps one entry per `dma_map_sg` call's
    /// list. One pass, no lock per segment.
    /// Every segment of a `map_sg` array is checked before anything is mapped: non-empty, not
    /// wrapping.
    fn check_segments(bvecs: &[BioVec]) -> Result<(), DmaError> {
        for b in bvecs {
            let size = u64::from(b.len);
            let phys = b.start().ok_or(DmaError::Overflow { phys: b.phys, size })?;
            phys_span(phys, size)?;
        }
        Ok(())
    }

    fn map_sg_direct(&self, bvecs: &[BioVec], dir: Direction, segs: Vec<DmaSeg>) -> Result<DmaVec, DmaError> {
        // One fused pass; on any refusal the array-wide checks run first, so the error is the
        // one `map_sg` names for every device (the first malformed segment before any reach).
        self.map_sg_direct_pass(bvecs, dir, segs).or_else(|e| {
            Self::check_segments(bvecs)?;
            Err(e)
        })
    }

    fn map_sg_direct_pass(
        &self,
        bvecs: &[BioVec],
        dir: Direction,
        mut segs: Vec<DmaSeg>,
    ) -> Result<DmaVec, DmaError> {
        let Path::Direct { bits } = self.path else { unreachable!("direct path") };
        // Everything reachable lies below `limit` (the arena's end bounds real pages anyway).
        let limit = if bits < 64 { 1u64 << bits } else { u64::MAX };
        segs.reserve(bvecs.len());
        let mut total = 0u64;
        for b in bvecs {
            let size = u64::from(b.len);
            let phys = b.start().ok_or(DmaError::Overflow { phys: b.phys, size })?;
            let end = phys_span(phys, size)?.end();
            if end > limit {
                return Err(DmaError::AddressLimit { phys, size, bits });
            }
            let addr = phys.as_u64();
            match segs.last_mut() {
                // Merge a physically adjacent segment (lengths stay below 2^64: the sum of
                // 32-bit lengths of one array).
                Some(last) if last.addr.as_u64() + last.len == addr => last.len += size,
                _ => segs.push(DmaSeg { addr: DmaAddr::new(addr), len: size }),
            }
            total += size;
        }
        let rec = self.record(dir, MapKind::Sg, 0, total);
        self.state.direct.lock().entry(segs[0].addr.as_u64()).or_default().push(rec);
        Ok(DmaVec { segs, kind: Some(MapKind::Sg), ..DmaVec::default() })
    }

    /// `dma_map_sg` of a direct device without building a list: checks that the device reaches
    /// every segment of `pages` (non-empty, not wrapping, below its address width: in O(1) from
    /// the array's summary when it can tell) and records
    /// the mapping (one dma-debug record, as for [`Device::map_sg`]). The DMA address of each
    /// segment is its physical address, so the caller keeps using `bvecs` itself as the DMA list
    /// (see [`crate::pt::MapSource::DirectPageVecs`]): one vectorizable pass, no allocation.
    ///
    /// # Errors
    /// [`DmaError::NotDirect`] for a translated device, [`DmaError::ZeroSize`] (also for an
    /// empty array), [`DmaError::Overflow`], [`DmaError::AddressLimit`]; nothing is recorded
    /// then.
    pub fn map_direct(&self, pages: &PageArray, dir: Direction, attrs: Attrs) -> Result<DirectMap, DmaError> {
        let Path::Direct { bits } = self.path else { return Err(DmaError::NotDirect(self.id)) };
        let _ = attrs;
        let bvecs = pages.pages();
        if bvecs.is_empty() {
            return Err(DmaError::ZeroSize);
        }
        let limit = if bits < 64 { 1u64 << bits } else { u64::MAX };
        // The array's summary vouches for it in O(1); the exact checks run only when it cannot.
        let sum = *pages.summary();
        let total = sum.total;
        if sum.min_len == 0 || !sum.all_below(limit) {
            let exact = bvecs.iter().all(|b| b.end().is_some_and(|e| e.as_u64() <= limit));
            if exact && sum.min_len > 0 {
                return self.record_direct(bvecs, dir, total);
            }
            Self::check_segments(bvecs)?;
            let b = bvecs
                .iter()
                .find(|b| b.start().is_some_and(|p| p.as_u64() + u64::from(b.len) > limit))
                .copied()
                .unwrap_or(bvecs[0]);
            let phys = b.start().unwrap_or(b.phys);
            return Err(DmaError::AddressLimit { phys, size: u64::from(b.len), bits });
        }
        self.record_direct(bvecs, dir, total)
    }

    /// Records an in-place direct mapping of `total` bytes.
    fn record_direct(&self, bvecs: &[BioVec], dir: Direction, total: u64) -> Result<DirectMap, DmaError> {
        let first = bvecs[0].start().unwrap_or(bvecs[0].phys);
        let rec = self.record(dir, MapKind::Sg, 0, total);
        self.state.direct.lock().entry(first.as_u64()).or_default().push(rec);
        Ok(DirectMap { dev: self.id, first: DmaAddr::new(first.as_u64()), total, count: bvecs.len() })
    }

    /// Undoes [`Device::map_direct`] with the direction it was mapped with.
    ///
    /// # Errors
    /// [`DmaError::OtherDevice`] for another device's mapping, [`DmaError::NotMapped`] (unmapped
    /// twice), [`DmaError::DirectionMismatch`], [`DmaError::KindMismatch`]; nothing changes then.
    pub fn unmap_direct(&self, m: &DirectMap, dir: Direction, attrs: Attrs) -> Result<(), DmaError> {
        let _ = attrs;
        if m.dev != self.id {
            return Err(DmaError::OtherDevice { dma: m.first, owner: m.dev });
        }
        let want = self.record(dir, MapKind::Sg, 0, m.total);
        self.state.direct_record(m.first, want, true).map(|_| ())
    }

    /// Maps every segment on its own, merging adjacent results; undoes them all if one fails.
    pub(super) fn map_each(
        &self,
        bvecs: &[BioVec],
        dir: Direction,
        attrs: Attrs,
        kind: MapKind,
    ) -> Result<DmaVec, DmaError> {
        let mut out = DmaVec { kind: Some(kind), ..DmaVec::default() };
        for b in bvecs {
            let size = u64::from(b.len);
            let mapped = b
                .start()
                .ok_or(DmaError::Overflow { phys: b.phys, size })
                .and_then(|phys| self.map_one(phys, size, dir, attrs, kind));
            match mapped.and_then(|d| out.push(d, size).map(|()| d)) {
                Ok(d) => out.pieces.push((d, size)),
                Err(e) => {
                    for &(d, n) in &out.pieces {
                        let _ = self.unmap_one(d, n, dir, attrs, kind);
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Undoes [`Device::map_sg`], with the direction it was mapped with.
    ///
    /// # Errors
    /// [`DmaError::NotMapped`] (a list `map_sg` did not make, or unmapped twice),
    /// [`DmaError::DirectionMismatch`], [`DmaError::OtherDevice`], [`DmaError::KindMismatch`];
    /// nothing changes then.
    pub fn unmap_sg(&self, v: &DmaVec, dir: Direction, attrs: Attrs) -> Result<(), DmaError> {
        if v.kind != Some(MapKind::Sg) {
            let dma = v.segs.first().map_or(DmaAddr::ZERO, |s| s.addr);
            return Err(DmaError::NotMapped { dma, size: v.total_len() });
        }
        self.with_domain(|domain| {
            if let Some((iova, total)) = v.iova {
                let domain = domain.ok_or(DmaError::NotAttached(self.id))?;
                let want = self.record(dir, MapKind::Sg, 0, total);
                let retired = domain
                    .retire_iova_tagged(iova, total, want.tag())
                    .map_err(|e| self.refusal(domain, iova, iova, want, e))?;
                let unmapped = domain.unmap(iova, total);
                let _ = domain.free_retired(retired);
                return unmapped.map(|_| ()).map_err(DmaError::Iommu);
            }
            if domain.is_none() && v.pieces.is_empty() {
                // A direct device's list: its one record.
                let dma = v.segs.first().map_or(DmaAddr::ZERO, |s| s.addr);
                let want = self.record(dir, MapKind::Sg, 0, v.total_len());
                return self.state.direct_record(dma, want, true).map(|_| ());
            }
            // Pieces: check them all first, so that a refused unmap changes nothing.
            for &(d, size) in &v.pieces {
                self.check_mapped(domain, d, size, dir, MapKind::Sg)?;
            }
            for &(d, size) in &v.pieces {
                self.unmap_in(domain, d, size, dir, attrs, MapKind::Sg)?;
            }
            Ok(())
        })
    }
}

/// What [`Device::map_direct`] mapped: a direct device's page array, addressed at its physical
/// addresses. Hand it back to [`Device::unmap_direct`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a direct mapping stays recorded until Device::unmap_direct"]
pub struct DirectMap {
    dev: DeviceId,
    first: DmaAddr,
    total: u64,
    count: usize,
}

impl DirectMap {
    /// DMA address of the first byte.
    #[must_use]
    pub fn addr(&self) -> DmaAddr {
        self.first
    }

    /// Bytes mapped.
    #[must_use]
    pub fn total_len(&self) -> u64 {
        self.total
    }

    /// Segments mapped.
    #[must_use]
    pub fn segments(&self) -> usize {
        self.count
    }
}
