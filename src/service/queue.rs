//! [`BindQueue`]: submission (checked, then queued under backpressure) and synchronous binds.
#![forbid(unsafe_code)]

use std::time::Instant;

use super::metrics::Counters;
use super::sched::{Msg, Work};
use super::{BindQueue, Fence, FenceError, QueueId, ServiceError, TrySubmitError};
use crate::addr::PAGE_SIZE;
use crate::gpuvm::{BindOp, Vm, VmError};
use std::sync::Arc;

impl BindQueue {
    /// The queue's id.
    #[must_use]
    pub fn id(&self) -> QueueId {
        self.id
    }

    /// The VM it binds into.
    #[must_use]
    pub fn vm(&self) -> &Arc<Vm> {
        &self.entry.vm
    }

    /// Submits `ops` (one VM_BIND array, all or nothing) to run after every fence in `waits`
    /// has completed, signaling the returned fence and every host fence in `signals` when the
    /// change is visible (module docs). Blocks while the queue is full.
    ///
    /// # Errors
    /// At submit, with nothing queued: [`ServiceError::Vm`] for an invalid op or object (the
    /// error names the op), [`ServiceError::TooManyOps`], [`ServiceError::BadSignal`],
    /// [`ServiceError::VmLost`], [`ServiceError::ShutDown`].
    pub fn submit(
        &self,
        ops: Vec<BindOp>,
        waits: &[Fence],
        signals: &[Fence],
    ) -> Result<Fence, ServiceError> {
        self.enqueue(ops, waits, signals, true).map_err(|(e, _)| match e {
            Enqueue::Refused(e) => e,
            Enqueue::Full => ServiceError::ShutDown,
        })
    }

    /// [`BindQueue::submit`] that never blocks: a full queue hands the ops back.
    ///
    /// # Errors
    /// [`TrySubmitError::Full`]; [`TrySubmitError::Refused`] as [`BindQueue::submit`].
    pub fn try_submit(
        &self,
        ops: Vec<BindOp>,
        waits: &[Fence],
        signals: &[Fence],
    ) -> Result<Fence, TrySubmitError> {
        self.enqueue(ops, waits, signals, false).map_err(|(e, ops)| match e {
            Enqueue::Full => TrySubmitError::Full { queue: self.id, ops },
            Enqueue::Refused(err) => TrySubmitError::Refused { err, ops },
        })
    }

    fn enqueue(
        &self,
        ops: Vec<BindOp>,
        waits: &[Fence],
        signals: &[Fence],
        block: bool,
    ) -> Result<Fence, (Enqueue, Vec<BindOp>)> {
        let e = &*self.entry;
        let refuse = |err, ops| Err((Enqueue::Refused(err), ops));
        if ops.len() > e.cfg.max_ops {
            return refuse(ServiceError::TooManyOps { ops: ops.len(), max: e.cfg.max_ops }, ops);
        }
        // A fence the submission would both wait for and signal could never complete.
        if let Some(f) = signals.iter().find(|f| waits.contains(f)) {
            return refuse(ServiceError::BadSignal { fence: f.id() }, ops);
        }
        if let Err(err) = e.check_followers(&ops) {
            return refuse(err, ops);
        }
        for (i, s) in signals.iter().enumerate() {
            if let Err(err) = s.attach() {
                signals[..i].iter().for_each(Fence::detach);
                return refuse(err, ops);
            }
        }
        // The object registry is held (shared) from the check until the work is queued, so an
        // object's destruction ([`super::Service::destroy_bo`]) either refuses this submission
        // or finds it queued and waits for it.
        let mut bos = e.bos.read();
        if let Err(err) = e.vm.check_ops(&ops, |bo| bos.get(&bo).copied()) {
            drop(bos);
            signals.iter().for_each(Fence::detach);
            return refuse(ServiceError::Vm { vm: e.id, err }, ops);
        }
        let mut s = e.sched.lock();
        loop {
            let gone = if s.closing {
                Some(ServiceError::ShutDown)
            } else {
                s.lost.as_ref().map(|why| ServiceError::VmLost { vm: e.id, why: why.clone() })
            };
            if let Some(err) = gone {
                drop(s);
                drop(bos);
                signals.iter().for_each(Fence::detach);
                return refuse(err, ops);
            }
            if s.queues[self.slot].items.len() < e.cfg.queue_depth {
                break;
            }
            if !block {
                drop(s);
                drop(bos);
                signals.iter().for_each(Fence::detach);
                return Err((Enqueue::Full, ops));
            }
            // Wait for room without holding the registry, then check the objects again.
            drop(bos);
            e.room.wait(&mut s);
            drop(s);
            bos = e.bos.read();
            if let Err(err) = e.vm.check_ops(&ops, |bo| bos.get(&bo).copied()) {
                drop(bos);
                signals.iter().for_each(Fence::detach);
                return refuse(ServiceError::Vm { vm: e.id, err }, ops);
            }
            s = e.sched.lock();
        }
        // A signal that work already queued on this queue waits for would never come.
        if let Some(f) =
            signals.iter().find(|f| s.queues[self.slot].items.iter().any(|w| w.waits.contains(f)))
        {
            let fence = f.id();
            drop(s);
            drop(bos);
            signals.iter().for_each(Fence::detach);
            return refuse(ServiceError::BadSignal { fence }, ops);
        }
        let fence = Fence::queue();
        let q = &mut s.queues[self.slot];
        q.items.push_back(Work {
            ops,
            waits: waits.to_vec(),
            fence: fence.clone(),
            signals: signals.to_vec(),
            at: Instant::now(),
        });
        q.last = Some(fence.clone());
        // A queue that was empty has no armed head: the VM must be looked at (otherwise its
        // head is being worked on, or waits with a callback that reschedules).
        let wake = q.items.len() == 1 && q.inflight == 0 && !s.scheduled;
        if wake {
            s.scheduled = true;
        }
        drop(s);
        drop(bos);
        if wake {
            let _ = e.tx.send(Msg::Run(self.entry.clone()));
        }
        Ok(fence)
    }

    /// Binds `ops` and returns once the change is visible (a synchronous VM_BIND). On a queue
    /// with nothing pending it runs on the calling thread; otherwise it is submitted behind the
    /// queue's work and waited for.
    ///
    /// # Errors
    /// As [`BindQueue::submit`] for what it checks first, and the bind's own failure
    /// ([`ServiceError::Vm`]: out of memory for tables, an object gone), after which the VM is
    /// as it was.
    pub fn bind(&self, ops: &[BindOp]) -> Result<(), ServiceError> {
        let e = &*self.entry;
        if ops.len() > e.cfg.max_ops {
            return Err(ServiceError::TooManyOps { ops: ops.len(), max: e.cfg.max_ops });
        }
        {
            let bos = e.bos.read();
            e.vm.check_ops(ops, |bo| bos.get(&bo).copied())
                .map_err(|err| ServiceError::Vm { vm: e.id, err })?;
        }
        e.check_followers(ops)?;
        let inline = {
            let mut s = e.sched.lock();
            if s.closing {
                return Err(ServiceError::ShutDown);
            }
            if let Some(why) = &s.lost {
                return Err(ServiceError::VmLost { vm: e.id, why: why.clone() });
            }
            let q = &mut s.queues[self.slot];
            let idle = q.items.is_empty() && q.inflight == 0;
            if idle {
                q.inflight = 1;
            }
            idle
        };
        if !inline {
            let f = self.submit(ops.to_vec(), &[], &[])?;
            return f.wait_forever().map_err(|err| match err {
                FenceError::Failed { err, .. } => err,
                FenceError::Timeout { .. } | FenceError::NotHost { .. } | FenceError::Completed { .. } => {
                    ServiceError::Cancelled
                }
            });
        }
        let t0 = Instant::now();
        let r = e.commit(ops);
        let c = &e.counters;
        Counters::add(&c.submissions, 1);
        Counters::add(&c.batches, 1);
        Counters::add(&c.ops, ops.len() as u64);
        let out = match r {
            Ok(b) => {
                Counters::add(&c.pages, b.mapped / PAGE_SIZE);
                Counters::add(&c.gpu_tlb_flushes, u64::from(b.flush.range.is_some()));
                Ok(())
            }
            Err(err) => {
                Counters::add(&c.failed, 1);
                Err(err)
            }
        };
        let followed = if out.is_ok() { e.follow(ops) } else { Ok(()) };
        let mut s = e.sched.lock();
        if let Err(VmError::Unusable { why }) = &out {
            s.lost = Some(why.clone());
        }
        let q = &mut s.queues[self.slot];
        q.inflight = 0;
        q.lat.record(t0.elapsed().as_nanos() as u64);
        let wake = !q.items.is_empty() && !s.scheduled;
        if wake {
            s.scheduled = true;
        }
        let lost = s.lost.is_some();
        drop(s);
        if wake {
            let _ = e.tx.send(Msg::Run(self.entry.clone()));
        }
        if lost {
            e.fail_queued();
        }
        out.map_err(|err| ServiceError::Vm { vm: e.id, err })?;
        followed
    }
}

enum Enqueue {
    Full,
    Refused(ServiceError),
}
