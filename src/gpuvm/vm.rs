//! [`Vm`]: a VA space, a GPU page table in the engine's GPU format, and the GPU's DMA device;
//! buffer objects, and binds as prepare-then-commit (REFERENCES.md §6).
#![forbid(unsafe_code)]

use crate::hash::FastMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::va::{Op, Va, VaBounds, VaError, VaFlags, VaSpace};
use crate::addr::{DmaAddr, GpuVa, PAGE_SIZE, PageSize};
use crate::dma::{Attrs, Device, DirectMap, Direction, DmaError, DmaVec, IovaState};
use crate::mem::{BioVec, MemError, PageArray, PhysMem};
use crate::pt::{
    GpuGfx9, Invalidation, MapError, MapOptions, MapSource, PageTable, PlannedMap, Prot, PteLog,
};
use crate::sync::{Mutex, Rank, ReadGuard, RwLock};

/// A buffer object's handle in its [`Vm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BoId(pub u32);

impl core::fmt::Display for BoId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "bo{}", self.0)
    }
}

/// One op of a bind (a VM_BIND array element).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindOp {
    /// Map: `Va::object(..)` (optionally with flags or repeating) or `Va::sparse(..)`.
    Map(Va<BoId>),
    /// Unmap whatever lies in `[addr, addr + range)`.
    Unmap {
        /// First byte.
        addr: u64,
        /// Length.
        range: u64,
    },
}

/// Errors of a [`Vm`]. Every refused call leaves the VM, its table and the IOMMU as they were.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmError {
    /// Bind op `index` is not a valid request for the VA space.
    #[error("bind op {index}: {err}")]
    Va {
        /// Index of the op in the bind.
        index: usize,
        /// Why.
        err: VaError,
    },
    /// No such buffer object.
    #[error("no buffer object {0}")]
    NoSuchBo(BoId),
    /// A map reads past the end of its object.
    #[error("bind op {index}: [{offset:#x}, +{range:#x}) of {bo} is past its size {size:#x}")]
    BeyondBo {
        /// Index of the op.
        index: usize,
        /// The object.
        bo: BoId,
        /// Object offset asked for.
        offset: u64,
        /// Bytes asked for.
        range: u64,
        /// The object's size.
        size: u64,
    },
    /// An object's backing segment is not a whole, aligned page run inside the arena, or there
    /// is none (or the VM has made all the objects its ids can name).
    #[error("backing segment {index} of a buffer object is not a whole, aligned page run")]
    BadBacking {
        /// Index of the offending segment (0 for an empty list).
        index: usize,
    },
    /// An object still mapped cannot be destroyed.
    #[error("{bo} still has {mappings} mapping(s)")]
    BoMapped {
        /// The object.
        bo: BoId,
        /// How many.
        mappings: usize,
    },
    /// The GPU table refused a map the bind planned (a DMA address beyond what the GPU
    /// format holds); nothing changed.
    #[error("the GPU page table refused the bind: {0}")]
    Table(String),
    /// DMA-mapping an object's pages for the GPU failed.
    #[error("DMA mapping of {bo} failed: {err}")]
    Dma {
        /// The object.
        bo: BoId,
        /// Why.
        err: DmaError,
    },
    /// Not enough memory for the GPU page tables of a bind (prepare failed; nothing changed).
    #[error("out of memory for the GPU page tables: {0}")]
    OutOfMemory(MemError),
    /// The VM saw an unexpected failure in a commit and refuses further binds.
    #[error("the VM is unusable after a failed commit: {why}")]
    Unusable {
        /// What failed.
        why: String,
    },
}

/// What a GPU TLB must forget after a bind: the span of every entry the bind removed or
/// changed, and whether table pages were freed (a page-walk-cache flush). The model's GPU walk
/// ([`Vm::gpu_read`]) caches nothing, so it sees the new tables as soon as `bind` returns; a real
/// GPU (or the Vulkan mirror) flushes this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TlbFlush {
    /// `[start, end)` to invalidate (`None`: nothing was removed, no flush needed).
    pub range: Option<(GpuVa, u64)>,
    /// Table pages freed by the bind (gone to the arena once the flush is done).
    pub freed_tables: usize,
}

/// A deferred bind's writer, as the commit calls it.
type PteWrite<'a> = dyn FnMut(&PteLog) -> Result<(), String> + 'a;

/// Who wrote a [`Vm::bind_deferred`]'s 4 KiB leaf entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Populated {
    /// The CPU commit, as in [`Vm::bind`]: the op array was not deferrable, or it made no
    /// 4 KiB entries. The writer was not called.
    Cpu,
    /// The writer: `entries` entries in `runs` runs.
    Writer {
        /// Entries written.
        entries: u64,
        /// Runs they came in.
        runs: usize,
    },
    /// The writer failed with `why`; the CPU applied the log instead.
    Fallback {
        /// Entries written.
        entries: u64,
        /// The writer's error.
        why: String,
    },
}

/// What a bind did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// The split/merge ops of every bind op, in order.
    pub ops: Vec<Op<BoId>>,
    /// The GPU TLB invalidation the bind needs.
    pub flush: TlbFlush,
    /// Bytes of entries written (maps).
    pub mapped: u64,
    /// Bytes of entries cleared (unmaps and the holes of remaps).
    pub cleared: u64,
}

/// How an object's pages reach the GPU.
#[derive(Debug)]
enum BoDma {
    /// One IOVA range for the whole object (two-step API): contiguous DMA addresses.
    Iova(IovaState),
    /// A device without IOMMU and an object of single 4 KiB pages: the pages' own array is the
    /// DMA list (checked and recorded by the DMA layer, nothing built).
    DirectPages(DirectMap),
    /// A device without IOMMU: the pages' own addresses. `starts` holds each segment's object
    /// offset when segments differ in length; empty when every one is a single 4 KiB page
    /// (segment `i` is page `i`, the scattered case: a PRP-like page list).
    Direct { list: DmaVec, starts: Vec<u64> },
}

#[derive(Debug)]
struct Bo {
    size: u64,
    pages: PageArray,
    dma: Option<BoDma>,
}

#[derive(Debug)]
struct State {
    space: VaSpace<BoId>,
    bos: FastMap<BoId, Bo>,
    next: u32,
    /// DMA lists of destroyed objects, kept for their allocations (a slab of `sg_table`s).
    spare: Vec<DmaVec>,
}

/// DMA lists kept for reuse.
const SPARE_LISTS: usize = 4;

/// A GPU VM: what a driver adds to drm_gpuvm's core. Buffer objects ([`Vm::create_bo`]) are
/// DMA-mapped for the VM's device on first bind — through the two-step API into one IOVA range
/// when the device sits behind an IOMMU (so the GPU table sees contiguous DMA addresses and uses
/// fragments and huge leaves), or with their own addresses for a direct device (4 KiB leaves
/// from the page list, like a PRP list). [`Vm::bind`] prepares (validates the whole op array,
/// generates the split/merge ops, DMA-maps objects, reserves every table page) and then commits
/// without allocating.
///
/// ```
/// use std::sync::Arc;
/// use vmbind::dma::Device;
/// use vmbind::gpuvm::{BindOp, Va, Vm};
/// use vmbind::iommu::DeviceId;
/// use vmbind::mem::{BioVec, PhysMem};
///
/// let mem = Arc::new(PhysMem::new(64 << 20)?);
/// let gpu = Device::direct(mem.clone(), DeviceId(1), 48, true)?;
/// let vm = Vm::new(gpu, 1 << 40)?;
/// let frames = mem.alloc_scattered(4, 7)?;
/// mem.write(frames[2], b"hello")?;
/// let bo = vm.create_bo(BioVec::from_frames(&frames))?;
/// vm.bind(&[BindOp::Map(Va::object(0x10_0000, 4 * 4096, bo, 0))])?;
/// let mut buf = [0u8; 5];
/// vm.gpu_read(0x10_2000, &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Vm {
    state: Mutex<State>,
    table: PageTable<GpuGfx9>,
    dev: Device,
    unusable: AtomicBool,
    /// GPU accesses hold it shared from translation to the last byte; a bind's commit and an
    /// object's DMA unmap hold it exclusive, so no access straddles them.
    gate: RwLock<()>,
    bounds: VaBounds,
}

/// A page-table action of a bind's commit.
enum Act<'a> {
    Clear(u64, u64),
    Fill(&'a Va<BoId>),
}

impl Vm {
    /// A VM over `[0, range)` of GPU VA for the GPU that reaches memory as `dev` does.
    ///
    /// # Errors
    /// [`VmError::Va`] for a bad range (zero, unaligned, or past the GPU format's 48 bits);
    /// [`VmError::OutOfMemory`] when the arena has no frame for the table root.
    pub fn new(dev: Device, range: u64) -> Result<Self, VmError> {
        let space = VaSpace::new(0, range, None).map_err(|err| VmError::Va { index: 0, err })?;
        if range > 1 << 48 {
            return Err(VmError::Va { index: 0, err: VaError::BadSpace { start: 0, range } });
        }
        let table = PageTable::new(dev.mem().clone()).map_err(VmError::OutOfMemory)?;
        let bounds = space.bounds();
        Ok(Vm {
            bounds,
            state: Mutex::new(State { space, bos: FastMap::default(), next: 1, spare: Vec::new() }, Rank::Vm),
            table,
            dev,
            unusable: AtomicBool::new(false),
            gate: RwLock::new((), Rank::VmAccess),
        })
    }

    /// The GPU's DMA device.
    #[must_use]
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The arena.
    #[must_use]
    pub fn mem(&self) -> &Arc<PhysMem> {
        self.dev.mem()
    }

    /// The GPU page table.
    #[must_use]
    pub fn table(&self) -> crate::pt::TableView<'_, GpuGfx9> {
        self.table.view()
    }

    /// The VM's mappings, in address order (a snapshot).
    #[must_use]
    pub fn mappings(&self) -> Vec<Va<BoId>> {
        self.state.lock().space.iter().cloned().collect()
    }

    /// A buffer object backed by `pages` (whole, 4 KiB-aligned page runs, in object order). The
    /// pages stay the caller's; they are DMA-mapped for the GPU on the object's first bind.
    ///
    /// # Errors
    /// [`VmError::BadBacking`] for an empty list or a segment that is not a whole, aligned page
    /// run.
    pub fn create_bo(&self, pages: Vec<BioVec>) -> Result<BoId, VmError> {
        if pages.is_empty() {
            return Err(VmError::BadBacking { index: 0 });
        }
        // One vectorizable pass: offsets, addresses and lengths page aligned, no empty segment,
        // none near the top of the address space (lengths are below 2^32); the exact index of a
        // bad one from the loop after it.
        let mut pages = pages;
        // Page-aligned offsets are folded into the address (`phys` = first byte, offset 0), the
        // form the GPU table's page-array fill and the DMA layer's page checks expect.
        if pages.iter().any(|b| b.offset != 0) {
            for b in &mut pages {
                if let Some(start) = b.start()
                    && start.as_u64() % PAGE_SIZE == 0
                {
                    *b = BioVec { phys: start, offset: 0, len: b.len };
                }
            }
        }
        let pages = PageArray::new(pages);
        let sum = *pages.summary();
        let size = sum.total;
        let arena = self.dev.mem().size();
        if !sum.bits.is_multiple_of(PAGE_SIZE) || sum.min_len == 0 || !sum.all_below(arena) {
            for (index, b) in pages.pages().iter().enumerate() {
                let len = u64::from(b.len);
                let bad = b.start().is_none_or(|s| {
                    len == 0
                        || (s.as_u64() | len) % PAGE_SIZE != 0
                        || s.as_u64().checked_add(len).is_none_or(|e| e > arena)
                });
                if bad {
                    return Err(VmError::BadBacking { index });
                }
            }
        }
        let mut st = self.state.lock();
        let id = BoId(st.next);
        st.next = st.next.checked_add(1).ok_or(VmError::BadBacking { index: 0 })?;
        st.bos.insert(id, Bo { size, pages, dma: None });
        Ok(id)
    }

    /// An object's size in bytes.
    ///
    /// # Errors
    /// [`VmError::NoSuchBo`].
    pub fn bo_size(&self, bo: BoId) -> Result<u64, VmError> {
        self.state.lock().bos.get(&bo).map(|b| b.size).ok_or(VmError::NoSuchBo(bo))
    }

    /// An object's backing pages, in object order (a copy of what [`Vm::create_bo`] was given,
    /// page-aligned offsets folded into the addresses).
    ///
    /// # Errors
    /// [`VmError::NoSuchBo`].
    pub fn bo_pages(&self, bo: BoId) -> Result<Vec<BioVec>, VmError> {
        self.state.lock().bos.get(&bo).map(|b| b.pages.pages().to_vec()).ok_or(VmError::NoSuchBo(bo))
    }

    /// Destroys an object that has no mapping left, undoing its DMA mapping.
    ///
    /// # Errors
    /// [`VmError::NoSuchBo`], [`VmError::BoMapped`] (unbind it first, e.g. with
    /// [`Vm::unbind_bo`]), [`VmError::Dma`] if the DMA layer refuses the unmap (the object stays).
    pub fn destroy_bo(&self, bo: BoId) -> Result<(), VmError> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let mappings = st.space.obj_mappings(&bo).count();
        let b = st.bos.get_mut(&bo).ok_or(VmError::NoSuchBo(bo))?;
        if mappings > 0 {
            return Err(VmError::BoMapped { bo, mappings });
        }
        if let Some(d) = b.dma.take() {
            let _gate = self.gate.write();
            match self.dma_unmap(d, b.size) {
                Ok(Some(list)) if st.spare.len() < SPARE_LISTS => st.spare.push(list),
                Ok(_) => {}
                Err(boxed) => {
                    let (d, err) = *boxed;
                    b.dma = Some(d);
                    return Err(VmError::Dma { bo, err });
                }
            }
        }
        st.bos.remove(&bo);
        Ok(())
    }

    /// Unmaps every mapping of `bo` (drm_gpuvm's `bo_unmap`). Never fails for lack of memory.
    ///
    /// # Errors
    /// [`VmError::NoSuchBo`], [`VmError::Unusable`].
    pub fn unbind_bo(&self, bo: BoId) -> Result<Bound, VmError> {
        let mut guard = self.state.lock();
        if !guard.bos.contains_key(&bo) {
            return Err(VmError::NoSuchBo(bo));
        }
        // Gathered and applied under one hold of the lock: a concurrent bind cannot slip a
        // mapping of another object into one of these ranges in between.
        let ops: Vec<BindOp> =
            guard.space.obj_mappings(&bo).map(|v| BindOp::Unmap { addr: v.addr, range: v.range }).collect();
        self.bind_locked(&mut guard, &ops, None).map(|(b, _)| b)
    }

    /// Unmaps `[addr, addr + range)` (one [`BindOp::Unmap`]). Never fails for lack of memory.
    ///
    /// # Errors
    /// As [`Vm::bind`] for a bad range.
    pub fn unbind(&self, addr: u64, range: u64) -> Result<Bound, VmError> {
        self.bind(&[BindOp::Unmap { addr, range }])
    }

    /// Applies the op array in order, all or nothing (VM_BIND): **prepare** checks every op and
    /// object, generates the split/merge ops of each against the state the earlier ones leave,
    /// DMA-maps objects not yet mapped and reserves every table page and split reserve the
    /// commit may take; **commit** then clears what the ops remove (only the holes of remaps:
    /// survivors keep their entries, a cut huge leaf is split, cut fragment runs are rewritten),
    /// fills what they map, and frees tables that emptied, without allocating. When `bind`
    /// returns, no GPU access through [`Vm::gpu_read`] / [`Vm::gpu_write`] sees an old
    /// translation; the returned [`TlbFlush`] is what a GPU with a TLB must invalidate.
    ///
    /// # Errors
    /// [`VmError::Va`] (naming the op), [`VmError::NoSuchBo`], [`VmError::BeyondBo`],
    /// [`VmError::Dma`], [`VmError::OutOfMemory`] — the VM, its table and the IOMMU are exactly
    /// as they were then; [`VmError::Unusable`] once a commit has failed (which a correct
    /// engine never does). A bind of only unmaps never fails for lack of memory.
    pub fn bind(&self, ops: &[BindOp]) -> Result<Bound, VmError> {
        let mut guard = self.state.lock();
        self.bind_locked(&mut guard, ops, None).map(|(b, _)| b)
    }

    /// [`Vm::bind`] whose 4 KiB leaf entries are **not** written by the CPU commit: they are
    /// collected as a [`PteLog`] of linear and copied runs (see [`PageTable::defer_leaves`])
    /// and handed to `write` (a GPU populate), which must write them into the arena. Everything
    /// else — the VA space, directory entries, huge leaves, clears, DMA mappings — is done as
    /// by [`Vm::bind`]. `write` runs inside the commit, with the VM's lock and access gate
    /// held, so no other bind and no GPU access sees the tables before it is done: when
    /// `bind_deferred` returns, the tables are bit for bit those of [`Vm::bind`]. If `write`
    /// fails, the CPU applies the log ([`Populated::Fallback`]).
    ///
    /// Only an op array of maps of pairwise disjoint ranges is deferred (a later op of the
    /// same array must not meet entries an earlier one left unwritten); any other array is
    /// bound as by [`Vm::bind`], without calling `write` ([`Populated::Cpu`]).
    ///
    /// # Errors
    /// As [`Vm::bind`]; `write` is not called then.
    pub fn bind_deferred(
        &self,
        ops: &[BindOp],
        write: impl FnOnce(&PteLog) -> Result<(), String>,
    ) -> Result<(Bound, Populated), VmError> {
        let mut guard = self.state.lock();
        if !Self::deferrable(ops) {
            return self.bind_locked(&mut guard, ops, None).map(|(b, _)| (b, Populated::Cpu));
        }
        let mut write = Some(write);
        let mut once = |log: &PteLog| match write.take() {
            Some(w) => w(log),
            None => Err("the writer ran already".into()),
        };
        /// Switches deferral off and discards what is left of the log on every way out, a
        /// panic included: nothing recorded may survive into a later bind.
        struct Deferring<'t>(&'t PageTable<GpuGfx9>);
        impl Drop for Deferring<'_> {
            fn drop(&mut self) {
                self.0.defer_leaves(false);
                drop(self.0.take_log());
            }
        }
        self.table.defer_leaves(true);
        let _deferring = Deferring(&self.table);
        self.bind_locked(&mut guard, ops, Some(&mut once))
    }

    /// Maps only, of pairwise disjoint ranges.
    fn deferrable(ops: &[BindOp]) -> bool {
        let mut r: Vec<(u64, u64)> = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                BindOp::Map(v) => r.push((v.addr, v.addr.saturating_add(v.range))),
                BindOp::Unmap { .. } => return false,
            }
        }
        r.sort_unstable();
        r.windows(2).all(|w| w[0].1 <= w[1].0)
    }

    /// [`Vm::bind`] with the state lock held; with `populate`, the table defers its 4 KiB
    /// entries and the commit hands them to it before it lets GPU accesses in again.
    fn bind_locked(
        &self,
        st: &mut State,
        ops: &[BindOp],
        populate: Option<&mut PteWrite<'_>>,
    ) -> Result<(Bound, Populated), VmError> {
        if self.unusable.load(Ordering::Acquire) {
            return Err(VmError::Unusable { why: "an earlier commit failed".into() });
        }
        // Prepare, 1: every op against the objects.
        for (index, op) in ops.iter().enumerate() {
            if let BindOp::Map(req) = op
                && let Some(bo) = req.obj
            {
                let size = st.bos.get(&bo).ok_or(VmError::NoSuchBo(bo))?.size;
                Self::check_reach(index, req, bo, size)?;
            }
        }
        // 2: split/merge, each op against what the earlier ones leave (undone on failure). The
        // generated ops of all bind ops in one list; `starts[i]`: where op i's begin.
        let mut applied: Vec<Op<BoId>> = Vec::with_capacity(ops.len() * 2);
        let mut starts: Vec<usize> = Vec::with_capacity(ops.len());
        for (index, op) in ops.iter().enumerate() {
            let at = applied.len();
            let made = match op {
                BindOp::Map(req) => st.space.sm_map_into(req, &mut applied),
                BindOp::Unmap { addr, range } => st.space.sm_unmap_into(*addr, *range, &mut applied),
            };
            if let Err(err) = made {
                Self::undo_space(&mut st.space, &applied, &starts);
                return Err(VmError::Va { index, err });
            }
            // Made from the current state under the lock: they fit.
            st.space.apply_fresh(&applied[at..]);
            starts.push(at);
        }
        // 3: DMA-map the objects mapped for the first time.
        let mut fresh: Vec<BoId> = Vec::new();
        for op in &applied {
            let Op::Map(Va { obj: Some(bo), .. }) = op else { continue };
            let b = st.bos.get_mut(bo).expect("checked in step 1");
            if b.dma.is_some() {
                continue;
            }
            match self.dma_map(&b.pages, b.size, &mut st.spare) {
                Ok(d) => {
                    b.dma = Some(d);
                    fresh.push(*bo);
                }
                Err(err) => {
                    self.undo_dma(st, &fresh);
                    Self::undo_space(&mut st.space, &applied, &starts);
                    return Err(VmError::Dma { bo: *bo, err });
                }
            }
        }
        // 4: the page-table actions and every table page they may take.
        let mut acts = Vec::new();
        for op in &applied {
            match op {
                Op::Unmap { va, .. } => acts.push(Act::Clear(va.addr, va.range)),
                Op::Remap { prev, next, unmap, .. } => {
                    let s = prev.as_ref().map_or(unmap.addr, Va::end);
                    let e = next.as_ref().map_or(unmap.end(), |n| n.addr);
                    if e > s {
                        acts.push(Act::Clear(s, e - s));
                    }
                }
                Op::Map(v) => acts.push(Act::Fill(v)),
            }
        }
        let mut planned = Vec::new();
        for act in &acts {
            if let Act::Fill(v) = act {
                Self::pieces(st, v, |va, src| {
                    planned.push(PlannedMap { va: GpuVa::new(va), src, opts: MapOptions::default() });
                });
            }
        }
        let mut prep = match self.table.prepare(&planned) {
            Ok(p) => p,
            Err(e) => {
                self.undo_dma(st, &fresh);
                Self::undo_space(&mut st.space, &applied, &starts);
                return Err(match e {
                    MapError::OutOfMemory(m) => VmError::OutOfMemory(m),
                    other => VmError::Table(other.to_string()),
                });
            }
        };
        drop(planned);
        // Commit: nothing below allocates (table pages and split reserve come from `prep`). No
        // GPU access runs meanwhile, and none that starts after `bind` returns sees the old
        // tables (the table pages freed below go only once the gate is held).
        let _gate = self.gate.write();
        let last_fill = acts.iter().rposition(|a| matches!(a, Act::Fill(_)));
        let mut bound = Bound { ops: Vec::new(), flush: TlbFlush::default(), mapped: 0, cleared: 0 };
        let mut invs: Vec<Invalidation<GpuVa>> = Vec::new();
        let mut kept: Vec<(u64, u64)> = Vec::new();
        let mut failure = None;
        for (i, act) in acts.iter().enumerate() {
            match act {
                Act::Clear(addr, len) => {
                    // Tables stay while a later op of this bind may map into them (prepare
                    // counted on it); the empty ones go after the last op.
                    let keep = last_fill.is_some_and(|f| f > i);
                    let va = GpuVa::new(*addr);
                    let r = if keep {
                        self.table.unmap_keeping_tables(va, *len)
                    } else {
                        self.table.unmap(va, *len)
                    };
                    match r {
                        Ok(inv) => {
                            bound.cleared += inv.unmapped_bytes();
                            if inv.left_empty_tables() {
                                kept.push((*addr, *len));
                            }
                            invs.push(inv);
                        }
                        Err(e) => failure = Some(format!("unmap of [{addr:#x}, +{len:#x}): {e}")),
                    }
                }
                Act::Fill(v) => {
                    let prot = Self::prot(v.flags);
                    Self::pieces(st, v, |va, src| {
                        if failure.is_some() {
                            return;
                        }
                        match self.table.map_prepared(
                            &mut prep,
                            GpuVa::new(va),
                            src,
                            prot,
                            MapOptions::default(),
                        ) {
                            Ok(s) => bound.mapped += s.bytes,
                            Err(e) => failure = Some(format!("map at {va:#x}: {e}")),
                        }
                    });
                }
            }
            if failure.is_some() {
                break;
            }
        }
        for (addr, len) in kept {
            invs.push(self.table.reclaim(GpuVa::new(addr), len));
        }
        let _ = self.table.finish(prep);
        let mut populated = Populated::Cpu;
        if let Some(write) = populate {
            self.table.defer_leaves(false);
            let log = self.table.take_log();
            if failure.is_some() {
                // The VM is lost below, but its tables hold what a plain bind would have left:
                // the ops committed before the failure get their entries.
                let _ = log.apply(self.mem());
            } else if !log.is_empty() {
                // A writer that panics leaves entries unwritten: the VM is unusable then.
                struct Lost<'v>(&'v AtomicBool);
                impl Drop for Lost<'_> {
                    fn drop(&mut self) {
                        if std::thread::panicking() {
                            self.0.store(true, Ordering::Release);
                        }
                    }
                }
                let _lost = Lost(&self.unusable);
                let (entries, runs) = (log.entries(), log.runs.len());
                populated = match write(&log) {
                    Ok(()) => Populated::Writer { entries, runs },
                    Err(why) => match log.apply(self.mem()) {
                        Ok(()) => Populated::Fallback { entries, why },
                        Err(e) => {
                            failure = Some(format!("the table's own deferred log did not apply: {e}"));
                            Populated::Cpu
                        }
                    },
                };
            }
        }
        // The model's GPU walk caches nothing: the flush is what the invalidations describe,
        // and the freed table pages can go now.
        let (mut lo, mut hi) = (u64::MAX, 0u64);
        for inv in invs {
            if let Some((s, n)) = inv.flush_range() {
                lo = lo.min(s.as_u64());
                hi = hi.max(s.as_u64() + n);
            }
            bound.flush.freed_tables += inv.freed_tables();
            inv.complete();
        }
        if lo < hi {
            bound.flush.range = Some((GpuVa::new(lo), hi - lo));
        }
        if let Some(why) = failure {
            return Err(self.fail(why));
        }
        drop(acts);
        bound.ops = applied;
        Ok((bound, populated))
    }

    /// Whether a map reads only inside its object.
    fn check_reach(index: usize, req: &Va<BoId>, bo: BoId, size: u64) -> Result<(), VmError> {
        let need = match req.repeat {
            None => req.offset.checked_add(req.range),
            Some(r) => r.start.checked_add(r.len),
        };
        if need.is_none_or(|n| n > size) {
            return Err(VmError::BeyondBo { index, bo, offset: req.offset, range: req.range, size });
        }
        Ok(())
    }

    /// The VA space's bounds.
    #[must_use]
    pub fn bounds(&self) -> VaBounds {
        self.bounds
    }

    /// Checks an op array as [`Vm::bind`]'s prepare does before it looks at the mappings —
    /// every range against the space's bounds, every object (its size from `size_of`, `None`
    /// for no such object) against the range it maps — without taking the VM's lock: what a
    /// bind queue checks at submit, so that a bad op is refused before anything is queued.
    ///
    /// # Errors
    /// [`VmError::Va`] naming the op, [`VmError::NoSuchBo`], [`VmError::BeyondBo`].
    pub fn check_ops(
        &self,
        ops: &[BindOp],
        mut size_of: impl FnMut(BoId) -> Option<u64>,
    ) -> Result<(), VmError> {
        for (index, op) in ops.iter().enumerate() {
            match op {
                BindOp::Map(req) => {
                    self.bounds.check_map(req).map_err(|err| VmError::Va { index, err })?;
                    if let Some(bo) = req.obj {
                        let size = size_of(bo).ok_or(VmError::NoSuchBo(bo))?;
                        Self::check_reach(index, req, bo, size)?;
                    }
                }
                BindOp::Unmap { addr, range } => {
                    self.bounds.check_range(*addr, *range, 0).map_err(|err| VmError::Va { index, err })?;
                }
            }
        }
        Ok(())
    }

    /// Marks the VM unusable (§6: an unexpected commit failure) and says why.
    fn fail(&self, why: String) -> VmError {
        self.unusable.store(true, Ordering::Release);
        VmError::Unusable { why }
    }

    /// The GPU permissions of a mapping's flags.
    fn prot(f: VaFlags) -> Prot {
        let rw = if f.read_only { Prot::READ } else { Prot::RW };
        if f.no_exec { rw } else { rw | Prot::EXEC }
    }

    /// Calls `f` with each (GPU VA, source) run that fills mapping `v`: one for a plain
    /// mapping, one per period piece for a repeat mapping, a sparse run for a sparse one.
    fn pieces<'s>(st: &'s State, v: &Va<BoId>, mut f: impl FnMut(u64, MapSource<'s, DmaAddr>)) {
        let Some(bo) = v.obj else {
            f(v.addr, MapSource::Sparse { len: v.range });
            return;
        };
        let b = &st.bos[&bo];
        let dma = b.dma.as_ref().expect("objects are DMA-mapped in prepare");
        let mut at = v.addr;
        while at < v.end() {
            let off = v.offset_at(at);
            let n = match v.repeat {
                None => v.end() - at,
                Some(r) => (v.end() - at).min(r.start + r.len - off),
            };
            f(at, Self::source(dma, b.pages.pages(), off, n));
            at += n;
        }
    }

    /// The DMA side of `[off, off + len)` of an object.
    fn source<'s>(dma: &'s BoDma, pages: &'s [BioVec], off: u64, len: u64) -> MapSource<'s, DmaAddr> {
        match dma {
            BoDma::DirectPages(_) => {
                let (i, n) = ((off / PAGE_SIZE) as usize, (len / PAGE_SIZE) as usize);
                MapSource::DirectPageVecs(&pages[i..i + n])
            }
            BoDma::Iova(state) => MapSource::Range { pa: DmaAddr::new(state.addr().as_u64() + off), len },
            BoDma::Direct { list, starts } if starts.is_empty() => {
                let (i, n) = ((off / PAGE_SIZE) as usize, (len / PAGE_SIZE) as usize);
                MapSource::PageSegments(&list.segments()[i..i + n])
            }
            BoDma::Direct { list, starts } => {
                // The window of segments the range reads.
                let i = starts.partition_point(|&s| s <= off) - 1;
                let j = starts.partition_point(|&s| s < off + len);
                MapSource::Segments { segs: &list.segments()[i..j], skip: off - starts[i], len }
            }
        }
    }

    /// DMA-maps an object's pages for the VM's device: one IOVA range, linked in one call and
    /// flushed once, behind an IOMMU; the pages' own addresses (one `map_sg`) without.
    fn dma_map(&self, array: &PageArray, size: u64, spare: &mut Vec<DmaVec>) -> Result<BoDma, DmaError> {
        let dir = Direction::Bidirectional;
        let pages = array.pages();
        let first = pages[0].start().unwrap_or(pages[0].phys);
        match IovaState::try_alloc(&self.dev, first, size)? {
            Some(mut state) => {
                let linked = state
                    .link_bvecs(&self.dev, 0, pages, dir, Attrs::default())
                    .and_then(|_| state.sync(&self.dev, 0, size));
                if let Err(e) = linked {
                    let mapped = state.mapped();
                    let _ =
                        state.destroy(&self.dev, if mapped > 0 { size } else { 0 }, dir, Attrs::default());
                    return Err(e);
                }
                Ok(BoDma::Iova(state))
            }
            None if pages.len() as u64 * PAGE_SIZE == size => {
                Ok(BoDma::DirectPages(self.dev.map_direct(array, dir, Attrs::default())?))
            }
            None => {
                let reuse = spare.pop().unwrap_or_default();
                let list = self.dev.map_sg_reusing(pages, dir, Attrs::default(), reuse)?;
                let mut starts = Vec::new();
                if list.len() as u64 * PAGE_SIZE != size {
                    starts.reserve(list.len());
                    let mut at = 0;
                    for s in list.segments() {
                        starts.push(at);
                        at += s.len;
                    }
                }
                Ok(BoDma::Direct { list, starts })
            }
        }
    }

    /// Undoes [`Self::dma_map`] (returning a direct list for reuse); hands the mapping back
    /// with the error if the DMA layer refuses.
    fn dma_unmap(&self, d: BoDma, size: u64) -> Result<Option<DmaVec>, Box<(BoDma, DmaError)>> {
        let dir = Direction::Bidirectional;
        match d {
            BoDma::Iova(mut state) => match state.destroy(&self.dev, size, dir, Attrs::default()) {
                Ok(()) => Ok(None),
                Err(e) => Err(Box::new((BoDma::Iova(state), e))),
            },
            BoDma::DirectPages(m) => match self.dev.unmap_direct(&m, dir, Attrs::default()) {
                Ok(()) => Ok(None),
                Err(e) => Err(Box::new((BoDma::DirectPages(m), e))),
            },
            BoDma::Direct { list, starts } => match self.dev.unmap_sg(&list, dir, Attrs::default()) {
                Ok(()) => Ok(Some(list)),
                Err(e) => Err(Box::new((BoDma::Direct { list, starts }, e))),
            },
        }
    }

    /// Undoes the DMA mappings a failed prepare made.
    fn undo_dma(&self, st: &mut State, fresh: &[BoId]) {
        for bo in fresh {
            let b = st.bos.get_mut(bo).expect("mapped in this prepare");
            if let Some(d) = b.dma.take()
                && let Err(boxed) = self.dma_unmap(d, b.size)
            {
                b.dma = Some(boxed.0);
            }
        }
    }

    /// Undoes applied op lists, last first.
    fn undo_space(space: &mut VaSpace<BoId>, applied: &[Op<BoId>], starts: &[usize]) {
        for (i, &s) in starts.iter().enumerate().rev() {
            let e = starts.get(i + 1).copied().unwrap_or(applied.len());
            let inv = super::va::inverse(&applied[s..e]);
            // The inverse of what was just applied always fits.
            let _ = space.apply(&inv);
        }
    }

    /// The shared side of the access gate, for the GPU-side access paths.
    pub(super) fn access_gate(&self) -> ReadGuard<'_, ()> {
        self.gate.read()
    }

    /// How many objects the VM holds.
    #[must_use]
    pub fn bo_count(&self) -> usize {
        self.state.lock().bos.len()
    }

    /// Whether an object's pages are DMA-mapped for the GPU now.
    ///
    /// # Errors
    /// [`VmError::NoSuchBo`].
    pub fn bo_dma_mapped(&self, bo: BoId) -> Result<bool, VmError> {
        self.state.lock().bos.get(&bo).map(|b| b.dma.is_some()).ok_or(VmError::NoSuchBo(bo))
    }

    /// The leaf size a GPU VA is mapped with, if any (for tests and dumps).
    #[must_use]
    pub fn leaf_size(&self, va: u64) -> Option<PageSize> {
        self.table.translate(GpuVa::new(va)).map(|t| t.size)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Objects still DMA-mapped give their mappings back; the table frees itself.
        let bos: Vec<Bo> = self.state.get_mut().bos.drain().map(|(_, b)| b).collect();
        for b in bos {
            if let Some(d) = b.dma {
                let _ = self.dma_unmap(d, b.size);
            }
        }
    }
}
