//! The bad-input corpus through the binary: each input gives exit 1 and an error naming the
//! file or key — never a panic — and leaves what was already written whole. (Bad conversations,
//! documents and training data — malformed and truncated JSONL, non-UTF-8, empty files, wrong
//! Parquet schemas, over-long documents — are counted or refused in stage1.rs, stage2.rs and
//! train_run.rs; SIGKILLs of every stage in pipeline.rs, stage1.rs, stage2.rs and ruler.rs.)

use crate::common::*;
use std::path::{Path, PathBuf};

/// Runs wildlong and expects exit 1 with every `needles` in stderr and no panic.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let o = wildlong(args).current_dir(root()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: `{n}` not in {err}");
    }
    err
}

#[test]
fn truncated_and_corrupted_model_files_are_clear_errors() {
    let d = tempdir();
    let gguf = std::fs::read(default_model_path()).unwrap();
    let write = |name: &str, bytes: &[u8]| -> PathBuf {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let info = |p: &Path, needles: &[&str]| {
        fails(&["models", "info", p.to_str().unwrap()], needles);
    };
    info(&write("empty.gguf", b""), &["empty.gguf", "GGUF"]);
    info(&write("head.gguf", &gguf[..65536]), &["head.gguf", "GGUF"]);
    info(
        &write("cut.gguf", &gguf[..gguf.len() * 3 / 5]),
        &["cut.gguf", "truncated GGUF file"],
    );
    let mut bad = gguf[..1 << 20].to_vec();
    bad[..4].copy_from_slice(b"GGUX");
    info(&write("magic.gguf", &bad), &["magic.gguf", "GGUF magic"]);
    // The first metadata key's length made enormous.
    let mut bad = gguf[..1 << 20].to_vec();
    bad[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    info(&write("len.gguf", &bad), &["len.gguf", "past the end"]);

    // Safetensors folders: weights cut short, a garbage header, a config with a wrong type,
    // no tokenizer.
    let generate = |dir: &Path, needles: &[&str]| {
        fails(
            &[
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt",
                "hi",
                "--max-tokens",
                "1",
            ],
            needles,
        );
    };
    let m = tiny_fixture("llama3");
    let w = m.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    generate(m.path(), &["model.safetensors"]);
    let mut garbage = bytes.clone();
    garbage[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&w, &garbage).unwrap();
    generate(m.path(), &["model.safetensors"]);
    std::fs::write(&w, &bytes).unwrap();
    let cfg = m.path().join("config.json");
    let good = std::fs::read_to_string(&cfg).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["hidden_size"] = "big".into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    generate(m.path(), &["config.json", "hidden_size"]);
    std::fs::write(&cfg, &good[..good.len() / 2]).unwrap();
    generate(m.path(), &["config.json"]);
    std::fs::write(&cfg, &good).unwrap();
    std::fs::remove_file(m.path().join("tokenizer.json")).unwrap();
    generate(m.path(), &["tokenizer"]);
}

/// Makes a folder unwritable — also for root, through the immutable attribute — until dropped.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn new(dir: &Path) -> Self {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        let probe = dir.join(".probe");
        if std::fs::write(&probe, b"x").is_ok() {
            // Root ignores permissions.
            std::fs::remove_file(&probe).unwrap();
            let ok = std::process::Command::new("chattr")
                .arg("+i")
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "cannot make {} read-only (chattr +i failed)",
                dir.display()
            );
            assert!(
                std::fs::write(&probe, b"x").is_err(),
                "{} is still writable",
                dir.display()
            );
        }
        Self(dir.to_path_buf())
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
    }
}

#[test]
fn a_read_only_output_folder_is_a_clear_error_and_leaves_the_files_whole() {
    let d = tempdir();
    let run = d.path().join("run");
    let r = run.to_str().unwrap();
    ok(&wildlong(&["extract", "--run", r, "--filter-only"])
        .output()
        .unwrap());
    let stage1 = run.join("stage1");
    let snapshot = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().to_string(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = snapshot(&stage1);
    {
        let _ro = ReadOnly::new(&stage1);
        // Different settings, so the files must be rewritten.
        fails(
            &[
                "extract",
                "--run",
                r,
                "--filter-only",
                "--set",
                "filter.min_query_chars=40",
            ],
            &["stage1"],
        );
        // The pipeline, whose first step writes there.
        let cfg = d.path().join("p.toml");
        std::fs::write(
            &cfg,
            format!("[run]\ndir = \"{r}\"\n[stage1]\ninput = {{ limit = 2 }}\n[train]\n[stage2]\n[eval]\n"),
        )
        .unwrap();
        fails(
            &["run", cfg.to_str().unwrap(), "--no-progress"],
            &["stage1"],
        );
    }
    assert_eq!(snapshot(&stage1), before, "files changed or left behind");

    // An evaluation into a read-only folder.
    let out = d.path().join("eval");
    std::fs::create_dir_all(&out).unwrap();
    {
        let _ro = ReadOnly::new(&out);
        fails(
            &[
                "eval",
                "ruler",
                "--model",
                "default",
                "--lengths",
                "512",
                "--tasks",
                "vt",
                "--samples",
                "1",
                "--out",
                out.to_str().unwrap(),
                "--cache-dir",
                d.path().join("cache").to_str().unwrap(),
                "--prepare-only",
                "--no-progress",
            ],
            &["eval"],
        );
    }
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}

#[test]
fn bad_pipeline_inputs_stop_at_their_step_with_the_file_named() {
    let d = tempdir();
    let empty = d.path().join("empty.jsonl");
    std::fs::write(&empty, b"").unwrap();
    let nonutf8 = d.path().join("latin1.jsonl");
    std::fs::write(&nonutf8, b"\xff\xfe not json\n").unwrap();
    for (input, needle) in [(&empty, "empty.jsonl"), (&nonutf8, "latin1.jsonl")] {
        let run = d.path().join(format!("run-{needle}"));
        let cfg = d.path().join(format!("{needle}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[run]\ndir = \"{}\"\n[stage1]\ninput = {{ paths = [\"{}\"] }}\n[stage2]\n[train]\n[eval]\n",
                run.display(),
                input.display()
            ),
        )
        .unwrap();
        fails(&["run", cfg.to_str().unwrap(), "--no-progress"], &[needle]);
        let state = wildlong::pipeline::read_state(&run, "extract")
            .unwrap()
            .unwrap();
        assert_eq!(state.status, wildlong::pipeline::Status::Started);
        assert!(wildlong::pipeline::read_state(&run, "graph")
            .unwrap()
            .is_none());
    }
}
