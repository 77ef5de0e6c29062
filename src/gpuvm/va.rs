//! The VA space proper: mappings in address order, the per-object index, request checks, op
//! generation (`sm_map`, `sm_unmap`, `bo_unmap`) and `apply`. See the module docs of [`super`]
//! for the rules and the numbered cases.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

use crate::hash::FastMap;
use std::hash::Hash;

/// The page size every address, size and object offset is a multiple of.
pub const GPU_PAGE: u64 = 4096;

/// Access flags of a mapping, as drivers keep them next to drm_gpuvm's core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VaFlags {
    /// The GPU may read but not write.
    pub read_only: bool,
    /// The GPU may not fetch instructions from it.
    pub no_exec: bool,
}

impl VaFlags {
    /// Read, write and execute.
    pub const RWX: VaFlags = VaFlags { read_only: false, no_exec: false };
}

/// A repeat mapping's object range: `[start, start + len)` of the object, repeated across the
/// mapping's VA range (what Panthor needs for its sparse-backed heaps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Repeat {
    /// Object offset where the repeated range starts.
    pub start: u64,
    /// Its length: the period in VA (a page multiple).
    pub len: u64,
}

/// A mapping (drm_gpuvm's `drm_gpuva`): `[addr, addr + range)` of the VA space backed by the
/// object `obj` from byte `offset` on, or sparse (`obj: None`: reads zero, writes dropped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Va<O> {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub range: u64,
    /// The backing object; `None` for a sparse (NULL) mapping.
    pub obj: Option<O>,
    /// Object offset of the byte at `addr` (for a repeat mapping: inside the repeated range).
    pub offset: u64,
    /// Access flags.
    pub flags: VaFlags,
    /// Set for a repeat mapping.
    pub repeat: Option<Repeat>,
}

impl<O: Clone> Va<O> {
    /// A plain mapping of `obj` at `offset`.
    pub fn object(addr: u64, range: u64, obj: O, offset: u64) -> Self {
        Va { addr, range, obj: Some(obj), offset, flags: VaFlags::RWX, repeat: None }
    }

    /// A sparse mapping.
    pub fn sparse(addr: u64, range: u64) -> Self {
        Va { addr, range, obj: None, offset: 0, flags: VaFlags::RWX, repeat: None }
    }

    /// The same mapping with `flags`.
    #[must_use]
    pub fn with_flags(mut self, flags: VaFlags) -> Self {
        self.flags = flags;
        self
    }

    /// The same mapping repeating `[offset, offset + len)` of its object across its range.
    #[must_use]
    pub fn repeating(mut self, len: u64) -> Self {
        self.repeat = Some(Repeat { start: self.offset, len });
        self
    }

    /// One past the last byte.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.range)
    }

    /// Whether it is sparse.
    #[must_use]
    pub fn is_sparse(&self) -> bool {
        self.obj.is_none()
    }

    /// Object offset of the byte at VA `va` (inside the mapping).
    #[must_use]
    ///
    /// For an address outside the mapping, or a hand-built mapping the VA space would refuse (a
    /// zero period, an offset outside the repeated range), the result is clamped, never a panic.
    pub fn offset_at(&self, va: u64) -> u64 {
        let x = va.saturating_sub(self.addr);
        match self.repeat {
            None => self.offset.saturating_add(x),
            Some(r) if r.len == 0 => self.offset,
            Some(r) => {
                let phase =
                    (u128::from(self.offset.saturating_sub(r.start)) + u128::from(x)) % u128::from(r.len);
                r.start.saturating_add(phase as u64)
            }
        }
    }

    /// The piece `[at, at + len)` of this mapping, with its offset arithmetic.
    #[must_use]
    pub fn piece(&self, at: u64, len: u64) -> Self {
        Va { addr: at, range: len, offset: self.offset_at(at), ..self.clone() }
    }

    /// Whether `self` (an existing mapping) may keep its entries where `req` replaces it: both
    /// map the same object, at the same offset for every address they share (§5: old offset −
    /// old address == request offset − request address; for repeat mappings, the same repeated
    /// range in the same phase). Sparse mappings never keep. Flags are not compared, as in
    /// drm_gpuvm: a user that maps with other flags must rewrite the entries anyway.
    fn keeps_for(&self, req: &Va<O>) -> bool
    where
        O: PartialEq,
    {
        if self.obj.is_none() || self.obj != req.obj || self.repeat != req.repeat {
            return false;
        }
        let (f, a) = (i128::from(self.offset), i128::from(self.addr));
        let (rf, ra) = (i128::from(req.offset), i128::from(req.addr));
        match self.repeat {
            None => f - a == rf - ra,
            Some(r) => (f - a - (rf - ra)).rem_euclid(i128::from(r.len)) == 0,
        }
    }
}

/// One step of a VA-space update, as drm_gpuvm's split/merge generates it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op<O> {
    /// Create the mapping.
    Map(Va<O>),
    /// Cut the existing mapping `unmap`: it goes, and the pieces `prev` (below the request) and
    /// `next` (above it) that survive are re-created. `keep`: `unmap`'s entries for the pieces
    /// and for the part the request maps identically may stay (apply as a delta).
    Remap {
        /// The surviving piece below the request.
        prev: Option<Va<O>>,
        /// The surviving piece above the request.
        next: Option<Va<O>>,
        /// The mapping being cut.
        unmap: Va<O>,
        /// Whether its entries may stay where the result maps the same.
        keep: bool,
    },
    /// Remove the mapping `va` whole. `keep`: the request maps it identically (its entries may
    /// stay).
    Unmap {
        /// The mapping removed.
        va: Va<O>,
        /// Whether its entries may stay.
        keep: bool,
    },
}

/// Errors of the VA space. A refused request or op list changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaError {
    /// A zero-length request.
    #[error("zero-length request at {addr:#x}")]
    ZeroSize {
        /// Its address.
        addr: u64,
    },
    /// An address, length or object offset that is not a multiple of [`GPU_PAGE`].
    #[error("[{addr:#x}, +{range:#x}) at object offset {offset:#x} is not page aligned")]
    Unaligned {
        /// Address.
        addr: u64,
        /// Length.
        range: u64,
        /// Object offset.
        offset: u64,
    },
    /// `addr + range` (or `offset + range`) wraps past 2^64.
    #[error("[{addr:#x}, +{range:#x}) overflows")]
    Overflow {
        /// Address.
        addr: u64,
        /// Length.
        range: u64,
    },
    /// Outside the VA space.
    #[error("[{addr:#x}, +{range:#x}) is outside the VA space [{start:#x}, {end:#x})")]
    OutOfRange {
        /// Address.
        addr: u64,
        /// Length.
        range: u64,
        /// The space's first byte.
        start: u64,
        /// One past its last.
        end: u64,
    },
    /// Touches the reserved (kernel) range.
    #[error("[{addr:#x}, +{range:#x}) touches the reserved range [{start:#x}, {end:#x})")]
    Reserved {
        /// Address.
        addr: u64,
        /// Length.
        range: u64,
        /// Reserved range start.
        start: u64,
        /// Its end.
        end: u64,
    },
    /// A repeat mapping whose period is zero or unaligned, does not divide the range, or does not
    /// hold the offset; or a sparse mapping asked to repeat.
    #[error("bad repeat mapping: {why}")]
    BadRepeat {
        /// What is wrong.
        why: &'static str,
    },
    /// An op list that does not fit the current mappings (made before another update, or by
    /// hand): an unmap of a mapping that is not there, or a map over one that stays.
    #[error("op {index} does not apply to the current mappings: {why}")]
    StaleOps {
        /// Index of the first offending op.
        index: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// The VA space itself is empty, inverted, unaligned or overflows.
    #[error("bad VA space [{start:#x}, +{range:#x})")]
    BadSpace {
        /// Start.
        start: u64,
        /// Length.
        range: u64,
    },
}

/// The bounds of a [`VaSpace`]: its range and reserved hole, everything a request is checked
/// against before any mapping is looked at (so a submitter can validate without the space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaBounds {
    start: u64,
    end: u64,
    reserved: Option<(u64, u64)>,
}

impl VaBounds {
    /// First byte of the space.
    #[must_use]
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past its last byte.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Checks a range request: page aligned, non-empty, not wrapping, inside the space, clear of
    /// the reserved range; returns its end.
    ///
    /// # Errors
    /// [`VaError::ZeroSize`], [`VaError::Unaligned`], [`VaError::Overflow`],
    /// [`VaError::OutOfRange`], [`VaError::Reserved`].
    pub fn check_range(&self, addr: u64, range: u64, offset: u64) -> Result<u64, VaError> {
        if range == 0 {
            return Err(VaError::ZeroSize { addr });
        }
        if !(addr | range | offset).is_multiple_of(GPU_PAGE) {
            return Err(VaError::Unaligned { addr, range, offset });
        }
        let end = addr.checked_add(range).ok_or(VaError::Overflow { addr, range })?;
        if addr < self.start || end > self.end {
            return Err(VaError::OutOfRange { addr, range, start: self.start, end: self.end });
        }
        if let Some((s, e)) = self.reserved
            && addr < e
            && s < end
        {
            return Err(VaError::Reserved { addr, range, start: s, end: e });
        }
        Ok(end)
    }

    /// Checks a map request as [`VaSpace::sm_map`] does; returns its end.
    ///
    /// # Errors
    /// As [`VaBounds::check_range`], and [`VaError::Overflow`] / [`VaError::BadRepeat`] for
    /// the object range.
    pub fn check_map<O>(&self, req: &Va<O>) -> Result<u64, VaError> {
        let end = self.check_range(req.addr, req.range, req.offset)?;
        match req.repeat {
            None => {
                if req.obj.is_some() && req.offset.checked_add(req.range).is_none() {
                    return Err(VaError::Overflow { addr: req.addr, range: req.range });
                }
            }
            Some(_) if req.obj.is_none() => {
                return Err(VaError::BadRepeat { why: "a sparse mapping cannot repeat" });
            }
            Some(r) => {
                if r.len == 0 || r.len % GPU_PAGE != 0 || r.start % GPU_PAGE != 0 {
                    return Err(VaError::BadRepeat { why: "the period must be a non-zero page multiple" });
                }
                if !req.range.is_multiple_of(r.len) {
                    return Err(VaError::BadRepeat { why: "the range must be a multiple of the period" });
                }
                if r.start.checked_add(r.len).is_none_or(|e| req.offset < r.start || req.offset >= e) {
                    return Err(VaError::BadRepeat { why: "the offset must lie in the repeated range" });
                }
            }
        }
        Ok(end)
    }
}

/// A GPU VA space: drm_gpuvm's core, generic over the object handle `O` (anything cheap to clone
/// and compare: an id, an `Arc`). No page tables, no memory: see the module docs.
#[derive(Debug, Clone)]
pub struct VaSpace<O: Clone + Eq + Hash> {
    bounds: VaBounds,
    map: BTreeMap<u64, Va<O>>,
    objs: FastMap<O, BTreeSet<u64>>,
}

impl<O: Clone + Eq + Hash> VaSpace<O> {
    /// A space over `[start, start + range)`, with `reserved` (an `(addr, range)` inside it)
    /// closed to requests.
    ///
    /// # Errors
    /// [`VaError::BadSpace`] for an empty, unaligned or overflowing space or a reserved range
    /// that is not inside it.
    pub fn new(start: u64, range: u64, reserved: Option<(u64, u64)>) -> Result<Self, VaError> {
        let bad = VaError::BadSpace { start, range };
        let end = start.checked_add(range).ok_or(bad.clone())?;
        if range == 0 || !(start | range).is_multiple_of(GPU_PAGE) {
            return Err(bad);
        }
        let reserved = match reserved {
            None => None,
            Some((a, r)) => {
                let e = a.checked_add(r).ok_or(bad.clone())?;
                if r == 0 || (a | r) % GPU_PAGE != 0 || a < start || e > end {
                    return Err(bad);
                }
                Some((a, e))
            }
        };
        Ok(VaSpace {
            bounds: VaBounds { start, end, reserved },
            map: BTreeMap::new(),
            objs: FastMap::default(),
        })
    }

    /// First byte of the space.
    #[must_use]
    pub fn start(&self) -> u64 {
        self.bounds.start
    }

    /// One past its last byte.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.bounds.end
    }

    /// Number of mappings.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there is no mapping.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The mapping that holds `va`, if any (O(log n)).
    #[must_use]
    pub fn find(&self, va: u64) -> Option<&Va<O>> {
        self.map.range(..=va).next_back().map(|(_, v)| v).filter(|v| v.end() > va)
    }

    /// Every mapping, in address order.
    pub fn iter(&self) -> impl Iterator<Item = &Va<O>> {
        self.map.values()
    }

    /// The mappings that overlap `[addr, end)`, in address order (O(log n) to the first).
    pub fn overlapping(&self, addr: u64, end: u64) -> impl Iterator<Item = &Va<O>> {
        let first = self.map.range(..addr).next_back().map(|(_, v)| v).filter(|v| v.end() > addr);
        first.into_iter().chain(self.map.range(addr..end.max(addr)).map(|(_, v)| v))
    }

    /// [`VaSpace::overlapping`] in one range query, for the op generators: walking down from
    /// the last mapping that starts below `end`, the first one that ends at or below `addr`
    /// ends the search (mappings do not overlap). `f` sees them in address order.
    fn each_overlapping<'a>(&'a self, addr: u64, end: u64, mut f: impl FnMut(&'a Va<O>)) {
        let mut found: [Option<&'a Va<O>>; 4] = [None; 4];
        let mut n = 0;
        let mut rest: Vec<&'a Va<O>> = Vec::new();
        for (_, v) in self.map.range(..end).rev().take_while(|(_, v)| v.end() > addr) {
            if n < found.len() {
                found[n] = Some(v);
                n += 1;
            } else {
                rest.push(v);
            }
        }
        for v in rest.into_iter().rev() {
            f(v);
        }
        for v in found[..n].iter().rev().flatten() {
            f(v);
        }
    }

    /// The mappings of `obj`, in address order.
    pub fn obj_mappings<'a>(&'a self, obj: &O) -> impl Iterator<Item = &'a Va<O>> + 'a {
        self.objs.get(obj).into_iter().flat_map(|s| s.iter()).filter_map(|a| self.map.get(a))
    }

    /// The space's bounds (what requests are checked against).
    #[must_use]
    pub fn bounds(&self) -> VaBounds {
        self.bounds
    }

    fn check_range(&self, addr: u64, range: u64, offset: u64) -> Result<u64, VaError> {
        self.bounds.check_range(addr, range, offset)
    }

    fn check_map(&self, req: &Va<O>) -> Result<u64, VaError> {
        self.bounds.check_map(req)
    }

    /// The ops that map `req` (drm_gpuvm's `sm_map`), without changing anything: for each
    /// existing mapping it overlaps, in address order, an UNMAP or a REMAP keeping the pieces
    /// outside the request, then one MAP (module docs, §5 of REFERENCES.md).
    ///
    /// # Errors
    /// [`VaError::ZeroSize`], [`VaError::Unaligned`], [`VaError::Overflow`],
    /// [`VaError::OutOfRange`], [`VaError::Reserved`], [`VaError::BadRepeat`].
    pub fn sm_map(&self, req: &Va<O>) -> Result<Vec<Op<O>>, VaError> {
        let mut ops = Vec::with_capacity(2);
        self.sm_map_into(req, &mut ops)?;
        Ok(ops)
    }

    /// [`VaSpace::sm_map`] appending to `ops` (nothing appended on error).
    pub(crate) fn sm_map_into(&self, req: &Va<O>, ops: &mut Vec<Op<O>>) -> Result<(), VaError> {
        let (a0, e0) = (req.addr, self.check_map(req)?);
        self.each_overlapping(a0, e0, |va| {
            let (a, e) = (va.addr, va.end());
            let keep = va.keeps_for(req);
            let prev = (a < a0).then(|| va.piece(a, a0 - a));
            let next = (e > e0).then(|| va.piece(e0, e - e0));
            if prev.is_none() && next.is_none() {
                ops.push(Op::Unmap { va: va.clone(), keep });
            } else {
                ops.push(Op::Remap { prev, next, unmap: va.clone(), keep });
            }
        });
        ops.push(Op::Map(req.clone()));
        Ok(())
    }

    /// The ops that unmap `[addr, addr + range)` (drm_gpuvm's `sm_unmap`): per overlapping
    /// mapping, a REMAP with its surviving pieces or an UNMAP; `keep` is always false; no MAP.
    /// A hole gives no ops.
    ///
    /// # Errors
    /// As [`VaSpace::sm_map`] for the range.
    pub fn sm_unmap(&self, addr: u64, range: u64) -> Result<Vec<Op<O>>, VaError> {
        let mut ops = Vec::new();
        self.sm_unmap_into(addr, range, &mut ops)?;
        Ok(ops)
    }

    /// [`VaSpace::sm_unmap`] appending to `ops` (nothing appended on error).
    pub(crate) fn sm_unmap_into(&self, addr: u64, range: u64, ops: &mut Vec<Op<O>>) -> Result<(), VaError> {
        let e0 = self.check_range(addr, range, 0)?;
        self.each_overlapping(addr, e0, |va| {
            let (a, e) = (va.addr, va.end());
            let prev = (a < addr).then(|| va.piece(a, addr - a));
            let next = (e > e0).then(|| va.piece(e0, e - e0));
            if prev.is_none() && next.is_none() {
                ops.push(Op::Unmap { va: va.clone(), keep: false });
            } else {
                ops.push(Op::Remap { prev, next, unmap: va.clone(), keep: false });
            }
        });
        Ok(())
    }

    /// The ops that remove every mapping of `obj` (drm_gpuvm's `bo_unmap`), in address order.
    #[must_use]
    pub fn bo_unmap(&self, obj: &O) -> Vec<Op<O>> {
        self.obj_mappings(obj).map(|va| Op::Unmap { va: va.clone(), keep: false }).collect()
    }

    /// Whether `va` would overlap a mapping that is not being removed, or one created earlier
    /// in the same op list.
    fn blocked(&self, va: &Va<O>, removed: &BTreeSet<u64>, created: &[(u64, u64)]) -> bool {
        // Mappings do not overlap: walking down from the last one that starts below the end,
        // the first that ends at or below the start ends the search (one range query).
        self.map
            .range(..va.end())
            .rev()
            .take_while(|(_, v)| v.end() > va.addr)
            .any(|(a, _)| !removed.contains(a))
            || created.iter().any(|&(s, e)| s < va.end() && va.addr < e)
    }

    /// Applies an op list from [`VaSpace::sm_map`], [`VaSpace::sm_unmap`] or
    /// [`VaSpace::bo_unmap`] made against the current state. The whole list is checked first.
    ///
    /// # Errors
    /// [`VaError::StaleOps`] when an op does not fit the current mappings; nothing changes then.
    pub fn apply(&mut self, ops: &[Op<O>]) -> Result<(), VaError> {
        let mut removed: BTreeSet<u64> = BTreeSet::new();
        let mut created: Vec<(u64, u64)> = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            let stale = |why| VaError::StaleOps { index, why };
            let (gone, new): (Option<&Va<O>>, [Option<&Va<O>>; 2]) = match op {
                Op::Map(v) => (None, [Some(v), None]),
                Op::Unmap { va, .. } => (Some(va), [None, None]),
                Op::Remap { prev, next, unmap, .. } => (Some(unmap), [prev.as_ref(), next.as_ref()]),
            };
            if let Some(g) = gone {
                if self.map.get(&g.addr) != Some(g) || !removed.insert(g.addr) {
                    return Err(stale("it removes a mapping that is not there"));
                }
            }
            for v in new.into_iter().flatten() {
                if v.range == 0
                    || v.addr.checked_add(v.range).is_none_or(|e| e > self.bounds.end)
                    || v.addr < self.bounds.start
                {
                    return Err(stale("it creates a mapping outside the space"));
                }
                if let Op::Remap { unmap, .. } = op
                    && (v.addr < unmap.addr || v.end() > unmap.end())
                {
                    return Err(stale("a remap piece lies outside the mapping it cuts"));
                }
                if self.blocked(v, &removed, &created) {
                    return Err(stale("it creates a mapping over one that stays"));
                }
                created.push((v.addr, v.end()));
            }
        }
        self.apply_checked(ops);
        Ok(())
    }

    /// Applies ops made by [`VaSpace::sm_map`] / [`VaSpace::sm_unmap`] of this space in its
    /// current state, with nothing in between (what the GPU VM does under its lock): they fit by
    /// construction, so the checks of [`VaSpace::apply`] are skipped (debug builds still make
    /// them).
    pub(crate) fn apply_fresh(&mut self, ops: &[Op<O>]) {
        debug_assert!(self.clone().apply(ops).is_ok(), "fresh ops that do not apply");
        self.apply_checked(ops);
    }

    /// The updates of [`VaSpace::apply`], once the list is known to fit.
    fn apply_checked(&mut self, ops: &[Op<O>]) {
        let mut i = 0;
        while i < ops.len() {
            let op = &ops[i];
            i += 1;
            match op {
                Op::Map(v) => self.insert(v.clone()),
                // The mapping removed is replaced at its address by the next op's (a rebind of
                // the same range, the common case of page churn): one node update in place.
                Op::Unmap { va, .. } => {
                    if let Some(Op::Map(n)) = ops.get(i)
                        && n.addr == va.addr
                    {
                        i += 1;
                        self.replace(n.clone());
                    } else {
                        self.remove(va.addr);
                    }
                }
                // A `prev` piece starts where the mapping it cuts did and keeps its object: the
                // node is updated in place (no remove and insert, no index change).
                Op::Remap { prev: Some(p), next, unmap, .. }
                    if p.addr == unmap.addr && p.obj == unmap.obj =>
                {
                    if let Some(slot) = self.map.get_mut(&p.addr) {
                        *slot = p.clone();
                    }
                    if let Some(n) = next {
                        self.insert(n.clone());
                    }
                }
                Op::Remap { prev, next, unmap, .. } => {
                    self.remove(unmap.addr);
                    for v in [prev, next].into_iter().flatten() {
                        self.insert(v.clone());
                    }
                }
            }
        }
    }

    /// Puts `v` in the node at its address (which holds a mapping being removed).
    fn replace(&mut self, v: Va<O>) {
        let Some(slot) = self.map.get_mut(&v.addr) else {
            self.insert(v);
            return;
        };
        if slot.obj != v.obj {
            let (old, new) = (slot.obj.clone(), v.obj.clone());
            *slot = v;
            let addr = slot.addr;
            if let Some(o) = old
                && let Some(set) = self.objs.get_mut(&o)
            {
                set.remove(&addr);
                if set.is_empty() {
                    self.objs.remove(&o);
                }
            }
            if let Some(o) = new {
                self.objs.entry(o).or_default().insert(addr);
            }
        } else {
            *slot = v;
        }
    }

    fn insert(&mut self, v: Va<O>) {
        if let Some(o) = &v.obj {
            self.objs.entry(o.clone()).or_default().insert(v.addr);
        }
        self.map.insert(v.addr, v);
    }

    fn remove(&mut self, addr: u64) {
        if let Some(v) = self.map.remove(&addr)
            && let Some(o) = &v.obj
            && let Some(set) = self.objs.get_mut(o)
        {
            set.remove(&addr);
            if set.is_empty() {
                self.objs.remove(o);
            }
        }
    }

    /// [`VaSpace::sm_map`] then [`VaSpace::apply`]; returns the ops applied.
    ///
    /// # Errors
    /// As [`VaSpace::sm_map`].
    pub fn map(&mut self, req: &Va<O>) -> Result<Vec<Op<O>>, VaError> {
        let ops = self.sm_map(req)?;
        self.apply(&ops)?;
        Ok(ops)
    }

    /// [`VaSpace::sm_unmap`] then [`VaSpace::apply`]; returns the ops applied.
    ///
    /// # Errors
    /// As [`VaSpace::sm_unmap`].
    pub fn unmap(&mut self, addr: u64, range: u64) -> Result<Vec<Op<O>>, VaError> {
        let ops = self.sm_unmap(addr, range)?;
        self.apply(&ops)?;
        Ok(ops)
    }
}

/// The op list that undoes `ops` once they were applied (last first): what a failed bind's
/// prepare applies to put the VA space back.
pub(crate) fn inverse<O: Clone>(ops: &[Op<O>]) -> Vec<Op<O>> {
    let mut out = Vec::with_capacity(ops.len() + 2);
    for op in ops.iter().rev() {
        match op {
            Op::Map(v) => out.push(Op::Unmap { va: v.clone(), keep: false }),
            Op::Unmap { va, .. } => out.push(Op::Map(va.clone())),
            Op::Remap { prev, next, unmap, .. } => {
                for p in [prev, next].into_iter().flatten() {
                    out.push(Op::Unmap { va: p.clone(), keep: false });
                }
                out.push(Op::Map(unmap.clone()));
            }
        }
    }
    out
}
