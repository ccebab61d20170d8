//! Stage 2's quality gates. Each rejection has a reason that is counted:
//! - answers: empty, refusal, cut off at the token cap, too short;
//! - grounding: numbers of two or more digits, quoted spans of three or more words, and
//!   capitalised names (not at a sentence start, outside quotes) in the answer must occur
//!   in the document(s) or the instruction, ignoring case, but for a tolerated share;
//! - closed-book: an answer the model gives about as well without the documents (SQuAD
//!   token F1 between the two answers at or above a threshold);
//! - near-duplicate instructions (MinHash, as stage 1's query filter);
//! - decontamination: documents, instructions and answers sharing a word 13-gram with the
//!   evaluation sources (RULER's essay haystack and its SQuAD / HotpotQA sets).

use crate::engine::generate::FinishReason;
use crate::eval::ruler::data::{Assets, QaSet};
use crate::text::{words, NearDuplicates, NgramSet};
use anyhow::Result;
use std::collections::BTreeSet;
use std::path::Path;

const REFUSALS: [&str; 6] = [
    "i'm sorry",
    "i am sorry",
    "i cannot",
    "i can't",
    "as an ai",
    "i am unable",
];

/// Why an answer is not kept by the answer and grounding gates, if it is not.
/// `max_ungrounded_names`: the share of distinct names allowed to be missing.
pub fn answer_gate(
    answer: &str,
    finish: FinishReason,
    documents: &str,
    instruction: &str,
    min_words: usize,
    max_ungrounded_names: f64,
) -> Option<&'static str> {
    let a = answer.trim();
    if a.is_empty() {
        return Some("empty_answer");
    }
    let lower = a.to_lowercase();
    if REFUSALS.iter().any(|r| lower.starts_with(r)) {
        return Some("refusal");
    }
    if finish == FinishReason::Length {
        return Some("answer_cut_off");
    }
    if a.split_whitespace().count() < min_words {
        return Some("too_short");
    }
    if ungrounded_number(a, documents) {
        return Some("ungrounded_number");
    }
    let (spans, outside) = split_quotes(a);
    let doc_words = format!(" {} ", words(documents).join(" "));
    if spans.iter().any(|q| {
        let w = words(q);
        w.len() >= 3 && !doc_words.contains(&format!(" {} ", w.join(" ")))
    }) {
        return Some("ungrounded_quote");
    }
    // Names outside quotes (quotes were checked whole), compared without case.
    let names = names(&outside);
    if !names.is_empty() {
        let docs = documents.to_lowercase();
        let instr = instruction.to_lowercase();
        let missing = names
            .iter()
            .map(|n| n.to_lowercase())
            .filter(|n| !docs.contains(n.as_str()) && !instr.contains(n.as_str()))
            .count();
        if missing as f64 > max_ungrounded_names * names.len() as f64 {
            return Some("ungrounded_name");
        }
    }
    None
}

/// True if a number of two or more digits in `answer` does not occur in `documents`.
fn ungrounded_number(answer: &str, documents: &str) -> bool {
    let mut digits = String::new();
    for c in answer.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            if digits.len() >= 2 && !documents.contains(&digits) {
                return true;
            }
            digits.clear();
        }
    }
    false
}

/// The double-quoted spans of `text` (straight or curly quotes; an unclosed quote runs to
/// the end and is dropped) and the text outside them, each span replaced by a space.
fn split_quotes(text: &str) -> (Vec<&str>, String) {
    let mut spans = Vec::new();
    let mut outside = String::with_capacity(text.len());
    let mut open: Option<usize> = None;
    for (i, c) in text.char_indices() {
        match (c, open) {
            ('"' | '“', None) => open = Some(i + c.len_utf8()),
            ('"' | '”', Some(s)) => {
                spans.push(&text[s..i]);
                outside.push(' ');
                open = None;
            }
            (_, Some(_)) => {}
            (c, None) => outside.push(c),
        }
    }
    (spans, outside)
}

/// Spans of three or more words inside straight or curly double quotes.
pub fn quotes(text: &str) -> Vec<String> {
    split_quotes(text)
        .0
        .into_iter()
        .filter(|q| words(q).len() >= 3)
        .map(str::to_string)
        .collect()
}

/// Capitalised words that do not start a sentence, line or list item (trailing
/// punctuation and a possessive `'s` removed), and all-capital acronyms; not `I`.
pub fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let mut sentence_start = true;
        for raw in line.split_whitespace() {
            let word = raw
                .trim_start_matches(|c: char| !c.is_alphanumeric())
                .trim_end_matches(|c: char| !c.is_alphanumeric());
            let word = word
                .strip_suffix("'s")
                .or_else(|| word.strip_suffix("’s"))
                .unwrap_or(word);
            let list_marker = raw
                .chars()
                .all(|c| c.is_ascii_digit() || ".)-*•#".contains(c));
            let capital = word.chars().next().is_some_and(char::is_uppercase);
            if !sentence_start && capital && word != "I" && word.chars().all(char::is_alphanumeric)
            {
                out.insert(word.to_string());
            }
            if !list_marker {
                sentence_start = raw.ends_with(['.', '!', '?', ':', ';'])
                    || raw.ends_with(".\"")
                    || raw.ends_with(".”");
            }
        }
    }
    out
}

/// Overlap of a text with the evaluation sources.
pub struct Decontaminator {
    set: NgramSet,
    pub n: usize,
    /// What was indexed, for the records.
    pub sources: Vec<String>,
}

impl Decontaminator {
    /// RULER's sources as the evaluation reads them: the essay haystack and the SQuAD and
    /// HotpotQA sets (the built-in ones, or these files).
    pub fn ruler(n: usize, squad: Option<&Path>, hotpotqa: Option<&Path>) -> Result<Self> {
        let assets = Assets::load(squad, hotpotqa)?;
        let mut set = NgramSet::new(n);
        set.insert(&assets.essay_words.join(" "));
        let mut add = |qa: &QaSet| {
            for d in &qa.docs {
                set.insert(d);
            }
            for q in &qa.qas {
                set.insert(&q.query);
            }
        };
        add(&assets.squad);
        add(&assets.hotpotqa);
        Ok(Self {
            set,
            n,
            sources: vec![
                format!(
                    "RULER essay haystack ({})",
                    crate::eval::ruler::data::ESSAY_SOURCE
                ),
                format!("SQuAD ({})", assets.squad.source),
                format!("HotpotQA ({})", assets.hotpotqa.source),
            ],
        })
    }

    /// Distinct word n-grams `text` shares with the sources.
    pub fn shared(&self, text: &str) -> usize {
        self.set.shared(text)
    }
}

/// The near-duplicate index over instructions (in a run, and across shards at the merge).
pub fn instruction_index(threshold: f64, seed: u64) -> NearDuplicates {
    NearDuplicates::new(128, 16, 3, threshold, seed)
}
