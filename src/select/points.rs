//! Judgment points are checked before `mira discover` clusters them.
//!
//! Any teacher emits junk sometimes, and a weak one emits mostly junk. Without this check the
//! junk turns into anchors: dimensions named `score` or `why`, `token_normalize_func`, or a
//! definition like `1.0.0.0…`. Each rule below names one kind of junk, and every rejection is
//! counted by that name in the step summary and the rubric report.
//!
//! - `schema_word`: the name is only words of the reply format or the prompt (`score`, `reason`,
//!   `name`, `dimension`, `value2`, …).
//! - `example_copy`: the definition or reason copies one of the prompt's worked example (most
//!   of its words), or the name or definition uses a word of the example's document
//!   (`ingredients listed`, or "The first step is to prepare the ingredients", for a recipe,
//!   in a corpus of code).
//! - `identifier_name`: the name looks like code (`_`, `.`, `/`, `:`, digits, camelCase).
//! - `copied_from_document`: the name appears in the document itself. A word of the document
//!   says what the document is about, not how good it is.
//! - `long_name`: the name is not a short noun phrase (over 5 words or 48 characters).
//! - `repeated_text`: the definition is mostly not letters, or a few characters or words loop.
//! - `short_definition`: the definition has fewer than [`MIN_DEFINITION_WORDS`] words.
//! - `repeated_in_reply`: the same dimension came back again in one reply. Only the first counts.
//!
//! Names that differ only in case or format (`Code Clarity`, `code_clarity`, `code-clarity`)
//! are one dimension: [`canonical_name`] merges them.

use std::collections::{BTreeMap, BTreeSet};

use super::discover::{anchor_id, Judgment};

/// Fewest words a definition must have.
pub const MIN_DEFINITION_WORDS: usize = 4;
/// Valid points needed per anchor. A group with fewer gets fewer anchors.
pub const POINTS_PER_ANCHOR: usize = 3;

/// Words of the reply format and the prompt. A name made only of these echoes the request.
const SCHEMA_WORDS: &[&str] = &[
    "score",
    "scores",
    "scoring",
    "reason",
    "reasons",
    "why",
    "name",
    "names",
    "dimension",
    "dimensions",
    "definition",
    "value",
    "values",
    "rating",
    "ratings",
    "rationale",
    "explanation",
    "text",
    "document",
    "documents",
    "source",
    "json",
    "key",
    "field",
    "item",
    "quality",
    "qualities",
    "criterion",
    "criteria",
    "title",
    "aspect",
    "type",
    "string",
    "integer",
    "number",
    "example",
    "worst",
    "best",
    "object",
    "array",
    "property",
    "reply",
    "the",
    "of",
    "a",
    "an",
    "and",
];

/// Why a point was rejected: the keys of [`Checked::rejected`].
pub const REASONS: &[&str] = &[
    "schema_word",
    "example_copy",
    "identifier_name",
    "copied_from_document",
    "long_name",
    "repeated_text",
    "short_definition",
    "repeated_in_reply",
];

/// The dimension a name means, whatever its case or format: `Code Clarity`, `code_clarity`
/// and `code-clarity` are all `code_clarity`.
pub fn canonical_name(name: &str) -> String {
    anchor_id(name)
}

/// The prompt's worked example: its document (the user message) and its points. A reply must
/// not copy a point, nor name a dimension after the example's topic.
#[derive(Debug, Clone, Default)]
pub struct Example {
    pub document: String,
    pub points: Vec<Judgment>,
}

/// The points one group kept, and the count of rejections by reason.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    pub kept: Vec<Judgment>,
    pub rejected: BTreeMap<String, usize>,
}

impl Checked {
    /// Check the points of one reply (`document`: the text the teacher was shown;
    /// `example`: the worked example's points, which a reply must not copy) and add them.
    pub fn add_reply(&mut self, points: &[Judgment], document: &str, example: &Example) {
        let mut seen = BTreeSet::new();
        for p in points {
            match rejection(p, document, example) {
                Some(why) => *self.rejected.entry(why.to_string()).or_default() += 1,
                None if !seen.insert(canonical_name(&p.name)) => {
                    *self
                        .rejected
                        .entry("repeated_in_reply".to_string())
                        .or_default() += 1
                }
                None => self.kept.push(p.clone()),
            }
        }
    }

    pub fn rejected_total(&self) -> usize {
        self.rejected.values().sum()
    }

    /// Anchors this many valid points can support, at most `wanted`.
    pub fn anchors_supported(&self, wanted: usize) -> usize {
        let distinct: BTreeSet<String> = self.kept.iter().map(clustering_text).collect();
        let supported = self.kept.len() / POINTS_PER_ANCHOR;
        wanted
            .min(supported.max(usize::from(!self.kept.is_empty())))
            .min(distinct.len())
    }
}

/// The text a point is clustered by: its canonical name and definition, so format variants
/// of one name with one definition count once.
pub fn clustering_text(p: &Judgment) -> String {
    format!(
        "{}: {}",
        canonical_name(&p.name).replace('_', " "),
        p.meaning()
    )
}

/// The first rule a point breaks, or `None` when it is valid.
pub fn rejection(p: &Judgment, document: &str, example: &Example) -> Option<&'static str> {
    let (example_document, example) = (example.document.as_str(), example.points.as_slice());
    let name = p.name.trim();
    let canonical = canonical_name(name);
    let words: Vec<&str> = canonical.split('_').filter(|w| !w.is_empty()).collect();
    let schema_only = words.iter().all(|w| {
        let stem = w.trim_end_matches(|c: char| c.is_ascii_digit());
        stem.is_empty() || SCHEMA_WORDS.contains(&stem)
    });
    if schema_only {
        return Some("schema_word");
    }
    let copies = |a: &str| {
        example
            .iter()
            .any(|e| similar(&e.definition, a) || similar(&e.reason, a))
    };
    // A name word of four letters or more, or a definition word of six or more, from the
    // example's document ("a" or "in" are not a topic; "ingredients" is).
    let example_topic = words
        .iter()
        .any(|w| w.len() >= 4 && contains_phrase(example_document, w))
        || p.meaning()
            .split(|c: char| !c.is_alphanumeric())
            .any(|w| w.len() >= 6 && contains_phrase(example_document, w));
    if example_topic || copies(&p.definition) || copies(&p.reason) {
        return Some("example_copy");
    }
    if looks_like_code(name) {
        return Some("identifier_name");
    }
    if contains_phrase(document, name) {
        return Some("copied_from_document");
    }
    if words.len() > 5 || name.chars().count() > 48 {
        return Some("long_name");
    }
    let meaning = p.meaning();
    if repeated_text(meaning) {
        return Some("repeated_text");
    }
    if meaning.split_whitespace().count() < MIN_DEFINITION_WORDS {
        return Some("short_definition");
    }
    None
}

/// Whether two sentences share most of their words (Jaccard similarity of the lower-case word
/// sets at least 0.6): "A user can act on the text…" copies "A reader can act on the text…".
fn similar(a: &str, b: &str) -> bool {
    let set = |s: &str| -> BTreeSet<String> {
        s.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let (a, b) = (set(a), set(b));
    if a.is_empty() || b.is_empty() {
        return false;
    }
    let shared = a.intersection(&b).count();
    shared as f64 >= 0.6 * a.union(&b).count() as f64
}

/// `_`, `.`, `/`, `:`, `(`, digits, or a lower-case letter followed by an upper-case one.
fn looks_like_code(name: &str) -> bool {
    let camel = name
        .chars()
        .zip(name.chars().skip(1))
        .any(|(a, b)| a.is_lowercase() && b.is_uppercase());
    camel
        || name.chars().any(|c| {
            matches!(c, '_' | '.' | '/' | ':' | '(' | '=' | '<' | '>') || c.is_ascii_digit()
        })
}

/// Whether `phrase` occurs in `text` as whole words, ignoring case and treating `-`, `_` and
/// runs of white space as one separator.
pub fn contains_phrase(text: &str, phrase: &str) -> bool {
    let words = |s: &str| -> Vec<String> {
        s.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect()
    };
    let needle = words(phrase);
    if needle.is_empty() {
        return false;
    }
    let hay = words(text);
    hay.windows(needle.len()).any(|w| w == needle.as_slice())
}

/// Mostly not letters, a unit of 1-4 characters repeated 6 times in a row, or a 3-word
/// sequence said three times.
pub fn repeated_text(s: &str) -> bool {
    let visible: Vec<char> = s.chars().filter(|c| !c.is_whitespace()).collect();
    let letters = visible.iter().filter(|c| c.is_alphabetic()).count();
    if visible.is_empty() || letters * 2 < visible.len() {
        return true;
    }
    for unit in 1..=4 {
        let mut run = 0;
        for i in unit..visible.len() {
            if visible[i] == visible[i - unit] {
                run += 1;
                if run >= unit * 5 {
                    return true;
                }
            } else {
                run = 0;
            }
        }
    }
    let words: Vec<String> = s.split_whitespace().map(str::to_lowercase).collect();
    let mut counts: BTreeMap<&[String], usize> = BTreeMap::new();
    for w in words.windows(3) {
        let n = counts.entry(w).or_default();
        *n += 1;
        if *n >= 3 {
            return true;
        }
    }
    false
}
