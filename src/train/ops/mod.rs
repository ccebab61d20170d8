//! Autograd-safe operations for training. candle's fused `rms_norm`, `softmax_last_dim` and
//! `rope` record no gradient (silently: a stock model trains only its `lm_head`), and its
//! matmul materialises a gradient for frozen weights. Each op here is a candle custom op
//! with a `bwd`, f32 on the CPU, with a plain composed reference it is tested against (and
//! against finite differences):
//! - [`rms_norm`]: `y = x / sqrt(mean(x²) + eps) · w`;
//! - [`softmax_last_dim`];
//! - [`rope`]: rotary embedding with per-row `(b, t, d/2)` tables, half-split or
//!   interleaved; its backward is the inverse rotation;
//! - [`frozen_matmul`]: `x · wᵀ` with a gradient for `x` only (no weight gradient is
//!   allocated or computed);
//! - [`chunked_cross_entropy`]: the summed token loss of `h · wᵀ` against targets, computed
//!   `chunk` rows at a time so the `(tokens, vocabulary)` logits never exist whole; the
//!   gradients come from the same chunks in the forward pass (the backward scales them);
//! - [`silu_mul`]: the MLP's `silu(g) · u`, forward and backward one pass each;
//! - [`chunked_attention`]: causal grouped-query attention isolated per packed document,
//!   `block` query rows at a time over the keys the block can see (memory linear in the
//!   sequence), the backward recomputing each block's probabilities from the forward's
//!   log-sum-exp (FlashAttention-2's formulas).
//!
//! With the `cuda` feature each op also runs on a CUDA device through wildlong's kernels
//! (`crate::kernels::cuda`: fused RMSNorm and RoPE with backward, flash attention forward
//! and backward, per-row cross-entropy) or cuBLAS products (a bf16 frozen weight multiplies
//! in bf16 with f32 accumulation); the CPU path is unchanged.
//!
//! One file per op; this file holds what they share.

/// Implements candle's `CustomOp2`/`CustomOp3` for an op type through its inherent passes,
/// each taking the op's inputs as one array (candle's per-argument signatures are written
/// once, here):
/// - `cpu(&self, [(storage, layout); N]) -> CpuOutput`;
/// - `cuda(&self, [tensor; N]) -> Result<Tensor>` (the `cuda` feature; the storages come as
///   tensors and the result goes back as storage with its own shape);
/// - `backward(&self, [input; N], output, output_grad) -> Grads<N>`.
macro_rules! custom_op {
    ($op:ty, $name:literal, CustomOp2) => {
        custom_op!(@impl $op, $name, CustomOp2, (s1, l1, a1, d1), (s2, l2, a2, d2));
    };
    ($op:ty, $name:literal, CustomOp3) => {
        custom_op!(@impl $op, $name, CustomOp3, (s1, l1, a1, d1), (s2, l2, a2, d2), (s3, l3, a3, d3));
    };
    (@impl $op:ty, $name:literal, $trait:ident, $(($s:ident, $l:ident, $a:ident, $d:ident)),+) => {
        impl candle_core::$trait for $op {
            fn name(&self) -> &'static str {
                $name
            }
            fn cpu_fwd(
                &self,
                $($s: &candle_core::CpuStorage, $l: &candle_core::Layout),+
            ) -> $crate::train::ops::CpuOutput {
                self.cpu([$(($s, $l)),+])
            }
            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                $($s: &candle_core::CudaStorage, $l: &candle_core::Layout),+
            ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
                use $crate::kernels::cuda::{storage_of, tensor_of};
                let y = self.cuda([$(tensor_of($s, $l)?),+])?;
                Ok((storage_of(&y)?, y.shape().clone()))
            }
            fn bwd(
                &self,
                $($a: &candle_core::Tensor,)+
                y: &candle_core::Tensor,
                dy: &candle_core::Tensor,
            ) -> candle_core::Result<($(custom_op!(@grad $a)),+)> {
                let [$($d),+] = self.backward([$($a),+], y, dy)?;
                Ok(($($d),+))
            }
        }
    };
    (@grad $a:ident) => { Option<candle_core::Tensor> };
}

/// An op's inputs on the CPU: (storage, layout) each.
type CpuInputs<'a, const N: usize> = [(&'a CpuStorage, &'a Layout); N];
/// An op's output on the CPU.
type CpuOutput = Result<(CpuStorage, candle_core::Shape)>;
/// The gradients of an op's inputs (`None`: no gradient flows to that input).
type Grads<const N: usize> = Result<[Option<Tensor>; N]>;

mod attention;
mod cross_entropy;
mod lora;
mod matmul;
mod rms_norm;
mod rope;
mod silu_mul;
mod softmax;

pub use attention::{attention_reference, chunked_attention};
pub use cross_entropy::{chunked_cross_entropy, cross_entropy_reference, IGNORE};
pub use lora::{dropout_mask, dropout_mask_from, lora_linear, lora_linear_reference, Adapter};
pub use matmul::frozen_matmul;
pub use rms_norm::{rms_norm, rms_norm_reference};
pub use rope::rope;
pub use silu_mul::silu_mul;
pub use softmax::softmax_last_dim;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Tensor};

/// The f32 data a contiguous layout covers.
fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("{what}: f32 tensors only, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => candle_core::bail!("{what}: contiguous tensors only"),
    }
}

/// `x · wᵀ` (`transposed`) or `x · w` for f32 `x` and a frozen `w` (f32 or bf16), f32 out:
/// on a CUDA device a bf16 `w` multiplies in bf16 on tensor cores (f32 accumulation), on the
/// CPU it is widened to f32 for the product.
pub fn frozen_product(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Tensor> {
    let w = if transposed { w.t()? } else { w.clone() };
    if x.device().is_cuda() && w.dtype() == candle_core::DType::BF16 {
        x.to_dtype(candle_core::DType::BF16)?
            .matmul(&w)?
            .to_dtype(candle_core::DType::F32)
    } else {
        x.matmul(&w.to_dtype(candle_core::DType::F32)?)
    }
}

/// `(rows, k, n)` of an `x · wᵀ`-shaped op's inputs `x` `(rows, k)` and `w` `(n, k)`; another
/// inner size is refused naming the op and its two inputs.
fn product_dims(
    x: &candle_core::Shape,
    w: &candle_core::Shape,
    x_name: &str,
    w_name: &str,
) -> Result<(usize, usize, usize)> {
    let (m, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!("{x_name} (.., {k}) with {w_name} ({n}, {k2})");
    }
    Ok((m, k, n))
}

/// The f32 values of a contiguous tensor's storage on the CPU.
fn host_f32s<'a>(s: &'a candle_core::Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => f32s(c, l, what),
        _ => candle_core::bail!("{what}: CPU tensors only"),
    }
}

/// A read-only f32 matrix over a slice: `rows × cols`, element `(i, j)` at `i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` matrix.
    fn new(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
        .checked()
    }

    fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// The matrix when every element lies inside its slice.
    fn checked(self) -> Result<Self> {
        let last = (self.rows.max(1) - 1) * self.rs + (self.cols.max(1) - 1) * self.cs;
        if self.rows > 0 && self.cols > 0 && last >= self.data.len() {
            candle_core::bail!(
                "matmul: a {}×{} view past its {} values",
                self.rows,
                self.cols,
                self.data.len()
            );
        }
        Ok(self)
    }
}

/// `dst ← beta · a·b`, or `dst + beta · a·b` when `accumulate`, for a row-major `dst`
/// `(a.rows, b.cols)`: gemm's kernels straight into the caller's buffer (no zeroed output,
/// no separate sum pass), on the rayon pool.
fn gemm_into(dst: &mut [f32], a: Mat, b: Mat, beta: f32, accumulate: bool) -> Result<()> {
    // SAFETY: `dst` holds `dst.len()` initialised values.
    unsafe { gemm_raw(dst.as_mut_ptr(), dst.len(), a, b, beta, accumulate) }
}

/// `beta · a·b` as a fresh row-major `(a.rows, b.cols)` buffer, never zeroed first.
fn gemm_new(a: Mat, b: Mat, beta: f32) -> Result<Vec<f32>> {
    let len = a.rows * b.cols;
    let mut dst = Vec::with_capacity(len);
    // SAFETY: without `accumulate` gemm writes every one of the `len` values (a zero inner
    // size is filled by `gemm_raw` itself) and reads none; the length is set after.
    unsafe {
        gemm_raw(dst.as_mut_ptr(), len, a, b, beta, false)?;
        dst.set_len(len);
    }
    Ok(dst)
}

/// [`gemm_into`] over `len` values at `dst`.
///
/// # Safety
/// `dst` must be valid for `len` writes, and for reads when `accumulate`; it must not
/// overlap `a` or `b`.
unsafe fn gemm_raw(
    dst: *mut f32,
    len: usize,
    a: Mat,
    b: Mat,
    beta: f32,
    accumulate: bool,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || len != m * n {
        candle_core::bail!("matmul: ({m}×{k}) · ({}×{n}) into {len} values", b.rows);
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            std::ptr::write_bytes(dst, 0, len);
        }
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `a` and `b` were checked to lie inside their slices for these extents; `dst`
    // is the caller's m·n row-major values.
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        parallelism,
    );
    Ok(())
}
