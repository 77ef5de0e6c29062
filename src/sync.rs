//! A synchronization shim (as crossbeam does it): `parking_lot` normally, `loom` under
//! `--cfg loom`, so that loom models can check the lock-based exchanges of the IOVA caches.

#[cfg(not(loom))]
use std::sync::atomic::{AtomicUsize, Ordering};

/// A mutex whose `lock` returns the guard directly, over either backend.
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(#[cfg(not(loom))] parking_lot::Mutex<T>, #[cfg(loom)] loom::sync::Mutex<T>);

#[cfg(not(loom))]
pub(crate) type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;
#[cfg(loom)]
pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    pub(crate) fn new(v: T) -> Self {
        #[cfg(not(loom))]
        return Mutex(parking_lot::Mutex::new(v));
        #[cfg(loom)]
        return Mutex(loom::sync::Mutex::new(v));
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        #[cfg(not(loom))]
        return self.0.lock();
        #[cfg(loom)]
        return self.0.lock().unwrap();
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
