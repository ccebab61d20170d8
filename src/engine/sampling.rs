//! The one sampler: per-row RNG state over candle-transformers' `LogitsProcessor`, with
//! an optional allowed-token mask applied to the logits first (constrained decoding).

use crate::config::SamplingParams;
use anyhow::Result;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

pub struct Sampler {
    inner: LogitsProcessor,
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
        }
    }

    /// Samples one token from `logits`; `allowed(i) == false` removes token i.
    pub fn sample(
        &mut self,
        mut logits: Vec<f32>,
        allowed: Option<&dyn Fn(usize) -> bool>,
    ) -> Result<u32> {
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
