// Element-wise kernels, grid-stride so any size fits one launch. Memory-bound, so each thread
// step moves 16 bytes (`vec16`: 8 bf16/f16 values or 4 f32) with one vector load and one vector
// store where the layout allows; the rest goes one value at a time.
//
//   bias_act: x[r, c] = act(x[r, c] + bias[c]), the epilogue of a GEMM whose activation cuBLASLt
//             cannot fuse exactly (its GELU epilogue is the tanh form; HF "gelu" is erf).
//             x must be 16-byte aligned (the host checks).
//   geglu:    out[t, i] = act(x[t, i]) * x[t, I + i] for x = [input half | gate half]; vectors
//             when I is a multiple of the vector width (x and out 16-byte aligned).

extern "C" __global__ void bias_act(T* x, const T* bias, int rows, int n, int act) {
    const size_t total = (size_t)rows * n;
    const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    const size_t step = (size_t)gridDim.x * blockDim.x;
    const size_t chunks = total / VEC;
    vec16* xv = reinterpret_cast<vec16*>(x);
    if (n % VEC == 0 && total % VEC == 0 && chunks <= 0xffffffffu &&
        (bias == nullptr || (size_t)bias % 16 == 0)) {
        // Whole rows of vectors: the bias as vectors too, one 32-bit remainder per 16 bytes (the
        // general loop below spends more on indexing than on the arithmetic).
        const u32 per_row = (u32)(n / VEC);
        const vec16* bv = reinterpret_cast<const vec16*>(bias);
        for (size_t ch = first; ch < chunks; ch += step) {
            vec16 a = xv[ch];
            if (bv) {
                const vec16 b = bv[(u32)ch % per_row];
                #pragma unroll
                for (int i = 0; i < VEC; ++i) st(a.v, i, activate(ld(a.v, i) + ld(b.v, i), act));
            } else {
                #pragma unroll
                for (int i = 0; i < VEC; ++i) st(a.v, i, activate(ld(a.v, i), act));
            }
            xv[ch] = a;
        }
        return;
    }
    for (size_t ch = first; ch < chunks; ch += step) {
        vec16 a = xv[ch];
        size_t c = (ch * VEC) % n;
        #pragma unroll
        for (int i = 0; i < VEC; ++i) {
            float v = ld(a.v, i);
            if (bias) v += ld(bias, c);
            st(a.v, i, activate(v, act));
            if (++c == (size_t)n) c = 0;
        }
        xv[ch] = a;
    }
    for (size_t e = chunks * VEC + first; e < total; e += step) {
        float v = ld(x, e);
        if (bias) v += ld(bias, e % n);
        st(x, e, activate(v, act));
    }
}

extern "C" __global__ void geglu(const T* x, T* out, int rows, int inner, int act) {
    const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    const size_t step = (size_t)gridDim.x * blockDim.x;
    if (inner % VEC == 0) {
        const size_t per_row = inner / VEC, chunks = (size_t)rows * per_row;
        const vec16* xv = reinterpret_cast<const vec16*>(x);
        vec16* ov = reinterpret_cast<vec16*>(out);
        for (size_t ch = first; ch < chunks; ch += step) {
            const size_t t = ch / per_row, j = ch % per_row;
            const vec16 a = xv[t * 2 * per_row + j], g = xv[t * 2 * per_row + per_row + j];
            vec16 o;
            #pragma unroll
            for (int i = 0; i < VEC; ++i) st(o.v, i, activate(ld(a.v, i), act) * ld(g.v, i));
            ov[ch] = o;
        }
        return;
    }
    const size_t total = (size_t)rows * inner;
    for (size_t e = first; e < total; e += step) {
        const size_t t = e / inner, i = e % inner;
        const size_t base = t * 2 * inner;
        st(out, e, activate(ld(x, base + i), act) * ld(x, base + inner + i));
    }
}
