//! Unmap: exactly the range asked, splitting huge leaves partly inside it from their reserve,
//! gathering what a TLB must forget and the table pages that emptied.
#![forbid(unsafe_code)]

use core::sync::atomic::{AtomicU64, Ordering};

use super::{ENTRIES, Format, Invalidation, PageTable, Pte, UnmapError, index, shift, span, split_cost};
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
        let mut inv = Invalidation::new(self.parking.clone());
        let mut unreserve = 0;
        let mut created = 0;
        let root = self.table(self.root);
        self.unmap_level(
            Self::ROOT_LEVEL,
            root,
            false,
            v,
            v + len,
            &mut inv,
            &mut reserve,
            &mut unreserve,
            &mut created,
        );
        let _ = self.mem.unreserve(&mut reserve, unreserve);
        self.reserved.fetch_sub(unreserve, Ordering::Relaxed);
        self.tables.fetch_add(created, Ordering::Relaxed);
        self.tables.fetch_sub(inv.freed.len() as u64, Ordering::Relaxed);
        Ok(inv)
    }

    /// `doomed`: the whole table is being freed by the caller, so entries need no clearing.
    #[allow(clippy::too_many_arguments)]
    fn unmap_level(
        &self,
        level: u8,
        t: &[AtomicU64; ENTRIES],
        doomed: bool,
        va: u64,
        end: u64,
        inv: &mut Invalidation<F::Va>,
        reserve: &mut Reservation,
        unreserve: &mut u64,
        created: &mut u64,
    ) {
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
                Pte::Leaf { .. } if full => {
                    if !doomed {
                        e.store(0, Ordering::Release);
                    }
                    inv.add(v, s, s, level);
                    *unreserve += split_cost(level);
                }
                Pte::Leaf { pa, prot } => {
                    // Split: the frame comes out of this leaf's reserve, and its 512 children keep
                    // the rest of it (split_cost(level) = 1 + 512 * split_cost(level - 1)).
                    let child_pa = self
                        .mem
                        .alloc_reserved_frame(reserve)
                        .expect("every huge leaf holds a split reserve");
                    self.reserved.fetch_sub(1, Ordering::Relaxed);
                    *created += 1;
                    let child = self.table(child_pa);
                    let cs = span(level - 1);
                    let bits = F::leaf_bits(level - 1, prot);
                    let mut at = pa.as_u64();
                    for c in child {
                        c.store(at | bits, Ordering::Relaxed);
                        at += cs;
                    }
                    e.store(F::table_entry(child_pa), Ordering::Release);
                    self.unmap_level(level - 1, child, false, v, e_end, inv, reserve, unreserve, created);
                }
                Pte::Table(pa) => {
                    let child = self.table(pa);
                    let gone = doomed || full;
                    self.unmap_level(level - 1, child, gone, v, e_end, inv, reserve, unreserve, created);
                    if gone || child.iter().all(|c| !F::is_present(c.load(Ordering::Relaxed))) {
                        if !doomed {
                            e.store(0, Ordering::Release);
                        }
                        inv.freed.push(pa);
                        // A walker that read the entry before it was cleared may still be on its
                        // way through the freed table, for any address it spans: the TLB flush
                        // must cover the whole span (a paging-structure-cache flush), not just
                        // the leaves removed.
                        inv.cover(e_start, s);
                    }
                }
            }
            v = e_end;
        }
    }
}
