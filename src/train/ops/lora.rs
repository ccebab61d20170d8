//! The fused LoRA linear `x·Wᵀ + s·(d(x)·Aᵀ)·Bᵀ` with seeded dropout, and its reference.

use super::{
    f32s, frozen_product, gemm_into, gemm_new, host_f32s, CpuInputs, CpuOutput, Grads, Mat,
};
use candle_core::{CpuStorage, Result, Tensor};
use rayon::prelude::*;

/// The dropout mask of an adapter input: `n` values, 0 with probability `p`, else `1/(1−p)`,
/// drawn from `seed` (the same mask whenever the same seed is drawn again).
pub fn dropout_mask(seed: u64, n: usize, p: f64) -> Vec<f32> {
    dropout_mask_from(seed, 0, n, p)
}

/// Values `from..from + n` of [`dropout_mask`]`(seed, ..)`'s stream, drawn without the ones
/// before them (the stream is seeked: each value takes two 32-bit words of ChaCha8): a tile of
/// rows gets the rows of the whole input's mask.
pub fn dropout_mask_from(seed: u64, from: usize, n: usize, p: f64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let keep = (1.0 / (1.0 - p)) as f32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    rng.set_word_pos(2 * from as u128);
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
    mask_from: usize,
}

impl LoraLinear {
    fn mask(&self, n: usize) -> Option<Vec<f32>> {
        self.dropout
            .map(|(seed, p)| dropout_mask_from(seed, self.mask_from, n, p))
    }
}

impl LoraLinear {
    fn cpu(&self, [(sx, lx), (sa, la), (sb, lb)]: CpuInputs<3>) -> CpuOutput {
        let (m, k) = lx.shape().dims2()?;
        let (r, k2) = la.shape().dims2()?;
        let (out, r2) = lb.shape().dims2()?;
        let (wo, wk) = self.w.dims2()?;
        if k != k2 || r != r2 || wo != out || wk != k {
            candle_core::bail!(
                "lora linear: x (.., {k}), A ({r}, {k2}), B ({out}, {r2}), W ({wo}, {wk})"
            );
        }
        let what = "lora linear";
        let (x, a, b) = (
            f32s(sx, lx, what)?,
            f32s(sa, la, what)?,
            f32s(sb, lb, what)?,
        );
        let w = self.w.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        let w = host_f32s(&ws, wl, what)?;
        // y = x·Wᵀ, then y += s · (d(x)·Aᵀ)·Bᵀ accumulated by the second product itself.
        let mut y = gemm_new(Mat::new(x, m, k)?, Mat::new(w, out, k)?.t(), 1.0)?;
        let xd = dropped(x, self.mask(m * k).as_deref());
        let xa = gemm_new(Mat::new(&xd, m, k)?, Mat::new(a, r, k)?.t(), 1.0)?; // (m, r)
        let s = self.scale as f32;
        gemm_into(
            &mut y,
            Mat::new(&xa, m, r)?,
            Mat::new(b, out, r)?.t(),
            s,
            true,
        )?;
        Ok((CpuStorage::F32(y), (m, out).into()))
    }

    /// The backward pass on the CPU, each product straight into its result: `dx = dy·W +
    /// s·d(dy·B·A)` (the second accumulated onto the first without dropout), `dA = s·(dy·B)ᵀ·
    /// d(x)`, `dB = s·dyᵀ·(d(x)·Aᵀ)`.
    fn backward_cpu(&self, x: &Tensor, a: &Tensor, b: &Tensor, dy: &Tensor) -> Grads<3> {
        let what = "lora linear";
        let (m, k) = x.dims2()?;
        let (r, out) = (a.dim(0)?, b.dim(0)?);
        let (x, a, b, dy) = (
            x.contiguous()?,
            a.contiguous()?,
            b.contiguous()?,
            dy.contiguous()?,
        );
        let w = self.w.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let ((xs, xl), (as_, al), (bs, bl), (ds, dl), (ws, wl)) = (
            x.storage_and_layout(),
            a.storage_and_layout(),
            b.storage_and_layout(),
            dy.storage_and_layout(),
            w.storage_and_layout(),
        );
        let (xv, av, bv, dv, wv) = (
            host_f32s(&xs, xl, what)?,
            host_f32s(&as_, al, what)?,
            host_f32s(&bs, bl, what)?,
            host_f32s(&ds, dl, what)?,
            host_f32s(&ws, wl, what)?,
        );
        let s = self.scale as f32;
        let (dym, am) = (Mat::new(dv, m, out)?, Mat::new(av, r, k)?);
        let dyb = gemm_new(dym, Mat::new(bv, out, r)?, 1.0)?; // (m, r)
        let dybm = Mat::new(&dyb, m, r)?;
        let mut dx = gemm_new(dym, Mat::new(wv, out, k)?, 1.0)?; // (m, k)
        let mask = self.mask(m * k);
        match &mask {
            Some(mask) => {
                let lora = gemm_new(dybm, am, s)?;
                dx.par_iter_mut()
                    .zip(lora.par_iter().zip(mask.par_iter()))
                    .for_each(|(d, (l, mk))| *d += l * mk);
            }
            None => gemm_into(&mut dx, dybm, am, s, true)?,
        }
        let xd = dropped(xv, mask.as_deref());
        let xdm = Mat::new(&xd, m, k)?;
        let da = gemm_new(dybm.t(), xdm, s)?; // (r, k)
        let xa = gemm_new(xdm, am.t(), 1.0)?; // (m, r)
        let db = gemm_new(dym.t(), Mat::new(&xa, m, r)?, s)?; // (out, r)
        let dev = candle_core::Device::Cpu;
        Ok([
            Some(Tensor::from_vec(dx, (m, k), &dev)?),
            Some(Tensor::from_vec(da, (r, k), &dev)?),
            Some(Tensor::from_vec(db, (out, r), &dev)?),
        ])
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, [x, a, b]: [Tensor; 3]) -> Result<Tensor> {
        let xd = match self.mask(x.elem_count()) {
            Some(m) => (&x * Tensor::from_vec(m, x.shape(), x.device())?)?,
            None => x.clone(),
        };
        frozen_product(&x, &self.w, true)? + (xd.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale)?
    }

    fn backward(&self, [x, a, b]: [&Tensor; 3], _y: &Tensor, dy: &Tensor) -> Grads<3> {
        let (x, a, b, dy) = (x.detach(), a.detach(), b.detach(), dy.detach());
        if x.device().is_cpu() {
            return self.backward_cpu(&x, &a, &b, &dy);
        }
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
        Ok([Some(dx), Some(da), Some(db)])
    }
}

custom_op!(LoraLinear, "wildlong-lora-linear", CustomOp3);

/// `d(x)`: `x` times its dropout mask (`x` itself without dropout).
fn dropped<'x>(x: &'x [f32], mask: Option<&[f32]>) -> std::borrow::Cow<'x, [f32]> {
    match mask {
        Some(mask) => x.iter().zip(mask).map(|(a, b)| a * b).collect(),
        None => std::borrow::Cow::Borrowed(x),
    }
}

/// A LoRA adapter on one projection: `a` `(r, k)`, `b` `(out, r)`, the scale `alpha / r`
/// and the dropout of its input (mask seed, probability), `x`'s first element being value
/// `mask_from` of the mask stream (non-zero for a tile of a longer input).
#[derive(Debug, Clone, Copy)]
pub struct Adapter<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
    pub dropout: Option<(u64, f64)>,
    pub mask_from: usize,
}

/// `x·Wᵀ + scale·(dropout(x)·Aᵀ)·Bᵀ` for `x` `(..., k)`, a frozen `w` `(out, k)`, `a`
/// `(r, k)`, `b` `(out, r)` (PEFT's LoRA forward), gradients for `x`, `a` and `b`;
/// `dropout` = (mask seed, probability).
pub fn lora_linear(x: &Tensor, w: &Tensor, lora: &Adapter) -> Result<Tensor> {
    let Adapter {
        a,
        b,
        scale,
        dropout,
        mask_from,
    } = *lora;
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
            mask_from,
        },
    )?;
    let mut out = dims;
    *out.last_mut().expect("x has a last dimension") = w.dim(0)?;
    y.reshape(out)
}

/// The composed reference of [`lora_linear`] (candle ops, autograd through every step).
pub fn lora_linear_reference(x: &Tensor, w: &Tensor, lora: &Adapter) -> Result<Tensor> {
    let (a, b, scale) = (lora.a, lora.b, lora.scale);
    let w = w.to_dtype(x.dtype())?;
    let xd = match lora.dropout {
        Some((seed, p)) => {
            let mask = dropout_mask_from(seed, lora.mask_from, x.elem_count(), p);
            let m = Tensor::from_vec(mask, x.shape(), x.device())?;
            (x * m.to_dtype(x.dtype())?)?
        }
        None => x.clone(),
    };
    x.broadcast_matmul(&w.t()?)?
        + (xd.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * scale)?
}
