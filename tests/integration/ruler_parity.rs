//! `--protocol ruler` against NVIDIA/RULER's own generator: the samples `prepare.py` wrote
//! for all 13 tasks on this project's sources (tests/fixtures/ruler_parity/, recorded by
//! scripts/ruler_parity.sh: 2048 and, for the generators that change at 4096, 4096)
//! equal ours byte for byte: input, answer prefix, answers and RULER's token count, sample
//! after sample of one random stream.

use crate::common::*;
use wildlong::engine::tokenizer::Tokenizer;
use wildlong::eval::ruler::config::RulerConfig;
use wildlong::eval::ruler::data::Assets;
use wildlong::eval::ruler::official;
use wildlong::eval::ruler::synth::PromptFormat;

#[derive(serde::Deserialize)]
struct RulerLine {
    input: String,
    outputs: Vec<String>,
    length: usize,
    answer_prefix: String,
}

#[test]
fn official_samples_equal_rulers_prepare_py() {
    let dir = root().join("tests/fixtures/ruler_parity");
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer/tokenizer.json"), &[]).unwrap();
    let format = PromptFormat {
        tokenizer: &tokenizer,
        chat: None,
    };
    let assets = Assets::load(None, None).unwrap();
    let cfg = RulerConfig::builtin();
    let mut checked = 0;
    for len_dir in std::fs::read_dir(&dir).unwrap() {
        let len_dir = len_dir.unwrap().path();
        if !len_dir.is_dir() || len_dir.ends_with("tokenizer") {
            continue;
        }
        let length: usize = len_dir
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        for f in std::fs::read_dir(&len_dir).unwrap() {
            let f = f.unwrap().path();
            let task = f.file_stem().unwrap().to_str().unwrap().to_string();
            let want: Vec<RulerLine> = std::fs::read_to_string(&f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let got = official::samples(
                &assets,
                &format,
                &task,
                &cfg.tasks[&task],
                length,
                42,
                want.len(),
            )
            .unwrap();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let at = format!("{task} @ {length} sample {i}");
                if g.input != w.input {
                    let k = g
                        .input
                        .bytes()
                        .zip(w.input.bytes())
                        .position(|(a, b)| a != b)
                        .unwrap_or(g.input.len().min(w.input.len()));
                    let lo = k.saturating_sub(80);
                    panic!(
                        "{at}: inputs differ at byte {k} (ours {} bytes, RULER's {}):\n ours: {:?}\nRULER: {:?}",
                        g.input.len(),
                        w.input.len(),
                        g.input.get(lo..(k + 80).min(g.input.len())),
                        w.input.get(lo..(k + 80).min(w.input.len())),
                    );
                }
                assert_eq!(g.answer_prefix, w.answer_prefix, "{at}");
                assert_eq!(g.outputs, w.outputs, "{at}");
                assert_eq!(g.length, w.length, "{at}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 32, "every recorded sample compared");
}
