//! The GPU VM manager, as drm_gpuvm and the drivers split it. This layer starts with its pure
//! core, [`VaSpace`]: a VA range, the mappings in it, and the split/merge op generation of
//! Linux's `drm_gpuvm` exactly as REFERENCES.md §5 gives it. It knows no memory and no page
//! table, so it can be tested exhaustively and reused (a runtime can keep one per address space).
//!
//! # Mappings
//!
//! A mapping ([`Va`]) is `[addr, addr + range)` of an object `obj` from object offset `offset`,
//! or sparse (`obj: None`, Vulkan's non-resident strict: reads zero, writes dropped). Its
//! [`VaFlags`] say read-only and no-exec; a *repeat* mapping ([`Va::repeating`]) repeats one
//! object range across a VA range that is a multiple of it. Addresses, lengths and offsets are
//! multiples of [`GPU_PAGE`]; a request of length 0, unaligned, wrapping, outside the space or
//! touching its reserved range is a typed [`VaError`] before anything is computed.
//!
//! # Split and merge
//!
//! [`VaSpace::sm_map`] walks the mappings that overlap the request in address order. Each
//! one is removed whole (UNMAP) when the request covers it, or cut (REMAP) when a piece of it
//! lies below the request (`prev`) or above it (`next`); the pieces keep their offset arithmetic
//! (the byte at VA `v` of a piece keeps the object offset it had). Then exactly one MAP. An op's
//! `keep` says the old mapping maps the same object at the same offset as the request wherever
//! both are (old offset − old address == request offset − request address), so its entries may
//! stay; sparse mappings never keep, and neighbours that only touch the request produce no op
//! (nothing is merged: a merge shows only as `keep`). [`VaSpace::sm_unmap`] gives a REMAP
//! with the surviving pieces or an UNMAP per overlapping mapping, never `keep`, never a MAP.
//! Nothing changes until [`VaSpace::apply`], which checks the whole list against the current
//! mappings first.
//!
//! The cases, each a test of the same number (`gpuvm_case_01` … `gpuvm_case_18`,
//! `gpuvm_case_u1` … `gpuvm_case_u4` in `tests/gpuvm_cases.rs`), in pages; `a[s,e)@n` is object
//! `a` over pages `[s, e)` from object page `n`, `s` a sparse mapping:
//!
//! ```text
//!  #  pages:      0   1   2   3   4   5   6
//!  1  existing    [a@n]
//!     request     [a@n]                          UNMAP(a[0,1)@n, keep), MAP
//!  2  existing    [a@n]
//!     request     [a@m]                          UNMAP(a[0,1)@n), MAP
//!  3  existing    [a@n]
//!     request     [b@n]                          UNMAP(a[0,1)@n), MAP
//!  4  existing    [a@n]
//!     request     [a@n....]                      UNMAP(a[0,1)@n, keep), MAP
//!  5  existing    [a@n....]
//!     request     [b@n]                          REMAP(next a[1,2)@n+1), MAP
//!  6  existing    [a@n....]
//!     request     [a@n]                          REMAP(next a[1,2)@n+1, keep), MAP
//!  7  existing    [a@n....]
//!     request         [b@m]                      REMAP(prev a[0,1)@n), MAP
//!  8  existing    [a@n....]
//!     request         [a@n+1]                    REMAP(prev a[0,1)@n, keep), MAP
//!  9  existing    [a@n....]
//!     request         [b@m....]                  REMAP(prev a[0,1)@n), MAP
//! 10  existing    [a@n....]
//!     request         [a@n+1..]                  REMAP(prev a[0,1)@n, keep), MAP
//! 11  existing    [a@n........]
//!     request         [b@m]                      REMAP(prev a[0,1)@n, next a[2,3)@n+2), MAP
//! 12  existing    [a@n........]
//!     request         [a@n+1]                    REMAP(prev a[0,1)@n, next a[2,3)@n+2, keep), MAP
//! 13  existing        [a@n+1]
//!     request     [a@n....]                      UNMAP(a[1,2)@n+1, keep), MAP
//! 14  existing        [a@n+1]
//!     request     [a@n........]                  UNMAP(a[1,2)@n+1, keep), MAP
//! 15  existing        [a@n....]
//!     request     [b@m....]                      REMAP(next a[2,3)@n+1), MAP
//! 16  existing    (empty)
//!     request     [a@0............]              MAP
//! 17  existing    [a@n....][c@k....][d@j....]
//!     request         [b@m............]          REMAP(prev a[0,1)@n), UNMAP(c[2,4)@k),
//!                                                REMAP(next d[5,6)@j+1), MAP
//! 18  existing    [s..............]
//!     request         [b@m]                      REMAP(prev s[0,1)@0, next s[2,4)@2), MAP
//! U1  existing    [a@n............]
//!     unmap           [.......]                  REMAP(prev a[0,1)@n, next a[3,4)@n+3)
//! U2  existing    [a@n....][c@k....]
//!     unmap           [.......]                  REMAP(prev a[0,1)@n), REMAP(next c[3,4)@k+1)
//! U3  existing    [a@0....]
//!     unmap       [.......]                      UNMAP(a[0,2)@0)
//! U4  existing    (hole)
//!     unmap       [.......]                      no ops
//! ```
//!
//! ```
//! use vmbind::gpuvm::{Op, Va, VaSpace};
//! const P: u64 = 4096;
//! let mut vm = VaSpace::<u32>::new(0, 1 << 40, None).unwrap();
//! vm.map(&Va::object(0, 3 * P, 7, 0)).unwrap(); // a[0,3)@0
//! let ops = vm.sm_map(&Va::object(P, P, 9, 0)).unwrap(); // map b[1,2)@0: case 11
//! assert_eq!(ops.len(), 2);
//! let Op::Remap { prev, next, keep, .. } = &ops[0] else { panic!() };
//! assert_eq!((prev.as_ref().unwrap().range, next.as_ref().unwrap().offset, *keep), (P, 2 * P, false));
//! vm.apply(&ops).unwrap();
//! assert_eq!(vm.find(P).unwrap().obj, Some(9));
//! assert_eq!(vm.len(), 3);
//! ```
#![forbid(unsafe_code)]

mod access;
mod picture;
mod va;
mod vm;

pub use access::{FaultStage, GpuFault};
pub use picture::svg_picture;
pub use va::{GPU_PAGE, Op, Repeat, Va, VaBounds, VaError, VaFlags, VaSpace};
pub use vm::{BindOp, BoId, Bound, Populated, TlbFlush, Vm, VmError};
