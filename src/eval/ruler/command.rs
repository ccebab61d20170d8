//! `wildlong eval ruler` and `eval compare`: the CLI hands them validated settings; they make
//! the library call the pipeline makes too ([`RulerRun::run`]) and print the report. With a
//! server, only the tokenizer and chat template of `--tokenizer` are read (no weights).

use crate::engine::config::EngineConfig;
use crate::eval::ruler::data::Assets;
use crate::eval::ruler::report::Report;
use crate::eval::ruler::run::{Answerer, RulerRun};
use crate::generator::openai::{OpenAiClient, OpenAiConfig};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// One evaluation: the run's settings and what answers (the local engine, or a server).
pub struct RulerCommand {
    pub run: RulerRun,
    pub engine: EngineConfig,
    pub models_dir: PathBuf,
    /// A report to compare against (written as `<out>/delta.md`).
    pub baseline: Option<PathBuf>,
    /// An OpenAI-compatible server instead of the local engine (its `model` the served name).
    pub server: Option<OpenAiConfig>,
    /// With a server: the models spec whose tokenizer and chat template fit the samples.
    pub tokenizer: String,
}

pub fn ruler(c: RulerCommand) -> Result<()> {
    let assets = Assets::for_config(&c.run.config)?;
    let baseline = c.baseline.as_deref().map(Report::load).transpose()?;
    let out = c.run.out.clone();
    let report = match &c.server {
        Some(server) => {
            if c.run.adapter.is_some() {
                bail!("--adapter loads into the local engine: a server serves its own weights (serve the merged model, or the adapter as a LoRA module)");
            }
            let client = OpenAiClient::new(OpenAiConfig {
                model: c.run.model.clone(),
                ..server.clone()
            })?;
            let located = crate::models::locate(
                crate::models::resolve(&c.tokenizer, &c.models_dir)
                    .with_context(|| format!("--tokenizer {}", c.tokenizer))?,
                &c.engine,
            )?;
            c.run.run(
                &Answerer::Server {
                    client: &client,
                    tokenizer: &located.tokenizer,
                    chat_template: located.chat_template.as_ref(),
                },
                &assets,
            )?
        }
        None => {
            let engine = crate::models::load_engine_with_adapter(
                &c.run.model,
                c.run.adapter.as_deref().map(Path::new),
                &c.models_dir,
                &c.engine,
            )?;
            c.run.run(&Answerer::Local(&engine), &assets)?
        }
    };
    let Some(report) = report else {
        match c.run.shard.count {
            1 => println!("samples written under {}", out.display()),
            _ => println!(
                "shard {}/{}: predictions written under {} (pred{}.jsonl); when every shard has finished, `wildlong eval ruler` with the same settings and --merge (no --shard) scores them all",
                c.run.shard.index,
                c.run.shard.count,
                out.display(),
                c.run.shard.suffix()
            ),
        }
        return Ok(());
    };
    print!("{}", report.markdown());
    println!("\nreports: {}/report.{{json,md,csv,svg}}", out.display());
    if let Some(base) = baseline {
        let d = report.delta(&base);
        crate::records::write_atomic(&out.join("delta.md"), d.as_bytes())?;
        print!("\n{d}");
    }
    Ok(())
}

/// `wildlong eval compare`: the score changes between two reports.
pub fn compare(report: &Path, baseline: &Path) -> Result<()> {
    let new = Report::load(report)?;
    let base = Report::load(baseline)?;
    print!("{}", new.delta(&base));
    Ok(())
}
