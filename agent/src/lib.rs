//! awaitlab: an eBPF agent that measures how a web server spends each request (working, waiting
//! on its database, queued) while network latency and load change.
//!
//! Three products over shared parts, dependencies one way (docs/architecture.md):
//!
//! - the front end: `cli` (one module per subcommand), `daemon` (follows containers),
//!   `metrics` (Prometheus and the HTTP server), and this file, which only parses the command
//!   line, sets up logging and maps errors to exit codes;
//! - `study`: the system under test, the experiment runner, its results and the report;
//! - `probe` (namespaces, loading and attaching the eBPF programs, the one probe `Session`,
//!   aggregation), `delay` (netem and the NFQUEUE delay line) and `load` (the load generator);
//! - `clock`, `privilege` and `signals`, which every part may use.

pub mod cli;
pub mod clock;
pub mod daemon;
pub mod delay;
mod files;
pub mod load;
pub mod metrics;
pub mod privilege;
pub mod probe;
pub mod signals;
pub mod study;

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

/// Exit code for usage errors (BSD sysexits EX_USAGE).
pub(crate) const EXIT_USAGE: u8 = 64;
/// Exit code when the agent lacks privileges (EX_NOPERM).
pub(crate) const EXIT_NOPERM: u8 = 77;

/// Measure per-request server time, database round trips and CPU wait of a server, with eBPF.
#[derive(Debug, Parser)]
#[command(name = "awaitlab", version, about, long_about = None)]
pub(crate) struct Cli {
    /// Log format on stderr (filter with AWAITLAB_LOG, default `warn,awaitlab=info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to a network namespace and print what its server does, once a second.
    Watch(cli::watch::Args),
    /// Follow Docker containers (by name or label), keep them measured across restarts, and
    /// serve their metrics and an optional control endpoint.
    Daemon(cli::daemon::Args),
    /// Run the study's matrix (setup x route x added delay x repetition) and write the report.
    Run(Box<cli::run::Args>),
    /// Write report.md and report.html from a results directory.
    Report(cli::report::Args),
    /// Inject a network delay into a target's namespace (tc netem or an NFQUEUE delay line).
    Delay(cli::delay::Args),
    /// Load an HTTP server: the study's closed-loop ramp, stages, or an open model.
    Load(Box<cli::load::Args>),
    /// Bring the study's system under test (PostgreSQL + one Django server) up or down.
    Sut(cli::sut::Args),
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
        Command::Watch(args) => cli::watch::run(args),
        Command::Daemon(args) => cli::daemon::run(args),
        Command::Run(args) => cli::run::run(*args),
        Command::Report(args) => cli::report::run(args),
        Command::Delay(args) => cli::delay::run(args),
        Command::Load(args) => cli::load::run(*args),
        Command::Sut(args) => cli::sut::run(args),
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
pub(crate) fn one_line(e: &anyhow::Error) -> String {
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

/// The dependencies go one way (docs/architecture.md): no library module imports the front end
/// (`cli`, `daemon`), and the probes, the delay injector and the load generator know nothing of
/// the study. Read from the sources, `use crate::{...}` groups included.
#[cfg(test)]
mod layering {
    use std::{collections::BTreeSet, fs, path::Path};

    /// The top-level modules a source text names after `crate::`.
    fn crate_modules(src: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut rest = src;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // Top-level items of the group: the identifiers at depth 0.
                let mut depth = 0;
                let mut item_start = true;
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            rest = &group[j..];
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if item_start && (c.is_alphanumeric() || c == '_') => {
                            let ident: String = group[j..]
                                .chars()
                                .take_while(|c| c.is_alphanumeric() || *c == '_')
                                .collect();
                            out.insert(ident);
                            item_start = false;
                        }
                        _ => {}
                    }
                }
            } else {
                out.insert(
                    rest.chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect(),
                );
            }
        }
        out
    }

    fn sources(path: &Path, out: &mut Vec<(String, String)>) {
        if path.is_dir() {
            for e in fs::read_dir(path).unwrap() {
                sources(&e.unwrap().path(), out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((
                path.display().to_string(),
                fs::read_to_string(path).unwrap(),
            ));
        }
    }

    #[test]
    fn the_front_end_is_imported_by_no_library_module() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let rules: [(&[&str], &[&str]); 2] = [
            (
                &[
                    "probe",
                    "delay",
                    "load",
                    "clock.rs",
                    "files.rs",
                    "privilege.rs",
                    "signals.rs",
                ],
                &["cli", "daemon", "study"],
            ),
            (&["study", "metrics"], &["cli", "daemon"]),
        ];
        let mut checked = 0;
        let mut bad = Vec::new();
        for (modules, forbidden) in rules {
            for m in modules {
                let mut files = Vec::new();
                sources(&src.join(m), &mut files);
                assert!(!files.is_empty(), "no sources under {m}");
                for (file, text) in files {
                    checked += 1;
                    for used in crate_modules(&text) {
                        if forbidden.contains(&used.as_str()) {
                            bad.push(format!("{file} uses crate::{used}"));
                        }
                    }
                }
            }
        }
        assert!(checked > 30, "only {checked} files read");
        assert!(bad.is_empty(), "{bad:#?}");
        // The parser sees both forms, so the test can fail.
        let sample = "use crate::{clock, cli::watch};\nfn f() { crate::daemon::x(); }";
        assert_eq!(
            crate_modules(sample),
            ["cli", "clock", "daemon"].map(String::from).into()
        );
    }
}
