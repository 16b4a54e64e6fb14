//! Request templates: method, target, headers and a body (raw, form or JSON) with random-field
//! placeholders, checked once and kept as the request's bytes on the wire; each send renders
//! them into the user's buffer (one copy of each literal run, the letters drawn in place)
//! without parsing anything again.
//!
//! `{rand:N}` in a body, form value or header value becomes N random ASCII letters
//! (`[A-Za-z]`, like Python's `random.choices(string.ascii_letters, k=N)`), fresh for every
//! request. The study's routes are shorthands (`Route`).

use bytes::Bytes;
use hyper::{
    header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST},
    Method, Uri,
};
use serde::{Deserialize, Serialize};

/// The study's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// GET /posts/cpu/
    Cpu,
    /// GET /posts/io_read/
    #[value(name = "io_read")]
    IoRead,
    /// POST /posts/io_create/ with title="Post "+10 letters, content="Content "+100 letters
    #[value(name = "io_create")]
    IoCreate,
}

impl Route {
    pub(crate) const ALL: [Route; 3] = [Route::Cpu, Route::IoRead, Route::IoCreate];

    /// The route's name on the command line, in configurations and in results.
    pub fn name(self) -> &'static str {
        match self {
            Route::Cpu => "cpu",
            Route::IoRead => "io_read",
            Route::IoCreate => "io_create",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Route::Cpu => "/posts/cpu/",
            Route::IoRead => "/posts/io_read/",
            Route::IoCreate => "/posts/io_create/",
        }
    }

    /// The request the study's locustfile sent on this route.
    pub fn request(self) -> RequestSpec {
        match self {
            Route::Cpu | Route::IoRead => RequestSpec {
                method: "GET".into(),
                ..RequestSpec::default()
            },
            Route::IoCreate => RequestSpec {
                method: "POST".into(),
                headers: Vec::new(),
                body: BodySpec::Form(vec![
                    ("title".into(), "Post {rand:10}".into()),
                    ("content".into(), "Content {rand:100}".into()),
                ]),
            },
        }
    }
}

/// What to send, as a user writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    pub method: String,
    /// Extra headers (name, value); values may hold `{rand:N}`.
    pub headers: Vec<(String, String)>,
    pub body: BodySpec,
}

impl Default for RequestSpec {
    fn default() -> Self {
        RequestSpec {
            method: "GET".into(),
            headers: Vec::new(),
            body: BodySpec::None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BodySpec {
    None,
    /// Sent as is (placeholders expanded).
    Raw(String),
    /// `application/x-www-form-urlencoded`; values may hold placeholders.
    Form(Vec<(String, String)>),
    /// `application/json`, sent as is (placeholders expanded).
    Json(String),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TemplateError {
    #[error("invalid HTTP method {0:?}")]
    Method(String),
    #[error("invalid header {0:?}")]
    Header(String),
    #[error("invalid placeholder in {0:?}: expected {{rand:N}} with 1 <= N <= 65536")]
    Placeholder(String),
}

#[derive(Debug, Clone)]
enum Piece {
    Lit(Bytes),
    Letters(usize),
}

/// A text with placeholders, split once.
#[derive(Debug, Clone)]
struct Text {
    pieces: Vec<Piece>,
}

impl Text {
    /// `encode` is applied to literal parts (form encoding); letters never need it.
    fn parse(s: &str, encode: fn(&str) -> String) -> Result<Text, TemplateError> {
        let mut pieces = Vec::new();
        let mut rest = s;
        while let Some(i) = rest.find("{rand:") {
            if i > 0 {
                pieces.push(Piece::Lit(Bytes::from(encode(&rest[..i]))));
            }
            let after = &rest[i + 6..];
            let end = after
                .find('}')
                .ok_or_else(|| TemplateError::Placeholder(s.to_owned()))?;
            let n: usize = after[..end]
                .parse()
                .map_err(|_| TemplateError::Placeholder(s.to_owned()))?;
            if n == 0 || n > 65536 {
                return Err(TemplateError::Placeholder(s.to_owned()));
            }
            pieces.push(Piece::Letters(n));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Lit(Bytes::from(encode(rest))));
        }
        Ok(Text { pieces })
    }

    fn concat(parts: Vec<Text>, sep: &'static [u8]) -> Text {
        let mut pieces = Vec::new();
        for (i, p) in parts.into_iter().enumerate() {
            if i > 0 {
                pieces.push(Piece::Lit(Bytes::from_static(sep)));
            }
            pieces.extend(p.pieces);
        }
        Text { pieces }
    }

    fn literal(s: String) -> Text {
        Text {
            pieces: vec![Piece::Lit(Bytes::from(s))],
        }
    }

    fn push_str(&mut self, s: &str) {
        self.pieces
            .push(Piece::Lit(Bytes::copy_from_slice(s.as_bytes())));
    }

    /// The rendered length (a placeholder is always its N letters).
    fn len(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Lit(b) => b.len(),
                Piece::Letters(n) => *n,
            })
            .sum()
    }

    /// Adjacent literals joined, so that rendering copies once per literal run.
    fn merged(self) -> Text {
        let mut pieces: Vec<Piece> = Vec::new();
        for p in self.pieces {
            match (pieces.last_mut(), p) {
                (Some(Piece::Lit(a)), Piece::Lit(b)) => {
                    let mut v = a.to_vec();
                    v.extend_from_slice(&b);
                    *a = Bytes::from(v);
                }
                (_, p) => pieces.push(p),
            }
        }
        Text { pieces }
    }

    fn render(&self, rng: &mut Rng, buf: &mut Vec<u8>) {
        buf.clear();
        for p in &self.pieces {
            match p {
                Piece::Lit(b) => buf.extend_from_slice(b),
                Piece::Letters(n) => {
                    for _ in 0..*n {
                        buf.push(rng.letter());
                    }
                }
            }
        }
    }
}

/// Percent-encoding for form fields (application/x-www-form-urlencoded, space as '+').
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn verbatim(s: &str) -> String {
    s.to_owned()
}

/// A compiled request: everything parsed and validated once, kept as the bytes it is sent as
/// (request line, headers, body) with the placeholders' places marked. The body's length does
/// not depend on the letters drawn, so `Content-Length` is part of the fixed text.
pub(crate) struct Template {
    method: String,
    path: String,
    wire: Text,
    head: bool,
    keep_alive: bool,
}

impl Template {
    /// `path_and_query` is the request target (origin form), `host` the Host header;
    /// without `keep_alive` every request asks the server to close (`Connection: close`).
    pub fn new(
        spec: &RequestSpec,
        path_and_query: &str,
        host: &str,
        keep_alive: bool,
    ) -> Result<Template, TemplateError> {
        let method = Method::from_bytes(spec.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| TemplateError::Method(spec.method.clone()))?;
        let uri: Uri = path_and_query
            .parse()
            .map_err(|_| TemplateError::Header(path_and_query.to_owned()))?;
        HeaderValue::from_str(host).map_err(|_| TemplateError::Header(host.to_owned()))?;
        let target = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut wire = Text::literal(format!("{method} {target} HTTP/1.1\r\nhost: {host}\r\n"));
        let content_type = match &spec.body {
            BodySpec::Form(_) => Some("application/x-www-form-urlencoded"),
            BodySpec::Json(_) => Some("application/json"),
            _ => None,
        };
        let user_sets_type = spec
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        if let (Some(ct), false) = (content_type, user_sets_type) {
            wire.push_str(&format!("{CONTENT_TYPE}: {ct}\r\n"));
        }
        for (k, v) in &spec.headers {
            let name = HeaderName::from_bytes(k.trim().as_bytes())
                .map_err(|_| TemplateError::Header(format!("{k}: {v}")))?;
            if name == HOST {
                return Err(TemplateError::Header(format!(
                    "{k}: {v} (the Host header comes from the URL)"
                )));
            }
            // The literal parts are checked as a header value; letters are always valid.
            HeaderValue::from_str(v.trim())
                .map_err(|_| TemplateError::Header(format!("{k}: {v}")))?;
            wire.push_str(&format!("{name}: "));
            wire.pieces.extend(Text::parse(v.trim(), verbatim)?.pieces);
            wire.push_str("\r\n");
        }
        let body = match &spec.body {
            BodySpec::None => Text { pieces: Vec::new() },
            BodySpec::Raw(s) | BodySpec::Json(s) => Text::parse(s, verbatim)?,
            BodySpec::Form(fields) => {
                let mut parts = Vec::new();
                for (k, v) in fields {
                    let mut t = Text::parse(k, form_encode)?;
                    t.pieces.push(Piece::Lit(Bytes::from_static(b"=")));
                    t.pieces.extend(Text::parse(v, form_encode)?.pieces);
                    parts.push(t);
                }
                Text::concat(parts, b"&")
            }
        };
        // A body, or a method that defines one, says its length (RFC 9110 8.6).
        let len = body.len();
        if len > 0 || matches!(method, Method::POST | Method::PUT | Method::PATCH) {
            wire.push_str(&format!("content-length: {len}\r\n"));
        }
        if !keep_alive {
            wire.push_str("connection: close\r\n");
        }
        wire.push_str("\r\n");
        wire.pieces.extend(body.pieces);
        Ok(Template {
            head: method == Method::HEAD,
            keep_alive,
            method: method.to_string(),
            path: uri.path().to_owned(),
            wire: wire.merged(),
        })
    }

    pub fn method(&self) -> &str {
        &self.method
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the request is HEAD (its response has no body whatever its headers say).
    pub fn is_head(&self) -> bool {
        self.head
    }

    /// Whether connections are kept open between requests (without it every request says
    /// `Connection: close`, and the client closes after each response).
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    /// One request as sent on the wire, written into `out` (reused: no allocation once it has
    /// grown to the request's size), with fresh letters for every placeholder.
    pub fn render(&self, rng: &mut Rng, out: &mut Vec<u8>) {
        self.wire.render(rng, out);
    }
}

/// xoshiro-style small fast generator (SplitMix64); statistical quality is ample for random
/// text, and it needs no locking or allocation.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn letter(&mut self) -> u8 {
        const LETTERS: &[u8; 52] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        LETTERS[(self.next_u64() % 52) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Route::ALL` and `name` are what the command line, configurations and results use: the
    /// same variants, in clap's order, with clap's names.
    #[test]
    fn route_names_are_the_command_lines() {
        use clap::ValueEnum;
        let clap: Vec<String> = Route::value_variants()
            .iter()
            .map(|r| r.to_possible_value().unwrap().get_name().to_string())
            .collect();
        let ours: Vec<&str> = Route::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(clap, ours);
        assert_eq!(Route::ALL.to_vec(), Route::value_variants().to_vec());
    }

    /// A rendered request read back by httparse (an independent parser): method, target,
    /// headers (names lower-cased) and the body its Content-Length delimits.
    struct Sent {
        method: String,
        target: String,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Sent {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }
    }

    fn sent(t: &Template, rng: &mut Rng) -> Sent {
        let mut wire = Vec::new();
        t.render(rng, &mut wire);
        let mut h = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut h);
        let n = match req.parse(&wire).unwrap() {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => panic!("incomplete head: {wire:?}"),
        };
        let headers: Vec<(String, String)> = req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8(h.value.to_vec()).unwrap(),
                )
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        assert_eq!(
            wire.len(),
            n + len,
            "the body is exactly Content-Length bytes"
        );
        Sent {
            method: req.method.unwrap().to_owned(),
            target: req.path.unwrap().to_owned(),
            headers,
            body: String::from_utf8(wire[n..].to_vec()).unwrap(),
        }
    }

    #[test]
    fn io_create_posts_the_study_form() {
        let t = Template::new(
            &Route::IoCreate.request(),
            Route::IoCreate.path(),
            "127.0.0.1:8000",
            true,
        )
        .unwrap();
        let mut rng = Rng::new(1);
        let a = sent(&t, &mut rng);
        assert_eq!(a.method, "POST");
        assert_eq!(a.target, "/posts/io_create/");
        assert_eq!(a.header("host"), Some("127.0.0.1:8000"));
        assert_eq!(
            a.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(
            a.header("connection"),
            None,
            "keep-alive is HTTP/1.1's default"
        );
        let body = a.body;
        let (title, content) = body.split_once('&').unwrap();
        let title = title.strip_prefix("title=Post+").unwrap();
        let content = content.strip_prefix("content=Content+").unwrap();
        assert_eq!(title.len(), 10);
        assert_eq!(content.len(), 100);
        assert!(title
            .bytes()
            .chain(content.bytes())
            .all(|c| c.is_ascii_alphabetic()));
        // Fresh letters for every request.
        let b = sent(&t, &mut rng).body;
        assert_ne!(body, b);
    }

    #[test]
    fn static_parts_are_encoded_and_placeholders_checked() {
        let spec = RequestSpec {
            method: "put".into(),
            headers: vec![("X-Id".into(), "u-{rand:4}".into())],
            body: BodySpec::Form(vec![("a b".into(), "x&y=z".into())]),
        };
        let t = Template::new(&spec, "/p?q=1", "h", false).unwrap();
        let r = sent(&t, &mut Rng::new(2));
        assert_eq!(r.method, "PUT");
        assert_eq!(r.target, "/p?q=1");
        assert_eq!(t.path(), "/p");
        let id = r.header("x-id").unwrap();
        assert!(id.len() == 6 && id.starts_with("u-"), "{id}");
        assert_eq!(r.header("connection"), Some("close"));
        assert_eq!(r.body, "a+b=x%26y%3Dz");
        // No body on a GET: no Content-Length; HEAD is known as such.
        let get = Template::new(&RequestSpec::default(), "/", "h", true).unwrap();
        assert_eq!(sent(&get, &mut Rng::new(3)).header("content-length"), None);
        assert!(!get.is_head());
        let head = RequestSpec {
            method: "head".into(),
            ..RequestSpec::default()
        };
        assert!(Template::new(&head, "/", "h", true).unwrap().is_head());
        // A header value with a line break would smuggle a header: refused.
        let spec = RequestSpec {
            headers: vec![("X-A".into(), "a\r\nX-B: {rand:2}".into())],
            ..RequestSpec::default()
        };
        assert!(Template::new(&spec, "/", "h", true).is_err());
        for bad in ["{rand:}", "{rand:0}", "{rand:x}", "{rand:3"] {
            let spec = RequestSpec {
                body: BodySpec::Raw(bad.into()),
                ..RequestSpec::default()
            };
            assert!(Template::new(&spec, "/", "h", true).is_err(), "{bad}");
        }
        let spec = RequestSpec {
            method: "GE T".into(),
            ..RequestSpec::default()
        };
        assert!(Template::new(&spec, "/", "h", true).is_err());
    }
}
