//! `wildlong eval short`: short-context retention (the paper's second claim: long-context
//! tuning keeps short-context ability) on the released formats of MMLU, ARC and GSM8K,
//! prompted and scored as lm-evaluation-harness defines those tasks — MMLU and ARC multiple
//! choice by the log-likelihood of each option (`acc`; ARC also `acc_norm`), GSM8K by greedy
//! generation and exact match of the extracted answer (`strict-match`, `flexible-extract`).
//! Plain-text prompts (lm-eval's default, no chat template); few-shot examples are the
//! first N of a file the user names (lm-eval samples them at random with its own seed).

pub mod data;
pub mod run;
pub mod score;
