//! CUDA graphs for small batches, where launching ~10 kernels and GEMMs per layer costs more
//! host time than the GPU spends on them.
//!
//! A forward pass is recorded while it runs: every kernel launch, GEMM and memset it enqueues is
//! logged as an [`Op`], and its activations come from an [`Arena`] that the recording keeps (a
//! buffer freed during the pass is reused by a later one, as the stream-ordered allocator would,
//! so the arena holds the pass's peak, not its sum). The device then captures the logged ops
//! into a graph ([`super::KernelDevice::graph`]). Replaying it for another batch of the same
//! shape copies that batch's index data into the recording's own batch buffer and launches the
//! graph: one launch instead of a hundred, with the same kernels, arguments and GEMM algorithms,
//! so the results are those of the ops run one by one.
//!
//! A shape is what the host-side code of a forward pass decides from a batch: the caller's
//! `kind` (which model and which output), token, sequence and attention-block counts, and the
//! extents of the rotary and relative index tables. Graphs are built on the second sighting of a shape (a shape seen once
//! costs nothing), at most [`PER_SHAPE`] per shape (one per worker thread), at most
//! [`MAX_GRAPHS`] holding at most [`MAX_BYTES`] of activations in all (least recently used
//! shapes go first).

pub(super) mod record;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;

use super::gemm::Epilogue;
use super::launch::Launch;

/// One enqueued operation of a recorded forward pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Launch(Launch),
    Gemm {
        x: u64,
        w: u64,
        bias: Option<u64>,
        out: u64,
        mnk: (usize, usize, usize),
        epilogue: Epilogue,
    },
    Memset {
        ptr: u64,
        byte: u8,
        bytes: usize,
    },
}

/// Buffers of one recorded forward pass. Leases return their buffer to the free list when the
/// tensor holding them is dropped; the buffers themselves live as long as the arena.
pub struct Arena<M> {
    state: Mutex<ArenaState<M>>,
}

struct ArenaState<M> {
    /// (memory, address, bytes)
    bufs: Vec<(M, u64, usize)>,
    free: Vec<usize>,
}

/// One buffer of an arena, held by a tensor.
pub struct ArenaLease<M: Send + Sync> {
    arena: Arc<Arena<M>>,
    index: usize,
}

impl<M: Send + Sync> Drop for ArenaLease<M> {
    fn drop(&mut self) {
        self.arena.state.lock().unwrap().free.push(self.index);
    }
}

impl<M: Send + Sync> Arena<M> {
    pub fn new() -> Arc<Arena<M>> {
        Arc::new(Arena {
            state: Mutex::new(ArenaState {
                bufs: Vec::new(),
                free: Vec::new(),
            }),
        })
    }

    /// A buffer of at least `bytes` bytes: the smallest free one that fits, else a new one from
    /// `alloc`. Returns the lease and the buffer's address.
    pub fn take(
        self: &Arc<Self>,
        bytes: usize,
        alloc: impl FnOnce(usize) -> Result<(M, u64)>,
    ) -> Result<(ArenaLease<M>, u64)> {
        let mut s = self.state.lock().unwrap();
        let best = s
            .free
            .iter()
            .enumerate()
            .filter(|(_, &i)| s.bufs[i].2 >= bytes)
            .min_by_key(|(_, &i)| s.bufs[i].2)
            .map(|(at, _)| at);
        let index = match best {
            Some(at) => s.free.swap_remove(at),
            None => {
                let (mem, ptr) = alloc(bytes)?;
                s.bufs.push((mem, ptr, bytes));
                s.bufs.len() - 1
            }
        };
        let ptr = s.bufs[index].1;
        Ok((
            ArenaLease {
                arena: self.clone(),
                index,
            },
            ptr,
        ))
    }

    /// Buffers and bytes allocated.
    pub fn footprint(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap();
        (s.bufs.len(), s.bufs.iter().map(|b| b.2).sum())
    }
}

/// What a recording pass collects on its thread.
pub struct Recording<M: Send + Sync> {
    pub ops: Vec<Op>,
    pub arena: Arc<Arena<M>>,
    /// Memory the ops read that the recording does not own otherwise (rotary tables).
    pub keep: Vec<Arc<M>>,
}

/// What decides the host side of a forward pass, so a graph recorded for one batch replays
/// correctly for any other batch with the same shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shape {
    pub kind: String,
    pub tokens: usize,
    pub seqs: usize,
    pub blocks: usize,
    /// Positions the rotary table must cover, rounded up to a power of two as the table is.
    pub positions: usize,
    /// The longest sequence, rounded up to a power of two as DeBERTa's relative index table is
    /// (its extent is a kernel argument).
    pub longest: usize,
    /// Test switches that change which ops run.
    pub poison: bool,
    pub scalar_attention: bool,
}

/// Graphs per shape: one per thread that may replay it at once.
pub const PER_SHAPE: usize = 2;
/// Graphs kept in all; the least recently used shape goes first beyond this.
pub const MAX_GRAPHS: usize = 64;
/// Activation memory the graphs' arenas may hold in all (a graph of a large batch holds its
/// forward pass's peak activations for as long as it lives).
pub const MAX_BYTES: usize = 2 << 30;
/// Shapes remembered (seen once, or with graphs).
const MAX_SHAPES: usize = 4096;

struct Entry<G> {
    idle: Vec<G>,
    /// Graphs of this shape, idle or in use.
    total: usize,
    /// Arena bytes of its recorded graphs.
    bytes: usize,
    /// One graph of this shape alone exceeds [`MAX_BYTES`]: it always runs op by op.
    too_big: bool,
    last_used: u64,
    /// Distinguishes this entry from an evicted one of the same shape.
    generation: u64,
}

/// What to do with a batch of some shape.
pub enum Plan<G> {
    /// First sighting, or every graph of the shape is in use: run the ops one by one.
    Direct,
    /// Record a graph (its slot is reserved under `generation`).
    Record { generation: u64 },
    /// Replay this graph, then give it back with [`GraphCache::give_back`].
    Replay { graph: G, generation: u64 },
}

/// Recorded graphs by shape.
pub struct GraphCache<G> {
    entries: HashMap<Shape, Entry<G>>,
    tick: u64,
    generations: u64,
    pub stats: GraphStats,
}

pub use crate::engine::backend::GraphStats;

impl<G> Default for GraphCache<G> {
    fn default() -> Self {
        GraphCache {
            entries: HashMap::new(),
            tick: 0,
            generations: 0,
            stats: GraphStats::default(),
        }
    }
}

impl<G> GraphCache<G> {
    pub fn plan(&mut self, shape: &Shape) -> Plan<G> {
        self.tick += 1;
        let tick = self.tick;
        let Some(e) = self.entries.get_mut(shape) else {
            if self.entries.len() >= MAX_SHAPES {
                // Forget the shapes seen once (graphs stay).
                self.entries.retain(|_, e| e.total > 0);
            }
            self.generations += 1;
            let generation = self.generations;
            self.entries.insert(
                shape.clone(),
                Entry {
                    idle: Vec::new(),
                    total: 0,
                    bytes: 0,
                    too_big: false,
                    last_used: tick,
                    generation,
                },
            );
            self.stats.direct += 1;
            return Plan::Direct;
        };
        e.last_used = tick;
        let generation = e.generation;
        if let Some(graph) = e.idle.pop() {
            self.stats.replayed += 1;
            return Plan::Replay { graph, generation };
        }
        if e.total < PER_SHAPE && !e.too_big {
            e.total += 1;
            self.evict(Some(shape));
            return Plan::Record { generation };
        }
        self.stats.direct += 1;
        Plan::Direct
    }

    /// A graph replayed under `generation`, or just recorded with an arena of `recorded`
    /// bytes, is free again (dropped if its shape was evicted meanwhile).
    pub fn give_back(&mut self, shape: &Shape, generation: u64, graph: G, recorded: Option<usize>) {
        if recorded.is_some() {
            self.stats.recorded += 1;
        }
        match self.entries.get_mut(shape) {
            Some(e) if e.generation == generation && recorded.is_some_and(|b| b > MAX_BYTES) => {
                e.total -= 1;
                e.too_big = true;
                self.stats.evicted += 1;
                drop(graph);
            }
            Some(e) if e.generation == generation => {
                e.idle.push(graph);
                e.bytes += recorded.unwrap_or(0);
            }
            _ => drop(graph),
        }
        if recorded.is_some() {
            // The newest graph may itself be over the byte budget: then it goes too.
            self.evict(None);
        }
    }

    /// Recording under `generation` failed: release its slot.
    pub fn abandon(&mut self, shape: &Shape, generation: u64) {
        if let Some(e) = self.entries.get_mut(shape) {
            if e.generation == generation {
                e.total -= 1;
            }
        }
    }

    /// Drop least recently used shapes' graphs while more than [`MAX_GRAPHS`] exist or they
    /// hold more than [`MAX_BYTES`] (never `keep`'s).
    fn evict(&mut self, keep: Option<&Shape>) {
        loop {
            let total: usize = self.entries.values().map(|e| e.total).sum();
            let bytes: usize = self.entries.values().map(|e| e.bytes).sum();
            if total <= MAX_GRAPHS && bytes <= MAX_BYTES {
                return;
            }
            let oldest = self
                .entries
                .iter()
                .filter(|(s, e)| e.total > 0 && Some(*s) != keep)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(s, _)| s.clone());
            let Some(oldest) = oldest else { return };
            if let Some(e) = self.entries.remove(&oldest) {
                self.stats.evicted += e.total as u64;
            }
        }
    }

    /// `f` on every idle graph.
    pub fn for_each(&self, mut f: impl FnMut(&G)) {
        self.entries.values().flat_map(|e| &e.idle).for_each(&mut f);
    }

    /// Graphs held (idle or in use).
    pub fn graphs(&self) -> usize {
        self.entries.values().map(|e| e.total).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(tokens: usize) -> Shape {
        Shape {
            kind: "m/logits".into(),
            tokens,
            seqs: 1,
            blocks: 1,
            positions: 16,
            longest: 16,
            poison: false,
            scalar_attention: false,
        }
    }

    #[test]
    fn a_shape_is_recorded_on_its_second_sighting_and_then_replayed() {
        let mut c = GraphCache::<u32>::default();
        let s = shape(10);
        assert!(matches!(c.plan(&s), Plan::Direct));
        let Plan::Record { generation } = c.plan(&s) else {
            panic!("second sighting records")
        };
        c.give_back(&s, generation, 7, Some(100));
        let Plan::Replay { graph, generation } = c.plan(&s) else {
            panic!("third replays")
        };
        assert_eq!(graph, 7);
        // While it is in use, a second thread records its own; a third runs directly.
        assert!(matches!(c.plan(&s), Plan::Record { .. }));
        assert!(matches!(c.plan(&s), Plan::Direct));
        c.give_back(&s, generation, graph, None);
        assert_eq!(c.graphs(), 2);
        assert_eq!(
            c.stats,
            GraphStats {
                recorded: 1,
                replayed: 1,
                direct: 2,
                evicted: 0
            }
        );
    }

    #[test]
    fn least_recently_used_shapes_are_evicted_beyond_the_cap() {
        let mut c = GraphCache::<usize>::default();
        for t in 0..MAX_GRAPHS + 3 {
            let s = shape(t);
            c.plan(&s);
            let Plan::Record { generation } = c.plan(&s) else {
                panic!()
            };
            c.give_back(&s, generation, t, Some(1000));
        }
        assert_eq!(c.graphs(), MAX_GRAPHS);
        assert_eq!(c.stats.evicted, 3);
        // The oldest were dropped: shape 0 starts over (a direct run), the newest replays.
        assert!(matches!(c.plan(&shape(0)), Plan::Direct));
        assert!(matches!(
            c.plan(&shape(MAX_GRAPHS + 2)),
            Plan::Replay { graph, .. } if graph == MAX_GRAPHS + 2
        ));
    }

    #[test]
    fn a_graph_given_back_after_its_shape_was_evicted_is_dropped() {
        let mut c = GraphCache::<u32>::default();
        let s = shape(1);
        c.plan(&s);
        let Plan::Record { generation } = c.plan(&s) else {
            panic!()
        };
        c.entries.clear(); // evicted meanwhile, and seen anew
        c.plan(&s);
        c.give_back(&s, generation, 1, Some(10));
        assert_eq!(c.entries[&s].idle.len(), 0);
    }

    #[test]
    fn graphs_beyond_the_byte_budget_are_evicted_oldest_first() {
        let mut c = GraphCache::<usize>::default();
        let third = MAX_BYTES / 3 + 1;
        for t in 0..3 {
            let s = shape(t);
            c.plan(&s);
            let Plan::Record { generation } = c.plan(&s) else {
                panic!()
            };
            c.give_back(&s, generation, t, Some(third));
        }
        // Three thirds (and a bit) exceed the budget: the oldest went.
        assert_eq!(c.graphs(), 2);
        assert_eq!(c.stats.evicted, 1);
        assert!(matches!(c.plan(&shape(0)), Plan::Direct));
        // One graph alone over the budget is not kept, and its shape is not recorded again;
        // the others stay.
        let big = shape(99);
        c.plan(&big);
        let Plan::Record { generation } = c.plan(&big) else {
            panic!()
        };
        c.give_back(&big, generation, 99, Some(MAX_BYTES + 1));
        assert!(matches!(c.plan(&big), Plan::Direct));
        assert!(matches!(c.plan(&big), Plan::Direct));
        assert_eq!(c.graphs(), 2);
        assert_eq!(c.stats.evicted, 2);
    }

    #[test]
    fn the_arena_reuses_freed_buffers_best_fit() {
        let arena = Arena::<()>::new();
        let mut next = 0x1000u64;
        let mut alloc = |b: usize| {
            next += 0x1000;
            let _ = b;
            Ok(((), next))
        };
        let (a, pa) = arena.take(100, &mut alloc).unwrap();
        let (b, pb) = arena.take(400, &mut alloc).unwrap();
        drop(a);
        drop(b);
        // 50 bytes fit both free buffers: the smaller one is taken.
        let (_c, pc) = arena.take(50, &mut alloc).unwrap();
        assert_eq!(pc, pa);
        let (_d, pd) = arena.take(300, &mut alloc).unwrap();
        assert_eq!(pd, pb);
        let (_e, pe) = arena.take(10, &mut alloc).unwrap();
        assert!(pe != pa && pe != pb);
        assert_eq!(arena.footprint(), (3, 510));
    }
}
