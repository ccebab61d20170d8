//! Optimisation: AdamW (decoupled weight decay, bias-corrected moments in f32, as
//! `torch.optim.AdamW`), the learning-rate schedule (linear warm-up then cosine decay to a
//! floor), gradient accumulation, global-norm clipping and non-finite gradient detection.
//! candle-nn's `AdamW` keeps its moments private, so a checkpoint could not restore them:
//! this one exposes its state for exact resume.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// PyTorch's defaults.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The learning rate of optimizer step `step` (0-based): linear warm-up from 0 over `warmup`
/// steps, then cosine decay to `lr · min_ratio` at `total` steps — HF's
/// `get_cosine_with_min_lr_schedule_with_warmup` (`get_cosine_schedule_with_warmup` when
/// `min_ratio` is 0), stepped as the HF Trainer steps it.
pub fn learning_rate(lr: f64, step: usize, warmup: usize, total: usize, min_ratio: f64) -> f64 {
    if step < warmup {
        return lr * step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = (step - warmup) as f64 / span as f64;
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    lr * (min_ratio + (1.0 - min_ratio) * cosine).max(0.0)
}

/// AdamW over a fixed list of variables.
pub struct AdamW {
    pub params: AdamWParams,
    pub vars: Vec<Var>,
    /// First and second moments, one pair per variable (f32).
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Optimizer steps taken (bias correction uses it).
    pub t: usize,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like()?.to_dtype(DType::F32);
        Ok(Self {
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            vars,
            params,
            t: 0,
        })
    }

    /// One update with gradients `grads` (one per variable, already averaged and clipped).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            bail!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            );
        }
        self.t += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.t as i32);
        let bc2 = 1.0 - p.beta2.powi(self.t as i32);
        for (i, var) in self.vars.iter().enumerate() {
            let g = grads[i].to_dtype(DType::F32)?;
            let m = ((&self.m[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let w = var.as_tensor().to_dtype(DType::F32)?;
            // θ ← θ·(1 − lr·λ) − lr · m̂ / (√v̂ + ε)
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + p.eps)?)?;
            let next = ((w * (1.0 - lr * p.weight_decay))? - (update * lr)?)?;
            var.set(&next.to_dtype(var.dtype())?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// √Σ‖g‖² over all gradients (f64 accumulation).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut s = 0f64;
    for g in grads {
        s += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(s.sqrt())
}

/// Scales `grads` so that their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when it is below 1); returns the norm
/// before clipping. A non-finite norm is returned as is and nothing is scaled.
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if !norm.is_finite() {
        return Ok(norm);
    }
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * factor)?;
        }
    }
    Ok(norm)
}

/// Sums gradients over micro-batches; the loss of each micro-batch is a token sum, so the
/// sum divided by the step's token count is the token mean of the whole step however it is
/// split (the averaging does not change with accumulation).
pub struct Accumulator {
    pub sums: Vec<Option<Tensor>>,
}

impl Accumulator {
    pub fn new(n: usize) -> Self {
        Self {
            sums: vec![None; n],
        }
    }

    pub fn add(&mut self, vars: &[Var], grads: &candle_core::backprop::GradStore) -> Result<()> {
        for (s, v) in self.sums.iter_mut().zip(vars) {
            if let Some(g) = grads.get(v.as_tensor()) {
                let g = g.to_dtype(DType::F32)?;
                *s = Some(match s.take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// The summed gradients divided by `tokens` (zeros where a variable got none).
    pub fn mean(self, vars: &[Var], tokens: usize) -> Result<Vec<Tensor>> {
        let d = tokens.max(1) as f64;
        self.sums
            .into_iter()
            .zip(vars)
            .map(|(s, v)| match s {
                Some(g) => Ok((g / d)?),
                None => Ok(v.as_tensor().zeros_like()?.to_dtype(DType::F32)?),
            })
            .collect()
    }
}
