//! The CPU backend's tensor: a row-major f32 matrix in host memory (a weight stored in f32 is read
//! in place from the mapped checkpoint, `HostF32`), or a linear layer's weight held only in the
//! packed form of its low-precision GEMM (`int8_linear.rs`, `bf16.rs`).

use std::borrow::Cow;
use std::sync::Arc;

use super::{bf16, int8_linear};
use crate::engine::HostF32;

/// A row-major f32 matrix in host memory. Fields are private to the CPU backend so that
/// `data.len() == rows * cols` holds for every tensor but a packed linear weight, whose `data` is
/// empty; the unsafe GEMM calls check it.
#[derive(Debug, Clone)]
pub struct CpuTensor {
    pub(super) data: HostF32,
    pub(super) rows: usize,
    pub(super) cols: usize,
    /// For a linear layer's weight under `--precision int8` or `bf16` (with a bf16 kernel): its
    /// values, packed for that GEMM and held there alone (bf16: rounded; int8: the f32 weight
    /// until it is quantized, on first use after calibration). `data` is empty then.
    pub(super) packed: Option<Arc<PackedLinear>>,
}

/// Tensors are equal when their values are.
impl PartialEq for CpuTensor {
    fn eq(&self, other: &CpuTensor) -> bool {
        (self.rows, self.cols) == (other.rows, other.cols) && self.values() == other.values()
    }
}

/// A linear layer's weight packed for a GEMM other than f32's.
#[derive(Debug)]
pub(super) enum PackedLinear {
    Int8(int8_linear::Int8Linear),
    Bf16(bf16::PackedWeight),
}

impl CpuTensor {
    pub(super) fn new(data: impl Into<HostF32>, rows: usize, cols: usize) -> CpuTensor {
        let data = data.into();
        assert_eq!(
            data.len(),
            rows * cols,
            "tensor data does not match its shape"
        );
        CpuTensor {
            data,
            rows,
            cols,
            packed: None,
        }
    }

    /// A packed linear weight (`packed`) built from `data`; its values live only there.
    pub(super) fn packed_linear(packed: PackedLinear, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor {
            data: Vec::new().into(),
            rows,
            cols,
            packed: Some(Arc::new(packed)),
        }
    }

    /// The values, row-major. Panics for a linear weight packed for int8 or bf16, whose values
    /// live only in its packed form: read those with [`Backend::download`].
    pub fn data(&self) -> &[f32] {
        assert!(
            self.data.len() == self.rows * self.cols,
            "a {}x{} linear weight packed for a low-precision GEMM holds no f32 values: \
             read them with Backend::download",
            self.rows,
            self.cols
        );
        &self.data
    }

    /// The values, row-major, unpacked where needed.
    pub(super) fn values(&self) -> Cow<'_, [f32]> {
        match self.packed.as_deref() {
            None => Cow::Borrowed(&self.data),
            Some(PackedLinear::Int8(layer)) => layer.values().into(),
            Some(PackedLinear::Bf16(w)) => w.values().into(),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}
