//! Chat templates: this module owns turning a conversation into the prompt
//! text a model was trained on. It compiles a model's Hugging Face Jinja
//! template once with minijinja, configured like `apply_chat_template`
//! (`trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`,
//! `strftime_now`, and a `tojson` that matches Python's `json.dumps`), and
//! renders it in a sandbox, so a hostile template fails fast instead of
//! hanging or eating memory: minijinja's fuel budget (CPU), a recursion
//! limit and an output cap, and around them a render thread per render with
//! a memory budget enforced by the global allocator and a wall-clock
//! timeout ([`crate::sandbox`]), which also catch what minijinja does not
//! charge fuel for (materialising `list + list`, say). A template that
//! breaks the budget or the timeout is disabled for the life of the process
//! ([`ModelError::TemplateStopped`]). Models without a template get ChatML
//! ([`ChatTemplate::chatml`]). It also finds the template source of a
//! Hugging Face directory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind};

use crate::error::{ModelError, Result};
use crate::sandbox::{Limits, Sandbox};

/// Largest template source accepted, in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;
/// Largest rendered prompt, in bytes.
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;
/// minijinja fuel per render: about one unit per instruction, plus one per 64
/// bytes of data produced. SmolLM2's template uses about 1000 for a short chat.
pub const FUEL_PER_RENDER: u64 = 2_000_000;
/// Maximum template recursion depth (a macro call counts for several levels).
pub const RECURSION_LIMIT: usize = 200;
/// Net bytes one render may allocate (input conversion, intermediate values
/// and output). Messages are refused above [`MAX_OUTPUT_BYTES`] before
/// rendering, and real templates rendering 1 MiB of them peak at about
/// 5 MiB (`server/tests/fuzz_text.rs` prints and checks it), so this leaves
/// ample room while keeping what a stopped render holds small.
pub const RENDER_MEMORY_BYTES: usize = 64 << 20;
/// Wall-clock time one render may take. SmolLM2's template renders a short
/// chat in well under a millisecond, a 1 MiB one in tens of milliseconds.
pub const RENDER_TIMEOUT: Duration = Duration::from_secs(2);
/// The sandbox limits of [`ChatTemplate::new`].
pub const RENDER_LIMITS: Limits = Limits {
    memory_bytes: RENDER_MEMORY_BYTES,
    timeout: RENDER_TIMEOUT,
};

const TEMPLATE_NAME: &str = "chat_template";
const RAISE_MARKER: &str = "raise_exception: ";

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template. Cheap to clone.
#[derive(Clone)]
pub struct ChatTemplate {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    /// Shared by clones, so a template disabled by its sandbox is disabled
    /// everywhere.
    Jinja(Arc<Jinja>),
    ChatMl,
}

struct Jinja {
    env: Environment<'static>,
    bos: String,
    eos: String,
    sandbox: Sandbox,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Jinja(j) => {
                let len = j
                    .env
                    .get_template(TEMPLATE_NAME)
                    .map(|t| t.source().len())
                    .unwrap_or(0);
                write!(
                    f,
                    "ChatTemplate(jinja, {len} bytes, bos={:?}, eos={:?}, {:?})",
                    j.bos,
                    j.eos,
                    j.sandbox.limits()
                )?;
                match j.sandbox.poisoned() {
                    Some(why) => write!(f, " disabled: {why}"),
                    None => Ok(()),
                }
            }
            Kind::ChatMl => write!(f, "ChatTemplate(chatml)"),
        }
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the strings the
    /// template sees as `bos_token` and `eos_token`. Renders run within
    /// [`RENDER_LIMITS`].
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        Self::with_limits(source, bos_token, eos_token, RENDER_LIMITS)
    }

    /// [`ChatTemplate::new`] with other sandbox limits (tests use small ones).
    pub fn with_limits(
        source: &str,
        bos_token: &str,
        eos_token: &str,
        limits: Limits,
    ) -> Result<Self> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(ModelError::Template(format!(
                "the template source is {} bytes, over the limit of {MAX_TEMPLATE_BYTES}",
                source.len()
            )));
        }
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ModelError::Template(format!("syntax configuration: {e}")))?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(FUEL_PER_RENDER));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ModelError::Template(format!("cannot compile: {}", describe(&e))))?;
        warm_up(&env);
        Ok(ChatTemplate {
            kind: Kind::Jinja(Arc::new(Jinja {
                env,
                bos: bos_token.to_string(),
                eos: eos_token.to_string(),
                sandbox: Sandbox::new(limits),
            })),
        })
    }

    /// The fallback for models without a template: ChatML
    /// (`<|im_start|>{role}\n{content}<|im_end|>\n` per message, then
    /// `<|im_start|>assistant\n` when a generation prompt is asked for).
    pub fn chatml() -> Self {
        ChatTemplate { kind: Kind::ChatMl }
    }

    /// Renders `messages`; `add_generation_prompt` appends the header of the
    /// assistant's turn. A Jinja template renders on its own thread within
    /// its sandbox limits, so this blocks for at most the timeout (plus the
    /// wait for another render of the same template: they run one at a
    /// time). Errors are [`ModelError::Template`] for what the template or
    /// the messages got wrong, [`ModelError::TemplateStopped`] when the
    /// sandbox stopped the render or the template is disabled.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        match &self.kind {
            Kind::ChatMl => render_chatml(messages, add_generation_prompt),
            Kind::Jinja(j) => {
                // Messages the prompt could not hold are refused before
                // they reach the template (and its memory budget).
                let size: usize = messages
                    .iter()
                    .map(|m| m.role.len() + m.content.len())
                    .sum();
                if size > MAX_OUTPUT_BYTES {
                    return Err(ModelError::Template(format!(
                        "the messages hold {size} bytes of text, more than the rendered prompt's limit of {MAX_OUTPUT_BYTES} bytes"
                    )));
                }
                let job = j.clone();
                let messages = messages.to_vec();
                j.sandbox
                    .run(move || job.render(&messages, add_generation_prompt))?
            }
        }
    }

    /// The most net bytes one finished render of this template allocated
    /// (0 for ChatML, which renders without the sandbox).
    pub fn peak_render_bytes(&self) -> usize {
        match &self.kind {
            Kind::Jinja(j) => j.sandbox.peak_bytes(),
            Kind::ChatMl => 0,
        }
    }

    /// Why this template is disabled (see [`ChatTemplate::render`]), if it is.
    pub fn disabled(&self) -> Option<&str> {
        match &self.kind {
            Kind::Jinja(j) => j.sandbox.poisoned(),
            Kind::ChatMl => None,
        }
    }
}

impl Jinja {
    /// The render itself, run on the sandbox's thread.
    fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ModelError::Template(describe(&e)))?;
        let ctx = minijinja::context! {
            messages => minijinja::value::Serde(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        };
        let mut out = CappedWriter {
            buf: Vec::new(),
            overflow: false,
        };
        match tmpl.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.buf)
                .map_err(|e| ModelError::Template(format!("the output is not UTF-8: {e}"))),
            Err(_) if out.overflow => Err(ModelError::Template(format!(
                "the rendered prompt exceeds the limit of {MAX_OUTPUT_BYTES} bytes"
            ))),
            Err(e) => Err(render_error(&e)),
        }
    }
}

/// Runs minijinja's one-time global initialisations (number formatting
/// cache, filter and test tables) once per process, here on the compiling
/// thread: a render stopped by its memory budget in the middle of one would
/// leave it pending forever and block every other template's renders.
fn warm_up(env: &Environment<'static>) {
    static WARM: std::sync::Once = std::sync::Once::new();
    WARM.call_once(|| {
        let _ = env.render_str(
            "{% for m in [1, 2.5, 'x', {'a': 1}] %}{{ m }}{{ m | tojson }}{{ loop.index }}{% endfor %}\
             {{ (['b', 'a'] | sort | join(',')) ~ ('x' | trim | upper) ~ (3 | string) }}",
            (),
        );
    });
}

/// The chat template source of a Hugging Face directory: `chat_template` of
/// its parsed `tokenizer_config.json` (a string, or a list of
/// `{name, template}` from which `default` is taken, else the first), else the
/// file `chat_template.jinja`, else `chat_template` in `chat_template.json`.
pub fn hf_template_source(
    dir: &Path,
    config: Option<&serde_json::Value>,
) -> Result<Option<String>> {
    match config.and_then(|c| c.get("chat_template")) {
        Some(serde_json::Value::String(s)) => return Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => {
            let template = |e: &serde_json::Value| e.get("template")?.as_str().map(str::to_string);
            let default = list
                .iter()
                .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"));
            if let Some(t) = default
                .and_then(template)
                .or_else(|| list.iter().find_map(template))
            {
                return Ok(Some(t));
            }
        }
        _ => {}
    }
    let read = |name: &str| match std::fs::read_to_string(dir.join(name)) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModelError::Io {
            path: dir.join(name),
            source,
        }),
    };
    if let Some(s) = read("chat_template.jinja")? {
        return Ok(Some(s));
    }
    let Some(text) = read("chat_template.json")? else {
        return Ok(None);
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        ModelError::file(
            dir.join("chat_template.json"),
            format!("not valid JSON: {e}"),
        )
    })?;
    Ok(json
        .get("chat_template")
        .and_then(|t| t.as_str())
        .map(str::to_string))
}

fn render_chatml(messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        out.push_str(&m.content);
        out.push_str("<|im_end|>\n");
        if out.len() > MAX_OUTPUT_BYTES {
            return Err(ModelError::Template(format!(
                "the rendered prompt exceeds the limit of {MAX_OUTPUT_BYTES} bytes"
            )));
        }
    }
    if add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
    }
    Ok(out)
}

/// An output sink that refuses to grow past [`MAX_OUTPUT_BYTES`].
struct CappedWriter {
    buf: Vec<u8>,
    overflow: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > MAX_OUTPUT_BYTES {
            self.overflow = true;
            return Err(std::io::Error::other("output limit reached"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A one-line description of a minijinja error with its line number.
fn describe(e: &Error) -> String {
    let what = e
        .detail()
        .map(str::to_string)
        .unwrap_or_else(|| e.kind().to_string());
    match e.line() {
        Some(line) => format!("{what} (line {line})"),
        None => what,
    }
}

fn render_error(e: &Error) -> ModelError {
    // Errors raised inside calls can be wrapped; look through the chain.
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(me) = err.downcast_ref::<Error>()
            && let Some(msg) = me.detail().and_then(|d| d.strip_prefix(RAISE_MARKER))
        {
            return ModelError::Template(format!("the template raised an exception: {msg}"));
        }
        cur = err.source();
    }
    let msg = match e.kind() {
        ErrorKind::OutOfFuel => format!(
            "rendering used up its budget of {FUEL_PER_RENDER} fuel units (the template does too much work)"
        ),
        _ if e.detail().is_some_and(|d| d.contains("recursion")) => format!(
            "rendering exceeded the recursion limit of {RECURSION_LIMIT}: {}",
            describe(e)
        ),
        _ => format!("cannot render: {}", describe(e)),
    };
    ModelError::Template(msg)
}

/// `raise_exception(msg)`: aborts rendering with `msg` (as HF templates use it).
fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISE_MARKER}{msg}"),
    ))
}

/// `strftime_now(format)`: the current UTC time, formatted like Python's
/// `strftime` for `%Y %y %m %d %e %H %I %M %S %p %j %B %b %A %a %Z %z %%`
/// (other directives are copied through).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
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

/// Formats Unix time `secs` (UTC).
fn strftime(format: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let (y, mo, d) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let month = MONTHS[(mo - 1) as usize];
    let day = DAYS[weekday];
    let h12 = if h % 12 == 0 { 12 } else { h % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{mo:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{h12:02}")),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(day),
            Some('a') => out.push_str(&day[..3]),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Options of Python's `json.dumps` as HF's `tojson` passes them.
struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// `tojson(indent=None, ensure_ascii=False, separators=None, sort_keys=False)`,
/// byte-compatible with Python's `json.dumps` (no HTML escaping).
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let bad = |what: &str| Error::new(ErrorKind::InvalidOperation, format!("tojson: {what}"));
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) if (0..=64).contains(&n) => Some(" ".repeat(n as usize)),
            (Some(n), _) if n < 0 => Some(String::new()),
            (_, Some(s)) => Some(s.to_string()),
            _ => return Err(bad("indent must be an integer from 0 to 64 or a string")),
        },
    };
    let (mut item_sep, mut key_sep) = match indent {
        Some(_) => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    if let Some(seps) = kwargs.get::<Option<Value>>("separators")?
        && !seps.is_none()
        && !seps.is_undefined()
    {
        let parts: Vec<Value> = seps.try_iter()?.collect();
        match parts.as_slice() {
            [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                item_sep = a.as_str().unwrap_or_default().to_string();
                key_sep = b.as_str().unwrap_or_default().to_string();
            }
            _ => return Err(bad("separators must be two strings")),
        }
    }
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let json = if value.kind() == ValueKind::Undefined {
        serde_json::Value::Null
    } else {
        serde_json::to_value(value).map_err(|e| bad(&format!("cannot serialize the value: {e}")))?
    };
    let mut out = String::new();
    write_json(&json, &style, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_json(v: &serde_json::Value, st: &JsonStyle, level: usize, out: &mut String) {
    use serde_json::Value as J;
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&py_float(f)),
            _ => out.push_str(&n.to_string()),
        },
        J::String(s) => write_json_str(s, st.ensure_ascii, out),
        J::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&st.item_sep);
                }
                newline_indent(st, level + 1, out);
                write_json(item, st, level + 1, out);
            }
            newline_indent(st, level, out);
            out.push(']');
        }
        J::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            if st.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, val)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&st.item_sep);
                }
                newline_indent(st, level + 1, out);
                write_json_str(k, st.ensure_ascii, out);
                out.push_str(&st.key_sep);
                write_json(val, st, level + 1, out);
            }
            newline_indent(st, level, out);
            out.push('}');
        }
    }
}

fn newline_indent(st: &JsonStyle, level: usize, out: &mut String) {
    if let Some(ind) = &st.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

/// A JSON string literal as Python's `json.dumps` writes it.
fn write_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
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
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as Python's `repr` writes it: shortest round-trip digits, fixed
/// notation for exponents -4..16, else `1e+16` style.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= n {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
        } else {
            let (a, b) = digits.split_at((exp + 1) as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1.min(digits.len()));
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123.456, "123.456"),
            (0.0, "0.0"),
            (1e100, "1e+100"),
        ] {
            assert_eq!(py_float(f), want, "{f}");
        }
    }

    #[test]
    fn dates() {
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %b %j", 0),
            "1970-01-01 00:00:00 Thu Jan 001"
        );
        assert_eq!(
            strftime("%d %B %Y %I%p %A", 1_709_251_199),
            "29 February 2024 11PM Thursday"
        );
        assert_eq!(days_from_civil(2024, 3, 1), 19_783);
    }

    #[test]
    fn json_strings() {
        let mut s = String::new();
        write_json_str("it's <b>\n\u{1}é😀", false, &mut s);
        assert_eq!(s, "\"it's <b>\\n\\u0001é😀\"");
        s.clear();
        write_json_str("é😀", true, &mut s);
        assert_eq!(s, "\"\\u00e9\\ud83d\\ude00\"");
    }
}
