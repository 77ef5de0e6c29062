//! `vmbind`: the data walk on a generated buffer (`demo`), workload replay (`run`), a VM's state
//! as text and SVG (`dump`), and the benchmark report with its chart (`bench`).
//!
//! Exit codes: 0 success, 1 failure (one `vmbind: error:` line plus context), 2 usage errors.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use vmbind::addr::{GpuVa, PAGE_SIZE, PageSize};
use vmbind::bench::{self, Report};
use vmbind::dma::{Attrs, Device, Direction, DmaVec, IovaState};
use vmbind::gpuvm::{BindOp, Va, Vm, svg_picture};
use vmbind::iommu::{DeviceId, DomainConfig, Iommu};
use vmbind::mem::PhysMem;
use vmbind::nvme::{self, ListPool, MAX_TRANSFER};
use vmbind::workload::{Replay, ReplayOptions, Summary, Workload, checksum, pattern};

/// Populate GPU page tables from DMA-mapped memory, fast: demo, replay, dump and benchmark.
#[derive(Parser)]
#[command(name = "vmbind", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole data walk on a generated buffer: pages, two-step DMA map, DMA list, PRP list,
    /// GPU VM bind, and a byte-exact read back through both tables (and on Vulkan when a
    /// device exists).
    Demo(DemoArgs),
    /// Replay a workload (JSON lines) through the bind service and print a summary.
    Run(RunArgs),
    /// Replay a workload and show the VMs' state: mappings and tables, and an SVG picture.
    Dump(DumpArgs),
    /// Run the benchmark scenarios against the peers: a table, an SVG chart, a comparison.
    Bench(BenchArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// Buffer size in bytes (a number, 0x hex, or e.g. 16MiB).
    #[arg(long, default_value = "16MiB", value_parser = parse_num)]
    size: u64,
    /// Seed of the buffer's contents and page placement.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
}

#[derive(Args)]
struct RunArgs {
    /// The workload file.
    workload: PathBuf,
    /// Write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Fold each VM's queues onto at most N bind queues.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    queues: Option<u64>,
    /// Service worker threads.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
    /// Turn the service's coalescing off (one prepare/commit per submission).
    #[arg(long)]
    no_coalesce: bool,
}

#[derive(Args)]
struct DumpArgs {
    /// The workload file.
    workload: PathBuf,
    /// Stop after this line of the file (the state there), instead of at the end.
    #[arg(long, value_name = "OP")]
    at: Option<usize>,
    /// Write a picture of the VA space to this SVG file.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    /// Only the cases whose names contain this (a suite: pt, raw, iova, iommu, dma, mem, gpuvm,
    /// service, runtime, vk; or any part of a case name).
    suite: Option<String>,
    /// Fewer samples per case.
    #[arg(long)]
    quick: bool,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write an SVG bar chart of vmbind against each peer per case.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Compare with an earlier run's JSON.
    #[arg(long, value_name = "OLD.json")]
    compare: Option<PathBuf>,
}

fn parse_num(s: &str) -> Result<u64, String> {
    vmbind::workload::Num::parse(s)
}

/// A failure: one line, then context lines.
struct Failure {
    msg: String,
    context: Vec<String>,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure { msg: e.to_string(), context: Vec::new() }
    }
}

fn fail(msg: impl Into<String>, context: &[&str]) -> Failure {
    Failure { msg: msg.into(), context: context.iter().map(|s| s.to_string()).collect() }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = match cli.cmd {
        Cmd::Demo(a) => demo(&a),
        Cmd::Run(a) => run(&a),
        Cmd::Dump(a) => dump(&a),
        Cmd::Bench(a) => bench_cmd(&a),
    };
    match out {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("vmbind: error: {}", f.msg);
            for c in f.context {
                eprintln!("  {c}");
            }
            ExitCode::FAILURE
        }
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn load(path: &Path) -> Result<Workload, Failure> {
    Workload::load(path).map_err(|e| {
        let ctx = format!("in {}: nothing was applied", path.display());
        fail(e.to_string(), &[&ctx])
    })
}

/// A progress reporter: a bar on a terminal, else a plain line at every tenth.
fn progress(total: usize, what: &str) -> impl FnMut(usize, usize) {
    let tty = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(total as u64);
        let style = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} lines ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        b.set_style(style);
        b.set_message(what.to_string());
        b
    });
    let what = what.to_string();
    let mut shown = 0usize;
    move |done, total| match &bar {
        Some(b) => {
            b.set_position(done as u64);
            if done >= total {
                b.finish_and_clear();
            }
        }
        None => {
            let tenth = (done * 10).checked_div(total).unwrap_or(10);
            if tenth > shown || (done >= total && shown < 10) {
                shown = tenth.max(if done >= total { 10 } else { 0 });
                eprintln!("{what}: {done}/{total} lines");
            }
        }
    }
}

fn run(a: &RunArgs) -> Result<(), Failure> {
    let w = load(&a.workload)?;
    let opts = ReplayOptions {
        queues: a.queues.map(|q| q as usize),
        threads: a.threads as usize,
        coalesce: !a.no_coalesce,
    };
    let ctx = format!("while replaying {}", a.workload.display());
    let mut r = Replay::new(&w, opts).map_err(|e| fail(e.to_string(), &[&ctx]))?;
    let s = r.run(None, progress(w.lines.len(), "replay")).map_err(|e| fail(e.to_string(), &[&ctx]))?;
    print_summary(&a.workload, &s);
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&s)?;
        std::fs::write(path, text + "\n")
            .map_err(|e| fail(format!("cannot write {}: {e}", path.display()), &[]))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn print_summary(path: &Path, s: &Summary) {
    let name = s.name.as_deref().unwrap_or("");
    println!("workload {} {name}: {} lines replayed, {} checks passed", path.display(), s.lines, s.checks);
    let rows: [(&str, String); 13] = [
        ("ops", s.ops.to_string()),
        ("pages (4 KiB)", s.pages.to_string()),
        ("submissions", s.submissions.to_string()),
        ("batches", s.batches.to_string()),
        ("ops per batch", format!("{:.2}", s.mean_batch)),
        ("merged ops", s.merged.to_string()),
        ("IOTLB flushes", s.iotlb_flushes.to_string()),
        ("GPU TLB flushes", s.gpu_tlb_flushes.to_string()),
        ("failed", s.failed.to_string()),
        ("wall", format!("{:.3} s (setup {:.3} s, binds {:.3} s)", s.wall_s, s.setup_s, s.bind_s)),
        ("throughput", format!("{:.0} ops/s ({:.0} ns/op)", s.ops_per_s, s.ns_per_op)),
        ("mapped", format!("{:.2} GiB/s", s.gib_per_s)),
        ("queues", s.queues.len().to_string()),
    ];
    for (k, v) in rows {
        println!("  {k:<16} {v}");
    }
    println!(
        "  {:<24} {:>9} {:>10} {:>10} {:>10}",
        "latency (submit→visible)", "completed", "p50 µs", "p99 µs", "max µs"
    );
    for q in &s.queues {
        let name = format!("{}/{}", q.vm, q.queues.join("+"));
        println!("  {name:<24} {:>9} {:>10.1} {:>10.1} {:>10.1}", q.completed, q.p50_us, q.p99_us, q.max_us);
    }
}

fn dump(a: &DumpArgs) -> Result<(), Failure> {
    let w = load(&a.workload)?;
    let ctx = format!("while replaying {}", a.workload.display());
    let mut r = Replay::new(&w, ReplayOptions::default()).map_err(|e| fail(e.to_string(), &[&ctx]))?;
    let s = r.run(a.at, |_, _| {}).map_err(|e| fail(e.to_string(), &[&ctx]))?;
    let at = match a.at {
        Some(n) => format!("after line {n}"),
        None => "at the end".to_string(),
    };
    println!("workload {}: state {at} ({} lines applied, {} ops)", a.workload.display(), s.lines, s.ops);
    let vms = r.vms();
    for (name, vm) in &vms {
        println!("\n== VM {name} ==");
        print!("{}", vm.dump());
        println!("  {}", leaf_summary(vm));
    }
    if let Some(path) = &a.svg {
        std::fs::write(path, svg_picture(&vms))
            .map_err(|e| fail(format!("cannot write {}: {e}", path.display()), &[]))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// "leaves: 2 x 2 MiB, 3 x 4 KiB (1 in fragment runs), 0 sparse".
fn leaf_summary(vm: &Vm) -> String {
    let (mut g, mut m, mut k, mut frag, mut sparse) = (0u64, 0u64, 0u64, 0u64, 0u64);
    vm.table().for_each_leaf(|l| {
        if l.sparse {
            sparse += 1;
            return;
        }
        match l.size {
            PageSize::Size1G => g += 1,
            PageSize::Size2M => m += 1,
            PageSize::Size4K => {
                k += 1;
                frag += u64::from(l.frag > 0);
            }
        }
    });
    format!(
        "leaves: {g} x 1 GiB, {m} x 2 MiB, {k} x 4 KiB ({frag} in fragment runs), {sparse} sparse entries"
    )
}

fn bench_cmd(a: &BenchArgs) -> Result<(), Failure> {
    let old = match &a.compare {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| fail(format!("cannot read {}: {e}", p.display()), &[]))?;
            Some(
                Report::from_json(&text)
                    .map_err(|e| fail(format!("{} is not a vmbind report: {e}", p.display()), &[]))?,
            )
        }
        None => None,
    };
    let r = bench::run(a.quick, a.suite.as_deref(), false);
    if r.rows.is_empty() {
        return Err(fail(
            format!("no case matches `{}`", a.suite.as_deref().unwrap_or("")),
            &[&format!("suites: {}", bench::SUITES.join(", "))],
        ));
    }
    if let Some(path) = &a.json {
        r.write_json(&path.display().to_string())
            .map_err(|e| fail(format!("cannot write {}: {e}", path.display()), &[]))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &a.plot {
        std::fs::write(path, bench::plot_svg(&r))
            .map_err(|e| fail(format!("cannot write {}: {e}", path.display()), &[]))?;
        println!("wrote {}", path.display());
    }
    if let Some(old) = old {
        let changes = bench::changes(&old, &r);
        println!(
            "\ncompared with {} ({} rows in both):",
            a.compare.as_ref().map_or(String::new(), |p| p.display().to_string()),
            changes.len()
        );
        println!("{:<26} {:<16} {:>12} {:>12} {:>9}", "case", "impl", "old", "new", "new/old");
        for c in &changes {
            let tag = if c.factor() < 0.9 {
                "  faster"
            } else if c.factor() > 1.1 {
                "  slower"
            } else {
                ""
            };
            println!(
                "{:<26} {:<16} {:>12.3} {:>12.3} {:>8.2}x{tag}",
                c.case,
                c.imp,
                c.old,
                c.new,
                c.factor()
            );
        }
        let mut any = false;
        for n in &r.ratios {
            if let Some(o) = old.ratios.iter().find(|o| o.label == n.label) {
                if !any {
                    println!("\nratios, old → new:");
                    any = true;
                }
                println!("  {:<58} {:>8.2}x → {:>8.2}x", n.label, o.median, n.median);
            }
        }
    }
    Ok(())
}

/// GPU VA of the demo's buffer.
const VA: u64 = 0x10_0000_0000;

fn demo(a: &DemoArgs) -> Result<(), Failure> {
    let len = a.size;
    if len == 0 || len > 4 << 30 {
        return Err(fail(format!("--size {len:#x}: give 1 byte to 4 GiB"), &[]));
    }
    println!("vmbind demo: the data walk of DESIGN.md on a generated {len}-byte buffer");
    // 0. The bytes.
    let t = Instant::now();
    let mut data = vec![0u8; len as usize];
    pattern(a.seed, &mut data);
    let want = checksum(&data);
    println!("0. bytes: {len} generated (seed {:#x}), checksum {want:#018x} [{:.1} ms]", a.seed, ms(t));

    // 1. Pages in the arena, as a bio_vec array.
    let t = Instant::now();
    let arena = (len * 5 / 4 + (64 << 20)).next_multiple_of(2 << 20);
    let mem = Arc::new(PhysMem::new(arena)?);
    let bvecs = mem.bvecs_from_bytes(&data, Some(a.seed))?;
    println!(
        "1. pages: {} scattered 4 KiB frames of a {} MiB PhysMem arena, a BioVec array of {} segments [{:.1} ms]",
        bvecs.len(),
        arena >> 20,
        bvecs.len(),
        ms(t)
    );

    // 2. A storage device behind the IOMMU maps them with the two-step API.
    let iommu = Iommu::new(mem.clone());
    let nvme_dom = iommu.create_domain(DomainConfig::default())?;
    let (ssd, gpu) = (DeviceId(2), DeviceId(3));
    iommu.register_device(ssd, true)?;
    iommu.attach(ssd, &nvme_dom)?;
    let dev = Device::translated(&iommu, ssd)?;
    let t = Instant::now();
    let mapped = len.next_multiple_of(PAGE_SIZE);
    let mut state =
        IovaState::try_alloc(&dev, bvecs[0].phys, mapped)?.ok_or("the device is not translated")?;
    let dir = Direction::ToDevice;
    state.link_bvecs(&dev, 0, &bvecs, dir, Attrs::default())?;
    state.sync(&dev, 0, mapped)?;
    let dt = ms(t);
    println!(
        "2. two-step DMA (storage device {ssd}): IOVA [{:#x}, +{mapped:#x}) reserved once, {} bio_vecs linked in one call and one IOMMU walk, one IOTLB sync [{dt:.3} ms, {:.1} ns/page]",
        state.addr().as_u64(),
        bvecs.len(),
        dt * 1e6 / bvecs.len() as f64
    );

    // 3. The DMA list, and the PRP lists of the NVMe commands that carry it.
    let t = Instant::now();
    let list = DmaVec::from_segment(state.addr(), len)?;
    let mut pool = ListPool::new(&dev, 64)?;
    let (mut cmds, mut list_pages, mut verified) = (0u64, 0usize, 0u64);
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(MAX_TRANSFER);
        let seg = DmaVec::from_segment(state.addr().checked_add(off).ok_or("IOVA past 2^64")?, n)?;
        let prp = nvme::build_prp(&mut pool, &seg, PAGE_SIZE, MAX_TRANSFER)?;
        list_pages += prp.lists.len();
        // The controller's side: follow PRP1/PRP2 through the IOMMU and compare.
        let back = nvme::read_prp(&iommu, ssd, prp.prp1, prp.prp2, n, PAGE_SIZE)?;
        if back[..] != data[off as usize..(off + n) as usize] {
            return Err(fail(format!("the PRP list of command {cmds} reads other bytes"), &[]));
        }
        verified += n;
        pool.release(prp.lists);
        cmds += 1;
        off += n;
    }
    println!(
        "3. DMA list: {} segment(s), {} bytes; as {cmds} NVMe command(s) of at most {} MiB: {list_pages} PRP list page(s), every command read back by the controller-side decoder ({verified} bytes) [{:.1} ms]",
        list.len(),
        list.total_len(),
        MAX_TRANSFER >> 20,
        ms(t)
    );

    // 4. The GPU: its own domain, a VM, the pages as a buffer object, one bind.
    let gpu_dom = iommu.create_domain(DomainConfig::default())?;
    iommu.register_device(gpu, true)?;
    iommu.attach(gpu, &gpu_dom)?;
    let vm = Vm::new(Device::translated(&iommu, gpu)?, 1 << 40)?;
    let frames: Vec<_> = bvecs.iter().map(|b| b.phys).collect();
    let bo = vm.create_bo(vmbind::mem::BioVec::from_frames(&frames))?;
    let t = Instant::now();
    vm.bind(&[BindOp::Map(Va::object(VA, mapped, bo, 0))])?;
    let dt = ms(t);
    let iova = vm.table().translate(GpuVa::new(VA)).ok_or("the bound buffer does not translate")?.pa;
    println!(
        "4. GPU VM (GPU {gpu}): {bo} DMA-mapped into IOVA [{:#x}, +{mapped:#x}) and bound at GPU VA {VA:#x} [{dt:.3} ms, {:.2} ns/page]; {}; {} table page(s)",
        iova.as_u64(),
        dt * 1e6 / frames.len() as f64,
        leaf_summary(&vm),
        vm.table().table_pages()
    );

    // 5. Read back through both tables: GPU VA -> IOVA (GPU table) -> physical (IOMMU table).
    let t = Instant::now();
    let mut back = vec![0u8; len as usize];
    vm.gpu_read(VA, &mut back)?;
    let dt = ms(t);
    let got = checksum(&back);
    if back != data {
        let at = back.iter().zip(&data).position(|(x, y)| x != y).unwrap_or(0);
        return Err(fail(format!("byte {at} differs after both translations (checksum {got:#018x})"), &[]));
    }
    println!(
        "5. read back through the GPU table and the IOMMU table (CPU walk): {len} bytes byte-exact, checksum {got:#018x} [{dt:.1} ms]"
    );
    let backend = vulkan_walk(&mem, &vm, &data)?;
    let fault =
        vm.gpu_read(VA + mapped, &mut [0u8; 1]).map_or_else(|f| f.to_string(), |()| "no fault".into());
    println!("   past the buffer: {fault}");
    vm.unbind(VA, mapped)?;
    vm.destroy_bo(bo)?;
    state.unlink(&dev, 0, mapped, dir, Attrs::default())?;
    state.destroy(&dev, 0, dir, Attrs::default())?;
    println!("OK ({backend}): verified");
    Ok(())
}

/// Step 6: the same walk by a Vulkan device, when there is one.
fn vulkan_walk(mem: &Arc<PhysMem>, vm: &Vm, data: &[u8]) -> Result<String, Failure> {
    #[cfg(feature = "vulkan")]
    {
        use vmbind::vk::{ArenaImport, Vk, WalkGather};
        match Vk::new() {
            Ok(ctx) => {
                let t = Instant::now();
                let import = Arc::new(ArenaImport::new(&ctx, mem)?);
                let g = WalkGather::new(&import)?;
                let pages: Vec<u64> =
                    (0..(data.len() as u64).div_ceil(PAGE_SIZE)).map(|i| VA + i * PAGE_SIZE).collect();
                let mut job = g.job(vm, &pages)?;
                let faults = job.run()?;
                if let Some(f) = faults.first() {
                    return Err(fail(
                        format!("{} GPU fault(s) on Vulkan, the first: {f}", faults.len()),
                        &[],
                    ));
                }
                if job.bytes()[..data.len()] != *data {
                    return Err(fail("the Vulkan walk read other bytes", &[ctx.device_name()]));
                }
                let messages = ctx.validation_messages();
                if !messages.is_empty() {
                    return Err(fail(format!("validation layer: {messages:?}"), &[]));
                }
                println!(
                    "6. Vulkan device {}: the arena imported zero copy, walk_gather walked both tables for {} pages, byte-exact [{:.1} ms]",
                    ctx.device_name(),
                    pages.len(),
                    ms(t)
                );
                return Ok(format!("Vulkan: {}", ctx.device_name()));
            }
            Err(e) => println!("6. no Vulkan ({e}): the CPU walk above is the read back"),
        }
    }
    #[cfg(not(feature = "vulkan"))]
    println!("6. built without the `vulkan` feature: the CPU walk above is the read back");
    let _ = (mem, vm, data);
    Ok("CPU path".to_string())
}
