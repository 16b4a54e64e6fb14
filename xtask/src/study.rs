//! `cargo xtask study`: the README's run command. Installs what is missing (as `setup`), builds
//! the agent in release mode, and runs the quick study on the back end that needs no Docker
//! (`awaitlab run`, defaults from study.toml's keys: netns, current stack, quick profile). Extra
//! arguments after `--` go to `awaitlab run` (e.g. `-- --profile study --repeat 3`).
//!
//! It only orchestrates: the experiment itself is `awaitlab run`.

use std::process::Command;

use anyhow::{bail, Result};
use clap::Args;

use crate::{cmd, setup};

#[derive(Args)]
pub struct StudyArgs {
    /// Arguments for `awaitlab run`.
    #[arg(last = true)]
    pub run_args: Vec<String>,
}

pub fn run(args: &StudyArgs) -> Result<()> {
    cmd::become_root("the study needs root (network namespaces, delay rules, eBPF probes)")?;
    setup::run()?;
    cmd::run(cmd::cargo().args(["build", "--release", "-p", "agent"]))?;
    let bin = cmd::target_dir().join("release/awaitlab");
    let status = Command::new(&bin)
        .arg("run")
        .args(&args.run_args)
        .status()?;
    if !status.success() {
        bail!("awaitlab run exited with {status}");
    }
    Ok(())
}
