// One vector per sequence of a ragged batch, [T, H] -> [n_seqs, H]: the first token (mode 0,
// CLS) or the mean over the sequence (mode 1). One block per sequence; threads stride over
// columns, so neighbouring threads read neighbouring values.

extern "C" __global__ void pool(const T* x, const u32* cu_seqlens, T* out, int n_seqs, int h,
                                int mode) {
    const int s = blockIdx.x;
    if (s >= n_seqs) return;
    const u32 start = cu_seqlens[s], end = cu_seqlens[s + 1];
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        if (mode == 0) {
            st(out, (size_t)s * h + c, ld(x, (size_t)start * h + c));
        } else {
            float sum = 0.0f;
            for (u32 t = start; t < end; ++t) sum += ld(x, (size_t)t * h + c);
            st(out, (size_t)s * h + c, sum / (float)max(end - start, 1u));
        }
    }
}
