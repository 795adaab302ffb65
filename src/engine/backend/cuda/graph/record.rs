//! Recording a forward pass as a CUDA graph and replaying it for later batches of the same
//! shape (see `graph/mod.rs` for the cache and the arena); the backend's switch and counters.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::ThreadId;

use anyhow::{ensure, Result};

use super::{Arena, GraphStats, Plan, Recording, Shape};
use crate::engine::backend::cuda::backend::{KernelBackend, Shared, Tensor};
use crate::engine::backend::cuda::kernel_device::{DevBatch, KernelDevice};
use crate::engine::backend::Backend;

/// A recorded forward pass: its graph and everything the graph's ops address. Fields drop in
/// order: the graph before the memory it uses.
pub(in crate::engine::backend::cuda) struct Recorded<D: KernelDevice> {
    graph: D::Graph,
    /// The pass's output, downloaded after each launch.
    output: Tensor<D>,
    /// The graph's own copy of the batch index data (each replay copies its batch here).
    #[allow(dead_code)]
    batch: D::Mem,
    batch_ptr: u64,
    batch_words: usize,
    #[allow(dead_code)]
    keep: Vec<Arc<D::Mem>>,
    arena: Arc<Arena<D::Mem>>,
}

/// A forward pass over an uploaded batch, returning its output tensor.
type Forward<'a, D> = dyn Fn(&DevBatch<<D as KernelDevice>::BatchMem>) -> Result<Tensor<D>> + 'a;

/// Removes this thread's recording when dropped (also if the forward pass panics).
struct RecordingGuard<'a, D: KernelDevice> {
    shared: &'a Shared<D>,
    id: ThreadId,
}

impl<D: KernelDevice> RecordingGuard<'_, D> {
    fn finish(self) -> Option<Recording<D::Mem>> {
        let rec = self.shared.recordings.lock().unwrap().remove(&self.id);
        self.shared.recorders.fetch_sub(1, Ordering::AcqRel);
        std::mem::forget(self);
        rec
    }
}

impl<D: KernelDevice> Drop for RecordingGuard<'_, D> {
    fn drop(&mut self) {
        self.shared.recordings.lock().unwrap().remove(&self.id);
        self.shared.recorders.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<D: KernelDevice> KernelBackend<D> {
    /// Run batches of at most `tokens` tokens as CUDA graphs (0, the default, turns graphs
    /// off); see `graph/mod.rs`.
    pub fn set_graph_tokens(&self, tokens: usize) {
        self.shared.graph_tokens.store(tokens, Ordering::Relaxed);
    }

    /// How often graphs were recorded and replayed, and batches run op by op.
    pub fn graph_stats(&self) -> GraphStats {
        self.shared.graphs.lock().unwrap().stats
    }

    /// Graphs held now, and the arena buffers and bytes they keep.
    pub fn graph_footprint(&self) -> (usize, usize, usize) {
        let graphs = self.shared.graphs.lock().unwrap();
        let mut held = (graphs.graphs(), 0, 0);
        graphs.for_each(|r| {
            let (bufs, bytes) = r.arena.footprint();
            held.1 += bufs;
            held.2 += bytes;
        });
        held
    }

    /// The forward pass `forward` on the uploaded batch `b`, recorded: its ops run as usual
    /// and are logged, its activations come from an arena the recording keeps, and the log is
    /// captured as a graph. Returns the graph and the pass's output, downloaded. A graph the
    /// device cannot capture turns graphs off for this backend, with a warning, and the pass's
    /// output is returned without one: graphs are a speed-up, never a reason to fail a batch.
    fn record(
        &self,
        b: &DevBatch<D::BatchMem>,
        forward: &Forward<'_, D>,
    ) -> Result<(Option<Recorded<D>>, Vec<f32>)> {
        // The graph reads its own copy of the index data, at a fixed address.
        let bytes = 4 * b.words;
        let (batch, batch_ptr) = self.dev().alloc(bytes.max(16), "graph batch")?;
        // SAFETY: both hold `bytes` bytes.
        unsafe { self.dev().copy(batch_ptr, b.base, bytes)? };
        let at = |p: u64| batch_ptr + (p - b.base);
        let gb = DevBatch {
            mem: None,
            base: batch_ptr,
            words: b.words,
            ids: at(b.ids),
            positions: at(b.positions),
            cu_seqlens: at(b.cu_seqlens),
            blocks: at(b.blocks),
            n_tokens: b.n_tokens,
            n_seqs: b.n_seqs,
            n_blocks: b.n_blocks,
            max_position: b.max_position,
            max_len: b.max_len,
        };
        let arena = Arena::new();
        let id = std::thread::current().id();
        self.shared.recordings.lock().unwrap().insert(
            id,
            Recording {
                ops: Vec::new(),
                arena: arena.clone(),
                keep: Vec::new(),
            },
        );
        self.shared.recorders.fetch_add(1, Ordering::AcqRel);
        let guard = RecordingGuard {
            shared: &self.shared,
            id,
        };
        let output = forward(&gb);
        let rec = guard.finish().expect("this thread's recording");
        let output = output?;
        let values = self.download(&output)?;
        // SAFETY: the graph keeps the arena, the batch copy and the tables its ops address
        // (weights live as long as the model that launches it).
        let graph = match unsafe { self.dev().graph(&rec.ops) } {
            Ok(graph) => graph,
            Err(e) => {
                self.set_graph_tokens(0);
                eprintln!(
                    "mira: CUDA graphs turned off on {}: {e:#}; batches run kernel by kernel",
                    self.dev().describe()
                );
                return Ok((None, values));
            }
        };
        let recorded = Recorded {
            graph,
            output,
            batch,
            batch_ptr,
            batch_words: b.words,
            keep: rec.keep,
            arena,
        };
        Ok((Some(recorded), values))
    }

    /// `r`'s graph on the batch `b` (of the shape it was recorded for): `b`'s index data is
    /// copied into the graph's batch buffer, the graph launched and its output downloaded.
    fn replay(&self, r: &Recorded<D>, b: &DevBatch<D::BatchMem>) -> Result<Vec<f32>> {
        ensure!(
            b.words == r.batch_words,
            "graph replay: the batch has {} index values, the graph {}",
            b.words,
            r.batch_words
        );
        // SAFETY: both buffers hold `words` u32 values; the graph's memory lives in `r`.
        unsafe {
            self.dev().copy(r.batch_ptr, b.base, 4 * b.words)?;
            self.dev().launch_graph(&r.graph)?;
        }
        self.download(&r.output)
    }

    /// `forward` on the uploaded batch `b`: as a graph (recorded now, or replayed) where the
    /// batch is small enough and its shape repeats, else op by op.
    pub(in crate::engine::backend::cuda) fn run_graphed(
        &self,
        b: &DevBatch<D::BatchMem>,
        kind: &str,
        forward: &Forward<'_, D>,
    ) -> Result<Vec<f32>> {
        let limit = self.shared.graph_tokens.load(Ordering::Relaxed);
        if b.n_tokens == 0 || b.n_tokens > limit {
            return self.download(&forward(b)?);
        }
        let shape = Shape {
            kind: kind.to_string(),
            tokens: b.n_tokens,
            seqs: b.n_seqs,
            blocks: b.n_blocks,
            positions: b.max_position.next_power_of_two(),
            longest: b.max_len.next_power_of_two(),
            poison: self.shared.poison.load(Ordering::Relaxed),
            scalar_attention: self.shared.scalar_attention.load(Ordering::Relaxed),
        };
        let plan = self.shared.graphs.lock().unwrap().plan(&shape);
        match plan {
            Plan::Direct => self.download(&forward(b)?),
            Plan::Replay { graph, generation } => {
                let values = self.replay(&graph, b);
                let mut graphs = self.shared.graphs.lock().unwrap();
                graphs.give_back(&shape, generation, graph, None);
                values
            }
            Plan::Record { generation } => match self.record(b, forward) {
                Ok((None, values)) => {
                    self.shared
                        .graphs
                        .lock()
                        .unwrap()
                        .abandon(&shape, generation);
                    Ok(values)
                }
                Ok((Some(graph), values)) => {
                    let bytes = graph.arena.footprint().1;
                    let mut graphs = self.shared.graphs.lock().unwrap();
                    graphs.give_back(&shape, generation, graph, Some(bytes));
                    Ok(values)
                }
                Err(e) => {
                    self.shared
                        .graphs
                        .lock()
                        .unwrap()
                        .abandon(&shape, generation);
                    Err(e)
                }
            },
        }
    }
}
