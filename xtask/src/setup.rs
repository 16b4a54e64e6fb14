//! `cargo xtask setup`: make a Debian bookworm host (as root) ready to build, test and benchmark.
//!
//! Idempotent and quick when everything is present: each item is checked first and reported as
//! "ok" or "installed". It must not upgrade or remove packages of its own accord (apt may
//! still upgrade a dependency that a missing package requires), must not run `apt-get update`
//! unless a package is actually missing, and must not leave services running that the
//! packages' install scripts would otherwise start.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cmd::{self, secs};

/// Debian packages that the tests and benchmarks call. Each entry lists alternatives in order of
/// preference; the item counts as present when any of them is installed, and the first one that
/// has an install candidate is installed otherwise.
const PACKAGES: &[&[&str]] = &[
    &["iproute2"],
    &["iptables"],
    &["bpftool"],
    &["postgresql"],
    &["postgresql-client"],
    // The benchmark only needs /usr/sbin/nginx; nginx-light is the smallest build with it.
    &["nginx-light", "nginx"],
    &["wrk"],
    &["debootstrap"],
    // Headless browser for the HTML report check.
    &["chromium"],
    &["procps"],
    &["util-linux"],
    &["psmisc"],
    // Prometheus and promtool for the metrics tests (a real scraper, `promtool check metrics`).
    &["prometheus"],
    // A static busybox: the daemon test's container image runs its httpd.
    &["busybox-static"],
    // Validates dashboards/compose.yaml (`docker-compose config`) where `docker compose` is absent.
    &["docker-compose"],
    // The netns system under test: Debian's Python 3.11 with venv for the Django servers.
    &["python3-venv"],
];

/// Where the LLVM that bpf-linker links against is staged (symlinks into the nightly sysroot).
const LLVM_PREFIX_DIR: &str = ".local/awaitlab-llvm";

pub fn run() -> Result<()> {
    let start = Instant::now();
    debian_packages().context("installing Debian packages")?;
    nightly_rust_src().context("preparing the nightly toolchain")?;
    lint_tools().context("installing rustfmt and clippy")?;
    bpf_linker().context("installing bpf-linker")?;
    locust().context("installing Locust (for `cargo xtask bench load`)")?;
    oha().context("installing oha (for `cargo xtask bench load`)")?;
    sut_venvs().context("making the Python environments of the system under test")?;
    requirements_venv(
        STUDY_LOCUST_VENV,
        &cmd::workspace_root().join(STUDY_LOCUST_REQUIREMENTS),
    )
    .context("installing Locust 2.13.0 (the study's client, for agent/tests/locust.rs)")?;
    requirements_venv(
        KUBERNETES_VALIDATE_VENV,
        &cmd::workspace_root().join("xtask/requirements-kubernetes-validate.txt"),
    )
    .context("installing kubernetes-validate (for the manifests' test, agent/tests/deploy.rs)")?;
    println!("setup done in {}", secs(start.elapsed()));
    Ok(())
}

fn report(item: &str, state: &str) {
    println!("{item:<24} {state}");
}

fn dpkg_installed(pkg: &str) -> bool {
    // `dpkg-query` exits non-zero for unknown packages; that is simply "not installed".
    cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_ok_and(|s| s.trim() == "install ok installed")
}

fn has_candidate(pkg: &str) -> Result<bool> {
    let policy = cmd::output(Command::new("apt-cache").args(["policy", pkg]))?;
    Ok(policy
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Candidate:"))
        .any(|c| c.trim() != "(none)"))
}

fn debian_packages() -> Result<()> {
    let mut missing: Vec<&[&str]> = Vec::new();
    for alternatives in PACKAGES {
        if let Some(found) = alternatives.iter().find(|p| dpkg_installed(p)) {
            report(found, "ok");
        } else {
            missing.push(alternatives);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !cmd::is_root() {
        let names: Vec<String> = missing.iter().map(|a| a.join("|")).collect();
        cmd::become_root(&format!(
            "installing the missing Debian packages {} needs root",
            names.join(", ")
        ))?;
    }

    // Once, and only now: package lists may be empty on a fresh image, and candidates for the
    // alternatives below are only known after it.
    cmd::run(apt_get().arg("update")).context("apt-get update")?;
    let mut chosen = Vec::new();
    for alternatives in &missing {
        let mut pick = None;
        for p in alternatives.iter() {
            if has_candidate(p)? {
                pick = Some(*p);
                break;
            }
        }
        match pick {
            Some(p) => chosen.push(p),
            None => bail!(
                "no install candidate for any of {}",
                alternatives.join(", ")
            ),
        }
    }

    let _no_services = NoServiceStart::install()?;
    cmd::run(
        apt_get()
            .args(["install", "-y", "--no-install-recommends"])
            .args(&chosen),
    )
    .context("apt-get install")?;
    for p in chosen {
        report(p, "installed");
    }
    Ok(())
}

fn apt_get() -> Command {
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// Keeps package install scripts from starting services (nginx would take port 80 on the host,
/// and fail the install when that port is busy). Uses Debian's `policy-rc.d` hook, which both
/// invoke-rc.d and deb-systemd-invoke honour. Left alone when the host already has one.
struct NoServiceStart {
    path: Option<PathBuf>,
}

impl NoServiceStart {
    const PATH: &'static str = "/usr/sbin/policy-rc.d";

    fn install() -> Result<Self> {
        let path = Path::new(Self::PATH);
        if path.exists() {
            return Ok(Self { path: None });
        }
        fs::write(
            path,
            "#!/bin/sh\n# temporary, written by `cargo xtask setup`\nexit 101\n",
        )
        .with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", path.display()))?;
        Ok(Self {
            path: Some(path.to_path_buf()),
        })
    }
}

impl Drop for NoServiceStart {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            if let Err(e) = fs::remove_file(p) {
                eprintln!("warning: could not remove {}: {e}", p.display());
            }
        }
    }
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = cmd::output(
        Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]),
    )?;
    Ok(PathBuf::from(out.trim()))
}

fn nightly_rust_src() -> Result<()> {
    if cmd::succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "-V"])) {
        report("nightly toolchain", "ok");
    } else {
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        report("nightly toolchain", "installed");
    }
    // The eBPF crate is built with -Z build-std=core, which needs the library sources.
    if nightly_sysroot()?.join("lib/rustlib/src").is_dir() {
        report("nightly rust-src", "ok");
    } else {
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        report("nightly rust-src", "installed");
    }
    Ok(())
}

/// rustfmt and clippy, which `cargo xtask test` runs: clippy on the nightly toolchain for the
/// eBPF crate, both on the default toolchain for the others.
fn lint_tools() -> Result<()> {
    for (toolchain, component, probe) in [
        (None, "rustfmt", ["fmt", "--version"]),
        (None, "clippy", ["clippy", "--version"]),
        (Some("nightly"), "clippy", ["clippy", "--version"]),
    ] {
        let item = format!("{} {component}", toolchain.unwrap_or("default"));
        let mut check = Command::new("cargo");
        if let Some(t) = toolchain {
            check.arg(format!("+{t}"));
        }
        if cmd::succeeds(check.args(probe)) {
            report(&item, "ok");
            continue;
        }
        let mut add = Command::new("rustup");
        add.args(["component", "add", component]);
        if let Some(t) = toolchain {
            add.args(["--toolchain", t]);
        }
        cmd::run(&mut add)?;
        report(&item, "installed");
    }
    Ok(())
}

/// The nightly's own libLLVM (`libLLVM.so.<major>.<minor>-rust-<version>-nightly`) and its major
/// version. bpf-linker must use the same LLVM as the rustc that emits the bitcode.
fn nightly_libllvm(sysroot_lib: &Path) -> Result<(PathBuf, u32)> {
    let mut found = Vec::new();
    let entries =
        fs::read_dir(sysroot_lib).with_context(|| format!("reading {}", sysroot_lib.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", sysroot_lib.display()))?;
        let name = entry.file_name();
        if let Some(major) = libllvm_major(&name.to_string_lossy()) {
            found.push((entry.path(), major));
        }
    }
    found.sort();
    match found.len() {
        0 => bail!(
            "no libLLVM.so.*-rust-*-nightly in {}",
            sysroot_lib.display()
        ),
        1 => Ok(found.remove(0)),
        _ => {
            let (path, major) = found.remove(found.len() - 1);
            eprintln!(
                "warning: several nightly libLLVMs; using {}",
                path.display()
            );
            Ok((path, major))
        }
    }
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> 22.
fn libllvm_major(file_name: &str) -> Option<u32> {
    let version = file_name.strip_prefix("libLLVM.so.")?;
    if !version.contains("-rust-") || !version.ends_with("-nightly") {
        return None;
    }
    version.split('.').next()?.parse().ok()
}

fn bpf_linker() -> Result<()> {
    if cmd::succeeds(Command::new("bpf-linker").arg("--version")) {
        report("bpf-linker", "ok");
        return Ok(());
    }
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = PathBuf::from(home).join(LLVM_PREFIX_DIR);
    let lib = prefix.join("lib");
    let (libllvm, major) = nightly_libllvm(&nightly_sysroot()?.join("lib"))?;
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let file_name = libllvm
        .file_name()
        .context("libLLVM path has no file name")?;
    symlink_force(&libllvm, &lib.join(file_name))?;
    symlink_force(&libllvm, &lib.join("libLLVM.so"))?;

    // Default features want a system LLVM of a matching version, which Debian does not ship.
    let feature = format!("llvm-{major}");
    cmd::run(
        cmd::cargo()
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                &feature,
            ])
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !cmd::succeeds(Command::new("bpf-linker").arg("--version")) {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails; is ~/.cargo/bin on PATH?"
        );
    }
    report("bpf-linker", "installed");
    Ok(())
}

/// `ln -sf`: replaces a stale link left by an earlier nightly.
fn symlink_force(target: &Path, link: &Path) -> Result<()> {
    match fs::remove_file(link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", link.display())),
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

/// Locust's own virtualenv (the load benchmark's Python peer), under $HOME.
const LOCUST_VENV_DIR: &str = ".local/awaitlab-locust";

/// The `locust` executable of that virtualenv.
pub fn locust_bin() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(LOCUST_VENV_DIR).join("bin/locust"))
}

fn locust() -> Result<()> {
    let bin = locust_bin()?;
    if cmd::succeeds(Command::new(&bin).arg("--version")) {
        report("locust", "ok");
        return Ok(());
    }
    let venv = bin
        .parent()
        .and_then(Path::parent)
        .context("locust path has no venv")?
        .to_path_buf();
    // A half-made venv from an interrupted run would make `venv` keep a broken pip.
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    cmd::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    cmd::run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "locust"]))?;
    report("locust", "installed");
    Ok(())
}

/// `oha` (a Rust HTTP load generator), from crates.io.
pub fn oha_bin() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    cargo_home.join("bin/oha")
}

fn oha() -> Result<()> {
    if cmd::succeeds(Command::new(oha_bin()).arg("--version")) {
        report("oha", "ok");
        return Ok(());
    }
    // A few minutes on two cores; only the first setup pays it.
    cmd::run(cmd::cargo().args(["install", "--locked", "oha"]))?;
    report("oha", "installed");
    Ok(())
}

/// Where the netns system under test finds its Python environments (`venv-study`,
/// `venv-current`); `AWAITLAB_VENV_DIR` overrides it. Must match `agent/src/study/sut/netns.rs`.
const VENV_DIR: &str = "/var/lib/awaitlab";

pub fn venv_base() -> PathBuf {
    std::env::var_os("AWAITLAB_VENV_DIR").map_or_else(|| PathBuf::from(VENV_DIR), PathBuf::from)
}

/// One virtual environment per stack, made with Debian's Python 3.11 (not a pyenv shim) from
/// `docker/app/requirements-STACK.txt`.
pub fn sut_venvs() -> Result<()> {
    for stack in ["study", "current"] {
        let req_path = cmd::workspace_root().join(format!("docker/app/requirements-{stack}.txt"));
        requirements_venv(&format!("venv-{stack}"), &req_path)?;
    }
    Ok(())
}

/// The study's Locust, pinned, in its own venv beside the stacks' (the benchmark's Locust, in
/// `LOCUST_VENV_DIR`, is another one and stays as it is). Must match `agent/tests/locust.rs`.
const STUDY_LOCUST_VENV: &str = "venv-locust-2.13";
const STUDY_LOCUST_REQUIREMENTS: &str = "xtask/requirements-locust-2.13.txt";

/// The Kubernetes manifests' validator. Must match `agent/tests/deploy.rs`.
const KUBERNETES_VALIDATE_VENV: &str = "venv-kubernetes-validate";

/// The venv `venv_base()/ITEM`, made with Debian's Python 3.11 from the requirements file at
/// `req_path`. Idempotent: a copy of the requirements inside the venv says what it holds; it is
/// rebuilt only when the file changed.
fn requirements_venv(item: &str, req_path: &Path) -> Result<()> {
    let base = venv_base();
    let wanted =
        fs::read_to_string(req_path).with_context(|| format!("reading {}", req_path.display()))?;
    let venv = base.join(item);
    let stamp = venv.join("awaitlab-requirements.txt");
    if fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        report(item, "ok");
        return Ok(());
    }
    if !cmd::is_root() && !base.exists() {
        cmd::become_root(&format!("making {} needs root", venv.display()))?;
    }
    let t0 = Instant::now();
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    cmd::run(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&venv),
    )?;
    cmd::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(req_path),
    )?;
    fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
    report(item, &format!("installed in {}", secs(t0.elapsed())));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libllvm_major_from_file_name() {
        assert_eq!(
            libllvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"),
            Some(22)
        );
        assert_eq!(
            libllvm_major("libLLVM.so.23.0-rust-1.99.0-nightly"),
            Some(23)
        );
        // The unversioned development name in the same directory is not the runtime library.
        assert_eq!(libllvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
        assert_eq!(libllvm_major("libLLVM.so"), None);
    }
}
