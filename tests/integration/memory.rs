//! The memory check before loading: the bytes predicted from a file's header equal what the
//! loaded model holds, in every weight format (GGUF) and dtype (safetensors); a model that
//! will not fit is refused before loading, naming what would fit; an 8B-shaped Q4_K_M is
//! refused under a limit below its size and loads under one above it, its process memory
//! growing by about its file's size.

use crate::common::*;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::GgmlDType;
use clap::ValueEnum;
use std::io::Write;
use std::path::Path;
use wildlong::engine::config::EngineConfig;
use wildlong::engine::weights::WeightFormat;
use wildlong::models;

/// Predicted weight bytes == the bytes the loaded model holds.
pub fn assert_prediction_holds(path: &Path, cfg: &EngineConfig, what: &str) {
    let located = models::locate(
        models::resolve(&path.display().to_string(), &root()).unwrap(),
        cfg,
    )
    .unwrap();
    let predicted = located.weight_bytes(cfg).unwrap();
    let held = located.load(cfg).unwrap().bytes();
    assert_eq!(
        predicted, held,
        "{what}: predicted {predicted} bytes, the model holds {held}"
    );
}

#[test]
fn predicted_weight_bytes_equal_what_the_default_model_holds_in_every_format() {
    for &format in WeightFormat::value_variants() {
        let cfg = EngineConfig {
            weight_format: format,
            ..Default::default()
        };
        assert_prediction_holds(&default_model_path(), &cfg, &format!("{format:?}"));
    }
}

#[test]
fn predicted_weight_bytes_equal_what_safetensors_models_hold_in_each_dtype() {
    for tie in [true, false] {
        let spec = TinySpec {
            tie,
            ..TinySpec::default()
        };
        let dir = tiny_random(&spec, 3);
        for dtype in ["f32", "bf16"] {
            let cfg = EngineConfig {
                dtype: dtype.into(),
                ..Default::default()
            };
            assert_prediction_holds(dir.path(), &cfg, &format!("tie {tie}, {dtype}"));
        }
    }
}

/// The default model in f32 (0.5 GiB of weights) under a 0.5 GiB limit: refused before
/// loading, naming `exact` among the formats that fit; `exact` then runs under that limit
/// (its KV cache sized to what the weights leave).
#[test]
fn a_model_over_the_memory_limit_is_refused_naming_a_format_that_fits() {
    let m = default_model_path();
    let m = m.to_str().unwrap();
    let run = |weights: &str| {
        wildlong(&[
            "generate",
            "--model",
            m,
            "--weights",
            weights,
            "--memory-gib",
            "0.5",
            "--prompt",
            "Hi",
            "--max-tokens",
            "2",
        ])
        .output()
        .unwrap()
    };
    let o = run("f32");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "f32 under 0.5 GiB ran:\n{err}");
    assert!(
        err.contains(m) && err.contains("held as `f32`") && err.contains("`--weights exact`"),
        "{err}"
    );
    ok(&run("exact"));
}

/// Writes a GGUF shaped like Llama-3.1-8B (32 layers, hidden 4096, MLP 14336, 32 query and
/// 8 KV heads) quantized as llama.cpp's Q4_K_M mix (Q4_K, with Q6_K for attn_v, ffn_down
/// and the head), with the default model's tokenizer (vocabulary 49152). Only the header is
/// written: the tensor data is a sparse hole of zeros, so the file takes no disk space.
fn write_8b_shaped_q4_k_m(path: &Path) -> u64 {
    let mut src = std::fs::File::open(default_model_path()).unwrap();
    let content = gguf_file::Content::read(&mut src).unwrap();
    let (layers, h, inter, heads, kv_heads, hd) = (32u32, 4096usize, 14336usize, 32u32, 8u32, 128);
    let mut md = content.metadata.clone();
    for (k, v) in [
        ("block_count", layers),
        ("embedding_length", h as u32),
        ("feed_forward_length", inter as u32),
        ("attention.head_count", heads),
        ("attention.head_count_kv", kv_heads),
        ("rope.dimension_count", hd as u32),
        ("context_length", 8192),
    ] {
        md.insert(format!("llama.{k}"), Value::U32(v));
    }
    let vocab = match &md["tokenizer.ggml.tokens"] {
        Value::Array(a) => a.len(),
        v => panic!("tokens: {v:?}"),
    };
    // A last key whose value ends in a non-zero byte: the header's end is the last such byte
    // before the writer's zero padding.
    let mut tensors: Vec<(String, GgmlDType, [usize; 2])> = vec![
        ("token_embd.weight".into(), GgmlDType::Q4K, [vocab, h]),
        ("output.weight".into(), GgmlDType::Q6K, [vocab, h]),
        ("output_norm.weight".into(), GgmlDType::F32, [1, h]),
    ];
    let kv = kv_heads as usize * hd;
    for l in 0..layers {
        let t = |n: &str, ty, dims| (format!("blk.{l}.{n}.weight"), ty, dims);
        tensors.extend([
            t("attn_norm", GgmlDType::F32, [1, h]),
            t("ffn_norm", GgmlDType::F32, [1, h]),
            t("attn_q", GgmlDType::Q4K, [h, h]),
            t("attn_k", GgmlDType::Q4K, [kv, h]),
            t("attn_v", GgmlDType::Q6K, [kv, h]),
            t("attn_output", GgmlDType::Q4K, [h, h]),
            t("ffn_gate", GgmlDType::Q4K, [inter, h]),
            t("ffn_up", GgmlDType::Q4K, [inter, h]),
            t("ffn_down", GgmlDType::Q6K, [h, inter]),
        ]);
    }
    let mut header = std::io::Cursor::new(Vec::new());
    let end_key = Value::String("end".into());
    let mut md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    md_refs.push(("wildlong.test.end", &end_key));
    gguf_file::write(&mut header, &md_refs, &[]).unwrap();
    let mut bytes = header.into_inner();
    let end = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
    bytes.truncate(end);
    bytes[8..16].copy_from_slice(&(tensors.len() as u64).to_le_bytes());
    let mut offset = 0u64;
    for (name, ty, [n, k]) in &tensors {
        bytes.extend((name.len() as u64).to_le_bytes());
        bytes.extend(name.as_bytes());
        let dims: &[usize] = if *n == 1 { &[*k] } else { &[*k, *n] }; // innermost first
        bytes.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            bytes.extend((*d as u64).to_le_bytes());
        }
        bytes.extend(ggml_type_id(*ty).to_le_bytes());
        bytes.extend(offset.to_le_bytes());
        let size = (n * k / ty.block_size() * ty.type_size()) as u64;
        offset += size.div_ceil(32) * 32;
    }
    bytes.resize(bytes.len().div_ceil(32) * 32, 0);
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&bytes).unwrap();
    let len = bytes.len() as u64 + offset;
    f.set_len(len).unwrap();
    len
}

/// ggml's type ids (ggml.h's `enum ggml_type`).
fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::Q4K => 12,
        GgmlDType::Q6K => 14,
        t => panic!("no id for {t:?} here"),
    }
}

#[test]
fn an_8b_shaped_q4_k_m_is_refused_under_2_gib_and_loads_under_8_with_memory_near_its_file() {
    let dir = tempdir();
    let path = dir.path().join("llama-8b-shaped-Q4_K_M.gguf");
    let file_len = write_8b_shaped_q4_k_m(&path);
    let p = path.to_str().unwrap();
    let o = wildlong(&[
        "generate",
        "--model",
        p,
        "--memory-gib",
        "2",
        "--prompt",
        "Hi",
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "loaded under 2 GiB:\n{err}");
    assert!(
        err.contains(p)
            && err.contains("no weight format or dtype fits")
            && err.contains("2.00 GiB is the limit set"),
        "{err}"
    );
    let out = ok(
        &wildlong(&["models", "info", p, "--load", "--memory-gib", "8"])
            .output()
            .unwrap(),
    );
    // On CUDA every format that keeps the blocks holds them in candle's quantized matmuls, the
    // table included (looked up from them): the file's size there too, not 31 GiB of f32s.
    let gib = file_len as f64 / (1u64 << 30) as f64;
    for format in ["exact", "int8-activations"] {
        let row: Vec<&str> = out
            .lines()
            .find(|l| l.starts_with(&format!("weights {format} ")))
            .unwrap_or_else(|| panic!("no `weights {format}` row\n{out}"))
            .split_whitespace()
            .collect();
        let cuda: f64 = row[row.len() - 1].parse().unwrap();
        assert!(
            cuda <= gib * 1.001 && cuda >= 0.99 * gib,
            "{format} on CUDA: {cuda} GiB predicted for a {gib:.3} GiB file\n{out}"
        );
    }
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let (predicted, held) = (
        last["predicted_bytes"].as_u64().unwrap(),
        last["held_bytes"].as_u64().unwrap(),
    );
    assert_eq!(predicted, held, "{out}");
    // Exact holds the file's blocks: the weights are the file's size, not 7 GiB of f32s ×4.
    assert!(
        held <= file_len && held as f64 >= 0.99 * file_len as f64,
        "held {held} of a {file_len}-byte file\n{out}"
    );
    let grew = last["process"]["rss_after"].as_u64().unwrap()
        - last["process"]["rss_before"].as_u64().unwrap();
    assert!(
        grew as f64 <= 1.3 * file_len as f64,
        "RSS grew by {grew} bytes loading a {file_len}-byte file\n{out}"
    );
}
