//! Every CUDA op against the CPU op on fresh random inputs at awkward sizes, with bf16, f16 and
//! f32 storage (the checks are `gpu/ops.rs`, shared with wgpu). Outputs start as NaN. Needs a
//! GPU: without one each test prints SKIPPED and passes, unless `MIRA_REQUIRE_CUDA=1`
//! (benches/gpu/run.sh sets it on the GPU machine).

mod gpu;

use gpu::{cuda_backends, ops};

#[test]
fn linear_every_activation_and_awkward_shape() {
    for (gpu, prec) in cuda_backends() {
        ops::linear_every_activation_and_awkward_shape(&gpu, prec);
    }
}

#[test]
fn embed_with_and_without_positions_types_and_bias() {
    for (gpu, prec) in cuda_backends() {
        ops::embed_with_and_without_positions_types_and_bias(&gpu, prec);
    }
}

#[test]
fn residual_layernorms_in_every_mode() {
    for (gpu, prec) in cuda_backends() {
        ops::residual_layernorms_in_every_mode(&gpu, prec);
    }
}

#[test]
fn varlen_attention_global_and_windowed_at_several_head_sizes() {
    for (gpu, prec) in cuda_backends() {
        ops::varlen_attention_global_and_windowed_at_several_head_sizes(&gpu, prec);
    }
}

#[test]
fn rope_at_sequence_positions() {
    for (gpu, prec) in cuda_backends() {
        ops::rope_at_sequence_positions(&gpu, prec);
    }
}

#[test]
fn geglu_every_activation() {
    for (gpu, prec) in cuda_backends() {
        ops::geglu_every_activation(&gpu, prec);
    }
}

#[test]
fn cls_and_mean_pooling() {
    for (gpu, prec) in cuda_backends() {
        ops::cls_and_mean_pooling(&gpu, prec);
    }
}

#[test]
fn malformed_batches_and_shapes_are_errors() {
    for (gpu, prec) in cuda_backends() {
        ops::malformed_batches_and_shapes_are_errors(&gpu, prec);
    }
}

#[test]
fn many_single_token_sequences() {
    for (gpu, prec) in cuda_backends() {
        ops::many_single_token_sequences(&gpu, prec);
    }
}
