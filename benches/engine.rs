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
    targets = packed_vs_dense, fused_vs_reference_attention
}
criterion_main!(benches);
