//! Append-only JSONL files that survive a kill (every stage's outputs and the `generate`
//! command's results), and atomic whole-file writes.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::Path;

/// Lowercase hex of bytes (content hashes in ids and file names).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a seed followed by labels (no separators): the seed of one item's own RNG, so
/// that an item's randomness does not depend on what else is processed.
pub fn derived_seed(seed: u64, labels: &[&[u8]]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(seed.to_le_bytes());
    for l in labels {
        h.update(l);
    }
    h.finalize().into()
}

/// The first 8 bytes of [`derived_seed`] (per-request sampling seeds).
pub fn derived_u64(seed: u64, labels: &[&[u8]]) -> u64 {
    let d = derived_seed(seed, labels);
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// A ChaCha8 generator seeded by [`derived_seed`].
pub fn derived_rng(seed: u64, labels: &[&[u8]]) -> rand_chacha::ChaCha8Rng {
    rand::SeedableRng::from_seed(derived_seed(seed, labels))
}

/// Hands on items that arrive in any order (the engine's completion order) in index order,
/// so that an append-only file is written in input order and a resumed run continues it
/// exactly.
pub struct InOrder<T> {
    next: usize,
    ready: std::collections::BTreeMap<usize, T>,
}

impl<T> Default for InOrder<T> {
    fn default() -> Self {
        Self {
            next: 0,
            ready: Default::default(),
        }
    }
}

impl<T> InOrder<T> {
    /// Takes item `i`; calls `f` on every item whose predecessors have all arrived.
    pub fn push(
        &mut self,
        i: usize,
        item: T,
        mut f: impl FnMut(usize, T) -> Result<()>,
    ) -> Result<()> {
        self.ready.insert(i, item);
        while let Some(item) = self.ready.remove(&self.next) {
            f(self.next, item)?;
            self.next += 1;
        }
        Ok(())
    }
}

/// Writes a report as `<dir>/report.json` (pretty) and `<dir>/report.md`, each atomically.
pub fn write_report<T: Serialize>(dir: &Path, report: &T, markdown: &str) -> Result<()> {
    write_atomic(
        &dir.join("report.json"),
        serde_json::to_string_pretty(report)?.as_bytes(),
    )?;
    write_atomic(&dir.join("report.md"), markdown.as_bytes())
}

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

/// Calls `f` with each row of a Parquet file as JSON (1-based row number), reading only the
/// `columns` the file has. A file without the `required` column is an error naming the
/// columns it has, followed by `expected`.
pub fn for_each_parquet_row(
    path: &Path,
    columns: &[&str],
    required: &str,
    expected: &str,
    mut f: impl FnMut(usize, std::result::Result<serde_json::Value, String>) -> Result<()>,
) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::schema::types::Type;
    let name = path.display().to_string();
    let file = std::fs::File::open(path).with_context(|| format!("opening {name}"))?;
    let reader =
        SerializedFileReader::new(file).with_context(|| format!("{name}: not a Parquet file"))?;
    let schema = reader.metadata().file_metadata().schema();
    let fields: Vec<std::sync::Arc<Type>> = schema
        .get_fields()
        .iter()
        .filter(|t| columns.contains(&t.name()))
        .cloned()
        .collect();
    if !fields.iter().any(|t| t.name() == required) {
        let found: Vec<&str> = schema.get_fields().iter().map(|t| t.name()).collect();
        anyhow::bail!(
            "{name}: no `{required}` column (found: {}){expected}",
            found.join(", ")
        );
    }
    let projection = Type::group_type_builder(schema.name())
        .with_fields(fields)
        .build()
        .with_context(|| format!("{name}: building the column projection"))?;
    let rows = reader
        .get_row_iter(Some(projection))
        .with_context(|| format!("{name}: reading rows"))?;
    for (i, row) in rows.enumerate() {
        f(
            i + 1,
            row.map(|r| r.to_json_value()).map_err(|e| e.to_string()),
        )?;
    }
    Ok(())
}

/// Calls `f` with each non-blank line of a JSONL input (1-based line number, the text or
/// why it is not UTF-8), reading bytes so that one bad line does not end the input.
pub fn for_each_jsonl_line(
    name: &str,
    mut reader: impl std::io::BufRead,
    mut f: impl FnMut(usize, std::result::Result<&str, std::str::Utf8Error>) -> Result<()>,
) -> Result<()> {
    let mut buf = Vec::new();
    let mut line = 0usize;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("reading {name}"))?;
        if n == 0 {
            return Ok(());
        }
        line += 1;
        match std::str::from_utf8(&buf) {
            Ok(t) if t.trim().is_empty() => {}
            Ok(t) => f(line, Ok(t.trim()))?,
            Err(e) => f(line, Err(e))?,
        }
    }
}

/// Reads a JSONL file written by `append_line`; a torn last line (a killed writer, maybe
/// inside a multi-byte character) is cut off the file so that later appends start on a
/// clean line. A bad line before the last is an error naming the file and line.
pub fn read_jsonl_resumable<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let Ok(f) = std::fs::File::open(path) else {
        return Ok(vec![]);
    };
    let mut out = Vec::new();
    let mut good_bytes = 0u64;
    let mut reader = std::io::BufReader::new(f);
    let mut line = Vec::new();
    let mut lineno = 0;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        lineno += 1;
        let complete = line.ends_with(b"\n");
        // A kill can tear a line inside a multi-byte character: bytes, then UTF-8.
        let parsed = std::str::from_utf8(&line)
            .map_err(anyhow::Error::from)
            .and_then(|t| Ok(serde_json::from_str::<T>(t.trim_end())?));
        match parsed {
            Ok(v) if complete => {
                out.push(v);
                good_bytes += n as u64;
            }
            Ok(_) | Err(_) => {
                let trailing = reader.fill_buf()?.is_empty();
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
    // The pid keeps concurrent writers (shards) off each other's temp files.
    let name = path
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!("{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Writes a whole JSONL file atomically (derived outputs that are rebuilt, not appended).
pub fn write_jsonl_atomic<T: Serialize>(path: &Path, items: &[T]) -> Result<()> {
    let mut text = String::new();
    for v in items {
        text.push_str(&serde_json::to_string(v)?);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// Refuses to continue a folder made with other settings (records would mix); the first
/// run writes the identity file.
pub fn check_identity<T: Serialize + for<'de> Deserialize<'de> + PartialEq>(
    path: &Path,
    id: &T,
) -> Result<()> {
    if path.is_file() {
        let text = std::fs::read_to_string(path)?;
        let old: T = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a wildlong run file", path.display()))?;
        if &old != id {
            bail!(
                "{} was made with another model, prompt, input or settings:\n  before: {}\n  now:    {}\nuse another output folder or delete this one",
                path.display(),
                serde_json::to_string(&old)?,
                serde_json::to_string(id)?
            );
        }
    } else {
        write_atomic(path, serde_json::to_string_pretty(id)?.as_bytes())?;
    }
    Ok(())
}

/// The progress bar of every long command: `{unit}` done of total, rate and ETA (hidden when
/// `show` is false).
pub fn progress_bar(show: bool, len: u64, unit: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit} [{{elapsed_precise}} < {{eta_precise}}, {{per_sec}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b
}

/// One (field, value) step of a blueprint path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStep {
    pub field: String,
    pub value: String,
}

/// Where a blueprint came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlueprintProvenance {
    pub model: String,
    pub prompt_version: String,
    pub seed: u64,
    /// Conversations whose queries hold the path's values (a few per value).
    pub conversation_ids: Vec<String>,
    /// Edge weighting of the graph the path was sampled from.
    pub weighting: String,
}

/// An instruction blueprint (stage 1 → stage 2): a sampled path through one document
/// type's graph and the instruction template the LLM wrote from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Blueprint {
    /// Hash of the document type and the path's values.
    pub id: String,
    pub document_type: String,
    pub path: Vec<PathStep>,
    pub instruction: String,
    pub provenance: BlueprintProvenance,
}

/// A content-addressed store of generation results: request hash → result, one JSON file
/// each (`<dir>/<h[..2]>/<h>.json`, written atomically). A killed run or several shards
/// writing at once never lose or duplicate a result, and a rerun asks only for what is
/// missing.
pub struct Store {
    dir: std::path::PathBuf,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The key of a request: sha256 over its parts (model, prompt version, prompt, settings…).
    pub fn key(parts: &[&[u8]]) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p);
        }
        hex(&h.finalize())
    }

    fn path(&self, key: &str) -> std::path::PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.json"))
    }

    pub fn get<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>> {
        let p = self.path(key);
        match std::fs::read_to_string(&p) {
            Ok(text) => Ok(Some(
                serde_json::from_str(&text).with_context(|| format!("{}: damaged", p.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn put<T: Serialize>(&self, key: &str, v: &T) -> Result<()> {
        write_atomic(&self.path(key), serde_json::to_string(v)?.as_bytes())
    }
}

/// Where a synthesized pair came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairMetadata {
    /// The assembled context (`contexts.jsonl`) the pair was made from.
    pub context_id: String,
    pub document_ids: Vec<String>,
    pub document_type: String,
    /// The length bucket and the prompt's tokens (documents + instruction, chat template included).
    pub bucket: usize,
    pub prompt_tokens: usize,
    pub multi_document: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_family: Option<String>,
    pub blueprint_id: String,
    pub blueprint_path: Vec<PathStep>,
    pub blueprint_instruction: String,
    /// The blueprint adapted to these documents (the user turn's last part).
    pub instruction: String,
    pub conversation_ids: Vec<String>,
    pub model: String,
    pub prompt_version: String,
    pub seed: u64,
    /// SQuAD token F1 between this answer and the model's answer without the documents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_book_f1: Option<f64>,
    /// sha256 of the messages.
    pub hash: String,
}

/// One long-context instruction–response pair (stage 2 → training): the HF/OpenAI
/// `messages` chat format plus metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    pub id: String,
    pub messages: Vec<crate::engine::chat::Message>,
    pub metadata: PairMetadata,
}
