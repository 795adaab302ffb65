//! mira: model-based data selection for LLM mid-training, fast enough to run over whole corpora.
//!
//! The heart is a hand-written encoder forward pass (BERT family) over ragged batches, behind a
//! narrow backend interface ([`engine::Backend`]). [`Scorer`] is the entry point:
//!
//! ```no_run
//! use mira::{Device, Scorer};
//! let scorer = Scorer::load("models/all-MiniLM-L6-v2", Device::Cpu)?;
//! let emb = scorer.embed(&["a document", "another one"])?;
//! assert_eq!(emb.n_docs(), 2);
//! # anyhow::Ok(())
//! ```

pub mod bench;
pub mod checked;
pub mod corpus;
pub mod engine;
pub mod fidelity;
pub mod head;
pub mod model;
pub mod names;
pub mod pipeline;
pub mod scorer;
pub mod text;

pub use engine::{Batch, Device, Packer, Pooling};
pub use scorer::{DocFailure, Embeddings, HeadInfo, LoadOptions, Scorer, Scores};
pub mod select;
