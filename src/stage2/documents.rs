//! Stage 2's documents: read from JSONL or Parquet (a `text` column; optional `id`, `title`,
//! `document_type`, `source`, `licence`), folders of `.txt`/`.md` files, `hf://` files, or
//! the built-in sample corpus; measured with the target model's tokenizer; typed onto the
//! stage-1 taxonomy (a given type first, else a cheap heuristic on the beginning, and the
//! LLM for what the heuristic cannot place). Documents that overlap the evaluation sources,
//! and (by policy) documents longer than the model's context, are skipped. Unusable
//! documents are counted by reason, never fatal unless nothing is left.

use crate::engine::chat::Message;
use crate::engine::config::{GenerationParams, SamplingParams};
use crate::engine::tokenizer::Tokenizer;
use crate::generator::Llm;
use crate::records::Store;
use crate::stage1::config::MetaSchema;
use crate::stage2::config::{DocumentClassifier, DocumentsConfig, TooLongPolicy};
use crate::stage2::gates::Decontaminator;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

/// The built-in sample corpus (see `src/stage2/data/SOURCES.md`).
pub const SAMPLE_CORPUS: &str = include_str!("data/corpus.jsonl");

/// One document as read, with its length in the target model's tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub document_type: String,
    /// `given` (the input names a type), `heuristic` or `llm`.
    pub type_from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub licence: Option<String>,
    pub tokens: usize,
    pub text: String,
}

/// Counts of reading, by reason for what was skipped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DocumentStats {
    pub read: usize,
    pub skipped: BTreeMap<String, usize>,
    /// `where: reason` of the first skipped documents.
    pub examples: Vec<String>,
    pub types: BTreeMap<String, usize>,
    /// Kept documents longer than the model's context (cut to the buckets).
    pub longer_than_context: usize,
    /// Documents typed by the LLM.
    pub typed_by_llm: usize,
}

impl DocumentStats {
    fn skip(&mut self, reason: &str, what: String) {
        *self.skipped.entry(reason.to_string()).or_default() += 1;
        tracing::warn!("skipping {what}: {reason}");
        if self.examples.len() < 20 {
            self.examples.push(format!("{what}: {reason}"));
        }
    }
}

#[derive(Deserialize)]
struct RawDocument {
    text: Option<serde_json::Value>,
    id: Option<serde_json::Value>,
    title: Option<String>,
    document_type: Option<String>,
    source: Option<String>,
    licence: Option<String>,
    #[serde(rename = "_header")]
    header: Option<serde_json::Value>,
}

/// Guesses a document type from the beginning of a text: program text, legal wording;
/// `other` when nothing is clear (an LLM pass can refine it).
pub fn heuristic_type(text: &str) -> &'static str {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(200)
        .collect();
    if lines.is_empty() {
        return "other";
    }
    let code = lines
        .iter()
        .filter(|l| {
            let t = l.trim();
            t.ends_with(';')
                || t.ends_with('{')
                || t.ends_with('}')
                || (t.ends_with(':')
                    && (t.starts_with("def ")
                        || t.starts_with("class ")
                        || t.starts_with("if ")
                        || t.starts_with("for ")))
                || [
                    "import ", "from ", "def ", "class ", "fn ", "#include", "return ", "pub fn ",
                    "use ",
                ]
                .iter()
                .any(|k| t.starts_with(k))
        })
        .count();
    let chars: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
    let symbols = chars
        .iter()
        .filter(|c| "{}[]()=;_<>#*/\\".contains(**c))
        .count();
    let indented = lines
        .iter()
        .filter(|l| l.starts_with("    ") || l.starts_with('\t'))
        .count();
    let dense = symbols as f64 >= 0.06 * chars.len() as f64 && indented * 2 >= lines.len();
    if code * 4 >= lines.len() || dense {
        return "source code";
    }
    let lower = text.to_lowercase();
    let words = lower.split_whitespace().count().max(1);
    let legal = [
        "shall",
        "license",
        "licence",
        "copyright",
        "hereby",
        "warranty",
        "agreement",
        "pursuant",
        "liability",
        "terms and conditions",
    ]
    .iter()
    .map(|k| lower.matches(k).count())
    .sum::<usize>();
    if legal * 200 >= words {
        return "legal contract";
    }
    "other"
}

fn content_id(text: &str) -> String {
    format!(
        "sha256:{}",
        &crate::records::hex(&Sha256::digest(text.as_bytes()))[..16]
    )
}

impl RawDocument {
    /// `Ok(None)` for a header line.
    fn into_parts(self) -> std::result::Result<Option<RawParts>, String> {
        if self.header.is_some() && self.text.is_none() {
            return Ok(None);
        }
        let text = match self.text {
            Some(serde_json::Value::String(s)) => s,
            Some(other) => {
                return Err(format!(
                    "`text` is not a string: {}",
                    short(&other.to_string())
                ))
            }
            None => return Err("missing field `text`".into()),
        };
        Ok(Some(RawParts {
            id: self.id.map(|v| match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            }),
            title: self.title,
            document_type: self.document_type,
            source: self.source,
            licence: self.licence,
            text,
        }))
    }
}

fn short(s: &str) -> String {
    s.chars().take(60).collect()
}

struct RawParts {
    id: Option<String>,
    title: Option<String>,
    document_type: Option<String>,
    source: Option<String>,
    licence: Option<String>,
    text: String,
}

/// Reads documents from every input, typed and measured; skipped ones are counted.
pub struct DocumentReader<'a> {
    pub tokenizer: &'a Tokenizer,
    pub schema: &'a MetaSchema,
    pub cfg: &'a DocumentsConfig,
    /// The model's context length (the too-long policy's limit).
    pub max_context: usize,
    pub decontaminate: Option<&'a Decontaminator>,
    pub stats: DocumentStats,
    pub documents: Vec<Document>,
}

impl<'a> DocumentReader<'a> {
    pub fn new(tokenizer: &'a Tokenizer, schema: &'a MetaSchema, cfg: &'a DocumentsConfig) -> Self {
        Self {
            tokenizer,
            schema,
            cfg,
            max_context: usize::MAX,
            decontaminate: None,
            stats: DocumentStats::default(),
            documents: Vec::new(),
        }
    }

    fn add(&mut self, parts: RawParts, what: String) -> Result<()> {
        if parts.text.trim().is_empty() {
            self.stats.skip("empty", what);
            return Ok(());
        }
        if let Some(d) = self.decontaminate {
            let shared = d.shared(&parts.text);
            if shared > 0 {
                self.stats.skip(
                    "contaminated",
                    format!(
                        "{what} (shares {shared} word {}-grams with RULER's sources)",
                        d.n
                    ),
                );
                return Ok(());
            }
        }
        let tokens = self.tokenizer.encode(&parts.text, false)?.len();
        if tokens > self.max_context {
            if self.cfg.too_long == TooLongPolicy::Skip {
                self.stats.skip(
                    "longer_than_context",
                    format!("{what} ({tokens} tokens > {})", self.max_context),
                );
                return Ok(());
            }
            self.stats.longer_than_context += 1;
        }
        let (document_type, type_from) = match &parts.document_type {
            Some(t) => (self.schema.map_document_type(t), "given"),
            None => {
                let head: String = parts.text.chars().take(self.cfg.classify_chars).collect();
                (heuristic_type(&head).to_string(), "heuristic")
            }
        };
        self.stats.read += 1;
        self.documents.push(Document {
            id: parts.id.unwrap_or_else(|| content_id(&parts.text)),
            title: parts.title,
            document_type,
            type_from: type_from.into(),
            source: parts.source,
            licence: parts.licence,
            tokens,
            text: parts.text,
        });
        Ok(())
    }

    /// With the LLM classifier: the documents the heuristic left at `other` are typed by
    /// the LLM from their beginning (answers kept in `store`, so a rerun asks nothing).
    pub fn classify(&mut self, llm: &Llm, model: &str, store: &Store) -> Result<()> {
        if self.cfg.classifier != DocumentClassifier::Llm {
            return Ok(());
        }
        let todo: Vec<usize> = (0..self.documents.len())
            .filter(|&i| {
                let d = &self.documents[i];
                d.type_from == "heuristic" && d.document_type == "other"
            })
            .collect();
        let names: Vec<&str> = self
            .schema
            .document_types
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"document_type": {"type": "string", "enum": names}},
            "required": ["document_type"], "additionalProperties": false,
            "x-guidance": {"whitespace_flexible": false}
        });
        // (document, store key, request) of the documents the store has no answer for.
        let mut pending = Vec::new();
        for &i in &todo {
            let head: String = self.documents[i]
                .text
                .chars()
                .take(self.cfg.classify_chars)
                .collect();
            let messages = crate::stage2::prompts::classify_turn(&head, &names);
            let params = GenerationParams {
                max_tokens: 64,
                sampling: SamplingParams {
                    temperature: 0.0,
                    ..Default::default()
                },
                json_schema: Some(schema.clone()),
                ..Default::default()
            };
            let key = Store::key(&[
                model.as_bytes(),
                crate::stage2::prompts::CLASSIFY_VERSION.as_bytes(),
                serde_json::to_string(&messages)?.as_bytes(),
            ]);
            match store.get::<String>(&key)? {
                Some(t) => self.set_llm_type(i, &t),
                None => pending.push((i, key, (messages, params))),
            }
        }
        for chunk in pending.chunks(llm.batch_size()) {
            let reqs: Vec<(Vec<Message>, GenerationParams)> =
                chunk.iter().map(|(_, _, r)| r.clone()).collect();
            for ((i, key, _), c) in chunk.iter().zip(llm.chat_batch(&reqs)?) {
                let t = serde_json::from_str::<serde_json::Value>(&c.text)
                    .ok()
                    .and_then(|v| v["document_type"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "other".into());
                store.put(key, &t)?;
                self.set_llm_type(*i, &t);
            }
        }
        Ok(())
    }

    fn set_llm_type(&mut self, i: usize, raw: &str) {
        let d = &mut self.documents[i];
        d.document_type = self.schema.map_document_type(raw);
        d.type_from = "llm".into();
        self.stats.typed_by_llm += 1;
    }

    /// The documents read, or an error when none is usable.
    pub fn finish(mut self) -> Result<(Vec<Document>, DocumentStats)> {
        for d in &self.documents {
            *self.stats.types.entry(d.document_type.clone()).or_default() += 1;
        }
        if self.documents.is_empty() {
            bail!(
                "no usable documents (skipped by reason: {:?}; first: {:?})",
                self.stats.skipped,
                self.stats.examples.first()
            );
        }
        Ok((self.documents, self.stats))
    }

    /// `sample`, a JSONL/Parquet file, a folder, or `hf://datasets/OWNER/NAME/FILE`.
    pub fn read(&mut self, spec: &str) -> Result<()> {
        if spec == "sample" {
            return self.read_jsonl("sample", std::io::Cursor::new(SAMPLE_CORPUS.as_bytes()));
        }
        let local = Path::new(spec);
        if local.is_dir() {
            return self.read_folder(local);
        }
        let path = crate::models::resolve_data_file(spec)?;
        let name = path.display().to_string();
        if path.extension().is_some_and(|e| e == "parquet") {
            return self.read_parquet(&path);
        }
        let f = std::fs::File::open(&path).with_context(|| format!("opening {name}"))?;
        self.read_jsonl(&name, std::io::BufReader::new(f))
    }

    fn read_jsonl(&mut self, name: &str, r: impl BufRead) -> Result<()> {
        crate::records::for_each_jsonl_line(name, r, |line, text| {
            let what = format!("{name}:{line}");
            let Ok(text) = text else {
                self.stats.skip("not UTF-8", what);
                return Ok(());
            };
            match serde_json::from_str::<RawDocument>(text)
                .map_err(|e| e.to_string())
                .and_then(RawDocument::into_parts)
            {
                Ok(Some(p)) => self.add(p, what)?,
                Ok(None) => {}
                Err(e) => self.stats.skip(&format!("malformed ({e})"), what),
            }
            Ok(())
        })
    }

    fn read_parquet(&mut self, path: &Path) -> Result<()> {
        let name = path.display().to_string();
        let columns = ["text", "id", "title", "document_type", "source", "licence"];
        crate::records::for_each_parquet_row(path, &columns, "text", "", |row, value| {
            let what = format!("{name}: row {row}");
            let parts = value
                .and_then(|v| serde_json::from_value::<RawDocument>(v).map_err(|e| e.to_string()))
                .and_then(RawDocument::into_parts);
            match parts {
                Ok(Some(p)) => self.add(p, what)?,
                Ok(None) => {}
                Err(e) => self.stats.skip(&format!("malformed ({e})"), what),
            }
            Ok(())
        })
    }

    /// Every `.txt` / `.md` file below `dir` (sorted), id = the path relative to `dir`.
    fn read_folder(&mut self, dir: &Path) -> Result<()> {
        let mut files = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
                let p = e?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "txt" || x == "md") {
                    files.push(p);
                }
            }
        }
        files.sort();
        for p in files {
            let what = p.display().to_string();
            let bytes = match std::fs::read(&p) {
                Ok(b) => b,
                Err(e) => {
                    self.stats.skip(&format!("unreadable ({e})"), what);
                    continue;
                }
            };
            let Ok(text) = String::from_utf8(bytes) else {
                self.stats.skip("not UTF-8", what);
                continue;
            };
            let id = p.strip_prefix(dir).unwrap_or(&p).display().to_string();
            self.add(
                RawParts {
                    id: Some(id),
                    title: p.file_stem().map(|s| s.to_string_lossy().into_owned()),
                    document_type: None,
                    source: Some(what.clone()),
                    licence: None,
                    text,
                },
                what,
            )?;
        }
        Ok(())
    }
}
