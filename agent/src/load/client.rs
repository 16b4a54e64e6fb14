//! One user's HTTP/1.1 connection, driven inside the user's own task: no connection task, no
//! channel, no pool. The request is the template's bytes, written with one call; the response
//! head is parsed in place (httparse) and its body is framed by `Content-Length`, chunked
//! encoding or the end of the connection, counted and dropped. The connection is kept while
//! the server keeps it; it is closed at once after a `Connection: close` response, after any
//! error, and when the server has closed it in the meantime, and the next request opens a new
//! one. Connect time is recorded apart from response time.
//!
//! This module must not retry: a request that failed is a failure of the kind it met
//! (Locust's FastHttpUser retries GETs on a reset connection and so hides resets).

use std::{
    future::Future,
    net::SocketAddr,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    record::{ErrorKind, Outcome, Recorder},
    template::Template,
};

/// A connection idle for longer than this is checked for a close by the server before reuse.
/// Below it the check would cost a syscall per request for nothing: servers close idle
/// connections after seconds, not microseconds.
const IDLE_CHECK: Duration = Duration::from_millis(20);

/// The read buffer's first size (as hyper's); it grows only for a response head, which must fit in
/// `MAX_HEAD`.
const READ_BUF: usize = 8 * 1024;
const MAX_HEAD: usize = 1024 * 1024;
/// Headers parsed per response head (more is a protocol error, as in hyper's default of 100).
const MAX_HEADERS: usize = 100;

struct Conn {
    stream: TcpStream,
    last_used: Instant,
}

/// A user's connection slot and its read buffer (kept across connections).
#[derive(Default)]
pub(crate) struct UserConn {
    conn: Option<Conn>,
    buf: ReadBuf,
}

/// The result of one exchange on the wire.
pub(crate) struct Exchange {
    pub outcome: Outcome,
    pub bytes: u64,
}

impl UserConn {
    /// Sends `req` (a whole request, as rendered by `template`) on the user's connection,
    /// opening one if needed, and reads the whole response. Never panics, never retries.
    pub async fn send(
        &mut self,
        addr: SocketAddr,
        req: &[u8],
        template: &Template,
        rec: &Recorder,
    ) -> Exchange {
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.last_used.elapsed() >= IDLE_CHECK && !still_open(&c.stream))
        {
            // The server closed the idle connection since the last request: a FIN already
            // received is seen now rather than as a failure of the next request.
            self.conn = None;
        }
        if self.conn.is_none() {
            match connect(addr, rec).await {
                Ok(c) => self.conn = Some(c),
                Err(kind) => return failed(kind),
            }
            self.buf.clear();
        }
        let c = self.conn.as_mut().expect("connection was just opened");
        let result = exchange(&mut c.stream, &mut self.buf, req, template.is_head()).await;
        c.last_used = Instant::now();
        match result {
            Ok(r) => {
                if r.close || !template.keep_alive() {
                    // Closing promptly matters: gunicorn's sync worker waits for the client
                    // to close after each response.
                    self.conn = None;
                }
                Exchange {
                    outcome: Outcome::Status(r.status),
                    bytes: r.bytes,
                }
            }
            Err(kind) => {
                self.conn = None;
                failed(kind)
            }
        }
    }

    /// Drops the connection (after a timeout the response may still be on its way).
    pub fn reset(&mut self) {
        self.conn = None;
    }
}

fn failed(kind: ErrorKind) -> Exchange {
    Exchange {
        outcome: Outcome::Error(kind),
        bytes: 0,
    }
}

/// Whether an idle connection is still open: a peek that would block says nothing has come,
/// not even the server's FIN. (Asked of the socket itself, not of the runtime's readiness,
/// which is only as fresh as its last look at epoll.) Bytes nobody asked for mean the
/// connection is out of step: not reused either.
fn still_open(stream: &TcpStream) -> bool {
    let mut b = 0u8;
    // SAFETY: a one-byte peek into a local byte on a socket this stream owns.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
}

async fn connect(addr: SocketAddr, rec: &Recorder) -> Result<Conn, ErrorKind> {
    let t0 = Instant::now();
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| classify_io(&e, true))?;
    rec.connect(t0.elapsed());
    // Requests are small and written at once; Nagle would only delay them.
    let _ = stream.set_nodelay(true);
    Ok(Conn {
        stream,
        last_used: Instant::now(),
    })
}

/// The bytes read and not yet consumed: `data[start..end]`.
struct ReadBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for ReadBuf {
    fn default() -> Self {
        ReadBuf {
            data: vec![0; READ_BUF],
            start: 0,
            end: 0,
        }
    }
}

impl ReadBuf {
    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.clear();
        }
    }

    /// Reads more from `stream` after what is held; Ok(0) is the end of the connection.
    async fn fill(&mut self, stream: &mut TcpStream) -> Result<usize, ErrorKind> {
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.data.len() < MAX_HEAD {
                // Only a head that does not fit yet keeps everything it read.
                self.data.resize(self.data.len() * 2, 0);
            } else {
                return Err(ErrorKind::Protocol);
            }
        }
        let n = stream
            .read(&mut self.data[self.end..])
            .await
            .map_err(|e| classify_io(&e, false))?;
        self.end += n;
        Ok(n)
    }
}

struct Response {
    status: u16,
    /// Body bytes (decoded: chunk framing not counted).
    bytes: u64,
    /// The server closes the connection after this response.
    close: bool,
}

/// How a response's body ends (RFC 9112 6.3).
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Writes the request and reads its response: head, then body.
async fn exchange(
    stream: &mut TcpStream,
    buf: &mut ReadBuf,
    req: &[u8],
    head_request: bool,
) -> Result<Response, ErrorKind> {
    stream
        .write_all(req)
        .await
        .map_err(|e| classify_io(&e, false))?;
    let (status, framing, mut close) = loop {
        match parse_head(buf.filled(), head_request)? {
            Some((n, status, framing, close)) => {
                buf.consume(n);
                // An interim response (100 Continue, 103 Early Hints) precedes the real one.
                if (100..200).contains(&status) && status != 101 {
                    continue;
                }
                // After 101 Switching Protocols the connection speaks another protocol.
                break (status, framing, close || status == 101);
            }
            None => {
                if buf.fill(stream).await? == 0 {
                    return Err(ErrorKind::ClosedWithoutResponse);
                }
            }
        }
    };
    let bytes = match framing {
        Framing::Empty => 0,
        Framing::Length(n) => read_exact_body(stream, buf, n).await?,
        Framing::Chunked => read_chunked(stream, buf).await?,
        Framing::UntilClose => {
            close = true;
            let mut total = 0u64;
            loop {
                total += buf.filled().len() as u64;
                buf.clear();
                if buf.fill(stream).await? == 0 {
                    break total;
                }
            }
        }
    };
    Ok(Response {
        status,
        bytes,
        close,
    })
}

/// Parses a response head from `data`: None while incomplete, else its length, status, body
/// framing and whether the server will close the connection.
fn parse_head(
    data: &[u8],
    head_request: bool,
) -> Result<Option<(usize, u16, Framing, bool)>, ErrorKind> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(data) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ErrorKind::Protocol),
    };
    let status = resp.code.ok_or(ErrorKind::Protocol)?;
    let http10 = resp.version == Some(0);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let (mut close, mut keep) = (false, false);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(ErrorKind::Protocol)?;
            // Two different lengths cannot both frame the body (RFC 9112 6.3, item 5).
            if length.is_some_and(|l| l != v) {
                return Err(ErrorKind::Protocol);
            }
            length = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked only when it is the last coding.
            chunked = tokens(h.value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in tokens(h.value) {
                close |= t.eq_ignore_ascii_case("close");
                keep |= t.eq_ignore_ascii_case("keep-alive");
            }
        }
    }
    let framing = if head_request || (100..200).contains(&status) || status == 204 || status == 304
    {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(l) = length {
        if l == 0 {
            Framing::Empty
        } else {
            Framing::Length(l)
        }
    } else {
        Framing::UntilClose
    };
    Ok(Some((n, status, framing, close || (http10 && !keep))))
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(v: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(v)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

async fn read_exact_body(
    stream: &mut TcpStream,
    buf: &mut ReadBuf,
    n: u64,
) -> Result<u64, ErrorKind> {
    let mut left = n;
    loop {
        let take = (buf.filled().len() as u64).min(left);
        buf.consume(take as usize);
        left -= take;
        if left == 0 {
            return Ok(n);
        }
        if buf.fill(stream).await? == 0 {
            return Err(ErrorKind::ClosedWithoutResponse);
        }
    }
}

/// Reads a chunked body (RFC 9112 7.1): size lines (extensions ignored), data, and the
/// trailer section, which ends with an empty line.
async fn read_chunked(stream: &mut TcpStream, buf: &mut ReadBuf) -> Result<u64, ErrorKind> {
    let mut total = 0u64;
    loop {
        let n = line_len(stream, buf).await?;
        let line = &buf.filled()[..n];
        let size = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size)
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
            .ok_or(ErrorKind::Protocol)?;
        buf.consume(n + 2);
        if size == 0 {
            // Trailers, if any, up to the empty line.
            loop {
                let n = line_len(stream, buf).await?;
                buf.consume(n + 2);
                if n == 0 {
                    return Ok(total);
                }
            }
        }
        total += read_exact_body(stream, buf, size).await?;
        let n = line_len(stream, buf).await?;
        buf.consume(n + 2);
        if n != 0 {
            return Err(ErrorKind::Protocol);
        }
    }
}

/// The length of the next line of chunk framing in `buf`, without its CRLF, read in if needed
/// (at most 4 KiB: a size line is short). The caller consumes it with its CRLF.
async fn line_len(stream: &mut TcpStream, buf: &mut ReadBuf) -> Result<usize, ErrorKind> {
    loop {
        if let Some(i) = buf.filled().windows(2).position(|w| w == b"\r\n") {
            return Ok(i);
        }
        if buf.filled().len() > 4096 {
            return Err(ErrorKind::Protocol);
        }
        if buf.fill(stream).await? == 0 {
            return Err(ErrorKind::ClosedWithoutResponse);
        }
    }
}

fn classify_io(e: &std::io::Error, connecting: bool) -> ErrorKind {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => ErrorKind::Refused,
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => ErrorKind::Reset,
        K::UnexpectedEof => ErrorKind::ClosedWithoutResponse,
        K::TimedOut => ErrorKind::Timeout,
        _ if connecting => ErrorKind::Connect,
        _ => ErrorKind::Reset,
    }
}

/// Runs `f` with an optional deadline; on expiry the connection is dropped and the request is
/// a timeout.
pub(crate) async fn with_timeout<F: Future<Output = Exchange>>(
    timeout: Option<Duration>,
    f: F,
) -> Option<Exchange> {
    match timeout {
        None => Some(f.await),
        Some(t) => tokio::time::timeout(t, f).await.ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> (usize, u16, Framing, bool) {
        parse_head(s.as_bytes(), false).unwrap().unwrap()
    }

    /// The framing rules of RFC 9112 6.3 and the close rules of 9.3, on hand-written heads.
    #[test]
    fn heads_give_their_framing_and_close() {
        let (n, status, f, close) = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello");
        assert_eq!((n, status, close), (38, 200, false));
        assert!(matches!(f, Framing::Length(5)));
        let (_, _, f, _) = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert!(matches!(f, Framing::Chunked));
        let (_, _, f, close) = head("HTTP/1.1 200 OK\r\nConnection: Keep-Alive, close\r\n\r\n");
        assert!(matches!(f, Framing::UntilClose) && close);
        let (_, _, f, close) = head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(
            matches!(f, Framing::Empty) && close,
            "HTTP/1.0 closes by default"
        );
        let (_, _, _, close) = head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n");
        assert!(!close);
        let (_, status, f, _) = head("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n");
        assert!(status == 304 && matches!(f, Framing::Empty));
        let (_, _, f, _) = parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert!(matches!(f, Framing::Empty), "a HEAD response has no body");
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-len", false)
            .unwrap()
            .is_none());
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            "HTTP/9 200 OK\r\n\r\n",
        ] {
            assert!(matches!(
                parse_head(bad.as_bytes(), false),
                Err(ErrorKind::Protocol)
            ));
        }
    }
}
