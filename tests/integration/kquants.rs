//! K-quant GGUFs made by llama.cpp's own quantizer (`scripts/llamacpp_quantize.py`, through
//! llama-cpp-python's `llama_model_quantize`): the tensor types the files end up with, our
//! logits against the dequantized reference, and our greedy tokens against llama.cpp's.

use crate::common::*;
use candle_core::quantized::{gguf_file, GgmlDType};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use wildlong::engine::config::{EngineConfig, GenerationParams};
use wildlong::engine::generate::Request;
use wildlong::engine::llama::full_logits;
use wildlong::engine::weights::WeightFormat;

/// Quantizes `src` to each of `types` with llama.cpp and returns, per type, the file and
/// llama.cpp's greedy continuation of each prompt.
fn llama_cpp_quantize(
    src: &Path,
    out: &Path,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    types: &[&str],
) -> serde_json::Value {
    let prompts_path = out.join("prompts.json");
    std::fs::write(&prompts_path, serde_json::to_string(prompts).unwrap()).unwrap();
    let o = std::process::Command::new(llama_python())
        .arg(root().join("scripts/llamacpp_quantize.py"))
        .arg(src)
        .arg(out)
        .arg(&prompts_path)
        .arg(new_tokens.to_string())
        .args(types)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn tensor_types(path: &Path) -> BTreeSet<String> {
    let mut f = std::fs::File::open(path).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    c.tensor_infos
        .values()
        .map(|t| format!("{:?}", t.ggml_dtype))
        .collect()
}

fn greedy(e: &wildlong::engine::generate::Engine, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let reqs: Vec<Request> = prompts
        .iter()
        .map(|p| Request {
            prompt: p.clone(),
            params: GenerationParams {
                max_tokens: n,
                ignore_eos: true,
                ..Default::default()
            },
        })
        .collect();
    e.generate(&reqs, |_, _| {})
        .unwrap()
        .into_iter()
        .map(|c| c.tokens)
        .collect()
}

/// Logits of `path` loaded `exact` (block kernels, prefill slabs) against candle's
/// dequantization multiplied by gemm (`f32`), within 1e-4 of their scale; returns the exact
/// engine.
fn exact_engine_matching_f32(
    path: &Path,
    tokens: &[u32],
    what: &str,
) -> wildlong::engine::generate::Engine {
    let exact = load(path, EngineConfig::default());
    let reference = load(
        path,
        EngineConfig {
            weight_format: WeightFormat::F32,
            ..Default::default()
        },
    );
    let a = full_logits(&exact.model, tokens).unwrap();
    let b = full_logits(&reference.model, tokens).unwrap();
    let (d, scale) = (max_abs_diff(&a, &b), max_abs(&b));
    assert!(
        d <= 1e-4 * scale,
        "{what}: logits differ by {d} (scale {scale})"
    );
    exact
}

/// Our greedy tokens against llama.cpp's. llama.cpp quantizes activations to 8 bits (ours
/// stay f32), so a near-tie may go the other way: the sequences must agree up to a first
/// difference, where our model must rate the two choices within `0.25` logits of each other
/// (then they diverge and are not compared further); at least `min_agree` of all tokens agree.
fn assert_greedy_matches(
    e: &wildlong::engine::generate::Engine,
    prompts: &[Vec<u32>],
    ours: &[Vec<u32>],
    theirs: &[Vec<u32>],
    min_agree: f64,
    what: &str,
) {
    let mut agree = 0;
    let total: usize = theirs.iter().map(Vec::len).sum();
    for ((p, o), t) in prompts.iter().zip(ours).zip(theirs) {
        let same = o.iter().zip(t).take_while(|(a, b)| a == b).count();
        agree += same;
        if same < t.len() {
            let ctx: Vec<u32> = p.iter().chain(&o[..same]).copied().collect();
            let l = full_logits(&e.model, &ctx).unwrap();
            let last = l.dim(0).unwrap() - 1;
            let row = l.get(last).unwrap().to_vec1::<f32>().unwrap();
            let gap = row[o[same] as usize] - row[t[same] as usize];
            assert!(
                (0.0..0.25).contains(&gap),
                "{what}: token {same} of {p:?}: ours {} vs llama.cpp's {} differ by {gap} logits (not a near-tie)\nours   {o:?}\ntheirs {t:?}",
                o[same],
                t[same]
            );
        }
    }
    assert!(
        agree as f64 >= min_agree * total as f64,
        "{what}: {agree} of {total} tokens agree with llama.cpp's"
    );
}

/// One file llama.cpp wrote (`files[name]`, from [`llama_cpp_quantize`]): it holds each of
/// `types`, our `exact` logits over `tokens` match the `f32` reference, and our greedy
/// continuations of `prompts` (`n` tokens, decoded one row at a time through the block
/// kernels) match llama.cpp's.
fn check_quantized_file(
    files: &serde_json::Value,
    name: &str,
    types: &[GgmlDType],
    tokens: &[u32],
    prompts: &[Vec<u32>],
    n: usize,
) {
    let path = PathBuf::from(files[name]["path"].as_str().unwrap());
    let held = tensor_types(&path);
    for t in types {
        assert!(
            held.contains(&format!("{t:?}")),
            "{name}: llama.cpp wrote {held:?}, no {t:?}"
        );
    }
    let exact = exact_engine_matching_f32(&path, tokens, name);
    let want: Vec<Vec<u32>> = serde_json::from_value(files[name]["greedy"].clone()).unwrap();
    assert_greedy_matches(
        &exact,
        prompts,
        &greedy(&exact, prompts, n),
        &want,
        0.75,
        name,
    );
    // Integer activations (K types through candle's Q8_K kernels, as llama.cpp computes them):
    // memory as predicted, logits near the reference but not equal to it (the path really
    // quantizes), greedy tokens as llama.cpp's.
    let cfg = EngineConfig {
        weight_format: WeightFormat::Int8Activations,
        ..Default::default()
    };
    let what = format!("{name}, int8 activations");
    crate::memory::assert_prediction_holds(&path, &cfg, &what);
    let int8 = load(&path, cfg);
    let a = full_logits(&int8.model, tokens).unwrap();
    let b = full_logits(&exact.model, tokens).unwrap();
    let (d, scale) = (max_abs_diff(&a, &b), max_abs(&b));
    assert!(
        d > 1e-5 * scale && d <= 0.05 * scale,
        "{what}: logits differ from exact ones by {d} (scale {scale})"
    );
    eprintln!("{what}: logits within {:.2e} of their scale", d / scale);
    assert_greedy_matches(
        &int8,
        prompts,
        &greedy(&int8, prompts, n),
        &want,
        0.75,
        &what,
    );
}

#[test]
fn k_quants_of_a_model_with_256_wide_rows_match_the_reference_and_llama_cpps_tokens() {
    // Rows of 256 and 512 values, so that llama.cpp keeps its K types for every matrix.
    let spec = TinySpec {
        hidden: 256,
        intermediate: 512,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 256,
        max_pos: 64,
        tie: false,
        extra: serde_json::json!({"rope_theta": 500000.0}),
    };
    let dir = tiny_random(&spec, 5);
    let hf = load(dir.path(), EngineConfig::default());
    let (_f32_dir, f32_gguf) = crate::model::write_gguf(&hf, dir.path(), &spec, None, true);
    let prompts: Vec<Vec<u32>> = (0..3)
        .map(|s| (0..12).map(|i| (i * 29 + s * 71 + 5) % 256).collect())
        .collect();
    let n = 12;
    let out = tempdir();
    let files = llama_cpp_quantize(
        &f32_gguf,
        out.path(),
        &prompts,
        n,
        &["Q4_K_M", "Q5_K_M", "Q6_K"],
    );
    let expect: [(&str, &[GgmlDType]); 3] = [
        ("Q4_K_M", &[GgmlDType::Q4K, GgmlDType::Q6K]),
        ("Q5_K_M", &[GgmlDType::Q5K, GgmlDType::Q6K]),
        ("Q6_K", &[GgmlDType::Q6K]),
    ];
    let tokens: Vec<u32> = (0..40).map(|i| (i * 13 + 7) % 256).collect();
    for (name, types) in expect {
        check_quantized_file(&files, name, types, &tokens, &prompts, n);
    }
}

#[test]
fn the_default_model_as_q4_k_m_falls_back_where_rows_are_576_wide_and_gives_llama_cpps_tokens() {
    let e = default_engine();
    let prompts: Vec<Vec<u32>> = ["The capital of France is", "def fibonacci(n):"]
        .iter()
        .map(|p| e.tokenizer.encode(p, false).unwrap())
        .collect();
    let n = 8;
    let out = tempdir();
    let files = llama_cpp_quantize(&default_model_path(), out.path(), &prompts, n, &["Q4_K_M"]);
    // 576-wide rows take Q5_0 (for Q4_K) and Q8_0 (for Q6_K); ffn_down (1536 wide) keeps K types.
    let types = [
        GgmlDType::Q4K,
        GgmlDType::Q6K,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
    ];
    check_quantized_file(&files, "Q4_K_M", &types, &prompts.concat(), &prompts, n);
    // Held in its own size: loading raises the process's memory by at most 1.3x the file,
    // and the weights hold what the header predicts.
    let path = files["Q4_K_M"]["path"].as_str().unwrap();
    let out = ok(&wildlong(&["models", "info", path, "--load"])
        .output()
        .unwrap());
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["predicted_bytes"], last["held_bytes"], "{out}");
    let p = &last["process"];
    let grew = p["rss_after"].as_u64().unwrap() - p["rss_before"].as_u64().unwrap();
    let file = last["file_bytes"].as_u64().unwrap();
    assert!(
        grew as f64 <= 1.3 * file as f64,
        "RSS grew by {grew} bytes loading a {file}-byte Q4_K_M\n{out}"
    );
}

/// `native` holds candle's quantized matmuls over the file's blocks, the tied table included:
/// its rows are read from the blocks (as on CUDA, where every block format is held so), the
/// model holds the file's size, and its logits are the `f32` reference's up to candle's 8-bit
/// activations.
#[test]
fn a_table_held_as_the_files_blocks_in_candles_matmul_is_looked_up_from_them() {
    let path = default_model_path();
    let cfg = EngineConfig {
        weight_format: WeightFormat::Native,
        ..Default::default()
    };
    crate::memory::assert_prediction_holds(&path, &cfg, "native");
    let native = load(&path, cfg);
    let file = std::fs::metadata(&path).unwrap().len();
    let held = native.model.bytes();
    assert!(
        held <= file,
        "native holds {held} bytes of a {file}-byte file: the table was widened"
    );
    let reference = load(
        &path,
        EngineConfig {
            weight_format: WeightFormat::F32,
            ..Default::default()
        },
    );
    let tokens = native
        .tokenizer
        .encode("The capital of France is", false)
        .unwrap();
    let a = full_logits(&native.model, &tokens).unwrap();
    let b = full_logits(&reference.model, &tokens).unwrap();
    let (d, scale) = (max_abs_diff(&a, &b), max_abs(&b));
    assert!(
        d <= 0.05 * scale,
        "native logits differ by {d} (scale {scale})"
    );
}
