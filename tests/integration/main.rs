//! The integration-test crate: one binary, topic modules, shared helpers in `common`.
//! Tests that need the default model expect `wildlong models fetch` to have run (CI does it).

mod arch;
mod bench;
mod cli;
mod common;
#[cfg(feature = "cuda")]
mod cuda;
mod engine;
mod helmet;
mod kernels;
mod kquants;
mod learning;
mod longbench;
mod lora;
mod memory;
mod model;
mod openai;
mod pipeline;
mod props;
mod reliability;
mod rope;
mod ruler;
mod ruler_parity;
mod short;
mod stage1;
mod stage2;
mod tokenizer;
mod train_model;
mod train_ops;
mod train_run;
