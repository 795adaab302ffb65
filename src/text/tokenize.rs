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

use anyhow::{anyhow, bail, Result};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// Bytes of text kept per token of budget before encoding (generous: English averages ~4).
const BYTES_PER_TOKEN: usize = 16;

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
        let mut tok = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        let specials = tok.get_post_processor().map_or(0, |p| {
            use tokenizers::PostProcessor;
            p.added_tokens(false)
        });
        if max_tokens <= specials {
            bail!(
                "max_tokens {max_tokens} leaves no room for text after {specials} special tokens"
            );
        }
        tok.with_padding(None);
        let mut counter = tok.clone();
        counter
            .with_truncation(None)
            .map_err(|e| anyhow!("cannot unset truncation on {}: {e}", path.display()))?;
        tok.with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|e| anyhow!("cannot set truncation on {}: {e}", path.display()))?;
        Ok(TextEncoder {
            tok,
            counter,
            max_tokens,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Token ids of one document, special tokens included, at most `max_tokens`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let budget = self.max_tokens * BYTES_PER_TOKEN;
        if text.len() > budget {
            if let Some(cut) = whitespace_cut(text, budget) {
                let enc = self.encode_raw(&text[..cut])?;
                if !enc.get_overflowing().is_empty() {
                    return Ok(enc.get_ids().to_vec());
                }
            }
        }
        Ok(self.encode_raw(text)?.get_ids().to_vec())
    }

    /// Tokens in the whole text, special tokens excluded.
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self
            .counter
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?
            .len())
    }

    fn encode_raw(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.tok
            .encode_fast(text, true)
            .map_err(|e| anyhow!("tokenization failed: {e}"))
    }
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
