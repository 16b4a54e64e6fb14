//! `awaitlab load` against small HTTP servers written here, on 127.0.0.1 with ephemeral ports.
//! Each server keeps its own counts (connections accepted, requests parsed), which are the
//! independent truth the generator's report is checked against. No test asserts a speed.

mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use awaitlab::load::{
    self, ClosedSchedule, LoadReport, LoadSpec, Model, OpenSchedule, RequestSpec, Stage, Wait,
};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// 200 "ok", keep-alive.
    KeepAlive,
    /// 200 "ok" with `Connection: close`, then wait (up to 2 s) for the client to close, as
    /// gunicorn's sync worker does.
    CloseAfterEach,
    /// Sleep this long, then 200 "ok" (keep-alive).
    Delay(Duration),
    /// 500 for every request (keep-alive).
    Status500,
    /// Read the request, then reset the connection (SO_LINGER 0).
    Reset,
    /// Read the request, then close the connection without a response.
    CloseWithoutResponse,
    /// Read the request and never answer (until the client goes away).
    Hang,
    /// Answers in turn with the framings a client must follow (`framed`), keep-alive but for
    /// the last, which ends its body by closing.
    Framings,
    /// 101 Switching Protocols, then the connection speaks another protocol: the server never
    /// answers HTTP on it again and waits (up to 2 s) for the client to close.
    Upgrade,
}

/// Body bytes of the `Framings` answer to the server's request number `n` (from 0).
fn framed_body_len(n: u64) -> u64 {
    [19, 100_000, 0, 2, 5_000][(n % 5) as usize]
}

/// Writes `Framings`' answer to request `n`; false when the connection is to close.
fn framed(conn: &mut TcpStream, n: u64) -> std::io::Result<bool> {
    let _ = conn.set_nodelay(true);
    match n % 5 {
        0 => {
            // An interim response, then a chunked body with a chunk extension and a trailer.
            conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            conn.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                  3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\n",
            )?;
        }
        1 => {
            // A body six times the client's read buffer, in pieces.
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")?;
            for _ in 0..10 {
                conn.write_all(&[b'x'; 10_000])?;
            }
        }
        2 => conn.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")?,
        3 => {
            // The head one byte a segment.
            for b in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" {
                conn.write_all(&[*b])?;
            }
        }
        _ => {
            // HTTP/1.0 without a length: the body ends with the connection.
            conn.write_all(b"HTTP/1.0 200 OK\r\n\r\n")?;
            conn.write_all(&[b'y'; 5_000])?;
            conn.shutdown(Shutdown::Write)?;
            return Ok(false);
        }
    }
    Ok(true)
}

/// A thread-per-connection HTTP/1.1 server; stops and joins its threads on drop.
struct Server {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    /// Most requests the server was handling at one time (parsed, response not yet written).
    max_busy: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(b: Behaviour) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicU64::new(0));
        let max_busy = Arc::new(AtomicU64::new(0));
        let (c, r, s, bz, mb) = (
            connections.clone(),
            requests.clone(),
            stop.clone(),
            busy,
            max_busy.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut handlers = Vec::new();
            for conn in l.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, s, bz, mb) = (r.clone(), s.clone(), bz.clone(), mb.clone());
                // A thread per connection: let the finished ones go (dropping a finished
                // thread's handle frees its stack). Kept until the end, a connection per
                // request filled the process's memory maps within seconds (tens of thousands of
                // connections on a fast host) and the next thread could not start.
                handlers.retain(|h: &std::thread::JoinHandle<()>| !h.is_finished());
                handlers.push(std::thread::spawn(move || {
                    handle(conn, b, &r, &s, &bz, &mb)
                }));
            }
            for h in handlers {
                let _ = h.join();
            }
        });
        Server {
            addr,
            connections,
            requests,
            max_busy,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request (head and Content-Length body). None when the client closed.
fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            let total = end + 4 + len;
            if buf.len() >= total {
                buf.drain(..total);
                return Some(());
            }
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn handle(
    mut conn: TcpStream,
    b: Behaviour,
    requests: &AtomicU64,
    stop: &AtomicBool,
    busy: &AtomicU64,
    max_busy: &AtomicU64,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = Vec::new();
    loop {
        // Read timeouts only let the thread notice `stop`; a slow client is not an error.
        let got = loop {
            match read_request(&mut conn, &mut buf) {
                Some(()) => break true,
                None if stop.load(Ordering::SeqCst) => break false,
                None => {
                    // Distinguish a timeout (keep waiting) from a closed connection.
                    let mut probe = [0u8; 1];
                    match conn.peek(&mut probe) {
                        Ok(0) => break false,
                        Ok(_) => continue,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            continue
                        }
                        Err(_) => break false,
                    }
                }
            }
        };
        if !got {
            return;
        }
        let n = requests.fetch_add(1, Ordering::SeqCst);
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        match b {
            Behaviour::Framings => {
                if !matches!(framed(&mut conn, n), Ok(true)) {
                    return;
                }
            }
            Behaviour::KeepAlive => {
                if conn.write_all(ok).is_err() {
                    return;
                }
            }
            Behaviour::Delay(d) => {
                let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                max_busy.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(d);
                busy.fetch_sub(1, Ordering::SeqCst);
                if conn.write_all(ok).is_err() {
                    return;
                }
            }
            Behaviour::Status500 => {
                if conn
                    .write_all(
                        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 3\r\n\r\nbad",
                    )
                    .is_err()
                {
                    return;
                }
            }
            Behaviour::Upgrade => {
                let _ = conn.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: awl\r\n\r\n",
                );
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut sink = [0u8; 512];
                while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
                return;
            }
            Behaviour::CloseAfterEach => {
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                );
                let _ = conn.shutdown(Shutdown::Write);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut sink = [0u8; 512];
                while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
                return;
            }
            Behaviour::Reset => {
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: setsockopt on a socket we own, with a valid linger value.
                unsafe {
                    libc::setsockopt(
                        conn.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    )
                };
                return; // dropping the socket now sends RST
            }
            Behaviour::CloseWithoutResponse => {
                let _ = conn.shutdown(Shutdown::Both);
                return;
            }
            Behaviour::Hang => {
                let mut sink = [0u8; 512];
                while !stop.load(Ordering::SeqCst) {
                    match conn.read(&mut sink) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => return,
                    }
                }
                return;
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn run(spec: &LoadSpec) -> LoadReport {
    runtime()
        .block_on(load::run(spec, &mut |_| {}, CancellationToken::new()))
        .expect("load run")
}

/// `users` users for `secs` seconds, then a stage that stops them all and one quiet second, so
/// that every request in flight completes before the run ends and nothing is cut off.
fn closed(url: String, users: u32, secs: f64) -> LoadSpec {
    let u = f64::from(users);
    LoadSpec {
        url,
        request: RequestSpec::default(),
        model: Model::Closed {
            schedule: ClosedSchedule::new(vec![
                Stage {
                    target: u,
                    duration_s: 0.0,
                },
                Stage {
                    target: u,
                    duration_s: secs,
                },
                Stage {
                    target: 0.0,
                    duration_s: 0.0,
                },
                Stage {
                    target: 0.0,
                    duration_s: 1.0,
                },
            ])
            .unwrap(),
            wait: Wait::None,
        },
        timeout: None,
        keep_alive: true,
        threads: None,
    }
}

fn kinds(r: &LoadReport) -> Vec<(String, u64)> {
    r.failures_by_kind
        .iter()
        .map(|f| (f.kind.clone(), f.count))
        .collect()
}

#[test]
fn keep_alive_server_counts_match_and_connections_are_reused() {
    let s = Server::start(Behaviour::KeepAlive);
    let r = run(&closed(s.url("/k"), 10, 2.0));
    // Every request was drained by the final stage: what we recorded is what the server parsed.
    assert_eq!(r.in_flight_at_end, 0);
    assert!(
        r.requests > 100,
        "the server answers at once; 10 users for 2 s did only {}",
        r.requests
    );
    assert_eq!(r.requests, s.requests());
    assert_eq!(r.failures, 0, "{:?}", kinds(&r));
    // One connection per user, kept for the whole run.
    assert_eq!(s.connections(), 10);
    assert_eq!(r.connect_ms.count, 10);
    assert_eq!(r.max_users, 10);
    // The series adds up to the totals, and the study's figures follow from them.
    let sum: u64 = r.series.iter().map(|p| p.requests).sum();
    assert_eq!(sum, r.requests);
    assert_eq!(r.total_successes, r.requests);
    assert_eq!(r.status_counts.get("200"), Some(&r.requests));
    assert_eq!(r.bytes_received, 2 * r.requests);
}

/// Interim responses, chunked bodies with extensions and trailers, a body larger than the read
/// buffer, 204, a head split into one-byte segments, and an HTTP/1.0 body ended by the close:
/// every response is a success and the body bytes counted are the ones the server sent.
#[test]
fn every_framing_is_read_to_its_end() {
    let s = Server::start(Behaviour::Framings);
    let r = run(&closed(s.url("/f"), 4, 2.0));
    assert_eq!(r.failures, 0, "{:?}", kinds(&r));
    assert_eq!(r.requests, s.requests());
    assert!(r.requests >= 10, "only {} requests", r.requests);
    let sent: u64 = (0..s.requests()).map(framed_body_len).sum();
    assert_eq!(r.bytes_received, sent);
    // Requests numbered n = 0, 1, ... by the server: n % 5 == 2 got 204, n % 5 == 4 closed.
    let n = s.requests();
    assert_eq!(
        r.status_counts.get("204").copied().unwrap_or(0),
        (n + 2) / 5
    );
    // Each close was followed by a new connection unless the run ended first (one per user
    // at most).
    let closes = n / 5;
    assert!(
        (closes..=4 + closes).contains(&s.connections()),
        "{} connections for {closes} closes",
        s.connections()
    );
    assert_eq!(r.connect_ms.count, s.connections());
}

/// A 101 is a final answer after which the connection is no longer HTTP: the request counts
/// with its status, and the next request opens a new connection.
#[test]
fn a_switching_protocols_answer_ends_the_connection() {
    let s = Server::start(Behaviour::Upgrade);
    let r = run(&closed(s.url("/u"), 10, 2.0));
    // A generator that reused the connection would wait for an answer that never comes: at
    // most 10 users x 1 request in 2 s.
    assert!(r.requests > 50, "only {} requests", r.requests);
    assert_eq!(r.failures, 0, "{:?}", kinds(&r));
    assert_eq!(r.requests, s.requests());
    assert_eq!(r.status_counts.get("101"), Some(&r.requests));
    assert_eq!(s.connections(), r.requests);
}

#[test]
fn close_after_each_response_server_gets_a_connection_per_request() {
    let s = Server::start(Behaviour::CloseAfterEach);
    let r = run(&closed(s.url("/c"), 10, 2.0));
    assert_eq!(r.in_flight_at_end, 0);
    // The server waits up to 2 s for the client to close; a generator that did not close
    // promptly would manage at most 10 users x 1 request per 2 s = 10 requests.
    assert!(
        r.requests > 50,
        "only {} requests: connections not closed promptly?",
        r.requests
    );
    assert_eq!(r.requests, s.requests());
    assert_eq!(r.failures, 0, "{:?}", kinds(&r));
    assert_eq!(s.connections(), r.requests);
    assert_eq!(r.connect_ms.count, r.requests);
}

#[test]
fn latency_matches_a_server_that_waits_a_known_time() {
    let delay = Duration::from_millis(50);
    let s = Server::start(Behaviour::Delay(delay));
    let r = run(&closed(s.url("/d"), 4, 2.0));
    assert_eq!(r.failures, 0, "{:?}", kinds(&r));
    assert_eq!(r.requests, s.requests());
    // Lower bound: no response can come before the server's sleep (HDR error is <= 0.1 %).
    assert!(
        r.latency_ms.min >= 50.0 * 0.999,
        "min {} ms",
        r.latency_ms.min
    );
    // Upper bound: the sleep overshoots by well under a millisecond on an idle host; loopback
    // and the client add tens of microseconds. 10 ms leaves room for a busy 2-core CI host
    // (other builds running) without hiding a real error such as a lost wakeup (>= 1 tick).
    assert!(r.latency_ms.p50 <= 60.0, "p50 {} ms", r.latency_ms.p50);
    // 4 users x 2 s / 50 ms: at most 160 requests; a client adding delay would do fewer.
    assert!(r.requests <= 4 * 40 + 4, "{} requests", r.requests);
    for p in r.series.iter().filter(|p| p.requests > 0) {
        assert!(
            p.latency_ms.p50 >= 49.9,
            "second {}: p50 {}",
            p.second,
            p.latency_ms.p50
        );
    }
}

#[test]
fn users_leaving_and_coming_back_never_exceed_the_target() {
    // Regression: a user told to leave while its request was still running, and the user
    // that replaced it when the target rose again, must not both go on sending.
    let s = Server::start(Behaviour::Delay(Duration::from_millis(200)));
    let stages = [
        (4.0, 0.0),
        (4.0, 0.3),
        (0.0, 0.0),
        (0.0, 0.05),
        (4.0, 0.0),
        (4.0, 0.6),
        (0.0, 0.0),
        (0.0, 0.5),
    ];
    let spec = LoadSpec {
        url: s.url("/u"),
        request: RequestSpec::default(),
        model: Model::Closed {
            schedule: ClosedSchedule::new(
                stages
                    .iter()
                    .map(|&(target, duration_s)| Stage { target, duration_s })
                    .collect(),
            )
            .unwrap(),
            wait: Wait::None,
        },
        timeout: None,
        keep_alive: true,
        threads: None,
    };
    let r = run(&spec);
    assert_eq!(r.failures, 0);
    assert_eq!(r.requests, s.requests());
    // Every request takes at least the server's 200 ms, so a user can start at most
    // floor(span / 200 ms) + 1 requests in a span. Per index: the first user within [0, 0.3 s]
    // (2), its replacement within [0.35 s, 0.95 s) (4): at most 24 in all. Had the first users
    // gone on beside their replacements, they would have added up to 12 more.
    assert!(r.requests <= 24, "{} requests", r.requests);
    // At most the leaving user's last request and its replacement's, per index.
    assert!(
        s.max_busy.load(Ordering::SeqCst) <= 8,
        "{} at once",
        s.max_busy.load(Ordering::SeqCst)
    );
    assert!(s.max_busy.load(Ordering::SeqCst) >= 1);
}

#[test]
fn http_500_is_a_failure_of_kind_http_500() {
    let s = Server::start(Behaviour::Status500);
    let r = run(&closed(s.url("/e"), 2, 1.0));
    assert!(r.requests > 0);
    assert_eq!(r.requests, s.requests());
    assert_eq!(kinds(&r), vec![("http_500".to_owned(), r.requests)]);
    assert_eq!(r.total_successes, 0);
    assert_eq!(r.max_srps, 0.0);
    // Still keep-alive: a 500 does not cost a connection.
    assert_eq!(s.connections(), 2);
}

#[test]
fn reset_is_a_failure_of_kind_reset() {
    let s = Server::start(Behaviour::Reset);
    let r = run(&closed(s.url("/r"), 2, 1.0));
    assert!(r.requests > 0);
    assert_eq!(kinds(&r), vec![("reset".to_owned(), r.requests)]);
    // Each failed request dropped its connection; the next opened a new one.
    assert_eq!(s.connections(), r.requests);
    assert_eq!(s.requests(), r.requests);
}

#[test]
fn close_without_response_is_its_own_failure_kind() {
    let s = Server::start(Behaviour::CloseWithoutResponse);
    let r = run(&closed(s.url("/x"), 2, 1.0));
    assert!(r.requests > 0);
    assert_eq!(
        kinds(&r),
        vec![("closed_without_response".to_owned(), r.requests)]
    );
    assert_eq!(s.connections(), r.requests);
    assert_eq!(s.requests(), r.requests);
}

#[test]
fn refused_port_is_a_failure_of_kind_refused() {
    // A port that was free a moment ago: bind, note it, drop the listener.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = run(&closed(format!("http://127.0.0.1:{port}/"), 2, 0.5));
    assert!(r.requests > 0);
    assert_eq!(kinds(&r), vec![("refused".to_owned(), r.requests)]);
    assert_eq!(r.connect_ms.count, 0);
}

#[test]
fn timeout_is_a_failure_of_kind_timeout() {
    let s = Server::start(Behaviour::Hang);
    let mut spec = closed(s.url("/h"), 2, 1.0);
    spec.timeout = Some(Duration::from_millis(200));
    let r = run(&spec);
    assert!(r.requests > 0);
    assert_eq!(kinds(&r), vec![("timeout".to_owned(), r.requests)]);
    // The request's clock includes the wait: every latency is at least the timeout.
    assert!(
        r.latency_ms.min >= 200.0 * 0.999,
        "min {}",
        r.latency_ms.min
    );
    // Each timeout dropped its connection.
    assert_eq!(s.connections(), r.requests);
}

#[test]
fn open_model_sends_exactly_the_planned_arrivals() {
    let s = Server::start(Behaviour::KeepAlive);
    let spec = LoadSpec {
        url: s.url("/o"),
        request: RequestSpec::default(),
        model: Model::Open {
            schedule: OpenSchedule::ramp(200.0, 0.0, 2.0).unwrap(),
            max_in_flight: 1000,
        },
        timeout: None,
        keep_alive: true,
        threads: None,
    };
    let r = run(&spec);
    // 200/s for 2 s: arrivals due at 0, 5 ms, ..., 1995 ms. Each is either completed or cut
    // off by the end of the run.
    assert_eq!(r.requests + r.in_flight_at_end, 400);
    assert!(s.requests() >= r.requests && s.requests() <= 400);
    assert_eq!(r.failures, 0);
    // Workers start only when no free one is waiting for the next arrival, so connections are
    // reused: a server that answers at once needs a handful, not one per arrival (400) or one
    // per allowed worker (1000).
    assert!(s.connections() <= u64::from(r.max_users));
    assert!(s.connections() < 200, "{} connections", s.connections());
}

#[test]
fn open_model_measures_from_the_due_time() {
    // One connection, a server that takes 100 ms, arrivals every 50 ms: each request waits for
    // the one before it, so request k (due at 50k ms) starts at about 100k ms. Timed from its
    // actual start every request would read ~100 ms (coordinated omission); from its due time
    // the k-th reads ~50k + 100 ms.
    let s = Server::start(Behaviour::Delay(Duration::from_millis(100)));
    let spec = LoadSpec {
        url: s.url("/slow"),
        request: RequestSpec::default(),
        model: Model::Open {
            schedule: OpenSchedule::ramp(20.0, 0.0, 2.0).unwrap(),
            max_in_flight: 1,
        },
        timeout: None,
        keep_alive: true,
        threads: None,
    };
    let r = run(&spec);
    assert!(r.requests >= 10, "{} requests", r.requests);
    // The server served them one after another: the n-th completed no earlier than n x 100 ms
    // after the start and was due at (n-1) x 50 ms, so its latency is at least
    // n x 100 - (n-1) x 50 ms.
    let n = r.requests as f64;
    let floor = n * 100.0 - (n - 1.0) * 50.0;
    assert!(
        r.latency_ms.max >= floor * 0.999,
        "max {} ms < {floor} ms",
        r.latency_ms.max
    );
    // All but the first arrival found the only connection busy.
    assert!(
        r.late_starts >= r.requests - 1,
        "late {} of {}",
        r.late_starts,
        r.requests
    );
}

#[test]
fn cancel_stops_early_and_reports() {
    let s = Server::start(Behaviour::KeepAlive);
    let spec = LoadSpec {
        url: s.url("/"),
        request: RequestSpec::default(),
        model: Model::Closed {
            schedule: ClosedSchedule::study(),
            wait: Wait::None,
        },
        timeout: None,
        keep_alive: true,
        threads: None,
    };
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let t0 = Instant::now();
    let mut ticks = 0;
    let r = runtime()
        .block_on(load::run(
            &spec,
            &mut |p| {
                ticks += 1;
                if p.elapsed >= Duration::from_millis(1500) {
                    c.cancel();
                }
            },
            cancel,
        ))
        .unwrap();
    assert!(r.stopped_early);
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert!(r.actual_duration_s < 10.0 && r.planned_duration_s == 180.0);
    assert!(ticks >= 2);
    // The study ramp adds 5 users/s: by the time it stopped (at least 1.5 s in) it had started
    // at least 7, and never more than the schedule allows at the moment it stopped.
    let allowed = ClosedSchedule::study().users_at(r.actual_duration_s);
    assert!(
        r.max_users >= 7 && r.max_users <= allowed,
        "{} users, {allowed} allowed",
        r.max_users
    );
    assert!(s.requests() >= r.requests);
}

#[test]
fn io_create_route_posts_the_study_form() {
    // A server that checks the body: title "Post " + 10 letters, content "Content " + 100.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let checker = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let body_start = loop {
            let n = c.read(&mut chunk).unwrap();
            buf.extend_from_slice(&chunk[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..body_start]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap();
        while buf.len() < body_start + len {
            let n = c.read(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        c.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
            .unwrap();
        String::from_utf8(buf).unwrap()
    });
    let mut spec = LoadSpec::study(&format!("http://{addr}"), load::Route::IoCreate);
    spec.model = Model::Closed {
        schedule: ClosedSchedule::new(vec![
            Stage {
                target: 1.0,
                duration_s: 0.0,
            },
            Stage {
                target: 1.0,
                duration_s: 0.3,
            },
        ])
        .unwrap(),
        wait: Wait::None,
    };
    let r = run(&spec);
    let req = checker.join().unwrap();
    assert!(
        req.starts_with("POST /posts/io_create/ HTTP/1.1\r\n"),
        "{req}"
    );
    assert!(req
        .to_ascii_lowercase()
        .contains("content-type: application/x-www-form-urlencoded"));
    let body = &req[req.find("\r\n\r\n").unwrap() + 4..];
    let (title, content) = body.split_once('&').unwrap();
    assert_eq!(title.len(), "title=Post+".len() + 10, "{title}");
    assert_eq!(content.len(), "content=Content+".len() + 100, "{content}");
    // The first request succeeded; the rest met the closed listener.
    assert_eq!(r.status_counts.get("200"), Some(&1));
}

// ---- the command line ----

fn cli(args: &[&str]) -> common::Finished {
    let mut all = vec!["load"];
    all.extend_from_slice(args);
    common::agent_once(&all)
}

fn assert_one_line_error(f: &common::Finished, code: i32, needle: &str) {
    assert_eq!(f.code, Some(code), "stderr: {}", f.stderr);
    let lines: Vec<&str> = f.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {:?}", f.stderr);
    assert!(lines[0].starts_with("awaitlab: error: "), "{}", lines[0]);
    assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
}

#[test]
fn bad_input_gives_one_line_and_exit_64() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["not a url", "--users", "1", "--run-time", "1"],
            "invalid URL",
        ),
        (
            &["https://127.0.0.1:1/", "--users", "1", "--run-time", "1"],
            "unsupported scheme \"https\"",
        ),
        (
            &["ftp://127.0.0.1/", "--users", "1", "--run-time", "1"],
            "unsupported scheme",
        ),
        (
            &["http://127.0.0.1:70000/", "--users", "1", "--run-time", "1"],
            "port out of range",
        ),
        (
            &["http://127.0.0.1:1/", "--stages", "500@"],
            "malformed stage",
        ),
        (
            &["http://127.0.0.1:1/", "--stages", "500@10s,abc"],
            "malformed stage",
        ),
        (
            &["http://127.0.0.1:1/", "--users", "0", "--run-time", "1"],
            "users must be greater than 0",
        ),
        (
            &["http://127.0.0.1:1/", "--users=-5", "--run-time", "1"],
            "users must be greater than 0",
        ),
        (
            &["http://127.0.0.1:1/", "--rate", "0", "--run-time", "1"],
            "rate must be greater than 0",
        ),
        (
            &["http://127.0.0.1:1/", "--rate=-2", "--run-time", "1"],
            "rate must be greater than 0",
        ),
        (
            &[
                "http://127.0.0.1:1/",
                "--users",
                "1",
                "--spawn-rate",
                "0",
                "--run-time",
                "1",
            ],
            "spawn rate must be greater than 0",
        ),
        (
            &["http://127.0.0.1:1/", "--users", "1", "--run-time", "soon"],
            "malformed duration",
        ),
        (
            &["http://127.0.0.1:1/", "--users", "1"],
            "--users needs --run-time",
        ),
        (&["http://127.0.0.1:1/"], "say how much load"),
        (&["http://127.0.0.1:1/", "--profile", "weekly"], "weekly"),
        (
            &["http://127.0.0.1:1/", "--profile", "study", "-H", "nocolon"],
            "malformed header",
        ),
    ];
    for (args, needle) in cases {
        let f = cli(args);
        assert_one_line_error(&f, 64, needle);
    }
}

#[test]
fn unreachable_server_gives_one_line_and_exit_1() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/");
    let f = cli(&[&url, "--users", "1", "--run-time", "1"]);
    assert_one_line_error(&f, 1, "cannot connect to 127.0.0.1");
    assert!(f.stderr.contains("refused"), "{}", f.stderr);
}

#[test]
fn cli_json_and_locust_csv() {
    let s = Server::start(Behaviour::KeepAlive);
    let dir = common::tempdir::TempDir::new("awl-load");
    let prefix = dir.path().join("run");
    let url = s.url("/posts/io_read/");
    let f = cli(&[
        &url,
        "--stages",
        "3@0s,3@1s,0@0s,0@1s",
        "--json",
        "--csv-prefix",
        prefix.to_str().unwrap(),
    ]);
    assert_eq!(f.code, Some(0), "{}", f.stderr);
    let v: serde_json::Value =
        serde_json::from_str(f.stdout.trim()).expect("one JSON document on stdout");
    assert_eq!(v["version"], 2);
    let r: LoadReport = serde_json::from_value(v).expect("the report reads back");
    // The preflight check opened one extra connection but sent no request.
    assert_eq!(r.requests, s.requests());
    assert_eq!(r.name, "/posts/io_read/");
    // A progress line a second on stderr (not a terminal here).
    assert!(
        f.stderr.lines().filter(|l| l.contains("users")).count() >= 1,
        "{}",
        f.stderr
    );
    let stats = std::fs::read_to_string(dir.path().join("run_stats.csv")).unwrap();
    assert!(stats.starts_with("Type,Name,Request Count,Failure Count,Median Response Time,"));
    assert!(
        stats.contains(&format!("GET,/posts/io_read/,{},0,", r.requests)),
        "{stats}"
    );
    let hist = std::fs::read_to_string(dir.path().join("run_stats_history.csv")).unwrap();
    assert!(hist.starts_with("Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,"));
    let last_total: u64 = hist
        .lines()
        .last()
        .unwrap()
        .split(',')
        .nth(17)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(last_total, r.requests);
    let fails = std::fs::read_to_string(dir.path().join("run_failures.csv")).unwrap();
    assert_eq!(fails.trim(), "Method,Name,Error,Occurrences");
}
