//! The one privilege check. Loading eBPF, entering other network namespaces, changing qdiscs
//! and iptables rules, and running the system under test need root today; each command that
//! does any of it calls `require` before it changes anything, and a user without root gets one
//! line and exit 77 (`EXIT_NOPERM`).

/// Whether the process runs as root (effective uid 0).
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// What needed root, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} needs root ({why}); run it as root")]
pub struct NotRoot {
    pub what: &'static str,
    pub why: &'static str,
}

/// Ok when running as root; otherwise says what needed it.
pub(crate) fn require(what: &'static str, why: &'static str) -> Result<(), NotRoot> {
    if is_root() {
        Ok(())
    } else {
        Err(NotRoot { what, why })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the uid the kernel reports for this process in /proc/self/status (its second
    /// `Uid:` field is the effective uid).
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
        let r = require("awaitlab watch", "eBPF");
        assert_eq!(r.is_ok(), euid == 0);
        if let Err(e) = r {
            assert_eq!(
                e.to_string(),
                "awaitlab watch needs root (eBPF); run it as root"
            );
        }
    }
}
