//! Output rows, typed: what the engine made of one record (its `f32` values: scores in label
//! order, or an embedding) or why it made nothing (a [`RecordError`]), and the sinks that write
//! them. This is the one place that turns a row into JSON (plain rows and dolma attribute
//! side-cars); Parquet takes the floats as they are, with no trip through text.

use anyhow::Result;
use serde_json::{Map, Value};

use super::{Record, RecordError};
use crate::names::dolma_key_part;

/// The values every row of an output carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowValues {
    /// One score per label, in this order.
    Scores(Vec<String>),
    /// An embedding of this many values.
    Embedding(usize),
}

/// What the engine made of a record: its values, or why it has none.
pub type Outcome<'a> = std::result::Result<&'a [f32], &'a RecordError>;

/// One output row: the record (its id, source, input object and text) and its outcome.
pub struct OutputRow<'a> {
    pub record: &'a Record,
    pub outcome: Outcome<'a>,
    /// The whole text's tokens, when the job counts them (`JobOptions::count_tokens`).
    pub tokens: Option<u64>,
}

/// An ordered output: one row per input record.
pub trait RecordSink {
    fn write(&mut self, row: &OutputRow) -> Result<()>;
    /// Flush and make the output visible (atomically, for files).
    fn finish(self: Box<Self>) -> Result<()>;
}

/// How rows look as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonStyle {
    /// `{"id", "source", "scores": {"<label>": x}, "error"}` or `{"id", "source", "embedding":
    /// [...], "error"}`, after the input's fields with `--keep-input`.
    Plain,
    /// dolma attribute side-cars: `{"id", "source", "attributes": {"<experiment>__<model>__<label>":
    /// [[0, n_chars, score]]}}`, spans in Unicode code points; a row with an error has empty
    /// attributes (rows stay aligned with the documents file).
    Dolma { experiment: String, model: String },
}

/// Turns typed rows into JSON values, one rule for every JSON output.
#[derive(Debug, Clone)]
pub struct JsonRows {
    pub values: RowValues,
    pub style: JsonStyle,
}

impl JsonRows {
    pub fn row(&self, row: &OutputRow) -> Value {
        let rec = row.record;
        let dolma = matches!(self.style, JsonStyle::Dolma { .. });
        // With --keep-input the output row is the input object plus the results.
        let mut obj = rec.input.clone().unwrap_or_default();
        // An integer id stays an integer (dolma's mix compares ids with their documents').
        let id = rec
            .id_value
            .clone()
            .unwrap_or_else(|| Value::String(rec.id.clone()));
        obj.insert("id".into(), id);
        match &rec.source {
            Some(src) => {
                obj.insert("source".into(), Value::String(src.clone()));
            }
            // Every JSON Lines row has every column (`null` when absent), so schema inference
            // (polars `read_ndjson`, pandas) sees `source` and `error` from the first row.
            None if !dolma => {
                obj.insert("source".into(), Value::Null);
            }
            None => {}
        }
        let key = match (&self.style, &self.values) {
            (JsonStyle::Dolma { .. }, _) => "attributes",
            (_, RowValues::Embedding(_)) => "embedding",
            (_, RowValues::Scores(_)) => "scores",
        };
        match row.outcome {
            Err(err) => {
                if dolma {
                    obj.insert(key.into(), Value::Object(Map::new()));
                }
                obj.insert("error".into(), Value::String(err.to_string()));
            }
            Ok(values) => {
                obj.insert(key.into(), self.values_json(rec, values));
                if !dolma {
                    obj.insert("error".into(), Value::Null);
                }
            }
        }
        Value::Object(obj)
    }

    fn values_json(&self, rec: &Record, values: &[f32]) -> Value {
        match (&self.values, &self.style) {
            (RowValues::Embedding(_), _) => {
                Value::Array(values.iter().map(|v| f32_value(*v)).collect())
            }
            (RowValues::Scores(labels), JsonStyle::Plain) => Value::Object(
                labels
                    .iter()
                    .zip(values)
                    .map(|(l, v)| (l.clone(), f32_value(*v)))
                    .collect(),
            ),
            (RowValues::Scores(labels), JsonStyle::Dolma { experiment, model }) => {
                let n_chars = rec.text.as_ref().map_or(0, |t| t.chars().count());
                Value::Object(
                    labels
                        .iter()
                        .zip(values)
                        .map(|(label, v)| {
                            let key = format!(
                                "{}__{}__{}",
                                dolma_key_part(experiment),
                                dolma_key_part(model),
                                dolma_key_part(label)
                            );
                            (key, serde_json::json!([[0, n_chars, f32_value(*v)]]))
                        })
                        .collect(),
                )
            }
        }
    }
}

/// A JSON number that prints as the shortest decimal that reads back as the same f32
/// (`0.1`, not `0.10000000149011612`): a third of the bytes per embedding value, no precision lost.
pub fn f32_value(v: f32) -> Value {
    // Rust's float Display is the shortest round-trip representation.
    let short: f64 = v.to_string().parse().expect("a float's Display parses");
    serde_json::Number::from_f64(short).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id_value: Option<Value>, source: Option<&str>) -> Record {
        Record {
            id: "7".into(),
            source: source.map(str::to_string),
            text: Ok("héllo".into()),
            location: "f.jsonl:1".into(),
            input: None,
            raw: None,
            id_value,
        }
    }

    #[test]
    fn plain_rows_have_every_column_and_short_floats() {
        let rows = JsonRows {
            values: RowValues::Scores(vec!["a".into(), "b".into()]),
            style: JsonStyle::Plain,
        };
        let rec = record(None, None);
        let ok = rows.row(&OutputRow {
            record: &rec,
            tokens: None,
            outcome: Ok(&[0.1, -2.5]),
        });
        assert_eq!(
            ok.to_string(),
            r#"{"id":"7","source":null,"scores":{"a":0.1,"b":-2.5},"error":null}"#
        );
        let err = RecordError::EmptyText("f.jsonl:1: the text is empty".into());
        let bad = rows.row(&OutputRow {
            record: &rec,
            tokens: None,
            outcome: Err(&err),
        });
        assert_eq!(
            bad.to_string(),
            r#"{"id":"7","source":null,"error":"empty_text: f.jsonl:1: the text is empty"}"#
        );
    }

    #[test]
    fn dolma_rows_span_code_points_keep_integer_ids_and_stay_aligned() {
        let rows = JsonRows {
            values: RowValues::Scores(vec!["q a".into()]),
            style: JsonStyle::Dolma {
                experiment: "exp".into(),
                model: "m.1".into(),
            },
        };
        let rec = record(Some(Value::from(7)), Some("s"));
        let ok = rows.row(&OutputRow {
            record: &rec,
            tokens: None,
            outcome: Ok(&[1.5]),
        });
        assert_eq!(
            ok.to_string(),
            r#"{"id":7,"source":"s","attributes":{"exp__m_1__q_a":[[0,5,1.5]]}}"#
        );
        let err = RecordError::NonFiniteOutput("f.jsonl:1: NaN".into());
        let bad = rows.row(&OutputRow {
            record: &rec,
            tokens: None,
            outcome: Err(&err),
        });
        assert_eq!(
            bad.to_string(),
            r#"{"id":7,"source":"s","attributes":{},"error":"non_finite_output: f.jsonl:1: NaN"}"#
        );
    }
}
