//! `wildlong bench --synthetic` (the GPU benchmark's binary side, run here on the CPU with the
//! tiny shape) and `benches/gpu.sh`'s side-by-side join (with stand-ins for the binary and
//! the HF baseline, which need a GPU).

use crate::common::*;

fn lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn the_synthetic_bench_measures_every_step_as_json_lines() {
    let dir = tempdir();
    let json = dir.path().join("out.jsonl");
    let out = ok(&wildlong(&[
        "bench",
        "--synthetic",
        "tiny",
        "--prefill-lengths",
        "300,700",
        "--train-lengths",
        "200",
        "--prompt-tokens",
        "40",
        "--new-tokens",
        "6",
        "--batch",
        "3",
        "--runs",
        "1",
        "--json",
        json.to_str().unwrap(),
    ])
    .output()
    .unwrap());
    let rows = lines(&out);
    let steps: Vec<(String, Option<u64>)> = rows
        .iter()
        .map(|r| {
            let size = r.get("tokens").or(r.get("batch")).and_then(|v| v.as_u64());
            (r["step"].as_str().unwrap().to_string(), size)
        })
        .collect();
    let want = [
        ("init", None),
        ("prefill", Some(300)),
        ("prefill", Some(700)),
        ("generate", Some(1)),
        ("generate", Some(3)),
        ("lora_train", Some(200)),
    ];
    assert_eq!(
        steps,
        want.iter()
            .map(|(s, n)| (s.to_string(), *n))
            .collect::<Vec<_>>()
    );
    for r in &rows[1..] {
        assert!(r["tok_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["engine"], "wildlong");
    }
    // Random weights (std 0.02) predict uniformly: the loss is about ln(vocab) = ln(1024).
    let loss = rows[5]["loss"].as_f64().unwrap();
    assert!((loss - 1024f64.ln()).abs() < 0.5, "loss {loss}");
    assert_eq!(rows[5]["step_s"].as_array().unwrap().len(), 3);
    // No device memory on the CPU: the peak is null, the RSS is there.
    assert!(rows[5]["peak_gib"].is_null());
    assert!(rows[5]["peak_rss_mib"].as_u64().unwrap() > 0);
    assert_eq!(
        lines(&std::fs::read_to_string(&json).unwrap()),
        rows,
        "--json holds the printed lines"
    );
    let bad = wildlong(&["bench", "--synthetic", "llama-9"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown synthetic shape `llama-9`"));
}

#[test]
fn the_gpu_script_prints_both_sides_and_their_ratios() {
    let dir = tempdir();
    // Stand-ins: a "binary" that writes fixed wildlong lines to --json, and an HF baseline.
    let fake = dir.path().join("fake-wildlong");
    std::fs::write(
        &fake,
        r#"#!/usr/bin/env bash
while [ $# -gt 0 ]; do [ "$1" = --json ] && out="$2"; shift; done
cat > "$out" <<'J'
{"engine":"wildlong","step":"init","s":3.0}
{"engine":"wildlong","step":"prefill","tokens":8192,"tok_s":30000.0}
{"engine":"wildlong","step":"generate","batch":1,"tok_s":150.0}
{"engine":"wildlong","step":"lora_train","tokens":32768,"tok_s":6000.0,"peak_gib":40.0}
J
"#,
    )
    .unwrap();
    let hf = dir.path().join("hf.py");
    std::fs::write(
        &hf,
        r#"import json
for r in [{"step":"init","s":9.0},{"step":"prefill","tokens":8192,"tok_s":25000},
          {"step":"generate","batch":1,"tok_s":15.0},{"step":"generate_static_compiled","batch":1,"tok_s":100.0},
          {"step":"lora_train","tokens":32768,"tok_s":4800,"peak_gib":71.0}]:
    print(json.dumps(r))
"#,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out_dir = dir.path().join("out");
    let out = ok(&std::process::Command::new("bash")
        .arg(root().join("benches/gpu.sh"))
        .env("WILDLONG_BIN", &fake)
        .env("HF_BASELINE", &hf)
        .env("OUT", &out_dir)
        .output()
        .unwrap());
    let rows = lines(&out);
    let find = |m: &str| {
        rows.iter()
            .find(|r| r["measure"] == m)
            .unwrap_or_else(|| panic!("no {m} in {out}"))
    };
    assert_eq!(find("prefill")["hf_prefill_ratio"], 1.2);
    let gen = find("generate");
    assert_eq!(gen["hf_generate_ratio"], 10.0);
    assert_eq!(gen["hf_generate_static_compiled_ratio"], 1.5);
    let lora = find("lora_train");
    assert_eq!(lora["hf_lora_train_ratio"], 1.25);
    assert_eq!(lora["memory_ratio"], 0.56);
    assert!(rows.last().unwrap()["done"].as_bool().unwrap());
    assert!(out_dir.join("side_by_side.jsonl").is_file());
}

#[test]
fn training_on_a_device_this_build_lacks_is_an_error() {
    let dir = tempdir();
    let out = wildlong(&[
        "train",
        "--run",
        dir.path().to_str().unwrap(),
        "--device",
        "metal",
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metal"), "{err}");
}
