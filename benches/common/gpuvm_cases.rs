//! GPU VM cases of the report: op generation of the VA-space core.

use vmbind::gpuvm::{GPU_PAGE, Va, VaSpace};

use crate::harness::{Report, timed};
use crate::rng::SplitMix64;

/// Mappings in the space of `gpuvm/sm_map_100k`.
const MAPPINGS: u64 = 100_000;
/// Each is 4 pages.
const PAGES_EACH: u64 = 4;

pub fn gpuvm_cases(r: &mut Report) {
    let case = "gpuvm/sm_map_100k";
    if !r.wants(case) {
        return;
    }
    // 100 000 adjacent mappings of 4 pages each (objects 0..100 000); each request starts in the
    // middle of one mapping, covers the next and ends in the middle of the one after: 3
    // overlapping mappings, so two REMAPs, one UNMAP and the MAP.
    let span = PAGES_EACH * GPU_PAGE;
    let mut vm = VaSpace::<u64>::new(0, 1 << 40, None).unwrap();
    for i in 0..MAPPINGS {
        vm.map(&Va::object(i * span, span, i, 0)).unwrap();
    }
    let mut rng = SplitMix64::new(77);
    let reqs: Vec<Va<u64>> = (0..10_000)
        .map(|_| {
            let i = rng.below(MAPPINGS - 3);
            Va::object(i * span + 2 * GPU_PAGE, span * 2, u64::MAX, 0)
        })
        .collect();
    assert_eq!(vm.sm_map(&reqs[0]).unwrap().len(), 4);
    let (vm, reqs) = (&vm, &reqs);
    let run = timed(|| (), |()| reqs.iter().map(|q| vm.sm_map(q).unwrap().len()).sum::<usize>());
    let n = r.samples(5.0);
    r.compare(case, "ns/request", reqs.len() as f64, n, vec![("vmbind", run)]);
}
