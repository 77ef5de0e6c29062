//! Address newtypes and page sizes.
//!
//! Three address spaces meet in vmbind, and mixing them up is the classic bug of DMA code:
//!
//! - [`PhysAddr`]: an address in [`crate::mem::PhysMem`], the "physical memory" of the model;
//! - [`DmaAddr`]: what a device puts on the bus: an IOVA when an IOMMU translates, else a bus
//!   address equal to the physical one;
//! - [`GpuVa`]: a GPU virtual address, translated by the GPU page table.
//!
//! Each is a distinct type with checked arithmetic only (in the manner of rust-vmm's
//! `vm-memory` address traits): an operation that would wrap returns `None`.
#![forbid(unsafe_code)]

use core::fmt;

/// The page sizes a radix table of 512-entry levels can map with one leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB, a leaf at level 0.
    Size4K,
    /// 2 MiB, a leaf at level 1.
    Size2M,
    /// 1 GiB, a leaf at level 2.
    Size1G,
}

impl PageSize {
    /// All sizes, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

    /// Size in bytes.
    #[must_use]
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }

    /// log2 of the size in bytes.
    #[must_use]
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size1G => 30,
        }
    }

    /// The table level whose entries map this size (0 = the 4 KiB leaf table).
    #[must_use]
    pub const fn level(self) -> u8 {
        match self {
            PageSize::Size4K => 0,
            PageSize::Size2M => 1,
            PageSize::Size1G => 2,
        }
    }

    /// The page size mapped by one entry at `level`, if a leaf can live there.
    #[must_use]
    pub const fn from_level(level: u8) -> Option<PageSize> {
        match level {
            0 => Some(PageSize::Size4K),
            1 => Some(PageSize::Size2M),
            2 => Some(PageSize::Size1G),
            _ => None,
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageSize::Size4K => "4KiB",
            PageSize::Size2M => "2MiB",
            PageSize::Size1G => "1GiB",
        })
    }
}

/// The base page size, 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// Behaviour shared by the address newtypes, so that generic code (the page-table engine is
/// generic over the address space it translates) can take any of them.
pub trait Address: Copy + Eq + Ord + fmt::Debug + fmt::Display + Send + Sync + 'static {
    /// What kind of address it is, in words ("phys", "dma", "gpuva").
    const KIND: &'static str;
    /// Wraps a raw value.
    fn new(raw: u64) -> Self;
    /// The raw value.
    fn as_u64(self) -> u64;
}

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident, $label:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// The address zero.
            pub const ZERO: $name = $name(0);

            /// Wraps a raw value.
            #[must_use]
            pub const fn new(raw: u64) -> Self {
                $name(raw)
            }

            /// The raw value.
            #[must_use]
            pub const fn as_u64(self) -> u64 {
                self.0
            }

            /// `self + bytes`, or `None` on overflow.
            #[must_use]
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(v) => Some($name(v)),
                    None => None,
                }
            }

            /// `self - bytes`, or `None` on underflow.
            #[must_use]
            pub const fn checked_sub(self, bytes: u64) -> Option<Self> {
                match self.0.checked_sub(bytes) {
                    Some(v) => Some($name(v)),
                    None => None,
                }
            }

            /// Bytes from `base` up to `self`, or `None` when `self < base`.
            #[must_use]
            pub const fn offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }

            /// Whether the address is a multiple of `align` (a power of two in every use here;
            /// any other value is taken literally, and no address is a multiple of 0).
            #[must_use]
            pub const fn is_aligned(self, align: u64) -> bool {
                if align.is_power_of_two() {
                    self.0 & (align - 1) == 0
                } else {
                    align != 0 && self.0 % align == 0
                }
            }

            /// Rounds down to a multiple of `align` (a power of two; any other non-zero value is
            /// taken literally; 0 leaves the address as it is).
            #[must_use]
            pub const fn align_down(self, align: u64) -> Self {
                if align.is_power_of_two() {
                    $name(self.0 & !(align - 1))
                } else if align == 0 {
                    self
                } else {
                    $name(self.0 - self.0 % align)
                }
            }

            /// Rounds up to a multiple of `align` (a power of two; any other non-zero value is
            /// taken literally), or `None` on overflow or for `align == 0`.
            #[must_use]
            pub const fn align_up(self, align: u64) -> Option<Self> {
                if align == 0 {
                    return None;
                }
                let down = self.align_down(align).0;
                if down == self.0 {
                    return Some(self);
                }
                match down.checked_add(align) {
                    Some(v) => Some($name(v)),
                    None => None,
                }
            }

            /// The offset within a page of `size`.
            #[must_use]
            pub const fn page_offset(self, size: PageSize) -> u64 {
                self.0 & (size.bytes() - 1)
            }
        }

        impl Address for $name {
            const KIND: &'static str = $label;
            fn new(raw: u64) -> Self {
                $name(raw)
            }
            fn as_u64(self) -> u64 {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($label, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($label, " {:#x}"), self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address_type!(
    /// A physical address: an offset into [`crate::mem::PhysMem`] (whose address 0 is never
    /// handed out), or any machine physical address a table may point at.
    PhysAddr,
    "phys"
);
address_type!(
    /// A DMA (bus) address: an IOVA when an IOMMU translates, else equal to the physical address.
    DmaAddr,
    "dma"
);
address_type!(
    /// A GPU virtual address.
    GpuVa,
    "gpuva"
);

/// Why a `(start, len)` pair is not a [`Span`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpanError {
    /// A zero length.
    #[error("zero-length range at {start:#x}")]
    Empty {
        /// The start given.
        start: u64,
    },
    /// `start + len` wraps past 2^64.
    #[error("[{start:#x}, +{len:#x}) wraps past 2^64")]
    Overflow {
        /// The start given.
        start: u64,
        /// The length given.
        len: u64,
    },
    /// The range ends past the limit of its space (a table format's input width, an aperture).
    #[error("[{start:#x}, +{len:#x}) ends past the limit {limit:#x}")]
    Beyond {
        /// The start given.
        start: u64,
        /// The length given.
        len: u64,
        /// The exclusive limit.
        limit: u64,
    },
}

/// A non-empty byte range `[start, start + len)` of address space `A` that does not wrap: the
/// checked form that every entry point taking an address and a length builds first, so that no
/// `+` on an address from outside can wrap, in release and debug builds alike.
///
/// ```
/// use vmbind::addr::{DmaAddr, Span, SpanError};
/// let s = Span::new(DmaAddr::new(0x1000), 0x2000).unwrap();
/// assert_eq!((s.start(), s.end()), (DmaAddr::new(0x1000), 0x3000));
/// assert_eq!(Span::new(DmaAddr::new(u64::MAX), 1), Err(SpanError::Overflow { start: u64::MAX, len: 1 }));
/// assert!(Span::within(DmaAddr::new(0xf000), 0x2000, 0x10000).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span<A> {
    start: A,
    len: u64,
}

impl<A: Address> Span<A> {
    /// `[start, start + len)`.
    ///
    /// # Errors
    /// [`SpanError::Empty`] for `len == 0`, [`SpanError::Overflow`] when the end wraps. An end of
    /// exactly 2^64 wraps too: the end must be representable.
    pub fn new(start: A, len: u64) -> Result<Self, SpanError> {
        let s = start.as_u64();
        if len == 0 {
            return Err(SpanError::Empty { start: s });
        }
        if s.checked_add(len).is_none() {
            return Err(SpanError::Overflow { start: s, len });
        }
        Ok(Span { start, len })
    }

    /// [`Span::new`], also ending at or below `limit` (exclusive).
    ///
    /// # Errors
    /// As [`Span::new`], and [`SpanError::Beyond`] when the range ends past `limit`.
    pub fn within(start: A, len: u64, limit: u64) -> Result<Self, SpanError> {
        let span = Self::new(start, len)?;
        if span.end() > limit {
            return Err(SpanError::Beyond { start: start.as_u64(), len, limit });
        }
        Ok(span)
    }

    /// First address.
    #[must_use]
    pub fn start(self) -> A {
        self.start
    }

    /// Length in bytes (never 0).
    #[must_use]
    pub fn len(self) -> u64 {
        self.len
    }

    /// Always `false`: a span is never empty (present for the `len`/`is_empty` convention).
    #[must_use]
    pub fn is_empty(self) -> bool {
        false
    }

    /// The exclusive end, `start + len` (never wraps).
    #[must_use]
    pub fn end(self) -> u64 {
        self.start.as_u64() + self.len
    }

    /// The last address in the range.
    #[must_use]
    pub fn last(self) -> A {
        A::new(self.end() - 1)
    }

    /// Whether `a` lies in the range.
    #[must_use]
    pub fn contains(self, a: A) -> bool {
        (self.start.as_u64()..self.end()).contains(&a.as_u64())
    }
}

/// `base + len` as an exclusive end, or `None` when it overflows `u64`.
#[must_use]
pub const fn checked_end(base: u64, len: u64) -> Option<u64> {
    base.checked_add(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_arithmetic_reports_overflow_instead_of_wrapping() {
        assert_eq!(PhysAddr::new(u64::MAX).checked_add(1), None);
        assert_eq!(DmaAddr::new(0).checked_sub(1), None);
        assert_eq!(GpuVa::new(u64::MAX - 10).align_up(PAGE_SIZE), None);
        assert_eq!(PhysAddr::new(0x1234).align_down(PAGE_SIZE), PhysAddr::new(0x1000));
        assert_eq!(PhysAddr::new(0x1234).align_up(PAGE_SIZE), Some(PhysAddr::new(0x2000)));
        assert_eq!(PhysAddr::new(0x3000).offset_from(PhysAddr::new(0x1000)), Some(0x2000));
        assert_eq!(PhysAddr::new(0x1000).offset_from(PhysAddr::new(0x3000)), None);
    }

    #[test]
    fn alignment_helpers_take_any_alignment_without_panicking() {
        let a = DmaAddr::new(0x1234);
        assert!(!a.is_aligned(0) && a.is_aligned(1) && !a.is_aligned(0x1000));
        assert_eq!(a.align_down(0), a);
        assert_eq!(a.align_up(0), None);
        assert_eq!(a.align_down(1000), DmaAddr::new(4000));
        assert_eq!(a.align_up(1000), Some(DmaAddr::new(5000)));
        assert!(DmaAddr::new(5000).is_aligned(1000));
        assert_eq!(DmaAddr::new(u64::MAX).align_up(7), None);
        assert_eq!(DmaAddr::new(u64::MAX).align_up(1 << 63), None);
        assert_eq!(DmaAddr::new(1 << 63).align_up(1 << 63), Some(DmaAddr::new(1 << 63)));
    }

    #[test]
    fn spans_refuse_empty_wrapping_and_overlong_ranges() {
        assert_eq!(Span::new(PhysAddr::new(5), 0), Err(SpanError::Empty { start: 5 }));
        let top = DmaAddr::new(u64::MAX - 0xfff);
        assert_eq!(Span::new(top, 0x1000), Err(SpanError::Overflow { start: top.as_u64(), len: 0x1000 }));
        let s = Span::new(top, 0xfff).unwrap();
        assert_eq!((s.end(), s.last()), (u64::MAX, DmaAddr::new(u64::MAX - 1)));
        assert!(s.contains(top) && !s.contains(DmaAddr::new(u64::MAX)));
        assert_eq!(
            Span::within(GpuVa::new(1 << 47), (1 << 47) + 1, 1 << 48),
            Err(SpanError::Beyond { start: 1 << 47, len: (1 << 47) + 1, limit: 1 << 48 })
        );
        assert!(Span::within(GpuVa::new(1 << 47), 1 << 47, 1 << 48).is_ok());
    }

    #[test]
    fn page_sizes_match_their_levels() {
        for s in PageSize::ALL {
            assert_eq!(PageSize::from_level(s.level()), Some(s));
            assert_eq!(s.bytes(), 1 << (12 + 9 * u32::from(s.level())));
        }
        assert_eq!(PageSize::from_level(3), None);
        assert!(PhysAddr::new(0x20_0000).is_aligned(PageSize::Size2M.bytes()));
        assert_eq!(GpuVa::new(0x20_1234).page_offset(PageSize::Size2M), 0x1234);
    }
}
