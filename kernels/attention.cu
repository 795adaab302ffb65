// Varlen attention over a ragged batch, flash style: softmax(Q·Kᵀ·scale)·V per sequence and
// head, without padding and without materialising the score matrix.
//
// The host lists query blocks (sequence, first query) of up to BQ tokens that never cross a
// sequence boundary; a CUDA block takes one query block for one head (blockIdx.y), one query per
// thread. Keys and values of the sequence stream through shared memory BK at a time (f32, loaded
// cooperatively and coalesced along the head dimension); each thread keeps its query, running
// max, running sum and output accumulator in registers (the query in shared memory past D = 96)
// and folds in one key at a time (online softmax). A sliding window (|i - j| <= window/2) narrows the key range to what the block's
// queries can see, so local layers cost O(window) per token. Specialised per head size D.
//
// `attention_rel_d{D}` is DeBERTa's disentangled attention over the same loop: each score also
// gets `q_i·pos_key[r]` (content-to-position) and `k_j·pos_query[r]` (position-to-content),
// `r = rel_index[i - j + rel_center]` (the host's table of relative rows per distance, so no
// logarithm is taken here and every bucket is the CPU's). The tables are `[2·span, H]`, shared by
// the heads; each term costs D more FMAs per score, read from global memory (the few rows a block
// needs stay in cache). The tensor-core kernel has no such variant: DeBERTa runs this one.

#define BQ 64

// DeBERTa's relative terms: the tables, the index per distance and which terms are on.
struct RelTerms {
    const T* pos_key;    // [2·span, H] (content-to-position), read when terms & 1
    const T* pos_query;  // [2·span, H] (position-to-content), read when terms & 2
    const u32* index;    // [2·center + 1]: the table row of distance i - j at i - j + center
    u32 center;
    int terms;
};

// The largest head size whose query the relative kernel keeps in registers (past it, shared
// memory: the relative terms need registers of their own).
#define REL_Q_IN_REGISTERS 64

// v · table[base .. base + D] in f32. Fully unrolled while the query may be a register array
// (a loop index into it would move it to local memory); partly past that, to bound registers.
template <int D>
__device__ __forceinline__ float rel_dot(const float* v, const T* table, size_t base) {
    float s = 0.0f;
    if constexpr (D <= REL_Q_IN_REGISTERS) {
        #pragma unroll
        for (int d = 0; d < D; ++d) s = fmaf(v[d], ld(table, base + d), s);
    } else {
        #pragma unroll 8
        for (int d = 0; d < D; ++d) s = fmaf(v[d], ld(table, base + d), s);
    }
    return s;
}

// The relative terms of query row `qi` (its pre-scaled query `q`) and key row `key` (its key `k`
// in shared memory), for head `head`.
template <int D>
__device__ __forceinline__ float rel_score(const RelTerms& rel, const float* q, const float* k,
                                           u32 qi, u32 key, int head, int hidden, float scale) {
    const size_t base = (size_t)rel.index[qi + rel.center - key] * hidden + head * D;
    float s = 0.0f;
    if (rel.terms & 1) s = rel_dot<D>(q, rel.pos_key, base);
    if (rel.terms & 2) s = fmaf(rel_dot<D>(k, rel.pos_query, base), scale, s);
    return s;
}

template <int D, bool REL>
__device__ __forceinline__ void attention_impl(const T* qkv, const uint2* blocks,
                                               const u32* cu_seqlens, T* out, int hidden,
                                               int n_blocks, int half_window, float scale,
                                               const RelTerms& rel) {
    constexpr int BK = (1920 / D) < 64 ? (1920 / D) : 64;  // K + V tiles within 15 KiB
    // Up to D = 96 a thread keeps its query and its output accumulator in registers; beyond,
    // both would not fit the 255 registers a thread has, so the query moves to shared memory
    // (rows padded by one float: no bank conflicts when each thread reads its own row). The
    // relative terms need registers of their own: there the query moves past D = 64 (ptxas
    // reported spills at D = 80 and 96 otherwise).
    constexpr bool Q_SHARED = D > (REL ? REL_Q_IN_REGISTERS : 96);
    constexpr int QS = Q_SHARED ? BQ * (D + 1) : 1;
    __shared__ float k_tile[BK * D];
    __shared__ float v_tile[BK * D];
    __shared__ float q_shared[QS];
    const int blk = blockIdx.x;
    if (blk >= n_blocks) return;
    const int head = blockIdx.y;
    const size_t stride = 3 * (size_t)hidden;
    const u32 seq = blocks[blk].x, q0 = blocks[blk].y;
    const u32 s0 = cu_seqlens[seq], s1 = cu_seqlens[seq + 1];
    const u32 qi = q0 + threadIdx.x;
    const bool live = qi < s1;
    const u32 q_last = min(q0 + BQ, s1) - 1;
    u32 k_lo = s0, k_hi = s1;
    if (half_window >= 0) {
        if (q0 - s0 > (u32)half_window) k_lo = q0 - half_window;
        k_hi = min(s1, q_last + half_window + 1);
    }

    float q_reg[Q_SHARED ? 1 : D], acc[D];
    float* q_row = Q_SHARED ? q_shared + threadIdx.x * (D + 1) : q_reg;
    #pragma unroll
    for (int d = 0; d < D; ++d) {
        q_row[d] = live ? ld(qkv, qi * stride + head * D + d) * scale : 0.0f;
        acc[d] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;

    for (u32 t0 = k_lo; t0 < k_hi; t0 += BK) {
        for (int e = threadIdx.x; e < BK * D; e += BQ) {
            const u32 key = t0 + e / D;
            const int d = e % D;
            float kv = 0.0f, vv = 0.0f;
            if (key < k_hi) {
                const size_t base = key * stride + hidden + head * D + d;
                kv = ld(qkv, base);
                vv = ld(qkv, base + hidden);
            }
            k_tile[e] = kv;
            v_tile[e] = vv;
        }
        __syncthreads();
        if (live) {
            // Online softmax one key at a time: the accumulator is rescaled only when a key
            // raises the running maximum, and no score array is kept (it would live in local
            // memory, indexed by a loop variable).
            const int keys = min((u32)BK, k_hi - t0);
            for (int j = 0; j < keys; ++j) {
                const u32 key = t0 + j;
                if (half_window >= 0) {
                    const u32 dist = qi > key ? qi - key : key - qi;
                    if (dist > (u32)half_window) continue;
                }
                float score = 0.0f;
                #pragma unroll
                for (int d = 0; d < D; ++d) score = fmaf(q_row[d], k_tile[j * D + d], score);
                if constexpr (REL) {
                    score += rel_score<D>(rel, q_row, k_tile + j * D, qi, key, head, hidden, scale);
                }
                if (score > m) {
                    const float correction = __expf(m - score);
                    l *= correction;
                    #pragma unroll
                    for (int d = 0; d < D; ++d) acc[d] *= correction;
                    m = score;
                }
                const float p = __expf(score - m);
                l += p;
                #pragma unroll
                for (int d = 0; d < D; ++d) acc[d] = fmaf(p, v_tile[j * D + d], acc[d]);
            }
        }
        __syncthreads();
    }
    if (live) {
        const float inv = 1.0f / l;
        #pragma unroll
        for (int d = 0; d < D; ++d) st(out, qi * (size_t)hidden + head * D + d, acc[d] * inv);
    }
}

// One entry point per supported head size; half_window < 0 means global attention.
#define ATTENTION_FOR(D)                                                                        \
    extern "C" __global__ void __launch_bounds__(BQ) attention_d##D(                             \
        const T* qkv, const uint2* blocks, const u32* cu_seqlens, T* out, int hidden,            \
        int n_blocks, int half_window, float scale) {                                            \
        attention_impl<D, false>(qkv, blocks, cu_seqlens, out, hidden, n_blocks, half_window,    \
                                 scale, RelTerms{});                                             \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(BQ) attention_rel_d##D(                         \
        const T* qkv, const uint2* blocks, const u32* cu_seqlens, T* out, int hidden,            \
        int n_blocks, float scale, const T* pos_key, const T* pos_query, const u32* rel_index,   \
        int rel_center, int rel_terms) {                                                         \
        attention_impl<D, true>(qkv, blocks, cu_seqlens, out, hidden, n_blocks, -1, scale,       \
                                RelTerms{pos_key, pos_query, rel_index, (u32)rel_center,         \
                                         rel_terms});                                            \
    }
ATTENTION_FOR(8)
ATTENTION_FOR(16)
ATTENTION_FOR(32)
ATTENTION_FOR(64)
ATTENTION_FOR(80)
ATTENTION_FOR(96)
ATTENTION_FOR(128)
