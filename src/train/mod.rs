//! Fine-tuning (issue 6, being built): so far the autograd-safe operations the trainable
//! model is made of.

pub mod ops;
