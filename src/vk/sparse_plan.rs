//! What a sparse mirror binds for a batch: the VM's final state over the ranges the batch
//! touched, cut into pieces of one backing each and coalesced. Pure: no Vulkan here.
#![forbid(unsafe_code)]

use crate::gpuvm::{BindOp, BoId, Va};

/// What one VA run of the mirror shows after a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// Nothing bound (an unmapped or sparse range).
    Unbound,
    /// Object `bo` from object offset `offset` on.
    Bo {
        /// The object.
        bo: BoId,
        /// Object offset of the run's first byte.
        offset: u64,
    },
}

/// A VA run `[va, va + len)` of one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) va: u64,
    pub(crate) len: u64,
    pub(crate) target: Target,
}

impl Piece {
    /// Whether `next` continues `self`: adjacent in VA, both unbound or the same object at the
    /// contiguous offset.
    fn continues(&self, next: &Piece) -> bool {
        self.va + self.len == next.va
            && match (self.target, next.target) {
                (Target::Unbound, Target::Unbound) => true,
                (Target::Bo { bo: a, offset: o }, Target::Bo { bo: b, offset: p }) => {
                    a == b && o + self.len == p
                }
                _ => false,
            }
    }
}

/// The VA ranges a batch's request ops touch, clipped to `[lo, hi)`, sorted and merged
/// (adjacent ranges join, so runs can coalesce across ops).
pub(crate) fn touched(ops: &[BindOp], lo: u64, hi: u64) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = ops
        .iter()
        .map(|op| match op {
            BindOp::Map(v) => (v.addr, v.addr.saturating_add(v.range)),
            BindOp::Unmap { addr, range } => (*addr, addr.saturating_add(*range)),
        })
        .map(|(a, e)| (a.max(lo), e.min(hi)))
        .filter(|(a, e)| a < e)
        .collect();
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (a, e) in r {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(e),
            _ => out.push((a, e)),
        }
    }
    out
}

/// The final state over `ranges` (sorted, disjoint) given the VM's `mappings` (sorted by
/// address, disjoint), as coalesced pieces: each plain mapping is one run, each period of a
/// repeat mapping one run, sparse mappings and holes unbound.
pub(crate) fn pieces(mappings: &[Va<BoId>], ranges: &[(u64, u64)]) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    let mut push = |p: Piece| match out.last_mut() {
        Some(last) if last.continues(&p) => last.len += p.len,
        _ => out.push(p),
    };
    // The first mapping that may overlap the first range.
    let mut m = mappings.partition_point(|v| v.end() <= ranges.first().map_or(0, |r| r.0));
    for &(a, e) in ranges {
        while m < mappings.len() && mappings[m].end() <= a {
            m += 1;
        }
        let mut at = a;
        let mut i = m;
        while at < e {
            let Some(v) = mappings.get(i).filter(|v| v.addr < e) else {
                push(Piece { va: at, len: e - at, target: Target::Unbound });
                break;
            };
            if v.addr > at {
                push(Piece { va: at, len: v.addr - at, target: Target::Unbound });
                at = v.addr;
            }
            let end = v.end().min(e);
            match v.obj {
                None => push(Piece { va: at, len: end - at, target: Target::Unbound }),
                Some(bo) => {
                    while at < end {
                        let offset = v.offset_at(at);
                        // A repeat mapping's run ends where its period wraps.
                        let run = match v.repeat {
                            Some(r) => (r.start + r.len - offset).min(end - at),
                            None => end - at,
                        };
                        push(Piece { va: at, len: run, target: Target::Bo { bo, offset } });
                        at += run;
                    }
                }
            }
            at = end;
            if v.end() <= e {
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bo(n: u32) -> BoId {
        BoId(n)
    }

    #[test]
    fn plain_sparse_repeat_and_holes() {
        let k = 4096u64;
        let maps = vec![
            Va::object(0, 4 * k, bo(1), 0),
            Va::object(4 * k, 2 * k, bo(1), 4 * k), // continues the first: one run
            Va::sparse(8 * k, 2 * k),
            Va::object(10 * k, 6 * k, bo(2), 0).repeating(2 * k),
        ];
        let p = pieces(&maps, &[(0, 20 * k)]);
        let t = |va, len, target| Piece { va, len, target };
        assert_eq!(
            p,
            vec![
                t(0, 6 * k, Target::Bo { bo: bo(1), offset: 0 }),
                t(6 * k, 4 * k, Target::Unbound),
                t(10 * k, 2 * k, Target::Bo { bo: bo(2), offset: 0 }),
                t(12 * k, 2 * k, Target::Bo { bo: bo(2), offset: 0 }),
                t(14 * k, 2 * k, Target::Bo { bo: bo(2), offset: 0 }),
                t(16 * k, 4 * k, Target::Unbound),
            ]
        );
        // Only the touched ranges, clipped inside mappings.
        let p = pieces(&maps, &[(k, 2 * k), (5 * k, 9 * k)]);
        assert_eq!(
            p,
            vec![
                t(k, k, Target::Bo { bo: bo(1), offset: k }),
                t(5 * k, k, Target::Bo { bo: bo(1), offset: 5 * k }),
                t(6 * k, 3 * k, Target::Unbound),
            ]
        );
    }

    #[test]
    fn touched_clips_sorts_and_merges() {
        let ops = vec![
            BindOp::Unmap { addr: 0x5000, range: 0x1000 },
            BindOp::Map(Va::object(0x1000, 0x2000, bo(1), 0)),
            BindOp::Map(Va::sparse(0x3000, 0x1000)),
            BindOp::Unmap { addr: 0x9000, range: 0x8000 },
        ];
        assert_eq!(touched(&ops, 0x2000, 0xc000), vec![(0x2000, 0x4000), (0x5000, 0x6000), (0x9000, 0xc000)]);
    }
}
