//! Runs the short-context tasks through the local engine: each item's options scored by
//! log-likelihood (MMLU, ARC) or its answer generated greedily (GSM8K), appended to
//! `<out>/<task>/pred.jsonl` as they finish (a killed run resumes), then `report.{json,md}`.

use crate::engine::config::{GenerationParams, SamplingParams};
use crate::engine::generate::{Engine, Request};
use crate::eval::short::data::{self, Gold, Item, Task, GSM8K_UNTIL, TARGET_DELIMITER};
use crate::eval::short::score;
use crate::eval::Answerer;
use crate::records::{append_line, write_atomic};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// One task's data: the items scored and, for few-shot prompts, the file the examples come
/// from (its first `fewshot` items).
#[derive(Debug, Clone)]
pub struct TaskData {
    pub task: Task,
    pub data: String,
    pub fewshot_data: Option<String>,
}

/// `[eval.short]` of a pipeline: the tasks' data (none: the check is not run) and settings,
/// as `wildlong eval short` takes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShortConfig {
    /// Task name (mmlu, arc_easy, arc_challenge, gsm8k) → data file (path or hf://datasets/...).
    pub data: BTreeMap<String, String>,
    pub fewshot: usize,
    /// Task name → the file its few-shot examples come from.
    pub fewshot_data: BTreeMap<String, String>,
    pub limit: Option<usize>,
    pub max_gen_tokens: usize,
}

impl Default for ShortConfig {
    fn default() -> Self {
        Self {
            data: BTreeMap::new(),
            fewshot: 0,
            fewshot_data: BTreeMap::new(),
            limit: None,
            max_gen_tokens: 256,
        }
    }
}

impl ShortConfig {
    /// The tasks to run, validated (`what` names the section in errors).
    pub fn tasks(&self, what: &str) -> Result<Vec<TaskData>> {
        task_data(
            self.data.clone(),
            self.fewshot_data.clone(),
            |t| format!("{what}.data.{t}"),
            |t| format!("{what}.fewshot_data.{t}"),
        )
    }
}

/// The tasks of `(name, file)` pairs, in order, each with its few-shot file from `fewshot`
/// (name → file); `data_key` and `fewshot_key` name a setting in errors. An unknown name, a
/// task named twice and a few-shot file for a task not run are errors.
pub fn task_data(
    data: impl IntoIterator<Item = (String, String)>,
    mut fewshot: BTreeMap<String, String>,
    data_key: impl Fn(&str) -> String,
    fewshot_key: impl Fn(&str) -> String,
) -> Result<Vec<TaskData>> {
    let mut out: Vec<TaskData> = Vec::new();
    for (name, file) in data {
        let task = Task::parse(&name).with_context(|| data_key(&name))?;
        if out.iter().any(|t| t.task == task) {
            bail!("{} given twice", data_key(&name));
        }
        out.push(TaskData {
            task,
            data: file,
            fewshot_data: fewshot.remove(task.name()),
        });
    }
    if let Some(t) = fewshot.keys().next() {
        bail!("{}: no {} to use it for", fewshot_key(t), data_key(t));
    }
    Ok(out)
}

/// Everything `wildlong eval short` needs besides the engine.
pub struct ShortRun {
    pub tasks: Vec<TaskData>,
    /// Few-shot examples per prompt for the tasks that name a few-shot file (the others run
    /// 0-shot, lm-eval's default for ARC; it uses 5 for GSM8K and MMLU's leaderboards 5).
    pub fewshot: usize,
    /// Items per task (the first N of each file).
    pub limit: Option<usize>,
    /// GSM8K's `max_gen_toks`.
    pub max_gen_tokens: usize,
    pub out: PathBuf,
    pub model: String,
    pub adapter: Option<String>,
    pub progress: bool,
    /// This worker's share of each task's items (index mod n is k − 1), into
    /// `<task>/pred.shard-k-of-n.jsonl`; a shard of several writes no report.
    pub shard: crate::shard::Shard,
    /// Score every shard's predictions; fail, naming them, if any item has none.
    pub merge: bool,
}

/// One line of `pred.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShortPrediction {
    pub index: usize,
    /// Hash of the prompt and the item: a prediction counts only for the item it was made for.
    pub hash: String,
    /// Multiple choice: each option's log-likelihood.
    #[serde(default)]
    pub loglik: Vec<f64>,
    /// GSM8K: the generated text (cut at GSM8K's stop strings).
    #[serde(default)]
    pub output: String,
}

/// What a folder's predictions were made with (`run.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunIdentity {
    model: String,
    adapter: Option<String>,
    weights: String,
    dtype: String,
    max_gen_tokens: usize,
}

/// One task's scores, in percent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskScore {
    pub task: String,
    pub n: usize,
    pub fewshot: usize,
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShortReport {
    pub tool: String,
    pub model: String,
    pub adapter: Option<String>,
    pub results: Vec<TaskScore>,
    pub notes: Vec<String>,
}

fn percent(hits: usize, n: usize) -> f64 {
    (hits as f64 / n.max(1) as f64 * 10000.0).round() / 100.0
}

/// The scores of one task's predictions (`preds[i]` for `items[i]`).
pub fn task_score(
    task: Task,
    items: &[Item],
    preds: &[&ShortPrediction],
    fewshot: usize,
) -> TaskScore {
    let n = items.len();
    let mut metrics = BTreeMap::new();
    if task.generates() {
        let (mut strict, mut flexible) = (0, 0);
        for (it, p) in items.iter().zip(preds) {
            let Gold::Answer(gold) = &it.gold else {
                continue;
            };
            strict += score::exact_match(&score::strict_match(&p.output), gold) as usize;
            flexible += score::exact_match(&score::flexible_extract(&p.output), gold) as usize;
        }
        metrics.insert("exact_match,strict-match".into(), percent(strict, n));
        metrics.insert("exact_match,flexible-extract".into(), percent(flexible, n));
    } else {
        let (mut acc, mut norm) = (0, 0);
        for (it, p) in items.iter().zip(preds) {
            let Gold::Choice(g) = it.gold else { continue };
            acc += (score::argmax(&p.loglik) == g) as usize;
            norm += (score::argmax_norm(&p.loglik, &it.choices) == g) as usize;
        }
        metrics.insert("acc".into(), percent(acc, n));
        if task != Task::Mmlu {
            metrics.insert("acc_norm".into(), percent(norm, n));
        }
    }
    TaskScore {
        task: task.name().into(),
        n,
        fewshot,
        metrics,
    }
}

impl ShortReport {
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "# Short-context evaluation\n\n- model: {}{}\n- {}\n",
            self.model,
            self.adapter
                .as_deref()
                .map(|a| format!(" + adapter {a}"))
                .unwrap_or_default(),
            self.tool
        );
        for n in &self.notes {
            s.push_str(&format!("- note: {n}\n"));
        }
        s.push_str("\n| Task | n | shots | metric | score |\n|---|---:|---:|---|---:|\n");
        for r in &self.results {
            for (m, v) in &r.metrics {
                s.push_str(&format!(
                    "| {} | {} | {} | {m} | {v:.2} |\n",
                    r.task, r.n, r.fewshot
                ));
            }
        }
        s
    }

    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a short-context report", path.display()))
    }

    /// The change of every metric against a baseline (after − before), as a markdown table.
    pub fn delta(&self, base: &ShortReport) -> String {
        let mut s =
            String::from("| Task | metric | before | after | delta |\n|---|---|---:|---:|---:|\n");
        for r in &self.results {
            let Some(b) = base.results.iter().find(|b| b.task == r.task) else {
                continue;
            };
            for (m, v) in &r.metrics {
                if let Some(bv) = b.metrics.get(m) {
                    s.push_str(&format!(
                        "| {} | {m} | {bv:.2} | {v:.2} | {:+.2} |\n",
                        r.task,
                        v - bv
                    ));
                }
            }
        }
        s
    }
}

/// The token ids of a (context, continuation) pair as lm-eval's `_encode_pair`: trailing
/// spaces of the context move to the continuation, the whole is encoded, and the
/// continuation is what follows the context's own encoding.
pub fn encode_pair(
    engine: &Engine,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let (trimmed, moved) = split_context(context);
    let whole = engine
        .tokenizer
        .encode(&format!("{trimmed}{moved}{continuation}"), false)?;
    let ctx = engine.tokenizer.encode(trimmed, false)?;
    if ctx.len() >= whole.len() {
        bail!("continuation {continuation:?} encodes to no tokens after its context");
    }
    let cont = whole[ctx.len()..].to_vec();
    Ok((ctx, cont))
}

/// lm-eval's `_encode_pair` split: the context without its trailing whitespace, and that
/// whitespace (which goes to the continuation).
fn split_context(context: &str) -> (&str, &str) {
    let trimmed = context.trim_end();
    (trimmed, &context[trimmed.len()..])
}

/// Each item's full prompt with `shots` examples from `pool`: the first of the item's own
/// subject for MMLU (lm-eval runs one task per subject, first_n over its dev split), the
/// first `shots` for the others.
pub fn contexts(task: Task, items: &[Item], pool: &[Item], shots: usize) -> Result<Vec<String>> {
    items
        .iter()
        .map(|it| {
            let mine: Vec<Item> = pool
                .iter()
                .filter(|s| task != Task::Mmlu || s.subject == it.subject)
                .take(shots)
                .cloned()
                .collect();
            if mine.len() < shots {
                bail!(
                    "{}: {} few-shot examples{}, fewer than the {shots} asked for",
                    task.name(),
                    mine.len(),
                    match task {
                        Task::Mmlu => format!(" of subject `{}`", it.subject),
                        _ => String::new(),
                    }
                );
            }
            Ok(it.context(task, &mine))
        })
        .collect()
}

fn item_hash(context: &str, item: &Item) -> Result<String> {
    let mut h = sha2::Sha256::new();
    h.update(context.as_bytes());
    h.update([0]);
    h.update(serde_json::to_string(item)?.as_bytes());
    Ok(format!("{:x}", h.finalize())[..16].to_string())
}

impl ShortRun {
    /// Runs and writes the report; `None` for a shard of several (no report).
    pub fn run(&self, answerer: &Answerer) -> Result<Option<ShortReport>> {
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        let (weights, dtype) = match answerer {
            Answerer::Local(e) => (
                format!("{:?}", e.config.weight_format),
                e.config.dtype.clone(),
            ),
            // The server's weights are its own: the URL and model name stand for them.
            Answerer::Server { client, .. } => (
                format!("server {}", client.config.base_url),
                "server".into(),
            ),
        };
        crate::records::check_identity(
            &self.out.join("run.json"),
            &RunIdentity {
                model: self.model.clone(),
                adapter: self.adapter.clone(),
                weights,
                dtype,
                max_gen_tokens: self.max_gen_tokens,
            },
        )?;
        if self.fewshot > 0 && self.tasks.iter().all(|t| t.fewshot_data.is_none()) {
            bail!(
                "{} few-shot examples need a file to take them from: --fewshot-data TASK=FILE (e.g. gsm8k=FILE with GSM8K's train split, mmlu=FILE with MMLU's dev split)",
                self.fewshot
            );
        }
        let mut results = Vec::new();
        let mut notes = vec![format!(
            "prompts and metrics as lm-evaluation-harness defines mmlu, arc_easy/arc_challenge and gsm8k; plain text, no chat template; few-shot examples (shots column) are the first items of each task's few-shot file (for MMLU, of the item's subject), as lm-eval's first_n sampler for MMLU (for ARC and GSM8K it samples at random)"
        )];
        for td in &self.tasks {
            let items = data::read(td.task, &td.data, self.limit)?;
            notes.push(format!(
                "{}: {} items from {}",
                td.task.name(),
                items.len(),
                td.data
            ));
            // The few-shot pool: MMLU takes the first N of the item's own subject (lm-eval
            // runs one task per subject, first_n over its dev split), the others the first N.
            let (pool, shots) = match (self.fewshot, &td.fewshot_data) {
                (0, _) | (_, None) => (Vec::new(), 0),
                (n, Some(f)) => {
                    let limit = (td.task != Task::Mmlu).then_some(n);
                    (data::read(td.task, f, limit)?, n)
                }
            };
            let contexts = contexts(td.task, &items, &pool, shots)
                .with_context(|| td.fewshot_data.clone().unwrap_or_default())?;
            let hashes = contexts
                .iter()
                .zip(&items)
                .map(|(c, it)| item_hash(c, it))
                .collect::<Result<Vec<_>>>()?;
            let dir = self.out.join(td.task.name());
            std::fs::create_dir_all(&dir)?;
            let pred_path = dir.join(format!("pred{}.jsonl", self.shard.suffix()));
            let mut have: HashMap<usize, ShortPrediction> = HashMap::new();
            for p in crate::shard::read_all::<ShortPrediction>(&dir, "pred")? {
                if hashes.get(p.index) == Some(&p.hash) {
                    have.insert(p.index, p);
                }
            }
            let todo: Vec<usize> = (0..items.len())
                .filter(|&i| self.shard.owns(i) && !have.contains_key(&i))
                .collect();
            if self.merge && !todo.is_empty() {
                bail!(
                    "{}: {} items have no prediction in {} (e.g. item {}): run the shards that own them, or drop --merge",
                    td.task.name(),
                    todo.len(),
                    dir.display(),
                    todo[0]
                );
            }
            let bar = crate::records::progress_bar(
                self.progress && !todo.is_empty(),
                todo.len() as u64,
                "items",
            );
            bar.set_message(td.task.name());
            let mut record = |i: usize, loglik: Vec<f64>, output: String| -> Result<()> {
                let p = ShortPrediction {
                    index: i,
                    hash: hashes[i].clone(),
                    loglik,
                    output,
                };
                append_line(&pred_path, &p)?;
                have.insert(i, p);
                bar.inc(1);
                Ok(())
            };
            if td.task.generates() {
                let params = GenerationParams {
                    max_tokens: self.max_gen_tokens,
                    sampling: SamplingParams {
                        temperature: 0.0,
                        ..Default::default()
                    },
                    stop: GSM8K_UNTIL.map(String::from).to_vec(),
                    ..Default::default()
                };
                match answerer {
                    Answerer::Local(engine) => {
                        let reqs = todo
                            .iter()
                            .map(|&i| {
                                Ok(Request {
                                    prompt: engine.tokenizer.encode(&contexts[i], false)?,
                                    params: params.clone(),
                                })
                            })
                            .collect::<Result<Vec<_>>>()?;
                        let mut err = None;
                        engine.generate(&reqs, |j, c| {
                            if let Err(e) = record(todo[j], Vec::new(), c.text.clone()) {
                                err.get_or_insert(e);
                            }
                        })?;
                        if let Some(e) = err {
                            return Err(e);
                        }
                    }
                    Answerer::Server { client, .. } => client.each(
                        &todo,
                        |&i| client.complete(&contexts[i], &params),
                        |j, c| record(todo[j], Vec::new(), c.text),
                    )?,
                }
            } else {
                // A few items at a time, so that a kill loses little.
                for chunk in todo.chunks(8) {
                    let mut pairs = Vec::new();
                    for &i in chunk {
                        for c in &items[i].choices {
                            pairs.push((i, format!("{TARGET_DELIMITER}{c}")));
                        }
                    }
                    let lls: Vec<f64> = match answerer {
                        Answerer::Local(engine) => {
                            let enc = pairs
                                .iter()
                                .map(|(i, c)| encode_pair(engine, &contexts[*i], c))
                                .collect::<Result<Vec<_>>>()?;
                            engine
                                .loglikelihood(&enc)?
                                .iter()
                                .map(|l| l.logprob)
                                .collect()
                        }
                        Answerer::Server { client, .. } => {
                            let mut out = vec![0.0; pairs.len()];
                            client.each(
                                &pairs,
                                |(i, c)| {
                                    let (ctx, moved) = split_context(&contexts[*i]);
                                    client.loglikelihood(ctx, &format!("{moved}{c}"))
                                },
                                |j, l| {
                                    out[j] = l;
                                    Ok(())
                                },
                            )?;
                            out
                        }
                    };
                    let mut k = 0;
                    for &i in chunk {
                        let n = items[i].choices.len();
                        record(i, lls[k..k + n].to_vec(), String::new())?;
                        k += n;
                    }
                }
            }
            bar.finish_and_clear();
            if self.shard.count > 1 {
                continue;
            }
            let preds: Vec<&ShortPrediction> = (0..items.len())
                .map(|i| {
                    have.get(&i)
                        .with_context(|| format!("{} item {i} has no prediction", td.task.name()))
                })
                .collect::<Result<_>>()?;
            results.push(task_score(td.task, &items, &preds, shots));
            if self.limit.is_some() {
                notes.push(format!(
                    "{}: the first {} items of {}",
                    td.task.name(),
                    items.len(),
                    td.data
                ));
            }
        }
        notes.dedup();
        let report = ShortReport {
            tool: format!("wildlong {}", env!("CARGO_PKG_VERSION")),
            model: self.model.clone(),
            adapter: self.adapter.clone(),
            results,
            notes,
        };
        if self.shard.count > 1 {
            return Ok(None);
        }
        crate::records::write_report(&self.out, &report, &report.markdown())?;
        Ok(Some(report))
    }
}

/// `wildlong eval short`: loads the model (± adapter), runs, prints the report (and the delta
/// against `baseline`, also written as `<out>/delta.md`).
pub fn command(
    run: &ShortRun,
    server: Option<crate::generator::openai::OpenAiConfig>,
    tokenizer: &str,
    engine: &crate::engine::config::EngineConfig,
    models_dir: &std::path::Path,
    baseline: Option<&std::path::Path>,
) -> Result<()> {
    let base = baseline.map(ShortReport::load).transpose()?;
    let report = match server {
        Some(s) => {
            if run.adapter.is_some() {
                bail!("--adapter with --server: a server serves its own weights (load the adapter there, or drop --server)");
            }
            crate::eval::with_answerer(&run.model, Some(s), tokenizer, engine, models_dir, |a| {
                run.run(a)
            })?
        }
        None => {
            let e = crate::models::load_engine_with_adapter(
                &run.model,
                run.adapter.as_deref().map(std::path::Path::new),
                models_dir,
                engine,
            )?;
            run.run(&Answerer::Local(&e))?
        }
    };
    let Some(report) = report else {
        println!(
            "shard {}/{}: predictions written under {} (pred{}.jsonl per task); when every shard has finished, the same command with --merge (no --shard) scores them all",
            run.shard.index,
            run.shard.count,
            run.out.display(),
            run.shard.suffix()
        );
        return Ok(());
    };
    print!("{}", report.markdown());
    println!("\nreports: {}/report.{{json,md}}", run.out.display());
    if let Some(b) = base {
        let d = report.delta(&b);
        write_atomic(&run.out.join("delta.md"), d.as_bytes())?;
        print!("\n{d}");
    }
    Ok(())
}
