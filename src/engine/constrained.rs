//! JSON-schema-constrained decoding through llguidance: a token trie over the tokenizer's
//! byte vocabulary, one parser factory per engine, one matcher per constrained row.

use crate::engine::tokenizer::Tokenizer;
use anyhow::{anyhow, Context, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

struct Env {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(s);
        self.tokenizer
            .encode(text.as_ref(), false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }
}

/// Builds matchers for JSON schemas over one tokenizer.
pub struct ConstraintFactory {
    factory: ParserFactory,
}

impl ConstraintFactory {
    pub fn new(tokenizer: &Tokenizer) -> Result<Self> {
        let words = tokenizer.token_bytes()?;
        let eos = tokenizer
            .eos_ids()
            .first()
            .copied()
            .context("tokenizer has no EOS token: cannot constrain output")?;
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, words);
        let env: TokEnv = Arc::new(Env {
            trie,
            tokenizer: tokenizer.inner().clone(),
        });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| anyhow!("llguidance: {e}"))?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// A matcher for `schema`; an invalid schema is an error here, before any decoding.
    pub fn json_schema(&self, schema: &serde_json::Value) -> Result<Constraint> {
        if !schema.is_object() && !schema.is_boolean() {
            anyhow::bail!("invalid JSON schema: expected an object, got {schema}");
        }
        let grammar = TopLevelGrammar::from_json_schema(schema.clone());
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| anyhow!("invalid JSON schema: {e}"))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            anyhow::bail!("invalid JSON schema: {e}");
        }
        Ok(Constraint { matcher })
    }
}

/// The grammar state of one constrained row.
pub struct Constraint {
    matcher: Matcher,
}

impl Constraint {
    /// Tokens allowed next (EOS included once the JSON is complete).
    pub fn mask(&mut self) -> Result<SimpleVob> {
        self.matcher
            .compute_mask()
            .map_err(|e| anyhow!("constrained decoding: {e}"))
    }

    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.matcher
            .consume_token(token)
            .map_err(|e| anyhow!("constrained decoding: {e}"))
    }

    /// Tokens the grammar allows as the only continuation (not yet committed; the caller
    /// commits each); empty when the next token is a real choice.
    pub fn forced_tokens(&mut self) -> Vec<u32> {
        self.matcher.compute_ff_tokens()
    }

    /// The grammar admits nothing more.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
