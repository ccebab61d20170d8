//! Fine-tuning (being built): the autograd-safe operations, the trainable model with LoRA
//! adapters, the optimiser (AdamW, schedule, clipping, accumulation) and the data
//! (chat-template rendering, assistant-only loss, packing), and the PEFT adapter export.
//! Not yet: the training loop, checkpoints and resume, the merged-model export, activation
//! checkpointing, full fine-tuning, `wildlong train` with its recipes and `--plan`.

pub mod data;
pub mod model;
pub mod ops;
pub mod optim;
