//! Tokenization: the byte-trim shortcut for long documents gives exactly the ids of encoding the
//! whole text, and truncation counts the special tokens.

mod common;

use common::*;
use mira::{Device, LoadOptions, Scorer};
use tokenizers::{Tokenizer, TruncationParams};

/// The reference: the whole text through `tokenizers`, truncated, no trimming.
fn full_encode(dir: &std::path::Path, text: &str, max_tokens: usize) -> Vec<u32> {
    let mut tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.with_padding(None);
    tok.with_truncation(Some(TruncationParams {
        max_length: max_tokens,
        ..Default::default()
    }))
    .unwrap();
    tok.encode(text, true).unwrap().get_ids().to_vec()
}

#[test]
fn trimmed_long_documents_tokenize_like_the_full_text() {
    let dir = minilm_dir();
    let g = golden("minilm");
    let cases = g["settings"][0]["cases"].as_array().unwrap();
    let texts: Vec<String> = cases
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    let joined = texts.join("\n");
    let long = [
        // Prose and code, far beyond 16 bytes per token of budget.
        joined.repeat(20),
        // No whitespace at all: the trim cannot cut, so the full text is encoded.
        "数据选择".repeat(5000),
        // Whitespace-heavy: most bytes produce no tokens, so the trimmed text is too short and
        // the full text must be used.
        format!("{}{}", " \n\t".repeat(3000), joined.repeat(3)),
        // A single enormous word after a short prefix.
        format!("start {}", "x".repeat(50_000)),
        // No whitespace, many pre-tokenizer boundaries: base64 with punctuation, 2 MB of CJK,
        // minified code. The trim cuts at character boundaries (memory bounded by the token
        // limit, not the document) and must still give the full text's ids.
        "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo+/abc=".repeat(20_000),
        "数据选择与质量评估。".repeat(70_000),
        "function(a){return a+1;};var b=[1,2,3].map(function(x){return x*2});".repeat(5_000),
        // A character-boundary cut inside a multi-byte character.
        format!("é{}", "日本語".repeat(30_000)),
    ];
    for max_tokens in [16, 128, 256] {
        let opts = LoadOptions {
            max_tokens: Some(max_tokens),
            ..Default::default()
        };
        let scorer = Scorer::load_with(&dir, Device::Cpu, opts).unwrap();
        let mut texts = long.to_vec();
        texts.extend([boundary_text(max_tokens, 1), boundary_text(max_tokens, 2)]);
        texts.extend(texts_to_count());
        for (i, text) in texts.iter().enumerate() {
            let got = scorer.tokenize_one(text).unwrap();
            let want = full_encode(&dir, text, max_tokens);
            assert_eq!(got, want, "text {i} at {max_tokens}");
            assert!(got.len() <= max_tokens);
            // One tokenizer pass for ids and count (`mira select`) gives the same of both.
            let (ids, count) = scorer.tokenize_counting(text).unwrap();
            assert_eq!(ids, want, "counting: text {i} at {max_tokens}");
            // Past one counting piece, `count_tokens`' own rule (tested below) applies.
            let want_count = match text.len() <= mira::text::tokenize::COUNT_PIECE_BYTES {
                true => whole_count(&dir, text),
                false => scorer.count_tokens(text).unwrap(),
            };
            assert_eq!(count, want_count, "count: text {i}");
        }
    }
}

/// Tokens of the whole text, no special tokens, through `tokenizers` alone.
fn whole_count(dir: &std::path::Path, text: &str) -> usize {
    let mut tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.with_padding(None);
    tok.with_truncation(None).unwrap();
    tok.encode(text, false).unwrap().get_ids().len()
}

/// Short and mid-sized texts (the one-pass path of `tokenize_counting`).
fn texts_to_count() -> Vec<String> {
    vec![
        "a".into(),
        "Short text.".into(),
        "word ".repeat(10_000),
        "混合 text 数据 with code: fn f(x) { x + 1 }\n".repeat(500),
    ]
}

/// A text whose byte-trim cut (16 bytes per token of budget) lands on the space after the last of
/// `max_tokens - short` one-token words, with padding spaces before and an unbroken word across
/// the budget after. `short = 1`: the trimmed text overflows by exactly one token (the shortcut
/// applies); `short = 2`: it fits exactly (the full text must be encoded).
fn boundary_text(max_tokens: usize, short: usize) -> String {
    let budget = 16 * max_tokens;
    let words = max_tokens - short;
    let pad = budget - 2 * words - 10;
    format!(
        "{}{}{} {}",
        " ".repeat(pad),
        "a ".repeat(words),
        "b".repeat(200),
        "tail words ".repeat(50)
    )
}

/// Token counts for `mira select`'s budget: a text over a megabyte is counted piece by piece
/// (bounded memory); cut at whitespace, the count equals the whole text's.
#[test]
fn long_texts_are_counted_in_pieces_exactly() {
    let dir = minilm_dir();
    let scorer = Scorer::load(&dir, Device::Cpu).unwrap();
    let mut tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.with_padding(None);
    tok.with_truncation(None).unwrap();
    let prose = "The river runs north past the old mill, and data selection keeps what matters. "
        .repeat(40_000);
    assert!(prose.len() > 3 << 20);
    let whole = tok.encode(prose.as_str(), false).unwrap().get_ids().len();
    assert_eq!(scorer.count_tokens(&prose).unwrap(), whole);
}
