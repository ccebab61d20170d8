//! Fine-tuning (being built): the autograd-safe operations, the trainable model with LoRA
//! adapters, the optimiser (AdamW, schedule, clipping, accumulation) and the data
//! (chat-template rendering, assistant-only loss, packing), one optimizer step (micro-batches,
//! token-mean accumulation, clipping, non-finite skip) and the PEFT adapter export. Not yet:
//! the run loop with evaluation, logs, checkpoints and resume, the merged-model export, LoRA
//! dropout, activation checkpointing, full fine-tuning, RoPE scaling from a recipe, `wildlong
//! train` with its recipes and `--plan`.

pub mod data;
pub mod model;
pub mod ops;
pub mod optim;
pub mod plan;
pub mod run;
pub mod step;
