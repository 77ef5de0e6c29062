//! [`Fence`]: a one-shot completion a bind queue signals when its work is visible, or fails with
//! the error that stopped it. The host can make its own ([`Fence::new`]) and signal it, as a
//! Vulkan application signals a semaphore from the host.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::ServiceError;

const PENDING: u8 = 0;
const SIGNALED: u8 = 1;
const FAILED: u8 = 2;

/// Fence ids are unique in the process, so reports and errors can name a fence.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A callback run once when a fence completes (signaled or failed), outside its lock.
pub(crate) type Callback = Box<dyn FnOnce() + Send>;

/// Where a fence stands ([`Fence::poll`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceStatus {
    /// Not yet.
    Pending,
    /// The work it stands for is done and visible to every device access.
    Signaled,
    /// The work it stands for did not happen (or not all of it): the error says why.
    Failed(ServiceError),
}

/// Why [`Fence::wait`] returned without the fence signaled, or a host fence refused a signal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// The timeout passed first; the fence is still pending.
    #[error("fence {fence} still pending after {waited:?}")]
    Timeout {
        /// The fence.
        fence: u64,
        /// How long the call waited.
        waited: Duration,
    },
    /// The fence failed.
    #[error("fence {fence} failed: {err}")]
    Failed {
        /// The fence.
        fence: u64,
        /// Why.
        err: ServiceError,
    },
    /// [`Fence::signal`] on a fence the host does not own: a queue's fence, or a host fence
    /// handed to a submission as one of its signals.
    #[error("fence {fence} is signaled by a bind queue, not by the host")]
    NotHost {
        /// The fence.
        fence: u64,
    },
    /// [`Fence::signal`] on a fence that has already completed.
    #[error("fence {fence} has already completed")]
    Completed {
        /// The fence.
        fence: u64,
    },
}

#[derive(Default)]
struct Slow {
    error: Option<ServiceError>,
    callbacks: Vec<Callback>,
    /// A host fence: signaled by the host, unless a submission owns it (`attached`).
    host: bool,
    attached: bool,
}

struct Inner {
    id: u64,
    state: AtomicU8,
    slow: Mutex<Slow>,
    cv: Condvar,
}

/// A one-shot completion: pending, then signaled or failed, for good. Cheap to clone (all
/// clones are the same fence); usable as an in-fence of any queue of any VM of the service.
///
/// A queue's fence ([`super::Service::submit`]) signals only when its ops are committed and no
/// device access can see the translations they replaced: a [`crate::gpuvm::Vm::gpu_read`]
/// issued after [`Fence::wait`] returns `Ok` sees the new mappings.
#[derive(Clone)]
pub struct Fence {
    inner: Arc<Inner>,
}

impl core::fmt::Debug for Fence {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Fence").field("id", &self.inner.id).field("status", &self.poll()).finish()
    }
}

impl PartialEq for Fence {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for Fence {}

impl Default for Fence {
    fn default() -> Self {
        Self::new()
    }
}

impl Fence {
    fn make(host: bool) -> Self {
        Fence {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                state: AtomicU8::new(PENDING),
                slow: Mutex::new(Slow { host, ..Slow::default() }),
                cv: Condvar::new(),
            }),
        }
    }

    /// A pending host fence: signaled by [`Fence::signal`], or by a submission it is handed to
    /// as a signal.
    #[must_use]
    pub fn new() -> Self {
        Self::make(true)
    }

    /// A queue's own fence.
    pub(crate) fn queue() -> Self {
        Self::make(false)
    }

    /// A fence signaled already (for work that completed on the spot).
    pub(crate) fn signaled() -> Self {
        let f = Self::make(false);
        f.complete(Ok(()));
        f
    }

    /// The fence's id (unique in the process).
    #[must_use]
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Where it stands, without waiting.
    #[must_use]
    pub fn poll(&self) -> FenceStatus {
        match self.inner.state.load(Ordering::Acquire) {
            PENDING => FenceStatus::Pending,
            SIGNALED => FenceStatus::Signaled,
            _ => FenceStatus::Failed(self.inner.slow.lock().error.clone().unwrap_or(ServiceError::Cancelled)),
        }
    }

    /// Whether it is signaled (not failed, not pending).
    #[must_use]
    pub fn is_signaled(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) == SIGNALED
    }

    /// Whether it has completed, either way.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) != PENDING
    }

    /// Waits up to `timeout` for it to complete.
    ///
    /// # Errors
    /// [`FenceError::Timeout`] (still pending), [`FenceError::Failed`] with the error that
    /// stopped its work.
    pub fn wait(&self, timeout: Duration) -> Result<(), FenceError> {
        let t0 = Instant::now();
        self.wait_until(t0.checked_add(timeout))
            .map_err(|_| FenceError::Timeout { fence: self.inner.id, waited: t0.elapsed() })?
    }

    /// Waits for it to complete, however long that takes.
    ///
    /// # Errors
    /// [`FenceError::Failed`].
    pub fn wait_forever(&self) -> Result<(), FenceError> {
        match self.wait_until(None) {
            Ok(r) => r,
            Err(()) => unreachable_timeout(self.inner.id),
        }
    }

    /// Outer `Err`: the deadline passed; inner: the outcome.
    fn wait_until(&self, deadline: Option<Instant>) -> Result<Result<(), FenceError>, ()> {
        let outcome = |s: u8, slow: &Slow| {
            if s == SIGNALED {
                Ok(())
            } else {
                Err(FenceError::Failed {
                    fence: self.inner.id,
                    err: slow.error.clone().unwrap_or(ServiceError::Cancelled),
                })
            }
        };
        let s = self.inner.state.load(Ordering::Acquire);
        if s == SIGNALED {
            return Ok(Ok(()));
        }
        let mut slow = self.inner.slow.lock();
        loop {
            let s = self.inner.state.load(Ordering::Acquire);
            if s != PENDING {
                return Ok(outcome(s, &slow));
            }
            match deadline {
                None => self.inner.cv.wait(&mut slow),
                Some(d) => {
                    if self.inner.cv.wait_until(&mut slow, d).timed_out() {
                        let s = self.inner.state.load(Ordering::Acquire);
                        if s != PENDING {
                            return Ok(outcome(s, &slow));
                        }
                        return Err(());
                    }
                }
            }
        }
    }

    /// Signals a host fence ([`Fence::new`]) that no submission owns.
    ///
    /// # Errors
    /// [`FenceError::NotHost`] for a queue's fence or one handed to a submission;
    /// [`FenceError::Completed`] when it has completed already.
    pub fn signal(&self) -> Result<(), FenceError> {
        let fence = self.inner.id;
        // Checked and completed under one hold of the lock: a submission cannot take the fence
        // as its signal in between.
        self.complete_if(Ok(()), |slow| {
            if !slow.host || slow.attached { Err(FenceError::NotHost { fence }) } else { Ok(()) }
        })?
        .then_some(())
        .ok_or(FenceError::Completed { fence })
    }

    /// Hands a pending host fence to a submission, which then signals or fails it.
    pub(crate) fn attach(&self) -> Result<(), ServiceError> {
        let fence = self.inner.id;
        let mut slow = self.inner.slow.lock();
        if !slow.host || slow.attached || self.is_done() {
            return Err(ServiceError::BadSignal { fence });
        }
        slow.attached = true;
        Ok(())
    }

    /// Gives a host fence back to the host (a submission that attached it was refused).
    pub(crate) fn detach(&self) {
        self.inner.slow.lock().attached = false;
    }

    /// Completes the fence (the first completion wins; later ones return `false`), wakes its
    /// waiters and runs its callbacks.
    pub(crate) fn complete(&self, outcome: Result<(), ServiceError>) -> bool {
        self.complete_if(outcome, |_| Ok::<(), ()>(())).unwrap_or(false)
    }

    /// [`Fence::complete`] if `allow` accepts the fence's state, checked under the same hold
    /// of its lock as the completion.
    fn complete_if<E>(
        &self,
        outcome: Result<(), ServiceError>,
        allow: impl FnOnce(&Slow) -> Result<(), E>,
    ) -> Result<bool, E> {
        let callbacks = {
            let mut slow = self.inner.slow.lock();
            allow(&slow)?;
            if self.inner.state.load(Ordering::Relaxed) != PENDING {
                return Ok(false);
            }
            let s = match outcome {
                Ok(()) => SIGNALED,
                Err(e) => {
                    slow.error = Some(e);
                    FAILED
                }
            };
            self.inner.state.store(s, Ordering::Release);
            std::mem::take(&mut slow.callbacks)
        };
        self.inner.cv.notify_all();
        for cb in callbacks {
            cb();
        }
        Ok(true)
    }

    /// Runs `cb` once the fence completes. Returns it back when the fence has already
    /// completed (the caller goes on itself).
    pub(crate) fn on_done(&self, cb: Callback) -> Result<(), Callback> {
        let mut slow = self.inner.slow.lock();
        if self.is_done() {
            return Err(cb);
        }
        slow.callbacks.push(cb);
        Ok(())
    }

    /// The error of a failed fence.
    pub(crate) fn error(&self) -> Option<ServiceError> {
        if self.inner.state.load(Ordering::Acquire) == FAILED {
            self.inner.slow.lock().error.clone()
        } else {
            None
        }
    }
}

/// A wait without a deadline cannot time out.
#[cold]
fn unreachable_timeout(id: u64) -> Result<(), FenceError> {
    Err(FenceError::Timeout { fence: id, waited: Duration::MAX })
}
