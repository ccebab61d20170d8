//! RMSNorm with a gradient for `x` and `w`, and its composed reference.

use super::f32s;
#[cfg(feature = "cuda")]
use crate::kernels::cuda;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

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
