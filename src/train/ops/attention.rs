//! Segment-causal grouped-query attention `block` query rows at a time, with the
//! FlashAttention-2 backward, and its composed reference.

use super::{f32s, gemm_into, host_f32s, CpuInputs, CpuOutput, Grads, Mat};
use crate::engine::attention::{exp_approx, exp_sub_sum, scale_max, vectorised};
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
    /// On the CPU: the same, for the backward's one-pass probabilities.
    host_lse: std::sync::Mutex<Option<Vec<f32>>>,
}

impl ChunkedAttention {
    fn new(segments: &[Vec<u32>], block: usize, scale: f64) -> Self {
        ChunkedAttention {
            segments: std::sync::Arc::new(segments.to_vec()),
            runs: segments.iter().map(|s| segment_runs(s)).collect(),
            block: block.max(1),
            scale,
            lse: std::sync::Mutex::new(None),
            host_lse: std::sync::Mutex::new(None),
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

    /// The part of a row of scores over keys `k0..k0 + row.len()` that query `i` of batch
    /// row `bi` sees; the rest is set to 0 (one run per id) or −∞ (masked key by key).
    fn visible<'r>(&self, row: &'r mut [f32], bi: usize, i: usize, k0: usize) -> &'r mut [f32] {
        match &self.runs[bi] {
            Some(runs) => {
                let (lo, hi) = (runs[i] - k0, i + 1 - k0);
                row[..lo].fill(0.0);
                row[hi..].fill(0.0);
                &mut row[lo..hi]
            }
            None => {
                let seg = &self.segments[bi];
                for (j, x) in row.iter_mut().enumerate() {
                    if j + k0 > i || seg[j + k0] != seg[i] {
                        *x = f32::NEG_INFINITY;
                    }
                }
                row
            }
        }
    }

    /// `row ← softmax(scale · row)` over the keys query `i` of batch row `bi` sees, 0
    /// elsewhere, for a row over keys `k0..`; returns the visible scaled scores'
    /// log-sum-exp.
    fn softmax_row(&self, row: &mut [f32], bi: usize, i: usize, k0: usize) -> f32 {
        let visible = self.visible(row, bi, i, k0);
        let max = scale_max(visible, self.scale as f32);
        if max == f32::NEG_INFINITY {
            visible.fill(0.0);
            return max;
        }
        let sum = exp_sub_sum(visible, max);
        let inv = 1.0 / sum;
        visible.iter_mut().for_each(|x| *x *= inv);
        max + sum.ln()
    }

    /// [`Self::softmax_row`] again from the forward's log-sum-exp, in one pass:
    /// `row ← exp(scale · row − lse)` where visible.
    fn probs_row(&self, row: &mut [f32], bi: usize, i: usize, k0: usize, lse: f32) {
        exp_affine(self.visible(row, bi, i, k0), self.scale as f32, lse);
    }

    /// The blockwise forward in tensor ops, on a device without a flash kernel for the
    /// head size (the CPU runs [`Self::forward_host`]).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
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
            .for_each(|(r, row)| {
                self.att.softmax_row(row, r / (kvh * gn), t0 + r % n, 0);
            });
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

/// The shapes of one attention call: `q` `(b, h, t, d)`, `k`/`v` `(b, kvh, t, d)`.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    kvh: usize,
    t: usize,
    d: usize,
}

impl Dims {
    fn of(q: &candle_core::Shape, k: &candle_core::Shape) -> Result<Self> {
        let (b, h, t, d) = q.dims4()?;
        Ok(Dims {
            b,
            h,
            kvh: k.dims4()?.1,
            t,
            d,
        })
    }

    /// Query heads per KV head.
    fn g(&self) -> usize {
        self.h / self.kvh
    }

    /// Where keys `lo..hi` of KV head `kh` of batch row `bi` lie in a `(b, kvh, t, d)`
    /// tensor.
    fn keys(&self, bi: usize, kh: usize, lo: usize, hi: usize) -> std::ops::Range<usize> {
        let at = (bi * self.kvh + kh) * self.t;
        (at + lo) * self.d..(at + hi) * self.d
    }
}

vectorised! {
    /// `x ← exp(scale · x − shift)` over a row (−∞ ↦ 0).
    fn exp_affine(xs: &mut [f32], scale: f32, shift: f32) = exp_affine_portable;
}

#[inline(always)]
fn exp_affine_portable(xs: &mut [f32], scale: f32, shift: f32) {
    for x in xs.iter_mut() {
        *x = exp_approx(*x * scale - shift);
    }
}

/// One query block's buffers, reused block after block (`g·block` rows of `t` keys at most).
struct Scratch {
    qb: Vec<f32>,
    ob: Vec<f32>,
    s: Vec<f32>,
    lse: Vec<f32>,
}

impl Scratch {
    fn new(dims: Dims, block: usize) -> Self {
        let rows = dims.g() * block.min(dims.t);
        Scratch {
            qb: vec![0.0; rows * dims.d],
            ob: vec![0.0; rows * dims.d],
            s: vec![0.0; rows * dims.t],
            lse: vec![0.0; rows],
        }
    }
}

/// A query block: batch row, KV head, first query row, rows.
type Block = (usize, usize, usize, usize);

/// Where a block's rows of each of its KV head's `g` query heads lie, in head order, in a
/// `(b, h, t, width)` tensor (`width` = d for rows of vectors, 1 for per-query values).
fn head_rows(
    dims: Dims,
    (bi, kh, t0, n): Block,
    width: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let g = dims.g();
    (0..g).map(move |j| {
        let at = ((bi * dims.h + kh * g + j) * dims.t + t0) * width;
        at..at + n * width
    })
}

/// Copies a block's rows of `x` `(b, h, t, width)` into `dst` `(g·n, width)`.
fn gather_rows(dst: &mut [f32], x: &[f32], dims: Dims, at: Block, width: usize) {
    let rows = head_rows(dims, at, width);
    for (r, dst) in rows.zip(dst.chunks_exact_mut(at.3 * width)) {
        dst.copy_from_slice(&x[r]);
    }
}

/// The inverse of [`gather_rows`]: `src` `(g·n, width)` into its rows of `x`.
fn scatter_rows(x: &mut [f32], src: &[f32], dims: Dims, at: Block, width: usize) {
    for (r, src) in head_rows(dims, at, width).zip(src.chunks_exact(at.3 * width)) {
        x[r].copy_from_slice(src);
    }
}

impl ChunkedAttention {
    /// The keys `lo..hi` the queries `t0..t0 + n` of batch row `bi` can see: from the start
    /// of the first query's run (0 when ids are masked key by key) to the last query.
    fn key_range(&self, bi: usize, t0: usize, n: usize) -> (usize, usize) {
        let lo = self.runs[bi].as_ref().map_or(0, |runs| runs[t0]);
        (lo, t0 + n)
    }

    /// Every query block of a call in order (batch row, KV head, rows), with the keys
    /// `lo..hi` it sees.
    fn blocks(&self, dims: Dims) -> impl Iterator<Item = (Block, (usize, usize))> + '_ {
        let Dims { b, kvh, t, .. } = dims;
        let rows = move |bi, kh| {
            (0..t).step_by(self.block).map(move |t0| {
                let n = self.block.min(t - t0);
                ((bi, kh, t0, n), self.key_range(bi, t0, n))
            })
        };
        (0..b).flat_map(move |bi| (0..kvh).flat_map(move |kh| rows(bi, kh)))
    }

    /// The forward on host slices: `o` `(b, h, t, d)` and the log-sum-exp of every query's
    /// scaled scores `(b, h, t)`. Per batch row, KV head and query block: the `g` heads'
    /// rows `(g·n, d)` times the visible keys `(w, d)`ᵀ straight into a reused score buffer,
    /// normalised in place, times the visible values.
    fn forward_host(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: Dims,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let d = dims.d;
        let g = dims.g();
        let mut o = vec![0f32; q.len()];
        let mut lse = vec![0f32; q.len() / d];
        let mut sc = Scratch::new(dims, self.block);
        for (at, (lo, hi)) in self.blocks(dims) {
            let (bi, kh, t0, n) = at;
            let span = dims.keys(bi, kh, lo, hi);
            let (gn, w) = (g * n, hi - lo);
            gather_rows(&mut sc.qb, q, dims, at, d);
            let (keys, values) = (&k[span.clone()], &v[span]);
            let s = &mut sc.s[..gn * w];
            gemm_into(
                s,
                Mat::new(&sc.qb[..gn * d], gn, d)?,
                Mat::new(keys, w, d)?.t(),
                1.0,
                false,
            )?;
            s.par_chunks_mut(w)
                .zip(sc.lse[..gn].par_iter_mut())
                .enumerate()
                .for_each(|(r, (row, lse))| *lse = self.softmax_row(row, bi, t0 + r % n, lo));
            gemm_into(
                &mut sc.ob[..gn * d],
                Mat::new(s, gn, w)?,
                Mat::new(values, w, d)?,
                1.0,
                false,
            )?;
            scatter_rows(&mut o, &sc.ob[..gn * d], dims, at, d);
            scatter_rows(&mut lse, &sc.lse[..gn], dims, at, 1);
        }
        Ok((o, lse))
    }

    /// [`Self::backward_host`] over the op's CPU tensors, with the forward's log-sum-exp
    /// (recomputed when this op's forward left none).
    fn backward_on_host(&self, [q, k, v]: [&Tensor; 3], o: &Tensor, d_o: &Tensor) -> Grads<3> {
        let (q, k, v, o, d_o) = (
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            o.contiguous()?,
            d_o.contiguous()?,
        );
        let guards = [&q, &k, &v, &o, &d_o].map(|x| x.storage_and_layout());
        let host = |i: usize| host_f32s(&guards[i].0, guards[i].1, "attention");
        let (qs, ks, vs) = (host(0)?, host(1)?, host(2)?);
        let dims = Dims::of(q.shape(), k.shape())?;
        let saved = self.host_lse.lock().expect("not poisoned").take();
        let lse = match saved {
            Some(lse) => lse,
            None => self.forward_host(qs, ks, vs, dims)?.1,
        };
        let [dq, dk, dv] = self.backward_host([qs, ks, vs], host(3)?, host(4)?, &lse, dims)?;
        let dev = q.device();
        Ok([
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ])
    }

    /// The FlashAttention-2 backward on host slices, block by block as the forward: each
    /// block's probabilities recomputed from the forward's log-sum-exp in one pass, then
    /// `dV += Pᵀ·dO`, `dS = scale · P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O))`, `dK += dSᵀ·Q` (both
    /// accumulated by the products themselves) and `dQ = dS·K`.
    fn backward_host(
        &self,
        [q, k, v]: [&[f32]; 3],
        o: &[f32],
        d_o: &[f32],
        lse: &[f32],
        dims: Dims,
    ) -> Result<[Vec<f32>; 3]> {
        let d = dims.d;
        let g = dims.g();
        let scale = self.scale as f32;
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        let mut sc = Scratch::new(dims, self.block);
        let mut dob_buf = sc.qb.clone();
        let mut ds = sc.s.clone();
        let mut dsum = sc.lse.clone();
        for (at, (lo, hi)) in self.blocks(dims) {
            let (bi, kh, t0, n) = at;
            let span = dims.keys(bi, kh, lo, hi);
            let (gn, w) = (g * n, hi - lo);
            gather_rows(&mut sc.qb, q, dims, at, d);
            gather_rows(&mut dob_buf, d_o, dims, at, d);
            gather_rows(&mut sc.ob, o, dims, at, d);
            gather_rows(&mut sc.lse, lse, dims, at, 1);
            // rowsum(dO ⊙ O) per query row.
            let rows = dob_buf.chunks_exact(d).zip(sc.ob.chunks_exact(d));
            for (s, (a, b)) in dsum[..gn].iter_mut().zip(rows) {
                *s = a.iter().zip(b).map(|(a, b)| a * b).sum();
            }
            let (qb, dob) = (
                Mat::new(&sc.qb[..gn * d], gn, d)?,
                Mat::new(&dob_buf[..gn * d], gn, d)?,
            );
            let (keys, values) = (
                Mat::new(&k[span.clone()], w, d)?,
                Mat::new(&v[span.clone()], w, d)?,
            );
            let p = &mut sc.s[..gn * w];
            gemm_into(p, qb, keys.t(), 1.0, false)?;
            p.par_chunks_mut(w)
                .zip(sc.lse[..gn].par_iter())
                .enumerate()
                .for_each(|(r, (row, &l))| self.probs_row(row, bi, t0 + r % n, lo, l));
            let p = Mat::new(p, gn, w)?;
            gemm_into(&mut dv[span.clone()], p.t(), dob, 1.0, true)?;
            let dsb = &mut ds[..gn * w];
            gemm_into(dsb, dob, values.t(), 1.0, false)?;
            dsb.par_chunks_mut(w)
                .zip(p.data.par_chunks(w))
                .zip(dsum[..gn].par_iter())
                .for_each(|((ds, p), &s)| {
                    ds.iter_mut()
                        .zip(p)
                        .for_each(|(ds, &p)| *ds = scale * p * (*ds - s));
                });
            let dsb = Mat::new(dsb, gn, w)?;
            gemm_into(&mut dk[span], dsb.t(), qb, 1.0, true)?;
            gemm_into(&mut sc.ob[..gn * d], dsb, keys, 1.0, false)?;
            scatter_rows(&mut dq, &sc.ob[..gn * d], dims, at, d);
        }
        Ok([dq, dk, dv])
    }
}

impl ChunkedAttention {
    fn cpu(&self, [(s1, l1), (s2, l2), (s3, l3)]: CpuInputs<3>) -> CpuOutput {
        const NAME: &str = "wildlong-chunked-attention";
        let (q, k, v) = (
            f32s(s1, l1, NAME)?,
            f32s(s2, l2, NAME)?,
            f32s(s3, l3, NAME)?,
        );
        let (o, lse) = self.forward_host(q, k, v, Dims::of(l1.shape(), l2.shape())?)?;
        *self.host_lse.lock().expect("not poisoned") = Some(lse);
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
        if q.device().is_cpu() {
            return self.backward_on_host([&q, &k, &v], &o, &d_o);
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
