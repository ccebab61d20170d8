//! Stage 2 of WildLong: long documents + stage-1 blueprints → long-context instruction–
//! response pairs. Built so far: reading and typing documents, and assembling single- and
//! multi-document contexts to token budgets. Adaptive generation, quality gates and the
//! dataset writer are not built yet.

pub mod assemble;
pub mod card;
pub mod documents;
pub mod prompts;
pub mod synth;
