//! GGUF's K-quants (Q4_K, Q5_K, Q6_K) and 5-bit types (Q5_0, Q5_1) × f32 activations on the
//! CPU, held as the file stores them (memory = the file's bytes) and exact with respect to the
//! dequantized weights.
//!
//! Each block is unpacked to f32 with ggml's own formula (the same operations in the same order
//! as candle's `to_float`, so [`RawWeight::dequantize`] equals candle's dequantization bit for
//! bit), then multiplied with f32 activations: the result equals `x · dequantize(W)ᵀ` up to f32
//! summation order. Few rows (decode) go through a kernel that unpacks a block once per tile of
//! activation rows; many rows (prefill) dequantize a slab of weight rows at a time into scratch
//! memory and multiply it with gemm (candle's CPU matmul), so no f32 copy of the model is kept.
//! [`matmul_reference`] is the plain version both are tested against.

use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

/// The block types held here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawKind {
    Q4K,
    Q5K,
    Q6K,
    Q5_0,
    Q5_1,
}

impl RawKind {
    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        Some(match t {
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            _ => return None,
        })
    }

    /// Weights per block.
    pub fn block_len(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
            Self::Q5_0 | Self::Q5_1 => 32,
        }
    }

    /// Bytes per block (ggml's `type_size`).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
        }
    }
}

/// Weights `(n, k)` as GGUF stores them: row `r`'s blocks are bytes
/// `r·row_bytes .. (r+1)·row_bytes`.
pub struct RawWeight {
    kind: RawKind,
    n: usize,
    k: usize,
    bytes: Vec<u8>,
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Scale and min of sub-block `j` of a Q4_K / Q5_K block (ggml's `get_scale_min_k4`).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// One block to f32, as ggml's `dequantize_row_*` computes it. `out` holds `block_len` values.
/// Each type's loops are branch-free over fixed-size runs, so that they vectorize.
#[inline(always)]
fn unpack(kind: RawKind, blk: &[u8], out: &mut [f32]) {
    match kind {
        RawKind::Q4K => unpack_q4k(blk.try_into().unwrap(), out.try_into().unwrap()),
        RawKind::Q5K => unpack_q5k(blk.try_into().unwrap(), out.try_into().unwrap()),
        RawKind::Q6K => unpack_q6k(blk.try_into().unwrap(), out.try_into().unwrap()),
        RawKind::Q5_0 => unpack_q5::<false>(blk, out.try_into().unwrap()),
        RawKind::Q5_1 => unpack_q5::<true>(blk, out.try_into().unwrap()),
    }
}

/// Q4_K: d, dmin (f16), scales[12] (6-bit scale and min per 32 values), qs[128].
#[inline(always)]
fn unpack_q4k(blk: &[u8; 144], out: &mut [f32; 256]) {
    let (d, min) = (f16_at(blk, 0), f16_at(blk, 2));
    let scales = &blk[4..16];
    for g in 0..4 {
        let q: &[u8; 32] = blk[16 + g * 32..16 + g * 32 + 32].try_into().unwrap();
        let (sc, m) = scale_min_k4(2 * g, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * g + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let (lo, hi) = out[g * 64..g * 64 + 64].split_at_mut(32);
        for l in 0..32 {
            lo[l] = d1 * (q[l] & 0xF) as f32 - m1;
        }
        for l in 0..32 {
            hi[l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: d, dmin (f16), scales[12], qh[32] (fifth bits), qs[128].
#[inline(always)]
fn unpack_q5k(blk: &[u8; 176], out: &mut [f32; 256]) {
    let (d, min) = (f16_at(blk, 0), f16_at(blk, 2));
    let scales = &blk[4..16];
    let qh: &[u8; 32] = blk[16..48].try_into().unwrap();
    for g in 0..4 {
        let ql: &[u8; 32] = blk[48 + g * 32..48 + g * 32 + 32].try_into().unwrap();
        let (sc, m) = scale_min_k4(2 * g, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min_k4(2 * g + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let (lo, hi) = out[g * 64..g * 64 + 64].split_at_mut(32);
        // The high bit as 0 or 16 added in f32, as ggml adds it (exact either way).
        for l in 0..32 {
            let h = (((qh[l] >> (2 * g)) & 1) << 4) as f32;
            lo[l] = d1 * ((ql[l] & 0xF) as f32 + h) - m1;
        }
        for l in 0..32 {
            let h = (((qh[l] >> (2 * g + 1)) & 1) << 4) as f32;
            hi[l] = d2 * ((ql[l] >> 4) as f32 + h) - m2;
        }
    }
}

/// Q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (i8, per 16 values), d (f16).
#[inline(always)]
fn unpack_q6k(blk: &[u8; 210], out: &mut [f32; 256]) {
    let d = f16_at(blk, 208);
    for half in 0..2 {
        let ql: &[u8; 64] = blk[64 * half..64 * half + 64].try_into().unwrap();
        let qh: &[u8; 32] = blk[128 + 32 * half..128 + 32 * half + 32]
            .try_into()
            .unwrap();
        let sc = &blk[192 + 8 * half..192 + 8 * half + 8];
        let o = &mut out[128 * half..128 * half + 128];
        for is in 0..2 {
            let s = [
                d * sc[is] as i8 as f32,
                d * sc[is + 2] as i8 as f32,
                d * sc[is + 4] as i8 as f32,
                d * sc[is + 6] as i8 as f32,
            ];
            for l in 16 * is..16 * is + 16 {
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                o[l] = s[0] * q1 as f32;
            }
            for l in 16 * is..16 * is + 16 {
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                o[l + 32] = s[1] * q2 as f32;
            }
            for l in 16 * is..16 * is + 16 {
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                o[l + 64] = s[2] * q3 as f32;
            }
            for l in 16 * is..16 * is + 16 {
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                o[l + 96] = s[3] * q4 as f32;
            }
        }
    }
}

/// Q5_0 (`OFFSET` false): d (f16), qh (u32), qs[16]; w = (q − 16)·d.
/// Q5_1 (`OFFSET` true): d, m (f16), qh, qs[16]; w = q·d + m.
#[inline(always)]
fn unpack_q5<const OFFSET: bool>(blk: &[u8], out: &mut [f32; 32]) {
    let d = f16_at(blk, 0);
    let at = if OFFSET { 4 } else { 2 };
    let qh = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
    let qs: &[u8; 16] = blk[at + 4..at + 20].try_into().unwrap();
    let (lo, hi) = out.split_at_mut(16);
    if OFFSET {
        let m = f16_at(blk, 2);
        for j in 0..16 {
            let x = (qs[j] & 0x0F) as u32 | (((qh >> j) & 1) << 4);
            lo[j] = x as f32 * d + m;
        }
        for j in 0..16 {
            let x = (qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
            hi[j] = x as f32 * d + m;
        }
    } else {
        for j in 0..16 {
            let x = (qs[j] & 0x0F) as u32 | (((qh >> j) & 1) << 4);
            lo[j] = (x as i32 - 16) as f32 * d;
        }
        for j in 0..16 {
            let x = (qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
            hi[j] = (x as i32 - 16) as f32 * d;
        }
    }
}

impl RawWeight {
    /// Takes a GGUF tensor of a type held here; `None` for other types.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let (n, k) = q.shape().dims2()?;
        let Some(kind) = RawKind::from_ggml(q.dtype()).filter(|_| Self::takes(q.dtype(), k)) else {
            return Ok(None);
        };
        let bytes = q.data()?.into_owned();
        if bytes.len() != n * k / kind.block_len() * kind.block_bytes() {
            bail!(
                "{kind:?} weight: {} bytes for a {n}x{k} tensor",
                bytes.len()
            );
        }
        Ok(Some(Self { kind, n, k, bytes }))
    }

    /// Rows of several weights with the same block type and input size, stacked; `None` when
    /// they differ.
    pub fn stack(parts: &[&RawWeight]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.kind != first.kind || p.k != first.k) {
            return None;
        }
        Some(Self {
            kind: first.kind,
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
            bytes: parts.iter().flat_map(|p| p.bytes.iter().copied()).collect(),
        })
    }

    /// Whether a weight of `dtype` with rows of `k` is held as stored here.
    pub fn takes(dtype: GgmlDType, k: usize) -> bool {
        RawKind::from_ggml(dtype).is_some_and(|t| k.is_multiple_of(t.block_len()))
    }

    pub fn kind(&self) -> RawKind {
        self.kind
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held (the file's bytes for this tensor).
    pub fn bytes_held(&self) -> usize {
        self.bytes.len()
    }

    fn row_bytes(&self) -> usize {
        self.k / self.kind.block_len() * self.kind.block_bytes()
    }

    /// Rows `r0..r0 + out.len() / k` dequantized into `out`, row-major.
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        let (bl, bb, rb) = (
            self.kind.block_len(),
            self.kind.block_bytes(),
            self.row_bytes(),
        );
        for (i, row) in out.chunks_exact_mut(self.k).enumerate() {
            let bytes = &self.bytes[(r0 + i) * rb..(r0 + i + 1) * rb];
            for (blk, o) in bytes.chunks_exact(bb).zip(row.chunks_exact_mut(bl)) {
                unpack(self.kind, blk, o);
            }
        }
    }

    /// Dequantized weights `(n, k)`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        self.dequantize_rows(0, &mut out);
        out
    }
}

/// Plain reference: `out (m, n) = x (m, k) · dequantize(W)ᵀ`.
pub fn matmul_reference(x: &[f32], m: usize, w: &RawWeight) -> Vec<f32> {
    crate::engine::packed::dense_reference(x, m, &w.dequantize(), w.n, w.k)
}

/// Activation rows up to which the block kernels are used; more go through slabs and gemm.
/// Below it, gemm over f32 weights is bound by reading them (on 2 cores, SmolLM2-135M Q4_1:
/// block kernel 282 / 265 tok/s at 32 / 128 rows, f32 gemm 157 / 284; slabs win from ~200).
pub const KERNEL_MAX_ROWS: usize = 192;

/// Activation rows one pass over a weight row multiplies (its accumulators stay in registers).
const TILE: usize = 8;

/// f32 values of dequantized weight rows one prefill slab holds at most (16 MiB).
const SLAB_VALUES: usize = 4 << 20;

/// `out (m, n) = x (m, k) · dequantize(W)ᵀ`.
pub fn matmul(x: &[f32], m: usize, w: &RawWeight) -> Result<Vec<f32>> {
    if x.len() != m * w.k {
        bail!(
            "{:?} matmul: x has {} values, expected {m}x{}",
            w.kind,
            x.len(),
            w.k
        );
    }
    if m > KERNEL_MAX_ROWS {
        Ok(matmul_slabs(x, m, w))
    } else {
        Ok(matmul_kernel(x, m, w, simd()))
    }
}

/// [`matmul`]'s block kernel on every instruction set this CPU has, portable first, for
/// comparisons.
pub fn matmul_kernel_all_isas(x: &[f32], m: usize, w: &RawWeight) -> Vec<(&'static str, Vec<f32>)> {
    let mut out = vec![("portable", matmul_kernel(x, m, w, false))];
    if simd() {
        out.push(("avx512", matmul_kernel(x, m, w, true)));
    }
    out
}

/// [`matmul`]'s slab path whatever the row count, for comparisons.
pub fn matmul_slabs_for_test(x: &[f32], m: usize, w: &RawWeight) -> Vec<f32> {
    matmul_slabs(x, m, w)
}

fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("WILDLONG_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Each weight row's dot products, a tile of activation rows at a time (each block unpacked
/// once per tile); `by_weight_rows` splits the rows into tasks and lays out the output.
fn matmul_kernel(x: &[f32], m: usize, w: &RawWeight, simd: bool) -> Vec<f32> {
    let work = |r0: usize, chunk: &mut [f32]| {
        for (ri, dst) in chunk.chunks_exact_mut(m).enumerate() {
            let mut i0 = 0;
            while i0 < m {
                let t = TILE.min(m - i0);
                let mut acc = [0f32; TILE];
                row_tile(w, r0 + ri, x, i0, t, &mut acc, simd);
                dst[i0..i0 + t].copy_from_slice(&acc[..t]);
                i0 += t;
            }
        }
    };
    crate::engine::packed::by_weight_rows(w.n, w.k, m, &work)
}

fn row_tile(
    w: &RawWeight,
    r: usize,
    x: &[f32],
    i0: usize,
    t: usize,
    acc: &mut [f32; TILE],
    simd: bool,
) {
    macro_rules! dispatch {
        ($($f:ident)::+) => {
            match t {
                1 => $($f)::+::<1>(w, r, x, i0, acc),
                2 => $($f)::+::<2>(w, r, x, i0, acc),
                3 => $($f)::+::<3>(w, r, x, i0, acc),
                4 => $($f)::+::<4>(w, r, x, i0, acc),
                5 => $($f)::+::<5>(w, r, x, i0, acc),
                6 => $($f)::+::<6>(w, r, x, i0, acc),
                7 => $($f)::+::<7>(w, r, x, i0, acc),
                _ => $($f)::+::<8>(w, r, x, i0, acc),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX-512F/BW/VL, FMA and F16C were detected at run time; x holds the m·k
        // values the caller checked, and i0 + t ≤ m.
        unsafe { dispatch!(avx512::row) };
        return;
    }
    let _ = simd;
    dispatch!(row_tile_portable)
}

/// Dot products of weight row `r` with activation rows `i0..i0 + T`, portable: up to 256
/// weights at a time unpacked into a buffer (with [`unpack`], the reference's own formula),
/// then multiplied with each activation row in four independent 16-lane accumulators (one
/// chain would wait on each add's latency).
fn row_tile_portable<const T: usize>(
    w: &RawWeight,
    r: usize,
    x: &[f32],
    i0: usize,
    acc: &mut [f32; TILE],
) {
    const L: usize = 16;
    const A: usize = 4;
    let (bl, bb, rb) = (w.kind.block_len(), w.kind.block_bytes(), w.row_bytes());
    let bytes = &w.bytes[r * rb..(r + 1) * rb];
    let (per, nb) = (256 / bl, w.k / bl);
    let mut buf = [0f32; 256];
    let mut lanes = [[0f32; L]; T];
    let mut b = 0;
    while b < nb {
        let blocks = per.min(nb - b);
        let len = blocks * bl;
        for j in 0..blocks {
            let at = (b + j) * bb;
            unpack(w.kind, &bytes[at..at + bb], &mut buf[j * bl..(j + 1) * bl]);
        }
        let wv = &buf[..len];
        for (t, lane) in lanes.iter_mut().enumerate() {
            let at = (i0 + t) * w.k + b * bl;
            let xs = &x[at..at + len];
            let mut p = [[0f32; L]; A];
            let (wc, xc) = (wv.chunks_exact(L * A), xs.chunks_exact(L * A));
            let (wr, xr) = (wc.remainder(), xc.remainder());
            for (wc, xc) in wc.zip(xc) {
                for a in 0..A {
                    for l in 0..L {
                        p[a][l] += wc[a * L + l] * xc[a * L + l];
                    }
                }
            }
            for (wc, xc) in wr.chunks_exact(L).zip(xr.chunks_exact(L)) {
                for l in 0..L {
                    p[0][l] += wc[l] * xc[l];
                }
            }
            for l in 0..L {
                lane[l] += (p[0][l] + p[1][l]) + (p[2][l] + p[3][l]);
            }
        }
        b += blocks;
    }
    for (a, lane) in acc.iter_mut().zip(&lanes) {
        *a = lane.iter().sum();
    }
}

/// The block kernel on AVX-512: each run of 32 weights is unpacked in registers from the bytes
/// GGUF stores (nibbles split with byte masks, Q5's fifth bits added under a byte mask,
/// Q6_K's high bits shifted in), converted to f32 and scaled by ggml's formula, then multiplied
/// with every activation row of the tile. The weights equal [`unpack`]'s up to one rounding
/// (a fused `q·d − m` where ggml rounds twice).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{scale_min_k4, RawKind, RawWeight, TILE};
    use std::arch::x86_64::*;

    // Helpers are macros: a `#[target_feature]` function cannot be `#[inline(always)]`, and
    // as calls they would pass vectors through memory.

    /// The f16 at byte `$i` of `$p`, as f32 (exact, as every f16 is an f32).
    macro_rules! f16_at {
        ($p:expr, $i:expr) => {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                ($p.add($i) as *const u16).read_unaligned() as i32,
            )))
        };
    }

    /// Two vectors of 16 f32 from 32 bytes: signed (`i8`) or unsigned (`u8`).
    macro_rules! widen {
        (i8, $v:expr) => {{
            let v: __m256i = $v;
            (
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v))),
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1))),
            )
        }};
        (u8, $v:expr) => {{
            let v: __m256i = $v;
            (
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(v))),
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(v, 1))),
            )
        }};
    }

    /// `acc[t]` += the run's weights `(w0, w1)` · activation row `i0 + t` at column `col`, into
    /// accumulator pair `S` (two pairs while the tile has few rows, so that one row's adds do
    /// not wait on each other; one pair when the tile's rows already give independent chains).
    macro_rules! run {
        ($acc:ident, $x:ident, $k:expr, $i0:expr, $col:expr, $S:literal, $w:expr) => {{
            let (w0, w1): (__m512, __m512) = $w;
            let s = if T > 2 { 0 } else { 2 * $S };
            for (t, a) in $acc.iter_mut().enumerate() {
                let xp = $x.as_ptr().add(($i0 + t) * $k + $col);
                a[s] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a[s]);
                a[s + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), a[s + 1]);
            }
        }};
    }

    /// Q5_0 / Q5_1 block at `$p` (`OFFSET`: Q5_1's min): its 32 weights.
    macro_rules! q5 {
        ($p:expr, $offset:expr) => {{
            let p: *const u8 = $p;
            let at = if $offset { 4 } else { 2 };
            let d = _mm512_set1_ps(f16_at!(p, 0));
            let qh = (p.add(at) as *const u32).read_unaligned();
            let qs = _mm_loadu_si128(p.add(at + 4) as *const __m128i);
            let m4 = _mm_set1_epi8(0x0F);
            // Bytes 0..16: the low nibbles (weights 0..16); 16..32: the high ones.
            let v = _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16(qs, 4), m4),
                _mm_and_si128(qs, m4),
            );
            let v = _mm256_mask_add_epi8(v, qh, v, _mm256_set1_epi8(16));
            if $offset {
                let m = _mm512_set1_ps(f16_at!(p, 2));
                let (q0, q1) = widen!(u8, v);
                (_mm512_fmadd_ps(q0, d, m), _mm512_fmadd_ps(q1, d, m))
            } else {
                let (q0, q1) = widen!(i8, _mm256_sub_epi8(v, _mm256_set1_epi8(16)));
                (_mm512_mul_ps(q0, d), _mm512_mul_ps(q1, d))
            }
        }};
    }

    /// 32 unsigned values scaled as a K-quant sub-block: `q·d − m`.
    macro_rules! scaled {
        ($v:expr, $d:expr, $m:expr) => {{
            let (q0, q1) = widen!(u8, $v);
            let (d, m) = (_mm512_set1_ps($d), _mm512_set1_ps(-$m));
            (_mm512_fmadd_ps(q0, d, m), _mm512_fmadd_ps(q1, d, m))
        }};
    }

    /// 32 values of Q6_K (6 bits, offset 32) with scales `$s0` (first 16) and `$s1`.
    macro_rules! q6 {
        ($v:expr, $s0:expr, $s1:expr) => {{
            let (q0, q1) = widen!(i8, _mm256_sub_epi8($v, _mm256_set1_epi8(32)));
            (
                _mm512_mul_ps(q0, _mm512_set1_ps($s0)),
                _mm512_mul_ps(q1, _mm512_set1_ps($s1)),
            )
        }};
    }

    /// Dot products of weight row `r` with activation rows `i0..i0 + T`.
    ///
    /// # Safety
    /// AVX-512F/BW/VL, FMA and F16C must be available; `x` holds at least `(i0 + T)·k` values
    /// and `r < n`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
    pub unsafe fn row<const T: usize>(
        w: &RawWeight,
        r: usize,
        x: &[f32],
        i0: usize,
        out: &mut [f32; TILE],
    ) {
        let (k, bb) = (w.k, w.kind.block_bytes());
        let nb = k / w.kind.block_len();
        let base = w.bytes.as_ptr().add(r * w.row_bytes());
        let mut acc = [[_mm512_setzero_ps(); 4]; T];
        let m4 = _mm256_set1_epi8(0x0F);
        match w.kind {
            RawKind::Q5_0 | RawKind::Q5_1 => {
                let offset = w.kind == RawKind::Q5_1;
                let mut b = 0;
                while b + 2 <= nb {
                    run!(acc, x, k, i0, b * 32, 0, q5!(base.add(b * bb), offset));
                    run!(
                        acc,
                        x,
                        k,
                        i0,
                        b * 32 + 32,
                        1,
                        q5!(base.add(b * bb + bb), offset)
                    );
                    b += 2;
                }
                if b < nb {
                    run!(acc, x, k, i0, b * 32, 0, q5!(base.add(b * bb), offset));
                }
            }
            RawKind::Q4K | RawKind::Q5K => {
                let five = w.kind == RawKind::Q5K;
                for b in 0..nb {
                    let p = base.add(b * bb);
                    let (d, min) = (f16_at!(p, 0), f16_at!(p, 2));
                    let scales = std::slice::from_raw_parts(p.add(4), 12);
                    let (qs, qh) = if five {
                        (p.add(48), _mm256_loadu_si256(p.add(16) as *const __m256i))
                    } else {
                        (p.add(16), _mm256_setzero_si256())
                    };
                    for g in 0..4 {
                        let raw = _mm256_loadu_si256(qs.add(32 * g) as *const __m256i);
                        let mut lo = _mm256_and_si256(raw, m4);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                        if five {
                            let sixteen = _mm256_set1_epi8(16);
                            let bit = |j: usize| _mm256_set1_epi8((1u8 << j) as i8);
                            let ml = _mm256_test_epi8_mask(qh, bit(2 * g));
                            let mh = _mm256_test_epi8_mask(qh, bit(2 * g + 1));
                            lo = _mm256_mask_add_epi8(lo, ml, lo, sixteen);
                            hi = _mm256_mask_add_epi8(hi, mh, hi, sixteen);
                        }
                        let (sc, m) = scale_min_k4(2 * g, scales);
                        let col = b * 256 + 64 * g;
                        run!(
                            acc,
                            x,
                            k,
                            i0,
                            col,
                            0,
                            scaled!(lo, d * sc as f32, min * m as f32)
                        );
                        let (sc, m) = scale_min_k4(2 * g + 1, scales);
                        run!(
                            acc,
                            x,
                            k,
                            i0,
                            col + 32,
                            1,
                            scaled!(hi, d * sc as f32, min * m as f32)
                        );
                    }
                }
            }
            RawKind::Q6K => {
                let m3 = _mm256_set1_epi8(3);
                for b in 0..nb {
                    let p = base.add(b * bb);
                    let d = f16_at!(p, 208);
                    for h in 0..2 {
                        let ql = p.add(64 * h);
                        let a = _mm256_loadu_si256(ql as *const __m256i);
                        let c = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                        let hv = _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i);
                        let s = |i: usize| d * *(p.add(192 + 8 * h + i) as *const i8) as f32;
                        let high = |shift: i32| {
                            let v = match shift {
                                0 => hv,
                                2 => _mm256_srli_epi16(hv, 2),
                                4 => _mm256_srli_epi16(hv, 4),
                                _ => _mm256_srli_epi16(hv, 6),
                            };
                            _mm256_slli_epi16(_mm256_and_si256(v, m3), 4)
                        };
                        let q1 = _mm256_or_si256(_mm256_and_si256(a, m4), high(0));
                        let q2 = _mm256_or_si256(_mm256_and_si256(c, m4), high(2));
                        let q3 =
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), high(4));
                        let q4 =
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), m4), high(6));
                        let col = b * 256 + 128 * h;
                        run!(acc, x, k, i0, col, 0, q6!(q1, s(0), s(1)));
                        run!(acc, x, k, i0, col + 32, 1, q6!(q2, s(2), s(3)));
                        run!(acc, x, k, i0, col + 64, 0, q6!(q3, s(4), s(5)));
                        run!(acc, x, k, i0, col + 96, 1, q6!(q4, s(6), s(7)));
                    }
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = _mm512_reduce_add_ps(_mm512_add_ps(
                _mm512_add_ps(a[0], a[1]),
                _mm512_add_ps(a[2], a[3]),
            ));
        }
    }
}

/// Many activation rows: slabs of weight rows dequantized into scratch (in parallel), each
/// multiplied by gemm straight into its output columns.
fn matmul_slabs(x: &[f32], m: usize, w: &RawWeight) -> Vec<f32> {
    slab_matmul(x, m, w.n, w.k, &|r0, out| w.dequantize_rows(r0, out))
}

/// `out (m, n) = x (m, k) · Wᵀ` for a weight `(n, k)` held in some compressed form, where
/// `deq(r0, out)` writes rows `r0..r0 + out.len() / k` of W as f32: slabs of at most 16 MiB of
/// weight rows are dequantized (in parallel) and multiplied by gemm straight into their output
/// columns, so no f32 copy of the weight outlives the call.
pub(crate) fn slab_matmul(
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    deq: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    let rows = (SLAB_VALUES / k.max(1)).clamp(1, n.max(1));
    let mut slab = vec![0f32; rows * k];
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // Rows dequantized per parallel task.
    const DEQ_ROWS: usize = 16;
    let mut r0 = 0;
    while r0 < n {
        let nr = rows.min(n - r0);
        let s = &mut slab[..nr * k];
        s.par_chunks_mut(k * DEQ_ROWS)
            .enumerate()
            .for_each(|(i, c)| deq(r0 + i * DEQ_ROWS, c));
        // SAFETY: dst is the (m, nr) block of `out` at column r0 (row stride n); lhs is x
        // (m, k) row-major; rhs is the slab read as (k, nr) (column j = weight row r0 + j).
        // Every pointer stays inside its buffer for these extents.
        unsafe {
            gemm::gemm(
                m,
                nr,
                k,
                out.as_mut_ptr().add(r0),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                s.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        r0 += nr;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn weights(t: GgmlDType, n: usize, k: usize, seed: u64) -> (QTensor, RawWeight) {
        // A spread of magnitudes per row, so that block scales and mins differ.
        let vals: Vec<f32> = (0..n * k)
            .map(|i| {
                let h = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
                let u = h as f32 / (1u64 << 24) as f32 - 0.5;
                u * (1.0 + (i / k % 7) as f32) + if i % 97 == 0 { 0.3 } else { 0.0 }
            })
            .collect();
        let q =
            QTensor::quantize(&Tensor::from_vec(vals, (n, k), &Device::Cpu).unwrap(), t).unwrap();
        let w = RawWeight::from_qtensor(&q).unwrap().unwrap();
        (q, w)
    }

    const TYPES: [GgmlDType; 5] = [
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
    ];

    #[test]
    fn dequantization_equals_candles_bit_for_bit() {
        for t in TYPES {
            let (q, w) = weights(t, 5, 512, 1);
            let theirs = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let ours = w.dequantize();
            assert_eq!(ours.len(), theirs.len());
            let differ = ours
                .iter()
                .zip(&theirs)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differ, 0, "{t:?}: {differ} values differ from candle's");
            assert!(ours.iter().any(|v| *v != 0.0), "{t:?}: all zero");
            assert_eq!(w.bytes_held(), q.storage_size_in_bytes(), "{t:?}");
        }
    }

    #[test]
    fn kernels_and_slabs_match_the_reference_for_every_row_count() {
        for t in TYPES {
            let (_, w) = weights(t, 37, 768, 7);
            for m in [1, 2, 5, 8, 9, 16, 17, 40, 200] {
                let x: Vec<f32> = (0..m * w.k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
                    .collect();
                let want = matmul_reference(&x, m, &w);
                let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
                let mut got = vec![("matmul", matmul(&x, m, &w).unwrap())];
                got.push(("slabs", matmul_slabs_for_test(&x, m, &w)));
                got.extend(matmul_kernel_all_isas(&x, m, &w));
                for (name, g) in got {
                    let err = g
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        err <= 2e-5 * scale,
                        "{t:?} {name} m={m}: max error {err} (scale {scale})"
                    );
                }
            }
        }
    }

    #[test]
    fn stacking_keeps_each_parts_rows() {
        let (_, a) = weights(GgmlDType::Q4K, 3, 256, 2);
        let (_, b) = weights(GgmlDType::Q4K, 2, 256, 3);
        let s = RawWeight::stack(&[&a, &b]).unwrap();
        assert_eq!(s.dims(), (5, 256));
        let mut want = a.dequantize();
        want.extend(b.dequantize());
        assert_eq!(s.dequantize(), want);
        let (_, c) = weights(GgmlDType::Q6K, 2, 256, 4);
        assert!(RawWeight::stack(&[&a, &c]).is_none());
    }

    #[test]
    fn only_the_types_held_here_are_taken() {
        let q = QTensor::quantize(
            &Tensor::zeros((2, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::Q5_0,
        )
        .unwrap();
        assert!(RawWeight::from_qtensor(&q).unwrap().is_some());
        let q8 = QTensor::quantize(
            &Tensor::zeros((2, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        assert!(RawWeight::from_qtensor(&q8).unwrap().is_none());
    }
}
