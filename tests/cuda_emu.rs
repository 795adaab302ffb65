//! The CUDA backend with its kernels emulated on the CPU: `cuda/ops.rs` exactly as it drives a
//! GPU, over a device whose kernels are kernels/*.cu compiled by the host C++ compiler against
//! `cuda_emu/cuda_emu.h` (each GPU thread a fiber; barriers, warp shuffles and mma.sync with the
//! PTX ISA's fragment layouts emulated) and whose GEMMs are computed as cuBLASLt is asked for
//! them. Every op against the CPU backend on fresh random inputs (`gpu/ops.rs`, outputs poisoned
//! with NaN) and whole checkpoints against the CPU (`gpu/model.rs`), in bf16, f16 and f32, with
//! the tensor-core and the plain attention kernels.
//!
//! What this cannot show: the real hardware (timing, the driver, cuBLASLt itself, memory
//! ordering between streams). `cuda_ops.rs` and `cuda_model.rs` check those on a GPU.

mod common;
#[path = "cuda_emu/device.rs"]
mod emu;
mod gpu;
mod op_table;
#[macro_use]
#[path = "gpu/model.rs"]
mod model_check;

use gpu::{ops, Prec};
use mira::engine::backend::cuda::kernels::Storage;
use mira::engine::backend::cuda::launch::Arg;
use mira::engine::backend::cuda::{KernelBackend, KernelDevice};
use mira::engine::Precision;
use mira::{LoadOptions, Scorer};

fn have_compiler() -> bool {
    if emu::compiler().is_some() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("no C++ compiler under CI: .ci/run installs g++");
    }
    eprintln!("SKIPPED: no C++ compiler (g++ or $CXX) to build the kernel emulator");
    false
}

/// The backends to test: bf16 and f16 with tensor-core attention, the same with the plain
/// attention kernel, and f32.
fn backends() -> Vec<(KernelBackend<emu::EmuDevice>, Prec, &'static str)> {
    if !have_compiler() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (storage, prec) in [(Storage::Bf16, Prec::Bf16), (Storage::F16, Prec::F16)] {
        let tc = emu::backend(storage);
        tc.set_scalar_attention(false);
        out.push((tc, prec, "tensor-core attention"));
        let plain = emu::backend(storage);
        plain.set_scalar_attention(true);
        out.push((plain, prec, "plain attention"));
    }
    out.push((emu::backend(Storage::F32), Prec::F32, "plain attention"));
    out
}

macro_rules! emulated_against_cpu {
    ($op:ident, [$($vs_cpu:ident),*], [$($vs_f64:ident),*]) => {
        #[test]
        fn $op() {
            for (be, prec, what) in backends() {
                eprintln!("{:?} ({what})", be.storage());
                $(ops::$vs_cpu(&be, prec);)*
            }
        }
    };
}

op_table::every_op!(emulated_against_cpu);

/// A checkpoint on the emulated CUDA backend against the CPU, bf16 (tensor-core attention),
/// f16 (plain attention) and f32: the checks and tolerances of `gpu/model.rs`.
fn model(dir: &std::path::Path, golden_name: &str) {
    if !have_compiler() {
        return;
    }
    let precisions = [
        (Precision::Bf16, Prec::Bf16),
        (Precision::F16, Prec::F16),
        (Precision::F32, Prec::F32),
    ];
    model_check::check_loaded(dir, golden_name, &precisions, |precision, max_tokens| {
        let (storage, scalar) = match precision {
            Precision::Bf16 => (Storage::Bf16, false),
            Precision::F16 => (Storage::F16, true),
            _ => (Storage::F32, true),
        };
        let be = emu::backend(storage);
        be.set_scalar_attention(scalar);
        let opts = LoadOptions {
            max_tokens: Some(max_tokens),
            ..Default::default()
        };
        Scorer::load_on_backend(dir, be, opts).unwrap_or_else(|e| panic!("{e:#}"))
    });
}

model_tests!(model);

/// CUDA graphs (recorded forward passes replayed for later batches of the same shape) give
/// exactly the ops' results, on a BERT with a head and a ModernBERT (rotary, sliding windows,
/// GeGLU), f16 with tensor-core attention. Each replay runs the recorded ops on the emulator,
/// which checks every address they use against the live buffers: a graph that outlived an
/// activation, a table or its batch copy fails here.
#[test]
fn graphs_replay_what_the_ops_compute() {
    if !have_compiler() {
        return;
    }
    for name in ["bert-cls-regression", "modernbert-cls-biased"] {
        model_check::check_graphs(&common::fixture_model(name), name, || {
            emu::backend(Storage::F16)
        });
    }
}

/// A device that cannot capture a graph: the batch that tried still gets its results (the
/// recording pass computed them), graphs turn off for the backend, and later batches run op by
/// op with the same results.
#[test]
fn a_graph_that_cannot_be_captured_turns_graphs_off_without_failing() {
    if !have_compiler() {
        return;
    }
    let dir = common::fixture_model("bert-cls-regression");
    let opts = || LoadOptions {
        max_tokens: Some(64),
        ..Default::default()
    };
    let direct = Scorer::load_on_backend(&dir, emu::backend(Storage::F16), opts()).unwrap();
    let be = emu::backend(Storage::F16);
    be.set_graph_tokens(1 << 20);
    be.device()
        .refuse_graphs
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let graphs = Scorer::load_on_backend(&dir, be.clone(), opts()).unwrap();
    let ids = direct
        .tokenize(&["one short text", "one other text"])
        .unwrap();
    for _ in 0..4 {
        let want = direct.logits_ids(&ids[..1]).unwrap();
        assert_eq!(graphs.logits_ids(&ids[..1]).unwrap(), want);
    }
    let s = be.graph_stats();
    // Direct, then the failed recording; graphs are off after it, so nothing more is planned.
    assert_eq!((s.recorded, s.replayed, s.direct), (0, 0, 1), "{s:?}");
    assert_eq!(be.graph_footprint().0, 0);
}

/// Kernels that exercise the emulator itself (CUDA C++, after kernels/common.cuh).
const SELF_TEST: &str = r#"
extern "C" __global__ void reverse_and_warp_sums(const float* x, float* y, float* sums) {
    __shared__ float s[128];
    const int i = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
    s[i] = x[base + i];
    __syncthreads();
    y[base + i] = s[n - 1 - i];
    float v = x[base + i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((i & 31) == 0) sums[(base + i) / 32] = v;
}

// c (16x8 f32, row-major) += a (16x16, row-major) · b (16x8, row-major), fragments loaded as the
// PTX ISA lays them out for mma.m16n8k16.
extern "C" __global__ void mma_tile(const T* a, const T* b, float* c) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    auto pair = [](const T* m, int lo, int hi) { return (u32)m[lo] | ((u32)m[hi] << 16); };
    const u32 af[4] = {pair(a, g * 16 + 2 * t, g * 16 + 2 * t + 1),
                       pair(a, (g + 8) * 16 + 2 * t, (g + 8) * 16 + 2 * t + 1),
                       pair(a, g * 16 + 2 * t + 8, g * 16 + 2 * t + 9),
                       pair(a, (g + 8) * 16 + 2 * t + 8, (g + 8) * 16 + 2 * t + 9)};
    const u32 b0 = pair(b, (2 * t) * 8 + g, (2 * t + 1) * 8 + g);
    const u32 b1 = pair(b, (2 * t + 8) * 8 + g, (2 * t + 9) * 8 + g);
    float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t],
                    c[(g + 8) * 8 + 2 * t + 1]};
    mma16816(acc, af, b0, b1);
    c[g * 8 + 2 * t] = acc[0];
    c[g * 8 + 2 * t + 1] = acc[1];
    c[(g + 8) * 8 + 2 * t] = acc[2];
    c[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// ldmatrix.x4.trans of a 16×16 tile of 16-bit values in shared memory: lane l addresses row l%8
// of 8×8 tile l/8 (tiles: rows 0-7 / 8-15 of columns 0-7, then of columns 8-15).
extern "C" __global__ void ldsm_tile(const T* src, u32* out) {
    __shared__ __align__(16) T tile[16 * 24];  // rows padded to 24 values (48 bytes)
    const int lane = threadIdx.x;
    for (int e = lane; e < 256; e += 32) tile[(e / 16) * 24 + e % 16] = src[e];
    __syncthreads();
    u32 r[4];
    ldsm_x4_trans(r, &tile[(((lane >> 3) & 1) * 8 + (lane & 7)) * 24 + (lane >> 4) * 8]);
    for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

// cp.async lands when a wait retires its group: before, its destination holds poison (NaN bytes);
// wait_group 1 retires all but the newest group; an invalid copy writes zeros. One thread; the
// last 8 values are never a destination and keep 1.0.
extern "C" __global__ void cp_async_groups(const T* src, T* out) {
    __shared__ __align__(16) T buf[32];
    for (int e = 0; e < 32; ++e) buf[e] = from_f32(1.0f);
    cp_async16(&buf[0], src, true);
    cp_async_commit();
    cp_async16(&buf[8], src + 8, true);
    cp_async16(&buf[16], src + 16, false);
    cp_async_commit();
    for (int e = 0; e < 32; ++e) out[e] = buf[e];
    cp_async_wait<1>();
    for (int e = 0; e < 32; ++e) out[32 + e] = buf[e];
    cp_async_wait<0>();
    for (int e = 0; e < 32; ++e) out[64 + e] = buf[e];
}

extern "C" __global__ void sync_in_divergent_code(float* x) {
    if (threadIdx.x < 16) __syncthreads();
    else x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

extern "C" __global__ void shuffle_after_a_lane_exited(float* x) {
    if (threadIdx.x == 3) return;
    x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

extern "C" __global__ void write_one_past(float* x, int n) {
    if (threadIdx.x == 0) x[n] = 1.0f;
}

extern "C" __global__ void read_one_past(const float* x, float* y, int n) {
    if (threadIdx.x == 0) y[0] = x[n];
}
"#;

fn self_test_device() -> Option<emu::EmuDevice> {
    if !have_compiler() {
        return None;
    }
    let entries = [
        "reverse_and_warp_sums",
        "mma_tile",
        "ldsm_tile",
        "cp_async_groups",
        "sync_in_divergent_code",
        "shuffle_after_a_lane_exited",
        "write_one_past",
        "read_one_past",
    ];
    Some(
        emu::EmuDevice::custom(Storage::Bf16, SELF_TEST, &entries)
            .unwrap_or_else(|e| panic!("{e:#}")),
    )
}

/// Shared memory, __syncthreads and warp shuffles give what a GPU gives, block by block.
#[test]
fn emulator_runs_blocks_barriers_and_shuffles() {
    let Some(dev) = self_test_device() else {
        return;
    };
    let mut rng = gpu::Rng(7);
    let x = rng.vec(3 * 128, 1.0);
    let (_xm, xp) = dev.upload_f32(&x);
    let (_ym, yp) = dev.upload_f32(&[f32::NAN; 3 * 128]);
    let (_sm, sp) = dev.upload_f32(&[f32::NAN; 12]);
    // SAFETY: x and y hold 3 × 128 values, sums 12.
    unsafe {
        dev.run(
            "reverse_and_warp_sums",
            (3, 1, 1),
            128,
            &[Arg::Ptr(xp), Arg::Ptr(yp), Arg::Ptr(sp)],
        )
    }
    .unwrap();
    let y = dev.read_f32(yp, 3 * 128);
    for b in 0..3 {
        for i in 0..128 {
            assert_eq!(y[b * 128 + i], x[b * 128 + 127 - i], "block {b} thread {i}");
        }
    }
    let sums = dev.read_f32(sp, 12);
    for (w, s) in sums.iter().enumerate() {
        let want: f64 = x[w * 32..][..32].iter().map(|&v| v as f64).sum();
        assert!((*s as f64 - want).abs() < 1e-5, "warp {w}: {s} vs {want}");
    }
}

/// mma.sync against a plain matrix product: C + A·B for random bf16 tiles.
#[test]
fn emulator_mma_is_a_matrix_product() {
    let Some(dev) = self_test_device() else {
        return;
    };
    let mut rng = gpu::Rng(11);
    let round = |v: Vec<f32>| Storage::Bf16.decode(&Storage::Bf16.encode(&v));
    let (a, b, c) = (
        round(rng.vec(256, 2.0)),
        round(rng.vec(128, 2.0)),
        rng.vec(128, 1.0),
    );
    let (_am, ap) = dev.upload(&Storage::Bf16.encode(&a), "a").unwrap();
    let (_bm, bp) = dev.upload(&Storage::Bf16.encode(&b), "b").unwrap();
    let (_cm, cp) = dev.upload_f32(&c);
    // SAFETY: a is 16×16, b 16×8 (bf16), c 16×8 (f32).
    unsafe {
        dev.run(
            "mma_tile",
            (1, 1, 1),
            32,
            &[Arg::Ptr(ap), Arg::Ptr(bp), Arg::Ptr(cp)],
        )
    }
    .unwrap();
    let got = dev.read_f32(cp, 128);
    for i in 0..16 {
        for j in 0..8 {
            let want = c[i * 8 + j] as f64
                + (0..16)
                    .map(|k| a[i * 16 + k] as f64 * b[k * 8 + j] as f64)
                    .sum::<f64>();
            let g = got[i * 8 + j] as f64;
            assert!(
                (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "C[{i}][{j}]: {g} vs {want}"
            );
        }
    }
}

/// ldmatrix.x4.trans hands lane l, from tile i, the values at rows 2(l%4) and 2(l%4)+1 of
/// column l/4 (the lower row in the low half).
#[test]
fn emulator_ldmatrix_trans_transposes_each_tile() {
    let Some(dev) = self_test_device() else {
        return;
    };
    let src: Vec<u8> = (0u16..256)
        .flat_map(|v| (v * 7 + 3).to_le_bytes())
        .collect();
    let (_sm, sp) = dev.upload(&src, "tile").unwrap();
    let (_om, op) = dev.upload(&[0u8; 512], "fragments").unwrap();
    // SAFETY: src holds 256 16-bit values, out 128 u32.
    unsafe { dev.run("ldsm_tile", (1, 1, 1), 32, &[Arg::Ptr(sp), Arg::Ptr(op)]) }.unwrap();
    // SAFETY: out holds 512 bytes.
    let out = unsafe { dev.download(op, 512) }.unwrap();
    let value = |row: usize, col: usize| (row * 16 + col) as u32 * 7 + 3;
    for lane in 0..32 {
        for tile in 0..4 {
            let (row, col) = ((tile % 2) * 8 + 2 * (lane % 4), (tile / 2) * 8 + lane / 4);
            let want = value(row, col) | value(row + 1, col) << 16;
            let at = (lane * 4 + tile) * 4;
            let got = u32::from_le_bytes(out[at..at + 4].try_into().unwrap());
            assert_eq!(got, want, "lane {lane} tile {tile}");
        }
    }
}

/// cp.async's destination is poison from the issue until a wait retires its group (so a kernel
/// that reads a tile before waiting, or copies over a tile another warp still reads, gets wrong
/// numbers here, as it may on a GPU), groups retire oldest first, and an invalid copy fills zeros.
#[test]
fn emulator_cp_async_lands_at_the_wait() {
    let Some(dev) = self_test_device() else {
        return;
    };
    let src: Vec<u16> = (0u16..24).map(|v| v * 3 + 1).collect();
    let bytes: Vec<u8> = src.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (_sm, sp) = dev.upload(&bytes, "source").unwrap();
    let (_om, op) = dev.upload(&[0u8; 192], "snapshots").unwrap();
    // SAFETY: src holds 24 16-bit values, out 96.
    unsafe {
        dev.run(
            "cp_async_groups",
            (1, 1, 1),
            1,
            &[Arg::Ptr(sp), Arg::Ptr(op)],
        )
    }
    .unwrap();
    // SAFETY: out holds 192 bytes.
    let out: Vec<u16> = unsafe { dev.download(op, 192) }
        .unwrap()
        .chunks(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    let (one, poison) = (0x3f80, 0xffff); // bf16 1.0, NaN bytes
    assert_eq!(&out[..24], &[poison; 24], "nothing lands before a wait");
    assert_eq!(&out[24..32], &[one; 8], "what no copy targets is untouched");
    assert_eq!(
        &out[32..40],
        &src[..8],
        "wait_group 1 retires the older group"
    );
    assert_eq!(
        &out[40..56],
        &[poison; 16],
        "and leaves the newer in flight"
    );
    assert_eq!(&out[64..80], &src[..16]);
    assert_eq!(&out[80..88], &[0; 8], "an invalid copy writes zeros");
    assert_eq!(&out[88..96], &[one; 8]);
}

/// What would hang or corrupt memory on a GPU fails the launch with a reason.
#[test]
fn emulator_reports_deadlocks_broken_warps_and_overruns() {
    let Some(dev) = self_test_device() else {
        return;
    };
    let (_m, p) = dev.upload_f32(&[0.0; 64]);
    // 63 values: the allocation's last 4 bytes (up to its 16-byte alignment) are canary.
    let (odd_mem, odd) = dev.upload_f32(&[0.0; 63]);
    let run = |name: &str, args: &[Arg]| {
        // SAFETY: the kernels stay within their buffers, except where a test below runs one
        // past the end on purpose: into the canary or onto the inaccessible page after it.
        unsafe { dev.run(name, (1, 1, 1), 64, args) }
            .unwrap_err()
            .to_string()
    };
    let e = run("sync_in_divergent_code", &[Arg::Ptr(p)]);
    assert!(e.contains("deadlock"), "{e}");
    let e = run("shuffle_after_a_lane_exited", &[Arg::Ptr(p)]);
    assert!(e.contains("after some lanes of the warp exited"), "{e}");
    let e = run("write_one_past", &[Arg::Ptr(odd), Arg::I32(63)]);
    assert!(
        e.contains("wrote past the end of test buffer (252 bytes), at byte 252"),
        "{e}"
    );
    let e = run("read_one_past", &[Arg::Ptr(p), Arg::Ptr(odd), Arg::I32(64)]);
    assert!(
        e.contains("memory fault") && e.contains("byte 256 of test buffer (256 bytes)"),
        "{e}"
    );
    let e = run("write_one_past", &[Arg::Ptr(p), Arg::I32(64)]);
    assert!(e.contains("memory fault"), "{e}");
    let e = run("write_one_past", &[Arg::Ptr(p + (1 << 40)), Arg::I32(0)]);
    assert!(e.contains("not in any live allocation"), "{e}");
    // The device still works after a fault (once the buffer with the broken canary is gone).
    drop(odd_mem);
    // SAFETY: p holds 64 values.
    unsafe { dev.run("write_one_past", (1, 1, 1), 64, &[Arg::Ptr(p), Arg::I32(0)]) }.unwrap();
    assert_eq!(dev.read_f32(p, 1), vec![1.0]);
}

/// A checkpoint whose activations overflow f16 (layer 0's FFN weights scaled by 5,000: its
/// outputs pass 65,504) fails on f16 storage with an error that names the way out, and scores on
/// bf16 storage and on the CPU.
#[test]
fn f16_overflow_is_an_error_that_names_the_way_out() {
    if !have_compiler() {
        return;
    }
    let src = common::fixture_model("bert-cls-regression");
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let scaled = "bert.encoder.layer.0.intermediate.dense.weight";
    let tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let mut data = t.data().to_vec();
            if name == scaled {
                for c in data.chunks_exact_mut(4) {
                    let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * 5000.0;
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
            (name, t.dtype(), t.shape().to_vec(), data)
        })
        .collect();
    let views = tensors.iter().map(|(name, dtype, shape, data)| {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap();
        (name.clone(), view)
    });
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();

    let texts = [
        "a short document about overflow",
        "another one, a little longer than that",
    ];
    let cpu = Scorer::load(dir.path(), mira::engine::Device::Cpu).unwrap();
    let ids = cpu.tokenize(&texts).unwrap();
    assert!(cpu.logits_ids(&ids).unwrap().iter().all(|v| v.is_finite()));
    let on = |storage| {
        Scorer::load_on_backend(dir.path(), emu::backend(storage), LoadOptions::default()).unwrap()
    };
    let err = on(Storage::F16).logits_ids(&ids).unwrap_err().to_string();
    assert!(
        err.contains("document 0") && err.contains("rerun with --precision bf16 or f32"),
        "{err}"
    );
    let bf16 = on(Storage::Bf16).logits_ids(&ids).unwrap();
    assert!(bf16.iter().all(|v| v.is_finite()), "{bf16:?}");
}
