//! The generation engine every stage uses: requests in, completions out as each finishes,
//! scheduled by continuous batching over a paged KV cache with automatic prefix caching
//! (`engine::scheduler`); per-request sampling, stop strings, EOS sets, token limits and
//! JSON-schema constraints (this file). A request's output does not depend on what else is
//! in the batch.

use crate::engine::blocks::BlockStats;
use crate::engine::chat::{ChatTemplate, Message};
use crate::engine::config::{EngineConfig, GenerationParams};
use crate::engine::constrained::{Constraint, ConstraintFactory};
use crate::engine::llama::Llama;
use crate::engine::rope::RopeScaling;
use crate::engine::sampling::Sampler;
use crate::engine::scheduler::{PagedState, Pull};
use crate::engine::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::sync::{Mutex, OnceLock};

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
    /// Prompt tokens taken from the prefix cache instead of computed (a server's
    /// `usage.prompt_tokens_details.cached_tokens`, where it reports one).
    #[serde(default)]
    pub cached_tokens: usize,
    pub finish_reason: FinishReason,
}

pub struct Engine {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub config: EngineConfig,
    constraints: OnceLock<std::result::Result<ConstraintFactory, String>>,
    /// The paged KV cache and its blocks, made at the first request and kept (with the
    /// cached prefixes) across calls.
    pub(crate) paged: Mutex<Option<PagedState>>,
}

/// Decoding state of one request.
pub(crate) struct Row {
    sampler: Sampler,
    constraint: Option<Constraint>,
    /// Generated tokens (EOS excluded).
    pub(crate) tokens: Vec<u32>,
    eos: Vec<u32>,
    max_new: usize,
    stop: Vec<String>,
    max_stop_chars: usize,
    pub(crate) done: Option<FinishReason>,
    /// Position the next generated token takes (prompt length + generated).
    next_pos: i64,
    /// Tokens to feed next: the sampled one plus any the grammar forces.
    pub(crate) pending: Vec<u32>,
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
            paged: Mutex::new(None),
        }
    }

    /// Prefix-cache and preemption counters since the engine was made.
    pub fn cache_stats(&self) -> BlockStats {
        self.paged
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|p| p.blocks.stats))
            .unwrap_or_default()
    }

    /// Forgets every cached prefix (benchmarks measure cold runs); the cache's memory is kept.
    pub fn reset_cache(&self) {
        if let Ok(mut g) = self.paged.lock() {
            if let Some(p) = g.as_mut() {
                p.blocks = crate::engine::blocks::BlockManager::new(
                    p.blocks.num_blocks(),
                    p.blocks.block_size(),
                );
            }
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
    fn validate(&self, reqs: &[Request]) -> Result<()> {
        let plan = self.current_plan()?;
        // Batches usually share one schema: compile each distinct schema once here.
        let mut checked_schemas: Vec<&serde_json::Value> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let fresh =
                (r.params.json_schema.as_ref()).is_some_and(|s| !checked_schemas.contains(&s));
            self.check_request(i, r, &plan, fresh)?;
            if let Some(s) = &r.params.json_schema {
                checked_schemas.push(s);
            }
        }
        Ok(())
    }

    /// Checks one request (its schema compiled when `schema` is set).
    pub(crate) fn validate_one(&self, r: &Request, schema: bool) -> Result<()> {
        let max = self.max_context();
        if r.prompt.is_empty() {
            bail!("empty prompt");
        }
        r.params.sampling.validate()?;
        let n = r.prompt.len();
        if n >= max {
            bail!("prompt has {n} tokens but the model's context holds {max} (prompt + generated tokens)");
        }
        let vocab = self.model.config().vocab_size;
        if let Some(&bad) = r.prompt.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the vocabulary ({vocab})");
        }
        if let (Some(s), true) = (&r.params.json_schema, schema) {
            self.constraint(s)?;
        }
        Ok(())
    }

    /// Generates a completion for every request; `on_done(index, completion)` is called as
    /// each finishes (completion order), and the result is in input order.
    pub fn generate(
        &self,
        reqs: &[Request],
        mut on_done: impl FnMut(usize, &Completion),
    ) -> Result<Vec<Completion>> {
        self.validate(reqs)?;
        let mut out: Vec<Option<Completion>> = (0..reqs.len()).map(|_| None).collect();
        self.generate_stream(reqs.iter().cloned().map(Ok), |i, c| {
            on_done(i, &c);
            out[i] = Some(c);
            Ok(())
        })?;
        out.into_iter()
            .map(|c| c.context("a request got no completion"))
            .collect()
    }

    /// Generates for every request `reqs` yields (read as the batch has room, so a workload
    /// need not be held in memory); `on_done(index in the stream, completion)` is called as
    /// each finishes. An error from the stream or from `on_done` stops the run.
    pub fn generate_stream(
        &self,
        mut reqs: impl Iterator<Item = Result<Request>>,
        on_done: impl FnMut(usize, Completion) -> Result<()>,
    ) -> Result<()> {
        self.generate_feed(
            || match reqs.next() {
                Some(r) => r.map(|r| Pull::Request(Box::new(r))),
                None => Ok(Pull::Done),
            },
            on_done,
        )
    }

    /// Generates for the requests `next` hands out, asked whenever the batch has room: a
    /// source may answer [`Pull::Later`] while it waits for completions it builds later
    /// requests from (stage 2's answers wait for their rewrites). `on_done(index in the
    /// stream, completion)` is called as each finishes; an error from either stops the run.
    pub fn generate_feed(
        &self,
        mut next: impl FnMut() -> Result<Pull>,
        mut on_done: impl FnMut(usize, Completion) -> Result<()>,
    ) -> Result<()> {
        self.run_scheduler(&mut next, &mut on_done)
    }

    /// The decoding state of a new request.
    pub(crate) fn new_row(&self, r: &Request) -> Result<Row> {
        let cfg = self.model.config();
        let mut eos = Vec::new();
        if !r.params.ignore_eos {
            eos.extend(self.tokenizer.eos_ids());
            eos.extend(&cfg.eos_token_ids);
        }
        eos.extend(&r.params.eos_token_ids);
        Ok(Row {
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
            done: if r.params.max_tokens == 0 {
                Some(FinishReason::Length)
            } else {
                None
            },
            next_pos: r.prompt.len() as i64,
            pending: Vec::new(),
        })
    }

    /// Samples the next token of `row` from its logits and the tokens its grammar forces
    /// after it; they are left in `row.pending` (empty when the row ended on EOS).
    pub(crate) fn sample_next(&self, row: &mut Row, logits: Vec<f32>) -> Result<()> {
        let max_ctx = self.max_context() as i64;
        row.pending.clear();
        let tok = match &mut row.constraint {
            Some(c) => {
                let mask = c.mask()?;
                let n = mask.len();
                row.sampler.sample(
                    logits,
                    Some(&|i: usize| i < n && mask.is_allowed(i as u32)),
                    &row.tokens,
                )?
            }
            None => row.sampler.sample(logits, None, &row.tokens)?,
        };
        self.advance(row, tok, max_ctx)?;
        if row.done != Some(FinishReason::Eos) {
            row.pending.push(tok);
        }
        self.fast_forward(row, max_ctx)
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

    pub(crate) fn finish(
        &self,
        row: Row,
        prompt_tokens: usize,
        cached_tokens: usize,
    ) -> Result<Completion> {
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
            cached_tokens,
            finish_reason: reason,
        })
    }
}
