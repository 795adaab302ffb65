// rope: rotary position embedding on the Q and K blocks of qkv ([T, 3H]), in place. One
// invocation per rotated pair (x_i, x_{i+d/2}) of one head of Q or K. cos/sin come from a table
// the host computes once per (theta, head size) exactly as the CPU reference does, so large
// positions do not depend on the GPU's sin/cos accuracy.

struct Params {
    rows: u32,
    hidden: u32,
    half_dim: u32,  // head size / 2
    _pad0: u32,
}

@group(0) @binding(0) var<storage, read_write> qkv: array<T>;     // [T, 3H]
@group(0) @binding(1) var<storage, read> positions: array<u32>;   // [T]
@group(0) @binding(2) var<storage, read> table: array<vec2<f32>>; // [max_pos, d/2]: (cos, sin)
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(inv: Invocation) {
    // Per token: Q and K, H/2 pairs each (heads × d/2).
    let pairs = p.hidden;  // 2 blocks × H/2 pairs
    let e = element_index(inv);
    if e >= p.rows * pairs {
        return;
    }
    let t = e / pairs;
    let r = e % pairs;
    let block = r / (p.hidden / 2u);      // 0: Q, 1: K
    let within = r % (p.hidden / 2u);
    let head = within / p.half_dim;
    let i = within % p.half_dim;
    let base = t * 3u * p.hidden + block * p.hidden + head * 2u * p.half_dim + i;
    let cs = table[positions[t] * p.half_dim + i];
    let a = f32(qkv[base]);
    let b = f32(qkv[base + p.half_dim]);
    qkv[base] = T(a * cs.x - b * cs.y);
    qkv[base + p.half_dim] = T(b * cs.x + a * cs.y);
}
