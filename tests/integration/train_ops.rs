//! The autograd-safe training ops (`src/train/ops.rs`): forward against plain composed
//! references in f64, gradients against the references' autograd and against central finite
//! differences of the f64 references, on random inputs. The loss is `Σ y ⊙ r` for a fixed
//! random `r`, so every output element carries a different weight.

use candle_core::{DType, Device, Tensor, Var};
use wildlong::engine::rope::{RopeConfig, RopeLayout, RopeScaling};
use wildlong::train::ops::{self, IGNORE};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    crate::common::max_abs_diff(a, b) as f64
}

/// Checks `ours` (f32) against `reference` (f64) for inputs `xs`: outputs, gradients of
/// every input in `trained` (None = no gradient expected), and finite differences.
fn check(
    xs: &[Tensor],
    trained: &[bool],
    ours: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
    tol: f64,
) {
    // Ours, f32.
    let vars: Vec<Var> = xs
        .iter()
        .map(|x| Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap())
        .collect();
    let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = ours(&inputs);
    let r = randn(y.dims(), 99);
    let loss = (y.to_dtype(DType::F64).unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    // Reference, f64.
    let rvars: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
    let rin: Vec<Tensor> = rvars.iter().map(|v| v.as_tensor().clone()).collect();
    let ry = reference(&rin);
    assert!(
        max_abs_diff(&y, &ry) < tol,
        "forward: {}",
        max_abs_diff(&y, &ry)
    );
    let rloss = (&ry * &r).unwrap().sum_all().unwrap();
    let rgrads = rloss.backward().unwrap();
    let f = |inp: &[Tensor]| -> f64 {
        (reference(inp) * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    for (i, ((v, rv), &t)) in vars.iter().zip(&rvars).zip(trained).enumerate() {
        let g = grads.get(v.as_tensor());
        if !t {
            assert!(g.is_none(), "input {i} must get no gradient");
            continue;
        }
        let g = g.unwrap_or_else(|| panic!("input {i} got no gradient"));
        let rg = rgrads.get(rv.as_tensor()).unwrap();
        let d = max_abs_diff(g, rg);
        assert!(d < tol, "input {i}: gradient off the reference by {d}");
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                > 0.0
        );
        // Central differences on a few coordinates of the f64 reference.
        let flat = xs[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let gflat = g
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for k in [0, flat.len() / 3, flat.len() - 1] {
            let eps = 1e-5;
            let at = |delta: f64| {
                let mut p = flat.clone();
                p[k] += delta;
                let mut inp = xs.to_vec();
                inp[i] = Tensor::from_vec(p, xs[i].dims(), &Device::Cpu).unwrap();
                f(&inp)
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            assert!(
                (fd - gflat[k]).abs() < tol * (1.0 + fd.abs()),
                "input {i}[{k}]: finite difference {fd} vs gradient {}",
                gflat[k]
            );
        }
    }
}

#[test]
fn rms_norm_backward_matches_the_reference_and_finite_differences() {
    let x = randn(&[2, 3, 16], 1);
    let w = (randn(&[16], 2) + 1.0).unwrap();
    check(
        &[x, w],
        &[true, true],
        |t| ops::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        |t| ops::rms_norm_reference(&t[0], &t[1], 1e-5).unwrap(),
        1e-4,
    );
}

#[test]
fn softmax_backward_matches_the_reference_and_finite_differences() {
    let x = (randn(&[4, 5, 9], 3) * 3.0).unwrap();
    check(
        &[x],
        &[true],
        |t| ops::softmax_last_dim(&t[0]).unwrap(),
        |t| candle_nn::ops::softmax(&t[0], candle_core::D::Minus1).unwrap(),
        1e-5,
    );
    // A fully masked row gives zeros, not NaN.
    let m = Tensor::new(&[[f32::NEG_INFINITY; 3]], &Device::Cpu).unwrap();
    assert_eq!(
        ops::softmax_last_dim(&m).unwrap().to_vec2::<f32>().unwrap(),
        [[0.0; 3]]
    );
}

#[test]
fn rope_backward_is_the_inverse_rotation_in_both_layouts() {
    for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
        let cfg = RopeConfig {
            theta: 10000.0,
            dim: 8,
            max_position_embeddings: 64,
            scaling: RopeScaling::Default,
            layout,
            freq_factors: None,
        };
        // Two rows with different positions (packed documents restart at 0).
        let (cos, sin) = cfg
            .cos_sin(&[vec![0, 1, 2, 3, 4], vec![7, 8, 0, 1, 2]], &Device::Cpu)
            .unwrap();
        let (cos, sin) = (
            cos.to_dtype(DType::F64).unwrap(),
            sin.to_dtype(DType::F64).unwrap(),
        );
        let x = randn(&[2, 3, 5, 8], 4);
        let cfg2 = cfg.clone();
        check(
            &[x, cos, sin],
            &[true, false, false],
            |t| ops::rope(&t[0], &t[1], &t[2], layout).unwrap(),
            move |t| cfg2.apply_slow(&t[0], &t[1], &t[2]).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn frozen_matmul_gives_no_weight_gradient() {
    let x = randn(&[2, 3, 6], 5);
    let w = randn(&[4, 6], 6);
    check(
        &[x.clone(), w.clone()],
        &[true, false],
        |t| ops::frozen_matmul(&t[0], &t[1]).unwrap(),
        |t| t[0].broadcast_matmul(&t[1].t().unwrap()).unwrap(),
        1e-5,
    );
}

#[test]
fn the_fused_lora_linear_matches_the_composed_one_with_dropout_and_bf16() {
    // x (2, 5, 6), W (4, 6) frozen, A (3, 6), B (4, 3): gradients for x, A and B only.
    let x = randn(&[2, 5, 6], 15);
    let a = randn(&[3, 6], 16);
    let b = randn(&[4, 3], 17);
    let w = randn(&[4, 6], 18);
    for dropout in [None, Some((9u64, 0.3))] {
        let wf = w.to_dtype(DType::F32).unwrap();
        check(
            &[x.clone(), a.clone(), b.clone()],
            &[true, true, true],
            |t| ops::lora_linear(&t[0], &wf, &adapter(&t[1], &t[2], 1.5, dropout)).unwrap(),
            |t| {
                let wd = w.clone();
                ops::lora_linear_reference(&t[0], &wd, &adapter(&t[1], &t[2], 1.5, dropout))
                    .unwrap()
            },
            1e-4,
        );
    }
    // bf16 W: the fused op widens it as the reference does.
    let wb = w.to_dtype(DType::BF16).unwrap();
    let (xf, af, bf) = (
        Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap(),
        a.to_dtype(DType::F32).unwrap(),
        b.to_dtype(DType::F32).unwrap(),
    );
    let ours = ops::lora_linear(&xf, &wb, &adapter(&af, &bf, 2.0, Some((4, 0.1)))).unwrap();
    let want =
        ops::lora_linear_reference(&xf, &wb, &adapter(&af, &bf, 2.0, Some((4, 0.1)))).unwrap();
    assert!(max_abs_diff(&ours, &want) < 1e-5);
}

#[test]
fn a_dropout_mask_drawn_from_an_offset_is_that_stretch_of_the_whole_mask() {
    // The stream is seeked, not replayed: a tile's mask is the rows of the whole input's,
    // at an offset inside a ChaCha block and across block boundaries.
    let whole = ops::dropout_mask(11, 300, 0.4);
    for (from, n) in [(0, 300), (1, 5), (7, 40), (15, 2), (16, 33), (100, 200)] {
        assert_eq!(
            ops::dropout_mask_from(11, from, n, 0.4),
            whole[from..from + n],
            "from {from}"
        );
    }
    assert!(whole.contains(&0.0) && whole.iter().any(|&m| m > 1.0));
    // The fused op on rows 2.. of x with `mask_from` equals those rows of the whole op.
    let f = |t: Tensor| t.to_dtype(DType::F32).unwrap();
    let x = f(randn(&[5, 6], 21));
    let (a, b, w) = (
        f(randn(&[3, 6], 22)),
        f(randn(&[4, 3], 23)),
        f(randn(&[4, 6], 24)),
    );
    let dropout = Some((9u64, 0.3));
    let all = ops::lora_linear(&x, &w, &adapter(&a, &b, 1.5, dropout)).unwrap();
    let tail = ops::lora_linear(
        &x.narrow(0, 2, 3).unwrap(),
        &w,
        &ops::Adapter {
            mask_from: 2 * 6,
            ..adapter(&a, &b, 1.5, dropout)
        },
    )
    .unwrap();
    assert!(max_abs_diff(&tail, &all.narrow(0, 2, 3).unwrap()) < 1e-6);
    let unshifted = ops::lora_linear(
        &x.narrow(0, 2, 3).unwrap(),
        &w,
        &adapter(&a, &b, 1.5, dropout),
    )
    .unwrap();
    assert!(max_abs_diff(&unshifted, &all.narrow(0, 2, 3).unwrap()) > 1e-3);
}

#[test]
fn chunked_cross_entropy_equals_the_full_one_at_every_chunk_size() {
    let h = randn(&[7, 6], 7);
    let w = (randn(&[11, 6], 8) * 2.0).unwrap();
    let targets = [3, IGNORE, 10, 0, IGNORE, 5, 1];
    for chunk in [1, 2, 3, 7, 100] {
        for weight_grad in [false, true] {
            check(
                &[h.clone(), w.clone()],
                &[true, weight_grad],
                |t| ops::chunked_cross_entropy(&t[0], &t[1], &targets, chunk, weight_grad).unwrap(),
                |t| ops::cross_entropy_reference(&t[0], &t[1], &targets).unwrap(),
                1e-4,
            );
        }
    }
    // Bad targets are errors, not panics.
    let e = ops::chunked_cross_entropy(
        &h.to_dtype(DType::F32).unwrap(),
        &w.to_dtype(DType::F32).unwrap(),
        &[0, 1, 2, 11, 0, 0, 0],
        2,
        false,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("target 11 outside the vocabulary of 11"),
        "{e}"
    );
}

#[test]
fn chunked_attention_matches_the_full_one_with_gqa_and_segments() {
    // 4 query heads over 2 KV heads; row 0 packs two documents, row 1 is one document.
    let q = randn(&[2, 4, 7, 4], 11);
    let k = randn(&[2, 2, 7, 4], 12);
    let v = randn(&[2, 2, 7, 4], 13);
    let segments = vec![vec![0, 0, 0, 1, 1, 1, 1], vec![5; 7]];
    check_attention(&[q, k, v], &segments, &[1, 3, 7, 64]);
}

/// [`ops::chunked_attention`] at each block size against the full reference (forward,
/// gradients, finite differences).
fn check_attention(qkv: &[Tensor; 3], segments: &[Vec<u32>], blocks: &[usize]) {
    for &block in blocks {
        check(
            qkv,
            &[true, true, true],
            |t| ops::chunked_attention(&t[0], &t[1], &t[2], segments, block).unwrap(),
            |t| ops::attention_reference(&t[0], &t[1], &t[2], segments).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn chunked_attention_matches_the_full_one_over_long_rows_and_returning_segment_ids() {
    // Rows long enough for the vectorised row kernels (16 lanes and a remainder); row 0 packs
    // three documents, row 1 brings id 0 back after id 1 (key-by-key masking, where id 0's
    // second run still sees its first).
    let (t, d) = (45, 8);
    let q = randn(&[2, 6, t, d], 31);
    let k = randn(&[2, 3, t, d], 32);
    let v = randn(&[2, 3, t, d], 33);
    let packed: Vec<u32> = (0..t as u32)
        .map(|i| (i >= 17) as u32 + (i >= 40) as u32)
        .collect();
    let returning: Vec<u32> = (0..t as u32)
        .map(|i| (10..30).contains(&i) as u32)
        .collect();
    check_attention(&[q, k, v], &[packed, returning], &[16, 45]);
}

#[test]
fn silu_mul_backward_matches_the_reference_and_finite_differences() {
    // Gates out to ±8 (σ saturating both ways); 3 × 37 elements cover the vector lanes and a
    // remainder.
    let g = (randn(&[3, 37], 41) * 8.0).unwrap();
    let u = randn(&[3, 37], 42);
    check(
        &[g, u],
        &[true, true],
        |t| ops::silu_mul(&t[0], &t[1]).unwrap(),
        |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
        1e-5,
    );
}

#[test]
fn packed_documents_attend_as_if_alone() {
    let (q, k, v) = (
        randn(&[1, 2, 7, 4], 21).to_dtype(DType::F32).unwrap(),
        randn(&[1, 1, 7, 4], 22).to_dtype(DType::F32).unwrap(),
        randn(&[1, 1, 7, 4], 23).to_dtype(DType::F32).unwrap(),
    );
    let packed = ops::chunked_attention(&q, &k, &v, &[vec![0, 0, 0, 1, 1, 1, 1]], 2).unwrap();
    for (start, len) in [(0, 3), (3, 4)] {
        let part = |x: &Tensor| x.narrow(2, start, len).unwrap();
        let alone =
            ops::chunked_attention(&part(&q), &part(&k), &part(&v), &[vec![0; len]], 2).unwrap();
        assert!(max_abs_diff(&part(&packed), &alone) < 1e-6);
    }
}

#[test]
fn adamw_schedule_and_clipping_match_pytorch() {
    use wildlong::train::optim::{clip_global_norm, learning_rate, AdamW, AdamWParams};
    // Made by scripts/make_train_optim_fixture.py (torch.optim.AdamW, HF's schedule,
    // clip_grad_norm_).
    let f: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::common::fixture("train/optim.json")).unwrap(),
    )
    .unwrap();
    let t = |v: &serde_json::Value| -> Tensor {
        let flat: Vec<f32> = match v[0].as_array() {
            Some(_) => v
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                })
                .collect(),
            None => v
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
        };
        let shape: Vec<usize> = match v[0].as_array() {
            Some(r) => vec![v.as_array().unwrap().len(), r.len()],
            None => vec![flat.len()],
        };
        Tensor::from_vec(flat, shape, &Device::Cpu).unwrap()
    };
    let h = &f["adamw"];
    let num = |k: &str| h[k].as_f64().unwrap();
    let vars = vec![
        Var::from_tensor(&t(&f["init"]["a"])).unwrap(),
        Var::from_tensor(&t(&f["init"]["b"])).unwrap(),
    ];
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            beta1: num("beta1"),
            beta2: num("beta2"),
            eps: num("eps"),
            weight_decay: num("weight_decay"),
        },
    )
    .unwrap();
    for (k, step) in f["steps"].as_array().unwrap().iter().enumerate() {
        let lr = learning_rate(num("lr"), k, 2, 6, num("min_ratio"));
        assert!(
            (lr - step["lr"].as_f64().unwrap()).abs() < 1e-12,
            "step {k}: lr {lr}"
        );
        let g = &f["grads"][k];
        opt.step(&[t(&g[0]), t(&g[1])], lr).unwrap();
        assert!(
            max_abs_diff(vars[0].as_tensor(), &t(&step["a"])) < 1e-5,
            "step {k}"
        );
        assert!(
            max_abs_diff(vars[1].as_tensor(), &t(&step["b"])) < 1e-5,
            "step {k}"
        );
    }
    let c = &f["clip"];
    let mut grads = vec![t(&f["grads"][5][0]), t(&f["grads"][5][1])];
    let norm = clip_global_norm(&mut grads, c["max_norm"].as_f64().unwrap()).unwrap();
    assert!((norm - c["norm"].as_f64().unwrap()).abs() < 1e-6);
    assert!(max_abs_diff(&grads[0], &t(&c["a"])) < 1e-6);
    assert!(max_abs_diff(&grads[1], &t(&c["b"])) < 1e-6);
    // A non-finite gradient is reported, not applied.
    let mut bad = vec![Tensor::new(&[1f32, f32::NAN], &Device::Cpu).unwrap()];
    assert!(clip_global_norm(&mut bad, 1.0).unwrap().is_nan());
}

fn adapter<'a>(
    a: &'a Tensor,
    b: &'a Tensor,
    scale: f64,
    dropout: Option<(u64, f64)>,
) -> ops::Adapter<'a> {
    ops::Adapter {
        a,
        b,
        scale,
        dropout,
        mask_from: 0,
    }
}
