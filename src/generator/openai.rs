//! The OpenAI-compatible backend: chat completions over HTTP (ureq), for running the same
//! stages against vLLM, SGLang, llama.cpp or a hosted API. Requests run up to `concurrency`
//! at a time, the number in flight adapted to the server ([`Pacer`]: halved on 429/503 or
//! when latency climbs without more throughput, raised by one while throughput grows);
//! timeouts, connection errors, 429 and 5xx are retried with exponential backoff; other
//! errors fail with the server's message. It does not tokenize: prompts are messages, or
//! (`/v1/completions`, for evaluation) text the caller rendered with the model's template.

use crate::engine::chat::Message;
use crate::engine::config::GenerationParams;
use crate::engine::generate::{Completion, FinishReason};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Duration;

/// An OpenAI-compatible chat-completions server used instead of the local engine (vLLM,
/// SGLang, llama.cpp's server, or a hosted API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// Base URL up to and including `/v1`, e.g. `http://127.0.0.1:8000/v1`.
    pub base_url: String,
    /// The model name the server expects.
    pub model: String,
    /// Environment variable holding the API key (sent as a bearer token when set).
    pub api_key_env: String,
    /// Seconds one request may take before it is retried.
    pub timeout_s: f64,
    /// Retries after a timeout, a connection error, HTTP 429 or 5xx (other errors fail at once).
    pub max_retries: usize,
    /// First wait between retries, doubled each time.
    pub retry_backoff_s: f64,
    /// Most requests in flight at once.
    pub concurrency: usize,
    /// Adapt the number in flight (start at `min(4, concurrency)`; false: always
    /// `concurrency`).
    pub adaptive: bool,
    /// How a JSON schema is sent: `json_schema` (OpenAI, vLLM, SGLang, llama.cpp's
    /// llama-server) or `json_object` (`{"type": "json_object", "schema": …}`, llama-cpp-python).
    pub json_format: JsonFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum JsonFormat {
    JsonSchema,
    JsonObject,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            base_url: String::new(),
            model: String::new(),
            api_key_env: "OPENAI_API_KEY".into(),
            timeout_s: 600.0,
            max_retries: 3,
            retry_backoff_s: 1.0,
            concurrency: 8,
            adaptive: true,
            json_format: JsonFormat::JsonSchema,
        }
    }
}

pub struct OpenAiClient {
    pub config: OpenAiConfig,
    agent: ureq::Agent,
    api_key: Option<String>,
    pacer: Box<Pacer>,
}

/// One failed attempt: whether another attempt may succeed, and whether the server said it
/// is overloaded (429, 503).
enum Failure {
    Retry { msg: String, overloaded: bool },
    Fatal(String),
}

/// The number of requests allowed in flight, adapted as TCP congestion control adapts its
/// window (additive increase, multiplicative decrease): over each window of completions,
/// more throughput than the last window raises the limit by one; an overloaded reply, or a
/// median latency over twice the best window's without more throughput, halves it.
pub struct Pacer {
    state: std::sync::Mutex<PacerState>,
    freed: std::sync::Condvar,
    max: usize,
    adaptive: bool,
}

struct PacerState {
    limit: usize,
    in_flight: usize,
    window_start: std::time::Instant,
    latencies: Vec<f64>,
    last_throughput: f64,
    best_latency: f64,
}

impl Pacer {
    pub fn new(max: usize, adaptive: bool) -> Self {
        Self {
            state: std::sync::Mutex::new(PacerState {
                limit: if adaptive { max.min(4) } else { max },
                in_flight: 0,
                window_start: std::time::Instant::now(),
                latencies: Vec::new(),
                last_throughput: 0.0,
                best_latency: f64::INFINITY,
            }),
            freed: std::sync::Condvar::new(),
            max,
            adaptive,
        }
    }

    /// Requests allowed in flight now.
    pub fn limit(&self) -> usize {
        self.state.lock().map_or(1, |s| s.limit)
    }

    /// Waits for a slot.
    fn acquire(&self) {
        let Ok(mut s) = self.state.lock() else { return };
        while s.in_flight >= s.limit {
            match self.freed.wait(s) {
                Ok(g) => s = g,
                Err(_) => return,
            }
        }
        s.in_flight += 1;
    }

    /// Frees a slot after an attempt that took `latency` seconds.
    fn release(&self, latency: f64, overloaded: bool) {
        let Ok(mut s) = self.state.lock() else { return };
        s.in_flight = s.in_flight.saturating_sub(1);
        if self.adaptive {
            if overloaded {
                s.limit = (s.limit / 2).max(1);
                s.latencies.clear();
                s.window_start = std::time::Instant::now();
            } else {
                s.latencies.push(latency);
                if s.latencies.len() >= 2 * s.limit.max(2) {
                    let n = s.latencies.len();
                    let throughput = n as f64 / s.window_start.elapsed().as_secs_f64().max(1e-6);
                    s.latencies.sort_by(f64::total_cmp);
                    let median = s.latencies[n / 2];
                    s.best_latency = s.best_latency.min(median);
                    let grew = throughput > s.last_throughput * 1.05;
                    if grew && s.limit < self.max {
                        s.limit += 1;
                    } else if !grew && median > 2.0 * s.best_latency {
                        s.limit = (s.limit / 2).max(1);
                    }
                    s.last_throughput = throughput;
                    s.latencies.clear();
                    s.window_start = std::time::Instant::now();
                }
            }
        }
        drop(s);
        self.freed.notify_all();
    }
}

impl OpenAiClient {
    pub fn new(config: OpenAiConfig) -> Result<Self> {
        if config.base_url.is_empty() {
            bail!("the OpenAI-compatible backend needs a base URL (e.g. http://127.0.0.1:8000/v1)");
        }
        if !(config.base_url.starts_with("http://") || config.base_url.starts_with("https://")) {
            bail!(
                "server URL {:?} must start with http:// or https://",
                config.base_url
            );
        }
        if config.concurrency == 0 || config.timeout_s.is_nan() || config.timeout_s <= 0.0 {
            bail!("server concurrency and timeout must be positive");
        }
        let timeout = Duration::from_secs_f64(config.timeout_s);
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(timeout.min(Duration::from_secs(30)))
            .timeout(timeout)
            .build();
        let api_key = std::env::var(&config.api_key_env)
            .ok()
            .filter(|k| !k.is_empty());
        Ok(Self {
            pacer: Box::new(Pacer::new(config.concurrency, config.adaptive)),
            config,
            agent,
            api_key,
        })
    }

    /// `chat/completions` or `completions` under the base URL.
    fn url(&self, endpoint: &str) -> String {
        format!("{}/{endpoint}", self.config.base_url.trim_end_matches('/'))
    }

    /// The request body for one chat.
    pub fn body(&self, messages: &[Message], p: &GenerationParams) -> serde_json::Value {
        let mut b = self.params_body(p);
        b["messages"] = messages
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect();
        b
    }

    /// The request body for one text completion (`/v1/completions`): a prompt already
    /// rendered, template and all, sent as text.
    pub fn completion_body(&self, prompt: &str, p: &GenerationParams) -> serde_json::Value {
        let mut b = self.params_body(p);
        b["prompt"] = json!(prompt);
        b
    }

    /// Model and generation parameters, common to both endpoints.
    fn params_body(&self, p: &GenerationParams) -> serde_json::Value {
        let mut b = json!({
            "model": self.config.model,
            "max_tokens": p.max_tokens,
            "temperature": p.sampling.temperature,
            "seed": p.sampling.seed,
        });
        if let Some(t) = p.sampling.top_p {
            b["top_p"] = json!(t);
        }
        if let Some(k) = p.sampling.top_k {
            b["top_k"] = json!(k);
        }
        if !p.stop.is_empty() {
            b["stop"] = json!(p.stop);
        }
        if let Some(schema) = &p.json_schema {
            // x-guidance is an llguidance extension other servers would reject.
            let mut s = schema.clone();
            if let Some(o) = s.as_object_mut() {
                o.remove("x-guidance");
            }
            b["response_format"] = match self.config.json_format {
                JsonFormat::JsonSchema => json!({"type": "json_schema",
                    "json_schema": {"name": "output", "schema": s, "strict": true}}),
                JsonFormat::JsonObject => json!({"type": "json_object", "schema": s}),
            };
        }
        b
    }

    fn attempt(
        &self,
        url: &str,
        body: &serde_json::Value,
    ) -> std::result::Result<serde_json::Value, Failure> {
        let mut req = self.agent.post(url);
        if let Some(k) = &self.api_key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let resp = match req.send_json(body.clone()) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                let msg = format!(
                    "HTTP {code}: {}",
                    text.chars().take(500).collect::<String>()
                );
                return Err(if code == 429 || code >= 500 {
                    Failure::Retry {
                        msg,
                        overloaded: code == 429 || code == 503,
                    }
                } else {
                    Failure::Fatal(msg)
                });
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(Failure::Retry {
                    msg: t.to_string(),
                    overloaded: false,
                })
            }
        };
        resp.into_json().map_err(|e| Failure::Retry {
            msg: format!("reading the response: {e}"),
            overloaded: false,
        })
    }

    /// One chat completion, retried as configured.
    pub fn chat(&self, messages: &[Message], params: &GenerationParams) -> Result<Completion> {
        completion_of(&self.request("chat/completions", &self.body(messages, params))?)
    }

    /// One text completion of a rendered prompt, retried as configured.
    pub fn complete(&self, prompt: &str, params: &GenerationParams) -> Result<Completion> {
        completion_of(&self.request("completions", &self.completion_body(prompt, params))?)
    }

    /// The log-likelihood of `continuation` after `context`, as lm-evaluation-harness's
    /// `local-completions` asks it: `context + continuation` as the prompt, echoed with
    /// `logprobs`, one greedy token generated (and ignored).
    pub fn loglikelihood(&self, context: &str, continuation: &str) -> Result<f64> {
        let params = GenerationParams {
            max_tokens: 1,
            sampling: crate::engine::config::SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut body = self.completion_body(&format!("{context}{continuation}"), &params);
        body["echo"] = json!(true);
        body["logprobs"] = json!(1);
        let v = self.request("completions", &body)?;
        let c = context.chars().count();
        continuation_logprob(&v, c, c + continuation.chars().count())
    }

    fn request(&self, endpoint: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        let url = self.url(endpoint);
        let mut wait = self.config.retry_backoff_s;
        let mut last = String::new();
        for attempt in 0..=self.config.max_retries {
            if attempt > 0 {
                tracing::warn!("{url}: {last}; retry {attempt} in {wait:.1} s");
                std::thread::sleep(Duration::from_secs_f64(wait));
                wait *= 2.0;
            }
            self.pacer.acquire();
            let t0 = std::time::Instant::now();
            let r = self.attempt(&url, body);
            let overloaded = matches!(
                r,
                Err(Failure::Retry {
                    overloaded: true,
                    ..
                })
            );
            self.pacer.release(t0.elapsed().as_secs_f64(), overloaded);
            match r {
                Ok(c) => return Ok(c),
                Err(Failure::Fatal(m)) => bail!("{url}: {m}"),
                Err(Failure::Retry { msg, .. }) => last = msg,
            }
        }
        bail!(
            "{url}: gave up after {} attempts: {last}",
            self.config.max_retries + 1
        )
    }

    /// Requests the client allows in flight now.
    pub fn concurrency_now(&self) -> usize {
        self.pacer.limit()
    }

    /// `run` over every item, up to `concurrency` in flight (as the pacer allows);
    /// `on_done(index, completion)` on the calling thread as each finishes. The first error
    /// (of a request, or of `on_done`) stops new requests and is returned once those in
    /// flight end.
    pub fn each<T: Sync, R: Send>(
        &self,
        items: &[T],
        run: impl Fn(&T) -> Result<R> + Sync,
        mut on_done: impl FnMut(usize, R) -> Result<()>,
    ) -> Result<()> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<R>)>();
        std::thread::scope(|s| {
            for _ in 0..self.config.concurrency.min(items.len()) {
                let tx = tx.clone();
                let (next, stop, run) = (&next, &stop, &run);
                s.spawn(move || loop {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    if tx.send((i, run(item))).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            let mut first_err = None;
            for (i, r) in rx {
                if first_err.is_some() {
                    continue;
                }
                if let Err(e) = r
                    .with_context(|| format!("request {i}"))
                    .and_then(|c| on_done(i, c))
                {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    first_err = Some(e);
                }
            }
            first_err.map_or(Ok(()), Err)
        })
    }

    /// Chat completions for every request, up to `concurrency` in flight (as the pacer
    /// allows), in input order.
    pub fn chat_batch(&self, reqs: &[(Vec<Message>, GenerationParams)]) -> Result<Vec<Completion>> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let out: Vec<std::sync::Mutex<Option<Result<Completion>>>> =
            reqs.iter().map(|_| std::sync::Mutex::new(None)).collect();
        std::thread::scope(|s| {
            for _ in 0..self.config.concurrency.min(reqs.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((m, p)) = reqs.get(i) else { break };
                    let r = self.chat(m, p);
                    *out[i].lock().expect("not poisoned") = Some(r);
                });
            }
        });
        out.into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.into_inner()
                    .expect("not poisoned")
                    .with_context(|| format!("request {i} was not run"))?
                    .with_context(|| format!("request {i}"))
            })
            .collect()
    }
}

/// A chat completion's message, or a text completion's text, from a response.
fn completion_of(v: &serde_json::Value) -> Result<Completion> {
    let choice = &v["choices"][0];
    let text = choice["message"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str())
        .with_context(|| format!("no choices[0].message.content or choices[0].text in {v}"))?
        .to_string();
    let finish_reason = match choice["finish_reason"].as_str() {
        Some("length") => FinishReason::Length,
        Some("stop") | None => FinishReason::Eos,
        Some(_) => FinishReason::Stop,
    };
    Ok(Completion {
        text,
        tokens: Vec::new(),
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize,
        cached_tokens: v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0) as usize,
        finish_reason,
    })
}

/// The log-probability of `prompt[context_chars..]` from an echoed completion's
/// `logprobs` (`text_offset` in characters, `token_logprobs`): the sum over the prompt's
/// tokens that end after the context, as lm-evaluation-harness sums the continuation's.
pub fn continuation_logprob(
    v: &serde_json::Value,
    context_chars: usize,
    prompt_chars: usize,
) -> Result<f64> {
    let lp = &v["choices"][0]["logprobs"];
    let (Some(offsets), Some(logprobs)) = (
        lp["text_offset"].as_array(),
        lp["token_logprobs"].as_array(),
    ) else {
        bail!("the server returned no logprobs.text_offset / logprobs.token_logprobs for an echoed prompt: it must support `echo` with `logprobs` on /v1/completions (vLLM and SGLang do)");
    };
    let offsets: Vec<usize> = offsets
        .iter()
        .map(|o| o.as_u64().map(|o| o as usize))
        .collect::<Option<_>>()
        .context("logprobs.text_offset: not a list of integers")?;
    if offsets.len() != logprobs.len() {
        bail!(
            "logprobs: {} text offsets for {} token log-probabilities",
            offsets.len(),
            logprobs.len()
        );
    }
    let mut sum = 0.0;
    let mut n = 0;
    for (i, &start) in offsets.iter().enumerate() {
        let end = offsets.get(i + 1).copied().unwrap_or(usize::MAX).max(start);
        if start >= prompt_chars || end <= context_chars {
            continue;
        }
        sum += logprobs[i].as_f64().with_context(|| {
            format!("logprobs.token_logprobs[{i}] is {} for a token of the continuation (an empty context has no log-probability for its first token)", logprobs[i])
        })?;
        n += 1;
    }
    if n == 0 {
        bail!(
            "no token of the echoed prompt lies in its last {} characters (the continuation)",
            prompt_chars - context_chars
        );
    }
    Ok(sum)
}
