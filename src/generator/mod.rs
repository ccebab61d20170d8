//! What generates text for a stage: the local engine or an OpenAI-compatible server, behind
//! one chat-level call. Stages that can use engine-only features (token ids, prefix-cache
//! stats, token budgets) ask for the local engine with [`Llm::local`].

pub mod command;
pub mod openai;

use crate::engine::chat::Message;
use crate::engine::config::GenerationParams;
use crate::engine::generate::{Completion, Engine, Request};
use crate::generator::openai::OpenAiClient;
use anyhow::Result;

/// Chats rendered with the model's own template, as engine requests.
fn local_requests<'a>(
    e: &'a Engine,
    reqs: &'a [(Vec<Message>, GenerationParams)],
) -> impl Iterator<Item = Result<Request>> + 'a {
    reqs.iter().map(|(m, p)| {
        Ok(Request {
            prompt: e.chat_prompt(m)?,
            params: p.clone(),
        })
    })
}

/// Which generator a command asked for: a models spec on the local engine, or the model of
/// an OpenAI-compatible server.
#[derive(Debug, Clone)]
pub struct GeneratorSpec {
    /// A models spec (`default`, a GGUF, a folder, a Hub id), or the server's model name.
    pub model: String,
    pub server: Option<crate::generator::openai::OpenAiConfig>,
    pub engine: crate::engine::config::EngineConfig,
    pub models_dir: std::path::PathBuf,
}

impl GeneratorSpec {
    pub fn open(&self) -> Result<Llm> {
        Llm::open(
            self.server.clone(),
            &self.model,
            &self.models_dir,
            &self.engine,
        )
    }
}

/// A model for the local engine: a models spec with an optional PEFT adapter merged as the
/// weights load, the engine settings and the folder of fetched models.
#[derive(Debug, Clone)]
pub struct LocalModel {
    pub spec: String,
    pub adapter: Option<std::path::PathBuf>,
    pub engine: crate::engine::config::EngineConfig,
    pub models_dir: std::path::PathBuf,
}

impl LocalModel {
    pub fn load(&self) -> Result<Engine> {
        let adapter = self.adapter.as_deref();
        crate::models::load_engine_with_adapter(&self.spec, adapter, &self.models_dir, &self.engine)
    }
}

pub enum Llm {
    Local(Box<Engine>),
    Remote(OpenAiClient),
}

impl Llm {
    /// The server when one is configured (its `model` set to `model`), else `model` loaded
    /// in the local engine.
    pub fn open(
        server: Option<crate::generator::openai::OpenAiConfig>,
        model: &str,
        models_dir: &std::path::Path,
        engine: &crate::engine::config::EngineConfig,
    ) -> Result<Self> {
        Ok(match server {
            Some(s) => Self::Remote(OpenAiClient::new(crate::generator::openai::OpenAiConfig {
                model: model.to_string(),
                ..s
            })?),
            None => Self::Local(Box::new(crate::models::load_engine(
                model, models_dir, engine,
            )?)),
        })
    }

    /// Chat completions for every request, in input order.
    pub fn chat_batch(&self, reqs: &[(Vec<Message>, GenerationParams)]) -> Result<Vec<Completion>> {
        match self {
            Self::Local(e) => {
                let reqs = local_requests(e, reqs).collect::<Result<Vec<_>>>()?;
                e.generate(&reqs, |_, _| {})
            }
            Self::Remote(c) => c.chat_batch(reqs),
        }
    }

    /// Chat completions for every request; `on_done(index, completion)` as each finishes
    /// (the local engine) or in input order once all have (a server).
    pub fn chat_each(
        &self,
        reqs: &[(Vec<Message>, GenerationParams)],
        mut on_done: impl FnMut(usize, Completion) -> Result<()>,
    ) -> Result<()> {
        match self {
            Self::Local(e) => e.generate_stream(local_requests(e, reqs), on_done),
            Self::Remote(c) => {
                for (i, r) in c.chat_batch(reqs)?.into_iter().enumerate() {
                    on_done(i, r)?;
                }
                Ok(())
            }
        }
    }

    /// Requests worth submitting together: the local engine schedules many at once (its
    /// rows refilled as they finish); a server gets as many as may be in flight.
    pub fn batch_size(&self) -> usize {
        match self {
            Self::Local(e) => e.config.max_batch.max(1) * 64,
            Self::Remote(c) => c.config.concurrency.max(1),
        }
    }

    pub fn local(&self) -> Option<&Engine> {
        match self {
            Self::Local(e) => Some(e),
            Self::Remote(_) => None,
        }
    }
}
