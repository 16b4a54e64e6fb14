//! Privileged tests of `awaitlab delay`: real namespaces, veth pairs, iptables, a real Docker
//! container, and the agent run as a child process. Each test builds what it needs; guards remove
//! it (and any delay still set) also on failure. Traffic goes only to namespaces and containers
//! made here.

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;

/// An echo server (1 byte in, 1 byte out) and a bulk sender in a namespace (or, with `ns_path`,
/// any namespace file), stopped on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn spawn_in(ns_path: &str, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    let path = ns_path.to_string();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on an fd we own; affects only this thread.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns {path}"
        );
        f()
    })
}

impl Servers {
    /// Echo on `ip:7000`, bulk (writes until the peer closes) on `ip:7001`.
    fn start(ns_path: &str, ip: &str) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (port, bulk) in [(7000u16, false), (7001, true)] {
            let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
            let s = stop.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            threads.push(spawn_in(ns_path, move || {
                let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
                tx.send(()).unwrap();
                serve(l, s, move |mut c| {
                    c.set_nodelay(true).unwrap();
                    if bulk {
                        let buf = vec![0u8; 256 * 1024];
                        while c.write_all(&buf).is_ok() {}
                    } else {
                        realtime();
                        let mut b = [0u8; 1];
                        while c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {}
                    }
                });
            }));
            rx.recv_timeout(Duration::from_secs(5))
                .expect("server did not start");
        }
        Servers { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// SCHED_FIFO for a measuring thread (echo handler, jitter client): other builds and tests on a
/// shared 2-core host would otherwise add their scheduling delays to single samples. The tests
/// measure the delay line, not the host's scheduler. Both threads block on I/O, never spin.
fn realtime() {
    // Best effort: below the delay line's own priority (10).
    let _ = awaitlab::delay::line::realtime(5);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median round trip (ms) of `n` one-byte exchanges on one connection, from `client_ns` (None:
/// the root namespace), 10 ms apart so that each is an independent request.
fn echo_rtt_ms(client_ns: Option<&Netns>, server: SocketAddr, n: usize) -> f64 {
    let body = move || {
        realtime();
        let mut c =
            TcpStream::connect_timeout(&server, Duration::from_secs(5)).expect("connect echo");
        c.set_nodelay(true).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut samples = Vec::new();
        let mut b = [7u8; 1];
        for _ in 0..n {
            let t = Instant::now();
            c.write_all(&b).unwrap();
            c.read_exact(&mut b).unwrap();
            samples.push(t.elapsed().as_secs_f64() * 1e3);
            std::thread::sleep(Duration::from_millis(10));
        }
        median(samples)
    };
    match client_ns {
        Some(ns) => in_netns(ns, body).join().unwrap(),
        None => std::thread::spawn(body).join().unwrap(),
    }
}

/// Receives from the bulk server for `secs` with the receive window clamped to `window` bytes.
/// Returns bytes/s over the part after `warmup` (slow start excluded).
fn bulk_rate(
    client_ns: &Netns,
    server: SocketAddr,
    window: u32,
    warmup: Duration,
    secs: Duration,
) -> f64 {
    in_netns(client_ns, move || {
        let s = socket_with_clamp(window);
        let mut c = connect(s, server);
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let t0 = Instant::now();
        let mut counted = 0u64;
        let mut start = None;
        while t0.elapsed() < warmup + secs {
            let n = c.read(&mut buf).expect("bulk read");
            assert!(n > 0, "bulk server closed");
            if t0.elapsed() >= warmup {
                start.get_or_insert_with(Instant::now);
                counted += n as u64;
            }
        }
        counted as f64 / start.map_or(1e-9, |s| s.elapsed().as_secs_f64())
    })
    .join()
    .unwrap()
}

/// A TCP socket whose advertised receive window never exceeds `window` (TCP_WINDOW_CLAMP), set
/// before connecting so that it holds from the handshake on.
fn socket_with_clamp(window: u32) -> i32 {
    // SAFETY: plain socket/setsockopt calls with valid arguments.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let v = window as libc::c_int;
        let r = libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_WINDOW_CLAMP,
            &v as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
        assert_eq!(r, 0, "TCP_WINDOW_CLAMP");
        fd
    }
}

fn connect(fd: i32, addr: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(a) = addr else {
        panic!("v4 only")
    };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: fd is a fresh socket; sa is a valid sockaddr_in.
    let r = unsafe {
        libc::connect(
            fd,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    assert_eq!(r, 0, "connect {addr}: {}", std::io::Error::last_os_error());
    // SAFETY: we own fd and hand it to the stream.
    unsafe { TcpStream::from_raw_fd(fd) }
}

/// `awaitlab delay set ...` as a child; SIGKILLed on drop if still running (the next delay
/// command then removes its leftovers, which the guard also does).
struct DelaySet {
    child: Option<Child>,
    dir: tempdir::TempDir,
    target: String,
}

struct SetResult {
    code: Option<i32>,
    stderr: String,
    summary: serde_json::Value,
}

impl DelaySet {
    fn start(target: &str, args: &[&str]) -> DelaySet {
        DelaySet::start_after(&[], target, args)
    }

    /// `awaitlab GLOBAL_FLAGS delay set TARGET ARGS`.
    fn start_after(global: &[&str], target: &str, args: &[&str]) -> DelaySet {
        let dir = tempdir::TempDir::new("awl-delay");
        let child = Command::new(agent_bin())
            .args(global)
            .args(["delay", "set", target])
            .args(args)
            .stdout(std::fs::File::create(dir.path().join("out")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("err")).unwrap())
            .spawn()
            .expect("start awaitlab delay set");
        let mut d = DelaySet {
            child: Some(child),
            dir,
            target: target.into(),
        };
        let t0 = Instant::now();
        loop {
            let err = d.stderr();
            if err.contains(" set on ") {
                return d;
            }
            if let Some(s) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("delay set exited ({s}) before setting: {err}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "delay set did not report: {err}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("err")).unwrap_or_default()
    }

    /// Waits for the child to exit (after SIGTERM or `delay clear`) and reads its summary.
    fn wait(mut self, signal: Option<i32>) -> SetResult {
        let mut child = self.child.take().unwrap();
        if let Some(sig) = signal {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, sig) };
        }
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "delay set did not stop: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = std::fs::read_to_string(self.dir.path().join("out")).unwrap_or_default();
        let summary = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["type"] == "summary")
            .map(|v| v["achieved"].clone())
            .unwrap_or(serde_json::Value::Null);
        SetResult {
            code: status.code(),
            stderr: self.stderr(),
            summary,
        }
    }
}

impl Drop for DelaySet {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = Command::new(agent_bin())
                .args(["delay", "clear", &self.target])
                .output();
        }
    }
}

/// Our rules (comment awaitlab:...) in the namespace's mangle table.
fn awaitlab_rules(ns_path: &str) -> Vec<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={ns_path}"))
        .args(["iptables", "-w", "-t", "mangle", "-S"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "iptables -S: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("awaitlab:"))
        .map(String::from)
        .collect()
}

/// Everything a delay could change in a namespace: its iptables rules and qdiscs.
fn net_state(ns_path: &str) -> String {
    let run = |args: &[&str]| {
        let out = Command::new("nsenter")
            .arg(format!("--net={ns_path}"))
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["iptables-save"])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        + &run(&["tc", "qdisc", "show"])
}

fn state_files_of(pid: u32) -> Vec<String> {
    std::fs::read_dir("/run/awaitlab/delay")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{pid}-")))
                .collect()
        })
        .unwrap_or_default()
}

fn delay_cmd(args: &[&str]) -> Finished {
    let mut full = vec!["delay"];
    full.extend_from_slice(args);
    agent_once(&full)
}

/// A client namespace and a server (target) namespace joined by a veth pair; servers in the
/// target.
struct Pair {
    client: Netns,
    target: Netns,
    link: Veth,
    _servers: Servers,
}

impl Pair {
    fn new(subnet: &str) -> Pair {
        let client = Netns::new("c");
        let target = Netns::new("t");
        let link = Veth::new(Some(&client), &target, subnet);
        let servers = Servers::start(&target.path(), &link.right_ip);
        Pair {
            client,
            target,
            link,
            _servers: servers,
        }
    }
    fn echo(&self) -> SocketAddr {
        format!("{}:7000", self.link.right_ip).parse().unwrap()
    }
    fn bulk(&self) -> SocketAddr {
        format!("{}:7001", self.link.right_ip).parse().unwrap()
    }
    fn spec(&self) -> String {
        format!("netns:{}", self.target.name)
    }
}

const DELAY_MS: f64 = 50.0;

/// A request/response client sees its round trip grow by the delay; `clear` (from another
/// process) stops the running `delay set`, which removes its rule, and the baseline returns.
/// The owner was started with a global flag before its subcommand: `clear` knows it from its
/// state file, not from its command line.
#[test]
fn nfqueue_adds_the_delay_to_round_trips_and_clear_restores_the_baseline() {
    let p = Pair::new("10.211.1");
    let base = echo_rtt_ms(Some(&p.client), p.echo(), 40);
    let set = DelaySet::start_after(
        &["--log-format", "plain"],
        &p.spec(),
        &["--ms", "50", "--backend", "nfqueue"],
    );
    assert!(set.stderr().contains("backend nfqueue"), "{}", set.stderr());
    assert_eq!(
        awaitlab_rules(&p.target.path()).len(),
        1,
        "one rule for the one veth"
    );
    let delayed = echo_rtt_ms(Some(&p.client), p.echo(), 40);
    let added = delayed - base;
    // Lower bound: the line never releases before arrival + 50 ms (absolute timer), so only the
    // baseline's own spread (tens of µs here) can take the difference below 50 ms.
    // Upper bound: release lateness is timer wakeup plus scheduling on a 2-core host that other
    // builds share; the median of 40 stays well within 3 ms even then (the benchmark measures it
    // precisely, at ~0.1 ms).
    assert!(
        (DELAY_MS - 0.3..DELAY_MS + 3.0).contains(&added),
        "base {base:.3} ms, delayed {delayed:.3} ms, added {added:.3} ms"
    );

    // A second delay on the same device is refused, naming the owner, and changes nothing.
    let again = delay_cmd(&["set", &p.spec(), "--ms", "10", "--backend", "nfqueue"]);
    assert_eq!(again.code, Some(1), "{}", again.stderr);
    assert!(
        again.stderr.contains(&format!(
            "already has a delay by awaitlab (nfqueue, process {})",
            set.pid()
        )),
        "{}",
        again.stderr
    );
    assert_eq!(awaitlab_rules(&p.target.path()).len(), 1);

    let pid = set.pid();
    let cleared = delay_cmd(&["clear", &p.spec()]);
    assert_eq!(cleared.code, Some(0), "{}", cleared.stderr);
    let r = set.wait(None);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        awaitlab_rules(&p.target.path()).is_empty(),
        "rule left after clear"
    );
    assert!(
        state_files_of(pid).is_empty(),
        "state file left after clear"
    );
    // Every packet that matched the rule was seen by the line (independent count: iptables).
    assert_eq!(r.summary["bypassed"], 0, "{}", r.summary);
    // Each of the 40 requests is its own packet into the target.
    assert!(
        r.summary["rule_packets"].as_u64().unwrap() >= 40,
        "{}",
        r.summary
    );
    let after = echo_rtt_ms(Some(&p.client), p.echo(), 40);
    // Undelayed again: well under the 50 ms; 2 ms leaves room for a busy host, not for a hold.
    assert!(
        after < base + 2.0,
        "base {base:.3} ms, after clear {after:.3} ms"
    );
}

/// Jitter: each round trip grows by 20 ms ± 5 ms (uniform), so they spread over that range.
#[test]
fn nfqueue_jitter_spreads_round_trips_over_the_requested_range() {
    let p = Pair::new("10.211.6");
    let base = echo_rtt_ms(Some(&p.client), p.echo(), 20);
    let set = DelaySet::start(
        &p.spec(),
        &["--ms", "20", "--jitter-ms", "5", "--backend", "nfqueue"],
    );
    let samples = in_netns(&p.client, {
        let echo = p.echo();
        move || {
            realtime();
            let mut c = TcpStream::connect(echo).unwrap();
            c.set_nodelay(true).unwrap();
            let mut b = [1u8; 1];
            (0..80)
                .map(|_| {
                    let t = Instant::now();
                    c.write_all(&b).unwrap();
                    c.read_exact(&mut b).unwrap();
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    // Longer than the widest hold, so no packet waits behind another (which
                    // the line's no-reordering rule would otherwise allow).
                    std::thread::sleep(Duration::from_millis(30));
                    ms
                })
                .collect::<Vec<f64>>()
        }
    })
    .join()
    .unwrap();
    let r = set.wait(Some(libc::SIGTERM));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let mut added: Vec<f64> = samples.iter().map(|s| s - base).collect();
    added.sort_by(f64::total_cmp);
    let q = |f: f64| added[((added.len() - 1) as f64 * f) as usize];
    // Never released early (absolute timer): even the smallest is at least 15 ms minus the
    // baseline's spread. Late by at most the 3 ms scheduling allowance of the 50 ms test, for
    // all but the slowest 5 % (the client thread itself is not real-time on a shared host).
    assert!(
        q(0.0) >= 15.0 - 0.3 && q(0.95) <= 25.0 + 3.0,
        "added delay: min {:.3}, p95 {:.3} ms",
        q(0.0),
        q(0.95)
    );
    // Uniform over 10 ms, p10 to p90 spans 8 ms; 5 ms leaves room for sampling error with 80
    // draws. A line that ignored jitter would spread by well under 1 ms.
    assert!(
        q(0.9) - q(0.1) >= 5.0,
        "added delay p10 {:.3}, p90 {:.3} ms: no jitter",
        q(0.1),
        q(0.9)
    );
}

/// A bulk transfer through the delay keeps the rate its window allows: held packets are ingress
/// packets of the target, not the sender's own (which would stay charged to its socket and cut
/// TCP to ~2 packets per delay period).
#[test]
fn nfqueue_bulk_transfer_keeps_its_window_rate() {
    let p = Pair::new("10.211.2");
    let set = DelaySet::start(&p.spec(), &["--ms", "50", "--backend", "nfqueue"]);
    let rtt = echo_rtt_ms(Some(&p.client), p.echo(), 10) / 1e3;
    // The receiver clamps its window to 256 KiB, so the best TCP can do is window / RTT
    // (5.2 MB/s at 50 ms). Slow start needs ~5 RTTs from 10 segments to the full window; skip
    // 1 s. The collapse this guards against gives ~2 x 1448 B / 50 ms = 58 kB/s, 1 % of the
    // bound. 75 % leaves room for ACK clocking and the window opening in steps.
    let window = 256 * 1024;
    let bound = window as f64 / rtt;
    let rate = bulk_rate(
        &p.client,
        p.bulk(),
        window,
        Duration::from_secs(1),
        Duration::from_secs(3),
    );
    let r = set.wait(Some(libc::SIGTERM));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        rate >= 0.75 * bound,
        "rate {:.0} B/s, window/RTT bound {bound:.0} B/s (rtt {:.1} ms)",
        rate,
        rtt * 1e3
    );
    assert_eq!(r.summary["bypassed"], 0, "{}", r.summary);
    assert!(awaitlab_rules(&p.target.path()).is_empty());
}

/// `kill -9` leaves the rule (packets pass undelayed thanks to --queue-bypass); the next start of
/// any delay command removes it, and a rule someone else made stays.
#[test]
fn leftovers_of_a_killed_agent_are_removed_at_the_next_start() {
    let p = Pair::new("10.211.3");
    let ns = p.target.path();
    let foreign = [
        "-w",
        "-t",
        "mangle",
        "-A",
        "PREROUTING",
        "-i",
        "lo",
        "-m",
        "comment",
        "--comment",
        "someone-else",
        "-j",
        "ACCEPT",
    ];
    sh(
        "nsenter",
        &[
            &[format!("--net={ns}").as_str(), "iptables"][..],
            &foreign[..],
        ]
        .concat(),
    );
    let mut set = DelaySet::start(&p.spec(), &["--ms", "50", "--backend", "nfqueue"]);
    let pid = set.pid();
    let mut child = set.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let left = awaitlab_rules(&ns);
    assert_eq!(
        left.len(),
        1,
        "the killed agent's rule should still be there: {left:?}"
    );
    assert!(left[0].contains(&format!("awaitlab:{pid}:")), "{left:?}");
    assert_eq!(state_files_of(pid).len(), 1);
    // Fail-open while nobody listens: the round trip is undelayed, not black-holed.
    let rtt = echo_rtt_ms(Some(&p.client), p.echo(), 5);
    assert!(
        rtt < 10.0,
        "rtt {rtt:.3} ms with the killed agent's rule in place"
    );

    let shown = delay_cmd(&["show", &p.spec()]);
    assert_eq!(shown.code, Some(0), "{}", shown.stderr);
    assert!(
        awaitlab_rules(&ns).is_empty(),
        "leftover not removed: {:?}",
        awaitlab_rules(&ns)
    );
    assert!(state_files_of(pid).is_empty());
    let state = net_state(&ns);
    assert!(
        state.contains("someone-else"),
        "a foreign rule was touched:\n{state}"
    );
}

fn kernel_has_netem() -> bool {
    // On lo of a scratch namespace: nothing shared is touched.
    let ns = Netns::new("nm");
    Command::new("tc")
        .args([
            "-n", &ns.name, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
        ])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// `--backend netem`: where the kernel has no netem, one clear line and nothing changed; where it
/// has, our marked qdisc with the raised limit, removed on exit.
#[test]
fn netem_backend_fails_clearly_without_netem_and_changes_nothing() {
    let p = Pair::new("10.211.4");
    let ns = p.target.path();
    let before = net_state(&ns);
    if kernel_has_netem() {
        let set = DelaySet::start(&p.spec(), &["--ms", "100", "--backend", "netem"]);
        let q = net_state(&ns);
        assert!(
            q.contains("qdisc netem a7a1:") && q.contains("limit 20000"),
            "{q}"
        );
        let r = set.wait(Some(libc::SIGTERM));
        assert_eq!(r.code, Some(0), "{}", r.stderr);
    } else {
        let out = delay_cmd(&["set", &p.spec(), "--ms", "100", "--backend", "netem"]);
        assert_eq!(out.code, Some(1), "{}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
        assert!(
            out.stderr.contains("netem") && out.stderr.contains("nothing was changed"),
            "{}",
            out.stderr
        );
        // auto falls back to nfqueue and says so.
        let set = DelaySet::start(&p.spec(), &["--ms", "5"]);
        assert!(set.stderr().contains("backend nfqueue"), "{}", set.stderr());
        let r = set.wait(Some(libc::SIGINT));
        assert_eq!(r.code, Some(0), "{}", r.stderr);
    }
    assert_eq!(net_state(&ns), before);
}

/// Bad input: one clear line each, 64 for usage errors, and nothing changed.
#[test]
fn bad_input_is_one_clear_line_and_changes_nothing() {
    let p = Pair::new("10.211.5");
    let ns = p.target.path();
    let before = net_state(&ns);
    let spec = p.spec();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["set", &spec, "--ms", "-5"], 64, "negative"),
        (vec!["set", &spec, "--ms", "abc"], 64, "not a number"),
        (vec!["set", &spec, "--ms", "60001"], 64, "60000 ms maximum"),
        (
            vec!["set", &spec, "--ms", "10", "--jitter-ms", "-1"],
            64,
            "negative",
        ),
        (
            vec!["set", &spec, "--ms", "59999", "--jitter-ms", "10"],
            64,
            "delay plus jitter of 60009 ms is over the 60000 ms maximum",
        ),
        (
            vec!["set", &spec, "--ms", "10", "--dev", "awlnosuchdev"],
            64,
            "no device awlnosuchdev",
        ),
        (
            vec!["set", &spec, "--ms", "10", "--backend", "carrier-pigeon"],
            64,
            "carrier-pigeon",
        ),
        (
            vec!["set", "docker:awl-no-such-container-xyz", "--ms", "10"],
            1,
            "no such container",
        ),
        (
            vec!["set", "/proc/self/status", "--ms", "10"],
            1,
            "not a network namespace",
        ),
        (
            vec!["set", "/run/netns/awl-does-not-exist", "--ms", "10"],
            1,
            "does not exist",
        ),
        (vec!["set", "netns:", "--ms", "10"], 64, "expected"),
        (vec!["clear", "pid:abc"], 64, "expected"),
        (
            vec!["show", "docker:awl-no-such-container-xyz"],
            1,
            "no such container",
        ),
    ];
    for (args, code, needle) in cases {
        let out = delay_cmd(&args);
        assert_eq!(out.code, Some(code), "{args:?}: {}", out.stderr);
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "{args:?}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.starts_with("awaitlab: error: "),
            "{args:?}: {}",
            out.stderr
        );
    }
    assert_eq!(net_state(&ns), before, "bad input changed the target");
}

/// A tiny image built on the locally made base image, a network and a container, all removed on
/// drop.
struct Container {
    name: String,
    image: String,
    network: String,
}

fn docker(args: &[&str]) -> String {
    sh("docker", args).trim().to_string()
}

impl Container {
    fn start(running: bool) -> Container {
        let base = "awaitlab/base:bookworm";
        assert!(
            Command::new("docker")
                .args(["image", "inspect", base])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success(),
            "{base} is missing: run `cargo xtask base-image` (cargo xtask test does)"
        );
        let t = tag();
        let c = Container {
            name: format!("awl{t}"),
            image: format!("awaitlab/delay-test:{t}"),
            network: format!("awl{t}net"),
        };
        let mut build = Command::new("docker")
            .args(["build", "-q", "-t", &c.image, "-"])
            .env("DOCKER_BUILDKIT", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        build
            .stdin
            .take()
            .unwrap()
            .write_all(format!("FROM {base}\nCMD [\"sleep\", \"infinity\"]\n").as_bytes())
            .unwrap();
        let out = build.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "docker build: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        docker(&["network", "create", &c.network]);
        if running {
            docker(&[
                "run",
                "-d",
                "--name",
                &c.name,
                "--network",
                &c.network,
                &c.image,
            ]);
        } else {
            docker(&[
                "create",
                "--name",
                &c.name,
                "--network",
                &c.network,
                &c.image,
            ]);
        }
        c
    }

    fn pid(&self) -> u32 {
        docker(&["inspect", "-f", "{{.State.Pid}}", &self.name])
            .parse()
            .unwrap()
    }

    fn ip(&self) -> String {
        docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &self.name,
        ])
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let q = |args: &[&str]| {
            let _ = Command::new("docker")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        q(&["rm", "-f", &self.name]);
        q(&["network", "rm", &self.network]);
        q(&["image", "rm", "-f", &self.image]);
    }
}

/// `docker:NAME`: the delay is set inside the container's namespace from the host (the rule is
/// there, a round trip from the host into the container grows by the delay) and cleared. A
/// stopped container is a clear error that changes nothing.
#[test]
fn docker_target_gets_a_delay_set_and_cleared_from_the_host() {
    let stopped = Container::start(false);
    let out = delay_cmd(&["set", &format!("docker:{}", stopped.name), "--ms", "10"]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("not running") && out.stderr.trim().lines().count() == 1,
        "{}",
        out.stderr
    );
    drop(stopped);

    let c = Container::start(true);
    let ns = format!("/proc/{}/ns/net", c.pid());
    // The echo server runs inside the container's namespace (the image has no tools of its own);
    // the host reaches it on the network this test created.
    let _servers = Servers::start(&ns, &c.ip());
    let echo: SocketAddr = format!("{}:7000", c.ip()).parse().unwrap();
    let base = echo_rtt_ms(None, echo, 30);
    let spec = format!("docker:{}", c.name);
    let set = DelaySet::start(&spec, &["--ms", "50"]);
    let rules = awaitlab_rules(&ns);
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert!(rules[0].contains("-i eth0"), "{rules:?}");
    let delayed = echo_rtt_ms(None, echo, 30);
    // Same bounds and reasons as the namespace test.
    assert!(
        (DELAY_MS - 0.3..DELAY_MS + 3.0).contains(&(delayed - base)),
        "base {base:.3} ms, delayed {delayed:.3} ms"
    );
    let shown = delay_cmd(&["show", &spec]);
    assert!(
        shown.stdout.contains("nfqueue awaitlab:") && shown.stdout.contains("on eth0"),
        "{}",
        shown.stdout
    );
    let cleared = delay_cmd(&["clear", &spec]);
    assert_eq!(cleared.code, Some(0), "{}", cleared.stderr);
    let r = set.wait(None);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(awaitlab_rules(&ns).is_empty());
    let after = echo_rtt_ms(None, echo, 30);
    assert!(
        after < base + 2.0,
        "base {base:.3} ms, after clear {after:.3} ms"
    );
    assert!(Path::new(&ns).exists());
}

/// The library API the experiment runner uses: the guard installs the delay, reports what it
/// achieved, and removes its rule when its owner panics.
#[test]
fn the_library_guard_removes_its_delay_when_the_owner_panics() {
    use awaitlab::delay::{self, Backend, BackendChoice, DelaySpec};
    let p = Pair::new("10.211.7");
    let target = awaitlab::probe::namespace::Target::resolve(&p.spec()).unwrap();
    let spec = DelaySpec {
        delay: Duration::from_millis(30),
        ..Default::default()
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let guard = delay::set(&target, &spec, BackendChoice::Nfqueue).expect("set");
        assert_eq!(guard.backend(), Backend::Nfqueue);
        assert_eq!(awaitlab_rules(&p.target.path()).len(), 1);
        let rtt = echo_rtt_ms(Some(&p.client), p.echo(), 10);
        // As in the 50 ms test: never early, at most 3 ms late at the median.
        assert!(
            (30.0 - 0.3..33.0).contains(&rtt),
            "rtt {rtt:.3} ms through a 30 ms delay"
        );
        let a = guard.achieved();
        // Each of the 10 requests is a packet into the target; the iptables counter agrees.
        assert!(
            a.packets_seen >= 10 && a.bypassed == 0 && a.rule_packets >= 10,
            "{a:?}"
        );
        // The line keeps the kernel's receive time stamps on: every packet came with one.
        assert_eq!(a.packets_stamped, a.packets_seen, "{a:?}");
        panic!("owner fails");
    }));
    let msg = outcome
        .expect_err("the closure panics")
        .downcast::<&str>()
        .map(|m| *m)
        .unwrap_or("another panic");
    assert_eq!(msg, "owner fails", "a check inside failed first");
    assert!(
        awaitlab_rules(&p.target.path()).is_empty(),
        "rule left after the panic"
    );
    assert!(
        state_files_of(std::process::id()).is_empty(),
        "state file left after the panic"
    );
    let after = echo_rtt_ms(Some(&p.client), p.echo(), 10);
    assert!(after < 2.0, "rtt {after:.3} ms after the guard was dropped");
}

/// An owner is alive exactly while it holds the lock on its state file, whatever its pid and
/// command line: a state file that names this living test process (with its real start time)
/// but is not locked is a dead owner's, and `delay show` removes it; locked by this process it
/// is kept, and removed once the lock goes. An older agent's state (version 1, no lock) counts
/// as alive while its pid runs, so an upgrade does not remove a live owner's delay. The state
/// directory is private (0700).
#[test]
fn an_owner_lives_exactly_while_it_holds_its_lock() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let ns = Netns::new("lk");
    let pid = std::process::id();
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let start: u64 = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    let mut state = serde_json::json!({
        "version": 2,
        "pid": pid,
        "pid_start": start,
        "netns_path": ns.path(),
        "netns_inum": std::fs::metadata(ns.path()).unwrap().ino() as u32,
        "backend": "netem",
        "devs": [],
        "marker": format!("awaitlab:{pid}:4242"),
        "queue": null,
    });
    let dir = Path::new("/run/awaitlab/delay");
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("{pid}-4242.json"));
    let show = || {
        let out = delay_cmd(&["show", &format!("netns:{}", ns.name)]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
    };

    std::fs::write(&path, state.to_string()).unwrap();
    show();
    assert!(!path.exists(), "an unlocked state file is a dead owner's");

    std::fs::write(&path, state.to_string()).unwrap();
    let held = std::fs::File::open(&path).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
    show();
    assert!(path.exists(), "a locked state file is a live owner's");
    drop(held);
    show();
    assert!(!path.exists(), "the lock went with its holder");

    state["version"] = 1.into();
    std::fs::write(&path, state.to_string()).unwrap();
    show();
    assert!(path.exists(), "an older agent's owner, alive by its pid");
    std::fs::remove_file(&path).unwrap();

    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{mode:o}");
}
