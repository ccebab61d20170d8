//! The model against references: HF transformers logits on the default GGUF and on a tiny HF
//! checkpoint under every RoPE scaling type and Mistral's sliding window; a plain f64 forward
//! on tiny random models; KV-cache decode and chunked prefill against one full forward.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use wildlong::config::EngineConfig;
use wildlong::engine::llama::{full_logits, Cache};

#[test]
fn default_model_logits_match_hf_transformers() {
    let e = default_engine();
    let fx = load_tensors(&fixture("smollm2_logits.safetensors"));
    let ids: Vec<u32> = fx["input_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let logits = full_logits(&e.model, &ids).unwrap(); // (t, vocab)
    let t = ids.len();
    // Last position, whole vocabulary. Tolerance: 2e-3 absolute on logits of magnitude ~25
    // (f32 accumulation order differs between candle's gemm and torch).
    let last = logits.get(t - 1).unwrap();
    let d_last = max_abs_diff(&last, &fx["last_logits"]);
    assert!(d_last < 2e-3, "last-position logits differ by {d_last}");
    // Every position at 512 fixed vocabulary ids.
    let sample = fx["sample_ids"].to_dtype(DType::U32).unwrap();
    let ours = logits.index_select(&sample, 1).unwrap();
    let d_all = max_abs_diff(&ours, &fx["sample_logits"]);
    assert!(d_all < 2e-3, "all-position logits differ by {d_all}");
    // Every position's top-1 token agrees.
    let top_ids = fx["topk_ids"].to_vec2::<i64>().unwrap();
    let ours_top: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
    for p in 0..t {
        assert_eq!(ours_top[p] as i64, top_ids[p][0], "position {p}");
    }
}

#[test]
fn default_model_answers_paris_greedily() {
    let e = default_engine();
    let prompt = e
        .chat_prompt(&[wildlong::engine::chat::Message::new(
            "user",
            "What is the capital of France?",
        )])
        .unwrap();
    let req = wildlong::engine::generate::Request {
        prompt,
        params: wildlong::config::GenerationParams {
            max_tokens: 16,
            ..Default::default()
        },
    };
    let out = e.generate(&[req], |_, _| {}).unwrap();
    assert!(out[0].text.contains("Paris"), "{:?}", out[0].text);
    // And token for token what HF transformers' greedy generate() produced.
    let fx = load_tensors(&fixture("smollm2_logits.safetensors"));
    let want: Vec<u32> = fx["greedy_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let n = out[0].tokens.len();
    assert_eq!(out[0].tokens[..], want[..n]);
    assert_eq!(want[n], 2, "HF stopped at <|im_end|> where we stopped");
}

fn tiny_logits(variant: &str) -> (Tensor, Tensor) {
    let dir = tiny_fixture(variant);
    let e = load(dir.path(), EngineConfig::default());
    let fx = load_tensors(&fixture("tiny/logits.safetensors"));
    let ids: Vec<u32> = fx["input_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    (full_logits(&e.model, &ids).unwrap(), fx[variant].clone())
}

#[test]
fn tiny_hf_checkpoint_matches_transformers_under_every_rope_scaling() {
    for variant in [
        "default",
        "linear",
        "dynamic",
        "yarn",
        "llama3",
        "mistral_window",
    ] {
        let (ours, hf) = tiny_logits(variant);
        let d = max_abs_diff(&ours, &hf);
        assert!(
            d < 2e-4,
            "{variant}: logits differ from HF transformers by {d}"
        );
    }
}

#[test]
fn rope_scaling_and_window_really_change_the_tiny_model() {
    let (base, _) = tiny_logits("default");
    for variant in ["linear", "dynamic", "yarn", "llama3", "mistral_window"] {
        let (other, _) = tiny_logits(variant);
        assert!(
            max_abs_diff(&base, &other) > 1e-2,
            "{variant} has no effect"
        );
    }
}

fn spec_variants() -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("default", serde_json::json!({})),
        (
            "linear",
            serde_json::json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ),
        (
            "dynamic",
            serde_json::json!({"rope_scaling": {"rope_type": "dynamic", "factor": 3.0}}),
        ),
        (
            "yarn",
            serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}),
        ),
        (
            "llama3",
            serde_json::json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
        ),
        (
            "mistral_window",
            serde_json::json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 5}),
        ),
        ("tied", serde_json::json!({"tie_word_embeddings": true})),
    ]
}

#[test]
fn tiny_random_models_match_a_plain_f64_reference() {
    let tokens: Vec<u32> = (0..37).map(|i| (i * 53 + 7) % 256).collect();
    for (i, (name, extra)) in spec_variants().into_iter().enumerate() {
        let spec = TinySpec {
            tie: name == "tied",
            extra,
            ..Default::default()
        };
        let dir = tiny_random(&spec, 100 + i as u64);
        let e = load(dir.path(), EngineConfig::default());
        let ours = full_logits(&e.model, &tokens)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let reference = reference_forward(dir.path(), &tokens);
        let mut worst = 0f64;
        for (a, b) in ours.iter().zip(&reference) {
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((*x as f64 - y).abs());
            }
        }
        assert!(worst < 1e-3, "{name}: max |ours - reference| = {worst}");
    }
}

/// Feeds `tokens` one position at a time (or in `chunk`s) through the cache; returns all logits.
fn incremental_logits(
    e: &wildlong::engine::generate::Engine,
    tokens: &[u32],
    chunk: usize,
) -> Tensor {
    let mut cache = Cache::new(e.model.config(), 1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < tokens.len() {
        let end = (start + chunk).min(tokens.len());
        let ids = Tensor::new(&tokens[start..end], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let pos = vec![(start as i64..end as i64).collect::<Vec<_>>()];
        let h = e.model.forward(&ids, &pos, &mut cache).unwrap();
        out.push(e.model.logits(&h.squeeze(0).unwrap()).unwrap());
        start = end;
    }
    Tensor::cat(&out, 0).unwrap()
}

#[test]
fn kv_cache_decode_and_chunked_prefill_equal_one_full_forward() {
    // Dynamic NTK is excluded by design: its base grows with the sequence, so keys cached
    // earlier keep their old rotation (as in HF transformers' dynamic_rope_update).
    for (name, extra) in spec_variants().into_iter().filter(|(n, _)| *n != "dynamic") {
        let spec = TinySpec {
            extra,
            ..Default::default()
        };
        let dir = tiny_random(&spec, 7);
        let e = load(dir.path(), EngineConfig::default());
        let tokens: Vec<u32> = (0..70).map(|i| (i * 31 + 11) % 256).collect();
        let full = full_logits(&e.model, &tokens).unwrap();
        for chunk in [1, 3, 16, 64] {
            let inc = incremental_logits(&e, &tokens, chunk);
            let d = max_abs_diff(&full, &inc);
            assert!(d < 1e-4, "{name}: chunk {chunk} differs by {d}");
        }
    }
}

#[test]
fn default_model_decode_equals_full_forward() {
    let e = default_engine();
    let tokens = e
        .tokenizer
        .encode(
            "The history of the Roman Empire spans many centuries, and historians",
            false,
        )
        .unwrap();
    let full = full_logits(&e.model, &tokens).unwrap();
    let inc = incremental_logits(e, &tokens, 1);
    let chunked = incremental_logits(e, &tokens, 5);
    assert!(max_abs_diff(&full, &inc) < 2e-3);
    assert!(max_abs_diff(&full, &chunked) < 2e-3);
}

#[test]
fn safetensors_half_precision_loads_and_tracks_f32() {
    let dir = tiny_fixture("default");
    let fx = load_tensors(&fixture("tiny/logits.safetensors"));
    let ids: Vec<u32> = fx["input_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let scale = fx["default"]
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // Tolerances relative to the largest logit: f16 has 11 mantissa bits, bf16 8.
    for (dtype, tol) in [("f16", 0.01), ("bf16", 0.06)] {
        let e = load(
            dir.path(),
            EngineConfig {
                dtype: dtype.into(),
                ..Default::default()
            },
        );
        assert_eq!(
            e.model.dtype(),
            if dtype == "f16" {
                DType::F16
            } else {
                DType::BF16
            }
        );
        let l = full_logits(&e.model, &ids).unwrap();
        let d = max_abs_diff(&l, &fx["default"]);
        assert!(d / scale < tol, "{dtype}: {d} of {scale}");
    }
}
