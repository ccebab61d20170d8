//! Sample assembly to token budgets: for each length bucket, single documents and
//! multi-document bundles (same type, `Document i` delimiters with ids) whose document
//! block, measured with the target tokenizer, fills `bucket − reserve_tokens` to within the
//! fill tolerance and never exceeds it. Longer documents are cut at a line break near the
//! budget; documents too short for every bucket are counted. Seeded: the same documents and
//! settings give the same contexts.

use crate::engine::tokenizer::Tokenizer;
use crate::records::hex;
use crate::stage2::config::AssembleConfig;
use crate::stage2::documents::Document;
use anyhow::Result;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};

/// One document's part in a context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    pub id: String,
    /// The document's full length and the tokens of it used here.
    pub tokens: usize,
    pub used_tokens: usize,
}

/// The document block of one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Context {
    /// Hash of the bucket and the text.
    pub id: String,
    pub bucket: usize,
    /// bucket − reserve_tokens: what `text` must fit.
    pub budget: usize,
    /// Tokens of `text` with the target tokenizer.
    pub tokens: usize,
    pub document_type: String,
    pub documents: Vec<Part>,
    /// For bundles: comparison, aggregation, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_family: Option<String>,
    pub text: String,
}

impl Context {
    pub fn is_multi(&self) -> bool {
        self.documents.len() > 1
    }
}

/// Achieved lengths of one bucket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BucketStats {
    pub wanted: usize,
    pub single: usize,
    pub multi: usize,
    /// Samples the documents could not provide (too few long enough, or distinct).
    pub shortfall: usize,
    pub min_tokens: usize,
    pub median_tokens: usize,
    pub max_tokens: usize,
    /// Achieved tokens in bins of 256: bin start → count.
    pub histogram: BTreeMap<usize, usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AssemblyStats {
    pub buckets: BTreeMap<usize, BucketStats>,
    /// Documents shorter than every bucket's smallest usable share.
    pub too_short_for_every_bucket: usize,
}

/// The delimiter line before document `i` (1-based) of a bundle.
pub fn delimiter(i: usize, id: &str) -> String {
    format!("Document {i} (id: {id}):\n")
}

/// The first `n` tokens of `text`, backed off to the last line break (or sentence end) if
/// one lies in the final `slack` tokens; returns the text and its token count.
fn cut(
    tok: &Tokenizer,
    text: &str,
    ids: &[u32],
    n: usize,
    slack: usize,
) -> Result<(String, usize)> {
    if ids.len() <= n {
        return Ok((text.to_string(), ids.len()));
    }
    let head = tok.decode(&ids[..n], false)?;
    let tail_start = tok.decode(&ids[..n.saturating_sub(slack)], false)?.len();
    let at = head[tail_start.min(head.len())..]
        .rfind('\n')
        .or_else(|| {
            head[tail_start.min(head.len())..]
                .rfind(". ")
                .map(|i| i + 1)
        })
        .map(|i| tail_start + i);
    let s = match at {
        Some(i) if i > 0 => head[..i].trim_end().to_string(),
        _ => head,
    };
    let used = tok.encode(&s, false)?.len();
    Ok((s, used))
}

fn render(parts: &[(String, String)]) -> String {
    if parts.len() == 1 {
        return parts[0].1.clone();
    }
    parts
        .iter()
        .enumerate()
        .map(|(i, (id, text))| format!("{}{}", delimiter(i + 1, id), text))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Builds the context of `docs` at `budget`: each document gets an equal share, cut as
/// needed; shares shrink until the rendered block fits. `None` if it cannot fill the
/// budget to the tolerance.
fn build(
    tok: &Tokenizer,
    docs: &[&Document],
    bucket: usize,
    budget: usize,
    tol: f64,
) -> Result<Option<Context>> {
    let ids: Vec<Vec<u32>> = docs
        .iter()
        .map(|d| tok.encode(&d.text, false))
        .collect::<Result<_>>()?;
    let overhead: usize = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if docs.len() == 1 {
                Ok(0)
            } else {
                Ok(tok.encode(&delimiter(i + 1, &d.id), false)?.len() + 2)
            }
        })
        .sum::<Result<usize>>()?;
    let floor = (budget as f64 * (1.0 - tol)).ceil() as usize;
    let slack = ((budget as f64 * tol / 2.0) as usize / docs.len()).max(1);
    let mut share = budget.saturating_sub(overhead) / docs.len();
    for _ in 0..8 {
        let mut parts = Vec::new();
        let mut used = Vec::new();
        for (d, ids) in docs.iter().zip(&ids) {
            let (text, n) = cut(tok, &d.text, ids, share, slack)?;
            parts.push((d.id.clone(), text));
            used.push(n);
        }
        let text = render(&parts);
        let tokens = tok.encode(&text, false)?.len();
        if tokens > budget {
            share -= ((tokens - budget) / docs.len()).max(1) + 2;
            continue;
        }
        if tokens < floor {
            return Ok(None);
        }
        let id = hex(&Sha256::new()
            .chain_update(bucket.to_le_bytes())
            .chain_update(text.as_bytes())
            .finalize())[..16]
            .to_string();
        return Ok(Some(Context {
            id,
            bucket,
            budget,
            tokens,
            document_type: docs[0].document_type.clone(),
            documents: docs
                .iter()
                .zip(used)
                .map(|(d, u)| Part {
                    id: d.id.clone(),
                    tokens: d.tokens,
                    used_tokens: u,
                })
                .collect(),
            task_family: None,
            text,
        }));
    }
    Ok(None)
}

/// Contexts for every bucket: quota × (1 − share) single documents and the rest bundles.
pub fn assemble(
    tok: &Tokenizer,
    docs: &[Document],
    cfg: &AssembleConfig,
) -> Result<(Vec<Context>, AssemblyStats)> {
    let mut out = Vec::new();
    let mut stats = AssemblyStats::default();
    let min_share = cfg
        .buckets
        .iter()
        .map(|&b| (b - cfg.reserve_tokens) / cfg.max_documents)
        .min()
        .unwrap_or(0);
    stats.too_short_for_every_bucket = docs.iter().filter(|d| d.tokens < min_share).count();
    for (bi, &bucket) in cfg.buckets.iter().enumerate() {
        let quota = cfg.quotas.get(bi).copied().unwrap_or(cfg.per_bucket);
        let budget = bucket - cfg.reserve_tokens;
        let floor = (budget as f64 * (1.0 - cfg.fill_tolerance)).ceil() as usize;
        let mut rng: ChaCha8Rng = crate::records::derived_rng(cfg.seed, &[&bucket.to_le_bytes()]);
        let n_multi = (quota as f64 * cfg.multi_document_share).round() as usize;
        let mut bs = BucketStats {
            wanted: quota,
            ..Default::default()
        };
        let mut seen = HashSet::new();
        let mut made = Vec::new();
        // Single documents: each long enough document once per bucket, in seeded order.
        let mut singles: Vec<&Document> = docs.iter().filter(|d| d.tokens >= floor).collect();
        singles.shuffle(&mut rng);
        for d in singles {
            if bs.single == quota - n_multi {
                break;
            }
            if let Some(c) = build(tok, &[d], bucket, budget, cfg.fill_tolerance)? {
                if seen.insert(c.id.clone()) {
                    bs.single += 1;
                    made.push(c);
                }
            }
        }
        // Bundles: n same-type documents, each long enough for an equal share.
        let mut attempts = 0;
        while bs.multi < n_multi && attempts < 20 * n_multi.max(1) {
            attempts += 1;
            let n = rng.random_range(cfg.min_documents..=cfg.max_documents);
            let share = budget / n;
            let mut by_type: BTreeMap<&str, Vec<&Document>> = BTreeMap::new();
            for d in docs.iter().filter(|d| d.tokens >= share) {
                by_type.entry(d.document_type.as_str()).or_default().push(d);
            }
            let types: Vec<&str> = by_type
                .iter()
                .filter(|(_, v)| v.len() >= n)
                .map(|(t, _)| *t)
                .collect();
            let Some(t) = types.choose(&mut rng) else {
                continue;
            };
            let picked: Vec<&Document> = by_type[t].choose_multiple(&mut rng, n).copied().collect();
            let mut key: Vec<&str> = picked.iter().map(|d| d.id.as_str()).collect();
            key.sort();
            if !seen.insert(key.join("\u{0}")) {
                continue;
            }
            if let Some(mut c) = build(tok, &picked, bucket, budget, cfg.fill_tolerance)? {
                c.task_family = cfg.task_families.choose(&mut rng).cloned();
                bs.multi += 1;
                made.push(c);
            }
        }
        bs.shortfall = quota - bs.single - bs.multi;
        let mut lens: Vec<usize> = made.iter().map(|c| c.tokens).collect();
        lens.sort();
        if let (Some(&lo), Some(&hi)) = (lens.first(), lens.last()) {
            bs.min_tokens = lo;
            bs.max_tokens = hi;
            bs.median_tokens = lens[lens.len() / 2];
        }
        for l in &lens {
            *bs.histogram.entry(l / 256 * 256).or_default() += 1;
        }
        stats.buckets.insert(bucket, bs);
        out.extend(made);
    }
    Ok((out, stats))
}
