//! The Llama family's tensors, named once for the engine, the trainer, the benchmarks and
//! the tests: Hugging Face names (`weights.rs` maps them to GGUF's), the seven projections
//! with their shapes, the one LoRA-target check and the one `rope_freqs` loader.

use super::config::Config;
use crate::engine::rope::RopeConfig;
use crate::engine::weights::WeightSource;
use anyhow::{bail, Context, Result};
use candle_core::DType;

pub const EMBED: &str = "model.embed_tokens.weight";
pub const NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";
/// Llama 3.x GGUFs: RoPE's per-frequency divisors (llama3 scaling baked in), by GGUF name.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// One of a layer's seven linear projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

/// Projection names LoRA may target (PEFT's `target_modules`), in layer order.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl Projection {
    pub const ALL: [Projection; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// `q_proj`, …, `down_proj`.
    pub fn name(self) -> &'static str {
        PROJECTIONS[self as usize]
    }

    /// The block module holding it: `self_attn` or `mlp`.
    pub fn module(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            Self::Gate | Self::Up | Self::Down => "mlp",
        }
    }

    /// Whether the checkpoint holds a bias for it.
    pub fn has_bias(self, c: &Config) -> bool {
        match self {
            Self::Q | Self::K | Self::V => c.attention_bias,
            Self::O => c.o_proj_bias,
            Self::Gate | Self::Up | Self::Down => c.mlp_bias,
        }
    }

    /// `(out, in)` of its weight.
    pub fn shape(self, c: &Config) -> (usize, usize) {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        match self {
            Self::Q => (q, h),
            Self::K | Self::V => (kv, h),
            Self::O => (h, q),
            Self::Gate | Self::Up => (i, h),
            Self::Down => (h, i),
        }
    }
}

/// The names of layer `i`'s tensors (candle's `VarBuilder::pp` prefixes, as strings).
#[derive(Debug, Clone, Copy)]
pub struct Layer(pub usize);

impl Layer {
    /// `model.layers.{i}`.
    pub fn prefix(self) -> String {
        format!("model.layers.{}", self.0)
    }

    /// `model.layers.{i}.self_attn` or `….mlp`.
    pub fn module(self, m: &str) -> String {
        format!("{}.{m}", self.prefix())
    }

    /// A projection's prefix, without `.weight`: `model.layers.{i}.self_attn.q_proj`.
    pub fn projection(self, p: Projection) -> String {
        format!("{}.{}.{}", self.prefix(), p.module(), p.name())
    }

    pub fn input_norm(self) -> String {
        format!("{}.input_layernorm.weight", self.prefix())
    }

    pub fn post_attention_norm(self) -> String {
        format!("{}.post_attention_layernorm.weight", self.prefix())
    }

    /// Qwen3's per-head query norm `(head_dim)`.
    pub fn q_norm(self) -> String {
        format!("{}.self_attn.q_norm.weight", self.prefix())
    }

    /// Qwen3's per-head key norm `(head_dim)`.
    pub fn k_norm(self) -> String {
        format!("{}.self_attn.k_norm.weight", self.prefix())
    }
}

/// Every tensor of a checkpoint of this shape with its dims, in HF order.
pub fn checkpoint_tensors(c: &Config) -> Vec<(String, Vec<usize>)> {
    let (v, h) = (c.vocab_size, c.hidden_size);
    let mut out = vec![(EMBED.to_string(), vec![v, h])];
    if !c.tie_word_embeddings {
        out.push((LM_HEAD.to_string(), vec![v, h]));
    }
    out.push((NORM.to_string(), vec![h]));
    for l in (0..c.num_layers).map(Layer) {
        for p in Projection::ALL {
            let (o, i) = p.shape(c);
            out.push((format!("{}.weight", l.projection(p)), vec![o, i]));
            if p.has_bias(c) {
                out.push((format!("{}.bias", l.projection(p)), vec![o]));
            }
        }
        if c.qk_norm {
            out.push((l.q_norm(), vec![c.head_dim]));
            out.push((l.k_norm(), vec![c.head_dim]));
        }
        out.push((l.input_norm(), vec![h]));
        out.push((l.post_attention_norm(), vec![h]));
    }
    out
}

/// LoRA targets are projection names; anything else is refused naming the known ones.
pub fn check_lora_targets<S: AsRef<str>>(targets: &[S]) -> Result<()> {
    if targets.is_empty() {
        bail!("no LoRA targets (known: {})", PROJECTIONS.join(", "));
    }
    if let Some(t) = targets
        .iter()
        .map(AsRef::as_ref)
        .find(|t| !PROJECTIONS.contains(t))
    {
        bail!(
            "unknown LoRA target `{t}` (known: {})",
            PROJECTIONS.join(", ")
        );
    }
    Ok(())
}

/// Reads a GGUF's `rope_freqs.weight` into `rope.freq_factors`, validated against the
/// rotary dimension (a file whose factors do not fit is refused, naming the tensor).
/// Returns whether the file had one.
pub fn load_rope_freqs(w: &mut WeightSource, rope: &mut RopeConfig) -> Result<bool> {
    let Some(freqs) = w.gguf_raw(ROPE_FREQS)? else {
        return Ok(false);
    };
    rope.freq_factors = Some(freqs.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    rope.validate().context(ROPE_FREQS)?;
    Ok(true)
}
