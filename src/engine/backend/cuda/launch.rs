//! Every kernel launch of the CUDA backend as plain data: the entry point, the grid, the block
//! and the arguments in order. The GPU device turns a [`Launch`] into a cudarc launch; the CPU
//! emulation of `kernels/*.cu` in the tests (`tests/cuda_emu.rs`) runs the very same launches over
//! host memory, so what it checks is what the GPU is asked to do.

use super::kernels::{KernelFile, Storage};

/// Queries per attention block (`BQ` in attention.cu, `TC_BQ` in attention_tc.cu).
pub const QUERY_BLOCK: usize = 64;
/// Threads of a row kernel (LayerNorm, pooling; `ROW_THREADS` in common.cuh).
pub const ROW_THREADS: u32 = 256;
/// The widest row a LayerNorm block holds in registers (`ROW_THREADS × ROW_SLOTS`).
pub const MAX_ROW: usize = 4096;
/// The widest row the one-warp-per-row LayerNorm kernels take (`_warp`, 8 rows per block).
pub const WARP_MAX_ROW: usize = 1024;
/// Rows per block of the `_warp` LayerNorm kernels (`ROW_THREADS / 32`).
pub const WARP_ROWS: usize = 8;
/// Threads of attention_tc.cu's blocks (4 warps of 16 queries).
pub const TC_THREADS: u32 = 128;
/// Threads of a grid-stride element-wise kernel.
pub const STRIDE_THREADS: u32 = 256;

/// A kernel entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    EmbedLayerNorm,
    LayerNorm,
    /// One warp per row, for rows of up to [`WARP_MAX_ROW`] values in 16-byte vectors.
    EmbedLayerNormWarp,
    LayerNormWarp,
    BiasAct,
    Geglu,
    Rope,
    Pool,
    /// attention.cu for a head size.
    Attention(usize),
    /// attention_tc.cu for a head size (bf16/f16 storage).
    AttentionTc(usize),
    /// attention.cu's disentangled attention (DeBERTa) for a head size.
    AttentionRel(usize),
}

impl Entry {
    pub fn file(self) -> KernelFile {
        match self {
            Entry::EmbedLayerNorm
            | Entry::LayerNorm
            | Entry::EmbedLayerNormWarp
            | Entry::LayerNormWarp => KernelFile::LayerNorm,
            Entry::BiasAct | Entry::Geglu => KernelFile::Activation,
            Entry::Rope => KernelFile::Rope,
            Entry::Pool => KernelFile::Pool,
            Entry::Attention(_) | Entry::AttentionRel(_) => KernelFile::Attention,
            Entry::AttentionTc(_) => KernelFile::AttentionTc,
        }
    }

    /// The `extern "C"` name in the kernel file.
    pub fn name(self) -> String {
        match self {
            Entry::EmbedLayerNorm => "embed_layernorm".into(),
            Entry::LayerNorm => "layernorm".into(),
            Entry::EmbedLayerNormWarp => "embed_layernorm_warp".into(),
            Entry::LayerNormWarp => "layernorm_warp".into(),
            Entry::BiasAct => "bias_act".into(),
            Entry::Geglu => "geglu".into(),
            Entry::Rope => "rope".into(),
            Entry::Pool => "pool".into(),
            Entry::Attention(d) => format!("attention_d{d}"),
            Entry::AttentionTc(d) => format!("attention_tc_d{d}"),
            Entry::AttentionRel(d) => format!("attention_rel_d{d}"),
        }
    }
}

/// One kernel argument: a device address or a scalar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

/// One kernel launch: `grid` blocks of `block` threads (1-D blocks), no dynamic shared memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub entry: Entry,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub args: Vec<Arg>,
}

/// The attention blocks of a batch: (sequence, first query) for every run of up to
/// [`QUERY_BLOCK`] queries within one sequence.
pub fn attention_blocks(cu_seqlens: &[u32]) -> Vec<u32> {
    super::super::query_blocks(cu_seqlens, QUERY_BLOCK)
}

/// Whether rows of `cols` values of `storage` go to the one-warp-per-row LayerNorm kernels: at
/// most [`WARP_MAX_ROW`] values, a whole number of 16-byte vectors.
pub fn warp_rows(cols: usize, storage: Storage) -> bool {
    cols <= WARP_MAX_ROW && (cols * storage.bytes()).is_multiple_of(16)
}

/// Blocks for a grid-stride kernel over `n` elements, [`STRIDE_THREADS`] each, at most 32 per
/// multiprocessor.
pub fn stride_grid(n: usize, multiprocessors: u32) -> (u32, u32, u32) {
    let most = (multiprocessors.max(1) as usize) * 32;
    (
        n.div_ceil(STRIDE_THREADS as usize).clamp(1, most) as u32,
        1,
        1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_blocks_never_cross_a_sequence() {
        let cu = [0u32, 1, 64, 129, 129, 329];
        let blocks = attention_blocks(&cu);
        let pairs: Vec<(u32, u32)> = blocks.chunks(2).map(|p| (p[0], p[1])).collect();
        assert_eq!(
            pairs,
            vec![
                (0, 0),
                (1, 1),
                (2, 64),
                (2, 128),
                (4, 129),
                (4, 193),
                (4, 257),
                (4, 321)
            ]
        );
        for (s, q0) in pairs {
            let (lo, hi) = (cu[s as usize], cu[s as usize + 1]);
            assert!(q0 >= lo && q0 < hi);
        }
        assert!(attention_blocks(&[0]).is_empty());
    }

    #[test]
    fn entry_names_are_the_files_entry_points() {
        use super::super::kernels::{ATTENTION_HEAD_DIMS, ATTENTION_TC_HEAD_DIMS};
        let mut entries = vec![
            Entry::EmbedLayerNorm,
            Entry::LayerNorm,
            Entry::EmbedLayerNormWarp,
            Entry::LayerNormWarp,
            Entry::BiasAct,
            Entry::Geglu,
            Entry::Rope,
            Entry::Pool,
        ];
        entries.extend(ATTENTION_HEAD_DIMS.map(Entry::Attention));
        entries.extend(ATTENTION_HEAD_DIMS.map(Entry::AttentionRel));
        entries.extend(ATTENTION_TC_HEAD_DIMS.map(Entry::AttentionTc));
        for e in entries {
            assert!(
                e.file().entry_points(Storage::Bf16).contains(&e.name()),
                "{e:?}"
            );
        }
    }
}
