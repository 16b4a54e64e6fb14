//! Turns the first bytes of a request and of a response, as the probes copied them, into a
//! method, a normalised path and a status code, keeping the set of (method, path) labels bounded.
//!
//! It must never fail on odd bytes: anything unparseable becomes `OTHER` / `/?` / 0.

use std::sync::Arc;

/// The label maps are looked up once per request record, with short keys (a request line is at
/// most `HEAD_LEN` bytes), where std's SipHash took 9 % of the records agent's time in a
/// profile. foldhash, seeded per process, replaces it; `MAX_LINES` bounds what lines made to
/// collide could cost.
use foldhash::HashMap;

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
];

/// Method and raw path of a request line; the path is marked with a trailing `…` when the copied
/// head ended inside it.
pub(crate) fn parse_request_head(head: &[u8]) -> (&'static str, String) {
    let line = &head[..request_line_end(head)];
    let mut parts = line.splitn(3, |&b| b == b' ');
    let method = parts.next().unwrap_or(b"");
    let method = METHODS
        .iter()
        .find(|m| m.as_bytes() == method)
        .copied()
        .unwrap_or("OTHER");
    let Some(target) = parts.next() else {
        return (method, "/?".into());
    };
    let complete = parts.next().is_some();
    let target = String::from_utf8_lossy(target);
    let path = target.split(['?', '#']).next().unwrap_or("");
    let mut p = normalise_path(path);
    if !complete && !target.contains('?') && p != "/?" {
        p.push('…');
    }
    (method, p)
}

/// Where a head's request line ends: all `parse_request_head` reads of it.
fn request_line_end(head: &[u8]) -> usize {
    head.iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(head.len())
}

/// Collapses identifiers so that `/posts/123/` and `/posts/456/` are one label.
pub(crate) fn normalise_path(path: &str) -> String {
    if !path.starts_with('/') {
        return "/?".into();
    }
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(normalise_segment(seg));
        if out.len() > 96 {
            out.truncate(96);
            out.push('…');
            break;
        }
    }
    out
}

fn normalise_segment(seg: &str) -> &str {
    if seg.is_empty() {
        return seg;
    }
    if seg.bytes().all(|b| b.is_ascii_digit()) {
        return ":n";
    }
    let hex_or_dash = seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if hex_or_dash && seg.len() == 36 && seg.bytes().filter(|&b| b == b'-').count() == 4 {
        return ":uuid";
    }
    if hex_or_dash && seg.len() >= 16 {
        return ":hex";
    }
    seg
}

/// Status code of a response's first bytes (`HTTP/1.1 200 OK`), 0 when not a status line: the
/// programs' own reading (`agent_common::status_code`), so both modes name statuses alike.
pub(crate) fn parse_status(head: &[u8]) -> u16 {
    let mut line = [0u8; agent_common::STATUS_LEN];
    let n = head.len().min(line.len());
    line[..n].copy_from_slice(&head[..n]);
    agent_common::status_code(&line, n)
}

/// Interns (method, path) labels up to a bound; past it everything new is `OTHER /other`, so a
/// scanner hitting random URLs cannot blow up the label set of the metrics.
pub struct LabelSet {
    max: usize,
    /// Label ids by method, then path: a known label is found without allocating.
    ids: HashMap<&'static str, HashMap<String, usize>>,
    labels: Vec<(&'static str, String)>,
    /// Request lines seen (the bytes `parse_request_head` reads) and what they parse to: a
    /// server's requests repeat a few lines, so most records skip the parse.
    lines: HashMap<Box<[u8]>, Request>,
}

/// What a request line names: its method, normalised path and label id.
pub(crate) type Request = (&'static str, Arc<str>, usize);

/// Request lines remembered by [`LabelSet::request`]; past it the memory starts over (the
/// labels stay).
const MAX_LINES: usize = 4096;

impl LabelSet {
    pub fn new(max: usize) -> Self {
        let mut s = LabelSet {
            max: max.max(1),
            ids: HashMap::default(),
            labels: Vec::new(),
            lines: HashMap::default(),
        };
        s.labels.push(("OTHER", "/other".into()));
        s.ids.entry("OTHER").or_default().insert("/other".into(), 0);
        s
    }

    pub(crate) fn intern(&mut self, method: &'static str, path: &str) -> usize {
        if let Some(&id) = self.ids.get(method).and_then(|m| m.get(path)) {
            return id;
        }
        if self.labels.len() > self.max {
            return 0;
        }
        let id = self.labels.len();
        self.labels.push((method, path.to_owned()));
        self.ids
            .entry(method)
            .or_default()
            .insert(path.to_owned(), id);
        id
    }

    /// Method, path and label of a request head: `parse_request_head`, then `intern`,
    /// remembered by request line. The path is shared with the memory, so a known line costs
    /// no allocation.
    pub(crate) fn request(&mut self, head: &[u8]) -> Request {
        let line = &head[..request_line_end(head)];
        if let Some((m, p, l)) = self.lines.get(line) {
            return (m, p.clone(), *l);
        }
        let (m, p) = parse_request_head(line);
        let l = self.intern(m, &p);
        let p: Arc<str> = p.into();
        if self.lines.len() >= MAX_LINES {
            self.lines.clear();
        }
        self.lines.insert(line.into(), (m, p.clone(), l));
        (m, p, l)
    }

    pub fn get(&self, id: usize) -> (&'static str, &str) {
        let (m, p) = &self.labels[id];
        (m, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_head(b"GET /posts/io_read/ HTTP/1.1\r\nHost: x\r\n"),
            ("GET", "/posts/io_read/".into())
        );
        assert_eq!(
            parse_request_head(b"POST /posts/io_create/?a=1 HTTP/1.1\r\n"),
            ("POST", "/posts/io_create/".into())
        );
        assert_eq!(
            parse_request_head(b"GET /items/12345/x HTTP/1.0\r\n"),
            ("GET", "/items/:n/x".into())
        );
        assert_eq!(
            parse_request_head(b"GET /p/0b7e3a52-3f0e-4c5e-9d0a-1c2b3d4e5f60 HTTP/1.1"),
            ("GET", "/p/:uuid".into())
        );
        assert_eq!(
            parse_request_head(b"BREW /pot HTTP/1.1\r\n"),
            ("OTHER", "/pot".into())
        );
        // The copied head ended inside the path.
        assert_eq!(
            parse_request_head(b"GET /a/very/long/pa"),
            ("GET", "/a/very/long/pa…".into())
        );
        assert_eq!(parse_request_head(b""), ("OTHER", "/?".into()));
        assert_eq!(
            parse_request_head(b"\x16\x03\x01 garbage"),
            ("OTHER", "/?".into())
        );
    }

    /// A head the probes could not copy is labelled like any unparseable one.
    #[test]
    fn no_head_is_other() {
        assert_eq!(parse_request_head(b""), ("OTHER", "/?".into()));
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), 200);
        assert_eq!(parse_status(b"HTTP/1.0 500 Internal"), 500);
        assert_eq!(parse_status(b"HTTP/1.1 20"), 0);
        assert_eq!(parse_status(b"hello world, no"), 0);
    }

    #[test]
    fn label_set_is_bounded() {
        let mut s = LabelSet::new(3);
        let a = s.intern("GET", "/a");
        assert_eq!(s.intern("GET", "/a"), a);
        assert_ne!(s.intern("POST", "/a"), a);
        for i in 0..100 {
            s.intern("GET", &format!("/x{i}"));
        }
        assert!(s.labels.len() <= 4);
        assert_eq!(s.intern("GET", "/brand-new"), 0);
        assert_eq!(s.get(0), ("OTHER", "/other"));
    }

    /// The remembered lines give what parsing and interning each head anew gives (the
    /// reference), in a set small enough to fill, for heads that share, repeat and vary their
    /// request lines, including past `MAX_LINES`.
    #[test]
    fn remembered_request_lines_match_a_fresh_parse() {
        let mut cached = LabelSet::new(8);
        let mut fresh = LabelSet::new(8);
        let heads: Vec<Vec<u8>> = (0..3 * MAX_LINES)
            .map(|i| match i % 5 {
                0 => b"GET /posts/io_read/ HTTP/1.1\r\nHost: a\r\n".to_vec(),
                1 => format!("GET /p/{i}/ HTTP/1.1\r\nHost: b\r\n").into_bytes(),
                2 => format!("POST /q{}?x={i} HTTP/1.1\r\n", i % 20).into_bytes(),
                3 => b"GET /truncated/pa".to_vec(),
                _ => format!("PUT /u{i}").into_bytes(),
            })
            .collect();
        for h in heads.iter().chain(heads.iter().rev()) {
            let (m, p) = parse_request_head(h);
            let l = fresh.intern(m, &p);
            assert_eq!(
                cached.request(h),
                (m, p.into(), l),
                "{}",
                String::from_utf8_lossy(h)
            );
        }
        assert_eq!(cached.labels, fresh.labels);
    }

    proptest! {
        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let (_, p) = parse_request_head(&bytes);
            prop_assert!(p.len() <= 100 + 3);
            let _ = parse_status(&bytes);
        }
    }
}
