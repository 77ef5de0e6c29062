//! Byte and word access to the arena: the one place where its memory is touched.
//!
//! # Memory model
//!
//! The arena is shared memory. CPU threads, simulated devices (through the IOMMU), page-table
//! walkers and, later, a real Vulkan device read and write the same bytes at the same time, so
//! every access here is an **atomic access of an aligned 64-bit word** (relaxed ordering unless
//! stated; on x86-64 these compile to plain moves):
//!
//! - [`PhysMem::read`], [`PhysMem::write`] and [`PhysMem::zero`] move whole aligned words with
//!   relaxed atomic loads and stores. A head or tail that covers only part of a word is read
//!   from a whole-word load, and written by a compare-and-swap loop on the whole word that
//!   replaces just those bytes. No access ever uses another size, so there are no mixed-size
//!   atomic accesses (which the Rust memory model does not define), and the bytes of a word
//!   that a write does not cover are never disturbed, not even for a moment.
//! - [`PhysMem::table`] and [`Words`] view the same memory as `AtomicU64`s: a table entry
//!   written by a walker and bytes copied by a device meet as atomics of the same size.
//!
//! **The contract.** Concurrent accesses to the same bytes are never undefined behaviour. A
//! reader racing a writer sees, for each aligned 8-byte word, either the whole old or the whole
//! new contents of the bytes the writer covers in that word; two racing writers leave, word by
//! word, one of them. Nothing orders the words of one copy with respect to each other: a reader
//! may see the first half of a racing copy new and the second half old, as a device would. Code
//! that needs more (a table page that must be complete before it is published) orders its
//! accesses with release stores and acquire loads, as the page-table engine does.
//!
//! Every `unsafe` block of this module turns an in-bounds, aligned arena offset into a shared
//! reference to an `AtomicU64`; the arena is mapped for the whole life of the `PhysMem` and
//! every borrow handed out is tied to it.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use super::{MemError, PhysMem};
use crate::addr::{PAGE_SIZE, PhysAddr};

/// A copyable view of an arena for 64-bit loads in hot loops: it carries the base address and
/// the bound itself, so a loop that holds one keeps them in registers instead of reloading them
/// from the arena for every access. Borrowed from [`PhysMem::words`].
#[derive(Clone, Copy)]
pub struct Words<'a> {
    base: NonNull<u8>,
    /// `size - 8`: the highest offset an 8-byte access may start at (the arena is at least
    /// 8 KiB, so this cannot wrap).
    last: u64,
    _mem: core::marker::PhantomData<&'a PhysMem>,
}

impl core::fmt::Debug for Words<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Words").field("size", &(self.last + 8)).finish()
    }
}

// SAFETY: a view is a shared borrow of a `PhysMem`, which is `Sync`; it only performs atomic
// loads of the arena, which any thread may do.
unsafe impl Send for Words<'_> {}
// SAFETY: as for `Send`: shared use is atomic loads only.
unsafe impl Sync for Words<'_> {}

impl Words<'_> {
    /// The 64-bit little-endian value at `pa` when it is 8-byte aligned and inside the arena;
    /// `None` otherwise (use [`PhysMem::read_u64`], which also handles unaligned reads).
    #[inline(always)]
    #[must_use]
    pub fn load(&self, pa: PhysAddr) -> Option<u64> {
        let off = pa.as_u64();
        if off > self.last || off & 7 != 0 {
            return None;
        }
        // SAFETY: `off` is 8-byte aligned and `off + 8 <= size`, so the word lies inside the
        // mapping, which the borrow keeps alive; `AtomicU64` has the size and alignment of
        // `u64`, and every access to arena memory is an atomic of this size (module docs).
        let a = unsafe { &*self.base.as_ptr().add(off as usize).cast::<AtomicU64>() };
        Some(u64::from_le(a.load(Ordering::Acquire)))
    }
}

/// Bytes `[lo, hi)` of a word (0 ≤ lo < hi ≤ 8) as a mask in native byte order.
#[inline]
fn byte_mask(lo: usize, hi: usize) -> u64 {
    let mut m = [0u8; 8];
    m[lo..hi].fill(0xff);
    u64::from_ne_bytes(m)
}

impl PhysMem {
    pub(super) fn check(&self, pa: PhysAddr, len: u64) -> Result<usize, MemError> {
        match pa.as_u64().checked_add(len) {
            Some(end) if end <= self.size => Ok(pa.as_u64() as usize),
            _ => Err(MemError::OutOfBounds { pa, len, size: self.size }),
        }
    }

    /// The arena word at byte offset `off`.
    #[inline(always)]
    fn word(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off as u64 + 8 <= self.size);
        // SAFETY: callers pass 8-byte-aligned offsets of words inside the arena (`check` ran on
        // the enclosing access, and the arena size is a 4 KiB multiple, so the aligned word
        // holding any in-bounds byte is in bounds); the mapping lives as long as `self`, and
        // all arena accesses are `AtomicU64`s (module docs).
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// A view for aligned 64-bit loads in hot loops (see [`Words`]).
    #[must_use]
    pub fn words(&self) -> Words<'_> {
        Words { base: self.base, last: self.size - 8, _mem: core::marker::PhantomData }
    }

    /// Host pointer to `len` bytes at `pa`, for importing the arena into a GPU API or handing a
    /// table to an independent walker. Whoever dereferences it must keep to the arena's memory
    /// model (module docs): aligned 64-bit atomic accesses.
    ///
    /// # Errors
    /// [`MemError::OutOfBounds`] when the range leaves the arena.
    pub fn host_ptr(&self, pa: PhysAddr, len: u64) -> Result<NonNull<u8>, MemError> {
        let off = self.check(pa, len)?;
        // SAFETY: `off <= size`, so the result stays inside (or one past the end of) the
        // mapping; no access is made here.
        Ok(unsafe { self.base.add(off) })
    }

    /// Copies bytes at `pa` into `buf`, word by word with relaxed atomic loads (see the module
    /// docs for what a racing writer can make it see).
    ///
    /// # Errors
    /// [`MemError::OutOfBounds`] when `[pa, pa + buf.len())` leaves the arena.
    pub fn read(&self, pa: PhysAddr, buf: &mut [u8]) -> Result<(), MemError> {
        let off = self.check(pa, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut at = off;
        let mut done = 0;
        let head = off % 8;
        if head != 0 {
            let n = (8 - head).min(buf.len());
            let w = self.word(off - head).load(Ordering::Relaxed).to_ne_bytes();
            buf[..n].copy_from_slice(&w[head..head + n]);
            at += n;
            done = n;
        }
        let body = (buf.len() - done) / 8;
        for (i, out) in buf[done..done + body * 8].chunks_exact_mut(8).enumerate() {
            out.copy_from_slice(&self.word(at + i * 8).load(Ordering::Relaxed).to_ne_bytes());
        }
        at += body * 8;
        done += body * 8;
        if done < buf.len() {
            let w = self.word(at).load(Ordering::Relaxed).to_ne_bytes();
            let n = buf.len() - done;
            buf[done..].copy_from_slice(&w[..n]);
        }
        Ok(())
    }

    /// Stores `val`'s bytes `[lo, hi)` into the word at `off`, leaving its other bytes as they
    /// are, in one atomic step.
    #[inline]
    fn store_part(&self, off: usize, lo: usize, hi: usize, val: u64) {
        let mask = byte_mask(lo, hi);
        let w = self.word(off);
        let mut cur = w.load(Ordering::Relaxed);
        loop {
            let new = (cur & !mask) | (val & mask);
            match w.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// Copies `data` to `pa`, word by word with relaxed atomic stores; a partial head or tail
    /// word is updated by compare-and-swap, so the bytes around the range are never disturbed.
    ///
    /// # Errors
    /// [`MemError::OutOfBounds`] when `[pa, pa + data.len())` leaves the arena.
    pub fn write(&self, pa: PhysAddr, data: &[u8]) -> Result<(), MemError> {
        let off = self.check(pa, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let mut at = off;
        let mut done = 0;
        let head = off % 8;
        if head != 0 {
            let n = (8 - head).min(data.len());
            let mut w = [0u8; 8];
            w[head..head + n].copy_from_slice(&data[..n]);
            self.store_part(off - head, head, head + n, u64::from_ne_bytes(w));
            at += n;
            done = n;
        }
        let body = (data.len() - done) / 8;
        for (i, chunk) in data[done..done + body * 8].chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            self.word(at + i * 8).store(u64::from_ne_bytes(w), Ordering::Relaxed);
        }
        at += body * 8;
        done += body * 8;
        if done < data.len() {
            let n = data.len() - done;
            let mut w = [0u8; 8];
            w[..n].copy_from_slice(&data[done..]);
            self.store_part(at, 0, n, u64::from_ne_bytes(w));
        }
        Ok(())
    }

    /// Loads the 64-bit little-endian value at `pa` (one atomic load when 8-byte aligned, as a
    /// bus read of a naturally aligned word is).
    ///
    /// # Errors
    /// [`MemError::OutOfBounds`] when the 8 bytes leave the arena.
    #[inline]
    pub fn read_u64(&self, pa: PhysAddr) -> Result<u64, MemError> {
        if let Some(v) = self.words().load(pa) {
            return Ok(v);
        }
        let mut b = [0u8; 8];
        self.read(pa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Stores a 64-bit little-endian value at `pa` (one atomic release store when 8-byte
    /// aligned).
    ///
    /// # Errors
    /// [`MemError::OutOfBounds`] when the 8 bytes leave the arena.
    #[inline]
    pub fn write_u64(&self, pa: PhysAddr, v: u64) -> Result<(), MemError> {
        let off = self.check(pa, 8)?;
        if off & 7 == 0 {
            self.word(off).store(v.to_le(), Ordering::Release);
            return Ok(());
        }
        self.write(pa, &v.to_le_bytes())
    }

    /// Fills `[pa, pa + len)` with zeros (whole words stored atomically, partial ones by
    /// compare-and-swap, as [`PhysMem::write`]).
    ///
    /// # Errors
    /// [`MemError::OutOfBounds`] when the range leaves the arena.
    pub fn zero(&self, pa: PhysAddr, len: u64) -> Result<(), MemError> {
        let off = self.check(pa, len)?;
        let end = off + len as usize;
        let mut at = off;
        if at % 8 != 0 && at < end {
            let base = at - at % 8;
            let hi = (end - base).min(8);
            self.store_part(base, at - base, hi, 0);
            at = base + 8;
        }
        while at + 8 <= end {
            self.word(at).store(0, Ordering::Relaxed);
            at += 8;
        }
        if at < end {
            self.store_part(at, 0, end - at, 0);
        }
        Ok(())
    }

    /// The 4 KiB frame at `pa` seen as 512 atomic 64-bit entries: how page tables living in the
    /// arena are read and written. `None` when `pa` is unaligned or the frame leaves the arena.
    #[inline]
    #[must_use]
    pub fn table(&self, pa: PhysAddr) -> Option<&[AtomicU64; 512]> {
        let off = pa.as_u64();
        if off & (PAGE_SIZE - 1) != 0 || off >= self.size {
            return None;
        }
        // SAFETY: the frame lies wholly inside the mapping (size is a 4 KiB multiple and off is a
        // 4 KiB-aligned offset below it), is 8-byte aligned and lives as long as `self`;
        // `[AtomicU64; 512]` has the layout of `[u64; 512]`, and every arena access is an
        // `AtomicU64` (module docs), so shared access is sound.
        Some(unsafe { &*self.base.as_ptr().add(off as usize).cast::<[AtomicU64; 512]>() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_copies_round_trip_and_leave_neighbours_alone() {
        let mem = PhysMem::new(64 << 10).unwrap();
        let f = mem.alloc_frame().unwrap();
        mem.write(f, &[0xaa; 64]).unwrap();
        for start in 0..16u64 {
            for len in 0..24usize {
                let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ start as u8).collect();
                mem.write(f, &[0xaa; 64]).unwrap();
                mem.write(PhysAddr::new(f.as_u64() + start), &data).unwrap();
                let mut all = [0u8; 64];
                mem.read(f, &mut all).unwrap();
                let s = start as usize;
                assert!(all[..s].iter().all(|&b| b == 0xaa), "head untouched");
                assert_eq!(&all[s..s + len], &data[..]);
                assert!(all[s + len..].iter().all(|&b| b == 0xaa), "tail untouched");
                let mut back = vec![0u8; len];
                mem.read(PhysAddr::new(f.as_u64() + start), &mut back).unwrap();
                assert_eq!(back, data);
                mem.zero(PhysAddr::new(f.as_u64() + start), len as u64).unwrap();
                mem.read(f, &mut all).unwrap();
                assert!(all[s..s + len].iter().all(|&b| b == 0));
                assert!(all[..s].iter().chain(&all[s + len..]).all(|&b| b == 0xaa));
            }
        }
    }

    #[test]
    fn racing_writers_leave_whole_words_of_one_of_them() {
        let mem = std::sync::Arc::new(PhysMem::new(64 << 10).unwrap());
        let f = mem.alloc_frame().unwrap();
        let threads: Vec<_> = [0x11u8, 0x22]
            .into_iter()
            .map(|b| {
                let mem = mem.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        mem.write(f, &[b; 256]).unwrap();
                    }
                })
            })
            .collect();
        let reader = {
            let mem = mem.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                for _ in 0..2000 {
                    mem.read(f, &mut buf).unwrap();
                    for w in buf.chunks(8) {
                        assert!(w.iter().all(|&x| x == w[0]), "a torn word: {w:?}");
                    }
                }
            })
        };
        for t in threads {
            t.join().unwrap();
        }
        reader.join().unwrap();
    }
}
