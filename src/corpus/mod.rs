//! Corpus input and output. Corpus code knows nothing of models: it turns files into
//! [`Record`]s and writes JSON values back out, one per input record, in input order.
//!
//! The seam for richer formats (Parquet, dolma side-cars, resume) is [`open_input`] (a record
//! iterator per file: plain/gzip/zstd JSON Lines or Parquet) and [`RecordSink`] (an ordered writer);
//! [`expand_inputs`] turns files, directories and globs into the list of files.

pub mod jsonl;
pub mod parquet;

use std::fmt;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use jsonl::{remove_stale_temps, write_atomic, JsonlReader, JsonlWriter};
pub use parquet::{ParquetColumns, ParquetReader, ParquetWriter};

/// Which JSON fields hold the text, id and source.
#[derive(Debug, Clone)]
pub struct FieldNames {
    pub text: String,
    pub id: String,
    pub source: String,
    /// Keep each JSON Lines record's whole object ([`Record::input`]) for the output.
    pub keep_input: bool,
}

impl Default for FieldNames {
    fn default() -> Self {
        FieldNames {
            text: "text".into(),
            id: "id".into(),
            source: "source".into(),
            keep_input: false,
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
    /// The text is empty or whitespace only.
    EmptyText(String),
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
            RecordError::EmptyText(_) => "empty_text",
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
            | RecordError::EmptyText(m)
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
    /// The whole input object, when the reader was asked to keep it (JSON Lines inputs).
    pub input: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Record {
    /// The row that stands for the unreadable rest of a file (or a whole unreadable file):
    /// id and location `location`, a `read_error`.
    pub fn unreadable(location: String, message: String) -> Record {
        Record {
            id: location.clone(),
            source: None,
            text: Err(RecordError::ReadError(format!("{location}: {message}"))),
            location,
            input: None,
        }
    }
}

/// Extensions of the inputs mira reads (plain, gzip or zstd JSON Lines; and `.parquet`).
const JSONL_EXTENSIONS: &[&str] = &[".jsonl", ".json", ".ndjson"];
const COMPRESSIONS: &[&str] = &["", ".gz", ".zst"];

fn is_supported(path: &Path) -> bool {
    let name = path.to_string_lossy();
    name.ends_with(".parquet")
        || JSONL_EXTENSIONS.iter().any(|e| {
            COMPRESSIONS
                .iter()
                .any(|c| name.ends_with(&format!("{e}{c}")))
        })
}

/// Open an input file as a stream of records, choosing the reader by extension: `.parquet`, or
/// `.jsonl`/`.json`/`.ndjson`, optionally `.gz` (multi-member gzip, as dolma writes) or `.zst`.
pub fn open_input(
    path: &Path,
    fields: &FieldNames,
) -> Result<Box<dyn Iterator<Item = Result<Record>> + Send>> {
    let name = path.to_string_lossy();
    if name.ends_with(".parquet") {
        return Ok(Box::new(ParquetReader::open(path, fields.clone())?));
    }
    let reader = open_decompressed(path)?;
    Ok(Box::new(JsonlReader::new(
        path.display().to_string(),
        reader,
        fields.clone(),
    )))
}

/// A buffered reader of a (possibly `.gz` or `.zst` compressed) text file.
pub fn open_decompressed(path: &Path) -> Result<Box<dyn std::io::BufRead + Send>> {
    let name = path.to_string_lossy();
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
    Ok(Box::new(BufReader::with_capacity(1 << 20, raw)))
}

/// One file to read, and its path relative to the input it came from (a directory argument's
/// files keep their sub-path; a file or glob match is known by its file name). Per-file outputs
/// mirror `rel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    pub path: PathBuf,
    pub rel: PathBuf,
}

/// Expand command-line inputs into the files to read, in a deterministic order: a file is taken
/// as it is; a directory contributes every supported file below it (recursively, sorted); a
/// pattern with `*`, `?` or `[` is a glob (sorted). A path that matches nothing is an error, and
/// so are two files that would share an output name.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<InputFile>> {
    let mut files = Vec::new();
    let by_name = |p: PathBuf| {
        let rel = PathBuf::from(p.file_name().unwrap_or_default());
        InputFile { path: p, rel }
    };
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
            files.extend(matched.into_iter().map(by_name));
        } else if input.is_dir() {
            let mut found = Vec::new();
            walk(input, &mut found)?;
            anyhow::ensure!(
                !found.is_empty(),
                "no .jsonl/.json(.gz/.zst) files under {}",
                input.display()
            );
            files.extend(found.into_iter().map(|p| {
                InputFile {
                    rel: p
                        .strip_prefix(input)
                        .expect("walked below the input")
                        .to_path_buf(),
                    path: p,
                }
            }));
        } else if input.is_file() {
            files.push(by_name(input.clone()));
        } else {
            anyhow::bail!(
                "cannot open input {}: no such file or directory",
                input.display()
            );
        }
    }
    let mut seen_paths = std::collections::HashSet::new();
    files.retain(|f| seen_paths.insert(f.path.clone()));
    let mut seen_rel = std::collections::HashMap::new();
    for f in &files {
        if let Some(other) = seen_rel.insert(f.rel.clone(), f.path.clone()) {
            anyhow::bail!(
                "inputs {} and {} would share the output name {}",
                other.display(),
                f.path.display(),
                f.rel.display()
            );
        }
    }
    Ok(files)
}

/// The files of rank `rank` among `world_size` workers: `files[rank::world_size]`.
pub fn shard(files: Vec<InputFile>, rank: usize, world_size: usize) -> Result<Vec<InputFile>> {
    anyhow::ensure!(
        world_size >= 1 && rank < world_size,
        "rank {rank} is not below world size {world_size}"
    );
    Ok(files.into_iter().skip(rank).step_by(world_size).collect())
}

/// Output path (relative) for an input: compression and JSON/Parquet extension replaced by
/// `.{extension}` (`jsonl` or `parquet`).
pub fn output_name(rel: &Path, extension: &str) -> PathBuf {
    let mut name = rel.to_string_lossy().into_owned();
    if let Some(stripped) = name.strip_suffix(".parquet") {
        return PathBuf::from(format!("{stripped}.{extension}"));
    }
    for c in [".gz", ".zst"] {
        if let Some(stripped) = name.strip_suffix(c) {
            name = stripped.to_string();
        }
    }
    for e in JSONL_EXTENSIONS {
        if let Some(stripped) = name.strip_suffix(e) {
            name = stripped.to_string();
            break;
        }
    }
    PathBuf::from(format!("{name}.{extension}"))
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
