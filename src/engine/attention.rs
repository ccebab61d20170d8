//! Scaled-dot-product attention with an additive mask, grouped-query layout.
//!
//! [`attention_reference`] composes candle ops (two matmuls, a broadcast mask, a softmax) and
//! is the definition. [`attention`] takes fused CPU paths: for few query rows (decode), one
//! pass per (row, head) over the cached keys and values read in place, instead of eight
//! small candle ops per layer and token; for many rows (prefill), candle's GEMMs for the two
//! products with the mask and softmax applied in place in one pass over the scores (no mask
//! broadcast or softmax copies, a vectorised exp, masked keys skipped). The tests compare
//! every path with the reference on random inputs with padding.

use crate::engine::packed::dot;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Query rows per (batch row, KV head) up to which the fused path is used.
const FUSED_MAX_ROWS: usize = 16;

/// q `(b, kvh, g*t, d)` (already scaled), k/v `(b, kvh, kv, d)`, mask `(b, 1, t, kv)` additive;
/// returns `(b, kvh, g*t, d)` f32. Row `gi*t + ti` of a KV head is query `ti` of its group
/// member `gi`.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, kvh, gt, _) = q.dims4()?;
    let t = mask.dim(2)?;
    let kv = k.dim(2)?;
    let scores = q.matmul(&k.t()?)?; // (b, kvh, g*t, kv)
    let scores = scores
        .reshape((b, kvh, gt / t, t, kv))?
        .broadcast_add(&mask.unsqueeze(1)?)?
        .reshape((b, kvh, gt, kv))?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(v)?)
}

/// [`attention_reference`], fused on the CPU for decode-sized queries.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    mask_host: &Arc<Vec<f32>>,
) -> Result<Tensor> {
    let fused = q.device().is_cpu()
        && q.dtype() == DType::F32
        && k.dtype() == DType::F32
        && v.dtype() == DType::F32
        && q.dim(2)? <= FUSED_MAX_ROWS;
    let cpu_f32 = q.device().is_cpu()
        && q.dtype() == DType::F32
        && k.dtype() == DType::F32
        && v.dtype() == DType::F32;
    if cpu_f32 && !fused {
        let (b, _, _, _) = q.dims4()?;
        let t = mask.dim(2)?;
        let rows = (0..b)
            .map(|bi| {
                gemm_softmax(
                    &q.narrow(0, bi, 1)?,
                    &k.narrow(0, bi, 1)?,
                    &v.narrow(0, bi, 1)?,
                    mask_host,
                    t,
                    bi,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(Tensor::cat(&rows, 0)?);
    }
    if !fused {
        return attention_reference(q, k, v, mask);
    }
    let (b, _, _, _) = q.dims4()?;
    let t = mask.dim(2)?;
    let kv = k.dim(2)?;
    let op = FusedAttention {
        mask: mask_host.clone(),
        b,
        t,
        kv,
    };
    Ok(q.contiguous()?.apply_op3_no_bwd(k, v, &op)?)
}

/// One batch row's attention by GEMMs, PREFILL_ROWS query rows at a time (the scores stay a
/// few MB instead of `(kvh, g*t, kv)` at once): q `(1, kvh, g*t, d)` scaled, k/v
/// `(1, kvh, kv, d)` f32, `mask` the host mask `(.., t, kv)` whose row block `batch_row` is
/// this row's; returns `(1, kvh, g*t, d)`.
pub(crate) fn gemm_softmax(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Arc<Vec<f32>>,
    t: usize,
    batch_row: usize,
) -> Result<Tensor> {
    let gt = q.dim(2)?;
    let kv = k.dim(2)?;
    let kt = k.t()?;
    let mut blocks = Vec::new();
    for start in (0..gt).step_by(PREFILL_ROWS) {
        let n = PREFILL_ROWS.min(gt - start);
        let scores = q.narrow(2, start, n)?.contiguous()?.matmul(&kt)?; // (1, kvh, n, kv)
        scores.inplace_op1(&MaskedSoftmax {
            mask: mask.clone(),
            t,
            kv,
            batch_row,
            first_row: start,
        })?;
        blocks.push(scores.matmul(v)?); // (1, kvh, n, d)
    }
    Ok(Tensor::cat(&blocks, 2)?)
}

struct FusedAttention {
    mask: Arc<Vec<f32>>, // (b, t, kv)
    b: usize,
    t: usize,
    kv: usize,
}

/// The f32 values of a CPU storage (`what` names it in the error).
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("attention: {what} must be f32"),
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "wildlong-fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, kvh, gt, d) = ql.shape().dims4()?;
        let (kb, kh, kv, kd) = kl.shape().dims4()?;
        if (kb, kh, kd) != (b, kvh, d)
            || vl.shape().dims4()? != (b, kvh, kv, d)
            || b != self.b
            || kv != self.kv
            || gt % self.t != 0
        {
            candle_core::bail!(
                "fused attention: shapes q {:?} k {:?} v {:?} disagree",
                ql.shape(),
                kl.shape(),
                vl.shape()
            );
        }
        if !ql.is_contiguous() || kl.stride()[3] != 1 || vl.stride()[3] != 1 {
            candle_core::bail!("fused attention: q must be contiguous and k/v rows dense");
        }
        let q = &f32_slice(qs, "q")?[ql.start_offset()..];
        let k = &f32_slice(ks, "k")?[kl.start_offset()..];
        let v = &f32_slice(vs, "v")?[vl.start_offset()..];
        let (ksb, ksh, ksj) = (kl.stride()[0], kl.stride()[1], kl.stride()[2]);
        let (vsb, vsh, vsj) = (vl.stride()[0], vl.stride()[1], vl.stride()[2]);
        let t = self.t;
        let mut out = vec![0f32; b * kvh * gt * d];
        let run = |(idx, o): (usize, &mut [f32])| {
            // idx enumerates (batch row, kv head, query row).
            let row = idx % gt;
            let h = (idx / gt) % kvh;
            let bi = idx / (gt * kvh);
            let ti = row % t;
            let qv = &q[idx * d..(idx + 1) * d];
            let mask = &self.mask[(bi * t + ti) * kv..(bi * t + ti + 1) * kv];
            let mut scores = Vec::with_capacity(kv);
            let mut max = f32::NEG_INFINITY;
            for (j, &mj) in mask.iter().enumerate() {
                let s = if mj == f32::NEG_INFINITY {
                    f32::NEG_INFINITY
                } else {
                    let kr = &k[bi * ksb + h * ksh + j * ksj..][..d];
                    dot(qv, kr) + mj
                };
                max = max.max(s);
                scores.push(s);
            }
            let z = exp_sub_sum(&mut scores, max);
            let inv = 1.0 / z;
            for (j, &p) in scores.iter().enumerate() {
                if p != 0.0 {
                    let vr = &v[bi * vsb + h * vsh + j * vsj..][..d];
                    let w = p * inv;
                    for (a, &x) in o.iter_mut().zip(vr) {
                        *a += w * x;
                    }
                }
            }
        };
        if b * kvh * gt * kv * d >= 1 << 16 {
            out.par_chunks_mut(d).enumerate().for_each(run);
        } else {
            out.chunks_mut(d).enumerate().for_each(run);
        }
        Ok((CpuStorage::F32(out), Shape::from((b, kvh, gt, d))))
    }
}

/// Query rows per block of the prefill path.
const PREFILL_ROWS: usize = 256;

/// Adds the mask to the scores `(1, kvh, n, kv)` of batch row `batch_row`, query rows
/// `first_row..first_row + n` of each KV head, and takes the softmax of each row, in place.
struct MaskedSoftmax {
    mask: Arc<Vec<f32>>, // (b, t, kv)
    t: usize,
    kv: usize,
    batch_row: usize,
    first_row: usize,
}

impl candle_core::InplaceOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "wildlong-masked-softmax"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let (one, kvh, n, kv) = l.shape().dims4()?;
        let (t, bi) = (self.t, self.batch_row);
        let fits = one == 1 && kv == self.kv && self.mask.len() >= (bi + 1) * t * kv;
        if !l.is_contiguous() || !fits {
            candle_core::bail!(
                "masked softmax: scores {:?} disagree with the mask",
                l.shape()
            );
        }
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("masked softmax: scores must be f32")
        };
        let data = &mut data[l.start_offset()..l.start_offset() + kvh * n * kv];
        data.par_chunks_mut(kv).enumerate().for_each(|(idx, row)| {
            // idx enumerates (kv head, query row); query row r of a head is query r % t.
            let ti = (self.first_row + idx % n) % t;
            softmax_row(row, &self.mask[(bi * t + ti) * kv..(bi * t + ti + 1) * kv]);
        });
        Ok(())
    }
}

/// Defines `$vis fn $name(args) -> ret` running the `#[inline(always)]` function `$portable`
/// (same arguments) compiled for AVX-512F or AVX2 + FMA where the CPU has them, portable
/// code elsewhere: the compiler vectorises the portable body for the wider registers.
macro_rules! vectorised {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $portable:ident;) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked above).
                    return unsafe { avx512($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA (checked above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}
pub(crate) use vectorised;

vectorised! {
    /// `row ← softmax(row + mask)`.
    pub fn softmax_row(row: &mut [f32], mask: &[f32]) = softmax_row_portable;
}

vectorised! {
    /// `x ← exp(x − max)` over a row (−∞ ↦ 0) and returns the sum.
    pub fn exp_sub_sum(xs: &mut [f32], max: f32) -> f32 = exp_sub_sum_portable;
}

vectorised! {
    /// `x ← scale · x` over a row and returns the row's maximum (−∞ for an empty row).
    pub fn scale_max(xs: &mut [f32], scale: f32) -> f32 = scale_max_portable;
}

/// The kernels below are written so that the compiler vectorises them (no branches,
/// lane-wise ops, reductions in 16 lanes); [`vectorised`] above compiles them for wider
/// registers.
#[inline(always)]
fn softmax_row_portable(row: &mut [f32], mask: &[f32]) {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let n = row.len().min(mask.len());
    let (row, mask) = (&mut row[..n], &mask[..n]);
    let mut rc = row.chunks_exact_mut(16);
    let mut mc = mask.chunks_exact(16);
    for (r, m) in (&mut rc).zip(&mut mc) {
        for ((x, &mk), l) in r.iter_mut().zip(m).zip(lanes.iter_mut()) {
            *x += mk;
            *l = if *x > *l { *x } else { *l };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for (x, &mk) in rc.into_remainder().iter_mut().zip(mc.remainder()) {
        *x += mk;
        max = if *x > max { *x } else { max };
    }
    for l in lanes {
        max = if l > max { l } else { max };
    }
    let inv = 1.0 / exp_sub_sum_portable(row, max);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[inline(always)]
fn scale_max_portable(xs: &mut [f32], scale: f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact_mut(16);
    for c in &mut chunks {
        for (x, l) in c.iter_mut().zip(lanes.iter_mut()) {
            *x *= scale;
            *l = if *x > *l { *x } else { *l };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for x in chunks.into_remainder() {
        *x *= scale;
        max = if *x > max { *x } else { max };
    }
    lanes
        .into_iter()
        .fold(max, |m, l| if l > m { l } else { m })
}

#[inline(always)]
fn exp_sub_sum_portable(xs: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = xs.chunks_exact_mut(16);
    for c in &mut chunks {
        for (x, a) in c.iter_mut().zip(acc.iter_mut()) {
            *x = exp_approx(*x - max);
            *a += *x;
        }
    }
    let mut z: f32 = 0.0;
    for x in chunks.into_remainder() {
        *x = exp_approx(*x - max);
        z += *x;
    }
    z + acc.iter().sum::<f32>()
}

/// e^x for x ≤ 0 with relative error below 3e-7; 0 below −87 and for −∞. x = n·ln2 + f
/// (Cody–Waite reduction), e^f by its Taylor series to degree 7, 2^n built in the exponent
/// bits.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12582912.0; // 1.5 · 2^23: adding and subtracting rounds to an integer.
    let xc = x.max(-87.0);
    // Cody–Waite: f = x − n·ln2 with ln2 split in two so that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // n = round(x·log2 e) lands in the low mantissa bits of `kn`: read it from there as an
    // integer (a float-to-int conversion would not vectorise as well).
    let kn = xc * LOG2E + ROUND;
    let n = kn - ROUND;
    let ni = (kn.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let f = (xc - n * LN2_HI) - n * LN2_LO; // |f| ≤ ln2/2
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0
                        + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
    let e = p * scale;
    if x < -87.0 {
        0.0
    } else {
        e
    }
}
