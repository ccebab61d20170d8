//! `wildlong run CONFIG`: every stage in order into one run folder — extract → graph →
//! sample → synth → train → RULER before → RULER after → report.
//!
//! Each step's inputs (its section of the resolved config and the hash of the step before
//! it) are hashed; `<run>/pipeline/<step>.json` records the hash, `started` when the step
//! begins and `done` when it ends. A rerun skips done steps with the same hash, resumes a
//! started one (every stage resumes on its own: append-only records, a content-addressed
//! store, checkpoints), and moves the outputs of a step whose inputs changed — and so of
//! every step after it — to `<run>/superseded/` before running it again. Nothing is deleted.

pub mod report;

use crate::config::{EngineConfig, MetaSchema, PipelineConfig, Shard};
use crate::engine::backend::Llm;
use crate::eval::ruler::data::Assets;
use crate::eval::ruler::run::RulerRun;
use crate::models;
use crate::records::write_atomic;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The steps, in order.
pub const STEPS: [&str; 7] = [
    "extract",
    "graph",
    "sample",
    "synth",
    "train",
    "eval_before",
    "eval_after",
];

/// What each step owns under the run folder (moved aside when its inputs change).
fn outputs(step: &str) -> &'static [&'static str] {
    match step {
        "extract" => &["stage1"],
        "graph" => &[
            "stage1/normalized.jsonl",
            "stage1/merges.json",
            "stage1/graphs",
            "stage1/graph_summary.json",
            "stage1/graph_summary.md",
        ],
        "sample" => &[
            "stage1/paths.jsonl",
            "stage1/sample_stats.json",
            "stage1/sample.json",
            "stage1/blueprints.jsonl",
        ],
        "synth" => &["stage2"],
        "train" => &["train"],
        "eval_before" => &["eval/before"],
        "eval_after" => &["eval/after"],
        _ => &[],
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Started,
    Done,
}

/// `<run>/pipeline/<step>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepState {
    pub step: String,
    pub hash: String,
    pub status: Status,
    /// Seconds spent in the step, summed over invocations.
    pub seconds: f64,
    /// One line on what the step produced.
    #[serde(default)]
    pub summary: String,
    /// What was hashed.
    pub inputs: serde_json::Value,
}

pub struct Options {
    pub models_dir: PathBuf,
    pub progress: bool,
    /// Where the config came from (named in the report).
    pub config_path: PathBuf,
}

/// What one invocation did: (step, "ran" | "resumed" | "skipped").
pub struct Outcome {
    pub actions: Vec<(String, String)>,
    pub report: PathBuf,
}

fn sha(bytes: &[u8]) -> String {
    crate::records::hex(&Sha256::digest(bytes))
}

/// Each step's hashed inputs, chained: a step's hash covers every step it reads from.
pub fn step_inputs(cfg: &PipelineConfig) -> Result<Vec<(String, serde_json::Value, String)>> {
    use serde_json::json;
    let schema = MetaSchema::load(cfg.stage1.schema.as_deref())?;
    // Threads do not change what is generated.
    let engine = EngineConfig {
        threads: 0,
        ..cfg.engine.clone()
    };
    let generator = json!({
        "generator": cfg.run.generator,
        "tokenizer": cfg.server.as_ref().map(|_| &cfg.run.tokenizer),
        "server": cfg.server.as_ref().map(|s| (&s.base_url, s.json_format)),
        "engine": engine,
    });
    let s1 = &cfg.stage1;
    let own = [
        json!({ "gen": generator, "schema": schema, "input": s1.input, "filter": s1.filter, "extract": s1.extract }),
        json!({ "normalize": s1.normalize, "graph": s1.graph }),
        json!({ "gen": generator, "sample": s1.sample }),
        json!({ "gen": generator, "stage2": cfg.stage2 }),
        json!({ "train": cfg.train }),
        json!({ "engine": engine, "eval": cfg.eval, "model": cfg.train.model }),
        json!({ "engine": engine, "eval": cfg.eval }),
    ];
    // eval_before reads no earlier step; eval_after reads train.
    let parent = [None, Some(0), Some(1), Some(2), Some(3), None, Some(4)];
    let mut out: Vec<(String, serde_json::Value, String)> = Vec::new();
    for (i, (step, inputs)) in STEPS.iter().zip(own).enumerate() {
        let up = parent[i].map(|p| out[p].2.clone()).unwrap_or_default();
        let hash = sha(format!("{step}\n{up}\n{inputs}").as_bytes());
        out.push((step.to_string(), inputs, hash));
    }
    Ok(out)
}

fn state_path(dir: &Path, step: &str) -> PathBuf {
    dir.join("pipeline").join(format!("{step}.json"))
}

pub fn read_state(dir: &Path, step: &str) -> Result<Option<StepState>> {
    let p = state_path(dir, step);
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a pipeline step record (delete it to rerun the step)",
            p.display()
        )
    })?))
}

fn write_state(dir: &Path, s: &StepState) -> Result<()> {
    write_atomic(
        &state_path(dir, &s.step),
        serde_json::to_string_pretty(s)?.as_bytes(),
    )
}

/// Moves a step's outputs and record to `<run>/superseded/<time>-<step>-<hash>/`.
fn supersede(dir: &Path, old: &StepState) -> Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let to = dir
        .join("superseded")
        .join(format!("{secs}-{}-{}", old.step, &old.hash[..12]));
    for rel in outputs(&old.step)
        .iter()
        .copied()
        .chain([&*format!("pipeline/{}.json", old.step)])
    {
        let from = dir.join(rel);
        if !from.exists() {
            continue;
        }
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().expect("joined path has a parent"))
            .with_context(|| format!("creating {}", to.display()))?;
        std::fs::rename(&from, &dest)
            .with_context(|| format!("moving {} to {}", from.display(), dest.display()))?;
    }
    Ok(to)
}

pub fn run(cfg: &PipelineConfig, opts: &Options) -> Result<Outcome> {
    let dir = &cfg.run.dir;
    std::fs::create_dir_all(dir.join("pipeline"))
        .with_context(|| format!("creating {}", dir.join("pipeline").display()))?;
    let resolved = toml::to_string(cfg).context("writing the resolved config")?;
    write_atomic(&dir.join("pipeline/config.toml"), resolved.as_bytes())?;
    let steps = step_inputs(cfg)?;
    let stage1_dir = dir.join("stage1");
    let mut generator: Option<Llm> = None;
    let mut actions = Vec::new();
    let total = STEPS.len();
    for (i, (step, inputs, hash)) in steps.into_iter().enumerate() {
        let prior = read_state(dir, &step)?;
        let action = match &prior {
            Some(s) if s.hash == hash && s.status == Status::Done => {
                println!(
                    "[{}/{total}] {step}: done before, skipped ({})",
                    i + 1,
                    s.summary
                );
                actions.push((step, "skipped".to_string()));
                continue;
            }
            Some(s) if s.hash != hash => {
                let to = supersede(dir, s)?;
                println!(
                    "[{}/{total}] {step}: its settings or inputs changed; the earlier outputs are in {}",
                    i + 1,
                    to.display()
                );
                "ran"
            }
            Some(_) => "resumed",
            None => "ran",
        };
        let mut state = StepState {
            step: step.clone(),
            hash,
            status: Status::Started,
            seconds: prior
                .as_ref()
                .filter(|_| action == "resumed")
                .map_or(0.0, |s| s.seconds),
            summary: String::new(),
            inputs,
        };
        write_state(dir, &state)?;
        println!(
            "[{}/{total}] {step}: {}",
            i + 1,
            if action == "resumed" {
                "resuming"
            } else {
                "running"
            }
        );
        let t0 = std::time::Instant::now();
        if matches!(step.as_str(), "extract" | "sample" | "synth") && generator.is_none() {
            generator = Some(Llm::open(
                cfg.server.clone(),
                &cfg.run.generator,
                &opts.models_dir,
                &cfg.engine,
            )?);
        }
        if step == "train" {
            // The generator's memory goes back before training takes its own.
            generator = None;
        }
        state.summary = match step.as_str() {
            "extract" => {
                let schema = MetaSchema::load(cfg.stage1.schema.as_deref())?;
                let run = crate::stage1::extract::Extraction {
                    cfg: &cfg.stage1,
                    schema: &schema,
                    dir: stage1_dir.clone(),
                    model: cfg.run.generator.clone(),
                    shard: Shard::whole(),
                    limit: cfg.stage1.input.limit,
                    progress: opts.progress,
                };
                let s = run.run(generator.as_ref().expect("loaded above"))?;
                format!("{} records, {} rejected", s.records, s.rejects)
            }
            "graph" => {
                let schema = MetaSchema::load(cfg.stage1.schema.as_deref())?;
                let g = crate::stage1::graph::run(&cfg.stage1, &schema, &stage1_dir)?;
                format!(
                    "{} graphs, {} nodes, {} edges",
                    g.len(),
                    g.iter().map(|s| s.nodes).sum::<usize>(),
                    g.iter().map(|s| s.edges).sum::<usize>()
                )
            }
            "sample" => {
                let (paths, _) = crate::stage1::sample::run(
                    generator.as_ref(),
                    &cfg.run.generator,
                    &cfg.stage1.sample,
                    &stage1_dir,
                    opts.progress,
                )?;
                format!("{paths} paths, each with its blueprint")
            }
            "synth" => {
                let out = crate::stage2::run::run(&crate::stage2::run::SynthJob {
                    llm: generator.as_ref().expect("loaded above"),
                    model: cfg.run.generator.clone(),
                    tokenizer: cfg.run.tokenizer.clone(),
                    cfg: &cfg.stage2,
                    run: dir.clone(),
                    blueprints: crate::stage2::run::default_blueprints(dir),
                    shard: Shard::whole(),
                    models_dir: opts.models_dir.clone(),
                    engine: cfg.engine.clone(),
                })?;
                if out.pairs == 0 {
                    anyhow::bail!(
                        "synthesis kept no pairs (rejections: {:?}); see {}",
                        out.stats.rejected,
                        dir.join("stage2/README.md").display()
                    );
                }
                format!(
                    "{} documents, {} contexts, {} pairs kept",
                    out.documents, out.contexts, out.pairs
                )
            }
            "train" => {
                let s = crate::train::run::train(
                    &cfg.train,
                    dir,
                    &crate::train::run::RunOptions {
                        models_dir: opts.models_dir.clone(),
                        progress: opts.progress,
                        stop_after: None,
                        device: cfg.engine.device.clone(),
                    },
                )?;
                format!(
                    "{} steps, loss {} -> {}",
                    s.steps,
                    s.first_loss.map_or("-".into(), |l| format!("{l:.3}")),
                    s.last_loss.map_or("-".into(), |l| format!("{l:.3}"))
                )
            }
            "eval_before" | "eval_after" => {
                let after = step == "eval_after";
                let (model, adapter) = evaluated_model(cfg, after)?;
                let ruler = cfg.eval.ruler()?;
                let assets = Assets::for_config(&ruler)?;
                let engine = models::load_engine_with_adapter(
                    &model,
                    adapter.as_deref(),
                    &opts.models_dir,
                    &cfg.engine,
                )?;
                let out = dir
                    .join("eval")
                    .join(if after { "after" } else { "before" });
                let report = RulerRun {
                    config: ruler,
                    out: out.clone(),
                    cache_dir: cfg.eval.cache_dir.clone(),
                    model,
                    adapter: adapter.map(|p| p.display().to_string()),
                    chat: cfg.eval.chat,
                    progress: opts.progress,
                    prepare_only: false,
                }
                .run(&engine, &assets)?
                .context("the evaluation wrote no report")?;
                format!("RULER average {:.2}", report.average)
            }
            _ => unreachable!("STEPS lists every step"),
        };
        state.seconds += t0.elapsed().as_secs_f64();
        state.status = Status::Done;
        write_state(dir, &state)?;
        println!(
            "[{}/{total}] {step}: {} ({:.0} s)",
            i + 1,
            state.summary,
            state.seconds
        );
        actions.push((step, action.to_string()));
    }
    let report = report::write(cfg, dir, &opts.config_path)?;
    Ok(Outcome { actions, report })
}

/// The model RULER evaluates: the base before training; after it, the base with the
/// trained adapter, or the merged export when no adapter was written.
pub fn evaluated_model(cfg: &PipelineConfig, after: bool) -> Result<(String, Option<PathBuf>)> {
    if !after {
        return Ok((cfg.train.model.clone(), None));
    }
    let train = cfg.run.dir.join("train");
    let adapter = train.join("adapter");
    if adapter.join("adapter_config.json").is_file() {
        return Ok((cfg.train.model.clone(), Some(adapter)));
    }
    let merged = train.join("merged");
    if merged.join("config.json").is_file() {
        return Ok((merged.display().to_string(), None));
    }
    anyhow::bail!(
        "{}: training exported neither an adapter nor a merged model (train.export)",
        train.display()
    )
}
