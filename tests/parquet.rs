//! Parquet in and out: rows in equal rows out, ids and order kept, null text reported per row.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use arrow_array::{Array, Float32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use common::*;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;

fn write_input(path: &Path) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("text", DataType::Utf8, true),
        Field::new("source", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![10, 11, 12])),
            Arc::new(StringArray::from(vec![
                Some("first document"),
                None,
                Some("third, with more words"),
            ])),
            Arc::new(StringArray::from(vec![Some("web"), Some("web"), None])),
        ],
    )
    .unwrap();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// The single batch of a small Parquet output.
fn read_output(path: &Path) -> RecordBatch {
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let mut batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    assert_eq!(batches.len(), 1, "small outputs are written as one batch");
    batches.remove(0)
}

fn mira(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mira"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn parquet_scores_keep_every_row_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("docs.parquet");
    write_input(&input);
    let out = tmp.path().join("scores.parquet");
    let model = fixture_model("bert-cls-regression");
    let o = mira(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--format",
        "parquet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b = read_output(&out);
    assert_eq!(b.num_rows(), 3);
    let ids = b
        .column_by_name("id")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    assert_eq!(
        (ids.value(0), ids.value(1), ids.value(2)),
        ("10", "11", "12")
    );
    let source = b
        .column_by_name("source")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    assert!(source.value(0) == "web" && source.is_null(2));
    let errors = b
        .column_by_name("error")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    assert!(
        errors.is_null(0)
            && errors.value(1).starts_with("missing_text")
            && errors.value(1).contains("row 2")
    );
    let clarity = b
        .column_by_name("clarity")
        .unwrap()
        .as_any()
        .downcast_ref::<Float32Array>()
        .unwrap();
    assert!(clarity.is_null(1));
    let scorer = mira::Scorer::load(&model, mira::Device::Cpu).unwrap();
    let want = scorer
        .score(&["first document", "third, with more words"])
        .unwrap();
    let c = want.labels.iter().position(|l| l == "clarity").unwrap();
    assert_eq!(
        (clarity.value(0), clarity.value(2)),
        (want.row(0)[c], want.row(1)[c])
    );
    assert_eq!(
        b.num_columns(),
        3 + 12,
        "id, source, error and one column per label"
    );
}

#[test]
fn parquet_embeddings_and_per_file_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("in");
    std::fs::create_dir_all(&dir).unwrap();
    write_input(&dir.join("a.parquet"));
    let out = tmp.path().join("out");
    let model = fixture_model("bert-base-bf16");
    let o = mira(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--input",
        dir.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--format",
        "parquet",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join(".mira/done/a.parquet.done").exists());
    let b = read_output(&out.join("a.parquet"));
    let emb = b.column_by_name("embedding").unwrap();
    assert!(matches!(emb.data_type(), DataType::FixedSizeList(_, 32)));
    assert!(!emb.is_null(0) && emb.is_null(1) && !emb.is_null(2));
}
