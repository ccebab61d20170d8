//! Rotary position embeddings: the one RoPE implementation of the project.
//!
//! Computes inverse frequencies for every scaling type Hugging Face transformers knows for
//! Llama-family models (`default`, `linear`, `dynamic`, `yarn`, `llama3`) plus GGUF's
//! per-frequency `rope_freqs` factors, builds cos/sin tables for arbitrary per-row positions
//! (no fixed position cap), and applies them in either layout: half-split (HF checkpoints)
//! or interleaved (llama.cpp GGUF files, whose q/k weights were permuted by the converter).
//! The formulas follow `transformers/modeling_rope_utils.py`; the tests compare against
//! values produced by those functions (`scripts/make_rope_fixture.py`).

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How frequencies are stretched beyond the pre-training context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RopeScaling {
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Dynamic NTK: the base grows with the current sequence length beyond the original context.
    /// As in HF, the threshold is the config's `max_position_embeddings`.
    Dynamic {
        factor: f64,
    },
    /// YaRN: per-dimension blend of interpolation and extrapolation plus an attention factor.
    Yarn {
        factor: f64,
        original_max_position_embeddings: Option<usize>,
        attention_factor: Option<f64>,
        beta_fast: Option<f64>,
        beta_slow: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: Option<bool>,
    },
    /// Llama 3.1: wavelength-dependent smoothing between low and high frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Where the two halves of each rotated pair live inside a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeLayout {
    /// Pairs are (i, i + d/2): HF transformers' `rotate_half`.
    HalfSplit,
    /// Pairs are (2i, 2i + 1): Meta's original code and llama.cpp's `llama` architecture.
    Interleaved,
}

/// The RoPE contract carried from config through training, checkpoint, inference and eval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeConfig {
    pub theta: f64,
    /// Rotary dimension (the head dimension for every Llama-family model).
    pub dim: usize,
    /// `max_position_embeddings` of the checkpoint (the default "original" context).
    pub max_position_embeddings: usize,
    pub scaling: RopeScaling,
    pub layout: RopeLayout,
    /// GGUF `rope_freqs.weight`: per-frequency divisors (llama3 scaling baked by llama.cpp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freq_factors: Option<Vec<f32>>,
}

impl RopeScaling {
    /// Parses HF `config.json`'s `rope_scaling` (accepts `rope_type` or the legacy `type`).
    pub fn from_hf_json(v: Option<&Value>) -> Result<Self> {
        let Some(v) = v else { return Ok(Self::Default) };
        if v.is_null() {
            return Ok(Self::Default);
        }
        let obj = v
            .as_object()
            .context("`rope_scaling` must be an object or null")?;
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .context("`rope_scaling` has no `rope_type`")?;
        let f = |k: &str| obj.get(k).and_then(Value::as_f64);
        let u = |k: &str| obj.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let need =
            |k: &str| f(k).with_context(|| format!("`rope_scaling.{k}` is required for `{kind}`"));
        Ok(match kind {
            "default" => Self::Default,
            "linear" => Self::Linear { factor: need("factor")? },
            "dynamic" => Self::Dynamic { factor: need("factor")? },
            "yarn" => Self::Yarn {
                factor: need("factor")?,
                original_max_position_embeddings: u("original_max_position_embeddings"),
                attention_factor: f("attention_factor"),
                beta_fast: f("beta_fast"),
                beta_slow: f("beta_slow"),
                mscale: f("mscale"),
                mscale_all_dim: f("mscale_all_dim"),
                truncate: obj.get("truncate").and_then(Value::as_bool),
            },
            "llama3" => Self::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: u("original_max_position_embeddings")
                    .context("`rope_scaling.original_max_position_embeddings` is required for `llama3`")?,
            },
            other => bail!(
                "unsupported rope_scaling type `{other}` (supported: default, linear, dynamic, yarn, llama3)"
            ),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Linear { .. } => "linear",
            Self::Dynamic { .. } => "dynamic",
            Self::Yarn { .. } => "yarn",
            Self::Llama3 { .. } => "llama3",
        }
    }

    fn check(&self) -> Result<()> {
        let factor = match self {
            Self::Default => return Ok(()),
            Self::Linear { factor }
            | Self::Dynamic { factor, .. }
            | Self::Yarn { factor, .. }
            | Self::Llama3 { factor, .. } => *factor,
        };
        if !(factor.is_finite() && factor >= 1.0) {
            bail!("rope_scaling.factor must be a finite number >= 1, got {factor}");
        }
        if let Self::Llama3 {
            low_freq_factor,
            high_freq_factor,
            ..
        } = self
        {
            if high_freq_factor <= low_freq_factor {
                bail!("rope_scaling: high_freq_factor ({high_freq_factor}) must exceed low_freq_factor ({low_freq_factor})");
            }
        }
        Ok(())
    }
}

/// YaRN's attention-magnitude correction (`get_mscale` in HF and DeepSeek).
fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeConfig {
    pub fn validate(&self) -> Result<()> {
        if self.dim == 0 || !self.dim.is_multiple_of(2) {
            bail!(
                "rotary dimension must be even and positive, got {}",
                self.dim
            );
        }
        if !(self.theta.is_finite() && self.theta > 1.0) {
            bail!("rope_theta must be > 1, got {}", self.theta);
        }
        if let Some(ff) = &self.freq_factors {
            if ff.len() != self.dim / 2 {
                bail!(
                    "rope_freqs has {} entries, expected {}",
                    ff.len(),
                    self.dim / 2
                );
            }
        }
        self.scaling.check()
    }

    /// Unscaled inverse frequencies `1 / theta^(2i/d)`, computed as HF does (f32 exponent).
    fn base_inv_freq(&self, base: f64) -> Vec<f64> {
        let d = self.dim;
        (0..d / 2)
            .map(|i| {
                let exponent = ((2 * i) as f32 / d as f32) as f64;
                1.0 / base.powf(exponent)
            })
            .collect()
    }

    /// Inverse frequencies (d/2) and the attention factor applied to cos/sin, for a batch whose
    /// longest row spans `seq_len` positions (only `dynamic` depends on it).
    pub fn inv_freq(&self, seq_len: usize) -> (Vec<f32>, f32) {
        let d = self.dim as f64;
        let (mut inv, attn) = match &self.scaling {
            RopeScaling::Default => (self.base_inv_freq(self.theta), 1.0),
            RopeScaling::Linear { factor } => (
                self.base_inv_freq(self.theta)
                    .into_iter()
                    .map(|f| f / factor)
                    .collect(),
                1.0,
            ),
            RopeScaling::Dynamic { factor } => {
                let max_pos = self.max_position_embeddings as f64;
                let seq = (seq_len as f64).max(max_pos);
                let base =
                    self.theta * ((factor * seq / max_pos) - (factor - 1.0)).powf(d / (d - 2.0));
                (self.base_inv_freq(base), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let orig =
                    original_max_position_embeddings.unwrap_or(self.max_position_embeddings) as f64;
                let attn = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                        yarn_get_mscale(*factor, *m) / yarn_get_mscale(*factor, *ma)
                    }
                    _ => yarn_get_mscale(*factor, 1.0),
                };
                let beta_fast = beta_fast.unwrap_or(32.0);
                let beta_slow = beta_slow.unwrap_or(1.0);
                let base = self.theta;
                let correction_dim = |rot: f64| {
                    (d * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate.unwrap_or(true) {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(d - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let extra = self.base_inv_freq(base);
                let inv = extra
                    .iter()
                    .enumerate()
                    .map(|(i, &e)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        let interp = e / factor;
                        interp * (1.0 - extrapolation_factor) + e * extrapolation_factor
                    })
                    .collect();
                (inv, attn)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let inv = self
                    .base_inv_freq(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
        };
        if let Some(ff) = &self.freq_factors {
            for (f, k) in inv.iter_mut().zip(ff) {
                *f /= *k as f64;
            }
        }
        (inv.into_iter().map(|f| f as f32).collect(), attn as f32)
    }

    /// cos and sin tables for per-row positions `positions` (b rows of t positions each):
    /// both `(b, t, d/2)` f32, already multiplied by the attention factor.
    pub fn cos_sin(&self, positions: &[Vec<u32>], device: &Device) -> Result<(Tensor, Tensor)> {
        let b = positions.len();
        let t = positions.first().map_or(0, Vec::len);
        if positions.iter().any(|p| p.len() != t) {
            bail!("rope: rows of different lengths");
        }
        let max_pos = positions.iter().flatten().copied().max().unwrap_or(0) as usize;
        let (inv, attn) = self.inv_freq(max_pos + 1);
        let half = inv.len();
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for row in positions {
            for &p in row {
                for &f in &inv {
                    // f32 product, as HF (`inv_freq @ position_ids` in float32) and llama.cpp do.
                    let a = p as f32 * f;
                    cos.push(a.cos() * attn);
                    sin.push(a.sin() * attn);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (b, t, half), device)?;
        let sin = Tensor::from_vec(sin, (b, t, half), device)?;
        Ok((cos, sin))
    }

    /// Rotates `x` `(b, h, t, d)` with tables from [`Self::cos_sin`] (fused candle kernel).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let cos = cos.to_dtype(x.dtype())?;
        let sin = sin.to_dtype(x.dtype())?;
        Ok(match self.layout {
            RopeLayout::HalfSplit => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
        })
    }

    /// Plain reference of [`Self::apply`] from elementary ops (records gradients).
    pub fn apply_slow(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, h, t, d) = x.dims4()?;
        let cos = cos.to_dtype(x.dtype())?.unsqueeze(1)?; // (b, 1, t, d/2)
        let sin = sin.to_dtype(x.dtype())?.unsqueeze(1)?;
        Ok(match self.layout {
            RopeLayout::HalfSplit => {
                let x1 = x.narrow(3, 0, d / 2)?;
                let x2 = x.narrow(3, d / 2, d / 2)?;
                let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
                let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
                Tensor::cat(&[r1, r2], 3)?
            }
            RopeLayout::Interleaved => {
                let xp = x.reshape((b, h, t, d / 2, 2))?;
                let x1 = xp.narrow(4, 0, 1)?.squeeze(4)?;
                let x2 = xp.narrow(4, 1, 1)?.squeeze(4)?;
                let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
                let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
                Tensor::stack(&[r1, r2], 4)?.reshape((b, h, t, d))?
            }
        })
    }
}

/// The file a trained adapter or merged model carries to say which RoPE it was trained with.
pub const ROPE_RECORD_FILE: &str = "wildlong_rope.json";

/// The RoPE settings training used, saved beside its outputs (adapter folder, merged model)
/// and checked by every load of them: an adapter brings its RoPE onto the base model; a
/// load whose RoPE would differ (an engine `rope_theta` override, an edited `config.json`)
/// is an error rather than a silent fallback to other positions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeRecord {
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// The checkpoint's (original) context, the threshold of `dynamic` scaling.
    pub max_position_embeddings: usize,
}

impl RopeRecord {
    pub fn of(rope: &RopeConfig) -> Self {
        Self {
            rope_theta: rope.theta,
            rope_scaling: rope.scaling.clone(),
            max_position_embeddings: rope.max_position_embeddings,
        }
    }

    /// Reads `dir/wildlong_rope.json` when present.
    pub fn read(dir: &std::path::Path) -> Result<Option<Self>> {
        let p = dir.join(ROPE_RECORD_FILE);
        if !p.is_file() {
            return Ok(None);
        }
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{}: not a RoPE record", p.display()))
    }

    pub fn write(&self, dir: &std::path::Path) -> Result<()> {
        crate::records::write_atomic(
            &dir.join(ROPE_RECORD_FILE),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }

    /// Errors when `rope` is not what training used (`what` names the loaded thing).
    pub fn check(&self, rope: &RopeConfig, what: &str) -> Result<()> {
        let now = Self::of(rope);
        if &now != self {
            bail!(
                "{what} was trained with RoPE {} but would run with {}; remove the engine's rope_theta override or use the config training wrote",
                serde_json::to_string(self)?,
                serde_json::to_string(&now)?
            );
        }
        Ok(())
    }

    /// Puts these settings into `rope`.
    pub fn apply(&self, rope: &mut RopeConfig) {
        rope.theta = self.rope_theta;
        rope.scaling = self.rope_scaling.clone();
        rope.max_position_embeddings = self.max_position_embeddings;
    }
}
