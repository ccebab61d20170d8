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

/// How one continuation is sampled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
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
        if c.prefill_chunk == 0 || c.max_batch == 0 {
            anyhow::bail!(
                "{}: prefill_chunk and max_batch must be at least 1",
                path.display()
            );
        }
        Ok(c)
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
