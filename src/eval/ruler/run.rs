//! Runs a RULER evaluation: prepares (or reuses) the samples of every task × length, generates
//! the missing predictions through the engine in greedy batches, appending each to
//! `pred.jsonl` as it finishes (a killed run resumes where it stopped), then scores and
//! reports.

use crate::engine::config::SamplingParams;
use crate::engine::generate::{Engine, Request};
use crate::eval::ruler::config::{RulerConfig, RulerGenerator};
use crate::eval::ruler::data::Assets;
use crate::eval::ruler::report::{self, Report};
use crate::eval::ruler::synth::{self, PromptFormat, Sample, Synth};
use crate::eval::ruler::tasks;
use crate::records::{append_line, read_jsonl_resumable, write_atomic};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One line of `pred.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub index: usize,
    /// The sample's hash: a prediction counts only for the sample it was made for.
    pub hash: String,
    pub pred: String,
    pub outputs: Vec<String>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub finish_reason: String,
}

/// What an evaluation folder's predictions were made with (`run.json`); a rerun into the
/// same folder must match it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity {
    pub model: String,
    pub adapter: Option<String>,
    pub template: String,
    pub format_fingerprint: String,
    pub weights: String,
    pub dtype: String,
    pub rope: serde_json::Value,
}

/// The engine's prefix-cache use of the last invocation, in the output folder.
pub const ENGINE_STATS: &str = "engine_stats.json";

/// Everything `wildlong eval ruler` needs besides the engine.
pub struct RulerRun {
    pub config: RulerConfig,
    pub out: PathBuf,
    pub cache_dir: PathBuf,
    pub model: String,
    pub adapter: Option<String>,
    /// Render prompts with the model's chat template (RULER's per-model template); off =
    /// RULER's `base` template.
    pub chat: bool,
    pub progress: bool,
    /// Write the samples (`data.jsonl`) and stop (RULER's separate `prepare` step).
    pub prepare_only: bool,
}

/// The first `n` samples of one task at one length, from the hashed cache when present;
/// missing ones are generated (in parallel) and appended to the cache.
#[allow(clippy::too_many_arguments)]
pub fn prepare_samples(
    assets: &Assets,
    format: &PromptFormat,
    fingerprint: &str,
    task: &str,
    generator: &RulerGenerator,
    length: usize,
    seed: u64,
    n: usize,
    cache_dir: &Path,
) -> Result<Vec<Sample>> {
    let key = synth::cache_key(task, generator, length, seed, fingerprint, assets)?;
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating {}", cache_dir.display()))?;
    let path = cache_dir.join(format!("{key}.jsonl"));
    let mut have: Vec<Sample> = read_jsonl_resumable(&path)?;
    have.sort_by_key(|s| s.index);
    have.dedup_by_key(|s| s.index);
    let contiguous = have.iter().enumerate().all(|(i, s)| s.index == i);
    if !contiguous {
        tracing::warn!(
            "{}: gaps in the cached samples, regenerating",
            path.display()
        );
        std::fs::remove_file(&path)?;
        have.clear();
    }
    if have.len() < n {
        let s = Synth::new(assets, format, task, generator, length, seed)
            .with_context(|| format!("task `{task}` at length {length}"))?;
        let new: Vec<Sample> = (have.len()..n)
            .into_par_iter()
            .map(|i| s.sample(i))
            .collect::<Result<_>>()?;
        for smp in &new {
            append_line(&path, smp)?;
        }
        have.extend(new);
    }
    have.truncate(n);
    Ok(have)
}

fn task_dir(out: &Path, length: usize, task: &str) -> PathBuf {
    out.join(length.to_string()).join(task)
}

impl RulerRun {
    /// Runs every task × length and writes the reports; returns the report (`None` with
    /// `prepare_only`).
    pub fn run(&self, engine: &Engine, assets: &Assets) -> Result<Option<Report>> {
        let cfg = &self.config;
        let chat = match (self.chat, engine.chat_template.as_ref()) {
            (true, Some(t)) => Some(t),
            (true, None) => bail!("this model has no chat template: pass --no-chat-template to use RULER's `base` template"),
            (false, _) => None,
        };
        let format = PromptFormat {
            tokenizer: &engine.tokenizer,
            chat,
        };
        let fingerprint = format.fingerprint()?;
        let ecfg = &engine.config;
        let identity = RunIdentity {
            model: self.model.clone(),
            adapter: self.adapter.clone(),
            template: format.describe(),
            format_fingerprint: fingerprint.clone(),
            weights: format!("{:?}", ecfg.weight_format),
            dtype: ecfg.dtype.clone(),
            rope: serde_json::to_value(&engine.model.config().rope)?,
        };
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        crate::records::check_identity(&self.out.join("run.json"), &identity)?;
        let max = engine.max_context();
        if let Some(&l) = cfg.lengths.iter().find(|&&l| l > max) {
            bail!("length {l} exceeds the model's context ({max} tokens); pass --max-context to evaluate beyond it");
        }

        let mut lengths = cfg.lengths.clone();
        lengths.sort();
        lengths.dedup();
        let mut names: Vec<String> = cfg.tasks.keys().cloned().collect();
        tasks::order(&mut names);

        // Samples first (cheap next to generation), so the progress bar knows the total.
        let mut work: Vec<(usize, String, Vec<Sample>, Vec<Prediction>)> = Vec::new();
        for &len in &lengths {
            for name in &names {
                let gen = &cfg.tasks[name];
                let samples = prepare_samples(
                    assets,
                    &format,
                    &fingerprint,
                    name,
                    gen,
                    len,
                    cfg.seed,
                    cfg.samples,
                    &self.cache_dir,
                )?;
                let dir = task_dir(&self.out, len, name);
                let mut text = String::new();
                for s in &samples {
                    text.push_str(&serde_json::to_string(s)?);
                    text.push('\n');
                }
                let data = dir.join("data.jsonl");
                if std::fs::read_to_string(&data).ok().as_deref() != Some(text.as_str()) {
                    write_atomic(&data, text.as_bytes())?;
                }
                let preds: Vec<Prediction> = read_jsonl_resumable(&dir.join("pred.jsonl"))?;
                work.push((len, name.clone(), samples, preds));
            }
        }
        if self.prepare_only {
            return Ok(None);
        }
        let pending: usize = work
            .iter()
            .map(|(_, _, s, p)| {
                let done: HashMap<usize, &str> =
                    p.iter().map(|p| (p.index, p.hash.as_str())).collect();
                s.iter()
                    .filter(|s| done.get(&s.index) != Some(&s.hash.as_str()))
                    .count()
            })
            .sum();
        let bar =
            crate::records::progress_bar(self.progress && pending > 0, pending as u64, "samples");

        let cache_before = engine.cache_stats();
        // All tasks' pending samples of one length go to the engine together (continuous
        // batching keeps its rows busy whatever each answer's length).
        for &len in &lengths {
            let mut todo: Vec<(usize, usize)> = Vec::new(); // (work item, sample)
            for (w, (l, _, samples, preds)) in work.iter().enumerate() {
                if *l != len {
                    continue;
                }
                let done: HashMap<usize, &str> =
                    preds.iter().map(|p| (p.index, p.hash.as_str())).collect();
                for (i, s) in samples.iter().enumerate() {
                    if done.get(&s.index) != Some(&s.hash.as_str()) {
                        todo.push((w, i));
                    }
                }
            }
            if todo.is_empty() {
                continue;
            }
            bar.set_message(format!("{} tasks @ {len}", names.len()));
            let reqs = todo
                .iter()
                .map(|&(w, i)| {
                    let (_, name, samples, _) = &work[w];
                    let s = &samples[i];
                    Ok(Request {
                        prompt: format.tokens(&s.input, &s.answer_prefix)?,
                        params: crate::engine::config::GenerationParams {
                            max_tokens: tasks::tokens_to_generate(&cfg.tasks[name.as_str()]),
                            sampling: SamplingParams {
                                temperature: 0.0,
                                seed: cfg.seed,
                                ..Default::default()
                            },
                            ..Default::default()
                        },
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let mut err = None;
            engine.generate(&reqs, |j, c| {
                let (w, i) = todo[j];
                let (len, name, samples, preds) = &mut work[w];
                let s = &samples[i];
                let p = Prediction {
                    index: s.index,
                    hash: s.hash.clone(),
                    pred: c.text.clone(),
                    outputs: s.outputs.clone(),
                    prompt_tokens: c.prompt_tokens,
                    generated_tokens: c.tokens.len(),
                    finish_reason: serde_json::to_value(c.finish_reason)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default(),
                };
                let pred_path = task_dir(&self.out, *len, name).join("pred.jsonl");
                if let Err(e) = append_line(&pred_path, &p) {
                    err.get_or_insert(e);
                }
                preds.push(p);
                bar.inc(1);
            })?;
            if let Some(e) = err {
                return Err(e);
            }
        }
        bar.finish_and_clear();
        // The engine's prefix cache over this invocation (RULER's template and, within a
        // task, shared haystack text), beside the report.
        write_atomic(
            &self.out.join(ENGINE_STATS),
            serde_json::to_string_pretty(&engine.cache_stats().since(&cache_before).usage())?
                .as_bytes(),
        )?;

        let mut results = Vec::new();
        for (len, name, samples, preds) in &work {
            let gen = &cfg.tasks[name.as_str()];
            let by_index: HashMap<usize, &Prediction> = preds
                .iter()
                .filter(|p| samples.get(p.index).map(|s| &s.hash) == Some(&p.hash))
                .map(|p| (p.index, p))
                .collect();
            let mut ps = Vec::new();
            let mut refs = Vec::new();
            for s in samples {
                let p = by_index.get(&s.index).with_context(|| {
                    format!("{name} @ {len}: sample {} has no prediction", s.index)
                })?;
                ps.push(crate::eval::ruler::score::postprocess(&p.pred));
                refs.push(s.outputs.clone());
            }
            results.push(report::TaskResult::new(
                name,
                *len,
                tasks::constants(gen).metric,
                &ps,
                &refs,
            ));
        }
        let rep = Report::new(self, &identity, assets, &names, &lengths, results);
        rep.write(&self.out)?;
        Ok(Some(rep))
    }
}
