//! Turns what the user names (`pid:PID`, a bare PID, `netns:NAME`, or a namespace path such as
//! `/proc/PID/ns/net` or `/run/netns/NAME`) into one network namespace: its inode, which the
//! probes compare against, and a way to tell whether it still exists.
//!
//! It must not hold the namespace open: a held fd would keep a deleted namespace alive and hide
//! that the target vanished.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("target {0:?}: expected pid:PID, PID, netns:NAME or a namespace path (/proc/PID/ns/net, /run/netns/NAME)")]
    Syntax(String),
    #[error("target {spec}: {path} does not exist")]
    Missing { spec: String, path: String },
    #[error("target {spec}: no process with pid {pid}")]
    NoProcess { spec: String, pid: u32 },
    #[error("target {spec}: {path} is not a network namespace")]
    NotNetns { spec: String, path: String },
    #[error("target {spec}: {path}: {source}")]
    Io { spec: String, path: String, source: std::io::Error },
}

impl TargetError {
    /// Bad syntax is a usage error; the rest are about the system.
    pub fn is_usage(&self) -> bool {
        matches!(self, TargetError::Syntax(_))
    }
}

/// How the target was named, which decides how we notice that it is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A process: the target is gone when the process exits.
    Pid(u32),
    /// A namespace file: gone when the file is removed or names another namespace.
    Path(PathBuf),
}

/// A resolved network namespace.
#[derive(Debug, Clone)]
pub struct Target {
    pub spec: String,
    pub origin: Origin,
    /// The namespace inode (`ls -i`, `readlink /proc/PID/ns/net` shows `net:[INODE]`).
    pub netns_inum: u32,
}

const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

impl Target {
    pub fn resolve(spec: &str) -> Result<Target, TargetError> {
        let origin = if let Some(pid) = spec.strip_prefix("pid:") {
            Origin::Pid(pid.parse().map_err(|_| TargetError::Syntax(spec.into()))?)
        } else if let Some(name) = spec.strip_prefix("netns:") {
            if name.is_empty() || name.contains('/') {
                return Err(TargetError::Syntax(spec.into()));
            }
            Origin::Path(Path::new("/run/netns").join(name))
        } else if spec.starts_with('/') {
            Origin::Path(PathBuf::from(spec))
        } else if let Ok(pid) = spec.parse::<u32>() {
            Origin::Pid(pid)
        } else {
            return Err(TargetError::Syntax(spec.into()));
        };
        let path = match &origin {
            Origin::Pid(pid) => {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    return Err(TargetError::NoProcess { spec: spec.into(), pid: *pid });
                }
                PathBuf::from(format!("/proc/{pid}/ns/net"))
            }
            Origin::Path(p) => p.clone(),
        };
        let netns_inum = netns_inode(spec, &path)?;
        Ok(Target { spec: spec.into(), origin, netns_inum })
    }

    /// Whether the namespace can still be reached the way it was named.
    pub fn alive(&self) -> bool {
        let path = match &self.origin {
            Origin::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
            Origin::Path(p) => p.clone(),
        };
        std::fs::metadata(&path).map(|m| m.ino() as u32 == self.netns_inum).unwrap_or(false)
    }

    /// The inode of the namespace the agent itself runs in.
    pub fn own_netns_inum() -> Option<u32> {
        std::fs::metadata("/proc/self/ns/net").ok().map(|m| m.ino() as u32)
    }
}

fn netns_inode(spec: &str, path: &Path) -> Result<u32, TargetError> {
    let io = |source| TargetError::Io { spec: spec.into(), path: path.display().to_string(), source };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TargetError::Missing { spec: spec.into(), path: path.display().to_string() })
        }
        Err(e) => return Err(io(e)),
    };
    // SAFETY: ioctl on an fd we own; NS_GET_NSTYPE takes no argument.
    let kind = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    if kind != libc::CLONE_NEWNET {
        return Err(TargetError::NotNetns { spec: spec.into(), path: path.display().to_string() });
    }
    Ok(f.metadata().map_err(io)?.ino() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_are_usage_errors() {
        for bad in ["", "docker", "pid:abc", "netns:", "netns:a/b", "relative/path"] {
            let e = Target::resolve(bad).unwrap_err();
            assert!(e.is_usage(), "{bad}: {e}");
        }
    }

    #[test]
    fn own_namespace_resolves_by_pid_and_path() {
        let pid = std::process::id();
        let by_pid = Target::resolve(&pid.to_string()).unwrap();
        let by_path = Target::resolve(&format!("/proc/{pid}/ns/net")).unwrap();
        assert_eq!(by_pid.netns_inum, by_path.netns_inum);
        assert_eq!(Some(by_pid.netns_inum), Target::own_netns_inum());
        assert!(by_pid.alive());
    }

    #[test]
    fn a_file_that_is_not_a_namespace_is_refused() {
        let e = Target::resolve("/proc/self/status").unwrap_err();
        assert!(matches!(e, TargetError::NotNetns { .. }), "{e}");
        let e = Target::resolve(&format!("/proc/{}/ns/uts", std::process::id())).unwrap_err();
        assert!(matches!(e, TargetError::NotNetns { .. }), "{e}");
        let e = Target::resolve("/nonexistent/ns").unwrap_err();
        assert!(matches!(e, TargetError::Missing { .. }), "{e}");
    }
}
