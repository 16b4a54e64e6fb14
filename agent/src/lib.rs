//! awaitlab: an eBPF agent that measures how a web server spends each request (working, waiting
//! on its database, queued) while network latency and load change.
//!
//! Layout: `target` resolves what to watch, `probes` loads and attaches the eBPF programs,
//! `aggregate` turns their records into figures, `cmd` holds one module per subcommand.
//! This file only parses the command line, sets up logging and maps errors to exit codes.

pub mod aggregate;
pub mod clock;
pub mod cmd;
pub mod daemon;
pub mod experiment;
pub mod load;
pub mod metrics;
pub mod netem;
pub mod privilege;
pub mod probes;
pub mod report;
pub mod results;
pub mod signals;
pub mod sut;
pub mod target;

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

/// Exit code for usage errors (BSD sysexits EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// Exit code when the agent lacks privileges (EX_NOPERM).
pub const EXIT_NOPERM: u8 = 77;

/// Measure per-request server time, database round trips and CPU wait of a server, with eBPF.
#[derive(Debug, Parser)]
#[command(name = "awaitlab", version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr (filter with AWAITLAB_LOG, default `warn,awaitlab=info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to a network namespace and print what its server does, once a second.
    Watch(cmd::watch::Args),
    /// Follow Docker containers (by name or label), keep them measured across restarts, and
    /// serve their metrics and an optional control endpoint.
    Daemon(cmd::daemon::Args),
    /// Run the study's matrix (setup x route x added delay x repetition) and write the report.
    Run(Box<cmd::run::Args>),
    /// Write report.md and report.html from a results directory.
    Report(cmd::report::Args),
    /// Inject a network delay into a target's namespace (tc netem or an NFQUEUE delay line).
    Delay(cmd::delay::Args),
    /// Load an HTTP server: the study's closed-loop ramp, stages, or an open model.
    Load(Box<cmd::load::Args>),
    /// Bring the study's system under test (PostgreSQL + one Django server) up or down.
    Sut(cmd::sut::Args),
}

/// Parses `args` and runs the subcommand. Errors print one line; usage errors exit with 64.
pub fn run(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::from(
                    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        EXIT_USAGE
                    } else {
                        0
                    },
                );
            }
            // One line: clap's first line without its "error: " prefix, and where to look next.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("awaitlab: error: {first} (see --help)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logging(cli.log_format);
    match cli.command {
        Command::Watch(args) => cmd::watch::run(args),
        Command::Daemon(args) => cmd::daemon::run(args),
        Command::Run(args) => cmd::run::run(*args),
        Command::Report(args) => cmd::report::run(args),
        Command::Delay(args) => cmd::delay::run(args),
        Command::Load(args) => cmd::load::run(*args),
        Command::Sut(args) => cmd::sut::run(args),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AWAITLAB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,awaitlab=info"));
    // Colours only on a terminal: a log written to a file or a pipe stays plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Prints `awaitlab: error: ...` (the whole cause chain on one line) and returns `code`.
pub fn fail(e: &anyhow::Error, code: u8) -> ExitCode {
    eprintln!("awaitlab: error: {}", one_line(e));
    ExitCode::from(code)
}

/// The cause chain joined with ": ", leaving out a cause whose text the previous link already
/// includes (library errors often name their source in their own message).
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.replace('\n', " ")
}
