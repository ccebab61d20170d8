//! The tasks' released formats (HF parquet or JSONL, local or `hf://datasets/...`) read into
//! items, and each item's prompt as lm-evaluation-harness builds it (its task YAMLs:
//! `mmlu/default/_default_template_yaml`, `arc/arc_easy.yaml`, `gsm8k/gsm8k.yaml`).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Mmlu,
    ArcEasy,
    ArcChallenge,
    Gsm8k,
}

impl Task {
    pub const ALL: [Task; 4] = [Task::Mmlu, Task::ArcEasy, Task::ArcChallenge, Task::Gsm8k];

    pub fn name(self) -> &'static str {
        match self {
            Task::Mmlu => "mmlu",
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            Task::Gsm8k => "gsm8k",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .with_context(|| format!("unknown task `{s}` (mmlu, arc_easy, arc_challenge, gsm8k)"))
    }

    /// The columns a row of the task's released format carries.
    fn columns(self) -> &'static [&'static str] {
        match self {
            Task::Mmlu => &["question", "subject", "choices", "answer"],
            Task::ArcEasy | Task::ArcChallenge => &["question", "choices", "answerKey"],
            Task::Gsm8k => &["question", "answer"],
        }
    }

    pub fn generates(self) -> bool {
        self == Task::Gsm8k
    }
}

/// What a correct answer is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gold {
    /// Index into the choices.
    Choice(usize),
    /// The reference text (GSM8K's whole solution, ending in `#### N`).
    Answer(String),
}

/// One item: lm-eval's `doc_to_text`, `doc_to_choice` and `doc_to_target`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// The prompt before the answer.
    pub text: String,
    /// Multiple choice: each option's continuation text (without the leading delimiter).
    pub choices: Vec<String>,
    pub gold: Gold,
    /// MMLU's subject (its description line), else empty.
    pub subject: String,
}

/// lm-eval's `target_delimiter` and `fewshot_delimiter` (the same for the three tasks).
pub const TARGET_DELIMITER: &str = " ";
pub const FEWSHOT_DELIMITER: &str = "\n\n";
/// GSM8K's `generation_kwargs.until`.
pub const GSM8K_UNTIL: [&str; 3] = ["Question:", "</s>", "<|im_end|>"];

impl Item {
    /// The item as a few-shot example: text, delimiter, gold target.
    pub fn example(&self) -> String {
        let target = match &self.gold {
            Gold::Choice(i) => self.choices[*i].clone(),
            Gold::Answer(a) => a.clone(),
        };
        format!("{}{TARGET_DELIMITER}{target}", self.text)
    }

    /// The full prompt: MMLU's description, the examples each followed by the few-shot
    /// delimiter, then this item's text (lm-eval's `fewshot_context`).
    pub fn context(&self, task: Task, shots: &[Item]) -> String {
        let mut s = String::new();
        if task == Task::Mmlu {
            s.push_str(&format!(
                "The following are multiple choice questions (with answers) about {}.{FEWSHOT_DELIMITER}",
                self.subject.replace('_', " ")
            ));
        }
        for e in shots {
            s.push_str(&e.example());
            s.push_str(FEWSHOT_DELIMITER);
        }
        s.push_str(&self.text);
        s
    }
}

fn str_field<'a>(row: &'a Value, key: &str) -> std::result::Result<&'a str, String> {
    row.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("`{key}` is not a string"))
}

/// A list field: a JSON array, or the `{"list": [{"element": x}, …]}`/`{"item": …}` shapes
/// some Parquet writers give nested lists.
fn list_field(v: &Value, key: &str) -> std::result::Result<Vec<String>, String> {
    let arr = v
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("`{key}` is not a list"))?;
    arr.iter()
        .map(|x| match x {
            Value::String(s) => Ok(s.clone()),
            Value::Object(o) => o
                .values()
                .next()
                .and_then(Value::as_str)
                .map(String::from)
                .ok_or_else(|| format!("`{key}`: an element is not a string")),
            _ => Err(format!("`{key}`: an element is not a string")),
        })
        .collect()
}

/// One row of the task's format as an item.
pub fn item(task: Task, row: &Value) -> std::result::Result<Item, String> {
    let question = str_field(row, "question")?;
    Ok(match task {
        Task::Mmlu => {
            let choices = list_field(row, "choices")?;
            if choices.len() != 4 {
                return Err(format!(
                    "`choices` has {} options, MMLU has 4",
                    choices.len()
                ));
            }
            let answer = row
                .get("answer")
                .and_then(Value::as_u64)
                .filter(|&a| a < 4)
                .ok_or("`answer` is not 0-3")? as usize;
            let mut text = question.trim().to_string();
            for (l, c) in ["A", "B", "C", "D"].iter().zip(&choices) {
                text.push_str(&format!("\n{l}. {c}"));
            }
            text.push_str("\nAnswer:");
            Item {
                text,
                choices: ["A", "B", "C", "D"].map(String::from).to_vec(),
                gold: Gold::Choice(answer),
                subject: row
                    .get("subject")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            }
        }
        Task::ArcEasy | Task::ArcChallenge => {
            let c = row.get("choices").ok_or("no `choices`")?;
            let texts = list_field(c, "text")?;
            let labels = list_field(c, "label")?;
            let key = str_field(row, "answerKey")?;
            let gold = labels
                .iter()
                .position(|l| l == key)
                .ok_or_else(|| format!("answerKey {key:?} is not among the labels {labels:?}"))?;
            if texts.len() != labels.len() {
                return Err("`choices.text` and `choices.label` differ in length".into());
            }
            Item {
                text: format!("Question: {question}\nAnswer:"),
                choices: texts,
                gold: Gold::Choice(gold),
                subject: String::new(),
            }
        }
        Task::Gsm8k => Item {
            text: format!("Question: {question}\nAnswer:"),
            choices: Vec::new(),
            gold: Gold::Answer(str_field(row, "answer")?.to_string()),
            subject: String::new(),
        },
    })
}

/// Reads a task's items from a local file or `hf://datasets/...` (Parquet by extension,
/// else JSONL); a bad row is an error naming the file and row or line.
pub fn read(task: Task, spec: &str, limit: Option<usize>) -> Result<Vec<Item>> {
    let path = crate::models::resolve_data_file(spec)?;
    let name = path.display().to_string();
    let mut items = Vec::new();
    let full = |items: &Vec<Item>| limit.is_some_and(|n| items.len() >= n);
    if path.extension().is_some_and(|e| e == "parquet") {
        let expected = format!(" ({} expects {})", task.name(), task.columns().join(", "));
        crate::records::for_each_parquet_row(
            &path,
            task.columns(),
            "question",
            &expected,
            |row, v| {
                if full(&items) {
                    return Ok(());
                }
                let v = v.map_err(|e| anyhow::anyhow!("{name}: row {row}: {e}"))?;
                items.push(item(task, &v).map_err(|e| anyhow::anyhow!("{name}: row {row}: {e}"))?);
                Ok(())
            },
        )?;
    } else {
        read_jsonl(task, &path, &mut items, limit)?;
    }
    if items.is_empty() {
        bail!("{name}: no {} items", task.name());
    }
    Ok(items)
}

fn read_jsonl(task: Task, path: &Path, items: &mut Vec<Item>, limit: Option<usize>) -> Result<()> {
    let name = path.display().to_string();
    let f = std::fs::File::open(path).with_context(|| format!("opening {name}"))?;
    crate::records::for_each_jsonl_line(&name, std::io::BufReader::new(f), |line, text| {
        if limit.is_some_and(|n| items.len() >= n) {
            return Ok(());
        }
        let text = text.map_err(|e| anyhow::anyhow!("{name}: line {line}: not UTF-8: {e}"))?;
        let v: Value = serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("{name}: line {line}: invalid JSON: {e}"))?;
        items.push(item(task, &v).map_err(|e| anyhow::anyhow!("{name}: line {line}: {e}"))?);
        Ok(())
    })
}
