//! The peers vmbind is measured against, set up on the same arena and the same pages.
//! Each is driven through its best API for the job, as its own documentation intends.
#![allow(dead_code)]

use std::ptr::NonNull;
use std::sync::Arc;

use crate::addr::{PAGE_SIZE, PhysAddr};
use crate::mem::PhysMem;

/// Table frames taken from the arena for a peer's tables, given back when the peer is dropped.
struct ArenaFrames {
    mem: Arc<PhysMem>,
    taken: Vec<PhysAddr>,
}

impl ArenaFrames {
    fn take_zeroed(&mut self) -> PhysAddr {
        let pa = self.mem.alloc_frame().expect("arena has room for peer tables");
        self.mem.zero(pa, PAGE_SIZE).unwrap();
        self.taken.push(pa);
        pa
    }
}

impl Drop for ArenaFrames {
    fn drop(&mut self) {
        self.mem.free_frames(&self.taken).unwrap();
    }
}

pub mod x86 {
    use super::*;
    use x86_64::structures::paging::{
        FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB,
        Translate,
    };

    struct Alloc(ArenaFrames);

    // SAFETY: every frame handed out is a fresh, unused frame of the arena (the allocator never
    // hands the same frame out twice while it is taken).
    unsafe impl FrameAllocator<Size4KiB> for Alloc {
        fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
            let pa = self.0.take_zeroed();
            Some(PhysFrame::containing_address(x86_64::PhysAddr::new(pa.as_u64())))
        }
    }

    /// The `x86_64` crate's `OffsetPageTable` over a root frame of the arena.
    pub struct X86 {
        table: OffsetPageTable<'static>,
        alloc: Alloc,
    }

    pub const FLAGS: PageTableFlags = PageTableFlags::PRESENT.union(PageTableFlags::WRITABLE);

    impl X86 {
        pub fn new(mem: &Arc<PhysMem>) -> Self {
            let mut frames = ArenaFrames { mem: mem.clone(), taken: Vec::new() };
            let root = frames.take_zeroed();
            let base = mem.host_ptr(PhysAddr::new(0), 0).unwrap().as_ptr() as u64;
            let root_ptr = mem.host_ptr(root, PAGE_SIZE).unwrap().as_ptr().cast::<PageTable>();
            // SAFETY: the root frame is a zeroed 4 KiB frame of the arena owned by this peer until
            // drop; all frames it reaches lie at base + pa in the same mapping, which outlives
            // the peer in every use here (the Arc is held by `frames`).
            let table = unsafe { OffsetPageTable::new(&mut *root_ptr, x86_64::VirtAddr::new(base)) };
            X86 { table, alloc: Alloc(frames) }
        }

        /// One `map_to` call per 4 KiB page, the only way this crate maps.
        pub fn map_pages(&mut self, va: u64, pages: &[PhysAddr]) {
            for (i, pa) in pages.iter().enumerate() {
                let page =
                    Page::<Size4KiB>::containing_address(x86_64::VirtAddr::new(va + i as u64 * PAGE_SIZE));
                let frame = PhysFrame::containing_address(x86_64::PhysAddr::new(pa.as_u64()));
                // SAFETY: the mapping is never activated on a CPU; it is data in the arena.
                unsafe { self.table.map_to(page, frame, FLAGS, &mut self.alloc).unwrap().ignore() };
            }
        }

        pub fn map_contiguous(&mut self, va: u64, pa: u64, pages: u64) {
            for i in 0..pages {
                let page = Page::<Size4KiB>::containing_address(x86_64::VirtAddr::new(va + i * PAGE_SIZE));
                let frame = PhysFrame::containing_address(x86_64::PhysAddr::new(pa + i * PAGE_SIZE));
                // SAFETY: as in `map_pages`.
                unsafe { self.table.map_to(page, frame, FLAGS, &mut self.alloc).unwrap().ignore() };
            }
        }

        pub fn unmap_pages(&mut self, va: u64, pages: u64) {
            for i in 0..pages {
                let page = Page::<Size4KiB>::containing_address(x86_64::VirtAddr::new(va + i * PAGE_SIZE));
                self.table.unmap(page).unwrap().1.ignore();
            }
        }

        #[inline]
        pub fn translate(&self, va: u64) -> Option<u64> {
            self.table.translate_addr(x86_64::VirtAddr::new(va)).map(|p| p.as_u64())
        }
    }
}

pub mod arm {
    use super::*;
    use aarch64_paging::descriptor::{PhysicalAddress, Stage2Attributes};
    use aarch64_paging::paging::{Constraints, MemoryRegion, PageTable, RootTable, Stage2, Translation};

    pub struct Arena(ArenaFrames);

    impl Translation<Stage2Attributes> for Arena {
        fn allocate_table(&mut self) -> (NonNull<PageTable<Stage2Attributes>>, PhysicalAddress) {
            let pa = self.0.take_zeroed();
            let ptr = self.0.mem.host_ptr(pa, PAGE_SIZE).unwrap().cast();
            (ptr, PhysicalAddress(pa.as_u64() as usize))
        }

        unsafe fn deallocate_table(&mut self, _table: NonNull<PageTable<Stage2Attributes>>) {
            // Frames go back to the arena when the peer is dropped.
        }

        fn physical_to_virtual(&self, pa: PhysicalAddress) -> NonNull<PageTable<Stage2Attributes>> {
            self.0.mem.host_ptr(PhysAddr::new(pa.0 as u64), PAGE_SIZE).unwrap().cast()
        }
    }

    /// aarch64-paging's stage-2 table (the SMMU's IOMMU format), 4 levels, rooted in the arena.
    pub struct Arm {
        pub table: RootTable<Stage2, Arena>,
    }

    pub fn flags() -> Stage2Attributes {
        Stage2Attributes::VALID
            | Stage2Attributes::MEMATTR_NORMAL_INNER_WB
            | Stage2Attributes::MEMATTR_NORMAL_OUTER_WB
            | Stage2Attributes::S2AP_ACCESS_RW
            | Stage2Attributes::SH_INNER
            | Stage2Attributes::ACCESS_FLAG
    }

    impl Arm {
        pub fn new(mem: &Arc<PhysMem>) -> Self {
            let arena = Arena(ArenaFrames { mem: mem.clone(), taken: Vec::new() });
            Arm { table: RootTable::new(arena, 0, Stage2) }
        }

        /// One `map_range` per page: the only way to map a scattered list.
        pub fn map_pages(&mut self, va: u64, pages: &[PhysAddr]) {
            for (i, pa) in pages.iter().enumerate() {
                let v = (va + i as u64 * PAGE_SIZE) as usize;
                let r = MemoryRegion::new(v, v + PAGE_SIZE as usize);
                self.table
                    .map_range(&r, PhysicalAddress(pa.as_u64() as usize), flags(), Constraints::empty())
                    .unwrap();
            }
        }

        /// One `map_range` over the whole range.
        pub fn map_range(&mut self, va: u64, pa: u64, len: u64, constraints: Constraints) {
            let r = MemoryRegion::new(va as usize, (va + len) as usize);
            self.table.map_range(&r, PhysicalAddress(pa as usize), flags(), constraints).unwrap();
        }
    }

    pub use aarch64_paging::paging::Constraints as ArmConstraints;
}
