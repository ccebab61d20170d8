//! The model against references: HF transformers logits on the default GGUF and on a tiny HF
//! checkpoint under every RoPE scaling type and Mistral's sliding window; a plain f64 forward
//! on tiny random models; KV-cache decode and chunked prefill against one full forward.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use wildlong::engine::config::EngineConfig;
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
        params: wildlong::engine::config::GenerationParams {
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
fn paged_forward_of_interleaved_sequences_equals_each_full_forward() {
    use wildlong::engine::llama::{PagedBatch, PagedKv, SeqChunk};
    for (name, extra) in spec_variants().into_iter().filter(|(n, _)| *n != "dynamic") {
        let spec = TinySpec {
            extra,
            ..Default::default()
        };
        let dir = tiny_random(&spec, 7);
        let e = load(dir.path(), EngineConfig::default());
        let cfg = e.model.config();
        let bs = 4;
        let kv = PagedKv::new(cfg, 64, bs, DType::F32, &Device::Cpu).unwrap();
        let seqs: Vec<Vec<u32>> = [(45, 3), (23, 5), (9, 1)]
            .iter()
            .map(|&(n, m)| (0..n).map(|i| (i * 31 + m * 17 + 11) % 256).collect())
            .collect();
        let full: Vec<Tensor> = seqs
            .iter()
            .map(|t| full_logits(&e.model, t).unwrap())
            .collect();
        // Blocks handed out from the top of the pool down, so tables are not in order.
        let mut free: Vec<u32> = (0..64).collect();
        let mut tables: Vec<Vec<u32>> = vec![Vec::new(); seqs.len()];
        let mut done = vec![0usize; seqs.len()];
        // New tokens per step and sequence: prefill chunks, then decode-sized steps.
        let plan = [[16, 7, 1], [1, 9, 3], [20, 1, 5], [2, 6, 0], [6, 0, 0]];
        for step in plan {
            let mut ids = Vec::new();
            let mut chunks = Vec::new();
            let mut which = Vec::new();
            for (s, &n) in step.iter().enumerate() {
                let n = n.min(seqs[s].len() - done[s]);
                if n == 0 {
                    continue;
                }
                while tables[s].len() * bs < done[s] + n {
                    tables[s].push(free.pop().unwrap());
                }
                ids.extend_from_slice(&seqs[s][done[s]..done[s] + n]);
                chunks.push(SeqChunk {
                    start: done[s],
                    len: n,
                    blocks: tables[s].clone(),
                    last_hidden: true,
                });
                done[s] += n;
                which.push(s);
            }
            let batch = PagedBatch {
                seqs: chunks,
                block_size: bs,
            };
            let h = e.model.forward_paged(&ids, &batch, &kv).unwrap();
            let logits = e.model.logits(&h).unwrap(); // (n, vocab)
            for (row, &s) in which.iter().enumerate() {
                let want = full[s].narrow(0, done[s] - 1, 1).unwrap();
                let got = logits.narrow(0, row, 1).unwrap();
                let d = max_abs_diff(&want, &got);
                assert!(d < 1e-4, "{name}: sequence {s} at {}: {d}", done[s]);
            }
        }
        assert_eq!(done, seqs.iter().map(Vec::len).collect::<Vec<_>>());
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
    let scale = max_abs(&fx["default"]);
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

/// llama.cpp's converter permutation of q/k rows (`permute()` in convert_hf_to_gguf.py):
/// within each head, row i goes to 2i and row i + d/2 to 2i + 1.
pub fn permute_for_gguf(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    let hd = rows / heads;
    w.reshape((heads, 2, hd / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// The tiny checkpoint in `dir` (made by `tiny_random`, rope_theta 500000) as llama.cpp's
/// converter would write it: an f32 GGUF with GGUF names, permuted q/k, the byte-level
/// vocabulary and, where given, llama3 scaling baked into per-frequency divisors
/// (`rope_freqs.weight`).
pub fn write_gguf(
    hf: &wildlong::engine::generate::Engine,
    dir: &std::path::Path,
    spec: &TinySpec,
    rope_freqs: Option<&[f32]>,
    for_llama_cpp: bool,
) -> (tempfile::TempDir, std::path::PathBuf) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let w = load_tensors(&dir.join("model.safetensors"));
    let hd = spec.hidden / spec.heads;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut put = |name: String, t: Tensor| {
        tensors.push((name, QTensor::quantize(&t, GgmlDType::F32).unwrap()))
    };
    put(
        "token_embd.weight".into(),
        w["model.embed_tokens.weight"].clone(),
    );
    put("output_norm.weight".into(), w["model.norm.weight"].clone());
    if let Some(t) = w.get("lm_head.weight") {
        put("output.weight".into(), t.clone());
    }
    if let Some(factors) = rope_freqs {
        put(
            "rope_freqs.weight".into(),
            Tensor::new(factors, &Device::Cpu).unwrap(),
        );
    }
    for i in 0..spec.layers {
        let g = |n: &str| w[&format!("model.layers.{i}.{n}.weight")].clone();
        put(
            format!("blk.{i}.attn_q.weight"),
            permute_for_gguf(&g("self_attn.q_proj"), spec.heads),
        );
        put(
            format!("blk.{i}.attn_k.weight"),
            permute_for_gguf(&g("self_attn.k_proj"), spec.kv_heads),
        );
        put(format!("blk.{i}.attn_v.weight"), g("self_attn.v_proj"));
        put(format!("blk.{i}.attn_output.weight"), g("self_attn.o_proj"));
        put(format!("blk.{i}.ffn_gate.weight"), g("mlp.gate_proj"));
        put(format!("blk.{i}.ffn_up.weight"), g("mlp.up_proj"));
        put(format!("blk.{i}.ffn_down.weight"), g("mlp.down_proj"));
        put(format!("blk.{i}.attn_norm.weight"), g("input_layernorm"));
        put(
            format!("blk.{i}.ffn_norm.weight"),
            g("post_attention_layernorm"),
        );
    }
    use gguf_file::Value as V;
    let mut vocab: Vec<String> = hf.tokenizer.inner().get_vocab(false).into_iter().fold(
        vec![String::new(); 256],
        |mut v, (t, id)| {
            v[id as usize] = t;
            v
        },
    );
    // llama.cpp refuses an empty merges list (written as an empty u32 array): a file for it
    // gets one merge of the first two tokens, whose result replaces the last token.
    let merges: Vec<V> = if for_llama_cpp {
        let m = format!("{} {}", vocab[0], vocab[1]);
        vocab[255] = format!("{}{}", vocab[0], vocab[1]);
        vec![V::String(m)]
    } else {
        vec![]
    };
    let md: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.embedding_length", V::U32(spec.hidden as u32)),
        (
            "llama.feed_forward_length",
            V::U32(spec.intermediate as u32),
        ),
        ("llama.block_count", V::U32(spec.layers as u32)),
        ("llama.attention.head_count", V::U32(spec.heads as u32)),
        (
            "llama.attention.head_count_kv",
            V::U32(spec.kv_heads as u32),
        ),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.rope.freq_base", V::F32(500000.0)),
        ("llama.rope.dimension_count", V::U32(hd as u32)),
        ("llama.context_length", V::U32(64)),
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        ("tokenizer.ggml.pre", V::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens",
            V::Array(vocab.into_iter().map(V::String).collect()),
        ),
        ("tokenizer.ggml.merges", V::Array(merges)),
    ];
    let gguf = tempdir();
    let path = gguf.path().join("tiny.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    drop(f);
    (gguf, path)
}

#[test]
fn gguf_with_interleaved_rope_and_rope_freqs_matches_the_hf_checkpoint() {
    use wildlong::engine::rope::{RopeConfig, RopeLayout, RopeScaling};
    let extra = serde_json::json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}});
    let spec = TinySpec {
        extra,
        ..Default::default()
    };
    let dir = tiny_random(&spec, 77);
    let hf = load(dir.path(), EngineConfig::default());
    let tokens: Vec<u32> = (0..45).map(|i| (i * 17 + 3) % 256).collect();
    let want = full_logits(&hf.model, &tokens).unwrap();

    // The same weights as llama.cpp would write them: GGUF names, permuted q/k, and llama3
    // scaling baked into per-frequency divisors (rope_freqs.weight).
    let w = load_tensors(&dir.path().join("model.safetensors"));
    let hd = spec.hidden / spec.heads;
    let base = RopeConfig {
        theta: 500000.0,
        dim: hd,
        max_position_embeddings: spec.max_pos,
        scaling: RopeScaling::Default,
        layout: RopeLayout::HalfSplit,
        freq_factors: None,
    };
    let scaled = RopeConfig {
        scaling: hf.model.config().rope.scaling.clone(),
        ..base.clone()
    };
    let factors: Vec<f32> = base
        .inv_freq(1)
        .0
        .iter()
        .zip(scaled.inv_freq(1).0)
        .map(|(a, b)| a / b)
        .collect();
    let (_gguf, path) = write_gguf(&hf, dir.path(), &spec, Some(&factors), false);
    let g = load(
        &path,
        EngineConfig {
            weight_format: wildlong::engine::weights::WeightFormat::F32,
            ..Default::default()
        },
    );
    assert_eq!(g.model.config().rope.layout, RopeLayout::Interleaved);
    assert!(g.model.config().rope.freq_factors.is_some());
    let got = full_logits(&g.model, &tokens).unwrap();
    let d = max_abs_diff(&want, &got);
    assert!(d < 1e-4, "GGUF path differs from the HF checkpoint by {d}");
    assert_eq!(
        g.tokenizer.encode("hello", false).unwrap(),
        hf.tokenizer.encode("hello", false).unwrap()
    );
    // A PEFT adapter (HF row order) on q/k/v gives the same model on either base: on the
    // GGUF base its q/k deltas must be permuted as llama.cpp permuted the weights.
    let ad = tempdir();
    let kv = spec.kv_heads * hd;
    crate::lora::write_adapter(
        ad.path(),
        2,
        4.0,
        false,
        false,
        &[
            ("model.layers.0.self_attn.q_proj", spec.hidden, spec.hidden),
            ("model.layers.1.self_attn.k_proj", kv, spec.hidden),
            ("model.layers.1.self_attn.v_proj", kv, spec.hidden),
        ],
    );
    let with = |p: &std::path::Path, format| {
        wildlong::models::load_engine_with_adapter(
            p.to_str().unwrap(),
            Some(ad.path()),
            &root().join("models"),
            &EngineConfig {
                weight_format: format,
                ..Default::default()
            },
        )
        .unwrap()
    };
    use wildlong::engine::weights::{
        permute_rows_for_gguf, unpermute_rows_from_gguf, WeightFormat,
    };
    let q = &w["model.layers.0.self_attn.q_proj.weight"];
    let p = permute_rows_for_gguf(q, hd).unwrap();
    assert_eq!(max_abs_diff(&p, &permute_for_gguf(q, spec.heads)), 0.0);
    assert_eq!(
        max_abs_diff(&unpermute_rows_from_gguf(&p, hd).unwrap(), q),
        0.0
    );
    let hf_ad = full_logits(&with(dir.path(), WeightFormat::F32).model, &tokens).unwrap();
    assert!(
        max_abs_diff(&hf_ad, &want) > 1e-2,
        "the adapter changes the model"
    );
    for format in [WeightFormat::F32, WeightFormat::Exact] {
        let g_ad = full_logits(&with(&path, format).model, &tokens).unwrap();
        let d = max_abs_diff(&hf_ad, &g_ad);
        assert!(
            d < 1e-4,
            "{format:?}: adapter on GGUF differs from HF by {d}"
        );
    }
}

#[test]
fn rope_theta_override_reaches_the_model() {
    let dir = tiny_fixture("default");
    let base = load(dir.path(), EngineConfig::default());
    let over = load(
        dir.path(),
        EngineConfig {
            rope_theta: Some(1e6),
            ..Default::default()
        },
    );
    assert_eq!(base.model.config().rope.theta, 10000.0);
    assert_eq!(over.model.config().rope.theta, 1e6);
    let ids: Vec<u32> = (0..30).collect();
    let d = max_abs_diff(
        &full_logits(&base.model, &ids).unwrap(),
        &full_logits(&over.model, &ids).unwrap(),
    );
    assert!(d > 1e-3, "a different rope_theta must change the logits");
}
