//! The OpenAI-compatible backend against a stub server on loopback
//! (`tests/fixtures/openai/stub_server.py`, stdlib only): request bodies, JSON-schema
//! formats, retries on 5xx/429/timeouts, immediate failure on 4xx, ordered concurrent
//! batches, and stage 1 run through it.

use crate::common::*;
use std::path::PathBuf;
use std::process::{Child, Command};
use wildlong::config::{GenerationParams, JsonFormat, OpenAiConfig};
use wildlong::engine::chat::Message;
use wildlong::engine::generate::FinishReason;
use wildlong::engine::openai::OpenAiClient;

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
