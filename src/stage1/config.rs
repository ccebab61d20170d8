//! Stage 1's settings (`configs/stage1.toml`) and the meta-information schema
//! (`configs/stage1/meta_schema.toml`).

use crate::config::{from_toml_file, load_validated};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Stage 1 (`wildlong extract`, `graph`, `sample`); `configs/stage1.toml` spells out these defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Stage1Config {
    /// Meta-information schema (fields + document-type taxonomy) [default: built in,
    /// `configs/stage1/meta_schema.toml`].
    pub schema: Option<std::path::PathBuf>,
    pub input: InputConfig,
    pub filter: FilterConfig,
    pub extract: ExtractConfig,
    pub normalize: NormalizeConfig,
    pub graph: GraphConfig,
    pub sample: SampleConfig,
}

impl Stage1Config {
    pub const BUILTIN: &'static str = include_str!("../../configs/stage1.toml");

    /// `configs/stage1.toml`, compiled in.
    pub fn builtin() -> Self {
        toml::from_str(Self::BUILTIN).expect("configs/stage1.toml is valid (tested)")
    }

    pub fn from_toml_file(path: &Path) -> Result<Self> {
        Self::load(Some(path), &[])
    }

    /// A file (or the built-in defaults) with `--set` overrides, validated.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Self> {
        load_validated(path, Self::BUILTIN, sets, Self::validate)
    }

    pub fn validate(&self) -> Result<()> {
        let s = &self.sample;
        if s.min_fields < 2 || s.min_fields > s.max_fields {
            anyhow::bail!(
                "sample.min_fields ({}) must be at least 2 and at most sample.max_fields ({})",
                s.min_fields,
                s.max_fields
            );
        }
        let f = &self.filter;
        if f.minhash_perms == 0
            || f.minhash_bands == 0
            || !f.minhash_perms.is_multiple_of(f.minhash_bands)
        {
            anyhow::bail!(
                "filter.minhash_bands ({}) must divide filter.minhash_perms ({})",
                f.minhash_bands,
                f.minhash_perms
            );
        }
        if !(0.0..=1.0).contains(&f.near_duplicate_threshold) {
            anyhow::bail!("filter.near_duplicate_threshold must be in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.normalize.merge_similarity) {
            anyhow::bail!("normalize.merge_similarity must be in [0, 1]");
        }
        if self.extract.max_value_chars == 0 || self.normalize.max_value_words == 0 {
            anyhow::bail!(
                "extract.max_value_chars and normalize.max_value_words must be at least 1"
            );
        }
        Ok(())
    }
}

/// Where conversations come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// Paths, `hf://datasets/OWNER/NAME/FILE`, or `sample` (the built-in illustrative set).
    /// `.parquet` files are read as Parquet, everything else as JSONL.
    pub paths: Vec<String>,
    /// Fail on the first malformed line instead of counting and skipping it.
    pub strict: bool,
    /// Extract only the first N filtered queries (`--limit` overrides it) [default: all].
    pub limit: Option<usize>,
}

impl Default for InputConfig {
    fn default() -> Self {
        Self {
            paths: vec!["sample".into()],
            strict: false,
            limit: None,
        }
    }
}

/// Which conversations and queries are kept (SPEC §2 query filter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// `single`: only conversations with one user turn; `first`: the first user turn of any.
    pub turns: TurnPolicy,
    /// Keep these languages (WildChat's `language` values, case-insensitive); empty = all.
    /// Rows without a language field are kept.
    pub languages: Vec<String>,
    pub drop_toxic: bool,
    pub drop_redacted: bool,
    pub min_query_chars: usize,
    pub max_query_chars: usize,
    pub exact_dedup: bool,
    pub near_dedup: bool,
    /// Estimated Jaccard similarity (word shingles) at which a query is a near-duplicate
    /// of an earlier one.
    pub near_duplicate_threshold: f64,
    pub minhash_perms: usize,
    /// LSH bands (perms / bands rows each); candidates are then checked against the threshold.
    pub minhash_bands: usize,
    /// Words per shingle.
    pub shingle_words: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnPolicy {
    Single,
    First,
}

impl Default for FilterConfig {
    fn default() -> Self {
        Self {
            turns: TurnPolicy::Single,
            languages: vec!["English".into()],
            drop_toxic: true,
            drop_redacted: true,
            min_query_chars: 20,
            max_query_chars: 200_000,
            exact_dedup: true,
            near_dedup: true,
            near_duplicate_threshold: 0.8,
            minhash_perms: 128,
            minhash_bands: 16,
            shingle_words: 3,
            seed: 1,
        }
    }
}

/// How the LLM extracts meta-information.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExtractConfig {
    /// Longer queries keep their first two thirds and last third of this many tokens.
    pub max_query_tokens: usize,
    /// JSON-schema cap on every field value, in characters.
    pub max_value_chars: usize,
    /// `free`: the model writes a document type that is then mapped onto the taxonomy;
    /// `taxonomy`: the model must pick one of the taxonomy's names.
    pub document_type: DocumentTypeMode,
    pub temperature: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocumentTypeMode {
    Free,
    Taxonomy,
}

impl Default for ExtractConfig {
    fn default() -> Self {
        Self {
            max_query_tokens: 1024,
            max_value_chars: 80,
            document_type: DocumentTypeMode::Free,
            temperature: 0.0,
            seed: 42,
        }
    }
}

/// Per-field value normalisation before graph building (SPEC §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NormalizeConfig {
    pub max_value_words: usize,
    /// Values that mean "nothing" and are dropped (after lowercasing).
    pub null_values: Vec<String>,
    /// Merge a value into a more frequent one of the same field at this similarity (0–1; 1 = exact only).
    pub merge_similarity: f64,
    pub similarity: SimilarityMetric,
    /// Values seen in fewer queries than this (after merging) are dropped.
    pub min_support: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimilarityMetric {
    /// 1 − Levenshtein distance / longer length.
    Levenshtein,
    JaroWinkler,
}

impl Default for NormalizeConfig {
    fn default() -> Self {
        Self {
            max_value_words: 10,
            null_values: [
                "",
                "none",
                "n/a",
                "na",
                "null",
                "unknown",
                "not specified",
                "-",
            ]
            .map(String::from)
            .to_vec(),
            merge_similarity: 0.9,
            similarity: SimilarityMetric::Levenshtein,
            min_support: 1,
        }
    }
}

/// Co-occurrence graphs, one per document type (SPEC §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GraphConfig {
    pub weight: EdgeWeight,
    /// Edges whose weight is below this are pruned.
    pub min_weight: f64,
    /// Edges seen in fewer queries than this are pruned.
    pub min_edge_count: usize,
    /// Document types with fewer queries than this are merged into `other`.
    pub min_type_queries: usize,
    /// Conversation ids kept per node for provenance.
    pub sources_per_node: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EdgeWeight {
    Count,
    Pmi,
    Npmi,
}

impl Default for GraphConfig {
    fn default() -> Self {
        Self {
            weight: EdgeWeight::Count,
            min_weight: 0.0,
            min_edge_count: 1,
            min_type_queries: 3,
            sources_per_node: 8,
        }
    }
}

/// Random walks into blueprint paths and blueprints (SPEC §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    pub seed: u64,
    /// The field every walk starts at.
    pub start_field: String,
    /// Fields per path, start included.
    pub min_fields: usize,
    pub max_fields: usize,
    /// Blueprints per document type.
    pub per_type: usize,
    /// Per-type overrides of `per_type`.
    pub quotas: std::collections::BTreeMap<String, usize>,
    /// Walks tried per wanted path before a type gives up.
    pub attempts_per_path: usize,
    pub temperature: f64,
    pub max_instruction_chars: usize,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            start_field: "task".into(),
            min_fields: 3,
            max_fields: 6,
            per_type: 20,
            quotas: Default::default(),
            attempts_per_path: 50,
            temperature: 0.0,
            max_instruction_chars: 300,
        }
    }
}

/// The meta-information schema: the fields the LLM extracts and the document-type
/// taxonomy (`configs/stage1/meta_schema.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaSchema {
    pub fields: Vec<MetaField>,
    pub document_types: Vec<DocumentTypeSpec>,
    /// Worked examples shown before each query (few-shot).
    #[serde(default)]
    pub examples: Vec<MetaExample>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaExample {
    pub query: String,
    /// field → value; exactly the schema's fields.
    pub meta: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaField {
    pub name: String,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentTypeSpec {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
}

impl MetaSchema {
    pub fn builtin() -> Self {
        toml::from_str(include_str!("../../configs/stage1/meta_schema.toml"))
            .expect("configs/stage1/meta_schema.toml is valid (tested)")
    }

    pub fn load(path: Option<&Path>) -> Result<Self> {
        let s = match path {
            Some(p) => {
                let s: Self = from_toml_file(p)?;
                s.validate().with_context(|| format!("{}", p.display()))?;
                s
            }
            None => Self::builtin(),
        };
        Ok(s)
    }

    /// The schema a stage-1 folder was extracted with (`<dir>/meta_schema.toml`, written by
    /// extraction); the built-in one for folders from before it was recorded.
    pub fn of_stage1(dir: &Path) -> Result<Self> {
        let p = dir.join(Self::RUN_FILE);
        match p.is_file() {
            true => Self::load(Some(&p)),
            false => Ok(Self::builtin()),
        }
    }

    /// Where extraction records the schema in its folder, for the stages after it.
    pub const RUN_FILE: &'static str = crate::layout::stage1::META_SCHEMA;

    /// Records this schema in a stage-1 folder (temp file + rename).
    pub fn save_in(&self, dir: &Path) -> Result<()> {
        let text = toml::to_string(self).context("writing the meta schema as TOML")?;
        crate::records::write_atomic(&dir.join(Self::RUN_FILE), text.as_bytes())
    }

    pub fn validate(&self) -> Result<()> {
        let mut seen = std::collections::BTreeSet::new();
        for f in &self.fields {
            if f.name.is_empty()
                || !f
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                anyhow::bail!(
                    "field name {:?}: use lowercase letters, digits and _",
                    f.name
                );
            }
            if !seen.insert(f.name.as_str()) {
                anyhow::bail!("field {:?} is listed twice", f.name);
            }
        }
        if !seen.contains("document_type") {
            anyhow::bail!(
                "the schema needs a `document_type` field (graphs are per document type)"
            );
        }
        if self.fields.len() < 3 {
            anyhow::bail!("the schema needs document_type and at least two more fields");
        }
        let mut types = std::collections::BTreeSet::new();
        for t in &self.document_types {
            if t.name.trim().is_empty() || t.name != t.name.to_lowercase() {
                anyhow::bail!(
                    "document type {:?}: names are lowercase and not empty",
                    t.name
                );
            }
            if !types.insert(t.name.as_str()) {
                anyhow::bail!("document type {:?} is listed twice", t.name);
            }
        }
        if types.is_empty() {
            anyhow::bail!("the schema lists no document_types");
        }
        if types.contains("other") {
            anyhow::bail!("`other` is implicit: do not list it as a document type");
        }
        for (i, e) in self.examples.iter().enumerate() {
            let keys: std::collections::BTreeSet<&str> =
                e.meta.keys().map(String::as_str).collect();
            if keys != seen {
                let missing: Vec<&&str> = seen.difference(&keys).collect();
                let extra: Vec<&&str> = keys.difference(&seen).collect();
                anyhow::bail!(
                    "examples[{i}]: its meta must hold exactly the fields (missing {missing:?}, unknown {extra:?})"
                );
            }
        }
        Ok(())
    }
}

/// Lowercase, trimmed, whitespace collapsed, outer punctuation and a leading article removed.
fn type_key(s: &str) -> String {
    let s = s
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let s = s.trim_matches(|c: char| !c.is_alphanumeric());
    let s = ["a ", "an ", "the "]
        .iter()
        .find_map(|a| s.strip_prefix(a))
        .unwrap_or(s);
    s.to_string()
}

impl MetaSchema {
    pub fn field_names(&self) -> Vec<&str> {
        self.fields.iter().map(|f| f.name.as_str()).collect()
    }

    /// Maps a free-text document type onto the taxonomy: an exact name or alias (singular or
    /// plural), else the longest name or alias contained in it as whole words, else the
    /// most similar name or alias (Jaro–Winkler ≥ 0.92); otherwise `other`.
    pub fn map_document_type(&self, raw: &str) -> String {
        let key = type_key(raw);
        if key.is_empty() {
            return "other".into();
        }
        let singular = key.strip_suffix('s').unwrap_or(&key).to_string();
        let names = self.document_types.iter().flat_map(|t| {
            std::iter::once(&t.name)
                .chain(&t.aliases)
                .map(move |a| (t, type_key(a)))
        });
        let mut contained: Option<(usize, &str)> = None;
        let mut similar: Option<(f64, &str)> = None;
        let padded = format!(" {key} ");
        for (t, alias) in names {
            if alias == key || alias == singular {
                return t.name.clone();
            }
            let inside =
                padded.contains(&format!(" {alias} ")) || padded.contains(&format!(" {alias}s "));
            if inside && contained.is_none_or(|(n, _)| alias.len() > n) {
                contained = Some((alias.len(), &t.name));
            }
            let sim = strsim::jaro_winkler(&alias, &key);
            if similar.is_none_or(|(s, _)| sim > s) {
                similar = Some((sim, &t.name));
            }
        }
        if let Some((_, name)) = contained {
            return name.to_string();
        }
        match similar {
            Some((s, name)) if s >= 0.92 => name.to_string(),
            _ => "other".into(),
        }
    }
}
