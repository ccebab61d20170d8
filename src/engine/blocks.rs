//! The paged KV cache's bookkeeping (host only, no tensors): fixed-size blocks, a free list,
//! reference counts and automatic prefix caching, as vLLM's block manager does them.
//!
//! A full block is keyed by (key of the block before it, its tokens); a sequence whose tokens
//! begin with keyed blocks takes them (reference count + 1) instead of computing them again.
//! A block nobody references stays keyed and reusable until it is the least recently used
//! and a new block is needed. Blocks never keyed are handed out first, lowest id first (on
//! the CPU the pool's pages are touched only as blocks are used).
//! Not here: the tensors the blocks index (`llama::cache::PagedKv`) and the scheduling.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

/// Identity of a full block's contents and everything before it.
pub type BlockHash = u64;

/// The key of the block holding `tokens` after the block keyed `prev` (`None` for the first).
pub fn block_hash(prev: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    // SipHash with fixed keys: the same key in every run (cached blocks outlive no process,
    // but tests and logs compare keys).
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    prev.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug, Clone, Default)]
struct Block {
    refs: usize,
    /// The key it is registered under, with its tokens (compared on a hit: a hash collision
    /// is never taken for a match).
    key: Option<(BlockHash, Vec<u32>)>,
    /// Tick of its last release (orders eviction).
    last_used: u64,
}

/// Counters since the manager was made (the stages report deltas).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Prompt tokens of admitted requests (a recomputed preempted request counts again).
    pub prompt_tokens: u64,
    /// Of those, tokens whose keys and values came from cached blocks.
    pub cached_tokens: u64,
    /// Keyed blocks evicted to make room.
    pub evictions: u64,
    /// Requests preempted (their blocks released, recomputed later).
    pub preemptions: u64,
}

impl BlockStats {
    pub fn since(&self, before: &BlockStats) -> BlockStats {
        BlockStats {
            prompt_tokens: self.prompt_tokens - before.prompt_tokens,
            cached_tokens: self.cached_tokens - before.cached_tokens,
            evictions: self.evictions - before.evictions,
            preemptions: self.preemptions - before.preemptions,
        }
    }

    /// Share of prompt tokens served from the cache.
    pub fn hit_rate(&self) -> f64 {
        if self.prompt_tokens == 0 {
            0.0
        } else {
            self.cached_tokens as f64 / self.prompt_tokens as f64
        }
    }

    /// What a stage's stats record of its use of the cache.
    pub fn usage(&self) -> CacheUse {
        let mut u = CacheUse::default();
        u.add(&CacheUse {
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            hit_rate: 0.0,
            preemptions: self.preemptions,
        });
        u
    }
}

/// A stage's use of the engine's prefix cache (its stats file).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CacheUse {
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    /// cached_tokens / prompt_tokens.
    pub hit_rate: f64,
    pub preemptions: u64,
}

impl CacheUse {
    /// Adds `o` to `total`, which starts at zero when it is `None`.
    pub fn add_to(total: &mut Option<CacheUse>, o: &CacheUse) {
        total.get_or_insert_with(Default::default).add(o);
    }

    /// Adds another run's (or shard's) use.
    pub fn add(&mut self, o: &CacheUse) {
        self.prompt_tokens += o.prompt_tokens;
        self.cached_tokens += o.cached_tokens;
        self.preemptions += o.preemptions;
        self.hit_rate = if self.prompt_tokens == 0 {
            0.0
        } else {
            (self.cached_tokens as f64 / self.prompt_tokens as f64 * 1e4).round() / 1e4
        };
    }
}

pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    /// Unreferenced blocks never keyed (or whose key was dropped), handed out lowest first.
    fresh: BTreeSet<u32>,
    /// Unreferenced keyed blocks by (last use, id): the first is evicted first.
    evictable: BTreeSet<(u64, u32)>,
    by_hash: HashMap<BlockHash, u32>,
    tick: u64,
    pub stats: BlockStats,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            fresh: (0..num_blocks as u32).collect(),
            evictable: BTreeSet::new(),
            by_hash: HashMap::new(),
            tick: 0,
            stats: BlockStats::default(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now (fresh or evictable).
    pub fn available(&self) -> usize {
        self.fresh.len() + self.evictable.len()
    }

    /// A block for new tokens (reference count 1), evicting the least recently used cached
    /// block when no fresh one is left; `None` when every block is referenced.
    pub fn allocate(&mut self) -> Option<u32> {
        let id = match self.fresh.pop_first() {
            Some(id) => id,
            None => {
                let (_, id) = self.evictable.pop_first()?;
                if let Some((h, _)) = self.blocks[id as usize].key.take() {
                    self.by_hash.remove(&h);
                }
                self.stats.evictions += 1;
                id
            }
        };
        self.blocks[id as usize].refs = 1;
        Some(id)
    }

    /// `n` blocks, or none (nothing allocated) when fewer are available.
    pub fn allocate_n(&mut self, n: usize) -> Option<Vec<u32>> {
        if self.available() < n {
            return None;
        }
        (0..n).map(|_| self.allocate()).collect()
    }

    /// The cached block holding `tokens` after `prev`, referenced once more.
    pub fn lookup(&mut self, hash: BlockHash, tokens: &[u32]) -> Option<u32> {
        let &id = self.by_hash.get(&hash)?;
        let b = &mut self.blocks[id as usize];
        if b.key.as_ref().map(|(_, t)| t.as_slice()) != Some(tokens) {
            return None;
        }
        if b.refs == 0 {
            self.evictable.remove(&(b.last_used, id));
        }
        b.refs += 1;
        Some(id)
    }

    /// Keys a full, computed block so that later sequences can share it. A block whose
    /// contents are cached already under another id stays unkeyed (it is freed on release).
    pub fn register(&mut self, id: u32, hash: BlockHash, tokens: &[u32]) {
        if self.by_hash.contains_key(&hash) || self.blocks[id as usize].key.is_some() {
            return;
        }
        self.by_hash.insert(hash, id);
        self.blocks[id as usize].key = Some((hash, tokens.to_vec()));
    }

    /// Drops one reference to each block (a finished or preempted sequence's table).
    pub fn release(&mut self, ids: &[u32]) {
        // Later blocks of a sequence are less likely to be shared: release them first so
        // that they are evicted before the prefix they continue.
        for &id in ids.iter().rev() {
            self.tick += 1;
            let b = &mut self.blocks[id as usize];
            debug_assert!(b.refs > 0, "block {id} released more often than taken");
            b.refs = b.refs.saturating_sub(1);
            if b.refs == 0 {
                b.last_used = self.tick;
                if b.key.is_some() {
                    self.evictable.insert((b.last_used, id));
                } else {
                    self.fresh.insert(id);
                }
            }
        }
    }

    /// Blocks referenced by some sequence now.
    pub fn in_use(&self) -> usize {
        self.blocks.len() - self.available()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_blocks_go_first_then_the_least_recently_used_cached_one() {
        let mut m = BlockManager::new(3, 4);
        let a = m.allocate_n(3).unwrap();
        assert_eq!(a, vec![0, 1, 2]);
        assert!(m.allocate().is_none());
        let h0 = block_hash(None, &[1, 2, 3, 4]);
        let h1 = block_hash(Some(h0), &[5, 6, 7, 8]);
        m.register(0, h0, &[1, 2, 3, 4]);
        m.register(1, h1, &[5, 6, 7, 8]);
        m.release(&[0, 1]); // 1 released first, so it is evicted first
        m.release(&[2]);
        assert_eq!(m.available(), 3);
        assert_eq!(m.allocate(), Some(2), "the unkeyed block goes first");
        assert_eq!(
            m.allocate(),
            Some(1),
            "then the least recently used keyed one"
        );
        assert_eq!(m.stats.evictions, 1);
        assert!(
            m.lookup(h1, &[5, 6, 7, 8]).is_none(),
            "evicted blocks lose their key"
        );
        assert_eq!(m.lookup(h0, &[1, 2, 3, 4]), Some(0));
        assert_eq!(
            m.available(),
            0,
            "a hit takes the block off the evictable list"
        );
    }

    #[test]
    fn a_hit_needs_equal_tokens_and_shared_blocks_outlive_one_release() {
        let mut m = BlockManager::new(2, 2);
        let id = m.allocate().unwrap();
        let h = block_hash(None, &[7, 8]);
        m.register(id, h, &[7, 8]);
        assert!(
            m.lookup(h, &[7, 9]).is_none(),
            "same key, other tokens: no hit"
        );
        assert_eq!(m.lookup(h, &[7, 8]), Some(id));
        m.release(&[id]);
        assert_eq!(m.available(), 1, "still referenced once");
        m.release(&[id]);
        assert_eq!(m.available(), 2);
        assert_ne!(block_hash(None, &[7, 8]), block_hash(Some(h), &[7, 8]));
    }
}
