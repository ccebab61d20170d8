//! The local engine's settings ([`EngineConfig`], `configs/engine-cpu.toml`) and what one
//! request asks of it ([`GenerationParams`], [`SamplingParams`]).

use crate::config::load_validated;
use crate::engine::weights::WeightFormat;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

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
    /// Tokens one forward pass carries at most: the decoding rows' next tokens and, in the
    /// rest, chunks of new prompts (long prompts are prefilled in chunks of this size).
    pub prefill_chunk: usize,
    /// Requests decoded together (continuous batching: a finished row is refilled at once).
    pub max_batch: usize,
    /// Memory for the paged KV cache, GiB; default: what `max_batch` rows of the full context
    /// need, at most half the host's available memory (90% of free device memory on CUDA).
    pub kv_cache_gib: Option<f64>,
    /// Memory a load may use (weights, KV cache, working memory), GiB; default: what the
    /// device has free. A model that will not fit is refused before loading.
    pub memory_gib: Option<f64>,
    /// Tokens per KV-cache block (the unit of allocation and of prefix caching).
    pub block_size: usize,
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
    /// Extra variables every chat-template rendering sees, as HF's `apply_chat_template`
    /// kwargs and vLLM's `chat_template_kwargs` (Qwen3: `enable_thinking = false`).
    pub chat_template_kwargs: toml::Table,
}

impl EngineConfig {
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        Self::load(Some(path), &[])
    }

    /// A file (or the defaults) with `KEY=VALUE` overrides (the CLI's flags), validated.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Self> {
        load_validated(path, "", sets, Self::validate)
    }

    pub fn validate(&self) -> Result<()> {
        if self.prefill_chunk == 0 {
            anyhow::bail!("prefill_chunk (--prefill-chunk) must be at least 1");
        }
        if self.max_batch == 0 {
            anyhow::bail!("max_batch (--batch-size) must be at least 1");
        }
        if !(1..=1024).contains(&self.block_size) {
            anyhow::bail!(
                "block_size must be between 1 and 1024 tokens, got {}",
                self.block_size
            );
        }
        if let Some(g) = self.kv_cache_gib {
            if !(g.is_finite() && g > 0.0) {
                anyhow::bail!("kv_cache_gib must be a positive number of GiB, got {g}");
            }
        }
        if let Some(g) = self.memory_gib {
            if !(g.is_finite() && g > 0.0) {
                anyhow::bail!(
                    "memory_gib (--memory-gib) must be a positive number of GiB, got {g}"
                );
            }
        }
        check_threads(self.threads).context("threads")?;
        Ok(())
    }
}

/// Most threads accepted per logical CPU: more only oversubscribes, and far more cannot
/// even be started (each thread needs a stack).
const THREADS_PER_CPU: usize = 4;

/// A CPU thread count the machine can run: 0 (all physical cores) up to
/// [`THREADS_PER_CPU`] per logical CPU.
pub fn check_threads(n: usize) -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = THREADS_PER_CPU * cpus;
    if n > max {
        anyhow::bail!(
            "{n} threads is more than {THREADS_PER_CPU} per logical CPU of this machine ({cpus} CPUs, so at most {max}); 0 uses every physical core"
        );
    }
    Ok(())
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            prefill_chunk: 512,
            max_batch: 16,
            kv_cache_gib: None,
            memory_gib: None,
            block_size: 16,
            weight_format: WeightFormat::default(),
            dtype: "f32".into(),
            rope_theta: None,
            max_context: None,
            threads: 0,
            device: "cpu".into(),
            fast_forward: true,
            chat_template_kwargs: toml::Table::new(),
        }
    }
}
