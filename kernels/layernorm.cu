// LayerNorm kernels, the row held in registers: mean and variance in two passes over the
// registers (as the CPU reference).
//
//   embed_layernorm:  out[t] = LN(word[id_t] + position[pos_t] + token_type[0])
//   layernorm:        mode 0: x = LN(x + r) in place (post-norm, BERT)
//                     mode 1: x = x + r; out = LN(x)  (pre-norm step, ModernBERT)
//                     mode 2: out = LN(x)
//
// Two shapes of each. The `_warp` kernels take rows of up to 1,024 values that split into
// 16-byte vectors (the hidden sizes of BERT-base/large, MiniLM, ModernBERT): one warp per row,
// 8 rows per block, each lane holding its vectors of the row, sums by shuffles only (no block
// barrier), 16-byte loads and stores. The others take any row of up to 4,096 values: one block of
// 256 threads per row, 16 values per thread, sums by shuffles and then across warps.

__device__ __forceinline__ void normalise_row(float (&vals)[ROW_SLOTS], int h, float eps,
                                              const T* gamma, const T* beta, T* dst) {
    __shared__ float scratch[32];
    float sum = 0.0f;
    for (int s = 0; s < ROW_SLOTS; ++s) {
        int c = threadIdx.x + s * ROW_THREADS;
        if (c < h) sum += vals[s];
    }
    const float mean = block_sum(sum, scratch) / h;
    float sq = 0.0f;
    for (int s = 0; s < ROW_SLOTS; ++s) {
        int c = threadIdx.x + s * ROW_THREADS;
        if (c < h) { float d = vals[s] - mean; sq += d * d; }
    }
    const float inv = rsqrtf(block_sum(sq, scratch) / h + eps);
    for (int s = 0; s < ROW_SLOTS; ++s) {
        int c = threadIdx.x + s * ROW_THREADS;
        if (c < h) {
            float v = (vals[s] - mean) * inv * ld(gamma, c);
            if (beta) v += ld(beta, c);
            st(dst, c, v);
        }
    }
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS)
embed_layernorm(const u32* ids, const u32* positions, const T* word, const T* position,
                const T* token_type, const T* gamma, const T* beta, T* out, int rows, int h,
                float eps) {
    const int row = blockIdx.x;
    if (row >= rows) return;
    const size_t id = ids[row], pos = positions[row];
    float vals[ROW_SLOTS];
    for (int s = 0; s < ROW_SLOTS; ++s) {
        int c = threadIdx.x + s * ROW_THREADS;
        if (c < h) {
            float v = ld(word, id * h + c);
            if (position) v += ld(position, pos * h + c);
            if (token_type) v += ld(token_type, c);
            vals[s] = v;
        }
    }
    normalise_row(vals, h, eps, gamma, beta, out + (size_t)row * h);
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS)
layernorm(T* x, const T* r, const T* gamma, const T* beta, T* out, int rows, int h, float eps,
          int mode) {
    const int row = blockIdx.x;
    if (row >= rows) return;
    T* xr = x + (size_t)row * h;
    float vals[ROW_SLOTS];
    for (int s = 0; s < ROW_SLOTS; ++s) {
        int c = threadIdx.x + s * ROW_THREADS;
        if (c < h) {
            float v = ld(xr, c);
            if (mode != 2) v += ld(r, (size_t)row * h + c);
            if (mode == 1) st(xr, c, v);
            vals[s] = v;
        }
    }
    normalise_row(vals, h, eps, gamma, beta, mode == 0 ? xr : out + (size_t)row * h);
}

// ---- one warp per row

#define WARP_ROWS (ROW_THREADS / 32)        // rows per block
#define WARP_CHUNKS (1024 / (32 * VEC))     // most 16-byte vectors per lane

// LayerNorm of the row whose vectors this lane holds (vector q = lane + 32·s in vals[s]).
__device__ __forceinline__ void normalise_row_warp(float (&vals)[WARP_CHUNKS][VEC], int h,
                                                   float eps, const T* gamma, const T* beta,
                                                   T* dst) {
    const int lane = threadIdx.x & 31, chunks = h / VEC;
    float sum = 0.0f;
    #pragma unroll
    for (int s = 0; s < WARP_CHUNKS; ++s)
        if (lane + 32 * s < chunks)
            #pragma unroll
            for (int i = 0; i < VEC; ++i) sum += vals[s][i];
    const float mean = warp_sum(sum) / h;
    float sq = 0.0f;
    #pragma unroll
    for (int s = 0; s < WARP_CHUNKS; ++s)
        if (lane + 32 * s < chunks)
            #pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float d = vals[s][i] - mean;
                sq += d * d;
            }
    const float inv = rsqrtf(warp_sum(sq) / h + eps);
    #pragma unroll
    for (int s = 0; s < WARP_CHUNKS; ++s) {
        const int q = lane + 32 * s;
        if (q >= chunks) continue;
        const vec16 g = reinterpret_cast<const vec16*>(gamma)[q];
        vec16 b, o;
        if (beta) b = reinterpret_cast<const vec16*>(beta)[q];
        #pragma unroll
        for (int i = 0; i < VEC; ++i) {
            float v = (vals[s][i] - mean) * inv * ld(g.v, i);
            if (beta) v += ld(b.v, i);
            st(o.v, i, v);
        }
        reinterpret_cast<vec16*>(dst)[q] = o;
    }
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS)
embed_layernorm_warp(const u32* ids, const u32* positions, const T* word, const T* position,
                     const T* token_type, const T* gamma, const T* beta, T* out, int rows, int h,
                     float eps) {
    const int row = blockIdx.x * WARP_ROWS + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps: no barrier follows
    const int lane = threadIdx.x & 31, chunks = h / VEC;
    const size_t id = ids[row], pos = positions[row];
    float vals[WARP_CHUNKS][VEC];
    #pragma unroll
    for (int s = 0; s < WARP_CHUNKS; ++s) {
        const int q = lane + 32 * s;
        if (q >= chunks) continue;
        const vec16 w = reinterpret_cast<const vec16*>(word + id * h)[q];
        vec16 p, t;
        if (position) p = reinterpret_cast<const vec16*>(position + pos * h)[q];
        if (token_type) t = reinterpret_cast<const vec16*>(token_type)[q];
        #pragma unroll
        for (int i = 0; i < VEC; ++i) {
            float v = ld(w.v, i);
            if (position) v += ld(p.v, i);
            if (token_type) v += ld(t.v, i);
            vals[s][i] = v;
        }
    }
    normalise_row_warp(vals, h, eps, gamma, beta, out + (size_t)row * h);
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS)
layernorm_warp(T* x, const T* r, const T* gamma, const T* beta, T* out, int rows, int h,
               float eps, int mode) {
    const int row = blockIdx.x * WARP_ROWS + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps: no barrier follows
    const int lane = threadIdx.x & 31, chunks = h / VEC;
    T* xr = x + (size_t)row * h;
    float vals[WARP_CHUNKS][VEC];
    #pragma unroll
    for (int s = 0; s < WARP_CHUNKS; ++s) {
        const int q = lane + 32 * s;
        if (q >= chunks) continue;
        vec16 a = reinterpret_cast<const vec16*>(xr)[q];
        vec16 d;
        if (mode != 2) d = reinterpret_cast<const vec16*>(r + (size_t)row * h)[q];
        #pragma unroll
        for (int i = 0; i < VEC; ++i) {
            float v = ld(a.v, i);
            if (mode != 2) v += ld(d.v, i);
            if (mode == 1) st(a.v, i, v);
            vals[s][i] = v;
        }
        if (mode == 1) reinterpret_cast<vec16*>(xr)[q] = a;
    }
    // Mode 0 writes the row in place: each lane rewrites only the vectors it read.
    normalise_row_warp(vals, h, eps, gamma, beta, mode == 0 ? xr : out + (size_t)row * h);
}
