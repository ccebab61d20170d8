//! The KV cache of a batch (slots shared by left-padded rows, positions per row), the shared
//! prompt prefix every row attends to, and the additive masks built from their positions.

use super::config::Config;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// One layer's keys/values for this cache's own slots: `(b, kv_heads, capacity, head_dim)`.
#[derive(Clone)]
pub(super) struct LayerKv {
    pub(super) k: Tensor,
    pub(super) v: Tensor,
}

/// Keys/values of a prompt prefix shared by every row of a batch (computed once, batch 1).
pub struct SharedPrefix {
    pub(super) layers: Vec<(Tensor, Tensor)>, // (kv_heads, len, head_dim), contiguous
    pub(super) positions: Vec<i64>,
}

impl SharedPrefix {
    pub fn len(&self) -> usize {
        self.positions.len()
    }
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
    /// Position the first token after the prefix takes.
    pub fn next_position(&self) -> i64 {
        self.positions.iter().copied().max().map_or(0, |p| p + 1)
    }
}

/// KV cache of a batch. Slots are shared by all rows (rows are left-padded); `slot_pos[r][j]`
/// is the position of row r's token in slot j, or -1 for padding.
pub struct Cache {
    pub(super) layers: Vec<Option<LayerKv>>,
    pub(super) len: usize,
    pub(super) slot_pos: Vec<Vec<i64>>,
    pub(super) prefix: Option<Arc<SharedPrefix>>,
}

impl Cache {
    pub fn new(cfg: &Config, batch: usize) -> Self {
        Self {
            layers: vec![None; cfg.num_layers],
            len: 0,
            slot_pos: vec![Vec::new(); batch],
            prefix: None,
        }
    }

    /// A cache whose rows all continue after `prefix`.
    pub fn with_prefix(cfg: &Config, batch: usize, prefix: Arc<SharedPrefix>) -> Self {
        let mut c = Self::new(cfg, batch);
        c.prefix = Some(prefix);
        c
    }

    pub fn batch(&self) -> usize {
        self.slot_pos.len()
    }

    /// Own slots (excluding a shared prefix).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Position the next token of `row` takes.
    pub fn next_position(&self, row: usize) -> i64 {
        let own = self.slot_pos[row].iter().copied().max().map(|p| p + 1);
        own.or_else(|| self.prefix.as_ref().map(|p| p.next_position()))
            .unwrap_or(0)
    }

    /// Turns a batch-1 cache into a prefix other caches can share.
    pub fn into_prefix(self) -> Result<SharedPrefix> {
        if self.batch() != 1 || self.prefix.is_some() {
            bail!("only a batch-1 cache without a prefix can become a shared prefix");
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in self.layers {
            let l = l.context("empty cache cannot become a prefix")?;
            let k = l.k.narrow(2, 0, self.len)?.squeeze(0)?.contiguous()?;
            let v = l.v.narrow(2, 0, self.len)?.squeeze(0)?.contiguous()?;
            layers.push((k, v));
        }
        Ok(SharedPrefix {
            layers,
            positions: self.slot_pos.into_iter().next().unwrap_or_default(),
        })
    }

    /// Keeps only the given rows (finished rows leave the batch).
    pub fn retain_rows(&mut self, rows: &[usize]) -> Result<()> {
        if rows.len() == self.batch() {
            return Ok(());
        }
        let dev = self
            .layers
            .iter()
            .flatten()
            .next()
            .map(|l| l.k.device().clone());
        if let Some(dev) = dev {
            let idx = Tensor::from_vec(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                rows.len(),
                &dev,
            )?;
            for l in self.layers.iter_mut().flatten() {
                l.k = l.k.index_select(&idx, 0)?;
                l.v = l.v.index_select(&idx, 0)?;
            }
        }
        self.slot_pos = rows.iter().map(|&r| self.slot_pos[r].clone()).collect();
        Ok(())
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
