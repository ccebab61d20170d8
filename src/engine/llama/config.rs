//! The Llama family's configuration: `config.json` as HF writes it ([`LlamaConfig`]) and the
//! runtime [`Config`] built from it or from GGUF metadata.

use crate::engine::rope::{RopeConfig, RopeLayout, RopeScaling};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `config.json` as written by Hugging Face checkpoints (fields we use; others ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3: the window applies only when this is true (their configs carry a
    /// `sliding_window` that is otherwise unused).
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Llama/Mistral: biases on q/k/v/o. Absent from Qwen2 configs (q/k/v biases implied).
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<Value>,
    #[serde(default)]
    pub eos_token_id: Option<Value>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

/// Model types that are the Llama architecture under another name.
const LLAMA_FAMILY: &[&str] = &["llama", "mistral"];
/// Every architecture the decoder runs: the Llama family and Qwen2/Qwen3 (the same decoder
/// with q/k/v biases, or with per-head q/k RMSNorm).
pub const ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

/// `model_type` → HF `architectures` entry.
fn hf_class(model_type: &str) -> Option<&'static str> {
    Some(match model_type {
        "llama" => "LlamaForCausalLM",
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        _ => return None,
    })
}

/// Runtime configuration, from `config.json` or GGUF metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    /// Context length the checkpoint was trained for (positions beyond it are allowed).
    pub context_length: usize,
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2; Llama's `attention_bias`).
    pub attention_bias: bool,
    /// A bias on o_proj (Llama's `attention_bias`; never Qwen's).
    #[serde(default)]
    pub o_proj_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3: RMSNorm over each head's queries and keys before RoPE.
    #[serde(default)]
    pub qk_norm: bool,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
}

/// Token ids from a config value that is a number or a list of numbers.
pub(crate) fn ids_from_value(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

impl Config {
    pub fn from_hf(cfg: &LlamaConfig, rope_theta_override: Option<f64>) -> Result<Self> {
        let arch = match &cfg.model_type {
            Some(t) => t.clone(),
            // Without a model_type, the class names it.
            None => ARCHITECTURES
                .iter()
                .find(|t| {
                    cfg.architectures
                        .iter()
                        .any(|a| Some(a.as_str()) == hf_class(t))
                })
                .map_or("llama", |t| *t)
                .to_string(),
        };
        if !ARCHITECTURES.contains(&arch.as_str()) {
            bail!(
                "unsupported architecture `{arch}` ({}); wildlong runs {}",
                cfg.architectures.join(", "),
                ARCHITECTURES.join(", ")
            );
        }
        let qwen = arch.starts_with("qwen");
        let sliding_window = match (qwen, cfg.use_sliding_window) {
            (false, _) => cfg.sliding_window,
            (true, Some(true)) => bail!(
                "use_sliding_window: Qwen's per-layer sliding window (max_window_layers) is not supported; \
                 the published Qwen2.5/Qwen3 checkpoints leave it off"
            ),
            (true, _) => None,
        };
        // Qwen2 always has q/k/v biases and none on o_proj (its config has no key for
        // them); Llama's and Qwen3's attention_bias puts one on all four.
        let qkv_bias = match arch.as_str() {
            "qwen2" => true,
            _ => cfg.attention_bias.unwrap_or(false),
        };
        let o_proj_bias = arch != "qwen2" && cfg.attention_bias.unwrap_or(false);
        let qk_norm = arch == "qwen3";
        if let Some(act) = &cfg.hidden_act {
            if act != "silu" {
                bail!("unsupported hidden_act `{act}` (Llama-family models use silu)");
            }
        }
        if cfg.num_attention_heads == 0
            || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) && cfg.head_dim.is_none()
        {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size,
                cfg.num_attention_heads
            );
        }
        let head_dim = cfg
            .head_dim
            .unwrap_or(cfg.hidden_size / cfg.num_attention_heads);
        let num_kv_heads = cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads);
        let rope = RopeConfig {
            theta: rope_theta_override.unwrap_or(cfg.rope_theta),
            dim: head_dim,
            max_position_embeddings: cfg.max_position_embeddings,
            scaling: RopeScaling::from_hf_json(cfg.rope_scaling.as_ref())
                .context("config.json: rope_scaling")?,
            layout: RopeLayout::HalfSplit,
            freq_factors: None,
        };
        let c = Self {
            architecture: arch,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_layers: cfg.num_hidden_layers,
            num_heads: cfg.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: cfg.vocab_size,
            rms_norm_eps: cfg.rms_norm_eps,
            rope,
            context_length: cfg.max_position_embeddings,
            sliding_window,
            tie_word_embeddings: cfg.tie_word_embeddings,
            attention_bias: qkv_bias,
            o_proj_bias,
            mlp_bias: cfg.mlp_bias,
            qk_norm,
            eos_token_ids: ids_from_value(&cfg.eos_token_id),
            bos_token_id: ids_from_value(&cfg.bos_token_id).first().copied(),
        };
        c.validate()?;
        Ok(c)
    }

    pub fn from_gguf(ct: &gguf_file::Content, rope_theta_override: Option<f64>) -> Result<Self> {
        let md = &ct.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .context("GGUF metadata has no `general.architecture`")?;
        if !ARCHITECTURES.contains(&arch.as_str()) {
            bail!(
                "unsupported architecture `{arch}`; wildlong runs {}",
                ARCHITECTURES.join(", ")
            );
        }
        let get = |k: &str| md.get(&format!("{arch}.{k}"));
        let req_u = |k: &str| -> Result<usize> {
            let v = get(k).with_context(|| format!("GGUF metadata has no `{arch}.{k}`"))?;
            Ok(v.to_u64().or_else(|_| v.to_u32().map(u64::from))? as usize)
        };
        let opt_u = |k: &str| {
            get(k)
                .and_then(|v| v.to_u64().or_else(|_| v.to_u32().map(u64::from)).ok())
                .map(|x| x as usize)
        };
        let opt_f =
            |k: &str| get(k).and_then(|v| v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok());
        let hidden = req_u("embedding_length")?;
        let heads = req_u("attention.head_count")?;
        let head_dim = opt_u("attention.key_length").unwrap_or(hidden / heads.max(1));
        let rope_dim = opt_u("rope.dimension_count").unwrap_or(head_dim);
        if rope_dim != head_dim {
            bail!("partial rotary embeddings ({rope_dim} of {head_dim} dims) are not supported");
        }
        let context = opt_u("context_length").unwrap_or(4096);
        let scaling_type = get("rope.scaling.type")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let factor = opt_f("rope.scaling.factor").unwrap_or(1.0);
        let orig_ctx = opt_u("rope.scaling.original_context_length");
        let scaling = match scaling_type.as_deref() {
            None | Some("none") => RopeScaling::Default,
            Some(_) if factor <= 1.0 => RopeScaling::Default,
            Some("linear") => RopeScaling::Linear { factor },
            Some("yarn") => RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: orig_ctx,
                attention_factor: None,
                beta_fast: opt_f("rope.scaling.yarn_beta_fast"),
                beta_slow: opt_f("rope.scaling.yarn_beta_slow"),
                mscale: None,
                mscale_all_dim: None,
                truncate: None,
            },
            Some(other) => bail!("unsupported GGUF rope scaling type `{other}`"),
        };
        let vocab = opt_u("vocab_size")
            .or_else(|| {
                md.get("tokenizer.ggml.tokens")
                    .and_then(|v| v.to_vec().ok())
                    .map(Vec::len)
            })
            .context("GGUF metadata has neither a vocab size nor a token list")?;
        let tok_u32 = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let rope = RopeConfig {
            theta: rope_theta_override
                .or_else(|| opt_f("rope.freq_base"))
                .unwrap_or(10_000.0),
            dim: head_dim,
            max_position_embeddings: orig_ctx.unwrap_or(context),
            scaling,
            // llama.cpp's converter permutes Llama's q/k rows for its interleaved RoPE; Qwen's
            // run NEOX-style (halves), as in HF.
            layout: match LLAMA_FAMILY.contains(&arch.as_str()) {
                true => RopeLayout::Interleaved,
                false => RopeLayout::HalfSplit,
            },
            freq_factors: None,
        };
        let c = Self {
            architecture: arch.clone(),
            hidden_size: hidden,
            intermediate_size: req_u("feed_forward_length")?,
            num_layers: req_u("block_count")?,
            num_heads: heads,
            num_kv_heads: opt_u("attention.head_count_kv").unwrap_or(heads),
            head_dim,
            vocab_size: vocab,
            rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope,
            context_length: context,
            sliding_window: opt_u("attention.sliding_window"),
            tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
            attention_bias: ct.tensor_infos.contains_key("blk.0.attn_q.bias"),
            o_proj_bias: ct.tensor_infos.contains_key("blk.0.attn_output.bias"),
            mlp_bias: false,
            qk_norm: ct.tensor_infos.contains_key("blk.0.attn_q_norm.weight"),
            eos_token_ids: tok_u32("tokenizer.ggml.eos_token_id").into_iter().collect(),
            bos_token_id: tok_u32("tokenizer.ggml.bos_token_id"),
        };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            bail!("model config has zero layers, hidden size or vocabulary");
        }
        self.rope.validate()
    }

    /// An HF `config.json` for these settings (a merged export's config; `torch_dtype` is
    /// the dtype of the weights written beside it).
    pub fn to_hf_json(&self, torch_dtype: &str) -> Result<Value> {
        if self.rope.freq_factors.is_some() {
            bail!("this model's RoPE has per-frequency factors from GGUF (`rope_freqs`) that config.json cannot express; train from the HF checkpoint to export a merged model");
        }
        let model_type = match self.architecture.as_str() {
            t @ ("mistral" | "qwen2" | "qwen3") => t,
            _ => "llama",
        };
        let arch = hf_class(model_type).unwrap_or("LlamaForCausalLM");
        let scaling = match &self.rope.scaling {
            RopeScaling::Default => Value::Null,
            s => serde_json::to_value(s)?,
        };
        let scaling = match scaling {
            // Options left unset are omitted, as HF writes them.
            Value::Object(m) => {
                Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).collect())
            }
            v => v,
        };
        let eos: Value = match self.eos_token_ids.as_slice() {
            [one] => (*one).into(),
            many => many.into(),
        };
        Ok(serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_scaling": scaling,
            "max_position_embeddings": self.rope.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias || self.o_proj_bias,
            "sliding_window": self.sliding_window,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": torch_dtype,
        }))
    }

    /// Parameter count of the weights (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let attn = h * hd * (self.num_heads * 2 + self.num_kv_heads * 2);
        let mlp = 3 * h * i;
        let biases: usize = super::tensors::Projection::ALL
            .iter()
            .filter(|p| p.has_bias(self))
            .map(|p| p.shape(self).0)
            .sum();
        let biases = biases + if self.qk_norm { 2 * hd } else { 0 };
        let per_layer = attn + mlp + 2 * h + biases;
        let emb = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        self.num_layers * per_layer + emb + h
    }
}
