//! Fine-tuning (being built): the autograd-safe operations, the trainable model with LoRA
//! adapters, the optimiser (AdamW, schedule, clipping, accumulation) and the data
//! (chat-template rendering, assistant-only loss, packing). Not yet: the training loop,
//! checkpoints, PEFT export, `wildlong train` and its recipes.

pub mod data;
pub mod model;
pub mod ops;
pub mod optim;
