//! `wildlong train --plan`: the peak memory and tokens per step a recipe needs, predicted
//! from the model's shape before any weight is read, checked against a device's memory.
//!
//! The model counts what the trainer holds on the device: frozen weights (base dtype; norms
//! and `lm_head` f32), trained tensors with their gradient, accumulated gradient and AdamW
//! moments (f32, 24 bytes per parameter at the optimizer update), the activations autograd
//! keeps, the largest transient buffer and a runtime allowance. Activations follow the ops of
//! `model.rs` tensor by tensor: without layer checkpointing every layer's; with it each
//! layer's input (the checkpoints: on the device, or in host memory with
//! `memory.offload_checkpoints` on CUDA) plus one recomputed layer: its attention half with
//! the gradients flowing through it, and one MLP tile of `memory.mlp_tile` tokens with its
//! own. The transient is the larger of an attention block's scores (CPU; flash attention's
//! bf16 copies on CUDA) and a loss chunk's logits. On CUDA the allowance is the context plus
//! the caching allocator's slack. `benches/train.sh` prints the prediction beside the
//! measured peak RSS; the README records them at 1K to 32K-token rows.

use crate::engine::llama::Config;
use crate::train::config::{TrainConfig, TrainMethod};
use anyhow::Result;
use serde::{Deserialize, Serialize};

const GIB: f64 = (1u64 << 30) as f64;
/// Runtime, tokenizer, data and allocator slack on the CPU.
const OVERHEAD_BYTES: f64 = 0.4 * GIB;
/// CUDA: the context and cuBLAS workspaces.
const CUDA_CONTEXT_BYTES: f64 = 0.6 * GIB;
/// CUDA: the caching allocator's slack, as a share of what it holds.
const CUDA_ALLOCATOR_SLACK: f64 = 0.05;

/// Where a plan's device memory is: the CPU's RAM or one CUDA device's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanDevice {
    Cpu,
    Cuda,
}

impl PlanDevice {
    /// `cpu`, `cuda` or `cuda:N` (as `--device` takes it).
    pub fn parse(device: &str) -> Result<Self> {
        match device {
            "cpu" => Ok(Self::Cpu),
            d if d == "cuda" || d.starts_with("cuda:") => Ok(Self::Cuda),
            d => anyhow::bail!("--device: expected cpu or cuda[:N], got {d:?}"),
        }
    }
}

/// A prediction, in bytes unless named otherwise; `peak_bytes` is the device's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub device: PlanDevice,
    pub parameters: usize,
    pub trainable_parameters: usize,
    pub tokens_per_micro_batch: usize,
    pub tokens_per_step: usize,
    pub weights_bytes: f64,
    pub trainable_state_bytes: f64,
    /// Everything autograd keeps: `checkpoint_bytes + recompute_bytes` with layer
    /// checkpointing, every layer's activations without.
    pub activation_bytes: f64,
    /// Layer inputs kept on the device (layer checkpointing).
    pub checkpoint_bytes: f64,
    /// Layer inputs kept in host memory instead (`memory.offload_checkpoints` on CUDA).
    pub host_checkpoint_bytes: f64,
    /// The recomputed layer (attention half, one MLP tile) and its gradients.
    pub recompute_bytes: f64,
    pub transient_bytes: f64,
    pub overhead_bytes: f64,
    pub peak_bytes: f64,
}

impl Plan {
    pub fn peak_gib(&self) -> f64 {
        self.peak_bytes / GIB
    }

    /// Predicts `tc` on a model shaped `c`, trained on `device`.
    pub fn estimate(c: &Config, tc: &TrainConfig, device: PlanDevice) -> Self {
        let cuda = device == PlanDevice::Cuda;
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

        // Activations autograd keeps per token (f32 values). The fused LoRA op keeps its
        // output only (its input is kept anyway; the rank-r product and the dropout mask are
        // recomputed), as a plain projection does.
        // The attention half: the layer input, its norm, the q/k/v outputs with their head
        // copies and RoPE outputs, the attention output and its transposed copy, o's output
        // and the residual sum.
        let attention_per_token = 4.0 * h + 5.0 * nh * hd + 5.0 * kvh * hd;
        // The MLP half: its norm, gate and up outputs, the gated product (one fused op: no
        // SiLU output is kept), down's output and the residual sum.
        let mlp_per_token = 3.0 * h + 3.0 * i;
        let t = tc.data.max_length as f64;
        let tokens = tc.schedule.micro_batch as f64 * t;
        let layer = (attention_per_token + mlp_per_token) * 4.0 * tokens;
        let (checkpoints, recompute_bytes) = if tc.memory.checkpoint_layers {
            let tile = match tc.memory.mlp_tile {
                0 => tokens,
                n => (n as f64).min(tokens),
            };
            let attention = attention_per_token * 4.0 * tokens;
            let residual = h * 4.0 * tokens; // the gradient from above, the MLP's input gradient
                                             // Backward through the MLP tiles (the attention half's graph waiting), then
                                             // through the attention half with its gradients.
            let mlp_phase = attention + 2.0 * mlp_per_token * 4.0 * tile + 2.0 * residual;
            let attention_phase = 2.0 * attention + 2.0 * residual;
            (l * h * 4.0 * tokens, mlp_phase.max(attention_phase))
        } else {
            // Every layer, plus the gradients of the layer being differentiated.
            (0.0, l * layer + layer)
        };
        let offloaded = cuda && tc.memory.checkpoint_layers && tc.memory.offload_checkpoints;
        let (checkpoint_bytes, host_checkpoint_bytes) = match offloaded {
            true => (0.0, checkpoints),
            false => (checkpoints, 0.0),
        };
        let activation_bytes = checkpoint_bytes + recompute_bytes;
        let mb = tc.schedule.micro_batch as f64;
        let attention = match cuda {
            // Flash attention: bf16 copies of q, k, v and the output, and their gradients.
            true => mb * t * (nh + kvh) * hd * 2.0 * 2.0 * 2.0,
            // One KV head's block of probabilities (the scores normalised in place) and their
            // gradient, f32: the op runs one batch row and KV head at a time.
            false => (nh / kvh) * (tc.memory.attention_block as f64).min(t) * t * 4.0 * 2.0,
        };
        let loss = (tc.memory.loss_chunk as f64).min(tokens) * v * 4.0 * 2.0;
        let transient_bytes = attention.max(loss);
        let held = weights_bytes + trainable_state_bytes + activation_bytes + transient_bytes;
        let overhead_bytes = match cuda {
            true => CUDA_CONTEXT_BYTES + CUDA_ALLOCATOR_SLACK * held,
            false => OVERHEAD_BYTES,
        };
        Self {
            device,
            parameters: parameters as usize,
            trainable_parameters: trainable as usize,
            tokens_per_micro_batch: tokens as usize,
            tokens_per_step: tokens as usize * tc.schedule.grad_accum,
            weights_bytes,
            trainable_state_bytes,
            activation_bytes,
            checkpoint_bytes,
            host_checkpoint_bytes,
            recompute_bytes,
            transient_bytes,
            overhead_bytes,
            peak_bytes: held + overhead_bytes,
        }
    }

    /// A human-readable table.
    pub fn render(&self, memory_gib: Option<f64>) -> String {
        let g = |b: f64| format!("{:.2} GiB", b / GIB);
        let device = match self.device {
            PlanDevice::Cpu => "cpu",
            PlanDevice::Cuda => "cuda",
        };
        let mut s = format!(
            "device                {device:>14}\nparameters            {:>14}\ntrainable parameters  {:>14}\ntokens per micro-batch {:>13}\ntokens per step       {:>14}\nfrozen weights        {:>14}\ntrained state         {:>14}\nactivations           {:>14}\n  layer checkpoints   {:>14}\n  recomputed layer    {:>14}\nlargest transient     {:>14}\nruntime allowance     {:>14}\npredicted peak        {:>14}\n",
            self.parameters,
            self.trainable_parameters,
            self.tokens_per_micro_batch,
            self.tokens_per_step,
            g(self.weights_bytes),
            g(self.trainable_state_bytes),
            g(self.activation_bytes),
            g(self.checkpoint_bytes),
            g(self.recompute_bytes),
            g(self.transient_bytes),
            g(self.overhead_bytes),
            g(self.peak_bytes),
        );
        if self.host_checkpoint_bytes > 0.0 {
            s.push_str(&format!(
                "host memory (offloaded checkpoints) {:>6.2} GiB\n",
                self.host_checkpoint_bytes / GIB
            ));
        }
        if let Some(m) = memory_gib {
            s.push_str(&format!("device memory         {:>10.2} GiB\n", m));
        }
        s
    }
}

/// Settings that bring `tc` under `memory_gib`, as `--set` overrides (the first that fits of:
/// layer checkpointing, on CUDA the checkpoints offloaded to the host, bf16 base weights, one row per micro-batch, LoRA instead of full
/// fine-tuning, then the longest row length that fits); empty when none does.
pub fn fitting_settings(
    c: &Config,
    tc: &TrainConfig,
    device: PlanDevice,
    memory_gib: f64,
) -> Vec<String> {
    let fits = |t: &TrainConfig| Plan::estimate(c, t, device).peak_gib() <= memory_gib;
    let mut t = tc.clone();
    let mut sets = Vec::new();
    type Change = fn(&mut TrainConfig) -> bool;
    let mut steps: Vec<(&str, Change)> = vec![
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
    if device == PlanDevice::Cuda {
        steps.insert(
            1,
            ("memory.offload_checkpoints=true", |t| {
                !std::mem::replace(&mut t.memory.offload_checkpoints, true)
            }),
        );
    }
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

/// Refuses `tc` when its plan exceeds `memory_gib` (`whence` names where that figure comes
/// from), naming the `--set` settings that would fit.
pub fn refuse_unfit(
    c: &Config,
    tc: &TrainConfig,
    device: PlanDevice,
    memory_gib: f64,
    whence: &str,
) -> Result<()> {
    let need = Plan::estimate(c, tc, device).peak_gib();
    if need <= memory_gib {
        return Ok(());
    }
    let fix = fitting_settings(c, tc, device, memory_gib);
    if fix.is_empty() {
        anyhow::bail!(
            "the plan needs {need:.2} GiB, more than the {memory_gib:.2} GiB {whence}, and no setting tried fits"
        );
    }
    anyhow::bail!(
        "the plan needs {need:.2} GiB, more than the {memory_gib:.2} GiB {whence}; these settings fit: {}",
        fix.iter().map(|s| format!("--set {s}")).collect::<Vec<_>>().join(" ")
    )
}
