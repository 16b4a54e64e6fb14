//! `cargo xtask bench probes|delay|load|soak`: the benchmarks, one module each, and what they share
//! (`util`). Each runs our code and its peers in one go on the same machine and prints ratios;
//! each cleans up what it made, also on error or Ctrl-C.

mod bpfstats;
mod delay;
mod load;
mod netns;
mod probes;
mod soak;
mod util;
mod wrk;

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Overhead of the agent's probes on an nginx under wrk load (needs root).
    Probes(probes::ProbesArgs),
    /// Accuracy, packet rate and CPU of `awaitlab delay` (needs root).
    Delay(delay::DelayArgs),
    /// `awaitlab load` against wrk, oha and Locust on one loopback nginx; peak memory at 10k users.
    Load(load::LoadArgs),
    /// The daemon following a container restarted every 30 s under load: RSS and series each
    /// minute (needs root and Docker).
    Soak(soak::SoakArgs),
}

pub fn run(args: &BenchArgs) -> Result<()> {
    match &args.bench {
        Bench::Probes(a) => probes::run(a),
        Bench::Delay(a) => delay::run(a),
        Bench::Load(a) => load::run(a),
        Bench::Soak(a) => soak::run(a),
    }
}
