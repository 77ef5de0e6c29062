// Batch page-table entry writes from compact runs, as a GPU's DMA engine does them (AMD SDMA:
// linear runs `value + i * step` generated on the engine, scattered runs copied from a staged
// array). One workgroup per run; a run stays inside one 4 KiB table page. Tables live in the
// imported arena: an arena address is found through the chunk map (`chunk_shift`).
#version 460
#extension GL_EXT_buffer_reference : require
#extension GL_EXT_shader_explicit_arithmetic_types_int64 : require

layout(local_size_x = 64) in;

struct Run {
    uint64_t dst;    // arena address of the first entry
    uint64_t value;  // first value (linear) or index into `staged` (copied)
    uint64_t step;   // linear step
    uint count;
    uint linear;
};

layout(buffer_reference, std430, buffer_reference_align = 8) readonly buffer Runs { Run r[]; };
layout(buffer_reference, std430, buffer_reference_align = 8) readonly buffer Words { uint64_t v[]; };
layout(buffer_reference, std430, buffer_reference_align = 8) writeonly buffer Entries { uint64_t e[]; };

layout(push_constant) uniform Params {
    uint64_t runs;
    uint64_t staged;
    uint64_t chunks;
    uint first;
    uint count;
    uint chunk_shift;
    uint pad;
} p;

void main() {
    uint k = p.first + gl_WorkGroupID.x;
    if (k >= p.count) {
        return;
    }
    Run r = Runs(p.runs).r[k];
    uint64_t mask = (uint64_t(1) << p.chunk_shift) - 1;
    uint64_t base = Words(p.chunks).v[uint(r.dst >> p.chunk_shift)] + (r.dst & mask);
    Entries t = Entries(base);
    for (uint i = gl_LocalInvocationID.x; i < r.count; i += 64) {
        t.e[i] = r.linear != 0 ? r.value + uint64_t(i) * r.step : Words(p.staged).v[uint(r.value) + i];
    }
}
