//! One user's HTTP/1 connection (hyper's client `conn::http1`), driven inside the user's own
//! task: no connection task, no channel, no pool. The connection is kept while the server
//! keeps it; it is dropped (closed) at once after a `Connection: close` response, after any
//! error, and when the server has closed it in the meantime, and the next request opens a new
//! one. Connect time is recorded apart from response time.
//!
//! This module must not retry: a request that failed is a failure of the kind it met
//! (Locust's FastHttpUser retries GETs on a reset connection and so hides resets).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    task::Poll,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    client::conn::http1::{self, Connection, SendRequest},
    header::CONNECTION,
    Request, Version,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::record::{ErrorKind, Outcome, Recorder};

type Io = TokioIo<TcpStream>;

struct Conn {
    sender: SendRequest<Full<Bytes>>,
    conn: Connection<Io, Full<Bytes>>,
    last_used: Instant,
}

/// A connection idle for longer than this is checked for a close by the server before reuse.
/// Below it the check would cost a read syscall per request for nothing: servers close idle
/// connections after seconds, not microseconds.
const IDLE_CHECK: Duration = Duration::from_millis(20);

/// A user's connection slot.
#[derive(Default)]
pub(crate) struct UserConn {
    conn: Option<Conn>,
}

/// The result of one exchange on the wire.
pub(crate) struct Exchange {
    pub outcome: Outcome,
    pub bytes: u64,
}

impl UserConn {
    /// Sends `req` on the user's connection, opening one if needed, and reads the whole
    /// response. Never panics, never retries.
    pub async fn send(
        &mut self,
        addr: SocketAddr,
        keep_alive: bool,
        req: Request<Full<Bytes>>,
        rec: &Recorder,
    ) -> Exchange {
        if let Some(c) = self
            .conn
            .as_mut()
            .filter(|c| c.last_used.elapsed() >= IDLE_CHECK)
        {
            // The server may have closed an idle connection since the last request: poll the
            // connection once without waiting, so that a FIN already received is seen now
            // rather than as a failure of the next request.
            let closed =
                std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut c.conn).poll(cx).is_ready()))
                    .await;
            if closed || c.sender.is_closed() {
                self.conn = None;
            }
        }
        if self.conn.is_none() {
            match connect(addr, rec).await {
                Ok(c) => self.conn = Some(c),
                Err(kind) => {
                    return Exchange {
                        outcome: Outcome::Error(kind),
                        bytes: 0,
                    }
                }
            }
        }
        let mut req = req;
        if !keep_alive {
            req.headers_mut()
                .insert(CONNECTION, hyper::header::HeaderValue::from_static("close"));
        }
        let c = self.conn.as_mut().expect("connection was just opened");
        let (result, conn_err) = exchange(c, req).await;
        c.last_used = Instant::now();
        match result {
            Ok((status, bytes, close)) => {
                if close || !keep_alive || conn_err.is_some() {
                    // Closing promptly matters: gunicorn's sync worker waits for the client
                    // to close after each response.
                    self.conn = None;
                }
                Exchange {
                    outcome: Outcome::Status(status),
                    bytes,
                }
            }
            Err(e) => {
                self.conn = None;
                // The connection's own error (e.g. the reset it read) says more than the
                // request's ("connection closed").
                let kind = conn_err
                    .as_ref()
                    .map(classify)
                    .filter(|k| *k != ErrorKind::Protocol)
                    .unwrap_or_else(|| classify(&e));
                Exchange {
                    outcome: Outcome::Error(kind),
                    bytes: 0,
                }
            }
        }
    }

    /// Drops the connection (after a timeout the response may still be on its way).
    pub fn reset(&mut self) {
        self.conn = None;
    }
}

async fn connect(addr: SocketAddr, rec: &Recorder) -> Result<Conn, ErrorKind> {
    let t0 = Instant::now();
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| classify_io(&e, true))?;
    rec.connect(t0.elapsed());
    // Requests are small and written at once; Nagle would only delay them.
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| classify(&e))?;
    Ok(Conn {
        sender,
        conn,
        last_used: Instant::now(),
    })
}

type Response = (u16, u64, bool);

/// Drives the request and the connection together until the response body has been read.
/// Returns the response (status, body bytes, whether the server asked to close) or the
/// request's error, and the connection's own error if it ended with one.
async fn exchange(
    c: &mut Conn,
    req: Request<Full<Bytes>>,
) -> (Result<Response, hyper::Error>, Option<hyper::Error>) {
    let Conn { sender, conn, .. } = c;
    let request = async {
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let close = wants_close(resp.version(), resp.headers());
        let mut body = resp.into_body();
        let mut bytes = 0u64;
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame?.data_ref() {
                bytes += d.len() as u64;
            }
        }
        Ok::<_, hyper::Error>((status, bytes, close))
    };
    tokio::pin!(request);
    let mut conn_done: Option<Result<(), hyper::Error>> = None;
    loop {
        tokio::select! {
            biased;
            r = &mut request => {
                let conn_err = match conn_done { Some(Err(e)) => Some(e), _ => None };
                return (r, conn_err);
            }
            done = &mut *conn, if conn_done.is_none() => {
                conn_done = Some(done);
            }
        }
    }
}

fn wants_close(version: Version, headers: &hyper::HeaderMap) -> bool {
    let has = |token: &str| {
        headers.get_all(CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if version == Version::HTTP_10 {
        !has("keep-alive")
    } else {
        has("close")
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

/// Maps hyper's error to a failure kind, preferring the underlying I/O error when there is one.
pub(crate) fn classify(e: &hyper::Error) -> ErrorKind {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return classify_io(io, false);
        }
        src = s.source();
    }
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        ErrorKind::ClosedWithoutResponse
    } else if e.is_timeout() {
        ErrorKind::Timeout
    } else {
        ErrorKind::Protocol
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
