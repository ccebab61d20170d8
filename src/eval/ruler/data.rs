//! The material RULER's generators draw from: the noise sentence, an essay haystack of
//! public-domain prose, word lists, and QA sets (SQuAD / HotpotQA files, or the small
//! built-in set). Sources and licences: `src/eval/ruler/data/SOURCES.md`.

use crate::eval::ruler::config::QaDataset;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// RULER's noise haystack unit.
pub const NOISE: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

const ESSAYS: &str = include_str!("data/essays.txt");
const NOUNS: &str = include_str!("data/nounlist.txt");
const ADJECTIVES: &str = include_str!("data/adjectivelist.txt");
const VERBS: &str = include_str!("data/verblist.txt");
const BUILTIN_SQUAD: &str = include_str!("data/qa_squad.json");
const BUILTIN_HOTPOTQA: &str = include_str!("data/qa_hotpotqa.json");

/// Where the essay haystack comes from (recorded in reports).
pub const ESSAY_SOURCE: &str =
    "Arthur Conan Doyle, The Adventures of Sherlock Holmes (1892; public domain, Project Gutenberg #1661)";

/// One question with the indices of its gold documents.
#[derive(Debug, Clone)]
pub struct QaItem {
    pub query: String,
    pub outputs: Vec<String>,
    pub context: Vec<usize>,
    /// Other paragraphs of the same article (SQuAD), preferred as distractors.
    pub more_context: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct QaSet {
    pub docs: Vec<String>,
    pub qas: Vec<QaItem>,
    /// `built-in` or the file it was read from.
    pub source: String,
    pub sha256: String,
}

/// Everything the generators read, loaded once.
pub struct Assets {
    /// The essay haystack split on whitespace (RULER: `re.sub(r'\s+', " ", essay).split(" ")`).
    pub essay_words: Vec<&'static str>,
    pub nouns: Vec<&'static str>,
    pub adjectives: Vec<&'static str>,
    /// Sorted, deduplicated nouns + adjectives + verbs (common-words extraction).
    pub cwe_words: Vec<&'static str>,
    pub squad: QaSet,
    pub hotpotqa: QaSet,
    /// The essay text the `ruler` protocol draws from: the built-in essays, or the file
    /// given (RULER's `PaulGrahamEssays.json`, `{"text": …}`, or plain text).
    pub essay_text: String,
    /// `built-in` or the file the essays were read from.
    pub essay_source: String,
    pub essay_sha256: String,
}

fn word_list(text: &'static str) -> Vec<&'static str> {
    let set: BTreeSet<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    set.into_iter().collect()
}

impl Assets {
    /// The material a task table needs: its QA files (paths or `hf://`) resolved and loaded.
    pub fn for_config(cfg: &crate::eval::ruler::config::RulerConfig) -> Result<Self> {
        let resolve = |f: &Option<String>| {
            f.as_deref()
                .map(crate::models::resolve_data_file)
                .transpose()
        };
        let (squad, hotpot) = (resolve(&cfg.qa_squad)?, resolve(&cfg.qa_hotpotqa)?);
        let assets = Self::load(squad.as_deref(), hotpot.as_deref())?;
        match resolve(&cfg.essays)? {
            Some(p) => assets.with_essays(&p),
            None => Ok(assets),
        }
    }

    /// Takes the `ruler` protocol's essays from `path`: RULER's `PaulGrahamEssays.json`
    /// (an object whose `text` is the essays, as its download script writes it) or a plain
    /// text file.
    pub fn with_essays(mut self, path: &Path) -> Result<Self> {
        use sha2::Digest;
        let raw =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let text = if path.extension().is_some_and(|e| e == "json") {
            #[derive(serde::Deserialize)]
            struct Essays {
                text: String,
            }
            serde_json::from_str::<Essays>(&raw)
                .with_context(|| {
                    format!(
                        "{}: expected {{\"text\": …}} (RULER's PaulGrahamEssays.json)",
                        path.display()
                    )
                })?
                .text
        } else {
            raw
        };
        if text.trim().is_empty() {
            bail!("{}: no essay text", path.display());
        }
        self.essay_sha256 = format!("{:x}", sha2::Sha256::digest(text.as_bytes()));
        self.essay_text = text;
        self.essay_source = path.display().to_string();
        Ok(self)
    }

    /// Loads the built-in material; QA sets from `squad`/`hotpotqa` files when given.
    pub fn load(squad: Option<&Path>, hotpotqa: Option<&Path>) -> Result<Self> {
        let nouns = word_list(NOUNS);
        let adjectives = word_list(ADJECTIVES);
        let verbs = word_list(VERBS);
        let cwe: BTreeSet<&'static str> = nouns
            .iter()
            .chain(&adjectives)
            .chain(&verbs)
            .copied()
            .collect();
        let load_qa = |p: Option<&Path>, d: QaDataset| -> Result<QaSet> {
            match p {
                Some(p) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    read_qa(&text, d, &p.display().to_string())
                        .with_context(|| format!("{}", p.display()))
                }
                None => {
                    let text = match d {
                        QaDataset::Squad => BUILTIN_SQUAD,
                        QaDataset::Hotpotqa => BUILTIN_HOTPOTQA,
                    };
                    read_qa(text, d, "built-in")
                }
            }
        };
        Ok(Self {
            essay_words: ESSAYS.split_whitespace().collect(),
            nouns,
            adjectives,
            cwe_words: cwe.into_iter().collect(),
            squad: load_qa(squad, QaDataset::Squad)?,
            hotpotqa: load_qa(hotpotqa, QaDataset::Hotpotqa)?,
            essay_text: ESSAYS.to_string(),
            essay_source: "built-in".into(),
            essay_sha256: {
                use sha2::Digest;
                format!("{:x}", sha2::Sha256::digest(ESSAYS.as_bytes()))
            },
        })
    }

    pub fn qa(&self, d: QaDataset) -> &QaSet {
        match d {
            QaDataset::Squad => &self.squad,
            QaDataset::Hotpotqa => &self.hotpotqa,
        }
    }
}

/// A question before document indexing: (question, answers, gold documents, same-article documents).
type RawQa = (String, Vec<String>, Vec<String>, Vec<String>);

/// Reads SQuAD (v2 JSON: `data[].paragraphs[].qas[]`) or HotpotQA (a list of
/// `{question, answer, context: [[title, [sentences]]]}`) the way RULER's `qa.py` does:
/// documents deduplicated and sorted, unanswerable SQuAD questions dropped.
pub fn read_qa(text: &str, dataset: QaDataset, source: &str) -> Result<QaSet> {
    use sha2::Digest;
    let sha256 = format!("{:x}", sha2::Sha256::digest(text.as_bytes()));
    let v: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
    let (docs, raw): (Vec<String>, Vec<RawQa>) = match dataset {
        QaDataset::Squad => {
            let articles = v["data"]
                .as_array()
                .context("SQuAD file: no top-level `data` list")?;
            let mut all = Vec::new();
            for (ai, a) in articles.iter().enumerate() {
                let paras = a["paragraphs"]
                    .as_array()
                    .with_context(|| format!("data[{ai}]: no `paragraphs` list"))?;
                let ctxs: Vec<String> = paras
                    .iter()
                    .map(|p| p["context"].as_str().unwrap_or_default().to_string())
                    .collect();
                for (pi, p) in paras.iter().enumerate() {
                    let Some(qas) = p["qas"].as_array() else {
                        bail!("data[{ai}].paragraphs[{pi}]: no `qas` list")
                    };
                    for (qi, q) in qas.iter().enumerate() {
                        if q["is_impossible"].as_bool().unwrap_or(false) {
                            continue;
                        }
                        let question = q["question"].as_str().with_context(|| {
                            format!("data[{ai}].paragraphs[{pi}].qas[{qi}]: no `question`")
                        })?;
                        let answers: Vec<String> = q["answers"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|x| x["text"].as_str().map(String::from))
                                    .collect()
                            })
                            .unwrap_or_default();
                        if answers.is_empty() {
                            continue;
                        }
                        let more = ctxs.iter().filter(|c| **c != ctxs[pi]).cloned().collect();
                        all.push((question.to_string(), answers, vec![ctxs[pi].clone()], more));
                    }
                }
            }
            let docs = articles
                .iter()
                .flat_map(|a| a["paragraphs"].as_array().into_iter().flatten())
                .map(|p| p["context"].as_str().unwrap_or_default().to_string())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            (docs, all)
        }
        QaDataset::Hotpotqa => {
            let items = v
                .as_array()
                .context("HotpotQA file: expected a top-level list")?;
            let mut all = Vec::new();
            let mut docs = BTreeSet::new();
            for (i, d) in items.iter().enumerate() {
                let question = d["question"]
                    .as_str()
                    .with_context(|| format!("item {i}: no `question`"))?;
                let answer = d["answer"]
                    .as_str()
                    .with_context(|| format!("item {i}: no `answer`"))?;
                let ctx = d["context"]
                    .as_array()
                    .with_context(|| format!("item {i}: no `context` list"))?;
                let mut gold = Vec::new();
                for c in ctx {
                    let title = c[0].as_str().unwrap_or_default();
                    let sents: String = c[1]
                        .as_array()
                        .map(|s| s.iter().filter_map(|x| x.as_str()).collect())
                        .unwrap_or_default();
                    let doc = format!("{title}\n{sents}");
                    docs.insert(doc.clone());
                    gold.push(doc);
                }
                all.push((question.to_string(), vec![answer.to_string()], gold, vec![]));
            }
            (docs.into_iter().collect(), all)
        }
    };
    if docs.is_empty() || raw.is_empty() {
        bail!("no documents or no answerable questions");
    }
    let index: HashMap<&str, usize> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| (d.as_str(), i))
        .collect();
    let qas = raw
        .iter()
        .map(|(q, a, gold, more)| QaItem {
            query: q.clone(),
            outputs: a.clone(),
            context: gold.iter().map(|d| index[d.as_str()]).collect(),
            more_context: more.iter().map(|d| index[d.as_str()]).collect(),
        })
        .collect();
    Ok(QaSet {
        docs,
        qas,
        source: source.to_string(),
        sha256,
    })
}

/// Sentence split of a haystack (RULER uses nltk's `sent_tokenize`): Unicode sentence
/// boundaries (UAX #29), rejoining breaks after common abbreviations such as "Mr.".
pub fn sentences(text: &str) -> Vec<&str> {
    const ABBREV: [&str; 8] = [
        "Mr.", "Mrs.", "Dr.", "St.", "Mme.", "Messrs.", "Co.", "Esq.",
    ];
    let mut out: Vec<&str> = Vec::new();
    let mut start = 0;
    for (off, s) in unicode_segmentation::UnicodeSegmentation::split_sentence_bound_indices(text) {
        let end = off + s.len();
        let piece = text[start..end].trim_end();
        if ABBREV.iter().any(|a| piece.ends_with(a)) && end < text.len() {
            continue;
        }
        let t = text[start..end].trim();
        if !t.is_empty() {
            out.push(t);
        }
        start = end;
    }
    let t = text[start..].trim();
    if !t.is_empty() {
        out.push(t);
    }
    out
}
