//! The benchmark's private network: one namespace joined to the root namespace by a veth pair.
//!
//! Root side 10.231.0.1/30, namespace side 10.231.0.2/30. Everything is removed by the guard's
//! `Drop` (deleting the namespace destroys its veth end, and with it the peer), also on error or
//! panic. This module must not touch any interface, address or namespace it did not create, except
//! `awlbench-<pid>` namespaces whose creating process is gone (leftovers of a killed run), and
//! the processes left inside them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd;

/// The only address benchmark traffic may go to: it lives inside the namespace we create.
pub const NS_ADDR: &str = "10.231.0.2";
const HOST_ADDR: &str = "10.231.0.1";
const SUBNET: &str = "10.231.0.0/30";
const NAME_PREFIX: &str = "awlbench-";

pub struct BenchNetns {
    name: String,
    host_if: String,
}

impl BenchNetns {
    pub fn create() -> Result<Self> {
        let removed = remove_leftovers()?;
        // Someone else's interface on our subnet would make the route (and our traffic) ambiguous.
        // A leftover's veth disappears only once the kernel has torn its namespace down, which
        // happens asynchronously after its last process exits: give that a few seconds.
        let deadline = Instant::now() + Duration::from_secs(if removed { 10 } else { 0 });
        let used = loop {
            let used =
                cmd::output(Command::new("ip").args(["-o", "-4", "addr", "show", "to", SUBNET]))?;
            if used.trim().is_empty() || Instant::now() >= deadline {
                break used;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if !used.trim().is_empty() {
            bail!("{SUBNET} is already in use in the root namespace; not creating the benchmark network:\n{used}");
        }

        let pid = std::process::id();
        let name = format!("{NAME_PREFIX}{pid}");
        // Interface names are limited to 15 bytes; "awl" + a 7-digit pid + "h" fits.
        let host_if = format!("awl{pid}h");
        let ns_if = format!("awl{pid}n");
        cmd::run(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on the guard exists, so any failure below still removes what was made.
        let ns = Self { name, host_if };
        ns.configure(&ns_if)
            .with_context(|| format!("configuring namespace {}", ns.name))?;
        Ok(ns)
    }

    fn configure(&self, ns_if: &str) -> Result<()> {
        let (name, host_if) = (self.name.as_str(), self.host_if.as_str());
        // Creating the peer directly inside the namespace leaves no window where both ends sit
        // in the root namespace.
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", name,
        ])?;
        ip(&["addr", "add", &format!("{HOST_ADDR}/30"), "dev", host_if])?;
        ip(&["link", "set", host_if, "up"])?;
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{NS_ADDR}/30"),
            "dev",
            ns_if,
        ])?;
        ip(&["-n", name, "link", "set", ns_if, "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file that `ip netns add` created; what the agent's `--target`
    /// takes.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `program` run inside the namespace. `ip netns exec` execs it, so the child's pid is the
    /// program's own.
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for BenchNetns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {e:#}");
        }
        // The kernel tears a namespace down asynchronously, so the root end may linger for a
        // moment. Delete it by hand only if it stays (e.g. when the namespace never got its end).
        let exists =
            || cmd::succeeds(Command::new("ip").args(["link", "show", "dev", &self.host_if]));
        let deadline = Instant::now() + Duration::from_secs(3);
        while exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if exists() {
            if let Err(e) = ip(&["link", "del", &self.host_if]) {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    cmd::run(Command::new("ip").args(args))
}

/// Deletes `awlbench-<pid>` namespaces whose process no longer exists: a run killed with SIGKILL
/// cannot run its guards, and its veth would keep our subnet busy. Returns whether it removed any.
fn remove_leftovers() -> Result<bool> {
    let mut removed = false;
    let list = cmd::output(Command::new("ip").args(["netns", "list"]))?;
    for line in list.lines() {
        // Lines look like "awlbench-1234 (id: 0)" or just "awlbench-1234".
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        eprintln!("removing leftover namespace {name} (its process {pid} is gone)");
        // Processes still inside (the killed run's nginx) would keep the namespace, its veth and
        // our subnet alive after `ip netns del`. Only that run could have started them there.
        let pids = cmd::output(Command::new("ip").args(["netns", "pids", name]))?;
        for p in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            eprintln!("killing leftover process {p} in {name}");
            cmd::signal(p, libc::SIGKILL)?;
        }
        ip(&["netns", "del", name])?;
        removed = true;
    }
    Ok(removed)
}
