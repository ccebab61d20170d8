//! Attention over the paged KV cache: every sequence of a [`PagedBatch`] attends, causally
//! (and within Mistral's window), to its own positions `0..start + len`, read through its
//! block table.
//!
//! [`paged_attention_reference`] is the definition: gather each sequence's keys and values
//! into a dense tensor and run [`attention_reference`] with an explicit mask. [`paged_attention`]
//! takes fast paths: on the CPU, sequences with few new tokens (decode, grammar-forced tokens)
//! are computed by one fused pass per (token, KV head) that reads the pools in place, and
//! prefill chunks by GEMMs over their gathered keys with the mask and softmax applied in
//! place; on CUDA, each sequence's gathered keys go through wildlong's flash-attention kernel.
//! The tests compare every path with the reference.

use crate::engine::attention::{attention_reference, exp_sub_sum, f32_slice, gemm_softmax};
use crate::engine::llama::attention_mask;
use crate::engine::llama::cache::PagedBatch;
use crate::engine::packed::dot_lanes;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// New tokens of a sequence up to which the fused in-place pass is used (more are a prefill
/// chunk: GEMMs do them faster).
const FUSED_MAX_TOKENS: usize = 8;

/// Key positions query position `p` sees.
fn visible(p: usize, window: Option<usize>) -> std::ops::RangeInclusive<usize> {
    let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
    lo..=p
}

/// Gathers positions `0..ctx` of sequence `s` from a pool `(blocks, kvh, block_size, d)`:
/// `(1, kvh, ctx, d)`.
fn gather(pool: &Tensor, batch: &PagedBatch, s: usize) -> Result<Tensor> {
    let (nb, kvh, bs, d) = pool.dims4()?;
    let rows = batch.context_rows(s, kvh);
    let n = rows.len();
    let idx = Tensor::from_vec(rows, n, pool.device())?;
    Ok(pool
        .reshape((nb * kvh * bs, d))?
        .index_select(&idx, 0)? // (kvh*ctx, d)
        .reshape((1, kvh, n / kvh, d))?)
}

/// Host mask `(len, ctx)` of sequence `s`: 0 where visible, −∞ elsewhere.
fn host_mask(batch: &PagedBatch, s: usize, window: Option<usize>) -> Vec<f32> {
    let q = &batch.seqs[s];
    let ctx = q.start + q.len;
    let mut m = vec![f32::NEG_INFINITY; q.len * ctx];
    for i in 0..q.len {
        for j in visible(q.start + i, window) {
            m[i * ctx + j] = 0.0;
        }
    }
    m
}

/// q `(1, h, T, d)` of the batch's new tokens (rotated, not scaled) → `(1, kvh, g*len, d)`
/// of sequence `s` starting at token `off`, scaled.
fn seq_queries(q: &Tensor, off: usize, len: usize, kvh: usize, scale: f64) -> Result<Tensor> {
    let (_, h, _, d) = q.dims4()?;
    Ok((q.narrow(2, off, len)?.contiguous()? * scale)?.reshape((1, kvh, h / kvh * len, d))?)
}

/// `(1, kvh, g*len, d)` → `(len, h, d)`.
fn seq_output(o: &Tensor, h: usize, len: usize) -> Result<Tensor> {
    let d = o.dim(3)?;
    Ok(o.reshape((h, len, d))?.transpose(0, 1)?.contiguous()?)
}

/// q `(1, h, T, d)` (rotated), pools `(blocks, kvh, block_size, d)` holding every position
/// the batch attends to (its new tokens written); returns `(T, h, d)` f32.
pub fn paged_attention_reference(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    batch: &PagedBatch,
    window: Option<usize>,
    scale: f64,
) -> Result<Tensor> {
    let (_, h, _, _) = q.dims4()?;
    let kvh = k_pool.dim(1)?;
    let q = q.to_dtype(DType::F32)?;
    let mut outs = Vec::with_capacity(batch.seqs.len());
    let mut off = 0;
    for (s, seq) in batch.seqs.iter().enumerate() {
        let ctx = seq.start + seq.len;
        let k = gather(k_pool, batch, s)?.to_dtype(DType::F32)?;
        let v = gather(v_pool, batch, s)?.to_dtype(DType::F32)?;
        let q_pos = vec![(seq.start..ctx).map(|p| p as i64).collect::<Vec<_>>()];
        let k_pos = vec![(0..ctx as i64).collect::<Vec<_>>()];
        let mask = attention_mask(&q_pos, &k_pos, window, q.device())?; // (1, 1, len, ctx)
        let qs = seq_queries(&q, off, seq.len, kvh, scale)?;
        let o = attention_reference(&qs, &k, &v, &mask)?; // (1, kvh, g*len, d)
        outs.push(seq_output(&o, h, seq.len)?);
        off += seq.len;
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// [`paged_attention_reference`] by the fast paths.
pub fn paged_attention(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    batch: &PagedBatch,
    window: Option<usize>,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() && crate::kernels::cuda::flash_supports(q.dim(3)?) {
        return paged_flash(q, k_pool, v_pool, batch, window, scale);
    }
    let cpu_f32 = q.device().is_cpu()
        && [q.dtype(), k_pool.dtype(), v_pool.dtype()]
            .iter()
            .all(|&t| t == DType::F32);
    if !cpu_f32 {
        return paged_attention_reference(q, k_pool, v_pool, batch, window, scale);
    }
    let (_, h, _, _) = q.dims4()?;
    let kvh = k_pool.dim(1)?;
    let q = q.contiguous()?;
    // Runs of consecutive short sequences go through one fused call; each prefill chunk
    // through GEMMs. Outputs in batch order.
    let mut outs = Vec::new();
    let mut run: Vec<(usize, usize)> = Vec::new(); // (sequence, first token)
    let mut off = 0;
    let flush = |run: &mut Vec<(usize, usize)>, outs: &mut Vec<Tensor>| -> Result<()> {
        if !run.is_empty() {
            outs.push(fused(&q, k_pool, v_pool, batch, run, window, scale)?);
            run.clear();
        }
        Ok(())
    };
    for (s, seq) in batch.seqs.iter().enumerate() {
        if seq.len <= FUSED_MAX_TOKENS {
            run.push((s, off));
        } else {
            flush(&mut run, &mut outs)?;
            let k = gather(k_pool, batch, s)?;
            let v = gather(v_pool, batch, s)?;
            let mask = Arc::new(host_mask(batch, s, window));
            let qs = seq_queries(&q, off, seq.len, kvh, scale)?;
            let o = gemm_softmax(&qs, &k, &v, &mask, seq.len, 0)?;
            outs.push(seq_output(&o, h, seq.len)?);
        }
        off += seq.len;
    }
    flush(&mut run, &mut outs)?;
    Ok(Tensor::cat(&outs, 0)?)
}

/// The fused pass over the sequences of `run` (each `(sequence, first token in the batch)`).
fn fused(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    batch: &PagedBatch,
    run: &[(usize, usize)],
    window: Option<usize>,
    scale: f64,
) -> Result<Tensor> {
    let mut tokens = Vec::new();
    for &(s, off) in run {
        let seq = &batch.seqs[s];
        let table: Arc<Vec<u32>> = Arc::new(seq.blocks.clone());
        for i in 0..seq.len {
            tokens.push(DecodeToken {
                index: off + i,
                position: seq.start + i,
                table: table.clone(),
            });
        }
    }
    let op = PagedDecode {
        tokens,
        block_size: batch.block_size,
        window,
        scale: scale as f32,
    };
    Ok(q.apply_op3_no_bwd(k_pool, v_pool, &op)?)
}

struct DecodeToken {
    /// Index among the batch's new tokens (q's third axis).
    index: usize,
    position: usize,
    table: Arc<Vec<u32>>,
}

struct PagedDecode {
    tokens: Vec<DecodeToken>,
    block_size: usize,
    window: Option<usize>,
    scale: f32,
}

impl CustomOp3 for PagedDecode {
    fn name(&self) -> &'static str {
        "wildlong-paged-decode-attention"
    }

    /// q `(1, h, T, d)` contiguous, pools `(blocks, kvh, block_size, d)` contiguous →
    /// `(tokens, h, d)`.
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, h, t_all, d) = ql.shape().dims4()?;
        let (nb, kvh, kbs, kd) = kl.shape().dims4()?;
        if kd != d
            || kbs != self.block_size
            || vl.shape().dims4()? != (nb, kvh, kbs, d)
            || h % kvh != 0
        {
            candle_core::bail!(
                "paged attention: q {:?}, k {:?}, v {:?} disagree",
                ql.shape(),
                kl.shape(),
                vl.shape()
            );
        }
        if !(ql.is_contiguous() && kl.is_contiguous() && vl.is_contiguous()) {
            candle_core::bail!("paged attention: q and the pools must be contiguous");
        }
        let bs = self.block_size;
        for tok in &self.tokens {
            let last = tok.table.get(tok.position / bs).copied();
            if tok.index >= t_all || last.is_none_or(|b| b as usize >= nb) {
                candle_core::bail!("paged attention: token {} outside the pool", tok.index);
            }
        }
        let q = &f32_slice(qs, "q")?[ql.start_offset()..];
        let k = &f32_slice(ks, "k")?[kl.start_offset()..];
        let v = &f32_slice(vs, "v")?[vl.start_offset()..];
        let g = h / kvh;
        let n = self.tokens.len();
        let mut out = vec![0f32; n * h * d];
        // Item (token i, KV head kh): the g query heads that share the head's keys, one pass
        // over them; the output rows of heads kh·g..kh·g+g are consecutive in (n, h, d). With
        // fewer such items than a few per thread (one decoding sequence), one query head each.
        let g = if n * kvh >= 4 * rayon::current_num_threads() {
            g
        } else {
            1
        };
        let shape = Dims {
            t_all,
            h,
            kvh,
            g,
            d,
        };
        let run = |(idx, o): (usize, &mut [f32])| {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F (checked above).
                return unsafe { self.item_avx512(q, k, v, shape, idx, o) };
            }
            self.item(q, k, v, shape, idx, o)
        };
        let work: usize = self.tokens.iter().map(|t| t.position + 1).sum::<usize>() * h * d;
        if work >= 1 << 16 {
            out.par_chunks_mut(g * d).enumerate().for_each(run);
        } else {
            out.chunks_mut(g * d).enumerate().for_each(run);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, h, d))))
    }
}

/// Calls `f(j - lo, row offset)` for each key position `j` in `lo..hi`, in order, block by
/// block: `first(j)` is the pool offset of position `j`, and a block's rows are `d` apart.
#[inline(always)]
fn each_row(
    lo: usize,
    hi: usize,
    bs: usize,
    d: usize,
    first: impl Fn(usize) -> usize,
    mut f: impl FnMut(usize, usize),
) {
    let mut j = lo;
    while j < hi {
        let end = ((j / bs + 1) * bs).min(hi);
        let first = first(j);
        for r in 0..end - j {
            f(j - lo + r, first + r * d);
        }
        j = end;
    }
}

/// Sizes the fused decode items share.
#[derive(Clone, Copy)]
struct Dims {
    t_all: usize,
    h: usize,
    kvh: usize,
    /// Query heads per item: all that share a KV head, or 1.
    g: usize,
    d: usize,
}

impl PagedDecode {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn item_avx512(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: Dims,
        idx: usize,
        o: &mut [f32],
    ) {
        self.item(q, k, v, s, idx, o)
    }

    /// One (token, query heads) item: scores of its g query heads against the visible keys
    /// (walked block by block: a head's keys in a block are consecutive rows), softmax, and
    /// the weighted sum of values into `o` (g rows of d). Written to vectorize (16-lane
    /// dot products); the `target_feature` wrapper compiles it for AVX-512.
    #[inline(always)]
    fn item(&self, q: &[f32], k: &[f32], v: &[f32], s: Dims, idx: usize, o: &mut [f32]) {
        let Dims {
            t_all,
            h,
            kvh,
            g,
            d,
        } = s;
        let (i, qh0) = (idx / (h / g), idx % (h / g) * g);
        let kh = qh0 / (h / kvh);
        let tok = &self.tokens[i];
        let keys = visible(tok.position, self.window);
        let (lo, hi) = (*keys.start(), keys.end() + 1);
        let n = hi - lo;
        let bs = self.block_size;
        // Each visible key's row offset in the pool, in position order, block by block
        // (generic, not `dyn`: the loop bodies inline into the AVX-512 wrapper).
        let row_of = |j: usize| ((tok.table[j / bs] as usize * kvh + kh) * bs + j % bs) * d;
        let qrow = |qi: usize| &q[((qh0 + qi) * t_all + tok.index) * d..][..d];
        let mut scores = vec![0f32; g * n];
        each_row(lo, hi, bs, d, row_of, |j, r| {
            let kr = &k[r..r + d];
            for qi in 0..g {
                scores[qi * n + j] = dot_lanes::<16>(qrow(qi), kr) * self.scale;
            }
        });
        for row in scores.chunks_exact_mut(n) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let inv = 1.0 / exp_sub_sum(row, max);
            for p in row.iter_mut() {
                *p *= inv;
            }
        }
        each_row(lo, hi, bs, d, row_of, |j, r| {
            let vr = &v[r..r + d];
            for (qi, oh) in o.chunks_exact_mut(d).enumerate() {
                let w = scores[qi * n + j];
                for (a, &x) in oh.iter_mut().zip(vr) {
                    *a += w * x;
                }
            }
        });
    }
}

/// CUDA: each sequence's keys gathered (bf16) and run through wildlong's flash-attention
/// kernel. Compile-checked here; not yet run on a GPU.
#[cfg(feature = "cuda")]
fn paged_flash(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    batch: &PagedBatch,
    window: Option<usize>,
    scale: f64,
) -> Result<Tensor> {
    let bf = |x: &Tensor| x.to_dtype(DType::BF16);
    let mut outs = Vec::with_capacity(batch.seqs.len());
    let mut off = 0;
    for (s, seq) in batch.seqs.iter().enumerate() {
        let ctx = seq.start + seq.len;
        let k = bf(&gather(k_pool, batch, s)?)?; // (1, kvh, ctx, d)
        let v = bf(&gather(v_pool, batch, s)?)?;
        let qs = bf(&q.narrow(2, off, seq.len)?.contiguous()?)?; // (1, h, len, d)
        let q_pos = vec![(seq.start..ctx).map(|p| p as i64).collect::<Vec<_>>()];
        let k_pos = vec![(0..ctx as i64).collect::<Vec<_>>()];
        let m = crate::kernels::cuda::Masking::positions(&q_pos, &k_pos, window, q.device())?;
        let (o, _) = crate::kernels::cuda::flash_attention(&qs, &k, &v, &m, scale as f32)?;
        outs.push(
            o.squeeze(0)?
                .transpose(0, 1)?
                .contiguous()?
                .to_dtype(DType::F32)?,
        ); // (len, h, d)
        off += seq.len;
    }
    Ok(Tensor::cat(&outs, 0)?)
}
