//! A training recipe (`configs/train/*.toml`).

use crate::config::load_validated;
use crate::stage2::config::TooLongPolicy;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

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
            targets: crate::engine::llama::tensors::PROJECTIONS
                .map(String::from)
                .to_vec(),
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
    /// With `checkpoint_layers`: tokens per MLP tile, forward and backward (ALST's tiled
    /// MLP: no `(tokens, intermediate)` tensor exists whole); 0 = the whole row.
    pub mlp_tile: usize,
    /// With `checkpoint_layers` on CUDA: keep the layer inputs in host memory, copied back
    /// one layer at a time in the backward pass (no effect on the CPU).
    pub offload_checkpoints: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            checkpoint_layers: false,
            attention_block: 128,
            loss_chunk: 512,
            mlp_tile: 4096,
            offload_checkpoints: false,
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
    pub const BUILTIN: &'static str = include_str!("../../configs/train/smollm2-cpu.toml");

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
            crate::engine::llama::tensors::check_lora_targets(&l.targets)
                .context("lora.targets")?;
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
