//! Delay injection into a target's network namespace, with two back ends behind one API:
//! `tc netem` where the kernel has it, and a user-space NFQUEUE delay line where it does not
//! (`line`, fed by marked iptables rules). `set` returns a `DelayGuard` that removes what it
//! installed when dropped (also while unwinding from a panic); `clear`, `show` and
//! `cleanup_leftovers` serve the CLI and a restarted agent.
//!
//! It must never touch a qdisc or rule it did not create: every qdisc has handle `a7a1:` and every
//! rule the comment `awaitlab:<pid>:<id>`, and an owner writes a state file under
//! `/run/awaitlab/delay` *before* installing, so that a killed agent's leftovers are found (and
//! removed) at the next start of any delay command, and a live owner's are left alone.

pub mod iptables;
pub mod line;
pub mod nfq;
mod rtt;
mod state;
pub mod tc;

pub use rtt::RttSample;
use rtt::*;
pub(crate) use state::cleanup_leftovers;
pub use state::OwnerState;
use state::*;

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::probe::namespace::{Target, TargetError};

/// The longest delay accepted: anything longer is a typo, and would hold a queue of minutes.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(60);
/// `MAX_DELAY` in milliseconds, for the interfaces that take whole milliseconds.
pub const MAX_DELAY_MS: u32 = MAX_DELAY.as_millis() as u32;
/// Where owners record what they installed (tmpfs: a reboot clears it with the state itself).
pub(crate) const STATE_DIR: &str = "/run/awaitlab/delay";
/// Queue numbers we try, from here up (an unused range in practice; taken ones are skipped).
const QUEUE_BASE: u16 = 47000;
const QUEUE_TRIES: u16 = 512;

/// Which mechanism to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// netem if the kernel accepts it, else nfqueue.
    Auto,
    /// `tc qdisc ... netem` on the target's interfaces.
    Netem,
    /// iptables NFQUEUE on the target's ingress and a delay line in the agent.
    Nfqueue,
}

/// The mechanism in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Netem,
    Nfqueue,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Netem => "netem",
            Backend::Nfqueue => "nfqueue",
        })
    }
}

/// What to install.
#[derive(Debug, Clone, Default)]
pub struct DelaySpec {
    pub delay: Duration,
    pub jitter: Duration,
    /// Interfaces to delay; empty means every interface but `lo`.
    pub devs: Vec<String>,
    /// The owning process exists only to hold this delay (`awaitlab delay set`), so `clear`
    /// stops it. Otherwise (a runner, the daemon) `clear` removes the rules under the owner.
    pub clear_stops_owner: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DelayError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("delay plus jitter of {} ms is over the {MAX_DELAY_MS} ms maximum", .0.as_secs_f64() * 1e3)]
    TooLong(Duration),
    #[error("target {spec}: no device {dev} in its namespace")]
    NoDevice { spec: String, dev: String },
    #[error("target {spec}: no interface other than lo to delay")]
    NoDevices { spec: String },
    #[error("netem back end: the kernel refused a netem qdisc ({reason}); nothing was changed; use --backend nfqueue or auto")]
    NoNetem { reason: String },
    #[error(
        "target {spec}: device {dev} already has a delay by awaitlab ({owner}); `awaitlab delay clear` removes it"
    )]
    Busy {
        spec: String,
        dev: String,
        owner: String,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("no free NFQUEUE queue number in {QUEUE_BASE}..{}", QUEUE_BASE + QUEUE_TRIES)]
    NoQueue,
}

impl DelayError {
    /// Errors in what the user typed (exit 64), as opposed to the state of the system.
    pub(crate) fn is_usage(&self) -> bool {
        match self {
            DelayError::Target(t) => t.is_usage(),
            DelayError::TooLong(_) | DelayError::NoDevice { .. } => true,
            _ => false,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DelayError {
    let what = what.into();
    move |source| DelayError::Io { what, source }
}

/// Runs `program args` with the host's binary, entered into the namespace `ns`, and returns stdout.
///
/// `nsenter` opens our own fd through `/proc/PID/fd/N` (still the namespace we checked when we
/// opened it). This keeps the spawn a plain `posix_spawn`: a `pre_exec` hook would force a full
/// `fork`, whose page-table copy and copy-on-write faults stall the delay line's threads for
/// milliseconds each time the figures are read.
pub(crate) fn run_in_ns(ns: &File, program: &str, args: &[String]) -> Result<String, DelayError> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!(
        "--net=/proc/{}/fd/{}",
        std::process::id(),
        ns.as_raw_fd()
    ))
    .arg(program)
    .args(args)
    .stdin(Stdio::null());
    let line = format!("{program} {}", args.join(" "));
    let out = cmd
        .output()
        .map_err(io_err(format!("running `nsenter {line}`")))?;
    if !out.status.success() {
        return Err(DelayError::Command {
            cmd: line,
            stderr: String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace('\n', " "),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Interface names of the target namespace, `lo` included.
pub(crate) fn interfaces(target: &Target) -> Result<Vec<String>, DelayError> {
    target
        .run_in(|| {
            let mut names = Vec::new();
            // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
            unsafe {
                let list = libc::if_nameindex();
                if list.is_null() {
                    return Err(std::io::Error::last_os_error());
                }
                let mut p = list;
                while (*p).if_index != 0 {
                    names.push(
                        std::ffi::CStr::from_ptr((*p).if_name)
                            .to_string_lossy()
                            .into_owned(),
                    );
                    p = p.add(1);
                }
                libc::if_freenameindex(list);
            }
            Ok(names)
        })?
        .map_err(io_err("listing interfaces"))
}

/// Whether this kernel accepts a netem qdisc: tried on `lo` of a throwaway namespace that only a
/// short-lived thread lives in, so that nothing of the host or the target changes.
pub(crate) fn netem_available() -> Result<(), String> {
    std::thread::spawn(|| {
        // SAFETY: unshare affects only this thread (network namespaces are per thread).
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "creating a scratch namespace: {}",
                std::io::Error::last_os_error()
            ));
        }
        let ns = File::open("/proc/thread-self/ns/net").map_err(|e| e.to_string())?;
        run_in_ns(
            &ns,
            "tc",
            &tc::add_args("lo", Duration::from_millis(1), Duration::ZERO),
        )
        .map(|_| ())
        .map_err(|e| match e {
            DelayError::Command { stderr, .. } => stderr,
            e => e.to_string(),
        })
    })
    .join()
    .unwrap_or_else(|_| Err("probe thread panicked".into()))
}

/// Resolves `auto`: netem when the kernel has it.
pub(crate) fn choose(choice: BackendChoice) -> Result<Backend, DelayError> {
    match choice {
        BackendChoice::Nfqueue => Ok(Backend::Nfqueue),
        BackendChoice::Netem => netem_available()
            .map(|_| Backend::Netem)
            .map_err(|reason| DelayError::NoNetem { reason }),
        BackendChoice::Auto => Ok(if netem_available().is_ok() {
            Backend::Netem
        } else {
            Backend::Nfqueue
        }),
    }
}

static NEXT_ID: AtomicU32 = AtomicU32::new(1);

/// Requested and achieved delay of one installation.
#[derive(Debug, Clone, Serialize)]
pub struct Achieved {
    pub version: u32,
    pub target: String,
    pub backend: Backend,
    pub devs: Vec<String>,
    pub requested_ms: f64,
    pub jitter_ms: f64,
    pub seconds: f64,
    /// nfqueue only: how long the delay line held each packet.
    pub hold: Option<line::HoldStats>,
    /// nfqueue only: hold p50 minus the requested delay.
    pub hold_error_p50_ms: Option<f64>,
    pub packets_seen: u64,
    /// nfqueue only: packets that came with the kernel's time stamp, so that their hold counts
    /// from their arrival rather than from when the line's reader woke.
    pub packets_stamped: u64,
    /// Packets that matched our rules (iptables counters).
    pub rule_packets: u64,
    /// Packets that passed undelayed: rule counter minus packets the line saw.
    pub bypassed: u64,
    pub id_gaps: u64,
    pub delay_line_cpu_s: f64,
    /// RTT of the target's TCP connections (kernel `tcp_info` via `ss`) before the delay was set.
    pub socket_rtt_before: RttSample,
    /// The same, now.
    pub socket_rtt_now: RttSample,
}

/// An installed delay. Dropping it removes what it installed.
pub struct DelayGuard {
    target: Target,
    ns: File,
    state: OwnerState,
    spec: DelaySpec,
    line: Option<line::DelayLine>,
    started: Instant,
    rtt_before: RttSample,
    removed: bool,
    /// The state file, locked while this owner lives (`state` module).
    lock: Option<File>,
}

impl DelayGuard {
    pub fn backend(&self) -> Backend {
        self.state.backend
    }

    pub(crate) fn devs(&self) -> &[String] {
        &self.state.devs
    }

    pub fn marker(&self) -> &str {
        &self.state.marker
    }

    /// The delay asked for.
    pub fn requested(&self) -> Duration {
        self.spec.delay
    }

    /// The median hold of the packets the delay line released so far (nfqueue), without the
    /// rest of [`DelayGuard::achieved`]'s readings (rule counters, socket round trips); None for
    /// netem, whose holds the agent does not see, or before the first packet.
    pub fn hold_p50(&self) -> Option<Duration> {
        let h = self.line.as_ref()?.holds();
        (h.packets > 0).then(|| Duration::from_secs_f64(h.p50_us / 1e6))
    }

    /// Requested vs achieved, measured now.
    pub fn achieved(&self) -> Achieved {
        let rule_packets = if self.state.backend == Backend::Nfqueue {
            run_in_ns(&self.ns, "iptables", &iptables::counters_args())
                .ok()
                .and_then(|l| iptables::packets(&l, &self.state.marker))
                .unwrap_or(0)
        } else {
            0
        };
        // Read after the rule counter, so a packet counted there has had its chance to arrive.
        let (hold, seen, stamped, gaps, cpu) = match &self.line {
            Some(l) => {
                let c = l.counters();
                (
                    Some(l.holds()),
                    c.seen.load(Ordering::Relaxed),
                    c.stamped.load(Ordering::Relaxed),
                    c.id_gaps.load(Ordering::Relaxed),
                    c.cpu_ns.load(Ordering::Relaxed),
                )
            }
            None => (None, 0, 0, 0, 0),
        };
        let requested_ms = self.spec.delay.as_secs_f64() * 1e3;
        Achieved {
            version: 1,
            target: self.target.spec.clone(),
            backend: self.state.backend,
            devs: self.state.devs.clone(),
            requested_ms,
            jitter_ms: self.spec.jitter.as_secs_f64() * 1e3,
            seconds: self.started.elapsed().as_secs_f64(),
            hold_error_p50_ms: hold
                .filter(|h| h.packets > 0)
                .map(|h| h.p50_us / 1e3 - requested_ms),
            hold,
            packets_seen: seen,
            packets_stamped: stamped,
            rule_packets,
            bypassed: rule_packets.saturating_sub(seen),
            id_gaps: gaps,
            delay_line_cpu_s: cpu as f64 / 1e9,
            socket_rtt_before: self.rtt_before.clone(),
            socket_rtt_now: rtt_sample(&self.ns),
        }
    }

    /// Removes the delay now and returns the final figures.
    pub fn remove(mut self) -> Achieved {
        let a = self.achieved();
        self.teardown();
        a
    }

    fn teardown(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        // Rules first, so nothing new is queued; then the line accepts what it still holds.
        remove_installed(&self.ns, &self.state);
        if let Some(mut l) = self.line.take() {
            l.stop();
        }
        let _ = std::fs::remove_file(self.state.file());
        self.lock = None;
    }
}

impl Drop for DelayGuard {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Installs `spec` on `target`. Leftovers of killed agents are removed first.
pub fn set(
    target: &Target,
    spec: &DelaySpec,
    choice: BackendChoice,
) -> Result<DelayGuard, DelayError> {
    if spec.delay + spec.jitter > MAX_DELAY {
        return Err(DelayError::TooLong(spec.delay + spec.jitter));
    }
    for r in cleanup_leftovers() {
        tracing::info!("removed leftover {r}");
    }
    let ns = target.open()?;
    let present = interfaces(target)?;
    let devs: Vec<String> = if spec.devs.is_empty() {
        present.iter().filter(|d| *d != "lo").cloned().collect()
    } else {
        for d in &spec.devs {
            if !present.contains(d) {
                return Err(DelayError::NoDevice {
                    spec: target.spec.clone(),
                    dev: d.clone(),
                });
            }
        }
        spec.devs.clone()
    };
    if devs.is_empty() {
        return Err(DelayError::NoDevices {
            spec: target.spec.clone(),
        });
    }
    let installed = list_installed(&ns);
    for d in &devs {
        let owner = if let Some(r) = installed.rules.iter().find(|r| &r.dev == d) {
            Some(format!("nfqueue, process {}", r.owner_pid))
        } else if installed.qdiscs.iter().any(|q| &q.dev == d) {
            let pid = OwnerState::all()
                .into_iter()
                .find(|(_, s)| {
                    s.netns_inum == target.netns_inum
                        && s.backend == Backend::Netem
                        && s.devs.contains(d)
                })
                .map_or("unknown process".to_string(), |(_, s)| {
                    format!("process {}", s.pid)
                });
            Some(format!("netem, {pid}"))
        } else {
            None
        };
        if let Some(owner) = owner {
            return Err(DelayError::Busy {
                spec: target.spec.clone(),
                dev: d.clone(),
                owner,
            });
        }
    }
    let backend = choose(choice)?;
    let pid = std::process::id();
    let marker = iptables::marker(pid, NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let rtt_before = rtt_sample(&ns);
    let mut guard = DelayGuard {
        target: target.clone(),
        ns,
        state: OwnerState {
            version: STATE_VERSION,
            pid,
            pid_start: proc_start(pid).unwrap_or(0),
            netns_path: target.netns_path(),
            netns_inum: target.netns_inum,
            backend,
            devs: devs.clone(),
            marker: marker.clone(),
            queue: None,
            created_mangle: false,
            clear_stops_owner: spec.clear_stops_owner,
        },
        spec: spec.clone(),
        line: None,
        started: Instant::now(),
        rtt_before,
        removed: false,
        lock: None,
    };
    match backend {
        Backend::Netem => {
            guard.lock = Some(guard.state.write()?);
            // On error the guard's drop removes the qdiscs already added (only ours, by handle).
            for d in &devs {
                run_in_ns(&guard.ns, "tc", &tc::add_args(d, spec.delay, spec.jitter))?;
            }
        }
        Backend::Nfqueue => {
            let taken: Vec<u16> = run_in_ns(&guard.ns, "iptables", &iptables::list_args())
                .map(|l| queues_named(&l))
                .unwrap_or_default();
            // Sized for twice the peak packet rate over the longest hold (see the module docs).
            let maxlen = tc::limit(spec.delay, spec.jitter).min(u32::MAX as u64) as u32;
            let mut started = None;
            for q in (QUEUE_BASE..QUEUE_BASE + QUEUE_TRIES).filter(|q| !taken.contains(q)) {
                // The socket must be created inside the namespace; it stays bound to it.
                let sock = target
                    .run_in(|| nfq::Socket::new(64 << 20, 100))?
                    .map_err(io_err("creating the netlink socket"))?;
                match line::DelayLine::start(sock, q, maxlen, spec.delay, spec.jitter) {
                    Ok(l) => {
                        started = Some((q, l));
                        break;
                    }
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EBUSY)) => {
                        continue
                    }
                    Err(e) => return Err(io_err(format!("binding NFQUEUE {q}"))(e)),
                }
            }
            let (q, l) = started.ok_or(DelayError::NoQueue)?;
            guard.line = Some(l);
            guard.state.queue = Some(q);
            guard.state.created_mangle = !mangle_exists(&guard.ns);
            guard.lock = Some(guard.state.write()?);
            for d in &devs {
                run_in_ns(&guard.ns, "iptables", &iptables::insert_args(d, &marker, q))?;
            }
        }
    }
    Ok(guard)
}

/// Whether the nf_tables `ip mangle` table exists (true where `nft` is missing or iptables uses
/// the legacy back end, whose tables always exist: then there is nothing to delete later).
fn mangle_exists(ns: &File) -> bool {
    let args: Vec<String> = ["list", "table", "ip", "mangle"].map(String::from).to_vec();
    match run_in_ns(ns, "nft", &args) {
        Ok(_) => true,
        Err(DelayError::Command { stderr, .. }) => !stderr.contains("No such file or directory"),
        Err(_) => true,
    }
}

/// Deletes the `ip mangle` table when no rule is left in any of its chains and every policy is
/// still ACCEPT (what iptables-nft created for us); anything else in it stays.
fn remove_mangle_if_empty(ns: &File) {
    let args: Vec<String> = ["-w", "-t", "mangle", "-S"].map(String::from).to_vec();
    let Ok(listing) = run_in_ns(ns, "iptables", &args) else {
        return;
    };
    let untouched = listing
        .lines()
        .all(|l| l.starts_with("-P ") && l.ends_with(" ACCEPT"));
    if untouched {
        let args: Vec<String> = ["delete", "table", "ip", "mangle"]
            .map(String::from)
            .to_vec();
        if let Err(e) = run_in_ns(ns, "nft", &args) {
            tracing::debug!("{e}");
        }
    }
}

fn queues_named(listing: &str) -> Vec<u16> {
    listing
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter()
                .position(|t| *t == "--queue-num")
                .and_then(|i| w.get(i + 1)?.parse().ok())
        })
        .collect()
}

/// One of our netem qdiscs.
#[derive(Debug, Clone, Serialize)]
pub struct Qdisc {
    pub dev: String,
    pub spec: String,
}

/// What awaitlab has installed in a namespace.
#[derive(Debug, Clone, Serialize)]
pub struct Installed {
    pub version: u32,
    pub target: String,
    pub rules: Vec<RuleShown>,
    pub qdiscs: Vec<Qdisc>,
    pub socket_rtt: RttSample,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleShown {
    #[serde(flatten)]
    pub rule: iptables::Rule,
    pub packets: Option<u64>,
    pub owner_running: bool,
}

impl std::ops::Deref for RuleShown {
    type Target = iptables::Rule;
    fn deref(&self) -> &iptables::Rule {
        &self.rule
    }
}

fn list_installed(ns: &File) -> Installed {
    let owners: Vec<OwnerState> = OwnerState::all().into_iter().map(|(_, s)| s).collect();
    let counters = run_in_ns(ns, "iptables", &iptables::counters_args()).unwrap_or_default();
    let rules = run_in_ns(ns, "iptables", &iptables::list_args())
        .map(|l| iptables::parse_rules(&l))
        .unwrap_or_default()
        .into_iter()
        .map(|rule| RuleShown {
            packets: iptables::packets(&counters, &rule.marker),
            owner_running: owners
                .iter()
                .any(|s| s.marker == rule.marker && s.owner_alive()),
            rule,
        })
        .collect();
    let qdiscs = run_in_ns(ns, "tc", &tc::show_args())
        .map(|l| {
            tc::ours(&l)
                .into_iter()
                .map(|(dev, spec)| Qdisc { dev, spec })
                .collect()
        })
        .unwrap_or_default();
    Installed {
        version: 1,
        target: String::new(),
        rules,
        qdiscs,
        socket_rtt: RttSample::default(),
    }
}

/// What awaitlab has installed in the target, and the RTT its connections see now.
pub fn show(target: &Target) -> Result<Installed, DelayError> {
    for r in cleanup_leftovers() {
        tracing::info!("removed leftover {r}");
    }
    let ns = target.open()?;
    let mut i = list_installed(&ns);
    i.target = target.spec.clone();
    i.socket_rtt = rtt_sample(&ns);
    Ok(i)
}

/// Removes every delay awaitlab installed in the target: a running owner that exists only to
/// hold its delay (`awaitlab delay set`, as its state file records) is asked to stop (SIGTERM)
/// and given 5 s to remove its own; whatever remains is removed here. Other owners, such as an
/// experiment runner using the library, are not signalled: their rules are removed under them.
/// Returns what was removed.
pub fn clear(target: &Target) -> Result<Vec<String>, DelayError> {
    let mut removed = cleanup_leftovers();
    let ns = target.open()?;
    for (path, st) in OwnerState::all() {
        if st.netns_inum != target.netns_inum
            || !st.owner_alive()
            || st.pid == std::process::id()
            || !st.clear_stops_owner
            || proc_start(st.pid) != Some(st.pid_start)
        {
            continue;
        }
        // SAFETY: kill has no memory-safety preconditions; the lock says the owner lives and the
        // start time that the pid is still it.
        unsafe { libc::kill(st.pid as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while path.exists() && st.owner_alive() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !path.exists() {
            removed.push(format!("delay of pid {} (stopped it)", st.pid));
        }
    }
    let now = list_installed(&ns);
    for r in now.rules {
        if run_in_ns(&ns, "iptables", &r.rule.delete).is_ok() {
            removed.push(r.rule.spec);
        }
    }
    for q in now.qdiscs {
        if run_in_ns(&ns, "tc", &tc::del_args(&q.dev)).is_ok() {
            removed.push(q.spec);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_rtts_skip_loopback_peers() {
        let out =
            "0 0 10.0.0.2:8000 10.0.0.1:40112\n\t cubic wscale:7,7 rto:204 rtt:50.4/0.2 ato:40\n\
                   0 0 127.0.0.1:5432 127.0.0.1:5555\n\t cubic rtt:0.02/0.01\n\
                   0 0 [::ffff:10.0.0.2]:80 [::ffff:10.0.0.1]:1\n\t cubic rtt:51/1 minrtt:50\n";
        assert_eq!(parse_ss_rtts(out), vec![50.4, 51.0]);
    }

    #[test]
    fn queue_numbers_in_use_are_found() {
        let l =
            "-A PREROUTING -j NFQUEUE --queue-num 47000\n-A PREROUTING -i x -j NFQUEUE --queue-num 3 --queue-bypass\n";
        assert_eq!(queues_named(l), vec![47000, 3]);
    }

    /// A process started now, whose command name holds ") ", has a start time (clock ticks
    /// since boot) equal to the system's uptime when it started, and later than this test's.
    #[test]
    fn process_start_time_identifies_a_process() {
        let dir = std::env::temp_dir().join(format!("awl-proc-start-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("x) y");
        std::fs::copy("/bin/sleep", &exe).unwrap();
        let uptime = || -> f64 {
            let s = std::fs::read_to_string("/proc/uptime").unwrap();
            s.split_whitespace().next().unwrap().parse().unwrap()
        };
        let before = uptime();
        let mut child = std::process::Command::new(&exe).arg("5").spawn().unwrap();
        let after = uptime();
        let got = proc_start(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let started = got.expect("a start time") as f64 / hz;
        // One tick of resolution either side of the two uptime readings around the spawn.
        assert!(
            started >= before - 1.0 / hz && started <= after + 1.0 / hz,
            "started at {started} s, spawned between {before} and {after} s of uptime"
        );
        assert!(proc_start(std::process::id()).unwrap() as f64 / hz <= started);
        assert_eq!(proc_start(u32::MAX), None, "no such process");
    }
}
