//! The API compute runtimes already know — CUDA's virtual memory management and Level Zero's
//! virtual memory (the nouns: reserved ranges, granularity, physical memory handles, access) —
//! with VM_BIND's verbs on top of the [`service`](crate::service) (REFERENCES.md §9).
//!
//! # What it keeps, and what it fixes
//!
//! - [`Runtime::reserve`] returns a VA range; the address asked for is a **hint** (honoured
//!   when free and aligned), as `cuMemAddressReserve`'s. [`Runtime::free`] gives it back.
//! - [`Runtime::granularity`]: sizes, addresses and offsets are multiples of the *minimum*
//!   (4 KiB, the GPU page); the *recommended* one (2 MiB) gets huge leaves.
//! - [`Memory`] handles are reference counted: [`Runtime::release`] may be called while the
//!   memory is mapped; it is freed when its last mapping goes (once that unmap is visible).
//! - [`Runtime::map`] maps **and grants access in one op** (Level Zero's shape; CUDA needs a
//!   second, 36 µs call). [`Runtime::unmap`] takes **any page-aligned sub-range** of what is
//!   mapped (CUDA refuses that). [`Runtime::set_access`] changes access over a mapped range.
//!   [`Runtime::map_sparse`] and [`Runtime::map_repeat`] are single ops (Panthor needs 24 415
//!   binds for a 100 MB sparse resource without them).
//! - Every verb is **blocking** or **asynchronous on a stream** (`*_async`, returning a
//!   [`Fence`] that signals when the change is visible to the GPU — "returned" means
//!   "visible", unlike `hsa_amd_vmem_map`). Streams are bind queues: independent of each
//!   other, and the runtime orders across them where it must: an op waits for every earlier op
//!   on another stream that touched the same addresses, so an unmap never overtakes the map it
//!   undoes.
//! - An asynchronous verb is checked and recorded when it is called; if its fence then fails
//!   (the service lost the VM, or shut down), the runtime's record and the VM part ways, and
//!   later verbs fail with the service's error ([`ServiceError::VmLost`]).
//! - The runtime owns what is mapped, so misuse is a typed [`RuntimeError`] at the call,
//!   before anything is queued, instead of a device fault later: mapping over a live mapping,
//!   unmapping what is not mapped (a double unmap), using or releasing a released handle,
//!   freeing a reservation that still has mappings, ranges outside any reservation.
//!
//! # Locking
//!
//! One lock guards the runtime's view (reservations, mapping pieces, memories). A blocking
//! verb holds it from its checks to its bind's return, including any wait for work queued
//! ahead of it on the default stream or for another stream's op on the same addresses, so
//! blocking verbs are atomic with respect to each other. The service's workers never take it,
//! and nothing else is held meanwhile, so that wait cannot deadlock. Asynchronous verbs hold it
//! only to check, submit and record.
//!
//! # An allocator on it
//!
//! A runtime's caching allocator reserves one big range, backs it on demand in 2 MiB chunks,
//! and gives chunks back:
//!
//! ```
//! use std::sync::Arc;
//! use vmbind::mem::PhysMem;
//! use vmbind::runtime::{Access, Placement, Runtime, RuntimeConfig};
//!
//! let mem = Arc::new(PhysMem::new(64 << 20)?);
//! let rt = Runtime::new(mem, RuntimeConfig::default())?;
//! let chunk = rt.granularity().recommended; // 2 MiB
//! let heap = rt.reserve(16 * chunk, chunk, None)?; // VA only
//!
//! // Grow: back the first three chunks.
//! let mut backing = Vec::new();
//! for i in 0..3 {
//!     let m = rt.alloc(chunk, Placement::Scattered)?;
//!     rt.map(heap.addr + i * chunk, &m, 0, chunk, Access::ReadWrite)?;
//!     rt.release(&m)?; // the mapping keeps it alive
//!     backing.push(m);
//! }
//! rt.write(heap.addr + chunk + 8, b"tensor")?;
//! let mut buf = [0u8; 6];
//! rt.read(heap.addr + chunk + 8, &mut buf)?;
//! assert_eq!(&buf, b"tensor");
//!
//! // Shrink: unmapping a chunk frees its memory (it was released).
//! rt.unmap(heap.addr + 2 * chunk, chunk)?;
//! assert_eq!(rt.live_memories(), 2);
//! rt.unmap(heap.addr, 2 * chunk)?;
//! rt.free(heap)?;
//! assert_eq!(rt.live_memories(), 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod maps;
mod record;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::addr::{PAGE_SIZE, PageSize, PhysAddr};
use crate::gpuvm::{BindOp, BoId, GPU_PAGE, GpuFault, Va, VaFlags, Vm};
use crate::hash::FastMap;
use crate::iommu::{DeviceId, DomainConfig};
use crate::mem::{BioVec, MemError, PhysMem};
use crate::service::{BindQueue, Fence, Gpu, Service, ServiceConfig, ServiceError, VmId};

/// Minimum and recommended granularity ([`Runtime::granularity`]), as
/// `cuMemGetAllocationGranularity` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granularity {
    /// Sizes, addresses and offsets must be multiples of it (the GPU page).
    pub minimum: u64,
    /// Multiples of it, aligned to it, map with 2 MiB leaves.
    pub recommended: u64,
}

/// A reserved VA range ([`Runtime::reserve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VaRange {
    /// First byte.
    pub addr: u64,
    /// Length.
    pub size: u64,
}

impl VaRange {
    /// One past the last byte.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// What the GPU may do through a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
}

impl Access {
    fn flags(self) -> VaFlags {
        VaFlags { read_only: self == Access::Read, no_exec: true }
    }
}

/// Where [`Runtime::alloc`] takes the pages from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Any free 4 KiB frames (scattered, like a real allocation's pages).
    Scattered,
    /// Physically contiguous, 2 MiB-aligned blocks (size a multiple of 2 MiB).
    Contiguous,
}

/// A physical memory handle (`CUmemGenericAllocationHandle`, `ze_physical_mem_handle_t`):
/// names memory in the runtime that made it. Copies name the same memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Memory {
    id: u64,
    size: u64,
}

impl Memory {
    /// Its size in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its id (unique in the process).
    #[must_use]
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// A stream: a bind queue of the runtime's VM. Asynchronous verbs on different streams are
/// independent except where they touch the same addresses (module docs).
#[derive(Debug, Clone)]
pub struct Stream {
    queue: BindQueue,
    index: usize,
    /// The runtime it belongs to ([`Runtime`]'s id).
    owner: u64,
}

/// How the runtime is set up ([`Runtime::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// GPU VA size of the VM.
    pub va_size: u64,
    /// The GPU.
    pub gpu: Gpu,
    /// The service under the runtime.
    pub service: ServiceConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            va_size: 1 << 40,
            gpu: Gpu::BehindIommu { id: DeviceId(1), domain: DomainConfig::default() },
            service: ServiceConfig::default(),
        }
    }
}

/// Errors of the runtime. A refused call changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// A size is zero.
    #[error("{what} must not be zero")]
    Zero {
        /// Which argument.
        what: &'static str,
    },
    /// An address, size, offset or alignment is not a multiple of the granularity (or the
    /// alignment not a power of two).
    #[error("{what} {value:#x} is not a multiple of {granularity:#x}")]
    Misaligned {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The granularity it must be a multiple of.
        granularity: u64,
    },
    /// No free VA range of that size and alignment is left.
    #[error("no free VA range of {size:#x} aligned to {align:#x}")]
    OutOfVa {
        /// Size asked for.
        size: u64,
        /// Alignment asked for.
        align: u64,
    },
    /// The range is not inside one reservation.
    #[error("[{addr:#x}, +{len:#x}) is not inside one reserved range")]
    NotReserved {
        /// First byte.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// [`Runtime::free`] of a range that is not a reservation.
    #[error("[{addr:#x}, +{size:#x}) is not a reservation")]
    NoSuchReservation {
        /// First byte.
        addr: u64,
        /// Length.
        size: u64,
    },
    /// [`Runtime::free`] of a reservation that still has mappings.
    #[error("the reservation still has a mapping at {addr:#x}")]
    StillMapped {
        /// A mapped address inside it.
        addr: u64,
    },
    /// A map over a live mapping.
    #[error("{addr:#x} is already mapped")]
    AlreadyMapped {
        /// The first mapped address in the range.
        addr: u64,
    },
    /// An unmap or access change over an address that is not mapped (a double unmap).
    #[error("{addr:#x} is not mapped")]
    NotMapped {
        /// The first unmapped address in the range.
        addr: u64,
    },
    /// The handle was released (use after release, double release), whether or not its
    /// memory has been freed yet.
    #[error("memory {memory} has been released")]
    Released {
        /// The handle's id.
        memory: u64,
    },
    /// The handle is not of this runtime (or its memory is gone).
    #[error("memory {memory} is not a handle of this runtime")]
    NoSuchMemory {
        /// The handle's id.
        memory: u64,
    },
    /// The stream is another runtime's.
    #[error("the stream is not one of this runtime's")]
    ForeignStream,
    /// A map reads past the end of its memory.
    #[error("[{offset:#x}, +{len:#x}) is past the end of memory of {size:#x} bytes")]
    BeyondMemory {
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The memory's size.
        size: u64,
    },
    /// A repeat mapping's period does not divide its length.
    #[error("a repeat period of {period:#x} does not divide {len:#x}")]
    BadPeriod {
        /// The period.
        period: u64,
        /// The mapping's length.
        len: u64,
    },
    /// The arena could not supply the memory.
    #[error("memory: {0}")]
    Mem(#[from] MemError),
    /// Reading a file for [`Runtime::memory_from_file`] failed.
    #[error("reading {path}: {why}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// The service refused or failed.
    #[error("{0}")]
    Service(#[from] ServiceError),
    /// A GPU access through the VM faulted ([`Runtime::read`], [`Runtime::write`]).
    #[error("{0}")]
    Fault(#[from] GpuFault),
}

/// Pages the runtime allocated for a memory, freed with it.
#[derive(Debug)]
enum Owned {
    /// The caller's pages.
    None,
    Frames(Vec<PhysAddr>),
    Blocks(Vec<PhysAddr>),
}

#[derive(Debug)]
struct MemState {
    bo: BoId,
    size: u64,
    /// Mapping pieces that use it.
    mappings: usize,
    released: bool,
    owned: Owned,
    /// The asynchronous op that removed its last mapping, while it may still be in flight: a
    /// release then frees the memory once that op is visible.
    unmapped_by: Option<Fence>,
}

/// A live mapping piece.
#[derive(Debug, Clone)]
struct Piece {
    va: Va<BoId>,
    /// The memory it maps (`None`: sparse).
    mem: Option<u64>,
    /// The last op that touched it, and on which stream (`None`: visible already).
    fence: Option<(Fence, usize)>,
}

#[derive(Debug, Default)]
struct State {
    /// Free VA: start → end.
    free: BTreeMap<u64, u64>,
    /// Reservations: start → end.
    reserved: BTreeMap<u64, u64>,
    /// Mapping pieces by start (they do not overlap).
    pieces: BTreeMap<u64, Piece>,
    /// Ranges unmapped by an op still in flight: (start, sequence) → (end, fence, stream).
    unmapping: BTreeMap<(u64, u64), (u64, Fence, usize)>,
    /// Numbers `unmapping`'s entries, so that unmaps starting at one address all stay.
    seq: u64,
    /// Memories freed, so that a later use or release of their handle says `Released`.
    freed: std::collections::HashSet<u64>,
    mems: FastMap<u64, MemState>,
    /// Memories whose last mapping went on an op still in flight: freed once it is visible.
    dying: Vec<(u64, MemState, Fence)>,
}

/// Ids of memories and runtimes, unique in the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A runtime over one GPU VM (module docs).
pub struct Runtime {
    /// Unique in the process (streams name their runtime by it).
    id: u64,
    svc: Arc<Service>,
    vm: VmId,
    vm_ref: Arc<Vm>,
    streams: Mutex<Vec<BindQueue>>,
    state: Mutex<State>,
    /// The recording going on ([`Runtime::record_to`]); taken after `state`, never before.
    recorder: Mutex<Option<record::Recorder>>,
}

impl core::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Runtime").field("vm", &self.vm).finish()
    }
}

/// The fence of an asynchronous verb (one that ran at once has an already signaled one).
fn visible(f: Option<Fence>) -> Fence {
    f.unwrap_or_else(Fence::signaled)
}

/// VA below this is never handed out (no valid pointer is null or near it).
const VA_FLOOR: u64 = 2 << 20;

impl Stream {
    /// The bind queue under the stream (to order other work with it through fences).
    #[must_use]
    pub fn queue(&self) -> &BindQueue {
        &self.queue
    }
}

impl Runtime {
    /// A runtime with its own service and VM over `mem`.
    ///
    /// # Errors
    /// [`RuntimeError::Service`] when the VM cannot be made (a bad VA size, no memory).
    pub fn new(mem: Arc<PhysMem>, cfg: RuntimeConfig) -> Result<Self, RuntimeError> {
        let svc = Arc::new(Service::new(mem, cfg.service));
        let vm = svc.create_vm(cfg.gpu, cfg.va_size)?;
        Self::on(svc, vm)
    }

    /// A runtime over an existing VM of `svc`. It assumes it is the only one mapping in that
    /// VM.
    ///
    /// # Errors
    /// [`RuntimeError::Service`] for no such VM.
    pub fn on(svc: Arc<Service>, vm: VmId) -> Result<Self, RuntimeError> {
        let vm_ref = svc.vm(vm)?;
        let q = svc.create_queue(vm)?;
        let b = vm_ref.bounds();
        let (lo, hi) = (b.start().max(VA_FLOOR), b.end());
        let mut st = State::default();
        if hi > lo {
            st.free.insert(lo, hi);
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Ok(Runtime {
            id,
            svc,
            vm,
            vm_ref,
            streams: Mutex::new(vec![q]),
            state: Mutex::new(st),
            recorder: Mutex::new(None),
        })
    }

    /// The service under the runtime.
    #[must_use]
    pub fn service(&self) -> &Arc<Service> {
        &self.svc
    }

    /// The VM.
    #[must_use]
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm_ref
    }

    /// Minimum and recommended granularity.
    #[must_use]
    pub fn granularity(&self) -> Granularity {
        Granularity { minimum: GPU_PAGE, recommended: PageSize::Size2M.bytes() }
    }

    /// The default stream (what the blocking verbs use).
    #[must_use]
    pub fn default_stream(&self) -> Stream {
        Stream { queue: self.streams.lock()[0].clone(), index: 0, owner: self.id }
    }

    /// A new stream: a bind queue of its own.
    ///
    /// # Errors
    /// [`RuntimeError::Service`] when the service is shut down.
    pub fn create_stream(&self) -> Result<Stream, RuntimeError> {
        let q = self.svc.create_queue(self.vm)?;
        let mut s = self.streams.lock();
        s.push(q.clone());
        Ok(Stream { queue: q, index: s.len() - 1, owner: self.id })
    }

    fn aligned(what: &'static str, value: u64, granularity: u64) -> Result<(), RuntimeError> {
        if !value.is_multiple_of(granularity) {
            return Err(RuntimeError::Misaligned { what, value, granularity });
        }
        Ok(())
    }

    /// Reserves `size` bytes of VA aligned to `align` (0: the minimum granularity), at `hint`
    /// when that range is free and aligned, else wherever one is (first fit).
    ///
    /// # Errors
    /// [`RuntimeError::Zero`], [`RuntimeError::Misaligned`] (size not a multiple of the
    /// minimum granularity, alignment not a power-of-two multiple of it),
    /// [`RuntimeError::OutOfVa`].
    pub fn reserve(&self, size: u64, align: u64, hint: Option<u64>) -> Result<VaRange, RuntimeError> {
        let g = GPU_PAGE;
        if size == 0 {
            return Err(RuntimeError::Zero { what: "size" });
        }
        Self::aligned("size", size, g)?;
        let align = if align == 0 { g } else { align };
        if !align.is_power_of_two() || align < g {
            return Err(RuntimeError::Misaligned { what: "alignment", value: align, granularity: g });
        }
        let mut st = self.state.lock();
        let fits = |s: u64, e: u64| -> Option<u64> {
            let a = s.checked_next_multiple_of(align)?;
            (a.checked_add(size)? <= e).then_some(a)
        };
        let hinted = hint.filter(|h| h % align == 0).and_then(|h| {
            let (&s, &e) = st.free.range(..=h).next_back()?;
            (h.checked_add(size)? <= e && h >= s).then_some(h)
        });
        let at = match hinted {
            Some(h) => h,
            None => {
                st.free.iter().find_map(|(&s, &e)| fits(s, e)).ok_or(RuntimeError::OutOfVa { size, align })?
            }
        };
        // Cut [at, at + size) out of the free range holding it.
        let (&s, &e) = st.free.range(..=at).next_back().expect("the range was found free");
        st.free.remove(&s);
        if s < at {
            st.free.insert(s, at);
        }
        if at + size < e {
            st.free.insert(at + size, e);
        }
        st.reserved.insert(at, at + size);
        Ok(VaRange { addr: at, size })
    }

    /// Gives a reservation back (`cuMemAddressFree`).
    ///
    /// # Errors
    /// [`RuntimeError::NoSuchReservation`] unless `range` is exactly a reservation;
    /// [`RuntimeError::StillMapped`] while anything inside it is mapped.
    pub fn free(&self, range: VaRange) -> Result<(), RuntimeError> {
        let mut st = self.state.lock();
        if st.reserved.get(&range.addr) != Some(&range.end()) {
            return Err(RuntimeError::NoSuchReservation { addr: range.addr, size: range.size });
        }
        if let Some(p) = Self::overlapping(&st.pieces, range.addr, range.end()).next() {
            return Err(RuntimeError::StillMapped { addr: p.va.addr.max(range.addr) });
        }
        st.reserved.remove(&range.addr);
        let (mut s, mut e) = (range.addr, range.end());
        if let Some((&ps, &pe)) = st.free.range(..s).next_back()
            && pe == s
        {
            st.free.remove(&ps);
            s = ps;
        }
        if let Some(ne) = st.free.get(&e).copied() {
            st.free.remove(&e);
            e = ne;
        }
        st.free.insert(s, e);
        Ok(())
    }

    fn overlapping(pieces: &BTreeMap<u64, Piece>, addr: u64, end: u64) -> impl Iterator<Item = &Piece> {
        let first = pieces.range(..addr).next_back().map(|(_, p)| p).filter(|p| p.va.end() > addr);
        first.into_iter().chain(pieces.range(addr..end).map(|(_, p)| p))
    }

    /// New memory of `size` bytes from the arena, zeroed, owned by the runtime (freed with the
    /// handle).
    ///
    /// # Errors
    /// [`RuntimeError::Zero`], [`RuntimeError::Misaligned`] (a page multiple; for
    /// [`Placement::Contiguous`] a 2 MiB multiple), [`RuntimeError::Mem`] when the arena is
    /// short.
    pub fn alloc(&self, size: u64, placement: Placement) -> Result<Memory, RuntimeError> {
        if size == 0 {
            return Err(RuntimeError::Zero { what: "size" });
        }
        let mem = self.svc.mem();
        let (pages, owned) = match placement {
            Placement::Scattered => {
                Self::aligned("size", size, PAGE_SIZE)?;
                let frames = mem.alloc_frames((size / PAGE_SIZE) as usize)?;
                (BioVec::from_frames(&frames), Owned::Frames(frames))
            }
            Placement::Contiguous => {
                let chunk = PageSize::Size2M.bytes();
                Self::aligned("size", size, chunk)?;
                let blocks = mem.alloc_contig_blocks((size / chunk) as usize, PageSize::Size2M)?;
                let pages =
                    blocks.iter().map(|&b| BioVec { phys: b, offset: 0, len: chunk as u32 }).collect();
                (pages, Owned::Blocks(blocks))
            }
        };
        for p in &pages {
            mem.zero(p.phys, u64::from(p.len))?;
        }
        self.adopt(pages, owned)
    }

    /// New memory holding a copy of `bytes` (zero-padded to whole pages).
    ///
    /// # Errors
    /// As [`Runtime::alloc`].
    pub fn memory_from_bytes(&self, bytes: &[u8]) -> Result<Memory, RuntimeError> {
        let size = (bytes.len() as u64).max(1).next_multiple_of(PAGE_SIZE);
        let m = self.alloc(size, Placement::Scattered)?;
        let st = self.state.lock();
        let ms = st.mems.get(&m.id).expect("just made");
        if let Owned::Frames(frames) = &ms.owned {
            for (chunk, &pa) in bytes.chunks(PAGE_SIZE as usize).zip(frames) {
                self.svc.mem().write(pa, chunk)?;
            }
        }
        Ok(m)
    }

    /// New memory holding a copy of the file at `path`.
    ///
    /// # Errors
    /// [`RuntimeError::Io`], and as [`Runtime::alloc`].
    pub fn memory_from_file(&self, path: &Path) -> Result<Memory, RuntimeError> {
        let bytes = std::fs::read(path)
            .map_err(|e| RuntimeError::Io { path: path.display().to_string(), why: e.to_string() })?;
        self.memory_from_bytes(&bytes)
    }

    /// Memory over the caller's arena pages (whole, aligned page runs, in order). They stay the
    /// caller's: never freed by the runtime.
    ///
    /// # Errors
    /// [`RuntimeError::Service`] for pages that are not whole, aligned page runs of the arena.
    pub fn memory_from_pages(&self, pages: Vec<BioVec>) -> Result<Memory, RuntimeError> {
        self.adopt(pages, Owned::None)
    }

    fn adopt(&self, pages: Vec<BioVec>, owned: Owned) -> Result<Memory, RuntimeError> {
        let bo = match self.svc.create_bo(self.vm, pages) {
            Ok(bo) => bo,
            Err(e) => {
                self.free_owned(&owned);
                return Err(e.into());
            }
        };
        let size = self.vm_ref.bo_size(bo).map_err(|err| ServiceError::Vm { vm: self.vm, err })?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        self.record_memory(id, bo, size, &owned);
        self.state
            .lock()
            .mems
            .insert(id, MemState { bo, size, mappings: 0, released: false, owned, unmapped_by: None });
        Ok(Memory { id, size })
    }

    fn free_owned(&self, owned: &Owned) {
        let mem = self.svc.mem();
        match owned {
            Owned::None => {}
            Owned::Frames(f) => {
                let _ = mem.free_frames(f);
            }
            Owned::Blocks(b) => {
                for &pa in b {
                    let _ = mem.free_contig(pa, PageSize::Size2M);
                }
            }
        }
    }

    /// Releases a handle (`cuMemRelease`). Its memory goes now if it is not mapped, else when
    /// its last mapping is unmapped.
    ///
    /// # Errors
    /// [`RuntimeError::Released`] (double release), [`RuntimeError::NoSuchMemory`].
    pub fn release(&self, m: &Memory) -> Result<(), RuntimeError> {
        let mut st = self.state.lock();
        if !st.mems.contains_key(&m.id) {
            return Err(if st.freed.contains(&m.id) {
                RuntimeError::Released { memory: m.id }
            } else {
                RuntimeError::NoSuchMemory { memory: m.id }
            });
        }
        let ms = st.mems.get_mut(&m.id).expect("present");
        if ms.released {
            return Err(RuntimeError::Released { memory: m.id });
        }
        ms.released = true;
        if ms.mappings == 0 {
            let ms = st.mems.remove(&m.id).expect("present");
            match ms.unmapped_by.clone().filter(|f| !f.is_done()) {
                // Its last unmap is still in flight: freed once it is visible.
                Some(f) => st.dying.push((m.id, ms, f)),
                None => {
                    drop(st);
                    self.destroy(m.id, ms);
                }
            }
        }
        Ok(())
    }

    /// Frees a memory no mapping uses. If the VM refuses (an asynchronous unmap of it failed,
    /// so the VM still maps it), the memory stays, released, and counts as live.
    fn destroy(&self, id: u64, ms: MemState) {
        if self.svc.destroy_idle_bo(self.vm, ms.bo).is_ok() {
            self.record_free(ms.bo);
            self.free_owned(&ms.owned);
            self.state.lock().freed.insert(id);
        } else {
            self.state.lock().mems.insert(id, ms);
        }
    }

    /// Memories not yet freed (released ones still mapped included).
    #[must_use]
    pub fn live_memories(&self) -> usize {
        self.reap();
        let st = self.state.lock();
        st.mems.len() + st.dying.len()
    }

    /// Frees the memories whose last unmap has become visible.
    fn reap(&self) {
        let done: Vec<(u64, MemState)> = {
            let mut st = self.state.lock();
            if st.dying.is_empty() {
                return;
            }
            let (done, keep): (Vec<_>, Vec<_>) = st.dying.drain(..).partition(|(_, _, f)| f.is_done());
            st.dying = keep;
            done.into_iter().map(|(id, m, _)| (id, m)).collect()
        };
        for (id, ms) in done {
            self.destroy(id, ms);
        }
    }
}

impl Drop for Runtime {
    /// Waits for the streams, unmaps what is still mapped and frees every memory the runtime
    /// allocated, so the arena gets its pages back.
    fn drop(&mut self) {
        let _ = self.synchronize();
        let st = std::mem::take(&mut *self.state.lock());
        let q = self.streams.lock()[0].clone();
        for p in st.pieces.values() {
            let _ = q.bind(&[BindOp::Unmap { addr: p.va.addr, range: p.va.range }]);
        }
        for (id, ms) in st.mems.into_iter().chain(st.dying.into_iter().map(|(id, m, _)| (id, m))) {
            self.destroy(id, ms);
        }
    }
}
