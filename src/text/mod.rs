//! Text to token ids.

pub mod tokenize;

pub use tokenize::TextEncoder;
