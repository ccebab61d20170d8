//! Evaluation stage: RULER-style long-context evaluation and the short-context check of any
//! model (± adapter) through the engine. Reads no other stage's code; takes models and
//! adapters by path.

pub mod longbench;
pub mod ruler;
pub mod short;
