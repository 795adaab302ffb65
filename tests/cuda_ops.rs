//! Every CUDA op against the CPU op on fresh random inputs at awkward sizes, with bf16, f16 and
//! f32 storage (the checks are `gpu/ops.rs`, shared with wgpu). Outputs start as NaN. Needs a
//! GPU: each test is `#[ignore]`d, so CI reports it as ignored, not passed; benches/gpu/run.sh
//! runs them with `--include-ignored`, and without a usable CUDA device they fail.

mod gpu;

use gpu::{cuda_backends, ops};

#[test]
#[ignore = "needs an NVIDIA GPU: benches/gpu/run.sh runs it with --include-ignored"]
fn linear_every_activation_and_awkward_shape() {
    for (gpu, prec) in cuda_backends() {
        ops::linear_every_activation_and_awkward_shape(&gpu, prec);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: benches/gpu/run.sh runs it with --include-ignored"]
fn embed_with_and_without_positions_types_and_bias() {
    for (gpu, prec) in cuda_backends() {
        ops::embed_with_and_without_positions_types_and_bias(&gpu, prec);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: benches/gpu/run.sh runs it with --include-ignored"]
fn residual_layernorms_in_every_mode() {
    for (gpu, prec) in cuda_backends() {
        ops::residual_layernorms_in_every_mode(&gpu, prec);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: benches/gpu/run.sh runs it with --include-ignored"]
fn varlen_attention_global_and_windowed_at_several_head_sizes() {
    for (gpu, prec) in cuda_backends() {
        ops::varlen_attention_global_and_windowed_at_several_head_sizes(&gpu, prec);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: benches/gpu/run.sh runs it with --include-ignored"]
fn rope_at_sequence_positions() {
    for (gpu, prec) in cuda_backends() {
        ops::rope_at_sequence_positions(&gpu, prec);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: benches/gpu/run.sh runs it with --include-ignored"]
fn geglu_every_activation() {
    for (gpu, prec) in cuda_backends() {
        ops::geglu_every_activation(&gpu, prec);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: benches/gpu/run.sh runs it with --include-ignored"]
fn cls_and_mean_pooling() {
    for (gpu, prec) in cuda_backends() {
        ops::cls_and_mean_pooling(&gpu, prec);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: benches/gpu/run.sh runs it with --include-ignored"]
fn malformed_batches_and_shapes_are_errors() {
    for (gpu, prec) in cuda_backends() {
        ops::malformed_batches_and_shapes_are_errors(&gpu, prec);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: benches/gpu/run.sh runs it with --include-ignored"]
fn many_single_token_sequences() {
    for (gpu, prec) in cuda_backends() {
        ops::many_single_token_sequences(&gpu, prec);
    }
}
