//! `mira._mira`: the Python extension module, built from the mira library (never the CLI).
//!
//! `Scorer` loads a checkpoint folder once and scores or embeds texts with the same rules and
//! numbers as `mira score`/`mira embed` (`mira::pipeline::run_records`). The GIL is released while
//! it tokenizes and runs, and a `Scorer` may be used from several Python threads at once.
//!
//! Fork safety: the CPU work runs on a thread pool that belongs to the process that made it. A
//! child made by `fork` (multiprocessing, Ray and datatrove workers) has none of its parent's
//! threads, so a `Scorer` used in a child builds a pool of its own there instead of waiting
//! forever on the parent's (the known trap of Rust thread pools, and of tokenizers', after fork).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use numpy::{PyArray1, PyArray2, PyArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use mira::corpus::Record;
use mira::engine::Precision;
use mira::pipeline::{run_records, Task};
use mira::{Device, LoadOptions, Packer};

/// A rayon pool and the process it was made in.
struct ProcessPool {
    pid: u32,
    pool: Arc<rayon::ThreadPool>,
}

/// A mira model, loaded once, that scores or embeds texts.
///
/// ``Scorer(model_dir, device="auto", precision="auto", max_tokens=None, batch_tokens=None,
/// threads=None)``: ``device`` is ``auto``, ``cpu``, ``wgpu[:N]`` or ``cuda[:N]``; ``precision``
/// ``auto``, ``f32``, ``f16``, ``bf16`` or ``int8`` (CPU only; check it with ``mira bench
/// --precision int8 --against f32``); ``max_tokens`` truncates (default: the
/// model's own limit); ``batch_tokens`` caps the tokens of one batch; ``threads`` is the CPU
/// threads (default: ``RAYON_NUM_THREADS``, else every core).
#[pyclass(frozen, module = "mira._mira", name = "Scorer")]
struct Scorer {
    scorer: mira::Scorer,
    threads: Option<usize>,
    pool: Mutex<Option<ProcessPool>>,
}

/// Turns any error of mira into a Python exception with mira's whole message (file, tensor or
/// line included).
fn runtime_error(e: anyhow::Error) -> PyErr {
    PyRuntimeError::new_err(format!("{e:#}"))
}

/// The texts of a list, tuple, numpy array, pandas Series or pyarrow (chunked) array: a `str`
/// per item, `None` for a missing one (any other type is an error naming its index).
fn texts_of(texts: &Bound<'_, PyAny>) -> PyResult<Vec<Option<String>>> {
    if texts.is_instance_of::<pyo3::types::PyString>() {
        return Err(PyValueError::new_err(
            "texts must be a sequence of str, not one str: wrap it in a list",
        ));
    }
    // pyarrow arrays iterate as pyarrow scalars: take them as Python values first.
    let list = if texts.hasattr("to_pylist")? {
        texts.call_method0("to_pylist")?
    } else {
        texts.clone()
    };
    let mut out = Vec::new();
    for (i, item) in list.try_iter()?.enumerate() {
        let item = item?;
        if item.is_none() {
            out.push(None);
        } else {
            let text: String = item.extract().map_err(|_| {
                let kind = item
                    .get_type()
                    .name()
                    .map_or_else(|_| "?".to_string(), |n| n.to_string());
                PyValueError::new_err(format!("texts[{i}] is a {kind}, not a str"))
            })?;
            out.push(Some(text));
        }
    }
    Ok(out)
}

/// `(index, kind, message)` of each text mira could not take.
type Errors = Vec<(usize, String, String)>;

/// The outputs of a task over some texts: a row per text (NaN for a text mira could not take)
/// and `(index, kind, message)` per such text.
struct Outputs {
    width: usize,
    values: Vec<f32>,
    errors: Errors,
}

impl Scorer {
    /// This process's pool (made on first use, and again in a child after `fork`).
    fn pool(&self) -> PyResult<Arc<rayon::ThreadPool>> {
        let pid = std::process::id();
        let mut held = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = held.as_ref().filter(|p| p.pid == pid) {
            return Ok(p.pool.clone());
        }
        if let Some(old) = held.take() {
            // Forked: the old pool's threads exist only in the parent. Dropping it here would
            // signal threads that are not there; let it go without a drop.
            std::mem::forget(old);
        }
        let mut builder = rayon::ThreadPoolBuilder::new();
        if let Some(n) = self.threads {
            builder = builder.num_threads(n);
        }
        let pool = Arc::new(
            builder
                .build()
                .map_err(|e| PyRuntimeError::new_err(format!("cannot start threads: {e}")))?,
        );
        *held = Some(ProcessPool {
            pid,
            pool: pool.clone(),
        });
        Ok(pool)
    }

    fn width(&self, task: Task) -> usize {
        match (task, self.scorer.head()) {
            (Task::Score, Some(h)) => h.labels.len(),
            _ => self.scorer.embedding_dim(),
        }
    }

    fn run(&self, py: Python<'_>, task: Task, texts: &Bound<'_, PyAny>) -> PyResult<Outputs> {
        if task == Task::Score && self.scorer.head().is_none() {
            return Err(PyValueError::new_err(format!(
                "{} has no classification head: use embed(), or a checkpoint with a classifier",
                self.scorer.model_dir().display()
            )));
        }
        let texts = texts_of(texts)?;
        let pool = self.pool()?;
        let width = self.width(task);
        let results = py
            .detach(|| {
                let records: Vec<Record> = texts
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| Record::in_memory(format!("texts[{i}]"), t))
                    .collect();
                pool.install(|| run_records(&self.scorer, task, records))
            })
            .map_err(runtime_error)?;
        let mut values = Vec::with_capacity(results.len() * width);
        let mut errors = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(v) => values.extend_from_slice(&v),
                Err(e) => {
                    values.extend(std::iter::repeat_n(f32::NAN, width));
                    errors.push((i, e.kind().to_string(), e.message().to_string()));
                }
            }
        }
        Ok(Outputs {
            width,
            values,
            errors,
        })
    }

    /// The outputs as an `(n, width)` float32 array, and the error list.
    fn to_python<'py>(
        &self,
        py: Python<'py>,
        out: Outputs,
    ) -> PyResult<(Bound<'py, PyArray2<f32>>, Errors)> {
        let n = out.values.len() / out.width.max(1);
        let array = PyArray1::from_vec(py, out.values).reshape([n, out.width])?;
        Ok((array, out.errors))
    }

    /// `errors="raise"`: the first record error as a ValueError; `"nan"`: nothing.
    fn check_errors(out: &Outputs, errors: &str) -> PyResult<()> {
        match errors {
            "nan" => Ok(()),
            "raise" => match out.errors.first() {
                Some((_, kind, message)) => Err(PyValueError::new_err(format!(
                    "{message} ({kind}); pass errors=\"nan\" to get NaN for such texts instead"
                ))),
                None => Ok(()),
            },
            other => Err(PyValueError::new_err(format!(
                "errors must be \"raise\" or \"nan\", not {other:?}"
            ))),
        }
    }
}

#[pymethods]
impl Scorer {
    #[new]
    #[pyo3(signature = (model_dir, device="auto", precision="auto", max_tokens=None, batch_tokens=None, threads=None, base_model=None, cuda_graphs=None))]
    #[allow(clippy::too_many_arguments)] // the Python keyword arguments, one each
    fn new(
        py: Python<'_>,
        model_dir: PathBuf,
        device: &str,
        precision: &str,
        max_tokens: Option<usize>,
        batch_tokens: Option<usize>,
        threads: Option<usize>,
        base_model: Option<PathBuf>,
        cuda_graphs: Option<usize>,
    ) -> PyResult<Scorer> {
        if !model_dir.is_dir() {
            return Err(PyFileNotFoundError::new_err(format!(
                "model folder {} does not exist (or is not a folder)",
                model_dir.display()
            )));
        }
        let device: Device = device
            .parse()
            .map_err(|e: anyhow::Error| PyValueError::new_err(format!("device: {e:#}")))?;
        let precision: Precision = precision
            .parse()
            .map_err(|e: anyhow::Error| PyValueError::new_err(format!("precision: {e:#}")))?;
        if threads == Some(0) || batch_tokens == Some(0) || max_tokens == Some(0) {
            return Err(PyValueError::new_err(
                "threads, batch_tokens and max_tokens must be at least 1",
            ));
        }
        let opts = LoadOptions {
            max_tokens,
            packer: batch_tokens.map(|n| Packer {
                max_batch_tokens: n,
                ..Packer::default()
            }),
            precision,
            cuda_graph_tokens: cuda_graphs.unwrap_or(mira::scorer::DEFAULT_CUDA_GRAPH_TOKENS),
            base_model,
        };
        let scorer = py
            .detach(|| mira::Scorer::load_with(&model_dir, device, opts))
            .map_err(runtime_error)?;
        Ok(Scorer {
            scorer,
            threads,
            pool: Mutex::new(None),
        })
    }

    /// The output names of the classification head (empty for an embedding model).
    #[getter]
    fn labels(&self) -> Vec<String> {
        self.scorer
            .head()
            .map(|h| h.labels.clone())
            .unwrap_or_default()
    }

    /// The device the model runs on (``cpu``, ``wgpu:0 (...)``, ``cuda:0 (...)``).
    #[getter]
    fn device(&self) -> String {
        self.scorer.device_name()
    }

    /// Texts are truncated to this many tokens, special tokens included.
    #[getter]
    fn max_tokens(&self) -> usize {
        self.scorer.max_tokens()
    }

    /// The length of one embedding.
    #[getter]
    fn embedding_dim(&self) -> usize {
        self.scorer.embedding_dim()
    }

    /// The checkpoint folder.
    #[getter]
    fn model_dir(&self) -> String {
        self.scorer.model_dir().display().to_string()
    }

    /// Scores of ``texts`` as a float32 array ``(len(texts), len(labels))``. A text mira cannot
    /// score (empty, missing, a non-finite output) raises ValueError with ``errors="raise"``
    /// and is a row of NaN with ``errors="nan"``.
    #[pyo3(signature = (texts, errors="raise"))]
    fn score<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        errors: &str,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let out = self.run(py, Task::Score, texts)?;
        Self::check_errors(&out, errors)?;
        Ok(self.to_python(py, out)?.0)
    }

    /// ``(scores, errors)``: the scores with a NaN row per text mira cannot score, and an
    /// ``(index, kind, message)`` tuple for each of those texts.
    fn score_with_errors<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyArray2<f32>>, Errors)> {
        let out = self.run(py, Task::Score, texts)?;
        self.to_python(py, out)
    }

    /// Embeddings of ``texts`` (the model's pooling) as a float32 array ``(len(texts), dim)``;
    /// ``errors`` as for ``score``.
    #[pyo3(signature = (texts, errors="raise"))]
    fn embed<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        errors: &str,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let out = self.run(py, Task::Embed, texts)?;
        Self::check_errors(&out, errors)?;
        Ok(self.to_python(py, out)?.0)
    }

    /// ``(embeddings, errors)``, as ``score_with_errors``.
    fn embed_with_errors<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyArray2<f32>>, Errors)> {
        let out = self.run(py, Task::Embed, texts)?;
        self.to_python(py, out)
    }

    fn __repr__(&self) -> String {
        format!(
            "Scorer({:?}, device={:?}, labels={})",
            self.scorer.model_dir().display().to_string(),
            self.scorer.device_name(),
            self.labels().len()
        )
    }
}

#[pymodule]
fn _mira(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Scorer>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
