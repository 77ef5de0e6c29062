//! Replaying a checked [`Workload`] through a [`Service`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{AccessMode, DomainMode, GpuKind, Line, PlacementKind, Workload, checksum, pattern};
use crate::addr::{PAGE_SIZE, PageSize, PhysAddr};
use crate::gpuvm::{BindOp, BoId, Va, VaFlags, Vm};
use crate::hash::FastMap;
use crate::iommu::{DeviceId, DomainConfig, DomainKind, Mode};
use crate::mem::{BioVec, PhysMem};
use crate::service::{BindQueue, Fence, FenceError, FenceStatus, Gpu, Service, ServiceConfig, VmId};

/// How a workload is replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayOptions {
    /// Fold each VM's queues onto at most this many bind queues (queue `k` of the file on queue
    /// `k % n`; order within every file queue is kept, since folding only merges queues). `None`:
    /// one bind queue per file queue.
    pub queues: Option<usize>,
    /// The service's worker threads.
    pub threads: usize,
    /// Whether the service coalesces submissions ([`ServiceConfig::coalesce`]).
    pub coalesce: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions { queues: None, threads: 1, coalesce: true }
    }
}

/// A replay that stopped: the line, and why. The lines before it were applied; nothing after.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason} (the lines before it were applied, none after)")]
pub struct ReplayError {
    /// 1-based line number in the file.
    pub line: usize,
    /// Why.
    pub reason: String,
}

/// One bind queue's latency, as [`Summary`] reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueSummary {
    /// The VM's name.
    pub vm: String,
    /// The file's queue names on this bind queue.
    pub queues: Vec<String>,
    /// Submissions completed.
    pub completed: u64,
    /// Median submit-to-visible latency, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest, µs.
    pub max_us: f64,
}

/// What a replay did: the service's metrics, the checks, and the time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The workload's name.
    pub name: Option<String>,
    /// Lines applied (the header excluded).
    pub lines: usize,
    /// Bind ops executed (the service's count).
    pub ops: u64,
    /// 4 KiB pages of GPU entries the maps wrote (sparse ones included).
    pub pages: u64,
    /// Submissions executed.
    pub submissions: u64,
    /// Prepare/commit passes.
    pub batches: u64,
    /// Ops per batch.
    pub mean_batch: f64,
    /// Ops merged into a neighbour.
    pub merged: u64,
    /// IOTLB invalidations.
    pub iotlb_flushes: u64,
    /// GPU-TLB invalidations.
    pub gpu_tlb_flushes: u64,
    /// Submissions that failed.
    pub failed: u64,
    /// `check` lines passed.
    pub checks: usize,
    /// Whole replay, seconds.
    pub wall_s: f64,
    /// Of it, the replaying thread's time making and freeing memories and running checks.
    pub setup_s: f64,
    /// `wall_s - setup_s`: the time the binds took.
    pub bind_s: f64,
    /// Ops per second of bind time.
    pub ops_per_s: f64,
    /// Bind time per op, ns.
    pub ns_per_op: f64,
    /// Mapped bytes per second of bind time (GiB/s).
    pub gib_per_s: f64,
    /// Per bind queue.
    pub queues: Vec<QueueSummary>,
}

enum Owned {
    Frames(Vec<PhysAddr>),
    Blocks(Vec<PhysAddr>),
}

struct LiveMem {
    vm: usize,
    bo: BoId,
    pages: Vec<BioVec>,
    owned: Owned,
}

/// A replay in progress (see [`Replay::run`]).
pub struct Replay<'w> {
    w: &'w Workload,
    svc: Arc<Service>,
    mem: Arc<PhysMem>,
    vms: Vec<VmId>,
    /// Per VM: its bind queues, and the file's queue names → index there.
    queues: Vec<(Vec<BindQueue>, FastMap<String, usize>)>,
    fences: FastMap<String, Fence>,
    /// Live memories by name.
    mems: FastMap<String, LiveMem>,
    /// Every submission's fence, with its line (failures are reported by line).
    submitted: Vec<(usize, Fence)>,
    /// Per VM and bind queue: its last fence.
    last: Vec<Vec<Option<Fence>>>,
    next: usize,
    opts: ReplayOptions,
    checks: usize,
    setup: Duration,
    started: Option<Instant>,
    bytes: u64,
}

impl core::fmt::Debug for Replay<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Replay").field("next", &self.next).field("lines", &self.w.lines.len()).finish()
    }
}

fn err(line: usize, reason: impl Into<String>) -> ReplayError {
    ReplayError { line, reason: reason.into() }
}

impl<'w> Replay<'w> {
    /// A replay of `w`: its arena and service, nothing applied yet.
    ///
    /// # Errors
    /// [`ReplayError`] (line 1) when the arena cannot be mapped.
    pub fn new(w: &'w Workload, opts: ReplayOptions) -> Result<Self, ReplayError> {
        let mem = Arc::new(PhysMem::new(w.arena).map_err(|e| err(1, format!("cannot make the arena: {e}")))?);
        let cfg = ServiceConfig {
            workers: opts.threads.max(1),
            coalesce: opts.coalesce,
            ..ServiceConfig::default()
        };
        let svc = Arc::new(Service::new(mem.clone(), cfg));
        Ok(Replay {
            w,
            svc,
            mem,
            vms: Vec::new(),
            queues: Vec::new(),
            fences: FastMap::default(),
            mems: FastMap::default(),
            submitted: Vec::new(),
            last: Vec::new(),
            next: 0,
            opts,
            checks: 0,
            setup: Duration::ZERO,
            started: None,
            bytes: 0,
        })
    }

    /// The service replaying it.
    #[must_use]
    pub fn service(&self) -> &Arc<Service> {
        &self.svc
    }

    /// The VMs made so far, with their names.
    #[must_use]
    pub fn vms(&self) -> Vec<(String, Arc<Vm>)> {
        self.vms
            .iter()
            .zip(&self.w.vms)
            .filter_map(|(&id, name)| Some((name.clone(), self.svc.vm(id).ok()?)))
            .collect()
    }

    /// Lines still to apply.
    #[must_use]
    pub fn remaining(&self) -> usize {
        self.w.lines.len() - self.next
    }

    /// Applies every line, reporting progress (`done`, `total` lines) every 256 lines and at
    /// the end, waits for everything submitted, and sums up.
    ///
    /// # Errors
    /// The first [`ReplayError`]: a line the service refused, a failed submission (named by its
    /// line), a check that read other bytes, or the arena exhausted.
    pub fn run(
        &mut self,
        until: Option<usize>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Summary, ReplayError> {
        let total = self.w.lines.len();
        self.started.get_or_insert_with(Instant::now);
        while self.next < total {
            let (n, _) = &self.w.lines[self.next];
            if until.is_some_and(|u| *n > u) {
                break;
            }
            self.step()?;
            if self.next.is_multiple_of(256) {
                progress(self.next, total);
            }
        }
        self.wait_all()?;
        progress(self.next, total);
        Ok(self.summary())
    }

    /// [`Replay::run`] of every line, without progress reports.
    ///
    /// # Errors
    /// As [`Replay::run`].
    pub fn run_all(mut self) -> Result<Summary, ReplayError> {
        self.run(None, |_, _| {})
    }

    /// Waits for every submission so far; the first failed one is reported by its line.
    fn wait_all(&mut self) -> Result<(), ReplayError> {
        for f in self.last.iter().flatten().flatten() {
            let _ = f.wait_forever();
        }
        for (n, f) in &self.submitted {
            if let FenceStatus::Failed(e) = f.poll() {
                return Err(err(*n, format!("the submission failed: {e}")));
            }
        }
        self.submitted.retain(|(_, f)| !f.is_done());
        Ok(())
    }

    /// Applies the next line.
    fn step(&mut self) -> Result<(), ReplayError> {
        let (n, line) = &self.w.lines[self.next];
        let n = *n;
        match line {
            Line::Workload { .. } => {}
            Line::Vm { name: _, va_size, gpu, domain, addr_bits } => {
                let id = DeviceId(100 + self.vms.len() as u16);
                let gpu = match gpu {
                    GpuKind::Iommu => {
                        let mut d = DomainConfig::default();
                        match domain {
                            DomainMode::Strict => d.mode = Mode::Strict,
                            DomainMode::Lazy => d.mode = Mode::Lazy,
                            DomainMode::Identity => d.kind = DomainKind::Identity,
                        }
                        Gpu::BehindIommu { id, domain: d }
                    }
                    GpuKind::Direct => Gpu::Direct { id, addr_bits: addr_bits.unwrap_or(48) },
                };
                let vm = self.svc.create_vm(gpu, va_size.0).map_err(|e| err(n, e.to_string()))?;
                self.vms.push(vm);
                let v = self.vms.len() - 1;
                let names = &self.w.queues[v];
                let count = self.opts.queues.map_or(names.len(), |q| q.max(1).min(names.len())).max(1);
                let mut qs = Vec::with_capacity(count);
                for _ in 0..count {
                    qs.push(self.svc.create_queue(vm).map_err(|e| err(n, e.to_string()))?);
                }
                let map = names.iter().enumerate().map(|(k, q)| (q.clone(), k % count)).collect();
                self.queues.push((qs, map));
                self.last.push(vec![None; count]);
            }
            Line::Memory { name, vm, size, placement, seed, file } => {
                let t = Instant::now();
                let v = self.vm_of(vm);
                let m = self.make_memory(n, v, size.map(|s| s.0), *placement, *seed, file.as_deref())?;
                self.mems.insert(name.clone(), m);
                self.setup += t.elapsed();
            }
            Line::Free { vm: _, memory } => {
                // The binds queued so far count as bind time; then the destroy as setup.
                self.wait_all()?;
                let t = Instant::now();
                let m =
                    self.mems.remove(memory).ok_or_else(|| err(n, format!("no live memory `{memory}`")))?;
                if let Err(e) = self.svc.destroy_bo(self.vms[m.vm], m.bo) {
                    let reason = e.to_string();
                    self.mems.insert(memory.clone(), m);
                    return Err(err(n, reason));
                }
                self.free_owned(&m.owned);
                self.setup += t.elapsed();
            }
            Line::Bind { vm, queue, va, size, memory, offset, access, exec, waits, signal } => {
                let bo = self.bo_of(n, memory)?;
                let v = Va::object(va.0, size.0, bo, offset.0).with_flags(flags(*access, *exec));
                self.submit(n, vm, queue, BindOp::Map(v), waits, signal.as_deref(), size.0)?;
            }
            Line::Repeat { vm, queue, va, size, memory, offset, period, access, exec, waits, signal } => {
                let bo = self.bo_of(n, memory)?;
                let v = Va::object(va.0, size.0, bo, offset.0)
                    .with_flags(flags(*access, *exec))
                    .repeating(period.0);
                self.submit(n, vm, queue, BindOp::Map(v), waits, signal.as_deref(), size.0)?;
            }
            Line::Sparse { vm, queue, va, size, access, waits, signal } => {
                let v = Va::sparse(va.0, size.0).with_flags(flags(*access, false));
                self.submit(n, vm, queue, BindOp::Map(v), waits, signal.as_deref(), 0)?;
            }
            Line::Unbind { vm, queue, va, size, waits, signal } => {
                let op = BindOp::Unmap { addr: va.0, range: size.0 };
                self.submit(n, vm, queue, op, waits, signal.as_deref(), 0)?;
            }
            Line::Wait { fence } => match fence {
                Some(f) => {
                    let fence = self.fences.get(f).ok_or_else(|| err(n, format!("no fence `{f}`")))?;
                    if let Err(FenceError::Failed { err: e, .. }) = fence.wait_forever() {
                        return Err(err(n, format!("fence `{f}` failed: {e}")));
                    }
                }
                None => self.wait_all()?,
            },
            Line::Check { vm, va, size, checksum: sum, memory, offset, zero } => {
                self.wait_all()?;
                let t = Instant::now();
                let v = self.vm_of(vm);
                let vm = self.svc.vm(self.vms[v]).map_err(|e| err(n, e.to_string()))?;
                let mut got = vec![0u8; size.0 as usize];
                vm.gpu_read(va.0, &mut got).map_err(|e| err(n, format!("check failed: {e}")))?;
                if let Some(want) = sum {
                    let c = checksum(&got);
                    if c != want.0 {
                        return Err(err(
                            n,
                            format!("check failed: checksum {c:#018x}, expected {:#018x}", want.0),
                        ));
                    }
                } else if let Some(name) = memory {
                    let m = self.mems.get(name).ok_or_else(|| err(n, format!("no live memory `{name}`")))?;
                    let want =
                        self.read_memory(m, offset.map_or(0, |o| o.0), size.0).map_err(|e| err(n, e))?;
                    if let Some(at) = got.iter().zip(&want).position(|(a, b)| a != b) {
                        return Err(err(
                            n,
                            format!(
                                "check failed: GPU VA {:#x} reads {:#04x}, memory `{name}` holds {:#04x}",
                                va.0 + at as u64,
                                got[at],
                                want[at]
                            ),
                        ));
                    }
                } else if *zero && let Some(at) = got.iter().position(|&b| b != 0) {
                    return Err(err(
                        n,
                        format!(
                            "check failed: GPU VA {:#x} reads {:#04x}, not zero",
                            va.0 + at as u64,
                            got[at]
                        ),
                    ));
                }
                self.checks += 1;
                self.setup += t.elapsed();
            }
        }
        self.next += 1;
        Ok(())
    }

    fn vm_of(&self, name: &str) -> usize {
        self.w.vms.iter().position(|v| v == name).expect("checked by Workload::parse")
    }

    fn bo_of(&self, n: usize, memory: &str) -> Result<BoId, ReplayError> {
        self.mems.get(memory).map(|m| m.bo).ok_or_else(|| err(n, format!("no live memory `{memory}`")))
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        n: usize,
        vm: &str,
        queue: &str,
        op: BindOp,
        waits: &[String],
        signal: Option<&str>,
        bytes: u64,
    ) -> Result<(), ReplayError> {
        let v = self.vm_of(vm);
        let (qs, map) = &self.queues[v];
        let q = *map.get(queue).expect("every queue name was seen by the checks");
        let waits: Vec<Fence> = waits.iter().filter_map(|f| self.fences.get(f).cloned()).collect();
        let fence = qs[q]
            .submit(vec![op], &waits, &[])
            .map_err(|e| err(n, format!("the service refused it: {e}")))?;
        if let Some(s) = signal {
            self.fences.insert(s.to_string(), fence.clone());
        }
        self.last[v][q] = Some(fence.clone());
        self.submitted.push((n, fence));
        if self.submitted.len() >= 4096 {
            self.submitted.retain(|(_, f)| !f.is_done() || matches!(f.poll(), FenceStatus::Failed(_)));
        }
        self.bytes += bytes;
        Ok(())
    }

    fn make_memory(
        &self,
        n: usize,
        v: usize,
        size: Option<u64>,
        placement: PlacementKind,
        seed: Option<u64>,
        file: Option<&str>,
    ) -> Result<LiveMem, ReplayError> {
        let mem = &self.mem;
        let data = match file {
            Some(f) => Some(std::fs::read(f).map_err(|e| err(n, format!("cannot read {f}: {e}")))?),
            None => None,
        };
        let bytes = match (&data, size) {
            (Some(d), _) => (d.len() as u64).max(1).next_multiple_of(PAGE_SIZE),
            (None, Some(s)) => s,
            (None, None) => return Err(err(n, "no size")),
        };
        let short = |e: crate::mem::MemError| err(n, format!("the arena is short: {e}"));
        let (pages, owned) = match placement {
            PlacementKind::Scattered => {
                let frames = mem.alloc_scattered((bytes / PAGE_SIZE) as usize, n as u64).map_err(short)?;
                (BioVec::from_frames(&frames), Owned::Frames(frames))
            }
            PlacementKind::Contiguous => {
                let chunk = PageSize::Size2M.bytes();
                let blocks =
                    mem.alloc_contig_blocks((bytes / chunk) as usize, PageSize::Size2M).map_err(short)?;
                let pages =
                    blocks.iter().map(|&b| BioVec { phys: b, offset: 0, len: chunk as u32 }).collect();
                (pages, Owned::Blocks(blocks))
            }
        };
        let fill = || -> Result<(), crate::mem::MemError> {
            let mut buf = vec![0u8; bytes as usize];
            match (&data, seed) {
                (Some(d), _) => buf[..d.len()].copy_from_slice(d),
                (None, Some(s)) => pattern(s, &mut buf),
                (None, None) => {
                    for p in &pages {
                        mem.zero(p.phys, u64::from(p.len))?;
                    }
                    return Ok(());
                }
            }
            let mut at = 0usize;
            for p in &pages {
                let len = p.len as usize;
                mem.write(p.phys, &buf[at..at + len])?;
                at += len;
            }
            Ok(())
        };
        if let Err(e) = fill() {
            self.free_owned(&owned);
            return Err(err(n, format!("cannot fill the memory: {e}")));
        }
        match self.svc.create_bo(self.vms[v], pages.clone()) {
            Ok(bo) => Ok(LiveMem { vm: v, bo, pages, owned }),
            Err(e) => {
                self.free_owned(&owned);
                Err(err(n, e.to_string()))
            }
        }
    }

    fn free_owned(&self, owned: &Owned) {
        match owned {
            Owned::Frames(f) => {
                let _ = self.mem.free_frames(f);
            }
            Owned::Blocks(b) => {
                for &pa in b {
                    let _ = self.mem.free_contig(pa, PageSize::Size2M);
                }
            }
        }
    }

    /// `len` bytes of a memory from `offset`.
    fn read_memory(&self, m: &LiveMem, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(len as usize);
        let mut at = 0u64;
        for p in &m.pages {
            let (s, e) = (at, at + u64::from(p.len));
            at = e;
            let (a, b) = (offset.max(s), (offset + len).min(e));
            if a >= b {
                continue;
            }
            let mut buf = vec![0u8; (b - a) as usize];
            self.mem
                .read(p.phys.checked_add(a - s).ok_or("an address past 2^64")?, &mut buf)
                .map_err(|e| e.to_string())?;
            out.extend_from_slice(&buf);
        }
        Ok(out)
    }

    fn summary(&self) -> Summary {
        let m = self.svc.metrics();
        let wall = self.started.map_or(Duration::ZERO, |t| t.elapsed());
        let bind = wall.saturating_sub(self.setup).as_secs_f64();
        let per = |x: f64| if bind > 0.0 { x / bind } else { 0.0 };
        let mut queues = Vec::new();
        let by_vm: FastMap<VmId, usize> = self.vms.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        for q in &m.queues {
            let Some(&v) = by_vm.get(&q.queue.vm) else { continue };
            let (_, map) = &self.queues[v];
            let mut names: Vec<String> =
                map.iter().filter(|(_, k)| **k == q.queue.index as usize).map(|(s, _)| s.clone()).collect();
            names.sort();
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            queues.push(QueueSummary {
                vm: self.w.vms[v].clone(),
                queues: names,
                completed: q.completed,
                p50_us: us(q.p50),
                p99_us: us(q.p99),
                max_us: us(q.max),
            });
        }
        Summary {
            name: self.w.name.clone(),
            lines: self.next,
            ops: m.ops,
            pages: m.pages,
            submissions: m.submissions,
            batches: m.batches,
            mean_batch: m.mean_batch,
            merged: m.merged,
            iotlb_flushes: m.iotlb_flushes,
            gpu_tlb_flushes: m.gpu_tlb_flushes,
            failed: m.failed,
            checks: self.checks,
            wall_s: wall.as_secs_f64(),
            setup_s: self.setup.as_secs_f64(),
            bind_s: bind,
            ops_per_s: per(m.ops as f64),
            ns_per_op: if m.ops > 0 { bind * 1e9 / m.ops as f64 } else { 0.0 },
            gib_per_s: per(self.bytes as f64) / f64::from(1u32 << 30),
            queues,
        }
    }
}

fn flags(access: AccessMode, exec: bool) -> VaFlags {
    VaFlags { read_only: access == AccessMode::Read, no_exec: !exec }
}
