//! Every path in a run folder, named once: the stages write them, the pipeline moves them
//! aside when their inputs change, the report and the commands read them.
//!
//! ```text
//! <run>/stage1/  queries.jsonl filter_stats.json meta_schema.toml extract.json
//!                meta[.shard-k-of-n].jsonl rejects[…].jsonl extract_stats.json
//!                normalized.jsonl merges.json graphs/ graph_summary.{json,md}
//!                paths.jsonl sample_stats.json sample.json blueprints.jsonl
//! <run>/stage2/  store/ documents_stats.json contexts.jsonl assembly_stats.json
//!                synth_stats.json data.jsonl (+ data.parquet) README.md
//! <run>/train/   data_stats.json log.jsonl checkpoints summary.json adapter/ merged/
//! <run>/eval/    before/ after/ (RULER folders: eval::ruler)
//! <run>/pipeline/<step>.json config.toml   <run>/superseded/   <run>/report.{md,svg}
//! ```

use std::path::{Path, PathBuf};

/// File names inside `<run>/stage1/`.
pub mod stage1 {
    pub const DIR: &str = "stage1";
    /// The filtered queries (extract's input), and what the filter dropped.
    pub const QUERIES: &str = "queries.jsonl";
    pub const FILTER_STATS: &str = "filter_stats.json";
    /// What made the meta records (a folder made otherwise is not resumed), and their counts.
    pub const EXTRACT_IDENTITY: &str = "extract.json";
    pub const EXTRACT_STATS: &str = "extract_stats.json";
    /// The meta-information schema extraction used (stage 2 types documents with it).
    pub const META_SCHEMA: &str = "meta_schema.toml";
    /// graph: normalised values, the merges made, one graph per type and their summary.
    pub const NORMALIZED: &str = "normalized.jsonl";
    pub const MERGES: &str = "merges.json";
    pub const GRAPHS: &str = "graphs";
    pub const GRAPH_SUMMARY: &str = "graph_summary.json";
    pub const GRAPH_SUMMARY_MD: &str = "graph_summary.md";
    /// sample: the paths, their counts and identity, and the blueprints (stage 2's input).
    pub const PATHS: &str = "paths.jsonl";
    pub const SAMPLE_STATS: &str = "sample_stats.json";
    pub const SAMPLE_IDENTITY: &str = "sample.json";
    pub const BLUEPRINTS: &str = "blueprints.jsonl";

    /// `meta.jsonl`, or `meta.shard-k-of-n.jsonl` for one worker's share.
    pub fn meta(shard_suffix: &str) -> String {
        format!("meta{shard_suffix}.jsonl")
    }

    /// `rejects.jsonl`, or `rejects.shard-k-of-n.jsonl`.
    pub fn rejects(shard_suffix: &str) -> String {
        format!("rejects{shard_suffix}.jsonl")
    }
}

/// File names inside `<run>/stage2/`.
pub mod stage2 {
    pub const DIR: &str = "stage2";
    /// Every generation request's result, by content hash (reruns read them back).
    pub const STORE: &str = "store";
    /// Documents read and skipped; the contexts assembled and their histogram.
    pub const DOCUMENTS_STATS: &str = "documents_stats.json";
    pub const CONTEXTS: &str = "contexts.jsonl";
    pub const ASSEMBLY_STATS: &str = "assembly_stats.json";
    /// The pairs kept (training's input), their counts and the dataset card.
    pub const SYNTH_STATS: &str = "synth_stats.json";
    pub const DATA: &str = "data.jsonl";
    pub const CARD: &str = "README.md";
}

/// File names inside `<run>/train/`.
pub mod train {
    pub const DIR: &str = "train";
    /// How the data became rows; a line per step and evaluation; the run's summary.
    pub const DATA_STATS: &str = "data_stats.json";
    pub const LOG: &str = "log.jsonl";
    pub const SUMMARY: &str = "summary.json";
    /// The PEFT adapter and the merged HF model.
    pub const ADAPTER: &str = "adapter";
    pub const MERGED: &str = "merged";
}

/// A run folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLayout {
    root: PathBuf,
}

impl RunLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A path relative to the run folder (the pipeline's step outputs are listed so).
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }

    /// `<run>/stage1`, `<run>/stage2` or `<run>/train` (the `DIR` of [`stage1`], [`stage2`],
    /// [`train`]), and a file in it: `run.stage(stage2::DIR, stage2::DATA)`.
    pub fn stage(&self, dir: &str, file: &str) -> PathBuf {
        self.root.join(dir).join(file)
    }

    pub fn stage1(&self) -> PathBuf {
        self.root.join(stage1::DIR)
    }

    pub fn stage2(&self) -> PathBuf {
        self.root.join(stage2::DIR)
    }

    pub fn train(&self) -> PathBuf {
        self.root.join(train::DIR)
    }

    /// Stage 1's blueprints, stage 2's default input.
    pub fn blueprints(&self) -> PathBuf {
        self.stage(stage1::DIR, stage1::BLUEPRINTS)
    }

    /// Stage 2's dataset, training's default input.
    pub fn data(&self) -> PathBuf {
        self.stage(stage2::DIR, stage2::DATA)
    }

    /// RULER before (`eval/before`) or after (`eval/after`) fine-tuning.
    pub fn eval(&self, after: bool) -> PathBuf {
        let when = if after { "after" } else { "before" };
        self.root.join("eval").join(when)
    }

    /// `pipeline/<step>.json`: the step's hash and status; `pipeline/config.toml` (the
    /// resolved config of the last invocation) is `step_state("config")`'s sibling.
    pub fn pipeline(&self) -> PathBuf {
        self.root.join("pipeline")
    }

    pub fn step_state(&self, step: &str) -> PathBuf {
        self.pipeline().join(format!("{step}.json"))
    }

    pub fn resolved_config(&self) -> PathBuf {
        self.pipeline().join("config.toml")
    }

    /// Where the pipeline moves the outputs of a step whose inputs changed.
    pub fn superseded(&self) -> PathBuf {
        self.root.join("superseded")
    }

    /// `report.md`; `report.svg` beside it.
    pub fn report_md(&self) -> PathBuf {
        self.root.join("report.md")
    }
}
