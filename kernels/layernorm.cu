// LayerNorm kernels, one block of 256 threads per row, the row held in registers (16 values per
// thread: rows up to 4,096): mean and variance in two passes over the registers (as the CPU
// reference), sums by warp shuffles.
//
//   embed_layernorm:  out[t] = LN(word[id_t] + position[pos_t] + token_type[0])
//   layernorm:        mode 0: x = LN(x + r) in place (post-norm, BERT)
//                     mode 1: x = x + r; out = LN(x)  (pre-norm step, ModernBERT)
//                     mode 2: out = LN(x)

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
