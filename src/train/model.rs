//! The trainable Llama-family model: the engine's architecture (same weights, names, RoPE
//! tables) built from the autograd-safe ops of [`crate::train::ops`], with LoRA adapters on
//! chosen projections (`y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ`, `W` frozen, `A` `(r, in)` Kaiming-uniform,
//! `B` `(out, r)` zero, as PEFT initialises them). Rows may pack several documents: each
//! token carries its position (restarting per document) and a segment id (attention never
//! crosses segments), so a packed row gives the loss of its documents alone.

use crate::engine::llama::Config;
use crate::engine::weights::WeightSource;
use crate::train::ops;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

/// Projection names LoRA may target (PEFT's `target_modules`).
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Which projections get adapters, and their shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    /// Seeds `A`'s initialisation.
    pub seed: u64,
}

/// A projection `(out, in)` with a frozen weight and an optional adapter.
pub struct TrainLinear {
    /// HF module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    weight: Tensor,
    /// `A` `(r, in)`, `B` `(out, r)`.
    pub lora: Option<(Var, Var)>,
    pub scale: f64,
}

impl TrainLinear {
    /// `x` `(n, in)` → `(n, out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = ops::frozen_matmul(x, &self.weight)?;
        Ok(match &self.lora {
            Some((a, b)) => (y + (x.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale)?)?,
            None => y,
        })
    }

    /// The frozen base weight `(out, in)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `W + (α/r)·B·A`: the weight an inference engine uses after merging.
    pub fn merged(&self) -> Result<Tensor> {
        Ok(match &self.lora {
            Some((a, b)) => (&self.weight + (b.matmul(a.as_tensor())? * self.scale)?)?,
            None => self.weight.clone(),
        })
    }
}

struct Block {
    input_layernorm: Tensor,
    q: TrainLinear,
    k: TrainLinear,
    v: TrainLinear,
    o: TrainLinear,
    post_attention_layernorm: Tensor,
    gate: TrainLinear,
    up: TrainLinear,
    down: TrainLinear,
}

/// A batch of rows: tokens, their positions (restarting per packed document) and segment
/// ids; all rows of one length.
pub struct Rows<'a> {
    pub tokens: &'a [Vec<u32>],
    pub positions: &'a [Vec<u32>],
    pub segments: &'a [Vec<u32>],
}

pub struct TrainModel {
    pub cfg: Config,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    device: Device,
    /// Set for GGUF sources: their q/k rows are in llama.cpp's permuted order.
    gguf_head_dim: Option<usize>,
    /// Adapter settings, for the export.
    lora: Option<LoraSpec>,
    /// Query rows per attention block, and rows per cross-entropy chunk.
    pub attention_block: usize,
    pub loss_chunk: usize,
}

impl TrainModel {
    /// Reads the weights (dequantized to f32) and adds adapters per `lora`.
    pub fn load(w: &mut WeightSource, mut cfg: Config, lora: Option<&LoraSpec>) -> Result<Self> {
        if cfg.attention_bias || cfg.mlp_bias || cfg.sliding_window.is_some() {
            bail!("training does not support attention/MLP biases or sliding-window attention yet");
        }
        if let Some(l) = lora {
            if l.rank == 0 {
                bail!("lora rank must be ≥ 1");
            }
            if let Some(t) = l
                .targets
                .iter()
                .find(|t| !PROJECTIONS.contains(&t.as_str()))
            {
                bail!(
                    "unknown LoRA target `{t}` (known: {})",
                    PROJECTIONS.join(", ")
                );
            }
        }
        if let Some(freqs) = w.gguf_raw("rope_freqs.weight")? {
            cfg.rope.freq_factors = Some(freqs.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        let device = Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(lora.map_or(0, |l| l.seed));
        let (v, h, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
        let (nh, kvh, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let f32t = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?) };
        let mut linear =
            |w: &mut WeightSource, name: String, out: usize, inp: usize| -> Result<TrainLinear> {
                let weight = f32t(w.tensor(&format!("{name}.weight"), &[out, inp])?)?;
                let short = name.rsplit('.').next().unwrap_or("");
                let adapter = lora.filter(|l| l.targets.iter().any(|t| t == short));
                let (lora, scale) = match adapter {
                    Some(l) => {
                        // PEFT: A ~ kaiming_uniform(a = √5) = U(−1/√in, 1/√in); B = 0.
                        let bound = 1.0 / (inp as f64).sqrt();
                        let a: Vec<f32> = (0..l.rank * inp)
                            .map(|_| rng.random_range(-bound..bound) as f32)
                            .collect();
                        let a = Var::from_tensor(&Tensor::from_vec(a, (l.rank, inp), &device)?)?;
                        let b = Var::zeros((out, l.rank), DType::F32, &device)?;
                        (Some((a, b)), l.alpha / l.rank as f64)
                    }
                    None => (None, 0.0),
                };
                Ok(TrainLinear {
                    name,
                    weight,
                    lora,
                    scale,
                })
            };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            blocks.push(Block {
                input_layernorm: f32t(w.tensor(&format!("{p}.input_layernorm.weight"), &[h])?)?,
                q: linear(w, format!("{a}.q_proj"), nh * hd, h)?,
                k: linear(w, format!("{a}.k_proj"), kvh * hd, h)?,
                v: linear(w, format!("{a}.v_proj"), kvh * hd, h)?,
                o: linear(w, format!("{a}.o_proj"), h, nh * hd)?,
                post_attention_layernorm: f32t(
                    w.tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                )?,
                gate: linear(w, format!("{m}.gate_proj"), i, h)?,
                up: linear(w, format!("{m}.up_proj"), i, h)?,
                down: linear(w, format!("{m}.down_proj"), h, i)?,
            });
        }
        let embed_tokens = f32t(w.tensor("model.embed_tokens.weight", &[v, h])?)?;
        let lm_head = if w.has("lm_head.weight") {
            f32t(w.tensor("lm_head.weight", &[v, h])?)?
        } else if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            bail!("checkpoint has no `lm_head.weight` and does not tie word embeddings");
        };
        Ok(Self {
            norm: f32t(w.tensor("model.norm.weight", &[h])?)?,
            gguf_head_dim: w.gguf_content().is_some().then_some(cfg.head_dim),
            cfg,
            embed_tokens,
            blocks,
            lm_head,
            device,
            lora: lora.cloned(),
            attention_block: 256,
            loss_chunk: 512,
        })
    }

    /// Every adapter tensor, named as PEFT names them (`base_model.model.<module>.lora_A.weight`).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
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
        self.blocks
            .iter()
            .flat_map(|b| [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down])
            .collect()
    }

    /// Final hidden states `(b·t, hidden)` of `rows`.
    pub fn hidden(&self, rows: &Rows) -> Result<Tensor> {
        let b = rows.tokens.len();
        let t = rows.tokens.first().map_or(0, Vec::len);
        if rows.tokens.iter().any(|r| r.len() != t)
            || rows.positions.len() != b
            || rows.segments.len() != b
        {
            bail!("rows of tokens, positions and segments must all be ({b}, {t})");
        }
        let c = &self.cfg;
        let (nh, kvh, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let ids: Vec<u32> = rows.tokens.iter().flatten().copied().collect();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= c.vocab_size) {
            bail!("token id {bad} outside the vocabulary of {}", c.vocab_size);
        }
        let ids = Tensor::new(ids, &self.device)?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?; // (n, h)
        let (cos, sin) = c.rope.cos_sin(rows.positions, &self.device)?; // (b, t, hd/2)
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?) // (b, n, t, hd)
        };
        for blk in &self.blocks {
            let h1 = ops::rms_norm(&x, &blk.input_layernorm, c.rms_norm_eps)?;
            let q = ops::rope(&heads(blk.q.forward(&h1)?, nh)?, &cos, &sin, c.rope.layout)?;
            let k = ops::rope(&heads(blk.k.forward(&h1)?, kvh)?, &cos, &sin, c.rope.layout)?;
            let v = heads(blk.v.forward(&h1)?, kvh)?;
            let att = ops::chunked_attention(&q, &k, &v, rows.segments, self.attention_block)?;
            let att = att.transpose(1, 2)?.reshape((b * t, nh * hd))?;
            x = (x + blk.o.forward(&att)?)?;
            let h2 = ops::rms_norm(&x, &blk.post_attention_layernorm, c.rms_norm_eps)?;
            let m = (blk.gate.forward(&h2)?.silu()? * blk.up.forward(&h2)?)?;
            x = (x + blk.down.forward(&m)?)?;
        }
        Ok(ops::rms_norm(&x, &self.norm, c.rms_norm_eps)?)
    }

    /// Logits `(n, vocab)` of hidden states (whole; for checks and short inputs).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden.matmul(&self.lm_head.t()?)?)
    }

    /// The summed cross-entropy of `rows` against `targets` (`(b·t)`, [`ops::IGNORE`] where
    /// no loss is taken), the logits computed `loss_chunk` rows at a time.
    pub fn loss(&self, rows: &Rows, targets: &[i64]) -> Result<Tensor> {
        let h = self.hidden(rows)?;
        ops::chunked_cross_entropy(&h, &self.lm_head, targets, self.loss_chunk, false)
            .context("the loss")
    }
}

impl TrainModel {
    /// Writes the adapters as a PEFT LoRA folder (`adapter_config.json` +
    /// `adapter_model.safetensors`, PEFT tensor names, q/k rows in HF order) that PEFT loads
    /// onto `base_model` and `wildlong --adapter` merges; atomically.
    pub fn save_peft(&self, dir: &std::path::Path, base_model: &str) -> Result<()> {
        let Some(spec) = &self.lora else {
            bail!("this model has no LoRA adapters to export");
        };
        let mut tensors = std::collections::HashMap::new();
        for l in self.linears() {
            let Some((a, b)) = &l.lora else { continue };
            let mut b = b.as_tensor().clone();
            if let Some(hd) = self.gguf_head_dim {
                if l.name.ends_with("self_attn.q_proj") || l.name.ends_with("self_attn.k_proj") {
                    b = crate::engine::weights::unpermute_rows_from_gguf(&b, hd)?;
                }
            }
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
            "lora_dropout": 0.0,
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
        )
    }
}

/// Loads `spec` (see [`crate::models::resolve`]) for training, with its tokenizer.
pub fn load(
    spec: &str,
    models_dir: &std::path::Path,
    lora: Option<&LoraSpec>,
) -> Result<(
    TrainModel,
    crate::engine::tokenizer::Tokenizer,
    Option<crate::engine::chat::ChatTemplate>,
)> {
    let engine_cfg = crate::config::EngineConfig {
        dtype: "f32".into(),
        ..Default::default()
    };
    let mut located =
        crate::models::locate(crate::models::resolve(spec, models_dir)?, &engine_cfg)?;
    let model = TrainModel::load(&mut located.source, located.config.clone(), lora)?;
    Ok((model, located.tokenizer, located.chat_template))
}
