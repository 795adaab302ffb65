//! The one set of rules that turns names from outside (a checkpoint's `id2label`, group names
//! from `groups.json` or `labels.jsonl`, label and model names in dolma keys) into output column
//! names, file names and attribute keys. Documented in the README ("Names").
//!
//! - Labels ([`label_names`]): empty names become `LABEL_<i>`; a name that collides with an
//!   output column (`id`, `source`, `error`, `text`, `scores`, `embedding`, `attributes`) gets
//!   the suffix `_score`; a repeated name gets `_2`, `_3`, ... (the first keeps its name).
//! - File names ([`file_name`]): characters other than ASCII letters, digits, `-`, `_` and `.`
//!   become `_`, a leading `.` becomes `_`, at most 100 bytes; when anything had to change, a
//!   short hash of the original name is appended, so two names never share a file. `../../x`
//!   cannot leave the folder it is joined to.
//! - dolma attribute key parts ([`dolma_key_part`]): characters other than ASCII letters,
//!   digits, `-` and `_` become `_` (dolma's filters address keys with dots; a `.` or a space
//!   in a key makes them match nothing).

use sha2::{Digest, Sha256};

/// Output column names a label may not take.
pub const RESERVED_COLUMNS: &[&str] = &[
    "id",
    "source",
    "error",
    "text",
    "scores",
    "embedding",
    "attributes",
];

/// Unique, non-reserved label names, in order (see the module docs).
pub fn label_names(raw: &[String]) -> Vec<String> {
    let mut taken = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, name) in raw.iter().enumerate() {
        let mut base = name.trim().to_string();
        if base.is_empty() {
            base = format!("LABEL_{i}");
        }
        if RESERVED_COLUMNS.contains(&base.as_str()) {
            base.push_str("_score");
        }
        let mut candidate = base.clone();
        let mut n = 2;
        while taken.contains(&candidate) || RESERVED_COLUMNS.contains(&candidate.as_str()) {
            candidate = format!("{base}_{n}");
            n += 1;
        }
        taken.insert(candidate.clone());
        out.push(candidate);
    }
    out
}

/// A file (or folder) name for `name` that stays inside the folder it is joined to.
pub fn file_name(name: &str) -> String {
    let mut clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.starts_with('.') {
        clean.replace_range(0..1, "_");
    }
    if clean.is_empty() {
        clean.push('_');
    }
    if clean.len() > 100 {
        clean.truncate(100);
    }
    if clean != name {
        let digest = Sha256::digest(name.as_bytes());
        let tag: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
        clean = format!("{clean}-{tag}");
    }
    clean
}

/// One part of a dolma attribute key (`<experiment>__<model>__<label>`).
pub fn dolma_key_part(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn labels_are_unique_and_never_a_column() {
        assert_eq!(
            label_names(&s(&[
                "quality",
                "quality",
                "text",
                "id",
                "",
                "quality_2",
                "text_score"
            ])),
            s(&[
                "quality",
                "quality_2",
                "text_score",
                "id_score",
                "LABEL_4",
                "quality_2_2",
                "text_score_2"
            ])
        );
        assert_eq!(label_names(&s(&["a", "b"])), s(&["a", "b"]));
    }

    #[test]
    fn file_names_stay_in_their_folder_and_do_not_collide() {
        assert_eq!(file_name("g0"), "g0");
        assert_eq!(file_name("code-python_3.11"), "code-python_3.11");
        for bad in [
            "../../x",
            "..",
            ".",
            "/etc/passwd",
            "a/b",
            "",
            "x\0y",
            "dir\\file",
        ] {
            let f = file_name(bad);
            assert!(
                !f.contains('/') && !f.contains('\\') && !f.starts_with('.'),
                "{bad} -> {f}"
            );
            assert!(!f.is_empty());
        }
        assert_ne!(file_name("a/b"), file_name("a_b"));
        assert!(file_name(&"x".repeat(500)).len() <= 110);
    }

    #[test]
    fn dolma_keys_have_no_dots_or_spaces() {
        assert_eq!(dolma_key_part("edu score v1.5"), "edu_score_v1_5");
        assert_eq!(
            dolma_key_part("fineweb-edu_classifier"),
            "fineweb-edu_classifier"
        );
    }
}
