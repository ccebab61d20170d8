//! Stage 2's outputs besides `data.jsonl`: the Parquet copy (what `datasets.load_dataset`
//! and pandas read: `messages` as a list of `{role, content}`, the main metadata as columns,
//! the full metadata as a JSON string), and the merge of sharded outputs into one dataset.

use crate::engine::blocks::CacheUse;
use crate::records::{read_jsonl_resumable, write_atomic, write_jsonl_atomic, Pair};
use crate::stage2::assemble::Context;
use crate::stage2::config::Stage2Config;
use crate::stage2::synth::SynthStats;
use anyhow::{bail, Context as _, Result};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const SCHEMA: &str = "
message pair {
  REQUIRED BYTE_ARRAY id (UTF8);
  REQUIRED group messages (LIST) {
    REPEATED group list {
      REQUIRED group element {
        REQUIRED BYTE_ARRAY role (UTF8);
        REQUIRED BYTE_ARRAY content (UTF8);
      }
    }
  }
  REQUIRED BYTE_ARRAY document_type (UTF8);
  REQUIRED INT64 bucket;
  REQUIRED INT64 prompt_tokens;
  REQUIRED BOOLEAN multi_document;
  REQUIRED BYTE_ARRAY model (UTF8);
  REQUIRED BYTE_ARRAY prompt_version (UTF8);
  REQUIRED BYTE_ARRAY metadata (UTF8);
}";

fn bytes(s: &str) -> ByteArray {
    ByteArray::from(s.as_bytes().to_vec())
}

/// Writes `pairs` as Parquet (one row group; temp file + rename).
pub fn write_parquet(path: &Path, pairs: &[Pair]) -> Result<()> {
    let schema = Arc::new(parse_message_type(SCHEMA).context("the Parquet schema")?);
    let props = Arc::new(WriterProperties::builder().build());
    let mut buf = Vec::new();
    {
        let mut w = SerializedFileWriter::new(&mut buf, schema, props)?;
        let mut rg = w.next_row_group()?;
        // Leaf columns in schema order; `messages` leaves carry repetition levels (0 starts
        // a row, 1 continues its list) and definition level 1 (every list is non-empty).
        let rep: Vec<i16> = pairs
            .iter()
            .flat_map(|p| (0..p.messages.len()).map(|i| i16::from(i > 0)))
            .collect();
        let def = vec![1i16; rep.len()];
        let mut col = 0;
        while let Some(mut c) = rg.next_column()? {
            match col {
                0 | 3 | 7 | 8 | 9 => {
                    let v: Vec<ByteArray> = pairs
                        .iter()
                        .map(|p| match col {
                            0 => Ok(bytes(&p.id)),
                            3 => Ok(bytes(&p.metadata.document_type)),
                            7 => Ok(bytes(&p.metadata.model)),
                            8 => Ok(bytes(&p.metadata.prompt_version)),
                            _ => Ok(bytes(&serde_json::to_string(&p.metadata)?)),
                        })
                        .collect::<Result<_>>()?;
                    c.typed::<ByteArrayType>().write_batch(&v, None, None)?;
                }
                1 | 2 => {
                    let v: Vec<ByteArray> = pairs
                        .iter()
                        .flat_map(|p| {
                            p.messages.iter().map(|m| match col {
                                1 => bytes(&m.role),
                                _ => bytes(&m.content),
                            })
                        })
                        .collect();
                    c.typed::<ByteArrayType>()
                        .write_batch(&v, Some(&def), Some(&rep))?;
                }
                4 | 5 => {
                    let v: Vec<i64> = pairs
                        .iter()
                        .map(|p| match col {
                            4 => p.metadata.bucket as i64,
                            _ => p.metadata.prompt_tokens as i64,
                        })
                        .collect();
                    c.typed::<Int64Type>().write_batch(&v, None, None)?;
                }
                6 => {
                    let v: Vec<bool> = pairs.iter().map(|p| p.metadata.multi_document).collect();
                    c.typed::<BoolType>().write_batch(&v, None, None)?;
                }
                _ => bail!("unexpected Parquet column {col}"),
            }
            c.close()?;
            col += 1;
        }
        rg.close()?;
        w.close()?;
    }
    write_atomic(path, &buf)
}

/// The shard outputs `data.shard-k-of-n.jsonl` in `dir`, by k; all of one `n`.
fn shard_files(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found: Vec<(usize, usize, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let Some(rest) = name
            .strip_prefix("data.shard-")
            .and_then(|r| r.strip_suffix(".jsonl"))
        else {
            continue;
        };
        if let Some((k, n)) = rest.split_once("-of-") {
            if let (Ok(k), Ok(n)) = (k.parse(), n.parse()) {
                found.push((n, k, p));
            }
        }
    }
    found.sort();
    let Some(&(n, _, _)) = found.first() else {
        bail!(
            "{}: no data.shard-k-of-n.jsonl files to merge",
            dir.display()
        );
    };
    if found.iter().any(|f| f.0 != n) {
        bail!(
            "{}: shard files of different counts (n); remove the stale ones",
            dir.display()
        );
    }
    let ks: Vec<usize> = found.iter().map(|f| f.1).collect();
    if ks != (1..=n).collect::<Vec<_>>() {
        bail!(
            "{}: shards {ks:?} of {n} found; every shard must finish before the merge",
            dir.display()
        );
    }
    Ok(found.into_iter().map(|(_, k, p)| (k, p)).collect())
}

/// Merges the shard outputs in `dir` into `data.jsonl` (pairs in context order, as one
/// unsharded run orders them; near-duplicate instructions across shards rejected) and
/// returns the pairs with the summed statistics.
pub fn merge(
    dir: &Path,
    near_duplicate_threshold: f64,
    seed: u64,
) -> Result<(Vec<Pair>, SynthStats)> {
    let files = shard_files(dir)?;
    let n = files.len();
    let contexts: Vec<Context> = read_jsonl_resumable(&dir.join(crate::layout::stage2::CONTEXTS))?;
    let order: HashMap<&str, usize> = contexts
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i))
        .collect();
    let mut pairs: Vec<(usize, Pair)> = Vec::new();
    let mut stats = SynthStats::default();
    for (k, path) in &files {
        let stats_path = dir.join(format!("synth_stats.shard-{k}-of-{n}.json"));
        let s: SynthStats = serde_json::from_str(
            &std::fs::read_to_string(&stats_path)
                .with_context(|| format!("reading {}", stats_path.display()))?,
        )
        .with_context(|| format!("{}: not synthesis statistics", stats_path.display()))?;
        stats.contexts += s.contexts;
        stats.reused += s.reused;
        stats.generated += s.generated;
        if let Some(c) = s.prefix_cache {
            CacheUse::add_to(&mut stats.prefix_cache, &c);
        }
        if let Some(c) = s.document_cache {
            CacheUse::add_to(&mut stats.document_cache, &c);
        }
        for (r, c) in s.rejected {
            *stats.rejected.entry(r).or_default() += c;
        }
        for p in read_jsonl_resumable::<Pair>(path)? {
            let Some(&i) = order.get(p.metadata.context_id.as_str()) else {
                bail!(
                    "{}: pair {} names context {:?}, which contexts.jsonl does not hold",
                    path.display(),
                    p.id,
                    p.metadata.context_id
                );
            };
            pairs.push((i, p));
        }
    }
    pairs.sort_by_key(|(i, _)| *i);
    let mut near = crate::stage2::gates::instruction_index(near_duplicate_threshold, seed);
    let mut kept = Vec::new();
    for (_, p) in pairs {
        if near.check_and_insert(&p.metadata.instruction) {
            *stats
                .rejected
                .entry("near_duplicate_instruction".into())
                .or_default() += 1;
        } else {
            kept.push(p);
        }
    }
    stats.pairs = kept.len();
    write_jsonl_atomic(&dir.join(crate::layout::stage2::DATA), &kept)?;
    Ok((kept, stats))
}

/// Every rejection of a run: the gates', documents skipped at reading, and samples the
/// documents could not provide at assembly (read from the files beside the data).
pub fn all_rejections(dir: &Path, stats: &SynthStats) -> Result<BTreeMap<String, usize>> {
    let mut rejected = stats.rejected.clone();
    let read = |name: &str| -> Result<serde_json::Value> {
        let p = dir.join(name);
        serde_json::from_str(
            &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("{}: invalid JSON", p.display()))
    };
    let docs = read("documents_stats.json")?;
    for (k, v) in docs["skipped"].as_object().into_iter().flatten() {
        *rejected.entry(format!("document: {k}")).or_default() += v.as_u64().unwrap_or(0) as usize;
    }
    let asm = read("assembly_stats.json")?;
    for (b, s) in asm["buckets"].as_object().into_iter().flatten() {
        let short = s["shortfall"].as_u64().unwrap_or(0) as usize;
        if short > 0 {
            *rejected
                .entry(format!("assembly: bucket {b} short of documents"))
                .or_default() += short;
        }
    }
    Ok(rejected)
}

/// Writes the statistics, the dataset card and (if configured) Parquet beside
/// `data<suffix>.jsonl`; returns the data file's path.
pub fn finish(
    dir: &Path,
    suffix: &str,
    pairs: &[Pair],
    stats: &SynthStats,
    cfg: &Stage2Config,
    model: &str,
) -> Result<PathBuf> {
    write_atomic(
        &dir.join(format!("synth_stats{suffix}.json")),
        serde_json::to_string_pretty(stats)?.as_bytes(),
    )?;
    let rejected = all_rejections(dir, stats)?;
    write_atomic(
        &dir.join(format!("README{suffix}.md")),
        crate::stage2::card::render(pairs, &rejected, model).as_bytes(),
    )?;
    if cfg.output.parquet {
        write_parquet(&dir.join(format!("data{suffix}.parquet")), pairs)?;
    }
    Ok(dir.join(format!("data{suffix}.jsonl")))
}
