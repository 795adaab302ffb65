//! Corpus input and output. Corpus code knows nothing of models: it turns files into
//! [`Record`]s and writes JSON values back out, one per input record, in input order.
//!
//! The seam for richer formats (Parquet, dolma side-cars, resume) is [`open_input`] (a record
//! iterator per file, plain/gzip/zstd JSON Lines today) and [`RecordSink`] (an ordered writer);
//! [`expand_inputs`] turns files, directories and globs into the list of files.

pub mod jsonl;

use std::fmt;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use jsonl::{JsonlReader, JsonlWriter};

/// Which JSON fields hold the text, id and source.
#[derive(Debug, Clone)]
pub struct FieldNames {
    pub text: String,
    pub id: String,
    pub source: String,
}

impl Default for FieldNames {
    fn default() -> Self {
        FieldNames {
            text: "text".into(),
            id: "id".into(),
            source: "source".into(),
        }
    }
}

/// Why a record could not be scored. It still appears in the output, with this error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// The line is not valid UTF-8.
    InvalidUtf8(String),
    /// The line is not a JSON object.
    MalformedJson(String),
    /// The text field is absent.
    MissingText(String),
    /// The text field is not a string.
    TextNotString(String),
    /// The tokenizer or model refused the record.
    Failed(String),
    /// The file could not be read past this point (truncated or corrupt gzip/zstd stream, I/O
    /// error): this row stands for the unreadable rest of the file.
    ReadError(String),
}

impl RecordError {
    /// A stable short name for summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            RecordError::InvalidUtf8(_) => "invalid_utf8",
            RecordError::MalformedJson(_) => "malformed_json",
            RecordError::MissingText(_) => "missing_text",
            RecordError::TextNotString(_) => "text_not_string",
            RecordError::Failed(_) => "failed",
            RecordError::ReadError(_) => "read_error",
        }
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::InvalidUtf8(m)
            | RecordError::MalformedJson(m)
            | RecordError::MissingText(m)
            | RecordError::TextNotString(m)
            | RecordError::Failed(m)
            | RecordError::ReadError(m) => write!(f, "{}: {m}", self.kind()),
        }
    }
}

/// One input record: its id, optional source, and text (or why there is none).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub id: String,
    pub source: Option<String>,
    pub text: Result<String, RecordError>,
    /// `file:line`, for error messages.
    pub location: String,
}

/// Extensions of the inputs mira reads (plain, gzip or zstd JSON Lines).
const JSONL_EXTENSIONS: &[&str] = &[".jsonl", ".json", ".ndjson"];
const COMPRESSIONS: &[&str] = &["", ".gz", ".zst"];

fn is_supported(path: &Path) -> bool {
    let name = path.to_string_lossy();
    JSONL_EXTENSIONS.iter().any(|e| {
        COMPRESSIONS
            .iter()
            .any(|c| name.ends_with(&format!("{e}{c}")))
    })
}

/// Open an input file as a stream of records, choosing the reader by extension:
/// `.jsonl`/`.json`/`.ndjson`, optionally `.gz` (multi-member gzip, as dolma writes) or `.zst`.
pub fn open_input(
    path: &Path,
    fields: &FieldNames,
) -> Result<Box<dyn Iterator<Item = Result<Record>> + Send>> {
    let name = path.to_string_lossy();
    if name.ends_with(".parquet") {
        anyhow::bail!("{}: Parquet inputs are not supported yet", path.display());
    }
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open input {}", path.display()))?;
    let raw: Box<dyn Read + Send> = if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            1 << 20,
            file,
        )))
    } else if name.ends_with(".zst") {
        Box::new(
            zstd::stream::read::Decoder::new(file)
                .with_context(|| format!("cannot read zstd input {}", path.display()))?,
        )
    } else {
        Box::new(file)
    };
    let reader = BufReader::with_capacity(1 << 20, raw);
    Ok(Box::new(JsonlReader::new(
        path.display().to_string(),
        reader,
        fields.clone(),
    )))
}

/// Expand command-line inputs into the files to read, in a deterministic order: a file is taken
/// as it is; a directory contributes every supported file below it (recursively, sorted); a
/// pattern with `*`, `?` or `[` is a glob (sorted). A path that matches nothing is an error.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let text = input.to_string_lossy();
        if !input.exists() && text.contains(['*', '?', '[']) {
            let mut matched: Vec<PathBuf> = glob::glob(&text)
                .with_context(|| format!("invalid glob pattern {text}"))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("cannot expand {text}"))?;
            matched.retain(|p| p.is_file());
            matched.sort();
            anyhow::ensure!(!matched.is_empty(), "no input files match {text}");
            files.extend(matched);
        } else if input.is_dir() {
            let before = files.len();
            walk(input, &mut files)?;
            anyhow::ensure!(
                files.len() > before,
                "no .jsonl/.json(.gz/.zst) files under {}",
                input.display()
            );
        } else if input.is_file() {
            files.push(input.clone());
        } else {
            anyhow::bail!(
                "cannot open input {}: no such file or directory",
                input.display()
            );
        }
    }
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.clone()));
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read directory {}", dir.display()))?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_supported(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// An ordered output: one JSON value per input record.
pub trait RecordSink {
    fn write(&mut self, value: &serde_json::Value) -> Result<()>;
    /// Flush and make the output visible (atomically, for files).
    fn finish(self: Box<Self>) -> Result<()>;
}
