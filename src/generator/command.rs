//! `wildlong generate`: prompts (one, or a JSONL batch file resumed against its output) through
//! the local engine, with a LoRA adapter merged at load when one is named.

use crate::engine::chat::Message;
use crate::engine::config::GenerationParams;
use crate::engine::generate::{Completion, Engine, Request};
use crate::generator::LocalModel;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What one `wildlong generate` invocation asks for, validated by the CLI.
pub struct GenerateCommand {
    pub model: LocalModel,
    /// Every prompt's parameters; a batch line may override max_tokens and sampling.
    pub params: GenerationParams,
    /// `Err(path)`: a JSONL batch file of prompts (see `wildlong generate --help`).
    pub prompts: std::result::Result<String, PathBuf>,
    /// Append results here as JSONL (resumable) instead of printing.
    pub output: Option<PathBuf>,
    /// Plain prompts go through the chat template (after this system message, if any).
    pub chat: Option<Option<String>>,
}

/// One prompt of a batch file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    id: Option<serde_json::Value>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    max_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    seed: Option<u64>,
}

struct Job {
    id: String,
    prompt_text: String,
    request: Request,
}

fn id_string(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `wildlong generate`: one prompt, or a batch file resumed against its output file.
pub fn generate(c: &GenerateCommand) -> Result<()> {
    let base = c.params.clone();
    let lines: Vec<(String, BatchLine)> = match &c.prompts {
        Err(path) => read_batch_file(path)?,
        Ok(prompt) => vec![(
            "0".into(),
            BatchLine {
                id: None,
                prompt: Some(prompt.clone()),
                messages: None,
                max_tokens: None,
                temperature: None,
                top_p: None,
                top_k: None,
                seed: None,
            },
        )],
    };
    let done_ids = match &c.output {
        Some(out) if out.exists() => completed_ids(out)?,
        _ => Default::default(),
    };
    let engine = c.model.load()?;
    let mut jobs = Vec::new();
    for (id, line) in lines {
        if done_ids.contains(&id) {
            continue;
        }
        let mut params = base.clone();
        params.max_tokens = line.max_tokens.unwrap_or(params.max_tokens);
        params.sampling.temperature = line.temperature.unwrap_or(params.sampling.temperature);
        params.sampling.top_p = line.top_p.or(params.sampling.top_p);
        params.sampling.top_k = line.top_k.or(params.sampling.top_k);
        params.sampling.seed = line.seed.unwrap_or(params.sampling.seed);
        let (prompt_text, prompt) = build_prompt(&engine, c, line.prompt, line.messages)
            .with_context(|| format!("prompt `{id}`"))?;
        jobs.push(Job {
            id,
            prompt_text,
            request: Request { prompt, params },
        });
    }
    if jobs.is_empty() {
        eprintln!("nothing to do: every prompt already has a result in the output file");
        return Ok(());
    }
    let bar =
        (jobs.len() > 1).then(|| crate::records::progress_bar(true, jobs.len() as u64, "prompts"));
    let mut out: Box<dyn Write> = match &c.output {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    let requests: Vec<Request> = jobs.iter().map(|j| j.request.clone()).collect();
    let single = jobs.len() == 1 && c.output.is_none() && c.prompts.is_ok();
    let mut write_err = None;
    engine.generate(&requests, |i, c: &Completion| {
        if let Some(b) = &bar {
            b.inc(1);
        }
        let r = if single {
            writeln!(out, "{}", c.text)
        } else {
            let rec = serde_json::json!({
                "id": jobs[i].id, "prompt": jobs[i].prompt_text, "completion": c.text,
                "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.tokens.len(),
            });
            writeln!(out, "{rec}").and_then(|_| out.flush())
        };
        if let Err(e) = r {
            write_err.get_or_insert(e);
        }
    })?;
    if let Some(b) = bar {
        b.finish();
    }
    if let Some(e) = write_err {
        return Err(e).context("writing results");
    }
    Ok(())
}

fn build_prompt(
    engine: &Engine,
    c: &GenerateCommand,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
) -> Result<(String, Vec<u32>)> {
    let messages = match (messages, prompt) {
        (Some(m), None) => Some(m),
        (None, Some(p)) if c.chat.is_some() => {
            let mut m = Vec::new();
            if let Some(Some(s)) = &c.chat {
                m.push(Message::new("system", s.clone()));
            }
            m.push(Message::new("user", p));
            Some(m)
        }
        (None, Some(p)) => return Ok((p.clone(), engine.tokenizer.encode(&p, true)?)),
        (Some(_), Some(_)) => bail!("give either `prompt` or `messages`, not both"),
        (None, None) => bail!("needs `prompt` or `messages`"),
    };
    let messages = messages.unwrap_or_default();
    let text = messages
        .last()
        .map(|m| m.content.clone())
        .unwrap_or_default();
    Ok((text, engine.chat_prompt(&messages)?))
}

fn read_batch_file(path: &Path) -> Result<Vec<(String, BatchLine)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: BatchLine = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: invalid batch line", path.display(), n + 1))?;
        if l.prompt.is_none() && l.messages.is_none() {
            bail!("{}:{}: needs `prompt` or `messages`", path.display(), n + 1);
        }
        let id =
            l.id.as_ref()
                .map(id_string)
                .unwrap_or_else(|| (n + 1).to_string());
        if !seen.insert(id.clone()) {
            bail!("{}:{}: duplicate id `{id}`", path.display(), n + 1);
        }
        out.push((id, l));
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// Ids already present in an append-only output file; a torn last line (killed run) is cut off.
fn completed_ids(path: &Path) -> Result<std::collections::HashSet<String>> {
    let lines: Vec<serde_json::Value> = crate::records::read_jsonl_resumable(path)?;
    Ok(lines
        .iter()
        .filter_map(|v| v.get("id").map(id_string))
        .collect())
}
