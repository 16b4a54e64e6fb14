//! A deliberately small HTTP/1.1 server on tokio for the agent's own endpoints: `/metrics` for
//! Prometheus and the daemon's control API. One request per connection (`Connection: close`),
//! bounded head and body sizes, a read timeout, and a handler that maps a parsed [`Request`] to a
//! [`Response`].
//!
//! It must never panic or stall on bad input: malformed requests get a 4xx with a one-line
//! message, slow clients are cut off, and each connection runs in its own task.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use super::MetricsError;

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// A client must send its whole request within this time.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

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

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
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
                let _ = handle(conn, peer, &*h).await;
            });
        }
    });
    Ok(Server { addr, task })
}

/// Serves `registry` at `/metrics` (and a pointer to it at `/`).
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: prometheus::Registry,
) -> Result<Server, MetricsError> {
    bind(addr, move |req| metrics_handler(&registry, &req)).await
}

/// The `/metrics` handler, for servers that also serve other paths.
pub fn metrics_handler(registry: &prometheus::Registry, req: &Request) -> Response {
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

async fn handle<H>(mut conn: TcpStream, peer: SocketAddr, handler: &H) -> std::io::Result<()>
where
    H: Fn(Request) -> Response,
{
    let mut unread = false;
    let resp = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut conn, peer)).await {
        Err(_) => Response::text(408, "request not received within 10 s"),
        Ok(Err(resp)) => {
            unread = true;
            resp
        }
        Ok(Ok(req)) => {
            let head_only = req.method == "HEAD";
            let mut r = handler(req);
            if head_only {
                r.body.clear();
            }
            r
        }
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(&resp.body).await?;
    conn.shutdown().await?;
    if unread {
        // Closing a socket with unread input sends a reset, which can destroy the error response
        // before the client reads it: read what the client is still sending (bounded) first.
        let mut sink = [0u8; 8192];
        let mut left = 1usize << 20;
        let drain = async {
            while left > 0 {
                match conn.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    }
    Ok(())
}

/// Reads one request; a malformed one becomes the 4xx response to send.
async fn read_request(conn: &mut TcpStream, peer: SocketAddr) -> Result<Request, Response> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(Response::text(
                431,
                format!("request head larger than {MAX_HEAD} bytes"),
            ));
        }
        let n = conn
            .read(&mut chunk)
            .await
            .map_err(|e| Response::text(400, format!("reading the request: {e}")))?;
        if n == 0 {
            return Err(Response::text(
                400,
                "connection closed before the end of the request head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| Response::text(400, "request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Response::text(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
    {
        return Err(Response::text(400, "malformed request line"));
    }
    if !target.starts_with('/') {
        return Err(Response::text(400, "request target must be a path"));
    }
    let mut headers = Vec::new();
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            return Err(Response::text(400, format!("malformed header line {l:?}")));
        };
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut body = buf[head_end + 4..].to_vec();
    if headers.iter().any(|(k, _)| k == "transfer-encoding") {
        return Err(Response::text(
            411,
            "chunked bodies are not accepted; send Content-Length",
        ));
    }
    let len = match headers.iter().find(|(k, _)| k == "content-length") {
        None => 0,
        Some((_, v)) => v
            .parse::<usize>()
            .map_err(|_| Response::text(400, "bad Content-Length"))?,
    };
    if len > MAX_BODY {
        return Err(Response::text(
            413,
            format!("request body larger than {MAX_BODY} bytes"),
        ));
    }
    while body.len() < len {
        let n = conn
            .read(&mut chunk)
            .await
            .map_err(|e| Response::text(400, format!("reading the body: {e}")))?;
        if n == 0 {
            return Err(Response::text(
                400,
                "connection closed before the end of the body",
            ));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    Ok(Request {
        method: method.to_string(),
        path,
        query,
        headers,
        body,
        peer,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
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
            (b"GET /metr", "400"),
        ] {
            let out = roundtrip(addr, raw);
            assert!(
                out.starts_with(&format!("HTTP/1.1 {code} ")),
                "{:?} -> {out}",
                String::from_utf8_lossy(raw)
            );
        }
        let big = vec![b'a'; MAX_HEAD + 10];
        assert!(roundtrip(addr, &big).starts_with("HTTP/1.1 431 "));
        // Still serving after all that.
        assert!(roundtrip(addr, b"GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200 "));
        drop(server);
    }
}
