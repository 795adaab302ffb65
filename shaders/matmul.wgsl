// linear: out[M, N] = act(x[M, K] · w[N, K]ᵀ + b[N]), the GEMM behind every projection.
//
// The trick: a 16×16 workgroup computes a 64×64 output tile and each invocation a 4×4 block
// held in registers. Per K-step of 16 the workgroup stages a 64×16 slab of x and of w in
// workgroup memory as f32 vec4s (whatever the storage type), so each loaded value feeds 64
// multiply-adds and the inner loop is 8 vec4 loads for 16 vec4 FMAs. Loads outside the matrix
// read as zero, so M, N and K need not be multiples of the tile. Bias and activation run in the
// epilogue on the accumulators: one pass over the output.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    act: u32,
    has_bias: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> x: array<T>;       // [M, K]
@group(0) @binding(1) var<storage, read> w: array<T>;       // [N, K]
@group(0) @binding(2) var<storage, read> bias: array<T>;    // [N] (or a placeholder)
@group(0) @binding(3) var<storage, read_write> out: array<T>; // [M, N]
@group(1) @binding(0) var<uniform> p: Params;

const TILE: u32 = 64u;
const TK: u32 = 16u;
// xs[kk * 16 + r / 4][r % 4] = x[row0 + r, k0 + kk]; ws likewise for w's rows (out columns).
var<workgroup> xs: array<vec4<f32>, 256>;
var<workgroup> ws: array<vec4<f32>, 256>;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wg.y * TILE;
    let col0 = wg.x * TILE;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < p.k; k0 = k0 + TK) {
        // 1,024 values of each slab, 4 per invocation; neighbours read neighbouring k.
        for (var i = 0u; i < 4u; i = i + 1u) {
            let e = li + i * 256u;
            let r = e / TK;
            let kk = e % TK;
            let gk = k0 + kk;
            var xv = 0.0;
            if row0 + r < p.m && gk < p.k {
                xv = f32(x[(row0 + r) * p.k + gk]);
            }
            xs[kk * 16u + r / 4u][r % 4u] = xv;
            var wv = 0.0;
            if col0 + r < p.n && gk < p.k {
                wv = f32(w[(col0 + r) * p.k + gk]);
            }
            ws[kk * 16u + r / 4u][r % 4u] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk = kk + 1u) {
            let a = xs[kk * 16u + lid.y];
            let b = ws[kk * 16u + lid.x];
            acc[0] = fma(vec4<f32>(a.x), b, acc[0]);
            acc[1] = fma(vec4<f32>(a.y), b, acc[1]);
            acc[2] = fma(vec4<f32>(a.z), b, acc[2]);
            acc[3] = fma(vec4<f32>(a.w), b, acc[3]);
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i = i + 1u) {
        let r = row0 + lid.y * 4u + i;
        if r >= p.m {
            break;
        }
        for (var j = 0u; j < 4u; j = j + 1u) {
            let c = col0 + lid.x * 4u + j;
            if c < p.n {
                var v = acc[i][j];
                if p.has_bias != 0u {
                    v = v + f32(bias[c]);
                }
                out[r * p.n + c] = T(activate(v, p.act));
            }
        }
    }
}
