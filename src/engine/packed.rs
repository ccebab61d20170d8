//! Quantized weights × f32 activations on the CPU, exact with respect to the dequantized weights.
//!
//! candle's quantized matmul quantizes the activations to 8 bits (and runs Q4_1 on a scalar
//! path), which flips near-tied greedy choices of small models. These kernels keep GGUF's
//! Q4_0 / Q4_1 / Q8_0 blocks in memory (4.5–8.5 bits per weight, so decode reads 4–7× fewer
//! bytes than f32) and multiply them with f32 activations: the result equals
//! `x · dequantize(W)ᵀ` up to f32 summation order. [`matmul_reference`] is the plain
//! version every fast path is tested against; the AVX2+FMA path is chosen at run time.

use anyhow::{bail, Context, Result};
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

/// Weights `(n, k)` from GGUF blocks, repacked at load: per block an f32 scale `d` and offset
/// `m` (w = q·d + m) and the quantized values (16 nibble bytes for Q4, 32 signed bytes for Q8).
pub struct PackedWeight {
    kind: BlockKind,
    n: usize,
    k: usize,
    nb: usize,
    scales: Vec<f32>,
    offsets: Vec<f32>,
    qs: Vec<u8>,
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

impl BlockKind {
    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        Some(match t {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            _ => return None,
        })
    }

    /// Bytes of quantized values per block after repacking.
    pub fn qbytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => 16,
            Self::Q8_0 => 32,
        }
    }
}

impl PackedWeight {
    /// Takes a GGUF tensor of a supported block type; `None` for other types.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let (n, k) = q.shape().dims2()?;
        if !Self::takes(q.dtype(), k) {
            return Ok(None);
        }
        let kind = BlockKind::from_ggml(q.dtype()).context("packed block type")?;
        let data = q.data()?;
        let nb = k / QK;
        if data.len() != n * nb * kind.bytes() {
            bail!(
                "packed weight: {} bytes for a {n}x{k} {kind:?} tensor",
                data.len()
            );
        }
        let mut scales = Vec::with_capacity(n * nb);
        let mut offsets = Vec::with_capacity(n * nb);
        let mut qs = Vec::with_capacity(n * nb * kind.qbytes());
        for blk in data.chunks_exact(kind.bytes()) {
            let d = f16_at(blk, 0);
            scales.push(d);
            match kind {
                BlockKind::Q4_0 => {
                    offsets.push(-8.0 * d);
                    qs.extend_from_slice(&blk[2..18]);
                }
                BlockKind::Q4_1 => {
                    offsets.push(f16_at(blk, 2));
                    qs.extend_from_slice(&blk[4..20]);
                }
                BlockKind::Q8_0 => {
                    offsets.push(0.0);
                    qs.extend_from_slice(&blk[2..34]);
                }
            }
        }
        Ok(Some(Self {
            kind,
            n,
            k,
            nb,
            scales,
            offsets,
            qs,
        }))
    }

    /// Rows of several weights with the same block type and input size, stacked.
    pub fn stack(parts: &[&PackedWeight]) -> Result<Option<Self>> {
        let Some(first) = parts.first() else {
            bail!("stacking no weights")
        };
        if parts.iter().any(|p| p.kind != first.kind || p.k != first.k) {
            return Ok(None);
        }
        let cat = |f: &dyn Fn(&PackedWeight) -> &[f32]| {
            parts
                .iter()
                .flat_map(|p| f(p).iter().copied())
                .collect::<Vec<f32>>()
        };
        Ok(Some(Self {
            kind: first.kind,
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
            nb: first.nb,
            scales: cat(&|p| &p.scales),
            offsets: cat(&|p| &p.offsets),
            qs: parts.iter().flat_map(|p| p.qs.iter().copied()).collect(),
        }))
    }

    /// Whether a weight of `dtype` with rows of `k` is held packed.
    pub fn takes(dtype: GgmlDType, k: usize) -> bool {
        BlockKind::from_ggml(dtype).is_some() && k.is_multiple_of(QK)
    }

    /// Bytes a packed `(n, k)` weight holds: per block an f32 scale and offset and the values.
    pub fn bytes_for(kind: BlockKind, n: usize, k: usize) -> usize {
        n * (k / QK) * (8 + kind.qbytes())
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.qs.len() + 4 * (self.scales.len() + self.offsets.len())
    }

    pub fn kind(&self) -> BlockKind {
        self.kind
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Block `b` of row `r` as stored: its quantized bytes, scale and offset (w = q·d + m).
    pub(crate) fn block(&self, r: usize, b: usize) -> (&[u8], f32, f32) {
        let i = r * self.nb + b;
        let qb = self.kind.qbytes();
        (
            &self.qs[i * qb..(i + 1) * qb],
            self.scales[i],
            self.offsets[i],
        )
    }

    /// Block `b` of row `r`: 32 quantized values as f32 (w = q·d + m).
    fn block_values(&self, r: usize, b: usize) -> [f32; QK] {
        let i = r * self.nb + b;
        let qb = self.kind.qbytes();
        let raw = &self.qs[i * qb..(i + 1) * qb];
        let mut q = [0f32; QK];
        match self.kind {
            BlockKind::Q4_0 | BlockKind::Q4_1 => {
                for j in 0..16 {
                    q[j] = (raw[j] & 0x0F) as f32;
                    q[j + 16] = (raw[j] >> 4) as f32;
                }
            }
            BlockKind::Q8_0 => {
                for j in 0..QK {
                    q[j] = raw[j] as i8 as f32;
                }
            }
        }
        q
    }

    /// Dequantized weights `(n, k)`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        self.dequantize_rows(0, &mut out);
        out
    }

    /// Rows `r0..r0 + out.len() / k` dequantized into `out`, row-major.
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        for (i, row) in out.chunks_exact_mut(self.k).enumerate() {
            let r = r0 + i;
            for (b, o) in row.chunks_exact_mut(QK).enumerate() {
                let (d, m) = (self.scales[r * self.nb + b], self.offsets[r * self.nb + b]);
                for (o, q) in o.iter_mut().zip(self.block_values(r, b)) {
                    *o = q * d + m;
                }
            }
        }
    }
}

/// Plain reference: `out (m, n) = x (m, k) · dequantize(W)ᵀ`.
pub fn matmul_reference(x: &[f32], m: usize, w: &PackedWeight) -> Vec<f32> {
    dense_reference(x, m, &w.dequantize(), w.n, w.k)
}

/// `out (m, n) = x (m, k) · Wᵀ` for a row-major f32 `w (n, k)`, by plain loops: the reference
/// every block kernel is tested against.
pub(crate) fn dense_reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for r in 0..n {
            out[i * n + r] = x[i * k..(i + 1) * k]
                .iter()
                .zip(&w[r * k..(r + 1) * k])
                .map(|(a, b)| a * b)
                .sum();
        }
    }
    out
}

/// Below this many multiply-adds a call runs on the calling thread (waking the pool costs more).
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// Activation rows of the two-weight-row AVX-512 kernel.
const PAIR_TILE: usize = 8;

/// Activation rows multiplied per pass over a weight row (accumulators held in registers).
const MAX_TILE: usize = 16;

fn max_tile(isa: Isa) -> usize {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => 16,
        _ => 4,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn best_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            if std::env::var_os("WILDLONG_NO_SIMD").is_some() {
                Isa::Portable
            } else if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                Isa::Avx512
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Isa::Avx2
            } else {
                Isa::Portable
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Portable
    }
}

/// The instruction set the fast path uses here.
pub fn isa_name() -> &'static str {
    match best_isa() {
        Isa::Portable => "portable",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => "avx2+fma",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => "avx512f",
    }
}

/// `out (m, n) = x (m, k) · dequantize(W)ᵀ`, parallel over output features, SIMD when available.
pub fn matmul(x: &[f32], m: usize, w: &PackedWeight) -> Result<Vec<f32>> {
    matmul_with(x, m, w, best_isa())
}

/// [`matmul`] on every instruction set this CPU has, portable first, for comparisons.
pub fn matmul_all_isas(
    x: &[f32],
    m: usize,
    w: &PackedWeight,
) -> Result<Vec<(&'static str, Vec<f32>)>> {
    let mut out = vec![("portable", matmul_with(x, m, w, Isa::Portable)?)];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            out.push(("avx2", matmul_with(x, m, w, Isa::Avx2)?));
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            out.push(("avx512", matmul_with(x, m, w, Isa::Avx512)?));
        }
    }
    Ok(out)
}

fn matmul_with(x: &[f32], m: usize, w: &PackedWeight, isa: Isa) -> Result<Vec<f32>> {
    if x.len() != m * w.k {
        bail!(
            "packed matmul: x has {} values, expected {m}x{}",
            x.len(),
            w.k
        );
    }
    // Each task computes its weight rows n-major (`by_weight_rows` scatters them).
    let work = |r0: usize, chunk: &mut [f32]| {
        let rows = chunk.len() / m;
        let mut ri = 0;
        // Batches on AVX-512: two weight rows per pass share every activation load.
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 && m >= PAIR_TILE {
            while ri + 2 <= rows {
                let (a, b) = chunk[ri * m..(ri + 2) * m].split_at_mut(m);
                let mut i0 = 0;
                while i0 + PAIR_TILE <= m {
                    let (mut acc_a, mut acc_b) = ([0f32; PAIR_TILE], [0f32; PAIR_TILE]);
                    // SAFETY: AVX-512F and FMA were detected; x holds m·k values.
                    unsafe { avx512::row_pair(w, r0 + ri, x, i0, &mut acc_a, &mut acc_b) };
                    a[i0..i0 + PAIR_TILE].copy_from_slice(&acc_a);
                    b[i0..i0 + PAIR_TILE].copy_from_slice(&acc_b);
                    i0 += PAIR_TILE;
                }
                row_tiles(w, isa, r0 + ri, x, i0, a);
                row_tiles(w, isa, r0 + ri + 1, x, i0, b);
                ri += 2;
            }
        }
        for (rj, dst) in chunk.chunks_exact_mut(m).enumerate().skip(ri) {
            row_tiles(w, isa, r0 + rj, x, 0, dst);
        }
    };
    Ok(by_weight_rows(w.n, w.k, m, &work))
}

/// `out (m, n)` of a matmul against a weight `(n, k)` whose `work(r0, chunk)` computes weight
/// rows `r0..r0 + chunk.len() / m` n-major (each row's m outputs side by side): tasks own
/// ranges of weight rows (run in parallel above a size), and each scatters its results into
/// the output while they are cache-hot.
pub(crate) fn by_weight_rows(
    n: usize,
    k: usize,
    m: usize,
    work: &(dyn Fn(usize, &mut [f32]) + Sync),
) -> Vec<f32> {
    let mut out_t = vec![0f32; n * m];
    // (n, 1) is already (1, n); for more rows each task scatters its rows into the disjoint
    // columns r0..r0+rows of the (m, n) output.
    let mut out = if m == 1 {
        Vec::new()
    } else {
        vec![0f32; m * n]
    };
    let dst = OutPtr(out.as_mut_ptr());
    let task = |r0: usize, chunk: &mut [f32]| {
        work(r0, chunk);
        if m > 1 {
            // Output row by output row: each write run is contiguous (column-first writes
            // would touch a page per value for a vocabulary-sized n).
            let rows = chunk.len() / m;
            for i in 0..m {
                // SAFETY: i < m and r0 + rows <= n, so the run is inside `out`; tasks own
                // disjoint row ranges r0..r0+rows, so no two tasks write the same element.
                let run =
                    unsafe { std::slice::from_raw_parts_mut(dst.get().add(i * n + r0), rows) };
                for (ri, o) in run.iter_mut().enumerate() {
                    *o = chunk[ri * m + i];
                }
            }
        }
    };
    if n * k * m < PARALLEL_MIN_MACS {
        task(0, &mut out_t);
    } else {
        let rows = n.div_ceil(rayon::current_num_threads().max(1) * 4).max(8);
        out_t
            .par_chunks_mut(rows * m)
            .enumerate()
            .for_each(|(i, c)| task(i * rows, c));
    }
    if m == 1 {
        out_t
    } else {
        out
    }
}

/// Fills `dst[from..]` (one output per activation row) for weight row `r`, tile by tile.
fn row_tiles(w: &PackedWeight, isa: Isa, r: usize, x: &[f32], from: usize, dst: &mut [f32]) {
    let mut i0 = from;
    while i0 < dst.len() {
        let tile = max_tile(isa).min(dst.len() - i0);
        let mut acc = [0f32; MAX_TILE];
        row_tile(w, isa, r, x, i0, tile, &mut acc);
        dst[i0..i0 + tile].copy_from_slice(&acc[..tile]);
        i0 += tile;
    }
}

/// The output buffer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: used only for writes to disjoint indices while the owning Vec outlives the tasks.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A dot product in eight lanes, so that the compiler vectorizes it.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<8>(a, b)
}

/// A dot product in `L` lanes (one register of them where the compiler has it); inlined so
/// that a `target_feature` caller compiles it for its registers.
#[inline(always)]
pub(crate) fn dot_lanes<const L: usize>(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Dot products of weight row `r` (dequantized block by block, w = q·d + m) with `tile`
/// activation rows starting at `i0`.
fn row_tile(
    w: &PackedWeight,
    isa: Isa,
    r: usize,
    x: &[f32],
    i0: usize,
    tile: usize,
    acc: &mut [f32; MAX_TILE],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were detected at run time; x holds m·k values (checked by the caller).
        Isa::Avx512 => unsafe {
            match tile {
                1 => avx512::row1(w, r, x, i0, acc),
                2 => avx512::row::<2>(w, r, x, i0, acc),
                3 => avx512::row::<3>(w, r, x, i0, acc),
                4 => avx512::row::<4>(w, r, x, i0, acc),
                5 => avx512::row::<5>(w, r, x, i0, acc),
                6 => avx512::row::<6>(w, r, x, i0, acc),
                7 => avx512::row::<7>(w, r, x, i0, acc),
                8 => avx512::row::<8>(w, r, x, i0, acc),
                9..=12 if tile == 12 => avx512::row_wide::<12>(w, r, x, i0, acc),
                9..=12 => {
                    avx512::row::<8>(w, r, x, i0, acc);
                    let mut rest = [0f32; MAX_TILE];
                    row_tile(w, isa, r, x, i0 + 8, tile - 8, &mut rest);
                    acc[8..tile].copy_from_slice(&rest[..tile - 8]);
                }
                _ if tile == 16 => avx512::row_wide::<16>(w, r, x, i0, acc),
                _ => {
                    avx512::row_wide::<12>(w, r, x, i0, acc);
                    let mut rest = [0f32; MAX_TILE];
                    row_tile(w, isa, r, x, i0 + 12, tile - 12, &mut rest);
                    acc[12..tile].copy_from_slice(&rest[..tile - 12]);
                }
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe {
            match tile {
                1 => avx2::row::<1>(w, r, x, i0, acc),
                2 => avx2::row::<2>(w, r, x, i0, acc),
                3 => avx2::row::<3>(w, r, x, i0, acc),
                _ => avx2::row::<4>(w, r, x, i0, acc),
            }
        },
        Isa::Portable => {
            for b in 0..w.nb {
                let (d, m) = (w.scales[r * w.nb + b], w.offsets[r * w.nb + b]);
                let wv = w.block_values(r, b).map(|q| q.mul_add(d, m));
                for (t, a) in acc.iter_mut().enumerate().take(tile) {
                    let xs = &x[(i0 + t) * w.k + b * QK..(i0 + t) * w.k + (b + 1) * QK];
                    *a += dot(&wv, xs);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockKind, PackedWeight, MAX_TILE, QK};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row<const T: usize>(
        w: &PackedWeight,
        r: usize,
        x: &[f32],
        i0: usize,
        acc: &mut [f32; MAX_TILE],
    ) {
        let mut vacc = [_mm256_setzero_ps(); T];
        let mask = _mm_set1_epi8(0x0F);
        let qb = w.kind.qbytes();
        let base = w.qs.as_ptr().add(r * w.nb * qb);
        for b in 0..w.nb {
            let p = base.add(b * qb);
            let (lo, hi, c0, c1) = match w.kind {
                BlockKind::Q8_0 => {
                    let lo = _mm_loadu_si128(p as *const __m128i);
                    let hi = _mm_loadu_si128(p.add(16) as *const __m128i);
                    (
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
                    )
                }
                BlockKind::Q4_0 | BlockKind::Q4_1 => {
                    let raw = _mm_loadu_si128(p as *const __m128i);
                    let lo = _mm_and_si128(raw, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                    (
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                    )
                }
            };
            let dv = _mm256_set1_ps(*w.scales.get_unchecked(r * w.nb + b));
            let mv = _mm256_set1_ps(*w.offsets.get_unchecked(r * w.nb + b));
            let (w0, w1, w2, w3) = (
                _mm256_fmadd_ps(lo, dv, mv),
                _mm256_fmadd_ps(hi, dv, mv),
                _mm256_fmadd_ps(c0, dv, mv),
                _mm256_fmadd_ps(c1, dv, mv),
            );
            // The block's partial sum first, so the accumulator chain has one add per block.
            for (t, va) in vacc.iter_mut().enumerate() {
                let xp = x.as_ptr().add((i0 + t) * w.k + b * QK);
                let mut s = _mm256_mul_ps(w0, _mm256_loadu_ps(xp));
                s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), s);
                s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp.add(16)), s);
                s = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp.add(24)), s);
                *va = _mm256_add_ps(*va, s);
            }
        }
        for t in 0..T {
            acc[t] = hsum(vacc[t]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BlockKind, PackedWeight, MAX_TILE, PAIR_TILE, QK};
    use std::arch::x86_64::*;

    // The block helpers are macros, not functions: a `#[target_feature]` function cannot be
    // `#[inline(always)]`, and without optimisation level 3 the helpers stayed calls that
    // pass vectors through memory (most of decode's time in test builds).

    /// Block `$b` of weight row `$row`: its 32 quantized values as two f32 vectors.
    macro_rules! quant_block {
        ($w:expr, $row:expr, $b:expr) => {{
            let w: &PackedWeight = $w;
            let qb = w.kind.qbytes();
            let p = w.qs.as_ptr().add(($row * w.nb + $b) * qb);
            match w.kind {
                BlockKind::Q8_0 => (
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))),
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        p.add(16) as *const __m128i
                    ))),
                ),
                BlockKind::Q4_0 | BlockKind::Q4_1 => {
                    let mask = _mm_set1_epi8(0x0F);
                    let raw = _mm_loadu_si128(p as *const __m128i);
                    (
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask))),
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(
                            _mm_srli_epi16(raw, 4),
                            mask,
                        ))),
                    )
                }
            }
        }};
    }

    /// Block `$b` of weight row `$row` as two vectors of f32 weights (w = q·d + m).
    macro_rules! dequant_block {
        ($w:expr, $row:expr, $b:expr) => {{
            let w: &PackedWeight = $w;
            let (row, b) = ($row, $b);
            let (q0, q1) = quant_block!(w, row, b);
            let dv = _mm512_set1_ps(*w.scales.get_unchecked(row * w.nb + b));
            let mv = _mm512_set1_ps(*w.offsets.get_unchecked(row * w.nb + b));
            (_mm512_fmadd_ps(q0, dv, mv), _mm512_fmadd_ps(q1, dv, mv))
        }};
    }

    /// Activation row `$row`'s values under block `$b`, as two vectors.
    macro_rules! load_x {
        ($x:expr, $k:expr, $row:expr, $b:expr) => {{
            let xp = $x.as_ptr().add($row * $k + $b * QK);
            (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)))
        }};
    }

    /// One activation row: the block dot is scaled afterwards (no per-block dequantization),
    /// the offset term m·Σx accumulates in its own vector, and even/odd blocks use separate
    /// accumulators.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn row1(
        w: &PackedWeight,
        r: usize,
        x: &[f32],
        i0: usize,
        acc: &mut [f32; MAX_TILE],
    ) {
        let (mut va, mut vb, mut vm) = (
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
        );
        let has_offset = w.kind != BlockKind::Q8_0;
        for b in 0..w.nb {
            let (q0, q1) = quant_block!(w, r, b);
            let (x0, x1) = load_x!(x, w.k, i0, b);
            let s = _mm512_fmadd_ps(q1, x1, _mm512_mul_ps(q0, x0));
            let dv = _mm512_set1_ps(*w.scales.get_unchecked(r * w.nb + b));
            if b % 2 == 0 {
                va = _mm512_fmadd_ps(s, dv, va);
            } else {
                vb = _mm512_fmadd_ps(s, dv, vb);
            }
            if has_offset {
                let mv = _mm512_set1_ps(*w.offsets.get_unchecked(r * w.nb + b));
                vm = _mm512_fmadd_ps(mv, _mm512_add_ps(x0, x1), vm);
            }
        }
        acc[0] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(va, vb), vm));
    }

    /// Up to eight activation rows, two accumulators each (one dependent FMA per chain per block).
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn row<const T: usize>(
        w: &PackedWeight,
        r: usize,
        x: &[f32],
        i0: usize,
        acc: &mut [f32; MAX_TILE],
    ) {
        let mut vacc = [_mm512_setzero_ps(); T];
        let mut vacc2 = [_mm512_setzero_ps(); T];
        for b in 0..w.nb {
            let (w0, w1) = dequant_block!(w, r, b);
            for t in 0..T {
                let (x0, x1) = load_x!(x, w.k, i0 + t, b);
                vacc[t] = _mm512_fmadd_ps(w0, x0, vacc[t]);
                vacc2[t] = _mm512_fmadd_ps(w1, x1, vacc2[t]);
            }
        }
        for t in 0..T {
            acc[t] = _mm512_reduce_add_ps(_mm512_add_ps(vacc[t], vacc2[t]));
        }
    }

    /// Many activation rows: one accumulator per row (the rows' chains hide the FMA latency),
    /// so each weight block is dequantized once for up to 16 rows.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn row_wide<const T: usize>(
        w: &PackedWeight,
        r: usize,
        x: &[f32],
        i0: usize,
        acc: &mut [f32; MAX_TILE],
    ) {
        let mut vacc = [_mm512_setzero_ps(); T];
        for b in 0..w.nb {
            let (w0, w1) = dequant_block!(w, r, b);
            for (t, v) in vacc.iter_mut().enumerate() {
                let (x0, x1) = load_x!(x, w.k, i0 + t, b);
                *v = _mm512_fmadd_ps(w1, x1, _mm512_fmadd_ps(w0, x0, *v));
            }
        }
        for t in 0..T {
            acc[t] = _mm512_reduce_add_ps(vacc[t]);
        }
    }

    /// Two weight rows × eight activation rows: each activation load feeds two FMAs.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn row_pair(
        w: &PackedWeight,
        r: usize,
        x: &[f32],
        i0: usize,
        acc_a: &mut [f32; PAIR_TILE],
        acc_b: &mut [f32; PAIR_TILE],
    ) {
        let mut va = [_mm512_setzero_ps(); PAIR_TILE];
        let mut vb = [_mm512_setzero_ps(); PAIR_TILE];
        for b in 0..w.nb {
            let (a0, a1) = dequant_block!(w, r, b);
            let (b0, b1) = dequant_block!(w, r + 1, b);
            for t in 0..PAIR_TILE {
                let (x0, x1) = load_x!(x, w.k, i0 + t, b);
                va[t] = _mm512_fmadd_ps(a1, x1, _mm512_fmadd_ps(a0, x0, va[t]));
                vb[t] = _mm512_fmadd_ps(b1, x1, _mm512_fmadd_ps(b0, x0, vb[t]));
            }
        }
        for t in 0..PAIR_TILE {
            acc_a[t] = _mm512_reduce_add_ps(va[t]);
            acc_b[t] = _mm512_reduce_add_ps(vb[t]);
        }
    }
}
