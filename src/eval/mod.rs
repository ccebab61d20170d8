//! Evaluation stage: RULER-style long-context evaluation, HELMET's recall and RAG subsets,
//! LongBench v2 and the short-context check of any model (± adapter) through the engine or an
//! OpenAI-compatible server. Reads no other stage's code; takes models and adapters by path.

pub mod helmet;
pub mod longbench;
pub mod ruler;
pub mod short;

use crate::engine::chat::Message;
use crate::engine::config::GenerationParams;
use crate::engine::generate::{Engine, Request};
use crate::engine::tokenizer::Tokenizer;
use crate::generator::openai::OpenAiClient;
use anyhow::Result;

/// What answers a suite's prompts: the local engine, or a server with the model's tokenizer
/// read locally (to measure and cut prompts as the suite does).
pub enum Answerer<'a> {
    Local(&'a Engine),
    Server {
        client: &'a OpenAiClient,
        tokenizer: &'a Tokenizer,
    },
}

impl Answerer<'_> {
    pub fn tokenizer(&self) -> &Tokenizer {
        match self {
            Self::Local(e) => &e.tokenizer,
            Self::Server { tokenizer, .. } => tokenizer,
        }
    }

    /// Answers every prompt — as one user message through the chat template (`chat`; a
    /// server's chat completions) or as plain text (the engine: the prompt's tokens with
    /// BOS; a server: `/v1/completions`) — calling `record(j, text, prompt_tokens)` as each
    /// finishes (the engine schedules them together; a server takes them concurrently).
    pub fn answer_all(
        &self,
        prompts: &[String],
        chat: bool,
        params: &GenerationParams,
        mut record: impl FnMut(usize, &str, usize) -> Result<()>,
    ) -> Result<()> {
        match self {
            Self::Local(e) => {
                let reqs = prompts
                    .iter()
                    .map(|p| {
                        Ok(Request {
                            prompt: if chat {
                                e.chat_prompt(&[Message::new("user", p.as_str())])?
                            } else {
                                e.tokenizer.encode(p, true)?
                            },
                            params: params.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mut err = None;
                e.generate(&reqs, |j, c| {
                    if let Err(x) = record(j, &c.text, c.prompt_tokens) {
                        err.get_or_insert(x);
                    }
                })?;
                err.map_or(Ok(()), Err)
            }
            Self::Server { client, .. } => client.each(
                prompts,
                |p| {
                    if chat {
                        client.chat(&[Message::new("user", p.as_str())], params)
                    } else {
                        client.complete(p, params)
                    }
                },
                |j, c| record(j, &c.text, c.prompt_tokens),
            ),
        }
    }
}

/// The engine for `model`, or a client of `server` with `tokenizer`'s tokenizer read locally
/// (no weights), handed to `run`.
pub fn with_answerer<T>(
    model: &str,
    server: Option<crate::generator::openai::OpenAiConfig>,
    tokenizer: &str,
    engine: &crate::engine::config::EngineConfig,
    models_dir: &std::path::Path,
    run: impl FnOnce(&Answerer) -> Result<T>,
) -> Result<T> {
    use anyhow::Context;
    match server {
        Some(s) => {
            let client = OpenAiClient::new(crate::generator::openai::OpenAiConfig {
                model: model.to_string(),
                ..s
            })?;
            let located = crate::models::locate(
                crate::models::resolve(tokenizer, models_dir)
                    .with_context(|| format!("--tokenizer {tokenizer}"))?,
                engine,
            )?;
            run(&Answerer::Server {
                client: &client,
                tokenizer: &located.tokenizer,
            })
        }
        None => {
            let e = crate::models::load_engine(model, models_dir, engine)?;
            run(&Answerer::Local(&e))
        }
    }
}
