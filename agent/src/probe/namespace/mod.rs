//! Turns what the user names (`docker:NAME_OR_ID`, `pid:PID`, a bare PID, `netns:NAME`, or a
//! namespace path such as `/proc/PID/ns/net` or `/run/netns/NAME`) into one network namespace:
//! its inode, which the probes compare against, the path to open to enter it (delay injection
//! runs `tc`/`iptables` and its netlink sockets there), and a way to tell whether it still exists.
//!
//! It must not hold the namespace open: a held fd would keep a deleted namespace alive and hide
//! that the target vanished. Containers are looked up through the Docker API (bollard, version
//! negotiated), never by shelling out to `docker`.

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
    Io {
        spec: String,
        path: String,
        source: std::io::Error,
    },
    #[error("target {spec}: no such container")]
    NoContainer { spec: String },
    #[error("target {spec}: container is not running (state: {state})")]
    ContainerStopped { spec: String, state: String },
    #[error("target {spec}: Docker: {source}")]
    Docker {
        spec: String,
        source: bollard::errors::Error,
    },
    #[error("target {spec}: entering the namespace: {source}")]
    Enter {
        spec: String,
        source: std::io::Error,
    },
}

impl TargetError {
    /// Bad syntax is a usage error; the rest are about the system.
    pub(crate) fn is_usage(&self) -> bool {
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
    /// A running container: its main process (from `docker inspect`) holds the namespace, so it
    /// is gone when that process exits, as for `Pid`.
    Docker { id: String, name: String, pid: u32 },
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
        let origin = if let Some(name) = spec.strip_prefix("docker:") {
            if name.is_empty() || name.contains('/') {
                return Err(TargetError::Syntax(spec.into()));
            }
            docker_origin(spec, name)?
        } else if let Some(pid) = spec.strip_prefix("pid:") {
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
        if let Origin::Pid(pid) = &origin {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return Err(TargetError::NoProcess {
                    spec: spec.into(),
                    pid: *pid,
                });
            }
        }
        let path = origin_path(&origin);
        let netns_inum = netns_inode(spec, &path)?;
        Ok(Target {
            spec: spec.into(),
            origin,
            netns_inum,
        })
    }

    /// The file to open to enter the namespace (`setns(fd, CLONE_NEWNET)`).
    pub(crate) fn netns_path(&self) -> PathBuf {
        origin_path(&self.origin)
    }

    /// Opens the namespace for `setns`, checking that the path still names the namespace that
    /// was resolved (a recycled pid or a re-created `/run/netns/NAME` must not be entered).
    pub fn open(&self) -> Result<File, TargetError> {
        let path = self.netns_path();
        let io = |source| TargetError::Io {
            spec: self.spec.clone(),
            path: path.display().to_string(),
            source,
        };
        let f = File::open(&path).map_err(io)?;
        let ino = f.metadata().map_err(io)?.ino() as u32;
        if ino != self.netns_inum {
            return Err(TargetError::Missing {
                spec: self.spec.clone(),
                path: path.display().to_string(),
            });
        }
        Ok(f)
    }

    /// Runs `f` on a new thread that has entered the namespace, and returns its result. Sockets
    /// `f` creates belong to the namespace for their whole life, wherever they are used later.
    pub(crate) fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, TargetError> {
        let ns = self.open()?;
        let spec = self.spec.clone();
        std::thread::spawn(move || {
            enter(&ns).map_err(|source| TargetError::Enter { spec, source })?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Whether the namespace can still be reached the way it was named.
    pub fn alive(&self) -> bool {
        std::fs::metadata(self.netns_path())
            .map(|m| m.ino() as u32 == self.netns_inum)
            .unwrap_or(false)
    }

    /// The inode of the namespace the agent itself runs in.
    #[cfg(test)]
    pub(crate) fn own_netns_inum() -> Option<u32> {
        std::fs::metadata("/proc/self/ns/net")
            .ok()
            .map(|m| m.ino() as u32)
    }
}

/// Moves the calling thread into the network namespace `ns` (only this thread: `setns` applies
/// per thread, and threads spawned later inherit it).
pub fn enter(ns: &File) -> std::io::Result<()> {
    // SAFETY: setns on an fd we own; it changes only the calling thread's namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn origin_path(origin: &Origin) -> PathBuf {
    match origin {
        Origin::Pid(pid) | Origin::Docker { pid, .. } => {
            PathBuf::from(format!("/proc/{pid}/ns/net"))
        }
        Origin::Path(p) => p.clone(),
    }
}

/// Inspects the container through the Docker API. Runs on its own thread with its own runtime
/// so that callers inside or outside a tokio runtime can resolve targets alike.
fn docker_origin(spec: &str, name: &str) -> Result<Origin, TargetError> {
    let (spec_owned, name_owned) = (spec.to_string(), name.to_string());
    let docker_err = move |source| TargetError::Docker {
        spec: spec_owned.clone(),
        source,
    };
    let inspected = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(bollard::errors::Error::from)?;
        rt.block_on(async move {
            let docker = bollard::Docker::connect_with_local_defaults()?
                .negotiate_version()
                .await?;
            docker.inspect_container(&name_owned, None).await
        })
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p));
    let info = match inspected {
        Ok(i) => i,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return Err(TargetError::NoContainer { spec: spec.into() }),
        Err(e) => return Err(docker_err(e)),
    };
    let state = info.state.unwrap_or_default();
    let pid = state.pid.unwrap_or(0);
    if state.running != Some(true) || pid <= 0 {
        let state = state
            .status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "unknown".into());
        return Err(TargetError::ContainerStopped {
            spec: spec.into(),
            state,
        });
    }
    Ok(Origin::Docker {
        id: info.id.unwrap_or_default(),
        name: info
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        pid: pid as u32,
    })
}

fn netns_inode(spec: &str, path: &Path) -> Result<u32, TargetError> {
    let io = |source| TargetError::Io {
        spec: spec.into(),
        path: path.display().to_string(),
        source,
    };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TargetError::Missing {
                spec: spec.into(),
                path: path.display().to_string(),
            })
        }
        Err(e) => return Err(io(e)),
    };
    // SAFETY: ioctl on an fd we own; NS_GET_NSTYPE takes no argument.
    let kind = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    if kind != libc::CLONE_NEWNET {
        return Err(TargetError::NotNetns {
            spec: spec.into(),
            path: path.display().to_string(),
        });
    }
    Ok(f.metadata().map_err(io)?.ino() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_are_usage_errors() {
        for bad in [
            "",
            "docker",
            "docker:",
            "docker:a/b",
            "pid:abc",
            "netns:",
            "netns:a/b",
            "relative/path",
        ] {
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
        assert_eq!(
            by_pid.netns_path(),
            PathBuf::from(format!("/proc/{pid}/ns/net"))
        );
        // Entering a namespace needs CAP_SYS_ADMIN (cargo xtask test runs as root).
        if crate::privilege::is_root() {
            let inside = by_path.run_in(Target::own_netns_inum).unwrap();
            assert_eq!(inside, Some(by_pid.netns_inum));
        }
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
