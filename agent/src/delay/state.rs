//! Owner state: what an owner records in `STATE_DIR` before it installs anything, so that
//! `clear`, `show` and the next owner know who holds a delay; and the removal of what a dead
//! owner left behind.

use super::*;

/// What an owner records before installing anything.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerState {
    pub version: u32,
    pub pid: u32,
    /// The owner's start time (field 22 of /proc/PID/stat), so a recycled pid is not mistaken
    /// for the owner.
    pub pid_start: u64,
    pub netns_path: PathBuf,
    pub netns_inum: u32,
    pub backend: Backend,
    pub devs: Vec<String>,
    pub marker: String,
    pub queue: Option<u16>,
    /// iptables-nft creates the `ip mangle` table on first use; when it did so for us, the table
    /// is deleted again once it holds no rule (nothing left behind, not even an empty table).
    #[serde(default)]
    pub created_mangle: bool,
    /// `DelaySpec::clear_stops_owner`, recorded for `clear` (which must not guess it from the
    /// owner's command line).
    #[serde(default)]
    pub clear_stops_owner: bool,
}

pub(super) fn proc_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl OwnerState {
    pub(super) fn file(&self) -> PathBuf {
        Path::new(STATE_DIR).join(format!(
            "{}-{}.json",
            self.pid,
            self.marker.rsplit(':').next().unwrap_or("0")
        ))
    }

    pub(super) fn owner_alive(&self) -> bool {
        proc_start(self.pid) == Some(self.pid_start)
    }

    pub(super) fn write(&self) -> Result<(), DelayError> {
        std::fs::create_dir_all(STATE_DIR).map_err(io_err(format!("creating {STATE_DIR}")))?;
        let tmp = self.file().with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).unwrap_or_default())
            .map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, self.file())
            .map_err(io_err(format!("writing {}", self.file().display())))
    }

    pub(super) fn all() -> Vec<(PathBuf, OwnerState)> {
        let Ok(dir) = std::fs::read_dir(STATE_DIR) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| {
                let s = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                Some((e.path(), s))
            })
            .collect()
    }

    /// Opens the namespace the state names, if it still exists as that namespace.
    pub(super) fn open_ns(&self) -> Option<File> {
        use std::os::unix::fs::MetadataExt;
        let f = File::open(&self.netns_path).ok()?;
        (f.metadata().ok()?.ino() as u32 == self.netns_inum).then_some(f)
    }
}

/// Removes everything `marker`/`backend` installed in `ns` on `devs`: only rules with that exact
/// marker, only root netem qdiscs with our handle on those devices.
pub(super) fn remove_installed(ns: &File, st: &OwnerState) -> Vec<String> {
    let (backend, marker, devs) = (st.backend, &st.marker, &st.devs);
    let mut removed = Vec::new();
    match backend {
        Backend::Nfqueue => {
            if let Ok(listing) = run_in_ns(ns, "iptables", &iptables::list_args()) {
                for r in iptables::parse_rules(&listing)
                    .into_iter()
                    .filter(|r| &r.marker == marker)
                {
                    match run_in_ns(ns, "iptables", &r.delete) {
                        Ok(_) => removed.push(r.spec),
                        Err(e) => tracing::warn!("{e}"),
                    }
                }
            }
            if st.created_mangle {
                remove_mangle_if_empty(ns);
            }
        }
        Backend::Netem => {
            if let Ok(listing) = run_in_ns(ns, "tc", &tc::show_args()) {
                for (dev, line) in tc::ours(&listing)
                    .into_iter()
                    .filter(|(d, _)| devs.contains(d))
                {
                    match run_in_ns(ns, "tc", &tc::del_args(&dev)) {
                        Ok(_) => removed.push(line),
                        Err(e) => tracing::warn!("{e}"),
                    }
                }
            }
        }
    }
    removed
}

/// Removes what agents that are no longer running left behind (they were killed before their
/// guards ran), and returns a description of each removed rule or qdisc. Namespaces that are gone
/// took their rules with them; only their state files are removed.
pub(crate) fn cleanup_leftovers() -> Vec<String> {
    let mut removed = Vec::new();
    for (path, st) in OwnerState::all() {
        if st.owner_alive() {
            continue;
        }
        if let Some(ns) = st.open_ns() {
            for r in remove_installed(&ns, &st) {
                removed.push(format!(
                    "{} (left by pid {}): {r}",
                    st.netns_path.display(),
                    st.pid
                ));
            }
        }
        let _ = std::fs::remove_file(path);
    }
    removed
}
