//! `wildlong train` (`src/train/run.rs`, `plan.rs`): exact resume, bad data counted, the
//! exports of LoRA and full fine-tuning, `--plan` and its refusal (the learning test on the
//! default model is in `learning.rs`).

use crate::common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use wildlong::train::config::TrainConfig;
use wildlong::train::run::{train, LogLine, RunOptions};

/// A tiny model folder with a plain chat template (`<role>content` lines).
fn tiny_chat_model() -> tempfile::TempDir {
    let d = tiny_random(&TinySpec::default(), 11);
    std::fs::write(
        d.path().join("chat_template.jinja"),
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    )
    .unwrap();
    d
}

/// `n` conversations: a list of numbers and its continuation.
fn counting_data(path: &Path, n: usize) {
    let mut text = String::new();
    for i in 0..n {
        let a = (i * 7) % 50;
        let q: Vec<String> = (a..a + 3 + i % 4).map(|x| x.to_string()).collect();
        let r: Vec<String> = (a + 3 + i % 4..a + 6 + i % 4)
            .map(|x| x.to_string())
            .collect();
        let line = serde_json::json!({"messages": [
            {"role": "user", "content": format!("continue {}", q.join(" "))},
            {"role": "assistant", "content": r.join(" ")},
        ]});
        text.push_str(&format!("{line}\n"));
    }
    std::fs::write(path, text).unwrap();
}

fn recipe(model: &Path, data: &Path, extra: &str) -> TrainConfig {
    let text = format!(
        r#"
model = "{}"
method = "lora"
seed = 3
[data]
paths = ["{}"]
max_length = 64
eval_fraction = 0.2
max_eval = 4
[lora]
rank = 4
alpha = 8.0
dropout = 0.1
targets = ["q_proj", "v_proj", "down_proj"]
[optim]
lr = 5e-3
warmup_steps = 2
[schedule]
steps = 6
micro_batch = 2
grad_accum = 2
eval_every = 3
checkpoint_every = 2
keep_checkpoints = 2
{extra}
"#,
        model.display(),
        data.display()
    );
    let f = tempdir();
    let p = f.path().join("r.toml");
    std::fs::write(&p, text).unwrap();
    TrainConfig::load(Some(&p), &[]).unwrap()
}

fn opts(stop_after: Option<usize>) -> RunOptions {
    RunOptions {
        models_dir: root().join("models"),
        progress: false,
        stop_after,
        device: "cpu".into(),
    }
}

/// The log without wall times.
fn log_of(run: &Path) -> Vec<LogLine> {
    std::fs::read_to_string(run.join("train/log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| match serde_json::from_str(l).unwrap() {
            LogLine::Train { step, .. } => LogLine::Train { step, seconds: 0.0 },
            e => e,
        })
        .collect()
}

fn checkpoints(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run.join("train/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_resumed_run_reproduces_the_uninterrupted_one_exactly() {
    let model = tiny_chat_model();
    let dir = tempdir();
    let data = dir.path().join("data.jsonl");
    counting_data(&data, 40);
    let cfg = recipe(model.path(), &data, "");

    let whole = dir.path().join("whole");
    let s = train(&cfg, &whole, &opts(None)).unwrap();
    assert_eq!(s.steps, 6);
    let log = log_of(&whole);
    let evals: Vec<usize> = log
        .iter()
        .filter_map(|l| match l {
            LogLine::Eval { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(evals, [0, 3, 6]);
    assert!(s.last_loss.unwrap() < s.first_loss.unwrap());
    assert_eq!(checkpoints(&whole), ["step-000004", "step-000006"]);

    // Killed after step 3 (last checkpoint at 2), then restarted: the same log and adapter,
    // bit for bit (weights, moments, step, data position and dropout masks all restored).
    let cut = dir.path().join("cut");
    let err = train(&cfg, &cut, &opts(Some(3))).unwrap_err();
    assert!(format!("{err:#}").contains("stopped after step 3"));
    assert_eq!(checkpoints(&cut), ["step-000002"]);
    train(&cfg, &cut, &opts(None)).unwrap();
    assert_eq!(log_of(&cut), log);
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "wildlong_rope.json",
    ] {
        assert_eq!(
            std::fs::read(whole.join("train/adapter").join(f)).unwrap(),
            std::fs::read(cut.join("train/adapter").join(f)).unwrap(),
            "{f}"
        );
    }
    // Finished: a rerun does nothing; another recipe in the same folder is refused.
    let again = train(&cfg, &cut, &opts(None)).unwrap();
    assert_eq!(again.steps, 6);
    assert_eq!(log_of(&cut), log);
    let mut other = cfg.clone();
    other.optim.lr = 1e-3;
    let err = train(&other, &cut, &opts(None)).unwrap_err();
    assert!(format!("{err:#}").contains("another model, prompt, input or settings"));
}

#[test]
fn full_fine_tuning_unpacked_exports_a_merged_model_with_its_rope() {
    let model = tiny_chat_model();
    let dir = tempdir();
    let data = dir.path().join("data.jsonl");
    counting_data(&data, 12);
    let mut cfg = recipe(
        model.path(),
        &data,
        "[rope]\nscaling = { rope_type = \"linear\", factor = 2.0 }\n[memory]\ncheckpoint_layers = true",
    );
    cfg.method = wildlong::train::config::TrainMethod::Full;
    cfg.data.packing = false;
    cfg.schedule.steps = 2;
    let run = dir.path().join("run");
    let s = train(&cfg, &run, &opts(None)).unwrap();
    assert_eq!(s.adapter, None);
    let merged = PathBuf::from(s.merged.unwrap());
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["rope_scaling"]["rope_type"], "linear");
    // The merged model runs in the engine with the trained RoPE; unpacked rows: one
    // conversation each.
    let e = wildlong::models::load_engine(
        merged.to_str().unwrap(),
        &root().join("models"),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(e.model.config().rope.scaling.name(), "linear");
    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train/data_stats.json")).unwrap())
            .unwrap();
    assert_eq!(stats["train_rows"], stats["train_conversations"]);
}

#[test]
fn bad_training_data_is_counted_and_an_empty_input_is_a_clear_error() {
    let model = tiny_chat_model();
    let dir = tempdir();
    let data = dir.path().join("data.jsonl");
    counting_data(&data, 10);
    let mut bytes = std::fs::read(&data).unwrap();
    bytes.extend_from_slice(b"{\"messages\": [{\"role\": \"user\", \"content\": \"no reply\"}]}\n");
    bytes.extend_from_slice(b"not json\n");
    bytes.extend_from_slice(b"{\"messages\": \"\xff\xfe\"}\n");
    let long = "9 ".repeat(200);
    bytes.extend_from_slice(
        format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"{long}\"}}, {{\"role\": \"assistant\", \"content\": \"ok\"}}]}}\n")
            .as_bytes(),
    );
    std::fs::write(&data, bytes).unwrap();
    let mut cfg = recipe(model.path(), &data, "");
    cfg.schedule.steps = 1;
    let run = dir.path().join("run");
    train(&cfg, &run, &opts(None)).unwrap();
    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train/data_stats.json")).unwrap())
            .unwrap();
    assert_eq!(stats["conversations"], 14);
    assert_eq!(
        stats["skipped"],
        serde_json::json!({"no_assistant": 1, "malformed": 1, "not_utf8": 1, "too_long": 1})
    );

    // Through the command: nothing usable, a typo'd key, a missing file — exit 1, named.
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "not json\n").unwrap();
    let recipe_file = dir.path().join("r.toml");
    std::fs::write(
        &recipe_file,
        format!(
            "model = \"{}\"\nmethod = \"lora\"\n[data]\npaths = [\"{}\"]\n",
            model.path().display(),
            empty.display()
        ),
    )
    .unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&[], "no usable training conversation"),
        // A row no machine holds: refused by the plan before the model or data is read.
        (
            &["--set", "data.max_length=67108864"],
            "GiB available on this machine; these settings fit: --set memory.checkpoint_layers=true",
        ),
        (&["--set", "schedule.stepz=3"], "unknown field `stepz`"),
        (
            &["--set", "data.paths=[\"/nonexistent.jsonl\"]"],
            "/nonexistent.jsonl",
        ),
    ];
    for (extra, want) in cases {
        let out = wildlong(&["train", "--no-progress"])
            .arg("--config")
            .arg(&recipe_file)
            .arg("--run")
            .arg(dir.path().join("cli"))
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "{want}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn the_plan_counts_tokens_and_refuses_with_settings_that_fit() {
    let plan = |extra: &[&str]| {
        wildlong(&["train", "--plan", "--memory-gib", "2.0"])
            .args(extra)
            .output()
            .unwrap()
    };
    // The built-in CPU recipe: 2048-token rows, 4 micro-batches per step.
    let out = plan(&["--set", "memory.checkpoint_layers=true"]);
    let text = ok(&out);
    let json: Value =
        serde_json::from_str(text.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
    assert_eq!(json["tokens_per_step"], 2048 * 4);
    assert!(json["peak_bytes"].as_f64().unwrap() < 2.0 * (1u64 << 30) as f64);
    assert_eq!(json["trainable_parameters"], 4_884_480); // r = 16 on all seven projections

    // Full fine-tuning at 8K rows does not fit in 2 GiB: refused, with settings that do.
    let big = ["--set", "method=\"full\"", "--set", "data.max_length=8192"];
    let out = plan(&big);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let fix = err
        .split("these settings fit: ")
        .nth(1)
        .unwrap_or_else(|| panic!("{err}"));
    let mut args: Vec<String> = big.iter().map(|s| s.to_string()).collect();
    args.extend(fix.split_whitespace().map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&plan(&args));
}

#[test]
fn the_gpu_recipes_parse_and_plan_to_fit_80_gib_with_published_parameter_counts() {
    // Config-only folders with the published shapes (no weights are read by --plan).
    let llama = serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": false, "hidden_act": "silu"});
    let mut mistral = llama.clone();
    mistral["model_type"] = "mistral".into();
    mistral["vocab_size"] = 32000.into();
    mistral["rope_theta"] = 1e6.into();
    mistral["max_position_embeddings"] = 32768.into();
    mistral["rope_scaling"] = Value::Null;
    // Meta's and Mistral's published parameter counts.
    for (recipe, shape, params) in [
        ("llama-3.1-8b-instruct-128k", llama, 8_030_261_248u64),
        ("mistral-7b-instruct-v0.2-128k", mistral, 7_241_732_096),
    ] {
        let d = tempdir();
        std::fs::write(d.path().join("config.json"), shape.to_string()).unwrap();
        let file = root().join("configs/train").join(format!("{recipe}.toml"));
        TrainConfig::load(Some(&file), &[]).unwrap();
        let model = format!("model=\"{}\"", d.path().display());
        let plan = |sets: &[&str]| {
            let mut c = wildlong(&["train", "--plan", "--device", "cuda", "--memory-gib", "80"]);
            c.arg("--config").arg(&file).args(["--set", &model]);
            for s in sets {
                c.args(["--set", s]);
            }
            c.output().unwrap()
        };
        let json = |out: &std::process::Output| -> Value {
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            serde_json::from_str(text.lines().find(|l| l.starts_with('{')).unwrap()).unwrap()
        };
        // 128K-token rows fit one 80 GiB GPU with the checkpoints in host memory.
        let out = plan(&[]);
        let text = ok(&out);
        let full = json(&out);
        assert_eq!(full["parameters"], params, "{recipe}");
        assert_eq!(full["tokens_per_micro_batch"], 131072);
        assert_eq!(full["checkpoint_bytes"], 0.0);
        assert_eq!(
            full["host_checkpoint_bytes"],
            32.0 * 4096.0 * 131072.0 * 4.0
        );
        assert!(text.contains("fits:"), "{text}");
        // At 32K rows: at most 0.6x HF + PEFT's measured 71 GiB (benches/peers/hf_gpu_baseline.py).
        let short = json(&plan(&["data.max_length=32768"]));
        let gib = short["peak_bytes"].as_f64().unwrap() / (1u64 << 30) as f64;
        assert!(gib <= 0.6 * 71.0, "{recipe} at 32K: {gib} GiB");
        // Untiled, the recomputed layer holds more; kept on the device, the checkpoints do
        // not fit, and the refusal names the offload.
        let untiled = json(&plan(&["memory.mlp_tile=0"]));
        assert!(untiled["recompute_bytes"].as_f64() > full["recompute_bytes"].as_f64());
        let out = plan(&["memory.offload_checkpoints=false"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("these settings fit: --set memory.offload_checkpoints=true"),
            "{err}"
        );
    }
}
