//! Scaled-dot-product attention with an additive mask, grouped-query layout.
//!
//! [`attention_reference`] composes candle ops (two matmuls, a broadcast mask, a softmax) and
//! is the definition. [`attention`] takes a fused CPU path for few query rows (decode): one
//! pass per (row, head) over the cached keys and values read in place, instead of eight
//! small candle ops per layer and token. The tests compare both on random inputs with padding.

use crate::engine::packed::dot;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Query rows per (batch row, KV head) up to which the fused path is used.
const FUSED_MAX_ROWS: usize = 16;

/// q `(b, kvh, g*t, d)` (already scaled), k/v `(b, kvh, kv, d)`, mask `(b, 1, t, kv)` additive;
/// returns `(b, kvh, g*t, d)` f32. Row `gi*t + ti` of a KV head is query `ti` of its group
/// member `gi`.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, kvh, gt, _) = q.dims4()?;
    let t = mask.dim(2)?;
    let kv = k.dim(2)?;
    let scores = q.matmul(&k.t()?)?; // (b, kvh, g*t, kv)
    let scores = scores
        .reshape((b, kvh, gt / t, t, kv))?
        .broadcast_add(&mask.unsqueeze(1)?)?
        .reshape((b, kvh, gt, kv))?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(v)?)
}

/// [`attention_reference`], fused on the CPU for decode-sized queries.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    mask_host: &Arc<Vec<f32>>,
) -> Result<Tensor> {
    let fused = q.device().is_cpu()
        && q.dtype() == DType::F32
        && k.dtype() == DType::F32
        && v.dtype() == DType::F32
        && q.dim(2)? <= FUSED_MAX_ROWS;
    if !fused {
        return attention_reference(q, k, v, mask);
    }
    let (b, _, _, _) = q.dims4()?;
    let t = mask.dim(2)?;
    let kv = k.dim(2)?;
    let op = FusedAttention {
        mask: mask_host.clone(),
        b,
        t,
        kv,
    };
    Ok(q.contiguous()?.apply_op3_no_bwd(k, v, &op)?)
}

struct FusedAttention {
    mask: Arc<Vec<f32>>, // (b, t, kv)
    b: usize,
    t: usize,
    kv: usize,
}

fn f32_slice<'a>(s: &'a CpuStorage, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("fused attention: {what} must be f32"),
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "wildlong-fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, kvh, gt, d) = ql.shape().dims4()?;
        let (kb, kh, kv, kd) = kl.shape().dims4()?;
        if (kb, kh, kd) != (b, kvh, d)
            || vl.shape().dims4()? != (b, kvh, kv, d)
            || b != self.b
            || kv != self.kv
            || gt % self.t != 0
        {
            candle_core::bail!(
                "fused attention: shapes q {:?} k {:?} v {:?} disagree",
                ql.shape(),
                kl.shape(),
                vl.shape()
            );
        }
        if !ql.is_contiguous() || kl.stride()[3] != 1 || vl.stride()[3] != 1 {
            candle_core::bail!("fused attention: q must be contiguous and k/v rows dense");
        }
        let q = &f32_slice(qs, "q")?[ql.start_offset()..];
        let k = &f32_slice(ks, "k")?[kl.start_offset()..];
        let v = &f32_slice(vs, "v")?[vl.start_offset()..];
        let (ksb, ksh, ksj) = (kl.stride()[0], kl.stride()[1], kl.stride()[2]);
        let (vsb, vsh, vsj) = (vl.stride()[0], vl.stride()[1], vl.stride()[2]);
        let t = self.t;
        let mut out = vec![0f32; b * kvh * gt * d];
        let run = |(idx, o): (usize, &mut [f32])| {
            // idx enumerates (batch row, kv head, query row).
            let row = idx % gt;
            let h = (idx / gt) % kvh;
            let bi = idx / (gt * kvh);
            let ti = row % t;
            let qv = &q[idx * d..(idx + 1) * d];
            let mask = &self.mask[(bi * t + ti) * kv..(bi * t + ti + 1) * kv];
            let mut scores = Vec::with_capacity(kv);
            let mut max = f32::NEG_INFINITY;
            for (j, &mj) in mask.iter().enumerate() {
                let s = if mj == f32::NEG_INFINITY {
                    f32::NEG_INFINITY
                } else {
                    let kr = &k[bi * ksb + h * ksh + j * ksj..][..d];
                    dot(qv, kr) + mj
                };
                max = max.max(s);
                scores.push(s);
            }
            let mut z = 0f32;
            for s in scores.iter_mut() {
                *s = if *s == f32::NEG_INFINITY {
                    0.0
                } else {
                    (*s - max).exp()
                };
                z += *s;
            }
            let inv = 1.0 / z;
            for (j, &p) in scores.iter().enumerate() {
                if p != 0.0 {
                    let vr = &v[bi * vsb + h * vsh + j * vsj..][..d];
                    let w = p * inv;
                    for (a, &x) in o.iter_mut().zip(vr) {
                        *a += w * x;
                    }
                }
            }
        };
        if b * kvh * gt * kv * d >= 1 << 16 {
            out.par_chunks_mut(d).enumerate().for_each(run);
        } else {
            out.chunks_mut(d).enumerate().for_each(run);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, kvh, gt, d))))
    }
}
