//! The fused LoRA linear `x·Wᵀ + s·(d(x)·Aᵀ)·Bᵀ` with seeded dropout, and its reference.

use super::{f32s, frozen_product, CpuInputs, CpuOutput, Grads};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Tensor};
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
    fn cuda(&self, [x, a, b]: [Tensor; 3]) -> Result<Tensor> {
        let xd = match self.mask(x.elem_count()) {
            Some(m) => (&x * Tensor::from_vec(m, x.shape(), x.device())?)?,
            None => x.clone(),
        };
        frozen_product(&x, &self.w, true)? + (xd.matmul(&a.t()?)?.matmul(&b.t()?)? * self.scale)?
    }

    fn backward(&self, [x, a, b]: [&Tensor; 3], _y: &Tensor, dy: &Tensor) -> Grads<3> {
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
        Ok([Some(dx), Some(da), Some(db)])
    }
}

custom_op!(LoraLinear, "wildlong-lora-linear", CustomOp3);

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
