//! A picture of VMs' VA spaces as SVG: mappings as bands coloured by object (sparse ones
//! hatched, repeat ones outlined), under them the GPU table's leaves shaded by size (1 GiB,
//! 2 MiB, 4 KiB in a fragment run, plain 4 KiB, sparse), holes between mappings visible.
#![forbid(unsafe_code)]

use std::sync::Arc;

use super::Vm;
use crate::addr::PageSize;
use crate::svg::{Svg, palette};

const LEFT: f64 = 90.0;
const WIDTH: f64 = 1100.0;
const HOLE_PX: f64 = 22.0;
const PANEL: f64 = 150.0;

/// Leaf classes, darkest first: what a TLB entry covers.
const KINDS: [(&str, &str, &str); 5] = [
    ("1G", "#0b2545", "1 GiB leaf"),
    ("2M", "#13477b", "2 MiB leaf"),
    ("frag", "#3f88c5", "4 KiB in a fragment run"),
    ("4K", "#a9cdee", "4 KiB leaf"),
    ("sparse", "url(#sparse)", "sparse entry"),
];

/// A VA → x mapping that shows mapped ranges linearly and shrinks big holes to a fixed width.
struct Axis {
    /// `(va_start, va_end, x_start, px_per_byte)`, ascending.
    segs: Vec<(u64, u64, f64, f64)>,
}

impl Axis {
    /// An axis over the merged `ranges` (sorted, disjoint) within `[lo, hi)`.
    fn new(ranges: &[(u64, u64)], lo: u64, hi: u64) -> Self {
        let mapped: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        // Pieces: mapped ranges and the holes around them; a hole longer than 1/40 of what is
        // mapped (or any, when nothing is) is drawn at a fixed width.
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
        let mut at = lo;
        for &(s, e) in ranges {
            if s > at {
                pieces.push((at, s, false));
            }
            pieces.push((s, e, true));
            at = e;
        }
        if at < hi {
            pieces.push((at, hi, false));
        }
        let big = |s: u64, e: u64, m: bool| !m && (mapped == 0 || (e - s) > mapped / 40);
        let fixed = pieces.iter().filter(|&&(s, e, m)| big(s, e, m)).count() as f64 * HOLE_PX;
        let linear: u64 = pieces.iter().filter(|&&(s, e, m)| !big(s, e, m)).map(|(s, e, _)| e - s).sum();
        let scale = if linear > 0 { (WIDTH - fixed).max(10.0) / linear as f64 } else { 0.0 };
        let mut x = LEFT;
        let mut segs = Vec::new();
        for (s, e, m) in pieces {
            let (w, k) = if big(s, e, m) {
                (HOLE_PX, HOLE_PX / (e - s) as f64)
            } else {
                ((e - s) as f64 * scale, scale)
            };
            segs.push((s, e, x, k));
            x += w;
        }
        Axis { segs }
    }

    fn x(&self, va: u64) -> f64 {
        let i = self.segs.partition_point(|s| s.1 <= va).min(self.segs.len().saturating_sub(1));
        match self.segs.get(i) {
            Some(&(s, _, x, k)) => x + va.saturating_sub(s) as f64 * k,
            None => LEFT,
        }
    }

    /// The holes drawn at a fixed width.
    fn broken(&self) -> impl Iterator<Item = (u64, u64, f64)> + '_ {
        self.segs
            .iter()
            .filter(|s| (s.3 - HOLE_PX / (s.1 - s.0) as f64).abs() < f64::EPSILON)
            .map(|s| (s.0, s.1, s.2))
    }
}

fn size_label(b: u64) -> String {
    const U: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (u, sh) in U {
        if b >= 1 << sh {
            let v = b as f64 / f64::from(1u32 << (sh - 10)) / 1024.0;
            return if v.fract() == 0.0 { format!("{v:.0} {u}") } else { format!("{v:.1} {u}") };
        }
    }
    format!("{b} B")
}

/// An SVG of the VMs' VA spaces, one panel per `(name, vm)`. Each mapping is a `rect` with
/// `class="map"`, `data-va`, `data-end` (hex) and `data-bo` (`bo<N>` or `sparse`); each run
/// of leaves of one kind is a `rect` with `class="leaf"` and `data-kind` (`1G`, `2M`, `frag`,
/// `4K`, `sparse`); holes drawn shortened are `class="hole"`.
#[must_use]
pub fn svg_picture(vms: &[(String, Arc<Vm>)]) -> String {
    let height = 40.0 + PANEL * vms.len().max(1) as f64 + 40.0;
    let mut svg = Svg::new(LEFT + WIDTH + 30.0, height);
    svg.text(
        10.0,
        20.0,
        13.0,
        "start",
        "#222",
        "vmbind: GPU VA space (mappings coloured by object; leaves shaded by size; long holes shortened)",
    );
    let mut y0 = 40.0;
    for (name, vm) in vms {
        panel(&mut svg, name, vm, y0);
        y0 += PANEL;
    }
    // Legend.
    let mut lx = 10.0;
    for (kind, fill, label) in KINDS {
        svg.rect(
            lx,
            y0 + 6.0,
            12.0,
            12.0,
            fill,
            &[("class", "legend".into()), ("data-kind", kind.into())],
            "",
        );
        svg.text(lx + 16.0, y0 + 16.0, 11.0, "start", "#222", label);
        lx += 30.0 + 7.0 * label.len() as f64;
    }
    let defs = r##"<pattern id="sparse" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" height="6" fill="#eeeeee"/><line x1="0" y1="0" x2="0" y2="6" stroke="#888888" stroke-width="2"/></pattern>"##;
    svg.finish(defs)
}

fn panel(svg: &mut Svg, name: &str, vm: &Vm, y0: f64) {
    let maps = vm.mappings();
    let mut leaves = Vec::new();
    vm.table().for_each_leaf(|l| leaves.push(l));
    let mut ranges: Vec<(u64, u64)> = maps.iter().map(|m| (m.addr, m.end())).collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(l) if s <= l.1 => l.1 = l.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let b = vm.bounds();
    let (lo, hi) = (b.start(), b.end());
    let axis = Axis::new(&merged, lo, hi);
    let how = if vm.device().is_translated() { "behind an IOMMU" } else { "direct" };
    let mapped: u64 = merged.iter().map(|(s, e)| e - s).sum();
    let head = format!(
        "VM {name} ({how}): [{lo:#x}, {hi:#x}), {} mapping(s), {} mapped, {} table page(s)",
        maps.len(),
        size_label(mapped),
        vm.table().table_pages()
    );
    svg.text(10.0, y0 + 14.0, 12.0, "start", "#000", &head);
    let (ym, yl) = (y0 + 30.0, y0 + 72.0);
    svg.text(LEFT - 8.0, ym + 20.0, 11.0, "end", "#333", "mappings");
    svg.text(LEFT - 8.0, yl + 16.0, 11.0, "end", "#333", "leaves");
    svg.rect(LEFT, ym, WIDTH, 30.0, "#f7f7f7", &[], "");
    svg.rect(LEFT, yl, WIDTH, 24.0, "#f7f7f7", &[], "");
    for (s, e, x) in axis.broken() {
        let attrs =
            [("class", "hole".to_string()), ("data-va", format!("{s:#x}")), ("data-end", format!("{e:#x}"))];
        svg.rect(
            x + 3.0,
            ym - 2.0,
            HOLE_PX - 6.0,
            60.0,
            "#ffffff",
            &attrs,
            &format!("hole [{s:#x}, {e:#x}): {}", size_label(e - s)),
        );
        svg.line(x + 5.0, ym - 4.0, x + HOLE_PX - 5.0, ym + 4.0, "#999999", false);
        svg.line(x + 5.0, yl + 20.0, x + HOLE_PX - 5.0, yl + 28.0, "#999999", false);
    }
    for m in &maps {
        let (x1, x2) = (axis.x(m.addr), axis.x(m.end()));
        let (bo, fill) = match m.obj {
            Some(bo) => (bo.to_string(), palette(bo.0 as usize)),
            None => ("sparse".to_string(), "url(#sparse)".to_string()),
        };
        let mut attrs = vec![
            ("class", "map".to_string()),
            ("data-va", format!("{:#x}", m.addr)),
            ("data-end", format!("{:#x}", m.end())),
            ("data-bo", bo.clone()),
        ];
        let mut tip = format!("[{:#x}, {:#x}) {}: {bo}", m.addr, m.end(), size_label(m.range));
        if m.obj.is_some() {
            tip += &format!(" @ {:#x}", m.offset);
        }
        if let Some(r) = m.repeat {
            attrs.push(("data-repeat", format!("{:#x}", r.len)));
            attrs.push(("stroke", "#000000".into()));
            attrs.push(("stroke-dasharray", "4,2".into()));
            tip += &format!(", repeating {}", size_label(r.len));
        }
        if m.flags.read_only {
            tip += ", read only";
        }
        svg.rect(x1, ym, (x2 - x1).max(1.5), 30.0, &fill, &attrs, &tip);
    }
    // Leaves, merged into runs of one kind that touch.
    let kind = |l: &crate::pt::Leaf<crate::addr::GpuVa, crate::addr::DmaAddr>| -> usize {
        if l.sparse {
            4
        } else {
            match l.size {
                PageSize::Size1G => 0,
                PageSize::Size2M => 1,
                PageSize::Size4K if l.frag > 0 => 2,
                PageSize::Size4K => 3,
            }
        }
    };
    let mut runs: Vec<(usize, u64, u64, u64)> = Vec::new();
    for l in &leaves {
        let (k, s) = (kind(l), l.va.as_u64());
        let e = s + l.size.bytes();
        match runs.last_mut() {
            Some(r) if r.0 == k && r.2 == s => {
                r.2 = e;
                r.3 += 1;
            }
            _ => runs.push((k, s, e, 1)),
        }
    }
    for (k, s, e, count) in runs {
        let (x1, x2) = (axis.x(s), axis.x(e));
        let (kname, fill, label) = KINDS[k];
        let attrs = [
            ("class", "leaf".to_string()),
            ("data-kind", kname.to_string()),
            ("data-va", format!("{s:#x}")),
            ("data-end", format!("{e:#x}")),
        ];
        svg.rect(
            x1,
            yl,
            (x2 - x1).max(1.0),
            24.0,
            fill,
            &attrs,
            &format!("[{s:#x}, {e:#x}): {count} x {label}"),
        );
    }
    // Address labels at the starts of mapped ranges, where there is room.
    let mut last_x = f64::NEG_INFINITY;
    for &(s, e) in &merged {
        let x = axis.x(s);
        if x - last_x > 110.0 {
            svg.line(x, yl + 26.0, x, yl + 32.0, "#555555", false);
            svg.text(x, yl + 44.0, 10.0, "start", "#444", &format!("{s:#x}"));
            last_x = x;
        }
        let _ = e;
    }
}
