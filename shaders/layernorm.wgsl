// LayerNorm with a fused residual, one workgroup per row, the row kept in registers:
//   mode 0 (post-norm, BERT):  x = LayerNorm(x + r)            (in place)
//   mode 1 (pre-norm step):    x = x + r; out = LayerNorm(x)
//   mode 2 (plain):            out = LayerNorm(x)
// Mean and variance in two passes over the registers, as the CPU reference computes them.

struct Params {
    rows: u32,
    cols: u32,
    mode: u32,
    has_bias: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> x: array<T>;   // [rows, cols]
@group(0) @binding(1) var<storage, read> r: array<T>;         // [rows, cols] (modes 0, 1)
@group(0) @binding(2) var<storage, read> gamma: array<T>;     // [cols]
@group(0) @binding(3) var<storage, read> beta: array<T>;      // [cols]
@group(0) @binding(4) var<storage, read_write> out: array<T>; // [rows, cols] (modes 1, 2)
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(inv: Invocation) {
    let row = group_index(inv);
    if row >= p.rows {
        return;
    }
    let h = p.cols;
    let base = row * h;
    var vals: array<f32, ROW_SLOTS>;
    var sum = 0.0;
    for (var s = 0u; s < ROW_SLOTS; s = s + 1u) {
        let c = inv.li + s * ROW_THREADS;
        if c < h {
            var v = f32(x[base + c]);
            if p.mode != 2u {
                v = v + f32(r[base + c]);
            }
            if p.mode == 1u {
                x[base + c] = T(v);
            }
            vals[s] = v;
            sum = sum + v;
        }
    }
    let stats = row_stats(&vals, sum, h, p.eps, inv.li);
    let mean = stats.x;
    let inv_std = stats.y;
    for (var s = 0u; s < ROW_SLOTS; s = s + 1u) {
        let c = inv.li + s * ROW_THREADS;
        if c < h {
            var v = (vals[s] - mean) * inv_std * f32(gamma[c]);
            if p.has_bias != 0u {
                v = v + f32(beta[c]);
            }
            if p.mode == 0u {
                x[base + c] = T(v);
            } else {
                out[base + c] = T(v);
            }
        }
    }
}
