//! Entry encodings: the [`Format`] trait that plugs a hardware table layout into the one radix
//! engine of [`super::PageTable`], and the formats themselves.
//!
//! Split as aarch64-paging splits `descriptor.rs` (encoding) from `paging.rs` (engine): a format
//! knows bits, the engine knows walks.
#![forbid(unsafe_code)]

use core::fmt;
use core::ops::BitOr;

use crate::addr::{Address, DmaAddr, PhysAddr};

/// Access permissions of a leaf.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Prot(u8);

impl Prot {
    /// No access.
    pub const NONE: Prot = Prot(0);
    /// The device may read.
    pub const READ: Prot = Prot(1);
    /// The device may write.
    pub const WRITE: Prot = Prot(2);
    /// The device may execute (GPU shaders, instruction fetch).
    pub const EXEC: Prot = Prot(4);
    /// Read and write.
    pub const RW: Prot = Prot(3);

    /// Whether every permission of `other` is in `self`.
    #[must_use]
    pub const fn contains(self, other: Prot) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no permission is set.
    #[must_use]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The raw bits (1 read, 2 write, 4 exec).
    #[must_use]
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// From raw bits; unknown bits are dropped.
    #[must_use]
    pub const fn from_bits_truncate(bits: u8) -> Prot {
        Prot(bits & 7)
    }
}

impl BitOr for Prot {
    type Output = Prot;
    fn bitor(self, rhs: Prot) -> Prot {
        Prot(self.0 | rhs.0)
    }
}

impl fmt::Debug for Prot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = if self.contains(Prot::READ) { 'r' } else { '-' };
        let w = if self.contains(Prot::WRITE) { 'w' } else { '-' };
        let x = if self.contains(Prot::EXEC) { 'x' } else { '-' };
        write!(f, "{r}{w}{x}")
    }
}

/// What one entry means, as decoded by a [`Format`] whose leaves hold addresses of type `A`
/// (its [`Format::Out`]). Table pointers are always physical: tables live in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pte<A = PhysAddr> {
    /// Nothing is mapped through this entry.
    Empty,
    /// A pointer to the next-level table.
    Table(PhysAddr),
    /// A sparse (NULL, partially resident) entry: occupied but not valid. Reads through it
    /// return zeros and writes are dropped; it blocks an overlapping map like any mapping.
    Sparse,
    /// A leaf: the start of the mapped block and its permissions.
    Leaf {
        /// Output address of the block (aligned to the level's size).
        pa: A,
        /// Permissions.
        prot: Prot,
    },
}

/// A page-table layout: levels of 512 eight-byte entries, and how entries are encoded.
///
/// Level 0 is the 4 KiB leaf table; level `l` entries each span `1 << (12 + 9 l)` bytes; the root
/// is level `LEVELS - 1`. The engine builds a leaf as `pa | leaf_bits(level, prot)`, so formats
/// keep the address in bits `12..PA_BITS` and their flags elsewhere.
pub trait Format: Send + Sync + 'static {
    /// The address space this table translates (IOVA for the IOMMU, GPU VA for the GPU).
    type Va: Address;
    /// The address space its leaves point into (physical for the IOMMU, DMA addresses for the
    /// GPU, whose accesses an IOMMU may translate again).
    type Out: Address;
    /// A short name for dumps and errors.
    const NAME: &'static str;
    /// Number of levels, root included (at most 4 in the formats here).
    const LEVELS: u8;
    /// Width of the input address space: addresses at or above `1 << VA_BITS` are refused.
    const VA_BITS: u32;
    /// Width of the output addresses an entry can hold.
    const PA_BITS: u32;
    /// Whether entries at `level` may be leaves.
    fn leaf_allowed(level: u8) -> bool;
    /// Whether a raw entry is present (anything but [`Pte::Empty`]).
    fn is_present(raw: u64) -> bool;
    /// The entry pointing at a next-level table at `pa`.
    fn table_entry(pa: PhysAddr) -> u64;
    /// The flag bits of a leaf at `level` with `prot` (the address is OR-ed in).
    fn leaf_bits(level: u8, prot: Prot) -> u64;
    /// Decodes a raw entry found at `level`.
    fn decode(raw: u64, level: u8) -> Pte<Self::Out>;
    /// Largest fragment a 4 KiB leaf may claim (REFERENCES.md §7; 0: the format has none). The
    /// engine caps it at 9, so a fragment block never leaves its leaf table.
    const MAX_FRAGMENT: u8 = 0;
    /// Where the fragment field sits in an entry.
    const FRAGMENT_SHIFT: u32 = 0;
    /// The fragment field's bits.
    const FRAGMENT_MASK: u64 = 0;
    /// The raw sparse entry at `level` ([`Pte::Sparse`]), for formats that have one (its
    /// `is_present` must be true and it must decode as `Sparse`). `None`: the format has no
    /// sparse entries, and a [`super::MapSource::Sparse`] map is refused.
    fn sparse_bits(level: u8) -> Option<u64> {
        let _ = level;
        None
    }
}

/// x86-64 / Intel VT-d second-stage compatible IOMMU format (REFERENCES.md §3): four levels of
/// 512 entries; bit 0 read (the x86 "present" bit), bit 1 write, bit 7 a 2 MiB or 1 GiB leaf at
/// levels 1 and 2; address in bits 51:12. Table entries carry read and write, as both VT-d and
/// x86 require for the walk to continue, so the `x86_64` crate can walk these tables.
#[derive(Debug, Clone, Copy)]
pub struct X86Iommu;

const X86_R: u64 = 1 << 0;
const X86_W: u64 = 1 << 1;
const X86_PS: u64 = 1 << 7;
const X86_ADDR: u64 = ((1 << 52) - 1) & !0xfff;

impl Format for X86Iommu {
    type Va = DmaAddr;
    type Out = PhysAddr;
    const NAME: &'static str = "x86-64/VT-d second stage";
    const LEVELS: u8 = 4;
    const VA_BITS: u32 = 48;
    const PA_BITS: u32 = 52;

    #[inline]
    fn leaf_allowed(level: u8) -> bool {
        level <= 2
    }

    #[inline]
    fn is_present(raw: u64) -> bool {
        raw & (X86_R | X86_W) != 0
    }

    #[inline]
    fn table_entry(pa: PhysAddr) -> u64 {
        pa.as_u64() | X86_R | X86_W
    }

    #[inline]
    fn leaf_bits(level: u8, prot: Prot) -> u64 {
        let mut b = 0;
        if prot.contains(Prot::READ) {
            b |= X86_R;
        }
        if prot.contains(Prot::WRITE) {
            b |= X86_W;
        }
        if level > 0 {
            b |= X86_PS;
        }
        b
    }

    #[inline]
    fn decode(raw: u64, level: u8) -> Pte {
        if raw & (X86_R | X86_W) == 0 {
            return Pte::Empty;
        }
        let pa = PhysAddr::new(raw & X86_ADDR);
        if level == 0 || raw & X86_PS != 0 {
            let mut prot = Prot::NONE;
            if raw & X86_R != 0 {
                prot = prot | Prot::READ;
            }
            if raw & X86_W != 0 {
                prot = prot | Prot::WRITE;
            }
            Pte::Leaf { pa, prot }
        } else {
            Pte::Table(pa)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x86_entries_round_trip() {
        let pa = PhysAddr::new(0x12_3456_7000);
        for level in 0..3 {
            for prot in [Prot::READ, Prot::WRITE, Prot::RW] {
                let raw = pa.as_u64() | X86Iommu::leaf_bits(level, prot);
                assert_eq!(X86Iommu::decode(raw, level), Pte::Leaf { pa, prot });
            }
        }
        let t = X86Iommu::table_entry(pa);
        assert_eq!(X86Iommu::decode(t, 2), Pte::Table(pa));
        assert_eq!(X86Iommu::decode(0, 1), Pte::Empty);
        assert!(!X86Iommu::is_present(X86Iommu::leaf_bits(0, Prot::EXEC)));
        assert_eq!(format!("{:?}", Prot::RW), "rw-");
    }
}
