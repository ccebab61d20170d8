//! RULER's task table and run settings (`configs/eval/ruler.toml`).

use crate::config::from_toml_file;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `wildlong eval ruler` settings: the task table (the shape of RULER's `synthetic.yaml`),
/// lengths, samples and seed. `configs/eval/ruler.toml` is the default, compiled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulerConfig {
    /// Total tokens per sample (input + tokens to generate), e.g. 4096, 8192, ….
    pub lengths: Vec<usize>,
    /// Samples per task per length.
    pub samples: usize,
    pub seed: u64,
    /// SQuAD v2 JSON (local path or `hf://datasets/OWNER/NAME/FILE`); the built-in set when absent.
    #[serde(default)]
    pub qa_squad: Option<String>,
    /// HotpotQA JSON (distractor setting), local path or `hf://…`; the built-in set when absent.
    #[serde(default)]
    pub qa_hotpotqa: Option<String>,
    /// The essays of the `ruler` protocol (RULER's `PaulGrahamEssays.json` or plain text;
    /// local path or `hf://…`); the built-in public-domain essays when absent.
    #[serde(default)]
    pub essays: Option<String>,
    /// `ruler`: NVIDIA/RULER's generators reproduced call for call; `wildlong`: tighter fill,
    /// per-sample seeds. Unset: `ruler` when essays and both QA files are given, else
    /// `wildlong`.
    #[serde(default)]
    pub protocol: Option<Protocol>,
    /// Task name → generator and its arguments.
    pub tasks: std::collections::BTreeMap<String, RulerGenerator>,
}

/// How samples are generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// NVIDIA/RULER's own generators, call for call (`src/eval/ruler/official.rs`):
    /// comparable with published scores when run on RULER's sources.
    Ruler,
    /// wildlong's generators: inputs filled to within ~1% of the length, needles at varied
    /// depths, per-sample seeds, redistributable built-in data.
    Wildlong,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ruler => "ruler",
            Self::Wildlong => "wildlong",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HaystackKind {
    /// "The grass is green. The sky is blue. …" repeated.
    Noise,
    /// Real prose (see src/eval/ruler/data/SOURCES.md).
    Essay,
    /// Distractor needles with other keys.
    Needle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NeedleKind {
    /// Seven-digit numbers.
    Numbers,
    /// Adjective-noun pairs.
    Words,
    /// UUID v4 strings.
    Uuids,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QaDataset {
    Squad,
    Hotpotqa,
}

/// One RULER task instance: a generator (`scripts/data/synthetic/*.py`) and its arguments;
/// `tokens_to_generate` overrides RULER's default (niah 128, vt 30, cwe 120, fwe 50, qa 32).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "snake_case", deny_unknown_fields)]
pub enum RulerGenerator {
    Niah {
        type_haystack: HaystackKind,
        type_needle_k: NeedleKind,
        type_needle_v: NeedleKind,
        num_needle_k: usize,
        num_needle_v: usize,
        num_needle_q: usize,
        /// Overrides RULER's default tokens to generate.
        #[serde(default)]
        tokens_to_generate: Option<usize>,
    },
    VariableTracking {
        type_haystack: HaystackKind,
        num_chains: usize,
        num_hops: usize,
        /// Overrides RULER's default tokens to generate.
        #[serde(default)]
        tokens_to_generate: Option<usize>,
    },
    CommonWordsExtraction {
        freq_cw: usize,
        freq_ucw: usize,
        num_cw: usize,
        /// Overrides RULER's default tokens to generate.
        #[serde(default)]
        tokens_to_generate: Option<usize>,
    },
    FreqWordsExtraction {
        alpha: f64,
        #[serde(default = "default_coded_wordlen")]
        coded_wordlen: usize,
        /// Overrides RULER's default tokens to generate.
        #[serde(default)]
        tokens_to_generate: Option<usize>,
    },
    Qa {
        dataset: QaDataset,
        /// Overrides RULER's default tokens to generate.
        #[serde(default)]
        tokens_to_generate: Option<usize>,
    },
}

impl RulerGenerator {
    pub fn tokens_to_generate_override(&self) -> Option<usize> {
        match self {
            Self::Niah {
                tokens_to_generate, ..
            }
            | Self::VariableTracking {
                tokens_to_generate, ..
            }
            | Self::CommonWordsExtraction {
                tokens_to_generate, ..
            }
            | Self::FreqWordsExtraction {
                tokens_to_generate, ..
            }
            | Self::Qa {
                tokens_to_generate, ..
            } => *tokens_to_generate,
        }
    }
}

fn default_coded_wordlen() -> usize {
    6
}

impl RulerConfig {
    /// The default task table, lengths and seed (`configs/eval/ruler.toml`).
    pub fn builtin() -> Self {
        toml::from_str(include_str!("../../../configs/eval/ruler.toml"))
            .expect("configs/eval/ruler.toml is valid (checked by tests)")
    }

    /// The protocol this table runs under (see [`RulerConfig::protocol`]).
    pub fn protocol(&self) -> Protocol {
        self.protocol.unwrap_or(
            if self.essays.is_some() && self.qa_squad.is_some() && self.qa_hotpotqa.is_some() {
                Protocol::Ruler
            } else {
                Protocol::Wildlong
            },
        )
    }

    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let c: Self = from_toml_file(path)?;
        c.validate()
            .with_context(|| format!("{}", path.display()))?;
        Ok(c)
    }

    /// Keeps only the named tasks (none named = all); an unknown name is an error listing the known.
    pub fn select(&mut self, wanted: &[&str]) -> Result<()> {
        if wanted.is_empty() {
            return Ok(());
        }
        for w in wanted {
            if !self.tasks.contains_key(*w) {
                let known: Vec<&str> = self.tasks.keys().map(String::as_str).collect();
                anyhow::bail!("unknown task `{w}` (known: {})", known.join(", "));
            }
        }
        self.tasks.retain(|k, _| wanted.contains(&k.as_str()));
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        if self.lengths.is_empty() || self.lengths.contains(&0) {
            anyhow::bail!("lengths must be a non-empty list of positive token counts");
        }
        if self.samples == 0 {
            anyhow::bail!("samples must be at least 1");
        }
        for (name, t) in &self.tasks {
            let bad = |what: &str| anyhow::anyhow!("task `{name}`: {what}");
            match t {
                RulerGenerator::Niah {
                    num_needle_k,
                    num_needle_v,
                    num_needle_q,
                    ..
                } => {
                    if *num_needle_k == 0 || *num_needle_v == 0 || *num_needle_q == 0 {
                        return Err(bad("num_needle_k/v/q must be at least 1"));
                    }
                }
                RulerGenerator::VariableTracking {
                    type_haystack,
                    num_chains,
                    num_hops,
                    ..
                } => {
                    if *num_chains == 0 || *num_hops == 0 {
                        return Err(bad("num_chains and num_hops must be at least 1"));
                    }
                    if *type_haystack == HaystackKind::Needle {
                        return Err(bad("variable tracking takes a noise or essay haystack"));
                    }
                }
                RulerGenerator::CommonWordsExtraction {
                    freq_cw,
                    freq_ucw,
                    num_cw,
                    ..
                } => {
                    if *num_cw == 0 || freq_cw <= freq_ucw {
                        return Err(bad("needs num_cw >= 1 and freq_cw > freq_ucw"));
                    }
                }
                RulerGenerator::FreqWordsExtraction {
                    alpha,
                    coded_wordlen,
                    ..
                } => {
                    if alpha.is_nan() || *alpha <= 1.0 || *coded_wordlen < 2 {
                        return Err(bad(
                            "needs alpha > 1 (zeta distribution) and coded_wordlen >= 2",
                        ));
                    }
                }
                RulerGenerator::Qa { .. } => {}
            }
            if t.tokens_to_generate_override() == Some(0) {
                return Err(bad("tokens_to_generate must be at least 1"));
            }
        }
        Ok(())
    }
}

/// A task table (a file or the built-in one) with a run's choices over it: what
/// `wildlong eval ruler`'s flags and the pipeline's `[eval]` section both say. Unset
/// choices keep the table's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RulerSelection {
    pub tasks_config: Option<std::path::PathBuf>,
    pub lengths: Option<Vec<usize>>,
    pub samples: Option<usize>,
    pub seed: Option<u64>,
    pub qa_squad: Option<String>,
    pub qa_hotpotqa: Option<String>,
    pub essays: Option<String>,
    pub protocol: Option<Protocol>,
    /// Task names; empty = every task of the table.
    pub tasks: Vec<String>,
}

impl RulerSelection {
    /// The table with these choices applied, validated; `tasks_key` names the task list in
    /// an unknown-task error (`--tasks`, `eval.tasks`).
    pub fn resolve(&self, tasks_key: &str) -> Result<RulerConfig> {
        let mut c = match &self.tasks_config {
            Some(p) => RulerConfig::from_toml_file(p)?,
            None => RulerConfig::builtin(),
        };
        if let Some(l) = &self.lengths {
            c.lengths = l.clone();
        }
        if let Some(n) = self.samples {
            c.samples = n;
        }
        if let Some(s) = self.seed {
            c.seed = s;
        }
        if self.qa_squad.is_some() {
            c.qa_squad = self.qa_squad.clone();
        }
        if self.qa_hotpotqa.is_some() {
            c.qa_hotpotqa = self.qa_hotpotqa.clone();
        }
        if self.essays.is_some() {
            c.essays = self.essays.clone();
        }
        if self.protocol.is_some() {
            c.protocol = self.protocol;
        }
        c.select(&self.tasks.iter().map(String::as_str).collect::<Vec<_>>())
            .context(tasks_key.to_string())?;
        c.validate()?;
        Ok(c)
    }
}
