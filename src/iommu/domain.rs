//! Domains: an I/O address space with its table, IOVA allocator, fault log and invalidation
//! mode, and the strict and lazy invalidation that keep its IOTLB entries true.
#![forbid(unsafe_code)]

use crate::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sync::{Mutex, Rank, RwLock};

use super::fault::FaultLog;
use super::iotlb::Iotlb;
use super::iova::{ForeignToken, IovaAllocator, IovaError, IovaTag, IovaView, RetiredIova};
use super::{DomainId, Inner};
use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr, Span, SpanError};
use crate::pt::{
    Invalidation, MapError, MapOptions, MapSource, MapStats, PageTable, Prot, TableView, Translated,
    UnmapError, X86Iommu,
};
use std::sync::Weak;

/// What a domain translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainKind {
    /// IOVA → physical through a page table.
    Translated,
    /// No translation: the device reaches physical address = IOVA (bypass / passthrough).
    Identity,
}

/// When unmaps reach the IOTLB (see the module docs for what each promises).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Invalidate before unmap returns.
    Strict,
    /// Queue invalidations; flush in batches (≤ 256 entries, ≤ 10 ms).
    Lazy,
}

/// How to build a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainConfig {
    /// Translated or identity.
    pub kind: DomainKind,
    /// Strict or lazy invalidation.
    pub mode: Mode,
    /// First IOVA (page aligned, above 0; the IOVA allocator never returns address 0).
    pub aperture_start: DmaAddr,
    /// Width of the aperture: IOVAs stay below `1 << aperture_bits` (at most 48).
    pub aperture_bits: u32,
    /// Lazy mode: how old the oldest queued entry may get before the background flush
    /// ([`FLUSH_TIMEOUT`] by default). The background thread looks every 5 ms, so the window
    /// of lazy mode is at most this long plus 5 ms (or 256 queued unmaps, whichever comes
    /// first).
    pub flush_timeout: Duration,
}

impl Default for DomainConfig {
    fn default() -> Self {
        DomainConfig {
            kind: DomainKind::Translated,
            mode: Mode::Strict,
            aperture_start: DmaAddr::new(PAGE_SIZE),
            aperture_bits: 48,
            flush_timeout: FLUSH_TIMEOUT,
        }
    }
}

/// Lazy mode: flush when this many unmaps and frees are queued.
pub const FLUSH_QUEUE_MAX: usize = 256;
/// Lazy mode: flush when the oldest queued entry is this old.
pub const FLUSH_TIMEOUT: Duration = Duration::from_millis(10);
/// Errors of a domain's map and unmap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The request leaves the aperture.
    #[error("[{iova}, +{len:#x}) is outside the aperture of domain {domain}")]
    OutsideAperture {
        /// The domain.
        domain: DomainId,
        /// Start.
        iova: DmaAddr,
        /// Length.
        len: u64,
    },
    /// An identity domain has no table to map into.
    #[error("domain {0} is an identity domain: it has no page table")]
    Identity(DomainId),
    /// A zero-length request.
    #[error("zero-length request")]
    ZeroLength,
    /// `iova + len` wraps past 2^64.
    #[error("[{iova}, +{len:#x}) wraps past 2^64")]
    Overflow {
        /// Start.
        iova: DmaAddr,
        /// Length.
        len: u64,
    },
    /// The domain was destroyed: its handle is stale.
    #[error("domain {0} was destroyed")]
    Destroyed(DomainId),
    /// Nothing was mapped in the range to unmap.
    #[error("nothing is mapped in [{iova}, +{len:#x})")]
    NotMapped {
        /// Start.
        iova: DmaAddr,
        /// Length.
        len: u64,
    },
    /// The table refused the map.
    #[error(transparent)]
    Map(#[from] MapError<DmaAddr>),
    /// The table refused the unmap.
    #[error(transparent)]
    Unmap(#[from] UnmapError<DmaAddr>),
    /// The IOVA allocator refused.
    #[error(transparent)]
    Iova(#[from] IovaError),
}

/// Serial numbers of domains.
static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

#[derive(Default)]
pub(super) struct FlushQueue {
    invalidations: Vec<Invalidation<DmaAddr>>,
    iovas: Vec<RetiredIova>,
    oldest: Option<Instant>,
}

impl FlushQueue {
    fn len(&self) -> usize {
        self.invalidations.len() + self.iovas.len()
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.invalidations
            .iter()
            .any(|i| i.range().is_some_and(|(s, l)| s.as_u64() < end && start < s.as_u64() + l))
            || self.iovas.iter().any(|r| r.addr().as_u64() < end && start < r.addr().as_u64() + r.size())
    }
}

/// An I/O address space. Created by [`super::Iommu::create_domain`].
pub struct Domain {
    pub(super) id: DomainId,
    pub(super) kind: DomainKind,
    pub(super) mode: Mode,
    pub(super) flush_timeout: Duration,
    pub(super) aperture: (u64, u64),
    pub(super) owner: Weak<Inner>,
    pub(super) iotlb: Arc<Iotlb>,
    pub(super) table: Option<PageTable<X86Iommu>>,
    pub(super) iova: Option<IovaAllocator>,
    /// The locked IOTLB fill (faults, lost races) walks holding it shared; invalidations hold it
    /// exclusive. Lock-free fills take no lock (see `iotlb`).
    pub(super) inv_lock: RwLock<()>,
    fq: Mutex<FlushQueue>,
    pub(super) faults: FaultLog,
    pub(super) devices: AtomicU32,
    pub(super) destroyed: AtomicBool,
    /// Unique among all domains of the process, never reused (ids are).
    serial: u64,
}

impl core::fmt::Debug for Domain {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Domain")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("mode", &self.mode)
            .field("devices", &self.devices.load(Ordering::Relaxed))
            .finish()
    }
}

impl Domain {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        id: DomainId,
        cfg: &DomainConfig,
        aperture: (u64, u64),
        owner: Weak<Inner>,
        iotlb: Arc<Iotlb>,
        table: Option<PageTable<X86Iommu>>,
        iova: Option<IovaAllocator>,
    ) -> Self {
        Domain {
            id,
            kind: cfg.kind,
            mode: cfg.mode,
            flush_timeout: cfg.flush_timeout,
            aperture,
            owner,
            iotlb,
            table,
            iova,
            inv_lock: RwLock::new((), Rank::Invalidation),
            fq: Mutex::new(FlushQueue::default(), Rank::FlushQueue),
            faults: FaultLog::default(),
            devices: AtomicU32::new(0),
            destroyed: AtomicBool::new(false),
            serial: SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The domain id (its IOTLB tag).
    #[must_use]
    pub fn id(&self) -> DomainId {
        self.id
    }

    /// Translated or identity.
    #[must_use]
    pub fn kind(&self) -> DomainKind {
        self.kind
    }

    /// Strict or lazy.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The aperture `[start, end)`.
    #[must_use]
    pub fn aperture(&self) -> (DmaAddr, DmaAddr) {
        (DmaAddr::new(self.aperture.0), DmaAddr::new(self.aperture.1))
    }

    /// A read-only view of the domain's page table (`None` for an identity domain). Only the
    /// domain changes its table, so that no change can bypass its IOTLB invalidation:
    ///
    /// ```compile_fail
    /// # use std::sync::Arc;
    /// # use vmbind::{addr::DmaAddr, iommu::{DomainConfig, Iommu}, mem::PhysMem};
    /// let iommu = Iommu::new(Arc::new(PhysMem::new(1 << 20).unwrap()));
    /// let d = iommu.create_domain(DomainConfig::default()).unwrap();
    /// let _ = d.table().unwrap().unmap(DmaAddr::new(0x1000), 4096); // no unmap behind the IOTLB
    /// ```
    #[must_use]
    pub fn table(&self) -> Option<TableView<'_, X86Iommu>> {
        self.table.as_ref().map(PageTable::view)
    }

    /// A read-only view of the domain's IOVA allocator (`None` for an identity domain): counts
    /// and free ranges. Allocation and frees go through the domain, which pairs them with its
    /// unmaps and flushes.
    #[must_use]
    pub fn iova(&self) -> Option<IovaView<'_>> {
        self.iova.as_ref().map(IovaAllocator::view)
    }

    /// A number no other domain of the process has had or will have (ids are reused): what
    /// layers above key their per-domain records by.
    pub(crate) fn serial(&self) -> u64 {
        self.serial
    }

    /// Whether the domain was destroyed ([`super::Iommu::destroy_domain`]): every operation on
    /// it is then refused with [`DomainError::Destroyed`].
    #[must_use]
    pub fn is_destroyed(&self) -> bool {
        self.destroyed.load(Ordering::Acquire)
    }

    fn live(&self) -> Result<(), DomainError> {
        if self.destroyed.load(Ordering::Acquire) {
            return Err(DomainError::Destroyed(self.id));
        }
        Ok(())
    }

    /// The domain's fault log.
    #[must_use]
    pub fn faults(&self) -> &FaultLog {
        &self.faults
    }

    /// Devices attached now.
    #[must_use]
    pub fn device_count(&self) -> u32 {
        self.devices.load(Ordering::Relaxed)
    }

    fn check_aperture(&self, iova: DmaAddr, len: u64) -> Result<(), DomainError> {
        match Span::within(iova, len, self.aperture.1) {
            Ok(_) if iova.as_u64() >= self.aperture.0 => Ok(()),
            Err(SpanError::Overflow { .. }) => Err(DomainError::Overflow { iova, len }),
            _ => Err(DomainError::OutsideAperture { domain: self.id, iova, len }),
        }
    }

    fn table_or_err(&self) -> Result<&PageTable<X86Iommu>, DomainError> {
        self.live()?;
        self.table.as_ref().ok_or(DomainError::Identity(self.id))
    }

    fn iova_or_err(&self) -> Result<&IovaAllocator, DomainError> {
        self.live()?;
        self.iova.as_ref().ok_or(DomainError::Identity(self.id))
    }

    /// Maps `src` at `iova` (callers that manage IOVA themselves, like iommufd's IOAS; or after
    /// [`Domain::alloc_iova`]). In lazy mode a map over a range whose unmap is still queued
    /// flushes the queue first, so no stale translation survives a remap.
    ///
    /// # Errors
    /// [`DomainError::OutsideAperture`], [`DomainError::Identity`], or the table's
    /// [`MapError`]; nothing changes on error.
    pub fn map(&self, iova: DmaAddr, src: MapSource<'_>, prot: Prot) -> Result<MapStats, DomainError> {
        self.map_with(iova, src, prot, MapOptions::default())
    }

    /// [`Domain::map`] with explicit [`MapOptions`].
    ///
    /// # Errors
    /// As [`Domain::map`].
    pub fn map_with(
        &self,
        iova: DmaAddr,
        src: MapSource<'_>,
        prot: Prot,
        opts: MapOptions,
    ) -> Result<MapStats, DomainError> {
        let table = self.table_or_err()?;
        let len = src.len();
        self.check_aperture(iova, len.max(1))?;
        if self.mode == Mode::Lazy {
            let pending = {
                let fq = self.fq.lock();
                fq.len() > 0 && fq.overlaps(iova.as_u64(), iova.as_u64().saturating_add(len))
            };
            if pending {
                self.flush();
            }
        }
        Ok(table.map(iova, src, prot, opts)?)
    }

    /// Unmaps `[iova, iova + len)` and returns the bytes that were mapped there. Strict mode:
    /// invalidated before return. Lazy mode: queued (see the module docs).
    ///
    /// # Errors
    /// [`DomainError::OutsideAperture`], [`DomainError::Identity`], the table's
    /// [`UnmapError`], and [`DomainError::NotMapped`] when nothing was mapped there; nothing
    /// changes on error.
    pub fn unmap(&self, iova: DmaAddr, len: u64) -> Result<u64, DomainError> {
        self.unmap_with(iova, len, self.mode)
    }

    /// Unmaps and invalidates before returning, whatever the domain's mode (what the DMA API's
    /// `unlink` does: it is always strict).
    ///
    /// # Errors
    /// As [`Domain::unmap`].
    pub fn unmap_strict(&self, iova: DmaAddr, len: u64) -> Result<u64, DomainError> {
        self.unmap_with(iova, len, Mode::Strict)
    }

    /// Drops the IOTLB's translations of `[iova, iova + len)` in this domain: the one flush of a
    /// batch of maps (`iommu_iotlb_sync`), after which devices see exactly what the table holds.
    ///
    /// The IOTLB never caches a non-present entry (a walk that finds nothing faults and fills
    /// nothing), a map never replaces a present entry (it fails with `AlreadyMapped`), and a
    /// strict domain invalidates every unmapped range before the unmap returns. So in a strict
    /// domain the IOTLB can never hold an entry the table does not, and this call only
    /// validates its arguments: the one-shot DMA path (`map_phys` and friends) relies on that and
    /// pays no flush per mapping. In a lazy domain it drops the range's entries, which matters for
    /// a range whose unmap is still queued.
    ///
    /// # Errors
    /// [`DomainError::ZeroLength`], [`DomainError::Overflow`], [`DomainError::OutsideAperture`],
    /// [`DomainError::Destroyed`]; nothing is flushed then.
    pub fn sync(&self, iova: DmaAddr, len: u64) -> Result<(), DomainError> {
        self.live()?;
        if len == 0 {
            return Err(DomainError::ZeroLength);
        }
        self.check_aperture(iova, len)?;
        if self.mode == Mode::Strict {
            return Ok(());
        }
        let _walks_done = self.inv_lock.write();
        self.iotlb.invalidate_range(self.id, iova, len);
        Ok(())
    }

    fn unmap_with(&self, iova: DmaAddr, len: u64, mode: Mode) -> Result<u64, DomainError> {
        let table = self.table_or_err()?;
        self.check_aperture(iova, len.max(1))?;
        let inv = table.unmap(iova, len)?;
        let bytes = inv.unmapped_bytes();
        if bytes == 0 {
            return Err(DomainError::NotMapped { iova, len });
        }
        match mode {
            Mode::Strict => {
                // The freed tables' spans too: a lock-free fill may be walking through one.
                if let Some((s, l)) = inv.flush_range() {
                    let _walks_done = self.inv_lock.write();
                    self.iotlb.invalidate_range(self.id, s, l);
                }
                inv.complete();
            }
            Mode::Lazy => self.enqueue(|fq| fq.invalidations.push(inv)),
        }
        Ok(bytes)
    }

    fn enqueue(&self, push: impl FnOnce(&mut FlushQueue)) {
        let full = {
            let mut fq = self.fq.lock();
            push(&mut fq);
            fq.oldest.get_or_insert_with(Instant::now);
            fq.len() >= FLUSH_QUEUE_MAX
        };
        if full {
            self.flush();
        }
    }

    /// Translates on the CPU side (no IOTLB, no permission check).
    #[must_use]
    pub fn translate(&self, iova: DmaAddr) -> Option<Translated> {
        match &self.table {
            Some(t) => t.translate(iova),
            None => Some(Translated {
                pa: PhysAddr::new(iova.as_u64()),
                prot: Prot::RW,
                size: crate::addr::PageSize::Size4K,
            }),
        }
    }

    /// Allocates IOVA space in the aperture (top-down, per-CPU cached; see [`super::iova`]).
    ///
    /// # Errors
    /// [`DomainError::Identity`], or the allocator's [`IovaError`].
    pub fn alloc_iova(&self, size: u64) -> Result<DmaAddr, DomainError> {
        Ok(self.iova_or_err()?.alloc(size)?)
    }

    /// Allocates IOVA space ending at or below `limit` (a device's DMA mask + 1).
    ///
    /// # Errors
    /// As [`Domain::alloc_iova`].
    pub fn alloc_iova_below(&self, size: u64, limit: DmaAddr) -> Result<DmaAddr, DomainError> {
        Ok(self.iova_or_err()?.alloc_below(size, limit)?)
    }

    /// Allocates IOVA recording `tag` with it (for the DMA layer's mapping records): only a
    /// retire presenting the same tag ends it.
    pub(crate) fn alloc_iova_tagged(&self, size: u64, tag: IovaTag) -> Result<DmaAddr, DomainError> {
        let a = self.iova_or_err()?;
        Ok(a.alloc_tagged(size, a.end(), tag)?)
    }

    /// [`Domain::retire_iova`] of a tagged allocation.
    pub(crate) fn retire_iova_tagged(
        &self,
        addr: DmaAddr,
        size: u64,
        tag: IovaTag,
    ) -> Result<RetiredIova, DomainError> {
        Ok(self.iova_or_err()?.retire_tagged(addr, size, tag)?)
    }

    /// The tag and rounded size of the live IOVA allocation at `addr`.
    pub(crate) fn iova_tag(&self, addr: DmaAddr) -> Option<(IovaTag, u64)> {
        self.iova.as_ref()?.live_tag(addr)
    }

    /// Frees IOVA space. Strict: reusable at once. Lazy: the allocation ends now (a second free
    /// is an error) but the range is handed out again only after the next flush.
    ///
    /// # Errors
    /// [`DomainError::Identity`], or the allocator's [`IovaError`] (double free, wrong size...).
    pub fn free_iova(&self, addr: DmaAddr, size: u64) -> Result<(), DomainError> {
        let a = self.iova_or_err()?;
        match self.mode {
            Mode::Strict => a.free(addr, size)?,
            Mode::Lazy => {
                let r = a.retire(addr, size)?;
                self.enqueue(|fq| fq.iovas.push(r));
            }
        }
        Ok(())
    }

    /// Ends the allocation of `[addr, addr + size)` now (a second free of it is an error from
    /// here on) without making it reusable: hand the token to [`Domain::free_retired`] once the
    /// range is unmapped. Lets a caller validate a free before it changes anything else.
    ///
    /// # Errors
    /// [`DomainError::Identity`], or the allocator's [`IovaError`].
    pub fn retire_iova(&self, addr: DmaAddr, size: u64) -> Result<RetiredIova, DomainError> {
        Ok(self.iova_or_err()?.retire(addr, size)?)
    }

    /// Makes a retired range reusable: at once in strict mode, after the next flush in lazy mode.
    /// A token is bound to the allocator that retired it and is consumed by its release.
    ///
    /// # Errors
    /// [`ForeignToken`] (handing the token back, nothing changed) when the token was retired by
    /// another domain (or this is an identity domain, which retires nothing).
    pub fn free_retired(&self, r: RetiredIova) -> Result<(), ForeignToken> {
        let Some(a) = &self.iova else { return Err(ForeignToken { token: r }) };
        if !a.owns(&r) {
            return Err(ForeignToken { token: r });
        }
        match self.mode {
            Mode::Strict => a.release(r)?,
            Mode::Lazy => self.enqueue(|fq| fq.iovas.push(r)),
        }
        Ok(())
    }

    /// Lazy mode: flushes the queue now (one domain-wide IOTLB invalidation, then the queued
    /// table pages are freed and IOVAs released). Strict mode: nothing is ever queued.
    pub fn flush(&self) {
        // The queue stays locked until the IOTLB is clean, so that once `pending_flush` reads 0
        // no stale translation of a queued unmap can be used any more.
        let mut fq = self.fq.lock();
        if fq.len() == 0 {
            return;
        }
        {
            let _walks_done = self.inv_lock.write();
            self.iotlb.invalidate_domain(self.id);
        }
        let q = core::mem::take(&mut *fq);
        drop(fq);
        for inv in q.invalidations {
            inv.complete();
        }
        if let Some(t) = &self.table {
            // The whole domain was just invalidated: pages parked by any uncompleted
            // invalidation are safe to free too.
            t.release_parked();
        }
        if let Some(a) = &self.iova {
            for r in q.iovas {
                // Only this domain's own tokens are queued (`free_retired` checks).
                let _ = a.release(r);
            }
        }
    }

    /// Unmaps and frees queued in lazy mode and not yet flushed.
    #[must_use]
    pub fn pending_flush(&self) -> usize {
        self.fq.lock().len()
    }

    pub(super) fn flush_if_old(&self) {
        let old = self.fq.lock().oldest.is_some_and(|t| t.elapsed() >= self.flush_timeout);
        if old {
            self.flush();
        }
    }
}
