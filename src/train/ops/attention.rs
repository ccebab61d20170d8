//! Segment-causal grouped-query attention `block` query rows at a time, with the
//! FlashAttention-2 backward, and its composed reference.

use super::{to_tensor, CpuInputs, CpuOutput, Grads};
#[cfg(feature = "cuda")]
use crate::kernels::cuda;
use candle_core::{CpuStorage, Result, Tensor, D};
use rayon::prelude::*;

/// Causal attention inside segments: query `i` of a row sees key `j` when `j ≤ i` and both
/// carry the same segment id (packed documents do not see each other).
struct ChunkedAttention {
    /// (b, t) segment ids.
    segments: std::sync::Arc<Vec<Vec<u32>>>,
    block: usize,
    scale: f64,
    /// On CUDA: the forward's log-sum-exp `(b, h, t)`, for the backward kernel.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    lse: std::sync::Mutex<Option<Tensor>>,
}

impl ChunkedAttention {
    /// Query rows `t0..t0 + n` of every head as `(b, kvh, g·n, d)`.
    fn rows(x: &Tensor, kvh: usize, t0: usize, n: usize) -> Result<Tensor> {
        let (b, h, _, d) = x.dims4()?;
        x.narrow(2, t0, n)?
            .reshape((b, kvh, h / kvh, n, d))?
            .reshape((b, kvh, (h / kvh) * n, d))
    }

    /// `(b, kvh, g·n, d)` back to `(b, h, n, d)`.
    fn heads(x: &Tensor, h: usize) -> Result<Tensor> {
        let (b, kvh, gn, d) = x.dims4()?;
        x.reshape((b, kvh, h / kvh, gn / (h / kvh), d))?
            .reshape((b, h, gn / (h / kvh), d))
    }

    /// Softmax probabilities of the block, `(b, kvh, g·n, t0 + n)` flattened: the scores
    /// `(scale·q)·kᵀ` masked (causal, same segment) and normalised in one pass per row, in
    /// place (a row with no visible key is all zeros).
    fn probs(&self, q: &Tensor, k: &Tensor, t0: usize, n: usize) -> Result<Vec<f32>> {
        let kvh = k.dim(1)?;
        let keys = t0 + n;
        let qb = (Self::rows(q, kvh, t0, n)? * self.scale)?;
        let kb = k.narrow(2, 0, keys)?;
        let s = qb.matmul(&kb.t()?)?;
        let per_batch = s.dim(1)? * s.dim(2)?;
        let mut p = s.flatten_all()?.to_vec1::<f32>()?;
        p.par_chunks_mut(keys).enumerate().for_each(|(r, row)| {
            let seg = &self.segments[r / per_batch];
            let i = t0 + r % n;
            let mut max = f32::NEG_INFINITY;
            for (j, x) in row.iter_mut().enumerate() {
                if j > i || seg[j] != seg[i] {
                    *x = f32::NEG_INFINITY;
                } else if *x > max {
                    max = *x;
                }
            }
            if max == f32::NEG_INFINITY {
                row.iter_mut().for_each(|x| *x = 0.0);
                return;
            }
            let mut sum = 0f32;
            for x in row.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
        });
        Ok(p)
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, h, t, _) = q.dims4()?;
        let kvh = k.dim(1)?;
        let g = h / kvh;
        let mut out = Vec::new();
        let mut t0 = 0;
        while t0 < t {
            let n = self.block.min(t - t0);
            let p = Tensor::from_vec(
                self.probs(q, k, t0, n)?,
                (b, kvh, g * n, t0 + n),
                q.device(),
            )?;
            let o = p.matmul(&v.narrow(2, 0, t0 + n)?.contiguous()?)?; // (b, kvh, g·n, d)
            out.push(Self::heads(&o, h)?);
            t0 += n;
        }
        Tensor::cat(&out, 2)
    }
}

impl ChunkedAttention {
    fn cpu(&self, [(s1, l1), (s2, l2), (s3, l3)]: CpuInputs<3>) -> CpuOutput {
        let (q, k, v) = (
            to_tensor(s1, l1, "wildlong-chunked-attention")?,
            to_tensor(s2, l2, "wildlong-chunked-attention")?,
            to_tensor(s3, l3, "wildlong-chunked-attention")?,
        );
        let o = self.forward(&q, &k, &v)?.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(o), l1.shape().clone()))
    }

    /// On CUDA: the fused flash-attention kernel (bf16 operands, f32 accumulation) for head
    /// sizes it is built for, keeping the log-sum-exp for the backward kernel; other head
    /// sizes take the blockwise path above on the device.
    #[cfg(feature = "cuda")]
    fn cuda(&self, [q, k, v]: [Tensor; 3]) -> Result<Tensor> {
        Ok(if cuda::flash_supports(q.dim(3)?) {
            let bf = |x: &Tensor| x.to_dtype(candle_core::DType::BF16);
            let m = cuda::Masking::packed(&self.segments, q.device())?;
            let (o, lse) =
                cuda::flash_attention(&bf(&q)?, &bf(&k)?, &bf(&v)?, &m, self.scale as f32)?;
            *self.lse.lock().expect("not poisoned") = Some(lse);
            o.to_dtype(candle_core::DType::F32)?
        } else {
            self.forward(&q, &k, &v)?
        })
    }

    fn backward(&self, [q, k, v]: [&Tensor; 3], o: &Tensor, d_o: &Tensor) -> Grads<3> {
        let (q, k, v, o, d_o) = (q.detach(), k.detach(), v.detach(), o.detach(), d_o.detach());
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() && cuda::flash_supports(q.dim(3)?) {
            let bf = |x: &Tensor| x.to_dtype(candle_core::DType::BF16);
            let (qb, kb, vb) = (bf(&q)?, bf(&k)?, bf(&v)?);
            let m = cuda::Masking::packed(&self.segments, q.device())?;
            let scale = self.scale as f32;
            let saved = self.lse.lock().expect("not poisoned").take();
            let (ob, lse) = match saved {
                Some(lse) => (bf(&o)?, lse),
                None => cuda::flash_attention(&qb, &kb, &vb, &m, scale)?,
            };
            let (dq, dk, dv) =
                cuda::flash_attention_backward(&qb, &kb, &vb, &ob, &bf(&d_o)?, &lse, &m, scale)?;
            return Ok([
                Some(dq.contiguous()?),
                Some(dk.contiguous()?),
                Some(dv.contiguous()?),
            ]);
        }
        let (b, h, t, _) = q.dims4()?;
        let kvh = k.dim(1)?;
        let mut dq = Vec::new();
        let mut dk = k.zeros_like()?;
        let mut dv = v.zeros_like()?;
        let mut t0 = 0;
        while t0 < t {
            let n = self.block.min(t - t0);
            let keys = t0 + n;
            // Recomputed probabilities of this query block: (b, kvh, g·n, keys).
            let pv = self.probs(&q, &k, t0, n)?;
            let dob = ChunkedAttention::rows(&d_o, kvh, t0, n)?;
            let ob = ChunkedAttention::rows(&o, kvh, t0, n)?;
            let vb = v.narrow(2, 0, keys)?.contiguous()?;
            let kb = k.narrow(2, 0, keys)?.contiguous()?;
            let shape = (b, kvh, (h / kvh) * n, keys);
            // dV += Pᵀ dO; dP = dO Vᵀ; dS = P ⊙ (dP − rowsum(dO ⊙ O)), the last in one pass.
            let dsum = (&dob * &ob)?
                .sum_keepdim(D::Minus1)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let mut ds = dob.matmul(&vb.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            ds.par_chunks_mut(keys)
                .zip(pv.par_chunks(keys))
                .zip(dsum.par_iter())
                .for_each(|((d, p), s)| {
                    d.iter_mut().zip(p).for_each(|(d, p)| *d = p * (*d - s));
                });
            let p = Tensor::from_vec(pv, shape, q.device())?;
            let ds = Tensor::from_vec(ds, shape, q.device())?;
            let dv_b = p.t()?.matmul(&dob)?; // (b, kvh, keys, d)
            let dq_b = (ds.matmul(&kb)? * self.scale)?;
            let dk_b = (ds.t()?.matmul(&ChunkedAttention::rows(&q, kvh, t0, n)?)? * self.scale)?;
            let pad = |x: Tensor| -> Result<Tensor> {
                if keys == t {
                    return Ok(x);
                }
                let (b, kh, _, d) = x.dims4()?;
                let zeros = Tensor::zeros((b, kh, t - keys, d), x.dtype(), x.device())?;
                Tensor::cat(&[x, zeros], 2)
            };
            dv = (dv + pad(dv_b)?)?;
            dk = (dk + pad(dk_b)?)?;
            dq.push(ChunkedAttention::heads(&dq_b, h)?);
            t0 += n;
        }
        Ok([Some(Tensor::cat(&dq, 2)?), Some(dk), Some(dv)])
    }
}

custom_op!(ChunkedAttention, "wildlong-chunked-attention", CustomOp3);

/// Causal attention of `q` `(b, h, t, d)` over `k`, `v` `(b, kv_heads, t, d)` (grouped-query
/// heads share a KV head), isolated per segment id (`segments[b][t]`: packed documents never
/// see each other), `block` query rows at a time: memory grows with `block · t`, not `t²`;
/// the backward recomputes each block's probabilities. Softmax scale `1/sqrt(d)`.
pub fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[Vec<u32>],
    block: usize,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (b2, kvh, t2, d2) = k.dims4()?;
    if b2 != b || t2 != t || d2 != d || kvh == 0 || h % kvh != 0 || v.dims() != k.dims() {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if segments.len() != b || segments.iter().any(|s| s.len() != t) {
        candle_core::bail!("attention: segment ids must be (b, t) = ({b}, {t})");
    }
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        ChunkedAttention {
            segments: std::sync::Arc::new(segments.to_vec()),
            block: block.max(1),
            scale: 1.0 / (d as f64).sqrt(),
            lse: std::sync::Mutex::new(None),
        },
    )
}

/// The composed reference of [`chunked_attention`]: KV heads repeated, full `(t, t)`
/// scores, the segment-causal mask, softmax (any float dtype).
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[Vec<u32>],
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let kvh = k.dim(1)?;
    let rep = |x: &Tensor| -> Result<Tensor> {
        let x = x.unsqueeze(2)?.repeat((1, 1, h / kvh, 1, 1))?;
        x.reshape((b, h, t, d))
    };
    let (k, v) = (rep(k)?, rep(v)?);
    let s = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
    let mut m = Vec::with_capacity(b * t * t);
    for seg in segments {
        for i in 0..t {
            m.extend((0..t).map(|j| {
                if j <= i && seg[j] == seg[i] {
                    0.0
                } else {
                    f64::NEG_INFINITY
                }
            }));
        }
    }
    let mask = Tensor::from_vec(m, (b, 1, t, t), q.device())?.to_dtype(q.dtype())?;
    let p = candle_nn::ops::softmax(&s.broadcast_add(&mask)?, D::Minus1)?;
    p.matmul(&v)
}
