//! Whole models on the CUDA backend against the CPU backend (bf16, f16 and f32 storage):
//! all-MiniLM-L6-v2 and the random-weight BERT and ModernBERT checkpoints of tests/fixtures,
//! with the tolerances of `gpu/model.rs`. Needs a GPU: those tests are `#[ignore]`d (CI reports
//! them as ignored) and fail without a usable CUDA device when run (`--include-ignored`, as
//! benches/gpu/run.sh does).

mod common;
mod gpu;
#[macro_use]
#[path = "gpu/model.rs"]
mod model_check;

use common::minilm_dir;
use gpu::{require_cuda, Prec};
use mira::engine::{Device, Precision};

fn check(dir: &std::path::Path, golden_name: &str) {
    require_cuda();
    let precisions = [
        (Precision::Bf16, Prec::Bf16),
        (Precision::F16, Prec::F16),
        (Precision::F32, Prec::F32),
    ];
    model_check::check(dir, golden_name, Device::Cuda(Some(0)), &precisions);
}

model_tests!(check, #[ignore = "needs an NVIDIA GPU: benches/gpu/run.sh runs it with --include-ignored"]);

/// CUDA graphs on the GPU: replays equal the ops run one by one (see `gpu/model.rs`).
#[test]
#[ignore = "needs an NVIDIA GPU: benches/gpu/run.sh runs it with --include-ignored"]
fn graphs_replay_what_the_ops_compute() {
    require_cuda();
    for name in ["bert-cls-regression", "modernbert-cls-biased"] {
        model_check::check_graphs(&common::fixture_model(name), name, || {
            let be = mira::engine::backend::cuda::CudaBackend::new(0, Precision::F16)
                .unwrap_or_else(|e| panic!("{e:#}"));
            be.set_poison(true);
            be
        });
    }
}

/// Without a usable CUDA device, `--device cuda` is a clear error and `auto` falls back (and
/// says so); with one, `auto` picks it.
#[test]
fn device_choice_without_and_with_cuda() {
    let usable = mira::engine::backend::cuda::device::unavailable_reason(None).is_none();
    let (chosen, note) = mira::engine::resolve(Device::Auto).unwrap();
    let note = note.unwrap();
    if usable {
        assert_eq!(chosen, Device::Cuda(None), "{note}");
        assert!(note.contains("chose cuda"), "{note}");
    } else {
        assert!(matches!(chosen, Device::Cpu | Device::Wgpu(None)), "{note}");
        assert!(note.contains("no usable CUDA device"), "{note}");
        let err = mira::Scorer::load(minilm_dir(), Device::Cuda(None))
            .err()
            .expect("cuda without a device must fail")
            .to_string();
        assert!(err.contains("device 'cuda' is not available"), "{err}");
    }
}
