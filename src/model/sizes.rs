//! The sizes every encoder's config has, checked in one place before anything is allocated.

use anyhow::{bail, Result};

use super::config::{MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB};
use crate::checked;

/// The sizes every encoder has, as `config.json` gives them.
pub(crate) struct EncoderSizes {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub positions: usize,
}

impl EncoderSizes {
    /// Checked before anything is allocated: each size (and each of the architecture's `extra`
    /// ones) at least 1 and below a bound far above any real encoder, so a damaged config is an
    /// error naming the field, never an allocation of exabytes or an index into an empty table;
    /// and the width splits evenly into the heads.
    pub(crate) fn check(&self, extra: &[(&str, usize, usize)]) -> Result<()> {
        let common = [
            ("vocab_size", self.vocab, MAX_VOCAB),
            ("hidden_size", self.hidden, MAX_HIDDEN),
            ("intermediate_size", self.intermediate, MAX_INTERMEDIATE),
            ("num_hidden_layers", self.layers, MAX_LAYERS),
            ("num_attention_heads", self.heads, MAX_HIDDEN),
            ("max_position_embeddings", self.positions, MAX_POSITIONS),
        ];
        for &(name, value, max) in common.iter().chain(extra) {
            checked::count(name, value, 1, max)?;
        }
        if !self.hidden.is_multiple_of(self.heads) {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden,
                self.heads
            );
        }
        Ok(())
    }
}
