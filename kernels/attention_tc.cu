// Varlen attention on tensor cores (FlashAttention-2 style) for bf16/f16 storage; f32 storage and
// head sizes that are not multiples of 16 use attention.cu. Same contract as attention.cu: the
// host lists query blocks of up to 64 tokens that never cross a sequence; blockIdx.y is the head;
// half_window < 0 means global attention. Needs sm_80 (mma.sync m16n8k16, cp.async) and a
// 16-byte aligned qkv (the host checks).
//
// A block is 4 warps; warp w owns queries q0 + 16w .. q0 + 16w + 15. Its Q (16 × D) stays in
// registers as mma A-fragments. Keys and values stream through shared memory 64 at a time, both
// row-major (one row per key), rows padded by 16 bytes so fragment reads are bank-conflict free,
// copied by cp.async 16 bytes per instruction; up to D = 80 two stages deep (the next tile's copy
// is in flight while this one is multiplied: two stages of D = 96 would pass 48 KiB of static
// shared memory). Tiles wholly inside the sequence and the window skip the masking. Per tile: S = Q·Kᵀ with mma.sync m16n8k16 (f32 accumulate; a K row holds a
// B-fragment's pair), mask (sequence end, sliding window), online softmax in base 2 on the
// accumulator fragments (row max/sum across the 4 threads of a quad), then P is re-packed from
// accumulator layout into A-fragments in registers (no shared round trip) and O += P·V with mma
// again, V's B-fragments (pairs of keys for one dimension) read transposed by
// ldmatrix.x4.trans, four 8×8 tiles per instruction. The row sums stay per thread until the end.

#if !defined(MIRA_F32)

#define TC_BQ 64
#define TC_BK 64
#define TC_THREADS 128

#if !defined(MIRA_EMU)  // (the CPU emulation in tests/cuda_emu has its own of these two)
#if defined(MIRA_BF16)
#define TC_MMA "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#else
#define TC_MMA "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#endif

// c += a · b for one 16×8 tile of C from a 16×16 A tile and a 16×8 B tile.
__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(TC_MMA "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// r[0..3] = the four 8×8 tiles of 16-bit values whose rows lanes 8i..8i+7 address (one 16-byte
// row each), transposed: lane l gets rows 2(l%4), 2(l%4)+1 of column l/4 of tile i.
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], const T* row) {
    u32 addr;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(addr) : "l"(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
#endif

#if !defined(MIRA_EMU)
// 16 bytes global -> shared without passing through registers; zeros when !valid (src-size 0).
__device__ __forceinline__ void cp_async16(T* dst, const T* src, bool valid) {
    u32 addr;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(addr) : "l"(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(addr), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
#endif

// Two floats as a pair of storage values (first in the low half).
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (u32)from_f32(lo) | ((u32)from_f32(hi) << 16);
}

__device__ __forceinline__ u32 ld2(const T* p, size_t i) {  // i even: 4-byte aligned
    return *reinterpret_cast<const u32*>(p + i);
}

template <int D>
__device__ __forceinline__ void attention_tc_impl(const T* qkv, const uint2* blocks,
                                                  const u32* cu_seqlens, T* out, int hidden,
                                                  int n_blocks, int half_window, float scale) {
    constexpr int KP = D + 8;  // K and V tile row pitch (storage values; rows 16-byte aligned)
    constexpr int STAGES = D <= 80 ? 2 : 1;
    constexpr int CHUNKS = D / 8;  // 16-byte pieces of a row
    __shared__ __align__(16) T k_s[STAGES][TC_BK * KP];
    __shared__ __align__(16) T v_s[STAGES][TC_BK * KP];
    const int blk = blockIdx.x;
    if (blk >= n_blocks) return;
    const int head = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;  // fragment row group and column pair
    const size_t stride = 3 * (size_t)hidden;
    const u32 seq = blocks[blk].x, q0 = blocks[blk].y;
    const u32 s0 = cu_seqlens[seq], s1 = cu_seqlens[seq + 1];
    const u32 q_last = min(q0 + TC_BQ, s1) - 1;
    u32 k_lo = s0, k_hi = s1;
    if (half_window >= 0) {
        if (q0 - s0 > (u32)half_window) k_lo = q0 - half_window;
        k_hi = min(s1, q_last + half_window + 1);
    }
    // This thread's two query rows (fragment rows g and g + 8 of the warp's 16).
    const u32 row0 = q0 + warp * 16 + g, row1 = row0 + 8;
    const bool warp_live = q0 + warp * 16 < s1;

    u32 qf[D / 16][4];
    #pragma unroll
    for (int kt = 0; kt < D / 16; ++kt) {
        const size_t c = head * D + kt * 16 + 2 * t;
        qf[kt][0] = row0 < s1 ? ld2(qkv, row0 * stride + c) : 0u;
        qf[kt][1] = row1 < s1 ? ld2(qkv, row1 * stride + c) : 0u;
        qf[kt][2] = row0 < s1 ? ld2(qkv, row0 * stride + c + 8) : 0u;
        qf[kt][3] = row1 < s1 ? ld2(qkv, row1 * stride + c + 8) : 0u;
    }
    float o[D / 8][4];
    #pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;
    const float scale2 = scale * 1.4426950408889634f;  // softmax in base 2

    // Copy the K and V rows of keys t0 .. t0 + 63 into stage st as one cp.async group; keys past
    // the range are zeros.
    auto load_tile = [&](int st, u32 t0) {
        // (Unrolled only where a tile's copy overlaps the multiplications: at D = 96 the unrolled
        // address arithmetic spills on sm_80.)
        #pragma unroll(STAGES == 2 ? TC_BK * CHUNKS / TC_THREADS : 1)
        for (int i = 0; i < TC_BK * CHUNKS / TC_THREADS; ++i) {  // D / 16 pieces per thread
            const int e = threadIdx.x + i * TC_THREADS;
            const int j = e / CHUNKS, d = (e % CHUNKS) * 8;
            const u32 key = t0 + j;
            const bool valid = key < k_hi;
            const size_t base = (size_t)(valid ? key : k_lo) * stride + hidden + head * D + d;
            cp_async16(&k_s[st][j * KP + d], qkv + base, valid);
            cp_async16(&v_s[st][j * KP + d], qkv + base + hidden, valid);
        }
        cp_async_commit();
    };
    int st = 0;
    if (STAGES == 2 && k_lo < k_hi) load_tile(0, k_lo);
    const u32 warp_q0 = q0 + warp * 16;
    for (u32 t0 = k_lo; t0 < k_hi; t0 += TC_BK) {
        if (STAGES == 1) {
            load_tile(0, t0);
            cp_async_wait<0>();
        } else if (t0 + TC_BK < k_hi) {
            load_tile(st ^ 1, t0 + TC_BK);  // in flight while this tile is multiplied
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* k_t = k_s[st];
        const T* v_t = v_s[st];
        // Every (row, key) of this warp's 16 rows and the tile's 64 keys visible? Then no mask.
        bool masked = t0 + TC_BK > k_hi;
        if (half_window >= 0) {
            const int a = (int)(warp_q0 + 15) - (int)t0, b = (int)(t0 + TC_BK - 1) - (int)warp_q0;
            masked = masked || abs(a) > half_window || abs(b) > half_window;
        }
        if (warp_live) {
            float s[TC_BK / 8][4];
            #pragma unroll
            for (int nt = 0; nt < TC_BK / 8; ++nt) {
                s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
                #pragma unroll
                for (int kt = 0; kt < D / 16; ++kt) {
                    const T* kr = &k_t[(nt * 8 + g) * KP + kt * 16 + 2 * t];
                    mma16816(s[nt], qf[kt], *reinterpret_cast<const u32*>(kr),
                             *reinterpret_cast<const u32*>(kr + 8));
                }
            }
            // Scale and mask; the tile's row maxima.
            float mx0 = NEG_INF, mx1 = NEG_INF;
            #pragma unroll
            for (int nt = 0; nt < TC_BK / 8; ++nt) {
                #pragma unroll
                for (int i = 0; i < 4; ++i) {
                    bool visible = true;
                    if (masked) {
                        const u32 key = t0 + nt * 8 + 2 * t + (i & 1);
                        const u32 row = i < 2 ? row0 : row1;
                        visible = key < k_hi;
                        if (half_window >= 0) {
                            const u32 dist = row > key ? row - key : key - row;
                            visible = visible && dist <= (u32)half_window;
                        }
                    }
                    s[nt][i] = visible ? s[nt][i] * scale2 : NEG_INF;
                }
                mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
                mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
            }
            #pragma unroll
            for (int o_ = 1; o_ <= 2; o_ <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o_));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o_));
            }
            const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
            // A row that has seen no visible key yet keeps base 0: its p are exp2(-inf) = 0.
            const float b0 = n0 == NEG_INF ? 0.0f : n0, b1 = n1 == NEG_INF ? 0.0f : n1;
            const float c0 = exp2f(m0 - b0), c1 = exp2f(m1 - b1);
            m0 = n0;
            m1 = n1;
            l0 *= c0;
            l1 *= c1;
            #pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                o[nt][0] *= c0;
                o[nt][1] *= c0;
                o[nt][2] *= c1;
                o[nt][3] *= c1;
            }
            #pragma unroll
            for (int nt = 0; nt < TC_BK / 8; ++nt) {
                s[nt][0] = exp2f(s[nt][0] - b0);
                s[nt][1] = exp2f(s[nt][1] - b0);
                s[nt][2] = exp2f(s[nt][2] - b1);
                s[nt][3] = exp2f(s[nt][3] - b1);
                l0 += s[nt][0] + s[nt][1];
                l1 += s[nt][2] + s[nt][3];
            }
            // O += P·V: accumulator tiles 2k and 2k+1 of S are exactly the A-fragment of keys
            // 16k .. 16k + 15.
            #pragma unroll
            for (int kt = 0; kt < TC_BK / 16; ++kt) {
                const u32 a[4] = {pack2(s[2 * kt][0], s[2 * kt][1]),
                                  pack2(s[2 * kt][2], s[2 * kt][3]),
                                  pack2(s[2 * kt + 1][0], s[2 * kt + 1][1]),
                                  pack2(s[2 * kt + 1][2], s[2 * kt + 1][3])};
                // Lane l addresses row l%8 of tile l/8: keys kt·16 + 8·((l/8)%2) + l%8, dimensions
                // from 8·(l/16) on; tiles 0, 1 are b0, b1 of one 8-wide dimension block, tiles
                // 2, 3 of the next.
                const T* vrow = &v_t[(kt * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * KP +
                                     (lane >> 4) * 8];
                #pragma unroll
                for (int nt = 0; nt < D / 8; nt += 2) {
                    u32 b[4];
                    ldsm_x4_trans(b, vrow + nt * 8);
                    mma16816(o[nt], a, b[0], b[1]);
                    mma16816(o[nt + 1], a, b[2], b[3]);
                }
            }
        }
        __syncthreads();  // everyone is done with stage st before a copy overwrites it
        if (STAGES == 2) st ^= 1;
    }
    if (!warp_live) return;
    #pragma unroll
    for (int o_ = 1; o_ <= 2; o_ <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, o_);
        l1 += __shfl_xor_sync(0xffffffffu, l1, o_);
    }
    const float i0 = 1.0f / l0, i1 = 1.0f / l1;
    #pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
        const size_t c = head * D + nt * 8 + 2 * t;
        // Two neighbouring outputs as one 32-bit store (c is even).
        if (row0 <= q_last)
            *reinterpret_cast<u32*>(out + row0 * (size_t)hidden + c) =
                pack2(o[nt][0] * i0, o[nt][1] * i0);
        if (row1 <= q_last)
            *reinterpret_cast<u32*>(out + row1 * (size_t)hidden + c) =
                pack2(o[nt][2] * i1, o[nt][3] * i1);
    }
}

#define ATTENTION_TC_FOR(D)                                                                      \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) attention_tc_d##D(                  \
        const T* qkv, const uint2* blocks, const u32* cu_seqlens, T* out, int hidden,            \
        int n_blocks, int half_window, float scale) {                                            \
        attention_tc_impl<D>(qkv, blocks, cu_seqlens, out, hidden, n_blocks, half_window,       \
                             scale);                                                             \
    }
ATTENTION_TC_FOR(16)
ATTENTION_TC_FOR(32)
ATTENTION_TC_FOR(64)
ATTENTION_TC_FOR(80)
ATTENTION_TC_FOR(96)
ATTENTION_TC_FOR(128)

#endif  // !MIRA_F32
