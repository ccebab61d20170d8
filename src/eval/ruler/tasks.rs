//! RULER's task constants (NVIDIA/RULER `scripts/data/synthetic/constants.py` and
//! `scripts/eval/synthetic/constants.py`): templates, answer prefixes, tokens to generate
//! and the metric of each generator. Copied verbatim ("most frequently appeared" included),
//! because scores depend on the exact wording.

use crate::eval::ruler::config::RulerGenerator;

/// RULER's task order, used for tables and plots.
pub const RULER_TASKS: [&str; 13] = [
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Mean over references of "reference occurs in the prediction" (11 tasks).
    StringMatchAll,
    /// 1 if any reference occurs in the prediction (QA).
    StringMatchPart,
}

pub struct TaskConstants {
    pub template: &'static str,
    pub answer_prefix: &'static str,
    pub tokens_to_generate: usize,
    pub metric: Metric,
}

impl TaskConstants {
    /// The template with the answer prefix appended: what `prepare.py` hands a generator as
    /// `--template` under RULER's `base` model template.
    pub fn with_answer_prefix(&self) -> String {
        format!("{}{}", self.template, self.answer_prefix)
    }
}

/// niah.py's rewrite of its template when one value is asked for (`Some` → `A`, `are all`
/// → `is`, `are` → `is`, `answers` → `answer`, in that order).
pub fn singular(template: &str) -> String {
    template
        .replace("Some", "A")
        .replace("are all", "is")
        .replace("are", "is")
        .replace("answers", "answer")
}

pub const NIAH: TaskConstants = TaskConstants {
    template: "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?",
    answer_prefix: " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    tokens_to_generate: 128,
    metric: Metric::StringMatchAll,
};

pub const VARIABLE_TRACKING: TaskConstants = TaskConstants {
    template: "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
    answer_prefix: " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: ",
    tokens_to_generate: 30,
    metric: Metric::StringMatchAll,
};

pub const COMMON_WORDS_EXTRACTION: TaskConstants = TaskConstants {
    template: "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
    answer_prefix: " Answer: The top 10 words that appear most often in the list are:",
    tokens_to_generate: 120,
    metric: Metric::StringMatchAll,
};

pub const FREQ_WORDS_EXTRACTION: TaskConstants = TaskConstants {
    template: "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?",
    answer_prefix: " Answer: According to the coded text above, the three most frequently appeared words are:",
    tokens_to_generate: 50,
    metric: Metric::StringMatchAll,
};

pub const QA: TaskConstants = TaskConstants {
    template: "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
    answer_prefix: " Answer:",
    tokens_to_generate: 32,
    metric: Metric::StringMatchPart,
};

pub fn constants(g: &RulerGenerator) -> &'static TaskConstants {
    match g {
        RulerGenerator::Niah { .. } => &NIAH,
        RulerGenerator::VariableTracking { .. } => &VARIABLE_TRACKING,
        RulerGenerator::CommonWordsExtraction { .. } => &COMMON_WORDS_EXTRACTION,
        RulerGenerator::FreqWordsExtraction { .. } => &FREQ_WORDS_EXTRACTION,
        RulerGenerator::Qa { .. } => &QA,
    }
}

pub fn tokens_to_generate(g: &RulerGenerator) -> usize {
    g.tokens_to_generate_override()
        .unwrap_or(constants(g).tokens_to_generate)
}

/// Fills `{name}` placeholders (Python's `str.format` for the plain fields RULER uses).
pub fn format(template: &str, fields: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) => match fields.iter().find(|(k, _)| *k == &after[..end]) {
                Some((_, v)) => {
                    out.push_str(v);
                    rest = &after[end + 1..];
                }
                None => {
                    out.push('{');
                    rest = after;
                }
            },
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Task order for tables: RULER's 13 first, then any others by name.
pub fn order(names: &mut [String]) {
    names.sort_by_key(|n| {
        (
            RULER_TASKS
                .iter()
                .position(|t| t == n)
                .unwrap_or(RULER_TASKS.len()),
            n.clone(),
        )
    });
}
