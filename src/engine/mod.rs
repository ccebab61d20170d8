//! The engine under all stages: model, weights, RoPE, tokenizer, chat template, sampling,
//! constrained decoding and the generation loop. Stages call [`generate::Engine`]; nothing
//! above this layer runs a model directly.

pub mod attention;
pub mod blocks;
pub mod chat;
pub mod config;
pub mod constrained;
pub mod generate;
pub mod kquants;
pub mod llama;
pub mod loglik;
pub mod lora;
pub mod memory;
pub mod packed;
pub mod packed_int8;
pub mod paged_attention;
pub mod rope;
pub mod sampling;
pub mod scheduler;
pub mod tokenizer;
pub mod weights;
