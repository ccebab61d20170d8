//! `wildlong bench`: prefill, decode, batched-decode and shared-prefix throughput of the
//! engine on one model, medians over repeated runs, printed as one JSON object. Peers are
//! measured beside it by `scripts/bench_peers.sh` (same machine, same run).

use crate::cli::BenchArgs;
use crate::config::{GenerationParams, SamplingParams};
use crate::engine::generate::{Engine, Request};
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

pub fn run(args: &BenchArgs, threads: usize, models_dir: &Path) -> Result<()> {
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
        let tp = timed(|| engine.generate(&one, |_, _| {}).map(drop))?;
        let tf = timed(|| engine.generate(&full, |_, _| {}).map(drop))?;
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
            let tp = timed(|| engine.generate(&b1, |_, _| {}).map(drop))?;
            let tf = timed(|| engine.generate(&bn, |_, _| {}).map(drop))?;
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
        let t_one = timed(|| engine.generate(&indep_req, |_, _| {}).map(drop))?;
        let t_indep = t_one * args.continuations as f64;
        let mut t_shared = Vec::new();
        for _ in 0..runs.min(2) {
            let reqs: Vec<Request> = (0..args.continuations)
                .map(|i| {
                    Ok(Request {
                        prompt: q(i)?,
                        params: params(m),
                    })
                })
                .collect::<Result<_>>()?;
            t_shared.push(timed(|| {
                let prefix = engine.prefill_prefix(&doc)?;
                engine.generate_with_prefix(&prefix, &reqs).map(drop)
            })?);
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
        "threads": threads,
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

/// LoRA training throughput and peak memory, on the settings of `hf_cpu_baseline.py`: r = 16,
/// α = 32, no dropout, all seven projections, one row of `seq` tokens of Lorem ipsum with
/// every next token counted, AdamW at 1e-4; four steps, the median of the last three. The
/// `--plan` prediction for the same settings is printed beside the measured peak.
fn train(args: &BenchArgs, seq: usize, models_dir: &Path) -> Result<()> {
    use crate::train::{model, optim, plan::Plan, step};
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
    let text = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(400);
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
    for i in 0..4 {
        let t = Instant::now();
        loss = step::train_step(&m, &mut opt, std::slice::from_ref(&batch), i, &settings)?.loss;
        times.push(t.elapsed().as_secs_f64());
    }
    let med = median(times[1..].to_vec());
    let mut recipe = crate::config::TrainConfig::load(None, &[])?;
    recipe.lora.dropout = 0.0;
    recipe.data.max_length = seq;
    recipe.schedule.micro_batch = 1;
    recipe.memory.checkpoint_layers = args.checkpoint_layers;
    recipe.memory.attention_block = m.attention_block;
    let plan = Plan::estimate(&m.cfg, &recipe);
    let out = serde_json::json!({
        "engine": "wildlong",
        "threads": rayon::current_num_threads(),
        "step": "lora_train",
        "seq": seq,
        "checkpoint_layers": args.checkpoint_layers,
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
