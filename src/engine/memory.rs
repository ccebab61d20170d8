//! The memory check before loading: the bytes a model's weights take in each in-memory
//! format (GGUF) or compute dtype (safetensors) on each device, predicted from the file's
//! header alone by the rules the loader follows ([`Holding`] for every GGUF weight, the
//! table/head sharing of [`crate::engine::llama::Llama::load`]); the KV cache per 1K tokens;
//! the working memory of one forward pass; and the refusal, before anything is allocated,
//! of a load that will not fit the device's free memory, naming what would.
//!
//! The prediction is checked against what a loaded model holds ([`Llama::bytes`]) in the
//! tests, for every format.
//!
//! [`Llama::bytes`]: crate::engine::llama::Llama::bytes

use crate::engine::config::EngineConfig;
use crate::engine::llama::tensors::{self, Layer, Projection};
use crate::engine::llama::{Config, PagedKv};
use crate::engine::weights::{gguf_name, Holding, WeightFormat, WeightSource};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::ValueEnum;

pub const GIB: f64 = (1u64 << 30) as f64;

/// Fixed working memory besides the weights, the KV cache and one pass's activations
/// (the runtime, the tokenizer, thread stacks, the dequantized slabs of `exact`).
const FIXED_BYTES: u64 = 96 << 20;

/// How the weights are to be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The in-memory format of GGUF weights (ignored for safetensors).
    pub format: WeightFormat,
    /// The compute dtype of safetensors weights (GGUF computes in f32).
    pub dtype: DType,
    pub cpu: bool,
}

/// Bytes `source`'s weights take held as `t` (the adapter set on `source`, if any, merged:
/// the layers it adapts are held dense).
pub fn weight_bytes(source: &WeightSource, cfg: &Config, t: Target) -> Result<u64> {
    let (v, h) = (cfg.vocab_size as u64, cfg.hidden_size as u64);
    let has_head = source.has(tensors::LM_HEAD);
    let adapted = |prefix: &str| source.lora().is_some_and(|l| l.adapts(prefix));
    let Some(content) = source.gguf_content() else {
        // Safetensors: every tensor in the compute dtype; a tied table is the head.
        let size = t.dtype.size_in_bytes() as u64;
        let mut elems = v * h * if has_head { 2 } else { 1 };
        elems += each_layer_tensor(cfg, |_, n, k| Ok((n * k.max(1)) as u64))?;
        return Ok(elems * size);
    };
    let info = |hf: &str| {
        let g = gguf_name(hf)?;
        content
            .tensor_infos
            .get(&g)
            .with_context(|| format!("no tensor `{g}` in this GGUF file"))
    };
    // A linear's bytes, how it is held, and whether an embedding table held so reads the blocks.
    let linear = |prefix: &str| -> Result<(u64, Holding, bool)> {
        let i = info(&format!("{prefix}.weight"))?;
        let &[n, k] = i.shape.dims() else {
            bail!("tensor `{prefix}.weight` is not a matrix: {:?}", i.shape);
        };
        if adapted(prefix) {
            return Ok(((n * k * 4) as u64, Holding::Dense, false));
        }
        let held = Holding::of(i.ggml_dtype, k, t.format, t.cpu);
        let rows = held.rows_from_blocks(i.ggml_dtype, t.cpu);
        Ok((held.bytes(i.ggml_dtype, n, k), held, rows))
    };
    let f32_table = v * h * 4;
    let table_and_head = if has_head {
        let (head, ..) = linear("lm_head")?;
        let (table, _, rows) = linear("model.embed_tokens")?;
        head + if rows { table } else { f32_table }
    } else {
        // Tied: the table shares the head's blocks or dense copy, else is dequantized.
        let (head, held, rows) = linear("model.embed_tokens")?;
        head + if rows || held.has_dense() {
            0
        } else {
            f32_table
        }
    };
    // Norms and biases are dequantized to f32.
    let rest = each_layer_tensor(cfg, |name, n, k| match k {
        0 => Ok(n as u64 * 4),
        _ => Ok(linear(name)?.0),
    })?;
    Ok(table_and_head + rest)
}

/// Sums `f(name, n, k)` over the final norm and every layer's tensors: linears by prefix
/// with `(out, in)`, norms and biases by full name with `(len, 0)`.
fn each_layer_tensor(
    cfg: &Config,
    mut f: impl FnMut(&str, usize, usize) -> Result<u64>,
) -> Result<u64> {
    let h = cfg.hidden_size;
    let mut sum = f(tensors::NORM, h, 0)?;
    for l in (0..cfg.num_layers).map(Layer) {
        sum += f(&l.input_norm(), h, 0)? + f(&l.post_attention_norm(), h, 0)?;
        for p in Projection::ALL {
            let (n, k) = p.shape(cfg);
            let prefix = l.projection(p);
            sum += f(&prefix, n, k)?;
            if p.has_bias(cfg) {
                sum += f(&format!("{prefix}.bias"), n, 0)?;
            }
        }
        if cfg.qk_norm {
            sum += f(&l.q_norm(), cfg.head_dim, 0)? + f(&l.k_norm(), cfg.head_dim, 0)?;
        }
    }
    Ok(sum)
}

/// Bytes of KV cache 1024 tokens take for a model computing in `dtype` (bf16 on CUDA).
pub fn kv_bytes_per_1k(cfg: &Config, dtype: DType, cpu: bool) -> u64 {
    let dtype = if cpu { dtype } else { DType::BF16 };
    PagedKv::block_bytes(cfg, 1024, dtype) as u64
}

/// Working memory of one forward pass of `prefill_chunk` tokens (f32 activations of a
/// layer twice over, the chunk's attention scores against itself, the logits of a full
/// batch) plus a fixed allowance. Longer prompts' attention scratch grows with the context
/// and is left to the headroom the KV cache's default budget keeps.
pub fn working_bytes(cfg: &Config, e: &EngineConfig) -> u64 {
    let t = e.prefill_chunk as u64;
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let q = (cfg.num_heads * cfg.head_dim) as u64;
    let kv = (cfg.num_kv_heads * cfg.head_dim) as u64;
    let activations = 2 * t * (3 * h + 2 * q + 2 * kv + 3 * i) * 4;
    let scores = t * t * cfg.num_heads as u64 * 4;
    let logits = e.max_batch.max(1) as u64 * cfg.vocab_size as u64 * 4;
    activations + scores + logits + FIXED_BYTES
}

/// Memory free for a model on `device`: the host's `MemAvailable` on the CPU, the device's
/// free memory on CUDA; `None` where it cannot be read.
pub fn free_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
        return mem_get_info().ok().map(|(free, _)| free as u64);
    }
    if !device.is_cpu() {
        return None;
    }
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The memory a load may use: `engine.memory_gib` when set, else what `device` has free.
pub fn limit_bytes(e: &EngineConfig, device: &Device) -> Option<(u64, &'static str)> {
    match e.memory_gib {
        Some(g) => Some((
            (g * GIB) as u64,
            "the limit set (engine.memory_gib, --memory-gib)",
        )),
        None => free_bytes_whence(device),
    }
}

/// [`free_bytes`] with the words that say where the figure comes from.
pub fn free_bytes_whence(device: &Device) -> Option<(u64, &'static str)> {
    let whence = if device.is_cpu() {
        "available on this machine"
    } else {
        "free on the device"
    };
    free_bytes(device).map(|b| (b, whence))
}

fn gib(b: u64) -> f64 {
    b as f64 / GIB
}

fn format_name(f: WeightFormat) -> String {
    f.to_possible_value()
        .map_or_else(|| format!("{f:?}"), |v| v.get_name().to_string())
}

/// The other ways to hold the weights, as the flag that selects each.
fn alternatives(gguf: bool, t: Target) -> Vec<(Target, String)> {
    if gguf {
        WeightFormat::value_variants()
            .iter()
            .filter(|&&f| f != t.format)
            .map(|&f| {
                (
                    Target { format: f, ..t },
                    format!("--weights {}", format_name(f)),
                )
            })
            .collect()
    } else {
        [
            ("bf16", DType::BF16),
            ("f16", DType::F16),
            ("f32", DType::F32),
        ]
        .into_iter()
        .filter(|&(_, d)| d != t.dtype)
        .map(|(n, d)| (Target { dtype: d, ..t }, format!("--dtype {n}")))
        .collect()
    }
}

/// Refuses, before any weight is read, a load of `source` held as `t` that will not fit the
/// memory `e` allows on the device (weights, an explicit `kv_cache_gib`, one pass's working
/// memory), naming the formats or dtypes that would fit, or the smallest when none does.
pub fn check_fits(
    source: &WeightSource,
    cfg: &Config,
    e: &EngineConfig,
    t: Target,
    device: &Device,
) -> Result<()> {
    let Some((limit, whence)) = limit_bytes(e, device) else {
        return Ok(());
    };
    let working = working_bytes(cfg, e);
    let kv = e.kv_cache_gib.map_or(0, |g| (g * GIB) as u64);
    let weights = weight_bytes(source, cfg, t)?;
    let need = weights + kv + working;
    if need <= limit {
        return Ok(());
    }
    let gguf = source.gguf_content().is_some();
    let held = if gguf {
        format!("held as `{}`", format_name(t.format))
    } else {
        format!("in {:?}", t.dtype).to_lowercase()
    };
    let kv_part = match e.kv_cache_gib {
        Some(g) => format!(", {g:.2} GiB of KV cache (engine.kv_cache_gib)"),
        None => String::new(),
    };
    let fix = if kv > 0 && weights + working <= limit {
        format!(
            "set kv_cache_gib to at most {:.2}",
            gib(limit - weights - working)
        )
    } else {
        let mut others = Vec::new();
        for (alt, flag) in alternatives(gguf, t) {
            others.push((weight_bytes(source, cfg, alt)?, flag));
        }
        let fitting: Vec<String> = others
            .iter()
            .filter(|(w, _)| w + kv + working <= limit)
            .map(|(w, flag)| format!("`{flag}` ({:.2} GiB of weights)", gib(*w)))
            .collect();
        if !fitting.is_empty() {
            format!("these fit: {}", fitting.join(", "))
        } else {
            let smallest = match others.iter().min_by_key(|(w, _)| *w) {
                Some((w, flag)) if *w < weights => format!("`{flag}`"),
                _ => "this one".into(),
            };
            let w = others.iter().map(|(w, _)| *w).fold(weights, u64::min);
            format!(
                "no weight format or dtype fits: the smallest, {smallest}, needs {:.2} GiB in all",
                gib(w + kv + working)
            )
        }
    };
    bail!(
        "the model needs {:.2} GiB ({:.2} GiB of weights {held}{kv_part}, {:.2} GiB to run a {}-token prefill chunk) but {:.2} GiB is {whence}; {fix}",
        gib(need),
        gib(weights),
        gib(working),
        e.prefill_chunk,
        gib(limit),
    )
}

/// `models info`'s memory table: the weights in every format (GGUF) or dtype (safetensors)
/// on the CPU and on CUDA, the KV cache per 1K tokens, the working memory and what is free.
/// `dtype`: the compute dtype (the KV cache's on the CPU).
pub fn report(
    source: &WeightSource,
    cfg: &Config,
    e: &EngineConfig,
    dtype: DType,
    device: &Device,
) -> Result<String> {
    let gguf = source.gguf_content().is_some();
    let mut s = format!("{:<26}{:>10}{:>10}\n", "memory (GiB)", "cpu", "cuda");
    let row = |s: &mut String, name: &str, t: Target| -> Result<()> {
        let cpu = weight_bytes(source, cfg, Target { cpu: true, ..t })?;
        let cuda = weight_bytes(source, cfg, Target { cpu: false, ..t })?;
        s.push_str(&format!(
            "{name:<26}{:>10.3}{:>10.3}\n",
            gib(cpu),
            gib(cuda)
        ));
        Ok(())
    };
    let base = Target {
        format: WeightFormat::default(),
        dtype: DType::F32,
        cpu: true,
    };
    if gguf {
        for &f in WeightFormat::value_variants() {
            row(
                &mut s,
                &format!("weights {}", format_name(f)),
                Target { format: f, ..base },
            )?;
        }
    } else {
        for (n, d) in [
            ("f32", DType::F32),
            ("bf16", DType::BF16),
            ("f16", DType::F16),
        ] {
            row(&mut s, &format!("weights {n}"), Target { dtype: d, ..base })?;
        }
    }
    s.push_str(&format!(
        "{:<26}{:>10.4}{:>10.4}\n",
        "KV cache per 1K tok",
        gib(kv_bytes_per_1k(cfg, dtype, true)),
        gib(kv_bytes_per_1k(cfg, dtype, false))
    ));
    s.push_str(&format!(
        "{:<26}{:>10.3}{:>10.3}\n",
        format!("working ({} tok)", e.prefill_chunk),
        gib(working_bytes(cfg, e)),
        gib(working_bytes(cfg, e))
    ));
    match limit_bytes(e, device) {
        Some((b, whence)) => s.push_str(&format!("{:<26}{:.2} GiB {whence}\n", "memory", gib(b))),
        None => s.push_str(&format!("{:<26}unknown on this device\n", "memory")),
    }
    Ok(s)
}

/// The process's resident memory now and at its peak (`VmRSS`, `VmHWM`), bytes.
#[derive(Debug, Clone, Copy)]
pub struct ProcessMemory {
    pub rss: u64,
    pub peak: u64,
}

/// Reads [`ProcessMemory`] from `/proc/self/status` (Linux; `None` elsewhere).
pub fn process_memory() -> Option<ProcessMemory> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = |key: &str| -> Option<u64> {
        s.lines()
            .find_map(|l| l.strip_prefix(key))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    };
    Some(ProcessMemory {
        rss: kb("VmRSS:")?,
        peak: kb("VmHWM:")?,
    })
}
