//! An incremental Server-Sent Events parser. Bytes go in as they arrive from
//! the network; complete events come out. It is strict in one way that suits a
//! benchmark: a non-empty line that is neither a comment nor one of the four
//! SSE fields (`data`, `event`, `id`, `retry`) is reported as malformed,
//! instead of being silently ignored as a browser would.

/// The longest line accepted before the stream is declared malformed.
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// Why the byte stream is not valid SSE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseError(pub String);

impl std::fmt::Display for SseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parser state between network reads.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: String,
    has_data: bool,
    event: Option<String>,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the events completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.line_done(&line, &mut out)?;
            } else {
                if self.line.len() >= MAX_LINE_BYTES {
                    return Err(SseError(format!("line longer than {MAX_LINE_BYTES} bytes")));
                }
                self.line.push(b);
            }
        }
        Ok(out)
    }

    /// Called at end of stream. A final event whose blank terminating line
    /// never came is still dispatched (lenient: some servers end the body
    /// right after `data: [DONE]\n`).
    pub fn finish(&mut self) -> Result<Option<SseEvent>, SseError> {
        let mut out = Vec::new();
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, &mut out)?;
        }
        if out.is_empty() && self.has_data {
            out.push(self.take_event());
        }
        Ok(out.pop())
    }

    fn take_event(&mut self) -> SseEvent {
        self.has_data = false;
        SseEvent {
            event: self.event.take(),
            data: std::mem::take(&mut self.data),
        }
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if line.is_empty() {
            if self.has_data {
                out.push(self.take_event());
            } else {
                self.event = None;
            }
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(()); // comment / keep-alive
        }
        let text = std::str::from_utf8(line)
            .map_err(|_| SseError("line is not valid UTF-8".to_string()))?;
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_string()),
            "id" | "retry" => {}
            _ => {
                let shown: String = text.chars().take(80).collect();
                return Err(SseError(format!("not an SSE field line: {shown:?}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: s.to_string(),
        }
    }

    #[test]
    fn events_split_across_reads() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: {\"a\"").unwrap().is_empty());
        assert_eq!(p.push(b":1}\n\nda").unwrap(), vec![data("{\"a\":1}")]);
        assert_eq!(p.push(b"ta: [DONE]\r\n\r\n").unwrap(), vec![data("[DONE]")]);
        assert_eq!(p.finish().unwrap(), None);
    }

    #[test]
    fn comments_multiline_and_event_names() {
        let mut p = SseParser::new();
        let evs = p
            .push(b": keep-alive\n\nevent: error\ndata: x\ndata: y\nid: 3\n\n")
            .unwrap();
        assert_eq!(
            evs,
            vec![SseEvent {
                event: Some("error".into()),
                data: "x\ny".into()
            }]
        );
    }

    #[test]
    fn garbage_line_is_malformed() {
        let mut p = SseParser::new();
        assert!(p.push(b"{\"not\": \"sse\"}\n").is_err());
        let mut p = SseParser::new();
        assert!(p.push(b"data: \xff\xfe\n").is_err());
    }

    #[test]
    fn unterminated_last_event_is_flushed() {
        let mut p = SseParser::new();
        assert!(p.push(b"data: [DONE]").unwrap().is_empty());
        assert_eq!(p.finish().unwrap(), Some(data("[DONE]")));
        let mut p = SseParser::new();
        assert!(p.push(b"data: [DONE]\n").unwrap().is_empty());
        assert_eq!(p.finish().unwrap(), Some(data("[DONE]")));
    }
}
