//! The paged KV cache the engine decodes with ([`PagedKv`]: per layer one pool of rows that
//! fixed-size blocks index, [`PagedBatch`]: which tokens of which sequences one forward pass
//! carries and where their keys live), and the dense cache of a padded batch ([`Cache`],
//! slots shared by left-padded rows, positions per row) that the model's plain reference
//! forward and the tests use, with the additive masks built from positions.
//! Not here: which block is free or cached (`engine::blocks`).

use super::config::Config;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// Keys and values of every layer, block-major and head-major inside a block (a head's keys
/// in a block are consecutive rows, as vLLM lays its cache out): row
/// `(block * kv_heads + head) * block_size + offset` of `(num_blocks * kv_heads * block_size,
/// head_dim)` each.
pub struct PagedKv {
    pub(super) layers: Vec<(Tensor, Tensor)>,
    pub(super) block_size: usize,
    pub(super) kv_heads: usize,
}

impl PagedKv {
    /// Bytes one block takes over all layers (keys and values).
    pub fn block_bytes(cfg: &Config, block_size: usize, dtype: DType) -> usize {
        2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * block_size * dtype.size_in_bytes()
    }

    /// The dtype the cache holds for a model computing in `dtype` on `device` (bf16 on the
    /// CUDA flash-attention path).
    pub fn dtype_for(dtype: DType, device: &Device) -> DType {
        if device.is_cuda() {
            DType::BF16
        } else {
            dtype
        }
    }

    /// Allocates the pools (on the CPU zeroed pages are only mapped when first written).
    pub fn new(
        cfg: &Config,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (num_blocks * cfg.num_kv_heads * block_size, cfg.head_dim);
        let layers = (0..cfg.num_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            block_size,
            kv_heads: cfg.num_kv_heads,
        })
    }

    pub fn num_blocks(&self) -> usize {
        let rows = self.layers.first().map_or(0, |l| l.0.dim(0).unwrap_or(0));
        rows / (self.kv_heads * self.block_size).max(1)
    }

    /// Layer `layer`'s pools as `(num_blocks, kv_heads, block_size, head_dim)` views.
    pub(super) fn views(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        let (k, v) = &self.layers[layer];
        let shape = (self.num_blocks(), self.kv_heads, self.block_size, k.dim(1)?);
        Ok((k.reshape(shape)?, v.reshape(shape)?))
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn dtype(&self) -> DType {
        self.layers[0].0.dtype()
    }
}

/// The new tokens of one sequence in a forward pass: positions `start..start + len` (all
/// earlier ones are in the cache), keys and values at the slots `blocks` maps them to.
#[derive(Debug, Clone)]
pub struct SeqChunk {
    pub start: usize,
    pub len: usize,
    /// Block table covering at least `start + len` positions.
    pub blocks: Vec<u32>,
    /// Whether the pass returns this sequence's hidden state at its last new token.
    pub last_hidden: bool,
}

/// One forward pass over several sequences' new tokens, laid end to end (no padding).
#[derive(Debug, Clone)]
pub struct PagedBatch {
    pub seqs: Vec<SeqChunk>,
    pub block_size: usize,
}

impl PagedBatch {
    pub fn tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.len).sum()
    }

    /// Cache row of head `head` (of `kv_heads`) at position `p` of sequence `s`.
    pub fn row(&self, s: usize, p: usize, head: usize, kv_heads: usize) -> usize {
        let seq = &self.seqs[s];
        let bs = self.block_size;
        (seq.blocks[p / bs] as usize * kv_heads + head) * bs + p % bs
    }

    /// Position of every new token, in batch order.
    pub fn positions(&self) -> Vec<u32> {
        self.seqs
            .iter()
            .flat_map(|s| (s.start..s.start + s.len).map(|p| p as u32))
            .collect()
    }

    /// Rows the new tokens' keys and values are written to, head-major, then batch order
    /// (the order of `(kv_heads, T, head_dim)` flattened).
    pub fn new_rows(&self, kv_heads: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(kv_heads * self.tokens());
        for h in 0..kv_heads {
            for (s, q) in self.seqs.iter().enumerate() {
                out.extend((q.start..q.start + q.len).map(|p| self.row(s, p, h, kv_heads) as u32));
            }
        }
        out
    }

    /// Rows of positions `0..start + len` of sequence `s` (what its new tokens attend to),
    /// head-major.
    pub fn context_rows(&self, s: usize, kv_heads: usize) -> Vec<u32> {
        let q = &self.seqs[s];
        (0..kv_heads)
            .flat_map(|h| (0..q.start + q.len).map(move |p| self.row(s, p, h, kv_heads) as u32))
            .collect()
    }

    /// Checks the tables cover every position and name blocks inside the pool.
    pub fn validate(&self, pool_blocks: usize) -> Result<()> {
        for (i, s) in self.seqs.iter().enumerate() {
            let need = (s.start + s.len).div_ceil(self.block_size);
            if s.len == 0 || s.blocks.len() < need {
                bail!(
                    "paged batch: sequence {i} has {} new tokens after {} and {} blocks of {}",
                    s.len,
                    s.start,
                    s.blocks.len(),
                    self.block_size
                );
            }
            if let Some(b) = s.blocks[..need]
                .iter()
                .find(|&&b| b as usize >= pool_blocks)
            {
                bail!("paged batch: block {b} is outside the pool of {pool_blocks} blocks");
            }
        }
        Ok(())
    }
}

/// One layer's keys/values for this cache's own slots: `(b, kv_heads, capacity, head_dim)`.
#[derive(Clone)]
pub(super) struct LayerKv {
    pub(super) k: Tensor,
    pub(super) v: Tensor,
}

/// KV cache of a batch. Slots are shared by all rows (rows are left-padded); `slot_pos[r][j]`
/// is the position of row r's token in slot j, or -1 for padding.
pub struct Cache {
    pub(super) layers: Vec<Option<LayerKv>>,
    pub(super) len: usize,
    pub(super) slot_pos: Vec<Vec<i64>>,
}

impl Cache {
    pub fn new(cfg: &Config, batch: usize) -> Self {
        Self {
            layers: vec![None; cfg.num_layers],
            len: 0,
            slot_pos: vec![Vec::new(); batch],
        }
    }

    pub fn batch(&self) -> usize {
        self.slot_pos.len()
    }

    /// Slots written.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records per-row positions of `t` new slots.
    pub(super) fn push_slots(&mut self, positions: &[Vec<i64>]) {
        for (row, p) in self.slot_pos.iter_mut().zip(positions) {
            row.extend_from_slice(p);
        }
    }

    /// Writes `k`, `v` `(b, kvh, t, d)` at slots `len..len+t` of `layer`; returns views of all own slots.
    pub(super) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, kvh, t, d) = k.dims4()?;
        let needed = self.len + t;
        if self.layers[layer].is_none() || needed > self.capacity_of(layer) {
            let new_cap = needed.max(self.capacity_of(layer) * 2).max(64);
            let nk = Tensor::zeros((b, kvh, new_cap, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, kvh, new_cap, d), v.dtype(), v.device())?;
            if let Some(old) = &self.layers[layer] {
                if self.len > 0 {
                    nk.slice_set(&old.k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    nv.slice_set(&old.v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            self.layers[layer] = Some(LayerKv { k: nk, v: nv });
        }
        let l = self.layers[layer].as_ref().context("cache layer")?;
        l.k.slice_set(&k.contiguous()?, 2, self.len)?;
        l.v.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((l.k.narrow(2, 0, needed)?, l.v.narrow(2, 0, needed)?))
    }

    pub(super) fn capacity_of(&self, layer: usize) -> usize {
        self.layers[layer]
            .as_ref()
            .map_or(0, |l| l.k.dim(2).unwrap_or(0))
    }
}

/// Additive mask `(b, 1, t, kv)`: 0 where query i of row r may see key j, -inf elsewhere.
/// Padding queries (position -1) see every key so their (ignored) outputs stay finite.
pub fn attention_mask(
    q_pos: &[Vec<i64>],
    k_pos: &[Vec<i64>],
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    Ok(attention_mask_host(q_pos, k_pos, window, device)?.0)
}

/// [`attention_mask`] and its host copy `(b, t, kv)` for the fused CPU attention.
pub(super) fn attention_mask_host(
    q_pos: &[Vec<i64>],
    k_pos: &[Vec<i64>],
    window: Option<usize>,
    device: &Device,
) -> Result<(Tensor, Arc<Vec<f32>>)> {
    let b = q_pos.len();
    let t = q_pos.first().map_or(0, Vec::len);
    let kv = k_pos.first().map_or(0, Vec::len);
    let mut m = vec![0f32; b * t * kv];
    for r in 0..b {
        for i in 0..t {
            let qp = q_pos[r][i];
            if qp < 0 {
                continue;
            }
            let row = &mut m[(r * t + i) * kv..(r * t + i + 1) * kv];
            for (j, &kp) in k_pos[r].iter().enumerate() {
                let visible = kp >= 0 && kp <= qp && window.is_none_or(|w| (qp - kp) < w as i64);
                if !visible {
                    row[j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    let host = Arc::new(m.clone());
    Ok((Tensor::from_vec(m, (b, 1, t, kv), device)?, host))
}
