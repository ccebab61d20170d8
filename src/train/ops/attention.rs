//! Segment-causal grouped-query attention `block` query rows at a time, with the
//! FlashAttention-2 backward, and its composed reference.

use super::{host_f32s, to_tensor, CpuInputs, CpuOutput, Grads};
use crate::engine::attention::{exp_sub_sum, scale_max};
#[cfg(feature = "cuda")]
use crate::kernels::cuda;
use candle_core::{CpuStorage, Layout, Result, Tensor, D};
use rayon::prelude::*;

/// Causal attention inside segments: query `i` of a row sees key `j` when `j ≤ i` and both
/// carry the same segment id (packed documents do not see each other).
struct ChunkedAttention {
    /// (b, t) segment ids.
    segments: std::sync::Arc<Vec<Vec<u32>>>,
    /// Per batch row, when each segment id is one run of positions (packed rows are): the
    /// first position of each position's run, so query `i` sees keys `runs[b][i]..=i`.
    runs: Vec<Option<Vec<usize>>>,
    block: usize,
    scale: f64,
    /// On CUDA: the forward's log-sum-exp `(b, h, t)`, for the backward kernel.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    lse: std::sync::Mutex<Option<Tensor>>,
}

impl ChunkedAttention {
    fn new(segments: &[Vec<u32>], block: usize, scale: f64) -> Self {
        ChunkedAttention {
            segments: std::sync::Arc::new(segments.to_vec()),
            runs: segments.iter().map(|s| segment_runs(s)).collect(),
            block: block.max(1),
            scale,
            lse: std::sync::Mutex::new(None),
        }
    }

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

    /// Softmax probabilities of the block `(b, kvh, g·n, t0 + n)`: the scores `q·kᵀ` made in
    /// one product, then scaled, masked (causal, same segment) and normalised in place, row by
    /// row (masked keys 0).
    fn probs(&self, q: &Tensor, k: &Tensor, t0: usize, n: usize) -> Result<Tensor> {
        let kvh = k.dim(1)?;
        let s = Self::rows(q, kvh, t0, n)?.matmul(&k.narrow(2, 0, t0 + n)?.t()?)?;
        in_place_on_host(s, &BlockSoftmax { att: self, t0, n })
    }

    /// `row ← softmax(scale · row)` over the keys query `i` of batch row `bi` sees, 0 elsewhere.
    fn softmax_row(&self, row: &mut [f32], bi: usize, i: usize) {
        let scale = self.scale as f32;
        let visible = match &self.runs[bi] {
            Some(runs) => {
                let lo = runs[i];
                row[..lo].fill(0.0);
                row[i + 1..].fill(0.0);
                &mut row[lo..=i]
            }
            None => {
                let seg = &self.segments[bi];
                for (j, x) in row.iter_mut().enumerate() {
                    if j > i || seg[j] != seg[i] {
                        *x = f32::NEG_INFINITY;
                    }
                }
                row
            }
        };
        let max = scale_max(visible, scale);
        if max == f32::NEG_INFINITY {
            visible.fill(0.0);
            return;
        }
        let inv = 1.0 / exp_sub_sum(visible, max);
        visible.iter_mut().for_each(|x| *x *= inv);
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (_, h, t, _) = q.dims4()?;
        let mut out = Vec::new();
        let mut t0 = 0;
        while t0 < t {
            let n = self.block.min(t - t0);
            let p = self.probs(q, k, t0, n)?;
            let o = p.matmul(&v.narrow(2, 0, t0 + n)?)?; // (b, kvh, g·n, d)
            out.push(Self::heads(&o, h)?);
            t0 += n;
        }
        Tensor::cat(&out, 2)
    }
}

/// The first position of each position's run of equal ids, when every id is one run; `None`
/// when an id comes back after another (attention then masks key by key).
fn segment_runs(seg: &[u32]) -> Option<Vec<usize>> {
    let mut seen = std::collections::HashSet::new();
    let mut runs = Vec::with_capacity(seg.len());
    let mut lo = 0;
    for (i, &s) in seg.iter().enumerate() {
        if i > 0 && s != seg[i - 1] {
            lo = i;
            if !seen.insert(seg[i - 1]) || seen.contains(&s) {
                return None;
            }
        }
        runs.push(lo);
    }
    Some(runs)
}

/// [`ChunkedAttention::softmax_row`] over a block's scores `(b, kvh, g·n, t0 + n)`, in place.
struct BlockSoftmax<'a> {
    att: &'a ChunkedAttention,
    t0: usize,
    n: usize,
}

impl candle_core::InplaceOp1 for BlockSoftmax<'_> {
    fn name(&self) -> &'static str {
        "wildlong-block-softmax"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (_, kvh, gn, keys) = l.shape().dims4()?;
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("attention: f32 scores only")
        };
        let Some((a, z)) = l.contiguous_offsets() else {
            candle_core::bail!("attention: contiguous scores only")
        };
        let (t0, n) = (self.t0, self.n);
        data[a..z]
            .par_chunks_mut(keys)
            .enumerate()
            .for_each(|(r, row)| self.att.softmax_row(row, r / (kvh * gn), t0 + r % n));
        Ok(())
    }
}

/// `dP ← scale · P ⊙ (dP − rowsum(dO ⊙ O))` in place over a block `(b, kvh, g·n, keys)`: the
/// scores' gradient, with the softmax scale folded in for `dQ = dS·K` and `dK = dSᵀ·Q`.
struct ScoreGrad<'a> {
    p: &'a Tensor,
    dsum: &'a [f32],
    scale: f32,
}

impl candle_core::InplaceOp1 for ScoreGrad<'_> {
    fn name(&self) -> &'static str {
        "wildlong-score-grad"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let keys = l.dims().last().copied().unwrap_or(1);
        let (CpuStorage::F32(data), Some((a, z))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("attention: contiguous f32 score gradients only")
        };
        let (ps, pl) = self.p.storage_and_layout();
        let p = host_f32s(&ps, pl, "attention")?;
        let scale = self.scale;
        data[a..z]
            .par_chunks_mut(keys)
            .zip(p.par_chunks(keys))
            .zip(self.dsum.par_iter())
            .for_each(|((d, p), &s)| {
                d.iter_mut()
                    .zip(p)
                    .for_each(|(d, &p)| *d = scale * p * (*d - s));
            });
        Ok(())
    }
}

/// `op` applied to `x` in place; on another device (the CUDA path's head sizes without a
/// flash kernel) through a host copy.
fn in_place_on_host(x: Tensor, op: &impl candle_core::InplaceOp1) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.inplace_op1(op)?;
        return Ok(x);
    }
    let h = x.to_device(&candle_core::Device::Cpu)?;
    h.inplace_op1(op)?;
    h.to_device(x.device())
}

/// `acc[.., ..keys, ..] += x` for `acc` `(b, kvh, t, d)` and `x` `(b, kvh, keys, d)`.
fn add_leading_rows(acc: &mut [f32], x: &Tensor, t: usize) -> Result<()> {
    let (_, _, keys, d) = x.dims4()?;
    let x = x.flatten_all()?.to_vec1::<f32>()?;
    acc.par_chunks_mut(t * d)
        .zip(x.par_chunks(keys * d))
        .for_each(|(a, x)| a.iter_mut().zip(x).for_each(|(a, x)| *a += x));
    Ok(())
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
        let (_, h, t, d) = q.dims4()?;
        let kvh = k.dim(1)?;
        let mut dq = Vec::new();
        let mut dk = vec![0f32; k.elem_count()];
        let mut dv = vec![0f32; v.elem_count()];
        let mut t0 = 0;
        while t0 < t {
            let n = self.block.min(t - t0);
            let keys = t0 + n;
            // Recomputed probabilities of this query block: (b, kvh, g·n, keys).
            let p = self.probs(&q, &k, t0, n)?;
            let dob = ChunkedAttention::rows(&d_o, kvh, t0, n)?;
            let ob = ChunkedAttention::rows(&o, kvh, t0, n)?;
            let vb = v.narrow(2, 0, keys)?;
            let kb = k.narrow(2, 0, keys)?;
            // dV += Pᵀ dO; dP = dO Vᵀ; dS = P ⊙ (dP − rowsum(dO ⊙ O)), the last in place.
            let dsum = (&dob * &ob)?
                .sum_keepdim(D::Minus1)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let p_host = p.to_device(&candle_core::Device::Cpu)?;
            let grad = ScoreGrad {
                p: &p_host,
                dsum: &dsum,
                scale: self.scale as f32,
            };
            let ds = in_place_on_host(dob.matmul(&vb.t()?)?, &grad)?;
            add_leading_rows(&mut dv, &p.t()?.matmul(&dob)?, t)?; // (b, kvh, keys, d)
            add_leading_rows(
                &mut dk,
                &ds.t()?.matmul(&ChunkedAttention::rows(&q, kvh, t0, n)?)?,
                t,
            )?;
            dq.push(ChunkedAttention::heads(&ds.matmul(&kb)?, h)?);
            t0 += n;
        }
        let (dev, shape) = (q.device(), (k.dim(0)?, kvh, t, d));
        Ok([
            Some(Tensor::cat(&dq, 2)?),
            Some(Tensor::from_vec(dk, shape, dev)?),
            Some(Tensor::from_vec(dv, shape, dev)?),
        ])
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
        ChunkedAttention::new(segments, block, 1.0 / (d as f64).sqrt()),
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
