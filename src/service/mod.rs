//! The population service: GPU VMs behind independent **bind queues** (VM_BIND's model,
//! REFERENCES.md §6), worker threads that coalesce what the queues have ready into few
//! prepare/commit passes and few TLB flushes, and [`Fence`]s that signal only when a change is
//! visible to every device access.
//!
//! # Model
//!
//! A [`Service`] owns the IOMMU (over one arena), the GPUs' DMA devices and their
//! [`Vm`]s. Each VM has any number of [`BindQueue`]s. [`BindQueue::submit`] takes an op array, the
//! fences it must wait for and host fences it should signal, checks the ops (ranges against the
//! VM's bounds, objects against their sizes) **before anything is queued** — a bad op is a typed
//! error at submit — and returns the submission's [`Fence`]. Then:
//!
//! - **Order.** Submissions of one queue take effect in submission order; there is no order
//!   across queues (use fences for that).
//! - **In-fences.** A submission touches no table before every fence it waits for has
//!   completed, so an unbind cannot pull pages from under work still using them. A submission
//!   whose in-fence *failed* does nothing and fails with [`ServiceError::WaitFailed`]; the
//!   queue goes on.
//! - **No head-of-line blocking.** A queue whose head waits delays only itself: the workers
//!   take the ready heads of every other queue.
//! - **Coalescing.** A worker takes, from every queue of a VM, the ready prefix (up to
//!   [`ServiceConfig::max_batch_ops`] ops in all), and applies it as **one** [`Vm::bind`]:
//!   one split/merge pass, one prepare, one commit, one GPU-TLB flush. Order within each queue
//!   is kept (each queue's submissions stay in order in the array). Adjacent ops that continue
//!   each other — maps of the same object and flags with contiguous VA and object offset,
//!   contiguous sparse maps, contiguous unmaps — merge into one op first. A merged map makes
//!   one mapping where separate ops would have made two adjacent ones; page by page the VM is
//!   the same.
//! - **Visibility.** A fence signals after the commit is written and the bind returned: the
//!   VM's GPU walk ([`Vm::gpu_read`]) holds the VM's access gate across each access, the commit
//!   holds it exclusive, and the IOMMU's IOTLB is invalidated by the DMA layer before an
//!   object's DMA mapping changes. A `gpu_read` issued after [`Fence::wait`] returns `Ok` never
//!   sees a replaced translation.
//! - **Failure.** Validation errors return at submit. A failure inside an asynchronous batch
//!   (which validation makes unexpected: an object destroyed behind the service's back, memory
//!   for tables exhausted) is isolated first: the batch is retried submission by submission, in
//!   order. The first submission that still fails **marks its VM lost**: that fence fails with
//!   the cause, every later and pending fence of the VM fails with [`ServiceError::VmLost`],
//!   and later submissions to it are refused. Other VMs keep working. A synchronous
//!   [`BindQueue::bind`] that fails returns its error and leaves the VM as it was (its
//!   prepare undid everything), as VM_BIND's synchronous binds do.
//! - **Backpressure.** Each queue holds at most [`ServiceConfig::queue_depth`] submissions
//!   not yet taken by a worker. [`BindQueue::submit`] then blocks until a worker takes some;
//!   [`BindQueue::try_submit`] returns the ops back instead.
//! - **Shutdown.** [`Service::shutdown`] refuses new work, then drains (runs what can run, up
//!   to a deadline) or cancels; every fence pending at that moment is in its
//!   [`ShutdownReport`], signaled, cancelled ([`ServiceError::Cancelled`]) or failed. Dropping
//!   the service cancels likewise. Nothing is dropped silently.
//!
//! A synchronous [`BindQueue::bind`] on a queue with nothing pending runs on the calling thread
//! (no hand-off to a worker: a blocking map costs a bind, not a thread round trip); otherwise it
//! submits and waits.
//!
//! # Locking
//!
//! The service's own locks (`parking_lot`, with condition variables: a VM's scheduler state,
//! its object registry, the VM registry, each fence's slow path) are never held across a call
//! into the VM, the DMA layer or the IOMMU, and never while a fence's callbacks run; the
//! scheduler lock is taken before a fence's lock, never after. So they sit above every ranked
//! lock of the lower layers (DESIGN.md: service → vm → domain → table → arena).
#![forbid(unsafe_code)]

mod fence;
mod metrics;
mod queue;
mod sched;

pub use fence::{Fence, FenceError, FenceStatus};
pub use metrics::{Metrics, QueueMetrics};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex, RwLock};

use crate::dma::{Device, DmaError};
use crate::gpuvm::{BindOp, BoId, Vm, VmError};
use crate::hash::FastMap;
use crate::iommu::{DeviceId, DomainConfig, Iommu, IommuError};
use crate::mem::{BioVec, PhysMem};
use metrics::{Counters, Histogram};
use sched::{Msg, Sched, Slot, VmEntry, Work, worker};

/// A VM's id in its [`Service`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmId(pub u32);

impl core::fmt::Display for VmId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "vm{}", self.0)
    }
}

/// A bind queue's id: its VM and its index there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId {
    /// The VM.
    pub vm: VmId,
    /// Its index among the VM's queues.
    pub index: u32,
}

impl core::fmt::Display for QueueId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.q{}", self.vm, self.index)
    }
}

/// How a VM's GPU reaches memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gpu {
    /// Behind the service's IOMMU, in a new domain of its own.
    BehindIommu {
        /// The device id (registered with the IOMMU as a trusted, built-in device).
        id: DeviceId,
        /// The domain.
        domain: DomainConfig,
    },
    /// No IOMMU: the GPU uses physical addresses, reaching `addr_bits` of them.
    Direct {
        /// The device id.
        id: DeviceId,
        /// Address bits the device drives.
        addr_bits: u32,
    },
}

/// The service's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Worker threads (at least 1). One VM is worked on by one worker at a time; more workers
    /// serve more VMs in parallel.
    pub workers: usize,
    /// Submissions a queue holds before [`BindQueue::submit`] blocks (at least 1).
    pub queue_depth: usize,
    /// Ops one submission may carry (NVK's VM_BIND limit is 4096).
    pub max_ops: usize,
    /// Ops one coalesced batch may carry (a single submission may exceed it, alone).
    pub max_batch_ops: usize,
    /// Whether workers coalesce submissions and merge adjacent ops. Off: one submission per
    /// prepare/commit, ops as submitted (the unbatched baseline).
    pub coalesce: bool,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig { workers: 1, queue_depth: 128, max_ops: 4096, max_batch_ops: 4096, coalesce: true }
    }
}

/// Errors of the service. Every refused submission leaves its queue and VM as they were.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// No such VM in this service.
    #[error("no VM {0} in this service")]
    NoSuchVm(VmId),
    /// The VM refused: an op or object is invalid (at submit), or a bind failed (the message
    /// names the op).
    #[error("{vm}: {err}")]
    Vm {
        /// The VM.
        vm: VmId,
        /// Why.
        err: VmError,
    },
    /// A submission carries more ops than [`ServiceConfig::max_ops`].
    #[error("a submission of {ops} ops exceeds the limit of {max}")]
    TooManyOps {
        /// Ops submitted.
        ops: usize,
        /// The limit.
        max: usize,
    },
    /// The VM is lost: an asynchronous batch failed in it; it takes no more work.
    #[error("{vm} is lost: {why}")]
    VmLost {
        /// The VM.
        vm: VmId,
        /// The failure that lost it.
        why: String,
    },
    /// A fence this work waited for failed; the work did nothing.
    #[error("in-fence {fence} failed: {err}")]
    WaitFailed {
        /// The fence waited for.
        fence: u64,
        /// Its error.
        err: Box<ServiceError>,
    },
    /// A host fence handed as a signal is not a pending, unowned host fence.
    #[error("fence {fence} cannot be signaled by a submission (not a pending host fence, or already owned)")]
    BadSignal {
        /// The fence.
        fence: u64,
    },
    /// The service shut down (or the VM was destroyed) before the work ran.
    #[error("cancelled: the service shut down before the work ran")]
    Cancelled,
    /// The service is shut down: no new work.
    #[error("the service is shut down")]
    ShutDown,
    /// Creating the VM's device failed in the IOMMU.
    #[error("IOMMU: {0}")]
    Iommu(#[from] IommuError),
    /// Creating the VM's device failed in the DMA layer.
    #[error("DMA: {0}")]
    Dma(#[from] DmaError),
    /// A [`Follower`] of the VM refused the ops at submit (nothing was queued), or failed to
    /// follow a committed batch (the VM's own tables hold the change; the follower says what
    /// state it is left in).
    #[error("{vm}: follower {follower}: {why}")]
    Follower {
        /// The VM.
        vm: VmId,
        /// The follower's name.
        follower: String,
        /// Why.
        why: String,
    },
}

/// Writes a batch's deferred 4 KiB page-table entries on a device (the Vulkan backend's
/// `populate.comp`). Set per VM with [`Service::set_pte_writer`].
///
/// For a batch of maps (of disjoint ranges) covering at least the writer's threshold of pages,
/// the service commits with [`Vm::bind_deferred`] and hands the [`PteLog`](crate::pt::PteLog)
/// to [`PteWriter::write`] before anything else sees the batch (followers, fences). Smaller
/// batches, and batches with unmaps, are committed on the CPU. If the writer fails, the CPU
/// writes the same entries ([`crate::pt::PteLog::apply`]): the tables are complete either way,
/// bit for bit those of a CPU commit ([`Metrics::device_fallbacks`] counts such batches).
pub trait PteWriter: Send + Sync {
    /// A short name.
    fn name(&self) -> String;
    /// Writes every entry of `log` and returns when they are in memory. It runs inside the
    /// VM's commit, with the VM's lock and access gate held: it must not call back into the VM
    /// (`mappings`, `bo_pages`, `gpu_read`, a bind: they would deadlock).
    ///
    /// # Errors
    /// Why not; the service then writes them on the CPU.
    fn write(&self, log: &crate::pt::PteLog) -> Result<(), String>;
}

/// Something that follows a VM's committed binds: the Vulkan sparse mirror, which makes a real
/// driver's page tables show what the VM's show. Added with [`Service::add_follower`].
///
/// The service calls [`Follower::check`] at submit, after its own checks: an error there
/// refuses the submission ([`ServiceError::Follower`], nothing queued). After each successful
/// commit it calls [`Follower::follow`] with the committed op array (merged as the batch was),
/// on the committing thread, **before** the batch's fences signal: a fence that signals means
/// every follower shows the change too. A `follow` error fails the batch's fences with
/// [`ServiceError::Follower`]; the VM is not lost (its tables hold the change).
///
/// Calls for one VM may come from several threads (a synchronous bind of one queue runs beside
/// a worker's batch of another); a follower serializes itself and reads the VM's state after the
/// commit, so that the last call shows the last commit.
pub trait Follower: Send + Sync {
    /// A short name for errors.
    fn name(&self) -> String;
    /// Whether the follower can follow `ops`.
    ///
    /// # Errors
    /// Why not; the submission is refused.
    fn check(&self, vm: &Vm, ops: &[BindOp]) -> Result<(), String>;
    /// Makes the follower show the VM after `ops` were committed; returns when it does.
    ///
    /// # Errors
    /// Why it could not; the batch's fences fail.
    fn follow(&self, vm: &Vm, ops: &[BindOp]) -> Result<(), String>;
}

/// [`BindQueue::try_submit`]'s refusal: the ops come back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrySubmitError {
    /// The queue holds [`ServiceConfig::queue_depth`] submissions; nothing was queued.
    #[error("queue {queue} is full")]
    Full {
        /// The queue.
        queue: QueueId,
        /// The ops, unqueued.
        ops: Vec<BindOp>,
    },
    /// Refused for another reason, as [`BindQueue::submit`] would.
    #[error("{err}")]
    Refused {
        /// Why.
        err: ServiceError,
        /// The ops, unqueued.
        ops: Vec<BindOp>,
    },
}

/// How [`Service::shutdown`] ends queued work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Run what can run until every queue is empty or the deadline passes, then cancel the
    /// rest (work waiting on fences nobody will signal).
    Drain(Duration),
    /// Cancel everything not yet taken by a worker; batches running finish.
    Cancel,
}

/// How each fence pending at shutdown ended ([`Service::shutdown`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Fences that signaled (their work ran).
    pub signaled: Vec<u64>,
    /// Fences failed with [`ServiceError::Cancelled`] (their work never ran).
    pub cancelled: Vec<u64>,
    /// Fences failed otherwise, with the error.
    pub failed: Vec<(u64, ServiceError)>,
}

/// A bind queue of a VM: submissions on it take effect in order. Cheap to clone (clones are
/// the same queue).
#[derive(Clone)]
pub struct BindQueue {
    entry: Arc<VmEntry>,
    slot: usize,
    id: QueueId,
    _handle: Arc<QueueHandle>,
}

/// Dropped with the last clone of a [`BindQueue`]: its slot retires (its queued work still
/// runs) and can later serve a new queue of the VM, so queues made and dropped do not pile up.
struct QueueHandle {
    entry: Arc<VmEntry>,
    slot: usize,
}

impl Drop for QueueHandle {
    fn drop(&mut self) {
        self.entry.sched.lock().queues[self.slot].retired = true;
    }
}

impl core::fmt::Debug for BindQueue {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BindQueue").field("id", &self.id).finish()
    }
}

/// The population service (module docs).
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use vmbind::gpuvm::{BindOp, Va};
/// use vmbind::iommu::{DeviceId, DomainConfig};
/// use vmbind::mem::{BioVec, PhysMem};
/// use vmbind::service::{Fence, Gpu, Service, ServiceConfig};
///
/// let mem = Arc::new(PhysMem::new(64 << 20)?);
/// let svc = Service::new(mem.clone(), ServiceConfig::default());
/// let vm = svc.create_vm(Gpu::BehindIommu { id: DeviceId(1), domain: DomainConfig::default() }, 1 << 40)?;
/// let frames = mem.alloc_scattered(16, 3)?;
/// mem.write(frames[5], b"visible")?;
/// let bo = svc.create_bo(vm, BioVec::from_frames(&frames))?;
/// let (a, b) = (svc.create_queue(vm)?, svc.create_queue(vm)?);
///
/// // Queue A waits for a host fence; queue B's bind does not wait behind it.
/// let gate = Fence::new();
/// let fa = a.submit(vec![BindOp::Map(Va::object(0x20_0000, 16 * 4096, bo, 0))], &[gate.clone()], &[])?;
/// let fb = b.submit(vec![BindOp::Map(Va::object(0x40_0000, 16 * 4096, bo, 0))], &[], &[])?;
/// fb.wait(Duration::from_secs(5))?;
/// assert!(!fa.is_done());
/// let mut buf = [0u8; 7];
/// svc.vm(vm)?.gpu_read(0x40_5000, &mut buf)?;
/// assert_eq!(&buf, b"visible");
/// gate.signal()?;
/// fa.wait(Duration::from_secs(5))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Service {
    mem: Arc<PhysMem>,
    iommu: Iommu,
    cfg: ServiceConfig,
    vms: RwLock<FastMap<VmId, Arc<VmEntry>>>,
    next_vm: AtomicU32,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    counters: Arc<Counters>,
    /// The IOTLB's invalidation count at the last [`Service::reset_metrics`].
    iotlb_base: std::sync::atomic::AtomicU64,
    closed: AtomicBool,
}

impl core::fmt::Debug for Service {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Service").field("cfg", &self.cfg).field("vms", &self.vms.read().len()).finish()
    }
}

impl Service {
    /// A service over `mem`, with its own IOMMU and `cfg.workers` worker threads.
    ///
    /// # Panics
    /// If the operating system refuses to start a worker thread.
    #[must_use]
    pub fn new(mem: Arc<PhysMem>, cfg: ServiceConfig) -> Self {
        let cfg = ServiceConfig {
            workers: cfg.workers.max(1),
            queue_depth: cfg.queue_depth.max(1),
            max_ops: cfg.max_ops.max(1),
            max_batch_ops: cfg.max_batch_ops.max(1),
            ..cfg
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let workers = (0..cfg.workers)
            .map(|i| {
                let rx: Receiver<Msg> = rx.clone();
                std::thread::Builder::new()
                    .name(format!("vmbind-bind-{i}"))
                    .spawn(move || worker(&rx))
                    .expect("spawning a bind worker thread")
            })
            .collect();
        Service {
            iommu: Iommu::new(mem.clone()),
            mem,
            cfg,
            vms: RwLock::new(FastMap::default()),
            next_vm: AtomicU32::new(1),
            tx,
            rx,
            workers: Mutex::new(workers),
            counters: Arc::new(Counters::default()),
            iotlb_base: std::sync::atomic::AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// The arena.
    #[must_use]
    pub fn mem(&self) -> &Arc<PhysMem> {
        &self.mem
    }

    /// The service's IOMMU.
    #[must_use]
    pub fn iommu(&self) -> &Iommu {
        &self.iommu
    }

    /// The settings in force.
    #[must_use]
    pub fn config(&self) -> ServiceConfig {
        self.cfg
    }

    /// A VM over `[0, range)` of GPU VA for a GPU reaching memory as `gpu` says.
    ///
    /// # Errors
    /// [`ServiceError::Iommu`] / [`ServiceError::Dma`] when the device cannot be set up (an id
    /// in use, a bad domain config), [`ServiceError::Vm`] for a bad range or no memory for the
    /// table root, [`ServiceError::ShutDown`].
    pub fn create_vm(&self, gpu: Gpu, range: u64) -> Result<VmId, ServiceError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(ServiceError::ShutDown);
        }
        let id = VmId(self.next_vm.fetch_add(1, Ordering::Relaxed));
        let dev = match gpu {
            Gpu::BehindIommu { id: dev, domain } => {
                let d = self.iommu.create_domain(domain)?;
                let made = self.iommu.register_device(dev, true).and_then(|()| self.iommu.attach(dev, &d));
                if let Err(e) = made {
                    let _ = self.iommu.destroy_domain(&d);
                    return Err(e.into());
                }
                Device::translated(&self.iommu, dev)?
            }
            Gpu::Direct { id, addr_bits } => Device::direct(self.mem.clone(), id, addr_bits, true)?,
        };
        let vm = Vm::new(dev, range).map_err(|err| ServiceError::Vm { vm: id, err })?;
        let entry = Arc::new(VmEntry {
            id,
            vm: Arc::new(vm),
            cfg: self.cfg,
            bos: RwLock::new(FastMap::default()),
            sched: Mutex::new(Sched::default()),
            room: Condvar::new(),
            tx: self.tx.clone(),
            counters: self.counters.clone(),
            followers: RwLock::new(Vec::new()),
            pte_writer: RwLock::new(None),
        });
        // Checked under the registry's lock, which shutdown takes after closing: a VM is either
        // seen (and closed) by shutdown or refused here.
        let mut vms = self.vms.write();
        if self.closed.load(Ordering::Acquire) {
            return Err(ServiceError::ShutDown);
        }
        vms.insert(id, entry);
        Ok(id)
    }

    fn entry(&self, vm: VmId) -> Result<Arc<VmEntry>, ServiceError> {
        self.vms.read().get(&vm).cloned().ok_or(ServiceError::NoSuchVm(vm))
    }

    /// The VM itself: for device-side access ([`Vm::gpu_read`]), dumps and inspection. Binds made
    /// on it directly bypass the queues (and their order).
    ///
    /// # Errors
    /// [`ServiceError::NoSuchVm`].
    pub fn vm(&self, vm: VmId) -> Result<Arc<Vm>, ServiceError> {
        Ok(self.entry(vm)?.vm.clone())
    }

    /// Adds `f` to the followers of `vm` ([`Follower`]): from now on every submission is
    /// checked by it and every commit followed. Add it while the VM has no work in flight (a
    /// batch committing meanwhile may not be followed); the follower brings itself up to the
    /// VM's current state itself.
    ///
    /// # Errors
    /// [`ServiceError::NoSuchVm`].
    pub fn add_follower(&self, vm: VmId, f: Arc<dyn Follower>) -> Result<(), ServiceError> {
        self.entry(vm)?.followers.write().push(f);
        Ok(())
    }

    /// Sets (or with `None` clears) the device writer of `vm`'s 4 KiB entries ([`PteWriter`]):
    /// batches of maps of at least `min_pages` pages are populated by it, smaller ones by the
    /// CPU. Choose `min_pages` from a measurement of both paths on the device (the `report`
    /// bench's `vk/populate_gpu` against `vk/populate_cpu`): the GPU path pays a fixed
    /// submit-and-wait cost and wins per page only on a device whose writes are cheaper than
    /// the CPU's.
    ///
    /// # Errors
    /// [`ServiceError::NoSuchVm`].
    pub fn set_pte_writer(
        &self,
        vm: VmId,
        writer: Option<(Arc<dyn PteWriter>, u64)>,
    ) -> Result<(), ServiceError> {
        *self.entry(vm)?.pte_writer.write() = writer;
        Ok(())
    }

    /// Removes the follower `f` (the same `Arc`) from `vm`; returns whether it was there.
    ///
    /// # Errors
    /// [`ServiceError::NoSuchVm`].
    pub fn remove_follower(&self, vm: VmId, f: &Arc<dyn Follower>) -> Result<bool, ServiceError> {
        let e = self.entry(vm)?;
        let mut v = e.followers.write();
        let before = v.len();
        v.retain(|g| !Arc::ptr_eq(g, f));
        Ok(v.len() != before)
    }

    /// A new bind queue on `vm`. Queues are cheap; the slot of one whose handles are all
    /// dropped (and whose work has run) is reused, and its [`QueueId`] with it.
    ///
    /// # Errors
    /// [`ServiceError::NoSuchVm`], [`ServiceError::ShutDown`].
    pub fn create_queue(&self, vm: VmId) -> Result<BindQueue, ServiceError> {
        let entry = self.entry(vm)?;
        let mut s = entry.sched.lock();
        if s.closing {
            return Err(ServiceError::ShutDown);
        }
        let reuse = s.queues.iter().position(|q| q.retired && q.items.is_empty() && q.inflight == 0);
        let slot = match reuse {
            Some(i) => {
                s.queues[i] = Slot::default();
                i
            }
            None => {
                s.queues.push(Slot::default());
                s.queues.len() - 1
            }
        };
        drop(s);
        let id = QueueId { vm, index: slot as u32 };
        let handle = Arc::new(QueueHandle { entry: entry.clone(), slot });
        Ok(BindQueue { entry, slot, id, _handle: handle })
    }

    /// A buffer object of `vm` backed by `pages` ([`Vm::create_bo`]).
    ///
    /// # Errors
    /// [`ServiceError::NoSuchVm`]; [`ServiceError::Vm`] as [`Vm::create_bo`].
    pub fn create_bo(&self, vm: VmId, pages: Vec<BioVec>) -> Result<BoId, ServiceError> {
        let e = self.entry(vm)?;
        let bo = e.vm.create_bo(pages).map_err(|err| ServiceError::Vm { vm, err })?;
        let size = e.vm.bo_size(bo).map_err(|err| ServiceError::Vm { vm, err })?;
        e.bos.write().insert(bo, size);
        Ok(bo)
    }

    /// Destroys an object once the work already submitted on `vm` has completed. From this
    /// call on, submissions naming it are refused; if it still has mappings then, it stays and
    /// the error says so.
    ///
    /// # Errors
    /// [`ServiceError::NoSuchVm`]; [`ServiceError::Vm`] with [`VmError::NoSuchBo`] or
    /// [`VmError::BoMapped`].
    pub fn destroy_bo(&self, vm: VmId, bo: BoId) -> Result<(), ServiceError> {
        let e = self.entry(vm)?;
        let size = e.bos.write().remove(&bo).ok_or(ServiceError::Vm { vm, err: VmError::NoSuchBo(bo) })?;
        let last: Vec<Fence> = e.sched.lock().queues.iter().filter_map(|q| q.last.clone()).collect();
        for f in last {
            let _ = f.wait_forever();
        }
        e.vm.destroy_bo(bo).map_err(|err| {
            e.bos.write().insert(bo, size);
            ServiceError::Vm { vm, err }
        })
    }

    /// Destroys an object the caller knows no queued work names (the runtime's released,
    /// unmapped memory), without waiting for the queues.
    pub(crate) fn destroy_idle_bo(&self, vm: VmId, bo: BoId) -> Result<(), ServiceError> {
        let e = self.entry(vm)?;
        let size = e.bos.write().remove(&bo).ok_or(ServiceError::Vm { vm, err: VmError::NoSuchBo(bo) })?;
        e.vm.destroy_bo(bo).map_err(|err| {
            e.bos.write().insert(bo, size);
            ServiceError::Vm { vm, err }
        })
    }

    /// [`BindQueue::submit`] on `queue`.
    ///
    /// # Errors
    /// As [`BindQueue::submit`].
    pub fn submit(
        &self,
        queue: &BindQueue,
        ops: Vec<BindOp>,
        waits: &[Fence],
        signals: &[Fence],
    ) -> Result<Fence, ServiceError> {
        queue.submit(ops, waits, signals)
    }

    /// [`BindQueue::bind`] on `queue`.
    ///
    /// # Errors
    /// As [`BindQueue::bind`].
    pub fn bind(&self, queue: &BindQueue, ops: &[BindOp]) -> Result<(), ServiceError> {
        queue.bind(ops)
    }

    /// The counters so far and every queue's latency percentiles.
    #[must_use]
    pub fn metrics(&self) -> Metrics {
        let c = &self.counters;
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let (ops, batches) = (ld(&c.ops), ld(&c.batches));
        let mut queues = Vec::new();
        let mut entries: Vec<Arc<VmEntry>> = self.vms.read().values().cloned().collect();
        entries.sort_by_key(|e| e.id);
        for e in entries {
            let s = e.sched.lock();
            for (i, q) in s.queues.iter().enumerate() {
                queues.push(QueueMetrics {
                    queue: QueueId { vm: e.id, index: i as u32 },
                    completed: q.lat.count(),
                    p50: Duration::from_nanos(q.lat.quantile(0.5)),
                    p99: Duration::from_nanos(q.lat.quantile(0.99)),
                    max: Duration::from_nanos(q.lat.max()),
                });
            }
        }
        Metrics {
            submissions: ld(&c.submissions),
            ops,
            pages: ld(&c.pages),
            batches,
            mean_batch: if batches == 0 { 0.0 } else { ops as f64 / batches as f64 },
            merged: ld(&c.merged),
            iotlb_flushes: self
                .iommu
                .iotlb()
                .invalidations()
                .saturating_sub(self.iotlb_base.load(Ordering::Relaxed)),
            gpu_tlb_flushes: ld(&c.gpu_tlb_flushes),
            failed: ld(&c.failed),
            device_populated: ld(&c.device_populated),
            device_fallbacks: ld(&c.device_fallbacks),
            queues,
        }
    }

    /// Zeroes the counters and every queue's latency histogram (to measure one phase of a
    /// workload). The IOTLB's count is the IOMMU's and keeps running: [`Metrics::iotlb_flushes`]
    /// then counts from here.
    pub fn reset_metrics(&self) {
        let c = &self.counters;
        for a in [
            &c.submissions,
            &c.ops,
            &c.pages,
            &c.batches,
            &c.merged,
            &c.gpu_tlb_flushes,
            &c.failed,
            &c.device_populated,
            &c.device_fallbacks,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        self.iotlb_base.store(self.iommu.iotlb().invalidations(), Ordering::Relaxed);
        for e in self.vms.read().values() {
            for q in &mut e.sched.lock().queues {
                q.lat = Histogram::default();
            }
        }
    }

    /// Whether `vm` is lost, and why.
    ///
    /// # Errors
    /// [`ServiceError::NoSuchVm`].
    pub fn lost(&self, vm: VmId) -> Result<Option<String>, ServiceError> {
        Ok(self.entry(vm)?.sched.lock().lost.clone())
    }

    /// Stops the service: refuses new work, drains or cancels what is queued (`how`), lets
    /// running batches finish and stops the workers. The report says how every fence pending
    /// at the call ended. Later calls find nothing pending.
    pub fn shutdown(&self, how: Shutdown) -> ShutdownReport {
        self.closed.store(true, Ordering::Release);
        let entries: Vec<Arc<VmEntry>> = self.vms.read().values().cloned().collect();
        // Close every VM to new work and note what is pending.
        let mut pending: Vec<Fence> = Vec::new();
        for e in &entries {
            let mut s = e.sched.lock();
            s.closing = true;
            pending.extend(s.running.iter().cloned());
            for q in &s.queues {
                pending.extend(
                    q.items.iter().flat_map(|w| std::iter::once(&w.fence).chain(&w.signals)).cloned(),
                );
            }
            drop(s);
            e.room.notify_all();
        }
        if let Shutdown::Drain(limit) = how {
            let deadline = Instant::now() + limit;
            for f in &pending {
                let left = deadline.saturating_duration_since(Instant::now());
                if f.wait(left).is_err() && Instant::now() >= deadline {
                    break;
                }
            }
        }
        for e in &entries {
            let cancelled: Vec<Work> = {
                let mut s = e.sched.lock();
                s.queues.iter_mut().flat_map(|q| q.items.drain(..)).collect()
            };
            for w in &cancelled {
                w.complete(&Err(ServiceError::Cancelled));
            }
            e.room.notify_all();
        }
        let workers: Vec<JoinHandle<()>> = std::mem::take(&mut *self.workers.lock());
        for _ in &workers {
            let _ = self.tx.send(Msg::Stop);
        }
        for w in workers {
            let _ = w.join();
        }
        // Messages left in the channel hold VM entries: drop them.
        while self.rx.try_recv().is_ok() {}
        let mut report = ShutdownReport::default();
        for f in pending {
            match f.poll() {
                FenceStatus::Signaled => report.signaled.push(f.id()),
                FenceStatus::Failed(ServiceError::Cancelled) => report.cancelled.push(f.id()),
                FenceStatus::Failed(e) => report.failed.push((f.id(), e)),
                // Only a synchronous bind can be running now; it completes by itself.
                FenceStatus::Pending => {
                    let _ = f.wait_forever();
                    match f.poll() {
                        FenceStatus::Failed(e) => report.failed.push((f.id(), e)),
                        _ => report.signaled.push(f.id()),
                    }
                }
            }
        }
        report
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if !self.workers.lock().is_empty() {
            let _ = self.shutdown(Shutdown::Cancel);
        }
    }
}
