//! The MLP's gate `silu(g) · u` in one pass, and its backward in one pass, instead of
//! candle's `silu` and product (and their six-op composed backward) over `(tokens,
//! intermediate)` tensors.

use super::{f32s, host_f32s, CpuInputs, CpuOutput, Grads};
use crate::engine::attention::exp_approx;
use candle_core::{CpuStorage, Result, Tensor};
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

struct SiluMul;

impl SiluMul {
    fn cpu(&self, [(s1, l1), (s2, l2)]: CpuInputs<2>) -> CpuOutput {
        let (g, u) = (f32s(s1, l1, "silu·up")?, f32s(s2, l2, "silu·up")?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("silu·up: gate {:?}, up {:?}", l1.shape(), l2.shape());
        }
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (g, u))| kernels::forward(y, g, u));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [g, u]: [Tensor; 2]) -> Result<Tensor> {
        g.silu()? * u
    }

    fn backward(&self, [g, u]: [&Tensor; 2], _y: &Tensor, dy: &Tensor) -> Grads<2> {
        let (g, u, dy) = (g.detach(), u.detach(), dy.detach());
        if !g.device().is_cpu() {
            // σ(g) (1 + g (1 − σ(g))) is silu's derivative.
            let s = candle_nn::ops::sigmoid(&g)?;
            let dsilu = (&s * g.mul(&s.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)?;
            return Ok([Some((&dy * &u)?.mul(&dsilu)?), Some((&dy * g.silu()?)?)]);
        }
        let (g, u, dy) = (g.contiguous()?, u.contiguous()?, dy.contiguous()?);
        let ((gs, gl), (us, ul), (ds, dl)) = (
            g.storage_and_layout(),
            u.storage_and_layout(),
            dy.storage_and_layout(),
        );
        let (gv, uv, dyv) = (
            host_f32s(&gs, gl, "silu·up")?,
            host_f32s(&us, ul, "silu·up")?,
            host_f32s(&ds, dl, "silu·up")?,
        );
        let mut dg = vec![0f32; gv.len()];
        let mut du = vec![0f32; gv.len()];
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(gv.par_chunks(CHUNK).zip(uv.par_chunks(CHUNK)))
            .zip(dyv.par_chunks(CHUNK))
            .for_each(|(((dg, du), (g, u)), dy)| kernels::backward(dg, du, g, u, dy));
        Ok([
            Some(Tensor::from_vec(dg, g.shape(), g.device())?),
            Some(Tensor::from_vec(du, g.shape(), g.device())?),
        ])
    }
}

custom_op!(SiluMul, "wildlong-silu-mul", CustomOp2);

/// `silu(g) · u = g · σ(g) · u` elementwise for `g` and `u` of one shape (f32), with the
/// gradients of both.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2(&u.contiguous()?, SiluMul)
}

/// The lane-wise loops, compiled for AVX2/AVX-512 where the CPU has them (the compiler
/// vectorises the portable bodies; σ comes from the engine's branch-free exp).
mod kernels {
    use super::exp_approx;
    use crate::engine::attention::vectorised;

    /// σ(x) from e^(−|x|) ∈ (0, 1], so that nothing overflows.
    #[inline(always)]
    fn sigmoid(x: f32) -> f32 {
        let e = exp_approx(-x.abs());
        let s = 1.0 / (1.0 + e);
        if x >= 0.0 {
            s
        } else {
            e * s
        }
    }

    #[inline(always)]
    fn forward_portable(y: &mut [f32], g: &[f32], u: &[f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g * sigmoid(g) * u;
        }
    }

    #[inline(always)]
    fn backward_portable(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
        for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            let s = sigmoid(g);
            *du = dy * g * s;
            *dg = dy * u * s * (1.0 + g * (1.0 - s));
        }
    }

    vectorised! {
        pub fn forward(y: &mut [f32], g: &[f32], u: &[f32]) = forward_portable;
    }

    vectorised! {
        pub fn backward(
            dg: &mut [f32],
            du: &mut [f32],
            g: &[f32],
            u: &[f32],
            dy: &[f32],
        ) = backward_portable;
    }
}
