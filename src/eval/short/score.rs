//! lm-evaluation-harness's metrics for these tasks: `acc` (argmax of the options'
//! log-likelihoods), `acc_norm` (argmax of log-likelihood per character of the option),
//! and GSM8K's two filters with `exact_match` (`ignore_case`, `regexes_to_ignore`).

use regex::Regex;
use std::sync::OnceLock;

/// The first index of the largest value (numpy's argmax).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// `acc_norm`'s choice: log-likelihood divided by the option's length in characters.
pub fn argmax_norm(lls: &[f64], choices: &[String]) -> usize {
    let per_char: Vec<f64> = lls
        .iter()
        .zip(choices)
        .map(|(l, c)| l / c.chars().count().max(1) as f64)
        .collect();
    argmax(&per_char)
}

/// What lm-eval's RegexFilter gives when nothing matches.
pub const INVALID: &str = "[invalid]";

fn strict_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    R.get_or_init(|| Regex::new(r"#### (\-?[0-9\.\,]+)").expect("valid regex"))
}

fn flexible_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    R.get_or_init(|| Regex::new(r"(-?[$0-9.,]{2,})|(-?[0-9]+)").expect("valid regex"))
}

/// `strict-match`: the number after the first `#### `.
pub fn strict_match(text: &str) -> String {
    strict_re()
        .captures(text)
        .and_then(|c| c.get(1))
        .map_or(INVALID.to_string(), |m| m.as_str().trim().to_string())
}

/// `flexible-extract`: the last number-like run (`group_select: -1`), its first non-empty
/// group.
pub fn flexible_extract(text: &str) -> String {
    flexible_re()
        .captures_iter(text)
        .last()
        .and_then(|c| c.iter().skip(1).flatten().find(|m| !m.as_str().is_empty()))
        .map_or(INVALID.to_string(), |m| m.as_str().trim().to_string())
}

fn ignore_res() -> &'static [Regex; 4] {
    static R: OnceLock<[Regex; 4]> = OnceLock::new();
    R.get_or_init(|| {
        [",", r"\$", r"(?s).*#### ", r"\.$"].map(|r| Regex::new(r).expect("valid regex"))
    })
}

/// GSM8K's `exact_match`: each of `regexes_to_ignore` removed from both sides in turn,
/// case folded, then compared.
pub fn exact_match(pred: &str, reference: &str) -> bool {
    let clean = |s: &str| {
        let mut s = s.to_string();
        for r in ignore_res() {
            s = r.replace_all(&s, "").into_owned();
        }
        s.to_lowercase()
    };
    clean(pred) == clean(reference)
}
