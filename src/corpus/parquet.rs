//! Parquet input and output (arrow-rs).
//!
//! Reading: every row becomes a [`Record`] (text, id and source columns by name; string, large
//! string or string-view columns; integer ids are printed). A missing or null text is a record
//! error, so rows in equal rows out; the location of a row is `<file>:row <n>` (1-based).
//!
//! Writing: `id`, `source` and `error` string columns, then either one nullable `float32` column
//! per label (scores) or a nullable fixed-size list of `float32` (embeddings), written through
//! an [`OutputFile`] like the JSONL writer (atomic for a regular file, streamed to stdout, a FIFO
//! or a device).

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, ensure, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ArrowWriter;
use serde_json::Value;

use super::output::OutputFile;
use super::rows::{OutputRow, RecordSink, RowValues};
use super::{FieldNames, Record, RecordError};

/// Rows of a Parquet file as records, batch by batch.
pub struct ParquetReader {
    name: String,
    fields: FieldNames,
    batches: Batches,
    current: Option<RecordBatch>,
    /// The current batch's rows as JSON objects, with `--keep-input`.
    current_json: Vec<Option<serde_json::Map<String, Value>>>,
    row_in_batch: usize,
    row: usize,
    failed: bool,
}

/// Run a call into the parquet crate, turning a panic into an error naming the file: the crate
/// asserts on some corrupt files (a negative column offset, found by `tests/fuzz.rs`), and a
/// damaged input must not take the job down.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        Err(anyhow!(
            "{} is a corrupt Parquet file (the reader failed: {why})",
            path.display()
        ))
    })
}

/// The record batches of a Parquet file, `batch_size` rows each; a file the parquet crate
/// cannot read (even one that makes it panic) is an error naming it.
pub struct Batches {
    path: PathBuf,
    schema: arrow_schema::SchemaRef,
    reader: ParquetRecordBatchReader,
}

impl Batches {
    pub fn open(path: &Path, batch_size: usize) -> Result<Batches> {
        let file =
            File::open(path).with_context(|| format!("cannot open input {}", path.display()))?;
        guarded(path, || {
            let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
            let schema = builder.schema().clone();
            let reader = builder.with_batch_size(batch_size).build()?;
            Ok(Batches {
                path: path.to_path_buf(),
                schema,
                reader,
            })
        })
        .map_err(|e| anyhow!("{} is not a readable Parquet file: {e:#}", path.display()))
    }

    pub fn schema(&self) -> arrow_schema::SchemaRef {
        self.schema.clone()
    }
}

impl Iterator for Batches {
    type Item = Result<RecordBatch>;
    fn next(&mut self) -> Option<Result<RecordBatch>> {
        let path = self.path.clone();
        let reader = &mut self.reader;
        match guarded(&path, || Ok(reader.next())) {
            Ok(None) => None,
            Ok(Some(batch)) => Some(batch.map_err(|e| anyhow!("{}: {e}", path.display()))),
            Err(e) => Some(Err(e)),
        }
    }
}

impl ParquetReader {
    pub fn open(path: &Path, fields: FieldNames) -> Result<ParquetReader> {
        let batches = Batches::open(path, 1024)?;
        Ok(ParquetReader {
            name: path.display().to_string(),
            fields,
            batches,
            current: None,
            current_json: Vec::new(),
            row_in_batch: 0,
            row: 0,
            failed: false,
        })
    }

    fn record(&self, batch: &RecordBatch, i: usize) -> Record {
        let location = format!("{}:row {}", self.name, self.row);
        let id = cell_string(batch, &self.fields.id, i).unwrap_or_else(|| location.clone());
        let id_value = column(batch, &self.fields.id)
            .filter(|c| !c.is_null(i) && string_at(c, i).is_none())
            .and_then(|_| {
                let signed = id.parse::<i64>().ok().map(Value::from);
                signed.or_else(|| id.parse::<u64>().ok().map(Value::from))
            });
        let source = cell_string(batch, &self.fields.source, i);
        let text = match column(batch, &self.fields.text) {
            None => Err(RecordError::MissingText(format!(
                "{location}: no '{}' column",
                self.fields.text
            ))),
            Some(col) if col.is_null(i) => Err(RecordError::MissingText(format!(
                "{location}: '{}' is null",
                self.fields.text
            ))),
            Some(col) => match string_at(col, i) {
                Some(t) => Ok(t),
                None => Err(RecordError::TextNotString(format!(
                    "{location}: column '{}' is {}, not a string",
                    self.fields.text,
                    col.data_type()
                ))),
            },
        };
        Record {
            id,
            source,
            text,
            location,
            input: None,
            raw: None,
            id_value,
        }
    }
}

/// Every row of a batch as a JSON object (arrow-json's encoding: nested structs and lists as
/// JSON, nulls left out).
pub fn json_rows(batch: &RecordBatch) -> Result<Vec<serde_json::Map<String, Value>>> {
    let mut buf = Vec::new();
    let mut w = arrow_json::ArrayWriter::new(&mut buf);
    w.write(batch)?;
    w.finish()?;
    drop(w);
    Ok(if buf.is_empty() {
        Vec::new()
    } else {
        serde_json::from_slice(&buf)?
    })
}

/// The column at `path`: a top-level column of that name, else a dotted path into struct
/// columns (`metadata.content`).
fn column<'a>(batch: &'a RecordBatch, path: &str) -> Option<&'a ArrayRef> {
    if let Some(c) = batch.column_by_name(path) {
        return Some(c);
    }
    let mut parts = path.split('.');
    let mut col = batch.column_by_name(parts.next()?)?;
    for part in parts {
        col = col.as_struct_opt()?.column_by_name(part)?;
    }
    Some(col)
}

/// The string value of a string-typed column at `i`: plain, large and view strings, and
/// dictionary-encoded strings (pandas categoricals, polars `Categorical`).
fn string_at(col: &ArrayRef, i: usize) -> Option<String> {
    if let Some(d) = col.as_any_dictionary_opt() {
        return string_at(d.values(), dictionary_key(d.keys(), i)?);
    }
    if let Some(a) = col.as_string_opt::<i32>() {
        return Some(a.value(i).to_string());
    }
    if let Some(a) = col.as_string_opt::<i64>() {
        return Some(a.value(i).to_string());
    }
    col.as_string_view_opt().map(|a| a.value(i).to_string())
}

/// The dictionary index at row `i`, whatever the key type.
fn dictionary_key(keys: &dyn Array, i: usize) -> Option<usize> {
    use arrow_array::types::{Int16Type, Int8Type, UInt16Type, UInt8Type};
    macro_rules! key_of {
        ($($t:ty),*) => {
            $(if let Some(k) = keys.as_primitive_opt::<$t>() {
                return usize::try_from(k.value(i)).ok();
            })*
        };
    }
    key_of!(
        Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type
    );
    None
}

/// A string or integer cell as text; `None` when the column is absent or the cell null.
fn cell_string(batch: &RecordBatch, name: &str, i: usize) -> Option<String> {
    let col = column(batch, name)?;
    if col.is_null(i) {
        return None;
    }
    string_at(col, i)
        .or_else(|| {
            col.as_primitive_opt::<Int64Type>()
                .map(|a| a.value(i).to_string())
        })
        .or_else(|| {
            col.as_primitive_opt::<Int32Type>()
                .map(|a| a.value(i).to_string())
        })
        .or_else(|| {
            col.as_primitive_opt::<UInt64Type>()
                .map(|a| a.value(i).to_string())
        })
        .or_else(|| {
            col.as_primitive_opt::<UInt32Type>()
                .map(|a| a.value(i).to_string())
        })
}

impl Iterator for ParquetReader {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(batch) = &self.current {
                if self.row_in_batch < batch.num_rows() {
                    self.row += 1;
                    let mut rec = self.record(batch, self.row_in_batch);
                    if let Some(slot) = self.current_json.get_mut(self.row_in_batch) {
                        rec.input = slot.take();
                    }
                    self.row_in_batch += 1;
                    return Some(Ok(rec));
                }
            }
            match self.batches.next()? {
                Ok(batch) => {
                    self.current_json = if self.fields.keep_input {
                        match json_rows(&batch) {
                            Ok(rows) => rows.into_iter().map(Some).collect(),
                            Err(e) => {
                                self.failed = true;
                                self.row += 1;
                                let location = format!("{}:row {}", self.name, self.row);
                                let message = format!("cannot convert rows to JSON ({e:#})");
                                return Some(Ok(Record::unreadable(location, message)));
                            }
                        }
                    } else {
                        Vec::new()
                    };
                    self.current = Some(batch);
                    self.row_in_batch = 0;
                }
                Err(e) => {
                    // A corrupt or truncated file: one error row stands for the unreadable rest.
                    self.failed = true;
                    self.row += 1;
                    let location = format!("{}:row {}", self.name, self.row);
                    let message =
                        format!("cannot read further ({e}); the rest of the file is lost");
                    return Some(Ok(Record::unreadable(location, message)));
                }
            }
        }
    }
}

/// What a Parquet output holds besides id, source and error.
/// One typed output row, as the Parquet writer keeps it until its batch is written.
struct Row {
    id: String,
    source: Option<String>,
    error: Option<String>,
    values: Option<Vec<f32>>,
}

/// Writes output rows as Parquet: `id`, `source`, `error` and one `float32` column per label (or
/// an `embedding` fixed-size list).
pub struct ParquetWriter {
    writer: Option<ArrowWriter<BufWriter<OutputFile>>>,
    schema: Arc<Schema>,
    columns: RowValues,
    rows: Vec<Row>,
    dest: PathBuf,
}

const ROWS_PER_BATCH: usize = 8192;

impl ParquetWriter {
    pub fn create(path: &Path, columns: RowValues) -> Result<ParquetWriter> {
        let mut fields = vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("source", DataType::Utf8, true),
            Field::new("error", DataType::Utf8, true),
        ];
        match &columns {
            RowValues::Scores(labels) => fields.extend(
                labels
                    .iter()
                    .map(|l| Field::new(l, DataType::Float32, true)),
            ),
            RowValues::Embedding(dim) => fields.push(Field::new(
                "embedding",
                DataType::FixedSizeList(
                    Arc::new(Field::new("item", DataType::Float32, true)),
                    *dim as i32,
                ),
                true,
            )),
        }
        let schema = Arc::new(Schema::new(fields));
        // Parquet needs no seeking: it streams to stdout, a FIFO or a device as well.
        let file = BufWriter::with_capacity(1 << 20, OutputFile::create(path)?);
        let writer = ArrowWriter::try_new(file, schema.clone(), None)
            .map_err(|e| anyhow!("cannot write Parquet {}: {e}", path.display()))?;
        Ok(ParquetWriter {
            writer: Some(writer),
            schema,
            columns,
            rows: Vec::new(),
            dest: path.to_path_buf(),
        })
    }

    fn flush(&mut self) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let ids: StringArray = self.rows.iter().map(|r| Some(r.id.as_str())).collect();
        let sources: StringArray = self.rows.iter().map(|r| r.source.as_deref()).collect();
        let errors: StringArray = self.rows.iter().map(|r| r.error.as_deref()).collect();
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(ids), Arc::new(sources), Arc::new(errors)];
        match &self.columns {
            RowValues::Scores(labels) => {
                for l in 0..labels.len() {
                    let col: Float32Array = self
                        .rows
                        .iter()
                        .map(|r| r.values.as_ref().map(|v| v[l]))
                        .collect();
                    arrays.push(Arc::new(col));
                }
            }
            RowValues::Embedding(dim) => {
                let list = FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(
                    self.rows
                        .iter()
                        .map(|r| r.values.as_ref().map(|v| v.iter().map(|x| Some(*x)))),
                    *dim as i32,
                );
                arrays.push(Arc::new(list));
            }
        }
        let batch = RecordBatch::try_new(self.schema.clone(), arrays).map_err(|e| {
            anyhow!(
                "cannot build a Parquet batch for {}: {e}",
                self.dest.display()
            )
        })?;
        self.writer
            .as_mut()
            .expect("writer open until finish")
            .write(&batch)
            .map_err(|e| anyhow!("cannot write {}: {e}", self.dest.display()))?;
        self.rows.clear();
        Ok(())
    }
}

impl RecordSink for ParquetWriter {
    fn write(&mut self, row: &OutputRow) -> Result<()> {
        let want = match &self.columns {
            RowValues::Scores(labels) => labels.len(),
            RowValues::Embedding(dim) => *dim,
        };
        let values = match row.outcome {
            Ok(values) => {
                ensure!(
                    values.len() == want,
                    "{}: {} values for {} columns",
                    row.record.location,
                    values.len(),
                    want
                );
                Some(values.to_vec())
            }
            Err(_) => None,
        };
        self.rows.push(Row {
            id: row.record.id.clone(),
            source: row.record.source.clone(),
            error: row.outcome.err().map(ToString::to_string),
            values,
        });
        if self.rows.len() >= ROWS_PER_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.flush()?;
        let file = self
            .writer
            .take()
            .expect("finish runs once")
            .into_inner()
            .map_err(|e| anyhow!("cannot finish {}: {e}", self.dest.display()))?;
        file.into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", self.dest.display()))?
            .commit()
    }
}
