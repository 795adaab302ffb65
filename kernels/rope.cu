// Rotary position embedding on the Q and K blocks of qkv ([T, 3H]), in place: one thread per
// rotated pair (x_i, x_{i+d/2}) of one head of Q or K. cos/sin come from an f32 table the host
// computes once per (theta, head size) exactly as the CPU reference does, so long positions do
// not depend on the device's sin/cos.

extern "C" __global__ void rope(T* qkv, const u32* positions, const float2* table, int rows,
                                int hidden, int half_dim) {
    const size_t pairs = hidden;  // Q and K, H/2 pairs each
    const size_t total = (size_t)rows * pairs;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total;
         e += (size_t)gridDim.x * blockDim.x) {
        const size_t t = e / pairs, r = e % pairs;
        const size_t block = r / (hidden / 2), within = r % (hidden / 2);
        const size_t head = within / half_dim, i = within % half_dim;
        const size_t base = t * 3 * hidden + block * hidden + head * 2 * half_dim + i;
        const float2 cs = table[(size_t)positions[t] * half_dim + i];
        const float a = ld(qkv, base), b = ld(qkv, base + half_dim);
        st(qkv, base, a * cs.x - b * cs.y);
        st(qkv, base + half_dim, b * cs.x + a * cs.y);
    }
}
