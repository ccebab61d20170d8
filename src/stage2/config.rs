//! Stage 2's settings (`configs/stage2.toml`).

use crate::config::load_validated;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Stage 2 (`configs/stage2.toml` spells out these defaults).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Stage2Config {
    pub documents: DocumentsConfig,
    pub assemble: AssembleConfig,
    pub generate: Stage2GenerateConfig,
    pub gates: GatesConfig,
    pub output: Stage2OutputConfig,
}

/// Stage 2's quality gates (every rejection is counted by reason).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatesConfig {
    /// Answers with fewer words are rejected (`too_short`).
    pub min_answer_words: usize,
    /// Share of the distinct capitalised names in an answer that may be missing from the
    /// documents and the instruction (`ungrounded_name` above it).
    pub max_ungrounded_names: f64,
    /// Answer the instruction again without the documents; SQuAD token F1 between the two
    /// answers at or above this rejects the pair (`closed_book`). Remove the key to skip.
    pub closed_book_max_f1: Option<f64>,
    /// MinHash Jaccard at which a later instruction is a near-duplicate of an earlier one.
    pub near_duplicate_threshold: f64,
    /// Drop documents and pairs sharing a word n-gram with RULER's sources.
    pub decontaminate: bool,
    pub decontaminate_ngram: usize,
    /// RULER's QA files to decontaminate against [default: the built-in sets].
    pub squad: Option<std::path::PathBuf>,
    pub hotpotqa: Option<std::path::PathBuf>,
}

impl Default for GatesConfig {
    fn default() -> Self {
        Self {
            min_answer_words: 3,
            max_ungrounded_names: 0.25,
            closed_book_max_f1: Some(0.5),
            near_duplicate_threshold: 0.8,
            decontaminate: true,
            decontaminate_ngram: 13,
            squad: None,
            hotpotqa: None,
        }
    }
}

/// What stage 2 writes besides `data.jsonl` and the card.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Stage2OutputConfig {
    /// Also write `data.parquet` (messages as a list of {role, content}).
    pub parquet: bool,
}

/// Adaptive generation: rewrite each blueprint for its document(s), then answer it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Stage2GenerateConfig {
    /// Blueprints per context (all share the context's prefill).
    pub instructions_per_context: usize,
    pub max_instruction_chars: usize,
    /// At most this many answer tokens (and never past the bucket).
    pub max_answer_tokens: usize,
    pub temperature: f64,
    /// > 1 discourages repeating recent tokens (small models loop without it).
    pub repetition_penalty: Option<f64>,
    pub seed: u64,
}

impl Default for Stage2GenerateConfig {
    fn default() -> Self {
        Self {
            instructions_per_context: 2,
            max_instruction_chars: 400,
            max_answer_tokens: 512,
            temperature: 0.8,
            repetition_penalty: Some(1.2),
            seed: 13,
        }
    }
}

impl Stage2Config {
    pub const BUILTIN: &'static str = include_str!("../../configs/stage2.toml");

    pub fn builtin() -> Self {
        toml::from_str(Self::BUILTIN).expect("configs/stage2.toml is valid (tested)")
    }

    /// A file (or the built-in defaults) with `--set` overrides, validated.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Self> {
        load_validated(path, Self::BUILTIN, sets, Self::validate)
    }

    pub fn validate(&self) -> Result<()> {
        let g = &self.gates;
        if !(0.0..=1.0).contains(&g.max_ungrounded_names)
            || !(0.0..=1.0).contains(&g.near_duplicate_threshold)
            || g.closed_book_max_f1
                .is_some_and(|f| !(0.0..=1.0).contains(&f))
        {
            anyhow::bail!(
                "gates.max_ungrounded_names, gates.near_duplicate_threshold and gates.closed_book_max_f1 must be in [0, 1]"
            );
        }
        if g.decontaminate_ngram == 0 {
            anyhow::bail!("gates.decontaminate_ngram must be ≥ 1");
        }
        let a = &self.assemble;
        if a.buckets.is_empty() || a.buckets.contains(&0) {
            anyhow::bail!("assemble.buckets must list token lengths > 0");
        }
        if !a.quotas.is_empty() && a.quotas.len() != a.buckets.len() {
            anyhow::bail!(
                "assemble.quotas has {} entries for {} buckets",
                a.quotas.len(),
                a.buckets.len()
            );
        }
        if a.min_documents < 2 || a.min_documents > a.max_documents {
            anyhow::bail!("assemble.min_documents must be ≥ 2 and ≤ assemble.max_documents");
        }
        if !(0.0..=1.0).contains(&a.multi_document_share) || !(0.0..0.5).contains(&a.fill_tolerance)
        {
            anyhow::bail!(
                "assemble.multi_document_share must be in [0, 1] and fill_tolerance in [0, 0.5)"
            );
        }
        if a.buckets.iter().any(|&b| b <= a.reserve_tokens) {
            anyhow::bail!(
                "every bucket must be larger than assemble.reserve_tokens ({})",
                a.reserve_tokens
            );
        }
        Ok(())
    }
}

/// Where stage 2's documents come from and what happens to unusable ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DocumentsConfig {
    /// JSONL or Parquet files (a `text` column), folders of .txt/.md files,
    /// `hf://datasets/OWNER/NAME/FILE`, or `sample` (the built-in corpus).
    pub paths: Vec<String>,
    /// Characters of a document's beginning the classifier reads.
    pub classify_chars: usize,
    /// How documents without a given type are typed.
    pub classifier: DocumentClassifier,
    /// Documents longer than the model's context: cut to the buckets, or skipped.
    pub too_long: TooLongPolicy,
}

impl Default for DocumentsConfig {
    fn default() -> Self {
        Self {
            paths: vec!["sample".into()],
            classify_chars: 4000,
            classifier: DocumentClassifier::Llm,
            too_long: TooLongPolicy::Truncate,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocumentClassifier {
    /// The heuristic first (program text, legal wording); the LLM reads the beginning of
    /// what it cannot place and picks a taxonomy type.
    Llm,
    /// The heuristic alone (`other` when unsure).
    Heuristic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TooLongPolicy {
    /// Kept; assembly cuts them at a line break to each bucket.
    Truncate,
    /// Skipped and counted.
    Skip,
}

/// Sample assembly to token budgets (SPEC §2 stage 2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssembleConfig {
    /// Total tokens of a sample (documents + instruction + answer), per bucket.
    pub buckets: Vec<usize>,
    /// Samples per bucket (same order); empty = `per_bucket` each.
    pub quotas: Vec<usize>,
    pub per_bucket: usize,
    /// Tokens of each bucket kept for the instruction and the answer.
    pub reserve_tokens: usize,
    /// The document block fills bucket − reserve to within this fraction.
    pub fill_tolerance: f64,
    /// Share of multi-document bundles.
    pub multi_document_share: f64,
    pub min_documents: usize,
    pub max_documents: usize,
    /// Task families of multi-document bundles.
    pub task_families: Vec<String>,
    pub seed: u64,
}

impl Default for AssembleConfig {
    fn default() -> Self {
        Self {
            buckets: vec![4096, 8192],
            quotas: vec![],
            per_bucket: 8,
            reserve_tokens: 1024,
            fill_tolerance: 0.05,
            multi_document_share: 0.25,
            min_documents: 2,
            max_documents: 5,
            task_families: ["comparison", "aggregation", "cross-document consistency"]
                .map(String::from)
                .to_vec(),
            seed: 11,
        }
    }
}
