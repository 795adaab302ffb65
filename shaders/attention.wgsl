// attention: per-sequence softmax(Q·Kᵀ·scale)·V over a ragged batch, flash style.
//
// The host lists query blocks (sequence, first query) of up to BQ tokens that never cross a
// sequence boundary; a workgroup takes one block for one head (workgroup z), one query per
// invocation. Keys and values of the block's sequence stream through workgroup memory BK at a
// time; each invocation keeps its query, running max, running sum and output accumulator in
// registers and rescales once per tile (online softmax). No padding is computed: key tiles stop
// at the sequence's end, and a sliding window (|i - j| <= window/2) also narrows the key range
// to what the block's queries can see. HEAD_DIM and BK are constants the host prepends, with
// `rel_score`: zero for plain attention, DeBERTa's relative-position terms from attention_rel.wgsl
// for disentangled attention (the same loop serves both).

struct Params {
    hidden: u32,       // H
    n_blocks: u32,
    half_window: u32,  // window / 2, when has_window
    has_window: u32,
    scale: f32,
    rel_center: u32,   // disentangled: rel_index[i - j + rel_center] is the relative row
    rel_terms: u32,    // disentangled: 1 content-to-position, 2 position-to-content
    _pad0: u32,
}

@group(0) @binding(0) var<storage, read> qkv: array<T>;            // [T, 3H]: Q | K | V
@group(0) @binding(1) var<storage, read> blocks: array<vec2<u32>>; // [n_blocks]: (seq, q0)
@group(0) @binding(2) var<storage, read> cu_seqlens: array<u32>;   // [n_seqs + 1]
@group(0) @binding(3) var<storage, read_write> out: array<T>;      // [T, H]
@group(1) @binding(0) var<uniform> p: Params;

const BQ: u32 = 64u;
var<workgroup> k_tile: array<f32, BK * HEAD_DIM>;
var<workgroup> v_tile: array<f32, BK * HEAD_DIM>;

@compute @workgroup_size(64)
fn main(inv: Invocation) {
    let blk = group_index(inv);
    if blk >= p.n_blocks {
        return;
    }
    let head = inv.wg.z;
    let stride = 3u * p.hidden;
    let seq = blocks[blk].x;
    let q0 = blocks[blk].y;
    let s0 = cu_seqlens[seq];
    let s1 = cu_seqlens[seq + 1u];
    let qi = q0 + inv.li;
    let live = qi < s1;
    let q_last = min(q0 + BQ, s1) - 1u;

    var k_lo = s0;
    var k_hi = s1;
    if p.has_window != 0u {
        if q0 - s0 > p.half_window {
            k_lo = q0 - p.half_window;
        }
        k_hi = min(s1, q_last + p.half_window + 1u);
    }

    var q: array<f32, HEAD_DIM>;
    var acc: array<f32, HEAD_DIM>;
    if live {
        let qbase = qi * stride + head * HEAD_DIM;
        for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
            q[d] = f32(qkv[qbase + d]) * p.scale;
        }
    }
    var m = -3.0e38;
    var l = 0.0;
    var s: array<f32, BK>;

    for (var t0 = k_lo; t0 < k_hi; t0 = t0 + BK) {
        // Stage BK keys and values: BK·HEAD_DIM values each over BQ invocations.
        for (var e = inv.li; e < BK * HEAD_DIM; e = e + BQ) {
            let j = e / HEAD_DIM;
            let d = e % HEAD_DIM;
            let key = t0 + j;
            var kv = 0.0;
            var vv = 0.0;
            if key < k_hi {
                let kbase = key * stride + p.hidden + head * HEAD_DIM + d;
                kv = f32(qkv[kbase]);
                vv = f32(qkv[kbase + p.hidden]);
            }
            k_tile[e] = kv;
            v_tile[e] = vv;
        }
        workgroupBarrier();
        if live {
            var tile_max = -3.0e38;
            for (var j = 0u; j < BK; j = j + 1u) {
                let key = t0 + j;
                var visible = key < k_hi;
                if p.has_window != 0u {
                    let dist = select(key - qi, qi - key, qi > key);
                    visible = visible && dist <= p.half_window;
                }
                var score = -3.0e38;
                if visible {
                    score = 0.0;
                    for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
                        score = fma(q[d], k_tile[j * HEAD_DIM + d], score);
                    }
                    score = score + rel_score(&q, qi, key, j, head);
                    tile_max = max(tile_max, score);
                }
                s[j] = score;
            }
            if tile_max > -1.0e38 {
                let m_new = max(m, tile_max);
                let correction = exp(m - m_new);
                l = l * correction;
                for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
                    acc[d] = acc[d] * correction;
                }
                for (var j = 0u; j < BK; j = j + 1u) {
                    if s[j] > -1.0e38 {
                        let pj = exp(s[j] - m_new);
                        l = l + pj;
                        for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
                            acc[d] = fma(pj, v_tile[j * HEAD_DIM + d], acc[d]);
                        }
                    }
                }
                m = m_new;
            }
        }
        workgroupBarrier();
    }
    if live {
        let inv_l = 1.0 / l;
        let obase = qi * p.hidden + head * HEAD_DIM;
        for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
            out[obase + d] = T(acc[d] * inv_l);
        }
    }
}
