//! Where model weights come from (HF safetensors or GGUF) and the linear layer they fill.
//!
//! Tensors are always requested by their Hugging Face name (`model.layers.3.self_attn.q_proj.weight`);
//! for GGUF files the one mapping to llama.cpp names lives in [`gguf_name`]. This file does not
//! know the model's structure; `llama/` does (its GGUF config gives the head size that
//! LoRA deltas on permuted q/k rows are permuted with).

use crate::engine::kquants::{self, RawWeight};
use crate::engine::lora::LoraAdapter;
use crate::engine::packed::{BlockKind, PackedWeight};
use crate::engine::packed_int8::{self, Int8Weight};
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How GGUF weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// The file's blocks × f32 activations, exact w.r.t. the dequantized file, memory ≈ the
    /// file: few-row matmuls (decode) through block kernels (Q4_0/Q4_1/Q8_0, the K-quants,
    /// Q5_0/Q5_1), many-row ones (prefill) through gemm over slabs of rows dequantized per call.
    /// On CUDA (as `packed` and `int8-activations` there) the blocks run through candle's
    /// quantized matmuls: 8-bit activations, not exact.
    #[default]
    Exact,
    /// As `exact`, but Q4_0/Q4_1/Q8_0 run the block kernels at every row count (no prefill
    /// slabs; slower prefill).
    Packed,
    /// Dequantized to f32: gemm-backed, the fastest prefill on CPU, and exact w.r.t. the file.
    F32,
    /// Re-quantized to Q8_0: SIMD vec-dot kernels, ~4x fewer bytes per decoded token than f32.
    Q8_0,
    /// Kept as stored in the file (Q4_1 runs on candle's scalar path: slow).
    Native,
    /// f32 for many-row matmuls (prefill) and Q8_0 for few-row matmuls (decode). Faster decode,
    /// but Q8_0 activations can flip near-tied greedy choices (seen on SmolLM2-135M).
    Hybrid,
    /// The file's blocks × activations quantized to 8 bits, as llama.cpp computes them: Q4_0,
    /// Q4_1 and Q8_0 through our AVX512-VNNI integer dot products (8 bits per 32 values),
    /// Q4_K/Q5_K/Q6_K through candle's quantized matmul (Q8_K activations, 8 bits per 256),
    /// at every row count: the fastest batched decode and prefill, memory ≈ the file, but not
    /// exact (near-tied greedy choices can flip). Q5_0/Q5_1 run exact; CPUs without
    /// AVX512-VNNI run Q4_0/Q4_1/Q8_0 exact too.
    Int8Activations,
}

/// A weight held as GGUF blocks (no dense copy).
enum Blocks<'a> {
    Raw(&'a RawWeight),
    Packed(&'a PackedWeight),
}

impl Blocks<'_> {
    /// Rows `r0..r0 + out.len() / k` as f32.
    fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        match self {
            Self::Raw(w) => w.dequantize_rows(r0, out),
            Self::Packed(p) => p.dequantize_rows(r0, out),
        }
    }
}

/// Row count at or below which a linear holding several copies uses its quantized one.
const QUANT_MAX_ROWS: usize = 16;

/// `y = x W^T (+ b)` over dense and/or quantized copies of `W` (out, in).
#[derive(Clone)]
pub struct Linear {
    dense: Option<Tensor>,
    quant: Option<Arc<QMatMul>>,
    packed: Option<Arc<PackedWeight>>,
    int8: Option<Arc<Int8Weight>>,
    raw: Option<Arc<RawWeight>>,
    /// Many-row matmuls of a block-only `packed` weight go through dequantized slabs and gemm
    /// (else through the block kernels).
    slabs: bool,
    /// `quant` holds the file's own blocks (not a re-quantized copy): an embedding table can
    /// read its rows from them.
    stored_quant: bool,
    bias: Option<Tensor>,
    out_dim: usize,
    in_dim: usize,
}

impl Linear {
    pub fn from_dense(w: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = w.dims2()?;
        Ok(Self {
            dense: Some(w),
            quant: None,
            packed: None,
            int8: None,
            raw: None,
            slabs: false,
            stored_quant: false,
            bias,
            out_dim,
            in_dim,
        })
    }

    fn from_int8(w: Int8Weight) -> Self {
        let (out_dim, in_dim) = w.dims();
        Self {
            dense: None,
            quant: None,
            packed: None,
            int8: Some(Arc::new(w)),
            raw: None,
            slabs: false,
            stored_quant: false,
            bias: None,
            out_dim,
            in_dim,
        }
    }

    fn from_raw(w: RawWeight) -> Self {
        let (out_dim, in_dim) = w.dims();
        Self {
            dense: None,
            quant: None,
            packed: None,
            int8: None,
            raw: Some(Arc::new(w)),
            slabs: false,
            stored_quant: false,
            bias: None,
            out_dim,
            in_dim,
        }
    }

    fn from_parts(
        dense: Option<Tensor>,
        quant: Option<QMatMul>,
        packed: Option<PackedWeight>,
        out_dim: usize,
        in_dim: usize,
    ) -> Self {
        Self {
            dense,
            quant: quant.map(Arc::new),
            packed: packed.map(Arc::new),
            int8: None,
            raw: None,
            slabs: false,
            stored_quant: false,
            bias: None,
            out_dim,
            in_dim,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// The linears `parts` (same input) stacked into one whose output is their outputs side by
    /// side: one matmul instead of several. `None` when a part holds a candle quantized matmul
    /// or a bias.
    pub fn stack(parts: &[&Linear]) -> Result<Option<Linear>> {
        let first = parts.first().context("stacking no linears")?;
        if first.int8.is_some() {
            let int8 = parts
                .iter()
                .map(|l| match (&l.int8, &l.bias) {
                    (Some(w), None) => Some(w.as_ref()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>();
            return Ok(int8
                .and_then(|p| Int8Weight::stack(&p))
                .map(Linear::from_int8));
        }
        if first.raw.is_some() {
            let raw = parts
                .iter()
                .map(|l| match (&l.raw, &l.bias) {
                    (Some(w), None) => Some(w.as_ref()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>();
            return Ok(raw.and_then(|p| RawWeight::stack(&p)).map(Linear::from_raw));
        }
        let same = |l: &&Linear| {
            l.quant.is_none()
                && l.int8.is_none()
                && l.raw.is_none()
                && l.bias.is_none()
                && l.in_dim == first.in_dim
                && l.dense.is_some() == first.dense.is_some()
                && l.packed.is_some() == first.packed.is_some()
        };
        if !parts.iter().all(same) {
            return Ok(None);
        }
        let dense = match &first.dense {
            Some(_) => Some(Tensor::cat(
                &parts
                    .iter()
                    .map(|l| l.dense.as_ref().context("dense part"))
                    .collect::<Result<Vec<_>>>()?,
                0,
            )?),
            None => None,
        };
        let packed = match &first.packed {
            Some(_) => match PackedWeight::stack(
                &parts
                    .iter()
                    .map(|l| l.packed.as_deref().context("packed part"))
                    .collect::<Result<Vec<_>>>()?,
            )? {
                Some(p) => Some(p),
                None => return Ok(None),
            },
            None => None,
        };
        let out_dim = parts.iter().map(|l| l.out_dim).sum();
        let mut l = Linear::from_parts(dense, None, packed, out_dim, first.in_dim);
        l.slabs = first.slabs;
        Ok(Some(l))
    }

    /// Bytes this linear holds (weights in every copy, and the bias).
    pub fn bytes(&self) -> u64 {
        let tensor = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let quant = self.quant.as_deref().map_or(0, |q| match q {
            QMatMul::QTensor(t) => t.storage_size_in_bytes() as u64,
            // A copy sharing the dense tensor's storage is counted once.
            QMatMul::Tensor(t) | QMatMul::TensorF16(t)
                if self.dense.as_ref().is_some_and(|d| d.id() == t.id()) =>
            {
                0
            }
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => tensor(t),
        });
        self.dense.as_ref().map_or(0, tensor)
            + quant
            + self.packed.as_ref().map_or(0, |p| p.bytes() as u64)
            + self.int8.as_ref().map_or(0, |w| w.bytes() as u64)
            + self.raw.as_ref().map_or(0, |w| w.bytes_held() as u64)
            + self.bias.as_ref().map_or(0, tensor)
    }

    /// Whether `other` holds the very same weights (a tied head and table).
    pub fn shares(&self, other: &Linear) -> bool {
        fn same<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
            matches!((a, b), (Some(a), Some(b)) if Arc::ptr_eq(a, b))
        }
        same(&self.raw, &other.raw)
            || same(&self.packed, &other.packed)
            || same(&self.int8, &other.int8)
            || same(&self.quant, &other.quant)
            || matches!((&self.dense, &other.dense), (Some(a), Some(b)) if a.id() == b.id())
    }

    /// The dense copy `(out, in)`, when this linear holds one.
    pub fn dense(&self) -> Option<&Tensor> {
        self.dense.as_ref()
    }

    /// The blocks the weight is held as, when it has no dense copy.
    fn blocks(&self) -> Option<Blocks<'_>> {
        match (&self.dense, &self.raw, &self.packed) {
            (None, Some(w), _) => Some(Blocks::Raw(w)),
            (None, None, Some(p)) => Some(Blocks::Packed(p)),
            _ => None,
        }
    }

    /// Whether the weight is held only as blocks that [`Linear::block_rows`] reads.
    pub fn holds_blocks(&self) -> bool {
        self.blocks().is_some()
    }

    /// The file's blocks in candle's quantized matmul, when they are all this linear holds
    /// (an embedding table reads its rows from them with `QMatMul::embedding`, on any device).
    pub fn stored_quant(&self) -> Option<&QMatMul> {
        match (&self.dense, &self.quant) {
            (None, Some(q)) if self.stored_quant => Some(q),
            _ => None,
        }
    }

    /// Rows `ids` of the weight dequantized, `(ids.len(), in)` f32 on the CPU, when it is held
    /// only as blocks (an embedding table looked up without an f32 copy); `None` otherwise.
    pub fn block_rows(&self, ids: &[u32]) -> Result<Option<Tensor>> {
        let Some(blocks) = self.blocks() else {
            return Ok(None);
        };
        let k = self.in_dim;
        let mut out = vec![0f32; ids.len() * k];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(k)) {
            if id as usize >= self.out_dim {
                bail!("token id {id} is outside the vocabulary ({})", self.out_dim);
            }
            blocks.dequantize_rows(id as usize, row);
        }
        Ok(Some(Tensor::from_vec(out, (ids.len(), k), &Device::Cpu)?))
    }

    /// The dense weight `(out, in)`, dequantizing when only a quantized copy is held.
    pub fn weight(&self) -> Result<Tensor> {
        if let (None, Some(w)) = (&self.dense, &self.raw) {
            let (n, k) = w.dims();
            return Ok(Tensor::from_vec(w.dequantize(), (n, k), &Device::Cpu)?);
        }
        if let (None, Some(w)) = (&self.dense, &self.int8) {
            let (n, k) = w.dims();
            return Ok(Tensor::from_vec(w.dequantize(), (n, k), &Device::Cpu)?);
        }
        if let (None, Some(p)) = (&self.dense, &self.packed) {
            let (n, k) = p.dims();
            return Ok(Tensor::from_vec(
                p.dequantize(),
                (n, k),
                &candle_core::Device::Cpu,
            )?);
        }
        match (&self.dense, &self.quant) {
            (Some(w), _) => Ok(w.clone()),
            (None, Some(q)) => match q.as_ref() {
                QMatMul::QTensor(t) => Ok(t.dequantize(&t.device())?),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => Ok(t.to_dtype(DType::F32)?),
            },
            (None, None) => bail!("linear layer without weights"),
        }
    }

    /// x `(.., in)` → `(.., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / self.in_dim.max(1);
        if let Some(w) = &self.int8 {
            return self.add_bias(on_host(x, rows, self.out_dim, |xs| {
                packed_int8::matmul(xs, rows, w)
            })?);
        }
        if let Some(w) = &self.raw {
            return self.add_bias(on_host(x, rows, self.out_dim, |xs| {
                kquants::matmul(xs, rows, w)
            })?);
        }
        // A packed weight is held without a dense copy.
        if let Some(p) = &self.packed {
            if !self.slabs || rows <= kquants::KERNEL_MAX_ROWS {
                return self.add_bias(forward_packed(p, x, rows, self.out_dim)?);
            }
            let (n, k) = p.dims();
            return self.add_bias(on_host(x, rows, self.out_dim, |xs| {
                Ok(kquants::slab_matmul(xs, rows, n, k, &|r0, out| {
                    p.dequantize_rows(r0, out)
                }))
            })?);
        }
        let y = match (&self.dense, &self.quant) {
            (Some(w), Some(q)) if rows <= QUANT_MAX_ROWS => forward_quant(q, x, w.dtype())?,
            (Some(w), _) => {
                candle_nn::Linear::new(w.clone(), None).forward(&x.to_dtype(w.dtype())?)?
            }
            (None, Some(q)) => forward_quant(q, x, x.dtype())?,
            (None, None) => bail!("linear layer without weights"),
        };
        self.add_bias(y)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

fn forward_packed(p: &PackedWeight, x: &Tensor, rows: usize, out_dim: usize) -> Result<Tensor> {
    on_host(x, rows, out_dim, |xs| {
        crate::engine::packed::matmul(xs, rows, p)
    })
}

/// `x (.., in)` → `(.., out)` through a host matmul over its f32 rows.
fn on_host(
    x: &Tensor,
    rows: usize,
    out_dim: usize,
    mm: impl FnOnce(&[f32]) -> Result<Vec<f32>>,
) -> Result<Tensor> {
    let mut shape = x.dims().to_vec();
    *shape.last_mut().context("linear input of rank 0")? = out_dim;
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let y = mm(&xs)?;
    debug_assert_eq!(y.len(), rows * out_dim);
    Ok(Tensor::from_vec(y, shape, x.device())?.to_dtype(x.dtype())?)
}

fn forward_quant(q: &QMatMul, x: &Tensor, out_dtype: DType) -> Result<Tensor> {
    // Quantized matmuls take f32 rows and need them contiguous.
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    Ok(q.forward(&x)?.to_dtype(out_dtype)?)
}

/// A source of named tensors.
pub enum WeightSource {
    Safetensors {
        vb: VarBuilder<'static>,
        files: Vec<PathBuf>,
        lora: Option<Box<LoraAdapter>>,
    },
    Gguf {
        content: gguf_file::Content,
        reader: BufReader<File>,
        path: PathBuf,
        format: WeightFormat,
        device: Device,
        lora: Option<Box<LoraAdapter>>,
    },
}

/// llama.cpp's name for a Hugging Face Llama tensor name.
pub fn gguf_name(hf: &str) -> Result<String> {
    let simple = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Ok(s.to_string());
    }
    let rest = hf
        .strip_prefix("model.layers.")
        .with_context(|| format!("no GGUF name for `{hf}`"))?;
    let (idx, tail) = rest
        .split_once('.')
        .with_context(|| format!("no GGUF name for `{hf}`"))?;
    let (module, kind) = tail
        .rsplit_once('.')
        .with_context(|| format!("no GGUF name for `{hf}`"))?;
    let g = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => bail!("no GGUF name for `{hf}`"),
    };
    Ok(format!("blk.{idx}.{g}.{kind}"))
}

impl WeightSource {
    /// Memory-maps safetensors shards (never pickles) as `dtype` on `device`.
    pub fn safetensors(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        for f in files {
            if !f.is_file() {
                bail!("{}: no such safetensors file", f.display());
            }
        }
        // SAFETY: candle maps the files read-only and validates each header and tensor extent.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.map_err(|e| {
                let names = files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                anyhow::anyhow!("{names}: not a valid safetensors checkpoint ({e})")
            })?;
        Ok(Self::Safetensors {
            vb,
            files: files.to_vec(),
            lora: None,
        })
    }

    /// Named tensors already in memory (random weights made on the device for `wildlong
    /// bench --synthetic`), read as `dtype` on `device`.
    pub fn in_memory(
        tensors: std::collections::HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self::Safetensors {
            vb: VarBuilder::from_tensors(tensors, dtype, device),
            files: Vec::new(),
            lora: None,
        }
    }

    /// Opens a GGUF file and checks that every tensor lies inside it.
    pub fn gguf(path: &Path, format: WeightFormat, device: &Device) -> Result<Self> {
        let (content, reader) = read_gguf(path)?;
        Ok(Self::Gguf {
            content,
            reader,
            path: path.to_path_buf(),
            format,
            device: device.clone(),
            lora: None,
        })
    }

    /// Merges `adapter` into every linear layer it names as the layers load.
    pub fn set_lora(&mut self, adapter: LoraAdapter) {
        match self {
            Self::Safetensors { lora, .. } | Self::Gguf { lora, .. } => {
                *lora = Some(Box::new(adapter))
            }
        }
    }

    pub fn lora(&self) -> Option<&LoraAdapter> {
        match self {
            Self::Safetensors { lora, .. } | Self::Gguf { lora, .. } => lora.as_deref(),
        }
    }

    fn lora_mut(&mut self) -> Option<&mut LoraAdapter> {
        match self {
            Self::Safetensors { lora, .. } | Self::Gguf { lora, .. } => lora.as_deref_mut(),
        }
    }

    /// The parsed GGUF header, for GGUF sources.
    pub fn gguf_content(&self) -> Option<&gguf_file::Content> {
        match self {
            Self::Gguf { content, .. } => Some(content),
            Self::Safetensors { .. } => None,
        }
    }

    pub fn has(&self, hf: &str) -> bool {
        match self {
            Self::Safetensors { vb, .. } => vb.contains_tensor(hf),
            Self::Gguf { content, .. } => {
                gguf_name(hf).is_ok_and(|g| content.tensor_infos.contains_key(&g))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Safetensors { files, .. } => files
                .first()
                .map_or_else(|| "in-memory weights".into(), |f| f.display().to_string()),
            Self::Gguf { path, .. } => path.display().to_string(),
        }
    }

    fn gguf_qtensor(&mut self, hf: &str) -> Result<QTensor> {
        let g = gguf_name(hf)?;
        self.gguf_qtensor_named(&g)?
            .with_context(|| format!("no tensor `{g}` in this GGUF source"))
    }

    fn gguf_qtensor_named(&mut self, name: &str) -> Result<Option<QTensor>> {
        let Self::Gguf {
            content,
            reader,
            device,
            ..
        } = self
        else {
            return Ok(None);
        };
        if !content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        Ok(Some(
            content
                .tensor(reader, name, device)
                .with_context(|| format!("reading tensor `{name}`"))?,
        ))
    }

    /// A dense tensor of the given shape, in the source's compute dtype.
    pub fn tensor(&mut self, hf: &str, shape: &[usize]) -> Result<Tensor> {
        let what = self.describe();
        let t = match self {
            Self::Safetensors { vb, .. } => vb
                .get(shape, hf)
                .with_context(|| format!("{what}: tensor `{hf}`"))?,
            Self::Gguf { device, .. } => {
                let device = device.clone();
                let q = self
                    .gguf_qtensor(hf)
                    .with_context(|| format!("{what}: tensor `{hf}`"))?;
                let t = q.dequantize(&device)?;
                // GGUF stores dims innermost-first; candle already reverses them.
                if t.dims() != shape {
                    bail!(
                        "{what}: tensor `{hf}` has shape {:?}, expected {shape:?}",
                        t.dims()
                    );
                }
                t
            }
        };
        Ok(t)
    }

    /// A GGUF tensor that may be absent (e.g. `rope_freqs.weight`), by its GGUF name.
    pub fn gguf_raw(&mut self, name: &str) -> Result<Option<Tensor>> {
        match self.gguf_qtensor_named(name)? {
            Some(q) => Ok(Some(q.dequantize(&q.device())?)),
            None => Ok(None),
        }
    }

    /// A linear layer `(out, in)` named `prefix.weight` (+ optional `prefix.bias`).
    pub fn linear(
        &mut self,
        prefix: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        let wname = format!("{prefix}.weight");
        let mut lin = match self {
            Self::Safetensors { .. } => {
                Linear::from_dense(self.tensor(&wname, &[out_dim, in_dim])?, None)?
            }
            Self::Gguf { format, device, .. } => {
                let (format, device) = (*format, device.clone());
                let what = self.describe();
                let q = self
                    .gguf_qtensor(&wname)
                    .with_context(|| format!("{what}: tensor `{wname}`"))?;
                if q.shape().dims() != [out_dim, in_dim] {
                    bail!(
                        "{what}: tensor `{wname}` has shape {:?}, expected [{out_dim}, {in_dim}]",
                        q.shape().dims()
                    );
                }
                quantized_linear(q, format, &device, out_dim, in_dim)?
            }
        };
        if let Some(mut delta) = match self.lora_mut() {
            Some(l) => l.delta(prefix, out_dim, in_dim)?,
            None => None,
        } {
            // PEFT deltas are in HF row order; llama.cpp permuted the q/k rows of GGUF
            // weights (interleaved RoPE pairs), so the delta's rows move the same way.
            // (Qwen's GGUFs keep HF's order: their RoPE runs on halves.)
            if prefix.ends_with("self_attn.q_proj") || prefix.ends_with("self_attn.k_proj") {
                if let Some(content) = self.gguf_content() {
                    let c = crate::engine::llama::Config::from_gguf(content, None)?;
                    if c.rope.layout == crate::engine::rope::RopeLayout::Interleaved {
                        delta = permute_rows_for_gguf(&delta, c.head_dim)?;
                    }
                }
            }
            // W' = W + scale · B A, in f32, back in the weight's dtype.
            let w = lin.weight()?;
            let merged = (w.to_dtype(DType::F32)? + delta.to_device(w.device())?)?;
            lin = Linear::from_dense(merged.to_dtype(w.dtype())?, None)?;
        }
        if bias {
            lin.bias = Some(self.tensor(&format!("{prefix}.bias"), &[out_dim])?);
        }
        Ok(lin)
    }
}

/// llama.cpp's converter permutation of q/k rows (`permute()` in convert_hf_to_gguf.py): within
/// each head of `head_dim` rows, row i goes to 2i and row i + head_dim/2 to 2i + 1.
pub fn permute_rows_for_gguf(w: &Tensor, head_dim: usize) -> Result<Tensor> {
    swap_row_axes(w, head_dim, 2, head_dim / 2)
}

/// The inverse of [`permute_rows_for_gguf`]: GGUF q/k row order back to HF's.
pub fn unpermute_rows_from_gguf(w: &Tensor, head_dim: usize) -> Result<Tensor> {
    swap_row_axes(w, head_dim, head_dim / 2, 2)
}

/// Views each head's rows as `(a, b)` and transposes them to `(b, a)`.
fn swap_row_axes(w: &Tensor, head_dim: usize, a: usize, b: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if head_dim == 0 || !rows.is_multiple_of(head_dim) || !head_dim.is_multiple_of(2) {
        bail!("cannot permute {rows} rows in heads of {head_dim}");
    }
    Ok(w.reshape((rows / head_dim, a, b, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// What a GGUF weight is held as in memory: the one decision the loader
/// ([`quantized_linear`]) and the memory plan ([`Holding::bytes`]) both follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Q4_0/Q4_1/Q8_0 blocks repacked for 8-bit activations ([`Int8Weight`]).
    Int8,
    /// K-quant and 5-bit blocks as stored ([`RawWeight`]).
    Raw,
    /// Q4_0/Q4_1/Q8_0 blocks repacked with f32 scales ([`PackedWeight`]); `slabs`: many-row
    /// matmuls through dequantized slabs and gemm.
    Packed { slabs: bool },
    /// An f32 copy only.
    Dense,
    /// A candle quantized matmul only.
    Quant(QuantCopy),
    /// An f32 copy for many rows and a candle quantized matmul for few.
    DenseAndQuant(QuantCopy),
}

/// The copy a candle quantized matmul holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantCopy {
    /// The file's blocks (float types: candle dequantizes them to f32).
    AsStored,
    /// Re-quantized to Q8_0.
    Q8_0,
    /// Rows Q8_0 cannot block: f32.
    F32,
}

impl Holding {
    /// How a weight of `dtype` with rows of `k` is held in `format`, on the CPU or not.
    pub fn of(dtype: GgmlDType, k: usize, format: WeightFormat, cpu: bool) -> Self {
        // K-quants with integer activations: candle's Q8_K kernels (AVX2 and up, prefill and
        // decode tuned) are what llama.cpp computes; our f32-activation kernels are the exact
        // path.
        let k_quant = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K);
        if format == WeightFormat::Int8Activations && cpu && k_quant && RawWeight::takes(dtype, k) {
            return Self::Quant(QuantCopy::AsStored);
        }
        // Without VNNI the integer path would be the scalar reference: load `exact` instead.
        let format = match format {
            WeightFormat::Int8Activations if !(cpu && packed_int8::has_vnni()) => {
                WeightFormat::Exact
            }
            f => f,
        };
        let packs = PackedWeight::takes(dtype, k);
        if format == WeightFormat::Int8Activations && packs {
            return Self::Int8;
        }
        let keeps_blocks = matches!(
            format,
            WeightFormat::Exact | WeightFormat::Packed | WeightFormat::Int8Activations
        );
        // K-quants and 5-bit types are held as stored on the CPU in every format that keeps
        // the file's blocks (Q5_0/Q5_1 run exact with integer activations too: candle's
        // kernels for them are scalar).
        if keeps_blocks && cpu && RawWeight::takes(dtype, k) {
            return Self::Raw;
        }
        if keeps_blocks && format != WeightFormat::Int8Activations && cpu && packs {
            return Self::Packed {
                slabs: format == WeightFormat::Exact,
            };
        }
        // On CUDA the file's blocks go to candle's quantized matmuls (MMVQ for few rows, MMQ
        // beyond; activations quantized to 8 bits) instead of an f32 copy 4-8x their size.
        if keeps_blocks && !cpu && !is_float(dtype) {
            return Self::Quant(QuantCopy::AsStored);
        }
        let q8 = || {
            if dtype == GgmlDType::Q8_0 {
                QuantCopy::AsStored
            } else if k.is_multiple_of(GgmlDType::Q8_0.block_size()) {
                QuantCopy::Q8_0
            } else {
                QuantCopy::F32
            }
        };
        match format {
            // Block types the packed kernels do not cover run as f32 in the exact formats.
            WeightFormat::F32
            | WeightFormat::Exact
            | WeightFormat::Packed
            | WeightFormat::Int8Activations => Self::Dense,
            WeightFormat::Native => Self::Quant(QuantCopy::AsStored),
            WeightFormat::Q8_0 => Self::Quant(q8()),
            WeightFormat::Hybrid => Self::DenseAndQuant(q8()),
        }
    }

    /// Bytes an `(n, k)` weight of `dtype` held this way takes.
    pub fn bytes(self, dtype: GgmlDType, n: usize, k: usize) -> u64 {
        let f32s = (n * k * 4) as u64;
        let stored = (n * k / dtype.block_size() * dtype.type_size()) as u64;
        let quant = |c: QuantCopy| match c {
            QuantCopy::AsStored if is_float(dtype) => f32s,
            QuantCopy::AsStored => stored,
            QuantCopy::Q8_0 => {
                (n * k / GgmlDType::Q8_0.block_size() * GgmlDType::Q8_0.type_size()) as u64
            }
            QuantCopy::F32 => f32s,
        };
        let kind = || BlockKind::from_ggml(dtype).expect("a packed holding has a packed type");
        match self {
            Self::Int8 => Int8Weight::bytes_for(kind(), n, k) as u64,
            Self::Raw => stored,
            Self::Packed { .. } => PackedWeight::bytes_for(kind(), n, k) as u64,
            Self::Dense => f32s,
            Self::Quant(c) => quant(c),
            // An f32 fallback shares the dense copy.
            Self::DenseAndQuant(QuantCopy::F32) => f32s,
            Self::DenseAndQuant(c) => f32s + quant(c),
        }
    }

    /// Whether the weight is held only as blocks an embedding lookup reads row by row.
    pub fn is_blocks(self) -> bool {
        matches!(self, Self::Raw | Self::Packed { .. })
    }

    /// Whether an embedding table held this way is looked up from the blocks (as stored
    /// blocks on the CPU, or the file's blocks in a candle quantized matmul on any device)
    /// instead of an f32 copy.
    pub fn rows_from_blocks(self, dtype: GgmlDType, cpu: bool) -> bool {
        (cpu && self.is_blocks()) || (self == Self::Quant(QuantCopy::AsStored) && !is_float(dtype))
    }

    /// Whether an f32 copy is held (an embedding table shares it).
    pub fn has_dense(self) -> bool {
        matches!(self, Self::Dense | Self::DenseAndQuant(_))
    }
}

fn is_float(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Builds a linear from a GGUF tensor in the requested in-memory format.
pub fn quantized_linear(
    q: QTensor,
    format: WeightFormat,
    device: &Device,
    out_dim: usize,
    in_dim: usize,
) -> Result<Linear> {
    let holding = Holding::of(q.dtype(), in_dim, format, device.is_cpu());
    let what = || format!("{:?} weight held as {holding:?}", q.dtype());
    let q8 = |q: QTensor, c: QuantCopy| -> Result<QMatMul> {
        Ok(match c {
            QuantCopy::AsStored => QMatMul::from_qtensor(q)?,
            QuantCopy::Q8_0 => {
                QMatMul::from_qtensor(QTensor::quantize(&q.dequantize(device)?, GgmlDType::Q8_0)?)?
            }
            QuantCopy::F32 => QMatMul::Tensor(q.dequantize(device)?),
        })
    };
    Ok(match holding {
        Holding::Int8 => {
            let p = PackedWeight::from_qtensor(&q)?.with_context(what)?;
            Linear::from_int8(Int8Weight::from_packed(&p))
        }
        Holding::Raw => Linear::from_raw(RawWeight::from_qtensor(&q)?.with_context(what)?),
        Holding::Packed { slabs } => {
            let p = PackedWeight::from_qtensor(&q)?.with_context(what)?;
            let mut l = Linear::from_parts(None, None, Some(p), out_dim, in_dim);
            l.slabs = slabs;
            l
        }
        Holding::Dense => {
            Linear::from_parts(Some(q.dequantize(device)?), None, None, out_dim, in_dim)
        }
        Holding::Quant(c) => {
            let stored = c == QuantCopy::AsStored && !is_float(q.dtype());
            let mut l = Linear::from_parts(None, Some(q8(q, c)?), None, out_dim, in_dim);
            l.stored_quant = stored;
            l
        }
        Holding::DenseAndQuant(c) => {
            let dense = q.dequantize(device)?;
            let quant = match c {
                QuantCopy::AsStored => QMatMul::from_qtensor(q)?,
                QuantCopy::Q8_0 => {
                    QMatMul::from_qtensor(QTensor::quantize(&dense, GgmlDType::Q8_0)?)?
                }
                QuantCopy::F32 => QMatMul::Tensor(dense.clone()),
            };
            Linear::from_parts(Some(dense), Some(quant), None, out_dim, in_dim)
        }
    })
}

/// Reads a GGUF header and validates tensor extents against the file size.
pub fn read_gguf(path: &Path) -> Result<(gguf_file::Content, BufReader<File>)> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::new(file);
    check_gguf_header(&mut reader, file_len)
        .map_err(|e| anyhow::anyhow!("{}: not a readable GGUF file ({e})", path.display()))?;
    reader.seek(std::io::SeekFrom::Start(0))?;
    let content = gguf_file::Content::read(&mut reader)
        .map_err(|e| anyhow::anyhow!("{}: not a readable GGUF file ({e})", path.display()))?;
    for (name, info) in &content.tensor_infos {
        let elems = info
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d));
        let bs = info.ggml_dtype.block_size();
        let end = elems
            .and_then(|e| (e / bs).checked_mul(info.ggml_dtype.type_size()))
            .and_then(|b| {
                content
                    .tensor_data_offset
                    .checked_add(info.offset)?
                    .checked_add(b as u64)
            });
        if end.is_none_or(|e| e > file_len) {
            bail!(
                "{}: truncated GGUF file: tensor `{name}` ({:?}) ends past the file's {file_len} bytes",
                path.display(),
                info.shape.dims()
            );
        }
    }
    Ok((content, reader))
}

/// Walks a GGUF header (metadata and tensor infos) before candle's reader does, checking
/// every count and length against the bytes the file has and what candle's reader does not
/// check: a zero `general.alignment` (it divides by it). A corrupted header must be an
/// error naming the file, never a panic (tested with mutated headers in `props.rs`).
pub fn check_gguf_header<R: Read + Seek>(r: &mut R, file_len: u64) -> Result<()> {
    fn u32_(r: &mut impl Read) -> Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).context("the header ends early")?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64_(r: &mut impl Read) -> Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).context("the header ends early")?;
        Ok(u64::from_le_bytes(b))
    }
    struct Walk<'a, R> {
        r: &'a mut R,
        len: u64,
        v1: bool,
    }
    impl<R: Read + Seek> Walk<'_, R> {
        fn count(&mut self, what: &str, unit: u64) -> Result<u64> {
            let n = if self.v1 {
                u32_(self.r)? as u64
            } else {
                u64_(self.r)?
            };
            let pos = self.r.stream_position()?;
            let need = n.checked_mul(unit.max(1));
            if need.is_none_or(|b| b > self.len.saturating_sub(pos)) {
                bail!(
                    "{what} of {n} at byte {pos} runs past the end of the {}-byte file",
                    self.len
                );
            }
            Ok(n)
        }
        fn skip(&mut self, n: u64) -> Result<()> {
            let pos = self.r.stream_position()?;
            if n > self.len.saturating_sub(pos) {
                bail!("a value at byte {pos} runs past the end of the file");
            }
            self.r.seek(std::io::SeekFrom::Current(n as i64))?;
            Ok(())
        }
        fn string(&mut self) -> Result<()> {
            let n = self.count("a string", 1)?;
            self.skip(n)
        }
        fn value(&mut self, ty: u32, depth: usize) -> Result<()> {
            match ty {
                0 | 1 | 7 => self.skip(1),
                2 | 3 => self.skip(2),
                4..=6 => self.skip(4),
                10..=12 => self.skip(8),
                8 => self.string(),
                9 if depth < 4 => {
                    let inner = u32_(self.r)?;
                    let n = self.count("an array", 1)?;
                    for _ in 0..n {
                        self.value(inner, depth + 1)?;
                    }
                    Ok(())
                }
                9 => bail!("metadata arrays nested more than 4 deep"),
                t => bail!("unknown metadata value type {t}"),
            }
        }
    }
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)
        .context("the file is shorter than a GGUF header")?;
    if &magic != b"GGUF" {
        bail!("no GGUF magic (the file starts with {magic:?})");
    }
    let version = u32_(r)?;
    if !(1..=3).contains(&version) {
        bail!("unsupported GGUF version {version}");
    }
    let mut w = Walk {
        r,
        len: file_len,
        v1: version == 1,
    };
    // Each tensor info takes at least 16 bytes, each metadata entry at least 12.
    let tensors = w.count("a tensor count", 16)?;
    let kvs = w.count("a metadata count", 12)?;
    for _ in 0..kvs {
        let n = w.count("a key", 1)?;
        let mut key = vec![0u8; n as usize];
        w.r.read_exact(&mut key)?;
        let ty = u32_(w.r)?;
        if key == b"general.alignment" {
            // candle divides by it.
            let pos = w.r.stream_position()?;
            let v = match ty {
                0 | 1 => {
                    let mut b = [0u8; 1];
                    w.r.read_exact(&mut b)?;
                    b[0] as u64
                }
                2 | 3 => {
                    let mut b = [0u8; 2];
                    w.r.read_exact(&mut b)?;
                    u16::from_le_bytes(b) as u64
                }
                4 | 5 => u32_(w.r)? as u64,
                _ => 1,
            };
            if v == 0 {
                bail!("general.alignment is 0");
            }
            w.r.seek(std::io::SeekFrom::Start(pos))?;
        }
        w.value(ty, 0)?;
    }
    for _ in 0..tensors {
        w.string()?;
        let dims = u32_(w.r)?;
        if dims > 4 {
            bail!("a tensor with {dims} dimensions (GGML has at most 4)");
        }
        let mut elems: u64 = 1;
        for _ in 0..dims {
            let d = if w.v1 { u32_(w.r)? as u64 } else { u64_(w.r)? };
            elems = elems
                .checked_mul(d)
                .filter(|&e| e <= file_len.saturating_mul(8))
                .with_context(|| format!("a tensor shape larger than the {file_len}-byte file"))?;
        }
        // The type (checked by candle's reader) and the data offset.
        u32_(w.r)?;
        u64_(w.r)?;
    }
    Ok(())
}
