//! SGL data pointers: inline data blocks, last-segment tables and chained tables built from a
//! [`DmaVec`], and the controller-side decoder (REFERENCES.md §2).
#![forbid(unsafe_code)]

use super::{
    ListPool, MAX_SGL_SEGMENTS, MAX_SGL_TABLE_LEN, MAX_SGL_TABLES, NvmeError, checked_segments, decode_len,
};
use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::dma::{DmaSeg, DmaVec};
use crate::iommu::{DeviceId, Iommu};

/// SGL descriptor types (high nibble of the identifier byte).
pub mod sgl_type {
    /// Data block.
    pub const DATA: u8 = 0x0;
    /// Bit bucket.
    pub const BIT_BUCKET: u8 = 0x1;
    /// Segment: points at the next table, which is not the last.
    pub const SEGMENT: u8 = 0x2;
    /// Last segment: points at the last table.
    pub const LAST_SEGMENT: u8 = 0x3;
}

/// Descriptors per 4 KiB table.
pub const SGL_TABLE_ENTRIES: usize = (PAGE_SIZE / 16) as usize;

/// One 16-byte SGL descriptor, little endian: `addr: u64, len: u32, reserved: [u8; 3], id: u8`.
#[must_use]
pub fn sgl_descriptor(addr: DmaAddr, len: u32, typ: u8) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.as_u64().to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[15] = typ << 4;
    d
}

fn parse_descriptor(d: &[u8]) -> (DmaAddr, u32, u8) {
    let mut a = [0u8; 8];
    a.copy_from_slice(&d[..8]);
    let mut l = [0u8; 4];
    l.copy_from_slice(&d[8..12]);
    (DmaAddr::new(u64::from_le_bytes(a)), u32::from_le_bytes(l), d[15] >> 4)
}

/// How to build an SGL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SglOptions {
    /// Chain tables with segment descriptors (older kernels) instead of refusing more than one
    /// table's worth of segments.
    pub chain: bool,
}

/// A built SGL data pointer: the command's SGL1 descriptor and the tables it uses (give them
/// back with [`ListPool::release`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sgl {
    /// The descriptor in the command.
    pub sgl1: [u8; 16],
    /// Descriptor tables, in chain order.
    pub tables: Vec<(PhysAddr, DmaAddr)>,
}

/// Builds an SGL for `data`: one segment inline as a data block, otherwise a last-segment
/// descriptor to one table of data descriptors, or a chain of tables with `opts.chain` (at most
/// [`MAX_SGL_TABLES`], so that [`read_sgl`] follows all of it).
///
/// # Errors
/// [`NvmeError::Empty`], [`NvmeError::Dma`] with [`crate::dma::DmaError::EmptySegment`] or
/// [`crate::dma::DmaError::SegmentOverflow`] for a segment that is empty or wraps, [`NvmeError::TooLarge`]
/// (a segment over 4 GiB, or the request over `max_len` or past `u64::MAX`),
/// [`NvmeError::TooManySegments`] (over [`SGL_TABLE_ENTRIES`] without chaining, over
/// [`MAX_SGL_SEGMENTS`] with it), [`NvmeError::PoolExhausted`] (nothing is taken then).
pub fn build_sgl(
    pool: &mut ListPool,
    data: &DmaVec,
    max_len: u64,
    opts: SglOptions,
) -> Result<Sgl, NvmeError> {
    let (segs, _) = checked_segments(data, max_len)?;
    let seg_len = |s: &DmaSeg| {
        u32::try_from(s.len).map_err(|_| NvmeError::TooLarge { len: s.len, max: u64::from(u32::MAX) })
    };
    if segs.len() == 1 {
        return Ok(Sgl {
            sgl1: sgl_descriptor(segs[0].addr, seg_len(&segs[0])?, sgl_type::DATA),
            tables: Vec::new(),
        });
    }
    let per = SGL_TABLE_ENTRIES;
    if segs.len() > per && !opts.chain {
        return Err(NvmeError::TooManySegments { segments: segs.len(), max: per });
    }
    if segs.len() > MAX_SGL_SEGMENTS {
        return Err(NvmeError::TooManySegments { segments: segs.len(), max: MAX_SGL_SEGMENTS });
    }
    let mut lens = Vec::with_capacity(segs.len());
    for s in segs {
        lens.push(seg_len(s)?);
    }
    // Tables: every one but the last carries per - 1 data descriptors and a pointer.
    let n_tables = if segs.len() <= per { 1 } else { 1 + (segs.len() - per).div_ceil(per - 1) };
    let tables = pool.take(n_tables)?;
    match fill_sgl_tables(pool, &tables, segs, &lens) {
        Ok(sgl1) => Ok(Sgl { sgl1, tables }),
        Err(e) => {
            pool.release(tables);
            Err(e)
        }
    }
}

/// Writes the descriptor tables of a chained or single-table SGL into `tables` and returns SGL1.
fn fill_sgl_tables(
    pool: &ListPool,
    tables: &[(PhysAddr, DmaAddr)],
    segs: &[DmaSeg],
    lens: &[u32],
) -> Result<[u8; 16], NvmeError> {
    let per = SGL_TABLE_ENTRIES;
    let n_tables = tables.len();
    let mem = pool.dev.mem();
    // Bytes of each table: at most SGL_TABLE_ENTRIES descriptors, so at most 4096.
    let mut table_len = Vec::with_capacity(n_tables);
    let mut at = 0usize;
    for k in 0..n_tables {
        let last = k + 1 == n_tables;
        let n = if last { segs.len() - at } else { per - 1 };
        table_len.push(16 * (n + usize::from(!last)) as u32);
        at += n;
    }
    at = 0;
    let mut buf = Vec::with_capacity(MAX_SGL_TABLE_LEN as usize);
    for (k, &(pa, _)) in tables.iter().enumerate() {
        let last = k + 1 == n_tables;
        let n = if last { segs.len() - at } else { per - 1 };
        buf.clear();
        for (s, &l) in segs[at..at + n].iter().zip(&lens[at..at + n]) {
            buf.extend_from_slice(&sgl_descriptor(s.addr, l, sgl_type::DATA));
        }
        if !last {
            let typ = if k + 2 == n_tables { sgl_type::LAST_SEGMENT } else { sgl_type::SEGMENT };
            buf.extend_from_slice(&sgl_descriptor(tables[k + 1].1, table_len[k + 1], typ));
        }
        mem.write(pa, &buf).map_err(|_| NvmeError::PoolExhausted)?;
        at += n;
    }
    let first_typ = if n_tables == 1 { sgl_type::LAST_SEGMENT } else { sgl_type::SEGMENT };
    Ok(sgl_descriptor(tables[0].1, table_len[0], first_typ))
}

/// The controller's side: reads the `len` bytes an SGL describes, through the IOMMU as `dev`.
/// Allocates `len` bytes (at most [`super::MAX_DECODE_LEN`]) and one table buffer of
/// [`MAX_SGL_TABLE_LEN`] bytes, and follows at most [`MAX_SGL_TABLES`] tables, whatever the
/// descriptors in memory say.
///
/// # Errors
/// [`NvmeError::Empty`] (`len == 0`) and [`NvmeError::TooLarge`] (`len` over
/// [`super::MAX_DECODE_LEN`]) before anything is read; then, as the descriptors are followed,
/// [`NvmeError::BadDescriptor`] (a bit bucket, an unknown type, or a segment pointer that is not
/// the last descriptor of a segment table), [`NvmeError::BadSegmentLength`] (a table length that
/// is 0, not a multiple of 16 or over [`MAX_SGL_TABLE_LEN`]), [`NvmeError::SglChainTooLong`],
/// [`NvmeError::LengthMismatch`] (more data than `len` as soon as it shows, or less at the end),
/// [`NvmeError::Fault`].
pub fn read_sgl(iommu: &Iommu, dev: DeviceId, sgl1: &[u8; 16], len: u64) -> Result<Vec<u8>, NvmeError> {
    let mut out = Vec::with_capacity(decode_len(len)?);
    let read_data = |addr: DmaAddr, n: u32, out: &mut Vec<u8>| -> Result<(), NvmeError> {
        let at = out.len();
        // `at` is at most `len`, so neither this sum nor the resize below can overflow.
        let end = (at as u64).saturating_add(u64::from(n));
        if end > len {
            return Err(NvmeError::LengthMismatch { described: end, len });
        }
        out.resize(end as usize, 0);
        iommu.dma_read(dev, addr, &mut out[at..])?;
        Ok(())
    };
    let mut buf = [0u8; MAX_SGL_TABLE_LEN as usize];
    let mut tables = 0usize;
    let (mut addr, mut n, mut typ) = parse_descriptor(sgl1);
    loop {
        match typ {
            sgl_type::DATA => {
                read_data(addr, n, &mut out)?;
                break;
            }
            sgl_type::SEGMENT | sgl_type::LAST_SEGMENT => {
                if n == 0 || n % 16 != 0 || n > MAX_SGL_TABLE_LEN {
                    return Err(NvmeError::BadSegmentLength(n));
                }
                tables += 1;
                if tables > MAX_SGL_TABLES {
                    return Err(NvmeError::SglChainTooLong { max: MAX_SGL_TABLES });
                }
                let table = &mut buf[..n as usize];
                iommu.dma_read(dev, addr, table)?;
                let count = table.len() / 16;
                let mut next = None;
                for (i, d) in table.chunks_exact(16).enumerate() {
                    let (a, l, t) = parse_descriptor(d);
                    match t {
                        sgl_type::DATA => read_data(a, l, &mut out)?,
                        sgl_type::SEGMENT | sgl_type::LAST_SEGMENT
                            if i + 1 == count && typ == sgl_type::SEGMENT =>
                        {
                            next = Some((a, l, t));
                        }
                        other => return Err(NvmeError::BadDescriptor(other)),
                    }
                }
                match next {
                    Some((a, l, t)) => (addr, n, typ) = (a, l, t),
                    None => break,
                }
            }
            other => return Err(NvmeError::BadDescriptor(other)),
        }
    }
    if out.len() as u64 != len {
        return Err(NvmeError::LengthMismatch { described: out.len() as u64, len });
    }
    Ok(out)
}
