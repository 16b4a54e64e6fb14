//! Small helpers for running external programs and owning child processes.
//!
//! Every command the xtask runs goes through here so that failures name the exact command line
//! and its stderr. This module must not decide *what* to run, and must never signal a process
//! it did not start itself (no pkill/killall by name).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The workspace root, known at compile time, so the xtask works from any current directory.
pub fn workspace_root() -> PathBuf {
    // xtask/ is a direct child of the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR` like cargo itself does.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// A `cargo` command in the workspace root. Goes through the rustup proxy on `PATH` rather than
/// `$CARGO`, so that `agent/build.rs` can still select the nightly toolchain for the eBPF crate.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// The command line as a user could paste it (env overrides are left out).
pub fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(arg));
    }
    s
}

fn quote(arg: &OsStr) -> String {
    let a = arg.to_string_lossy();
    let plain = !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        a.into_owned()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// Runs with inherited stdio (the user sees the tool's own output) and fails on non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    eprintln!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    check(status, &line)
}

/// Runs quietly, returns stdout; on failure the error carries stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8 output"))
}

/// True when the command starts and exits 0; all output is discarded. For probes like
/// `bpf-linker --version` where "not installed" and "broken" mean the same thing.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn check(status: ExitStatus, line: &str) -> Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("`{line}` failed ({status})")
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Returns when the xtask runs as root. Otherwise runs this same xtask again, with the same
/// arguments, under `sudo -E env PATH=...` (so that rustup's cargo and the environment that
/// cargo gave it stay as they are) and never returns; without `sudo` it fails and says why.
/// `why` names what needs root, for both messages.
pub fn become_root(why: &str) -> Result<()> {
    if is_root() {
        return Ok(());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let exe = std::env::current_exe().context("finding the xtask's own executable")?;
    let mut c = sudo_command(&path, &exe, std::env::args_os().skip(1)).with_context(|| {
        format!("{why}: run it as root (sudo is not installed to do that for you)")
    })?;
    eprintln!(
        "==> {why}: running again as root with {}",
        c.get_program().to_string_lossy()
    );
    use std::os::unix::process::CommandExt;
    // exec only returns on failure.
    Err(c.exec()).context("running sudo")
}

/// `sudo -E env PATH=<path> <exe> <args>` with the first `sudo` on `path`; `None` without one.
fn sudo_command(
    path: &OsStr,
    exe: &Path,
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Option<Command> {
    let sudo = std::env::split_paths(path)
        .map(|dir| dir.join("sudo"))
        .find(|p| p.is_file())?;
    let mut path_arg = std::ffi::OsString::from("PATH=");
    path_arg.push(path);
    let mut c = Command::new(sudo);
    c.args(["-E", "env"]).arg(path_arg).arg(exe).args(args);
    Some(c)
}

/// Seconds with one decimal, for progress lines.
pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Sends `sig` to one process we started. ESRCH (already gone) is not an error.
pub fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill has no memory-safety preconditions; pid is a child we spawned and still
    // own (not yet reaped), so it cannot have been recycled for another process.
    if unsafe { libc::kill(pid, sig) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(err).with_context(|| format!("kill({pid}, {sig})"))
    }
}

/// A child process that is stopped when the guard goes away, also on error or panic, so that no
/// benchmark server or agent outlives the xtask.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    /// Signal asking for a clean shutdown; SIGKILL follows after `grace`.
    stop_signal: libc::c_int,
    grace: Duration,
}

impl ChildGuard {
    pub fn spawn(
        name: &str,
        cmd: &mut Command,
        stop_signal: libc::c_int,
        grace: Duration,
    ) -> Result<Self> {
        let line = display(cmd);
        eprintln!("$ {line} &");
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start {name}: `{line}`"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            stop_signal,
            grace,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `Some(status)` when the process has already exited on its own.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name)),
            None => bail!("{} was already stopped", self.name),
        }
    }

    /// Sends the stop signal, waits up to the grace period, then SIGKILLs. Returns the exit
    /// status and whether the process had to be killed.
    pub fn stop(&mut self) -> Result<(ExitStatus, bool)> {
        let Some(mut child) = self.child.take() else {
            bail!("{} was already stopped", self.name);
        };
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {}", self.name))?
        {
            return Ok((status, false));
        }
        signal(child.id(), self.stop_signal)?;
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?
            {
                return Ok((status, false));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "{} did not stop within {}; killing it",
            self.name,
            secs(self.grace)
        );
        child
            .kill()
            .with_context(|| format!("killing {}", self.name))?;
        let status = child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))?;
        Ok((status, true))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Err(e) = self.stop() {
                eprintln!("warning: could not stop {}: {e:#}", self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command `become_root` would run: the first `sudo` on PATH (a file named so in a
    /// directory of our own here), the same PATH for root, this executable and its arguments;
    /// none when no directory on PATH has a `sudo`.
    #[test]
    fn sudo_command_reruns_this_executable_with_the_same_path() {
        let dir = std::env::temp_dir().join(format!("xtask-sudo-{}", std::process::id()));
        let (empty, with) = (dir.join("empty"), dir.join("with"));
        std::fs::create_dir_all(&empty).unwrap();
        std::fs::create_dir_all(&with).unwrap();
        std::fs::write(with.join("sudo"), "").unwrap();
        let path = std::env::join_paths([&empty, &with]).unwrap();
        let exe = Path::new("/x/xtask");
        let c = sudo_command(&path, exe, ["test".into(), "--".into(), "f".into()]).unwrap();
        assert_eq!(c.get_program(), with.join("sudo").as_os_str());
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let want_path = format!("PATH={}", path.to_string_lossy());
        assert_eq!(
            args,
            ["-E", "env", &want_path, "/x/xtask", "test", "--", "f"]
        );
        let none = std::env::join_paths([&empty]).unwrap();
        assert!(sudo_command(&none, exe, []).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
