//! The query filter (SPEC §2): turn policy, language, toxic/redacted flags, length bounds,
//! exact and near-duplicate removal (MinHash over word shingles, LSH banding, candidates
//! checked against the similarity threshold). Every dropped row is counted by reason.

use crate::config::{FilterConfig, TurnPolicy};
use crate::stage1::input::{Conversation, InputStats};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::collections::{BTreeMap, HashMap, HashSet};

/// A kept user query: the input of extraction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Query {
    /// The conversation's id.
    pub id: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
}

/// Counts of the filter, written to `filter_stats.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FilterStats {
    pub input: InputStats,
    pub kept: usize,
    /// Dropped rows by reason.
    pub dropped: BTreeMap<String, usize>,
}

/// Lowercased, whitespace-collapsed text: the key of exact dedup and the shingler's input.
pub fn canonical(text: &str) -> String {
    text.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// FNV-1a, 64 bit: a stable shingle hash (the same on every platform and Rust version).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

const MERSENNE_61: u64 = (1 << 61) - 1;

/// MinHash signatures with universal hashes `(a·x + b) mod (2^61 − 1)`.
pub struct MinHasher {
    coeffs: Vec<(u64, u64)>,
    shingle_words: usize,
}

impl MinHasher {
    pub fn new(perms: usize, shingle_words: usize, seed: u64) -> Self {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let coeffs = (0..perms)
            .map(|_| {
                (
                    rng.random_range(1..MERSENNE_61),
                    rng.random_range(0..MERSENNE_61),
                )
            })
            .collect();
        Self {
            coeffs,
            shingle_words: shingle_words.max(1),
        }
    }

    /// Shingles of `shingle_words` lowercase words (punctuation ignored); a text shorter
    /// than one shingle is one shingle.
    pub fn shingles(&self, text: &str) -> HashSet<u64> {
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        if words.len() <= self.shingle_words {
            return HashSet::from([fnv1a(words.join(" ").as_bytes())]);
        }
        words
            .windows(self.shingle_words)
            .map(|w| fnv1a(w.join(" ").as_bytes()))
            .collect()
    }

    pub fn signature(&self, text: &str) -> Vec<u64> {
        let shingles = self.shingles(text);
        self.coeffs
            .iter()
            .map(|&(a, b)| {
                shingles
                    .iter()
                    .map(|&x| {
                        let x = x % MERSENNE_61;
                        ((a as u128 * x as u128 + b as u128) % MERSENNE_61 as u128) as u64
                    })
                    .min()
                    .unwrap_or(u64::MAX)
            })
            .collect()
    }
}

/// Fraction of equal signature slots: the MinHash estimate of Jaccard similarity.
pub fn estimated_jaccard(a: &[u64], b: &[u64]) -> f64 {
    let eq = a.iter().zip(b).filter(|(x, y)| x == y).count();
    eq as f64 / a.len().max(1) as f64
}

/// The near-duplicate index over the queries kept so far.
pub struct NearDuplicates {
    hasher: MinHasher,
    bands: usize,
    threshold: f64,
    buckets: HashMap<(usize, u64), Vec<usize>>,
    signatures: Vec<Vec<u32>>,
}

impl NearDuplicates {
    pub fn new(cfg: &FilterConfig) -> Self {
        Self {
            hasher: MinHasher::new(cfg.minhash_perms, cfg.shingle_words, cfg.seed),
            bands: cfg.minhash_bands,
            threshold: cfg.near_duplicate_threshold,
            buckets: HashMap::new(),
            signatures: Vec::new(),
        }
    }

    /// True if `text` is a near-duplicate of an inserted text; otherwise inserts it.
    pub fn check_and_insert(&mut self, text: &str) -> bool {
        // Signatures are stored as 32-bit slots (a million queries fit in ~0.5 GB).
        let sig: Vec<u32> = self
            .hasher
            .signature(text)
            .iter()
            .map(|&v| v as u32)
            .collect();
        let rows = sig.len() / self.bands;
        let keys: Vec<(usize, u64)> = (0..self.bands)
            .map(|band| {
                let bytes: Vec<u8> = sig[band * rows..(band + 1) * rows]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                (band, fnv1a(&bytes))
            })
            .collect();
        let mut seen = HashSet::new();
        for k in &keys {
            for &cand in self.buckets.get(k).into_iter().flatten() {
                if seen.insert(cand) {
                    let other = &self.signatures[cand];
                    let eq = sig.iter().zip(other).filter(|(x, y)| x == y).count();
                    if eq as f64 / sig.len() as f64 >= self.threshold {
                        return true;
                    }
                }
            }
        }
        let idx = self.signatures.len();
        self.signatures.push(sig);
        for k in keys {
            self.buckets.entry(k).or_default().push(idx);
        }
        false
    }
}

/// Applies the filter conversation by conversation (streaming: only dedup state is kept).
pub struct QueryFilter {
    cfg: FilterConfig,
    languages: HashSet<String>,
    exact: HashSet<[u8; 32]>,
    near: NearDuplicates,
    pub stats: FilterStats,
}

impl QueryFilter {
    pub fn new(cfg: &FilterConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            languages: cfg.languages.iter().map(|l| l.to_lowercase()).collect(),
            exact: HashSet::new(),
            near: NearDuplicates::new(cfg),
            stats: FilterStats::default(),
        }
    }

    fn drop(&mut self, reason: &str) -> Option<Query> {
        *self.stats.dropped.entry(reason.to_string()).or_default() += 1;
        None
    }

    /// The query of `conv` if it passes, else `None` (counted by reason).
    pub fn apply(&mut self, conv: Conversation) -> Option<Query> {
        let user: Vec<&str> = conv
            .turns
            .iter()
            .filter(|t| t.role.eq_ignore_ascii_case("user") || t.role.eq_ignore_ascii_case("human"))
            .map(|t| t.content.as_str())
            .collect();
        let Some(first) = user.first() else {
            return self.drop("no_user_turn");
        };
        if self.cfg.turns == TurnPolicy::Single && user.len() > 1 {
            return self.drop("multi_turn");
        }
        if !self.languages.is_empty() {
            if let Some(l) = &conv.language {
                if !self.languages.contains(&l.to_lowercase()) {
                    return self.drop("language");
                }
            }
        }
        if self.cfg.drop_toxic && conv.toxic {
            return self.drop("toxic");
        }
        if self.cfg.drop_redacted && conv.redacted {
            return self.drop("redacted");
        }
        let text = first.trim().to_string();
        let chars = text.chars().count();
        if chars < self.cfg.min_query_chars {
            return self.drop("too_short");
        }
        if chars > self.cfg.max_query_chars {
            return self.drop("too_long");
        }
        if self.cfg.exact_dedup {
            let key: [u8; 32] = sha2::Sha256::digest(canonical(&text).as_bytes()).into();
            if !self.exact.insert(key) {
                return self.drop("exact_duplicate");
            }
        }
        if self.cfg.near_dedup && self.near.check_and_insert(&text) {
            return self.drop("near_duplicate");
        }
        self.stats.kept += 1;
        Some(Query {
            id: conv.id,
            text,
            language: conv.language,
        })
    }
}
