//! The Llama-family decoder (Llama 2/3/3.1, Mistral, SmolLM2 and other `llama`-arch models).
//!
//! Order as in candle's model files: checkpoint config → runtime config → cache → blocks →
//! model. Differences from candle-transformers' `llama.rs`/`quantized_llama.rs` (SPEC §3):
//! ragged batches with per-row positions and an additive mask (padding never changes a row),
//! RoPE scaling from one module and no position cap, a growing KV cache written in place,
//! a shared prefix attended by every row without copying it, Mistral's sliding window, and
//! hidden states for any positions (not only the last).
//! Not here: training-time autograd-safe ops (fused kernels below record no gradients).
//!
//! Files: [`config`] (checkpoint and runtime config), [`cache`] (KV cache, shared prefix,
//! masks), [`tensors`] (tensor names, projections, the LoRA target check and the `rope_freqs`
//! loader the trainer shares), this file (layers and the model).

pub mod cache;
pub mod config;
pub mod tensors;

pub use cache::{attention_mask, Cache, SharedPrefix};
pub(crate) use config::ids_from_value;
pub use config::{Config, LlamaConfig};

use crate::engine::rope::RopeConfig;
use crate::engine::weights::{Linear, WeightSource};
use anyhow::{bail, Result};
use cache::attention_mask_host;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;
use tensors::{Layer, Projection};

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
    fn load(w: &mut WeightSource, layer: Layer, cfg: &Config) -> Result<Self> {
        let bias = cfg.attention_bias;
        let mut proj = |p: Projection, bias: bool| {
            let (out, inp) = p.shape(cfg);
            w.linear(&layer.projection(p), out, inp, bias)
        };
        Ok(Self {
            qkv: Projections::new(vec![
                proj(Projection::Q, bias)?,
                proj(Projection::K, bias)?,
                proj(Projection::V, bias)?,
            ])?,
            o_proj: proj(Projection::O, false)?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// x `(b, t, hidden)` → `(b, t, hidden)`.
    fn forward(&self, x: &Tensor, pass: &Pass, cache: &mut Cache, layer: usize) -> Result<Tensor> {
        let (rope, mask) = (&pass.rope, &pass.mask);
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
            let (o, _) = crate::kernels::cuda::flash_attention(
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
    fn load(w: &mut WeightSource, layer: Layer, cfg: &Config) -> Result<Self> {
        let mut proj = |p: Projection| {
            let (out, inp) = p.shape(cfg);
            w.linear(&layer.projection(p), out, inp, cfg.mlp_bias)
        };
        Ok(Self {
            gate_up: Projections::new(vec![proj(Projection::Gate)?, proj(Projection::Up)?])?,
            down_proj: proj(Projection::Down)?,
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
        let layer = Layer(i);
        let eps = cfg.rms_norm_eps;
        Ok(Self {
            input_layernorm: RmsNorm::load(w, &layer.input_norm(), cfg.hidden_size, eps)?,
            self_attn: Attention::load(w, layer, cfg)?,
            post_attention_layernorm: RmsNorm::load(
                w,
                &layer.post_attention_norm(),
                cfg.hidden_size,
                eps,
            )?,
            mlp: Mlp::load(w, layer, cfg)?,
        })
    }

    fn forward(&self, x: &Tensor, pass: &Pass, cache: &mut Cache, layer: usize) -> Result<Tensor> {
        let attn = self.input_layernorm.forward(x)?;
        let h = (x + self.self_attn.forward(&attn, pass, cache, layer)?)?;
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
    flash: Option<crate::kernels::cuda::Masking>,
}

/// cos/sin tables of one forward pass.
struct Rot<'a> {
    cfg: &'a RopeConfig,
    cos: Tensor,
    sin: Tensor,
}

/// What every layer of one forward pass shares: the rotary tables and the mask.
struct Pass<'a> {
    rope: Rot<'a>,
    mask: Mask,
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
        tensors::load_rope_freqs(&mut w, &mut cfg.rope)?;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_name = tensors::EMBED;
        let (embed_tokens, lm_head) = if w.has(tensors::LM_HEAD) {
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
        let norm = RmsNorm::load(&mut w, tensors::NORM, h, cfg.rms_norm_eps)?;
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
            && crate::kernels::cuda::flash_supports(self.cfg.head_dim)
            && cache.prefix.is_none()
        {
            Mask {
                // Unused on this path (a placeholder on the host).
                tensor: Tensor::zeros(1, DType::F32, &Device::Cpu)?,
                host: Arc::new(Vec::new()),
                flash: Some(crate::kernels::cuda::Masking::positions(
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
        let pass = Pass { rope: rot, mask };
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &pass, cache, i)?;
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
