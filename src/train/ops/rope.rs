//! Rotary embedding with a gradient for `x` (the backward is the inverse rotation).

use super::{f32s, CpuInputs, CpuOutput, Grads};
use crate::engine::rope::RopeLayout;
#[cfg(feature = "cuda")]
use crate::kernels::cuda;
use candle_core::{CpuStorage, Result, Tensor};
use rayon::prelude::*;

struct Rope {
    layout: RopeLayout,
    /// The backward pass rotates by −θ.
    inverse: bool,
}

impl Rope {
    fn cpu(&self, [(s1, l1), (s2, l2), (s3, l3)]: CpuInputs<3>) -> CpuOutput {
        let x = f32s(s1, l1, "wildlong-rope")?;
        let cos = f32s(s2, l2, "wildlong-rope")?;
        let sin = f32s(s3, l3, "wildlong-rope")?;
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
    fn cuda(&self, [x, cos, sin]: [Tensor; 3]) -> Result<Tensor> {
        let interleaved = matches!(self.layout, RopeLayout::Interleaved);
        cuda::rope(&x, &cos, &sin, interleaved, self.inverse)
    }

    fn backward(&self, [_x, cos, sin]: [&Tensor; 3], _y: &Tensor, dy: &Tensor) -> Grads<3> {
        // The rotation is orthogonal: its transpose is the rotation by −θ.
        let dx = dy.detach().contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                layout: self.layout,
                inverse: !self.inverse,
            },
        )?;
        Ok([Some(dx), None, None])
    }
}

custom_op!(Rope, "wildlong-rope", CustomOp3);

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
