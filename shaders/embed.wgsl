// embed: out[t] = LayerNorm(word[id_t] + position[pos_t] + token_type[0]), one workgroup per
// token. The gathered row stays in registers (ROW_SLOTS per invocation) between the mean, the
// variance (two-pass, as the CPU reference) and the normalised write.

struct Params {
    rows: u32,
    cols: u32,
    has_position: u32,
    has_token_type: u32,
    has_bias: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<storage, read> ids: array<u32>;        // [T]
@group(0) @binding(1) var<storage, read> positions: array<u32>;  // [T]
@group(0) @binding(2) var<storage, read> word: array<T>;         // [vocab, H]
@group(0) @binding(3) var<storage, read> position: array<T>;     // [max_positions, H]
@group(0) @binding(4) var<storage, read> token_type: array<T>;   // [H]
@group(0) @binding(5) var<storage, read> gamma: array<T>;        // [H]
@group(0) @binding(6) var<storage, read> beta: array<T>;         // [H]
@group(0) @binding(7) var<storage, read_write> out: array<T>;    // [T, H]
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(inv: Invocation) {
    let row = group_index(inv);
    if row >= p.rows {
        return;
    }
    let h = p.cols;
    let id = ids[row];
    let pos = positions[row];
    var vals: array<f32, ROW_SLOTS>;
    var sum = 0.0;
    for (var s = 0u; s < ROW_SLOTS; s = s + 1u) {
        let c = inv.li + s * ROW_THREADS;
        if c < h {
            var v = f32(word[id * h + c]);
            if p.has_position != 0u {
                v = v + f32(position[pos * h + c]);
            }
            if p.has_token_type != 0u {
                v = v + f32(token_type[c]);
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
            out[row * h + c] = T(v);
        }
    }
}
