//! Ragged batches: every token of every document back to back, with `cu_seqlens` marking where
//! each sequence starts (TEI's layout). No padding is ever computed.
//!
//! The [`Packer`] fills a token budget. Within a window of consecutive documents it sorts by
//! length (longest first) so that a batch holds sequences of similar length, which keeps GPU tiles
//! full; `docs` remembers which input document each sequence came from so results return in input
//! order.

/// A ragged batch of token sequences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// All token ids, sequence after sequence. `[total_tokens]`
    pub ids: Vec<u32>,
    /// Position of each token within its sequence (0-based). `[total_tokens]`
    pub positions: Vec<u32>,
    /// Sequence `s` occupies `ids[cu_seqlens[s]..cu_seqlens[s + 1]]`. `[n_seqs + 1]`
    pub cu_seqlens: Vec<u32>,
    /// Index of the input document each sequence belongs to. `[n_seqs]`
    pub docs: Vec<usize>,
    /// The longest sequence in the batch.
    pub max_seqlen: usize,
}

impl Batch {
    /// Build a batch from `(document index, token ids)` pairs, in the order given. Backends
    /// reject batches with empty sequences ([`Batch::validate`]).
    pub fn from_sequences<'a>(seqs: impl IntoIterator<Item = (usize, &'a [u32])>) -> Batch {
        let mut b = Batch {
            ids: Vec::new(),
            positions: Vec::new(),
            cu_seqlens: vec![0],
            docs: Vec::new(),
            max_seqlen: 0,
        };
        for (doc, ids) in seqs {
            b.ids.extend_from_slice(ids);
            b.positions.extend(0..ids.len() as u32);
            b.cu_seqlens.push(b.ids.len() as u32);
            b.docs.push(doc);
            b.max_seqlen = b.max_seqlen.max(ids.len());
        }
        b
    }

    /// Check the invariants the kernels index by: `cu_seqlens` starts at 0, strictly increases
    /// (no empty sequence) and ends at the token count; one position per token, each below
    /// `max_positions`; one document index per sequence; ids below `vocab`.
    pub fn validate(&self, vocab: usize, max_positions: usize) -> anyhow::Result<()> {
        use anyhow::bail;
        let n = self.ids.len();
        let last = self.cu_seqlens.last().map(|&c| c as usize);
        if self.cu_seqlens.first() != Some(&0) || last != Some(n) {
            bail!("malformed batch: cu_seqlens must run from 0 to the {n} tokens");
        }
        if self.cu_seqlens.windows(2).any(|w| w[1] <= w[0]) {
            bail!("malformed batch: empty or out-of-order sequence in cu_seqlens");
        }
        if self.positions.len() != n || self.docs.len() != self.cu_seqlens.len() - 1 {
            bail!("malformed batch: positions or docs do not match the sequences");
        }
        if let Some(&p) = self
            .positions
            .iter()
            .find(|&&p| p as usize >= max_positions)
        {
            bail!("position {p} exceeds the model's {max_positions} positions");
        }
        if let Some(&bad) = self.ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {bad} is out of range for the model's vocabulary of {vocab}");
        }
        Ok(())
    }

    /// The longest sequence, from `cu_seqlens` (what the kernels index by; `max_seqlen` is the
    /// builder's record of it, which a hand-made batch may not keep).
    pub fn longest_sequence(&self) -> usize {
        self.cu_seqlens
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]) as usize)
            .max()
            .unwrap_or(0)
    }

    pub fn n_seqs(&self) -> usize {
        self.docs.len()
    }

    pub fn n_tokens(&self) -> usize {
        self.ids.len()
    }

    /// Token range of sequence `s`.
    pub fn range(&self, s: usize) -> std::ops::Range<usize> {
        self.cu_seqlens[s] as usize..self.cu_seqlens[s + 1] as usize
    }
}

/// Packs tokenized documents into ragged batches under a token budget.
#[derive(Debug, Clone, Copy)]
pub struct Packer {
    /// Most tokens in one batch (a longer single document still gets a batch of its own).
    pub max_batch_tokens: usize,
    /// Most sequences in one batch.
    pub max_batch_seqs: usize,
    /// Documents considered together when sorting by length.
    pub sort_window: usize,
}

impl Default for Packer {
    fn default() -> Self {
        Packer {
            max_batch_tokens: 16384,
            max_batch_seqs: 1024,
            sort_window: 4096,
        }
    }
}

impl Packer {
    /// Pack `seqs` (document `i` is `seqs[i]`) into batches. Every document appears in exactly one
    /// batch.
    pub fn pack(&self, seqs: &[Vec<u32>]) -> Vec<Batch> {
        let budget = self.max_batch_tokens.max(1);
        let max_seqs = self.max_batch_seqs.max(1);
        let mut batches = Vec::new();
        let mut start = 0;
        while start < seqs.len() {
            let end = (start + self.sort_window.max(1)).min(seqs.len());
            let mut order: Vec<usize> = (start..end).collect();
            // Longest first; ties keep input order so packing is deterministic.
            order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
            let mut current: Vec<usize> = Vec::new();
            let mut tokens = 0;
            for i in order {
                let len = seqs[i].len();
                if !current.is_empty() && (tokens + len > budget || current.len() >= max_seqs) {
                    batches.push(Batch::from_sequences(
                        current.drain(..).map(|d| (d, &seqs[d][..])),
                    ));
                    tokens = 0;
                }
                current.push(i);
                tokens += len;
            }
            if !current.is_empty() {
                batches.push(Batch::from_sequences(
                    current.into_iter().map(|d| (d, &seqs[d][..])),
                ));
            }
            start = end;
        }
        batches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(lens: &[usize]) -> Vec<Vec<u32>> {
        lens.iter()
            .enumerate()
            .map(|(d, &n)| (0..n as u32).map(|t| t + 1000 * d as u32).collect())
            .collect()
    }

    #[test]
    fn every_document_lands_once_within_budget() {
        let lens: Vec<usize> = (0..500).map(|i| 1 + (i * 7919) % 300).collect();
        let seqs = docs(&lens);
        let packer = Packer {
            max_batch_tokens: 1000,
            max_batch_seqs: 16,
            sort_window: 64,
        };
        let batches = packer.pack(&seqs);
        let mut seen = vec![0; seqs.len()];
        for b in &batches {
            assert!(b.n_seqs() <= 16);
            assert!(b.n_tokens() <= 1000 || b.n_seqs() == 1);
            assert_eq!(b.cu_seqlens.len(), b.n_seqs() + 1);
            for s in 0..b.n_seqs() {
                let d = b.docs[s];
                seen[d] += 1;
                assert_eq!(&b.ids[b.range(s)], &seqs[d][..]);
                assert_eq!(
                    b.positions[b.range(s)],
                    (0..seqs[d].len() as u32).collect::<Vec<_>>()
                );
            }
            assert_eq!(
                b.max_seqlen,
                (0..b.n_seqs()).map(|s| b.range(s).len()).max().unwrap()
            );
        }
        assert!(seen.iter().all(|&c| c == 1));
    }

    #[test]
    fn oversized_document_gets_its_own_batch_and_windows_sort_by_length() {
        let seqs = docs(&[3, 50, 4, 2]);
        let batches = Packer {
            max_batch_tokens: 10,
            max_batch_seqs: 8,
            sort_window: 8,
        }
        .pack(&seqs);
        assert_eq!(batches[0].docs, vec![1]);
        assert_eq!(batches[1].docs, vec![2, 0, 3]);
    }
}
