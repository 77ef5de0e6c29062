//! The side-by-side report: vmbind and its peers on the same pages, in the same process, with
//! interleaved samples. The scenarios live in `vmbind::bench` (shared with `vmbind bench`).
//!
//! `cargo bench --bench report -- [--quick] [--json FILE] [FILTER]`
//!
//! Absolute times drift on shared machines; the ratios printed at the end are what to read.

fn main() {
    vmbind::bench::report_main();
}
