//! Device-side access: how a device's reads and writes are translated and checked — the IOTLB
//! hit path, the lock-free fill on a miss, the locked fill that decides faults — and
//! [`DevicePort`], a device's access handle.
#![forbid(unsafe_code)]

use super::fault::{Access, DmaFault, FaultReason};
use super::{DEV_IDENTITY, DEV_REGISTERED, DeviceId, Domain, DomainId, Iommu, attached_domain, iotlb};
use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::mem::Words;
use crate::pt::{PageTable, Prot, X86Iommu};
use crate::sync::atomic::{AtomicU64, Ordering, fence};

impl Iommu {
    pub(super) fn fault(&self, d: Option<&Domain>, f: DmaFault) -> DmaFault {
        match d {
            Some(d) => d.faults.record(f),
            None => self.inner.faults.record(f),
        }
        f
    }

    /// The IOTLB-hit fast path (see [`DevicePort::hit`]).
    #[inline(always)]
    fn iotlb_hit(&self, dev: DeviceId, a: u64, need: u8) -> Option<u64> {
        self.port(dev).hit(a, need)
    }

    /// Translates one device access to a page: the physical address of `iova`, checked for
    /// `access`, through the IOTLB and, on a miss, a table walk that fills it.
    #[inline]
    fn resolve(&self, dev: DeviceId, iova: DmaAddr, access: Access) -> Result<PhysAddr, DmaFault> {
        let need = match access {
            Access::Read => Prot::READ,
            Access::Write => Prot::WRITE,
        };
        match self.iotlb_hit(dev, iova.as_u64(), need.bits()) {
            Some(pa) => Ok(PhysAddr::new(pa)),
            None => self.resolve_cold(dev, iova, access, need),
        }
    }

    #[cold]
    #[inline(never)]
    fn resolve_cold(
        &self,
        dev: DeviceId,
        iova: DmaAddr,
        access: Access,
        need: Prot,
    ) -> Result<PhysAddr, DmaFault> {
        let v = self.inner.devices[usize::from(dev.0)].load(Ordering::Acquire);
        let Some(id) = self.attachment(v, dev, iova, access)? else {
            return Ok(PhysAddr::new(iova.as_u64()));
        };
        if let Some(pa) = self.fill_unlocked(dev, v, id, iova.as_u64(), need) {
            return Ok(pa);
        }
        self.resolve_slow(dev, iova, access, need)
    }

    /// What device word `v` says for an access: the translated domain to walk, `None` for an
    /// identity domain (IOVA = physical address), or the fault (logged) for an unknown or
    /// detached device.
    fn attachment(
        &self,
        v: u64,
        dev: DeviceId,
        iova: DmaAddr,
        access: Access,
    ) -> Result<Option<DomainId>, DmaFault> {
        let reason = if v & DEV_REGISTERED == 0 {
            FaultReason::UnknownDevice
        } else if attached_domain(v) == 0 {
            FaultReason::NotAttached
        } else if v & DEV_IDENTITY != 0 {
            return Ok(None);
        } else {
            return Ok(Some(attached_domain(v)));
        };
        Err(self.fault(None, DmaFault { device: dev, iova, access, reason }))
    }

    /// An IOTLB miss without a lock (see the `iotlb` module): reserve the slot, walk from the
    /// domain's root, commit. `Some` only for a permitted access whose translation committed
    /// while the device stayed attached as `word` says; anything else (a fault, a lost race, a
    /// page the IOTLB cannot hold) goes the locked way, which decides it and records faults.
    #[inline]
    pub(super) fn fill_unlocked(
        &self,
        dev: DeviceId,
        word: u64,
        id: DomainId,
        a: u64,
        need: Prot,
    ) -> Option<PhysAddr> {
        let iotlb = &self.inner.iotlb;
        let r = iotlb.reserve(id, DmaAddr::new(a))?;
        let root = self.inner.roots[usize::from(id)].load(Ordering::Acquire);
        let t = (root != 0)
            .then(|| {
                PageTable::<X86Iommu>::translate_in(&self.inner.mem, PhysAddr::new(root), DmaAddr::new(a))
            })
            .flatten()
            .filter(|t| t.prot.contains(need));
        let Some(t) = t else {
            iotlb.cancel(r);
            return None;
        };
        let page = t.pa.as_u64() & !(PAGE_SIZE - 1);
        let valid = iotlb.commit(r, PhysAddr::new(page), t.prot);
        (valid && self.inner.devices[usize::from(dev.0)].load(Ordering::Acquire) == word).then_some(t.pa)
    }

    fn resolve_slow(
        &self,
        dev: DeviceId,
        iova: DmaAddr,
        access: Access,
        need: Prot,
    ) -> Result<PhysAddr, DmaFault> {
        let fault = |reason| DmaFault { device: dev, iova, access, reason };
        let domains = self.inner.domains.read();
        // The attachment is read again under the registry lock: attach and detach hold it shared
        // and destroy exclusive, so the domain found under the id the word names now is the one
        // the device is attached to, not a successor that took a destroyed domain's id.
        let v = self.inner.devices[usize::from(dev.0)].load(Ordering::Acquire);
        let Some(id) = self.attachment(v, dev, iova, access)? else {
            return Ok(PhysAddr::new(iova.as_u64()));
        };
        let Some(d) = domains.get(usize::from(id) - 1).and_then(Option::as_deref) else {
            drop(domains);
            return Err(self.fault(None, fault(FaultReason::NotAttached)));
        };
        let a = iova.as_u64();
        if a < d.aperture.0 || a >= d.aperture.1 {
            return Err(self.fault(Some(d), fault(FaultReason::OutsideAperture)));
        }
        let Some(table) = &d.table else {
            return Ok(PhysAddr::new(a));
        };
        let walk = d.inv_lock.read();
        let Some(t) = table.translate(iova) else {
            drop(walk);
            return Err(self.fault(Some(d), fault(FaultReason::NotMapped)));
        };
        self.inner.iotlb.insert(id, iova, t.pa, t.prot);
        drop(walk);
        if !t.prot.contains(need) {
            return Err(self.fault(Some(d), fault(FaultReason::NotPermitted { prot: t.prot })));
        }
        Ok(t.pa)
    }

    fn bus_check(
        &self,
        dev: DeviceId,
        iova: DmaAddr,
        access: Access,
        pa: PhysAddr,
        len: u64,
    ) -> Result<(), DmaFault> {
        match pa.as_u64().checked_add(len) {
            Some(e) if e <= self.inner.mem.size() => Ok(()),
            _ => Err(self.bus_fault(dev, iova, access, pa)),
        }
    }

    #[cold]
    fn bus_fault(&self, dev: DeviceId, iova: DmaAddr, access: Access, pa: PhysAddr) -> DmaFault {
        let id = self.device(dev).and_then(|i| i.domain).and_then(|id| self.domain_by_id(id));
        let f = DmaFault { device: dev, iova, access, reason: FaultReason::BusError { pa } };
        self.fault(id.as_deref(), f)
    }

    /// Translates every page of `[iova, iova + len)` first; returns (pa, chunk length) pieces.
    fn resolve_range(
        &self,
        dev: DeviceId,
        iova: DmaAddr,
        len: usize,
        access: Access,
    ) -> Result<Vec<(PhysAddr, usize)>, DmaFault> {
        let mut out = Vec::with_capacity(len / PAGE_SIZE as usize + 2);
        let mut at = iova.as_u64();
        let mut left = len as u64;
        while left > 0 {
            let n = (PAGE_SIZE - (at & (PAGE_SIZE - 1))).min(left);
            let va = DmaAddr::new(at);
            let pa = self.resolve(dev, va, access)?;
            self.bus_check(dev, va, access, pa, n)?;
            out.push((pa, n as usize));
            at = at.checked_add(n).ok_or_else(|| {
                let f = DmaFault { device: dev, iova: va, access, reason: FaultReason::OutsideAperture };
                self.fault(None, f)
            })?;
            left -= n;
        }
        Ok(out)
    }

    /// Whether device `dev` may make `access` over `[iova, iova + len)`: every page translated
    /// and checked as a real access would be, faults logged alike, no byte moved.
    pub(crate) fn dma_check(
        &self,
        dev: DeviceId,
        iova: DmaAddr,
        len: usize,
        access: Access,
    ) -> Result<(), DmaFault> {
        self.resolve_range(dev, iova, len, access).map(|_| ())
    }

    /// The device `dev` reads `buf.len()` bytes at `iova`. All pages are translated and
    /// checked before any byte is read.
    ///
    /// # Errors
    /// The first [`DmaFault`] (also appended to the fault log); `buf` is untouched then.
    pub fn dma_read(&self, dev: DeviceId, iova: DmaAddr, buf: &mut [u8]) -> Result<(), DmaFault> {
        let pieces = self.resolve_range(dev, iova, buf.len(), Access::Read)?;
        let mut at = 0;
        for (pa, n) in pieces {
            // Cannot fail: bus_check ran for each piece.
            let _ = self.inner.mem.read(pa, &mut buf[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// The device `dev` writes `data` at `iova`. All pages are translated and checked before
    /// any byte is written.
    ///
    /// # Errors
    /// The first [`DmaFault`] (also appended to the fault log); memory is untouched then.
    pub fn dma_write(&self, dev: DeviceId, iova: DmaAddr, data: &[u8]) -> Result<(), DmaFault> {
        let pieces = self.resolve_range(dev, iova, data.len(), Access::Write)?;
        let mut at = 0;
        for (pa, n) in pieces {
            let _ = self.inner.mem.write(pa, &data[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// A handle for device `dev`'s repeated accesses, with the IOMMU structures they go through
    /// resolved once — what a device's DMA engine with its context loaded does. Every access
    /// still reads the device's attachment, so attach and detach take effect at once.
    #[must_use]
    pub fn port(&self, dev: DeviceId) -> DevicePort<'_> {
        DevicePort {
            iommu: self,
            dev,
            word: &self.inner.devices[usize::from(dev.0)],
            entries: self.inner.iotlb.entries(),
            words: self.inner.mem.words(),
        }
    }

    /// The device loads a 64-bit little-endian value at `iova`.
    ///
    /// # Errors
    /// [`DmaFault`], also logged.
    #[inline(always)]
    pub fn dma_read_u64(&self, dev: DeviceId, iova: DmaAddr) -> Result<u64, DmaFault> {
        self.port(dev).read_u64(iova)
    }

    /// [`DevicePort::read_u64`] after its IOTLB probe missed (or hit without read permission),
    /// with the device word that probe loaded: decode the attachment, fill without a lock, read;
    /// anything the lock-free fill cannot settle goes the locked way. The probe is not repeated.
    #[inline(never)]
    fn read_u64_miss(&self, dev: DeviceId, word: u64, iova: DmaAddr) -> Result<u64, DmaFault> {
        // Makes the probe's relaxed load of the device word an acquire load: what the attach
        // that wrote it published (the domain's root) is visible below.
        fence(Ordering::Acquire);
        let pa = match self.attachment(word, dev, iova, Access::Read)? {
            None => iova.as_u64(),
            Some(id) => match self.fill_unlocked(dev, word, id, iova.as_u64(), Prot::READ) {
                Some(pa) => pa.as_u64(),
                None => self.resolve_slow(dev, iova, Access::Read, Prot::READ)?.as_u64(),
            },
        };
        match self.inner.mem.read_u64(PhysAddr::new(pa)) {
            Ok(v) => Ok(v),
            Err(_) => Err(self.bus_fault(dev, iova, Access::Read, PhysAddr::new(pa))),
        }
    }

    /// The misses of one [`DevicePort::gather_u64`] chunk (indices into `iovas`), resolved
    /// together: the device's attachment decoded once, the registry and the domain's
    /// invalidation lock taken shared once, then every walk and fill in a row, so the walks'
    /// cache misses overlap instead of each waiting behind its own fence. `Some(i)`: the first
    /// miss this could not settle (a fault, a page the IOTLB cannot hold, a changed attachment);
    /// those before it are read into `out`.
    #[inline(never)]
    fn gather_misses(
        &self,
        dev: DeviceId,
        word: u64,
        iovas: &[DmaAddr],
        misses: &[u16],
        out: &mut [u64],
    ) -> Option<usize> {
        // Upgrades the probes' relaxed loads of the device word, as in `read_u64_miss`.
        fence(Ordering::Acquire);
        let first = usize::from(*misses.first()?);
        // Only a translated domain is batched; the general path decides (and logs) the rest.
        let id = attached_domain(word);
        if word & DEV_REGISTERED == 0 || id == 0 || word & DEV_IDENTITY != 0 {
            return Some(first);
        }
        let domains = self.inner.domains.read();
        // Read again under the registry lock (see `resolve_slow`).
        if self.inner.devices[usize::from(dev.0)].load(Ordering::Acquire) != word {
            return Some(first);
        }
        let Some(d) = domains.get(usize::from(id) - 1).and_then(Option::as_deref) else {
            return Some(first);
        };
        let Some(table) = &d.table else {
            return Some(first);
        };
        let words = self.inner.mem.words();
        let iotlb = &self.inner.iotlb;
        let _walks = d.inv_lock.read();
        for &i in misses {
            let i = usize::from(i);
            let a = iovas[i];
            if a.as_u64() < d.aperture.0 || a.as_u64() >= d.aperture.1 {
                return Some(i);
            }
            let Some(t) = table.translate(a).filter(|t| t.prot.contains(Prot::READ)) else {
                return Some(i);
            };
            let Some(v) = words.load(t.pa) else {
                return Some(i);
            };
            iotlb.insert(id, a, t.pa, t.prot);
            out[i] = v;
        }
        None
    }

    #[inline(never)]
    fn dma_read_u64_slow(&self, dev: DeviceId, iova: DmaAddr) -> Result<u64, DmaFault> {
        if iova.as_u64() & (PAGE_SIZE - 1) > PAGE_SIZE - 8 {
            let mut b = [0u8; 8];
            self.dma_read(dev, iova, &mut b)?;
            return Ok(u64::from_le_bytes(b));
        }
        let pa = self.resolve(dev, iova, Access::Read)?;
        match self.inner.mem.read_u64(pa) {
            Ok(v) => Ok(v),
            Err(_) => Err(self.bus_fault(dev, iova, Access::Read, pa)),
        }
    }

    /// The device stores a 64-bit little-endian value at `iova`.
    ///
    /// # Errors
    /// [`DmaFault`], also logged.
    #[inline]
    pub fn dma_write_u64(&self, dev: DeviceId, iova: DmaAddr, v: u64) -> Result<(), DmaFault> {
        if iova.as_u64() & (PAGE_SIZE - 1) > PAGE_SIZE - 8 {
            return self.dma_write(dev, iova, &v.to_le_bytes());
        }
        let pa = self.resolve(dev, iova, Access::Write)?;
        self.bus_check(dev, iova, Access::Write, pa, 8)?;
        let _ = self.inner.mem.write_u64(pa, v);
        Ok(())
    }
}

/// Why a [`DevicePort::gather_u64`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GatherError {
    /// The output slice is not as long as the address list.
    #[error("gather of {iovas} addresses into {out} output words: the lengths must match")]
    LengthMismatch {
        /// Addresses given.
        iovas: usize,
        /// Output words given.
        out: usize,
    },
    /// A read faulted (and was logged); the reads before it completed.
    #[error("{0}")]
    Fault(DmaFault),
}

/// A device's access handle from [`Iommu::port`]: the same accesses as the `Iommu::dma_*`
/// methods, with the device's slot, the IOTLB and the arena resolved once.
#[derive(Clone, Copy)]
pub struct DevicePort<'a> {
    iommu: &'a Iommu,
    dev: DeviceId,
    word: &'a AtomicU64,
    entries: &'a iotlb::Entries,
    words: Words<'a>,
}

impl core::fmt::Debug for DevicePort<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DevicePort").field("device", &self.dev).finish()
    }
}

impl DevicePort<'_> {
    /// The device.
    #[must_use]
    pub fn device(&self) -> DeviceId {
        self.dev
    }

    /// [`Iommu::dma_read_u64`] through the handle.
    ///
    /// # Errors
    /// [`DmaFault`], also logged.
    #[inline(always)]
    pub fn read_u64(&self, iova: DmaAddr) -> Result<u64, DmaFault> {
        let a = iova.as_u64();
        if a & (PAGE_SIZE - 1) > PAGE_SIZE - 8 {
            return self.iommu.dma_read_u64_slow(self.dev, iova);
        }
        // Relaxed is enough for the hit: a detach or an invalidation that happens before this
        // access is visible to it by coherence, and a hit publishes nothing. The miss path
        // upgrades this very load with an acquire fence instead of loading the word again.
        let word = self.word.load(Ordering::Relaxed);
        if let Some(pa) = self.hit_with(word, a, Prot::READ.bits()) {
            // A hit whose word the fast load refuses (unaligned, at the arena's end) takes the
            // general read, not a refill of an entry that is valid.
            return match self.words.load(PhysAddr::new(pa)) {
                Some(v) => Ok(v),
                None => self.iommu.dma_read_u64_slow(self.dev, iova),
            };
        }
        self.iommu.read_u64_miss(self.dev, word, iova)
    }

    /// Reads the 64-bit little-endian value at each of `iovas` into `out` (same length): a
    /// device's gather, as a DMA engine walks a descriptor list. Each read is translated and
    /// checked exactly as [`DevicePort::read_u64`] would; what differs is how IOTLB misses are
    /// served. They are collected per chunk of 64 addresses and filled together under the
    /// domain's invalidation lock, taken shared once per chunk (the locked fill of the `iotlb`
    /// module, whose invalidations hold that lock exclusively), so that the table walks of many
    /// misses overlap, as the several page walkers of a hardware IOMMU do.
    ///
    /// # Errors
    /// [`GatherError::LengthMismatch`] when `out` is not as long as `iovas` (nothing is read);
    /// [`GatherError::Fault`] with the first address, in order, whose read faults (the fault is
    /// also logged): the values of the addresses before it are in `out`, those after it may or
    /// may not have been read.
    pub fn gather_u64(&self, iovas: &[DmaAddr], out: &mut [u64]) -> Result<(), GatherError> {
        const CHUNK: usize = 64;
        if iovas.len() != out.len() {
            return Err(GatherError::LengthMismatch { iovas: iovas.len(), out: out.len() });
        }
        for (iv, ov) in iovas.chunks(CHUNK).zip(out.chunks_mut(CHUNK)) {
            let mut misses = [0u16; CHUNK];
            let mut n = 0;
            let word = self.word.load(Ordering::Relaxed);
            for (i, (&iova, o)) in iv.iter().zip(ov.iter_mut()).enumerate() {
                // A word the fast load refuses (unaligned, crossing a page) is settled below.
                match self
                    .hit_with(word, iova.as_u64(), Prot::READ.bits())
                    .and_then(|pa| self.words.load(PhysAddr::new(pa)))
                {
                    Some(v) => *o = v,
                    None => {
                        misses[n] = i as u16;
                        n += 1;
                    }
                }
            }
            if n == 0 {
                continue;
            }
            let misses = &misses[..n];
            // What the batch could not settle goes one by one the general way, which decides
            // faults and logs them.
            if let Some(j) = self.iommu.gather_misses(self.dev, word, iv, misses, ov) {
                for &i in misses.iter().skip_while(|&&i| usize::from(i) < j) {
                    let i = usize::from(i);
                    ov[i] = self.read_u64(iv[i]).map_err(GatherError::Fault)?;
                }
            }
        }
        Ok(())
    }

    /// The IOTLB-hit fast path: the physical address of `a` when the device is attached to a
    /// translated domain and a cached entry allows `need` (1 read, 2 write); `None` sends the
    /// caller to the full path, which decides everything else.
    #[inline(always)]
    fn hit(&self, a: u64, need: u8) -> Option<u64> {
        // Relaxed is enough: a detach or an invalidation that happens before this access is
        // visible to it by coherence, and a hit publishes nothing.
        self.hit_with(self.word.load(Ordering::Relaxed), a, need)
    }

    /// [`DevicePort::hit`] with the device word already loaded.
    #[inline(always)]
    fn hit_with(&self, word: u64, a: u64, need: u8) -> Option<u64> {
        let (page, prot) = iotlb::lookup_key(self.entries, word, a)?;
        (prot & need != 0).then_some(page | (a & (PAGE_SIZE - 1)))
    }

    /// [`Iommu::dma_write_u64`] through the handle.
    ///
    /// # Errors
    /// [`DmaFault`], also logged.
    pub fn write_u64(&self, iova: DmaAddr, v: u64) -> Result<(), DmaFault> {
        self.iommu.dma_write_u64(self.dev, iova, v)
    }

    /// [`Iommu::dma_read`] through the handle.
    ///
    /// # Errors
    /// [`DmaFault`], also logged; `buf` is untouched then.
    pub fn read(&self, iova: DmaAddr, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.iommu.dma_read(self.dev, iova, buf)
    }

    /// [`Iommu::dma_write`] through the handle.
    ///
    /// # Errors
    /// [`DmaFault`], also logged; memory is untouched then.
    pub fn write(&self, iova: DmaAddr, data: &[u8]) -> Result<(), DmaFault> {
        self.iommu.dma_write(self.dev, iova, data)
    }
}
