//! Request templates: method, target, headers and a body (raw, form or JSON) with random-field
//! placeholders, built once and turned into a request per send without parsing anything again.
//!
//! `{rand:N}` in a body, form value or header value becomes N random ASCII letters
//! (`[A-Za-z]`, like Python's `random.choices(string.ascii_letters, k=N)`), fresh for every
//! request. The study's routes are shorthands (`Route`). A static body is shared between
//! requests (reference-counted), never copied.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST},
    Method, Request, Uri,
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

    fn is_static(&self) -> bool {
        self.pieces.iter().all(|p| matches!(p, Piece::Lit(_)))
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

    fn static_bytes(&self) -> Bytes {
        let mut v = Vec::new();
        for p in &self.pieces {
            if let Piece::Lit(b) = p {
                v.extend_from_slice(b);
            }
        }
        Bytes::from(v)
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

enum Body {
    Static(Bytes),
    Dynamic(Text),
}

enum HeaderVal {
    Static(HeaderValue),
    Dynamic(Text),
}

/// A compiled request: everything parsed and validated once.
pub(crate) struct Template {
    method: Method,
    uri: Uri,
    host: HeaderValue,
    headers: Vec<(HeaderName, HeaderVal)>,
    body: Body,
}

impl Template {
    /// `path_and_query` is the request target (origin form), `host` the Host header.
    pub fn new(
        spec: &RequestSpec,
        path_and_query: &str,
        host: &str,
    ) -> Result<Template, TemplateError> {
        let method = Method::from_bytes(spec.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| TemplateError::Method(spec.method.clone()))?;
        let uri: Uri = path_and_query
            .parse()
            .map_err(|_| TemplateError::Header(path_and_query.to_owned()))?;
        let host =
            HeaderValue::from_str(host).map_err(|_| TemplateError::Header(host.to_owned()))?;
        let mut headers = Vec::new();
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
            headers.push((
                CONTENT_TYPE,
                HeaderVal::Static(HeaderValue::from_static(ct)),
            ));
        }
        for (k, v) in &spec.headers {
            let name = HeaderName::from_bytes(k.trim().as_bytes())
                .map_err(|_| TemplateError::Header(format!("{k}: {v}")))?;
            if name == HOST {
                return Err(TemplateError::Header(format!(
                    "{k}: {v} (the Host header comes from the URL)"
                )));
            }
            let text = Text::parse(v.trim(), verbatim)?;
            let val = if text.is_static() {
                HeaderVal::Static(
                    HeaderValue::from_str(v.trim())
                        .map_err(|_| TemplateError::Header(format!("{k}: {v}")))?,
                )
            } else {
                if HeaderValue::from_str(v.trim()).is_err() {
                    return Err(TemplateError::Header(format!("{k}: {v}")));
                }
                HeaderVal::Dynamic(text)
            };
            headers.push((name, val));
        }
        let text = match &spec.body {
            BodySpec::None => None,
            BodySpec::Raw(s) | BodySpec::Json(s) => Some(Text::parse(s, verbatim)?),
            BodySpec::Form(fields) => {
                let mut parts = Vec::new();
                for (k, v) in fields {
                    let mut t = Text::parse(k, form_encode)?;
                    t.pieces.push(Piece::Lit(Bytes::from_static(b"=")));
                    t.pieces.extend(Text::parse(v, form_encode)?.pieces);
                    parts.push(t);
                }
                Some(Text::concat(parts, b"&"))
            }
        };
        let body = match text {
            None => Body::Static(Bytes::new()),
            Some(t) if t.is_static() => Body::Static(t.static_bytes()),
            Some(t) => Body::Dynamic(t),
        };
        Ok(Template {
            method,
            uri,
            host,
            headers,
            body,
        })
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// One request. `buf` is the caller's scratch space for placeholders (reused, so that a
    /// dynamic body costs one copy into the request and no other allocation).
    pub fn build(&self, rng: &mut Rng, buf: &mut Vec<u8>) -> Request<Full<Bytes>> {
        let body = match &self.body {
            Body::Static(b) => b.clone(),
            Body::Dynamic(t) => {
                t.render(rng, buf);
                Bytes::copy_from_slice(buf)
            }
        };
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        let h = req.headers_mut();
        h.insert(HOST, self.host.clone());
        for (k, v) in &self.headers {
            let v = match v {
                HeaderVal::Static(v) => v.clone(),
                HeaderVal::Dynamic(t) => {
                    t.render(rng, buf);
                    // Letters and the validated literals are valid header bytes.
                    HeaderValue::from_bytes(buf).unwrap_or_else(|_| HeaderValue::from_static(""))
                }
            };
            h.append(k.clone(), v);
        }
        req
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
    use http_body_util::BodyExt;

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

    fn body_of(req: Request<Full<Bytes>>) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let b = rt.block_on(req.into_body().collect()).unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn io_create_posts_the_study_form() {
        let t = Template::new(
            &Route::IoCreate.request(),
            Route::IoCreate.path(),
            "127.0.0.1:8000",
        )
        .unwrap();
        let mut rng = Rng::new(1);
        let mut buf = Vec::new();
        let a = t.build(&mut rng, &mut buf);
        assert_eq!(a.method(), Method::POST);
        assert_eq!(a.uri().path(), "/posts/io_create/");
        assert_eq!(a.headers()[HOST], "127.0.0.1:8000");
        assert_eq!(
            a.headers()[CONTENT_TYPE],
            "application/x-www-form-urlencoded"
        );
        let body = body_of(a);
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
        let b = body_of(t.build(&mut rng, &mut buf));
        assert_ne!(body, b);
    }

    #[test]
    fn static_parts_are_encoded_and_placeholders_checked() {
        let spec = RequestSpec {
            method: "put".into(),
            headers: vec![("X-Id".into(), "u-{rand:4}".into())],
            body: BodySpec::Form(vec![("a b".into(), "x&y=z".into())]),
        };
        let t = Template::new(&spec, "/p?q=1", "h").unwrap();
        let r = t.build(&mut Rng::new(2), &mut Vec::new());
        assert_eq!(r.method(), Method::PUT);
        assert_eq!(r.headers()["x-id"].len(), 6);
        assert_eq!(body_of(r), "a+b=x%26y%3Dz");
        for bad in ["{rand:}", "{rand:0}", "{rand:x}", "{rand:3"] {
            let spec = RequestSpec {
                body: BodySpec::Raw(bad.into()),
                ..RequestSpec::default()
            };
            assert!(Template::new(&spec, "/", "h").is_err(), "{bad}");
        }
        let spec = RequestSpec {
            method: "GE T".into(),
            ..RequestSpec::default()
        };
        assert!(Template::new(&spec, "/", "h").is_err());
    }
}
