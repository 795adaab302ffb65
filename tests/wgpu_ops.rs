//! Every wgpu op against the CPU op on fresh random inputs at awkward sizes (not multiples of any
//! tile), in f32 and (where the adapter has SHADER_F16) f16 storage. Outputs start as NaN
//! (`set_poison`), so a value a shader forgets to write fails. Runs on whatever adapter wgpu
//! picks: in CI that is Mesa's lavapipe (`llvmpipe`), a real Vulkan driver. The checks
//! themselves are in `gpu/ops.rs`, shared with the CUDA backend's tests; which run is the op
//! table's (`op_table/mod.rs`).

mod gpu;
mod op_table;

use gpu::{backends, ops};

macro_rules! wgpu_against_cpu {
    ($op:ident, [$($vs_cpu:ident),*], [$($vs_f64:ident),*]) => {
        #[test]
        fn $op() {
            for (gpu, prec) in backends() {
                $(ops::$vs_cpu(&gpu, prec);)*
            }
        }
    };
}

op_table::every_op!(wgpu_against_cpu);
