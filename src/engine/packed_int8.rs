//! Quantized weights × 8-bit activations on the CPU (opt-in: `weight_format = "int8_activations"`).
//!
//! What llama.cpp does for its Q4_0/Q4_1/Q8_0 dot products: each activation row is quantized
//! per 32-value block to signed bytes with one f32 scale (`quantize_row_q8_1`: d = max|x|/127,
//! q = round(x/d), s = d·Σq), and each block's dot product is an integer sum:
//! `Σ_b d_w·d_x·Σ q_w q_x + m_w·s_x`. Not exact w.r.t. the dequantized file (near-tied greedy
//! choices can flip, as with llama.cpp), which is why [`super::packed`] stays the default.
//!
//! The fast path is AVX512-VNNI `vpdpbusd` on weights repacked at load so that one vector holds
//! four consecutive values of each of 16 output rows: each activation word is broadcast and
//! multiplied with 16 rows at once, 64 multiply-adds per instruction with no horizontal sums,
//! and each activation row's 16 outputs are stored as one vector. Memory ≈ the file's blocks.
//! [`matmul_reference`] is the plain integer version the fast path must equal bit for bit
//! (same products, same f32 operation order), and is also the path on CPUs without VNNI.

#[cfg(target_arch = "x86_64")]
use crate::engine::packed::OutPtr;
use crate::engine::packed::{BlockKind, PackedWeight};
use anyhow::{bail, Result};
use rayon::prelude::*;

const QK: usize = 32;
/// Output rows per lane group (one 512-bit vector of i32/f32 lanes).
const LANES: usize = 16;
/// Activation rows multiplied per pass over a group of weight rows.
const TILE: usize = 16;

/// Weights `(n, k)` repacked for integer dot products: per (group of 16 rows, block) the
/// quantized values lane-interleaved (4 bytes of each row in turn), 16 scales and 16 offsets
/// (w = q·d + m; Q8_0 has no offset but a correction 128·Σq for the unsigned activation trick).
pub struct Int8Weight {
    nibbles: bool,
    n: usize,
    k: usize,
    nb: usize,
    qs: Vec<u8>,
    scales: Vec<f32>,
    offsets: Vec<f32>,
    corr: Vec<i32>,
}

impl Int8Weight {
    /// Repacks `p`'s blocks (rows past `n` in the last group are zero).
    pub fn from_packed(p: &PackedWeight) -> Self {
        let (n, k) = p.dims();
        let nb = k / QK;
        let groups = n.div_ceil(LANES);
        let nibbles = p.kind() != BlockKind::Q8_0;
        let qb = if nibbles { 16 } else { 32 };
        let mut qs = vec![0u8; groups * nb * LANES * qb];
        let mut scales = vec![0f32; groups * nb * LANES];
        let mut offsets = vec![0f32; groups * nb * LANES];
        let mut corr = vec![0i32; if nibbles { 0 } else { groups * nb * LANES }];
        for r in 0..n {
            let (g, l) = (r / LANES, r % LANES);
            for b in 0..nb {
                let (raw, d, m) = p.block(r, b);
                let at = (g * nb + b) * LANES + l;
                scales[at] = d;
                offsets[at] = m;
                // Word c of a row's block goes to lane l of the group's vector c.
                let base = (g * nb + b) * LANES * qb;
                for c in 0..qb / 4 {
                    let dst = base + c * LANES * 4 + l * 4;
                    qs[dst..dst + 4].copy_from_slice(&raw[c * 4..c * 4 + 4]);
                }
                if !nibbles {
                    corr[at] = 128 * raw.iter().map(|&q| q as i8 as i32).sum::<i32>();
                }
            }
        }
        Self {
            nibbles,
            n,
            k,
            nb,
            qs,
            scales,
            offsets,
            corr,
        }
    }

    /// Rows of several weights with the same block type and input size, stacked; `None` when a
    /// part's rows do not fill whole lane groups.
    pub fn stack(parts: &[&Int8Weight]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.nibbles != first.nibbles || p.k != first.k || p.n % LANES != 0)
        {
            return None;
        }
        let cat_f = |f: &dyn Fn(&Int8Weight) -> &[f32]| {
            parts
                .iter()
                .flat_map(|p| f(p).iter().copied())
                .collect::<Vec<f32>>()
        };
        Some(Self {
            nibbles: first.nibbles,
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
            nb: first.nb,
            qs: parts.iter().flat_map(|p| p.qs.iter().copied()).collect(),
            scales: cat_f(&|p| &p.scales),
            offsets: cat_f(&|p| &p.offsets),
            corr: parts.iter().flat_map(|p| p.corr.iter().copied()).collect(),
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes an `(n, k)` weight of `kind` holds: rows padded to whole lane groups, per block
    /// an f32 scale and offset, the values, and for Q8_0 an i32 correction.
    pub fn bytes_for(kind: BlockKind, n: usize, k: usize) -> usize {
        let per_block = 8 + kind.qbytes() + if kind == BlockKind::Q8_0 { 4 } else { 0 };
        n.div_ceil(LANES) * LANES * (k / QK) * per_block
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.qs.len() + 4 * (self.scales.len() + self.offsets.len() + self.corr.len())
    }

    /// Dequantized weights `(n, k)`, row-major (w = q·d + m).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for r in 0..self.n {
            for b in 0..self.nb {
                let at = ((r / LANES) * self.nb + b) * LANES + r % LANES;
                let (d, m) = (self.scales[at], self.offsets[at]);
                out.extend(self.values(r, b).iter().map(|&q| (q as f32).mul_add(d, m)));
            }
        }
        out
    }

    fn qbytes(&self) -> usize {
        if self.nibbles {
            16
        } else {
            32
        }
    }

    /// Row `r`'s quantized values of block `b` (0..16 for nibbles, signed for Q8_0).
    fn values(&self, r: usize, b: usize) -> [i32; QK] {
        let (g, l) = (r / LANES, r % LANES);
        let qb = self.qbytes();
        let base = (g * self.nb + b) * LANES * qb;
        let mut raw = [0u8; 32];
        for c in 0..qb / 4 {
            let src = base + c * LANES * 4 + l * 4;
            raw[c * 4..c * 4 + 4].copy_from_slice(&self.qs[src..src + 4]);
        }
        let mut q = [0i32; QK];
        if self.nibbles {
            for j in 0..16 {
                q[j] = (raw[j] & 0x0F) as i32;
                q[j + 16] = (raw[j] >> 4) as i32;
            }
        } else {
            for j in 0..QK {
                q[j] = raw[j] as i8 as i32;
            }
        }
        q
    }
}

/// Activation rows `(m, k)` quantized per 32-value block: signed bytes (or, for Q8_0 weights,
/// the same plus 128 as unsigned bytes), the block's scale `d` and `s = d·Σq`.
pub struct Int8Activations {
    k: usize,
    q: Vec<u8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

/// llama.cpp's `quantize_row_q8_1` as its SIMD paths compute it: d = max|x|/127,
/// q = x·(127/max|x|) rounded to nearest, ties to even (0 when the block is 0), s = d·Σq.
pub fn quantize_activations(x: &[f32], m: usize, k: usize, unsigned: bool) -> Int8Activations {
    let nb = k / QK;
    let mut q = vec![0u8; m * k];
    let mut d = vec![0f32; m * nb];
    let mut s = vec![0f32; m * nb];
    let rows = |(((qr, dr), sr), xr): QuantRow| {
        #[cfg(target_arch = "x86_64")]
        if has_vnni() {
            // SAFETY: AVX-512F/BW were detected; the slices hold one row (k values, nb blocks).
            unsafe { vnni::quantize_row(xr, qr, dr, sr, unsigned) };
            return;
        }
        quantize_row(xr, qr, dr, sr, unsigned);
    };
    let (k1, nb1) = (k.max(1), nb.max(1));
    if m * k >= 1 << 16 {
        q.par_chunks_mut(k1)
            .zip(d.par_chunks_mut(nb1))
            .zip(s.par_chunks_mut(nb1))
            .zip(x.par_chunks(k1))
            .for_each(rows);
    } else {
        q.chunks_mut(k1)
            .zip(d.chunks_mut(nb1))
            .zip(s.chunks_mut(nb1))
            .zip(x.chunks(k1))
            .for_each(rows);
    }
    Int8Activations { k, q, d, s }
}

/// One row's quantized bytes, scales, sums and input.
type QuantRow<'a> = (((&'a mut [u8], &'a mut [f32]), &'a mut [f32]), &'a [f32]);

/// One row of [`quantize_activations`], plainly.
fn quantize_row(x: &[f32], q: &mut [u8], d: &mut [f32], s: &mut [f32], unsigned: bool) {
    for (b, (qb, xb)) in q.chunks_exact_mut(QK).zip(x.chunks_exact(QK)).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (o, v) in qb.iter_mut().zip(xb) {
            let qv = (v * id).round_ties_even() as i32;
            sum += qv;
            *o = if unsigned {
                (qv + 128) as u8
            } else {
                qv as i8 as u8
            };
        }
        d[b] = amax / 127.0;
        s[b] = d[b] * sum as f32;
    }
}

/// Plain reference: `out (m, n)` from the integer block dots, in the fast path's f32 order.
pub fn matmul_reference(x: &[f32], m: usize, w: &Int8Weight) -> Vec<f32> {
    let a = quantize_activations(x, m, w.k, false);
    let k = a.k;
    let mut out = vec![0f32; m * w.n];
    for i in 0..m {
        for r in 0..w.n {
            let mut f = 0f32;
            for b in 0..w.nb {
                let qw = w.values(r, b);
                let qx = &a.q[i * k + b * QK..i * k + (b + 1) * QK];
                let dot: i32 = qw.iter().zip(qx).map(|(&p, &q)| p * q as i8 as i32).sum();
                let at = ((r / LANES) * w.nb + b) * LANES + r % LANES;
                let sc = dot as f32 * a.d[i * w.nb + b];
                f = sc.mul_add(w.scales[at], f);
                if w.nibbles {
                    f = w.offsets[at].mul_add(a.s[i * w.nb + b], f);
                }
            }
            out[i * w.n + r] = f;
        }
    }
    out
}

/// Whether this CPU runs the VNNI path.
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("WILDLONG_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Below this many multiply-adds a call runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `out (m, n) ≈ x (m, k) · dequantize(W)ᵀ` with 8-bit activations; VNNI where the CPU has it.
pub fn matmul(x: &[f32], m: usize, w: &Int8Weight) -> Result<Vec<f32>> {
    if x.len() != m * w.k {
        bail!(
            "int8 matmul: x has {} values, expected {m}x{}",
            x.len(),
            w.k
        );
    }
    if !has_vnni() {
        return Ok(matmul_reference(x, m, w));
    }
    #[cfg(target_arch = "x86_64")]
    {
        Ok(matmul_vnni(x, m, w))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Ok(matmul_reference(x, m, w))
    }
}

#[cfg(target_arch = "x86_64")]
fn matmul_vnni(x: &[f32], m: usize, w: &Int8Weight) -> Vec<f32> {
    let a = quantize_activations(x, m, w.k, !w.nibbles);
    let groups = w.n.div_ceil(LANES);
    let mut out = vec![0f32; m * w.n];
    let dst = OutPtr(out.as_mut_ptr());
    let task = |g0: usize, g1: usize| {
        let mut buf = [0f32; TILE * LANES];
        for g in g0..g1 {
            let mut i0 = 0;
            while i0 < m {
                let t = TILE.min(m - i0);
                // SAFETY: VNNI was detected; `a` holds m rows of k values; buf holds TILE·LANES.
                unsafe { vnni::group(w, &a, g, i0, t, &mut buf) };
                let cols = LANES.min(w.n - g * LANES);
                for ti in 0..t {
                    // SAFETY: row i0 + ti < m and columns g·16..g·16+cols < n lie inside `out`;
                    // tasks own disjoint group ranges, so no two tasks write the same element.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            buf.as_ptr().add(ti * LANES),
                            dst.get().add((i0 + ti) * w.n + g * LANES),
                            cols,
                        )
                    };
                }
                i0 += t;
            }
        }
    };
    if w.n * w.k * m < PARALLEL_MIN_MACS {
        task(0, groups);
    } else {
        let per = groups
            .div_ceil(rayon::current_num_threads().max(1) * 4)
            .max(1);
        (0..groups.div_ceil(per))
            .into_par_iter()
            .for_each(|c| task(c * per, ((c + 1) * per).min(groups)));
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Int8Activations, Int8Weight, LANES, QK, TILE};
    use std::arch::x86_64::*;

    /// Group `g`'s 16 outputs for activation rows i0..i0+t into `out[ti·16..]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    pub unsafe fn group(
        w: &Int8Weight,
        a: &Int8Activations,
        g: usize,
        i0: usize,
        t: usize,
        out: &mut [f32; TILE * LANES],
    ) {
        macro_rules! dispatch {
            ($($n:literal)*) => {
                match t {
                    $($n => if w.nibbles { nib::<$n>(w, a, g, i0, out) } else { q8::<$n>(w, a, g, i0, out) },)*
                    _ => unreachable!("tile of {t} rows"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
    }

    /// [`super::quantize_row`] with AVX-512 (the same operations, so the same bytes).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    pub unsafe fn quantize_row(
        x: &[f32],
        q: &mut [u8],
        d: &mut [f32],
        s: &mut [f32],
        unsigned: bool,
    ) {
        let sign = _mm512_set1_ps(-0.0);
        for b in 0..d.len() {
            let p = x.as_ptr().add(b * QK);
            let (x0, x1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(
                _mm512_andnot_ps(sign, x0),
                _mm512_andnot_ps(sign, x1),
            ));
            let id = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            // Round to nearest even (the default rounding mode), as round_ties_even.
            let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id));
            let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            let (q0, q1) = if unsigned {
                let off = _mm512_set1_epi32(128);
                (_mm512_add_epi32(q0, off), _mm512_add_epi32(q1, off))
            } else {
                (q0, q1)
            };
            let dst = q.as_mut_ptr().add(b * QK);
            _mm_storeu_si128(dst as *mut __m128i, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128(dst.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(q1));
            d[b] = amax / 127.0;
            s[b] = d[b] * sum as f32;
        }
    }

    /// Each activation row's 16 outputs, vector `ti` to `out[ti·16..]`.
    macro_rules! store {
        ($acc:expr, $out:expr) => {
            for (ti, f) in $acc.iter().enumerate() {
                _mm512_storeu_ps($out.as_mut_ptr().add(ti * LANES), *f);
            }
        };
    }

    /// The activation word (4 bytes) at `p` broadcast to every lane.
    macro_rules! bcast {
        ($p:expr) => {
            _mm512_set1_epi32(($p as *const i32).read_unaligned())
        };
    }

    /// Q4_0/Q4_1: unsigned nibbles × signed activation bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    unsafe fn nib<const T: usize>(
        w: &Int8Weight,
        a: &Int8Activations,
        g: usize,
        i0: usize,
        out: &mut [f32; TILE * LANES],
    ) {
        let (k, nb) = (w.k, w.nb);
        let mask = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..nb {
            let at = (g * nb + b) * LANES;
            let p = w.qs.as_ptr().add(at * 16);
            let mut lo = [_mm512_setzero_si512(); 4];
            let mut hi = [_mm512_setzero_si512(); 4];
            for c in 0..4 {
                let v = _mm512_loadu_si512(p.add(c * 64) as *const __m512i);
                lo[c] = _mm512_and_si512(v, mask);
                hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
            }
            let dv = _mm512_loadu_ps(w.scales.as_ptr().add(at));
            let mv = _mm512_loadu_ps(w.offsets.as_ptr().add(at));
            for (ti, f) in acc.iter_mut().enumerate() {
                let row = i0 + ti;
                let xq = a.q.as_ptr().add(row * k + b * QK);
                // Byte j of a row's nibble word c holds values 4c+j (low) and 16+4c+j (high).
                let mut s = _mm512_setzero_si512();
                for c in 0..4 {
                    s = _mm512_dpbusd_epi32(s, lo[c], bcast!(xq.add(c * 4)));
                    s = _mm512_dpbusd_epi32(s, hi[c], bcast!(xq.add(16 + c * 4)));
                }
                let sc = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(s),
                    _mm512_set1_ps(*a.d.get_unchecked(row * nb + b)),
                );
                *f = _mm512_fmadd_ps(sc, dv, *f);
                *f = _mm512_fmadd_ps(mv, _mm512_set1_ps(*a.s.get_unchecked(row * nb + b)), *f);
            }
        }
        store!(acc, out);
    }

    /// Q8_0: activation bytes + 128 (unsigned) × signed weights, less 128·Σq_w.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    unsafe fn q8<const T: usize>(
        w: &Int8Weight,
        a: &Int8Activations,
        g: usize,
        i0: usize,
        out: &mut [f32; TILE * LANES],
    ) {
        let (k, nb) = (w.k, w.nb);
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..nb {
            let at = (g * nb + b) * LANES;
            let p = w.qs.as_ptr().add(at * 32);
            let mut q = [_mm512_setzero_si512(); 8];
            for (c, v) in q.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(p.add(c * 64) as *const __m512i);
            }
            let dv = _mm512_loadu_ps(w.scales.as_ptr().add(at));
            let corr = _mm512_loadu_si512(w.corr.as_ptr().add(at) as *const __m512i);
            for (ti, f) in acc.iter_mut().enumerate() {
                let row = i0 + ti;
                let xq = a.q.as_ptr().add(row * k + b * QK);
                let mut s = _mm512_sub_epi32(_mm512_setzero_si512(), corr);
                for (c, v) in q.iter().enumerate() {
                    s = _mm512_dpbusd_epi32(s, bcast!(xq.add(c * 4)), *v);
                }
                let sc = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(s),
                    _mm512_set1_ps(*a.d.get_unchecked(row * nb + b)),
                );
                *f = _mm512_fmadd_ps(sc, dv, *f);
            }
        }
        store!(acc, out);
    }
}
