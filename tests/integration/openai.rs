//! The OpenAI-compatible backend against a stub server on loopback
//! (`tests/fixtures/openai/stub_server.py`, stdlib only): request bodies, JSON-schema
//! formats, retries on 5xx/429/timeouts, immediate failure on 4xx, ordered concurrent
//! batches, and stage 1 run through it.

use crate::common::*;
use std::path::PathBuf;
use std::process::{Child, Command};
use wildlong::engine::chat::Message;
use wildlong::engine::config::GenerationParams;
use wildlong::engine::generate::FinishReason;
use wildlong::generator::openai::OpenAiClient;
use wildlong::generator::openai::{JsonFormat, OpenAiConfig};

/// The stub server, killed on drop.
struct Stub {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Stub {
    fn start() -> Self {
        let dir = tempdir();
        let port_file = dir.path().join("port");
        let child = Command::new("python3")
            .arg(fixture("openai/stub_server.py"))
            .arg(&port_file)
            .spawn()
            .expect("python3 runs the stub server");
        let t0 = std::time::Instant::now();
        let port = loop {
            if let Ok(s) = std::fs::read_to_string(&port_file) {
                break s.trim().parse().unwrap();
            }
            assert!(t0.elapsed().as_secs() < 30, "stub server did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        Self {
            child,
            port,
            log: dir.path().join("port.log"),
            _dir: dir,
        }
    }

    fn url(&self, mode: &str) -> String {
        format!("http://127.0.0.1:{}/{mode}/v1", self.port)
    }

    /// Request bodies received on `/mode/...`.
    fn requests(&self, mode: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| {
                v["path"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("/{mode}/"))
            })
            .map(|v| v["body"].clone())
            .collect()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(url: String, f: impl FnOnce(&mut OpenAiConfig)) -> OpenAiClient {
    let mut c = OpenAiConfig {
        base_url: url,
        model: "stub-model".into(),
        retry_backoff_s: 0.05,
        timeout_s: 10.0,
        ..Default::default()
    };
    f(&mut c);
    OpenAiClient::new(c).unwrap()
}

fn user(text: &str) -> Vec<Message> {
    vec![Message::new("user", text)]
}

#[test]
fn requests_carry_the_generation_settings_and_the_schema() {
    let s = Stub::start();
    let schema = serde_json::json!({"type": "object",
        "properties": {"city": {"type": "string"}, "size": {"enum": ["big", "small"]}},
        "required": ["city", "size"], "additionalProperties": false,
        "x-guidance": {"whitespace_flexible": false}});
    let params = GenerationParams {
        max_tokens: 50,
        json_schema: Some(schema.clone()),
        stop: vec!["END".into()],
        ..Default::default()
    };
    let c = client(s.url("ok"), |_| {});
    let out = c.chat(&user("Name a city."), &params).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out.text).unwrap();
    assert_eq!(v, serde_json::json!({"city": "city value", "size": "big"}));
    assert_eq!(out.finish_reason, FinishReason::Eos);
    assert_eq!(out.prompt_tokens, 7);
    let body = &s.requests("ok")[0];
    assert_eq!(body["model"], "stub-model");
    assert_eq!(body["max_tokens"], 50);
    assert_eq!(body["temperature"], 0.0);
    assert_eq!(body["seed"], 42);
    assert_eq!(body["stop"], serde_json::json!(["END"]));
    assert_eq!(body["messages"][0]["content"], "Name a city.");
    let rf = &body["response_format"];
    assert_eq!(rf["type"], "json_schema");
    assert_eq!(rf["json_schema"]["schema"]["required"], schema["required"]);
    assert!(rf["json_schema"]["schema"].get("x-guidance").is_none());

    let c = client(s.url("ok"), |c| c.json_format = JsonFormat::JsonObject);
    c.chat(&user("again"), &params).unwrap();
    let rf = &s.requests("ok")[1]["response_format"];
    assert_eq!(rf["type"], "json_object");
    assert_eq!(rf["schema"]["properties"]["size"]["enum"][1], "small");
}

#[test]
fn server_errors_and_timeouts_are_retried_and_client_errors_are_not() {
    let s = Stub::start();
    let p = GenerationParams::default();
    // 500, 500, then an answer.
    let out = client(s.url("flaky"), |_| {})
        .chat(&user("hi"), &p)
        .unwrap();
    assert_eq!(out.text, "echo: hi");
    assert_eq!(s.requests("flaky").len(), 3);
    // 429 once.
    client(s.url("busy"), |_| {}).chat(&user("hi"), &p).unwrap();
    assert_eq!(s.requests("busy").len(), 2);
    // The first request outlives a 1 s timeout; the retry answers.
    let out = client(s.url("slow"), |c| c.timeout_s = 1.0)
        .chat(&user("hi"), &p)
        .unwrap();
    assert_eq!(out.text, "echo: hi");
    assert_eq!(s.requests("slow").len(), 2);
    // 400: no retry, the server's message.
    let e = format!(
        "{:#}",
        client(s.url("bad"), |_| {})
            .chat(&user("hi"), &p)
            .unwrap_err()
    );
    assert!(
        e.contains("HTTP 400") && e.contains("does not exist"),
        "{e}"
    );
    assert_eq!(s.requests("bad").len(), 1);
    // 503 every time: gives up after 1 + 2 attempts.
    let e = format!(
        "{:#}",
        client(s.url("down"), |c| c.max_retries = 2)
            .chat(&user("hi"), &p)
            .unwrap_err()
    );
    assert!(
        e.contains("gave up after 3 attempts") && e.contains("503"),
        "{e}"
    );
    assert_eq!(s.requests("down").len(), 3);
    // Nothing listening.
    let e = format!(
        "{:#}",
        client("http://127.0.0.1:9/v1".into(), |c| c.max_retries = 1)
            .chat(&user("hi"), &p)
            .unwrap_err()
    );
    assert!(e.contains("gave up after 2 attempts"), "{e}");
    assert!(OpenAiClient::new(OpenAiConfig {
        base_url: "localhost:8000".into(),
        ..Default::default()
    })
    .is_err());
}

#[test]
fn concurrent_batches_come_back_in_order() {
    let s = Stub::start();
    let c = client(s.url("ok"), |c| c.concurrency = 4);
    let reqs: Vec<(Vec<Message>, GenerationParams)> = (0..10)
        .map(|i| (user(&format!("question {i}")), GenerationParams::default()))
        .collect();
    let out = c.chat_batch(&reqs).unwrap();
    for (i, o) in out.iter().enumerate() {
        assert_eq!(o.text, format!("echo: question {i}"));
    }
    assert_eq!(s.requests("ok").len(), 10);
}

#[test]
fn concurrency_backs_off_on_429_and_rises_while_throughput_grows() {
    let s = Stub::start();
    let reqs: Vec<_> = (0..48)
        .map(|i| (user(&format!("q{i}")), GenerationParams::default()))
        .collect();
    // A server that takes three at a time and says 429 beyond: every request still
    // succeeds, and the client settles near the server's capacity, not at its maximum.
    let c = client(s.url("capacity"), |c| {
        c.concurrency = 12;
        c.max_retries = 8;
        c.retry_backoff_s = 0.05;
    });
    assert_eq!(c.concurrency_now(), 4, "starts at min(4, concurrency)");
    let out = c.chat_batch(&reqs).unwrap();
    assert_eq!(out.len(), 48);
    assert!(
        c.concurrency_now() <= 5,
        "limit {} after 429s",
        c.concurrency_now()
    );
    // A server that never says 429 and serves more the more it is sent: the limit rises.
    let reqs: Vec<_> = (0..160)
        .map(|i| (user(&format!("p{i}")), GenerationParams::default()))
        .collect();
    let c = client(s.url("paced"), |c| c.concurrency = 16);
    c.chat_batch(&reqs).unwrap();
    assert!(
        c.concurrency_now() >= 6,
        "limit {} on a server with room",
        c.concurrency_now()
    );
    // Not adaptive: the configured number throughout.
    let c = client(s.url("paced"), |c| {
        c.concurrency = 16;
        c.adaptive = false;
    });
    assert_eq!(c.concurrency_now(), 16);
}

#[test]
fn stage1_runs_through_the_server() {
    let s = Stub::start();
    let d = tempdir();
    let run = d.path().to_str().unwrap();
    let url = s.url("ok");
    let server = [
        "--server",
        url.as_str(),
        "--model",
        "stub-model",
        "--no-progress",
    ];
    let mut a = vec!["extract", "--run", run, "--limit", "6"];
    a.extend(server);
    let out = ok(&wildlong(&a).output().unwrap());
    assert!(out.contains("extract: 6 records, 0 rejected"), "{out}");
    let meta = std::fs::read_to_string(d.path().join("stage1/meta.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(meta.lines().next().unwrap()).unwrap();
    assert_eq!(first["meta"]["task"], "task value");
    assert_eq!(first["provenance"]["model"], "stub-model");
    // The extraction chat: system, two worked examples, the query.
    let body = &s.requests("ok")[0];
    assert_eq!(body["messages"].as_array().unwrap().len(), 6);
    assert_eq!(
        body["response_format"]["json_schema"]["schema"]["properties"]["task"]["maxLength"],
        80
    );
    // Resumes: a rerun sends nothing.
    let n = s.requests("ok").len();
    ok(&wildlong(&a).output().unwrap());
    assert_eq!(s.requests("ok").len(), n);

    ok(&wildlong(&["graph", "--run", run]).output().unwrap());
    let mut a = vec!["sample", "--run", run, "--per-type", "2"];
    a.extend(server);
    let out = ok(&wildlong(&a).output().unwrap());
    assert!(out.contains("new blueprints"), "{out}");
    let bp = std::fs::read_to_string(d.path().join("stage1/blueprints.jsonl")).unwrap();
    assert!(bp.contains("\"instruction\":\"instruction value\""), "{bp}");
}

#[test]
fn stage2_runs_through_the_server() {
    let s = Stub::start();
    let d = tempdir();
    let run = d.path().join("run");
    let bp = crate::stage2::blueprint_file(d.path());
    // One untyped document the heuristic cannot place: the server types it.
    let folder = d.path().join("docs");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(
        folder.join("letter.txt"),
        "Dear Anna, the garden is in bloom and we think of you often.",
    )
    .unwrap();
    let url = s.url("ok");
    let args = [
        "synth",
        "--server",
        url.as_str(),
        "--model",
        "stub-model",
        "--run",
        run.to_str().unwrap(),
        "--blueprints",
        bp.to_str().unwrap(),
        "--documents",
        "sample",
        "--documents",
        folder.to_str().unwrap(),
        "--set",
        "assemble.buckets=[2048]",
        "--set",
        "assemble.per_bucket=2",
        "--set",
        "assemble.multi_document_share=0.5",
    ];
    let out = ok(&wildlong(&args).output().unwrap());
    let dir = run.join("stage2");
    let docs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("documents_stats.json")).unwrap())
            .unwrap();
    assert_eq!(docs["typed_by_llm"], 1, "{docs}");
    let contexts: Vec<wildlong::stage2::assemble::Context> =
        wildlong::records::read_jsonl_resumable(&dir.join("contexts.jsonl")).unwrap();
    assert_eq!(contexts.len(), 2);
    let reqs = s.requests("ok");
    let user_of = |b: &serde_json::Value| {
        let m = b["messages"].as_array().unwrap();
        m.last().unwrap()["content"].as_str().unwrap().to_string()
    };
    // The classifier's request: the taxonomy as an enum.
    let classify: Vec<_> = reqs
        .iter()
        .filter(|b| user_of(b).contains("Dear Anna"))
        .collect();
    assert_eq!(classify.len(), 1);
    assert!(
        classify[0]["response_format"]["json_schema"]["schema"]["properties"]["document_type"]
            ["enum"]
            .as_array()
            .unwrap()
            .len()
            > 20
    );
    // Rewrites (with a schema) and answers carry the whole context; the answer's user turn
    // is the context, a blank line and the instruction.
    let with_context =
        |b: &&serde_json::Value| contexts.iter().any(|c| user_of(b).starts_with(&c.text));
    let rewrites = reqs
        .iter()
        .filter(with_context)
        .filter(|b| b.get("response_format").is_some())
        .count();
    let answers: Vec<_> = reqs
        .iter()
        .filter(with_context)
        .filter(|b| b.get("response_format").is_none())
        .collect();
    // One blueprint per type in the file: one instruction per context.
    assert_eq!(rewrites, 2);
    assert_eq!(answers.len(), 2);
    for a in &answers {
        assert!(user_of(a).ends_with("\n\ninstruction value"));
        assert_eq!(a["messages"][0]["role"], "system");
    }
    // Closed-book requests: the instruction alone.
    let closed = reqs
        .iter()
        .filter(|b| user_of(b) == "instruction value")
        .count();
    assert!(closed >= 1);
    assert_eq!(reqs.len(), 1 + 2 + 2 + closed);
    // The stub gives every blueprint the same instruction: one pair, the other a
    // near-duplicate.
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("synth_stats.json")).unwrap())
            .unwrap();
    assert_eq!(stats["pairs"], 1, "{stats} {out}");
    assert_eq!(
        stats["rejected"]["near_duplicate_instruction"], 1,
        "{stats}"
    );
    let data = std::fs::read_to_string(dir.join("data.jsonl")).unwrap();
    let pair: wildlong::records::Pair = serde_json::from_str(data.trim()).unwrap();
    assert_eq!(pair.metadata.model, "stub-model");
    assert!(pair.messages[1].content.starts_with("echo: "));
    // A rerun asks the server nothing.
    ok(&wildlong(&args).output().unwrap());
    assert_eq!(s.requests("ok").len(), reqs.len());
}

/// llama.cpp's server (llama-cpp-python[server], installed by scripts/test.sh) serving the
/// default GGUF on loopback; its output goes to a log file; killed on drop.
struct LlamaServer {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl LlamaServer {
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Starts the server without waiting for it.
    fn spawn(port: u16) -> Self {
        let dir = tempdir();
        let log = dir.path().join("server.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(llama_python())
            .arg(root().join("scripts/llamacpp_plain.py"))
            .args(["llama_cpp.server", "--model"])
            .arg(default_model_path())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--n_ctx", "4096", "--n_threads", "1", "--verbose", "false"])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("the llama.cpp server starts");
        Self {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    /// Fails the test at once, with the server's log, if the server has exited (a client
    /// would otherwise retry its connection for as long as its backoff allows).
    fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "the llama.cpp server exited ({status}); the end of its log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn llama_cpp_server_serves_the_backend_and_stage2() {
    let _limit = time_limit(6);
    let port = LlamaServer::free_port();
    let mut srv = LlamaServer::spawn(port);
    let url = srv.url();
    let cfg = |f: &dyn Fn(&mut OpenAiConfig)| {
        let mut c = OpenAiConfig {
            base_url: url.clone(),
            model: "smollm2".into(),
            json_format: JsonFormat::JsonObject,
            timeout_s: 60.0,
            max_retries: 12,
            retry_backoff_s: 0.5,
            ..Default::default()
        };
        f(&mut c);
        OpenAiClient::new(c).unwrap()
    };
    // Sent before the server listens: connection errors are retried with backoff until it
    // answers (0.5 s doubling, 12 retries: about half an hour at most), while the server is
    // watched so that one that dies fails the test with its log.
    let greedy = GenerationParams {
        max_tokens: 12,
        ..Default::default()
    };
    let first = {
        let (client, greedy) = (cfg(&|_| {}), greedy.clone());
        std::thread::spawn(move || client.chat(&user("What is the capital of France?"), &greedy))
    };
    while !first.is_finished() {
        srv.assert_alive();
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = first.join().unwrap().unwrap();
    assert!(!out.text.trim().is_empty());
    assert!(out.prompt_tokens > 5, "{}", out.prompt_tokens);
    // The token cap is reported as `length`.
    let capped = GenerationParams {
        max_tokens: 3,
        ..Default::default()
    };
    let out = cfg(&|_| {})
        .chat(&user("Write a long story about a dragon."), &capped)
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Length);
    // JSON constrained by the schema (llama-cpp-python's json_object + schema).
    let schema = serde_json::json!({"type": "object",
        "properties": {"city": {"type": "string"}, "size": {"enum": ["big", "small"]}},
        "required": ["city", "size"], "additionalProperties": false});
    let json = GenerationParams {
        max_tokens: 60,
        json_schema: Some(schema),
        ..Default::default()
    };
    let out = cfg(&|_| {})
        .chat(&user("Name a city and its size."), &json)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out.text).unwrap();
    assert!(v["city"].is_string(), "{v}");
    assert!(v["size"] == "big" || v["size"] == "small", "{v}");
    // A client error (a prompt longer than the server's context): no retry, its message.
    let huge = "word ".repeat(6000);
    let e = format!(
        "{:#}",
        cfg(&|_| {}).chat(&user(&huge), &greedy).unwrap_err()
    );
    assert!(e.contains("HTTP 400"), "{e}");
    // Stage 2 through the server: documents typed and answered, pairs written.
    let d = tempdir();
    let bp = crate::stage2::blueprint_file(d.path());
    let run = d.path().join("run");
    let out = ok(&wildlong(&[
        "synth",
        "--server",
        url.as_str(),
        "--server-json-format",
        "json-object",
        "--server-concurrency",
        "2",
        "--model",
        "smollm2",
        "--run",
        run.to_str().unwrap(),
        "--blueprints",
        bp.to_str().unwrap(),
        "--set",
        "assemble.buckets=[2048]",
        "--set",
        "assemble.per_bucket=2",
        "--set",
        "generate.max_answer_tokens=64",
    ])
    .output()
    .unwrap());
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("stage2/synth_stats.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(stats["contexts"], 2, "{out}");
    // Two rewrites, two answers, a closed-book answer for each that passed the gates.
    assert!(stats["generated"].as_u64().unwrap() >= 4, "{stats}");
    let rejected: u64 = stats["rejected"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(stats["pairs"].as_u64().unwrap() + rejected, 2, "{stats}");
    for line in std::fs::read_to_string(run.join("stage2/data.jsonl"))
        .unwrap()
        .lines()
    {
        let p: wildlong::records::Pair = serde_json::from_str(line).unwrap();
        assert_eq!(p.metadata.model, "smollm2");
        assert!(p.metadata.prompt_tokens <= 2048);
    }
}

/// `eval ruler --server` on the stub's `/v1/completions`, whole and in two shards.
fn ruler_on(
    url: &str,
    out: &std::path::Path,
    cache: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "eval",
        "ruler",
        "--server",
        url,
        "--model",
        "stub-model",
        "--tokenizer",
        "default",
        "--lengths",
        "512",
        "--tasks",
        "niah_single_1,qa_1",
        "--samples",
        "3",
        "--no-progress",
        "--out",
        out.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    wildlong(&args).output().unwrap()
}

#[test]
fn ruler_runs_on_a_server_resumes_and_its_shards_merge_to_the_whole_run() {
    use wildlong::eval::ruler::report::Report;
    use wildlong::eval::ruler::run::Prediction;
    use wildlong::eval::ruler::synth::Sample;
    use wildlong::records::read_jsonl_resumable;
    let _limit = time_limit(3);
    let stub = Stub::start();
    let url = stub.url("ok");
    let d = tempdir();
    let cache = d.path().join("cache");
    let whole = d.path().join("whole");
    ok(&ruler_on(&url, &whole, &cache, &[]));
    let reqs = stub.requests("ok");
    assert_eq!(reqs.len(), 6, "one text completion per sample");
    for (task, max_tokens) in [("niah_single_1", 128), ("qa_1", 32)] {
        let dir = whole.join("512").join(task);
        let samples: Vec<Sample> = read_jsonl_resumable(&dir.join("data.jsonl")).unwrap();
        let preds: Vec<Prediction> = read_jsonl_resumable(&dir.join("pred.jsonl")).unwrap();
        assert_eq!((samples.len(), preds.len()), (3, 3), "{task}");
        for s in &samples {
            // The prompt is rendered here, template, input and answer prefix, as text; the
            // generation settings are RULER's (greedy, its tokens to generate).
            let body = reqs
                .iter()
                .find(|b| b["prompt"].as_str().unwrap().contains(&s.input))
                .unwrap_or_else(|| panic!("{task} sample {} was not sent", s.index));
            let prompt = body["prompt"].as_str().unwrap();
            assert!(prompt.ends_with(&s.answer_prefix), "{task}: {prompt:?}");
            assert!(
                prompt.starts_with("<|im_start|>"),
                "the model's chat template: {prompt:?}"
            );
            assert_eq!(body["model"], "stub-model");
            assert_eq!(body["max_tokens"], max_tokens, "{task}");
            assert_eq!(body["temperature"], 0.0);
            assert!(body.get("messages").is_none());
            let p = preds.iter().find(|p| p.index == s.index).unwrap();
            let tail: String = prompt
                .chars()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            assert_eq!(p.pred, format!("echo: {tail}"));
            assert_eq!(
                (p.prompt_tokens, p.hash.as_str()),
                (prompt.chars().count(), s.hash.as_str())
            );
            assert_eq!(p.finish_reason, "length");
        }
    }
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["weights"], format!("server {url}"));
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("engine_stats.json")).unwrap())
            .unwrap();
    assert_eq!(stats["requests"], 6);
    let report = Report::load(&whole.join("report.json")).unwrap();
    assert_eq!(report.results.len(), 2);
    // A rerun asks the server nothing.
    ok(&ruler_on(&url, &whole, &cache, &[]));
    assert_eq!(stub.requests("ok").len(), 6);

    // Two shards into one folder: disjoint shares that cover every sample, no report until
    // the merge; a merge with a shard missing fails naming a sample.
    let sharded = d.path().join("sharded");
    let out = ok(&ruler_on(&url, &sharded, &cache, &["--shard", "1/2"]));
    assert!(out.contains("--merge"), "{out}");
    assert!(!sharded.join("report.json").exists());
    let o = ruler_on(&url, &sharded, &cache, &["--merge"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("have no prediction") && err.contains("sample"),
        "{err}"
    );
    ok(&ruler_on(&url, &sharded, &cache, &["--shard", "2/2"]));
    assert_eq!(
        stub.requests("ok").len(),
        12,
        "each sample once across the shards"
    );
    let mut indices = Vec::new();
    for task in ["niah_single_1", "qa_1"] {
        let dir = sharded.join("512").join(task);
        assert!(!dir.join("pred.jsonl").exists());
        let mut all = Vec::new();
        for k in 1..=2 {
            let p: Vec<Prediction> =
                read_jsonl_resumable(&dir.join(format!("pred.shard-{k}-of-2.jsonl"))).unwrap();
            indices.push(p.len());
            all.extend(p.into_iter().map(|p| p.index));
        }
        all.sort();
        assert_eq!(all, [0, 1, 2], "{task}");
    }
    assert_eq!(
        indices,
        [2, 1, 1, 2],
        "samples numbered across tasks, every second one each"
    );
    ok(&ruler_on(&url, &sharded, &cache, &["--merge"]));
    assert_eq!(stub.requests("ok").len(), 12, "a merge generates nothing");
    let merged = Report::load(&sharded.join("report.json")).unwrap();
    let scores = |r: &Report| {
        r.results
            .iter()
            .map(|x| (x.task.clone(), x.score))
            .collect::<Vec<_>>()
    };
    assert_eq!(scores(&merged), scores(&report));

    // A server's refusal fails the run with its message.
    let o = ruler_on(&stub.url("bad"), &d.path().join("bad"), &cache, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("HTTP 400") && err.contains("does not exist"),
        "{err}"
    );
    // A server serves its own weights: an adapter is refused.
    let o = ruler_on(&url, &d.path().join("a"), &cache, &["--adapter", "nowhere"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--adapter"));
}

#[test]
fn ruler_on_llama_cpp_s_server_predicts_what_the_local_engine_predicts() {
    use wildlong::eval::ruler::run::Prediction;
    use wildlong::records::read_jsonl_resumable;
    let _limit = time_limit(4);
    let port = LlamaServer::free_port();
    let mut srv = LlamaServer::spawn(port);
    let d = tempdir();
    let cache = d.path().join("cache");
    let tasks = ["niah_single_1", "niah_multikey_1", "qa_1"];
    let run = |out: &std::path::Path, how: &[&str]| {
        let mut args = vec![
            "eval",
            "ruler",
            "--lengths",
            "512",
            "--samples",
            "2",
            "--no-progress",
        ];
        let joined = tasks.join(",");
        args.extend_from_slice(&["--tasks", &joined, "--out", out.to_str().unwrap()]);
        args.extend_from_slice(&["--cache-dir", cache.to_str().unwrap()]);
        args.extend_from_slice(how);
        wildlong(&args).output().unwrap()
    };
    let local = d.path().join("local");
    ok(&run(&local, &["--model", "default"]));
    let remote = d.path().join("server");
    let t0 = std::time::Instant::now();
    let url = srv.url();
    let server = [
        "--server",
        &url,
        "--model",
        "smollm2",
        "--tokenizer",
        "default",
        "--server-retries",
        "8",
    ];
    // The server may still be loading: the client retries refused connections.
    let o = loop {
        let o = run(&remote, &server);
        srv.assert_alive();
        if o.status.success() || t0.elapsed().as_secs() > 60 {
            break o;
        }
    };
    ok(&o);
    // The same samples, rendered here and tokenized there to the same number of tokens, and
    // the same greedy answers from the same GGUF.
    for t in tasks {
        let preds = |dir: &std::path::Path| {
            let mut p: Vec<Prediction> =
                read_jsonl_resumable(&dir.join("512").join(t).join("pred.jsonl")).unwrap();
            p.sort_by_key(|p| p.index);
            p
        };
        let (a, b) = (preds(&local), preds(&remote));
        assert_eq!(a.len(), 2, "{t}");
        for (a, b) in a.iter().zip(&b) {
            assert_eq!(a.hash, b.hash, "{t}");
            assert_eq!(
                a.prompt_tokens, b.prompt_tokens,
                "{t} sample {}: prompt tokens",
                a.index
            );
            assert_eq!(a.pred, b.pred, "{t} sample {}", a.index);
        }
    }
}

#[test]
fn longbench_runs_on_a_server_as_pred_py_calls_one() {
    let stub = Stub::start();
    let d = tempdir();
    let out = d.path().join("lb");
    let (url, data) = (
        stub.url("ok"),
        fixture("longbench/data.json").display().to_string(),
    );
    let run = |extra: &[&str]| {
        let mut a = vec![
            "eval",
            "longbench",
            "--server",
            &url,
            "--model",
            "stub-model",
            "--tokenizer",
            "default",
            "--no-progress",
            "--data",
            &data,
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        wildlong(&a).output().unwrap()
    };
    // The server's context is unknown here: the cut must be given.
    let o = run(&[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--max-len"));
    ok(&run(&["--max-len", "100"]));
    let reqs = stub.requests("ok");
    assert_eq!(reqs.len(), 3);
    for b in &reqs {
        let m = b["messages"].as_array().unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0]["role"], "user");
        let text = m[0]["content"].as_str().unwrap();
        assert!(
            text.starts_with("Please read the following text")
                && text.ends_with("(insert answer here)\".")
        );
        assert_eq!(
            (b["temperature"].as_f64(), b["max_tokens"].as_u64()),
            (Some(0.1), Some(128))
        );
    }
    let preds: Vec<wildlong::eval::longbench::Prediction> =
        wildlong::records::read_jsonl_resumable(&out.join("pred.jsonl")).unwrap();
    assert!(preds
        .iter()
        .all(|p| p.pred.is_none() && !p.judge && p.response.starts_with("echo: Please read")));
}

#[test]
fn a_continuation_s_logprob_sums_the_echoed_tokens_after_its_context() {
    use wildlong::generator::openai::continuation_logprob;
    let v = serde_json::json!({"choices": [{"logprobs": {
        "tokens": ["Hello", " wor", "ld", "!"],
        "text_offset": [0, 5, 9, 11],
        "token_logprobs": [null, -1.0, -2.0, -4.0]}}]});
    // "Hello wo" + "rld": the token straddling the boundary counts, the generated "!" not.
    assert_eq!(continuation_logprob(&v, 8, 11).unwrap(), -3.0);
    assert_eq!(continuation_logprob(&v, 9, 11).unwrap(), -2.0);
    // An empty context: the first token has no log-probability.
    let e = format!("{:#}", continuation_logprob(&v, 0, 11).unwrap_err());
    assert!(e.contains("token_logprobs[0] is null"), "{e}");
    let e = format!(
        "{:#}",
        continuation_logprob(&serde_json::json!({"choices": [{"text": "x"}]}), 1, 2).unwrap_err()
    );
    assert!(e.contains("echo"), "{e}");
}

#[test]
fn eval_short_runs_on_a_server_and_resumes() {
    use wildlong::eval::short::run::{ShortPrediction, ShortReport};
    use wildlong::records::read_jsonl_resumable;
    let _limit = time_limit(3);
    let stub = Stub::start();
    let url = stub.url("ok");
    let d = tempdir();
    let out = d.path().join("short");
    let f = |p: &str| fixture(p).display().to_string();
    let args = [
        "eval".to_string(),
        "short".into(),
        "--server".into(),
        url.clone(),
        "--model".into(),
        "stub-model".into(),
        format!("--data=arc_easy={}", f("short/arc_easy.jsonl")),
        format!("--data=gsm8k={}", f("short/gsm8k.jsonl")),
        "--max-gen-tokens=48".into(),
        "--no-progress".into(),
        "--out".into(),
        out.display().to_string(),
    ];
    let run = |extra: &[&str]| {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.extend_from_slice(extra);
        wildlong(&a).output().unwrap()
    };
    ok(&run(&[]));
    let reqs = stub.requests("ok");
    // ARC: one echoed completion per option (4 + 2), the prompt the context and the option;
    // GSM8K: one greedy completion per item (2) with lm-eval's stop strings.
    let (scored, generated): (Vec<_>, Vec<_>) = reqs
        .iter()
        .partition(|b| b["echo"] == serde_json::json!(true));
    assert_eq!((scored.len(), generated.len()), (6, 2));
    for b in &scored {
        assert_eq!(
            (b["logprobs"].as_u64(), b["max_tokens"].as_u64()),
            (Some(1), Some(1))
        );
        assert!(b["prompt"].as_str().unwrap().contains("\nAnswer: "), "{b}");
    }
    for b in &generated {
        assert_eq!(b["max_tokens"], 48);
        assert_eq!(b["temperature"], 0.0);
        assert!(
            b["stop"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s == "Question:"),
            "{b}"
        );
    }
    // Each option's log-likelihood is the stub's over the option's words (minus each word's
    // length): the context's tokens and the generated token are left out.
    let preds: Vec<ShortPrediction> =
        read_jsonl_resumable(&out.join("arc_easy/pred.jsonl")).unwrap();
    let items = wildlong::eval::short::data::read(
        wildlong::eval::short::data::Task::ArcEasy,
        &f("short/arc_easy.jsonl"),
        None,
    )
    .unwrap();
    assert_eq!(preds.len(), 2);
    for p in &preds {
        let want: Vec<f64> = items[p.index]
            .choices
            .iter()
            .map(|c| {
                -(c.split_whitespace()
                    .map(|w| w.chars().count())
                    .sum::<usize>() as f64)
            })
            .collect();
        assert_eq!(p.loglik, want, "item {}", p.index);
    }
    let r = ShortReport::load(&out.join("report.json")).unwrap();
    assert_eq!(r.results.len(), 2);
    let run_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run_json["weights"], format!("server {url}"));
    // A rerun asks the server nothing; an adapter is refused.
    ok(&run(&[]));
    assert_eq!(stub.requests("ok").len(), 8);
    let o = run(&["--adapter", "somewhere"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("serves its own weights"));
}
