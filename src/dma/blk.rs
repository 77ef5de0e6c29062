//! Block requests mapped the way Linux's `blk_rq_dma_map_iter_start` does: one IOVA range and
//! one segment when the joins allow it, segment by segment otherwise.
#![forbid(unsafe_code)]

use super::{Attrs, Device, Direction, DmaError, DmaVec, GRANULE, IovaState, MapKind};
use crate::mem::BioVec;

impl Device {
    /// Maps a block request's `bio_vec` array the way Linux's `blk_rq_dma_map_iter_start`
    /// does: when every join between segments falls on a granule boundary and
    /// [`IovaState::try_alloc`] succeeds, the whole request is linked at running offsets in one
    /// call, synced once, and handed to the driver as ONE segment; otherwise (a direct device,
    /// or an unaligned join) each segment is mapped on its own.
    ///
    /// # Errors
    /// The errors of the two-step API or of [`Device::map_phys`]; nothing stays mapped.
    pub fn blk_rq_map(
        &self,
        bvecs: &[BioVec],
        dir: Direction,
        attrs: Attrs,
    ) -> Result<BlkRqMapping, DmaError> {
        if bvecs.is_empty() {
            return Err(DmaError::ZeroSize);
        }
        let joins_aligned = bvecs.windows(2).all(|w| {
            w[0].end().is_some_and(|e| e.as_u64() % GRANULE == 0)
                && w[1].start().is_some_and(|s| s.as_u64() % GRANULE == 0)
        });
        let total = bvecs.iter().try_fold(0u64, |a, b| a.checked_add(u64::from(b.len)));
        let total = total.ok_or(DmaError::Overflow { phys: bvecs[0].phys, size: u64::MAX })?;
        let first = bvecs[0].start().ok_or(DmaError::Overflow { phys: bvecs[0].phys, size: total })?;
        if joins_aligned
            && !attrs.mmio
            && let Some(mut state) = IovaState::try_alloc(self, first, total)?
        {
            state.link_bvecs(self, 0, bvecs, dir, attrs)?;
            state.sync(self, 0, total)?;
            let segments = DmaVec::from_segment(state.addr(), total)?;
            return Ok(BlkRqMapping { segments, state: Some(state), len: total });
        }
        let segments = self.map_each(bvecs, dir, attrs, MapKind::Single)?;
        Ok(BlkRqMapping { segments, state: None, len: total })
    }

    /// Undoes [`Device::blk_rq_map`] (`blk_rq_dma_unmap`).
    ///
    /// # Errors
    /// The errors of [`IovaState::destroy`] or [`Device::unmap`].
    pub fn blk_rq_unmap(&self, m: BlkRqMapping, dir: Direction, attrs: Attrs) -> Result<(), DmaError> {
        match m.state {
            Some(mut state) => state.destroy(self, m.len, dir, attrs),
            None => {
                for &(d, n) in &m.segments.pieces {
                    self.unmap_one(d, n, dir, attrs, MapKind::Single)?;
                }
                Ok(())
            }
        }
    }
}

/// A block request mapped by [`Device::blk_rq_map`].
#[derive(Debug)]
#[must_use = "a mapped request must be unmapped with Device::blk_rq_unmap"]
pub struct BlkRqMapping {
    segments: DmaVec,
    state: Option<IovaState>,
    len: u64,
}

impl BlkRqMapping {
    /// The DMA segments to program into the device (one on the IOVA path).
    #[must_use]
    pub fn segments(&self) -> &DmaVec {
        &self.segments
    }

    /// Whether the request took the two-step IOVA path.
    #[must_use]
    pub fn uses_iova(&self) -> bool {
        self.state.is_some()
    }
}
