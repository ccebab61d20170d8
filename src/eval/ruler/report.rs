//! RULER reports: a task × length table in markdown, CSV and JSON with averages, a plot of
//! score against length per task (SVG), and the delta table against a baseline report.

use crate::eval::ruler::config::{HaystackKind, Protocol, RulerGenerator};
use crate::eval::ruler::data::{Assets, ESSAY_SOURCE};
use crate::eval::ruler::run::{RulerRun, RunIdentity};
use crate::eval::ruler::score::{self, round2};
use crate::eval::ruler::tasks::Metric;
use crate::records::write_atomic;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: String,
    pub length: usize,
    pub metric: Metric,
    /// RULER's score: mean sample score × 100, two decimals.
    pub score: f64,
    /// Empty predictions (RULER's "nulls").
    pub nulls: usize,
    pub samples: usize,
}

impl TaskResult {
    pub fn new(
        task: &str,
        length: usize,
        metric: Metric,
        preds: &[String],
        refs: &[Vec<String>],
    ) -> Self {
        Self {
            task: task.to_string(),
            length,
            metric,
            score: score::score(metric, preds, refs),
            nulls: preds.iter().filter(|p| p.is_empty()).count(),
            samples: preds.len(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub model: String,
    pub adapter: Option<String>,
    pub template: String,
    pub rope: serde_json::Value,
    pub weights: String,
    pub seed: u64,
    pub samples_per_task: usize,
    pub lengths: Vec<usize>,
    pub tasks: Vec<String>,
    /// `ruler` (NVIDIA/RULER's generators call for call) or `wildlong`.
    #[serde(default)]
    pub protocol: String,
    pub essay_haystack: String,
    pub qa_squad: String,
    pub qa_hotpotqa: String,
    pub notes: Vec<String>,
    pub results: Vec<TaskResult>,
    /// Per task, the mean over lengths.
    pub task_average: BTreeMap<String, f64>,
    /// Per length, the mean over tasks (RULER's headline number per length).
    pub length_average: BTreeMap<usize, f64>,
    /// Mean over every task × length.
    pub average: f64,
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        round2(xs.iter().sum::<f64>() / xs.len() as f64)
    }
}

impl Report {
    pub fn new(
        run: &RulerRun,
        id: &RunIdentity,
        assets: &Assets,
        tasks: &[String],
        lengths: &[usize],
        results: Vec<TaskResult>,
    ) -> Self {
        let mut notes = Vec::new();
        let protocol = run.config.protocol();
        let essay_tasks: Vec<&str> = tasks
            .iter()
            .filter(|t| {
                run.config.tasks.get(*t).is_some_and(|g| {
                    matches!(
                        g,
                        RulerGenerator::Niah {
                            type_haystack: HaystackKind::Essay,
                            ..
                        } | RulerGenerator::VariableTracking {
                            type_haystack: HaystackKind::Essay,
                            ..
                        }
                    )
                })
            })
            .map(String::as_str)
            .collect();
        match protocol {
            Protocol::Ruler if assets.essay_source == "built-in" && !essay_tasks.is_empty() => {
                notes.push(format!(
                    "not comparable: {} draw from the built-in public-domain essays, not RULER's Paul Graham essays: pass --essays PaulGrahamEssays.json (written by RULER's download_paulgraham_essay.py)",
                    essay_tasks.join(", ")
                ))
            }
            Protocol::Ruler => {}
            Protocol::Wildlong => notes.push(
                "not comparable: protocol `wildlong` (inputs filled to within ~1% of the length, per-sample seeds, needles at varied depths): pass --protocol ruler with RULER's sources (--essays, --qa-squad, --qa-hotpotqa) for numbers comparable with published RULER results".into(),
            ),
        }
        for (name, set) in [("qa_1", &assets.squad), ("qa_2", &assets.hotpotqa)] {
            if set.source == "built-in" && tasks.iter().any(|t| t == name) {
                notes.push(format!(
                    "{name} uses wildlong's small built-in QA set ({} questions over {} documents; documents repeat at long lengths), not RULER's SQuAD/HotpotQA: pass --qa-squad/--qa-hotpotqa for numbers comparable with published RULER results",
                    set.qas.len(),
                    set.docs.len()
                ));
            }
        }
        let qa_desc = |s: &crate::eval::ruler::data::QaSet| {
            format!("{} (sha256 {})", s.source, &s.sha256[..16])
        };
        let mut r = Self {
            tool: format!("wildlong {}", env!("CARGO_PKG_VERSION")),
            model: run.model.clone(),
            adapter: run.adapter.clone(),
            template: id.template.clone(),
            rope: id.rope.clone(),
            weights: format!("{} / {}", id.weights, id.dtype),
            seed: run.config.seed,
            samples_per_task: run.config.samples,
            lengths: lengths.to_vec(),
            tasks: tasks.to_vec(),
            protocol: protocol.name().to_string(),
            essay_haystack: match (protocol, assets.essay_source.as_str()) {
                (Protocol::Ruler, "built-in") | (Protocol::Wildlong, _) => ESSAY_SOURCE.to_string(),
                (Protocol::Ruler, file) => {
                    format!("{file} (sha256 {})", &assets.essay_sha256[..16])
                }
            },
            qa_squad: qa_desc(&assets.squad),
            qa_hotpotqa: qa_desc(&assets.hotpotqa),
            notes,
            results,
            task_average: BTreeMap::new(),
            length_average: BTreeMap::new(),
            average: 0.0,
        };
        r.compute_averages();
        r
    }

    pub fn compute_averages(&mut self) {
        self.task_average = self
            .tasks
            .iter()
            .map(|t| (t.clone(), mean(&self.scores_where(|r| &r.task == t))))
            .collect();
        self.length_average = self
            .lengths
            .iter()
            .map(|&l| (l, mean(&self.scores_where(|r| r.length == l))))
            .collect();
        self.average = mean(&self.scores_where(|_| true));
    }

    fn scores_where(&self, f: impl Fn(&TaskResult) -> bool) -> Vec<f64> {
        self.results
            .iter()
            .filter(|r| f(r))
            .map(|r| r.score)
            .collect()
    }

    pub fn score(&self, task: &str, length: usize) -> Option<f64> {
        self.results
            .iter()
            .find(|r| r.task == task && r.length == length)
            .map(|r| r.score)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a wildlong RULER report", path.display()))
    }

    pub fn markdown(&self) -> String {
        let mut s = String::from("# RULER\n\n");
        let adapter = self.adapter.as_deref().unwrap_or("none");
        s.push_str(&format!(
            "- model: `{}`, adapter: `{adapter}`\n- protocol: `{}`\n- template: {}\n- weights: {}\n- RoPE: `{}`\n- seed {}, {} samples per task and length, greedy decoding\n- essay haystack: {}\n- QA: SQuAD {}; HotpotQA {}\n- {}\n",
            self.model,
            if self.protocol.is_empty() { "wildlong" } else { &self.protocol },
            self.template,
            self.weights,
            serde_json::to_string(&self.rope).unwrap_or_default(),
            self.seed,
            self.samples_per_task,
            self.essay_haystack,
            self.qa_squad,
            self.qa_hotpotqa,
            self.tool
        ));
        for n in &self.notes {
            s.push_str(&format!("- note: {n}\n"));
        }
        s.push('\n');
        s.push_str(&self.table(|t, l| self.score(t, l).map(|x| format!("{x:.2}"))));
        s
    }

    /// A task × length markdown table with averages; `cell` formats one score.
    fn table(&self, cell: impl Fn(&str, usize) -> Option<String>) -> String {
        let mut s = String::from("| Task |");
        for l in &self.lengths {
            s.push_str(&format!(" {l} |"));
        }
        s.push_str(" Avg |\n|---|");
        s.push_str(&"---:|".repeat(self.lengths.len() + 1));
        s.push('\n');
        for t in &self.tasks {
            s.push_str(&format!("| {t} |"));
            for &l in &self.lengths {
                s.push_str(&format!(" {} |", cell(t, l).unwrap_or_else(|| "–".into())));
            }
            s.push_str(&format!(
                " {:.2} |\n",
                self.task_average.get(t).copied().unwrap_or(0.0)
            ));
        }
        s.push_str("| **Average** |");
        for l in &self.lengths {
            s.push_str(&format!(" **{:.2}** |", self.length_average[l]));
        }
        s.push_str(&format!(" **{:.2}** |\n", self.average));
        s
    }

    pub fn csv(&self) -> String {
        let mut s = String::from("task");
        for l in &self.lengths {
            s.push_str(&format!(",{l}"));
        }
        s.push_str(",avg\n");
        for t in &self.tasks {
            s.push_str(t);
            for &l in &self.lengths {
                match self.score(t, l) {
                    Some(x) => s.push_str(&format!(",{x:.2}")),
                    None => s.push(','),
                }
            }
            s.push_str(&format!(",{:.2}\n", self.task_average[t]));
        }
        s.push_str("average");
        for l in &self.lengths {
            s.push_str(&format!(",{:.2}", self.length_average[l]));
        }
        s.push_str(&format!(",{:.2}\n", self.average));
        s
    }

    /// Score against length, one line per task and a thick one for the average.
    pub fn svg(&self) -> Result<String> {
        use plotters::prelude::*;
        let mut buf = String::new();
        {
            let root = SVGBackend::with_string(&mut buf, (960, 560)).into_drawing_area();
            root.fill(&WHITE).map_err(plot_err)?;
            // The legend gets its own column so it never hides a line.
            let (root, legend) = root.split_horizontally(780);
            let xs: Vec<f64> = self.lengths.iter().map(|&l| (l as f64).log2()).collect();
            let (x0, x1) = (
                xs.first().copied().unwrap_or(0.0) - 0.3,
                xs.last().copied().unwrap_or(1.0) + 0.3,
            );
            let mut chart = ChartBuilder::on(&root)
                .caption(format!("RULER: {}", self.model), ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(50)
                .build_cartesian_2d(x0..x1, 0f64..100f64)
                .map_err(plot_err)?;
            let lengths = self.lengths.clone();
            chart
                .configure_mesh()
                .x_desc("length (tokens)")
                .y_desc("score")
                .x_labels(lengths.len().max(2))
                .x_label_formatter(&|x| {
                    let l = 2f64.powf(*x).round() as usize;
                    match lengths.iter().find(|&&k| k == l) {
                        Some(_) if l >= 1024 => format!("{}K", l / 1024),
                        Some(_) => l.to_string(),
                        None => String::new(),
                    }
                })
                .draw()
                .map_err(plot_err)?;
            let mut entries = Vec::new();
            for (i, t) in self.tasks.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                let pts: Vec<(f64, f64)> = self
                    .lengths
                    .iter()
                    .zip(&xs)
                    .filter_map(|(&l, &x)| self.score(t, l).map(|s| (x, s)))
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                    .map_err(plot_err)?;
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(plot_err)?;
                entries.push((t.clone(), color.stroke_width(2)));
            }
            let avg: Vec<(f64, f64)> = self
                .lengths
                .iter()
                .zip(&xs)
                .map(|(l, &x)| (x, self.length_average[l]))
                .collect();
            chart
                .draw_series(LineSeries::new(avg, BLACK.stroke_width(4)))
                .map_err(plot_err)?;
            entries.push(("average".into(), BLACK.stroke_width(4)));
            for (i, (name, style)) in entries.into_iter().enumerate() {
                let y = 50 + 20 * i as i32;
                legend
                    .draw(&PathElement::new(vec![(10, y), (34, y)], style))
                    .map_err(plot_err)?;
                legend
                    .draw(&Text::new(name, (42, y - 6), ("sans-serif", 13)))
                    .map_err(plot_err)?;
            }
            root.present().map_err(plot_err)?;
        }
        Ok(buf)
    }

    /// Writes `report.{json,md,csv,svg}` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(
            &dir.join("report.json"),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )?;
        write_atomic(&dir.join("report.md"), self.markdown().as_bytes())?;
        write_atomic(&dir.join("report.csv"), self.csv().as_bytes())?;
        write_atomic(&dir.join("report.svg"), self.svg()?.as_bytes())?;
        Ok(())
    }

    /// Markdown table of this report's scores with the change from `base` (before → after).
    pub fn delta(&self, base: &Report) -> String {
        let mut s = format!(
            "# RULER: `{}` versus baseline `{}`\n\nEach cell: score (change from the baseline).\n\n",
            self.label(),
            base.label()
        );
        let fmt = |new: Option<f64>, old: Option<f64>| match (new, old) {
            (Some(n), Some(o)) => Some(format!("{n:.2} ({:+.2})", round2(n - o))),
            (Some(n), None) => Some(format!("{n:.2} (new)")),
            _ => None,
        };
        let mut t = self.table(|task, l| fmt(self.score(task, l), base.score(task, l)));
        // The averages are re-rendered with their deltas.
        let last = t.trim_end().rfind('\n').map(|i| i + 1).unwrap_or(0);
        t.truncate(last);
        t.push_str("| **Average** |");
        for l in &self.lengths {
            let cell = fmt(
                self.length_average.get(l).copied(),
                base.length_average.get(l).copied(),
            )
            .unwrap_or_default();
            t.push_str(&format!(" **{cell}** |"));
        }
        t.push_str(&format!(
            " **{:.2} ({:+.2})** |\n",
            self.average,
            round2(self.average - base.average)
        ));
        s.push_str(&t);
        s
    }

    fn label(&self) -> String {
        match &self.adapter {
            Some(a) => format!("{} + {a}", self.model),
            None => self.model.clone(),
        }
    }
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e:?}")
}
