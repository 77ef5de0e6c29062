//! A small side-by-side timing harness for the `report` bench: every sample runs an untimed
//! setup, then the timed routine; results are per unit (page, lookup, pair) and summarised as
//! median / min / max, printed as a table and optionally written as JSON.
#![allow(dead_code)]

use std::time::Instant;

/// One implementation of a case: its name and a closure timing one run.
pub type Imp<'a> = (&'static str, Run<'a>);

/// A closure timing one run of an implementation, in nanoseconds.
pub type Run<'a> = Box<dyn FnMut() -> f64 + 'a>;

/// An implementation of one of several cases compared together: `(case, impl, run)`.
pub type CaseImp<'c, 'a> = (&'c str, &'static str, Run<'a>);

/// Divides a timed closure's nanoseconds by its own unit count (for peers that run fewer
/// iterations per sample than vmbind because each costs far more).
pub fn per<'a>(units: f64, mut f: Box<dyn FnMut() -> f64 + 'a>) -> Box<dyn FnMut() -> f64 + 'a> {
    Box::new(move || f() / units)
}

/// Wraps an untimed `setup` and a timed `routine` (fed the setup's value) into an [`Imp`] body.
pub fn timed<'a, S, T>(
    mut setup: impl FnMut() -> S + 'a,
    mut routine: impl FnMut(S) -> T + 'a,
) -> Box<dyn FnMut() -> f64 + 'a> {
    Box::new(move || {
        let s = setup();
        let t0 = Instant::now();
        let out = routine(s);
        let dt = t0.elapsed().as_secs_f64() * 1e9;
        std::hint::black_box(out);
        dt
    })
}

pub struct Row {
    pub case: String,
    pub imp: String,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// The per-unit times in the order they were taken (sample `i` of every row of one
    /// `compare` ran in the same round).
    pub samples: Vec<f64>,
    /// Which `compare` call measured the row: rows of one group were interleaved.
    pub group: usize,
}

/// A ratio of two rows, as the JSON reports it.
pub struct Ratio {
    pub label: String,
    pub num: (String, String),
    pub den: (String, String),
    /// Median over the interleaved sample pairs of `num[i] / den[i]` (or of the two medians when
    /// the rows were measured apart, `interleaved: false`).
    pub median: f64,
    pub interleaved: bool,
}

pub struct Report {
    pub quick: bool,
    pub rows: Vec<Row>,
    pub ratios: Vec<Ratio>,
    groups: usize,
    filter: Option<String>,
}

/// The median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

impl Report {
    pub fn from_args() -> (Self, Option<String>) {
        let mut quick = false;
        let mut json = None;
        let mut filter = None;
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => quick = true,
                "--json" => json = args.next(),
                "--bench" => {}
                s if s.starts_with("--") => {}
                s => filter = Some(s.to_string()),
            }
        }
        (Report { quick, rows: Vec::new(), ratios: Vec::new(), groups: 0, filter }, json)
    }

    /// Whether a case is selected by the optional name filter.
    pub fn wants(&self, case: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| case.contains(f))
    }

    /// Samples for a case whose single run takes about `est_ms`.
    pub fn samples(&self, est_ms: f64) -> usize {
        let budget = if self.quick { 150.0 } else { 1500.0 };
        let (min, max) = if self.quick { (9, 15) } else { (11, 61) };
        ((budget / est_ms.max(0.001)) as usize).clamp(min, max)
    }

    /// Measures several implementations of one case, interleaving their samples (a, b, c, a,
    /// b, c, ...) so that machine noise hits all of them alike; each timed run follows an untimed
    /// run of the same implementation. Each entry returns the nanoseconds of one timed run (see
    /// [`timed`]); `units` divides them. Entries with different unit counts are each wrapped in
    /// [`per`] and compared with `units = 1.0`.
    pub fn compare(&mut self, case: &str, unit: &str, units: f64, samples: usize, impls: Vec<Imp<'_>>) {
        let impls = impls.into_iter().map(|(imp, f)| (case, imp, f)).collect();
        self.compare_cases(unit, units, samples, impls);
    }

    /// [`Report::compare`] of entries that belong to different cases (`(case, impl, run)`), so
    /// that cross-case ratios come from interleaved samples too.
    pub fn compare_cases(&mut self, unit: &str, units: f64, samples: usize, mut impls: Vec<CaseImp<'_, '_>>) {
        let mut times = vec![Vec::with_capacity(samples); impls.len()];
        for _ in 0..samples {
            for (k, (_, _, f)) in impls.iter_mut().enumerate() {
                // An untimed run first, so that each timed run finds caches as a steady stream of
                // its own work would leave them, not as the previous implementation left them.
                f();
                times[k].push(f() / units);
            }
        }
        let group = self.groups;
        self.groups += 1;
        for ((case, imp, _), v) in impls.into_iter().zip(times) {
            let mut sorted = v.clone();
            let row = Row {
                case: case.into(),
                imp: imp.into(),
                unit: unit.into(),
                median: median(&mut sorted),
                min: sorted[0],
                max: sorted[sorted.len() - 1],
                samples: v,
                group,
            };
            println!(
                "{:<26} {:<16} {:>12.3} {:>12.3} {:>12.3}  {}",
                row.case, row.imp, row.median, row.min, row.max, row.unit
            );
            self.rows.push(row);
        }
    }

    pub fn median(&self, case: &str, imp: &str) -> Option<f64> {
        self.rows.iter().find(|r| r.case == case && r.imp == imp).map(|r| r.median)
    }

    fn row(&self, case: &str, imp: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.case == case && r.imp == imp)
    }

    /// Prints and records "a / b" for the ratios the issues set goals on: the median of the
    /// per-sample ratios when both rows were interleaved in one `compare`, else the ratio of
    /// their medians (marked "apart").
    pub fn ratio(&mut self, label: &str, a: (&str, &str), b: (&str, &str)) {
        let (Some(x), Some(y)) = (self.row(a.0, a.1), self.row(b.0, b.1)) else {
            return;
        };
        let interleaved = x.group == y.group;
        let value = if interleaved {
            let mut r: Vec<f64> = x.samples.iter().zip(&y.samples).map(|(p, q)| p / q).collect();
            median(&mut r)
        } else {
            x.median / y.median
        };
        let how = if interleaved { "" } else { " (apart)" };
        println!("  {label:<58} {value:>9.2}x{how}");
        self.ratios.push(Ratio {
            label: label.into(),
            num: (a.0.into(), a.1.into()),
            den: (b.0.into(), b.1.into()),
            median: value,
            interleaved,
        });
    }

    pub fn header(&self) {
        println!(
            "{:<26} {:<16} {:>12} {:>12} {:>12}  unit  ({} mode)",
            "case",
            "impl",
            "median",
            "min",
            "max",
            if self.quick { "quick" } else { "full" }
        );
    }

    pub fn write_json(&self, path: &str) -> std::io::Result<()> {
        let list = |v: &[f64]| v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(", ");
        let mut s = String::from("{\"cases\": [\n");
        for (i, r) in self.rows.iter().enumerate() {
            s += &format!(
                "  {{\"case\": \"{}\", \"impl\": \"{}\", \"unit\": \"{}\", \"median\": {}, \"min\": {}, \"max\": {}, \"samples\": [{}]}}{}\n",
                r.case,
                r.imp,
                r.unit,
                r.median,
                r.min,
                r.max,
                list(&r.samples),
                if i + 1 < self.rows.len() { "," } else { "" }
            );
        }
        s += "],\n\"ratios\": [\n";
        for (i, r) in self.ratios.iter().enumerate() {
            s += &format!(
                "  {{\"case\": \"{}\", \"label\": \"{}\", \"num\": \"{}:{}\", \"den\": \"{}:{}\", \"median\": {}, \"interleaved\": {}}}{}\n",
                r.num.0,
                r.label,
                r.num.0,
                r.num.1,
                r.den.0,
                r.den.1,
                r.median,
                r.interleaved,
                if i + 1 < self.ratios.len() { "," } else { "" }
            );
        }
        s += "]}\n";
        std::fs::write(path, s)
    }
}
