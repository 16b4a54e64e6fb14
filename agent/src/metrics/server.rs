//! The agent's one HTTP server, for its own endpoints: `/metrics` for Prometheus and the
//! daemon's control API. hyper's HTTP/1 server parses the requests (a root daemon must not parse
//! untrusted input by hand); this module adds one request per connection (`Connection: close`),
//! bounded head and body sizes, a read timeout, and a handler that maps a [`Request`] to a
//! [`Response`].
//!
//! It must never panic or stall on bad input: malformed requests get a 4xx, slow clients are cut
//! off, and each connection runs in its own task.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinHandle};

use super::MetricsError;

/// Largest request head accepted (request line and headers).
pub(crate) const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted.
pub(crate) const MAX_BODY: usize = 64 * 1024;
/// A client must send its whole request within this time.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    pub query: Option<String>,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response; the server adds Content-Length and `Connection: close`.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        let mut b = body.into().into_bytes();
        if !b.ends_with(b"\n") {
            b.push(b'\n');
        }
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: b,
        }
    }

    pub fn json(status: u16, v: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec(v).unwrap_or_default();
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }

    /// `{"error": msg}` with `status`.
    pub fn error(status: u16, msg: impl Into<String>) -> Response {
        Response::json(status, &serde_json::json!({ "error": msg.into() }))
    }
}

/// A running server; dropping it stops accepting (connections in progress finish on their own).
pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves `handler` on the current tokio runtime.
pub async fn bind<H>(addr: SocketAddr, handler: H) -> Result<Server, MetricsError>
where
    H: Fn(Request) -> Response + Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| MetricsError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    let handler = Arc::new(handler);
    let task = tokio::spawn(async move {
        loop {
            let (conn, peer) = match listener.accept().await {
                Ok(c) => c,
                // Out of fds and the like: wait a little rather than spin.
                Err(e) => {
                    tracing::warn!("accept on {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let h = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let h = h.clone();
                    async move { Ok::<_, Infallible>(serve(req, peer, h).await) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(READ_TIMEOUT)
                    .max_buf_size(MAX_HEAD)
                    .keep_alive(false)
                    // A client may shut down its sending side and wait for the answer.
                    .half_close(true)
                    .serve_connection(TokioIo::new(conn), service);
                // A connection lives for one request; a client that stalls after its head is
                // cut off by the body's own timeout (`serve`), this bounds the rest.
                let _ = tokio::time::timeout(READ_TIMEOUT * 3, conn).await;
            });
        }
    });
    Ok(Server { addr, task })
}

/// Where a command serves `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAt {
    /// An address the user gave: not being able to bind it is an error.
    Asked(SocketAddr),
    /// The command's default address: when it is taken (another run, a daemon), a free port on
    /// the same address instead, so that metrics never stop a run.
    Default(SocketAddr),
}

/// The loopback address `awaitlab run` serves its metrics on unless told otherwise (the
/// daemon's defaults are 9464 for metrics and 9465 for its control endpoint).
pub const RUN_METRICS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9466);

/// [`serve_metrics`] at `at`, and the line that says where (`awaitlab: metrics on http://...`,
/// with the reason when the default port was taken).
pub async fn serve_metrics_at(
    at: MetricsAt,
    registry: prometheus::Registry,
) -> Result<Server, MetricsError> {
    let server = match at {
        MetricsAt::Asked(addr) => serve_metrics(addr, registry).await?,
        MetricsAt::Default(addr) => match serve_metrics(addr, registry.clone()).await {
            Ok(s) => s,
            Err(MetricsError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse =>
            {
                let s = serve_metrics(SocketAddr::new(addr.ip(), 0), registry).await?;
                eprintln!("awaitlab: {addr} is in use; serving metrics on a free port instead");
                s
            }
            Err(e) => return Err(e),
        },
    };
    eprintln!("awaitlab: metrics on http://{}/metrics", server.addr);
    Ok(server)
}

/// Serves `registry` at `/metrics` (and a pointer to it at `/`).
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: prometheus::Registry,
) -> Result<Server, MetricsError> {
    bind(addr, move |req| metrics_handler(&registry, &req)).await
}

/// The `/metrics` handler, for servers that also serve other paths.
pub(crate) fn metrics_handler(registry: &prometheus::Registry, req: &Request) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET" | "HEAD", "/metrics") => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: super::encode(registry),
        },
        (_, "/metrics") => Response::text(405, "only GET /metrics"),
        ("GET", "/") => Response::text(200, "awaitlab: metrics at /metrics"),
        _ => Response::text(
            404,
            format!("no such path {:?}; metrics are at /metrics", req.path),
        ),
    }
}

/// One request: its body read within the limits, the handler, the response. The handler runs
/// on the blocking pool, not on a runtime worker: a handler that shells out or waits (a delay
/// set or cleared through the control endpoint) must not stall the other connections, among
/// them Prometheus's scrapes.
async fn serve<H>(
    req: hyper::Request<Incoming>,
    peer: SocketAddr,
    handler: Arc<H>,
) -> hyper::Response<Full<bytes::Bytes>>
where
    H: Fn(Request) -> Response + Send + Sync + 'static,
{
    let resp = match read_request(req, peer).await {
        Err(resp) => resp,
        Ok(req) => {
            let head_only = req.method == "HEAD";
            let mut r = tokio::task::spawn_blocking(move || handler(req))
                .await
                .unwrap_or_else(|e| Response::text(500, format!("handler failed: {e}")));
            if head_only {
                r.body.clear();
            }
            r
        }
    };
    let mut out = hyper::Response::new(Full::new(bytes::Bytes::from(resp.body)));
    *out.status_mut() = hyper::StatusCode::from_u16(resp.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let h = out.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(resp.content_type),
    );
    h.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    out
}

/// The request as handlers see it; what the limits refuse becomes the 4xx response to send.
async fn read_request(
    req: hyper::Request<Incoming>,
    peer: SocketAddr,
) -> Result<Request, Response> {
    let (parts, body) = req.into_parts();
    // Only origin-form targets ("/path?query"): this server proxies nothing.
    if parts.uri.scheme().is_some() || !parts.uri.path().starts_with('/') {
        return Err(Response::text(400, "request target must be a path"));
    }
    if parts.headers.contains_key(hyper::header::TRANSFER_ENCODING) {
        return Err(Response::text(
            411,
            "chunked bodies are not accepted; send Content-Length",
        ));
    }
    let declared = match parts.headers.get(hyper::header::CONTENT_LENGTH) {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| Response::text(400, "bad Content-Length"))?,
    };
    if declared > MAX_BODY {
        // Read (and drop, bounded) what the client is still sending: closing a socket with
        // unread input sends a reset, which can destroy the response before the client reads it.
        let mut body = body;
        let drain = async {
            let mut left = 1usize << 20;
            while let Some(Ok(frame)) = body.frame().await {
                let n = frame.data_ref().map_or(0, |d| d.len());
                left = left.saturating_sub(n);
                if left == 0 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        return Err(Response::text(
            413,
            format!("request body larger than {MAX_BODY} bytes"),
        ));
    }
    let body = match tokio::time::timeout(READ_TIMEOUT, body.collect()).await {
        Err(_) => return Err(Response::text(408, "request not received within 10 s")),
        Ok(Err(e)) => return Err(Response::text(400, format!("reading the body: {e}"))),
        Ok(Ok(b)) => b.to_bytes().to_vec(),
    };
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    Ok(Request {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers,
        body,
        peer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    fn roundtrip(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(raw).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_and_rejects_garbage_with_4xx() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let r = prometheus::Registry::new();
        let l = super::super::LoadMetrics::new(&r).unwrap();
        l.set_users(3);
        let server = rt
            .block_on(serve_metrics("127.0.0.1:0".parse().unwrap(), r))
            .unwrap();
        let addr = server.addr;
        let ok = roundtrip(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("\nawaitlab_load_users 3\n"), "{ok}");
        // The agent's own HTTP client (reqwest) reads the same.
        let (status, body) =
            crate::study::sut::http(addr, "GET", "/metrics", None, Duration::from_secs(5)).unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("\nawaitlab_load_users 3\n"), "{body}");
        let (status, _) = crate::study::sut::http(
            addr,
            "POST",
            "/metrics",
            Some("a=1"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(status, 405);
        for (raw, code) in [
            (&b"GARBAGE\r\n\r\n"[..], "400"),
            (b"GET http://x/ HTTP/1.1\r\n\r\n", "400"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", "405"),
            (b"GET /nope HTTP/1.1\r\n\r\n", "404"),
            (b"GET /metrics HTTP/1.1\r\nContent-Length: x\r\n\r\n", "400"),
            (
                b"POST /x HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
                "413",
            ),
            (b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n", "400"),
            // A TLS client hello, and a request line without a version (HTTP/0.9).
            (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", "400"),
            (b"GET /metrics\r\n\r\n", "400"),
        ] {
            let out = roundtrip(addr, raw);
            assert!(
                out.starts_with(&format!("HTTP/1.1 {code} ")),
                "{:?} -> {out}",
                String::from_utf8_lossy(raw)
            );
        }
        // A head cut short by the client's close: nothing to answer, the connection just ends.
        assert_eq!(roundtrip(addr, b"GET /metr"), "");
        let big = vec![b'a'; MAX_HEAD + 10];
        assert!(roundtrip(addr, &big).starts_with("HTTP/1.1 431 "));
        // Still serving after all that.
        assert!(roundtrip(addr, b"GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 200 "));
        drop(server);
    }
}
