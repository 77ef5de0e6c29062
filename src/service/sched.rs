//! The scheduler: per-VM queue state, the workers' loop, coalescing and merging, lost VMs.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex, RwLock};

use super::metrics::{Counters, Histogram};
use super::{Fence, Follower, PteWriter, ServiceConfig, ServiceError, VmId};
use crate::addr::PAGE_SIZE;
use crate::gpuvm::{BindOp, BoId, Populated, Vm};
use crate::hash::FastMap;

/// One submission.
pub(super) struct Work {
    pub(super) ops: Vec<BindOp>,
    pub(super) waits: Vec<Fence>,
    pub(super) fence: Fence,
    pub(super) signals: Vec<Fence>,
    pub(super) at: Instant,
}

impl Work {
    /// Completes the submission's fence, then its host signals (so a waiter on a signal finds
    /// the submission's fence complete).
    pub(super) fn complete(&self, r: &Result<(), ServiceError>) {
        self.fence.complete(r.clone());
        for s in &self.signals {
            s.complete(r.clone());
        }
    }

    /// Whether every in-fence has completed.
    pub(super) fn ready(&self) -> bool {
        self.waits.iter().all(Fence::is_done)
    }

    /// The first failed in-fence.
    pub(super) fn failed_wait(&self) -> Option<ServiceError> {
        self.waits
            .iter()
            .find_map(|f| f.error().map(|e| ServiceError::WaitFailed { fence: f.id(), err: Box::new(e) }))
    }
}

#[derive(Default)]
pub(super) struct Slot {
    pub(super) items: VecDeque<Work>,
    /// Submissions taken out and not yet completed (a worker's batch, a synchronous bind).
    pub(super) inflight: usize,
    /// The in-fence a callback is registered on (0: none).
    pub(super) armed: u64,
    /// The queue's latest fence (what object destruction waits for).
    pub(super) last: Option<Fence>,
    pub(super) lat: Histogram,
    /// Every handle of the queue is gone: once empty, the slot can serve a new queue.
    pub(super) retired: bool,
}

#[derive(Default)]
pub(super) struct Sched {
    pub(super) queues: Vec<Slot>,
    /// Sent to the workers or being worked on.
    pub(super) scheduled: bool,
    /// Where the next collection starts (round robin over queues).
    pub(super) rr: usize,
    pub(super) lost: Option<String>,
    /// No new submissions (shutdown or VM destruction).
    pub(super) closing: bool,
    /// The fences (and host signals) of the batch being worked on.
    pub(super) running: Vec<Fence>,
}

pub(super) enum Msg {
    Run(Arc<VmEntry>),
    Stop,
}

/// A VM and its queues.
pub(super) struct VmEntry {
    pub(super) id: VmId,
    pub(super) vm: Arc<Vm>,
    pub(super) cfg: ServiceConfig,
    /// Object sizes, for checks at submit without the VM's lock.
    pub(super) bos: RwLock<FastMap<BoId, u64>>,
    pub(super) sched: Mutex<Sched>,
    /// Submitters waiting for room in a queue; synchronous binds waiting for their turn.
    pub(super) room: Condvar,
    pub(super) tx: Sender<Msg>,
    pub(super) counters: Arc<Counters>,
    /// What follows the VM's commits (a Vulkan sparse mirror).
    pub(super) followers: RwLock<Vec<Arc<dyn Follower>>>,
    /// The device writer of 4 KiB entries and its threshold in pages.
    pub(super) pte_writer: RwLock<Option<(Arc<dyn PteWriter>, u64)>>,
}

/// A worker: works on the VMs sent to it until told to stop.
pub(super) fn worker(rx: &Receiver<Msg>) {
    while let Ok(Msg::Run(entry)) = rx.recv() {
        // A panic below is a bug; it must not leave fences pending forever or take the worker
        // down with it: the VM is lost, with the panic's message.
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| entry.run_once())) {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            entry.lose(format!("a bind worker panicked: {msg}"));
        }
    }
}

impl VmEntry {
    /// Commits `ops`: on the CPU, or with the 4 KiB entries written by the VM's
    /// [`PteWriter`] when the batch maps at least its threshold of pages.
    pub(super) fn commit(&self, ops: &[BindOp]) -> Result<crate::gpuvm::Bound, crate::gpuvm::VmError> {
        let writer = self.pte_writer.read().clone();
        let Some((w, min_pages)) = writer else { return self.vm.bind(ops) };
        let mut pages = 0u64;
        for op in ops {
            match op {
                BindOp::Map(v) => pages += v.range / PAGE_SIZE,
                BindOp::Unmap { .. } => return self.vm.bind(ops),
            }
        }
        if pages < min_pages {
            return self.vm.bind(ops);
        }
        // The writer runs inside the commit, under the VM's lock and access gate.
        let (b, populated) = self.vm.bind_deferred(ops, |log| w.write(log))?;
        match populated {
            Populated::Cpu => {}
            Populated::Writer { .. } => Counters::add(&self.counters.device_populated, 1),
            Populated::Fallback { .. } => {
                Counters::add(&self.counters.device_populated, 1);
                Counters::add(&self.counters.device_fallbacks, 1);
            }
        }
        Ok(b)
    }

    /// Every follower's check of `ops`.
    pub(super) fn check_followers(&self, ops: &[BindOp]) -> Result<(), ServiceError> {
        for f in self.followers.read().iter() {
            f.check(&self.vm, ops).map_err(|why| ServiceError::Follower {
                vm: self.id,
                follower: f.name(),
                why,
            })?;
        }
        Ok(())
    }

    /// Every follower follows the committed `ops`; the first failure is the batch's error.
    pub(super) fn follow(&self, ops: &[BindOp]) -> Result<(), ServiceError> {
        let followers = self.followers.read();
        let mut out = Ok(());
        for f in followers.iter() {
            if let Err(why) = f.follow(&self.vm, ops)
                && out.is_ok()
            {
                let why = format!("the batch is committed in the VM's tables, but it did not follow: {why}");
                out = Err(ServiceError::Follower { vm: self.id, follower: f.name(), why });
            }
        }
        out
    }

    /// Takes one batch of ready work, runs it, and reschedules the VM if more is ready (behind
    /// other VMs sent meanwhile: round robin), or goes idle with callbacks armed on the fences
    /// its queue heads wait for.
    pub(super) fn run_once(self: &Arc<Self>) {
        let Some(batch) = self.collect() else { return };
        let outcomes = self.execute(&batch);
        let now = Instant::now();
        // Counted before the fences complete, so that metrics read after a wait include it.
        let lost = {
            let mut s = self.sched.lock();
            for (slot, w) in &batch {
                let q = &mut s.queues[*slot];
                q.inflight -= 1;
                q.lat.record(now.saturating_duration_since(w.at).as_nanos() as u64);
            }
            s.lost.is_some()
        };
        for ((_, w), r) in batch.iter().zip(&outcomes) {
            w.complete(r);
        }
        // Only this worker collects for the VM until the message below: no new batch yet.
        self.sched.lock().running.clear();
        if lost {
            self.fail_queued();
        }
        // Still scheduled: look again, behind whatever else is waiting.
        let _ = self.tx.send(Msg::Run(self.clone()));
    }

    /// The ready prefixes of the queues (round robin from `rr`, within the batch limit), or
    /// `None` after going idle.
    pub(super) fn collect(self: &Arc<Self>) -> Option<Vec<(usize, Work)>> {
        let mut s = self.sched.lock();
        loop {
            let n = s.queues.len();
            let start = if n == 0 { 0 } else { s.rr % n };
            let (coalesce, limit) = (self.cfg.coalesce, self.cfg.max_batch_ops);
            let mut out: Vec<(usize, Work)> = Vec::new();
            let mut ops = 0usize;
            'queues: for k in 0..n {
                let qi = (start + k) % n;
                let q = &mut s.queues[qi];
                if q.inflight > 0 {
                    continue;
                }
                while let Some(w) = q.items.front() {
                    if !w.ready() {
                        break;
                    }
                    if !out.is_empty() && (!coalesce || ops + w.ops.len() > limit) {
                        break 'queues;
                    }
                    ops += w.ops.len();
                    let w = q.items.pop_front().expect("front exists");
                    out.push((qi, w));
                    if !coalesce {
                        break 'queues;
                    }
                }
            }
            if n > 0 {
                s.rr = (start + 1) % n;
            }
            if !out.is_empty() {
                for (qi, w) in &out {
                    s.queues[*qi].inflight += 1;
                    s.running.push(w.fence.clone());
                    s.running.extend(w.signals.iter().cloned());
                }
                drop(s);
                // Room was made: submitters blocked on a full queue refill it while the batch
                // runs.
                self.room.notify_all();
                return Some(out);
            }
            // Nothing ready: arm a callback on the first pending in-fence of each waiting head.
            let mut raced = false;
            for q in s.queues.iter_mut() {
                if q.inflight > 0 {
                    continue;
                }
                let Some(head) = q.items.front() else { continue };
                let Some(f) = head.waits.iter().find(|f| !f.is_done()) else {
                    // Its last in-fence completed since the pass above: it is ready now.
                    raced = true;
                    continue;
                };
                if q.armed == f.id() {
                    continue;
                }
                let weak: Weak<VmEntry> = Arc::downgrade(self);
                let cb = Box::new(move || {
                    if let Some(e) = weak.upgrade() {
                        e.reschedule();
                    }
                });
                match f.on_done(cb) {
                    Ok(()) => q.armed = f.id(),
                    Err(_) => raced = true,
                }
            }
            if !raced {
                s.scheduled = false;
                return None;
            }
        }
    }

    /// Sends the VM to the workers unless it is scheduled already.
    pub(super) fn reschedule(self: &Arc<Self>) {
        let mut s = self.sched.lock();
        if s.scheduled {
            return;
        }
        s.scheduled = true;
        drop(s);
        let _ = self.tx.send(Msg::Run(self.clone()));
    }

    /// Runs a batch: failed in-fences fail their work; the rest is merged and bound as one
    /// array; if that fails, submission by submission, the first failure losing the VM.
    pub(super) fn execute(&self, batch: &[(usize, Work)]) -> Vec<Result<(), ServiceError>> {
        let c = &self.counters;
        Counters::add(&c.submissions, batch.len() as u64);
        let mut out: Vec<Result<(), ServiceError>> =
            batch.iter().map(|(_, w)| w.failed_wait().map_or(Ok(()), Err)).collect();
        if let Some(why) = self.sched.lock().lost.clone() {
            for r in &mut out {
                *r = Err(ServiceError::VmLost { vm: self.id, why: why.clone() });
            }
            Counters::add(&c.failed, out.len() as u64);
            return out;
        }
        let live: Vec<usize> = (0..batch.len()).filter(|&i| out[i].is_ok()).collect();
        let n_ops: usize = live.iter().map(|&i| batch[i].1.ops.len()).sum();
        Counters::add(&c.ops, n_ops as u64);
        let whole = (self.cfg.coalesce && !live.is_empty()).then(|| {
            let (ops, merged) = merge(live.iter().flat_map(|&i| batch[i].1.ops.iter()), n_ops);
            Counters::add(&c.merged, merged);
            self.commit(&ops).map(|b| (b, ops))
        });
        let note = |b: &crate::gpuvm::Bound| {
            Counters::add(&c.batches, 1);
            Counters::add(&c.pages, b.mapped / PAGE_SIZE);
            Counters::add(&c.gpu_tlb_flushes, u64::from(b.flush.range.is_some()));
        };
        if let Some(Ok((b, ops))) = whole {
            note(&b);
            if let Err(e) = self.follow(&ops) {
                for &i in &live {
                    out[i] = Err(e.clone());
                }
            }
            Counters::add(&c.failed, out.iter().filter(|r| r.is_err()).count() as u64);
            return out;
        }
        // One by one, in order: isolates the submission that fails.
        let mut lost: Option<String> = None;
        for &i in &live {
            let w = &batch[i].1;
            if let Some(why) = &lost {
                out[i] = Err(ServiceError::VmLost { vm: self.id, why: why.clone() });
                continue;
            }
            match self.commit(&w.ops) {
                Ok(b) => {
                    note(&b);
                    if let Err(e) = self.follow(&w.ops) {
                        out[i] = Err(e);
                    }
                }
                Err(err) => {
                    lost = Some(format!("submission of fence {} failed: {err}", w.fence.id()));
                    out[i] = Err(ServiceError::Vm { vm: self.id, err });
                }
            }
        }
        if let Some(why) = lost {
            self.sched.lock().lost = Some(why);
        }
        Counters::add(&c.failed, out.iter().filter(|r| r.is_err()).count() as u64);
        out
    }

    /// Marks the VM lost after a worker panic: the batch it was running and everything queued
    /// fail with the reason.
    pub(super) fn lose(&self, why: String) {
        let running = {
            let mut s = self.sched.lock();
            s.lost = Some(why.clone());
            s.scheduled = false;
            for q in &mut s.queues {
                q.inflight = 0;
            }
            std::mem::take(&mut s.running)
        };
        for f in running {
            f.complete(Err(ServiceError::VmLost { vm: self.id, why: why.clone() }));
        }
        self.fail_queued();
    }

    /// Fails every queued submission of a lost VM.
    pub(super) fn fail_queued(&self) {
        let (gone, why): (Vec<Work>, String) = {
            let mut s = self.sched.lock();
            let why = s.lost.clone().unwrap_or_default();
            (s.queues.iter_mut().flat_map(|q| q.items.drain(..)).collect(), why)
        };
        Counters::add(&self.counters.failed, gone.len() as u64);
        for w in &gone {
            w.complete(&Err(ServiceError::VmLost { vm: self.id, why: why.clone() }));
        }
        self.room.notify_all();
    }
}

/// The ops with each run of adjacent, continuing ops merged into one (module docs), and how
/// many ops merged away.
fn merge<'a>(ops: impl Iterator<Item = &'a BindOp>, n: usize) -> (Vec<BindOp>, u64) {
    let mut out: Vec<BindOp> = Vec::with_capacity(n);
    let mut merged = 0;
    for op in ops {
        if let Some(last) = out.last_mut()
            && extend(last, op)
        {
            merged += 1;
            continue;
        }
        out.push(op.clone());
    }
    (out, merged)
}

/// Grows `last` by `op` when `op` continues it exactly.
fn extend(last: &mut BindOp, op: &BindOp) -> bool {
    match (last, op) {
        (BindOp::Unmap { addr, range }, BindOp::Unmap { addr: a2, range: r2 }) if *addr + *range == *a2 => {
            *range += *r2;
            true
        }
        (BindOp::Map(a), BindOp::Map(b)) => {
            let continues = a.repeat.is_none()
                && b.repeat.is_none()
                && a.obj == b.obj
                && a.flags == b.flags
                && a.end() == b.addr
                && (a.obj.is_none() || a.offset + a.range == b.offset);
            if continues {
                a.range += b.range;
            }
            continues
        }
        _ => false,
    }
}
