//! The synchronization shim (as crossbeam does it): `parking_lot` locks and `core` atomics
//! normally, `loom`'s under `--cfg loom`, so that loom models can check the lock-free and
//! lock-based exchanges (the IOVA caches, the IOTLB fill against invalidation).
//!
//! Locks are **ranked** (wgpu-core's model): each is created with a [`Rank`], and a thread may
//! only take a lock whose rank is above every lock it already holds. Debug builds check this on
//! every acquisition and panic, naming both locks, at the first out-of-order acquisition, so a
//! lock-order inversion is found by any test that reaches it, not by the deadlock it could
//! cause. Release builds carry no check. The ranks are listed, with who takes what, in the
//! `# Locking` section of the `iommu` module docs.
#![deny(unsafe_code)]

#[cfg(not(loom))]
use std::sync::atomic::AtomicUsize;

// The one `unsafe impl` of the crate's locks: the spinlock's `lock_api::RawMutex` contract.
#[cfg(not(loom))]
#[allow(unsafe_code)]
mod spin;
/// Under loom every ranked mutex is loom's; the spinlock is only a marker.
#[cfg(loom)]
mod spin {
    #[derive(Debug)]
    pub(crate) struct RawSpin;
}

/// Atomics and fences: `core`'s, or loom's under `--cfg loom`.
pub(crate) mod atomic {
    #[cfg(not(loom))]
    pub(crate) use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
    #[cfg(loom)]
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
}

/// The rank of a lock: a thread takes locks in increasing rank only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Rank {
    /// `gpuvm::Vm`: the VM's state (its VA space and objects), held across a whole bind.
    Vm = 0,
    /// `gpuvm::Vm`: the access gate (`RwLock`): GPU accesses hold it shared across a whole
    /// translate-and-copy, a bind's commit exclusive.
    VmAccess = 1,
    /// `Iommu`: the background flusher's handle.
    Flusher = 2,
    /// `Iommu`: the domain registry (`RwLock`).
    Registry = 3,
    /// `Domain`: the lazy flush queue.
    FlushQueue = 4,
    /// `Domain`: the invalidation lock (`RwLock`; walks that fill the IOTLB the locked way hold
    /// it shared, invalidations exclusive).
    Invalidation = 5,
    /// `PageTable`: the mutation lock (one map or unmap walk at a time).
    Table = 6,
    /// `IovaAllocator`: a per-CPU slot (its caches and live records).
    IovaSlot = 7,
    /// `IovaAllocator`: the magazine depot of one order.
    IovaDepot = 8,
    /// `IovaAllocator`: the free-range tree.
    IovaTree = 9,
    /// `PhysMem`: the frame allocator.
    Frames = 10,
    /// Leaf locks that never take another: fault logs, a table's parked pages, a device's DMA
    /// records.
    Leaf = 11,
}

#[cfg(all(debug_assertions, not(loom)))]
mod order {
    use super::Rank;
    use std::cell::RefCell;

    thread_local!(static HELD: RefCell<Vec<Rank>> = const { RefCell::new(Vec::new()) });

    /// Records that the calling thread takes a lock of `rank`, after checking the order.
    pub(super) fn acquire(rank: Rank) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(&top) = h.iter().max() {
                assert!(rank > top, "lock order violated: taking {rank:?} while holding {top:?}");
            }
            h.push(rank);
        });
    }

    pub(super) fn release(rank: Rank) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|&r| r == rank) {
                h.remove(i);
            }
        });
    }
}

#[cfg(not(all(debug_assertions, not(loom))))]
mod order {
    use super::Rank;
    #[inline(always)]
    pub(super) fn acquire(_: Rank) {}
}

/// Holds a rank for as long as a guard lives.
#[derive(Debug)]
struct Held(#[cfg(all(debug_assertions, not(loom)))] Rank);

impl Held {
    #[inline(always)]
    fn new(rank: Rank) -> Self {
        order::acquire(rank);
        #[cfg(all(debug_assertions, not(loom)))]
        return Held(rank);
        #[cfg(not(all(debug_assertions, not(loom))))]
        {
            let _ = rank;
            Held()
        }
    }
}

impl Drop for Held {
    #[inline(always)]
    fn drop(&mut self) {
        #[cfg(all(debug_assertions, not(loom)))]
        order::release(self.0);
    }
}

/// A ranked mutex over the raw lock `R` (`parking_lot`'s, or the [`spin`] lock), whose `lock`
/// returns the guard directly; loom's mutex under loom, whatever `R`.
pub(crate) struct Ranked<R: RawLock, T> {
    #[cfg(not(loom))]
    inner: lock_api::Mutex<R, T>,
    #[cfg(loom)]
    inner: loom::sync::Mutex<T>,
    #[cfg(loom)]
    _raw: core::marker::PhantomData<R>,
    rank: Rank,
}

impl<R: RawLock, T: core::fmt::Debug> core::fmt::Debug for Ranked<R, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Ranked").field("inner", &self.inner).field("rank", &self.rank).finish()
    }
}

/// The raw locks a [`Ranked`] mutex can sit on.
#[cfg(not(loom))]
pub(crate) trait RawLock: lock_api::RawMutex {}
#[cfg(not(loom))]
impl<R: lock_api::RawMutex> RawLock for R {}
/// The raw locks a [`Ranked`] mutex can sit on (markers only under loom).
#[cfg(loom)]
pub(crate) trait RawLock {}
#[cfg(loom)]
impl<R> RawLock for R {}

/// A ranked `parking_lot` mutex: waiters sleep.
pub(crate) type Mutex<T> = Ranked<parking_lot::RawMutex, T>;
/// A ranked spinlock (see the `spin` module) for locks held only for short walks (the
/// page-table mutation lock).
pub(crate) type SpinMutex<T> = Ranked<spin::RawSpin, T>;
/// The guard of a [`Mutex`].
pub(crate) type MutexGuard<'a, T> = RankedGuard<'a, parking_lot::RawMutex, T>;

#[cfg(not(loom))]
type RawGuard<'a, R, T> = lock_api::MutexGuard<'a, R, T>;
#[cfg(loom)]
type RawGuard<'a, R, T> = (loom::sync::MutexGuard<'a, T>, core::marker::PhantomData<R>);

/// The guard of a [`Ranked`] mutex.
pub(crate) struct RankedGuard<'a, R: RawLock, T> {
    guard: RawGuard<'a, R, T>,
    _held: Held,
}

impl<R: RawLock, T> core::ops::Deref for RankedGuard<'_, R, T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        #[cfg(not(loom))]
        return &self.guard;
        #[cfg(loom)]
        return &self.guard.0;
    }
}

impl<R: RawLock, T> core::ops::DerefMut for RankedGuard<'_, R, T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut T {
        #[cfg(not(loom))]
        return &mut self.guard;
        #[cfg(loom)]
        return &mut self.guard.0;
    }
}

impl<R: RawLock, T> Ranked<R, T> {
    pub(crate) fn new(v: T, rank: Rank) -> Self {
        #[cfg(not(loom))]
        return Ranked { inner: lock_api::Mutex::new(v), rank };
        #[cfg(loom)]
        return Ranked { inner: loom::sync::Mutex::new(v), _raw: core::marker::PhantomData, rank };
    }

    #[inline]
    pub(crate) fn lock(&self) -> RankedGuard<'_, R, T> {
        let held = Held::new(self.rank);
        #[cfg(not(loom))]
        let guard = self.inner.lock();
        #[cfg(loom)]
        let guard = (self.inner.lock().unwrap(), core::marker::PhantomData);
        RankedGuard { guard, _held: held }
    }

    /// The value, through exclusive access (no lock taken).
    pub(crate) fn get_mut(&mut self) -> &mut T {
        #[cfg(not(loom))]
        return self.inner.get_mut();
        #[cfg(loom)]
        return self.inner.get_mut().unwrap();
    }
}

/// A ranked reader-writer lock over either backend.
#[derive(Debug)]
pub(crate) struct RwLock<T> {
    #[cfg(not(loom))]
    inner: parking_lot::RwLock<T>,
    #[cfg(loom)]
    inner: loom::sync::RwLock<T>,
    rank: Rank,
}

#[cfg(not(loom))]
type RawReadGuard<'a, T> = parking_lot::RwLockReadGuard<'a, T>;
#[cfg(loom)]
type RawReadGuard<'a, T> = loom::sync::RwLockReadGuard<'a, T>;
#[cfg(not(loom))]
type RawWriteGuard<'a, T> = parking_lot::RwLockWriteGuard<'a, T>;
#[cfg(loom)]
type RawWriteGuard<'a, T> = loom::sync::RwLockWriteGuard<'a, T>;

/// A shared guard of a [`RwLock`].
pub(crate) struct ReadGuard<'a, T> {
    guard: RawReadGuard<'a, T>,
    _held: Held,
}

/// An exclusive guard of a [`RwLock`].
pub(crate) struct WriteGuard<'a, T> {
    guard: RawWriteGuard<'a, T>,
    _held: Held,
}

impl<T> core::ops::Deref for ReadGuard<'_, T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> core::ops::Deref for WriteGuard<'_, T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> core::ops::DerefMut for WriteGuard<'_, T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

impl<T> RwLock<T> {
    pub(crate) fn new(v: T, rank: Rank) -> Self {
        #[cfg(not(loom))]
        return RwLock { inner: parking_lot::RwLock::new(v), rank };
        #[cfg(loom)]
        return RwLock { inner: loom::sync::RwLock::new(v), rank };
    }

    #[inline]
    pub(crate) fn read(&self) -> ReadGuard<'_, T> {
        let held = Held::new(self.rank);
        #[cfg(not(loom))]
        let guard = self.inner.read();
        #[cfg(loom)]
        let guard = self.inner.read().unwrap();
        ReadGuard { guard, _held: held }
    }

    #[inline]
    pub(crate) fn write(&self) -> WriteGuard<'_, T> {
        let held = Held::new(self.rank);
        #[cfg(not(loom))]
        let guard = self.inner.write();
        #[cfg(loom)]
        let guard = self.inner.write().unwrap();
        WriteGuard { guard, _held: held }
    }
}

/// Keeps a value on its own cache lines, so per-CPU data does not false-share.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> core::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A small, stable index for the calling thread (its "CPU" for per-CPU caches): threads get
/// 0, 1, 2, ... in the order they first ask.
pub(crate) fn thread_index() -> usize {
    #[cfg(not(loom))]
    {
        use core::sync::atomic::Ordering;
        use std::cell::Cell;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local!(static INDEX: Cell<usize> = const { Cell::new(usize::MAX) });
        INDEX.with(|i| {
            if i.get() == usize::MAX {
                i.set(NEXT.fetch_add(1, Ordering::Relaxed));
            }
            i.get()
        })
    }
    #[cfg(loom)]
    {
        // Loom threads are numbered; their ids keep models deterministic.
        let id = format!("{:?}", loom::thread::current().id());
        id.bytes().filter(u8::is_ascii_digit).fold(0usize, |a, b| a * 10 + usize::from(b - b'0'))
    }
}

#[cfg(all(test, debug_assertions, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn locks_taken_in_rank_order_pass_and_an_inversion_is_caught() {
        let a = Mutex::new(0, Rank::Registry);
        let b = RwLock::new(0, Rank::Table);
        {
            let _a = a.lock();
            let _b = b.read();
        }
        {
            let _b = b.write();
        }
        let r = std::thread::spawn(move || {
            let _b = b.write();
            let _a = a.lock();
        })
        .join();
        let msg = r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("lock order violated: taking Registry while holding Table"), "{msg}");
    }
}
