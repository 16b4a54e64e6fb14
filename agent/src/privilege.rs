//! The one privilege check. Each command that loads eBPF, reads or enters other network
//! namespaces, or changes qdiscs and iptables rules names the Linux capabilities it needs and
//! calls `require` before it changes anything; a process without one of them gets one line
//! naming each missing capability and exit 77 (`EXIT_NOPERM`). Root has them all; a service or
//! container can hold just these (the systemd unit and the DaemonSet in `deploy/` do).
//!
//! The system under test (`run`, `sut`) creates users, namespaces and processes of other users:
//! it asks for root ([`Need::Root`]).

/// A Linux capability the agent may need (numbers from linux/capability.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// tc and iptables rules, NFQUEUE, veths.
    NetAdmin = 12,
    /// Another user's /proc/PID/ns/net (ptrace read access).
    SysPtrace = 19,
    /// setns into another network namespace; also stands in for CAP_BPF and CAP_PERFMON on
    /// kernels before 5.8, as the kernel accepts it for both.
    SysAdmin = 21,
    /// Loading tracing programs reads kernel memory and attaches to tracepoints.
    Perfmon = 38,
    /// Creating maps and loading programs.
    Bpf = 39,
}

impl Cap {
    pub fn name(self) -> &'static str {
        match self {
            Cap::NetAdmin => "CAP_NET_ADMIN",
            Cap::SysPtrace => "CAP_SYS_PTRACE",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
        }
    }
}

/// What a command needs.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    /// These capabilities, effective now.
    Caps(&'static [Cap]),
    /// Root (effective uid 0).
    Root,
}

/// The eBPF probes: maps, tracing programs and reading the kernel's memory.
pub const PROBES: &[Cap] = &[Cap::Bpf, Cap::Perfmon];
/// A delay in another namespace: entering it and changing its rules.
pub const DELAY: &[Cap] = &[Cap::NetAdmin, Cap::SysAdmin];
/// The daemon: probes, delays, and the namespaces of other users' containers.
pub const DAEMON: &[Cap] = &[
    Cap::Bpf,
    Cap::Perfmon,
    Cap::NetAdmin,
    Cap::SysAdmin,
    Cap::SysPtrace,
];

/// Whether the process runs as root (effective uid 0).
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The effective capability set, from `CapEff:` in /proc/self/status (0 when unreadable).
pub(crate) fn effective() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Whether `set` grants `cap` (CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON).
fn grants(set: u64, cap: Cap) -> bool {
    let has = |c: Cap| set & (1u64 << c as u32) != 0;
    has(cap) || (matches!(cap, Cap::Bpf | Cap::Perfmon) && has(Cap::SysAdmin))
}

/// What a command lacked, and why it needed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotPermitted {
    #[error("{what} needs root ({why}); run it as root")]
    Root {
        what: &'static str,
        why: &'static str,
    },
    #[error(
        "{what} needs {} ({why}); missing: {}. Run it as root, or grant them (systemd \
         AmbientCapabilities=, setpriv --ambient-caps, a container's cap_add)",
        names(needed),
        names(missing)
    )]
    Caps {
        what: &'static str,
        why: &'static str,
        needed: Vec<Cap>,
        missing: Vec<Cap>,
    },
}

fn names(caps: &[Cap]) -> String {
    caps.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
}

/// Ok when the process has what `need` asks for; otherwise says what it lacks.
pub(crate) fn require(
    what: &'static str,
    why: &'static str,
    need: Need,
) -> Result<(), NotPermitted> {
    check(what, why, need, effective(), is_root())
}

fn check(
    what: &'static str,
    why: &'static str,
    need: Need,
    set: u64,
    root: bool,
) -> Result<(), NotPermitted> {
    match need {
        Need::Root if root => Ok(()),
        Need::Root => Err(NotPermitted::Root { what, why }),
        Need::Caps(caps) => {
            let missing: Vec<Cap> = caps.iter().copied().filter(|&c| !grants(set, c)).collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(NotPermitted::Caps {
                    what,
                    why,
                    needed: caps.to_vec(),
                    missing,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the kernel's own view of this process: the effective uid in /proc/self/status
    /// (second `Uid:` field), and root's full set when running as root.
    #[test]
    fn agrees_with_the_kernel() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let euid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert_eq!(is_root(), euid == 0);
        if euid == 0 {
            assert!(require("watch", "eBPF", Need::Caps(DAEMON)).is_ok());
        }
    }

    #[test]
    fn names_each_missing_capability() {
        let bpf_only = 1u64 << 39;
        let e = check(
            "awaitlab watch",
            "eBPF probes",
            Need::Caps(PROBES),
            bpf_only,
            false,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "awaitlab watch needs CAP_BPF, CAP_PERFMON (eBPF probes); missing: CAP_PERFMON. Run \
             it as root, or grant them (systemd AmbientCapabilities=, setpriv --ambient-caps, a \
             container's cap_add)"
        );
        // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, not for CAP_NET_ADMIN.
        let sys_admin = 1u64 << 21;
        assert!(check("w", "y", Need::Caps(PROBES), sys_admin, false).is_ok());
        let e = check("d", "y", Need::Caps(DELAY), sys_admin, false).unwrap_err();
        assert!(matches!(e, NotPermitted::Caps { ref missing, .. } if missing == &[Cap::NetAdmin]));
        assert!(check("s", "y", Need::Root, u64::MAX, false).is_err());
        assert!(check("s", "y", Need::Root, 0, true).is_ok());
    }
}
