//! `wildlong run CONFIG`: every stage in order into one run folder — extract → graph →
//! sample → synth → train → RULER before → RULER after → report.
//!
//! Each step's inputs (its section of the resolved config and the hash of the step before
//! it) are hashed; `<run>/pipeline/<step>.json` records the hash, `started` when the step
//! begins and `done` when it ends. A rerun skips done steps with the same hash, resumes a
//! started one (every stage resumes on its own: append-only records, a content-addressed
//! store, checkpoints), and moves the outputs of a step whose inputs changed — and so of
//! every step after it — to `<run>/superseded/` before running it again. Nothing is deleted.

pub mod config;
pub mod report;

use crate::engine::config::EngineConfig;
use crate::eval::ruler::data::Assets;
use crate::eval::ruler::run::RulerRun;
use crate::generator::Llm;
use crate::layout::RunLayout;
use crate::models;
use crate::pipeline::config::PipelineConfig;
use crate::records::write_atomic;
use crate::shard::Shard;
use crate::stage1::config::MetaSchema;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The pipeline's steps, in order. Each owns its outputs under the run folder and names
/// the step whose outputs it reads (its hash covers that step's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Extract,
    Graph,
    Sample,
    Synth,
    Train,
    EvalBefore,
    EvalAfter,
}

impl Step {
    pub const ALL: [Step; 7] = [
        Self::Extract,
        Self::Graph,
        Self::Sample,
        Self::Synth,
        Self::Train,
        Self::EvalBefore,
        Self::EvalAfter,
    ];

    /// The name in `pipeline/<name>.json`, the hash and the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Extract => "extract",
            Self::Graph => "graph",
            Self::Sample => "sample",
            Self::Synth => "synth",
            Self::Train => "train",
            Self::EvalBefore => "eval_before",
            Self::EvalAfter => "eval_after",
        }
    }

    /// The step whose outputs this one reads (RULER before training reads none).
    pub fn parent(self) -> Option<Step> {
        match self {
            Self::Extract | Self::EvalBefore => None,
            Self::Graph => Some(Self::Extract),
            Self::Sample => Some(Self::Graph),
            Self::Synth => Some(Self::Sample),
            Self::Train => Some(Self::Synth),
            Self::EvalAfter => Some(Self::Train),
        }
    }

    /// What the step owns in the run folder (moved aside when its inputs change), its
    /// record `pipeline/<step>.json` last.
    pub fn outputs(self, run: &RunLayout) -> Vec<PathBuf> {
        use crate::layout::stage1 as s1;
        let in1 = |names: &[&str]| names.iter().map(|n| run.stage1().join(n)).collect();
        let mut owned: Vec<PathBuf> = match self {
            Self::Extract => vec![run.stage1()],
            Self::Graph => in1(&[
                s1::NORMALIZED,
                s1::MERGES,
                s1::GRAPHS,
                s1::GRAPH_SUMMARY,
                s1::GRAPH_SUMMARY_MD,
            ]),
            Self::Sample => in1(&[
                s1::PATHS,
                s1::SAMPLE_STATS,
                s1::SAMPLE_IDENTITY,
                s1::BLUEPRINTS,
            ]),
            Self::Synth => vec![run.stage2()],
            Self::Train => vec![run.train()],
            Self::EvalBefore => vec![run.eval(false)],
            Self::EvalAfter => vec![run.eval(true)],
        };
        owned.push(run.step_state(self.name()));
        owned
    }

    /// Whether the step generates text with the run's generator (loaded once, kept until
    /// training needs the memory).
    pub fn generates(self) -> bool {
        matches!(self, Self::Extract | Self::Sample | Self::Synth)
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

/// Each step's hashed inputs and hash, chained: a step's hash covers every step it reads from.
pub fn step_inputs(cfg: &PipelineConfig) -> Result<Vec<(Step, serde_json::Value, String)>> {
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
    let own = |step: Step| match step {
        Step::Extract => {
            json!({ "gen": generator, "schema": schema, "input": s1.input, "filter": s1.filter, "extract": s1.extract })
        }
        Step::Graph => json!({ "normalize": s1.normalize, "graph": s1.graph }),
        Step::Sample => json!({ "gen": generator, "sample": s1.sample }),
        Step::Synth => json!({ "gen": generator, "stage2": cfg.stage2 }),
        Step::Train => json!({ "train": cfg.train }),
        Step::EvalBefore => json!({ "engine": engine, "eval": cfg.eval, "model": cfg.train.model }),
        Step::EvalAfter => json!({ "engine": engine, "eval": cfg.eval }),
    };
    let mut out: Vec<(Step, serde_json::Value, String)> = Vec::new();
    for step in Step::ALL {
        let up = step
            .parent()
            .and_then(|p| out.iter().find(|(s, ..)| *s == p))
            .map(|(.., h)| h.clone())
            .unwrap_or_default();
        let inputs = own(step);
        let hash = sha(format!("{}\n{up}\n{inputs}", step.name()).as_bytes());
        out.push((step, inputs, hash));
    }
    Ok(out)
}

pub fn read_state(dir: &Path, step: &str) -> Result<Option<StepState>> {
    let p = RunLayout::new(dir).step_state(step);
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
        &RunLayout::new(dir).step_state(&s.step),
        serde_json::to_string_pretty(s)?.as_bytes(),
    )
}

/// Moves a step's outputs and record to `<run>/superseded/<time>-<step>-<hash>/`.
fn supersede(dir: &Path, step: Step, old: &StepState) -> Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let layout = RunLayout::new(dir);
    let to = layout
        .superseded()
        .join(format!("{secs}-{}-{}", old.step, &old.hash[..12]));
    for from in step.outputs(&layout) {
        if !from.exists() {
            continue;
        }
        let rel = from
            .strip_prefix(dir)
            .expect("the layout's paths are under the run folder");
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().expect("joined path has a parent"))
            .with_context(|| format!("creating {}", to.display()))?;
        std::fs::rename(&from, &dest)
            .with_context(|| format!("moving {} to {}", from.display(), dest.display()))?;
    }
    Ok(to)
}

/// `wildlong run`: [`run`], then one line on what it did.
pub fn command(cfg: &PipelineConfig, opts: &Options) -> Result<()> {
    let t0 = std::time::Instant::now();
    let out = run(cfg, opts)?;
    let ran = out.actions.iter().filter(|a| a.1 != "skipped").count();
    println!(
        "{ran} of {} steps run in {:.0} s; report: {} (+ report.svg)",
        out.actions.len(),
        t0.elapsed().as_secs_f64(),
        out.report.display()
    );
    Ok(())
}

pub fn run(cfg: &PipelineConfig, opts: &Options) -> Result<Outcome> {
    let dir = &cfg.run.dir;
    let layout = RunLayout::new(dir);
    std::fs::create_dir_all(layout.pipeline())
        .with_context(|| format!("creating {}", layout.pipeline().display()))?;
    let resolved = toml::to_string(cfg).context("writing the resolved config")?;
    write_atomic(&layout.resolved_config(), resolved.as_bytes())?;
    let steps = step_inputs(cfg)?;
    let stage1_dir = layout.stage1();
    let mut generator: Option<Llm> = None;
    let mut actions = Vec::new();
    let total = Step::ALL.len();
    for (i, (step_kind, inputs, hash)) in steps.into_iter().enumerate() {
        let step = step_kind.name().to_string();
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
                let to = supersede(dir, step_kind, s)?;
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
        if step_kind.generates() && generator.is_none() {
            generator = Some(Llm::open(
                cfg.server.clone(),
                &cfg.run.generator,
                &opts.models_dir,
                &cfg.engine,
            )?);
        }
        if step_kind == Step::Train {
            // The generator's memory goes back before training takes its own.
            generator = None;
        }
        let llm = generator.as_ref().filter(|_| step_kind.generates());
        state.summary = match step_kind {
            Step::Extract => {
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
                let s = run.run(llm.context("the generator")?)?;
                format!("{} records, {} rejected", s.records, s.rejects)
            }
            Step::Graph => {
                let schema = MetaSchema::load(cfg.stage1.schema.as_deref())?;
                let g = crate::stage1::graph::run(&cfg.stage1, &schema, &stage1_dir)?;
                format!(
                    "{} graphs, {} nodes, {} edges",
                    g.len(),
                    g.iter().map(|s| s.nodes).sum::<usize>(),
                    g.iter().map(|s| s.edges).sum::<usize>()
                )
            }
            Step::Sample => {
                let (paths, _) = crate::stage1::sample::run(
                    llm,
                    &cfg.run.generator,
                    &cfg.stage1.sample,
                    &stage1_dir,
                    opts.progress,
                )?;
                format!("{paths} paths, each with its blueprint")
            }
            Step::Synth => {
                let out = crate::stage2::run::run(&crate::stage2::run::SynthJob {
                    llm: llm.context("the generator")?,
                    model: cfg.run.generator.clone(),
                    tokenizer: cfg.run.tokenizer.clone(),
                    cfg: &cfg.stage2,
                    run: dir.clone(),
                    blueprints: layout.blueprints(),
                    shard: Shard::whole(),
                    models_dir: opts.models_dir.clone(),
                    engine: cfg.engine.clone(),
                })?;
                if out.pairs == 0 {
                    anyhow::bail!(
                        "synthesis kept no pairs (rejections: {:?}); see {}",
                        out.stats.rejected,
                        layout
                            .stage(crate::layout::stage2::DIR, crate::layout::stage2::CARD)
                            .display()
                    );
                }
                format!(
                    "{} documents, {} contexts, {} pairs kept",
                    out.documents, out.contexts, out.pairs
                )
            }
            Step::Train => {
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
            Step::EvalBefore | Step::EvalAfter => {
                let after = step_kind == Step::EvalAfter;
                let (model, adapter) = evaluated_model(cfg, after)?;
                let ruler = cfg.eval.ruler()?;
                let assets = Assets::for_config(&ruler)?;
                let engine = models::load_engine_with_adapter(
                    &model,
                    adapter.as_deref(),
                    &opts.models_dir,
                    &cfg.engine,
                )?;
                let out = layout.eval(after);
                let report = RulerRun {
                    config: ruler,
                    out: out.clone(),
                    cache_dir: cfg.eval.cache_dir.clone(),
                    model,
                    adapter: adapter.map(|p| p.display().to_string()),
                    chat: cfg.eval.chat,
                    progress: opts.progress,
                    prepare_only: false,
                    shard: crate::shard::Shard::whole(),
                    merge: false,
                }
                .run(&crate::eval::ruler::run::Answerer::Local(&engine), &assets)?
                .context("the evaluation wrote no report")?;
                let short = &cfg.eval.short;
                let tasks = short.tasks("eval.short")?;
                if tasks.is_empty() {
                    format!("RULER average {:.2}", report.average)
                } else {
                    let s = crate::eval::short::run::ShortRun {
                        tasks,
                        fewshot: short.fewshot,
                        limit: short.limit,
                        max_gen_tokens: short.max_gen_tokens,
                        out: out.join("short"),
                        model: report.model.clone(),
                        adapter: report.adapter.clone(),
                        progress: opts.progress,
                        shard: crate::shard::Shard::whole(),
                        merge: false,
                    }
                    .run(&crate::eval::Answerer::Local(&engine))?
                    .context("the short-context check wrote no report")?;
                    let first = s.results.first().and_then(|r| {
                        r.metrics
                            .iter()
                            .next()
                            .map(|(m, v)| format!(", {} {m} {v:.2}", r.task))
                    });
                    format!(
                        "RULER average {:.2}{}",
                        report.average,
                        first.unwrap_or_default()
                    )
                }
            }
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
    let layout = RunLayout::new(&cfg.run.dir);
    let train = layout.train();
    let adapter = layout.stage(crate::layout::train::DIR, crate::layout::train::ADAPTER);
    if adapter.join("adapter_config.json").is_file() {
        return Ok((cfg.train.model.clone(), Some(adapter)));
    }
    let merged = layout.stage(crate::layout::train::DIR, crate::layout::train::MERGED);
    if merged.join("config.json").is_file() {
        return Ok((merged.display().to_string(), None));
    }
    anyhow::bail!(
        "{}: training exported neither an adapter nor a merged model (train.export)",
        train.display()
    )
}
