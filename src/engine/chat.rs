//! Chat templates: the model's own Jinja template rendered with minijinja, as HF's
//! `apply_chat_template` renders it: its environment (`trim_blocks`, `lstrip_blocks`), its
//! variables (`messages`, `tools`, `add_generation_prompt`, `bos_token`, `eos_token`, extra
//! kwargs such as Qwen3's `enable_thinking`), its globals (`raise_exception`,
//! `strftime_now`), its `tojson` (Python's `json.dumps`: `", "`/`": "` separators, no
//! HTML escaping, `indent`), and Python string methods through minijinja-contrib.

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A rendering and byte spans in it.
pub type Marked = (String, Vec<(usize, usize)>);

/// Marks where a `{% generation %}` block's output starts and ends in a raw rendering
/// (private-use characters; [`ChatTemplate::render_json`] removes them).
const GENERATION_START: char = '\u{F8F0}';
const GENERATION_END: char = '\u{F8F1}';

pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template marks assistant output with `{% generation %}` blocks.
    has_generation: bool,
    pub source: String,
    bos_token: String,
    eos_token: String,
    /// Variables every rendering sees (`engine.chat_template_kwargs`).
    kwargs: serde_json::Map<String, serde_json::Value>,
}

fn raise_exception(msg: String) -> std::result::Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// HF's `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`.
fn tojson(v: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    py_json(
        &v,
        indent,
        0,
        sort_keys.unwrap_or(false),
        ensure_ascii.unwrap_or(false),
        &mut out,
    )?;
    Ok(Value::from_safe_string(out))
}

fn py_json_str(s: &str, ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ascii && (c as u32) > 0x7f) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `json.dumps` layout: `", "` and `": "` inline, or one item per line at `indent`.
fn py_json(
    v: &Value,
    indent: Option<usize>,
    level: usize,
    sort: bool,
    ascii: bool,
    out: &mut String,
) -> std::result::Result<(), Error> {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
        ValueKind::Number => out.push_str(&py_float(f64::try_from(v.clone())?)),
        ValueKind::String => py_json_str(v.as_str().unwrap_or_default(), ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, level + 1);
                py_json(item, indent, level + 1, sort, ascii, out)?;
            }
            newline(out, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if sort {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, level + 1);
                match k.as_str() {
                    Some(s) => py_json_str(s, ascii, out),
                    None => py_json_str(&k.to_string(), ascii, out),
                }
                out.push_str(": ");
                py_json(&v.get_item(k)?, indent, level + 1, sort, ascii, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a {} value", v.kind()),
            ))
        }
    }
    Ok(())
}

/// Python's `repr` of a float, as `json.dumps` writes it (`1.0`, `2.5`, `1e+20`).
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        // Shortest round-trip digits in scientific form, exponent signed and two digits.
        let s = format!("{f:e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let e: i32 = e.parse().unwrap_or(0);
        return format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// HF's `strftime_now(format)`: the current time (UTC) through `strftime`'s common fields.
fn strftime_now(format: String) -> std::result::Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// `strftime` of a Unix time (UTC) for `%d %e %m %b %B %y %Y %a %A %H %M %S %j %%`.
pub fn strftime(format: &str, unix_secs: i64) -> std::result::Result<String, Error> {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = before[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let (month_name, day_name) = (MONTHS[(month - 1) as usize], DAYS[weekday]);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('Y') => out.push_str(&year.to_string()),
            Some('a') => out.push_str(&day_name[..3]),
            Some('A') => out.push_str(day_name),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: unsupported field %{}",
                        other.map(String::from).unwrap_or_default()
                    ),
                ))
            }
        }
    }
    Ok(out)
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // As HF's ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| anyhow!("chat template syntax: {e}"))?,
        );
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        // HF's `{% generation %}…{% endgeneration %}` (the assistant tokens of
        // `return_assistant_tokens_mask`): a filter block that wraps its output in markers,
        // so block whitespace rules apply as to HF's extension tag.
        let generation = regex::Regex::new(r"\{%([-+]?)\s*(end)?generation\s*([-+]?)%\}")
            .expect("a valid regex");
        let has_generation = generation.is_match(source);
        let rewritten = generation.replace_all(source, |c: &regex::Captures| {
            let tag = if c.get(2).is_some() {
                "endfilter"
            } else {
                "filter wildlong_generation"
            };
            format!("{{%{} {tag} {}%}}", &c[1], &c[3])
        });
        env.add_filter("wildlong_generation", |s: String| {
            format!("{GENERATION_START}{s}{GENERATION_END}")
        });
        env.add_template_owned("chat", rewritten.into_owned())
            .map_err(|e| anyhow!("chat template does not parse: {e}"))?;
        Ok(Self {
            env,
            has_generation,
            source: source.to_string(),
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
            kwargs: serde_json::Map::new(),
        })
    }

    /// Variables every rendering sees (`engine.chat_template_kwargs`); a rendering's own
    /// kwargs win over them.
    pub fn with_kwargs(mut self, kwargs: &toml::Table) -> Result<Self> {
        for (k, v) in kwargs {
            if matches!(
                k.as_str(),
                "messages" | "tools" | "add_generation_prompt" | "bos_token" | "eos_token"
            ) {
                bail!("chat_template_kwargs: `{k}` is set by the engine itself");
            }
            let v = serde_json::to_value(v).with_context(|| format!("chat_template_kwargs.{k}"))?;
            self.kwargs.insert(k.clone(), v);
        }
        Ok(self)
    }

    /// The template in a `tokenizer_config.json` (a string, or a list of named templates).
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<String>> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        Ok(match &v["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .or_else(|| list.first())
                .and_then(|t| t["template"].as_str())
                .map(String::from),
            _ => None,
        })
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages = serde_json::to_value(messages)?;
        self.render_json(
            &messages,
            None,
            &serde_json::Map::new(),
            add_generation_prompt,
        )
    }

    /// Renders messages as OpenAI's chat API has them (`tool_calls`, `tool` turns,
    /// `reasoning_content`, …) with `tools` and extra variables, as HF's
    /// `apply_chat_template(messages, tools=tools, add_generation_prompt=…, **kwargs)`.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        kwargs: &serde_json::Map<String, serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let out = self.render_raw(messages, tools, kwargs, add_generation_prompt)?;
        Ok(if self.has_generation {
            out.replace([GENERATION_START, GENERATION_END], "")
        } else {
            out
        })
    }

    /// [`Self::render_json`] with the generation blocks' markers left in.
    fn render_raw(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        kwargs: &serde_json::Map<String, serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        if messages.as_array().is_none_or(Vec::is_empty) {
            bail!("a chat needs at least one message");
        }
        let mut vars = self.kwargs.clone();
        vars.extend(kwargs.clone());
        vars.insert("messages".into(), messages.clone());
        if let Some(t) = tools {
            vars.insert("tools".into(), t.clone());
        }
        vars.insert("add_generation_prompt".into(), add_generation_prompt.into());
        vars.insert("bos_token".into(), self.bos_token.clone().into());
        vars.insert("eos_token".into(), self.eos_token.clone().into());
        let tmpl = self.env.get_template("chat")?;
        tmpl.render(Value::from(minijinja::value::Serde(&vars)))
            .map_err(|e| anyhow!("rendering the chat template: {e}"))
    }

    /// The rendering of a whole conversation and the byte spans of its `{% generation %}`
    /// blocks (HF's `return_assistant_tokens_mask`); `None` when the template has none.
    pub fn render_generation_spans(&self, messages: &[Message]) -> Result<Option<Marked>> {
        if !self.has_generation {
            return Ok(None);
        }
        let raw = self.render_raw(
            &serde_json::to_value(messages)?,
            None,
            &serde_json::Map::new(),
            false,
        )?;
        let mut text = String::with_capacity(raw.len());
        let mut spans = Vec::new();
        let mut open = None;
        for c in raw.chars() {
            match c {
                GENERATION_START if open.is_none() => open = Some(text.len()),
                GENERATION_END => {
                    let start = open
                        .take()
                        .context("the chat template closes a generation block it did not open")?;
                    spans.push((start, text.len()));
                }
                GENERATION_START => bail!("the chat template nests generation blocks"),
                c => text.push(c),
            }
        }
        Ok(Some((text, spans)))
    }
}
