//! Every CUDA op against the CPU op on fresh random inputs at awkward sizes, with bf16, f16 and
//! f32 storage (the checks are `gpu/ops.rs`, shared with wgpu). Outputs start as NaN. Needs a
//! GPU: each test is `#[ignore]`d, so CI reports it as ignored, not passed; benches/gpu/run.sh
//! runs them with `--include-ignored`, and without a usable CUDA device they fail.

mod gpu;
mod op_table;

use gpu::{cuda_backends, ops};

macro_rules! cuda_against_cpu {
    ($op:ident, [$($vs_cpu:ident),*], [$($vs_f64:ident),*]) => {
        #[test]
        #[ignore = "needs an NVIDIA GPU: benches/gpu/run.sh runs it with --include-ignored"]
        fn $op() {
            for (gpu, prec) in cuda_backends() {
                $(ops::$vs_cpu(&gpu, prec);)*
            }
        }
    };
}

op_table::every_op!(cuda_against_cpu);
