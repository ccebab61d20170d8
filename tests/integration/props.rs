//! Property tests (proptest): JSONL records cut at any byte read back as their whole
//! records, and no bytes make the reader panic; GGUF headers with mutated or cut bytes give
//! an error naming the file (or load), never a panic or an abort; chat templates render any
//! message text verbatim and in order.

use crate::common::*;
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use wildlong::engine::chat::{ChatTemplate, Message};
use wildlong::records::{append_line, read_jsonl_resumable};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Rec {
    id: u32,
    text: String,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_jsonl_file_cut_anywhere_reads_back_as_its_whole_records(
        recs in prop::collection::vec((any::<u32>(), "\\PC{0,30}"), 0..12),
        cut in any::<prop::sample::Index>(),
    ) {
        let d = tempdir();
        let p = d.path().join("r.jsonl");
        let recs: Vec<Rec> = recs.into_iter().map(|(id, text)| Rec { id, text }).collect();
        for r in &recs {
            append_line(&p, r).unwrap();
        }
        let bytes = std::fs::read(&p).unwrap_or_default();
        let cut = cut.index(bytes.len() + 1);
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let whole = bytes[..cut].iter().filter(|&&b| b == b'\n').count();
        let got: Vec<Rec> = read_jsonl_resumable(&p).unwrap();
        prop_assert_eq!(&got[..], &recs[..whole]);
        // The torn line is cut off, so the next append starts on a clean line.
        let kept = std::fs::read(&p).unwrap();
        prop_assert_eq!(kept.len(), bytes[..cut].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1));
        append_line(&p, &recs.first().cloned().unwrap_or(Rec { id: 1, text: "x".into() })).unwrap();
        prop_assert_eq!(read_jsonl_resumable::<Rec>(&p).unwrap().len(), whole + 1);
    }

    #[test]
    fn no_bytes_make_the_jsonl_reader_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let d = tempdir();
        let p = d.path().join("r.jsonl");
        std::fs::write(&p, &bytes).unwrap();
        if let Err(e) = read_jsonl_resumable::<Rec>(&p) {
            prop_assert!(format!("{e:#}").contains("r.jsonl"), "{e:#}");
        }
    }
}

/// A small GGUF file (metadata of every kind, an array of strings, two tensors).
fn small_gguf() -> Vec<u8> {
    use candle_core::quantized::{gguf_file, QTensor};
    use candle_core::{Device, Tensor};
    let dev = Device::Cpu;
    let a = QTensor::quantize(
        &Tensor::arange(0f32, 64., &dev)
            .unwrap()
            .reshape((2, 32))
            .unwrap(),
        candle_core::quantized::GgmlDType::Q8_0,
    )
    .unwrap();
    let b = QTensor::quantize(
        &Tensor::ones((4, 8), candle_core::DType::F32, &dev).unwrap(),
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    use gguf_file::Value as V;
    let md = [
        ("general.architecture", V::String("llama".into())),
        ("general.alignment", V::U32(32)),
        ("llama.block_count", V::U32(1)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("flag", V::Bool(true)),
        ("big", V::U64(1 << 40)),
        (
            "tokenizer.ggml.tokens",
            V::Array(vec![
                V::String("<s>".into()),
                V::String("a".into()),
                V::String("bc".into()),
            ]),
        ),
    ];
    let md: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &[("a", &a), ("b", &b)]).unwrap();
    out.into_inner()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn mutated_or_cut_gguf_headers_are_errors_never_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = small_gguf();
        // The header is the part before the tensor data; mutate there.
        let header = {
            let mut c = std::io::Cursor::new(&bytes);
            candle_core::quantized::gguf_file::Content::read(&mut c).unwrap().tensor_data_offset as usize
        };
        for (i, v) in edits {
            let i = i.index(header);
            bytes[i] = v;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        let d = tempdir();
        let p = d.path().join("m.gguf");
        std::fs::write(&p, &bytes).unwrap();
        if let Err(e) = wildlong::engine::weights::read_gguf(&p) {
            prop_assert!(format!("{e:#}").contains("m.gguf"), "{e:#}");
        }
    }
}

#[test]
fn the_small_gguf_reads_and_a_zero_alignment_is_refused() {
    let bytes = small_gguf();
    let d = tempdir();
    let p = d.path().join("s.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let (c, _) = wildlong::engine::weights::read_gguf(&p).unwrap();
    assert_eq!(c.tensor_infos.len(), 2);
    // candle divides by general.alignment: 0 must be an error, not a panic.
    let key = b"general.alignment";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    let mut z = bytes.clone();
    z[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
    std::fs::write(&p, &z).unwrap();
    let e = format!(
        "{:#}",
        wildlong::engine::weights::read_gguf(&p).unwrap_err()
    );
    assert!(e.contains("alignment") && e.contains("s.gguf"), "{e}");
}

/// The default model's ChatML template (from its GGUF) and Llama 3's.
fn templates() -> Vec<ChatTemplate> {
    let (c, _) = wildlong::engine::weights::read_gguf(&default_model_path()).unwrap();
    let smol = match &c.metadata["tokenizer.chat_template"] {
        candle_core::quantized::gguf_file::Value::String(s) => s.clone(),
        v => panic!("{v:?}"),
    };
    let llama3 = "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";
    vec![
        ChatTemplate::new(&smol, None, Some("<|im_end|>")).unwrap(),
        ChatTemplate::new(llama3, Some("<|begin_of_text|>"), Some("<|eot_id|>")).unwrap(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn chat_templates_render_any_text_verbatim_and_in_order(
        turns in prop::collection::vec("(\\PC|\\{\\{|\\}\\}|\\{%|%\\}|<\\|im_end\\|>| ){1,40}", 1..6),
        generation_prompt in any::<bool>(),
    ) {
        for t in templates() {
            let messages: Vec<Message> = turns
                .iter()
                .enumerate()
                .map(|(i, c)| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, c.clone()))
                .collect();
            let out = t.render(&messages, generation_prompt).unwrap();
            let mut at = 0;
            for m in &messages {
                let want = m.content.trim();
                let found = out[at..].find(want);
                prop_assert!(found.is_some(), "{want:?} not in order in {out:?}");
                at += found.unwrap() + want.len();
            }
            prop_assert_eq!(out.ends_with("assistant\n") || out.ends_with("assistant<|end_header_id|>\n\n"), generation_prompt);
        }
    }
}
