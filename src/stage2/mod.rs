//! Stage 2 of WildLong: long documents + stage-1 blueprints → long-context instruction–
//! response pairs: documents read, typed and measured; contexts assembled to token
//! budgets (single documents and same-type bundles); blueprints adapted and answered over
//! the full context; quality gates; `data.jsonl` (+ Parquet) and a dataset card.

pub mod assemble;
pub mod card;
pub mod command;
pub mod config;
pub mod documents;
pub mod gates;
pub mod output;
pub mod prompts;
pub mod run;
pub mod synth;
