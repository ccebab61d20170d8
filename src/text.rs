//! Text utilities shared by the stages: canonical form, MinHash near-duplicate detection
//! (universal hashes over word shingles, LSH banding), word n-gram sets for
//! decontamination, and token-level F1 between two texts.

use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};

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
        let words = words(text);
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

/// The near-duplicate index over the texts kept so far.
pub struct NearDuplicates {
    hasher: MinHasher,
    bands: usize,
    threshold: f64,
    buckets: HashMap<(usize, u64), Vec<usize>>,
    signatures: Vec<Vec<u32>>,
}

impl NearDuplicates {
    /// `perms` MinHash slots in `bands` LSH bands over `shingle_words`-word shingles; a
    /// candidate is a duplicate at estimated Jaccard ≥ `threshold`.
    pub fn new(
        perms: usize,
        bands: usize,
        shingle_words: usize,
        threshold: f64,
        seed: u64,
    ) -> Self {
        Self {
            hasher: MinHasher::new(perms, shingle_words, seed),
            bands: bands.max(1),
            threshold,
            buckets: HashMap::new(),
            signatures: Vec::new(),
        }
    }

    /// True if `text` is a near-duplicate of an inserted text; otherwise inserts it.
    pub fn check_and_insert(&mut self, text: &str) -> bool {
        // Signatures are stored as 32-bit slots (a million texts fit in ~0.5 GB).
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

/// Lowercase words of `text`: maximal runs of alphanumeric characters.
pub fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// The set of hashed word n-grams of some texts: a text that shares an n-gram with it
/// overlaps them (the GPT-3 paper's 13-gram decontamination test).
pub struct NgramSet {
    n: usize,
    grams: HashSet<u64>,
}

impl NgramSet {
    pub fn new(n: usize) -> Self {
        Self {
            n: n.max(1),
            grams: HashSet::new(),
        }
    }

    fn hashes(&self, text: &str) -> Vec<u64> {
        let w = words(text);
        w.windows(self.n)
            .map(|g| fnv1a(g.join(" ").as_bytes()))
            .collect()
    }

    pub fn insert(&mut self, text: &str) {
        let h = self.hashes(text);
        self.grams.extend(h);
    }

    /// Distinct n-grams of `text` that are in the set.
    pub fn shared(&self, text: &str) -> usize {
        let own: HashSet<u64> = self.hashes(text).into_iter().collect();
        own.iter().filter(|h| self.grams.contains(h)).count()
    }

    pub fn len(&self) -> usize {
        self.grams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grams.is_empty()
    }
}

/// SQuAD's answer normalisation (`normalize_answer` of its v1.1 evaluation script):
/// lowercase, ASCII punctuation deleted, the articles a/an/the
/// removed, whitespace collapsed; returned as words.
pub fn squad_tokens(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(str::to_string)
        .collect()
}

/// SQuAD's token F1 between a prediction and a reference (0 when either is empty).
pub fn token_f1(pred: &str, reference: &str) -> f64 {
    let p = squad_tokens(pred);
    let r = squad_tokens(reference);
    if p.is_empty() || r.is_empty() {
        return 0.0;
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in &r {
        *counts.entry(w.as_str()).or_default() += 1;
    }
    let mut common = 0usize;
    for w in &p {
        if let Some(c) = counts.get_mut(w.as_str()) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / p.len() as f64;
    let recall = common as f64 / r.len() as f64;
    2.0 * precision * recall / (precision + recall)
}
