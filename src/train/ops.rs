//! Autograd-safe operations for training. candle's fused `rms_norm`, `softmax_last_dim` and
//! `rope` record no gradient (silently: a stock model trains only its `lm_head`), and its
//! matmul materialises a gradient for frozen weights. Each op here is a candle custom op
//! with a `bwd`, f32 on the CPU, with a plain composed reference it is tested against (and
//! against finite differences):
//! - [`rms_norm`]: `y = x / sqrt(mean(x²) + eps) · w`;
//! - [`softmax_last_dim`];
//! - [`rope`]: rotary embedding with per-row `(b, t, d/2)` tables, half-split or
//!   interleaved; its backward is the inverse rotation;
//! - [`frozen_matmul`]: `x · wᵀ` with a gradient for `x` only (no weight gradient is
//!   allocated or computed);
//! - [`chunked_cross_entropy`]: the summed token loss of `h · wᵀ` against targets, computed
//!   `chunk` rows at a time so the `(tokens, vocabulary)` logits never exist whole; its
//!   backward recomputes each chunk;
//! - [`chunked_attention`]: causal grouped-query attention isolated per packed document,
//!   `block` query rows at a time (memory linear in the sequence), the backward recomputing
//!   each block's probabilities (FlashAttention-2's formulas).
//!
//! With the `cuda` feature each op also runs on a CUDA device through wildlong's kernels
//! (`crate::engine::cuda`: fused RMSNorm and RoPE with backward, flash attention forward
//! and backward, per-row cross-entropy) or cuBLAS products (a bf16 frozen weight multiplies
//! in bf16 with f32 accumulation); the CPU path is unchanged.

#[cfg(feature = "cuda")]
use crate::engine::cuda;
use crate::engine::rope::RopeLayout;
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// The f32 data a contiguous layout covers.
fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("{what}: f32 tensors only, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => candle_core::bail!("{what}: contiguous tensors only"),
    }
}

/// `x · wᵀ` (`transposed`) or `x · w` for f32 `x` and a frozen `w` (f32 or bf16), f32 out:
/// on a CUDA device a bf16 `w` multiplies in bf16 on tensor cores (f32 accumulation), on the
/// CPU it is widened to f32 for the product.
pub fn frozen_product(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Tensor> {
    let w = if transposed { w.t()? } else { w.clone() };
    if x.device().is_cuda() && w.dtype() == candle_core::DType::BF16 {
        x.to_dtype(candle_core::DType::BF16)?
            .matmul(&w)?
            .to_dtype(candle_core::DType::F32)
    } else {
        x.matmul(&w.to_dtype(candle_core::DType::F32)?)
    }
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "wildlong-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, self.name())?;
        let w = f32s(s2, l2, self.name())?;
        let d = l1.dims().last().copied().unwrap_or(1);
        if w.len() != d {
            candle_core::bail!("rms_norm: weight of {} for rows of {d}", w.len());
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(yr, xr)| {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let inv = 1.0 / (ms + self.eps).sqrt();
                for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * inv * g;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let y = cuda::rms_norm(
            &cuda::tensor_of(s1, l1)?,
            &cuda::tensor_of(s2, l2)?,
            self.eps,
        )?;
        Ok((cuda::storage_of(&y)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, w, dy) = (x.detach(), w.detach(), dy.detach());
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && w.elem_count() <= cuda::RMS_BWD_MAX {
            let (dx, dw) = cuda::rms_norm_backward(&x, &w, &dy, self.eps)?;
            return Ok((Some(dx), Some(dw)));
        }
        let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?
            .sqrt()?
            .recip()?; // (..., 1)
        let xhat = x.broadcast_mul(&inv)?;
        let d = w.dim(0)?;
        let dw = (&dy * &xhat)?.reshape(((), d))?.sum(0)?;
        let dxhat = dy.broadcast_mul(&w)?;
        let proj = (&dxhat * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = (dxhat - xhat.broadcast_mul(&proj)?)?.broadcast_mul(&inv)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// RMSNorm over the last dimension with a gradient for `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// The composed reference of [`rms_norm`] (any float dtype).
pub fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "wildlong-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let d = l.dims().last().copied().unwrap_or(1);
        let mut y = x.to_vec();
        y.par_chunks_mut(d).for_each(|r| {
            let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for v in r.iter_mut() {
                *v = if max == f32::NEG_INFINITY {
                    0.0
                } else {
                    (*v - max).exp()
                };
                sum += *v;
            }
            if sum > 0.0 {
                r.iter_mut().for_each(|v| *v /= sum);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (y, dy) = (y.detach(), dy.detach());
        let dot = (&dy * &y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * dy.broadcast_sub(&dot)?)?))
    }
}

/// Softmax over the last dimension with a gradient (rows of −∞ give zeros).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct Rope {
    layout: RopeLayout,
    /// The backward pass rotates by −θ.
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "wildlong-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, self.name())?;
        let cos = f32s(s2, l2, self.name())?;
        let sin = f32s(s3, l3, self.name())?;
        let (b, h, t, d) = l1.shape().dims4()?;
        let half = d / 2;
        if d % 2 != 0 || cos.len() != b * t * half || sin.len() != cos.len() {
            candle_core::bail!(
                "rope: x {:?} with tables {:?} (want (b, t, d/2))",
                l1.dims(),
                l2.dims()
            );
        }
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .enumerate()
            .for_each(|(row, (yr, xr))| {
                // row enumerates (b, h, t).
                let (bi, ti) = (row / (h * t), row % t);
                let off = (bi * t + ti) * half;
                for i in 0..half {
                    let (c, s) = (cos[off + i], sign * sin[off + i]);
                    let (a, bj) = match self.layout {
                        RopeLayout::HalfSplit => (i, i + half),
                        RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    };
                    yr[a] = xr[a] * c - xr[bj] * s;
                    yr[bj] = xr[bj] * c + xr[a] * s;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let y = cuda::rope(
            &cuda::tensor_of(s1, l1)?,
            &cuda::tensor_of(s2, l2)?,
            &cuda::tensor_of(s3, l3)?,
            matches!(self.layout, RopeLayout::Interleaved),
            self.inverse,
        )?;
        Ok((cuda::storage_of(&y)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The rotation is orthogonal: its transpose is the rotation by −θ.
        let dx = dy.detach().contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                layout: self.layout,
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

/// Rotates `x` `(b, h, t, d)` by the tables `cos`, `sin` `(b, t, d/2)` (as
/// [`crate::engine::rope::RopeConfig::cos_sin`] makes them), with a gradient for `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, layout: RopeLayout) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope {
            layout,
            inverse: false,
        },
    )
}

struct FrozenMatmul;

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "wildlong-frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: x (.., {k}) with w ({n}, {k2})");
        }
        // bf16 base weights are widened here, one projection at a time (the copy is freed
        // when the product is done; the graph keeps the bf16 weight only).
        let out = match s2 {
            CpuStorage::BF16(_) => {
                let w = s2.to_dtype(l2, candle_core::DType::F32)?;
                let lw = Layout::contiguous((n, k));
                s1.matmul(&w, (1, m, n, k), l1, &lw.transpose(0, 1)?)?
            }
            _ => s1.matmul(s2, (1, m, n, k), l1, &l2.transpose(0, 1)?)?,
        };
        Ok((out, (m, n).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (x, w) = (cuda::tensor_of(s1, l1)?, cuda::tensor_of(s2, l2)?);
        let y = frozen_product(&x, &w, true)?;
        let shape = y.shape().clone();
        Ok((cuda::storage_of(&y)?, shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(frozen_product(&dy.detach(), &w.detach(), false)?),
            None,
        ))
    }
}

/// `x · wᵀ` for `x` `(..., k)` f32 and a frozen `w` `(n, k)` (f32, or bf16 widened per call):
/// a gradient flows to `x` only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&1);
    let n = w.dim(0)?;
    let m = x.elem_count() / k.max(1);
    let y = x
        .reshape((m, k))?
        .contiguous()?
        .apply_op2(&w.contiguous()?, FrozenMatmul)?;
    let mut out = dims;
    *out.last_mut().expect("x has a last dimension") = n;
    y.reshape(out)
}

/// Targets of [`chunked_cross_entropy`] at this value are not counted (HF's `-100`).
pub const IGNORE: i64 = -100;

/// `(dh, dw)` of a cross-entropy forward pass.
type SavedGrads = (Tensor, Option<Tensor>);

struct ChunkedCrossEntropy {
    targets: std::sync::Arc<Vec<i64>>,
    chunk: usize,
    weight_grad: bool,
    /// Compute the gradients during the forward pass (when a backward pass will follow).
    grad: bool,
    /// `d loss / d h` `(n, d)` and `d loss / d w` `(v, d)` for a unit upstream gradient.
    saved: std::sync::Mutex<Option<SavedGrads>>,
}

impl ChunkedCrossEntropy {
    fn check(&self, n: usize, v: usize) -> Result<()> {
        if self.targets.len() != n {
            candle_core::bail!(
                "cross entropy: {} targets for {n} positions",
                self.targets.len()
            );
        }
        if let Some(t) = self
            .targets
            .iter()
            .find(|&&t| t != IGNORE && (t < 0 || t as usize >= v))
        {
            candle_core::bail!("cross entropy: target {t} outside the vocabulary of {v}");
        }
        Ok(())
    }
}

impl CustomOp2 for ChunkedCrossEntropy {
    fn name(&self) -> &'static str {
        "wildlong-chunked-cross-entropy"
    }

    /// Only counted rows are projected: their hidden states are gathered `chunk` at a time,
    /// multiplied by `wᵀ`, and reduced to log-sum-exp minus the target logit. With `grad`, the
    /// same logits become `softmax − one-hot` in place and give `dh` (and `dw`) at once —
    /// two vocabulary-sized products per chunk instead of the three a recomputing backward
    /// needs (the fused cross-entropy of Liger-Kernel and Unsloth).
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d) = l1.shape().dims2()?;
        let (v, d2) = l2.shape().dims2()?;
        if d != d2 {
            candle_core::bail!("cross entropy: hidden (.., {d}) with weight ({v}, {d2})");
        }
        self.check(n, v)?;
        let h = f32s(s1, l1, "cross entropy")?;
        let rows: Vec<usize> = (0..n).filter(|&i| self.targets[i] != IGNORE).collect();
        let wt = l2.transpose(0, 1)?;
        let mut dh = if self.grad { vec![0f32; n * d] } else { vec![] };
        let mut dw = (self.grad && self.weight_grad).then(|| vec![0f32; v * d]);
        let mut total = 0f64;
        for part in rows.chunks(self.chunk) {
            let c = part.len();
            let mut hc = Vec::with_capacity(c * d);
            for &i in part {
                hc.extend_from_slice(&h[i * d..(i + 1) * d]);
            }
            let hc = CpuStorage::F32(hc);
            let lh = Layout::contiguous((c, d));
            let logits = hc.matmul(s2, (1, c, v, d), &lh, &wt)?; // (c, v)
            let CpuStorage::F32(mut z) = logits else {
                candle_core::bail!("cross entropy: f32 tensors only")
            };
            let grad = self.grad;
            total += z
                .par_chunks_mut(v)
                .zip(part.par_iter())
                .map(|(row, &i)| {
                    let t = self.targets[i] as usize;
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
                    let loss = max as f64 + sum.ln() - row[t] as f64;
                    if grad {
                        // d loss / d logits = softmax − one-hot.
                        let inv = (1.0 / sum) as f32;
                        row.iter_mut().for_each(|x| *x = (*x - max).exp() * inv);
                        row[t] -= 1.0;
                    }
                    loss
                })
                .sum::<f64>();
            if !grad {
                continue;
            }
            let dz = CpuStorage::F32(z);
            let lz = Layout::contiguous((c, v));
            let CpuStorage::F32(dhc) = dz.matmul(s2, (1, c, d, v), &lz, l2)? else {
                candle_core::bail!("cross entropy: f32 tensors only")
            }; // (c, d)
            for (k, &i) in part.iter().enumerate() {
                dh[i * d..(i + 1) * d].copy_from_slice(&dhc[k * d..(k + 1) * d]);
            }
            if let Some(dw) = dw.as_mut() {
                // dw += dzᵀ · hc: (v, c) · (c, d).
                let part_w = dz.matmul(&hc, (1, v, d, c), &lz.transpose(0, 1)?, &lh)?;
                let CpuStorage::F32(pw) = part_w else {
                    candle_core::bail!("cross entropy: f32 tensors only")
                };
                dw.par_iter_mut()
                    .zip(pw.par_iter())
                    .for_each(|(a, b)| *a += b);
            }
        }
        if self.grad {
            let cpu = candle_core::Device::Cpu;
            let dh = Tensor::from_vec(dh, (n, d), &cpu)?;
            let dw = dw
                .map(|dw| Tensor::from_vec(dw, (v, d), &cpu))
                .transpose()?;
            *self.saved.lock().expect("not poisoned") = Some((dh, dw));
        }
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    /// The same on a CUDA device: each chunk's logits from one product (bf16 on tensor cores
    /// for a bf16 head), the losses and `softmax − one-hot` from one kernel
    /// ([`cuda::cross_entropy_rows`]), then `dh` and `dw` from two products.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, d) = l1.shape().dims2()?;
        let (v, d2) = l2.shape().dims2()?;
        if d != d2 {
            candle_core::bail!("cross entropy: hidden (.., {d}) with weight ({v}, {d2})");
        }
        self.check(n, v)?;
        let (h, w) = (cuda::tensor_of(s1, l1)?, cuda::tensor_of(s2, l2)?);
        let dev = h.device().clone();
        let rows: Vec<u32> = (0..n as u32)
            .filter(|&i| self.targets[i as usize] != IGNORE)
            .collect();
        let mut total = Tensor::zeros((), candle_core::DType::F32, &dev)?;
        let mut dh_parts = Vec::new();
        let mut dw = if self.grad && self.weight_grad {
            Some(Tensor::zeros((v, d), candle_core::DType::F32, &dev)?)
        } else {
            None
        };
        for part in rows.chunks(self.chunk) {
            let idx = Tensor::new(part, &dev)?;
            let hc = h.index_select(&idx, 0)?; // (c, d)
            let z = frozen_product(&hc, &w, true)?; // (c, v)
            let tg: Vec<i64> = part.iter().map(|&i| self.targets[i as usize]).collect();
            let (loss, dz) = cuda::cross_entropy_rows(&z, &tg, self.grad)?;
            drop(z);
            total = (total + loss.sum_all()?)?;
            if let Some(dz) = dz {
                dh_parts.push(frozen_product(&dz, &w, false)?); // (c, d)
                if let Some(acc) = dw.as_mut() {
                    *acc = (&*acc + dz.t()?.matmul(&hc)?)?;
                }
            }
        }
        if self.grad {
            let mut dh = Tensor::zeros((n, d), candle_core::DType::F32, &dev)?;
            if !rows.is_empty() {
                let idx = Tensor::new(rows.as_slice(), &dev)?;
                dh = dh.index_add(&idx, &Tensor::cat(&dh_parts, 0)?, 0)?;
            }
            *self.saved.lock().expect("not poisoned") = Some((dh, dw));
        }
        Ok((cuda::storage_of(&total)?, Shape::from(())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some((dh, dw)) = self.saved.lock().expect("not poisoned").take() else {
            candle_core::bail!(
                "cross entropy: backward without the gradients of its forward pass (it runs once)"
            )
        };
        let g = dloss.detach().to_dtype(candle_core::DType::F32)?;
        let dh = dh.reshape(h.shape())?.broadcast_mul(&g)?;
        let dw = match (self.weight_grad, dw) {
            (true, Some(dw)) => Some(dw.reshape(w.shape())?.broadcast_mul(&g)?),
            (true, None) => Some(w.zeros_like()?),
            (false, _) => None,
        };
        Ok((Some(dh), dw))
    }
}

/// The summed cross-entropy of the logits `h · wᵀ` (`h` `(n, d)`, `w` `(vocab, d)`) against
/// `targets` (`IGNORE` rows not counted), `chunk` counted rows at a time; a scalar. The
/// gradient flows to `h`, and to `w` when `weight_grad` (a trainable `lm_head`); it is
/// computed during the forward pass when `h` or `w` is tracked, so the backward pass is a
/// scaling. Divide by the number of counted tokens for the mean.
pub fn chunked_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &[i64],
    chunk: usize,
    weight_grad: bool,
) -> Result<Tensor> {
    let grad = h.track_op() || w.track_op();
    h.contiguous()?.apply_op2(
        &w.contiguous()?,
        ChunkedCrossEntropy {
            targets: std::sync::Arc::new(targets.to_vec()),
            chunk: chunk.max(1),
            weight_grad,
            grad,
            saved: std::sync::Mutex::new(None),
        },
    )
}

/// The composed reference of [`chunked_cross_entropy`]: full logits, log-softmax, gather.
pub fn cross_entropy_reference(h: &Tensor, w: &Tensor, targets: &[i64]) -> Result<Tensor> {
    let logits = h.matmul(&w.t()?)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let rows: Vec<u32> = (0..targets.len() as u32)
        .filter(|&i| targets[i as usize] != IGNORE)
        .collect();
    let tg: Vec<u32> = rows.iter().map(|&i| targets[i as usize] as u32).collect();
    let idx = Tensor::new(rows, h.device())?;
    let picked = logp
        .index_select(&idx, 0)?
        .gather(&Tensor::new(tg, h.device())?.unsqueeze(1)?, 1)?;
    picked.sum_all()?.neg()
}

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

/// A contiguous f32 tensor on the CPU from a storage (the op's inputs, copied once: O(s)).
fn to_tensor(s: &CpuStorage, l: &Layout, what: &str) -> Result<Tensor> {
    Tensor::from_slice(f32s(s, l, what)?, l.shape(), &candle_core::Device::Cpu)
}

impl CustomOp3 for ChunkedAttention {
    fn name(&self) -> &'static str {
        "wildlong-chunked-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            to_tensor(s1, l1, self.name())?,
            to_tensor(s2, l2, self.name())?,
            to_tensor(s3, l3, self.name())?,
        );
        let o = self.forward(&q, &k, &v)?.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(o), l1.shape().clone()))
    }

    /// On CUDA: the fused flash-attention kernel (bf16 operands, f32 accumulation) for head
    /// sizes it is built for, keeping the log-sum-exp for the backward kernel; other head
    /// sizes take the blockwise path above on the device.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (q, k, v) = (
            cuda::tensor_of(s1, l1)?,
            cuda::tensor_of(s2, l2)?,
            cuda::tensor_of(s3, l3)?,
        );
        let o = if cuda::flash_supports(q.dim(3)?) {
            let bf = |x: &Tensor| x.to_dtype(candle_core::DType::BF16);
            let m = cuda::Masking::packed(&self.segments, q.device())?;
            let (o, lse) =
                cuda::flash_attention(&bf(&q)?, &bf(&k)?, &bf(&v)?, &m, self.scale as f32)?;
            *self.lse.lock().expect("not poisoned") = Some(lse);
            o.to_dtype(candle_core::DType::F32)?
        } else {
            self.forward(&q, &k, &v)?
        };
        Ok((cuda::storage_of(&o)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
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
            return Ok((
                Some(dq.contiguous()?),
                Some(dk.contiguous()?),
                Some(dv.contiguous()?),
            ));
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
        Ok((Some(Tensor::cat(&dq, 2)?), Some(dk), Some(dv)))
    }
}

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

/// The dropout mask of an adapter input: `n` values, 0 with probability `p`, else `1/(1−p)`,
/// drawn from `seed` (the same mask whenever the same seed is drawn again).
pub fn dropout_mask(seed: u64, n: usize, p: f64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let keep = (1.0 / (1.0 - p)) as f32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect()
}

/// `y = x·Wᵀ + s·(d(x)·Aᵀ)·Bᵀ` in one op: `W` frozen (held by the op, f32 or bf16), `d` the
/// seeded dropout. Autograd keeps only `x`, `A`, `B` and `y`; the backward pass recomputes the
/// rank-`r` product and gives `dx`, `dA` and `dB` (no gradient for `W`).
struct LoraLinear {
    w: Tensor,
    scale: f64,
    dropout: Option<(u64, f64)>,
}

impl LoraLinear {
    fn mask(&self, n: usize) -> Option<Vec<f32>> {
        self.dropout.map(|(seed, p)| dropout_mask(seed, n, p))
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "wildlong-lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (r, k2) = la.shape().dims2()?;
        let (out, r2) = lb.shape().dims2()?;
        let (wo, wk) = self.w.dims2()?;
        if k != k2 || r != r2 || wo != out || wk != k {
            candle_core::bail!(
                "lora linear: x (.., {k}), A ({r}, {k2}), B ({out}, {r2}), W ({wo}, {wk})"
            );
        }
        let w = self.w.to_dtype(candle_core::DType::F32)?;
        let (ws, wl) = w.storage_and_layout();
        let candle_core::Storage::Cpu(wc) = &*ws else {
            candle_core::bail!("lora linear: CPU tensors only")
        };
        let y = sx.matmul(wc, (1, m, out, k), lx, &wl.transpose(0, 1)?)?;
        let CpuStorage::F32(mut y) = y else {
            candle_core::bail!("lora linear: f32 tensors only")
        };
        let lc = Layout::contiguous((m, k));
        let xa = match self.mask(m * k) {
            Some(mask) => {
                let x = f32s(sx, lx, "lora linear")?;
                let xd: Vec<f32> = x.iter().zip(&mask).map(|(a, b)| a * b).collect();
                CpuStorage::F32(xd).matmul(sa, (1, m, r, k), &lc, &la.transpose(0, 1)?)?
            }
            None => sx.matmul(sa, (1, m, r, k), lx, &la.transpose(0, 1)?)?,
        }; // (m, r)
        let z = xa.matmul(
            sb,
            (1, m, out, r),
            &Layout::contiguous((m, r)),
            &lb.transpose(0, 1)?,
        )?;
        let CpuStorage::F32(z) = z else {
            candle_core::bail!("lora linear: f32 tensors only")
        };
        let s = self.scale as f32;
        y.par_iter_mut()
            .zip(z.par_iter())
            .for_each(|(a, b)| *a += s * b);
        Ok((CpuStorage::F32(y), (m, out).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &CudaStorage,
        lx: &Layout,
        sa: &CudaStorage,
        la: &Layout,
        sb: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (x, a, b) = (
            cuda::tensor_of(sx, lx)?,
            cuda::tensor_of(sa, la)?,
            cuda::tensor_of(sb, lb)?,
        );
        let xd = match self.mask(x.elem_count()) {
            Some(m) => (&x * Tensor::from_vec(m, x.shape(), x.device())?)?,
            None => x.clone(),
        };
        let y = (frozen_product(&x, &self.w, true)?
            + (xd.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale)?)?;
        let shape = y.shape().clone();
        Ok((cuda::storage_of(&y)?, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b, dy) = (x.detach(), a.detach(), b.detach(), dy.detach());
        let mask = match self.mask(x.elem_count()) {
            Some(m) => Some(Tensor::from_vec(m, x.shape(), x.device())?),
            None => None,
        };
        let xd = match &mask {
            Some(m) => (&x * m)?,
            None => x.clone(),
        };
        let dyb = dy.matmul(&b)?; // (m, r)
        let mut dxd = (dyb.matmul(&a)? * self.scale)?; // (m, k)
        if let Some(m) = &mask {
            dxd = (dxd * m)?;
        }
        let dx = (frozen_product(&dy, &self.w.detach(), false)? + dxd)?;
        let da = (dyb.t()?.matmul(&xd)? * self.scale)?; // (r, k)
        let db = (dy.t()?.matmul(&xd.matmul(&a.t()?)?)? * self.scale)?; // (out, r)
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `x·Wᵀ + scale·(dropout(x)·Aᵀ)·Bᵀ` for `x` `(..., k)`, a frozen `w` `(out, k)`, `a`
/// `(r, k)`, `b` `(out, r)` (PEFT's LoRA forward), gradients for `x`, `a` and `b`;
/// `dropout` = (mask seed, probability).
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<(u64, f64)>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&1);
    let m = x.elem_count() / k.max(1);
    let y = x.reshape((m, k))?.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            w: w.clone(),
            scale,
            dropout,
        },
    )?;
    let mut out = dims;
    *out.last_mut().expect("x has a last dimension") = w.dim(0)?;
    y.reshape(out)
}

/// The composed reference of [`lora_linear`] (candle ops, autograd through every step).
pub fn lora_linear_reference(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<(u64, f64)>,
) -> Result<Tensor> {
    let w = w.to_dtype(x.dtype())?;
    let xd = match dropout {
        Some((seed, p)) => {
            let m = Tensor::from_vec(dropout_mask(seed, x.elem_count(), p), x.shape(), x.device())?;
            (x * m.to_dtype(x.dtype())?)?
        }
        None => x.clone(),
    };
    x.broadcast_matmul(&w.t()?)?
        + (xd.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * scale)?
}
