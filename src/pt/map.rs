//! Map: validate, plan (one read-only descent), preallocate, commit (one writing descent, new
//! subtrees filled privately and published last). See the module docs of [`super`].
#![forbid(unsafe_code)]

use core::sync::atomic::{AtomicU64, Ordering};

use super::source::{Cursor, Frag};
use super::{
    ENTRIES, Format, MapError, MapOptions, MapSource, MapStats, PageTable, Prot, Pte, index, shift, span,
    split_cost,
};
use crate::addr::{Address, PAGE_SIZE, PhysAddr, SpanError};
use crate::mem::Reservation;

#[derive(Default)]
pub(super) struct Plan {
    pub(super) tables: u64,
    pub(super) reserve: u64,
    /// Planning a bind ahead of its unmaps ([`PageTable::prepare`]): every present entry but a
    /// table counts as empty (the bind's unmaps remove it first), so nothing is an overlap.
    pub(super) ahead: bool,
    /// Planning several maps of one bind: the slots whose new table is already counted, as
    /// `(level, va >> shift(level))` (tables are not freed during a bind, so one new table per
    /// slot serves every map that needs it).
    pub(super) counted: Option<std::collections::HashSet<(u8, u64)>>,
}

impl<F: Format> PageTable<F> {
    /// The first mapped address in `[va, va + len)`, if any (a walk that skips empty subtrees).
    #[must_use]
    pub fn first_mapped(&self, va: F::Va, len: u64) -> Option<F::Va> {
        let v = va.as_u64();
        if v & (PAGE_SIZE - 1) != 0 || len & (PAGE_SIZE - 1) != 0 || Self::span(va, len).is_err() {
            return None;
        }
        let _guard = self.lock.lock();
        // The planning walk with 4 KiB leaves forced reports the first present entry; its
        // source cursor only counts bytes here.
        let mut cur =
            Cursor::new(MapSource::Range { pa: F::Out::new(0), len }, Self::PA_LIMIT, Frag::default());
        let root = self.table(self.root);
        self.plan(Self::ROOT_LEVEL, Some(root), v, v + len, &mut cur, 0, &mut Plan::default())
            .err()
            .map(F::Va::new)
    }

    /// Validates a map request, its source and where it goes (aligned, inside the input space,
    /// not wrapping), without touching the table; returns its length.
    pub(super) fn check_request(
        va: F::Va,
        src: &MapSource<'_, F::Out>,
    ) -> Result<u64, MapError<F::Va, F::Out>> {
        let len = Self::check_source(src)?;
        if va.as_u64() & (PAGE_SIZE - 1) != 0 {
            return Err(MapError::UnalignedVa { va });
        }
        match Self::span(va, len) {
            Ok(_) => Ok(len),
            Err(SpanError::Overflow { .. }) => Err(MapError::Overflow { va, len }),
            Err(_) => Err(MapError::OutOfRange { va, len }),
        }
    }

    /// Validates a source (page lists and page arrays are checked during the walk instead) and
    /// returns its length.
    pub(super) fn check_source(src: &MapSource<'_, F::Out>) -> Result<u64, MapError<F::Va, F::Out>> {
        const LOW: u64 = PAGE_SIZE - 1;
        if matches!(src, MapSource::BioVecs(_) | MapSource::PageVecs(_))
            && core::any::TypeId::of::<F::Out>() != core::any::TypeId::of::<PhysAddr>()
        {
            return Err(MapError::PhysicalSource { what: F::Out::KIND });
        }
        match *src {
            MapSource::Range { pa, len } => {
                let bad = (pa.as_u64() | len) & LOW != 0;
                if len == 0 {
                    return Err(MapError::ZeroLength);
                }
                if bad {
                    return Err(MapError::UnalignedSource { index: 0, pa, len });
                }
                match pa.as_u64().checked_add(len) {
                    Some(end) if end <= Self::PA_LIMIT => Ok(len),
                    _ => Err(MapError::PhysTooHigh { index: 0, pa, len }),
                }
            }
            MapSource::Sparse { len } => {
                if len == 0 {
                    return Err(MapError::ZeroLength);
                }
                if len & LOW != 0 {
                    return Err(MapError::UnalignedSource { index: 0, pa: F::Out::new(0), len });
                }
                if F::sparse_bits(0).is_none() {
                    return Err(MapError::SparseUnsupported);
                }
                Ok(len)
            }
            MapSource::Pages(p) => {
                // Each page is validated as the commit reads it, chunk by chunk, before anything
                // becomes visible (see `commit`): one pass over the list instead of two.
                if p.is_empty() {
                    return Err(MapError::ZeroLength);
                }
                let len = (p.len() as u64)
                    .checked_mul(PAGE_SIZE)
                    .ok_or(MapError::OutOfRange { va: F::Va::new(0), len: u64::MAX })?;
                Ok(len)
            }
            MapSource::PageVecs(b) | MapSource::DirectPageVecs(b) => {
                // Checked element by element as the walk reads them (see `fill_4k`).
                if b.is_empty() {
                    return Err(MapError::ZeroLength);
                }
                Ok(b.len() as u64 * PAGE_SIZE)
            }
            MapSource::PageSegments(g) => {
                // Checked element by element as the walk reads them (see `fill_4k`).
                if g.is_empty() {
                    return Err(MapError::ZeroLength);
                }
                Ok(g.len() as u64 * PAGE_SIZE)
            }
            MapSource::Segments { segs, skip, len } => {
                if len == 0 || segs.is_empty() {
                    return Err(MapError::ZeroLength);
                }
                if (skip | len) & LOW != 0 {
                    return Err(MapError::UnalignedSource { index: 0, pa: F::Out::new(skip), len });
                }
                // One vectorizable pass over the list given (callers hand the window they map);
                // the exact error comes from the loop after it.
                let want = skip.saturating_add(len);
                let (all, top, total) = segs.iter().fold((0u64, 0u64, 0u64), |(a, t, sm), g| {
                    let end = g.addr.as_u64().saturating_add(g.len);
                    (
                        a | g.addr.as_u64() | g.len | u64::from(g.len == 0),
                        t.max(end),
                        sm.saturating_add(g.len),
                    )
                });
                if all & LOW != 0 || top > Self::PA_LIMIT {
                    for (index, g) in segs.iter().enumerate() {
                        let (pa, l) = (g.addr, g.len);
                        if l == 0 || (pa.as_u64() | l) & LOW != 0 {
                            return Err(MapError::UnalignedSource { index, pa, len: l });
                        }
                        if pa.as_u64().checked_add(l).is_none_or(|e| e > Self::PA_LIMIT) {
                            return Err(MapError::PhysTooHigh { index, pa, len: l });
                        }
                    }
                }
                if total < want {
                    return Err(MapError::SourceShort { wanted: skip.saturating_add(len), available: total });
                }
                Ok(len)
            }
            MapSource::BioVecs(b) => {
                if b.is_empty() {
                    return Err(MapError::ZeroLength);
                }
                // Fast check, one vectorizable pass: every segment page aligned and a page
                // multiple, none empty, no page near the limit (offsets and lengths are below
                // 2^32, so a page below PA_LIMIT / 2 cannot reach it). The exact error comes from
                // the loop below.
                let (all, top, min, sum) =
                    b.iter().fold((0u64, 0u64, u32::MAX, 0u64), |(a, t, mn, sm), v| {
                        (
                            a | v.phys.as_u64() | u64::from(v.offset) | u64::from(v.len),
                            t.max(v.phys.as_u64()),
                            mn.min(v.len),
                            sm + u64::from(v.len),
                        )
                    });
                if all & LOW == 0 && min > 0 && top < Self::PA_LIMIT / 2 {
                    return Ok(sum);
                }
                let mut total = 0u64;
                for (index, v) in b.iter().enumerate() {
                    let len = u64::from(v.len);
                    let out = |p: PhysAddr| F::Out::new(p.as_u64());
                    let pa = v.start().ok_or(MapError::PhysTooHigh { index, pa: out(v.phys), len })?;
                    if len == 0 || (pa.as_u64() | len) & LOW != 0 {
                        return Err(MapError::UnalignedSource { index, pa: out(pa), len });
                    }
                    if pa.as_u64().checked_add(len).is_none_or(|e| e > Self::PA_LIMIT) {
                        return Err(MapError::PhysTooHigh { index, pa: out(pa), len });
                    }
                    total += len;
                }
                Ok(total)
            }
        }
    }

    /// Maps `src` at `va` with `prot` in one walk.
    ///
    /// # Errors
    /// [`MapError::ZeroLength`], [`MapError::UnalignedVa`], [`MapError::UnalignedSource`],
    /// [`MapError::PhysTooHigh`], [`MapError::OutOfRange`], [`MapError::InvalidProt`] for bad
    /// input; [`MapError::AlreadyMapped`] naming the first mapped address in the range;
    /// [`MapError::OutOfMemory`] when the arena cannot supply the tables. In every case the table
    /// is unchanged.
    pub fn map(
        &self,
        va: F::Va,
        src: MapSource<'_, F::Out>,
        prot: Prot,
        opts: MapOptions,
    ) -> Result<MapStats, MapError<F::Va, F::Out>> {
        self.map_inner(va, src, prot, opts, None)
    }

    /// [`Self::map`], drawing table pages and split reserve from `prep` instead of the arena
    /// when `prep` is given.
    pub(super) fn map_inner(
        &self,
        va: F::Va,
        src: MapSource<'_, F::Out>,
        prot: Prot,
        opts: MapOptions,
        prep: Option<&mut Reservation>,
    ) -> Result<MapStats, MapError<F::Va, F::Out>> {
        let len = Self::check_request(va, &src)?;
        let v = va.as_u64();
        let sparse = matches!(src, MapSource::Sparse { .. });
        let bits_at = |level: u8| match sparse {
            // `check_source` refused formats without sparse entries.
            true => F::sparse_bits(level).unwrap_or(0),
            false => F::leaf_bits(level, prot),
        };
        let bits0 = bits_at(0);
        if !F::is_present(bits0) {
            return Err(MapError::InvalidProt { prot });
        }
        let mut reserve = self.lock.lock();
        if self.in_one_leaf_table(v, len)
            && let Some(leaf) = self.leaf_table(v)
        {
            return self.map_in_leaf(leaf, v, len, src, bits0);
        }
        let mut bits = [0u64; 4];
        for (level, b) in bits.iter_mut().enumerate() {
            *b = bits_at(level as u8);
        }
        self.map_walk(&mut reserve, v, len, src, &bits, opts, prep)
    }

    /// The general map: plan, preallocate, build, publish (the module docs of [`super`]).
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn map_walk(
        &self,
        reserve: &mut Reservation,
        v: u64,
        len: u64,
        src: MapSource<'_, F::Out>,
        bits: &[u64; 4],
        opts: MapOptions,
        mut prep: Option<&mut Reservation>,
    ) -> Result<MapStats, MapError<F::Va, F::Out>> {
        let cursor = || Cursor::new(src, Self::PA_LIMIT, Self::frag(v));
        let max_level = opts.max_leaf.level();
        let root = self.table(self.root);
        let mut plan = Plan::default();
        self.plan(Self::ROOT_LEVEL, Some(root), v, v + len, &mut cursor(), max_level, &mut plan)
            .map_err(|at| MapError::AlreadyMapped { va: F::Va::new(at) })?;

        if let Some(p) = prep.as_deref_mut()
            && p.frames() < plan.reserve + plan.tables
        {
            return Err(MapError::NotPrepared);
        }
        if plan.reserve > 0 {
            match prep.as_deref_mut() {
                // Checked above: the prepared token holds enough.
                Some(p) => {
                    self.mem.transfer_reserved(p, reserve, plan.reserve).map_err(|_| MapError::NotPrepared)?
                }
                None => self.mem.reserve_more(reserve, plan.reserve).map_err(MapError::OutOfMemory)?,
            }
        }
        let mut pool = if plan.tables == 0 {
            Vec::new()
        } else {
            let got = match prep.as_deref_mut() {
                Some(p) => self.mem.alloc_reserved_frames(p, plan.tables as usize),
                None => self.mem.alloc_frames(plan.tables as usize),
            };
            match got {
                Ok(p) => p,
                Err(e) => {
                    self.give_back_reserve(reserve, plan.reserve, prep);
                    return Err(MapError::OutOfMemory(e));
                }
            }
        };
        let mut stats = MapStats { bytes: len, tables_created: plan.tables, ..MapStats::default() };
        let all_new = pool.clone();
        let mut deferred = Vec::new();
        let mut ctx = Commit { bits, max_level, pool: &mut pool, stats: &mut stats, deferred: &mut deferred };
        let mark = self.deferring().then(|| self.log.lock().mark());
        let built = self.build(Self::ROOT_LEVEL, self.root, false, v, v + len, &mut cursor(), &mut ctx);
        if let Err(index) = built {
            // The fresh tables' deferred entries go with the tables.
            if let Some(m) = mark {
                self.log.lock().truncate(m);
            }
            // Nothing was published: every new table is still private. Give it all back (a
            // prepared token gets its frames back as reserve, as far as the arena allows).
            let _ = self.mem.free_frames(&all_new);
            if let Some(p) = prep.as_deref_mut() {
                let _ = self.mem.reserve_more(p, all_new.len() as u64);
            }
            self.give_back_reserve(reserve, plan.reserve, prep);
            return Err(Self::source_error(src, index));
        }
        debug_assert!(pool.is_empty());
        self.publish(&deferred, bits);
        if plan.tables > 0 {
            self.tables.fetch_add(plan.tables, Ordering::Relaxed);
        }
        if plan.reserve > 0 {
            self.reserved.fetch_add(plan.reserve, Ordering::Relaxed);
        }
        Ok(stats)
    }

    /// Undoes the split-reserve step of a failed map: `n` frames back to `prep`, or the arena.
    fn give_back_reserve(&self, reserve: &mut Reservation, n: u64, prep: Option<&mut Reservation>) {
        if n == 0 {
            return;
        }
        match prep {
            Some(p) => {
                let _ = self.mem.transfer_reserved(reserve, p, n);
            }
            None => {
                let _ = self.mem.unreserve(reserve, n);
            }
        }
    }

    /// The fast path of [`Self::map`] for a range inside the existing leaf table `leaf` (the
    /// common single-page or 64 KiB map): one descent (done by the caller), a check that the
    /// slots are empty and the source valid, the stores. No table is created and nothing is
    /// reserved, so it touches neither the arena's allocator nor the table's counters. The
    /// result, and the error on bad input, are the general path's.
    #[inline]
    fn map_in_leaf(
        &self,
        leaf: PhysAddr,
        v: u64,
        len: u64,
        src: MapSource<'_, F::Out>,
        bits: u64,
    ) -> Result<MapStats, MapError<F::Va, F::Out>> {
        let n = (len / PAGE_SIZE) as usize;
        let i0 = index(v, 0);
        let entries = &self.table(leaf)[i0..i0 + n];
        if let Some(k) = entries.iter().position(|e| F::is_present(e.load(Ordering::Relaxed))) {
            return Err(MapError::AlreadyMapped { va: F::Va::new(v + k as u64 * PAGE_SIZE) });
        }
        if self.deferring() {
            let mut cur = Cursor::new(src, Self::PA_LIMIT, Self::frag(v));
            if !matches!(src, MapSource::Sparse { .. } | MapSource::Range { .. }) {
                cur.clone().check_4k(n).map_err(|index| Self::source_error(src, index))?;
            }
            let _ = self.fill_leaves(leaf, i0, entries, |e| cur.fill_4k(e, bits, false));
        } else {
            match src {
                MapSource::Sparse { .. } => {
                    for e in entries {
                        e.store(bits, Ordering::Relaxed);
                    }
                }
                // Validated whole by `check_source`; fragments, where the format has them, are
                // set by the cursor below.
                MapSource::Range { pa, .. } if F::MAX_FRAGMENT == 0 => {
                    let mut at = pa.as_u64() | bits;
                    for e in entries {
                        e.store(at, Ordering::Relaxed);
                        at += PAGE_SIZE;
                    }
                }
                _ => {
                    let mut cur = Cursor::new(src, Self::PA_LIMIT, Self::frag(v));
                    // Bio_vec arrays were validated whole; page lists are checked here, before
                    // any store becomes visible.
                    cur.clone().check_4k(n).map_err(|index| Self::source_error(src, index))?;
                    let _ = cur.fill_4k(entries, bits, false);
                }
            }
        }
        core::sync::atomic::fence(Ordering::Release);
        self.count_add(leaf, n as u16);
        Ok(MapStats { bytes: len, leaves: [n as u64, 0, 0], tables_created: 0 })
    }

    /// The fragment rule of the format for a map starting at VA `v`.
    pub(super) fn frag(v: u64) -> Frag {
        Frag { va0: v, max: F::MAX_FRAGMENT.min(9), shift: F::FRAGMENT_SHIFT }
    }

    /// The error for the bad element `index` of a page list or page-vector array.
    fn source_error(src: MapSource<'_, F::Out>, index: usize) -> MapError<F::Va, F::Out> {
        let (pa, len, offset) = match src {
            MapSource::Pages(p) => (p[index], PAGE_SIZE, 0),
            MapSource::PageSegments(g) => (g[index].addr, g[index].len, 0),
            MapSource::PageVecs(b) | MapSource::DirectPageVecs(b) => {
                let v = b[index];
                (F::Out::new(v.start().unwrap_or(v.phys).as_u64()), u64::from(v.len), v.offset)
            }
            _ => (F::Out::new(0), PAGE_SIZE, 0),
        };
        if pa.as_u64() & (PAGE_SIZE - 1) != 0 || len != PAGE_SIZE || offset != 0 {
            MapError::UnalignedSource { index, pa, len }
        } else {
            MapError::PhysTooHigh { index, pa, len }
        }
    }

    /// How many whole entries from `v` on, at `level`, can be huge leaves of the current
    /// contiguous source run (0 when the first cannot). Stays within the current table.
    #[inline]
    pub(super) fn huge_run(level: u8, max_level: u8, v: u64, end: u64, cur: &Cursor<'_, F::Out>) -> usize {
        if level == 0 || level > max_level || !F::leaf_allowed(level) {
            return 0;
        }
        let s = span(level);
        if v & (s - 1) != 0 || end - v < s {
            return 0;
        }
        let (pa, left) = cur.run();
        if pa & (s - 1) != 0 || left < s {
            return 0;
        }
        let in_table = (ENTRIES - index(v, level)) as u64;
        ((end - v) / s).min(left / s).min(in_table) as usize
    }

    /// Read-only descent: counts tables and reserve, finds overlaps (returns the mapped address;
    /// never with `plan.ahead`, see [`Plan`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn plan(
        &self,
        level: u8,
        table: Option<&[AtomicU64; ENTRIES]>,
        va: u64,
        end: u64,
        cur: &mut Cursor<'_, F::Out>,
        max_level: u8,
        plan: &mut Plan,
    ) -> Result<(), u64> {
        if level == 0 {
            if let (Some(t), false) = (table, plan.ahead) {
                let (i0, i1) = (index(va, 0), index(va, 0) + ((end - va) / PAGE_SIZE) as usize);
                if let Some(k) = t[i0..i1].iter().position(|e| F::is_present(e.load(Ordering::Acquire))) {
                    return Err(va + k as u64 * PAGE_SIZE);
                }
            }
            cur.advance(end - va);
            return Ok(());
        }
        let s = span(level);
        let mut v = va;
        while v < end {
            // A run of whole entries that become huge leaves: counted in one step.
            let i = index(v, level);
            let mut n = Self::huge_run(level, max_level, v, end, cur);
            if let (Some(t), true) = (table, n > 0) {
                // What stops a run of huge leaves: any present entry, or ahead of the unmaps
                // only a table (which stays through the bind).
                let free = |e: &AtomicU64| {
                    let raw = e.load(Ordering::Acquire);
                    if plan.ahead {
                        !matches!(F::decode(raw, level), Pte::Table(_))
                    } else {
                        !F::is_present(raw)
                    }
                };
                n = t[i..i + n].iter().take_while(|e| free(e)).count();
            }
            if n > 0 {
                plan.reserve += n as u64 * split_cost(level);
                cur.advance(n as u64 * s);
                v += n as u64 * s;
                continue;
            }
            let e_end = ((v & !(s - 1)) + s).min(end);
            // A table where a huge leaf could go is descended into: it holds at least one present
            // entry (emptied tables are freed), which the descent reports exactly.
            match table.map_or(Pte::Empty, |t| F::decode(t[i].load(Ordering::Acquire), level)) {
                Pte::Table(pa) => {
                    let child = self.table(pa);
                    self.plan(level - 1, Some(child), v, e_end, cur, max_level, plan)?;
                }
                Pte::Leaf { .. } | Pte::Sparse if !plan.ahead => return Err(v),
                // Empty, or (ahead) a leaf the bind's unmaps remove or split: a new table, planned
                // as a fresh subtree.
                _ => {
                    let first = plan.counted.as_mut().is_none_or(|c| c.insert((level, v >> shift(level))));
                    plan.tables += u64::from(first);
                    self.plan(level - 1, None, v, e_end, cur, max_level, plan)?;
                }
            }
            v = e_end;
        }
        Ok(())
    }

    /// First writing pass. New tables (`fresh`: just allocated, contents garbage, invisible to
    /// everyone) are filled directly, validating a page list as it is read. Every write that
    /// would become visible — leaves into existing tables, and the entry that hangs a new
    /// subtree from an existing table — is only validated and recorded in `ctx.deferred`, for
    /// [`Self::publish`] once the whole source has proven valid. Returns the index of the first
    /// bad page of a page list.
    #[allow(clippy::too_many_arguments)]
    fn build<'s>(
        &self,
        level: u8,
        table_pa: PhysAddr,
        fresh: bool,
        va: u64,
        end: u64,
        cur: &mut Cursor<'s, F::Out>,
        ctx: &mut Commit<'_, 's, F>,
    ) -> Result<(), usize> {
        let t = self.table(table_pa);
        let s = span(level);
        let i0 = index(va, level);
        let i1 = i0 + ((end - 1 - (va & !(s - 1))) >> shift(level)) as usize + 1;
        if fresh {
            for e in t[..i0].iter().chain(&t[i1..]) {
                e.store(0, Ordering::Relaxed);
            }
            // Every slot of [i0, i1) gets a leaf or a subtree below.
            self.count(table_pa).store((i1 - i0) as u16, Ordering::Relaxed);
        }
        if level == 0 {
            ctx.stats.leaves[0] += (i1 - i0) as u64;
            if fresh {
                return self.fill_leaves(table_pa, i0, &t[i0..i1], |e| cur.fill_4k(e, ctx.bits[0], true));
            }
            ctx.deferred.push(Deferred::Leaves { table: table_pa, i0, i1, level, cur: cur.clone() });
            return cur.check_4k(i1 - i0);
        }
        let mut v = va;
        let mut i = i0;
        while i < i1 {
            let mut n = Self::huge_run(level, ctx.max_level, v, end, cur);
            if n > 0 && !fresh {
                n = t[i..i + n].iter().take_while(|e| !F::is_present(e.load(Ordering::Acquire))).count();
            }
            if n > 0 {
                // Huge leaves from one contiguous run (ranges and bio_vecs are validated up
                // front): a tight loop of stores, or one deferred record.
                ctx.stats.leaves[usize::from(level)] += n as u64;
                if fresh {
                    let (pa, _) = cur.run();
                    write_huge(&t[i..i + n], pa | ctx.bits[usize::from(level)], cur.step(s));
                } else {
                    ctx.deferred.push(Deferred::Leaves {
                        table: table_pa,
                        i0: i,
                        i1: i + n,
                        level,
                        cur: cur.clone(),
                    });
                }
                cur.advance(n as u64 * s);
                v += n as u64 * s;
                i += n;
                continue;
            }
            let e_end = ((v & !(s - 1)) + s).min(end);
            let raw = if fresh { 0 } else { t[i].load(Ordering::Acquire) };
            if let Pte::Table(pa) = F::decode(raw, level) {
                self.build(level - 1, pa, false, v, e_end, cur, ctx)?;
            } else {
                let child = ctx.pool.pop().expect("the plan counted every new table");
                self.build(level - 1, child, true, v, e_end, cur, ctx)?;
                if fresh {
                    t[i].store(F::table_entry(child), Ordering::Relaxed);
                } else {
                    ctx.deferred.push(Deferred::Publish { table: table_pa, index: i, child });
                }
            }
            v = e_end;
            i += 1;
        }
        Ok(())
    }

    /// Second writing pass: the visible writes recorded by [`Self::build`], in address order.
    /// New subtrees are complete before the release store that publishes them.
    fn publish(&self, deferred: &[Deferred<'_, F>], bits: &[u64; 4]) {
        for d in deferred {
            match d {
                Deferred::Leaves { table, i0, i1, level, cur } => {
                    self.count_add(*table, (i1 - i0) as u16);
                    let t = &self.table(*table)[*i0..*i1];
                    let mut cur = cur.clone();
                    if *level == 0 {
                        // Validated by `build`; cannot fail.
                        let _ = self.fill_leaves(*table, *i0, t, |e| cur.fill_4k(e, bits[0], false));
                    } else {
                        let (pa, _) = cur.run();
                        write_huge(t, pa | bits[usize::from(*level)], cur.step(span(*level)));
                    }
                }
                Deferred::Publish { table, index, child } => {
                    self.count_add(*table, 1);
                    self.table(*table)[*index].store(F::table_entry(*child), Ordering::Release);
                }
            }
        }
        // Orders the relaxed leaf stores before every later store of this thread (the lock's
        // release, the caller's hand-off of the address): whoever synchronizes with one of those
        // sees the leaves. A lock-free walker may see them earlier, which is harmless (a leaf
        // points at nothing the walker could misread).
        core::sync::atomic::fence(Ordering::Release);
    }
}

pub(super) struct Commit<'a, 's, F: Format> {
    bits: &'a [u64; 4],
    max_level: u8,
    pool: &'a mut Vec<PhysAddr>,
    stats: &'a mut MapStats,
    deferred: &'a mut Vec<Deferred<'s, F>>,
}

/// A write into a table that others can already see, held back until the map is known good.
pub(super) enum Deferred<'s, F: Format> {
    /// Leaves `[i0, i1)` of an existing table at `level`, from the source at `cur`.
    Leaves { table: PhysAddr, i0: usize, i1: usize, level: u8, cur: Cursor<'s, F::Out> },
    /// Hang the new subtree `child` from entry `index` of an existing table.
    Publish { table: PhysAddr, index: usize, child: PhysAddr },
}

#[inline]
fn write_huge(entries: &[AtomicU64], first: u64, step: u64) {
    let mut at = first;
    for e in entries {
        e.store(at, Ordering::Release);
        at += step;
    }
}
