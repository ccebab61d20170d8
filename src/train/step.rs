//! One optimizer step: micro-batches forward and backward (each loss a token sum),
//! gradients summed and divided by the step's counted tokens (the token mean of the whole
//! step, however it is split), global-norm clipping, a non-finite check (the step is
//! skipped and counted), then AdamW at the scheduled learning rate.

use crate::train::data::Batch;
use crate::train::model::{Rows, TrainModel};
use crate::train::optim::{clip_global_norm, learning_rate, Accumulator, AdamW};
use anyhow::Result;
use candle_core::Var;
use serde::{Deserialize, Serialize};

/// How steps are taken.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSettings {
    pub lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub min_lr_ratio: f64,
    /// Global-norm clipping (None = off).
    pub max_grad_norm: Option<f64>,
}

/// What one step did (a line of the training log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    /// Token-mean loss over the step's micro-batches.
    pub loss: f64,
    pub tokens: usize,
    pub lr: f64,
    pub grad_norm: f64,
    /// True when the gradients were not finite and the update was skipped.
    pub skipped: bool,
}

/// Runs one optimizer step over `micro` batches; `step` is the 0-based step index.
pub fn train_step(
    model: &TrainModel,
    opt: &mut AdamW,
    micro: &[Batch],
    step: usize,
    s: &StepSettings,
) -> Result<StepLog> {
    let vars: Vec<Var> = opt.vars.clone();
    let mut acc = Accumulator::new(vars.len());
    let mut loss_sum = 0f64;
    let mut tokens = 0usize;
    for b in micro {
        let loss = model.loss(
            &Rows {
                tokens: &b.tokens,
                positions: &b.positions,
                segments: &b.segments,
            },
            &b.targets,
        )?;
        loss_sum += loss.to_scalar::<f32>()? as f64;
        tokens += b.counted();
        acc.add(&vars, &loss.backward()?)?;
    }
    let mut grads = acc.mean(&vars, tokens)?;
    let grad_norm = match s.max_grad_norm {
        Some(max) => clip_global_norm(&mut grads, max)?,
        None => crate::train::optim::global_norm(&grads)?,
    };
    let lr = learning_rate(s.lr, step, s.warmup_steps, s.total_steps, s.min_lr_ratio);
    let skipped = !grad_norm.is_finite() || !loss_sum.is_finite();
    if !skipped {
        opt.step(&grads, lr)?;
    }
    Ok(StepLog {
        step,
        loss: loss_sum / tokens.max(1) as f64,
        tokens,
        lr,
        grad_norm,
        skipped,
    })
}
