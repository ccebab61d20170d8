//! PEFT LoRA adapters merged at load: logits equal those of a checkpoint merged here by the
//! formula W + (alpha / r) B A (rsLoRA: alpha / sqrt(r)); B = 0 changes nothing; adapters
//! that name modules the model lacks, or use features we don't apply, are refused.

use crate::common::*;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use wildlong::engine::config::EngineConfig;
use wildlong::engine::llama::full_logits;

const TARGETS: [(&str, usize, usize); 4] = [
    ("model.layers.0.self_attn.q_proj", 32, 32),
    ("model.layers.0.self_attn.v_proj", 16, 32),
    ("model.layers.1.self_attn.v_proj", 16, 32),
    ("model.layers.1.mlp.down_proj", 32, 64),
];

/// Writes a PEFT adapter folder; returns the (A, B) values per module.
pub(crate) fn write_adapter(
    dir: &Path,
    rank: usize,
    alpha: f64,
    rslora: bool,
    zero_b: bool,
    targets: &[(&str, usize, usize)],
) -> HashMap<String, (Vec<f32>, Vec<f32>)> {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = serde_json::json!({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": ["q_proj", "v_proj", "down_proj"], "bias": "none",
        "fan_in_fan_out": false, "lora_dropout": 0.0, "task_type": "CAUSAL_LM"
    });
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut tensors = HashMap::new();
    let mut values = HashMap::new();
    for (i, (m, out, inp)) in targets.iter().enumerate() {
        let a = lcg_values(100 + i as u64, rank * inp, 0.5);
        let b = match zero_b {
            true => vec![0.0; out * rank],
            false => lcg_values(200 + i as u64, out * rank, 0.5),
        };
        let name = format!("base_model.model.{m}");
        tensors.insert(
            format!("{name}.lora_A.weight"),
            Tensor::from_vec(a.clone(), (rank, *inp), &Device::Cpu).unwrap(),
        );
        tensors.insert(
            format!("{name}.lora_B.weight"),
            Tensor::from_vec(b.clone(), (*out, rank), &Device::Cpu).unwrap(),
        );
        values.insert(m.to_string(), (a, b));
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    values
}

/// The base checkpoint with W + scale · B A written in, computed in f64.
fn merged_checkpoint(
    base: &Path,
    values: &HashMap<String, (Vec<f32>, Vec<f32>)>,
    rank: usize,
    scale: f64,
) -> tempfile::TempDir {
    let d = tempdir();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(base.join(f), d.path().join(f)).unwrap();
    }
    let mut ts = load_tensors(&base.join("model.safetensors"));
    for (m, out, inp) in TARGETS {
        let (a, b) = &values[m];
        let key = format!("{m}.weight");
        let w: Vec<f32> = ts[&key].flatten_all().unwrap().to_vec1().unwrap();
        let mut merged = vec![0f32; out * inp];
        for o in 0..out {
            for i in 0..inp {
                let mut acc = 0f64;
                for r in 0..rank {
                    acc += b[o * rank + r] as f64 * a[r * inp + i] as f64;
                }
                merged[o * inp + i] = (w[o * inp + i] as f64 + scale * acc) as f32;
            }
        }
        ts.insert(
            key,
            Tensor::from_vec(merged, (out, inp), &Device::Cpu).unwrap(),
        );
    }
    candle_core::safetensors::save(&ts, d.path().join("model.safetensors")).unwrap();
    d
}

fn logits(model: &Path, adapter: Option<&Path>) -> Tensor {
    let e = wildlong::models::load_engine_with_adapter(
        model.to_str().unwrap(),
        adapter,
        &root().join("models"),
        &EngineConfig::default(),
    )
    .unwrap();
    full_logits(&e.model, &[3, 17, 200, 45, 9, 120, 77, 1]).unwrap()
}

#[test]
fn merged_adapter_equals_a_checkpoint_merged_by_the_formula() {
    let base = tiny_fixture("llama3");
    for (rank, alpha, rslora) in [(2, 8.0, false), (4, 8.0, true)] {
        let ad = tempdir();
        let values = write_adapter(ad.path(), rank, alpha, rslora, false, &TARGETS);
        let scale = if rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        };
        let merged = merged_checkpoint(base.path(), &values, rank, scale);
        let ours = logits(base.path(), Some(ad.path()));
        let want = logits(merged.path(), None);
        let d = max_abs_diff(&ours, &want);
        assert!(
            d < 1e-4,
            "rank {rank} rslora {rslora}: logits differ by {d}"
        );
        // And the adapter does change the model.
        let plain = logits(base.path(), None);
        assert!(max_abs_diff(&ours, &plain) > 1e-2);
    }
}

#[test]
fn zero_b_adapter_changes_nothing() {
    let base = tiny_fixture("llama3");
    let ad = tempdir();
    write_adapter(ad.path(), 2, 16.0, false, true, &TARGETS);
    assert_eq!(
        max_abs_diff(
            &logits(base.path(), Some(ad.path())),
            &logits(base.path(), None)
        ),
        0.0
    );
}

#[test]
fn adapters_for_other_models_or_unsupported_features_are_refused() {
    let base = tiny_fixture("llama3");
    let load = |ad: &Path| {
        wildlong::models::load_engine_with_adapter(
            base.path().to_str().unwrap(),
            Some(ad),
            &root().join("models"),
            &EngineConfig::default(),
        )
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
    };
    let ad = tempdir();
    write_adapter(
        ad.path(),
        2,
        4.0,
        false,
        false,
        &[("model.layers.7.self_attn.q_proj", 32, 32)],
    );
    let e = load(ad.path()).unwrap_err();
    assert!(e.contains("model.layers.7.self_attn.q_proj"), "{e}");
    let ad = tempdir();
    write_adapter(
        ad.path(),
        2,
        4.0,
        false,
        false,
        &[("model.layers.0.self_attn.q_proj", 16, 32)],
    );
    let e = load(ad.path()).unwrap_err();
    assert!(e.contains("q_proj") && e.contains("(32, 32)"), "{e}");
    let ad = tempdir();
    write_adapter(ad.path(), 2, 4.0, false, false, &TARGETS);
    let cfg = ad.path().join("adapter_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["use_dora"] = true.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = load(ad.path()).unwrap_err();
    assert!(
        e.contains("use_dora") && e.contains("adapter_config.json"),
        "{e}"
    );
}
