//! Tokenizers: HF `tokenizer.json`, or built from GGUF metadata.
//!
//! GGUF builds follow llama.cpp's vocabulary types: `gpt2` (byte-level BPE; the pre-tokenizer
//! comes from `tokenizer.ggml.pre`, and an unknown one is refused by name rather than guessed)
//! and `llama` (SentencePiece BPE with byte fallback; merges derived from the piece scores as
//! HF's `SentencePieceExtractor` does). candle's own GGUF builder mis-tokenizes SmolLM2 and has
//! no SentencePiece support (notes/candle.md §4), hence this file.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{unicode::NFC, Prepend, Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// GGUF pre-tokenizer names we build, for error messages.
pub const SUPPORTED_GGUF_PRE: &[&str] = &[
    "smollm",
    "starcoder",
    "llama-bpe",
    "llama3",
    "qwen2",
    "gpt-2",
    "default",
];

const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Tokens that end a turn or a text in the chat formats we know of.
const END_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "</s>",
    "<end_of_turn>",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// What the tokenizer was built from, e.g. `gguf gpt2/smollm`.
    pub kind: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    eos_ids: Vec<u32>,
    token_bytes: OnceLock<std::result::Result<Vec<Vec<u8>>, String>>,
}

fn err(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{e}")
}

impl Tokenizer {
    fn finish(
        inner: tokenizers::Tokenizer,
        kind: String,
        bos: Option<String>,
        eos: Option<String>,
        mut eos_ids: Vec<u32>,
    ) -> Self {
        for t in END_TOKENS {
            if let Some(id) = inner.token_to_id(t) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        Self {
            inner,
            kind,
            bos_token: bos,
            eos_token: eos,
            eos_ids,
            token_bytes: OnceLock::new(),
        }
    }

    /// Loads `tokenizer.json` (+ special tokens from `tokenizer_config.json` beside it).
    pub fn from_file(path: &Path, config_eos: &[u32]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let tc = path.with_file_name("tokenizer_config.json");
        let (mut bos, mut eos) = (None, None);
        if tc.is_file() {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tc)?)
                .with_context(|| format!("{}: invalid JSON", tc.display()))?;
            let tok = |k: &str| match &v[k] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => {
                    o.get("content").and_then(|c| c.as_str()).map(String::from)
                }
                _ => None,
            };
            bos = tok("bos_token");
            eos = tok("eos_token");
        }
        let mut eos_ids = config_eos.to_vec();
        if let Some(id) = eos.as_deref().and_then(|e| inner.token_to_id(e)) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        Ok(Self::finish(
            inner,
            "tokenizer.json".into(),
            bos,
            eos,
            eos_ids,
        ))
    }

    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let md = &ct.metadata;
        let get_str = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
        let get_u32 = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let get_bool = |k: &str| md.get(k).and_then(|v| v.to_bool().ok());
        let model = get_str("tokenizer.ggml.model")
            .context("GGUF metadata has no `tokenizer.ggml.model`")?;
        let tokens: Vec<String> = md
            .get("tokenizer.ggml.tokens")
            .context("GGUF metadata has no `tokenizer.ggml.tokens`")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()
            .context("`tokenizer.ggml.tokens` is not a list of strings")?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|x| x.to_i32())
                .collect::<candle_core::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            bail!(
                "GGUF tokenizer: {} token types for {} tokens",
                types.len(),
                tokens.len()
            );
        }
        let bos_id = get_u32("tokenizer.ggml.bos_token_id");
        let eos_id = get_u32("tokenizer.ggml.eos_token_id");
        let name_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).cloned();
        let (bos, eos) = (name_of(bos_id), name_of(eos_id));

        let (mut inner, kind, add_bos_default) = match model.as_str() {
            "gpt2" => {
                let pre = get_str("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
                (
                    build_gpt2(&tokens, md, &pre)?,
                    format!("gguf gpt2/{pre}"),
                    false,
                )
            }
            "llama" => {
                let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
                    Some(v) => v
                        .to_vec()?
                        .iter()
                        .map(|x| x.to_f32())
                        .collect::<candle_core::Result<_>>()?,
                    None => bail!("GGUF `llama` tokenizer has no `tokenizer.ggml.scores`"),
                };
                let unk = name_of(get_u32("tokenizer.ggml.unknown_token_id"));
                (
                    build_sentencepiece(&tokens, &scores, &types, unk)?,
                    "gguf llama (sentencepiece)".into(),
                    true,
                )
            }
            other => bail!("unsupported GGUF tokenizer model `{other}` (supported: gpt2, llama)"),
        };

        // Control (3) and user-defined (4) tokens are matched whole in text.
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
            let is_named = Some(i as u32) == bos_id || Some(i as u32) == eos_id;
            if *ty == 3 || is_named {
                special.push(AddedToken::from(t.clone(), true).normalized(false));
            } else if *ty == 4 {
                user.push(AddedToken::from(t.clone(), false).normalized(false));
            }
        }
        inner.add_special_tokens(special).map_err(err)?;
        inner.add_tokens(user).map_err(err)?;

        let add_bos = get_bool("tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default);
        if let (true, Some(b), Some(id)) = (add_bos, &bos, bos_id) {
            let tp = TemplateProcessing::builder()
                .try_single(format!("{b} $A"))
                .map_err(|e| anyhow!("{e}"))?
                .try_pair(format!("{b} $A {b} $B"))
                .map_err(|e| anyhow!("{e}"))?
                .special_tokens(vec![(b.clone(), id)])
                .build()
                .map_err(|e| anyhow!("{e}"))?;
            inner.with_post_processor(Some(tp));
        }
        Ok(Self::finish(
            inner,
            kind,
            bos,
            eos,
            eos_id.into_iter().collect(),
        ))
    }

    /// Token ids of `text`; special tokens written in the text are recognised.
    /// `add_special` adds what the tokenizer adds around a sequence (e.g. BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special)
            .map_err(err)?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(err)
    }

    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids that end generation (EOS plus known end-of-turn tokens in the vocabulary).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Raw bytes of every token (special tokens prefixed with 0xFF), as llguidance wants them.
    pub fn token_bytes(&self) -> Result<&[Vec<u8>]> {
        let r = self.token_bytes.get_or_init(|| {
            let json = self.inner.to_string(false).map_err(|e| e.to_string())?;
            let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
            std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&v))
                .map_err(|_| "token byte extraction panicked on this vocabulary".to_string())?
                .map_err(|e| e.to_string())
        });
        r.as_deref()
            .map_err(|e| anyhow!("tokenizer vocabulary: {e}"))
    }
}

fn split(regex: &str) -> Result<PreTokenizerWrapper> {
    Ok(Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(err)?
    .into())
}

fn build_gpt2(
    tokens: &[String],
    md: &HashMap<String, gguf_file::Value>,
    pre: &str,
) -> Result<tokenizers::Tokenizer> {
    let merges: Vec<(String, String)> = md
        .get("tokenizer.ggml.merges")
        .context("GGUF gpt2 tokenizer has no `tokenizer.ggml.merges`")?
        .to_vec()?
        .iter()
        .map(|m| {
            let s = m.to_string()?;
            s.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| candle_core::Error::Msg(format!("invalid merge `{s}`")))
        })
        .collect::<candle_core::Result<_>>()
        .context("`tokenizer.ggml.merges`")?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    // (pre-tokenizer, normalizer, ignore_merges) as in llama.cpp's llama-vocab.cpp / HF tokenizer.json.
    let (pre_tok, nfc, ignore_merges): (PreTokenizerWrapper, bool, bool) = match pre {
        "smollm" | "starcoder" | "refact" => (
            PreSequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            false,
            false,
        ),
        "llama-bpe" | "llama3" => (
            PreSequence::new(vec![
                split(REGEX_LLAMA3)?,
                ByteLevel::new(false, true, false).into(),
            ])
            .into(),
            false,
            true,
        ),
        "qwen2" => (
            PreSequence::new(vec![
                split(REGEX_QWEN2)?,
                ByteLevel::new(false, false, false).into(),
            ])
            .into(),
            true,
            false,
        ),
        "gpt-2" | "gpt2" | "default" => (ByteLevel::new(false, true, true).into(), false, false),
        other => bail!(
            "unsupported GGUF pre-tokenizer `{other}` (supported: {}); refusing to guess",
            SUPPORTED_GGUF_PRE.join(", ")
        ),
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(err)?;
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(pre_tok));
    if nfc {
        tk.with_normalizer(Some(NFC)).map_err(err)?;
    }
    tk.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
    Ok(tk)
}

/// SentencePiece BPE (Llama 2, Mistral): merges ranked by the merged piece's score, as HF's
/// `SentencePieceExtractor` derives them; byte fallback for unknown bytes.
fn build_sentencepiece(
    tokens: &[String],
    scores: &[f32],
    types: &[i32],
    unk: Option<String>,
) -> Result<tokenizers::Tokenizer> {
    if scores.len() != tokens.len() {
        bail!(
            "GGUF tokenizer: {} scores for {} tokens",
            scores.len(),
            tokens.len()
        );
    }
    let vocab: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    let mut merges: Vec<(String, String, f32)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if types[i] != 1 && types[i] != 4 {
            continue;
        }
        let mut local = Vec::new();
        for (idx, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(idx);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((li, ri, l.to_string(), r.to_string()));
            }
        }
        local.sort_by_key(|x| (x.0, x.1));
        merges.extend(local.into_iter().map(|(_, _, l, r)| (l, r, scores[i])));
    }
    merges.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
    let bpe_vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(
            bpe_vocab,
            merges.into_iter().map(|(l, r, _)| (l, r)).collect(),
        )
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk {
        builder = builder.unk_token(u);
    }
    let mut tk = tokenizers::Tokenizer::new(builder.build().map_err(err)?);
    tk.with_normalizer(Some(NormSequence::new(vec![
        Prepend::new("▁".into()).into(),
        Replace::new(" ", "▁").map_err(err)?.into(),
    ])))
    .map_err(err)?;
    tk.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(vec![
        tokenizers::decoders::DecoderWrapper::Replace(Replace::new("▁", " ").map_err(err)?),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ]))));
    Ok(tk)
}
