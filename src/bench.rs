//! `wildlong bench`: prefill, decode, batched-decode and prefix-cache throughput of the
//! engine on one model, medians over repeated runs, printed as one JSON object. Peers are
//! measured beside it by `benches/peers.sh` (same machine, same run).

use crate::cli::BenchArgs;
use crate::engine::config::{GenerationParams, SamplingParams};
use crate::engine::generate::{Completion, Engine, Request};
use crate::models;
use anyhow::{bail, Result};
use std::path::Path;
use std::time::Instant;

const TEXT: &str = "The quick brown fox jumps over the lazy dog. ";

fn prompt_tokens(engine: &Engine, n: usize, salt: usize) -> Result<Vec<u32>> {
    let text = format!("Document {salt}. {}", TEXT.repeat(n / 8 + 16));
    let ids = engine.tokenizer.encode(&text, true)?;
    if ids.len() < n {
        bail!("could not build a {n}-token prompt");
    }
    Ok(ids[..n].to_vec())
}

fn params(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        sampling: SamplingParams::default(),
        ignore_eos: true,
        ..Default::default()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

/// A run with no cached prefix (every prompt token computed).
fn cold(
    engine: &Engine,
    reqs: &[Request],
    f: impl FnMut(usize, &Completion),
) -> Result<Vec<Completion>> {
    engine.reset_cache();
    engine.generate(reqs, f)
}

pub fn run(args: &BenchArgs, threads: usize, models_dir: &Path) -> Result<()> {
    if let Some(shape) = &args.synthetic {
        return synthetic::run(args, shape, threads);
    }
    if let Some(seq) = args.train_seq {
        return train(args, seq, models_dir);
    }
    let mut cfg = args.engine.engine_config(threads)?;
    cfg.max_batch = args.batch.max(args.continuations).max(1);
    let engine = models::load_engine(&args.engine.model, models_dir, &cfg)?;
    let runs = args.runs.max(1);
    let (p, n) = (args.prompt_tokens, args.new_tokens);
    let one = vec![Request {
        prompt: prompt_tokens(&engine, p, 0)?,
        params: params(1),
    }];
    let full = vec![Request {
        prompt: one[0].prompt.clone(),
        params: params(n),
    }];
    // Warm-up (allocations, thread pool).
    engine.generate(
        &[Request {
            prompt: one[0].prompt[..32.min(p)].to_vec(),
            params: params(2),
        }],
        |_, _| {},
    )?;

    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let tp = timed(|| cold(&engine, &one, |_, _| {}).map(drop))?;
        let tf = timed(|| cold(&engine, &full, |_, _| {}).map(drop))?;
        prefill.push(p as f64 / tp);
        decode.push((n - 1) as f64 / (tf - tp).max(1e-9));
    }

    let mut batch_decode = Vec::new();
    if args.batch > 1 {
        let bp = args.prompt_tokens.min(128);
        let mk = |m: usize| -> Result<Vec<Request>> {
            (0..args.batch)
                .map(|i| {
                    Ok(Request {
                        prompt: prompt_tokens(&engine, bp, i)?,
                        params: params(m),
                    })
                })
                .collect()
        };
        let (b1, bn) = (mk(1)?, mk(n)?);
        for _ in 0..runs {
            let tp = timed(|| cold(&engine, &b1, |_, _| {}).map(drop))?;
            let tf = timed(|| cold(&engine, &bn, |_, _| {}).map(drop))?;
            batch_decode.push((args.batch * (n - 1)) as f64 / (tf - tp).max(1e-9));
        }
    }

    let mut shared = serde_json::Value::Null;
    if args.prefix_tokens > 0 && args.continuations > 0 {
        let doc = prompt_tokens(&engine, args.prefix_tokens, 99)?;
        let q = |i: usize| {
            engine
                .tokenizer
                .encode(&format!(" Question {i}: what does the fox do?"), false)
        };
        let m = 32;
        // Independent: each continuation prefills the whole document itself (one measured, times k).
        let mut indep = doc.clone();
        indep.extend(q(0)?);
        let indep_req = vec![Request {
            prompt: indep,
            params: params(m),
        }];
        let t_one = timed(|| cold(&engine, &indep_req, |_, _| {}).map(drop))?;
        let t_indep = t_one * args.continuations as f64;
        let mut t_shared = Vec::new();
        for _ in 0..runs.min(2) {
            // All continuations at once, the cache cold: the first computes the document,
            // the others take it from the prefix cache.
            let reqs: Vec<Request> = (0..args.continuations)
                .map(|i| {
                    let mut prompt = doc.clone();
                    prompt.extend(q(i)?);
                    Ok(Request {
                        prompt,
                        params: params(m),
                    })
                })
                .collect::<Result<_>>()?;
            t_shared.push(timed(|| cold(&engine, &reqs, |_, _| {}).map(drop))?);
        }
        let ts = median(t_shared);
        shared = serde_json::json!({
            "document_tokens": args.prefix_tokens, "continuations": args.continuations, "new_tokens": m,
            "independent_s": t_indep, "independent_note": "one independent request measured, times continuations",
            "shared_s": ts, "speedup": t_indep / ts,
        });
    }

    let result = serde_json::json!({
        "engine": "wildlong",
        "model": args.engine.model,
        "weights": format!("{:?}", cfg.weight_format),
        // The pool the measurement ran in (`--threads`, else the engine config's).
        "threads": rayon::current_num_threads(),
        "prompt_tokens": p,
        "new_tokens": n,
        "runs": runs,
        "prefill_tok_s": median(prefill),
        "decode_tok_s": median(decode),
        "batch": args.batch,
        "batch_decode_tok_s": if batch_decode.is_empty() { serde_json::Value::Null } else { median(batch_decode).into() },
        "shared_prefix": shared,
    });
    println!("{result}");
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{result}\n"))?;
    }
    Ok(())
}

/// `steps` AdamW steps (lr 1e-4, weight decay 0.01, as PEFT's baseline) on `batch`: each
/// step's seconds and the last loss.
fn train_steps(
    m: &crate::train::model::TrainModel,
    batch: &crate::train::data::Batch,
    steps: usize,
) -> Result<(Vec<f64>, f64)> {
    use crate::train::{optim, step};
    let vars = m.trainable().into_iter().map(|(_, v)| v).collect();
    let mut opt = optim::AdamW::new(
        vars,
        optim::AdamWParams {
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let settings = step::StepSettings {
        lr: 1e-4,
        warmup_steps: 0,
        total_steps: usize::MAX,
        min_lr_ratio: 1.0,
        max_grad_norm: None,
        seed: 0,
    };
    let mut times = Vec::new();
    let mut loss = 0.0;
    for i in 0..steps {
        let t = Instant::now();
        loss = step::train_step(m, &mut opt, std::slice::from_ref(batch), i, &settings)?.loss;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok((times, loss))
}

/// LoRA training throughput and peak memory, on the settings of `hf_cpu_baseline.py`: r = 16,
/// α = 32, no dropout, all seven projections, one row of `seq` tokens of Lorem ipsum with
/// every next token counted, AdamW at 1e-4; four steps, the median of the last three. The
/// `--plan` prediction for the same settings is printed beside the measured peak.
fn train(args: &BenchArgs, seq: usize, models_dir: &Path) -> Result<()> {
    use crate::train::{model, plan::Plan};
    let spec = model::LoraSpec {
        rank: 16,
        alpha: 32.0,
        targets: model::PROJECTIONS.map(String::from).to_vec(),
        seed: 0,
        dropout: 0.0,
    };
    let loaded = model::load_with(
        &args.engine.model,
        models_dir,
        &model::TrainOptions::lora(Some(&spec)),
        &Default::default(),
    )?;
    let mut m = loaded.model;
    m.checkpoint_layers = args.checkpoint_layers;
    m.attention_block = args.attention_block.max(1);
    m.mlp_tile = args.mlp_tile;
    let text = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(400.max(seq / 8));
    let ids = loaded.tokenizer.encode(&text, true)?;
    if ids.len() < seq + 1 {
        bail!("could not build a {seq}-token row");
    }
    let batch = crate::train::data::Batch {
        tokens: vec![ids[..seq].to_vec()],
        positions: vec![(0..seq as u32).collect()],
        segments: vec![vec![0; seq]],
        // HF shifts labels = input_ids inside the model: the last position predicts nothing.
        targets: ids[1..seq]
            .iter()
            .map(|&t| t as i64)
            .chain([crate::train::ops::IGNORE])
            .collect(),
    };
    let steps = args.train_steps.max(1);
    let (times, loss) = train_steps(&m, &batch, steps)?;
    // The first step warms up; one step alone is timed as it is.
    let med = median(times[(steps > 1) as usize..].to_vec());
    let mut recipe = crate::train::config::TrainConfig::load(None, &[])?;
    recipe.lora.dropout = 0.0;
    recipe.data.max_length = seq;
    recipe.schedule.micro_batch = 1;
    recipe.memory.checkpoint_layers = args.checkpoint_layers;
    recipe.memory.attention_block = m.attention_block;
    recipe.memory.mlp_tile = m.mlp_tile;
    let plan = Plan::estimate(&m.cfg, &recipe, crate::train::plan::PlanDevice::Cpu);
    let out = serde_json::json!({
        "engine": "wildlong",
        "threads": rayon::current_num_threads(),
        "step": "lora_train",
        "seq": seq,
        "checkpoint_layers": args.checkpoint_layers,
        "mlp_tile": m.mlp_tile,
        "tok_s": (seq as f64 / med * 10.0).round() / 10.0,
        "step_s": times,
        "loss": (loss * 1000.0).round() / 1000.0,
        "peak_rss_mib": crate::train::run::peak_rss_mib(),
        "plan_peak_mib": (plan.peak_bytes / (1u64 << 20) as f64).round(),
    });
    println!("{out}");
    if let Some(p) = &args.json {
        crate::records::write_atomic(p, format!("{out}\n").as_bytes())?;
    }
    Ok(())
}

/// `wildlong bench --synthetic SHAPE`: the GPU benchmark of `benches/gpu.sh` on a model with
/// random bf16 weights made on the device (no files): prefill, decode at batch 1 and 16, and
/// LoRA training with peak device memory, as `benches/peers/hf_gpu_baseline.py` measures
/// HF transformers + PEFT. One JSON line per measurement. `tiny` runs the same code on a
/// 2-layer model (the CPU test of this command).
mod synthetic {
    use super::{cold, median, params, timed, train_steps};
    use crate::cli::BenchArgs;
    use crate::engine::generate::{Engine, Request};
    use crate::engine::llama::{Config, Llama, LlamaConfig};
    use crate::engine::weights::WeightSource;
    use crate::train::model::{LoraSpec, TrainModel, TrainOptions, PROJECTIONS};
    use anyhow::{bail, Context, Result};
    use candle_core::{DType, Device, Tensor};
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    /// The HF config of a shape: `llama-3.1-8b` is the one `hf_gpu_baseline.py` builds.
    fn hf_config(shape: &str) -> Result<LlamaConfig> {
        let v = match shape {
            "llama-3.1-8b" => serde_json::json!({
                "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            }),
            "tiny" => serde_json::json!({
                "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1
            }),
            _ => bail!("unknown synthetic shape `{shape}` (llama-3.1-8b, tiny)"),
        };
        Ok(serde_json::from_value(v)?)
    }

    /// Random weights on `device`: projections and embeddings N(0, 0.02) as HF initialises
    /// them, norms 1; bf16.
    fn random_weights(cfg: &Config, device: &Device) -> Result<HashMap<String, Tensor>> {
        let mut t = HashMap::new();
        for (name, shape) in crate::engine::llama::tensors::checkpoint_tensors(cfg) {
            let x = if shape.len() == 1 {
                Tensor::ones(shape, DType::BF16, device)?
            } else {
                Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(DType::BF16)?
            };
            t.insert(name, x);
        }
        Ok(t)
    }

    /// A word-level tokenizer of a few tokens: the benchmark feeds token ids, and ids the
    /// tokenizer does not know decode to nothing.
    fn tokenizer(dir: &std::path::Path) -> Result<crate::engine::tokenizer::Tokenizer> {
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"<s>": 0, "</s>": 1, "a": 2}, "unk_token": "a"}
        });
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json.to_string())?;
        crate::engine::tokenizer::Tokenizer::from_file(&path, &[1])
    }

    /// Device memory in use (CUDA: total − free, which includes the context and the
    /// allocator's pool) or `None` on the CPU.
    fn device_used(device: &Device) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            let ctx = d.cuda_stream().context().clone();
            return ctx
                .mem_get_info()
                .ok()
                .map(|(free, total)| (total - free) as u64);
        }
        let _ = device;
        None
    }

    /// Polls [`device_used`] every 2 ms while alive; its maximum is the peak.
    struct PeakSampler {
        stop: Arc<AtomicBool>,
        peak: Arc<AtomicU64>,
        handle: Option<std::thread::JoinHandle<()>>,
    }

    impl PeakSampler {
        fn start(device: &Device) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let peak = Arc::new(AtomicU64::new(device_used(device).unwrap_or(0)));
            let (s, p, d) = (stop.clone(), peak.clone(), device.clone());
            let handle = device_used(device).map(|_| {
                std::thread::spawn(move || {
                    while !s.load(Ordering::Relaxed) {
                        if let Some(u) = device_used(&d) {
                            p.fetch_max(u, Ordering::Relaxed);
                        }
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                })
            });
            Self { stop, peak, handle }
        }

        /// The peak in GiB (CUDA), or `None` on the CPU.
        fn finish(mut self) -> Option<f64> {
            self.stop.store(true, Ordering::Relaxed);
            let h = self.handle.take()?;
            h.join().ok()?;
            Some(self.peak.load(Ordering::Relaxed) as f64 / (1u64 << 30) as f64)
        }
    }

    fn lengths(s: &str) -> Result<Vec<usize>> {
        s.split(',')
            .filter(|x| !x.trim().is_empty())
            .map(|x| {
                x.trim()
                    .parse()
                    .with_context(|| format!("`{x}` in a list of token counts"))
            })
            .collect()
    }

    fn round(x: f64, digits: i32) -> f64 {
        let f = 10f64.powi(digits);
        (x * f).round() / f
    }

    pub fn run(args: &BenchArgs, shape: &str, threads: usize) -> Result<()> {
        let mut ecfg = args.engine.engine_config(threads)?;
        let device = crate::models::parse_device(&ecfg.device)?;
        if args.engine.prefill_chunk.is_none() && device.is_cuda() {
            // Long prompts in few steps: the GEMMs stay large, attention is fused.
            ecfg.prefill_chunk = 8192;
        }
        let hf = hf_config(shape)?;
        let cfg = Config::from_hf(&hf, None)?;
        let prefill = lengths(&args.prefill_lengths)?;
        let train_lens = lengths(&args.train_lengths)?;
        let mut out_lines = Vec::new();
        let mut emit = |v: serde_json::Value| -> Result<()> {
            println!("{v}");
            out_lines.push(v.to_string());
            if let Some(p) = &args.json {
                crate::records::write_atomic(p, format!("{}\n", out_lines.join("\n")).as_bytes())?;
            }
            Ok(())
        };
        let t0 = std::time::Instant::now();
        let weights = random_weights(&cfg, &device)?;
        let dir = tempfile_dir()?;
        let tok = tokenizer(dir.path())?;
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        ecfg.max_batch = args.batch.max(1);
        ecfg.max_context = Some(cfg.context_length);
        let model = Llama::load(
            WeightSource::in_memory(weights.clone(), dtype, &device),
            cfg.clone(),
            &device,
            dtype,
        )?;
        let engine = Engine::new(model, tok, None, ecfg.clone());
        emit(serde_json::json!({
            "engine": "wildlong", "step": "init", "shape": shape, "device": ecfg.device,
            "s": round(t0.elapsed().as_secs_f64(), 1),
            "params_b": round(cfg.num_parameters() as f64 / 1e9, 3),
            "prefill_chunk": ecfg.prefill_chunk,
        }))?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let vocab = (cfg.vocab_size as u32).min(32000);
        let mut ids =
            |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(2..vocab)).collect() };
        // Warm-up: kernels load, allocations.
        engine.generate(
            &[Request {
                prompt: ids(256),
                params: params(2),
            }],
            |_, _| {},
        )?;
        for &n in &prefill {
            let req = vec![Request {
                prompt: ids(n),
                params: params(1),
            }];
            let mut runs = Vec::new();
            for _ in 0..args.runs.clamp(1, 2) {
                runs.push(timed(|| cold(&engine, &req, |_, _| {}).map(drop))?);
            }
            let dt = median(runs);
            emit(serde_json::json!({
                "engine": "wildlong", "step": "prefill", "tokens": n, "s": round(dt, 3),
                "tok_s": (n as f64 / dt).round(),
                "tflops": round(2.0 * cfg.num_parameters() as f64 * n as f64 / dt / 1e12, 1),
            }))?;
        }
        let (p, new) = (args.prompt_tokens, args.new_tokens.max(2));
        for bs in [1, args.batch.max(1)] {
            let mk = |m: usize, ids: &mut dyn FnMut(usize) -> Vec<u32>| -> Vec<Request> {
                (0..bs)
                    .map(|_| Request {
                        prompt: ids(p),
                        params: params(m),
                    })
                    .collect()
            };
            let (one, full) = (mk(1, &mut ids), mk(new, &mut ids));
            engine.generate(&full, |_, _| {})?; // warm-up at this batch size
            let tp = timed(|| cold(&engine, &one, |_, _| {}).map(drop))?;
            let tf = timed(|| cold(&engine, &full, |_, _| {}).map(drop))?;
            emit(serde_json::json!({
                "engine": "wildlong", "step": "generate", "batch": bs, "prompt": p, "new": new,
                "s": round(tf, 2),
                // HF's figure: new tokens over the whole generate() call, prefill included.
                "tok_s": round((bs * new) as f64 / tf, 1),
                "decode_only_tok_s": (tf > tp).then(|| round((bs * (new - 1)) as f64 / (tf - tp), 1)),
            }))?;
        }
        drop(engine);
        if train_lens.is_empty() {
            return Ok(());
        }
        let spec = LoraSpec {
            rank: 16,
            alpha: 32.0,
            targets: PROJECTIONS.map(String::from).to_vec(),
            seed: 0,
            dropout: 0.0,
        };
        if device.is_cuda() {
            // TF32 for the f32 products, as in `wildlong train` on CUDA.
            #[cfg(feature = "cuda")]
            candle_core::cuda_backend::set_gemm_reduced_precision_f32(true);
        }
        let opts = TrainOptions {
            lora: Some(spec),
            full: false,
            base_dtype: DType::BF16,
            device: device.clone(),
        };
        let mut m = TrainModel::load_with(
            &mut WeightSource::in_memory(weights, DType::BF16, &device),
            cfg.clone(),
            &opts,
        )?;
        // As the HF baseline: gradient checkpointing per layer.
        m.checkpoint_layers = true;
        m.loss_chunk = args.loss_chunk.max(1);
        for &n in &train_lens {
            let row = ids(n + 1);
            let batch = crate::train::data::Batch {
                tokens: vec![row[..n].to_vec()],
                positions: vec![(0..n as u32).collect()],
                segments: vec![vec![0; n]],
                targets: row[1..].iter().map(|&t| t as i64).collect(),
            };
            let sampler = PeakSampler::start(&device);
            let (times, loss) = train_steps(&m, &batch, 3)?;
            let peak = sampler.finish();
            let dt = median(times[1..].to_vec());
            emit(serde_json::json!({
                "engine": "wildlong", "step": "lora_train", "tokens": n, "s": round(dt, 2),
                "tok_s": (n as f64 / dt).round(), "step_s": times, "loss": round(loss, 3),
                "peak_gib": peak.map(|g| round(g, 1)),
                "peak_note": "device memory in use (total - free, sampled every 2 ms): includes the CUDA context and allocator pool",
                "peak_rss_mib": crate::train::run::peak_rss_mib(),
                "mfu6n_pct": round(100.0 * 6.0 * cfg.num_parameters() as f64 * n as f64 / dt / 989e12, 1),
            }))?;
        }
        Ok(())
    }

    fn tempfile_dir() -> Result<TempDir> {
        let base = std::env::temp_dir().join(format!("wildlong-bench-{}", std::process::id()));
        std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
        Ok(TempDir(base))
    }

    /// A folder removed when dropped.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
