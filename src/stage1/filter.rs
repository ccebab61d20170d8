//! The query filter (SPEC §2): turn policy, language, toxic/redacted flags, length bounds,
//! exact and near-duplicate removal (MinHash over word shingles, LSH banding, candidates
//! checked against the similarity threshold). Every dropped row is counted by reason.

use crate::stage1::config::{FilterConfig, TurnPolicy};
use crate::stage1::input::{Conversation, InputStats};
use crate::text::{canonical, NearDuplicates};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::collections::{BTreeMap, HashSet};

/// A kept user query: the input of extraction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Query {
    /// The conversation's id.
    pub id: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
}

/// Counts of the filter, written to `filter_stats.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FilterStats {
    pub input: InputStats,
    pub kept: usize,
    /// Dropped rows by reason.
    pub dropped: BTreeMap<String, usize>,
}

/// Applies the filter conversation by conversation (streaming: only dedup state is kept).
pub struct QueryFilter {
    cfg: FilterConfig,
    languages: HashSet<String>,
    exact: HashSet<[u8; 32]>,
    near: NearDuplicates,
    pub stats: FilterStats,
}

impl QueryFilter {
    pub fn new(cfg: &FilterConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            languages: cfg.languages.iter().map(|l| l.to_lowercase()).collect(),
            exact: HashSet::new(),
            near: NearDuplicates::new(
                cfg.minhash_perms,
                cfg.minhash_bands,
                cfg.shingle_words,
                cfg.near_duplicate_threshold,
                cfg.seed,
            ),
            stats: FilterStats::default(),
        }
    }

    fn drop(&mut self, reason: &str) -> Option<Query> {
        *self.stats.dropped.entry(reason.to_string()).or_default() += 1;
        None
    }

    /// The query of `conv` if it passes, else `None` (counted by reason).
    pub fn apply(&mut self, conv: Conversation) -> Option<Query> {
        let user: Vec<&str> = conv
            .turns
            .iter()
            .filter(|t| t.role.eq_ignore_ascii_case("user") || t.role.eq_ignore_ascii_case("human"))
            .map(|t| t.content.as_str())
            .collect();
        let Some(first) = user.first() else {
            return self.drop("no_user_turn");
        };
        if self.cfg.turns == TurnPolicy::Single && user.len() > 1 {
            return self.drop("multi_turn");
        }
        if !self.languages.is_empty() {
            if let Some(l) = &conv.language {
                if !self.languages.contains(&l.to_lowercase()) {
                    return self.drop("language");
                }
            }
        }
        if self.cfg.drop_toxic && conv.toxic {
            return self.drop("toxic");
        }
        if self.cfg.drop_redacted && conv.redacted {
            return self.drop("redacted");
        }
        let text = first.trim().to_string();
        let chars = text.chars().count();
        if chars < self.cfg.min_query_chars {
            return self.drop("too_short");
        }
        if chars > self.cfg.max_query_chars {
            return self.drop("too_long");
        }
        if self.cfg.exact_dedup {
            let key: [u8; 32] = sha2::Sha256::digest(canonical(&text).as_bytes()).into();
            if !self.exact.insert(key) {
                return self.drop("exact_duplicate");
            }
        }
        if self.cfg.near_dedup && self.near.check_and_insert(&text) {
            return self.drop("near_duplicate");
        }
        self.stats.kept += 1;
        Some(Query {
            id: conv.id,
            text,
            language: conv.language,
        })
    }
}
