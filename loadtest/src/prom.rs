//! Scraping the target's Prometheus `/metrics` text and turning the
//! difference between two scrapes into server-side figures: generation
//! tokens/s, joules per generated token by energy source, and the server's
//! own mean time to first token. The parser sums a metric over all its label
//! sets (for example several `model_name` values) unless a label filter is
//! given, and skips lines it cannot read instead of failing.

use serde::Serialize;
use std::collections::BTreeMap;

/// One sample line: `name{labels} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name, including suffixes such as `_total` or `_sum`.
    pub name: String,
    /// Label pairs in the order written.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// All sample lines that parsed.
    pub samples: Vec<Sample>,
    /// Non-comment lines that did not parse.
    pub bad_lines: usize,
}

/// Generation-token counters tried in order (Cardinal first, then peers so a
/// comparison run against them still shows a server figure).
pub const GENERATION_COUNTERS: &[&str] = &[
    "cardinal_generation_tokens_total",
    "vllm:generation_tokens_total",
    "llamacpp:tokens_predicted_total",
];
/// TTFT histograms tried in order (their `_sum` and `_count` series are used).
pub const TTFT_HISTOGRAMS: &[&str] = &[
    "cardinal_time_to_first_token_seconds",
    "vllm:time_to_first_token_seconds",
];
/// Prefix-cache counters (hits, queries; in prompt tokens) tried in order.
pub const PREFIX_CACHE_COUNTERS: &[(&str, &str)] = &[
    (
        "cardinal_prefix_cache_hits_total",
        "cardinal_prefix_cache_queries_total",
    ),
    (
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
    ),
];
/// Cardinal's energy counter, labelled by `source`.
pub const ENERGY_COUNTER: &str = "cardinal_energy_joules_total";

fn parse_quoted(s: &str) -> Option<(String, &str)> {
    let mut chars = s.char_indices();
    if chars.next()?.1 != '"' {
        return None;
    }
    let mut out = String::new();
    let mut escaped = false;
    for (i, c) in chars {
        if escaped {
            out.push(match c {
                'n' => '\n',
                other => other,
            });
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            return Some((out, &s[i + 1..]));
        } else {
            out.push(c);
        }
    }
    None
}

/// Parses `{a="x",b="y"}` (the leading `{` already consumed). A bare quoted
/// string inside the braces is a UTF-8 metric name (Prometheus 3 syntax).
/// A parsed label block: the quoted metric name if any, the pairs, and the
/// text after the closing brace.
type LabelBlock<'a> = (Option<String>, Vec<(String, String)>, &'a str);

fn parse_labels(mut s: &str) -> Option<LabelBlock<'_>> {
    let mut labels = Vec::new();
    let mut name = None;
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Some((name, labels, rest));
        }
        if s.starts_with('"') {
            let (quoted, rest) = parse_quoted(s)?;
            let rest = rest.trim_start();
            if let Some(rest) = rest.strip_prefix('=') {
                let (value, rest) = parse_quoted(rest.trim_start())?;
                labels.push((quoted, value));
                s = rest;
            } else {
                name = Some(quoted);
                s = rest;
            }
        } else {
            let eq = s.find('=')?;
            let key = s[..eq].trim().to_string();
            if key.is_empty() {
                return None;
            }
            let (value, rest) = parse_quoted(s[eq + 1..].trim_start())?;
            labels.push((key, value));
            s = rest;
        }
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return None;
        }
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Parses one non-comment line.
pub fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let mut name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (quoted_name, l, after) = parse_labels(inner)?;
        if let Some(q) = quoted_name {
            if !name.is_empty() {
                return None;
            }
            name = q;
        }
        labels = l;
        rest = after;
    }
    if name.is_empty() {
        return None;
    }
    let mut fields = rest.split_whitespace();
    let value = parse_value(fields.next()?)?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Parses a whole text exposition.
pub fn parse(text: &str) -> Scrape {
    let mut scrape = Scrape::default();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        match parse_line(t) {
            Some(s) => scrape.samples.push(s),
            None => scrape.bad_lines += 1,
        }
    }
    scrape
}

impl Scrape {
    /// The sum of `name` over every label set that has all of `filter`'s
    /// pairs; `None` when no such series exists.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for s in self.samples.iter().filter(|s| s.name == name) {
            let matches = filter
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v));
            if matches {
                found = true;
                total += s.value;
            }
        }
        found.then_some(total)
    }

    /// The distinct values of `label` on series named `name`.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.iter().find(|(k, _)| k == label))
            .map(|(_, v)| v.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Server-side figures for one level, from the scrapes before and after it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerSide {
    /// Δ generation tokens / wall time between the scrapes.
    pub generation_tok_s: Option<f64>,
    /// Δ generation tokens.
    pub generation_tokens: Option<f64>,
    /// Which counter the token figures came from.
    pub generation_metric: Option<String>,
    /// Joules per generated token for `source="cards_modeled"`.
    pub joules_per_token_cards: Option<f64>,
    /// Joules per generated token for `source="host"`.
    pub joules_per_token_host: Option<f64>,
    /// Joules per generated token for every energy source seen.
    pub joules_per_token_by_source: BTreeMap<String, f64>,
    /// Δ `_sum` / Δ `_count` of the server's TTFT histogram, in ms.
    pub ttft_mean_ms: Option<f64>,
    /// Which histogram the TTFT came from.
    pub ttft_metric: Option<String>,
    /// Δ prefix-cache hits / Δ queries: the fraction of prompt tokens the
    /// server's prefix cache supplied.
    pub prefix_cache_hit_rate: Option<f64>,
    /// Which hits counter the rate came from.
    pub prefix_cache_metric: Option<String>,
    /// Seconds between the two scrapes.
    pub scrape_interval_s: Option<f64>,
    /// Why figures are missing, when they are.
    pub notes: Vec<String>,
}

fn delta(before: &Scrape, after: &Scrape, name: &str, filter: &[(&str, &str)]) -> Option<f64> {
    let d = after.sum(name, filter)? - before.sum(name, filter)?;
    (d >= 0.0).then_some(d)
}

/// Computes the server-side figures. `interval_s` is the wall time between
/// the two scrapes.
pub fn server_side(before: Option<&Scrape>, after: Option<&Scrape>, interval_s: f64) -> ServerSide {
    let mut out = ServerSide::default();
    let (Some(b), Some(a)) = (before, after) else {
        out.notes
            .push("metrics endpoint not available before and after the level".into());
        return out;
    };
    out.scrape_interval_s = Some(interval_s);
    for name in GENERATION_COUNTERS {
        if let Some(d) = delta(b, a, name, &[]) {
            out.generation_tokens = Some(d);
            out.generation_metric = Some((*name).to_string());
            if interval_s > 0.0 {
                out.generation_tok_s = Some(d / interval_s);
            }
            break;
        }
    }
    if out.generation_metric.is_none() {
        out.notes
            .push("no generation-token counter found (or it went backwards)".into());
    }
    let gen_tokens = out.generation_tokens.filter(|&t| t > 0.0);
    let sources = a.label_values(ENERGY_COUNTER, "source");
    if sources.is_empty() {
        out.notes.push(format!("no {ENERGY_COUNTER} series"));
    }
    if let Some(tokens) = gen_tokens {
        for source in sources {
            if let Some(j) = delta(b, a, ENERGY_COUNTER, &[("source", &source)]) {
                out.joules_per_token_by_source.insert(source, j / tokens);
            }
        }
    }
    out.joules_per_token_cards = out.joules_per_token_by_source.get("cards_modeled").copied();
    out.joules_per_token_host = out.joules_per_token_by_source.get("host").copied();
    for base in TTFT_HISTOGRAMS {
        let sum = delta(b, a, &format!("{base}_sum"), &[]);
        let count = delta(b, a, &format!("{base}_count"), &[]);
        if let (Some(s), Some(c)) = (sum, count) {
            if c > 0.0 {
                out.ttft_mean_ms = Some(s / c * 1000.0);
            }
            out.ttft_metric = Some((*base).to_string());
            break;
        }
    }
    for (hits, queries) in PREFIX_CACHE_COUNTERS {
        if let (Some(h), Some(q)) = (delta(b, a, hits, &[]), delta(b, a, queries, &[])) {
            out.prefix_cache_hit_rate = (q > 0.0).then_some(h / q);
            out.prefix_cache_metric = Some((*hits).to_string());
            break;
        }
    }
    if out.prefix_cache_metric.is_none() {
        out.notes
            .push("no prefix-cache counters found (the server may have no prefix cache)".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP cardinal_generation_tokens_total Generated tokens.
# TYPE cardinal_generation_tokens_total counter
cardinal_generation_tokens_total{model_name="a"} 100
cardinal_generation_tokens_total{model_name="b",engine="0"} 50 1712345678000
cardinal_energy_joules_total{source="cards_modeled",model_name="a"} 12.5
cardinal_energy_joules_total{model_name="a",source="host"} 1.5e2
cardinal_time_to_first_token_seconds_bucket{le="+Inf",model_name="a"} 4
cardinal_time_to_first_token_seconds_sum{model_name="a"} 0.4
cardinal_time_to_first_token_seconds_count{model_name="a"} 4
weird{path="a \"quoted\", {brace}"} 3
{"my.utf8.metric", x="1"} 7
vllm:num_requests_running 2
broken{a="x" 5
nolabel NaN
"#;

    #[test]
    fn parses_text_format() {
        let s = parse(TEXT);
        assert_eq!(s.bad_lines, 1);
        assert_eq!(s.sum("cardinal_generation_tokens_total", &[]), Some(150.0));
        assert_eq!(
            s.sum("cardinal_generation_tokens_total", &[("model_name", "b")]),
            Some(50.0)
        );
        assert_eq!(
            s.sum("cardinal_energy_joules_total", &[("source", "host")]),
            Some(150.0)
        );
        assert_eq!(
            s.sum("weird", &[("path", "a \"quoted\", {brace}")]),
            Some(3.0)
        );
        assert_eq!(s.sum("my.utf8.metric", &[]), Some(7.0));
        assert_eq!(s.sum("vllm:num_requests_running", &[]), Some(2.0));
        assert!(s.sum("nolabel", &[]).unwrap().is_nan());
        assert_eq!(s.sum("absent", &[]), None);
        assert_eq!(
            s.label_values("cardinal_energy_joules_total", "source"),
            vec!["cards_modeled".to_string(), "host".to_string()]
        );
        let bucket = parse_line(r#"x_bucket{le="+Inf"} +Inf"#).unwrap();
        assert_eq!(bucket.value, f64::INFINITY);
    }

    #[test]
    fn server_side_deltas() {
        let before = parse(TEXT);
        let after = parse(
            r#"cardinal_generation_tokens_total{model_name="a"} 300
cardinal_generation_tokens_total{model_name="b",engine="0"} 50
cardinal_energy_joules_total{source="cards_modeled",model_name="a"} 112.5
cardinal_energy_joules_total{model_name="a",source="host"} 550
cardinal_time_to_first_token_seconds_sum{model_name="a"} 1.4
cardinal_time_to_first_token_seconds_count{model_name="a"} 14
"#,
        );
        let s = server_side(Some(&before), Some(&after), 4.0);
        assert_eq!(s.generation_tokens, Some(200.0));
        assert_eq!(s.generation_tok_s, Some(50.0));
        assert_eq!(s.joules_per_token_cards, Some(0.5));
        assert_eq!(s.joules_per_token_host, Some(2.0));
        assert!((s.ttft_mean_ms.unwrap() - 100.0).abs() < 1e-9);
        let none = server_side(None, Some(&after), 4.0);
        assert!(none.generation_tok_s.is_none() && !none.notes.is_empty());
        let plain = parse("llamacpp:tokens_predicted_total 10\n");
        let plain2 = parse("llamacpp:tokens_predicted_total 30\n");
        let s = server_side(Some(&plain), Some(&plain2), 2.0);
        assert_eq!(s.generation_tok_s, Some(10.0));
        assert!(s.joules_per_token_cards.is_none());
        assert!(s.prefix_cache_hit_rate.is_none());
    }

    #[test]
    fn prefix_cache_hit_rate_from_either_server() {
        for (hits, queries) in PREFIX_CACHE_COUNTERS {
            let before = parse(&format!("{hits} 100\n{queries} 400\n"));
            let after = parse(&format!("{hits} 400\n{queries} 1000\n"));
            let s = server_side(Some(&before), Some(&after), 1.0);
            assert_eq!(s.prefix_cache_hit_rate, Some(0.5), "{hits}");
        }
    }
}
