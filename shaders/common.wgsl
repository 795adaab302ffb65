// Shared by every op shader: mira prepends, in this order, a type header (`alias T = f32;`, or
// `enable f16; alias T = f16;` where the adapter has SHADER_F16), this file, then the op's file.
// Storage is `T`; all arithmetic is f32.

// The builtins every op's entry point takes but matmul's (`fn main(inv: Invocation)`).
struct Invocation {
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
}

// Workgroups are laid out on a 2-D grid when one dimension would pass the 65,535 limit:
// the linear index of this invocation's workgroup.
fn group_index(inv: Invocation) -> u32 {
    return inv.wg.x + inv.wg.y * inv.nwg.x;
}

// For ops with one output value per invocation and 256 invocations per workgroup: the value's
// linear index.
fn element_index(inv: Invocation) -> u32 {
    return group_index(inv) * 256u + inv.li;
}

// erf as a rational approximation on [-4, 4] (Eigen's generic_fast_erf_float, as the CPU
// backend uses), so exact GELU stays exact to f32 rounding.
fn erf_approx(x_in: f32) -> f32 {
    let x = clamp(x_in, -4.0, 4.0);
    let x2 = x * x;
    var p = -2.7261423e-10;
    p = p * x2 + 2.7706814e-8;
    p = p * x2 + -2.1010241e-6;
    p = p * x2 + -5.6925064e-5;
    p = p * x2 + -7.3499063e-4;
    p = p * x2 + -2.9546e-3;
    p = p * x2 + -1.6096033e-2;
    var q = -1.4566072e-5;
    q = q * x2 + -2.1337406e-4;
    q = q * x2 + -1.682827e-3;
    q = q * x2 + -7.3733292e-3;
    q = q * x2 + -1.426474e-2;
    return x * p / q;
}

// tanh through exp, clamped: some drivers' tanh returns NaN for large |x|.
fn tanh_safe(x: f32) -> f32 {
    let y = clamp(x, -15.0, 15.0);
    return 1.0 - 2.0 / (exp(2.0 * y) + 1.0);
}

// Activation codes, as the host sends them: 0 none, 1 gelu (erf), 2 gelu (tanh), 3 relu,
// 4 silu, 5 tanh.
fn activate(x: f32, kind: u32) -> f32 {
    switch kind {
        case 1u: { return 0.5 * x * (1.0 + erf_approx(x * 0.70710678)); }
        case 2u: { return 0.5 * x * (1.0 + tanh_safe(0.7978846 * (x + 0.044715 * x * x * x))); }
        case 3u: { return max(x, 0.0); }
        case 4u: { return x / (1.0 + exp(-x)); }
        case 5u: { return tanh_safe(x); }
        default: { return x; }
    }
}

// Row reductions over a 256-invocation workgroup (LayerNorm, embedding).
const ROW_THREADS: u32 = 256u;
// A row is held in registers, ROW_SLOTS values per invocation: rows up to 4,096 columns.
const ROW_SLOTS: u32 = 16u;
var<workgroup> row_partial: array<f32, ROW_THREADS>;

// Sum of `v` over the workgroup; call from workgroup-uniform control flow.
fn workgroup_sum(v: f32, li: u32) -> f32 {
    row_partial[li] = v;
    workgroupBarrier();
    for (var s = ROW_THREADS / 2u; s > 0u; s = s >> 1u) {
        if li < s {
            row_partial[li] = row_partial[li] + row_partial[li + s];
        }
        workgroupBarrier();
    }
    let total = row_partial[0];
    workgroupBarrier();
    return total;
}

// Mean and 1/sqrt(variance + eps) of a row held in registers (`vals[s]` is column
// li + s·ROW_THREADS, for columns below h; `sum` is this invocation's sum of them): two passes,
// as the CPU reference computes them. Call from workgroup-uniform control flow.
fn row_stats(
    vals: ptr<function, array<f32, ROW_SLOTS>>,
    sum: f32,
    h: u32,
    eps: f32,
    li: u32,
) -> vec2<f32> {
    let mean = workgroup_sum(sum, li) / f32(h);
    var sq = 0.0;
    for (var s = 0u; s < ROW_SLOTS; s = s + 1u) {
        if li + s * ROW_THREADS < h {
            let d = (*vals)[s] - mean;
            sq = sq + d * d;
        }
    }
    return vec2<f32>(mean, inverseSqrt(workgroup_sum(sq, li) / f32(h) + eps));
}
