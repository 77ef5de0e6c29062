//! drm_gpuvm's split/merge, case by case (REFERENCES.md §5; the numbered diagrams in the
//! `gpuvm` module docs), every typed error of the VA space, repeat and sparse mappings, and a
//! property test of random map/unmap sequences against a brute-force model of §5 and a page
//! oracle.

#![allow(clippy::cloned_ref_to_slice_refs)] // `&[a.clone()]` reads as the table row it is

use std::collections::BTreeMap;

use proptest::prelude::*;
use vmbind::gpuvm::{GPU_PAGE as P, Op, Repeat, Va, VaError, VaFlags, VaSpace};

// Object pages the cases use for n, m, k, j.
const N: u64 = 10;
const M: u64 = 20;
const K: u64 = 30;
const J: u64 = 40;

/// Object `o` over pages `[s, e)` from object page `off`.
fn va(o: char, s: u64, e: u64, off: u64) -> Va<char> {
    Va::object(s * P, (e - s) * P, o, off * P)
}

/// A sparse mapping over pages `[s, e)` whose offset arithmetic starts at page `off`.
fn sp(s: u64, e: u64, off: u64) -> Va<char> {
    Va { offset: off * P, ..Va::sparse(s * P, (e - s) * P) }
}

fn space(existing: &[Va<char>]) -> VaSpace<char> {
    let mut vm = VaSpace::new(0, 1 << 30, None).unwrap();
    for v in existing {
        vm.map(v).unwrap();
    }
    vm
}

fn unmap(v: Va<char>, keep: bool) -> Op<char> {
    Op::Unmap { va: v, keep }
}

fn remap(old: Va<char>, prev: Option<Va<char>>, next: Option<Va<char>>, keep: bool) -> Op<char> {
    Op::Remap { prev, next, unmap: old, keep }
}

/// Checks the ops of mapping `req` over `existing`, applies them, and checks the result.
fn case(existing: &[Va<char>], req: Va<char>, want: Vec<Op<char>>) {
    let mut vm = space(existing);
    let ops = vm.sm_map(&req).unwrap();
    assert_eq!(ops, want);
    vm.apply(&ops).unwrap();
    assert_eq!(vm.find(req.addr), Some(&req));
}

fn unmap_case(existing: &[Va<char>], s: u64, e: u64, want: Vec<Op<char>>) {
    let mut vm = space(existing);
    let ops = vm.sm_unmap(s * P, (e - s) * P).unwrap();
    assert_eq!(ops, want);
    vm.apply(&ops).unwrap();
    assert_eq!(vm.overlapping(s * P, e * P).count(), 0);
}

#[test]
fn gpuvm_case_01_same_mapping_again_keeps() {
    let a = va('a', 0, 1, N);
    case(&[a.clone()], a.clone(), vec![unmap(a.clone(), true), Op::Map(a)]);
}

#[test]
fn gpuvm_case_02_other_offset_does_not_keep() {
    let (a, r) = (va('a', 0, 1, N), va('a', 0, 1, M));
    case(&[a.clone()], r.clone(), vec![unmap(a, false), Op::Map(r)]);
}

#[test]
fn gpuvm_case_03_other_object_does_not_keep() {
    let (a, r) = (va('a', 0, 1, N), va('b', 0, 1, N));
    case(&[a.clone()], r.clone(), vec![unmap(a, false), Op::Map(r)]);
}

#[test]
fn gpuvm_case_04_grow_keeps() {
    let (a, r) = (va('a', 0, 1, N), va('a', 0, 2, N));
    case(&[a.clone()], r.clone(), vec![unmap(a, true), Op::Map(r)]);
}

#[test]
fn gpuvm_case_05_remap_next() {
    let (a, r) = (va('a', 0, 2, N), va('b', 0, 1, N));
    case(&[a.clone()], r.clone(), vec![remap(a, None, Some(va('a', 1, 2, N + 1)), false), Op::Map(r)]);
}

#[test]
fn gpuvm_case_06_remap_next_keeps() {
    let (a, r) = (va('a', 0, 2, N), va('a', 0, 1, N));
    case(&[a.clone()], r.clone(), vec![remap(a, None, Some(va('a', 1, 2, N + 1)), true), Op::Map(r)]);
}

#[test]
fn gpuvm_case_07_remap_prev() {
    let (a, r) = (va('a', 0, 2, N), va('b', 1, 2, M));
    case(&[a.clone()], r.clone(), vec![remap(a, Some(va('a', 0, 1, N)), None, false), Op::Map(r)]);
}

#[test]
fn gpuvm_case_08_remap_prev_keeps() {
    let (a, r) = (va('a', 0, 2, N), va('a', 1, 2, N + 1));
    case(&[a.clone()], r.clone(), vec![remap(a, Some(va('a', 0, 1, N)), None, true), Op::Map(r)]);
}

#[test]
fn gpuvm_case_09_remap_prev_request_beyond() {
    let (a, r) = (va('a', 0, 2, N), va('b', 1, 3, M));
    case(&[a.clone()], r.clone(), vec![remap(a, Some(va('a', 0, 1, N)), None, false), Op::Map(r)]);
}

#[test]
fn gpuvm_case_10_remap_prev_request_beyond_keeps() {
    let (a, r) = (va('a', 0, 2, N), va('a', 1, 3, N + 1));
    case(&[a.clone()], r.clone(), vec![remap(a, Some(va('a', 0, 1, N)), None, true), Op::Map(r)]);
}

#[test]
fn gpuvm_case_11_remap_both_sides() {
    let (a, r) = (va('a', 0, 3, N), va('b', 1, 2, M));
    let want = remap(a, Some(va('a', 0, 1, N)), Some(va('a', 2, 3, N + 2)), false);
    case(&[va('a', 0, 3, N)], r.clone(), vec![want, Op::Map(r)]);
}

#[test]
fn gpuvm_case_12_remap_both_sides_keeps() {
    let (a, r) = (va('a', 0, 3, N), va('a', 1, 2, N + 1));
    let want = remap(a.clone(), Some(va('a', 0, 1, N)), Some(va('a', 2, 3, N + 2)), true);
    case(&[a], r.clone(), vec![want, Op::Map(r)]);
}

#[test]
fn gpuvm_case_13_request_starts_below_keeps() {
    let (a, r) = (va('a', 1, 2, N + 1), va('a', 0, 2, N));
    case(&[a.clone()], r.clone(), vec![unmap(a, true), Op::Map(r)]);
}

#[test]
fn gpuvm_case_14_request_around_keeps() {
    let (a, r) = (va('a', 1, 2, N + 1), va('a', 0, 3, N));
    case(&[a.clone()], r.clone(), vec![unmap(a, true), Op::Map(r)]);
}

#[test]
fn gpuvm_case_15_request_below_remap_next() {
    // Linux's kernel-doc diagram says n+2; its code and the arithmetic give n+1.
    let (a, r) = (va('a', 1, 3, N), va('b', 0, 2, M));
    case(&[a.clone()], r.clone(), vec![remap(a, None, Some(va('a', 2, 3, N + 1)), false), Op::Map(r)]);
}

#[test]
fn gpuvm_case_16_empty_space_maps() {
    let r = va('a', 0, 4, 0);
    case(&[], r.clone(), vec![Op::Map(r)]);
}

#[test]
fn gpuvm_case_17_three_mappings() {
    let (a, c, d) = (va('a', 0, 2, N), va('c', 2, 4, K), va('d', 4, 6, J));
    let r = va('b', 1, 5, M);
    let want = vec![
        remap(a.clone(), Some(va('a', 0, 1, N)), None, false),
        unmap(c.clone(), false),
        remap(d.clone(), None, Some(va('d', 5, 6, J + 1)), false),
        Op::Map(r.clone()),
    ];
    case(&[a, c, d], r, want);
}

#[test]
fn gpuvm_case_18_sparse_mapping_cut_keeps_offsets() {
    let s = sp(0, 4, 0);
    let r = va('b', 1, 2, M);
    case(&[s.clone()], r.clone(), vec![remap(s, Some(sp(0, 1, 0)), Some(sp(2, 4, 2)), false), Op::Map(r)]);
}

#[test]
fn gpuvm_case_u1_unmap_middle() {
    let a = va('a', 0, 4, N);
    unmap_case(&[a.clone()], 1, 3, vec![remap(a, Some(va('a', 0, 1, N)), Some(va('a', 3, 4, N + 3)), false)]);
}

#[test]
fn gpuvm_case_u2_unmap_across_two() {
    let (a, c) = (va('a', 0, 2, N), va('c', 2, 4, K));
    let want = vec![
        remap(a.clone(), Some(va('a', 0, 1, N)), None, false),
        remap(c.clone(), None, Some(va('c', 3, 4, K + 1)), false),
    ];
    unmap_case(&[a, c], 1, 3, want);
}

#[test]
fn gpuvm_case_u3_unmap_whole() {
    let a = va('a', 0, 2, 0);
    unmap_case(&[a.clone()], 0, 2, vec![unmap(a, false)]);
}

#[test]
fn gpuvm_case_u4_unmap_hole() {
    unmap_case(&[va('a', 4, 6, 0)], 0, 2, vec![]);
}

#[test]
fn neighbours_that_only_touch_produce_no_op_and_a_sparse_replacement_never_keeps() {
    let vm = space(&[va('a', 0, 1, 0), va('c', 2, 3, 0)]);
    assert_eq!(vm.sm_map(&va('b', 1, 2, 0)).unwrap(), vec![Op::Map(va('b', 1, 2, 0))]);
    let vm = space(&[sp(0, 2, 0)]);
    assert_eq!(vm.sm_map(&sp(0, 2, 0)).unwrap(), vec![unmap(sp(0, 2, 0), false), Op::Map(sp(0, 2, 0))]);
}

#[test]
fn every_bad_request_is_a_typed_error_and_changes_nothing() {
    let mut vm = VaSpace::<char>::new(P, 64 * P, Some((32 * P, 4 * P))).unwrap();
    vm.map(&va('a', 2, 4, 0)).unwrap();
    let before: Vec<_> = vm.iter().cloned().collect();
    let cases: Vec<(Va<char>, VaError)> = vec![
        (Va::object(2 * P, 0, 'b', 0), VaError::ZeroSize { addr: 2 * P }),
        (Va::object(2 * P + 1, P, 'b', 0), VaError::Unaligned { addr: 2 * P + 1, range: P, offset: 0 }),
        (Va::object(2 * P, P + 8, 'b', 0), VaError::Unaligned { addr: 2 * P, range: P + 8, offset: 0 }),
        (Va::object(2 * P, P, 'b', 12), VaError::Unaligned { addr: 2 * P, range: P, offset: 12 }),
        (
            Va::object(u64::MAX - P + 1, 2 * P, 'b', 0),
            VaError::Overflow { addr: u64::MAX - P + 1, range: 2 * P },
        ),
        (Va::object(0, P, 'b', 0), VaError::OutOfRange { addr: 0, range: P, start: P, end: 65 * P }),
        (
            Va::object(64 * P, 2 * P, 'b', 0),
            VaError::OutOfRange { addr: 64 * P, range: 2 * P, start: P, end: 65 * P },
        ),
        (
            Va::object(30 * P, 3 * P, 'b', 0),
            VaError::Reserved { addr: 30 * P, range: 3 * P, start: 32 * P, end: 36 * P },
        ),
        (Va::object(4 * P, P, 'b', u64::MAX - P + 1), VaError::Overflow { addr: 4 * P, range: P }),
    ];
    for (req, err) in cases {
        assert_eq!(vm.sm_map(&req), Err(err.clone()), "{req:?}");
        assert_eq!(vm.map(&req), Err(err));
    }
    assert_eq!(
        vm.sm_unmap(33 * P, P),
        Err(VaError::Reserved { addr: 33 * P, range: P, start: 32 * P, end: 36 * P })
    );
    assert_eq!(vm.sm_unmap(2 * P, 0), Err(VaError::ZeroSize { addr: 2 * P }));
    assert_eq!(vm.iter().cloned().collect::<Vec<_>>(), before);
    for (s, r, res) in [(0, 0, None), (1, P, None), (P, P, Some((0, P))), (u64::MAX - P + 1, 2 * P, None)] {
        assert!(matches!(VaSpace::<char>::new(s, r, res), Err(VaError::BadSpace { .. })));
    }
}

#[test]
fn bad_repeats_are_refused() {
    let vm = space(&[]);
    let bad = |v: Va<char>| matches!(vm.sm_map(&v), Err(VaError::BadRepeat { .. }));
    assert!(bad(va('a', 0, 6, 0).repeating(4 * P)), "range not a multiple of the period");
    assert!(bad(Va { repeat: Some(Repeat { start: 0, len: 0 }), ..va('a', 0, 4, 0) }));
    assert!(
        bad(Va { repeat: Some(Repeat { start: 0, len: 2 * P }), ..va('a', 0, 4, 4) }),
        "offset outside the range"
    );
    assert!(bad(Va { repeat: Some(Repeat { start: 0, len: P }), ..sp(0, 4, 0) }), "sparse cannot repeat");
}

#[test]
fn stale_op_lists_are_refused_whole() {
    let mut vm = space(&[va('a', 0, 4, 0)]);
    let ops = vm.sm_map(&va('b', 1, 2, 0)).unwrap();
    vm.apply(&ops).unwrap();
    let snapshot: Vec<_> = vm.iter().cloned().collect();
    assert!(matches!(vm.apply(&ops), Err(VaError::StaleOps { index: 0, .. })));
    // A map over a mapping that stays.
    assert!(matches!(vm.apply(&[Op::Map(va('z', 0, 1, 0))]), Err(VaError::StaleOps { index: 0, .. })));
    // A good first op and a bad second one: nothing is applied.
    let two = vec![Op::Map(va('z', 8, 9, 0)), Op::Map(va('y', 8, 9, 0))];
    assert!(matches!(vm.apply(&two), Err(VaError::StaleOps { index: 1, .. })));
    assert_eq!(vm.iter().cloned().collect::<Vec<_>>(), snapshot);
}

#[test]
fn repeat_mappings_keep_their_phase_when_cut() {
    // Object pages [4, 6) repeated over VA pages [0, 8): page v reads object page 4 + v % 2.
    let mut vm = space(&[]);
    vm.map(&va('a', 0, 8, 4).repeating(2 * P)).unwrap();
    let at = |vm: &VaSpace<char>, p: u64| vm.find(p * P).map(|v| v.offset_at(p * P) / P);
    for p in 0..8 {
        assert_eq!(at(&vm, p), Some(4 + p % 2));
    }
    vm.unmap(3 * P, 2 * P).unwrap();
    for p in [0, 1, 2, 5, 6, 7] {
        assert_eq!(at(&vm, p), Some(4 + p % 2), "page {p}");
    }
    assert_eq!(at(&vm, 3), None);
    // Re-mapping the hole in phase keeps; out of phase does not.
    let in_phase = va('a', 3, 5, 5).repeating(2 * P);
    let in_phase = Va { repeat: Some(Repeat { start: 4 * P, len: 2 * P }), ..in_phase };
    assert_eq!(vm.sm_map(&in_phase).unwrap(), vec![Op::Map(in_phase)]);
}

#[test]
fn flags_and_object_index() {
    let mut vm = space(&[]);
    let ro = VaFlags { read_only: true, no_exec: true };
    vm.map(&va('a', 0, 2, 0).with_flags(ro)).unwrap();
    vm.map(&va('a', 4, 6, 8)).unwrap();
    vm.map(&va('b', 2, 4, 0)).unwrap();
    assert_eq!(vm.find(P).unwrap().flags, ro);
    let of_a: Vec<u64> = vm.obj_mappings(&'a').map(|v| v.addr / P).collect();
    assert_eq!(of_a, vec![0, 4]);
    let ops = vm.bo_unmap(&'a');
    assert_eq!(ops.len(), 2);
    vm.apply(&ops).unwrap();
    assert_eq!(vm.obj_mappings(&'a').count(), 0);
    assert_eq!(vm.iter().map(|v| v.obj).collect::<Vec<_>>(), vec![Some('b')]);
}

// ---- property test: a brute-force model of §5 and a page oracle ----

/// §5 as written, over a plain list: the reference the real generator is held to.
fn model_sm_map(list: &[Va<char>], req: &Va<char>) -> Vec<Op<char>> {
    let (aa, ee, rr, ff) = (req.addr, req.end(), req.range, req.offset);
    let mut ops = Vec::new();
    let mut sorted: Vec<&Va<char>> = list.iter().filter(|v| v.addr < ee && v.end() > aa).collect();
    sorted.sort_by_key(|v| v.addr);
    for v in sorted {
        let (a, e, o, f) = (v.addr, v.end(), &v.obj, v.offset);
        let mut keep = o.is_some() && *o == req.obj;
        let piece = |s: u64, l: u64, off: u64| Va { addr: s, range: l, offset: off, ..v.clone() };
        if a == aa {
            keep &= f == ff;
            if e <= ee {
                ops.push(Op::Unmap { va: v.clone(), keep });
            } else {
                ops.push(Op::Remap {
                    prev: None,
                    next: Some(piece(ee, e - ee, f + rr)),
                    unmap: v.clone(),
                    keep,
                });
            }
        } else if a < aa {
            keep &= f + (aa - a) == ff;
            let prev = Some(piece(a, aa - a, f));
            let next = (e > ee).then(|| piece(ee, e - ee, f + (aa - a) + rr));
            ops.push(Op::Remap { prev, next, unmap: v.clone(), keep });
        } else {
            keep &= f == ff + (a - aa);
            if e <= ee {
                ops.push(Op::Unmap { va: v.clone(), keep });
            } else {
                ops.push(Op::Remap {
                    prev: None,
                    next: Some(piece(ee, e - ee, f + (ee - a))),
                    unmap: v.clone(),
                    keep,
                });
            }
        }
    }
    ops.push(Op::Map(req.clone()));
    ops
}

#[derive(Clone, Debug)]
enum Step {
    Map { obj: Option<char>, s: u64, len: u64, off: u64 },
    Unmap { s: u64, len: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    let obj = prop_oneof![Just(None), Just(Some('a')), Just(Some('b')), Just(Some('c'))];
    prop_oneof![
        3 => (obj, 0u64..40, 1u64..12, 0u64..8).prop_map(|(obj, s, len, off)| Step::Map { obj, s, len, off }),
        1 => (0u64..40, 1u64..16).prop_map(|(s, len)| Step::Unmap { s, len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_match_the_model_and_a_page_oracle(steps in proptest::collection::vec(step(), 1..60)) {
        let mut vm = VaSpace::<char>::new(0, 64 * P, None).unwrap();
        // page -> (object, object page)
        let mut oracle: BTreeMap<u64, (Option<char>, u64)> = BTreeMap::new();
        for st in &steps {
            match *st {
                Step::Map { obj, s, len, off } => {
                    let req = Va { obj, ..Va::object(s * P, len * P, 'x', off * P) };
                    let list: Vec<Va<char>> = vm.iter().cloned().collect();
                    let ops = vm.sm_map(&req).unwrap();
                    prop_assert_eq!(&ops, &model_sm_map(&list, &req));
                    vm.apply(&ops).unwrap();
                    for p in s..s + len {
                        oracle.insert(p, (obj, off + p - s));
                    }
                }
                Step::Unmap { s, len } => {
                    let ops = vm.sm_unmap(s * P, len * P).unwrap();
                    let kept_or_mapped = ops.iter().any(|o| {
                        matches!(o, Op::Map(_) | Op::Unmap { keep: true, .. } | Op::Remap { keep: true, .. })
                    });
                    prop_assert!(!kept_or_mapped);
                    vm.apply(&ops).unwrap();
                    for p in s..s + len {
                        oracle.remove(&p);
                    }
                }
            }
            for p in 0..64u64 {
                let got = vm.find(p * P).map(|v| (v.obj, v.offset_at(p * P) / P));
                prop_assert_eq!(got, oracle.get(&p).copied(), "page {}", p);
            }
            // Mappings never overlap and the object index matches the list.
            let all: Vec<&Va<char>> = vm.iter().collect();
            prop_assert!(all.windows(2).all(|w| w[0].end() <= w[1].addr));
            for o in ['a', 'b', 'c'] {
                let idx: Vec<u64> = vm.obj_mappings(&o).map(|v| v.addr).collect();
                let direct: Vec<u64> = all.iter().filter(|v| v.obj == Some(o)).map(|v| v.addr).collect();
                prop_assert_eq!(idx, direct);
            }
        }
    }
}
