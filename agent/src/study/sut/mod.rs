//! The system under test: PostgreSQL with the study's 1,000,000 posts and one Django server in
//! one of the study's setups, brought up and torn down by the agent. One interface (`Sut`), two
//! back ends behind the `Backend` trait: `docker` (containers on a private network, through the
//! engine's API) and `netns` (Debian's PostgreSQL and a Python virtual environment, each in its
//! own network namespace). Both hand the rest of the agent the same things: a server URL that the
//! host can reach, the database port, and the server's network namespace for probes and delay.
//!
//! It must not leave anything behind: every object is named after the system's name (prefix
//! `awl`), `down` removes all of them, also those of a killed earlier run, and a `Sut` that is
//! dropped without `keep()` takes itself down. It never touches objects of another name.

pub mod docker;
pub mod netns;

use std::{
    future::Future,
    net::{SocketAddr, ToSocketAddrs as _},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// The Django project, SQL scripts and requirements, embedded so that the binary needs no
/// checkout: the netns back end writes them out, and the SQL runs through psql on both.
pub(crate) mod assets {
    pub(crate) const APP_FILES: &[(&str, &str)] = &[
        (
            "manage.py",
            include_str!("../../../../docker/app/manage.py"),
        ),
        ("serve.sh", include_str!("../../../../docker/app/serve.sh")),
        (
            "studysite/__init__.py",
            include_str!("../../../../docker/app/studysite/__init__.py"),
        ),
        (
            "studysite/settings.py",
            include_str!("../../../../docker/app/studysite/settings.py"),
        ),
        (
            "studysite/urls.py",
            include_str!("../../../../docker/app/studysite/urls.py"),
        ),
        (
            "studysite/wsgi.py",
            include_str!("../../../../docker/app/studysite/wsgi.py"),
        ),
        (
            "studysite/asgi.py",
            include_str!("../../../../docker/app/studysite/asgi.py"),
        ),
        (
            "posts/__init__.py",
            include_str!("../../../../docker/app/posts/__init__.py"),
        ),
        (
            "posts/apps.py",
            include_str!("../../../../docker/app/posts/apps.py"),
        ),
        (
            "posts/models.py",
            include_str!("../../../../docker/app/posts/models.py"),
        ),
        (
            "posts/urls.py",
            include_str!("../../../../docker/app/posts/urls.py"),
        ),
        (
            "posts/views_sync.py",
            include_str!("../../../../docker/app/posts/views_sync.py"),
        ),
        (
            "posts/views_async.py",
            include_str!("../../../../docker/app/posts/views_async.py"),
        ),
        (
            "posts/migrations/__init__.py",
            include_str!("../../../../docker/app/posts/migrations/__init__.py"),
        ),
        (
            "posts/migrations/0001_initial.py",
            include_str!("../../../../docker/app/posts/migrations/0001_initial.py"),
        ),
        (
            "posts/management/__init__.py",
            include_str!("../../../../docker/app/posts/management/__init__.py"),
        ),
        (
            "posts/management/commands/__init__.py",
            include_str!("../../../../docker/app/posts/management/commands/__init__.py"),
        ),
        (
            "posts/management/commands/system_record.py",
            include_str!("../../../../docker/app/posts/management/commands/system_record.py"),
        ),
    ];
    pub(crate) const SEED_SQL: &str = include_str!("../../../../docker/app/sql/seed.sql");
    pub(crate) const RESET_SQL: &str = include_str!("../../../../docker/app/sql/reset.sql");
    pub(crate) const REQUIREMENTS_STUDY: &str =
        include_str!("../../../../docker/app/requirements-study.txt");
    pub(crate) const REQUIREMENTS_CURRENT: &str =
        include_str!("../../../../docker/app/requirements-current.txt");
}

/// Rows the seed writes; `reset` restores exactly this many.
pub const SEED_ROWS: u64 = 1_000_000;
/// The port the server listens on inside its namespace or container.
pub const SERVER_PORT: u16 = 8000;
/// The port PostgreSQL listens on (as the server sees it).
pub(crate) const DB_PORT: u16 = 5432;
/// The name the CLI uses when none is given.
pub(crate) const DEFAULT_NAME: &str = "awlsut";
/// Version of the state file and of `status --json`.
pub(crate) const STATE_VERSION: u32 = 1;
/// The database superuser's password, which the server sends when PostgreSQL asks for it (the
/// study's image had `POSTGRES_PASSWORD`). Not a secret: the database is reachable only on the
/// system's private link, and what matters is that PostgreSQL authenticates as the study's did.
pub(crate) const DB_PASSWORD: &str = "awaitlab-study";

/// How PostgreSQL authenticates the server's connections (its pg_hba.conf rule for them). Chosen
/// when the database is made (`up`); `switch` keeps it. The runner's own psql connects over the
/// local socket or the loopback, which are trusted either way (as in the study's image).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DbAuth {
    /// SCRAM-SHA-256 with a password, as the study's postgres image (PostgreSQL >= 14) did:
    /// each new connection pays two more round trips than `trust`.
    #[default]
    Scram,
    /// No authentication: the control that shows what SCRAM costs.
    Trust,
}

impl DbAuth {
    /// The pg_hba.conf method.
    pub fn hba_method(self) -> &'static str {
        match self {
            DbAuth::Scram => "scram-sha-256",
            DbAuth::Trust => "trust",
        }
    }
}

/// The study's setups, plus a pooled variant of the async server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Setup {
    /// gunicorn, one sync worker, one thread; PostgreSQL max_connections=100.
    Sync,
    /// gunicorn with one uvicorn worker; PostgreSQL max_connections=100.
    AsyncLimited,
    /// The same server; PostgreSQL max_connections=1000.
    AsyncUnlimited,
    /// The async server with Django's psycopg 3 pool (20 connections); current stack only.
    AsyncPooled,
}

impl Setup {
    pub(crate) const ALL: [Setup; 4] = [
        Setup::Sync,
        Setup::AsyncLimited,
        Setup::AsyncUnlimited,
        Setup::AsyncPooled,
    ];

    /// `AWL_VIEWS`: which views and which server kind.
    pub(crate) fn views(self) -> &'static str {
        match self {
            Setup::Sync => "sync",
            _ => "async",
        }
    }

    /// PostgreSQL's `max_connections` (100 is PostgreSQL's default, as in the study).
    pub fn max_connections(self) -> u32 {
        match self {
            Setup::AsyncUnlimited => 1000,
            _ => 100,
        }
    }

    /// `AWL_DB_POOL`: 0 means a new connection per request (`CONN_MAX_AGE = 0`).
    pub(crate) fn pool_size(self) -> u32 {
        match self {
            Setup::AsyncPooled => 20,
            _ => 0,
        }
    }

    /// How the study's tables name it.
    pub fn title(self) -> &'static str {
        match self {
            Setup::Sync => "Sync",
            Setup::AsyncLimited => "Async Limited",
            Setup::AsyncUnlimited => "Async Unlimited",
            Setup::AsyncPooled => "Async Pooled",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Setup::Sync => "sync",
            Setup::AsyncLimited => "async-limited",
            Setup::AsyncUnlimited => "async-unlimited",
            Setup::AsyncPooled => "async-pooled",
        }
    }
}

/// Pinned Python stacks (docker/app/requirements-STACK.txt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Stack {
    /// The study's: Django 4.1.3, psycopg2 2.9.5, gunicorn 20.1.0, uvicorn 0.20.0.
    Study,
    /// Django 5.2 LTS, psycopg 3 (with pool), current gunicorn, uvicorn and uvicorn-worker.
    Current,
}

impl Stack {
    pub fn name(self) -> &'static str {
        match self {
            Stack::Study => "study",
            Stack::Current => "current",
        }
    }

    /// `AWL_SETTINGS` (docker/app/studysite/settings.py): the study's stack runs the study's
    /// Django settings (DEBUG on, default middleware minus CSRF, every SQL statement logged),
    /// the current stack production-like ones.
    pub(crate) fn django_settings(self) -> &'static str {
        match self {
            Stack::Study => "study",
            Stack::Current => "production",
        }
    }

    pub(crate) fn requirements(self) -> &'static str {
        match self {
            Stack::Study => assets::REQUIREMENTS_STUDY,
            Stack::Current => assets::REQUIREMENTS_CURRENT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// Containers through the Docker engine's API (images from `cargo xtask images`).
    Docker,
    /// Processes in network namespaces (venvs from `cargo xtask setup`); no Docker needed.
    Netns,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Docker => "docker",
            BackendKind::Netns => "netns",
        }
    }

    pub fn backend(self) -> Box<dyn Backend> {
        match self {
            BackendKind::Docker => Box::new(docker::Docker),
            BackendKind::Netns => Box::new(netns::Netns),
        }
    }
}

/// What to bring up.
#[derive(Debug, Clone)]
pub struct Options {
    pub setup: Setup,
    pub stack: Stack,
    /// Prefix of every object's name; must start with `awl` and be at most 10 characters
    /// (interface names are limited to 15 bytes).
    pub name: String,
    /// docker: the host port on 127.0.0.1 (None: an ephemeral port).
    pub host_port: Option<u16>,
    /// Extra PostgreSQL settings (`-c key=value` arguments).
    pub postgres_args: Vec<String>,
    /// docker: use this server image instead of `awaitlab/server:STACK`.
    pub server_image: Option<String>,
    /// How PostgreSQL authenticates the server (default: SCRAM, as in the study).
    pub db_auth: DbAuth,
}

impl Options {
    pub fn new(setup: Setup, stack: Stack, name: &str) -> Options {
        Options {
            setup,
            stack,
            name: name.into(),
            host_port: None,
            postgres_args: Vec::new(),
            server_image: None,
            db_auth: DbAuth::default(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), SutError> {
        if self.setup == Setup::AsyncPooled && self.stack != Stack::Current {
            return Err(SutError::Usage(
                "setup async-pooled needs --stack current (Django's connection pool came in Django 5.1)".into(),
            ));
        }
        let ok = self.name.starts_with("awl")
            && self.name.len() <= 10
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !ok {
            return Err(SutError::Usage(format!(
                "name {:?}: expected `awl` followed by up to 7 lowercase letters or digits",
                self.name
            )));
        }
        Ok(())
    }
}

/// Everything needed to find, use and remove a running system; also the CLI's state file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub version: u32,
    pub backend: BackendKind,
    pub setup: Setup,
    pub stack: Stack,
    pub name: String,
    /// Base URL of the server, reachable from the host (`http://ADDR:PORT`).
    pub url: String,
    /// The port PostgreSQL listens on, as the server connects to it.
    pub db_port: u16,
    /// The server's network namespace as a path for `namespace::Target::resolve`.
    pub netns: String,
    /// The server's processes: gunicorn's master first, then its workers.
    pub server_pids: Vec<u32>,
    /// PostgreSQL's postmaster.
    pub db_pid: u32,
}

impl State {
    pub fn server_addr(&self) -> Result<SocketAddr, SutError> {
        let hostport = self.url.trim_start_matches("http://");
        hostport
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| SutError::Other(format!("bad server URL {}", self.url)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SutError {
    #[error("{0}")]
    Usage(String),
    #[error("docker: {0}")]
    Docker(#[from] bollard::errors::Error),
    #[error("image {0} is missing; build it with `cargo xtask images`")]
    ImageMissing(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    /// A part that did not come up, with the last lines of its log.
    #[error("{what} did not start: {reason}; its log ends: {log}")]
    Start {
        what: String,
        reason: String,
        log: String,
    },
    #[error("{0}")]
    Other(String),
}

impl SutError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SutError {
        let what = what.into();
        move |source| SutError::Io { what, source }
    }

    pub(crate) fn is_usage(&self) -> bool {
        matches!(self, SutError::Usage(_))
    }
}

/// The last `n` non-empty lines of a log, joined with " | " so an error stays one line.
pub(crate) fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(n);
    if lines.is_empty() {
        return "(empty)".into();
    }
    lines[start..].join(" | ")
}

/// The server's environment as both back ends set it (docker/app/studysite/settings.py reads
/// it); `db_host` is where the server finds PostgreSQL. The netns back end adds its paths.
pub(crate) fn server_env(setup: Setup, stack: Stack, db_host: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWL_SETTINGS", stack.django_settings().into()),
        ("AWL_VIEWS", setup.views().into()),
        ("AWL_DB_HOST", db_host.into()),
        ("AWL_DB_PORT", DB_PORT.to_string()),
        ("AWL_DB_POOL", setup.pool_size().to_string()),
        ("AWL_DB_PASSWORD", DB_PASSWORD.into()),
    ]
}

/// PostgreSQL's log line prefix on both back ends: its default (`%m [%p] `) plus the client's
/// host, so that a refusal names whom it refused.
pub(crate) const LOG_LINE_PREFIX: &str = "%m [%p] %h ";

/// PostgreSQL's log messages when it refuses a connection for want of a slot: every slot taken
/// (checked before authentication), or only the superusers' reserved ones left (checked after).
/// PostgreSQL 16 ends the second differently ("...reserved for roles with the SUPERUSER
/// attribute"); the common beginning matches both.
const REFUSALS: [&str; 2] = [
    "sorry, too many clients already",
    "remaining connection slots are reserved",
];

/// Clients on the database's own host: the agent's psql (local socket or loopback) and the
/// docker back end's health check. Their refusals are not the server's.
const DB_HOST_CLIENTS: [&str; 3] = ["[local]", "127.0.0.1", "::1"];

/// Connections refused for want of a slot in a PostgreSQL log (one FATAL line each), those of
/// clients on the database's own host left out (the host follows the pid, `LOG_LINE_PREFIX`).
pub(crate) fn count_refusals(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("FATAL:") && REFUSALS.iter().any(|r| l.contains(r)))
        .filter(|l| {
            let host = l
                .split_once("] ")
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !host.is_some_and(|h| DB_HOST_CLIENTS.contains(&h))
        })
        .count() as u64
}

/// The pg_hba.conf rule PostgreSQL applies to the server's connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HbaRule {
    pub line: u32,
    /// "scram-sha-256", "md5", "trust", ...
    pub method: String,
}

/// What the system under test ran with, measured from it after every start (`Sut::up`,
/// `switch`): versions and settings from the server's own environment (`manage.py
/// system_record`, docker/app/posts/management/commands/system_record.py), PostgreSQL's answers
/// over a connection the server's way, and the server's command line from /proc. Stored with
/// every cell; the report lists where it differs from the study.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SystemRecord {
    pub backend: String,
    pub setup: String,
    pub stack: String,
    pub python: String,
    pub django: String,
    /// The database driver and its version ("psycopg2 2.9.5").
    pub db_driver: String,
    pub gunicorn: Option<String>,
    pub uvicorn: Option<String>,
    pub debug: bool,
    pub middleware: Vec<String>,
    pub installed_apps: Vec<String>,
    /// Seconds a database connection is kept; None: forever (Django's `CONN_MAX_AGE = None`).
    pub conn_max_age: Option<u64>,
    pub db_pool: bool,
    /// The root logger's level ("DEBUG", "WARNING").
    pub root_log_level: String,
    /// Whether Django prints every SQL statement (DEBUG on and django.db.backends at DEBUG).
    pub sql_logged: bool,
    pub postgres_version: String,
    pub max_connections: u32,
    pub password_encryption: String,
    /// The pg_hba.conf rule that authenticates the server's connections (None: none matched).
    pub db_auth_rule: Option<HbaRule>,
    /// How the role's password is stored ("SCRAM-SHA-256", "md5"; None: no password).
    pub db_password_stored_as: Option<String>,
    /// libpq's word on the record's own connection: the server asked it for the password.
    pub db_used_password: Option<bool>,
    pub db_ssl: bool,
    /// gunicorn's master command line (/proc/PID/cmdline).
    pub server_command: String,
    /// gunicorn's worker processes.
    pub server_workers: u32,
}

impl SystemRecord {
    /// The authentication method of the server's connections, as PostgreSQL's rules give it.
    pub fn db_auth_method(&self) -> Option<&str> {
        self.db_auth_rule.as_ref().map(|r| r.method.as_str())
    }
}

/// What a back end does; `Sut` adds seeding and the safety net on top.
pub trait Backend: Send + Sync {
    /// Brings up PostgreSQL and the server (migrated, answering HTTP), not yet seeded, where
    /// nothing named `opts.name` exists. `Sut::up` removes leftovers first and cleans up on error.
    fn up(&self, opts: &Options) -> Result<State, SutError>;
    /// Replaces the server with one for `opts` (setup and stack), keeping the database and its
    /// data; PostgreSQL is restarted only when `max_connections` changes.
    fn switch(&self, state: &State, opts: &Options) -> Result<State, SutError>;
    /// Runs SQL statements through psql in the database (`-At`, one `-c` each, each in its
    /// own transaction) and returns psql's output.
    fn psql(&self, state: &State, statements: &[&str]) -> Result<String, SutError>;
    /// The last lines of the server's and the database's logs.
    fn logs(&self, state: &State, lines: usize) -> String;
    /// Whether the server and database processes are still there.
    fn alive(&self, state: &State) -> bool;
    /// Runs `python manage.py ARGS` in the server's environment (its venv or container, its
    /// settings, its network) and returns what it printed on stdout.
    fn manage(&self, state: &State, args: &[&str]) -> Result<String, SutError>;
    /// PostgreSQL's whole log since it last started.
    fn db_log(&self, state: &State) -> Result<String, SutError>;
    /// Removes everything named `name` made by this back end; true when something was there.
    fn down(&self, name: &str) -> Result<bool, SutError>;
    /// `state` with what may have changed since it was written read again from the running
    /// system: a container restarted by its engine has new processes (a new namespace path) and
    /// may have a new published port. The netns back end's processes cannot restart by
    /// themselves, so by default nothing changes.
    fn refresh(&self, state: &State) -> State {
        state.clone()
    }
}

/// What `seed` did.
#[derive(Debug, Clone, Serialize)]
pub struct SeedReport {
    /// False when the database was already seeded (nothing was written).
    pub seeded: bool,
    pub rows: u64,
    pub seconds: f64,
}

/// A running system under test. Dropped without `keep()`, it takes itself down.
pub struct Sut {
    state: State,
    backend: Box<dyn Backend>,
    armed: bool,
    /// Taken after the last start; the error says why not.
    record: Result<SystemRecord, String>,
    /// What `manage.py system_record` measured for each (setup, stack) started so far: nothing
    /// it measures changes while the system is up, and it costs a Python start (about a second
    /// of the two cores) per fresh server.
    recorded: Vec<(Setup, Stack, SystemRecord)>,
}

impl Sut {
    /// Brings up `opts` on `kind` (not seeded: call `seed`).
    pub fn up(kind: BackendKind, opts: &Options) -> Result<Sut, SutError> {
        opts.validate()?;
        let backend = kind.backend();
        // Leftovers of a killed run go first; a failed start leaves nothing either.
        backend.down(&opts.name)?;
        let state = backend.up(opts).inspect_err(|_| {
            let _ = backend.down(&opts.name);
        })?;
        let mut sut = Sut {
            state,
            backend,
            armed: true,
            record: Err(String::new()),
            recorded: Vec::new(),
        };
        sut.record = sut.take_record();
        Ok(sut)
    }

    /// Takes over a system recorded in a state file (not armed: dropping it leaves it running).
    /// The system `state` describes, as it runs now (`Backend::refresh`).
    pub fn attach(state: State) -> Sut {
        let backend = state.backend.backend();
        Sut {
            state: backend.refresh(&state),
            backend,
            armed: false,
            record: Err("not recorded: attached to a running system".into()),
            recorded: Vec::new(),
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }
    pub fn url(&self) -> &str {
        &self.state.url
    }
    pub fn netns(&self) -> &str {
        &self.state.netns
    }
    pub fn db_port(&self) -> u16 {
        self.state.db_port
    }
    pub fn server_pids(&self) -> &[u32] {
        &self.state.server_pids
    }

    /// Switches to another setup or stack without seeding again: the server is replaced,
    /// PostgreSQL keeps its data (and is restarted only when `max_connections` changes). On
    /// error the system is left as far as it got; `down` still removes all of it.
    pub fn switch(&mut self, setup: Setup, stack: Stack) -> Result<(), SutError> {
        let mut opts = Options::new(setup, stack, &self.state.name);
        opts.validate()?;
        if self.state.backend == BackendKind::Docker {
            // Keep the published port where the callers already send their load.
            opts.host_port = self.state.server_addr().ok().map(|a| a.port());
        }
        self.state = self.backend.switch(&self.state, &opts)?;
        self.record = self.take_record();
        Ok(())
    }

    /// What the system runs with, as recorded after its last start (`up`, `switch`); the error
    /// says why it could not be recorded.
    pub fn system(&self) -> Result<&SystemRecord, &str> {
        self.record.as_ref().map_err(String::as_str)
    }

    fn take_record(&mut self) -> Result<SystemRecord, String> {
        let (setup, stack) = (self.state.setup, self.state.stack);
        if let Some((_, _, r)) = self
            .recorded
            .iter()
            .find(|(a, b, _)| *a == setup && *b == stack)
        {
            let mut r = r.clone();
            self.record_processes(&mut r);
            return Ok(r);
        }
        let r = self.record_system().map_err(|e| {
            tracing::warn!("recording the system under test: {e}");
            e.to_string()
        })?;
        self.recorded.push((setup, stack, r.clone()));
        Ok(r)
    }

    /// The server's command line and workers, which each start has anew.
    fn record_processes(&self, r: &mut SystemRecord) {
        if let Some(&master) = self.state.server_pids.first() {
            // The command line's arguments are NUL-separated (proc(5)).
            r.server_command = std::fs::read(format!("/proc/{master}/cmdline"))
                .map(|b| {
                    String::from_utf8_lossy(&b)
                        .split('\0')
                        .filter(|a| !a.is_empty())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            r.server_workers = children(master).len() as u32;
        }
    }

    /// Measures what the system runs with now (see `SystemRecord`).
    pub(crate) fn record_system(&self) -> Result<SystemRecord, SutError> {
        let out = self.backend.manage(&self.state, &["system_record"])?;
        let json = out.lines().rev().find(|l| l.starts_with('{')).unwrap_or("");
        let mut r: SystemRecord = serde_json::from_str(json).map_err(|e| {
            SutError::Other(format!(
                "manage.py system_record printed {:?}: {e}",
                tail(&out, 2)
            ))
        })?;
        r.backend = self.state.backend.name().into();
        r.setup = self.state.setup.name().into();
        r.stack = self.state.stack.name().into();
        self.record_processes(&mut r);
        Ok(r)
    }

    /// Connections PostgreSQL has refused the server for want of a slot since it last started,
    /// counted in its log (`count_refusals`). A caller measuring an interval takes the difference.
    pub fn db_refusals(&self) -> Result<u64, SutError> {
        Ok(count_refusals(&self.backend.db_log(&self.state)?))
    }

    /// Seeds 1,000,000 posts unless the database already has them (docker/app/sql/seed.sql),
    /// then settles the table (`settle_table`) so the first runs measure a steady database.
    pub fn seed(&self) -> Result<SeedReport, SutError> {
        let t0 = Instant::now();
        if self.seeded()? {
            return Ok(SeedReport {
                seeded: false,
                rows: self.count()?,
                seconds: t0.elapsed().as_secs_f64(),
            });
        }
        self.backend.psql(&self.state, &[assets::SEED_SQL])?;
        self.settle_table()?;
        Ok(SeedReport {
            seeded: true,
            rows: self.count()?,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    fn seeded(&self) -> Result<bool, SutError> {
        // Two questions: a query on a missing table would fail as a whole.
        let exists = self.backend.psql(
            &self.state,
            &["SELECT to_regclass('awaitlab_seed') IS NOT NULL"],
        )?;
        if exists.trim() != "t" {
            return Ok(false);
        }
        let n = self
            .backend
            .psql(&self.state, &["SELECT count(*) FROM awaitlab_seed"])?;
        Ok(n.trim() != "0")
    }

    /// Deletes the posts created after the seed (docker/app/sql/reset.sql), so the table holds
    /// exactly 1,000,000 rows again; vacuums when it deleted any. Returns the rows deleted.
    pub fn reset(&self) -> Result<u64, SutError> {
        let before = self.count()?;
        self.backend.psql(&self.state, &[assets::RESET_SQL])?;
        let deleted = before.saturating_sub(SEED_ROWS);
        if deleted > 0 {
            self.settle_table()?;
        }
        Ok(deleted)
    }

    /// `VACUUM ANALYZE` (hint bits, visibility map, statistics), then `CHECKPOINT`, so that the
    /// next runs pay neither for the first reads of new rows nor for the checkpointer writing
    /// them out (spread over minutes otherwise, during the measurement).
    fn settle_table(&self) -> Result<(), SutError> {
        self.backend
            .psql(&self.state, &["VACUUM ANALYZE posts_post", "CHECKPOINT"])
            .map(drop)
    }

    /// Rows in posts_post, counted by PostgreSQL.
    pub fn count(&self) -> Result<u64, SutError> {
        let out = self
            .backend
            .psql(&self.state, &["SELECT count(*) FROM posts_post"])?;
        out.trim()
            .parse()
            .map_err(|_| SutError::Other(format!("unexpected count {out:?}")))
    }

    /// Runs SQL statements in the database (see `Backend::psql`).
    pub fn psql(&self, statements: &[&str]) -> Result<String, SutError> {
        self.backend.psql(&self.state, statements)
    }

    pub fn logs(&self, lines: usize) -> String {
        self.backend.logs(&self.state, lines)
    }

    pub fn alive(&self) -> bool {
        self.backend.alive(&self.state)
    }

    /// Leaves the system running when this value goes away (the CLI's `up`).
    pub fn keep(mut self) -> State {
        self.armed = false;
        self.state.clone()
    }

    /// Removes everything.
    pub fn down(mut self) -> Result<(), SutError> {
        self.armed = false;
        self.backend.down(&self.state.name).map(|_| ())
    }
}

impl Drop for Sut {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.backend.down(&self.state.name) {
                tracing::warn!("taking down {}: {e}", self.state.name);
            }
        }
    }
}

/// One HTTP request with `Connection: close` (reqwest); returns the status and the body. For
/// the readiness checks here and for tests; not a load generator.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    form: Option<&str>,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let other = |e: reqwest::Error| std::io::Error::other(e.without_url().to_string());
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let url = format!("http://{addr}{path}");
    let form = form.map(str::to_owned);
    block(async move {
        // Straight to `addr`: no proxy from the environment.
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(timeout)
            .timeout(timeout)
            .pool_max_idle_per_host(0)
            .build()
            .map_err(other)?;
        let mut req = client
            .request(method, url)
            .header(reqwest::header::CONNECTION, "close");
        if let Some(f) = form {
            req = req
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(f);
        }
        let resp = req.send().await.map_err(other)?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await.map_err(other)?))
    })
}

/// Runs a future to completion on a runtime of its own. On a fresh thread when the caller is
/// already inside a tokio runtime (block_on would panic there), e.g. a `Drop` in async code.
pub(crate) fn block<F>(f: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    let go = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
            .block_on(f)
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| s.spawn(go).join().expect("a blocking call panicked"))
    } else {
        go()
    }
}

/// Waits until the server answers any HTTP request (`GET /` is a 404 that touches no
/// database), while `alive` says its process is still there.
pub(crate) fn wait_http(
    addr: SocketAddr,
    limit: Duration,
    mut alive: impl FnMut() -> bool,
) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        match http(addr, "GET", "/", None, Duration::from_secs(2)) {
            Ok(_) => return Ok(()),
            Err(e) if t0.elapsed() > limit => {
                return Err(format!("no HTTP answer from {addr} within {limit:?}: {e}"))
            }
            Err(_) => {}
        }
        if !alive() {
            return Err("the server exited".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Serialises `down` within the process: the CLI's signal handler and a handle's `Drop` may both
/// take the same system down at once, and the second must wait for the first, not race it (a
/// process that exits mid-way would leave half a system behind).
pub(crate) fn down_lock() -> std::sync::MutexGuard<'static, ()> {
    static DOWN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    DOWN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where the CLI records running systems.
pub fn state_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/awaitlab/sut-{name}.json"))
}

/// The workers of a process (its children), for `server_pids`.
pub(crate) fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    /// `Setup::ALL` and `name` are what the command line, configurations and results use: the
    /// same variants, in clap's order, with clap's names.
    #[test]
    fn setup_names_are_the_command_lines() {
        use clap::ValueEnum;
        let clap: Vec<String> = Setup::value_variants()
            .iter()
            .map(|s| s.to_possible_value().unwrap().get_name().to_string())
            .collect();
        let ours: Vec<&str> = Setup::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(clap, ours);
        assert_eq!(Setup::ALL.to_vec(), Setup::value_variants().to_vec());
    }

    use super::*;

    #[test]
    fn setups_match_the_study() {
        assert_eq!(Setup::Sync.max_connections(), 100);
        assert_eq!(Setup::AsyncLimited.max_connections(), 100);
        assert_eq!(Setup::AsyncUnlimited.max_connections(), 1000);
        assert_eq!(Setup::Sync.views(), "sync");
        assert!(Setup::ALL[1..].iter().all(|s| s.views() == "async"));
        assert_eq!(Setup::AsyncPooled.pool_size(), 20);
    }

    #[test]
    fn pooled_needs_the_current_stack_and_names_are_checked() {
        let mut o = Options::new(Setup::AsyncPooled, Stack::Study, "awlx");
        assert!(o.validate().unwrap_err().is_usage());
        o.stack = Stack::Current;
        o.validate().unwrap();
        for bad in ["x", "awl-1", "awlABC", "awl12345678"] {
            o.name = bad.into();
            assert!(o.validate().unwrap_err().is_usage(), "{bad}");
        }
    }

    #[test]
    fn state_round_trips_and_rejects_unknown_fields() {
        let s = State {
            version: STATE_VERSION,
            backend: BackendKind::Netns,
            setup: Setup::AsyncLimited,
            stack: Stack::Study,
            name: "awlx".into(),
            url: "http://10.231.0.2:8000".into(),
            db_port: 5432,
            netns: "/run/netns/awlxs".into(),
            server_pids: vec![1, 2],
            db_pid: 3,
        };
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"setup\":\"async-limited\""), "{j}");
        assert_eq!(serde_json::from_str::<State>(&j).unwrap(), s);
        let extra = j.replacen('{', "{\"x\":1,", 1);
        assert!(serde_json::from_str::<State>(&extra).is_err());
        assert_eq!(s.server_addr().unwrap().port(), 8000);
    }

    #[test]
    fn refusals_are_the_fatal_lines_for_want_of_a_slot() {
        // PostgreSQL's lines with LOG_LINE_PREFIX: the first three are refusals of the server;
        // the health check's and the agent's psql's (on the database's host) are not.
        let log = "\
2026-12-02 02:30:01.100 UTC [411] 10.77.0.2 FATAL:  sorry, too many clients already
2026-12-02 02:30:01.200 UTC [412] 172.26.0.3 FATAL:  remaining connection slots are reserved for non-replication superuser connections
2026-12-02 02:30:02.000 UTC [413] 10.77.0.2 FATAL:  remaining connection slots are reserved for roles with the SUPERUSER attribute
2026-12-02 02:30:02.100 UTC [416] 127.0.0.1 FATAL:  sorry, too many clients already
2026-12-02 02:30:02.200 UTC [417] [local] FATAL:  sorry, too many clients already
2026-12-02 02:30:03.000 UTC [414] 10.77.0.2 FATAL:  password authentication failed for user \"postgres\"
2026-12-02 02:30:04.000 UTC [415] [local] LOG:  statement: SELECT 'sorry, too many clients already'
";
        assert_eq!(count_refusals(log), 3);
        // A log without the host in its prefix counts every refusal.
        assert_eq!(
            count_refusals(
                "2026-12-02 02:30:01.100 UTC [411] FATAL:  sorry, too many clients already"
            ),
            1
        );
        assert_eq!(count_refusals(""), 0);
    }

    #[test]
    fn both_back_ends_give_the_server_the_password_and_the_stacks_settings() {
        let env: BTreeMap<_, _> = server_env(Setup::AsyncPooled, Stack::Study, "db")
            .into_iter()
            .collect();
        assert_eq!(env["AWL_DB_PASSWORD"], DB_PASSWORD);
        assert_eq!(env["AWL_SETTINGS"], "study");
        assert_eq!(env["AWL_VIEWS"], "async");
        assert_eq!(env["AWL_DB_POOL"], "20");
        assert_eq!(Stack::Current.django_settings(), "production");
        // The settings file knows both profiles by these names.
        let settings = assets::APP_FILES
            .iter()
            .find(|(p, _)| *p == "studysite/settings.py")
            .unwrap()
            .1;
        for name in [
            "\"study\"",
            "\"production\"",
            "AWL_DB_PASSWORD",
            "AWL_SETTINGS",
        ] {
            assert!(settings.contains(name), "{name}");
        }
        assert_eq!(DbAuth::default(), DbAuth::Scram);
        assert_eq!(DbAuth::Scram.hba_method(), "scram-sha-256");
        assert_eq!(
            Options::new(Setup::Sync, Stack::Study, "awlx").db_auth,
            DbAuth::Scram
        );
    }

    #[test]
    fn the_record_reads_what_manage_py_system_record_prints() {
        // A line as docker/app/posts/management/commands/system_record.py prints it.
        let line = r#"{"postgres_version": "15.14 (Debian 15.14-0+deb12u1)", "max_connections": 100, "password_encryption": "scram-sha-256", "db_auth_rule": {"line": 100, "method": "scram-sha-256"}, "db_password_stored_as": "SCRAM-SHA-256", "db_ssl": false, "python": "3.11.2", "django": "4.1.3", "db_driver": "psycopg2 2.9.5", "gunicorn": "20.1.0", "uvicorn": "0.20.0", "debug": true, "middleware": ["django.middleware.security.SecurityMiddleware"], "installed_apps": ["posts"], "conn_max_age": 0, "db_pool": false, "root_log_level": "DEBUG", "sql_logged": true, "db_used_password": true}"#;
        let r: SystemRecord = serde_json::from_str(line).unwrap();
        assert_eq!(r.db_auth_method(), Some("scram-sha-256"));
        assert_eq!(r.conn_max_age, Some(0));
        assert_eq!(r.db_used_password, Some(true));
        assert_eq!(r.max_connections, 100);
        let none: SystemRecord =
            serde_json::from_str(r#"{"conn_max_age": null, "db_auth_rule": null}"#).unwrap();
        assert_eq!((none.conn_max_age, none.db_auth_method()), (None, None));
    }

    #[test]
    fn tail_keeps_the_last_lines_on_one_line() {
        assert_eq!(tail("a\n\nb\nc\n", 2), "b | c");
        assert_eq!(tail("", 3), "(empty)");
    }

    #[test]
    fn embedded_requirements_pin_the_study_versions() {
        for pin in [
            "Django==4.1.3",
            "psycopg2-binary==2.9.5",
            "gunicorn==20.1.0",
            "uvicorn==0.20.0",
        ] {
            assert!(assets::REQUIREMENTS_STUDY.contains(pin), "{pin}");
        }
        assert!(!assets::REQUIREMENTS_CURRENT.contains("uvicorn[standard]"));
    }
}
