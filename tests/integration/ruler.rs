//! RULER evaluation: samples fit and fill their length with the real tokenizer and chat
//! template, needles sit at their depths, gold answers occur in the context and distractors
//! don't collide with them; the scorers match RULER's definitions; same seed, same samples;
//! a killed evaluation resumes; end to end on the default model at 1K, 2K and 4K.

use crate::common::*;
use std::path::Path;
use wildlong::engine::config::EngineConfig;
use wildlong::eval::ruler::config::{Protocol, RulerConfig, RulerGenerator};
use wildlong::eval::ruler::data::Assets;
use wildlong::eval::ruler::report::Report;
use wildlong::eval::ruler::run::{prepare_samples, Prediction};
use wildlong::eval::ruler::score::{postprocess, sample_score, score};
use wildlong::eval::ruler::synth::{depths, zeta, PromptFormat, Sample};
use wildlong::eval::ruler::tasks::{Metric, RULER_TASKS};
use wildlong::models::{locate, resolve, Located};
use wildlong::records::read_jsonl_resumable;

fn located() -> &'static Located {
    static L: std::sync::OnceLock<Located> = std::sync::OnceLock::new();
    L.get_or_init(|| {
        let files = resolve(
            default_model_path().to_str().unwrap(),
            &root().join("models"),
        )
        .unwrap();
        locate(files, &EngineConfig::default()).unwrap()
    })
}

fn assets() -> &'static Assets {
    static A: std::sync::OnceLock<Assets> = std::sync::OnceLock::new();
    A.get_or_init(|| Assets::load(None, None).unwrap())
}

fn samples(
    task: &str,
    length: usize,
    seed: u64,
    n: usize,
    cache: &Path,
) -> (Vec<Sample>, RulerGenerator) {
    let l = located();
    let format = PromptFormat {
        tokenizer: &l.tokenizer,
        chat: l.chat_template.as_ref(),
    };
    let cfg = RulerConfig::builtin();
    let generator = cfg.tasks[task].clone();
    let s = prepare_samples(
        assets(),
        &format,
        &format.fingerprint().unwrap(),
        Protocol::Wildlong,
        task,
        &generator,
        length,
        seed,
        n,
        cache,
    )
    .unwrap();
    (s, generator)
}

#[test]
fn builtin_task_table_is_rulers_thirteen() {
    let cfg = RulerConfig::builtin();
    cfg.validate().unwrap();
    let mut names: Vec<&str> = cfg.tasks.keys().map(String::as_str).collect();
    names.sort();
    let mut want = RULER_TASKS.to_vec();
    want.sort();
    assert_eq!(names, want);
    assert_eq!(cfg.lengths, [131072, 65536, 32768, 16384, 8192, 4096]);
    assert_eq!((cfg.samples, cfg.seed), (500, 42));
    let tg = |t: &str| wildlong::eval::ruler::tasks::tokens_to_generate(&cfg.tasks[t]);
    assert_eq!(
        [
            tg("niah_single_1"),
            tg("vt"),
            tg("cwe"),
            tg("fwe"),
            tg("qa_1")
        ],
        [128, 30, 120, 50, 32]
    );
}

#[test]
fn task_config_rejects_unknown_keys_naming_file_and_key() {
    let d = tempdir();
    let p = d.path().join("ruler.toml");
    std::fs::write(
        &p,
        "lengths = [4096]\nsamples = 2\nseed = 1\n[tasks.vt]\ntask = \"variable_tracking\"\ntype_haystack = \"noise\"\nnum_chains = 1\nnum_hops = 4\nnum_hopz = 3\n",
    )
    .unwrap();
    let e = format!("{:#}", RulerConfig::from_toml_file(&p).unwrap_err());
    assert!(e.contains("ruler.toml") && e.contains("num_hopz"), "{e}");
}

#[test]
fn depth_grid_is_numpy_linspace_rounded() {
    // np.round(np.linspace(0, 100, num=40)).astype(int)
    let want = [
        0, 3, 5, 8, 10, 13, 15, 18, 21, 23, 26, 28, 31, 33, 36, 38, 41, 44, 46, 49, 51, 54, 56, 59,
        62, 64, 67, 69, 72, 74, 77, 79, 82, 85, 87, 90, 92, 95, 97, 100,
    ];
    assert_eq!(depths(), want);
    // scipy.special.zeta(2.0) = pi^2 / 6, zeta(3.0) = 1.2020569031595942
    assert!((zeta(2.0) - std::f64::consts::PI.powi(2) / 6.0).abs() < 1e-12);
    assert!((zeta(3.0) - 1.2020569031595942).abs() < 1e-12);
}

#[test]
fn scorers_reproduce_rulers_definitions() {
    let r = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let all = Metric::StringMatchAll;
    let part = Metric::StringMatchPart;
    // string_match_all: mean over references of `r.lower() in pred.lower()`.
    assert_eq!(
        sample_score(all, "The numbers are 123 and 456", &r(&["123", "456"])),
        1.0
    );
    assert_eq!(
        sample_score(all, "only 123", &r(&["123", "456", "789", "000"])),
        0.25
    );
    assert_eq!(sample_score(all, "APPLE pie", &r(&["apple"])), 1.0);
    // string_match_part: any reference matched counts fully.
    assert_eq!(
        sample_score(
            part,
            "Askeby, probably",
            &r(&["Askeby", "the city of Askeby"])
        ),
        1.0
    );
    assert_eq!(
        sample_score(part, "Vienna", &r(&["Askeby", "Grevbrook"])),
        0.0
    );
    // lm-evaluation-harness's port scores the fraction of references found (0.5 here);
    // RULER scores 1.
    let refs = r(&["Karsk", "the Karsk quarry"]);
    let pred = "from Karsk";
    let lm_eval_port =
        refs.iter().filter(|x| pred.contains(x.as_str())).count() as f64 / refs.len() as f64;
    assert_eq!(lm_eval_port, 0.5);
    assert_eq!(sample_score(part, pred, &refs), 1.0);
    // Task scores: mean × 100, two decimals (RULER's round(score, 2)).
    let preds = r(&["a b", "a", "c"]);
    let refs = vec![r(&["a", "b"]), r(&["a", "b"]), r(&["a", "b", "c"])];
    assert_eq!(score(all, &preds, &refs), 61.11); // (1 + 0.5 + 1/3) / 3
    assert_eq!(score(part, &preds, &refs), 100.0);
    assert_eq!(score(all, &[], &[]), 0.0);
    // postprocess_pred: strip, control characters → newlines, strip.
    assert_eq!(postprocess("  7\t1\x0b2 \n"), "7\n1\n2");
}

/// Within 2% of the length, or two haystack units (one document for QA can be long).
fn fill_tolerance(s: &Sample, length: usize) -> usize {
    let per_unit = s.prompt_tokens / s.haystack_units.max(1);
    (length / 50).max(2 * per_unit)
}

#[test]
fn samples_fit_fill_and_hold_their_answers() {
    let cache = tempdir();
    let l = located();
    let format = PromptFormat {
        tokenizer: &l.tokenizer,
        chat: l.chat_template.as_ref(),
    };
    for length in [1024, 2048, 4096] {
        for task in RULER_TASKS {
            let (ss, generator) = samples(task, length, 7, 3, cache.path());
            let tg = wildlong::eval::ruler::tasks::tokens_to_generate(&generator);
            for s in &ss {
                let what = format!("{task} @ {length} #{}", s.index);
                // Fits, counted again with the real tokenizer and chat template.
                let n = format.tokens(&s.input, &s.answer_prefix).unwrap().len();
                assert_eq!(n, s.prompt_tokens, "{what}");
                assert_eq!(s.length, n + tg, "{what}");
                assert!(s.length <= length, "{what}: {} > {length}", s.length);
                let tol = fill_tolerance(s, length);
                assert!(
                    s.length + tol >= length,
                    "{what}: fills {} of {length} (tolerance {tol})",
                    s.length
                );
                // Every gold answer is in the context.
                for o in &s.outputs {
                    assert!(
                        s.input.contains(o.as_str()),
                        "{what}: `{o}` not in the input"
                    );
                }
                check_task_structure(task, s, &what);
            }
        }
    }
}

fn check_task_structure(task: &str, s: &Sample, what: &str) {
    let count = |needle: &str| s.input.matches(needle).count();
    if task.starts_with("niah") {
        // Each gold value is stated exactly once, by its own needle: no distractor collides.
        for o in &s.outputs {
            assert_eq!(count(&format!("is: {o}.")), 1, "{what}: `{o}`");
            assert_eq!(count(o), 1, "{what}: `{o}` appears elsewhere");
        }
        let needles = s.input.matches("One of the special magic").count();
        assert!(!s.depths.is_empty(), "{what}: no depths recorded");
        assert!(s.depths.iter().all(|d| depths().contains(d)), "{what}");
        let haystack_is_lines = matches!(
            task,
            "niah_single_1" | "niah_multikey_2" | "niah_multikey_3"
        );
        if task == "niah_single_1" {
            assert_eq!(needles, 1, "{what}");
        }
        // Needles sit at their depths: the line index (noise/needle haystacks) or the
        // character offset (essay) as a fraction of the context.
        let start = s.input.find('\n').unwrap() + 1;
        let end = s.input.rfind('\n').unwrap();
        let context = &s.input[start..end];
        let mut gold_needles: Vec<(usize, usize)> = Vec::new();
        for o in &s.outputs {
            let at = context.find(&format!("is: {o}.")).unwrap();
            let line = context[..at].matches('\n').count();
            gold_needles.push((at, line));
        }
        if haystack_is_lines {
            let lines = context.matches('\n').count() + 1;
            let units = s.haystack_units;
            assert_eq!(lines, units + s.depths.len(), "{what}");
            let (_, line) = gold_needles[0];
            let want = units * s.depths[0] as usize / 100;
            assert_eq!(
                line, want,
                "{what}: needle on line {line}, depth {}%",
                s.depths[0]
            );
        } else if s.depths.len() == 1 {
            // Essay: the needle goes between sentences, after floor(sentences × depth / 100).
            use wildlong::eval::ruler::data::sentences;
            let (at, _) = gold_needles[0];
            let needle_start = context[..at].rfind("One of the special magic").unwrap();
            let needle_end = at + context[at..].find('.').unwrap() + 1;
            let without = format!(
                "{}{}",
                &context[..needle_start],
                context[needle_end..].trim_start()
            );
            let total = sentences(&without).len();
            let before = sentences(&context[..needle_start]).len();
            let want = total * s.depths[0] as usize / 100;
            assert_eq!(
                before, want,
                "{what}: needle after sentence {before} of {total}, depth {}%",
                s.depths[0]
            );
        }
    } else if task == "cwe" {
        // The 10 gold words are the most common; every other word is rarer.
        let list = s.input.rsplit("Below is a numbered list").next().unwrap();
        let mut freq = std::collections::HashMap::new();
        for item in list.split(". ").skip(1) {
            let w = item.rsplit_once(' ').map(|(w, _)| w).unwrap_or(item);
            *freq.entry(w.trim().to_string()).or_insert(0usize) += 1;
        }
        let min_gold = s.outputs.iter().map(|o| freq[o]).min().unwrap();
        let max_other = freq
            .iter()
            .filter(|(w, _)| !s.outputs.contains(w))
            .map(|(_, c)| *c)
            .max()
            .unwrap();
        assert!(
            min_gold > max_other,
            "{what}: gold {min_gold} vs other {max_other}"
        );
    } else if task == "fwe" {
        let words: Vec<&str> = s.input.split_whitespace().collect();
        let c = |w: &str| words.iter().filter(|x| **x == w).count();
        let gold: Vec<usize> = s.outputs.iter().map(|o| c(o)).collect();
        assert!(
            gold[0] >= gold[1] && gold[1] >= gold[2] && gold[2] > 0,
            "{what}: {gold:?}"
        );
    } else if task == "vt" {
        // The chain: VAR out[0] = value, VAR out[i+1] = VAR out[i].
        for w in s.outputs.windows(2) {
            assert_eq!(count(&format!("VAR {} = VAR {} ", w[1], w[0])), 1, "{what}");
        }
    }
}

#[test]
fn same_seed_same_samples_other_seed_other_samples() {
    let (a, b, c) = (tempdir(), tempdir(), tempdir());
    for task in ["niah_multikey_3", "vt", "cwe", "fwe", "qa_2"] {
        let (x, _) = samples(task, 1024, 42, 2, a.path());
        let (y, _) = samples(task, 1024, 42, 2, b.path());
        let (z, _) = samples(task, 1024, 43, 2, c.path());
        let h = |v: &[Sample]| v.iter().map(|s| s.hash.clone()).collect::<Vec<_>>();
        assert_eq!(h(&x), h(&y), "{task}");
        assert_ne!(h(&x), h(&z), "{task}");
        // More samples later: the first ones are unchanged (served from the cache).
        let (more, _) = samples(task, 1024, 42, 3, b.path());
        assert_eq!(h(&more[..2]), h(&x), "{task}");
    }
}

#[test]
fn killed_evaluation_resumes_without_losing_or_duplicating() {
    let _limit = time_limit(8);
    let d = tempdir();
    let out = d.path().join("eval");
    let cache = d.path().join("cache");
    let args = [
        "eval",
        "ruler",
        "--model",
        "default",
        "--lengths",
        "512",
        "--tasks",
        "niah_single_1",
        "--samples",
        "3",
        "--batch-size",
        "1",
        "--no-progress",
        "--out",
        out.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    let mut child = wildlong(&args).spawn().unwrap();
    let first = out.join("512/niah_single_1/pred.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&first)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 1
    {
        assert!(
            t0.elapsed().as_secs() < 600,
            "no prediction after 10 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = std::fs::read_to_string(&first).unwrap();
    let kept: Vec<String> = before.lines().map(String::from).collect();
    assert!(!kept.is_empty() && kept.len() < 3);
    // A write torn by the kill.
    let mut torn = before.clone();
    torn.push_str("{\"index\": 2, \"hash\": \"ab");
    std::fs::write(&first, torn).unwrap();

    let stdout = ok(&wildlong(&args).output().unwrap());
    assert!(stdout.contains("| niah_single_1 |"), "{stdout}");
    let preds: Vec<Prediction> = read_jsonl_resumable(&first).unwrap();
    let mut idx: Vec<usize> = preds.iter().map(|p| p.index).collect();
    idx.sort();
    assert_eq!(idx, [0, 1, 2], "{idx:?}");
    let after = std::fs::read_to_string(&first).unwrap();
    assert!(
        after.starts_with(&kept.join("\n")),
        "earlier predictions were rewritten"
    );
    // A rerun generates nothing and gives the same report.
    let r1 = std::fs::read_to_string(out.join("report.json")).unwrap();
    ok(&wildlong(&args).output().unwrap());
    assert_eq!(std::fs::read_to_string(&first).unwrap(), after);
    let r2 = std::fs::read_to_string(out.join("report.json")).unwrap();
    assert_eq!(r1, r2);
    // Another model's run into the same folder is refused.
    let other = tiny_fixture("llama3");
    let mut a2: Vec<&str> = args.to_vec();
    a2[3] = other.path().to_str().unwrap();
    a2.push("--no-chat-template");
    let o = wildlong(&a2).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("another model"));
}

#[test]
fn end_to_end_on_the_default_model_at_1k() {
    let _limit = time_limit(10);
    let d = tempdir();
    let out = d.path().join("eval");
    let stdout = ok(&wildlong(&[
        "eval",
        "ruler",
        "--model",
        "default",
        "--lengths",
        "1024",
        "--tasks",
        "all",
        "--samples",
        "1",
        "--no-progress",
        "--out",
        out.to_str().unwrap(),
        "--cache-dir",
        d.path().join("cache").to_str().unwrap(),
    ])
    .output()
    .unwrap());
    for f in ["report.json", "report.md", "report.csv", "report.svg"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let r = Report::load(&out.join("report.json")).unwrap();
    assert_eq!(r.lengths, [1024]);
    assert_eq!(r.tasks, RULER_TASKS);
    assert_eq!(r.results.len(), 13);
    assert_eq!((r.seed, r.samples_per_task), (42, 1));
    assert!(r.tool.starts_with("wildlong "));
    assert!(r.template.contains("chat template"));
    assert_eq!(r.rope["theta"], 100000.0);
    assert_eq!(r.model, "default");
    assert!(r.notes.iter().any(|n| n.contains("built-in QA set")));
    // Each score is what RULER's scorer gives on the saved predictions.
    for res in &r.results {
        let p: Vec<Prediction> =
            read_jsonl_resumable(&out.join(format!("{}/{}/pred.jsonl", res.length, res.task)))
                .unwrap();
        let preds: Vec<String> = p.iter().map(|p| postprocess(&p.pred)).collect();
        let refs: Vec<Vec<String>> = p.iter().map(|p| p.outputs.clone()).collect();
        assert_eq!(res.score, score(res.metric, &preds, &refs), "{}", res.task);
    }
    // The averages are the means of the per-task numbers.
    let mean = |xs: Vec<f64>| (xs.iter().sum::<f64>() / xs.len() as f64 * 100.0).round() / 100.0;
    for t in &r.tasks {
        let xs = r
            .results
            .iter()
            .filter(|x| &x.task == t)
            .map(|x| x.score)
            .collect();
        assert_eq!(r.task_average[t], mean(xs), "{t}");
    }
    for l in &r.lengths {
        let xs = r
            .results
            .iter()
            .filter(|x| x.length == *l)
            .map(|x| x.score)
            .collect();
        assert_eq!(r.length_average[l], mean(xs), "{l}");
    }
    assert_eq!(r.average, mean(r.results.iter().map(|x| x.score).collect()));
    // The markdown table printed and saved shows the same numbers.
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(stdout.contains(&md));
    assert!(md.contains(&format!("**{:.2}**", r.average)));
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    assert_eq!(csv.lines().count(), 15);
    assert!(csv.starts_with("task,1024,avg\n"));
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("niah_single_1") && svg.contains("1K"));

    // Before/after: the delta table against a baseline with known shifts.
    let mut base = r.clone();
    for x in &mut base.results {
        x.score = (x.score - 10.0).max(0.0);
    }
    base.compute_averages();
    let bpath = d.path().join("base.json");
    std::fs::write(&bpath, serde_json::to_string(&base).unwrap()).unwrap();
    let delta = ok(&wildlong(&[
        "eval",
        "compare",
        out.join("report.json").to_str().unwrap(),
        bpath.to_str().unwrap(),
    ])
    .output()
    .unwrap());
    let s1 = r.score("niah_single_1", 1024).unwrap();
    let b1 = base.score("niah_single_1", 1024).unwrap();
    assert!(
        delta.contains(&format!("{s1:.2} ({:+.2})", s1 - b1)),
        "{delta}"
    );
    assert!(delta.contains(&format!(
        "{:+.2}",
        ((r.average - base.average) * 100.0).round() / 100.0
    )));
}

#[test]
fn qa_files_in_squad_and_hotpotqa_shape_are_read_like_ruler() {
    use wildlong::eval::ruler::config::QaDataset;
    use wildlong::eval::ruler::data::read_qa;
    let squad = serde_json::json!({"data": [{"title": "t", "paragraphs": [
        {"context": "Para one about Zed.", "qas": [
            {"question": "Who?", "is_impossible": false, "answers": [{"text": "Zed", "answer_start": 15}]},
            {"question": "Nobody?", "is_impossible": true, "answers": []}]},
        {"context": "Para two.", "qas": []}]}]});
    let s = read_qa(&squad.to_string(), QaDataset::Squad, "test").unwrap();
    assert_eq!(s.docs, ["Para one about Zed.", "Para two."]);
    assert_eq!(s.qas.len(), 1, "unanswerable questions are dropped");
    assert_eq!(
        (s.qas[0].context.clone(), s.qas[0].more_context.clone()),
        (vec![0], vec![1])
    );
    let hotpot = serde_json::json!([{"question": "Q?", "answer": "A",
        "context": [["T1", ["s1. ", "s2."]], ["T2", ["x."]]]}]);
    let h = read_qa(&hotpot.to_string(), QaDataset::Hotpotqa, "test").unwrap();
    assert_eq!(h.docs, ["T1\ns1. s2.", "T2\nx."]);
    assert_eq!(h.qas[0].context, [0, 1]);
    let e = format!(
        "{:#}",
        read_qa("{\"data\": 3}", QaDataset::Squad, "x").unwrap_err()
    );
    assert!(e.contains("data"), "{e}");
}

#[test]
fn data_files_resolve_from_an_hf_dataset_cache() {
    let home = tempdir();
    let repo = home.path().join("hub/datasets--acme--qa");
    let sha = "89abcdef0123456789abcdef0123456789abcdef";
    let snap = repo.join("snapshots").join(sha).join("dev");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    std::fs::write(snap.join("squad.json"), "{}").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wildlong"))
        .args([
            "eval",
            "ruler",
            "--model",
            "/nonexistent/model.gguf",
            "--qa-squad",
            "hf://datasets/acme/qa/dev/squad.json",
        ])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    // The file is found in the cache and read: it is not a SQuAD file.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("snapshots/89abcdef") && err.contains("data"),
        "{err}"
    );
}

#[test]
fn ruler_protocol_runs_end_to_end_on_rulers_essay_file_format() {
    let _limit = time_limit(10);
    let d = tempdir();
    // RULER's PaulGrahamEssays.json shape ({"text": …}), here 3,000 words of the built-in essays.
    let words: Vec<&str> = assets().essay_text.split_whitespace().take(3000).collect();
    let essays = d.path().join("PaulGrahamEssays.json");
    std::fs::write(
        &essays,
        serde_json::json!({ "text": words.join(" ") }).to_string(),
    )
    .unwrap();
    let out = d.path().join("eval");
    let run = |protocol: &str, out: &Path| {
        ok(&wildlong(&[
            "eval",
            "ruler",
            "--model",
            "default",
            "--protocol",
            protocol,
            "--essays",
            essays.to_str().unwrap(),
            "--lengths",
            "1024",
            "--tasks",
            "niah_single_2,vt",
            "--samples",
            "1",
            "--no-progress",
            "--out",
            out.to_str().unwrap(),
            "--cache-dir",
            d.path().join("cache").to_str().unwrap(),
        ])
        .output()
        .unwrap())
    };
    let md = run("ruler", &out);
    let r = Report::load(&out.join("report.json")).unwrap();
    assert_eq!(r.protocol, "ruler");
    assert!(md.contains("- protocol: `ruler`"), "{md}");
    assert!(
        r.essay_haystack.contains("PaulGrahamEssays.json"),
        "{}",
        r.essay_haystack
    );
    assert!(
        !r.notes.iter().any(|n| n.contains("not comparable")),
        "{:?}",
        r.notes
    );
    // RULER's `base` template by default under its protocol.
    assert!(r.template.starts_with("base"), "{}", r.template);
    // The CLI's samples are the official generator's for the same file, template and seed.
    let l = located();
    let format = PromptFormat {
        tokenizer: &l.tokenizer,
        chat: None,
    };
    let a = Assets::load(None, None)
        .unwrap()
        .with_essays(&essays)
        .unwrap();
    let cfg = RulerConfig::builtin();
    for task in ["niah_single_2", "vt"] {
        let want = wildlong::eval::ruler::official::samples(
            &a,
            &format,
            task,
            &cfg.tasks[task],
            1024,
            42,
            1,
        )
        .unwrap();
        let got: Vec<Sample> =
            read_jsonl_resumable(&out.join(format!("1024/{task}/data.jsonl"))).unwrap();
        assert_eq!(got, want, "{task}");
        assert!(got[0].length <= 1024, "{task}");
    }
    let essay_sample: Vec<Sample> =
        read_jsonl_resumable(&out.join("1024/niah_single_2/data.jsonl")).unwrap();
    // The haystack is the file's text (RULER's whitespace split, Punkt's sentences).
    assert!(essay_sample[0].input.contains(&words[5..40].join(" ")));
    // The wildlong protocol draws other samples, and its report says it is not comparable.
    let other = d.path().join("eval-wildlong");
    run("wildlong", &other);
    let w = Report::load(&other.join("report.json")).unwrap();
    assert_eq!(w.protocol, "wildlong");
    assert!(w.template.contains("chat template"), "{}", w.template);
    assert!(w
        .notes
        .iter()
        .any(|n| n.contains("not comparable: protocol `wildlong`")));
    let ws: Vec<Sample> =
        read_jsonl_resumable(&other.join("1024/niah_single_2/data.jsonl")).unwrap();
    let rs: Vec<Sample> = read_jsonl_resumable(&out.join("1024/niah_single_2/data.jsonl")).unwrap();
    assert_ne!(ws[0].input, rs[0].input);
}

#[test]
fn protocol_defaults_to_ruler_only_with_rulers_sources_and_bad_essays_are_named() {
    use wildlong::eval::ruler::config::Protocol;
    let mut c = RulerConfig::builtin();
    assert_eq!(c.protocol(), Protocol::Wildlong);
    c.essays = Some("e.json".into());
    c.qa_squad = Some("s.json".into());
    assert_eq!(c.protocol(), Protocol::Wildlong, "one QA file missing");
    c.qa_hotpotqa = Some("h.json".into());
    assert_eq!(c.protocol(), Protocol::Ruler);
    c.protocol = Some(Protocol::Wildlong);
    assert_eq!(c.protocol(), Protocol::Wildlong, "an explicit choice wins");

    let d = tempdir();
    let bad = d.path().join("essays.json");
    std::fs::write(&bad, "[1, 2]").unwrap();
    let e = format!(
        "{:#}",
        Assets::load(None, None)
            .unwrap()
            .with_essays(&bad)
            .err()
            .unwrap()
    );
    assert!(e.contains("essays.json") && e.contains("\"text\""), "{e}");
}
