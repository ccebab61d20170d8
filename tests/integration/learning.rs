//! `wildlong train` teaches the default model a task it cannot do before: the learning test,
//! end to end through the binary (generate, train, generate with the adapter). Its own
//! module, sorted early: the suite's longest tests then do not all queue at its end.

use crate::common::*;
use serde_json::Value;
use std::path::Path;

#[test]
fn fine_tuning_the_default_model_teaches_it_a_retrieval_task() {
    let _limit = time_limit(12);
    // Records of eight word = number pairs; the question names one word. The base model
    // answers with prose; 12 LoRA steps (lr 2e-3) on 120 conversations teach it to retrieve.
    use rand::{seq::IndexedRandom, Rng, SeedableRng};
    let words = [
        "apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "violet", "copper",
        "harbor", "falcon", "meadow", "silver", "candle", "pepper", "orbit",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    let mut make = |n: usize| -> Vec<(String, String)> {
        (0..n)
            .map(|_| {
                let keys: Vec<&str> = words.choose_multiple(&mut rng, 8).copied().collect();
                let vals: Vec<u32> = (0..8).map(|_| rng.random_range(100..1000)).collect();
                let q = rng.random_range(0..8);
                let ctx: Vec<String> = keys
                    .iter()
                    .zip(&vals)
                    .map(|(k, v)| format!("{k} = {v}"))
                    .collect();
                (
                    format!(
                        "Records:\n{}\nWhat number is {}? Reply with the number only.",
                        ctx.join("\n"),
                        keys[q]
                    ),
                    vals[q].to_string(),
                )
            })
            .collect()
    };
    let train_set = make(120);
    let held_out = make(20);
    let dir = tempdir();
    let data = dir.path().join("kv.jsonl");
    let mut text = String::new();
    for (q, a) in &train_set {
        text.push_str(&format!(
            "{}\n",
            serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        ));
    }
    std::fs::write(&data, text).unwrap();
    let batch = dir.path().join("held_out.jsonl");
    let mut text = String::new();
    for (i, (q, _)) in held_out.iter().enumerate() {
        text.push_str(&format!(
            "{}\n",
            serde_json::json!({"id": format!("q{i}"), "messages": [{"role": "user", "content": q}], "max_tokens": 8})
        ));
    }
    std::fs::write(&batch, text).unwrap();
    let accuracy = |adapter: Option<&Path>, name: &str| -> f64 {
        let out_file = dir.path().join(name);
        let mut c = wildlong(&["generate", "--model", "default", "--chat"]);
        c.arg("--batch-file")
            .arg(&batch)
            .arg("--output")
            .arg(&out_file);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        ok(&c.output().unwrap());
        let preds: Vec<Value> = std::fs::read_to_string(&out_file)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let right = preds
            .iter()
            .filter(|p| {
                let i: usize = p["id"].as_str().unwrap()[1..].parse().unwrap();
                p["completion"].as_str().unwrap().contains(&held_out[i].1)
            })
            .count();
        right as f64 / preds.len() as f64
    };
    let before = accuracy(None, "before.jsonl");
    let run = dir.path().join("run");
    let out = wildlong(&["train", "--no-progress"])
        .arg("--run")
        .arg(&run)
        .args([
            "--set",
            &format!("data.paths=[\"{}\"]", data.display()),
            "--set",
            "data.max_length=512",
            "--set",
            "data.eval_fraction=0.0",
            "--set",
            "rope={}",
            "--set",
            "lora.rank=8",
            "--set",
            "lora.alpha=16.0",
            "--set",
            "optim.lr=2e-3",
            "--set",
            "optim.warmup_steps=2",
            "--set",
            "schedule.steps=12",
            "--set",
            "schedule.grad_accum=1",
        ])
        .output()
        .unwrap();
    ok(&out);
    let after = accuracy(Some(&run.join("train/adapter")), "after.jsonl");
    eprintln!("held-out retrieval accuracy: before {before:.2}, after {after:.2}");
    assert!(
        after >= 0.8 && after >= before + 0.5,
        "before {before}, after {after}"
    );
}
