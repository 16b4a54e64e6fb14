//! `cargo xtask base-image`: the Debian base image that the project's Dockerfiles build on when
//! no registry is reachable (`debootstrap --variant=minbase bookworm`, then `docker import`).
//! `cargo xtask images`: the system under test's images and the agent's (docker/), built on
//! that base.
//!
//! Idempotent: an existing image is kept. It must never pull from a registry, and it removes its
//! scratch root filesystem also on failure.

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Context as _, Result};

use crate::cmd;

/// The locally made base image; Dockerfiles take it as `--build-arg BASE=...`.
pub const BASE_IMAGE: &str = "awaitlab/base:bookworm";

pub fn base_image() -> Result<()> {
    if cmd::succeeds(Command::new("docker").args(["image", "inspect", BASE_IMAGE])) {
        println!("{BASE_IMAGE:<40} ok");
        return Ok(());
    }
    let t0 = Instant::now();
    let root =
        Scratch(std::env::temp_dir().join(format!("awaitlab-rootfs-{}", std::process::id())));
    std::fs::create_dir_all(&root.0).with_context(|| format!("creating {}", root.0.display()))?;
    cmd::run(
        Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&root.0),
    )
    .context("debootstrap (cargo xtask setup installs it)")?;
    cmd::run(Command::new("sh").arg("-c").arg(format!(
        "tar -C '{}' -c . | docker import - {BASE_IMAGE}",
        root.0.display()
    )))
    .context("docker import")?;
    println!("{BASE_IMAGE:<40} built in {}", cmd::secs(t0.elapsed()));
    Ok(())
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        // debootstrap leaves bind mounts (proc, sys) behind when it fails half way.
        for m in ["proc", "sys", "dev/pts", "dev"] {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.0.join(m))
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Images of the system under test, as `(tag, dockerfile, stack)`; the tags are the ones the
/// agent's docker back end looks for (`agent/src/study/sut/docker.rs`).
const SUT_IMAGES: &[(&str, &str, Option<&str>)] = &[
    ("awaitlab/postgres:15", "Dockerfile.postgres", None),
    ("awaitlab/server:study", "Dockerfile.server", Some("study")),
    (
        "awaitlab/server:current",
        "Dockerfile.server",
        Some("current"),
    ),
];

/// `cargo xtask images`: the base image (if missing), then PostgreSQL and the two server stacks
/// built on it. `docker build` fetches Debian packages from inside the build; the Python wheels
/// come from the host's pip (see below). The layer cache makes a second run take seconds.
pub fn images() -> Result<()> {
    images_with(Build::Release)
}

/// Which build of the agent goes into its image: `cargo xtask images` ships the release binary;
/// `cargo xtask test` puts in the debug binary its build step made (the tests check what the
/// image does, not how fast, and a release build would add minutes to CI).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Build {
    Release,
    Debug,
}

/// [`images`] with the agent's image from `build`.
pub fn images_with(build: Build) -> Result<()> {
    base_image()?;
    let context = cmd::workspace_root().join("docker");
    // Builds on this kind of host cannot verify PyPI's certificate from inside a container (the
    // host's trust store is not the image's), so the wheels are fetched by the host's pip, with
    // the host's configuration, and installed offline in the build.
    crate::setup::sut_venvs()?;
    for stack in ["study", "current"] {
        let dest = context.join("wheels").join(stack);
        cmd::output(
            Command::new(crate::setup::venv_base().join(format!("venv-{stack}/bin/pip")))
                .args([
                    "download",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--only-binary=:all:",
                    "-r",
                ])
                .arg(context.join(format!("app/requirements-{stack}.txt")))
                .arg("-d")
                .arg(&dest),
        )
        .with_context(|| format!("downloading the {stack} stack's wheels"))?;
    }
    for (tag, dockerfile, stack) in SUT_IMAGES {
        let t0 = Instant::now();
        let mut c = Command::new("docker");
        c.args(["build", "-q", "-f"])
            .arg(context.join(dockerfile))
            .args(["--build-arg", &format!("BASE={BASE_IMAGE}")])
            .args(["-t", tag]);
        if let Some(stack) = stack {
            c.args(["--build-arg", &format!("STACK={stack}")]);
        }
        c.arg(&context);
        cmd::output(&mut c).with_context(|| format!("building {tag}"))?;
        println!("{tag:<40} built in {}", cmd::secs(t0.elapsed()));
    }
    agent_image(build)
}

/// The agent's version, from agent/Cargo.toml (the image's tag).
fn agent_version() -> Result<String> {
    let path = cmd::workspace_root().join("agent/Cargo.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .map(str::to_string)
        .context("no version in agent/Cargo.toml")
}

/// `awaitlab/agent:VERSION`: the agent and the example configuration on the base image, with
/// tc and iptables (docker/Dockerfile.agent). Builds the binary first (seconds when it is up to
/// date).
fn agent_image(build: Build) -> Result<()> {
    let t0 = Instant::now();
    let tag = format!("awaitlab/agent:{}", agent_version()?);
    let (args, dir): (&[&str], &str) = match build {
        Build::Release => (&["build", "--release", "-p", "agent"], "release"),
        Build::Debug => (&["build", "-p", "agent"], "debug"),
    };
    cmd::run(cmd::cargo().args(args)).context("building the agent for its image")?;
    let root = cmd::workspace_root();
    let context =
        Scratch(std::env::temp_dir().join(format!("awaitlab-agent-image-{}", std::process::id())));
    std::fs::create_dir_all(&context.0)
        .with_context(|| format!("creating {}", context.0.display()))?;
    for (from, to) in [
        (cmd::target_dir().join(dir).join("awaitlab"), "awaitlab"),
        (root.join("deploy/agent.toml"), "agent.toml"),
        (root.join("docker/Dockerfile.agent"), "Dockerfile"),
    ] {
        std::fs::copy(&from, context.0.join(to))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    let version = format!("VERSION={}", agent_version()?);
    cmd::output(
        Command::new("docker")
            .args(["build", "-q", "--build-arg", &format!("BASE={BASE_IMAGE}")])
            .args(["--build-arg", &version, "-t", &tag])
            .arg(&context.0),
    )
    .with_context(|| format!("building {tag}"))?;
    println!("{tag:<40} built in {}", cmd::secs(t0.elapsed()));
    Ok(())
}
