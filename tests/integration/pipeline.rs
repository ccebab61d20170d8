//! `wildlong run`: the pipeline config (sections over their base files, typos refused),
//! step hashes that chain, and the whole pipeline on the default model — SIGKILLed in several
//! steps and restarted, it gives the outputs of an uninterrupted run; a rerun does nothing;
//! a changed training setting reruns training and the evaluation after it, and nothing else.

use crate::common::*;
use std::path::{Path, PathBuf};
use wildlong::pipeline::config::PipelineConfig;
use wildlong::pipeline::{read_state, step_inputs, Status, Step};
use wildlong::train::config::TrainConfig;

fn load(path: &str, sets: &[&str]) -> anyhow::Result<PipelineConfig> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    PipelineConfig::load(&root().join(path), &sets)
}

#[test]
fn pipeline_configs_resolve_over_their_base_files_and_refuse_typos() {
    let demo = load("configs/demo.toml", &[]).unwrap();
    // Keys from the recipe the demo names, with the demo's own on top.
    let recipe =
        TrainConfig::load(Some(&root().join("configs/train/smollm2-cpu.toml")), &[]).unwrap();
    assert_eq!(demo.train.rope, recipe.rope);
    assert_eq!(demo.train.lora, recipe.lora);
    assert_eq!(demo.train.schedule.steps, 8);
    assert_eq!(demo.train.schedule.micro_batch, recipe.schedule.micro_batch);
    assert_ne!(demo.train.schedule.steps, recipe.schedule.steps);
    assert_eq!(demo.stage1.input.limit, Some(96));
    // Stage keys the demo leaves alone are the built-in defaults.
    let s1 = wildlong::stage1::config::Stage1Config::builtin();
    assert_eq!(demo.stage1.filter, s1.filter);
    assert_eq!(demo.stage1.sample.per_type, 2);
    assert_eq!(demo.stage1.sample.max_fields, s1.sample.max_fields);
    assert_eq!(demo.eval.ruler().unwrap().tasks.len(), 13);

    for (file, recipe) in [
        (
            "configs/pipeline/llama-3.1-8b-instruct.toml",
            "configs/train/llama-3.1-8b-instruct-128k.toml",
        ),
        (
            "configs/pipeline/mistral-7b-instruct-v0.2.toml",
            "configs/train/mistral-7b-instruct-v0.2-128k.toml",
        ),
    ] {
        let c = load(file, &[]).unwrap();
        assert_eq!(
            c.train,
            TrainConfig::load(Some(&root().join(recipe)), &[]).unwrap()
        );
        assert_eq!(c.eval.lengths.first(), Some(&4096));
        assert_eq!(c.eval.lengths.last(), Some(&131072));
        assert!(c.train.rope.scaling.is_some(), "{file}");
        assert_eq!(c.run.generator, c.train.model, "{file}");
    }

    let err = |sets: &[&str]| format!("{:#}", load("configs/demo.toml", sets).unwrap_err());
    let e = err(&["train.schedul.steps=3"]);
    assert!(
        e.contains("schedul") && e.contains("configs/demo.toml"),
        "{e}"
    );
    let e = err(&["train.schedule.steps=\"ten\""]);
    assert!(e.contains("invalid type") && e.contains("--set"), "{e}");
    let e = err(&["stage2.config=\"configs/nope.toml\""]);
    assert!(e.contains("configs/nope.toml"), "{e}");
    let e = err(&["trian.steps=3"]);
    assert!(e.contains("trian"), "{e}");
    let e = err(&["eval.tasks=[\"niah_single_9\"]"]);
    assert!(
        e.contains("niah_single_9") && e.contains("eval.tasks"),
        "{e}"
    );
    let e = err(&["train.lora.rank=0"]);
    assert!(e.contains("lora.rank") && e.contains("[train]"), "{e}");

    // Through the binary: a clear error and exit 1, no panic.
    let d = tempdir();
    let bad = d.path().join("bad.toml");
    std::fs::write(&bad, "[run]\ndir = 3\n").unwrap();
    let o = wildlong(&["run", bad.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad.toml") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn step_hashes_chain_each_step_to_the_steps_it_reads() {
    let hashes = |sets: &[&str]| -> Vec<String> {
        step_inputs(&load("configs/demo.toml", sets).unwrap())
            .unwrap()
            .into_iter()
            .map(|s| s.2)
            .collect()
    };
    let base = hashes(&[]);
    let changed = |sets: &[&str]| -> Vec<&str> {
        let h = hashes(sets);
        Step::ALL
            .iter()
            .zip(h.iter().zip(&base))
            .filter(|(_, (a, b))| a != b)
            .map(|(s, _)| s.name())
            .collect()
    };
    assert_eq!(changed(&["engine.threads=1"]), Vec::<&str>::new());
    assert_eq!(changed(&["train.lora.rank=8"]), ["train", "eval_after"]);
    assert_eq!(
        changed(&["stage1.sample.per_type=3"]),
        ["sample", "synth", "train", "eval_after"]
    );
    assert_eq!(
        changed(&["stage1.graph.min_type_queries=3"]),
        ["graph", "sample", "synth", "train", "eval_after"]
    );
    assert_eq!(changed(&["eval.samples=2"]), ["eval_before", "eval_after"]);
    // Every step but the base model's evaluation reads what the generator made.
    assert_eq!(
        changed(&["run.generator=\"other\""]),
        ["extract", "graph", "sample", "synth", "train", "eval_after"]
    );
    assert_eq!(
        changed(&["stage1.input.limit=10"]).first(),
        Some(&"extract")
    );
}

/// A small pipeline: 6 queries, one blueprint per type, one 1K context, one LoRA step, one
/// RULER task at 512 tokens.
const QUERIES: usize = 6;

fn tiny_config(dir: &Path) -> PathBuf {
    let p = dir.join("pipeline.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[run]
dir = "{run}"
[engine]
max_batch = 3
[stage1]
input = {{ paths = ["sample"], limit = {queries} }}
graph = {{ min_type_queries = 2 }}
sample = {{ per_type = 1 }}
[stage2]
assemble = {{ buckets = [1024], per_bucket = 1, reserve_tokens = 384, multi_document_share = 0.0 }}
generate = {{ instructions_per_context = 1, max_answer_tokens = 128 }}
gates = {{ min_answer_words = 1, max_ungrounded_names = 1.0, closed_book_max_f1 = 1.0 }}
[train]
config = "configs/train/smollm2-cpu.toml"
data = {{ max_length = 1024 }}
optim = {{ warmup_steps = 0 }}
schedule = {{ steps = 1, grad_accum = 1, checkpoint_every = 1, eval_every = 1 }}
[eval]
lengths = [512]
tasks = ["niah_single_1"]
samples = 1
cache_dir = "{cache}"
[eval.short]
data = {{ mmlu = "{mmlu}" }}
limit = 2
"#,
            run = dir.join("run").display(),
            cache = dir.join("cache").display(),
            mmlu = fixture("short/mmlu.jsonl").display(),
            queries = QUERIES,
        ),
    )
    .unwrap();
    p
}

/// The files the pipeline's outputs are compared by (log seconds dropped).
fn outputs(run: &Path) -> Vec<(String, String)> {
    let read =
        |rel: &str| std::fs::read_to_string(run.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let log: Vec<String> = read("train/log.jsonl")
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v.to_string()
        })
        .collect();
    let scores = |rel: &str| {
        let v: serde_json::Value = serde_json::from_str(&read(rel)).unwrap();
        v["results"].to_string()
    };
    let adapter = std::fs::read(run.join("train/adapter/adapter_model.safetensors")).unwrap();
    vec![
        ("meta".into(), read("stage1/meta.jsonl")),
        ("blueprints".into(), read("stage1/blueprints.jsonl")),
        ("data".into(), read("stage2/data.jsonl")),
        ("log".into(), log.join("\n")),
        ("adapter".into(), format!("{:x?}", sha256(&adapter))),
        ("before".into(), scores("eval/before/report.json")),
        ("after".into(), scores("eval/after/report.json")),
    ]
}

fn sha256(b: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(b).to_vec()
}

#[test]
fn killed_pipeline_resumes_to_the_uninterrupted_outputs_and_a_rerun_does_nothing() {
    let _limit = time_limit(15);
    let d = tempdir();
    let run = |cfg: &Path, sets: &[&str]| {
        let mut c = wildlong(&["run", cfg.to_str().unwrap(), "--no-progress"]);
        for s in sets {
            c.arg("--set").arg(s);
        }
        c.current_dir(root());
        c
    };
    let whole = d.path().join("whole");
    std::fs::create_dir_all(&whole).unwrap();
    let cfg = tiny_config(&whole);
    let out = ok(&run(&cfg, &[]).output().unwrap());
    assert!(out.contains("7 of 7 steps run"), "{out}");
    let reference = outputs(&whole.join("run"));
    let pairs = reference[2].1.lines().count();
    assert!(pairs >= 1, "no pairs kept");
    let report = std::fs::read_to_string(whole.join("run/report.md")).unwrap();
    for part in [
        "## Stage 1",
        format!("Meta-information records: {QUERIES}").as_str(),
        "## Stage 2",
        "## Fine-tuning",
        "1 steps",
        "niah_single_1",
        "## Short-context check before and after fine-tuning",
        "| mmlu | acc |",
    ] {
        assert!(report.contains(part), "{part} missing from\n{report}");
    }
    let svg = std::fs::read_to_string(whole.join("run/report.svg")).unwrap();
    assert!(svg.contains("training loss") && svg.contains("RULER average score"));

    // SIGKILL inside extraction, sampling, synthesis, training and the first evaluation
    // (a random 0-200 ms after each step's mark), then finish.
    let killed = d.path().join("killed");
    std::fs::create_dir_all(&killed).unwrap();
    let cfg_k = tiny_config(&killed);
    let r = killed.join("run");
    let lines = |p: PathBuf| {
        std::fs::read_to_string(p)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let entries = |p: PathBuf| std::fs::read_dir(p).map(|r| r.count()).unwrap_or(0);
    let started = |step: &str| {
        read_state(&r, step)
            .ok()
            .flatten()
            .is_some_and(|s| s.status == Status::Started)
    };
    type Ready<'a> = Box<dyn Fn() -> bool + 'a>;
    let points: Vec<(&str, Ready)> = vec![
        (
            "extract",
            Box::new(|| lines(r.join("stage1/meta.jsonl")) >= 3),
        ),
        ("sample", Box::new(|| true)),
        ("synth", Box::new(|| entries(r.join("stage2/store")) >= 1)),
        ("train", Box::new(|| true)),
        ("eval_before", Box::new(|| started("eval_before"))),
    ];
    let mut kills = 0;
    for (step, ready) in points {
        let mut child = run(&cfg_k, &[])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if started(step) && ready() {
                let jitter = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .subsec_nanos()
                    % 200;
                std::thread::sleep(std::time::Duration::from_millis(jitter as u64));
                eprintln!("SIGKILL in {step} after {jitter} ms");
                child.kill().unwrap(); // SIGKILL
                kills += 1;
                break;
            }
            assert!(
                t0.elapsed().as_secs() < 900,
                "{step} not reached in 15 minutes"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.wait().unwrap();
    }
    assert!(kills >= 4, "only {kills} kills landed");
    let out = ok(&run(&cfg_k, &[]).output().unwrap());
    assert!(out.contains("resuming") || out.contains("skipped"), "{out}");
    let got = outputs(&r);
    for ((name, want), (_, have)) in reference.iter().zip(&got) {
        assert_eq!(have, want, "{name} differs after the kills");
    }
    let ids: Vec<String> = got[0]
        .1
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string())
        .collect();
    let unique: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), QUERIES, "records lost or duplicated");

    // A rerun does nothing and leaves the report as it was.
    let report = std::fs::read_to_string(r.join("report.md")).unwrap();
    let out = ok(&run(&cfg_k, &[]).output().unwrap());
    assert!(out.contains("0 of 7 steps run"), "{out}");
    assert_eq!(
        std::fs::read_to_string(r.join("report.md")).unwrap(),
        report
    );

    // A changed training setting: training and the evaluation after it run again; the old
    // training folder is moved aside, not deleted.
    let out = ok(&run(&cfg_k, &["train.optim.lr=1e-4"]).output().unwrap());
    assert!(out.contains("2 of 7 steps run"), "{out}");
    for s in ["extract", "graph", "sample", "synth", "eval_before"] {
        assert!(
            out.contains(&format!("{s}: done before, skipped")),
            "{s}: {out}"
        );
    }
    let moved: Vec<_> = std::fs::read_dir(r.join("superseded"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(moved.iter().any(|m| m.contains("-train-")), "{moved:?}");
    assert!(
        moved.iter().any(|m| m.contains("-eval_after-")),
        "{moved:?}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.join("train/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["steps"], 1);
    let log = std::fs::read_to_string(r.join("train/log.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(first["lr"], 1e-4, "{log}");
}
