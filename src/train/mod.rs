//! Fine-tuning (being built): the autograd-safe operations and the trainable model with
//! LoRA adapters, the optimiser (AdamW, schedule, clipping, accumulation). Not yet: the data
//! pipeline, the training loop, checkpoints, PEFT export,
//! `wildlong train`.

pub mod model;
pub mod ops;
pub mod optim;
