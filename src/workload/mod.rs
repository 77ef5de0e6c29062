//! Workloads: what a program does to GPU VMs, as a versioned JSON-lines file that
//! [`Replay`] runs through the [`service`](crate::service) (`vmbind run`) and
//! [`Runtime::record_to`](crate::runtime::Runtime::record_to) writes.
//!
//! # Format (version 1)
//!
//! One JSON object per line, its kind in `"op"`; blank lines and lines starting with `#` are
//! skipped (but counted: errors name the file's own line numbers). The first object is the
//! header. Numbers (addresses, sizes, offsets) are JSON integers or strings: `"0x7f0000000000"`,
//! `"4096"`, or a size with a binary unit, `"64KiB"`, `"2MiB"`, `"1GiB"`, `"1TiB"`. Addresses,
//! sizes, offsets and periods are multiples of the 4 KiB GPU page.
//!
//! | `op` | fields (`?` = optional, default) | what it does |
//! |---|---|---|
//! | `workload` | `version` (1), `arena` (bytes of `PhysMem`), `name?` | the header |
//! | `vm` | `name`, `va_size`, `gpu?` (`"iommu"` / `"direct"`), `domain?` (`"strict"` / `"lazy"` / `"identity"`, behind an IOMMU), `addr_bits?` (48, direct) | a GPU VM over `[0, va_size)` |
//! | `memory` | `name`, `vm`, then `size` with `placement?` (`"scattered"` 4 KiB frames, or `"contiguous"` 2 MiB blocks) and `seed?` (contents [`pattern`]`(seed)`; none: zeros), or `file` (its bytes, zero-padded) | a buffer object of `vm` |
//! | `free` | `vm`, `memory` | destroys it (after the work queued so far; it must be unmapped) |
//! | `bind` | `vm`, `queue?` (`"default"`), `va`, `size`, `memory`, `offset?` (0), `access?` (`"rw"` / `"ro"`), `exec?` (false), `waits?`, `signal?` | maps `[va, va + size)` to the memory from `offset` |
//! | `repeat` | as `bind`, plus `period` | maps `[offset, offset + period)` of the memory again and again across `size` |
//! | `sparse` | `vm`, `queue?`, `va`, `size`, `waits?`, `signal?` | a sparse range: reads zero, writes dropped |
//! | `unbind` | `vm`, `queue?`, `va`, `size`, `waits?`, `signal?` | unmaps whatever lies there |
//! | `wait` | `fence?` | the host waits for a fence (none: for everything submitted so far) |
//! | `check` | `vm`, `va`, `size`, and one of `checksum` ([`checksum`] of the bytes), `memory` + `offset?` (the memory's bytes there), `zero: true` | reads the range back through the VM's tables (after everything submitted so far) and compares |
//!
//! Each `bind`/`repeat`/`sparse`/`unbind` line is one submission of one op on its VM's named
//! queue (queues are made on first use; work on one queue runs in order, queues are independent).
//! `waits` names fences signalled by earlier lines; `signal` names a new fence that signals when
//! the line's op is visible to the GPU. A file is checked whole before anything is applied
//! ([`Workload::parse`]): an error names the line, the field and why.
//!
//! ```
//! use vmbind::workload::{Replay, ReplayOptions, Workload};
//!
//! let text = r#"{"op":"workload","version":1,"arena":"64MiB"}
//! {"op":"vm","name":"gpu","va_size":"1TiB"}
//! {"op":"memory","name":"buf","vm":"gpu","size":"2MiB","seed":7}
//! {"op":"bind","vm":"gpu","va":"0x200000","size":"2MiB","memory":"buf","signal":"bound"}
//! {"op":"wait","fence":"bound"}
//! {"op":"check","vm":"gpu","va":"0x200000","size":"2MiB","memory":"buf"}
//! "#;
//! let w = Workload::parse(text)?;
//! let summary = Replay::new(&w, ReplayOptions::default())?.run_all()?;
//! assert_eq!((summary.ops, summary.pages, summary.checks), (1, 512, 1));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod replay;

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::gpuvm::{GPU_PAGE, Va, VaError, VaSpace};
use crate::hash::FastMap;

pub use replay::{QueueSummary, Replay, ReplayError, ReplayOptions, Summary};

/// The format version this build reads and writes.
pub const VERSION: u32 = 1;

/// An address, size or offset: a JSON integer, or a string (decimal, `0x` hex, or a size with
/// `KiB`/`MiB`/`GiB`/`TiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Num(pub u64);

impl Num {
    /// Parses the string forms.
    ///
    /// # Errors
    /// A message saying what is wrong with `s`.
    pub fn parse(s: &str) -> Result<u64, String> {
        let t = s.trim();
        if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            return u64::from_str_radix(&h.replace('_', ""), 16)
                .map_err(|e| format!("bad hex number `{s}`: {e}"));
        }
        let units = [("TiB", 40u32), ("GiB", 30), ("MiB", 20), ("KiB", 10), ("B", 0)];
        let (digits, shift) =
            units.iter().find_map(|(u, sh)| t.strip_suffix(u).map(|d| (d.trim_end(), *sh))).unwrap_or((t, 0));
        let n: u64 = digits.replace('_', "").parse().map_err(|_| {
            format!("bad number `{s}` (an integer, 0x hex, or a size like \"64KiB\", \"2MiB\", \"1GiB\")")
        })?;
        n.checked_mul(1u64 << shift).ok_or_else(|| format!("`{s}` does not fit in 64 bits"))
    }
}

impl Serialize for Num {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 >= 1 << 16 { s.serialize_str(&format!("{:#x}", self.0)) } else { s.serialize_u64(self.0) }
    }
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Num;
            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str("a non-negative integer or a string like \"0x1000\" or \"2MiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Num, E> {
                Ok(Num(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Num, E> {
                Num::parse(v).map(Num).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// How a VM's GPU reaches memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuKind {
    /// Behind the IOMMU, in a domain of its own.
    #[default]
    Iommu,
    /// Physical addresses, `addr_bits` of them.
    Direct,
}

/// The IOMMU domain of a VM's GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainMode {
    /// Translated, invalidations before unmaps return.
    #[default]
    Strict,
    /// Translated, invalidations batched.
    Lazy,
    /// No translation (passthrough).
    Identity,
}

/// Where a memory's pages come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementKind {
    /// Free 4 KiB frames chosen at random (seeded), as a real allocation's pages lie.
    #[default]
    Scattered,
    /// 2 MiB-aligned contiguous blocks (the size a multiple of 2 MiB).
    Contiguous,
}

/// What the GPU may do through a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AccessMode {
    /// Read and write.
    #[default]
    #[serde(rename = "rw")]
    ReadWrite,
    /// Read only.
    #[serde(rename = "ro")]
    Read,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn default_queue() -> String {
    "default".to_string()
}

fn is_default_queue(q: &String) -> bool {
    q == "default"
}

/// One line of a workload (the table in the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
#[allow(missing_docs)] // The fields are the format's, documented in the module's table.
pub enum Line {
    /// The header.
    Workload {
        version: u32,
        arena: Num,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// A VM.
    Vm {
        name: String,
        va_size: Num,
        #[serde(default, skip_serializing_if = "is_default")]
        gpu: GpuKind,
        #[serde(default, skip_serializing_if = "is_default")]
        domain: DomainMode,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        addr_bits: Option<u32>,
    },
    /// A buffer object.
    Memory {
        name: String,
        vm: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<Num>,
        #[serde(default, skip_serializing_if = "is_default")]
        placement: PlacementKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seed: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<String>,
    },
    /// Destroys a buffer object.
    Free { vm: String, memory: String },
    /// A map.
    Bind {
        vm: String,
        #[serde(default = "default_queue", skip_serializing_if = "is_default_queue")]
        queue: String,
        va: Num,
        size: Num,
        memory: String,
        #[serde(default, skip_serializing_if = "is_default")]
        offset: Num,
        #[serde(default, skip_serializing_if = "is_default")]
        access: AccessMode,
        #[serde(default, skip_serializing_if = "is_default")]
        exec: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        waits: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
    },
    /// A repeat map.
    Repeat {
        vm: String,
        #[serde(default = "default_queue", skip_serializing_if = "is_default_queue")]
        queue: String,
        va: Num,
        size: Num,
        memory: String,
        #[serde(default, skip_serializing_if = "is_default")]
        offset: Num,
        period: Num,
        #[serde(default, skip_serializing_if = "is_default")]
        access: AccessMode,
        #[serde(default, skip_serializing_if = "is_default")]
        exec: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        waits: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
    },
    /// A sparse range.
    Sparse {
        vm: String,
        #[serde(default = "default_queue", skip_serializing_if = "is_default_queue")]
        queue: String,
        va: Num,
        size: Num,
        #[serde(default, skip_serializing_if = "is_default")]
        access: AccessMode,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        waits: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
    },
    /// An unmap.
    Unbind {
        vm: String,
        #[serde(default = "default_queue", skip_serializing_if = "is_default_queue")]
        queue: String,
        va: Num,
        size: Num,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        waits: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
    },
    /// A host wait.
    Wait {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fence: Option<String>,
    },
    /// A read-back check.
    Check {
        vm: String,
        va: Num,
        size: Num,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        checksum: Option<Num>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<Num>,
        #[serde(default, skip_serializing_if = "is_default")]
        zero: bool,
    },
}

impl Line {
    /// The line as one JSON object (no newline).
    #[must_use]
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A malformed workload: where and why. Nothing of the workload was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {reason}", field.as_ref().map(|f| format!(", field `{f}`")).unwrap_or_default())]
pub struct WorkloadError {
    /// 1-based line number in the file.
    pub line: usize,
    /// The field at fault, when one is.
    pub field: Option<String>,
    /// Why.
    pub reason: String,
}

fn bad(line: usize, field: Option<&str>, reason: impl Into<String>) -> WorkloadError {
    WorkloadError { line, field: field.map(str::to_string), reason: reason.into() }
}

/// The contents `seed` gives a memory: the little-endian words of SplitMix64 seeded with
/// `seed` (word `i` is the generator's `i + 1`-th output).
pub fn pattern(seed: u64, buf: &mut [u8]) {
    let mut rng = crate::mem::rng::SplitMix64::new(seed);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let w = rng.next_u64().to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&w[..n]);
}

/// A 64-bit checksum of bytes (word-wise multiply-xorshift, the length folded in): what
/// `check` lines compare and `vmbind` prints.
#[must_use]
pub fn checksum(b: &[u8]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64 ^ b.len() as u64;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(29);
    }
    for &x in chunks.remainder() {
        h = (h ^ u64::from(x)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    }
    h ^ (h >> 31)
}

/// The first backticked name in a serde message (`missing field `size``).
fn backticked(msg: &str) -> Option<String> {
    let a = msg.find('`')?;
    let b = a + 1 + msg[a + 1..].find('`')?;
    Some(msg[a + 1..b].to_string())
}

/// A parse error's field: the one named, for missing and unknown fields; `op` for an unknown op.
fn serde_field(msg: &str) -> Option<String> {
    if msg.starts_with("unknown variant") || msg.starts_with("missing field `op`") {
        Some("op".to_string())
    } else if msg.starts_with("missing field") || msg.starts_with("unknown field") {
        backticked(msg)
    } else {
        None
    }
}

/// A memory as the checks see it.
#[derive(Debug, Clone)]
pub(crate) struct MemInfo {
    pub(crate) vm: usize,
    pub(crate) size: u64,
}

/// A checked workload: its lines, with their line numbers, and what the checks worked out.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The header's name, if any.
    pub name: Option<String>,
    /// The arena size.
    pub arena: u64,
    /// `(line number, line)`, the header excluded.
    pub lines: Vec<(usize, Line)>,
    /// VM names, in order.
    pub(crate) vms: Vec<String>,
    /// Queue names per VM, in order of first use.
    pub(crate) queues: Vec<Vec<String>>,
    /// Fence names, in order of their signalling line.
    pub(crate) fences: Vec<String>,
    /// Memory names, in order (a name freed and made again is a new memory).
    pub(crate) mems: Vec<MemInfo>,
}

/// Per VM, what the checks model: its VA space (memories by index).
struct VmModel {
    space: VaSpace<usize>,
    queues: FastMap<String, usize>,
}

impl Workload {
    /// Reads and checks a workload file.
    ///
    /// # Errors
    /// [`WorkloadError`] with line 0 when the file cannot be read; else as [`Workload::parse_in`].
    pub fn load(path: &Path) -> Result<Self, WorkloadError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(0, None, format!("cannot read {}: {e}", path.display())))?;
        Self::parse_in(&text, path.parent())
    }

    /// Checks a workload's text (relative `file` paths from the current directory).
    ///
    /// # Errors
    /// As [`Workload::parse_in`].
    pub fn parse(text: &str) -> Result<Self, WorkloadError> {
        Self::parse_in(text, None)
    }

    /// Checks a workload's text whole: every line parses; the header comes first with a
    /// version this build reads; names are defined before use and not twice; addresses,
    /// sizes and offsets are page aligned, non-zero where they must be, and inside their VM and
    /// memory; each op applies to the mappings the lines before it leave (the VA space
    /// modelled in file order); a memory is freed only when unmapped; every wait names a fence
    /// an earlier line signals; no fence is signalled twice. Relative `file` paths are taken
    /// from `dir`.
    ///
    /// # Errors
    /// The first [`WorkloadError`], naming its line and field.
    pub fn parse_in(text: &str, dir: Option<&Path>) -> Result<Self, WorkloadError> {
        let mut w = Workload {
            name: None,
            arena: 0,
            lines: Vec::new(),
            vms: Vec::new(),
            queues: Vec::new(),
            fences: Vec::new(),
            mems: Vec::new(),
        };
        let mut models: Vec<VmModel> = Vec::new();
        let mut mem_names: FastMap<String, usize> = FastMap::default();
        let mut fence_lines: FastMap<String, usize> = FastMap::default();
        let mut header = false;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let t = raw.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let mut line: Line = serde_json::from_str(t).map_err(|e| {
                let msg = e.to_string();
                let field = serde_field(&msg);
                let reason = match msg.rfind(" at line ") {
                    Some(k) => msg[..k].to_string(),
                    None => msg,
                };
                WorkloadError { line: n, field, reason }
            })?;
            if !header {
                let Line::Workload { version, arena, name } = &line else {
                    return Err(bad(
                        n,
                        Some("op"),
                        "the first line must be the header {\"op\":\"workload\",...}",
                    ));
                };
                if *version != VERSION {
                    return Err(bad(
                        n,
                        Some("version"),
                        format!("version {version} is not one this build reads ({VERSION})"),
                    ));
                }
                if arena.0 < 4 << 20 || arena.0 % GPU_PAGE != 0 {
                    return Err(bad(
                        n,
                        Some("arena"),
                        format!("{:#x} is not a page multiple of at least 4 MiB", arena.0),
                    ));
                }
                w.arena = arena.0;
                w.name.clone_from(name);
                header = true;
                continue;
            }
            w.check_line(n, &mut line, &mut models, &mut mem_names, &mut fence_lines, dir)?;
            w.lines.push((n, line));
        }
        if !header {
            return Err(bad(1, Some("op"), "no header line {\"op\":\"workload\",...}"));
        }
        Ok(w)
    }

    fn vm_index(&self, n: usize, name: &str) -> Result<usize, WorkloadError> {
        self.vms
            .iter()
            .position(|v| v == name)
            .ok_or_else(|| bad(n, Some("vm"), format!("no VM `{name}` defined above")))
    }

    #[allow(clippy::too_many_arguments)]
    fn check_line(
        &mut self,
        n: usize,
        line: &mut Line,
        models: &mut Vec<VmModel>,
        mems: &mut FastMap<String, usize>,
        fences: &mut FastMap<String, usize>,
        dir: Option<&Path>,
    ) -> Result<(), WorkloadError> {
        let page = |field: &str, v: u64| -> Result<(), WorkloadError> {
            if !v.is_multiple_of(GPU_PAGE) {
                return Err(bad(n, Some(field), format!("{v:#x} is not a multiple of the 4 KiB GPU page")));
            }
            Ok(())
        };
        let nonzero = |field: &str, v: u64| -> Result<(), WorkloadError> {
            if v == 0 {
                return Err(bad(n, Some(field), "must not be zero"));
            }
            Ok(())
        };
        let va_err = |e: VaError| -> WorkloadError {
            let field = match e {
                VaError::ZeroSize { .. } => "size",
                VaError::BadRepeat { .. } => "period",
                _ => "va",
            };
            bad(n, Some(field), e.to_string())
        };
        let mut resolved = None;
        match &*line {
            Line::Workload { .. } => return Err(bad(n, Some("op"), "a second header")),
            Line::Vm { name, va_size, gpu, domain, addr_bits } => {
                if self.vms.contains(name) {
                    return Err(bad(n, Some("name"), format!("VM `{name}` is already defined")));
                }
                nonzero("va_size", va_size.0)?;
                page("va_size", va_size.0)?;
                if va_size.0 > 1 << 48 {
                    return Err(bad(
                        n,
                        Some("va_size"),
                        format!("{:#x} is past the GPU format's 48 bits", va_size.0),
                    ));
                }
                match gpu {
                    GpuKind::Direct if *domain != DomainMode::Strict => {
                        return Err(bad(n, Some("domain"), "a direct GPU has no IOMMU domain"));
                    }
                    GpuKind::Iommu if addr_bits.is_some() => {
                        return Err(bad(n, Some("addr_bits"), "addr_bits is for a direct GPU"));
                    }
                    GpuKind::Direct if addr_bits.is_some_and(|b| !(32..=64).contains(&b)) => {
                        return Err(bad(n, Some("addr_bits"), "must be 32..=64"));
                    }
                    _ => {}
                }
                let space = VaSpace::new(0, va_size.0, None).map_err(va_err)?;
                models.push(VmModel { space, queues: FastMap::default() });
                self.vms.push(name.clone());
                self.queues.push(Vec::new());
            }
            Line::Memory { name, vm, size, placement, seed, file } => {
                let v = self.vm_index(n, vm)?;
                if mems.contains_key(name) {
                    return Err(bad(n, Some("name"), format!("memory `{name}` is already live")));
                }
                let bytes = match (size, file) {
                    (Some(_), Some(_)) => {
                        return Err(bad(n, Some("file"), "give `size` or `file`, not both"));
                    }
                    (None, None) => return Err(bad(n, Some("size"), "missing: give `size` or `file`")),
                    (Some(s), None) => {
                        nonzero("size", s.0)?;
                        page("size", s.0)?;
                        if *placement == PlacementKind::Contiguous && s.0 % (2 << 20) != 0 {
                            return Err(bad(n, Some("size"), "contiguous memory is a multiple of 2 MiB"));
                        }
                        s.0
                    }
                    (None, Some(f)) => {
                        if seed.is_some() || *placement != PlacementKind::Scattered {
                            return Err(bad(
                                n,
                                Some("file"),
                                "a file's memory takes no `seed` or `placement`",
                            ));
                        }
                        let p = match dir {
                            Some(d) if Path::new(f.as_str()).is_relative() => d.join(f.as_str()),
                            _ => Path::new(f.as_str()).to_path_buf(),
                        };
                        let len = std::fs::metadata(&p)
                            .map_err(|e| bad(n, Some("file"), format!("{}: {e}", p.display())))?
                            .len();
                        resolved = Some(p.display().to_string());
                        len.max(1).next_multiple_of(GPU_PAGE)
                    }
                };
                mems.insert(name.clone(), self.mems.len());
                self.mems.push(MemInfo { vm: v, size: bytes });
            }
            Line::Free { vm, memory } => {
                let v = self.vm_index(n, vm)?;
                let m = *mems
                    .get(memory)
                    .ok_or_else(|| bad(n, Some("memory"), format!("no live memory `{memory}`")))?;
                if self.mems[m].vm != v {
                    return Err(bad(
                        n,
                        Some("vm"),
                        format!("memory `{memory}` belongs to VM `{}`", self.vms[self.mems[m].vm]),
                    ));
                }
                let still = models[v].space.obj_mappings(&m).count();
                if still > 0 {
                    return Err(bad(
                        n,
                        Some("memory"),
                        format!("memory `{memory}` still has {still} mapping(s)"),
                    ));
                }
                mems.remove(memory);
            }
            Line::Bind { vm, queue, va, size, memory, offset, waits, signal, .. }
            | Line::Repeat { vm, queue, va, size, memory, offset, waits, signal, .. } => {
                let v = self.vm_index(n, vm)?;
                page("va", va.0)?;
                nonzero("size", size.0)?;
                page("size", size.0)?;
                page("offset", offset.0)?;
                let m = *mems
                    .get(memory.as_str())
                    .ok_or_else(|| bad(n, Some("memory"), format!("no live memory `{memory}`")))?;
                if self.mems[m].vm != v {
                    return Err(bad(
                        n,
                        Some("memory"),
                        format!("memory `{memory}` belongs to VM `{}`", self.vms[self.mems[m].vm]),
                    ));
                }
                let mut req = Va::object(va.0, size.0, m, offset.0);
                let reach = if let Line::Repeat { period, .. } = &*line {
                    nonzero("period", period.0)?;
                    page("period", period.0)?;
                    if size.0 % period.0 != 0 {
                        return Err(bad(
                            n,
                            Some("period"),
                            format!("{:#x} does not divide the size {:#x}", period.0, size.0),
                        ));
                    }
                    req = req.repeating(period.0);
                    period.0
                } else {
                    size.0
                };
                if offset.0.checked_add(reach).is_none_or(|e| e > self.mems[m].size) {
                    return Err(bad(
                        n,
                        Some("offset"),
                        format!(
                            "[{:#x}, +{reach:#x}) is past memory `{memory}`'s {:#x} bytes",
                            offset.0, self.mems[m].size
                        ),
                    ));
                }
                let (queue, waits, signal) = (queue.clone(), waits.clone(), signal.clone());
                self.submission(n, v, &queue, &waits, signal.as_deref(), models, fences)?;
                models[v].space.map(&req).map_err(va_err)?;
            }
            Line::Sparse { vm, queue, va, size, waits, signal, .. }
            | Line::Unbind { vm, queue, va, size, waits, signal } => {
                let v = self.vm_index(n, vm)?;
                page("va", va.0)?;
                nonzero("size", size.0)?;
                page("size", size.0)?;
                let (queue, waits, signal) = (queue.clone(), waits.clone(), signal.clone());
                let sparse = matches!(line, Line::Sparse { .. });
                let (addr, range) = (va.0, size.0);
                self.submission(n, v, &queue, &waits, signal.as_deref(), models, fences)?;
                if sparse {
                    models[v].space.map(&Va::sparse(addr, range)).map_err(va_err)?;
                } else {
                    models[v].space.unmap(addr, range).map_err(va_err)?;
                }
            }
            Line::Wait { fence } => {
                if let Some(f) = fence
                    && !fences.contains_key(f)
                {
                    return Err(bad(
                        n,
                        Some("fence"),
                        format!("wait on fence `{f}` that no earlier line signals"),
                    ));
                }
            }
            Line::Check { vm, va, size, checksum, memory, offset, zero } => {
                let v = self.vm_index(n, vm)?;
                nonzero("size", size.0)?;
                if size.0 > 1 << 30 {
                    return Err(bad(n, Some("size"), "a check reads at most 1 GiB"));
                }
                let end = va.0.checked_add(size.0).filter(|&e| e <= models[v].space.end());
                if end.is_none() {
                    return Err(bad(
                        n,
                        Some("va"),
                        format!("[{:#x}, +{:#x}) is outside the VM", va.0, size.0),
                    ));
                }
                let kinds =
                    usize::from(checksum.is_some()) + usize::from(memory.is_some()) + usize::from(*zero);

                if kinds != 1 {
                    return Err(bad(
                        n,
                        Some("checksum"),
                        "give exactly one of `checksum`, `memory` or `zero: true`",
                    ));
                }
                if offset.is_some() && memory.is_none() {
                    return Err(bad(n, Some("offset"), "`offset` goes with `memory`"));
                }
                if let Some(name) = memory {
                    let m = *mems
                        .get(name.as_str())
                        .ok_or_else(|| bad(n, Some("memory"), format!("no live memory `{name}`")))?;
                    let off = offset.map_or(0, |o| o.0);
                    if off.checked_add(size.0).is_none_or(|e| e > self.mems[m].size) {
                        return Err(bad(
                            n,
                            Some("offset"),
                            format!("past memory `{name}`'s {:#x} bytes", self.mems[m].size),
                        ));
                    }
                }
            }
        }
        if let (Some(p), Line::Memory { file, .. }) = (resolved, line) {
            *file = Some(p);
        }
        Ok(())
    }

    /// Checks a submission's queue, waits and signal, and records them.
    #[allow(clippy::too_many_arguments)]
    fn submission(
        &mut self,
        n: usize,
        v: usize,
        queue: &str,
        waits: &[String],
        signal: Option<&str>,
        models: &mut [VmModel],
        fences: &mut FastMap<String, usize>,
    ) -> Result<(), WorkloadError> {
        if queue.is_empty() {
            return Err(bad(n, Some("queue"), "an empty queue name"));
        }
        for f in waits {
            if !fences.contains_key(f) {
                return Err(bad(
                    n,
                    Some("waits"),
                    format!("wait on fence `{f}` that no earlier line signals"),
                ));
            }
        }
        if let Some(s) = signal {
            if let Some(&at) = fences.get(s) {
                return Err(bad(n, Some("signal"), format!("fence `{s}` is already signalled by line {at}")));
            }
            fences.insert(s.to_string(), n);
            self.fences.push(s.to_string());
        }
        let qs = &mut models[v].queues;
        if !qs.contains_key(queue) {
            qs.insert(queue.to_string(), self.queues[v].len());
            self.queues[v].push(queue.to_string());
        }
        Ok(())
    }

    /// Bind ops (`bind`, `repeat`, `sparse`, `unbind`) in the workload.
    #[must_use]
    pub fn ops(&self) -> usize {
        self.lines
            .iter()
            .filter(|(_, l)| {
                matches!(
                    l,
                    Line::Bind { .. } | Line::Repeat { .. } | Line::Sparse { .. } | Line::Unbind { .. }
                )
            })
            .count()
    }
}

/// Writes a workload's lines (header first) as text.
#[must_use]
pub fn to_text(lines: &[Line]) -> String {
    let mut s = String::new();
    for l in lines {
        s.push_str(&l.to_json());
        s.push('\n');
    }
    s
}
