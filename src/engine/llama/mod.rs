//! The Llama-family decoder (Llama 2/3/3.1, Mistral, SmolLM2 and other `llama`-arch models).
//!
//! Order as in candle's model files: checkpoint config → runtime config → cache → blocks →
//! model. Differences from candle-transformers' `llama.rs`/`quantized_llama.rs` (SPEC §3):
//! a paged forward pass (sequences' new tokens end to end, keys and values in a block-table
//! cache, as vLLM runs them) beside the padded-batch forward it is tested against (ragged
//! batches with per-row positions and an additive mask: padding never changes a row), RoPE
//! scaling from one module and no position cap, Mistral's sliding window, and hidden states
//! for any positions (not only the last).
//! Not here: training-time autograd-safe ops (fused kernels below record no gradients).
//!
//! Files: [`config`] (checkpoint and runtime config), [`cache`] (paged and dense KV caches,
//! masks), [`tensors`] (tensor names, projections, the LoRA target check and the `rope_freqs`
//! loader the trainer shares), this file (layers and the model).

pub mod cache;
pub mod config;
pub mod tensors;

pub use cache::{attention_mask, Cache, SeqChunk};
pub use cache::{PagedBatch, PagedKv};
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
    fn bytes(&self) -> u64 {
        match self {
            Self::Separate(parts) => parts.iter().map(Linear::bytes).sum(),
            Self::Stacked { linear, .. } => linear.bytes(),
        }
    }

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
    /// Qwen3: RMSNorm over each head's queries and keys `(head_dim)`, before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &mut WeightSource, layer: Layer, cfg: &Config) -> Result<Self> {
        let mut proj = |p: Projection| {
            let (out, inp) = p.shape(cfg);
            w.linear(&layer.projection(p), out, inp, p.has_bias(cfg))
        };
        let qkv = Projections::new(vec![
            proj(Projection::Q)?,
            proj(Projection::K)?,
            proj(Projection::V)?,
        ])?;
        let o_proj = proj(Projection::O)?;
        let qk_norm = match cfg.qk_norm {
            true => Some((
                RmsNorm::load(w, &layer.q_norm(), cfg.head_dim, cfg.rms_norm_eps)?,
                RmsNorm::load(w, &layer.k_norm(), cfg.head_dim, cfg.rms_norm_eps)?,
            )),
            false => None,
        };
        Ok(Self {
            qkv,
            o_proj,
            qk_norm,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
        })
    }

    fn bytes(&self) -> u64 {
        let norms = self
            .qk_norm
            .as_ref()
            .map_or(0, |(q, k)| q.bytes() + k.bytes());
        self.qkv.bytes() + self.o_proj.bytes() + norms
    }

    /// The q/k/v projections of x `(b, t, hidden)`, as `(b, t, heads, d)` each, Qwen3's
    /// per-head norms applied.
    fn project(&self, x: &Tensor) -> Result<[Tensor; 3]> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v]: [Tensor; 3] = self
            .qkv
            .forward(x)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("qkv projections"))?;
        let q = q.reshape((b, t, h, hd))?;
        let k = k.reshape((b, t, kvh, hd))?;
        let v = v.reshape((b, t, kvh, hd))?;
        Ok(match &self.qk_norm {
            Some((qn, kn)) => [qn.forward(&q)?, kn.forward(&k)?, v],
            None => [q, k, v],
        })
    }

    /// x `(b, t, hidden)` → `(b, t, hidden)`.
    fn forward(&self, x: &Tensor, pass: &Pass, cache: &mut Cache, layer: usize) -> Result<Tensor> {
        let (rope, mask) = (&pass.rope, &pass.mask);
        let (b, t, _) = x.dims3()?;
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let g = h / kvh;
        let [q, k, v] = self.project(x)?;
        let q = q.transpose(1, 2)?; // (b, h, t, d)
        let k = k.transpose(1, 2)?; // (b, kvh, t, d)
        let v = v.transpose(1, 2)?;
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
        let out =
            crate::engine::attention::attention(&q, &k_all, &v_all, &mask.tensor, &mask.host)?;
        let out = out
            .reshape((b, h, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, h * hd))?
            .to_dtype(x.dtype())?;
        self.o_proj.forward(&out)
    }

    /// x `(1, T, hidden)`: the new tokens of `batch`'s sequences end to end; writes their
    /// keys and values to `kv` and attends over the block tables.
    fn forward_paged(
        &self,
        x: &Tensor,
        rope: &Rot,
        kv: &PagedKv,
        paged: &PagedPass,
        layer: usize,
    ) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [q, k, v] = self.project(x)?;
        let q = q.transpose(1, 2)?; // (1, h, T, d)
        let k = k.transpose(1, 2)?; // (1, kvh, T, d)
        let q = rope.cfg.apply(&q, &rope.cos, &rope.sin)?;
        let k = rope.cfg.apply(&k, &rope.cos, &rope.sin)?;
        let (k_pool, v_pool) = &kv.layers[layer];
        let k = k.reshape((kvh * t, hd))?; // (kvh*T, d), head-major
        let v = v
            .reshape((t, kvh, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((kvh * t, hd))?;
        k_pool.scatter_set(&paged.rows, &k.to_dtype(k_pool.dtype())?, 0)?;
        v_pool.scatter_set(&paged.rows, &v.to_dtype(v_pool.dtype())?, 0)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let (k_view, v_view) = kv.views(layer)?; // (blocks, kvh, block_size, d)
        let out = crate::engine::paged_attention::paged_attention(
            &q,
            &k_view,
            &v_view,
            paged.batch,
            paged.window,
            scale,
        )?; // (T, h, d)
        let out = out.reshape((1, t, h * hd))?.to_dtype(x.dtype())?;
        self.o_proj.forward(&out)
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

    fn bytes(&self) -> u64 {
        tensor_bytes(&self.weight)
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
        self.residual(x, |a| self.self_attn.forward(a, pass, cache, layer))
    }

    fn forward_paged(
        &self,
        x: &Tensor,
        rope: &Rot,
        kv: &PagedKv,
        paged: &PagedPass,
        layer: usize,
    ) -> Result<Tensor> {
        self.residual(x, |a| {
            self.self_attn.forward_paged(a, rope, kv, paged, layer)
        })
    }

    /// The pre-norm residual block around an attention: `h = x + attend(norm(x))`, then
    /// `h + mlp(norm(h))`.
    fn residual(
        &self,
        x: &Tensor,
        attend: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let h = (x + attend(&self.input_layernorm.forward(x)?)?)?;
        Ok((&h
            + self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&h)?)?)?)
    }
}

/// What every layer of one paged forward pass shares besides the rotary tables.
struct PagedPass<'a> {
    batch: &'a PagedBatch,
    /// Cache row of each new token's key per head, repeated over `(kvh*T, d)` (scatter
    /// indices, head-major).
    rows: Tensor,
    window: Option<usize>,
}

/// The additive mask of one forward pass, on the device and on the host; on CUDA (head
/// sizes the kernel is built for) the positions the flash-attention kernel
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

/// The token embedding table `(vocab, hidden)`: dense, or the file's blocks whose rows are
/// dequantized as they are looked up (no f32 copy of the table).
enum Embedding {
    Dense(Tensor),
    Blocks(Linear),
    /// The file's blocks in a candle quantized matmul (rows dequantized by candle, on the
    /// model's device).
    Quant(Linear),
}

impl Embedding {
    /// `ids` (n) u32 → `(n, hidden)`.
    fn lookup(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.index_select(ids, 0)?),
            Self::Blocks(l) => match l.block_rows(&ids.to_vec1::<u32>()?)? {
                Some(rows) => Ok(rows.to_device(ids.device())?.to_dtype(dtype)?),
                None => bail!("embedding table without block rows"),
            },
            Self::Quant(l) => match l.stored_quant() {
                Some(q) => Ok(q.embedding(ids)?.to_dtype(dtype)?),
                None => bail!("embedding table without quantized blocks"),
            },
        }
    }
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// The decoder with its LM head.
pub struct Llama {
    embed_tokens: Embedding,
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
        // GGUF tables held as blocks on the CPU, or as the file's blocks in a candle quantized
        // matmul (`native` on the CPU, every block format on CUDA), are looked up row by row;
        // others as f32.
        let gguf_table = |w: &mut WeightSource, l: Linear| -> Result<Embedding> {
            Ok(if device.is_cpu() && l.holds_blocks() {
                Embedding::Blocks(l)
            } else if l.stored_quant().is_some() {
                Embedding::Quant(l)
            } else {
                Embedding::Dense(match l.dense() {
                    Some(t) => t.clone(),
                    None => w.tensor(embed_name, &[v, h])?,
                })
            })
        };
        let (embed_tokens, lm_head) = if w.has(tensors::LM_HEAD) {
            let embed = if w.gguf_content().is_some() {
                let l = w.linear("model.embed_tokens", v, h, false)?;
                gguf_table(&mut w, l)?
            } else {
                Embedding::Dense(w.tensor(embed_name, &[v, h])?)
            };
            (embed, w.linear("lm_head", v, h, false)?)
        } else if !cfg.tie_word_embeddings {
            bail!("checkpoint has no `lm_head.weight` and does not tie word embeddings");
        } else if w.gguf_content().is_some() {
            // Tied GGUF: the head keeps the file's blocks and the table shares them (or the
            // head's dense copy, when the format holds one).
            let head = w.linear("model.embed_tokens", v, h, false)?;
            (gguf_table(&mut w, head.clone())?, head)
        } else {
            let embed = w.tensor(embed_name, &[v, h])?;
            (
                Embedding::Dense(embed.clone()),
                Linear::from_dense(embed, None)?,
            )
        };
        let embed_tokens = match embed_tokens {
            Embedding::Dense(t) => Embedding::Dense(t.to_dtype(dtype)?),
            b => b,
        };
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

    /// Bytes the weights hold, every copy counted once (a tied table sharing the head's
    /// blocks or dense copy adds nothing): what [`crate::engine::memory`] predicts.
    pub fn bytes(&self) -> u64 {
        let layers: u64 = self
            .layers
            .iter()
            .map(|b| {
                b.input_layernorm.bytes()
                    + b.self_attn.bytes()
                    + b.post_attention_layernorm.bytes()
                    + b.mlp.gate_up.bytes()
                    + b.mlp.down_proj.bytes()
            })
            .sum();
        let table = match &self.embed_tokens {
            Embedding::Blocks(l) | Embedding::Quant(l) if l.shares(&self.lm_head) => 0,
            Embedding::Blocks(l) | Embedding::Quant(l) => l.bytes(),
            Embedding::Dense(t) if self.lm_head.dense().is_some_and(|d| d.id() == t.id()) => 0,
            Embedding::Dense(t) => tensor_bytes(t),
        };
        layers + self.norm.bytes() + self.lm_head.bytes() + table
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
        let k_pos = cache.slot_pos.clone();
        #[cfg(feature = "cuda")]
        let mask =
            if self.device.is_cuda() && crate::kernels::cuda::flash_supports(self.cfg.head_dim) {
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
            .lookup(&tokens.flatten_all()?, self.dtype)?
            .reshape((b, t, self.cfg.hidden_size))?;
        let pass = Pass { rope: rot, mask };
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &pass, cache, i)?;
        }
        cache.len += t;
        self.norm.forward(&x)
    }

    /// Runs the new tokens of `batch`'s sequences (`tokens` end to end, batch order), writing
    /// their keys and values into `kv`; returns the final-norm hidden state at the last new
    /// token of each sequence marked `last_hidden`, `(n, hidden)` in batch order.
    pub fn forward_paged(
        &self,
        tokens: &[u32],
        batch: &PagedBatch,
        kv: &PagedKv,
    ) -> Result<Tensor> {
        let t = tokens.len();
        let (kvh, hd) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let pool_blocks = kv.num_blocks();
        if t == 0 || batch.tokens() != t || batch.block_size != kv.block_size {
            bail!(
                "forward_paged: {t} tokens for a batch of {} (block size {} vs the cache's {})",
                batch.tokens(),
                batch.block_size,
                kv.block_size
            );
        }
        batch.validate(pool_blocks)?;
        let (cos, sin) = self.cfg.rope.cos_sin(&[batch.positions()], &self.device)?;
        let rope = Rot {
            cfg: &self.cfg.rope,
            cos,
            sin,
        };
        let rows = Tensor::from_vec(batch.new_rows(kvh), (kvh * t, 1), &self.device)?
            .broadcast_as((kvh * t, hd))?
            .contiguous()?;
        let paged = PagedPass {
            batch,
            rows,
            window: self.cfg.sliding_window,
        };
        let ids = Tensor::from_vec(tokens.to_vec(), t, &self.device)?;
        let mut x =
            self.embed_tokens
                .lookup(&ids, self.dtype)?
                .reshape((1, t, self.cfg.hidden_size))?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward_paged(&x, &rope, kv, &paged, i)?;
        }
        let mut last = Vec::new();
        let mut end = 0;
        for s in &batch.seqs {
            end += s.len;
            if s.last_hidden {
                last.push(end as u32 - 1);
            }
        }
        let n = last.len();
        let idx = Tensor::from_vec(last, n, &self.device)?;
        // The final norm on the rows asked for alone.
        let rows = x.squeeze(0)?.index_select(&idx, 0)?; // (n, hidden)
        self.norm.forward(&rows)
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
