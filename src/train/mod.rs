//! Fine-tuning: `wildlong train` ([`run`]) reads a recipe, renders `messages` JSONL with the
//! model's chat template ([`data`]: assistant-only loss, packing with position reset),
//! trains the Llama-family model ([`model`]: LoRA or full, f32/bf16 frozen weights, RoPE
//! from the recipe, layer checkpointing) built from autograd-safe ops ([`ops`]: RMSNorm,
//! RoPE, softmax, blocked attention, fused LoRA linear, one-pass chunked cross-entropy) with
//! AdamW ([`optim`], [`step`]), checkpoints and resumes exactly, and exports PEFT adapters and
//! merged HF models; [`plan`] predicts a recipe's memory before launch. CPU kernels only.

pub mod command;
pub mod config;
pub mod data;
pub mod model;
pub mod ops;
pub mod optim;
pub mod plan;
pub mod run;
pub mod step;
