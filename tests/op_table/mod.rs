//! The op table: every encoder op once, with its checks. Each row is
//! `op_name, [checks of a backend against the CPU backend], [checks of the CPU against float64]`;
//! the first are `gpu/ops.rs` functions generic over the backend, the second `cpu_ops.rs`
//! functions. Each backend's test file runs every row with one line (`every_op!(its_macro)`,
//! one `#[test]` per op), so a new op is one row here and every backend checks it; a new backend
//! is one file with one such line.
//!
//! Shapes are awkward on purpose (not multiples of any tile or workgroup), inputs random, and
//! outputs poisoned with NaN before an op writes them. Tolerances are per storage precision
//! ([`super::gpu::Prec`]: per element relative to `1 + |reference|`, and a cosine floor) for
//! backend against CPU, and per op in `cpu_ops.rs` for CPU against float64.

/// Expands `$case!(op, [vs_cpu...], [vs_f64...])` for every op.
macro_rules! every_op {
    ($case:ident) => {
        $case!(
            linear,
            [linear_every_activation_and_awkward_shape],
            [linear_with_bias_and_every_activation]
        );
        // int8 and bf16 GEMMs are the CPU's: a GPU backend stores a linear layer's weight as any
        // other weight.
        $case!(
            packed_linear,
            [linear_weights_are_plain_weights],
            [
                int8_linear_matches_reference,
                int8_kernels_agree_bit_for_bit,
                int8_quantizers_agree_bit_for_bit,
                int8_smoothing_after_calibration,
                bf16_linear_matches_reference
            ]
        );
        $case!(
            embed_and_pool,
            [
                embed_with_and_without_positions_types_and_bias,
                cls_and_mean_pooling
            ],
            [embed_and_pool_match_reference]
        );
        $case!(
            norms,
            [residual_layernorms_in_every_mode],
            [
                add_layernorm_matches_reference,
                add_norm_and_layernorm_match_reference
            ]
        );
        $case!(
            attention,
            [varlen_attention_global_and_windowed_at_several_head_sizes],
            [varlen_attention_with_and_without_windows]
        );
        $case!(
            disentangled_attention,
            [disentangled_attention_at_every_term_and_range],
            [disentangled_attention_matches_reference]
        );
        $case!(
            rope,
            [rope_at_sequence_positions],
            [rope_rotates_q_and_k_at_sequence_positions]
        );
        $case!(geglu, [geglu_every_activation], [geglu_matches_reference]);
        $case!(
            batches,
            [
                malformed_batches_and_shapes_are_errors,
                many_single_token_sequences
            ],
            [malformed_batches_are_errors_not_ub]
        );
    };
}
pub(crate) use every_op;
