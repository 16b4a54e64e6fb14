//! `cargo xtask base-image`: the Debian base image that the project's Dockerfiles build on when
//! no registry is reachable (`debootstrap --variant=minbase bookworm`, then `docker import`).
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
    let root = Scratch(std::env::temp_dir().join(format!("awaitlab-rootfs-{}", std::process::id())));
    std::fs::create_dir_all(&root.0).with_context(|| format!("creating {}", root.0.display()))?;
    cmd::run(Command::new("debootstrap").args(["--variant=minbase", "bookworm"]).arg(&root.0))
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
            let _ = Command::new("umount").arg("-l").arg(self.0.join(m)).stderr(std::process::Stdio::null()).status();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
