//! `wildlong eval ruler` and `eval compare`: the CLI hands them validated settings; they make
//! the library call the pipeline makes too ([`RulerRun::run`]) and print the report.

use crate::engine::config::EngineConfig;
use crate::eval::ruler::data::Assets;
use crate::eval::ruler::report::Report;
use crate::eval::ruler::run::RulerRun;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// One evaluation: the run's settings and the engine that answers.
pub struct RulerCommand {
    pub run: RulerRun,
    pub engine: EngineConfig,
    pub models_dir: PathBuf,
    /// A report to compare against (written as `<out>/delta.md`).
    pub baseline: Option<PathBuf>,
}

pub fn ruler(c: RulerCommand) -> Result<()> {
    let assets = Assets::for_config(&c.run.config)?;
    let baseline = c.baseline.as_deref().map(Report::load).transpose()?;
    let engine = crate::models::load_engine_with_adapter(
        &c.run.model,
        c.run.adapter.as_deref().map(Path::new),
        &c.models_dir,
        &c.engine,
    )?;
    let out = c.run.out.clone();
    let Some(report) = c.run.run(&engine, &assets)? else {
        println!("samples written under {}", out.display());
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
