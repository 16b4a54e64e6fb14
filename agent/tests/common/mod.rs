//! Fixtures for the privileged tests: network namespaces and veth pairs that remove themselves,
//! threads that run inside a namespace, small TCP servers with a known behaviour, and the agent
//! run as a child process. Every guard undoes what it made on drop, also when a test panics.
//! Traffic only ever goes to loopback or to addresses inside namespaces made here.
#![allow(dead_code)]

pub mod chromium;
pub mod prom;

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A short unique tag for names (interface names are limited to 15 bytes).
pub fn tag() -> String {
    format!(
        "{:x}{}",
        std::process::id() % 0xfffff,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The loopback address Docker published for `container`'s `port` (such as `8000/tcp`); it
/// changes when the container restarts.
pub fn docker_port(container: &str, port: &str) -> SocketAddr {
    let out = sh("docker", &["port", container, port]);
    let line = out
        .lines()
        .next()
        .unwrap_or_else(|| panic!("{container}: {port} not published"));
    line.trim()
        .parse()
        .unwrap_or_else(|e| panic!("docker port {container} {port}: {line:?}: {e}"))
}

/// The address in the agent's `metrics on http://ADDR/metrics` line, from its stderr so far.
pub fn metrics_addr_in(stderr: &str) -> SocketAddr {
    stderr
        .split_inclusive('\n')
        .find(|l| l.ends_with('\n') && l.contains("metrics on http://"))
        .and_then(|l| l.trim_end().split("http://").nth(1))
        .and_then(|a| a.trim_end_matches("/metrics").parse().ok())
        .unwrap_or_else(|| panic!("no metrics address: {stderr}"))
}

/// `awaitlab run` on the netns back end with the smoke profile, writing under `results`, with
/// `extra` options.
pub fn smoke_run(results: &std::path::Path, extra: &[&str]) -> Command {
    let mut c = Command::new(agent_bin());
    c.args([
        "run",
        "--backend",
        "netns",
        "--profile",
        "smoke",
        "--results",
    ])
    .arg(results)
    .args(extra);
    c
}

/// `ip netns add NAME`, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = format!("awl{prefix}{}", tag());
        sh("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        sh("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, cmd]).args(args);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A veth pair between two namespaces (None = the root namespace), addressed a.b.c.1/30 and
/// a.b.c.2/30. Deleting either end deletes both; the namespaces' removal does it too.
pub struct Veth {
    pub left_ip: String,
    pub right_ip: String,
    left: String,
    left_ns: Option<String>,
}

impl Veth {
    pub fn new(left: Option<&Netns>, right: &Netns, subnet: &str) -> Veth {
        let t = tag();
        let (l, r) = (format!("awl{t}l"), format!("awl{t}r"));
        sh(
            "ip",
            &[
                "link",
                "add",
                &l,
                "type",
                "veth",
                "peer",
                "name",
                &r,
                "netns",
                &right.name,
            ],
        );
        if let Some(ns) = left {
            sh("ip", &["link", "set", &l, "netns", &ns.name]);
        }
        let left_ip = format!("{subnet}.1");
        let right_ip = format!("{subnet}.2");
        let ip_in = |ns: Option<&str>, args: &[&str]| {
            let mut v: Vec<&str> = Vec::new();
            if let Some(n) = ns {
                v.extend(["-n", n]);
            }
            v.extend(args);
            sh("ip", &v);
        };
        let lns = left.map(|n| n.name.as_str());
        ip_in(lns, &["addr", "add", &format!("{left_ip}/30"), "dev", &l]);
        ip_in(lns, &["link", "set", &l, "up"]);
        ip_in(
            Some(&right.name),
            &["addr", "add", &format!("{right_ip}/30"), "dev", &r],
        );
        ip_in(Some(&right.name), &["link", "set", &r, "up"]);
        Veth {
            left_ip,
            right_ip,
            left: l,
            left_ns: left.map(|n| n.name.clone()),
        }
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let mut c = Command::new("ip");
        if let Some(n) = &self.left_ns {
            c.args(["-n", n]);
        }
        let _ = c
            .args(["link", "del", &self.left])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `f` on a new thread that has entered network namespace `ns` (threads it spawns inherit
/// the namespace; sockets it creates belong to it).
pub fn in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = ns.path();
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on an fd we own; affects only this thread.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Accept loop that stops when `stop` is set; each connection gets its own thread.
pub fn serve(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    handler: impl Fn(TcpStream) + Send + Sync + Clone + 'static,
) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                let h = handler.clone();
                std::thread::spawn(move || h(s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A stand-in database: answers each line `q\n` with `r\n` after `delay`. Counts queries, and
/// keeps how long each took from the query's arrival to the answer's send (`dwell`).
pub struct FakeDb {
    pub queries: Arc<AtomicU64>,
    pub dwell: Arc<std::sync::Mutex<Vec<Duration>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDb {
    pub fn start(ns: Option<&Netns>, addr: SocketAddr, delay: Duration) -> FakeDb {
        let queries = Arc::new(AtomicU64::new(0));
        let dwell = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (q, dw, s) = (queries.clone(), dwell.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let body = move || {
            let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            ready_tx.send(()).unwrap();
            serve(l, s, move |conn| {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                let mut line = String::new();
                while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    let t0 = std::time::Instant::now();
                    std::thread::sleep(delay);
                    q.fetch_add(1, Ordering::Relaxed);
                    if w.write_all(b"r\n").is_err() {
                        break;
                    }
                    dw.lock().unwrap().push(t0.elapsed());
                    line.clear();
                }
            });
        };
        let thread = match ns {
            Some(ns) => in_netns(ns, body),
            None => std::thread::spawn(body),
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("fake db did not start");
        FakeDb {
            queries,
            dwell,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeDb {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A synchronous HTTP server: one thread per connection, requests served in order. A request
/// for `/kN` opens one database connection (as Django with CONN_MAX_AGE=0 does), makes N round
/// trips on it, closes it and answers 200. Keep-alive unless the client sends `Connection: close`.
pub struct SyncServer {
    pub requests: Arc<AtomicU64>,
    /// How long each request took, from its first line's arrival to the response's send.
    pub handled: Arc<std::sync::Mutex<Vec<Duration>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SyncServer {
    pub fn start(ns: Option<&Netns>, addr: SocketAddr, db: SocketAddr) -> SyncServer {
        Self::start_with(ns, addr, db, false)
    }

    /// Like `start`, but with one database connection opened at start and shared by every
    /// request (a connection pool of one), so it exists before anything attaches.
    pub fn start_pooled(ns: Option<&Netns>, addr: SocketAddr, db: SocketAddr) -> SyncServer {
        Self::start_with(ns, addr, db, true)
    }

    fn start_with(
        ns: Option<&Netns>,
        addr: SocketAddr,
        db: SocketAddr,
        pooled: bool,
    ) -> SyncServer {
        let requests = Arc::new(AtomicU64::new(0));
        let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, h, s) = (requests.clone(), handled.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let body = move || {
            let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            let pool = Arc::new(std::sync::Mutex::new(pooled.then(|| {
                let c = TcpStream::connect(db).expect("connect db");
                (BufReader::new(c.try_clone().unwrap()), c)
            })));
            ready_tx.send(()).unwrap();
            serve(l, s, move |conn| {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                loop {
                    let mut head = String::new();
                    let mut line = String::new();
                    let mut t0 = None;
                    loop {
                        line.clear();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        t0.get_or_insert_with(std::time::Instant::now);
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let k: u32 = path
                        .strip_prefix("/k")
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(0);
                    let mut pooled_conn = pool.lock().unwrap();
                    if let (true, Some((dr, dw))) = (k > 0, pooled_conn.as_mut()) {
                        let mut reply = String::new();
                        for _ in 0..k {
                            dw.write_all(b"q\n").unwrap();
                            reply.clear();
                            dr.read_line(&mut reply).unwrap();
                        }
                    } else if k > 0 {
                        let db_conn = TcpStream::connect(db).expect("connect db");
                        let mut dr = BufReader::new(db_conn.try_clone().unwrap());
                        let mut dw = db_conn;
                        let mut reply = String::new();
                        for _ in 0..k {
                            dw.write_all(b"q\n").unwrap();
                            reply.clear();
                            dr.read_line(&mut reply).unwrap();
                        }
                    }
                    drop(pooled_conn);
                    n.fetch_add(1, Ordering::Relaxed);
                    let close = head.to_ascii_lowercase().contains("connection: close");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{}\r\nok",
                        if close { "Connection: close\r\n" } else { "" }
                    );
                    let sent = w.write_all(resp.as_bytes()).is_ok();
                    if let Some(t0) = t0 {
                        h.lock().unwrap().push(t0.elapsed());
                    }
                    if !sent || close {
                        return;
                    }
                }
            });
        };
        let thread = match ns {
            Some(ns) => in_netns(ns, body),
            None => std::thread::spawn(body),
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("server did not start");
        SyncServer {
            requests,
            handled,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SyncServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `GET path` on `conn` and reads the whole 2-byte-body response. Returns the status.
pub fn get(conn: &mut TcpStream, path: &str, close: bool) -> u16 {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    );
    conn.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !(buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.ends_with(b"ok")) {
        let n = conn.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "server closed early: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    std::str::from_utf8(&buf[9..12]).unwrap().parse().unwrap()
}

/// The agent binary under test.
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_awaitlab"))
}

/// `awaitlab watch` as a child process; killed on drop if still running.
pub struct Agent {
    /// Program ids the agent reported when it attached.
    pub program_ids: Vec<u32>,
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: tempdir::TempDir,
}

pub mod tempdir {
    /// A temporary directory removed on drop.
    pub struct TempDir(pub std::path::PathBuf);
    impl TempDir {
        pub fn new(prefix: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("{prefix}-{}", super::tag()));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub struct Finished {
    pub program_ids: Vec<u32>,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Asserts the agent's programs are unloaded now that it has exited.
    pub fn assert_detached(&self) {
        assert_programs_gone(&self.program_ids);
    }

    /// NDJSON lines of the given `type`.
    pub fn records(&self, kind: &str) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["type"] == kind)
            .collect()
    }

    pub fn summary(&self) -> serde_json::Value {
        self.records("summary")
            .pop()
            .unwrap_or_else(|| panic!("no summary; stderr: {}", self.stderr))
    }
}

impl Agent {
    /// The address its metrics are served on (`--metrics-addr`).
    pub fn metrics_addr(&self) -> SocketAddr {
        metrics_addr_in(&self.stderr_so_far())
    }

    /// Starts `awaitlab watch ARGS --json` (per-request records) and waits until the probes are
    /// attached.
    pub fn watch(args: &[&str]) -> Agent {
        Agent::start(args, &["--json"])
    }

    /// Starts `awaitlab watch ARGS` in aggregation mode (text on stdout) and waits until the
    /// probes are attached.
    pub fn watch_aggregated(args: &[&str]) -> Agent {
        Agent::start(args, &[])
    }

    fn start(args: &[&str], mode: &[&str]) -> Agent {
        let dir = tempdir::TempDir::new("awl-agent");
        let stdout = dir.path().join("stdout");
        let stderr = dir.path().join("stderr");
        let child = Command::new(agent_bin())
            .arg("watch")
            .args(args)
            .args(mode)
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("start awaitlab");
        let mut a = Agent {
            program_ids: Vec::new(),
            child: Some(child),
            stdout,
            stderr,
            _dir: dir,
        };
        let t0 = Instant::now();
        loop {
            let err = std::fs::read_to_string(&a.stderr).unwrap_or_default();
            // Only a whole line: stderr is unbuffered, so the line may be read half written
            // (its program ids missing).
            let whole = err
                .split_inclusive('\n')
                .find(|l| l.ends_with('\n') && l.contains("attached to network namespace"));
            if let Some(line) = whole.map(str::trim_end) {
                let ids = line.rsplit("program ids ").next().unwrap_or("");
                a.program_ids = ids
                    .split(',')
                    .filter_map(|i| i.trim().parse().ok())
                    .collect();
                return a;
            }
            if let Some(status) = a.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("awaitlab exited ({status}) before attaching: {err}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "awaitlab did not attach: {err}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// What the agent has written to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends SIGINT and collects the output.
    pub fn stop(mut self) -> Finished {
        let child = self.child.as_mut().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        self.wait(Duration::from_secs(30))
    }

    /// Waits for the agent to exit by itself.
    pub fn wait(mut self, limit: Duration) -> Finished {
        let mut child = self.child.take().unwrap();
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed() > limit {
                let _ = child.kill();
                panic!(
                    "awaitlab did not exit within {limit:?}: {}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Finished {
            program_ids: std::mem::take(&mut self.program_ids),
            code: status.code(),
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the agent to completion with `args` (no --json added).
pub fn agent_once(args: &[&str]) -> Finished {
    let out = Command::new(agent_bin())
        .args(args)
        .output()
        .expect("run awaitlab");
    Finished {
        program_ids: Vec::new(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Ids of loaded BPF programs named `awl_*` (awaitlab's).
pub fn our_bpf_programs() -> Vec<u32> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("awl_")))
                .filter_map(|p| p["id"].as_u64().map(|i| i as u32))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that none of `ids` is still loaded (programs unload with the agent's last fd; the
/// kernel frees them asynchronously, so allow a moment). Checking the agent's own ids keeps the
/// check exact while another agent (a benchmark, a parallel checkout's tests) runs.
pub fn assert_programs_gone(ids: &[u32]) {
    assert!(!ids.is_empty(), "no program ids to check");
    let t0 = Instant::now();
    loop {
        let left: Vec<u32> = our_bpf_programs()
            .into_iter()
            .filter(|i| ids.contains(i))
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "BPF programs left behind: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `f` (which must not attach) and asserts it loaded no awaitlab program that outlived it.
pub fn assert_loads_nothing<T>(f: impl FnOnce() -> T) -> T {
    let before = our_bpf_programs();
    let out = f();
    let new: Vec<u32> = our_bpf_programs()
        .into_iter()
        .filter(|i| !before.contains(i))
        .collect();
    assert!(new.is_empty(), "BPF programs left behind: {new:?}");
    out
}
