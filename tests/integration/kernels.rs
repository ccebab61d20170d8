//! Fast paths against their plain references: the packed quantized-weight kernels.

use crate::common::lcg_values;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use wildlong::engine::packed::{matmul, matmul_portable, matmul_reference, PackedWeight};

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
fn simd_and_portable_kernels_equal_the_reference() {
    for kind in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for (n, k) in [(1, 32), (45, 96), (130, 576)] {
            let (p, _) = packed(kind, n, k, 2);
            for m in [1, 3, 4, 5, 17] {
                let x = lcg_values(9 + m as u64, m * k, 2.0);
                let want = matmul_reference(&x, m, &p);
                for (name, got) in [
                    ("simd", matmul(&x, m, &p).unwrap()),
                    ("portable", matmul_portable(&x, m, &p).unwrap()),
                ] {
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
