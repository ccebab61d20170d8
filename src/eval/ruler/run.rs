//! Runs a RULER evaluation: prepares (or reuses) the samples of every task × length, generates
//! the missing predictions greedily — through the local engine (all of a length's samples
//! submitted together) or an OpenAI-compatible server (each prompt rendered here and sent as
//! text) — appending each to `pred.jsonl` as it finishes (a killed run resumes where it
//! stopped), then scores and reports. With `--shard k/n` a worker answers every n-th sample
//! into `pred.shard-k-of-n.jsonl` and writes no report; a run without a shard counts every
//! shard's predictions, so it merges them (`--merge`: and generates nothing).

use crate::engine::chat::ChatTemplate;
use crate::engine::config::SamplingParams;
use crate::engine::generate::{Completion, Engine, Request};
use crate::engine::tokenizer::Tokenizer;
use crate::eval::ruler::config::{Protocol, RulerConfig, RulerGenerator};
use crate::eval::ruler::data::Assets;
use crate::eval::ruler::official;
use crate::eval::ruler::report::{self, Report};
use crate::eval::ruler::synth::{self, PromptFormat, Sample, Synth};
use crate::eval::ruler::tasks;
use crate::generator::openai::OpenAiClient;
use crate::records::{append_line, read_jsonl_resumable, write_atomic};
use crate::shard::Shard;
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

/// The engine's prefix-cache use of the last invocation (a server's token counts), in the
/// output folder (`engine_stats.shard-k-of-n.json` for a shard).
pub const ENGINE_STATS: &str = "engine_stats.json";

/// What answers RULER's prompts.
pub enum Answerer<'a> {
    /// The local engine: prompts as token ids, all of a length's samples scheduled together.
    Local(&'a Engine),
    /// An OpenAI-compatible server: each prompt rendered here (template and answer prefix)
    /// and sent as text to `/v1/completions`; the samples are fitted with the served model's
    /// own tokenizer and template, read locally.
    Server {
        client: &'a OpenAiClient,
        tokenizer: &'a Tokenizer,
        chat_template: Option<&'a ChatTemplate>,
    },
}

impl Answerer<'_> {
    fn tokenizer(&self) -> &Tokenizer {
        match self {
            Self::Local(e) => &e.tokenizer,
            Self::Server { tokenizer, .. } => tokenizer,
        }
    }

    fn chat_template(&self) -> Option<&ChatTemplate> {
        match self {
            Self::Local(e) => e.chat_template.as_ref(),
            Self::Server { chat_template, .. } => *chat_template,
        }
    }
}

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
    /// This worker's share of the samples (every sample of every task and length, in order,
    /// numbered; k/n answers those whose number mod n is k − 1).
    pub shard: Shard,
    /// Score the predictions there are (every shard's) and fail, naming them, if any sample
    /// has none, instead of generating it.
    pub merge: bool,
}

/// The first `n` samples of one task at one length, from the hashed cache when present;
/// missing ones are generated (in parallel under `wildlong`; under `ruler` the whole
/// sequence again, one random stream running through it) and appended to the cache.
#[allow(clippy::too_many_arguments)]
pub fn prepare_samples(
    assets: &Assets,
    format: &PromptFormat,
    fingerprint: &str,
    protocol: Protocol,
    task: &str,
    generator: &RulerGenerator,
    length: usize,
    seed: u64,
    n: usize,
    cache_dir: &Path,
) -> Result<Vec<Sample>> {
    let key = synth::cache_key(task, generator, length, seed, fingerprint, assets, protocol)?;
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
        let new: Vec<Sample> = match protocol {
            Protocol::Wildlong => {
                let s = Synth::new(assets, format, task, generator, length, seed)
                    .with_context(|| format!("task `{task}` at length {length}"))?;
                (have.len()..n)
                    .into_par_iter()
                    .map(|i| s.sample(i))
                    .collect::<Result<_>>()?
            }
            Protocol::Ruler => {
                let mut all = official::samples(assets, format, task, generator, length, seed, n)
                    .with_context(|| format!("task `{task}` at length {length}"))?;
                all.split_off(have.len())
            }
        };
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
    /// `prepare_only` or a shard of several).
    pub fn run(&self, answerer: &Answerer, assets: &Assets) -> Result<Option<Report>> {
        let cfg = &self.config;
        let chat = match (self.chat, answerer.chat_template()) {
            (true, Some(t)) => Some(t),
            (true, None) => bail!("this model has no chat template: pass --no-chat-template to use RULER's `base` template"),
            (false, _) => None,
        };
        let format = PromptFormat {
            tokenizer: answerer.tokenizer(),
            chat,
        };
        let fingerprint = format.fingerprint()?;
        let identity = match answerer {
            Answerer::Local(engine) => RunIdentity {
                model: self.model.clone(),
                adapter: self.adapter.clone(),
                template: format.describe(),
                format_fingerprint: fingerprint.clone(),
                weights: format!("{:?}", engine.config.weight_format),
                dtype: engine.config.dtype.clone(),
                rope: serde_json::to_value(&engine.model.config().rope)?,
            },
            // The server's weights, dtype and RoPE are its own: the URL and model name stand
            // for them.
            Answerer::Server { client, .. } => RunIdentity {
                model: self.model.clone(),
                adapter: None,
                template: format.describe(),
                format_fingerprint: fingerprint.clone(),
                weights: format!("server {}", client.config.base_url),
                dtype: "server".into(),
                rope: serde_json::Value::Null,
            },
        };
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        crate::records::check_identity(&self.out.join("run.json"), &identity)?;
        if let Answerer::Local(engine) = answerer {
            let max = engine.max_context();
            if let Some(&l) = cfg.lengths.iter().find(|&&l| l > max) {
                bail!("length {l} exceeds the model's context ({max} tokens); pass --max-context to evaluate beyond it");
            }
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
                    cfg.protocol(),
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
                let preds: Vec<Prediction> = crate::shard::read_all(&dir, "pred")?;
                work.push((len, name.clone(), samples, preds));
            }
        }
        if self.prepare_only {
            return Ok(None);
        }
        // Every sample numbered in order (length, task, index): a shard's share, and the
        // samples still without a prediction.
        let mut todo: Vec<(usize, usize)> = Vec::new(); // (work item, sample)
        let mut number = 0;
        for (w, (_, _, samples, preds)) in work.iter().enumerate() {
            let done: HashMap<usize, &str> =
                preds.iter().map(|p| (p.index, p.hash.as_str())).collect();
            for (i, s) in samples.iter().enumerate() {
                if self.shard.owns(number) && done.get(&s.index) != Some(&s.hash.as_str()) {
                    todo.push((w, i));
                }
                number += 1;
            }
        }
        if self.merge && !todo.is_empty() {
            let missing: Vec<String> = todo
                .iter()
                .take(5)
                .map(|&(w, i)| format!("{} @ {} sample {i}", work[w].1, work[w].0))
                .collect();
            bail!(
                "{} of the samples have no prediction in {} (e.g. {}): run the shards that own them, or drop --merge to generate them here",
                todo.len(),
                self.out.display(),
                missing.join(", ")
            );
        }
        let pending = todo.len();
        let bar =
            crate::records::progress_bar(self.progress && pending > 0, pending as u64, "samples");

        let pred_name = format!("pred{}.jsonl", self.shard.suffix());
        let params = |name: &str| crate::engine::config::GenerationParams {
            max_tokens: tasks::tokens_to_generate(&cfg.tasks[name]),
            sampling: SamplingParams {
                temperature: 0.0,
                seed: cfg.seed,
                ..Default::default()
            },
            ..Default::default()
        };
        // One finished request: its prediction appended to this worker's file.
        let record = |work: &mut Vec<(usize, String, Vec<Sample>, Vec<Prediction>)>,
                      (w, i): (usize, usize),
                      c: &Completion,
                      generated_tokens: usize|
         -> Result<()> {
            let (len, name, samples, preds) = &mut work[w];
            let s = &samples[i];
            let p = Prediction {
                index: s.index,
                hash: s.hash.clone(),
                pred: c.text.clone(),
                outputs: s.outputs.clone(),
                prompt_tokens: c.prompt_tokens,
                generated_tokens,
                finish_reason: serde_json::to_value(c.finish_reason)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
            };
            append_line(&task_dir(&self.out, *len, name).join(&pred_name), &p)?;
            preds.push(p);
            bar.inc(1);
            Ok(())
        };
        let stats = match answerer {
            Answerer::Local(engine) => {
                let cache_before = engine.cache_stats();
                // All tasks' pending samples of one length go to the engine together
                // (continuous batching keeps its rows busy whatever each answer's length).
                for &len in &lengths {
                    let todo: Vec<(usize, usize)> = todo
                        .iter()
                        .copied()
                        .filter(|&(w, _)| work[w].0 == len)
                        .collect();
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
                                params: params(name),
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    let mut err = None;
                    engine.generate(&reqs, |j, c| {
                        if let Err(e) = record(&mut work, todo[j], c, c.tokens.len()) {
                            err.get_or_insert(e);
                        }
                    })?;
                    if let Some(e) = err {
                        return Err(e);
                    }
                }
                // The engine's prefix cache over this invocation (RULER's template and,
                // within a task, shared haystack text).
                serde_json::to_value(engine.cache_stats().since(&cache_before).usage())?
            }
            Answerer::Server { client, .. } => {
                bar.set_message(format!(
                    "{} tasks on {}",
                    names.len(),
                    client.config.base_url
                ));
                let prompts = todo
                    .iter()
                    .map(|&(w, i)| {
                        let (_, name, samples, _) = &work[w];
                        let s = &samples[i];
                        Ok((format.text(&s.input, &s.answer_prefix)?, params(name)))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let (mut prompt_tokens, mut cached_tokens) = (0, 0);
                client.each(
                    &prompts,
                    |(text, p)| client.complete(text, p),
                    |j, c| {
                        prompt_tokens += c.prompt_tokens;
                        cached_tokens += c.cached_tokens;
                        // The server's text, counted with the model's tokenizer.
                        let n = format.tokenizer.encode(&c.text, false)?.len();
                        record(&mut work, todo[j], &c, n)
                    },
                )?;
                serde_json::json!({
                    "server": client.config.base_url,
                    "requests": todo.len(),
                    "prompt_tokens": prompt_tokens,
                    "cached_tokens": cached_tokens,
                })
            }
        };
        bar.finish_and_clear();
        if self.merge {
            // Nothing was generated: the last invocation's statistics stay.
        } else {
            let name = ENGINE_STATS.replacen(".json", &format!("{}.json", self.shard.suffix()), 1);
            write_atomic(
                &self.out.join(name),
                serde_json::to_string_pretty(&stats)?.as_bytes(),
            )?;
        }
        if self.shard.count > 1 {
            return Ok(None);
        }

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
