//! Training data: `messages` conversations (stage 2's `data.jsonl`, or any HF/OpenAI chat
//! JSONL) rendered with the model's chat template, the loss taken on assistant tokens only,
//! then packed into rows of a fixed length (positions restart and attention is isolated
//! per conversation) or padded one conversation per row.
//!
//! Assistant spans are found from the template itself: the text of the chat up to an
//! assistant turn (with the generation prompt) must be a prefix of the text that includes
//! the turn, and the difference — the reply and the template's end-of-turn marker, trailing
//! whitespace excluded — is what the model learns to write. Tokens are labelled by their byte
//! offsets in one tokenization of the whole text.

use crate::engine::chat::{ChatTemplate, Message};
use crate::engine::tokenizer::Tokenizer;
use crate::train::ops::IGNORE;
use anyhow::{bail, Context, Result};

/// One tokenized conversation: `targets[j]` is the token after `tokens[j]` where that token
/// is an assistant token, else [`IGNORE`].
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub targets: Vec<i64>,
}

impl Example {
    /// Tokens the loss counts.
    pub fn counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }
}

/// Byte spans of the assistant replies in the rendered text of `messages`: the template's
/// `{% generation %}` blocks where it has them (HF's assistant mask), else each reply as
/// the module's header says — or, where the template renders a turn differently once later
/// turns follow (Qwen3 drops the empty `<think>` block of earlier replies), the reply's
/// text as rendered in the whole conversation and the turn's end-of-turn marker.
pub fn assistant_spans(
    template: &ChatTemplate,
    messages: &[Message],
) -> Result<(String, Vec<(usize, usize)>)> {
    if let Some((full, spans)) = template.render_generation_spans(messages)? {
        if !messages.iter().any(|m| m.role == "assistant") {
            bail!("no assistant turn: nothing to learn");
        }
        if spans.is_empty() {
            bail!("the chat template's generation blocks mark no text in this conversation");
        }
        return Ok((full, spans));
    }
    let full = template.render(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        if i == 0 {
            bail!("a conversation cannot open with an assistant turn");
        }
        let before = template.render(&messages[..i], true)?;
        let with = template.render(&messages[..=i], false)?;
        if with.starts_with(&before) && full.starts_with(&with) {
            let reply = with[before.len()..].trim_end();
            spans.push((before.len(), before.len() + reply.len()));
        } else {
            spans.push(reply_in_context(template, messages, i, &full).with_context(|| {
                format!("the chat template does not render turn {} as an extension of the turns before it, nor its reply verbatim; assistant tokens cannot be located (a template with {{% generation %}} blocks can mark them)", i + 1)
            })?);
        }
    }
    if spans.is_empty() {
        bail!("no assistant turn: nothing to learn");
    }
    Ok((full, spans))
}

/// The span of reply `i` in `full`: the conversation rendered with that reply's content
/// replaced by a marker gives the text before and after it; the reply is what `full` has
/// between them, followed by the end-of-turn marker the turn ends with when it is last.
fn reply_in_context(
    template: &ChatTemplate,
    messages: &[Message],
    i: usize,
    full: &str,
) -> Result<(usize, usize)> {
    const MARK: &str = "\u{F8FF}wildlong-reply\u{F8FF}";
    let mut marked = messages.to_vec();
    marked[i].content = MARK.into();
    let split = |text: &str| -> Result<(usize, usize)> {
        match text.match_indices(MARK).collect::<Vec<_>>()[..] {
            [(at, _)] => Ok((at, text.len() - at - MARK.len())),
            _ => bail!("the reply is not rendered exactly once"),
        }
    };
    let whole = template.render(&marked, false)?;
    let (pre, post) = split(&whole)?;
    if pre + post > full.len()
        || whole[..pre] != full[..pre]
        || whole[whole.len() - post..] != full[full.len() - post..]
    {
        bail!("the text around the reply changes with its content");
    }
    let last = template.render(&marked[..=i], false)?;
    let (_, tail) = split(&last)?;
    let end_of_turn = last[last.len() - tail..].trim_end();
    let after = &full[full.len() - post..];
    if !after.starts_with(end_of_turn) {
        bail!("the turn's end-of-turn marker {end_of_turn:?} does not follow the reply");
    }
    Ok((pre, full.len() - post + end_of_turn.len()))
}

/// Renders and tokenizes one conversation with its loss targets.
pub fn tokenize(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
) -> Result<Example> {
    let (text, spans) = assistant_spans(template, messages)?;
    let enc = tokenizer
        .inner()
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    let tokens = enc.get_ids().to_vec();
    let learn: Vec<bool> = enc
        .get_offsets()
        .iter()
        .map(|&(s, e)| e > s && spans.iter().any(|&(a, b)| s >= a && e <= b))
        .collect();
    let mut targets = vec![IGNORE; tokens.len()];
    for j in 1..tokens.len() {
        if learn[j] {
            targets[j - 1] = tokens[j] as i64;
        }
    }
    Ok(Example { tokens, targets })
}

/// Rows ready for the model: tokens, positions, segment ids and flat targets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub tokens: Vec<Vec<u32>>,
    pub positions: Vec<Vec<u32>>,
    pub segments: Vec<Vec<u32>>,
    pub targets: Vec<i64>,
}

impl Batch {
    /// The model's view of these rows.
    pub fn rows(&self) -> crate::train::model::Rows<'_> {
        crate::train::model::Rows {
            tokens: &self.tokens,
            positions: &self.positions,
            segments: &self.segments,
        }
    }

    pub fn counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }
}

/// Greedy packing in order: conversations are appended to the current row while they fit in
/// `len` tokens; the rest of a row is padding (token `pad`, its own segment, no loss). Each
/// returned row is one [`Batch`] row; a conversation longer than `len` is an error (filter
/// first).
pub fn pack(examples: &[Example], len: usize, pad: u32) -> Result<Vec<Batch>> {
    let mut rows: Vec<Batch> = Vec::new();
    let mut cur = Batch::default();
    let mut used = 0usize;
    let mut seg = 0u32;
    let flush = |cur: &mut Batch, used: &mut usize, rows: &mut Vec<Batch>, seg: &mut u32| {
        if *used == 0 {
            return;
        }
        let fill = len - *used;
        let t = &mut cur.tokens[0];
        t.extend(std::iter::repeat_n(pad, fill));
        cur.positions[0].extend(0..fill as u32);
        cur.segments[0].extend(std::iter::repeat_n(u32::MAX, fill));
        cur.targets.extend(std::iter::repeat_n(IGNORE, fill));
        rows.push(std::mem::take(cur));
        *used = 0;
        *seg = 0;
    };
    for (i, e) in examples.iter().enumerate() {
        let n = e.tokens.len();
        if n > len {
            bail!(
                "conversation {} has {n} tokens, more than the row length {len}",
                i + 1
            );
        }
        if used + n > len {
            flush(&mut cur, &mut used, &mut rows, &mut seg);
        }
        if used == 0 {
            cur.tokens.push(Vec::with_capacity(len));
            cur.positions.push(Vec::with_capacity(len));
            cur.segments.push(Vec::with_capacity(len));
        }
        cur.tokens[0].extend(&e.tokens);
        cur.positions[0].extend(0..n as u32);
        cur.segments[0].extend(std::iter::repeat_n(seg, n));
        cur.targets.extend(&e.targets);
        used += n;
        seg += 1;
    }
    flush(&mut cur, &mut used, &mut rows, &mut seg);
    Ok(rows)
}

/// One conversation per row, padded to the longest of `examples` (pads: own segment, no loss).
pub fn pad_batch(examples: &[Example], pad: u32) -> Batch {
    let len = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
    let mut b = Batch::default();
    for e in examples {
        let fill = len - e.tokens.len();
        let mut t = e.tokens.clone();
        t.extend(std::iter::repeat_n(pad, fill));
        b.tokens.push(t);
        b.positions.push((0..len as u32).collect());
        let mut s = vec![0u32; e.tokens.len()];
        s.extend(std::iter::repeat_n(u32::MAX, fill));
        b.segments.push(s);
        b.targets.extend(&e.targets);
        b.targets.extend(std::iter::repeat_n(IGNORE, fill));
    }
    b
}
