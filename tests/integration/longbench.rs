//! `wildlong eval longbench`: LongBench v2's prompt, truncation, answer extraction and
//! scoring (its pred.py and result.py, on hand-computed cases), and a run on the default model.

use crate::common::*;
use wildlong::eval::longbench::*;
use wildlong::records::read_jsonl_resumable;

#[test]
fn answers_are_extracted_as_pred_py_extracts_them() {
    assert_eq!(
        extract_answer("The correct answer is (B).").as_deref(),
        Some("B")
    );
    assert_eq!(
        extract_answer("**The correct answer is C**").as_deref(),
        Some("C")
    );
    assert_eq!(
        extract_answer("The correct answer is D, not The correct answer is (A)").as_deref(),
        Some("A"),
        "the parenthesised form wins wherever it is"
    );
    assert_eq!(extract_answer("The correct answer is (E)"), None);
    assert_eq!(extract_answer("I think A."), None);
}

#[test]
fn prompts_truncation_and_scores_follow_longbench_v2() {
    let items = read(fixture("longbench/data.json").to_str().unwrap(), None).unwrap();
    assert_eq!(items.len(), 3);
    let p = items[1].prompt();
    assert!(p.starts_with("Please read the following text and answer the question below.\n\n<text>\nDocument 1: The first meeting"));
    assert!(
        p.contains("returned to Lima.\n</text>"),
        "the context stripped"
    );
    assert!(p.ends_with(
        "What is the correct answer to this question: Which city hosted both meetings?\nChoices:\n(A) Oslo\n(B) Lima\n(C) Cairo\n(D) Perth\n\nFormat your response as follows: \"The correct answer is (insert answer here)\"."
    ));
    let tok = &default_engine().tokenizer;
    assert_eq!(
        truncate(tok, &p, 10_000).unwrap(),
        p,
        "short prompts are kept whole"
    );
    let n = tok.encode(&p, true).unwrap().len();
    let cut = truncate(tok, &p, 60).unwrap();
    assert!(n > 60);
    assert!(
        cut.starts_with("Please read the following text")
            && cut.ends_with("(insert answer here)\".")
    );
    let m = tok.encode(&cut, true).unwrap().len();
    assert!(
        (58..=62).contains(&m),
        "{m} tokens after the cut to 60 (re-encoding the seam may differ by one or two)"
    );

    let pred = |difficulty: &str, length: &str, judge: bool| Prediction {
        id: String::new(),
        difficulty: difficulty.into(),
        length: length.into(),
        domain: String::new(),
        answer: "A".into(),
        response: String::new(),
        pred: None,
        judge,
        prompt_tokens: 0,
    };
    let (acc, counts) = score(&[
        pred("easy", "short", true),
        pred("hard", "medium", false),
        pred("hard", "long", true),
    ]);
    let want = [
        ("overall", 66.7),
        ("easy", 100.0),
        ("hard", 50.0),
        ("short", 100.0),
        ("medium", 0.0),
        ("long", 100.0),
    ];
    for (k, v) in want {
        assert_eq!(acc[k], v, "{k}");
    }
    assert_eq!((counts["overall"], counts["hard"]), (3, 2));
}

#[test]
fn longbench_on_the_default_model_cuts_answers_scores_and_resumes() {
    let _limit = time_limit(4);
    let d = tempdir();
    let out = d.path().join("lb");
    let data = fixture("longbench/data.json").display().to_string();
    let run_in = |dir: &std::path::Path, extra: &[&str]| {
        let o = dir.display().to_string();
        let mut a = vec!["eval", "longbench", "--model", "default", "--data", &data];
        a.extend_from_slice(&["--max-len", "120", "--no-progress", "--out", &o]);
        a.extend_from_slice(extra);
        wildlong(&a).output().unwrap()
    };
    let run = |extra: &[&str]| run_in(&out, extra);
    let stdout = ok(&run(&[]));
    let preds: Vec<Prediction> = read_jsonl_resumable(&out.join("pred.jsonl")).unwrap();
    assert_eq!(preds.len(), 3);
    for p in &preds {
        // 120 prompt tokens, plus the chat template's few around the one user message.
        assert!(
            p.prompt_tokens > 100 && p.prompt_tokens <= 160,
            "{}",
            p.prompt_tokens
        );
        assert_eq!(p.pred, extract_answer(&p.response));
        assert_eq!(p.judge, p.pred.as_deref() == Some(p.answer.as_str()));
    }
    let r: Report =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!((r.n, r.max_len), (3, 120));
    assert_eq!((r.accuracy.clone(), r.counts.clone()), score(&preds));
    assert!(stdout.contains("| overall | 3 |"));
    let before = std::fs::read_to_string(out.join("pred.jsonl")).unwrap();
    ok(&run(&[]));
    assert_eq!(
        std::fs::read_to_string(out.join("pred.jsonl")).unwrap(),
        before,
        "a rerun generates nothing"
    );

    // Two shards into another folder, merged: the whole run's answers and scores.
    let sharded = d.path().join("sharded");
    ok(&run_in(&sharded, &["--shard", "1/2"]));
    assert!(!sharded.join("report.json").exists());
    let o = run_in(&sharded, &["--merge"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("wl-lb-2"),
        "the missing item named"
    );
    ok(&run_in(&sharded, &["--shard", "2/2"]));
    ok(&run_in(&sharded, &["--merge"]));
    let shard = |k: usize| -> Vec<String> {
        read_jsonl_resumable::<Prediction>(&sharded.join(format!("pred.shard-{k}-of-2.jsonl")))
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect()
    };
    let (mut one, two) = (shard(1), shard(2));
    one.sort();
    assert_eq!(
        (one, two),
        (
            vec!["wl-lb-1".to_string(), "wl-lb-3".into()],
            vec!["wl-lb-2".to_string()]
        )
    );
    let merged: Report =
        serde_json::from_str(&std::fs::read_to_string(sharded.join("report.json")).unwrap())
            .unwrap();
    assert_eq!((merged.accuracy, merged.counts), (r.accuracy, r.counts));
}
