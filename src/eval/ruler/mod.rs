//! RULER (Hsieh et al., COLM 2024; NVIDIA/RULER): 13 synthetic long-context tasks, scored
//! as RULER scores them, run through the engine with greedy decoding.
//!
//! Layout of an evaluation folder: `<out>/<length>/<task>/{data,pred}.jsonl`,
//! `<out>/run.json` (what produced the predictions) and `<out>/report.{json,md,csv,svg}`.

pub mod command;
pub mod config;
pub mod data;
pub mod official;
pub mod punkt;
pub mod pyrandom;
pub mod report;
pub mod run;
pub mod score;
pub mod synth;
pub mod tasks;
