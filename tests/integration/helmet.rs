//! `wildlong eval helmet`: prompts and metrics equal what HELMET's own `data.py` and
//! `utils.py` produce on small files in its formats (tests/fixtures/helmet/reference.json,
//! recorded by scripts/helmet_reference.py), truncation keeps prompt + generation within the
//! input length, and a run on the default model scores its saved outputs as HELMET would.

use crate::common::*;
use wildlong::eval::helmet::*;

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("helmet/reference.json")).unwrap())
        .unwrap()
}

fn file(name: &str) -> String {
    fixture(&format!("helmet/{name}")).display().to_string()
}

#[test]
fn prompts_are_helmets() {
    let r = reference();
    let tok = &default_engine().tokenizer;
    let first = |name: &str, data: &str, shots: usize| {
        let items = read(name, &file(data), None, shots, None, 42).unwrap();
        prompt(tok, name, &items[0], 1 << 20, 20).unwrap()
    };
    assert_eq!(first("json_kv", "json_kv.jsonl", 2), r["json_kv"]);
    assert_eq!(
        first("ruler_niah_mk_2", "ruler_niah_mk_2.jsonl", 0),
        r["ruler_niah_mk_2"]
    );
    assert_eq!(first("kilt_nq", "kilt_nq.jsonl", 0), r["kilt_nq_0shot"]);
    // popqa_3 keeps the questions with log10(s_pop) < 3.
    let pop = read("kilt_popqa_3", &file("kilt_popqa.jsonl"), None, 0, None, 42).unwrap();
    let qs: Vec<&str> = pop.iter().map(|i| i.fields["question"].as_str()).collect();
    assert_eq!(serde_json::json!(qs), r["popqa_questions"]);
    // Demonstrations: HELMET's format, two distinct demos before the passages.
    let items = read(
        "kilt_nq",
        &file("kilt_nq.jsonl"),
        Some(&file("kilt_nq_demos.jsonl")),
        2,
        None,
        42,
    )
    .unwrap();
    let p = prompt(tok, "kilt_nq", &items[0], 1 << 20, 20).unwrap();
    assert_eq!(p.matches("\nAnswer: ").count(), 2 + 1, "{p}");
    assert!(p.contains("Document (Title: Velmora): Velmora lies on the river Tane.\n\nQuestion: what river runs through Velmora\nAnswer: Tane\n\n")
        || p.contains("Question: what covers the Korri hills\nAnswer: pine forest\n\n")
        || p.contains("Question: when was the Orlin observatory founded\nAnswer: 1911\n\n"), "{p}");
    let e = format!(
        "{:#}",
        read("kilt_nq", &file("kilt_nq.jsonl"), None, 2, None, 42).unwrap_err()
    );
    assert!(e.contains("--demos kilt_nq="), "{e}");
}

#[test]
fn the_items_and_demonstrations_drawn_are_helmets() {
    // HELMET's data.py with max_test_samples and shots on the many_*.jsonl files: which items,
    // in which order (numpy's permutation for json_kv and RULER files; CPython's
    // random.sample over the sorted keys for RAG, duplicates of a drawn question kept), and
    // each question's demonstrations (HF datasets' shuffle seeded by its hash, duplicates
    // dropped; popqa's from its own file, less the question).
    let r = reference();
    let tok = &default_engine().tokenizer;
    let cases = [
        (
            "kilt_nq",
            "many_kilt_nq.jsonl",
            Some("many_kilt_nq_demos.jsonl"),
            2,
            6,
        ),
        (
            "kilt_popqa_3",
            "many_kilt_popqa.jsonl",
            Some("many_kilt_popqa.jsonl"),
            2,
            4,
        ),
        ("json_kv", "many_json_kv.jsonl", None, 1, 5),
        ("ruler_niah_mk_2", "many_ruler_niah_mk_2.jsonl", None, 0, 4),
    ];
    for (name, data, demos, shots, limit) in cases {
        let demos = demos.map(file);
        let items = read(name, &file(data), demos.as_deref(), shots, Some(limit), 42).unwrap();
        let got: Vec<String> = items
            .iter()
            .map(|it| prompt(tok, name, it, 1 << 20, 20).unwrap())
            .collect();
        assert_eq!(serde_json::json!(got), r["selection"][name], "{name}");
    }
    // Another seed draws other items; more shots than distinct demonstrations is an error.
    let other = read("json_kv", &file("many_json_kv.jsonl"), None, 1, Some(5), 7).unwrap();
    let first = read("json_kv", &file("many_json_kv.jsonl"), None, 1, Some(5), 42).unwrap();
    assert_ne!(other, first);
    let e = format!(
        "{:#}",
        read(
            "kilt_nq",
            &file("many_kilt_nq.jsonl"),
            Some(&file("many_kilt_nq_demos.jsonl")),
            9,
            Some(1),
            42
        )
        .unwrap_err()
    );
    assert!(
        e.contains("9 shots wanted") && e.contains("8 distinct"),
        "{e}"
    );
}

#[test]
fn metrics_are_helmets() {
    let r = reference();
    let cases: [(&str, &[&str]); 4] = [
        ("Answer: The Velmora.\nmore", &["Velmora"]),
        (
            "I think it is the city of velmora",
            &["the city of Velmora"],
        ),
        (
            "Corresponding value: 3d5f1a6b-dd44",
            &["3d5f1a6b-dd44-4e5f-8a6b-333333333333"],
        ),
        ("nothing", &["x"]),
    ];
    for (i, (p, a)) in cases.iter().enumerate() {
        let a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        assert_eq!(subem(p, &a) == 1.0, r["metrics"][i], "{p}");
        assert_eq!(parse_output(p, "Answer:").unwrap(), r["parse"][i], "{p}");
    }
    assert_eq!(
        parse_output("Corresponding value: 3d5f", "corresponding value:").unwrap(),
        r["parse"][4]
    );
    for (i, s) in ["The  Eiffel-Tower!", "an apple, a day", "Thé café"]
        .iter()
        .enumerate()
    {
        assert_eq!(normalize_answer(s), r["normalize"][i]);
    }
    // Per dataset: json_kv takes the better of the raw and parsed output; RULER files the
    // share of answers found; RAG SubEM of raw or parsed.
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        score("json_kv", "Corresponding value: abc-1", &v(&["abc-1"])).unwrap(),
        1.0
    );
    assert_eq!(
        score(
            "ruler_niah_mv",
            "They are 111 and 333.",
            &v(&["111", "222", "333"])
        )
        .unwrap(),
        2.0 / 3.0
    );
    assert_eq!(
        score("kilt_nq", "Answer: Velmora", &v(&["velmora"])).unwrap(),
        1.0
    );
    assert_eq!(
        score("kilt_nq", "Answer: Tane", &v(&["velmora"])).unwrap(),
        0.0
    );
    assert!(Kind::of("helmet_mystery").is_err());
}

#[test]
fn long_contexts_lose_their_tail_to_fit_the_input_length() {
    let tok = &default_engine().tokenizer;
    let items = read(
        "ruler_niah_mk_2",
        &file("ruler_niah_mk_2.jsonl"),
        None,
        0,
        None,
        42,
    )
    .unwrap();
    let full = prompt(tok, "ruler_niah_mk_2", &items[0], 1 << 20, 50).unwrap();
    let n = tok.encode(&full, true).unwrap().len();
    let cut = prompt(tok, "ruler_niah_mk_2", &items[0], n + 50 - 40, 50).unwrap();
    let m = tok.encode(&cut, true).unwrap().len();
    assert!(m <= n - 40 + 1 && m >= n - 40 - 2, "{n} → {m}");
    // The question and the system prompt stay; the context's end went.
    assert!(cut.ends_with("mentioned in the provided text is"));
    assert!(!cut.contains("brave-owl is: 7719302"));
    assert!(cut.contains("quiet-lake is: 4821937"));
}

#[test]
fn runs_on_the_default_model_and_scores_what_it_saved() {
    let _limit = time_limit(10);
    let d = tempdir();
    let out = d.path().join("helmet");
    let run = |extra: &[String]| {
        let mut a: Vec<String> = ["eval", "helmet", "--model", "default", "--max-len", "1024"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend([
            "--no-progress".into(),
            "--out".into(),
            out.display().to_string(),
        ]);
        a.extend(extra.iter().cloned());
        ok(&wildlong(&a.iter().map(String::as_str).collect::<Vec<_>>())
            .output()
            .unwrap())
    };
    let nq = [
        format!("--task=kilt_nq={}", file("kilt_nq.jsonl")),
        format!("--demos=kilt_nq={}", file("kilt_nq_demos.jsonl")),
    ];
    let stdout = run(&[
        &[
            "--shots=1".to_string(),
            format!("--task=json_kv={}", file("json_kv.jsonl")),
            format!("--task=ruler_niah_mk_2={}", file("ruler_niah_mk_2.jsonl")),
        ][..],
        &nq[..],
    ]
    .concat());
    let r: Report =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r.counts.values().sum::<usize>(), 6);
    for (task, s) in &r.scores {
        let preds: Vec<Prediction> =
            wildlong::records::read_jsonl_resumable(&out.join(task).join("pred.jsonl")).unwrap();
        let rescored: f64 = preds
            .iter()
            .map(|p| score(task, &p.output, &p.answers).unwrap())
            .sum::<f64>()
            / preds.len() as f64;
        assert!(
            (s - (100.0 * rescored * 100.0).round() / 100.0).abs() < 1e-9,
            "{task}"
        );
        assert!(preds.iter().all(|p| p.prompt_tokens <= 1024));
    }
    let recall = (r.scores["json_kv"] + r.scores["ruler_niah_mk_2"]) / 2.0;
    assert!((r.categories["recall"] - (recall * 100.0).round() / 100.0).abs() < 1e-9);
    assert_eq!(r.categories["rag"], r.scores["kilt_nq"]);
    assert!(stdout.contains("| **recall** |"), "{stdout}");
    // A rerun asks nothing; one with other shots asks again for the prompts that changed.
    let lines = |t: &str| {
        std::fs::read_to_string(out.join(t).join("pred.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    run(&[&nq[..], &["--shots=1".to_string()]].concat());
    assert_eq!(lines("kilt_nq"), 2);
    run(&[&nq[..], &["--shots=0".to_string(), "--limit=1".to_string()]].concat());
    assert_eq!(lines("kilt_nq"), 3);
    // RAG stops at the first newline (HELMET's stop_new_line).
    let rag: Vec<Prediction> =
        wildlong::records::read_jsonl_resumable(&out.join("kilt_nq/pred.jsonl")).unwrap();
    assert!(
        rag.iter().all(|p| !p.output.trim_end().contains('\n')),
        "{rag:?}"
    );
}
