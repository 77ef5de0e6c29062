//! A software IOMMU: [`Iommu`], its [`Domain`]s, device attach/detach, a domain-tagged
//! [`iotlb::Iotlb`], strict and lazy invalidation, and device-side access that faults exactly
//! where hardware would.
//!
//! Files along their jobs: `fault` (fault records and logs), `domain` (a domain: its table,
//! allocator, invalidation), `access` (device-side access, [`DevicePort`], the IOTLB fill), this
//! module (the registry: devices, domains, attach and detach), `iotlb` and `iova`.
//!
//! # Model
//!
//! - A **domain** is an I/O address space: a page table of the `pt` engine in the IOMMU format
//!   ([`crate::pt::X86Iommu`]), an aperture (48-bit by default), an IOVA allocator
//!   ([`iova::IovaAllocator`]), a fault log and an invalidation mode. An **identity** domain has
//!   no table: the device reaches physical address = IOVA (bypass). **Only the domain changes
//!   its table and only the IOMMU its IOTLB**: [`Domain::table`] and [`Domain::iova`] are
//!   read-only views, and the IOTLB's mutators are crate-private, so no caller can unmap behind
//!   the IOTLB or plant a translation that was never mapped.
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
//! - **Handles know they are stale**: a destroyed domain's `Arc<Domain>` is refused by
//!   [`Iommu::attach`] and [`Iommu::destroy_domain`] ([`IommuError::StaleDomain`]) and by its
//!   own maps and allocations ([`DomainError::Destroyed`]), however its id is reused: the
//!   registry checks identity, not the id.
//!
//! # Security model: strict and lazy invalidation
//!
//! **Strict** ([`Mode::Strict`]): [`Domain::unmap`] clears the table, then invalidates the
//! IOTLB for the range, and only then returns. From that moment every access to the range
//! faults, including one whose translation had been cached. Table pages are freed and IOVAs
//! reusable immediately. IOTLB misses fill without a lock (see [`iotlb`]): a fill reserves its
//! slot with a marker and a fence before walking and commits by compare-and-swap, and every
//! invalidation fences after its table update and clears the markers it meets, so a fill whose
//! walk may have read the old table never commits. Faults and lost races take the locked path,
//! which walks holding the domain's invalidation lock shared (invalidations hold it exclusive).
//!
//! **Lazy** ([`Mode::Lazy`], Linux's flush queue): unmap clears the table but queues the IOTLB
//! invalidation; the queue is flushed (one domain-wide invalidation) when it holds 256 entries,
//! when its oldest entry is 10 ms old (a background thread checks), on [`Domain::flush`], and
//! before a map that overlaps a queued range. Until then a device may still reach the old pages
//! through a cached translation: that bounded window (the flush timeout, 10 ms by default, plus the 5 ms the flusher sleeps
//! between looks; or 256 unmaps) is the price of
//! lazy mode. Within it, freed IOVAs are not handed out again and freed table pages not reused,
//! so the window never exposes memory the domain did not map. Mappings that bounce (an
//! untrusted device's partial pages) are always unmapped strictly: their bounce frames are
//! freed at once.
//!
//! # Locking
//!
//! Every lock has a rank (`crate::sync::Rank`); a thread takes locks in increasing rank only,
//! and debug builds check it on every acquisition (wgpu-core's ranked locks). From first to
//! last:
//!
//! | rank | lock | held while |
//! |---|---|---|
//! | 1 `Flusher` | `Iommu`'s flusher handle (mutex) | starting the lazy-flush thread |
//! | 2 `Registry` | `Iommu`'s domain registry (`RwLock`) | create/destroy (write); attach, detach, the locked IOTLB fill, the flusher's scan (read) |
//! | 3 `FlushQueue` | `Domain`'s lazy queue (mutex) | queueing, and a whole flush until the IOTLB is clean |
//! | 4 `Invalidation` | `Domain`'s invalidation lock (`RwLock`) | every IOTLB invalidation (write); the locked fill's walk and insert (read) |
//! | 5 `Table` | `PageTable`'s mutation lock | one map or unmap walk |
//! | 6–8 `IovaSlot`, `IovaDepot`, `IovaTree` | the IOVA allocator's per-CPU slot, depot, tree | an allocation or free |
//! | 9 `Frames` | `PhysMem`'s frame allocator | allocating or freeing frames (a map takes it under `Table`) |
//! | 10 `Leaf` | fault logs, a table's parked pages, a device's DMA records | a push or a lookup, nothing nested |
//!
//! Lock-free: IOTLB lookups and fills, device words, domain roots, table walks
//! (`PageTable::translate`). No lock is held across a call into another layer's user code.
#![forbid(unsafe_code)]

mod access;
mod domain;
mod fault;
pub mod iotlb;
pub mod iova;

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use crate::addr::{DmaAddr, PAGE_SIZE};
use crate::mem::{MemError, PhysMem};
use crate::pt::PageTable;
use crate::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use crate::sync::{Mutex, Rank, RwLock};
pub use access::{DevicePort, GatherError};
pub use domain::{Domain, DomainConfig, DomainError, DomainKind, FLUSH_QUEUE_MAX, FLUSH_TIMEOUT, Mode};
pub use fault::{Access, DmaFault, FAULT_LOG_MAX, FaultLog, FaultReason};
use iotlb::Iotlb;
use iova::IovaAllocator;

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
    /// The domain belongs to another IOMMU.
    #[error("domain {0} does not belong to this IOMMU")]
    ForeignDomain(DomainId),
    /// The domain handle is stale: that domain was destroyed (its id may name another now).
    #[error("domain {0} was destroyed: the handle is stale")]
    StaleDomain(DomainId),
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
    /// Per device, data the layer above keeps for it whatever handle it uses (the DMA layer's
    /// mapping records and bounce state), type-erased so that this layer knows nothing of it.
    dev_data: Mutex<HashMap<u16, Arc<dyn Any + Send + Sync>>>,
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
                domains: RwLock::new(Vec::new(), Rank::Registry),
                faults: FaultLog::default(),
                flusher: Mutex::new(None, Rank::Flusher),
                stop: AtomicBool::new(false),
                dev_data: Mutex::new(HashMap::new(), Rank::Leaf),
            }),
        }
    }

    /// The arena devices reach.
    #[must_use]
    pub fn mem(&self) -> &Arc<PhysMem> {
        &self.inner.mem
    }

    /// The shared IOTLB, to look at (lookups, counts). Only the IOMMU fills it and invalidates
    /// it: its mutators are crate-private, so nothing can plant a translation.
    ///
    /// ```compile_fail
    /// # use std::sync::Arc;
    /// # use vmbind::{addr::{DmaAddr, PhysAddr}, iommu::Iommu, mem::PhysMem, pt::Prot};
    /// let iommu = Iommu::new(Arc::new(PhysMem::new(1 << 20).unwrap()));
    /// iommu.iotlb().insert(1, DmaAddr::new(0x1000), PhysAddr::new(0x2000), Prot::RW);
    /// ```
    #[must_use]
    pub fn iotlb(&self) -> &Iotlb {
        &self.inner.iotlb
    }

    /// Drops every cached translation of every domain (a global IOTLB invalidation). Always
    /// safe: devices then walk their tables again.
    pub fn flush_iotlb(&self) {
        self.inner.iotlb.invalidate_all();
    }

    /// The data the layer above keeps for device `dev` (created by `init` on first use), shared
    /// by every handle of that device.
    pub(crate) fn device_data<T: Any + Send + Sync>(
        &self,
        dev: DeviceId,
        init: impl FnOnce() -> T,
    ) -> Option<Arc<T>> {
        let mut m = self.inner.dev_data.lock();
        let e = m.entry(dev.0).or_insert_with(|| Arc::new(init()));
        e.clone().downcast::<T>().ok()
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
        if start == 0 || !start.is_multiple_of(PAGE_SIZE) || start >= end {
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
        let d = Arc::new(Domain::new(
            (slot + 1) as DomainId,
            &cfg,
            (start, end),
            Arc::downgrade(&self.inner),
            self.inner.iotlb.clone(),
            table,
            iova,
        ));
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

    /// Checks that `d` is the live domain of its id in this IOMMU's registry: identity, not the
    /// id, so a handle of a destroyed domain whose id was reused is recognised as stale.
    fn check_live(&self, domains: &[Option<Arc<Domain>>], d: &Arc<Domain>) -> Result<(), IommuError> {
        if d.owner.as_ptr() != Arc::as_ptr(&self.inner) {
            return Err(IommuError::ForeignDomain(d.id));
        }
        match domains.get(usize::from(d.id) - 1) {
            Some(Some(live)) if Arc::ptr_eq(live, d) => Ok(()),
            _ => Err(IommuError::StaleDomain(d.id)),
        }
    }

    /// Destroys a domain with no devices attached: pending lazy work is flushed, its IOTLB
    /// entries dropped and its id freed. The handle becomes stale: every later use of it is
    /// refused ([`DomainError::Destroyed`], [`IommuError::StaleDomain`]).
    ///
    /// # Errors
    /// [`IommuError::ForeignDomain`], [`IommuError::StaleDomain`] (destroyed already),
    /// [`IommuError::DomainBusy`]; nothing changes then.
    pub fn destroy_domain(&self, d: &Arc<Domain>) -> Result<(), IommuError> {
        // The registry stays locked for the whole teardown: no attach can slip in between the
        // device count check and the removal, and no new domain can take the id before its
        // IOTLB entries and fill flag are forgotten.
        let mut domains = self.inner.domains.write();
        self.check_live(&domains, d)?;
        let n = d.devices.load(Ordering::Acquire);
        if n > 0 {
            return Err(IommuError::DomainBusy { domain: d.id, devices: n });
        }
        d.destroyed.store(true, Ordering::Release);
        d.flush();
        // Once the domain is out of both tables no fill can reach it (locked fills look it up
        // under the registry's read lock; unlocked ones read its root after reserving their
        // slot, which the sweep of `forget_domain` clears), so its id can be marked never filled.
        self.inner.roots[usize::from(d.id)].store(0, Ordering::Release);
        domains[usize::from(d.id) - 1] = None;
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
    /// [`IommuError::UnknownDevice`], [`IommuError::ForeignDomain`], [`IommuError::StaleDomain`],
    /// [`IommuError::AlreadyAttached`] (to this or another domain: detach first); nothing
    /// changes then.
    pub fn attach(&self, dev: DeviceId, d: &Arc<Domain>) -> Result<(), IommuError> {
        // Held until the device is counted: a destroy cannot pass its busy check meanwhile.
        let domains = self.inner.domains.read();
        self.check_live(&domains, d)?;
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
        // The registry stays read-locked: the domain the device was counted in is the one found
        // under its id (a destroy needs the count at zero and the write lock).
        let domains = self.inner.domains.read();
        match domains.get(usize::from(id) - 1).and_then(Option::as_ref) {
            Some(d) => {
                d.devices.fetch_sub(1, Ordering::AcqRel);
                let _walks_done = d.inv_lock.write();
                self.inner.iotlb.invalidate_domain(id);
            }
            None => self.inner.iotlb.invalidate_domain(id),
        }
        Ok(id)
    }

    /// Runs `f` with the domain `dev` is attached to now (`None`: unregistered or detached),
    /// under the registry's read lock: no reference count is taken, and the domain cannot be
    /// destroyed until `f` returns. `f` must not call back into the registry.
    pub(crate) fn with_attached<R>(&self, dev: DeviceId, f: impl FnOnce(Option<&Arc<Domain>>) -> R) -> R {
        let domains = self.inner.domains.read();
        // Read under the lock (see `resolve_slow`): the id names the device's domain, not a
        // successor that reused a destroyed domain's id.
        let v = self.inner.devices[usize::from(dev.0)].load(Ordering::Acquire);
        let id = attached_domain(v);
        let d = (v & DEV_REGISTERED != 0 && id != 0)
            .then(|| domains.get(usize::from(id) - 1).and_then(Option::as_ref))
            .flatten();
        f(d)
    }

    /// Whether `dev` is attached to `d` now: two loads, no lock. (A live domain owns its id, so
    /// the device word naming that id names `d`.)
    pub(crate) fn is_attached_to(&self, dev: DeviceId, d: &Domain) -> bool {
        let v = self.inner.devices[usize::from(dev.0)].load(Ordering::Acquire);
        attached_domain(v) == d.id && !d.is_destroyed() && d.owner.as_ptr() == Arc::as_ptr(&self.inner)
    }

    /// The domain with this id, if it exists.
    #[must_use]
    pub fn domain(&self, id: DomainId) -> Option<Arc<Domain>> {
        self.domain_by_id(id)
    }

    pub(super) fn domain_by_id(&self, id: DomainId) -> Option<Arc<Domain>> {
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
mod tests;
