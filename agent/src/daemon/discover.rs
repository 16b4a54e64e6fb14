//! Containers found through the host's cgroups, whatever runs them: Docker, containerd (with or
//! without Kubernetes), CRI-O or Podman all put a container's processes in a cgroup whose path
//! ends in the container's 64-hex id (`/docker/ID`, `docker-ID.scope`,
//! `cri-containerd-ID.scope`, `crio-ID.scope`, `libpod-ID.scope`, `/kubepods/.../ID`). One
//! scan of `/proc/*/cgroup` lists them with the lowest pid of each, which is enough to find the
//! container's network namespace; the runtime is asked for a name only when it answers.

use std::{collections::BTreeMap, path::Path};

/// One container as its cgroups show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupContainer {
    /// The runtime's 64-hex container id.
    pub id: String,
    /// `docker`, `containerd`, `cri-o`, `podman`, or `kubernetes` (a kubepods path whose
    /// runtime the path does not name).
    pub runtime: &'static str,
    /// The cgroup path the id was found in.
    pub cgroup: String,
    /// The lowest pid in it (normally the container's first process).
    pub pid: u32,
}

impl CgroupContainer {
    /// The name a container gets when no runtime names it: its id's first 12 characters, as
    /// `docker ps` and `crictl ps` show it.
    pub(crate) fn short_id(&self) -> &str {
        &self.id[..12]
    }
}

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The container id and runtime in one cgroup path, if it is a container's.
pub(crate) fn container_in(path: &str) -> Option<(String, &'static str)> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate().rev() {
        let name = part.strip_suffix(".scope").unwrap_or(part);
        // CRI-O's monitor process sits in crio-conmon-ID.scope: not the container.
        if name.starts_with("crio-conmon-") {
            return None;
        }
        for (prefix, runtime) in [
            ("docker-", "docker"),
            ("cri-containerd-", "containerd"),
            ("crio-", "cri-o"),
            ("libpod-", "podman"),
        ] {
            if let Some(id) = name.strip_prefix(prefix).filter(|id| is_id(id)) {
                return Some((id.to_string(), runtime));
            }
        }
        if is_id(name) {
            let parent = if i > 0 { parts[i - 1] } else { "" };
            let runtime = if parent == "docker" {
                "docker"
            } else if parts.iter().any(|p| p.starts_with("kubepods")) {
                "kubernetes"
            } else {
                return None;
            };
            return Some((name.to_string(), runtime));
        }
    }
    None
}

/// The container of a process, from the text of its `/proc/PID/cgroup` (cgroup v1 lists one
/// line per hierarchy, v2 one line `0::PATH`; any line that names a container will do).
pub(crate) fn container_of(cgroup_file: &str) -> Option<(String, &'static str, String)> {
    cgroup_file.lines().find_map(|l| {
        let path = l.splitn(3, ':').nth(2)?;
        container_in(path).map(|(id, rt)| (id, rt, path.to_string()))
    })
}

/// Every container with a process on the host, by id, from `proc` (normally `/proc`; the
/// host's, so the daemon needs the host's PID namespace in a container).
pub(crate) fn scan(proc: &Path) -> BTreeMap<String, CgroupContainer> {
    let mut found: BTreeMap<String, CgroupContainer> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(proc) else {
        return found;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // A process that exits between the listing and the read is simply not there.
        let Ok(text) = std::fs::read_to_string(e.path().join("cgroup")) else {
            continue;
        };
        let Some((id, runtime, cgroup)) = container_of(&text) else {
            continue;
        };
        let c = found.entry(id.clone()).or_insert(CgroupContainer {
            id,
            runtime,
            cgroup,
            pid,
        });
        c.pid = c.pid.min(pid);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c2b7d9e8a6b5c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c";

    /// Paths as each runtime and cgroup driver write them (from their documentation and from
    /// this host's Docker, which uses cgroup v1 with the cgroupfs driver: `/docker/ID`).
    #[test]
    fn finds_the_id_and_runtime_in_every_runtimes_paths() {
        let cases = [
            (format!("/docker/{ID}"), "docker"),
            (format!("/system.slice/docker-{ID}.scope"), "docker"),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234.slice/cri-containerd-{ID}.scope"),
                "containerd",
            ),
            (format!("/kubepods/burstable/pod0f3e-11aa/{ID}"), "kubernetes"),
            (format!("/kubepods.slice/kubepods-pod9.slice/crio-{ID}.scope"), "cri-o"),
            (format!("/machine.slice/libpod-{ID}.scope/container"), "podman"),
        ];
        for (path, runtime) in cases {
            assert_eq!(
                container_in(&path),
                Some((ID.to_string(), runtime)),
                "{path}"
            );
        }
        for not in [
            "/".to_string(),
            "/user.slice/user-1000.slice/session-3.scope".to_string(),
            format!("/kubepods.slice/crio-conmon-{ID}.scope"),
            format!("/system.slice/docker-{}.scope", &ID[..63]),
            format!("/other/{ID}"),
        ] {
            assert_eq!(container_in(&not), None, "{not}");
        }
    }

    #[test]
    fn reads_v1_and_v2_cgroup_files() {
        let v1 =
            format!("12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n");
        let v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        for text in [v1, v2] {
            let (id, runtime, _) = container_of(&text).unwrap();
            assert_eq!((id.as_str(), runtime), (ID, "docker"));
        }
        assert_eq!(container_of("0::/init.scope\n"), None);
    }

    /// Against the host: this process is in no container (the tests run on the host), and a
    /// scan returns only ids whose lowest pid is really in that container.
    #[test]
    fn a_scan_of_this_host_agrees_with_each_process() {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let mine = container_of(&own).map(|(id, _, _)| id);
        for (id, c) in scan(Path::new("/proc")) {
            if Some(&id) == mine.as_ref() {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(format!("/proc/{}/cgroup", c.pid)) else {
                continue; // exited since
            };
            assert_eq!(container_of(&text).map(|(i, _, _)| i), Some(id));
        }
    }
}
