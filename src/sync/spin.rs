//! The page-table mutation lock: a spinlock whose release is a plain store.
//!
//! A one-page map or unmap holds its table's lock for a few nanoseconds, and with a
//! `parking_lot` mutex the two locked read-modify-writes of acquire and release were most of
//! the call (about 9 ns each here). Linux guards page-table updates the same way, with spinlocks
//! (`mm->page_table_lock`, the split PTE locks), not sleeping mutexes. Here acquiring is one
//! compare-and-swap, releasing one release store (a plain `mov` on x86). A waiter spins briefly,
//! then yields its CPU between checks: during a long hold (a 1 GiB scattered map, a fraction of a
//! millisecond) other runnable threads get the waiter's CPU, but with none to run the waiter
//! keeps checking, as any spinlock does.

use core::sync::atomic::{AtomicBool, Ordering};

/// The raw lock behind [`super::SpinMutex`].
#[derive(Debug)]
pub(crate) struct RawSpin(AtomicBool);

/// Busy-wait checks before a waiter starts yielding.
const SPINS: u32 = 128;

impl RawSpin {
    #[cold]
    fn lock_slow(&self) {
        let mut spins = 0;
        loop {
            while self.0.load(Ordering::Relaxed) {
                if spins < SPINS {
                    spins += 1;
                    core::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            if self.0.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                return;
            }
        }
    }
}

// SAFETY: `lock` and `try_lock` succeed only for the thread whose compare-and-swap turned the
// flag from false to true (with acquire ordering), and the flag becomes false again only in
// `unlock` (with release ordering), which lock_api calls only for the holder: at most one
// holder at a time, and each holder sees everything the previous one wrote.
unsafe impl lock_api::RawMutex for RawSpin {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: RawSpin = RawSpin(AtomicBool::new(false));
    type GuardMarker = lock_api::GuardSend;

    #[inline]
    fn lock(&self) {
        if self.0.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            self.lock_slow();
        }
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.0.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    #[inline]
    unsafe fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }

    #[inline]
    fn is_locked(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}
