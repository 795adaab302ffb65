//! The scorer's token limits and tokenization: documents truncated at the scorer's limit (or
//! at another one, checked as a load checks it), every id checked against the model.

use std::path::Path;

use anyhow::{bail, Result};

use super::Scorer;
use crate::model::Encoder;

/// That documents of `max_tokens` tokens fit the model's positions and, on a GPU, the most one
/// buffer binds (a batch is split to fit; one document cannot be).
pub(super) fn check_token_limit(
    dir: &Path,
    engines: &[Box<dyn Encoder>],
    max_tokens: usize,
) -> Result<()> {
    let max_pos = engines[0].max_positions();
    if max_tokens > max_pos {
        bail!("max_tokens {max_tokens} exceeds the model's max_position_embeddings {max_pos}");
    }
    for e in engines {
        if let Some(limit) = e.max_batch_tokens().filter(|&l| max_tokens > l) {
            bail!(
                "{}: one document of {max_tokens} tokens needs more memory in one buffer than \
                 {} binds (at most {limit} tokens); lower --max-tokens",
                dir.display(),
                e.device_name()
            );
        }
    }
    Ok(())
}

impl Scorer {
    pub fn max_tokens(&self) -> usize {
        self.text.max_tokens()
    }

    /// The model's own limit on a document's tokens (`max_position_embeddings`).
    pub fn max_positions(&self) -> usize {
        self.encoder().max_positions()
    }

    /// [`tokenize`](Self::tokenize) truncating at `max_tokens` instead of the scorer's own limit
    /// (checked against the model and the device as a load would).
    pub fn tokenize_at<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        max_tokens: usize,
    ) -> Result<Vec<Vec<u32>>> {
        use rayon::prelude::*;
        if max_tokens == self.max_tokens() {
            return self.tokenize(texts);
        }
        check_token_limit(&self.dir, &self.engines, max_tokens)?;
        let text = self.text.with_max_tokens(max_tokens)?;
        texts
            .par_iter()
            .map(|t| self.checked_ids(text.encode(t.as_ref())?))
            .collect()
    }

    /// Token ids of each text (truncated, special tokens included), tokenized in parallel.
    /// Fails on the first text the model cannot take (see [`tokenize_one`](Self::tokenize_one)).
    pub fn tokenize<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        use rayon::prelude::*;
        texts
            .par_iter()
            .map(|t| self.tokenize_one(t.as_ref()))
            .collect()
    }

    /// Token ids of one text, checked against the model: at least one token, every id inside the
    /// model's vocabulary (a tokenizer with added tokens the checkpoint was not resized for fails
    /// here, per record, rather than the whole batch).
    pub fn tokenize_one(&self, text: &str) -> Result<Vec<u32>> {
        self.checked_ids(self.text.encode(text)?)
    }

    fn checked_ids(&self, ids: Vec<u32>) -> Result<Vec<u32>> {
        if ids.is_empty() {
            bail!("the text has no tokens (the tokenizer adds no special tokens)");
        }
        let vocab = self.encoder().vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary of {vocab} (tokenizer and checkpoint disagree)");
        }
        Ok(ids)
    }

    /// [`tokenize_one`](Self::tokenize_one)'s ids and the whole text's token count
    /// ([`count_tokens`](Self::count_tokens)) from one tokenizer pass where the text allows.
    pub fn tokenize_counting(&self, text: &str) -> Result<(Vec<u32>, usize)> {
        let (ids, count) = self.text.encode_counting(text)?;
        Ok((self.checked_ids(ids)?, count))
    }

    /// Size of the tokenizer's vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.text.vocab_size()
    }
}
