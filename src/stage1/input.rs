//! Streams user–chatbot conversations in WildChat's shape (a `conversation` list of
//! `{role, content}` turns plus optional `language`, `toxic`, `redacted`,
//! `conversation_hash`/`conversation_id`/`id`) from JSONL or Parquet, one row at a time.
//! Malformed rows are reported by line (or row) number and skipped, or stop the run in
//! strict mode. It does not filter: that is `filter.rs`.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// The built-in illustrative sample (written for this project, see its header line).
pub const SAMPLE: &str = include_str!("data/wildchat_sample.jsonl");

#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

/// One conversation as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub id: String,
    pub turns: Vec<Turn>,
    pub language: Option<String>,
    pub toxic: bool,
    pub redacted: bool,
}

/// Rows read and rows skipped, with where the first bad ones are.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputStats {
    pub rows: usize,
    pub malformed: usize,
    /// `file:line: reason` of the first malformed rows.
    pub malformed_examples: Vec<String>,
}

impl InputStats {
    fn bad(&mut self, strict: bool, what: String) -> Result<()> {
        if strict {
            bail!("{what} (strict mode)");
        }
        tracing::warn!("skipping {what}");
        self.malformed += 1;
        if self.malformed_examples.len() < 20 {
            self.malformed_examples.push(what);
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct RawTurn {
    role: Option<String>,
    content: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawConversation {
    conversation: Option<Vec<RawTurn>>,
    language: Option<String>,
    toxic: Option<bool>,
    redacted: Option<bool>,
    conversation_hash: Option<String>,
    conversation_id: Option<serde_json::Value>,
    id: Option<serde_json::Value>,
    #[serde(rename = "_header")]
    header: Option<serde_json::Value>,
}

/// What a row turned out to be.
enum Row {
    Conversation(Conversation),
    Header,
}

fn id_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn convert(raw: RawConversation) -> std::result::Result<Row, String> {
    if raw.header.is_some() && raw.conversation.is_none() {
        return Ok(Row::Header);
    }
    let turns = raw
        .conversation
        .ok_or("missing field `conversation`")?
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let role = t.role.ok_or(format!("turn {i}: missing `role`"))?;
            let content = match t.content {
                Some(serde_json::Value::String(s)) => s,
                Some(serde_json::Value::Null) | None => {
                    return Err(format!("turn {i}: missing `content`"))
                }
                Some(other) => return Err(format!("turn {i}: `content` is not a string: {other}")),
            };
            Ok(Turn { role, content })
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    let id = match (&raw.conversation_hash, &raw.conversation_id, &raw.id) {
        (Some(h), _, _) => h.clone(),
        (None, Some(v), _) | (None, None, Some(v)) => id_text(v),
        // No id in the input: a content hash keeps ids stable across reorderings.
        (None, None, None) => {
            let mut h = Sha256::new();
            for t in &turns {
                h.update(t.role.as_bytes());
                h.update([0]);
                h.update(t.content.as_bytes());
                h.update([0]);
            }
            format!("sha256:{}", &hex(&h.finalize())[..16])
        }
    };
    Ok(Row::Conversation(Conversation {
        id,
        turns,
        language: raw.language,
        toxic: raw.toxic.unwrap_or(false),
        redacted: raw.redacted.unwrap_or(false),
    }))
}

pub use crate::records::hex;

/// One input: a file (JSONL or Parquet by extension) or the built-in sample.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Sample,
    File(PathBuf),
}

impl Source {
    /// `sample`, a path, or `hf://datasets/OWNER/NAME/FILE` (HF cache, then hf-hub).
    pub fn resolve(spec: &str) -> Result<Self> {
        if spec == "sample" {
            return Ok(Self::Sample);
        }
        Ok(Self::File(crate::models::resolve_data_file(spec)?))
    }

    pub fn name(&self) -> String {
        match self {
            Self::Sample => "sample".into(),
            Self::File(p) => p.display().to_string(),
        }
    }

    /// Calls `f` on every conversation, in file order; returns the row counts.
    pub fn for_each(
        &self,
        strict: bool,
        mut f: impl FnMut(Conversation) -> Result<()>,
    ) -> Result<InputStats> {
        let mut stats = InputStats::default();
        match self {
            Self::Sample => read_jsonl(
                "sample",
                std::io::Cursor::new(SAMPLE.as_bytes()),
                strict,
                &mut stats,
                &mut f,
            )?,
            Self::File(p) if p.extension().is_some_and(|e| e == "parquet") => {
                read_parquet(p, strict, &mut stats, &mut f)?
            }
            Self::File(p) => {
                let file =
                    std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
                read_jsonl(
                    &p.display().to_string(),
                    std::io::BufReader::new(file),
                    strict,
                    &mut stats,
                    &mut f,
                )?
            }
        }
        if stats.rows == 0 {
            bail!(
                "{}: no conversations in this input (empty file?)",
                self.name()
            );
        }
        Ok(stats)
    }
}

fn read_jsonl(
    name: &str,
    reader: impl BufRead,
    strict: bool,
    stats: &mut InputStats,
    f: &mut impl FnMut(Conversation) -> Result<()>,
) -> Result<()> {
    crate::records::for_each_jsonl_line(name, reader, |line, text| {
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                return stats.bad(
                    strict,
                    format!("{name}:{line}: not valid UTF-8 (byte {})", e.valid_up_to()),
                )
            }
        };
        let row = serde_json::from_str::<RawConversation>(text)
            .map_err(|e| e.to_string())
            .and_then(convert);
        match row {
            Ok(Row::Header) => Ok(()),
            Ok(Row::Conversation(c)) => {
                stats.rows += 1;
                f(c)
            }
            Err(e) => stats.bad(strict, format!("{name}:{line}: {e}")),
        }
    })
}

/// The columns read from Parquet (WildChat has many more, e.g. moderation scores).
const COLUMNS: [&str; 7] = [
    "conversation",
    "language",
    "toxic",
    "redacted",
    "conversation_hash",
    "conversation_id",
    "id",
];

fn read_parquet(
    path: &Path,
    strict: bool,
    stats: &mut InputStats,
    f: &mut impl FnMut(Conversation) -> Result<()>,
) -> Result<()> {
    let name = path.display().to_string();
    crate::records::for_each_parquet_row(
        path,
        &COLUMNS,
        "conversation",
        "; expected WildChat's columns: conversation (list of {role, content}), language, toxic, redacted, conversation_hash",
        |row, value| {
            let conv = value
                .and_then(|v| serde_json::from_value::<RawConversation>(v).map_err(|e| e.to_string()))
                .and_then(convert);
            match conv {
                Ok(Row::Conversation(c)) => {
                    stats.rows += 1;
                    f(c)
                }
                Ok(Row::Header) => Ok(()),
                Err(e) => stats.bad(strict, format!("{name}: row {row}: {e}")),
            }
        },
    )
}
