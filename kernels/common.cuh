// Prepended by mira to every kernel file, after one of `#define MIRA_BF16`, `#define MIRA_F16`
// or `#define MIRA_F32` (the storage type of weights and activations). Arithmetic is f32.
// No CUDA headers: NVRTC compiles this without an include path, and conversions go through
// PTX `cvt` (bf16 needs sm_80 or newer).

typedef unsigned int u32;
// math.h's INFINITY, without math.h.
#define NEG_INF __int_as_float(0xff800000)

#if defined(MIRA_F32)
typedef float T;
__device__ __forceinline__ float ld(const T* p, size_t i) { return p[i]; }
__device__ __forceinline__ void st(T* p, size_t i, float v) { p[i] = v; }
#else
typedef unsigned short T;
#if !defined(MIRA_EMU)
// A storage value as f32, and f32 to storage rounded to nearest even. (The CPU emulation of
// the kernels in tests/cuda_emu defines these two itself.)
__device__ __forceinline__ float to_f32(unsigned short h) {
#if defined(MIRA_BF16)
    return __uint_as_float(((u32)h) << 16);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}
__device__ __forceinline__ unsigned short from_f32(float v) {
    unsigned short h;
#if defined(MIRA_BF16)
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
#endif
    return h;
}
#endif
__device__ __forceinline__ float ld(const T* p, size_t i) { return to_f32(p[i]); }
__device__ __forceinline__ void st(T* p, size_t i, float v) { p[i] = from_f32(v); }
#endif

// 16 bytes of storage values, for vector loads and stores (the address must be 16-byte aligned).
#define VEC ((int)(16 / sizeof(T)))
struct __align__(16) vec16 {
    T v[VEC];
};

// Activation codes, as the host sends them: 0 none, 1 gelu (exact erf), 2 gelu (tanh), 3 relu,
// 4 silu, 5 tanh. erff is CUDA's full-precision erf: exact GELU stays exact.
__device__ __forceinline__ float activate(float x, int kind) {
    switch (kind) {
        case 1: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
        case 2: return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
        case 3: return fmaxf(x, 0.0f);
        case 4: return x / (1.0f + expf(-x));
        case 5: return tanhf(x);
        default: return x;
    }
}

// Sum over the 32 lanes of a warp, every lane getting the total.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over a block of ROW_THREADS threads: warp shuffles, then one warp over the partials.
#define ROW_THREADS 256
#define ROW_SLOTS 16
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < ROW_THREADS / 32 ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    return v;
}
