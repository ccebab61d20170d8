//! Quantized weights × f32 activations on the CPU, exact with respect to the dequantized weights.
//!
//! candle's quantized matmul quantizes the activations to 8 bits (and runs Q4_1 on a scalar
//! path), which flips near-tied greedy choices of small models. These kernels keep GGUF's
//! Q4_0 / Q4_1 / Q8_0 blocks in memory (4.5–8.5 bits per weight, so decode reads 4–7× fewer
//! bytes than f32) and multiply them with f32 activations: the result equals
//! `x · dequantize(W)ᵀ` up to f32 summation order. [`matmul_reference`] is the plain
//! version every fast path is tested against; the AVX2+FMA path is chosen at run time.

use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// 2-byte scale, 16 bytes of nibbles: w = (q - 8) · d.
    Q4_0,
    /// 2-byte scale, 2-byte min, 16 bytes of nibbles: w = q · d + m.
    Q4_1,
    /// 2-byte scale, 32 signed bytes: w = q · d.
    Q8_0,
}

impl BlockKind {
    fn bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// Weights `(n, k)` as GGUF blocks, row-major, `k / 32` blocks per row.
pub struct PackedWeight {
    kind: BlockKind,
    data: Vec<u8>,
    n: usize,
    k: usize,
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

impl PackedWeight {
    /// Takes a GGUF tensor of a supported block type; `None` for other types.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let kind = match q.dtype() {
            GgmlDType::Q4_0 => BlockKind::Q4_0,
            GgmlDType::Q4_1 => BlockKind::Q4_1,
            GgmlDType::Q8_0 => BlockKind::Q8_0,
            _ => return Ok(None),
        };
        let (n, k) = q.shape().dims2()?;
        if k % QK != 0 {
            return Ok(None);
        }
        let data = q.data()?.into_owned();
        if data.len() != n * k / QK * kind.bytes() {
            bail!(
                "packed weight: {} bytes for a {n}x{k} {kind:?} tensor",
                data.len()
            );
        }
        Ok(Some(Self { kind, data, n, k }))
    }

    pub fn kind(&self) -> BlockKind {
        self.kind
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn row(&self, r: usize) -> &[u8] {
        let rb = self.k / QK * self.kind.bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// One block dequantized: (32 quantized values as f32, scale d, offset m) with w = q·d + m.
    fn block(&self, blk: &[u8]) -> ([f32; QK], f32, f32) {
        let mut q = [0f32; QK];
        match self.kind {
            BlockKind::Q4_0 | BlockKind::Q4_1 => {
                let (d, m, qs) = match self.kind {
                    BlockKind::Q4_0 => {
                        let d = f16_at(blk, 0);
                        (d, -8.0 * d, &blk[2..18])
                    }
                    _ => (f16_at(blk, 0), f16_at(blk, 2), &blk[4..20]),
                };
                for j in 0..16 {
                    q[j] = (qs[j] & 0x0F) as f32;
                    q[j + 16] = (qs[j] >> 4) as f32;
                }
                (q, d, m)
            }
            BlockKind::Q8_0 => {
                for j in 0..QK {
                    q[j] = blk[2 + j] as i8 as f32;
                }
                (q, f16_at(blk, 0), 0.0)
            }
        }
    }

    /// Dequantized weights `(n, k)`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.k);
        let bb = self.kind.bytes();
        for r in 0..self.n {
            for blk in self.row(r).chunks_exact(bb) {
                let (q, d, m) = self.block(blk);
                out.extend(q.iter().map(|q| q * d + m));
            }
        }
        out
    }
}

/// Plain reference: `out (m, n) = x (m, k) · dequantize(W)ᵀ`.
pub fn matmul_reference(x: &[f32], m: usize, w: &PackedWeight) -> Vec<f32> {
    let deq = w.dequantize();
    let mut out = vec![0f32; m * w.n];
    for i in 0..m {
        for r in 0..w.n {
            out[i * w.n + r] = x[i * w.k..(i + 1) * w.k]
                .iter()
                .zip(&deq[r * w.k..(r + 1) * w.k])
                .map(|(a, b)| a * b)
                .sum();
        }
    }
    out
}

/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 32;
/// Activation rows processed together (accumulators held at once).
const TILE: usize = 4;

/// `out (m, n) = x (m, k) · dequantize(W)ᵀ`, parallel over output features, SIMD when available.
pub fn matmul(x: &[f32], m: usize, w: &PackedWeight) -> Result<Vec<f32>> {
    matmul_with(x, m, w, simd_available())
}

/// [`matmul`] on the portable (non-SIMD) path, for comparisons.
pub fn matmul_portable(x: &[f32], m: usize, w: &PackedWeight) -> Result<Vec<f32>> {
    matmul_with(x, m, w, false)
}

fn matmul_with(x: &[f32], m: usize, w: &PackedWeight, simd: bool) -> Result<Vec<f32>> {
    if x.len() != m * w.k {
        bail!(
            "packed matmul: x has {} values, expected {m}x{}",
            x.len(),
            w.k
        );
    }
    let nb = w.k / QK;
    // Σx per activation row and block (for the offset term m·Σx).
    let sums: Vec<f32> = x.chunks_exact(QK).map(|c| c.iter().sum()).collect();
    let mut out_t = vec![0f32; w.n * m]; // (n, m): contiguous per task
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let r0 = task * ROWS_PER_TASK;
            for (ri, dst) in chunk.chunks_exact_mut(m).enumerate() {
                let row = w.row(r0 + ri);
                let mut i0 = 0;
                while i0 < m {
                    let tile = TILE.min(m - i0);
                    let mut acc = [0f32; TILE];
                    #[cfg(target_arch = "x86_64")]
                    if simd {
                        // SAFETY: AVX2 and FMA were detected at run time; sizes were checked above.
                        unsafe {
                            avx2::row_dot(w.kind, row, nb, x, &sums, w.k, i0, tile, &mut acc)
                        };
                    } else {
                        scalar_row_dot(w, row, nb, x, &sums, i0, tile, &mut acc);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    {
                        let _ = simd;
                        scalar_row_dot(w, row, nb, x, &sums, i0, tile, &mut acc);
                    }
                    dst[i0..i0 + tile].copy_from_slice(&acc[..tile]);
                    i0 += tile;
                }
            }
        });
    // (n, m) → (m, n)
    let mut out = vec![0f32; m * w.n];
    for r in 0..w.n {
        for i in 0..m {
            out[i * w.n + r] = out_t[r * m + i];
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn scalar_row_dot(
    w: &PackedWeight,
    row: &[u8],
    nb: usize,
    x: &[f32],
    sums: &[f32],
    i0: usize,
    tile: usize,
    acc: &mut [f32; TILE],
) {
    let bb = w.kind.bytes();
    for b in 0..nb {
        let (q, d, m) = w.block(&row[b * bb..(b + 1) * bb]);
        for t in 0..tile {
            let xs = &x[(i0 + t) * w.k + b * QK..(i0 + t) * w.k + (b + 1) * QK];
            let dot: f32 = q.iter().zip(xs).map(|(a, b)| a * b).sum();
            acc[t] += d * dot + m * sums[(i0 + t) * nb + b];
        }
    }
}

pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && std::env::var_os("WILDLONG_NO_SIMD").is_none()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{f16_at, BlockKind, QK, TILE};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Dot products of one packed weight row with `tile` activation rows starting at `i0`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_dot(
        kind: BlockKind,
        row: &[u8],
        nb: usize,
        x: &[f32],
        sums: &[f32],
        k: usize,
        i0: usize,
        tile: usize,
        acc: &mut [f32; TILE],
    ) {
        let bb = kind.bytes();
        let mut vacc = [_mm256_setzero_ps(); TILE];
        let mut offs = [0f32; TILE];
        let mask = _mm_set1_epi8(0x0F);
        for b in 0..nb {
            let blk = row.as_ptr().add(b * bb);
            let d = f16_at(row, b * bb);
            // Four vectors of 8 quantized values (elements 0-7, 8-15, 16-23, 24-31).
            let (q0, q1, q2, q3, m) = match kind {
                BlockKind::Q8_0 => {
                    let lo = _mm_loadu_si128(blk.add(2) as *const __m128i);
                    let hi = _mm_loadu_si128(blk.add(18) as *const __m128i);
                    (
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
                        0.0,
                    )
                }
                BlockKind::Q4_0 | BlockKind::Q4_1 => {
                    let (qs, m) = match kind {
                        BlockKind::Q4_0 => (blk.add(2), -8.0 * d),
                        _ => (blk.add(4), f16_at(row, b * bb + 2)),
                    };
                    let raw = _mm_loadu_si128(qs as *const __m128i);
                    let lo = _mm_and_si128(raw, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                    (
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                        m,
                    )
                }
            };
            let dv = _mm256_set1_ps(d);
            for t in 0..tile {
                let xp = x.as_ptr().add((i0 + t) * k + b * QK);
                let mut s = _mm256_mul_ps(q0, _mm256_loadu_ps(xp));
                s = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xp.add(8)), s);
                s = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xp.add(16)), s);
                s = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xp.add(24)), s);
                vacc[t] = _mm256_fmadd_ps(s, dv, vacc[t]);
                offs[t] += m * sums[(i0 + t) * nb + b];
            }
        }
        for t in 0..tile {
            acc[t] = hsum(vacc[t]) + offs[t];
        }
    }
}
