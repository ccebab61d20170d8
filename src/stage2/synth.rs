//! Adaptive generation: for each context, a few blueprints of its document type are
//! rewritten into concrete instructions for these documents, then answered over the full
//! context. Every request over one context starts with the same tokens (system +
//! documents): the local engine's prefix cache computes them once; on an OpenAI-compatible
//! server each request carries the whole context (servers with prefix caching reuse it). Results live in a
//! content-addressed store, so a killed run resumes and shards never collide;
//! `data[.shard-k-of-n].jsonl` is rebuilt from the store. The gates of [`gates`] are
//! applied in a fixed order (answer, grounding, closed-book, decontamination, then
//! near-duplicate instructions in context order), so the same store gives the same data.

use crate::engine::blocks::CacheUse;
use crate::engine::chat::{ChatTemplate, Message};
use crate::engine::config::{GenerationParams, SamplingParams};
use crate::engine::generate::{Completion, Engine, FinishReason, Request};
use crate::engine::scheduler::Pull;
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
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
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
    pub prefix_cache: Option<CacheUse>,
    /// The documents' share of it: over each context, the requests after the one that
    /// computed the documents (`prompt_tokens`: their document tokens; `cached_tokens`:
    /// those the cache served). Local engine only.
    #[serde(default)]
    pub document_cache: Option<CacheUse>,
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

    /// Pairs for this shard's contexts, written to `<dir>/data<suffix>.jsonl`.
    ///
    /// Every context moves through its steps (rewrites, answers, closed-book checks) as its
    /// own inputs become ready, several contexts at a time: the local engine takes each
    /// request as its batch has room (so one document's answers decode beside the next
    /// document's rewrites), a server gets each round of ready requests at its concurrency.
    /// Requests already in the store are read, not sent. The pairs are built afterwards in
    /// context order, so the same store gives the same data however the requests ran.
    pub fn run(
        &self,
        contexts: &[Context],
        blueprints: &[Blueprint],
        shard: Shard,
        dir: &Path,
    ) -> Result<(Vec<Pair>, SynthStats)> {
        let mut stats = SynthStats::default();
        let cache_before = self.llm.local().map(|e| e.cache_stats());
        let mut by_type: BTreeMap<&str, Vec<&Blueprint>> = BTreeMap::new();
        for b in blueprints {
            by_type.entry(b.document_type.as_str()).or_default().push(b);
        }
        let mut owned = Vec::new();
        for (ci, c) in contexts.iter().enumerate() {
            if !shard.owns(ci) {
                continue;
            }
            stats.contexts += 1;
            // Stage 1 merged its rare types into `other`: a type without blueprints of its
            // own takes those.
            match by_type
                .get(c.document_type.as_str())
                .or_else(|| by_type.get("other"))
            {
                Some(pool) => owned.push((c, pool.as_slice())),
                None => reject(&mut stats, "no_blueprint_of_type"),
            }
        }
        let g = &self.cfg.generate;
        let flow = Flow {
            synth: self,
            rewrite_schema: serde_json::json!({
                "type": "object",
                "properties": {"instruction": {"type": "string", "minLength": 20, "maxLength": g.max_instruction_chars}},
                "required": ["instruction"], "additionalProperties": false,
                "x-guidance": {"whitespace_flexible": false, "json_allowed_escapes": "\"\\"}
            }),
            contexts: owned,
            states: Vec::new(),
            queue: VecDeque::new(),
            active: 0,
            cap: self.contexts_in_flight(contexts),
            stats,
        };
        let flow = match self.llm {
            Llm::Local(engine) => {
                let flow = RefCell::new(flow);
                // The stream's requests in the order they were handed out: (context, slot).
                let sent = RefCell::new(Vec::<(usize, usize)>::new());
                engine.generate_feed(
                    || {
                        let mut f = flow.borrow_mut();
                        let Some((ci, slot)) = f.next_ready()? else {
                            return Ok(if f.finished() {
                                Pull::Done
                            } else {
                                Pull::Later
                            });
                        };
                        sent.borrow_mut().push((ci, slot));
                        Ok(Pull::Request(Box::new(f.local_request(engine, ci, slot)?)))
                    },
                    |id, c| {
                        let (ci, slot) = *sent.borrow().get(id).context("an unknown request")?;
                        flow.borrow_mut().complete(ci, slot, c)
                    },
                )?;
                flow.into_inner()
            }
            Llm::Remote(_) => {
                let mut flow = flow;
                loop {
                    // Every ready request of up to `cap` contexts (each started as the queue
                    // empties).
                    let mut round = Vec::new();
                    while let Some(r) = flow.next_ready()? {
                        round.push(r);
                    }
                    if round.is_empty() {
                        break;
                    }
                    let reqs: Vec<(Vec<Message>, GenerationParams)> = round
                        .iter()
                        .map(|&(ci, slot)| flow.messages(ci, slot))
                        .collect();
                    for (&(ci, slot), c) in round.iter().zip(self.llm.chat_batch(&reqs)?) {
                        flow.complete(ci, slot, c)?;
                    }
                }
                flow
            }
        };
        anyhow::ensure!(
            flow.finished(),
            "synthesis stopped with contexts unfinished"
        );
        let Flow {
            states, mut stats, ..
        } = flow;
        let pairs = self.pairs(states, &mut stats)?;
        stats.pairs = pairs.len();
        write_jsonl_atomic(&dir.join(format!("data{}.jsonl", shard.suffix())), &pairs)?;
        if let (Some(e), Some(before)) = (self.llm.local(), cache_before) {
            stats.prefix_cache = Some(e.cache_stats().since(&before).usage());
        }
        Ok((pairs, stats))
    }

    /// How many contexts run at once: enough for the engine's rows (or the server's
    /// concurrency) to stay busy, and, on the local engine, no more documents than its KV
    /// cache holds beside their answers (a document evicted between its steps would be
    /// computed again).
    fn contexts_in_flight(&self, contexts: &[Context]) -> usize {
        let per = self.cfg.generate.instructions_per_context.max(1);
        match self.llm {
            Llm::Local(e) => {
                let rows = e.config.max_batch.max(1).div_ceil(per) + 1;
                let longest = contexts.iter().map(|c| c.bucket).max().unwrap_or(1).max(1);
                let fit = e
                    .kv_plan()
                    .map(|p| p.tokens() / (longest + longest / 4))
                    .unwrap_or(1);
                rows.min(fit).max(1)
            }
            // Few at once: a server that keeps one prompt's cache per slot (llama.cpp) would
            // recompute a document at each switch between contexts.
            Llm::Remote(c) => c.config.concurrency.max(1).div_ceil(per),
        }
    }

    /// The pairs of finished contexts, in context order: the closed-book,
    /// decontamination and near-duplicate gates applied.
    fn pairs(&self, states: Vec<State>, stats: &mut SynthStats) -> Result<Vec<Pair>> {
        let g = &self.cfg.generate;
        let gates = &self.cfg.gates;
        let mut near = instruction_index(gates.near_duplicate_threshold, g.seed);
        let mut pairs = Vec::new();
        for st in states {
            let c = st.context;
            let closed = match st.closed.len() {
                0 => vec![None; st.passed.len()],
                _ => st.closed,
            };
            for (p, f1) in st.passed.into_iter().zip(closed) {
                let (b, instruction, used, a) = (p.blueprint, p.instruction, p.used, p.answer);
                if let (Some(f1), Some(max)) = (f1, gates.closed_book_max_f1) {
                    if f1 >= max {
                        reject(stats, "closed_book");
                        continue;
                    }
                }
                if let Some(d) = self.decontaminate {
                    if d.shared(&format!("{instruction}\n{}", a.text)) > 0 {
                        reject(stats, "contaminated");
                        continue;
                    }
                }
                if near.check_and_insert(&instruction) {
                    reject(stats, "near_duplicate_instruction");
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
                        seed: self.seed(c, b),
                        closed_book_f1: f1,
                        hash,
                    },
                });
            }
        }
        Ok(pairs)
    }

    /// The sampling seed of a blueprint's requests over a context.
    fn seed(&self, c: &Context, b: &Blueprint) -> u64 {
        crate::records::derived_u64(self.cfg.generate.seed, &[c.id.as_bytes(), b.id.as_bytes()])
    }

    /// A request's store key: the model, prompt version, step, context, blueprint,
    /// request text and parameters.
    fn item(
        &self,
        kind: &str,
        c: &Context,
        b: &Blueprint,
        request: String,
        params: GenerationParams,
    ) -> Item {
        Item {
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
        }
    }
}

/// The step a context is at; its requests are in [`State::items`].
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    /// Each chosen blueprint rewritten for these documents (JSON, over the documents).
    Rewrite,
    /// Each instruction answered over the documents.
    Answer,
    /// Each answer that passed the gates asked again without the documents.
    ClosedBook,
    Done,
}

/// An answer that passed the answer and grounding gates.
struct Passed<'a> {
    blueprint: &'a Blueprint,
    instruction: String,
    /// Prompt tokens of the instruction over the documents.
    used: usize,
    answer: Generated,
}

/// One context's progress.
struct State<'a> {
    context: &'a Context,
    chosen: Vec<&'a Blueprint>,
    /// The chat-rendered prompt up to the request (system + documents), tokenized, and the
    /// template's text after it.
    prefix_tokens: Vec<u32>,
    tail: String,
    step: Step,
    /// This step's requests (the rewrites: one per chosen blueprint, in order) and their
    /// results; the step is complete when every result is in.
    items: Vec<Item>,
    results: Vec<Option<Generated>>,
    /// After the rewrites: (blueprint, instruction, prompt tokens) of each answer request.
    kept: Vec<(usize, String, usize)>,
    passed: Vec<Passed<'a>>,
    /// Closed-book F1 of each passed answer (empty when the gate is off).
    closed: Vec<Option<f64>>,
    /// Document tokens the prefix cache served each generated request over the documents.
    document_hits: Vec<usize>,
}

/// The contexts of one run moving through their steps; requests ready to send are queued.
struct Flow<'s, 'a> {
    synth: &'s Synth<'a>,
    /// The JSON a rewrite must be: one instruction of bounded length.
    rewrite_schema: serde_json::Value,
    contexts: Vec<(&'s Context, &'s [&'s Blueprint])>,
    states: Vec<State<'s>>,
    /// (context, slot) of requests ready to send, oldest first.
    queue: VecDeque<(usize, usize)>,
    /// Contexts started and not done.
    active: usize,
    cap: usize,
    stats: SynthStats,
}

impl<'s> Flow<'s, '_> {
    /// The next request to send; a new context is started when none is ready and fewer
    /// than `cap` are in flight. `None`: nothing to send now.
    fn next_ready(&mut self) -> Result<Option<(usize, usize)>> {
        while self.queue.is_empty()
            && self.active < self.cap
            && self.states.len() < self.contexts.len()
        {
            self.start()?;
        }
        Ok(self.queue.pop_front())
    }

    /// Every context has been started and has finished.
    fn finished(&self) -> bool {
        self.active == 0 && self.queue.is_empty() && self.states.len() == self.contexts.len()
    }

    fn start(&mut self) -> Result<()> {
        let s = self.synth;
        let g = &s.cfg.generate;
        let (c, pool) = self.contexts[self.states.len()];
        let mut rng = crate::records::derived_rng(g.seed, &[c.id.as_bytes()]);
        let chosen: Vec<&Blueprint> = pool
            .choose_multiple(&mut rng, g.instructions_per_context)
            .copied()
            .collect();
        const MARK: &str = "\u{1}REQUEST\u{1}";
        let rendered = s.template.render(&user_turn(&c.text, MARK), true)?;
        let (head, tail) = rendered
            .split_once(MARK)
            .context("the chat template dropped the user message")?;
        let prefix_tokens = s.tokenizer.encode(head, false)?;
        let items: Vec<Item> = chosen
            .iter()
            .map(|b| {
                let request = rewrite_request(
                    &c.document_type,
                    c.documents.len(),
                    c.task_family.as_deref(),
                    &b.instruction,
                );
                let p = s.params(
                    16 + 2 * g.max_instruction_chars,
                    s.seed(c, b),
                    Some(self.rewrite_schema.clone()),
                );
                s.item("rewrite", c, b, request, p)
            })
            .collect();
        let ci = self.states.len();
        self.states.push(State {
            context: c,
            chosen,
            prefix_tokens,
            tail: tail.to_string(),
            step: Step::Rewrite,
            items: Vec::new(),
            results: Vec::new(),
            kept: Vec::new(),
            passed: Vec::new(),
            closed: Vec::new(),
            document_hits: Vec::new(),
        });
        self.active += 1;
        self.enter(ci, Step::Rewrite, items)
    }

    /// Puts context `ci` at `step` with these requests: those in the store are read, the
    /// rest queued; a step with nothing to send is finished at once.
    fn enter(&mut self, ci: usize, step: Step, items: Vec<Item>) -> Result<()> {
        let mut results = Vec::with_capacity(items.len());
        for (slot, it) in items.iter().enumerate() {
            let got = self.synth.store.get::<Generated>(&it.key)?;
            match got {
                Some(_) => self.stats.reused += 1,
                None => self.queue.push_back((ci, slot)),
            }
            results.push(got);
        }
        let st = &mut self.states[ci];
        st.step = step;
        st.items = items;
        st.results = results;
        if st.results.iter().all(Option::is_some) {
            self.advance(ci)?;
        }
        Ok(())
    }

    /// The result of request `slot` of context `ci`'s current step.
    fn complete(&mut self, ci: usize, slot: usize, c: Completion) -> Result<()> {
        let s = self.synth;
        let tokens = match c.tokens.len() {
            0 => s.tokenizer.encode(&c.text, false)?.len(),
            n => n,
        };
        let g = Generated {
            text: c.text,
            finish_reason: c.finish_reason,
            tokens,
        };
        let st = &mut self.states[ci];
        if st.step != Step::ClosedBook {
            st.document_hits
                .push(c.cached_tokens.min(st.prefix_tokens.len()));
        }
        s.store.put(&st.items[slot].key, &g)?;
        self.stats.generated += 1;
        st.results[slot] = Some(g);
        if st.results.iter().all(Option::is_some) {
            self.advance(ci)?;
        }
        Ok(())
    }

    /// Context `ci`'s step is complete: its gates, then the next step's requests.
    fn advance(&mut self, ci: usize) -> Result<()> {
        let s = self.synth;
        let g = &s.cfg.generate;
        let st = &mut self.states[ci];
        let c = st.context;
        let results: Vec<Generated> = std::mem::take(&mut st.results)
            .into_iter()
            .map(|r| r.context("a request got no result"))
            .collect::<Result<_>>()?;
        st.items.clear();
        match st.step {
            Step::Rewrite => {
                let mut answers = Vec::new();
                let mut kept = Vec::new();
                for (bi, r) in results.into_iter().enumerate() {
                    let b = st.chosen[bi];
                    let instruction = serde_json::from_str::<serde_json::Value>(&r.text)
                        .ok()
                        .and_then(|v| v["instruction"].as_str().map(|s| s.trim().to_string()))
                        .filter(|s| !s.is_empty());
                    let Some(instruction) = instruction else {
                        reject(&mut self.stats, "rewrite_not_json");
                        continue;
                    };
                    let used = st.prefix_tokens.len()
                        + s.tokenizer
                            .encode(&format!("{instruction}{}", st.tail), false)?
                            .len();
                    let room = c.bucket.saturating_sub(used).min(g.max_answer_tokens);
                    if room < 16 {
                        reject(&mut self.stats, "no_room_for_answer");
                        continue;
                    }
                    let p = s.params(room, s.seed(c, b), None);
                    answers.push(s.item("answer", c, b, instruction.clone(), p));
                    kept.push((bi, instruction, used));
                }
                st.kept = kept;
                self.enter(ci, Step::Answer, answers)
            }
            Step::Answer => {
                let gates = &s.cfg.gates;
                for ((bi, instruction, used), a) in
                    std::mem::take(&mut st.kept).into_iter().zip(results)
                {
                    match answer_gate(
                        &a.text,
                        a.finish_reason,
                        &c.text,
                        &instruction,
                        gates.min_answer_words,
                        gates.max_ungrounded_names,
                    ) {
                        Some(reason) => reject(&mut self.stats, reason),
                        None => st.passed.push(Passed {
                            blueprint: st.chosen[bi],
                            instruction,
                            used,
                            answer: a,
                        }),
                    }
                }
                if gates.closed_book_max_f1.is_none() {
                    return self.finish(ci);
                }
                // The closed-book check: the same instruction without the documents.
                let items: Vec<Item> = st
                    .passed
                    .iter()
                    .map(|p| {
                        let b = p.blueprint;
                        let params = s.params(p.answer.tokens.max(32), s.seed(c, b), None);
                        s.item("closed_book", c, b, p.instruction.clone(), params)
                    })
                    .collect();
                self.enter(ci, Step::ClosedBook, items)
            }
            Step::ClosedBook => {
                st.closed = results
                    .iter()
                    .zip(&st.passed)
                    .map(|(cb, p)| Some(crate::text::token_f1(&cb.text, &p.answer.text)))
                    .collect();
                self.finish(ci)
            }
            Step::Done => Ok(()),
        }
    }

    fn finish(&mut self, ci: usize) -> Result<()> {
        let st = &mut self.states[ci];
        st.step = Step::Done;
        if let (Llm::Local(_), Some(&first)) = (self.synth.llm, st.document_hits.iter().min()) {
            let n = st.document_hits.len() as u64;
            CacheUse::add_to(
                &mut self.stats.document_cache,
                &CacheUse {
                    prompt_tokens: (n - 1) * st.prefix_tokens.len() as u64,
                    cached_tokens: st.document_hits.iter().sum::<usize>() as u64 - first as u64,
                    ..Default::default()
                },
            );
        }
        self.active -= 1;
        Ok(())
    }

    /// Request `slot` of context `ci` for the local engine: over the documents it is the
    /// documents' tokens (computed once by the prefix cache) and the request's.
    fn local_request(&self, engine: &Engine, ci: usize, slot: usize) -> Result<Request> {
        let st = &self.states[ci];
        let it = &st.items[slot];
        let prompt = match st.step {
            Step::ClosedBook => engine.chat_prompt(&closed_book_turn(&it.request))?,
            _ => {
                let mut prompt = st.prefix_tokens.clone();
                prompt.extend(
                    engine
                        .tokenizer
                        .encode(&format!("{}{}", it.request, st.tail), false)?,
                );
                prompt
            }
        };
        Ok(Request {
            prompt,
            params: it.params.clone(),
        })
    }

    /// Request `slot` of context `ci` as chat messages (a server).
    fn messages(&self, ci: usize, slot: usize) -> (Vec<Message>, GenerationParams) {
        let st = &self.states[ci];
        let it = &st.items[slot];
        let messages = match st.step {
            Step::ClosedBook => closed_book_turn(&it.request),
            _ => user_turn(&st.context.text, &it.request),
        };
        (messages, it.params.clone())
    }
}
