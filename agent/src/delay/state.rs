//! Owner state: what an owner records in `STATE_DIR` before it installs anything, so that
//! `clear`, `show` and the next owner know who holds a delay; and the removal of what a dead
//! owner left behind.
//!
//! An owner is alive exactly while it holds an exclusive `flock` on its state file: the kernel
//! releases the lock when the process dies, however it dies, so neither its command line nor
//! its pid decides. The directory is created 0700 (it is root's), refused when it is a symlink,
//! and the files are opened without following symlinks.

use std::{
    fs::OpenOptions,
    io::Write as _,
    os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
};

use super::*;

/// `flock(fd, op | LOCK_NB)`: Ok(true) when taken, Ok(false) when another holds it.
fn try_flock(f: &File, op: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Opens `path` for reading without following a symlink.
fn open_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Creates `STATE_DIR` and its parent 0700 (and tightens them if they exist looser); refuses
/// a symlink or a non-directory in their place.
fn ensure_state_dir() -> Result<(), DelayError> {
    let dir = Path::new(STATE_DIR);
    for d in [dir.parent().unwrap_or(dir), dir] {
        match std::fs::symlink_metadata(d) {
            Ok(m) if m.file_type().is_symlink() || !m.is_dir() => {
                return Err(io_err(format!("{} is not a directory", d.display()))(
                    std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                ))
            }
            Ok(m) if m.mode() & 0o077 != 0 => {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err(format!("making {} private", d.display())))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match std::fs::DirBuilder::new().mode(0o700).create(d) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                        return Err(io_err(format!("creating {}", d.display()))(e))
                    }
                    _ => {}
                }
            }
            Err(e) => return Err(io_err(format!("reading {}", d.display()))(e)),
        }
    }
    Ok(())
}

/// Version of the state file: 2 since owners hold a lock on it.
pub(super) const STATE_VERSION: u32 = 2;

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

    /// Whether the owner still holds its state file's lock (it is alive). Owners of an older
    /// agent (state version 1) took no lock: theirs is alive while their pid runs with the
    /// recorded start time, so that upgrading the agent does not remove a live owner's delay.
    pub(super) fn owner_alive(&self) -> bool {
        if self.version < STATE_VERSION {
            return proc_start(self.pid) == Some(self.pid_start);
        }
        match open_nofollow(&self.file()) {
            Ok(f) => matches!(try_flock(&f, libc::LOCK_SH), Ok(false)),
            Err(_) => false,
        }
    }

    /// Writes the state, atomically, to a file this process holds locked from before it
    /// appears under its name until the returned handle is dropped.
    pub(super) fn write(&self) -> Result<File, DelayError> {
        ensure_state_dir()?;
        let (file, tmp) = (self.file(), self.file().with_extension("tmp"));
        let written = (|| {
            // A temporary file of this pid left by a crash is ours to replace.
            let _ = std::fs::remove_file(&tmp);
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            // Locked before it is renamed into place: no reader ever sees it unlocked.
            if !try_flock(&f, libc::LOCK_EX)? {
                return Err(std::io::Error::from(std::io::ErrorKind::WouldBlock));
            }
            f.write_all(&serde_json::to_vec(self).unwrap_or_default())?;
            std::fs::rename(&tmp, &file)?;
            Ok(f)
        })();
        written.map_err(io_err(format!("writing {}", file.display())))
    }

    pub(super) fn all() -> Vec<(PathBuf, OwnerState)> {
        // Whoever reads it makes sure it is private (an older agent made it 0755).
        if let Err(e) = ensure_state_dir() {
            tracing::warn!("{e}");
        }
        let Ok(dir) = std::fs::read_dir(STATE_DIR) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| {
                let s = serde_json::from_reader(open_nofollow(&e.path()).ok()?).ok()?;
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
