//! Append-only JSONL files that survive a kill (every stage's outputs and the `generate`
//! command's results), and atomic whole-file writes.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::Path;

/// Appends JSON lines, flushing each so a kill loses at most the line being written.
pub fn append_line<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut line = serde_json::to_string(v)?;
    line.push('\n');
    f.write_all(line.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reads a JSONL file written by `append_line`; a torn last line (a killed writer) is cut
/// off the file so that later appends start on a clean line.
pub fn read_jsonl_resumable<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let Ok(f) = std::fs::File::open(path) else {
        return Ok(vec![]);
    };
    let mut out = Vec::new();
    let mut good_bytes = 0u64;
    let mut reader = std::io::BufReader::new(f);
    let mut line = String::new();
    let mut lineno = 0;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let complete = line.ends_with('\n');
        match serde_json::from_str::<T>(line.trim_end()) {
            Ok(v) if complete => {
                out.push(v);
                good_bytes += n as u64;
            }
            Ok(_) | Err(_) => {
                let mut rest = String::new();
                let trailing = reader.read_line(&mut rest)? == 0;
                if !trailing {
                    bail!(
                        "{}:{lineno}: not a valid record (only a torn last line is repaired)",
                        path.display()
                    );
                }
                let f = std::fs::OpenOptions::new().write(true).open(path)?;
                f.set_len(good_bytes)
                    .with_context(|| format!("repairing {}", path.display()))?;
                tracing::warn!("{}: dropped a torn last line", path.display());
                break;
            }
        }
    }
    Ok(out)
}

/// Writes a file atomically (temp file + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
