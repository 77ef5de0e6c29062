//! The `vmbind` binary: help and exit codes, `run` on every example workload (its numbers
//! against counts taken from the file itself), `dump --svg` (parsed, bands = mappings),
//! `bench --quick --plot`, and malformed workloads.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vmbind(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmbind")).args(args).output().expect("the binary runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmbind-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn workloads() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    v.sort();
    v
}

#[test]
fn help_on_every_subcommand_and_usage_errors_exit_2() {
    for sub in
        [&["--help"][..], &["demo", "--help"], &["run", "--help"], &["dump", "--help"], &["bench", "--help"]]
    {
        let o = vmbind(sub);
        assert!(o.status.success(), "{sub:?}");
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage: vmbind"), "{sub:?}");
    }
    assert_eq!(vmbind(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(vmbind(&["run"]).status.code(), Some(2));
    assert_eq!(vmbind(&["run", "x.jsonl", "--threads", "0"]).status.code(), Some(2));
}

/// Ops and 4 KiB pages the file asks for, counted from its own lines.
fn expected(path: &Path) -> (u64, u64, usize) {
    let (mut ops, mut pages, mut checks) = (0, 0, 0);
    for l in std::fs::read_to_string(path).unwrap().lines() {
        if l.starts_with('#') || l.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let size = || vmbind::workload::Num::parse(v["size"].as_str().unwrap_or("0")).unwrap() / 4096;
        match v["op"].as_str().unwrap() {
            "bind" | "repeat" | "sparse" => {
                ops += 1;
                pages += size();
            }
            "unbind" => ops += 1,
            "check" => checks += 1,
            _ => {}
        }
    }
    (ops, pages, checks)
}

#[test]
fn run_every_example_workload() {
    let all = workloads();
    assert!(all.len() >= 4);
    for w in all {
        let json = tmp(&format!("{}.json", w.file_stem().unwrap().to_string_lossy()));
        let o = vmbind(&["run", w.to_str().unwrap(), "--json", json.to_str().unwrap()]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}: {}{}", w.display(), out, String::from_utf8_lossy(&o.stderr));
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let (ops, pages, checks) = expected(&w);
        assert_eq!(s["ops"].as_u64(), Some(ops), "{}", w.display());
        assert_eq!(s["pages"].as_u64(), Some(pages), "{}", w.display());
        assert_eq!(s["checks"].as_u64(), Some(checks as u64), "{}", w.display());
        assert_eq!(s["failed"].as_u64(), Some(0));
        assert!(s["batches"].as_u64().unwrap() >= 1 && s["batches"].as_u64().unwrap() <= ops);
        assert!(out.contains(&format!("ops              {ops}")), "{out}");
        let done: u64 =
            s["queues"].as_array().unwrap().iter().map(|q| q["completed"].as_u64().unwrap()).sum();
        assert_eq!(done, s["submissions"].as_u64().unwrap());
    }
}

#[test]
fn dump_svg_bands_match_the_mappings() {
    let w = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/sparse_texture.jsonl");
    let svg = tmp("dump.svg");
    let o = vmbind(&["dump", w.to_str().unwrap(), "--at", "400", "--svg", svg.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("after line 400"));
    // The mappings the text dump lists: "  [0x..., 0x...) what".
    let mut listed: Vec<(u64, u64, String)> = Vec::new();
    for l in out.lines() {
        let t = l.trim_start();
        if let Some(rest) = t.strip_prefix('[')
            && let Some((range, what)) = rest.split_once(") ")
            && let Some((a, b)) = range.split_once(", ")
            && !what.contains(" x ")
            && !what.starts_with("sparse:")
        {
            let p = |s: &str| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap();
            let who = what.split_whitespace().next().unwrap().to_string();
            listed.push((p(a), p(b), who));
        }
    }
    assert!(listed.len() > 2, "{out}");
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("well-formed SVG");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let mut bands: Vec<(u64, u64, String)> = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("map"))
        .map(|n| {
            let p =
                |k: &str| u64::from_str_radix(n.attribute(k).unwrap().trim_start_matches("0x"), 16).unwrap();
            (p("data-va"), p("data-end"), n.attribute("data-bo").unwrap().to_string())
        })
        .collect();
    bands.sort();
    listed.sort();
    assert_eq!(bands, listed);
    assert!(doc.descendants().any(|n| n.attribute("class") == Some("leaf")));
}

#[test]
fn bench_quick_plot_writes_an_svg() {
    let (svg, json) = (tmp("bench.svg"), tmp("bench.json"));
    let o = vmbind(&[
        "bench",
        "mem/",
        "--quick",
        "--plot",
        svg.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("well-formed SVG");
    let bars: Vec<_> = doc.descendants().filter(|n| n.attribute("class") == Some("bar")).collect();
    assert!(bars.iter().any(|b| b.attribute("data-impl") == Some("vmbind")));
    assert!(bars.iter().any(|b| b.attribute("data-impl") == Some("memcpy")));
    // --compare against that run.
    let o = vmbind(&["bench", "mem/", "--quick", "--compare", json.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("compared with"), "{out}");
    assert_eq!(vmbind(&["bench", "no-such-case"]).status.code(), Some(1));
}

#[test]
fn malformed_workloads_fail_with_the_line_and_apply_nothing() {
    let head = "{\"op\":\"workload\",\"version\":1,\"arena\":\"64MiB\"}\n{\"op\":\"vm\",\"name\":\"gpu\",\"va_size\":\"1TiB\"}\n{\"op\":\"memory\",\"name\":\"m\",\"vm\":\"gpu\",\"size\":\"64KiB\"}\n{\"op\":\"bind\",\"vm\":\"gpu\",\"va\":\"0x10000\",\"size\":\"64KiB\",\"memory\":\"m\"}\n";
    let cases = [
        ("{\"op\":\"bind\",", "line 5"),
        ("{\"op\":\"teleport\",\"vm\":\"gpu\"}", "line 5, field `op`"),
        ("{\"op\":\"unbind\",\"vm\":\"gpu\",\"va\":\"0x10000\"}", "line 5, field `size`"),
        ("{\"op\":\"unbind\",\"vm\":\"gpu\",\"va\":\"0x10800\",\"size\":4096}", "line 5, field `va`"),
        ("{\"op\":\"wait\",\"fence\":\"ghost\"}", "line 5, field `fence`"),
    ];
    for (bad, want) in cases {
        let p = tmp("bad.jsonl");
        std::fs::write(&p, format!("{head}{bad}\n{{\"op\":\"check\",\"vm\":\"gpu\",\"va\":\"0x10000\",\"size\":8,\"zero\":true}}\n")).unwrap();
        let o = vmbind(&["run", p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{bad}: {err}");
        assert!(err.contains(want), "{bad}: {err}");
        assert!(err.contains("nothing was applied"), "{err}");
        assert!(!String::from_utf8_lossy(&o.stdout).contains("lines replayed"));
    }
    // A replay failure stops at its line: the check of a never-written memory fails at line 5.
    let p = tmp("stop.jsonl");
    std::fs::write(
        &p,
        format!(
            "{head}{{\"op\":\"check\",\"vm\":\"gpu\",\"va\":\"0x10000\",\"size\":8,\"checksum\":\"0x1\"}}\n"
        ),
    )
    .unwrap();
    let o = vmbind(&["run", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("line 5: check failed") && err.contains("none after"), "{err}");
}
