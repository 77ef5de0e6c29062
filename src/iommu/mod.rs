//! A software IOMMU: [`Iommu`], its [`Domain`]s, device attach/detach, a domain-tagged
//! [`iotlb::Iotlb`], strict and lazy invalidation, and device-side access that faults exactly
//! where hardware would.
//!
//! # Model
//!
//! - A **domain** is an I/O address space: a page table of the `pt` engine in the IOMMU format
//!   ([`crate::pt::X86Iommu`]), an aperture (48-bit by default), an IOVA allocator
//!   ([`iova::IovaAllocator`]), a fault log and an invalidation mode. An **identity** domain has
//!   no table: the device reaches physical address = IOVA (bypass).
//! - A **device** ([`DeviceId`], like a PCI requester id) is registered once, trusted or not,
//!   and attached to at most one domain at a time. Detach invalidates every IOTLB entry of the
//!   domain, and the device reaches nothing until attached again.
//! - **Device-side access** ([`Iommu::dma_read`], [`Iommu::dma_write`], 64-bit
//!   [`Iommu::dma_read_u64`] / [`Iommu::dma_write_u64`]) is how tests, the NVMe decoders and the
//!   GPU model act as the device: through the IOTLB, else a table walk that fills it, checking
//!   read/write permission page by page. A multi-page access is translated whole before any byte
//!   moves, so a faulting access reads or writes nothing. Every fault is returned as a typed
//!   [`DmaFault`] and appended to the domain's (or, for an unattached device, the IOMMU's) fault
//!   log: a bounded ring that counts what it had to drop.
//!
//! # Security model: strict and lazy invalidation
//!
//! **Strict** ([`Mode::Strict`]): [`Domain::unmap`] clears the table, then invalidates the
//! IOTLB for the range, waiting for table walks in flight (they hold the domain's invalidation
//! lock shared, the invalidation takes it exclusive), and only then returns. From that moment
//! every access to the range faults, including one whose translation had been cached. Table
//! pages are freed and IOVAs reusable immediately.
//!
//! **Lazy** ([`Mode::Lazy`], Linux's flush queue): unmap clears the table but queues the IOTLB
//! invalidation; the queue is flushed (one domain-wide invalidation) when it holds 256 entries,
//! when its oldest entry is 10 ms old (a background thread checks), on [`Domain::flush`], and
//! before a map that overlaps a queued range. Until then a device may still reach the old pages
//! through a cached translation: that bounded window (≤ 10 ms or 256 unmaps) is the price of
//! lazy mode. Within it, freed IOVAs are not handed out again and freed table pages not reused,
//! so the window never exposes memory the domain did not map.
#![forbid(unsafe_code)]

pub mod iotlb;
pub mod iova;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::addr::{DmaAddr, PAGE_SHIFT, PAGE_SIZE, PhysAddr};
use crate::mem::{MemError, PhysMem, Words};
use crate::pt::{
    Invalidation, MapError, MapOptions, MapSource, MapStats, PageTable, Prot, Translated, UnmapError,
    X86Iommu,
};
use iotlb::Iotlb;
use iova::{IovaAllocator, IovaError, RetiredIova};

/// A device's requester id (like PCI bus/device/function).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u16);

impl core::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "dev {:02x}:{:02x}.{}", self.0 >> 8, (self.0 >> 3) & 0x1f, self.0 & 7)
    }
}

/// A domain's id: 1..=65535 ([`iotlb::MAX_DOMAIN_ID`]), the tag of its IOTLB entries.
pub type DomainId = u16;

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
    /// ([`FLUSH_TIMEOUT`] by default). The window of lazy mode is at most this long.
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
/// Fault records kept per log before the oldest are dropped (and counted).
pub const FAULT_LOG_MAX: usize = 256;

/// A device access kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Device reads memory.
    Read,
    /// Device writes memory.
    Write,
}

/// Why a device access faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultReason {
    /// The device was never registered.
    UnknownDevice,
    /// The device is attached to no domain.
    NotAttached,
    /// Nothing is mapped at the IOVA.
    NotMapped,
    /// A mapping exists but does not allow the access.
    NotPermitted {
        /// What the mapping allows.
        prot: Prot,
    },
    /// The IOVA is outside the domain's aperture.
    OutsideAperture,
    /// The translation leads outside physical memory.
    BusError {
        /// The physical address reached.
        pa: PhysAddr,
    },
}

/// A device access that the IOMMU refused: the error of device-side calls and the record of
/// the fault logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("DMA fault: {device} {access:?} at {iova}: {reason:?}")]
pub struct DmaFault {
    /// Who accessed.
    pub device: DeviceId,
    /// The first faulting address.
    pub iova: DmaAddr,
    /// Read or write.
    pub access: Access,
    /// Why.
    pub reason: FaultReason,
}

/// A bounded ring of fault records that counts what it dropped.
#[derive(Debug, Default)]
pub struct FaultLog {
    ring: Mutex<VecDeque<DmaFault>>,
    dropped: AtomicU64,
}

impl FaultLog {
    fn record(&self, f: DmaFault) {
        let mut r = self.ring.lock();
        if r.len() == FAULT_LOG_MAX {
            r.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        r.push_back(f);
    }

    /// The records held, oldest first.
    #[must_use]
    pub fn records(&self) -> Vec<DmaFault> {
        self.ring.lock().iter().copied().collect()
    }

    /// Takes the records held, oldest first, leaving the ring empty.
    pub fn take(&self) -> Vec<DmaFault> {
        self.ring.lock().drain(..).collect()
    }

    /// Records dropped because the ring was full.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Errors of IOMMU and domain management.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IommuError {
    /// The device id is already registered.
    #[error("{0} is already registered")]
    AlreadyRegistered(DeviceId),
    /// The device id was never registered.
    #[error("{0} is not registered")]
    UnknownDevice(DeviceId),
    /// The device is attached (to the named domain) and must be detached first.
    #[error("{device} is already attached to domain {domain}")]
    AlreadyAttached {
        /// The device.
        device: DeviceId,
        /// Its current domain.
        domain: DomainId,
    },
    /// The device is attached to no domain.
    #[error("{0} is not attached")]
    NotAttached(DeviceId),
    /// The domain belongs to another IOMMU or was destroyed.
    #[error("domain {0} does not belong to this IOMMU")]
    ForeignDomain(DomainId),
    /// Devices are still attached to the domain.
    #[error("domain {domain} still has {devices} device(s) attached")]
    DomainBusy {
        /// The domain.
        domain: DomainId,
        /// Attached devices.
        devices: u32,
    },
    /// All 65535 domain ids are in use.
    #[error("no free domain id")]
    TooManyDomains,
    /// A bad domain configuration.
    #[error("bad domain configuration: {0}")]
    BadConfig(&'static str),
    /// The arena has no room for the domain's root table.
    #[error(transparent)]
    Mem(#[from] MemError),
}

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

#[derive(Default)]
struct FlushQueue {
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

/// An I/O address space. Created by [`Iommu::create_domain`].
pub struct Domain {
    id: DomainId,
    kind: DomainKind,
    mode: Mode,
    flush_timeout: Duration,
    aperture: (u64, u64),
    owner: Weak<Inner>,
    iotlb: Arc<Iotlb>,
    table: Option<PageTable<X86Iommu>>,
    iova: Option<IovaAllocator>,
    /// Table walks that fill the IOTLB hold it shared; invalidations hold it exclusive.
    inv_lock: RwLock<()>,
    fq: Mutex<FlushQueue>,
    faults: FaultLog,
    devices: AtomicU32,
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

    /// The domain's page table (`None` for an identity domain).
    #[must_use]
    pub fn table(&self) -> Option<&PageTable<X86Iommu>> {
        self.table.as_ref()
    }

    /// The domain's IOVA allocator (`None` for an identity domain).
    #[must_use]
    pub fn iova(&self) -> Option<&IovaAllocator> {
        self.iova.as_ref()
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
        let s = iova.as_u64();
        match s.checked_add(len) {
            Some(e) if s >= self.aperture.0 && e <= self.aperture.1 => Ok(()),
            _ => Err(DomainError::OutsideAperture { domain: self.id, iova, len }),
        }
    }

    fn table_or_err(&self) -> Result<&PageTable<X86Iommu>, DomainError> {
        self.table.as_ref().ok_or(DomainError::Identity(self.id))
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
    pub fn sync(&self, iova: DmaAddr, len: u64) {
        let _walks_done = self.inv_lock.write();
        self.iotlb.invalidate_range(self.id, iova.as_u64(), len);
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
                if let Some((s, l)) = inv.range() {
                    let _walks_done = self.inv_lock.write();
                    self.iotlb.invalidate_range(self.id, s.as_u64(), l);
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

    /// Allocates IOVA space in the aperture (top-down, per-CPU cached; see [`iova`]).
    ///
    /// # Errors
    /// [`DomainError::Identity`], or the allocator's [`IovaError`].
    pub fn alloc_iova(&self, size: u64) -> Result<DmaAddr, DomainError> {
        Ok(self.iova.as_ref().ok_or(DomainError::Identity(self.id))?.alloc(size)?)
    }

    /// Allocates IOVA space ending at or below `limit` (a device's DMA mask + 1).
    ///
    /// # Errors
    /// As [`Domain::alloc_iova`].
    pub fn alloc_iova_below(&self, size: u64, limit: DmaAddr) -> Result<DmaAddr, DomainError> {
        Ok(self.iova.as_ref().ok_or(DomainError::Identity(self.id))?.alloc_below(size, limit)?)
    }

    /// Frees IOVA space. Strict: reusable at once. Lazy: the allocation ends now (a second free
    /// is an error) but the range is handed out again only after the next flush.
    ///
    /// # Errors
    /// [`DomainError::Identity`], or the allocator's [`IovaError`] (double free, wrong size...).
    pub fn free_iova(&self, addr: DmaAddr, size: u64) -> Result<(), DomainError> {
        let a = self.iova.as_ref().ok_or(DomainError::Identity(self.id))?;
        match self.mode {
            Mode::Strict => a.free(addr, size)?,
            Mode::Lazy => self.free_retired(a.retire(addr, size)?),
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
        Ok(self.iova.as_ref().ok_or(DomainError::Identity(self.id))?.retire(addr, size)?)
    }

    /// Makes a retired range reusable: at once in strict mode, after the next flush in lazy mode.
    pub fn free_retired(&self, r: RetiredIova) {
        match (self.mode, &self.iova) {
            (Mode::Strict, Some(a)) => a.release(r),
            (Mode::Lazy, Some(_)) => self.enqueue(|fq| fq.iovas.push(r)),
            (_, None) => drop(r),
        }
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
        drop(q.invalidations);
        if let Some(a) = &self.iova {
            for r in q.iovas {
                a.release(r);
            }
        }
    }

    /// Unmaps and frees queued in lazy mode and not yet flushed.
    #[must_use]
    pub fn pending_flush(&self) -> usize {
        self.fq.lock().len()
    }

    fn flush_if_old(&self) {
        let old = self.fq.lock().oldest.is_some_and(|t| t.elapsed() >= self.flush_timeout);
        if old {
            self.flush();
        }
    }
}

// A device word: when attached to a *translated* domain, that domain's IOTLB lookup key (its id
// in bits 48..64 and its index offset in bits 0..18, see `iotlb::domain_key`), so the hit path
// uses the word as loaded; bits 18..34 the attached domain id of any kind; then flags.
const DEV_FAST: u64 = iotlb::KEY_DOMAIN | iotlb::KEY_OFFSET;
const DEV_DOMAIN_SHIFT: u32 = 18;
const DEV_DOMAIN: u64 = 0xffff << DEV_DOMAIN_SHIFT;
const DEV_IDENTITY: u64 = 1 << 34;
const DEV_TRUSTED: u64 = 1 << 35;
const DEV_REGISTERED: u64 = 1 << 36;
const _: () = assert!(DEV_FAST & (DEV_DOMAIN | DEV_IDENTITY | DEV_TRUSTED | DEV_REGISTERED) == 0);

fn attached_domain(v: u64) -> u16 {
    ((v & DEV_DOMAIN) >> DEV_DOMAIN_SHIFT) as u16
}

struct Inner {
    mem: Arc<PhysMem>,
    iotlb: Arc<Iotlb>,
    /// One word per requester id: fixed size, so a `u16` index needs no bounds check.
    devices: Box<[AtomicU64; 65536]>,
    /// Per domain id, the root table of the translated domain that has it (0: none), for IOTLB
    /// fills that take no lock. Set before any device can attach, cleared before the domain's
    /// entries are forgotten.
    roots: Box<[AtomicU64; 65536]>,
    domains: RwLock<Vec<Option<Arc<Domain>>>>,
    faults: FaultLog,
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop: AtomicBool,
}

/// Facts about a registered device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Whether the device is trusted (untrusted devices get bounce buffering in the DMA layer).
    pub trusted: bool,
    /// The domain it is attached to.
    pub domain: Option<DomainId>,
}

/// A software IOMMU over a [`PhysMem`] arena.
///
/// ```
/// use std::sync::Arc;
/// use vmbind::addr::DmaAddr;
/// use vmbind::iommu::{DeviceId, DomainConfig, Iommu};
/// use vmbind::mem::PhysMem;
/// use vmbind::pt::{MapSource, Prot};
///
/// let mem = Arc::new(PhysMem::new(64 << 20).unwrap());
/// let iommu = Iommu::new(mem.clone());
/// let dom = iommu.create_domain(DomainConfig::default()).unwrap();
/// let nic = DeviceId(0x0100);
/// iommu.register_device(nic, true).unwrap();
/// iommu.attach(nic, &dom).unwrap();
///
/// let page = mem.alloc_frame().unwrap();
/// mem.write(page, b"ping").unwrap();
/// let iova = dom.alloc_iova(4096).unwrap();
/// dom.map(iova, MapSource::Pages(&[page]), Prot::READ).unwrap();
/// let mut buf = [0u8; 4];
/// iommu.dma_read(nic, iova, &mut buf).unwrap();
/// assert_eq!(&buf, b"ping");
/// assert!(iommu.dma_write(nic, iova, b"pong").is_err()); // read-only: a fault, logged
/// assert_eq!(dom.faults().records().len(), 1);
/// ```
#[derive(Clone)]
pub struct Iommu {
    inner: Arc<Inner>,
}

impl core::fmt::Debug for Iommu {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Iommu").field("iotlb_entries", &self.inner.iotlb.capacity()).finish()
    }
}

impl Iommu {
    /// An IOMMU with a [`iotlb::IOTLB_ENTRIES`]-entry IOTLB.
    #[must_use]
    pub fn new(mem: Arc<PhysMem>) -> Self {
        let devices: Vec<AtomicU64> = (0..=u16::MAX).map(|_| AtomicU64::new(0)).collect();
        let Ok(devices) = devices.into_boxed_slice().try_into() else { unreachable!("65536 device words") };
        let roots: Vec<AtomicU64> = (0..=u16::MAX).map(|_| AtomicU64::new(0)).collect();
        let Ok(roots) = roots.into_boxed_slice().try_into() else { unreachable!("65536 root words") };
        Iommu {
            inner: Arc::new(Inner {
                mem,
                iotlb: Arc::new(Iotlb::new()),
                devices,
                roots,
                domains: RwLock::new(Vec::new()),
                faults: FaultLog::default(),
                flusher: Mutex::new(None),
                stop: AtomicBool::new(false),
            }),
        }
    }

    /// The arena devices reach.
    #[must_use]
    pub fn mem(&self) -> &Arc<PhysMem> {
        &self.inner.mem
    }

    /// The shared IOTLB.
    #[must_use]
    pub fn iotlb(&self) -> &Iotlb {
        &self.inner.iotlb
    }

    /// Faults of devices that had no domain.
    #[must_use]
    pub fn faults(&self) -> &FaultLog {
        &self.inner.faults
    }

    /// Creates a domain.
    ///
    /// # Errors
    /// [`IommuError::BadConfig`] (aperture), [`IommuError::TooManyDomains`],
    /// [`IommuError::Mem`] when the arena has no frame for the root table.
    pub fn create_domain(&self, cfg: DomainConfig) -> Result<Arc<Domain>, IommuError> {
        if cfg.aperture_bits == 0 || cfg.aperture_bits > 48 {
            return Err(IommuError::BadConfig("aperture_bits must be 1..=48"));
        }
        let end = 1u64 << cfg.aperture_bits;
        let start = cfg.aperture_start.as_u64();
        if start == 0 || start % PAGE_SIZE != 0 || start >= end {
            return Err(IommuError::BadConfig(
                "aperture_start must be page aligned, above 0 and below the end",
            ));
        }
        let (table, iova) = match cfg.kind {
            DomainKind::Translated => {
                let t = PageTable::new(self.inner.mem.clone())?;
                let a = IovaAllocator::new(DmaAddr::new(start), DmaAddr::new(end))
                    .map_err(|_| IommuError::BadConfig("aperture"))?;
                (Some(t), Some(a))
            }
            DomainKind::Identity => (None, None),
        };
        let mut domains = self.inner.domains.write();
        let slot = match domains.iter().position(Option::is_none) {
            Some(i) => i,
            None if domains.len() < usize::from(iotlb::MAX_DOMAIN_ID) => {
                domains.push(None);
                domains.len() - 1
            }
            None => return Err(IommuError::TooManyDomains),
        };
        let d = Arc::new(Domain {
            id: (slot + 1) as DomainId,
            kind: cfg.kind,
            mode: cfg.mode,
            flush_timeout: cfg.flush_timeout,
            aperture: (start, end),
            owner: Arc::downgrade(&self.inner),
            iotlb: self.inner.iotlb.clone(),
            table,
            iova,
            inv_lock: RwLock::new(()),
            fq: Mutex::new(FlushQueue::default()),
            faults: FaultLog::default(),
            devices: AtomicU32::new(0),
        });
        if let Some(t) = &d.table {
            self.inner.roots[usize::from(d.id)].store(t.root().as_u64(), Ordering::Release);
        }
        domains[slot] = Some(d.clone());
        drop(domains);
        if cfg.mode == Mode::Lazy {
            self.start_flusher();
        }
        Ok(d)
    }

    fn owns(&self, d: &Domain) -> bool {
        d.owner.as_ptr() == Arc::as_ptr(&self.inner)
            && self.inner.domains.read().get(usize::from(d.id) - 1).is_some_and(|s| s.is_some())
    }

    /// Destroys a domain with no devices attached: pending lazy work is flushed, its IOTLB
    /// entries dropped and its id freed. Its table and allocator live on while the caller
    /// still holds the `Arc`.
    ///
    /// # Errors
    /// [`IommuError::ForeignDomain`], [`IommuError::DomainBusy`].
    pub fn destroy_domain(&self, d: &Arc<Domain>) -> Result<(), IommuError> {
        if !self.owns(d) {
            return Err(IommuError::ForeignDomain(d.id));
        }
        let n = d.devices.load(Ordering::Acquire);
        if n > 0 {
            return Err(IommuError::DomainBusy { domain: d.id, devices: n });
        }
        d.flush();
        // Once the domain is out of both tables no fill can reach it (locked fills look it up
        // under the table's read lock; unlocked ones read its root after reserving their slot,
        // which the sweep of `forget_domain` clears), so its id can be marked never filled.
        self.inner.roots[usize::from(d.id)].store(0, Ordering::Release);
        self.inner.domains.write()[usize::from(d.id) - 1] = None;
        self.inner.iotlb.forget_domain(d.id);
        Ok(())
    }

    /// Registers a device.
    ///
    /// # Errors
    /// [`IommuError::AlreadyRegistered`].
    pub fn register_device(&self, dev: DeviceId, trusted: bool) -> Result<(), IommuError> {
        let v = DEV_REGISTERED | if trusted { DEV_TRUSTED } else { 0 };
        self.inner.devices[usize::from(dev.0)]
            .compare_exchange(0, v, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
            .map_err(|_| IommuError::AlreadyRegistered(dev))
    }

    /// A registered device's trust and attachment.
    #[must_use]
    pub fn device(&self, dev: DeviceId) -> Option<DeviceInfo> {
        let v = self.inner.devices[usize::from(dev.0)].load(Ordering::Acquire);
        let domain = match attached_domain(v) {
            0 => None,
            d => Some(d),
        };
        (v & DEV_REGISTERED != 0).then_some(DeviceInfo { trusted: v & DEV_TRUSTED != 0, domain })
    }

    /// Attaches a device to a domain.
    ///
    /// # Errors
    /// [`IommuError::UnknownDevice`], [`IommuError::ForeignDomain`],
    /// [`IommuError::AlreadyAttached`] (to this or another domain: detach first).
    pub fn attach(&self, dev: DeviceId, d: &Arc<Domain>) -> Result<(), IommuError> {
        if !self.owns(d) {
            return Err(IommuError::ForeignDomain(d.id));
        }
        let slot = &self.inner.devices[usize::from(dev.0)];
        let cur = slot.load(Ordering::Acquire);
        if cur & DEV_REGISTERED == 0 {
            return Err(IommuError::UnknownDevice(dev));
        }
        if cur & DEV_DOMAIN != 0 {
            return Err(IommuError::AlreadyAttached { device: dev, domain: attached_domain(cur) });
        }
        let kind = match d.kind {
            DomainKind::Identity => DEV_IDENTITY,
            DomainKind::Translated => iotlb::domain_key(d.id),
        };
        let new = cur | kind | (u64::from(d.id) << DEV_DOMAIN_SHIFT);
        d.devices.fetch_add(1, Ordering::AcqRel);
        match slot.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Ok(()),
            Err(now) => {
                d.devices.fetch_sub(1, Ordering::AcqRel);
                Err(IommuError::AlreadyAttached { device: dev, domain: attached_domain(now) })
            }
        }
    }

    /// Detaches a device: from now on it reaches nothing, and every IOTLB entry of its domain is
    /// invalidated (what a context-cache plus domain-selective IOTLB invalidation does).
    ///
    /// # Errors
    /// [`IommuError::UnknownDevice`], [`IommuError::NotAttached`].
    pub fn detach(&self, dev: DeviceId) -> Result<DomainId, IommuError> {
        let slot = &self.inner.devices[usize::from(dev.0)];
        let cur = slot.load(Ordering::Acquire);
        if cur & DEV_REGISTERED == 0 {
            return Err(IommuError::UnknownDevice(dev));
        }
        let id = attached_domain(cur);
        if id == 0 {
            return Err(IommuError::NotAttached(dev));
        }
        slot.compare_exchange(cur, cur & (DEV_REGISTERED | DEV_TRUSTED), Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| IommuError::NotAttached(dev))?;
        let d = self.domain_by_id(id);
        if let Some(d) = &d {
            d.devices.fetch_sub(1, Ordering::AcqRel);
            let _walks_done = d.inv_lock.write();
            self.inner.iotlb.invalidate_domain(id);
        } else {
            self.inner.iotlb.invalidate_domain(id);
        }
        Ok(id)
    }

    /// The domain with this id, if it exists.
    #[must_use]
    pub fn domain(&self, id: DomainId) -> Option<Arc<Domain>> {
        self.domain_by_id(id)
    }

    fn domain_by_id(&self, id: DomainId) -> Option<Arc<Domain>> {
        self.inner.domains.read().get(usize::from(id).wrapping_sub(1)).and_then(|d| d.clone())
    }

    fn start_flusher(&self) {
        let mut f = self.inner.flusher.lock();
        if f.is_some() {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new().name("vmbind-iommu-flush".into()).spawn(move || {
            loop {
                std::thread::park_timeout(FLUSH_TIMEOUT / 2);
                let Some(inner) = weak.upgrade() else { return };
                if inner.stop.load(Ordering::Acquire) {
                    return;
                }
                let lazy: Vec<Arc<Domain>> =
                    inner.domains.read().iter().flatten().filter(|d| d.mode == Mode::Lazy).cloned().collect();
                drop(inner);
                for d in lazy {
                    d.flush_if_old();
                }
            }
        });
        // Without the thread the time bound degrades to the size bound and explicit flushes.
        *f = spawned.ok();
    }

    fn fault(&self, d: Option<&Domain>, f: DmaFault) -> DmaFault {
        match d {
            Some(d) => d.faults.record(f),
            None => self.inner.faults.record(f),
        }
        f
    }

    /// The IOTLB-hit fast path (see [`DevicePort::hit`]).
    #[inline(always)]
    fn iotlb_hit(&self, dev: DeviceId, a: u64, need: u8) -> Option<u64> {
        self.port(dev).hit(a, need)
    }

    /// Translates one device access to a page: the physical address of `iova`, checked for
    /// `access`, through the IOTLB and, on a miss, a table walk that fills it.
    #[inline]
    fn resolve(&self, dev: DeviceId, iova: DmaAddr, access: Access) -> Result<PhysAddr, DmaFault> {
        let need = match access {
            Access::Read => Prot::READ,
            Access::Write => Prot::WRITE,
        };
        match self.iotlb_hit(dev, iova.as_u64(), need.bits()) {
            Some(pa) => Ok(PhysAddr::new(pa)),
            None => self.resolve_cold(dev, iova, access, need),
        }
    }

    #[cold]
    #[inline(never)]
    fn resolve_cold(
        &self,
        dev: DeviceId,
        iova: DmaAddr,
        access: Access,
        need: Prot,
    ) -> Result<PhysAddr, DmaFault> {
        let v = self.inner.devices[usize::from(dev.0)].load(Ordering::Acquire);
        let fault = |reason| DmaFault { device: dev, iova, access, reason };
        if v & DEV_REGISTERED == 0 {
            return Err(self.fault(None, fault(FaultReason::UnknownDevice)));
        }
        let id = attached_domain(v);
        if id == 0 {
            return Err(self.fault(None, fault(FaultReason::NotAttached)));
        }
        if v & DEV_IDENTITY != 0 {
            return Ok(PhysAddr::new(iova.as_u64()));
        }
        if let Some(pa) = self.fill_unlocked(dev, v, id, iova.as_u64(), need) {
            return Ok(pa);
        }
        self.resolve_slow(dev, id, iova, access, need)
    }

    /// An IOTLB miss without a lock (see the `iotlb` module): reserve the slot, walk from the
    /// domain's root, commit. `Some` only for a permitted access whose translation committed
    /// while the device stayed attached as `word` says; anything else (a fault, a lost race, a
    /// page the IOTLB cannot hold) goes the locked way, which decides it and records faults.
    #[inline]
    fn fill_unlocked(&self, dev: DeviceId, word: u64, id: DomainId, a: u64, need: Prot) -> Option<PhysAddr> {
        let iotlb = &self.inner.iotlb;
        let r = iotlb.reserve(id, a >> PAGE_SHIFT)?;
        let root = self.inner.roots[usize::from(id)].load(Ordering::Acquire);
        let t = (root != 0)
            .then(|| {
                PageTable::<X86Iommu>::translate_in(&self.inner.mem, PhysAddr::new(root), DmaAddr::new(a))
            })
            .flatten()
            .filter(|t| t.prot.contains(need));
        let Some(t) = t else {
            iotlb.cancel(r);
            return None;
        };
        let page = t.pa.as_u64() & !(PAGE_SIZE - 1);
        let valid = iotlb.commit(r, page, t.prot);
        (valid && self.inner.devices[usize::from(dev.0)].load(Ordering::Acquire) == word).then_some(t.pa)
    }

    fn resolve_slow(
        &self,
        dev: DeviceId,
        id: DomainId,
        iova: DmaAddr,
        access: Access,
        need: Prot,
    ) -> Result<PhysAddr, DmaFault> {
        let fault = |reason| DmaFault { device: dev, iova, access, reason };
        let domains = self.inner.domains.read();
        let Some(d) = domains.get(usize::from(id) - 1).and_then(Option::as_deref) else {
            drop(domains);
            return Err(self.fault(None, fault(FaultReason::NotAttached)));
        };
        let a = iova.as_u64();
        if a < d.aperture.0 || a >= d.aperture.1 {
            return Err(self.fault(Some(d), fault(FaultReason::OutsideAperture)));
        }
        let Some(table) = &d.table else {
            return Ok(PhysAddr::new(a));
        };
        let walk = d.inv_lock.read();
        let Some(t) = table.translate(iova) else {
            drop(walk);
            return Err(self.fault(Some(d), fault(FaultReason::NotMapped)));
        };
        let page = t.pa.as_u64() & !(PAGE_SIZE - 1);
        self.inner.iotlb.insert(id, a >> PAGE_SHIFT, page, t.prot);
        drop(walk);
        if !t.prot.contains(need) {
            return Err(self.fault(Some(d), fault(FaultReason::NotPermitted { prot: t.prot })));
        }
        Ok(t.pa)
    }

    fn bus_check(
        &self,
        dev: DeviceId,
        iova: DmaAddr,
        access: Access,
        pa: PhysAddr,
        len: u64,
    ) -> Result<(), DmaFault> {
        match pa.as_u64().checked_add(len) {
            Some(e) if e <= self.inner.mem.size() => Ok(()),
            _ => Err(self.bus_fault(dev, iova, access, pa)),
        }
    }

    #[cold]
    fn bus_fault(&self, dev: DeviceId, iova: DmaAddr, access: Access, pa: PhysAddr) -> DmaFault {
        let id = self.device(dev).and_then(|i| i.domain).and_then(|id| self.domain_by_id(id));
        let f = DmaFault { device: dev, iova, access, reason: FaultReason::BusError { pa } };
        self.fault(id.as_deref(), f)
    }

    /// Translates every page of `[iova, iova + len)` first; returns (pa, chunk length) pieces.
    fn resolve_range(
        &self,
        dev: DeviceId,
        iova: DmaAddr,
        len: usize,
        access: Access,
    ) -> Result<Vec<(PhysAddr, usize)>, DmaFault> {
        let mut out = Vec::with_capacity(len / PAGE_SIZE as usize + 2);
        let mut at = iova.as_u64();
        let mut left = len as u64;
        while left > 0 {
            let n = (PAGE_SIZE - (at & (PAGE_SIZE - 1))).min(left);
            let va = DmaAddr::new(at);
            let pa = self.resolve(dev, va, access)?;
            self.bus_check(dev, va, access, pa, n)?;
            out.push((pa, n as usize));
            at = at.checked_add(n).ok_or_else(|| {
                let f = DmaFault { device: dev, iova: va, access, reason: FaultReason::OutsideAperture };
                self.fault(None, f)
            })?;
            left -= n;
        }
        Ok(out)
    }

    /// The device `dev` reads `buf.len()` bytes at `iova`. All pages are translated and
    /// checked before any byte is read.
    ///
    /// # Errors
    /// The first [`DmaFault`] (also appended to the fault log); `buf` is untouched then.
    pub fn dma_read(&self, dev: DeviceId, iova: DmaAddr, buf: &mut [u8]) -> Result<(), DmaFault> {
        let pieces = self.resolve_range(dev, iova, buf.len(), Access::Read)?;
        let mut at = 0;
        for (pa, n) in pieces {
            // Cannot fail: bus_check ran for each piece.
            let _ = self.inner.mem.read(pa, &mut buf[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// The device `dev` writes `data` at `iova`. All pages are translated and checked before
    /// any byte is written.
    ///
    /// # Errors
    /// The first [`DmaFault`] (also appended to the fault log); memory is untouched then.
    pub fn dma_write(&self, dev: DeviceId, iova: DmaAddr, data: &[u8]) -> Result<(), DmaFault> {
        let pieces = self.resolve_range(dev, iova, data.len(), Access::Write)?;
        let mut at = 0;
        for (pa, n) in pieces {
            let _ = self.inner.mem.write(pa, &data[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// A handle for device `dev`'s repeated accesses, with the IOMMU structures they go through
    /// resolved once — what a device's DMA engine with its context loaded does. Every access
    /// still reads the device's attachment, so attach and detach take effect at once.
    #[must_use]
    pub fn port(&self, dev: DeviceId) -> DevicePort<'_> {
        DevicePort {
            iommu: self,
            dev,
            word: &self.inner.devices[usize::from(dev.0)],
            entries: self.inner.iotlb.entries(),
            words: self.inner.mem.words(),
        }
    }

    /// The device loads a 64-bit little-endian value at `iova`.
    ///
    /// # Errors
    /// [`DmaFault`], also logged.
    #[inline(always)]
    pub fn dma_read_u64(&self, dev: DeviceId, iova: DmaAddr) -> Result<u64, DmaFault> {
        self.port(dev).read_u64(iova)
    }

    #[inline(never)]
    fn dma_read_u64_slow(&self, dev: DeviceId, iova: DmaAddr) -> Result<u64, DmaFault> {
        if iova.as_u64() & (PAGE_SIZE - 1) > PAGE_SIZE - 8 {
            let mut b = [0u8; 8];
            self.dma_read(dev, iova, &mut b)?;
            return Ok(u64::from_le_bytes(b));
        }
        let pa = self.resolve(dev, iova, Access::Read)?;
        match self.inner.mem.read_u64(pa) {
            Ok(v) => Ok(v),
            Err(_) => Err(self.bus_fault(dev, iova, Access::Read, pa)),
        }
    }

    /// The device stores a 64-bit little-endian value at `iova`.
    ///
    /// # Errors
    /// [`DmaFault`], also logged.
    #[inline]
    pub fn dma_write_u64(&self, dev: DeviceId, iova: DmaAddr, v: u64) -> Result<(), DmaFault> {
        if iova.as_u64() & (PAGE_SIZE - 1) > PAGE_SIZE - 8 {
            return self.dma_write(dev, iova, &v.to_le_bytes());
        }
        let pa = self.resolve(dev, iova, Access::Write)?;
        self.bus_check(dev, iova, Access::Write, pa, 8)?;
        let _ = self.inner.mem.write_u64(pa, v);
        Ok(())
    }
}

/// A device's access handle from [`Iommu::port`]: the same accesses as the `Iommu::dma_*`
/// methods, with the device's slot, the IOTLB and the arena resolved once.
#[derive(Clone, Copy)]
pub struct DevicePort<'a> {
    iommu: &'a Iommu,
    dev: DeviceId,
    word: &'a AtomicU64,
    entries: &'a iotlb::Entries,
    words: Words<'a>,
}

impl core::fmt::Debug for DevicePort<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DevicePort").field("device", &self.dev).finish()
    }
}

impl DevicePort<'_> {
    /// The device.
    #[must_use]
    pub fn device(&self) -> DeviceId {
        self.dev
    }

    /// [`Iommu::dma_read_u64`] through the handle.
    ///
    /// # Errors
    /// [`DmaFault`], also logged.
    #[inline(always)]
    pub fn read_u64(&self, iova: DmaAddr) -> Result<u64, DmaFault> {
        let a = iova.as_u64();
        if a & (PAGE_SIZE - 1) <= PAGE_SIZE - 8
            && let Some(pa) = self.hit(a, Prot::READ.bits())
            && let Some(v) = self.words.load(PhysAddr::new(pa))
        {
            return Ok(v);
        }
        self.iommu.dma_read_u64_slow(self.dev, iova)
    }

    /// The IOTLB-hit fast path: the physical address of `a` when the device is attached to a
    /// translated domain and a cached entry allows `need` (1 read, 2 write); `None` sends the
    /// caller to the full path, which decides everything else.
    #[inline(always)]
    fn hit(&self, a: u64, need: u8) -> Option<u64> {
        // Relaxed is enough: a detach or an invalidation that happens before this access is
        // visible to it by coherence, and a hit publishes nothing.
        let (page, prot) = iotlb::lookup_key(self.entries, self.word.load(Ordering::Relaxed), a)?;
        (prot & need != 0).then_some(page | (a & (PAGE_SIZE - 1)))
    }

    /// [`Iommu::dma_write_u64`] through the handle.
    ///
    /// # Errors
    /// [`DmaFault`], also logged.
    pub fn write_u64(&self, iova: DmaAddr, v: u64) -> Result<(), DmaFault> {
        self.iommu.dma_write_u64(self.dev, iova, v)
    }

    /// [`Iommu::dma_read`] through the handle.
    ///
    /// # Errors
    /// [`DmaFault`], also logged; `buf` is untouched then.
    pub fn read(&self, iova: DmaAddr, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.iommu.dma_read(self.dev, iova, buf)
    }

    /// [`Iommu::dma_write`] through the handle.
    ///
    /// # Errors
    /// [`DmaFault`], also logged; memory is untouched then.
    pub fn write(&self, iova: DmaAddr, data: &[u8]) -> Result<(), DmaFault> {
        self.iommu.dma_write(self.dev, iova, data)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.flusher.get_mut().take() {
            h.thread().unpark();
            // The thread holds only a weak reference and exits on its next wake-up; joining
            // from here could be the thread itself dropping the last strong reference.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fill without a lock interleaved by hand with each kind of invalidation the domain
    /// performs after a table update: its walk read the old translation, so it must not commit.
    /// An arena, an IOMMU over it and one registered (not attached) device.
    fn setup() -> (Arc<PhysMem>, Iommu, DeviceId) {
        let mem = Arc::new(PhysMem::new(16 << 20).unwrap());
        let iommu = Iommu::new(mem.clone());
        let dev = DeviceId(3);
        iommu.register_device(dev, true).unwrap();
        (mem, iommu, dev)
    }

    #[test]
    fn an_unlocked_fill_overtaken_by_an_unmap_or_detach_caches_nothing() {
        let (mem, iommu, dev) = setup();
        for mode in [Mode::Strict, Mode::Lazy] {
            for detach in [false, true] {
                let d = iommu.create_domain(DomainConfig { mode, ..DomainConfig::default() }).unwrap();
                iommu.attach(dev, &d).unwrap();
                let page = mem.alloc_frame().unwrap();
                let iova = d.alloc_iova(PAGE_SIZE).unwrap();
                d.map(iova, MapSource::Pages(&[page]), Prot::RW).unwrap();
                let (id, pfn) = (d.id(), iova.as_u64() >> PAGE_SHIFT);
                let root = PhysAddr::new(iommu.inner.roots[usize::from(id)].load(Ordering::Acquire));
                let r = iommu.iotlb().reserve(id, pfn).unwrap();
                let t = PageTable::<X86Iommu>::translate_in(&mem, root, iova).unwrap();
                assert_eq!(t.pa, page);
                if detach {
                    iommu.detach(dev).unwrap();
                } else {
                    d.unmap(iova, PAGE_SIZE).unwrap();
                    d.flush();
                }
                assert!(!iommu.iotlb().commit(r, page.as_u64(), t.prot), "{mode:?} detach={detach}");
                assert_eq!(iommu.iotlb().lookup(id, pfn), None);
                if detach {
                    assert!(iommu.dma_read_u64(dev, iova).is_err());
                    iommu.attach(dev, &d).unwrap();
                    d.unmap(iova, PAGE_SIZE).unwrap();
                    d.flush();
                }
                assert_eq!(iommu.dma_read_u64(dev, iova).unwrap_err().reason, FaultReason::NotMapped);
                iommu.detach(dev).unwrap();
                d.free_iova(iova, PAGE_SIZE).unwrap();
                iommu.destroy_domain(&d).unwrap();
                mem.free_frame(page).unwrap();
            }
        }
    }

    #[test]
    fn a_miss_fills_without_a_lock_and_a_destroyed_domain_has_no_root() {
        let (mem, iommu, dev) = setup();
        let d = iommu.create_domain(DomainConfig::default()).unwrap();
        iommu.attach(dev, &d).unwrap();
        let page = mem.alloc_frame().unwrap();
        mem.write_u64(page, 42).unwrap();
        let iova = d.alloc_iova(PAGE_SIZE).unwrap();
        d.map(iova, MapSource::Pages(&[page]), Prot::READ).unwrap();
        // Hold the invalidation lock: a fill that needed it would block; this one does not.
        let held = d.inv_lock.read();
        let word = iommu.inner.devices[usize::from(dev.0)].load(Ordering::Acquire);
        assert_eq!(iommu.fill_unlocked(dev, word, d.id(), iova.as_u64(), Prot::READ), Some(page));
        assert_eq!(
            iommu.iotlb().lookup(d.id(), iova.as_u64() >> PAGE_SHIFT),
            Some((page.as_u64(), Prot::READ))
        );
        // Not permitted: no answer and nothing cached for it by this path.
        assert_eq!(iommu.fill_unlocked(dev, word, d.id(), iova.as_u64(), Prot::WRITE), None);
        drop(held);
        assert_eq!(iommu.port(dev).read_u64(iova).unwrap(), 42);
        let id = d.id();
        iommu.detach(dev).unwrap();
        iommu.destroy_domain(&d).unwrap();
        assert_eq!(iommu.inner.roots[usize::from(id)].load(Ordering::Acquire), 0);
        assert_eq!(iommu.fill_unlocked(dev, word, id, iova.as_u64(), Prot::READ), None);
    }
}
