//! Recording what a runtime does as a workload ([`Runtime::record_to`]).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::maps::push_maps;
use super::{Owned, Runtime, RuntimeError};
use crate::gpuvm::{BindOp, BoId};
use crate::hash::FastMap;
use crate::iommu::{DomainKind, Mode};
use crate::service::Fence;
use crate::workload::{AccessMode, DomainMode, GpuKind, Line, Num, PlacementKind, VERSION};

/// An open recording: the file, and the names it gave objects and fences.
pub(super) struct Recorder {
    out: BufWriter<File>,
    path: String,
    bos: FastMap<BoId, String>,
    fences: FastMap<u64, String>,
    next_fence: u64,
    error: Option<String>,
}

impl Recorder {
    fn line(&mut self, l: &Line) {
        if self.error.is_some() {
            return;
        }
        if let Err(e) = writeln!(self.out, "{}", l.to_json()) {
            self.error = Some(e.to_string());
        }
    }

    /// A new memory backing `bo`.
    pub(super) fn memory(&mut self, id: u64, bo: BoId, size: u64, owned: &Owned) {
        let name = format!("m{id}");
        let placement = if matches!(owned, Owned::Blocks(_)) {
            PlacementKind::Contiguous
        } else {
            PlacementKind::Scattered
        };
        self.line(&Line::Memory {
            name: name.clone(),
            vm: "gpu".into(),
            size: Some(Num(size)),
            placement,
            seed: None,
            file: None,
        });
        self.bos.insert(bo, name);
    }

    /// A destroyed memory.
    pub(super) fn free(&mut self, bo: BoId) {
        if let Some(name) = self.bos.remove(&bo) {
            self.line(&Line::Free { vm: "gpu".into(), memory: name });
        }
    }

    /// One submission on the stream `stream`: its ops, the fences it waited for, and its own
    /// (none for a blocking one).
    pub(super) fn submission(
        &mut self,
        stream: usize,
        ops: &[BindOp],
        waits: &[Fence],
        fence: Option<&Fence>,
    ) {
        let queue = if stream == 0 { "default".to_string() } else { format!("s{stream}") };
        // Fences made before the recording began are complete (it starts synchronized).
        let mut waits: Vec<String> = waits.iter().filter_map(|f| self.fences.get(&f.id()).cloned()).collect();
        let signal = fence.map(|f| {
            self.next_fence += 1;
            let name = format!("f{}", self.next_fence);
            self.fences.insert(f.id(), name.clone());
            name
        });
        for (i, op) in ops.iter().enumerate() {
            let signal = if i + 1 == ops.len() { signal.clone() } else { None };
            let waits = std::mem::take(&mut waits);
            if let Some(l) = self.op_line(&queue, op, waits, signal) {
                self.line(&l);
            }
        }
    }

    fn op_line(&self, queue: &str, op: &BindOp, waits: Vec<String>, signal: Option<String>) -> Option<Line> {
        let (vm, queue) = ("gpu".to_string(), queue.to_string());
        Some(match op {
            BindOp::Unmap { addr, range } => {
                Line::Unbind { vm, queue, va: Num(*addr), size: Num(*range), waits, signal }
            }
            BindOp::Map(v) => {
                let access = if v.flags.read_only { AccessMode::Read } else { AccessMode::ReadWrite };
                match v.obj {
                    None => {
                        Line::Sparse { vm, queue, va: Num(v.addr), size: Num(v.range), access, waits, signal }
                    }
                    Some(bo) => {
                        let memory = self.bos.get(&bo)?.clone();
                        let (va, size, exec) = (Num(v.addr), Num(v.range), !v.flags.no_exec);
                        match v.repeat {
                            Some(r) => Line::Repeat {
                                vm,
                                queue,
                                va,
                                size,
                                memory,
                                offset: Num(r.start),
                                period: Num(r.len),
                                access,
                                exec,
                                waits,
                                signal,
                            },
                            None => Line::Bind {
                                vm,
                                queue,
                                va,
                                size,
                                memory,
                                offset: Num(v.offset),
                                access,
                                exec,
                                waits,
                                signal,
                            },
                        }
                    }
                }
            }
        })
    }
}

impl Runtime {
    /// Records everything the runtime does from now on to a workload file at `path` (the
    /// format of [`crate::workload`]), so that `vmbind run` can replay and measure it: first a
    /// header and the VM, then the memories and mappings that exist now, then every memory
    /// made and freed and every bind op, on its stream's queue (`default`, `s1`, ...), with
    /// the cross-stream waits the runtime added. Memory contents are not recorded (memories
    /// replay zero-filled, of the same size and placement). It waits for the work in flight
    /// first. Recording goes on until [`Runtime::stop_recording`] or the runtime is dropped.
    ///
    /// # Errors
    /// [`RuntimeError::Io`] when the file cannot be made; [`RuntimeError::Service`] when work
    /// in flight failed.
    pub fn record_to(&self, path: &Path) -> Result<(), RuntimeError> {
        self.synchronize()?;
        let io =
            |e: std::io::Error| RuntimeError::Io { path: path.display().to_string(), why: e.to_string() };
        let file = File::create(path).map_err(io)?;
        let mut rec = Recorder {
            out: BufWriter::new(file),
            path: path.display().to_string(),
            bos: FastMap::default(),
            fences: FastMap::default(),
            next_fence: 0,
            error: None,
        };
        let mem = self.svc.mem();
        rec.line(&Line::Workload { version: VERSION, arena: Num(mem.size()), name: Some("recorded".into()) });
        let dev = self.vm_ref.device();
        let (gpu, domain, addr_bits) = match dev.domain() {
            Some(d) => {
                let mode = match (d.kind(), d.mode()) {
                    (DomainKind::Identity, _) => DomainMode::Identity,
                    (_, Mode::Lazy) => DomainMode::Lazy,
                    _ => DomainMode::Strict,
                };
                (GpuKind::Iommu, mode, None)
            }
            None => (GpuKind::Direct, DomainMode::Strict, dev.direct_bits()),
        };
        rec.line(&Line::Vm {
            name: "gpu".into(),
            va_size: Num(self.vm_ref.bounds().end()),
            gpu,
            domain,
            addr_bits,
        });
        let st = self.state.lock();
        let mut ids: Vec<&u64> = st.mems.keys().collect();
        ids.sort();
        for id in ids {
            let ms = &st.mems[id];
            rec.memory(*id, ms.bo, ms.size, &ms.owned);
        }
        let mut ops = Vec::new();
        for p in st.pieces.values() {
            push_maps(&mut ops, &p.va);
        }
        rec.submission(0, &ops, &[], None);
        drop(st);
        *self.recorder.lock() = Some(rec);
        Ok(())
    }

    /// Ends a recording ([`Runtime::record_to`]) and flushes the file.
    ///
    /// # Errors
    /// [`RuntimeError::Io`] with the first write error of the recording; also when none was
    /// going on.
    pub fn stop_recording(&self) -> Result<(), RuntimeError> {
        let Some(mut rec) = self.recorder.lock().take() else {
            return Err(RuntimeError::Io { path: String::new(), why: "no recording is going on".into() });
        };
        if rec.error.is_none()
            && let Err(e) = rec.out.flush()
        {
            rec.error = Some(e.to_string());
        }
        match rec.error {
            Some(why) => Err(RuntimeError::Io { path: rec.path, why }),
            None => Ok(()),
        }
    }

    /// Records a submission, when recording.
    pub(super) fn record_submission(
        &self,
        stream: usize,
        ops: &[BindOp],
        waits: &[Fence],
        fence: Option<&Fence>,
    ) {
        if let Some(r) = self.recorder.lock().as_mut() {
            r.submission(stream, ops, waits, fence);
        }
    }

    /// Records a new memory, when recording.
    pub(super) fn record_memory(&self, id: u64, bo: BoId, size: u64, owned: &Owned) {
        if let Some(r) = self.recorder.lock().as_mut() {
            r.memory(id, bo, size, owned);
        }
    }

    /// Records a freed memory, when recording.
    pub(super) fn record_free(&self, bo: BoId) {
        if let Some(r) = self.recorder.lock().as_mut() {
            r.free(bo);
        }
    }
}
