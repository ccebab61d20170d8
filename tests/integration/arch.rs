//! The architectures users bring besides Llama: tiny random Qwen2 (q/k/v biases, tied
//! embeddings), Qwen3 (per-head q/k RMSNorm, explicit head_dim) and Llama-3.2-style (tied,
//! llama3 RoPE) checkpoints made by `scripts/make_arch_fixture.py` with HF transformers,
//! loaded from their HF folders and from GGUFs written by llama.cpp's converter rules: logits
//! equal HF's (dense and paged forward), tokenizer ids and chat-template renderings (tools,
//! tool calls, Qwen3's thinking branches, Llama 3.2's dated system header) equal HF's.

use crate::common::*;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use wildlong::engine::config::EngineConfig;
use wildlong::engine::llama::{full_logits, PagedBatch, PagedKv, SeqChunk};
use wildlong::models;

const MODELS: [&str; 3] = ["qwen2", "qwen3", "llama32"];

fn folder(name: &str) -> PathBuf {
    fixture(&format!("arch/{name}"))
}

fn hf_json(name: &str) -> Json {
    serde_json::from_str(&std::fs::read_to_string(folder(name).join("hf.json")).unwrap()).unwrap()
}

fn read_json(p: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// HF's logits for the fixture's input ids: `(ids, (t, vocab))`.
fn hf_logits(name: &str) -> (Vec<u32>, Tensor) {
    let t = load_tensors(&folder(name).join("logits.safetensors"));
    let ids = t["input_ids"].to_vec1::<i64>().unwrap();
    (ids.iter().map(|&i| i as u32).collect(), t["logits"].clone())
}

/// llama3 RoPE scaling as per-frequency divisors, by the formula llama.cpp's converter
/// writes into `rope_freqs.weight` (Meta's `apply_scaling`).
fn llama3_rope_factors(cfg: &Json, head_dim: usize) -> Vec<f32> {
    let s = &cfg["rope_scaling"];
    let (factor, low, high) = (
        s["factor"].as_f64().unwrap(),
        s["low_freq_factor"].as_f64().unwrap(),
        s["high_freq_factor"].as_f64().unwrap(),
    );
    let old = s["original_max_position_embeddings"].as_f64().unwrap();
    let theta = cfg["rope_theta"].as_f64().unwrap();
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// The fixture folder as llama.cpp's `convert_hf_to_gguf.py` writes it: GGUF names, the
/// architecture's metadata (`qwen2`/`qwen3` keep HF's q/k rows; `llama` permutes them and
/// bakes llama3 scaling into `rope_freqs`), the BPE vocabulary with control tokens, merges,
/// the pre-tokenizer name and the chat template.
fn write_gguf(name: &str) -> (tempfile::TempDir, PathBuf) {
    use gguf_file::Value as V;
    let dir = folder(name);
    let cfg = read_json(&dir.join("config.json"));
    let u = |k: &str| cfg[k].as_u64().unwrap() as u32;
    let (hidden, heads, kv_heads) = (
        u("hidden_size"),
        u("num_attention_heads"),
        u("num_key_value_heads"),
    );
    let head_dim = cfg["head_dim"]
        .as_u64()
        .map_or(hidden / heads, |d| d as u32);
    let arch = match name {
        "llama32" => "llama",
        other => other,
    };
    let w = load_tensors(&dir.join("model.safetensors"));
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut put =
        |n: String, t: &Tensor| tensors.push((n, QTensor::quantize(t, GgmlDType::F32).unwrap()));
    put("token_embd.weight".into(), &w["model.embed_tokens.weight"]);
    put("output_norm.weight".into(), &w["model.norm.weight"]);
    if let Some(t) = w.get("lm_head.weight") {
        put("output.weight".into(), t);
    }
    if arch == "llama" {
        let f = llama3_rope_factors(&cfg, head_dim as usize);
        put(
            "rope_freqs.weight".into(),
            &Tensor::new(f.as_slice(), &Device::Cpu).unwrap(),
        );
    }
    let names = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
    ];
    for i in 0..u("num_hidden_layers") {
        for (hf, g) in names {
            for kind in ["weight", "bias"] {
                let Some(t) = w.get(&format!("model.layers.{i}.{hf}.{kind}")) else {
                    continue;
                };
                let t = match (arch, g, kind) {
                    ("llama", "attn_q", "weight") => {
                        crate::model::permute_for_gguf(t, heads as usize)
                    }
                    ("llama", "attn_k", "weight") => {
                        crate::model::permute_for_gguf(t, kv_heads as usize)
                    }
                    _ => t.clone(),
                };
                put(format!("blk.{i}.{g}.{kind}"), &t);
            }
        }
    }
    // The vocabulary by id, control tokens marked (type 3) as the converter marks them.
    let tok = read_json(&dir.join("tokenizer.json"));
    let vocab_size = u("vocab_size") as usize;
    let mut tokens = vec![String::new(); vocab_size];
    let mut types = vec![1i32; vocab_size];
    for (t, id) in tok["model"]["vocab"].as_object().unwrap() {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    for a in tok["added_tokens"].as_array().unwrap() {
        let id = a["id"].as_u64().unwrap() as usize;
        tokens[id] = a["content"].as_str().unwrap().to_string();
        types[id] = 3;
    }
    let id_of = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
    let merges: Vec<V> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Json::Array(p) => V::String(format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            s => V::String(s.as_str().unwrap().to_string()),
        })
        .collect();
    let (pre, bos, eos, add_bos) = match arch {
        "llama" => (
            "llama-bpe",
            id_of("<|begin_of_text|>"),
            id_of("<|eot_id|>"),
            true,
        ),
        _ => ("qwen2", id_of("<|endoftext|>"), id_of("<|im_end|>"), false),
    };
    let template = std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap();
    let k = |s: &str| format!("{arch}.{s}");
    let eps = cfg["rms_norm_eps"].as_f64().unwrap() as f32;
    let md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        (k("embedding_length"), V::U32(hidden)),
        (k("feed_forward_length"), V::U32(u("intermediate_size"))),
        (k("block_count"), V::U32(u("num_hidden_layers"))),
        (k("attention.head_count"), V::U32(heads)),
        (k("attention.head_count_kv"), V::U32(kv_heads)),
        (k("attention.key_length"), V::U32(head_dim)),
        (k("attention.value_length"), V::U32(head_dim)),
        (k("attention.layer_norm_rms_epsilon"), V::F32(eps)),
        (
            k("rope.freq_base"),
            V::F32(cfg["rope_theta"].as_f64().unwrap() as f32),
        ),
        (k("rope.dimension_count"), V::U32(head_dim)),
        (k("context_length"), V::U32(u("max_position_embeddings"))),
        (k("vocab_size"), V::U32(vocab_size as u32)),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(types.into_iter().map(V::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), V::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(bos)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(eos)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(add_bos)),
        ("tokenizer.chat_template".into(), V::String(template)),
    ];
    let out = tempdir();
    let path = out.path().join(format!("{name}.gguf"));
    let mut f = std::fs::File::create(&path).unwrap();
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    (out, path)
}

/// The paged forward's logits for one sequence: a prefill chunk of `chunk` tokens, then one
/// decode step per token; rows from position `chunk - 1` on.
fn paged_logits(e: &wildlong::engine::generate::Engine, ids: &[u32], chunk: usize) -> Tensor {
    let cfg = e.model.config();
    let bs = 4;
    let kv = PagedKv::new(cfg, 16, bs, DType::F32, &Device::Cpu).unwrap();
    let blocks: Vec<u32> = (0..ids.len().div_ceil(bs) as u32).rev().collect();
    let mut rows = Vec::new();
    let mut done = 0;
    while done < ids.len() {
        // One token at a time after the first chunk: decode steps.
        let n = if done == 0 { chunk } else { 1 };
        let batch = PagedBatch {
            seqs: vec![SeqChunk {
                start: done,
                len: n,
                blocks: blocks.clone(),
                last_hidden: true,
            }],
            block_size: bs,
        };
        let h = e
            .model
            .forward_paged(&ids[done..done + n], &batch, &kv)
            .unwrap();
        done += n;
        rows.push(e.model.logits(&h).unwrap());
    }
    Tensor::cat(&rows, 0).unwrap() // (t - chunk + 1, vocab)
}

#[test]
fn qwen2_qwen3_and_llama32_checkpoints_match_transformers_from_hf_folders_and_gguf() {
    for name in MODELS {
        let (ids, want) = hf_logits(name);
        let hf = load(&folder(name), EngineConfig::default());
        let c = hf.model.config();
        match name {
            "qwen2" => assert!(c.attention_bias && !c.o_proj_bias && c.tie_word_embeddings),
            "qwen3" => assert!(c.qk_norm && !c.attention_bias && c.head_dim == 16),
            _ => assert!(c.tie_word_embeddings && !c.qk_norm),
        }
        assert_eq!(
            c.sliding_window, None,
            "{name}: use_sliding_window is false"
        );
        let got = full_logits(&hf.model, &ids).unwrap();
        let d = max_abs_diff(&want, &got);
        assert!(
            d < 1e-4,
            "{name}: HF folder differs from transformers by {d}"
        );
        // The paged path the scheduler runs: a 7-token prefill chunk, then decode steps.
        let paged = paged_logits(&hf, &ids, 7);
        let tail = want.narrow(0, 6, ids.len() - 6).unwrap();
        let d = max_abs_diff(&tail, &paged);
        assert!(d < 1e-4, "{name}: paged forward differs by {d}");

        let (_keep, gguf) = write_gguf(name);
        let g = load(&gguf, EngineConfig::default());
        assert_eq!(g.model.config().architecture, c.architecture);
        let got = full_logits(&g.model, &ids).unwrap();
        let d = max_abs_diff(&want, &got);
        assert!(d < 1e-4, "{name}: GGUF differs from transformers by {d}");
        crate::memory::assert_prediction_holds(&gguf, &EngineConfig::default(), name);
        crate::memory::assert_prediction_holds(&folder(name), &EngineConfig::default(), name);
    }
}

#[test]
fn their_tokenizers_and_chat_templates_render_as_hf_from_folders_and_gguf() {
    let cfg = EngineConfig::default();
    for name in MODELS {
        let hf = hf_json(name);
        let (_keep, gguf) = write_gguf(name);
        for path in [folder(name), gguf.clone()] {
            let what = format!("{name} ({})", path.display());
            let located = models::locate(
                models::resolve(&path.display().to_string(), &root()).unwrap(),
                &cfg,
            )
            .unwrap();
            let tok = &located.tokenizer;
            for s in hf["strings"].as_array().unwrap() {
                let text = s["text"].as_str().unwrap();
                let ids: Vec<u32> = serde_json::from_value(s["ids"].clone()).unwrap();
                let with: Vec<u32> = serde_json::from_value(s["ids_special"].clone()).unwrap();
                assert_eq!(tok.encode(text, false).unwrap(), ids, "{what}: {text:?}");
                assert_eq!(
                    tok.encode(text, true).unwrap(),
                    with,
                    "{what}: {text:?} + special"
                );
            }
            let tmpl = located.chat_template.as_ref().expect("chat template");
            for case in hf["chats"].as_array().unwrap() {
                let tools = case["tools"].as_array().map(|_| &case["tools"]);
                let kwargs = case["kwargs"].as_object().unwrap();
                let agp = case["add_generation_prompt"].as_bool().unwrap();
                let text = tmpl
                    .render_json(&case["messages"], tools, kwargs, agp)
                    .unwrap_or_else(|e| panic!("{what}: {}: {e:#}", case["name"]));
                assert_eq!(
                    text,
                    case["text"].as_str().unwrap(),
                    "{what}: {} (agp {agp})",
                    case["name"]
                );
                let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
                assert_eq!(
                    tok.encode(&text, false).unwrap(),
                    ids,
                    "{what}: {}",
                    case["name"]
                );
            }
        }
    }
}

/// The generation prompt the engine renders for `msgs`.
fn prompt(
    e: &wildlong::engine::generate::Engine,
    msgs: &[wildlong::engine::chat::Message],
) -> String {
    e.chat_template
        .as_ref()
        .unwrap()
        .render(msgs, true)
        .unwrap()
}

#[test]
fn chat_template_kwargs_reach_every_rendering_and_strftime_now_is_today() {
    // engine.chat_template_kwargs turns Qwen3's thinking off for every prompt the engine renders.
    let off = EngineConfig {
        chat_template_kwargs: toml::toml! { enable_thinking = false },
        ..Default::default()
    };
    let e = load(&folder("qwen3"), off);
    let msgs = [wildlong::engine::chat::Message::new(
        "user",
        "What is RoPE scaling?",
    )];
    let text = prompt(&e, &msgs);
    let hf = hf_json("qwen3");
    let want = hf["chats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "single+{\"enable_thinking\": false}")
        .unwrap();
    assert_eq!(text, want["text"].as_str().unwrap());
    let on = load(&folder("qwen3"), EngineConfig::default());
    assert!(!prompt(&on, &msgs).contains("<think>"));
    let bad = EngineConfig {
        chat_template_kwargs: toml::toml! { messages = 1 },
        ..Default::default()
    };
    let err = wildlong::models::load_engine(
        folder("qwen3").to_str().unwrap(),
        &root().join("models"),
        &bad,
    )
    .err()
    .unwrap();
    assert!(
        format!("{err:#}").contains("chat_template_kwargs: `messages`"),
        "{err:#}"
    );

    // Llama 3.2 stamps today's date when none is given, as HF's strftime_now does.
    let e = load(&folder("llama32"), EngineConfig::default());
    let text = prompt(&e, &msgs);
    let today = std::process::Command::new("date")
        .args(["-u", "+%d %b %Y"])
        .output()
        .unwrap();
    let today = String::from_utf8(today.stdout).unwrap();
    assert!(
        text.contains(&format!("Today Date: {}\n", today.trim())),
        "{text}"
    );
    use wildlong::engine::chat::strftime;
    // 2024-02-29 13:05:09 UTC, a Thursday, day 60 of a leap year.
    assert_eq!(
        strftime("%d %b %Y|%e|%B %A %a|%y %m %j|%H:%M:%S %%", 1_709_211_909).unwrap(),
        "29 Feb 2024|29|February Thursday Thu|24 02 060|13:05:09 %"
    );
    assert_eq!(strftime("%d %b %Y", 0).unwrap(), "01 Jan 1970");
    assert!(strftime("%Q", 0).is_err());
}

#[test]
fn lora_on_qwen2_qwen3_and_llama32_trains_from_transformers_logits_and_exports_what_the_engine_merges(
) {
    use crate::train_model::{engine_with_adapter, logits_of, lora, randomise_b};
    use wildlong::train::model::{self, PROJECTIONS};
    for name in MODELS {
        let (ids, want) = hf_logits(name);
        let (_keep, gguf) = write_gguf(name);
        for base in [folder(name), gguf] {
            let what = format!("{name} ({})", base.display());
            let (m, tok, template) = model::load(
                base.to_str().unwrap(),
                &root().join("models"),
                Some(&lora(&PROJECTIONS)),
            )
            .unwrap();
            // The trainer's forward (its own ops) is HF's model; LoRA starts at zero.
            let d = max_abs_diff(&logits_of(&m, &ids), &want);
            assert!(
                d < 1e-4,
                "{what}: the trainer's forward differs from HF by {d}"
            );
            randomise_b(&m);
            let ours = logits_of(&m, &ids);
            assert!(
                max_abs_diff(&ours, &want) > 1e-2,
                "{what}: the adapter changes the model"
            );
            // Qwen2's biases stay frozen: only adapters train, and PEFT's file has A and B of
            // each of the seven projections per layer.
            assert!(
                m.trainable().iter().all(|(n, _)| n.contains("lora_")),
                "{what}"
            );
            let out = tempdir();
            m.save_peft(out.path(), name).unwrap();
            let tensors = load_tensors(&out.path().join("adapter_model.safetensors"));
            assert_eq!(tensors.len(), 2 * 7 * m.cfg.num_layers, "{what}");
            let d = max_abs_diff(&engine_with_adapter(&base, out.path(), &ids), &ours);
            assert!(
                d < 1e-4,
                "{what}: the engine with the exported adapter differs by {d}"
            );
            // The merged HF export (biases, q/k norms, its model_type) is the same model
            // (from the HF base: a GGUF's rope_freqs cannot be written to config.json).
            if base != folder(name) {
                continue;
            }
            let merged = tempdir();
            let dir = merged.path().join("merged");
            m.save_merged(&dir, &tok, template.as_ref()).unwrap();
            let e = load(&dir, EngineConfig::default());
            assert_eq!(e.model.config().architecture, m.cfg.architecture, "{what}");
            let d = max_abs_diff(&full_logits(&e.model, &ids).unwrap(), &ours);
            assert!(d < 1e-4, "{what}: the merged export differs by {d}");
        }
    }
}

#[test]
fn full_fine_tuning_gradients_of_qwen_biases_and_qk_norms_match_finite_differences() {
    use crate::train_model::{assert_gradient_is_the_finite_difference, grads_of, opts};
    use wildlong::train::model;
    for (name, tensor) in [
        ("qwen2", "model.layers.0.self_attn.k_proj.bias"),
        ("qwen2", "model.layers.1.self_attn.q_proj.bias"),
        ("qwen3", "model.layers.0.self_attn.q_norm.weight"),
        ("qwen3", "model.layers.1.self_attn.k_norm.weight"),
    ] {
        let m = model::load_with(
            folder(name).to_str().unwrap(),
            &root().join("models"),
            &opts(None, true, DType::F32),
            &Default::default(),
        )
        .unwrap()
        .model;
        let (_, grads) = grads_of(&m);
        assert_gradient_is_the_finite_difference(&m, &m.trainable(), &grads, tensor);
    }
}

#[test]
fn qwen_sliding_window_is_ignored_when_off_and_refused_by_name_when_on() {
    use wildlong::engine::llama::{Config, LlamaConfig};
    let mut cfg = read_json(&folder("qwen2").join("config.json"));
    assert_eq!(
        cfg["sliding_window"], 32,
        "the fixture carries an unused window"
    );
    let parse = |v: &Json| {
        Config::from_hf(
            &serde_json::from_value::<LlamaConfig>(v.clone()).unwrap(),
            None,
        )
    };
    assert_eq!(parse(&cfg).unwrap().sliding_window, None);
    cfg["use_sliding_window"] = true.into();
    let err = format!("{:#}", parse(&cfg).unwrap_err());
    assert!(err.contains("use_sliding_window"), "{err}");
    // Mistral's window applies as its config says.
    cfg["model_type"] = "mistral".into();
    assert_eq!(parse(&cfg).unwrap().sliding_window, Some(32));
    cfg["model_type"] = "qwen2_moe".into();
    let err = format!("{:#}", parse(&cfg).unwrap_err());
    assert!(
        err.contains("unsupported architecture `qwen2_moe`"),
        "{err}"
    );
}
