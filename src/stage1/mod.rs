//! Stage 1 of WildLong: real user queries → meta-information → one co-occurrence graph per
//! document type → sampled paths → instruction blueprints. Files flow through
//! `<run>/stage1/`: `queries.jsonl` → `meta*.jsonl` → `graphs/` → `paths.jsonl` →
//! `blueprints.jsonl` (read by stage 2).

pub mod command;
pub mod config;
pub mod extract;
pub mod filter;
pub mod graph;
pub mod input;
pub mod normalize;
pub mod prompts;
pub mod sample;
