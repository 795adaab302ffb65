//! Every wgpu op against the CPU op on fresh random inputs at awkward sizes (not multiples of any
//! tile), in f32 and (where the adapter has SHADER_F16) f16 storage. Outputs start as NaN
//! (`set_poison`), so a value a shader forgets to write fails. Runs on whatever adapter wgpu
//! picks: in CI that is Mesa's lavapipe (`llvmpipe`), a real Vulkan driver. The checks
//! themselves are in `gpu/ops.rs`, shared with the CUDA backend's tests.

mod gpu;

use gpu::{backends, ops};

#[test]
fn linear_every_activation_and_awkward_shape() {
    for (gpu, prec) in backends() {
        ops::linear_every_activation_and_awkward_shape(&gpu, prec);
    }
}

#[test]
fn embed_with_and_without_positions_types_and_bias() {
    for (gpu, prec) in backends() {
        ops::embed_with_and_without_positions_types_and_bias(&gpu, prec);
    }
}

#[test]
fn residual_layernorms_in_every_mode() {
    for (gpu, prec) in backends() {
        ops::residual_layernorms_in_every_mode(&gpu, prec);
    }
}

#[test]
fn varlen_attention_global_and_windowed_at_several_head_sizes() {
    for (gpu, prec) in backends() {
        ops::varlen_attention_global_and_windowed_at_several_head_sizes(&gpu, prec);
    }
}

#[test]
fn rope_at_sequence_positions() {
    for (gpu, prec) in backends() {
        ops::rope_at_sequence_positions(&gpu, prec);
    }
}

#[test]
fn geglu_every_activation() {
    for (gpu, prec) in backends() {
        ops::geglu_every_activation(&gpu, prec);
    }
}

#[test]
fn cls_and_mean_pooling() {
    for (gpu, prec) in backends() {
        ops::cls_and_mean_pooling(&gpu, prec);
    }
}

#[test]
fn malformed_batches_and_shapes_are_errors() {
    for (gpu, prec) in backends() {
        ops::malformed_batches_and_shapes_are_errors(&gpu, prec);
    }
}

#[test]
fn many_single_token_sequences() {
    for (gpu, prec) in backends() {
        ops::many_single_token_sequences(&gpu, prec);
    }
}
