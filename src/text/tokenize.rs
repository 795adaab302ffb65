//! Tokenization with `tokenizers`: padding off, truncation to `max_tokens` including the special
//! tokens. (Documents are encoded in parallel by the caller, `Scorer::tokenize`.)
//!
//! A huge document is first trimmed to a byte budget at a whitespace boundary; when the trimmed
//! text still overflows the token limit, its first `max_tokens` ids are exactly those of the full
//! text (pre-tokenizers split at whitespace, so nothing before the cut depends on what follows),
//! and a 10 MB record costs no more than a 10 KB one. Otherwise (no whitespace in the upper half
//! of the budget, as in CJK or minified text, or too few tokens before the cut) the full text is
//! encoded.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// Bytes of text kept per token of budget before encoding (generous: English averages ~4).
const BYTES_PER_TOKEN: usize = 16;

/// Longest piece [`TextEncoder::count_tokens`] encodes at once: 1 MiB.
pub const COUNT_PIECE_BYTES: usize = 1 << 20;

pub struct TextEncoder {
    tok: Tokenizer,
    /// The same tokenizer without truncation, for counting whole documents' tokens.
    counter: Tokenizer,
    max_tokens: usize,
}

impl TextEncoder {
    /// Load `tokenizer.json`, disable its padding and truncate to `max_tokens` (special tokens
    /// included).
    pub fn from_file(path: &Path, max_tokens: usize) -> Result<TextEncoder> {
        let bytes = crate::checked::read_small_file(path, crate::checked::MAX_METADATA_BYTES)?;
        let mut tok = Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        tok.with_padding(None);
        let mut counter = tok.clone();
        counter
            .with_truncation(None)
            .map_err(|e| anyhow!("cannot unset truncation on {}: {e}", path.display()))?;
        truncating(tok, counter, max_tokens)
            .with_context(|| format!("tokenizer {}", path.display()))
    }

    /// The same tokenizer truncating to `max_tokens` instead.
    pub fn with_max_tokens(&self, max_tokens: usize) -> Result<TextEncoder> {
        truncating(self.tok.clone(), self.counter.clone(), max_tokens)
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Token ids of one document, special tokens included, at most `max_tokens`.
    ///
    /// A long text is trimmed by bytes first, so its size costs nothing: cut at whitespace (a
    /// pre-tokenizer boundary: if the cut text still overflows, its ids are the full text's).
    /// A text without whitespace near the budget (base64, CJK, minified code) is cut at
    /// character boundaries instead, at the budget and at twice, four times... the budget: once
    /// two successive cuts overflow and give the same ids, the cut no longer reaches the kept
    /// tokens, and those ids are taken. Memory then stays bounded by the token limit, not the
    /// document's size; only a text on which no cut up to 64 times the budget settles is
    /// encoded whole.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let budget = self.max_tokens * BYTES_PER_TOKEN;
        if text.len() > budget {
            if let Some(cut) = whitespace_cut(text, budget) {
                let enc = self.encode_raw(&text[..cut])?;
                if !enc.get_overflowing().is_empty() {
                    return Ok(enc.get_ids().to_vec());
                }
            } else if let Some(ids) = self.encode_by_growing_cuts(text, budget)? {
                return Ok(ids);
            }
        }
        Ok(self.encode_raw(text)?.get_ids().to_vec())
    }

    /// Ids of `text` from prefixes cut at character boundaries at `budget`, `2 * budget`, ...
    /// (at most 64 times), once two successive prefixes overflow with the same ids.
    fn encode_by_growing_cuts(&self, text: &str, budget: usize) -> Result<Option<Vec<u32>>> {
        let mut previous: Option<Vec<u32>> = None;
        let mut limit = budget;
        while limit < text.len() && limit <= 64 * budget {
            let cut = char_cut(text, limit);
            let enc = self.encode_raw(&text[..cut])?;
            let ids = (!enc.get_overflowing().is_empty()).then(|| enc.get_ids().to_vec());
            match (&previous, ids) {
                (Some(p), Some(ids)) if *p == ids => return Ok(Some(ids)),
                (_, ids) => previous = ids,
            }
            limit *= 2;
        }
        Ok(None)
    }

    /// [`encode`](Self::encode) and [`count_tokens`](Self::count_tokens) at once: a text up to
    /// [`COUNT_PIECE_BYTES`] is tokenized once, whole, and its encoding truncated and
    /// post-processed exactly as `encode` would (the tokenizer's own order: truncate, then add
    /// the special tokens); a longer one takes both paths.
    pub fn encode_counting(&self, text: &str) -> Result<(Vec<u32>, usize)> {
        if text.len() > COUNT_PIECE_BYTES {
            return Ok((self.encode(text)?, self.count_tokens(text)?));
        }
        let whole = self
            .counter
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        let count = whole.len();
        let enc = self
            .tok
            .post_process(whole, None, true)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok((enc.get_ids().to_vec(), count))
    }

    /// Tokens in the whole text, special tokens excluded. A text over [`COUNT_PIECE_BYTES`] is
    /// counted piece by piece (cut at whitespace where there is some near each cut, else at a
    /// character boundary), so memory stays bounded whatever the document's size; a cut at
    /// whitespace does not change the count, a cut inside a word may change it by a token.
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        let mut total = 0;
        let mut rest = text;
        while !rest.is_empty() {
            let cut = if rest.len() <= COUNT_PIECE_BYTES {
                rest.len()
            } else {
                whitespace_cut(rest, COUNT_PIECE_BYTES)
                    .filter(|&c| c > 0)
                    .unwrap_or_else(|| char_cut(rest, COUNT_PIECE_BYTES).max(1))
            };
            let cut = if rest.is_char_boundary(cut) {
                cut
            } else {
                rest.len()
            };
            total += self
                .counter
                .encode_fast(&rest[..cut], false)
                .map_err(|e| anyhow!("tokenization failed: {e}"))?
                .len();
            rest = &rest[cut..];
        }
        Ok(total)
    }

    fn encode_raw(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.tok
            .encode_fast(text, true)
            .map_err(|e| anyhow!("tokenization failed: {e}"))
    }
}

/// `tok` truncating to `max_tokens` (special tokens included), with `counter`, the same
/// tokenizer without truncation.
fn truncating(mut tok: Tokenizer, counter: Tokenizer, max_tokens: usize) -> Result<TextEncoder> {
    let specials = tok.get_post_processor().map_or(0, |p| {
        use tokenizers::PostProcessor;
        p.added_tokens(false)
    });
    if max_tokens <= specials {
        bail!("max_tokens {max_tokens} leaves no room for text after {specials} special tokens");
    }
    tok.with_truncation(Some(TruncationParams {
        max_length: max_tokens,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
        direction: TruncationDirection::Right,
    }))
    .map_err(|e| anyhow!("cannot set truncation: {e}"))?;
    Ok(TextEncoder {
        tok,
        counter,
        max_tokens,
    })
}

/// The largest character boundary `<= limit`.
fn char_cut(text: &str, limit: usize) -> usize {
    let mut i = limit.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The largest index `<= limit` that starts a whitespace character, if one lies in the upper
/// half of the budget.
fn whitespace_cut(text: &str, limit: usize) -> Option<usize> {
    let mut i = limit.min(text.len());
    while i > limit / 2 {
        if text.is_char_boundary(i) && text[i..].chars().next().is_some_and(char::is_whitespace) {
            return Some(i);
        }
        i -= 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::whitespace_cut;

    #[test]
    fn cut_lands_on_whitespace_and_char_boundary() {
        let t = "héllo wörld ünïcode spaces here";
        let c = whitespace_cut(t, 20).unwrap();
        assert!(t.is_char_boundary(c) && t[c..].starts_with(' ') && c <= 20);
        assert_eq!(whitespace_cut("aaaaaaaaaaaaaaaaaaaaaaaa", 10), None);
    }
}
