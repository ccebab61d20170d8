//! `wildlong sample`: seeded weighted random walks over each document type's graph into
//! blueprint paths (start at a `task` node, step to a neighbour of a field not yet on the
//! path with probability proportional to the edge weight, 3–6 fields), deduplicated, up to
//! a quota per type (`paths.jsonl`); then the LLM writes one instruction blueprint per path
//! (`blueprints.jsonl`, appended per batch, resumable).

use crate::engine::config::{GenerationParams, SamplingParams};
use crate::engine::generate::Completion;
use crate::generator::Llm;
use crate::records::{
    append_line, progress_bar, read_jsonl_resumable, write_atomic, Blueprint, BlueprintProvenance,
    PathStep,
};
use crate::stage1::config::SampleConfig;
use crate::stage1::graph::TypeGraph;
use crate::stage1::input::hex;
use crate::stage1::prompts::{blueprint_messages, BLUEPRINT_VERSION};
use anyhow::{bail, Context, Result};
use petgraph::graph::NodeIndex;
use petgraph::visit::EdgeRef;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

/// Picks an index with probability proportional to `weights` (all > 0).
fn pick(weights: &[f64], rng: &mut ChaCha8Rng) -> usize {
    let total: f64 = weights.iter().sum();
    let mut x = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    weights.len() - 1
}

/// One walk of up to `len` nodes from `start`: each step goes to a neighbour of the current
/// node whose field is not on the path yet, with probability ∝ edge weight (edges of weight
/// ≤ 0 are not taken). Stops early at a dead end.
pub fn walk(g: &TypeGraph, start: NodeIndex, len: usize, rng: &mut ChaCha8Rng) -> Vec<NodeIndex> {
    let mut path = vec![start];
    let mut fields: HashSet<&str> = HashSet::from([g.graph[start].field.as_str()]);
    while path.len() < len {
        let cur = *path.last().expect("non-empty");
        let mut options: Vec<(NodeIndex, f64)> = g
            .graph
            .edges(cur)
            .filter(|e| e.weight().weight > 0.0)
            .map(|e| {
                (
                    if e.source() == cur {
                        e.target()
                    } else {
                        e.source()
                    },
                    e.weight().weight,
                )
            })
            .filter(|(n, _)| !fields.contains(g.graph[*n].field.as_str()))
            .collect();
        if options.is_empty() {
            break;
        }
        // Edge iteration order is an implementation detail: sort for reproducibility.
        options.sort_by_key(|(n, _)| n.index());
        let w: Vec<f64> = options.iter().map(|o| o.1).collect();
        let next = options[pick(&w, rng)].0;
        fields.insert(g.graph[next].field.as_str());
        path.push(next);
    }
    path
}

/// Counts of path sampling for one type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TypeSampleStats {
    pub quota: usize,
    pub paths: usize,
    pub attempts: usize,
    pub too_short: usize,
    pub duplicates: usize,
}

fn type_rng(seed: u64, document_type: &str) -> ChaCha8Rng {
    crate::records::derived_rng(seed, &[document_type.as_bytes()])
}

/// Distinct paths for one type, up to `quota`.
pub fn sample_paths(
    g: &TypeGraph,
    cfg: &SampleConfig,
    quota: usize,
) -> (Vec<Vec<NodeIndex>>, TypeSampleStats) {
    let mut stats = TypeSampleStats {
        quota,
        ..Default::default()
    };
    let starts: Vec<NodeIndex> = g
        .graph
        .node_indices()
        .filter(|&i| g.graph[i].field == cfg.start_field)
        .collect();
    if starts.is_empty() || quota == 0 {
        return (vec![], stats);
    }
    let start_w: Vec<f64> = starts.iter().map(|&i| g.graph[i].count as f64).collect();
    let mut rng = type_rng(cfg.seed, &g.document_type);
    let mut seen: HashSet<BTreeSet<usize>> = HashSet::new();
    let mut out = Vec::new();
    let max_attempts = quota * cfg.attempts_per_path.max(1);
    while out.len() < quota && stats.attempts < max_attempts {
        stats.attempts += 1;
        let len = rng.random_range(cfg.min_fields..=cfg.max_fields);
        let start = starts[pick(&start_w, &mut rng)];
        let p = walk(g, start, len, &mut rng);
        if p.len() < cfg.min_fields {
            stats.too_short += 1;
            continue;
        }
        if !seen.insert(p.iter().map(|n| n.index()).collect()) {
            stats.duplicates += 1;
            continue;
        }
        out.push(p);
    }
    stats.paths = out.len();
    (out, stats)
}

/// A sampled path with its id: one line of `paths.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledPath {
    pub id: String,
    pub document_type: String,
    pub path: Vec<PathStep>,
    pub conversation_ids: Vec<String>,
}

fn path_id(document_type: &str, steps: &[PathStep]) -> String {
    let mut h = Sha256::new();
    h.update(document_type.as_bytes());
    let mut sorted: Vec<&PathStep> = steps.iter().collect();
    sorted.sort_by(|a, b| (&a.field, &a.value).cmp(&(&b.field, &b.value)));
    for s in sorted {
        h.update([0]);
        h.update(s.field.as_bytes());
        h.update([1]);
        h.update(s.value.as_bytes());
    }
    hex(&h.finalize())[..16].to_string()
}

/// Paths of every type, per-type quotas applied; writes `paths.jsonl` and `sample_stats.json`.
pub fn sample_all(
    graphs: &[TypeGraph],
    cfg: &SampleConfig,
    dir: &Path,
) -> Result<Vec<SampledPath>> {
    for t in cfg.quotas.keys() {
        if !graphs.iter().any(|g| &g.document_type == t) {
            tracing::warn!("sample.quotas names {t:?}, which has no graph");
        }
    }
    let mut all = Vec::new();
    let mut stats = BTreeMap::new();
    for g in graphs {
        let quota = cfg
            .quotas
            .get(&g.document_type)
            .copied()
            .unwrap_or(cfg.per_type);
        let (paths, s) = sample_paths(g, cfg, quota);
        stats.insert(g.document_type.clone(), s);
        for p in paths {
            let steps: Vec<PathStep> = p
                .iter()
                .map(|&n| PathStep {
                    field: g.graph[n].field.clone(),
                    value: g.graph[n].value.clone(),
                })
                .collect();
            let mut ids: Vec<String> = Vec::new();
            for &n in &p {
                for s in &g.graph[n].sources {
                    if !ids.contains(s) {
                        ids.push(s.clone());
                    }
                }
            }
            all.push(SampledPath {
                id: path_id(&g.document_type, &steps),
                document_type: g.document_type.clone(),
                path: steps,
                conversation_ids: ids,
            });
        }
    }
    crate::records::write_jsonl_atomic(&dir.join(crate::layout::stage1::PATHS), &all)?;
    write_atomic(
        &dir.join(crate::layout::stage1::SAMPLE_STATS),
        serde_json::to_string_pretty(&stats)?.as_bytes(),
    )?;
    Ok(all)
}

/// Writes a blueprint for every path not yet in `<dir>/blueprints.jsonl`.
pub fn write_blueprints(
    llm: &Llm,
    model: &str,
    paths: &[SampledPath],
    cfg: &SampleConfig,
    weighting: &str,
    dir: &Path,
    progress: bool,
) -> Result<usize> {
    let out = dir.join(crate::layout::stage1::BLUEPRINTS);
    crate::records::check_identity(
        &dir.join(crate::layout::stage1::SAMPLE_IDENTITY),
        &serde_json::json!({ "model": model, "prompt_version": BLUEPRINT_VERSION, "sample": cfg }),
    )?;
    let done: HashSet<String> = read_jsonl_resumable::<Blueprint>(&out)?
        .into_iter()
        .map(|b| b.id)
        .collect();
    let todo: Vec<&SampledPath> = paths.iter().filter(|p| !done.contains(&p.id)).collect();
    if paths.is_empty() {
        bail!("no paths were sampled: are the graphs empty? (see sample_stats.json)");
    }
    let schema = serde_json::json!({
        "type": "object",
        "properties": { "instruction": {
            "type": "string", "minLength": 20, "maxLength": cfg.max_instruction_chars
        }},
        "required": ["instruction"],
        "additionalProperties": false,
        "x-guidance": { "whitespace_flexible": false, "json_allowed_escapes": "\"\\" }
    });
    let pb = progress_bar(progress, paths.len() as u64, "blueprints");
    pb.set_position(done.len() as u64);
    let batch = llm.batch_size();
    for group in todo.chunks(batch) {
        let reqs: Vec<_> = group
            .iter()
            .map(|p| {
                let seed = crate::records::derived_u64(cfg.seed, &[p.id.as_bytes()]);
                (
                    blueprint_messages(&p.document_type, &p.path),
                    GenerationParams {
                        max_tokens: 16 + 2 * cfg.max_instruction_chars,
                        sampling: SamplingParams {
                            temperature: cfg.temperature,
                            seed,
                            ..Default::default()
                        },
                        json_schema: Some(schema.clone()),
                        ..Default::default()
                    },
                )
            })
            .collect();
        // Written in path order as soon as every earlier path's blueprint is in (the
        // engine finishes them in another order).
        let mut in_order = crate::records::InOrder::default();
        llm.chat_each(&reqs, |i, c| {
            in_order.push(i, c, |i, c: Completion| {
                let (p, r) = (&group[i], &reqs[i]);
                let v: serde_json::Value = serde_json::from_str(&c.text).with_context(|| {
                    format!("path {}: the model's output is not JSON: {}", p.id, c.text)
                })?;
                let instruction = v["instruction"]
                    .as_str()
                    .with_context(|| format!("path {}: no instruction in {}", p.id, c.text))?
                    .trim()
                    .to_string();
                append_line(
                    &out,
                    &Blueprint {
                        id: p.id.clone(),
                        document_type: p.document_type.clone(),
                        path: p.path.clone(),
                        instruction,
                        provenance: BlueprintProvenance {
                            model: model.to_string(),
                            prompt_version: BLUEPRINT_VERSION.into(),
                            seed: r.1.sampling.seed,
                            conversation_ids: p.conversation_ids.clone(),
                            weighting: weighting.to_string(),
                        },
                    },
                )?;
                pb.inc(1);
                Ok(())
            })
        })?;
    }
    pb.finish_and_clear();
    Ok(todo.len())
}

/// The `sample` command and the pipeline's step: paths from the graphs in `dir`, then (with
/// an LLM) a blueprint for each path not yet written. Returns (paths, new blueprints).
pub fn run(
    llm: Option<&Llm>,
    model: &str,
    cfg: &SampleConfig,
    dir: &Path,
    progress: bool,
) -> Result<(usize, usize)> {
    let graphs = crate::stage1::graph::load_all(dir)?;
    let paths = sample_all(&graphs, cfg, dir)?;
    let Some(llm) = llm else {
        return Ok((paths.len(), 0));
    };
    let weighting = graphs
        .first()
        .map(|g| serde_json::to_value(g.weighting))
        .transpose()?
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    let n = write_blueprints(llm, model, &paths, cfg, &weighting, dir, progress)?;
    Ok((paths.len(), n))
}
