//! RULER's own generators reproduced call for call (`--protocol ruler`): NVIDIA/RULER's
//! `scripts/data/synthetic/{niah,variable_tracking,common_words_extraction,
//! freq_words_extraction,qa}.py` with the same random streams (CPython's Mersenne Twister
//! seeded with the task's seed, [`PyRandom`]; numpy's legacy generator for variable
//! tracking's values), the same sentence splitter (NLTK's Punkt, [`punkt`]), the same
//! fitting (an estimate, RULER's binary search, then each sample shrunk by RULER's step
//! until it fits) and the same token count (the prompt text without special tokens, as
//! `tokenizer.tokenize` counts it), so that a sample here equals the line `prepare.py`
//! writes for the same tokenizer, sources and seed (tests/integration/ruler_parity.rs
//! checks all 13 tasks against recorded output).
//!
//! With `--chat`, the model's chat template wraps the whole prompt once where RULER would
//! use its own `template.py` entry: RULER's singular rewrites (`Some` → `A`, …) then touch
//! only the task's template, and common-words extraction's few-shot example is not wrapped
//! in a template of its own.

use crate::eval::ruler::config::{HaystackKind, NeedleKind, RulerGenerator};
use crate::eval::ruler::data::{self, Assets};
use crate::eval::ruler::punkt;
use crate::eval::ruler::pyrandom::PyRandom;
use crate::eval::ruler::synth::{self, PromptFormat, Sample};
use crate::eval::ruler::tasks::{self, format};
use anyhow::{bail, Result};
use std::sync::OnceLock;

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
    let c = Counter {
        format,
        task,
        length,
        ttg: tasks::tokens_to_generate(generator),
    };
    let rng = PyRandom::new(seed);
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
                rng,
                seed,
                haystack: type_haystack,
                essay: essay_words(&assets.essay_text),
                kind_k: type_needle_k,
                kind_v: type_needle_v,
                num_k: num_needle_k.max(num_needle_q),
                num_v: num_needle_v,
                num_q: num_needle_q,
            };
            let incremental = match type_haystack {
                HaystackKind::Essay => 500,
                _ if length < 4096 => 5,
                _ => 25,
            };
            c.searched(&mut g, n, incremental, 0)
        }
        RulerGenerator::VariableTracking {
            type_haystack,
            num_chains,
            num_hops,
            ..
        } => {
            if type_haystack == HaystackKind::Needle {
                bail!("variable tracking takes a noise or essay haystack");
            }
            let mut g = Vt {
                rng,
                np: PyRandom::numpy_legacy(seed as u32),
                haystack: type_haystack,
                essay: essay_words(&assets.essay_text),
                num_chains,
                num_hops,
                is_icl: true,
                icl: None,
            };
            // RULER's in-context example: one sample fitted to 500 tokens, nothing to
            // generate, the bare task template (`sys_vartrack_w_noise_random(1, 500, …)`).
            let icl_counter = Counter {
                format: &PromptFormat {
                    tokenizer: format.tokenizer,
                    chat: None,
                },
                task,
                length: 500,
                ttg: 0,
            };
            let inc = if type_haystack == HaystackKind::Essay {
                50
            } else {
                5
            };
            let example = icl_counter.searched(&mut g, 1, inc, 0)?.remove(0);
            let example = format!(
                "{}{} {}\n",
                example.input,
                example.answer_prefix,
                example.outputs.join(" ")
            );
            let example_tokens = format.tokenizer.encode(&example, false)?.len();
            g.is_icl = false;
            g.icl = Some(example);
            let incremental = match type_haystack {
                HaystackKind::Essay => 500,
                _ if length < 4096 => 5,
                _ => 10,
            };
            c.searched(&mut g, n, incremental, example_tokens)
        }
        RulerGenerator::CommonWordsExtraction {
            freq_cw,
            freq_ucw,
            num_cw,
            ..
        } => {
            let mut words: Vec<&str> = assets.cwe_words.clone();
            PyRandom::new(seed).shuffle(&mut words);
            let mut g = Cwe {
                rng,
                seed,
                words,
                freq: if length < 4096 {
                    (6, 1, 3, 1)
                } else {
                    (freq_cw, freq_ucw, 10, 3)
                },
                few_words: if length < 4096 { 20 } else { 40 },
                num_cw,
            };
            c.cwe(&mut g, n)
        }
        RulerGenerator::FreqWordsExtraction {
            alpha,
            coded_wordlen,
            ..
        } => {
            let mut g = Fwe {
                rng,
                seed,
                alpha,
                wordlen: coded_wordlen,
                vocab_size: length.saturating_sub(c.ttg) / 50,
                vocab: Vec::new(),
            };
            c.fwe(&mut g, n)
        }
        RulerGenerator::Qa { dataset, .. } => {
            let mut g = Qa {
                rng,
                seed,
                qa: assets.qa(dataset),
            };
            c.searched(&mut g, n, 10, 0)
        }
    }
}

/// One generator's `generate_input_output`.
trait Draw {
    /// The task template filled for `units` haystack units (words, lines, documents) and
    /// sample `index` (QA's question; the others ignore it).
    fn draw(&mut self, units: usize, index: usize) -> Result<Drawn>;
    /// What RULER does to a drawn input before it is measured (variable tracking inserts
    /// its in-context example).
    fn finish(&mut self, d: Drawn) -> Drawn {
        d
    }
    /// The task constants whose answer prefix splits the text.
    fn constants(&self) -> &'static tasks::TaskConstants;
}

/// A filled prompt with its answers.
struct Drawn {
    text: String,
    outputs: Vec<String>,
    depths: Vec<u32>,
}

/// RULER's split: the answer prefix starts at the last occurrence of its first 10
/// characters.
fn split(text: &str, c: &tasks::TaskConstants) -> (String, String) {
    let marker: String = c.answer_prefix.chars().take(10).collect();
    let at = text.rfind(&marker).unwrap_or(text.len());
    (text[..at].to_string(), text[at..].to_string())
}

/// Python's float `a // b` (`float_floor_div`), for the positive operands RULER divides.
fn py_floordiv(a: f64, b: f64) -> f64 {
    let m = a % b;
    let div = (a - m) / b;
    let f = div.floor();
    if div - f > 0.5 {
        f + 1.0
    } else {
        f
    }
}

/// Draws at the smallest size before a sample is given up (RULER never gives up).
const MAX_REDRAWS: usize = 1000;

/// Measures prompts as RULER does and runs its fitting loops.
struct Counter<'a> {
    format: &'a PromptFormat<'a>,
    task: &'a str,
    length: usize,
    ttg: usize,
}

impl Counter<'_> {
    /// RULER's `len(TOKENIZER.text_to_tokens(input_text))`: the whole prompt (chat
    /// template included), no special tokens added.
    fn count(&self, text: &str, c: &tasks::TaskConstants) -> Result<usize> {
        let (input, prefix) = split(text, c);
        let full = self.format.text(&input, &prefix)?;
        Ok(self.format.tokenizer.encode(&full, false)?.len())
    }

    fn sample(
        &self,
        c: &tasks::TaskConstants,
        index: usize,
        d: Drawn,
        tokens: usize,
        units: usize,
    ) -> Result<Sample> {
        let (input, answer_prefix) = split(&d.text, c);
        let prompt_tokens = self.format.tokens(&input, &answer_prefix)?.len();
        Ok(Sample {
            index,
            hash: synth::sample_hash(&input, &answer_prefix, &d.outputs),
            input,
            answer_prefix,
            outputs: d.outputs,
            length: tokens + self.ttg,
            prompt_tokens,
            haystack_units: units,
            depths: d.depths,
        })
    }

    /// niah.py / variable_tracking.py / qa.py: an estimate from `incremental` units, a
    /// binary search up to three times it, then each sample shrunk by `incremental` until
    /// it fits; `extra` tokens (an in-context example) count against the length.
    fn searched(
        &self,
        g: &mut impl Draw,
        n: usize,
        incremental: usize,
        extra: usize,
    ) -> Result<Vec<Sample>> {
        let probe = g.draw(incremental, 0)?;
        let per_unit = self.count(&probe.text, g.constants())? as f64 / incremental as f64;
        let estimated = ((self.length as f64 / per_unit) * 3.0) as i64;
        let fitted = self.largest_fitting(g, incremental, estimated, extra)?;
        self.shrunk_samples(g, n, fitted, incremental)
    }

    /// common_words_extraction.py: an estimate from 4,096 words, a binary search up to
    /// twice it, then each sample shrunk by 10 words until it fits.
    fn cwe(&self, g: &mut Cwe, n: usize) -> Result<Vec<Sample>> {
        let probe = g.draw(4096, 0)?;
        let per_word = self.count(&probe.text, g.constants())? as f64 / 4096.0;
        let estimated = py_floordiv(self.length as f64, per_word) as i64 * 2;
        let fitted = self.largest_fitting(g, 10, estimated, 0)?;
        self.shrunk_samples(g, n, fitted, 10)
    }

    /// RULER's binary search between `incremental` and max(`estimated`, 2 × `incremental`)
    /// units, each probe drawn afresh for sample 0; `incremental` when nothing fits.
    fn largest_fitting(
        &self,
        g: &mut impl Draw,
        incremental: usize,
        estimated: i64,
        extra: usize,
    ) -> Result<usize> {
        let (mut lo, mut hi) = (incremental as i64, estimated.max(2 * incremental as i64));
        let mut best = None;
        while lo <= hi {
            let mid = (lo + hi) / 2;
            let d = g.draw(mid as usize, 0)?;
            if self.count(&d.text, g.constants())? + extra + self.ttg <= self.length {
                best = Some(mid as usize);
                lo = mid + 1;
            } else {
                hi = mid - 1;
            }
        }
        Ok(best.unwrap_or(incremental))
    }

    /// Each sample drawn at the fitted size, shrunk by a step while it does not fit; at the
    /// smallest size RULER draws again until a draw fits (forever; here up to MAX_REDRAWS
    /// times).
    fn shrunk_samples(
        &self,
        g: &mut impl Draw,
        n: usize,
        fitted: usize,
        incremental: usize,
    ) -> Result<Vec<Sample>> {
        let mut out = Vec::with_capacity(n);
        for index in 0..n {
            let mut used = fitted;
            let mut redraws = 0;
            let (d, tokens) = loop {
                let d = g.draw(used, index)?;
                let d = g.finish(d);
                let tokens = self.count(&d.text, g.constants())?;
                if tokens + self.ttg <= self.length {
                    break (d, tokens);
                }
                if used > incremental {
                    used -= incremental;
                } else {
                    redraws += 1;
                    if redraws > MAX_REDRAWS {
                        bail!(
                            "task `{}` sample {index}: {MAX_REDRAWS} draws of {incremental} haystack units all exceed length {}",
                            self.task,
                            self.length
                        );
                    }
                }
            };
            out.push(self.sample(g.constants(), index, d, tokens, used)?);
        }
        Ok(out)
    }

    /// freq_words_extraction.py: the word count grown in steps of 1/32 of the input budget
    /// until the text reaches it, one step back; each sample from that count, shrunk by a
    /// step while it is over the budget.
    fn fwe(&self, g: &mut Fwe, n: usize) -> Result<Vec<Sample>> {
        let c = &tasks::FREQ_WORDS_EXTRACTION;
        let max_len = self.length.saturating_sub(self.ttg);
        let inc = max_len / 32;
        if inc == 0 {
            bail!("task `{}`: length {} is too short", self.task, self.length);
        }
        // generate_input_output(max_len) without a word count.
        g.new_vocab()?;
        let mut words = (max_len / g.wordlen) as i64;
        let mut text = g.text(words);
        while self.count(&text.0, c)? < max_len {
            words += inc as i64;
            text = g.text(words);
        }
        words -= inc as i64;
        let fitted = words;
        let mut out = Vec::with_capacity(n);
        for index in 0..n {
            g.new_vocab()?;
            let mut words = fitted;
            let mut text = g.text(words);
            while self.count(&text.0, c)? > max_len {
                words -= inc as i64;
                if words <= 0 {
                    bail!("task `{}`: cannot fit length {}", self.task, self.length);
                }
                text = g.text(words);
            }
            let (t, answer) = g.text(words);
            let tokens = self.count(&t, c)?;
            let d = Drawn {
                text: t,
                outputs: answer,
                depths: Vec::new(),
            };
            out.push(self.sample(c, index, d, tokens, words as usize)?);
        }
        Ok(out)
    }
}

struct Niah<'a> {
    assets: &'a Assets,
    rng: PyRandom,
    seed: u64,
    haystack: HaystackKind,
    essay: Vec<&'a str>,
    kind_k: NeedleKind,
    kind_v: NeedleKind,
    num_k: usize,
    num_v: usize,
    num_q: usize,
}

fn kind_name(k: NeedleKind) -> &'static str {
    match k {
        NeedleKind::Numbers => "numbers",
        NeedleKind::Words => "words",
        NeedleKind::Uuids => "uuids",
    }
}

/// Needles (or chain lines) between the sentences of an essay at depths drawn from
/// RULER's 40 (`random.sample(DEPTHS, n)`), each sentence run joined by spaces.
fn insert_in_sentences(
    rng: &mut PyRandom,
    sents: &[&str],
    needles: &[String],
) -> Result<(String, Vec<u32>)> {
    let grid = synth::depths();
    if needles.len() > grid.len() {
        bail!("more inserted lines than RULER's 40 depths");
    }
    let depths: Vec<u32> = rng
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
    Ok((parts.join(" "), depths))
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
}

impl Draw for Niah<'_> {
    fn constants(&self) -> &'static tasks::TaskConstants {
        &tasks::NIAH
    }

    fn draw(&mut self, num_haystack: usize, _index: usize) -> Result<Drawn> {
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

        let (context, depths) = match self.haystack {
            HaystackKind::Essay => {
                let text = (0..num_haystack)
                    .map(|i| self.essay[i % self.essay.len()])
                    .collect::<Vec<_>>()
                    .join(" ");
                let sents = punkt::sent_tokenize(text.trim());
                insert_in_sentences(&mut self.rng, &sents, &needles)?
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
        let mut template = tasks::NIAH.with_answer_prefix();
        let mut tv = type_v.to_string();
        if self.num_q * self.num_v == 1 {
            template = tasks::singular(&template);
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
        Ok(Drawn {
            text,
            outputs,
            depths,
        })
    }
}

/// variable_tracking.py: chains `VAR X = 12345`, `VAR Y = VAR X `, … in a noise or essay
/// haystack; the values from numpy's legacy generator, everything else from `random`.
struct Vt<'a> {
    rng: PyRandom,
    np: PyRandom,
    haystack: HaystackKind,
    essay: Vec<&'a str>,
    num_chains: usize,
    num_hops: usize,
    /// Drawing the in-context example (3-letter names, value 12345).
    is_icl: bool,
    /// The in-context example, once drawn: inserted before each sample's task text.
    icl: Option<String>,
}

/// Each chain's variable names, and its lines.
type NamesAndChains = (Vec<Vec<String>>, Vec<Vec<String>>);

const UPPERCASE: [char; 26] = [
    'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K', 'L', 'M', 'N', 'O', 'P', 'Q', 'R', 'S',
    'T', 'U', 'V', 'W', 'X', 'Y', 'Z',
];

impl Vt<'_> {
    fn name(&mut self, k: usize) -> String {
        self.rng.choices(&UPPERCASE, k).into_iter().collect()
    }

    /// `generate_chains`: names drawn (more appended while any repeat, and chunked as
    /// drawn), each chain's value from numpy.
    fn chains(&mut self) -> Result<NamesAndChains> {
        let k = if self.is_icl { 3 } else { 5 };
        let hops = if self.is_icl {
            self.num_hops.min(10)
        } else {
            self.num_hops
        };
        let want = (hops + 1) * self.num_chains;
        let mut vars: Vec<String> = (0..want).map(|_| self.name(k)).collect();
        while vars.iter().collect::<std::collections::HashSet<_>>().len() < want {
            let v = self.name(k);
            vars.push(v);
        }
        let mut names = Vec::new();
        let mut chains = Vec::new();
        for c in vars.chunks(hops + 1) {
            if c.len() < hops + 1 {
                bail!(
                    "variable names repeated so that a chain came out short (RULER fails here too)"
                );
            }
            let value = if self.is_icl {
                "12345".to_string()
            } else {
                self.np.numpy_randint(10000, 99999).to_string()
            };
            let mut chain = vec![format!("VAR {} = {value}", c[0])];
            for j in 0..hops {
                chain.push(format!("VAR {} = VAR {} ", c[j + 1], c[j]));
            }
            names.push(c.to_vec());
            chains.push(chain);
        }
        Ok((names, chains))
    }

    /// `shuffle_sublists_heap`: chain lines interleaved in a random order that keeps each
    /// chain's own order (a heap keyed by `random()`).
    fn interleave(&mut self, chains: &[Vec<String>]) -> Vec<String> {
        use std::cmp::Reverse;
        #[derive(PartialEq)]
        struct Key(f64, usize, usize);
        impl Eq for Key {}
        impl PartialOrd for Key {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Key {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                self.0
                    .total_cmp(&o.0)
                    .then(self.1.cmp(&o.1))
                    .then(self.2.cmp(&o.2))
            }
        }
        let mut heap = std::collections::BinaryHeap::new();
        for i in 0..chains.len() {
            heap.push(Reverse(Key(self.rng.random(), i, 0)));
        }
        let mut out = Vec::new();
        while let Some(Reverse(Key(_, l, e))) = heap.pop() {
            out.push(chains[l][e].clone());
            if e + 1 < chains[l].len() {
                heap.push(Reverse(Key(self.rng.random(), l, e + 1)));
            }
        }
        out
    }

    /// `randomize_icl`: the example's names and value redrawn.
    fn randomize(&mut self, example: &str) -> String {
        let words: Vec<&str> = example.split_whitespace().collect();
        let tail = &words[words.len().saturating_sub(self.num_hops + 1)..];
        let mut out = example.to_string();
        for item in tail {
            let new = self.name(item.chars().count());
            out = out.replace(item, &new);
        }
        let value = self.np.numpy_randint(10000, 99999).to_string();
        out.replace("12345", &value)
    }
}

impl Draw for Vt<'_> {
    fn constants(&self) -> &'static tasks::TaskConstants {
        &tasks::VARIABLE_TRACKING
    }

    fn draw(&mut self, num_noises: usize, _index: usize) -> Result<Drawn> {
        let (names, chains) = self.chains()?;
        let value = synth::chain_value(&chains[0][0]);
        let (context, depths) = match self.haystack {
            HaystackKind::Essay => {
                let text = self.essay[..num_noises.min(self.essay.len())].join(" ");
                let sents = punkt::sent_tokenize(text.trim());
                let flat = self.interleave(&chains);
                let lines: Vec<String> = flat.iter().map(|l| format!("{}.", l.trim())).collect();
                insert_in_sentences(&mut self.rng, &sents, &lines)?
            }
            _ => {
                let mut sentences = vec![data::NOISE.to_string(); num_noises];
                for chain in &chains {
                    if chain.len() > sentences.len() {
                        bail!("more chain lines than haystack lines");
                    }
                    let mut at = self.rng.sample_indices(sentences.len(), chain.len());
                    at.sort();
                    for (j, &p) in at.iter().enumerate() {
                        sentences.insert(p + j, chain[j].clone());
                    }
                }
                (sentences.join("\n"), Vec::new())
            }
        };
        let context = context.replace(". \n", ".\n");
        let hops = if self.is_icl {
            self.num_hops.min(10)
        } else {
            self.num_hops
        };
        let template = tasks::VARIABLE_TRACKING.with_answer_prefix();
        let num_v = (hops + 1).to_string();
        let text = format(
            &template,
            &[
                ("context", context.as_str()),
                ("query", value.as_str()),
                ("num_v", num_v.as_str()),
            ],
        );
        Ok(Drawn {
            text,
            outputs: names.into_iter().next().unwrap_or_default(),
            depths,
        })
    }

    fn finish(&mut self, mut d: Drawn) -> Drawn {
        if let Some(example) = self.icl.clone() {
            d.text = format!("{}\n{}", self.randomize(&example), d.text);
        }
        d
    }
}

/// common_words_extraction.py: a numbered word list in which 10 words repeat most.
struct Cwe<'a> {
    rng: PyRandom,
    seed: u64,
    /// The sorted word lists, shuffled once with the seed.
    words: Vec<&'a str>,
    /// (common repeats, uncommon repeats) of the sample, then of the few-shot example.
    freq: (usize, usize, usize, usize),
    few_words: usize,
    num_cw: usize,
}

impl Cwe<'_> {
    /// `get_example(num_words, common_repeats, uncommon_repeats, common_nums)`.
    fn example(
        &mut self,
        n: usize,
        common: usize,
        uncommon: usize,
    ) -> Result<(String, Vec<String>)> {
        if n > self.words.len() {
            bail!(
                "{n} distinct words wanted, the word lists have {}: RULER draws from its english_words.json here, which the ruler protocol does not have",
                self.words.len()
            );
        }
        let full: Vec<String> = self
            .rng
            .sample(&self.words, n)
            .into_iter()
            .map(String::from)
            .collect();
        let k = self.num_cw.min(full.len());
        let (top, rest) = full.split_at(k);
        let mut list: Vec<&String> = Vec::new();
        for _ in 0..common {
            list.extend(top);
        }
        for _ in 0..uncommon {
            list.extend(rest);
        }
        PyRandom::new(self.seed).shuffle(&mut list);
        let context = list
            .iter()
            .enumerate()
            .map(|(i, w)| format!("{}. {w}", i + 1))
            .collect::<Vec<_>>()
            .join(" ");
        Ok((context, top.to_vec()))
    }
}

impl Draw for Cwe<'_> {
    fn constants(&self) -> &'static tasks::TaskConstants {
        &tasks::COMMON_WORDS_EXTRACTION
    }

    fn draw(&mut self, num_words: usize, _index: usize) -> Result<Drawn> {
        let (common, uncommon, few_common, few_uncommon) = self.freq;
        let template = tasks::COMMON_WORDS_EXTRACTION.with_answer_prefix();
        let num_cw = self.num_cw.to_string();
        let fill = |context: &str| {
            format(
                &template,
                &[
                    ("num_cw", num_cw.as_str()),
                    ("context", context),
                    ("query", ""),
                ],
            )
        };
        // One few-shot example (RULER's num_fewshot = 1).
        let (ex, ex_answer) = self.example(self.few_words, few_common, few_uncommon)?;
        let (context, answer) = self.example(num_words, common, uncommon)?;
        let shot = format!(
            "{} {}",
            fill(&ex),
            ex_answer
                .iter()
                .enumerate()
                .map(|(i, w)| format!("{}. {w}", i + 1))
                .collect::<Vec<_>>()
                .join(" ")
        );
        Ok(Drawn {
            text: format!("{shot}\n{}", fill(&context)),
            outputs: answer,
            depths: Vec::new(),
        })
    }
}

/// freq_words_extraction.py: coded words with Zipf-distributed counts; the three most
/// frequent (after the `...` noise word) are the answer.
struct Fwe {
    rng: PyRandom,
    seed: u64,
    alpha: f64,
    wordlen: usize,
    vocab_size: usize,
    vocab: Vec<String>,
}

const LOWERCASE: [char; 26] = [
    'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o', 'p', 'q', 'r', 's',
    't', 'u', 'v', 'w', 'x', 'y', 'z',
];

impl Fwe {
    /// The vocabulary `generate_input_output` draws on each call.
    fn new_vocab(&mut self) -> Result<()> {
        if self.vocab_size < 4 {
            bail!("the length leaves fewer than 4 coded words");
        }
        let word = |r: &mut PyRandom, k: usize| -> String {
            r.choices(&LOWERCASE, k).into_iter().collect()
        };
        let mut vocab: Vec<String> = (0..self.vocab_size)
            .map(|_| word(&mut self.rng, self.wordlen))
            .collect();
        let distinct = |v: &[String]| v.iter().collect::<std::collections::BTreeSet<_>>().len();
        while distinct(&vocab) < self.vocab_size {
            let w = word(&mut self.rng, self.wordlen);
            vocab.push(w);
        }
        let mut vocab: Vec<String> = vocab
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        PyRandom::new(self.seed).shuffle(&mut vocab);
        vocab[0] = "...".into();
        self.vocab = vocab;
        Ok(())
    }

    /// `gen_text(num_words)`: each word k repeated ⌊num_words·k^−α/ζ(α)⌋ times, shuffled.
    fn text(&self, num_words: i64) -> (String, Vec<String>) {
        let z = scipy_zeta(self.alpha);
        let mut words: Vec<&str> = Vec::new();
        for (k, w) in self.vocab.iter().enumerate() {
            let cnt = num_words as f64 * ((k + 1) as f64).powf(-self.alpha) / z;
            for _ in 0..(cnt as i64).max(0) {
                words.push(w);
            }
        }
        PyRandom::new(self.seed).shuffle(&mut words);
        let template = tasks::FREQ_WORDS_EXTRACTION.with_answer_prefix();
        let text = format(
            &template,
            &[("context", words.join(" ").as_str()), ("query", "")],
        );
        (text, self.vocab[1..4].to_vec())
    }
}

/// `scipy.special.zeta(s)` as RULER calls it: at integer s < 31 scipy returns its table's
/// value (`1 + zetac_TAB[s]`, printed by scipy 1.17), elsewhere our Euler–Maclaurin sum
/// (within a few ulps of scipy's rational approximation; a count of ⌊n·k^−s/ζ(s)⌋ words
/// would change only where that product lands within those ulps of an integer).
fn scipy_zeta(s: f64) -> f64 {
    const TABLE: [f64; 29] = [
        1.6449340668482264,
        1.2020569031595942,
        1.0823232337111381,
        1.03692775514337,
        1.0173430619844492,
        1.008349277381923,
        1.0040773561979444,
        1.0020083928260821,
        1.000994575127818,
        1.0004941886041194,
        1.000246086553308,
        1.0001227133475785,
        1.0000612481350588,
        1.000030588236307,
        1.0000152822594086,
        1.0000076371976379,
        1.000003817293265,
        1.0000019082127165,
        1.0000009539620338,
        1.0000004769329869,
        1.0000002384505027,
        1.000000119219926,
        1.000000059608189,
        1.0000000298035034,
        1.0000000149015549,
        1.0000000074507118,
        1.000000003725334,
        1.0000000018626598,
        1.0000000009313275,
    ];
    if s.fract() == 0.0 && (2.0..31.0).contains(&s) {
        TABLE[s as usize - 2]
    } else {
        synth::zeta(s)
    }
}

/// qa.py: the question's gold documents among distractors (the same article's paragraphs
/// first for SQuAD), shuffled with the seed, numbered `Document i:`.
struct Qa<'a> {
    rng: PyRandom,
    seed: u64,
    qa: &'a data::QaSet,
}

impl Draw for Qa<'_> {
    fn constants(&self) -> &'static tasks::TaskConstants {
        &tasks::QA
    }

    fn draw(&mut self, num_docs: usize, index: usize) -> Result<Drawn> {
        let qa = self.qa;
        let Some(q) = qa.qas.get(index) else {
            bail!(
                "sample {index}: the QA set has {} questions ({})",
                qa.qas.len(),
                qa.source
            );
        };
        let mut all: Vec<usize> = if num_docs < qa.docs.len() {
            let gold = &q.context;
            let more = &q.more_context;
            if num_docs.saturating_sub(gold.len()) > more.len() {
                let extra: Vec<usize> = (0..qa.docs.len())
                    .filter(|i| !gold.contains(i) && !more.contains(i))
                    .collect();
                let k = num_docs - gold.len() - more.len();
                let mut v: Vec<usize> = gold.iter().chain(more).copied().collect();
                if k > extra.len() {
                    bail!("not enough distractor documents");
                }
                v.extend(self.rng.sample(&extra, k));
                v
            } else {
                if num_docs < gold.len() {
                    bail!("fewer documents than the question's gold documents");
                }
                let mut v = gold.clone();
                v.extend(self.rng.sample(more, num_docs - gold.len()));
                v
            }
        } else {
            (0..num_docs).map(|i| i % qa.docs.len()).collect()
        };
        PyRandom::new(self.seed).shuffle(&mut all);
        let context = all
            .iter()
            .enumerate()
            .map(|(i, &d)| format!("Document {}:\n{}", i + 1, qa.docs[d]))
            .collect::<Vec<_>>()
            .join("\n\n");
        let template = tasks::QA.with_answer_prefix();
        let text = format(
            &template,
            &[("context", context.as_str()), ("query", q.query.as_str())],
        );
        Ok(Drawn {
            text,
            outputs: q.outputs.clone(),
            depths: Vec::new(),
        })
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
