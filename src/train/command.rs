//! `wildlong train`: the CLI hands it a validated recipe; it either prints the memory plan
//! (refusing, with settings that fit, a recipe that will not) or makes the library call the
//! pipeline makes too ([`crate::train::run::train`]).

use crate::engine::memory::free_bytes;
use crate::train::config::TrainConfig;
use crate::train::plan::{refuse_unfit, Plan, PlanDevice};
use crate::train::run::RunOptions;
use anyhow::{bail, Result};
use std::path::Path;

/// `wildlong train --plan`: the predicted peak memory on `device` (`cpu`, `cuda[:N]`)
/// against `memory_gib` (by default this machine's available memory; a CUDA plan needs it
/// given, as the plan is made without the device).
pub fn plan(
    cfg: &TrainConfig,
    models_dir: &Path,
    device: &str,
    memory_gib: Option<f64>,
) -> Result<()> {
    let device = PlanDevice::parse(device)?;
    let shape = crate::models::model_config(&cfg.model, models_dir)?;
    let plan = Plan::estimate(&shape, cfg, device);
    let memory = match (memory_gib, device) {
        (Some(m), _) => m,
        (None, PlanDevice::Cpu) => match free_bytes(&candle_core::Device::Cpu) {
            Some(b) => b as f64 / (1u64 << 30) as f64,
            None => bail!("/proc/meminfo has no MemAvailable: add --memory-gib"),
        },
        (None, PlanDevice::Cuda) => {
            bail!("a CUDA plan needs the device's memory: add --memory-gib (80 for an H100)")
        }
    };
    print!("{}", plan.render(Some(memory)));
    println!("{}", serde_json::to_string(&plan)?);
    refuse_unfit(&shape, cfg, device, memory, "available")?;
    println!("fits: {:.2} of {memory:.2} GiB", plan.peak_gib());
    Ok(())
}

/// `wildlong train`: trains (or resumes) into `<run>/train` and prints the summary.
pub fn train(cfg: &TrainConfig, run: &Path, opts: &RunOptions) -> Result<()> {
    let summary = crate::train::run::train(cfg, run, opts)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
