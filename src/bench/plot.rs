//! The benchmark chart: per case, one horizontal bar per implementation on one log axis of
//! nanoseconds per unit, each peer's bar labelled with its ratio to vmbind.
#![forbid(unsafe_code)]

use super::{Report, Row};
use crate::svg::{Svg, palette};

const LEFT: f64 = 250.0;
const CHART: f64 = 560.0;
const RIGHT: f64 = 260.0;
const BAR: f64 = 13.0;
const TITLE: f64 = 18.0;
const GAP: f64 = 8.0;
const TOP: f64 = 56.0;

/// "1.5 ns", "20 µs", ...
fn ns_label(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{} µs", ns / 1e3)
    } else {
        format!("{ns} ns")
    }
}

/// An SVG bar chart of `report`: for every case, vmbind and each peer on a log scale (the
/// medians, with min–max whiskers), peers labelled `N× vmbind` (their median over vmbind's:
/// above 1, vmbind is faster). Each bar is a `rect` with `class="bar"` and `data-case`,
/// `data-impl`, `data-median` attributes.
#[must_use]
pub fn plot_svg(report: &Report) -> String {
    // Cases in order of first appearance, with their rows.
    let mut cases: Vec<(&str, Vec<&Row>)> = Vec::new();
    for row in &report.rows {
        match cases.iter_mut().find(|(c, _)| *c == row.case) {
            Some((_, v)) => v.push(row),
            None => cases.push((&row.case, vec![row])),
        }
    }
    let mut imps: Vec<&str> = vec!["vmbind"];
    for row in &report.rows {
        if !imps.contains(&row.imp.as_str()) {
            imps.push(&row.imp);
        }
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    let vals = report.rows.iter().flat_map(|r| [r.min, r.max, r.median]).filter(|&x| positive(x));
    let (lo, hi) = vals.fold((f64::INFINITY, 0.0f64), |(l, h), x| (l.min(x), h.max(x)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (1.0, 10.0) };
    let d0 = lo.log10().floor();
    let d1 = hi.log10().ceil().max(d0 + 1.0);
    let x_of = |ns: f64| LEFT + (ns.max(10f64.powf(d0)).log10() - d0) / (d1 - d0) * CHART;

    let rows_h: f64 = cases.iter().map(|(_, v)| TITLE + v.len() as f64 * (BAR + 3.0) + GAP).sum();
    let height = TOP + rows_h + 30.0;
    let width = LEFT + CHART + RIGHT;
    let mut svg = Svg::new(width, height);
    let title = format!(
        "vmbind bench ({} mode): median time per unit, log scale; N× = peer / vmbind (above 1: vmbind faster)",
        if report.quick { "quick" } else { "full" }
    );
    svg.text(10.0, 20.0, 13.0, "start", "#222", &title);
    // Legend.
    let mut lx = 10.0;
    for (i, imp) in imps.iter().enumerate() {
        svg.rect(lx, 30.0, 10.0, 10.0, &palette(i), &[], "");
        svg.text(lx + 14.0, 39.0, 11.0, "start", "#222", imp);
        lx += 24.0 + 7.0 * imp.len() as f64;
    }
    // Decade grid.
    let bottom = TOP + rows_h;
    let mut d = d0;
    while d <= d1 {
        let x = x_of(10f64.powf(d));
        svg.line(x, TOP - 4.0, x, bottom, "#cccccc", true);
        svg.text(x, bottom + 14.0, 10.0, "middle", "#555", &ns_label(10f64.powf(d)));
        d += 1.0;
    }
    let mut y = TOP;
    for (case, rows) in &cases {
        let unit = rows.first().map_or("", |r| r.unit.as_str());
        svg.text(10.0, y + 13.0, 12.0, "start", "#000", &format!("{case}  ({unit})"));
        y += TITLE;
        let base = rows.iter().find(|r| r.imp == "vmbind").map(|r| r.median);
        for r in rows {
            let colour = palette(imps.iter().position(|i| *i == r.imp).unwrap_or(0));
            let x1 = x_of(r.median);
            let attrs = [
                ("class", "bar".to_string()),
                ("data-case", r.case.clone()),
                ("data-impl", r.imp.clone()),
                ("data-median", format!("{}", r.median)),
            ];
            let tip = format!(
                "{} {}: median {:.3} {} (min {:.3}, max {:.3})",
                r.case, r.imp, r.median, r.unit, r.min, r.max
            );
            svg.text(LEFT - 6.0, y + BAR - 3.0, 11.0, "end", "#333", &r.imp);
            svg.rect(LEFT, y, (x1 - LEFT).max(1.0), BAR, &colour, &attrs, &tip);
            if positive(r.min) && positive(r.max) {
                let (a, b) = (x_of(r.min), x_of(r.max));
                svg.line(a, y + BAR / 2.0, b, y + BAR / 2.0, "#222", false);
            }
            let mut label = format!("{:.3}", r.median);
            if let Some(b) = base.filter(|_| r.imp != "vmbind")
                && b > 0.0
            {
                label += &format!("  {:.2}× vmbind", r.median / b);
            }
            svg.text(x1.max(x_of(r.max)) + 6.0, y + BAR - 3.0, 11.0, "start", "#222", &label);
            y += BAR + 3.0;
        }
        y += GAP;
    }
    svg.finish("")
}
