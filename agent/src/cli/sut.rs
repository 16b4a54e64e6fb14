//! `awaitlab sut up|down|status|reset|switch`: the system under test from the command line. `up` brings
//! it up, seeds it and leaves it running, recording it in `/run/awaitlab/sut-NAME.json`, which
//! `status`, `reset` and `down` read. Ctrl-C or SIGTERM during `up` takes down what was made.
//!
//! It must not guess: without a state file, `down` removes objects of the given name (both back
//! ends), which is how a killed run's leftovers are cleared; it touches nothing of another name.

use std::{process::ExitCode, time::Instant};

use anyhow::Context as _;

use crate::{
    fail,
    study::sut::{
        state_path, BackendKind, DbAuth, Options, Setup, Stack, State, Sut, DEFAULT_NAME,
        STATE_VERSION,
    },
    EXIT_NOPERM, EXIT_USAGE,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: SutCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum SutCommand {
    /// Bring up PostgreSQL and one Django server, seed 1,000,000 posts, and leave them running.
    Up(UpArgs),
    /// Remove everything `up` made (also what a killed run left behind).
    Down(NameArgs),
    /// Show the running system (exit 1 when it is not up).
    Status(StatusArgs),
    /// Delete the posts created since seeding: back to exactly 1,000,000 rows.
    Reset(NameArgs),
    /// Replace the server with another setup or stack; the database and its posts stay.
    Switch(SwitchArgs),
}

#[derive(Debug, clap::Args)]
pub struct SwitchArgs {
    /// The study's setup.
    #[arg(long, value_enum)]
    pub setup: Setup,
    /// Python stack.
    #[arg(long, value_enum, default_value_t = Stack::Current)]
    pub stack: Stack,
    #[command(flatten)]
    pub name: NameArgs,
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The study's setup.
    #[arg(long, value_enum)]
    pub setup: Setup,
    /// Containers (docker) or processes in network namespaces (netns).
    #[arg(long, value_enum, default_value_t = BackendKind::Docker)]
    pub backend: BackendKind,
    /// Python stack: the study's pinned versions or current ones.
    #[arg(long, value_enum, default_value_t = Stack::Current)]
    pub stack: Stack,
    /// docker: host port on 127.0.0.1 for the server (default: an ephemeral port).
    #[arg(long)]
    pub port: Option<u16>,
    /// How PostgreSQL authenticates the server: SCRAM-SHA-256 with a password as in the study,
    /// or trust (the control without authentication).
    #[arg(long, value_enum, default_value_t = DbAuth::Scram)]
    pub db_auth: DbAuth,
    /// Do not seed (the table stays empty).
    #[arg(long)]
    pub no_seed: bool,
    /// Print the state as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub name: NameArgs,
}

#[derive(Debug, clap::Args)]
pub struct NameArgs {
    /// Name of the system (prefix of every object it makes).
    #[arg(long, default_value = DEFAULT_NAME)]
    pub name: String,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON (`{"version":1,"up":...,"state":...}`).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub name: NameArgs,
}

pub fn run(args: Args) -> ExitCode {
    let why = "namespaces, processes of other users, containers";
    if let Err(e) = crate::privilege::require("awaitlab sut", why, crate::privilege::Need::Root) {
        return fail(&anyhow::Error::new(e), EXIT_NOPERM);
    }
    let result = match args.command {
        SutCommand::Up(a) => up(a),
        SutCommand::Down(a) => down(&a.name),
        SutCommand::Status(a) => status(a),
        SutCommand::Reset(a) => reset(&a.name),
        SutCommand::Switch(a) => switch(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let usage = e
                .downcast_ref::<crate::study::sut::SutError>()
                .is_some_and(|e| e.is_usage());
            fail(&e, if usage { EXIT_USAGE } else { 1 })
        }
    }
}

fn read_state(name: &str) -> anyhow::Result<Option<State>> {
    let path = state_path(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(
            serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_state(state: &State) -> anyhow::Result<()> {
    let path = state_path(&state.name);
    let dir = path.parent().expect("state files live in a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::files::write_atomic(
        &path,
        (serde_json::to_string_pretty(state)? + "\n").as_bytes(),
    )
    .with_context(|| format!("writing {}", path.display()))
}

/// On SIGINT/SIGTERM while `up` runs: take down what exists so far and exit 130.
fn cleanup_on_signal(kind: BackendKind, name: String) -> anyhow::Result<()> {
    crate::signals::on_stop(move |_| {
        eprintln!("awaitlab: interrupted: taking down {name}");
        if let Err(e) = kind.backend().down(&name) {
            eprintln!(
                "awaitlab: error: taking down {name}: {e} (run `awaitlab sut down --name {name}`)"
            );
        }
        std::process::exit(130);
    })
    .context("starting the signal thread")
}

fn up(a: UpArgs) -> anyhow::Result<ExitCode> {
    // Before any thread starts: `cleanup_on_signal`'s thread takes SIGINT and SIGTERM for all.
    crate::signals::block();
    let name = a.name.name;
    let mut opts = Options::new(a.setup, a.stack, &name);
    opts.host_port = a.port;
    opts.db_auth = a.db_auth;
    opts.validate()?;
    if let Some(old) = read_state(&name)? {
        if Sut::attach(old.clone()).alive() {
            anyhow::bail!(
                "{name} is already up ({}, {}, {}); run `awaitlab sut down` first",
                old.backend.name(),
                old.setup.name(),
                old.stack.name()
            );
        }
    }
    cleanup_on_signal(a.backend, name.clone())?;
    let t0 = Instant::now();
    eprintln!(
        "bringing up {name}: {} on {}, {} stack",
        a.setup.name(),
        a.backend.name(),
        a.stack.name()
    );
    let sut = Sut::up(a.backend, &opts).with_context(|| format!("bringing up {name}"))?;
    eprintln!("  up in {:.1}s", t0.elapsed().as_secs_f64());
    if !a.no_seed {
        eprintln!("  seeding 1,000,000 posts (once; about 10 s)");
        let r = sut.seed().context("seeding")?;
        eprintln!(
            "  {} {} posts in {:.1}s",
            if r.seeded { "seeded" } else { "already had" },
            r.rows,
            r.seconds
        );
    }
    let sut_record = sut.system().ok().cloned();
    let state = sut.keep();
    write_state(&state)?;
    if a.json {
        println!("{}", serde_json::to_string(&state)?);
    } else {
        println!("url         {}", state.url);
        println!("netns       {}", state.netns);
        println!("db port     {}", state.db_port);
        let pids: Vec<String> = state.server_pids.iter().map(u32::to_string).collect();
        println!("server pids {}", pids.join(","));
        if let Some(r) = sut_record {
            println!(
                "runs        Django {} (DEBUG {}), {}, PostgreSQL {} ({} authentication)",
                r.django,
                if r.debug { "on" } else { "off" },
                r.db_driver,
                r.postgres_version,
                r.db_auth_method().unwrap_or("unknown")
            );
        }
        println!("state       {}", state_path(&name).display());
    }
    Ok(ExitCode::SUCCESS)
}

fn down(name: &str) -> anyhow::Result<ExitCode> {
    let kinds = match read_state(name)? {
        Some(s) => vec![s.backend],
        None => vec![BackendKind::Netns, BackendKind::Docker],
    };
    let mut removed = false;
    for kind in kinds {
        match kind.backend().down(name) {
            Ok(found) => removed |= found,
            // Without a state file, a host without Docker has nothing to remove there.
            Err(e) if read_state(name)?.is_none() && kind == BackendKind::Docker => {
                tracing::debug!("docker: {e}");
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("taking down {name} ({})", kind.name()))
                )
            }
        }
    }
    let path = state_path(name);
    if path.exists() {
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    println!(
        "{name}: {}",
        if removed {
            "removed"
        } else {
            "nothing to remove"
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let name = &a.name.name;
    // Attached: as the system runs now (a container Docker restarted has a new namespace and
    // may have a new port), not as the file written at `up` says.
    let sut = read_state(name)?.map(Sut::attach);
    let up = sut.as_ref().is_some_and(Sut::alive);
    let state = sut.map(|s| s.state().clone());
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "version": STATE_VERSION, "name": name, "up": up, "state": state })
        );
    } else {
        match &state {
            Some(s) => println!(
                "{name}: {} ({}, {}, {} stack) url {} netns {} db port {}",
                if up {
                    "up"
                } else {
                    "DOWN (processes gone; run `awaitlab sut down`)"
                },
                s.backend.name(),
                s.setup.name(),
                s.stack.name(),
                s.url,
                s.netns,
                s.db_port
            ),
            None => println!("{name}: not up"),
        }
    }
    Ok(if up {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn reset(name: &str) -> anyhow::Result<ExitCode> {
    let state = read_state(name)?.with_context(|| format!("{name} is not up"))?;
    let sut = Sut::attach(state);
    let deleted = sut.reset().context("resetting")?;
    println!("{name}: deleted {deleted} posts; {} rows", sut.count()?);
    Ok(ExitCode::SUCCESS)
}

fn switch(a: SwitchArgs) -> anyhow::Result<ExitCode> {
    let name = a.name.name;
    let state = read_state(&name)?.with_context(|| format!("{name} is not up"))?;
    let mut sut = Sut::attach(state);
    let t0 = Instant::now();
    // On failure the state file keeps the old server, now gone: `status` says so and `down`
    // still removes everything.
    sut.switch(a.setup, a.stack)
        .with_context(|| format!("switching {name} to {}", a.setup.name()))?;
    write_state(sut.state())?;
    eprintln!("  switched in {:.1}s", t0.elapsed().as_secs_f64());
    println!("url         {}", sut.url());
    println!("netns       {}", sut.netns());
    Ok(ExitCode::SUCCESS)
}
