//! `wildlong eval short`: lm-evaluation-harness's prompts for MMLU, ARC and GSM8K (its task
//! YAMLs, written out by hand here), its metrics on hand-computed cases, log-likelihoods
//! against the model's full logits, and a run of the three tasks on the default model.

use crate::common::*;
use candle_core::D;
use wildlong::engine::llama::full_logits;
use wildlong::eval::short::data::{self, Gold, Task};
use wildlong::eval::short::run::{contexts, encode_pair, task_score, ShortPrediction, ShortReport};
use wildlong::eval::short::score::*;
use wildlong::records::read_jsonl_resumable;

fn items(task: Task, file: &str) -> Vec<data::Item> {
    data::read(task, fixture(file).to_str().unwrap(), None).unwrap()
}

#[test]
fn prompts_are_lm_eval_s_for_mmlu_arc_and_gsm8k() {
    let mmlu = items(Task::Mmlu, "short/mmlu.jsonl");
    let dev = items(Task::Mmlu, "short/mmlu_dev.jsonl");
    assert_eq!(mmlu[2].gold, Gold::Choice(3));
    assert_eq!(mmlu[2].choices, ["A", "B", "C", "D"]);
    // The subject's description, the first dev item of the item's own subject as its
    // example, the question stripped.
    let ctx = contexts(Task::Mmlu, &mmlu, &dev, 1).unwrap();
    assert_eq!(
        ctx[2],
        "The following are multiple choice questions (with answers) about astronomy.\n\n\
         What does the Moon orbit?\nA. Mars\nB. The Sun\nC. Earth\nD. Jupiter\nAnswer: C\n\n\
         Which planet is closest to the Sun?\nA. Venus\nB. Earth\nC. Mars\nD. Mercury\nAnswer:"
    );
    assert!(ctx[1].contains("Which organ pumps blood") && !ctx[1].contains("Carbon"));
    assert!(contexts(Task::Mmlu, &mmlu, &dev, 0).unwrap()[0]
        .starts_with("The following are multiple choice questions (with answers) about high school geography.\n\nWhat"));
    // Two biology examples exist, one geography: two shots are refused for geography.
    let e = contexts(Task::Mmlu, &mmlu, &dev, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("subject `high_school_geography`"), "{e}");
    let arc = items(Task::ArcEasy, "short/arc_easy.jsonl");
    assert_eq!(
        arc[1].text,
        "Question: What happens to water when it freezes?\nAnswer:"
    );
    assert_eq!(arc[1].choices, ["It becomes a gas.", "It becomes ice."]);
    assert_eq!(
        arc[1].gold,
        Gold::Choice(1),
        "answerKey 2 is the second label"
    );
    let gsm = items(Task::Gsm8k, "short/gsm8k.jsonl");
    let train = items(Task::Gsm8k, "short/gsm8k_train.jsonl");
    assert_eq!(
        gsm[0].context(Task::Gsm8k, &train),
        "Question: Ann had 5 coins and found 2 more. How many coins does she have now?\n\
         Answer: She has 5 + 2 = <<5+2=7>>7 coins.\n#### 7\n\n\
         Question: There are 10 birds and 3 fly away. How many are left?\n\
         Answer: 10 - 3 = <<10-3=7>>7 birds are left.\n#### 7\n\n\
         Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"
    );
}

#[test]
fn gsm8k_filters_and_exact_match_follow_lm_eval() {
    let gold = "She pays 2 * 9 = <<2*9=18>>18 dollars.\n#### 1,018";
    // strict-match: the number after the first "#### ".
    assert_eq!(strict_match("so 1018.\n#### 1,018\n#### 5"), "1,018");
    assert_eq!(strict_match("The answer is 1018."), INVALID);
    // flexible-extract: the last number-like run, its non-empty group.
    assert_eq!(flexible_extract("First 12 then $1,018."), "$1,018.");
    assert_eq!(
        flexible_extract("it is 7"),
        "7",
        "the one-digit alternative"
    );
    assert_eq!(flexible_extract("minus -3 and -45"), "-45");
    assert_eq!(flexible_extract("no digits here"), INVALID);
    // exact_match drops ",", "$", everything up to "#### " and a final ".", case folded.
    assert!(exact_match("$1,018.", gold));
    assert!(exact_match("1018", gold));
    assert!(!exact_match("101", gold));
    assert!(!exact_match(INVALID, gold));
    assert!(exact_match("ABC", "abc"));
}

#[test]
fn acc_takes_the_first_best_option_and_acc_norm_divides_by_characters() {
    assert_eq!(argmax(&[-1.0, -0.5, -0.5]), 1);
    let choices = vec!["ab".to_string(), "abcdefgh".to_string()];
    // -4/2 = -2 against -6/8 = -0.75.
    assert_eq!(argmax(&[-4.0, -6.0]), 0);
    assert_eq!(argmax_norm(&[-4.0, -6.0], &choices), 1);
    let arc = items(Task::ArcEasy, "short/arc_easy.jsonl");
    let p = |ll: Vec<f64>| ShortPrediction {
        index: 0,
        hash: String::new(),
        loglik: ll,
        output: String::new(),
    };
    // Item 0 (gold 0, "sunlight"): best raw option 1; per character option 0.
    // Item 1 (gold 1): both metrics right.
    let (a, b) = (p(vec![-9.0, -8.0, -30.0, -30.0]), p(vec![-9.0, -1.0]));
    let s = task_score(Task::ArcEasy, &arc, &[&a, &b], 0);
    assert_eq!(s.metrics["acc"], 50.0);
    assert_eq!(s.metrics["acc_norm"], 100.0);
}

#[test]
fn loglikelihoods_equal_the_full_logits_reference() {
    let e = default_engine();
    let pairs = [
        ("The capital of France is", " Paris"),
        ("The capital of France is", " the city of Paris"),
        ("Question: 2 + 2 =\nAnswer:", " 4"),
        ("Question: 2 + 2 =\nAnswer: ", "4"),
    ];
    let reqs: Vec<(Vec<u32>, Vec<u32>)> = pairs
        .iter()
        .map(|(c, x)| encode_pair(e, c, x).unwrap())
        .collect();
    // lm-eval's _encode_pair moves the context's trailing space into the continuation.
    assert_eq!(reqs[2], reqs[3]);
    assert!(reqs[1].1.len() > 1 && reqs[0].1.len() == 1);
    let got = e.loglikelihood(&reqs).unwrap();
    for ((ctx, cont), g) in reqs.iter().zip(&got) {
        let all: Vec<u32> = ctx.iter().chain(cont).copied().collect();
        let lp = candle_nn::ops::log_softmax(&full_logits(&e.model, &all).unwrap(), D::Minus1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut want = 0f64;
        let mut greedy = true;
        for (j, &t) in cont.iter().enumerate() {
            let row = &lp[ctx.len() - 1 + j];
            want += row[t as usize] as f64;
            greedy &= row.iter().all(|&x| x <= row[t as usize]);
        }
        assert!((g.logprob - want).abs() < 1e-3, "{} vs {want}", g.logprob);
        assert_eq!(g.greedy, greedy);
    }
    assert!(e.loglikelihood(&[(vec![], vec![1])]).is_err());
}

fn short(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let f = |p: &str| fixture(p).display().to_string();
    let args = [
        "eval".to_string(),
        "short".into(),
        "--model".into(),
        "default".into(),
        "--data".into(),
        format!("mmlu={}", f("short/mmlu.jsonl")),
        "--data".into(),
        format!("arc_easy={}", f("short/arc_easy.jsonl")),
        "--data".into(),
        format!("gsm8k={}", f("short/gsm8k.jsonl")),
        "--fewshot".into(),
        "1".into(),
        "--fewshot-data".into(),
        format!("mmlu={}", f("short/mmlu_dev.jsonl")),
        "--fewshot-data".into(),
        format!("arc_easy={}", f("short/arc_easy.jsonl")),
        "--fewshot-data".into(),
        format!("gsm8k={}", f("short/gsm8k_train.jsonl")),
        "--max-gen-tokens".into(),
        "48".into(),
        "--no-progress".into(),
        "--out".into(),
        out.display().to_string(),
    ];
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    a.extend_from_slice(extra);
    wildlong(&a).output().unwrap()
}

#[test]
fn eval_short_on_the_default_model_scores_resumes_and_compares() {
    let _limit = time_limit(5);
    let d = tempdir();
    let out = d.path().join("short");
    let stdout = ok(&short(&out, &[]));
    let r = ShortReport::load(&out.join("report.json")).unwrap();
    let tasks: Vec<(&str, usize)> = r.results.iter().map(|x| (x.task.as_str(), x.n)).collect();
    assert_eq!(tasks, [("mmlu", 3), ("arc_easy", 2), ("gsm8k", 2)]);
    assert!(stdout.contains(&std::fs::read_to_string(out.join("report.md")).unwrap()));
    // Each score is what the metrics give on the saved predictions.
    for (task, file) in [
        (Task::Mmlu, "short/mmlu.jsonl"),
        (Task::ArcEasy, "short/arc_easy.jsonl"),
        (Task::Gsm8k, "short/gsm8k.jsonl"),
    ] {
        let it = items(task, file);
        let preds: Vec<ShortPrediction> =
            read_jsonl_resumable(&out.join(task.name()).join("pred.jsonl")).unwrap();
        assert_eq!(preds.len(), it.len());
        let mut by: Vec<&ShortPrediction> = preds.iter().collect();
        by.sort_by_key(|p| p.index);
        for p in &by {
            match task {
                Task::Gsm8k => {
                    assert!(p.loglik.is_empty());
                    assert!(
                        !p.output.contains("Question:"),
                        "cut at the stop string: {:?}",
                        p.output
                    );
                }
                _ => {
                    assert_eq!(p.loglik.len(), it[p.index].choices.len());
                    assert!(p.loglik.iter().all(|l| l.is_finite() && *l < 0.0));
                }
            }
        }
        let want = task_score(task, &it, &by, 1);
        let got = r.results.iter().find(|x| x.task == task.name()).unwrap();
        assert_eq!(&want, got);
    }
    // A rerun generates nothing and gives the same report.
    let before: Vec<String> = ["mmlu", "arc_easy", "gsm8k"]
        .iter()
        .map(|t| std::fs::read_to_string(out.join(t).join("pred.jsonl")).unwrap())
        .collect();
    ok(&short(&out, &[]));
    for (t, b) in ["mmlu", "arc_easy", "gsm8k"].iter().zip(&before) {
        assert_eq!(
            &std::fs::read_to_string(out.join(t).join("pred.jsonl")).unwrap(),
            b,
            "{t}"
        );
    }
    assert_eq!(ShortReport::load(&out.join("report.json")).unwrap(), r);
    // Against a baseline 10 points lower on ARC's acc.
    let mut base = r.clone();
    let arc = base
        .results
        .iter_mut()
        .find(|x| x.task == "arc_easy")
        .unwrap();
    let acc = arc.metrics["acc"];
    arc.metrics.insert("acc".into(), acc - 10.0);
    let bpath = d.path().join("base.json");
    std::fs::write(&bpath, serde_json::to_string(&base).unwrap()).unwrap();
    let o = ok(&short(&out, &["--baseline", bpath.to_str().unwrap()]));
    let line = format!("| arc_easy | acc | {:.2} | {acc:.2} | +10.00 |", acc - 10.0);
    assert!(o.contains(&line), "{o}");
    assert!(std::fs::read_to_string(out.join("delta.md"))
        .unwrap()
        .contains(&line));

    // Two shards and a merge give the whole run's scores.
    let sharded = d.path().join("sharded");
    ok(&short(&sharded, &["--shard", "2/2"]));
    assert!(!sharded.join("report.json").exists());
    let o = short(&sharded, &["--merge"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("have no prediction"));
    ok(&short(&sharded, &["--shard", "1/2"]));
    let n = std::fs::read_to_string(sharded.join("mmlu/pred.shard-1-of-2.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(n, 2, "items 0 and 2 of 3");
    ok(&short(&sharded, &["--merge"]));
    let merged = ShortReport::load(&sharded.join("report.json")).unwrap();
    assert_eq!(merged.results, r.results);
}

#[test]
fn bad_short_eval_input_is_named() {
    let d = tempdir();
    let bad = d.path().join("mmlu.jsonl");
    std::fs::write(
        &bad,
        "{\"question\": \"q\", \"subject\": \"s\", \"choices\": [\"a\", \"b\", \"c\", \"d\"], \"answer\": 0}\n{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 0}\n",
    )
    .unwrap();
    let e = data::read(Task::Mmlu, bad.to_str().unwrap(), None).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("mmlu.jsonl: line 2") && msg.contains("4"),
        "{msg}"
    );
    let out = d.path().join("o").display().to_string();
    let run = |args: &[&str]| {
        let mut a = vec!["eval", "short", "--model", "default", "--out", &out];
        a.extend_from_slice(args);
        wildlong(&a).output().unwrap()
    };
    let o = run(&["--data", "hellaswag=x.jsonl"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown task `hellaswag`"));
    let b = format!("gsm8k={}", fixture("short/gsm8k.jsonl").display());
    let o = run(&["--data", &b, "--fewshot", "2"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--fewshot-data TASK=FILE"));
}
