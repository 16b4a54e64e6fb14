//! `awaitlab daemon --config agent.toml`: follow Docker containers, keep them measured, serve
//! their metrics (and an optional control endpoint). See `crate::daemon` for how it works and
//! `deploy/agent.toml` for a documented configuration.
//!
//! This module only parses flags, checks privileges and the configuration, and maps errors to
//! exit codes: a bad configuration is a usage error (64).

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use crate::{
    daemon::{self, config::DaemonConfig},
    fail, EXIT_NOPERM, EXIT_USAGE,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration file (TOML; see deploy/agent.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Serve /metrics here instead of the file's metrics_addr (port 0: a free port, printed).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve the control endpoint here instead of the file's control addr.
    #[arg(long, value_name = "ADDR")]
    pub control_addr: Option<SocketAddr>,
}

pub fn run(args: Args) -> ExitCode {
    let mut cfg = match DaemonConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => return fail(&anyhow::Error::new(e), EXIT_USAGE),
    };
    if let Some(a) = args.metrics_addr {
        cfg.metrics_addr = a;
    }
    if let Some(a) = args.control_addr {
        match &mut cfg.control {
            Some(c) => c.addr = a,
            None => {
                cfg.control = Some(daemon::config::ControlConfig {
                    addr: a,
                    token: None,
                    token_file: None,
                    load_allow: daemon::config::default_load_allow(),
                })
            }
        }
    }
    // Flags may have moved the control endpoint: check again.
    if let Err(e) = cfg.validate() {
        return fail(&anyhow::Error::new(e), EXIT_USAGE);
    }
    let token = match cfg.control_token() {
        Ok(t) => t,
        Err(e) => return fail(&anyhow::Error::new(e), EXIT_USAGE),
    };
    use crate::privilege::{require, Need, DAEMON};
    let why = "eBPF probes, other containers' namespaces, delay rules";
    if let Err(e) = require("awaitlab daemon", why, Need::Caps(DAEMON)) {
        return fail(&anyhow::Error::new(e), EXIT_NOPERM);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::Error::new(e).context("starting the runtime"), 1),
    };
    match rt.block_on(daemon::run(cfg, token)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, 1),
    }
}
