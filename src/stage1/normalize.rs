//! Per-field value normalisation before graph building (SPEC §2): lowercase, trim, collapse
//! whitespace, strip outer punctuation, cap the words; drop "nothing" values; merge each
//! value into a more frequent value of the same field when they are similar enough; drop
//! values below the support threshold. Writes nothing itself: `graph.rs` saves the
//! normalised records and the merge report.

use crate::stage1::config::{NormalizeConfig, SimilarityMetric};
use crate::stage1::extract::MetaRecord;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// One query's normalised meta-information (document_type is the graph it belongs to).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormalizedRecord {
    pub id: String,
    pub document_type: String,
    /// field → normalised value (fields whose value was dropped are absent).
    pub values: BTreeMap<String, String>,
}

/// Values of one field folded into a canonical value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Merge {
    pub canonical: String,
    pub count: usize,
    pub merged: Vec<MergedValue>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergedValue {
    pub value: String,
    pub count: usize,
    pub similarity: f64,
}

/// What normalisation did, per field: `merges.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MergeReport {
    pub fields: BTreeMap<String, FieldReport>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FieldReport {
    pub distinct_before: usize,
    pub distinct_after: usize,
    pub null_values: usize,
    pub below_support: usize,
    pub merges: Vec<Merge>,
}

/// The surface normalisation of one value; `None` for a "nothing" value.
pub fn clean_value(raw: &str, cfg: &NormalizeConfig) -> Option<String> {
    let lower = raw.to_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    let joined = words
        .iter()
        .take(cfg.max_value_words)
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let v = joined
        .trim_matches(|c: char| !c.is_alphanumeric() && c != '+' && c != '#')
        .to_string();
    if cfg.null_values.iter().any(|n| n.to_lowercase() == v) || v.is_empty() {
        None
    } else {
        Some(v)
    }
}

pub fn similarity(a: &str, b: &str, metric: SimilarityMetric) -> f64 {
    match metric {
        SimilarityMetric::Levenshtein => strsim::normalized_levenshtein(a, b),
        SimilarityMetric::JaroWinkler => strsim::jaro_winkler(a, b),
    }
}

/// Canonical value of every value of one field: values in order of count (ties by text),
/// each merged into the first earlier canonical value at least `threshold` similar.
fn merge_field(
    counts: &HashMap<String, usize>,
    cfg: &NormalizeConfig,
) -> (HashMap<String, String>, Vec<Merge>) {
    let mut values: Vec<(&String, usize)> = counts.iter().map(|(v, &c)| (v, c)).collect();
    values.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut canon: Vec<(String, usize, Vec<MergedValue>)> = Vec::new();
    let mut map = HashMap::new();
    for (v, c) in values {
        let best = if cfg.merge_similarity >= 1.0 {
            None
        } else {
            // Levenshtein similarity ≥ t needs lengths within a factor t: skip the rest.
            let n = v.chars().count() as f64;
            canon
                .par_iter()
                .enumerate()
                .filter(|(_, (k, _, _))| {
                    cfg.similarity != SimilarityMetric::Levenshtein || {
                        let m = k.chars().count() as f64;
                        n.min(m) >= cfg.merge_similarity * n.max(m)
                    }
                })
                .map(|(i, (k, _, _))| (i, similarity(v, k, cfg.similarity)))
                .filter(|&(_, s)| s >= cfg.merge_similarity)
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
        };
        match best {
            Some((i, s)) => {
                canon[i].1 += c;
                canon[i].2.push(MergedValue {
                    value: v.clone(),
                    count: c,
                    similarity: (s * 1e4).round() / 1e4,
                });
                map.insert(v.clone(), canon[i].0.clone());
            }
            None => {
                map.insert(v.clone(), v.clone());
                canon.push((v.clone(), c, Vec::new()));
            }
        }
    }
    let merges = canon
        .into_iter()
        .filter(|(_, _, m)| !m.is_empty())
        .map(|(canonical, count, merged)| Merge {
            canonical,
            count,
            merged,
        })
        .collect();
    (map, merges)
}

/// Normalises every record's values (all fields except `document_type`).
pub fn normalize(
    records: &[MetaRecord],
    cfg: &NormalizeConfig,
) -> (Vec<NormalizedRecord>, MergeReport) {
    let mut cleaned: Vec<BTreeMap<String, String>> = Vec::with_capacity(records.len());
    let mut counts: BTreeMap<String, HashMap<String, usize>> = BTreeMap::new();
    let mut report = MergeReport::default();
    for r in records {
        let mut vals = BTreeMap::new();
        for (field, raw) in &r.meta {
            if field == "document_type" {
                continue;
            }
            let fr = report.fields.entry(field.clone()).or_default();
            match clean_value(raw, cfg) {
                Some(v) => {
                    *counts
                        .entry(field.clone())
                        .or_default()
                        .entry(v.clone())
                        .or_default() += 1;
                    vals.insert(field.clone(), v);
                }
                None => fr.null_values += 1,
            }
        }
        cleaned.push(vals);
    }
    let mut maps = BTreeMap::new();
    let mut support: BTreeMap<String, HashMap<String, usize>> = BTreeMap::new();
    for (field, c) in &counts {
        let (map, merges) = merge_field(c, cfg);
        let fr = report.fields.entry(field.clone()).or_default();
        fr.distinct_before = c.len();
        fr.merges = merges;
        let s = support.entry(field.clone()).or_default();
        for (v, n) in c {
            *s.entry(map[v].clone()).or_default() += n;
        }
        fr.below_support = s.values().filter(|&&n| n < cfg.min_support).count();
        fr.distinct_after = s.len() - fr.below_support;
        maps.insert(field.clone(), map);
    }
    let out = records
        .iter()
        .zip(cleaned)
        .map(|(r, vals)| NormalizedRecord {
            id: r.id.clone(),
            document_type: r.document_type.clone(),
            values: vals
                .into_iter()
                .filter_map(|(f, v)| {
                    let c = maps[&f][&v].clone();
                    (support[&f][&c] >= cfg.min_support).then_some((f, c))
                })
                .collect(),
        })
        .collect();
    (out, report)
}
