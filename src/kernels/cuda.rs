//! wildlong's own CUDA kernels (`kernels/*.cu`, compiled to PTX by `build.rs` with the `cuda`
//! feature), launched on candle tensors. Each has a plain reference it is tested against on a
//! GPU (`tests/integration/cuda.rs`):
//! - [`flash_attention`] / [`flash_attention_backward`]: fused causal attention (bf16 in, f32
//!   accumulation on tensor cores) with grouped-query heads and the position/segment mask of
//!   [`Masking`] (decode after a cache, left padding, sliding windows, packed training rows);
//!   references: `engine::attention::attention_reference`, `train::ops::attention_reference`;
//! - [`rms_norm`] / [`rms_norm_backward`] (reference `train::ops::rms_norm_reference`);
//! - [`rope`] with `inverse` for the backward (reference `RopeConfig::apply_slow`);
//! - [`cross_entropy_rows`]: per-row loss and `softmax − one-hot` of a logits chunk, the core
//!   of the chunked cross-entropy (reference `train::ops::cross_entropy_reference`).

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{
    sys::CUfunction_attribute_enum, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, DType, Device, Layout, Result, Shape, Storage, Tensor};

const FLASH_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx"));
const FUSED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));

fn device_of(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        d => bail!("wildlong CUDA kernel: tensor on {d:?}, not a CUDA device"),
    }
}

/// The device slice a tensor's layout starts at.
fn view<'a, T: CudaDType + DeviceRepr>(
    s: &'a Storage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(c) = s else {
        bail!("{what}: not on a CUDA device")
    };
    Ok(c.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// A zeroed device buffer of `n` elements (at least one: CUDA refuses empty allocations).
fn zeros<T: DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits>(
    dev: &CudaDevice,
    n: usize,
) -> Result<CudaSlice<T>> {
    dev.alloc_zeros::<T>(n.max(1))
}

fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(T::wrap_cuda_slice(s, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// A contiguous tensor holding a copy of a custom op's CUDA input.
pub fn tensor_of(s: &CudaStorage, l: &Layout) -> Result<Tensor> {
    // SAFETY: every element is written by the copy below.
    let mut dst = unsafe { s.device().alloc_uninit(l.shape(), s.dtype())? };
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok(Tensor::from_storage(
        Storage::Cuda(dst),
        l.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

/// A contiguous copy of a tensor's CUDA storage (a custom op's output).
pub fn storage_of(t: &Tensor) -> Result<CudaStorage> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cuda(c) = &*s else {
        bail!("expected a CUDA tensor")
    };
    // SAFETY: every element is written by the copy below.
    let mut dst = unsafe { c.device().alloc_uninit(l.shape(), c.dtype())? };
    c.copy_strided_src(&mut dst, 0, l)?;
    Ok(dst)
}

/// Who may attend to whom, by position (see `kernels/flash_attn.cu`): query `i` sees key
/// `j` when `j ≤ i + (tk − tq)`, `0 ≤ k_pos[j] ≤ q_pos[i]`, within `window` when set, and,
/// with segments, when both carry the same segment id.
pub struct Masking {
    q_pos: Tensor,                      // (b, tq) i32
    k_pos: Tensor,                      // (b, tk) i32
    segments: Option<(Tensor, Tensor)>, // (b, tq), (b, tk) i32
    q_kmin: Option<Tensor>,             // (b, tq) i32: first key index query i can see
    window: i32,
    b: usize,
    tq: usize,
    tk: usize,
}

fn i32_rows(rows: &[Vec<i32>], device: &Device) -> Result<Tensor> {
    let b = rows.len();
    let t = rows.first().map_or(0, Vec::len);
    if rows.iter().any(|r| r.len() != t) {
        bail!("mask rows of unequal length");
    }
    Tensor::from_vec(rows.concat(), (b, t), device)
}

fn to_i32(v: i64, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} {v} does not fit i32")))
}

impl Masking {
    /// The engine's mask: per-row query and key positions (−1 = padding), optional window.
    pub fn positions(
        q_pos: &[Vec<i64>],
        k_pos: &[Vec<i64>],
        window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let conv = |rows: &[Vec<i64>]| -> Result<Vec<Vec<i32>>> {
            rows.iter()
                .map(|r| r.iter().map(|&p| to_i32(p.max(-1), "position")).collect())
                .collect()
        };
        let (q, k) = (conv(q_pos)?, conv(k_pos)?);
        if q.len() != k.len() {
            bail!("mask: {} query rows, {} key rows", q.len(), k.len());
        }
        Ok(Self {
            b: q.len(),
            tq: q.first().map_or(0, Vec::len),
            tk: k.first().map_or(0, Vec::len),
            q_pos: i32_rows(&q, device)?,
            k_pos: i32_rows(&k, device)?,
            segments: None,
            q_kmin: None,
            window: window.map_or(Ok(0), |w| to_i32(w as i64, "window"))?,
        })
    }

    /// Training's mask: packed rows of documents, causal inside each segment id.
    pub fn packed(segments: &[Vec<u32>], device: &Device) -> Result<Self> {
        let b = segments.len();
        let t = segments.first().map_or(0, Vec::len);
        let idx: Vec<Vec<i32>> = (0..b).map(|_| (0..t as i32).collect()).collect();
        let seg: Vec<Vec<i32>> = segments
            .iter()
            .map(|r| r.iter().map(|&s| s as i32).collect())
            .collect();
        // The first index of each query's segment: no key before it is visible.
        let kmin: Vec<Vec<i32>> = seg
            .iter()
            .map(|r| {
                let mut first = std::collections::HashMap::new();
                r.iter()
                    .enumerate()
                    .map(|(i, s)| *first.entry(*s).or_insert(i as i32))
                    .collect()
            })
            .collect();
        let pos = i32_rows(&idx, device)?;
        let seg = i32_rows(&seg, device)?;
        Ok(Self {
            b,
            tq: t,
            tk: t,
            q_pos: pos.clone(),
            k_pos: pos,
            segments: Some((seg.clone(), seg)),
            q_kmin: Some(i32_rows(&kmin, device)?),
            window: 0,
        })
    }
}

/// Binds the device views of a [`Masking`]'s tensors in the caller's scope: positions,
/// segments and first keys (absent ones pass the positions, which the kernel then never
/// reads), and the two presence flags.
macro_rules! mask_views {
    ($m:expr => $qp:ident, $kp:ident, $qs:ident, $ks:ident, $km:ident, $has_seg:ident, $has_kmin:ident) => {
        let (qpg, qpl) = $m.q_pos.storage_and_layout();
        let (kpg, kpl) = $m.k_pos.storage_and_layout();
        let $qp = view::<i32>(&qpg, qpl, "q_pos")?;
        let $kp = view::<i32>(&kpg, kpl, "k_pos")?;
        let seg = $m
            .segments
            .as_ref()
            .map(|(a, b)| (a.storage_and_layout(), b.storage_and_layout()));
        let kmin = $m.q_kmin.as_ref().map(|a| a.storage_and_layout());
        let ($qs, $ks) = match &seg {
            Some(((ag, al), (bg, bl))) => {
                (view::<i32>(ag, al, "q_seg")?, view::<i32>(bg, bl, "k_seg")?)
            }
            None => (
                view::<i32>(&qpg, qpl, "q_pos")?,
                view::<i32>(&kpg, kpl, "k_pos")?,
            ),
        };
        let $km = match &kmin {
            Some((g, l)) => view::<i32>(g, l, "q_kmin")?,
            None => view::<i32>(&qpg, qpl, "q_pos")?,
        };
        let ($has_seg, $has_kmin) = (seg.is_some() as i32, kmin.is_some() as i32);
    };
}

/// The attention kernels' shared arguments after their tensors: the mask views (positions,
/// segments, first keys) and `[has_seg, has_kmin, hq, hkv, tq, tk, window]`.
fn push_mask_args<'a>(
    bld: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>,
    views: [&'a CudaView<'a, i32>; 5],
    ints: &'a [i32; 7],
) {
    for v in views {
        bld.arg(v);
    }
    for i in ints {
        bld.arg(i);
    }
}

/// Element strides of a `(b, h, t, d)` bf16 tensor the kernels can read in place (d
/// contiguous, 16-byte aligned rows); otherwise a contiguous copy.
fn attn_operand(x: &Tensor, what: &str) -> Result<(Tensor, [i64; 3])> {
    if x.dtype() != DType::BF16 {
        bail!("flash attention: {what} must be bf16, got {:?}", x.dtype());
    }
    let ok = |x: &Tensor| {
        let s = x.stride();
        let l = x.layout();
        s[3] == 1
            && s[..3].iter().all(|v| v.is_multiple_of(8))
            && l.start_offset().is_multiple_of(8)
    };
    let x = if ok(x) { x.clone() } else { x.copy()? };
    if !ok(&x) {
        bail!(
            "flash attention: {what} {:?} has no usable layout",
            x.dims()
        );
    }
    let s = x.stride();
    Ok((x.clone(), [s[0] as i64, s[1] as i64, s[2] as i64]))
}

/// Head sizes the attention kernels are built for.
pub fn flash_supports(head_dim: usize) -> bool {
    matches!(head_dim, 64 | 128)
}

fn check_attn(q: &Tensor, k: &Tensor, v: &Tensor, m: &Masking) -> Result<(usize, usize, usize)> {
    let (b, hq, tq, d) = q.dims4()?;
    let (b2, hkv, tk, d2) = k.dims4()?;
    if b2 != b || d2 != d || v.dims() != k.dims() || hkv == 0 || hq % hkv != 0 {
        bail!(
            "flash attention: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if !flash_supports(d) {
        bail!("flash attention: head size {d} (built for 64 and 128)");
    }
    if (m.b, m.tq, m.tk) != (b, tq, tk) {
        bail!(
            "flash attention: mask for (b {}, tq {}, tk {}) with q {:?}, k {:?}",
            m.b,
            m.tq,
            m.tk,
            q.dims(),
            k.dims()
        );
    }
    Ok((hq, hkv, d))
}

/// Attention of `q` `(b, hq, t_q, d)` over `k`, `v` `(b, hkv, t_k, d)` (bf16, any strides
/// with `d` contiguous), masked by `m`, softmax scale `scale`; returns the output
/// `(b, hq, t_q, d)` bf16 and the log-sum-exp of each row `(b, hq, t_q)` f32 (+∞ for a row
/// that sees no key; its output is zero).
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    m: &Masking,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let (hq, hkv, d) = check_attn(q, k, v, m)?;
    let dev = device_of(q)?;
    let (q, qs) = attn_operand(q, "q")?;
    let (k, ks) = attn_operand(k, "k")?;
    let (v, vs) = attn_operand(v, "v")?;
    let (b, tq, tk) = (m.b, m.tq, m.tk);
    let o = zeros::<half::bf16>(&dev, b * hq * tq * d)?;
    let lse = zeros::<f32>(&dev, b * hq * tq)?;
    if b * tq > 0 {
        let os = [(hq * tq * d) as i64, (tq * d) as i64, d as i64];
        let name = if d == 64 {
            "flash_fwd_d64"
        } else {
            "flash_fwd_d128"
        };
        let func = dev.get_or_load_custom_func(name, "wildlong_flash_attn", FLASH_PTX)?;
        let (qg, ql) = q.storage_and_layout();
        let (kg, kl) = k.storage_and_layout();
        let (vg, vl) = v.storage_and_layout();
        let qv = view::<half::bf16>(&qg, ql, "q")?;
        let kv = view::<half::bf16>(&kg, kl, "k")?;
        let vv = view::<half::bf16>(&vg, vl, "v")?;
        mask_views!(m => qp, kp, qsv, ksv, kmv, has_seg, has_kmin);
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let mut bld = func.builder();
        bld.arg(&qv).arg(&kv).arg(&vv).arg(&o).arg(&lse);
        let ints = [
            has_seg, has_kmin, hq as i32, hkv as i32, tq as i32, tk as i32, m.window,
        ];
        push_mask_args(&mut bld, [&qp, &kp, &qsv, &ksv, &kmv], &ints);
        bld.arg(&scale_log2);
        for s in qs.iter().chain(&ks).chain(&vs).chain(&os) {
            bld.arg(s);
        }
        let rows = (hq / hkv) * tq;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(64) as u32, hkv as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature and the buffers' extents.
        unsafe { bld.launch(cfg) }.w()?;
    }
    Ok((wrap(o, &dev, (b, hq, tq, d)), wrap(lse, &dev, (b, hq, tq))))
}

/// Dynamic shared memory of `flash_bwd<D>` (see the kernel's carve-up).
fn bwd_smem(d: usize) -> usize {
    let sd = d + 8;
    let bf = 2 * (64 * sd * 2 + 32 * sd * 2 + 64 * 40);
    bf + 4 * (2 * 32) + 4 * (3 * 32 + 2 * 64) + 8 * 128
}

/// Gradients of [`flash_attention`]: given its inputs, output `o`, log-sum-exp `lse` and the
/// output's gradient `d_o` (bf16, `(b, hq, t_q, d)`), returns `dq` `(b, hq, t_q, d)` and `dk`,
/// `dv` `(b, hkv, t_k, d)`, f32 (strided views of `(b, t, h, d)` buffers).
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    lse: &Tensor,
    m: &Masking,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (hq, hkv, d) = check_attn(q, k, v, m)?;
    let dev = device_of(q)?;
    let (b, tq, tk) = (m.b, m.tq, m.tk);
    // D = rowsum(dO ∘ O) (b, hq, tq).
    let dvec = (d_o.to_dtype(DType::F32)? * o.to_dtype(DType::F32)?)?
        .sum(3)?
        .contiguous()?;
    let lse = lse.to_dtype(DType::F32)?.contiguous()?;
    let (q, qs) = attn_operand(q, "q")?;
    let (k, ks) = attn_operand(k, "k")?;
    let (v, vs) = attn_operand(v, "v")?;
    let (d_o, ds) = attn_operand(d_o, "d_o")?;
    let dq = zeros::<f32>(&dev, b * tq * hq * d)?;
    let dk = zeros::<f32>(&dev, b * tk * hkv * d)?;
    let dv = zeros::<f32>(&dev, b * tk * hkv * d)?;
    if b * tq * tk > 0 {
        let name = if d == 64 {
            "flash_bwd_d64"
        } else {
            "flash_bwd_d128"
        };
        let func = dev.get_or_load_custom_func(name, "wildlong_flash_attn", FLASH_PTX)?;
        let smem = bwd_smem(d);
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        let (qg, ql) = q.storage_and_layout();
        let (kg, kl) = k.storage_and_layout();
        let (vg, vl) = v.storage_and_layout();
        let (dg, dl) = d_o.storage_and_layout();
        let (lg, ll) = lse.storage_and_layout();
        let (dvg, dvl) = dvec.storage_and_layout();
        let qv = view::<half::bf16>(&qg, ql, "q")?;
        let kv = view::<half::bf16>(&kg, kl, "k")?;
        let vv = view::<half::bf16>(&vg, vl, "v")?;
        let dov = view::<half::bf16>(&dg, dl, "d_o")?;
        let lv = view::<f32>(&lg, ll, "lse")?;
        let dvv = view::<f32>(&dvg, dvl, "dvec")?;
        mask_views!(m => qp, kp, qsv, ksv, kmv, has_seg, has_kmin);
        let mut bld = func.builder();
        bld.arg(&qv).arg(&kv).arg(&vv).arg(&dov).arg(&lv).arg(&dvv);
        bld.arg(&dq).arg(&dk).arg(&dv);
        let ints = [
            has_seg, has_kmin, hq as i32, hkv as i32, tq as i32, tk as i32, m.window,
        ];
        push_mask_args(&mut bld, [&qp, &kp, &qsv, &ksv, &kmv], &ints);
        bld.arg(&scale);
        for s in qs.iter().chain(&ks).chain(&vs).chain(&ds) {
            bld.arg(s);
        }
        let cfg = LaunchConfig {
            grid_dim: (tk.div_ceil(64) as u32, hkv as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the arguments match the kernel's signature and the buffers' extents.
        unsafe { bld.launch(cfg) }.w()?;
    }
    Ok((
        wrap(dq, &dev, (b, tq, hq, d)).transpose(1, 2)?,
        wrap(dk, &dev, (b, tk, hkv, d)).transpose(1, 2)?,
        wrap(dv, &dev, (b, tk, hkv, d)).transpose(1, 2)?,
    ))
}

fn contiguous_f32(x: &Tensor, what: &str) -> Result<Tensor> {
    if x.dtype() != DType::F32 {
        bail!("{what}: f32 only, got {:?}", x.dtype());
    }
    x.contiguous()
}

/// RMSNorm over the last dimension of an f32 tensor: `x / sqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let dev = device_of(x)?;
    let x = contiguous_f32(x, "rms_norm x")?;
    let w = contiguous_f32(w, "rms_norm w")?;
    let d = *x.dims().last().unwrap_or(&1);
    if w.elem_count() != d {
        bail!("rms_norm: weight of {} for rows of {d}", w.elem_count());
    }
    let n = x.elem_count() / d.max(1);
    let y = zeros::<f32>(&dev, x.elem_count())?;
    if n > 0 {
        let func = dev.get_or_load_custom_func("rms_norm_fwd_f32", "wildlong_fused", FUSED_PTX)?;
        let (xg, xl) = x.storage_and_layout();
        let (wg, wl) = w.storage_and_layout();
        let xv = view::<f32>(&xg, xl, "x")?;
        let wv = view::<f32>(&wg, wl, "w")?;
        let d_ = d as i32;
        let mut bld = func.builder();
        bld.arg(&xv).arg(&wv).arg(&y).arg(&d_).arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature and the buffers' extents.
        unsafe { bld.launch(cfg) }.w()?;
    }
    Ok(wrap(y, &dev, x.shape().clone()))
}

/// Widest row [`rms_norm_backward`] takes (256 threads × 32 columns each).
pub const RMS_BWD_MAX: usize = 8192;

/// Gradients `(dx, dw)` of [`rms_norm`] for the upstream gradient `dy`.
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let dev = device_of(x)?;
    let x = contiguous_f32(x, "rms_norm x")?;
    let w = contiguous_f32(w, "rms_norm w")?;
    let dy = contiguous_f32(dy, "rms_norm dy")?;
    let d = *x.dims().last().unwrap_or(&1);
    if d > RMS_BWD_MAX || w.elem_count() != d || dy.dims() != x.dims() {
        bail!(
            "rms_norm backward: x {:?}, w {:?}, dy {:?}",
            x.dims(),
            w.dims(),
            dy.dims()
        );
    }
    let n = x.elem_count() / d.max(1);
    let dx = zeros::<f32>(&dev, x.elem_count())?;
    let dw = zeros::<f32>(&dev, d)?;
    if n > 0 {
        let func = dev.get_or_load_custom_func("rms_norm_bwd_f32", "wildlong_fused", FUSED_PTX)?;
        let (xg, xl) = x.storage_and_layout();
        let (wg, wl) = w.storage_and_layout();
        let (gg, gl) = dy.storage_and_layout();
        let xv = view::<f32>(&xg, xl, "x")?;
        let wv = view::<f32>(&wg, wl, "w")?;
        let gv = view::<f32>(&gg, gl, "dy")?;
        let (n_, d_) = (n as i32, d as i32);
        let mut bld = func.builder();
        bld.arg(&xv)
            .arg(&wv)
            .arg(&gv)
            .arg(&dx)
            .arg(&dw)
            .arg(&n_)
            .arg(&d_)
            .arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(32) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature and the buffers' extents.
        unsafe { bld.launch(cfg) }.w()?;
    }
    Ok((wrap(dx, &dev, x.shape().clone()), wrap(dw, &dev, d)))
}

/// Rotates `x` `(b, h, t, d)` (f32 or bf16) by the tables `cos`, `sin` `(b, t, d/2)` f32,
/// half-split or `interleaved`; `inverse` rotates by −θ (the backward pass).
pub fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
    inverse: bool,
) -> Result<Tensor> {
    let dev = device_of(x)?;
    let x = x.contiguous()?;
    let cos = contiguous_f32(cos, "rope cos")?;
    let sin = contiguous_f32(sin, "rope sin")?;
    let (b, h, t, d) = x.dims4()?;
    if d % 2 != 0 || cos.elem_count() != b * t * d / 2 || sin.dims() != cos.dims() {
        bail!(
            "rope: x {:?} with tables {:?} (want (b, t, d/2))",
            x.dims(),
            cos.dims()
        );
    }
    let (bi, hi, ti, di) = (b as i32, h as i32, t as i32, d as i32);
    let (il, inv) = (interleaved as i32, inverse as i32);
    let pairs = b * h * t * d / 2;
    let cfg = LaunchConfig {
        grid_dim: (pairs.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (xg, xl) = x.storage_and_layout();
    let (cg, cl) = cos.storage_and_layout();
    let (sg, sl) = sin.storage_and_layout();
    let cv = view::<f32>(&cg, cl, "cos")?;
    let sv = view::<f32>(&sg, sl, "sin")?;
    macro_rules! launch {
        ($ty:ty, $name:expr) => {{
            let y = zeros::<$ty>(&dev, x.elem_count())?;
            if pairs > 0 {
                let func = dev.get_or_load_custom_func($name, "wildlong_fused", FUSED_PTX)?;
                let xv = view::<$ty>(&xg, xl, "x")?;
                let mut bld = func.builder();
                bld.arg(&xv).arg(&cv).arg(&sv).arg(&y);
                bld.arg(&bi).arg(&hi).arg(&ti).arg(&di).arg(&il).arg(&inv);
                // SAFETY: the arguments match the kernel's signature and the buffers' extents.
                unsafe { bld.launch(cfg) }.w()?;
            }
            wrap(y, &dev, (b, h, t, d))
        }};
    }
    Ok(match x.dtype() {
        DType::F32 => launch!(f32, "rope_f32"),
        DType::BF16 => launch!(half::bf16, "rope_bf16"),
        dt => bail!("rope: f32 or bf16 only, got {dt:?}"),
    })
}

/// Per-row cross-entropy of a logits chunk `z` `(c, v)` f32 against `targets` (all counted):
/// the losses `(c)` and, with `grad`, `d loss / d z = softmax(z) − one-hot` `(c, v)`.
pub fn cross_entropy_rows(
    z: &Tensor,
    targets: &[i64],
    grad: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dev = device_of(z)?;
    let z = contiguous_f32(z, "cross entropy logits")?;
    let (c, v) = z.dims2()?;
    if targets.len() != c {
        bail!("cross entropy: {} targets for {c} rows", targets.len());
    }
    let tg: Vec<i32> = targets
        .iter()
        .map(|&t| {
            if t < 0 || t as usize >= v {
                bail!("cross entropy: target {t} outside the vocabulary of {v}")
            }
            Ok(t as i32)
        })
        .collect::<Result<_>>()?;
    let tg = Tensor::from_vec(tg, c, z.device())?;
    let loss = zeros::<f32>(&dev, c)?;
    let dz = if grad {
        Some(zeros::<f32>(&dev, c * v)?)
    } else {
        None
    };
    if c > 0 {
        let func = dev.get_or_load_custom_func("ce_rows_f32", "wildlong_fused", FUSED_PTX)?;
        let (zg, zl) = z.storage_and_layout();
        let (tgg, tgl) = tg.storage_and_layout();
        let zv = view::<f32>(&zg, zl, "logits")?;
        let tv = view::<i32>(&tgg, tgl, "targets")?;
        let (v_, g_) = (v as i32, grad as i32);
        let mut bld = func.builder();
        bld.arg(&zv);
        match &dz {
            Some(d) => bld.arg(d),
            // Not written without grad; any device pointer will do.
            None => bld.arg(&zv),
        };
        bld.arg(&tv).arg(&loss).arg(&v_).arg(&g_);
        let cfg = LaunchConfig {
            grid_dim: (c as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature and the buffers' extents.
        unsafe { bld.launch(cfg) }.w()?;
    }
    Ok((wrap(loss, &dev, c), dz.map(|d| wrap(d, &dev, (c, v)))))
}
