//! The side-by-side timing harness: every sample runs an untimed setup, then the timed
//! routine; results are per unit (page, lookup, pair) and summarised as median / min / max,
//! printed as a table and kept as [`Row`]s and [`Ratio`]s (JSON through serde).

use std::time::Instant;

use serde::{Deserialize, Serialize};

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

/// One implementation's timings in one case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// The case (`suite/name`).
    pub case: String,
    /// The implementation: `vmbind`, a peer's crate name, or a floor.
    #[serde(rename = "impl")]
    pub imp: String,
    /// What one unit is (`ns/4KiB page`, `ns/call`, ...).
    pub unit: String,
    /// Median per unit.
    pub median: f64,
    /// Fastest sample per unit.
    pub min: f64,
    /// Slowest sample per unit.
    pub max: f64,
    /// The per-unit times in the order they were taken (sample `i` of every row of one
    /// `compare` ran in the same round).
    pub samples: Vec<f64>,
    /// Which `compare` call measured the row: rows of one group were interleaved.
    #[serde(default)]
    pub group: usize,
}

/// A ratio of two rows, as the JSON reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Ratio {
    /// What it compares, as printed.
    pub label: String,
    /// The numerator's `(case, impl)`.
    pub num: (String, String),
    /// The denominator's `(case, impl)`.
    pub den: (String, String),
    /// Median over the interleaved sample pairs of `num[i] / den[i]` (or of the two medians when
    /// the rows were measured apart, `interleaved: false`).
    pub median: f64,
    /// Whether both rows were measured in one interleaved group.
    pub interleaved: bool,
}

/// The JSON form of a ratio: `num`/`den` as `case:impl`, `case` the numerator's (what
/// `goals.py` reads).
#[derive(Serialize, Deserialize)]
struct RatioJson {
    case: String,
    label: String,
    num: String,
    den: String,
    median: f64,
    interleaved: bool,
}

/// The JSON form of a report.
#[derive(Serialize, Deserialize)]
struct ReportJson {
    #[serde(default)]
    quick: bool,
    cases: Vec<Row>,
    #[serde(default)]
    ratios: Vec<RatioJson>,
}

fn split_pair(s: &str) -> (String, String) {
    match s.rsplit_once(':') {
        Some((c, i)) => (c.to_string(), i.to_string()),
        None => (s.to_string(), "vmbind".to_string()),
    }
}

/// A benchmark run: its rows and ratios, printed as they are measured (unless silenced).
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Quick mode: fewer samples per case.
    pub quick: bool,
    /// Every row measured, in order.
    pub rows: Vec<Row>,
    /// The ratios computed so far.
    pub ratios: Vec<Ratio>,
    groups: usize,
    filter: Option<String>,
    silent: bool,
}

/// The median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

impl Report {
    /// An empty report measuring the cases whose names contain `filter` (all when `None`);
    /// `silent` keeps it from printing rows as they come.
    #[must_use]
    pub fn new(quick: bool, filter: Option<String>, silent: bool) -> Self {
        Report { quick, filter, silent, ..Report::default() }
    }

    /// A report set up from `cargo bench --bench report -- [--quick] [--json FILE] [FILTER]`,
    /// and the JSON path.
    #[must_use]
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
        (Report::new(quick, filter, false), json)
    }

    /// Whether it prints nothing as it measures.
    #[must_use]
    pub fn silent(&self) -> bool {
        self.silent
    }

    /// Whether a case is selected by the optional name filter.
    #[must_use]
    pub fn wants(&self, case: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| case.contains(f))
    }

    /// Samples for a case whose single run takes about `est_ms`.
    #[must_use]
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
            if !self.silent {
                println!("{}", row_line(&row));
            }
            self.rows.push(row);
        }
    }

    /// The median of `(case, imp)`, if measured.
    #[must_use]
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
        if !self.silent {
            println!("  {label:<58} {value:>9.2}x{how}");
        }
        self.ratios.push(Ratio {
            label: label.into(),
            num: (a.0.into(), a.1.into()),
            den: (b.0.into(), b.1.into()),
            median: value,
            interleaved,
        });
    }

    /// Prints the table header.
    pub fn header(&self) {
        if !self.silent {
            println!("{}", header_line(self.quick));
        }
    }

    /// The report as JSON: `cases` (one object per row, with its samples) and `ratios`.
    #[must_use]
    pub fn to_json(&self) -> String {
        let ratios = self
            .ratios
            .iter()
            .map(|r| RatioJson {
                case: r.num.0.clone(),
                label: r.label.clone(),
                num: format!("{}:{}", r.num.0, r.num.1),
                den: format!("{}:{}", r.den.0, r.den.1),
                median: r.median,
                interleaved: r.interleaved,
            })
            .collect();
        let j = ReportJson { quick: self.quick, cases: self.rows.clone(), ratios };
        serde_json::to_string_pretty(&j).unwrap_or_default()
    }

    /// A report read back from [`Report::to_json`]'s output (or the `report` bench's).
    ///
    /// # Errors
    /// The JSON error, when `text` is not such a report.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        let j: ReportJson = serde_json::from_str(text)?;
        let ratios = j
            .ratios
            .into_iter()
            .map(|r| Ratio {
                label: r.label,
                num: split_pair(&r.num),
                den: split_pair(&r.den),
                median: r.median,
                interleaved: r.interleaved,
            })
            .collect();
        let groups = j.cases.iter().map(|r| r.group + 1).max().unwrap_or(0);
        Ok(Report { quick: j.quick, rows: j.cases, ratios, groups, filter: None, silent: true })
    }

    /// Writes [`Report::to_json`] to `path`.
    ///
    /// # Errors
    /// The I/O error.
    pub fn write_json(&self, path: &str) -> std::io::Result<()> {
        std::fs::write(path, self.to_json())
    }
}

/// The table header [`Report`] prints.
#[must_use]
pub fn header_line(quick: bool) -> String {
    format!(
        "{:<26} {:<16} {:>12} {:>12} {:>12}  unit  ({} mode)",
        "case",
        "impl",
        "median",
        "min",
        "max",
        if quick { "quick" } else { "full" }
    )
}

/// One row of the table [`Report`] prints.
#[must_use]
pub fn row_line(row: &Row) -> String {
    format!(
        "{:<26} {:<16} {:>12.3} {:>12.3} {:>12.3}  {}",
        row.case, row.imp, row.median, row.min, row.max, row.unit
    )
}
