// Element-wise kernels, one thread per output value, grid-stride so any size fits one launch.
//
//   bias_act: x[r, c] = act(x[r, c] + bias[c]), the epilogue of a GEMM whose activation cuBLASLt
//             cannot fuse exactly (its GELU epilogue is the tanh form; HF "gelu" is erf).
//   geglu:    out[t, i] = act(x[t, i]) * x[t, I + i] for x = [input half | gate half].

extern "C" __global__ void bias_act(T* x, const T* bias, int rows, int n, int act) {
    const size_t total = (size_t)rows * n;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total;
         e += (size_t)gridDim.x * blockDim.x) {
        float v = ld(x, e);
        if (bias) v += ld(bias, e % n);
        st(x, e, activate(v, act));
    }
}

extern "C" __global__ void geglu(const T* x, T* out, int rows, int inner, int act) {
    const size_t total = (size_t)rows * inner;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total;
         e += (size_t)gridDim.x * blockDim.x) {
        const size_t t = e / inner, i = e % inner;
        const size_t base = t * 2 * inner;
        st(out, e, activate(ld(x, base + i), act) * ld(x, base + inner + i));
    }
}
