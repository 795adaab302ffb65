//! JSON Lines: one record per line. Blank lines are not records and are skipped; every other
//! line yields exactly one [`Record`], valid or not, so input rows equal output rows.

use std::fs::File;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use super::{FieldNames, Record, RecordError, RecordSink};

pub struct JsonlReader<R> {
    name: String,
    reader: R,
    line: usize,
    fields: FieldNames,
    buf: Vec<u8>,
    /// A read error ended the stream.
    failed: bool,
}

impl<R: BufRead> JsonlReader<R> {
    pub fn new(name: String, reader: R, fields: FieldNames) -> Self {
        JsonlReader {
            name,
            reader,
            line: 0,
            fields,
            buf: Vec::new(),
            failed: false,
        }
    }

    fn parse(&self, line: &[u8]) -> Record {
        let location = format!("{}:{}", self.name, self.line);
        let fallback_id = location.clone();
        let fail = |e: RecordError| Record {
            id: fallback_id.clone(),
            source: None,
            text: Err(e),
            location: location.clone(),
            input: None,
        };
        let text = match std::str::from_utf8(line) {
            Ok(t) => t,
            Err(e) => {
                return fail(RecordError::InvalidUtf8(format!(
                    "{location}: invalid UTF-8 at byte {}",
                    e.valid_up_to()
                )))
            }
        };
        let value: Value = match serde_json::from_str(text) {
            Ok(Value::Object(map)) => Value::Object(map),
            Ok(_) => {
                return fail(RecordError::MalformedJson(format!(
                    "{location}: not a JSON object"
                )))
            }
            Err(e) => return fail(RecordError::MalformedJson(format!("{location}: {e}"))),
        };
        let id = match value.get(&self.fields.id) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => fallback_id.clone(),
            Some(other) => other.to_string(),
        };
        let source = match value.get(&self.fields.source) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Null) | None => None,
            Some(other) => Some(other.to_string()),
        };
        let text = match value.get(&self.fields.text) {
            Some(Value::String(s)) => Ok(s.clone()),
            None | Some(Value::Null) => Err(RecordError::MissingText(format!(
                "{location}: no '{}' field",
                self.fields.text
            ))),
            Some(_) => Err(RecordError::TextNotString(format!(
                "{location}: field '{}' is not a string",
                self.fields.text
            ))),
        };
        let input = match (self.fields.keep_input, value) {
            (true, Value::Object(map)) => Some(map),
            _ => None,
        };
        Record {
            id,
            source,
            text,
            location,
            input,
        }
    }
}

impl<R: BufRead> Iterator for JsonlReader<R> {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        if self.failed {
            return None;
        }
        loop {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {
                    self.line += 1;
                    let mut end = self.buf.len();
                    while end > 0 && matches!(self.buf[end - 1], b'\n' | b'\r') {
                        end -= 1;
                    }
                    let line = &self.buf[..end];
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let line = line.to_vec();
                    return Some(Ok(self.parse(&line)));
                }
                Err(e) => {
                    // A truncated or corrupt stream: one error row stands for the rest of the
                    // file (whatever the partial line held), then the file ends.
                    self.failed = true;
                    self.line += 1;
                    let location = format!("{}:{}", self.name, self.line);
                    let message =
                        format!("cannot read further ({e}); the rest of the file is lost");
                    return Some(Ok(Record::unreadable(location, message)));
                }
            }
        }
    }
}

/// Writes JSON lines (gzip or zstd compressed when the destination ends in `.gz` / `.zst`) to a
/// temporary file beside the destination, synced and renamed into place on `finish`, or to stdout
/// for `-`. A writer dropped without `finish` (an error, `--strict`)
/// removes its temporary file and leaves any previous output untouched.
pub struct JsonlWriter {
    out: Output,
}

enum Output {
    Stdout(BufWriter<std::io::Stdout>),
    File {
        file: Encoder,
        tmp: PathBuf,
        dest: PathBuf,
    },
    Finished,
}

/// The file's compression, chosen by the destination's extension (`.gz`, `.zst`, else plain).
enum Encoder {
    Plain(BufWriter<File>),
    Gzip(flate2::write::GzEncoder<BufWriter<File>>),
    Zstd(zstd::stream::write::Encoder<'static, BufWriter<File>>),
}

impl Encoder {
    fn new(dest: &Path, file: File) -> Result<Encoder> {
        let buf = BufWriter::with_capacity(1 << 20, file);
        let name = dest.to_string_lossy();
        Ok(if name.ends_with(".gz") {
            Encoder::Gzip(flate2::write::GzEncoder::new(
                buf,
                flate2::Compression::default(),
            ))
        } else if name.ends_with(".zst") {
            Encoder::Zstd(zstd::stream::write::Encoder::new(buf, 3)?)
        } else {
            Encoder::Plain(buf)
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Encoder::Plain(w) => w,
            Encoder::Gzip(w) => w,
            Encoder::Zstd(w) => w,
        }
    }

    /// End the compressed stream and hand back the file.
    fn finish(self) -> Result<File> {
        let buf = match self {
            Encoder::Plain(w) => w,
            Encoder::Gzip(w) => w.finish()?,
            Encoder::Zstd(w) => w.finish()?,
        };
        Ok(buf.into_inner().map_err(|e| e.into_error())?)
    }
}

impl JsonlWriter {
    pub fn create(path: &Path) -> Result<JsonlWriter> {
        if path.as_os_str() == "-" {
            return Ok(JsonlWriter {
                out: Output::Stdout(BufWriter::new(std::io::stdout())),
            });
        }
        // Hidden, and unique per process so concurrent jobs never share a temporary file.
        let tmp = temp_name(path, std::process::id())?;
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(JsonlWriter {
            out: Output::File {
                file: Encoder::new(path, file)?,
                tmp,
                dest: path.to_path_buf(),
            },
        })
    }

    fn writer(&mut self) -> &mut dyn Write {
        match &mut self.out {
            Output::Stdout(w) => w,
            Output::File { file, .. } => file.writer(),
            Output::Finished => unreachable!("write after finish"),
        }
    }
}

/// The hidden temporary name `JsonlWriter` writes `path` under, for this process.
pub(crate) fn temp_name(path: &Path, pid: u32) -> Result<PathBuf> {
    let file_name = path
        .file_name()
        .with_context(|| format!("invalid output path {}", path.display()))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(file_name);
    tmp.push(format!(".{pid}.tmp"));
    Ok(path.with_file_name(tmp))
}

/// Remove temporary files that killed writers of `path` left behind (`.NAME.<pid>.tmp`).
pub fn remove_stale_temps(path: &Path) -> Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&prefix) && n.ends_with(".tmp") {
            std::fs::remove_file(e.path())
                .with_context(|| format!("cannot remove stale {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Write `bytes` to `path` atomically (synced temporary file, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_name(path, std::process::id())?;
    let mut f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

impl RecordSink for JsonlWriter {
    fn write(&mut self, value: &Value) -> Result<()> {
        let w = self.writer();
        serde_json::to_writer(&mut *w, value)?;
        w.write_all(b"\n")?;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        match std::mem::replace(&mut self.out, Output::Finished) {
            Output::Stdout(mut w) => w.flush()?,
            Output::File { file, tmp, dest } => {
                let file = file.finish()?;
                file.sync_all()
                    .with_context(|| format!("cannot sync {}", tmp.display()))?;
                std::fs::rename(&tmp, &dest).with_context(|| {
                    format!("cannot rename {} to {}", tmp.display(), dest.display())
                })?;
            }
            Output::Finished => {}
        }
        Ok(())
    }
}

impl Drop for JsonlWriter {
    fn drop(&mut self) {
        if let Output::File { tmp, .. } = &self.out {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Vec<Record> {
        JsonlReader::new("f.jsonl".into(), bytes, FieldNames::default())
            .map(|r| r.unwrap())
            .collect()
    }

    #[test]
    fn every_nonblank_line_is_one_record() {
        let input = b"{\"id\":\"a\",\"text\":\"x\",\"source\":\"s\"}\n\n{\"text\":\"y\"}\r\n{bad\n\xff\xfe\n{\"id\":7}\n{\"text\":3}\n[1]";
        let recs = read(input);
        assert_eq!(recs.len(), 7);
        assert_eq!(
            (recs[0].id.as_str(), recs[0].source.as_deref()),
            ("a", Some("s"))
        );
        assert_eq!(recs[1].id, "f.jsonl:3");
        assert_eq!(recs[1].text, Ok("y".into()));
        assert_eq!(recs[2].text.as_ref().unwrap_err().kind(), "malformed_json");
        assert_eq!(recs[3].text.as_ref().unwrap_err().kind(), "invalid_utf8");
        assert_eq!(recs[3].id, "f.jsonl:5");
        assert_eq!(recs[4].id, "7");
        assert_eq!(recs[4].text.as_ref().unwrap_err().kind(), "missing_text");
        assert_eq!(recs[5].text.as_ref().unwrap_err().kind(), "text_not_string");
        assert_eq!(recs[6].text.as_ref().unwrap_err().kind(), "malformed_json");
        assert!(recs[2]
            .text
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("f.jsonl:4"));
    }
}
