//! RoPE tables against HF transformers' own init functions, fused vs slow application,
//! and the two layouts against each other.

use crate::common::{fixture, lcg_values, max_abs_diff, sum_sq};
use candle_core::{Device, Tensor};
use wildlong::engine::rope::{RopeConfig, RopeLayout, RopeScaling};

fn cases() -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("rope_hf.json")).unwrap()).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn config(c: &serde_json::Value) -> RopeConfig {
    RopeConfig {
        theta: c["rope_theta"].as_f64().unwrap(),
        dim: c["head_dim"].as_u64().unwrap() as usize,
        max_position_embeddings: c["max_position_embeddings"].as_u64().unwrap() as usize,
        scaling: RopeScaling::from_hf_json(Some(&c["rope_scaling"])).unwrap(),
        layout: RopeLayout::HalfSplit,
        freq_factors: None,
    }
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn inverse_frequencies_match_hf_for_every_scaling_type() {
    let cases = cases();
    assert_eq!(cases.len(), 8);
    let mut kinds = std::collections::BTreeSet::new();
    for c in &cases {
        let cfg = config(c);
        kinds.insert(cfg.scaling.name());
        let seq_len = c["seq_len"].as_u64().map_or(1, |s| s as usize);
        let (inv, attn) = cfg.inv_freq(seq_len);
        let want = floats(&c["inv_freq"]);
        assert_eq!(inv.len(), want.len());
        for (i, (a, b)) in inv.iter().zip(&want).enumerate() {
            let rel = ((*a as f64 - b) / b).abs();
            assert!(rel < 2e-6, "{}: inv_freq[{i}] = {a}, HF {b}", c["name"]);
        }
        let want_attn = c["attention_factor"].as_f64().unwrap();
        assert!(
            (attn as f64 - want_attn).abs() < 1e-6,
            "{}: attention factor {attn} vs {want_attn}",
            c["name"]
        );
    }
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        vec!["default", "dynamic", "linear", "llama3", "yarn"]
    );
}

#[test]
fn cos_sin_tables_match_hf_at_far_positions() {
    for c in cases().iter().filter(|c| c["seq_len"].is_null()) {
        let cfg = config(c);
        let pos: Vec<u32> = c["positions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap() as u32)
            .collect();
        let (cos, sin) = cfg
            .cos_sin(std::slice::from_ref(&pos), &Device::Cpu)
            .unwrap();
        let want_cos: Vec<Vec<f64>> = c["cos"].as_array().unwrap().iter().map(floats).collect();
        let want_sin: Vec<Vec<f64>> = c["sin"].as_array().unwrap().iter().map(floats).collect();
        let cos = cos.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let sin = sin.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        for p in 0..pos.len() {
            // One f32 ulp of an inverse frequency (HF rounds in f32, we in f64) moves the angle
            // by about position × 3e-8 rad.
            let tol = 1e-5 + 6e-8 * pos[p] as f64;
            for i in 0..cos[p].len() {
                assert!(
                    (cos[p][i] as f64 - want_cos[p][i]).abs() < tol,
                    "{} cos pos {} i {i}",
                    c["name"],
                    pos[p]
                );
                assert!(
                    (sin[p][i] as f64 - want_sin[p][i]).abs() < tol,
                    "{} sin pos {} i {i}",
                    c["name"],
                    pos[p]
                );
            }
        }
    }
}

#[test]
fn dynamic_ntk_changes_only_beyond_the_original_context() {
    let cfg = RopeConfig {
        theta: 10000.0,
        dim: 16,
        max_position_embeddings: 64,
        scaling: RopeScaling::Dynamic { factor: 4.0 },
        layout: RopeLayout::HalfSplit,
        freq_factors: None,
    };
    let plain = RopeConfig {
        scaling: RopeScaling::Default,
        ..cfg.clone()
    };
    assert_eq!(cfg.inv_freq(64).0, plain.inv_freq(64).0);
    let (long, _) = cfg.inv_freq(256);
    // base' = base * ((f * L / L0) - (f - 1))^(d / (d - 2)) from the published formula.
    let base = 10000f64 * ((4.0 * 256.0 / 64.0) - 3.0f64).powf(16.0 / 14.0);
    for (i, f) in long.iter().enumerate() {
        let want = 1.0 / base.powf((2 * i) as f64 / 16.0);
        assert!(((*f as f64) - want).abs() / want < 1e-5);
    }
}

#[test]
fn gguf_freq_factors_divide_frequencies() {
    let mut cfg = RopeConfig {
        theta: 500000.0,
        dim: 8,
        max_position_embeddings: 8192,
        scaling: RopeScaling::Default,
        layout: RopeLayout::Interleaved,
        freq_factors: None,
    };
    let (plain, _) = cfg.inv_freq(1);
    cfg.freq_factors = Some(vec![1.0, 2.0, 4.0, 8.0]);
    let (scaled, _) = cfg.inv_freq(1);
    for i in 0..4 {
        assert!((scaled[i] - plain[i] / (1 << i) as f32).abs() < 1e-9);
    }
}

fn random(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    Tensor::from_vec(lcg_values(seed, n, 1.0), shape, &Device::Cpu).unwrap()
}

#[test]
fn fused_rope_equals_slow_reference_in_both_layouts_with_per_row_positions() {
    for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
        let cfg = RopeConfig {
            theta: 10000.0,
            dim: 16,
            max_position_embeddings: 32,
            scaling: RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: None,
                attention_factor: None,
                beta_fast: None,
                beta_slow: None,
                mscale: None,
                mscale_all_dim: None,
                truncate: None,
            },
            layout,
            freq_factors: None,
        };
        let x = random((3, 2, 5, 16), 7);
        let pos = vec![
            vec![0, 1, 2, 3, 4],
            vec![10, 11, 12, 13, 14],
            vec![0, 0, 5, 6, 100_000],
        ];
        let (cos, sin) = cfg.cos_sin(&pos, &Device::Cpu).unwrap();
        let fast = cfg.apply(&x, &cos, &sin).unwrap();
        let slow = cfg.apply_slow(&x, &cos, &sin).unwrap();
        assert!(max_abs_diff(&fast, &slow) < 1e-5, "{layout:?}");
        // Rotation (times the YaRN attention factor) preserves norms per pair.
        let (_, attn) = cfg.inv_freq(1);
        let nx = sum_sq(&x);
        let nf = sum_sq(&fast);
        assert!((nf / (attn * attn) - nx).abs() / nx < 1e-4);
    }
}

#[test]
fn interleaved_layout_is_half_split_under_the_gguf_permutation() {
    // llama.cpp's converter permutes q/k rows so that pair (i, i + d/2) becomes (2i, 2i + 1).
    let d = 8;
    let half = RopeConfig {
        theta: 10000.0,
        dim: d,
        max_position_embeddings: 16,
        scaling: RopeScaling::Default,
        layout: RopeLayout::HalfSplit,
        freq_factors: None,
    };
    let inter = RopeConfig {
        layout: RopeLayout::Interleaved,
        ..half.clone()
    };
    let x = random((1, 1, 4, d), 3);
    let perm: Vec<u32> = (0..d as u32 / 2)
        .flat_map(|i| [i, i + d as u32 / 2])
        .collect();
    let idx = Tensor::new(perm.as_slice(), &Device::Cpu).unwrap();
    let (cos, sin) = half.cos_sin(&[vec![0, 3, 9, 17]], &Device::Cpu).unwrap();
    let a = half
        .apply(&x, &cos, &sin)
        .unwrap()
        .index_select(&idx, 3)
        .unwrap();
    let b = inter
        .apply(
            &x.index_select(&idx, 3).unwrap().contiguous().unwrap(),
            &cos,
            &sin,
        )
        .unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-6);
}

#[test]
fn unsupported_or_incomplete_scaling_is_refused_by_name() {
    let e = RopeScaling::from_hf_json(Some(
        &serde_json::json!({"rope_type": "longrope", "factor": 2.0}),
    ))
    .unwrap_err();
    assert!(e.to_string().contains("longrope"), "{e}");
    let e = RopeScaling::from_hf_json(Some(&serde_json::json!({"type": "linear"}))).unwrap_err();
    assert!(e.to_string().contains("factor"), "{e}");
    let legacy =
        RopeScaling::from_hf_json(Some(&serde_json::json!({"type": "linear", "factor": 2.0})))
            .unwrap();
    assert_eq!(legacy, RopeScaling::Linear { factor: 2.0 });
}
