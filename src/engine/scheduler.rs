//! Continuous batching over the paged KV cache, as vLLM's scheduler does it: requests are
//! taken from a stream as rows free up (up to `max_batch` rows); every step is one forward
//! pass carrying the decoding rows' next tokens and, in the rest of the step's token budget
//! (`prefill_chunk`), chunks of new prompts; a request leaves the batch the step it finishes
//! and its completion is delivered then.
//!
//! A new request first takes the cached blocks its prompt begins with (automatic prefix
//! caching, `engine::blocks`) and computes only the rest. When the cache is full, the newest
//! running request is preempted: its blocks are released and it is recomputed later (its
//! sampler and grammar state kept, so its output does not change).
//! Not here: sampling and stopping (`engine::generate`), attention (`engine::paged_attention`).

use crate::engine::blocks::{block_hash, BlockHash, BlockManager};
use crate::engine::generate::{Completion, Engine, Request, Row};
use crate::engine::llama::{PagedBatch, PagedKv, SeqChunk};
use crate::engine::memory::{self, GIB};
use anyhow::{bail, Context, Result};
use std::collections::VecDeque;

/// What a request source answers when the batch has room.
pub enum Pull {
    /// The next request (its index in the stream is the number of requests before it).
    Request(Box<Request>),
    /// Nothing yet: more requests follow once some in flight finish (a workload whose later
    /// requests are built from earlier completions).
    Later,
    /// No more requests.
    Done,
}

/// The engine's paged KV cache and the bookkeeping of its blocks.
pub(crate) struct PagedState {
    pub(crate) kv: PagedKv,
    pub(crate) blocks: BlockManager,
    /// The sizes the pool was made with (requests are checked against these, not against a
    /// plan recomputed from memory that has changed since).
    pub(crate) plan: KvPlan,
}

/// How the KV cache is sized: blocks of `block_size` tokens, `block_bytes` each.
#[derive(Debug, Clone, Copy)]
pub struct KvPlan {
    pub block_size: usize,
    pub num_blocks: usize,
    pub block_bytes: usize,
}

impl KvPlan {
    pub fn tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }
    pub fn gib(&self) -> f64 {
        (self.num_blocks * self.block_bytes) as f64 / GIB
    }
}

/// The host's available memory in bytes (`MemAvailable`), when it can be read.
fn host_available_bytes() -> Option<f64> {
    memory::free_bytes(&candle_core::Device::Cpu).map(|b| b as f64)
}

/// Memory the cache may take by default: half of what the host has available on the CPU
/// (4 GiB when that cannot be read), 90% of the free device memory on CUDA.
fn default_budget_bytes(device: &candle_core::Device) -> f64 {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return memory::free_bytes(device).map_or(8.0 * GIB, |free| free as f64 * 0.9);
    }
    let _ = device;
    host_available_bytes().map_or(4.0 * GIB, |b| b * 0.5)
}

/// One request in the scheduler.
struct Seq {
    id: usize,
    prompt_len: usize,
    row: Row,
    /// Prompt and fed tokens; positions `computed..` still need their keys and values.
    tokens: Vec<u32>,
    computed: usize,
    blocks: Vec<u32>,
    /// Full blocks registered in the prefix cache, and the key of the last.
    hashed: usize,
    last_hash: Option<BlockHash>,
    /// Keys of the prompt's full blocks.
    prompt_hashes: Vec<BlockHash>,
    /// Sampled at least once since (re)admission: it feeds its pending tokens whole.
    decoding: bool,
    counted: bool,
    /// Prompt tokens the prefix cache served at first admission.
    cached: usize,
}

impl Seq {
    /// The key of full block `b`, whose predecessor's key is `prev`: the prompt's blocks'
    /// keys were computed once at intake; later blocks (generated tokens) are hashed here.
    fn block_key(&self, b: usize, prev: Option<BlockHash>, bs: usize) -> BlockHash {
        match self.prompt_hashes.get(b) {
            Some(&h) => h,
            None => block_hash(prev, &self.tokens[b * bs..(b + 1) * bs]),
        }
    }
}

impl Engine {
    /// The KV cache this engine's settings give (`kv_cache_gib`, or the default budget
    /// capped at `max_batch` rows of the full context).
    pub fn kv_plan(&self) -> Result<KvPlan> {
        let cfg = self.model.config();
        let block_size = self.config.block_size;
        let dtype = PagedKv::dtype_for(self.model.dtype(), self.model.device());
        let block_bytes = PagedKv::block_bytes(cfg, block_size, dtype);
        let num_blocks = match self.config.kv_cache_gib {
            Some(g) => {
                // Refused before allocating: on the CPU the pages would be mapped lazily and
                // the kernel's OOM killer, not us, would find out.
                if let (true, Some(avail)) = (self.model.device().is_cpu(), host_available_bytes())
                {
                    if g * GIB > avail {
                        bail!(
                            "engine.kv_cache_gib = {g} is more than this machine's available memory ({:.2} GiB); set it to at most {:.2}",
                            avail / GIB,
                            avail * 0.9 / GIB
                        );
                    }
                }
                (g * GIB / block_bytes as f64) as usize
            }
            None => {
                let full = self.max_context().div_ceil(block_size) * self.config.max_batch;
                let mut budget = default_budget_bytes(self.model.device());
                // Under a memory limit, the cache takes at most what the weights and one
                // pass leave of it.
                if let Some(g) = self.config.memory_gib {
                    let used = self.model.bytes() + memory::working_bytes(cfg, &self.config);
                    budget = budget.min(g * GIB - used as f64);
                }
                full.min((budget.max(0.0) / block_bytes as f64) as usize)
            }
        };
        if num_blocks == 0 {
            bail!(
                "engine.kv_cache_gib holds no block of {block_size} tokens ({} KiB with this model); set it to at least {:.4}",
                block_bytes / 1024,
                block_bytes as f64 / GIB
            );
        }
        Ok(KvPlan {
            block_size,
            num_blocks,
            block_bytes,
        })
    }

    /// The KV cache's sizes: the pool's once it is made, else what the settings give.
    pub(crate) fn current_plan(&self) -> Result<KvPlan> {
        match self
            .paged
            .lock()
            .ok()
            .and_then(|g| g.as_ref().map(|p| p.plan))
        {
            Some(p) => Ok(p),
            None => self.kv_plan(),
        }
    }

    /// Checks request `i` before any work on it: its prompt and settings (its JSON schema
    /// compiled when `schema`), and that it fits the cache alone.
    pub(crate) fn check_request(
        &self,
        i: usize,
        r: &Request,
        plan: &KvPlan,
        schema: bool,
    ) -> Result<()> {
        self.validate_one(r, schema)
            .and_then(|_| self.check_fits(r, plan))
            .map_err(|e| anyhow::anyhow!("request {i}: {e:#}"))
    }

    /// Refuses a request that could not fit the cache even alone.
    fn check_fits(&self, r: &Request, plan: &KvPlan) -> Result<()> {
        let tokens = (r.prompt.len() + r.params.max_tokens).min(self.max_context());
        let blocks = tokens.div_ceil(plan.block_size);
        if blocks > plan.num_blocks {
            bail!(
                "{tokens} tokens (prompt + max_tokens) need {:.3} GiB of KV cache, more than engine.kv_cache_gib = {:.3} GiB ({} tokens); set kv_cache_gib to at least {:.3} or lower max_tokens",
                (blocks * plan.block_bytes) as f64 / GIB,
                plan.gib(),
                plan.tokens(),
                (blocks * plan.block_bytes) as f64 / GIB
            );
        }
        Ok(())
    }

    pub(crate) fn run_scheduler(
        &self,
        next: &mut dyn FnMut() -> Result<Pull>,
        on_done: &mut dyn FnMut(usize, Completion) -> Result<()>,
    ) -> Result<()> {
        let mut guard = self.paged.lock().map_err(|_| {
            anyhow::anyhow!("the engine's KV cache was left inconsistent by an earlier panic")
        })?;
        if guard.is_none() {
            let plan = self.kv_plan()?;
            *guard = Some(PagedState {
                plan,
                kv: PagedKv::new(
                    self.model.config(),
                    plan.num_blocks,
                    plan.block_size,
                    PagedKv::dtype_for(self.model.dtype(), self.model.device()),
                    self.model.device(),
                )
                .with_context(|| {
                    format!(
                        "allocating the KV cache ({:.2} GiB, engine.kv_cache_gib)",
                        plan.gib()
                    )
                })?,
                blocks: BlockManager::new(plan.num_blocks, plan.block_size),
            });
        }
        let st = guard.as_mut().context("KV cache")?;
        let plan = st.plan;
        let bs = plan.block_size;
        let max_batch = self.config.max_batch.max(1);
        let budget = self.config.prefill_chunk.max(1);
        // Blocks kept free when admitting beside running requests, so that they can grow
        // without preempting at once (vLLM's watermark).
        let watermark = (plan.num_blocks / 100).max(1);
        let mut waiting: VecDeque<Seq> = VecDeque::new();
        let mut running: Vec<Seq> = Vec::new();
        let mut exhausted = false;
        let mut next_id = 0usize;
        let mut idle_polls = 0;
        loop {
            while !exhausted && waiting.len() < max_batch {
                let r = match next()? {
                    Pull::Request(r) => *r,
                    Pull::Later => break,
                    Pull::Done => {
                        exhausted = true;
                        break;
                    }
                };
                let id = next_id;
                next_id += 1;
                idle_polls = 0;
                self.check_request(id, &r, &plan, false)?;
                let row = self
                    .new_row(&r)
                    .map_err(|e| anyhow::anyhow!("request {id}: {e:#}"))?;
                if row.done.is_some() {
                    on_done(id, self.finish(row, r.prompt.len(), 0)?)?;
                    continue;
                }
                let mut prompt_hashes = Vec::with_capacity(r.prompt.len() / bs);
                for chunk in r.prompt.chunks_exact(bs) {
                    prompt_hashes.push(block_hash(prompt_hashes.last().copied(), chunk));
                }
                waiting.push_back(Seq {
                    prompt_hashes,
                    id,
                    prompt_len: r.prompt.len(),
                    row,
                    tokens: r.prompt,
                    computed: 0,
                    blocks: Vec::new(),
                    hashed: 0,
                    last_hash: None,
                    decoding: false,
                    counted: false,
                    cached: 0,
                });
            }
            if running.is_empty() && waiting.is_empty() {
                if exhausted {
                    return Ok(());
                }
                // A source that answered `Later` with nothing in flight is asked once more (a
                // request that finished at intake may have let it build more), then refused.
                idle_polls += 1;
                if idle_polls > 1 {
                    bail!("the request source waits for completions while none is in flight");
                }
                continue;
            }

            // Admission: cached prefix blocks first, then one block for what follows.
            while running.len() < max_batch {
                let Some(seq) = waiting.front_mut() else {
                    break;
                };
                if seq.blocks.is_empty() {
                    match_prefix(&mut st.blocks, seq);
                }
                // A request whose next block a running one is computing now waits for it
                // (and then takes it from the cache) rather than computing it too.
                let next = seq.prompt_hashes.get(seq.blocks.len());
                let in_flight = next.is_some_and(|h| {
                    let b = seq.blocks.len();
                    running
                        .iter()
                        .any(|r| r.computed < (b + 1) * bs && r.prompt_hashes.get(b) == Some(h))
                });
                if in_flight && seq.blocks.len() < (seq.tokens.len() - 1) / bs {
                    release(&mut st.blocks, seq);
                    break;
                }
                let need = (seq.computed + 1).div_ceil(bs) - seq.blocks.len();
                let reserve = if running.is_empty() { 0 } else { watermark };
                if st.blocks.available() < need + reserve {
                    // Waiting requests hold no blocks (they could starve the running ones).
                    release(&mut st.blocks, seq);
                    break;
                }
                let mut seq = waiting.pop_front().context("waiting queue")?;
                seq.blocks
                    .extend(st.blocks.allocate_n(need).context("block allocation")?);
                if !seq.counted {
                    seq.counted = true;
                    seq.cached = seq.computed.min(seq.prompt_len);
                    st.blocks.stats.prompt_tokens += seq.prompt_len as u64;
                    st.blocks.stats.cached_tokens += seq.cached as u64;
                }
                running.push(seq);
            }
            if running.is_empty() {
                bail!(
                    "the KV cache ({} blocks) cannot take the next request",
                    plan.num_blocks
                );
            }

            // The step: decoding rows' pending tokens, then prefill chunks in the budget left.
            let mut step: Vec<(usize, usize)> = Vec::new(); // (running index, new tokens)
            let mut left = budget;
            for (i, s) in running.iter().enumerate().filter(|(_, s)| s.decoding) {
                let n = s.tokens.len() - s.computed;
                let n = if self.config.fast_forward { n } else { 1 };
                step.push((i, n));
                left = left.saturating_sub(n);
            }
            for (i, s) in running.iter().enumerate().filter(|(_, s)| !s.decoding) {
                if left == 0 {
                    break;
                }
                let n = (s.tokens.len() - s.computed).min(left);
                step.push((i, n));
                left -= n;
            }

            // Blocks for the step; when the pool is full, a prefill chunk shrinks to what is
            // free, else the newest other request is preempted (or this one, if none is left).
            let mut preempted = vec![false; running.len()];
            let mut k = 0;
            while k < step.len() {
                let (i, n) = step[k];
                let s = &mut running[i];
                let need = (s.computed + n).div_ceil(bs).saturating_sub(s.blocks.len());
                if let Some(b) = st.blocks.allocate_n(need) {
                    s.blocks.extend(b);
                    k += 1;
                    continue;
                }
                let room = (s.blocks.len() + st.blocks.available()) * bs;
                if !s.decoding && room > s.computed {
                    step[k].1 = room - s.computed;
                    continue;
                }
                let victim = (0..running.len())
                    .rev()
                    .find(|&j| j != i && !preempted[j] && !step[..k].iter().any(|&(p, _)| p == j));
                let j = victim.unwrap_or(i);
                preempt(&mut st.blocks, &mut running[j]);
                preempted[j] = true;
                if let Some(pos) = step.iter().position(|&(p, _)| p == j) {
                    step.remove(pos);
                    if pos < k {
                        k -= 1;
                    }
                }
            }
            for j in (0..running.len()).rev() {
                if preempted[j] {
                    let s = running.remove(j);
                    waiting.push_front(s);
                    for e in step.iter_mut() {
                        if e.0 > j {
                            e.0 -= 1;
                        }
                    }
                }
            }
            if step.is_empty() {
                continue;
            }

            // One forward pass for the step.
            let mut ids = Vec::new();
            let mut seqs = Vec::with_capacity(step.len());
            for &(i, n) in &step {
                let s = &running[i];
                ids.extend_from_slice(&s.tokens[s.computed..s.computed + n]);
                seqs.push(SeqChunk {
                    start: s.computed,
                    len: n,
                    blocks: s.blocks.clone(),
                    last_hidden: s.computed + n == s.tokens.len(),
                });
            }
            let batch = PagedBatch {
                seqs,
                block_size: bs,
            };
            let hidden = self.model.forward_paged(&ids, &batch, &st.kv)?; // (m, hidden)
            let mut logits = if hidden.dim(0)? > 0 {
                self.model.logits(&hidden)?.to_vec2::<f32>()?
            } else {
                Vec::new()
            }
            .into_iter();

            let mut finished = Vec::new();
            for &(i, n) in &step {
                let s = &mut running[i];
                s.computed += n;
                register_full_blocks(&mut st.blocks, s, bs);
                if s.computed < s.tokens.len() {
                    continue;
                }
                let l = logits.next().context("a row's logits are missing")?;
                self.sample_next(&mut s.row, l)?;
                s.decoding = true;
                if s.row.done.is_some() {
                    finished.push(i);
                } else {
                    let pending = std::mem::take(&mut s.row.pending);
                    s.tokens.extend(pending);
                }
            }
            finished.sort_unstable();
            for &i in finished.iter().rev() {
                let s = running.remove(i);
                st.blocks.release(&s.blocks);
                on_done(s.id, self.finish(s.row, s.prompt_len, s.cached)?)?;
            }
        }
    }
}

/// Takes the cached blocks `seq`'s tokens begin with (leaving at least one token to compute,
/// whose logits the first sample needs).
fn match_prefix(blocks: &mut BlockManager, seq: &mut Seq) {
    let bs = blocks.block_size();
    let mut prev = None;
    for b in 0..(seq.tokens.len() - 1) / bs {
        let chunk = &seq.tokens[b * bs..(b + 1) * bs];
        let h = seq.block_key(b, prev, bs);
        match blocks.lookup(h, chunk) {
            Some(id) => seq.blocks.push(id),
            None => break,
        }
        prev = Some(h);
    }
    seq.computed = seq.blocks.len() * bs;
    seq.hashed = seq.blocks.len();
    seq.last_hash = prev;
}

/// Keys every block of `seq` that is now full and computed.
fn register_full_blocks(blocks: &mut BlockManager, seq: &mut Seq, bs: usize) {
    while (seq.hashed + 1) * bs <= seq.computed {
        let b = seq.hashed;
        let h = seq.block_key(b, seq.last_hash, bs);
        blocks.register(seq.blocks[b], h, &seq.tokens[b * bs..(b + 1) * bs]);
        seq.last_hash = Some(h);
        seq.hashed += 1;
    }
}

/// Preempts a running `seq`: it is recomputed from its tokens when admitted again.
fn preempt(blocks: &mut BlockManager, seq: &mut Seq) {
    blocks.stats.preemptions += 1;
    release(blocks, seq);
}

/// Releases `seq`'s blocks and forgets what they held.
fn release(blocks: &mut BlockManager, seq: &mut Seq) {
    blocks.release(&seq.blocks);
    seq.blocks.clear();
    seq.computed = 0;
    seq.hashed = 0;
    seq.last_hash = None;
    seq.decoding = false;
}
