//! An int8 linear layer's life on the CPU backend: its f32 weight, the largest input per channel
//! seen while the backend calibrates, and the packed int8 weight, built on first use after that
//! with SmoothQuant-style smoothing from those statistics. Packing frees the f32 weight (or lets go
//! of the mapped checkpoint's values it read in place): an int8 model then holds its linear layers
//! at about a quarter of their f32 size.
//!
//! Smoothing moves the spread of the activations' channels into the weight: input channel `j` is
//! divided by `f_j` and the weight's column `j` multiplied by it, which leaves the product
//! unchanged and evens out the channels that share an 8-bit activation group. `f_j =
//! sqrt(max|x_j| / max|w_j|)` (SmoothQuant's alpha 0.5). On all-MiniLM-L6-v2 over the sample
//! corpus it lifted int8's embedding cosine min from 0.99944 to 0.99959 (fake quantization,
//! `benches/reference/int8_fake_quant.py`: 0.99946 to 0.99966). Factors rounded to powers of two
//! (exact scalings) reached only 0.99946: MiniLM's factors span 2-8, too few steps. A layer never
//! calibrated (a model built straight on the backend) quantizes without smoothing.

use std::sync::{Mutex, OnceLock, RwLock};

use super::int8;
use crate::engine::HostF32;

/// The largest smoothing factor either way; a channel that calibration never saw non-zero keeps
/// factor 1.
const MAX_FACTOR: f32 = 4096.0;

#[derive(Debug)]
pub struct Int8Linear {
    n: usize,
    k: usize,
    /// The f32 weight `[n, k]` until it is packed (calibration computes with it), then `None`.
    weight: RwLock<Option<HostF32>>,
    /// Per input channel, the largest `|x|` seen while calibrating.
    input_max: Mutex<Vec<f32>>,
    packed: OnceLock<int8::PackedWeight>,
}

impl Int8Linear {
    /// A layer for the f32 weight `w` (`[n, k]`, row-major; owned, or read in place from the
    /// mapped checkpoint until it is packed).
    pub fn new(w: impl Into<HostF32>, n: usize, k: usize) -> Int8Linear {
        let w = w.into();
        assert_eq!(w.len(), n * k, "weight data does not match its shape");
        Int8Linear {
            n,
            k,
            weight: RwLock::new(Some(w)),
            input_max: Mutex::new(vec![0.0; k]),
            packed: OnceLock::new(),
        }
    }

    /// Record the largest magnitude of each input channel of `x` (`[m, k]`); NaN is ignored.
    pub fn observe(&self, x: &[f32]) {
        let mut max = self.input_max.lock().unwrap_or_else(|e| e.into_inner());
        column_abs_max(&mut max, x, self.k);
    }

    /// `f(w)` on the f32 weight while the layer still holds it (before it is packed).
    pub fn with_f32<R>(&self, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
        let weight = self.weight.read().unwrap_or_else(|e| e.into_inner());
        weight.as_deref().map(f)
    }

    /// The packed weight, quantized on first use with the smoothing the statistics so far give;
    /// the f32 weight is dropped then.
    pub fn packed(&self) -> &int8::PackedWeight {
        self.packed.get_or_init(|| {
            let mut weight = self.weight.write().unwrap_or_else(|e| e.into_inner());
            let w = weight
                .take()
                .expect("an int8 layer holds its f32 weight until it is packed");
            let input_max = self.input_max.lock().unwrap_or_else(|e| e.into_inner());
            let factor = smoothing(&input_max, &w, self.k);
            int8::PackedWeight::quantize_smoothed(&w, self.n, self.k, &factor)
        })
    }

    /// The weight's values, `[n, k]` row-major: the f32 weight before packing, the dequantized
    /// one after.
    pub fn values(&self) -> Vec<f32> {
        self.with_f32(|w| w.to_vec())
            .unwrap_or_else(|| self.packed().dequantize())
    }
}

/// The factor of each input channel: `sqrt(max|x_j| / max|w_j|)` within `1/4096..=4096`; 1
/// where either maximum is 0 or not finite.
pub fn smoothing(input_max: &[f32], w: &[f32], k: usize) -> Vec<f32> {
    let mut w_max = vec![0f32; k];
    column_abs_max(&mut w_max, w, k);
    input_max
        .iter()
        .zip(&w_max)
        .map(|(&x, &w)| {
            let ratio = (x / w).sqrt();
            if x > 0.0 && w > 0.0 && ratio.is_finite() {
                ratio.clamp(1.0 / MAX_FACTOR, MAX_FACTOR)
            } else {
                1.0
            }
        })
        .collect()
}

/// Raise `max[j]` to the largest `|v|` in column `j` of `data` (`[rows, k]`); NaN is ignored.
fn column_abs_max(max: &mut [f32], data: &[f32], k: usize) {
    for row in data.chunks_exact(k) {
        for (m, v) in max.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
}
