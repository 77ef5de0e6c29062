//! The dma-debug records: what each one-shot mapping records (device, direction, kind of call,
//! in-page offset, exact size: Linux's `struct dma_debug_entry`), kept in the IOVA allocation's
//! live record as its tag, the checks an unmap or sync makes against it, and the syncs.
#![forbid(unsafe_code)]

use std::collections::HashMap;

use super::bounce::{self, Bounce};
use super::{Device, Direction, DmaError, GRANULE, MapKind};
use crate::addr::DmaAddr;
use crate::iommu::iova::IovaTag;
use crate::iommu::{DeviceId, Domain};
use crate::sync::{Mutex, Rank};

/// What the DMA layer keeps per device, shared by every [`Device`] handle of it.
#[derive(Debug)]
pub(super) struct DevState {
    /// One-shot mappings of an untrusted device that bounce, by (domain serial, IOVA base): a
    /// device re-attached elsewhere gets the same IOVAs from another allocator.
    pub(super) bounced: Mutex<HashMap<(u64, u64), Vec<Bounce>>>,
    /// Direct devices: the records of their one-shot mappings, by DMA address.
    pub(super) direct: Mutex<HashMap<u64, Vec<Record>>>,
}

impl Default for DevState {
    fn default() -> Self {
        DevState {
            bounced: Mutex::new(HashMap::new(), Rank::Leaf),
            direct: Mutex::new(HashMap::new(), Rank::Leaf),
        }
    }
}

/// A one-shot mapping as dma-debug records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) dev: DeviceId,
    pub(super) dir: Direction,
    pub(super) kind: MapKind,
    /// In-page offset of the handle (the DMA address returned) from the IOVA base.
    pub(super) pad: u64,
    /// Exact size mapped.
    pub(super) size: u64,
}

const PRESENT: u64 = 1 << 63;

impl Record {
    /// The record as an IOVA tag: (size, device | direction | kind | pad | present).
    pub(super) fn tag(self) -> IovaTag {
        let dir = match self.dir {
            Direction::ToDevice => 0,
            Direction::FromDevice => 1,
            Direction::Bidirectional => 2,
        };
        let kind = match self.kind {
            MapKind::Single => 0,
            MapKind::Sg => 1,
            MapKind::TwoStep => 2,
        };
        IovaTag(self.size, PRESENT | u64::from(self.dev.0) | dir << 16 | kind << 18 | self.pad << 20)
    }

    /// The record a tag holds, if it is one of ours.
    pub(super) fn from_tag(t: IovaTag) -> Option<Record> {
        if t.1 & PRESENT == 0 {
            return None;
        }
        let dir = match (t.1 >> 16) & 3 {
            0 => Direction::ToDevice,
            1 => Direction::FromDevice,
            _ => Direction::Bidirectional,
        };
        let kind = match (t.1 >> 18) & 3 {
            0 => MapKind::Single,
            1 => MapKind::Sg,
            _ => MapKind::TwoStep,
        };
        Some(Record { dev: DeviceId(t.1 as u16), dir, kind, pad: (t.1 >> 20) & (GRANULE - 1), size: t.0 })
    }

    /// Why an unmap `given` of this mapping is refused (dma-debug's order: whose, which call,
    /// which size, which direction).
    pub(super) fn mismatch(self, dma: DmaAddr, given: Record) -> DmaError {
        if self.dev != given.dev {
            DmaError::OtherDevice { dma, owner: self.dev }
        } else if self.pad != given.pad {
            DmaError::NotMapped { dma, size: given.size }
        } else if self.kind != given.kind {
            DmaError::KindMismatch { dma, mapped: self.kind, given: given.kind }
        } else if self.size != given.size {
            DmaError::SizeMismatch { dma, mapped: self.size, unmapped: given.size }
        } else {
            DmaError::DirectionMismatch { dma, mapped: self.dir, given: given.dir }
        }
    }
}

impl DevState {
    /// A direct device's mapping at `dma` equal to `want` (removed with `take`), or why not.
    pub(super) fn direct_record(&self, dma: DmaAddr, want: Record, take: bool) -> Result<Record, DmaError> {
        let want = Record { pad: 0, ..want };
        let mut direct = self.direct.lock();
        let Some(recs) = direct.get_mut(&dma.as_u64()) else {
            return Err(DmaError::NotMapped { dma, size: want.size });
        };
        let Some(i) = recs.iter().position(|r| *r == want) else {
            return Err(recs[0].mismatch(dma, want));
        };
        if take {
            recs.swap_remove(i);
            if recs.is_empty() {
                direct.remove(&dma.as_u64());
            }
        }
        Ok(want)
    }
}

impl Device {
    /// The record of the mapping whose handle is `dma` in `domain` (`None`: a direct device),
    /// checked against `(size, dir, kind)`.
    pub(super) fn check_mapped(
        &self,
        domain: Option<&Domain>,
        dma: DmaAddr,
        size: u64,
        dir: Direction,
        kind: MapKind,
    ) -> Result<Record, DmaError> {
        let pad = dma.as_u64() % GRANULE;
        let want = self.record(dir, kind, pad, size);
        let rec = match domain {
            None => return self.state.direct_record(dma, want, false),
            Some(domain) => domain
                .iova_tag(DmaAddr::new(dma.as_u64() - pad))
                .and_then(|(t, _)| Record::from_tag(t))
                .ok_or(DmaError::NotMapped { dma, size })?,
        };
        if rec == want { Ok(rec) } else { Err(rec.mismatch(dma, want)) }
    }

    /// `dma_sync_single_range_for_cpu`: makes `[offset, offset + size)` of the mapping whose
    /// handle is `dma` (mapped with `mapped_size` bytes) visible to the CPU after the device
    /// wrote it. For a bounced mapping the device's bytes are copied back; the model's memory is
    /// otherwise coherent, so only the checks remain.
    ///
    /// # Errors
    /// [`DmaError::SyncOutOfRange`], [`DmaError::DirectionMismatch`], and the record checks of
    /// [`Device::unmap`]; nothing changes then.
    pub fn sync_for_cpu(
        &self,
        dma: DmaAddr,
        mapped_size: u64,
        offset: u64,
        size: u64,
        dir: Direction,
    ) -> Result<(), DmaError> {
        self.sync(dma, mapped_size, offset, size, dir, true)
    }

    /// `dma_sync_single_range_for_device`: hands `[offset, offset + size)` of the mapping back
    /// to the device after the CPU wrote it (a bounced mapping gets the CPU's bytes copied in).
    ///
    /// # Errors
    /// As [`Device::sync_for_cpu`].
    pub fn sync_for_device(
        &self,
        dma: DmaAddr,
        mapped_size: u64,
        offset: u64,
        size: u64,
        dir: Direction,
    ) -> Result<(), DmaError> {
        self.sync(dma, mapped_size, offset, size, dir, false)
    }

    fn sync(
        &self,
        dma: DmaAddr,
        mapped_size: u64,
        offset: u64,
        size: u64,
        dir: Direction,
        for_cpu: bool,
    ) -> Result<(), DmaError> {
        if size == 0 || mapped_size == 0 {
            return Err(DmaError::ZeroSize);
        }
        self.with_domain(|domain| {
            let rec = self.check_mapped(domain, dma, mapped_size, dir, MapKind::Single)?;
            if offset.checked_add(size).is_none_or(|e| e > rec.size) {
                return Err(DmaError::SyncOutOfRange { dma, offset, size, mapped: rec.size });
            }
            // Only a translated device bounces.
            let Some(domain) = domain else { return Ok(()) };
            let key = (domain.serial(), dma.as_u64() - rec.pad);
            if let Some(bounces) = self.state.bounced.lock().get(&key) {
                let lo = rec.pad + offset;
                bounce::sync_range(self.mem(), bounces, lo, lo + size, for_cpu);
            }
            Ok(())
        })
    }
}
