//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`), merged into the
//! base weights as they load: `W' = W + (alpha / r) · B A` (`alpha / sqrt(r)` with rsLoRA),
//! the same update PEFT's `merge_and_unload` applies. Quantized base weights are dequantized
//! for the layers the adapter touches. DoRA, per-module rank/alpha patterns, biases and
//! `modules_to_save` are refused by name rather than half-applied.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, serde::Deserialize)]
struct AdapterConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
}

pub struct LoraAdapter {
    pub path: PathBuf,
    pub rank: usize,
    pub scale: f64,
    /// Module name (HF, e.g. `model.layers.0.self_attn.q_proj`) → (A `(r, in)`, B `(out, r)`).
    modules: BTreeMap<String, (Tensor, Tensor)>,
    used: BTreeSet<String>,
}

impl LoraAdapter {
    /// Reads an adapter folder written by PEFT (or by `wildlong train`).
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        let cfg: AdapterConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a PEFT adapter config", cfg_path.display()))?;
        let refuse =
            |what: &str| -> Result<()> { bail!("{}: {what} is not supported", cfg_path.display()) };
        if cfg.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            refuse(&format!("peft_type {:?}", cfg.peft_type))?;
        }
        if cfg.use_dora {
            refuse("use_dora")?;
        }
        if cfg.fan_in_fan_out {
            refuse("fan_in_fan_out")?;
        }
        if cfg.bias.as_deref().is_some_and(|b| b != "none") {
            refuse("a trained bias")?;
        }
        if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
            refuse("rank_pattern/alpha_pattern")?;
        }
        if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            refuse("modules_to_save")?;
        }
        if cfg.r == 0 {
            bail!("{}: r must be at least 1", cfg_path.display());
        }
        let scale = if cfg.use_rslora {
            cfg.lora_alpha / (cfg.r as f64).sqrt()
        } else {
            cfg.lora_alpha / cfg.r as f64
        };
        let wpath = dir.join("adapter_model.safetensors");
        if !wpath.is_file() {
            bail!(
                "{}: missing (pickled adapter_model.bin files are refused)",
                wpath.display()
            );
        }
        let tensors = candle_core::safetensors::load(&wpath, &Device::Cpu)
            .with_context(|| format!("{}: not a valid safetensors file", wpath.display()))?;
        let mut a = BTreeMap::new();
        let mut b = BTreeMap::new();
        for (name, t) in tensors {
            let base = name.strip_prefix("base_model.model.").unwrap_or(&name);
            let (module, which) = if let Some(m) = base.strip_suffix(".lora_A.weight") {
                (m, &mut a)
            } else if let Some(m) = base.strip_suffix(".lora_B.weight") {
                (m, &mut b)
            } else {
                bail!(
                    "{}: unexpected tensor `{name}` (only lora_A/lora_B weights are supported)",
                    wpath.display()
                );
            };
            which.insert(module.to_string(), t.to_dtype(DType::F32)?);
        }
        let mut modules = BTreeMap::new();
        for (m, ta) in a {
            let tb = b
                .remove(&m)
                .with_context(|| format!("{}: `{m}` has lora_A but no lora_B", wpath.display()))?;
            let (r, _) = ta.dims2()?;
            let (_, rb) = tb.dims2()?;
            if r != cfg.r || rb != cfg.r {
                bail!(
                    "{}: `{m}` has rank {r}/{rb}, the config says r = {}",
                    wpath.display(),
                    cfg.r
                );
            }
            modules.insert(m, (ta, tb));
        }
        if let Some(m) = b.keys().next() {
            bail!("{}: `{m}` has lora_B but no lora_A", wpath.display());
        }
        if modules.is_empty() {
            bail!("{}: no LoRA weights", wpath.display());
        }
        Ok(Self {
            path: dir.to_path_buf(),
            rank: cfg.r,
            scale,
            modules,
            used: BTreeSet::new(),
        })
    }

    /// `scale · B A` `(out, in)` for module `prefix`, if the adapter has one.
    pub fn delta(&mut self, prefix: &str, out_dim: usize, in_dim: usize) -> Result<Option<Tensor>> {
        let Some((a, b)) = self.modules.get(prefix) else {
            return Ok(None);
        };
        let (ra, ia) = a.dims2()?;
        let (ob, _) = b.dims2()?;
        if ia != in_dim || ob != out_dim {
            bail!(
                "{}: `{prefix}` adapts a ({ob}, {ia}) weight but the model's is ({out_dim}, {in_dim})",
                self.path.display()
            );
        }
        debug_assert_eq!(ra, self.rank);
        self.used.insert(prefix.to_string());
        // (out, r) @ (r, in) → (out, in)
        Ok(Some((b.matmul(a)? * self.scale)?))
    }

    /// Whether the adapter adapts module `prefix` (HF name, e.g.
    /// `model.layers.0.self_attn.q_proj`): its weight is merged and held dense.
    pub fn adapts(&self, prefix: &str) -> bool {
        self.modules.contains_key(prefix)
    }

    /// Modules of the adapter the model never asked for (a name mismatch).
    pub fn unused(&self) -> Vec<String> {
        self.modules
            .keys()
            .filter(|m| !self.used.contains(*m))
            .cloned()
            .collect()
    }
}
