//! Fast paths against their plain references: the packed quantized-weight kernels, attention (dense and paged), and the
//! CUDA attention kernels' indexing emulated on the CPU.

use crate::common::lcg_values;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use wildlong::engine::packed::{matmul, matmul_all_isas, matmul_reference, PackedWeight};

fn packed(kind: GgmlDType, n: usize, k: usize, seed: u64) -> (PackedWeight, QTensor) {
    let w = Tensor::from_vec(lcg_values(seed, n * k, 1.0), (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, kind).unwrap();
    (
        PackedWeight::from_qtensor(&q)
            .unwrap()
            .expect("supported block type"),
        q,
    )
}

#[test]
fn block_decoding_equals_candles_dequantize() {
    for kind in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let (p, q) = packed(kind, 7, 96, 1);
        let want = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(p.dequantize(), want, "{kind:?}");
    }
}

#[test]
fn every_instruction_set_equals_the_reference() {
    for kind in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for (n, k) in [(1, 32), (45, 96), (130, 576)] {
            let (p, _) = packed(kind, n, k, 2);
            for m in [1, 2, 3, 4, 5, 8, 10, 12, 14, 16, 17, 33] {
                let x = lcg_values(9 + m as u64, m * k, 2.0);
                let want = matmul_reference(&x, m, &p);
                let mut all = matmul_all_isas(&x, m, &p).unwrap();
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2") {
                    assert!(
                        all.len() >= 2,
                        "the AVX2 path must be exercised on this machine"
                    );
                }
                all.push(("default", matmul(&x, m, &p).unwrap()));
                for (name, got) in all {
                    let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
                    let worst = want
                        .iter()
                        .zip(&got)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        worst / scale < 1e-5,
                        "{kind:?} {name} n={n} k={k} m={m}: {worst}"
                    );
                }
            }
        }
    }
}

#[test]
fn unsupported_block_types_are_left_to_candle() {
    let w = Tensor::from_vec(lcg_values(3, 4 * 256, 1.0), (4, 256), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
    assert!(PackedWeight::from_qtensor(&q).unwrap().is_none());
    assert!(matmul(&[0.0; 10], 1, &packed(GgmlDType::Q8_0, 2, 32, 1).0).is_err());
}

#[test]
fn fused_attention_equals_the_candle_reference_with_padding_and_windows() {
    use std::sync::Arc;
    use wildlong::engine::attention::{attention, attention_reference};
    use wildlong::engine::llama::attention_mask;
    let (b, kvh, g, d) = (3, 2, 3, 16);
    for (t, kv, window) in [
        (1, 1, None),
        (1, 40, None),
        (2, 33, Some(5)),
        (4, 70, None),
        (5, 9, Some(3)),
        // Many query rows: the prefill path (GEMMs + in-place masked softmax).
        (24, 24, None),
        (20, 57, None),
        (40, 90, Some(17)),
        // More query rows than one prefill block (g * t = 300 > 256).
        (100, 120, None),
    ] {
        // Row 0 unpadded, row 1 left-padded by 3, row 2 padded by 7 (keys and queries).
        let k_pos: Vec<Vec<i64>> = [0i64, 3, 7]
            .iter()
            .map(|&pad| {
                (0..kv as i64)
                    .map(|j| if j < pad { -1 } else { j - pad })
                    .collect()
            })
            .collect();
        let q_pos: Vec<Vec<i64>> = k_pos.iter().map(|r| r[kv - t..].to_vec()).collect();
        let mask = attention_mask(&q_pos, &k_pos, window, &Device::Cpu).unwrap();
        let host = Arc::new(mask.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let q = Tensor::from_vec(
            lcg_values(1, b * kvh * g * t * d, 1.0),
            (b, kvh, g * t, d),
            &Device::Cpu,
        )
        .unwrap();
        // Keys and values as strided views into a larger cache, as the model passes them.
        let cap = kv + 5;
        let kc = Tensor::from_vec(
            lcg_values(2, b * kvh * cap * d, 2.0),
            (b, kvh, cap, d),
            &Device::Cpu,
        )
        .unwrap();
        let vc = Tensor::from_vec(
            lcg_values(3, b * kvh * cap * d, 1.0),
            (b, kvh, cap, d),
            &Device::Cpu,
        )
        .unwrap();
        let (k, v) = (kc.narrow(2, 0, kv).unwrap(), vc.narrow(2, 0, kv).unwrap());
        let want = attention_reference(&q, &k, &v, &mask).unwrap();
        let got = attention(&q, &k, &v, &mask, &host).unwrap();
        let diff = crate::common::max_abs_diff(&want, &got);
        assert!(diff < 1e-5, "t={t} kv={kv} window={window:?}: {diff}");
    }
}

#[test]
fn paged_attention_over_shuffled_block_tables_equals_dense_attention() {
    use wildlong::engine::attention::attention_reference;
    use wildlong::engine::llama::{attention_mask, PagedBatch, SeqChunk};
    use wildlong::engine::paged_attention::{paged_attention, paged_attention_reference};
    let (kvh, g, d, bs) = (2, 3, 16, 4);
    let h = kvh * g;
    let num_blocks = 64;
    // (cached positions, new tokens): decode rows, grammar-forced runs, prefill chunks
    // (more than the fused path takes), one across many blocks.
    let shapes = [(0, 1), (9, 1), (13, 3), (0, 40), (22, 17), (70, 1), (5, 9)];
    for window in [None, Some(6)] {
        // Block tables from a shuffled pool: block ids in no particular order.
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        let mut state = 7u64;
        for i in (1..ids.len()).rev() {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ids.swap(i, (state >> 33) as usize % (i + 1));
        }
        let mut next = ids.into_iter();
        let seqs: Vec<SeqChunk> = shapes
            .iter()
            .map(|&(start, len)| SeqChunk {
                start,
                len,
                blocks: (0..(start + len).div_ceil(bs))
                    .map(|_| next.next().unwrap())
                    .collect(),
                last_hidden: true,
            })
            .collect();
        let batch = PagedBatch {
            seqs,
            block_size: bs,
        };
        let t_all = batch.tokens();
        let rows = num_blocks * kvh * bs;
        let k_rows = Tensor::zeros((rows, d), DType::F32, &Device::Cpu).unwrap();
        let v_rows = Tensor::zeros((rows, d), DType::F32, &Device::Cpu).unwrap();
        let q = Tensor::from_vec(
            lcg_values(11, h * t_all * d, 1.0),
            (1, h, t_all, d),
            &Device::Cpu,
        )
        .unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        // Each sequence's dense keys/values, written into the pool at its table's slots.
        let mut want = Vec::new();
        let mut off = 0;
        for (s, seq) in batch.seqs.iter().enumerate() {
            let ctx = seq.start + seq.len;
            let k = Tensor::from_vec(
                lcg_values(100 + s as u64, ctx * kvh * d, 2.0),
                (ctx, kvh, d),
                &Device::Cpu,
            )
            .unwrap();
            let v = Tensor::from_vec(
                lcg_values(200 + s as u64, ctx * kvh * d, 1.0),
                (ctx, kvh, d),
                &Device::Cpu,
            )
            .unwrap();
            for p in 0..ctx {
                for hh in 0..kvh {
                    let row = batch.row(s, p, hh, kvh);
                    let kr = k
                        .narrow(0, p, 1)
                        .unwrap()
                        .narrow(1, hh, 1)
                        .unwrap()
                        .reshape((1, d))
                        .unwrap();
                    let vr = v
                        .narrow(0, p, 1)
                        .unwrap()
                        .narrow(1, hh, 1)
                        .unwrap()
                        .reshape((1, d))
                        .unwrap();
                    k_rows.slice_set(&kr, 0, row).unwrap();
                    v_rows.slice_set(&vr, 0, row).unwrap();
                }
            }
            let kd = k
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let vd = v
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let qs = (q.narrow(2, off, seq.len).unwrap().contiguous().unwrap() * scale)
                .unwrap()
                .reshape((1, kvh, g * seq.len, d))
                .unwrap();
            let q_pos = vec![(seq.start as i64..ctx as i64).collect::<Vec<_>>()];
            let k_pos = vec![(0..ctx as i64).collect::<Vec<_>>()];
            let mask = attention_mask(&q_pos, &k_pos, window, &Device::Cpu).unwrap();
            let o = attention_reference(&qs, &kd, &vd, &mask).unwrap(); // (1, kvh, g*len, d)
            want.push(
                o.reshape((h, seq.len, d))
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap(),
            );
            off += seq.len;
        }
        let want = Tensor::cat(&want, 0).unwrap(); // (T, h, d)
        let k_pool = k_rows.reshape((num_blocks, kvh, bs, d)).unwrap();
        let v_pool = v_rows.reshape((num_blocks, kvh, bs, d)).unwrap();
        let reference =
            paged_attention_reference(&q, &k_pool, &v_pool, &batch, window, scale).unwrap();
        let fast = paged_attention(&q, &k_pool, &v_pool, &batch, window, scale).unwrap();
        assert_eq!(fast.dims(), &[t_all, h, d]);
        let d_ref = crate::common::max_abs_diff(&want, &reference);
        let d_fast = crate::common::max_abs_diff(&want, &fast);
        assert!(d_ref < 1e-5, "window {window:?}: reference {d_ref}");
        assert!(
            d_fast < 1e-5,
            "window {window:?}: fused/GEMM paths {d_fast}"
        );
    }
}

#[test]
fn vectorised_exp_matches_f64_exp() {
    use wildlong::engine::attention::{exp_approx, exp_sub_sum};
    let mut worst = 0f64;
    for i in 0..=200_000 {
        let x = -87.0 * i as f32 / 200_000.0;
        let want = (x as f64).exp();
        let got = exp_approx(x) as f64;
        worst = worst.max(((got - want) / want).abs());
    }
    assert!(worst < 3e-7, "relative error {worst}");
    assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_approx(-100.0), 0.0);
    assert_eq!(exp_approx(0.0), 1.0);
    // The row kernel (all widths and the remainder loop) against f64.
    let mut xs: Vec<f32> = lcg_values(9, 37, 10.0);
    xs[5] = f32::NEG_INFINITY;
    let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let want: Vec<f64> = xs.iter().map(|&x| ((x - max) as f64).exp()).collect();
    let z = exp_sub_sum(&mut xs, max);
    for (g, w) in xs.iter().zip(&want) {
        assert!((*g as f64 - w).abs() <= 3e-7 * w + 1e-30, "{g} vs {w}");
    }
    assert!((z as f64 - want.iter().sum::<f64>()).abs() < 1e-5);
}

/// The CUDA flash-attention kernels' fragment indexing, emulated lane by lane on the CPU
/// (`scripts/emulate_flash_attn.py`, numpy from scripts/test.sh's target/pyenv) against a
/// plain reference: forward, log-sum-exp and gradients for GQA, packed segments, a cache
/// offset, left padding and a window. The kernels themselves run in `cuda.rs` on a GPU.
#[test]
fn flash_attention_fragment_indexing_emulated_on_the_cpu() {
    let py = std::env::var_os("WILDLONG_LLAMA_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::common::root().join("target/pyenv/bin/python"));
    assert!(
        py.is_file(),
        "{} is missing: scripts/test.sh installs it (numpy comes with llama-cpp-python)",
        py.display()
    );
    let out = std::process::Command::new(&py)
        .arg(crate::common::root().join("scripts/emulate_flash_attn.py"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ok ")).count(),
        5,
        "{text}"
    );
}

#[test]
fn int8_activation_matmul_equals_its_integer_reference_and_approximates_the_weights() {
    use wildlong::engine::packed_int8::{self, Int8Weight};
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512vnni") {
        assert!(
            packed_int8::has_vnni(),
            "the VNNI path must be exercised on this machine"
        );
    }
    for kind in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        // 37 rows: a last lane group with 5 real rows; 48: whole groups.
        for (n, k) in [(37, 96), (48, 32), (16, 160)] {
            let (p, _) = packed(kind, n, k, 5 + n as u64);
            let w = Int8Weight::from_packed(&p);
            assert_eq!(w.dequantize(), p.dequantize(), "{kind:?} repacking");
            for m in [1, 3, 16, 17, 40] {
                let x = lcg_values(21 + m as u64, m * k, 2.0);
                let want = packed_int8::matmul_reference(&x, m, &w);
                let got = packed_int8::matmul(&x, m, &w).unwrap();
                // Same integer products and the same f32 operations: equal bit for bit.
                assert_eq!(got, want, "{kind:?} n={n} k={k} m={m}");
                // 8-bit activations: within a fraction of a percent of the exact product.
                let exact = matmul_reference(&x, m, &p);
                let scale = exact.iter().fold(1f32, |a, v| a.max(v.abs()));
                let worst = exact
                    .iter()
                    .zip(&got)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst / scale < 0.01,
                    "{kind:?} n={n} k={k} m={m}: {worst} of {scale}"
                );
                assert!(
                    worst > 0.0,
                    "{kind:?}: 8-bit activations cannot be exact here"
                );
            }
        }
    }
}
