//! The mapping verbs: map (plain, sparse, repeat), unmap of any sub-range, access changes,
//! blocking or on a stream, with the cross-stream ordering the module docs describe.
#![forbid(unsafe_code)]

use super::{Access, Memory, Piece, Runtime, RuntimeError, State, Stream, visible};
use crate::gpuvm::{BindOp, GPU_PAGE, Va};
use crate::service::{BindQueue, Fence, FenceError};

impl Runtime {
    /// Checks that `[va, va + len)` lies in one reservation and is page aligned.
    fn check_reserved(st: &State, va: u64, len: u64) -> Result<u64, RuntimeError> {
        if len == 0 {
            return Err(RuntimeError::Zero { what: "length" });
        }
        Self::aligned("address", va, GPU_PAGE)?;
        Self::aligned("length", len, GPU_PAGE)?;
        let end = va.checked_add(len).ok_or(RuntimeError::NotReserved { addr: va, len })?;
        match st.reserved.range(..=va).next_back() {
            Some((_, &e)) if e >= end => Ok(end),
            _ => Err(RuntimeError::NotReserved { addr: va, len }),
        }
    }

    /// The in-fences an op on `stream` over `[va, end)` needs: the pending ops of other
    /// streams on those addresses.
    ///
    /// While recording (`keep_done`), fences that are already complete are kept too: the
    /// order they gave must hold in the replay, where they may not be complete yet.
    fn deps(st: &mut State, va: u64, end: u64, stream: usize, keep_done: bool) -> Vec<Fence> {
        let mut waits: Vec<Fence> = Vec::new();
        for p in Self::overlapping(&st.pieces, va, end) {
            if let Some((f, s)) = &p.fence
                && *s != stream
                && (keep_done || !f.is_done())
            {
                waits.push(f.clone());
            }
        }
        if !keep_done {
            st.unmapping.retain(|_, (_, f, _)| !f.is_done());
        }
        for (_, (e, f, s)) in st.unmapping.range(..(end, 0)) {
            if *e > va && *s != stream {
                waits.push(f.clone());
            }
        }
        waits
    }

    /// Maps `[va, va + len)` to `[offset, offset + len)` of `memory` with `access`, blocking
    /// until the GPU sees it (map and access in one op).
    ///
    /// # Errors
    /// [`RuntimeError::Zero`], [`RuntimeError::Misaligned`], [`RuntimeError::NotReserved`],
    /// [`RuntimeError::AlreadyMapped`], [`RuntimeError::Released`],
    /// [`RuntimeError::NoSuchMemory`], [`RuntimeError::BeyondMemory`],
    /// [`RuntimeError::Service`] (no memory for the tables; nothing changed).
    pub fn map(
        &self,
        va: u64,
        memory: &Memory,
        offset: u64,
        len: u64,
        access: Access,
    ) -> Result<(), RuntimeError> {
        self.map_any(None, va, len, Some((memory, offset, None)), access).map(drop)
    }

    /// [`Runtime::map`] on `stream`, returning the fence that signals when the mapping is
    /// visible.
    ///
    /// # Errors
    /// As [`Runtime::map`], at the call.
    pub fn map_async(
        &self,
        stream: &Stream,
        va: u64,
        memory: &Memory,
        offset: u64,
        len: u64,
        access: Access,
    ) -> Result<Fence, RuntimeError> {
        self.map_any(Some(stream), va, len, Some((memory, offset, None)), access).map(visible)
    }

    /// Maps `[va, va + len)` sparse: reads return zeros, writes are dropped (Vulkan's
    /// `residencyNonResidentStrict`), blocking.
    ///
    /// # Errors
    /// As [`Runtime::map`] for the range.
    pub fn map_sparse(&self, va: u64, len: u64) -> Result<(), RuntimeError> {
        self.map_any(None, va, len, None, Access::ReadWrite).map(drop)
    }

    /// [`Runtime::map_sparse`] on `stream`.
    ///
    /// # Errors
    /// As [`Runtime::map_sparse`], at the call.
    pub fn map_sparse_async(&self, stream: &Stream, va: u64, len: u64) -> Result<Fence, RuntimeError> {
        self.map_any(Some(stream), va, len, None, Access::ReadWrite).map(visible)
    }

    /// Maps `[offset, offset + period)` of `memory` repeated across `[va, va + len)` (one op,
    /// however many periods), blocking.
    ///
    /// # Errors
    /// As [`Runtime::map`], and [`RuntimeError::BadPeriod`] when `period` does not divide
    /// `len`.
    pub fn map_repeat(
        &self,
        va: u64,
        len: u64,
        memory: &Memory,
        offset: u64,
        period: u64,
        access: Access,
    ) -> Result<(), RuntimeError> {
        self.map_any(None, va, len, Some((memory, offset, Some(period))), access).map(drop)
    }

    /// [`Runtime::map_repeat`] on `stream`.
    ///
    /// # Errors
    /// As [`Runtime::map_repeat`], at the call.
    #[allow(clippy::too_many_arguments)]
    pub fn map_repeat_async(
        &self,
        stream: &Stream,
        va: u64,
        len: u64,
        memory: &Memory,
        offset: u64,
        period: u64,
        access: Access,
    ) -> Result<Fence, RuntimeError> {
        self.map_any(Some(stream), va, len, Some((memory, offset, Some(period))), access).map(visible)
    }

    /// Every map verb: checks, the op, the bookkeeping. `Ok(None)` when blocking.
    fn map_any(
        &self,
        stream: Option<&Stream>,
        va: u64,
        len: u64,
        backing: Option<(&Memory, u64, Option<u64>)>,
        access: Access,
    ) -> Result<Option<Fence>, RuntimeError> {
        self.reap();
        let mut st = self.state.lock();
        let end = Self::check_reserved(&st, va, len)?;
        if let Some(p) = Self::overlapping(&st.pieces, va, end).next() {
            return Err(RuntimeError::AlreadyMapped { addr: p.va.addr.max(va) });
        }
        let (req, mem) = match backing {
            None => (Va::sparse(va, len).with_flags(access.flags()), None),
            Some((m, offset, period)) => {
                let ms = match st.mems.get(&m.id) {
                    Some(ms) => ms,
                    None if st.freed.contains(&m.id) => return Err(RuntimeError::Released { memory: m.id }),
                    None => return Err(RuntimeError::NoSuchMemory { memory: m.id }),
                };
                if ms.released {
                    return Err(RuntimeError::Released { memory: m.id });
                }
                Self::aligned("offset", offset, GPU_PAGE)?;
                let reach = match period {
                    None => len,
                    Some(p) => {
                        if p == 0 {
                            return Err(RuntimeError::Zero { what: "period" });
                        }
                        Self::aligned("period", p, GPU_PAGE)?;
                        if !len.is_multiple_of(p) {
                            return Err(RuntimeError::BadPeriod { period: p, len });
                        }
                        p
                    }
                };
                if offset.checked_add(reach).is_none_or(|e| e > ms.size) {
                    return Err(RuntimeError::BeyondMemory { offset, len: reach, size: ms.size });
                }
                let mut v = Va::object(va, len, ms.bo, offset).with_flags(access.flags());
                if let Some(p) = period {
                    v = v.repeating(p);
                }
                (v, Some(m.id))
            }
        };
        let op = BindOp::Map(req.clone());
        let fence = self.run(&mut st, stream, va, end, vec![op])?;
        if let Some(id) = mem {
            st.mems.get_mut(&id).expect("checked").mappings += 1;
        }
        let tag = fence.clone().map(|f| (f, stream.map_or(0, |s| s.index)));
        st.pieces.insert(va, Piece { va: req, mem, fence: tag });
        Ok(fence)
    }

    /// Runs `ops` over `[va, end)`: blocking (`stream: None`, the state lock held so no other
    /// verb interleaves) or submitted on `stream` behind its cross-stream dependencies.
    fn run(
        &self,
        st: &mut State,
        stream: Option<&Stream>,
        va: u64,
        end: u64,
        ops: Vec<BindOp>,
    ) -> Result<Option<Fence>, RuntimeError> {
        if stream.is_some_and(|s| s.owner != self.id) {
            return Err(RuntimeError::ForeignStream);
        }
        match stream {
            None => {
                let recording = self.recorder.lock().is_some();
                let waits = Self::deps(st, va, end, 0, recording);
                for w in &waits {
                    if let Err(FenceError::Failed { err, .. }) = w.wait_forever() {
                        return Err(RuntimeError::Service(err));
                    }
                }
                let q = self.streams.lock()[0].clone();
                q.bind(&ops)?;
                self.record_submission(0, &ops, &waits, None);
                Ok(None)
            }
            Some(s) => {
                let recording = self.recorder.lock().is_some();
                let waits = Self::deps(st, va, end, s.index, recording);
                let kept = if recording { ops.clone() } else { Vec::new() };
                let fence = s.queue.submit(ops, &waits, &[])?;
                if recording {
                    self.record_submission(s.index, &kept, &waits, Some(&fence));
                }
                Ok(Some(fence))
            }
        }
    }

    /// Unmaps `[va, va + len)`, any page-aligned sub-range of what is mapped, blocking.
    /// Memories whose last mapping this was and that were released are freed.
    ///
    /// # Errors
    /// [`RuntimeError::Zero`], [`RuntimeError::Misaligned`], [`RuntimeError::NotReserved`],
    /// [`RuntimeError::NotMapped`] for any hole in the range (a double unmap).
    pub fn unmap(&self, va: u64, len: u64) -> Result<(), RuntimeError> {
        self.unmap_any(None, va, len).map(drop)
    }

    /// [`Runtime::unmap`] on `stream`.
    ///
    /// # Errors
    /// As [`Runtime::unmap`], at the call.
    pub fn unmap_async(&self, stream: &Stream, va: u64, len: u64) -> Result<Fence, RuntimeError> {
        self.unmap_any(Some(stream), va, len).map(visible)
    }

    /// The pieces covering `[va, end)` with no hole, or the first hole.
    fn covering(st: &State, va: u64, end: u64) -> Result<Vec<u64>, RuntimeError> {
        let mut at = va;
        let mut keys = Vec::new();
        for p in Self::overlapping(&st.pieces, va, end) {
            if p.va.addr > at {
                return Err(RuntimeError::NotMapped { addr: at });
            }
            keys.push(p.va.addr);
            at = p.va.end();
        }
        if at < end {
            return Err(RuntimeError::NotMapped { addr: at });
        }
        Ok(keys)
    }

    fn unmap_any(&self, stream: Option<&Stream>, va: u64, len: u64) -> Result<Option<Fence>, RuntimeError> {
        self.reap();
        let mut st = self.state.lock();
        let end = Self::check_reserved(&st, va, len)?;
        let keys = Self::covering(&st, va, end)?;
        let fence = self.run(&mut st, stream, va, end, vec![BindOp::Unmap { addr: va, range: len }])?;
        let sidx = stream.map_or(0, |s| s.index);
        let mut freed = Vec::new();
        for k in keys {
            let p = st.pieces.remove(&k).expect("covering");
            let (a, e) = (p.va.addr, p.va.end());
            if a < va {
                st.pieces.insert(a, Piece { va: p.va.piece(a, va - a), ..p.clone() });
                if let Some(id) = p.mem {
                    st.mems.get_mut(&id).expect("mapped memory").mappings += 1;
                }
            }
            if e > end {
                st.pieces.insert(end, Piece { va: p.va.piece(end, e - end), ..p.clone() });
                if let Some(id) = p.mem {
                    st.mems.get_mut(&id).expect("mapped memory").mappings += 1;
                }
            }
            if let Some(id) = p.mem {
                let ms = st.mems.get_mut(&id).expect("mapped memory");
                ms.mappings -= 1;
                if ms.mappings == 0 {
                    ms.unmapped_by = fence.clone();
                    if ms.released {
                        freed.push((id, st.mems.remove(&id).expect("present")));
                    }
                }
            }
        }
        if let Some(f) = &fence {
            st.seq += 1;
            let seq = st.seq;
            st.unmapping.insert((va, seq), (end, f.clone(), sidx));
            for (id, ms) in freed {
                st.dying.push((id, ms, f.clone()));
            }
            return Ok(fence);
        }
        drop(st);
        for (id, ms) in freed {
            self.destroy(id, ms);
        }
        Ok(None)
    }

    /// Sets the access of `[va, va + len)`, every page of which must be mapped, blocking.
    ///
    /// # Errors
    /// As [`Runtime::unmap`] for the range.
    pub fn set_access(&self, va: u64, len: u64, access: Access) -> Result<(), RuntimeError> {
        self.set_access_any(None, va, len, access).map(|_| ())
    }

    /// [`Runtime::set_access`] on `stream`.
    ///
    /// # Errors
    /// As [`Runtime::set_access`], at the call.
    pub fn set_access_async(
        &self,
        stream: &Stream,
        va: u64,
        len: u64,
        access: Access,
    ) -> Result<Fence, RuntimeError> {
        self.set_access_any(Some(stream), va, len, access).map(visible)
    }

    fn set_access_any(
        &self,
        stream: Option<&Stream>,
        va: u64,
        len: u64,
        access: Access,
    ) -> Result<Option<Fence>, RuntimeError> {
        self.reap();
        let mut st = self.state.lock();
        let end = Self::check_reserved(&st, va, len)?;
        let keys = Self::covering(&st, va, end)?;
        // The covered part of each piece, remapped in place with the new flags.
        let mut ops = Vec::new();
        let mut parts = Vec::new();
        for &k in &keys {
            let p = &st.pieces[&k];
            let (a, e) = (p.va.addr.max(va), p.va.end().min(end));
            let v = p.va.piece(a, e - a).with_flags(access.flags());
            push_maps(&mut ops, &v);
            parts.push((k, v));
        }
        let fence = self.run(&mut st, stream, va, end, ops)?;
        let tag = fence.clone().map(|f| (f, stream.map_or(0, |s| s.index)));
        for (k, v) in parts {
            let p = st.pieces.remove(&k).expect("covering");
            let (a, e) = (p.va.addr, p.va.end());
            let add = |piece: Piece, st: &mut State| {
                if let Some(id) = piece.mem {
                    st.mems.get_mut(&id).expect("mapped memory").mappings += 1;
                }
                st.pieces.insert(piece.va.addr, piece);
            };
            if a < v.addr {
                add(Piece { va: p.va.piece(a, v.addr - a), ..p.clone() }, &mut st);
            }
            if e > v.end() {
                add(Piece { va: p.va.piece(v.end(), e - v.end()), ..p.clone() }, &mut st);
            }
            // The middle replaces the piece itself (same memory count).
            st.pieces.insert(v.addr, Piece { va: v, mem: p.mem, fence: tag.clone() });
        }
        Ok(fence)
    }

    /// Waits for every stream's work so far; frees memories whose last unmap it made visible.
    ///
    /// # Errors
    /// [`RuntimeError::Service`] with the first failure found.
    pub fn synchronize(&self) -> Result<(), RuntimeError> {
        let streams: Vec<BindQueue> = self.streams.lock().clone();
        let mut first = None;
        for q in streams {
            let f = q.submit(Vec::new(), &[], &[])?;
            if let Err(FenceError::Failed { err, .. }) = f.wait_forever() {
                first.get_or_insert(err);
            }
        }
        self.reap();
        first.map_or(Ok(()), |e| Err(RuntimeError::Service(e)))
    }

    /// Reads GPU memory at `va` through the VM's tables (the device's view).
    ///
    /// # Errors
    /// [`RuntimeError::Fault`] naming the address and the stage that refused it.
    pub fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), RuntimeError> {
        Ok(self.vm_ref.gpu_read(va, buf)?)
    }

    /// Writes GPU memory at `va` through the VM's tables.
    ///
    /// # Errors
    /// As [`Runtime::read`]; a write to a read-only mapping faults.
    pub fn write(&self, va: u64, data: &[u8]) -> Result<(), RuntimeError> {
        Ok(self.vm_ref.gpu_write(va, data)?)
    }
}

/// The map ops that give `[v.addr, v.end())` the mapping `v` describes: `v` itself, or, for a
/// piece of a repeat mapping that is not a whole number of periods (what a sub-range leaves),
/// one plain map per stretch of the repeated range it covers.
pub(crate) fn push_maps(ops: &mut Vec<BindOp>, v: &Va<crate::gpuvm::BoId>) {
    let Some(r) = v.repeat.filter(|r| r.len > 0 && !v.range.is_multiple_of(r.len)) else {
        ops.push(BindOp::Map(v.clone()));
        return;
    };
    let mut at = v.addr;
    while at < v.end() {
        let off = v.offset_at(at);
        let n = (v.end() - at).min(r.start + r.len - off);
        ops.push(BindOp::Map(Va { repeat: None, ..v.piece(at, n) }));
        at += n;
    }
}
