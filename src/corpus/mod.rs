//! Corpus input and output. Corpus code knows nothing of models: it turns files into
//! [`Record`]s and writes JSON values back out, one per input record, in input order.
//!
//! The seam for richer formats (compression, Parquet, dolma side-cars, resume) is
//! [`open_input`] (a record iterator per file) and [`RecordSink`] (an ordered writer).

pub mod jsonl;

use std::fmt;
use std::path::Path;

use anyhow::Result;

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
            | RecordError::Failed(m) => write!(f, "{}: {m}", self.kind()),
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

/// Open an input file as a stream of records, choosing the reader by extension.
pub fn open_input(
    path: &Path,
    fields: &FieldNames,
) -> Result<Box<dyn Iterator<Item = Result<Record>> + Send>> {
    let name = path.to_string_lossy();
    if name.ends_with(".gz") || name.ends_with(".zst") || name.ends_with(".parquet") {
        anyhow::bail!(
            "{}: compressed and Parquet inputs are not supported yet; use plain .jsonl",
            path.display()
        );
    }
    Ok(Box::new(JsonlReader::open(path, fields.clone())?))
}

/// An ordered output: one JSON value per input record.
pub trait RecordSink {
    fn write(&mut self, value: &serde_json::Value) -> Result<()>;
    /// Flush and make the output visible (atomically, for files).
    fn finish(self: Box<Self>) -> Result<()>;
}
