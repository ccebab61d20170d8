//! Criterion benchmarks of the engine's fast paths against their references, on the default
//! model's decode shapes (576 hidden, 1536 MLP, 49152 vocabulary). Whole-model throughput is
//! `wildlong bench` (and `bash benches/run.sh peers` for the peers).
//!   cargo bench --bench engine

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::sync::Arc;
use wildlong::engine::attention::{attention, attention_reference};
use wildlong::engine::llama::attention_mask;
use wildlong::engine::packed::{matmul, PackedWeight};

fn packed_vs_dense(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_matmul");
    for (n, k) in [(1536usize, 576usize), (576, 1536), (49152, 576)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let x: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
        let xt = Tensor::from_vec(x.clone(), (1, k), &Device::Cpu).unwrap();
        let q41 = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let packed = PackedWeight::from_qtensor(&q41).unwrap().unwrap();
        let dense = q41.dequantize(&Device::Cpu).unwrap();
        let q8 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
        let id = format!("{n}x{k}");
        g.bench_with_input(
            BenchmarkId::new("packed_q4_1_f32_activations", &id),
            &(),
            |b, _| b.iter(|| matmul(&x, 1, &packed).unwrap()),
        );
        g.bench_with_input(BenchmarkId::new("dense_f32_gemm", &id), &(), |b, _| {
            b.iter(|| xt.matmul(&dense.t().unwrap()).unwrap())
        });
        g.bench_with_input(
            BenchmarkId::new("candle_q8_0_q8_activations", &id),
            &(),
            |b, _| b.iter(|| q8.forward(&xt).unwrap()),
        );
    }
    g.finish();
}

/// Each K-quant / 5-bit type held as stored × f32 activations (decode, 1 row; prefill, 512
/// rows through slabs) against candle's QMatMul on the same blocks (8-bit activations) and f32.
fn k_quants_vs_candle(c: &mut Criterion) {
    use wildlong::engine::kquants::{self, RawWeight};
    let mut g = c.benchmark_group("k_quant_matmul");
    let (n, k) = (1536usize, 768usize);
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    for t in [
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
    ] {
        let q = QTensor::quantize(&w, t).unwrap();
        let raw = RawWeight::from_qtensor(&q).unwrap().unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap();
        let qm = QMatMul::from_qtensor(q).unwrap();
        for m in [1usize, 512] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            let id = format!("{t:?}/{m}x{k}x{n}");
            g.bench_with_input(
                BenchmarkId::new("wildlong_f32_activations", &id),
                &(),
                |b, _| b.iter(|| kquants::matmul(&x, m, &raw).unwrap()),
            );
            g.bench_with_input(BenchmarkId::new("candle_qmatmul", &id), &(), |b, _| {
                b.iter(|| qm.forward(&xt).unwrap())
            });
            g.bench_with_input(BenchmarkId::new("dense_f32_gemm", &id), &(), |b, _| {
                b.iter(|| xt.matmul(&dense.t().unwrap()).unwrap())
            });
        }
    }
    g.finish();
}

fn fused_vs_reference_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_attention");
    let (b, kvh, gq, d) = (1, 3, 3, 64);
    for kv in [512usize, 4096] {
        let q = Tensor::randn(0f32, 1.0, (b, kvh, gq, d), &Device::Cpu).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, kvh, kv, d), &Device::Cpu).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, kvh, kv, d), &Device::Cpu).unwrap();
        let pos: Vec<Vec<i64>> = vec![(0..kv as i64).collect()];
        let mask = attention_mask(&[vec![kv as i64 - 1]], &pos, None, &Device::Cpu).unwrap();
        let host = Arc::new(mask.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        g.bench_with_input(BenchmarkId::new("fused", kv), &(), |bch, _| {
            bch.iter(|| attention(&q, &k, &v, &mask, &host).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("reference", kv), &(), |bch, _| {
            bch.iter(|| attention_reference(&q, &k, &v, &mask).unwrap())
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = packed_vs_dense, k_quants_vs_candle, fused_vs_reference_attention
}
criterion_main!(benches);
