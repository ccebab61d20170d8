//! The stage-1 commands (`wildlong extract`, `graph`, `sample`): the CLI hands each a
//! validated config, it makes the one library call the pipeline makes too and prints what
//! came of it.

use crate::generator::GeneratorSpec;
use crate::layout::stage1 as files;
use crate::shard::Shard;
use crate::stage1::config::{MetaSchema, Stage1Config};
use crate::stage1::extract::{prepare_queries, Extraction};
use anyhow::Result;
use std::path::PathBuf;

/// A stage-1 folder and the settings it runs with.
pub struct Stage1Run {
    pub cfg: Stage1Config,
    pub schema: MetaSchema,
    /// `<run>/stage1`.
    pub dir: PathBuf,
    pub progress: bool,
}

/// `wildlong extract`: filters, then extracts this shard's queries, the first `limit` of
/// them when set (`filter_only`: stops after the filter, no model loaded).
pub fn extract(
    run: &Stage1Run,
    generator: &GeneratorSpec,
    shard: Shard,
    limit: Option<usize>,
    filter_only: bool,
) -> Result<()> {
    let (cfg, dir) = (&run.cfg, &run.dir);
    if filter_only {
        prepare_queries(cfg, dir)?;
        print!(
            "{}",
            std::fs::read_to_string(dir.join(files::FILTER_STATS))?
        );
        return Ok(());
    }
    let llm = generator.open()?;
    let job = Extraction {
        cfg,
        schema: &run.schema,
        dir: dir.clone(),
        model: generator.model.clone(),
        shard,
        limit,
        progress: run.progress,
    };
    let stats = job.run(&llm)?;
    let filter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(files::FILTER_STATS))?)?;
    println!(
        "filter: {} queries kept; dropped by reason: {}",
        filter["kept"], filter["dropped"]
    );
    println!(
        "extract: {} records, {} rejected -> {}",
        stats.records,
        stats.rejects,
        job.meta_path().display()
    );
    if stats.queries_this_run > 0 {
        println!(
            "  {} queries in {:.1} s: {:.1} queries/min",
            stats.queries_this_run,
            stats.seconds,
            stats.queries_this_run as f64 * 60.0 / stats.seconds.max(1e-9)
        );
    }
    println!("document types:");
    let mut types: Vec<_> = stats.document_types.iter().collect();
    types.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (t, n) in types {
        println!("  {n:>6}  {t}");
    }
    Ok(())
}

/// `wildlong graph`: one co-occurrence graph per document type.
pub fn graph(run: &Stage1Run) -> Result<()> {
    let summaries = crate::stage1::graph::run(&run.cfg, &run.schema, &run.dir)?;
    println!(
        "{:<24} {:>8} {:>7} {:>7}",
        "document type", "queries", "nodes", "edges"
    );
    for s in &summaries {
        println!(
            "{:<24} {:>8} {:>7} {:>7}",
            s.document_type, s.queries, s.nodes, s.edges
        );
    }
    println!("graphs and summary in {}", run.dir.display());
    Ok(())
}

/// `wildlong sample`: paths, and blueprints from them unless `generator` is `None`
/// (`--paths-only`).
pub fn sample(run: &Stage1Run, generator: Option<&GeneratorSpec>) -> Result<()> {
    let llm = generator.map(GeneratorSpec::open).transpose()?;
    let model = generator.map_or("", |g| g.model.as_str());
    let (paths, n) =
        crate::stage1::sample::run(llm.as_ref(), model, &run.cfg.sample, &run.dir, run.progress)?;
    println!("{paths} paths -> {}", run.dir.join(files::PATHS).display());
    if llm.is_some() {
        println!(
            "{n} new blueprints -> {}",
            run.dir.join(files::BLUEPRINTS).display()
        );
    }
    Ok(())
}
