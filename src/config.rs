//! The TOML loader every config type uses: unknown keys are errors listing the accepted ones,
//! `--set key.sub=value` overrides are checked like the file's own keys, and a section's
//! `config = "PATH"` base is merged under its keys. Each config type lives beside the code
//! that owns it (`engine::config`, `stage1::config`, …).

use anyhow::{Context, Result};
use std::path::Path;

/// Reads a TOML config; unknown keys are errors that list the accepted ones.
pub fn from_toml_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Reads a TOML config (a file, or the built-in text when `path` is `None`) and applies
/// `--set key.sub=value` overrides before deserializing, so that overridden keys are
/// checked like the file's own (unknown keys are errors listing the accepted ones). A value
/// that is not valid TOML is taken as a string (`--set graph.weight=npmi`).
pub fn from_toml_with_overrides<T: serde::de::DeserializeOwned>(
    path: Option<&Path>,
    builtin: &str,
    sets: &[String],
) -> Result<T> {
    let (name, text) = match path {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        ),
        None => ("built-in config".to_string(), builtin.to_string()),
    };
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    apply_sets(&mut table, sets)?;
    let what = if sets.is_empty() {
        name
    } else {
        format!("{name} with --set {}", sets.join(" "))
    };
    T::deserialize(toml::Value::Table(table)).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

/// Applies `--set key.sub=value` overrides to a parsed TOML table. A value that is not
/// valid TOML is taken as a string (`--set graph.weight=npmi`).
pub fn apply_sets(table: &mut toml::Table, sets: &[String]) -> Result<()> {
    for set in sets {
        let (key, raw) = set
            .split_once('=')
            .with_context(|| format!("--set {set:?}: expected KEY=VALUE"))?;
        let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut t) => t.remove("v").expect("parsed above"),
            Err(_) => toml::Value::String(raw.to_string()),
        };
        let parts: Vec<&str> = key.trim().split('.').collect();
        let (last, parents) = parts.split_last().expect("split yields one part");
        let mut cur = &mut *table;
        for p in parents {
            cur = cur
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .with_context(|| format!("--set {key}: {p} is not a table"))?;
        }
        cur.insert(last.to_string(), value);
    }
    Ok(())
}

/// [`from_toml_with_overrides`], then `validate`, with the file named in its error.
pub(crate) fn load_validated<T: serde::de::DeserializeOwned>(
    path: Option<&Path>,
    builtin: &str,
    sets: &[String],
    validate: impl Fn(&T) -> Result<()>,
) -> Result<T> {
    let c: T = from_toml_with_overrides(path, builtin, sets)?;
    let name = path.map_or("built-in config".into(), |p| p.display().to_string());
    validate(&c).with_context(|| name)?;
    Ok(c)
}

/// Deep merge: `over`'s keys replace `base`'s, tables merged key by key.
pub(crate) fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}
