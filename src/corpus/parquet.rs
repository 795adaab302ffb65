//! Parquet input and output (arrow-rs).
//!
//! Reading: every row becomes a [`Record`] (text, id and source columns by name; string, large
//! string or string-view columns; integer ids are printed). A missing or null text is a record
//! error, so rows in equal rows out; the location of a row is `<file>:row <n>` (1-based).
//!
//! Writing: `id`, `source` and `error` string columns, then either one nullable `float32` column
//! per label (scores) or a nullable fixed-size list of `float32` (embeddings), written to a
//! temporary file and renamed into place on `finish`, like the JSONL writer.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ArrowWriter;
use serde_json::Value;

use super::{FieldNames, Record, RecordError, RecordSink};

/// Rows of a Parquet file as records, batch by batch.
pub struct ParquetReader {
    name: String,
    fields: FieldNames,
    batches: ParquetRecordBatchReader,
    current: Option<RecordBatch>,
    row_in_batch: usize,
    row: usize,
    failed: bool,
}

impl ParquetReader {
    pub fn open(path: &Path, fields: FieldNames) -> Result<ParquetReader> {
        let file =
            File::open(path).with_context(|| format!("cannot open input {}", path.display()))?;
        let batches = ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.with_batch_size(1024).build())
            .map_err(|e| anyhow!("{} is not a readable Parquet file: {e}", path.display()))?;
        Ok(ParquetReader {
            name: path.display().to_string(),
            fields,
            batches,
            current: None,
            row_in_batch: 0,
            row: 0,
            failed: false,
        })
    }

    fn record(&self, batch: &RecordBatch, i: usize) -> Record {
        let location = format!("{}:row {}", self.name, self.row);
        let id = cell_string(batch, &self.fields.id, i).unwrap_or_else(|| location.clone());
        let source = cell_string(batch, &self.fields.source, i);
        let text = match batch.column_by_name(&self.fields.text) {
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
        }
    }
}

/// The string value of a string-typed column at `i`.
fn string_at(col: &ArrayRef, i: usize) -> Option<String> {
    if let Some(a) = col.as_string_opt::<i32>() {
        return Some(a.value(i).to_string());
    }
    if let Some(a) = col.as_string_opt::<i64>() {
        return Some(a.value(i).to_string());
    }
    col.as_string_view_opt().map(|a| a.value(i).to_string())
}

/// A string or integer cell as text; `None` when the column is absent or the cell null.
fn cell_string(batch: &RecordBatch, name: &str, i: usize) -> Option<String> {
    let col = batch.column_by_name(name)?;
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
                    let rec = self.record(batch, self.row_in_batch);
                    self.row_in_batch += 1;
                    return Some(Ok(rec));
                }
            }
            match self.batches.next()? {
                Ok(batch) => {
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
#[derive(Debug, Clone)]
pub enum ParquetColumns {
    /// One `float32` column per label.
    Scores(Vec<String>),
    /// A fixed-size list of `dim` floats.
    Embedding(usize),
}

/// Writes output rows (`{"id", "source", "scores" | "embedding", "error"}`) as Parquet.
pub struct ParquetWriter {
    writer: Option<ArrowWriter<File>>,
    schema: Arc<Schema>,
    columns: ParquetColumns,
    rows: Vec<Value>,
    tmp: PathBuf,
    dest: PathBuf,
}

const ROWS_PER_BATCH: usize = 8192;

impl ParquetWriter {
    pub fn create(path: &Path, columns: ParquetColumns) -> Result<ParquetWriter> {
        let mut fields = vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("source", DataType::Utf8, true),
            Field::new("error", DataType::Utf8, true),
        ];
        match &columns {
            ParquetColumns::Scores(labels) => fields.extend(
                labels
                    .iter()
                    .map(|l| Field::new(l, DataType::Float32, true)),
            ),
            ParquetColumns::Embedding(dim) => fields.push(Field::new(
                "embedding",
                DataType::FixedSizeList(
                    Arc::new(Field::new("item", DataType::Float32, true)),
                    *dim as i32,
                ),
                true,
            )),
        }
        let schema = Arc::new(Schema::new(fields));
        let tmp = super::jsonl::temp_name(path, std::process::id())?;
        let file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let writer = ArrowWriter::try_new(file, schema.clone(), None)
            .map_err(|e| anyhow!("cannot write Parquet {}: {e}", path.display()))?;
        Ok(ParquetWriter {
            writer: Some(writer),
            schema,
            columns,
            rows: Vec::new(),
            tmp,
            dest: path.to_path_buf(),
        })
    }

    fn flush(&mut self) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let text = |key: &str| -> StringArray {
            self.rows
                .iter()
                .map(|r| r.get(key).and_then(Value::as_str).map(str::to_string))
                .collect()
        };
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(text("id")),
            Arc::new(text("source")),
            Arc::new(text("error")),
        ];
        match &self.columns {
            ParquetColumns::Scores(labels) => {
                for l in labels {
                    let col: Float32Array = self
                        .rows
                        .iter()
                        .map(|r| {
                            r.get("scores")
                                .and_then(|s| s.get(l))
                                .and_then(Value::as_f64)
                                .map(|v| v as f32)
                        })
                        .collect();
                    arrays.push(Arc::new(col));
                }
            }
            ParquetColumns::Embedding(dim) => {
                let list = FixedSizeListArray::from_iter_primitive::<Float32Type, _, _>(
                    self.rows.iter().map(|r| {
                        r.get("embedding").and_then(Value::as_array).map(|a| {
                            a.iter()
                                .map(|v| v.as_f64().map(|x| x as f32))
                                .collect::<Vec<_>>()
                        })
                    }),
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
            .map_err(|e| anyhow!("cannot write {}: {e}", self.tmp.display()))?;
        self.rows.clear();
        Ok(())
    }
}

impl RecordSink for ParquetWriter {
    fn write(&mut self, value: &Value) -> Result<()> {
        if value.get("id").and_then(Value::as_str).is_none() {
            bail!("output row without an id");
        }
        self.rows.push(value.clone());
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
            .map_err(|e| anyhow!("cannot finish {}: {e}", self.tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot sync {}", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.dest).with_context(|| {
            format!(
                "cannot rename {} to {}",
                self.tmp.display(),
                self.dest.display()
            )
        })
    }
}

impl Drop for ParquetWriter {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
