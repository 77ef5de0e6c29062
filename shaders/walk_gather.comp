// walk_gather: the GPU's two translations, then the bytes.
//
// One invocation per requested GPU VA page, 64 pages per workgroup: each invocation walks its
// page's entries and copies its 4096 bytes. (On a CPU implementation such as lavapipe, whose
// SIMD lanes are invocations, this makes every walk step one gather for 8 pages; measured there,
// a workgroup per page with 64 invocations sharing one walk ran 4.7x slower.)
//   1. the GPU page table (vmbind's GPU format, REFERENCES.md §7): four levels of 512 entries;
//      bit 0 valid, 5 read, 7-11 fragment (a TLB hint: each entry still holds its own address),
//      12-47 address, 51 PRT (sparse: reads zero), 54 huge leaf at levels 1 and 2;
//   2. the DMA address through the IOMMU's table (x86-64 / VT-d second stage): bit 0 read,
//      bit 1 write, bit 7 a 2 MiB / 1 GiB leaf at levels 1 and 2, address in bits 12-51; or,
//      for a device without IOMMU, its reach.
// Table entries and data live in the vmbind arena, imported as buffers: `chunks` holds the
// device address of each 2^chunk_shift-byte chunk of it. Every address is checked against the
// arena before it is read. A page that faults is written as zeros and recorded in `faults`:
// (GPU VA, code | permission bits << 8, DMA address, arena address), the CPU turns them into
// vmbind's fault records.
#version 460
#extension GL_EXT_buffer_reference : require
#extension GL_EXT_shader_explicit_arithmetic_types_int64 : require

layout(local_size_x = 64) in;

layout(buffer_reference, std430, buffer_reference_align = 8) readonly buffer Words { uint64_t w[]; };
layout(buffer_reference, std430, buffer_reference_align = 8) writeonly buffer OutWords { uint64_t w[]; };
// A 32-byte header (a u64vec4 array starts 32-byte aligned in std430), then the records.
layout(buffer_reference, std430, buffer_reference_align = 32) buffer Faults {
    uint count;
    uint pad0;
    uint64_t pad1;
    uint64_t pad2;
    uint64_t pad3;
    u64vec4 rec[];
};

layout(push_constant) uniform Params {
    uint64_t chunks;        // device address: u64 device address per arena chunk
    uint64_t requests;      // device address: u64 GPU VA per page
    uint64_t out_words;     // device address: 4096 bytes per request
    uint64_t faults;        // device address: the fault buffer
    uint64_t gpu_root;      // arena address of the GPU table's root
    uint64_t iommu_root;    // arena address of the IOMMU table's root (translated devices)
    uint64_t arena_size;    // bytes of arena
    uint64_t dma_start;     // translated: the aperture; direct: [0, dma_end) is the reach
    uint64_t dma_end;
    uint first;             // index of the first request of this dispatch
    uint count;             // requests in all
    uint chunk_shift;
    uint flags;             // bit 0: translated (walk the IOMMU table)
    uint max_faults;
} p;

const uint64_t GPU_VALID = 1ul;
const uint64_t GPU_READ = 1ul << 5;
const uint64_t GPU_PRT = 1ul << 51;
const uint64_t GPU_HUGE = 1ul << 54;
const uint64_t GPU_ADDR = ((1ul << 48) - 1ul) & ~0xffful;
const uint64_t X86_R = 1ul;
const uint64_t X86_W = 2ul;
const uint64_t X86_PS = 1ul << 7;
const uint64_t X86_ADDR = ((1ul << 52) - 1ul) & ~0xffful;

// Fault codes (vmbind::vk turns them into gpuvm::FaultStage values).
const uint OK = 0u;
const uint GPU_NOT_MAPPED = 1u;
const uint GPU_NOT_PERMITTED = 2u;
const uint DMA_NOT_MAPPED = 3u;
const uint DMA_NOT_PERMITTED = 4u;
const uint DMA_OUTSIDE_APERTURE = 5u;
const uint DMA_BUS_ERROR = 6u;
const uint SPARSE = 7u;

uint64_t dev_addr(uint64_t pa) {
    uint64_t base = Words(p.chunks).w[uint(pa >> p.chunk_shift)];
    return base + (pa & ((1ul << p.chunk_shift) - 1ul));
}

// An 8-byte table entry at arena address `pa` (inside the arena: checked by the caller).
uint64_t entry(uint64_t pa) {
    return Words(dev_addr(pa)).w[0];
}

void main() {
    uint page = p.first + gl_GlobalInvocationID.x;
    if (page >= p.count) {
        return;
    }
    uint64_t va = Words(p.requests).w[page];
    uint code = OK;
    uint64_t prot = 0ul;
    uint64_t dma = 0ul;

    // 1. The GPU table.
    uint64_t table = p.gpu_root;
    for (int level = 3; level >= 0; level--) {
        uint64_t at = table + (((va >> (12 + 9 * level)) & 511ul) << 3);
        if (at + 8ul > p.arena_size) {
            code = GPU_NOT_MAPPED;
            break;
        }
        uint64_t e = entry(at);
        if ((e & GPU_VALID) == 0ul) {
            code = (e & GPU_PRT) != 0ul ? SPARSE : GPU_NOT_MAPPED;
            break;
        }
        if (level == 0 || (level <= 2 && (e & GPU_HUGE) != 0ul)) {
            prot = e & 0x70ul;
            if ((e & GPU_READ) == 0ul) {
                code = GPU_NOT_PERMITTED;
            } else {
                uint64_t span = 1ul << (12 + 9 * level);
                dma = (e & GPU_ADDR) + (va & (span - 1ul) & ~0xffful);
            }
            break;
        }
        table = e & GPU_ADDR;
    }

    // 2. The DMA address, to an arena address.
    uint64_t pa = 0ul;
    if (code == OK) {
        if ((p.flags & 1u) != 0u) {
            if (dma < p.dma_start || dma + 4096ul > p.dma_end) {
                code = DMA_OUTSIDE_APERTURE;
            } else {
                table = p.iommu_root;
                for (int level = 3; level >= 0; level--) {
                    uint64_t at = table + (((dma >> (12 + 9 * level)) & 511ul) << 3);
                    if (at + 8ul > p.arena_size) {
                        code = DMA_NOT_MAPPED;
                        break;
                    }
                    uint64_t e = entry(at);
                    if ((e & (X86_R | X86_W)) == 0ul) {
                        code = DMA_NOT_MAPPED;
                        break;
                    }
                    if (level == 0 || (level <= 2 && (e & X86_PS) != 0ul)) {
                        prot = e & 3ul;
                        if ((e & X86_R) == 0ul) {
                            code = DMA_NOT_PERMITTED;
                        } else {
                            uint64_t span = 1ul << (12 + 9 * level);
                            pa = (e & X86_ADDR) + (dma & (span - 1ul) & ~0xffful);
                        }
                        break;
                    }
                    table = e & X86_ADDR;
                }
            }
        } else if (dma + 4096ul > p.dma_end) {
            code = DMA_OUTSIDE_APERTURE;
        } else {
            pa = dma;
        }
        if (code == OK && pa + 4096ul > p.arena_size) {
            code = DMA_BUS_ERROR;
        }
    }

    // 3. The bytes.
    OutWords dst = OutWords(p.out_words + uint64_t(page) * 4096ul);
    if (code == OK) {
        Words src = Words(dev_addr(pa));
        for (uint i = 0u; i < 512u; i++) {
            dst.w[i] = src.w[i];
        }
    } else {
        for (uint i = 0u; i < 512u; i++) {
            dst.w[i] = 0ul;
        }
        if (code != SPARSE) {
            Faults f = Faults(p.faults);
            uint slot = atomicAdd(f.count, 1u);
            if (slot < p.max_faults) {
                f.rec[slot] = u64vec4(va, uint64_t(code) | (prot << 8), dma, pa);
            }
        }
    }
}
