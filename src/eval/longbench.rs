//! `wildlong eval longbench`: LongBench v2 (THUDM/LongBench-v2: 503 multiple-choice questions
//! over 8K–2M-word contexts) run as its own `pred.py` runs it — the `0shot.txt` prompt, the
//! prompt cut to its first and last `max_len / 2` tokens when longer, one user message through
//! the model's chat template, temperature 0.1, 128 new tokens, the answer letter taken by
//! `extract_answer`'s two patterns — and scored as `result.py` scores it: accuracy overall, by
//! difficulty (easy, hard) and by length (short, medium, long). On the local engine or an
//! OpenAI-compatible server (chat completions, as `pred.py` calls one).

use super::Answerer;
use crate::engine::config::{GenerationParams, SamplingParams};
use crate::engine::tokenizer::Tokenizer;
use crate::records::append_line;
use anyhow::{bail, Context, Result};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// LongBench v2's `prompts/0shot.txt`.
pub const TEMPLATE: &str = "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\nWhat is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\nFormat your response as follows: \"The correct answer is (insert answer here)\".";

/// One item of the released `data.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(default)]
    pub domain: String,
    #[serde(default)]
    pub sub_domain: String,
    pub difficulty: String,
    pub length: String,
    pub question: String,
    #[serde(rename = "choice_A")]
    pub choice_a: String,
    #[serde(rename = "choice_B")]
    pub choice_b: String,
    #[serde(rename = "choice_C")]
    pub choice_c: String,
    #[serde(rename = "choice_D")]
    pub choice_d: String,
    pub answer: String,
    pub context: String,
}

impl Item {
    /// `pred.py`'s prompt: every field stripped into the template.
    pub fn prompt(&self) -> String {
        TEMPLATE
            .replace("$DOC$", self.context.trim())
            .replace("$Q$", self.question.trim())
            .replace("$C_A$", self.choice_a.trim())
            .replace("$C_B$", self.choice_b.trim())
            .replace("$C_C$", self.choice_c.trim())
            .replace("$C_D$", self.choice_d.trim())
    }
}

/// `pred.py`'s truncation: a prompt over `max_len` tokens (encoded with special tokens) keeps
/// its first `max_len // 2` and last `-(-max_len // 2)` tokens, decoded without specials.
pub fn truncate(tok: &Tokenizer, prompt: &str, max_len: usize) -> Result<String> {
    let ids = tok.encode(prompt, true)?;
    if ids.len() <= max_len {
        return Ok(prompt.to_string());
    }
    let head = max_len / 2;
    let tail = max_len - head;
    let kept: Vec<u32> = ids[..head]
        .iter()
        .chain(&ids[ids.len() - tail..])
        .copied()
        .collect();
    tok.decode(&kept, true)
}

/// `pred.py`'s `extract_answer`: `*` removed, then "The correct answer is (X)" or, failing
/// that, "The correct answer is X".
pub fn extract_answer(response: &str) -> Option<String> {
    static PATTERNS: OnceLock<[Regex; 2]> = OnceLock::new();
    let [paren, bare] = PATTERNS.get_or_init(|| {
        [
            r"The correct answer is \(([A-D])\)",
            r"The correct answer is ([A-D])",
        ]
        .map(|r| Regex::new(r).expect("valid regex"))
    });
    let r = response.replace('*', "");
    paren
        .captures(&r)
        .or_else(|| bare.captures(&r))
        .map(|c| c[1].to_string())
}

/// Reads `data.json` (a JSON array, as released) or JSONL, local or `hf://datasets/...`.
pub fn read(spec: &str, limit: Option<usize>) -> Result<Vec<Item>> {
    let path = crate::models::resolve_data_file(spec)?;
    let name = path.display().to_string();
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {name}"))?;
    let mut items: Vec<Item> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text)
            .with_context(|| format!("{name}: not LongBench v2's data.json"))?
    } else {
        let mut items = Vec::new();
        crate::records::for_each_jsonl_line(&name, text.as_bytes(), |line, l| {
            let l = l.with_context(|| format!("{name}: line {line}: not UTF-8"))?;
            items.push(serde_json::from_str(l).with_context(|| format!("{name}: line {line}"))?);
            Ok(())
        })?;
        items
    };
    for it in &items {
        if !["A", "B", "C", "D"].contains(&it.answer.as_str()) {
            bail!("{name}: item {}: answer {:?} is not A-D", it.id, it.answer);
        }
    }
    if let Some(n) = limit {
        items.truncate(n);
    }
    if items.is_empty() {
        bail!("{name}: no items");
    }
    Ok(items)
}

/// One line of `pred.jsonl` (`pred.py`'s output fields, the context dropped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    #[serde(rename = "_id")]
    pub id: String,
    pub difficulty: String,
    pub length: String,
    pub domain: String,
    pub answer: String,
    pub response: String,
    pub pred: Option<String>,
    pub judge: bool,
    pub prompt_tokens: usize,
}

/// Accuracy in percent overall, by difficulty and by length (`result.py`'s columns).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub model: String,
    pub n: usize,
    pub max_len: usize,
    pub accuracy: BTreeMap<String, f64>,
    pub counts: BTreeMap<String, usize>,
}

pub fn score(preds: &[Prediction]) -> (BTreeMap<String, f64>, BTreeMap<String, usize>) {
    let mut hits: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for p in preds {
        // result.py counts anything not "easy" as hard; length by its three names (its
        // medium branch tests "short" twice, a bug not reproduced here).
        let d = if p.difficulty == "easy" {
            "easy"
        } else {
            "hard"
        };
        for k in ["overall", d, p.length.as_str()] {
            let e = hits.entry(k.to_string()).or_default();
            e.0 += p.judge as usize;
            e.1 += 1;
        }
    }
    let acc = hits
        .iter()
        .map(|(k, (h, n))| (k.clone(), (*h as f64 / *n as f64 * 1000.0).round() / 10.0))
        .collect();
    let counts = hits.iter().map(|(k, (_, n))| (k.clone(), *n)).collect();
    (acc, counts)
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "# LongBench v2\n\n- model: {}\n- {}\n- prompts cut to {} tokens (first and last halves), as pred.py does\n\n| | n | accuracy |\n|---|---:|---:|\n",
            self.model, self.tool, self.max_len
        );
        for k in ["overall", "easy", "hard", "short", "medium", "long"] {
            if let (Some(a), Some(n)) = (self.accuracy.get(k), self.counts.get(k)) {
                s.push_str(&format!("| {k} | {n} | {a:.1} |\n"));
            }
        }
        s
    }
}

pub struct LongBenchRun {
    pub data: String,
    pub limit: Option<usize>,
    /// pred.py's `max_len` (its model2maxlen.json) [default: the model's context − 128].
    pub max_len: Option<usize>,
    pub temperature: f64,
    pub seed: u64,
    pub out: PathBuf,
    pub model: String,
    pub progress: bool,
    /// This worker's share (items whose index mod n is k − 1) into `pred.shard-k-of-n.jsonl`.
    pub shard: crate::shard::Shard,
    /// Score every shard's predictions; fail, naming them, if any item has none.
    pub merge: bool,
}

impl LongBenchRun {
    /// Runs and writes the report; `None` for a shard of several (no report).
    pub fn run(&self, answerer: &Answerer) -> Result<Option<Report>> {
        let items = read(&self.data, self.limit)?;
        let (tok, max_len) = match answerer {
            Answerer::Local(e) => (
                &e.tokenizer,
                self.max_len.unwrap_or(e.max_context().saturating_sub(128)),
            ),
            Answerer::Server { tokenizer, .. } => (
                *tokenizer,
                self.max_len
                    .context("with --server, --max-len (pred.py's model2maxlen) is needed")?,
            ),
        };
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        let pred_path = self.out.join(format!("pred{}.jsonl", self.shard.suffix()));
        let mut preds: Vec<Prediction> = crate::shard::read_all(&self.out, "pred")?;
        let done: HashSet<String> = preds.iter().map(|p| p.id.clone()).collect();
        let todo: Vec<&Item> = items
            .iter()
            .enumerate()
            .filter(|(i, it)| self.shard.owns(*i) && !done.contains(&it.id))
            .map(|(_, it)| it)
            .collect();
        if self.merge && !todo.is_empty() {
            let ids: Vec<&str> = todo.iter().take(5).map(|i| i.id.as_str()).collect();
            bail!(
                "{} items have no prediction in {} (e.g. {}): run the shards that own them, or drop --merge",
                todo.len(),
                self.out.display(),
                ids.join(", ")
            );
        }
        let prompts = todo
            .iter()
            .map(|it| truncate(tok, &it.prompt(), max_len))
            .collect::<Result<Vec<_>>>()?;
        let params = GenerationParams {
            max_tokens: 128,
            sampling: SamplingParams {
                temperature: self.temperature,
                seed: self.seed,
                ..Default::default()
            },
            ..Default::default()
        };
        let bar = crate::records::progress_bar(
            self.progress && !todo.is_empty(),
            todo.len() as u64,
            "items",
        );
        let mut record = |j: usize, text: &str, prompt_tokens: usize| -> Result<()> {
            let it = todo[j];
            let response = text.trim().to_string();
            let pred = extract_answer(&response);
            let p = Prediction {
                id: it.id.clone(),
                difficulty: it.difficulty.clone(),
                length: it.length.clone(),
                domain: it.domain.clone(),
                answer: it.answer.clone(),
                judge: pred.as_deref() == Some(it.answer.as_str()),
                pred,
                response,
                prompt_tokens,
            };
            append_line(&pred_path, &p)?;
            preds.push(p);
            bar.inc(1);
            Ok(())
        };
        answerer.answer_all(&prompts, true, &params, &mut record)?;
        bar.finish_and_clear();
        if self.shard.count > 1 {
            return Ok(None);
        }
        let ids: HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
        preds.retain(|p| ids.contains(p.id.as_str()));
        let (accuracy, counts) = score(&preds);
        let report = Report {
            tool: format!("wildlong {}", env!("CARGO_PKG_VERSION")),
            model: self.model.clone(),
            n: preds.len(),
            max_len,
            accuracy,
            counts,
        };
        crate::records::write_report(&self.out, &report, &report.markdown())?;
        Ok(Some(report))
    }
}

/// `wildlong eval longbench`: the engine (or a server and `tokenizer`'s tokenizer), then the run.
pub fn command(
    run: &LongBenchRun,
    server: Option<crate::generator::openai::OpenAiConfig>,
    tokenizer: &str,
    engine: &crate::engine::config::EngineConfig,
    models_dir: &Path,
) -> Result<()> {
    let report = super::with_answerer(&run.model, server, tokenizer, engine, models_dir, |a| {
        run.run(a)
    })?;
    match report {
        Some(r) => {
            print!("{}", r.markdown());
            println!("\nreports: {}/report.{{json,md}}", run.out.display());
        }
        None => println!(
            "shard {}/{}: predictions written to {}/pred{}.jsonl; when every shard has finished, the same command with --merge (no --shard) scores them all",
            run.shard.index,
            run.shard.count,
            run.out.display(),
            run.shard.suffix()
        ),
    }
    Ok(())
}
