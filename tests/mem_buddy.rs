//! Property tests of the frame allocator behind `PhysMem` (a buddy allocator with a hot list of
//! single frames), through the public API only, against an oracle of live blocks.
//!
//! The oracle is exact: an allocation must succeed whenever enough unreserved frames are free and
//! some aligned run of its size is free in the oracle's picture (the buddy allocator coalesces
//! completely, so it can always find one), and may fail only otherwise, changing nothing. A free
//! succeeds exactly when it names the start and size of a live block.

use std::collections::BTreeMap;

use proptest::prelude::*;
use vmbind::addr::{PAGE_SIZE, PageSize, PhysAddr};
use vmbind::mem::{MAX_ORDER, MemError, MemUsage, PhysMem, Reservation};

const MIB: u64 = 1 << 20;
const MIB2: u64 = 2 << 20;

#[derive(Clone, Copy, Debug)]
enum Count {
    /// Exactly this many frames.
    N(usize),
    /// Every available frame (must succeed).
    All,
    /// One more than is available (must fail).
    TooMany,
}

#[derive(Clone, Copy, Debug)]
enum Alloc {
    /// `alloc_frame`.
    Frame,
    /// `alloc_frames`.
    Frames(Count),
    /// `alloc_block(4 KiB << order)`.
    Block(u32),
    /// `alloc_contig(Size2M)`.
    Contig2M,
    /// `alloc_reserved_frame`.
    Reserved,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Alloc(Alloc),
    /// `alloc_block(4 KiB << order)` until it fails.
    Exhaust(u32),
    /// Frees the live block at or after the address `pick` (mod the arena), with an API that fits
    /// its size, chosen by `how`.
    Free {
        pick: u64,
        how: u8,
    },
    /// `free_frames` of up to `n` live single frames from `pick` on; with `bad_tail`, a bad
    /// address follows them.
    FreeBatch {
        pick: u64,
        n: usize,
        bad_tail: bool,
    },
    /// A free that must be refused (kind chosen by `how`): a double free, a wrong size, an
    /// address inside a block, address 0, past the arena, unaligned.
    BadFree {
        pick: u64,
        how: u8,
    },
    /// `reserve(n)`; `u64::MAX` means exactly what is available, `u64::MAX - 1` one more.
    Reserve(u64),
    /// `unreserve(min(n, reserved))`.
    Unreserve(u64),
}

fn alloc_strategy() -> impl Strategy<Value = Alloc> {
    prop_oneof![
        6 => (0u32..=9).prop_map(Alloc::Block),
        3 => Just(Alloc::Frame),
        2 => (1usize..300).prop_map(|n| Alloc::Frames(Count::N(n))),
        1 => prop_oneof![Just(Count::All), Just(Count::TooMany)].prop_map(Alloc::Frames),
        2 => Just(Alloc::Contig2M),
        2 => Just(Alloc::Reserved),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        14 => alloc_strategy().prop_map(Op::Alloc),
        1 => (2u32..=9).prop_map(Op::Exhaust),
        10 => (any::<u64>(), any::<u8>()).prop_map(|(pick, how)| Op::Free { pick, how }),
        1 => (any::<u64>(), 1usize..64, any::<bool>())
            .prop_map(|(pick, n, bad_tail)| Op::FreeBatch { pick, n, bad_tail }),
        3 => (any::<u64>(), any::<u8>()).prop_map(|(pick, how)| Op::BadFree { pick, how }),
        2 => prop_oneof![3 => 0u64..600, 1 => Just(u64::MAX), 1 => Just(u64::MAX - 1)].prop_map(Op::Reserve),
        1 => (0u64..600).prop_map(Op::Unreserve),
    ]
}

struct Model {
    mem: PhysMem,
    size: u64,
    nframes: u64,
    /// Live blocks: start -> bytes.
    live: BTreeMap<u64, u64>,
    live_frames: u64,
    reserved: u64,
    /// The model's reservation token (it holds `reserved` frames).
    res: Reservation,
    /// Blocks freed so far (for double frees).
    freed: Vec<(u64, u64)>,
}

impl Model {
    fn new(size: u64) -> Self {
        let mem = PhysMem::new(size).unwrap();
        let res = mem.reserve(0).unwrap();
        let m = Model {
            mem,
            res,
            size,
            nframes: size / PAGE_SIZE,
            live: BTreeMap::new(),
            live_frames: 0,
            reserved: 0,
            freed: Vec::new(),
        };
        assert_eq!(m.mem.usage(), m.initial_usage());
        m
    }

    fn initial_usage(&self) -> MemUsage {
        MemUsage { total_frames: self.nframes, free_frames: self.nframes - 1, reserved_frames: 0 }
    }

    /// What `usage()` must say now.
    fn usage(&self) -> MemUsage {
        MemUsage {
            total_frames: self.nframes,
            free_frames: self.nframes - 1 - self.live_frames,
            reserved_frames: self.reserved,
        }
    }

    fn check_usage(&self) {
        assert_eq!(self.mem.usage(), self.usage(), "usage after {} live blocks", self.live.len());
    }

    fn available(&self) -> u64 {
        self.nframes - 1 - self.live_frames - self.reserved
    }

    fn overlaps(&self, start: u64, bytes: u64) -> bool {
        let before = self.live.range(..=start).next_back().is_some_and(|(&s, &l)| s + l > start);
        before || self.live.range(start..start + bytes).next().is_some()
    }

    /// Whether some `bytes`-aligned run of `bytes` is free (frame 0 is never free).
    fn fits(&self, bytes: u64) -> bool {
        let gap_fits = |a: u64, b: u64| a.next_multiple_of(bytes) + bytes <= b;
        let mut cursor = PAGE_SIZE;
        for (&s, &l) in &self.live {
            if gap_fits(cursor, s) {
                return true;
            }
            cursor = s + l;
        }
        gap_fits(cursor, self.size)
    }

    /// The live block at or after `pick` (mod the arena), wrapping around.
    fn pick(&self, pick: u64) -> Option<(u64, u64)> {
        let at = pick % self.size;
        self.live.range(at..).next().or_else(|| self.live.iter().next()).map(|(&s, &l)| (s, l))
    }

    /// Records a block the allocator handed out, checking it against the live ones.
    fn accept(&mut self, pa: PhysAddr, bytes: u64) {
        let s = pa.as_u64();
        assert_ne!(s, 0, "address 0 handed out");
        assert_eq!(s % bytes, 0, "{pa} not aligned to {bytes:#x}");
        assert!(s + bytes <= self.size, "{pa} + {bytes:#x} outside the arena of {:#x}", self.size);
        assert!(!self.overlaps(s, bytes), "{pa} + {bytes:#x} overlaps a live block");
        self.live.insert(s, bytes);
        self.live_frames += bytes / PAGE_SIZE;
    }

    fn forget(&mut self, start: u64) {
        let bytes = self.live.remove(&start).expect("a live block");
        self.live_frames -= bytes / PAGE_SIZE;
        self.freed.push((start, bytes));
    }

    /// An allocation of one aligned block of `bytes`: checks success or failure against the
    /// oracle.
    fn check_block(&mut self, bytes: u64, got: Result<PhysAddr, MemError>, before: MemUsage) {
        let need = bytes / PAGE_SIZE;
        let possible = need <= self.available() && self.fits(bytes);
        match got {
            Ok(pa) => {
                assert!(possible, "{bytes:#x} allocated although the oracle has no room");
                self.accept(pa, bytes);
            }
            Err(e) => {
                assert!(!possible, "allocation of {bytes:#x} failed with room left: {e:?}");
                assert_eq!(e, MemError::OutOfMemory { requested: need, available: self.available() });
                assert_eq!(self.mem.usage(), before, "a failed allocation changed the usage");
            }
        }
    }

    fn alloc(&mut self, a: Alloc) {
        let before = self.mem.usage();
        match a {
            Alloc::Frame => {
                let got = self.mem.alloc_frame();
                self.check_block(PAGE_SIZE, got, before);
            }
            Alloc::Block(order) => {
                let bytes = PAGE_SIZE << order;
                let got = self.mem.alloc_block(bytes);
                self.check_block(bytes, got, before);
            }
            Alloc::Contig2M => {
                let got = self.mem.alloc_contig(PageSize::Size2M);
                self.check_block(MIB2, got, before);
            }
            Alloc::Frames(count) => {
                let avail = self.available() as usize;
                let n = match count {
                    Count::N(n) => n,
                    Count::All => avail,
                    Count::TooMany => avail + 1,
                };
                match self.mem.alloc_frames(n) {
                    Ok(v) => {
                        assert!(n <= avail);
                        assert_eq!(v.len(), n);
                        for pa in v {
                            self.accept(pa, PAGE_SIZE);
                        }
                    }
                    Err(e) => {
                        assert!(n > avail, "alloc_frames({n}) failed with {avail} available");
                        let want = MemError::OutOfMemory { requested: n as u64, available: avail as u64 };
                        assert_eq!(e, want);
                        assert_eq!(self.mem.usage(), before);
                    }
                }
            }
            Alloc::Reserved => match self.mem.alloc_reserved_frame(&mut self.res) {
                Ok(pa) => {
                    assert!(self.reserved >= 1, "a reserved frame came out of no reservation");
                    self.reserved -= 1;
                    self.accept(pa, PAGE_SIZE);
                }
                Err(e) => {
                    assert_eq!(self.reserved, 0, "alloc_reserved_frame failed with frames reserved");
                    assert_eq!(e, MemError::OutOfMemory { requested: 1, available: self.available() });
                    assert_eq!(self.mem.usage(), before);
                }
            },
        }
        self.check_usage();
    }

    /// Frees a live block with an API that fits its size.
    fn free_live(&mut self, start: u64, bytes: u64, how: u8) {
        let pa = PhysAddr::new(start);
        let r = match (bytes, how % 3) {
            (PAGE_SIZE, 0) => self.mem.free_frame(pa),
            (PAGE_SIZE, 1) => self.mem.free_frames(&[pa]),
            (MIB2, 0 | 1) => self.mem.free_contig(pa, PageSize::Size2M),
            _ => self.mem.free_block(pa, bytes),
        };
        assert_eq!(r, Ok(()), "free of live block {pa} + {bytes:#x}");
        self.forget(start);
    }

    /// A free of `(pa, bytes)` that the oracle says must be refused, through an API that takes
    /// that size; nothing may change.
    fn free_bad(&mut self, pa: u64, bytes: u64, how: u8) {
        assert_ne!(self.live.get(&pa), Some(&bytes), "not a bad free");
        let before = self.mem.usage();
        let p = PhysAddr::new(pa);
        let r = match (bytes, how % 3) {
            (PAGE_SIZE, 0) => self.mem.free_frame(p),
            (PAGE_SIZE, 1) => self.mem.free_frames(&[p]),
            (MIB2, 0) => self.mem.free_contig(p, PageSize::Size2M),
            _ => self.mem.free_block(p, bytes),
        };
        assert_eq!(r, Err(MemError::NotAllocated { pa: p, size: bytes }), "bad free of {p} + {bytes:#x}");
        assert_eq!(self.mem.usage(), before, "a refused free changed the usage");
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Alloc(a) => self.alloc(a),
            Op::Exhaust(order) => {
                let bytes = PAGE_SIZE << order;
                for _ in 0..=self.nframes >> order {
                    let before = self.mem.usage();
                    let got = self.mem.alloc_block(bytes);
                    let failed = got.is_err();
                    self.check_block(bytes, got, before);
                    if failed {
                        break;
                    }
                }
                assert!(!(self.available() >= 1 << order && self.fits(bytes)), "exhaustion stopped early");
                self.check_usage();
            }
            Op::Free { pick, how } => {
                if let Some((s, l)) = self.pick(pick) {
                    self.free_live(s, l, how);
                    self.check_usage();
                }
            }
            Op::FreeBatch { pick, n, bad_tail } => {
                let at = pick % self.size;
                let mut list: Vec<PhysAddr> = self
                    .live
                    .range(at..)
                    .chain(self.live.range(..at))
                    .filter(|&(_, &l)| l == PAGE_SIZE)
                    .take(n)
                    .map(|(&s, _)| PhysAddr::new(s))
                    .collect();
                // A bad address: frame 0, or a frame inside a live larger block if there is one.
                let bad = self.live.iter().find(|&(_, &l)| l > PAGE_SIZE).map_or(0, |(&s, _)| s + PAGE_SIZE);
                if bad_tail {
                    list.push(PhysAddr::new(bad));
                }
                let r = self.mem.free_frames(&list);
                if bad_tail {
                    let bad = list.pop().unwrap();
                    assert_eq!(r, Err(MemError::NotAllocated { pa: bad, size: PAGE_SIZE }));
                } else {
                    assert_eq!(r, Ok(()));
                }
                // The frames before the bad one are freed either way.
                for pa in list {
                    self.forget(pa.as_u64());
                }
                self.check_usage();
            }
            Op::BadFree { pick, how } => {
                let live = self.pick(pick);
                match how % 6 {
                    // Double free of an earlier block, unless that exact block is live again.
                    0 => {
                        if !self.freed.is_empty() {
                            let (s, l) = self.freed[(pick % self.freed.len() as u64) as usize];
                            if self.live.get(&s) != Some(&l) {
                                self.free_bad(s, l, how / 6);
                            }
                        }
                    }
                    // A live block with the wrong size: twice or half its own.
                    1 => {
                        if let Some((s, l)) = live {
                            let wrong = if l < MIB2 || how & 0x80 != 0 { l * 2 } else { l / 2 };
                            self.free_bad(s, wrong, how / 6);
                        }
                    }
                    // A frame inside a live block of more than one frame.
                    2 => {
                        if let Some((s, l)) = live.filter(|&(_, l)| l > PAGE_SIZE) {
                            let inner = s + PAGE_SIZE * (1 + pick % (l / PAGE_SIZE - 1));
                            self.free_bad(inner, PAGE_SIZE, how / 6);
                        }
                    }
                    3 => self.free_bad(0, PAGE_SIZE, how / 6),
                    // Past the end of the arena.
                    4 => self.free_bad(self.size.next_multiple_of(MIB2), MIB2, how / 6),
                    // Unaligned to its size.
                    _ => {
                        if let Some((s, l)) = live {
                            self.free_bad(s + 8, l, how / 6);
                        }
                    }
                }
                self.check_usage();
            }
            Op::Reserve(n) => {
                let avail = self.available();
                let n = match n {
                    u64::MAX => avail,
                    m if m == u64::MAX - 1 => avail + 1,
                    n => n,
                };
                let before = self.mem.usage();
                match self.mem.reserve_more(&mut self.res, n) {
                    Ok(()) => {
                        assert!(n <= avail, "reserved {n} with {avail} available");
                        self.reserved += n;
                    }
                    Err(e) => {
                        assert!(n > avail, "reserve({n}) failed with {avail} available");
                        assert_eq!(e, MemError::OutOfMemory { requested: n, available: avail });
                        assert_eq!(self.mem.usage(), before);
                    }
                }
                self.check_usage();
            }
            Op::Unreserve(n) => {
                let n = n.min(self.reserved);
                assert_eq!(self.mem.unreserve(&mut self.res, n), Ok(n));
                self.reserved -= n;
                self.check_usage();
            }
        }
    }

    /// Frees every live block (in an order drawn from `seed`) and returns the reservation.
    fn free_all(&mut self, seed: u64) {
        let mut blocks: Vec<(u64, u64)> = self.live.iter().map(|(&s, &l)| (s, l)).collect();
        let mut x = seed | 1;
        for i in (1..blocks.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            blocks.swap(i, (x % (i as u64 + 1)) as usize);
        }
        for (k, (s, l)) in blocks.into_iter().enumerate() {
            self.free_live(s, l, k as u8);
        }
        assert_eq!(self.mem.unreserve(&mut self.res, u64::MAX), Ok(self.reserved));
        self.reserved = 0;
        self.check_usage();
    }

    /// The largest order whose aligned block fits in the arena next to frame 0.
    fn largest_order(&self) -> u32 {
        (0..=u32::from(MAX_ORDER))
            .rev()
            .find(|&k| self.fits(PAGE_SIZE << k))
            .expect("the arena has a free frame")
    }

    /// Allocates the whole free arena as the largest aligned blocks it can hold, biggest first:
    /// every step must succeed (complete coalescing), and nothing may be left free.
    fn carve_everything(&mut self) {
        for k in (0..=u32::from(MAX_ORDER)).rev() {
            let bytes = PAGE_SIZE << k;
            while self.fits(bytes) {
                let before = self.mem.usage();
                let got = self.mem.alloc_block(bytes);
                assert!(got.is_ok(), "order {k} refused after everything was freed: {got:?}");
                self.check_block(bytes, got, before);
            }
        }
        assert_eq!(self.mem.usage().free_frames, 0);
        assert!(matches!(self.mem.alloc_frame(), Err(MemError::OutOfMemory { requested: 1, available: 0 })));
    }
}

fn arena_size() -> impl Strategy<Value = u64> {
    (16u64..=64, prop_oneof![3 => Just(0u64), 1 => 1u64..4])
        .prop_map(|(mib, pages)| mib * MIB + pages * PAGE_SIZE)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_alloc_free_sequences_match_an_oracle_of_live_blocks(
        size in arena_size(),
        ops in proptest::collection::vec(op_strategy(), 1..200),
        seed in any::<u64>(),
    ) {
        let mut m = Model::new(size);
        let initial = m.mem.usage();
        let largest = m.largest_order();
        for &op in &ops {
            m.apply(op);
        }
        // Freeing everything restores the initial counts...
        m.free_all(seed);
        prop_assert_eq!(m.mem.usage(), initial);
        // ...and the blocks coalesce again: the largest block the fresh arena allowed is there
        // (and nothing larger)...
        let big = PAGE_SIZE << largest;
        if largest < u32::from(MAX_ORDER) {
            let too_big = m.mem.alloc_block(big * 2);
            prop_assert!(matches!(too_big, Err(MemError::OutOfMemory { .. })), "{:?}", too_big);
        }
        let pa = m.mem.alloc_block(big);
        prop_assert!(pa.is_ok(), "the largest block ({:#x}) is gone after freeing everything: {:?}", big, pa);
        m.check_block(big, pa, initial);
        m.free_all(seed);
        // ...and so is every other free frame: the whole arena carves into aligned blocks.
        m.carve_everything();
        m.free_all(seed ^ 1);
        prop_assert_eq!(m.mem.usage(), initial);
    }
}

#[test]
fn reserved_frames_are_held_back_from_plain_allocations() {
    let mem = PhysMem::new(16 << 20).unwrap();
    let initial = mem.usage();
    let free = initial.free_frames;
    // Everything but three frames promised away.
    let mut r = mem.reserve(free - 3).unwrap();
    assert_eq!(r.frames(), free - 3);
    assert_eq!(mem.reserve(4), Err(MemError::OutOfMemory { requested: 4, available: 3 }));
    // A block of four frames exists, but only three are available.
    assert_eq!(mem.alloc_block(4 * PAGE_SIZE), Err(MemError::OutOfMemory { requested: 4, available: 3 }));
    assert_eq!(mem.alloc_frames(4), Err(MemError::OutOfMemory { requested: 4, available: 3 }));
    let mut plain = mem.alloc_frames(3).unwrap();
    assert_eq!(mem.alloc_frame(), Err(MemError::OutOfMemory { requested: 1, available: 0 }));
    assert!(mem.alloc_contig(PageSize::Size2M).is_err());
    // The reservation can always be drawn on, down to the last frame.
    let mut reserved = Vec::new();
    for left in (0..free - 3).rev() {
        reserved.push(mem.alloc_reserved_frame(&mut r).unwrap());
        assert_eq!(mem.usage().reserved_frames, left);
    }
    assert_eq!(mem.alloc_reserved_frame(&mut r), Err(MemError::OutOfMemory { requested: 1, available: 0 }));
    assert_eq!(mem.usage().free_frames, 0);
    let mut all: Vec<u64> = plain.iter().chain(&reserved).map(|p| p.as_u64()).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len() as u64, free, "every frame handed out once");
    // Freeing a reserved frame does not give the reservation back; it is a plain free frame.
    mem.free_frame(reserved.pop().unwrap()).unwrap();
    assert_eq!(mem.usage().reserved_frames, 0);
    assert_eq!(mem.alloc_reserved_frame(&mut r), Err(MemError::OutOfMemory { requested: 1, available: 1 }));
    plain.push(mem.alloc_frame().unwrap());
    mem.free_frames(&plain).unwrap();
    mem.free_frames(&reserved).unwrap();
    assert_eq!(mem.usage(), initial);

    // Unreserving hands frames back to plain allocations.
    let mut r = mem.reserve(10).unwrap();
    assert_eq!(mem.unreserve(&mut r, 4), Ok(4));
    // Another arena's token is refused, and changes nothing.
    let other = PhysMem::new(1 << 20).unwrap();
    let mut foreign = other.reserve(1).unwrap();
    assert_eq!(mem.unreserve(&mut foreign, 1), Err(MemError::ForeignReservation));
    assert_eq!(mem.alloc_reserved_frame(&mut foreign), Err(MemError::ForeignReservation));
    assert_eq!(foreign.frames(), 1);
    assert_eq!(mem.usage().reserved_frames, 6);
    let hold = mem.alloc_frames((free - 6) as usize).unwrap();
    assert!(mem.alloc_frame().is_err());
    let six: Vec<PhysAddr> = (0..6).map(|_| mem.alloc_reserved_frame(&mut r).unwrap()).collect();
    assert!(mem.alloc_reserved_frame(&mut r).is_err());
    mem.free_frames(&hold).unwrap();
    mem.free_frames(&six).unwrap();
    assert_eq!(mem.usage(), initial);
    // Everything coalesced: the top half of the arena is one 8 MiB block again.
    assert_eq!(mem.alloc_block(8 << 20), Ok(PhysAddr::new(8 << 20)));
}

#[test]
fn bad_block_sizes_are_refused_before_anything_happens() {
    let mem = PhysMem::new(16 << 20).unwrap();
    let initial = mem.usage();
    for bytes in [0, 4095, 4097, 12 << 10, 2 << 30] {
        assert!(matches!(mem.alloc_block(bytes), Err(MemError::Unaligned { .. })), "{bytes:#x}");
        assert!(matches!(mem.free_block(PhysAddr::new(1 << 20), bytes), Err(MemError::Unaligned { .. })));
    }
    assert_eq!(mem.usage(), initial);
}
