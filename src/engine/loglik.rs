//! Log-likelihood of continuations (lm-evaluation-harness's `loglikelihood` requests): the
//! sum over a continuation's tokens of log p(token | everything before it), from one forward
//! pass over context + continuation. Requests that share a context and whose continuations
//! are single tokens (MMLU's " A" … " D") share that forward pass.

use crate::engine::generate::Engine;
use crate::engine::llama::{Cache, Llama};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use std::collections::HashMap;

/// One scored continuation: the summed log-probability, and whether every continuation token
/// is the argmax of its position (lm-eval's `is_greedy`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogLik {
    pub logprob: f64,
    pub greedy: bool,
}

/// Log-probabilities `(n, vocab)` of the positions whose hidden states are rows `from..from+n`
/// of one sequence's forward pass over `tokens`.
fn log_probs(model: &Llama, tokens: &[u32], from: usize, n: usize) -> Result<Tensor> {
    let mut cache = Cache::new(model.config(), 1);
    let ids = Tensor::new(tokens, model.device())?.unsqueeze(0)?; // (1, t)
    let pos = vec![(0..tokens.len() as i64).collect::<Vec<_>>()];
    let h = model.forward(&ids, &pos, &mut cache)?; // (1, t, hidden)
    let rows = h.squeeze(0)?.narrow(0, from, n)?.contiguous()?; // (n, hidden)
    let logits = model.logits(&rows)?.to_dtype(DType::F32)?; // (n, vocab)
    Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
}

/// Picks `targets[i]` from row i of `lp` `(n, vocab)`: summed log-probability and whether each
/// target is its row's argmax.
fn pick(lp: &Tensor, targets: &[u32]) -> Result<LogLik> {
    let rows: Vec<Vec<f32>> = lp.to_vec2()?;
    let mut logprob = 0f64;
    let mut greedy = true;
    for (row, &t) in rows.iter().zip(targets) {
        let v = row[t as usize];
        logprob += v as f64;
        greedy &= row.iter().all(|&x| x <= v);
    }
    Ok(LogLik { logprob, greedy })
}

impl Engine {
    /// The log-likelihood of each `(context, continuation)` pair of token ids. As
    /// lm-evaluation-harness's HF backend: the model reads `(context + continuation)[..-1]`,
    /// cut from the left to the model's context if longer; an empty context is an error (it
    /// would need a BOS/EOS token to condition on, which callers choose).
    pub fn loglikelihood(&self, reqs: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<LogLik>> {
        let max = self.max_context();
        let mut out = vec![None; reqs.len()];
        // Single-token continuations after one context: one pass over the context.
        let mut shared: HashMap<&[u32], Vec<usize>> = HashMap::new();
        for (i, (ctx, cont)) in reqs.iter().enumerate() {
            if ctx.is_empty() || cont.is_empty() {
                bail!("loglikelihood request {i}: empty context or continuation");
            }
            if cont.len() == 1 && ctx.len() <= max {
                shared.entry(ctx.as_slice()).or_default().push(i);
            }
        }
        for (ctx, idx) in &shared {
            let lp = log_probs(&self.model, ctx, ctx.len() - 1, 1)?; // (1, vocab)
            for &i in idx {
                out[i] = Some(pick(&lp, &reqs[i].1)?);
            }
        }
        for (i, (ctx, cont)) in reqs.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            let mut all: Vec<u32> = ctx.iter().chain(cont).copied().collect();
            all.pop();
            // Left truncation to the model's context, as lm-eval does.
            let cut = all.len().saturating_sub(max);
            if cut >= ctx.len() {
                bail!(
                    "loglikelihood request {i}: its continuation alone ({} tokens) exceeds the model's context ({max})",
                    cont.len()
                );
            }
            let input = &all[cut..];
            let from = ctx.len() - 1 - cut;
            let lp = log_probs(&self.model, input, from, cont.len())?;
            out[i] = Some(pick(&lp, cont)?);
        }
        Ok(out
            .into_iter()
            .map(|x| x.expect("every request scored"))
            .collect())
    }
}
