// The CUDA C++ that kernels/*.cu use, emulated on the host, so the tests can run the kernels on
// a CPU (tests/cuda_emu.rs): the machine CI has, and every developer's.
//
// Each thread of a block is a fiber on the calling OS thread; the blocks of a grid
// run one after another. __syncthreads is a barrier over the block's threads that have not
// exited, and the warp-synchronous operations (__shfl_xor_sync, mma.sync) are barriers over the
// warp, which must be whole: a warp operation with exited or missing lanes, or barriers that can
// never complete, fail the launch with a message instead of hanging.
//
// mma.sync.m16n8k16 (f32 += bf16/f16 × bf16/f16) gathers the warp's fragments and multiplies
// them as laid out in the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point
// type"), written from that document and not from our kernel: a kernel that misplaces a fragment
// gets wrong numbers here as it would on the GPU. Storage conversions round to nearest even, as
// PTX cvt.rn does.
//
// Included after the storage `#define` and before kernels/common.cuh; the test appends one
// MIRA_EMU_ENTRY(name) per entry point and MIRA_EMU_RUNTIME once. One library per storage type,
// all loaded in one process: built with -fvisibility=hidden -fno-gnu-unique, so each keeps its
// own scheduler state and entry points (C++ inline variables are otherwise bound process-wide).
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#define MIRA_EMU 1

struct uint2 {
    unsigned int x, y;
};
struct uint3 {
    unsigned int x, y, z;
};
struct float2 {
    float x, y;
};

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static thread_local  // per launching OS thread
#define __align__(n) __attribute__((aligned(n)))

// The built-in variables, set by the scheduler before it resumes a thread. Everything the
// emulator keeps is per OS thread, so launches on different OS threads run at once.
inline thread_local uint3 threadIdx, blockIdx, blockDim, gridDim;

inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int i;
    memcpy(&i, &f, 4);
    return i;
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// Storage value <-> f32, as common.cuh's PTX cvt does on the GPU.
#if defined(MIRA_BF16)
inline float to_f32(unsigned short h) { return __uint_as_float((unsigned int)h << 16); }
inline unsigned short from_f32(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN: cvt's canonical NaN
    u += 0x7fffu + ((u >> 16) & 1u);                      // round to nearest even
    return (unsigned short)(u >> 16);
}
#elif defined(MIRA_F16)
inline float to_f32(unsigned short h) {
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}
inline unsigned short from_f32(float v) {
    const _Float16 f = (_Float16)v;  // round to nearest even
    unsigned short h;
    memcpy(&h, &f, 2);
    return h;
}
#endif

namespace emu {

constexpr size_t STACK = 128 * 1024;
constexpr size_t PAGE = 4096;

// Switching threads. On x86-64 a few instructions that save the callee-saved registers and
// swap stacks (glibc's swapcontext also saves the signal mask, a system call per switch, which
// made the emulator several times slower); elsewhere ucontext.
#if defined(__x86_64__)
struct Context {
    void* sp = nullptr;
};
extern "C" void mira_emu_switch(void** save_sp, void* to_sp);
asm(R"(
    .text
    .globl mira_emu_switch
    .hidden mira_emu_switch
    .type mira_emu_switch, @function
mira_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size mira_emu_switch, .-mira_emu_switch
)");
inline void switch_to(Context& from, Context& to) { mira_emu_switch(&from.sp, to.sp); }
// A fresh stack whose first switch "returns" into entry() with the alignment of a call.
inline void prepare(Context& c, char* stack, size_t size, void (*entry)()) {
    uintptr_t top = ((uintptr_t)(stack + size)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;          // entry's return address (it never returns)
    *--sp = (void*)entry;     // popped by ret
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};
inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void prepare(Context& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

// One 16-byte cp.async: the destination is written only when a cp.async.wait_group retires its
// group, so a kernel that reads shared memory before waiting reads what was there before.
struct AsyncCopy {
    void* dst;
    unsigned char bytes[16];
};

struct Fiber {
    Context ctx;
    char* stack = nullptr;  // STACK bytes above a PROT_NONE guard page
    unsigned tid = 0;
    bool done = false;
    int wait = 0;  // 0 running, 1 at the block barrier, 2 at the warp barrier
    unsigned long gen = 0;
    std::vector<AsyncCopy> open;                  // issued since the last commit_group
    std::vector<std::vector<AsyncCopy>> groups;  // committed, oldest first, not yet waited for
};

struct Block {
    std::vector<Fiber> fibers;
    Context sched;
    int current = -1;
    unsigned live = 0, arrived = 0;
    unsigned long gen = 1;
    std::vector<unsigned> warp_live, warp_size, warp_arrived;
    std::vector<unsigned long> warp_gen;
    // Exchange areas of the warp operations, two of each, used alternately: the parity of the
    // warp's barrier generation picks one, so one barrier per operation suffices (a lane that
    // is slow to read one area holds everyone back before the next use of that area).
    std::vector<unsigned int> xchg[2];      // per thread: 4 A words, 2 B words, a shuffle value
    std::vector<float> mma_out[2];          // per thread: its 4 accumulator values of a·b
    std::vector<unsigned long> mma_done;    // per warp: the generation whose a·b is computed
    void (*thunk)(void**) = nullptr;
    void** args = nullptr;
    std::string error;
};

inline thread_local Block* block = nullptr;

inline Fiber& me() { return block->fibers[block->current]; }

inline void yield() {
    Fiber& f = me();
    switch_to(f.ctx, block->sched);
}

// Fail the launch from inside a thread: the thread is never resumed.
[[noreturn]] inline void fail(const std::string& what) {
    Block& b = *block;
    if (b.error.empty()) {
        char where[96];
        snprintf(where, sizeof where, " (block %u,%u,%u thread %u)", blockIdx.x, blockIdx.y,
                 blockIdx.z, me().tid);
        b.error = what + where;
    }
    yield();
    __builtin_unreachable();
}

inline void sync_block() {
    Block& b = *block;
    Fiber& f = me();
    if (++b.arrived == b.live) {
        b.arrived = 0;
        ++b.gen;
        return;
    }
    f.wait = 1;
    f.gen = b.gen;
    yield();
    f.wait = 0;
}

inline unsigned warp_of_me(const char* op) {
    Block& b = *block;
    const unsigned w = me().tid / 32;
    if (b.warp_size[w] != 32) fail(std::string(op) + " in a warp of fewer than 32 threads");
    if (b.warp_live[w] != 32) fail(std::string(op) + " after some lanes of the warp exited");
    return w;
}

inline void sync_warp(unsigned w) {
    Block& b = *block;
    Fiber& f = me();
    if (++b.warp_arrived[w] == b.warp_live[w]) {
        b.warp_arrived[w] = 0;
        ++b.warp_gen[w];
        return;
    }
    f.wait = 2;
    f.gen = b.warp_gen[w];
    yield();
    f.wait = 0;
}

inline bool runnable(const Block& b, const Fiber& f) {
    if (f.done) return false;
    if (f.wait == 1) return b.gen > f.gen;
    if (f.wait == 2) return b.warp_gen[f.tid / 32] > f.gen;
    return true;
}

inline void release_if_complete(Block& b, unsigned w) {
    if (b.arrived > 0 && b.arrived == b.live) {
        b.arrived = 0;
        ++b.gen;
    }
    if (b.warp_arrived[w] > 0 && b.warp_arrived[w] == b.warp_live[w]) {
        b.warp_arrived[w] = 0;
        ++b.warp_gen[w];
    }
}

[[noreturn]] inline void fiber_main() {
    Block& b = *block;
    b.thunk(b.args);
    Fiber& f = me();
    f.done = true;
    --b.live;
    --b.warp_live[f.tid / 32];
    release_if_complete(b, f.tid / 32);
    switch_to(f.ctx, b.sched);  // never resumed
    __builtin_unreachable();
}

// A memory fault inside a launch (the test's allocations end at an inaccessible page, so a read
// or write past the end of one faults) fails the launch like any other error: the handler
// switches back to the scheduler and the faulting thread is never resumed. A fault anywhere
// else goes to the handler that was installed before.
inline struct sigaction previous_segv;

inline void on_segv(int sig, siginfo_t* info, void* uc) {
    if (block != nullptr && block->current >= 0 && block->error.empty()) {
        char what[160];
        snprintf(what, sizeof what,
                 "memory fault at %p: a read or write outside every allocation, or past the end "
                 "of one",
                 info->si_addr);
        fail(what);
    }
    if (previous_segv.sa_flags & SA_SIGINFO) {
        previous_segv.sa_sigaction(sig, info, uc);
    } else if (previous_segv.sa_handler != SIG_DFL && previous_segv.sa_handler != SIG_IGN) {
        previous_segv.sa_handler(sig);
    } else {
        sigaction(SIGSEGV, &previous_segv, nullptr);  // returning re-faults: the default action
    }
}

inline void install_segv_handler() {
    static const bool installed = [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        return sigaction(SIGSEGV, &sa, &previous_segv) == 0;
    }();
    (void)installed;
}

inline std::map<std::string, void (*)(void**)>& registry() {
    static std::map<std::string, void (*)(void**)> entries;
    return entries;
}

inline bool add(const char* name, void (*thunk)(void**)) {
    registry()[name] = thunk;
    return true;
}

template <class... A, size_t... I>
void call_with(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<A*>(args[I])...);
}

template <class... A>
void call(void (*kernel)(A...), void** args) {
    call_with(kernel, args, std::index_sequence_for<A...>{});
}

// Run `thunk(args)` as a grid of `grid` blocks of `threads` threads. Returns "" or what failed.
inline std::string run(void (*thunk)(void**), void** args, const unsigned grid[3],
                       unsigned threads) {
    if (threads == 0 || threads > 1024) return "block size must be 1..1024";
    install_segv_handler();
    // Stacks are kept between launches, and unmapped when the OS thread ends.
    struct Pool {
        std::vector<Fiber> fibers;
        ~Pool() {
            for (Fiber& f : fibers)
                if (f.stack) munmap(f.stack - PAGE, STACK + PAGE);
        }
    };
    static thread_local Pool owned;
    std::vector<Fiber>& pool = owned.fibers;
    Block b;
    b.fibers.swap(pool);
    b.fibers.resize(threads > b.fibers.size() ? threads : b.fibers.size());
    for (Fiber& f : b.fibers) {
        if (f.stack) continue;
        char* m = (char*)mmap(nullptr, STACK + PAGE, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return "cannot map a thread stack";
        mprotect(m, PAGE, PROT_NONE);  // a stack overflow faults instead of corrupting
        f.stack = m + PAGE;
    }
    const unsigned warps = (threads + 31) / 32;
    b.thunk = thunk;
    b.args = args;
    blockDim = {threads, 1, 1};
    gridDim = {grid[0], grid[1], grid[2]};
    block = &b;
    for (unsigned z = 0; z < grid[2] && b.error.empty(); ++z)
        for (unsigned y = 0; y < grid[1] && b.error.empty(); ++y)
            for (unsigned x = 0; x < grid[0] && b.error.empty(); ++x) {
                blockIdx = {x, y, z};
                b.live = threads;
                b.arrived = 0;
                b.warp_live.assign(warps, 0);
                b.warp_size.assign(warps, 0);
                b.warp_arrived.assign(warps, 0);
                b.warp_gen.assign(warps, 1);
                for (int p = 0; p < 2; ++p) {
                    b.xchg[p].assign(threads * 8, 0);
                    b.mma_out[p].assign(threads * 4, 0.0f);
                }
                b.mma_done.assign(warps, 0);
                for (unsigned t = 0; t < threads; ++t) {
                    Fiber& f = b.fibers[t];
                    f.tid = t;
                    f.done = false;
                    f.open.clear();
                    f.groups.clear();
                    f.wait = 0;
                    ++b.warp_live[t / 32];
                    ++b.warp_size[t / 32];
                    prepare(f.ctx, f.stack, STACK, fiber_main);
                }
                for (;;) {
                    bool all_done = true, ran = false;
                    for (unsigned t = 0; t < threads && b.error.empty(); ++t) {
                        Fiber& f = b.fibers[t];
                        if (!f.done) all_done = false;
                        if (!runnable(b, f)) continue;
                        ran = true;
                        b.current = (int)t;
                        threadIdx = {t, 0, 0};
                        switch_to(b.sched, f.ctx);
                        b.current = -1;
                    }
                    if (!b.error.empty() || all_done) break;
                    if (!ran) {
                        char msg[160];
                        snprintf(msg, sizeof msg,
                                 "deadlock in block %u,%u,%u: threads wait at a barrier (a "
                                 "__syncthreads or warp operation) that not all reach",
                                 x, y, z);
                        b.error = msg;
                    }
                }
            }
    block = nullptr;
    std::string error = b.error;
    pool.swap(b.fibers);
    return error;
}

}  // namespace emu

inline void __syncthreads() { emu::sync_block(); }

inline float __shfl_xor_sync(unsigned int mask, float v, int lane_mask) {
    if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync with a partial mask");
    emu::Block& b = *emu::block;
    const unsigned w = emu::warp_of_me("__shfl_xor_sync");
    const unsigned tid = emu::me().tid, lane = tid % 32;
    std::vector<unsigned int>& x = b.xchg[b.warp_gen[w] & 1];
    x[tid * 8 + 6] = __float_as_uint(v);
    emu::sync_warp(w);
    return __uint_as_float(x[(w * 32 + (lane ^ (unsigned)lane_mask) % 32) * 8 + 6]);
}

#if !defined(MIRA_F32)
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, c += a·b. Fragments, with
// g = lane / 4 and t = lane % 4, each 32-bit register holding two values, the lower-indexed one
// in the low half:
//   A (16×16, row): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9],
//                   a3 = A[g+8][2t+8, 2t+9]
//   B (16×8, col):  b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C (16×8):       c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// The first lane to run after the barrier multiplies for the whole warp.
inline void mma16816(float (&c)[4], const unsigned int (&a)[4], unsigned int b0,
                     unsigned int b1) {
    emu::Block& blk = *emu::block;
    const unsigned w = emu::warp_of_me("mma.sync");
    const unsigned tid = emu::me().tid, lane = tid % 32;
    const int p = blk.warp_gen[w] & 1;
    unsigned int* mine = &blk.xchg[p][tid * 8];
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    mine[4] = b0;
    mine[5] = b1;
    emu::sync_warp(w);
    float* out = &blk.mma_out[p][w * 32 * 4];
    if (blk.mma_done[w] != blk.warp_gen[w]) {
        blk.mma_done[w] = blk.warp_gen[w];
        float A[16][16], B[16][8];
        auto lo = [](unsigned int v) { return to_f32((unsigned short)(v & 0xffffu)); };
        auto hi = [](unsigned int v) { return to_f32((unsigned short)(v >> 16)); };
        for (unsigned l = 0; l < 32; ++l) {
            const unsigned int* r = &blk.xchg[p][(w * 32 + l) * 8];
            const unsigned g = l / 4, t = l % 4;
            A[g][2 * t] = lo(r[0]);
            A[g][2 * t + 1] = hi(r[0]);
            A[g + 8][2 * t] = lo(r[1]);
            A[g + 8][2 * t + 1] = hi(r[1]);
            A[g][2 * t + 8] = lo(r[2]);
            A[g][2 * t + 9] = hi(r[2]);
            A[g + 8][2 * t + 8] = lo(r[3]);
            A[g + 8][2 * t + 9] = hi(r[3]);
            B[2 * t][g] = lo(r[4]);
            B[2 * t + 1][g] = hi(r[4]);
            B[2 * t + 8][g] = lo(r[5]);
            B[2 * t + 9][g] = hi(r[5]);
        }
        for (unsigned l = 0; l < 32; ++l) {
            const unsigned g = l / 4, t = l % 4;
            for (int i = 0; i < 4; ++i) {
                const unsigned row = i < 2 ? g : g + 8, col = 2 * t + (i & 1);
                float sum = 0.0f;  // products of 16-bit values are exact in f32
                for (int k = 0; k < 16; ++k) sum = fmaf(A[row][k], B[k][col], sum);
                out[l * 4 + i] = sum;
            }
        }
    }
    for (int i = 0; i < 4; ++i) c[i] += out[lane * 4 + i];
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lanes 8i..8i+7 each give the address of one
// 16-byte row of 8×8 tile i; lane l receives, in r[i], tile i's elements at rows 2(l%4) and
// 2(l%4)+1 of column l/4 (the lower row in the low half): the tile transposed, as the PTX ISA
// lays out the destination fragments of ldmatrix with .trans.
inline void ldsm_x4_trans(unsigned int (&r)[4], const unsigned short* row) {
    emu::Block& blk = *emu::block;
    const unsigned w = emu::warp_of_me("ldmatrix");
    const unsigned tid = emu::me().tid, lane = tid % 32;
    std::vector<unsigned int>& x = blk.xchg[blk.warp_gen[w] & 1];
    const uint64_t p = (uint64_t)(uintptr_t)row;
    if (p % 16 != 0) emu::fail("ldmatrix with a row address that is not 16-byte aligned");
    x[tid * 8 + 0] = (unsigned int)p;
    x[tid * 8 + 1] = (unsigned int)(p >> 32);
    emu::sync_warp(w);
    auto row_of = [&](unsigned src_lane) {
        const unsigned s = (w * 32 + src_lane) * 8;
        return (const unsigned short*)(uintptr_t)(x[s] | ((uint64_t)x[s + 1] << 32));
    };
    const unsigned col = lane / 4, r0 = 2 * (lane % 4);
    for (unsigned i = 0; i < 4; ++i)
        r[i] = (unsigned int)row_of(8 * i + r0)[col] |
               ((unsigned int)row_of(8 * i + r0 + 1)[col] << 16);
}
#endif

// cp.async.cg.shared.global [dst], [src], 16, valid ? 16 : 0 (zero fill when not valid). The
// source is read when issued (kernels never write what they copy asynchronously). The PTX ISA
// leaves the destination undefined until a wait retires the group: here it holds NaN bytes from
// the issue on and the data from the wait on, so both a read before the wait and a copy issued
// over a tile another warp is still reading (a missing barrier) give wrong numbers.
template <class V>
inline void cp_async16(V* dst, const V* src, bool valid) {
    if ((uintptr_t)dst % 16 != 0 || (uintptr_t)src % 16 != 0)
        emu::fail("cp.async of 16 bytes with an address that is not 16-byte aligned");
    emu::AsyncCopy c;
    c.dst = dst;
    if (valid)
        memcpy(c.bytes, src, 16);
    else
        memset(c.bytes, 0, 16);
    memset(dst, 0xff, 16);
    emu::me().open.push_back(c);
}

inline void cp_async_commit() {
    emu::Fiber& f = emu::me();
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}

// cp.async.wait_group N: all but the N most recently committed groups are complete.
template <int N>
inline void cp_async_wait() {
    emu::Fiber& f = emu::me();
    while (f.groups.size() > (size_t)N) {
        for (const emu::AsyncCopy& c : f.groups.front()) memcpy(c.dst, c.bytes, 16);
        f.groups.erase(f.groups.begin());
    }
}

#define MIRA_EMU_ENTRY(name) \
    static const bool mira_emu_entry_##name = emu::add(#name, [](void** a) { emu::call(name, a); });

// The one exported function: run entry point `name` over `grid` blocks of `threads` threads with
// `args` (pointers to each argument's value, as cuLaunchKernel takes them). Returns 0, or 1 with
// the reason in `err`.
#define MIRA_EMU_RUNTIME                                                                       \
    extern "C" __attribute__((visibility("default"))) int mira_emu_launch(const char* name, const unsigned* grid, unsigned threads,   \
                                   void** args, char* err, size_t err_len) {                   \
        auto it = emu::registry().find(name);                                                  \
        std::string e = it == emu::registry().end() ? std::string("no entry point ") + name    \
                                                    : emu::run(it->second, args, grid, threads); \
        if (e.empty()) return 0;                                                               \
        snprintf(err, err_len, "%s", e.c_str());                                               \
        return 1;                                                                              \
    }
