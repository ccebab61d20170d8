//! The generation engine: continuous batching (ragged prompts, refilled rows, preemption
//! under a small KV cache), prefix caching, sampling seeds, stop strings, EOS, context limits
//! and JSON-schema-constrained decoding.

use crate::common::*;
use wildlong::engine::chat::Message;
use wildlong::engine::config::{EngineConfig, GenerationParams, SamplingParams};
use wildlong::engine::generate::{FinishReason, Request};

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        ..Default::default()
    }
}

fn chat(q: &str) -> Vec<u32> {
    default_engine()
        .chat_prompt(&[Message::new("user", q)])
        .unwrap()
}

const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Name a color.",
    "Write one sentence about the ocean and the creatures that live deep below its surface.",
    "2+2=?",
    "Who wrote Romeo and Juliet?",
    "List three fruits.",
    "What is photosynthesis? Explain briefly for a child who is ten years old.",
    "Say hello.",
];

#[test]
fn ragged_batch_of_eight_equals_each_prompt_alone() {
    let e = default_engine();
    let reqs: Vec<Request> = QUESTIONS
        .iter()
        .map(|q| Request {
            prompt: chat(q),
            params: greedy(12),
        })
        .collect();
    let lens: std::collections::BTreeSet<usize> = reqs.iter().map(|r| r.prompt.len()).collect();
    assert!(lens.len() > 4, "prompts must be ragged");
    let batch = e.generate(&reqs, |_, _| {}).unwrap();
    for (r, b) in reqs.iter().zip(&batch) {
        let alone = e.generate(std::slice::from_ref(r), |_, _| {}).unwrap();
        assert_eq!(
            alone[0].tokens,
            b.tokens,
            "prompt of {} tokens",
            r.prompt.len()
        );
    }
}

/// The default model with engine settings changed (its own KV cache and prefix cache).
fn engine_with(cfg: EngineConfig) -> wildlong::engine::generate::Engine {
    load(&default_model_path(), cfg)
}

#[test]
fn continuous_batching_refills_rows_and_each_output_equals_the_prompt_alone() {
    // Twelve requests through three rows, stopping at different lengths: rows are refilled
    // as others finish, and prompts are prefilled beside decoding rows in 24-token steps.
    let e = engine_with(EngineConfig {
        max_batch: 3,
        prefill_chunk: 24,
        ..Default::default()
    });
    let reqs: Vec<Request> = QUESTIONS
        .iter()
        .chain(&QUESTIONS[..4])
        .enumerate()
        .map(|(i, q)| Request {
            prompt: chat(q),
            params: greedy(3 + (i * 5) % 14),
        })
        .collect();
    let mut order = Vec::new();
    let out = e.generate(&reqs, |i, _| order.push(i)).unwrap();
    assert_eq!(order.len(), reqs.len());
    assert_ne!(
        order,
        (0..reqs.len()).collect::<Vec<_>>(),
        "completions are delivered as requests finish, not in input order"
    );
    for (r, got) in reqs.iter().zip(&out) {
        let alone = default_engine()
            .generate(std::slice::from_ref(r), |_, _| {})
            .unwrap();
        assert_eq!(
            alone[0].tokens,
            got.tokens,
            "prompt of {} tokens",
            r.prompt.len()
        );
    }
}

#[test]
fn prefix_cache_serves_a_shared_document_and_changes_no_output() {
    let e = engine_with(EngineConfig::default());
    let doc = e.tokenizer.encode("<|im_start|>user\nDocument: The Nile is a river in Africa. It flows north into the Mediterranean Sea. The Amazon is in South America. The Danube flows through ten countries and ends in the Black Sea.\n", false).unwrap();
    assert!(doc.len() >= 32, "the document spans at least two blocks");
    let questions = [
        " Which sea does the Nile reach?",
        " Where is the Amazon?",
        " Summarize the document.",
        " Name the rivers.",
    ];
    let reqs: Vec<Request> = questions
        .iter()
        .map(|q| {
            let mut prompt = doc.clone();
            prompt.extend(
                e.tokenizer
                    .encode(&format!("{q}<|im_end|>\n<|im_start|>assistant\n"), false)
                    .unwrap(),
            );
            Request {
                prompt,
                params: greedy(10),
            }
        })
        .collect();
    let before = e.cache_stats();
    let shared = e.generate(&reqs, |_, _| {}).unwrap();
    let stats = e.cache_stats().since(&before);
    let doc_blocks = doc.len() / 16;
    assert_eq!(
        stats.cached_tokens,
        ((questions.len() - 1) * doc_blocks * 16) as u64,
        "every request after the first takes the document's full blocks from the cache"
    );
    // A second call finds the whole prompts cached (up to their last block).
    let again = e.generate(&reqs, |_, _| {}).unwrap();
    assert!(e.cache_stats().since(&before).cached_tokens > stats.cached_tokens);
    for ((r, a), b) in reqs.iter().zip(&shared).zip(&again) {
        let fresh = engine_with(EngineConfig::default());
        let alone = fresh.generate(std::slice::from_ref(r), |_, _| {}).unwrap();
        assert_eq!(fresh.cache_stats().cached_tokens, 0);
        assert_eq!(alone[0].tokens, a.tokens);
        assert_eq!(alone[0].tokens, b.tokens);
    }
}

#[test]
fn a_small_kv_cache_preempts_and_recomputes_without_changing_outputs() {
    // Eight blocks of 16 tokens: two ~30-token prompts fit, but not as they grow by 40
    // tokens each, so the newer is preempted and recomputed.
    let block = wildlong::engine::llama::PagedKv::block_bytes(
        default_engine().model.config(),
        16,
        candle_core::DType::F32,
    );
    let e = engine_with(EngineConfig {
        kv_cache_gib: Some(8.5 * block as f64 / (1u64 << 30) as f64),
        max_batch: 4,
        ..Default::default()
    });
    assert_eq!(e.kv_plan().unwrap().num_blocks, 8);
    let p = |seed| GenerationParams {
        max_tokens: 40,
        ignore_eos: true,
        sampling: SamplingParams {
            temperature: 0.8,
            seed,
            ..Default::default()
        },
        ..Default::default()
    };
    let reqs: Vec<Request> = QUESTIONS[..5]
        .iter()
        .enumerate()
        .map(|(i, q)| Request {
            prompt: chat(q),
            params: p(i as u64),
        })
        .collect();
    let out = e.generate(&reqs, |_, _| {}).unwrap();
    assert!(
        e.cache_stats().preemptions > 0,
        "the budget should force preemption"
    );
    for (r, got) in reqs.iter().zip(&out) {
        assert_eq!(got.tokens.len(), 40);
        let alone = default_engine()
            .generate(std::slice::from_ref(r), |_, _| {})
            .unwrap();
        assert_eq!(alone[0].tokens, got.tokens);
    }
    // A request that could not fit even alone is refused before any work, naming the setting.
    let long = Request {
        prompt: chat(QUESTIONS[2]),
        params: GenerationParams {
            max_tokens: 200,
            ..Default::default()
        },
    };
    let err = format!("{:#}", e.generate(&[long], |_, _| {}).unwrap_err());
    assert!(err.contains("kv_cache_gib"), "{err}");
    // A budget beyond the machine's memory is refused before the model loads.
    let huge = EngineConfig {
        kv_cache_gib: Some(1.0e6),
        ..Default::default()
    };
    let m = default_model_path();
    let Err(err) = wildlong::models::load_engine(m.to_str().unwrap(), &root(), &huge) else {
        panic!("a 1e6 GiB KV cache was accepted");
    };
    let err = format!("{err:#}");
    assert!(
        err.contains("1000000.00 GiB of KV cache (engine.kv_cache_gib)")
            && err.contains("available on this machine; set kv_cache_gib to at most"),
        "{err}"
    );
}

#[test]
fn sampling_is_seeded_per_row_and_independent_of_batching() {
    let e = default_engine();
    let p = |seed| GenerationParams {
        max_tokens: 10,
        sampling: SamplingParams {
            temperature: 0.9,
            top_p: Some(0.95),
            top_k: Some(50),
            seed,
            repetition_penalty: None,
        },
        ..Default::default()
    };
    let a = Request {
        prompt: chat("Tell me a story."),
        params: p(1),
    };
    let b = Request {
        prompt: chat("Name an animal."),
        params: p(2),
    };
    let batch = e.generate(&[a.clone(), b.clone()], |_, _| {}).unwrap();
    let again = e.generate(std::slice::from_ref(&a), |_, _| {}).unwrap();
    assert_eq!(batch[0].tokens, again[0].tokens);
    let diff_seed = e
        .generate(
            &[Request {
                params: p(999),
                ..a.clone()
            }],
            |_, _| {},
        )
        .unwrap();
    let alone_b = e.generate(&[b], |_, _| {}).unwrap();
    assert_eq!(batch[1].tokens, alone_b[0].tokens);
    assert_ne!(
        diff_seed[0].tokens, again[0].tokens,
        "a different seed should change a 10-token sample"
    );
}

#[test]
fn stop_strings_eos_and_max_tokens_end_rows() {
    let e = default_engine();
    let q = chat("What is the capital of France?");
    let full = e
        .generate(
            &[Request {
                prompt: q.clone(),
                params: greedy(40),
            }],
            |_, _| {},
        )
        .unwrap();
    assert_eq!(full[0].finish_reason, FinishReason::Eos);
    assert!(full[0].text.contains("Paris"));
    let stop = GenerationParams {
        stop: vec!["Paris".into()],
        ..greedy(40)
    };
    let cut = e
        .generate(
            &[Request {
                prompt: q.clone(),
                params: stop,
            }],
            |_, _| {},
        )
        .unwrap();
    assert_eq!(cut[0].finish_reason, FinishReason::Stop);
    assert_eq!(
        cut[0].text,
        full[0].text[..full[0].text.find("Paris").unwrap()]
    );
    let short = e
        .generate(
            &[Request {
                prompt: q.clone(),
                params: greedy(3),
            }],
            |_, _| {},
        )
        .unwrap();
    assert_eq!(
        (short[0].tokens.len(), short[0].finish_reason),
        (3, FinishReason::Length)
    );
    // An extra EOS id ends generation at that token.
    let first = full[0].tokens[0];
    let eos = GenerationParams {
        eos_token_ids: vec![full[0].tokens[1]],
        ..greedy(40)
    };
    let ended = e
        .generate(
            &[Request {
                prompt: q,
                params: eos,
            }],
            |_, _| {},
        )
        .unwrap();
    assert_eq!(
        (ended[0].tokens.clone(), ended[0].finish_reason),
        (vec![first], FinishReason::Eos)
    );
}

#[test]
fn prompt_longer_than_the_context_is_an_error() {
    let dir = tiny_random(&TinySpec::default(), 1);
    let e = load(
        dir.path(),
        EngineConfig {
            max_context: Some(32),
            ..Default::default()
        },
    );
    let err = e
        .generate(
            &[Request {
                prompt: vec![5; 40],
                params: greedy(4),
            }],
            |_, _| {},
        )
        .unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
    // Generation stops at the context end instead of running past it.
    let out = e
        .generate(
            &[Request {
                prompt: vec![5; 30],
                params: GenerationParams {
                    ignore_eos: true,
                    ..greedy(100)
                },
            }],
            |_, _| {},
        )
        .unwrap();
    assert_eq!(out[0].finish_reason, FinishReason::Length);
    assert_eq!(out[0].tokens.len(), 2);
}

#[test]
fn json_schema_constrains_a_135m_model_to_valid_json() {
    let e = default_engine();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}, "population_millions": {"type": "number"}},
        "required": ["city", "country", "population_millions"],
        "additionalProperties": false
    });
    let prompts = [
        "Give the capital of Italy as JSON.",
        "Describe Tokyo.",
        "Write a poem about rain.",
    ];
    let reqs: Vec<Request> = prompts
        .iter()
        .map(|q| Request {
            prompt: chat(q),
            params: GenerationParams {
                json_schema: Some(schema.clone()),
                ..greedy(80)
            },
        })
        .collect();
    for out in e.generate(&reqs, |_, _| {}).unwrap() {
        let v: serde_json::Value = serde_json::from_str(&out.text)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {:?}", out.text));
        assert!(
            v["city"].is_string()
                && v["country"].is_string()
                && v["population_millions"].is_number(),
            "{v}"
        );
        assert_eq!(v.as_object().unwrap().len(), 3);
    }
    // Unconstrained, the same model does not produce this JSON for the poem prompt.
    let free = e
        .generate(
            &[Request {
                prompt: chat(prompts[2]),
                params: greedy(80),
            }],
            |_, _| {},
        )
        .unwrap();
    assert!(serde_json::from_str::<serde_json::Value>(&free[0].text).is_err());
}

#[test]
fn forced_json_tokens_in_one_pass_equal_one_pass_each_and_batching() {
    // Many forced tokens (keys, punctuation) per row, different counts per row in a batch.
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "document_type": {"type": "string", "maxLength": 30},
            "task": {"type": "string", "maxLength": 30},
            "user_intent": {"type": "string", "maxLength": 30},
            "output_format": {"type": "string", "enum": ["table", "bullet list", "paragraph"]}
        },
        "required": ["document_type", "task", "user_intent", "output_format"],
        "additionalProperties": false,
        "x-guidance": {"whitespace_flexible": false}
    });
    let reqs: Vec<Request> = [
        "Summarize this contract for me.",
        "Explain the stack trace below, my Flask app crashes when it starts.",
        "Turn these meeting notes into action items.",
    ]
    .iter()
    .map(|q| Request {
        prompt: chat(q),
        params: GenerationParams {
            json_schema: Some(schema.clone()),
            ..greedy(200)
        },
    })
    .collect();
    let fast = load(
        &default_model_path(),
        EngineConfig {
            max_batch: 3,
            ..EngineConfig::default()
        },
    );
    let slow = load(
        &default_model_path(),
        EngineConfig {
            max_batch: 3,
            fast_forward: false,
            ..EngineConfig::default()
        },
    );
    let a = fast.generate(&reqs, |_, _| {}).unwrap();
    let b = slow.generate(&reqs, |_, _| {}).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.tokens, y.tokens);
        assert_eq!(x.finish_reason, FinishReason::Grammar);
        let v: serde_json::Value = serde_json::from_str(&x.text).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 4, "{v}");
    }
    for (i, r) in reqs.iter().enumerate() {
        let alone = fast.generate(std::slice::from_ref(r), |_, _| {}).unwrap();
        assert_eq!(alone[0].tokens, a[i].tokens, "row {i}");
    }
}

#[test]
fn invalid_json_schema_is_refused_before_decoding() {
    let e = default_engine();
    for bad in [
        serde_json::json!({"type": "nonsense"}),
        serde_json::json!(42),
        serde_json::json!({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),
    ] {
        let req = Request {
            prompt: chat("hi"),
            params: GenerationParams {
                json_schema: Some(bad.clone()),
                ..greedy(5)
            },
        };
        let err = e.generate(&[req], |_, _| {}).unwrap_err();
        assert!(
            format!("{err:#}").contains("invalid JSON schema"),
            "{bad}: {err:#}"
        );
    }
}

#[test]
fn chunked_prefill_generates_the_same_tokens() {
    let reqs: Vec<Request> = QUESTIONS[..3]
        .iter()
        .map(|q| Request {
            prompt: chat(q),
            params: greedy(8),
        })
        .collect();
    let base = default_engine().generate(&reqs, |_, _| {}).unwrap();
    let small = load(
        &default_model_path(),
        EngineConfig {
            prefill_chunk: 7,
            max_batch: 2,
            ..Default::default()
        },
    );
    let chunked = small.generate(&reqs, |_, _| {}).unwrap();
    for (a, b) in base.iter().zip(&chunked) {
        assert_eq!(a.tokens, b.tokens);
    }
}

#[test]
fn repetition_penalty_follows_the_ctrl_formula() {
    use wildlong::engine::sampling::{apply_repetition_penalty, Sampler};
    // Positive logits divided by the penalty, negative ones multiplied, each token once.
    let mut l = vec![2.0f32, -2.0, 1.0, 0.5];
    apply_repetition_penalty(&mut l, &[0, 1, 0, 9], 2.0);
    assert_eq!(l, [1.0, -4.0, 1.0, 0.5]);
    // Greedy: token 0 wins without the penalty, token 2 with it.
    let logits = vec![2.0f32, -2.0, 1.5, 0.5];
    let p = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    assert_eq!(
        Sampler::new(&p).sample(logits.clone(), None, &[0]).unwrap(),
        0
    );
    let p = SamplingParams {
        repetition_penalty: Some(2.0),
        ..p
    };
    assert_eq!(
        Sampler::new(&p).sample(logits.clone(), None, &[0]).unwrap(),
        2
    );
    // Only the last 64 generated tokens count.
    let mut old = vec![0u32];
    old.extend(std::iter::repeat_n(3u32, 64));
    assert_eq!(Sampler::new(&p).sample(logits, None, &old).unwrap(), 0);
    assert!(SamplingParams {
        repetition_penalty: Some(0.0),
        ..Default::default()
    }
    .validate()
    .is_err());
}
