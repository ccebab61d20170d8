//! `wildlong train`: a recipe read top to bottom — data (messages JSONL → tokens → rows,
//! a held-out split), the model (LoRA or full, RoPE from the recipe), then optimizer steps
//! with periodic evaluation, a JSONL log, checkpoints and exact resume, and the exports.
//!
//! Everything a step depends on is a function of the recipe and the step number: the rows
//! of step `s` are `micro_batch × grad_accum` consecutive entries of an endless stream that
//! visits every row once per epoch in a seeded order, and dropout masks are derived from the
//! seed and `s`. A checkpoint therefore holds only the trained tensors, AdamW's moments and
//! step count, and the counters; resuming from it reproduces the uninterrupted run exactly.
//!
//! Files under `<run>/train/`: `identity.json` (recipe + data hashes; another recipe is
//! refused), `data_stats.json`, `log.jsonl` (one line per step and per evaluation),
//! `checkpoints/step-NNNNNN/` (`trainable.safetensors`, `optimizer.safetensors`,
//! `state.json`), `adapter/` (PEFT), `merged/` (HF folder), `summary.json`.

use crate::engine::chat::Message;
use crate::engine::rope::{RopeRecord, RopeScaling};
use crate::records::{self, write_atomic};
use crate::stage2::config::TooLongPolicy;
use crate::train::config::{TrainConfig, TrainMethod};
use crate::train::data::{self, Batch, Example};
use crate::train::model::{self, LoraSpec, TrainModel, TrainOptions};
use crate::train::ops::IGNORE;
use crate::train::optim::{AdamW, AdamWParams};
use crate::train::step::{train_step, StepLog, StepSettings};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Command-line settings that are not part of the recipe.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub models_dir: PathBuf,
    pub progress: bool,
    /// Stop after this many completed steps, as a kill would (tests of resume).
    pub stop_after: Option<usize>,
    /// `cpu` or `cuda[:N]` (the `cuda` feature).
    pub device: String,
}

/// A line of `log.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LogLine {
    Train {
        #[serde(flatten)]
        step: StepLog,
        seconds: f64,
    },
    Eval {
        /// Steps completed when it was measured.
        step: usize,
        loss: f64,
        tokens: usize,
    },
}

impl LogLine {
    /// Steps completed when the line was written.
    fn done(&self) -> usize {
        match self {
            LogLine::Train { step, .. } => step.step + 1,
            LogLine::Eval { step, .. } => *step,
        }
    }
}

/// How the input became rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataStats {
    pub conversations: usize,
    pub train_conversations: usize,
    pub eval_conversations: usize,
    pub train_rows: usize,
    pub eval_rows: usize,
    pub train_tokens: usize,
    /// Tokens the loss is taken on (assistant tokens).
    pub train_loss_tokens: usize,
    pub truncated: usize,
    /// Skipped conversations by reason (`malformed`, `not_utf8`, `too_long`, `no_assistant`, …).
    pub skipped: BTreeMap<String, usize>,
}

/// The training and held-out rows.
pub struct Prepared {
    pub train: Vec<Batch>,
    pub eval: Vec<Batch>,
    pub stats: DataStats,
}

/// What a run is; a folder made with another identity is not resumed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Identity {
    recipe: TrainConfig,
    /// (path, sha256) of every data file.
    data: Vec<(String, String)>,
}

/// Counters a checkpoint restores besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CheckpointState {
    /// Steps completed.
    step: usize,
    adam_t: usize,
    bad_steps: usize,
    total_steps: usize,
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub steps: usize,
    pub skipped_steps: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub eval_losses: Vec<(usize, f64)>,
    /// Row tokens (padding included) processed by this invocation, its wall time and rate
    /// (evaluation and exports included).
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub peak_rss_mib: Option<u64>,
    pub rope: RopeRecord,
    pub trainable_parameters: usize,
    pub adapter: Option<String>,
    pub merged: Option<String>,
}

/// Reads the `messages` JSONL files, renders and tokenizes each conversation, splits off the
/// held-out share and cuts both sides into rows.
pub fn prepare_data(
    cfg: &TrainConfig,
    files: &[PathBuf],
    tokenizer: &crate::engine::tokenizer::Tokenizer,
    template: &crate::engine::chat::ChatTemplate,
    pad: u32,
) -> Result<Prepared> {
    #[derive(Deserialize)]
    struct Line {
        messages: Vec<Message>,
    }
    let d = &cfg.data;
    let mut stats = DataStats::default();
    let mut train = Vec::new();
    let mut eval = Vec::new();
    let skip =
        |stats: &mut DataStats, why: &str| *stats.skipped.entry(why.into()).or_default() += 1;
    for f in files {
        let name = f.display().to_string();
        let file = std::fs::File::open(f).with_context(|| format!("opening {name}"))?;
        records::for_each_jsonl_line(&name, std::io::BufReader::new(file), |line, text| {
            stats.conversations += 1;
            let text = match text {
                Ok(t) => t,
                Err(_) => {
                    tracing::warn!("{name}:{line}: not UTF-8, skipped");
                    skip(&mut stats, "not_utf8");
                    return Ok(());
                }
            };
            let conv: Line = match serde_json::from_str(text) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("{name}:{line}: not a messages record ({e}), skipped");
                    skip(&mut stats, "malformed");
                    return Ok(());
                }
            };
            let mut ex = match data::tokenize(tokenizer, template, &conv.messages) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("{name}:{line}: {e:#}, skipped");
                    skip(&mut stats, "no_assistant");
                    return Ok(());
                }
            };
            if ex.tokens.len() > d.max_length {
                match d.too_long {
                    TooLongPolicy::Skip => {
                        skip(&mut stats, "too_long");
                        return Ok(());
                    }
                    TooLongPolicy::Truncate => {
                        ex.tokens.truncate(d.max_length);
                        ex.targets.truncate(d.max_length);
                        if let Some(last) = ex.targets.last_mut() {
                            *last = IGNORE;
                        }
                        stats.truncated += 1;
                    }
                }
            }
            if ex.counted() == 0 {
                skip(&mut stats, "no_loss_tokens");
                return Ok(());
            }
            // A seeded hash of the record picks the held-out share (stable under reordering).
            let h = records::derived_u64(cfg.seed, &[b"eval", text.as_bytes()]);
            if (h as f64 / u64::MAX as f64) < d.eval_fraction {
                eval.push(ex);
            } else {
                train.push(ex);
            }
            Ok(())
        })?;
    }
    // Overflow of the held-out cap goes back to training.
    if eval.len() > d.max_eval {
        train.extend(eval.drain(d.max_eval..));
    }
    if train.is_empty() {
        bail!(
            "no usable training conversation in {} ({} read, skipped: {:?})",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            stats.conversations,
            stats.skipped
        );
    }
    stats.train_conversations = train.len();
    stats.eval_conversations = eval.len();
    stats.train_tokens = train.iter().map(|e| e.tokens.len()).sum();
    stats.train_loss_tokens = train.iter().map(Example::counted).sum();
    let rows = |mut ex: Vec<Example>, label: &[u8]| -> Result<Vec<Batch>> {
        if d.packing {
            // Packed in a seeded order so rows mix conversations from the whole input.
            use rand::seq::SliceRandom;
            ex.shuffle(&mut records::derived_rng(cfg.seed, &[b"pack", label]));
            data::pack(&ex, d.max_length, pad)
        } else {
            Ok(ex
                .iter()
                .map(|e| data::pad_batch(std::slice::from_ref(e), pad))
                .collect())
        }
    };
    let train = rows(train, b"train")?;
    let eval = rows(eval, b"eval")?;
    stats.train_rows = train.len();
    stats.eval_rows = eval.len();
    Ok(Prepared { train, eval, stats })
}

/// Rows stacked into one micro-batch, padded to the longest (pads: own segment, no loss).
pub fn stack(rows: &[&Batch], pad: u32) -> Batch {
    let len = rows.iter().map(|r| r.tokens[0].len()).max().unwrap_or(0);
    let mut b = Batch::default();
    for r in rows {
        let n = r.tokens[0].len();
        let fill = len - n;
        let mut t = r.tokens[0].clone();
        t.extend(std::iter::repeat_n(pad, fill));
        let mut p = r.positions[0].clone();
        p.extend(0..fill as u32);
        let mut s = r.segments[0].clone();
        s.extend(std::iter::repeat_n(u32::MAX, fill));
        b.tokens.push(t);
        b.positions.push(p);
        b.segments.push(s);
        b.targets.extend(&r.targets);
        b.targets.extend(std::iter::repeat_n(IGNORE, fill));
    }
    b
}

/// Row indices of step `step`: entries `[step·n, (step+1)·n)` of the stream that visits
/// every row once per epoch, each epoch in its own seeded order.
pub fn step_rows(seed: u64, rows: usize, per_step: usize, step: usize) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut cache: Option<(usize, Vec<usize>)> = None;
    (step * per_step..(step + 1) * per_step)
        .map(|i| {
            let (epoch, at) = (i / rows, i % rows);
            if cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let mut order: Vec<usize> = (0..rows).collect();
                order.shuffle(&mut records::derived_rng(
                    seed,
                    &[b"order", &(epoch as u64).to_le_bytes()],
                ));
                cache = Some((epoch, order));
            }
            cache.as_ref().expect("set above").1[at]
        })
        .collect()
}

/// Token-mean loss of `rows` without dropout, `micro` rows per forward.
pub fn evaluate(m: &TrainModel, rows: &[Batch], micro: usize, pad: u32) -> Result<(f64, usize)> {
    m.set_dropout_seed(None);
    let (mut sum, mut tokens) = (0f64, 0usize);
    for chunk in rows.chunks(micro.max(1)) {
        let refs: Vec<&Batch> = chunk.iter().collect();
        let b = stack(&refs, pad);
        let loss = m.loss(&b.rows(), &b.targets)?;
        sum += loss.to_scalar::<f32>()? as f64;
        tokens += b.counted();
    }
    Ok((sum / tokens.max(1) as f64, tokens))
}

fn train_options(cfg: &TrainConfig, device: candle_core::Device) -> TrainOptions {
    let l = &cfg.lora;
    TrainOptions {
        lora: (cfg.method == TrainMethod::Lora).then(|| LoraSpec {
            rank: l.rank,
            alpha: l.alpha,
            targets: l.targets.clone(),
            seed: cfg.seed,
            dropout: l.dropout,
        }),
        full: cfg.method == TrainMethod::Full,
        base_dtype: if cfg.base_dtype == "bf16" {
            DType::BF16
        } else {
            DType::F32
        },
        device,
    }
}

/// The data files a recipe names (default: stage 2's output in `run`).
pub fn data_files(cfg: &TrainConfig, run: &Path) -> Result<Vec<PathBuf>> {
    if cfg.data.paths.is_empty() {
        let p = crate::layout::RunLayout::new(run).data();
        if !p.is_file() {
            bail!(
                "{}: no training data (run `wildlong synth --run {}` first, or set data.paths)",
                p.display(),
                run.display()
            );
        }
        return Ok(vec![p]);
    }
    cfg.data
        .paths
        .iter()
        .map(|p| crate::models::resolve_data_file(p).with_context(|| format!("data.paths: {p}")))
        .collect()
}

fn checkpoint_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// Checkpoints in `dir` as (step, folder), oldest first (half-written ones have a temporary
/// name and are not listed).
fn checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    if !dir.is_dir() {
        return Ok(vec![]);
    }
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let step = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(s) = step {
            all.push((s, p));
        }
    }
    all.sort();
    Ok(all)
}

/// The newest complete checkpoint in `dir`.
fn latest_checkpoint(dir: &Path) -> Result<Option<(usize, PathBuf)>> {
    Ok(checkpoints(dir)?
        .into_iter()
        .rev()
        .find(|(_, p)| p.join("state.json").is_file()))
}

fn save_checkpoint(
    dir: &Path,
    m: &TrainModel,
    opt: &AdamW,
    state: &CheckpointState,
    keep: usize,
) -> Result<()> {
    let final_dir = dir.join(checkpoint_name(state.step));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        checkpoint_name(state.step),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut weights = HashMap::new();
    for (name, v) in m.trainable() {
        weights.insert(name, v.as_tensor().clone());
    }
    safetensors::serialize_to_file(&weights, None, &tmp.join("trainable.safetensors"))?;
    let mut moments = HashMap::new();
    for (i, (m1, v1)) in opt.m.iter().zip(&opt.v).enumerate() {
        moments.insert(format!("m.{i}"), m1.clone());
        moments.insert(format!("v.{i}"), v1.clone());
    }
    safetensors::serialize_to_file(&moments, None, &tmp.join("optimizer.safetensors"))?;
    std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(state)?)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming to {}", final_dir.display()))?;
    // Older checkpoints beyond `keep` go.
    let all = checkpoints(dir)?;
    let n = all.len();
    for (_, p) in all.into_iter().take(n.saturating_sub(keep)) {
        std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

fn load_checkpoint(dir: &Path, m: &TrainModel, opt: &mut AdamW) -> Result<CheckpointState> {
    let what = dir.display().to_string();
    let state: CheckpointState =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)
            .with_context(|| format!("{what}/state.json"))?;
    let w = candle_core::safetensors::load(dir.join("trainable.safetensors"), m.device())
        .with_context(|| format!("{what}/trainable.safetensors"))?;
    for (name, v) in m.trainable() {
        let t = w
            .get(&name)
            .with_context(|| format!("{what}: no `{name}`"))?;
        if t.dims() != v.dims() {
            bail!(
                "{what}: `{name}` has shape {:?}, the model {:?}",
                t.dims(),
                v.dims()
            );
        }
        v.set(t)?;
    }
    let mo = candle_core::safetensors::load(dir.join("optimizer.safetensors"), m.device())
        .with_context(|| format!("{what}/optimizer.safetensors"))?;
    let get = |k: String| -> Result<Tensor> {
        mo.get(&k)
            .cloned()
            .with_context(|| format!("{what}: no optimizer moment `{k}`"))
    };
    for i in 0..opt.vars.len() {
        opt.m[i] = get(format!("m.{i}"))?;
        opt.v[i] = get(format!("v.{i}"))?;
    }
    opt.t = state.adam_t;
    Ok(state)
}

/// Peak resident memory of this process so far (Linux), in MiB.
pub fn peak_rss_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// Runs (or resumes, or finds finished) the recipe `cfg` in `<run>/train`.
pub fn train(cfg: &TrainConfig, run: &Path, opts: &RunOptions) -> Result<Summary> {
    let device = crate::models::parse_device(&opts.device)?;
    if device.is_metal() {
        bail!(
            "training runs on `cpu` or `cuda[:N]`, not `{}`",
            opts.device
        );
    }
    if device.is_cuda() {
        // TF32 for the f32 products (adapters, the f32 head), as PyTorch's `allow_tf32`.
        #[cfg(feature = "cuda")]
        candle_core::cuda_backend::set_gemm_reduced_precision_f32(true);
    }
    // The plan against the device's free memory, before any weight or data is read.
    let shape = crate::models::model_config(&cfg.model, &opts.models_dir)?;
    let kind = match device.is_cuda() {
        true => crate::train::plan::PlanDevice::Cuda,
        false => crate::train::plan::PlanDevice::Cpu,
    };
    if let Some((free, whence)) = crate::engine::memory::free_bytes_whence(&device) {
        let gib = free as f64 / (1u64 << 30) as f64;
        crate::train::plan::refuse_unfit(&shape, cfg, kind, gib, whence)?;
    }
    let out = crate::layout::RunLayout::new(run).train();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let files = data_files(cfg, run)?;
    let identity = Identity {
        recipe: cfg.clone(),
        data: files
            .iter()
            .map(|f| Ok((f.display().to_string(), crate::models::sha256_file(f)?)))
            .collect::<Result<_>>()?,
    };
    let summary_path = out.join(crate::layout::train::SUMMARY);
    let loaded = model::load_with(
        &cfg.model,
        &opts.models_dir,
        &train_options(cfg, device),
        &cfg.rope,
    )?;
    let mut m = loaded.model;
    m.checkpoint_layers = cfg.memory.checkpoint_layers;
    m.attention_block = cfg.memory.attention_block;
    m.loss_chunk = cfg.memory.loss_chunk;
    m.mlp_tile = cfg.memory.mlp_tile;
    m.offload_checkpoints = cfg.memory.offload_checkpoints;
    let template = loaded.template.as_ref().with_context(|| {
        format!(
            "{}: the model has no chat template to render conversations with",
            cfg.model
        )
    })?;
    let pad = loaded.tokenizer.eos_ids().first().copied().unwrap_or(0);
    let data = prepare_data(cfg, &files, &loaded.tokenizer, template, pad)?;
    // Checked once the data and model load, so that a run that could not start leaves the
    // folder free for corrected settings; a run with checkpoints keeps its recipe.
    records::check_identity(&out.join("identity.json"), &identity)?;
    if summary_path.is_file() {
        let s: Summary = serde_json::from_str(&std::fs::read_to_string(&summary_path)?)
            .with_context(|| format!("{}: not a training summary", summary_path.display()))?;
        eprintln!("{}: already trained ({} steps)", out.display(), s.steps);
        return Ok(s);
    }
    write_atomic(
        &out.join(crate::layout::train::DATA_STATS),
        serde_json::to_string_pretty(&data.stats)?.as_bytes(),
    )?;

    let s = &cfg.schedule;
    let per_step = s.micro_batch * s.grad_accum;
    let total_steps = if s.steps > 0 {
        s.steps
    } else {
        (s.epochs * data.train.len()).div_ceil(per_step).max(1)
    };
    let settings = StepSettings {
        lr: cfg.optim.lr,
        warmup_steps: cfg.optim.warmup_steps,
        total_steps,
        min_lr_ratio: cfg.optim.min_lr_ratio,
        max_grad_norm: (cfg.optim.max_grad_norm > 0.0).then_some(cfg.optim.max_grad_norm),
        seed: cfg.seed,
    };
    let vars: Vec<_> = m.trainable().into_iter().map(|(_, v)| v).collect();
    let trainable_parameters = vars.iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(
        vars,
        AdamWParams {
            beta1: cfg.optim.beta1,
            beta2: cfg.optim.beta2,
            eps: cfg.optim.eps,
            weight_decay: cfg.optim.weight_decay,
        },
    )?;

    // Resume: the newest checkpoint's tensors and counters; the log cut back to it.
    let ckpt_dir = out.join("checkpoints");
    let log_path = out.join(crate::layout::train::LOG);
    let (mut done, mut bad_steps) = (0usize, 0usize);
    if let Some((step, dir)) = latest_checkpoint(&ckpt_dir)? {
        let st = load_checkpoint(&dir, &m, &mut opt)?;
        if st.step != step || st.total_steps != total_steps {
            bail!(
                "{}: checkpoint does not match this run ({st:?})",
                dir.display()
            );
        }
        done = st.step;
        bad_steps = st.bad_steps;
        eprintln!(
            "resuming from {} (step {done} of {total_steps})",
            dir.display()
        );
    }
    let mut log: Vec<LogLine> = if log_path.is_file() {
        records::read_jsonl_resumable(&log_path)?
    } else {
        vec![]
    };
    log.retain(|l| l.done() <= done);
    records::write_jsonl_atomic(&log_path, &log)?;

    let bar = records::progress_bar(opts.progress, total_steps as u64, "steps");
    bar.set_position(done as u64);
    let started = std::time::Instant::now();
    let mut tokens_seen = 0usize;
    let eval_now = |m: &TrainModel, step: usize, log: &mut Vec<LogLine>| -> Result<()> {
        if data.eval.is_empty() {
            return Ok(());
        }
        let (loss, tokens) = evaluate(m, &data.eval, s.micro_batch, pad)?;
        let line = LogLine::Eval { step, loss, tokens };
        records::append_line(&log_path, &line)?;
        log.push(line);
        Ok(())
    };
    if !log
        .iter()
        .any(|l| matches!(l, LogLine::Eval { step: 0, .. }))
    {
        eval_now(&m, 0, &mut log)?;
    }
    while done < total_steps {
        let t0 = std::time::Instant::now();
        let idx = step_rows(cfg.seed, data.train.len(), per_step, done);
        let micro: Vec<Batch> = idx
            .chunks(s.micro_batch)
            .map(|c| stack(&c.iter().map(|&i| &data.train[i]).collect::<Vec<_>>(), pad))
            .collect();
        let step_log = train_step(&m, &mut opt, &micro, done, &settings)
            .with_context(|| format!("step {done}"))?;
        tokens_seen += micro
            .iter()
            .map(|b| b.tokens.len() * b.tokens[0].len())
            .sum::<usize>();
        if step_log.skipped {
            bad_steps += 1;
            tracing::warn!(
                "step {done}: non-finite gradients, update skipped ({bad_steps} so far)"
            );
        }
        bar.set_message(format!("loss {:.4}", step_log.loss));
        let line = LogLine::Train {
            step: step_log,
            seconds: t0.elapsed().as_secs_f64(),
        };
        records::append_line(&log_path, &line)?;
        log.push(line);
        done += 1;
        bar.set_position(done as u64);
        if s.eval_every > 0 && done % s.eval_every == 0 && done < total_steps {
            eval_now(&m, done, &mut log)?;
        }
        let state = CheckpointState {
            step: done,
            adam_t: opt.t,
            bad_steps,
            total_steps,
        };
        if bad_steps > s.max_bad_steps {
            save_checkpoint(&ckpt_dir, &m, &opt, &state, s.keep_checkpoints)?;
            bail!(
                "{bad_steps} steps had non-finite gradients (more than schedule.max_bad_steps = {}); stopped at step {done} with a checkpoint — lower optim.lr or check the data",
                s.max_bad_steps
            );
        }
        if done % s.checkpoint_every == 0 || done == total_steps {
            save_checkpoint(&ckpt_dir, &m, &opt, &state, s.keep_checkpoints)?;
        }
        if opts.stop_after == Some(done) && done < total_steps {
            bar.abandon();
            bail!("stopped after step {done} as asked (--stop-after)");
        }
    }
    bar.finish_and_clear();
    if !matches!(log.last(), Some(LogLine::Eval { step, .. }) if *step == total_steps) {
        eval_now(&m, total_steps, &mut log)?;
    }

    // Exports.
    let mut adapter = None;
    let mut merged = None;
    if cfg.method == TrainMethod::Lora && cfg.export.peft {
        let dir = out.join("adapter");
        m.save_peft(&dir, &cfg.model)?;
        adapter = Some(dir.display().to_string());
    }
    if cfg.export.merged || cfg.method == TrainMethod::Full {
        let dir = out.join("merged");
        m.save_merged(&dir, &loaded.tokenizer, loaded.template.as_ref())?;
        merged = Some(dir.display().to_string());
    }
    let train_lines: Vec<&StepLog> = log
        .iter()
        .filter_map(|l| match l {
            LogLine::Train { step, .. } => Some(step),
            _ => None,
        })
        .collect();
    let seconds = started.elapsed().as_secs_f64();
    let summary = Summary {
        steps: total_steps,
        skipped_steps: bad_steps,
        first_loss: train_lines.first().map(|l| l.loss),
        last_loss: train_lines.last().map(|l| l.loss),
        eval_losses: log
            .iter()
            .filter_map(|l| match l {
                LogLine::Eval { step, loss, .. } => Some((*step, *loss)),
                _ => None,
            })
            .collect(),
        tokens: tokens_seen,
        seconds,
        tokens_per_second: tokens_seen as f64 / seconds.max(1e-9),
        peak_rss_mib: peak_rss_mib(),
        rope: RopeRecord::of(&m.cfg.rope),
        trainable_parameters,
        adapter,
        merged,
    };
    write_atomic(
        &summary_path,
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    if summary.rope.rope_scaling != RopeScaling::Default {
        tracing::info!("trained with RoPE {:?}", summary.rope);
    }
    Ok(summary)
}
