//! wildlong: long-context instruction data synthesis (WildLong recipe), RoPE-scaled
//! fine-tuning and RULER evaluation with open models on local hardware, through candle.

pub mod bench;
pub mod cli;
pub mod config;
pub mod engine;
pub mod eval;
pub mod generator;
pub mod kernels;
pub mod layout;
pub mod models;
pub mod pipeline;
pub mod records;
pub mod shard;
pub mod stage1;
pub mod stage2;
pub mod text;
pub mod train;
