//! The Llama-family decoder (Llama 2/3/3.1, Mistral, SmolLM2 and other `llama`-arch models).
//!
//! Order as in candle's model files: checkpoint config → runtime config → cache → blocks →
//! model. Differences from candle-transformers' `llama.rs`/`quantized_llama.rs` (SPEC §3):
//! ragged batches with per-row positions and an additive mask (padding never changes a row),
//! RoPE scaling from one module and no position cap, a growing KV cache written in place,
//! a shared prefix attended by every row without copying it, Mistral's sliding window, and
//! hidden states for any positions (not only the last).
//! Not here: training-time autograd-safe ops (fused kernels below record no gradients).

use crate::engine::rope::{RopeConfig, RopeLayout, RopeScaling};
use crate::engine::weights::{Linear, WeightSource};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

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
    #[serde(default)]
    pub attention_bias: bool,
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
    pub attention_bias: bool,
    pub mlp_bias: bool,
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
        let arch = cfg.model_type.clone().unwrap_or_else(|| "llama".into());
        let arch_ok = LLAMA_FAMILY.contains(&arch.as_str())
            || cfg
                .architectures
                .iter()
                .any(|a| a == "LlamaForCausalLM" || a == "MistralForCausalLM");
        if !arch_ok {
            bail!(
                "unsupported architecture `{arch}` ({}); wildlong runs Llama-family models (llama, mistral)",
                cfg.architectures.join(", ")
            );
        }
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
            sliding_window: cfg.sliding_window,
            tie_word_embeddings: cfg.tie_word_embeddings,
            attention_bias: cfg.attention_bias,
            mlp_bias: cfg.mlp_bias,
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
        if !LLAMA_FAMILY.contains(&arch.as_str()) {
            bail!("unsupported architecture `{arch}`; wildlong runs Llama-family models (llama, mistral)");
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
            layout: RopeLayout::Interleaved,
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
            mlp_bias: false,
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
        let (model_type, arch) = match self.architecture.as_str() {
            "mistral" => ("mistral", "MistralForCausalLM"),
            _ => ("llama", "LlamaForCausalLM"),
        };
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
            "attention_bias": self.attention_bias,
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
        let per_layer = attn + mlp + 2 * h;
        let emb = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        self.num_layers * per_layer + emb + h
    }
}

/// One layer's keys/values for this cache's own slots: `(b, kv_heads, capacity, head_dim)`.
#[derive(Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// Keys/values of a prompt prefix shared by every row of a batch (computed once, batch 1).
pub struct SharedPrefix {
    layers: Vec<(Tensor, Tensor)>, // (kv_heads, len, head_dim), contiguous
    positions: Vec<i64>,
}

impl SharedPrefix {
    pub fn len(&self) -> usize {
        self.positions.len()
    }
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
    /// Position the first token after the prefix takes.
    pub fn next_position(&self) -> i64 {
        self.positions.iter().copied().max().map_or(0, |p| p + 1)
    }
}

/// KV cache of a batch. Slots are shared by all rows (rows are left-padded); `slot_pos[r][j]`
/// is the position of row r's token in slot j, or -1 for padding.
pub struct Cache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    slot_pos: Vec<Vec<i64>>,
    prefix: Option<Arc<SharedPrefix>>,
}

impl Cache {
    pub fn new(cfg: &Config, batch: usize) -> Self {
        Self {
            layers: vec![None; cfg.num_layers],
            len: 0,
            slot_pos: vec![Vec::new(); batch],
            prefix: None,
        }
    }

    /// A cache whose rows all continue after `prefix`.
    pub fn with_prefix(cfg: &Config, batch: usize, prefix: Arc<SharedPrefix>) -> Self {
        let mut c = Self::new(cfg, batch);
        c.prefix = Some(prefix);
        c
    }

    pub fn batch(&self) -> usize {
        self.slot_pos.len()
    }

    /// Own slots (excluding a shared prefix).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Position the next token of `row` takes.
    pub fn next_position(&self, row: usize) -> i64 {
        let own = self.slot_pos[row].iter().copied().max().map(|p| p + 1);
        own.or_else(|| self.prefix.as_ref().map(|p| p.next_position()))
            .unwrap_or(0)
    }

    /// Turns a batch-1 cache into a prefix other caches can share.
    pub fn into_prefix(self) -> Result<SharedPrefix> {
        if self.batch() != 1 || self.prefix.is_some() {
            bail!("only a batch-1 cache without a prefix can become a shared prefix");
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in self.layers {
            let l = l.context("empty cache cannot become a prefix")?;
            let k = l.k.narrow(2, 0, self.len)?.squeeze(0)?.contiguous()?;
            let v = l.v.narrow(2, 0, self.len)?.squeeze(0)?.contiguous()?;
            layers.push((k, v));
        }
        Ok(SharedPrefix {
            layers,
            positions: self.slot_pos.into_iter().next().unwrap_or_default(),
        })
    }

    /// Keeps only the given rows (finished rows leave the batch).
    pub fn retain_rows(&mut self, rows: &[usize]) -> Result<()> {
        if rows.len() == self.batch() {
            return Ok(());
        }
        let dev = self
            .layers
            .iter()
            .flatten()
            .next()
            .map(|l| l.k.device().clone());
        if let Some(dev) = dev {
            let idx = Tensor::from_vec(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                rows.len(),
                &dev,
            )?;
            for l in self.layers.iter_mut().flatten() {
                l.k = l.k.index_select(&idx, 0)?;
                l.v = l.v.index_select(&idx, 0)?;
            }
        }
        self.slot_pos = rows.iter().map(|&r| self.slot_pos[r].clone()).collect();
        Ok(())
    }

    /// Records per-row positions of `t` new slots.
    fn push_slots(&mut self, positions: &[Vec<i64>]) {
        for (row, p) in self.slot_pos.iter_mut().zip(positions) {
            row.extend_from_slice(p);
        }
    }

    /// Writes `k`, `v` `(b, kvh, t, d)` at slots `len..len+t` of `layer`; returns views of all own slots.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, kvh, t, d) = k.dims4()?;
        let needed = self.len + t;
        if self.layers[layer].is_none() || needed > self.capacity_of(layer) {
            let new_cap = needed.max(self.capacity_of(layer) * 2).max(64);
            let nk = Tensor::zeros((b, kvh, new_cap, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, kvh, new_cap, d), v.dtype(), v.device())?;
            if let Some(old) = &self.layers[layer] {
                if self.len > 0 {
                    nk.slice_set(&old.k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&old.v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            self.layers[layer] = Some(LayerKv { k: nk, v: nv });
        }
        let l = self.layers[layer].as_ref().context("cache layer")?;
        l.k.slice_set(&k.contiguous()?, 2, self.len)?;
        l.v.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((l.k.narrow(2, 0, needed)?, l.v.narrow(2, 0, needed)?))
    }

    fn capacity_of(&self, layer: usize) -> usize {
        self.layers[layer]
            .as_ref()
            .map_or(0, |l| l.k.dim(2).unwrap_or(0))
    }
}

/// Additive mask `(b, 1, t, kv)`: 0 where query i of row r may see key j, -inf elsewhere.
/// Padding queries (position -1) see every key so their (ignored) outputs stay finite.
pub fn attention_mask(
    q_pos: &[Vec<i64>],
    k_pos: &[Vec<i64>],
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    Ok(attention_mask_host(q_pos, k_pos, window, device)?.0)
}

/// [`attention_mask`] and its host copy `(b, t, kv)` for the fused CPU attention.
fn attention_mask_host(
    q_pos: &[Vec<i64>],
    k_pos: &[Vec<i64>],
    window: Option<usize>,
    device: &Device,
) -> Result<(Tensor, Arc<Vec<f32>>)> {
    let b = q_pos.len();
    let t = q_pos.first().map_or(0, Vec::len);
    let kv = k_pos.first().map_or(0, Vec::len);
    let mut m = vec![0f32; b * t * kv];
    for r in 0..b {
        for i in 0..t {
            let qp = q_pos[r][i];
            if qp < 0 {
                continue;
            }
            let row = &mut m[(r * t + i) * kv..(r * t + i + 1) * kv];
            for (j, &kp) in k_pos[r].iter().enumerate() {
                let visible = kp >= 0 && kp <= qp && window.is_none_or(|w| (qp - kp) < w as i64);
                if !visible {
                    row[j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    let host = Arc::new(m.clone());
    Ok((Tensor::from_vec(m, (b, 1, t, kv), device)?, host))
}

/// Projections of one input, held separately or stacked into one matmul.
enum Projections {
    Separate(Vec<Linear>),
    Stacked { linear: Linear, sizes: Vec<usize> },
}

impl Projections {
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let refs: Vec<&Linear> = parts.iter().collect();
        Ok(match Linear::stack(&refs)? {
            Some(linear) => Self::Stacked {
                linear,
                sizes: parts.iter().map(Linear::out_dim).collect(),
            },
            None => Self::Separate(parts),
        })
    }

    /// x `(.., in)` → one output `(.., out_i)` per projection.
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Separate(parts) => parts.iter().map(|l| l.forward(x)).collect(),
            Self::Stacked { linear, sizes } => {
                let y = linear.forward(x)?;
                let last = y.rank() - 1;
                let mut start = 0;
                let mut out = Vec::with_capacity(sizes.len());
                for &n in sizes {
                    out.push(y.narrow(last, start, n)?.contiguous()?);
                    start += n;
                }
                Ok(out)
            }
        }
    }
}

struct Attention {
    qkv: Projections,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &mut WeightSource, p: &str, cfg: &Config) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let bias = cfg.attention_bias;
        Ok(Self {
            qkv: Projections::new(vec![
                w.linear(&format!("{p}.q_proj"), cfg.num_heads * hd, h, bias)?,
                w.linear(&format!("{p}.k_proj"), cfg.num_kv_heads * hd, h, bias)?,
                w.linear(&format!("{p}.v_proj"), cfg.num_kv_heads * hd, h, bias)?,
            ])?,
            o_proj: w.linear(&format!("{p}.o_proj"), h, cfg.num_heads * hd, false)?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: hd,
        })
    }

    /// x `(b, t, hidden)` → `(b, t, hidden)`.
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rot,
        mask: &Mask,
        cache: &mut Cache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let g = h / kvh;
        let [q, k, v]: [Tensor; 3] = self
            .qkv
            .forward(x)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("qkv projections"))?;
        let q = q.reshape((b, t, h, hd))?.transpose(1, 2)?; // (b, h, t, d)
        let k = k.reshape((b, t, kvh, hd))?.transpose(1, 2)?; // (b, kvh, t, d)
        let v = v.reshape((b, t, kvh, hd))?.transpose(1, 2)?;
        #[cfg(feature = "cuda")]
        if let Some(m) = &mask.flash {
            // wildlong's flash-attention kernel over the cache in place (bf16, f32 accumulation).
            // The cache holds bf16 on this path (an f32 model's cache is not widened and
            // narrowed again at every step).
            let bf = |x: &Tensor| x.to_dtype(DType::BF16);
            let q = rope.cfg.apply(&q, &rope.cos, &rope.sin)?;
            let k = bf(&rope.cfg.apply(&k, &rope.cos, &rope.sin)?)?;
            let (k_all, v_all) = cache.append(layer, &k, &bf(&v.contiguous()?)?)?; // (b, kvh, kv, d)
            let scale = 1.0 / (hd as f32).sqrt();
            let (o, _) = crate::engine::cuda::flash_attention(
                &bf(&q)?,
                &bf(&k_all)?,
                &bf(&v_all)?,
                m,
                scale,
            )?;
            let out = o
                .transpose(1, 2)?
                .reshape((b, t, h * hd))?
                .to_dtype(x.dtype())?; // (b, t, hidden)
            return self.o_proj.forward(&out);
        }
        let q = rope
            .cfg
            .apply(&q, &rope.cos, &rope.sin)?
            .to_dtype(DType::F32)?;
        let k = rope.cfg.apply(&k, &rope.cos, &rope.sin)?;
        let (k_all, v_all) = cache.append(layer, &k, &v.contiguous()?)?; // (b, kvh, kv, d)
        let scale = 1.0 / (hd as f64).sqrt();
        // GQA without repeating K/V: fold the group into the query axis.
        let q = (q * scale)?.reshape((b, kvh, g * t, hd))?; // (b, kvh, g*t, d)
        let k_all = k_all.to_dtype(DType::F32)?;
        let v_all = v_all.to_dtype(DType::F32)?;
        let prefix = cache.prefix.clone();
        let out = match &prefix {
            None => {
                crate::engine::attention::attention(&q, &k_all, &v_all, &mask.tensor, &mask.host)?
            }
            Some(p) => {
                self.attend_with_prefix(&q, &k_all, &v_all, &mask.tensor, p, layer, (b, t))?
            }
        };
        let out = out
            .reshape((b, h, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, h * hd))?
            .to_dtype(x.dtype())?;
        self.o_proj.forward(&out)
    }

    /// Attention over a shared prefix (batch 1, read by every row) followed by the rows' own keys.
    #[allow(clippy::too_many_arguments)]
    fn attend_with_prefix(
        &self,
        q: &Tensor,
        k_all: &Tensor,
        v_all: &Tensor,
        mask: &Tensor,
        p: &SharedPrefix,
        layer: usize,
        (b, t): (usize, usize),
    ) -> Result<Tensor> {
        let (kvh, hd) = (self.num_kv_heads, self.head_dim);
        let g = self.num_heads / kvh;
        let own_scores = q.matmul(&k_all.t()?)?; // (b, kvh, g*t, kv)
        let (pk, pv) = &p.layers[layer]; // (kvh, P, d)
        let (pk, pv) = (pk.to_dtype(DType::F32)?, pv.to_dtype(DType::F32)?);
        // One GEMM per KV head over all rows: (kvh, b*g*t, d) x (kvh, d, P).
        let qh = q
            .transpose(0, 1)?
            .contiguous()?
            .reshape((kvh, b * g * t, hd))?;
        let ps = qh
            .matmul(&pk.t()?)?
            .reshape((kvh, b, g * t, p.len()))?
            .transpose(0, 1)?; // (b, kvh, g*t, P)
        let scores = Tensor::cat(&[&ps, &own_scores], 3)?;
        let kv = scores.dim(3)?;
        let scores = scores
            .reshape((b, kvh, g, t, kv))?
            .broadcast_add(&mask.unsqueeze(1)?)? // mask (b, 1, 1, t, kv)
            .reshape((b, kvh, g * t, kv))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let plen = p.len();
        let pp = probs
            .narrow(3, 0, plen)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((kvh, b * g * t, plen))?;
        let po = pp
            .matmul(&pv)?
            .reshape((kvh, b, g * t, hd))?
            .transpose(0, 1)?; // (b, kvh, g*t, d)
        let own = probs
            .narrow(3, plen, kv - plen)?
            .contiguous()?
            .matmul(v_all)?;
        Ok((po + own)?)
    }
}

struct Mlp {
    gate_up: Projections,
    down_proj: Linear,
}

impl Mlp {
    fn load(w: &mut WeightSource, p: &str, cfg: &Config) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_up: Projections::new(vec![
                w.linear(&format!("{p}.gate_proj"), i, h, b)?,
                w.linear(&format!("{p}.up_proj"), i, h, b)?,
            ])?,
            down_proj: w.linear(&format!("{p}.down_proj"), h, i, b)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = self
            .gate_up
            .forward(x)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("gate/up projections"))?;
        self.down_proj.forward(&(gate.silu()? * up)?)
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(w: &mut WeightSource, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.tensor(name, &[size])?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight.to_dtype(x.dtype())?,
            self.eps,
        )?)
    }
}

struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn load(w: &mut WeightSource, i: usize, cfg: &Config) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let eps = cfg.rms_norm_eps;
        Ok(Self {
            input_layernorm: RmsNorm::load(
                w,
                &format!("{p}.input_layernorm.weight"),
                cfg.hidden_size,
                eps,
            )?,
            self_attn: Attention::load(w, &format!("{p}.self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                w,
                &format!("{p}.post_attention_layernorm.weight"),
                cfg.hidden_size,
                eps,
            )?,
            mlp: Mlp::load(w, &format!("{p}.mlp"), cfg)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rot,
        mask: &Mask,
        cache: &mut Cache,
        layer: usize,
    ) -> Result<Tensor> {
        let h = (x + self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            rope,
            mask,
            cache,
            layer,
        )?)?;
        let out = (&h
            + self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&h)?)?)?;
        Ok(out)
    }
}

/// The additive mask of one forward pass, on the device and on the host; on CUDA (head
/// sizes the kernel is built for, no shared prefix) the positions the flash-attention kernel
/// masks by instead, so no `(t, kv)` mask is built.
struct Mask {
    tensor: Tensor, // (b, 1, t, kv)
    host: Arc<Vec<f32>>,
    #[cfg(feature = "cuda")]
    flash: Option<crate::engine::cuda::Masking>,
}

/// cos/sin tables of one forward pass.
struct Rot<'a> {
    cfg: &'a RopeConfig,
    cos: Tensor,
    sin: Tensor,
}

/// The decoder with its LM head.
pub struct Llama {
    embed_tokens: Tensor, // (vocab, hidden)
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    cfg: Config,
    device: Device,
    dtype: DType,
}

impl Llama {
    pub fn load(
        mut w: WeightSource,
        mut cfg: Config,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        if let Some(freqs) = w.gguf_raw("rope_freqs.weight")? {
            cfg.rope.freq_factors = Some(freqs.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            cfg.rope.validate().context("rope_freqs.weight")?;
        }
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_name = "model.embed_tokens.weight";
        let (embed_tokens, lm_head) = if w.has("lm_head.weight") {
            (
                w.tensor(embed_name, &[v, h])?,
                w.linear("lm_head", v, h, false)?,
            )
        } else if !cfg.tie_word_embeddings {
            bail!("checkpoint has no `lm_head.weight` and does not tie word embeddings");
        } else if w.gguf_content().is_some() {
            // Tied GGUF: the head keeps the file's blocks; the embedding table shares its dense
            // copy when the format holds one (read and dequantized once).
            let head = w.linear("model.embed_tokens", v, h, false)?;
            let embed = match head.dense() {
                Some(t) => t.clone(),
                None => w.tensor(embed_name, &[v, h])?,
            };
            (embed, head)
        } else {
            let embed = w.tensor(embed_name, &[v, h])?;
            (embed.clone(), Linear::from_dense(embed, None)?)
        };
        let embed_tokens = embed_tokens.to_dtype(dtype)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(Block::load(&mut w, i, &cfg)?);
        }
        let norm = RmsNorm::load(&mut w, "model.norm.weight", h, cfg.rms_norm_eps)?;
        if let Some(l) = w.lora() {
            let unused = l.unused();
            if !unused.is_empty() {
                bail!(
                    "{}: the model has no module named {} (adapter made for another model?)",
                    l.path.display(),
                    unused.join(", ")
                );
            }
        }
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            cfg,
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs `tokens` `(b, t)` whose per-row positions are `positions` (-1 = padding) after
    /// what `cache` holds; returns final-norm hidden states `(b, t, hidden)`.
    pub fn forward(
        &self,
        tokens: &Tensor,
        positions: &[Vec<i64>],
        cache: &mut Cache,
    ) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        if positions.len() != b || positions.iter().any(|p| p.len() != t) || cache.batch() != b {
            bail!(
                "forward: tokens {:?}, positions and cache batch {} disagree",
                tokens.dims(),
                cache.batch()
            );
        }
        let rope_pos: Vec<Vec<u32>> = positions
            .iter()
            .map(|r| r.iter().map(|&p| p.max(0) as u32).collect())
            .collect();
        let (cos, sin) = self.cfg.rope.cos_sin(&rope_pos, &self.device)?;
        let rot = Rot {
            cfg: &self.cfg.rope,
            cos,
            sin,
        };
        cache.push_slots(positions);
        let mut k_pos = cache.slot_pos.clone();
        if let Some(p) = &cache.prefix {
            for row in k_pos.iter_mut() {
                let mut full = p.positions.clone();
                full.extend_from_slice(row);
                *row = full;
            }
        }
        #[cfg(feature = "cuda")]
        let mask = if self.device.is_cuda()
            && crate::engine::cuda::flash_supports(self.cfg.head_dim)
            && cache.prefix.is_none()
        {
            Mask {
                // Unused on this path (a placeholder on the host).
                tensor: Tensor::zeros(1, DType::F32, &Device::Cpu)?,
                host: Arc::new(Vec::new()),
                flash: Some(crate::engine::cuda::Masking::positions(
                    positions,
                    &k_pos,
                    self.cfg.sliding_window,
                    &self.device,
                )?),
            }
        } else {
            let (tensor, host) =
                attention_mask_host(positions, &k_pos, self.cfg.sliding_window, &self.device)?;
            Mask {
                tensor,
                host,
                flash: None,
            }
        };
        #[cfg(not(feature = "cuda"))]
        let mask = {
            let (tensor, host) =
                attention_mask_host(positions, &k_pos, self.cfg.sliding_window, &self.device)?;
            Mask { tensor, host }
        };
        let mut x = self
            .embed_tokens
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &rot, &mask, cache, i)?;
        }
        cache.len += t;
        self.norm.forward(&x)
    }

    /// Hidden states `(.., hidden)` → f32 logits `(.., vocab)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }

    /// Logits at the last position of every row: `(b, vocab)`.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let t = hidden.dim(1)?;
        self.logits(&hidden.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?)
    }
}

/// Convenience for tests and tools: all-position logits of one unpadded sequence, `(t, vocab)`.
pub fn full_logits(model: &Llama, tokens: &[u32]) -> Result<Tensor> {
    let mut cache = Cache::new(model.config(), 1);
    let ids = Tensor::new(tokens, model.device())?.unsqueeze(0)?;
    let pos = vec![(0..tokens.len() as i64).collect::<Vec<_>>()];
    let h = model.forward(&ids, &pos, &mut cache)?; // (1, t, hidden)
    model.logits(&h.squeeze(0)?) // (t, vocab)
}
