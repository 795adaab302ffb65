// pool: one vector per sequence of a ragged batch: the first token (mode 0, CLS, [T, H] ->
// [n_seqs, H]), the mean over the sequence's tokens (mode 1, [n_seqs, H]) or both side by side
// (mode 2, [n_seqs, 2H] = [CLS | mean]); one invocation per output value (neighbouring
// invocations read neighbouring columns).

struct Params {
    n_seqs: u32,
    cols: u32,
    mode: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<storage, read> x: array<T>;            // [T, H]
@group(0) @binding(1) var<storage, read> cu_seqlens: array<u32>; // [n_seqs + 1]
@group(0) @binding(2) var<storage, read_write> out: array<T>;    // [n_seqs, H or 2H]
@group(1) @binding(0) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(inv: Invocation) {
    let e = element_index(inv);
    let out_cols = select(p.cols, 2u * p.cols, p.mode == 2u);
    if e >= p.n_seqs * out_cols {
        return;
    }
    let s = e / out_cols;
    var c = e % out_cols;
    let start = cu_seqlens[s];
    let end = cu_seqlens[s + 1u];
    // Mode 2's first half is CLS, its second half the mean.
    let mean = p.mode == 1u || (p.mode == 2u && c >= p.cols);
    if p.mode == 2u && c >= p.cols {
        c = c - p.cols;
    }
    if !mean {
        out[e] = x[start * p.cols + c];
        return;
    }
    var sum = 0.0;
    for (var t = start; t < end; t = t + 1u) {
        sum = sum + f32(x[t * p.cols + c]);
    }
    out[e] = T(sum / f32(max(end - start, 1u)));
}
