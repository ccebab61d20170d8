//! `x · wᵀ` against a frozen weight: a gradient for `x` only.

use super::{frozen_product, product_dims};
#[cfg(feature = "cuda")]
use crate::kernels::cuda;
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

struct FrozenMatmul;

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "wildlong-frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, n) = product_dims(l1, l2, "frozen matmul: x", "w")?;
        // bf16 base weights are widened here, one projection at a time (the copy is freed
        // when the product is done; the graph keeps the bf16 weight only).
        let out = match s2 {
            CpuStorage::BF16(_) => {
                let w = s2.to_dtype(l2, candle_core::DType::F32)?;
                let lw = Layout::contiguous((n, k));
                s1.matmul(&w, (1, m, n, k), l1, &lw.transpose(0, 1)?)?
            }
            _ => s1.matmul(s2, (1, m, n, k), l1, &l2.transpose(0, 1)?)?,
        };
        Ok((out, (m, n).into()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (x, w) = (cuda::tensor_of(s1, l1)?, cuda::tensor_of(s2, l2)?);
        let y = frozen_product(&x, &w, true)?;
        let shape = y.shape().clone();
        Ok((cuda::storage_of(&y)?, shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(frozen_product(&dy.detach(), &w.detach(), false)?),
            None,
        ))
    }
}

/// `x · wᵀ` for `x` `(..., k)` f32 and a frozen `w` `(n, k)` (f32, or bf16 widened per call):
/// a gradient flows to `x` only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&1);
    let n = w.dim(0)?;
    let m = x.elem_count() / k.max(1);
    let y = x
        .reshape((m, k))?
        .contiguous()?
        .apply_op2(&w.contiguous()?, FrozenMatmul)?;
    let mut out = dims;
    *out.last_mut().expect("x has a last dimension") = n;
    y.reshape(out)
}
