//! One optimizer step: micro-batches forward and backward (each loss a token sum),
//! gradients summed and divided by the step's counted tokens (the token mean of the whole
//! step, however it is split), global-norm clipping, a non-finite check (the step is
//! skipped and counted), then AdamW at the scheduled learning rate.

use crate::train::data::Batch;
use crate::train::model::TrainModel;
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
    /// Seeds the adapters' dropout masks: micro-batch `i` of step `s` draws from
    /// `derived(seed, s, i)`, so a resumed run draws the same masks.
    pub seed: u64,
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
    for (i, b) in micro.iter().enumerate() {
        model.set_dropout_seed(Some(crate::records::derived_u64(
            s.seed,
            &[
                b"dropout",
                &(step as u64).to_le_bytes(),
                &(i as u64).to_le_bytes(),
            ],
        )));
        let (loss, grads) = model.loss_and_grads(&b.rows(), &b.targets)?;
        loss_sum += loss;
        tokens += b.counted();
        acc.add(&vars, &grads)?;
    }
    model.set_dropout_seed(None);
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
