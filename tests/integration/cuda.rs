//! wildlong's CUDA kernels (`kernels/*.cu` through `src/kernels/cuda.rs`) against their plain
//! candle references, and the trainer and engine on CUDA against the CPU. Built only with the
//! `cuda` feature and run on a GPU machine (`scripts/gpu_check.sh`):
//!   cargo test --release --features cuda --test integration cuda::
//! Inputs are random; bf16 results are held to tolerances stated per test (bf16 has an 8-bit
//! mantissa: one rounding is ≤ 0.4 % of the value).

use crate::common::*;
use candle_core::{DType, Device, Tensor, Var, D};
use wildlong::engine::llama::attention_mask;
use wildlong::kernels::cuda::{self, Masking};
use wildlong::train::ops;

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA device")
}

fn randn(shape: &[usize], seed: u64, device: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(lcg_values(seed, n, 1.7), shape, &Device::Cpu)
        .unwrap()
        .to_device(device)
        .unwrap()
}

/// Rounds to bf16 and back, so that the reference sees exactly the kernel's inputs.
fn bf16_round(x: &Tensor) -> Tensor {
    x.to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn cpu(x: &Tensor) -> Tensor {
    x.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// The engine's reference: f32 scores, the additive position mask, softmax, `P·V`, per head.
fn positions_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_pos: &[Vec<i64>],
    k_pos: &[Vec<i64>],
    window: Option<usize>,
) -> Tensor {
    let (b, hq, tq, d) = q.dims4().unwrap();
    let hkv = k.dim(1).unwrap();
    let g = hq / hkv;
    let mask = attention_mask(q_pos, k_pos, window, &Device::Cpu).unwrap(); // (b, 1, tq, tk)
    let rep = |x: &Tensor| {
        let (b, h, t, d) = x.dims4().unwrap();
        x.unsqueeze(2)
            .unwrap()
            .repeat((1, 1, g, 1, 1))
            .unwrap()
            .reshape((b, h * g, t, d))
            .unwrap()
    };
    let (k, v) = (rep(k), rep(v));
    let s = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let p = candle_nn::ops::softmax(&s.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
    let _ = (b, tq);
    p.matmul(&v).unwrap()
}

#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
/// Checks the flash forward on (b, hq, hkv, tq, tk, d) with per-row positions (`pad[r]`
/// leading padding keys in row r, the queries the last tq slots) and an optional window.
fn check_positions(
    b: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
    pad: &[usize],
    window: Option<usize>,
) {
    let dev = gpu();
    let q = bf16_round(&randn(&[b, hq, tq, d], 1, &Device::Cpu));
    let k = bf16_round(&randn(&[b, hkv, tk, d], 2, &Device::Cpu));
    let v = bf16_round(&randn(&[b, hkv, tk, d], 3, &Device::Cpu));
    let k_pos: Vec<Vec<i64>> = (0..b)
        .map(|r| {
            (0..tk)
                .map(|j| if j < pad[r] { -1 } else { (j - pad[r]) as i64 })
                .collect()
        })
        .collect();
    let q_pos: Vec<Vec<i64>> = k_pos.iter().map(|r| r[tk - tq..].to_vec()).collect();
    let reference = positions_reference(&q, &k, &v, &q_pos, &k_pos, window);
    let m = Masking::positions(&q_pos, &k_pos, window, &dev).unwrap();
    let bf = |x: &Tensor| x.to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap();
    let (o, lse) =
        cuda::flash_attention(&bf(&q), &bf(&k), &bf(&v), &m, 1.0 / (d as f32).sqrt()).unwrap();
    let (o, lse) = (cpu(&o), cpu(&lse));
    for r in 0..b {
        for i in 0..tq {
            let padded = q_pos[r][i] < 0;
            let ours = o.narrow(0, r, 1).unwrap().narrow(2, i, 1).unwrap();
            let want = reference.narrow(0, r, 1).unwrap().narrow(2, i, 1).unwrap();
            if padded {
                // A query that sees no key gets zeros (the engine ignores its output).
                assert_eq!(max_abs(&ours), 0.0, "padded row {r}/{i} not zero");
                continue;
            }
            let diff = max_abs_diff(&ours, &want);
            assert!(diff < 2e-2, "row {r} query {i}: |Δ| = {diff} (b {b}, hq {hq}, hkv {hkv}, tq {tq}, tk {tk}, d {d}, window {window:?})");
            let l = lse
                .narrow(0, r, 1)
                .unwrap()
                .narrow(2, i, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(
                l.iter().all(|x| x.is_finite()),
                "row {r} query {i}: lse {l:?}"
            );
        }
    }
}

#[test]
fn flash_forward_causal_prefill_matches_the_reference() {
    // Lengths that are not multiples of the 64-row / 32-key tiles; GQA 4:1 and 2:1; both head sizes.
    check_positions(1, 8, 2, 77, 77, 64, &[0], None);
    check_positions(2, 4, 2, 130, 130, 128, &[0, 0], None);
    check_positions(1, 2, 2, 1, 1, 64, &[0], None);
}

#[test]
fn flash_forward_after_a_cache_with_left_padding_matches_the_reference() {
    // Decode (one query after 300 keys) and a chunked prefill (40 after 130), ragged rows.
    check_positions(3, 8, 2, 1, 300, 128, &[0, 17, 100], None);
    check_positions(3, 4, 1, 40, 170, 64, &[5, 0, 33], None);
    // The first queries of a row that is all padding so far see nothing.
    check_positions(2, 4, 2, 50, 50, 64, &[0, 10], None);
}

#[test]
fn flash_forward_with_a_sliding_window_matches_the_reference() {
    check_positions(2, 4, 2, 97, 97, 64, &[0, 9], Some(16));
    check_positions(1, 4, 2, 3, 200, 128, &[0], Some(33));
}

fn segments_of(lens: &[usize]) -> Vec<u32> {
    lens.iter()
        .enumerate()
        .flat_map(|(s, &n)| std::iter::repeat_n(s as u32, n))
        .collect()
}

/// Packed rows: forward against `train::ops::attention_reference` and the backward kernel
/// against the reference's autograd (f32), for the loss `Σ o ⊙ r`.
fn check_packed(hq: usize, hkv: usize, d: usize, rows: &[Vec<usize>]) {
    let dev = gpu();
    let b = rows.len();
    let t: usize = rows[0].iter().sum();
    let segments: Vec<Vec<u32>> = rows.iter().map(|r| segments_of(r)).collect();
    let q = bf16_round(&randn(&[b, hq, t, d], 11, &Device::Cpu));
    let k = bf16_round(&randn(&[b, hkv, t, d], 12, &Device::Cpu));
    let v = bf16_round(&randn(&[b, hkv, t, d], 13, &Device::Cpu));
    let r = bf16_round(&randn(&[b, hq, t, d], 14, &Device::Cpu));
    // Reference forward and gradients.
    let (qv, kv, vv) = (
        Var::from_tensor(&q).unwrap(),
        Var::from_tensor(&k).unwrap(),
        Var::from_tensor(&v).unwrap(),
    );
    let ro = ops::attention_reference(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), &segments)
        .unwrap();
    let g = (&ro * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let (rdq, rdk, rdv) = (
        g.get(qv.as_tensor()).unwrap().clone(),
        g.get(kv.as_tensor()).unwrap().clone(),
        g.get(vv.as_tensor()).unwrap().clone(),
    );
    // Kernels.
    let m = Masking::packed(&segments, &dev).unwrap();
    let bf = |x: &Tensor| x.to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap();
    let scale = 1.0 / (d as f32).sqrt();
    let (o, lse) = cuda::flash_attention(&bf(&q), &bf(&k), &bf(&v), &m, scale).unwrap();
    let fwd = max_abs_diff(&cpu(&o), &ro);
    assert!(fwd < 2e-2, "packed forward |Δ| = {fwd}");
    let (dq, dk, dv) =
        cuda::flash_attention_backward(&bf(&q), &bf(&k), &bf(&v), &o, &bf(&r), &lse, &m, scale)
            .unwrap();
    for (name, ours, want) in [("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)] {
        let ours = cpu(&ours.contiguous().unwrap());
        let rel = max_abs_diff(&ours, &want) / max_abs(&want).max(1e-6);
        assert!(
            rel < 3e-2,
            "{name}: relative |Δ| = {rel} (hq {hq}, hkv {hkv}, d {d}, rows {rows:?})"
        );
    }
}

#[test]
fn flash_packed_forward_and_backward_match_the_reference() {
    // Ragged documents, lengths off the tile sizes, GQA, both head sizes, batch 2.
    check_packed(4, 2, 64, &[vec![30, 50, 21]]);
    check_packed(8, 2, 128, &[vec![70]]);
    check_packed(4, 1, 64, &[vec![13, 1, 66, 20], vec![100]]);
    check_packed(2, 2, 128, &[vec![5, 130, 2]]);
}

#[test]
fn the_training_attention_op_on_cuda_matches_the_cpu_op_with_gradients() {
    let dev = gpu();
    let segments = vec![segments_of(&[40, 57])];
    let mk = |seed, h| bf16_round(&randn(&[1, h, 97, 64], seed, &Device::Cpu));
    let (q, k, v) = (mk(21, 4), mk(22, 2), mk(23, 2));
    let run = |device: &Device| {
        let vars: Vec<Var> = [&q, &k, &v]
            .iter()
            .map(|x| Var::from_tensor(&x.to_device(device).unwrap()).unwrap())
            .collect();
        let o = ops::chunked_attention(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
            &segments,
            32,
        )
        .unwrap();
        let r = mk(24, 4).to_device(device).unwrap();
        let g = (&o * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let grads: Vec<Tensor> = vars
            .iter()
            .map(|v| cpu(g.get(v.as_tensor()).unwrap()))
            .collect();
        (cpu(&o), grads)
    };
    let (o_cpu, g_cpu) = run(&Device::Cpu);
    let (o_gpu, g_gpu) = run(&dev);
    assert!(max_abs_diff(&o_cpu, &o_gpu) < 2e-2);
    for (a, b) in g_cpu.iter().zip(&g_gpu) {
        let rel = max_abs_diff(a, b) / max_abs(a).max(1e-6);
        assert!(rel < 3e-2, "gradient relative |Δ| = {rel}");
    }
}

#[test]
fn rms_norm_forward_and_backward_match_the_reference() {
    let dev = gpu();
    for (n, d) in [(37, 576), (5, 4096), (3, 8192), (64, 100)] {
        let x = randn(&[n, d], 31, &Device::Cpu);
        let w = randn(&[d], 32, &Device::Cpu);
        let r = randn(&[n, d], 33, &Device::Cpu);
        let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let y = ops::rms_norm_reference(xv.as_tensor(), wv.as_tensor(), 1e-5).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let ours = cuda::rms_norm(
            &x.to_device(&dev).unwrap(),
            &w.to_device(&dev).unwrap(),
            1e-5,
        )
        .unwrap();
        assert!(max_abs_diff(&cpu(&ours), &y) < 1e-4, "forward ({n}, {d})");
        let (dx, dw) = cuda::rms_norm_backward(
            &x.to_device(&dev).unwrap(),
            &w.to_device(&dev).unwrap(),
            &r.to_device(&dev).unwrap(),
            1e-5,
        )
        .unwrap();
        let rdx = g.get(xv.as_tensor()).unwrap();
        let rdw = g.get(wv.as_tensor()).unwrap();
        assert!(
            max_abs_diff(&cpu(&dx), rdx) / max_abs(rdx) < 1e-4,
            "dx ({n}, {d})"
        );
        assert!(
            max_abs_diff(&cpu(&dw), rdw) / max_abs(rdw) < 1e-4,
            "dw ({n}, {d})"
        );
    }
}

#[test]
fn rope_matches_the_cpu_op_in_both_layouts_and_its_inverse_undoes_it() {
    use wildlong::engine::rope::{RopeConfig, RopeLayout, RopeScaling};
    let dev = gpu();
    for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
        let cfg = RopeConfig {
            theta: 500000.0,
            dim: 64,
            max_position_embeddings: 131072,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
            layout,
            freq_factors: None,
        };
        let positions: Vec<Vec<u32>> =
            vec![(0..45).map(|p| p * 700).collect(), (0..45).rev().collect()];
        let (cos, sin) = cfg.cos_sin(&positions, &Device::Cpu).unwrap();
        let x = randn(&[2, 3, 45, 64], 41, &Device::Cpu);
        let want = ops::rope(&x, &cos, &sin, layout).unwrap();
        let il = matches!(layout, RopeLayout::Interleaved);
        let (xg, cg, sg) = (
            x.to_device(&dev).unwrap(),
            cos.to_device(&dev).unwrap(),
            sin.to_device(&dev).unwrap(),
        );
        let y = cuda::rope(&xg, &cg, &sg, il, false).unwrap();
        assert!(max_abs_diff(&cpu(&y), &want) < 1e-5, "{layout:?}");
        let back = cuda::rope(&y, &cg, &sg, il, true).unwrap();
        assert!(max_abs_diff(&cpu(&back), &x) < 1e-5, "{layout:?} inverse");
        let yb = cuda::rope(&xg.to_dtype(DType::BF16).unwrap(), &cg, &sg, il, false).unwrap();
        assert!(max_abs_diff(&cpu(&yb), &want) < 3e-2, "{layout:?} bf16");
    }
}

#[test]
fn cross_entropy_rows_match_log_softmax() {
    let dev = gpu();
    for (c, v) in [(7, 1000), (3, 128256), (1, 5)] {
        let z = (randn(&[c, v], 51, &Device::Cpu) * 4.0).unwrap();
        let targets: Vec<i64> = (0..c).map(|i| ((i * 7919 + 3) % v) as i64).collect();
        let (loss, dz) =
            cuda::cross_entropy_rows(&z.to_device(&dev).unwrap(), &targets, true).unwrap();
        let logp = candle_nn::ops::log_softmax(&z, D::Minus1).unwrap();
        let p = logp.exp().unwrap();
        let lv = cpu(&loss).to_vec1::<f32>().unwrap();
        let dzc = cpu(&dz.unwrap());
        for (i, &t) in targets.iter().enumerate() {
            let want = -logp
                .get(i)
                .unwrap()
                .get(t as usize)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                (lv[i] - want).abs() < 1e-3 * want.abs().max(1.0),
                "row {i}: {} vs {want}",
                lv[i]
            );
        }
        let onehot: Vec<f32> = (0..c * v)
            .map(|j| (j % v == targets[j / v] as usize) as u8 as f32)
            .collect();
        let want = (p - Tensor::from_vec(onehot, (c, v), &Device::Cpu).unwrap()).unwrap();
        assert!(max_abs_diff(&dzc, &want) < 1e-5, "dz ({c}, {v})");
    }
}

fn tiny_spec() -> TinySpec {
    // Head size 64 so that the flash kernels run.
    TinySpec {
        hidden: 128,
        intermediate: 256,
        heads: 2,
        kv_heads: 1,
        vocab: 300,
        max_pos: 512,
        ..Default::default()
    }
}

#[test]
fn the_trainer_on_cuda_gives_the_cpu_loss_and_gradients() {
    use wildlong::train::model::{self, LoraSpec, Rows, TrainOptions, PROJECTIONS};
    let d = tiny_random(&tiny_spec(), 5);
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: PROJECTIONS.map(String::from).to_vec(),
        seed: 1,
        dropout: 0.1,
    };
    let tokens: Vec<Vec<u32>> = vec![(0..150).map(|i| (i * 37 % 300) as u32).collect()];
    let segments = vec![segments_of(&[60, 90])];
    let positions: Vec<Vec<u32>> = vec![(0..60).chain(0..90).collect()];
    let targets: Vec<i64> = (0..150)
        .map(|i| {
            if i % 5 == 0 {
                ops::IGNORE
            } else {
                (i * 11 % 300) as i64
            }
        })
        .collect();
    let run = |device: Device, checkpoint: bool| {
        let o = TrainOptions {
            lora: Some(spec.clone()),
            full: false,
            base_dtype: DType::BF16,
            device,
        };
        let mut m = model::load_with(
            d.path().to_str().unwrap(),
            &root().join("models"),
            &o,
            &Default::default(),
        )
        .unwrap()
        .model;
        m.checkpoint_layers = checkpoint;
        m.loss_chunk = 64;
        // Non-zero B so that every adapter tensor gets a gradient.
        for (i, (name, var)) in m.trainable().into_iter().enumerate() {
            if name.ends_with("lora_B.weight") {
                let v = lcg_values(100 + i as u64, var.elem_count(), 0.2);
                var.set(
                    &Tensor::from_vec(v, var.dims(), &Device::Cpu)
                        .unwrap()
                        .to_device(var.device())
                        .unwrap(),
                )
                .unwrap();
            }
        }
        m.set_dropout_seed(Some(9));
        let rows = Rows {
            tokens: &tokens,
            positions: &positions,
            segments: &segments,
        };
        let (loss, g) = m.loss_and_grads(&rows, &targets).unwrap();
        let grads: Vec<(String, Tensor)> = m
            .trainable()
            .into_iter()
            .map(|(n, v)| {
                let t = cpu(g
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{n}: no gradient")));
                (n, t)
            })
            .collect();
        (loss, grads)
    };
    let (l_cpu, g_cpu) = run(Device::Cpu, false);
    for checkpoint in [false, true] {
        let (l_gpu, g_gpu) = run(gpu(), checkpoint);
        assert!(
            (l_cpu - l_gpu).abs() / l_cpu.abs() < 1e-2,
            "loss {l_cpu} vs {l_gpu}"
        );
        for ((n, a), (_, b)) in g_cpu.iter().zip(&g_gpu) {
            let rel = max_abs_diff(a, b) / max_abs(a).max(1e-6);
            assert!(
                rel < 5e-2,
                "{n}: relative |Δ| = {rel} (checkpoint {checkpoint})"
            );
        }
    }
}

#[test]
fn the_engine_on_cuda_gives_the_cpu_logits_and_padding_changes_no_row() {
    use wildlong::engine::llama::{full_logits, Cache};
    let d = tiny_random(&tiny_spec(), 6);
    let load = |device: &str, dtype: &str| {
        let cfg = wildlong::engine::config::EngineConfig {
            device: device.into(),
            dtype: dtype.into(),
            ..Default::default()
        };
        wildlong::models::load_engine(d.path().to_str().unwrap(), &root().join("models"), &cfg)
            .unwrap()
            .model
    };
    let tokens: Vec<u32> = (0..200).map(|i| (i * 13 % 300) as u32).collect();
    let want = full_logits(&load("cpu", "f32"), &tokens).unwrap();
    let g = load("cuda", "bf16");
    let got = cpu(&full_logits(&g, &tokens).unwrap());
    let rel = max_abs_diff(&got, &want) / max_abs(&want);
    assert!(rel < 5e-2, "logits relative |Δ| = {rel}");
    // A ragged batch: row 1 left-padded by 50; its last logits equal the unpadded run's.
    let short = &tokens[..150];
    let mut cache = Cache::new(g.config(), 2);
    let mut ids = tokens.clone();
    ids.extend(std::iter::repeat_n(0u32, 50));
    ids.extend_from_slice(short);
    let pos = vec![
        (0..200).collect::<Vec<i64>>(),
        (0..50).map(|_| -1).chain(0..150).collect(),
    ];
    let x = Tensor::from_vec(ids, (2, 200), g.device()).unwrap();
    let h = g.forward(&x, &pos, &mut cache).unwrap();
    let last = cpu(&g.last_logits(&h).unwrap());
    let alone = cpu(&full_logits(&g, short).unwrap()).get(149).unwrap();
    let rel = max_abs_diff(&last.get(1).unwrap(), &alone) / max_abs(&alone);
    assert!(rel < 2e-2, "padded row relative |Δ| = {rel}");
}
