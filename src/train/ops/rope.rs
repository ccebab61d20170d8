//! Rotary embedding with a gradient for `x` (the backward is the inverse rotation).

use super::f32s;
use crate::engine::rope::RopeLayout;
#[cfg(feature = "cuda")]
use crate::kernels::cuda;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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
