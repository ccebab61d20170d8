//! The trainable model (`src/train/model.rs`): its forward against the plain f64 reference
//! and the engine, LoRA's zero start, merged = unmerged, gradients reaching every adapter,
//! packed = unpacked loss.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use wildlong::train::model::{self, LoraSpec, Rows, TrainModel, PROJECTIONS};
use wildlong::train::ops::IGNORE;

pub fn lora(targets: &[&str]) -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: targets.iter().map(|s| s.to_string()).collect(),
        seed: 3,
        dropout: 0.0,
    }
}

fn tiny(spec: Option<&LoraSpec>) -> (tempfile::TempDir, TrainModel) {
    let d = tiny_random(&TinySpec::default(), 7);
    let (m, _, _) = model::load(d.path().to_str().unwrap(), &root().join("models"), spec).unwrap();
    (d, m)
}

/// Tokens, positions and segment ids of a batch.
type Batch = (Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Vec<u32>>);

fn one_row(tokens: &[u32]) -> Batch {
    (
        vec![tokens.to_vec()],
        vec![(0..tokens.len() as u32).collect()],
        vec![vec![0; tokens.len()]],
    )
}

pub fn logits_of(m: &TrainModel, tokens: &[u32]) -> Tensor {
    let (t, p, s) = one_row(tokens);
    let h = m
        .hidden(&Rows {
            tokens: &t,
            positions: &p,
            segments: &s,
        })
        .unwrap();
    m.logits(&h).unwrap()
}

fn reference(dir: &std::path::Path, tokens: &[u32]) -> Tensor {
    let r = reference_forward(dir, tokens);
    let v = r[0].len();
    let flat: Vec<f32> = r.into_iter().flatten().map(|x| x as f32).collect();
    Tensor::from_vec(flat, (tokens.len(), v), &Device::Cpu).unwrap()
}

/// Sets every adapter's B to small random values (PEFT starts at 0, which gives A no gradient).
pub fn randomise_b(m: &TrainModel) {
    for (i, (name, var)) in m.trainable().into_iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            let n = var.elem_count();
            let v = lcg_values(100 + i as u64, n, 0.2);
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn forward_matches_the_plain_reference_and_lora_starts_at_zero() {
    let tokens = [3u32, 17, 200, 5, 9, 44, 1, 250, 33, 7, 12];
    let (d, plain) = tiny(None);
    let want = reference(d.path(), &tokens);
    assert!(max_abs_diff(&logits_of(&plain, &tokens), &want) < 1e-4);
    let spec = lora(&PROJECTIONS);
    let (_, with_lora) = tiny(Some(&spec));
    assert_eq!(with_lora.trainable().len(), 2 * 7 * 2);
    assert!(max_abs_diff(&logits_of(&with_lora, &tokens), &want) < 1e-4);
    // Attention blocks of any size give the same logits.
    let mut small = tiny(None).1;
    small.attention_block = 3;
    assert!(max_abs_diff(&logits_of(&small, &tokens), &want) < 1e-4);
}

#[test]
fn lora_merged_into_the_weights_equals_the_adapter_path() {
    let tokens = [8u32, 1, 77, 140, 2, 61, 9];
    let spec = lora(&["q_proj", "v_proj", "down_proj"]);
    let (d, m) = tiny(Some(&spec));
    randomise_b(&m);
    let with_adapter = logits_of(&m, &tokens);
    // Write W + (α/r)·B·A into a copy of the checkpoint and run the f64 reference on it.
    let merged_dir = tempdir();
    let mut ts = load_tensors(&d.path().join("model.safetensors"));
    for l in m.linears() {
        ts.insert(format!("{}.weight", l.name), l.merged().unwrap());
    }
    candle_core::safetensors::save(&ts, merged_dir.path().join("model.safetensors")).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(d.path().join(f), merged_dir.path().join(f)).unwrap();
    }
    let merged = reference(merged_dir.path(), &tokens);
    assert!(max_abs_diff(&with_adapter, &merged) < 1e-4);
    assert!(max_abs_diff(&with_adapter, &reference(d.path(), &tokens)) > 1e-2);
}

#[test]
fn every_adapter_tensor_gets_a_gradient_and_no_base_weight_does() {
    let spec = lora(&PROJECTIONS);
    let (_, m) = tiny(Some(&spec));
    randomise_b(&m);
    let tokens = [5u32, 9, 13, 200, 31, 4, 77, 90];
    let (t, p, s) = one_row(&tokens);
    let mut targets: Vec<i64> = tokens[1..].iter().map(|&x| x as i64).collect();
    targets.push(IGNORE);
    let loss = m
        .loss(
            &Rows {
                tokens: &t,
                positions: &p,
                segments: &s,
            },
            &targets,
        )
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in m.trainable() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(sum_sq(g) > 0.0, "{name}: zero gradient");
    }
    assert_eq!(m.trainable().len(), 28);
    // The frozen matmul allocates no gradient for any base weight.
    for l in m.linears() {
        assert!(grads.get(l.weight()).is_none(), "{}", l.name);
    }
}

#[test]
fn packed_rows_give_the_loss_of_their_documents_alone() {
    let (_, m) = tiny(None);
    let a = [4u32, 8, 15, 16, 23];
    let b = [42u32, 108, 7, 7, 1, 99, 250];
    let next = |d: &[u32]| -> Vec<i64> {
        let mut t: Vec<i64> = d[1..].iter().map(|&x| x as i64).collect();
        t.push(IGNORE);
        t
    };
    // Packed: one row of 12, positions restart, two segments.
    let packed_tokens = vec![a.iter().chain(&b).copied().collect::<Vec<_>>()];
    let packed_pos = vec![(0..5).chain(0..7).collect::<Vec<u32>>()];
    let packed_seg = vec![[0u32; 5]
        .iter()
        .chain(&[1u32; 7])
        .copied()
        .collect::<Vec<_>>()];
    let packed_targets: Vec<i64> = next(&a).into_iter().chain(next(&b)).collect();
    let packed = m
        .loss(
            &Rows {
                tokens: &packed_tokens,
                positions: &packed_pos,
                segments: &packed_seg,
            },
            &packed_targets,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // Padded: two rows of 7; the pads are their own segment and carry no loss.
    let pad = |d: &[u32]| -> Vec<u32> {
        let mut v = d.to_vec();
        v.resize(7, 0);
        v
    };
    let tokens = vec![pad(&a), pad(&b)];
    let positions = vec![(0..7).collect::<Vec<u32>>(); 2];
    let segments = vec![vec![0, 0, 0, 0, 0, 1, 2], vec![0; 7]];
    let mut targets = next(&a);
    targets.extend([IGNORE, IGNORE]);
    targets.extend(next(&b));
    let padded = m
        .loss(
            &Rows {
                tokens: &tokens,
                positions: &positions,
                segments: &segments,
            },
            &targets,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (packed - padded).abs() < 1e-4 * packed.abs(),
        "{packed} vs {padded}"
    );
    assert!(packed > 0.0);
}

#[test]
fn on_the_default_model_the_forward_equals_the_engines_logits() {
    let spec = lora(&["q_proj", "v_proj"]);
    let (m, tok, _) = model::load(
        default_model_path().to_str().unwrap(),
        &root().join("models"),
        Some(&spec),
    )
    .unwrap();
    let tokens = tok
        .encode(
            "The capital of France is Paris, and the capital of Italy is",
            false,
        )
        .unwrap();
    let ours = logits_of(&m, &tokens);
    let engine = wildlong::engine::llama::full_logits(&default_engine().model, &tokens).unwrap();
    let d = max_abs_diff(&ours, &engine.to_dtype(DType::F32).unwrap());
    assert!(d < 2e-3, "logits differ by {d}");
}

#[test]
fn accumulated_micro_batches_give_the_whole_batchs_token_mean_gradient() {
    use wildlong::train::optim::Accumulator;
    let spec = lora(&["q_proj", "up_proj"]);
    let (_, m) = tiny(Some(&spec));
    randomise_b(&m);
    let vars: Vec<_> = m.trainable().into_iter().map(|(_, v)| v).collect();
    let rows = [vec![5u32, 9, 13, 200, 31, 4], vec![70u32, 2, 2, 8, 19, 101]];
    let targets = |r: &[u32], last: bool| -> Vec<i64> {
        let mut t: Vec<i64> = r[1..].iter().map(|&x| x as i64).collect();
        t.push(IGNORE);
        if last {
            t[0] = IGNORE; // a different token count per row
        }
        t
    };
    let grads_of = |rs: &[Vec<u32>], ts: &[i64]| {
        let pos = vec![(0..6).collect::<Vec<u32>>(); rs.len()];
        let seg = vec![vec![0u32; 6]; rs.len()];
        m.loss(
            &Rows {
                tokens: rs,
                positions: &pos,
                segments: &seg,
            },
            ts,
        )
        .unwrap()
        .backward()
        .unwrap()
    };
    let (t0, t1) = (targets(&rows[0], false), targets(&rows[1], true));
    let tokens = 5 + 4;
    let mut whole = Accumulator::new(vars.len());
    let both: Vec<i64> = t0.iter().chain(&t1).copied().collect();
    whole.add(&vars, &grads_of(&rows, &both)).unwrap();
    let whole = whole.mean(&vars, tokens).unwrap();
    let mut split = Accumulator::new(vars.len());
    split.add(&vars, &grads_of(&rows[..1], &t0)).unwrap();
    split.add(&vars, &grads_of(&rows[1..], &t1)).unwrap();
    let split = split.mean(&vars, tokens).unwrap();
    for (a, b) in whole.iter().zip(&split) {
        assert!(max_abs_diff(a, b) < 1e-6);
    }
}

#[test]
fn the_loss_falls_on_exactly_the_assistant_replies() {
    use wildlong::engine::chat::Message;
    use wildlong::train::data::tokenize;
    let e = default_engine();
    let template = e.chat_template.as_ref().unwrap();
    let chat = vec![
        Message::new("user", "Name a colour."),
        Message::new("assistant", "Blue."),
        Message::new("user", "And a fruit?"),
        Message::new("assistant", "A ripe pear, sliced."),
    ];
    let ex = tokenize(&e.tokenizer, template, &chat).unwrap();
    // The whole text tokenizes as the engine tokenizes a chat.
    let text = template.render(&chat, false).unwrap();
    assert_eq!(ex.tokens, e.tokenizer.encode(&text, false).unwrap());
    // Runs of learned tokens, decoded: each reply with the end-of-turn marker.
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut prev = false;
    for j in 1..ex.tokens.len() {
        let learned = ex.targets[j - 1] != IGNORE;
        if learned {
            assert_eq!(ex.targets[j - 1], ex.tokens[j] as i64);
            if !prev {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(ex.tokens[j]);
        }
        prev = learned;
    }
    let decoded: Vec<String> = runs
        .iter()
        .map(|r| e.tokenizer.decode(r, false).unwrap())
        .collect();
    assert_eq!(
        decoded,
        ["Blue.<|im_end|>", "A ripe pear, sliced.<|im_end|>"]
    );
    assert_eq!(*ex.targets.last().unwrap(), IGNORE);
    // A conversation without an assistant turn teaches nothing: an error.
    let err = tokenize(&e.tokenizer, template, &chat[..1]).unwrap_err();
    assert!(err.to_string().contains("no assistant turn"), "{err}");
}

#[test]
fn generation_blocks_mark_the_loss_as_hf_s_assistant_masks_and_qwen3_replies_are_found() {
    use wildlong::engine::chat::{ChatTemplate, Message};
    use wildlong::engine::tokenizer::Tokenizer;
    use wildlong::train::data::{assistant_spans, tokenize};
    // tests/fixtures/train/masks/reference.json: scripts/assistant_masks_reference.py.
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("train/masks/reference.json")).unwrap(),
    )
    .unwrap();
    let chat: Vec<Message> = serde_json::from_value(r["chat"].clone()).unwrap();
    let tok = Tokenizer::from_file(&fixture("arch/qwen3/tokenizer.json"), &[]).unwrap();
    let read = |p: &str| std::fs::read_to_string(fixture(p)).unwrap();
    let gen = ChatTemplate::new(
        &read("train/masks/generation_template.jinja"),
        None,
        Some("<|im_end|>"),
    )
    .unwrap();
    let ex = tokenize(&tok, &gen, &chat).unwrap();
    let ids: Vec<u32> = serde_json::from_value(r["input_ids"].clone()).unwrap();
    let mask: Vec<u8> = serde_json::from_value(r["assistant_masks"].clone()).unwrap();
    assert_eq!(ex.tokens, ids);
    assert_eq!(mask[0], 0);
    let learned: Vec<u8> = std::iter::once(0)
        .chain(
            ex.targets[..ex.targets.len() - 1]
                .iter()
                .map(|&t| (t != IGNORE) as u8),
        )
        .collect();
    assert_eq!(learned, mask, "the loss on exactly HF's assistant tokens");
    // Renderings for the engine carry no block markers.
    let text = gen.render(&chat, true).unwrap();
    assert!(
        text.ends_with("<|im_start|>assistant\n") && text.is_ascii(),
        "{text:?}"
    );
    // Qwen3's own template renders an earlier reply without the `<think>` block the last
    // turn has: each reply is found in the whole rendering, with its end-of-turn marker.
    let qwen3 = ChatTemplate::new(&read("arch/qwen3/chat_template.jinja"), None, None).unwrap();
    let (full, spans) = assistant_spans(&qwen3, &chat).unwrap();
    assert_eq!(full, r["qwen3_text"].as_str().unwrap());
    let replies: Vec<&str> = spans.iter().map(|&(a, b)| &full[a..b]).collect();
    assert_eq!(
        replies,
        [
            "Blue.<|im_end|>",
            "<think>\n\n</think>\n\nA ripe pear, sliced.<|im_end|>"
        ]
    );
}

#[test]
fn packing_restarts_positions_and_separates_conversations() {
    use wildlong::train::data::{pack, pad_batch, Example};
    let ex = |n: usize, base: u32| Example {
        tokens: (base..base + n as u32).collect(),
        targets: (0..n)
            .map(|j| {
                if j + 1 < n {
                    (base + j as u32 + 1) as i64
                } else {
                    IGNORE
                }
            })
            .collect(),
    };
    let exs = [ex(4, 10), ex(3, 20), ex(5, 30), ex(2, 40)];
    let rows = pack(&exs, 8, 0).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].tokens[0], [10, 11, 12, 13, 20, 21, 22, 0]);
    assert_eq!(rows[0].positions[0], [0, 1, 2, 3, 0, 1, 2, 0]);
    assert_eq!(rows[0].segments[0][..7], [0, 0, 0, 0, 1, 1, 1]);
    assert_eq!(rows[1].tokens[0], [30, 31, 32, 33, 34, 40, 41, 0]);
    assert_eq!(rows[1].targets[7], IGNORE);
    let counted: usize = rows.iter().map(|r| r.counted()).sum();
    assert_eq!(counted, exs.iter().map(|e| e.counted()).sum::<usize>());
    assert!(pack(&[ex(9, 0)], 8, 0)
        .unwrap_err()
        .to_string()
        .contains("more than the row length 8"));
    let padded = pad_batch(&exs[..2], 0);
    assert_eq!(padded.tokens, [vec![10, 11, 12, 13], vec![20, 21, 22, 0]]);
    assert_eq!(padded.targets.len(), 8);
    assert_eq!(padded.counted(), 3 + 2);
}

/// Logits of the engine with a PEFT adapter folder merged in as it loads.
pub fn engine_with_adapter(
    model: &std::path::Path,
    adapter: &std::path::Path,
    tokens: &[u32],
) -> Tensor {
    let e = wildlong::models::load_engine_with_adapter(
        model.to_str().unwrap(),
        Some(adapter),
        &root().join("models"),
        &wildlong::engine::config::EngineConfig::default(),
    )
    .unwrap();
    wildlong::engine::llama::full_logits(&e.model, tokens)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
fn the_exported_peft_adapter_gives_the_engine_the_trained_model() {
    let tokens = [8u32, 1, 77, 140, 2, 61, 9, 33];
    // A safetensors base.
    let spec = lora(&["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]);
    let (d, m) = tiny(Some(&spec));
    randomise_b(&m);
    let out = tempdir();
    m.save_peft(out.path(), "tiny").unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    let names = load_tensors(&out.path().join("adapter_model.safetensors"));
    assert!(names.contains_key("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"));
    assert_eq!(names.len(), 2 * 5 * 2);
    let engine = engine_with_adapter(d.path(), out.path(), &tokens);
    assert!(max_abs_diff(&engine, &logits_of(&m, &tokens)) < 1e-4);

    // The default GGUF base: q/k rows go back to HF order in the file and forward again
    // when the engine merges the adapter.
    let spec = lora(&["q_proj", "k_proj", "v_proj"]);
    let (m, tok, _) = model::load(
        default_model_path().to_str().unwrap(),
        &root().join("models"),
        Some(&spec),
    )
    .unwrap();
    randomise_b(&m);
    let tokens = tok
        .encode("Long documents need long context.", false)
        .unwrap();
    let out = tempdir();
    m.save_peft(out.path(), "HuggingFaceTB/SmolLM2-135M-Instruct")
        .unwrap();
    let ours = logits_of(&m, &tokens);
    let engine = engine_with_adapter(&default_model_path(), out.path(), &tokens);
    let plain = wildlong::engine::llama::full_logits(&default_engine().model, &tokens).unwrap();
    assert!(
        max_abs_diff(&ours, &plain) > 1e-1,
        "the adapter changes the model"
    );
    let d = max_abs_diff(&engine, &ours);
    assert!(d < 2e-3, "engine with the exported adapter differs by {d}");
}

pub fn overfit_batch() -> wildlong::train::data::Batch {
    use wildlong::train::data::{pack, Example};
    let ex = |seed: u64, n: usize| {
        let tokens: Vec<u32> = lcg_values(seed, n, 1.0)
            .iter()
            .map(|x| ((x.abs() * 255.0) as u32) % 256)
            .collect();
        let mut targets: Vec<i64> = tokens[1..].iter().map(|&t| t as i64).collect();
        targets.push(IGNORE);
        Example { tokens, targets }
    };
    pack(&[ex(1, 9), ex(2, 6)], 16, 0).unwrap().remove(0)
}

#[test]
fn steps_lower_the_loss_and_pin_the_numerics() {
    use wildlong::train::optim::{AdamW, AdamWParams};
    use wildlong::train::step::{train_step, StepSettings};
    let spec = lora(&PROJECTIONS);
    let (_, m) = tiny(Some(&spec));
    let vars: Vec<_> = m.trainable().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(vars, AdamWParams::default()).unwrap();
    let s = StepSettings {
        lr: 1e-2,
        warmup_steps: 2,
        total_steps: 30,
        min_lr_ratio: 0.1,
        max_grad_norm: Some(1.0),
        seed: 0,
    };
    let batch = overfit_batch();
    let logs: Vec<_> = (0..30)
        .map(|k| train_step(&m, &mut opt, std::slice::from_ref(&batch), k, &s).unwrap())
        .collect();
    assert_eq!(logs[0].tokens, 13);
    assert_eq!(logs[0].lr, 0.0);
    assert!(logs.iter().all(|l| !l.skipped));
    let (first, last) = (logs[0].loss, logs[29].loss);
    assert!(last < 0.7 * first, "loss {first} -> {last}");
    println!(
        "losses: {:?} ... {last}",
        &logs[..3].iter().map(|l| l.loss).collect::<Vec<_>>()
    );
    // Pinned: the first losses of this seed (tiny_random seed 7, LoRA seed 3).
    let pinned = [PINNED_0, PINNED_1, PINNED_2];
    for (k, p) in pinned.iter().enumerate() {
        assert!(
            (logs[k].loss - p).abs() < 1e-5,
            "step {k}: {} vs pinned {p}",
            logs[k].loss
        );
    }
}

/// From `steps_lower_the_loss_and_pin_the_numerics` (run it with `--nocapture` to print).
/// Step 1 repeats step 0's loss: the warm-up's first learning rate is 0 (HF's schedule).
const PINNED_0: f64 = 6.702332716721755;
const PINNED_1: f64 = 6.702332716721755;
const PINNED_2: f64 = 6.313225379356971;

#[test]
fn a_step_with_non_finite_gradients_is_skipped() {
    use wildlong::train::optim::{AdamW, AdamWParams};
    use wildlong::train::step::{train_step, StepSettings};
    let spec = lora(&["q_proj"]);
    let (_, m) = tiny(Some(&spec));
    let (_, b0) = m.trainable().remove(1);
    b0.set(&(b0.as_tensor().ones_like().unwrap() * f64::NAN).unwrap())
        .unwrap();
    let vars: Vec<_> = m.trainable().into_iter().map(|(_, v)| v).collect();
    let a_before = vars[0].as_tensor().to_vec2::<f32>().unwrap();
    let mut opt = AdamW::new(vars.clone(), AdamWParams::default()).unwrap();
    let s = StepSettings {
        lr: 1e-2,
        warmup_steps: 0,
        total_steps: 10,
        min_lr_ratio: 0.0,
        max_grad_norm: Some(1.0),
        seed: 0,
    };
    let log = train_step(&m, &mut opt, &[overfit_batch()], 0, &s).unwrap();
    assert!(log.skipped);
    assert_eq!(opt.t, 0);
    assert_eq!(vars[0].as_tensor().to_vec2::<f32>().unwrap(), a_before);
}

pub fn opts(lora: Option<LoraSpec>, full: bool, base: DType) -> model::TrainOptions {
    model::TrainOptions {
        lora,
        full,
        base_dtype: base,
        device: candle_core::Device::Cpu,
    }
}

fn tiny_with(o: &model::TrainOptions, tie: bool) -> (tempfile::TempDir, TrainModel) {
    let spec = TinySpec {
        tie,
        ..Default::default()
    };
    let d = tiny_random(&spec, 7);
    let l = model::load_with(
        d.path().to_str().unwrap(),
        &root().join("models"),
        o,
        &Default::default(),
    )
    .unwrap();
    (d, l.model)
}

/// Loss and every trained tensor's gradient (in `trainable()` order) of the overfit batch.
pub fn grads_of(m: &TrainModel) -> (f64, Vec<Tensor>) {
    let b = overfit_batch();
    let rows = Rows {
        tokens: &b.tokens,
        positions: &b.positions,
        segments: &b.segments,
    };
    let (loss, g) = m.loss_and_grads(&rows, &b.targets).unwrap();
    let grads = m
        .trainable()
        .iter()
        .map(|(n, v)| {
            g.get(v.as_tensor())
                .unwrap_or_else(|| panic!("{n}: no gradient"))
                .clone()
        })
        .collect();
    (loss, grads)
}

fn assert_same_grads(a: &[Tensor], b: &[Tensor], names: &[String]) {
    assert_eq!(a.len(), b.len());
    for ((x, y), n) in a.iter().zip(b).zip(names) {
        let scale = max_abs(y).max(1e-6);
        let d = max_abs_diff(x, y) / scale;
        assert!(
            d < 1e-4,
            "{n}: checkpointed gradient differs by {d} (relative)"
        );
    }
}

#[test]
fn layer_checkpointing_and_mlp_tiles_give_the_same_gradients_with_dropout_lora_and_full() {
    // LoRA on every projection with dropout on: the recomputed layers must draw the same masks.
    let spec = LoraSpec {
        dropout: 0.2,
        ..lora(&PROJECTIONS)
    };
    let (_, mut m) = tiny_with(&opts(Some(spec), false, DType::F32), false);
    randomise_b(&m);
    m.set_dropout_seed(Some(5));
    let names: Vec<String> = m.trainable().into_iter().map(|(n, _)| n).collect();
    let (l0, g0) = grads_of(&m);
    m.checkpoint_layers = true;
    let (l1, g1) = grads_of(&m);
    assert!((l0 - l1).abs() < 1e-9 * l0.abs().max(1.0), "{l0} vs {l1}");
    assert_same_grads(&g1, &g0, &names);
    // The MLP in tiles of 5 tokens (uneven, across the packed documents' boundary), forward
    // and backward: the same loss and gradients, dropout masks included.
    m.mlp_tile = 5;
    let (l2, g2) = grads_of(&m);
    assert!((l0 - l2).abs() < 1e-6 * l0.abs().max(1.0), "{l0} vs {l2}");
    assert_same_grads(&g2, &g0, &names);
    m.mlp_tile = 4096;
    // The masks are seeded: the same seed gives the same loss, another seed another, none
    // (evaluation) the loss without dropout.
    assert_eq!(grads_of(&m).0, l1);
    m.set_dropout_seed(Some(6));
    let other = grads_of(&m).0;
    m.set_dropout_seed(None);
    let off = grads_of(&m).0;
    assert!((other - l1).abs() > 1e-4 && (off - l1).abs() > 1e-4 && (off - other).abs() > 1e-4);

    // Full fine-tuning with tied embeddings: every weight trains (the tied matrix once, its
    // gradient from both ends), no adapters, and checkpointing changes nothing.
    let (_, mut m) = tiny_with(&opts(None, true, DType::F32), true);
    let names: Vec<String> = m.trainable().into_iter().map(|(n, _)| n).collect();
    let c = &m.cfg;
    assert_eq!(names.len(), 1 + c.num_layers * 9 + 1, "{names:?}");
    assert!(!names.iter().any(|n| n == "lm_head.weight"));
    let (l0, g0) = grads_of(&m);
    for (g, n) in g0.iter().zip(&names) {
        assert!(sum_sq(g) > 0.0, "{n} got a zero gradient");
    }
    m.checkpoint_layers = true;
    let (l1, g1) = grads_of(&m);
    assert!((l0 - l1).abs() < 1e-9 * l0.abs().max(1.0));
    assert_same_grads(&g1, &g0, &names);
    m.mlp_tile = 3;
    let (l2, g2) = grads_of(&m);
    assert!((l0 - l2).abs() < 1e-6 * l0.abs().max(1.0));
    assert_same_grads(&g2, &g0, &names);
}

#[test]
fn full_fine_tuning_gradients_match_finite_differences() {
    // One entry of each kind of weight, nudged: the loss moves as its gradient says.
    let (_, m) = tiny_with(&opts(None, true, DType::F32), false);
    let (_, grads) = grads_of(&m);
    let vars = m.trainable();
    for name in [
        "model.embed_tokens.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    ] {
        assert_gradient_is_the_finite_difference(&m, &vars, &grads, name);
    }
}

/// Nudges the entry of trained tensor `name` with the largest gradient (a used embedding
/// row, for the embeddings) both ways: the loss moves as its gradient says.
pub fn assert_gradient_is_the_finite_difference(
    m: &TrainModel,
    vars: &[(String, candle_core::Var)],
    grads: &[Tensor],
    name: &str,
) {
    let i = vars
        .iter()
        .position(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} is not trained"));
    let var = &vars[i].1;
    let flat = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let g = grads[i].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let j = (0..g.len())
        .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
        .unwrap();
    let eps = 1e-2f32;
    let at = |delta: f32| {
        let mut w = flat.clone();
        w[j] += delta;
        var.set(&Tensor::from_vec(w, var.dims(), &Device::Cpu).unwrap())
            .unwrap();
        grads_of(m).0
    };
    let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
    at(0.0);
    let rel = (fd - g[j] as f64).abs() / (g[j] as f64).abs().max(1e-3);
    assert!(
        rel < 2e-2,
        "{name}[{j}]: finite difference {fd} vs gradient {}",
        g[j]
    );
}

#[test]
fn bf16_base_weights_hold_half_the_bytes_and_train_the_same_adapters() {
    let spec = lora(&PROJECTIONS);
    let (_, m32) = tiny_with(&opts(Some(spec.clone()), false, DType::F32), false);
    let (_, m16) = tiny_with(&opts(Some(spec), false, DType::BF16), false);
    for l in m16.linears() {
        assert_eq!(l.weight().dtype(), DType::BF16, "{}", l.name);
    }
    randomise_b(&m32);
    randomise_b(&m16);
    let (l32, g32) = grads_of(&m32);
    let (l16, g16) = grads_of(&m16);
    // bf16 keeps 8 bits of mantissa: the loss and gradients agree to about 1 %.
    assert!((l32 - l16).abs() / l32 < 1e-2, "{l32} vs {l16}");
    let names: Vec<String> = m16.trainable().into_iter().map(|(n, _)| n).collect();
    for ((a, b), n) in g16.iter().zip(&g32).zip(&names) {
        let scale = max_abs(b);
        assert!(max_abs_diff(a, b) / scale < 0.1, "{n}");
        assert_eq!(a.dtype(), DType::F32);
    }
}

#[test]
fn the_merged_export_loads_in_the_engine_as_the_trained_model() {
    use wildlong::engine::rope::RopeScaling;
    // A tiny safetensors base trained with linear RoPE scaling: the merged folder runs in the
    // engine with the trained logits and the trained RoPE; the adapter brings its RoPE too.
    let spec = lora(&["q_proj", "v_proj", "up_proj"]);
    let d = tiny_random(&TinySpec::default(), 7);
    let rope = wildlong::train::config::RopeSettings {
        theta: Some(20_000.0),
        scaling: Some(RopeScaling::Linear { factor: 2.0 }),
        max_position_embeddings: Some(256),
    };
    let l = model::load_with(
        d.path().to_str().unwrap(),
        &root().join("models"),
        &model::TrainOptions::lora(Some(&spec)),
        &rope,
    )
    .unwrap();
    randomise_b(&l.model);
    let tokens = [8u32, 1, 77, 140, 2, 61, 9, 33, 100, 4];
    let ours = logits_of(&l.model, &tokens);
    let out = tempdir();
    let merged = out.path().join("merged");
    l.model
        .save_merged(&merged, &l.tokenizer, l.template.as_ref())
        .unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        cfg["rope_scaling"],
        serde_json::json!({"rope_type": "linear", "factor": 2.0})
    );
    assert_eq!(cfg["rope_theta"], 20_000.0);
    let e = wildlong::models::load_engine(
        merged.to_str().unwrap(),
        &root().join("models"),
        &wildlong::engine::config::EngineConfig::default(),
    )
    .unwrap();
    assert_eq!(
        e.model.config().rope.scaling,
        RopeScaling::Linear { factor: 2.0 }
    );
    let got = wildlong::engine::llama::full_logits(&e.model, &tokens).unwrap();
    assert!(max_abs_diff(&got, &ours) < 1e-4);

    let adapter = out.path().join("adapter");
    l.model.save_peft(&adapter, "tiny").unwrap();
    assert!(max_abs_diff(&engine_with_adapter(d.path(), &adapter, &tokens), &ours) < 1e-4);

    // A load that would run other positions is an error, not a fallback.
    let theta = wildlong::engine::config::EngineConfig {
        rope_theta: Some(10_000.0),
        ..Default::default()
    };
    for (m, a) in [
        (merged.as_path(), None),
        (d.path(), Some(adapter.as_path())),
    ] {
        let err = wildlong::models::load_engine_with_adapter(
            m.to_str().unwrap(),
            a,
            &root().join("models"),
            &theta,
        )
        .err()
        .expect("a contradicting rope_theta is refused");
        assert!(format!("{err:#}").contains("trained with"), "{err:#}");
    }
    let mut edited = cfg.clone();
    edited["rope_scaling"] = serde_json::Value::Null;
    std::fs::write(merged.join("config.json"), edited.to_string()).unwrap();
    let err = wildlong::models::load_engine(
        merged.to_str().unwrap(),
        &root().join("models"),
        &Default::default(),
    )
    .err()
    .unwrap();
    assert!(format!("{err:#}").contains("trained with RoPE"), "{err:#}");
}

#[test]
fn the_default_model_merged_to_hf_files_keeps_its_tokenizer_and_logits() {
    let spec = lora(&["q_proj", "k_proj", "gate_proj"]);
    let (m, tok, template) = model::load(
        default_model_path().to_str().unwrap(),
        &root().join("models"),
        Some(&spec),
    )
    .unwrap();
    randomise_b(&m);
    let out = tempdir();
    let merged = out.path().join("merged");
    m.save_merged(&merged, &tok, template.as_ref()).unwrap();
    let e = wildlong::models::load_engine(
        merged.to_str().unwrap(),
        &root().join("models"),
        &Default::default(),
    )
    .unwrap();
    let text = "<|im_start|>user\nHow long is a long context?<|im_end|>\n";
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(e.tokenizer.encode(text, true).unwrap(), ids);
    let msgs = [wildlong::engine::chat::Message::new("user", "Hi")];
    assert_eq!(
        e.chat_template
            .as_ref()
            .unwrap()
            .render(&msgs, true)
            .unwrap(),
        template.as_ref().unwrap().render(&msgs, true).unwrap()
    );
    let got = wildlong::engine::llama::full_logits(&e.model, &ids).unwrap();
    let d = max_abs_diff(&got, &logits_of(&m, &ids));
    assert!(d < 2e-3, "merged default model differs by {d}");
}

/// Writes (with `WILDLONG_WRITE_FIXTURES=1`) or checks `tests/fixtures/train/peft/`: a tiny
/// HF base and the default GGUF model, each with an exported PEFT adapter and the engine's
/// logits with that adapter merged. `scripts/check_peft_adapter.py` loads the same base and
/// adapter in Python `peft` and compares its logits with these.
#[test]
fn the_peft_fixtures_hold_the_engines_logits() {
    let dir = fixture("train/peft");
    let write = std::env::var("WILDLONG_WRITE_FIXTURES").is_ok();
    let check = |name: &str, base: &Path, adapter: &Path, tokens: &[u32], vocab: usize| {
        let logits = engine_with_adapter(base, adapter, tokens)
            .narrow(1, 0, vocab)
            .unwrap();
        let path = dir.join(name).join("logits.safetensors");
        if write {
            let ids = Tensor::new(tokens, &Device::Cpu).unwrap();
            candle_core::safetensors::save(
                &std::collections::HashMap::from([
                    ("logits".to_string(), logits),
                    ("tokens".to_string(), ids),
                ]),
                &path,
            )
            .unwrap();
        } else {
            let want = load_tensors(&path);
            let d = max_abs_diff(&logits, &want["logits"]);
            assert!(
                d < 1e-4,
                "{name}: engine logits moved by {d} from the fixture"
            );
        }
    };
    use std::path::Path;
    // The tiny safetensors base, adapters on all seven projections.
    let base = dir.join("tiny/base");
    if write {
        let d = tiny_random(&TinySpec::default(), 21);
        std::fs::create_dir_all(&base).unwrap();
        for f in ["model.safetensors", "config.json", "tokenizer.json"] {
            std::fs::copy(d.path().join(f), base.join(f)).unwrap();
        }
        let spec = lora(&PROJECTIONS);
        let (m, _, _) =
            model::load(base.to_str().unwrap(), &root().join("models"), Some(&spec)).unwrap();
        randomise_b(&m);
        m.save_peft(&dir.join("tiny/adapter"), "tiny").unwrap();
    }
    check(
        "tiny",
        &base,
        &dir.join("tiny/adapter"),
        &[8, 1, 77, 140, 2, 61, 9, 33],
        256,
    );

    // Qwen2 (frozen q/k/v biases) and Qwen3 (q/k norms) bases, adapters on all seven.
    for name in ["qwen2", "qwen3"] {
        let base = fixture(&format!("arch/{name}"));
        let adapter = dir.join(name).join("adapter");
        if write {
            let (m, _, _) = model::load(
                base.to_str().unwrap(),
                &root().join("models"),
                Some(&lora(&PROJECTIONS)),
            )
            .unwrap();
            randomise_b(&m);
            m.save_peft(&adapter, name).unwrap();
        }
        check(
            name,
            &base,
            &adapter,
            &[8, 1, 77, 140, 2, 61, 9, 33, 500, 404],
            507,
        );
    }

    // The default GGUF model, rank-2 adapters on q, k, v (q/k rows in HF order in the file).
    let tok = wildlong::models::locate(
        wildlong::models::resolve("default", &root().join("models")).unwrap(),
        &Default::default(),
    )
    .unwrap()
    .tokenizer;
    let tokens = tok
        .encode("Long documents need long context.", false)
        .unwrap();
    if write {
        let spec = LoraSpec {
            rank: 2,
            ..lora(&["q_proj", "k_proj", "v_proj"])
        };
        let (m, _, _) = model::load(
            default_model_path().to_str().unwrap(),
            &root().join("models"),
            Some(&spec),
        )
        .unwrap();
        randomise_b(&m);
        m.save_peft(
            &dir.join("smollm2/adapter"),
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        )
        .unwrap();
    }
    check(
        "smollm2",
        &default_model_path(),
        &dir.join("smollm2/adapter"),
        &tokens,
        2048,
    );
}
