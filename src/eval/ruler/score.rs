//! RULER's metrics (`scripts/eval/synthetic/constants.py`) and prediction clean-up
//! (`scripts/eval/evaluate.py: postprocess_pred`).
//!
//! `string_match_part` is RULER's: a prediction scores 1 when *any* reference occurs in it.
//! lm-evaluation-harness's port scores the *fraction* of references found instead, so its QA
//! numbers differ whenever a question has several references.

use crate::eval::ruler::tasks::Metric;

/// Strips the prediction and turns control characters into newlines, as RULER does.
pub fn postprocess(pred: &str) -> String {
    pred.trim()
        .chars()
        .map(|c| if (c as u32) < 0x20 { '\n' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

fn contains(pred: &str, r: &str) -> bool {
    pred.to_lowercase().contains(&r.to_lowercase())
}

/// One sample's score in [0, 1].
pub fn sample_score(metric: Metric, pred: &str, refs: &[String]) -> f64 {
    if refs.is_empty() {
        return 0.0;
    }
    match metric {
        Metric::StringMatchAll => {
            refs.iter().filter(|r| contains(pred, r)).count() as f64 / refs.len() as f64
        }
        Metric::StringMatchPart => {
            if refs.iter().any(|r| contains(pred, r)) {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// RULER's task score: mean sample score × 100, rounded to two decimals.
pub fn score(metric: Metric, preds: &[String], refs: &[Vec<String>]) -> f64 {
    if preds.is_empty() {
        return 0.0;
    }
    let sum: f64 = preds
        .iter()
        .zip(refs)
        .map(|(p, r)| sample_score(metric, p, r))
        .sum();
    round2(sum / preds.len() as f64 * 100.0)
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
