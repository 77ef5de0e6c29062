//! Faults: what a refused device access reports, and the bounded logs that keep them.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sync::{Mutex, Rank};

use super::DeviceId;
use crate::addr::{DmaAddr, PhysAddr};
use crate::pt::Prot;

/// Fault records kept per log before the oldest are dropped (and counted).
pub const FAULT_LOG_MAX: usize = 256;

/// A device access kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Device reads memory.
    Read,
    /// Device writes memory.
    Write,
}

/// Why a device access faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultReason {
    /// The device was never registered.
    UnknownDevice,
    /// The device is attached to no domain.
    NotAttached,
    /// Nothing is mapped at the IOVA.
    NotMapped,
    /// A mapping exists but does not allow the access.
    NotPermitted {
        /// What the mapping allows.
        prot: Prot,
    },
    /// The IOVA is outside the domain's aperture.
    OutsideAperture,
    /// The translation leads outside physical memory.
    BusError {
        /// The physical address reached.
        pa: PhysAddr,
    },
}

/// A device access that the IOMMU refused: the error of device-side calls and the record of
/// the fault logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("DMA fault: {device} {access:?} at {iova}: {reason:?}")]
pub struct DmaFault {
    /// Who accessed.
    pub device: DeviceId,
    /// The first faulting address.
    pub iova: DmaAddr,
    /// Read or write.
    pub access: Access,
    /// Why.
    pub reason: FaultReason,
}

/// A bounded ring of fault records that counts what it dropped.
#[derive(Debug)]
pub struct FaultLog {
    ring: Mutex<VecDeque<DmaFault>>,
    dropped: AtomicU64,
}

impl Default for FaultLog {
    fn default() -> Self {
        FaultLog { ring: Mutex::new(VecDeque::new(), Rank::Leaf), dropped: AtomicU64::new(0) }
    }
}

impl FaultLog {
    pub(super) fn record(&self, f: DmaFault) {
        let mut r = self.ring.lock();
        if r.len() == FAULT_LOG_MAX {
            r.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        r.push_back(f);
    }

    /// The records held, oldest first.
    #[must_use]
    pub fn records(&self) -> Vec<DmaFault> {
        self.ring.lock().iter().copied().collect()
    }

    /// Takes the records held, oldest first, leaving the ring empty.
    pub fn take(&self) -> Vec<DmaFault> {
        self.ring.lock().drain(..).collect()
    }

    /// Records dropped because the ring was full.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
