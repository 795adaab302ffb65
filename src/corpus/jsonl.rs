//! JSON Lines: one record per line. Blank lines are not records and are skipped; every other
//! line yields exactly one [`Record`], valid or not, so input rows equal output rows.

use std::io::{BufRead, BufWriter, Read, Write};
use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use super::output::OutputFile;
use super::rows::{JsonRows, OutputRow, RecordSink};
use super::{FieldNames, Record, RecordError};

/// The longest line read as a record: 256 MiB. A longer one (an endless line, a file that is not
/// JSON Lines) is one `line_too_long` error row naming `file:line`, read past in bounded memory.
pub const MAX_LINE_BYTES: usize = 256 << 20;

pub struct JsonlReader<R> {
    name: String,
    reader: R,
    line: usize,
    fields: FieldNames,
    buf: Vec<u8>,
    /// A read error ended the stream.
    failed: bool,
    max_line: usize,
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
            max_line: MAX_LINE_BYTES,
        }
    }

    /// Another line limit than [`MAX_LINE_BYTES`].
    pub fn with_max_line(mut self, bytes: usize) -> Self {
        self.max_line = bytes;
        self
    }

    /// Read past the rest of an overlong line, holding at most one buffer of it.
    fn skip_line(&mut self) -> std::io::Result<()> {
        loop {
            let available = self.reader.fill_buf()?;
            if available.is_empty() {
                return Ok(());
            }
            if let Some(pos) = available.iter().position(|&b| b == b'\n') {
                self.reader.consume(pos + 1);
                return Ok(());
            }
            let n = available.len();
            self.reader.consume(n);
        }
    }

    fn parse(&self, line: &[u8]) -> Record {
        let location = format!("{}:{}", self.name, self.line);
        let fallback_id = location.clone();
        let raw = self.fields.keep_raw.then(|| line.to_vec());
        let fail = |e: RecordError| Record {
            id: fallback_id.clone(),
            source: None,
            text: Err(e),
            location: location.clone(),
            input: None,
            raw: raw.clone(),
            id_value: None,
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
        let (id, id_value) = match super::lookup(&value, &self.fields.id) {
            Some(Value::String(s)) => (s.clone(), None),
            Some(Value::Null) | None => (fallback_id.clone(), None),
            Some(n @ Value::Number(_)) => (n.to_string(), Some(n.clone())),
            Some(other) => (other.to_string(), None),
        };
        let source = match super::lookup(&value, &self.fields.source) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Null) | None => None,
            Some(other) => Some(other.to_string()),
        };
        let text = match super::lookup(&value, &self.fields.text) {
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
            raw,
            id_value,
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
            let limit = self.max_line as u64 + 1;
            match (&mut self.reader)
                .take(limit)
                .read_until(b'\n', &mut self.buf)
            {
                Ok(0) => return None,
                Ok(_) if self.buf.len() > self.max_line => {
                    self.line += 1;
                    let location = format!("{}:{}", self.name, self.line);
                    self.buf = Vec::new();
                    if let Err(e) = self.skip_line() {
                        self.failed = true;
                        let message =
                            format!("cannot read further ({e}); the rest of the file is lost");
                        return Some(Ok(Record::unreadable(location, message)));
                    }
                    return Some(Ok(Record {
                        id: location.clone(),
                        source: None,
                        text: Err(RecordError::LineTooLong(format!(
                            "{location}: the line is longer than {} bytes; skipped",
                            self.max_line
                        ))),
                        location,
                        input: None,
                        raw: None,
                        id_value: None,
                    }));
                }
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

/// Writes JSON lines (gzip or zstd compressed when the destination ends in `.gz` / `.zst`) to an
/// [`OutputFile`]: atomically for a regular file, streamed for stdout (`-`), a FIFO or a device.
/// A writer dropped without `finish` (an error, `--strict`) removes its temporary file and
/// leaves any previous output untouched.
pub struct JsonlWriter {
    out: Option<Encoder>,
}

/// The output's compression, chosen by the destination's extension (`.gz`, `.zst`, else plain).
enum Encoder {
    Plain(BufWriter<OutputFile>),
    Gzip(flate2::write::GzEncoder<BufWriter<OutputFile>>),
    Zstd(zstd::stream::write::Encoder<'static, BufWriter<OutputFile>>),
}

impl Encoder {
    fn new(dest: &Path, file: OutputFile) -> Result<Encoder> {
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

    /// End the compressed stream and hand back the output.
    fn finish(self) -> Result<OutputFile> {
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
        Ok(JsonlWriter {
            out: Some(Encoder::new(path, OutputFile::create(path)?)?),
        })
    }
}

impl JsonlWriter {
    /// Write one line as it is (a kept record, byte for byte), followed by a newline.
    pub fn write_line(&mut self, line: &[u8]) -> Result<()> {
        let w = self.out.as_mut().expect("write before finish").writer();
        w.write_all(line)?;
        w.write_all(b"\n")?;
        Ok(())
    }
}

impl JsonlWriter {
    /// Write one JSON value as a line.
    pub fn write_value(&mut self, value: &Value) -> Result<()> {
        let w = self.out.as_mut().expect("write before finish").writer();
        serde_json::to_writer(&mut *w, value)?;
        w.write_all(b"\n")?;
        Ok(())
    }

    /// End the stream and make the output visible (atomically, for files).
    pub fn finish(mut self) -> Result<()> {
        if let Some(enc) = self.out.take() {
            enc.finish()?.commit()?;
        }
        Ok(())
    }
}

/// Typed output rows as JSON Lines (plain rows or dolma side-cars).
pub struct JsonlRowWriter {
    out: JsonlWriter,
    rows: JsonRows,
}

impl JsonlRowWriter {
    pub fn create(path: &Path, rows: JsonRows) -> Result<JsonlRowWriter> {
        Ok(JsonlRowWriter {
            out: JsonlWriter::create(path)?,
            rows,
        })
    }
}

impl RecordSink for JsonlRowWriter {
    fn write(&mut self, row: &OutputRow) -> Result<()> {
        self.out.write_value(&self.rows.row(row))
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.out.finish()
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
    fn an_overlong_line_is_one_error_row_and_reading_goes_on() {
        let long = "x".repeat(100);
        let input =
            format!("{{\"text\":\"a\"}}\n{{\"text\":\"{long}\"}}\n{{\"text\":\"b\"}}\n{long}");
        let recs: Vec<Record> =
            JsonlReader::new("f.jsonl".into(), input.as_bytes(), FieldNames::default())
                .with_max_line(50)
                .map(|r| r.unwrap())
                .collect();
        assert_eq!(recs.len(), 4);
        assert_eq!(recs[0].text, Ok("a".into()));
        let e = recs[1].text.as_ref().unwrap_err();
        assert_eq!(e.kind(), "line_too_long");
        assert!(e.to_string().contains("f.jsonl:2"), "{e}");
        assert_eq!(recs[2].text, Ok("b".into()));
        assert_eq!(recs[3].text.as_ref().unwrap_err().kind(), "line_too_long");
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
