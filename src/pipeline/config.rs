//! `wildlong run`'s config file (`configs/demo.toml`, `configs/pipeline/*.toml`).

use crate::config::{apply_sets, merge_tables};
use crate::engine::config::EngineConfig;
use crate::eval::ruler::config::{RulerConfig, RulerSelection};
use crate::generator::openai::OpenAiConfig;
use crate::stage1::config::Stage1Config;
use crate::stage2::config::Stage2Config;
use crate::train::config::TrainConfig;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `wildlong run CONFIG`: every stage in order into one run folder (`configs/demo.toml`).
/// `[stage1]`, `[stage2]` and `[train]` take the keys of their own config files; a
/// `config = "PATH"` key in one of them starts from that file instead of the built-in
/// defaults, and the section's other keys override it. Paths are relative to the
/// directory `wildlong` runs in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub run: PipelineRunConfig,
    /// The local engine for generation and evaluation (keys of `configs/engine-cpu.toml`).
    #[serde(default)]
    pub engine: EngineConfig,
    /// Stage 1 and 2 generation on an OpenAI-compatible server instead of the local engine
    /// (`run.generator` is then the server's model name).
    #[serde(default)]
    pub server: Option<OpenAiConfig>,
    pub stage1: Stage1Config,
    pub stage2: Stage2Config,
    pub train: TrainConfig,
    pub eval: PipelineEvalConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineRunConfig {
    /// The run folder: `stage1/`, `stage2/`, `train/`, `eval/`, `pipeline/`, `report.md`.
    pub dir: std::path::PathBuf,
    /// The model that extracts, writes blueprints and synthesizes (a models spec, or the
    /// server's model name with `[server]`).
    pub generator: String,
    /// With `[server]`: the local model whose tokenizer and chat template measure prompts.
    pub tokenizer: String,
}

impl Default for PipelineRunConfig {
    fn default() -> Self {
        Self {
            dir: "runs/demo".into(),
            generator: "default".into(),
            tokenizer: "default".into(),
        }
    }
}

/// RULER before and after fine-tuning: the base model (`train.model`), then the base with
/// the trained adapter (or the merged model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineEvalConfig {
    pub lengths: Vec<usize>,
    /// Task names; empty = every task of the table.
    pub tasks: Vec<String>,
    pub samples: usize,
    pub seed: u64,
    /// Another task table [default: configs/eval/ruler.toml, built in].
    pub tasks_config: Option<std::path::PathBuf>,
    pub qa_squad: Option<String>,
    pub qa_hotpotqa: Option<String>,
    /// RULER's essays (PaulGrahamEssays.json or text; path or hf://…) [default: built in].
    pub essays: Option<String>,
    /// `ruler` or `wildlong` [default: ruler when essays and both QA files are set].
    pub protocol: Option<crate::eval::ruler::config::Protocol>,
    /// Render prompts with the model's chat template (RULER's `base` template otherwise).
    pub chat: bool,
    /// Cache of generated samples, shared across runs.
    pub cache_dir: std::path::PathBuf,
    /// The short-context check beside RULER (`[eval.short]`; no data: not run).
    pub short: crate::eval::short::run::ShortConfig,
}

impl Default for PipelineEvalConfig {
    fn default() -> Self {
        Self {
            lengths: vec![4096, 8192],
            tasks: Vec::new(),
            samples: 20,
            seed: 42,
            tasks_config: None,
            qa_squad: None,
            qa_hotpotqa: None,
            essays: None,
            protocol: None,
            chat: true,
            cache_dir: "runs/cache/ruler".into(),
            short: Default::default(),
        }
    }
}

impl PipelineEvalConfig {
    /// The task table with this section's selection applied, validated.
    pub fn ruler(&self) -> Result<RulerConfig> {
        RulerSelection {
            tasks_config: self.tasks_config.clone(),
            lengths: Some(self.lengths.clone()),
            samples: Some(self.samples),
            seed: Some(self.seed),
            qa_squad: self.qa_squad.clone(),
            qa_hotpotqa: self.qa_hotpotqa.clone(),
            essays: self.essays.clone(),
            protocol: self.protocol,
            tasks: self.tasks.clone(),
        }
        .resolve("eval.tasks")
        .context("[eval]")
    }
}

impl PipelineConfig {
    /// Reads a pipeline file with `--set` overrides (e.g. `train.schedule.steps=4`), resolves
    /// each section's `config = "PATH"` base, and validates every stage's settings.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {name}"))?;
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        apply_sets(&mut table, sets)?;
        for (section, builtin) in [
            ("stage1", Stage1Config::BUILTIN),
            ("stage2", Stage2Config::BUILTIN),
            ("train", TrainConfig::BUILTIN),
        ] {
            let mut own = match table.remove(section) {
                Some(toml::Value::Table(t)) => t,
                Some(_) => anyhow::bail!("{name}: `{section}` must be a table"),
                None => toml::Table::new(),
            };
            let mut base: toml::Table = match own.remove("config") {
                Some(toml::Value::String(p)) => {
                    let t = std::fs::read_to_string(&p)
                        .with_context(|| format!("{name}: {section}.config: reading {p}"))?;
                    toml::from_str(&t).map_err(|e| anyhow::anyhow!("{p}: {e}"))?
                }
                Some(_) => anyhow::bail!("{name}: {section}.config must be a path"),
                None => toml::from_str(builtin).expect("built-in configs parse (tested)"),
            };
            merge_tables(&mut base, own);
            table.insert(section.into(), toml::Value::Table(base));
        }
        let what = match sets.is_empty() {
            true => name.clone(),
            false => format!("{name} with --set {}", sets.join(" ")),
        };
        let c: Self = Self::deserialize(toml::Value::Table(table))
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        c.stage1
            .validate()
            .with_context(|| format!("{what}: [stage1]"))?;
        c.stage2
            .validate()
            .with_context(|| format!("{what}: [stage2]"))?;
        c.train
            .validate()
            .with_context(|| format!("{what}: [train]"))?;
        c.eval.ruler().with_context(|| what.clone())?;
        c.eval
            .short
            .tasks("eval.short")
            .with_context(|| what.clone())?;
        c.engine
            .validate()
            .with_context(|| format!("{what}: [engine]"))?;
        if c.server.as_ref().is_some_and(|s| s.base_url.is_empty()) {
            anyhow::bail!("{what}: server.base_url is empty");
        }
        Ok(c)
    }
}
