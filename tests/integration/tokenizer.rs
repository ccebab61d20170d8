//! Tokenizers against HF transformers' ids for the same GGUF vocabulary, SentencePiece from
//! GGUF metadata, refusal of unknown pre-tokenizers, and chat templates.

use crate::common::{default_engine, fixture};
use candle_core::quantized::gguf_file::{self, Value};
use wildlong::engine::chat::{ChatTemplate, Message};
use wildlong::engine::tokenizer::Tokenizer;

fn golden() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_tokens.json")).unwrap()).unwrap()
}

#[test]
fn smollm2_golden_ids() {
    let tok = &default_engine().tokenizer;
    assert_eq!(tok.kind, "gguf gpt2/smollm");
    assert_eq!(tok.encode("Hello world", true).unwrap(), vec![19556, 905]);
    assert_eq!(tok.encode("<|im_start|>user", true).unwrap(), vec![1, 4093]);
}

#[test]
fn smollm2_ids_equal_hf_transformers_and_round_trip() {
    let tok = &default_engine().tokenizer;
    for case in golden()["strings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), text);
    }
}

#[test]
fn chat_template_renders_like_hf_apply_chat_template() {
    let e = default_engine();
    let g = golden();
    let msgs: Vec<Message> = serde_json::from_value(g["chat"]["messages"].clone()).unwrap();
    let text = e
        .chat_template
        .as_ref()
        .unwrap()
        .render(&msgs, true)
        .unwrap();
    assert_eq!(text, g["chat"]["text"].as_str().unwrap());
    let want: Vec<u32> = g["chat"]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(e.chat_prompt(&msgs).unwrap(), want);
}

#[test]
fn chat_template_errors_and_python_methods() {
    let t = ChatTemplate::new("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ bos_token }}{{ messages[0].content.strip().upper() }}", Some("<s>"), None).unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "  hi ")], true).unwrap(),
        "<s>HI"
    );
    let e = t.render(&[Message::new("system", "x")], true).unwrap_err();
    assert!(format!("{e:#}").contains("first must be user"));
    assert!(ChatTemplate::new("{% if %}", None, None).is_err());
}

fn write_gguf(md: &[(&str, Value)]) -> gguf_file::Content {
    let mut buf = std::io::Cursor::new(Vec::new());
    let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut buf, &refs, &[]).unwrap();
    buf.set_position(0);
    gguf_file::Content::read(&mut buf).unwrap()
}

fn strings(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
}

/// A SentencePiece vocabulary with 256 byte tokens; merges follow the pieces' scores.
fn sentencepiece_gguf() -> gguf_file::Content {
    let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let pieces = [
        "▁", "h", "e", "l", "o", "i", "▁h", "ll", "▁he", "llo", "▁hello", "▁hi", "el",
    ];
    let scores_of = [
        -1.0, -2.0, -2.0, -2.0, -2.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -3.5, -9.0,
    ];
    let mut scores = vec![0f32; tokens.len()];
    for (p, s) in pieces.iter().zip(scores_of) {
        tokens.push(p.to_string());
        types.push(1);
        scores.push(s);
    }
    let toks: Vec<&str> = tokens.iter().map(String::as_str).collect();
    write_gguf(&[
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&toks)),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ])
}

#[test]
fn sentencepiece_from_gguf_merges_by_score_with_byte_fallback() {
    let tok = Tokenizer::from_gguf(&sentencepiece_gguf()).unwrap();
    let id = |p: &str| tok.token_to_id(p).unwrap();
    // BOS is added; "hello" becomes one piece, "hi" too; "é" falls back to its UTF-8 bytes.
    assert_eq!(tok.encode("hello", true).unwrap(), vec![1, id("▁hello")]);
    assert_eq!(
        tok.encode("hello hi", true).unwrap(),
        vec![1, id("▁hello"), id("▁hi")]
    );
    // "ell" has no piece: ▁ + e + ll (the "ll" merge outranks "el").
    assert_eq!(
        tok.encode("ell", false).unwrap(),
        vec![id("▁"), id("e"), id("ll")]
    );
    assert_eq!(
        tok.encode("é", false).unwrap(),
        vec![id("▁"), id("<0xC3>"), id("<0xA9>")]
    );
    assert_eq!(
        tok.decode(&tok.encode("hello hi é", true).unwrap(), true)
            .unwrap(),
        "hello hi é"
    );
    assert_eq!(tok.eos_ids(), &[2]);
}

#[test]
fn unknown_gguf_pre_tokenizer_and_model_are_refused_by_name() {
    let base = |pre: &str, model: &str| {
        write_gguf(&[
            ("tokenizer.ggml.model", Value::String(model.into())),
            ("tokenizer.ggml.pre", Value::String(pre.into())),
            ("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])),
            ("tokenizer.ggml.merges", strings(&["a b"])),
        ])
    };
    let e = Tokenizer::from_gguf(&base("mystery-pre", "gpt2"))
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("mystery-pre"), "{e:#}");
    let e = Tokenizer::from_gguf(&base("gpt-2", "rwkv")).err().unwrap();
    assert!(format!("{e:#}").contains("rwkv"), "{e:#}");
    for pre in ["llama-bpe", "qwen2", "gpt-2", "smollm"] {
        let t = Tokenizer::from_gguf(&base(pre, "gpt2")).unwrap();
        assert_eq!(t.encode("ab", false).unwrap(), vec![2], "{pre}");
    }
}
