//! RULER's own generators reproduced call for call (`--protocol ruler`): NVIDIA/RULER's
//! `scripts/data/synthetic/niah.py` with the same random stream (CPython's Mersenne
//! Twister seeded with the task's seed, [`PyRandom`]), the same sentence splitter (NLTK's
//! Punkt, [`punkt`]), the same fitting (an estimate from 500 words or 25 lines, RULER's
//! binary search, then each sample shrunk by that step until it fits) and the same token
//! count (the prompt text without special tokens, as `tokenizer.tokenize` counts it), so
//! that a sample here equals the line `prepare.py` writes for the same tokenizer, sources
//! and seed (tests/integration/ruler_parity.rs checks it against recorded output).
//!
//! With `--chat`, the model's chat template wraps the prompt where RULER would use its own
//! `template.py` entry; RULER's singular rewrites (`Some` → `A`, …) then touch only the
//! task's template, not the chat template's own text.

use crate::eval::ruler::config::{HaystackKind, NeedleKind, RulerGenerator};
use crate::eval::ruler::data::{self, Assets};
use crate::eval::ruler::punkt;
use crate::eval::ruler::pyrandom::PyRandom;
use crate::eval::ruler::synth::{self, PromptFormat, Sample};
use crate::eval::ruler::tasks::{self, format};
use anyhow::{bail, Result};
use std::sync::OnceLock;

/// Does the official protocol reproduce this generator? (The others run as `wildlong`.)
pub fn supports(g: &RulerGenerator) -> bool {
    matches!(g, RulerGenerator::Niah { .. })
}

/// RULER's essay haystack: `re.sub(r'\s+', " ", essay).split(" ")` (empty words kept).
pub fn essay_words(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_ws = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if !in_ws {
                out.push(&text[start..i]);
                in_ws = true;
            }
        } else if in_ws {
            start = i;
            in_ws = false;
        }
    }
    out.push(if in_ws { "" } else { &text[start..] });
    out
}

/// `sorted(set(f"{adj}-{noun}" for adj in adjectives for noun in nouns))`, as index pairs
/// (6.2 million keys with wonderwords' lists).
fn needle_words(assets: &Assets) -> &'static [(u16, u16)] {
    static W: OnceLock<Vec<(u16, u16)>> = OnceLock::new();
    W.get_or_init(|| {
        let (a, n) = (&assets.adjectives, &assets.nouns);
        let key = |&(i, j): &(u16, u16)| {
            a[i as usize]
                .bytes()
                .chain(std::iter::once(b'-'))
                .chain(n[j as usize].bytes())
        };
        let mut w: Vec<(u16, u16)> = (0..a.len() as u16)
            .flat_map(|i| (0..n.len() as u16).map(move |j| (i, j)))
            .collect();
        w.sort_unstable_by(|x, y| key(x).cmp(key(y)));
        w.dedup_by(|x, y| key(x).eq(key(y)));
        w
    })
}

/// The samples RULER's generator writes for one task at one length, in order (sample i
/// depends on the ones before it: one random stream runs through the fitting and all
/// samples).
pub fn samples(
    assets: &Assets,
    format: &PromptFormat,
    task: &str,
    generator: &RulerGenerator,
    length: usize,
    seed: u64,
    n: usize,
) -> Result<Vec<Sample>> {
    match *generator {
        RulerGenerator::Niah {
            type_haystack,
            type_needle_k,
            type_needle_v,
            num_needle_k,
            num_needle_v,
            num_needle_q,
            ..
        } => {
            let mut g = Niah {
                assets,
                format,
                rng: PyRandom::new(seed),
                seed,
                haystack: type_haystack,
                essay: essay_words(&assets.essay_text),
                kind_k: type_needle_k,
                kind_v: type_needle_v,
                num_k: num_needle_k.max(num_needle_q),
                num_v: num_needle_v,
                num_q: num_needle_q,
                tokens_to_generate: tasks::tokens_to_generate(generator),
            };
            g.samples(task, length, n)
        }
        _ => bail!("task `{task}`: the ruler protocol does not reproduce this generator yet"),
    }
}

struct Niah<'a> {
    assets: &'a Assets,
    format: &'a PromptFormat<'a>,
    rng: PyRandom,
    seed: u64,
    haystack: HaystackKind,
    essay: Vec<&'a str>,
    kind_k: NeedleKind,
    kind_v: NeedleKind,
    num_k: usize,
    num_v: usize,
    num_q: usize,
    tokens_to_generate: usize,
}

/// One generated input: the prompt split as RULER splits it, with its answers.
struct Drawn {
    input: String,
    answer_prefix: String,
    outputs: Vec<String>,
    depths: Vec<u32>,
}

fn kind_name(k: NeedleKind) -> &'static str {
    match k {
        NeedleKind::Numbers => "numbers",
        NeedleKind::Words => "words",
        NeedleKind::Uuids => "uuids",
    }
}

impl Niah<'_> {
    fn random(&mut self, kind: NeedleKind) -> String {
        match kind {
            NeedleKind::Numbers => self.rng.randint(1_000_000, 9_999_999).to_string(),
            NeedleKind::Words => {
                let w = needle_words(self.assets);
                let (i, j) = *self.rng.choice(w);
                format!(
                    "{}-{}",
                    self.assets.adjectives[i as usize], self.assets.nouns[j as usize]
                )
            }
            NeedleKind::Uuids => self.rng.uuid4(),
        }
    }

    /// `generate_input_output(num_haystack)`.
    fn draw(&mut self, num_haystack: usize) -> Result<Drawn> {
        let type_v = kind_name(self.kind_v);
        let needle_of =
            |k: &str, v: &str| format!("One of the special magic {type_v} for {k} is: {v}.");
        let mut keys = Vec::new();
        let mut values: Vec<Vec<String>> = Vec::new();
        let mut needles = Vec::new();
        for _ in 0..self.num_k {
            let key = self.random(self.kind_k);
            let mut value = Vec::new();
            for _ in 0..self.num_v {
                let v = self.random(self.kind_v);
                needles.push(needle_of(&key, &v));
                value.push(v);
            }
            keys.push(key);
            values.push(value);
        }
        PyRandom::new(self.seed).shuffle(&mut needles);

        let grid = synth::depths();
        let (context, depths) = match self.haystack {
            HaystackKind::Essay => {
                let text = (0..num_haystack)
                    .map(|i| self.essay[i % self.essay.len()])
                    .collect::<Vec<_>>()
                    .join(" ");
                let sents = punkt::sent_tokenize(text.trim());
                if needles.len() > grid.len() {
                    bail!("more needles than RULER's 40 depths");
                }
                let depths: Vec<u32> = self
                    .rng
                    .sample_indices(grid.len(), needles.len())
                    .into_iter()
                    .map(|i| grid[i])
                    .collect();
                let mut pos: Vec<usize> = depths
                    .iter()
                    .map(|&d| (sents.len() as f64 * (d as f64 / 100.0)) as usize)
                    .collect();
                pos.sort();
                pos.insert(0, 0);
                pos.push(sents.len());
                let mut parts: Vec<String> = Vec::new();
                for i in 1..pos.len() {
                    parts.push(sents[pos[i - 1]..pos[i]].join(" "));
                    if let Some(n) = needles.get(i - 1) {
                        parts.push(n.clone());
                    }
                }
                (parts.join(" "), depths)
            }
            HaystackKind::Noise | HaystackKind::Needle => {
                let mut sentences: Vec<String> = if self.haystack == HaystackKind::Noise {
                    vec![data::NOISE.to_string(); num_haystack]
                } else {
                    (0..num_haystack)
                        .map(|_| {
                            let k = self.random(self.kind_k);
                            let v = self.random(self.kind_v);
                            needle_of(&k, &v)
                        })
                        .collect()
                };
                if needles.len() > num_haystack {
                    bail!("more needles than haystack lines");
                }
                let mut at = self.rng.sample_indices(num_haystack, needles.len());
                at.sort_by(|a, b| b.cmp(a));
                let depths = at
                    .iter()
                    .map(|&i| (i * 100 / num_haystack.max(1)) as u32)
                    .collect();
                for (&i, n) in at.iter().zip(&needles) {
                    sentences.insert(i, n.clone());
                }
                (sentences.join("\n"), depths)
            }
        };

        let picked = self.rng.sample_indices(self.num_k, self.num_q);
        let queries: Vec<&str> = picked.iter().map(|&i| keys[i].as_str()).collect();
        let outputs: Vec<String> = picked.iter().flat_map(|&i| values[i].clone()).collect();
        let query = match queries.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{}, and {last}", rest.join(", ")),
            _ => queries[0].to_string(),
        };
        let mut template = format!("{}{}", tasks::NIAH.template, tasks::NIAH.answer_prefix);
        let mut tv = type_v.to_string();
        if self.num_q * self.num_v == 1 {
            template = template
                .replace("Some", "A")
                .replace("are all", "is")
                .replace("are", "is")
                .replace("answers", "answer");
            tv.pop();
        }
        let text = format(
            &template,
            &[
                ("type_needle_v", tv.as_str()),
                ("context", context.as_str()),
                ("query", query.as_str()),
            ],
        );
        // RULER: the answer prefix starts at the last occurrence of its first 10 characters.
        let marker: String = tasks::NIAH.answer_prefix.chars().take(10).collect();
        let at = text.rfind(&marker).unwrap_or(text.len());
        Ok(Drawn {
            input: text[..at].to_string(),
            answer_prefix: text[at..].to_string(),
            outputs,
            depths,
        })
    }

    /// RULER's `len(TOKENIZER.text_to_tokens(input_text))`: the whole prompt, no special
    /// tokens added.
    fn count(&self, d: &Drawn) -> Result<usize> {
        let text = self.format.text(&d.input, &d.answer_prefix)?;
        Ok(self.format.tokenizer.encode(&text, false)?.len())
    }

    fn samples(&mut self, task: &str, length: usize, n: usize) -> Result<Vec<Sample>> {
        let incremental = match self.haystack {
            HaystackKind::Essay => 500,
            _ if length < 4096 => 5,
            _ => 25,
        };
        let ttg = self.tokens_to_generate;
        let probe = self.draw(incremental)?;
        let per_unit = self.count(&probe)? as f64 / incremental as f64;
        let estimated = ((length as f64 / per_unit) * 3.0) as usize;
        let (mut lo, mut hi) = (incremental as i64, estimated.max(incremental * 2) as i64);
        let mut best = None;
        while lo <= hi {
            let mid = (lo + hi) / 2;
            let d = self.draw(mid as usize)?;
            if self.count(&d)? + ttg <= length {
                best = Some(mid as usize);
                lo = mid + 1;
            } else {
                hi = mid - 1;
            }
        }
        let fitted = best.unwrap_or(incremental);
        let mut out = Vec::with_capacity(n);
        for index in 0..n {
            let mut used = fitted;
            let (d, tokens) = loop {
                let d = self.draw(used)?;
                let tokens = self.count(&d)?;
                if tokens + ttg <= length {
                    break (d, tokens);
                }
                if used <= incremental {
                    bail!("task `{task}` sample {index}: {incremental} haystack units already exceed length {length}");
                }
                used -= incremental;
            };
            let prompt_tokens = self.format.tokens(&d.input, &d.answer_prefix)?.len();
            out.push(Sample {
                index,
                hash: synth::sample_hash(&d.input, &d.answer_prefix, &d.outputs),
                input: d.input,
                answer_prefix: d.answer_prefix,
                outputs: d.outputs,
                length: tokens + ttg,
                prompt_tokens,
                haystack_units: used,
                depths: d.depths,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn essay_words_split_as_python_does() {
        // re.sub(r'\s+', " ", t).split(" ") for t = " a  b\nc ", "a", ""
        assert_eq!(essay_words(" a  b\nc "), vec!["", "a", "b", "c", ""]);
        assert_eq!(essay_words("a"), vec!["a"]);
        assert_eq!(essay_words(""), vec![""]);
    }
}
