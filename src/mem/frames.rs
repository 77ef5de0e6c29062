//! The frame allocator behind [`super::PhysMem`]: a binary buddy allocator over 4 KiB frames,
//! orders 0 (4 KiB) to 18 (1 GiB).
//!
//! Metadata lives outside the arena (two bytes per frame), so a lazily committed arena stays
//! uncommitted until its frames are written. Free lists are stacks with lazy deletion: a merged
//! buddy's stale stack entry is dropped when popped, because the per-frame `free_order` byte is
//! the single source of truth. Stacks are compacted when stale entries outnumber live ones.
//!
//! Like Linux's per-CPU page lists, freed single frames first go to a "hot" list without merging
//! and are handed out again first: a page table that frees and re-creates its tables keeps
//! reusing frames that are already committed and cached, instead of touching fresh memory. The
//! hot list is drained into the buddy lists when it grows past [`HOT_MAX`] or when a larger block
//! cannot be found otherwise.
#![forbid(unsafe_code)]

/// Highest order: 2^18 frames = 1 GiB.
pub const MAX_ORDER: u8 = 18;

/// Most frames kept on the hot list before half of it is merged back.
pub const HOT_MAX: usize = 1024;

/// Why the frame allocator refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// No free block of the order (after counting the reserve).
    Exhausted,
    /// The frame does not head an allocated block of that order.
    NotAllocated,
}

#[derive(Debug)]
pub struct Buddy {
    nframes: u32,
    /// order + 1 when the frame heads a free block of that order, else 0.
    free_order: Vec<u8>,
    /// order + 1 when the frame heads an allocated block of that order, else 0.
    alloc_order: Vec<u8>,
    stacks: Vec<Vec<u32>>,
    live: Vec<u32>,
    hot: Vec<u32>,
    free_frames: u64,
    reserved: u64,
}

impl Buddy {
    /// An allocator over `nframes` frames; frame 0 is kept back forever (physical address 0 is
    /// never handed out).
    pub fn new(nframes: u32) -> Self {
        let n = nframes as usize;
        let mut b = Buddy {
            nframes,
            free_order: vec![0; n],
            alloc_order: vec![0; n],
            stacks: vec![Vec::new(); usize::from(MAX_ORDER) + 1],
            live: vec![0; usize::from(MAX_ORDER) + 1],
            hot: Vec::new(),
            free_frames: 0,
            reserved: 0,
        };
        if n > 0 {
            b.alloc_order[0] = 1;
        }
        let mut f: u64 = 1;
        while f < u64::from(nframes) {
            let mut order = (f.trailing_zeros().min(u32::from(MAX_ORDER))) as u8;
            while f + (1u64 << order) > u64::from(nframes) {
                order -= 1;
            }
            b.push_free(f as u32, order);
            b.free_frames += 1u64 << order;
            f += 1u64 << order;
        }
        b
    }

    pub fn nframes(&self) -> u32 {
        self.nframes
    }

    pub fn free_frames(&self) -> u64 {
        self.free_frames
    }

    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Frames free and not promised to a reservation.
    pub fn available(&self) -> u64 {
        self.free_frames - self.reserved
    }

    fn push_free(&mut self, frame: u32, order: u8) {
        let o = usize::from(order);
        self.free_order[frame as usize] = order + 1;
        self.stacks[o].push(frame);
        self.live[o] += 1;
        if self.stacks[o].len() > 64 + 2 * self.live[o] as usize {
            let fo = &self.free_order;
            let s = &mut self.stacks[o];
            s.retain(|&f| fo[f as usize] == order + 1);
            s.sort_unstable();
            s.dedup();
        }
    }

    fn pop_free(&mut self, order: u8) -> Option<u32> {
        let o = usize::from(order);
        while let Some(f) = self.stacks[o].pop() {
            if self.free_order[f as usize] == order + 1 {
                self.free_order[f as usize] = 0;
                self.live[o] -= 1;
                return Some(f);
            }
        }
        None
    }

    /// Allocates a block of 2^order frames aligned to its size. With `from_reserve` the frames
    /// come out of (and shrink) the reservation.
    pub fn alloc(&mut self, order: u8, from_reserve: bool) -> Result<u32, FrameError> {
        if order > MAX_ORDER {
            return Err(FrameError::Exhausted);
        }
        let need = 1u64 << order;
        let ok = if from_reserve { need <= self.reserved } else { need <= self.available() };
        if !ok {
            return Err(FrameError::Exhausted);
        }
        if order == 0 {
            if let Some(f) = self.hot.pop() {
                return Ok(self.take(f, 0, from_reserve));
            }
        }
        let mut drained = false;
        let mut k = order;
        let head = loop {
            if let Some(f) = self.pop_free(k) {
                break f;
            }
            if k == MAX_ORDER {
                if drained || self.hot.is_empty() {
                    return Err(FrameError::Exhausted);
                }
                self.drain_hot(0);
                drained = true;
                k = order;
                continue;
            }
            k += 1;
        };
        while k > order {
            k -= 1;
            self.push_free(head + (1 << k), k);
        }
        Ok(self.take(head, order, from_reserve))
    }

    fn take(&mut self, head: u32, order: u8, from_reserve: bool) -> u32 {
        let need = 1u64 << order;
        self.alloc_order[head as usize] = order + 1;
        self.free_frames -= need;
        if from_reserve {
            self.reserved -= need;
        }
        head
    }

    /// Merges hot frames back into the buddy lists until `keep` remain.
    fn drain_hot(&mut self, keep: usize) {
        while self.hot.len() > keep {
            if let Some(f) = self.hot.pop() {
                self.merge_free(f, 0);
            }
        }
    }

    /// Frees a block allocated by [`Buddy::alloc`] with the same order.
    pub fn free(&mut self, frame: u32, order: u8) -> Result<(), FrameError> {
        if frame >= self.nframes || self.alloc_order[frame as usize] != order + 1 {
            return Err(FrameError::NotAllocated);
        }
        self.alloc_order[frame as usize] = 0;
        self.free_frames += 1u64 << order;
        if order == 0 {
            self.hot.push(frame);
            if self.hot.len() > HOT_MAX {
                self.drain_hot(HOT_MAX / 2);
            }
        } else {
            self.merge_free(frame, order);
        }
        Ok(())
    }

    fn merge_free(&mut self, frame: u32, order: u8) {
        let mut head = frame;
        let mut k = order;
        while k < MAX_ORDER {
            let buddy = head ^ (1 << k);
            if u64::from(buddy) + (1u64 << k) > u64::from(self.nframes)
                || self.free_order[buddy as usize] != k + 1
            {
                break;
            }
            self.free_order[buddy as usize] = 0;
            self.live[usize::from(k)] -= 1;
            head = head.min(buddy);
            k += 1;
        }
        self.push_free(head, k);
    }

    /// Promises `n` frames to a reservation: later plain allocations cannot take them.
    pub fn reserve(&mut self, n: u64) -> Result<(), FrameError> {
        if n > self.available() {
            return Err(FrameError::Exhausted);
        }
        self.reserved += n;
        Ok(())
    }

    /// Gives back `n` frames of reservation (never more than is reserved).
    pub fn unreserve(&mut self, n: u64) {
        debug_assert!(n <= self.reserved);
        self.reserved -= n.min(self.reserved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_zero_is_never_handed_out_and_everything_else_is() {
        let mut b = Buddy::new(64);
        let mut got = Vec::new();
        while let Ok(f) = b.alloc(0, false) {
            got.push(f);
        }
        got.sort_unstable();
        assert_eq!(got, (1..64).collect::<Vec<_>>());
        assert_eq!(b.free_frames(), 0);
    }

    #[test]
    fn freeing_everything_coalesces_back_to_the_largest_blocks() {
        let mut b = Buddy::new(1024);
        let frames: Vec<u32> = (0..1023).map(|_| b.alloc(0, false).unwrap()).collect();
        for f in frames {
            b.free(f, 0).unwrap();
        }
        // The top half is one order-9 block again (the hot list is merged back on demand).
        let big = b.alloc(9, false).unwrap();
        assert_eq!(big, 512);
        assert_eq!(b.free(big, 8), Err(FrameError::NotAllocated));
        b.free(big, 9).unwrap();
        assert_eq!(b.free(big, 9), Err(FrameError::NotAllocated));
    }

    #[test]
    fn reservation_holds_frames_back_from_plain_allocations() {
        let mut b = Buddy::new(8);
        b.reserve(5).unwrap();
        assert_eq!(b.reserve(3), Err(FrameError::Exhausted));
        assert!(b.alloc(0, false).is_ok());
        assert!(b.alloc(0, false).is_ok());
        assert_eq!(b.alloc(0, false), Err(FrameError::Exhausted));
        for _ in 0..5 {
            assert!(b.alloc(0, true).is_ok());
        }
        assert_eq!(b.reserved(), 0);
        assert_eq!(b.alloc(0, true), Err(FrameError::Exhausted));
    }
}
