//! `--shard k/n`: one worker's share of a stage's work.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One worker's share of the work (`--shard k/n`, k in 1..=n): items whose index mod n is k − 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self { index: 1, count: 1 }
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| format!("expected k/n (e.g. 2/8), got {s:?}"))?;
        let k: usize = k
            .trim()
            .parse()
            .map_err(|_| format!("bad shard index {k:?}"))?;
        let n: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("bad shard count {n:?}"))?;
        if n == 0 || k == 0 || k > n {
            return Err(format!("shard {k}/{n}: k must be in 1..={n}"));
        }
        Ok(Self { index: k, count: n })
    }
}

impl Shard {
    /// The whole input: 1/1.
    pub fn whole() -> Self {
        Self { index: 1, count: 1 }
    }

    pub fn owns(&self, i: usize) -> bool {
        i % self.count == self.index - 1
    }

    /// File-name suffix: empty for 1/1, else `.shard-k-of-n`.
    pub fn suffix(&self) -> String {
        if self.count == 1 {
            String::new()
        } else {
            format!(".shard-{}-of-{}", self.index, self.count)
        }
    }
}

/// Every record of a folder's `<stem>.jsonl` and its shards' files (see [`shard_files`]), a
/// torn last line of each dropped as `read_jsonl_resumable` drops it.
pub fn read_all<T: serde::de::DeserializeOwned>(dir: &Path, stem: &str) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::new();
    for f in shard_files(dir, stem) {
        out.extend(crate::records::read_jsonl_resumable::<T>(&f)?);
    }
    Ok(out)
}

/// The files a folder's workers appended to: `<stem>.jsonl` (a whole run) and every shard's
/// `<stem>.shard-k-of-n.jsonl`, in name order. A run reads them all, so a run without
/// `--shard` merges the shards' records.
pub fn shard_files(dir: &Path, stem: &str) -> Vec<PathBuf> {
    let mut files = vec![dir.join(format!("{stem}.jsonl"))];
    let prefix = format!("{stem}.shard-");
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut shards: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".jsonl"))
            })
            .collect();
        shards.sort();
        files.extend(shards);
    }
    files
}
