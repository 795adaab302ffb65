// attention_rel: DeBERTa's disentangled attention terms for attention.wgsl's loop. Query `qi` and
// key `key` (rows of the batch) add `q·pos_key[r]` (content-to-position) and `k·pos_query[r]`
// (position-to-content), `r = rel_index[qi - key + rel_center]`: the host's table of
// `relative_index` per distance, so no logarithm is taken here and every bucket is the CPU's.
// The query arrives pre-scaled; the key-side term is scaled here. Both tables are `[2·span, H]`,
// shared by the heads (columns `head·HEAD_DIM..`). Each term costs HEAD_DIM more FMAs per score,
// read from the tables in global memory (cached: the rows a block needs are few and shared).

@group(0) @binding(4) var<storage, read> pos_key: array<T>;    // [2·span, H]
@group(0) @binding(5) var<storage, read> pos_query: array<T>;  // [2·span, H]
@group(0) @binding(6) var<storage, read> rel_index: array<u32>; // [2·rel_center + 1]

fn rel_score(q: ptr<function, array<f32, HEAD_DIM>>, qi: u32, key: u32, j: u32, head: u32) -> f32 {
    let base = rel_index[qi + p.rel_center - key] * p.hidden + head * HEAD_DIM;
    var s = 0.0;
    if (p.rel_terms & 1u) != 0u {
        for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
            s = fma((*q)[d], f32(pos_key[base + d]), s);
        }
    }
    if (p.rel_terms & 2u) != 0u {
        var t = 0.0;
        for (var d = 0u; d < HEAD_DIM; d = d + 1u) {
            t = fma(k_tile[j * HEAD_DIM + d], f32(pos_query[base + d]), t);
        }
        s = fma(t, p.scale, s);
    }
    return s;
}
