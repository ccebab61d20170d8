//! The generation engine every stage uses: batches of ragged prompts (left-padded, masked,
//! per-row positions), chunked prefill, a KV cache written in place, per-row sampling, stop
//! strings, EOS sets, token limits, JSON-schema constraints, and shared-prefix decoding
//! (prefill a long document once, decode many continuations after it).

use crate::engine::chat::{ChatTemplate, Message};
use crate::engine::config::{EngineConfig, GenerationParams};
use crate::engine::constrained::{Constraint, ConstraintFactory};
use crate::engine::llama::{Cache, Llama, SharedPrefix};
use crate::engine::rope::RopeScaling;
use crate::engine::sampling::Sampler;
use crate::engine::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};

/// One prompt (token ids) and how to continue it.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token (not included in the text).
    Eos,
    /// A stop string (cut from the text).
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The JSON schema admits nothing more.
    Grammar,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
}

pub struct Engine {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub config: EngineConfig,
    constraints: OnceLock<std::result::Result<ConstraintFactory, String>>,
}

/// Decoding state of one row.
struct Row {
    idx: usize,
    sampler: Sampler,
    constraint: Option<Constraint>,
    tokens: Vec<u32>,
    eos: Vec<u32>,
    max_new: usize,
    stop: Vec<String>,
    max_stop_chars: usize,
    done: Option<FinishReason>,
    next_pos: i64,
    /// Tokens to feed on the next forward pass: the sampled one plus any the grammar forces.
    pending: Vec<u32>,
}

impl Engine {
    pub fn new(
        model: Llama,
        tokenizer: Tokenizer,
        chat_template: Option<ChatTemplate>,
        config: EngineConfig,
    ) -> Self {
        Self {
            model,
            tokenizer,
            chat_template,
            config,
            constraints: OnceLock::new(),
        }
    }

    /// Longest prompt + generation this engine accepts.
    pub fn max_context(&self) -> usize {
        if let Some(m) = self.config.max_context {
            return m;
        }
        let cfg = self.model.config();
        let factor = match &cfg.rope.scaling {
            RopeScaling::Default => 1.0,
            RopeScaling::Linear { factor }
            | RopeScaling::Dynamic { factor }
            | RopeScaling::Yarn { factor, .. }
            | RopeScaling::Llama3 { factor, .. } => *factor,
        };
        let base = match &cfg.rope.scaling {
            RopeScaling::Llama3 {
                original_max_position_embeddings,
                ..
            } => (*original_max_position_embeddings as f64 * factor) as usize,
            RopeScaling::Yarn {
                original_max_position_embeddings: Some(o),
                ..
            } => (*o as f64 * factor) as usize,
            RopeScaling::Default => cfg.context_length,
            _ => (cfg.context_length as f64 * factor) as usize,
        };
        base.max(cfg.context_length)
    }

    /// Renders a chat with the model's own template and tokenizes it.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let tmpl = self
            .chat_template
            .as_ref()
            .context("this model has no chat template (GGUF `tokenizer.chat_template` or tokenizer_config.json `chat_template`)")?;
        let text = tmpl.render(messages, true)?;
        self.tokenizer.encode(&text, false)
    }

    fn constraint(&self, schema: &serde_json::Value) -> Result<Constraint> {
        let f = self
            .constraints
            .get_or_init(|| ConstraintFactory::new(&self.tokenizer).map_err(|e| format!("{e:#}")));
        match f {
            Ok(f) => f.json_schema(schema),
            Err(e) => bail!("{e}"),
        }
    }

    /// Checks every request before any work is done (bad input fails fast).
    fn validate(&self, reqs: &[Request], prefix_len: usize) -> Result<()> {
        let max = self.max_context();
        // Batches usually share one schema: compile each distinct schema once here.
        let mut checked_schemas: Vec<&serde_json::Value> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            if r.prompt.is_empty() {
                bail!("request {i}: empty prompt");
            }
            r.params
                .sampling
                .validate()
                .with_context(|| format!("request {i}"))?;
            let n = r.prompt.len() + prefix_len;
            if n >= max {
                bail!("request {i}: prompt has {n} tokens but the model's context holds {max} (prompt + generated tokens)");
            }
            if let Some(&bad) = r
                .prompt
                .iter()
                .find(|&&t| t as usize >= self.model.config().vocab_size)
            {
                bail!(
                    "request {i}: token id {bad} is outside the vocabulary ({})",
                    self.model.config().vocab_size
                );
            }
            if let Some(s) = &r.params.json_schema {
                if !checked_schemas.contains(&s) {
                    self.constraint(s).with_context(|| format!("request {i}"))?;
                    checked_schemas.push(s);
                }
            }
        }
        Ok(())
    }

    /// Generates a completion for every request, `max_batch` rows at a time, in input order.
    pub fn generate(
        &self,
        reqs: &[Request],
        mut on_done: impl FnMut(usize, &Completion),
    ) -> Result<Vec<Completion>> {
        self.validate(reqs, 0)?;
        let mut out = Vec::with_capacity(reqs.len());
        for (bi, chunk) in reqs.chunks(self.config.max_batch.max(1)).enumerate() {
            let done = self.run_batch(None, chunk)?;
            for (j, c) in done.iter().enumerate() {
                on_done(bi * self.config.max_batch.max(1) + j, c);
            }
            out.extend(done);
        }
        Ok(out)
    }

    /// Prefills `tokens` once so that many requests can continue after them.
    pub fn prefill_prefix(&self, tokens: &[u32]) -> Result<Arc<SharedPrefix>> {
        if tokens.is_empty() {
            bail!("empty shared prefix");
        }
        if tokens.len() >= self.max_context() {
            bail!(
                "shared prefix has {} tokens but the model's context holds {}",
                tokens.len(),
                self.max_context()
            );
        }
        let mut cache = Cache::new(self.model.config(), 1);
        let pos: Vec<i64> = (0..tokens.len() as i64).collect();
        self.prefill(&mut cache, &[tokens.to_vec()], &[pos])?;
        Ok(Arc::new(cache.into_prefix()?))
    }

    /// Continues every request's prompt after `prefix` (prompts hold only the suffix).
    pub fn generate_with_prefix(
        &self,
        prefix: &Arc<SharedPrefix>,
        reqs: &[Request],
    ) -> Result<Vec<Completion>> {
        self.validate(reqs, prefix.len())?;
        let mut out = Vec::with_capacity(reqs.len());
        for chunk in reqs.chunks(self.config.max_batch.max(1)) {
            out.extend(self.run_batch(Some(prefix.clone()), chunk)?);
        }
        Ok(out)
    }

    /// Runs left-padded prompts through the model in chunks; returns the last position's logits `(b, vocab)`.
    fn prefill(
        &self,
        cache: &mut Cache,
        tokens: &[Vec<u32>],
        positions: &[Vec<i64>],
    ) -> Result<Tensor> {
        let len = tokens[0].len();
        let chunk = self.config.prefill_chunk.max(1);
        let mut last = None;
        let mut start = 0;
        while start < len {
            let end = (start + chunk).min(len);
            let ids: Vec<u32> = tokens
                .iter()
                .flat_map(|r| r[start..end].iter().copied())
                .collect();
            let ids = Tensor::from_vec(ids, (tokens.len(), end - start), self.model.device())?;
            let pos: Vec<Vec<i64>> = positions.iter().map(|p| p[start..end].to_vec()).collect();
            let hidden = self.model.forward(&ids, &pos, cache)?;
            if end == len {
                last = Some(self.model.last_logits(&hidden)?);
            }
            start = end;
        }
        last.context("prefill of an empty batch")
    }

    fn run_batch(
        &self,
        prefix: Option<Arc<SharedPrefix>>,
        reqs: &[Request],
    ) -> Result<Vec<Completion>> {
        let cfg = self.model.config();
        let b = reqs.len();
        let max_len = reqs.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
        let start_pos = prefix.as_ref().map_or(0, |p| p.next_position());
        let mut cache = match &prefix {
            Some(p) => Cache::with_prefix(cfg, b, p.clone()),
            None => Cache::new(cfg, b),
        };
        let mut tokens = Vec::with_capacity(b);
        let mut positions = Vec::with_capacity(b);
        for r in reqs {
            let pad = max_len - r.prompt.len();
            let mut t = vec![0u32; pad];
            t.extend_from_slice(&r.prompt);
            let mut p = vec![-1i64; pad];
            p.extend((0..r.prompt.len() as i64).map(|i| start_pos + i));
            tokens.push(t);
            positions.push(p);
        }
        let max_ctx = self.max_context() as i64;
        let mut rows: Vec<Row> = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut eos = Vec::new();
                if !r.params.ignore_eos {
                    eos.extend(self.tokenizer.eos_ids());
                    eos.extend(&cfg.eos_token_ids);
                }
                eos.extend(&r.params.eos_token_ids);
                Ok(Row {
                    idx: i,
                    sampler: Sampler::new(&r.params.sampling),
                    constraint: r
                        .params
                        .json_schema
                        .as_ref()
                        .map(|s| self.constraint(s))
                        .transpose()?,
                    tokens: Vec::new(),
                    eos,
                    max_new: r.params.max_tokens,
                    stop: r
                        .params
                        .stop
                        .iter()
                        .filter(|s| !s.is_empty())
                        .cloned()
                        .collect(),
                    max_stop_chars: r
                        .params
                        .stop
                        .iter()
                        .map(|s| s.chars().count())
                        .max()
                        .unwrap_or(0),
                    done: None,
                    next_pos: start_pos + r.prompt.len() as i64,
                    pending: Vec::new(),
                })
            })
            .collect::<Result<_>>()?;
        let mut finished: Vec<Option<Row>> = (0..b).map(|_| None).collect();
        let mut logits = self.prefill(&mut cache, &tokens, &positions)?;
        loop {
            // Sample one token for every active row.
            let rows_logits: Vec<Vec<f32>> = logits.to_vec2()?;
            for (row, l) in rows.iter_mut().zip(rows_logits) {
                row.pending.clear();
                if row.max_new == 0 {
                    row.done = Some(FinishReason::Length);
                    continue;
                }
                let tok = match &mut row.constraint {
                    Some(c) => {
                        let mask = c.mask()?;
                        let n = mask.len();
                        row.sampler.sample(
                            l,
                            Some(&|i: usize| i < n && mask.is_allowed(i as u32)),
                            &row.tokens,
                        )?
                    }
                    None => row.sampler.sample(l, None, &row.tokens)?,
                };
                self.advance(row, tok, max_ctx)?;
                row.pending.push(tok);
                self.fast_forward(row, max_ctx)?;
            }
            // Rows that finished leave the batch.
            let keep: Vec<usize> = (0..rows.len())
                .filter(|&i| rows[i].done.is_none())
                .collect();
            let mut still = Vec::with_capacity(keep.len());
            for (i, row) in rows.into_iter().enumerate() {
                if keep.contains(&i) {
                    still.push(row);
                } else {
                    let idx = row.idx;
                    finished[idx] = Some(row);
                }
            }
            rows = still;
            if rows.is_empty() {
                break;
            }
            cache.retain_rows(&keep)?;
            // Rows feed 1 + forced tokens; shorter rows are left-padded (position -1).
            let t = rows.iter().map(|r| r.pending.len()).max().unwrap_or(1);
            let mut ids = Vec::with_capacity(rows.len() * t);
            let mut pos = Vec::with_capacity(rows.len());
            for r in &rows {
                let pad = t - r.pending.len();
                ids.extend(std::iter::repeat_n(0u32, pad));
                ids.extend(&r.pending);
                let first = r.next_pos - r.pending.len() as i64;
                let mut p = vec![-1i64; pad];
                p.extend(first..r.next_pos);
                pos.push(p);
            }
            let ids = Tensor::from_vec(ids, (rows.len(), t), self.model.device())?; // (b, t)
            if self.config.fast_forward || t == 1 {
                let hidden = self.model.forward(&ids, &pos, &mut cache)?;
                logits = self.model.last_logits(&hidden)?;
            } else {
                // Reference: the same padded columns, one forward pass each.
                for j in 0..t {
                    let col = ids.narrow(1, j, 1)?.contiguous()?; // (b, 1)
                    let p: Vec<Vec<i64>> = pos.iter().map(|p| vec![p[j]]).collect();
                    let hidden = self.model.forward(&col, &p, &mut cache)?;
                    logits = self.model.last_logits(&hidden)?;
                }
            }
        }
        finished
            .into_iter()
            .zip(reqs)
            .map(|(row, req)| {
                let row = row.context("row lost")?;
                self.finish(row, req.prompt.len())
            })
            .collect()
    }

    /// Records `tok` for `row` and decides whether the row is done.
    fn advance(&self, row: &mut Row, tok: u32, max_ctx: i64) -> Result<()> {
        if let Some(c) = &mut row.constraint {
            c.commit(tok)?;
        }
        if row.eos.contains(&tok) {
            row.done = Some(FinishReason::Eos);
            return Ok(());
        }
        row.tokens.push(tok);
        row.next_pos += 1;
        if row.constraint.as_ref().is_some_and(Constraint::is_finished) {
            row.done = Some(FinishReason::Grammar);
        } else if !row.stop.is_empty() && self.stop_hit(row)?.is_some() {
            row.done = Some(FinishReason::Stop);
        } else if row.tokens.len() >= row.max_new || row.next_pos >= max_ctx {
            row.done = Some(FinishReason::Length);
        }
        Ok(())
    }

    /// Appends the tokens a row's grammar forces next (JSON keys, punctuation), so that
    /// they cost one forward pass together instead of one pass each.
    fn fast_forward(&self, row: &mut Row, max_ctx: i64) -> Result<()> {
        if row.done.is_some() {
            return Ok(());
        }
        let Some(c) = &mut row.constraint else {
            return Ok(());
        };
        for tok in c.forced_tokens() {
            self.advance(row, tok, max_ctx)?;
            row.pending.push(tok);
            if row.done.is_some() {
                break;
            }
        }
        Ok(())
    }

    /// Checks the recent text of a row for a stop string (looking at enough trailing tokens).
    fn stop_hit(&self, row: &Row) -> Result<Option<usize>> {
        let window = (row.max_stop_chars + 8).min(row.tokens.len());
        let tail = self
            .tokenizer
            .decode(&row.tokens[row.tokens.len() - window..], false)?;
        Ok(row.stop.iter().filter_map(|s| tail.find(s.as_str())).min())
    }

    fn finish(&self, row: Row, prompt_tokens: usize) -> Result<Completion> {
        let mut text = self.tokenizer.decode(&row.tokens, true)?;
        let reason = row.done.unwrap_or(FinishReason::Length);
        if reason == FinishReason::Stop {
            if let Some(cut) = row.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
            }
        }
        Ok(Completion {
            text,
            tokens: row.tokens,
            prompt_tokens,
            finish_reason: reason,
        })
    }
}
