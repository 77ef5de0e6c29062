//! The workload format: parsing and its errors (line, field, reason; nothing applied), replay
//! summaries against the service's metrics, and record → replay round trips.

use std::sync::Arc;

use vmbind::gpuvm::Vm;
use vmbind::mem::PhysMem;
use vmbind::runtime::{Access, Placement, Runtime, RuntimeConfig};
use vmbind::workload::{Replay, ReplayOptions, Workload};

const HEAD: &str = r#"{"op":"workload","version":1,"arena":"64MiB"}
{"op":"vm","name":"gpu","va_size":"1TiB"}
{"op":"memory","name":"m","vm":"gpu","size":"1MiB","seed":3}
"#;

fn err_of(body: &str) -> (usize, Option<String>, String) {
    let e = Workload::parse(&format!("{HEAD}{body}")).unwrap_err();
    (e.line, e.field, e.reason)
}

#[test]
fn malformed_lines_name_line_and_field() {
    let (l, f, r) = err_of("{\"op\":\"bind\",\"vm\":\"gpu\",\"va\":\"0x1000\"\n");
    assert_eq!((l, f.as_deref()), (4, None), "{r}");
    let (l, f, _) = err_of("{\"op\":\"bnd\",\"vm\":\"gpu\"}\n");
    assert_eq!((l, f.as_deref()), (4, Some("op")));
    let (l, f, r) = err_of("{\"op\":\"bind\",\"vm\":\"gpu\",\"va\":\"0x1000\",\"memory\":\"m\"}\n");
    assert_eq!((l, f.as_deref()), (4, Some("size")), "{r}");
    let (l, f, r) =
        err_of("\n{\"op\":\"bind\",\"vm\":\"gpu\",\"va\":\"0x1001\",\"size\":4096,\"memory\":\"m\"}\n");
    assert_eq!((l, f.as_deref()), (5, Some("va")), "{r}");
    let (l, f, r) = err_of(
        "{\"op\":\"bind\",\"vm\":\"gpu\",\"va\":4096,\"size\":4096,\"memory\":\"m\",\"waits\":[\"never\"]}\n",
    );
    assert_eq!((l, f.as_deref()), (4, Some("waits")), "{r}");
    assert!(r.contains("never"));
    let (l, f, _) =
        err_of("{\"op\":\"bind\",\"vm\":\"gpu\",\"va\":4096,\"size\":\"2MiB\",\"memory\":\"m\"}\n");
    assert_eq!((l, f.as_deref()), (4, Some("offset")));
    let (l, f, _) =
        err_of("{\"op\":\"bind\",\"vm\":\"gpu\",\"va\":4096,\"size\":4096,\"memory\":\"m\",\"colour\":1}\n");
    assert_eq!((l, f.as_deref()), (4, Some("colour")));
    let (l, f, _) = err_of(
        "{\"op\":\"free\",\"vm\":\"gpu\",\"memory\":\"m\"}\n{\"op\":\"free\",\"vm\":\"gpu\",\"memory\":\"m\"}\n",
    );
    assert_eq!((l, f.as_deref()), (5, Some("memory")));
    let (l, f, _) = err_of(
        "{\"op\":\"bind\",\"vm\":\"gpu\",\"va\":4096,\"size\":4096,\"memory\":\"m\"}\n{\"op\":\"free\",\"vm\":\"gpu\",\"memory\":\"m\"}\n",
    );
    assert_eq!((l, f.as_deref()), (5, Some("memory")), "freed while mapped");
    let e = Workload::parse("{\"op\":\"workload\",\"version\":2,\"arena\":\"64MiB\"}\n").unwrap_err();
    assert_eq!((e.line, e.field.as_deref()), (1, Some("version")));
    let e = Workload::parse("{\"op\":\"vm\",\"name\":\"gpu\",\"va_size\":\"1TiB\"}\n").unwrap_err();
    assert_eq!((e.line, e.field.as_deref()), (1, Some("op")));
}

#[test]
fn replay_summary_is_the_services_metrics() {
    let text = format!(
        "{HEAD}{}",
        r#"{"op":"bind","vm":"gpu","queue":"a","va":"0x200000","size":"1MiB","memory":"m","signal":"x"}
{"op":"sparse","vm":"gpu","queue":"b","va":"0x400000","size":"64KiB","waits":["x"]}
{"op":"repeat","vm":"gpu","va":"0x800000","size":"64KiB","memory":"m","period":"16KiB"}
{"op":"unbind","vm":"gpu","queue":"a","va":"0x200000","size":"4KiB"}
{"op":"check","vm":"gpu","va":"0x201000","size":"8KiB","memory":"m","offset":"0x1000"}
{"op":"check","vm":"gpu","va":"0x400000","size":"64KiB","zero":true}
{"op":"check","vm":"gpu","va":"0x804000","size":"16KiB","memory":"m"}
"#
    );
    let w = Workload::parse(&text).unwrap();
    let mut r = Replay::new(&w, ReplayOptions::default()).unwrap();
    let s = r.run(None, |_, _| {}).unwrap();
    let m = r.service().metrics();
    assert_eq!((s.ops, s.pages, s.batches, s.submissions), (m.ops, m.pages, m.batches, m.submissions));
    assert_eq!((s.ops, s.pages, s.checks), (4, 256 + 16 + 16, 3));
    assert_eq!(s.queues.len(), 3);
    let vms = r.vms();
    assert_eq!(vms[0].1.mappings().len(), 3);
}

#[test]
fn a_failed_check_names_its_line() {
    let text = format!(
        "{HEAD}{}",
        r#"{"op":"bind","vm":"gpu","va":"0x200000","size":"1MiB","memory":"m"}
{"op":"check","vm":"gpu","va":"0x200000","size":"4KiB","checksum":"0x1234"}
{"op":"unbind","vm":"gpu","va":"0x200000","size":"1MiB"}
"#
    );
    let w = Workload::parse(&text).unwrap();
    let mut r = Replay::new(&w, ReplayOptions::default()).unwrap();
    let e = r.run(None, |_, _| {}).unwrap_err();
    assert_eq!(e.line, 5);
    assert_eq!(r.vms()[0].1.mappings().len(), 1, "nothing past the failed line ran");
}

/// What a VM's state is, object ids aside: mappings and leaves.
/// `(addr, range, offset, sparse, read_only, repeat)` per mapping; `(va, sparse, prot)` per 4 KiB
/// page the table maps (leaf sizes and fragments follow the DMA addresses the replay's IOMMU
/// hands out, which a workload does not fix).
type State = (Vec<(u64, u64, u64, bool, bool, Option<u64>)>, Vec<(u64, bool, String)>);

fn state(vm: &Vm) -> State {
    let maps = vm
        .mappings()
        .iter()
        .map(|v| (v.addr, v.range, v.offset, v.obj.is_none(), v.flags.read_only, v.repeat.map(|r| r.len)))
        .collect();
    let leaves = vm
        .table()
        .leaves()
        .iter()
        .flat_map(|l| {
            let prot = format!("{:?}", l.prot);
            (0..l.size.bytes() / 4096).map(move |i| (l.va.as_u64() + i * 4096, l.sparse, prot.clone()))
        })
        .collect();
    (maps, leaves)
}

/// Every op line that touches addresses an earlier line of another queue touched waits (itself
/// or through an earlier line of its own queue) for a fence that line or a later one of that
/// queue signals: the order the runtime kept holds in any replay, however fast each queue runs.
fn assert_cross_queue_order(text: &str) {
    struct Op {
        queue: String,
        va: u64,
        end: u64,
        signal: Option<String>,
    }
    let num = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap(),
        v => v.as_u64().unwrap(),
    };
    let mut ops: Vec<Op> = Vec::new();
    // For each queue, the fences it has waited for so far (by line index of the signal).
    let mut waited: std::collections::HashMap<String, Vec<usize>> = Default::default();
    for (n, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if !matches!(v["op"].as_str(), Some("bind" | "unbind" | "sparse" | "repeat")) {
            continue;
        }
        let queue = v["queue"].as_str().unwrap_or("default").to_string();
        let (va, end) = (num(&v["va"]), num(&v["va"]) + num(&v["size"]));
        let w = waited.entry(queue.clone()).or_default();
        for f in v["waits"].as_array().into_iter().flatten() {
            let at = ops.iter().position(|o| o.signal.as_deref() == f.as_str()).expect("signalled before");
            w.push(at);
        }
        for (i, o) in ops.iter().enumerate() {
            if o.queue != queue && o.va < end && va < o.end {
                assert!(
                    w.iter().any(|&at| at >= i && ops[at].queue == o.queue),
                    "line {}: {} touches what an earlier {} op touched, with no wait for it",
                    n + 1,
                    queue,
                    o.queue
                );
            }
        }
        ops.push(Op { queue, va, end, signal: v["signal"].as_str().map(String::from) });
    }
}

#[test]
fn record_then_replay_gives_the_same_vm() {
    let dir = std::env::temp_dir().join(format!("vmbind-record-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rec.jsonl");
    let mem = Arc::new(PhysMem::new(128 << 20).unwrap());
    let rt = Runtime::new(mem, RuntimeConfig::default()).unwrap();
    let chunk = 2 << 20;
    let heap = rt.reserve(32 * chunk, chunk, None).unwrap();
    // Something mapped before the recording starts is recorded too.
    let early = rt.alloc(chunk, Placement::Contiguous).unwrap();
    rt.map(heap.addr, &early, 0, chunk, Access::ReadWrite).unwrap();
    rt.record_to(&path).unwrap();
    let s1 = rt.create_stream().unwrap();
    let mut mems = Vec::new();
    for i in 1..8u64 {
        let m =
            rt.alloc(chunk, if i % 2 == 0 { Placement::Contiguous } else { Placement::Scattered }).unwrap();
        rt.map_async(&s1, heap.addr + i * chunk, &m, 0, chunk, Access::ReadWrite).unwrap();
        rt.release(&m).unwrap();
        mems.push(m);
    }
    rt.unmap(heap.addr + 3 * chunk + 4096, 3 * 4096).unwrap();
    rt.set_access(heap.addr + 5 * chunk, chunk / 2, Access::Read).unwrap();
    rt.map_sparse(heap.addr + 10 * chunk, chunk).unwrap();
    let r = rt.alloc(64 << 10, Placement::Scattered).unwrap();
    rt.map_repeat(heap.addr + 12 * chunk, chunk, &r, 0, 16 << 10, Access::Read).unwrap();
    rt.unmap_async(&s1, heap.addr + 7 * chunk, chunk).unwrap();
    rt.synchronize().unwrap();
    rt.stop_recording().unwrap();
    let want = state(rt.vm());

    assert_cross_queue_order(&std::fs::read_to_string(&path).unwrap());
    let w = Workload::load(&path).unwrap();
    let mut rep = Replay::new(&w, ReplayOptions::default()).unwrap();
    rep.run(None, |_, _| {}).unwrap();
    let got = state(&rep.vms()[0].1);
    assert_eq!(got, want);
    assert!(!want.0.is_empty() && !want.1.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
