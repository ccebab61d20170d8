//! Fine-tuning (being built): the autograd-safe operations and the trainable model with
//! LoRA adapters. Not yet: the data pipeline, the optimiser loop, checkpoints, PEFT export,
//! `wildlong train`.

pub mod model;
pub mod ops;
