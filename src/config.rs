//! Every configuration type of the project, in one place. TOML files deserialize into these
//! with unknown keys rejected; the CLI fills the same types.

use crate::engine::weights::WeightFormat;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Reads a TOML config; unknown keys are errors that list the accepted ones.
pub fn from_toml_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Reads a TOML config (a file, or the built-in text when `path` is `None`) and applies
/// `--set key.sub=value` overrides before deserializing, so that overridden keys are
/// checked like the file's own (unknown keys are errors listing the accepted ones). A value
/// that is not valid TOML is taken as a string (`--set graph.weight=npmi`).
pub fn from_toml_with_overrides<T: serde::de::DeserializeOwned>(
    path: Option<&Path>,
    builtin: &str,
    sets: &[String],
) -> Result<T> {
    let (name, text) = match path {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        ),
        None => ("built-in config".to_string(), builtin.to_string()),
    };
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    apply_sets(&mut table, sets)?;
    let what = if sets.is_empty() {
        name
    } else {
        format!("{name} with --set {}", sets.join(" "))
    };
    T::deserialize(toml::Value::Table(table)).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

/// Applies `--set key.sub=value` overrides to a parsed TOML table. A value that is not
/// valid TOML is taken as a string (`--set graph.weight=npmi`).
pub fn apply_sets(table: &mut toml::Table, sets: &[String]) -> Result<()> {
    for set in sets {
        let (key, raw) = set
            .split_once('=')
            .with_context(|| format!("--set {set:?}: expected KEY=VALUE"))?;
        let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut t) => t.remove("v").expect("parsed above"),
            Err(_) => toml::Value::String(raw.to_string()),
        };
        let parts: Vec<&str> = key.trim().split('.').collect();
        let (last, parents) = parts.split_last().expect("split yields one part");
        let mut cur = &mut *table;
        for p in parents {
            cur = cur
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .with_context(|| format!("--set {key}: {p} is not a table"))?;
        }
        cur.insert(last.to_string(), value);
    }
    Ok(())
}

/// [`from_toml_with_overrides`], then `validate`, with the file named in its error.
fn load_validated<T: serde::de::DeserializeOwned>(
    path: Option<&Path>,
    builtin: &str,
    sets: &[String],
    validate: impl Fn(&T) -> Result<()>,
) -> Result<T> {
    let c: T = from_toml_with_overrides(path, builtin, sets)?;
    let name = path.map_or("built-in config".into(), |p| p.display().to_string());
    validate(&c).with_context(|| name)?;
    Ok(c)
}

/// How one continuation is sampled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// > 1 discourages repeating the last 64 generated tokens (HF `repetition_penalty`).
    pub repetition_penalty: Option<f64>,
}

impl SamplingParams {
    /// Rejects values the samplers cannot honour.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            anyhow::bail!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            );
        }
        if self.top_k == Some(0) {
            anyhow::bail!("top_k must be at least 1");
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                anyhow::bail!("top_p must be in (0, 1], got {p}");
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                anyhow::bail!("repetition_penalty must be a finite number > 0, got {r}");
            }
        }
        Ok(())
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 42,
            repetition_penalty: None,
        }
    }
}

/// What to generate for one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these (the stop string is cut off).
    pub stop: Vec<String>,
    /// Extra token ids that end generation, besides the tokenizer's EOS set.
    pub eos_token_ids: Vec<u32>,
    /// Constrain the output to JSON matching this schema.
    pub json_schema: Option<serde_json::Value>,
    /// Keep generating past EOS tokens (benchmarks).
    pub ignore_eos: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: vec![],
            eos_token_ids: vec![],
            json_schema: None,
            ignore_eos: false,
        }
    }
}

/// How the local engine runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Prompt tokens per prefill step (long prompts are prefilled in chunks of this size).
    pub prefill_chunk: usize,
    /// Rows decoded together.
    pub max_batch: usize,
    /// In-memory format of GGUF weights.
    pub weight_format: WeightFormat,
    /// Compute dtype for safetensors checkpoints: f32, f16 or bf16.
    pub dtype: String,
    /// Overrides the checkpoint's rope_theta.
    pub rope_theta: Option<f64>,
    /// Longest prompt + generation accepted; defaults to the model's context length
    /// (times the RoPE scaling factor when one is configured).
    pub max_context: Option<usize>,
    /// CPU threads (0 = candle's default: all physical cores).
    pub threads: usize,
    /// `cpu`, `cuda[:N]` or `metal[:N]`.
    pub device: String,
    /// Feed the tokens a JSON schema forces (keys, punctuation) in one forward pass; false
    /// runs one pass per forced token (the reference the fast path is tested against).
    pub fast_forward: bool,
}

impl EngineConfig {
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let c: Self = from_toml_file(path)?;
        c.validate().with_context(|| path.display().to_string())?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if self.prefill_chunk == 0 || self.max_batch == 0 {
            anyhow::bail!("prefill_chunk and max_batch must be at least 1");
        }
        Ok(())
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            prefill_chunk: 512,
            max_batch: 16,
            weight_format: WeightFormat::default(),
            dtype: "f32".into(),
            rope_theta: None,
            max_context: None,
            threads: 0,
            device: "cpu".into(),
            fast_forward: true,
        }
    }
}

/// `wildlong eval ruler` settings: the task table (the shape of RULER's `synthetic.yaml`),
/// lengths, samples and seed. `configs/eval/ruler.toml` is the default, compiled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulerConfig {
    /// Total tokens per sample (input + tokens to generate), e.g. 4096, 8192, ….
    pub lengths: Vec<usize>,
    /// Samples per task per length.
    pub samples: usize,
    pub seed: u64,
    /// SQuAD v2 JSON (local path or `hf://datasets/OWNER/NAME/FILE`); the built-in set when absent.
    #[serde(default)]
    pub qa_squad: Option<String>,
    /// HotpotQA JSON (distractor setting), local path or `hf://…`; the built-in set when absent.
    #[serde(default)]
    pub qa_hotpotqa: Option<String>,
    /// Task name → generator and its arguments.
    pub tasks: std::collections::BTreeMap<String, RulerGenerator>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HaystackKind {
    /// "The grass is green. The sky is blue. …" repeated.
    Noise,
    /// Real prose (see src/eval/ruler/data/SOURCES.md).
    Essay,
    /// Distractor needles with other keys.
    Needle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NeedleKind {
    /// Seven-digit numbers.
    Numbers,
    /// Adjective-noun pairs.
    Words,
    /// UUID v4 strings.
    Uuids,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QaDataset {
    Squad,
    Hotpotqa,
}

/// One RULER task instance: a generator (`scripts/data/synthetic/*.py`) and its arguments;
/// `tokens_to_generate` overrides RULER's default (niah 128, vt 30, cwe 120, fwe 50, qa 32).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "snake_case", deny_unknown_fields)]
pub enum RulerGenerator {
    Niah {
        type_haystack: HaystackKind,
        type_needle_k: NeedleKind,
        type_needle_v: NeedleKind,
        num_needle_k: usize,
        num_needle_v: usize,
        num_needle_q: usize,
        /// Overrides RULER's default tokens to generate.
        #[serde(default)]
        tokens_to_generate: Option<usize>,
    },
    VariableTracking {
        type_haystack: HaystackKind,
        num_chains: usize,
        num_hops: usize,
        /// Overrides RULER's default tokens to generate.
        #[serde(default)]
        tokens_to_generate: Option<usize>,
    },
    CommonWordsExtraction {
        freq_cw: usize,
        freq_ucw: usize,
        num_cw: usize,
        /// Overrides RULER's default tokens to generate.
        #[serde(default)]
        tokens_to_generate: Option<usize>,
    },
    FreqWordsExtraction {
        alpha: f64,
        #[serde(default = "default_coded_wordlen")]
        coded_wordlen: usize,
        /// Overrides RULER's default tokens to generate.
        #[serde(default)]
        tokens_to_generate: Option<usize>,
    },
    Qa {
        dataset: QaDataset,
        /// Overrides RULER's default tokens to generate.
        #[serde(default)]
        tokens_to_generate: Option<usize>,
    },
}

impl RulerGenerator {
    pub fn tokens_to_generate_override(&self) -> Option<usize> {
        match self {
            Self::Niah {
                tokens_to_generate, ..
            }
            | Self::VariableTracking {
                tokens_to_generate, ..
            }
            | Self::CommonWordsExtraction {
                tokens_to_generate, ..
            }
            | Self::FreqWordsExtraction {
                tokens_to_generate, ..
            }
            | Self::Qa {
                tokens_to_generate, ..
            } => *tokens_to_generate,
        }
    }
}

fn default_coded_wordlen() -> usize {
    6
}

impl RulerConfig {
    /// The default task table, lengths and seed (`configs/eval/ruler.toml`).
    pub fn builtin() -> Self {
        toml::from_str(include_str!("../configs/eval/ruler.toml"))
            .expect("configs/eval/ruler.toml is valid (checked by tests)")
    }

    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let c: Self = from_toml_file(path)?;
        c.validate()
            .with_context(|| format!("{}", path.display()))?;
        Ok(c)
    }

    /// Keeps only the named tasks (none named = all); an unknown name is an error listing the known.
    pub fn select(&mut self, wanted: &[&str]) -> Result<()> {
        if wanted.is_empty() {
            return Ok(());
        }
        for w in wanted {
            if !self.tasks.contains_key(*w) {
                let known: Vec<&str> = self.tasks.keys().map(String::as_str).collect();
                anyhow::bail!("unknown task `{w}` (known: {})", known.join(", "));
            }
        }
        self.tasks.retain(|k, _| wanted.contains(&k.as_str()));
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        if self.lengths.is_empty() || self.lengths.contains(&0) {
            anyhow::bail!("lengths must be a non-empty list of positive token counts");
        }
        if self.samples == 0 {
            anyhow::bail!("samples must be at least 1");
        }
        for (name, t) in &self.tasks {
            let bad = |what: &str| anyhow::anyhow!("task `{name}`: {what}");
            match t {
                RulerGenerator::Niah {
                    num_needle_k,
                    num_needle_v,
                    num_needle_q,
                    ..
                } => {
                    if *num_needle_k == 0 || *num_needle_v == 0 || *num_needle_q == 0 {
                        return Err(bad("num_needle_k/v/q must be at least 1"));
                    }
                }
                RulerGenerator::VariableTracking {
                    type_haystack,
                    num_chains,
                    num_hops,
                    ..
                } => {
                    if *num_chains == 0 || *num_hops == 0 {
                        return Err(bad("num_chains and num_hops must be at least 1"));
                    }
                    if *type_haystack == HaystackKind::Needle {
                        return Err(bad("variable tracking takes a noise or essay haystack"));
                    }
                }
                RulerGenerator::CommonWordsExtraction {
                    freq_cw,
                    freq_ucw,
                    num_cw,
                    ..
                } => {
                    if *num_cw == 0 || freq_cw <= freq_ucw {
                        return Err(bad("needs num_cw >= 1 and freq_cw > freq_ucw"));
                    }
                }
                RulerGenerator::FreqWordsExtraction {
                    alpha,
                    coded_wordlen,
                    ..
                } => {
                    if alpha.is_nan() || *alpha <= 1.0 || *coded_wordlen < 2 {
                        return Err(bad(
                            "needs alpha > 1 (zeta distribution) and coded_wordlen >= 2",
                        ));
                    }
                }
                RulerGenerator::Qa { .. } => {}
            }
            if t.tokens_to_generate_override() == Some(0) {
                return Err(bad("tokens_to_generate must be at least 1"));
            }
        }
        Ok(())
    }
}

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
    pub const BUILTIN: &'static str = include_str!("../configs/stage1.toml");

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
        toml::from_str(include_str!("../configs/stage1/meta_schema.toml"))
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

/// One worker's share of the work (`--shard k/n`, k in 1..=n): items whose index mod n is k − 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self { index: 1, count: 1 }
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| format!("expected k/n (e.g. 2/8), got {s:?}"))?;
        let k: usize = k
            .trim()
            .parse()
            .map_err(|_| format!("bad shard index {k:?}"))?;
        let n: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("bad shard count {n:?}"))?;
        if n == 0 || k == 0 || k > n {
            return Err(format!("shard {k}/{n}: k must be in 1..={n}"));
        }
        Ok(Self { index: k, count: n })
    }
}

impl Shard {
    /// The whole input: 1/1.
    pub fn whole() -> Self {
        Self { index: 1, count: 1 }
    }

    pub fn owns(&self, i: usize) -> bool {
        i % self.count == self.index - 1
    }

    /// File-name suffix: empty for 1/1, else `.shard-k-of-n`.
    pub fn suffix(&self) -> String {
        if self.count == 1 {
            String::new()
        } else {
            format!(".shard-{}-of-{}", self.index, self.count)
        }
    }
}

/// An OpenAI-compatible chat-completions server used instead of the local engine (vLLM,
/// SGLang, llama.cpp's server, or a hosted API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// Base URL up to and including `/v1`, e.g. `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// The model name the server expects.
    pub model: String,
    /// Environment variable holding the API key (sent as a bearer token when set).
    pub api_key_env: String,
    /// Seconds one request may take before it is retried.
    pub timeout_s: f64,
    /// Retries after a timeout, a connection error, HTTP 429 or 5xx (other errors fail at once).
    pub max_retries: usize,
    /// First wait between retries, doubled each time.
    pub retry_backoff_s: f64,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// How a JSON schema is sent: `json_schema` (OpenAI, vLLM, SGLang, llama.cpp's
    /// llama-server) or `json_object` (`{"type": "json_object", "schema": …}`, llama-cpp-python).
    pub json_format: JsonFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum JsonFormat {
    JsonSchema,
    JsonObject,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            base_url: String::new(),
            model: String::new(),
            api_key_env: "OPENAI_API_KEY".into(),
            timeout_s: 600.0,
            max_retries: 3,
            retry_backoff_s: 1.0,
            concurrency: 8,
            json_format: JsonFormat::JsonSchema,
        }
    }
}

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
    pub const BUILTIN: &'static str = include_str!("../configs/stage2.toml");

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

/// A training recipe (`configs/train/*.toml`), read top to bottom by `wildlong train`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// The base model: `default`, a GGUF file, an HF folder or a Hub id.
    pub model: String,
    pub method: TrainMethod,
    /// Frozen base weights in memory: `f32` or `bf16` (adapters, gradients and optimizer
    /// state are always f32).
    #[serde(default = "default_base_dtype")]
    pub base_dtype: String,
    /// Seeds the data order, the evaluation split, adapter initialisation and dropout.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub data: TrainDataConfig,
    #[serde(default)]
    pub lora: LoraConfig,
    #[serde(default)]
    pub rope: RopeSettings,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default)]
    pub export: ExportConfig,
}

fn default_base_dtype() -> String {
    "f32".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainMethod {
    /// Adapters on the chosen projections; the base stays frozen.
    Lora,
    /// Every weight trains.
    Full,
}

/// What is read and how it is cut into rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainDataConfig {
    /// `messages` JSONL files; empty = `<run>/stage2/data.jsonl`.
    pub paths: Vec<String>,
    /// Tokens per row.
    pub max_length: usize,
    /// Pack several conversations into each row (positions restart and attention stays
    /// inside each conversation); false = one conversation per row, padded.
    pub packing: bool,
    /// Conversations longer than `max_length`: skipped and counted, or cut.
    pub too_long: TooLongPolicy,
    /// Share of conversations held out for the evaluation loss (by a seeded hash).
    pub eval_fraction: f64,
    /// At most this many held-out conversations.
    pub max_eval: usize,
}

impl Default for TrainDataConfig {
    fn default() -> Self {
        Self {
            paths: vec![],
            max_length: 1024,
            packing: true,
            too_long: TooLongPolicy::Skip,
            eval_fraction: 0.1,
            max_eval: 64,
        }
    }
}

/// LoRA adapters (`method = "lora"`); the adapter path is scaled by `alpha / rank`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Projections: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            targets: crate::train::model::PROJECTIONS.map(String::from).to_vec(),
        }
    }
}

/// RoPE settings training applies (and writes into its outputs); unset keys keep the
/// checkpoint's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RopeSettings {
    pub theta: Option<f64>,
    /// E.g. `{ rope_type = "linear", factor = 4.0 }`, `{ rope_type = "yarn", factor = 4.0,
    /// original_max_position_embeddings = 32768 }`, `{ rope_type = "llama3", factor = 8.0,
    /// low_freq_factor = 1.0, high_freq_factor = 4.0, original_max_position_embeddings = 8192 }`,
    /// `{ rope_type = "dynamic", factor = 2.0 }` or `{ rope_type = "default" }`.
    pub scaling: Option<crate::engine::rope::RopeScaling>,
    /// The checkpoint's original context (threshold of `dynamic`).
    pub max_position_embeddings: Option<usize>,
}

impl RopeSettings {
    pub fn is_set(&self) -> bool {
        self.theta.is_some() || self.scaling.is_some() || self.max_position_embeddings.is_some()
    }

    /// These settings over a checkpoint's RoPE (None when none is set).
    pub fn over(
        &self,
        base: &crate::engine::rope::RopeConfig,
    ) -> Option<crate::engine::rope::RopeRecord> {
        self.is_set().then(|| crate::engine::rope::RopeRecord {
            rope_theta: self.theta.unwrap_or(base.theta),
            rope_scaling: self.scaling.clone().unwrap_or_else(|| base.scaling.clone()),
            max_position_embeddings: self
                .max_position_embeddings
                .unwrap_or(base.max_position_embeddings),
        })
    }
}

/// AdamW and the learning-rate schedule (linear warm-up, cosine decay to a floor).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub warmup_steps: usize,
    /// The cosine ends at `lr · min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// Global-norm clipping; 0 = off.
    pub max_grad_norm: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            max_grad_norm: 1.0,
        }
    }
}

/// How long, in what steps, and when to evaluate and checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// Optimizer steps; 0 = as many as `epochs` passes over the rows take.
    pub steps: usize,
    pub epochs: usize,
    /// Rows per forward pass.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step (the loss is the token mean over all of them).
    pub grad_accum: usize,
    /// Evaluation loss every this many steps (and at the end); 0 = only at the end.
    pub eval_every: usize,
    /// Checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
    /// Checkpoints kept (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Stop (with a checkpoint) once more than this many steps had non-finite gradients.
    pub max_bad_steps: usize,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            steps: 0,
            epochs: 1,
            micro_batch: 1,
            grad_accum: 1,
            eval_every: 0,
            checkpoint_every: 50,
            keep_checkpoints: 2,
            max_bad_steps: 5,
        }
    }
}

/// Memory/speed trade-offs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Keep only each layer's input and recompute the layer in the backward pass.
    pub checkpoint_layers: bool,
    /// Query rows per attention block (attention memory is `block × length` per head).
    pub attention_block: usize,
    /// Rows of logits computed at a time by the loss.
    pub loss_chunk: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            checkpoint_layers: false,
            attention_block: 256,
            loss_chunk: 512,
        }
    }
}

/// What is written when training ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// The PEFT adapter folder (`<run>/train/adapter`; LoRA only).
    pub peft: bool,
    /// The merged model as HF safetensors + config.json (`<run>/train/merged`; always for
    /// full fine-tuning).
    pub merged: bool,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            peft: true,
            merged: false,
        }
    }
}

impl TrainConfig {
    pub const BUILTIN: &'static str = include_str!("../configs/train/smollm2-cpu.toml");

    /// A recipe (or the built-in CPU recipe) with `--set` overrides, validated.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Self> {
        load_validated(path, Self::BUILTIN, sets, Self::validate)
    }

    pub fn validate(&self) -> Result<()> {
        use anyhow::bail;
        if !matches!(self.base_dtype.as_str(), "f32" | "bf16") {
            bail!(
                "base_dtype must be \"f32\" or \"bf16\", got {:?}",
                self.base_dtype
            );
        }
        let d = &self.data;
        if d.max_length < 8 {
            bail!("data.max_length must be at least 8 tokens");
        }
        if !(0.0..1.0).contains(&d.eval_fraction) {
            bail!("data.eval_fraction must be in [0, 1)");
        }
        let l = &self.lora;
        if self.method == TrainMethod::Lora {
            if l.rank == 0 || l.alpha.is_nan() || l.alpha <= 0.0 {
                bail!("lora.rank and lora.alpha must be positive");
            }
            if !(0.0..1.0).contains(&l.dropout) {
                bail!("lora.dropout must be in [0, 1)");
            }
            if l.targets.is_empty() {
                bail!("lora.targets is empty");
            }
            let known = crate::train::model::PROJECTIONS;
            if let Some(t) = l.targets.iter().find(|t| !known.contains(&t.as_str())) {
                bail!(
                    "lora.targets: unknown projection `{t}` (known: {})",
                    known.join(", ")
                );
            }
        }
        let o = &self.optim;
        if o.lr.is_nan()
            || o.lr <= 0.0
            || !(0.0..=1.0).contains(&o.min_lr_ratio)
            || o.max_grad_norm < 0.0
        {
            bail!(
                "optim.lr must be positive, optim.min_lr_ratio in [0, 1], optim.max_grad_norm ≥ 0"
            );
        }
        let s = &self.schedule;
        if s.steps == 0 && s.epochs == 0 {
            bail!("set schedule.steps or schedule.epochs");
        }
        if s.micro_batch == 0
            || s.grad_accum == 0
            || s.checkpoint_every == 0
            || s.keep_checkpoints == 0
        {
            bail!("schedule.micro_batch, grad_accum, checkpoint_every and keep_checkpoints must be ≥ 1");
        }
        if self.memory.attention_block == 0 || self.memory.loss_chunk == 0 {
            bail!("memory.attention_block and memory.loss_chunk must be ≥ 1");
        }
        Ok(())
    }
}

/// `wildlong run CONFIG`: every stage in order into one run folder (`configs/demo.toml`).
/// `[stage1]`, `[stage2]` and `[train]` take the keys of their own config files; a
/// `config = "PATH"` key in one of them starts from that file instead of the built-in
/// defaults, and the section's other keys override it. Paths are relative to the
/// directory `wildlong` runs in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub run: PipelineRunConfig,
    /// The local engine for generation and evaluation (keys of `configs/engine-cpu.toml`).
    #[serde(default)]
    pub engine: EngineConfig,
    /// Stage 1 and 2 generation on an OpenAI-compatible server instead of the local engine
    /// (`run.generator` is then the server's model name).
    #[serde(default)]
    pub server: Option<OpenAiConfig>,
    pub stage1: Stage1Config,
    pub stage2: Stage2Config,
    pub train: TrainConfig,
    pub eval: PipelineEvalConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineRunConfig {
    /// The run folder: `stage1/`, `stage2/`, `train/`, `eval/`, `pipeline/`, `report.md`.
    pub dir: std::path::PathBuf,
    /// The model that extracts, writes blueprints and synthesizes (a models spec, or the
    /// server's model name with `[server]`).
    pub generator: String,
    /// With `[server]`: the local model whose tokenizer and chat template measure prompts.
    pub tokenizer: String,
}

impl Default for PipelineRunConfig {
    fn default() -> Self {
        Self {
            dir: "runs/demo".into(),
            generator: "default".into(),
            tokenizer: "default".into(),
        }
    }
}

/// RULER before and after fine-tuning: the base model (`train.model`), then the base with
/// the trained adapter (or the merged model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineEvalConfig {
    pub lengths: Vec<usize>,
    /// Task names; empty = every task of the table.
    pub tasks: Vec<String>,
    pub samples: usize,
    pub seed: u64,
    /// Another task table [default: configs/eval/ruler.toml, built in].
    pub tasks_config: Option<std::path::PathBuf>,
    pub qa_squad: Option<String>,
    pub qa_hotpotqa: Option<String>,
    /// Render prompts with the model's chat template (RULER's `base` template otherwise).
    pub chat: bool,
    /// Cache of generated samples, shared across runs.
    pub cache_dir: std::path::PathBuf,
}

impl Default for PipelineEvalConfig {
    fn default() -> Self {
        Self {
            lengths: vec![4096, 8192],
            tasks: Vec::new(),
            samples: 20,
            seed: 42,
            tasks_config: None,
            qa_squad: None,
            qa_hotpotqa: None,
            chat: true,
            cache_dir: "runs/cache/ruler".into(),
        }
    }
}

impl PipelineEvalConfig {
    /// The task table with this section's selection applied, validated.
    pub fn ruler(&self) -> Result<RulerConfig> {
        let mut c = match &self.tasks_config {
            Some(p) => RulerConfig::from_toml_file(p)?,
            None => RulerConfig::builtin(),
        };
        c.lengths = self.lengths.clone();
        c.samples = self.samples;
        c.seed = self.seed;
        if self.qa_squad.is_some() {
            c.qa_squad = self.qa_squad.clone();
        }
        if self.qa_hotpotqa.is_some() {
            c.qa_hotpotqa = self.qa_hotpotqa.clone();
        }
        c.select(&self.tasks.iter().map(String::as_str).collect::<Vec<_>>())
            .context("eval.tasks")?;
        c.validate().context("[eval]")?;
        Ok(c)
    }
}

impl PipelineConfig {
    /// Reads a pipeline file with `--set` overrides (e.g. `train.schedule.steps=4`), resolves
    /// each section's `config = "PATH"` base, and validates every stage's settings.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {name}"))?;
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        apply_sets(&mut table, sets)?;
        for (section, builtin) in [
            ("stage1", Stage1Config::BUILTIN),
            ("stage2", Stage2Config::BUILTIN),
            ("train", TrainConfig::BUILTIN),
        ] {
            let mut own = match table.remove(section) {
                Some(toml::Value::Table(t)) => t,
                Some(_) => anyhow::bail!("{name}: `{section}` must be a table"),
                None => toml::Table::new(),
            };
            let mut base: toml::Table = match own.remove("config") {
                Some(toml::Value::String(p)) => {
                    let t = std::fs::read_to_string(&p)
                        .with_context(|| format!("{name}: {section}.config: reading {p}"))?;
                    toml::from_str(&t).map_err(|e| anyhow::anyhow!("{p}: {e}"))?
                }
                Some(_) => anyhow::bail!("{name}: {section}.config must be a path"),
                None => toml::from_str(builtin).expect("built-in configs parse (tested)"),
            };
            merge_tables(&mut base, own);
            table.insert(section.into(), toml::Value::Table(base));
        }
        let what = match sets.is_empty() {
            true => name.clone(),
            false => format!("{name} with --set {}", sets.join(" ")),
        };
        let c: Self = Self::deserialize(toml::Value::Table(table))
            .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        c.stage1
            .validate()
            .with_context(|| format!("{what}: [stage1]"))?;
        c.stage2
            .validate()
            .with_context(|| format!("{what}: [stage2]"))?;
        c.train
            .validate()
            .with_context(|| format!("{what}: [train]"))?;
        c.eval.ruler().with_context(|| what.clone())?;
        c.engine
            .validate()
            .with_context(|| format!("{what}: [engine]"))?;
        if c.server.as_ref().is_some_and(|s| s.base_url.is_empty()) {
            anyhow::bail!("{what}: server.base_url is empty");
        }
        Ok(c)
    }
}

/// Deep merge: `over`'s keys replace `base`'s, tables merged key by key.
fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}
