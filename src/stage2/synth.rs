//! Adaptive generation on the local engine: for each context, a few blueprints of its
//! document type are rewritten into concrete instructions for these documents, then
//! answered over the full context. Every request over one context continues the same
//! prefilled prefix (system + documents). Results live in a content-addressed store, so a
//! killed run resumes and shards never collide; `data[.shard-k-of-n].jsonl` is rebuilt from
//! the store. Gates applied here: empty or refusing answers, too-short or cut-off answers,
//! no room left in the bucket, numbers in the answer that the documents do not contain.
//! Not yet: the closed-book check, near-duplicate instructions, decontamination.

use crate::config::{GenerationParams, SamplingParams, Shard, Stage2GenerateConfig};
use crate::engine::chat::Message;
use crate::engine::generate::{Engine, FinishReason, Request};
use crate::records::{hex, write_jsonl_atomic, Blueprint, Pair, PairMetadata, Store};
use crate::stage2::assemble::Context;
use crate::stage2::prompts::{rewrite_request, user_turn, VERSION};
use anyhow::{Context as _, Result};
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Generated {
    text: String,
    finish_reason: FinishReason,
    tokens: usize,
}

/// Counts of one synthesis run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SynthStats {
    pub contexts: usize,
    pub pairs: usize,
    pub rejected: BTreeMap<String, usize>,
    /// Requests answered from the store instead of the model.
    pub reused: usize,
    pub generated: usize,
}

const REFUSALS: [&str; 6] = [
    "i'm sorry",
    "i am sorry",
    "i cannot",
    "i can't",
    "as an ai",
    "i am unable",
];

/// Why an answer is not kept, if it is not.
pub fn answer_gate(
    answer: &str,
    finish: FinishReason,
    documents: &str,
    min_words: usize,
) -> Option<&'static str> {
    let a = answer.trim();
    if a.is_empty() {
        return Some("empty_answer");
    }
    let lower = a.to_lowercase();
    if REFUSALS.iter().any(|r| lower.starts_with(r)) {
        return Some("refusal");
    }
    if finish == FinishReason::Length {
        return Some("answer_cut_off");
    }
    if a.split_whitespace().count() < min_words {
        return Some("too_short");
    }
    // Numbers of two or more digits must come from the documents.
    let mut digits = String::new();
    for c in a.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            if digits.len() >= 2 && !documents.contains(&digits) {
                return Some("ungrounded_number");
            }
            digits.clear();
        }
    }
    None
}

pub struct Synth<'a> {
    pub engine: &'a Engine,
    pub model: String,
    pub cfg: &'a Stage2GenerateConfig,
    pub store: Store,
}

impl Synth<'_> {
    fn params(
        &self,
        max_tokens: usize,
        seed: u64,
        schema: Option<serde_json::Value>,
    ) -> GenerationParams {
        GenerationParams {
            max_tokens,
            sampling: SamplingParams {
                temperature: self.cfg.temperature,
                seed,
                repetition_penalty: self.cfg.repetition_penalty,
                ..Default::default()
            },
            json_schema: schema,
            ..Default::default()
        }
    }

    /// Runs `requests` (suffix texts after the context's prefix) through the store: cached
    /// ones are read, the rest generated together over one prefill.
    fn run_requests(
        &self,
        prefix_tokens: &[u32],
        items: Vec<(String, String, GenerationParams)>,
        stats: &mut SynthStats,
    ) -> Result<Vec<Generated>> {
        let mut out: Vec<Option<Generated>> = Vec::with_capacity(items.len());
        let mut missing = Vec::new();
        for (i, (key, _, _)) in items.iter().enumerate() {
            let got = self.store.get::<Generated>(key)?;
            if got.is_none() {
                missing.push(i);
            } else {
                stats.reused += 1;
            }
            out.push(got);
        }
        if !missing.is_empty() {
            let prefix = self.engine.prefill_prefix(prefix_tokens)?;
            let reqs = missing
                .iter()
                .map(|&i| {
                    Ok(Request {
                        prompt: self.engine.tokenizer.encode(&items[i].1, false)?,
                        params: items[i].2.clone(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            for (&i, c) in missing
                .iter()
                .zip(self.engine.generate_with_prefix(&prefix, &reqs)?)
            {
                let g = Generated {
                    text: c.text,
                    finish_reason: c.finish_reason,
                    tokens: c.tokens.len(),
                };
                self.store.put(&items[i].0, &g)?;
                stats.generated += 1;
                out[i] = Some(g);
            }
        }
        out.into_iter()
            .map(|g| g.context("a request got no result"))
            .collect()
    }

    /// Pairs for this shard's contexts, written to `<dir>/data<suffix>.jsonl`.
    pub fn run(
        &self,
        contexts: &[Context],
        blueprints: &[Blueprint],
        shard: Shard,
        dir: &Path,
    ) -> Result<(Vec<Pair>, SynthStats)> {
        let mut stats = SynthStats::default();
        let mut pairs = Vec::new();
        let template = self
            .engine
            .chat_template
            .as_ref()
            .context("synthesis needs a model with a chat template")?;
        let mut by_type: BTreeMap<&str, Vec<&Blueprint>> = BTreeMap::new();
        for b in blueprints {
            by_type.entry(b.document_type.as_str()).or_default().push(b);
        }
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"instruction": {"type": "string", "minLength": 20, "maxLength": self.cfg.max_instruction_chars}},
            "required": ["instruction"], "additionalProperties": false,
            "x-guidance": {"whitespace_flexible": false, "json_allowed_escapes": "\"\\"}
        });
        for (ci, c) in contexts.iter().enumerate() {
            if !shard.owns(ci) {
                continue;
            }
            stats.contexts += 1;
            let Some(pool) = by_type.get(c.document_type.as_str()) else {
                *stats
                    .rejected
                    .entry("no_blueprint_of_type".into())
                    .or_default() += 1;
                continue;
            };
            let mut rng = crate::records::derived_rng(self.cfg.seed, &[c.id.as_bytes()]);
            let chosen: Vec<&Blueprint> = pool
                .choose_multiple(&mut rng, self.cfg.instructions_per_context)
                .copied()
                .collect();
            const MARK: &str = "\u{1}REQUEST\u{1}";
            let rendered = template.render(&user_turn(&c.text, MARK), true)?;
            let (head, tail) = rendered
                .split_once(MARK)
                .context("the chat template dropped the user message")?;
            let prefix_tokens = self.engine.tokenizer.encode(head, false)?;
            let seed = |b: &Blueprint| {
                crate::records::derived_u64(self.cfg.seed, &[c.id.as_bytes(), b.id.as_bytes()])
            };
            let key = |kind: &str, b: &Blueprint, text: &str, p: &GenerationParams| {
                Store::key(&[
                    self.model.as_bytes(),
                    VERSION.as_bytes(),
                    kind.as_bytes(),
                    c.id.as_bytes(),
                    b.id.as_bytes(),
                    text.as_bytes(),
                    serde_json::to_string(p).unwrap_or_default().as_bytes(),
                ])
            };
            // 1. Rewrite each blueprint for these documents.
            let rewrites: Vec<(String, String, GenerationParams)> = chosen
                .iter()
                .map(|b| {
                    let text = format!(
                        "{}{tail}",
                        rewrite_request(
                            &c.document_type,
                            c.documents.len(),
                            c.task_family.as_deref(),
                            &b.instruction
                        )
                    );
                    let p = self.params(
                        16 + 2 * self.cfg.max_instruction_chars,
                        seed(b),
                        Some(schema.clone()),
                    );
                    (key("rewrite", b, &text, &p), text, p)
                })
                .collect();
            let rewritten = self.run_requests(&prefix_tokens, rewrites, &mut stats)?;
            // 2. Answer each instruction over the full context.
            let mut answers = Vec::new();
            let mut kept = Vec::new();
            for (b, r) in chosen.iter().zip(rewritten) {
                let instruction = serde_json::from_str::<serde_json::Value>(&r.text)
                    .ok()
                    .and_then(|v| v["instruction"].as_str().map(|s| s.trim().to_string()))
                    .filter(|s| !s.is_empty());
                let Some(instruction) = instruction else {
                    *stats.rejected.entry("rewrite_not_json".into()).or_default() += 1;
                    continue;
                };
                let text = format!("{instruction}{tail}");
                let used = prefix_tokens.len() + self.engine.tokenizer.encode(&text, false)?.len();
                let room = c
                    .bucket
                    .saturating_sub(used)
                    .min(self.cfg.max_answer_tokens);
                if room < 16 {
                    *stats
                        .rejected
                        .entry("no_room_for_answer".into())
                        .or_default() += 1;
                    continue;
                }
                let p = self.params(room, seed(b), None);
                answers.push((key("answer", b, &text, &p), text, p));
                kept.push((*b, instruction, used));
            }
            let answered = self.run_requests(&prefix_tokens, answers, &mut stats)?;
            for ((b, instruction, used), a) in kept.into_iter().zip(answered) {
                if let Some(reason) =
                    answer_gate(&a.text, a.finish_reason, &c.text, self.cfg.min_answer_words)
                {
                    *stats.rejected.entry(reason.into()).or_default() += 1;
                    continue;
                }
                let messages = vec![
                    Message::new("user", format!("{}\n\n{instruction}", c.text)),
                    Message::new("assistant", a.text.trim()),
                ];
                let hash = hex(&Sha256::digest(
                    serde_json::to_string(&messages)?.as_bytes(),
                ));
                pairs.push(Pair {
                    id: hash[..16].to_string(),
                    messages,
                    metadata: PairMetadata {
                        document_ids: c.documents.iter().map(|d| d.id.clone()).collect(),
                        document_type: c.document_type.clone(),
                        bucket: c.bucket,
                        prompt_tokens: used,
                        multi_document: c.is_multi(),
                        task_family: c.task_family.clone(),
                        blueprint_id: b.id.clone(),
                        blueprint_path: b.path.clone(),
                        blueprint_instruction: b.instruction.clone(),
                        conversation_ids: b.provenance.conversation_ids.clone(),
                        model: self.model.clone(),
                        prompt_version: VERSION.into(),
                        seed: seed(b),
                        hash,
                    },
                });
            }
        }
        stats.pairs = pairs.len();
        write_jsonl_atomic(&dir.join(format!("data{}.jsonl", shard.suffix())), &pairs)?;
        Ok((pairs, stats))
    }
}
