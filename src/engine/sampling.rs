//! The one sampler: per-row RNG state over candle-transformers' `LogitsProcessor`, with
//! an optional allowed-token mask applied to the logits first (constrained decoding).

use crate::engine::config::SamplingParams;
use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

pub struct Sampler {
    inner: LogitsProcessor,
    repetition_penalty: Option<f32>,
}

/// Tokens of the recent output the repetition penalty looks at (llama.cpp's `repeat_last_n`).
pub const REPEAT_WINDOW: usize = 64;

/// The CTRL / HF `repetition_penalty`: logits of tokens in `history` are divided by
/// `penalty` when positive and multiplied by it when negative (each token once).
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = std::collections::HashSet::new();
    for &t in history {
        let i = t as usize;
        if i < logits.len() && seen.insert(i) {
            let l = &mut logits[i];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Self {
        let t = p.temperature;
        let sampling = if t <= 0.0 {
            Sampling::ArgMax
        } else {
            match (p.top_k, p.top_p) {
                (None, None) => Sampling::All { temperature: t },
                (Some(k), None) => Sampling::TopK { k, temperature: t },
                (None, Some(p)) => Sampling::TopP { p, temperature: t },
                (Some(k), Some(p)) => Sampling::TopKThenTopP {
                    k,
                    p,
                    temperature: t,
                },
            }
        };
        Self {
            inner: LogitsProcessor::from_sampling(p.seed, sampling),
            repetition_penalty: p.repetition_penalty.map(|x| x as f32),
        }
    }

    /// Samples one token from `logits`; `allowed(i) == false` removes token i; `history`
    /// (the row's generated tokens) feeds the repetition penalty.
    pub fn sample(
        &mut self,
        mut logits: Vec<f32>,
        allowed: Option<&dyn Fn(usize) -> bool>,
        history: &[u32],
    ) -> Result<u32> {
        if let Some(p) = self.repetition_penalty {
            let from = history.len().saturating_sub(REPEAT_WINDOW);
            apply_repetition_penalty(&mut logits, &history[from..], p);
        }
        if let Some(ok) = allowed {
            for (i, l) in logits.iter_mut().enumerate() {
                if !ok(i) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let n = logits.len();
        Ok(self
            .inner
            .sample(&Tensor::from_vec(logits, n, &Device::Cpu)?)?)
    }
}
