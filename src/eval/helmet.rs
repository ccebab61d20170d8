//! `wildlong eval helmet`: HELMET's (Yen et al., ICLR 2025; princeton-nlp/HELMET) synthetic
//! recall and RAG categories on its released data files (`data.tar.gz`: `data/json_kv/`,
//! `data/ruler/`, `data/kilt/`), prompted as its `data.py` prompts them (each dataset's user
//! template, `"\n"`, its system template — no chat template, as HELMET's configs run them),
//! cut as its `tokenize` cuts them (the context's tail dropped until prompt + generation fit
//! the input length), and scored as its `utils.py` scores them:
//! - `json_kv`: substring exact match (SubEM) of the normalized value in the output, or in
//!   the output after `corresponding value:`;
//! - `ruler_*` (HELMET's RULER files, e.g. `ruler_niah_mk_2`, `ruler_niah_mv`): the share of
//!   answers found case-insensitively in the output (`ruler_recall`); `ruler_qa_*`: SubEM;
//! - `kilt_*` / names with `nq`, `triviaqa`, `hotpotqa`, `popqa_T` (RAG): SubEM against any
//!   answer, in the output or after `Answer:`; `popqa_T` keeps questions with
//!   log10(s_pop) < T; `--shots` demonstrations from the task's demo file.
//!
//! Which items (`--limit`, HELMET's `max_test_samples`, with its `--seed`) and which
//! demonstrations are HELMET's too: HF datasets' `shuffle(seed)` is numpy's
//! `default_rng(seed).permutation` ([`Pcg64`]) and `random.sample` is CPython's
//! ([`PyRandom`]), both reproduced call for call (tests: `selection` in
//! `tests/fixtures/helmet/reference.json`, recorded from HELMET's own `data.py`).

use super::Answerer;
use crate::engine::config::{GenerationParams, SamplingParams};
use crate::engine::tokenizer::Tokenizer;
use crate::eval::ruler::pyrandom::{Pcg64, PyRandom};
use crate::eval::ruler::tasks::format;
use crate::records::append_line;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// What a dataset name selects (HELMET's `load_data` dispatch by substring).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    JsonKv,
    /// HELMET's RULER files; the templates of `load_ruler`.
    Ruler,
    /// KILT question answering over retrieved passages; popqa's popularity threshold.
    Rag {
        popqa_threshold: Option<f64>,
    },
}

impl Kind {
    pub fn of(name: &str) -> Result<Self> {
        Ok(if name.contains("popqa") {
            let t = name
                .rsplit('_')
                .next()
                .and_then(|t| t.parse().ok())
                .with_context(|| {
                    format!(
                        "`{name}`: popqa takes its popularity threshold last, e.g. kilt_popqa_3"
                    )
                })?;
            Self::Rag {
                popqa_threshold: Some(t),
            }
        } else if ["nq", "hotpotqa", "triviaqa"]
            .iter()
            .any(|d| name.contains(d))
            && !name.contains("ruler")
        {
            Self::Rag {
                popqa_threshold: None,
            }
        } else if name == "json_kv" {
            Self::JsonKv
        } else if name.contains("ruler") {
            Self::Ruler
        } else {
            bail!("unknown HELMET dataset `{name}` (recall: json_kv, ruler_niah_mk_2, ruler_niah_mk_3, ruler_niah_mv, …; RAG: kilt_nq, kilt_triviaqa, kilt_hotpotqa, kilt_popqa_3)")
        })
    }

    /// HELMET's `generation_max_length` in `configs/recall.yaml` and `configs/rag.yaml`.
    pub fn default_max_tokens(self, name: &str) -> usize {
        match self {
            Self::JsonKv => 100,
            Self::Ruler if name.contains("mk_3") => 100,
            Self::Ruler => 50,
            Self::Rag { .. } => 20,
        }
    }

    pub fn category(self) -> &'static str {
        match self {
            Self::JsonKv | Self::Ruler => "recall",
            Self::Rag { .. } => "rag",
        }
    }
}

/// (user template, system template) of a dataset (`data.py`).
pub fn templates(name: &str, kind: Kind) -> Result<(&'static str, &'static str)> {
    Ok(match kind {
        Kind::JsonKv => (
            "{context}\n\nExtract the value corresponding to the specified key in the JSON object below.\n\n{demos}Key: {question}",
            "Corresponding value:",
        ),
        Kind::Rag { .. } => (
            "Use the given documents to write a concise and short answer to the question. Write your answer in the following format:\nAnswer: [answer]\n\n{demos}{context}\n\nQuestion: {question}",
            "Answer:",
        ),
        Kind::Ruler if name.contains("niah_mv") || name.contains("niah_mq") => (
            "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?",
            "The special magic {type_needle_v} for {query} mentioned in the provided text are",
        ),
        Kind::Ruler if name.contains("niah") => (
            "A special magic {type_needle_v} is hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat is the special magic {type_needle_v} for {query} mentioned in the provided text?",
            "The special magic {type_needle_v} for {query} mentioned in the provided text is",
        ),
        Kind::Ruler if name.contains("vt") => (
            "{example}Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
            "Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are:",
        ),
        Kind::Ruler if name.contains("cwe") => (
            "{example}Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
            "Answer: The top 10 words that appear most often in the list are:",
        ),
        Kind::Ruler if name.contains("fwe") => (
            "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words.\n{context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?",
            "Answer: According to the coded text above, the three most frequently appeared words are:",
        ),
        Kind::Ruler if name.contains("qa") => (
            "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {question}",
            "Answer:",
        ),
        Kind::Ruler => bail!("unknown HELMET RULER dataset `{name}`"),
    })
}

/// SQuAD's `normalize_answer` (HELMET `utils.py`): lower case, ASCII punctuation dropped,
/// articles dropped, whitespace collapsed.
pub fn normalize_answer(s: &str) -> String {
    static ARTICLES: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    let re = ARTICLES.get_or_init(|| regex::Regex::new(r"\b(a|an|the)\b").expect("compiles"));
    re.replace_all(&no_punct, " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// `substring_exact_match_score` maximised over the answers (1.0 or 0.0).
pub fn subem(prediction: &str, answers: &[String]) -> f64 {
    let p = normalize_answer(prediction);
    let hit = answers.iter().any(|a| p.contains(&normalize_answer(a)));
    if hit {
        1.0
    } else {
        0.0
    }
}

/// `parse_output(output, prefix)`: the rest of the line after `prefix` (case-insensitive),
/// else the first line; the prefix stripped again if repeated.
pub fn parse_output(output: &str, prefix: &str) -> Option<String> {
    let lower = output.to_lowercase();
    let p = prefix.to_lowercase();
    // (Lower-casing keeps byte offsets for the ASCII prefixes HELMET uses.)
    let rest = match lower.find(&p) {
        Some(i) if lower.len() == output.len() => &output[i + prefix.len()..],
        _ => output,
    };
    let line = rest.split('\n').next().unwrap_or("").trim();
    let line = if line.to_lowercase().starts_with(&p) {
        &line[prefix.len()..]
    } else {
        line
    };
    Some(line.trim().to_string())
}

/// One item of a HELMET data file, with the fields its templates read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub index: usize,
    /// The `id` when the file has that column, else the question (HELMET's key for the
    /// items drawn, demos and duplicates).
    pub key: String,
    /// Template fields (context, question, query, type_needle_v, example, num_v, demos).
    pub fields: BTreeMap<String, String>,
    pub answers: Vec<String>,
}

fn answers_of(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .flat_map(|x| -> Vec<String> {
                match x {
                    Value::Array(inner) => inner
                        .iter()
                        .filter_map(|y| y.as_str().map(String::from))
                        .collect(),
                    other => other.as_str().map(String::from).into_iter().collect(),
                }
            })
            .collect(),
        Value::Number(n) => vec![n.to_string()],
        _ => Vec::new(),
    }
}

fn read_lines(spec: &str) -> Result<(String, Vec<Value>)> {
    let path = crate::models::resolve_data_file(spec)?;
    let name = path.display().to_string();
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {name}"))?;
    let mut rows = Vec::new();
    if text.trim_start().starts_with('{') && !spec.ends_with(".jsonl") {
        // HELMET's `.json` files: {"data": [...]}.
        let v: Value = serde_json::from_str(&text).with_context(|| name.to_string())?;
        rows = v["data"]
            .as_array()
            .with_context(|| format!("{name}: a .json file needs a top-level `data` list"))?
            .clone();
    } else {
        crate::records::for_each_jsonl_line(&name, text.as_bytes(), |line, l| {
            let l = l.with_context(|| format!("{name}: line {line}: not UTF-8"))?;
            rows.push(serde_json::from_str(l).with_context(|| format!("{name}: line {line}"))?);
            Ok(())
        })?;
    }
    Ok((name, rows))
}

fn passages(row: &Value) -> String {
    row["ctxs"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|p| {
                    format!(
                        "Document (Title: {}): {}",
                        p["title"].as_str().unwrap_or(""),
                        p["text"].as_str().unwrap_or("")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n\n")
        })
        .unwrap_or_default()
}

/// HELMET's key field: `id` when the data file has that column, else `question` (for the
/// demo file too).
fn key_field(rows: &[Value]) -> &'static str {
    if rows.iter().any(|r| r.get("id").is_some()) {
        "id"
    } else {
        "question"
    }
}

/// A row's key as Python's `str()` writes it.
fn row_key(row: &Value, field: &str) -> String {
    match &row[field] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn popular_enough(row: &Value, threshold: Option<f64>) -> bool {
    match threshold {
        Some(t) => row["s_pop"].as_f64().is_some_and(|p| p.log10() < t),
        None => true,
    }
}

/// The rows HELMET evaluates, in its order, from the rows that pass the popularity filter
/// (`candidates`, file order): with `max_test_samples` (`limit`), `json_kv` and the RULER files
/// take the first `limit` of HF datasets' `shuffle(seed=seed)` (numpy's
/// `default_rng(seed).permutation`); the RAG sets draw `limit` keys with
/// `random.sample(sorted(keys), limit)` after `random.seed(seed)` (eval.py's `run_test`) and
/// keep, in file order, every row with a drawn key.
fn select(
    kind: Kind,
    rows: &[Value],
    field: &str,
    candidates: Vec<usize>,
    limit: Option<usize>,
    seed: u64,
) -> Result<Vec<usize>> {
    let Some(n) = limit else {
        return Ok(candidates);
    };
    Ok(match kind {
        Kind::JsonKv | Kind::Ruler => {
            let perm = Pcg64::new(seed as u128).permutation(candidates.len());
            perm.into_iter().take(n).map(|j| candidates[j]).collect()
        }
        Kind::Rag { .. } => {
            // Python sorts the keys as they are: all strings, or all integers.
            let keys: Vec<&Value> = candidates.iter().map(|&i| &rows[i][field]).collect();
            let sorted: Vec<String> = if keys.iter().all(|k| k.is_i64()) {
                let mut v: Vec<i64> = keys.iter().filter_map(|k| k.as_i64()).collect();
                v.sort_unstable();
                v.dedup();
                v.iter().map(i64::to_string).collect()
            } else if keys.iter().all(|k| k.is_string()) {
                let mut v: Vec<String> = keys
                    .iter()
                    .filter_map(|k| k.as_str().map(String::from))
                    .collect();
                v.sort_unstable();
                v.dedup();
                v
            } else {
                bail!("the items' keys (`id`, else `question`) must be all strings or all integers, as HELMET sorts them")
            };
            let k = n.min(sorted.len());
            let drawn: HashSet<String> =
                PyRandom::new(seed).sample(&sorted, k).into_iter().collect();
            candidates
                .into_iter()
                .filter(|&i| drawn.contains(&row_key(&rows[i], field)))
                .collect()
        }
    })
}

/// A task's items from its data file (and demo file), the template fields filled as
/// `data.py` fills them; `limit` is HELMET's `max_test_samples`, selected as [`select`] says
/// with HELMET's `--seed` (42 by default); each RAG question's demonstrations are HELMET's:
/// the demo file (less the question itself for popqa) shuffled by HF datasets with the seed
/// `sha256(key) mod 2³¹`, duplicates dropped, the first `shots`.
pub fn read(
    name: &str,
    data: &str,
    demos: Option<&str>,
    shots: usize,
    limit: Option<usize>,
    seed: u64,
) -> Result<Vec<Item>> {
    use sha2::Digest;
    let kind = Kind::of(name)?;
    let (file, rows) = read_lines(data)?;
    let demo_rows = match (kind, demos) {
        (Kind::Rag { .. }, Some(d)) if shots > 0 => read_lines(d)?.1,
        (Kind::Rag { .. }, None) if shots > 0 => {
            bail!("`{name}`: {shots} shots need the task's demo file (--demos {name}=FILE)")
        }
        _ => Vec::new(),
    };
    let popqa_threshold = match kind {
        Kind::Rag { popqa_threshold } => popqa_threshold,
        _ => None,
    };
    let candidates: Vec<usize> = (0..rows.len())
        .filter(|&i| popular_enough(&rows[i], popqa_threshold))
        .collect();
    let demo_rows: Vec<&Value> = demo_rows
        .iter()
        .filter(|d| popular_enough(d, popqa_threshold))
        .collect();
    let field = key_field(&rows);
    let mut items = Vec::new();
    for i in select(kind, &rows, field, candidates, limit, seed).with_context(|| file.clone())? {
        let row = &rows[i];
        let at = || format!("{file}: item {i}");
        let mut fields = BTreeMap::new();
        let text = |k: &str| -> Option<String> {
            match &row[k] {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            }
        };
        let answers = match kind {
            Kind::JsonKv => {
                fields.insert("context".into(), text("context").with_context(at)?);
                fields.insert("question".into(), text("question").with_context(at)?);
                let demos: Vec<String> = row["demos"]
                    .as_array()
                    .map(|d| {
                        d.iter()
                            .take(shots)
                            .map(|kv| {
                                format!(
                                    "Key: {}\nCorresponding value: {}",
                                    kv[0].as_str().unwrap_or(""),
                                    kv[1].as_str().unwrap_or("")
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let mut d = demos.join("\n\n");
                if shots > 0 {
                    d.push_str("\n\n");
                }
                fields.insert("demos".into(), d);
                answers_of(&row["answer"])
            }
            Kind::Ruler => {
                fields.insert("context".into(), text("context").with_context(at)?);
                let q = text("query")
                    .or_else(|| text("question"))
                    .unwrap_or_default();
                fields.insert("question".into(), q.clone());
                fields.insert("query".into(), q);
                for k in ["type_needle_v", "num_v"] {
                    fields.insert(k.into(), text(k).unwrap_or_default());
                }
                let ex = text("example").unwrap_or_default();
                fields.insert(
                    "example".into(),
                    if ex.is_empty() { ex } else { ex + "\n\n" },
                );
                if row["answer"].is_null() {
                    answers_of(&row["outputs"])
                } else {
                    answers_of(&row["answer"])
                }
            }
            Kind::Rag { popqa_threshold } => {
                fields.insert("question".into(), text("question").with_context(at)?);
                fields.insert("context".into(), passages(row));
                let key = row_key(row, field);
                // sha256(key) as an integer mod 2³¹: its last 31 bits.
                let h = {
                    let d = sha2::Sha256::digest(key.as_bytes());
                    u32::from_be_bytes([d[28], d[29], d[30], d[31]]) % (1 << 31)
                };
                let pool: Vec<&Value> = demo_rows
                    .iter()
                    .copied()
                    .filter(|d| popqa_threshold.is_none() || row_key(d, field) != key)
                    .collect();
                let mut seen = HashSet::new();
                let chosen: Vec<&Value> = if shots == 0 {
                    Vec::new()
                } else {
                    Pcg64::new(h as u128)
                        .permutation(pool.len())
                        .into_iter()
                        .map(|j| pool[j])
                        .filter(|d| seen.insert(row_key(d, field)))
                        .take(shots)
                        .collect()
                };
                if chosen.len() < shots {
                    bail!(
                        "{}: {shots} shots wanted, the demo file has {} distinct demonstrations for it",
                        at(),
                        chosen.len()
                    );
                }
                let chosen: Vec<String> = chosen
                    .into_iter()
                    .map(|d| {
                        format!(
                            "{}\n\nQuestion: {}\nAnswer: {}",
                            passages(d),
                            d["question"].as_str().unwrap_or(""),
                            answers_of(&d["answers"])
                                .first()
                                .cloned()
                                .unwrap_or_default()
                        )
                    })
                    .collect();
                let mut demos = chosen.join("\n\n");
                if shots > 0 {
                    demos.push_str("\n\n");
                }
                fields.insert("demos".into(), demos);
                answers_of(&row["answers"])
            }
        };
        if answers.is_empty() {
            bail!("{}: no answer", at());
        }
        items.push(Item {
            index: i,
            key: row_key(row, field),
            fields,
            answers,
        });
    }
    if items.is_empty() {
        bail!("{file}: no items");
    }
    Ok(items)
}

/// `tokenize` (HELMET `model_utils.py`): the prompt `user + "\n" + system`; when its tokens
/// (with BOS) exceed `max_len − max_tokens`, the context loses as many tokens from its end
/// (cut at the first dropped token's offset) and the prompt is built again.
pub fn prompt(
    tok: &Tokenizer,
    name: &str,
    item: &Item,
    max_len: usize,
    max_tokens: usize,
) -> Result<String> {
    let (user, system) = templates(name, Kind::of(name)?)?;
    let build = |fields: &BTreeMap<String, String>| {
        let f: Vec<(&str, &str)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        format!("{}\n{}", format(user, &f), format(system, &f))
    };
    let p = build(&item.fields);
    let n = tok.encode(&p, true)?.len();
    let budget = max_len.saturating_sub(max_tokens);
    if n <= budget {
        return Ok(p);
    }
    let cut = n - budget;
    let context = item.fields.get("context").cloned().unwrap_or_default();
    let enc = tok
        .inner()
        .encode(context.as_str(), true)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let offsets = enc.get_offsets();
    let keep = offsets.len().saturating_sub(cut);
    let end = if keep == 0 {
        0
    } else {
        offsets[keep].0.min(context.len())
    };
    let mut fields = item.fields.clone();
    fields.insert("context".into(), context[..end].to_string());
    Ok(build(&fields))
}

/// What a prediction answers: the first 16 hex digits of the SHA-256 of the prompt and the
/// generation length.
pub fn prompt_hash(prompt: &str, max_tokens: usize) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("{prompt}\0{max_tokens}").as_bytes());
    format!("{d:x}")[..16].to_string()
}

/// One task's score of one output (HELMET's `post_process` for its dataset), in [0, 1].
pub fn score(name: &str, output: &str, answers: &[String]) -> Result<f64> {
    Ok(match Kind::of(name)? {
        Kind::JsonKv => {
            let parsed = parse_output(output, "corresponding value:").unwrap_or_default();
            subem(output, answers).max(subem(&parsed, answers))
        }
        Kind::Ruler if !name.contains("qa") => {
            let o = output.to_lowercase();
            answers
                .iter()
                .filter(|a| o.contains(&a.to_lowercase()))
                .count() as f64
                / answers.len().max(1) as f64
        }
        _ => {
            let parsed = parse_output(output, "Answer:").unwrap_or_default();
            subem(output, answers).max(subem(&parsed, answers))
        }
    })
}

/// A task of a run: its name, data file and demo file.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub name: String,
    pub data: String,
    pub demos: Option<String>,
}

/// One line of `<task>/pred.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub index: usize,
    /// Of the prompt the output answers ([`prompt_hash`]).
    #[serde(default)]
    pub hash: String,
    pub output: String,
    pub answers: Vec<String>,
    pub score: f64,
    pub prompt_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub model: String,
    pub max_len: usize,
    pub shots: usize,
    /// Task → mean score × 100 (HELMET's SubEM or ruler_recall).
    pub scores: BTreeMap<String, f64>,
    pub counts: BTreeMap<String, usize>,
    /// `recall` and `rag`: the mean over their tasks.
    pub categories: BTreeMap<String, f64>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "# HELMET (recall, RAG)\n\n- model: `{}`\n- input length {}, {} shots, greedy, base prompts\n- {}\n\n| Task | Items | Score |\n|---|---:|---:|\n",
            self.model, self.max_len, self.shots, self.tool
        );
        for (t, v) in &self.scores {
            s.push_str(&format!("| {t} | {} | {v:.2} |\n", self.counts[t]));
        }
        for (c, v) in &self.categories {
            s.push_str(&format!("| **{c}** | | **{v:.2}** |\n"));
        }
        s
    }
}

pub struct HelmetRun {
    pub tasks: Vec<Task>,
    pub shots: usize,
    /// HELMET's `max_test_samples`, drawn with `seed` (its `--seed`).
    pub limit: Option<usize>,
    pub seed: u64,
    /// HELMET's `input_max_length`: prompt + generation.
    pub max_len: usize,
    /// Overrides each dataset's generation length.
    pub max_tokens: Option<usize>,
    pub out: PathBuf,
    pub model: String,
    pub progress: bool,
    pub shard: crate::shard::Shard,
    pub merge: bool,
}

impl HelmetRun {
    pub fn run(&self, answerer: &Answerer) -> Result<Option<Report>> {
        let tok = answerer.tokenizer();
        let mut scores = BTreeMap::new();
        let mut counts = BTreeMap::new();
        let mut by_category: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut number = 0;
        for task in &self.tasks {
            let kind = Kind::of(&task.name)?;
            let items = read(
                &task.name,
                &task.data,
                task.demos.as_deref(),
                self.shots,
                self.limit,
                self.seed,
            )?;
            let max_tokens = self
                .max_tokens
                .unwrap_or(kind.default_max_tokens(&task.name));
            let dir = self.out.join(&task.name);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            // A prediction stands for its item while its prompt and generation length are the
            // same (another --shots, --max-len, --max-tokens or demo file asks again).
            let prompts = items
                .iter()
                .map(|it| prompt(tok, &task.name, it, self.max_len, max_tokens))
                .collect::<Result<Vec<_>>>()?;
            let hashes: HashMap<usize, String> = items
                .iter()
                .zip(&prompts)
                .map(|(it, p)| (it.index, prompt_hash(p, max_tokens)))
                .collect();
            let mut preds: Vec<Prediction> = crate::shard::read_all(&dir, "pred")?;
            preds.retain(|p| hashes.get(&p.index) == Some(&p.hash));
            let done: HashSet<usize> = preds.iter().map(|p| p.index).collect();
            let mut todo: Vec<usize> = Vec::new();
            for (j, it) in items.iter().enumerate() {
                if self.shard.owns(number) && !done.contains(&it.index) {
                    todo.push(j);
                }
                number += 1;
            }
            if self.merge && !todo.is_empty() {
                bail!(
                    "{}: {} items have no prediction in {}: run the shards that own them, or drop --merge",
                    task.name,
                    todo.len(),
                    dir.display()
                );
            }
            let prompts: Vec<String> = todo.iter().map(|&j| prompts[j].clone()).collect();
            let params = GenerationParams {
                max_tokens,
                sampling: SamplingParams {
                    temperature: 0.0,
                    ..Default::default()
                },
                // HELMET's `stop_new_line` (configs/rag.yaml).
                stop: match kind {
                    Kind::Rag { .. } => vec!["\n".into()],
                    _ => Vec::new(),
                },
                ..Default::default()
            };
            let bar = crate::records::progress_bar(
                self.progress && !todo.is_empty(),
                todo.len() as u64,
                &task.name,
            );
            let path = dir.join(format!("pred{}.jsonl", self.shard.suffix()));
            answerer.answer_all(&prompts, false, &params, |j, text, prompt_tokens| {
                let it = &items[todo[j]];
                let p = Prediction {
                    index: it.index,
                    hash: hashes[&it.index].clone(),
                    output: text.to_string(),
                    answers: it.answers.clone(),
                    score: score(&task.name, text, &it.answers)?,
                    prompt_tokens,
                };
                append_line(&path, &p)?;
                preds.push(p);
                bar.inc(1);
                Ok(())
            })?;
            bar.finish_and_clear();
            let mean = if preds.is_empty() {
                0.0
            } else {
                crate::eval::ruler::score::round2(
                    100.0 * preds.iter().map(|p| p.score).sum::<f64>() / preds.len() as f64,
                )
            };
            by_category.entry(kind.category()).or_default().push(mean);
            scores.insert(task.name.clone(), mean);
            counts.insert(task.name.clone(), preds.len());
        }
        if self.shard.count > 1 {
            return Ok(None);
        }
        let report = Report {
            tool: format!("wildlong {}", env!("CARGO_PKG_VERSION")),
            model: self.model.clone(),
            max_len: self.max_len,
            shots: self.shots,
            scores,
            counts,
            categories: by_category
                .into_iter()
                .map(|(c, v)| {
                    (
                        c.to_string(),
                        crate::eval::ruler::score::round2(v.iter().sum::<f64>() / v.len() as f64),
                    )
                })
                .collect(),
        };
        crate::records::write_report(&self.out, &report, &report.markdown())?;
        Ok(Some(report))
    }
}

/// `wildlong eval helmet`.
pub fn command(
    run: &HelmetRun,
    server: Option<crate::generator::openai::OpenAiConfig>,
    tokenizer: &str,
    engine: &crate::engine::config::EngineConfig,
    models_dir: &Path,
) -> Result<()> {
    match super::with_answerer(&run.model, server, tokenizer, engine, models_dir, |a| {
        run.run(a)
    })? {
        Some(r) => {
            print!("{}", r.markdown());
            println!("\nreports: {}/report.{{json,md}}", run.out.display());
        }
        None => println!(
            "shard {}/{}: predictions written under {}; when every shard has finished, the same command with --merge (no --shard) scores them all",
            run.shard.index,
            run.shard.count,
            run.out.display()
        ),
    }
    Ok(())
}
