//! The scorer's pooled outputs: embeddings (pooling, then a sentence-transformers `Dense`
//! module and `Normalize` where the checkpoint has them), the `[CLS | mean]` rows and pooler
//! features that `mira distill` and `mira select` fit and apply heads on.

use anyhow::Result;

use super::{DocFailure, Embeddings, Scorer};
use crate::engine::Pooling;

impl Scorer {
    /// Pooled embeddings of each text, as the checkpoint's sentence-transformers modules say
    /// (mean pooling without normalisation when there are none).
    pub fn embed<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Embeddings> {
        self.embed_ids(&self.tokenize(texts)?)
    }

    pub fn embed_ids(&self, ids: &[Vec<u32>]) -> Result<Embeddings> {
        super::strict(self.embed_ids_lenient(ids)?)
    }

    /// [`embed_ids`](Self::embed_ids) with per-document failures, as
    /// [`score_ids_lenient`](Self::score_ids_lenient).
    pub fn embed_ids_lenient(&self, ids: &[Vec<u32>]) -> Result<(Embeddings, Vec<DocFailure>)> {
        let dim = self.embedding_dim();
        let (mut values, failures) = self.pooled_then_dense(ids)?;
        if self.sentence.normalize {
            for row in values.chunks_exact_mut(dim) {
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                row.iter_mut().for_each(|v| *v /= norm);
            }
        }
        Ok((Embeddings { dim, values }, failures))
    }

    /// The pooled vector of each document, then the sentence-transformers `Dense` module when
    /// the checkpoint has one (on the host: one small product per document), `[docs,
    /// embedding_dim]`; documents as [`run_lenient`](Self::run_lenient).
    pub(super) fn pooled_then_dense(
        &self,
        ids: &[Vec<u32>],
    ) -> Result<(Vec<f32>, Vec<DocFailure>)> {
        let h = self.encoder().hidden_size();
        let pooling = self.sentence.pooling;
        let (values, failures) = self.run_lenient(ids, h, |e, b| e.pooled(b, pooling))?;
        Ok(match &self.sentence.dense {
            Some(d) => (
                values
                    .chunks_exact(h)
                    .flat_map(|row| d.apply(row))
                    .collect(),
                failures,
            ),
            None => (values, failures),
        })
    }

    /// `[CLS | mean]` final hidden states of each document (`[docs, 2 · hidden]`), with
    /// per-document failures as [`score_ids_lenient`](Self::score_ids_lenient): every feature a
    /// student's head may read, from one forward pass (`crate::select::features`).
    pub fn cls_and_mean_ids_lenient(
        &self,
        ids: &[Vec<u32>],
    ) -> Result<(Embeddings, Vec<DocFailure>)> {
        let dim = 2 * self.encoder().hidden_size();
        let (values, failures) =
            self.run_lenient(ids, dim, |e, b| e.pooled(b, Pooling::ClsAndMean))?;
        Ok((Embeddings { dim, values }, failures))
    }

    /// What a linear head reads (`[docs, hidden]`): for BERT the pooler output. `mira distill`
    /// fits its regression heads on these, so a student is exactly this encoder plus a
    /// `classifier` layer.
    pub fn features_ids(&self, ids: &[Vec<u32>]) -> Result<Embeddings> {
        let dim = self.encoder().hidden_size();
        let values = self.run(ids, dim, |e, b| e.features(b))?;
        Ok(Embeddings { dim, values })
    }

    /// [`features_ids`](Self::features_ids) with per-document failures, as
    /// [`score_ids_lenient`](Self::score_ids_lenient).
    pub fn features_ids_lenient(&self, ids: &[Vec<u32>]) -> Result<(Embeddings, Vec<DocFailure>)> {
        let dim = self.encoder().hidden_size();
        let (values, failures) = self.run_lenient(ids, dim, |e, b| e.features(b))?;
        Ok((Embeddings { dim, values }, failures))
    }
}
