// Copies `count` 32-bit words from device address `src` to `dst`: how vmbind reads a sparse
// mirror (or any buffer with a device address) from a shader, as a GPU kernel would.
#version 460
#extension GL_EXT_buffer_reference : require
#extension GL_EXT_shader_explicit_arithmetic_types_int64 : require

layout(local_size_x = 64) in;

layout(buffer_reference, std430, buffer_reference_align = 4) readonly buffer Src { uint w[]; };
layout(buffer_reference, std430, buffer_reference_align = 4) writeonly buffer Dst { uint w[]; };

layout(push_constant) uniform Params {
    uint64_t src;
    uint64_t dst;
    uint count;
    uint pad;
} p;

void main() {
    uint i = gl_GlobalInvocationID.x;
    if (i < p.count) {
        Dst(p.dst).w[i] = Src(p.src).w[i];
    }
}
