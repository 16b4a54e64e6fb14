//! `cargo xtask bench delay`: how exact and how cheap the agent's delay injection is.
//!
//! Two private namespaces joined by a veth pair; the target runs a UDP echo and a UDP sink, the
//! client sends paced probes (one packet each way, so a round trip is exactly two packet
//! traversals, one of them through the delay). For each requested delay it runs
//! `awaitlab delay set` and reports the achieved round trip minus the undelayed baseline (p50 and
//! p99 error), the same for TCP request/responses (4 bytes each way on kept connections, against
//! a TCP baseline, and against a reference measured at the same time: a third namespace whose
//! echo holds each request as long itself), then floods the sink at rising rates through a
//! 100 ms delay to find the highest rate held with nothing bypassed and nothing lost, and the
//! delay line's CPU per 10k packets. The netem back end is measured the same way as a peer where
//! the kernel has netem.
//!
//! Traffic stays inside the three namespaces this command creates; they (and the agent) are
//! removed by guards, also on error or Ctrl-C. It reports and never fails a run for missing a
//! target.

use std::fs::{self, File};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde_json::json;

use super::util::{catch_interrupts, check_interrupted};
use crate::cmd::{self, ChildGuard};

#[derive(Args)]
pub struct DelayArgs {
    /// Probes per requested delay (one every 2 ms).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(100..))]
    probes: u32,
    /// Seconds of flood per rate step.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    flood_secs: u32,
}

const REQUESTED_MS: [u32; 4] = [0, 10, 100, 200];
const FLOOD_RATES: [u64; 5] = [25_000, 50_000, 75_000, 100_000, 150_000];
const TARGET_P50_MS: f64 = 0.2;
const TARGET_P99_MS: f64 = 1.0;
const TARGET_PPS: u64 = 50_000;
const TCP_TARGET_P50_MS: f64 = 0.1;
const TCP_TARGET_P99_MS: f64 = 0.5;
const ECHO_PORT: u16 = 7100;
const SINK_PORT: u16 = 7101;
const TCP_ECHO_PORT: u16 = 7102;
/// TCP connections the request/response probes of one side (through the line, or to the
/// reference) are spread over: each waits for its answer before its next request, so under a
/// 200 ms delay 10 connections still send one request every 20 ms between them.
const TCP_CONNS: u32 = 10;
const TARGET_IP: &str = "10.232.0.2";
/// The reference's TCP echo: a third namespace, on a veth of its own, that no line delays.
const REFERENCE_IP: &str = "10.232.0.6";

/// The client and target namespaces and the veth between them (10.232.0.1 client, 10.232.0.2
/// target), and the reference namespace on a second veth from the client (10.232.0.5 client,
/// 10.232.0.6 reference). No address in the root namespace, so parallel runs elsewhere cannot
/// collide.
struct Pair {
    client: String,
    target: String,
    reference: String,
}

impl Pair {
    fn create() -> Result<Pair> {
        let pid = std::process::id();
        // The guard exists before anything is made, so a failure below removes what was made.
        let p = Pair {
            client: format!("awlbd{pid}c"),
            target: format!("awlbd{pid}t"),
            reference: format!("awlbd{pid}r"),
        };
        for ns in [&p.client, &p.target, &p.reference] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        for (peer, (c, c_addr), (t, t_addr)) in [
            (
                &p.target,
                (format!("awlbd{pid}x"), "10.232.0.1/30"),
                (format!("awlbd{pid}y"), "10.232.0.2/30"),
            ),
            (
                &p.reference,
                (format!("awlbd{pid}u"), "10.232.0.5/30"),
                (format!("awlbd{pid}v"), "10.232.0.6/30"),
            ),
        ] {
            ip(&[
                "link", "add", &c, "netns", &p.client, "type", "veth", "peer", "name", &t, "netns",
                peer,
            ])?;
            for (ns, dev, addr) in [(&p.client, &c, c_addr), (peer, &t, t_addr)] {
                ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
                ip(&["-n", ns, "link", "set", dev, "up"])?;
            }
        }
        Ok(p)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Deleting the namespaces deletes the veth pairs with them.
        remove_ns(&self.client);
        remove_ns(&self.target);
        remove_ns(&self.reference);
    }
}

fn remove_ns(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

fn ip(args: &[&str]) -> Result<()> {
    cmd::output(Command::new("ip").args(args)).map(|_| ())
}

/// Runs `f` on a thread inside `/run/netns/NAME`.
fn in_ns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns on an fd we own; it affects only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        Ok(f())
    })
}

/// The target's UDP echo and sink; stopped on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    sunk: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl Servers {
    fn start(pair: &Pair) -> Result<Servers> {
        let stop = Arc::new(AtomicBool::new(false));
        let sunk = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for (port, echo) in [(ECHO_PORT, true), (SINK_PORT, false)] {
            let (s, n) = (stop.clone(), sunk.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            threads.push(in_ns(&pair.target, move || -> () {
                let sock =
                    UdpSocket::bind((TARGET_IP, port)).expect("bind in the target namespace");
                sock.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                set_rcvbuf(&sock, 32 << 20);
                if echo {
                    realtime();
                }
                tx.send(()).unwrap();
                let mut buf = [0u8; 2048];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((len, from)) = sock.recv_from(&mut buf) {
                        if echo {
                            let _ = sock.send_to(&buf[..len], from);
                        } else {
                            n.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
            rx.recv_timeout(Duration::from_secs(5))
                .context("the target's UDP servers did not start")?;
        }
        for (ns, ip) in [(&pair.target, TARGET_IP), (&pair.reference, REFERENCE_IP)] {
            let (s, (tx, rx)) = (stop.clone(), std::sync::mpsc::channel());
            threads.push(in_ns(ns, move || tcp_echo(&s, &tx, ip)));
            rx.recv_timeout(Duration::from_secs(5))
                .with_context(|| format!("the TCP echo at {ip} did not start"))?;
        }
        Ok(Servers {
            stop,
            sunk,
            threads,
        })
    }
}

/// A TCP echo at `ip` (the target's, or the reference's): each connection (TCP_NODELAY) gets
/// its 4-byte requests back, after the hold they ask for, on a real-time thread of its own,
/// until `stop`.
fn tcp_echo(stop: &Arc<AtomicBool>, ready: &std::sync::mpsc::Sender<()>, ip: &str) {
    use std::io::{Read as _, Write as _};
    let l = std::net::TcpListener::bind((ip, TCP_ECHO_PORT)).expect("bind in its namespace");
    l.set_nonblocking(true).unwrap();
    ready.send(()).unwrap();
    std::thread::scope(|sc| {
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut c, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            sc.spawn(move || {
                realtime();
                c.set_nonblocking(false).unwrap();
                c.set_nodelay(true).unwrap();
                // Not a round number of the delays measured: a read timing out while the
                // request is due would add the thread's wake-up to the round trip.
                c.set_read_timeout(Some(Duration::from_millis(1_370)))
                    .unwrap();
                let mut buf = [0u8; 4];
                while !stop.load(Ordering::Relaxed) {
                    match c.read_exact(&mut buf) {
                        Ok(()) => {
                            // The request is the time to hold it here before the echo, in ms:
                            // the reference delay (`tcp_side_by_side`).
                            let hold = u32::from_le_bytes(buf);
                            if hold > 0 {
                                std::thread::sleep(Duration::from_millis(hold.into()));
                            }
                            if c.write_all(&buf).is_err() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
            });
        }
    });
}

/// The line's TCP round trips and the reference's (ms), measured at the same time: `n`
/// request/responses each (4 bytes each way, TCP_NODELAY) from the client namespace, over
/// `TCP_CONNS` connections per side opened first (the handshake is not timed), each sending
/// its next request 2 ms after its last answer. The target's echo answers at once, so with a
/// delay line set those round trips measure the line. The reference's echo holds each request
/// `hold_ms` itself, with no line: a delay of the same length made by this host's timers and
/// wake-ups (see `run`). Measured side by side, both see the host's moment alike; one after
/// the other, the tails of two different moments were compared.
fn tcp_side_by_side(pair: &Pair, n: u32, hold_ms: u32) -> Result<(Vec<f64>, Vec<f64>)> {
    let line = tcp_probe_threads(pair, TARGET_IP, n, 0);
    let reference = tcp_probe_threads(pair, REFERENCE_IP, n, hold_ms);
    // Both joined before either error is returned: no probe thread outlives the call.
    let (line, reference) = (join_rtts(line), join_rtts(reference));
    Ok((line?, reference?))
}

type ProbeThread = std::thread::JoinHandle<Result<Result<Vec<f64>>>>;

/// `TCP_CONNS` threads in the client namespace, each with its connection to `ip`.
fn tcp_probe_threads(pair: &Pair, ip: &'static str, n: u32, hold_ms: u32) -> Vec<ProbeThread> {
    use std::io::{Read as _, Write as _};
    let per = n.div_ceil(TCP_CONNS);
    (0..TCP_CONNS)
        .map(|_| {
            in_ns(&pair.client, move || -> Result<Vec<f64>> {
                realtime();
                let mut c = std::net::TcpStream::connect((ip, TCP_ECHO_PORT))?;
                c.set_nodelay(true)?;
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut rtts = Vec::with_capacity(per as usize);
                let mut buf = [0u8; 4];
                for _ in 0..per {
                    check_interrupted()?;
                    std::thread::sleep(Duration::from_millis(2));
                    let t = Instant::now();
                    c.write_all(&hold_ms.to_le_bytes())?;
                    c.read_exact(&mut buf)?;
                    rtts.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok(rtts)
            })
        })
        .collect()
}

fn join_rtts(threads: Vec<ProbeThread>) -> Result<Vec<f64>> {
    let mut all = Vec::new();
    let mut first_err = None;
    for t in threads {
        match t.join() {
            Ok(Ok(Ok(v))) => all.extend(v),
            Ok(Ok(Err(e)) | Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(anyhow::anyhow!("TCP probe thread panicked"));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(all),
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

/// SCHED_FIFO for the measuring threads (echo server, probe sender and receiver): other work on
/// the host (builds, other benchmarks) would otherwise add its scheduling delays to every figure,
/// and this benchmark measures the delay line, not the host's scheduler. Best effort.
fn realtime() {
    // SAFETY: sched_setscheduler on the calling thread with a valid parameter.
    unsafe {
        let p = libc::sched_param { sched_priority: 5 };
        libc::sched_setscheduler(0, libc::SCHED_FIFO, &p);
    }
}

fn set_rcvbuf(sock: &UdpSocket, bytes: i32) {
    // SAFETY: setsockopt with a valid int option on an fd we own; best effort (root may force).
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &bytes as *const _ as *const libc::c_void,
            4,
        );
    }
}

/// Round trips (ms) of `n` probes sent every 2 ms from the client namespace; lost probes are
/// counted, not timed.
fn probe_rtts(pair: &Pair, n: u32, expect_ms: u32) -> Result<(Vec<f64>, u32)> {
    in_ns(&pair.client, move || -> Result<(Vec<f64>, u32)> {
        let sock = UdpSocket::bind("10.232.0.1:0")?;
        let dst: SocketAddr = format!("10.232.0.2:{ECHO_PORT}").parse()?;
        let t0 = Instant::now();
        let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let rx = sock.try_clone()?;
        rx.set_read_timeout(Some(Duration::from_millis(50)))?;
        let (sa, t0r) = (sent_at.clone(), t0);
        let deadline = Duration::from_millis(u64::from(n) * 2 + u64::from(expect_ms) + 1000);
        realtime();
        let receiver = std::thread::spawn(move || {
            realtime();
            let mut rtts = Vec::new();
            let mut buf = [0u8; 64];
            while t0r.elapsed() < deadline && rtts.len() < n as usize {
                if let Ok(len) = rx.recv(&mut buf) {
                    let now = t0r.elapsed().as_nanos() as u64;
                    if len >= 4 {
                        let i = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
                        let s = sa[i].load(Ordering::Relaxed);
                        rtts.push((now - s) as f64 / 1e6);
                    }
                }
            }
            rtts
        });
        for i in 0..n {
            check_interrupted()?;
            let due = Duration::from_millis(u64::from(i) * 2);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
            sent_at[i as usize].store(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            sock.send_to(&i.to_le_bytes(), dst)?;
        }
        let rtts = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("probe receiver panicked"))?;
        let lost = n - rtts.len() as u32;
        Ok((rtts, lost))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("probe thread panicked"))??
}

/// Sends `rate` packets/s for `secs` to the sink; returns packets sent.
fn flood(pair: &Pair, rate: u64, secs: u32) -> Result<u64> {
    in_ns(&pair.client, move || -> Result<u64> {
        let sock = UdpSocket::bind("10.232.0.1:0")?;
        sock.connect(("10.232.0.2", SINK_PORT))?;
        let payload = [0u8; 64];
        let total = rate * u64::from(secs);
        let t0 = Instant::now();
        let mut sent = 0u64;
        // Paced in bursts of 1 ms so that the rate is steady, not one burst per second.
        while sent < total {
            let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64 + rate / 1000;
            while sent < due.min(total) {
                sock.send(&payload)?;
                sent += 1;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(sent)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("flood thread panicked"))??
}

struct DelaySet {
    guard: ChildGuard,
    out: PathBuf,
    err: PathBuf,
}

impl DelaySet {
    fn start(agent: &Path, pair: &Pair, ms: u32, backend: &str, dir: &Path) -> Result<DelaySet> {
        let out = dir.join(format!("{backend}-{ms}.out"));
        let err = dir.join(format!("{backend}-{ms}.err"));
        let mut c = Command::new(agent);
        c.args([
            "delay",
            "set",
            &format!("netns:{}", pair.target),
            "--ms",
            &ms.to_string(),
            "--backend",
            backend,
        ])
        .stdout(File::create(&out)?)
        .stderr(File::create(&err)?);
        let mut guard = ChildGuard::spawn(
            "awaitlab delay set",
            &mut c,
            libc::SIGTERM,
            Duration::from_secs(10),
        )?;
        let t0 = Instant::now();
        loop {
            let text = fs::read_to_string(&err).unwrap_or_default();
            if text.contains(" set on ") {
                break;
            }
            if let Some(s) = guard.try_wait()? {
                bail!("awaitlab delay set exited ({s}): {}", text.trim());
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "awaitlab delay set did not report: {text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(DelaySet { guard, out, err })
    }

    fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Stops it and returns its summary (`achieved`).
    fn stop(mut self) -> Result<serde_json::Value> {
        let (status, killed) = self.guard.stop()?;
        ensure!(
            !killed && status.success(),
            "awaitlab delay set: {status}: {}",
            fs::read_to_string(&self.err).unwrap_or_default()
        );
        let out = fs::read_to_string(&self.out)?;
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["type"] == "summary")
            .map(|v| v["achieved"].clone())
            .context("no summary from awaitlab delay set")
    }
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// utime+stime of a process in seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / hz
}

fn netem_available() -> bool {
    let name = format!("awlbd{}n", std::process::id());
    if ip(&["netns", "add", &name]).is_err() {
        return false;
    }
    let ok = cmd::succeeds(Command::new("tc").args([
        "-n", &name, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
    ]));
    remove_ns(&name);
    ok
}

pub fn run(args: &DelayArgs) -> Result<()> {
    cmd::become_root("the delay benchmark creates namespaces and iptables rules, and needs root")?;
    // Ctrl-C ends the step in progress with an error, so that the guards remove the namespaces,
    // the rules and the processes (the `awaitlab delay set` children get the terminal's SIGINT
    // too, and remove their own).
    catch_interrupts();
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "agent"]))
        .context("building the agent")?;
    let agent = cmd::target_dir().join("release/awaitlab");
    let out_dir = cmd::target_dir().join("bench/delay");
    fs::create_dir_all(&out_dir)?;
    let pair = Pair::create().context("creating the benchmark namespaces")?;
    let servers = Servers::start(&pair)?;

    let mut backends = vec!["nfqueue"];
    if netem_available() {
        backends.push("netem");
    } else {
        eprintln!("peer: netem is not available on this kernel; nfqueue is measured alone");
    }

    eprintln!("baseline: {} probes without delay", args.probes);
    let (base, base_lost) = probe_rtts(&pair, args.probes, 0)?;
    let base_p50 = quantile(&base, 0.5);
    eprintln!(
        "baseline: {} TCP request/responses without delay",
        args.probes
    );
    let (tcp_base, _) = tcp_side_by_side(&pair, args.probes, 0)?;
    let tcp_base_p50 = quantile(&tcp_base, 0.5);
    let mut results = Vec::new();
    println!("\n                     UDP probes (one packet each way)                         TCP request/response: error against no delay | against the reference");
    println!("requested  backend   achieved p50   error p50   error p99   lost   bypassed   hold p50 (line)   error p50   error p99 |  error p50   error p99");
    for backend in &backends {
        for ms in REQUESTED_MS {
            check_interrupted()?;
            let set = DelaySet::start(&agent, &pair, ms, backend, &out_dir)?;
            let (rtts, lost) = probe_rtts(&pair, args.probes, ms)?;
            // The reference, at the same time: the same requests held as long by its echo
            // server itself (a thread's timer on this host), no line. An ideal network delay
            // would cost the endpoints the same wake-ups after a long idle (measured here at
            // 0.3-0.4 ms each after 100 ms on a 2-core VM, against microseconds on a busy CPU),
            // which the no-delay baseline never pays; the line's own error is what it adds
            // beyond them.
            let (tcp, reference) = tcp_side_by_side(&pair, args.probes, ms)?;
            let summary = set.stop()?;
            let (r50, r99) = (
                quantile(&tcp, 0.5) - quantile(&reference, 0.5),
                quantile(&tcp, 0.99) - quantile(&reference, 0.99),
            );
            let tcp_err: Vec<f64> = tcp
                .iter()
                .map(|r| r - tcp_base_p50 - f64::from(ms))
                .collect();
            let (t50, t99) = (quantile(&tcp_err, 0.5), quantile(&tcp_err, 0.99));
            let achieved: Vec<f64> = rtts.iter().map(|r| r - base_p50).collect();
            let err: Vec<f64> = achieved.iter().map(|a| a - f64::from(ms)).collect();
            let (e50, e99) = (quantile(&err, 0.5), quantile(&err, 0.99));
            let hold = summary["hold"]["p50_us"]
                .as_f64()
                .map_or("-".into(), |h| format!("{:.3} ms", h / 1e3));
            println!(
                "{ms:6} ms  {backend:8} {:10.3} ms {:8.3} ms {:8.3} ms {lost:6} {:10} {hold:>12}   {t50:8.3} ms {t99:8.3} ms | {r50:8.3} ms {r99:8.3} ms",
                quantile(&achieved, 0.5),
                e50,
                e99,
                summary["bypassed"]
            );
            results.push(json!({"backend": backend, "requested_ms": ms, "achieved_p50_ms": quantile(&achieved, 0.5),
                "error_p50_ms": e50, "error_p99_ms": e99, "error_p99_abs_ms": quantile(&err.iter().map(|e| e.abs()).collect::<Vec<_>>(), 0.99),
                "lost": lost, "tcp_error_p50_ms": t50, "tcp_error_p99_ms": t99,
                "tcp_vs_reference_p50_ms": r50, "tcp_vs_reference_p99_ms": r99, "summary": summary}));
        }
    }

    eprintln!("\nflood through a 100 ms delay (nfqueue)");
    println!("\nrate pkt/s   sent      delivered  seen by line  bypassed  line CPU s/10k pkts  agent CPU s/10k pkts");
    let mut floods = Vec::new();
    let mut held = 0u64;
    for rate in FLOOD_RATES {
        check_interrupted()?;
        let set = DelaySet::start(&agent, &pair, 100, "nfqueue", &out_dir)?;
        let cpu0 = cpu_s(set.pid());
        let before = servers.sunk.load(Ordering::Relaxed);
        let sent = flood(&pair, rate, args.flood_secs)?;
        // Let the last 100 ms of packets out of the line before counting.
        std::thread::sleep(Duration::from_millis(400));
        let agent_cpu = cpu_s(set.pid()) - cpu0;
        let summary = set.stop()?;
        let delivered = servers.sunk.load(Ordering::Relaxed) - before;
        let seen = summary["packets_seen"].as_u64().unwrap_or(0);
        let bypassed = summary["bypassed"].as_u64().unwrap_or(u64::MAX);
        let line_cpu = summary["delay_line_cpu_s"].as_f64().unwrap_or(f64::NAN);
        let per10k = |s: f64| s / seen.max(1) as f64 * 1e4;
        println!(
            "{rate:10} {sent:9} {delivered:10} {seen:13} {bypassed:9} {:20.4} {:20.4}",
            per10k(line_cpu),
            per10k(agent_cpu)
        );
        let clean = bypassed == 0 && delivered == sent && seen >= sent;
        if clean {
            held = held.max(rate);
        }
        floods.push(
            json!({"rate": rate, "sent": sent, "delivered": delivered, "seen": seen, "bypassed": bypassed,
            "line_cpu_s_per_10k": per10k(line_cpu), "agent_cpu_s_per_10k": per10k(agent_cpu), "clean": clean}),
        );
        if !clean {
            break;
        }
    }
    drop(servers);
    drop(pair);

    let nfq: Vec<&serde_json::Value> = results
        .iter()
        .filter(|r| r["backend"] == "nfqueue")
        .collect();
    let worst50 = nfq
        .iter()
        .filter_map(|r| r["error_p50_ms"].as_f64())
        .map(f64::abs)
        .fold(0.0, f64::max);
    let worst99 = nfq
        .iter()
        .filter_map(|r| r["error_p99_abs_ms"].as_f64())
        .fold(0.0, f64::max);
    println!(
        "\nbaseline round trip p50 {base_p50:.3} ms, p99 {:.3} ms ({base_lost} lost); TCP request/response p50 {tcp_base_p50:.3} ms, p99 {:.3} ms",
        quantile(&base, 0.99),
        quantile(&tcp_base, 0.99)
    );
    let tcp_worst = |key: &str| {
        nfq.iter()
            .filter_map(|r| r[key].as_f64())
            .map(f64::abs)
            .fold(0.0, f64::max)
    };
    println!(
        "nfqueue TCP request/response against no delay: worst |error p50| {:.3} ms, worst |error p99| {:.3} ms (includes the endpoints' wake-ups after a long idle)",
        tcp_worst("tcp_error_p50_ms"),
        tcp_worst("tcp_error_p99_ms")
    );
    println!(
        "nfqueue TCP request/response against the reference delay: worst |error p50| {:.3} ms (target <= {TCP_TARGET_P50_MS}), worst |error p99| {:.3} ms (target <= {TCP_TARGET_P99_MS})",
        tcp_worst("tcp_vs_reference_p50_ms"),
        tcp_worst("tcp_vs_reference_p99_ms")
    );
    println!(
        "nfqueue: worst |error p50| {worst50:.3} ms (target <= {TARGET_P50_MS}), worst |error| p99 {worst99:.3} ms (target <= {TARGET_P99_MS}), \
         held {held} pkt/s at 100 ms with nothing bypassed (target >= {TARGET_PPS})"
    );
    let summary = json!({"version": 1, "baseline_p50_ms": base_p50, "probes": args.probes, "delays": results, "flood": floods,
        "held_pps": held, "worst_error_p50_ms": worst50, "worst_error_p99_ms": worst99,
        "peer": if backends.len() > 1 { "netem" } else { "none: netem not available on this kernel" }});
    let path = out_dir.join("summary.json");
    fs::write(&path, serde_json::to_vec_pretty(&summary)?)?;
    println!("written to {}", path.display());
    Ok(())
}
