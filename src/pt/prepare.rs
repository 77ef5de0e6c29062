//! Prepare, then commit: size and take, up front, every table page and split reserve that a
//! whole list of maps may need ([`PageTable::prepare`]), then write them with
//! [`PageTable::map_prepared`], which draws only on what was prepared and never on the arena.
//! This is what a VM_BIND driver does (REFERENCES.md §6): a failure can only happen in prepare,
//! where nothing has changed yet.
//!
//! # Why the count is enough
//!
//! Prepare plans every range against the table as it is now, as if every present entry in the
//! range were already gone (the ops of a bind unmap before they map): an entry that is a table
//! now is descended, anything else is planned as empty — a huge leaf where the range and source
//! allow one (its split reserve), otherwise a new table and its subtree. The commit runs after
//! earlier ops of the same bind have changed the table, but those changes can only make it need
//! less for each range:
//! - tables are not freed during a bind (the unmaps of a bind use
//!   [`PageTable::unmap_keeping_tables`]; [`PageTable::reclaim`] frees the empty ones after the
//!   last op), so a table that exists at prepare exists at commit;
//! - where prepare planned a huge leaf and the commit finds a table (an earlier op built one),
//!   filling below it takes at most `512 × split_cost(level - 1) < split_cost(level)` frames;
//! - where prepare planned a new table and the commit finds one, it needs one frame fewer.
//!
//! Table pages and split reserve come out of one token, so whichever way the commit goes, the
//! sum of the per-range plans covers it. A new table is counted once per slot across the maps of
//! one prepare: tables are not freed during a bind, so whichever map needs the slot first builds
//! it and the others find it (a repeat mapping's thousands of period pieces share their tables). What a bind does not use goes back with
//! [`PageTable::finish`].
#![forbid(unsafe_code)]

use core::sync::atomic::Ordering;

use super::map::Plan;
use super::source::{Cursor, Frag};
use super::{Format, Invalidation, MapError, MapOptions, MapSource, MapStats, PageTable, Prot, Pte};
use super::{index, span};
use crate::addr::{Address, PAGE_SIZE, PhysAddr};
use crate::mem::Reservation;

/// Frames set aside by [`PageTable::prepare`] for the maps of one bind: drawn on by
/// [`PageTable::map_prepared`], the rest given back by [`PageTable::finish`]. A token dropped
/// without `finish` keeps its frames reserved until the arena goes (see
/// [`crate::mem::Reservation`]).
#[derive(Debug)]
#[must_use = "prepared frames stay reserved until PageTable::finish gives them back"]
pub struct Prepared {
    res: Reservation,
    /// The table it was prepared for (the address of its parking lot: unique while it lives).
    table: usize,
}

impl Prepared {
    /// Frames still held (table pages and split reserve not yet drawn on).
    #[must_use]
    pub fn frames(&self) -> u64 {
        self.res.frames()
    }
}

/// One map of a bind, as [`PageTable::prepare`] sizes it.
#[derive(Debug, Clone, Copy)]
pub struct PlannedMap<'a, V, A: Address> {
    /// Where it goes.
    pub va: V,
    /// What it maps.
    pub src: MapSource<'a, A>,
    /// Its options (the largest leaf it may use).
    pub opts: MapOptions,
}

impl<F: Format> PageTable<F> {
    /// Validates every map of `maps` (alignment, range, source) and reserves, in one token, the
    /// table pages and split reserve that committing them in order may take, whatever the
    /// unmaps of the same bind remove first (module docs). Present entries in the ranges are not
    /// an error here: the bind's unmaps remove them before the maps commit.
    ///
    /// # Errors
    /// The input errors of [`PageTable::map`] for the first bad map;
    /// [`MapError::OutOfMemory`] when the arena cannot promise the frames. Nothing changes then.
    pub fn prepare(
        &self,
        maps: &[PlannedMap<'_, F::Va, F::Out>],
    ) -> Result<Prepared, MapError<F::Va, F::Out>> {
        let counted = (maps.len() > 1).then(std::collections::HashSet::new);
        let mut total = Plan { ahead: true, counted, ..Plan::default() };
        for m in maps {
            Self::check_request(m.va, &m.src)?;
        }
        {
            let _guard = self.lock.lock();
            let root = self.table(self.root);
            for m in maps {
                let v = m.va.as_u64();
                let len = m.src.len();
                let mut cur = Cursor::new(m.src, Self::PA_LIMIT, Frag::default());
                // Ahead of the unmaps nothing is an overlap: the walk cannot fail.
                let _ = self.plan(
                    Self::ROOT_LEVEL,
                    Some(root),
                    v,
                    v + len,
                    &mut cur,
                    m.opts.max_leaf.level(),
                    &mut total,
                );
            }
        }
        let res = self.mem.reserve(total.tables + total.reserve).map_err(MapError::OutOfMemory)?;
        Ok(Prepared { res, table: self.id() })
    }

    /// Maps `src` at `va` exactly as [`PageTable::map`] does, taking table pages and split
    /// reserve only from `prep`: it never allocates from the arena.
    ///
    /// # Errors
    /// As [`PageTable::map`] for bad input and overlaps; [`MapError::NotPrepared`] when `prep`
    /// belongs to another table or holds fewer frames than this map needs (the range was not
    /// prepared). The table is unchanged then.
    pub fn map_prepared(
        &self,
        prep: &mut Prepared,
        va: F::Va,
        src: MapSource<'_, F::Out>,
        prot: Prot,
        opts: MapOptions,
    ) -> Result<MapStats, MapError<F::Va, F::Out>> {
        if prep.table != self.id() {
            return Err(MapError::NotPrepared);
        }
        self.map_inner(va, src, prot, opts, Some(&mut prep.res))
    }

    /// Who this table is, for tokens prepared for it.
    fn id(&self) -> usize {
        std::sync::Arc::as_ptr(&self.parking) as usize
    }

    /// Gives the frames `prep` still holds back to the arena; returns how many.
    pub fn finish(&self, mut prep: Prepared) -> u64 {
        self.mem.unreserve(&mut prep.res, u64::MAX).unwrap_or(0)
    }

    /// Unmaps exactly `[va, va + len)` as [`PageTable::unmap`] does, but leaves the table pages
    /// that empty in place (a bind that maps into the range next reuses them; prepared frames
    /// rely on it). [`PageTable::reclaim`] frees the empty ones afterwards.
    ///
    /// # Errors
    /// As [`PageTable::unmap`]. Never fails for lack of memory.
    pub fn unmap_keeping_tables(
        &self,
        va: F::Va,
        len: u64,
    ) -> Result<Invalidation<F::Va>, super::UnmapError<F::Va>> {
        self.unmap_inner(va, len, true)
    }

    /// Frees every table page under `[va, va + len)` (rounded out to whole tables of the walk)
    /// that holds no present entry, bottom up, as an unmap would have: the pages go to the
    /// returned [`Invalidation`], to be completed after the TLB flush. The root stays. A range
    /// outside the table, or misaligned, frees nothing.
    pub fn reclaim(&self, va: F::Va, len: u64) -> Invalidation<F::Va> {
        let mut inv = Invalidation::new();
        let v = va.as_u64() & !(PAGE_SIZE - 1);
        if len == 0 || Self::span(F::Va::new(v), len).is_err() {
            return inv;
        }
        let _guard = self.lock.lock();
        self.reclaim_level(Self::ROOT_LEVEL, self.root, v, v + len, &mut inv);
        let freed = inv.freed.len() as u64;
        if freed > 0 {
            self.tables.fetch_sub(freed, Ordering::Relaxed);
        }
        inv
    }

    fn reclaim_level(&self, level: u8, table_pa: PhysAddr, va: u64, end: u64, inv: &mut Invalidation<F::Va>) {
        if level == 0 {
            return;
        }
        let t = self.table(table_pa);
        let s = span(level);
        let mut v = va;
        while v < end {
            let i = index(v, level);
            let e_start = v & !(s - 1);
            let e_end = (e_start + s).min(end);
            if let Pte::Table(pa) = F::decode(t[i].load(Ordering::Acquire), level) {
                self.reclaim_level(level - 1, pa, v, e_end, inv);
                if self.count(pa).load(Ordering::Relaxed) == 0 {
                    t[i].store(0, Ordering::Release);
                    self.count_add(table_pa, u16::MAX);
                    inv.free_table(pa, e_start, s, &self.parking);
                }
            }
            v = e_end;
        }
    }
}
