//! `x · wᵀ` against a frozen weight: a gradient for `x` only.

use super::{frozen_product, product_dims, CpuInputs, CpuOutput, Grads};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Tensor};

struct FrozenMatmul;

impl FrozenMatmul {
    fn cpu(&self, [(s1, l1), (s2, l2)]: CpuInputs<2>) -> CpuOutput {
        let (m, k, n) = product_dims(l1.shape(), l2.shape(), "frozen matmul: x", "w")?;
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
    fn cuda(&self, [x, w]: [Tensor; 2]) -> Result<Tensor> {
        frozen_product(&x, &w, true)
    }

    fn backward(&self, [_x, w]: [&Tensor; 2], _y: &Tensor, dy: &Tensor) -> Grads<2> {
        Ok([
            Some(frozen_product(&dy.detach(), &w.detach(), false)?),
            None,
        ])
    }
}

custom_op!(FrozenMatmul, "wildlong-frozen-matmul", CustomOp2);

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
