//! `wildlong synth`: the CLI hands it a validated config; it makes the library call the
//! pipeline makes too ([`crate::stage2::run::run`]) and prints what came of it, or merges
//! finished shards.

use crate::generator::GeneratorSpec;
use crate::layout::RunLayout;
use crate::shard::Shard;
use crate::stage2::config::Stage2Config;
use crate::stage2::{output, run::SynthJob};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// What one `wildlong synth` invocation does.
pub struct SynthCommand {
    pub cfg: Stage2Config,
    pub run: PathBuf,
    pub generator: GeneratorSpec,
    /// With a server: the models spec whose tokenizer and chat template measure prompts.
    pub tokenizer: String,
    /// [default: `<run>/stage1/blueprints.jsonl`]
    pub blueprints: Option<PathBuf>,
    pub shard: Shard,
    /// Merge the finished shards instead of synthesizing.
    pub merge: bool,
}

pub fn synth(c: &SynthCommand) -> Result<()> {
    let layout = RunLayout::new(&c.run);
    if c.merge {
        return merge(&c.cfg, &layout.stage2(), &c.generator.model);
    }
    let blueprints = c.blueprints.clone().unwrap_or_else(|| layout.blueprints());
    if !blueprints.is_file() {
        // Before a model is loaded.
        bail!(
            "{}: no blueprints (run `wildlong sample` first, or pass --blueprints)",
            blueprints.display()
        );
    }
    let llm = c.generator.open()?;
    let out = crate::stage2::run::run(&SynthJob {
        llm: &llm,
        model: c.generator.model.clone(),
        tokenizer: c.tokenizer.clone(),
        cfg: &c.cfg,
        run: c.run.clone(),
        blueprints,
        shard: c.shard,
        models_dir: c.generator.models_dir.clone(),
        engine: c.generator.engine.clone(),
    })?;
    println!(
        "{} documents, {} contexts; {} pairs -> {} ({} generated, {} from the store); rejected: {:?}",
        out.documents,
        out.contexts,
        out.pairs,
        out.data.display(),
        out.stats.generated,
        out.stats.reused,
        out.stats.rejected
    );
    if out.stats.generated > 0 {
        println!(
            "  {} contexts in {:.1} s: {:.2} pairs/min",
            out.stats.contexts,
            out.seconds,
            out.pairs as f64 * 60.0 / out.seconds
        );
    }
    Ok(())
}

/// `wildlong synth --merge`: the finished shards' pairs into `data.jsonl` and the card.
fn merge(cfg: &Stage2Config, dir: &Path, model: &str) -> Result<()> {
    let (pairs, stats) = output::merge(dir, cfg.gates.near_duplicate_threshold, cfg.generate.seed)?;
    // The card names the model that made the pairs.
    let model = pairs
        .first()
        .map_or(model.to_string(), |p| p.metadata.model.clone());
    let path = output::finish(dir, "", &pairs, &stats, cfg, &model)?;
    println!("merged {} pairs -> {}", pairs.len(), path.display());
    Ok(())
}
