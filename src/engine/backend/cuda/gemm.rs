//! `act(X·Wᵀ + b)` through cuBLASLt, bf16/f16 (or f32) storage with f32 accumulation.
//!
//! The trick is the layout: our tensors are row-major and cuBLASLt is column-major. A row-major
//! `Y[m, n]` is a column-major `[n, m]` matrix, so we ask for `Yᶜ = W · Xᵀ`: A = W (row-major
//! `[n, k]` = column-major `[k, n]`, transposed), B = X (row-major `[m, k]` = column-major
//! `[k, m]`, as is). The bias then runs along cuBLASLt's rows, which is what its BIAS epilogue
//! broadcasts, so bias and activation fuse into the GEMM.
//!
//! cuBLASLt's GELU epilogue is the tanh form: it serves `gelu_new`-style checkpoints; exact erf
//! GELU, SiLU and tanh run in our `bias_act` kernel after the GEMM (`Epilogue::leftover`).
//!
//! Descriptors and layouts are cached per (m, n, k, epilogue). The algorithm is chosen once per
//! (n, k, epilogue): the heuristic's best without split-K for a batch of `REFERENCE_TOKENS`
//! tokens, then used for every m it supports, so each output is summed in the same order
//! whatever the batch around its document (batched = single, exactly; letting the heuristic pick
//! per m gave differences of ~1e-6 in f32 on an H200, where m selects another kernel).

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::kernels::Storage;
use crate::engine::Activation;

/// What cuBLASLt fuses after the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Epilogue {
    Default,
    Bias,
    Relu,
    ReluBias,
    /// tanh-form GELU.
    GeluTanh,
    GeluTanhBias,
}

impl Epilogue {
    /// The epilogue for `act` with or without a bias, and the activation our own kernel must
    /// still apply (`None` when cuBLASLt does everything).
    pub fn plan(act: Activation, bias: bool) -> (Epilogue, Option<Activation>) {
        let plain = if bias {
            Epilogue::Bias
        } else {
            Epilogue::Default
        };
        match act {
            Activation::None => (plain, None),
            Activation::Relu if bias => (Epilogue::ReluBias, None),
            Activation::Relu => (Epilogue::Relu, None),
            Activation::GeluTanh if bias => (Epilogue::GeluTanhBias, None),
            Activation::GeluTanh => (Epilogue::GeluTanh, None),
            Activation::Gelu | Activation::Silu | Activation::Tanh => (plain, Some(act)),
        }
    }

    fn raw(self) -> sys::cublasLtEpilogue_t {
        use sys::cublasLtEpilogue_t::*;
        match self {
            Epilogue::Default => CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias => CUBLASLT_EPILOGUE_BIAS,
            Epilogue::Relu => CUBLASLT_EPILOGUE_RELU,
            Epilogue::ReluBias => CUBLASLT_EPILOGUE_RELU_BIAS,
            Epilogue::GeluTanh => CUBLASLT_EPILOGUE_GELU,
            Epilogue::GeluTanhBias => CUBLASLT_EPILOGUE_GELU_BIAS,
        }
    }

    fn has_bias(self) -> bool {
        matches!(
            self,
            Epilogue::Bias | Epilogue::ReluBias | Epilogue::GeluTanhBias
        )
    }
}

/// The column-major problem cuBLASLt solves for row-major `Y[m, n] = X[m, k] · W[n, k]ᵀ`:
/// `(M, N, K, lda, ldb, ldc)` with A = W transposed, B = X as is.
pub fn column_major_problem(m: usize, n: usize, k: usize) -> (u64, u64, u64, i64, i64, i64) {
    (n as u64, m as u64, k as u64, k as i64, k as i64, n as i64)
}

/// The batch size (tokens, GEMM rows) whose algorithm every batch of the same (n, k, epilogue)
/// uses where it can: a typical throughput batch, so large batches get the kernel the heuristic
/// would give them.
const REFERENCE_TOKENS: usize = 16384;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    m: usize,
    n: usize,
    k: usize,
    epilogue: Epilogue,
}

/// Descriptors and the chosen algorithm for one problem shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each non-null handle was created by cuBLASLt for this plan and is destroyed
        // once (a plan whose construction failed half-way has null handles left).
        unsafe {
            for layout in [self.a, self.b, self.c] {
                if !layout.is_null() {
                    let _ = result::destroy_matrix_layout(layout);
                }
            }
            if !self.desc.is_null() {
                let _ = result::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// Shapes beyond this many cached plans clear the cache (batch sizes vary run to run).
const MAX_PLANS: usize = 1024;

/// A cuBLASLt handle, its workspace and the plan cache. Products go on the stream each call
/// names: the compute stream, or the capture stream while a graph is recorded (whose launches
/// go on the compute stream, so the one workspace is never used twice at once).
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    data_type: sys::cudaDataType,
    plans: Mutex<HashMap<PlanKey, Plan>>,
    /// The algorithm per (n, k, epilogue), from the heuristic at m = REFERENCE_TOKENS (None:
    /// it offered none without split-K).
    algorithms: Mutex<HashMap<(usize, usize, Epilogue), Option<sys::cublasLtMatmulAlgo_t>>>,
}

// SAFETY: the handle and plan descriptors are only used under the `plans` mutex or by the
// owner's single stream; cuBLASLt handles may be shared between threads when calls do not race.
unsafe impl Send for Gemm {}
// SAFETY: as above.
unsafe impl Sync for Gemm {}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.plans.lock().unwrap().clear();
        // SAFETY: created in `new`, destroyed once, after its plans.
        unsafe {
            let _ = result::destroy_handle(self.handle);
        }
    }
}

fn err(what: &str) -> impl Fn(result::CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuBLASLt {what}: {e:?}")
}

impl Gemm {
    /// `hopper`: 32 MiB of workspace (NVIDIA's advice for sm_90), 4 MiB otherwise.
    pub fn new(stream: &Arc<CudaStream>, storage: Storage, hopper: bool) -> Result<Gemm> {
        let handle = result::create_handle().map_err(err("create handle"))?;
        let size = if hopper { 32 << 20 } else { 4 << 20 };
        // SAFETY: the workspace's contents are cuBLASLt's scratch; nothing reads them.
        let workspace = unsafe { stream.alloc::<u8>(size) }
            .map_err(|e| anyhow!("cannot allocate the cuBLASLt workspace: {e:?}"))?;
        let data_type = match storage {
            Storage::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            Storage::F16 => sys::cudaDataType::CUDA_R_16F,
            Storage::F32 => sys::cudaDataType::CUDA_R_32F,
        };
        Ok(Gemm {
            handle,
            workspace,
            data_type,
            plans: Mutex::new(HashMap::new()),
            algorithms: Mutex::new(HashMap::new()),
        })
    }

    fn plan(&self, key: PlanKey) -> Result<Plan> {
        let mut plan = self.describe(key)?;
        plan.algo = self.algorithm(key, &plan)?;
        Ok(plan)
    }

    /// The shared algorithm of `key`'s (n, k, epilogue) where it supports `key.m` (see the
    /// module doc); otherwise the heuristic's choice for this shape, first without split-K (its
    /// partial sums change the order with the shape), then any.
    fn algorithm(&self, key: PlanKey, plan: &Plan) -> Result<sys::cublasLtMatmulAlgo_t> {
        let shared = {
            let mut algorithms = self.algorithms.lock().unwrap();
            match algorithms.get(&(key.n, key.k, key.epilogue)) {
                Some(a) => *a,
                None => {
                    let reference = self.describe(PlanKey {
                        m: REFERENCE_TOKENS,
                        ..key
                    })?;
                    let a = self.heuristic(&reference, true).ok().map(|r| r.algo);
                    algorithms.insert((key.n, key.k, key.epilogue), a);
                    a
                }
            }
        };
        if let Some(algo) = shared.filter(|a| self.supports(plan, a)) {
            return Ok(algo);
        }
        self.heuristic(plan, true)
            .or_else(|_| self.heuristic(plan, false))
            .map(|r| r.algo)
            .map_err(|e| {
                anyhow!(
                    "cuBLASLt has no algorithm for [{}, {}] x [{}, {}]ᵀ with {:?}: {e:?}",
                    key.m,
                    key.k,
                    key.n,
                    key.k,
                    key.epilogue
                )
            })
    }

    /// Whether `algo` runs `plan`'s problem within our workspace.
    fn supports(&self, plan: &Plan, algo: &sys::cublasLtMatmulAlgo_t) -> bool {
        // SAFETY: plain old data, filled by the check.
        let mut checked: sys::cublasLtMatmulHeuristicResult_t = unsafe { mem::zeroed() };
        // SAFETY: the handle and the plan's descriptors are live; `checked` is writable.
        let status = unsafe {
            sys::cublasLtMatmulAlgoCheck(
                self.handle,
                plan.desc,
                plan.a,
                plan.b,
                plan.c,
                plan.c,
                algo,
                &mut checked,
            )
        };
        status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            && checked.workspaceSize <= self.workspace.len()
    }

    /// The descriptors and layouts of `key`'s problem (the algorithm still to choose).
    fn describe(&self, key: PlanKey) -> Result<Plan> {
        let (mm, nn, kk, lda, ldb, ldc) = column_major_problem(key.m, key.n, key.k);
        let dt = self.data_type;
        // The plan owns each handle as soon as it exists, so an error below frees them all.
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            // SAFETY: plain old data, overwritten by the chosen algorithm in `plan`.
            algo: unsafe { mem::zeroed() },
        };
        plan.desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(err("create matmul descriptor"))?;
        let desc = plan.desc;
        let set = |attr: sys::cublasLtMatmulDescAttributes_t, value: *const c_void, size| {
            // SAFETY: `value` points at a live value of the attribute's documented type.
            unsafe { result::set_matmul_desc_attribute(desc, attr, value, size) }
        };
        let trans_a: i32 = 1; // CUBLAS_OP_T
        let trans_b: i32 = 0; // CUBLAS_OP_N
        let epilogue = key.epilogue.raw();
        use sys::cublasLtMatmulDescAttributes_t::*;
        set(
            CUBLASLT_MATMUL_DESC_TRANSA,
            &trans_a as *const i32 as _,
            mem::size_of::<i32>(),
        )
        .and_then(|_| {
            set(
                CUBLASLT_MATMUL_DESC_TRANSB,
                &trans_b as *const i32 as _,
                mem::size_of::<i32>(),
            )
        })
        .and_then(|_| {
            set(
                CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue as *const _ as _,
                mem::size_of::<sys::cublasLtEpilogue_t>(),
            )
        })
        .map_err(err("set matmul attributes"))?;
        let layout = |rows: u64, cols: u64, ld: i64| {
            result::create_matrix_layout(dt, rows, cols, ld).map_err(err("create layout"))
        };
        plan.a = layout(kk, mm, lda)?;
        plan.b = layout(kk, nn, ldb)?;
        plan.c = layout(mm, nn, ldc)?;
        Ok(plan)
    }

    /// The heuristic's best algorithm for `plan` within our workspace, with or without split-K
    /// reductions.
    fn heuristic(
        &self,
        plan: &Plan,
        no_split_k: bool,
    ) -> Result<sys::cublasLtMatmulHeuristicResult_t, result::CublasError> {
        let pref = result::create_matmul_pref()?;
        let ws = self.workspace.len();
        let none = sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_NONE as u32;
        use sys::cublasLtMatmulPreferenceAttributes_t as Attr;
        // SAFETY: the preference handle is live; the values are a usize and a u32 as
        // documented for these attributes.
        let chosen = unsafe {
            result::set_matmul_pref_attribute(
                pref,
                Attr::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as _,
                mem::size_of::<usize>(),
            )
            .and_then(|_| {
                if !no_split_k {
                    return Ok(());
                }
                result::set_matmul_pref_attribute(
                    pref,
                    Attr::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                    &none as *const u32 as _,
                    mem::size_of::<u32>(),
                )
            })
            .and_then(|_| {
                result::get_matmul_algo_heuristic(
                    self.handle,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.c,
                    plan.c,
                    pref,
                )
            })
        };
        // SAFETY: created above, used only here.
        let _ = unsafe { result::destroy_matmul_pref(pref) };
        chosen
    }

    /// `out[m, n] = epilogue(x[m, k] · w[n, k]ᵀ + bias)`, enqueued on `stream`.
    /// `bias` must be given exactly when the epilogue has one.
    ///
    /// # Safety
    /// The pointers must address device buffers of at least `m·k`, `n·k`, `m·n` and `n`
    /// elements of the storage type, alive until the stream has run the product.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        &self,
        stream: &CudaStream,
        x: u64,
        w: u64,
        bias: Option<u64>,
        out: u64,
        (m, n, k): (usize, usize, usize),
        epilogue: Epilogue,
    ) -> Result<()> {
        debug_assert_eq!(bias.is_some(), epilogue.has_bias());
        let key = PlanKey { m, n, k, epilogue };
        let mut plans = self.plans.lock().unwrap();
        if !plans.contains_key(&key) {
            if plans.len() >= MAX_PLANS {
                plans.clear();
            }
            let plan = self.plan(key)?;
            plans.insert(key, plan);
        }
        let plan = &plans[&key];
        if let Some(b) = bias {
            result::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &b as *const u64 as _,
                mem::size_of::<u64>(),
            )
            .map_err(err("set bias"))?;
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (ws, _sync) = self.workspace.device_ptr(stream);
        result::matmul(
            self.handle,
            plan.desc,
            &alpha as *const f32 as _,
            &beta as *const f32 as _,
            w as *const c_void,
            plan.a,
            x as *const c_void,
            plan.b,
            out as *const c_void,
            plan.c,
            out as *mut c_void,
            plan.c,
            &plan.algo,
            ws as *mut c_void,
            self.workspace.len(),
            stream.cu_stream() as _,
        )
        .map_err(|e| anyhow!("cuBLASLt matmul [{m}, {k}] x [{n}, {k}]ᵀ failed: {e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_gelu_is_never_left_to_cublaslt() {
        for bias in [false, true] {
            let (e, left) = Epilogue::plan(Activation::Gelu, bias);
            assert_eq!(left, Some(Activation::Gelu));
            assert!(!matches!(e, Epilogue::GeluTanh | Epilogue::GeluTanhBias));
            assert_eq!(e.has_bias(), bias);
            for act in [Activation::Silu, Activation::Tanh] {
                assert_eq!(Epilogue::plan(act, bias).1, Some(act));
            }
            for act in [Activation::None, Activation::Relu, Activation::GeluTanh] {
                let (e, left) = Epilogue::plan(act, bias);
                assert_eq!(left, None, "{act:?}");
                assert_eq!(e.has_bias(), bias, "{act:?}");
            }
        }
        assert_eq!(
            Epilogue::plan(Activation::GeluTanh, true).0,
            Epilogue::GeluTanhBias
        );
    }

    /// The column-major problem, played out on the host: a naive column-major GEMM over the
    /// same memory with the same leading dimensions must give the row-major X·Wᵀ.
    #[test]
    fn column_major_problem_computes_row_major_x_wt() {
        let (m, n, k) = (3, 5, 4);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.91).cos()).collect();
        let (mm, nn, kk, lda, ldb, ldc) = column_major_problem(m, n, k);
        let (mm, nn, kk) = (mm as usize, nn as usize, kk as usize);
        // D[i, j] (column-major, ld = ldc) = sum_p op(A)[i, p] · B[p, j], op(A) = Aᵀ where A is
        // column-major [K, M] with ld = lda, B column-major [K, N] with ld = ldb.
        let mut d = vec![0f32; mm * nn];
        for j in 0..nn {
            for i in 0..mm {
                let mut s = 0.0;
                for p in 0..kk {
                    s += w[i * lda as usize + p] * x[j * ldb as usize + p];
                }
                d[j * ldc as usize + i] = s;
            }
        }
        for r in 0..m {
            for c in 0..n {
                let want: f32 = (0..k).map(|p| x[r * k + p] * w[c * k + p]).sum();
                assert!((d[r * n + c] - want).abs() < 1e-6, "({r}, {c})");
            }
        }
    }
}
