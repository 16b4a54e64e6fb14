//! `cargo xtask test` (and `cargo xtask ci`): setup, format check, build, unit tests, clippy
//! (warnings are errors), rustdoc (warnings are errors), images, privileged tests.
//!
//! One fixed sequence so that a developer and CI run exactly the same steps. It must stop at the
//! first failing step and exit non-zero, and must not skip the privileged tests silently: without
//! root it refuses to start instead of reporting a partial pass.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use crate::cmd::{self, secs};
use crate::setup;

#[derive(Args)]
pub struct TestArgs {
    /// Extra arguments for the privileged test binary, e.g. a test name filter
    /// (`cargo xtask test -- probes_see_requests`).
    #[arg(last = true)]
    pub privileged_args: Vec<String>,
}

/// `agent-ebpf` is `#![no_std]`/`#![no_main]` for `bpfel-unknown-none`; it cannot be built for
/// the host, and `agent/build.rs` builds it for the BPF target anyway.
const HOST_EXCLUDE: [&str; 2] = ["--exclude", "agent-ebpf"];

pub fn run(args: &TestArgs) -> Result<()> {
    // First, so that a run without root goes to sudo (or fails) in a second, not after minutes
    // of building.
    cmd::become_root(
        "`cargo xtask test` runs privileged eBPF and network-namespace tests and needs root",
    )?;
    let start = Instant::now();

    step("setup", setup::run)?;
    step("format", || {
        cmd::run(cmd::cargo().args(["fmt", "--all", "--check"]))
    })?;
    step("build", || {
        cmd::run(with_env(
            cmd::cargo()
                .args(["build", "--workspace"])
                .args(HOST_EXCLUDE),
        ))
    })?;
    step("unit tests", || {
        cmd::run(with_env(
            cmd::cargo()
                .args(["test", "--workspace", "--lib", "--bins"])
                .args(HOST_EXCLUDE),
        ))
    })?;
    step("clippy", || {
        cmd::run(
            cmd::cargo()
                .args(["clippy", "--workspace", "--all-targets"])
                .args(HOST_EXCLUDE)
                .args(["--", "-D", "warnings"]),
        )?;
        // The eBPF crate, for its own target, as agent/build.rs builds it.
        cmd::run(cmd::cargo().args([
            "+nightly",
            "clippy",
            "-p",
            "agent-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    step("doc", || {
        cmd::run(
            cmd::cargo()
                .args(["doc", "--no-deps", "--workspace"])
                .args(HOST_EXCLUDE)
                .env("RUSTDOCFLAGS", "-D warnings"),
        )
    })?;
    // The system-under-test tests run the images, and the delay and daemon tests build throwaway
    // images FROM the local base image (built first); cached builds take seconds.
    step("images", || {
        crate::images::images_with(crate::images::Build::Debug)
    })?;
    step("privileged tests", || {
        // One at a time: the tests share kernel-wide state (tracepoints, bpf stats, namespaces
        // with fixed names) and their timing assertions need the CPU to themselves.
        cmd::run(with_env(
            cmd::cargo()
                // Every integration test target of the agent (tests/*.rs): each is privileged.
                .args([
                    "test",
                    "-p",
                    "agent",
                    "--test",
                    "*",
                    "--",
                    "--test-threads=1",
                ])
                .args(&args.privileged_args),
        ))
    })?;

    println!("\nall steps passed in {}", secs(start.elapsed()));
    Ok(())
}

fn with_env(cmd: &mut Command) -> &mut Command {
    cmd.env("RUST_BACKTRACE", "1")
}

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    println!("\n==> {name}");
    let start = Instant::now();
    let result = f();
    let took = secs(start.elapsed());
    match &result {
        Ok(()) => println!("<== {name}: ok ({took})"),
        Err(_) => println!("<== {name}: FAILED ({took})"),
    }
    result.with_context(|| format!("step `{name}` failed"))
}
