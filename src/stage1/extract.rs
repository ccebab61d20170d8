//! `wildlong extract`: filters conversations into queries (`queries.jsonl`,
//! `filter_stats.json`), then has the LLM fill the meta-information schema for each query as
//! JSON constrained to it (`meta[.shard-k-of-n].jsonl`). The extraction prompt lives here,
//! versioned; the instruction part is prefilled once and shared by every query. Records are
//! appended per batch, so a killed run resumes without losing or repeating any.

use crate::engine::chat::Message;
use crate::engine::config::{GenerationParams, SamplingParams};
use crate::engine::generate::{Completion, Engine, FinishReason, Request};
use crate::generator::Llm;
use crate::records::{
    append_line, check_identity, progress_bar, read_jsonl_resumable, write_atomic,
};
use crate::shard::Shard;
use crate::stage1::config::{DocumentTypeMode, MetaSchema, Stage1Config};
use crate::stage1::filter::{FilterStats, Query, QueryFilter};
use crate::stage1::input::{hex, Source};
use crate::stage1::prompts::{extract_messages, EXTRACT_VERSION};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// The JSON schema the output is constrained to: every field a string of at most
/// `max_value_chars` characters, in schema order, compact, no other keys.
pub fn output_schema(schema: &MetaSchema, cfg: &Stage1Config) -> serde_json::Value {
    let cap = cfg.extract.max_value_chars;
    let mut props = serde_json::Map::new();
    for f in &schema.fields {
        let v = if f.name == "document_type"
            && cfg.extract.document_type == DocumentTypeMode::Taxonomy
        {
            let mut names: Vec<&str> = schema
                .document_types
                .iter()
                .map(|t| t.name.as_str())
                .collect();
            names.push("other");
            serde_json::json!({ "type": "string", "enum": names })
        } else {
            serde_json::json!({ "type": "string", "minLength": 1, "maxLength": cap })
        };
        props.insert(f.name.clone(), v);
    }
    serde_json::json!({
        "type": "object",
        "properties": props,
        "required": schema.field_names(),
        "additionalProperties": false,
        "x-guidance": { "whitespace_flexible": false, "json_allowed_escapes": "\"\\" }
    })
}

/// Tokens that always suffice for the constrained output (no Length cut-offs): every
/// character of every value may cost two tokens (an escape).
fn max_output_tokens(schema: &MetaSchema, cfg: &Stage1Config) -> usize {
    let per_value = match cfg.extract.document_type {
        DocumentTypeMode::Free => 2 * cfg.extract.max_value_chars,
        DocumentTypeMode::Taxonomy => 2 * cfg.extract.max_value_chars.max(40),
    };
    16 + schema
        .fields
        .iter()
        .map(|f| f.name.len() + 8 + per_value)
        .sum::<usize>()
}

/// Where and how one extraction was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub model: String,
    pub prompt_version: String,
    pub schema_hash: String,
    pub seed: u64,
    pub query_truncated: bool,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
}

/// The meta-information of one query: one line of `meta.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetaRecord {
    /// The conversation id.
    pub id: String,
    /// Mapped onto the taxonomy (`other` when nothing matches).
    pub document_type: String,
    /// Every schema field as the model wrote it (document_type included).
    pub meta: BTreeMap<String, String>,
    pub provenance: Provenance,
}

/// A query whose output could not be used: one line of `rejects.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    pub id: String,
    pub reason: String,
    pub output: String,
}

/// Settings that must match for a run folder to be continued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Identity {
    model: String,
    prompt_version: String,
    schema_hash: String,
    extract: crate::stage1::config::ExtractConfig,
    queries: String,
}

pub struct Extraction<'a> {
    pub cfg: &'a Stage1Config,
    pub schema: &'a MetaSchema,
    /// `<run>/stage1`.
    pub dir: PathBuf,
    pub model: String,
    pub shard: Shard,
    /// Only the first `limit` queries (of the whole list, before sharding).
    pub limit: Option<usize>,
    pub progress: bool,
}

/// Per-shard counts, `extract_stats[.shard-k-of-n].json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExtractStats {
    pub records: usize,
    pub rejects: usize,
    pub document_types: BTreeMap<String, usize>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Seconds spent generating in this invocation, and queries done in it.
    pub seconds: f64,
    pub queries_this_run: usize,
    /// The local engine's prefix cache in this invocation (the instructions every query
    /// shares are computed once).
    #[serde(default)]
    pub prefix_cache: Option<crate::engine::blocks::CacheUse>,
}

fn sha(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0]);
    }
    hex(&h.finalize())
}

pub fn schema_hash(schema: &MetaSchema, cfg: &Stage1Config) -> String {
    sha(&[output_schema(schema, cfg).to_string().as_bytes()])[..16].to_string()
}

/// `filter_stats.json`: what the filter kept and dropped, per input and in all, and the
/// fingerprint of the inputs and settings that made `queries.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FilterReport {
    pub fingerprint: String,
    pub sources: Vec<(String, FilterStats)>,
    pub kept: usize,
    pub dropped: BTreeMap<String, usize>,
}

/// Runs the filter over every input into `<dir>/queries.jsonl` (streamed through a temp
/// file, then renamed), unless a previous run with the same inputs and filter made it.
/// Returns the fingerprint of the query list and the number of queries in it.
pub fn prepare_queries(cfg: &Stage1Config, dir: &Path) -> Result<(String, usize)> {
    let fingerprint = sha(&[
        serde_json::to_string(&cfg.input)?.as_bytes(),
        serde_json::to_string(&cfg.filter)?.as_bytes(),
    ])[..16]
        .to_string();
    let queries = dir.join(crate::layout::stage1::QUERIES);
    let stats_path = dir.join(crate::layout::stage1::FILTER_STATS);
    if queries.is_file() {
        if let Ok(text) = std::fs::read_to_string(&stats_path) {
            if let Ok(s) = serde_json::from_str::<FilterReport>(&text) {
                if s.fingerprint == fingerprint {
                    return Ok((fingerprint, s.kept));
                }
            }
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!("queries.jsonl.{}.tmp", std::process::id()));
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
    );
    // One dedup state across all inputs; stats per input.
    let mut filter = QueryFilter::new(&cfg.filter);
    let mut sources = Vec::new();
    let mut total_kept = 0;
    let mut dropped: BTreeMap<String, usize> = BTreeMap::new();
    let mut filter_all = || -> Result<()> {
        for spec in &cfg.input.paths {
            let source = Source::resolve(spec)?;
            filter.stats = FilterStats::default();
            let input = source.for_each(cfg.input.strict, |conv| {
                if let Some(q) = filter.apply(conv) {
                    serde_json::to_writer(&mut out, &q)?;
                    out.write_all(b"\n")?;
                }
                Ok(())
            })?;
            filter.stats.input = input;
            total_kept += filter.stats.kept;
            for (k, v) in &filter.stats.dropped {
                *dropped.entry(k.clone()).or_default() += v;
            }
            let m = filter.stats.input.malformed;
            if m > 0 {
                *dropped.entry("malformed".into()).or_default() += m;
            }
            sources.push((source.name(), filter.stats.clone()));
        }
        out.flush()?;
        if total_kept == 0 {
            bail!("no query passed the filter (dropped by reason: {dropped:?})");
        }
        Ok(())
    };
    // A failed run leaves the previous queries.jsonl as it was.
    if let Err(e) = filter_all() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &queries)
        .with_context(|| format!("renaming to {}", queries.display()))?;
    let saved = FilterReport {
        fingerprint: fingerprint.clone(),
        sources,
        kept: total_kept,
        dropped,
    };
    write_atomic(
        &stats_path,
        serde_json::to_string_pretty(&saved)?.as_bytes(),
    )?;
    Ok((fingerprint, total_kept))
}

/// Streams `queries.jsonl`, calling `f` on the chunks of this shard's queries that `keep`
/// accepts.
fn for_each_chunk(
    path: &Path,
    shard: Shard,
    limit: Option<usize>,
    chunk: usize,
    mut keep: impl FnMut(&Query) -> bool,
    mut f: impl FnMut(Vec<Query>) -> Result<()>,
) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut pending = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        if limit.is_some_and(|l| i >= l) {
            break;
        }
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if !shard.owns(i) {
            continue;
        }
        let q: Query =
            serde_json::from_str(&line).with_context(|| format!("{}:{}", path.display(), i + 1))?;
        if keep(&q) {
            pending.push(q);
            if pending.len() == chunk {
                f(std::mem::take(&mut pending))?;
            }
        }
    }
    if !pending.is_empty() {
        f(pending)?;
    }
    Ok(())
}

impl Extraction<'_> {
    pub fn meta_path(&self) -> PathBuf {
        self.dir
            .join(crate::layout::stage1::meta(&self.shard.suffix()))
    }

    fn rejects_path(&self) -> PathBuf {
        self.dir
            .join(crate::layout::stage1::rejects(&self.shard.suffix()))
    }

    /// Filters (or reuses the filtered queries), then extracts every query of this shard
    /// not yet done.
    pub fn run(&self, llm: &Llm) -> Result<ExtractStats> {
        let (fingerprint, kept) = prepare_queries(self.cfg, &self.dir)?;
        let schema_hash = schema_hash(self.schema, self.cfg);
        let identity = Identity {
            model: self.model.clone(),
            prompt_version: EXTRACT_VERSION.into(),
            schema_hash: schema_hash.clone(),
            extract: self.cfg.extract.clone(),
            queries: fingerprint,
        };
        check_identity(
            &self.dir.join(crate::layout::stage1::EXTRACT_IDENTITY),
            &identity,
        )?;
        // Stage 2 types documents with the same taxonomy.
        self.schema.save_in(&self.dir)?;

        let meta_path = self.meta_path();
        let rejects_path = self.rejects_path();
        let mut records: Vec<MetaRecord> = read_jsonl_resumable(&meta_path)?;
        let rejects: Vec<Reject> = read_jsonl_resumable(&rejects_path)?;
        let done: HashSet<String> = records
            .iter()
            .map(|r| r.id.clone())
            .chain(rejects.iter().map(|r| r.id.clone()))
            .collect();
        let mut stats = ExtractStats {
            rejects: rejects.len(),
            ..Default::default()
        };

        let json_schema = output_schema(self.schema, self.cfg);
        let params = |seed: u64| GenerationParams {
            max_tokens: max_output_tokens(self.schema, self.cfg),
            sampling: SamplingParams {
                temperature: self.cfg.extract.temperature,
                seed,
                ..Default::default()
            },
            json_schema: Some(json_schema.clone()),
            ..Default::default()
        };
        let local = llm.local().map(|e| LocalPrompt::new(e, self)).transpose()?;
        let batch = llm.batch_size();

        let queries_path = self.dir.join(crate::layout::stage1::QUERIES);
        // This shard's queries, from the filter's count (no pass over the file).
        let listed = self.limit.map_or(kept, |l| l.min(kept));
        let total = (0..listed).filter(|&i| self.shard.owns(i)).count();
        let pb = progress_bar(self.progress, total as u64, "queries");
        pb.set_position(done.len() as u64);
        let started = std::time::Instant::now();
        let cache_before = llm.local().map(|e| e.cache_stats());
        // The local engine takes a whole chunk at once (continuous batching keeps its rows
        // busy; completions arrive as they finish); a server gets `batch` requests at a time.
        let chunk_size = if local.is_some() {
            batch * 64
        } else {
            batch * 8
        };
        let mut handle = |p: &Prepared, c: &Completion| -> Result<()> {
            stats.queries_this_run += 1;
            match self.parse(&c.text, c.finish_reason) {
                Ok(meta) => {
                    let raw = meta["document_type"].clone();
                    let rec = MetaRecord {
                        id: p.id.clone(),
                        document_type: self.schema.map_document_type(&raw),
                        meta,
                        provenance: Provenance {
                            model: self.model.clone(),
                            prompt_version: EXTRACT_VERSION.into(),
                            schema_hash: schema_hash.clone(),
                            seed: p.seed,
                            query_truncated: p.truncated,
                            prompt_tokens: if c.prompt_tokens > 0 {
                                c.prompt_tokens
                            } else {
                                p.prompt_tokens
                            },
                            generated_tokens: c.tokens.len(),
                        },
                    };
                    append_line(&meta_path, &rec)?;
                    records.push(rec);
                }
                Err(reason) => {
                    append_line(
                        &rejects_path,
                        &Reject {
                            id: p.id.clone(),
                            reason,
                            output: c.text.clone(),
                        },
                    )?;
                    stats.rejects += 1;
                }
            }
            pb.inc(1);
            Ok(())
        };
        for_each_chunk(
            &queries_path,
            self.shard,
            self.limit,
            chunk_size,
            |q| !done.contains(&q.id),
            |chunk| {
                let prepared: Vec<Prepared> = chunk
                    .into_iter()
                    .map(|q| match &local {
                        Some(l) => l.prepare(self, q),
                        None => Ok(self.prepare_remote(q)),
                    })
                    .collect::<Result<_>>()?;
                if let Some(l) = &local {
                    return l.generate(&prepared, &params, &mut handle);
                }
                for group in prepared.chunks(batch) {
                    let outs = llm.chat_batch(
                        &group
                            .iter()
                            .map(|p| (p.messages.clone(), params(p.seed)))
                            .collect::<Vec<_>>(),
                    )?;
                    for (p, c) in group.iter().zip(outs) {
                        handle(p, &c)?;
                    }
                }
                Ok(())
            },
        )?;
        pb.finish_and_clear();
        stats.seconds = started.elapsed().as_secs_f64();
        if let (Some(e), Some(before)) = (llm.local(), cache_before) {
            stats.prefix_cache = Some(e.cache_stats().since(&before).usage());
        }
        stats.records = records.len();
        for r in &records {
            *stats
                .document_types
                .entry(r.document_type.clone())
                .or_default() += 1;
            stats.prompt_tokens += r.provenance.prompt_tokens;
            stats.generated_tokens += r.provenance.generated_tokens;
        }
        write_atomic(
            &self
                .dir
                .join(format!("extract_stats{}.json", self.shard.suffix())),
            serde_json::to_string_pretty(&stats)?.as_bytes(),
        )?;
        Ok(stats)
    }

    fn seed(&self, id: &str) -> u64 {
        crate::records::derived_u64(self.cfg.extract.seed, &[id.as_bytes()])
    }

    /// For a server (no tokenizer here): queries longer than `max_query_tokens` × 4
    /// characters keep their first two thirds and last third.
    fn prepare_remote(&self, q: Query) -> Prepared {
        let max = self.cfg.extract.max_query_tokens.max(16) * 4;
        let chars: Vec<char> = q.text.chars().collect();
        let (text, truncated) = if chars.len() > max {
            let head: String = chars[..max * 2 / 3].iter().collect();
            let tail: String = chars[chars.len() - (max - max * 2 / 3)..].iter().collect();
            (format!("{head}\n[...]\n{tail}"), true)
        } else {
            (q.text.clone(), false)
        };
        Prepared {
            seed: self.seed(&q.id),
            messages: extract_messages(self.schema, self.cfg.extract.max_value_chars, &text),
            prompt_tokens: text.len() / 4,
            id: q.id,
            tokens: Vec::new(),
            truncated,
        }
    }

    /// The model's JSON as field → value, checked against the schema.
    fn parse(
        &self,
        text: &str,
        finish: FinishReason,
    ) -> std::result::Result<BTreeMap<String, String>, String> {
        if finish == FinishReason::Length {
            return Err("output cut off at the token limit".into());
        }
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let obj = v.as_object().ok_or("not a JSON object")?;
        let mut out = BTreeMap::new();
        for f in &self.schema.fields {
            let s = obj
                .get(&f.name)
                .and_then(|v| v.as_str())
                .ok_or_else(|| format!("field {} missing or not a string", f.name))?;
            let enum_field = f.name == "document_type"
                && self.cfg.extract.document_type == DocumentTypeMode::Taxonomy;
            if !enum_field && s.chars().count() > self.cfg.extract.max_value_chars {
                return Err(format!("field {} longer than the cap", f.name));
            }
            out.insert(f.name.clone(), s.to_string());
        }
        if obj.len() != self.schema.fields.len() {
            return Err("unexpected extra fields".into());
        }
        Ok(out)
    }
}

/// One query ready to send.
struct Prepared {
    id: String,
    /// Local engine: the whole prompt's tokens.
    tokens: Vec<u32>,
    /// Server: the chat.
    messages: Vec<Message>,
    prompt_tokens: usize,
    truncated: bool,
    seed: u64,
}

/// The local engine's extraction prompt: the rendered template around the query (the
/// instructions before it are computed once and then served by the engine's prefix cache).
struct LocalPrompt<'e> {
    engine: &'e Engine,
    head: String,
    tail: String,
}

impl<'e> LocalPrompt<'e> {
    fn new(engine: &'e Engine, x: &Extraction) -> Result<Self> {
        let template = engine
            .chat_template
            .as_ref()
            .context("the extraction model needs a chat template")?;
        const MARK: &str = "\u{1}QUERY\u{1}";
        let rendered = template.render(
            &extract_messages(x.schema, x.cfg.extract.max_value_chars, MARK),
            true,
        )?;
        let (head, tail) = rendered
            .split_once(MARK)
            .context("the chat template dropped the user message")?;
        Ok(Self {
            engine,
            head: head.to_string(),
            tail: tail.to_string(),
        })
    }

    fn prepare(&self, x: &Extraction, q: Query) -> Result<Prepared> {
        let tok = &self.engine.tokenizer;
        let max = x.cfg.extract.max_query_tokens.max(16);
        let ids = tok.encode(&q.text, false)?;
        let (text, truncated) = if ids.len() > max {
            let keep_head = max * 2 / 3;
            let a = tok.decode(&ids[..keep_head], false)?;
            let b = tok.decode(&ids[ids.len() - (max - keep_head)..], false)?;
            (format!("{a}\n[...]\n{b}"), true)
        } else {
            (q.text.clone(), false)
        };
        let tokens = tok.encode(&format!("{}{text}{}", self.head, self.tail), false)?;
        Ok(Prepared {
            seed: x.seed(&q.id),
            id: q.id,
            prompt_tokens: tokens.len(),
            tokens,
            messages: Vec::new(),
            truncated,
        })
    }

    /// Runs every query of `prepared` at once; `handle` gets them in order, each as soon as
    /// it and every query before it have finished (records are written in query order, so
    /// that a resumed run continues the file exactly).
    fn generate(
        &self,
        prepared: &[Prepared],
        params: &impl Fn(u64) -> GenerationParams,
        handle: &mut impl FnMut(&Prepared, &Completion) -> Result<()>,
    ) -> Result<()> {
        let reqs = prepared.iter().map(|p| {
            Ok(Request {
                prompt: p.tokens.clone(),
                params: params(p.seed),
            })
        });
        let mut in_order = crate::records::InOrder::default();
        self.engine.generate_stream(reqs, |i, c| {
            in_order.push(i, c, |i, c| handle(&prepared[i], &c))
        })
    }
}

/// Every meta record of a stage-1 folder (all shards), in file order.
pub fn read_all_meta(dir: &Path) -> Result<Vec<MetaRecord>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("meta") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no meta*.jsonl (run `wildlong extract` first)",
            dir.display()
        );
    }
    let mut out = Vec::new();
    for f in files {
        out.extend(read_jsonl_resumable::<MetaRecord>(&f)?);
    }
    Ok(out)
}
