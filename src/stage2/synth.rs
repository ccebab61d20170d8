//! Adaptive generation: for each context, a few blueprints of its document type are
//! rewritten into concrete instructions for these documents, then answered over the full
//! context. Every request over one context starts with the same tokens (system +
//! documents): the local engine's prefix cache computes them once; on an OpenAI-compatible
//! server each request carries the whole context (servers with prefix caching reuse it). Results live in a
//! content-addressed store, so a killed run resumes and shards never collide;
//! `data[.shard-k-of-n].jsonl` is rebuilt from the store. The gates of [`gates`] are
//! applied in a fixed order (answer, grounding, closed-book, decontamination, then
//! near-duplicate instructions in context order), so the same store gives the same data.

use crate::engine::chat::{ChatTemplate, Message};
use crate::engine::config::{GenerationParams, SamplingParams};
use crate::engine::generate::{Completion, FinishReason, Request};
use crate::engine::tokenizer::Tokenizer;
use crate::generator::Llm;
use crate::records::{hex, write_jsonl_atomic, Blueprint, Pair, PairMetadata, Store};
use crate::shard::Shard;
use crate::stage2::assemble::Context;
use crate::stage2::config::Stage2Config;
use crate::stage2::gates::{answer_gate, instruction_index, Decontaminator};
use crate::stage2::prompts::{closed_book_turn, rewrite_request, user_turn, VERSION};
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
    /// The local engine's prefix cache (each document is computed once for all its
    /// requests).
    #[serde(default)]
    pub prefix_cache: Option<crate::engine::blocks::CacheUse>,
}

pub struct Synth<'a> {
    pub llm: &'a Llm,
    /// The target model's tokenizer and chat template (prompt lengths are measured with
    /// them whichever backend generates).
    pub tokenizer: &'a Tokenizer,
    pub template: &'a ChatTemplate,
    pub model: String,
    pub cfg: &'a Stage2Config,
    pub decontaminate: Option<&'a Decontaminator>,
    pub store: Store,
}

/// One request over a context: its store key, the text after the documents, parameters.
struct Item {
    key: String,
    request: String,
    params: GenerationParams,
}

fn reject(stats: &mut SynthStats, reason: &str) {
    *stats.rejected.entry(reason.into()).or_default() += 1;
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
                temperature: self.cfg.generate.temperature,
                seed,
                repetition_penalty: self.cfg.generate.repetition_penalty,
                ..Default::default()
            },
            json_schema: schema,
            ..Default::default()
        }
    }

    /// Runs `items` through the store: cached ones are read, the rest generated. `context`
    /// is `None` for requests without the documents; otherwise, on the local engine, the
    /// items start with `prefix_tokens` (cached by the engine) and end with the template's
    /// `tail`.
    fn run_requests(
        &self,
        context: Option<(&str, &[u32], &str)>,
        items: &[Item],
        stats: &mut SynthStats,
    ) -> Result<Vec<Generated>> {
        let mut out: Vec<Option<Generated>> = Vec::with_capacity(items.len());
        let mut missing = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let got = self.store.get::<Generated>(&it.key)?;
            if got.is_none() {
                missing.push(i);
            } else {
                stats.reused += 1;
            }
            out.push(got);
        }
        if missing.is_empty() {
            return out
                .into_iter()
                .map(|g| g.context("a request got no result"))
                .collect();
        }
        let done: Vec<Completion> = match (self.llm, context) {
            (Llm::Local(engine), Some((_, prefix_tokens, tail))) => {
                // Every request starts with the documents' tokens: the engine's prefix cache
                // computes them once.
                let reqs = missing
                    .iter()
                    .map(|&i| {
                        let mut prompt = prefix_tokens.to_vec();
                        prompt.extend(
                            engine
                                .tokenizer
                                .encode(&format!("{}{tail}", items[i].request), false)?,
                        );
                        Ok(Request {
                            prompt,
                            params: items[i].params.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                engine.generate(&reqs, |_, _| {})?
            }
            (_, context) => {
                let reqs: Vec<(Vec<Message>, GenerationParams)> = missing
                    .iter()
                    .map(|&i| {
                        let messages = match context {
                            Some((documents, _, _)) => user_turn(documents, &items[i].request),
                            None => closed_book_turn(&items[i].request),
                        };
                        (messages, items[i].params.clone())
                    })
                    .collect();
                self.llm.chat_batch(&reqs)?
            }
        };
        for (&i, c) in missing.iter().zip(done) {
            let tokens = match c.tokens.len() {
                0 => self.tokenizer.encode(&c.text, false)?.len(),
                n => n,
            };
            let g = Generated {
                text: c.text,
                finish_reason: c.finish_reason,
                tokens,
            };
            self.store.put(&items[i].key, &g)?;
            stats.generated += 1;
            out[i] = Some(g);
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
        let cache_before = self.llm.local().map(|e| e.cache_stats());
        let mut pairs = Vec::new();
        let g = &self.cfg.generate;
        let gates = &self.cfg.gates;
        let mut by_type: BTreeMap<&str, Vec<&Blueprint>> = BTreeMap::new();
        for b in blueprints {
            by_type.entry(b.document_type.as_str()).or_default().push(b);
        }
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"instruction": {"type": "string", "minLength": 20, "maxLength": g.max_instruction_chars}},
            "required": ["instruction"], "additionalProperties": false,
            "x-guidance": {"whitespace_flexible": false, "json_allowed_escapes": "\"\\"}
        });
        let mut near = instruction_index(gates.near_duplicate_threshold, g.seed);
        for (ci, c) in contexts.iter().enumerate() {
            if !shard.owns(ci) {
                continue;
            }
            stats.contexts += 1;
            // Stage 1 merged its rare types into `other`: a type without blueprints of its
            // own takes those.
            let Some(pool) = by_type
                .get(c.document_type.as_str())
                .or_else(|| by_type.get("other"))
            else {
                reject(&mut stats, "no_blueprint_of_type");
                continue;
            };
            let mut rng = crate::records::derived_rng(g.seed, &[c.id.as_bytes()]);
            let chosen: Vec<&Blueprint> = pool
                .choose_multiple(&mut rng, g.instructions_per_context)
                .copied()
                .collect();
            const MARK: &str = "\u{1}REQUEST\u{1}";
            let rendered = self.template.render(&user_turn(&c.text, MARK), true)?;
            let (head, tail) = rendered
                .split_once(MARK)
                .context("the chat template dropped the user message")?;
            let prefix_tokens = self.tokenizer.encode(head, false)?;
            let ctx = Some((c.text.as_str(), prefix_tokens.as_slice(), tail));
            let seed = |b: &Blueprint| {
                crate::records::derived_u64(g.seed, &[c.id.as_bytes(), b.id.as_bytes()])
            };
            let item =
                |kind: &str, b: &Blueprint, request: String, params: GenerationParams| Item {
                    key: Store::key(&[
                        self.model.as_bytes(),
                        VERSION.as_bytes(),
                        kind.as_bytes(),
                        c.id.as_bytes(),
                        b.id.as_bytes(),
                        request.as_bytes(),
                        serde_json::to_string(&params)
                            .unwrap_or_default()
                            .as_bytes(),
                    ]),
                    request,
                    params,
                };
            // 1. Rewrite each blueprint for these documents.
            let rewrites: Vec<Item> = chosen
                .iter()
                .map(|b| {
                    let request = rewrite_request(
                        &c.document_type,
                        c.documents.len(),
                        c.task_family.as_deref(),
                        &b.instruction,
                    );
                    let p = self.params(
                        16 + 2 * g.max_instruction_chars,
                        seed(b),
                        Some(schema.clone()),
                    );
                    item("rewrite", b, request, p)
                })
                .collect();
            let rewritten = self.run_requests(ctx, &rewrites, &mut stats)?;
            // 2. Answer each instruction over the full context.
            let mut answers = Vec::new();
            let mut kept = Vec::new();
            for (b, r) in chosen.iter().zip(rewritten) {
                let instruction = serde_json::from_str::<serde_json::Value>(&r.text)
                    .ok()
                    .and_then(|v| v["instruction"].as_str().map(|s| s.trim().to_string()))
                    .filter(|s| !s.is_empty());
                let Some(instruction) = instruction else {
                    reject(&mut stats, "rewrite_not_json");
                    continue;
                };
                let used = prefix_tokens.len()
                    + self
                        .tokenizer
                        .encode(&format!("{instruction}{tail}"), false)?
                        .len();
                let room = c.bucket.saturating_sub(used).min(g.max_answer_tokens);
                if room < 16 {
                    reject(&mut stats, "no_room_for_answer");
                    continue;
                }
                let p = self.params(room, seed(b), None);
                answers.push(item("answer", b, instruction.clone(), p));
                kept.push((*b, instruction, used));
            }
            let answered = self.run_requests(ctx, &answers, &mut stats)?;
            // 3. Answer and grounding gates.
            let mut passed = Vec::new();
            for ((b, instruction, used), a) in kept.into_iter().zip(answered) {
                match answer_gate(
                    &a.text,
                    a.finish_reason,
                    &c.text,
                    &instruction,
                    gates.min_answer_words,
                    gates.max_ungrounded_names,
                ) {
                    Some(reason) => reject(&mut stats, reason),
                    None => passed.push((b, instruction, used, a)),
                }
            }
            // 4. The closed-book check: the same instruction without the documents.
            let closed: Vec<Option<f64>> = match gates.closed_book_max_f1 {
                None => vec![None; passed.len()],
                Some(_) => {
                    let items: Vec<Item> = passed
                        .iter()
                        .map(|(b, instruction, _, a)| {
                            let p = self.params(a.tokens.max(32), seed(b), None);
                            item("closed_book", b, instruction.clone(), p)
                        })
                        .collect();
                    self.run_requests(None, &items, &mut stats)?
                        .iter()
                        .zip(&passed)
                        .map(|(cb, (_, _, _, a))| Some(crate::text::token_f1(&cb.text, &a.text)))
                        .collect()
                }
            };
            for ((b, instruction, used, a), f1) in passed.into_iter().zip(closed) {
                if let (Some(f1), Some(max)) = (f1, gates.closed_book_max_f1) {
                    if f1 >= max {
                        reject(&mut stats, "closed_book");
                        continue;
                    }
                }
                if let Some(d) = self.decontaminate {
                    if d.shared(&format!("{instruction}\n{}", a.text)) > 0 {
                        reject(&mut stats, "contaminated");
                        continue;
                    }
                }
                if near.check_and_insert(&instruction) {
                    reject(&mut stats, "near_duplicate_instruction");
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
                        context_id: c.id.clone(),
                        document_ids: c.documents.iter().map(|d| d.id.clone()).collect(),
                        document_type: c.document_type.clone(),
                        bucket: c.bucket,
                        prompt_tokens: used,
                        multi_document: c.is_multi(),
                        task_family: c.task_family.clone(),
                        blueprint_id: b.id.clone(),
                        blueprint_path: b.path.clone(),
                        blueprint_instruction: b.instruction.clone(),
                        instruction: instruction.clone(),
                        conversation_ids: b.provenance.conversation_ids.clone(),
                        model: self.model.clone(),
                        prompt_version: VERSION.into(),
                        seed: seed(b),
                        closed_book_f1: f1,
                        hash,
                    },
                });
            }
        }
        stats.pairs = pairs.len();
        write_jsonl_atomic(&dir.join(format!("data{}.jsonl", shard.suffix())), &pairs)?;
        if let (Some(e), Some(before)) = (self.llm.local(), cache_before) {
            stats.prefix_cache = Some(e.cache_stats().since(&before).usage());
        }
        Ok((pairs, stats))
    }
}
