// One vector per sequence of a ragged batch: the first token (mode 0, CLS, [T, H] -> [n_seqs,
// H]), the mean over the sequence (mode 1, [n_seqs, H]) or both side by side (mode 2,
// [n_seqs, 2H] = [CLS | mean]). One block per sequence; threads stride over columns, so
// neighbouring threads read neighbouring values.

extern "C" __global__ void pool(const T* x, const u32* cu_seqlens, T* out, int n_seqs, int h,
                                int mode) {
    const int s = blockIdx.x;
    if (s >= n_seqs) return;
    const u32 start = cu_seqlens[s], end = cu_seqlens[s + 1];
    const int out_cols = mode == 2 ? 2 * h : h;
    for (int oc = threadIdx.x; oc < out_cols; oc += blockDim.x) {
        const bool mean = mode == 1 || (mode == 2 && oc >= h);
        const int c = oc >= h ? oc - h : oc;
        if (!mean) {
            st(out, (size_t)s * out_cols + oc, ld(x, (size_t)start * h + c));
        } else {
            float sum = 0.0f;
            for (u32 t = start; t < end; ++t) sum += ld(x, (size_t)t * h + c);
            st(out, (size_t)s * out_cols + oc, sum / (float)max(end - start, 1u));
        }
    }
}
