//! The trainable Llama-family model: the engine's architecture (same weights, names, RoPE
//! tables) built from the autograd-safe ops of [`crate::train::ops`], with LoRA adapters on
//! chosen projections (`y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ`, `W` frozen, `A` `(r, in)` Kaiming-uniform,
//! `B` `(out, r)` zero, as PEFT initialises them). Rows may pack several documents: each
//! token carries its position (restarting per document) and a segment id (attention never
//! crosses segments), so a packed row gives the loss of its documents alone.

use crate::engine::llama::Config;
use crate::engine::rope::{RopeRecord, RopeScaling};
use crate::engine::weights::WeightSource;
use crate::train::ops;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::path::Path;

pub use crate::engine::llama::tensors::PROJECTIONS;
use crate::engine::llama::tensors::{self as names, Layer, Projection};

/// Which projections get adapters, and their shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    /// Seeds `A`'s initialisation.
    pub seed: u64,
    /// Dropout on the adapter path's input (PEFT's `lora_dropout`); masks are drawn from
    /// [`TrainModel::set_dropout_seed`]'s seed, so a recomputed layer sees the same mask.
    pub dropout: f64,
}

/// What is trained, and how the frozen weights are held.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Adapters (`None` with `full = false`: nothing trains, for forward checks).
    pub lora: Option<LoraSpec>,
    /// Full fine-tuning: every weight is a trained f32 variable.
    pub full: bool,
    /// Frozen projection and embedding weights: f32 or bf16 (widened per use); norms,
    /// `lm_head`, adapters, gradients and optimizer state are f32.
    pub base_dtype: DType,
    /// Where the model trains: the CPU, or a CUDA device (`cuda` feature) through
    /// wildlong's kernels.
    pub device: Device,
}

impl TrainOptions {
    pub fn lora(spec: Option<&LoraSpec>) -> Self {
        Self {
            lora: spec.cloned(),
            full: false,
            base_dtype: DType::F32,
            device: Device::Cpu,
        }
    }
}

/// A weight that is frozen (no gradient, maybe bf16) or trained (an f32 variable).
#[derive(Clone)]
enum Param {
    Frozen(Tensor),
    Trained(Var),
}

impl Param {
    fn tensor(&self) -> &Tensor {
        match self {
            Param::Frozen(t) => t,
            Param::Trained(v) => v.as_tensor(),
        }
    }

    /// The weight as f32 (a widened copy for bf16).
    fn f32(&self) -> Result<Tensor> {
        Ok(self.tensor().to_dtype(DType::F32)?)
    }
}

/// A projection `(out, in)` with a frozen or trained weight and an optional adapter.
pub struct TrainLinear {
    /// HF module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    weight: Param,
    /// `(out)`: Qwen2's q/k/v biases (frozen under LoRA, as PEFT's `bias = "none"`).
    bias: Option<Param>,
    /// `A` `(r, in)`, `B` `(out, r)`.
    pub lora: Option<(Var, Var)>,
    pub scale: f64,
    dropout: f64,
}

impl TrainLinear {
    /// `x` `(n, in)` → `(n, out)`; `mask_seed` draws the adapter's dropout mask, of which
    /// `x` takes the rows from `first_row` (a tile of a longer input).
    fn forward(&self, x: &Tensor, mask_seed: Option<u64>, first_row: usize) -> Result<Tensor> {
        let dropout = mask_seed
            .filter(|_| self.dropout > 0.0)
            .map(|s| (s, self.dropout));
        let y = match (&self.weight, &self.lora) {
            (Param::Frozen(w), Some((a, b))) => ops::lora_linear(
                x,
                w,
                &ops::Adapter {
                    a,
                    b,
                    scale: self.scale,
                    dropout,
                    mask_from: first_row * x.dim(candle_core::D::Minus1)?,
                },
            )?,
            (Param::Frozen(w), None) => ops::frozen_matmul(x, w)?,
            (Param::Trained(w), None) => x.matmul(&w.t()?)?,
            (Param::Trained(_), Some(_)) => bail!("{}: adapters on a trained weight", self.name),
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b.tensor())?,
            None => y,
        })
    }

    /// The stored base weight `(out, in)` (f32 or bf16; a variable's tensor when trained).
    pub fn weight(&self) -> &Tensor {
        self.weight.tensor()
    }

    /// `W + (α/r)·B·A` in f32: the weight an inference engine uses after merging.
    pub fn merged(&self) -> Result<Tensor> {
        let w = self.weight.f32()?;
        Ok(match &self.lora {
            Some((a, b)) => (&w + (b.matmul(a.as_tensor())? * self.scale)?)?,
            None => w,
        })
    }
}

struct Block {
    input_layernorm: Param,
    /// Qwen3's per-head query and key norms `(head_dim)`.
    qk_norm: Option<(Param, Param)>,
    q: TrainLinear,
    k: TrainLinear,
    v: TrainLinear,
    o: TrainLinear,
    post_attention_layernorm: Param,
    gate: TrainLinear,
    up: TrainLinear,
    down: TrainLinear,
}

impl Block {
    fn linears(&self) -> [&TrainLinear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }
}

/// A batch of rows: tokens, their positions (restarting per packed document) and segment
/// ids; all rows of one length.
pub struct Rows<'a> {
    pub tokens: &'a [Vec<u32>],
    pub positions: &'a [Vec<u32>],
    pub segments: &'a [Vec<u32>],
}

/// What every layer of one forward shares.
struct Prepared<'a> {
    ids: Tensor,
    cos: Tensor,
    sin: Tensor,
    b: usize,
    t: usize,
    segments: &'a [Vec<u32>],
    dropout_seed: Option<u64>,
}

pub struct TrainModel {
    pub cfg: Config,
    embed_tokens: Param,
    blocks: Vec<Block>,
    norm: Param,
    lm_head: Param,
    device: Device,
    /// Set for GGUF sources whose q/k rows llama.cpp permuted (interleaved RoPE: Llama).
    gguf_head_dim: Option<usize>,
    options: TrainOptions,
    /// Query rows per attention block, and rows per cross-entropy chunk.
    pub attention_block: usize,
    pub loss_chunk: usize,
    /// Recompute each layer in the backward pass instead of keeping its activations.
    pub checkpoint_layers: bool,
    /// With `checkpoint_layers`: token rows per MLP tile in both passes (0: the whole
    /// input), so that no `(tokens, intermediate)` tensor exists whole.
    pub mlp_tile: usize,
    /// With `checkpoint_layers` on a CUDA device: the layer inputs kept in host memory and
    /// copied back per layer in the backward pass (on the CPU nothing moves).
    pub offload_checkpoints: bool,
    dropout_seed: std::cell::Cell<Option<u64>>,
}

impl TrainModel {
    /// Reads the weights (dequantized to f32) and adds adapters per `lora`.
    pub fn load(w: &mut WeightSource, cfg: Config, lora: Option<&LoraSpec>) -> Result<Self> {
        Self::load_with(w, cfg, &TrainOptions::lora(lora))
    }

    /// Reads the weights for training as `opts` says.
    pub fn load_with(w: &mut WeightSource, mut cfg: Config, opts: &TrainOptions) -> Result<Self> {
        if cfg.sliding_window.is_some() {
            bail!("training does not support sliding-window attention yet (Mistral's window)");
        }
        if !matches!(opts.base_dtype, DType::F32 | DType::BF16) {
            bail!("base weights must be f32 or bf16");
        }
        if opts.full && opts.lora.is_some() {
            bail!("choose LoRA or full fine-tuning, not both");
        }
        let lora = opts.lora.as_ref();
        if let Some(l) = lora {
            if l.rank == 0 {
                bail!("lora rank must be ≥ 1");
            }
            if !(0.0..1.0).contains(&l.dropout) {
                bail!("lora dropout must be in [0, 1), got {}", l.dropout);
            }
            names::check_lora_targets(&l.targets)?;
        }
        names::load_rope_freqs(w, &mut cfg.rope)?;
        let device = opts.device.clone();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(lora.map_or(0, |l| l.seed));
        let (v, h, _i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
        let (_nh, _kvh, _hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let full = opts.full;
        // Trained weights are f32 variables; frozen big weights take the base dtype, frozen
        // norms stay f32.
        let param = |t: Tensor, big: bool| -> Result<Param> {
            let t = t.to_device(&device)?;
            Ok(if full {
                Param::Trained(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
            } else {
                let dt = if big { opts.base_dtype } else { DType::F32 };
                Param::Frozen(t.to_dtype(dt)?)
            })
        };
        let mut linear =
            |w: &mut WeightSource, layer: Layer, p: Projection| -> Result<TrainLinear> {
                let (name, (out, inp)) = (layer.projection(p), p.shape(&cfg));
                let weight = param(w.tensor(&format!("{name}.weight"), &[out, inp])?, true)?;
                let bias = match p.has_bias(&cfg) {
                    true => Some(param(w.tensor(&format!("{name}.bias"), &[out])?, false)?),
                    false => None,
                };
                let short = name.rsplit('.').next().unwrap_or("");
                let adapter = lora.filter(|l| l.targets.iter().any(|t| t == short));
                let (lora, scale, dropout) = match adapter {
                    Some(l) => {
                        // PEFT: A ~ kaiming_uniform(a = √5) = U(−1/√in, 1/√in); B = 0.
                        let bound = 1.0 / (inp as f64).sqrt();
                        let a: Vec<f32> = (0..l.rank * inp)
                            .map(|_| rng.random_range(-bound..bound) as f32)
                            .collect();
                        let a = Var::from_tensor(&Tensor::from_vec(a, (l.rank, inp), &device)?)?;
                        let b = Var::zeros((out, l.rank), DType::F32, &device)?;
                        (Some((a, b)), l.alpha / l.rank as f64, l.dropout)
                    }
                    None => (None, 0.0, 0.0),
                };
                Ok(TrainLinear {
                    name,
                    weight,
                    bias,
                    lora,
                    scale,
                    dropout,
                })
            };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let l = Layer(l);
            let hd = cfg.head_dim;
            let qk_norm = match cfg.qk_norm {
                true => Some((
                    param(w.tensor(&l.q_norm(), &[hd])?, false)?,
                    param(w.tensor(&l.k_norm(), &[hd])?, false)?,
                )),
                false => None,
            };
            blocks.push(Block {
                input_layernorm: param(w.tensor(&l.input_norm(), &[h])?, false)?,
                qk_norm,
                q: linear(w, l, Projection::Q)?,
                k: linear(w, l, Projection::K)?,
                v: linear(w, l, Projection::V)?,
                o: linear(w, l, Projection::O)?,
                post_attention_layernorm: param(w.tensor(&l.post_attention_norm(), &[h])?, false)?,
                gate: linear(w, l, Projection::Gate)?,
                up: linear(w, l, Projection::Up)?,
                down: linear(w, l, Projection::Down)?,
            });
        }
        let embed = w.tensor(names::EMBED, &[v, h])?;
        let embed_tokens = param(embed.clone(), true)?;
        let lm_head = if w.has(names::LM_HEAD) {
            param(w.tensor(names::LM_HEAD, &[v, h])?, false)?
        } else if cfg.tie_word_embeddings {
            match &embed_tokens {
                // Tied: one variable serves both ends.
                Param::Trained(_) => embed_tokens.clone(),
                Param::Frozen(_) => Param::Frozen(embed.to_dtype(DType::F32)?.to_device(&device)?),
            }
        } else {
            bail!("checkpoint has no `lm_head.weight` and does not tie word embeddings");
        };
        Ok(Self {
            norm: param(w.tensor(names::NORM, &[h])?, false)?,
            gguf_head_dim: (w.gguf_content().is_some()
                && cfg.rope.layout == crate::engine::rope::RopeLayout::Interleaved)
                .then_some(cfg.head_dim),
            cfg,
            embed_tokens,
            blocks,
            lm_head,
            device,
            options: opts.clone(),
            attention_block: 128,
            loss_chunk: 512,
            checkpoint_layers: false,
            mlp_tile: 4096,
            offload_checkpoints: false,
            dropout_seed: std::cell::Cell::new(None),
        })
    }

    /// Turns the adapters' dropout on with masks drawn from `seed` (per layer and
    /// projection), or off (`None`, e.g. for evaluation).
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        self.dropout_seed.set(seed);
    }

    pub fn options(&self) -> &TrainOptions {
        &self.options
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every trained tensor with its name: PEFT names for adapters
    /// (`base_model.model.<module>.lora_A.weight`), HF names for full fine-tuning.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        let mut push = |name: String, p: &Param| {
            if let Param::Trained(v) = p {
                if !out.iter().any(|(_, o): &(String, Var)| o.id() == v.id()) {
                    out.push((name, v.clone()));
                }
            }
        };
        push(names::EMBED.into(), &self.embed_tokens);
        for (l, b) in self.blocks.iter().enumerate() {
            push(Layer(l).input_norm(), &b.input_layernorm);
            push(Layer(l).post_attention_norm(), &b.post_attention_layernorm);
            if let Some((q, k)) = &b.qk_norm {
                push(Layer(l).q_norm(), q);
                push(Layer(l).k_norm(), k);
            }
            for lin in b.linears() {
                push(format!("{}.weight", lin.name), &lin.weight);
                if let Some(bias) = &lin.bias {
                    push(format!("{}.bias", lin.name), bias);
                }
            }
        }
        push(names::NORM.into(), &self.norm);
        push(names::LM_HEAD.into(), &self.lm_head);
        for l in self.linears() {
            if let Some((a, b)) = &l.lora {
                out.push((
                    format!("base_model.model.{}.lora_A.weight", l.name),
                    a.clone(),
                ));
                out.push((
                    format!("base_model.model.{}.lora_B.weight", l.name),
                    b.clone(),
                ));
            }
        }
        out
    }

    /// Every projection, in layer order.
    pub fn linears(&self) -> Vec<&TrainLinear> {
        self.blocks.iter().flat_map(|b| b.linears()).collect()
    }

    fn prepare<'a>(&self, rows: &Rows<'a>) -> Result<Prepared<'a>> {
        let b = rows.tokens.len();
        let t = rows.tokens.first().map_or(0, Vec::len);
        if rows.tokens.iter().any(|r| r.len() != t)
            || rows.positions.len() != b
            || rows.segments.len() != b
        {
            bail!("rows of tokens, positions and segments must all be ({b}, {t})");
        }
        let ids: Vec<u32> = rows.tokens.iter().flatten().copied().collect();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            bail!(
                "token id {bad} outside the vocabulary of {}",
                self.cfg.vocab_size
            );
        }
        let (cos, sin) = self.cfg.rope.cos_sin(rows.positions, &self.device)?; // (b, t, hd/2)
        Ok(Prepared {
            ids: Tensor::new(ids, &self.device)?,
            cos,
            sin,
            b,
            t,
            segments: rows.segments,
            dropout_seed: self.dropout_seed.get(),
        })
    }

    /// Token embeddings `(b·t, hidden)` in f32.
    fn embed(&self, p: &Prepared) -> Result<Tensor> {
        Ok(self
            .embed_tokens
            .tensor()
            .index_select(&p.ids, 0)?
            .to_dtype(DType::F32)?)
    }

    /// Dropout mask seed of projection `j` of layer `l`.
    fn mask_seed(p: &Prepared, l: usize, j: u64) -> Option<u64> {
        p.dropout_seed
            .map(|s| crate::records::derived_u64(s, &[&(l as u64).to_le_bytes(), &j.to_le_bytes()]))
    }

    /// One decoder layer: `x` `(b·t, hidden)` → `(b·t, hidden)`.
    fn layer(&self, l: usize, x: &Tensor, p: &Prepared) -> Result<Tensor> {
        self.mlp_half(l, &self.attention_half(l, x, p)?, p, 0)
    }

    /// A layer's attention half: `x` `(b·t, hidden)` → `x + o(attention(norm(x)))`.
    fn attention_half(&self, l: usize, x: &Tensor, p: &Prepared) -> Result<Tensor> {
        let c = &self.cfg;
        let blk = &self.blocks[l];
        let (b, t) = (p.b, p.t);
        let (nh, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let seed = |j: u64| Self::mask_seed(p, l, j);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?) // (b, n, t, hd)
        };
        let h1 = ops::rms_norm(x, blk.input_layernorm.tensor(), c.rms_norm_eps)?;
        // Qwen3 normalizes each head's queries and keys `(b·t·n, hd)` before RoPE.
        let normed = |y: Tensor, n: usize, norm: Option<&Param>| -> Result<Tensor> {
            Ok(match norm {
                Some(w) => ops::rms_norm(&y.reshape((b * t * n, hd))?, w.tensor(), c.rms_norm_eps)?
                    .reshape((b * t, n * hd))?,
                None => y,
            })
        };
        let rotated = |y: Tensor, n: usize, norm: Option<&Param>| -> Result<Tensor> {
            let y = normed(y, n, norm)?;
            Ok(ops::rope(&heads(y, n)?, &p.cos, &p.sin, c.rope.layout)?)
        };
        let (qn, kn) = match &blk.qk_norm {
            Some((q, k)) => (Some(q), Some(k)),
            None => (None, None),
        };
        let q = rotated(blk.q.forward(&h1, seed(0), 0)?, nh, qn)?;
        let k = rotated(blk.k.forward(&h1, seed(1), 0)?, kvh, kn)?;
        let v = heads(blk.v.forward(&h1, seed(2), 0)?, kvh)?;
        let att = ops::chunked_attention(&q, &k, &v, p.segments, self.attention_block)?;
        let att = att.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        Ok((x + blk.o.forward(&att, seed(3), 0)?)?)
    }

    /// A layer's MLP half over rows `first_row..` of the `b·t` tokens: `x` `(n, hidden)` →
    /// `x + down(silu(gate(h)) · up(h))`, `h = norm(x)`. Token by token, so tiles of rows
    /// give the whole input's rows (dropout masks included).
    fn mlp_half(&self, l: usize, x: &Tensor, p: &Prepared, first_row: usize) -> Result<Tensor> {
        let blk = &self.blocks[l];
        let seed = |j: u64| Self::mask_seed(p, l, j);
        let h2 = ops::rms_norm(
            x,
            blk.post_attention_layernorm.tensor(),
            self.cfg.rms_norm_eps,
        )?;
        let gate = blk.gate.forward(&h2, seed(4), first_row)?;
        let m = ops::silu_mul(&gate, &blk.up.forward(&h2, seed(5), first_row)?)?;
        Ok((x + blk.down.forward(&m, seed(6), first_row)?)?)
    }

    /// Row ranges `(first, len)` of `n` rows in tiles of `mlp_tile` (one tile when 0).
    fn mlp_tiles(&self, n: usize) -> Vec<(usize, usize)> {
        let tile = if self.mlp_tile == 0 { n } else { self.mlp_tile };
        (0..n)
            .step_by(tile.max(1))
            .map(|s| (s, tile.min(n - s)))
            .collect()
    }

    /// A layer's output without its graph, the MLP half `mlp_tile` rows at a time (no
    /// `(tokens, intermediate)` tensor exists whole): the checkpointed forward pass.
    fn layer_detached(&self, l: usize, x: &Tensor, p: &Prepared) -> Result<Tensor> {
        let mid = self.attention_half(l, x, p)?.detach();
        let n = mid.dim(0)?;
        let tiles = self
            .mlp_tiles(n)
            .into_iter()
            .map(|(s, len)| Ok(self.mlp_half(l, &mid.narrow(0, s, len)?, p, s)?.detach()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&tiles, 0)?) // one tile: itself, no copy
    }

    /// Final hidden states `(b·t, hidden)` of `rows`.
    pub fn hidden(&self, rows: &Rows) -> Result<Tensor> {
        let p = self.prepare(rows)?;
        let mut x = self.embed(&p)?;
        for l in 0..self.blocks.len() {
            x = self.layer(l, &x, &p)?;
        }
        Ok(ops::rms_norm(
            &x,
            self.norm.tensor(),
            self.cfg.rms_norm_eps,
        )?)
    }

    /// Logits `(n, vocab)` of hidden states (whole; for checks and short inputs).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden.matmul(&self.lm_head.tensor().t()?)?)
    }

    fn head_loss(&self, h: &Tensor, targets: &[i64]) -> Result<Tensor> {
        let trained = matches!(self.lm_head, Param::Trained(_));
        ops::chunked_cross_entropy(h, self.lm_head.tensor(), targets, self.loss_chunk, trained)
            .context("the loss")
    }

    /// The summed cross-entropy of `rows` against `targets` (`(b·t)`, [`ops::IGNORE`] where
    /// no loss is taken), the logits computed `loss_chunk` rows at a time.
    pub fn loss(&self, rows: &Rows, targets: &[i64]) -> Result<Tensor> {
        let h = self.hidden(rows)?;
        self.head_loss(&h, targets)
    }

    /// A layer input kept for the backward pass: on the host when offloading from a GPU.
    fn checkpoint_out(&self, x: Tensor) -> Result<Tensor> {
        Ok(match self.offload_checkpoints && !self.device.is_cpu() {
            true => x.to_device(&Device::Cpu)?,
            false => x,
        })
    }

    /// A kept layer input back on the model's device.
    fn checkpoint_in(&self, x: Tensor) -> Result<Tensor> {
        Ok(x.to_device(&self.device)?)
    }

    /// The summed loss (as [`Self::loss`]) and the gradients of every trained tensor. With
    /// `checkpoint_layers`, only each layer's input is kept from the forward pass; the
    /// backward pass walks the layers from the top, recomputing one layer's graph at a time
    /// from its input and the gradient arriving from above (same gradients, activation
    /// memory of one layer's attention half and one MLP tile instead of every layer's).
    pub fn loss_and_grads(&self, rows: &Rows, targets: &[i64]) -> Result<(f64, GradStore)> {
        if !self.checkpoint_layers {
            let loss = self.loss(rows, targets)?;
            let value = loss.to_scalar::<f32>()? as f64;
            return Ok((value, loss.backward()?));
        }
        let vars: Vec<Var> = self.trainable().into_iter().map(|(_, v)| v).collect();
        let mut grads = GradStore::default();
        let keep = |grads: &mut GradStore, g: &GradStore| -> Result<()> {
            for v in &vars {
                if let Some(d) = g.get(v.as_tensor()) {
                    let sum = match grads.remove(v.as_tensor()) {
                        Some(acc) => (acc + d)?,
                        None => d.clone(),
                    };
                    grads.insert(v.as_tensor(), sum);
                }
            }
            Ok(())
        };
        let p = self.prepare(rows)?;
        // Forward: each layer's input kept, its graph dropped.
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut x = self.embed(&p)?.detach();
        for l in 0..self.blocks.len() {
            let y = self.layer_detached(l, &x, &p)?;
            inputs.push(self.checkpoint_out(std::mem::replace(&mut x, y))?);
        }
        // The head: final norm and loss from the last hidden state.
        let top = Var::from_tensor(&x)?;
        drop(x);
        let h = ops::rms_norm(top.as_tensor(), self.norm.tensor(), self.cfg.rms_norm_eps)?;
        let loss = self.head_loss(&h, targets)?;
        let value = loss.to_scalar::<f32>()? as f64;
        let g = loss.backward()?;
        keep(&mut grads, &g)?;
        let mut dy = g
            .get(top.as_tensor())
            .context("no gradient reached the last hidden state")?
            .detach();
        drop(g);
        // Layers from the top: recompute, backpropagate `dy`, pass the input's gradient down.
        // The MLP half goes `mlp_tile` rows at a time (its graph one tile's), then the
        // attention half takes the gradient of its output, the tiles' input gradients.
        for l in (0..self.blocks.len()).rev() {
            let input = self.checkpoint_in(inputs.pop().expect("one input per layer"))?;
            let input = Var::from_tensor(&input)?;
            let mid = self.attention_half(l, input.as_tensor(), &p)?;
            let mid_value = mid.detach();
            let mut dmid = Vec::new();
            for (s, len) in self.mlp_tiles(mid_value.dim(0)?) {
                let x = Var::from_tensor(&mid_value.narrow(0, s, len)?)?;
                let y = self.mlp_half(l, x.as_tensor(), &p, s)?;
                let g = (y * dy.narrow(0, s, len)?)?.sum_all()?.backward()?;
                keep(&mut grads, &g)?;
                dmid.push(
                    g.get(x.as_tensor())
                        .with_context(|| format!("no gradient reached layer {l}'s MLP"))?
                        .detach(),
                );
            }
            let g = (mid * Tensor::cat(&dmid, 0)?)?.sum_all()?.backward()?;
            keep(&mut grads, &g)?;
            dy = g
                .get(input.as_tensor())
                .with_context(|| format!("no gradient reached layer {l}'s input"))?
                .detach();
        }
        if let Param::Trained(e) = &self.embed_tokens {
            let x = e.as_tensor().index_select(&p.ids, 0)?;
            keep(&mut grads, &(x * &dy)?.sum_all()?.backward()?)?;
        }
        Ok((value, grads))
    }
}

impl TrainModel {
    /// Writes the adapters as a PEFT LoRA folder (`adapter_config.json` +
    /// `adapter_model.safetensors`, PEFT tensor names, q/k rows in HF order) that PEFT loads
    /// onto `base_model` and `wildlong --adapter` merges, plus the RoPE record the engine
    /// applies and checks; atomically per file.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        let Some(spec) = &self.options.lora else {
            bail!("this model has no LoRA adapters to export");
        };
        let mut tensors = std::collections::HashMap::new();
        for l in self.linears() {
            let Some((a, b)) = &l.lora else { continue };
            let b = self.hf_rows(&l.name, b.as_tensor().clone())?;
            let p = format!("base_model.model.{}", l.name);
            tensors.insert(format!("{p}.lora_A.weight"), a.as_tensor().clone());
            tensors.insert(format!("{p}.lora_B.weight"), b);
        }
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": spec.rank,
            "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout,
            "target_modules": spec.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "inference_mode": true,
        });
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        crate::records::write_atomic(
            &dir.join("adapter_model.safetensors"),
            &safetensors::serialize(&tensors, None)?,
        )?;
        crate::records::write_atomic(
            &dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        RopeRecord::of(&self.cfg.rope).write(dir)
    }

    /// q/k rows of a GGUF-sourced tensor put back in HF order (others unchanged).
    fn hf_rows(&self, name: &str, t: Tensor) -> Result<Tensor> {
        match self.gguf_head_dim {
            Some(hd)
                if name.ends_with("self_attn.q_proj") || name.ends_with("self_attn.k_proj") =>
            {
                crate::engine::weights::unpermute_rows_from_gguf(&t, hd)
            }
            _ => Ok(t),
        }
    }

    /// Writes the model with adapters merged (or fully trained weights) as an HF folder:
    /// `model.safetensors` (f32), `config.json` with the trained RoPE settings, the
    /// tokenizer (`tokenizer.json`, `tokenizer_config.json` with the chat template) and the
    /// RoPE record; the folder appears whole (written beside it, then renamed).
    pub fn save_merged(
        &self,
        dir: &Path,
        tokenizer: &crate::engine::tokenizer::Tokenizer,
        template: Option<&crate::engine::chat::ChatTemplate>,
    ) -> Result<()> {
        let config = self.cfg.to_hf_json("float32")?;
        let mut tensors = std::collections::HashMap::new();
        let plain = |p: &Param| p.f32();
        tensors.insert(names::EMBED.to_string(), plain(&self.embed_tokens)?);
        for (l, b) in self.blocks.iter().enumerate() {
            tensors.insert(Layer(l).input_norm(), plain(&b.input_layernorm)?);
            tensors.insert(
                Layer(l).post_attention_norm(),
                plain(&b.post_attention_layernorm)?,
            );
            if let Some((q, k)) = &b.qk_norm {
                tensors.insert(Layer(l).q_norm(), plain(q)?);
                tensors.insert(Layer(l).k_norm(), plain(k)?);
            }
            for lin in b.linears() {
                tensors.insert(
                    format!("{}.weight", lin.name),
                    self.hf_rows(&lin.name, lin.merged()?)?,
                );
                if let Some(bias) = &lin.bias {
                    tensors.insert(format!("{}.bias", lin.name), plain(bias)?);
                }
            }
        }
        tensors.insert(names::NORM.to_string(), plain(&self.norm)?);
        if !self.cfg.tie_word_embeddings {
            tensors.insert(names::LM_HEAD.to_string(), plain(&self.lm_head)?);
        }
        let parent = dir.parent().unwrap_or(Path::new("."));
        let name = dir
            .file_name()
            .map_or("merged".into(), |n| n.to_string_lossy().into_owned());
        let tmp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        safetensors::serialize_to_file(&tensors, None, &tmp.join("model.safetensors"))
            .with_context(|| format!("writing {}", tmp.join("model.safetensors").display()))?;
        std::fs::write(
            tmp.join("config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        tokenizer
            .inner()
            .save(tmp.join("tokenizer.json"), false)
            .map_err(|e| anyhow::anyhow!("writing tokenizer.json: {e}"))?;
        let tc = serde_json::json!({
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "chat_template": template.map(|t| t.source.clone()),
        });
        std::fs::write(
            tmp.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&tc)?,
        )?;
        RopeRecord::of(&self.cfg.rope).write(&tmp)?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("replacing {}", dir.display()))?;
        }
        std::fs::rename(&tmp, dir).with_context(|| format!("renaming to {}", dir.display()))?;
        Ok(())
    }
}

/// A model read for training, with what its exports and data need.
pub struct Loaded {
    pub model: TrainModel,
    pub tokenizer: crate::engine::tokenizer::Tokenizer,
    pub template: Option<crate::engine::chat::ChatTemplate>,
}

/// Loads `spec` (see [`crate::models::resolve`]) for training as `opts` says; the keys `rope`
/// sets replace the checkpoint's RoPE settings (a recipe's context extension).
pub fn load_with(
    spec: &str,
    models_dir: &Path,
    opts: &TrainOptions,
    rope: &crate::train::config::RopeSettings,
) -> Result<Loaded> {
    let engine_cfg = crate::engine::config::EngineConfig {
        dtype: "f32".into(),
        ..Default::default()
    };
    let mut located =
        crate::models::locate(crate::models::resolve(spec, models_dir)?, &engine_cfg)?;
    let mut cfg = located.config.clone();
    let rope = rope.over(&cfg.rope);
    if let Some(r) = &rope {
        r.apply(&mut cfg.rope);
        cfg.validate().context("the recipe's [rope] settings")?;
    }
    let model = TrainModel::load_with(&mut located.source, cfg, opts)?;
    if rope.is_some_and(|r| r.rope_scaling != RopeScaling::Default)
        && model.cfg.rope.freq_factors.is_some()
    {
        bail!("{spec}: its GGUF RoPE already carries per-frequency factors (rope_freqs); a recipe's rope_scaling would apply twice — use the HF checkpoint");
    }
    Ok(Loaded {
        model,
        tokenizer: located.tokenizer,
        template: located.chat_template,
    })
}

/// Loads `spec` with adapters per `lora` (f32, the checkpoint's RoPE), with its tokenizer.
pub fn load(
    spec: &str,
    models_dir: &Path,
    lora: Option<&LoraSpec>,
) -> Result<(
    TrainModel,
    crate::engine::tokenizer::Tokenizer,
    Option<crate::engine::chat::ChatTemplate>,
)> {
    let l = load_with(
        spec,
        models_dir,
        &TrainOptions::lora(lora),
        &Default::default(),
    )?;
    Ok((l.model, l.tokenizer, l.template))
}
