//! The GPU table format (REFERENCES.md §7, AMD GFX9 style): what a GPU's MMU walks to turn a
//! GPU virtual address into a DMA address.
//!
//! Bits of an entry: 0 valid, 1 system memory, 2 snooped, 3 encrypted, 4 execute, 5 read,
//! 6 write, 7–11 fragment, 12–47 the address, 51 PRT ("partially resident": a sparse entry),
//! 54 on a directory entry (levels 1 and 2): the entry is a huge leaf (2 MiB or 1 GiB).
//! Four levels of 512 entries over a 48-bit GPU VA. A leaf's address is a *DMA address*: an IOVA
//! when an IOMMU translates for the GPU, the physical address when none does.
//!
//! A sparse entry is PRT set with valid clear: the walk finds it occupied (a map over it is
//! refused like a map over any mapping) and the GPU reads zeros and drops writes.
//!
//! The fragment field says that the entry belongs to an aligned run of `2^(12 + frag)` bytes that
//! is contiguous in both address spaces, so one TLB entry may cover the whole run:
//! [`fragment`] computes it for a run, [`GpuGfx9::with_fragment`] sets it in an entry.
#![forbid(unsafe_code)]

use super::format::{Format, Prot, Pte};
use crate::addr::{DmaAddr, GpuVa, PhysAddr};

/// Valid.
pub const GPU_VALID: u64 = 1 << 0;
/// System memory (not device-local VRAM).
pub const GPU_SYSTEM: u64 = 1 << 1;
/// Snooped (coherent with CPU caches).
pub const GPU_SNOOPED: u64 = 1 << 2;
/// Encrypted.
pub const GPU_ENCRYPTED: u64 = 1 << 3;
/// Execute.
pub const GPU_EXEC: u64 = 1 << 4;
/// Read.
pub const GPU_READ: u64 = 1 << 5;
/// Write.
pub const GPU_WRITE: u64 = 1 << 6;
/// The fragment field's shift (bits 7–11).
pub const GPU_FRAG_SHIFT: u32 = 7;
/// The fragment field.
pub const GPU_FRAG_MASK: u64 = 0x1f << GPU_FRAG_SHIFT;
/// The address field (bits 12–47).
pub const GPU_ADDR_MASK: u64 = ((1 << 48) - 1) & !0xfff;
/// Partially resident: a sparse entry (with valid clear).
pub const GPU_PRT: u64 = 1 << 51;
/// On a directory entry: the entry is a huge leaf.
pub const GPU_HUGE: u64 = 1 << 54;

/// The largest fragment the field holds (2^(12 + 31) bytes).
pub const MAX_FRAGMENT: u8 = 31;

/// The names of the bits of an entry, for dumps: every bit the format defines that is set,
/// with the fragment as `frag=N` and `huge` only where the level gives bit 54 that meaning.
#[must_use]
pub fn bit_names(raw: u64, level: u8) -> Vec<String> {
    let mut out = Vec::new();
    for (bit, name) in [
        (GPU_VALID, "valid"),
        (GPU_SYSTEM, "system"),
        (GPU_SNOOPED, "snooped"),
        (GPU_ENCRYPTED, "encrypted"),
        (GPU_EXEC, "exec"),
        (GPU_READ, "read"),
        (GPU_WRITE, "write"),
        (GPU_PRT, "prt"),
    ] {
        if raw & bit != 0 {
            out.push(name.to_string());
        }
    }
    let frag = (raw & GPU_FRAG_MASK) >> GPU_FRAG_SHIFT;
    if frag != 0 {
        out.push(format!("frag={frag}"));
    }
    if level > 0 && raw & GPU_HUGE != 0 {
        out.push("huge".to_string());
    }
    out
}

/// The fragment of a contiguous run of `len` bytes starting at address `start` (§7): the
/// largest `f` with `2^f` pages dividing the start and fitting in the length, that is
/// `min(trailing zeros of start, floor(log2(len)))` in 4 KiB units, capped at [`MAX_FRAGMENT`];
/// 0 for a run shorter than two pages (scattered pages).
#[must_use]
pub fn fragment(start: u64, len: u64) -> u8 {
    let pages = len >> 12;
    if pages == 0 {
        return 0;
    }
    let align = (start >> 12).trailing_zeros();
    let size = 63 - pages.leading_zeros();
    align.min(size).min(u32::from(MAX_FRAGMENT)) as u8
}

/// The GPU page-table format of REFERENCES.md §7 (AMD GFX9 style).
#[derive(Debug, Clone, Copy)]
pub struct GpuGfx9;

impl GpuGfx9 {
    /// `raw` with its fragment field set to `frag` (at most [`MAX_FRAGMENT`]).
    #[must_use]
    pub fn with_fragment(raw: u64, frag: u8) -> u64 {
        (raw & !GPU_FRAG_MASK) | (u64::from(frag.min(MAX_FRAGMENT)) << GPU_FRAG_SHIFT)
    }

    /// The fragment field of `raw`.
    #[must_use]
    pub fn fragment_of(raw: u64) -> u8 {
        ((raw & GPU_FRAG_MASK) >> GPU_FRAG_SHIFT) as u8
    }
}

impl Format for GpuGfx9 {
    type Va = GpuVa;
    type Out = DmaAddr;
    const NAME: &'static str = "GPU (GFX9 style)";
    const LEVELS: u8 = 4;
    const VA_BITS: u32 = 48;
    const PA_BITS: u32 = 48;
    // Capped at 2 MiB: larger aligned runs take huge leaves, and a cut then rewrites at most one
    // leaf table's fragments.
    const MAX_FRAGMENT: u8 = 9;
    const FRAGMENT_SHIFT: u32 = GPU_FRAG_SHIFT;
    const FRAGMENT_MASK: u64 = GPU_FRAG_MASK;

    #[inline]
    fn leaf_allowed(level: u8) -> bool {
        level <= 2
    }

    #[inline]
    fn is_present(raw: u64) -> bool {
        raw & (GPU_VALID | GPU_PRT) != 0
    }

    #[inline]
    fn table_entry(pa: PhysAddr) -> u64 {
        pa.as_u64() | GPU_VALID
    }

    #[inline]
    fn leaf_bits(level: u8, prot: Prot) -> u64 {
        if prot.is_empty() {
            // No access at all encodes no present entry (the engine refuses it).
            return 0;
        }
        let mut b = GPU_VALID | GPU_SYSTEM | GPU_SNOOPED;
        if prot.contains(Prot::READ) {
            b |= GPU_READ;
        }
        if prot.contains(Prot::WRITE) {
            b |= GPU_WRITE;
        }
        if prot.contains(Prot::EXEC) {
            b |= GPU_EXEC;
        }
        if level > 0 {
            b |= GPU_HUGE;
        }
        b
    }

    #[inline]
    fn decode(raw: u64, level: u8) -> Pte<DmaAddr> {
        if raw & GPU_VALID == 0 {
            return if raw & GPU_PRT != 0 { Pte::Sparse } else { Pte::Empty };
        }
        let addr = raw & GPU_ADDR_MASK;
        if level == 0 || raw & GPU_HUGE != 0 {
            let mut prot = Prot::NONE;
            if raw & GPU_READ != 0 {
                prot = prot | Prot::READ;
            }
            if raw & GPU_WRITE != 0 {
                prot = prot | Prot::WRITE;
            }
            if raw & GPU_EXEC != 0 {
                prot = prot | Prot::EXEC;
            }
            Pte::Leaf { pa: DmaAddr::new(addr), prot }
        } else {
            Pte::Table(PhysAddr::new(addr))
        }
    }

    #[inline]
    fn sparse_bits(level: u8) -> Option<u64> {
        Some(if level > 0 { GPU_PRT | GPU_HUGE } else { GPU_PRT })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_encode_and_decode_every_bit() {
        let pa = DmaAddr::new(0x7654_3210_0000);
        for level in 0..3 {
            for prot in [Prot::READ, Prot::WRITE, Prot::RW, Prot::RW | Prot::EXEC, Prot::READ | Prot::EXEC] {
                let raw = pa.as_u64() | GpuGfx9::leaf_bits(level, prot);
                assert_eq!(GpuGfx9::decode(raw, level), Pte::Leaf { pa, prot });
                assert!(GpuGfx9::is_present(raw));
                // The fragment field changes nothing about the translation.
                let f = GpuGfx9::with_fragment(raw, 9);
                assert_eq!(GpuGfx9::fragment_of(f), 9);
                assert_eq!(GpuGfx9::decode(f, level), Pte::Leaf { pa, prot });
            }
        }
        // Exact bits of a 4 KiB read-write leaf and of a 2 MiB one.
        assert_eq!(GpuGfx9::leaf_bits(0, Prot::RW), 0b110_0111);
        assert_eq!(
            GpuGfx9::leaf_bits(1, Prot::READ),
            GPU_VALID | GPU_SYSTEM | GPU_SNOOPED | GPU_READ | GPU_HUGE
        );
        assert_eq!(GpuGfx9::leaf_bits(0, Prot::NONE), 0);
        let tp = PhysAddr::new(pa.as_u64());
        let t = GpuGfx9::table_entry(tp);
        assert_eq!(t, pa.as_u64() | 1);
        assert_eq!(GpuGfx9::decode(t, 2), Pte::Table(tp));
        assert_eq!(GpuGfx9::decode(0, 1), Pte::Empty);
        for level in 0..3 {
            let s = GpuGfx9::sparse_bits(level).unwrap();
            assert!(GpuGfx9::is_present(s));
            assert_eq!(GpuGfx9::decode(s, level), Pte::Sparse);
            assert_eq!(s & GPU_VALID, 0);
        }
        // The address field stops at bit 47: bit 48 and above never leak into the address.
        assert_eq!(
            GpuGfx9::decode((1 << 48) | GPU_VALID | GPU_READ, 0),
            Pte::Leaf { pa: DmaAddr::new(0), prot: Prot::READ }
        );
    }

    #[test]
    fn bit_names_name_every_bit() {
        let raw = GPU_VALID
            | GPU_SYSTEM
            | GPU_SNOOPED
            | GPU_ENCRYPTED
            | GPU_EXEC
            | GPU_READ
            | GPU_WRITE
            | GPU_PRT
            | GPU_HUGE;
        let raw = GpuGfx9::with_fragment(raw, 4);
        assert_eq!(
            bit_names(raw, 1),
            ["valid", "system", "snooped", "encrypted", "exec", "read", "write", "prt", "frag=4", "huge"]
        );
        // Bit 54 means "huge" only on a directory entry.
        assert!(!bit_names(raw, 0).contains(&"huge".to_string()));
        assert!(bit_names(0, 0).is_empty());
    }

    #[test]
    fn fragments_follow_alignment_and_length() {
        assert_eq!(fragment(0x1000, 0x1000), 0); // one page
        assert_eq!(fragment(0x10_0000, 0x1000), 0);
        assert_eq!(fragment(0x0, 0x2000), 1);
        assert_eq!(fragment(0x1000, 0x10_0000), 0); // misaligned start
        assert_eq!(fragment(0x20_0000, 0x20_0000), 9); // 2 MiB aligned, 2 MiB long
        assert_eq!(fragment(0x20_0000, 0x30_0000), 9); // floor(log2(768 pages)) = 9
        assert_eq!(fragment(0x8000, 0x10_0000), 3); // 32 KiB aligned
        assert_eq!(fragment(0, 1 << 50), MAX_FRAGMENT);
        assert_eq!(fragment(0x1000, 0xfff), 0);
    }
}
