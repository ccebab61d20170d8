//! RULER's sample generators (`niah.py`, `variable_tracking.py`,
//! `common_words_extraction.py`, `freq_words_extraction.py`, `qa.py`), each input fitted to
//! its length by a search over the number of haystack units with the model's own tokenizer
//! and chat template: prompt tokens + tokens to generate ≤ length.
//!
//! Differences from RULER, all deliberate: every sample has its own seeded RNG (so sample i
//! is the same whatever the sample count); needles go at depths drawn from RULER's 40
//! evenly spaced depths for every haystack kind (RULER draws random positions for the noise
//! and needle haystacks); each sample's haystack is fitted on its own, growing or shrinking
//! in 0.5% steps from the size fitted on sample 0 (RULER only shrinks, by 500 words or 25
//! sentences), so inputs fill their length more tightly.

use crate::engine::chat::{ChatTemplate, Message};
use crate::engine::tokenizer::Tokenizer;
use crate::eval::ruler::config::{HaystackKind, NeedleKind, RulerGenerator};
use crate::eval::ruler::data::{self, Assets};
use crate::eval::ruler::tasks::{self, format};
use anyhow::{bail, Context, Result};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// Bumped whenever a generator changes what it writes (invalidates cached samples).
pub const GENERATOR_VERSION: u32 = 1;

/// RULER's needle depths: `np.round(np.linspace(0, 100, 40))`.
pub fn depths() -> Vec<u32> {
    (0..40)
        .map(|i| (i as f64 * 100.0 / 39.0).round() as u32)
        .collect()
}

/// One evaluation sample (RULER's `data/<task>/validation.jsonl` line, plus provenance).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub index: usize,
    /// The user message (RULER's `input`).
    pub input: String,
    /// Appended after the chat template's assistant header.
    pub answer_prefix: String,
    /// Gold references.
    pub outputs: Vec<String>,
    /// Prompt tokens + tokens to generate (RULER's `length`).
    pub length: usize,
    pub prompt_tokens: usize,
    /// Haystack units used (words, sentences, needles, list words, coded words or documents).
    pub haystack_units: usize,
    /// Needle depths in percent (needle tasks and essay variable tracking).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depths: Vec<u32>,
    /// sha256 of input, answer prefix and outputs: predictions are keyed by it.
    pub hash: String,
}

/// How an input becomes the prompt the model sees.
pub struct PromptFormat<'a> {
    pub tokenizer: &'a Tokenizer,
    /// `None`: RULER's `base` template (input + answer prefix as plain text).
    pub chat: Option<&'a ChatTemplate>,
}

impl PromptFormat<'_> {
    pub fn text(&self, input: &str, answer_prefix: &str) -> Result<String> {
        Ok(match self.chat {
            Some(t) => t.render(&[Message::new("user", input)], true)? + answer_prefix,
            None => format!("{input}{answer_prefix}"),
        })
    }

    pub fn tokens(&self, input: &str, answer_prefix: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(&self.text(input, answer_prefix)?, self.chat.is_none())
    }

    /// Identifies tokenizer + template for the sample cache.
    pub fn fingerprint(&self) -> Result<String> {
        let mut h = sha2::Sha256::new();
        h.update(
            self.tokenizer
                .inner()
                .to_string(false)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        h.update([0]);
        h.update(self.chat.map(|c| c.source.as_str()).unwrap_or("<base>"));
        Ok(format!("{:x}", h.finalize()))
    }

    pub fn describe(&self) -> String {
        match self.chat {
            Some(c) => format!(
                "model chat template (sha256 {})",
                &format!("{:x}", sha2::Sha256::digest(c.source.as_bytes()))[..16]
            ),
            None => "base (no chat template)".into(),
        }
    }
}

/// An input before fitting.
struct Draft {
    input: String,
    answer_prefix: String,
    outputs: Vec<String>,
    depths: Vec<u32>,
}

/// Generates the samples of one task at one length.
pub struct Synth<'a> {
    pub assets: &'a Assets,
    pub format: &'a PromptFormat<'a>,
    pub task: &'a str,
    pub generator: &'a RulerGenerator,
    pub length: usize,
    pub seed: u64,
    /// Fitted haystack units (from sample 0), then each sample's starting point.
    units: usize,
    /// Noise sentences of the variable-tracking in-context example (fitted to 500 tokens).
    icl_units: usize,
    /// RULER shuffles the common-words list once with the seed.
    cwe_words: Vec<&'a str>,
}

fn rng_for(seed: u64, task: &str, length: usize, index: usize) -> ChaCha8Rng {
    let d = sha2::Sha256::digest(format!("{seed}/{task}/{length}/{index}"));
    ChaCha8Rng::from_seed(d.into())
}

fn random_uuid(rng: &mut ChaCha8Rng) -> String {
    uuid::Builder::from_random_bytes(rng.random())
        .into_uuid()
        .to_string()
}

fn number_words(words: &[String]) -> String {
    words
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{}. {w}", i + 1))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Riemann zeta for s > 1 (Euler–Maclaurin tail after 1000 terms; error < 1e-12).
pub fn zeta(s: f64) -> f64 {
    let n = 1000.0_f64;
    let head: f64 = (1..1000).map(|k| (k as f64).powf(-s)).sum();
    head + n.powf(1.0 - s) / (s - 1.0) + 0.5 * n.powf(-s) + s * n.powf(-s - 1.0) / 12.0
}

impl<'a> Synth<'a> {
    /// Fits the haystack size for this task and length (RULER's binary search).
    pub fn new(
        assets: &'a Assets,
        format: &'a PromptFormat<'a>,
        task: &'a str,
        generator: &'a RulerGenerator,
        length: usize,
        seed: u64,
    ) -> Result<Self> {
        let mut cwe_words: Vec<&str> = assets.cwe_words.clone();
        cwe_words.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let mut s = Self {
            assets,
            format,
            task,
            generator,
            length,
            seed,
            units: 0,
            icl_units: 0,
            cwe_words,
        };
        if matches!(generator, RulerGenerator::VariableTracking { .. }) {
            s.icl_units = s.fit_icl()?;
        }
        s.units = s.fit()?;
        Ok(s)
    }

    pub fn tokens_to_generate(&self) -> usize {
        tasks::tokens_to_generate(self.generator)
    }

    pub fn units(&self) -> usize {
        self.units
    }

    fn min_units(&self) -> usize {
        match self.generator {
            RulerGenerator::Niah { .. } | RulerGenerator::VariableTracking { .. } => 1,
            RulerGenerator::CommonWordsExtraction { num_cw, .. } => num_cw + 1,
            RulerGenerator::FreqWordsExtraction { .. } => 16,
            RulerGenerator::Qa { dataset, .. } => {
                let qa = self.assets.qa(*dataset);
                qa.qas.iter().map(|q| q.context.len()).max().unwrap_or(1)
            }
        }
    }

    fn total_tokens(&self, d: &Draft) -> Result<usize> {
        Ok(self.format.tokens(&d.input, &d.answer_prefix)?.len() + self.tokens_to_generate())
    }

    /// Largest unit count whose sample-0 input fits (exponential then binary search).
    fn fit(&self) -> Result<usize> {
        let fits = |n: usize| -> Result<bool> {
            let d = self.draft(n, 0, &mut rng_for(self.seed, self.task, self.length, 0))?;
            Ok(self.total_tokens(&d)? <= self.length)
        };
        let lo0 = self.min_units();
        if !fits(lo0)? {
            bail!(
                "task `{}`: length {} is too short for even the smallest input ({} haystack units)",
                self.task,
                self.length,
                lo0
            );
        }
        largest_fitting(lo0, lo0.max(8) * 2, fits)
    }

    /// Noise sentences of the variable-tracking example: RULER fits it to 500 tokens.
    fn fit_icl(&self) -> Result<usize> {
        let rng = rng_for(self.seed, self.task, 500, usize::MAX);
        largest_fitting(1, 64, |n| {
            Ok(self.tokenizer_len(&self.vt_icl(n, &mut rng.clone())?)? <= 500)
        })
    }

    fn tokenizer_len(&self, text: &str) -> Result<usize> {
        Ok(self.format.tokenizer.encode(text, false)?.len())
    }

    /// Sample `index`: starting from the fitted size, its haystack grows while it still fits
    /// or shrinks until it does, in steps of 0.5% (random content tokenizes unevenly).
    pub fn sample(&self, index: usize) -> Result<Sample> {
        let build = |n: usize| -> Result<(Draft, usize)> {
            let d = self.draft(
                n,
                index,
                &mut rng_for(self.seed, self.task, self.length, index),
            )?;
            let prompt_tokens = self.format.tokens(&d.input, &d.answer_prefix)?.len();
            Ok((d, prompt_tokens))
        };
        let fits = |p: usize| p + self.tokens_to_generate() <= self.length;
        let step = |n: usize| (n / 200).max(1);
        let mut n = self.units;
        let (mut d, mut p) = build(n)?;
        if fits(p) {
            loop {
                let (d2, p2) = build(n + step(n))?;
                if !fits(p2) {
                    break;
                }
                n += step(n);
                (d, p) = (d2, p2);
            }
        } else {
            while !fits(p) {
                if n < self.min_units() + step(n) {
                    bail!(
                        "task `{}` sample {index}: cannot fit length {}",
                        self.task,
                        self.length
                    );
                }
                n -= step(n);
                (d, p) = build(n)?;
            }
        }
        let hash = sample_hash(&d.input, &d.answer_prefix, &d.outputs);
        Ok(Sample {
            index,
            input: d.input,
            answer_prefix: d.answer_prefix,
            outputs: d.outputs,
            length: p + self.tokens_to_generate(),
            prompt_tokens: p,
            haystack_units: n,
            depths: d.depths,
            hash,
        })
    }

    fn draft(&self, n: usize, index: usize, rng: &mut ChaCha8Rng) -> Result<Draft> {
        match *self.generator {
            RulerGenerator::Niah {
                type_haystack,
                type_needle_k,
                type_needle_v,
                num_needle_k,
                num_needle_v,
                num_needle_q,
                ..
            } => self.niah(
                n,
                rng,
                type_haystack,
                type_needle_k,
                type_needle_v,
                num_needle_k.max(num_needle_q),
                num_needle_v,
                num_needle_q,
            ),
            RulerGenerator::VariableTracking {
                type_haystack,
                num_chains,
                num_hops,
                ..
            } => {
                let icl = self.vt_icl(self.icl_units, rng)?;
                let (text, prefix, outputs, depths) =
                    self.vt(n, rng, type_haystack, num_chains, num_hops, false)?;
                Ok(Draft {
                    input: format!("{icl}\n{text}"),
                    answer_prefix: prefix,
                    outputs,
                    depths,
                })
            }
            RulerGenerator::CommonWordsExtraction {
                freq_cw,
                freq_ucw,
                num_cw,
                ..
            } => self.cwe(n, rng, freq_cw, freq_ucw, num_cw),
            RulerGenerator::FreqWordsExtraction {
                alpha,
                coded_wordlen,
                ..
            } => self.fwe(n, rng, alpha, coded_wordlen),
            RulerGenerator::Qa { dataset, .. } => self.qa(n, index, rng, dataset),
        }
    }

    fn random_needle(&self, kind: NeedleKind, rng: &mut ChaCha8Rng) -> String {
        match kind {
            NeedleKind::Numbers => rng.random_range(1_000_000..=9_999_999u32).to_string(),
            NeedleKind::Words => {
                let a = self.assets.adjectives.choose(rng).expect("adjectives");
                let n = self.assets.nouns.choose(rng).expect("nouns");
                format!("{a}-{n}")
            }
            NeedleKind::Uuids => random_uuid(rng),
        }
    }

    /// The essay haystack's first `n` words (repeated when longer than the essay).
    fn essay(&self, n: usize) -> String {
        let w = &self.assets.essay_words;
        (0..n).map(|i| w[i % w.len()]).collect::<Vec<_>>().join(" ")
    }

    /// Inserts `needles` between the essay's sentences at `depths` (RULER's niah.py).
    fn insert_in_essay(&self, n: usize, needles: &[String], depths: &[u32]) -> String {
        let text = self.essay(n);
        let sents = data::sentences(&text);
        let mut pos: Vec<usize> = depths
            .iter()
            .map(|&d| (sents.len() as f64 * d as f64 / 100.0) as usize)
            .collect();
        pos.sort();
        let mut parts: Vec<String> = Vec::new();
        let mut last = 0;
        for (p, needle) in pos.iter().zip(needles) {
            if *p > last {
                parts.push(sents[last..*p].join(" "));
            }
            parts.push(needle.clone());
            last = *p;
        }
        if last < sents.len() {
            parts.push(sents[last..].join(" "));
        }
        parts.join(" ")
    }

    #[allow(clippy::too_many_arguments)]
    fn niah(
        &self,
        n: usize,
        rng: &mut ChaCha8Rng,
        haystack: HaystackKind,
        kind_k: NeedleKind,
        kind_v: NeedleKind,
        num_k: usize,
        num_v: usize,
        num_q: usize,
    ) -> Result<Draft> {
        let needle_of =
            |t: &str, k: &str, v: &str| format!("One of the special magic {t} for {k} is: {v}.");
        let type_v = match kind_v {
            NeedleKind::Numbers => "numbers",
            NeedleKind::Words => "words",
            NeedleKind::Uuids => "uuids",
        };
        let mut keys: Vec<String> = Vec::new();
        let mut values: Vec<Vec<String>> = Vec::new();
        let mut needles = Vec::new();
        let mut all_values: Vec<String> = Vec::new();
        for _ in 0..num_k {
            let key = loop {
                let k = self.random_needle(kind_k, rng);
                if !keys.contains(&k) {
                    break k;
                }
            };
            let mut vs = Vec::new();
            for _ in 0..num_v {
                let v = loop {
                    let v = self.random_needle(kind_v, rng);
                    if !all_values.contains(&v) && !keys.contains(&v) && v != key {
                        break v;
                    }
                };
                needles.push(needle_of(type_v, &key, &v));
                all_values.push(v.clone());
                vs.push(v);
            }
            keys.push(key);
            values.push(vs);
        }
        needles.shuffle(rng);
        let grid = depths_grid_checked(needles.len())?;
        let depths: Vec<u32> = grid.choose_multiple(rng, needles.len()).copied().collect();
        let context = match haystack {
            HaystackKind::Essay => self.insert_in_essay(n, &needles, &depths),
            HaystackKind::Noise | HaystackKind::Needle => {
                let mut lines: Vec<String> = match haystack {
                    HaystackKind::Noise => vec![data::NOISE.to_string(); n],
                    _ => (0..n)
                        .map(|_| loop {
                            let k = self.random_needle(kind_k, rng);
                            let v = self.random_needle(kind_v, rng);
                            if !keys.contains(&k) && !all_values.contains(&v) {
                                break needle_of(type_v, &k, &v);
                            }
                        })
                        .collect(),
                };
                let mut at: Vec<(usize, &String)> = depths
                    .iter()
                    .map(|&d| n * d as usize / 100)
                    .zip(&needles)
                    .collect();
                at.sort_by_key(|a| std::cmp::Reverse(a.0));
                for (i, needle) in at {
                    lines.insert(i, needle.clone());
                }
                lines.join("\n")
            }
        };
        let picked: Vec<usize> = (0..num_k)
            .collect::<Vec<_>>()
            .choose_multiple(rng, num_q)
            .copied()
            .collect();
        let queries: Vec<&str> = picked.iter().map(|&i| keys[i].as_str()).collect();
        let outputs: Vec<String> = picked.iter().flat_map(|&i| values[i].clone()).collect();
        let query = match queries.len() {
            1 => queries[0].to_string(),
            _ => format!(
                "{}, and {}",
                queries[..queries.len() - 1].join(", "),
                queries[queries.len() - 1]
            ),
        };
        let (mut template, mut prefix) = (
            tasks::NIAH.template.to_string(),
            tasks::NIAH.answer_prefix.to_string(),
        );
        let mut tv = type_v.to_string();
        if num_q * num_v == 1 {
            for s in [&mut template, &mut prefix] {
                *s = tasks::singular(s);
            }
            tv.pop();
        }
        let f = [
            ("type_needle_v", tv.as_str()),
            ("context", context.as_str()),
            ("query", query.as_str()),
        ];
        Ok(Draft {
            input: format(&template, &f),
            answer_prefix: format(&prefix, &f),
            outputs,
            depths,
        })
    }

    /// Chains `VAR A = 12345`, `VAR B = VAR A `, … (RULER's `generate_chains`).
    fn vt_chains(
        rng: &mut ChaCha8Rng,
        num_chains: usize,
        num_hops: usize,
        is_icl: bool,
    ) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
        let k = if is_icl { 3 } else { 5 };
        let mut vars: Vec<String> = Vec::new();
        while vars.len() < num_chains * (num_hops + 1) {
            let v: String = (0..k)
                .map(|_| (b'A' + rng.random_range(0..26u8)) as char)
                .collect();
            if !vars.contains(&v) {
                vars.push(v);
            }
        }
        let mut vars_out = Vec::new();
        let mut chains = Vec::new();
        for c in vars.chunks(num_hops + 1) {
            let value = rng.random_range(10000..99999u32);
            let mut chain = vec![format!("VAR {} = {value}", c[0])];
            for j in 0..num_hops {
                chain.push(format!("VAR {} = VAR {} ", c[j + 1], c[j]));
            }
            vars_out.push(c.to_vec());
            chains.push(chain);
        }
        (vars_out, chains)
    }

    /// Returns (task text, answer prefix, answers, depths).
    fn vt(
        &self,
        n: usize,
        rng: &mut ChaCha8Rng,
        haystack: HaystackKind,
        num_chains: usize,
        num_hops: usize,
        is_icl: bool,
    ) -> Result<(String, String, Vec<String>, Vec<u32>)> {
        let num_hops = if is_icl { num_hops.min(10) } else { num_hops };
        let (vars, chains) = Self::vt_chains(rng, num_chains, num_hops, is_icl);
        let value = chain_value(&chains[0][0]);
        let mut depths = Vec::new();
        let context = match haystack {
            HaystackKind::Essay => {
                // Interleave chains at random while keeping each chain's order.
                let mut next = vec![0usize; chains.len()];
                let mut flat = Vec::new();
                while flat.len() < chains.iter().map(Vec::len).sum::<usize>() {
                    let open: Vec<usize> = (0..chains.len())
                        .filter(|&c| next[c] < chains[c].len())
                        .collect();
                    let c = *open.choose(rng).expect("an open chain");
                    flat.push(format!("{}.", chains[c][next[c]].trim()));
                    next[c] += 1;
                }
                let grid = depths_grid_checked(flat.len())?;
                let mut d: Vec<u32> = grid.choose_multiple(rng, flat.len()).copied().collect();
                d.sort();
                depths = d.clone();
                self.insert_in_essay(n, &flat, &d)
            }
            _ => {
                let mut lines = vec![data::NOISE.to_string(); n];
                for chain in &chains {
                    let mut pos: Vec<usize> =
                        rand::seq::index::sample(rng, lines.len(), chain.len().min(lines.len()))
                            .into_vec();
                    pos.sort();
                    for (j, (p, link)) in pos.iter().zip(chain).enumerate() {
                        lines.insert(p + j, link.clone());
                    }
                }
                lines.join("\n")
            }
        }
        .replace(". \n", ".\n");
        let num_v = (num_hops + 1).to_string();
        let f = [
            ("context", context.as_str()),
            ("query", value.as_str()),
            ("num_v", num_v.as_str()),
        ];
        Ok((
            format(tasks::VARIABLE_TRACKING.template, &f),
            format(tasks::VARIABLE_TRACKING.answer_prefix, &f),
            vars[0].clone(),
            depths,
        ))
    }

    /// RULER's in-context example: a short noise-haystack chain, answered.
    fn vt_icl(&self, n: usize, rng: &mut ChaCha8Rng) -> Result<String> {
        let RulerGenerator::VariableTracking {
            num_chains,
            num_hops,
            ..
        } = *self.generator
        else {
            bail!("not a variable-tracking task");
        };
        let (text, prefix, answers, _) =
            self.vt(n, rng, HaystackKind::Noise, num_chains, num_hops, true)?;
        Ok(format!("{text}{prefix} {}\n", answers.join(" ")))
    }

    fn cwe_example(
        &self,
        rng: &mut ChaCha8Rng,
        num_words: usize,
        common_repeats: usize,
        uncommon_repeats: usize,
        num_cw: usize,
    ) -> (String, Vec<String>) {
        let words: Vec<String> = if num_words <= self.cwe_words.len() {
            self.cwe_words
                .choose_multiple(rng, num_words)
                .map(|w| w.to_string())
                .collect()
        } else {
            // Beyond the word lists (RULER switches to a larger list): adjective-noun pairs.
            let mut seen = std::collections::HashSet::new();
            let mut out = Vec::with_capacity(num_words);
            while out.len() < num_words {
                let w = self.random_needle(NeedleKind::Words, rng);
                if seen.insert(w.clone()) {
                    out.push(w);
                }
            }
            out
        };
        let (common, uncommon) = words.split_at(num_cw);
        let mut list: Vec<String> = Vec::new();
        for _ in 0..common_repeats {
            list.extend(common.iter().cloned());
        }
        for _ in 0..uncommon_repeats {
            list.extend(uncommon.iter().cloned());
        }
        list.shuffle(rng);
        (number_words(&list), common.to_vec())
    }

    fn cwe(
        &self,
        n: usize,
        rng: &mut ChaCha8Rng,
        freq_cw: usize,
        freq_ucw: usize,
        num_cw: usize,
    ) -> Result<Draft> {
        let (mut template, mut prefix) = (
            tasks::COMMON_WORDS_EXTRACTION.template.to_string(),
            tasks::COMMON_WORDS_EXTRACTION.answer_prefix.to_string(),
        );
        if num_cw != 10 {
            template = template.replace("10", &num_cw.to_string());
            prefix = prefix.replace("10", &num_cw.to_string());
        }
        let short = self.length < 4096;
        let (ex_words, ex_c, ex_u, c, u) = if short {
            (20, 3, 1, 6, 1)
        } else {
            (40, 10, 3, freq_cw, freq_ucw)
        };
        let (ex_ctx, ex_answer) =
            self.cwe_example(rng, ex_words.max(num_cw + 1), ex_c, ex_u, num_cw);
        let shot = format!(
            "{}{} {}",
            format(&template, &[("context", ex_ctx.as_str()), ("query", "")]),
            prefix,
            number_words(&ex_answer)
        );
        let (ctx, outputs) = self.cwe_example(rng, n, c, u, num_cw);
        Ok(Draft {
            input: format!(
                "{shot}\n{}",
                format(&template, &[("context", ctx.as_str()), ("query", "")])
            ),
            answer_prefix: prefix,
            outputs,
            depths: vec![],
        })
    }

    fn fwe(&self, n: usize, rng: &mut ChaCha8Rng, alpha: f64, wordlen: usize) -> Result<Draft> {
        let budget = self.length.saturating_sub(self.tokens_to_generate());
        let vocab_size = (budget / 50).max(8);
        let mut set = std::collections::BTreeSet::new();
        while set.len() < vocab_size {
            let w: String = (0..wordlen)
                .map(|_| (b'a' + rng.random_range(0..26u8)) as char)
                .collect();
            set.insert(w);
        }
        let mut vocab: Vec<String> = set.into_iter().collect();
        vocab.shuffle(rng);
        vocab[0] = "...".into();
        let z = zeta(alpha);
        let mut words: Vec<&str> = Vec::new();
        for (k, w) in vocab.iter().enumerate() {
            let count = (n as f64 * ((k + 1) as f64).powf(-alpha) / z) as usize;
            words.extend(std::iter::repeat_n(w.as_str(), count));
        }
        words.shuffle(rng);
        let ctx = words.join(" ");
        Ok(Draft {
            input: format(
                tasks::FREQ_WORDS_EXTRACTION.template,
                &[("context", ctx.as_str()), ("query", "")],
            ),
            answer_prefix: tasks::FREQ_WORDS_EXTRACTION.answer_prefix.to_string(),
            outputs: vocab[1..4].to_vec(),
            depths: vec![],
        })
    }

    fn qa(
        &self,
        n: usize,
        index: usize,
        rng: &mut ChaCha8Rng,
        dataset: crate::eval::ruler::config::QaDataset,
    ) -> Result<Draft> {
        let set = self.assets.qa(dataset);
        let q = &set.qas[index % set.qas.len()];
        let ndocs = set.docs.len();
        let mut all: Vec<usize> = if n < ndocs {
            let gold = q.context.len();
            if n.saturating_sub(gold) > q.more_context.len() {
                let extra: Vec<usize> = (0..ndocs)
                    .filter(|i| !q.context.contains(i) && !q.more_context.contains(i))
                    .collect();
                let mut v: Vec<usize> = q.context.iter().chain(&q.more_context).copied().collect();
                v.extend(extra.choose_multiple(rng, n - gold - q.more_context.len()));
                v
            } else {
                let mut v = q.context.clone();
                v.extend(q.more_context.choose_multiple(rng, n.saturating_sub(gold)));
                v
            }
        } else {
            (0..n).map(|i| i % ndocs).collect()
        };
        all.shuffle(rng);
        let context = all
            .iter()
            .enumerate()
            .map(|(i, &d)| format!("Document {}:\n{}", i + 1, set.docs[d]))
            .collect::<Vec<_>>()
            .join("\n\n");
        Ok(Draft {
            input: format(
                tasks::QA.template,
                &[("context", context.as_str()), ("query", q.query.as_str())],
            ),
            answer_prefix: tasks::QA.answer_prefix.to_string(),
            outputs: q.outputs.clone(),
            depths: vec![],
        })
    }
}

/// The largest `n ≥ lo` with `fits(n)`, given `fits(lo)`: doubling from `hi`, then bisection
/// (RULER's binary search, without its guessed upper bound).
fn largest_fitting(
    mut lo: usize,
    mut hi: usize,
    fits: impl Fn(usize) -> Result<bool>,
) -> Result<usize> {
    while fits(hi)? {
        lo = hi;
        hi *= 2;
    }
    // Invariant: fits(lo), !fits(hi).
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

fn depths_grid_checked(n: usize) -> Result<Vec<u32>> {
    let g = depths();
    if n > g.len() {
        bail!(
            "at most {} inserted lines per sample on an essay haystack",
            g.len()
        );
    }
    Ok(g)
}

/// The value a chain assigns: `chains[0][0].split("=")[-1].strip()` of its first line.
pub fn chain_value(first_line: &str) -> String {
    first_line
        .rsplit('=')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

pub fn sample_hash(input: &str, answer_prefix: &str, outputs: &[String]) -> String {
    let mut h = sha2::Sha256::new();
    h.update(input);
    h.update([0]);
    h.update(answer_prefix);
    for o in outputs {
        h.update([0]);
        h.update(o);
    }
    format!("{:x}", h.finalize())
}

/// Key of the sample cache: everything a sample depends on except its index.
pub fn cache_key(
    task: &str,
    generator: &RulerGenerator,
    length: usize,
    seed: u64,
    format_fingerprint: &str,
    assets: &Assets,
    protocol: crate::eval::ruler::config::Protocol,
) -> Result<String> {
    let mut h = sha2::Sha256::new();
    h.update(format!(
        "v{GENERATOR_VERSION}/{task}/{length}/{seed}/{format_fingerprint}/"
    ));
    if protocol == crate::eval::ruler::config::Protocol::Ruler {
        // (The wildlong key stays as it was, so existing caches stay valid.)
        h.update(format!("ruler/{}/", assets.essay_sha256));
    }
    h.update(serde_json::to_string(generator).context("task config")?);
    if let RulerGenerator::Qa { dataset, .. } = generator {
        h.update(&assets.qa(*dataset).sha256);
    }
    Ok(format!("{:x}", h.finalize()))
}
