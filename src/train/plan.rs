//! `wildlong train --plan`: the peak memory and tokens per step a recipe needs, predicted
//! from the model's shape before any weight is read, checked against a device's memory.
//!
//! The model counts what the trainer holds: frozen weights (base dtype; norms and `lm_head`
//! f32), trained tensors with their gradient, accumulated gradient and AdamW moments (f32,
//! 24 bytes per parameter at the optimizer update), the activations autograd keeps (every
//! layer's, or with layer checkpointing each layer's input plus one recomputed layer), the
//! largest transient buffer (an attention block's scores or a loss chunk's logits) and a fixed
//! runtime allowance. The activation count follows the ops of `model.rs` tensor by tensor;
//! `benches/train.sh` prints the prediction beside the measured peak RSS.

use crate::engine::llama::Config;
use crate::train::config::{TrainConfig, TrainMethod};
use anyhow::Result;
use serde::{Deserialize, Serialize};

const GIB: f64 = (1u64 << 30) as f64;
/// Runtime, tokenizer, data and allocator slack.
const OVERHEAD_BYTES: f64 = 0.4 * GIB;

/// A prediction, in bytes unless named otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub parameters: usize,
    pub trainable_parameters: usize,
    pub tokens_per_micro_batch: usize,
    pub tokens_per_step: usize,
    pub weights_bytes: f64,
    pub trainable_state_bytes: f64,
    pub activation_bytes: f64,
    pub transient_bytes: f64,
    pub overhead_bytes: f64,
    pub peak_bytes: f64,
}

impl Plan {
    pub fn peak_gib(&self) -> f64 {
        self.peak_bytes / GIB
    }

    /// Predicts `tc` on a model shaped `c`.
    pub fn estimate(c: &Config, tc: &TrainConfig) -> Self {
        let (h, i, l, v) = (
            c.hidden_size as f64,
            c.intermediate_size as f64,
            c.num_layers as f64,
            c.vocab_size as f64,
        );
        let (nh, kvh, hd) = (c.num_heads as f64, c.num_kv_heads as f64, c.head_dim as f64);
        let full = tc.method == TrainMethod::Full;
        let lora = tc.method == TrainMethod::Lora;
        let base = if tc.base_dtype == "bf16" { 2.0 } else { 4.0 };
        let targeted = |p: &str| lora && tc.lora.targets.iter().any(|t| t == p);
        let r = tc.lora.rank as f64;
        // (name, in, out) of the seven projections.
        let projections = [
            ("q_proj", h, nh * hd),
            ("k_proj", h, kvh * hd),
            ("v_proj", h, kvh * hd),
            ("o_proj", nh * hd, h),
            ("gate_proj", h, i),
            ("up_proj", h, i),
            ("down_proj", i, h),
        ];
        let proj_params: f64 = projections.iter().map(|(_, a, b)| a * b).sum();
        let embed = v * h;
        let head = if c.tie_word_embeddings { 0.0 } else { v * h };
        let norms = l * 2.0 * h + h;
        let parameters = l * proj_params + embed + head + norms;
        let adapter: f64 = projections
            .iter()
            .filter(|(p, _, _)| targeted(p))
            .map(|(_, a, b)| r * (a + b))
            .sum::<f64>()
            * l;
        let trainable = if full { parameters } else { adapter };
        let weights_bytes = if full {
            0.0 // the weights are the trained variables, counted below
        } else {
            l * proj_params * base + embed * base + head * 4.0 + norms * 4.0
                // a tied lm_head over bf16 embeddings keeps an f32 copy
                + if c.tie_word_embeddings && base < 4.0 { embed * 4.0 } else { 0.0 }
        };
        // Variable + micro-batch gradient + accumulated sum + the averaged copy + two moments.
        let trainable_state_bytes = trainable * 4.0 * 6.0;

        // Activations autograd keeps per token of one layer (f32 values).
        // The fused LoRA op keeps its output only (its input is kept anyway; the rank-r
        // product and the dropout mask are recomputed), as a plain projection does.
        let mut per_token: f64 = projections.iter().map(|(_, _, out)| out).sum();
        // Norm outputs, residual sums and the layer input; head copies, RoPE outputs,
        // attention output and its transposed copy; SiLU and the gated product.
        per_token += 5.0 * h + 4.0 * nh * hd + 3.0 * kvh * hd + 2.0 * i;
        let t = tc.data.max_length as f64;
        let tokens = tc.schedule.micro_batch as f64 * t;
        let layer = per_token * 4.0 * tokens;
        let activation_bytes = if tc.memory.checkpoint_layers {
            // Inputs of every layer, one recomputed layer and its gradients.
            l * h * 4.0 * tokens + 2.0 * layer
        } else {
            // Every layer, plus the gradients of the layer being differentiated.
            l * layer + layer
        };
        let block = (tc.memory.attention_block as f64).min(t);
        let attention = tc.schedule.micro_batch as f64 * nh * block * t * 4.0 * 3.0;
        let loss = (tc.memory.loss_chunk as f64).min(tokens) * v * 4.0 * 2.0;
        let transient_bytes = attention.max(loss);
        let peak_bytes = weights_bytes
            + trainable_state_bytes
            + activation_bytes
            + transient_bytes
            + OVERHEAD_BYTES;
        Self {
            parameters: parameters as usize,
            trainable_parameters: trainable as usize,
            tokens_per_micro_batch: tokens as usize,
            tokens_per_step: tokens as usize * tc.schedule.grad_accum,
            weights_bytes,
            trainable_state_bytes,
            activation_bytes,
            transient_bytes,
            overhead_bytes: OVERHEAD_BYTES,
            peak_bytes,
        }
    }

    /// A human-readable table.
    pub fn render(&self, memory_gib: Option<f64>) -> String {
        let g = |b: f64| format!("{:.2} GiB", b / GIB);
        let mut s = format!(
            "parameters            {:>14}\ntrainable parameters  {:>14}\ntokens per micro-batch {:>13}\ntokens per step       {:>14}\nfrozen weights        {:>14}\ntrained state         {:>14}\nactivations           {:>14}\nlargest transient     {:>14}\nruntime allowance     {:>14}\npredicted peak        {:>14}\n",
            self.parameters,
            self.trainable_parameters,
            self.tokens_per_micro_batch,
            self.tokens_per_step,
            g(self.weights_bytes),
            g(self.trainable_state_bytes),
            g(self.activation_bytes),
            g(self.transient_bytes),
            g(self.overhead_bytes),
            g(self.peak_bytes),
        );
        if let Some(m) = memory_gib {
            s.push_str(&format!("device memory         {:>10.2} GiB\n", m));
        }
        s
    }
}

/// Settings that bring `tc` under `memory_gib`, as `--set` overrides (the first that fits of:
/// layer checkpointing, bf16 base weights, one row per micro-batch, LoRA instead of full
/// fine-tuning, then the longest row length that fits); empty when none does.
pub fn fitting_settings(c: &Config, tc: &TrainConfig, memory_gib: f64) -> Vec<String> {
    let fits = |t: &TrainConfig| Plan::estimate(c, t).peak_gib() <= memory_gib;
    let mut t = tc.clone();
    let mut sets = Vec::new();
    type Change = fn(&mut TrainConfig) -> bool;
    let steps: [(&str, Change); 4] = [
        ("memory.checkpoint_layers=true", |t| {
            !std::mem::replace(&mut t.memory.checkpoint_layers, true)
        }),
        ("base_dtype=\"bf16\"", |t| {
            std::mem::replace(&mut t.base_dtype, "bf16".into()) != "bf16"
        }),
        ("schedule.micro_batch=1", |t| {
            std::mem::replace(&mut t.schedule.micro_batch, 1) != 1
        }),
        ("method=\"lora\"", |t| {
            std::mem::replace(&mut t.method, TrainMethod::Lora) != TrainMethod::Lora
        }),
    ];
    for (set, apply) in steps {
        if apply(&mut t) {
            sets.push(set.to_string());
            if fits(&t) {
                return sets;
            }
        }
    }
    let mut len = t.data.max_length;
    while len > 256 {
        len /= 2;
        t.data.max_length = len;
        if fits(&t) {
            sets.push(format!("data.max_length={len}"));
            return sets;
        }
    }
    vec![]
}

/// Memory this machine can give a CPU run: `MemAvailable` (Linux), in GiB.
pub fn available_cpu_memory_gib() -> Result<f64> {
    let s = std::fs::read_to_string("/proc/meminfo")?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("/proc/meminfo has no MemAvailable"))?;
    Ok(kb / (1024.0 * 1024.0))
}
