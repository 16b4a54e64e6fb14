//! `cargo xtask`: the project's orchestration (setup, test, ci, bench).
//!
//! This binary only drives other tools (apt, rustup, cargo, ip, nginx, wrk, bpftool) and reads
//! their results. It must not hold product logic (that belongs in `agent/`), and every host side
//! effect it creates (namespaces, processes, sysctls) is undone by a guard, also on error.

mod bench;
mod cmd;
mod dashboards;
mod images;
mod setup;
mod study;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Development tasks for awaitlab. Run from anywhere inside the workspace.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what builds and tests need (Debian packages, nightly rust-src, bpf-linker).
    ///
    /// Idempotent: fast, and prints "ok" per item when everything is present.
    Setup,
    /// Setup, build, unit tests, then the privileged integration tests (needs root).
    Test(test::TestArgs),
    /// What CI runs: the same as `test`.
    Ci(test::TestArgs),
    /// Benchmarks.
    Bench(bench::BenchArgs),
    /// The README's run command: setup, release build, then the quick study (`awaitlab run`).
    Study(study::StudyArgs),
    /// Build the local Debian base image (debootstrap + docker import) if it is missing.
    BaseImage,
    /// Check the Grafana dashboards, provisioning, Prometheus config and compose file.
    Dashboards,
    /// Build the system-under-test images (PostgreSQL, the study and current Django servers)
    /// and the agent's image (awaitlab/agent:VERSION) on the local base image, building that
    /// first if it is missing.
    Images,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Test(args) | Command::Ci(args) => test::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Study(args) => study::run(&args),
        Command::BaseImage => images::base_image(),
        Command::Dashboards => dashboards::run(),
        Command::Images => images::images(),
    }
}
