//! The run's summary: `<run>/report.md` and `<run>/report.svg`, built from the files the
//! steps wrote (so a rerun that skips every step writes the same report).

use crate::eval::ruler::report::Report;
use crate::layout::{stage1 as s1, stage2 as s2, train as tr, RunLayout};
use crate::pipeline::config::PipelineConfig;
use crate::pipeline::{read_state, Step};
use crate::records::write_atomic;
use crate::stage1::extract::{ExtractStats, FilterReport};
use crate::stage1::graph::TypeSummary;
use crate::stage2::documents::DocumentStats;
use crate::stage2::synth::SynthStats;
use crate::train::run::{DataStats, LogLine, Summary};
use anyhow::Result;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A statistics file a stage wrote, as the stage's own type (absent or unreadable: `None`,
/// and the report leaves its line out).
fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0)
}

/// `{a: 1, b: 2}` → "a 1, b 2" (largest first); "none" when empty.
fn counts(m: &BTreeMap<String, usize>) -> String {
    let mut items: Vec<(&String, usize)> = m.iter().map(|(k, &n)| (k, n)).collect();
    items.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    if items.is_empty() {
        return "none".into();
    }
    items
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The value without its null fields.
fn compact(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, compact(v)))
                .collect(),
        ),
        v => v,
    }
}

/// (step, loss) points.
type Points = Vec<(f64, f64)>;

/// The training log's step losses and evaluation losses.
fn curve(dir: &Path) -> (Points, Points) {
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    let text =
        std::fs::read_to_string(RunLayout::new(dir).stage(tr::DIR, tr::LOG)).unwrap_or_default();
    for l in text.lines() {
        match serde_json::from_str::<LogLine>(l) {
            Ok(LogLine::Train { step, .. }) if !step.skipped => {
                train.push(((step.step + 1) as f64, step.loss))
            }
            Ok(LogLine::Eval { step, loss, .. }) => eval.push((step as f64, loss)),
            _ => {}
        }
    }
    (train, eval)
}

pub fn markdown(cfg: &PipelineConfig, dir: &Path, config_path: &Path) -> Result<String> {
    let mut s = String::new();
    let t = &cfg.train;
    writeln!(s, "# wildlong run: `{}`\n", dir.display())?;
    writeln!(
        s,
        "Config `{}` (resolved: `pipeline/config.toml`). Generator `{}`{}; fine-tuned `{}` ({}{}), RoPE {}.\n",
        config_path.display(),
        cfg.run.generator,
        cfg.server
            .as_ref()
            .map_or(String::new(), |sv| format!(" on {}", sv.base_url)),
        t.model,
        format!("{:?}", t.method).to_lowercase(),
        match t.method {
            crate::train::config::TrainMethod::Lora => format!(", r {}", t.lora.rank),
            crate::train::config::TrainMethod::Full => String::new(),
        },
        match t.rope.is_set() {
            true => compact(serde_json::to_value(&t.rope)?).to_string(),
            false => "as the checkpoint has it".into(),
        }
    )?;
    writeln!(
        s,
        "## Steps\n\n| step | status | seconds | produced |\n|---|---|---:|---|"
    )?;
    for step in Step::ALL.map(Step::name) {
        match read_state(dir, step)? {
            Some(st) => writeln!(
                s,
                "| {step} | {:?} | {:.0} | {} |",
                st.status, st.seconds, st.summary
            )?,
            None => writeln!(s, "| {step} | not run | | |")?,
        }
    }

    let run = RunLayout::new(dir);
    let d1 = run.stage1();
    writeln!(
        s,
        "\n## Stage 1: queries → meta-information → graphs → blueprints\n"
    )?;
    if let Some(f) = read::<FilterReport>(&d1.join(s1::FILTER_STATS)) {
        let (mut rows, mut malformed) = (0, 0);
        for (_, src) in &f.sources {
            rows += src.input.rows;
            malformed += src.input.malformed;
        }
        writeln!(
            s,
            "- Conversations read: {rows} ({malformed} malformed lines skipped). Queries kept: {}; dropped: {}.",
            f.kept,
            counts(&f.dropped)
        )?;
    }
    if let Some(e) = read::<ExtractStats>(&d1.join(s1::EXTRACT_STATS)) {
        writeln!(
            s,
            "- Meta-information records: {} ({} rejected). Document types: {}.",
            e.records,
            e.rejects,
            counts(&e.document_types)
        )?;
    }
    if let Some(g) = read::<Vec<TypeSummary>>(&d1.join(s1::GRAPH_SUMMARY)) {
        writeln!(
            s,
            "- Graphs (`stage1/graph_summary.md`):\n\n| document type | queries | nodes | edges |\n|---|---:|---:|---:|"
        )?;
        for t in &g {
            writeln!(
                s,
                "| {} | {} | {} | {} |",
                t.document_type, t.queries, t.nodes, t.edges
            )?;
        }
        writeln!(s)?;
    }
    if d1.join(s1::PATHS).exists() {
        writeln!(
            s,
            "- Paths sampled: {}; blueprints written: {}.",
            lines(&d1.join(s1::PATHS)),
            lines(&d1.join(s1::BLUEPRINTS))
        )?;
    }

    let d2 = run.stage2();
    writeln!(s, "\n## Stage 2: documents → long-context pairs\n")?;
    if let Some(d) = read::<DocumentStats>(&d2.join(s2::DOCUMENTS_STATS)) {
        let (read, skipped, types) = (d.read, counts(&d.skipped), counts(&d.types));
        writeln!(
            s,
            "- Documents read: {read}; skipped: {skipped}; types: {types}."
        )?;
    }
    if let Some(y) = read::<SynthStats>(&d2.join(s2::SYNTH_STATS)) {
        let rejected = counts(&y.rejected);
        let card = "Dataset card: `stage2/README.md`";
        let (contexts, pairs) = (y.contexts, y.pairs);
        writeln!(
            s,
            "- Contexts: {contexts}; pairs kept: {pairs}; rejected: {rejected}. {card}."
        )?;
    }

    let dt = run.train();
    writeln!(s, "\n## Fine-tuning\n")?;
    if let Some(d) = read::<DataStats>(&dt.join(tr::DATA_STATS)) {
        writeln!(
            s,
            "- Data: {} conversations ({} train, {} held out) in {} rows, {} tokens ({} with loss); skipped: {}.",
            d.conversations,
            d.train_conversations,
            d.eval_conversations,
            d.train_rows,
            d.train_tokens,
            d.train_loss_tokens,
            counts(&d.skipped)
        )?;
    }
    if let Some(m) = read::<Summary>(&dt.join(tr::SUMMARY)) {
        let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.4}"));
        let evals: Vec<String> = m
            .eval_losses
            .iter()
            .map(|&(step, loss)| format!("step {step}: {}", f(Some(loss))))
            .collect();
        writeln!(
            s,
            "- {} steps ({} skipped), loss {} → {}; held-out loss {}; {:.1} tokens/s; peak RSS {} MiB.",
            m.steps,
            m.skipped_steps,
            f(m.first_loss),
            f(m.last_loss),
            if evals.is_empty() { "-".into() } else { evals.join(", ") },
            m.tokens_per_second,
            m.peak_rss_mib.map_or("null".into(), |n| n.to_string())
        )?;
        writeln!(s, "- Training curve: `report.svg` (left).")?;
    }

    writeln!(s, "\n## RULER before and after fine-tuning\n")?;
    let before = Report::load(&RunLayout::new(dir).eval(false).join("report.json")).ok();
    let after = Report::load(&RunLayout::new(dir).eval(true).join("report.json")).ok();
    match (&before, &after) {
        (Some(b), Some(a)) => {
            let d = a.delta(b);
            // The delta's own title is replaced by this section's.
            s.push_str(d.split_once("\n\n").map_or(&d[..], |x| x.1));
            writeln!(
                s,
                "\nAverage {:.2} → {:.2} ({:+.2}); samples per task and length: {}. Per-sample outputs: `eval/before`, `eval/after`.",
                b.average,
                a.average,
                a.average - b.average,
                a.samples_per_task
            )?;
        }
        (Some(b), None) => {
            writeln!(s, "Before (after fine-tuning: not yet evaluated):\n")?;
            s.push_str(&b.markdown());
        }
        _ => writeln!(s, "Not yet evaluated.")?,
    }
    let short = |after: bool| {
        crate::eval::short::run::ShortReport::load(
            &RunLayout::new(dir).eval(after).join("short/report.json"),
        )
        .ok()
    };
    match (short(false), short(true)) {
        (Some(b), Some(a)) => {
            writeln!(s, "\n## Short-context check before and after fine-tuning\n")?;
            s.push_str(&a.delta(&b));
            writeln!(
                s,
                "\nPer-item outputs: `eval/before/short`, `eval/after/short`."
            )?;
        }
        (Some(b), None) => {
            writeln!(
                s,
                "\n## Short-context check (after fine-tuning: not yet evaluated)\n"
            )?;
            s.push_str(&b.markdown());
        }
        _ => {}
    }
    writeln!(s, "\n![training curve and RULER before/after](report.svg)")?;
    Ok(s)
}

/// Left: training loss per step (and held-out loss); right: RULER's average score per
/// length before and after.
pub fn svg(dir: &Path) -> Result<String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Debug| anyhow::anyhow!("drawing the plot: {e:?}");
    let (train, eval) = curve(dir);
    let before = Report::load(&RunLayout::new(dir).eval(false).join("report.json")).ok();
    let after = Report::load(&RunLayout::new(dir).eval(true).join("report.json")).ok();
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (1100, 460)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (left, right) = root.split_horizontally(550);
        let xmax = train
            .iter()
            .chain(&eval)
            .map(|p| p.0)
            .fold(1.0f64, f64::max);
        let ymax = train
            .iter()
            .chain(&eval)
            .map(|p| p.1)
            .filter(|v| v.is_finite())
            .fold(0.1f64, f64::max)
            * 1.1;
        let mut c = ChartBuilder::on(&left)
            .caption("training loss", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)
            .map_err(|e| err(&e))?;
        c.configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()
            .map_err(|e| err(&e))?;
        c.draw_series(LineSeries::new(train.clone(), BLUE.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("train (token mean per step)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        c.draw_series(LineSeries::new(eval.clone(), RED.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("held out")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        c.draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(|e| err(&e))?;
        legend(&mut c)?;

        let lengths: Vec<usize> = before
            .iter()
            .chain(&after)
            .flat_map(|r| r.lengths.iter().copied())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let xs = |l: usize| (l as f64).log2();
        let (x0, x1) = match (lengths.first(), lengths.last()) {
            (Some(&a), Some(&b)) => (xs(a) - 0.3, xs(b) + 0.3),
            _ => (0.0, 1.0),
        };
        let mut c = ChartBuilder::on(&right)
            .caption("RULER average score", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(x0..x1, 0f64..100f64)
            .map_err(|e| err(&e))?;
        let ls = lengths.clone();
        c.configure_mesh()
            .x_desc("length (tokens)")
            .y_desc("score")
            .x_labels(ls.len().max(2))
            .x_label_formatter(&|x| {
                let l = 2f64.powf(*x).round() as usize;
                match ls.iter().find(|&&k| k == l) {
                    Some(_) if l >= 1024 => format!("{}K", l / 1024),
                    Some(_) => l.to_string(),
                    None => String::new(),
                }
            })
            .draw()
            .map_err(|e| err(&e))?;
        for (r, color, name) in [(&before, BLACK, "before"), (&after, GREEN, "after")] {
            let Some(r) = r else { continue };
            let pts: Vec<(f64, f64)> = r.length_average.iter().map(|(&l, &v)| (xs(l), v)).collect();
            c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))
                .map_err(|e| err(&e))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| err(&e))?;
        }
        legend(&mut c)?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(buf)
}

/// A chart's series legend on a translucent white box.
fn legend<'a, DB, CT>(c: &mut plotters::prelude::ChartContext<'a, DB, CT>) -> Result<()>
where
    DB: plotters::prelude::DrawingBackend + 'a,
    CT: plotters::coord::CoordTranslate,
{
    use plotters::prelude::*;
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("drawing the plot: {e:?}"))
}

/// Writes `report.md` and `report.svg` (only when they changed); returns the markdown's path.
pub fn write(cfg: &PipelineConfig, dir: &Path, config_path: &Path) -> Result<PathBuf> {
    for (name, text) in [
        ("report.md", markdown(cfg, dir, config_path)?),
        ("report.svg", svg(dir)?),
    ] {
        let p = dir.join(name);
        if std::fs::read_to_string(&p).ok().as_deref() != Some(&text) {
            write_atomic(&p, text.as_bytes())?;
        }
    }
    Ok(RunLayout::new(dir).report_md())
}
