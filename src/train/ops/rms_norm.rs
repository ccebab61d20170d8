//! RMSNorm with a gradient for `x` and `w`, and its composed reference.

use super::{f32s, CpuInputs, CpuOutput, Grads};
#[cfg(feature = "cuda")]
use crate::kernels::cuda;
use candle_core::{CpuStorage, Result, Tensor, D};
use rayon::prelude::*;

struct RmsNorm {
    eps: f32,
}

impl RmsNorm {
    fn cpu(&self, [(s1, l1), (s2, l2)]: CpuInputs<2>) -> CpuOutput {
        let x = f32s(s1, l1, "wildlong-rms-norm")?;
        let w = f32s(s2, l2, "wildlong-rms-norm")?;
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
    fn cuda(&self, [x, w]: [Tensor; 2]) -> Result<Tensor> {
        cuda::rms_norm(&x, &w, self.eps)
    }

    fn backward(&self, [x, w]: [&Tensor; 2], _y: &Tensor, dy: &Tensor) -> Grads<2> {
        let (x, w, dy) = (x.detach(), w.detach(), dy.detach());
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && w.elem_count() <= cuda::RMS_BWD_MAX {
            let (dx, dw) = cuda::rms_norm_backward(&x, &w, &dy, self.eps)?;
            return Ok([Some(dx), Some(dw)]);
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
        Ok([Some(dx), Some(dw)])
    }
}

custom_op!(RmsNorm, "wildlong-rms-norm", CustomOp2);

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
