//! The benchmark scenarios shared by `benches/report.rs` (`cargo bench --bench report`) and
//! `vmbind bench`: vmbind and its peers on the same pages, in the same process, with
//! interleaved samples (feature `bench`).
//!
//! Every case is a named scenario (`suite/name`) measured for vmbind and, where one exists, for
//! each peer through its best API for the job: the `x86_64` and `aarch64-paging` crates mapping
//! the same pages, `vm-allocator` for IOVA, `vm-memory`'s IOTLB and a `BTreeMap` for
//! translation, a raw store loop and `memcpy` as floors. Absolute times drift on shared
//! machines; the [`Ratio`]s — medians of per-sample ratios of interleaved rows — are what to
//! read.
//!
//! ```no_run
//! // The memory suite, quietly, then its table and a plot.
//! let report = vmbind::bench::run(true, Some("mem/"), true);
//! for row in &report.rows {
//!     println!("{}", vmbind::bench::row_line(row));
//! }
//! std::fs::write("bench.svg", vmbind::bench::plot_svg(&report))?;
//! # Ok::<(), std::io::Error>(())
//! ```

mod cases;
mod harness;
mod plot;

pub use harness::{Ratio, Report, Row, header_line, row_line};
pub use plot::plot_svg;

/// The suites, as the case-name prefixes `vmbind bench SUITE` selects (`SUITE` may also be any
/// part of a case name).
pub const SUITES: [&str; 10] =
    ["pt", "raw", "iova", "iommu", "dma", "mem", "gpuvm", "service", "runtime", "vk"];

/// Runs every case whose name contains `filter` (all with `None`) — quick mode takes fewer
/// samples — then computes the ratios the issues set goals on. `silent` keeps it from printing
/// the rows and ratios as they come.
#[must_use]
pub fn run(quick: bool, filter: Option<&str>, silent: bool) -> Report {
    let mut r = Report::new(quick, filter.map(str::to_string), silent);
    run_on(&mut r);
    r
}

/// Runs the cases `r`'s filter selects into `r`, then its ratios.
fn run_on(r: &mut Report) {
    r.header();
    cases::pt::pt_cases(r);
    cases::iommu::iova_cases(r);
    cases::iommu::iommu_cases(r);
    cases::dma::dma_cases(r);
    cases::mem::mem_cases(r);
    cases::gpuvm::gpuvm_cases(r);
    cases::service::service_cases(r);
    #[cfg(feature = "vulkan")]
    cases::vk::vk_cases(r);
    #[cfg(feature = "vulkan")]
    cases::sparse::sparse_cases(r);
    ratios(r);
}

/// The `report` bench's entry point: `-- [--quick] [--json FILE] [FILTER]`.
pub fn report_main() {
    let (mut r, json) = Report::from_args();
    run_on(&mut r);
    if let Some(path) = json {
        match r.write_json(&path) {
            Ok(()) => println!("wrote {path}"),
            Err(e) => eprintln!("report: cannot write {path}: {e}"),
        }
    }
}

/// The cross-row ratios (peer / vmbind unless the label says otherwise).
fn ratios(r: &mut Report) {
    if !r.silent() {
        println!("\nratios (higher = vmbind faster unless noted):");
    }
    for peer in ["x86_64", "aarch64-paging"] {
        let label = format!("pt/map_4k_scattered {peer} / vmbind");
        r.ratio(&label, ("pt/map_4k_scattered", peer), ("pt/map_4k_scattered", "vmbind"));
    }
    let label = "pt/map_4k_scattered vmbind / raw store (lower better)";
    r.ratio(label, ("pt/map_4k_scattered", "vmbind"), ("raw/store_8b", "raw"));
    for case in ["pt/map_4k_scattered", "pt/map_4k_contiguous", "pt/map_huge"] {
        r.ratio(&format!("{case} vmbind / floor (lower better)"), (case, "vmbind"), (case, "floor"));
    }
    for (case, peer) in [
        ("pt/map_4k_per_call", "x86_64"),
        ("pt/map_4k_per_call", "aarch64-paging"),
        ("pt/unmap_4k_per_call", "x86_64"),
        ("pt/map_4k_contiguous", "aarch64-paging"),
        ("pt/map_4k_contiguous", "x86_64"),
        ("pt/map_huge", "aarch64-paging"),
        ("pt/translate", "x86_64"),
        ("pt/unmap_4k", "x86_64"),
        ("iova/alloc_free_small", "vm-allocator"),
        ("iova/alloc_large_100k", "vm-allocator"),
        ("iova/alloc_free_2t", "vmbind-1t"),
        ("iommu/translate_hit", "x86_64"),
        ("iommu/translate_hit", "vm-memory"),
        ("iommu/translate_hit", "btreemap"),
        ("iommu/translate_miss", "x86_64"),
        ("iommu/translate_miss_2t", "vmbind-1t"),
        ("iommu/map_4k", "btreemap"),
        ("iommu/map_4k", "vm-memory"),
    ] {
        r.ratio(&format!("{case} {peer} / vmbind"), (case, peer), (case, "vmbind"));
    }
    type Pair<'a> = (&'a str, &'a str);
    let pairs: [(&str, Pair, Pair); 12] = [
        (
            "iommu/translate_hit vmbind / raw read (lower better)",
            ("iommu/translate_hit", "vmbind"),
            ("iommu/translate_hit", "raw"),
        ),
        (
            "dma/map_page_loop / dma/two_step_array",
            ("dma/map_page_loop", "vmbind"),
            ("dma/two_step_array", "vmbind"),
        ),
        (
            "dma/two_step_per_bvec / dma/two_step_array",
            ("dma/two_step_per_bvec", "vmbind"),
            ("dma/two_step_array", "vmbind"),
        ),
        (
            "dma/two_step_array / pt/map_4k_scattered (lower better)",
            ("dma/two_step_array", "vmbind"),
            ("pt/map_4k_scattered", "vmbind"),
        ),
        (
            "gpuvm/bind_1g_iommu / pt/map_4k_scattered (lower better)",
            ("gpuvm/bind_1g_iommu", "vmbind"),
            ("pt/map_4k_scattered", "vmbind"),
        ),
        (
            "gpuvm/bind_1g_direct / gpuvm/bind_1g_contiguous",
            ("gpuvm/bind_1g_direct", "vmbind"),
            ("gpuvm/bind_1g_contiguous", "vmbind"),
        ),
        (
            "gpuvm/remap_1page_in_16g / gpuvm/remap_1page_in_1g (lower better)",
            ("gpuvm/remap_1page_in_16g", "vmbind"),
            ("gpuvm/remap_1page_in_1g", "vmbind"),
        ),
        (
            "service/bind_64k_unbatched / service/bind_64k_batched",
            ("service/bind_64k_unbatched", "vmbind"),
            ("service/bind_64k_batched", "vmbind"),
        ),
        (
            "vk/walk_gather / vk/plain_copy (lower better)",
            ("vk/walk_gather", "vmbind"),
            ("vk/plain_copy", "vmbind"),
        ),
        ("mem/copy vmbind / memcpy (lower better)", ("mem/copy", "vmbind"), ("mem/copy", "memcpy")),
        (
            "vk/sparse_bind_driver / gpuvm/commit_same_ops (driver per page / vmbind per page)",
            ("vk/sparse_bind_driver", "driver"),
            ("gpuvm/commit_same_ops", "vmbind"),
        ),
        (
            "vk/populate_gpu / vk/populate_cpu (lower = GPU faster)",
            ("vk/populate_gpu", "vmbind"),
            ("vk/populate_cpu", "vmbind"),
        ),
    ];
    for (label, a, b) in pairs {
        r.ratio(label, a, b);
    }
}

/// One `(case, impl)` measured in two runs ([`changes`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The case.
    pub case: String,
    /// The implementation.
    pub imp: String,
    /// Its unit.
    pub unit: String,
    /// The earlier run's median.
    pub old: f64,
    /// This run's median.
    pub new: f64,
}

impl Change {
    /// `new / old`: below 1 is faster now.
    #[must_use]
    pub fn factor(&self) -> f64 {
        self.new / self.old
    }
}

/// The rows measured in both `old` and `new`, in `new`'s order.
#[must_use]
pub fn changes(old: &Report, new: &Report) -> Vec<Change> {
    new.rows
        .iter()
        .filter_map(|n| {
            let o = old.rows.iter().find(|o| o.case == n.case && o.imp == n.imp)?;
            Some(Change {
                case: n.case.clone(),
                imp: n.imp.clone(),
                unit: n.unit.clone(),
                old: o.median,
                new: n.median,
            })
        })
        .collect()
}
