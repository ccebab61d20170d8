//! What generates text for a stage: the local engine or an OpenAI-compatible server, behind
//! one chat-level call. Stages that can use engine-only features (shared prefixes, token
//! budgets) ask for the local engine with [`Llm::local`].

use crate::config::GenerationParams;
use crate::engine::chat::Message;
use crate::engine::generate::{Completion, Engine, Request};
use crate::engine::openai::OpenAiClient;
use anyhow::Result;

pub enum Llm {
    Local(Box<Engine>),
    Remote(OpenAiClient),
}

impl Llm {
    /// Chat completions for every request, in input order.
    pub fn chat_batch(&self, reqs: &[(Vec<Message>, GenerationParams)]) -> Result<Vec<Completion>> {
        match self {
            Self::Local(e) => {
                let reqs = reqs
                    .iter()
                    .map(|(m, p)| {
                        Ok(Request {
                            prompt: e.chat_prompt(m)?,
                            params: p.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                e.generate(&reqs, |_, _| {})
            }
            Self::Remote(c) => c.chat_batch(reqs),
        }
    }

    /// Requests worth sending together.
    pub fn batch_size(&self) -> usize {
        match self {
            Self::Local(e) => e.config.max_batch.max(1),
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
