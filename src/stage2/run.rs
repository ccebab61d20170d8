//! `wildlong synth` as a library call: documents → contexts → pairs → `data.jsonl` and the card.
//! The command and the pipeline (`wildlong run`) both call [`run`].

use crate::engine::config::EngineConfig;
use crate::generator::Llm;
use crate::models;
use crate::records::{read_jsonl_resumable, write_atomic, write_jsonl_atomic, Blueprint, Store};
use crate::shard::Shard;
use crate::stage1::config::MetaSchema;
use crate::stage2::config::Stage2Config;
use crate::stage2::synth::{Synth, SynthStats};
use crate::stage2::{assemble, documents::DocumentReader, gates::Decontaminator, output};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// One synthesis run over `<run>/stage2`.
pub struct SynthJob<'a> {
    pub llm: &'a Llm,
    /// The generator's name, recorded with every pair.
    pub model: String,
    /// With a remote backend: the model whose tokenizer and chat template measure the prompts.
    pub tokenizer: String,
    pub cfg: &'a Stage2Config,
    pub run: PathBuf,
    pub blueprints: PathBuf,
    pub shard: Shard,
    pub models_dir: PathBuf,
    pub engine: EngineConfig,
}

/// What a run produced.
pub struct SynthOutcome {
    pub documents: usize,
    pub contexts: usize,
    pub pairs: usize,
    pub stats: SynthStats,
    pub seconds: f64,
    pub data: PathBuf,
}

pub fn run(job: &SynthJob) -> Result<SynthOutcome> {
    let cfg = job.cfg;
    let dir = crate::layout::RunLayout::new(&job.run).stage2();
    if !job.blueprints.is_file() {
        bail!(
            "{}: no blueprints (run `wildlong sample` first, or pass --blueprints)",
            job.blueprints.display()
        );
    }
    // Documents are typed with the taxonomy the blueprints were made with.
    let schema = MetaSchema::of_stage1(job.blueprints.parent().unwrap_or(Path::new(".")))?;
    let blueprints: Vec<Blueprint> = read_jsonl_resumable(&job.blueprints)?;
    if blueprints.is_empty() {
        bail!("{}: holds no blueprints", job.blueprints.display());
    }
    // Prompts are measured with the target model's tokenizer and chat template.
    let located;
    let (tokenizer, template, max_context) = match job.llm.local() {
        Some(e) => (&e.tokenizer, e.chat_template.as_ref(), e.max_context()),
        None => {
            located = models::locate(
                models::resolve(&job.tokenizer, &job.models_dir)?,
                &job.engine,
            )?;
            let ctx = located.config.context_length;
            (&located.tokenizer, located.chat_template.as_ref(), ctx)
        }
    };
    let template = template.context("synthesis needs a model with a chat template")?;
    let decontaminate = match cfg.gates.decontaminate {
        true => Some(Decontaminator::ruler(
            cfg.gates.decontaminate_ngram,
            cfg.gates.squad.as_deref(),
            cfg.gates.hotpotqa.as_deref(),
        )?),
        false => None,
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let store = Store::open(&dir.join(crate::layout::stage2::STORE))?;
    let mut reader = DocumentReader::new(tokenizer, &schema, &cfg.documents);
    reader.max_context = max_context;
    reader.decontaminate = decontaminate.as_ref();
    for p in &cfg.documents.paths {
        reader.read(p)?;
    }
    reader.classify(job.llm, &job.model, &store)?;
    let (docs, doc_stats) = reader.finish()?;
    write_atomic(
        &dir.join(crate::layout::stage2::DOCUMENTS_STATS),
        serde_json::to_string_pretty(&doc_stats)?.as_bytes(),
    )?;
    if let Some(&b) = cfg.assemble.buckets.iter().find(|&&b| b > max_context) {
        bail!("bucket {b} is longer than the model's context ({max_context} tokens)");
    }
    let (contexts, asm) = assemble::assemble(tokenizer, &docs, &cfg.assemble)?;
    write_jsonl_atomic(&dir.join(crate::layout::stage2::CONTEXTS), &contexts)?;
    write_atomic(
        &dir.join(crate::layout::stage2::ASSEMBLY_STATS),
        serde_json::to_string_pretty(&asm)?.as_bytes(),
    )?;
    let synth = Synth {
        llm: job.llm,
        tokenizer,
        template,
        model: job.model.clone(),
        cfg,
        decontaminate: decontaminate.as_ref(),
        store,
    };
    let t0 = std::time::Instant::now();
    let (pairs, stats) = synth.run(&contexts, &blueprints, job.shard, &dir)?;
    let seconds = t0.elapsed().as_secs_f64();
    let data = output::finish(&dir, &job.shard.suffix(), &pairs, &stats, cfg, &job.model)?;
    Ok(SynthOutcome {
        documents: docs.len(),
        contexts: contexts.len(),
        pairs: pairs.len(),
        stats,
        seconds,
        data,
    })
}

/// Where a run's blueprints are unless another file is named.
pub fn default_blueprints(run: &Path) -> PathBuf {
    crate::layout::RunLayout::new(run).blueprints()
}
