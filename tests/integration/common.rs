//! Shared helpers: the default model (loaded once), fixture folders, tiny random models.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use wildlong::engine::config::EngineConfig;
use wildlong::engine::generate::Engine;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(p: &str) -> PathBuf {
    root().join("tests/fixtures").join(p)
}

pub fn default_model_path() -> PathBuf {
    let m = wildlong::models::default_manifest().unwrap();
    let p = root().join("models").join(&m.file);
    assert!(
        p.is_file(),
        "the default model is missing at {}: run `cargo run --release -- models fetch`",
        p.display()
    );
    p
}

pub fn load(spec: &Path, cfg: EngineConfig) -> Engine {
    wildlong::models::load_engine(spec.to_str().unwrap(), &root().join("models"), &cfg).unwrap()
}

/// The default model with f32 weights, loaded once per test process.
pub fn default_engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| load(&default_model_path(), EngineConfig::default()))
}

/// The largest |value| of a tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The sum of squares of a tensor.
pub fn sum_sq(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("wildlong-test")
        .tempdir()
        .unwrap()
}

/// The HF-made tiny checkpoint with `config.<variant>.json` as its config.
pub fn tiny_fixture(variant: &str) -> tempfile::TempDir {
    let d = tempdir();
    let src = fixture("tiny");
    std::fs::copy(
        src.join("model.safetensors"),
        d.path().join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(src.join("tokenizer.json"), d.path().join("tokenizer.json")).unwrap();
    std::fs::copy(
        src.join(format!("config.{variant}.json")),
        d.path().join("config.json"),
    )
    .unwrap();
    d
}

pub fn load_tensors(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Deterministic pseudo-random numbers in [-scale, scale) (no RNG crate state to pin).
pub fn lcg_values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Shape of a tiny random Llama made by the tests.
#[derive(Clone, Debug)]
pub struct TinySpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub max_pos: usize,
    pub tie: bool,
    /// Extra config.json fields (rope_scaling, sliding_window, model_type, rope_theta...).
    pub extra: serde_json::Value,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            hidden: 48,
            intermediate: 96,
            layers: 2,
            heads: 6,
            kv_heads: 2,
            vocab: 256,
            max_pos: 16,
            tie: false,
            extra: serde_json::json!({}),
        }
    }
}

/// Writes a random Llama checkpoint folder (safetensors + config.json + byte-level tokenizer.json).
pub fn tiny_random(spec: &TinySpec, seed: u64) -> tempfile::TempDir {
    let d = tempdir();
    let hd = spec.hidden / spec.heads;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut k = seed;
    let mut put = |name: String, shape: &[usize], scale: f32, offset: f32| {
        k += 1;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = lcg_values(k, n, scale)
            .into_iter()
            .map(|x| x + offset)
            .collect();
        t.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
    };
    put(
        "model.embed_tokens.weight".into(),
        &[spec.vocab, spec.hidden],
        1.0,
        0.0,
    );
    for i in 0..spec.layers {
        let p = format!("model.layers.{i}");
        let s = 1.0 / (spec.hidden as f32).sqrt() * 1.7;
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[spec.heads * hd, spec.hidden],
            s,
            0.0,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[spec.kv_heads * hd, spec.hidden],
            s,
            0.0,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[spec.kv_heads * hd, spec.hidden],
            s,
            0.0,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[spec.hidden, spec.heads * hd],
            s,
            0.0,
        );
        put(
            format!("{p}.mlp.gate_proj.weight"),
            &[spec.intermediate, spec.hidden],
            s,
            0.0,
        );
        put(
            format!("{p}.mlp.up_proj.weight"),
            &[spec.intermediate, spec.hidden],
            s,
            0.0,
        );
        put(
            format!("{p}.mlp.down_proj.weight"),
            &[spec.hidden, spec.intermediate],
            1.0 / (spec.intermediate as f32).sqrt(),
            0.0,
        );
        put(
            format!("{p}.input_layernorm.weight"),
            &[spec.hidden],
            0.2,
            1.0,
        );
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[spec.hidden],
            0.2,
            1.0,
        );
    }
    put("model.norm.weight".into(), &[spec.hidden], 0.2, 1.0);
    if !spec.tie {
        put(
            "lm_head.weight".into(),
            &[spec.vocab, spec.hidden],
            1.0 / (spec.hidden as f32).sqrt() * 3.0,
            0.0,
        );
    }
    candle_core::safetensors::save(&t, d.path().join("model.safetensors")).unwrap();
    let mut cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": spec.hidden, "intermediate_size": spec.intermediate, "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads, "vocab_size": spec.vocab,
        "max_position_embeddings": spec.max_pos, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": spec.tie, "hidden_act": "silu"
    });
    for (k, v) in spec.extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        fixture("tiny/tokenizer.json"),
        d.path().join("tokenizer.json"),
    )
    .unwrap();
    d
}

/// A plain f64 reference of the Llama forward pass over one unpadded sequence: loops, full
/// attention with an explicit causal/sliding mask, RoPE from the published formula applied
/// to (i, i + d/2) pairs. Returns logits `[t][vocab]`.
pub fn reference_forward(dir: &Path, tokens: &[u32]) -> Vec<Vec<f64>> {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let w = load_tensors(&dir.join("model.safetensors"));
    let get = |n: &str| -> Vec<Vec<f64>> {
        let t = &w[n];
        if t.rank() == 1 {
            vec![t
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect()]
        } else {
            t.to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .map(|r| r.into_iter().map(f64::from).collect())
                .collect()
        }
    };
    let u = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (h, heads, kvh, layers) = (
        u("hidden_size"),
        u("num_attention_heads"),
        u("num_key_value_heads"),
        u("num_hidden_layers"),
    );
    let hd = h / heads;
    let eps = cfg["rms_norm_eps"].as_f64().unwrap();
    let window = cfg
        .get("sliding_window")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize);
    let hf: wildlong::engine::llama::LlamaConfig = serde_json::from_value(cfg.clone()).unwrap();
    let rc = wildlong::engine::llama::Config::from_hf(&hf, None)
        .unwrap()
        .rope;
    let (inv, attn) = rc.inv_freq(tokens.len());
    let matvec = |m: &Vec<Vec<f64>>, x: &[f64]| -> Vec<f64> {
        m.iter()
            .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    };
    let rms = |x: &[f64], g: &[f64]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let s = 1.0 / (ms + eps).sqrt();
        x.iter().zip(g).map(|(v, g)| v * s * g).collect()
    };
    let rope = |v: &mut [f64], pos: usize| {
        for i in 0..hd / 2 {
            let a = (pos as f32 * inv[i]) as f64;
            let (c, s) = (a.cos() * attn as f64, a.sin() * attn as f64);
            let (x1, x2) = (v[i], v[i + hd / 2]);
            v[i] = x1 * c - x2 * s;
            v[i + hd / 2] = x2 * c + x1 * s;
        }
    };
    let emb = get("model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = tokens.iter().map(|&t| emb[t as usize].clone()).collect();
    let t = tokens.len();
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        let (wq, wk, wv, wo) = (
            get(&format!("{p}.self_attn.q_proj.weight")),
            get(&format!("{p}.self_attn.k_proj.weight")),
            get(&format!("{p}.self_attn.v_proj.weight")),
            get(&format!("{p}.self_attn.o_proj.weight")),
        );
        let g1 = get(&format!("{p}.input_layernorm.weight"))[0].clone();
        let g2 = get(&format!("{p}.post_attention_layernorm.weight"))[0].clone();
        let normed: Vec<Vec<f64>> = xs.iter().map(|x| rms(x, &g1)).collect();
        let mut q: Vec<Vec<f64>> = normed.iter().map(|x| matvec(&wq, x)).collect();
        let mut k: Vec<Vec<f64>> = normed.iter().map(|x| matvec(&wk, x)).collect();
        let v: Vec<Vec<f64>> = normed.iter().map(|x| matvec(&wv, x)).collect();
        for i in 0..t {
            for hh in 0..heads {
                rope(&mut q[i][hh * hd..(hh + 1) * hd], i);
            }
            for hh in 0..kvh {
                rope(&mut k[i][hh * hd..(hh + 1) * hd], i);
            }
        }
        let mut attn_out = vec![vec![0.0; heads * hd]; t];
        for i in 0..t {
            for hh in 0..heads {
                let kh = hh / (heads / kvh);
                let qv = &q[i][hh * hd..(hh + 1) * hd];
                let visible: Vec<usize> = (0..=i)
                    .filter(|&j| window.is_none_or(|w| i - j < w))
                    .collect();
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        qv.iter()
                            .zip(&k[j][kh * hd..(kh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (n, &j) in visible.iter().enumerate() {
                    for dd in 0..hd {
                        attn_out[i][hh * hd + dd] += e[n] / z * v[j][kh * hd + dd];
                    }
                }
            }
        }
        for i in 0..t {
            let o = matvec(&wo, &attn_out[i]);
            for (x, o) in xs[i].iter_mut().zip(o) {
                *x += o;
            }
            let n2 = rms(&xs[i], &g2);
            let gate = matvec(&get(&format!("{p}.mlp.gate_proj.weight")), &n2);
            let up = matvec(&get(&format!("{p}.mlp.up_proj.weight")), &n2);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = matvec(&get(&format!("{p}.mlp.down_proj.weight")), &act);
            for (x, d) in xs[i].iter_mut().zip(down) {
                *x += d;
            }
        }
    }
    let gn = get("model.norm.weight")[0].clone();
    let head = if w.contains_key("lm_head.weight") {
        get("lm_head.weight")
    } else {
        emb
    };
    xs.iter().map(|x| matvec(&head, &rms(x, &gn))).collect()
}

/// The `wildlong` binary with one CPU thread and the project's models folder.
pub fn wildlong(args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_wildlong"));
    c.args(args)
        .args(["--threads", "1", "--models-dir"])
        .arg(root().join("models"));
    c
}

/// Stdout of a command that must succeed (else the test fails with its output).
pub fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A long test's own time limit. libtest has none: past the limit the watchdog names the
/// test, kills the processes the test started (the `wildlong` binary, servers) and exits the
/// test process with code 124, so a hang fails in minutes instead of at CI's wall clock.
/// Dropping the guard (the test returned or panicked) disarms it.
/// `WILDLONG_TEST_TIME_LIMIT_S` replaces every limit (seconds), to try one out.
#[must_use = "the limit holds while the guard lives"]
pub struct TimeLimit {
    _disarm: std::sync::mpsc::Sender<()>,
}

pub fn time_limit(minutes: u64) -> TimeLimit {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let name = std::thread::current()
        .name()
        .unwrap_or("an unnamed test")
        .to_string();
    let secs = std::env::var("WILDLONG_TEST_TIME_LIMIT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(minutes * 60);
    std::thread::spawn(move || {
        let limit = std::time::Duration::from_secs(secs);
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            // Straight to the file: threads a test spawns share its captured output, which
            // libtest would never print once the process exits.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "\ntest {name} ran past its time limit of {secs} s: failing the run"
            );
            let _ = std::process::Command::new("pkill")
                .args(["-KILL", "-P", &std::process::id().to_string()])
                .status();
            std::process::exit(124);
        }
    });
    TimeLimit { _disarm: tx }
}

/// Hangs (with a child process) only when `WILDLONG_HANG_TEST` names a file for the child's
/// pid; run by the test below in a child test process.
#[test]
#[ignore = "run by a_hung_test_fails_by_its_own_time_limit_and_names_itself"]
fn hangs_past_its_time_limit() {
    let Some(pid_file) = std::env::var_os("WILDLONG_HANG_TEST") else {
        return;
    };
    let _limit = time_limit(10);
    // Its own stdio, so that a child the watchdog fails to kill does not hold the test's
    // output pipes open (the check below would then wait for it instead of failing).
    let mut child = std::process::Command::new("sleep")
        .arg("600")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(pid_file, child.id().to_string()).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(600));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_hung_test_fails_by_its_own_time_limit_and_names_itself() {
    let d = tempdir();
    let pid_file = d.path().join("child.pid");
    let t0 = std::time::Instant::now();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "common::hangs_past_its_time_limit"])
        .env("WILDLONG_TEST_TIME_LIMIT_S", "2")
        .env("WILDLONG_HANG_TEST", &pid_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{stderr}");
    assert!(
        stderr.contains("test common::hangs_past_its_time_limit ran past its time limit of 2 s"),
        "{stderr}"
    );
    assert!(t0.elapsed().as_secs() < 60);
    // The process the hung test started was killed with it.
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    // Running while /proc has it and it is no zombie (state Z, after the `)` of its name).
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, s)| !s.starts_with('Z'))
        })
    };
    let gone = (0..100).any(|_| {
        let r = running();
        if r {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        !r
    });
    assert!(gone, "the hung test's child {pid} is still running");
}

/// The Python with llama-cpp-python that scripts/test.sh installs (`WILDLONG_LLAMA_PYTHON`).
pub fn llama_python() -> PathBuf {
    let p = std::env::var_os("WILDLONG_LLAMA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/pyenv/bin/python"));
    assert!(
        p.is_file(),
        "{} is missing: scripts/test.sh installs llama-cpp-python[server] there (or set WILDLONG_LLAMA_PYTHON)",
        p.display()
    );
    p
}
