//! Corpus input and output. Corpus code knows nothing of models: it turns files into
//! [`Record`]s and writes JSON values back out, one per input record, in input order.
//!
//! The seam for richer formats (Parquet, dolma side-cars, resume) is [`open_input`] (a record
//! iterator per file: plain/gzip/zstd JSON Lines or Parquet) and [`RecordSink`] (an ordered writer);
//! [`expand_inputs`] turns files, directories and globs into the list of files.

pub mod jsonl;
pub mod output;
pub mod parquet;
pub mod rows;

use std::fmt;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub use jsonl::{JsonlReader, JsonlRowWriter, JsonlWriter};
pub use output::{
    done_summary, is_done, live_writer, mark_done, refuse_input, remove_stale_temps, write_atomic,
    write_once, Destination, InputIds, LiveWriters, OutputFile,
};
pub use parquet::{ParquetReader, ParquetWriter};
pub use rows::{JsonRows, JsonStyle, OutputRow, RecordSink, RowValues};

/// Which JSON fields hold the text, id and source.
#[derive(Debug, Clone)]
pub struct FieldNames {
    pub text: String,
    pub id: String,
    pub source: String,
    /// Keep each JSON Lines record's whole object ([`Record::input`]) for the output.
    pub keep_input: bool,
    /// Keep each JSON Lines record's line as it was read ([`Record::raw`]), to copy it verbatim.
    pub keep_raw: bool,
}

/// The fields that hold the text, id and source, as a user names them (`--text-field`, `mira
/// run`'s `[fields]`); the same JSON as before this type was shared, so `mira run` fingerprints
/// are unchanged.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextFields {
    pub text: String,
    pub id: String,
    pub source: String,
}

impl Default for TextFields {
    fn default() -> Self {
        TextFields {
            text: "text".into(),
            id: "id".into(),
            source: "source".into(),
        }
    }
}

impl TextFields {
    /// The reader's field names: these fields, no input object or line kept.
    pub fn names(&self) -> FieldNames {
        FieldNames {
            text: self.text.clone(),
            id: self.id.clone(),
            source: self.source.clone(),
            keep_input: false,
            keep_raw: false,
        }
    }
}

/// The value at `path` in a JSON object: the key itself when the object has it, else a dotted
/// path through nested objects (`metadata.content`).
pub fn lookup<'a>(value: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    if let Some(v) = value.get(path) {
        return Some(v);
    }
    if !path.contains('.') {
        return None;
    }
    path.split('.').try_fold(value, |v, key| v.get(key))
}

impl Default for FieldNames {
    fn default() -> Self {
        FieldNames {
            text: "text".into(),
            id: "id".into(),
            source: "source".into(),
            keep_input: false,
            keep_raw: false,
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
    /// The model's output for the record is NaN or infinite (e.g. an f16 overflow).
    NonFiniteOutput(String),
    /// The line is longer than the reader's limit ([`jsonl::MAX_LINE_BYTES`]); it is skipped.
    LineTooLong(String),
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
            RecordError::LineTooLong(_) => "line_too_long",
            RecordError::NonFiniteOutput(_) => "non_finite_output",
        }
    }

    /// What went wrong, where (`file:line: ...`), without the kind.
    pub fn message(&self) -> &str {
        match self {
            RecordError::InvalidUtf8(m)
            | RecordError::MalformedJson(m)
            | RecordError::MissingText(m)
            | RecordError::TextNotString(m)
            | RecordError::EmptyText(m)
            | RecordError::Failed(m)
            | RecordError::ReadError(m)
            | RecordError::LineTooLong(m)
            | RecordError::NonFiniteOutput(m) => m,
        }
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind(), self.message())
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
    /// The line as read (without its line ending), when the reader was asked to keep it.
    pub raw: Option<Vec<u8>>,
    /// The id as the input has it when it is not a string (an integer id stays an integer in
    /// the output); `None` for string ids and made-up ones.
    pub id_value: Option<serde_json::Value>,
}

impl Record {
    /// A record held in memory (a library caller's text), named `location` in messages; `None`
    /// is a `missing_text` record.
    pub fn in_memory(location: String, text: Option<String>) -> Record {
        let text = text.ok_or_else(|| RecordError::MissingText(format!("{location}: no text")));
        Record {
            id: location.clone(),
            source: None,
            text,
            location,
            input: None,
            raw: None,
            id_value: None,
        }
    }

    /// The row that stands for the unreadable rest of a file (or a whole unreadable file):
    /// id and location `location`, a `read_error`.
    pub fn unreadable(location: String, message: String) -> Record {
        Record {
            id: location.clone(),
            source: None,
            text: Err(RecordError::ReadError(format!("{location}: {message}"))),
            location,
            input: None,
            raw: None,
            id_value: None,
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
    let name = if path.as_os_str() == "-" {
        "<stdin>".to_string()
    } else {
        path.display().to_string()
    };
    Ok(Box::new(JsonlReader::new(name, reader, fields.clone())))
}

/// A buffered reader of a (possibly gzip or zstd compressed) text file, or of standard input for
/// `-`. The compression is decided by the first bytes, not only the name: gzip and zstd streams
/// are decoded whatever the file is called, and bzip2, xz, zip and lz4 are errors naming the
/// file (mira does not read them) instead of rows of undecodable bytes.
pub fn open_decompressed(path: &Path) -> Result<Box<dyn std::io::BufRead + Send>> {
    let raw: Box<dyn Read + Send> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(path)
                .with_context(|| format!("cannot open input {}", path.display()))?,
        )
    };
    let mut buffered = BufReader::with_capacity(1 << 20, raw);
    // The first read's bytes (all of a small file's, at least the magic numbers of any real
    // compressed stream), not consumed.
    let head: Vec<u8> = std::io::BufRead::fill_buf(&mut buffered)
        .with_context(|| format!("cannot read input {}", path.display()))?
        .iter()
        .take(6)
        .copied()
        .collect();
    let decoded: Box<dyn Read + Send> = match Compression::sniff(&head) {
        Some(Compression::Gzip) => Box::new(flate2::read::MultiGzDecoder::new(buffered)),
        Some(Compression::Zstd) => Box::new(
            zstd::stream::read::Decoder::with_buffer(buffered)
                .with_context(|| format!("cannot read zstd input {}", path.display()))?,
        ),
        Some(other) => bail!(
            "{}: the file is {} compressed, which mira does not read (plain, gzip and zstd JSON \
             Lines, and Parquet): decompress it or recompress with gzip or zstd",
            path.display(),
            other.name()
        ),
        None if path.to_string_lossy().ends_with(".gz") && !head.is_empty() => {
            bail!("{}: named .gz but not gzip data", path.display())
        }
        None if path.to_string_lossy().ends_with(".zst") && !head.is_empty() => {
            bail!("{}: named .zst but not zstd data", path.display())
        }
        None => return Ok(Box::new(buffered)),
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, decoded)))
}

/// Compressed formats recognised by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    Gzip,
    Zstd,
    Bzip2,
    Xz,
    Zip,
    Lz4,
}

impl Compression {
    fn sniff(head: &[u8]) -> Option<Compression> {
        const MAGIC: &[(&[u8], Compression)] = &[
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
            (b"BZh", Compression::Bzip2),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Compression::Xz),
            (b"PK\x03\x04", Compression::Zip),
            (&[0x04, 0x22, 0x4d, 0x18], Compression::Lz4),
        ];
        MAGIC
            .iter()
            .find(|(m, _)| head.starts_with(m))
            .map(|(_, c)| *c)
    }

    fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Xz => "xz",
            Compression::Zip => "zip",
            Compression::Lz4 => "lz4",
        }
    }
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
/// pattern with `*`, `?` or `[` is a glob (sorted), whose matches keep their path below the
/// pattern's literal folder (`docs/*/*.json.gz` gives `a/x.json.gz`, `b/x.json.gz`); `-` is
/// standard input. A path that matches nothing is an error, and so are two files that would
/// share an output name. Each real file is read once, however many names lead to it.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<InputFile>> {
    expand_inputs_excluding(inputs, &[])
}

/// [`expand_inputs`], leaving out everything below the output folders `outputs` (so a job whose
/// `--output-dir` lies inside its input folder never reads its own outputs). An input folder
/// that is an output folder, or lies inside one, is refused: its files would be overwritten.
// Long: one walk over the inputs that applies each input rule in order (stdin, globs, folders,
// files, duplicates); the rules share the walk's state.
pub fn expand_inputs_excluding(inputs: &[PathBuf], outputs: &[PathBuf]) -> Result<Vec<InputFile>> {
    let outputs: Vec<(PathBuf, PathBuf)> = outputs
        .iter()
        .filter_map(|o| std::fs::canonicalize(o).ok().map(|c| (o.clone(), c)))
        .collect();
    let excluded = |p: &Path| -> bool {
        std::fs::canonicalize(p).is_ok_and(|c| outputs.iter().any(|(_, o)| c.starts_with(o)))
    };
    let mut files = Vec::new();
    let by_name = |p: PathBuf| {
        let rel = PathBuf::from(p.file_name().unwrap_or_default());
        InputFile { path: p, rel }
    };
    for input in inputs {
        let text = input.to_string_lossy();
        if input.as_os_str() == "-" {
            files.push(InputFile {
                path: input.clone(),
                rel: PathBuf::from("stdin.jsonl"),
            });
        } else if !input.exists() && text.contains(['*', '?', '[']) {
            let mut matched: Vec<PathBuf> = glob::glob(&text)
                .with_context(|| format!("invalid glob pattern {text}"))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("cannot expand {text}"))?;
            matched.retain(|p| p.is_file() && !excluded(p));
            matched.sort();
            anyhow::ensure!(!matched.is_empty(), "no input files match {text}");
            let base = glob_base(input);
            files.extend(matched.into_iter().map(|p| match p.strip_prefix(&base) {
                Ok(rel) if !rel.as_os_str().is_empty() => InputFile {
                    rel: rel.to_path_buf(),
                    path: p,
                },
                _ => by_name(p),
            }));
        } else if input.is_dir() {
            if let Ok(c) = std::fs::canonicalize(input) {
                if let Some((o, _)) = outputs.iter().find(|(_, o)| c.starts_with(o)) {
                    anyhow::bail!(
                        "the output folder {} is (or contains) the input folder {}: outputs would \
                         overwrite or be mixed with the inputs; choose an output folder outside it",
                        o.display(),
                        input.display()
                    );
                }
            }
            let mut found = Vec::new();
            let mut visited = std::collections::HashSet::new();
            walk(input, &mut found, &mut visited, &excluded)?;
            anyhow::ensure!(
                !found.is_empty(),
                "no .jsonl/.json/.ndjson(.gz/.zst) or .parquet files under {}",
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
        } else if input.exists() {
            // A named file is read whatever it is (a FIFO from `<(zcat ...)` streams too).
            refuse_unsupported_compression(input)?;
            files.push(by_name(input.clone()));
        } else {
            anyhow::bail!(
                "cannot open input {}: no such file or directory",
                input.display()
            );
        }
    }
    // One real file, one read: a symlink or a second argument naming a file already listed
    // adds nothing.
    let mut seen = std::collections::HashSet::new();
    files
        .retain(|f| seen.insert(std::fs::canonicalize(&f.path).unwrap_or_else(|_| f.path.clone())));
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

/// The literal folder of a glob pattern: its components before the first with a wildcard.
fn glob_base(pattern: &Path) -> PathBuf {
    pattern
        .components()
        .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[']))
        .collect()
}

/// Compressions mira cannot read, by extension: an error naming the file, not rows of
/// `invalid_utf8`.
const UNSUPPORTED_COMPRESSIONS: &[&str] = &[
    ".bz2", ".xz", ".lz4", ".lzma", ".br", ".zip", ".7z", ".tar", ".snappy", ".lzo",
];

fn refuse_unsupported_compression(path: &Path) -> Result<()> {
    let name = path.to_string_lossy();
    if let Some(ext) = UNSUPPORTED_COMPRESSIONS.iter().find(|e| name.ends_with(*e)) {
        anyhow::bail!(
            "{}: {ext} compression is not supported (mira reads plain, .gz and .zst JSON Lines, and .parquet): \
             decompress it or recompress with gzip or zstd",
            path.display()
        );
    }
    Ok(())
}

/// The files of rank `rank` among `world_size` workers: `files[rank::world_size]`.
pub fn shard(files: Vec<InputFile>, rank: usize, world_size: usize) -> Result<Vec<InputFile>> {
    anyhow::ensure!(
        world_size >= 1 && rank < world_size,
        "rank {rank} is not below world size {world_size}"
    );
    Ok(files.into_iter().skip(rank).step_by(world_size).collect())
}

/// How per-file JSON Lines outputs are compressed (`--compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputCompression {
    /// As the input file is (`.jsonl.gz` in, `.jsonl.gz` out; Parquet in, plain out).
    #[default]
    Keep,
    None,
    Gzip,
    Zstd,
}

impl std::str::FromStr for OutputCompression {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "keep" => OutputCompression::Keep,
            "none" => OutputCompression::None,
            "gzip" | "gz" => OutputCompression::Gzip,
            "zstd" | "zst" => OutputCompression::Zstd,
            other => bail!("unknown compression '{other}': keep, none, gzip or zstd"),
        })
    }
}

/// [`output_name`] with the compression suffix `compression` asks for (the writers compress by
/// the name's suffix).
pub fn output_name_compressed(
    rel: &Path,
    extension: &str,
    compression: OutputCompression,
) -> PathBuf {
    let name = rel.to_string_lossy();
    let suffix = match compression {
        OutputCompression::Keep if name.ends_with(".gz") => ".gz",
        OutputCompression::Keep if name.ends_with(".zst") => ".zst",
        OutputCompression::Keep | OutputCompression::None => "",
        OutputCompression::Gzip => ".gz",
        OutputCompression::Zstd => ".zst",
    };
    let mut out = output_name(rel, extension).into_os_string();
    out.push(suffix);
    PathBuf::from(out)
}

/// Output path (relative) for an input, uncompressed: compression and JSON/Parquet extension
/// replaced by `.{extension}`.
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

/// Every supported regular file below `dir`, sorted. A folder reached twice (a symlink loop, or
/// two links to one folder) is walked once; special files (FIFOs, sockets, devices) and broken
/// links are skipped with a warning, since reading one could block or never end; folders for
/// which `excluded` holds (the job's outputs) are left out.
fn walk(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    visited: &mut std::collections::HashSet<PathBuf>,
    excluded: &dyn Fn(&Path) -> bool,
) -> Result<()> {
    let real = std::fs::canonicalize(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?;
    if !visited.insert(real) || excluded(dir) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read directory {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read directory {}", dir.display()))?;
    entries.sort();
    for p in entries {
        match std::fs::metadata(&p) {
            Ok(m) if m.is_dir() => walk(&p, out, visited, excluded)?,
            Ok(m) if m.is_file() && is_supported(&p) => out.push(p),
            Ok(m) if m.is_file() => {}
            Ok(_) if is_supported(&p) => {
                eprintln!(
                    "warning: skipping {}: not a regular file (a FIFO, socket or device)",
                    p.display()
                );
            }
            Err(e) if is_supported(&p) => {
                eprintln!("warning: skipping {}: {e}", p.display());
            }
            _ => {}
        }
    }
    Ok(())
}
