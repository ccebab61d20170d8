//! The chunked cross-entropy: `h · wᵀ` against targets `chunk` rows at a time.

#[cfg(feature = "cuda")]
use super::frozen_product;
use super::{f32s, product_dims, CpuInputs, CpuOutput, Grads};
use crate::engine::attention::{exp_sub_sum, scale_max};
#[cfg(feature = "cuda")]
use crate::kernels::cuda;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

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

impl ChunkedCrossEntropy {
    /// Only counted rows are projected: their hidden states are gathered `chunk` at a time,
    /// multiplied by `wᵀ`, and reduced to log-sum-exp minus the target logit. With `grad`, the
    /// same logits become `softmax − one-hot` in place and give `dh` (and `dw`) at once —
    /// two vocabulary-sized products per chunk instead of the three a recomputing backward
    /// needs (the fused cross-entropy of Liger-Kernel and Unsloth).
    fn cpu(&self, [(s1, l1), (s2, l2)]: CpuInputs<2>) -> CpuOutput {
        let (n, d, v) = product_dims(l1.shape(), l2.shape(), "cross entropy: hidden", "weight")?;
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
                    let target = row[t];
                    // One vectorised pass each: the maximum, then exp(z − max) in place.
                    let max = scale_max(row, 1.0);
                    let sum = exp_sub_sum(row, max);
                    if grad {
                        // d loss / d logits = softmax − one-hot.
                        let inv = 1.0 / sum;
                        row.iter_mut().for_each(|x| *x *= inv);
                        row[t] -= 1.0;
                    }
                    max as f64 + (sum as f64).ln() - target as f64
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
    fn cuda(&self, [h, w]: [Tensor; 2]) -> Result<Tensor> {
        let (n, d, v) = product_dims(h.shape(), w.shape(), "cross entropy: hidden", "weight")?;
        self.check(n, v)?;
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
        Ok(total)
    }

    fn backward(&self, [h, w]: [&Tensor; 2], _loss: &Tensor, dloss: &Tensor) -> Grads<2> {
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
        Ok([Some(dh), dw])
    }
}

custom_op!(
    ChunkedCrossEntropy,
    "wildlong-chunked-cross-entropy",
    CustomOp2
);

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
