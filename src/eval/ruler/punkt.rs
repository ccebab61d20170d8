//! NLTK's Punkt sentence tokenizer (`nltk.tokenize.punkt.PunktSentenceTokenizer.tokenize`
//! as `nltk.sent_tokenize` calls it, NLTK 3.10: the post-ReDoS-fix context search, curly quotes
//! and guillemets as closing punctuation) with NLTK's English parameters, so that RULER's essay haystacks
//! split into the same sentences (needles go between sentences).
//!
//! The parameters (`data/punkt_english/`, laid out as NLTK's `punkt_tab/english/`) are
//! NLTK's English model as the `punkt` crate (1.0.5, MIT/Apache-2.0) ships it; see
//! `data/SOURCES.md`.

use fancy_regex::Regex;
use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

const ORTHO_BEG_UC: u32 = 1 << 1;
const ORTHO_MID_UC: u32 = 1 << 2;
const ORTHO_UNK_UC: u32 = 1 << 3;
const ORTHO_BEG_LC: u32 = 1 << 4;
const ORTHO_MID_LC: u32 = 1 << 5;
const ORTHO_UNK_LC: u32 = 1 << 6;
const ORTHO_UC: u32 = ORTHO_BEG_UC | ORTHO_MID_UC | ORTHO_UNK_UC;
const ORTHO_LC: u32 = ORTHO_BEG_LC | ORTHO_MID_LC | ORTHO_UNK_LC;

/// A language's Punkt parameters (NLTK's `PunktParameters`).
pub struct PunktParams {
    abbrev_types: HashSet<String>,
    collocations: HashSet<(String, String)>,
    sent_starters: HashSet<String>,
    ortho_context: HashMap<String, u32>,
}

impl PunktParams {
    /// Reads the four `punkt_tab` files' texts (each line stripped, as NLTK's
    /// `load_punkt_params` does).
    pub fn from_tab(
        abbrev_types: &str,
        collocations: &str,
        sent_starters: &str,
        ortho_context: &str,
    ) -> Self {
        let lines = |t: &str| -> Vec<String> {
            t.lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()
        };
        let pair = |l: String| -> Option<(String, String)> {
            let (a, b) = l.split_once('\t')?;
            Some((a.to_string(), b.to_string()))
        };
        Self {
            abbrev_types: lines(abbrev_types).into_iter().collect(),
            collocations: lines(collocations).into_iter().filter_map(pair).collect(),
            sent_starters: lines(sent_starters).into_iter().collect(),
            ortho_context: lines(ortho_context)
                .into_iter()
                .filter_map(pair)
                .filter_map(|(t, f)| Some((t, f.parse().ok()?)))
                .collect(),
        }
    }

    /// NLTK's English model.
    pub fn english() -> &'static Self {
        static P: OnceLock<PunktParams> = OnceLock::new();
        P.get_or_init(|| {
            Self::from_tab(
                include_str!("data/punkt_english/abbrev_types.txt"),
                include_str!("data/punkt_english/collocations.tab"),
                include_str!("data/punkt_english/sent_starters.txt"),
                include_str!("data/punkt_english/ortho_context.tab"),
            )
        })
    }

    fn ortho(&self, typ: &str) -> u32 {
        self.ortho_context.get(typ).copied().unwrap_or(0)
    }
}

/// `PunktLanguageVars.word_tokenize`'s pattern (non-word characters `)";}]*:@'({[`, curly
/// quotes, guillemets and `?!`, multi-character punctuation `--`, `..`, `. . .`).
fn word_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    R.get_or_init(|| {
        let non_word = r#"(?:[)";}\]*:@'({\[‘’“”«»?!])"#;
        let multi = r"(?:\-{2,}|\.{2,}|(?:\.\s){2,}\.)";
        let start = r#"[^("`{\[:;&#*@)}\]\-,]"#;
        Regex::new(&format!(
            r"({multi}|(?={start})\S+?(?=\s|$|{non_word}|{multi}|,(?=$|\s|{non_word}|{multi}))|\S)"
        ))
        .expect("Punkt word pattern compiles")
    })
}

fn numeric_re() -> &'static regex::Regex {
    static R: OnceLock<regex::Regex> = OnceLock::new();
    R.get_or_init(|| regex::Regex::new(r"^-?[\.,]?\d[\d,\.-]*\.?$").expect("compiles"))
}

fn is_non_word(c: char) -> bool {
    matches!(
        c,
        ')' | '"'
            | ';'
            | '}'
            | ']'
            | '*'
            | ':'
            | '@'
            | '\''
            | '('
            | '{'
            | '['
            | '‘'
            | '’'
            | '“'
            | '”'
            | '«'
            | '»'
            | '?'
            | '!'
    )
}

/// `string.whitespace` (ASCII only, as `_get_last_whitespace_index` tests it).
fn is_ascii_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// A word token with its first-pass and second-pass annotations (`PunktToken`).
struct Token<'t> {
    tok: &'t str,
    typ: String,
    sentbreak: bool,
    abbr: bool,
    ellipsis: bool,
}

impl<'t> Token<'t> {
    fn new(tok: &'t str) -> Self {
        let lower = tok.to_lowercase();
        let typ = if numeric_re().is_match(&lower) {
            "##number##".to_string()
        } else {
            lower
        };
        Self {
            tok,
            typ,
            sentbreak: false,
            abbr: false,
            ellipsis: false,
        }
    }

    fn period_final(&self) -> bool {
        self.tok.ends_with('.')
    }

    fn type_no_period(&self) -> &str {
        if self.typ.chars().count() > 1 && self.typ.ends_with('.') {
            &self.typ[..self.typ.len() - 1]
        } else {
            &self.typ
        }
    }

    fn type_no_sentperiod(&self) -> &str {
        if self.sentbreak {
            self.type_no_period()
        } else {
            &self.typ
        }
    }

    fn first_upper(&self) -> bool {
        self.tok.chars().next().is_some_and(char::is_uppercase)
    }

    fn first_lower(&self) -> bool {
        self.tok.chars().next().is_some_and(char::is_lowercase)
    }

    /// `\.\.+$`
    fn is_ellipsis(&self) -> bool {
        self.tok.len() >= 2 && self.tok.bytes().all(|b| b == b'.')
    }

    /// `[^\W\d]\.$`: one letter (or underscore), then a period.
    fn is_initial(&self) -> bool {
        let mut c = self.tok.chars();
        match (c.next(), c.next(), c.next()) {
            (Some(a), Some('.'), None) => (a.is_alphanumeric() || a == '_') && !a.is_numeric(),
            _ => false,
        }
    }
}

#[derive(PartialEq)]
enum Starter {
    Yes,
    No,
    Unknown,
}

/// NLTK's `PunktSentenceTokenizer` over one parameter set.
pub struct SentenceTokenizer<'p> {
    params: &'p PunktParams,
}

impl<'p> SentenceTokenizer<'p> {
    pub fn new(params: &'p PunktParams) -> Self {
        Self { params }
    }

    /// `sent_tokenize(text)`: the sentences, boundaries realigned.
    pub fn tokenize<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let slices = self.slices_from_text(text);
        self.realign(text, &slices)
            .into_iter()
            .map(|(s, e)| &text[s..e])
            .collect()
    }

    fn tokenize_words<'t>(&self, text: &'t str) -> Vec<Token<'t>> {
        let mut out = Vec::new();
        for line in text.split('\n') {
            if line.trim().is_empty() {
                continue;
            }
            // The pattern is fixed and backtracks little; an error could only be its
            // backtrack limit, which a line never comes near.
            out.extend(
                word_re()
                    .find_iter(line)
                    .flatten()
                    .map(|m| Token::new(m.as_str())),
            );
        }
        out
    }

    fn first_pass(&self, t: &mut Token) {
        let tok = t.tok;
        if tok == "." || tok == "?" || tok == "!" {
            t.sentbreak = true;
        } else if t.is_ellipsis() {
            t.ellipsis = true;
        } else if t.period_final() && !tok.ends_with("..") {
            let stem = tok[..tok.len() - 1].to_lowercase();
            let last = stem.rsplit('-').next().unwrap_or("");
            if self.params.abbrev_types.contains(&stem) || self.params.abbrev_types.contains(last) {
                t.abbr = true;
            } else {
                t.sentbreak = true;
            }
        }
    }

    fn ortho_heuristic(&self, t: &Token) -> Starter {
        if matches!(t.tok, ";" | ":" | "," | "." | "!" | "?") {
            return Starter::No;
        }
        let oc = self.params.ortho(t.type_no_sentperiod());
        if t.first_upper() && oc & ORTHO_LC != 0 && oc & ORTHO_MID_UC == 0 {
            return Starter::Yes;
        }
        if t.first_lower() && (oc & ORTHO_UC != 0 || oc & ORTHO_BEG_LC == 0) {
            return Starter::No;
        }
        Starter::Unknown
    }

    /// `_second_pass_annotation(tok1, tok2)`: updates tok1 from its successor.
    fn second_pass(&self, t1: &mut Token, t2: &Token) {
        if !t1.period_final() {
            return;
        }
        let typ = t1.type_no_period().to_string();
        let next_typ = t2.type_no_sentperiod().to_string();
        let initial = t1.is_initial();
        if self
            .params
            .collocations
            .contains(&(typ.clone(), next_typ.clone()))
        {
            t1.sentbreak = false;
            t1.abbr = true;
            return;
        }
        if (t1.abbr || t1.ellipsis) && !initial {
            if self.ortho_heuristic(t2) == Starter::Yes {
                t1.sentbreak = true;
                return;
            }
            if t2.first_upper() && self.params.sent_starters.contains(&next_typ) {
                t1.sentbreak = true;
                return;
            }
        }
        if initial || typ == "##number##" {
            let starter = self.ortho_heuristic(t2);
            if starter == Starter::No {
                t1.sentbreak = false;
                t1.abbr = true;
                return;
            }
            if starter == Starter::Unknown
                && initial
                && t2.first_upper()
                && self.params.ortho(&next_typ) & ORTHO_LC == 0
            {
                t1.sentbreak = false;
                t1.abbr = true;
            }
        }
    }

    /// `text_contains_sentbreak`: a sentence break before the context's last token.
    fn contains_sentbreak(&self, text: &str) -> bool {
        let mut toks = self.tokenize_words(text);
        for t in toks.iter_mut() {
            self.first_pass(t);
        }
        // The annotation is a generator: token i's second pass sees token i + 1 after its
        // first pass only, and the loop stops at the first break that has a successor.
        for i in 0..toks.len() {
            if i + 1 < toks.len() {
                let (a, b) = toks.split_at_mut(i + 1);
                self.second_pass(&mut a[i], &b[0]);
            }
            if toks[i].sentbreak {
                return i + 1 < toks.len();
            }
        }
        false
    }

    /// `period_context_re().finditer`: every `.?!` followed by a non-word character or by
    /// whitespace and a token; (position, end, start of the next token, after-token text).
    fn period_contexts<'t>(&self, text: &'t str) -> Vec<(usize, usize, Option<usize>, &'t str)> {
        let mut out = Vec::new();
        for (i, c) in text.char_indices() {
            if !matches!(c, '.' | '?' | '!') {
                continue;
            }
            let after = &text[i + 1..];
            let mut chars = after.char_indices();
            match chars.next() {
                Some((_, n)) if is_non_word(n) => {
                    out.push((i, i + 1, None, &after[..n.len_utf8()]));
                }
                Some((_, n)) if n.is_whitespace() => {
                    let ws_end = after
                        .char_indices()
                        .find(|(_, ch)| !ch.is_whitespace())
                        .map(|(k, _)| k);
                    if let Some(ws_end) = ws_end {
                        let tok_end = after[ws_end..]
                            .char_indices()
                            .find(|(_, ch)| ch.is_whitespace())
                            .map(|(k, _)| ws_end + k)
                            .unwrap_or(after.len());
                        out.push((i, i + 1, Some(i + 1 + ws_end), &after[..tok_end]));
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// `_match_potential_end_contexts` then `_slices_from_text`.
    fn slices_from_text(&self, text: &str) -> Vec<(usize, usize)> {
        let mut contexts = Vec::new(); // (match, context)
        let mut prev_slice = (0usize, 0usize);
        let mut prev_match = None;
        for m in self.period_contexts(text) {
            let before = &text[prev_slice.1..m.0];
            let last_ws = before
                .char_indices()
                .rev()
                .find(|(_, c)| is_ascii_ws(*c))
                .map(|(k, _)| k)
                .unwrap_or(0);
            let start = if last_ws != 0 {
                last_ws + prev_slice.1 + 1
            } else {
                prev_slice.0
            };
            let word = (start, m.0);
            if let Some(pm) = prev_match.take() {
                if prev_slice.1 <= word.0 {
                    contexts.push((pm, prev_slice));
                }
            }
            prev_match = Some(m);
            prev_slice = word;
        }
        if let Some(pm) = prev_match {
            contexts.push((pm, prev_slice));
        }

        let mut slices = Vec::new();
        let mut last_break = 0;
        for ((pos, end, next_tok, after), (ws, we)) in contexts {
            let context = format!("{}{}{}", &text[ws..we], &text[pos..end], after);
            if self.contains_sentbreak(&context) {
                slices.push((last_break, end));
                last_break = next_tok.unwrap_or(end);
            }
        }
        slices.push((last_break, text.trim_end().len()));
        slices
    }

    /// `_realign_boundaries`: closing quotes and brackets after a break join the sentence
    /// before it.
    fn realign(&self, text: &str, slices: &[(usize, usize)]) -> Vec<(usize, usize)> {
        let nonempty = |(s, e): (usize, usize)| s < e;
        let mut out = Vec::new();
        let mut realign = 0;
        for (k, &(s1, e1)) in slices.iter().enumerate() {
            let s1 = s1 + realign;
            let Some(&(s2, e2)) = slices.get(k + 1) else {
                if nonempty((s1, e1)) {
                    out.push((s1, e1));
                }
                continue;
            };
            match boundary_realignment(&text[s2..e2.max(s2)]) {
                Some((closing, whole)) => {
                    out.push((s1, s2 + closing));
                    realign = whole;
                }
                None => {
                    realign = 0;
                    if nonempty((s1, e1)) {
                        out.push((s1, e1));
                    }
                }
            }
        }
        out
    }
}

/// `re_boundary_realignment.match(text)` (`["')\]}‘’“”«»]+?(?:\s+|(?=--)|$)`, multiline): the
/// length of the match without trailing whitespace, and the whole match's length.
fn boundary_realignment(text: &str) -> Option<(usize, usize)> {
    let closing = text
        .char_indices()
        .find(|(_, c)| {
            !matches!(
                c,
                '"' | '\'' | ')' | ']' | '}' | '‘' | '’' | '“' | '”' | '«' | '»'
            )
        })
        .map(|(k, _)| k)
        .unwrap_or(text.len());
    // The lazy `+?`: the shortest run of closing characters that a break follows.
    let ends = text[..closing]
        .char_indices()
        .map(|(k, c)| k + c.len_utf8());
    for j in ends {
        let rest = &text[j..];
        let ws = rest
            .char_indices()
            .find(|(_, c)| !c.is_whitespace())
            .map(|(k, _)| k)
            .unwrap_or(rest.len());
        if ws > 0 {
            return Some((j, j + ws));
        }
        if rest.starts_with("--") || rest.is_empty() || rest.starts_with('\n') {
            return Some((j, j));
        }
    }
    None
}

/// `nltk.sent_tokenize(text)` with NLTK's English model.
pub fn sent_tokenize(text: &str) -> Vec<&str> {
    SentenceTokenizer::new(PunktParams::english()).tokenize(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each expectation is what `nltk.sent_tokenize` (NLTK 3.10.4, punkt_tab English built from
    // data/punkt_english/) returned for the same text, in scripts/ruler_parity.sh's
    // environment: `python -c "import nltk; print(nltk.sent_tokenize(TEXT))"`. The whole
    // essay haystack's 6,820 sentences matched too (checked once, not kept: the parity
    // fixture covers the essay tasks).
    #[test]
    fn splits_as_nltk_does() {
        let cases: &[(&str, &[&str])] = &[
            (
                "Mr. Smith went to Washington. He said \"hi.\" Then (he left.) U.S. troops arrived at 5 p.m. on Jan. 3. The end... Really?! Yes.",
                &[
                    "Mr. Smith went to Washington.",
                    "He said \"hi.\"",
                    "Then (he left.)",
                    "U.S. troops arrived at 5 p.m. on Jan. 3.",
                    "The end...",
                    "Really?!",
                    "Yes.",
                ],
            ),
            (
                "J. S. Bach wrote it. It cost $3.50 in 1999. No. 5 is next.",
                &["J. S. Bach wrote it.", "It cost $3.50 in 1999.", "No.", "5 is next."],
            ),
            (
                "“It is late.” She left. «Oui.» Il part. The war--it ended. Then the rest.",
                &[
                    "“It is late.”",
                    "She left.",
                    "«Oui.»",
                    "Il part.",
                    "The war--it ended.",
                    "Then the rest.",
                ],
            ),
            (
                "First line.\n\nSecond paragraph! Third? e.g. this one. Dr. Who.",
                &[
                    "First line.",
                    "Second paragraph!",
                    "Third?",
                    "e.g.",
                    "this one.",
                    "Dr. Who.",
                ],
            ),
            (
                "Values 1. 2. and 3. follow.  Trailing space.   ",
                &["Values 1.", "2. and 3. follow.", "Trailing space."],
            ),
            ("No break here", &["No break here"]),
        ];
        for (text, want) in cases {
            assert_eq!(sent_tokenize(text), *want, "{text:?}");
        }
    }
}
