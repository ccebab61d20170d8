//! Softmax over the last dimension with a gradient.

use super::f32s;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

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
