//! Unmap: exactly the range asked, splitting huge leaves partly inside it from their reserve,
//! gathering what a TLB must forget and the table pages that emptied.
#![forbid(unsafe_code)]

use core::sync::atomic::{AtomicU64, Ordering};

use super::source::Frag;
use super::{ENTRIES, Format, Invalidation, PageTable, Pte, UnmapError, index, shift, span, split_cost};
use crate::addr::PhysAddr;
use crate::addr::{Address, PAGE_SIZE, SpanError};
use crate::mem::Reservation;

impl<F: Format> PageTable<F> {
    /// Unmaps exactly `[va, va + len)`: present leaves inside go away, huge leaves partly inside
    /// are split first, holes are skipped. Emptied tables are handed to the returned
    /// [`Invalidation`].
    ///
    /// # Errors
    /// [`UnmapError::ZeroLength`], [`UnmapError::UnalignedVa`], [`UnmapError::UnalignedLength`],
    /// [`UnmapError::OutOfRange`]; the table is unchanged then. Never fails for lack of memory.
    pub fn unmap(&self, va: F::Va, len: u64) -> Result<Invalidation<F::Va>, UnmapError<F::Va>> {
        self.unmap_inner(va, len, false)
    }

    /// [`Self::unmap`]; with `keep`, emptied tables stay in the tree.
    pub(super) fn unmap_inner(
        &self,
        va: F::Va,
        len: u64,
        keep: bool,
    ) -> Result<Invalidation<F::Va>, UnmapError<F::Va>> {
        let v = va.as_u64();
        if len == 0 {
            return Err(UnmapError::ZeroLength);
        }
        if v & (PAGE_SIZE - 1) != 0 {
            return Err(UnmapError::UnalignedVa { va });
        }
        if len & (PAGE_SIZE - 1) != 0 {
            return Err(UnmapError::UnalignedLength { len });
        }
        match Self::span(va, len) {
            Ok(_) => {}
            Err(SpanError::Overflow { .. }) => return Err(UnmapError::Overflow { va, len }),
            Err(_) => return Err(UnmapError::OutOfRange { va, len }),
        }
        let mut reserve = self.lock.lock();
        if self.in_one_leaf_table(v, len)
            && let Some(leaf) = self.leaf_table(v)
            && let Some((lo, span, unmapped)) = self.unmap_in_leaf(leaf, v, len, keep)
        {
            let mut inv = Invalidation::of_leaves(lo, span, unmapped);
            inv.emptied = keep && self.count(leaf).load(Ordering::Relaxed) == 0;
            if F::MAX_FRAGMENT > 0 {
                let t = self.table(leaf);
                let i0 = index(v, 0);
                self.refrag_cut(t, i0, i0 + (len / PAGE_SIZE) as usize, v - i0 as u64 * PAGE_SIZE, &mut inv);
            }
            return Ok(inv);
        }
        Ok(self.unmap_walk(&mut reserve, v, len, keep))
    }

    /// After `[i0, i1)` of the leaf table `t` (whose entry 0 maps `base`) was cleared: the
    /// surviving entries of a fragment block the cut went through no longer belong to a whole
    /// contiguous block, so their fragments are recomputed from what survives (the cut block's
    /// survivors on each side), and the whole old block joins the flush range (a TLB may hold
    /// it as one entry). Blocks never leave a leaf table (fragments are capped at 2 MiB).
    fn refrag_cut(
        &self,
        t: &[AtomicU64; ENTRIES],
        i0: usize,
        i1: usize,
        base: u64,
        inv: &mut Invalidation<F::Va>,
    ) {
        let frag_of = |raw: u64| ((raw & F::FRAGMENT_MASK) >> F::FRAGMENT_SHIFT) as u32;
        if i0 > 0 {
            let f = frag_of(t[i0 - 1].load(Ordering::Relaxed));
            let bs = (i0 - 1) & !((1usize << f) - 1);
            if f > 0 && bs + (1 << f) > i0 {
                self.refrag(t, bs, i0, base);
                inv.cover(base + bs as u64 * PAGE_SIZE, PAGE_SIZE << f);
            }
        }
        if i1 < ENTRIES {
            let f = frag_of(t[i1].load(Ordering::Relaxed));
            let bs = i1 & !((1usize << f) - 1);
            if f > 0 && bs < i1 {
                self.refrag(t, i1, bs + (1 << f), base);
                inv.cover(base + bs as u64 * PAGE_SIZE, PAGE_SIZE << f);
            }
        }
    }

    /// Rewrites the fragments of the present, contiguous 4 KiB leaves `[s, e)` of `t` as the
    /// buddy decomposition of that run.
    fn refrag(&self, t: &[AtomicU64; ENTRIES], s: usize, e: usize, base: u64) {
        let Pte::Leaf { pa, .. } = F::decode(t[s].load(Ordering::Relaxed), 0) else { return };
        let (start, end) = (base + s as u64 * PAGE_SIZE, base + e as u64 * PAGE_SIZE);
        let align = (pa.as_u64().wrapping_sub(start) >> 12).trailing_zeros();
        for (j, entry) in t.iter().enumerate().take(e).skip(s) {
            let y = base + j as u64 * PAGE_SIZE;
            let f = Frag::at(F::MAX_FRAGMENT.min(9), y, start, end, align);
            let raw = entry.load(Ordering::Relaxed);
            entry.store((raw & !F::FRAGMENT_MASK) | (u64::from(f) << F::FRAGMENT_SHIFT), Ordering::Release);
        }
    }

    /// The general unmap: one walk over the range, splitting and freeing as it goes.
    #[inline(never)]
    fn unmap_walk(&self, reserve: &mut Reservation, v: u64, len: u64, keep: bool) -> Invalidation<F::Va> {
        let mut inv = Invalidation::new();
        let mut unreserve = 0;
        let mut created = 0;
        self.unmap_level(
            Self::ROOT_LEVEL,
            self.root,
            false,
            v,
            v + len,
            &mut inv,
            reserve,
            &mut unreserve,
            &mut created,
            keep,
        );
        if unreserve > 0 {
            let _ = self.mem.unreserve(reserve, unreserve);
            self.reserved.fetch_sub(unreserve, Ordering::Relaxed);
        }
        let freed = inv.freed.len() as u64;
        if created != freed {
            self.tables.fetch_add(created.wrapping_sub(freed), Ordering::Relaxed);
        }
        inv
    }

    /// The fast path of [`Self::unmap`] for a range inside the leaf table `leaf` that leaves the
    /// table non-empty: clear the present entries, count them off, done (no split, no table
    /// freed, nothing reserved or unreserved). Returns the span of the removed leaves and the
    /// bytes unmapped (`(0, 0, 0)` for a hole). `None`, with nothing changed, when the table
    /// would empty (unless `keep`): the general path frees it and its emptied ancestors.
    #[inline]
    fn unmap_in_leaf(&self, leaf: PhysAddr, v: u64, len: u64, keep: bool) -> Option<(u64, u64, u64)> {
        let i0 = index(v, 0);
        let entries = &self.table(leaf)[i0..i0 + (len / PAGE_SIZE) as usize];
        let present_at = |e: &AtomicU64| F::is_present(e.load(Ordering::Relaxed));
        let present = entries.iter().filter(|e| present_at(e)).count();
        let count = self.count(leaf).load(Ordering::Relaxed);
        if present >= usize::from(count) && !keep {
            return None;
        }
        if present == 0 {
            return Some((0, 0, 0));
        }
        let (mut first, mut last) = (usize::MAX, 0);
        for (k, e) in entries.iter().enumerate() {
            if present_at(e) {
                first = first.min(k);
                last = k;
                e.store(0, Ordering::Release);
            }
        }
        self.count(leaf).store(count - present as u16, Ordering::Relaxed);
        let lo = v + first as u64 * PAGE_SIZE;
        Some((lo, (last - first + 1) as u64 * PAGE_SIZE, present as u64 * PAGE_SIZE))
    }

    /// `doomed`: the whole table is being freed by the caller, so entries need no clearing.
    /// `keep`: emptied tables stay (never doomed then).
    #[allow(clippy::too_many_arguments)]
    fn unmap_level(
        &self,
        level: u8,
        table_pa: PhysAddr,
        doomed: bool,
        va: u64,
        end: u64,
        inv: &mut Invalidation<F::Va>,
        reserve: &mut Reservation,
        unreserve: &mut u64,
        created: &mut u64,
        keep: bool,
    ) {
        let t = self.table(table_pa);
        let s = span(level);
        let i0 = index(va, level);
        let i1 = i0 + ((end - 1 - (va & !(s - 1))) >> shift(level)) as usize + 1;
        if level == 0 {
            let entries = &t[i0..i1];
            let present_at = |e: &AtomicU64| F::is_present(e.load(Ordering::Relaxed));
            let (mut present, mut first, mut last) = (0u64, usize::MAX, 0usize);
            if doomed {
                // The table goes away whole: count (branch-free), and find the ends for the
                // invalidation range, without clearing anything.
                present = entries.iter().map(|e| u64::from(present_at(e))).sum();
                if present > 0 {
                    first = entries.iter().position(present_at).unwrap_or(0);
                    last = entries.iter().rposition(present_at).unwrap_or(0);
                }
            } else {
                for (k, e) in entries.iter().enumerate() {
                    if present_at(e) {
                        present += 1;
                        first = first.min(k);
                        last = k;
                        e.store(0, Ordering::Release);
                    }
                }
                if present > 0 {
                    self.count_add(table_pa, (present as u16).wrapping_neg());
                }
                if F::MAX_FRAGMENT > 0 {
                    self.refrag_cut(t, i0, i1, va - i0 as u64 * PAGE_SIZE, inv);
                }
            }
            if present > 0 {
                let lo = va + first as u64 * PAGE_SIZE;
                inv.add(lo, (last - first + 1) as u64 * PAGE_SIZE, present * PAGE_SIZE, 0);
            }
            return;
        }
        let mut v = va;
        for e in &t[i0..i1] {
            let e_start = v & !(s - 1);
            let e_end = (e_start + s).min(end);
            let full = v == e_start && e_end - v == s;
            match F::decode(e.load(Ordering::Acquire), level) {
                Pte::Empty => {}
                Pte::Leaf { .. } | Pte::Sparse if full => {
                    if !doomed {
                        e.store(0, Ordering::Release);
                        self.count_add(table_pa, u16::MAX);
                    }
                    inv.add(v, s, s, level);
                    *unreserve += split_cost(level);
                }
                Pte::Leaf { .. } | Pte::Sparse => {
                    // Split: the frame comes out of this leaf's reserve, and its 512 children keep
                    // the rest of it (split_cost(level) = 1 + 512 * split_cost(level - 1)).
                    let (first, step) = match F::decode(e.load(Ordering::Acquire), level) {
                        Pte::Leaf { pa, prot } => {
                            // The 512 children of a 2 MiB leaf are one aligned contiguous block:
                            // they start as one fragment, which the cut below re-decomposes.
                            let frag = if level == 1 {
                                u64::from(F::MAX_FRAGMENT.min(9)) << F::FRAGMENT_SHIFT
                            } else {
                                0
                            };
                            (pa.as_u64() | F::leaf_bits(level - 1, prot) | frag, span(level - 1))
                        }
                        // A sparse entry splits into sparse entries (its format has them).
                        _ => (F::sparse_bits(level - 1).unwrap_or(0), 0),
                    };
                    let child_pa = self
                        .mem
                        .alloc_reserved_frame(reserve)
                        .expect("every huge leaf holds a split reserve");
                    self.reserved.fetch_sub(1, Ordering::Relaxed);
                    *created += 1;
                    let child = self.table(child_pa);
                    let mut at = first;
                    for c in child {
                        c.store(at, Ordering::Relaxed);
                        at += step;
                    }
                    self.count(child_pa).store(ENTRIES as u16, Ordering::Relaxed);
                    e.store(F::table_entry(child_pa), Ordering::Release);
                    self.unmap_level(
                        level - 1,
                        child_pa,
                        false,
                        v,
                        e_end,
                        inv,
                        reserve,
                        unreserve,
                        created,
                        keep,
                    );
                }
                Pte::Table(pa) => {
                    let gone = !keep && (doomed || full);
                    self.unmap_level(level - 1, pa, gone, v, e_end, inv, reserve, unreserve, created, keep);
                    let empty = self.count(pa).load(Ordering::Relaxed) == 0;
                    inv.emptied |= keep && empty;
                    if !keep && (gone || empty) {
                        if !doomed {
                            e.store(0, Ordering::Release);
                            self.count_add(table_pa, u16::MAX);
                        }
                        // A walker that read the entry before it was cleared may still be on its
                        // way through the freed table, for any address it spans: the TLB flush
                        // must cover the whole span (a paging-structure-cache flush), not just
                        // the leaves removed.
                        inv.free_table(pa, e_start, s, &self.parking);
                    }
                }
            }
            v = e_end;
        }
    }
}
