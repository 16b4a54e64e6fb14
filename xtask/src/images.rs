//! `cargo xtask base-image`: the Debian base image that the project's Dockerfiles build on when
//! no registry is reachable (`debootstrap --variant=minbase bookworm`, then `docker import`).
//! `cargo xtask images`: the system under test's images (docker/), built on that base.
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
    Ok(())
}
